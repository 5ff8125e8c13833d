//! Where the metadata store's records live: an ordered key-value space with atomic
//! batches. sled (one folder per replica) is the embedded default; PostgreSQL (one table,
//! many replicas, several processes) serves hubs that outgrow one machine.
//!
//! Invariants every backend keeps:
//! - Keys order bytewise (unsigned), so the store's prefix and range scans mean the same
//!   thing everywhere.
//! - [`Backend::apply`] writes a whole [`WriteBatch`] or nothing, also across a crash.
//! - After `flush` returns, everything applied before it survives a crash.
//! - A backend with a fence (see [`Backend::set_fence`]) refuses every batch once its
//!   fence is no longer current: a process that lost its lease cannot write.

use std::collections::BTreeMap;
use std::ops::Bound;

/// A value or key as the backends hand it out (cheap to clone; sled's own type).
pub type Bytes = sled::IVec;

/// An error of the storage underneath, for `MetadataError::Storage`.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// An ordered scan: `(key, value)` pairs or the error that stopped it.
pub type Scan<'a> = Box<dyn Iterator<Item = Result<(Bytes, Bytes), BackendError>> + 'a>;

/// The writes of one atomic commit. A later write of a key replaces an earlier one, as
/// in `sled::Batch`.
#[derive(Default, Debug)]
pub struct WriteBatch {
    writes: BTreeMap<Vec<u8>, Option<Bytes>>,
}

impl WriteBatch {
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) {
        self.writes
            .insert(key.as_ref().to_vec(), Some(value.into()));
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.writes.insert(key.as_ref().to_vec(), None);
    }

    /// Writes in key order; `None` removes the key.
    pub fn into_writes(self) -> impl Iterator<Item = (Vec<u8>, Option<Bytes>)> {
        self.writes.into_iter()
    }
}

/// What [`Backend::get_or_last_at_or_before`] found.
pub enum Lookup {
    Exact(Bytes),
    /// The key and value of the greatest key at or below the one asked for.
    Before(Bytes, Bytes),
    Nothing,
}

/// Storage for one replica's records.
pub trait Backend: Send {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, BackendError>;
    /// Entries whose keys lie between the bounds, in key order.
    fn range(&self, from: Bound<&[u8]>, to: Bound<&[u8]>) -> Scan<'_>;
    /// The entry with the greatest key in `[floor, key]`, if any.
    fn last_at_or_before(
        &self,
        floor: &[u8],
        key: &[u8],
    ) -> Result<Option<(Bytes, Bytes)>, BackendError>;
    /// The value under `exact` if there is one; otherwise the entry with the greatest
    /// key in `[floor, key]` (an item's loose record, else its page). One round trip
    /// where a backend has round trips.
    fn get_or_last_at_or_before(
        &self,
        exact: &[u8],
        floor: &[u8],
        key: &[u8],
    ) -> Result<Lookup, BackendError> {
        match self.get(exact)? {
            Some(value) => Ok(Lookup::Exact(value)),
            None => Ok(self
                .last_at_or_before(floor, key)?
                .map_or(Lookup::Nothing, |(k, v)| Lookup::Before(k, v))),
        }
    }
    /// The smallest key in `(key, end)`, if any (the key only: a probe for where the
    /// next page starts should not read the page).
    fn first_key_after(&self, key: &[u8], end: &[u8]) -> Result<Option<Bytes>, BackendError> {
        match self
            .range(Bound::Excluded(key), Bound::Excluded(end))
            .next()
        {
            None => Ok(None),
            Some(entry) => entry.map(|(k, _)| Some(k)),
        }
    }
    /// Applies every write of `batch`, or none.
    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError>;
    /// Blocks until everything applied is durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// Where the records live, for messages (a folder, or a database and replica name).
    fn location(&self) -> String;
    /// Writes only while the shared lease names `session` (`None`: always). Only a
    /// store that several processes share needs this; the others ignore it.
    fn set_fence(&self, _session: Option<Vec<u8>>) {}
    /// The sled tree underneath, for the crash and damage tests.
    fn sled_tree(&self) -> Option<&sled::Tree> {
        None
    }
}

/// The embedded default: one sled tree in the replica's folder.
pub struct SledBackend {
    pub(crate) db: sled::Db,
    pub(crate) path: std::path::PathBuf,
}

/// A bound that owns its key (scans outlive the caller's slices).
pub(crate) fn owned(bound: Bound<&[u8]>) -> Bound<Vec<u8>> {
    match bound {
        Bound::Included(k) => Bound::Included(k.to_vec()),
        Bound::Excluded(k) => Bound::Excluded(k.to_vec()),
        Bound::Unbounded => Bound::Unbounded,
    }
}

impl Backend for SledBackend {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, BackendError> {
        Ok(self.db.get(key)?)
    }

    fn range(&self, from: Bound<&[u8]>, to: Bound<&[u8]>) -> Scan<'_> {
        Box::new(
            self.db
                .range::<Vec<u8>, _>((owned(from), owned(to)))
                .map(|entry| entry.map_err(BackendError::from)),
        )
    }

    fn last_at_or_before(
        &self,
        floor: &[u8],
        key: &[u8],
    ) -> Result<Option<(Bytes, Bytes)>, BackendError> {
        Ok(self.db.range(floor..=key).next_back().transpose()?)
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), BackendError> {
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.into_writes() {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        Ok(self.db.apply_batch(sled_batch)?)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.db.flush()?;
        Ok(())
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn sled_tree(&self) -> Option<&sled::Tree> {
        Some(&self.db)
    }
}

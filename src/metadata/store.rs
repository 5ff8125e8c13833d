use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::backend::{Backend, BackendError, Bytes, SledBackend, WriteBatch};
use super::records::{
    decode, decode_knowledge_record, encode, encode_knowledge_record, ClockRecord, PeerRecord,
    ReplicaRecord, KIND_CLOCK, KIND_PEER, KIND_REPLICA,
};
use super::sled_folder::{self, OpenError};
use super::{ItemMeta, MetadataError, SavedConflict};
use crate::model::{Hlc, ItemId, Knowledge, ReplicaId, Version};
use std::ops::Bound;

/// The store layout version written in the replica record. Bump it when a key layout or
/// a record changes meaning; `open` refuses any other value.
pub const STORE_FORMAT: u32 = 1;

// One-byte key prefixes. Fixed records sit below the per-item families.
const KEY_REPLICA: &[u8] = &[0x01];
const KEY_CLOCK: &[u8] = &[0x02];
const KEY_KNOWLEDGE: &[u8] = &[0x03];
const KEY_FORGOTTEN: &[u8] = &[0x04];
const PREFIX_ITEM: u8 = 0x10;
const PREFIX_INDEX: u8 = 0x11;
const PREFIX_CONFLICT: u8 = 0x13;
const PREFIX_PEER: u8 = 0x14;
const PREFIX_PENDING: u8 = 0x15;
const PREFIX_OWNER: u8 = 0x16;

fn prefixed(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.push(prefix);
    key.extend_from_slice(id);
    key
}

fn index_key(v: Version) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[0] = PREFIX_INDEX;
    key[1..17].copy_from_slice(v.replica.as_bytes());
    key[17..].copy_from_slice(&v.tick.to_be_bytes());
    key
}

/// An item's metadata with the data its record carries (`None`: a tombstone, or a
/// store that keeps data elsewhere).
pub type ItemRecord = (ItemMeta, Option<Vec<u8>>);

/// Counts for `knit status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreSummary {
    pub live_items: u64,
    pub tombstones: u64,
    pub saved_conflicts: u64,
    /// Bytes of keys and values that are metadata (item records and index entries).
    pub metadata_bytes: u64,
    pub data_bytes: u64,
}

/// A replica's metadata store. Holds the sled handle exclusively (sled locks the folder),
/// so the cached counters and knowledge below are the truth.
pub struct MetadataStore {
    backend: Box<dyn Backend>,
    path: PathBuf,
    id: ReplicaId,
    clock: ClockRecord,
    /// Knowledge without this replica's own entry (see the module invariants).
    stored_knowledge: Knowledge,
    forgotten: Knowledge,
    poisoned: bool,
}

impl MetadataStore {
    /// Creates a new replica in `path` (the folder may exist but must not hold a replica).
    pub fn create(path: &Path) -> Result<Self, MetadataError> {
        if sled_folder::files_present(path) {
            return Err(MetadataError::AlreadyAReplica {
                path: path.to_path_buf(),
            });
        }
        let db = open_sled(path)?;
        Self::create_in(Box::new(SledBackend {
            db,
            path: path.to_path_buf(),
        }))
    }

    /// Creates a new replica in `backend`, which must hold no replica yet.
    pub(crate) fn create_in(backend: Box<dyn Backend>) -> Result<Self, MetadataError> {
        let path = PathBuf::from(backend.location());
        let id = ReplicaId::new_random();
        let mut batch = WriteBatch::default();
        batch.insert(
            KEY_REPLICA,
            encode(
                KIND_REPLICA,
                &ReplicaRecord {
                    store_format: STORE_FORMAT,
                    id: *id.as_bytes(),
                },
            ),
        );
        batch.insert(KEY_CLOCK, encode(KIND_CLOCK, &ClockRecord::default()));
        batch.insert(KEY_KNOWLEDGE, encode_knowledge_record(&Knowledge::new()));
        batch.insert(KEY_FORGOTTEN, encode_knowledge_record(&Knowledge::new()));
        let storage = |source| MetadataError::Storage {
            path: path.clone(),
            source,
        };
        backend.apply(batch).map_err(storage)?;
        backend.flush().map_err(storage)?;
        Self::load(backend)
    }

    /// Opens an existing replica. A folder that holds no replica is left untouched.
    pub fn open(path: &Path) -> Result<Self, MetadataError> {
        if !sled_folder::files_present(path) {
            return Err(MetadataError::NotAReplica {
                path: path.to_path_buf(),
            });
        }
        let db = open_sled(path)?;
        Self::load(Box::new(SledBackend {
            db,
            path: path.to_path_buf(),
        }))
    }

    /// Opens the replica stored in `backend`.
    pub(crate) fn load(backend: Box<dyn Backend>) -> Result<Self, MetadataError> {
        let fixed = read_fixed_records(&*backend)?;
        Ok(Self {
            path: PathBuf::from(backend.location()),
            backend,
            id: fixed.id,
            clock: fixed.clock,
            stored_knowledge: fixed.knowledge,
            forgotten: fixed.forgotten,
            poisoned: false,
        })
    }

    /// Reads the replica id, clock and knowledge again from storage. A store that
    /// several processes share (PostgreSQL) calls this when it takes the replica over,
    /// since another process may have committed since this handle last looked.
    pub fn reload(&mut self) -> Result<(), MetadataError> {
        let fixed = read_fixed_records(&*self.backend)?;
        self.id = fixed.id;
        self.clock = fixed.clock;
        self.stored_knowledge = fixed.knowledge;
        self.forgotten = fixed.forgotten;
        self.poisoned = false;
        Ok(())
    }

    /// Creates a replica named `replica` in the shared PostgreSQL table, or opens it
    /// if it is there already. Processes that race to create one replica are
    /// serialised by an advisory lock on its name: one creates, the others open.
    pub fn open_or_create_postgres(
        conninfo: &str,
        replica: &str,
        location: String,
    ) -> Result<Self, MetadataError> {
        let storage = |source| MetadataError::Storage {
            path: PathBuf::from(location.clone()),
            source,
        };
        // The lock lives on a connection of its own and goes with it.
        let mut lock = super::postgres::connect(conninfo).map_err(storage)?;
        lock.execute(
            "SELECT pg_advisory_lock(hashtext($1))",
            &[&format!("knit replica {replica}")],
        )
        .map_err(|e| storage(Box::new(e)))?;
        let client = super::postgres::connect(conninfo).map_err(storage)?;
        let backend = super::postgres::PostgresBackend::new(client, replica, location.clone());
        if backend.holds_replica().map_err(storage)? {
            Self::load(Box::new(backend))
        } else {
            Self::create_in(Box::new(backend))
        }
    }

    /// Writes only while the shared lease names `session` (PostgreSQL; see
    /// `metadata::postgres`). `None` lifts the fence.
    pub fn set_fence(&self, session: Option<Vec<u8>>) {
        self.backend.set_fence(session);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// The last tick this replica issued.
    pub fn tick(&self) -> u64 {
        self.clock.tick
    }

    pub fn last_hlc(&self) -> Hlc {
        Hlc(self.clock.hlc)
    }

    pub fn last_sync_tick(&self) -> u64 {
        self.clock.last_sync_tick
    }

    /// This replica's session epoch (see `ClockRecord::epoch`).
    pub fn epoch(&self) -> u64 {
        self.clock.epoch
    }

    /// The highest session epoch seen from `peer` (0 if never met).
    pub fn peer_epoch(&self, peer: ReplicaId) -> Result<u64, MetadataError> {
        let key = prefixed(PREFIX_PEER, peer.as_bytes());
        match self.get(&key)? {
            None => Ok(0),
            Some(bytes) => decode::<PeerRecord>(KIND_PEER, &bytes)
                .map(|r| r.epoch)
                .map_err(|r| self.damaged(&key, r)),
        }
    }

    /// Everything this replica knows, its own changes included.
    pub fn knowledge(&self) -> Knowledge {
        self.stored_knowledge
            .with_replica_tick(self.id, self.clock.tick)
    }

    pub fn forgotten(&self) -> &Knowledge {
        &self.forgotten
    }

    fn storage(&self, source: BackendError) -> MetadataError {
        MetadataError::Storage {
            path: self.path.clone(),
            source,
        }
    }

    fn damaged(&self, key: &[u8], reason: String) -> MetadataError {
        MetadataError::Damaged {
            path: self.path.clone(),
            key: describe_key(key),
            reason,
        }
    }

    fn check(&self) -> Result<(), MetadataError> {
        if self.poisoned {
            return Err(MetadataError::Poisoned { replica: self.id });
        }
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, MetadataError> {
        self.check()?;
        self.backend.get(key).map_err(|e| self.storage(e))
    }

    pub fn item(&self, id: &ItemId) -> Result<Option<ItemMeta>, MetadataError> {
        let key = prefixed(PREFIX_ITEM, id.as_bytes());
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => ItemMeta::decode(&bytes)
                .map(Some)
                .map_err(|r| self.damaged(&key, r)),
        }
    }

    /// An item's metadata and the data its record carries (built-in store), in one read.
    pub fn item_record(&self, id: &ItemId) -> Result<Option<ItemRecord>, MetadataError> {
        let key = prefixed(PREFIX_ITEM, id.as_bytes());
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => ItemMeta::decode_with_data(&bytes)
                .map(|(meta, data)| Some((meta, data.map(<[u8]>::to_vec))))
                .map_err(|r| self.damaged(&key, r)),
        }
    }

    /// The data of an item of the built-in store (the tail of its item record).
    pub fn data(&self, id: &ItemId) -> Result<Option<Vec<u8>>, MetadataError> {
        let key = prefixed(PREFIX_ITEM, id.as_bytes());
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => ItemMeta::decode_with_data(&bytes)
                .map(|(_, data)| data.map(<[u8]>::to_vec))
                .map_err(|r| self.damaged(&key, r)),
        }
    }

    pub fn saved_conflict(&self, id: &ItemId) -> Result<Option<SavedConflict>, MetadataError> {
        let key = prefixed(PREFIX_CONFLICT, id.as_bytes());
        match self.get(&key)? {
            None => Ok(None),
            Some(bytes) => SavedConflict::decode(&bytes)
                .map(Some)
                .map_err(|r| self.damaged(&key, r)),
        }
    }

    pub fn has_saved_conflicts(&self) -> Result<bool, MetadataError> {
        self.check()?;
        match scan_prefix(&*self.backend, PREFIX_CONFLICT).next() {
            None => Ok(false),
            Some(entry) => entry.map(|_| true).map_err(|e| self.storage(e)),
        }
    }

    pub fn saved_conflicts(&self) -> Result<Vec<SavedConflict>, MetadataError> {
        self.check()?;
        let mut out = Vec::new();
        for entry in scan_prefix(&*self.backend, PREFIX_CONFLICT) {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            out.push(SavedConflict::decode(&value).map_err(|r| self.damaged(&key, r))?);
        }
        Ok(out)
    }

    /// Items (live and tombstones) in id order, starting at `start`.
    pub fn items_from(
        &self,
        start: &[u8],
    ) -> impl Iterator<Item = Result<(ItemId, ItemMeta), MetadataError>> + '_ {
        let from = prefixed(PREFIX_ITEM, start);
        let poisoned = self.check().err();
        poisoned.into_iter().map(Err).chain(
            self.backend
                .range(Bound::Included(&from), Bound::Excluded(&[PREFIX_ITEM + 1]))
                .map(move |entry| {
                    let (key, value) = entry.map_err(|e| self.storage(e))?;
                    let id =
                        ItemId::new(&key[1..]).map_err(|e| self.damaged(&key, e.to_string()))?;
                    let meta = ItemMeta::decode(&value).map_err(|r| self.damaged(&key, r))?;
                    Ok((id, meta))
                }),
        )
    }

    /// The ids of items whose current version `known` does not contain, in id order.
    ///
    /// Reads the `(replica, tick)` index above `known`'s lowest tick of each replica,
    /// never the item records, so the cost follows the number of changes found (plus
    /// those hidden behind exception ranges), not the number of items stored.
    pub fn changes_unknown_to(&self, known: &Knowledge) -> Result<Vec<ItemId>, MetadataError> {
        self.check()?;
        let mut out = Vec::new();
        for replica in self.knowledge().replicas() {
            let from = known.min_tick(replica).saturating_add(1);
            let start = index_key(Version::new(replica, from));
            let end = index_key(Version::new(replica, u64::MAX));
            for entry in self
                .backend
                .range(Bound::Included(&start), Bound::Included(&end))
            {
                let (key, value) = entry.map_err(|e| self.storage(e))?;
                let tick = u64::from_be_bytes(
                    key[17..25]
                        .try_into()
                        .map_err(|_| self.damaged(&key, "short index key".into()))?,
                );
                let id = ItemId::new(&value).map_err(|e| self.damaged(&key, e.to_string()))?;
                if !known.contains(&id, Version::new(replica, tick)) {
                    out.push(id);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The pending-apply markers: writes to an external store that a commit promised and
    /// that may not have reached the store yet (see `Commit::mark_pending`).
    pub fn pending(&self) -> Result<Vec<Vec<u8>>, MetadataError> {
        self.check()?;
        let mut out = Vec::new();
        for entry in scan_prefix(&*self.backend, PREFIX_PENDING) {
            let (key, _) = entry.map_err(|e| self.storage(e))?;
            out.push(key[1..].to_vec());
        }
        Ok(out)
    }

    /// The record the store's owner keeps under `name` (see `Commit::set_owner_record`).
    pub fn owner_record(&self, name: &[u8]) -> Result<Option<Vec<u8>>, MetadataError> {
        self.get(&prefixed(PREFIX_OWNER, name))
            .map(|v| v.map(|bytes| bytes.to_vec()))
    }

    /// Items whose current version was made by `replica` after tick `after`.
    pub fn items_changed_by(
        &self,
        replica: ReplicaId,
        after: u64,
    ) -> Result<Vec<ItemId>, MetadataError> {
        self.check()?;
        let start = index_key(Version::new(replica, after.saturating_add(1)));
        let end = index_key(Version::new(replica, u64::MAX));
        let mut out = Vec::new();
        for entry in self
            .backend
            .range(Bound::Included(&start), Bound::Included(&end))
        {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            out.push(ItemId::new(&value).map_err(|e| self.damaged(&key, e.to_string()))?);
        }
        Ok(out)
    }

    /// Counts items, tombstones, conflicts and bytes with one pass over the store.
    pub fn summary(&self) -> Result<StoreSummary, MetadataError> {
        self.check()?;
        let mut s = StoreSummary::default();
        for entry in self.backend.range(Bound::Unbounded, Bound::Unbounded) {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            let bytes = (key.len() + value.len()) as u64;
            match key.first() {
                Some(&PREFIX_ITEM) => {
                    let (meta, data) =
                        ItemMeta::decode_with_data(&value).map_err(|r| self.damaged(&key, r))?;
                    if meta.deleted {
                        s.tombstones += 1;
                    } else {
                        s.live_items += 1;
                    }
                    let data_len = data.map_or(0, <[u8]>::len) as u64;
                    s.metadata_bytes += bytes - data_len;
                    s.data_bytes += data_len;
                }
                Some(&PREFIX_INDEX) => s.metadata_bytes += bytes,
                Some(&PREFIX_CONFLICT) => s.saved_conflicts += 1,
                _ => {}
            }
        }
        Ok(s)
    }

    /// Starts a commit. Nothing is written until [`MetadataStore::commit`].
    pub fn begin(&self) -> Commit {
        Commit {
            replica: self.id,
            batch: WriteBatch::default(),
            items: BTreeMap::new(),
            clock: self.clock,
            knowledge: None,
            forgotten: None,
            new_id: None,
        }
    }

    /// Writes a commit as one atomic batch. On failure the handle is poisoned.
    pub fn commit(&mut self, commit: Commit) -> Result<(), MetadataError> {
        self.check()?;
        let Commit {
            replica,
            mut batch,
            items,
            clock,
            knowledge,
            forgotten,
            new_id,
        } = commit;
        for (id, pending) in items {
            self.write_item_record(&mut batch, &id, pending)?;
        }
        if clock != self.clock {
            batch.insert(KEY_CLOCK, encode(KIND_CLOCK, &clock));
        }
        if new_id.is_some() {
            batch.insert(
                KEY_REPLICA,
                encode(
                    KIND_REPLICA,
                    &ReplicaRecord {
                        store_format: STORE_FORMAT,
                        id: *replica.as_bytes(),
                    },
                ),
            );
        }
        // Stored knowledge omits our own entry: the clock record carries it.
        let knowledge = knowledge.map(|k| k.with_replica_tick(replica, 0));
        if let Some(k) = &knowledge {
            debug_assert!(k.is_well_formed());
            batch.insert(KEY_KNOWLEDGE, encode_knowledge_record(k));
        }
        if let Some(f) = &forgotten {
            batch.insert(KEY_FORGOTTEN, encode_knowledge_record(f));
        }
        if let Err(e) = self.backend.apply(batch) {
            self.poisoned = true;
            return Err(self.storage(e));
        }
        self.clock = clock;
        self.id = replica;
        if let Some(k) = knowledge {
            self.stored_knowledge = k;
        }
        if let Some(f) = forgotten {
            self.forgotten = f;
        }
        Ok(())
    }

    /// Turns one item's pending writes into one write of its record. A part the commit
    /// keeps is read from the stored record.
    fn write_item_record(
        &self,
        batch: &mut WriteBatch,
        id: &ItemId,
        pending: PendingItem,
    ) -> Result<(), MetadataError> {
        let key = prefixed(PREFIX_ITEM, id.as_bytes());
        let stored = match (&pending.meta, &pending.data) {
            (MetaWrite::Forget, _) => {
                batch.remove(key);
                return Ok(());
            }
            (MetaWrite::Put(_), DataWrite::Put(_) | DataWrite::Remove) => None,
            _ => self.backend.get(&key).map_err(|e| self.storage(e))?,
        };
        let stored = match &stored {
            Some(bytes) => {
                Some(ItemMeta::decode_with_data(bytes).map_err(|r| self.damaged(&key, r))?)
            }
            None => None,
        };
        let meta = match (pending.meta, &stored) {
            (MetaWrite::Put(meta), _) => meta,
            (_, Some((meta, _))) => *meta,
            // Data for an item without metadata: nothing to attach it to.
            (_, None) => return Ok(()),
        };
        let data = match &pending.data {
            DataWrite::Put(data) => Some(data.as_slice()),
            DataWrite::Remove => None,
            DataWrite::Keep => stored.as_ref().and_then(|(_, data)| *data),
        };
        batch.insert(key, meta.encode_with_data(data));
        Ok(())
    }

    /// Blocks until every committed batch is on disk.
    pub fn flush(&mut self) -> Result<(), MetadataError> {
        self.check()?;
        if let Err(e) = self.backend.flush() {
            self.poisoned = true;
            return Err(self.storage(e));
        }
        Ok(())
    }

    /// Raw access to the sled tree, for the crash and damage tests only.
    #[doc(hidden)]
    pub fn raw_tree(&self) -> Option<&sled::Tree> {
        self.backend.sled_tree()
    }
}

/// What a commit does to an item record's metadata part.
#[derive(Default)]
enum MetaWrite {
    /// Keep what is stored (the commit only changes the data).
    #[default]
    Keep,
    Put(ItemMeta),
    Forget,
}

/// What a commit does to an item record's data tail.
#[derive(Default)]
enum DataWrite {
    #[default]
    Keep,
    Put(Vec<u8>),
    Remove,
}

/// The writes a commit makes to one item record, merged into one sled write.
#[derive(Default)]
struct PendingItem {
    meta: MetaWrite,
    data: DataWrite,
}

/// The writes of one atomic commit.
pub struct Commit {
    replica: ReplicaId,
    batch: WriteBatch,
    /// Item records are written at commit time: metadata and data of one item are
    /// one key, and either part may be set by a different call.
    items: BTreeMap<ItemId, PendingItem>,
    clock: ClockRecord,
    knowledge: Option<Knowledge>,
    forgotten: Option<Knowledge>,
    /// Set by [`Commit::rekey`]: the replica continues under this id.
    new_id: Option<ReplicaId>,
}

impl Commit {
    /// Takes the next tick and a hybrid clock time for a new local version.
    pub fn next_version(&mut self, now_ms: u64) -> (Version, Hlc) {
        self.clock.tick += 1;
        let hlc = Hlc::next(Hlc(self.clock.hlc), now_ms);
        self.clock.hlc = hlc.0;
        (Version::new(self.replica, self.clock.tick), hlc)
    }

    /// Moves the hybrid clock past a timestamp seen from a peer.
    pub fn observe(&mut self, seen: Hlc) {
        self.clock.hlc = self.clock.hlc.max(seen.0);
    }

    /// Writes an item's metadata, moving its index entry from `old`'s version. The
    /// item's data (for the built-in store) stays as it is unless `put_data` or
    /// `remove_data` says otherwise in the same commit.
    pub fn put_item(&mut self, id: &ItemId, meta: &ItemMeta, old: Option<&ItemMeta>) {
        if let Some(old) = old {
            if old.version != meta.version {
                self.batch.remove(&index_key(old.version)[..]);
            }
        }
        self.batch
            .insert(&index_key(meta.version)[..], id.as_bytes());
        self.pending_item(id).meta = MetaWrite::Put(*meta);
    }

    /// Removes every trace of an item: metadata, data, index entry, saved conflict.
    pub fn forget_item(&mut self, id: &ItemId, old: &ItemMeta) {
        self.batch.remove(&index_key(old.version)[..]);
        self.batch.remove(prefixed(PREFIX_CONFLICT, id.as_bytes()));
        self.pending_item(id).meta = MetaWrite::Forget;
    }

    /// Sets the data the built-in store keeps in the item record.
    pub fn put_data(&mut self, id: &ItemId, data: &[u8]) {
        self.pending_item(id).data = DataWrite::Put(data.to_vec());
    }

    /// Drops the data the built-in store keeps in the item record.
    pub fn remove_data(&mut self, id: &ItemId) {
        self.pending_item(id).data = DataWrite::Remove;
    }

    fn pending_item(&mut self, id: &ItemId) -> &mut PendingItem {
        self.items.entry(id.clone()).or_default()
    }

    pub fn save_conflict(&mut self, conflict: &SavedConflict) {
        self.batch.insert(
            prefixed(PREFIX_CONFLICT, conflict.remote.item.as_bytes()),
            conflict.encode(),
        );
    }

    pub fn remove_conflict(&mut self, id: &ItemId) {
        self.batch.remove(prefixed(PREFIX_CONFLICT, id.as_bytes()));
    }

    /// Replaces the knowledge (own entries are dropped on write, see the invariants).
    pub fn set_knowledge(&mut self, knowledge: Knowledge) {
        self.knowledge = Some(knowledge);
    }

    pub fn set_forgotten(&mut self, forgotten: Knowledge) {
        self.forgotten = Some(forgotten);
    }

    pub fn set_last_sync_tick(&mut self, tick: u64) {
        self.clock.last_sync_tick = tick;
    }

    /// Moves this replica to its next session epoch and returns it.
    pub fn bump_epoch(&mut self) -> u64 {
        self.clock.epoch += 1;
        self.clock.epoch
    }

    /// Marks `what` (for example a row of an external store) as written by this commit
    /// but not yet applied to the external store. The marker commits atomically with the
    /// metadata, so after a crash the store's owner finds it and replays the write.
    pub fn mark_pending(&mut self, what: &[u8]) {
        self.batch.insert(prefixed(PREFIX_PENDING, what), &[][..]);
    }

    /// Keeps an opaque record for the store's owner (a datasource's change-detection
    /// anchor, say) that must move atomically with the versions it accounts for.
    pub fn set_owner_record(&mut self, name: &[u8], value: &[u8]) {
        self.batch.insert(prefixed(PREFIX_OWNER, name), value);
    }

    /// Removes a pending-apply marker once the external write is done.
    pub fn clear_pending(&mut self, what: &[u8]) {
        self.batch.remove(prefixed(PREFIX_PENDING, what));
    }

    /// Records the highest session epoch seen from `peer`.
    pub fn set_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) {
        self.batch.insert(
            prefixed(PREFIX_PEER, peer.as_bytes()),
            encode(KIND_PEER, &PeerRecord { epoch }),
        );
    }

    /// The tick this commit will leave the replica at.
    pub fn tick(&self) -> u64 {
        self.clock.tick
    }

    /// Continues the replica under `id` from this commit on: versions taken after this
    /// call carry the new id, and the replica record changes with the commit. The
    /// caller must also set the knowledge (it decides what is known of the old id).
    pub fn rekey(&mut self, id: ReplicaId) {
        self.replica = id;
        self.new_id = Some(id);
    }
}

/// The records every replica has, read when a store opens or reloads.
struct FixedRecords {
    id: ReplicaId,
    clock: ClockRecord,
    knowledge: Knowledge,
    forgotten: Knowledge,
}

fn read_fixed_records(backend: &dyn Backend) -> Result<FixedRecords, MetadataError> {
    let path = PathBuf::from(backend.location());
    let get = |key: &[u8]| -> Result<Option<Bytes>, MetadataError> {
        backend.get(key).map_err(|source| MetadataError::Storage {
            path: path.clone(),
            source,
        })
    };
    let damaged = |key: &str, reason: String| MetadataError::Damaged {
        path: path.clone(),
        key: key.to_string(),
        reason,
    };
    let Some(replica) = get(KEY_REPLICA)? else {
        return Err(MetadataError::NotAReplica { path });
    };
    let replica: ReplicaRecord =
        decode(KIND_REPLICA, &replica).map_err(|r| damaged("replica", r))?;
    if replica.store_format != STORE_FORMAT {
        return Err(MetadataError::FormatVersion {
            path,
            found: replica.store_format,
            expected: STORE_FORMAT,
        });
    }
    let clock: ClockRecord = decode(
        KIND_CLOCK,
        &get(KEY_CLOCK)?.ok_or_else(|| damaged("clock", "missing".into()))?,
    )
    .map_err(|r| damaged("clock", r))?;
    let stored_knowledge = decode_knowledge_record(
        &get(KEY_KNOWLEDGE)?.ok_or_else(|| damaged("knowledge", "missing".into()))?,
    )
    .map_err(|r| damaged("knowledge", r))?;
    let forgotten = decode_knowledge_record(
        &get(KEY_FORGOTTEN)?.ok_or_else(|| damaged("forgotten knowledge", "missing".into()))?,
    )
    .map_err(|r| damaged("forgotten knowledge", r))?;
    debug_assert!(stored_knowledge.is_well_formed() && forgotten.is_well_formed());
    Ok(FixedRecords {
        id: ReplicaId::from_bytes(replica.id),
        clock,
        knowledge: stored_knowledge,
        forgotten,
    })
}

/// Every entry under a one-byte key prefix.
fn scan_prefix(backend: &dyn Backend, prefix: u8) -> super::backend::Scan<'_> {
    backend.range(Bound::Included(&[prefix]), Bound::Excluded(&[prefix + 1]))
}

fn open_sled(path: &Path) -> Result<sled::Db, MetadataError> {
    sled_folder::open(path).map_err(|e| match e {
        OpenError::InUse => MetadataError::InUse {
            path: path.to_path_buf(),
        },
        OpenError::Damaged(reason) => MetadataError::Damaged {
            path: path.to_path_buf(),
            key: "sled log".into(),
            reason,
        },
        OpenError::Other(source) => MetadataError::Storage {
            path: path.to_path_buf(),
            source: Box::new(source),
        },
    })
}

fn describe_key(key: &[u8]) -> String {
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match key.first() {
        Some(&PREFIX_ITEM) => format!("item {:?}", show(&key[1..])),
        Some(&PREFIX_INDEX) => "change index entry".into(),
        Some(&PREFIX_CONFLICT) => format!("saved conflict of {:?}", show(&key[1..])),
        Some(&PREFIX_PEER) => "peer epoch record".into(),
        Some(&PREFIX_PENDING) => "pending-apply marker".into(),
        Some(&PREFIX_OWNER) => "owner record".into(),
        _ => format!("{key:?}"),
    }
}

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use super::backend::{Backend, BackendError, Bytes, Lookup, SledBackend, WriteBatch};
use super::pages::{
    encode_index_page, encode_item_page, find_item, index_entries, item_entries, split_points,
    INDEX_BUCKET,
};
use super::records::{
    decode, decode_knowledge_record, encode, encode_knowledge_record, ClockRecord, PeerRecord,
    ReplicaRecord, KIND_CLOCK, KIND_PEER, KIND_PENDING_SET, KIND_REPLICA,
};
use super::sled_folder::{self, OpenError};
use super::{ItemMeta, MetadataError, SavedConflict};
use crate::model::{Hlc, ItemId, Knowledge, ReplicaId, Version};
use std::ops::Bound;
use std::sync::Mutex;

/// The store layout version written in the replica record. Bump it when a key layout or
/// a record changes meaning; `open` refuses any other value.
pub const STORE_FORMAT: u32 = 2;

// One-byte key prefixes. Fixed records sit below the per-item families.
const KEY_REPLICA: &[u8] = &[0x01];
const KEY_CLOCK: &[u8] = &[0x02];
const KEY_KNOWLEDGE: &[u8] = &[0x03];
const KEY_FORGOTTEN: &[u8] = &[0x04];
/// Loose item records and index entries: one record each, as store format 1 had them.
const PREFIX_ITEM: u8 = 0x10;
const PREFIX_INDEX: u8 = 0x11;
/// Item pages and index pages (see `metadata::pages`).
const PREFIX_PAGE: u8 = 0x20;
const PREFIX_INDEX_PAGE: u8 = 0x21;
const PREFIX_CONFLICT: u8 = 0x13;
const PREFIX_PEER: u8 = 0x14;
const PREFIX_PENDING: u8 = 0x15;
const PREFIX_OWNER: u8 = 0x16;
/// Pending-apply sets: `17 ‖ sequence (u64 BE)`, each the list of what one commit marked
/// pending. A single `15 ‖ what` marker per row cost one record per row to write and
/// another to remove; a set costs one per commit. `15` markers left by earlier builds
/// are still read and cleared.
const PREFIX_PENDING_SET: u8 = 0x17;

fn prefixed(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.push(prefix);
    key.extend_from_slice(id);
    key
}

/// The key of the index page that holds `(replica, tick)`.
fn index_page_key(replica: &[u8; 16], tick: u64) -> [u8; 25] {
    index_key(PREFIX_INDEX_PAGE, replica, tick / INDEX_BUCKET)
}

/// The key of the loose index entry of `(replica, tick)`.
fn loose_index_key(replica: &[u8; 16], tick: u64) -> [u8; 25] {
    index_key(PREFIX_INDEX, replica, tick)
}

fn index_key(prefix: u8, replica: &[u8; 16], n: u64) -> [u8; 25] {
    let mut key = [0u8; 25];
    key[0] = prefix;
    key[1..17].copy_from_slice(replica);
    key[17..].copy_from_slice(&n.to_be_bytes());
    key
}

/// The least byte string above every string that starts with `prefix` (`None`: there
/// is none, the prefix being all `FF`s).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The loose record keys `[from, to)` of the ids between two item page keys (`None`:
/// to the end of the ids).
fn loose_keys_between(page: &[u8], upper: Option<&[u8]>) -> (Vec<u8>, Vec<u8>) {
    let to = upper.map_or_else(|| vec![PREFIX_ITEM + 1], |u| prefixed(PREFIX_ITEM, &u[1..]));
    (prefixed(PREFIX_ITEM, &page[1..]), to)
}

/// A commit writes a page (folding in the loose records of its range) when it changes
/// at least this many of the page's items or index entries; fewer go as loose records.
/// Rewriting a 64-entry page for one item would cost more than the loose record, and
/// fills sled's log with garbage; above a few items a page is the cheaper write.
const DEFAULT_FOLD: usize = 8;

/// The first key of the item page family: the first page's key, and the floor of
/// every page lookup.
const FIRST_PAGE: &[u8] = &[PREFIX_PAGE];
const PAGES_END: &[u8] = &[PREFIX_PAGE + 1];

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
    /// See [`DEFAULT_FOLD`]; tests lower it to reach every layout.
    fold: usize,
    /// Records near the last lookups, for the next ones (emptied by every commit).
    nearby: Mutex<Nearby>,
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
        let fixed = match read_fixed_records(&*backend) {
            Err(MetadataError::FormatVersion { found: 1, .. }) => {
                upgrade_from_format_1(&*backend)?;
                read_fixed_records(&*backend)?
            }
            other => other?,
        };
        Ok(Self {
            path: PathBuf::from(backend.location()),
            backend,
            id: fixed.id,
            clock: fixed.clock,
            stored_knowledge: fixed.knowledge,
            forgotten: fixed.forgotten,
            poisoned: false,
            fold: DEFAULT_FOLD,
            nearby: Mutex::new(Nearby::Empty),
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
        self.forget_nearby();
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

    /// Sets how many changes to one page make a commit rewrite the page instead of
    /// writing loose records (at least 1). For the tests, which reach every mix of
    /// loose and paged records with it; the layout never changes what is stored.
    #[doc(hidden)]
    pub fn set_fold_threshold(&mut self, changes: usize) {
        self.fold = changes.max(1);
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

    /// The page that holds `id`'s record if it is stored: the page with the greatest
    /// key at or below the id's (see `metadata::pages`).
    fn page_of(&self, id: &[u8]) -> Result<Option<(Bytes, Bytes)>, MetadataError> {
        self.check()?;
        self.backend
            .last_at_or_before(FIRST_PAGE, &prefixed(PREFIX_PAGE, id))
            .map_err(|e| self.storage(e))
    }

    fn damaged_item(&self, id: &[u8], page: &[u8], reason: String) -> MetadataError {
        MetadataError::Damaged {
            path: self.path.clone(),
            key: format!(
                "item {:?} (in the item page from {:?})",
                String::from_utf8_lossy(id),
                String::from_utf8_lossy(page.get(1..).unwrap_or_default())
            ),
            reason,
        }
    }

    /// Reads `id`'s record out of its page and hands it to `read`.
    fn with_item_record<T>(
        &self,
        id: &ItemId,
        read: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, MetadataError> {
        self.check()?;
        let key = prefixed(PREFIX_PAGE, id.as_bytes());
        let mut nearby = self.nearby.lock().unwrap_or_else(|p| p.into_inner());
        if let Nearby::Filled(records) = &*nearby {
            if records.holds(&key) {
                return records.read(self, id.as_bytes(), read);
            }
        }
        // A loose record is the item's record, whatever its page holds.
        let loose = prefixed(PREFIX_ITEM, id.as_bytes());
        let found = self
            .backend
            .get_or_last_at_or_before(&loose, FIRST_PAGE, &key)
            .map_err(|e| self.storage(e))?;
        let (page, bytes) = match found {
            Lookup::Exact(bytes) => {
                return read(&bytes).map(Some).map_err(|r| self.damaged(&loose, r))
            }
            Lookup::Before(page, bytes) => (page, bytes),
            Lookup::Nothing => {
                // No page at or below: two such lookups in a row (a sorted batch of new
                // ids, an empty store) read the loose records up to the next page once.
                *nearby = match &*nearby {
                    Nearby::Seen(last) if last.is_empty() => {
                        Nearby::Filled(self.read_nearby(key, None)?)
                    }
                    _ => Nearby::Seen(Vec::new()),
                };
                return Ok(None);
            }
        };
        let damaged = |r| self.damaged_item(id.as_bytes(), &page, r);
        let found = match find_item(&bytes, id.as_bytes()).map_err(damaged)? {
            None => None,
            Some(record) => Some(read(record).map_err(damaged)?),
        };
        // Two lookups in a row in one page: the ids are probably a sorted batch's, so
        // the records after this one are read once, for the lookups that follow.
        *nearby = match &*nearby {
            Nearby::Seen(last) if **last == *page => {
                Nearby::Filled(self.read_nearby(key, Some((page, bytes)))?)
            }
            _ => Nearby::Seen(page.to_vec()),
        };
        Ok(found)
    }

    /// The records from `key` (an item key in page space) on, in the page that holds
    /// it (`None`: no page does): its entries, with the loose records of its range laid
    /// over them, up to the next page or [`NEARBY_LOOSE`] loose records, whichever
    /// comes first.
    fn read_nearby(
        &self,
        key: Vec<u8>,
        page: Option<(Bytes, Bytes)>,
    ) -> Result<NearbyRecords, MetadataError> {
        let storage = |e| self.storage(e);
        let has_page = page.is_some();
        // Without a page, none lies at or below `key`: the next one is above it.
        let (page_key, page) =
            page.unwrap_or_else(|| (Bytes::from(&key[..]), Bytes::from(&[][..])));
        let upper = self
            .backend
            .first_key_after(&page_key, PAGES_END)
            .map_err(storage)?;
        let base = page.as_ptr() as usize;
        let entries = if has_page {
            item_entries(&page)
                .map_err(|r| self.damaged(&page_key, r))?
                .into_iter()
                .map(|(id, record)| {
                    let (at, rec) = (id.as_ptr() as usize - base, record.as_ptr() as usize - base);
                    (at..at + id.len(), rec..rec + record.len())
                })
                .collect()
        } else {
            Vec::new()
        };
        let (from, to) = loose_keys_between(&key, upper.as_deref());
        let mut loose = Vec::new();
        let mut end = upper.map(|k| k.to_vec());
        for entry in self
            .backend
            .range(Bound::Included(&from), Bound::Excluded(&to))
        {
            let (loose_key, record) = entry.map_err(storage)?;
            if loose.len() == NEARBY_LOOSE {
                end = Some(prefixed(PREFIX_PAGE, &loose_key[1..]));
                break;
            }
            loose.push((loose_key[1..].to_vec(), record));
        }
        Ok(NearbyRecords {
            start: key,
            end,
            page_key: page_key.to_vec(),
            page,
            entries,
            loose,
        })
    }

    fn forget_nearby(&self) {
        *self.nearby.lock().unwrap_or_else(|p| p.into_inner()) = Nearby::Empty;
    }

    pub fn item(&self, id: &ItemId) -> Result<Option<ItemMeta>, MetadataError> {
        self.with_item_record(id, ItemMeta::decode)
    }

    /// An item's metadata and the data its record carries (built-in store), in one read.
    pub fn item_record(&self, id: &ItemId) -> Result<Option<ItemRecord>, MetadataError> {
        self.with_item_record(id, |record| {
            ItemMeta::decode_with_data(record).map(|(meta, data)| (meta, data.map(<[u8]>::to_vec)))
        })
    }

    /// The records of the items whose ids start with `first`'s, `first` included, in id
    /// order: a table row's units. Answered from what lookups read ahead when that
    /// covers them all, as it does within a sorted batch; else by a scan.
    pub fn records_with_prefix(
        &self,
        first: &ItemId,
    ) -> Result<Vec<(ItemId, ItemRecord)>, MetadataError> {
        let prefix = first.as_bytes();
        let head = self.item_record(first)?;
        let end = prefix_end(prefix);
        {
            let nearby = self.nearby.lock().unwrap_or_else(|p| p.into_inner());
            if let Nearby::Filled(records) = &*nearby {
                let lo = prefixed(PREFIX_PAGE, prefix);
                let hi = end.as_ref().map(|e| prefixed(PREFIX_PAGE, e));
                let covered = records.holds(&lo)
                    && match (&hi, &records.end) {
                        (_, None) => true,
                        (Some(hi), Some(until)) => hi <= until,
                        (None, Some(_)) => false,
                    };
                if covered {
                    return records.records_between(self, prefix, end.as_deref());
                }
            }
        }
        // Outside what was read ahead: the first record as looked up, the rest by a scan.
        let mut out: Vec<(ItemId, ItemRecord)> =
            head.map(|r| (first.clone(), r)).into_iter().collect();
        for entry in self.items_from(prefix) {
            let (id, _) = entry?;
            if !id.as_bytes().starts_with(prefix) {
                break;
            }
            if id == *first {
                continue;
            }
            if let Some(record) = self.item_record(&id)? {
                out.push((id, record));
            }
        }
        Ok(out)
    }

    /// The data of an item of the built-in store (the tail of its item record).
    pub fn data(&self, id: &ItemId) -> Result<Option<Vec<u8>>, MetadataError> {
        self.with_item_record(id, |record| {
            ItemMeta::decode_with_data(record).map(|(_, data)| data.map(<[u8]>::to_vec))
        })
        .map(Option::flatten)
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
        let loose = self
            .backend
            .range(Bound::Included(&from), Bound::Excluded(&[PREFIX_ITEM + 1]))
            .map(move |entry| {
                let (key, value) = entry.map_err(|e| self.storage(e))?;
                let id = ItemId::new(&key[1..]).map_err(|e| self.damaged(&key, e.to_string()))?;
                let meta = ItemMeta::decode(&value).map_err(|r| self.damaged(&key, r))?;
                Ok((id, meta))
            });
        merge_by_id(loose.peekable(), self.paged_items_from(start).peekable())
    }

    /// The items that pages hold, in id order, from `start` on (loose records that
    /// shadow some of them are not consulted).
    fn paged_items_from(
        &self,
        start: &[u8],
    ) -> impl Iterator<Item = Result<(ItemId, ItemMeta), MetadataError>> + '_ {
        let start = start.to_vec();
        // The scan begins at the page that holds `start`, which may begin below it.
        let (first, failed) = match self.page_of(&start) {
            Ok(found) => (
                found.map_or_else(|| FIRST_PAGE.to_vec(), |(k, _)| k.to_vec()),
                None,
            ),
            Err(e) => (FIRST_PAGE.to_vec(), Some(e)),
        };
        let pages = failed.is_none().then(|| {
            self.backend
                .range(Bound::Included(&first), Bound::Excluded(PAGES_END))
        });
        failed.into_iter().map(Err).chain(
            pages
                .into_iter()
                .flatten()
                .flat_map(move |entry| self.page_items(entry, &start)),
        )
    }

    /// The items of one page from a scan, those below `start` left out.
    fn page_items(
        &self,
        entry: Result<(Bytes, Bytes), BackendError>,
        start: &[u8],
    ) -> Vec<Result<(ItemId, ItemMeta), MetadataError>> {
        let (page, bytes) = match entry {
            Ok(entry) => entry,
            Err(e) => return vec![Err(self.storage(e))],
        };
        let entries = match item_entries(&bytes) {
            Ok(entries) => entries,
            Err(r) => return vec![Err(self.damaged(&page, r))],
        };
        entries
            .into_iter()
            .filter(|(id, _)| *id >= start)
            .map(|(id, record)| {
                let damaged = |r| self.damaged_item(id, &page, r);
                let item = ItemId::new(id).map_err(|e| damaged(e.to_string()))?;
                Ok((item, ItemMeta::decode(record).map_err(damaged)?))
            })
            .collect()
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
            for (tick, id) in self.index_from(replica, from)? {
                if !known.contains(&id, Version::new(replica, tick)) {
                    out.push(id);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The index entries `(tick, id)` of `replica` from tick `from` on, in tick order.
    fn index_from(
        &self,
        replica: ReplicaId,
        from: u64,
    ) -> Result<Vec<(u64, ItemId)>, MetadataError> {
        // An entry is either loose or in its bucket's page, never both.
        let mut found: Vec<(u64, ItemId)> = Vec::new();
        let replica = replica.as_bytes();
        let (start, end) = (
            loose_index_key(replica, from),
            loose_index_key(replica, u64::MAX),
        );
        for entry in self
            .backend
            .range(Bound::Included(&start), Bound::Included(&end))
        {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            let tick = self.loose_index_tick(&key)?;
            found.push((
                tick,
                ItemId::new(&value).map_err(|e| self.damaged(&key, e.to_string()))?,
            ));
        }
        let (start, end) = (
            index_page_key(replica, from),
            index_page_key(replica, u64::MAX),
        );
        for entry in self
            .backend
            .range(Bound::Included(&start), Bound::Included(&end))
        {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            for (tick, id) in index_entries(&value).map_err(|r| self.damaged(&key, r))? {
                if tick >= from {
                    let id = ItemId::new(id).map_err(|e| self.damaged(&key, e.to_string()))?;
                    found.push((tick, id));
                }
            }
        }
        found.sort_unstable_by_key(|(tick, _)| *tick);
        Ok(found)
    }

    /// The tick of a loose index entry's key (`11 ‖ replica ‖ tick`).
    fn loose_index_tick(&self, key: &[u8]) -> Result<u64, MetadataError> {
        key.get(17..25)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| self.damaged(key, "an index key of 25 bytes".into()))
    }

    /// The pending-apply markers: writes to an external store that a commit promised and
    /// that may not have reached the store yet (see `Commit::mark_pending`).
    /// In byte order, each once.
    pub fn pending(&self) -> Result<Vec<Vec<u8>>, MetadataError> {
        self.check()?;
        let mut out = BTreeSet::new();
        for entry in scan_prefix(&*self.backend, PREFIX_PENDING) {
            let (key, _) = entry.map_err(|e| self.storage(e))?;
            out.insert(key[1..].to_vec());
        }
        for entry in scan_prefix(&*self.backend, PREFIX_PENDING_SET) {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            let set: Vec<Vec<u8>> =
                decode(KIND_PENDING_SET, &value).map_err(|r| self.damaged(&key, r))?;
            out.extend(set);
        }
        Ok(out.into_iter().collect())
    }

    /// Writes the commit's pending-apply marks and clears: every stored marker and set
    /// entry in `cleared` goes (a set left empty is removed), then `marked` becomes a
    /// new set after the last one.
    fn write_pending(
        &self,
        batch: &mut WriteBatch,
        marked: Vec<Vec<u8>>,
        cleared: Vec<Vec<u8>>,
    ) -> Result<(), MetadataError> {
        let storage = |e| self.storage(e);
        if !cleared.is_empty() {
            let cleared: HashSet<&[u8]> = cleared.iter().map(Vec::as_slice).collect();
            for entry in scan_prefix(&*self.backend, PREFIX_PENDING) {
                let (key, _) = entry.map_err(storage)?;
                if cleared.contains(&key[1..]) {
                    batch.remove(&key);
                }
            }
            for entry in scan_prefix(&*self.backend, PREFIX_PENDING_SET) {
                let (key, value) = entry.map_err(storage)?;
                let set: Vec<Vec<u8>> =
                    decode(KIND_PENDING_SET, &value).map_err(|r| self.damaged(&key, r))?;
                let left: Vec<&Vec<u8>> = set
                    .iter()
                    .filter(|w| !cleared.contains(w.as_slice()))
                    .collect();
                if left.is_empty() {
                    batch.remove(&key);
                } else if left.len() < set.len() {
                    batch.insert(&key, encode(KIND_PENDING_SET, &left));
                }
            }
        }
        if !marked.is_empty() {
            let last = self
                .backend
                .last_at_or_before(&[PREFIX_PENDING_SET], &[PREFIX_PENDING_SET, 0xFF])
                .map_err(storage)?;
            let next = match last {
                None => 0,
                Some((key, _)) => key
                    .get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .and_then(|n| n.checked_add(1))
                    .ok_or_else(|| self.damaged(&key, "a pending set key of 9 bytes".into()))?,
            };
            let mut key = vec![PREFIX_PENDING_SET];
            key.extend_from_slice(&next.to_be_bytes());
            batch.insert(key, encode(KIND_PENDING_SET, &marked));
        }
        Ok(())
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
        Ok(self
            .index_from(replica, after.saturating_add(1))?
            .into_iter()
            .map(|(_, id)| id)
            .collect())
    }

    /// Counts items, tombstones, conflicts and bytes with one pass over the store.
    pub fn summary(&self) -> Result<StoreSummary, MetadataError> {
        self.check()?;
        let mut s = StoreSummary::default();
        // Counts follow what the store holds (a loose record shadows its page's entry);
        // bytes follow what is written, stale entries included.
        for entry in self.items_from(b"") {
            let (_, meta) = entry?;
            if meta.deleted {
                s.tombstones += 1;
            } else {
                s.live_items += 1;
            }
        }
        let data_len = |record: &[u8]| {
            ItemMeta::decode_with_data(record).map(|(_, data)| data.map_or(0, <[u8]>::len) as u64)
        };
        for entry in self.backend.range(Bound::Unbounded, Bound::Unbounded) {
            let (key, value) = entry.map_err(|e| self.storage(e))?;
            let bytes = (key.len() + value.len()) as u64;
            match key.first() {
                Some(&PREFIX_ITEM) => {
                    let data = data_len(&value).map_err(|r| self.damaged(&key, r))?;
                    s.metadata_bytes += bytes - data;
                    s.data_bytes += data;
                }
                Some(&PREFIX_PAGE) => {
                    let mut data = 0;
                    for (id, record) in item_entries(&value).map_err(|r| self.damaged(&key, r))? {
                        data += data_len(record).map_err(|r| self.damaged_item(id, &key, r))?;
                    }
                    s.metadata_bytes += bytes - data;
                    s.data_bytes += data;
                }
                Some(&PREFIX_INDEX | &PREFIX_INDEX_PAGE) => s.metadata_bytes += bytes,
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
            index: BTreeMap::new(),
            clock: self.clock,
            knowledge: None,
            forgotten: None,
            new_id: None,
            marked: Vec::new(),
            cleared: Vec::new(),
        }
    }

    /// Writes a commit as one atomic batch. On failure the handle is poisoned.
    pub fn commit(&mut self, commit: Commit) -> Result<(), MetadataError> {
        self.check()?;
        let Commit {
            replica,
            mut batch,
            items,
            index,
            clock,
            knowledge,
            forgotten,
            new_id,
            marked,
            cleared,
        } = commit;
        self.write_item_pages(&mut batch, items)?;
        self.write_pending(&mut batch, marked, cleared)?;
        self.write_index_pages(&mut batch, index)?;
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
        // What lookups read ahead is stale once the batch is in (or half-tried); reads
        // made while the commit was built above may have filled it.
        let applied = self.backend.apply(batch);
        self.forget_nearby();
        if let Err(e) = applied {
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

    /// Turns the commit's item writes into loose records or page writes. Items come in
    /// id order, so the items of one page arrive together. A page that gets at least
    /// `fold` of them, or a forget (which must not leave an entry behind to show
    /// through), is rewritten with the loose records of its range folded in; the items
    /// of the other pages are written as loose records, which shadow their page entries.
    fn write_item_pages(
        &self,
        batch: &mut WriteBatch,
        items: BTreeMap<ItemId, PendingItem>,
    ) -> Result<(), MetadataError> {
        let forgets = items.values().any(|p| matches!(p.meta, MetaWrite::Forget));
        if !forgets && items.len() < self.fold {
            // No page can get `fold` of these: all of them go loose, no page is opened.
            for (id, pending) in items {
                self.write_loose(batch, &id, pending)?;
            }
            return Ok(());
        }
        let mut groups: Vec<(OpenPage, Vec<(ItemId, PendingItem)>)> = Vec::new();
        for (id, pending) in items {
            let key = prefixed(PREFIX_PAGE, id.as_bytes());
            if !groups.last().is_some_and(|(page, _)| page.holds(&key)) {
                groups.push((self.open_page(&key)?, Vec::new()));
            }
            if let Some((_, group)) = groups.last_mut() {
                group.push((id, pending));
            }
        }
        for (page, group) in groups {
            let forgets = group
                .iter()
                .any(|(_, p)| matches!(p.meta, MetaWrite::Forget));
            if forgets || group.len() >= self.fold {
                self.fold_page(batch, page, group)?;
                continue;
            }
            for (id, pending) in group {
                self.write_loose(batch, &id, pending)?;
            }
        }
        Ok(())
    }

    /// Writes one item's new record as a loose record (which shadows its page entry).
    fn write_loose(
        &self,
        batch: &mut WriteBatch,
        id: &ItemId,
        pending: PendingItem,
    ) -> Result<(), MetadataError> {
        let stored = if pending.replaces_record() {
            None
        } else {
            self.item_record(id)?
        };
        let stored = stored.as_ref().map(|(meta, data)| (*meta, data.as_deref()));
        if let Some(record) = pending.record(stored) {
            batch.insert(prefixed(PREFIX_ITEM, id.as_bytes()), record);
        }
        Ok(())
    }

    /// Rewrites one page: its entries, the loose records of its range (which are the
    /// items' records where both exist), and the commit's writes; splits it when it
    /// outgrows the page bounds and removes it when it is left empty.
    fn fold_page(
        &self,
        batch: &mut WriteBatch,
        page: OpenPage,
        group: Vec<(ItemId, PendingItem)>,
    ) -> Result<(), MetadataError> {
        // Page entries, loose records of the page's range over them, then the commit's
        // items over both: three runs sorted by id, merged (the items of a big initial
        // commit land in one page, so this is their whole cost).
        let stored: Vec<(&[u8], &[u8])> = match &page.bytes {
            Some(bytes) => item_entries(bytes).map_err(|r| self.damaged(&page.key, r))?,
            None => Vec::new(),
        };
        let (from, to) = loose_keys_between(&page.key, page.upper.as_deref());
        let mut loose: Vec<(Bytes, Bytes)> = Vec::new();
        for entry in self
            .backend
            .range(Bound::Included(&from), Bound::Excluded(&to))
        {
            let (key, record) = entry.map_err(|e| self.storage(e))?;
            batch.remove(&key);
            loose.push((key, record));
        }
        let mut base: Vec<(&[u8], &[u8])> = Vec::with_capacity(stored.len() + loose.len());
        let mut loose_records = loose.iter().map(|(k, r)| (&k[1..], &r[..])).peekable();
        for entry in stored {
            while let Some(l) = loose_records.next_if(|(id, _)| *id < entry.0) {
                base.push(l);
            }
            match loose_records.next_if(|(id, _)| *id == entry.0) {
                // The loose record is the item's record.
                Some(l) => base.push(l),
                None => base.push(entry),
            }
        }
        base.extend(loose_records);
        let mut entries: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(base.len() + group.len());
        let mut base = base.into_iter().peekable();
        for (id, pending) in group {
            let id = id.as_bytes();
            while let Some((i, r)) = base.next_if(|(i, _)| *i < id) {
                entries.push((i.to_vec(), r.to_vec()));
            }
            let existing = base.next_if(|(i, _)| *i == id);
            if matches!(pending.meta, MetaWrite::Forget) {
                continue;
            }
            let stored = match existing {
                Some((_, bytes)) if !pending.replaces_record() => Some(
                    ItemMeta::decode_with_data(bytes)
                        .map_err(|r| self.damaged_item(id, &page.key, r))?,
                ),
                _ => None,
            };
            match (pending.record(stored), existing) {
                (Some(record), _) => entries.push((id.to_vec(), record)),
                (None, Some((i, r))) => entries.push((i.to_vec(), r.to_vec())),
                (None, None) => {}
            }
        }
        entries.extend(base.map(|(i, r)| (i.to_vec(), r.to_vec())));
        if entries.is_empty() {
            // An emptied page's range falls back to the page before it.
            batch.remove(&page.key);
            return Ok(());
        }
        let sizes: Vec<usize> = entries.iter().map(|(i, r)| i.len() + r.len() + 4).collect();
        let starts = split_points(&sizes);
        for (n, &from) in starts.iter().enumerate() {
            let to = starts.get(n + 1).copied().unwrap_or(entries.len());
            let part = &entries[from..to];
            // The first part keeps the page's key; the others start at their first id.
            let part_key = if n == 0 {
                page.key.clone()
            } else {
                prefixed(PREFIX_PAGE, &part[0].0)
            };
            batch.insert(
                part_key,
                encode_item_page(part.iter().map(|(i, r)| (i.as_slice(), r.as_slice()))),
            );
        }
        Ok(())
    }

    /// The page whose range holds `key` (an item page key): the page with the greatest
    /// key at or below it, or the first page, which may not be stored yet.
    fn open_page(&self, key: &[u8]) -> Result<OpenPage, MetadataError> {
        let storage = |e| self.storage(e);
        let (page_key, bytes) = match self
            .backend
            .last_at_or_before(FIRST_PAGE, key)
            .map_err(storage)?
        {
            Some((k, v)) => (k.to_vec(), Some(v)),
            None => (FIRST_PAGE.to_vec(), None),
        };
        let upper = self
            .backend
            .first_key_after(&page_key, PAGES_END)
            .map_err(storage)?
            .map(|k| k.to_vec());
        Ok(OpenPage {
            key: page_key,
            bytes,
            upper,
        })
    }

    /// Applies the commit's index moves. A bucket with at least `fold` moves, or a
    /// removal of an entry that is not loose, rewrites the bucket's page with the loose
    /// entries of its range folded in; the other moves write or remove loose entries.
    fn write_index_pages(
        &self,
        batch: &mut WriteBatch,
        index: BTreeMap<([u8; 16], u64), Option<ItemId>>,
    ) -> Result<(), MetadataError> {
        let storage = |e| self.storage(e);
        let mut by_page: BTreeMap<[u8; 25], Vec<(u64, Option<ItemId>)>> = BTreeMap::new();
        for ((replica, tick), id) in index {
            by_page
                .entry(index_page_key(&replica, tick))
                .or_default()
                .push((tick, id));
        }
        for (key, moves) in by_page {
            let mut replica = [0u8; 16];
            replica.copy_from_slice(&key[1..17]);
            let mut fold = moves.len() >= self.fold;
            let mut loose = Vec::new();
            for (tick, id) in &moves {
                if fold {
                    break;
                }
                let entry = loose_index_key(&replica, *tick);
                match id {
                    Some(id) => loose.push((entry, Some(id))),
                    None if self.backend.get(&entry).map_err(storage)?.is_some() => {
                        loose.push((entry, None))
                    }
                    // The entry is in the page (or nowhere): only a rewrite removes it.
                    None => fold = true,
                }
            }
            if !fold {
                for (entry, id) in loose {
                    match id {
                        Some(id) => batch.insert(entry, id.as_bytes()),
                        None => batch.remove(entry),
                    }
                }
                continue;
            }
            let mut entries: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            if let Some(bytes) = self.backend.get(&key).map_err(storage)? {
                for (tick, id) in index_entries(&bytes).map_err(|r| self.damaged(&key, r))? {
                    entries.insert(tick, id.to_vec());
                }
            }
            let first_tick = moves[0].0 / INDEX_BUCKET * INDEX_BUCKET;
            let from = loose_index_key(&replica, first_tick);
            let to = loose_index_key(&replica, first_tick + (INDEX_BUCKET - 1));
            for entry in self
                .backend
                .range(Bound::Included(&from), Bound::Included(&to))
            {
                let (entry_key, id) = entry.map_err(storage)?;
                let tick = self.loose_index_tick(&entry_key)?;
                entries.insert(tick, id.to_vec());
                batch.remove(&entry_key);
            }
            for (tick, id) in moves {
                match id {
                    Some(id) => entries.insert(tick, id.as_bytes().to_vec()),
                    None => entries.remove(&tick),
                };
            }
            if entries.is_empty() {
                batch.remove(key);
            } else {
                batch.insert(
                    key,
                    encode_index_page(entries.iter().map(|(t, id)| (*t, id.as_slice()))),
                );
            }
        }
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

/// Loose records read ahead by one lookup, at most.
const NEARBY_LOOSE: usize = 64;

/// What the store keeps in memory of its last item lookups.
enum Nearby {
    Empty,
    /// The last lookup read this page.
    Seen(Vec<u8>),
    Filled(NearbyRecords),
}

/// The item records of the ids in `[start, end)` (keys in page space) as of the last
/// commit: one page's entries, by byte range in the page, and the loose records of the
/// range, which are the items' records where both exist.
struct NearbyRecords {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    page_key: Vec<u8>,
    page: Bytes,
    entries: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    loose: Vec<(Vec<u8>, Bytes)>,
}

impl NearbyRecords {
    fn holds(&self, key: &[u8]) -> bool {
        *self.start <= *key && self.end.as_deref().is_none_or(|end| key < end)
    }

    /// The records of ids in `[from, to)` (`to` = `None`: no bound), loose records
    /// over page entries, in id order. The range must lie within what this holds.
    fn records_between(
        &self,
        store: &MetadataStore,
        from: &[u8],
        to: Option<&[u8]>,
    ) -> Result<Vec<(ItemId, ItemRecord)>, MetadataError> {
        let below_to = |id: &[u8]| to.is_none_or(|to| id < to);
        let page = &self.page[..];
        let first_entry = self
            .entries
            .partition_point(|(at, _)| &page[at.clone()] < from);
        let first_loose = self.loose.partition_point(|(id, _)| id.as_slice() < from);
        let mut entries = self.entries[first_entry..]
            .iter()
            .map(|(at, rec)| (&page[at.clone()], &page[rec.clone()]))
            .take_while(|(id, _)| below_to(id))
            .peekable();
        let mut loose = self.loose[first_loose..]
            .iter()
            .map(|(id, rec)| (id.as_slice(), &rec[..]))
            .take_while(|(id, _)| below_to(id))
            .peekable();
        let mut out = Vec::new();
        loop {
            let (id, record, from_page) = match (entries.peek(), loose.peek()) {
                (None, None) => break,
                (Some((e, _)), Some((l, _))) if e < l => {
                    let (id, rec) = entries.next().expect("peeked");
                    (id, rec, true)
                }
                (Some((e, _)), Some((l, _))) if e == l => {
                    // The loose record is the item's record.
                    entries.next();
                    let (id, rec) = loose.next().expect("peeked");
                    (id, rec, false)
                }
                (Some(_), None) => {
                    let (id, rec) = entries.next().expect("peeked");
                    (id, rec, true)
                }
                _ => {
                    let (id, rec) = loose.next().expect("peeked");
                    (id, rec, false)
                }
            };
            let damaged = |r: String| {
                if from_page {
                    store.damaged_item(id, &self.page_key, r)
                } else {
                    store.damaged(&prefixed(PREFIX_ITEM, id), r)
                }
            };
            let item = ItemId::new(id).map_err(|e| damaged(e.to_string()))?;
            let (meta, data) = ItemMeta::decode_with_data(record).map_err(damaged)?;
            out.push((item, (meta, data.map(<[u8]>::to_vec))));
        }
        Ok(out)
    }

    fn read<T>(
        &self,
        store: &MetadataStore,
        id: &[u8],
        read: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, MetadataError> {
        if let Ok(i) = self.loose.binary_search_by(|(l, _)| l.as_slice().cmp(id)) {
            let key = prefixed(PREFIX_ITEM, id);
            return read(&self.loose[i].1)
                .map(Some)
                .map_err(|r| store.damaged(&key, r));
        }
        let page = &self.page[..];
        match self
            .entries
            .binary_search_by(|(at, _)| page[at.clone()].cmp(id))
        {
            Ok(i) => read(&page[self.entries[i].1.clone()])
                .map(Some)
                .map_err(|r| store.damaged_item(id, &self.page_key, r)),
            Err(_) => Ok(None),
        }
    }
}

/// An item page a commit writes into: its key, its bytes (`None`: the first page, not
/// stored yet), and the key of the page after it, where its range ends.
struct OpenPage {
    key: Vec<u8>,
    bytes: Option<Bytes>,
    upper: Option<Vec<u8>>,
}

impl OpenPage {
    fn holds(&self, key: &[u8]) -> bool {
        *self.key <= *key && self.upper.as_deref().is_none_or(|upper| key < upper)
    }
}

/// The writes a commit makes to one item record, merged into one sled write.
#[derive(Default)]
struct PendingItem {
    meta: MetaWrite,
    data: DataWrite,
}

impl PendingItem {
    /// True when the new record does not depend on the stored one.
    fn replaces_record(&self) -> bool {
        matches!(
            (&self.meta, &self.data),
            (MetaWrite::Put(_), DataWrite::Put(_) | DataWrite::Remove)
        )
    }

    /// The item's new record given its stored one (`None`: leave it alone, which is
    /// the case for data written to an item without metadata). Not for forgets.
    fn record(self, stored: Option<(ItemMeta, Option<&[u8]>)>) -> Option<Vec<u8>> {
        let meta = match (self.meta, &stored) {
            (MetaWrite::Put(meta), _) => meta,
            (_, Some((meta, _))) => *meta,
            (_, None) => return None,
        };
        Some(match &self.data {
            DataWrite::Put(data) => meta.encode_with_data(Some(data)),
            DataWrite::Remove => meta.encode_with_data(None),
            DataWrite::Keep => meta.encode_with_data(stored.and_then(|(_, data)| data)),
        })
    }
}

/// The writes of one atomic commit.
pub struct Commit {
    replica: ReplicaId,
    batch: WriteBatch,
    /// Item records are written at commit time: metadata and data of one item are
    /// one key, and either part may be set by a different call.
    items: BTreeMap<ItemId, PendingItem>,
    /// Index moves by `(replica, tick)`: `Some(id)` adds an entry, `None` removes one.
    index: BTreeMap<([u8; 16], u64), Option<ItemId>>,
    clock: ClockRecord,
    knowledge: Option<Knowledge>,
    forgotten: Option<Knowledge>,
    /// Set by [`Commit::rekey`]: the replica continues under this id.
    new_id: Option<ReplicaId>,
    /// Pending-apply marks set and cleared by this commit (see `Commit::mark_pending`).
    marked: Vec<Vec<u8>>,
    cleared: Vec<Vec<u8>>,
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
                self.index.insert(index_slot(old.version), None);
            }
        }
        self.index
            .insert(index_slot(meta.version), Some(id.clone()));
        self.pending_item(id).meta = MetaWrite::Put(*meta);
    }

    /// Removes every trace of an item: metadata, data, index entry, saved conflict.
    pub fn forget_item(&mut self, id: &ItemId, old: &ItemMeta) {
        self.index.insert(index_slot(old.version), None);
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
    /// A commit's marks are stored as one record, so marking costs no record per row.
    pub fn mark_pending(&mut self, what: &[u8]) {
        if self.marked.last().is_none_or(|last| last != what) {
            self.marked.push(what.to_vec());
        }
    }

    /// Keeps an opaque record for the store's owner (a datasource's change-detection
    /// anchor, say) that must move atomically with the versions it accounts for.
    pub fn set_owner_record(&mut self, name: &[u8], value: &[u8]) {
        self.batch.insert(prefixed(PREFIX_OWNER, name), value);
    }

    /// Removes a pending-apply marker once the external write is done.
    pub fn clear_pending(&mut self, what: &[u8]) {
        self.cleared.push(what.to_vec());
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

fn index_slot(v: Version) -> ([u8; 16], u64) {
    (*v.replica.as_bytes(), v.tick)
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

/// Merges the loose records and the paged ones in id order; where both hold an id, the
/// loose record is the item's and the page's entry is stale.
fn merge_by_id<'a>(
    mut loose: std::iter::Peekable<impl Iterator<Item = ItemEntry> + 'a>,
    mut paged: std::iter::Peekable<impl Iterator<Item = ItemEntry> + 'a>,
) -> impl Iterator<Item = ItemEntry> + 'a {
    use std::cmp::Ordering;
    std::iter::from_fn(move || {
        let order = match (loose.peek(), paged.peek()) {
            (None, None) => return None,
            (Some(Err(_)), _) | (Some(Ok(_)), None) => Ordering::Less,
            (_, Some(Err(_))) | (None, Some(Ok(_))) => Ordering::Greater,
            (Some(Ok((a, _))), Some(Ok((b, _)))) => a.cmp(b),
        };
        match order {
            Ordering::Less => loose.next(),
            Ordering::Greater => paged.next(),
            Ordering::Equal => {
                paged.next();
                loose.next()
            }
        }
    })
}

type ItemEntry = Result<(ItemId, ItemMeta), MetadataError>;

/// Moves a store of format 1 to this format. Format 1 kept every item record and index
/// entry as this format's loose records, under the same keys, and had no pages: such a
/// store is a valid one of this format once its replica record says so. Flushed, so
/// the store is not upgraded twice.
fn upgrade_from_format_1(backend: &dyn Backend) -> Result<(), MetadataError> {
    let path = PathBuf::from(backend.location());
    let storage = |source| MetadataError::Storage {
        path: path.clone(),
        source,
    };
    let damaged = |reason: String| MetadataError::Damaged {
        path: path.clone(),
        key: "replica".into(),
        reason,
    };
    let bytes = backend
        .get(KEY_REPLICA)
        .map_err(storage)?
        .ok_or_else(|| damaged("missing".into()))?;
    let replica: ReplicaRecord = decode(KIND_REPLICA, &bytes).map_err(damaged)?;
    let mut batch = WriteBatch::default();
    batch.insert(
        KEY_REPLICA,
        encode(
            KIND_REPLICA,
            &ReplicaRecord {
                store_format: STORE_FORMAT,
                id: replica.id,
            },
        ),
    );
    backend.apply(batch).map_err(storage)?;
    backend.flush().map_err(storage)
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
        Some(&PREFIX_PAGE) => format!("item page from {:?}", show(&key[1..])),
        Some(&PREFIX_INDEX_PAGE) => "change index page".into(),
        Some(&PREFIX_CONFLICT) => format!("saved conflict of {:?}", show(&key[1..])),
        Some(&PREFIX_PEER) => "peer epoch record".into(),
        Some(&PREFIX_PENDING) => "pending-apply marker".into(),
        Some(&PREFIX_PENDING_SET) => "pending-apply set".into(),
        Some(&PREFIX_OWNER) => "owner record".into(),
        _ => format!("{key:?}"),
    }
}

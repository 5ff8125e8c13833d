use std::path::Path;
use std::sync::Arc;

use super::{SledItems, StoreError};
use crate::metadata::{ItemMeta, MetadataStore, SavedConflict, StoreSummary};
use crate::model::{
    ClockVector, IdRange, ItemId, Knowledge, ReplicaId, Version, MAX_ITEM_DATA_LEN,
};
use crate::sync::{
    self, BatchOutcome, BatchRequest, ChangeDestination, ChangeSource, Clock, ConflictPolicy,
    Enumeration, ItemStore, PeerInfo, SessionOptions, SyncError, SyncObserver, SyncProvider,
    SyncReport, SystemClock,
};

/// Which side a saved conflict is settled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    Local,
    Remote,
}

/// What tombstone cleanup removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub tombstones_removed: u64,
}

/// What `knit status` shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub id: ReplicaId,
    pub tick: u64,
    pub summary: StoreSummary,
    pub knowledge: Knowledge,
    pub forgotten: Knowledge,
}

/// A replica: metadata store + item store + the clock that stamps its changes.
pub struct Replica {
    metadata: MetadataStore,
    items: Box<dyn ItemStore>,
    clock: Arc<dyn Clock>,
    /// The source-side enumeration of the current session.
    enumeration: Option<Enumeration>,
    /// The peer of the session this replica is in, if any.
    session_peer: Option<ReplicaId>,
}

impl Replica {
    /// Creates a replica with the built-in store in `path`.
    pub fn create(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::with_parts(
            MetadataStore::create(path)?,
            Box::new(SledItems),
            Arc::new(SystemClock),
        ))
    }

    /// Opens the replica in `path` with the built-in store.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::with_parts(
            MetadataStore::open(path)?,
            Box::new(SledItems),
            Arc::new(SystemClock),
        ))
    }

    /// Opens the replica `name` of a shared PostgreSQL metadata table (built-in item
    /// store), creating it if it is not there. `location` names it in messages.
    pub fn open_or_create_postgres(
        conninfo: &str,
        name: &str,
        location: String,
    ) -> Result<Self, StoreError> {
        Ok(Self::with_parts(
            MetadataStore::open_or_create_postgres(conninfo, name, location)?,
            Box::new(SledItems),
            Arc::new(SystemClock),
        ))
    }

    /// Reads the replica's clock and knowledge again from its store: another process
    /// sharing the store may have committed since (see `MetadataStore::reload`).
    pub fn reload(&mut self) -> Result<(), StoreError> {
        self.enumeration = None;
        Ok(self.metadata.reload()?)
    }

    /// Assembles a replica from its parts (another item store, a test clock).
    pub fn with_parts(
        metadata: MetadataStore,
        items: Box<dyn ItemStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            metadata,
            items,
            clock,
            enumeration: None,
            session_peer: None,
        }
    }

    pub fn id(&self) -> ReplicaId {
        self.metadata.id()
    }

    pub fn tick(&self) -> u64 {
        self.metadata.tick()
    }

    pub fn knowledge(&self) -> Knowledge {
        self.metadata.knowledge()
    }

    pub fn forgotten(&self) -> &Knowledge {
        self.metadata.forgotten()
    }

    pub fn metadata(&self) -> &MetadataStore {
        &self.metadata
    }

    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// See [`MetadataStore::set_fold_threshold`] (for the tests).
    #[doc(hidden)]
    pub fn set_fold_threshold(&mut self, changes: usize) {
        self.metadata.set_fold_threshold(changes);
    }

    fn store_error(&self, item: &ItemId, reason: String) -> StoreError {
        StoreError::ItemStore {
            replica: self.id(),
            item: item.clone(),
            reason,
        }
    }

    /// Sets `item` to `value` as a new local version.
    pub fn put(&mut self, item: &ItemId, value: &[u8]) -> Result<Version, StoreError> {
        if value.len() > MAX_ITEM_DATA_LEN {
            return Err(StoreError::ValueTooLarge {
                item: item.clone(),
                len: value.len(),
                max: MAX_ITEM_DATA_LEN,
            });
        }
        let old = self.metadata.item(item)?;
        let mut commit = self.metadata.begin();
        let (version, timestamp) = commit.next_version(self.clock.now_ms());
        let meta = ItemMeta {
            // A put after a delete starts a new life of the item.
            creation: old.filter(|m| !m.deleted).map_or(version, |m| m.creation),
            version,
            timestamp,
            deleted: false,
        };
        self.items
            .stage(&mut commit, item, Some(value))
            .map_err(|r| self.store_error(item, r))?;
        commit.put_item(item, &meta, old.as_ref());
        self.metadata.commit(commit)?;
        Ok(version)
    }

    /// Deletes `item`, leaving a tombstone. Returns `None` if it was not live.
    pub fn delete(&mut self, item: &ItemId) -> Result<Option<Version>, StoreError> {
        let Some(old) = self.metadata.item(item)?.filter(|m| !m.deleted) else {
            return Ok(None);
        };
        let mut commit = self.metadata.begin();
        let (version, timestamp) = commit.next_version(self.clock.now_ms());
        let meta = ItemMeta {
            creation: old.creation,
            version,
            timestamp,
            deleted: true,
        };
        self.items
            .stage(&mut commit, item, None)
            .map_err(|r| self.store_error(item, r))?;
        commit.put_item(item, &meta, Some(&old));
        self.metadata.commit(commit)?;
        Ok(Some(version))
    }

    /// Applies many local changes in one commit (`None` deletes the item; deleting an
    /// item that is not live is nothing). Each change takes its own tick. Used by change
    /// detection, which finds a store's changes by the thousand.
    pub fn apply_local(
        &mut self,
        changes: &[(ItemId, Option<Vec<u8>>)],
    ) -> Result<Vec<Version>, StoreError> {
        self.apply_local_with_records(changes, &[])
    }

    /// `apply_local`, also setting owner records (`Commit::set_owner_record`) in the
    /// same commit: a change detection's anchor moves exactly when its changes land.
    pub fn apply_local_with_records(
        &mut self,
        changes: &[(ItemId, Option<Vec<u8>>)],
        records: &[(&[u8], &[u8])],
    ) -> Result<Vec<Version>, StoreError> {
        let now = self.clock.now_ms();
        let mut commit = self.metadata.begin();
        for (name, value) in records {
            commit.set_owner_record(name, value);
        }
        let mut versions = Vec::with_capacity(changes.len());
        // The same item twice in one call: the later change wins, on top of the earlier.
        let mut written: std::collections::HashMap<&ItemId, ItemMeta> = Default::default();
        for (item, value) in changes {
            if value.as_ref().is_some_and(|v| v.len() > MAX_ITEM_DATA_LEN) {
                return Err(StoreError::ValueTooLarge {
                    item: item.clone(),
                    len: value.as_ref().map_or(0, Vec::len),
                    max: MAX_ITEM_DATA_LEN,
                });
            }
            let old = match written.get(item) {
                Some(meta) => Some(*meta),
                None => self.metadata.item(item)?,
            };
            if value.is_none() && old.is_none_or(|m| m.deleted) {
                continue;
            }
            let (version, timestamp) = commit.next_version(now);
            let meta = ItemMeta {
                creation: match (value, old) {
                    (Some(_), Some(m)) if !m.deleted => m.creation,
                    (None, Some(m)) => m.creation,
                    _ => version,
                },
                version,
                timestamp,
                deleted: value.is_none(),
            };
            self.items
                .stage(&mut commit, item, value.as_deref())
                .map_err(|r| self.store_error(item, r))?;
            commit.put_item(item, &meta, old.as_ref());
            written.insert(item, meta);
            versions.push(version);
        }
        if !versions.is_empty() || !records.is_empty() {
            self.metadata.commit(commit)?;
        }
        Ok(versions)
    }

    /// Moves this replica's hybrid clock past `seen`, durably: its next versions are
    /// later than `seen` for last-writer-wins.
    pub fn observe_clock(&mut self, seen: crate::model::Hlc) -> Result<(), StoreError> {
        if self.metadata.last_hlc() >= seen {
            return Ok(());
        }
        let mut commit = self.metadata.begin();
        commit.observe(seen);
        Ok(self.metadata.commit(commit)?)
    }

    /// Removes pending-apply markers (see `Commit::mark_pending`) in one commit.
    pub fn clear_pending(&mut self, markers: &[Vec<u8>]) -> Result<(), StoreError> {
        if markers.is_empty() {
            return Ok(());
        }
        let mut commit = self.metadata.begin();
        for marker in markers {
            commit.clear_pending(marker);
        }
        Ok(self.metadata.commit(commit)?)
    }

    /// The value of a live item.
    pub fn get(&self, item: &ItemId) -> Result<Option<Vec<u8>>, StoreError> {
        match self.metadata.item(item)? {
            Some(meta) if !meta.deleted => self
                .items
                .read(&self.metadata, item)
                .map_err(|r| self.store_error(item, r)),
            _ => Ok(None),
        }
    }

    pub fn item_meta(&self, item: &ItemId) -> Result<Option<ItemMeta>, StoreError> {
        Ok(self.metadata.item(item)?)
    }

    /// Every live item with its value, in id order.
    pub fn items(&self) -> Result<Vec<(ItemId, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.metadata.items_from(b"") {
            let (id, meta) = entry?;
            if meta.deleted {
                continue;
            }
            let value = self
                .items
                .read(&self.metadata, &id)
                .map_err(|r| self.store_error(&id, r))?
                .unwrap_or_default();
            out.push((id, value));
        }
        Ok(out)
    }

    /// Every item's metadata (live and tombstones), in id order.
    pub fn item_metas(&self) -> Result<Vec<(ItemId, ItemMeta)>, StoreError> {
        Ok(self.metadata.items_from(b"").collect::<Result<_, _>>()?)
    }

    pub fn saved_conflicts(&self) -> Result<Vec<SavedConflict>, StoreError> {
        Ok(self.metadata.saved_conflicts()?)
    }

    /// Settles the saved conflict of `item`.
    pub fn resolve_conflict(&mut self, item: &ItemId, take: Take) -> Result<Version, StoreError> {
        let now = self.clock.now_ms();
        sync::resolve_saved_conflict(
            &mut self.metadata,
            &mut *self.items,
            item,
            take == Take::Remote,
            now,
        )?
        .ok_or_else(|| StoreError::NoSuchConflict {
            replica: self.metadata.id(),
            item: item.clone(),
        })
    }

    pub fn status(&self) -> Result<ReplicaStatus, StoreError> {
        Ok(ReplicaStatus {
            id: self.id(),
            tick: self.tick(),
            summary: self.metadata.summary()?,
            knowledge: self.knowledge(),
            forgotten: self.forgotten().clone(),
        })
    }

    /// Removes tombstones older than `older_than_ms` and records each one's delete
    /// version, item by item, in forgotten knowledge. A peer that has not seen those
    /// deletes needs a full enumeration (or refuses, by policy) at its next sync from
    /// this replica.
    ///
    /// Forgotten knowledge is kept per item rather than as one coarse vector: a create
    /// that arrives later for a cleaned-up item must be told apart from a create of an
    /// unrelated item, and only an edit concurrent with the forgotten delete of *that*
    /// item may be revived as a fresh version (see `Classification::Revive`).
    pub fn collect_garbage(&mut self, older_than_ms: u64) -> Result<GcReport, StoreError> {
        let cutoff = self.clock.now_ms().saturating_sub(older_than_ms);
        let mut commit = self.metadata.begin();
        let mut forgotten_items = Vec::new();
        for entry in self.metadata.items_from(b"") {
            let (id, meta) = entry?;
            if meta.deleted && meta.timestamp.physical_ms() <= cutoff {
                commit.forget_item(&id, &meta);
                forgotten_items.push((
                    IdRange::single(&id),
                    ClockVector::from_pairs([(meta.version.replica, meta.version.tick)]),
                ));
            }
        }
        let report = GcReport {
            tombstones_removed: forgotten_items.len() as u64,
        };
        if forgotten_items.is_empty() {
            return Ok(report);
        }
        // Items come in id order, so the single-item ranges are sorted and disjoint.
        let newly = Knowledge::from_parts(ClockVector::new(), forgotten_items)?;
        commit.set_forgotten(self.metadata.forgotten().combine(&newly));
        self.metadata.commit(commit)?;
        self.metadata.flush()?;
        Ok(report)
    }

    /// Continues this replica under a new id, after it was restored from an old copy
    /// of its folder. Local changes made since the last completed sync are re-stamped
    /// under the new id (they may reuse ticks the lost original already gave out), and
    /// knowledge of the old id is cut back to that sync, so the original's later
    /// changes, which peers hold, come back at the next sync.
    pub fn rekey(&mut self) -> Result<ReplicaId, StoreError> {
        let old = self.metadata.id();
        let cut = self.metadata.last_sync_tick();
        let new = ReplicaId::new_random();
        let now = self.clock.now_ms();
        let knowledge = self.metadata.knowledge().cut_replica(old, cut);
        let forgotten = self.metadata.forgotten().cut_replica(old, cut);
        let mut commit = self.metadata.begin();
        commit.rekey(new);
        for id in self.metadata.items_changed_by(old, cut)? {
            let Some(meta) = self.metadata.item(&id)? else {
                continue;
            };
            let (version, timestamp) = commit.next_version(now);
            let creation = if meta.creation.replica == old && meta.creation.tick > cut {
                version
            } else {
                meta.creation
            };
            let restamped = ItemMeta {
                creation,
                version,
                timestamp,
                deleted: meta.deleted,
            };
            commit.put_item(&id, &restamped, Some(&meta));
        }
        commit.set_knowledge(knowledge);
        commit.set_forgotten(forgotten);
        commit.set_last_sync_tick(0);
        self.metadata.commit(commit)?;
        self.metadata.flush()?;
        Ok(new)
    }

    /// Syncs this replica (local) with `remote`.
    pub fn sync_with(
        &mut self,
        remote: &mut dyn sync::Peer,
        options: &SessionOptions,
        observer: &mut dyn SyncObserver,
    ) -> Result<SyncReport, SyncError> {
        let clock = Arc::clone(&self.clock);
        sync::synchronize(self, remote, options, observer, &*clock)
    }

    pub fn flush(&mut self) -> Result<(), StoreError> {
        Ok(self.metadata.flush()?)
    }
}

impl SyncProvider for Replica {
    fn replica_id(&self) -> ReplicaId {
        self.metadata.id()
    }

    fn fetch_info(&mut self) -> Result<PeerInfo, SyncError> {
        Ok(PeerInfo {
            replica: self.metadata.id(),
            knowledge: self.metadata.knowledge(),
            epoch: self.metadata.epoch(),
        })
    }

    fn begin_session(&mut self, peer: &PeerInfo) -> Result<(), SyncError> {
        let replica = self.metadata.id();
        if self.session_peer.is_some() {
            return Err(SyncError::ReplicaBusy { replica });
        }
        if peer.replica == replica {
            return Err(SyncError::SameReplica { replica });
        }
        // Am I restored? The peer holds ticks of mine I have not issued yet.
        let known_tick = peer.knowledge.max_tick(replica);
        if known_tick > self.metadata.tick() {
            return Err(SyncError::ReplicaRestored {
                replica,
                peer: peer.replica,
                evidence: format!(
                    "{} knows its tick {known_tick} but the replica is at tick {}",
                    peer.replica,
                    self.metadata.tick()
                ),
            });
        }
        // Is the peer restored? It presents a session epoch below one it showed before.
        let seen = self.metadata.peer_epoch(peer.replica)?;
        if peer.epoch < seen {
            return Err(SyncError::ReplicaRestored {
                replica: peer.replica,
                peer: replica,
                evidence: format!(
                    "{replica} has seen its session epoch {seen} but it presents epoch {}",
                    peer.epoch
                ),
            });
        }
        if peer.epoch > seen {
            self.note_peer_epoch(peer.replica, peer.epoch)?;
        }
        // Local changes may be about to be sent: make them durable first, so a crash
        // can never roll back a tick a peer already holds.
        self.metadata.flush()?;
        self.session_peer = Some(peer.replica);
        self.enumeration = None;
        Ok(())
    }

    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError> {
        if epoch > self.metadata.peer_epoch(peer)? {
            let mut commit = self.metadata.begin();
            commit.set_peer_epoch(peer, epoch);
            self.metadata.commit(commit)?;
        }
        Ok(())
    }

    fn end_session(&mut self, completed: bool) -> Result<(), SyncError> {
        self.session_peer = None;
        self.enumeration = None;
        // A no-op session between converged replicas writes nothing.
        if completed && self.metadata.last_sync_tick() != self.metadata.tick() {
            let mut commit = self.metadata.begin();
            commit.set_last_sync_tick(self.metadata.tick());
            self.metadata.commit(commit)?;
        }
        self.metadata.flush()?;
        Ok(())
    }
}

impl ChangeSource for Replica {
    fn begin_sending(&mut self) -> Result<u64, SyncError> {
        let mut commit = self.metadata.begin();
        let epoch = commit.bump_epoch();
        self.metadata.commit(commit)?;
        // Durable before any change leaves: a crash must not hand out this epoch twice.
        self.metadata.flush()?;
        Ok(epoch)
    }

    fn forgotten_knowledge(&mut self) -> Result<Knowledge, SyncError> {
        Ok(self.metadata.forgotten().clone())
    }

    fn estimate_changes(&mut self, request: &BatchRequest<'_>) -> Result<Option<u64>, SyncError> {
        if request.full_enumeration {
            return Ok(None);
        }
        let e = sync::Enumeration::of(
            &self.metadata,
            &mut self.enumeration,
            request.destination_knowledge,
        )?;
        Ok(Some(e.len() as u64))
    }

    fn change_batch(
        &mut self,
        request: &BatchRequest<'_>,
    ) -> Result<crate::model::ChangeBatch, SyncError> {
        sync::change_batch(&self.metadata, &*self.items, &mut self.enumeration, request)
    }
}

impl ChangeDestination for Replica {
    fn process_batch(
        &mut self,
        batch: crate::model::ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError> {
        let now = self.clock.now_ms();
        sync::apply_batch(
            &mut self.metadata,
            &mut *self.items,
            batch,
            policy,
            observer,
            now,
        )
    }
}

//! The notifying change applier: classifies each incoming change against the
//! destination's metadata, settles conflicts by policy, stages the writes through the
//! item store, and commits data, metadata and learned knowledge together.

use crate::metadata::{Commit, ItemMeta, MetadataStore, SavedConflict};
use crate::model::{
    BatchMode, ChangeBatch, IdRange, ItemChange, ItemId, Knowledge, ReplicaId, Version,
};

use super::policy::last_writer_wins;
use super::{
    BatchOutcome, Conflict, ConflictKind, ConflictOutcome, ConflictPolicy, ItemStore, Resolution,
    SyncError, SyncObserver,
};

/// Where an incoming change stands against the destination (design.md's decision table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classification {
    /// The destination already knows this version: skip it.
    Obsolete,
    /// The destination holds nothing for the item and has forgotten no delete of it
    /// that the source did not know.
    Create,
    /// The destination holds nothing for the item because it cleaned up a delete of it
    /// that this update's source did not know: an edit concurrent with a forgotten
    /// delete. The edit wins ("edit beats forgotten delete") and is stored as a fresh
    /// destination version made with knowledge of both, so that replicas which hold
    /// the tombstone, or an older version it superseded, take it as a plain update
    /// instead of settling the conflict their own way.
    Revive,
    /// The source saw the destination's version: a plain update (or delete).
    Update,
    /// Neither saw the other's version.
    Conflict(ConflictKind),
}

/// Classifies `change` (made with `made_with`) against the destination's `local`
/// metadata, knowledge and forgotten knowledge (which names, item by item, the deletes
/// whose tombstones were cleaned up).
pub fn classify(
    change: &ItemChange,
    local: Option<&ItemMeta>,
    destination_knowledge: &Knowledge,
    destination_forgotten: &Knowledge,
    made_with: &Knowledge,
) -> Classification {
    let item = change.item.as_bytes();
    if destination_knowledge.contains(&change.item, change.version) {
        return Classification::Obsolete;
    }
    let Some(local) = local else {
        let forgotten = destination_forgotten.vector_for(item);
        if !change.is_delete() && !made_with.vector_for(item).dominates(forgotten) {
            return Classification::Revive;
        }
        return Classification::Create;
    };
    if made_with.contains(&change.item, local.version) {
        return Classification::Update;
    }
    Classification::Conflict(match (local.deleted, change.is_delete()) {
        (false, false) => ConflictKind::UpdateUpdate,
        (false, true) => ConflictKind::LocalUpdateRemoteDelete,
        (true, false) => ConflictKind::LocalDeleteRemoteUpdate,
        (true, true) => ConflictKind::DeleteDelete,
    })
}

/// How a change ends up at the destination.
enum Action {
    /// Store the remote version as it is.
    Verbatim,
    /// Store this state (`None`: deleted) under a fresh version of the destination, made
    /// with knowledge of both sides (design.md, "Divergence after resolution").
    Fresh(Option<Vec<u8>>),
    /// Keep the local state under a fresh destination version.
    Restamp,
    /// Keep the local state and version (the last-writer rule chose it).
    Keep,
    /// Log the conflict; do not learn the remote version.
    Save,
    /// Do nothing; do not learn the remote version.
    Skip,
}

fn decide(
    kind: ConflictKind,
    policy: &ConflictPolicy,
    conflict: impl FnOnce() -> Result<Resolution, SyncError>,
    local: &ItemMeta,
    remote: &ItemChange,
) -> Result<(Action, ConflictOutcome), SyncError> {
    // The last-writer rule may keep a live winner as it is: every replica picks the
    // same one. A winning tombstone is re-stamped instead: a replica that has cleaned up
    // that tombstone "knows" it without holding it, and may have taken the losing edit
    // as a create ("edit beats forgotten delete"); only a version it does not know yet
    // can bring it the decision.
    let lww = || {
        let source_won = last_writer_wins(
            (local.timestamp, local.version),
            (remote.timestamp, remote.version),
        );
        match (source_won, remote.is_delete(), local.deleted) {
            (true, true, _) => (Action::Fresh(None), ConflictOutcome::SourceWon),
            (true, false, _) => (Action::Verbatim, ConflictOutcome::SourceWon),
            (false, _, true) => (Action::Restamp, ConflictOutcome::DestinationWon),
            (false, _, false) => (Action::Keep, ConflictOutcome::DestinationWon),
        }
    };
    if kind == ConflictKind::DeleteDelete {
        return Ok(lww());
    }
    Ok(match policy {
        ConflictPolicy::SourceWins => (
            Action::Fresh(remote.data.clone()),
            ConflictOutcome::SourceWon,
        ),
        ConflictPolicy::DestinationWins => (Action::Restamp, ConflictOutcome::DestinationWon),
        ConflictPolicy::LastWriterWins => lww(),
        ConflictPolicy::ApplicationDefined(_) => match conflict()? {
            Resolution::SourceWins => (
                Action::Fresh(remote.data.clone()),
                ConflictOutcome::SourceWon,
            ),
            Resolution::DestinationWins => (Action::Restamp, ConflictOutcome::DestinationWon),
            Resolution::Merge(data) => (Action::Fresh(Some(data)), ConflictOutcome::Merged),
            Resolution::SaveConflict => (Action::Save, ConflictOutcome::Saved),
            Resolution::Skip => (Action::Skip, ConflictOutcome::Skipped),
        },
    })
}

/// Applies one batch to a destination and commits it atomically.
pub fn apply_batch(
    metadata: &mut MetadataStore,
    items: &mut dyn ItemStore,
    batch: ChangeBatch,
    policy: &ConflictPolicy,
    observer: &mut dyn SyncObserver,
    now_ms: u64,
) -> Result<BatchOutcome, SyncError> {
    let destination = metadata.id();
    let source = batch.source();
    let known = metadata.knowledge();
    let mut learned = batch.learned_knowledge();
    let mut commit = metadata.begin();
    let mut outcome = BatchOutcome::default();
    let mut failed: Vec<ItemId> = Vec::new();
    for change in batch.changes() {
        commit.observe(change.timestamp);
    }

    for change in batch.changes() {
        let item = &change.item;
        let local = metadata.item(item)?;
        let classification = classify(
            change,
            local.as_ref(),
            &known,
            metadata.forgotten(),
            batch.made_with(),
        );
        let (action, local) = match (classification, local) {
            (Classification::Obsolete, _) => {
                outcome.skipped += 1;
                continue;
            }
            (Classification::Create, local) | (Classification::Update, local) => {
                (Action::Verbatim, local)
            }
            (Classification::Revive, local) => (Action::Fresh(change.data.clone()), local),
            (Classification::Conflict(kind), Some(local)) => {
                let ask = || {
                    let local_data = if local.deleted {
                        None
                    } else {
                        items
                            .read(metadata, item)
                            .map_err(|reason| SyncError::ItemStore {
                                replica: destination,
                                item: item.clone(),
                                reason,
                            })?
                    };
                    let ConflictPolicy::ApplicationDefined(handler) = policy else {
                        unreachable!("asked only for application-defined policies")
                    };
                    Ok(handler(&Conflict {
                        item,
                        kind,
                        source,
                        destination,
                        local: &local,
                        local_data: local_data.as_deref(),
                        remote: change,
                    }))
                };
                let (action, resolved) = decide(kind, policy, ask, &local, change)?;
                outcome.conflicts.record(resolved);
                observer.conflict(item, kind, resolved);
                (action, Some(local))
            }
            (Classification::Conflict(_), None) => unreachable!("a conflict needs local metadata"),
        };

        // The item's new metadata, and its new data (`Some(None)`: deleted; `None`:
        // unchanged, only the version moves), or the reason the change fails.
        let (meta, data): (ItemMeta, Option<Option<&[u8]>>) = match &action {
            Action::Verbatim => (
                ItemMeta {
                    creation: change.creation,
                    version: change.version,
                    timestamp: change.timestamp,
                    deleted: change.is_delete(),
                },
                Some(change.data.as_deref()),
            ),
            Action::Fresh(data) => {
                let (version, timestamp) = commit.next_version(now_ms);
                let meta = ItemMeta {
                    creation: local.map_or(change.creation, |l| l.creation),
                    version,
                    timestamp,
                    deleted: data.is_none(),
                };
                (meta, Some(data.as_deref()))
            }
            Action::Restamp => {
                let local = local.expect("restamp follows a conflict, which has local metadata");
                let (version, timestamp) = commit.next_version(now_ms);
                let meta = ItemMeta {
                    version,
                    timestamp,
                    ..local
                };
                (meta, None)
            }
            Action::Keep => {
                outcome.applied += 1;
                continue;
            }
            Action::Save | Action::Skip => {
                let reason = if matches!(action, Action::Save) {
                    commit.save_conflict(&SavedConflict {
                        source,
                        remote: change.clone(),
                        made_with: batch.made_with().project(&IdRange::single(item)),
                    });
                    "conflict saved for later resolution"
                } else {
                    "conflict skipped by the application"
                };
                observer.item_failed(item, reason);
                outcome.failed += 1;
                failed.push(item.clone());
                continue;
            }
        };
        let written = stage(&mut commit, items, item, &meta, local.as_ref(), data);
        match written {
            Ok(()) => outcome.applied += 1,
            Err(reason) => {
                observer.item_failed(item, &reason);
                outcome.failed += 1;
                failed.push(item.clone());
            }
        }
    }

    if let BatchMode::FullEnumeration { forgotten } = batch.mode() {
        Recovery {
            commit: &mut commit,
            known: &known,
            forgotten,
            now_ms,
            failed: &mut failed,
            outcome: &mut outcome,
        }
        .settle_unnamed_items(metadata, items, &batch)?;
        let mut newly_forgotten = Knowledge::new();
        for group in batch.groups() {
            newly_forgotten = newly_forgotten.combine(&forgotten.project(group.range()));
        }
        commit.set_forgotten(metadata.forgotten().combine(&newly_forgotten));
    }

    for item in &failed {
        learned = learned.exclude(item);
    }
    let knowledge = known.combine(&learned);
    drop_superseded_conflicts(metadata, &mut commit, &knowledge)?;
    commit.set_knowledge(knowledge);
    metadata.commit(commit)?;
    items.committed(metadata);
    Ok(outcome)
}

/// Stages an item's new metadata and (when `data` is `Some`) its new data. `data` is
/// `Some(None)` for a delete and `None` when only the version changes.
fn stage(
    commit: &mut Commit,
    items: &mut dyn ItemStore,
    item: &ItemId,
    meta: &ItemMeta,
    old: Option<&ItemMeta>,
    data: Option<Option<&[u8]>>,
) -> Result<(), String> {
    if let Some(data) = data {
        items.stage(commit, item, data)?;
    }
    commit.put_item(item, meta, old);
    Ok(())
}

/// The destination side of a full enumeration.
struct Recovery<'a> {
    commit: &'a mut Commit,
    /// The destination's knowledge before the batch.
    known: &'a Knowledge,
    /// The source's forgotten knowledge: item by item, the deletes it cleaned up.
    forgotten: &'a Knowledge,
    now_ms: u64,
    failed: &'a mut Vec<ItemId>,
    outcome: &'a mut BatchOutcome,
}

impl Recovery<'_> {
    /// Settles every item the destination holds in a group's range that the source did
    /// not name:
    /// - Its version is in the source's knowledge: it was deleted at the source and the
    ///   tombstone cleaned up (by the soundness invariant, a replica that knows a
    ///   version and holds nothing of the item has forgotten it). Remove it entirely.
    ///   Forgotten knowledge alone cannot decide this: it records the cleaned-up
    ///   deletes, not the earlier versions of the item they superseded.
    /// - Otherwise it is an edit the source never saw, and it stays ("edit beats
    ///   forgotten delete"). If the source forgot a delete of this very item that the
    ///   destination did not know, the destination is about to learn the versions that
    ///   delete superseded, which are concurrent with its own: it re-stamps the item as
    ///   a fresh version made with knowledge of both, so that replicas holding those
    ///   versions or the tombstone take the edit as a plain update.
    fn settle_unnamed_items(
        &mut self,
        metadata: &MetadataStore,
        items: &mut dyn ItemStore,
        batch: &ChangeBatch,
    ) -> Result<(), SyncError> {
        for group in batch.groups() {
            let range = group.range();
            for entry in metadata.items_from(range.start()) {
                let (id, meta) = entry?;
                if !range.contains(id.as_bytes()) {
                    break;
                }
                // An item the source could not read this time (excluded) is still held there.
                if group.names(&id) || batch.excluded().contains(&id) {
                    continue;
                }
                if batch.made_with().contains(&id, meta.version) {
                    if !meta.deleted {
                        if let Err(_reason) = items.stage(self.commit, &id, None) {
                            self.failed.push(id);
                            self.outcome.failed += 1;
                            continue;
                        }
                        self.outcome.forgotten_removed += 1;
                    }
                    self.commit.forget_item(&id, &meta);
                } else if !self
                    .known
                    .vector_for(id.as_bytes())
                    .dominates(self.forgotten.vector_for(id.as_bytes()))
                {
                    let (version, timestamp) = self.commit.next_version(self.now_ms);
                    let restamped = ItemMeta {
                        version,
                        timestamp,
                        ..meta
                    };
                    self.commit.put_item(&id, &restamped, Some(&meta));
                }
            }
        }
        Ok(())
    }
}

/// A saved conflict whose remote version the destination has since learned (a later
/// change superseded it) has nothing left to resolve.
fn drop_superseded_conflicts(
    metadata: &MetadataStore,
    commit: &mut Commit,
    knowledge: &Knowledge,
) -> Result<(), SyncError> {
    if !metadata.has_saved_conflicts()? {
        return Ok(());
    }
    for saved in metadata.saved_conflicts()? {
        if knowledge.contains(&saved.remote.item, saved.remote.version) {
            commit.remove_conflict(&saved.remote.item);
        }
    }
    Ok(())
}

/// Settles a saved conflict: keep the local state or take the remote one, either way
/// as a fresh local version made with knowledge of both sides, and learn the conflict
/// knowledge.
pub fn resolve_saved_conflict(
    metadata: &mut MetadataStore,
    items: &mut dyn ItemStore,
    item: &ItemId,
    take_remote: bool,
    now_ms: u64,
) -> Result<Option<Version>, SyncError> {
    let Some(saved) = metadata.saved_conflict(item)? else {
        return Ok(None);
    };
    let replica: ReplicaId = metadata.id();
    let local = metadata.item(item)?;
    let mut commit = metadata.begin();
    commit.observe(saved.remote.timestamp);
    let (version, timestamp) = commit.next_version(now_ms);
    let creation = local.map_or(saved.remote.creation, |l| l.creation);
    let store_error = |reason| SyncError::ItemStore {
        replica,
        item: item.clone(),
        reason,
    };
    let deleted = if take_remote {
        items
            .stage(&mut commit, item, saved.remote.data.as_deref())
            .map_err(store_error)?;
        saved.remote.is_delete()
    } else {
        local.is_none_or(|l| l.deleted)
    };
    let meta = ItemMeta {
        creation,
        version,
        timestamp,
        deleted,
    };
    commit.put_item(item, &meta, local.as_ref());
    commit.remove_conflict(item);
    commit.set_knowledge(metadata.knowledge().combine(&saved.made_with));
    metadata.commit(commit)?;
    Ok(Some(version))
}

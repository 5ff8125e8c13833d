//! The source side: finds the changes a destination lacks and cuts them into batches.

use crate::metadata::{ItemMeta, MetadataStore};
use crate::model::{
    BatchMode, ChangeBatch, ChangeGroup, ChangeKind, IdRange, ItemChange, ItemId, Knowledge,
    MAX_BATCH_BYTES,
};

use super::{BatchRequest, ItemStore, SyncError};

/// A batch stops growing once its data passes this many bytes, well below the decoder
/// limit, whatever the requested batch size.
const BATCH_BYTES_SOFT: usize = MAX_BATCH_BYTES / 4;

/// The changes found for one destination knowledge, in id order. Kept for the whole
/// session so each batch costs what it sends, not another index scan.
pub struct Enumeration {
    destination_knowledge: Knowledge,
    candidates: Vec<ItemId>,
}

impl Enumeration {
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// Finds (or reuses, when `cache` was made for the same knowledge) the changes
    /// `destination_knowledge` lacks.
    pub fn of<'a>(
        metadata: &MetadataStore,
        cache: &'a mut Option<Enumeration>,
        destination_knowledge: &Knowledge,
    ) -> Result<&'a Enumeration, SyncError> {
        let stale = cache
            .as_ref()
            .is_none_or(|e| e.destination_knowledge != *destination_knowledge);
        if stale {
            *cache = Some(Enumeration {
                destination_knowledge: destination_knowledge.clone(),
                candidates: metadata.changes_unknown_to(destination_knowledge)?,
            });
        }
        Ok(cache.as_ref().expect("filled above"))
    }
}

/// The change to send for an item, or `None` when the store cannot give a live item's
/// data now (changed underneath, or a read error): the item is then excluded from the
/// batch, not learned, and sent next session. `record_data` is what the item record
/// carries, used when the store keeps data there.
fn item_change(
    items: &dyn ItemStore,
    metadata: &MetadataStore,
    id: &ItemId,
    meta: &ItemMeta,
    record_data: Option<Vec<u8>>,
) -> Option<ItemChange> {
    let data = if meta.deleted {
        None
    } else if items.data_in_record() {
        Some(record_data?)
    } else {
        Some(items.read(metadata, id).ok().flatten()?)
    };
    Some(ItemChange {
        item: id.clone(),
        kind: if meta.deleted {
            ChangeKind::Delete
        } else {
            ChangeKind::Update
        },
        creation: meta.creation,
        version: meta.version,
        timestamp: meta.timestamp,
        data,
    })
}

fn change_bytes(change: &ItemChange) -> usize {
    change.item.as_bytes().len() + change.data.as_ref().map_or(0, Vec::len)
}

/// How full a batch being built is: groups of items (see [`ItemStore::batch_group`])
/// and bytes of data.
#[derive(Default)]
struct BatchSize {
    groups: usize,
    last_group: Option<Vec<u8>>,
    bytes: usize,
}

impl BatchSize {
    /// Whether `id` goes into the batch: always when it continues the group of the
    /// item before it (a batch ends only between groups), else while the batch is
    /// below `batch_size` groups and its soft byte limit. The format's entry limit
    /// holds in every case.
    fn takes(&self, items: &dyn ItemStore, id: &ItemId, batch_size: usize, entries: usize) -> bool {
        if entries >= crate::model::MAX_CHANGES_PER_BATCH {
            return false;
        }
        let same_group = self
            .last_group
            .as_deref()
            .is_some_and(|g| g == items.batch_group(id.as_bytes()));
        same_group || (self.groups < batch_size && self.bytes < BATCH_BYTES_SOFT)
    }

    /// `id` went into the batch.
    fn count(&mut self, items: &dyn ItemStore, id: &ItemId) {
        let group = items.batch_group(id.as_bytes());
        if self.last_group.as_deref() != Some(group) {
            self.groups += 1;
            self.last_group = Some(group.to_vec());
        }
    }
}

/// Builds the next batch for `request`.
pub fn change_batch(
    metadata: &MetadataStore,
    items: &dyn ItemStore,
    cache: &mut Option<Enumeration>,
    request: &BatchRequest<'_>,
) -> Result<ChangeBatch, SyncError> {
    if request.full_enumeration {
        return full_enumeration_batch(metadata, items, request);
    }
    let known = request.destination_knowledge;
    let candidates = &Enumeration::of(metadata, cache, known)?.candidates;
    let mut next = candidates.partition_point(|id| id.as_bytes() < request.start);
    let (mut changes, mut excluded) = (Vec::new(), Vec::new());
    let mut size = BatchSize::default();
    while next < candidates.len() {
        let id = &candidates[next];
        if !size.takes(
            items,
            id,
            request.batch_size,
            changes.len() + excluded.len(),
        ) {
            break;
        }
        next += 1;
        let Some((meta, record_data)) = metadata.item_record(id)? else {
            continue;
        };
        if known.contains(id, meta.version) {
            continue;
        }
        size.count(items, id);
        match item_change(items, metadata, id, &meta, record_data) {
            Some(change) => {
                size.bytes += change_bytes(&change);
                changes.push(change);
            }
            None => excluded.push(id.clone()),
        }
    }
    let is_last = next >= candidates.len();
    let end = (!is_last).then(|| candidates[next - 1].successor_bytes());
    let range = IdRange::new(request.start.to_vec(), end)?;
    let group = ChangeGroup::new(range, changes, Vec::new())?;
    Ok(ChangeBatch::new(
        metadata.id(),
        metadata.knowledge(),
        vec![group],
        excluded,
        BatchMode::Normal,
        is_last,
    )?)
}

fn full_enumeration_batch(
    metadata: &MetadataStore,
    items: &dyn ItemStore,
    request: &BatchRequest<'_>,
) -> Result<ChangeBatch, SyncError> {
    let known = request.destination_knowledge;
    let (mut changes, mut present, mut excluded) = (Vec::new(), Vec::new(), Vec::new());
    let mut size = BatchSize::default();
    let mut last: Option<ItemId> = None;
    // The first entry that does not fit is read, and left for the next batch.
    let mut is_last = true;
    for entry in metadata.items_from(request.start) {
        let (id, meta) = entry?;
        let entries = changes.len() + present.len() + excluded.len();
        if !size.takes(items, &id, request.batch_size, entries) {
            is_last = false;
            break;
        }
        size.count(items, &id);
        if known.contains(&id, meta.version) {
            present.push(id.clone());
        } else {
            let record_data = if items.data_in_record() {
                metadata.data(&id)?
            } else {
                None
            };
            match item_change(items, metadata, &id, &meta, record_data) {
                Some(change) => {
                    size.bytes += change_bytes(&change);
                    changes.push(change);
                }
                None => excluded.push(id.clone()),
            }
        }
        last = Some(id);
    }
    let end = match (&last, is_last) {
        (Some(id), false) => Some(id.successor_bytes()),
        _ => None,
    };
    let range = IdRange::new(request.start.to_vec(), end)?;
    let group = ChangeGroup::new(range, changes, present)?;
    Ok(ChangeBatch::new(
        metadata.id(),
        metadata.knowledge(),
        vec![group],
        excluded,
        BatchMode::FullEnumeration {
            forgotten: metadata.forgotten().clone(),
        },
        is_last,
    )?)
}

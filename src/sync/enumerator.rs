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
    let (mut changes, mut excluded, mut bytes) = (Vec::new(), Vec::new(), 0usize);
    while next < candidates.len()
        && changes.len() + excluded.len() < request.batch_size
        && bytes < BATCH_BYTES_SOFT
    {
        let id = &candidates[next];
        next += 1;
        let Some((meta, record_data)) = metadata.item_record(id)? else {
            continue;
        };
        if known.contains(id, meta.version) {
            continue;
        }
        match item_change(items, metadata, id, &meta, record_data) {
            Some(change) => {
                bytes += change_bytes(&change);
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
    let mut bytes = 0usize;
    let mut last: Option<ItemId> = None;
    let mut entries = metadata.items_from(request.start).peekable();
    while changes.len() + present.len() + excluded.len() < request.batch_size
        && bytes < BATCH_BYTES_SOFT
    {
        let Some(entry) = entries.next() else { break };
        let (id, meta) = entry?;
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
                    bytes += change_bytes(&change);
                    changes.push(change);
                }
                None => excluded.push(id.clone()),
            }
        }
        last = Some(id);
    }
    let is_last = entries.peek().is_none();
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

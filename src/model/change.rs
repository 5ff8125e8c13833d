use super::{Hlc, IdRange, ItemId, Knowledge, ModelError, ReplicaId, Version};

/// What a change does to its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The item exists with this data (a create is an update of an unknown item).
    Update,
    /// The item is deleted; its metadata stays behind as a tombstone.
    Delete,
}

/// One item's current version as a source sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemChange {
    pub item: ItemId,
    pub kind: ChangeKind,
    /// The version that first created the item.
    pub creation: Version,
    /// The item's current change version.
    pub version: Version,
    /// The hybrid logical clock time of `version`, which LastWriterWins compares.
    pub timestamp: Hlc,
    /// The item's data: present for updates, absent for deletes.
    pub data: Option<Vec<u8>>,
}

impl ItemChange {
    pub fn is_delete(&self) -> bool {
        self.kind == ChangeKind::Delete
    }
}

/// How the source enumerated a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchMode {
    /// Only the changes the destination's knowledge lacks.
    Normal,
    /// Recovery after tombstone cleanup: the destination did not contain the source's
    /// forgotten knowledge, so every item the source holds in each group's range is
    /// named (changes the destination lacks carry data, the rest are listed as
    /// `present`). An item the destination holds in the range, that the source does not
    /// name and whose version lies in `forgotten`, was deleted and forgotten at the
    /// source.
    FullEnumeration { forgotten: Knowledge },
}

/// An ordered group: the changes of a contiguous id range, sorted by id. After the
/// group is applied the destination learns the source's knowledge of the whole range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeGroup {
    range: IdRange,
    changes: Vec<ItemChange>,
    present: Vec<ItemId>,
}

impl ChangeGroup {
    /// Checks that changes and `present` ids are sorted, unique and inside `range`.
    pub fn new(
        range: IdRange,
        changes: Vec<ItemChange>,
        present: Vec<ItemId>,
    ) -> Result<Self, ModelError> {
        let sorted = |ids: &mut dyn Iterator<Item = &ItemId>| {
            let mut prev: Option<&ItemId> = None;
            for id in ids {
                if !range.contains(id.as_bytes()) {
                    return Err(ModelError::InvalidBatch(format!(
                        "item {id:?} lies outside its group {range:?}"
                    )));
                }
                if prev.is_some_and(|p| p >= id) {
                    return Err(ModelError::InvalidBatch(format!(
                        "item {id:?} is out of order or repeated in group {range:?}"
                    )));
                }
                prev = Some(id);
            }
            Ok(())
        };
        sorted(&mut changes.iter().map(|c| &c.item))?;
        sorted(&mut present.iter())?;
        for change in &changes {
            if change.is_delete() == change.data.is_some() {
                return Err(ModelError::InvalidBatch(format!(
                    "item {:?}: an update must carry data and a delete must not",
                    change.item
                )));
            }
        }
        Ok(Self {
            range,
            changes,
            present,
        })
    }

    pub fn range(&self) -> &IdRange {
        &self.range
    }

    pub fn changes(&self) -> &[ItemChange] {
        &self.changes
    }

    pub fn present(&self) -> &[ItemId] {
        &self.present
    }

    /// Whether the source named `item` in this group (as a change or as present).
    pub fn names(&self, item: &ItemId) -> bool {
        self.changes.binary_search_by(|c| c.item.cmp(item)).is_ok()
            || self.present.binary_search(item).is_ok()
    }
}

/// A batch of changes from one source, with the knowledge they were made with.
///
/// Invariants (checked by [`ChangeBatch::new`], so a decoded batch holds them too):
/// groups are sorted and disjoint; every change's version is in `made_with` (a source
/// knows its own state); excluded items lie inside some group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeBatch {
    source: ReplicaId,
    made_with: Knowledge,
    groups: Vec<ChangeGroup>,
    excluded: Vec<ItemId>,
    mode: BatchMode,
    is_last: bool,
}

impl ChangeBatch {
    pub fn new(
        source: ReplicaId,
        made_with: Knowledge,
        groups: Vec<ChangeGroup>,
        excluded: Vec<ItemId>,
        mode: BatchMode,
        is_last: bool,
    ) -> Result<Self, ModelError> {
        for pair in groups.windows(2) {
            let (a, b) = (pair[0].range(), pair[1].range());
            if a.end().is_none_or(|end| end > b.start()) {
                return Err(ModelError::InvalidBatch(format!(
                    "groups {a:?} and {b:?} overlap or are out of order"
                )));
            }
        }
        for change in groups.iter().flat_map(|g| g.changes()) {
            if !made_with.contains(&change.item, change.version) {
                return Err(ModelError::InvalidBatch(format!(
                    "item {:?} is sent at version {:?}, which the batch's made-with \
                     knowledge does not contain",
                    change.item, change.version
                )));
            }
        }
        for item in &excluded {
            if !groups.iter().any(|g| g.range().contains(item.as_bytes())) {
                return Err(ModelError::InvalidBatch(format!(
                    "excluded item {item:?} lies outside every group"
                )));
            }
        }
        if let BatchMode::FullEnumeration { forgotten } = &mode {
            if !made_with.contains_knowledge(forgotten) {
                return Err(ModelError::InvalidBatch(
                    "forgotten knowledge is not contained in made-with knowledge".into(),
                ));
            }
        }
        Ok(Self {
            source,
            made_with,
            groups,
            excluded,
            mode,
            is_last,
        })
    }

    pub fn source(&self) -> ReplicaId {
        self.source
    }

    pub fn made_with(&self) -> &Knowledge {
        &self.made_with
    }

    pub fn groups(&self) -> &[ChangeGroup] {
        &self.groups
    }

    pub fn excluded(&self) -> &[ItemId] {
        &self.excluded
    }

    pub fn mode(&self) -> &BatchMode {
        &self.mode
    }

    pub fn is_last(&self) -> bool {
        self.is_last
    }

    pub fn changes(&self) -> impl Iterator<Item = &ItemChange> {
        self.groups.iter().flat_map(|g| g.changes())
    }

    pub fn change_count(&self) -> usize {
        self.groups.iter().map(|g| g.changes().len()).sum()
    }

    /// What a destination learns by applying every change of this batch: the made-with
    /// knowledge inside the groups, minus the items the source excluded. (The
    /// destination further excludes the items it failed to apply.)
    pub fn learned_knowledge(&self) -> Knowledge {
        let mut learned = Knowledge::new();
        for group in &self.groups {
            learned = learned.combine(&self.made_with.project(group.range()));
        }
        for item in &self.excluded {
            learned = learned.exclude(item);
        }
        learned
    }

    /// The group whose range holds `item`.
    pub fn group_for(&self, item: &ItemId) -> Option<&ChangeGroup> {
        self.groups
            .iter()
            .find(|g| g.range().contains(item.as_bytes()))
    }
}

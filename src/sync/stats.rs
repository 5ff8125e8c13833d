use crate::model::ReplicaId;

use super::ConflictOutcome;

/// Conflicts of one session by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConflictCounts {
    pub source_won: u64,
    pub destination_won: u64,
    pub merged: u64,
    pub saved: u64,
    pub skipped: u64,
}

impl ConflictCounts {
    pub fn total(&self) -> u64 {
        self.source_won + self.destination_won + self.merged + self.saved + self.skipped
    }

    pub(crate) fn record(&mut self, outcome: ConflictOutcome) {
        match outcome {
            ConflictOutcome::SourceWon => self.source_won += 1,
            ConflictOutcome::DestinationWon => self.destination_won += 1,
            ConflictOutcome::Merged => self.merged += 1,
            ConflictOutcome::Saved => self.saved += 1,
            ConflictOutcome::Skipped => self.skipped += 1,
        }
    }

    pub(crate) fn add(&mut self, other: &ConflictCounts) {
        self.source_won += other.source_won;
        self.destination_won += other.destination_won;
        self.merged += other.merged;
        self.saved += other.saved;
        self.skipped += other.skipped;
    }
}

/// What the destination did with one batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Changes integrated: written, or settled as a conflict in a way that learns them.
    pub applied: u64,
    /// Changes the destination already knew (obsolete).
    pub skipped: u64,
    /// Changes neither applied nor learned: store errors, skipped or saved conflicts.
    /// They are sent again by the next session.
    pub failed: u64,
    pub conflicts: ConflictCounts,
    /// Items removed because the source had forgotten their deletion (full enumeration).
    pub forgotten_removed: u64,
}

/// Statistics of one direction of a sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub source: Option<ReplicaId>,
    pub destination: Option<ReplicaId>,
    pub batches: u64,
    pub changes_sent: u64,
    pub changes_applied: u64,
    pub changes_skipped: u64,
    pub changes_failed: u64,
    pub conflicts: ConflictCounts,
    pub forgotten_removed: u64,
    /// Item ids and data carried by the batches.
    pub bytes: u64,
    pub full_enumeration: bool,
    pub cancelled: bool,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
}

impl SessionStats {
    pub(crate) fn add_batch(&mut self, sent: u64, bytes: u64, outcome: &BatchOutcome) {
        self.batches += 1;
        self.changes_sent += sent;
        self.bytes += bytes;
        self.changes_applied += outcome.applied;
        self.changes_skipped += outcome.skipped;
        self.changes_failed += outcome.failed;
        self.conflicts.add(&outcome.conflicts);
        self.forgotten_removed += outcome.forgotten_removed;
    }

    /// True when nothing moved: no change sent, applied, skipped or failed.
    pub fn is_empty(&self) -> bool {
        self.changes_sent == 0
            && self.changes_applied == 0
            && self.changes_skipped == 0
            && self.changes_failed == 0
            && self.conflicts.total() == 0
    }
}

/// The statistics of a whole sync, one entry per direction that ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Local → remote.
    pub upload: Option<SessionStats>,
    /// Remote → local.
    pub download: Option<SessionStats>,
}

impl SyncReport {
    pub fn cancelled(&self) -> bool {
        self.upload.as_ref().is_some_and(|s| s.cancelled)
            || self.download.as_ref().is_some_and(|s| s.cancelled)
    }
}

/// Reported to the progress callback after each committed batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub source: ReplicaId,
    pub destination: ReplicaId,
    pub batches_done: u64,
    pub changes_done: u64,
    /// The source's count of changes to send, when it knows it.
    pub changes_total: Option<u64>,
}

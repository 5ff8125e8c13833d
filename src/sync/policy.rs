use std::fmt;
use std::sync::Arc;

use crate::metadata::ItemMeta;
use crate::model::{Hlc, ItemChange, ItemId, ReplicaId, Version};

/// Which side of a conflict changed what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictKind {
    /// Both sides updated the item.
    UpdateUpdate,
    /// The destination updated, the source deleted.
    LocalUpdateRemoteDelete,
    /// The destination deleted, the source updated.
    LocalDeleteRemoteUpdate,
    /// Both deleted: always settled by the last-writer rule, whatever the policy.
    DeleteDelete,
}

/// A concurrency conflict as the application sees it.
#[derive(Debug)]
pub struct Conflict<'a> {
    pub item: &'a ItemId,
    pub kind: ConflictKind,
    pub source: ReplicaId,
    pub destination: ReplicaId,
    pub local: &'a ItemMeta,
    pub local_data: Option<&'a [u8]>,
    pub remote: &'a ItemChange,
}

/// What an application-defined policy decides for one conflict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    SourceWins,
    DestinationWins,
    /// Store this data as a fresh version of the destination, made with knowledge of
    /// both sides.
    Merge(Vec<u8>),
    /// Keep the destination as it is and log the conflict for later resolution; the
    /// remote version is not learned.
    SaveConflict,
    /// Do nothing; the remote version is not learned, so the conflict comes back.
    Skip,
}

/// The conflict callback of [`ConflictPolicy::ApplicationDefined`].
pub type ConflictHandler = Arc<dyn Fn(&Conflict<'_>) -> Resolution + Send + Sync>;

/// How a session resolves concurrency conflicts.
#[derive(Clone, Default)]
pub enum ConflictPolicy {
    SourceWins,
    DestinationWins,
    /// The version with the larger hybrid-clock timestamp wins; equal timestamps fall
    /// back to the larger replica id. Every replica picks the same winner.
    #[default]
    LastWriterWins,
    ApplicationDefined(ConflictHandler),
}

impl fmt::Debug for ConflictPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SourceWins => "SourceWins",
            Self::DestinationWins => "DestinationWins",
            Self::LastWriterWins => "LastWriterWins",
            Self::ApplicationDefined(_) => "ApplicationDefined",
        })
    }
}

/// What happened to a conflict, for statistics and notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictOutcome {
    SourceWon,
    DestinationWon,
    Merged,
    Saved,
    Skipped,
}

/// What to do when the destination lacks knowledge the source has forgotten.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForgottenRecovery {
    /// Send every item of the source so the destination can drop what was deleted.
    #[default]
    FullEnumeration,
    /// End the session with `SyncError::FullEnumerationNeeded`, changing nothing.
    Abort,
}

/// The last-writer order: `(timestamp, replica)`, larger wins. Replica ids break ties
/// so that the order is total and every replica computes the same winner.
pub fn last_writer_wins(local: (Hlc, Version), remote: (Hlc, Version)) -> bool {
    (remote.0, remote.1.replica, remote.1.tick) > (local.0, local.1.replica, local.1.tick)
}

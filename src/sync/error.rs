use thiserror::Error;

use crate::metadata::MetadataError;
use crate::model::{ItemId, ModelError, ReplicaId};

/// Errors of a sync session. Expected per-item outcomes (conflicts, skipped or failed
/// items) are not errors: they are counted in the session statistics.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SyncError {
    #[error(
        "replica {replica} was restored from an old copy: {evidence}; \
         run `knit rekey` on it to continue under a new id"
    )]
    ReplicaRestored {
        /// The replica that was restored.
        replica: ReplicaId,
        /// The replica that noticed.
        peer: ReplicaId,
        /// What gave it away, in words.
        evidence: String,
    },
    #[error(
        "destination {destination} lacks tombstones that source {source_replica} has cleaned up; \
         a full enumeration is needed and the recovery policy is Abort"
    )]
    FullEnumerationNeeded {
        source_replica: ReplicaId,
        destination: ReplicaId,
    },
    #[error("replica {replica} is already taking part in a sync session")]
    ReplicaBusy { replica: ReplicaId },
    #[error(
        "replica {replica} cannot sync with itself (if one folder is a copy of the other, \
         run `knit rekey` on the copy to make it a replica of its own)"
    )]
    SameReplica { replica: ReplicaId },
    #[error("invalid session options: {0}")]
    InvalidOptions(String),
    #[error("batch from {source_replica} is malformed: {reason}")]
    BadBatch {
        source_replica: ReplicaId,
        reason: String,
    },
    #[error("item store of replica {replica} failed on item {item}: {reason}")]
    ItemStore {
        replica: ReplicaId,
        item: ItemId,
        reason: String,
    },
    #[error("{url}: {}{message}", status.map(|s| format!("HTTP {s}: ")).unwrap_or_default())]
    Remote {
        /// The hosted replica's URL.
        url: String,
        /// The HTTP status of an error answer; `None` when no answer came.
        status: Option<u16>,
        message: String,
    },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

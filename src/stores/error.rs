use thiserror::Error;

use crate::metadata::MetadataError;
use crate::model::{ItemId, ModelError, ReplicaId};
use crate::sync::SyncError;

/// Errors of replicas and item stores.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("item store of replica {replica} failed on item {item}: {reason}")]
    ItemStore {
        replica: ReplicaId,
        item: ItemId,
        reason: String,
    },
    #[error("item {item}: value is {len} bytes; the limit is {max}")]
    ValueTooLarge {
        item: ItemId,
        len: usize,
        max: usize,
    },
    #[error("replica {replica} has no saved conflict for item {item}")]
    NoSuchConflict { replica: ReplicaId, item: ItemId },
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Model(#[from] ModelError),
}

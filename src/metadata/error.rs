use std::path::PathBuf;

use thiserror::Error;

use crate::model::{ModelError, ReplicaId};

/// Errors of the metadata store.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MetadataError {
    #[error("{path}: not a knit replica (run `knit init {path}` to create one)")]
    NotAReplica { path: PathBuf },
    #[error("{path}: already a knit replica")]
    AlreadyAReplica { path: PathBuf },
    #[error("{path}: replica is in use by another process (a sync or command is running)")]
    InUse { path: PathBuf },
    #[error("{path}: store format {found}; this build reads format {expected}")]
    FormatVersion {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: damaged record {key}: {reason}")]
    Damaged {
        path: PathBuf,
        key: String,
        reason: String,
    },
    #[error("{path}: storage error: {source}")]
    Storage {
        path: PathBuf,
        #[source]
        source: super::backend::BackendError,
    },
    #[error("replica {replica}: an earlier commit failed; reopen the replica to recover")]
    Poisoned { replica: ReplicaId },
    #[error(transparent)]
    Model(#[from] ModelError),
}

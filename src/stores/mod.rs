//! Item stores and replicas. A [`Replica`] is a metadata store plus an item store; it
//! implements both provider roles, so the orchestrator syncs any two replicas.
//!
//! Invariants:
//! - Every local change takes a fresh tick in the same commit as its data and metadata.
//! - A replica that a peer knows beyond its own tick refuses to sync
//!   (`SyncError::ReplicaRestored`) until it is rekeyed.
//! - Forgotten knowledge stays inside knowledge (`K ⊇ F`): tombstone cleanup adds only
//!   versions the replica knows.
//! - A session ends with a flush, so a sync reported complete is on disk.

mod error;
mod replica;
mod sled_items;

pub use error::StoreError;
pub use replica::{GcReport, Replica, ReplicaStatus, Take};
pub use sled_items::SledItems;

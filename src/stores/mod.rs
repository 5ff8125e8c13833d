//! Item stores, datasources and replicas. A [`Replica`] is a metadata store plus an item
//! store; it implements both provider roles, so the orchestrator syncs any two replicas.
//! Datasources (CSV, JSON Lines, SQLite, PostgreSQL, sled) are the row stores that
//! schema-driven sync keeps in step; their contract is in `datasource.rs`.
//!
//! Invariants:
//! - Every local change takes a fresh tick in the same commit as its data and metadata.
//! - A replica that a peer knows beyond its own tick refuses to sync
//!   (`SyncError::ReplicaRestored`) until it is rekeyed.
//! - Forgotten knowledge stays inside knowledge (`K ⊇ F`): tombstone cleanup adds only
//!   versions the replica knows.
//! - A session ends with a flush, so a sync reported complete is on disk.

mod csv_source;
mod datasource;
mod error;
mod jsonl_source;
mod postgres_source;
mod replica;
mod sled_items;
mod sled_source;
mod sqlite_source;

pub use csv_source::CsvSource;
pub use datasource::{
    at_or_above, Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome,
    TrackingAnchor, Value,
};
pub use error::StoreError;
pub use jsonl_source::JsonlSource;
pub use postgres_source::PostgresSource;
pub use replica::{GcReport, Replica, ReplicaStatus, Take};
pub use sled_items::SledItems;
pub use sled_source::SledSource;
pub use sqlite_source::SqliteSource;

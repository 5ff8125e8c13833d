//! knit: a knowledge-based replication engine.
//!
//! Replicas keep version vectors ("knowledge"), tick counts and tombstones in a sled
//! metadata store; the orchestrator pulls batches of changes from a source and pushes
//! them through a change applier on the destination, which detects conflicts and
//! resolves them by policy. See `docs/architecture.md` for the map of the code.

#![deny(clippy::dbg_macro)]

mod cli;
pub mod hub;
mod metadata;
mod model;
mod schema;
mod sim;
mod stores;
mod sync;

pub use cli::run as run_cli;
pub use metadata::{
    check_record, Commit, ItemMeta, MetadataError, MetadataStore, SavedConflict, StoreSummary,
    STORE_FORMAT,
};
pub use model::{
    decode_batch, decode_knowledge, encode_batch, encode_knowledge, BatchMode, ChangeBatch,
    ChangeGroup, ChangeKind, ClockVector, Hlc, IdRange, ItemChange, ItemId, Knowledge, ModelError,
    ReplicaId, Version, MAX_BATCH_BYTES, MAX_CHANGES_PER_BATCH, MAX_EXCEPTIONS, MAX_ITEM_DATA_LEN,
    MAX_ITEM_ID_LEN, MAX_REPLICAS_PER_VECTOR,
};
pub use schema::{
    automap, run_schema, sync as sync_schema, validate, Anchor, ApplyReport, AutoMap, ConflictRule,
    ConflictType, DatasourceKind, Datasources, DetectMode, DetectReport, Detection, Endpoint,
    Filter, FilterValue, History, Mapping, OnMissing, Operator, Projection, RowConflict, RowError,
    RowFailure, RunPhase, RunProgress, RunRecord, RunReport, RunStatus, SchemaError, SchemaSet,
    SyncDirection, SyncManager, SyncSchema, SyncType, TableReplica, Transform, TransformError,
    UnitError, UnitRule, Winner, DEFAULT_RETENTION,
};
/// Proptest strategies that generate simulator scenarios (the `proptest` feature).
#[cfg(feature = "proptest")]
pub use sim::strategies as sim_strategies;
pub use sim::{
    replay, replay_with, shrink, simulate, simulate_traced, simulate_with, BatchFault,
    ConflictTally, Faults, KeySpace, OperationMix, Phase, PolicyChoice, ReplicaFactory, RunTotals,
    Scenario, ScenarioError, ShrinkOptions, Shrunk, SimError, SimReplica, SimReport, SledReplicas,
    StepMetrics, Topology, TopologyPhase, Trace, TraceError, TraceOp, TracedRun, Violation,
    ViolationKind, Wanted, MAX_SIM_KEYS, MAX_SIM_REPLICAS, MAX_SIM_STEPS, MAX_TRACE_OPERATIONS,
    SHRINK_REPLAYS_MAX, TRACE_FORMAT,
};
pub use stores::{
    CsvSource, Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, GcReport,
    JsonlSource, PostgresSource, Replica, ReplicaStatus, Row, RowOutcome, SledItems, SledSource,
    SqliteSource, StoreError, Take, TrackingAnchor, Value,
};
pub use sync::{
    apply_batch, change_batch, classify, last_writer_wins, resolve_saved_conflict, run_session,
    synchronize, BatchOutcome, BatchRequest, CancelToken, ChangeDestination, ChangeSource,
    Classification, Clock, Conflict, ConflictCounts, ConflictHandler, ConflictKind,
    ConflictOutcome, ConflictPolicy, Direction, Enumeration, ForgottenRecovery, ItemStore,
    NoObserver, Peer, PeerInfo, Progress, Resolution, SessionOptions, SessionRole, SessionStats,
    SyncError, SyncObserver, SyncProvider, SyncReport, SystemClock,
};

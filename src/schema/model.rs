//! The sync schema: what one schema-driven sync moves, from where to where, and how.
//!
//! Fields are public: a schema is data a person writes in a file, and
//! [`validate`](super::validate) is where its rules are enforced, before any write.

use super::{Filter, Transform};

/// One side of a schema: an entity of a named datasource and its key fields.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    pub datasource: String,
    pub entity: String,
    /// The fields that identify a row, in order; the source's `key[i]` corresponds to
    /// the destination's `key[i]`.
    pub key: Vec<String>,
    /// For Incremental runs: a field the store sets whenever it writes a row (a
    /// timestamp or a counter). Without it, Incremental uses the store's triggers.
    /// A modified-at column cannot see deletes: those need a Full run.
    pub modified_at: Option<String>,
    /// A field whose non-null, non-false value marks a row deleted (a tombstone column
    /// such as `deleted_at`): such a row counts as absent when this side is read, and a
    /// delete synced into this side sets the field instead of removing the row.
    pub deleted_field: Option<String>,
}

impl Endpoint {
    pub fn new(datasource: &str, entity: &str, key: &[&str]) -> Endpoint {
        Endpoint {
            datasource: datasource.to_string(),
            entity: entity.to_string(),
            key: key.iter().map(|k| k.to_string()).collect(),
            ..Endpoint::default()
        }
    }
}

/// Source field(s) → destination field. Several source fields need a `JOIN` transform.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub source: Vec<String>,
    pub destination: String,
    pub transform: Option<Transform>,
}

impl Mapping {
    pub fn new(source: &str, destination: &str, transform: Option<Transform>) -> Mapping {
        Mapping {
            source: vec![source.to_string()],
            destination: destination.to_string(),
            transform,
        }
    }
}

/// How a run finds what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncType {
    /// Read every row and compare it with the stored metadata.
    Full,
    /// Read only rows changed since the last run.
    Incremental,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncDirection {
    SourceToDestination,
    DestinationToSource,
    Bidirectional,
}

/// Who wins when both sides changed one field since the last sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConflictRule {
    SourceWins,
    DestinationWins,
    LastWriterWins,
    /// Leave the row untouched on both sides and record the conflict unresolved.
    Manual,
}

/// What happens on the destination to a row that left the source (deleted, or no
/// longer passing the filters).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum OnMissing {
    Delete,
    /// Keep the row and set this bool field to true.
    SoftDelete {
        field: String,
    },
}

/// How the last run ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RunStatus {
    /// No run yet.
    #[default]
    Never,
    Success,
    /// Some rows failed; the others were applied.
    Partial,
    Failed,
    Cancelled,
    /// The process stopped during the run (found at the next start).
    Interrupted,
}

/// Rows per batch when a schema does not say.
pub const DEFAULT_BATCH_SIZE: u32 = 1000;
/// Incremental lookback when a schema does not say (seconds: longer than any writing
/// transaction is expected to last).
pub const DEFAULT_LOOKBACK: u64 = 300;

/// One schema: a pair of entities kept in step.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncSchema {
    /// Unique within a schema set; errors and run history name the schema by it.
    pub id: String,
    pub source: Endpoint,
    pub destination: Endpoint,
    pub mappings: Vec<Mapping>,
    /// Conditions on source fields, combined with AND.
    pub filters: Vec<Filter>,
    pub sync_type: SyncType,
    pub direction: SyncDirection,
    pub conflict: ConflictRule,
    pub on_missing: OnMissing,
    /// Without it, a run that would delete more than `mass_delete_threshold_percent`
    /// of the destination's rows refuses (an empty read is more likely a broken source
    /// than a wish to empty the destination).
    pub allow_mass_delete: bool,
    /// 0 to 100.
    pub mass_delete_threshold_percent: u8,
    /// A run stops once more rows than this have failed; `None` is no limit.
    pub max_errors: Option<u32>,
    /// Rows per batch: a cancelled run stops between batches, and every committed
    /// batch is in the destination.
    pub batch_size: u32,
    /// How far back an Incremental read reaches before its watermark, to catch writes
    /// that committed after the last read although they were stamped before it: in
    /// seconds for trigger tracking and timestamp columns, in the column's own units
    /// for a numeric modified-at column. Rows read twice are compared, not re-sent.
    pub lookback: u64,
    /// When the last run ended, UTC, as `YYYY-MM-DDTHH:MM:SSZ` (fraction allowed).
    pub last_sync: Option<String>,
    pub status: RunStatus,
    pub status_message: String,
}

impl SyncSchema {
    /// A schema with the defaults a file may leave out: Full, source to destination,
    /// source wins, missing rows deleted, mass deletes above 10 % refused, no error
    /// limit, batches of 1,000 rows, a 300 s lookback, never run.
    pub fn new(id: &str, source: Endpoint, destination: Endpoint) -> SyncSchema {
        SyncSchema {
            id: id.to_string(),
            source,
            destination,
            mappings: Vec::new(),
            filters: Vec::new(),
            sync_type: SyncType::Full,
            direction: SyncDirection::SourceToDestination,
            conflict: ConflictRule::SourceWins,
            on_missing: OnMissing::Delete,
            allow_mass_delete: false,
            mass_delete_threshold_percent: 10,
            max_errors: None,
            batch_size: DEFAULT_BATCH_SIZE,
            lookback: DEFAULT_LOOKBACK,
            last_sync: None,
            status: RunStatus::Never,
            status_message: String::new(),
        }
    }
}

/// The schemas of one file, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchemaSet {
    pub schemas: Vec<SyncSchema>,
}

impl SchemaSet {
    pub fn get(&self, id: &str) -> Option<&SyncSchema> {
        self.schemas.iter().find(|s| s.id == id)
    }
}

/// The snake_case names the file uses for enum values.
pub(crate) trait Named: Sized + Copy + PartialEq + 'static {
    const ALL: &'static [(Self, &'static str)];
    /// Words people may write for a value, suggested (never accepted) in its place.
    const SYNONYMS: &'static [(&'static str, &'static str)] = &[];

    fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(v, _)| *v == self)
            .map_or("", |(_, n)| n)
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
    }

    fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|(_, n)| *n).collect()
    }
}

impl Named for SyncType {
    const ALL: &'static [(Self, &'static str)] = &[
        (SyncType::Full, "full"),
        (SyncType::Incremental, "incremental"),
    ];
}

impl Named for SyncDirection {
    const ALL: &'static [(Self, &'static str)] = &[
        (SyncDirection::SourceToDestination, "source_to_destination"),
        (SyncDirection::DestinationToSource, "destination_to_source"),
        (SyncDirection::Bidirectional, "bidirectional"),
    ];
    const SYNONYMS: &'static [(&'static str, &'static str)] = &[
        ("one_way", "source_to_destination"),
        ("source_to_dest", "source_to_destination"),
        ("dest_to_source", "destination_to_source"),
        ("two_way", "bidirectional"),
        ("both", "bidirectional"),
    ];
}

impl Named for ConflictRule {
    const ALL: &'static [(Self, &'static str)] = &[
        (ConflictRule::SourceWins, "source_wins"),
        (ConflictRule::DestinationWins, "destination_wins"),
        (ConflictRule::LastWriterWins, "last_writer_wins"),
        (ConflictRule::Manual, "manual"),
    ];
    const SYNONYMS: &'static [(&'static str, &'static str)] = &[
        ("dest_wins", "destination_wins"),
        ("lww", "last_writer_wins"),
        ("newest_wins", "last_writer_wins"),
    ];
}

impl Named for RunStatus {
    const ALL: &'static [(Self, &'static str)] = &[
        (RunStatus::Never, "never"),
        (RunStatus::Success, "success"),
        (RunStatus::Partial, "partial"),
        (RunStatus::Failed, "failed"),
        (RunStatus::Cancelled, "cancelled"),
        (RunStatus::Interrupted, "interrupted"),
    ];
}

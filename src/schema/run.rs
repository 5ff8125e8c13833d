//! One run of one schema: validate, detect, sync in the schema's direction, write back,
//! report. Named datasources come from a TOML file a person can edit.
//!
//! A run changes nothing when it cannot go through: an invalid schema, an unreachable
//! datasource or a detection that would delete more of the other side than the schema
//! allows all end the run as `Failed` before the first commit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;

use crate::model::ItemId;
use crate::stores::Value;
use crate::stores::{CsvSource, Datasource, JsonlSource, PostgresSource, SledSource, SqliteSource};
use crate::sync::{
    CancelToken, ConflictKind, ConflictOutcome, ConflictPolicy, Progress, Resolution,
    SessionOptions, SessionStats, SyncObserver,
};

use super::history::{History, RunRecord, DEFAULT_RETENTION};
use super::model::Named;
use super::table::{key_of_prefix, split_unit, DetectMode, Detection, TableReplica};
use super::watermark::utc_now_text;
use super::{
    validate, ConflictRule, OnMissing, Projection, RunStatus, SchemaError, SyncDirection,
    SyncSchema, SyncType,
};

/// The kinds of datasource a config file may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasourceKind {
    /// A folder of `<entity>.csv` files.
    Csv,
    /// A folder of `<entity>.jsonl` files.
    Jsonl,
    /// A SQLite database file.
    Sqlite,
    /// A sled database folder (knit's own embedded store).
    Sled,
    /// A schema of a PostgreSQL database.
    Postgres,
}

/// One `[datasources.NAME]` table. File stores take `path`; PostgreSQL takes a
/// libpq-style `conninfo` (`host=.. port=.. user=.. dbname=..`), or `conninfo_env`, the
/// name of an environment variable that holds it, so that a password need not be
/// written in the file; `password_env` adds a password from another variable.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasourceEntry {
    kind: DatasourceKind,
    /// Relative paths are taken from the config file's folder.
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    conninfo: Option<String>,
    #[serde(default)]
    conninfo_env: Option<String>,
    #[serde(default)]
    password_env: Option<String>,
    /// The PostgreSQL schema whose tables are the entities (default `public`).
    #[serde(default)]
    schema: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasourceFile {
    #[serde(default)]
    datasources: BTreeMap<String, DatasourceEntry>,
}

/// Named datasources: `[datasources.NAME]` tables with `kind` and `path`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Datasources {
    base: PathBuf,
    entries: BTreeMap<String, DatasourceEntry>,
}

impl Datasources {
    /// Reads a config file; relative paths in it are taken from its folder.
    pub fn load(path: &Path) -> Result<Datasources, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|e| SchemaError::Io {
            file: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_toml(
            &text,
            path.parent().unwrap_or(Path::new(".")),
            &path.display().to_string(),
        )
    }

    /// Parses config text; `file` names it in errors.
    pub fn from_toml(text: &str, base: &Path, file: &str) -> Result<Datasources, SchemaError> {
        let parsed: DatasourceFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((0, 0));
            SchemaError::Syntax {
                file: file.to_string(),
                line,
                column,
                message: e.message().to_string(),
            }
        })?;
        Ok(Datasources {
            base: base.to_path_buf(),
            entries: parsed.datasources,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The kind of the datasource called `name`, as the config file writes it.
    pub fn kind_name(&self, name: &str) -> &'static str {
        match self.entries.get(name).map(|e| e.kind) {
            Some(DatasourceKind::Csv) => "csv",
            Some(DatasourceKind::Jsonl) => "jsonl",
            Some(DatasourceKind::Sqlite) => "sqlite",
            Some(DatasourceKind::Sled) => "sled",
            Some(DatasourceKind::Postgres) => "postgres",
            None => "unknown",
        }
    }

    /// Opens the datasource called `name`.
    pub fn open(&self, name: &str) -> Result<Box<dyn Datasource>, SchemaError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| SchemaError::Datasource {
                message: format!(
                    "no datasource named {name:?} (known: {})",
                    self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            })?;
        let setting = |what: &str, hint: &str| SchemaError::Datasource {
            message: format!(
                "datasource {name:?} ({:?}) needs {what}: {hint}",
                entry.kind
            ),
        };
        let path = || -> Result<PathBuf, SchemaError> {
            let path = entry
                .path
                .as_ref()
                .ok_or_else(|| setting("a path", "path = \"data\""))?;
            Ok(self.base.join(path))
        };
        Ok(match entry.kind {
            DatasourceKind::Csv => Box::new(CsvSource::open(name, &path()?)?),
            DatasourceKind::Jsonl => Box::new(JsonlSource::open(name, &path()?)?),
            DatasourceKind::Sqlite => Box::new(SqliteSource::open(name, &path()?)?),
            DatasourceKind::Sled => Box::new(SledSource::open(name, &path()?)?),
            DatasourceKind::Postgres => Box::new(PostgresSource::connect(
                name,
                &postgres_conninfo(entry, &setting)?,
                entry.schema.as_deref(),
            )?),
        })
    }
}

/// The connection string of a PostgreSQL entry, with the password from the
/// environment when the entry names a variable for it.
fn postgres_conninfo(
    entry: &DatasourceEntry,
    setting: &dyn Fn(&str, &str) -> SchemaError,
) -> Result<String, SchemaError> {
    let mut conninfo = match (&entry.conninfo, &entry.conninfo_env) {
        (Some(c), None) => c.clone(),
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            setting(
                "a connection string",
                &format!("the environment variable {var} (conninfo_env) is not set"),
            )
        })?,
        _ => {
            return Err(setting(
                "exactly one of conninfo, conninfo_env",
                "conninfo = \"host=127.0.0.1 user=app dbname=shop\"",
            ))
        }
    };
    if let Some(var) = &entry.password_env {
        let password = std::env::var(var).map_err(|_| {
            setting(
                "a password",
                &format!("the environment variable {var} (password_env) is not set"),
            )
        })?;
        // Quoted as libpq's conninfo syntax wants: backslash and quote escaped.
        let quoted = password.replace('\\', "\\\\").replace('\'', "\\'");
        conninfo.push_str(&format!(" password='{quoted}'"));
    }
    Ok(conninfo)
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A row that failed: its key, the field at fault when there is one, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowError {
    pub key: Vec<String>,
    pub field: Option<String>,
    pub reason: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}", self.key.join(", "))?;
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What kind of concurrent change a conflict was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConflictType {
    /// Both sides changed the same field.
    UpdateUpdate,
    /// One side deleted the row while the other updated it: settled for the whole row.
    UpdateDelete,
}

/// Which side's change a conflict kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Winner {
    Source,
    Destination,
    /// Left for a person (conflict = manual).
    Unresolved,
}

/// One conflict of a run, per row and field (`field` is `None` for a whole row).
#[derive(Clone, Debug, PartialEq)]
pub struct RowConflict {
    /// The key values, in the schema's key order.
    pub key: Vec<String>,
    /// The field (a destination field name) both sides changed.
    pub field: Option<String>,
    pub kind: ConflictType,
    /// Each side's value before the conflict was settled (`None`: deleted or unknown).
    pub source: Option<Value>,
    pub destination: Option<Value>,
    pub winner: Winner,
}

/// Where a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunPhase {
    /// Change detection: rows are being read; the total is not known yet.
    Reading,
    /// Rows are moving; `total` is known.
    Syncing,
    /// The last event of a run that went through (`done == total`, 100 %).
    Done,
    /// The last event of a cancelled run.
    Cancelled,
    /// The last event of a run that failed.
    Failed,
}

/// A progress event of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunProgress {
    pub schema: String,
    pub phase: RunPhase,
    /// Rows read by change detection so far.
    pub rows_read: u64,
    /// Rows synced so far; never goes down within a run.
    pub done: u64,
    /// Rows to sync, known once reading is over.
    pub total: Option<u64>,
    /// `done * 100 / total`; 100 only in the last event of a run that went through.
    pub percent: Option<u8>,
}

/// What a run did, in the terms of the datasource scenarios.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    pub schema: String,
    pub status: RunStatus,
    pub message: String,
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub started: String,
    pub ended: String,
    pub duration_ms: u64,
    /// Rows change detection read on the sending side(s).
    pub rows_read: u64,
    /// Rows found new, changed or gone on the sending side(s), and so sent.
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Rows the filters left out.
    pub skipped: u64,
    /// Changes (field units) the sessions sent, and rows written into datasources.
    pub sent: u64,
    pub applied: u64,
    /// Rows that could not be read or written; each has an entry in `errors`.
    pub failed: u64,
    pub errors: Vec<RowError>,
    pub conflicts: Vec<RowConflict>,
    /// Things that worked but deserve a look (a modified-at column cannot see
    /// deletes, say).
    pub warnings: Vec<String>,
    /// The Incremental watermark of the sending side (the schema's source when it
    /// sends), before and after the run.
    pub watermark_before: Option<String>,
    pub watermark_after: Option<String>,
}

impl RunReport {
    fn failed(schema: &SyncSchema, message: String) -> RunReport {
        RunReport {
            schema: schema.id.clone(),
            status: RunStatus::Failed,
            message,
            ..RunReport::default()
        }
    }

    /// The record the run history keeps of this run.
    pub fn to_record(&self) -> RunRecord {
        RunRecord {
            schema: self.schema.clone(),
            started: self.started.clone(),
            ended: self.ended.clone(),
            duration_ms: self.duration_ms,
            status: self.status.name().to_string(),
            message: self.message.clone(),
            rows_read: self.rows_read,
            sent: self.sent,
            applied: self.applied,
            inserted: self.inserted,
            updated: self.updated,
            deleted: self.deleted,
            skipped: self.skipped,
            failed: self.failed,
            conflicts: self.conflicts.len() as u64,
            watermark_before: self.watermark_before.clone(),
            watermark_after: self.watermark_after.clone(),
            errors: self.errors.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The engine policy for one session of `schema`, whose source is the session's source
/// when `schema_source_sends`.
fn policy(rule: ConflictRule, schema_source_sends: bool) -> ConflictPolicy {
    match (rule, schema_source_sends) {
        (ConflictRule::SourceWins, true) | (ConflictRule::DestinationWins, false) => {
            ConflictPolicy::SourceWins
        }
        (ConflictRule::SourceWins, false) | (ConflictRule::DestinationWins, true) => {
            ConflictPolicy::DestinationWins
        }
        (ConflictRule::LastWriterWins, _) => ConflictPolicy::LastWriterWins,
        (ConflictRule::Manual, _) => {
            ConflictPolicy::ApplicationDefined(Arc::new(|_| Resolution::SaveConflict))
        }
    }
}

/// Runs `schema` once with no progress reporting. Metadata of both sides and the run
/// history live under `state_dir/<schema id>/`.
pub fn run_schema(
    schema: &SyncSchema,
    datasources: &Datasources,
    state_dir: &Path,
    cancel: &CancelToken,
) -> RunReport {
    sync(schema, datasources, state_dir, cancel, &mut |_| {})
}

/// Runs `schema` once: validates it, detects changes, syncs in the schema's direction,
/// writes what arrived into the datasources, records the run in the history under
/// `state_dir` and returns the report. `progress` hears every event of the run.
/// Never panics on bad input; a run that cannot go through ends `Failed` with a
/// message and changes nothing.
pub fn sync(
    schema: &SyncSchema,
    datasources: &Datasources,
    state_dir: &Path,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(&RunProgress),
) -> RunReport {
    let started = utc_now_text();
    let clock = Instant::now();
    let history = History::new(state_dir, DEFAULT_RETENTION);
    let mut events = Events {
        schema: schema.id.clone(),
        sink: progress,
        rows_read: 0,
        done: 0,
        total: None,
    };
    events.emit(RunPhase::Reading);
    let mut report = match try_run(
        schema,
        datasources,
        state_dir,
        cancel,
        &history,
        &started,
        &mut events,
    ) {
        Ok(report) => report,
        Err(e) => RunReport::failed(schema, e.to_string()),
    };
    report.started = started;
    report.ended = utc_now_text();
    report.duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
    events.finish(report.status);
    if let Err(e) = history.finish(&report.to_record()) {
        report
            .warnings
            .push(format!("the run history was not written: {e}"));
    }
    report
}

/// Progress events, kept monotonic.
struct Events<'a> {
    schema: String,
    sink: &'a mut dyn FnMut(&RunProgress),
    rows_read: u64,
    done: u64,
    total: Option<u64>,
}

impl Events<'_> {
    fn emit(&mut self, phase: RunPhase) {
        let percent = self.total.map(|t| {
            if phase == RunPhase::Done {
                100
            } else {
                (self.done * 100)
                    .checked_div(t)
                    .map_or(0, |p| u8::try_from(p).unwrap_or(99).min(99))
            }
        });
        (self.sink)(&RunProgress {
            schema: self.schema.clone(),
            phase,
            rows_read: self.rows_read,
            done: self.done,
            total: self.total,
            percent,
        });
    }

    /// Rows synced so far: a row is done once written into its datasource, which
    /// happens at the end, so until then `done` stays below `total`.
    fn synced(&mut self, rows: u64) {
        let cap = self.total.unwrap_or(0).saturating_sub(1);
        let done = rows.min(cap).max(self.done);
        if done != self.done {
            self.done = done;
            self.emit(RunPhase::Syncing);
        }
    }

    fn finish(&mut self, status: RunStatus) {
        match status {
            RunStatus::Success | RunStatus::Partial => {
                let total = self.total.unwrap_or(self.done).max(self.done);
                self.total = Some(total);
                self.done = total;
                self.emit(RunPhase::Done);
            }
            RunStatus::Cancelled => self.emit(RunPhase::Cancelled),
            _ => self.emit(RunPhase::Failed),
        }
    }
}

/// Collects a session's conflicts and turns batch commits into progress events.
struct RunObserver<'a, 'b> {
    conflicts: Vec<(ItemId, ConflictKind, ConflictOutcome)>,
    events: &'a mut Events<'b>,
    /// Rows done before this session, and a handle on the receiving side's count.
    base: u64,
    staged: &'a dyn Fn() -> u64,
}

impl SyncObserver for RunObserver<'_, '_> {
    fn conflict(&mut self, item: &ItemId, kind: ConflictKind, outcome: ConflictOutcome) {
        self.conflicts.push((item.clone(), kind, outcome));
    }

    fn progress(&mut self, _progress: &Progress) {
        let rows = self.base + (self.staged)();
        self.events.synced(rows);
    }
}

/// One side's change detection, its progress told to `events`.
fn detect_side(
    side: &mut TableReplica,
    mode: DetectMode,
    events: &mut Events<'_>,
    commit_new: bool,
) -> Result<Detection, SchemaError> {
    let before = events.rows_read;
    let mut observe = |read| {
        events.rows_read = before + read;
        events.emit(RunPhase::Reading);
    };
    let detection = if commit_new {
        side.detect_changes_committing(mode, &mut observe)?
    } else {
        side.detect_changes_observed(mode, &mut observe)?
    };
    events.rows_read = before + detection.report.rows_read;
    events.emit(RunPhase::Reading);
    Ok(detection)
}

#[allow(clippy::too_many_arguments)]
fn try_run(
    schema: &SyncSchema,
    datasources: &Datasources,
    state_dir: &Path,
    cancel: &CancelToken,
    history: &History,
    started: &str,
    events: &mut Events<'_>,
) -> Result<RunReport, SchemaError> {
    // Validation first, against what the datasources say their entities are.
    let mut source_store = datasources.open(&schema.source.datasource)?;
    let mut destination_store = datasources.open(&schema.destination.datasource)?;
    let source_info = source_store.describe(&schema.source.entity)?;
    let destination_info = destination_store.describe(&schema.destination.entity)?;
    let (source_sends, destination_sends) = match schema.direction {
        SyncDirection::SourceToDestination => (true, false),
        SyncDirection::DestinationToSource => (false, true),
        SyncDirection::Bidirectional => (true, true),
    };
    let mut problems = validate(schema, &source_info, &destination_info);
    let mut warnings = Vec::new();
    for (side, endpoint, info, store, sends) in [
        (
            "source",
            &schema.source,
            &source_info,
            &source_store,
            source_sends,
        ),
        (
            "destination",
            &schema.destination,
            &destination_info,
            &destination_store,
            destination_sends,
        ),
    ] {
        for (what, field) in [
            ("modified_at", &endpoint.modified_at),
            ("deleted_field", &endpoint.deleted_field),
        ] {
            if let Some(field) = field {
                if info.field(field).is_none() {
                    problems.push(SchemaError::InvalidValue {
                        schema: schema.id.clone(),
                        path: format!("{side}.{what}"),
                        value: field.clone(),
                        reason: format!(
                            "entity {} of datasource {} has no such field",
                            endpoint.entity, endpoint.datasource
                        ),
                        suggestion: None,
                    });
                }
            }
        }
        if schema.sync_type != SyncType::Incremental || !sends {
            continue;
        }
        // A file or sled store has no query by modified-at either: reading "only what
        // changed" would read everything, so Incremental would only pretend.
        match &endpoint.modified_at {
            _ if !store.supports_tracking() => problems.push(SchemaError::InvalidValue {
                schema: schema.id.clone(),
                path: "sync_type".into(),
                value: "incremental".into(),
                reason: format!(
                    "datasource {} is a {} store, which cannot read only the rows changed \
                     since the last run (Incremental needs SQLite or PostgreSQL)",
                    endpoint.datasource,
                    datasources.kind_name(&endpoint.datasource)
                ),
                suggestion: Some("use sync_type = \"full\"".into()),
            }),
            Some(column) if endpoint.deleted_field.is_none() => warnings.push(format!(
                "{}: {side}.modified_at = {column:?} cannot see rows deleted in {}; an \
                 Incremental run never deletes them elsewhere (run Full now and then, or \
                 name a deleted_field)",
                schema.id, endpoint.datasource
            )),
            _ => {}
        }
    }
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Ok(RunReport {
            errors: lines
                .iter()
                .map(|l| RowError {
                    key: Vec::new(),
                    field: None,
                    reason: l.clone(),
                })
                .collect(),
            ..RunReport::failed(schema, lines.join("; "))
        });
    }

    let folder = state_dir.join(&schema.id);
    let mut source = TableReplica::open_with(
        &folder.join("source"),
        source_store,
        &schema.source.entity,
        &schema.source.key,
        Projection::source_side(schema),
        schema.source.modified_at.clone(),
        schema.source.deleted_field.clone(),
    )?;
    // `on_missing = soft_delete` is the destination's tombstone column.
    let destination_tombstone =
        schema
            .destination
            .deleted_field
            .clone()
            .or(match &schema.on_missing {
                OnMissing::SoftDelete { field } => Some(field.clone()),
                OnMissing::Delete => None,
            });
    let mut destination = TableReplica::open_with(
        &folder.join("destination"),
        destination_store,
        &schema.destination.entity,
        &schema.destination.key,
        Projection::destination_side(schema),
        schema.destination.modified_at.clone(),
        destination_tombstone,
    )?;
    // Both sides are locked now: a marker left by an earlier run is a run that died.
    history.begin(
        &schema.id,
        started,
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        )
        .unwrap_or(0),
    )?;
    let mut report = RunReport {
        schema: schema.id.clone(),
        warnings,
        ..RunReport::default()
    };
    // Rows an earlier run left pending were written (or refused again) at open.
    for side in [&source, &destination] {
        report.applied += side.recovered().upserted + side.recovered().deleted;
        record_refused(&mut report, side.recovered());
    }

    // Detect on every sending side, refuse a mass delete before anything commits.
    let mode = match schema.sync_type {
        SyncType::Full => DetectMode::Full,
        SyncType::Incremental => DetectMode::Incremental {
            lookback: schema.lookback,
        },
    };
    // A side that holds nothing yet commits its rows as it reads them (see
    // `detect_changes_committing`); a run stopped below leaves those versions behind
    // the anchor, which the next detection reads again and finds unchanged. The
    // destination does so only when none of the source's versions are still to come,
    // and after taking the source's clock: the source's changes stay the earlier.
    let source_detection = if source_sends {
        Some(detect_side(&mut source, mode, events, true)?)
    } else {
        None
    };
    let destination_detection = if destination_sends {
        let nothing_to_come = source_detection
            .as_ref()
            .is_none_or(|d| d.changed_units().next().is_none());
        if nothing_to_come && source_detection.is_some() {
            destination.follow_clock_of(&source)?;
        }
        Some(detect_side(
            &mut destination,
            mode,
            events,
            nothing_to_come,
        )?)
    } else {
        None
    };
    let detections = [source_detection, destination_detection];
    // The rows the other side holds are counted only when a detection deletes: the
    // count reads every unit, and an Incremental run must cost what changed.
    for (detection, other) in [(&detections[0], &destination), (&detections[1], &source)] {
        let deleted = detection.as_ref().map_or(0, |d| d.report.deleted);
        if deleted == 0 || schema.allow_mass_delete {
            continue;
        }
        let held = other.row_count()?;
        let percent = deleted * 100 / held.max(1);
        if percent > u64::from(schema.mass_delete_threshold_percent) {
            return Ok(RunReport::failed(
                schema,
                format!(
                    "the run would delete {deleted} of {held} rows ({percent} %), more than \
                     mass_delete_threshold_percent = {}; nothing was changed (set \
                     allow_mass_delete = true if this is meant)",
                    schema.mass_delete_threshold_percent
                ),
            ));
        }
    }
    let failures: usize = detections
        .iter()
        .flatten()
        .map(|d| d.report.failed.len())
        .sum();
    if schema.max_errors.is_some_and(|max| failures > max as usize) {
        return Ok(RunReport::failed(
            schema,
            format!(
                "{failures} rows failed, more than max_errors = {}; nothing was sent",
                schema.max_errors.unwrap_or(0)
            ),
        ));
    }
    // Changes first seen in one run are ordered by detection, source first: the
    // destination's clock follows the source's once the source's versions exist, so
    // last-writer-wins never falls back to the replica ids' tie-break for two edits
    // detected in the same millisecond.
    let [source_detection, destination_detection] = detections;
    if let Some(d) = source_detection.as_ref().or(destination_detection.as_ref()) {
        report.watermark_before = d.anchor_before.clone();
        report.watermark_after = d.anchor_after.clone();
    }
    if let Some(detection) = source_detection {
        let found = source.commit_changes(detection)?;
        add_detection(&mut report, found);
    }
    destination.follow_clock_of(&source)?;
    if let Some(detection) = destination_detection {
        let found = destination.commit_changes(detection)?;
        add_detection(&mut report, found);
    }

    // What each side has that the other lacks: the rows to move, and the values a
    // conflict report shows.
    let source_unknown = source.changes_unknown_to(&destination)?;
    let destination_unknown = destination.changes_unknown_to(&source)?;
    let mut total = 0;
    if source_sends {
        total += distinct_rows(&source_unknown);
    }
    if destination_sends {
        total += distinct_rows(&destination_unknown);
    }
    events.total = Some(total);
    events.emit(RunPhase::Syncing);
    // Only a unit both sides changed can conflict: keep the values of those (an
    // initial sync reads none).
    let both: Vec<ItemId> = {
        let theirs: BTreeSet<&ItemId> = destination_unknown.iter().collect();
        source_unknown
            .iter()
            .filter(|i| theirs.contains(i))
            .cloned()
            .collect()
    };
    let source_values = source.unit_values(&both)?;
    let destination_values = destination.unit_values(&both)?;

    // A row deleted on one side and updated on the other is settled for the whole row.
    let settled = settle_update_delete(
        schema,
        &mut source,
        &mut destination,
        &source_unknown,
        &destination_unknown,
    )?;
    let settled_rows: BTreeSet<Vec<u8>> = settled.iter().map(|(p, _)| p.clone()).collect();
    report.conflicts.extend(settled.into_iter().map(|(_, c)| c));

    // Sync in the schema's direction, the schema's policy mapped onto each session.
    let mut sessions: Vec<SessionStats> = Vec::new();
    let mut unit_conflicts: BTreeMap<(Vec<u8>, Vec<u8>), RowConflict> = BTreeMap::new();
    for (schema_source_sends, sends) in [(true, source_sends), (false, destination_sends)] {
        if !sends || cancel.is_cancelled() {
            continue;
        }
        if report.failed > u64::from(schema.max_errors.unwrap_or(u32::MAX)) {
            break;
        }
        let options = session_options(schema, schema_source_sends, cancel);
        let (sender, receiver) = if schema_source_sends {
            (&mut source, &mut destination)
        } else {
            (&mut destination, &mut source)
        };
        let base = events.done;
        let receiver_counter = receiver.staged_counter();
        let staged = move || receiver_counter.count();
        let mut observer = RunObserver {
            conflicts: Vec::new(),
            events,
            base,
            staged: &staged,
        };
        let (stats, apply) = sender.send_to(receiver, &options, &mut observer)?;
        let found = observer.conflicts;
        events.synced(base + staged());
        report.sent += stats.changes_sent;
        report.applied += apply.upserted + apply.deleted;
        record_refused(&mut report, &apply);
        for (item, kind, outcome) in found {
            let Some((prefix, unit)) = split_unit(item.as_bytes()) else {
                continue;
            };
            if settled_rows.contains(prefix) {
                continue;
            }
            let kind = match kind {
                ConflictKind::UpdateUpdate => ConflictType::UpdateUpdate,
                ConflictKind::LocalUpdateRemoteDelete | ConflictKind::LocalDeleteRemoteUpdate => {
                    ConflictType::UpdateDelete
                }
                ConflictKind::DeleteDelete => continue,
            };
            let sender_won = match outcome {
                ConflictOutcome::SourceWon | ConflictOutcome::Merged => Some(true),
                ConflictOutcome::DestinationWon => Some(false),
                ConflictOutcome::Saved | ConflictOutcome::Skipped => None,
            };
            let winner = match sender_won {
                None => Winner::Unresolved,
                Some(w) if w == schema_source_sends => Winner::Source,
                Some(_) => Winner::Destination,
            };
            unit_conflicts
                .entry((prefix.to_vec(), unit.to_vec()))
                .or_insert_with(|| RowConflict {
                    key: key_of_prefix(prefix),
                    field: (!unit.is_empty()).then(|| String::from_utf8_lossy(unit).into_owned()),
                    kind,
                    source: source_values.get(&item).cloned().flatten(),
                    destination: destination_values.get(&item).cloned().flatten(),
                    winner,
                });
        }
        sessions.push(stats);
    }
    report.conflicts.extend(unit_conflicts.into_values());
    let cancelled = cancel.is_cancelled() || sessions.iter().any(|s| s.cancelled);
    let too_many = schema
        .max_errors
        .is_some_and(|max| report.failed > u64::from(max));
    report.status = if too_many {
        RunStatus::Failed
    } else if cancelled {
        RunStatus::Cancelled
    } else if report.failed > 0 {
        RunStatus::Partial
    } else {
        RunStatus::Success
    };
    report.message = format!(
        "{} inserted, {} updated, {} deleted, {} skipped, {} failed, {} conflicts{}",
        report.inserted,
        report.updated,
        report.deleted,
        report.skipped,
        report.failed,
        report.conflicts.len(),
        if too_many {
            format!(
                "; stopped: more than max_errors = {} rows failed",
                schema.max_errors.unwrap_or(0)
            )
        } else if cancelled {
            "; cancelled between batches".to_string()
        } else {
            String::new()
        }
    );
    Ok(report)
}

fn add_detection(report: &mut RunReport, found: super::DetectReport) {
    report.rows_read += found.rows_read;
    report.inserted += found.inserted;
    report.updated += found.updated;
    report.deleted += found.deleted;
    report.skipped += found.filtered;
    for failure in found.failed {
        report.failed += 1;
        report.errors.push(RowError {
            key: failure.key,
            field: Some(failure.field),
            reason: failure.reason,
        });
    }
}

/// The number of rows among unit ids sorted by id (a row's units are adjacent: no row
/// prefix is a prefix of another, since only the end of one holds `00 00`).
fn distinct_rows(items: &[ItemId]) -> u64 {
    let mut rows = 0;
    let mut last: Option<&[u8]> = None;
    for item in items {
        if let Some((prefix, _)) = split_unit(item.as_bytes()) {
            if last != Some(prefix) {
                rows += 1;
                last = Some(prefix);
            }
        }
    }
    rows
}

/// Rows one side deleted while the other updated them (both unknown to the other
/// side) are settled per row, not per field: the field-level engine would otherwise
/// keep the updated field and drop the rest. When the update wins, the updater's row
/// is re-stamped whole, so every one of its fields beats the delete; when the delete
/// wins, the engine already deletes every field. Manual keeps the update (nothing is
/// lost) and reports the conflict unresolved.
fn settle_update_delete(
    schema: &SyncSchema,
    source: &mut TableReplica,
    destination: &mut TableReplica,
    source_unknown: &[ItemId],
    destination_unknown: &[ItemId],
) -> Result<Vec<(Vec<u8>, RowConflict)>, SchemaError> {
    let rows = |items: &[ItemId]| -> BTreeSet<Vec<u8>> {
        items
            .iter()
            .filter_map(|i| split_unit(i.as_bytes()).map(|(p, _)| p.to_vec()))
            .collect()
    };
    let (source_rows, destination_rows) = (rows(source_unknown), rows(destination_unknown));
    let mut out = Vec::new();
    for prefix in source_rows.intersection(&destination_rows) {
        let (source_row, destination_row) =
            (source.row_state(prefix)?, destination.row_state(prefix)?);
        let (Some(s), Some(d)) = (source_row, destination_row) else {
            continue;
        };
        if s.live == d.live {
            continue;
        }
        let source_updated = s.live;
        let (updated, deleted) = if source_updated { (s, d) } else { (d, s) };
        let winner_is_update = match schema.conflict {
            ConflictRule::SourceWins => source_updated,
            ConflictRule::DestinationWins => !source_updated,
            ConflictRule::LastWriterWins => updated.latest >= deleted.latest,
            ConflictRule::Manual => true,
        };
        if winner_is_update {
            if source_updated {
                source.restamp_row(prefix)?;
            } else {
                destination.restamp_row(prefix)?;
            }
        }
        let winner = match (schema.conflict, winner_is_update == source_updated) {
            (ConflictRule::Manual, _) => Winner::Unresolved,
            (_, true) => Winner::Source,
            (_, false) => Winner::Destination,
        };
        out.push((
            prefix.clone(),
            RowConflict {
                key: key_of_prefix(prefix),
                field: None,
                kind: ConflictType::UpdateDelete,
                source: None,
                destination: None,
                winner,
            },
        ));
    }
    Ok(out)
}

fn session_options(
    schema: &SyncSchema,
    schema_source_sends: bool,
    cancel: &CancelToken,
) -> SessionOptions {
    SessionOptions {
        direction: crate::sync::Direction::Upload,
        policy: policy(schema.conflict, schema_source_sends),
        cancel: cancel.clone(),
        // Counted in rows: a table replica's batches keep each row's units together.
        batch_size: (schema.batch_size as usize).clamp(1, crate::model::MAX_CHANGES_PER_BATCH),
        ..SessionOptions::default()
    }
}

fn record_refused(report: &mut RunReport, apply: &super::ApplyReport) {
    for (key, reason) in &apply.refused {
        // A row refused at open (the retry of an earlier run's) is tried again after
        // the sessions: one row, one error.
        if report
            .errors
            .iter()
            .any(|e| &e.key == key && e.field.is_none())
        {
            continue;
        }
        report.failed += 1;
        report.errors.push(RowError {
            key: key.clone(),
            field: None,
            reason: reason.clone(),
        });
    }
}

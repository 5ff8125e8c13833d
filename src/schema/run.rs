//! One run of one schema: validate, detect, sync in the schema's direction, write back,
//! report. Named datasources come from a TOML file a person can edit.
//!
//! A run changes nothing when it cannot go through: an invalid schema, an unreachable
//! datasource or a detection that would delete more of the other side than the schema
//! allows all end the run as `Failed` before the first commit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::stores::{CsvSource, Datasource, JsonlSource, SqliteSource};
use crate::sync::{
    CancelToken, ConflictPolicy, NoObserver, Resolution, SessionOptions, SessionStats,
};

use super::table::TableReplica;
use super::{
    validate, ConflictRule, Projection, RunStatus, SchemaError, SyncDirection, SyncSchema,
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
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatasourceEntry {
    kind: DatasourceKind,
    /// Relative paths are taken from the config file's folder.
    path: PathBuf,
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
        let path = self.base.join(&entry.path);
        Ok(match entry.kind {
            DatasourceKind::Csv => Box::new(CsvSource::open(name, &path)?),
            DatasourceKind::Jsonl => Box::new(JsonlSource::open(name, &path)?),
            DatasourceKind::Sqlite => Box::new(SqliteSource::open(name, &path)?),
        })
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// What a run did, in the terms of the datasource scenarios.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunReport {
    pub schema: String,
    pub status: RunStatus,
    pub message: String,
    /// Rows found new, changed or gone on the sending side(s), and so sent.
    pub inserted: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Rows the filters left out.
    pub skipped: u64,
    /// Rows that could not be read or written; each has a line in `errors`.
    pub failed: u64,
    pub conflicts: u64,
    pub errors: Vec<String>,
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

/// Runs `schema` once. Metadata of both sides lives under `state_dir/<schema id>/`.
pub fn run_schema(
    schema: &SyncSchema,
    datasources: &Datasources,
    state_dir: &Path,
    cancel: &CancelToken,
) -> RunReport {
    match try_run(schema, datasources, state_dir, cancel) {
        Ok(report) => report,
        Err(e) => RunReport::failed(schema, e.to_string()),
    }
}

fn try_run(
    schema: &SyncSchema,
    datasources: &Datasources,
    state_dir: &Path,
    cancel: &CancelToken,
) -> Result<RunReport, SchemaError> {
    // Validation first, against what the datasources say their entities are.
    let mut source_store = datasources.open(&schema.source.datasource)?;
    let mut destination_store = datasources.open(&schema.destination.datasource)?;
    let source_info = source_store.describe(&schema.source.entity)?;
    let destination_info = destination_store.describe(&schema.destination.entity)?;
    let problems = validate(schema, &source_info, &destination_info);
    if !problems.is_empty() {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        return Ok(RunReport {
            errors: lines.clone(),
            ..RunReport::failed(schema, lines.join("; "))
        });
    }

    let folder = state_dir.join(&schema.id);
    let mut source = TableReplica::open(
        &folder.join("source"),
        source_store,
        &schema.source.entity,
        &schema.source.key,
        Projection::source_side(schema),
    )?;
    let mut destination = TableReplica::open(
        &folder.join("destination"),
        destination_store,
        &schema.destination.entity,
        &schema.destination.key,
        Projection::destination_side(schema),
    )?;

    let (source_sends, destination_sends) = match schema.direction {
        SyncDirection::SourceToDestination => (true, false),
        SyncDirection::DestinationToSource => (false, true),
        SyncDirection::Bidirectional => (true, true),
    };
    let mut report = RunReport {
        schema: schema.id.clone(),
        ..RunReport::default()
    };

    // Detect on every sending side, refuse a mass delete before anything commits.
    let mut detections = Vec::new();
    let (source_rows, destination_rows) = (source.row_count()?, destination.row_count()?);
    for (sends, side, held) in [
        (source_sends, &mut source, destination_rows),
        (destination_sends, &mut destination, source_rows),
    ] {
        if !sends {
            detections.push(None);
            continue;
        }
        let detection = side.scan_changes()?;
        let deleted = detection.report.deleted;
        if deleted > 0 && !schema.allow_mass_delete {
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
        detections.push(Some(detection));
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
    let mut detections = detections.into_iter();
    for (detection, side) in [
        (detections.next().flatten(), &mut source),
        (detections.next().flatten(), &mut destination),
    ] {
        let Some(detection) = detection else { continue };
        let found = side.commit_changes(detection)?;
        report.inserted += found.inserted;
        report.updated += found.updated;
        report.deleted += found.deleted;
        report.skipped += found.filtered;
        for failure in found.failed {
            report.failed += 1;
            report.errors.push(format!(
                "key {}: field {}: {}",
                failure.key.join(", "),
                failure.field,
                failure.reason
            ));
        }
    }

    // Sync in the schema's direction, the schema's policy mapped onto each session.
    let mut sessions: Vec<SessionStats> = Vec::new();
    if source_sends {
        let options = session_options(schema, true, cancel);
        let (stats, apply) = source.send_to(&mut destination, &options, &mut NoObserver)?;
        record_apply(&mut report, &apply);
        sessions.push(stats);
    }
    if destination_sends && !cancel.is_cancelled() {
        let options = session_options(schema, false, cancel);
        let (stats, apply) = destination.send_to(&mut source, &options, &mut NoObserver)?;
        record_apply(&mut report, &apply);
        sessions.push(stats);
    }
    report.conflicts = sessions.iter().map(|s| s.conflicts.total()).sum();
    let cancelled = cancel.is_cancelled() || sessions.iter().any(|s| s.cancelled);
    report.status = if cancelled {
        RunStatus::Cancelled
    } else if report.failed > 0 {
        RunStatus::Partial
    } else {
        RunStatus::Success
    };
    report.message = format!(
        "{} inserted, {} updated, {} deleted, {} skipped, {} failed, {} conflicts",
        report.inserted,
        report.updated,
        report.deleted,
        report.skipped,
        report.failed,
        report.conflicts
    );
    Ok(report)
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
        ..SessionOptions::default()
    }
}

fn record_apply(report: &mut RunReport, apply: &super::ApplyReport) {
    for (key, reason) in &apply.refused {
        report.failed += 1;
        report
            .errors
            .push(format!("key {}: {reason}", key.join(", ")));
    }
}

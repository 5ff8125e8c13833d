//! `knit schema add|update|remove|list|validate|automap` and `knit history`: a schema
//! file and its run history through `SyncManager`, printed for people.
//!
//! Every command names the schema file first; the datasources come from `--datasources
//! FILE` (default `datasources.toml` beside the schema file) and the state from `--state
//! DIR` (default `SyncManager::default_state_dir`). Commands that only read or edit the
//! schema file (list, add without `--automap`, update, remove, history) do not open the
//! datasources at all, so they work where the data is out of reach.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;

use super::{CliResult, Failure};
use crate::schema::{
    ConflictRule, Datasources, Endpoint, RunRecord, RunStatus, SchemaError, SchemaSet,
    SyncDirection, SyncManager, SyncSchema, SyncType,
};
use crate::stores::EntityInfo;

/// The schema file and where its datasources and state are.
#[derive(Args, Debug, Clone)]
pub(super) struct Place {
    /// The schema file (TOML, one [[schema]] table per schema)
    #[arg(value_name = "SCHEMAS.toml")]
    pub file: PathBuf,
    /// Named datasources [default: datasources.toml beside the schema file]
    #[arg(long, value_name = "FILE")]
    pub datasources: Option<PathBuf>,
    /// Metadata and run history [default: NAME.state/ beside NAME.toml]
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
}

/// Whether a command reads the datasources.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// The command describes or syncs entities: the datasources file must load.
    Datasources,
    /// The command reads or edits only the schema file and the history.
    FileOnly,
}

impl Place {
    pub fn datasources_file(&self) -> PathBuf {
        self.datasources
            .clone()
            .unwrap_or_else(|| self.file.with_file_name("datasources.toml"))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(|| SyncManager::default_state_dir(&self.file))
    }

    pub fn load_datasources(&self) -> Result<Datasources, Failure> {
        let file = self.datasources_file();
        Datasources::load(&file).map_err(|e| {
            let hint = if self.datasources.is_none() {
                " (name another file with --datasources FILE)"
            } else {
                ""
            };
            Failure::Error(format!("{}{hint}", error_line(&e)))
        })
    }

    /// The manager of an existing schema file.
    pub fn manager(&self, reach: Reach) -> Result<SyncManager, Failure> {
        if !self.file.is_file() {
            return Err(Failure::Error(format!(
                "{}: no such schema file (knit schema add creates one)",
                self.file.display()
            )));
        }
        self.manager_or_new(reach)
    }

    /// The manager of the schema file, which may not exist yet (the first save makes it).
    fn manager_or_new(&self, reach: Reach) -> Result<SyncManager, Failure> {
        let datasources = match reach {
            Reach::Datasources => self.load_datasources()?,
            Reach::FileOnly => Datasources::default(),
        };
        SyncManager::load(&self.file, datasources, &self.state_dir())
            .map_err(|e| Failure::Error(error_line(&e)))
    }
}

/// A schema error on one line: a file's list of problems is joined with `; `, so that
/// the CLI's rule of one `knit: ...` line per error holds.
pub(super) fn error_line(e: &SchemaError) -> String {
    match e {
        SchemaError::Invalid { file, problems } => format!(
            "{file}: {} problem(s): {} (knit schema validate lists them)",
            problems.len(),
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        ),
        other => other.to_string(),
    }
}

fn schema_failure(e: SchemaError) -> Failure {
    Failure::Error(error_line(&e))
}

#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; boxing the clap fields would only obscure them"
)]
#[derive(Subcommand, Debug)]
pub(super) enum SchemaCommand {
    /// Add a schema (the file is created if missing)
    Add {
        #[command(flatten)]
        place: Place,
        /// The new schema's id
        #[arg(long)]
        id: String,
        /// DATASOURCE:ENTITY:KEY[,KEY...]
        #[arg(long, value_name = "DS:ENTITY:KEY", value_parser = parse_endpoint)]
        source: Endpoint,
        /// DATASOURCE:ENTITY:KEY[,KEY...]
        #[arg(long, value_name = "DS:ENTITY:KEY", value_parser = parse_endpoint)]
        destination: Endpoint,
        /// Map fields with equal names (reads both entities)
        #[arg(long)]
        automap: bool,
        /// How a run finds changes [default: full]
        #[arg(long, value_enum)]
        sync_type: Option<SyncTypeArg>,
        /// Which way rows move [default: source_to_destination]
        #[arg(long, value_enum)]
        direction: Option<DirectionArg>,
        /// Who wins when both sides changed a field [default: source_wins]
        #[arg(long, value_enum)]
        conflict: Option<ConflictArg>,
    },
    /// Change a schema's settings
    Update {
        #[command(flatten)]
        place: Place,
        #[arg(long = "schema", value_name = "ID")]
        id: String,
        /// How a run finds changes
        #[arg(long, value_enum)]
        sync_type: Option<SyncTypeArg>,
        /// Which way rows move
        #[arg(long, value_enum)]
        direction: Option<DirectionArg>,
        /// Who wins when both sides changed a field
        #[arg(long, value_enum)]
        conflict: Option<ConflictArg>,
        /// Rows per batch
        #[arg(long, value_name = "N")]
        batch_size: Option<u32>,
    },
    /// Remove a schema (its metadata and history stay in the state folder)
    Remove {
        #[command(flatten)]
        place: Place,
        #[arg(long = "schema", value_name = "ID")]
        id: String,
    },
    /// List the schemas: id, source -> destination, type, direction, status, last sync
    List {
        #[command(flatten)]
        place: Place,
    },
    /// Check schemas against their datasources; exit 1 if anything is wrong
    Validate {
        #[command(flatten)]
        place: Place,
        /// Check only this schema
        #[arg(long = "schema", value_name = "ID")]
        id: Option<String>,
    },
    /// Pair a schema's fields by name; --write makes them its mappings
    Automap {
        #[command(flatten)]
        place: Place,
        #[arg(long = "schema", value_name = "ID")]
        id: String,
        /// Replace the schema's mappings with the ones found, and save
        #[arg(long)]
        write: bool,
    },
}

// The value names are the schema file's snake_case names, so clap's "possible values"
// list is the file's list. The conversions below are exhaustive both ways: a new
// variant in the library does not compile until it has a name here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(super) enum SyncTypeArg {
    Full,
    Incremental,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(super) enum DirectionArg {
    SourceToDestination,
    DestinationToSource,
    Bidirectional,
}

// The variant names are the file's values (`source_wins`, ...), so they share a postfix.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(super) enum ConflictArg {
    SourceWins,
    DestinationWins,
    LastWriterWins,
    Manual,
}

impl From<SyncTypeArg> for SyncType {
    fn from(a: SyncTypeArg) -> Self {
        match a {
            SyncTypeArg::Full => SyncType::Full,
            SyncTypeArg::Incremental => SyncType::Incremental,
        }
    }
}

impl From<SyncType> for SyncTypeArg {
    fn from(t: SyncType) -> Self {
        match t {
            SyncType::Full => SyncTypeArg::Full,
            SyncType::Incremental => SyncTypeArg::Incremental,
        }
    }
}

impl From<DirectionArg> for SyncDirection {
    fn from(a: DirectionArg) -> Self {
        match a {
            DirectionArg::SourceToDestination => SyncDirection::SourceToDestination,
            DirectionArg::DestinationToSource => SyncDirection::DestinationToSource,
            DirectionArg::Bidirectional => SyncDirection::Bidirectional,
        }
    }
}

impl From<SyncDirection> for DirectionArg {
    fn from(d: SyncDirection) -> Self {
        match d {
            SyncDirection::SourceToDestination => DirectionArg::SourceToDestination,
            SyncDirection::DestinationToSource => DirectionArg::DestinationToSource,
            SyncDirection::Bidirectional => DirectionArg::Bidirectional,
        }
    }
}

impl From<ConflictArg> for ConflictRule {
    fn from(a: ConflictArg) -> Self {
        match a {
            ConflictArg::SourceWins => ConflictRule::SourceWins,
            ConflictArg::DestinationWins => ConflictRule::DestinationWins,
            ConflictArg::LastWriterWins => ConflictRule::LastWriterWins,
            ConflictArg::Manual => ConflictRule::Manual,
        }
    }
}

impl From<ConflictRule> for ConflictArg {
    fn from(c: ConflictRule) -> Self {
        match c {
            ConflictRule::SourceWins => ConflictArg::SourceWins,
            ConflictRule::DestinationWins => ConflictArg::DestinationWins,
            ConflictRule::LastWriterWins => ConflictArg::LastWriterWins,
            ConflictRule::Manual => ConflictArg::Manual,
        }
    }
}

/// The file's name of an enum value, taken from its `ValueEnum` twin.
fn file_name<T: ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// The file's name of a run status.
pub(super) fn status_name(status: RunStatus) -> &'static str {
    match status {
        RunStatus::Never => "never",
        RunStatus::Success => "success",
        RunStatus::Partial => "partial",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "cancelled",
        RunStatus::Interrupted => "interrupted",
    }
}

/// `DATASOURCE:ENTITY:KEY[,KEY...]`.
fn parse_endpoint(text: &str) -> Result<Endpoint, String> {
    let bad = |why: &str| format!("{why}: expected DATASOURCE:ENTITY:KEY[,KEY...], not {text:?}");
    let parts: Vec<&str> = text.splitn(3, ':').collect();
    let [datasource, entity, keys] = parts.as_slice() else {
        return Err(bad("three parts separated by ':'"));
    };
    if datasource.is_empty() || entity.is_empty() {
        return Err(bad("a datasource and an entity name"));
    }
    let key: Vec<String> = keys.split(',').map(|k| k.trim().to_string()).collect();
    if key.iter().any(String::is_empty) {
        return Err(bad("key field names, separated by ','"));
    }
    Ok(Endpoint {
        datasource: datasource.to_string(),
        entity: entity.to_string(),
        key,
        ..Endpoint::default()
    })
}

pub(super) fn dispatch(command: SchemaCommand, out: &mut dyn Write) -> CliResult {
    match command {
        SchemaCommand::Add {
            place,
            id,
            source,
            destination,
            automap,
            sync_type,
            direction,
            conflict,
        } => {
            let mut schema = SyncSchema::new(&id, source, destination);
            let settings = Settings {
                sync_type,
                direction,
                conflict,
                batch_size: None,
            };
            settings.apply(&mut schema);
            add(&place, schema, automap, out)
        }
        SchemaCommand::Update {
            place,
            id,
            sync_type,
            direction,
            conflict,
            batch_size,
        } => {
            let settings = Settings {
                sync_type,
                direction,
                conflict,
                batch_size,
            };
            update(&place, &id, &settings, out)
        }
        SchemaCommand::Remove { place, id } => remove(&place, &id, out),
        SchemaCommand::List { place } => list(&place, out),
        SchemaCommand::Validate { place, id } => validate(&place, id.as_deref(), out),
        SchemaCommand::Automap { place, id, write } => automap(&place, &id, write, out),
    }
}

/// The settings `add` and `update` take from flags; `None` leaves a setting alone.
struct Settings {
    sync_type: Option<SyncTypeArg>,
    direction: Option<DirectionArg>,
    conflict: Option<ConflictArg>,
    batch_size: Option<u32>,
}

impl Settings {
    fn is_empty(&self) -> bool {
        self.sync_type.is_none()
            && self.direction.is_none()
            && self.conflict.is_none()
            && self.batch_size.is_none()
    }

    fn apply(&self, schema: &mut SyncSchema) {
        if let Some(t) = self.sync_type {
            schema.sync_type = t.into();
        }
        if let Some(d) = self.direction {
            schema.direction = d.into();
        }
        if let Some(c) = self.conflict {
            schema.conflict = c.into();
        }
        if let Some(n) = self.batch_size {
            schema.batch_size = n;
        }
    }
}

/// Refuses a schema the file format would not load back (a batch size out of range, an
/// empty id, ...), so that a save never leaves a file the next command rejects. The
/// check is the format's own: write the schema alone and read it back.
fn check_loadable(schema: &SyncSchema) -> CliResult {
    let alone = SchemaSet {
        schemas: vec![schema.clone()],
    };
    let text = alone.to_toml().map_err(schema_failure)?;
    match SchemaSet::from_toml(&text) {
        Ok(_) => Ok(()),
        Err(SchemaError::Invalid { problems, .. }) => Err(Failure::Error(
            problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )),
        Err(e) => Err(schema_failure(e)),
    }
}

fn add(place: &Place, schema: SyncSchema, automap: bool, out: &mut dyn Write) -> CliResult {
    check_loadable(&schema)?;
    let reach = if automap {
        Reach::Datasources
    } else {
        Reach::FileOnly
    };
    let mut manager = place.manager_or_new(reach)?;
    let id = schema.id.clone();
    manager.add(schema).map_err(schema_failure)?;
    if automap {
        let found = manager.automap(&id).map_err(schema_failure)?;
        let mut schema = manager.schema(&id).map_err(schema_failure)?.clone();
        schema.mappings = found.mappings.clone();
        manager.update(schema).map_err(schema_failure)?;
        manager.save().map_err(schema_failure)?;
        writeln!(out, "added schema {id} to {}", place.file.display())?;
        write_automap(out, &id, &found)?;
    } else {
        manager.save().map_err(schema_failure)?;
        writeln!(out, "added schema {id} to {}", place.file.display())?;
        writeln!(
            out,
            "it has no mappings yet: `knit schema automap {} --schema {id} --write` pairs \
             fields by name, or edit the file",
            place.file.display()
        )?;
    }
    Ok(())
}

fn update(place: &Place, id: &str, settings: &Settings, out: &mut dyn Write) -> CliResult {
    if settings.is_empty() {
        return Err(Failure::Error(
            "nothing to update: give --sync-type, --direction, --conflict or --batch-size".into(),
        ));
    }
    let mut manager = place.manager(Reach::FileOnly)?;
    let mut schema = manager.schema(id).map_err(schema_failure)?.clone();
    settings.apply(&mut schema);
    check_loadable(&schema)?;
    manager.update(schema).map_err(schema_failure)?;
    manager.save().map_err(schema_failure)?;
    writeln!(out, "updated schema {id} in {}", place.file.display())?;
    Ok(())
}

fn remove(place: &Place, id: &str, out: &mut dyn Write) -> CliResult {
    let mut manager = place.manager(Reach::FileOnly)?;
    manager.remove(id).map_err(schema_failure)?;
    manager.save().map_err(schema_failure)?;
    writeln!(
        out,
        "removed schema {id} from {} (its metadata and history stay in {})",
        place.file.display(),
        place.state_dir().display()
    )?;
    Ok(())
}

fn list(place: &Place, out: &mut dyn Write) -> CliResult {
    let manager = place.manager(Reach::FileOnly)?;
    if manager.schemas().is_empty() {
        writeln!(out, "no schemas in {}", place.file.display())?;
        return Ok(());
    }
    let mut rows = vec![[
        "id".to_string(),
        "source -> destination".to_string(),
        "type".to_string(),
        "direction".to_string(),
        "status".to_string(),
        "last sync".to_string(),
    ]];
    for s in manager.schemas() {
        rows.push([
            s.id.clone(),
            format!(
                "{}:{} -> {}:{}",
                s.source.datasource,
                s.source.entity,
                s.destination.datasource,
                s.destination.entity
            ),
            file_name(SyncTypeArg::from(s.sync_type)),
            file_name(DirectionArg::from(s.direction)),
            status_name(s.status).to_string(),
            s.last_sync.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    write_table(out, &rows)
}

/// Writes rows as left-aligned columns two spaces apart.
pub(super) fn write_table<const N: usize>(out: &mut dyn Write, rows: &[[String; N]]) -> CliResult {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn validate(place: &Place, only: Option<&str>, out: &mut dyn Write) -> CliResult {
    let file = &place.file;
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::Error(format!("{}: {e}", file.display())))?;
    // The entities the checked schemas name. A file that does not parse has none: its
    // syntax error is the whole answer.
    let mut endpoints: BTreeSet<(String, String)> = BTreeSet::new();
    if let Ok((set, _)) = SchemaSet::from_toml_lenient(&text) {
        if let Some(id) = only {
            if set.get(id).is_none() {
                let known: Vec<&str> = set.schemas.iter().map(|s| s.id.as_str()).collect();
                return Err(Failure::Error(format!(
                    "{}: no schema {id:?} (known: {})",
                    file.display(),
                    known.join(", ")
                )));
            }
        }
        for schema in &set.schemas {
            if only.is_none_or(|id| schema.id == id) {
                for e in [&schema.source, &schema.destination] {
                    endpoints.insert((e.datasource.clone(), e.entity.clone()));
                }
            }
        }
    }
    let datasources = place.load_datasources()?;
    // Each entity is described once, and a datasource that cannot be reached is
    // reported with its own reason (check_toml only learns that the entity is missing).
    let mut described: BTreeMap<(String, String), Result<EntityInfo, String>> = BTreeMap::new();
    let problems = SchemaSet::check_toml(&text, |endpoint| {
        let key = (endpoint.datasource.clone(), endpoint.entity.clone());
        described
            .entry(key)
            .or_insert_with(|| describe(&datasources, endpoint))
            .as_ref()
            .ok()
            .cloned()
    });
    let mut lines: Vec<String> = problems
        .iter()
        .filter(|p| only.is_none_or(|id| p.schema().is_empty() || p.schema() == id))
        .map(|p| match p {
            SchemaError::Syntax { .. } => p.to_string(),
            _ => format!("{}: {p}", file.display()),
        })
        .collect();
    for ((datasource, entity), result) in &described {
        if let (Err(reason), true) = (
            result,
            endpoints.contains(&(datasource.clone(), entity.clone())),
        ) {
            if reason.contains(datasource.as_str()) {
                lines.push(reason.clone());
            } else {
                lines.push(format!(
                    "datasource {datasource}, entity {entity}: {reason}"
                ));
            }
        }
    }
    for line in &lines {
        writeln!(out, "{line}")?;
    }
    if lines.is_empty() {
        let what = match only {
            Some(id) => format!("schema {id} is valid"),
            None => "every schema is valid".to_string(),
        };
        writeln!(out, "{}: {what}", file.display())?;
        Ok(())
    } else {
        Err(Failure::Negative(format!(
            "{}: {} problem(s)",
            file.display(),
            lines.len()
        )))
    }
}

fn describe(datasources: &Datasources, endpoint: &Endpoint) -> Result<EntityInfo, String> {
    let mut store = datasources
        .open(&endpoint.datasource)
        .map_err(|e| e.to_string())?;
    store.describe(&endpoint.entity).map_err(|e| e.to_string())
}

fn automap(place: &Place, id: &str, write: bool, out: &mut dyn Write) -> CliResult {
    let mut manager = place.manager(Reach::Datasources)?;
    let found = manager.automap(id).map_err(schema_failure)?;
    write_automap(out, id, &found)?;
    if write {
        let mut schema = manager.schema(id).map_err(schema_failure)?.clone();
        schema.mappings = found.mappings.clone();
        manager.update(schema).map_err(schema_failure)?;
        manager.save().map_err(schema_failure)?;
        writeln!(
            out,
            "wrote {} mapping(s) into schema {id} of {}",
            found.mappings.len(),
            place.file.display()
        )?;
    }
    Ok(())
}

fn write_automap(out: &mut dyn Write, id: &str, found: &crate::schema::AutoMap) -> CliResult {
    writeln!(
        out,
        "{id}: {} field(s) paired by name",
        found.mappings.len()
    )?;
    for m in &found.mappings {
        writeln!(out, "  {} -> {}", m.source.join(", "), m.destination)?;
    }
    let list = |fields: &[String]| {
        if fields.is_empty() {
            "none".to_string()
        } else {
            fields.join(", ")
        }
    };
    writeln!(
        out,
        "unmapped source fields: {}",
        list(&found.unmapped_source)
    )?;
    writeln!(
        out,
        "unmapped destination fields: {}",
        list(&found.unmapped_destination)
    )?;
    Ok(())
}

pub(super) fn history(
    place: &Place,
    id: Option<&str>,
    json: bool,
    out: &mut dyn Write,
) -> CliResult {
    let manager = place.manager(Reach::FileOnly)?;
    let records = manager.history(id).map_err(schema_failure)?;
    if let Some(id) = id {
        // A removed schema keeps its history, so only an id known nowhere is an error.
        if records.is_empty() && manager.schema(id).is_err() {
            return Err(Failure::Error(format!(
                "{}: no schema {id:?} and no history for it in {}",
                place.file.display(),
                place.state_dir().display()
            )));
        }
    }
    if json {
        for record in &records {
            let line = serde_json::to_string(record)
                .map_err(|e| Failure::Error(format!("history of {}: {e}", record.schema)))?;
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    write_history(out, &records, place)
}

/// The history as a table, then the failed rows' errors.
pub(super) fn write_history(
    out: &mut dyn Write,
    records: &[RunRecord],
    place: &Place,
) -> CliResult {
    if records.is_empty() {
        writeln!(out, "no runs recorded in {}", place.state_dir().display())?;
        return Ok(());
    }
    let mut rows = vec![[
        "started",
        "schema",
        "status",
        "duration",
        "read",
        "ins",
        "upd",
        "del",
        "failed",
        "confl",
        "watermark",
    ]
    .map(String::from)];
    for r in records {
        rows.push([
            r.started.clone(),
            r.schema.clone(),
            r.status.clone(),
            duration_text(r.duration_ms),
            r.rows_read.to_string(),
            r.inserted.to_string(),
            r.updated.to_string(),
            r.deleted.to_string(),
            r.failed.to_string(),
            r.conflicts.to_string(),
            watermark_text(r.watermark_before.as_deref(), r.watermark_after.as_deref()),
        ]);
    }
    write_table(out, &rows)?;
    let failing: Vec<&RunRecord> = records.iter().filter(|r| !r.errors.is_empty()).collect();
    if !failing.is_empty() {
        writeln!(out, "\nerrors:")?;
        for r in failing {
            for error in &r.errors {
                writeln!(out, "  {} {}: {error}", r.started, r.schema)?;
            }
        }
    }
    Ok(())
}

/// `12 ms`, `3.4 s`.
pub(super) fn duration_text(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
    }
}

/// `before -> after`, `-` for none.
pub(super) fn watermark_text(before: Option<&str>, after: Option<&str>) -> String {
    format!("{} -> {}", before.unwrap_or("-"), after.unwrap_or("-"))
}

/// One JSON object for a problem of a schema.
pub(super) fn problem_json(p: &SchemaError) -> serde_json::Value {
    json!({
        "schema": p.schema(),
        "path": p.path(),
        "value": p.value(),
        "suggestion": p.suggestion(),
        "message": p.to_string(),
    })
}

//! The schema file: TOML that people read and edit, one `[[schema]]` table per schema.
//!
//! ```toml
//! [[schema]]
//! id = "customers"
//! sync_type = "incremental"          # full | incremental
//! direction = "bidirectional"        # source_to_destination | destination_to_source | bidirectional
//! conflict = "source_wins"           # source_wins | destination_wins | last_writer_wins | manual
//! on_missing = "soft_delete"         # delete | soft_delete
//! soft_delete_field = "is_deleted"
//! batch_size = 1000                  # rows per batch
//! lookback = 300                     # incremental reads reach this far back
//!
//! [schema.source]
//! datasource = "crm"
//! entity = "customers"
//! key = ["id"]
//! modified_at = "updated_at"         # incremental without triggers (deletes need full)
//! deleted_field = "deleted_at"       # a tombstone column: set means deleted
//!
//! [[schema.mappings]]
//! source = "full_name"               # or a list, with transform = 'JOIN(" ")'
//! destination = "first_name"
//! transform = "SPLIT(0)"
//!
//! [[schema.filters]]
//! field = "created_at"
//! operator = "BETWEEN"
//! value = ["2024-01-01", "2024-12-31"]
//! ```
//!
//! Policy on unknown keys: **rejected**. A key the format does not know is an error with
//! its name, line and column, because the next save would drop it silently (and a
//! misspelt `direktion` would leave the default direction in force).
//!
//! Enum values, transforms and operators are read as text and checked here, so that one
//! load reports every bad value with its schema id, path and a suggestion, instead of
//! stopping at the first as a derived `Deserialize` would.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::model::Named;
use super::suggest::enum_suggestion;
use super::{
    validate, Endpoint, Filter, FilterValue, Mapping, OnMissing, Operator, SchemaError, SchemaSet,
    SyncSchema, Transform,
};
use crate::{EntityInfo, Value};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default, rename = "schema")]
    schemas: Vec<RawSchema>,
}

// Simple values come before tables: TOML needs them above the first `[table]`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchema {
    id: String,
    #[serde(default = "default_sync_type")]
    sync_type: String,
    #[serde(default = "default_direction")]
    direction: String,
    #[serde(default = "default_conflict")]
    conflict: String,
    #[serde(default = "default_on_missing")]
    on_missing: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    soft_delete_field: Option<String>,
    #[serde(default)]
    allow_mass_delete: bool,
    #[serde(default = "default_threshold")]
    mass_delete_threshold_percent: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_errors: Option<i64>,
    #[serde(default = "default_batch_size")]
    batch_size: i64,
    #[serde(default = "default_lookback")]
    lookback: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_sync: Option<String>,
    #[serde(default = "default_status")]
    status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    status_message: String,
    source: RawEndpoint,
    destination: RawEndpoint,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    mappings: Vec<RawMapping>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    filters: Vec<RawFilter>,
}

fn default_sync_type() -> String {
    "full".into()
}
fn default_direction() -> String {
    "source_to_destination".into()
}
fn default_conflict() -> String {
    "source_wins".into()
}
fn default_on_missing() -> String {
    "delete".into()
}
fn default_threshold() -> i64 {
    10
}
fn default_batch_size() -> i64 {
    i64::from(super::model::DEFAULT_BATCH_SIZE)
}
fn default_lookback() -> i64 {
    super::model::DEFAULT_LOOKBACK as i64
}
fn default_status() -> String {
    "never".into()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    datasource: String,
    entity: String,
    key: OneOrMany,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    modified_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted_field: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMapping {
    source: OneOrMany,
    destination: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transform: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    field: String,
    operator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<toml::Value>,
}

/// A name or a list of names; one name is written bare.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

impl SchemaSet {
    /// Reads a schema file. Any problem is an error: a corrupt file gives its line and
    /// column, bad values give [`SchemaError::Invalid`] with every problem found.
    pub fn load(path: &Path) -> Result<SchemaSet, SchemaError> {
        let file = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|e| SchemaError::Io {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        parse_strict(&text, &file)
    }

    /// Parses schema file text (`load` without the file).
    pub fn from_toml(text: &str) -> Result<SchemaSet, SchemaError> {
        parse_strict(text, "<schemas>")
    }

    /// Parses schema file text, keeping going past bad values: returns the schemas (a bad
    /// value replaced by its default, so that validation can go on) and the problems.
    /// Only text that is not a schema file at all (a TOML syntax error, an unknown key,
    /// a wrong type) is an `Err`. For checking a file, never for running it.
    pub fn from_toml_lenient(text: &str) -> Result<(SchemaSet, Vec<SchemaError>), SchemaError> {
        parse_lenient(text, "<schemas>")
    }

    /// Every problem of a schema file: its own, then each schema's against its two
    /// entities, which `entity` looks up (`None`: the entity does not exist). Does no
    /// I/O besides what `entity` does.
    pub fn check_toml(
        text: &str,
        mut entity: impl FnMut(&Endpoint) -> Option<EntityInfo>,
    ) -> Vec<SchemaError> {
        let (set, file_problems) = match parse_lenient(text, "<schemas>") {
            Ok(parsed) => parsed,
            Err(e) => return vec![e],
        };
        let mut problems = file_problems.clone();
        for schema in &set.schemas {
            let mut sides = Vec::new();
            for (side, endpoint) in [
                ("source", &schema.source),
                ("destination", &schema.destination),
            ] {
                match entity(endpoint) {
                    Some(info) => sides.push(info),
                    None => problems.push(SchemaError::InvalidValue {
                        schema: schema.id.clone(),
                        path: format!("{side}.entity"),
                        value: endpoint.entity.clone(),
                        reason: format!("datasource {:?} has no such entity", endpoint.datasource),
                        suggestion: None,
                    }),
                }
            }
            if let [source, destination] = sides.as_slice() {
                // A transform that did not parse was left out; the type and inverse
                // checks of its mapping would only repeat that problem.
                let unparsed: Vec<String> = file_problems
                    .iter()
                    .filter(|p| {
                        matches!(p, SchemaError::BadTransform { .. }) && p.schema() == schema.id
                    })
                    .filter_map(|p| p.path().split('.').next().map(str::to_string))
                    .collect();
                let repeats = |p: &SchemaError| {
                    matches!(
                        p,
                        SchemaError::IncompatibleType { .. } | SchemaError::NoInverse { .. }
                    ) && unparsed
                        .iter()
                        .any(|u| p.path().split('.').next() == Some(u))
                };
                problems.extend(
                    validate(schema, source, destination)
                        .into_iter()
                        .filter(|p| !repeats(p)),
                );
            }
        }
        problems
    }

    /// The file text: deterministic, so saving what was loaded gives the same bytes.
    pub fn to_toml(&self) -> Result<String, SchemaError> {
        let raw = RawFile {
            schemas: self.schemas.iter().map(to_raw).collect::<Result<_, _>>()?,
        };
        toml::to_string(&raw).map_err(|e| SchemaError::Io {
            file: "<schemas>".into(),
            reason: e.to_string(),
        })
    }

    /// Saves atomically: after a crash the file is the old one or the new one, never a
    /// mix. Writes `<file>.tmp`, syncs it, renames it over the file, syncs the folder
    /// (so the rename itself survives a power cut).
    pub fn save(&self, path: &Path) -> Result<(), SchemaError> {
        let text = self.to_toml()?;
        let io = |e: std::io::Error| SchemaError::Io {
            file: path.display().to_string(),
            reason: e.to_string(),
        };
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = Path::new(&tmp_name);
        let mut file = File::create(tmp).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        fs::rename(tmp, path).map_err(io)?;
        #[cfg(unix)]
        {
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(folder).and_then(|f| f.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}

/// The most rows one batch may hold: a row is one to several change units, and a batch
/// holds at most `MAX_CHANGES_PER_BATCH` of them (a batch ends early at that limit).
pub const MAX_BATCH_ROWS: u32 = 10_000;

fn parse_strict(text: &str, file: &str) -> Result<SchemaSet, SchemaError> {
    let (set, problems) = parse_lenient(text, file)?;
    if problems.is_empty() {
        Ok(set)
    } else {
        Err(SchemaError::Invalid {
            file: file.to_string(),
            problems,
        })
    }
}

fn parse_lenient(text: &str, file: &str) -> Result<(SchemaSet, Vec<SchemaError>), SchemaError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((0, 0), |span| line_column(text, span.start));
        SchemaError::Syntax {
            file: file.to_string(),
            line,
            column,
            message: e.message().trim_end().to_string(),
        }
    })?;
    let mut problems = Vec::new();
    let mut schemas = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (index, raw) in raw.schemas.into_iter().enumerate() {
        let label = if raw.id.is_empty() {
            problems.push(SchemaError::InvalidValue {
                schema: format!("schema[{index}]"),
                path: "id".into(),
                value: String::new(),
                reason: "a schema needs an id".into(),
                suggestion: None,
            });
            format!("schema[{index}]")
        } else {
            raw.id.clone()
        };
        if let Some(first) = seen.insert(raw.id.clone(), index) {
            if !raw.id.is_empty() {
                problems.push(SchemaError::InvalidValue {
                    schema: label.clone(),
                    path: "id".into(),
                    value: raw.id.clone(),
                    reason: format!("schema[{first}] has the same id"),
                    suggestion: None,
                });
            }
        }
        schemas.push(from_raw(raw, &label, &mut problems));
    }
    Ok((SchemaSet { schemas }, problems))
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// An enum value by its file name, or the default with a problem naming the value.
fn named<T: Named>(
    value: &str,
    default: T,
    label: &str,
    path: &str,
    problems: &mut Vec<SchemaError>,
) -> T {
    T::from_name(value).unwrap_or_else(|| {
        problems.push(SchemaError::InvalidValue {
            schema: label.to_string(),
            path: path.to_string(),
            value: value.to_string(),
            reason: format!("{path} must be one of {}", T::names().join(", ")),
            suggestion: Some(enum_suggestion(value, &T::names(), T::SYNONYMS)),
        });
        default
    })
}

fn from_raw(raw: RawSchema, label: &str, problems: &mut Vec<SchemaError>) -> SyncSchema {
    let endpoint = |raw: RawEndpoint| Endpoint {
        datasource: raw.datasource,
        entity: raw.entity,
        key: raw.key.into_vec(),
        modified_at: raw.modified_at,
        deleted_field: raw.deleted_field,
    };
    let source = endpoint(raw.source);
    let destination = endpoint(raw.destination);
    let mut schema = SyncSchema::new(&raw.id, source, destination);
    schema.sync_type = named(
        &raw.sync_type,
        schema.sync_type,
        label,
        "sync_type",
        problems,
    );
    schema.direction = named(
        &raw.direction,
        schema.direction,
        label,
        "direction",
        problems,
    );
    schema.conflict = named(&raw.conflict, schema.conflict, label, "conflict", problems);
    schema.status = named(&raw.status, schema.status, label, "status", problems);
    let mut invalid = |path: &str, value: String, reason: &str, suggestion: Option<String>| {
        problems.push(SchemaError::InvalidValue {
            schema: label.to_string(),
            path: path.to_string(),
            value,
            reason: reason.to_string(),
            suggestion,
        })
    };
    schema.on_missing = match (raw.on_missing.as_str(), raw.soft_delete_field) {
        ("delete", None) => OnMissing::Delete,
        ("soft_delete", Some(field)) => OnMissing::SoftDelete { field },
        ("soft_delete", None) => {
            invalid(
                "soft_delete_field",
                String::new(),
                "on_missing = \"soft_delete\" needs the bool field to set",
                Some("add soft_delete_field = \"is_deleted\" (your field's name)".into()),
            );
            OnMissing::Delete
        }
        ("delete", Some(field)) => {
            invalid(
                "soft_delete_field",
                field,
                "only used with on_missing = \"soft_delete\"",
                Some("did you mean on_missing = \"soft_delete\"?".into()),
            );
            OnMissing::Delete
        }
        (other, _) => {
            invalid(
                "on_missing",
                other.to_string(),
                "on_missing must be one of delete, soft_delete",
                Some(enum_suggestion(other, &["delete", "soft_delete"], &[])),
            );
            OnMissing::Delete
        }
    };
    schema.allow_mass_delete = raw.allow_mass_delete;
    match u8::try_from(raw.mass_delete_threshold_percent) {
        Ok(p) if p <= 100 => schema.mass_delete_threshold_percent = p,
        _ => invalid(
            "mass_delete_threshold_percent",
            raw.mass_delete_threshold_percent.to_string(),
            "a percentage from 0 to 100",
            None,
        ),
    }
    match raw.max_errors.map(u32::try_from) {
        None => {}
        Some(Ok(n)) => schema.max_errors = Some(n),
        Some(Err(_)) => invalid(
            "max_errors",
            raw.max_errors.unwrap_or_default().to_string(),
            "a count from 0 to 4294967295 (leave it out for no limit)",
            None,
        ),
    }
    match u32::try_from(raw.batch_size) {
        Ok(n) if (1..=MAX_BATCH_ROWS).contains(&n) => schema.batch_size = n,
        _ => invalid(
            "batch_size",
            raw.batch_size.to_string(),
            &format!("rows per batch, from 1 to {MAX_BATCH_ROWS}"),
            None,
        ),
    }
    match u64::try_from(raw.lookback) {
        Ok(n) => schema.lookback = n,
        Err(_) => invalid(
            "lookback",
            raw.lookback.to_string(),
            "a duration in seconds (or the modified-at column's units), 0 or more",
            None,
        ),
    }
    if let Some(stamp) = &raw.last_sync {
        if !super::transform::is_utc_timestamp(stamp) {
            invalid(
                "last_sync",
                stamp.clone(),
                "a UTC time like 2024-03-05T07:08:09Z",
                None,
            );
        }
    }
    schema.last_sync = raw.last_sync;
    schema.status_message = raw.status_message;
    for (i, m) in raw.mappings.into_iter().enumerate() {
        let transform = m.transform.and_then(|text| match Transform::parse(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(e.at(label, &format!("mappings[{i}].transform")));
                None
            }
        });
        schema.mappings.push(Mapping {
            source: m.source.into_vec(),
            destination: m.destination,
            transform,
        });
    }
    for (i, f) in raw.filters.into_iter().enumerate() {
        let value = match f.value.map(|v| filter_value(v, label, i)) {
            None => FilterValue::None,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                problems.push(e);
                FilterValue::None
            }
        };
        let operator = Operator::parse(&f.operator).unwrap_or_else(|e| {
            problems.push(e.at(label, &format!("filters[{i}].operator")));
            // A stand-in of the value's shape, so that the field and value checks
            // still run and report their own problems.
            match value {
                FilterValue::None => Operator::IsNotNull,
                FilterValue::One(_) => Operator::Eq,
                FilterValue::Many(_) => Operator::In,
            }
        });
        schema.filters.push(Filter {
            field: f.field,
            operator,
            value,
        });
    }
    schema
}

fn filter_value(value: toml::Value, label: &str, index: usize) -> Result<FilterValue, SchemaError> {
    let scalar = |v: toml::Value| match v {
        toml::Value::String(s) => Ok(Value::Text(s)),
        toml::Value::Integer(i) => Ok(Value::Int(i)),
        toml::Value::Float(f) => Ok(Value::Float(f)),
        toml::Value::Boolean(b) => Ok(Value::Bool(b)),
        // A bare TOML date-time means the same as the quoted text.
        toml::Value::Datetime(d) => Ok(Value::Text(d.to_string())),
        other => Err(SchemaError::InvalidValue {
            schema: label.to_string(),
            path: format!("filters[{index}].value"),
            value: other.to_string(),
            reason: "a filter value is text, a number, a bool or a list of them".into(),
            suggestion: None,
        }),
    };
    match value {
        toml::Value::Array(items) => Ok(FilterValue::Many(
            items.into_iter().map(scalar).collect::<Result<_, _>>()?,
        )),
        v => scalar(v).map(FilterValue::One),
    }
}

fn to_raw(schema: &SyncSchema) -> Result<RawSchema, SchemaError> {
    let endpoint = |e: &Endpoint| RawEndpoint {
        datasource: e.datasource.clone(),
        entity: e.entity.clone(),
        key: OneOrMany::Many(e.key.clone()),
        modified_at: e.modified_at.clone(),
        deleted_field: e.deleted_field.clone(),
    };
    let (on_missing, soft_delete_field) = match &schema.on_missing {
        OnMissing::Delete => ("delete", None),
        OnMissing::SoftDelete { field } => ("soft_delete", Some(field.clone())),
    };
    let mut filters = Vec::new();
    for (i, f) in schema.filters.iter().enumerate() {
        let scalar = |v: &Value| match v {
            Value::Null => Err(SchemaError::InvalidValue {
                schema: schema.id.clone(),
                path: format!("filters[{i}].value"),
                value: "null".into(),
                reason: "TOML has no null".into(),
                suggestion: Some("use the operator IS NULL".into()),
            }),
            Value::Bool(b) => Ok(toml::Value::Boolean(*b)),
            Value::Int(n) => Ok(toml::Value::Integer(*n)),
            Value::Float(x) => Ok(toml::Value::Float(*x)),
            Value::Text(s) => Ok(toml::Value::String(s.clone())),
        };
        let value = match &f.value {
            FilterValue::None => None,
            FilterValue::One(v) => Some(scalar(v)?),
            FilterValue::Many(list) => Some(toml::Value::Array(
                list.iter().map(scalar).collect::<Result<_, _>>()?,
            )),
        };
        filters.push(RawFilter {
            field: f.field.clone(),
            operator: f.operator.to_string(),
            value,
        });
    }
    Ok(RawSchema {
        id: schema.id.clone(),
        sync_type: schema.sync_type.name().into(),
        direction: schema.direction.name().into(),
        conflict: schema.conflict.name().into(),
        on_missing: on_missing.into(),
        soft_delete_field,
        allow_mass_delete: schema.allow_mass_delete,
        mass_delete_threshold_percent: i64::from(schema.mass_delete_threshold_percent),
        max_errors: schema.max_errors.map(i64::from),
        batch_size: i64::from(schema.batch_size),
        lookback: i64::try_from(schema.lookback).unwrap_or(i64::MAX),
        last_sync: schema.last_sync.clone(),
        status: schema.status.name().into(),
        status_message: schema.status_message.clone(),
        source: endpoint(&schema.source),
        destination: endpoint(&schema.destination),
        mappings: schema
            .mappings
            .iter()
            .map(|m| RawMapping {
                source: match m.source.as_slice() {
                    [one] => OneOrMany::One(one.clone()),
                    many => OneOrMany::Many(many.to_vec()),
                },
                destination: m.destination.clone(),
                transform: m.transform.as_ref().map(Transform::to_string),
            })
            .collect(),
        filters,
    })
}

//! Datasources: real stores of rows (CSV, JSON Lines, SQLite, ...) that schema-driven
//! sync keeps in step. A datasource knows nothing of versions or knowledge; the engine
//! turns its rows into items and its changes into versions.
//!
//! Contract every implementation keeps (checked by one shared test suite):
//! - `scan` visits every row of an entity exactly once, each with every field of the
//!   entity (absent values as `Value::Null`).
//! - `upsert` and `delete` are idempotent by key: applying the same call twice leaves
//!   the same rows, so a crash between writing a row and committing its metadata can be
//!   repaired by replaying the write.
//! - A row the store refuses (a type error, a constraint) fails alone: the call
//!   returns it in `RowOutcome::Refused` with the store's message and goes on with the
//!   other rows.
//! - Errors name the datasource, the entity and, where there is one, the field.
//! - Change tracking (SQLite, PostgreSQL): `install_tracking` is idempotent and makes
//!   every later insert, update and delete of the entity, by any writer, leave the row's
//!   key in a tracking table with a growing sequence and the store's clock;
//!   `tracked_changes` reads them back. Reading a key twice is harmless (the engine
//!   compares values), missing one is not: that is why reads overlap by a lookback.

use std::collections::BTreeMap;
use std::fmt;

use thiserror::Error;

/// One field's value as datasources exchange it.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The value as text, the way a CSV file or a log line shows it (`Null` is empty).
    pub fn to_text(&self) -> String {
        match self {
            Value::Null => String::new(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Text(s) => s.clone(),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Text(s) => write!(f, "{s:?}"),
            other => f.write_str(&other.to_text()),
        }
    }
}

/// The type a datasource declares (or infers) for a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldType {
    Bool,
    Int,
    Float,
    Text,
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FieldType::Bool => "bool",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Text => "text",
        })
    }
}

/// A field of an entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldInfo {
    pub name: String,
    pub field_type: FieldType,
    pub nullable: bool,
}

/// An entity (a table, a file) and its fields, in the store's order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityInfo {
    pub name: String,
    pub fields: Vec<FieldInfo>,
}

impl EntityInfo {
    pub fn field(&self, name: &str) -> Option<&FieldInfo> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// A row: field name → value.
pub type Row = BTreeMap<String, Value>;

/// What happened to one row of an `upsert` or `delete`.
#[derive(Clone, Debug, PartialEq)]
pub enum RowOutcome {
    Written,
    /// The store refused this row; the other rows of the call went on.
    Refused {
        reason: String,
    },
}

/// Errors of a datasource as a whole (a row the store refuses is a `RowOutcome`).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DatasourceError {
    #[error("datasource {datasource}: entity {entity:?} does not exist")]
    NoSuchEntity { datasource: String, entity: String },
    #[error("datasource {datasource}, entity {entity}: field {field:?} does not exist")]
    NoSuchField {
        datasource: String,
        entity: String,
        field: String,
    },
    #[error("datasource {datasource}, entity {entity}, line {line}: {reason}")]
    BadRow {
        datasource: String,
        entity: String,
        line: u64,
        reason: String,
    },
    #[error("datasource {datasource}: {reason}")]
    Unavailable { datasource: String, reason: String },
    #[error("datasource {datasource}: {reason}")]
    Io { datasource: String, reason: String },
    #[error("datasource {datasource}, entity {entity}: this store has no {what}")]
    Unsupported {
        datasource: String,
        entity: String,
        what: String,
    },
}

/// Where a read of a tracking table stopped: the highest sequence read, and the store's
/// own clock (ms since the Unix epoch) when the read started. The next read takes
/// every change after `sequence` and, to catch writers that took a sequence number
/// before the read but committed after it, every change recorded within the lookback
/// before `time_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackingAnchor {
    pub sequence: i64,
    pub time_ms: i64,
}

/// A store of rows, grouped in entities.
pub trait Datasource: Send {
    /// The datasource's name, as the configuration calls it.
    fn name(&self) -> &str;
    /// The entities this datasource holds.
    fn entities(&mut self) -> Result<Vec<String>, DatasourceError>;
    /// An entity's fields.
    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError>;
    /// Calls `visit` once for every row of `entity`.
    fn scan(
        &mut self,
        entity: &str,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError>;
    /// Inserts each row, or updates the row with the same values of the `key` fields.
    /// An update sets only the fields the row carries (clearing a field takes an
    /// explicit `Value::Null`); an insert leaves the missing fields null (or the store's
    /// default). Returns one outcome per row, in order.
    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError>;
    /// `upsert` for rows that are probably not in the entity yet (rows a sync brings
    /// for the first time): a store may try a cheaper plain insert first. The outcome
    /// is `upsert`'s either way.
    fn upsert_new(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.upsert(entity, key, rows)
    }
    /// Deletes the rows whose `key` fields have these values (absent rows are no
    /// error). Returns one outcome per key, in order.
    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError>;

    /// Whether this store can track changes (`install_tracking`, `tracked_changes`).
    fn supports_tracking(&self) -> bool {
        false
    }

    /// Creates, if absent, the tracking table and the triggers that record the key of
    /// every row of `entity` inserted, updated or deleted from now on (an update that
    /// changes the key records the old key and the new one).
    fn install_tracking(&mut self, entity: &str, key: &[String]) -> Result<(), DatasourceError> {
        let _ = key;
        Err(self.no_tracking(entity))
    }

    /// Calls `visit` with the key (the `key` fields only) of every row changed after
    /// `since.sequence`, or recorded at or after `since.time_ms - lookback_ms`, in
    /// sequence order; a key may come more than once. Returns the anchor for the next
    /// read. `since` = `TrackingAnchor::default()` reads every change recorded so far.
    fn tracked_changes(
        &mut self,
        entity: &str,
        key: &[String],
        since: TrackingAnchor,
        lookback_ms: i64,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<TrackingAnchor, DatasourceError> {
        let _ = (key, since, lookback_ms, visit);
        Err(self.no_tracking(entity))
    }

    /// The anchor a read started now would return if it found nothing: a Full scan
    /// takes it *before* reading, so changes made during the scan are read again.
    fn tracking_anchor(&mut self, entity: &str) -> Result<TrackingAnchor, DatasourceError> {
        Err(self.no_tracking(entity))
    }

    /// Calls `visit` for each row whose `key` fields equal one of `keys` (absent keys
    /// are skipped). The default scans the entity; stores with indexes look rows up.
    fn read_keys(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let wanted: std::collections::BTreeSet<Vec<String>> = keys
            .iter()
            .map(|k| {
                key.iter()
                    .map(|f| k.get(f).map(Value::to_text).unwrap_or_default())
                    .collect()
            })
            .collect();
        self.scan(entity, &mut |row| {
            let k: Vec<String> = key
                .iter()
                .map(|f| row.get(f).map(Value::to_text).unwrap_or_default())
                .collect();
            if wanted.contains(&k) {
                visit(row)
            } else {
                Ok(())
            }
        })
    }

    /// Calls `visit` for each row whose `column` is at or above `lower` (inclusive), the
    /// read of a modified-at column. Values compare as numbers when both are numbers,
    /// else as text. The default scans the entity; SQL stores ask the database.
    fn scan_since(
        &mut self,
        entity: &str,
        column: &str,
        lower: &Value,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let column = column.to_string();
        let lower = lower.clone();
        self.scan(entity, &mut |row| match row.get(&column) {
            Some(v) if at_or_above(v, &lower) => visit(row),
            _ => Ok(()),
        })
    }

    /// The error of a store without change tracking.
    fn no_tracking(&self, entity: &str) -> DatasourceError {
        DatasourceError::Unsupported {
            datasource: self.name().to_string(),
            entity: entity.to_string(),
            what: "change tracking (triggers); use sync_type = \"full\"".to_string(),
        }
    }
}

/// `value >= lower`, as numbers when both are numbers, else as text; null is never.
pub fn at_or_above(value: &Value, lower: &Value) -> bool {
    let number = |v: &Value| match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    };
    if value.is_null() {
        return false;
    }
    match (number(value), number(lower)) {
        (Some(a), Some(b)) => a >= b,
        _ => value.to_text() >= lower.to_text(),
    }
}

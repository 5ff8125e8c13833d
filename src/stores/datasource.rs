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
    /// Deletes the rows whose `key` fields have these values (absent rows are no
    /// error). Returns one outcome per key, in order.
    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError>;
}

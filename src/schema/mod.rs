//! Sync schemas: which fields of which entity go where, transformed and filtered how,
//! and the file people edit to say so. This layer is pure (no datasource, no sled, no
//! clock); its only I/O is reading the schema file and saving it atomically.
//!
//! Invariants:
//! - A schema is checked before any write: [`validate`] reports every problem it finds,
//!   not just the first, each naming the schema id, a JSON-path-like location
//!   (`customers.mappings[2].transform`), the offending value and, where there is one, a
//!   suggestion. An invalid schema never reaches the sync layer.
//! - Transform text round-trips: `Transform::parse(&t.to_string()) == Ok(t)`; the file
//!   stores transforms and filter operators as that text.
//! - A transform never fails on a well-formed schema, only on a row: a value it cannot
//!   convert gives a [`TransformError`] whose text is the row's failure reason
//!   (`cannot convert 'x' to int`), and the other rows go on. An out-of-range `SPLIT`
//!   index gives `Null`, not an error.
//! - A bidirectional schema uses only transforms with an inverse, so what flows back
//!   reproduces what flowed out.
//! - Filters follow SQL: a comparison with `Null` is false; numbers compare numerically
//!   (an `Int` against a `Float` too), text lexically.
//! - The schema file is never half-written: saving writes `<file>.tmp`, syncs it,
//!   renames it over the file and syncs the folder. Loading a corrupt file is an error
//!   with line and column, never an empty list; saving, loading and saving again gives a
//!   byte-identical file.
//! - Unknown keys in the file are rejected, not preserved: a misspelt key
//!   (`direktion = ...`) would otherwise be dropped silently by the next save.
#![allow(
    clippy::result_large_err,
    reason = "schema errors come from a file a person wrote, off every hot path; plain \
              String fields keep them easy to build and to match"
)]

mod automap;
mod file;
mod filter;
mod history;
mod manager;
mod model;
mod projection;
mod rows;
mod run;
mod suggest;
mod table;
mod transform;
mod validate;
mod watermark;

pub use automap::{automap, AutoMap};
pub use filter::{Filter, FilterValue, Operator};
pub use history::{History, RunRecord, DEFAULT_RETENTION};
pub use manager::SyncManager;
pub use model::{
    ConflictRule, Endpoint, Mapping, OnMissing, RunStatus, SchemaSet, SyncDirection, SyncSchema,
    SyncType,
};
pub use projection::{Projection, UnitError, UnitRule};
pub use rows::ApplyReport;
pub use run::{
    run_schema, sync, ConflictType, DatasourceKind, Datasources, RowConflict, RowError, RunPhase,
    RunProgress, RunReport, Winner,
};
pub use table::{DetectMode, DetectReport, Detection, RowFailure, TableReplica};
pub use transform::{Transform, TransformError};
pub use validate::validate;
pub use watermark::Anchor;

use thiserror::Error;

/// Everything that can be wrong with a schema or its file. Located variants carry the
/// schema id, a path inside the schema (`mappings[2].transform`), the offending value
/// and an optional suggestion (`did you mean "full_name"?`).
#[derive(Clone, Debug, Error, PartialEq)]
#[non_exhaustive]
pub enum SchemaError {
    /// A datasource failed as a whole (unreachable, a missing entity, a malformed file);
    /// the message names the datasource, entity and line. Kept as text so this error
    /// stays comparable and clonable like the rest of the layer's.
    #[error("{message}")]
    Datasource { message: String },
    /// The replica that keeps an entity's metadata, or a sync between two, failed.
    #[error("{message}")]
    Store { message: String },
    /// A row or unit that cannot be mapped between a datasource and its replica.
    #[error("{reason}")]
    Table { reason: String },
    /// The file is not valid TOML, or has a key or a type the format does not allow.
    #[error("{file}: line {line}, column {column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {reason}")]
    Io { file: String, reason: String },
    /// The file parsed but its schemas have these problems.
    #[error("{file}: {}", list(problems))]
    Invalid {
        file: String,
        problems: Vec<SchemaError>,
    },
    /// A field that the entity does not have.
    #[error(
        "{}unknown field {value:?} in entity {entity:?}{}",
        loc(schema, path),
        hint(suggestion)
    )]
    UnknownField {
        schema: String,
        path: String,
        value: String,
        entity: String,
        suggestion: Option<String>,
    },
    /// A filter operator outside the known list.
    #[error("{}unknown operator {value:?}{}", loc(schema, path), hint(suggestion))]
    UnknownOperator {
        schema: String,
        path: String,
        value: String,
        suggestion: Option<String>,
    },
    /// A transform whose text does not parse; `column` counts characters from 1.
    #[error(
        "{}cannot parse transform {value:?} at column {column}: {reason}",
        loc(schema, path)
    )]
    BadTransform {
        schema: String,
        path: String,
        value: String,
        column: usize,
        reason: String,
        suggestion: Option<String>,
    },
    /// A value outside what its key allows (an enum value, a threshold, a shape).
    #[error(
        "{}invalid value {value:?}: {reason}{}",
        loc(schema, path),
        hint(suggestion)
    )]
    InvalidValue {
        schema: String,
        path: String,
        value: String,
        reason: String,
        suggestion: Option<String>,
    },
    /// A field whose value's type the other side's field cannot hold.
    #[error(
        "{}{from} value cannot go into {to} field {value:?}{}",
        loc(schema, path),
        hint(suggestion)
    )]
    IncompatibleType {
        schema: String,
        path: String,
        value: String,
        from: crate::FieldType,
        to: crate::FieldType,
        suggestion: Option<String>,
    },
    /// A transform with no inverse on a bidirectional schema.
    #[error(
        "{}{value} has no inverse, so bidirectional schema {schema:?} cannot use it for field {field:?}{}",
        loc(schema, path),
        hint(suggestion)
    )]
    NoInverse {
        schema: String,
        path: String,
        value: String,
        field: String,
        suggestion: Option<String>,
    },
    /// Several mappings write one destination field (reported once per field).
    #[error(
        "{}destination field {value:?} is written by {} mappings: {}{}",
        loc(schema, path),
        mappings.len(),
        mappings.iter().map(|i| format!("mappings[{i}]")).collect::<Vec<_>>().join(", "),
        hint(suggestion)
    )]
    DuplicateDestination {
        schema: String,
        path: String,
        value: String,
        mappings: Vec<usize>,
        suggestion: Option<String>,
    },
    /// A key that is empty, of the wrong length, or not written by any mapping.
    #[error("{}key {value:?}: {reason}{}", loc(schema, path), hint(suggestion))]
    BadKey {
        schema: String,
        path: String,
        value: String,
        reason: String,
        suggestion: Option<String>,
    },
}

impl SchemaError {
    /// The schema id, or `""` for a file-level error.
    pub fn schema(&self) -> &str {
        self.located().map_or("", |l| l.0)
    }

    /// The path inside the schema (`filters[0].operator`), or `""`.
    pub fn path(&self) -> &str {
        self.located().map_or("", |l| l.1)
    }

    /// The offending value as written.
    pub fn value(&self) -> &str {
        self.located().map_or("", |l| l.2)
    }

    pub fn suggestion(&self) -> Option<&str> {
        self.located().and_then(|l| l.3.as_deref())
    }

    /// `schema.path`, as error messages show it.
    pub fn location(&self) -> String {
        let mut s = loc(self.schema(), self.path());
        s.truncate(s.len().saturating_sub(2));
        s
    }

    /// Sets the schema id and prefixes the path, for an error made without knowing
    /// where it sits (`Transform::parse`, `Operator::parse`).
    pub fn at(mut self, schema_id: &str, path_prefix: &str) -> Self {
        if let Some((schema, path)) = self.location_mut() {
            if schema.is_empty() {
                *schema = schema_id.to_string();
            }
            *path = match (path_prefix.is_empty(), path.is_empty()) {
                (true, _) => path.clone(),
                (false, true) => path_prefix.to_string(),
                (false, false) => format!("{path_prefix}.{path}"),
            };
        }
        self
    }

    #[allow(clippy::type_complexity)]
    fn located(&self) -> Option<(&str, &str, &str, &Option<String>)> {
        use SchemaError::*;
        match self {
            Syntax { .. }
            | Io { .. }
            | Invalid { .. }
            | Datasource { .. }
            | Store { .. }
            | Table { .. } => None,
            UnknownField {
                schema,
                path,
                value,
                suggestion,
                ..
            }
            | UnknownOperator {
                schema,
                path,
                value,
                suggestion,
            }
            | BadTransform {
                schema,
                path,
                value,
                suggestion,
                ..
            }
            | InvalidValue {
                schema,
                path,
                value,
                suggestion,
                ..
            }
            | IncompatibleType {
                schema,
                path,
                value,
                suggestion,
                ..
            }
            | NoInverse {
                schema,
                path,
                value,
                suggestion,
                ..
            }
            | DuplicateDestination {
                schema,
                path,
                value,
                suggestion,
                ..
            }
            | BadKey {
                schema,
                path,
                value,
                suggestion,
                ..
            } => Some((schema, path, value, suggestion)),
        }
    }

    fn location_mut(&mut self) -> Option<(&mut String, &mut String)> {
        use SchemaError::*;
        match self {
            Syntax { .. }
            | Io { .. }
            | Invalid { .. }
            | Datasource { .. }
            | Store { .. }
            | Table { .. } => None,
            UnknownField { schema, path, .. }
            | UnknownOperator { schema, path, .. }
            | BadTransform { schema, path, .. }
            | InvalidValue { schema, path, .. }
            | IncompatibleType { schema, path, .. }
            | NoInverse { schema, path, .. }
            | DuplicateDestination { schema, path, .. }
            | BadKey { schema, path, .. } => Some((schema, path)),
        }
    }
}

/// `"customers.filters[0].operator: "`, or less when parts are unknown.
fn loc(schema: &str, path: &str) -> String {
    match (schema.is_empty(), path.is_empty()) {
        (true, true) => String::new(),
        (false, true) => format!("{schema}: "),
        (true, false) => format!("{path}: "),
        (false, false) => format!("{schema}.{path}: "),
    }
}

fn hint(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map_or_else(String::new, |s| format!("; {s}"))
}

fn list(problems: &[SchemaError]) -> String {
    let mut out = format!("{} problem(s)", problems.len());
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

impl From<crate::stores::DatasourceError> for SchemaError {
    fn from(e: crate::stores::DatasourceError) -> Self {
        SchemaError::Datasource {
            message: e.to_string(),
        }
    }
}

impl From<crate::stores::StoreError> for SchemaError {
    fn from(e: crate::stores::StoreError) -> Self {
        SchemaError::Store {
            message: e.to_string(),
        }
    }
}

impl From<crate::sync::SyncError> for SchemaError {
    fn from(e: crate::sync::SyncError) -> Self {
        SchemaError::Store {
            message: e.to_string(),
        }
    }
}

//! A SQLite database as a datasource: entities are its tables.
//!
//! Rules:
//! - `open` never creates a database: a missing file is `Unavailable`, so a mistyped path
//!   cannot look like an empty source.
//! - Entities are the tables of `sqlite_master`, sorted, without SQLite's own
//!   (`sqlite_%`) and without `knit_%`, which knit keeps for itself. Views are not
//!   entities. Names match exactly (SQLite itself ignores case).
//! - `describe` follows `PRAGMA table_info`: a declared type containing `INT` is `Int`,
//!   `BOOL` is `Bool`, `REAL`, `FLOA` or `DOUB` is `Float`, anything else `Text`. A
//!   field is nullable unless it is `NOT NULL` or part of the primary key.
//! - `scan` reads `Bool` fields' integers as booleans. A blob or a text that is not UTF-8
//!   fails the scan with `BadRow`, whose "line" is the 1-based row number in scan order.
//! - `upsert` sets the fields a row carries and leaves the others alone (a new row gets
//!   their defaults), as the file datasources do. One transaction per call, one savepoint
//!   per row: a row that breaks a constraint (NOT NULL, CHECK, UNIQUE, a STRICT type) is
//!   `Refused` with SQLite's message and the other rows commit. With a primary key or
//!   unique index on exactly the key fields, a row carrying every field runs
//!   `INSERT .. ON CONFLICT .. DO UPDATE`; otherwise (no such index, or a partial row,
//!   whose insert SQLite would check for NOT NULL before the conflict) `UPDATE`, then
//!   `INSERT` when no row matched.
//! - A row with a field that is not in the table, or with a key field missing or null,
//!   is `Refused`; a `key` naming a field not in the table fails the call with
//!   `NoSuchField`. Any other SQLite failure fails the call and rolls it back.
//! - Identifiers are quoted; values are always bound, never written into SQL.
//! - `read_keys` looks each key up (`WHERE key = ?`, bound); `scan_since` asks SQLite
//!   (`WHERE column >= ?`), so SQLite's comparison rules apply.
//!
//! Change tracking: one table, `knit_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,
//! entity TEXT, key TEXT, op TEXT, at_ms INTEGER)`, for every tracked entity, because
//! an entity's name may hold any character and a name derived from it could clash;
//! `entity` tells them apart, and indexes on `(entity, seq)` and `(entity, at_ms)` serve
//! the reads. `key` is a JSON object that maps each key field to SQLite's literal of its
//! value (`quote()`: `1`, `'mon'`, `3.000000000000000445e-01`, `NULL`), so a composite key
//! comes back whole, an integer stays apart from a text, and a float key comes back
//! exactly (JSON's own numbers would carry only SQLite's 15 digits); `op` is `insert`,
//! `update` or `delete`; `at_ms` is SQLite's clock (`julianday('now')`) in ms since the
//! Unix epoch. Three triggers per entity, `knit_track_insert_<entity>`,
//! `knit_track_update_<entity>` and `knit_track_delete_<entity>`, write the rows, in
//! the writer's own transaction, whoever the writer is; an update that changes the key
//! records the old key, then the new one. They use only SQL that any SQLite with JSON
//! (3.38 and later, or earlier builds with JSON1) runs, since other programs' SQLite
//! runs them too. `install_tracking` creates what is missing and replaces a trigger
//! whose text differs (a new key), so running it again is harmless; a key field not in
//! the table is `NoSuchField`. Reading changes of an entity without its triggers fails
//! with `Io` rather than finding nothing. SQLite lets one writer at a time commit, so
//! its sequence follows commit order; the lookback costs only a few keys read twice.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::Value as Json;

use super::datasource::{
    Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome, TrackingAnchor,
    Value,
};

/// How long a call waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite's clock in ms since the Unix epoch. `julianday` rather than
/// `unixepoch('subsec')` (3.42+) because the triggers run in every writer's SQLite,
/// however old.
const NOW_MS: &str = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)";

/// The tracking table and its indexes; see the module documentation.
const CREATE_TRACKING: &str = "
    CREATE TABLE IF NOT EXISTS knit_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        entity TEXT NOT NULL,
        key TEXT NOT NULL,
        op TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS knit_changes_entity_seq ON knit_changes (entity, seq);
    CREATE INDEX IF NOT EXISTS knit_changes_entity_at_ms ON knit_changes (entity, at_ms);";

/// A SQLite database; see the module documentation for the rules.
#[derive(Debug)]
pub struct SqliteSource {
    name: String,
    conn: Connection,
}

impl SqliteSource {
    /// Opens the existing database at `path` for reading and writing.
    pub fn open(name: &str, path: &Path) -> Result<Self, DatasourceError> {
        let unavailable = |e: rusqlite::Error| DatasourceError::Unavailable {
            datasource: name.to_string(),
            reason: format!("{}: {e}", path.display()),
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(unavailable)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(unavailable)?;
        // Opening is lazy: read the schema now so that a file that is not a database
        // fails here rather than at the first call.
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
            .map_err(unavailable)?;
        Ok(Self {
            name: name.to_string(),
            conn,
        })
    }

    fn failed(&self, entity: &str, e: rusqlite::Error) -> DatasourceError {
        let reason = format!("entity {entity}: {e}");
        match e.sqlite_error_code() {
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied
                | ErrorCode::NotADatabase,
            ) => DatasourceError::Unavailable {
                datasource: self.name.clone(),
                reason,
            },
            _ => DatasourceError::Io {
                datasource: self.name.clone(),
                reason,
            },
        }
    }

    /// Runs `SELECT <every column> FROM <table> <filter>` with `params` bound and calls
    /// `visit` with each row as `scan` reads it. A row that cannot be read fails the
    /// call with `BadRow`, whose line counts on from `number` (the rows read so far).
    fn select_rows(
        &self,
        table: &Table,
        filter: &str,
        params: impl IntoIterator<Item = SqlValue>,
        number: &mut u64,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let entity = table.name.as_str();
        let sql = format!(
            "SELECT {} FROM {} {filter}",
            table
                .columns
                .iter()
                .map(|c| quote(&c.name))
                .collect::<Vec<_>>()
                .join(", "),
            quote(&table.name)
        );
        let mut stmt = self
            .conn
            .prepare_cached(&sql)
            .map_err(|e| self.failed(entity, e))?;
        let mut rows = stmt
            .query(params_from_iter(params))
            .map_err(|e| self.failed(entity, e))?;
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.failed(entity, e)),
            };
            *number += 1;
            let bad = |reason: String| DatasourceError::BadRow {
                datasource: self.name.clone(),
                entity: entity.to_string(),
                line: *number,
                reason,
            };
            let mut out = Row::new();
            for (i, column) in table.columns.iter().enumerate() {
                let value = match row.get_ref(i).map_err(|e| self.failed(entity, e))? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) if column.field_type() == FieldType::Bool => {
                        Value::Bool(n != 0)
                    }
                    ValueRef::Integer(n) => Value::Int(n),
                    ValueRef::Real(f) => Value::Float(f),
                    ValueRef::Text(bytes) => match std::str::from_utf8(bytes) {
                        Ok(text) => Value::Text(text.to_string()),
                        Err(_) => return Err(bad(format!("field {:?} is not UTF-8", column.name))),
                    },
                    ValueRef::Blob(_) => {
                        return Err(bad(format!(
                            "field {:?} holds a blob, which datasources do not carry",
                            column.name
                        )))
                    }
                };
                out.insert(column.name.clone(), value);
            }
            visit(out)?;
        }
    }

    /// SQLite's clock now, in ms since the Unix epoch.
    fn now_ms(&self, entity: &str) -> Result<i64, DatasourceError> {
        self.conn
            .query_row(&format!("SELECT {NOW_MS}"), [], |row| row.get(0))
            .map_err(|e| self.failed(entity, e))
    }

    /// The table of a tracked entity: fails unless `install_tracking` made its triggers,
    /// so that a forgotten install cannot look like an entity that never changes.
    fn tracked_table(&self, entity: &str, key: &[String]) -> Result<Table, DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, key)?;
        let installed = self
            .conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                [trigger_name("insert", entity)],
                |_| Ok(()),
            )
            .optional()
            .map_err(|e| self.failed(entity, e))?
            .is_some();
        if !installed {
            return Err(DatasourceError::Io {
                datasource: self.name.clone(),
                reason: format!(
                    "entity {entity}: change tracking is not installed (install_tracking)"
                ),
            });
        }
        Ok(table)
    }

    fn table(&self, entity: &str) -> Result<Table, DatasourceError> {
        let exists = is_user_table(entity)
            && self
                .conn
                .query_row(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [entity],
                    |_| Ok(()),
                )
                .optional()
                .map_err(|e| self.failed(entity, e))?
                .is_some();
        if !exists {
            return Err(DatasourceError::NoSuchEntity {
                datasource: self.name.clone(),
                entity: entity.to_string(),
            });
        }
        let read = || -> rusqlite::Result<Table> {
            let mut stmt = self.conn.prepare(
                "SELECT name, type, \"notnull\", pk FROM pragma_table_info(?1) ORDER BY cid",
            )?;
            let columns = stmt
                .query_map([entity], |row| {
                    Ok(Column {
                        name: row.get(0)?,
                        declared: row.get(1)?,
                        not_null: row.get(2)?,
                        primary_key: row.get::<_, i64>(3)? > 0,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut unique_sets: Vec<BTreeSet<String>> = Vec::new();
            let primary: BTreeSet<String> = columns
                .iter()
                .filter(|c| c.primary_key)
                .map(|c| c.name.clone())
                .collect();
            if !primary.is_empty() {
                unique_sets.push(primary);
            }
            // A partial index cannot serve as an ON CONFLICT target without its WHERE,
            // and an expression index has no column names: neither counts.
            let mut indexes = self.conn.prepare(
                "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1 AND partial = 0",
            )?;
            let names = indexes
                .query_map([entity], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut info = self
                .conn
                .prepare("SELECT name FROM pragma_index_info(?1)")?;
            for index in names {
                let cols = info
                    .query_map([&index], |row| row.get::<_, Option<String>>(0))?
                    .collect::<rusqlite::Result<Option<BTreeSet<String>>>>()?;
                if let Some(cols) = cols {
                    unique_sets.push(cols);
                }
            }
            Ok(Table {
                name: entity.to_string(),
                columns,
                unique_sets,
            })
        };
        read().map_err(|e| self.failed(entity, e))
    }
}

fn trigger_name(operation: &str, entity: &str) -> String {
    format!("knit_track_{operation}_{entity}")
}

/// The `CREATE TRIGGER` statements that track `table` by `key`, by trigger name. The
/// text is compared with `sqlite_master.sql`, which keeps it as written, to find
/// triggers made for another key.
fn tracking_triggers(table: &str, key: &[String]) -> Vec<(String, String)> {
    let entity = literal(table);
    let key_json = |row: &str| {
        let pairs: Vec<String> = key
            .iter()
            .map(|k| format!("{}, quote({row}.{})", literal(k), quote(k)))
            .collect();
        format!("json_object({})", pairs.join(", "))
    };
    let record = |row: &str, op: &str| {
        format!(
            "INSERT INTO knit_changes (entity, key, op, at_ms) SELECT {entity}, {}, '{op}', {NOW_MS}",
            key_json(row)
        )
    };
    let key_changed: Vec<String> = key
        .iter()
        .map(|k| format!("OLD.{0} IS NOT NEW.{0}", quote(k)))
        .collect();
    let target = quote(table);
    let trigger = |operation: &str, event: &str, body: String| {
        let name = trigger_name(operation, table);
        let sql = format!(
            "CREATE TRIGGER {} AFTER {event} ON {target} BEGIN {body}; END",
            quote(&name)
        );
        (name, sql)
    };
    vec![
        trigger("insert", "INSERT", record("NEW", "insert")),
        trigger(
            "update",
            "UPDATE",
            format!(
                "{} WHERE {}; {}",
                record("OLD", "update"),
                key_changed.join(" OR "),
                record("NEW", "update")
            ),
        ),
        trigger("delete", "DELETE", record("OLD", "delete")),
    ]
}

/// A text for SQL where a value cannot be bound (a trigger's body): single-quoted, with
/// inner quotes doubled.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A tracked key read back: the JSON object the triggers wrote, each field's SQL literal
/// turned into the value `scan` would read. A field the object lacks (tracking installed
/// for another key) reads as null.
fn decode_key(table: &Table, key: &[String], text: &str) -> Result<Row, String> {
    let object: serde_json::Map<String, Json> =
        serde_json::from_str(text).map_err(|e| format!("tracked key {text:?}: {e}"))?;
    let mut row = Row::new();
    for field in key {
        let is_bool = table
            .columns
            .iter()
            .any(|c| &c.name == field && c.field_type() == FieldType::Bool);
        let value = match object.get(field) {
            None => Value::Null,
            Some(Json::String(literal)) => from_literal(literal, is_bool)
                .ok_or_else(|| format!("tracked key {text:?}: field {field:?} holds {literal}"))?,
            Some(other) => {
                return Err(format!(
                    "tracked key {text:?}: field {field:?} holds {other}"
                ))
            }
        };
        row.insert(field.clone(), value);
    }
    Ok(row)
}

/// The value of one of SQLite's `quote()` literals, or `None` for a blob (which no
/// datasource carries) or a text that is no such literal. Rust's float parsing is exact,
/// so a real comes back bit for bit.
fn from_literal(literal: &str, is_bool: bool) -> Option<Value> {
    if literal == "NULL" {
        return Some(Value::Null);
    }
    if let Some(inner) = literal
        .strip_prefix('\'')
        .and_then(|rest| rest.strip_suffix('\''))
    {
        return Some(Value::Text(inner.replace("''", "'")));
    }
    if let Ok(i) = literal.parse::<i64>() {
        return Some(if is_bool {
            Value::Bool(i != 0)
        } else {
            Value::Int(i)
        });
    }
    literal.parse::<f64>().ok().map(Value::Float)
}

fn is_user_table(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !lower.starts_with("sqlite_") && !lower.starts_with("knit_")
}

/// An identifier for SQL: double-quoted, with inner quotes doubled.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

fn bind(value: &Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Int(i) => SqlValue::Integer(*i),
        Value::Float(f) => SqlValue::Real(*f),
        Value::Text(s) => SqlValue::Text(s.clone()),
    }
}

/// SQLite's message when it refused a row for the row's own sake, else `None` (the
/// failure is the store's and fails the call).
fn refusal(e: &rusqlite::Error) -> Option<String> {
    match e {
        rusqlite::Error::SqliteFailure(failure, message)
            if matches!(
                failure.code,
                ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig
            ) =>
        {
            Some(message.clone().unwrap_or_else(|| failure.to_string()))
        }
        _ => None,
    }
}

#[derive(Debug)]
struct Column {
    name: String,
    declared: String,
    not_null: bool,
    primary_key: bool,
}

impl Column {
    fn field_type(&self) -> FieldType {
        let declared = self.declared.to_ascii_uppercase();
        if declared.contains("INT") {
            FieldType::Int
        } else if declared.contains("BOOL") {
            FieldType::Bool
        } else if ["REAL", "FLOA", "DOUB"]
            .iter()
            .any(|t| declared.contains(t))
        {
            FieldType::Float
        } else {
            FieldType::Text
        }
    }
}

#[derive(Debug)]
struct Table {
    name: String,
    columns: Vec<Column>,
    /// The column sets of the primary key and of each full unique index.
    unique_sets: Vec<BTreeSet<String>>,
}

impl Table {
    fn has(&self, field: &str) -> bool {
        self.columns.iter().any(|c| c.name == field)
    }

    fn check_key(&self, datasource: &str, key: &[String]) -> Result<(), DatasourceError> {
        match key.iter().find(|k| !self.has(k)) {
            Some(field) => Err(DatasourceError::NoSuchField {
                datasource: datasource.to_string(),
                entity: self.name.clone(),
                field: field.clone(),
            }),
            None => Ok(()),
        }
    }

    fn key_is_unique(&self, key: &[String]) -> bool {
        let key: BTreeSet<String> = key.iter().cloned().collect();
        self.unique_sets.contains(&key)
    }

    /// Why a row (or a key) cannot be written, before SQLite sees it.
    fn check_row(&self, key: &[String], row: &Row) -> Result<(), String> {
        if key.is_empty() {
            return Err("no key fields were given".into());
        }
        if let Some(field) = row.keys().find(|f| !self.has(f)) {
            return Err(format!("field {field:?} is not in entity {:?}", self.name));
        }
        if let Some(field) = key.iter().find(|k| row.get(*k).is_none_or(Value::is_null)) {
            return Err(format!("key field {field:?} is missing or null"));
        }
        if let Some((field, _)) = row
            .iter()
            .find(|(_, v)| matches!(v, Value::Float(f) if f.is_nan()))
        {
            // SQLite would store NaN as NULL.
            return Err(format!("field {field:?}: SQLite cannot hold NaN"));
        }
        Ok(())
    }

    fn key_condition(key: &[String]) -> String {
        key.iter()
            .map(|k| format!("{} = ?", quote(k)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }
}

/// Writes one row inside the caller's savepoint.
fn upsert_row(
    conn: &Connection,
    table: &Table,
    key: &[String],
    row: &Row,
    unique: bool,
) -> rusqlite::Result<()> {
    let entity = quote(&table.name);
    let columns: Vec<&String> = row.keys().collect();
    let others: Vec<&String> = columns
        .iter()
        .copied()
        .filter(|c| !key.contains(c))
        .collect();
    let insert = format!(
        "INSERT INTO {entity} ({}) VALUES ({})",
        columns
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", "),
        vec!["?"; columns.len()].join(", ")
    );
    let values = || row.values().map(bind);
    let key_values = || key.iter().map(|k| bind(&row[k]));
    // SQLite checks NOT NULL on the row it would insert before it looks for a conflict,
    // so a row that leaves out a NOT NULL field would be refused even when it only
    // updates: such rows take the UPDATE-then-INSERT path.
    if unique && row.len() == table.columns.len() {
        let action = if others.is_empty() {
            "NOTHING".to_string()
        } else {
            let sets: Vec<String> = others
                .iter()
                .map(|c| format!("{0} = excluded.{0}", quote(c)))
                .collect();
            format!("UPDATE SET {}", sets.join(", "))
        };
        let targets: Vec<String> = key.iter().map(|k| quote(k)).collect();
        let sql = format!("{insert} ON CONFLICT ({}) DO {action}", targets.join(", "));
        conn.prepare_cached(&sql)?
            .execute(params_from_iter(values()))?;
        return Ok(());
    }
    let condition = Table::key_condition(key);
    let matched = if others.is_empty() {
        let sql = format!("SELECT count(*) FROM {entity} WHERE {condition}");
        conn.prepare_cached(&sql)?
            .query_row(params_from_iter(key_values()), |r| r.get::<_, i64>(0))?
    } else {
        let sets: Vec<String> = others.iter().map(|c| format!("{} = ?", quote(c))).collect();
        let sql = format!("UPDATE {entity} SET {} WHERE {condition}", sets.join(", "));
        let params = others.iter().map(|c| bind(&row[*c])).chain(key_values());
        let changed = conn
            .prepare_cached(&sql)?
            .execute(params_from_iter(params))?;
        i64::try_from(changed).unwrap_or(i64::MAX)
    };
    if matched == 0 {
        conn.prepare_cached(&insert)?
            .execute(params_from_iter(values()))?;
    }
    Ok(())
}

impl Datasource for SqliteSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn entities(&mut self) -> Result<Vec<String>, DatasourceError> {
        let read = || -> rusqlite::Result<Vec<String>> {
            let mut stmt = self
                .conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?;
            let names = stmt
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(names.into_iter().filter(|n| is_user_table(n)).collect())
        };
        read().map_err(|e| self.failed("*", e))
    }

    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError> {
        let table = self.table(entity)?;
        let fields = table
            .columns
            .iter()
            .map(|c| FieldInfo {
                name: c.name.clone(),
                field_type: c.field_type(),
                nullable: !c.not_null && !c.primary_key,
            })
            .collect();
        Ok(EntityInfo {
            name: table.name,
            fields,
        })
    }

    fn scan(
        &mut self,
        entity: &str,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let table = self.table(entity)?;
        self.select_rows(&table, "", [], &mut 0, visit)
    }

    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, key)?;
        let unique = table.key_is_unique(key);
        let outcomes = per_row(&mut self.conn, rows, |savepoint, row| {
            if let Err(reason) = table.check_row(key, row) {
                return Ok(Err(reason));
            }
            upsert_row(savepoint, &table, key, row, unique).map(Ok)
        })
        .map_err(|e| self.failed(entity, e))?;
        Ok(outcomes)
    }

    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, key)?;
        let sql = format!(
            "DELETE FROM {} WHERE {}",
            quote(&table.name),
            Table::key_condition(key)
        );
        // A foreign key or a trigger may refuse a deletion, like a constraint an upsert.
        let outcomes = per_row(&mut self.conn, keys, |savepoint, row| {
            // Fields other than the key's are ignored, as the file datasources do.
            let key_only: Row = row
                .iter()
                .filter(|(field, _)| key.contains(field))
                .map(|(f, v)| (f.clone(), v.clone()))
                .collect();
            if let Err(reason) = table.check_row(key, &key_only) {
                return Ok(Err(reason));
            }
            let params = key.iter().map(|k| bind(&key_only[k]));
            savepoint
                .prepare_cached(&sql)
                .and_then(|mut stmt| stmt.execute(params_from_iter(params)))
                .map(|_| Ok(()))
        })
        .map_err(|e| self.failed(entity, e))?;
        Ok(outcomes)
    }

    fn supports_tracking(&self) -> bool {
        true
    }

    fn install_tracking(&mut self, entity: &str, key: &[String]) -> Result<(), DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, key)?;
        if key.is_empty() {
            return Err(DatasourceError::Unsupported {
                datasource: self.name.clone(),
                entity: entity.to_string(),
                what: "change tracking without key fields".to_string(),
            });
        }
        let install = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(CREATE_TRACKING)?;
            for (name, sql) in tracking_triggers(&table.name, key) {
                let existing: Option<String> = tx
                    .query_row(
                        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ?1",
                        [&name],
                        |row| row.get(0),
                    )
                    .optional()?;
                if existing.as_deref() != Some(sql.as_str()) {
                    tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote(&name)))?;
                    tx.execute_batch(&sql)?;
                }
            }
            tx.commit()
        };
        install(&mut self.conn).map_err(|e| self.failed(entity, e))
    }

    fn tracked_changes(
        &mut self,
        entity: &str,
        key: &[String],
        since: TrackingAnchor,
        lookback_ms: i64,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<TrackingAnchor, DatasourceError> {
        let table = self.tracked_table(entity, key)?;
        let started_ms = self.now_ms(entity)?;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, key FROM knit_changes
                 WHERE entity = ?1 AND (seq > ?2 OR at_ms >= ?3) ORDER BY seq",
            )
            .map_err(|e| self.failed(entity, e))?;
        let lower_ms = since.time_ms.saturating_sub(lookback_ms);
        let mut rows = stmt
            .query(rusqlite::params![entity, since.sequence, lower_ms])
            .map_err(|e| self.failed(entity, e))?;
        let mut sequence = since.sequence;
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(e) => return Err(self.failed(entity, e)),
            };
            let (seq, text): (i64, String) = row
                .get(0)
                .and_then(|seq| Ok((seq, row.get(1)?)))
                .map_err(|e| self.failed(entity, e))?;
            let changed =
                decode_key(&table, key, &text).map_err(|reason| DatasourceError::BadRow {
                    datasource: self.name.clone(),
                    entity: entity.to_string(),
                    line: u64::try_from(seq).unwrap_or(0),
                    reason: format!("knit_changes seq {seq}: {reason}"),
                })?;
            sequence = sequence.max(seq);
            visit(changed)?;
        }
        Ok(TrackingAnchor {
            sequence,
            time_ms: started_ms,
        })
    }

    fn tracking_anchor(&mut self, entity: &str) -> Result<TrackingAnchor, DatasourceError> {
        self.tracked_table(entity, &[])?;
        let time_ms = self.now_ms(entity)?;
        let sequence = self
            .conn
            .query_row(
                "SELECT coalesce(max(seq), 0) FROM knit_changes WHERE entity = ?1",
                [entity],
                |row| row.get(0),
            )
            .map_err(|e| self.failed(entity, e))?;
        Ok(TrackingAnchor { sequence, time_ms })
    }

    fn read_keys(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, key)?;
        if key.is_empty() {
            return Ok(());
        }
        let filter = format!("WHERE {}", Table::key_condition(key));
        // A key asked twice is read once, as a scan would find its row once.
        let mut seen = BTreeSet::new();
        let mut number = 0;
        for wanted in keys {
            // A null or missing key field matches no row (`= NULL` is never true).
            let Some(values) = key
                .iter()
                .map(|k| wanted.get(k).filter(|v| !v.is_null()))
                .collect::<Option<Vec<&Value>>>()
            else {
                continue;
            };
            if !seen.insert(format!("{values:?}")) {
                continue;
            }
            let params = values.into_iter().map(bind);
            self.select_rows(&table, &filter, params, &mut number, visit)?;
        }
        Ok(())
    }

    fn scan_since(
        &mut self,
        entity: &str,
        column: &str,
        lower: &Value,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, &[column.to_string()])?;
        let column = quote(column);
        if lower.is_null() {
            // Every value is at or above nothing, but a null value never is.
            let filter = format!("WHERE {column} IS NOT NULL");
            return self.select_rows(&table, &filter, [], &mut 0, visit);
        }
        let filter = format!("WHERE {column} >= ?");
        self.select_rows(&table, &filter, [bind(lower)], &mut 0, visit)
    }
}

/// Writes each item in one transaction, each under a savepoint of its own: an item the
/// store refuses (a constraint, a type check: see `refusal`), or that `write` refuses
/// before writing (`Ok(Err(reason))`), rolls back alone and is reported; any other
/// error rolls back the whole call.
fn per_row<T>(
    conn: &mut Connection,
    items: &[T],
    mut write: impl FnMut(&rusqlite::Savepoint<'_>, &T) -> rusqlite::Result<Result<(), String>>,
) -> rusqlite::Result<Vec<RowOutcome>> {
    let mut outcomes = Vec::with_capacity(items.len());
    let mut tx = conn.transaction()?;
    for item in items {
        let savepoint = tx.savepoint()?;
        match write(&savepoint, item) {
            Ok(Ok(())) => {
                savepoint.commit()?;
                outcomes.push(RowOutcome::Written);
            }
            // Dropping the savepoint rolls the item back.
            Ok(Err(reason)) => outcomes.push(RowOutcome::Refused { reason }),
            Err(e) => match refusal(&e) {
                Some(reason) => outcomes.push(RowOutcome::Refused { reason }),
                None => return Err(e),
            },
        }
    }
    tx.commit()?;
    Ok(outcomes)
}

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

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{params_from_iter, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::datasource::{
    Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome, Value,
};

/// How long a call waits for another connection's lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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
        let sql = format!(
            "SELECT {} FROM {}",
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
            .prepare(&sql)
            .map_err(|e| self.failed(entity, e))?;
        let mut rows = stmt.query([]).map_err(|e| self.failed(entity, e))?;
        let mut number = 0u64;
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.failed(entity, e)),
            };
            number += 1;
            let bad = |reason: String| DatasourceError::BadRow {
                datasource: self.name.clone(),
                entity: entity.to_string(),
                line: number,
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

//! A PostgreSQL schema as a datasource: entities are its tables.
//!
//! Rules:
//! - `connect` opens one connection (the synchronous client, no TLS) and checks that the
//!   schema exists (default `public`): a server that cannot be reached or refuses the
//!   login, and a missing schema, are `Unavailable`, so a mistyped name cannot look like
//!   an empty source. The reason names the host, port, user and database, never the
//!   password: it is built from the parsed settings, not from the connection string.
//! - Entities are the schema's tables (ordinary and partitioned; not partitions, views
//!   or foreign tables), sorted by name, without `knit_%` (any case), which knit keeps
//!   for itself. Names match exactly.
//! - `describe` follows the column types: `int2`, `int4`, `int8` are `Int`; `float4`,
//!   `float8`, `numeric` are `Float`; `bool` is `Bool`; anything else (text, varchar,
//!   timestamps, uuid, json, domains, enums, ...) is `Text`. A field is nullable unless
//!   it is `NOT NULL` (PostgreSQL makes primary key columns so).
//! - `scan` reads an `Int` field as `int8`, a `Float` as `float8` (a `numeric` beyond
//!   an `f64` loses digits) and a `Text` field as PostgreSQL's text form of the value
//!   (`::text`). The connection sets `DateStyle` ISO and `TimeZone` UTC, so a
//!   `timestamptz` reads `2024-05-01 10:00:00+00` whatever the server's settings.
//! - `upsert` sets the fields a row carries and leaves the others alone (a new row gets
//!   their defaults). One transaction per call, one savepoint per row: a row PostgreSQL
//!   refuses, for a data error (SQLSTATE class 22: a value that does not parse as its
//!   column's type, out of range, too long), an integrity constraint (class 23: NOT
//!   NULL, CHECK, UNIQUE, a foreign key) or a trigger's `RAISE` (P0001), is `Refused`
//!   with PostgreSQL's message and the other rows commit. With a primary key or a
//!   unique index (immediate, not partial, no expression) on exactly the key fields, a
//!   row carrying every field runs `INSERT .. ON CONFLICT .. DO UPDATE`; otherwise (no
//!   such index, or a partial row, whose insert PostgreSQL checks for NOT NULL before
//!   the conflict) `UPDATE`, then `INSERT` when no row matched.
//! - Values are always bound, as text, and cast to the column's type in SQL
//!   (`CAST($1::text AS bigint)`), so a value converts as PostgreSQL's input of that type
//!   does, as SQLite's column affinity converts: the text "36" into an int column is 36,
//!   the text "x" is refused with PostgreSQL's message, a float into an int column is
//!   kept when it is whole and refused otherwise, and a bool into a number column is 1
//!   or 0. The cast leaves out the column's modifier, so a too-long text for a
//!   `varchar(3)` is refused rather than cut.
//! - A row with a field that is not in the table, or with a key field missing or null,
//!   is `Refused`; a `key` naming a field not in the table fails the call with
//!   `NoSuchField`. Any other failure fails the call and rolls it back; a lost
//!   connection is `Unavailable`.
//! - Identifiers are quoted and qualified with the schema.
//! - `read_keys` looks each key up (`WHERE key = CAST($1 ..)`); a key whose value cannot
//!   be one of the column's (the text "x" for an int key) matches no row. `scan_since`
//!   asks PostgreSQL (`WHERE column >= CAST($1 ..)`), so a timestamp compares as a time.
//!
//! Change tracking: one table per schema, `knit_changes (seq bigserial PRIMARY KEY,
//! entity text, key text, op text, at_ms bigint)`, with indexes on `(entity, seq)` and
//! `(entity, at_ms)`, as in the SQLite store (an entity's name may hold any character,
//! so no name is derived from it). One PL/pgSQL function, `knit_track()`, serves every
//! entity: each tracked table has a row trigger `knit_track` (AFTER INSERT OR UPDATE OR
//! DELETE) that passes the key field names as arguments; the function records the key
//! as a JSON object of those fields (`to_jsonb(NEW)`), `op` (an update that changes the
//! key records the old key, then the new one) and `at_ms` from `clock_timestamp()`, the
//! time of the write. A read turns each key back into the table's row type
//! (`jsonb_populate_record`) and reads it as `scan` does, so a tracked key has the very
//! values a scan shows. `install_tracking` creates what is missing and replaces the
//! trigger when it was made for another key, all in one transaction.
//!
//! A sequence number is taken when a row is written, not when its transaction commits:
//! a transaction can take number 5, a later one 6 and commit first, and a read in
//! between sees 6 and moves its anchor past 5. The next read's lookback (every change
//! recorded since the previous read's start less `lookback_ms`) is what finds 5 once it
//! commits; a lookback longer than the longest write transaction misses nothing.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use postgres::config::Host;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Statement, Transaction};

use super::datasource::{
    Datasource, DatasourceError, EntityInfo, FieldInfo, FieldType, Row, RowOutcome, TrackingAnchor,
    Value,
};

/// How long `connect` waits for the server when the connection string sets no
/// `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's clock in ms since the Unix epoch (`clock_timestamp`, not `now()`, which
/// stands still for a whole transaction).
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// The name of each tracked table's trigger (PostgreSQL scopes trigger names by table).
const TRIGGER: &str = "knit_track";

/// The trigger function, schema-independent: it finds the tracking table in the schema
/// of the table it fires for. `$1`-style parameters (`USING`) keep every value bound.
const TRACK_FUNCTION_BODY: &str = r#"
DECLARE
    old_key text;
    new_key text;
    at_ms bigint := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    record_change text := format(
        'INSERT INTO %I.knit_changes (entity, key, op, at_ms) VALUES ($1, $2, $3, $4)',
        TG_TABLE_SCHEMA);
BEGIN
    IF TG_OP <> 'INSERT' THEN
        SELECT jsonb_object_agg(f, to_jsonb(OLD) -> f)::text INTO old_key
        FROM unnest(TG_ARGV) AS f;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        SELECT jsonb_object_agg(f, to_jsonb(NEW) -> f)::text INTO new_key
        FROM unnest(TG_ARGV) AS f;
    END IF;
    IF TG_OP = 'UPDATE' AND old_key IS DISTINCT FROM new_key THEN
        EXECUTE record_change USING TG_TABLE_NAME, old_key, 'update', at_ms;
    END IF;
    EXECUTE record_change USING TG_TABLE_NAME, coalesce(new_key, old_key), lower(TG_OP), at_ms;
    RETURN NULL;
END
"#;

/// A PostgreSQL schema; see the module documentation for the rules.
pub struct PostgresSource {
    name: String,
    schema: String,
    client: Client,
    /// The description the last write read, reused by the writes that follow while
    /// they succeed (a sync writes one entity in many calls; reading the catalog each
    /// time cost three queries a call). A failed write forgets it.
    write_table: Option<(String, std::sync::Arc<Table>)>,
}

impl fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSource")
            .field("name", &self.name)
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl PostgresSource {
    /// Connects with `conninfo` (`host=.. port=.. user=.. dbname=..`, or a
    /// `postgresql://` URL) to the tables of `schema` (default `public`).
    pub fn connect(
        name: &str,
        conninfo: &str,
        schema: Option<&str>,
    ) -> Result<Self, DatasourceError> {
        let schema = schema.unwrap_or("public");
        let unavailable = |reason: String| DatasourceError::Unavailable {
            datasource: name.to_string(),
            reason,
        };
        let mut config: Config = conninfo
            .parse()
            .map_err(|e: postgres::Error| unavailable(error_text(&e)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("knit");
        }
        let target = describe_target(&config);
        let fail = |e: postgres::Error| unavailable(format!("{target}: {}", error_text(&e)));
        let mut client = config.connect(NoTls).map_err(fail)?;
        // Fixed text forms, whatever the server's defaults, so that a timestamp reads the
        // same from every server; literals in DDL (trigger arguments) rely on
        // standard_conforming_strings.
        client
            .batch_execute(
                "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
                 SET TimeZone = 'UTC'; SET standard_conforming_strings = on",
            )
            .map_err(fail)?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
            .map_err(fail)?
            .is_some();
        if !exists {
            return Err(unavailable(format!(
                "{target}: schema {schema:?} does not exist"
            )));
        }
        Ok(Self {
            name: name.to_string(),
            schema: schema.to_string(),
            client,
            write_table: None,
        })
    }

    fn failed(&self, entity: &str, e: postgres::Error) -> DatasourceError {
        let reason = format!("entity {entity}: {}", error_text(&e));
        let class = e.code().map(|c| c.code().get(..2).unwrap_or_default());
        // A broken socket, or SQLSTATE 08 connection exception, 53 insufficient
        // resources, 57 operator intervention (a shutdown, a cancelled query): the
        // server, not the request, is at fault.
        let broken = std::error::Error::source(&e).is_some_and(|c| c.is::<std::io::Error>());
        if e.is_closed() || broken || matches!(class, Some("08" | "53" | "57")) {
            DatasourceError::Unavailable {
                datasource: self.name.clone(),
                reason,
            }
        } else {
            DatasourceError::Io {
                datasource: self.name.clone(),
                reason,
            }
        }
    }

    /// `"schema"."name"`.
    fn qualified(&self, name: &str) -> String {
        format!("{}.{}", quote(&self.schema), quote(name))
    }

    fn table(&mut self, entity: &str) -> Result<Table, DatasourceError> {
        let read = |client: &mut Client, schema: &str| -> Result<Option<Table>, postgres::Error> {
            let Some(found) = client.query_opt(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2
                   AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
                &[&schema, &entity],
            )?
            else {
                return Ok(None);
            };
            let oid: u32 = found.try_get(0)?;
            let columns = client
                .query(
                    "SELECT a.attname::text, t.typname::text, format_type(a.atttypid, NULL),
                            a.attnotnull
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum",
                    &[&oid],
                )?
                .iter()
                .map(|row| {
                    Ok(Column {
                        name: row.try_get(0)?,
                        field_type: field_type(row.try_get::<_, &str>(1)?),
                        cast_type: row.try_get(2)?,
                        not_null: row.try_get(3)?,
                    })
                })
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            // A partial index cannot serve as an ON CONFLICT target without its WHERE, an
            // expression index has no column names, and a deferrable one is no arbiter.
            let unique_sets = client
                .query(
                    "SELECT array_agg(a.attname::text)
                     FROM pg_index i
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                     WHERE i.indrelid = $1 AND i.indisunique AND i.indimmediate
                       AND i.indpred IS NULL AND i.indexprs IS NULL
                     GROUP BY i.indexrelid",
                    &[&oid],
                )?
                .iter()
                .map(|row| Ok(row.try_get::<_, Vec<String>>(0)?.into_iter().collect()))
                .collect::<Result<Vec<BTreeSet<String>>, postgres::Error>>()?;
            Ok(Some(Table {
                oid,
                name: entity.to_string(),
                qualified: String::new(),
                columns,
                unique_sets,
            }))
        };
        if !is_user_table(entity) {
            return Err(self.no_such_entity(entity));
        }
        match read(&mut self.client, &self.schema) {
            Ok(Some(mut table)) => {
                table.qualified = self.qualified(entity);
                Ok(table)
            }
            Ok(None) => Err(self.no_such_entity(entity)),
            Err(e) => Err(self.failed(entity, e)),
        }
    }

    fn no_such_entity(&self, entity: &str) -> DatasourceError {
        DatasourceError::NoSuchEntity {
            datasource: self.name.clone(),
            entity: entity.to_string(),
        }
    }

    /// Runs `sql`, whose select list is `table.select_list("")`, and calls `visit` with
    /// each row as `scan` reads it. A row that cannot be read fails the call with
    /// `BadRow`, whose line counts on from `number` (the rows read so far).
    fn select_rows(
        &mut self,
        table: &Table,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        number: &mut u64,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let entity = table.name.as_str();
        let rows = self
            .client
            .query(sql, params)
            .map_err(|e| self.failed(entity, e))?;
        for row in rows {
            *number += 1;
            let out = read_row(table, &row, 0).map_err(|reason| DatasourceError::BadRow {
                datasource: self.name.clone(),
                entity: entity.to_string(),
                line: *number,
                reason,
            })?;
            visit(out)?;
        }
        Ok(())
    }

    fn now_ms(&mut self, entity: &str) -> Result<i64, DatasourceError> {
        let sql = format!("SELECT {NOW_MS}");
        self.client
            .query_one(&sql, &[])
            .and_then(|row| row.try_get(0))
            .map_err(|e| self.failed(entity, e))
    }

    /// The table of a tracked entity: fails unless `install_tracking` made its trigger,
    /// so that a forgotten install cannot look like an entity that never changes.
    fn tracked_table(&mut self, entity: &str, key: &[String]) -> Result<Table, DatasourceError> {
        let table = self.table(entity)?;
        table.check_key(&self.name, key)?;
        let installed = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2",
                &[&table.oid, &TRIGGER],
            )
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
}

/// What the reason of an error shows: PostgreSQL's own message (and its detail) when the
/// server answered, else the client's error and its cause.
fn error_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_string(),
        };
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// `host=.. port=.. user=.. dbname=..` of a connection, without its password.
fn describe_target(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} user={} dbname={}",
        hosts.join(","),
        ports.join(","),
        config.get_user().unwrap_or("?"),
        config.get_dbname().unwrap_or("?")
    )
}

fn is_user_table(name: &str) -> bool {
    !name.to_ascii_lowercase().starts_with("knit_")
}

/// An identifier for SQL: double-quoted, with inner quotes doubled.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// A text for SQL where a value cannot be bound (a trigger's arguments): single-quoted,
/// with inner quotes doubled, which `standard_conforming_strings` (set on connect) makes
/// the whole escaping.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn field_type(type_name: &str) -> FieldType {
    match type_name {
        "int2" | "int4" | "int8" => FieldType::Int,
        "float4" | "float8" | "numeric" => FieldType::Float,
        "bool" => FieldType::Bool,
        _ => FieldType::Text,
    }
}

/// A value as the text bound for a column of `field_type`; PostgreSQL casts it. A bool
/// into a number column is 1 or 0, as SQLite stores it.
fn bound_text(value: &Value, field_type: FieldType) -> Option<String> {
    match (value, field_type) {
        (Value::Null, _) => None,
        (Value::Bool(b), FieldType::Int | FieldType::Float) => Some(i64::from(*b).to_string()),
        (value, _) => Some(value.to_text()),
    }
}

/// PostgreSQL's message when it refused a row for the row's own sake, else `None` (the
/// failure is the store's and fails the call).
fn refusal(e: &postgres::Error) -> Option<String> {
    let code = e.code()?.code();
    (code.starts_with("22") || code.starts_with("23") || code == "P0001").then(|| error_text(e))
}

#[derive(Debug)]
struct Column {
    name: String,
    field_type: FieldType,
    /// The column's type without its modifier, for `CAST(.. AS ..)`, as PostgreSQL
    /// writes it (quoted and qualified where needed).
    cast_type: String,
    not_null: bool,
}

impl Column {
    /// The select-list expression that reads this column as `scan` does.
    fn read_expression(&self, prefix: &str) -> String {
        let column = format!("{prefix}{}", quote(&self.name));
        match self.field_type {
            FieldType::Int => format!("{column}::int8"),
            FieldType::Float => format!("{column}::float8"),
            FieldType::Bool => column,
            FieldType::Text => format!("{column}::text"),
        }
    }

    /// `CAST($n::text AS type)`: the n-th parameter as a value of this column.
    fn parameter(&self, n: usize) -> String {
        format!("CAST(${n}::text AS {})", self.cast_type)
    }
}

#[derive(Debug)]
struct Table {
    oid: u32,
    name: String,
    /// `"schema"."name"`.
    qualified: String,
    columns: Vec<Column>,
    /// The column sets of each usable unique index, the primary key's included.
    unique_sets: Vec<BTreeSet<String>>,
}

impl Table {
    fn column(&self, field: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == field)
    }

    fn has(&self, field: &str) -> bool {
        self.column(field).is_some()
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

    /// The select list of every column, read as `scan` reads them.
    fn select_list(&self, prefix: &str) -> String {
        self.columns
            .iter()
            .map(|c| c.read_expression(prefix))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Why a row (or a key) cannot be written, before PostgreSQL sees it.
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
        Ok(())
    }

    /// `"k1" = CAST($first AS ..) AND ...`, one parameter per key field from `first` on.
    fn key_condition(&self, key: &[String], first: usize) -> String {
        key.iter()
            .enumerate()
            .filter_map(|(i, k)| {
                let column = self.column(k)?;
                Some(format!("{} = {}", quote(k), column.parameter(first + i)))
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// The text bound for `value` in `field` (a field of the table: checked before).
    fn bound(&self, field: &str, value: &Value) -> Option<String> {
        let field_type = self.column(field).map_or(FieldType::Text, |c| c.field_type);
        bound_text(value, field_type)
    }
}

/// A row of a result whose columns from `skip` on are `table.select_list`.
fn read_row(table: &Table, row: &postgres::Row, skip: usize) -> Result<Row, String> {
    let mut out = Row::new();
    for (i, column) in table.columns.iter().enumerate() {
        let at = skip + i;
        let value = match column.field_type {
            FieldType::Int => row.try_get::<_, Option<i64>>(at).map(|v| v.map(Value::Int)),
            FieldType::Float => row
                .try_get::<_, Option<f64>>(at)
                .map(|v| v.map(Value::Float)),
            FieldType::Bool => row
                .try_get::<_, Option<bool>>(at)
                .map(|v| v.map(Value::Bool)),
            FieldType::Text => row
                .try_get::<_, Option<String>>(at)
                .map(|v| v.map(Value::Text)),
        }
        .map_err(|e| format!("field {:?}: {}", column.name, error_text(&e)))?;
        out.insert(column.name.clone(), value.unwrap_or(Value::Null));
    }
    Ok(out)
}

/// Prepared statements of one call, by SQL text: rows with the same fields share them.
type Statements = HashMap<String, Statement>;

fn prepared(
    tx: &mut Transaction<'_>,
    statements: &mut Statements,
    sql: String,
) -> Result<Statement, postgres::Error> {
    if let Some(statement) = statements.get(&sql) {
        return Ok(statement.clone());
    }
    let statement = tx.prepare(&sql)?;
    statements.insert(sql, statement.clone());
    Ok(statement)
}

fn as_params(values: &[Option<String>]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// Writes one row inside the caller's savepoint.
fn upsert_row(
    tx: &mut Transaction<'_>,
    statements: &mut Statements,
    table: &Table,
    key: &[String],
    row: &Row,
    unique: bool,
) -> Result<(), postgres::Error> {
    let columns: Vec<&String> = row.keys().collect();
    let others: Vec<&String> = columns
        .iter()
        .copied()
        .filter(|c| !key.contains(c))
        .collect();
    let placeholders: Vec<String> = columns
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some(table.column(c)?.parameter(i + 1)))
        .collect();
    let insert = format!(
        "INSERT INTO {} ({}) VALUES ({})",
        table.qualified,
        columns
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", "),
        placeholders.join(", ")
    );
    let values: Vec<Option<String>> = row.iter().map(|(f, v)| table.bound(f, v)).collect();
    let key_values: Vec<Option<String>> = key.iter().map(|k| table.bound(k, &row[k])).collect();
    // PostgreSQL checks NOT NULL on the row it would insert before it looks for a
    // conflict, so a row that leaves out a NOT NULL field would be refused even when it
    // only updates: such rows take the UPDATE-then-INSERT path.
    if unique && row.len() == table.columns.len() {
        let action = if others.is_empty() {
            "NOTHING".to_string()
        } else {
            let sets: Vec<String> = others
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", quote(c)))
                .collect();
            format!("UPDATE SET {}", sets.join(", "))
        };
        let targets: Vec<String> = key.iter().map(|k| quote(k)).collect();
        let sql = format!("{insert} ON CONFLICT ({}) DO {action}", targets.join(", "));
        let statement = prepared(tx, statements, sql)?;
        tx.execute(&statement, &as_params(&values))?;
        return Ok(());
    }
    let matched = if others.is_empty() {
        let sql = format!(
            "SELECT count(*) FROM {} WHERE {}",
            table.qualified,
            table.key_condition(key, 1)
        );
        let statement = prepared(tx, statements, sql)?;
        tx.query_one(&statement, &as_params(&key_values))?
            .try_get::<_, i64>(0)?
    } else {
        let sets: Vec<String> = others
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                Some(format!(
                    "{} = {}",
                    quote(c),
                    table.column(c)?.parameter(i + 1)
                ))
            })
            .collect();
        let sql = format!(
            "UPDATE {} SET {} WHERE {}",
            table.qualified,
            sets.join(", "),
            table.key_condition(key, others.len() + 1)
        );
        let mut params: Vec<Option<String>> =
            others.iter().map(|c| table.bound(c, &row[*c])).collect();
        params.extend(key_values);
        let statement = prepared(tx, statements, sql)?;
        let changed = tx.execute(&statement, &as_params(&params))?;
        i64::try_from(changed).unwrap_or(i64::MAX)
    };
    if matched == 0 {
        let statement = prepared(tx, statements, insert)?;
        tx.execute(&statement, &as_params(&values))?;
    }
    Ok(())
}

/// Writes each item in one transaction, each under a savepoint of its own: an item the
/// server refuses (see `refusal`), or that `write` refuses before writing
/// (`Ok(Err(reason))`), rolls back alone and is reported; any other error rolls back
/// the whole call.
fn per_row<T>(
    client: &mut Client,
    items: &[T],
    mut write: impl FnMut(
        &mut Transaction<'_>,
        &mut Statements,
        &T,
    ) -> Result<Result<(), String>, postgres::Error>,
) -> Result<Vec<RowOutcome>, postgres::Error> {
    let mut outcomes = Vec::with_capacity(items.len());
    let mut statements = Statements::new();
    let mut tx = client.transaction()?;
    per_row_in(&mut tx, &mut statements, items, &mut write, &mut outcomes)?;
    tx.commit()?;
    Ok(outcomes)
}

/// `per_row` inside a transaction the caller holds, appending to `outcomes`.
fn per_row_in<T>(
    tx: &mut Transaction<'_>,
    statements: &mut Statements,
    items: &[T],
    write: &mut impl FnMut(
        &mut Transaction<'_>,
        &mut Statements,
        &T,
    ) -> Result<Result<(), String>, postgres::Error>,
    outcomes: &mut Vec<RowOutcome>,
) -> Result<(), postgres::Error> {
    for item in items {
        let mut savepoint = tx.transaction()?;
        match write(&mut savepoint, statements, item) {
            Ok(Ok(())) => {
                savepoint.commit()?;
                outcomes.push(RowOutcome::Written);
            }
            Ok(Err(reason)) => {
                savepoint.rollback()?;
                outcomes.push(RowOutcome::Refused { reason });
            }
            Err(e) => match refusal(&e) {
                Some(reason) => {
                    savepoint.rollback()?;
                    outcomes.push(RowOutcome::Refused { reason });
                }
                None => return Err(e),
            },
        }
    }
    Ok(())
}

/// Rows per multi-row statement: PostgreSQL takes at most 65,535 parameters.
fn rows_per_statement(columns: usize) -> usize {
    (60_000 / columns.max(1)).clamp(1, 1000)
}

/// Upserts `rows` in one transaction. Runs of rows that carry every field, with
/// distinct keys and a unique index on the key, go as one multi-row `INSERT .. ON
/// CONFLICT` under a savepoint (a round trip per thousand rows instead of three per
/// row); if the server refuses such a statement, its rows are written again one by
/// one, each under its own savepoint, so that exactly the refused rows are reported.
///
/// With `insert_first` (rows that are probably new), a run goes first as a plain
/// `INSERT`, which PostgreSQL writes in about half the time of an upsert; once one
/// is refused (a row was there), the runs go as upserts.
fn upsert_rows(
    client: &mut Client,
    table: &Table,
    key: &[String],
    rows: &[Row],
    mut insert_first: bool,
) -> Result<Vec<RowOutcome>, postgres::Error> {
    let unique = table.key_is_unique(key);
    let mut outcomes = Vec::with_capacity(rows.len());
    let mut statements = Statements::new();
    let mut tx = client.transaction()?;
    let mut write = |savepoint: &mut Transaction<'_>, statements: &mut Statements, row: &Row| {
        if let Err(reason) = table.check_row(key, row) {
            return Ok(Err(reason));
        }
        upsert_row(savepoint, statements, table, key, row, unique).map(Ok)
    };
    for part in rows.chunks(rows_per_statement(table.columns.len())) {
        let whole = unique
            && part.len() > 1
            && part
                .iter()
                .all(|r| r.len() == table.columns.len() && table.check_row(key, r).is_ok())
            && {
                let mut keys = std::collections::HashSet::new();
                part.iter().all(|r| {
                    keys.insert(
                        key.iter()
                            .map(|k| table.bound(k, &r[k]))
                            .collect::<Vec<_>>(),
                    )
                })
            };
        if whole && insert_first {
            let mut savepoint = tx.transaction()?;
            match write_many(&mut savepoint, &mut statements, table, key, part, false) {
                Ok(()) => {
                    savepoint.commit()?;
                    outcomes.extend(part.iter().map(|_| RowOutcome::Written));
                    continue;
                }
                Err(e) if refusal(&e).is_some() => {
                    savepoint.rollback()?;
                    insert_first = false;
                }
                Err(e) => return Err(e),
            }
        }
        if whole {
            let mut savepoint = tx.transaction()?;
            match write_many(&mut savepoint, &mut statements, table, key, part, true) {
                Ok(()) => {
                    savepoint.commit()?;
                    outcomes.extend(part.iter().map(|_| RowOutcome::Written));
                    continue;
                }
                Err(e) if refusal(&e).is_some() => savepoint.rollback()?,
                Err(e) => return Err(e),
            }
        }
        per_row_in(&mut tx, &mut statements, part, &mut write, &mut outcomes)?;
    }
    tx.commit()?;
    Ok(outcomes)
}

/// One column's values for `unnest`: as the column's own kind of number or flag, or
/// as borrowed text, when every value is one; else as text (each value's `to_text`),
/// which the statement casts. Typed arrays spare formatting every value here and
/// parsing it there.
enum ColumnValues<'a> {
    Int(Vec<Option<i64>>),
    Float(Vec<Option<f64>>),
    Bool(Vec<Option<bool>>),
    Text(Vec<Option<&'a str>>),
    AsText(Vec<Option<String>>),
}

impl<'a> ColumnValues<'a> {
    fn of(column: &Column, rows: &'a [Row]) -> Self {
        let values = || rows.iter().map(|r| r.get(&column.name));
        // Every value of one kind (or null), or `None`.
        fn all<'v, T>(
            values: impl Iterator<Item = Option<&'v Value>>,
            pick: impl Fn(&'v Value) -> Option<T>,
        ) -> Option<Vec<Option<T>>> {
            values
                .map(|v| match v {
                    None | Some(Value::Null) => Some(None),
                    Some(v) => pick(v).map(Some),
                })
                .collect()
        }
        // Numbers and flags go typed only into columns of exactly that type: a cast
        // from float8 to numeric, say, would round where one from text does not.
        let exact = matches!(
            (column.field_type, column.cast_type.as_str()),
            (FieldType::Int, "bigint" | "integer" | "smallint")
                | (FieldType::Float, "double precision")
                | (FieldType::Bool, "boolean")
                | (FieldType::Text, _)
        );
        let typed = match column.field_type {
            _ if !exact => None,
            FieldType::Int => all(values(), |v| match v {
                Value::Int(i) => Some(*i),
                _ => None,
            })
            .map(ColumnValues::Int),
            FieldType::Float => all(values(), |v| match v {
                Value::Float(x) => Some(*x),
                _ => None,
            })
            .map(ColumnValues::Float),
            FieldType::Bool => all(values(), |v| match v {
                Value::Bool(b) => Some(*b),
                _ => None,
            })
            .map(ColumnValues::Bool),
            FieldType::Text => all(values(), |v| match v {
                Value::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .map(ColumnValues::Text),
        };
        typed.unwrap_or_else(|| {
            ColumnValues::AsText(
                values()
                    .map(|v| v.and_then(|v| bound_text(v, column.field_type)))
                    .collect(),
            )
        })
    }

    fn sql_type(&self) -> &'static str {
        match self {
            ColumnValues::Int(_) => "int8[]",
            ColumnValues::Float(_) => "float8[]",
            ColumnValues::Bool(_) => "bool[]",
            ColumnValues::Text(_) | ColumnValues::AsText(_) => "text[]",
        }
    }

    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            ColumnValues::Int(v) => v,
            ColumnValues::Float(v) => v,
            ColumnValues::Bool(v) => v,
            ColumnValues::Text(v) => v,
            ColumnValues::AsText(v) => v,
        }
    }
}

/// One `INSERT .. SELECT .. FROM unnest(..)`, with `ON CONFLICT (key) DO UPDATE` when
/// `upsert`, for rows that each carry every field of the table. Each column's values
/// go as one array ([`ColumnValues`]), so the statement's text depends on the columns
/// alone: it is prepared and planned once per call, not once per thousand rows with a
/// parameter and a cast per value (that took three times as long as PostgreSQL's own
/// writing of the rows).
fn write_many(
    tx: &mut Transaction<'_>,
    statements: &mut Statements,
    table: &Table,
    key: &[String],
    rows: &[Row],
    upsert: bool,
) -> Result<(), postgres::Error> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let columns: Vec<&Column> = first.keys().filter_map(|c| table.column(c)).collect();
    let arrays: Vec<ColumnValues<'_>> = columns.iter().map(|c| ColumnValues::of(c, rows)).collect();
    let numbered = |f: &dyn Fn(usize, &Column) -> String| {
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| f(i + 1, c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let others: Vec<String> = columns
        .iter()
        .filter(|c| !key.contains(&c.name))
        .map(|c| format!("{0} = EXCLUDED.{0}", quote(&c.name)))
        .collect();
    let action = if others.is_empty() {
        "NOTHING".to_string()
    } else {
        format!("UPDATE SET {}", others.join(", "))
    };
    let on_conflict = if upsert {
        format!(
            " ON CONFLICT ({}) DO {action}",
            key.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ")
        )
    } else {
        String::new()
    };
    let sql = format!(
        "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({}){on_conflict}",
        table.qualified,
        numbered(&|_, c| quote(&c.name)),
        numbered(&|i, c| format!("CAST(u.v{i} AS {})", c.cast_type)),
        columns
            .iter()
            .zip(&arrays)
            .enumerate()
            .map(|(i, (_, a))| format!("${}::{}", i + 1, a.sql_type()))
            .collect::<Vec<_>>()
            .join(", "),
        numbered(&|i, _| format!("v{i}")),
    );
    let statement = prepared(tx, statements, sql)?;
    let params: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(ColumnValues::param).collect();
    tx.execute(&statement, &params)?;
    Ok(())
}

impl PostgresSource {
    /// `upsert` and `upsert_new`, with the description of `entity` that earlier writes
    /// read (see `write_table`).
    fn write_rows(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
        insert_first: bool,
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        let table = match &self.write_table {
            Some((name, table)) if name == entity => std::sync::Arc::clone(table),
            _ => std::sync::Arc::new(self.table(entity)?),
        };
        self.write_table = None;
        table.check_key(&self.name, key)?;
        let outcomes = upsert_rows(&mut self.client, &table, key, rows, insert_first)
            .map_err(|e| self.failed(entity, e))?;
        self.write_table = Some((entity.to_string(), table));
        Ok(outcomes)
    }
}

impl Datasource for PostgresSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn entities(&mut self) -> Result<Vec<String>, DatasourceError> {
        let rows = self
            .client
            .query(
                "SELECT c.relname::text FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
                &[&self.schema],
            )
            .map_err(|e| self.failed("*", e))?;
        let mut names = rows
            .iter()
            .map(|row| row.try_get::<_, String>(0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.failed("*", e))?;
        names.retain(|n| is_user_table(n));
        // Byte order, as SQLite's listing: independent of the database's collation.
        names.sort();
        Ok(names)
    }

    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError> {
        let table = self.table(entity)?;
        let fields = table
            .columns
            .iter()
            .map(|c| FieldInfo {
                name: c.name.clone(),
                field_type: c.field_type,
                nullable: !c.not_null,
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
        let sql = format!("SELECT {} FROM {}", table.select_list(""), table.qualified);
        self.select_rows(&table, &sql, &[], &mut 0, visit)
    }

    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.write_rows(entity, key, rows, false)
    }

    fn upsert_new(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.write_rows(entity, key, rows, true)
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
            table.qualified,
            table.key_condition(key, 1)
        );
        // A foreign key or a trigger may refuse a deletion, like a constraint an upsert.
        per_row(&mut self.client, keys, |savepoint, statements, row| {
            // Fields other than the key's are ignored, as the file datasources do.
            let key_only: Row = row
                .iter()
                .filter(|(field, _)| key.contains(field))
                .map(|(f, v)| (f.clone(), v.clone()))
                .collect();
            if let Err(reason) = table.check_row(key, &key_only) {
                return Ok(Err(reason));
            }
            let values: Vec<Option<String>> =
                key.iter().map(|k| table.bound(k, &key_only[k])).collect();
            let statement = prepared(savepoint, statements, sql.clone())?;
            savepoint
                .execute(&statement, &as_params(&values))
                .map(|_| Ok(()))
        })
        .map_err(|e| self.failed(entity, e))
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
        let changes = self.qualified("knit_changes");
        let function = self.qualified("knit_track");
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {changes} (
                 seq bigserial PRIMARY KEY,
                 entity text NOT NULL,
                 key text NOT NULL,
                 op text NOT NULL,
                 at_ms bigint NOT NULL
             );
             CREATE INDEX IF NOT EXISTS knit_changes_entity_seq ON {changes} (entity, seq);
             CREATE INDEX IF NOT EXISTS knit_changes_entity_at_ms ON {changes} (entity, at_ms);"
        );
        let create_function = format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql
             AS $knit_track${TRACK_FUNCTION_BODY}$knit_track$;"
        );
        // The trigger's arguments as pg_trigger keeps them: each followed by a NUL.
        let arguments: Vec<u8> = key
            .iter()
            .flat_map(|k| k.bytes().chain(std::iter::once(0)))
            .collect();
        let trigger = format!(
            "DROP TRIGGER IF EXISTS {TRIGGER} ON {table};
             CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON {table}
             FOR EACH ROW EXECUTE FUNCTION {function}({});",
            key.iter()
                .map(|k| literal(k))
                .collect::<Vec<_>>()
                .join(", "),
            table = table.qualified,
        );
        let schema = self.schema.as_str();
        let install = |client: &mut Client| -> Result<(), postgres::Error> {
            let mut tx = client.transaction()?;
            tx.batch_execute(&create)?;
            // Replacing the function rewrites the catalog, and two sessions that replace
            // it at once collide: only a missing or older function is replaced.
            let current = tx
                .query_opt(
                    "SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = $1 AND p.proname = 'knit_track' AND p.prosrc = $2",
                    &[&schema, &TRACK_FUNCTION_BODY],
                )?
                .is_some();
            if !current {
                tx.batch_execute(&create_function)?;
            }
            let existing: Option<Vec<u8>> = tx
                .query_opt(
                    "SELECT tgargs FROM pg_trigger WHERE tgrelid = $1 AND tgname = $2",
                    &[&table.oid, &TRIGGER],
                )?
                .map(|row| row.try_get(0))
                .transpose()?;
            if existing.as_deref() != Some(arguments.as_slice()) {
                tx.batch_execute(&trigger)?;
            }
            tx.commit()
        };
        install(&mut self.client).map_err(|e| self.failed(entity, e))
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
        // The key object becomes a row of the table's type (absent fields null), read
        // with scan's expressions, so a tracked key reads as a scan reads the row.
        let sql = format!(
            "SELECT c.seq, {}
             FROM {} c, jsonb_populate_record(NULL::{}, c.key::jsonb) r
             WHERE c.entity = $1 AND (c.seq > $2 OR c.at_ms >= $3)
             ORDER BY c.seq",
            table.select_list("r."),
            self.qualified("knit_changes"),
            table.qualified,
        );
        let lower_ms = since.time_ms.saturating_sub(lookback_ms);
        let rows = self
            .client
            .query(&sql, &[&entity, &since.sequence, &lower_ms])
            .map_err(|e| self.failed(entity, e))?;
        let mut sequence = since.sequence;
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(|e| self.failed(entity, e))?;
            let full = read_row(&table, &row, 1).map_err(|reason| DatasourceError::BadRow {
                datasource: self.name.clone(),
                entity: entity.to_string(),
                line: u64::try_from(seq).unwrap_or(0),
                reason: format!("knit_changes seq {seq}: {reason}"),
            })?;
            let changed: Row = full
                .into_iter()
                .filter(|(field, _)| key.contains(field))
                .collect();
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
        let sql = format!(
            "SELECT coalesce(max(seq), 0) FROM {} WHERE entity = $1",
            self.qualified("knit_changes")
        );
        let sequence = self
            .client
            .query_one(&sql, &[&entity])
            .and_then(|row| row.try_get(0))
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
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            table.select_list(""),
            table.qualified,
            table.key_condition(key, 1)
        );
        let statement = self
            .client
            .prepare(&sql)
            .map_err(|e| self.failed(entity, e))?;
        // A key asked twice is read once, as a scan would find its row once.
        let mut seen = BTreeSet::new();
        let mut number = 0;
        for wanted in keys {
            // A null or missing key field matches no row (`= NULL` is never true).
            let Some(values) = key
                .iter()
                .map(|k| {
                    wanted
                        .get(k)
                        .filter(|v| !v.is_null())
                        .and_then(|v| table.bound(k, v))
                })
                .collect::<Option<Vec<String>>>()
            else {
                continue;
            };
            if !seen.insert(values.clone()) {
                continue;
            }
            let params: Vec<&(dyn ToSql + Sync)> =
                values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            let rows = match self.client.query(&statement, &params) {
                Ok(rows) => rows,
                // A value that is no value of the key's type names no row.
                Err(e) if e.code().is_some_and(|c| c.code().starts_with("22")) => continue,
                Err(e) => return Err(self.failed(entity, e)),
            };
            for row in rows {
                number += 1;
                let out = read_row(&table, &row, 0).map_err(|reason| DatasourceError::BadRow {
                    datasource: self.name.clone(),
                    entity: entity.to_string(),
                    line: number,
                    reason,
                })?;
                visit(out)?;
            }
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
        let Some(info) = table.column(column) else {
            return Ok(());
        };
        let select = format!("SELECT {} FROM {}", table.select_list(""), table.qualified);
        let Some(bound) = bound_text(lower, info.field_type) else {
            // Every value is at or above nothing, but a null value never is.
            let sql = format!("{select} WHERE {} IS NOT NULL", quote(column));
            return self.select_rows(&table, &sql, &[], &mut 0, visit);
        };
        let sql = format!("{select} WHERE {} >= {}", quote(column), info.parameter(1));
        self.select_rows(&table, &sql, &[&bound], &mut 0, visit)
    }
}

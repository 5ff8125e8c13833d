//! The datasource scenarios of shared/scenarios.md (D1–D15), one test each (sub-cases as
//! tests of their own), through the library API: `sync_schema` for whole runs,
//! `SyncManager` where the schema file is part of the story, and a `TableReplica` over a
//! counting datasource where a scenario asks how many rows a read touched.
//!
//! Conventions of the scenarios: source `S` is the SQLite file `s.db` (datasource `s`),
//! destination `D` is `d.db` (datasource `d`) or a CSV folder; the schema `customers`
//! keys `S.id ↔ D.customer_id`. Tables are seeded with plain SQL, and every timestamp a
//! test writes is computed by SQLite from a fixed text, never from the test host's
//! clock. Batches hold 10 rows and tables tens of rows, so batch edges come up.
//!
//! D12 (the schema file round trip) lives in tests/schema_file.rs.
//!
//! D11's kill -9 re-runs this test binary as a child, as tests/crash.rs does: the parent
//! starts `current_exe() --exact d11_child_process` with `KNIT_DATASOURCE_CHILD=<folder>`;
//! libtest then runs only `d11_child_process`, which syncs the folder's schema and prints
//! its progress for the parent, who SIGKILLs it mid-run. In an ordinary run the variable
//! is unset and `d11_child_process` returns at once: it is the child's entry point, not a
//! test of its own.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::TestResult;
use knit::{
    sync_schema, CancelToken, ConflictRule, ConflictType, Datasource, DatasourceError, Datasources,
    DetectMode, EntityInfo, Filter, FilterValue, History, Mapping, OnMissing, Operator, Projection,
    Row, RowConflict, RowOutcome, RunPhase, RunProgress, RunReport, RunStatus, SchemaError,
    SchemaSet, SqliteSource, SyncDirection, SyncManager, SyncSchema, SyncType, TableReplica,
    TrackingAnchor, Transform, Value, Winner,
};
use rusqlite::types::ValueRef;

type Error = Box<dyn std::error::Error>;
/// Rows of a query, every value as text.
type Rows = Vec<Vec<String>>;

/// Rows per batch in every schema here.
const BATCH: u32 = 10;

const CONFIG: &str = r#"
[datasources.s]
kind = "sqlite"
path = "s.db"

[datasources.d]
kind = "sqlite"
path = "d.db"

[datasources.e]
kind = "sqlite"
path = "e.db"

[datasources.csv]
kind = "csv"
path = "csv"
"#;

const S_CUSTOMERS: &str =
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, updated_at TEXT);";
const D_CUSTOMERS: &str =
    "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, email TEXT);";

/// SQL inserting customers `from..=to` as `(i, 'customer i', 'ci@example.org')`, each
/// stamped `updated_at = base + i * step_seconds` by SQLite.
fn insert_customers(from: u32, to: u32, base: &str, step_seconds: u32) -> String {
    format!(
        "WITH RECURSIVE n(i) AS (SELECT {from} UNION ALL SELECT i + 1 FROM n WHERE i < {to})
         INSERT INTO customers (id, name, email, updated_at)
         SELECT i, 'customer ' || i, 'c' || i || '@example.org',
                datetime('{base}', '+' || (i * {step_seconds}) || ' seconds') FROM n;"
    )
}

/// `customers`: S.id → D.customer_id and each of `fields` to the field of the same name,
/// Full, source to destination, batches of [`BATCH`] rows.
fn customers_schema(fields: &[&str]) -> SyncSchema {
    let mut schema = SyncSchema::new(
        "customers",
        knit::Endpoint::new("s", "customers", &["id"]),
        knit::Endpoint::new("d", "customers", &["customer_id"]),
    );
    schema.mappings = std::iter::once(Mapping::new("id", "customer_id", None))
        .chain(fields.iter().map(|f| Mapping::new(f, f, None)))
        .collect();
    schema.batch_size = BATCH;
    schema
}

/// `customers_schema`, Incremental over S's `updated_at` column.
fn incremental_schema(fields: &[&str], lookback: u64) -> SyncSchema {
    let mut schema = customers_schema(fields);
    schema.sync_type = SyncType::Incremental;
    schema.source.modified_at = Some("updated_at".into());
    schema.lookback = lookback;
    schema
}

/// A temporary folder with the datasources of [`CONFIG`]: `s.db` and `d.db` made by the
/// given statements, an empty `csv/` folder, and the run state under `state/`.
struct Lab {
    root: PathBuf,
    datasources: Datasources,
    /// Removes the folder when the lab is dropped (`None` for a child process's lab,
    /// whose folder belongs to the parent).
    _dir: Option<tempfile::TempDir>,
}

impl Lab {
    fn new(source_sql: &str, destination_sql: &str) -> Result<Lab, Error> {
        let dir = tempfile::tempdir()?;
        rusqlite::Connection::open(dir.path().join("s.db"))?.execute_batch(source_sql)?;
        rusqlite::Connection::open(dir.path().join("d.db"))?.execute_batch(destination_sql)?;
        std::fs::create_dir(dir.path().join("csv"))?;
        let mut lab = Lab::at(dir.path())?;
        lab._dir = Some(dir);
        Ok(lab)
    }

    /// The lab in a folder someone else made.
    fn at(root: &Path) -> Result<Lab, Error> {
        Ok(Lab {
            root: root.to_path_buf(),
            datasources: Datasources::from_toml(CONFIG, root, "datasources.toml")?,
            _dir: None,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn state(&self) -> PathBuf {
        self.path("state")
    }

    fn exec(&self, db: &str, sql: &str) -> Result<(), Error> {
        rusqlite::Connection::open(self.path(db))?.execute_batch(sql)?;
        Ok(())
    }

    fn s(&self, sql: &str) -> Result<(), Error> {
        self.exec("s.db", sql)
    }

    fn d(&self, sql: &str) -> Result<(), Error> {
        self.exec("d.db", sql)
    }

    /// The rows a query returns, every value as text (`NULL` for null).
    fn rows(&self, db: &str, sql: &str) -> Result<Rows, Error> {
        let conn = rusqlite::Connection::open(self.path(db))?;
        let mut stmt = conn.prepare(sql)?;
        let columns = stmt.column_count();
        let mut out = Vec::new();
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                values.push(text(row.get_ref(i)?));
            }
            out.push(values);
        }
        Ok(out)
    }

    fn count(&self, db: &str, sql: &str) -> Result<i64, Error> {
        let conn = rusqlite::Connection::open(self.path(db))?;
        Ok(conn.query_row(sql, [], |r| r.get(0))?)
    }

    /// `(customer_id, name, email)` of D, by key.
    fn destination_rows(&self) -> Result<Rows, Error> {
        self.rows(
            "d.db",
            "SELECT customer_id, name, email FROM customers ORDER BY customer_id",
        )
    }

    /// `(id, name, email)` of S and `(customer_id, name, email)` of D, by key.
    fn both_sides(&self) -> Result<(Rows, Rows), Error> {
        Ok((
            self.rows("s.db", "SELECT id, name, email FROM customers ORDER BY id")?,
            self.destination_rows()?,
        ))
    }

    fn run(&self, schema: &SyncSchema) -> RunReport {
        self.run_with(schema, &CancelToken::new(), &mut |_| {})
    }

    fn run_with(
        &self,
        schema: &SyncSchema,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(&RunProgress),
    ) -> RunReport {
        sync_schema(schema, &self.datasources, &self.state(), cancel, progress)
    }

    /// A run and every progress event it gave; cancelled once `done` reaches
    /// `cancel_at` rows.
    fn run_watched(
        &self,
        schema: &SyncSchema,
        cancel_at: Option<u64>,
    ) -> (RunReport, Vec<RunProgress>) {
        let cancel = CancelToken::new();
        let mut events = Vec::new();
        let report = self.run_with(schema, &cancel, &mut |p| {
            events.push(p.clone());
            if cancel_at.is_some_and(|at| p.done >= at) {
                cancel.cancel();
            }
        });
        (report, events)
    }
}

fn text(value: ValueRef<'_>) -> String {
    match value {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
    }
}

/// `(status, inserted, updated, deleted, failed)`.
fn counts(r: &RunReport) -> (RunStatus, u64, u64, u64, u64) {
    (r.status, r.inserted, r.updated, r.deleted, r.failed)
}

fn row(values: &[&str]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

fn keys_of(report: &RunReport) -> BTreeSet<String> {
    report.errors.iter().map(|e| e.key.join(",")).collect()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

/// A datasource that counts the rows its reads (`scan`, `scan_since`, `read_keys`) hand
/// to the caller, and otherwise is the store it wraps.
struct Counting {
    inner: Box<dyn Datasource>,
    rows: Arc<AtomicU64>,
}

impl Counting {
    fn sqlite(path: &Path) -> Result<(Counting, Arc<AtomicU64>), DatasourceError> {
        let rows = Arc::new(AtomicU64::new(0));
        let counting = Counting {
            inner: Box::new(SqliteSource::open("s", path)?),
            rows: Arc::clone(&rows),
        };
        Ok((counting, rows))
    }
}

impl Datasource for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn entities(&mut self) -> Result<Vec<String>, DatasourceError> {
        self.inner.entities()
    }

    fn describe(&mut self, entity: &str) -> Result<EntityInfo, DatasourceError> {
        self.inner.describe(entity)
    }

    fn scan(
        &mut self,
        entity: &str,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let rows = &self.rows;
        self.inner.scan(entity, &mut |row| {
            rows.fetch_add(1, Ordering::SeqCst);
            visit(row)
        })
    }

    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.inner.upsert(entity, key, rows)
    }

    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.inner.delete(entity, key, keys)
    }

    fn supports_tracking(&self) -> bool {
        self.inner.supports_tracking()
    }

    fn install_tracking(&mut self, entity: &str, key: &[String]) -> Result<(), DatasourceError> {
        self.inner.install_tracking(entity, key)
    }

    fn tracked_changes(
        &mut self,
        entity: &str,
        key: &[String],
        since: TrackingAnchor,
        lookback_ms: i64,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<TrackingAnchor, DatasourceError> {
        // Keys, not rows: the rows themselves come from `read_keys`.
        self.inner
            .tracked_changes(entity, key, since, lookback_ms, visit)
    }

    fn tracking_anchor(&mut self, entity: &str) -> Result<TrackingAnchor, DatasourceError> {
        self.inner.tracking_anchor(entity)
    }

    fn read_keys(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let rows = &self.rows;
        self.inner.read_keys(entity, key, keys, &mut |row| {
            rows.fetch_add(1, Ordering::SeqCst);
            visit(row)
        })
    }

    fn scan_since(
        &mut self,
        entity: &str,
        column: &str,
        lower: &Value,
        visit: &mut dyn FnMut(Row) -> Result<(), DatasourceError>,
    ) -> Result<(), DatasourceError> {
        let rows = &self.rows;
        self.inner.scan_since(entity, column, lower, &mut |row| {
            rows.fetch_add(1, Ordering::SeqCst);
            visit(row)
        })
    }
}

// ---- D1 -----------------------------------------------------------------------------

#[test]
fn d1_field_mapping_with_rename_and_split() -> TestResult {
    let lab = Lab::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, full_name TEXT, age TEXT);
         INSERT INTO customers VALUES (1, 'Ada Lovelace', '36'), (2, 'Plato', NULL),
                                      (3, NULL, 'x');
         WITH RECURSIVE n(i) AS (SELECT 4 UNION ALL SELECT i + 1 FROM n WHERE i < 24)
         INSERT INTO customers SELECT i, 'First' || i || ' Last' || i, '' || (20 + i) FROM n;",
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, first_name TEXT,
                                 last_name TEXT, age INTEGER);",
    )?;
    let mut schema = customers_schema(&[]);
    schema.mappings.extend([
        Mapping::new(
            "full_name",
            "first_name",
            Some(Transform::parse("SPLIT(0)")?),
        ),
        Mapping::new(
            "full_name",
            "last_name",
            Some(Transform::parse("SPLIT(1)")?),
        ),
        Mapping::new("age", "age", Some(Transform::Int)),
    ]);

    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Partial, 23, 0, 0, 1),
        "{report:?}"
    );
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    let error = &report.errors[0];
    assert_eq!(error.key, ["3"]);
    assert_eq!(error.field.as_deref(), Some("age"));
    assert_eq!(error.reason, "cannot convert 'x' to int");

    let sql = "SELECT customer_id, first_name, last_name, age, typeof(age) FROM customers \
               WHERE customer_id IN (1, 2, 3, 24) ORDER BY customer_id";
    assert_eq!(
        lab.rows("d.db", sql)?,
        [
            row(&["1", "Ada", "Lovelace", "36", "integer"]),
            // An out-of-range SPLIT index is null, not an error.
            row(&["2", "Plato", "NULL", "NULL", "null"]),
            row(&["24", "First24", "Last24", "44", "integer"]),
        ]
    );
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 23);
    Ok(())
}

// ---- D2 -----------------------------------------------------------------------------

const D2_SOURCE: &str = "
    CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, region TEXT, created_at TEXT,
                            age TEXT);
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20)
    INSERT INTO customers
    SELECT i, 'customer ' || i, CASE WHEN i % 2 = 0 THEN 'EU' ELSE 'US' END,
           date('2024-01-01', '+' || (i * 20) || ' days'), '' || (20 + i) FROM n;
    -- One row the filters leave out and one they let in, both unconvertible.
    UPDATE customers SET age = 'x' WHERE id IN (3, 8);";
const D2_DESTINATION: &str =
    "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, region TEXT,
                             created_at TEXT, age INTEGER);";
const D2_MATCHING: &str = "SELECT id FROM customers WHERE region = 'EU' AND created_at \
                           BETWEEN '2024-03-01' AND '2024-09-30' ORDER BY id";

fn d2_schema() -> SyncSchema {
    let mut schema = customers_schema(&["name", "region", "created_at"]);
    schema
        .mappings
        .push(Mapping::new("age", "age", Some(Transform::Int)));
    schema.filters = vec![
        Filter::new(
            "region",
            Operator::Eq,
            FilterValue::One(Value::Text("EU".into())),
        ),
        Filter::new(
            "created_at",
            Operator::Between,
            FilterValue::Many(vec![
                Value::Text("2024-03-01".into()),
                Value::Text("2024-09-30".into()),
            ]),
        ),
    ];
    schema
}

#[test]
fn d2a_filters_let_only_matching_rows_through_and_count_them_apart_from_failures() -> TestResult {
    let lab = Lab::new(D2_SOURCE, D2_DESTINATION)?;
    // SQLite's own reading of the filters is the oracle.
    let matching: Vec<String> = lab
        .rows("s.db", D2_MATCHING)?
        .into_iter()
        .flatten()
        .collect();
    assert!(matching.contains(&"8".to_string()) && matching.len() > 2);

    let report = lab.run(&d2_schema());
    let passed = matching.len() as u64;
    assert_eq!(
        counts(&report),
        (RunStatus::Partial, passed - 1, 0, 0, 1),
        "{report:?}"
    );
    assert_eq!(report.skipped, 20 - passed, "{report:?}");
    assert_eq!(
        keys_of(&report),
        set(&["8"]),
        "row 3 was filtered, not failed"
    );
    let arrived: Vec<String> = lab
        .rows(
            "d.db",
            "SELECT customer_id FROM customers ORDER BY customer_id",
        )?
        .into_iter()
        .flatten()
        .collect();
    let expected: Vec<String> = matching.into_iter().filter(|id| id != "8").collect();
    assert_eq!(arrived, expected);
    Ok(())
}

#[test]
fn d2b_a_filter_on_a_missing_column_fails_validation_before_any_io() -> TestResult {
    let lab = Lab::new(D2_SOURCE, D2_DESTINATION)?;
    let mut schema = d2_schema();
    schema.filters[0].field = "regoin".into();
    let report = lab.run(&schema);
    assert_eq!(report.status, RunStatus::Failed);
    let all: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
    assert!(
        all.iter().any(|e| e.contains("customers.filters[0].field")
            && e.contains("regoin")
            && e.contains(r#"did you mean "region"?"#)),
        "{all:#?}"
    );
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 0);
    let folder = lab.state().join("customers");
    assert!(!folder.join("source").exists() && !folder.join("destination").exists());
    Ok(())
}

#[test]
fn d2c_an_unknown_operator_in_the_schema_file_stops_the_load() -> TestResult {
    let lab = Lab::new(D2_SOURCE, D2_DESTINATION)?;
    let mut set = SchemaSet::default();
    set.schemas.push(d2_schema());
    let text = set
        .to_toml()?
        .replacen(r#"operator = "=""#, r#"operator = "=~""#, 1);
    assert!(text.contains("=~"), "{text}");
    let file = lab.path("schemas.toml");
    std::fs::write(&file, text)?;

    match SyncManager::load(&file, lab.datasources.clone(), &lab.state()) {
        Err(SchemaError::Invalid { problems, .. }) => {
            let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
            assert_eq!(
                texts,
                [r#"customers.filters[0].operator: unknown operator "=~""#]
            );
        }
        Err(other) => return Err(format!("expected Invalid, got {other:?}").into()),
        Ok(_) => return Err("a schema with operator =~ loaded".into()),
    }
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 0);
    assert!(!lab.state().exists(), "no run began");
    Ok(())
}

// ---- D3 -----------------------------------------------------------------------------

const D3_BASE: &str = "2024-05-01 10:00:00";

/// 40 customers stamped a minute apart: the watermark after reading them is 10:40.
fn d3_lab() -> Result<Lab, Error> {
    Lab::new(
        &format!("{S_CUSTOMERS}{}", insert_customers(1, 40, D3_BASE, 60)),
        D_CUSTOMERS,
    )
}

/// Updates rows 3, 17 and 29 and inserts 41 and 42, each stamped after the watermark.
const D3_CHANGES: &str = "
    UPDATE customers SET email = 'new' || id || '@example.org',
        updated_at = CASE id WHEN 3 THEN '2024-05-02 09:00:01' WHEN 17 THEN '2024-05-02 09:00:02'
                             ELSE '2024-05-02 09:00:03' END
    WHERE id IN (3, 17, 29);
    INSERT INTO customers VALUES (41, 'customer 41', 'c41@example.org', '2024-05-02 09:00:04'),
                                 (42, 'customer 42', 'c42@example.org', '2024-05-02 09:00:05');";

#[test]
fn d3a_incremental_over_modified_at_syncs_only_changed_rows_and_reruns_as_a_no_op() -> TestResult {
    let lab = d3_lab()?;
    let schema = incremental_schema(&["name", "email"], 0);

    // No watermark yet: the first run reads everything and takes the highest stamp.
    let first = lab.run(&schema);
    assert_eq!(
        counts(&first),
        (RunStatus::Success, 40, 0, 0, 0),
        "{first:?}"
    );
    assert_eq!(
        first.watermark_after.as_deref(),
        Some("2024-05-01 10:40:00")
    );

    lab.s(D3_CHANGES)?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 2, 3, 0, 0),
        "{second:?}"
    );
    assert_eq!((second.skipped, second.conflicts.len()), (0, 0));
    // The five changed rows, and row 40 again: the lower bound is inclusive.
    assert_eq!(second.rows_read, 6, "{second:?}");
    assert_eq!(second.watermark_before, first.watermark_after);
    assert_eq!(
        second.watermark_after.as_deref(),
        Some("2024-05-02 09:00:05")
    );
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    assert_eq!(d.len(), 42);

    let third = lab.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 0, 0, 0, 0),
        "{third:?}"
    );
    assert_eq!((third.applied, third.sent), (0, 0), "{third:?}");
    assert_eq!(third.watermark_before, second.watermark_after);
    assert_eq!(third.watermark_after, second.watermark_after);
    Ok(())
}

#[test]
fn d3_a_full_run_leaves_the_watermark_for_the_next_incremental_one() -> TestResult {
    let lab = d3_lab()?;
    let incremental = incremental_schema(&["name", "email"], 0);
    let mut full = incremental.clone();
    full.sync_type = SyncType::Full;
    let first = lab.run(&full);
    assert_eq!(
        first.watermark_after.as_deref(),
        Some("2024-05-01 10:40:00"),
        "{first:?}"
    );
    lab.s(D3_CHANGES)?;
    let second = lab.run(&incremental);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 2, 3, 0, 0),
        "{second:?}"
    );
    assert_eq!(second.rows_read, 6, "only what changed, and row 40 again");
    Ok(())
}

#[test]
fn d3b_an_incremental_read_touches_only_rows_at_or_above_the_watermark() -> TestResult {
    let lab = d3_lab()?;
    let schema = incremental_schema(&["name", "email"], 0);
    let (store, read) = Counting::sqlite(&lab.path("s.db"))?;
    let mut side = TableReplica::open_with(
        &lab.path("direct"),
        Box::new(store),
        "customers",
        &schema.source.key,
        Projection::source_side(&schema),
        Some("updated_at".into()),
        None,
    )?;
    let mode = DetectMode::Incremental { lookback: 0 };

    let first = side.detect_changes(mode)?;
    assert_eq!(
        (first.report.inserted, read.load(Ordering::SeqCst)),
        (40, 40)
    );
    side.commit_changes(first)?;

    lab.s(D3_CHANGES)?;
    read.store(0, Ordering::SeqCst);
    let second = side.detect_changes(mode)?;
    let r = &second.report;
    assert_eq!((r.inserted, r.updated, r.deleted), (2, 3, 0), "{r:?}");
    // Five changed rows plus row 40, stamped exactly at the watermark.
    assert_eq!(read.load(Ordering::SeqCst), 6);
    side.commit_changes(second)?;

    read.store(0, Ordering::SeqCst);
    let third = side.detect_changes(mode)?;
    let r = &third.report;
    assert_eq!((r.inserted, r.updated, r.deleted), (0, 0, 0), "{r:?}");
    assert_eq!(
        read.load(Ordering::SeqCst),
        1,
        "only row 42, at the watermark"
    );
    assert_eq!(third.anchor_after, third.anchor_before);
    Ok(())
}

#[test]
fn d3c_incremental_with_sqlite_triggers_syncs_only_changed_rows_and_sees_deletes() -> TestResult {
    let lab = d3_lab()?;
    let mut schema = customers_schema(&["name", "email"]);
    schema.sync_type = SyncType::Incremental;
    schema.lookback = 0;

    let first = lab.run(&schema);
    assert_eq!(
        counts(&first),
        (RunStatus::Success, 40, 0, 0, 0),
        "{first:?}"
    );

    lab.s(D3_CHANGES)?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 2, 3, 0, 0),
        "{second:?}"
    );
    assert_eq!(second.rows_read, 5, "{second:?}");
    assert_ne!(second.watermark_after, first.watermark_after);

    let third = lab.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 0, 0, 0, 0),
        "{third:?}"
    );

    // Triggers see deletes, which a modified-at column cannot.
    lab.s("DELETE FROM customers WHERE id = 1")?;
    let fourth = lab.run(&schema);
    assert_eq!(
        counts(&fourth),
        (RunStatus::Success, 0, 0, 1, 0),
        "{fourth:?}"
    );
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    assert_eq!(d.len(), 41);

    // The read counter: after the first (whole) read, only the five changed rows.
    let lab = d3_lab()?;
    let (store, read) = Counting::sqlite(&lab.path("s.db"))?;
    let mut side = TableReplica::open_with(
        &lab.path("direct"),
        Box::new(store),
        "customers",
        &schema.source.key,
        Projection::source_side(&schema),
        None,
        None,
    )?;
    let mode = DetectMode::Incremental { lookback: 0 };
    let detection = side.detect_changes(mode)?;
    side.commit_changes(detection)?;
    assert_eq!(read.load(Ordering::SeqCst), 40);
    lab.s(D3_CHANGES)?;
    read.store(0, Ordering::SeqCst);
    let detection = side.detect_changes(mode)?;
    let r = &detection.report;
    assert_eq!((r.inserted, r.updated, r.deleted), (2, 3, 0), "{r:?}");
    assert_eq!(read.load(Ordering::SeqCst), 5);
    Ok(())
}

// ---- D4 -----------------------------------------------------------------------------

/// Ten customers stamped ten minutes apart from `base`: row 10 holds the watermark
/// `T = base + 100 min`, and a lookback of 60 s reaches no other row.
fn d4_lab(base: &str) -> Result<Lab, Error> {
    Lab::new(
        &format!("{S_CUSTOMERS}{}", insert_customers(1, 10, base, 600)),
        D_CUSTOMERS,
    )
}

/// `T + offset_seconds` for the lab made from `base`, as SQLite writes it.
fn d4_stamp(lab: &Lab, offset_seconds: i64) -> Result<String, Error> {
    let sql = format!(
        "SELECT datetime(max(updated_at), '{offset_seconds:+} seconds') FROM customers \
         WHERE id <= 10"
    );
    Ok(lab
        .rows("s.db", &sql)?
        .concat()
        .pop()
        .ok_or("no watermark row")?)
}

fn d4_insert(lab: &Lab, id: u32, offset_seconds: i64) -> Result<(), Error> {
    let stamp = d4_stamp(lab, offset_seconds)?;
    lab.s(&format!(
        "INSERT INTO customers VALUES ({id}, 'customer {id}', 'c{id}@example.org', '{stamp}')"
    ))
}

fn no_duplicates(lab: &Lab) -> Result<i64, Error> {
    let rows = lab.count("d.db", "SELECT count(*) FROM customers")?;
    let keys = lab.count("d.db", "SELECT count(DISTINCT customer_id) FROM customers")?;
    assert_eq!(rows, keys, "duplicate rows in D");
    Ok(rows)
}

#[test]
fn d4a_a_row_committed_at_the_watermark_after_the_read_is_inserted_exactly_once() -> TestResult {
    let lab = d4_lab("2024-05-01 10:00:00")?;
    let schema = incremental_schema(&["name", "email"], 60);
    let first = lab.run(&schema);
    assert_eq!(counts(&first), (RunStatus::Success, 10, 0, 0, 0));
    let t = d4_stamp(&lab, 0)?;
    assert_eq!(first.watermark_after.as_deref(), Some(t.as_str()));

    // Row 11 shares row 10's stamp T but committed after the run read.
    d4_insert(&lab, 11, 0)?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 1, 0, 0, 0),
        "{second:?}"
    );
    assert_eq!(second.rows_read, 2, "rows 10 and 11, both at T");
    assert_eq!(second.watermark_after.as_deref(), Some(t.as_str()));
    assert_eq!(no_duplicates(&lab)?, 11);

    let third = lab.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 0, 0, 0, 0),
        "{third:?}"
    );
    assert_eq!(no_duplicates(&lab)?, 11);
    Ok(())
}

#[test]
fn d4b_a_late_row_below_the_watermark_is_caught_within_the_lookback_once() -> TestResult {
    let lab = d4_lab("2024-05-01 10:00:00")?;
    let schema = incremental_schema(&["name", "email"], 60);
    assert_eq!(lab.run(&schema).status, RunStatus::Success);

    // Stamped 30 s before the watermark, committed after the run that set it.
    d4_insert(&lab, 12, -30)?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 1, 0, 0, 0),
        "{second:?}"
    );
    assert_eq!(no_duplicates(&lab)?, 11);
    let third = lab.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 0, 0, 0, 0),
        "{third:?}"
    );
    assert_eq!(no_duplicates(&lab)?, 11);

    // The lookback is a real bound: a row stamped 5 min below the watermark is beyond
    // it, and only a Full run finds it.
    d4_insert(&lab, 13, -300)?;
    let fourth = lab.run(&schema);
    assert_eq!(
        counts(&fourth),
        (RunStatus::Success, 0, 0, 0, 0),
        "{fourth:?}"
    );
    let mut full = schema.clone();
    full.sync_type = SyncType::Full;
    let fifth = lab.run(&full);
    assert_eq!(
        counts(&fifth),
        (RunStatus::Success, 1, 0, 0, 0),
        "{fifth:?}"
    );
    assert_eq!(no_duplicates(&lab)?, 12);
    Ok(())
}

/// Per run: status, counts, rows read, and the watermark's offset from `T` in seconds.
type D4Outcome = Vec<(RunStatus, u64, u64, u64, u64, i64)>;

/// D4's story from source stamps starting at `base`: ties at T, a late row within the
/// lookback, then a run with nothing new.
fn d4_story(base: &str) -> Result<D4Outcome, Error> {
    let lab = d4_lab(base)?;
    let schema = incremental_schema(&["name", "email"], 60);
    let t = d4_stamp(&lab, 0)?;
    let offset = |report: &RunReport| -> Result<i64, Error> {
        let watermark = report.watermark_after.clone().ok_or("no watermark")?;
        let sql = format!(
            "SELECT CAST(strftime('%s', '{watermark}') AS INTEGER) - \
                    CAST(strftime('%s', '{t}') AS INTEGER)"
        );
        lab.count("s.db", &sql)
    };
    let mut outcome = Vec::new();
    let mut record = |report: RunReport| -> Result<(), Error> {
        let (status, inserted, updated, deleted, failed) = counts(&report);
        assert_eq!(failed, 0, "{report:?}");
        outcome.push((
            status,
            inserted,
            updated,
            deleted,
            report.rows_read,
            offset(&report)?,
        ));
        Ok(())
    };
    record(lab.run(&schema))?;
    d4_insert(&lab, 11, 0)?;
    record(lab.run(&schema))?;
    d4_insert(&lab, 12, -30)?;
    record(lab.run(&schema))?;
    record(lab.run(&schema))?;
    assert_eq!(no_duplicates(&lab)?, 12);
    Ok(outcome)
}

#[test]
fn d4c_the_watermark_comes_from_source_data_so_the_host_clock_does_not_matter() -> TestResult {
    // The host cannot set its own clock back in a test; instead the source's stamps
    // move against it: far in the past, far in the future, and ten minutes either
    // side of now (a host clock skewed by −10 min or +10 min). SQLite computes each
    // base from its own clock.
    let lab = Lab::new("", "")?;
    let near: Vec<String> = lab
        .rows(
            "s.db",
            "SELECT datetime('now', '+10 minutes'), datetime('now', '-10 minutes')",
        )?
        .concat();
    let bases = [
        "1999-01-01 00:00:00",
        "2199-12-31 20:00:00",
        near[0].as_str(),
        near[1].as_str(),
    ];
    let reference = d4_story(bases[0])?;
    assert_eq!(
        reference,
        [
            (RunStatus::Success, 10, 0, 0, 10, 0),
            (RunStatus::Success, 1, 0, 0, 2, 0),
            (RunStatus::Success, 1, 0, 0, 3, 0),
            (RunStatus::Success, 0, 0, 0, 3, 0),
        ]
    );
    for base in &bases[1..] {
        assert_eq!(d4_story(base)?, reference, "source stamps from {base}");
    }
    Ok(())
}

// ---- D5 -----------------------------------------------------------------------------

fn d5_lab(destination_sql: &str) -> Result<Lab, Error> {
    Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, 20, "2024-05-01 10:00:00", 60)
        ),
        destination_sql,
    )
}

#[test]
fn d5a_a_row_deleted_in_the_source_is_deleted_in_the_destination() -> TestResult {
    let lab = d5_lab(D_CUSTOMERS)?;
    let schema = customers_schema(&["name", "email"]);
    assert_eq!(lab.run(&schema).status, RunStatus::Success);
    lab.s("DELETE FROM customers WHERE id = 7")?;
    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 0, 0, 1, 0),
        "{report:?}"
    );
    assert_eq!(
        lab.count(
            "d.db",
            "SELECT count(*) FROM customers WHERE customer_id = 7"
        )?,
        0
    );
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 19);
    Ok(())
}

#[test]
fn d5a_with_on_missing_soft_delete_the_destination_row_is_marked_and_revived() -> TestResult {
    let lab = d5_lab(
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, email TEXT,
                                 is_deleted BOOLEAN NOT NULL DEFAULT 0);",
    )?;
    let mut schema = customers_schema(&["name", "email"]);
    schema.on_missing = OnMissing::SoftDelete {
        field: "is_deleted".into(),
    };
    assert_eq!(lab.run(&schema).status, RunStatus::Success);
    lab.s("DELETE FROM customers WHERE id = 7")?;
    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 0, 0, 1, 0),
        "{report:?}"
    );
    let seven = "SELECT customer_id, email, is_deleted FROM customers WHERE customer_id = 7";
    assert_eq!(
        lab.rows("d.db", seven)?,
        [row(&["7", "c7@example.org", "1"])]
    );
    assert_eq!(
        lab.count("d.db", "SELECT count(*) FROM customers WHERE is_deleted")?,
        1
    );

    // Back in S: the destination row lives again, with the new values.
    lab.s("INSERT INTO customers VALUES (7, 'customer 7', 'again7@example.org', NULL)")?;
    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 1, 0, 0, 0),
        "{report:?}"
    );
    assert_eq!(
        lab.rows("d.db", seven)?,
        [row(&["7", "again7@example.org", "0"])]
    );
    Ok(())
}

const D5B_SOURCE: &str = "
    CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, updated_at TEXT,
                            deleted_at TEXT);";

fn d5b_schema() -> SyncSchema {
    let mut schema = incremental_schema(&["name", "email"], 0);
    schema.source.deleted_field = Some("deleted_at".into());
    schema
}

/// Sets (or clears, with `None`) row `id`'s tombstone, stamping the change.
fn d5b_tombstone(lab: &Lab, id: u32, deleted_at: Option<&str>, stamp: &str) -> TestResult {
    let value = deleted_at.map_or("NULL".to_string(), |d| format!("'{d}'"));
    lab.s(&format!(
        "UPDATE customers SET deleted_at = {value}, updated_at = '{stamp}' WHERE id = {id}"
    ))
}

#[test]
fn d5b_a_tombstone_column_in_the_source_deletes_the_row_in_the_destination() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{D5B_SOURCE}{}",
            insert_customers(1, 20, "2024-05-01 10:00:00", 60)
        ),
        D_CUSTOMERS,
    )?;
    let schema = d5b_schema();
    let first = lab.run(&schema);
    assert_eq!(counts(&first), (RunStatus::Success, 20, 0, 0, 0));
    assert!(
        first.warnings.is_empty(),
        "a tombstone column sees deletes: {:?}",
        first.warnings
    );

    d5b_tombstone(&lab, 4, Some("2024-06-01 00:00:00"), "2024-06-01 00:00:00")?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 0, 0, 1, 0),
        "{second:?}"
    );
    assert_eq!(
        lab.count(
            "d.db",
            "SELECT count(*) FROM customers WHERE customer_id = 4"
        )?,
        0
    );
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 19);

    // Clearing the tombstone brings the row back.
    d5b_tombstone(&lab, 4, None, "2024-06-02 00:00:00")?;
    let third = lab.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 1, 0, 0, 0),
        "{third:?}"
    );
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 20);
    Ok(())
}

#[test]
fn d5b_a_source_tombstone_soft_deletes_into_a_destination_tombstone_field() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{D5B_SOURCE}{}",
            insert_customers(1, 20, "2024-05-01 10:00:00", 60)
        ),
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, email TEXT,
                                 is_deleted BOOLEAN NOT NULL DEFAULT 0);",
    )?;
    let mut schema = d5b_schema();
    schema.destination.deleted_field = Some("is_deleted".into());
    assert_eq!(lab.run(&schema).status, RunStatus::Success);

    d5b_tombstone(&lab, 4, Some("2024-06-01 00:00:00"), "2024-06-01 00:00:00")?;
    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 0, 0, 1, 0),
        "{report:?}"
    );
    let four = "SELECT customer_id, name, is_deleted FROM customers WHERE customer_id = 4";
    assert_eq!(lab.rows("d.db", four)?, [row(&["4", "customer 4", "1"])]);
    assert_eq!(
        lab.count(
            "d.db",
            "SELECT count(*) FROM customers WHERE NOT is_deleted"
        )?,
        19
    );
    Ok(())
}

#[test]
fn d5c_an_unreadable_source_fails_the_run_and_moves_neither_data_nor_watermark() -> TestResult {
    let lab = d5_lab(D_CUSTOMERS)?;
    let schema = incremental_schema(&["name", "email"], 0);
    let first = lab.run(&schema);
    assert_eq!(first.status, RunStatus::Success);
    let before = lab.destination_rows()?;

    // A change the failed run must not skip past.
    lab.s(
        "UPDATE customers SET email = 'late@example.org', updated_at = '2024-06-01 00:00:00' \
           WHERE id = 3",
    )?;
    std::fs::rename(lab.path("s.db"), lab.path("s.db.away"))?;
    let failed = lab.run(&schema);
    assert_eq!(failed.status, RunStatus::Failed, "{failed:?}");
    assert!(
        failed.message.contains("datasource s"),
        "{}",
        failed.message
    );
    // Read D alone: opening the missing s.db would create it.
    assert_eq!(lab.destination_rows()?, before, "D unchanged");

    std::fs::rename(lab.path("s.db.away"), lab.path("s.db"))?;
    let third = lab.run(&schema);
    assert_eq!(third.watermark_before, first.watermark_after, "{third:?}");
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 0, 1, 0, 0),
        "{third:?}"
    );
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    Ok(())
}

#[test]
fn d5d_a_source_read_back_empty_is_refused_unless_mass_delete_is_allowed() -> TestResult {
    let lab = d5_lab(D_CUSTOMERS)?;
    let mut schema = customers_schema(&["name", "email"]);
    assert_eq!(lab.run(&schema).status, RunStatus::Success);
    lab.s("DELETE FROM customers")?;
    let refused = lab.run(&schema);
    assert_eq!(refused.status, RunStatus::Failed);
    assert!(
        refused.message.contains("allow_mass_delete"),
        "{}",
        refused.message
    );
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 20);

    schema.allow_mass_delete = true;
    let allowed = lab.run(&schema);
    assert_eq!(counts(&allowed), (RunStatus::Success, 0, 0, 20, 0));
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 0);
    Ok(())
}

// ---- D6 -----------------------------------------------------------------------------

#[test]
fn d6_a_full_rerun_on_unchanged_data_moves_nothing_and_one_edit_is_one_update() -> TestResult {
    let lab = d5_lab(D_CUSTOMERS)?;
    let schema = customers_schema(&["name", "email"]);
    assert_eq!(counts(&lab.run(&schema)), (RunStatus::Success, 20, 0, 0, 0));
    let again = lab.run(&schema);
    assert_eq!(
        counts(&again),
        (RunStatus::Success, 0, 0, 0, 0),
        "{again:?}"
    );
    assert_eq!(again.applied, 0);
    assert_eq!(no_duplicates(&lab)?, 20);

    lab.s("UPDATE customers SET name = 'Ada' WHERE id = 13")?;
    let edit = lab.run(&schema);
    assert_eq!(counts(&edit), (RunStatus::Success, 0, 1, 0, 0), "{edit:?}");
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    Ok(())
}

// ---- D7 -----------------------------------------------------------------------------

/// Ten customers synced both ways once; then S sets row 5's email to `a@x`, D sets it
/// to `b@y` (later), and D alone renames row 6.
fn d7_lab(conflict: ConflictRule) -> Result<(Lab, SyncSchema), Error> {
    let lab = Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, 10, "2024-05-01 10:00:00", 60)
        ),
        D_CUSTOMERS,
    )?;
    let mut schema = customers_schema(&["name", "email"]);
    schema.direction = SyncDirection::Bidirectional;
    schema.conflict = conflict;
    let clean = lab.run(&schema);
    assert_eq!(
        counts(&clean),
        (RunStatus::Success, 10, 0, 0, 0),
        "{clean:?}"
    );
    lab.s("UPDATE customers SET email = 'a@x' WHERE id = 5")?;
    lab.d("UPDATE customers SET email = 'b@y' WHERE customer_id = 5;
           UPDATE customers SET name = 'Six' WHERE customer_id = 6;")?;
    Ok((lab, schema))
}

fn email_conflict(winner: Winner) -> RowConflict {
    RowConflict {
        key: vec!["5".into()],
        field: Some("email".into()),
        kind: ConflictType::UpdateUpdate,
        source: Some(Value::Text("a@x".into())),
        destination: Some(Value::Text("b@y".into())),
        winner,
    }
}

fn d7_row(lab: &Lab, id: u32) -> Result<(Vec<String>, Vec<String>), Error> {
    let s = lab.rows(
        "s.db",
        &format!("SELECT id, name, email FROM customers WHERE id = {id}"),
    )?;
    let d = lab.rows(
        "d.db",
        &format!("SELECT customer_id, name, email FROM customers WHERE customer_id = {id}"),
    )?;
    Ok((s.concat(), d.concat()))
}

/// A first bidirectional run over two sides that both hold row 2, each its own way.
/// Both sides load for the first time and commit as they read; the source's rows are
/// still the earlier, so under last-writer-wins the destination's row 2 wins, every
/// time (a destination whose versions came first would lose, or tie on the millisecond
/// and fall to the replica ids).
#[test]
fn a_first_bidirectional_run_orders_the_destinations_rows_after_the_sources() -> TestResult {
    for _ in 0..5 {
        let lab = Lab::new(
            &format!(
                "{S_CUSTOMERS}{}",
                insert_customers(1, 3, "2024-05-01 10:00:00", 60)
            ),
            &format!(
                "{D_CUSTOMERS}INSERT INTO customers VALUES (2, 'Two', 'two@d.org'), \
                 (4, 'Four', 'four@d.org');"
            ),
        )?;
        let mut schema = customers_schema(&["name", "email"]);
        schema.direction = SyncDirection::Bidirectional;
        schema.conflict = ConflictRule::LastWriterWins;
        let report = lab.run(&schema);
        assert_eq!(report.status, RunStatus::Success, "{report:?}");
        let winners: Vec<Winner> = report.conflicts.iter().map(|c| c.winner).collect();
        assert_eq!(winners, [Winner::Destination], "{:?}", report.conflicts);
        let two = row(&["2", "Two", "two@d.org"]);
        assert_eq!(d7_row(&lab, 2)?, (two.clone(), two));
        let (s, d) = lab.both_sides()?;
        assert_eq!((s.len(), s), (4, d));
    }
    Ok(())
}

#[test]
fn d7a_source_wins_settles_one_field_conflict_and_a_rerun_echoes_nothing() -> TestResult {
    let (lab, schema) = d7_lab(ConflictRule::SourceWins)?;
    let report = lab.run(&schema);
    assert_eq!(report.status, RunStatus::Success, "{report:?}");
    assert_eq!(report.conflicts, [email_conflict(Winner::Source)]);
    let five = row(&["5", "customer 5", "a@x"]);
    assert_eq!(d7_row(&lab, 5)?, (five.clone(), five));
    let six = row(&["6", "Six", "c6@example.org"]);
    assert_eq!(d7_row(&lab, 6)?, (six.clone(), six), "row 6 flowed D→S");
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);

    let again = lab.run(&schema);
    assert_eq!(
        counts(&again),
        (RunStatus::Success, 0, 0, 0, 0),
        "{again:?}"
    );
    assert_eq!(
        (again.sent, again.applied, again.conflicts.len()),
        (0, 0, 0),
        "no echo: {again:?}"
    );
    Ok(())
}

#[test]
fn d7b_last_writer_wins_settles_the_conflict_alike_on_both_sides() -> TestResult {
    let (lab, schema) = d7_lab(ConflictRule::LastWriterWins)?;
    let report = lab.run(&schema);
    assert_eq!(report.status, RunStatus::Success, "{report:?}");
    let [conflict] = report.conflicts.as_slice() else {
        return Err(format!("expected one conflict: {:?}", report.conflicts).into());
    };
    let email = match conflict.winner {
        Winner::Source => "a@x",
        Winner::Destination => "b@y",
        Winner::Unresolved => return Err("last_writer_wins left a conflict unresolved".into()),
    };
    assert_eq!(conflict, &email_conflict(conflict.winner));
    let five = row(&["5", "customer 5", email]);
    assert_eq!(d7_row(&lab, 5)?, (five.clone(), five));
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    let again = lab.run(&schema);
    assert_eq!(
        counts(&again),
        (RunStatus::Success, 0, 0, 0, 0),
        "{again:?}"
    );
    assert_eq!((again.applied, again.conflicts.len()), (0, 0));
    Ok(())
}

#[test]
fn d7b_last_writer_wins_keeps_the_later_edit() -> TestResult {
    // D's edit is made after S's, and found after it (a run reads S first). Run many
    // times so that a tie shows up.
    for attempt in 0..20 {
        let (lab, schema) = d7_lab(ConflictRule::LastWriterWins)?;
        let report = lab.run(&schema);
        assert_eq!(
            report.conflicts,
            [email_conflict(Winner::Destination)],
            "attempt {attempt}"
        );
        let five = row(&["5", "customer 5", "b@y"]);
        assert_eq!(d7_row(&lab, 5)?, (five.clone(), five), "attempt {attempt}");
    }
    Ok(())
}

#[test]
fn d7c_manual_leaves_the_row_untouched_on_both_sides_and_records_it_unresolved() -> TestResult {
    let (lab, schema) = d7_lab(ConflictRule::Manual)?;
    let report = lab.run(&schema);
    assert_eq!(report.conflicts, [email_conflict(Winner::Unresolved)]);
    assert_eq!(
        d7_row(&lab, 5)?,
        (
            row(&["5", "customer 5", "a@x"]),
            row(&["5", "customer 5", "b@y"])
        )
    );
    let six = row(&["6", "Six", "c6@example.org"]);
    assert_eq!(d7_row(&lab, 6)?, (six.clone(), six), "row 6 still flows");
    Ok(())
}

// ---- D8 -----------------------------------------------------------------------------

/// Twenty customers synced both ways; then S deletes row 9 while D updates it.
fn d8_lab(conflict: ConflictRule) -> Result<(Lab, SyncSchema), Error> {
    let lab = d5_lab(D_CUSTOMERS)?;
    let mut schema = customers_schema(&["name", "email"]);
    schema.direction = SyncDirection::Bidirectional;
    schema.conflict = conflict;
    assert_eq!(lab.run(&schema).status, RunStatus::Success);
    lab.s("DELETE FROM customers WHERE id = 9")?;
    lab.d("UPDATE customers SET email = 'kept9@example.org' WHERE customer_id = 9")?;
    Ok((lab, schema))
}

fn update_delete(winner: Winner) -> RowConflict {
    RowConflict {
        key: vec!["9".into()],
        field: None,
        kind: ConflictType::UpdateDelete,
        source: None,
        destination: None,
        winner,
    }
}

#[test]
fn d8a_source_wins_deletes_the_updated_row_on_both_sides() -> TestResult {
    let (lab, schema) = d8_lab(ConflictRule::SourceWins)?;
    let report = lab.run(&schema);
    assert_eq!(report.status, RunStatus::Success, "{report:?}");
    assert_eq!(report.conflicts, [update_delete(Winner::Source)]);
    assert_eq!(d7_row(&lab, 9)?, (vec![], vec![]));
    let (s, d) = lab.both_sides()?;
    assert_eq!((s.len(), &s), (19, &d));
    let again = lab.run(&schema);
    assert_eq!(
        counts(&again),
        (RunStatus::Success, 0, 0, 0, 0),
        "{again:?}"
    );
    Ok(())
}

#[test]
fn d8b_destination_wins_restores_the_deleted_row_in_the_source() -> TestResult {
    let (lab, schema) = d8_lab(ConflictRule::DestinationWins)?;
    let report = lab.run(&schema);
    assert_eq!(report.status, RunStatus::Success, "{report:?}");
    assert_eq!(report.conflicts, [update_delete(Winner::Destination)]);
    let nine = row(&["9", "customer 9", "kept9@example.org"]);
    assert_eq!(d7_row(&lab, 9)?, (nine.clone(), nine));
    let (s, d) = lab.both_sides()?;
    assert_eq!((s.len(), &s), (20, &d));
    let again = lab.run(&schema);
    assert_eq!(
        counts(&again),
        (RunStatus::Success, 0, 0, 0, 0),
        "{again:?}"
    );
    Ok(())
}

// ---- D9 -----------------------------------------------------------------------------

/// D9's four mistakes against real entities (S `customers(id, full_name, email)`, D
/// `customers(customer_id, name, email)`), and two sources onto D's `name`.
const D9_FILE: &str = r#"
[[schema]]
id = "customers"
sync_type = "Incremantal"
direction = "OneWay"

[schema.source]
datasource = "s"
entity = "customers"
key = ["id"]

[schema.destination]
datasource = "d"
entity = "customers"
key = ["customer_idd"]

[[schema.mappings]]
source = "id"
destination = "customer_id"

[[schema.mappings]]
source = "fulname"
destination = "name"

[[schema.mappings]]
source = "email"
destination = "name"
"#;

#[test]
fn d9_validation_against_real_datasources_names_each_field_and_touches_no_data() -> TestResult {
    let lab = Lab::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, full_name TEXT, email TEXT);
         INSERT INTO customers VALUES (1, 'Ada Lovelace', 'ada@example.org');",
        D_CUSTOMERS,
    )?;
    let source_before = std::fs::read(lab.path("s.db"))?;
    let destination_before = std::fs::read(lab.path("d.db"))?;
    let problems = SchemaSet::check_toml(D9_FILE, |endpoint| {
        lab.datasources
            .open(&endpoint.datasource)
            .ok()?
            .describe(&endpoint.entity)
            .ok()
    });
    let seen: Vec<(String, String, Option<String>)> = problems
        .iter()
        .map(|p| {
            (
                p.location(),
                p.value().to_string(),
                p.suggestion().map(str::to_string),
            )
        })
        .collect();
    for (location, value, suggestion) in [
        ("customers.sync_type", "Incremantal", "incremental"),
        ("customers.direction", "OneWay", "source_to_destination"),
        (
            "customers.destination.key[0]",
            "customer_idd",
            "customer_id",
        ),
        ("customers.mappings[1].source", "fulname", "full_name"),
    ] {
        let suggestion = format!("did you mean {suggestion:?}?");
        assert!(
            seen.iter().any(|(l, v, s)| l == location
                && v == value
                && s.as_deref() == Some(suggestion.as_str())),
            "{location} = {value:?} ({suggestion}) not in {seen:#?}"
        );
    }
    let duplicates = problems
        .iter()
        .filter(|p| matches!(p, SchemaError::DuplicateDestination { .. }))
        .count();
    assert_eq!(duplicates, 1, "{problems:#?}");
    assert_eq!(problems.len(), 5, "{problems:#?}");

    // Validation read descriptions only.
    assert_eq!(std::fs::read(lab.path("s.db"))?, source_before);
    assert_eq!(std::fs::read(lab.path("d.db"))?, destination_before);
    assert!(!lab.state().exists());
    Ok(())
}

// ---- D10 ----------------------------------------------------------------------------

#[test]
fn d10_a_cancelled_run_leaves_whole_batches_and_the_next_run_finishes_the_rest() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, 1000, "2024-05-01 10:00:00", 1)
        ),
        D_CUSTOMERS,
    )?;
    let schema = customers_schema(&["name", "email"]);

    // Cancelled once 37 batches of 10 rows have committed.
    let (first, events) = lab.run_watched(&schema, Some(37 * u64::from(BATCH)));
    assert_eq!(first.status, RunStatus::Cancelled, "{first:?}");
    assert_eq!(events.last().map(|e| e.phase), Some(RunPhase::Cancelled));
    assert_eq!(first.applied, 370, "{first:?}");
    assert_eq!(no_duplicates(&lab)?, 370);
    assert_eq!(
        lab.count(
            "d.db",
            "SELECT count(*) FROM customers WHERE name IS NULL OR email IS NULL"
        )?,
        0,
        "no half-written row"
    );

    let (second, events) = lab.run_watched(&schema, None);
    assert_eq!(second.status, RunStatus::Success, "{second:?}");
    assert_eq!(events.last().and_then(|e| e.total), Some(630), "{events:?}");
    assert_eq!(first.applied + second.applied, 1000);
    assert_eq!(first.inserted + second.inserted, 1000);
    assert_eq!(no_duplicates(&lab)?, 1000);
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    Ok(())
}

// ---- D11 ----------------------------------------------------------------------------

const CHILD_DIR: &str = "KNIT_DATASOURCE_CHILD";
/// Every line the child reports starts with this marker; libtest's output is ignored.
const MARK: &str = "KNIT-DATASOURCE";
/// Rows of the kill test (30 batches), and the rows done when the parent kills: the end
/// of batch 11, while the child pauses in its progress callback before batch 12.
const KILL_ROWS: u32 = 300;
const KILL_AT: u64 = 110;

/// D without a primary key, so that a row written twice would show as a duplicate.
const D_NO_KEY: &str = "CREATE TABLE customers (customer_id INTEGER, name TEXT, email TEXT);";

/// The child's entry point (see the module comment). Does nothing in a normal run.
#[test]
fn d11_child_process() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return Ok(());
    };
    let lab = Lab::at(Path::new(&dir))?;
    let report = lab.run_with(
        &customers_schema(&["name", "email"]),
        &CancelToken::new(),
        &mut |p| {
            println!("{MARK} {}", p.done);
            // Slow enough for the parent's SIGKILL to land mid-run.
            if p.phase == RunPhase::Syncing {
                std::thread::sleep(Duration::from_millis(20));
            }
        },
    );
    println!("{MARK} done {:?}", report.status);
    Ok(())
}

/// Starts the child on `lab`, kills it (SIGKILL) once it reports `KILL_AT` rows done.
fn run_child_and_kill(lab: &Lab) -> TestResult {
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "d11_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, &lab.root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("child stdout")?;
    // Read the child's stdout to its end in a thread, so it never dies of a broken pipe
    // instead of the SIGKILL.
    let (lines, reports) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(at) = line.find(MARK) {
                let _ = lines.send(line[at + MARK.len()..].trim().to_string());
            }
        }
    });
    let mut reached = false;
    let mut ended = None;
    for word in reports.iter() {
        if word.starts_with("done") {
            ended = Some(word);
            break;
        }
        if word.parse::<u64>()? >= KILL_AT {
            reached = true;
            break;
        }
    }
    if ended.is_none() {
        child.kill()?;
    }
    child.wait()?;
    reader.join().map_err(|_| "stdout reader panicked")?;
    match (reached, ended) {
        (true, _) => Ok(()),
        (false, Some(end)) => Err(format!("the child finished before the kill: {end}").into()),
        (false, None) => Err("the child stopped before reporting its progress".into()),
    }
}

#[test]
fn d11a_a_run_killed_mid_batch_is_finished_by_the_next_without_duplicates() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, KILL_ROWS, "2024-05-01 10:00:00", 1)
        ),
        D_NO_KEY,
    )?;
    run_child_and_kill(&lab)?;
    let history = History::new(&lab.state(), 10);
    let listed: Vec<String> = history
        .list("customers")?
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(listed, ["running"], "the killed run left its marker");

    let report = lab.run(&customers_schema(&["name", "email"]));
    assert_eq!(report.status, RunStatus::Success, "{report:?}");
    // Rows the killed run staged are written at open; the rest are sent now.
    assert_eq!(report.applied, u64::from(KILL_ROWS), "{report:?}");
    assert_eq!(no_duplicates(&lab)?, i64::from(KILL_ROWS));
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    let listed: Vec<String> = history
        .list("customers")?
        .into_iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(listed, ["interrupted", "success"]);
    Ok(())
}

/// D refuses names starting with `bad`; S's rows 4, 9 and 15 have such names.
fn d11_constraint_lab() -> Result<Lab, Error> {
    let lab = d5_lab(
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY,
                                 name TEXT NOT NULL CHECK (name NOT LIKE 'bad%'), email TEXT);",
    )?;
    lab.s("UPDATE customers SET name = 'bad ' || id WHERE id IN (4, 9, 15)")?;
    Ok(lab)
}

/// Checks that a run refused exactly rows 4, 9 and 15, each once, with SQLite's message,
/// and applied the other 17.
fn assert_refused_three(lab: &Lab, report: &RunReport) -> TestResult {
    assert_eq!(report.status, RunStatus::Partial, "{report:?}");
    assert_eq!(report.failed, 3, "{report:?}");
    assert_eq!(report.errors.len(), 3, "{report:?}");
    assert_eq!(keys_of(report), set(&["15", "4", "9"]), "{report:?}");
    for error in &report.errors {
        assert!(error.reason.contains("CHECK constraint failed"), "{error}");
    }
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 17);
    Ok(())
}

#[test]
fn d11b_rows_a_destination_constraint_refuses_fail_alone_and_arrive_once_it_is_lifted() -> TestResult
{
    let lab = d11_constraint_lab()?;
    let schema = customers_schema(&["name", "email"]);
    let report = lab.run(&schema);
    assert_refused_three(&lab, &report)?;
    assert_eq!(report.inserted, 20, "{report:?}");

    // Lift the constraint (SQLite rebuilds the table to drop a CHECK); the refused
    // rows were queued, so the next run writes them although S did not change.
    lab.d(
        "CREATE TABLE fixed (customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT);
           INSERT INTO fixed SELECT * FROM customers;
           DROP TABLE customers;
           ALTER TABLE fixed RENAME TO customers;",
    )?;
    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 0, 0, 0, 0),
        "{report:?}"
    );
    assert_eq!(report.applied, 3, "{report:?}");
    let (s, d) = lab.both_sides()?;
    assert_eq!(s, d);
    assert_eq!(d.len(), 20);
    Ok(())
}

#[test]
fn d11b_a_row_refused_again_by_the_next_run_is_reported_once() -> TestResult {
    let lab = d11_constraint_lab()?;
    let schema = customers_schema(&["name", "email"]);
    assert_refused_three(&lab, &lab.run(&schema))?;
    // Nothing changed: the queued rows are tried again and refused again, once each.
    assert_refused_three(&lab, &lab.run(&schema))?;
    Ok(())
}

#[test]
fn d11c_a_row_that_failed_to_read_is_retried_by_the_next_incremental_run() -> TestResult {
    let lab = Lab::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, age TEXT, updated_at TEXT);
         INSERT INTO customers VALUES (1, 'Ada', '36', '2024-05-01 10:00:01'),
                                      (2, 'Grace', '45', '2024-05-01 10:00:02');",
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER);",
    )?;
    let mut schema = incremental_schema(&["name"], 0);
    schema
        .mappings
        .push(Mapping::new("age", "age", Some(Transform::Int)));
    assert_eq!(lab.run(&schema).status, RunStatus::Success);

    lab.s(
        "INSERT INTO customers VALUES (3, 'Edsger', 'x', '2024-05-01 10:00:03'),
                                        (4, 'Barbara', '50', '2024-05-01 10:00:04');",
    )?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Partial, 1, 0, 0, 1),
        "{second:?}"
    );
    assert_eq!(keys_of(&second), set(&["3"]));

    // Nothing changed in S: the failed row is read (and refused) again, because the
    // watermark did not pass it or the row was queued.
    let third = lab.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Partial, 0, 0, 0, 1),
        "{third:?}"
    );

    // Repaired in place, with its stamp untouched: it arrives.
    lab.s("UPDATE customers SET age = '70' WHERE id = 3")?;
    let fourth = lab.run(&schema);
    assert_eq!(
        counts(&fourth),
        (RunStatus::Success, 1, 0, 0, 0),
        "{fourth:?}"
    );
    assert_eq!(
        lab.rows("d.db", "SELECT age FROM customers WHERE customer_id = 3")?,
        [row(&["70"])]
    );
    Ok(())
}

#[test]
fn d11d_more_failures_than_max_errors_fail_the_run() -> TestResult {
    // Failures found while reading S: nothing is sent.
    let lab = Lab::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, age TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20)
         INSERT INTO customers SELECT i, 'customer ' || i,
                CASE WHEN i IN (2, 7, 11) THEN 'x' ELSE '' || (20 + i) END FROM n;",
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER);",
    )?;
    let mut schema = customers_schema(&["name"]);
    schema
        .mappings
        .push(Mapping::new("age", "age", Some(Transform::Int)));
    schema.max_errors = Some(2);
    let report = lab.run(&schema);
    assert_eq!(report.status, RunStatus::Failed, "{report:?}");
    assert!(report.message.contains("max_errors"), "{}", report.message);
    assert_eq!(lab.count("d.db", "SELECT count(*) FROM customers")?, 0);
    // At the limit, the run goes through.
    schema.max_errors = Some(3);
    let report = lab.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Partial, 17, 0, 0, 3),
        "{report:?}"
    );

    // Rows D refuses count against the limit as well.
    let lab = d11_constraint_lab()?;
    let mut schema = customers_schema(&["name", "email"]);
    schema.max_errors = Some(2);
    let report = lab.run(&schema);
    assert_eq!((report.status, report.failed), (RunStatus::Failed, 3));
    assert!(report.message.contains("max_errors"), "{}", report.message);
    Ok(())
}

// ---- D13 ----------------------------------------------------------------------------

#[test]
fn d13_progress_is_monotonic_and_ends_at_100_percent_exactly_once() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, 2500, "2024-05-01 10:00:00", 1)
        ),
        D_CUSTOMERS,
    )?;
    let (report, events) = lab.run_watched(&customers_schema(&["name", "email"]), None);
    assert_eq!(report.status, RunStatus::Success);
    // A long read reports as it goes: at least every thousand rows read.
    for pair in events.windows(2) {
        assert!(
            pair[1].rows_read - pair[0].rows_read <= 1000,
            "reading gap: {pair:?}"
        );
    }

    let reading = events
        .iter()
        .take_while(|e| e.phase == RunPhase::Reading)
        .count();
    assert!(reading >= 1, "{events:#?}");
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.schema, "customers");
        if i < reading {
            assert_eq!((e.total, e.percent), (None, None), "reading: {e:?}");
        } else {
            assert_ne!(e.phase, RunPhase::Reading, "reading after syncing: {e:?}");
            assert_eq!(e.total, Some(2500), "total known after reading: {e:?}");
        }
    }
    for pair in events.windows(2) {
        assert!(pair[0].done <= pair[1].done, "done went down: {pair:?}");
        // At least one event per batch.
        assert!(
            pair[1].done - pair[0].done <= u64::from(BATCH),
            "gap: {pair:?}"
        );
    }
    let hundred: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.percent == Some(100))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hundred, [events.len() - 1], "{events:#?}");
    let last = events.last().ok_or("no events")?;
    assert_eq!(
        (last.phase, last.done, last.total),
        (RunPhase::Done, 2500, Some(2500))
    );
    Ok(())
}

#[test]
fn d13_the_last_event_of_a_cancelled_run_says_cancelled() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, 60, "2024-05-01 10:00:00", 1)
        ),
        D_CUSTOMERS,
    )?;
    let (report, events) = lab.run_watched(&customers_schema(&["name", "email"]), Some(20));
    assert_eq!(report.status, RunStatus::Cancelled, "{report:?}");
    let last = events.last().ok_or("no events")?;
    assert_eq!(last.phase, RunPhase::Cancelled, "{events:#?}");
    assert!(events.iter().all(|e| e.percent != Some(100)), "{events:#?}");
    assert!(last.done < 60);
    Ok(())
}

// ---- D14 ----------------------------------------------------------------------------

#[test]
fn d14a_every_run_leaves_a_bounded_history_record_apart_from_the_schema_file() -> TestResult {
    let lab = Lab::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, age TEXT, updated_at TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20)
         INSERT INTO customers SELECT i, 'customer ' || i, '' || (20 + i),
                datetime('2024-05-01 10:00:00', '+' || i || ' minutes') FROM n;",
        "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER);",
    )?;
    let mut schema = incremental_schema(&["name"], 0);
    schema
        .mappings
        .push(Mapping::new("age", "age", Some(Transform::Int)));
    let file = lab.path("schemas.toml");
    let state = SyncManager::default_state_dir(&file);
    let mut manager = SyncManager::load(&file, lab.datasources.clone(), &state)?;
    manager.add(schema)?;
    manager.save()?;
    let mut reports = Vec::new();
    let quiet = CancelToken::new();

    // Success.
    reports.push(manager.sync("customers", &quiet, &mut |_| {})?);
    // Partial: one new row cannot be converted.
    lab.s(
        "INSERT INTO customers VALUES (21, 'customer 21', 'x', '2024-05-02 00:00:00'),
                                        (22, 'customer 22', '42', '2024-05-02 00:00:01');",
    )?;
    reports.push(manager.sync("customers", &quiet, &mut |_| {})?);
    // Failed: the source is gone.
    std::fs::rename(lab.path("s.db"), lab.path("s.db.away"))?;
    reports.push(manager.sync("customers", &quiet, &mut |_| {})?);
    std::fs::rename(lab.path("s.db.away"), lab.path("s.db"))?;
    // Cancelled after the first batch of thirty new rows.
    lab.s(
        "WITH RECURSIVE n(i) AS (SELECT 30 UNION ALL SELECT i + 1 FROM n WHERE i < 59)
           INSERT INTO customers SELECT i, 'customer ' || i, '' || i,
                  datetime('2024-05-03 00:00:00', '+' || i || ' seconds') FROM n;",
    )?;
    let cancel = CancelToken::new();
    reports.push(manager.sync("customers", &cancel, &mut |p| {
        if p.done >= u64::from(BATCH) {
            cancel.cancel();
        }
    })?);

    let statuses: Vec<RunStatus> = reports.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            RunStatus::Success,
            RunStatus::Partial,
            RunStatus::Failed,
            RunStatus::Cancelled
        ],
        "{reports:#?}"
    );
    let records = manager.history(Some("customers"))?;
    let expected: Vec<knit::RunRecord> = reports.iter().map(RunReport::to_record).collect();
    assert_eq!(records, expected);
    assert_eq!(records[0].inserted, 20);
    assert_eq!(
        records[0].watermark_after.as_deref(),
        Some("2024-05-01 10:20:00")
    );
    assert_eq!((records[1].failed, records[1].errors.len()), (1, 1));
    assert_eq!(records[1].watermark_before, records[0].watermark_after);
    assert_eq!(
        records[1].watermark_after.as_deref(),
        Some("2024-05-02 00:00:01")
    );
    assert_eq!(records[3].watermark_before, records[1].watermark_after);
    assert!(records
        .iter()
        .all(|r| !r.started.is_empty() && !r.ended.is_empty()));

    // Stored apart: the schema file holds the last status, never the runs.
    let schema_text = std::fs::read_to_string(&file)?;
    assert!(
        schema_text.contains("status = \"cancelled\""),
        "{schema_text}"
    );
    assert!(!schema_text.contains("watermark"), "{schema_text}");
    assert!(state.join("customers").join("history.jsonl").exists());

    // Bounded: with a retention of 2, one more record leaves the newest two.
    let bounded = History::new(&state, 2);
    let mut extra = expected[0].clone();
    extra.started = "2030-01-01T00:00:00Z".into();
    bounded.finish(&extra)?;
    assert_eq!(bounded.list("customers")?, [expected[3].clone(), extra]);
    Ok(())
}

#[test]
fn d14b_destination_to_source_moves_data_that_way_only() -> TestResult {
    let lab = Lab::new(
        &format!(
            "{S_CUSTOMERS}{}",
            insert_customers(1, 3, "2024-05-01 10:00:00", 60)
        ),
        &format!(
            "{D_CUSTOMERS}
             INSERT INTO customers VALUES (7, 'Grace', 'grace@example.org'),
                                          (8, 'Edsger', 'edsger@example.org');"
        ),
    )?;
    let mut schema = customers_schema(&["name", "email"]);
    schema.direction = SyncDirection::DestinationToSource;
    let first = lab.run(&schema);
    assert_eq!(
        counts(&first),
        (RunStatus::Success, 2, 0, 0, 0),
        "{first:?}"
    );
    let (s, d) = lab.both_sides()?;
    assert_eq!(s.len(), 5);
    assert_eq!(d.len(), 2, "S's own rows do not travel");
    assert!(s.contains(&row(&["7", "Grace", "grace@example.org"])));

    lab.s("UPDATE customers SET name = 'S only' WHERE id IN (1, 7)")?;
    lab.d("UPDATE customers SET email = 'e@example.org' WHERE customer_id = 8")?;
    let second = lab.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 0, 1, 0, 0),
        "{second:?}"
    );
    assert_eq!(
        lab.rows("d.db", "SELECT customer_id, name FROM customers ORDER BY 1")?,
        [row(&["7", "Grace"]), row(&["8", "Edsger"])],
        "nothing flowed S→D"
    );
    assert_eq!(
        lab.rows("s.db", "SELECT email FROM customers WHERE id = 8")?,
        [row(&["e@example.org"])]
    );
    Ok(())
}

// ---- D15 ----------------------------------------------------------------------------

/// Four schemas from S's tables `a`..`d` (5, 7, 9 and 11 rows): `a` and `b` into tables
/// of the one SQLite file `d.db`, `c` into `csv/c.csv`, `d` into `e.db`.
fn d15_lab() -> Result<(Lab, Vec<(SyncSchema, u64)>), Error> {
    let tables = [("a", 5u32), ("b", 7), ("c", 9), ("d", 11)];
    let mut source = String::new();
    for (table, rows) in tables {
        source.push_str(&format!(
            "CREATE TABLE {table} (id INTEGER PRIMARY KEY, name TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO {table} SELECT i, '{table} ' || i FROM n;"
        ));
    }
    let lab = Lab::new(
        &source,
        "CREATE TABLE a (id INTEGER PRIMARY KEY, name TEXT);
         CREATE TABLE b (id INTEGER PRIMARY KEY, name TEXT);",
    )?;
    lab.exec(
        "e.db",
        "CREATE TABLE d (id INTEGER PRIMARY KEY, name TEXT);",
    )?;
    std::fs::write(lab.path("csv/c.csv"), "id,name\n")?;
    let schemas = tables
        .iter()
        .map(|&(table, rows)| {
            let destination = match table {
                "a" | "b" => "d",
                "c" => "csv",
                _ => "e",
            };
            let mut schema = SyncSchema::new(
                table,
                knit::Endpoint::new("s", table, &["id"]),
                knit::Endpoint::new(destination, table, &["id"]),
            );
            schema.mappings = vec![
                Mapping::new("id", "id", None),
                Mapping::new("name", "name", None),
            ];
            schema.batch_size = 2;
            (schema, u64::from(rows))
        })
        .collect();
    Ok((lab, schemas))
}

fn d15_end_state(lab: &Lab) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for (db, table) in [("d.db", "a"), ("d.db", "b"), ("e.db", "d")] {
        for r in lab.rows(db, &format!("SELECT id, name FROM {table} ORDER BY id"))? {
            out.push(format!("{table}: {}", r.join(",")));
        }
    }
    out.push(std::fs::read_to_string(lab.path("csv/c.csv"))?);
    Ok(out)
}

#[test]
fn d15_parallel_schemas_do_not_interfere() -> TestResult {
    let (parallel, schemas) = d15_lab()?;
    let reports: Vec<RunReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = schemas
            .iter()
            .map(|(schema, _)| scope.spawn(|| parallel.run(schema)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| "a sync thread panicked"))
            .collect::<Result<_, _>>()
    })?;
    for ((schema, rows), report) in schemas.iter().zip(&reports) {
        assert_eq!(report.schema, schema.id);
        assert_eq!(
            counts(report),
            (RunStatus::Success, *rows, 0, 0, 0),
            "{report:?}"
        );
        assert_eq!((report.applied, report.conflicts.len()), (*rows, 0));
    }

    let (sequential, schemas) = d15_lab()?;
    for (schema, _) in &schemas {
        assert_eq!(sequential.run(schema).status, RunStatus::Success);
    }
    let end = d15_end_state(&parallel)?;
    assert_eq!(end.len(), 5 + 7 + 11 + 1);
    assert_eq!(end, d15_end_state(&sequential)?);
    Ok(())
}

// ---- status write-back --------------------------------------------------------------

#[test]
fn sync_manager_writes_status_message_and_last_sync_back_into_the_schema_file() -> TestResult {
    let lab = d5_lab(D_CUSTOMERS)?;
    let file = lab.path("schemas.toml");
    let mut manager = SyncManager::load(&file, lab.datasources.clone(), &lab.state())?;
    manager.add(customers_schema(&["name", "email"]))?;
    manager.save()?;
    // A person edits the file after the manager loaded it: the write-back keeps that.
    let edited = std::fs::read_to_string(&file)?.replace("batch_size = 10", "batch_size = 7");
    assert!(edited.contains("batch_size = 7"), "{edited}");
    std::fs::write(&file, edited)?;

    let report = manager.sync("customers", &CancelToken::new(), &mut |_| {})?;
    assert_eq!(report.status, RunStatus::Success);
    let on_disk = SchemaSet::load(&file)?;
    let schema = on_disk.get("customers").ok_or("schema gone")?;
    assert_eq!(schema.status, RunStatus::Success);
    assert_eq!(schema.status_message, report.message);
    assert_eq!(schema.last_sync.as_deref(), Some(report.ended.as_str()));
    assert_eq!(schema.batch_size, 7, "the person's edit survived");
    assert_eq!(manager.schema("customers")?.status, RunStatus::Success);

    // A failed run records its status and message but keeps the last good sync time.
    std::fs::rename(lab.path("s.db"), lab.path("s.db.away"))?;
    let failed = manager.sync("customers", &CancelToken::new(), &mut |_| {})?;
    assert_eq!(failed.status, RunStatus::Failed);
    let on_disk = SchemaSet::load(&file)?;
    let schema = on_disk.get("customers").ok_or("schema gone")?;
    assert_eq!(schema.status, RunStatus::Failed);
    assert_eq!(schema.status_message, failed.message);
    assert_eq!(schema.last_sync.as_deref(), Some(report.ended.as_str()));
    assert_eq!(manager.history(Some("customers"))?.len(), 2);
    Ok(())
}

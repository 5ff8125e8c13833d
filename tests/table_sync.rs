//! A SQLite table and a CSV file kept in step through table replicas, whose items are a
//! row-existence unit carrying the row as it arrived and a unit per field edited since
//! (src/schema/table.rs). The engine does the rest: field edits on two sides merge (scenario 19), re-runs move nothing (D6), deletes
//! propagate, and a crash between committing metadata and writing the datasource is
//! repaired at the next open without showing up as a local change.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::TestResult;
use knit::{
    ConflictPolicy, CsvSource, Datasource, DatasourceError, EntityInfo, NoObserver, Projection,
    Row, RowOutcome, SessionOptions, SqliteSource, TableReplica, Value,
};

const ENTITY: &str = "customers";

fn fields() -> Vec<String> {
    ["id", "name", "phone"].map(String::from).to_vec()
}

fn key() -> Vec<String> {
    vec!["id".to_string()]
}

struct Stores {
    dir: tempfile::TempDir,
}

impl Stores {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = rusqlite::Connection::open(dir.path().join("shop.db"))?;
        db.execute_batch(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, phone TEXT);
             INSERT INTO customers VALUES (1, 'Ada', '111'), (2, 'Grace', '222'), (3, 'Edsger', '333');",
        )?;
        std::fs::create_dir(dir.path().join("csv"))?;
        std::fs::write(dir.path().join("csv/customers.csv"), "id,name,phone\n")?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sqlite(&self) -> Result<Box<dyn Datasource>, DatasourceError> {
        Ok(Box::new(SqliteSource::open("shop", &self.path("shop.db"))?))
    }

    fn csv(&self) -> Result<Box<dyn Datasource>, DatasourceError> {
        Ok(Box::new(CsvSource::open("export", &self.path("csv"))?))
    }

    fn table(
        &self,
        state: &str,
        source: Box<dyn Datasource>,
    ) -> Result<TableReplica, Box<dyn std::error::Error>> {
        Ok(TableReplica::open(
            &self.path(state),
            source,
            ENTITY,
            &key(),
            Projection::identity(&fields()),
        )?)
    }

    fn sql(&self, statement: &str) -> rusqlite::Result<usize> {
        rusqlite::Connection::open(self.path("shop.db"))?.execute(statement, [])
    }
}

/// Every row of a datasource as `id → (name, phone)` text, for comparing stores of
/// different kinds.
fn rows(
    source: &mut dyn Datasource,
) -> Result<BTreeMap<String, (String, String)>, DatasourceError> {
    let mut out = BTreeMap::new();
    source.scan(ENTITY, &mut |row: Row| {
        let text = |f: &str| row.get(f).map(Value::to_text).unwrap_or_default();
        out.insert(text("id"), (text("name"), text("phone")));
        Ok(())
    })?;
    Ok(out)
}

/// Conflicts of both directions of a sync.
fn conflicts_of(report: &knit::SyncReport) -> u64 {
    [&report.upload, &report.download]
        .into_iter()
        .flatten()
        .map(|s| s.conflicts.total())
        .sum()
}

fn lww() -> SessionOptions {
    SessionOptions {
        policy: ConflictPolicy::LastWriterWins,
        batch_size: 2,
        ..SessionOptions::default()
    }
}

#[test]
fn a_sqlite_table_reaches_an_empty_csv_file_and_a_rerun_moves_nothing() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let mut b = stores.table("b-state", stores.csv()?)?;

    let found = a.detect_full()?;
    assert_eq!(
        (
            found.rows_read,
            found.inserted,
            found.updated,
            found.deleted
        ),
        (3, 3, 0, 0)
    );
    let (report, to_a, to_b) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    let upload = report.upload.expect("upload ran");
    // Three new rows: each one item, its existence unit carrying all three fields.
    assert_eq!((upload.changes_sent, upload.changes_applied), (3, 3));
    assert_eq!((to_a.upserted, to_b.upserted), (0, 3));
    assert!(to_b.refused.is_empty());
    assert_eq!(rows(&mut *stores.csv()?)?, rows(&mut *stores.sqlite()?)?);

    // D6: the CSV file reads back as text what SQLite holds as integers; that is no
    // change, and a second run moves nothing either way.
    for table in [&mut a, &mut b] {
        let again = table.detect_full()?;
        assert_eq!((again.inserted, again.updated, again.deleted), (0, 0, 0));
    }
    let (report, to_a, to_b) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    for stats in [report.upload, report.download].into_iter().flatten() {
        assert_eq!(stats.changes_sent, 0);
    }
    assert_eq!((to_a.upserted, to_b.upserted), (0, 0));
    Ok(())
}

#[test]
fn scenario_19_edits_of_different_fields_merge_and_the_same_field_is_one_conflict() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let mut b = stores.table("b-state", stores.csv()?)?;
    a.detect_full()?;
    a.sync(&mut b)?;

    // A changes Ada's name, B changes her phone: different units, no conflict.
    stores.sql("UPDATE customers SET name = 'Ada Lovelace' WHERE id = 1")?;
    let mut csv = stores.csv()?;
    let ada: Row = [
        ("id".to_string(), Value::Text("1".into())),
        ("phone".to_string(), Value::Text("999".into())),
    ]
    .into();
    assert_eq!(csv.upsert(ENTITY, &key(), &[ada])?, [RowOutcome::Written]);
    assert_eq!(a.detect_full()?.updated, 1);
    assert_eq!(b.detect_full()?.updated, 1);
    let (report, _, _) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    let conflicts = conflicts_of(&report);
    assert_eq!(conflicts, 0);
    let both = rows(&mut *stores.sqlite()?)?;
    assert_eq!(both["1"], ("Ada Lovelace".to_string(), "999".to_string()));
    assert_eq!(both, rows(&mut *stores.csv()?)?);

    // Both change Grace's phone: exactly one conflict, on the phone unit only. Which
    // write wins is last-writer-wins' call: the two detections may fall in the same
    // millisecond, and then the replica ids (random) break the tie. Both stores must
    // end with the same one of the two phones, and Grace's name untouched.
    stores.sql("UPDATE customers SET phone = '200' WHERE id = 2")?;
    let grace: Row = [
        ("id".to_string(), Value::Text("2".into())),
        ("phone".to_string(), Value::Text("201".into())),
    ]
    .into();
    csv.upsert(ENTITY, &key(), &[grace])?;
    a.detect_full()?;
    b.detect_full()?;
    let (report, _, _) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    let conflicts = conflicts_of(&report);
    assert_eq!(conflicts, 1);
    let both = rows(&mut *stores.sqlite()?)?;
    let (name, phone) = &both["2"];
    assert_eq!(name, "Grace");
    assert!(phone == "200" || phone == "201", "{phone}");
    assert_eq!(both, rows(&mut *stores.csv()?)?);
    Ok(())
}

#[test]
fn a_field_edit_sends_that_field_alone_and_the_other_side_keeps_the_rest_of_the_row() -> TestResult
{
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let mut b = stores.table("b-state", stores.csv()?)?;
    a.detect_full()?;
    a.sync(&mut b)?;

    stores.sql("UPDATE customers SET phone = '555' WHERE id = 3")?;
    assert_eq!(a.detect_full()?.updated, 1);
    let (report, _, to_b) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    let upload = report.upload.expect("upload ran");
    assert_eq!((upload.changes_sent, upload.changes_applied), (1, 1));
    assert_eq!(to_b.upserted, 1);
    let csv = rows(&mut *stores.csv()?)?;
    assert_eq!(csv["3"], ("Edsger".to_string(), "555".to_string()));
    assert_eq!(csv, rows(&mut *stores.sqlite()?)?);

    // The edited field now has a unit of its own; a second edit of it, and an edit
    // of another field, each send one unit more.
    stores.sql("UPDATE customers SET phone = '556', name = 'E. W. Dijkstra' WHERE id = 3")?;
    assert_eq!(a.detect_full()?.updated, 1);
    let (report, _, _) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    assert_eq!(report.upload.expect("upload ran").changes_sent, 2);
    let csv = rows(&mut *stores.csv()?)?;
    assert_eq!(csv["3"], ("E. W. Dijkstra".to_string(), "556".to_string()));
    // Nothing differs on either side afterwards.
    assert_eq!(a.detect_full()?.updated + b.detect_full()?.updated, 0);
    Ok(())
}

#[test]
fn a_row_deleted_and_added_again_meets_a_concurrent_edit_of_a_field_as_a_conflict() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let mut b = stores.table("b-state", stores.csv()?)?;
    a.detect_full()?;
    a.sync(&mut b)?;

    // A deletes Ada and adds her back with another name; B meanwhile renames her.
    stores.sql("DELETE FROM customers WHERE id = 1")?;
    assert_eq!(a.detect_full()?.deleted, 1);
    stores.sql("INSERT INTO customers VALUES (1, 'Ada King', '111')")?;
    assert_eq!(a.detect_full()?.inserted, 1);
    let ada: Row = [
        ("id".to_string(), Value::Text("1".into())),
        ("name".to_string(), Value::Text("Ada Byron".into())),
    ]
    .into();
    stores.csv()?.upsert(ENTITY, &key(), &[ada])?;
    assert_eq!(b.detect_full()?.updated, 1);

    // Laying B's name over A's new row without a word would lose A's write: it is one
    // conflict, on the name, and both sides end with the same row.
    let (report, _, _) = a.sync_with(&mut b, &lww(), &mut NoObserver)?;
    assert_eq!(conflicts_of(&report), 1);
    let both = rows(&mut *stores.sqlite()?)?;
    let (name, phone) = &both["1"];
    assert!(name == "Ada King" || name == "Ada Byron", "{name}");
    assert_eq!(phone, "111");
    assert_eq!(both, rows(&mut *stores.csv()?)?);
    Ok(())
}

#[test]
fn a_batch_of_n_rows_carries_n_whole_rows_whatever_their_units() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let mut b = stores.table("b-state", stores.csv()?)?;
    a.detect_full()?;
    a.sync(&mut b)?;

    // Rows 1 and 2 change in two fields (two units each), row 3 in one.
    stores.sql("UPDATE customers SET name = name || '!', phone = phone || '0' WHERE id < 3")?;
    stores.sql("UPDATE customers SET phone = '3' WHERE id = 3")?;
    assert_eq!(a.detect_full()?.updated, 3);
    let options = SessionOptions {
        batch_size: 1,
        ..lww()
    };
    let (report, _, to_b) = a.sync_with(&mut b, &options, &mut NoObserver)?;
    let upload = report.upload.expect("upload ran");
    assert_eq!((upload.batches, upload.changes_sent), (3, 5));
    assert_eq!(to_b.upserted, 3);
    assert_eq!(rows(&mut *stores.csv()?)?, rows(&mut *stores.sqlite()?)?);
    Ok(())
}

#[test]
fn a_damaged_row_snapshot_is_an_error_that_names_the_entity_and_the_row() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    a.detect_full()?;
    // Grace's existence unit: her key "2", then the end of the key (00 00).
    let grace = knit::ItemId::new(b"2\x00\x01\x00\x00")?;
    a.replica().put(&grace, b"not a snapshot")?;
    let err = a.detect_full().expect_err("a damaged snapshot").to_string();
    assert!(err.contains("customers") && err.contains("\"2\""), "{err}");
    // Nothing was committed: the other rows are as they were.
    drop(a);
    let a = stores.table("a-state", stores.sqlite()?)?;
    assert_eq!(a.row_count()?, 3);
    Ok(())
}

#[test]
fn a_row_deleted_in_the_csv_file_leaves_the_sqlite_table() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let mut b = stores.table("b-state", stores.csv()?)?;
    a.detect_full()?;
    a.sync(&mut b)?;

    let edsger: Row = [("id".to_string(), Value::Text("3".into()))].into();
    stores.csv()?.delete(ENTITY, &key(), &[edsger])?;
    assert_eq!(b.detect_full()?.deleted, 1);
    // sync_with returns the caller's apply report first, then the other side's.
    let (_, at_b, at_a) = b.sync_with(&mut a, &lww(), &mut NoObserver)?;
    assert_eq!((at_b.deleted, at_a.deleted), (0, 1));
    let sqlite = rows(&mut *stores.sqlite()?)?;
    assert!(!sqlite.contains_key("3"));
    assert_eq!(sqlite, rows(&mut *stores.csv()?)?);
    assert_eq!(
        a.detect_full()?.deleted,
        0,
        "the apply is not a local change"
    );
    Ok(())
}

/// A datasource whose writes fail while `down` is set: a crash between committing the
/// metadata of a sync and writing its rows.
struct Flaky {
    inner: Box<dyn Datasource>,
    down: Arc<AtomicBool>,
    /// Rows the datasource takes before it goes down by itself: a call that brings
    /// more fails whole, as a lost connection fails a transaction.
    rows_left: Arc<std::sync::atomic::AtomicI64>,
    /// Reads and writes panic, as a datasource with a bug would.
    panics: bool,
    /// Calls refused because the datasource was down.
    refused_calls: Arc<std::sync::atomic::AtomicU64>,
    /// Calls of `delete`.
    delete_calls: Arc<std::sync::atomic::AtomicU64>,
    /// Rows a scan hands over before the connection drops (negative: never drops).
    scan_rows_left: Arc<std::sync::atomic::AtomicI64>,
}

impl Flaky {
    /// `inner` as it is: up, no panics, no dropped reads, nothing counted yet.
    fn around(inner: Box<dyn Datasource>) -> Self {
        Flaky {
            inner,
            down: Arc::new(AtomicBool::new(false)),
            rows_left: Arc::new(i64::MAX.into()),
            panics: false,
            refused_calls: Arc::default(),
            delete_calls: Arc::default(),
            scan_rows_left: Arc::new((-1).into()),
        }
    }
}

impl Datasource for Flaky {
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
        assert!(!self.panics, "a bug in the datasource's scan");
        let name = self.name().to_string();
        let left = Arc::clone(&self.scan_rows_left);
        self.inner.scan(entity, &mut |row| {
            if left.fetch_sub(1, Ordering::SeqCst) == 0 {
                return Err(DatasourceError::Unavailable {
                    datasource: name.clone(),
                    reason: "the connection dropped in the middle of the read".into(),
                });
            }
            visit(row)
        })
    }
    fn upsert(
        &mut self,
        entity: &str,
        key: &[String],
        rows: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        assert!(!self.panics, "a bug in the datasource's upsert");
        let rows_count = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        if self.rows_left.fetch_sub(rows_count, Ordering::SeqCst) < rows_count {
            self.down.store(true, Ordering::SeqCst);
        }
        if self.down.load(Ordering::SeqCst) {
            self.refused_calls.fetch_add(1, Ordering::SeqCst);
            return Err(DatasourceError::Unavailable {
                datasource: self.name().to_string(),
                reason: "the process died here".into(),
            });
        }
        self.inner.upsert(entity, key, rows)
    }
    fn delete(
        &mut self,
        entity: &str,
        key: &[String],
        keys: &[Row],
    ) -> Result<Vec<RowOutcome>, DatasourceError> {
        self.delete_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.delete(entity, key, keys)
    }
}

#[test]
fn a_crash_between_metadata_and_datasource_is_repaired_at_the_next_open() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let down = Arc::new(AtomicBool::new(true));
    let flaky = Flaky {
        down: Arc::clone(&down),
        ..Flaky::around(stores.csv()?)
    };
    let mut b = stores.table("b-state", Box::new(flaky))?;
    a.detect_full()?;
    assert!(
        a.sync_with(&mut b, &lww(), &mut NoObserver).is_err(),
        "the CSV write failed"
    );
    assert!(
        rows(&mut *stores.csv()?)?.is_empty(),
        "nothing reached the file"
    );
    drop(b);

    // The next open finds the pending rows and writes them; detection then sees no
    // local change, and the next sync moves nothing.
    down.store(false, Ordering::SeqCst);
    let mut b = stores.table("b-state", stores.csv()?)?;
    assert_eq!(rows(&mut *stores.csv()?)?, rows(&mut *stores.sqlite()?)?);
    let found = b.detect_full()?;
    assert_eq!((found.inserted, found.updated, found.deleted), (0, 0, 0));
    let report = a.sync(&mut b)?;
    for stats in [report.upload, report.download].into_iter().flatten() {
        assert_eq!(stats.changes_sent, 0);
    }
    Ok(())
}

#[test]
fn a_datasource_that_fails_during_a_session_keeps_the_rows_it_did_not_take_pending() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    // One batch per row; the file takes one row, then goes down. (The writer may
    // gather queued batches into one call: a first call of several rows fails whole.)
    let refused_calls = Arc::default();
    let flaky = Flaky {
        rows_left: Arc::new(1.into()),
        refused_calls: Arc::clone(&refused_calls),
        ..Flaky::around(stores.csv()?)
    };
    let mut b = stores.table("b-state", Box::new(flaky))?;
    a.detect_full()?;
    let options = SessionOptions {
        batch_size: 1,
        ..lww()
    };
    let failed = a.send_to(&mut b, &options, &mut NoObserver);
    assert!(failed.is_err(), "a write failed: {failed:?}");
    let taken = rows(&mut *stores.csv()?)?.len();
    assert!(taken <= 1, "{taken} rows arrived");
    // A datasource that went down is not called again in that session.
    assert_eq!(refused_calls.load(Ordering::SeqCst), 1);
    drop(b);

    // The next open writes the rows still pending, and only those: the mark of a row
    // the file took went when it took it.
    let b = stores.table("b-state", stores.csv()?)?;
    assert_eq!(b.recovered().upserted, 3 - taken as u64);
    assert_eq!(rows(&mut *stores.csv()?)?, rows(&mut *stores.sqlite()?)?);
    Ok(())
}

#[test]
fn a_datasource_that_panics_is_an_error_that_names_it_and_its_rows_stay_pending() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let flaky = Flaky {
        panics: true,
        ..Flaky::around(stores.csv()?)
    };
    let mut b = stores.table("b-state", Box::new(flaky))?;
    // Change detection reads on a thread of its own; its panic comes back as an error.
    let detected = b.detect_full().expect_err("the scan panicked").to_string();
    assert!(
        detected.contains("export") && detected.contains("panicked"),
        "{detected}"
    );
    // So does the panic of the thread that writes a session's rows.
    a.detect_full()?;
    let sent = a.send_to(&mut b, &lww(), &mut NoObserver);
    let written = sent.expect_err("the upsert panicked").to_string();
    assert!(
        written.contains("export") && written.contains("panicked"),
        "{written}"
    );
    assert!(rows(&mut *stores.csv()?)?.is_empty());
    drop(b);

    // The rows it did not write are still pending and reach the file at the next open.
    let b = stores.table("b-state", stores.csv()?)?;
    assert_eq!(b.recovered().upserted, 3);
    assert_eq!(rows(&mut *stores.csv()?)?, rows(&mut *stores.sqlite()?)?);
    Ok(())
}

#[test]
fn a_sync_without_deletes_asks_the_datasource_to_delete_nothing() -> TestResult {
    let stores = Stores::new()?;
    let mut a = stores.table("a-state", stores.sqlite()?)?;
    let delete_calls = Arc::default();
    let counting = Flaky {
        delete_calls: Arc::clone(&delete_calls),
        ..Flaky::around(stores.csv()?)
    };
    let mut b = stores.table("b-state", Box::new(counting))?;
    // Three rows in batches of one: the writer calls the file at least once, and a
    // delete of no rows would read the whole file for nothing each time.
    a.detect_full()?;
    let options = SessionOptions {
        batch_size: 1,
        ..lww()
    };
    a.send_to(&mut b, &options, &mut NoObserver)?;
    assert_eq!(rows(&mut *stores.csv()?)?.len(), 3);
    assert_eq!(delete_calls.load(Ordering::SeqCst), 0);
    // A row deleted at the source is one call.
    stores.sql("DELETE FROM customers WHERE id = 2")?;
    a.detect_full()?;
    a.send_to(&mut b, &options, &mut NoObserver)?;
    assert_eq!(rows(&mut *stores.csv()?)?.len(), 2);
    assert_eq!(delete_calls.load(Ordering::SeqCst), 1);
    Ok(())
}

/// A first load commits its rows ten thousand at a time while it reads them. A read
/// that breaks off leaves those behind the anchor; the next detection finds them
/// unchanged, yet reports them as inserted, so that no run's report loses a row.
#[test]
fn a_first_load_cut_short_reports_every_row_when_it_is_read_again() -> TestResult {
    let stores = Stores::new()?;
    stores.sql(
        "WITH RECURSIVE n(i) AS (SELECT 4 UNION ALL SELECT i + 1 FROM n WHERE i < 12500)
         INSERT INTO customers SELECT i, 'customer ' || i, '' || i FROM n",
    )?;
    let scan_rows_left = Arc::new(11_500.into());
    let flaky = Flaky {
        scan_rows_left: Arc::clone(&scan_rows_left),
        ..Flaky::around(stores.sqlite()?)
    };
    let mut a = stores.table("a-state", Box::new(flaky))?;
    let cut = a.detect_full().expect_err("the read broke off").to_string();
    assert!(cut.contains("shop") && cut.contains("dropped"), "{cut}");
    assert_eq!(
        a.row_count()?,
        10_000,
        "the first ten thousand were committed"
    );

    scan_rows_left.store(-1, Ordering::SeqCst);
    let found = a.detect_full()?;
    assert_eq!(
        (found.inserted, found.updated, found.deleted),
        (12_500, 0, 0)
    );
    let again = a.detect_full()?;
    assert_eq!((again.inserted, again.updated, again.deleted), (0, 0, 0));

    let mut b = stores.table("b-state", stores.csv()?)?;
    let options = SessionOptions {
        batch_size: 1000,
        ..lww()
    };
    a.send_to(&mut b, &options, &mut NoObserver)?;
    assert_eq!(rows(&mut *stores.csv()?)?, rows(&mut *stores.sqlite()?)?);
    Ok(())
}

/// Scenarios D1 and D2 through a schema: `people.full_name` split into the destination's
/// `first_name` and `last_name`, `age` converted to an integer, only rows of the EU.
#[test]
fn a_schema_maps_splits_converts_and_filters_rows_on_their_way() -> TestResult {
    use knit::{Endpoint, Filter, FilterValue, Mapping, Operator, SyncSchema, Transform};

    let stores = Stores::new()?;
    stores.sql(
        "CREATE TABLE people (id INTEGER PRIMARY KEY, full_name TEXT, age TEXT, region TEXT)",
    )?;
    stores.sql(
        "INSERT INTO people VALUES (1, 'Ada Lovelace', '36', 'EU'), (2, 'Plato', NULL, 'EU'),
         (3, 'Edsger Dijkstra', 'x', 'EU'), (4, 'Grace Hopper', '85', 'US')",
    )?;
    std::fs::write(
        stores.path("csv/contacts.csv"),
        "customer_id,first_name,last_name,age\n",
    )?;
    let mut schema = SyncSchema::new(
        "contacts",
        Endpoint::new("shop", "people", &["id"]),
        Endpoint::new("export", "contacts", &["customer_id"]),
    );
    schema.mappings = vec![
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
    ];
    schema.filters = vec![Filter::new(
        "region",
        Operator::Eq,
        FilterValue::One(Value::Text("EU".into())),
    )];
    let mut source = TableReplica::open(
        &stores.path("people-state"),
        stores.sqlite()?,
        "people",
        &schema.source.key,
        Projection::source_side(&schema),
    )?;
    let mut destination = TableReplica::open(
        &stores.path("contacts-state"),
        stores.csv()?,
        "contacts",
        &schema.destination.key,
        Projection::destination_side(&schema),
    )?;
    let upload = SessionOptions {
        direction: knit::Direction::Upload,
        ..lww()
    };
    let contacts = |stores: &Stores| -> Result<Vec<String>, DatasourceError> {
        let mut out = Vec::new();
        stores.csv()?.scan("contacts", &mut |row: Row| {
            let text = |f: &str| row.get(f).map(Value::to_text).unwrap_or_default();
            out.push(format!(
                "{} {} {} {}",
                text("customer_id"),
                text("first_name"),
                text("last_name"),
                text("age")
            ));
            Ok(())
        })?;
        Ok(out)
    };

    let found = source.detect_full()?;
    assert_eq!((found.rows_read, found.inserted, found.filtered), (4, 2, 1));
    assert_eq!(found.failed.len(), 1, "{:?}", found.failed);
    let failure = &found.failed[0];
    assert_eq!(
        (
            failure.key.as_slice(),
            failure.field.as_str(),
            failure.reason.as_str()
        ),
        (&["3".to_string()][..], "age", "cannot convert 'x' to int")
    );
    source.sync_with(&mut destination, &upload, &mut NoObserver)?;
    // Plato has no last name: SPLIT(1) past the end is null, not an error.
    assert_eq!(contacts(&stores)?, ["1 Ada Lovelace 36", "2 Plato  "]);

    // Grace starts matching and arrives; Ada stops matching and leaves.
    stores.sql("UPDATE people SET region = 'EU' WHERE id = 4")?;
    stores.sql("UPDATE people SET region = 'US' WHERE id = 1")?;
    let found = source.detect_full()?;
    assert_eq!((found.inserted, found.deleted, found.filtered), (1, 1, 1));
    source.sync_with(&mut destination, &upload, &mut NoObserver)?;
    assert_eq!(contacts(&stores)?, ["2 Plato  ", "4 Grace Hopper 85"]);
    Ok(())
}

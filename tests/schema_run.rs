//! One run of one schema between named datasources: a SQLite table and a CSV file with
//! other column names. Each test is a datasource scenario of shared/scenarios.md.

mod common;

use std::path::{Path, PathBuf};

use common::TestResult;
use knit::{
    run_schema, CancelToken, Datasources, Endpoint, Mapping, RunReport, RunStatus, SchemaError,
    SyncDirection, SyncSchema, SyncType,
};

struct Setup {
    dir: tempfile::TempDir,
    datasources: Datasources,
}

impl Setup {
    /// `shop` (SQLite) holds `customers(id, name, email)` with `rows` rows; `export`
    /// (CSV) holds `customers.csv` with `customer_id,full_name,mail` and no row.
    fn new(rows: u32) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = rusqlite::Connection::open(dir.path().join("shop.db"))?;
        db.execute_batch(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT)",
        )?;
        for i in 1..=rows {
            db.execute(
                "INSERT INTO customers VALUES (?1, ?2, ?3)",
                rusqlite::params![i, format!("customer {i}"), format!("c{i}@example.org")],
            )?;
        }
        std::fs::create_dir(dir.path().join("csv"))?;
        std::fs::write(
            dir.path().join("csv/customers.csv"),
            "customer_id,full_name,mail\n",
        )?;
        let config = dir.path().join("datasources.toml");
        std::fs::write(
            &config,
            "[datasources.shop]\nkind = \"sqlite\"\npath = \"shop.db\"\n\n\
             [datasources.export]\nkind = \"csv\"\npath = \"csv\"\n",
        )?;
        let datasources = Datasources::load(&config)?;
        Ok(Self { dir, datasources })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn schema(&self) -> SyncSchema {
        let mut schema = SyncSchema::new(
            "customers",
            Endpoint::new("shop", "customers", &["id"]),
            Endpoint::new("export", "customers", &["customer_id"]),
        );
        schema.mappings = vec![
            Mapping::new("id", "customer_id", None),
            Mapping::new("name", "full_name", None),
            Mapping::new("email", "mail", None),
        ];
        schema
    }

    fn run(&self, schema: &SyncSchema) -> RunReport {
        run_schema(
            schema,
            &self.datasources,
            &self.path("state"),
            &CancelToken::new(),
        )
    }

    fn sql(&self, statement: &str) -> rusqlite::Result<usize> {
        rusqlite::Connection::open(self.path("shop.db"))?.execute(statement, [])
    }

    fn csv(&self) -> std::io::Result<String> {
        std::fs::read_to_string(self.path("csv/customers.csv"))
    }

    fn csv_rows(&self) -> std::io::Result<usize> {
        Ok(self.csv()?.lines().count() - 1)
    }
}

fn counts(r: &RunReport) -> (RunStatus, u64, u64, u64, u64) {
    (r.status, r.inserted, r.updated, r.deleted, r.failed)
}

#[test]
fn d6_a_rerun_on_unchanged_data_moves_nothing_and_one_edit_is_one_update() -> TestResult {
    let setup = Setup::new(10)?;
    let schema = setup.schema();
    let first = setup.run(&schema);
    assert_eq!(
        counts(&first),
        (RunStatus::Success, 10, 0, 0, 0),
        "{first:?}"
    );
    assert_eq!(setup.csv_rows()?, 10);
    assert!(setup.csv()?.contains("3,customer 3,c3@example.org"));

    let second = setup.run(&schema);
    assert_eq!(
        counts(&second),
        (RunStatus::Success, 0, 0, 0, 0),
        "{second:?}"
    );
    assert_eq!(setup.csv_rows()?, 10, "no duplicate rows");

    setup.sql("UPDATE customers SET email = 'ada@example.org' WHERE id = 3")?;
    let third = setup.run(&schema);
    assert_eq!(
        counts(&third),
        (RunStatus::Success, 0, 1, 0, 0),
        "{third:?}"
    );
    assert!(setup.csv()?.contains("3,customer 3,ada@example.org"));
    Ok(())
}

#[test]
fn d5c_an_unreadable_source_fails_the_run_and_changes_nothing() -> TestResult {
    let setup = Setup::new(3)?;
    let schema = setup.schema();
    assert_eq!(setup.run(&schema).status, RunStatus::Success);
    let before = setup.csv()?;
    std::fs::rename(setup.path("shop.db"), setup.path("shop.db.moved"))?;

    let report = setup.run(&schema);
    assert_eq!(report.status, RunStatus::Failed);
    assert!(report.message.contains("shop"), "{}", report.message);
    assert_eq!(setup.csv()?, before);
    Ok(())
}

#[test]
fn d5d_a_source_read_back_empty_never_empties_the_destination_unless_allowed() -> TestResult {
    let setup = Setup::new(20)?;
    let mut schema = setup.schema();
    assert_eq!(setup.run(&schema).status, RunStatus::Success);
    setup.sql("DELETE FROM customers")?;

    for _ in 0..2 {
        // Refused, and refused again: the refusal committed no tombstone.
        let report = setup.run(&schema);
        assert_eq!(report.status, RunStatus::Failed);
        assert!(
            report.message.contains("allow_mass_delete"),
            "{}",
            report.message
        );
        assert_eq!(setup.csv_rows()?, 20);
    }

    // A delete below the threshold (10 %) goes through.
    let setup = Setup::new(20)?;
    assert_eq!(setup.run(&schema).status, RunStatus::Success);
    setup.sql("DELETE FROM customers WHERE id <= 2")?;
    let report = setup.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 0, 0, 2, 0),
        "{report:?}"
    );
    assert_eq!(setup.csv_rows()?, 18);

    setup.sql("DELETE FROM customers")?;
    schema.allow_mass_delete = true;
    let report = setup.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 0, 0, 18, 0),
        "{report:?}"
    );
    assert_eq!(setup.csv_rows()?, 0);
    Ok(())
}

#[test]
fn d14_destination_to_source_moves_data_that_way_only() -> TestResult {
    let setup = Setup::new(2)?;
    std::fs::write(
        setup.path("csv/customers.csv"),
        "customer_id,full_name,mail\n7,Grace Hopper,grace@example.org\n",
    )?;
    let mut schema = setup.schema();
    schema.direction = SyncDirection::DestinationToSource;
    let report = setup.run(&schema);
    assert_eq!(
        counts(&report),
        (RunStatus::Success, 1, 0, 0, 0),
        "{report:?}"
    );

    let db = rusqlite::Connection::open(setup.path("shop.db"))?;
    let grace: String =
        db.query_row("SELECT name FROM customers WHERE id = 7", [], |r| r.get(0))?;
    assert_eq!(grace, "Grace Hopper");
    let rows: i64 = db.query_row("SELECT count(*) FROM customers", [], |r| r.get(0))?;
    assert_eq!(rows, 3);
    assert_eq!(setup.csv_rows()?, 1, "the source's own rows do not travel");
    Ok(())
}

#[test]
fn an_invalid_schema_fails_with_every_problem_and_touches_nothing() -> TestResult {
    let setup = Setup::new(2)?;
    let mut schema = setup.schema();
    schema.mappings.push(Mapping::new("emial", "mail", None));
    let report = setup.run(&schema);
    assert_eq!(report.status, RunStatus::Failed);
    let all = report
        .errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("emial") && all.contains("email"), "{all}");
    assert_eq!(setup.csv_rows()?, 0);
    let folder = setup.path("state").join("customers");
    assert!(!folder.join("source").exists() && !folder.join("destination").exists());
    // The failed run is in the history all the same.
    let history = knit::History::new(&setup.path("state"), 10).list("customers")?;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].status, "failed");
    Ok(())
}

#[test]
fn a_datasource_config_with_a_mistake_names_the_line() -> TestResult {
    let err = Datasources::from_toml(
        "[datasources.shop]\nkind = \"oracle\"\npath = \"x\"\n",
        Path::new("."),
        "datasources.toml",
    )
    .expect_err("oracle is no kind knit knows");
    match &err {
        SchemaError::Syntax { line, .. } => assert_eq!(*line, 2, "{err}"),
        other => panic!("expected a syntax error, got {other:?}"),
    }
    let setup = Setup::new(1)?;
    let mut schema = setup.schema();
    schema.destination.datasource = "exprot".into();
    let report = setup.run(&schema);
    assert_eq!(report.status, RunStatus::Failed);
    assert!(
        report.message.contains("exprot") && report.message.contains("export"),
        "{}",
        report.message
    );
    Ok(())
}

#[test]
fn incremental_from_a_csv_store_fails_validation_naming_the_datasource() -> TestResult {
    let setup = Setup::new(3)?;
    let mut schema = setup.schema();
    // The CSV side sends: it would have to be read incrementally.
    schema.direction = SyncDirection::Bidirectional;
    schema.sync_type = SyncType::Incremental;
    let report = setup.run(&schema);
    assert_eq!(report.status, RunStatus::Failed);
    assert!(
        report.message.contains("sync_type")
            && report.message.contains("export")
            && report.message.contains("csv"),
        "{}",
        report.message
    );
    assert_eq!(setup.csv_rows()?, 0, "nothing was written");
    Ok(())
}

#[test]
fn a_postgres_datasource_without_its_connection_string_names_what_is_missing() -> TestResult {
    let datasources = Datasources::from_toml(
        "[datasources.warehouse]\nkind = \"postgres\"\nconninfo_env = \"KNIT_TEST_SURELY_UNSET_VAR\"\n\n\
         [datasources.both]\nkind = \"postgres\"\nconninfo = \"host=127.0.0.1\"\nconninfo_env = \"X\"\n\n\
         [datasources.files]\nkind = \"csv\"\n",
        Path::new("."),
        "datasources.toml",
    )?;
    for (name, words) in [
        ("warehouse", "KNIT_TEST_SURELY_UNSET_VAR"),
        ("both", "exactly one of conninfo, conninfo_env"),
        ("files", "needs a path"),
    ] {
        match datasources.open(name) {
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(name) && text.contains(words), "{text}");
            }
            Ok(_) => return Err(format!("{name} opened without its settings").into()),
        }
    }
    Ok(())
}

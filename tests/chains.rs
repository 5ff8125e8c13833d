//! SQLite ↔ PostgreSQL ↔ CSV: two bidirectional schemas chained through PostgreSQL,
//! edits on every store, runs until nothing moves; the three stores must then hold the
//! same rows. Needs the test PostgreSQL server (scripts/test starts it).

mod common;

use std::collections::BTreeMap;

use common::TestResult;
use knit::{
    sync_schema, CancelToken, ConflictRule, CsvSource, Datasource, Datasources, Endpoint, Mapping,
    RunStatus, SyncDirection, SyncSchema,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

type Error = Box<dyn std::error::Error>;
/// Rows as text, by id: what every store must agree on.
type Rows = BTreeMap<String, (String, String)>;

struct Chain {
    dir: tempfile::TempDir,
    pg: postgres::Client,
    pg_schema: String,
    datasources: Datasources,
}

impl Drop for Chain {
    fn drop(&mut self) {
        let _ = self
            .pg
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.pg_schema));
    }
}

impl Chain {
    fn new(conninfo: &str) -> Result<Chain, Error> {
        let dir = tempfile::tempdir()?;
        rusqlite::Connection::open(dir.path().join("a.db"))?.execute_batch(
            "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT);",
        )?;
        std::fs::create_dir(dir.path().join("c"))?;
        std::fs::write(dir.path().join("c/customers.csv"), "id,name,email\n")?;
        let mut pg = postgres::Client::connect(conninfo, postgres::NoTls)?;
        let pg_schema = format!("chain_{}", uuid::Uuid::new_v4().simple());
        pg.batch_execute(&format!(
            "CREATE SCHEMA {pg_schema};
             CREATE TABLE {pg_schema}.customers (id BIGINT PRIMARY KEY, name TEXT, email TEXT);"
        ))?;
        let config = format!(
            "[datasources.a]\nkind = \"sqlite\"\npath = \"a.db\"\n\n\
             [datasources.b]\nkind = \"postgres\"\nconninfo = {conninfo:?}\nschema = {pg_schema:?}\n\n\
             [datasources.c]\nkind = \"csv\"\npath = \"c\"\n"
        );
        let datasources = Datasources::from_toml(&config, dir.path(), "chain datasources")?;
        Ok(Chain {
            dir,
            pg,
            pg_schema,
            datasources,
        })
    }

    fn schema(&self, id: &str, source: &str, destination: &str) -> SyncSchema {
        let mut schema = SyncSchema::new(
            id,
            Endpoint::new(source, "customers", &["id"]),
            Endpoint::new(destination, "customers", &["id"]),
        );
        for field in ["id", "name", "email"] {
            schema.mappings.push(Mapping::new(field, field, None));
        }
        schema.direction = SyncDirection::Bidirectional;
        schema.conflict = ConflictRule::LastWriterWins;
        schema.batch_size = 3;
        schema.allow_mass_delete = true;
        schema
    }

    /// Runs both schemas, in turn, until a round moves nothing (at most `rounds`).
    fn converge(&self, rounds: usize) -> Result<usize, Error> {
        let schemas = [self.schema("a_b", "a", "b"), self.schema("b_c", "b", "c")];
        for round in 1..=rounds {
            let mut moved = 0;
            for schema in &schemas {
                let report = sync_schema(
                    schema,
                    &self.datasources,
                    &self.dir.path().join("state"),
                    &CancelToken::new(),
                    &mut |_| {},
                );
                if report.status != RunStatus::Success {
                    return Err(format!("{}: {report:?}", schema.id).into());
                }
                moved += report.applied;
            }
            if moved == 0 {
                return Ok(round);
            }
        }
        Err(format!("still moving after {rounds} rounds").into())
    }

    fn sqlite(&self, sql: &str) -> Result<(), Error> {
        rusqlite::Connection::open(self.dir.path().join("a.db"))?.execute_batch(sql)?;
        Ok(())
    }

    fn postgres(&mut self, sql: &str) -> Result<(), Error> {
        let sql = sql.replace("customers", &format!("{}.customers", self.pg_schema));
        self.pg.batch_execute(&sql)?;
        Ok(())
    }

    fn csv_rewrite(&self, edit: impl FnOnce(&mut Rows)) -> Result<(), Error> {
        let mut rows = self.csv_rows()?;
        edit(&mut rows);
        let mut text = String::from("id,name,email\n");
        for (id, (name, email)) in &rows {
            text.push_str(&format!("{id},{name},{email}\n"));
        }
        std::fs::write(self.dir.path().join("c/customers.csv"), text)?;
        Ok(())
    }

    fn sqlite_rows(&self) -> Result<Rows, Error> {
        let conn = rusqlite::Connection::open(self.dir.path().join("a.db"))?;
        let mut stmt = conn.prepare("SELECT id, name, email FROM customers")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?.to_string(),
                (
                    r.get::<_, Option<String>>(1)?.unwrap_or_default(),
                    r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                ),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn postgres_rows(&mut self) -> Result<Rows, Error> {
        let rows = self.pg.query(
            &format!("SELECT id, name, email FROM {}.customers", self.pg_schema),
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0).to_string(),
                    (
                        r.get::<_, Option<String>>(1).unwrap_or_default(),
                        r.get::<_, Option<String>>(2).unwrap_or_default(),
                    ),
                )
            })
            .collect())
    }

    fn csv_rows(&self) -> Result<Rows, Error> {
        let mut store = CsvSource::open("c", &self.dir.path().join("c"))?;
        let mut rows = Rows::new();
        store.scan("customers", &mut |row| {
            let text = |f: &str| row.get(f).map(|v| v.to_text()).unwrap_or_default();
            rows.insert(text("id"), (text("name"), text("email")));
            Ok(())
        })?;
        Ok(rows)
    }

    /// The rows of the three stores, which must be equal.
    fn agreed(&mut self) -> Result<Rows, Error> {
        let (a, b, c) = (self.sqlite_rows()?, self.postgres_rows()?, self.csv_rows()?);
        if a != b || b != c {
            return Err(
                format!("stores differ:\nsqlite   {a:?}\npostgres {b:?}\ncsv      {c:?}").into(),
            );
        }
        Ok(a)
    }
}

fn row(name: &str, email: &str) -> (String, String) {
    (name.to_string(), email.to_string())
}

#[test]
fn edits_in_every_store_of_a_chain_reach_every_store() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    let mut chain = Chain::new(&conninfo)?;
    let mut seed = String::new();
    for id in 1..=8 {
        seed.push_str(&format!(
            "INSERT INTO customers VALUES ({id}, 'name{id}', 'mail{id}');"
        ));
    }
    chain.sqlite(&seed)?;
    chain.converge(4)?;
    assert_eq!(chain.agreed()?.len(), 8);

    // One edit per store, and two sides editing different fields of row 3.
    chain.csv_rewrite(|rows| {
        rows.insert("1".into(), row("from-csv", "mail1"));
        if let Some(r) = rows.get_mut("3") {
            r.1 = "three@csv".into();
        }
    })?;
    chain.sqlite("DELETE FROM customers WHERE id = 2; UPDATE customers SET name = 'three-sqlite' WHERE id = 3;")?;
    chain.postgres("INSERT INTO customers VALUES (11, 'from-pg', 'mail11');")?;
    chain.converge(4)?;
    let rows = chain.agreed()?;
    assert_eq!(rows.get("1"), Some(&row("from-csv", "mail1")));
    assert_eq!(rows.get("2"), None, "the delete reached every store");
    assert_eq!(
        rows.get("3"),
        Some(&row("three-sqlite", "three@csv")),
        "edits of different fields merge"
    );
    assert_eq!(rows.get("11"), Some(&row("from-pg", "mail11")));
    // Converged: one more round moves nothing.
    assert_eq!(chain.converge(1)?, 1);
    Ok(())
}

/// One random edit: which store, which row (ids 1..=5, so rows collide), what.
#[derive(Clone, Debug)]
enum Edit {
    Put { store: u8, id: u8, name: u8 },
    Delete { store: u8, id: u8 },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (0u8..3, 1u8..=5, 0u8..4).prop_map(|(store, id, name)| Edit::Put { store, id, name }),
        (0u8..3, 1u8..=5).prop_map(|(store, id)| Edit::Delete { store, id }),
    ]
}

fn apply(chain: &mut Chain, edit: &Edit) -> Result<(), Error> {
    match *edit {
        Edit::Put { store, id, name } => {
            let name = format!("n{name}-s{store}");
            match store {
                0 => chain.sqlite(&format!(
                    "INSERT INTO customers VALUES ({id}, '{name}', 'm{id}') \
                     ON CONFLICT(id) DO UPDATE SET name = excluded.name;"
                )),
                1 => chain.postgres(&format!(
                    "INSERT INTO customers VALUES ({id}, '{name}', 'm{id}') \
                     ON CONFLICT(id) DO UPDATE SET name = excluded.name;"
                )),
                _ => chain.csv_rewrite(|rows| {
                    let email = rows
                        .get(&id.to_string())
                        .map_or(format!("m{id}"), |r| r.1.clone());
                    rows.insert(id.to_string(), (name, email));
                }),
            }
        }
        Edit::Delete { store, id } => match store {
            0 => chain.sqlite(&format!("DELETE FROM customers WHERE id = {id};")),
            1 => chain.postgres(&format!("DELETE FROM customers WHERE id = {id};")),
            _ => chain.csv_rewrite(|rows| {
                rows.remove(&id.to_string());
            }),
        },
    }
}

#[test]
fn random_edits_on_a_chain_converge_to_one_state() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    // Each case drives real stores; a few cases with several rounds each.
    let cases = std::env::var("KNIT_CHAIN_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let rounds = prop::collection::vec(prop::collection::vec(edit(), 1..4), 1..4);
    runner
        .run(&rounds, |rounds| {
            let check = || -> Result<(), Error> {
                let mut chain = Chain::new(&conninfo)?;
                for edits in &rounds {
                    for edit in edits {
                        apply(&mut chain, edit)?;
                    }
                    // Edits between partial syncs: only the first schema runs.
                    let report = sync_schema(
                        &chain.schema("a_b", "a", "b"),
                        &chain.datasources,
                        &chain.dir.path().join("state"),
                        &CancelToken::new(),
                        &mut |_| {},
                    );
                    if report.status != RunStatus::Success {
                        return Err(format!("a_b: {report:?}").into());
                    }
                }
                chain.converge(6)?;
                chain.agreed()?;
                Ok(())
            };
            check().map_err(|e| TestCaseError::fail(e.to_string()))
        })
        .map_err(|e| e.to_string().into())
}

#[test]
fn incremental_from_postgres_sees_writes_deletes_and_a_late_commit() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    let mut chain = Chain::new(&conninfo)?;
    let mut seed = String::new();
    for id in 1..=6 {
        seed.push_str(&format!(
            "INSERT INTO customers VALUES ({id}, 'name{id}', 'mail{id}');"
        ));
    }
    chain.postgres(&seed)?;
    let mut schema = chain.schema("b_a", "b", "a");
    schema.direction = SyncDirection::SourceToDestination;
    schema.sync_type = knit::SyncType::Incremental;
    schema.lookback = 60;
    let run = |chain: &Chain| {
        sync_schema(
            &schema,
            &chain.datasources,
            &chain.dir.path().join("state"),
            &CancelToken::new(),
            &mut |_| {},
        )
    };
    let first = run(&chain);
    assert_eq!(
        (first.status, first.inserted),
        (RunStatus::Success, 6),
        "{first:?}"
    );

    // A transaction that takes its sequence number now and commits after the next run
    // has read: its change must still arrive, by the lookback.
    let mut late = postgres::Client::connect(&conninfo, postgres::NoTls)?;
    let mut tx = late.transaction()?;
    tx.batch_execute(&format!(
        "UPDATE {}.customers SET name = 'late' WHERE id = 1",
        chain.pg_schema
    ))?;
    chain.postgres("UPDATE customers SET email = 'new2' WHERE id = 2; DELETE FROM customers WHERE id = 3; INSERT INTO customers VALUES (7, 'name7', 'mail7');")?;
    let second = run(&chain);
    assert_eq!(
        (second.inserted, second.updated, second.deleted),
        (1, 1, 1),
        "{second:?}"
    );
    assert!(second.rows_read <= 3, "read only what changed: {second:?}");
    tx.commit()?;
    let third = run(&chain);
    assert_eq!(
        (third.inserted, third.updated, third.deleted),
        (0, 1, 0),
        "the late commit arrives once: {third:?}"
    );
    let a = chain.sqlite_rows()?;
    assert_eq!(a, chain.postgres_rows()?);
    assert_eq!(a.get("1"), Some(&row("late", "mail1")));
    let fourth = run(&chain);
    assert_eq!(
        (fourth.inserted, fourth.updated, fourth.deleted),
        (0, 0, 0),
        "{fourth:?}"
    );
    Ok(())
}

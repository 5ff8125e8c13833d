//! Schema-driven sync figures (issue 3): change detection over a SQLite table, Full
//! against Incremental, and an initial SQLite → PostgreSQL sync against a plain batched
//! `INSERT` of the same rows. One run, figures printed as a table and as one JSON line.
//!
//! ```sh
//! scripts/bench-datasources [ROWS] [CHANGES]     # starts PostgreSQL, then runs this
//! cargo bench --bench datasources -- [ROWS] [CHANGES]
//! ```
//! Without `KNIT_TEST_PG` (a PostgreSQL conninfo) the PostgreSQL part is skipped and
//! says so.

use std::path::Path;
use std::time::Instant;

use knit::{
    sync_schema, CancelToken, Datasources, DetectMode, Endpoint, Mapping, Projection, RunPhase,
    SqliteSource, SyncSchema, SyncType, TableReplica,
};

/// The knit binary's allocator and its settings, so that these figures are the CLI's.
#[path = "../src/allocator.rs"]
mod allocator;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const FIELDS: [&str; 4] = ["name", "email", "city", "updated_at"];

fn main() -> Result<()> {
    allocator::keep_freed_memory();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this without it,
    // as a smoke test on a tiny table. Take the first two numbers.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benchmarking = args.iter().any(|a| a == "--bench");
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let (default_rows, default_changes) = if benchmarking {
        (100_000, 100)
    } else {
        (300, 10)
    };
    let rows = numbers.first().copied().unwrap_or(default_rows);
    let changes = numbers.get(1).copied().unwrap_or(default_changes);
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("shop.sqlite");
    seed_sqlite(&db, rows)?;

    let mut figures = serde_json::Map::new();
    figures.insert("rows".into(), rows.into());
    figures.insert("changes".into(), changes.into());

    // Change detection on one side, as a schema run does it.
    let key = vec!["id".to_string()];
    let fields: Vec<String> = std::iter::once("id")
        .chain(FIELDS)
        .map(String::from)
        .collect();
    let open = |state: &str| -> Result<TableReplica> {
        Ok(TableReplica::open_with(
            &dir.path().join(state),
            Box::new(SqliteSource::open("shop", &db)?),
            "customers",
            &key,
            Projection::identity(&fields),
            None,
            None,
        )?)
    };
    let mut side = open("detect")?;
    let started = Instant::now();
    let first = side.detect_changes(DetectMode::Incremental { lookback: 0 })?;
    let first_found = first.report.inserted;
    side.commit_changes(first)?;
    let initial_ms = ms(started);
    let started = Instant::now();
    let full = side.detect_changes(DetectMode::Full)?;
    let full_ms = ms(started);
    assert_eq!(full.report.rows_read as usize, rows);
    assert_eq!(full.report.inserted + full.report.updated, 0);
    side.commit_changes(full)?;

    touch_rows(&db, rows, changes)?;
    let started = Instant::now();
    let incremental = side.detect_changes(DetectMode::Incremental { lookback: 0 })?;
    let incremental_found = incremental.report.updated;
    side.commit_changes(incremental)?;
    let incremental_ms = ms(started);
    // The same changes found by a Full read, for comparison.
    touch_rows(&db, rows, changes)?;
    let started = Instant::now();
    let full_again = side.detect_changes(DetectMode::Full)?;
    let full_found = full_again.report.updated;
    side.commit_changes(full_again)?;
    let full_changed_ms = ms(started);
    drop(side);
    assert_eq!(first_found as usize, rows);
    assert_eq!(incremental_found as usize, changes);
    assert_eq!(full_found as usize, changes);

    figures.insert("detect_initial_ms".into(), round(initial_ms).into());
    figures.insert("detect_full_unchanged_ms".into(), round(full_ms).into());
    figures.insert(
        "detect_full_changed_ms".into(),
        round(full_changed_ms).into(),
    );
    figures.insert("detect_incremental_ms".into(), round(incremental_ms).into());
    let ratio = incremental_ms / full_changed_ms;
    figures.insert("incremental_vs_full".into(), round3(ratio).into());
    println!("Change detection over a {rows}-row SQLite table, {changes} rows changed:");
    println!("  first detection (all rows new, triggers installed)  {initial_ms:>10.1} ms");
    println!("  Full, nothing changed                                {full_ms:>10.1} ms");
    println!(
        "  Full, {changes} changed                                   {full_changed_ms:>10.1} ms"
    );
    println!(
        "  Incremental (triggers), {changes} changed                {incremental_ms:>10.1} ms  = {:.2} % of Full (goal <= 5 %)",
        ratio * 100.0
    );

    match std::env::var("KNIT_TEST_PG") {
        Ok(conninfo) => postgres_figures(dir.path(), &db, rows, changes, &conninfo, &mut figures)?,
        Err(_) => println!(
            "PostgreSQL part skipped: KNIT_TEST_PG is not set (scripts/bench-datasources sets it)"
        ),
    }
    println!("{}", serde_json::Value::Object(figures));
    Ok(())
}

fn postgres_figures(
    dir: &Path,
    db: &Path,
    rows: usize,
    changes: usize,
    conninfo: &str,
    figures: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<()> {
    let mut client = postgres::Client::connect(conninfo, postgres::NoTls)?;
    let schema = format!("bench_{}", std::process::id());
    client.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
         CREATE TABLE {schema}.plain (id BIGINT PRIMARY KEY, name TEXT, email TEXT, city TEXT, updated_at TEXT);
         CREATE TABLE {schema}.customers (id BIGINT PRIMARY KEY, name TEXT, email TEXT, city TEXT, updated_at TEXT);"
    ))?;
    // The baseline: the same rows, read from SQLite, written with multi-row INSERTs of
    // 1,000 rows in one transaction.
    let source = rusqlite::Connection::open(db)?;
    let started = Instant::now();
    let mut all: Vec<(i64, String, String, String, String)> = Vec::with_capacity(rows);
    {
        let mut stmt = source
            .prepare("SELECT id, name, email, city, updated_at FROM customers ORDER BY id")?;
        let mapped = stmt.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        for row in mapped {
            all.push(row?);
        }
    }
    let mut tx = client.transaction()?;
    for chunk in all.chunks(1000) {
        let mut sql =
            format!("INSERT INTO {schema}.plain (id, name, email, city, updated_at) VALUES ");
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
        for (i, row) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let n = i * 5;
            sql.push_str(&format!(
                "(${},${},${},${},${})",
                n + 1,
                n + 2,
                n + 3,
                n + 4,
                n + 5
            ));
            params.extend([
                &row.0 as &(dyn postgres::types::ToSql + Sync),
                &row.1,
                &row.2,
                &row.3,
                &row.4,
            ]);
        }
        tx.execute(sql.as_str(), &params)?;
    }
    tx.commit()?;
    let plain_ms = ms(started);

    let config = format!(
        "[datasources.shop]\nkind = \"sqlite\"\npath = {:?}\n\n[datasources.warehouse]\nkind = \"postgres\"\nconninfo = {:?}\nschema = {:?}\n",
        db.display().to_string(),
        conninfo,
        schema
    );
    let datasources = Datasources::from_toml(&config, dir, "bench datasources")?;
    let mut sync = SyncSchema::new(
        "to_postgres",
        Endpoint::new("shop", "customers", &["id"]),
        Endpoint::new("warehouse", "customers", &["id"]),
    );
    for field in std::iter::once("id").chain(FIELDS) {
        sync.mappings.push(Mapping::new(field, field, None));
    }
    sync.sync_type = SyncType::Incremental;
    let started = Instant::now();
    // Where the time goes: the end of change detection (the first event with a total)
    // and the last batch committed before the rows are written into PostgreSQL.
    let mut detected_ms = 0.0;
    let mut synced_ms = 0.0;
    let report = sync_schema(
        &sync,
        &datasources,
        &dir.join("pg-state"),
        &CancelToken::new(),
        &mut |event| {
            if event.phase == RunPhase::Syncing {
                if detected_ms == 0.0 {
                    detected_ms = ms(started);
                }
                synced_ms = ms(started);
            }
        },
    );
    let knit_ms = ms(started);
    println!(
        "  (detection {detected_ms:.0} ms, sessions {:.0} ms, writing into PostgreSQL and the rest {:.0} ms)",
        synced_ms - detected_ms,
        knit_ms - synced_ms
    );
    if report.applied as usize != rows {
        return Err(format!(
            "the sync applied {} of {rows} rows: {}",
            report.applied, report.message
        )
        .into());
    }
    // The next run after 100 changes: what an Incremental run costs end to end.
    touch_rows(db, rows, changes)?;
    let started = Instant::now();
    let next = sync_schema(
        &sync,
        &datasources,
        &dir.join("pg-state"),
        &CancelToken::new(),
        &mut |_| {},
    );
    let next_ms = ms(started);
    if next.applied as usize != changes {
        return Err(format!(
            "the incremental run applied {} of {changes} rows: {}",
            next.applied, next.message
        )
        .into());
    }
    let landed: i64 = client
        .query_one(&format!("SELECT count(*) FROM {schema}.customers"), &[])?
        .get(0);
    assert_eq!(landed as usize, rows);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))?;

    let share = plain_ms / knit_ms;
    figures.insert("pg_plain_insert_ms".into(), round(plain_ms).into());
    figures.insert("pg_knit_initial_ms".into(), round(knit_ms).into());
    figures.insert("pg_knit_vs_plain".into(), round3(share).into());
    figures.insert("pg_knit_incremental_run_ms".into(), round(next_ms).into());
    println!("SQLite -> PostgreSQL, {rows} rows:");
    println!(
        "  plain batched INSERT (1,000 rows per statement)      {plain_ms:>10.1} ms  = {:>8.0} rows/s",
        rows as f64 / plain_ms * 1000.0
    );
    println!(
        "  knit initial sync (detect, sync, apply)              {knit_ms:>10.1} ms  = {:>8.0} rows/s = {:.1} % of plain (goal >= 50 %)",
        rows as f64 / knit_ms * 1000.0,
        share * 100.0
    );
    println!(
        "  knit Incremental run after {changes} changes (detect, sync, apply) {next_ms:>9.1} ms"
    );
    Ok(())
}

fn seed_sqlite(path: &Path, rows: usize) -> Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, email TEXT, city TEXT, updated_at TEXT);",
    )?;
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO customers (id, name, email, city, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for id in 0..rows {
            insert.execute(rusqlite::params![
                id as i64,
                format!("Customer {id}"),
                format!("customer{id}@example.com"),
                ["Paris", "Lyon", "Berlin", "Oslo"][id % 4],
                "2026-01-01 00:00:00",
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Changes `changes` rows spread over the table.
fn touch_rows(path: &Path, rows: usize, changes: usize) -> Result<()> {
    let mut conn = rusqlite::Connection::open(path)?;
    let tx = conn.transaction()?;
    let step = (rows / changes.max(1)).max(1);
    let stamp = format!("{:?}", Instant::now());
    for i in 0..changes {
        tx.execute(
            "UPDATE customers SET email = ?1 WHERE id = ?2",
            rusqlite::params![format!("changed{i}-{stamp}@example.com"), (i * step) as i64],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

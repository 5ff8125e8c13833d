//! `knit demo`: the README's first command. A real schema-driven sync over the shipped
//! example `examples/shop/`: a SQLite CRM table and a CSV export with other column
//! names, kept in step both ways by `schemas.toml`.
//!
//! The demo copies the example into a fresh folder, builds the SQLite database from
//! `crm.sql`, runs the schema set (the empty CSV fills), edits one row on each side as a
//! person would (with the csv crate and rusqlite, outside knit), runs again (both edits
//! cross), prints the history and the commands to try next. Exit 1 if an edit did not
//! cross: the demo checks what it shows.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::run::{run_round, verdict};
use super::schema_cmd::{write_history, Place, Reach};
use super::{CliResult, Failure};
use crate::model::ReplicaId;
use crate::sync::CancelToken;

/// The example's folder, as the source tree has it.
const EXAMPLE: &str = "examples/shop";
const CUSTOMERS_CSV: &str = "export/contacts.csv";
const DATABASE: &str = "crm.db";

/// The row each side edits between the two runs, and the values they set.
const CSV_EDIT_KEY: &str = "3";
const CSV_EDIT_LAST_NAME: &str = "Murray";
const CSV_EDIT_TOWN: &str = "Arlington";
const SQL_EDIT_KEY: i64 = 1;
const SQL_EDIT_EMAIL: &str = "ada.lovelace@example.org";

pub(super) fn demo(dir: Option<PathBuf>, out: &mut dyn Write) -> CliResult {
    let example = find_example()?;
    let root = dir.unwrap_or_else(|| {
        let id = ReplicaId::new_random().to_string();
        std::env::temp_dir().join(format!("knit-demo-{}", id.get(..8).unwrap_or(&id)))
    });
    let in_root = |e: &dyn std::fmt::Display| Failure::Error(format!("{}: {e}", root.display()));
    if std::fs::read_dir(&root).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(in_root(
            &"the folder is not empty; the demo needs a new one",
        ));
    }
    std::fs::create_dir_all(&root).map_err(|e| in_root(&e))?;
    copy_example(&example, &root)?;
    build_database(&root)?;
    let place = Place {
        file: root.join("schemas.toml"),
        datasources: None,
        state: None,
    };

    writeln!(
        out,
        "knit demo: the shop example, copied to {}",
        root.display()
    )?;
    writeln!(
        out,
        "   {DATABASE:<19}  a SQLite CRM built from crm.sql: customers(id, full_name, \
         email, city, updated_at), {} rows",
        sql_count(&root)?
    )?;
    writeln!(
        out,
        "   {CUSTOMERS_CSV}  a mailing export: customer_id, first_name, last_name, mail, \
         town; empty"
    )?;
    writeln!(
        out,
        "   {:<19}  schema \"customers\", bidirectional: full_name splits into \
         first_name and last_name (SPLIT(0), SPLIT(1)) and joins back",
        "schemas.toml"
    )?;

    writeln!(out, "\n1. knit run schemas.toml: the export fills.")?;
    let first = run_round(&place, &[], &CancelToken::new(), false, out)?;
    verdict(&first)?;
    writeln!(
        out,
        "   {CUSTOMERS_CSV} now holds {} rows",
        csv_rows(&root)?.len()
    )?;

    writeln!(out, "\n2. Someone edits each side.")?;
    let (old_last, old_town) = edit_csv(&root)?;
    writeln!(
        out,
        "   {CUSTOMERS_CSV}  customer {CSV_EDIT_KEY}: last_name {old_last} -> \
         {CSV_EDIT_LAST_NAME}, town {old_town} -> {CSV_EDIT_TOWN}"
    )?;
    let old_email = edit_sql(&root)?;
    writeln!(
        out,
        "   {DATABASE:<19}  customer {SQL_EDIT_KEY}: email {old_email} -> {SQL_EDIT_EMAIL}"
    )?;

    writeln!(out, "\n3. knit run schemas.toml again: both edits cross.")?;
    let second = run_round(&place, &[], &CancelToken::new(), false, out)?;
    verdict(&second)?;
    let (full_name, city) = sql_customer(&root, CSV_EDIT_KEY)?;
    writeln!(
        out,
        "   {DATABASE:<19}  customer {CSV_EDIT_KEY}: full_name {full_name:?}, city {city:?}"
    )?;
    let mail = csv_field(&root, &SQL_EDIT_KEY.to_string(), "mail")?;
    writeln!(
        out,
        "   {CUSTOMERS_CSV}  customer {SQL_EDIT_KEY}: mail {mail:?}"
    )?;
    let crossed = full_name.ends_with(&format!(" {CSV_EDIT_LAST_NAME}"))
        && city == CSV_EDIT_TOWN
        && mail == SQL_EDIT_EMAIL;

    writeln!(out, "\n4. knit history schemas.toml")?;
    let records = place
        .manager(Reach::FileOnly)?
        .history(None)
        .map_err(|e| Failure::Error(e.to_string()))?;
    write_history(out, &records, &place)?;
    if !crossed {
        return Err(Failure::Negative(format!(
            "{}: the edits did not cross both ways",
            root.display()
        )));
    }

    let file = place.file.display();
    writeln!(
        out,
        "\nTry next (from the source tree, `cargo run --release --` stands for `knit`):"
    )?;
    writeln!(out, "   knit schema list {file}")?;
    writeln!(out, "   knit run {file}")?;
    writeln!(out, "   knit run {file} --json")?;
    writeln!(out, "   knit history {file}")?;
    writeln!(out, "   knit schema validate {file}")?;
    Ok(())
}

/// `examples/shop` under the current folder, else under the source tree this binary was
/// built from.
fn find_example() -> Result<PathBuf, Failure> {
    let built_from = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXAMPLE);
    [PathBuf::from(EXAMPLE), built_from.clone()]
        .into_iter()
        .find(|p| p.join("schemas.toml").is_file())
        .ok_or_else(|| {
            Failure::Error(format!(
                "cannot find the demo's example: neither ./{EXAMPLE} nor {} holds \
                 schemas.toml (run the demo from knit's source tree)",
                built_from.display()
            ))
        })
}

/// Copies the example's files, but never a database or a state folder that someone's
/// run left in the source tree: the demo starts from the text files only.
fn copy_example(from: &Path, to: &Path) -> CliResult {
    let fail = |path: &Path, e: std::io::Error| Failure::Error(format!("{}: {e}", path.display()));
    let entries = std::fs::read_dir(from).map_err(|e| fail(from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| fail(from, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let name_text = name.to_string_lossy();
        let target = to.join(&name);
        if name_text.ends_with(".state") || name_text.starts_with(DATABASE) {
            continue;
        }
        if path.is_dir() {
            std::fs::create_dir_all(&target).map_err(|e| fail(&target, e))?;
            copy_example(&path, &target)?;
        } else {
            std::fs::copy(&path, &target).map_err(|e| fail(&target, e))?;
        }
    }
    Ok(())
}

fn sql_error(root: &Path, e: rusqlite::Error) -> Failure {
    Failure::Error(format!("{}: {e}", root.join(DATABASE).display()))
}

fn build_database(root: &Path) -> CliResult {
    let seed = root.join("crm.sql");
    let sql = std::fs::read_to_string(&seed)
        .map_err(|e| Failure::Error(format!("{}: {e}", seed.display())))?;
    let db = rusqlite::Connection::open(root.join(DATABASE)).map_err(|e| sql_error(root, e))?;
    db.execute_batch(&sql).map_err(|e| sql_error(root, e))
}

fn sql_count(root: &Path) -> Result<i64, Failure> {
    let db = rusqlite::Connection::open(root.join(DATABASE)).map_err(|e| sql_error(root, e))?;
    db.query_row("SELECT count(*) FROM customers", [], |row| row.get(0))
        .map_err(|e| sql_error(root, e))
}

/// Sets customer 1's email (and its modified-at stamp, as an application would);
/// returns the old email.
fn edit_sql(root: &Path) -> Result<String, Failure> {
    let db = rusqlite::Connection::open(root.join(DATABASE)).map_err(|e| sql_error(root, e))?;
    let old: String = db
        .query_row(
            "SELECT email FROM customers WHERE id = ?1",
            [SQL_EDIT_KEY],
            |row| row.get(0),
        )
        .map_err(|e| sql_error(root, e))?;
    db.execute(
        "UPDATE customers SET email = ?1, updated_at = '2024-06-01T10:00:00Z' WHERE id = ?2",
        rusqlite::params![SQL_EDIT_EMAIL, SQL_EDIT_KEY],
    )
    .map_err(|e| sql_error(root, e))?;
    Ok(old)
}

/// A customer's full_name and city in the database (empty text for NULL).
fn sql_customer(root: &Path, key: &str) -> Result<(String, String), Failure> {
    let db = rusqlite::Connection::open(root.join(DATABASE)).map_err(|e| sql_error(root, e))?;
    db.query_row(
        "SELECT coalesce(full_name, ''), coalesce(city, '') FROM customers WHERE id = ?1",
        [key],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .map_err(|e| sql_error(root, e))
}

fn csv_error(root: &Path, e: impl std::fmt::Display) -> Failure {
    Failure::Error(format!("{}: {e}", root.join(CUSTOMERS_CSV).display()))
}

/// The export's header and rows.
fn csv_table(root: &Path) -> Result<(csv::StringRecord, Vec<csv::StringRecord>), Failure> {
    let mut reader =
        csv::Reader::from_path(root.join(CUSTOMERS_CSV)).map_err(|e| csv_error(root, e))?;
    let header = reader.headers().map_err(|e| csv_error(root, e))?.clone();
    let rows = reader
        .records()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| csv_error(root, e))?;
    Ok((header, rows))
}

fn csv_rows(root: &Path) -> Result<Vec<csv::StringRecord>, Failure> {
    Ok(csv_table(root)?.1)
}

fn column(root: &Path, header: &csv::StringRecord, name: &str) -> Result<usize, Failure> {
    header
        .iter()
        .position(|h| h == name)
        .ok_or_else(|| csv_error(root, format!("no column {name}")))
}

/// The value of `field` in the export's row with customer_id `key`.
fn csv_field(root: &Path, key: &str, field: &str) -> Result<String, Failure> {
    let (header, rows) = csv_table(root)?;
    let (id, wanted) = (
        column(root, &header, "customer_id")?,
        column(root, &header, field)?,
    );
    rows.iter()
        .find(|r| r.get(id) == Some(key))
        .and_then(|r| r.get(wanted))
        .map(str::to_string)
        .ok_or_else(|| csv_error(root, format!("no row with customer_id {key}")))
}

/// Changes last_name and town of one row of the export; returns their old values.
fn edit_csv(root: &Path) -> Result<(String, String), Failure> {
    let (header, mut rows) = csv_table(root)?;
    let id = column(root, &header, "customer_id")?;
    let last = column(root, &header, "last_name")?;
    let town = column(root, &header, "town")?;
    let row = rows
        .iter_mut()
        .find(|r| r.get(id) == Some(CSV_EDIT_KEY))
        .ok_or_else(|| csv_error(root, format!("no row with customer_id {CSV_EDIT_KEY}")))?;
    let mut cells: Vec<String> = row.iter().map(str::to_string).collect();
    let old = (
        cells.get(last).cloned().unwrap_or_default(),
        cells.get(town).cloned().unwrap_or_default(),
    );
    for (at, value) in [(last, CSV_EDIT_LAST_NAME), (town, CSV_EDIT_TOWN)] {
        if let Some(cell) = cells.get_mut(at) {
            *cell = value.to_string();
        }
    }
    *row = csv::StringRecord::from(cells);
    let mut writer =
        csv::Writer::from_path(root.join(CUSTOMERS_CSV)).map_err(|e| csv_error(root, e))?;
    writer
        .write_record(&header)
        .map_err(|e| csv_error(root, e))?;
    for r in &rows {
        writer.write_record(r).map_err(|e| csv_error(root, e))?;
    }
    writer.flush().map_err(|e| csv_error(root, e))?;
    Ok(old)
}

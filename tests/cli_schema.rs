//! End-to-end tests of `knit run`, `knit schema ...`, `knit history` and `knit demo`:
//! each runs the built binary on a temporary copy of `examples/shop` (the SQLite CRM
//! built from its crm.sql, the CSV export with other column names) and checks output,
//! exit status and the files afterwards.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestResult;
use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(output: Output) -> Self {
        Self {
            // A run killed by a signal has no code; -1 fails every check below.
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Exited with `code`; a failure shows both streams.
    fn exits(self, code: i32) -> Self {
        assert_eq!(
            self.code, code,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        self
    }

    /// Succeeded without a word on stderr (no progress bar when stderr is no terminal).
    fn ok(self) -> Self {
        let run = self.exits(0);
        assert!(run.stderr.is_empty(), "unexpected stderr: {}", run.stderr);
        run
    }

    /// Failed with `code`, one `knit: ...` line on stderr that names `names`.
    fn fails_naming(self, code: i32, names: &str) -> Self {
        let run = self.exits(code);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "want one stderr line: {:?}", run.stderr);
        assert!(lines[0].starts_with("knit: "), "{:?}", lines[0]);
        assert!(
            lines[0].contains(names),
            "{:?} does not name {names:?}",
            lines[0]
        );
        run
    }

    /// Each stdout line as a JSON object.
    fn json_lines(&self) -> Result<Vec<Value>, serde_json::Error> {
        self.stdout.lines().map(serde_json::from_str).collect()
    }
}

fn knit(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(args)
        .output()
        .expect("run knit");
    Run::of(output)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// A copy of the shop example with its database built, as `knit demo` makes one.
struct Shop {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Shop {
    fn new() -> Result<Self, Box<dyn std::error::Error>> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("shop");
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shop");
        std::fs::create_dir_all(dir.join("export"))?;
        for file in [
            "crm.sql",
            "datasources.toml",
            "schemas.toml",
            "export/contacts.csv",
        ] {
            std::fs::copy(example.join(file), dir.join(file))?;
        }
        let db = rusqlite::Connection::open(dir.join("crm.db"))?;
        db.execute_batch(&std::fs::read_to_string(dir.join("crm.sql"))?)?;
        Ok(Self { _tmp: tmp, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn schemas(&self) -> String {
        s(&self.path("schemas.toml")).to_string()
    }

    fn csv(&self, name: &str) -> std::io::Result<String> {
        std::fs::read_to_string(self.path("export").join(name))
    }

    fn sql(&self, statement: &str) -> rusqlite::Result<usize> {
        rusqlite::Connection::open(self.path("crm.db"))?.execute(statement, [])
    }

    fn sql_text(&self, query: &str) -> rusqlite::Result<String> {
        rusqlite::Connection::open(self.path("crm.db"))?.query_row(query, [], |r| r.get(0))
    }

    /// Adds an export entity whose columns have the CRM's names, so auto-map pairs all.
    fn add_mirror_entity(&self) -> std::io::Result<()> {
        std::fs::write(
            self.path("export/mirror.csv"),
            "id,full_name,email,city,updated_at\n",
        )
    }
}

#[test]
fn run_fills_the_export_then_moves_nothing_and_prints_json_per_schema() -> TestResult {
    let shop = Shop::new()?;
    let first = knit(&["run", &shop.schemas(), "--json"]).ok();
    let reports = first.json_lines()?;
    assert_eq!(reports.len(), 1, "{}", first.stdout);
    let report = &reports[0];
    assert_eq!(report["schema"], "customers");
    assert_eq!(report["status"], "success");
    assert_eq!(report["inserted"], 20);
    assert_eq!(report["failed"], 0);
    assert!(report["conflicts"].as_array().is_some_and(Vec::is_empty));
    let csv = shop.csv("contacts.csv")?;
    assert_eq!(csv.lines().count(), 21, "{csv}");
    assert!(
        csv.contains("3,Grace,Hopper,grace@example.org,New York"),
        "SPLIT made first and last names: {csv}"
    );

    let again = knit(&["run", &shop.schemas(), "--json"])
        .ok()
        .json_lines()?;
    assert_eq!(again[0]["status"], "success");
    for figure in ["inserted", "updated", "deleted", "failed"] {
        assert_eq!(again[0][figure], 0, "{figure} on an unchanged rerun");
    }
    assert_eq!(shop.csv("contacts.csv")?, csv);

    // The status went back into the schema file.
    let file = std::fs::read_to_string(shop.path("schemas.toml"))?;
    assert!(file.contains("status = \"success\""), "{file}");
    assert!(file.contains("last_sync = "), "{file}");
    Ok(())
}

#[test]
fn run_prints_figures_and_edits_cross_both_ways() -> TestResult {
    let shop = Shop::new()?;
    let first = knit(&["run", &shop.schemas()]).ok();
    assert!(
        first.stdout.starts_with("customers: success in ") && first.stdout.contains("inserted 20"),
        "{}",
        first.stdout
    );
    shop.sql("UPDATE customers SET city = 'Paris' WHERE id = 2")?;
    let csv = shop.csv("contacts.csv")?.replace(
        "5,Barbara,Liskov,barbara@example.org",
        "5,Barbara,Huberman,barbara@example.org",
    );
    std::fs::write(shop.path("export/contacts.csv"), csv)?;

    let second = knit(&["run", &shop.schemas()]).ok();
    assert!(second.stdout.contains("updated 2"), "{}", second.stdout);
    assert!(shop
        .csv("contacts.csv")?
        .contains("2,Alan,Turing,alan@example.org,Paris"));
    assert_eq!(
        shop.sql_text("SELECT full_name FROM customers WHERE id = 5")?,
        "Barbara Huberman",
        "first_name and last_name joined back into full_name"
    );
    Ok(())
}

#[test]
fn a_field_changed_on_both_sides_is_one_conflict_with_its_winner() -> TestResult {
    let shop = Shop::new()?;
    knit(&["run", &shop.schemas()]).ok();
    shop.sql("UPDATE customers SET city = 'Delft' WHERE id = 4")?;
    let csv = shop.csv("contacts.csv")?.replace(
        "4,Edsger,Dijkstra,edsger@example.org,Eindhoven",
        "4,Edsger,Dijkstra,edsger@example.org,Utrecht",
    );
    std::fs::write(shop.path("export/contacts.csv"), csv)?;
    let reports = knit(&["run", &shop.schemas(), "--json"])
        .ok()
        .json_lines()?;
    let conflicts = reports[0]["conflicts"].as_array().ok_or("conflicts")?;
    assert_eq!(conflicts.len(), 1, "{}", reports[0]);
    let c = &conflicts[0];
    assert_eq!(c["key"], serde_json::json!(["4"]));
    assert_eq!(c["field"], "town");
    assert_eq!(c["kind"], "update_update");
    assert_eq!(c["source"], "Delft");
    assert_eq!(c["destination"], "Utrecht");
    // The schema says source_wins.
    assert_eq!(c["winner"], "source");
    assert!(shop
        .csv("contacts.csv")?
        .contains("4,Edsger,Dijkstra,edsger@example.org,Delft"));
    Ok(())
}

#[test]
fn the_text_report_names_a_conflict_by_key_field_and_winner() -> TestResult {
    let shop = Shop::new()?;
    knit(&["run", &shop.schemas()]).ok();
    shop.sql("UPDATE customers SET email = 'a@crm.example' WHERE id = 6")?;
    let csv = shop.csv("contacts.csv")?.replace(
        "6,Donald,Knuth,don@example.org",
        "6,Donald,Knuth,b@export.example",
    );
    std::fs::write(shop.path("export/contacts.csv"), csv)?;
    let run = knit(&["run", &shop.schemas()]).ok();
    assert!(
        run.stdout.contains(
            "  conflict  key 6, field mail: both sides updated it; source \"a@crm.example\", \
             destination \"b@export.example\" -> source won"
        ),
        "{}",
        run.stdout
    );
    let history = knit(&["history", &shop.schemas(), "--json"])
        .ok()
        .json_lines()?;
    assert_eq!(history[1]["conflicts"], 1);
    Ok(())
}

#[test]
fn a_failed_row_makes_the_run_partial_exit_1_and_shows_in_the_history() -> TestResult {
    let shop = Shop::new()?;
    knit(&["run", &shop.schemas()]).ok();
    // The CRM's id is an INTEGER PRIMARY KEY: a text key cannot go in.
    let mut csv = shop.csv("contacts.csv")?;
    csv.push_str("x9,Bad,Row,bad@example.org,Nowhere\n");
    std::fs::write(shop.path("export/contacts.csv"), csv)?;

    let run = knit(&["run", &shop.schemas()]).fails_naming(1, "customers (partial)");
    assert!(run.stdout.contains("customers: partial"), "{}", run.stdout);
    assert!(run.stdout.contains("failed    key x9: "), "{}", run.stdout);

    let history = knit(&["history", &shop.schemas()]).ok();
    let lines: Vec<&str> = history.stdout.lines().collect();
    assert!(lines[0].starts_with("started"), "{}", history.stdout);
    assert!(
        lines[1].contains("customers  success"),
        "{}",
        history.stdout
    );
    assert!(
        lines[2].contains("customers  partial"),
        "{}",
        history.stdout
    );
    assert!(
        history.stdout.contains("errors:") && history.stdout.contains("customers: key x9: "),
        "{}",
        history.stdout
    );

    let records = knit(&[
        "history",
        &shop.schemas(),
        "--json",
        "--schema",
        "customers",
    ])
    .ok()
    .json_lines()?;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["status"], "success");
    assert_eq!(records[0]["inserted"], 20);
    assert_eq!(records[1]["status"], "partial");
    assert_eq!(records[1]["failed"], 1);
    Ok(())
}

#[test]
fn run_names_an_unknown_schema_and_runs_nothing() -> TestResult {
    let shop = Shop::new()?;
    let csv = shop.csv("contacts.csv")?;
    knit(&[
        "run",
        &shop.schemas(),
        "--schema",
        "customers",
        "--schema",
        "nope",
    ])
    .fails_naming(2, "\"nope\"");
    assert_eq!(shop.csv("contacts.csv")?, csv);
    assert!(!shop.path("schemas.state").exists());
    let missing = shop.path("missing.toml");
    knit(&["run", s(&missing)]).fails_naming(2, s(&missing));
    Ok(())
}

#[test]
fn a_bad_every_value_is_refused_with_the_accepted_forms() -> TestResult {
    let shop = Shop::new()?;
    for bad in ["5x", "0", "1.5m", "-3"] {
        let flag = format!("--every={bad}");
        let run = knit(&["run", &shop.schemas(), &flag]).fails_naming(2, "--every");
        assert!(run.stderr.contains("30s"), "{}", run.stderr);
    }
    assert!(!shop.path("schemas.state").exists(), "nothing ran");
    Ok(())
}

#[cfg(unix)]
#[test]
fn every_repeats_the_run_until_ctrl_c_and_stops_promptly() -> TestResult {
    let shop = Shop::new()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(["run", &shop.schemas(), "--every", "1s", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Two rounds, a second apart.
    let first: Value = serde_json::from_str(&lines.recv_timeout(Duration::from_secs(30))??)?;
    let second: Value = serde_json::from_str(&lines.recv_timeout(Duration::from_secs(30))??)?;
    assert_eq!(first["inserted"], 20);
    assert_eq!(second["status"], "success");
    assert_eq!(second["inserted"], 0);

    let interrupted = Instant::now();
    interrupt(&child)?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupted.elapsed() > Duration::from_secs(10) {
            child.kill()?;
            return Err("knit run --every did not stop on Ctrl-C".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        interrupted.elapsed() < Duration::from_secs(3),
        "stopped after {:?}",
        interrupted.elapsed()
    );
    // Interrupted while sleeping: the last round succeeded, so the exit status is 0.
    assert_eq!(status.code(), Some(0));
    Ok(())
}

/// Sends SIGINT to a running child, as Ctrl-C in its terminal would.
#[cfg(unix)]
fn interrupt(child: &std::process::Child) -> TestResult {
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    if kill.success() {
        Ok(())
    } else {
        Err("kill -INT failed".into())
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_during_a_run_cancels_it_between_batches_and_records_it() -> TestResult {
    let shop = Shop::new()?;
    // Enough one-row batches that the run is still going when the signal lands.
    shop.sql(
        "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 399) \
         INSERT INTO customers (id, full_name) SELECT i, 'Extra Customer' FROM n",
    )?;
    let file = shop.schemas();
    knit(&[
        "schema",
        "update",
        &file,
        "--schema",
        "customers",
        "--batch-size",
        "1",
    ])
    .ok();
    let child = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(["run", &file, "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The history's marker appears once the run holds its replicas, before any batch.
    let marker = shop.path("schemas.state/customers/running.json");
    let started = Instant::now();
    while !marker.exists() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("the run never started".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    interrupt(&child)?;
    let run = Run::of(child.wait_with_output()?).exits(1);
    assert!(run.stderr.contains("interrupted"), "{}", run.stderr);
    assert!(
        run.stderr.contains("customers (cancelled)"),
        "{}",
        run.stderr
    );
    let report: Value = serde_json::from_str(run.stdout.trim())?;
    assert_eq!(report["status"], "cancelled");
    let records = knit(&["history", &file, "--json"]).ok().json_lines()?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["status"], "cancelled");
    let list = knit(&["schema", "list", &file]).ok();
    assert!(list.stdout.contains(" cancelled "), "{}", list.stdout);
    // The next run finishes the job.
    let next = knit(&["run", &file, "--json"]).ok().json_lines()?;
    assert_eq!(next[0]["status"], "success");
    assert_eq!(shop.csv("contacts.csv")?.lines().count(), 321);
    Ok(())
}

#[test]
fn list_shows_each_schema_and_its_last_status() -> TestResult {
    let shop = Shop::new()?;
    let before = knit(&["schema", "list", &shop.schemas()]).ok();
    let lines: Vec<&str> = before.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", before.stdout);
    for column in [
        "id",
        "source -> destination",
        "type",
        "direction",
        "status",
        "last sync",
    ] {
        assert!(lines[0].contains(column), "{}", lines[0]);
    }
    for cell in [
        "customers",
        "crm:customers -> export:contacts",
        "full",
        "bidirectional",
        "never",
    ] {
        assert!(lines[1].contains(cell), "{cell}: {}", lines[1]);
    }
    knit(&["run", &shop.schemas()]).ok();
    let after = knit(&["schema", "list", &shop.schemas()]).ok();
    assert!(after.stdout.contains(" success "), "{}", after.stdout);
    Ok(())
}

#[test]
fn validate_passes_on_the_example_and_touches_nothing() -> TestResult {
    let shop = Shop::new()?;
    let run = knit(&["schema", "validate", &shop.schemas()]).ok();
    assert!(
        run.stdout.contains("every schema is valid"),
        "{}",
        run.stdout
    );
    knit(&[
        "schema",
        "validate",
        &shop.schemas(),
        "--schema",
        "customers",
    ])
    .ok();
    knit(&["schema", "validate", &shop.schemas(), "--schema", "nope"]).fails_naming(2, "nope");
    assert!(!shop.path("schemas.state").exists());
    Ok(())
}

#[test]
fn validate_lists_every_problem_with_a_suggestion_and_leaves_the_data_alone() -> TestResult {
    let shop = Shop::new()?;
    let file = std::fs::read_to_string(shop.path("schemas.toml"))?
        .replace("source = \"email\"", "source = \"emial\"")
        .replace("conflict = \"source_wins\"", "conflict = \"lww\"");
    std::fs::write(shop.path("schemas.toml"), &file)?;
    let snapshot = || -> std::io::Result<[Vec<u8>; 3]> {
        Ok([
            std::fs::read(shop.path("crm.db"))?,
            std::fs::read(shop.path("export/contacts.csv"))?,
            std::fs::read(shop.path("schemas.toml"))?,
        ])
    };
    let before = snapshot()?;

    let run = knit(&["schema", "validate", &shop.schemas()]).fails_naming(1, "2 problem(s)");
    let problems: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(problems.len(), 2, "{}", run.stdout);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("customers.mappings[3].source")
                && p.contains("\"emial\"")
                && p.contains("did you mean \"email\"?")),
        "{}",
        run.stdout
    );
    assert!(
        problems.iter().any(|p| p.contains("customers.conflict")
            && p.contains("\"lww\"")
            && p.contains("last_writer_wins")),
        "{}",
        run.stdout
    );
    assert_eq!(snapshot()?, before, "validate changed a file");
    assert!(!shop.path("schemas.state").exists());

    // A bad value keeps the whole file from loading: run refuses it and names it.
    knit(&["run", &shop.schemas()]).fails_naming(2, "lww");
    // With only the field typo left, run skips the schema and prints its problem.
    std::fs::write(
        shop.path("schemas.toml"),
        file.replace("conflict = \"lww\"", "conflict = \"source_wins\""),
    )?;
    let before = snapshot()?;
    let run = knit(&["run", &shop.schemas()]).fails_naming(1, "customers (invalid)");
    assert!(
        run.stdout.contains("customers: invalid, skipped"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("did you mean \"email\"?"),
        "{}",
        run.stdout
    );
    let json = knit(&["run", &shop.schemas(), "--json"])
        .exits(1)
        .json_lines()?;
    assert_eq!(json[0]["status"], "invalid");
    assert_eq!(json[0]["problems"][0]["path"], "mappings[3].source");
    assert_eq!(json[0]["problems"][0]["value"], "emial");
    assert_eq!(snapshot()?, before, "an invalid schema ran");
    Ok(())
}

#[test]
fn add_with_automap_update_run_and_remove_round_trip() -> TestResult {
    let shop = Shop::new()?;
    shop.add_mirror_entity()?;
    let file = shop.schemas();
    let added = knit(&[
        "schema",
        "add",
        &file,
        "--id",
        "mirror",
        "--source",
        "crm:customers:id",
        "--destination",
        "export:mirror:id",
        "--automap",
        "--direction",
        "source_to_destination",
    ])
    .ok();
    assert!(
        added.stdout.contains("5 field(s) paired by name"),
        "{}",
        added.stdout
    );
    assert!(
        added.stdout.contains("  full_name -> full_name"),
        "{}",
        added.stdout
    );
    knit(&["schema", "validate", &file, "--schema", "mirror"]).ok();

    knit(&[
        "schema",
        "update",
        &file,
        "--schema",
        "mirror",
        "--conflict",
        "last_writer_wins",
        "--batch-size",
        "5",
    ])
    .ok();
    let text = std::fs::read_to_string(shop.path("schemas.toml"))?;
    let mirror = text
        .split("id = \"mirror\"")
        .nth(1)
        .ok_or("mirror is saved")?;
    assert!(mirror.contains("conflict = \"last_writer_wins\""), "{text}");
    assert!(mirror.contains("batch_size = 5"), "{text}");
    assert!(
        mirror.contains("direction = \"source_to_destination\""),
        "{text}"
    );

    // In the order asked for, not file order.
    let run = knit(&[
        "run",
        &file,
        "--schema",
        "mirror",
        "--schema",
        "customers",
        "--json",
    ])
    .ok();
    let reports = run.json_lines()?;
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[0]["schema"], "mirror");
    assert_eq!(reports[0]["inserted"], 20);
    assert_eq!(reports[1]["schema"], "customers");
    assert_eq!(shop.csv("mirror.csv")?.lines().count(), 21);

    let removed = knit(&["schema", "remove", &file, "--schema", "mirror"]).ok();
    assert!(
        removed.stdout.contains("removed schema mirror"),
        "{}",
        removed.stdout
    );
    let list = knit(&["schema", "list", &file]).ok();
    assert!(!list.stdout.contains("mirror"), "{}", list.stdout);
    // Its history stays.
    let history = knit(&["history", &file, "--schema", "mirror", "--json"]).ok();
    assert_eq!(history.json_lines()?.len(), 1);
    knit(&["schema", "remove", &file, "--schema", "mirror"]).fails_naming(2, "mirror");
    Ok(())
}

#[test]
fn automap_prints_pairs_and_write_sets_the_mappings() -> TestResult {
    let shop = Shop::new()?;
    shop.add_mirror_entity()?;
    let file = shop.schemas();
    let added = knit(&[
        "schema",
        "add",
        &file,
        "--id",
        "mirror",
        "--source",
        "crm:customers:id",
        "--destination",
        "export:mirror:id",
    ])
    .ok();
    assert!(added.stdout.contains("no mappings yet"), "{}", added.stdout);
    // No mapping writes the destination key yet.
    knit(&["schema", "validate", &file, "--schema", "mirror"]).exits(1);

    let shown = knit(&["schema", "automap", &file, "--schema", "mirror"]).ok();
    assert!(
        shown.stdout.contains("  email -> email"),
        "{}",
        shown.stdout
    );
    assert!(
        shown.stdout.contains("unmapped source fields: none"),
        "{}",
        shown.stdout
    );
    knit(&["schema", "validate", &file, "--schema", "mirror"]).exits(1);

    let written = knit(&["schema", "automap", &file, "--schema", "mirror", "--write"]).ok();
    assert!(
        written.stdout.contains("wrote 5 mapping(s)"),
        "{}",
        written.stdout
    );
    knit(&["schema", "validate", &file, "--schema", "mirror"]).ok();

    // The example's own names differ: nothing pairs, and every field is listed.
    let example = knit(&["schema", "automap", &file, "--schema", "customers"]).ok();
    assert!(
        example.stdout.contains(
            "unmapped destination fields: customer_id, first_name, last_name, mail, town"
        ),
        "{}",
        example.stdout
    );
    Ok(())
}

#[test]
fn add_creates_the_file_and_bad_values_are_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("new.toml");
    let f = s(&file);
    knit(&["schema", "list", f]).fails_naming(2, f);
    knit(&[
        "schema",
        "add",
        f,
        "--id",
        "a",
        "--source",
        "db:people:id",
        "--destination",
        "out:people:pid,region",
        "--sync-type",
        "incremental",
    ])
    .ok();
    let list = knit(&["schema", "list", f]).ok();
    assert!(
        list.stdout.contains("db:people -> out:people"),
        "{}",
        list.stdout
    );
    assert!(list.stdout.contains("incremental"), "{}", list.stdout);
    let text = std::fs::read_to_string(&file)?;
    assert!(
        text.contains("\"pid\"") && text.contains("\"region\""),
        "{text}"
    );

    let run = knit(&[
        "schema",
        "update",
        f,
        "--schema",
        "a",
        "--direction",
        "sideways",
    ])
    .fails_naming(2, "sideways");
    assert!(
        run.stderr.contains("bidirectional"),
        "lists the values: {}",
        run.stderr
    );
    knit(&["schema", "update", f, "--schema", "a", "--batch-size", "0"])
        .fails_naming(2, "batch_size");
    knit(&["schema", "update", f, "--schema", "a"]).fails_naming(2, "nothing to update");
    knit(&[
        "schema",
        "update",
        f,
        "--schema",
        "b",
        "--conflict",
        "manual",
    ])
    .fails_naming(2, "\"b\"");
    knit(&[
        "schema",
        "add",
        f,
        "--id",
        "b",
        "--source",
        "db:people",
        "--destination",
        "x:y:z",
    ])
    .fails_naming(2, "DATASOURCE:ENTITY:KEY");
    knit(&[
        "schema",
        "add",
        f,
        "--id",
        "a",
        "--source",
        "x:y:z",
        "--destination",
        "x:y:z",
    ])
    .fails_naming(2, "already has a schema");
    // Datasources are read only when needed: validate needs them.
    knit(&["schema", "validate", f]).fails_naming(2, "datasources.toml");
    Ok(())
}

#[test]
fn history_of_a_file_that_never_ran_says_so() -> TestResult {
    let shop = Shop::new()?;
    let run = knit(&["history", &shop.schemas()]).ok();
    assert!(run.stdout.starts_with("no runs recorded"), "{}", run.stdout);
    knit(&["history", &shop.schemas(), "--schema", "nope"]).fails_naming(2, "nope");
    Ok(())
}

#[test]
fn demo_runs_the_shop_example_and_both_edits_cross() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("demo");
    let run = knit(&["demo", "--dir", s(&root)]).ok();
    for expected in [
        "customers: success",
        "inserted 20",
        "updated 2",
        "full_name \"Grace Murray\", city \"Arlington\"",
        "mail \"ada.lovelace@example.org\"",
        "started",
    ] {
        assert!(run.stdout.contains(expected), "{expected}: {}", run.stdout);
    }
    let schemas = root.join("schemas.toml");
    assert!(
        run.stdout.contains(&format!("knit run {}", s(&schemas))),
        "{}",
        run.stdout
    );
    // The folder is left for the commands it suggests.
    let records = knit(&["history", s(&schemas), "--json"])
        .ok()
        .json_lines()?;
    assert_eq!(records.len(), 2);
    let rerun = knit(&["run", s(&schemas), "--json"]).ok().json_lines()?;
    assert_eq!(rerun[0]["updated"], 0);
    // A second demo into the same folder refuses.
    knit(&["demo", "--dir", s(&root)]).fails_naming(2, "not empty");
    Ok(())
}

//! End-to-end tests of the `knit` binary: each runs the built executable on replicas in
//! a temporary folder and checks its output, its exit status and the replicas' state
//! afterwards (through `knit status --json` and `knit ls`, or the library).

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestResult;
use knit::{ConflictPolicy, Direction, NoObserver, Replica, ReplicaId, Resolution, SessionOptions};
use serde_json::Value;

/// What one run of `knit` did.
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

    /// Succeeded without a word on stderr.
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "knit failed: {}", self.stderr);
        assert!(self.stderr.is_empty(), "unexpected stderr: {}", self.stderr);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).expect("stdout is one JSON object")
    }

    /// Failed with `code` and exactly one `knit: ...` line on stderr naming `names`
    /// (a folder or a flag), and printed nothing on stdout.
    fn fails_with(&self, code: i32, names: &str) {
        assert_eq!(self.code, code, "stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "want one stderr line, got: {:?}",
            self.stderr
        );
        assert!(lines[0].starts_with("knit: "), "{:?}", lines[0]);
        assert!(
            lines[0].contains(names),
            "{:?} does not name {names:?}",
            lines[0]
        );
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert!(self.stdout.is_empty(), "unexpected stdout: {}", self.stdout);
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

/// A new replica in `parent/name`; returns its folder (as a string) and id.
fn init(parent: &Path, name: &str) -> (String, String) {
    let dir = parent.join(name);
    let run = knit(&["init", s(&dir)]).ok();
    let id = run.stdout.trim().to_string();
    assert!(ReplicaId::parse(&id).is_some(), "init printed {id:?}");
    (s(&dir).to_string(), id)
}

/// Everything `knit` shows of a replica, to check that a failed command changed nothing.
fn state(dir: &str) -> (Value, String) {
    (
        knit(&["status", dir, "--json"]).ok().json(),
        knit(&["ls", dir]).ok().stdout,
    )
}

/// The tick `knowledge` holds for replica `id` as (lowest, highest) over all items.
fn known_ticks(knowledge: &Value, id: &str) -> (u64, u64) {
    knowledge["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["id"] == id)
        .map_or((0, 0), |r| {
            (
                r["min_tick"].as_u64().expect("min_tick"),
                r["max_tick"].as_u64().expect("max_tick"),
            )
        })
}

/// The integer counters of one direction of `knit sync --json`.
fn counts(stats: &Value) -> [u64; 6] {
    let n = |k: &str| {
        stats[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {stats}"))
    };
    [
        n("batches"),
        n("changes_sent"),
        n("changes_applied"),
        n("changes_skipped"),
        n("changes_failed"),
        n("conflicts"),
    ]
}

#[test]
fn init_put_get_ls_del_round_trip() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    knit(&["put", &a, "fruit", "apple"]).ok();
    knit(&["put", &a, "color", "blue"]).ok();
    knit(&["put", &a, "fruit", "pear"]).ok();
    // A value that looks like a flag is still a value.
    knit(&["put", &a, "temp", "-5"]).ok();
    assert_eq!(knit(&["get", &a, "fruit"]).ok().stdout, "pear\n");
    assert_eq!(
        knit(&["ls", &a]).ok().stdout,
        "color\tblue\nfruit\tpear\ntemp\t-5\n"
    );

    knit(&["del", &a, "fruit"]).ok();
    knit(&["get", &a, "fruit"]).fails_with(1, "fruit");
    assert_eq!(knit(&["ls", &a]).ok().stdout, "color\tblue\ntemp\t-5\n");
    // Four puts and a delete: five ticks; the delete left a tombstone.
    let status = knit(&["status", &a]).ok().stdout;
    assert!(status.contains("tick        5\n"), "{status}");
    assert!(status.contains("live items  2\n"), "{status}");
    assert!(status.contains("tombstones  1\n"), "{status}");
    Ok(())
}

#[test]
fn get_or_del_of_an_absent_key_exits_1_and_changes_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    knit(&["put", &a, "here", "1"]).ok();
    let before = state(&a);
    knit(&["get", &a, "nowhere"]).fails_with(1, "nowhere");
    knit(&["del", &a, "nowhere"]).fails_with(1, "nowhere");
    assert_eq!(state(&a), before);
    Ok(())
}

#[test]
fn sync_reports_counts_as_json_and_a_second_sync_moves_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, a_id) = init(tmp.path(), "a");
    let (b, _) = init(tmp.path(), "b");
    knit(&["put", &a, "k1", "v1"]).ok();
    knit(&["put", &a, "k2", "v2"]).ok();

    let first = knit(&["sync", &a, &b, "--batch-size", "1", "--json"])
        .ok()
        .json();
    // batches, sent, applied, skipped, failed, conflicts: one change per batch.
    assert_eq!(counts(&first["upload"]), [2, 2, 2, 0, 0, 0]);
    assert_eq!(counts(&first["download"])[1..], [0, 0, 0, 0, 0]);
    assert_eq!(first["upload"]["full_enumeration"], false);
    assert_eq!(first["upload"]["cancelled"], false);
    // Item ids and data: "k1" "v1" "k2" "v2".
    assert_eq!(first["upload"]["bytes"], 8);
    assert_eq!(knit(&["ls", &b]).ok().stdout, "k1\tv1\nk2\tv2\n");
    let b_status = knit(&["status", &b, "--json"]).ok().json();
    assert_eq!(known_ticks(&b_status["knowledge"], &a_id), (2, 2));

    // Converged replicas exchange nothing (no echo), in either direction.
    let second = knit(&["sync", &a, &b, "--batch-size", "1", "--json"])
        .ok()
        .json();
    for direction in ["upload", "download"] {
        let stats = &second[direction];
        assert_eq!(counts(stats)[1..], [0, 0, 0, 0, 0], "{direction}: {stats}");
        assert_eq!(stats["bytes"], 0);
        assert_eq!(stats["conflict_outcomes"]["source_won"], 0);
    }

    // Without --json: one summary line on stdout, nothing on stderr (not a terminal).
    knit(&["put", &b, "k3", "v3"]).ok();
    let text = knit(&["sync", &a, &b]).ok().stdout;
    assert_eq!(
        text,
        "upload: 0 sent, 0 applied, 0 skipped, 0 failed, 0 conflicts; \
         download: 1 sent, 1 applied, 0 skipped, 0 failed, 0 conflicts\n"
    );
    assert_eq!(knit(&["get", &a, "k3"]).ok().stdout, "v3\n");
    Ok(())
}

#[test]
fn sync_runs_only_the_direction_asked_for() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    let (b, _) = init(tmp.path(), "b");
    knit(&["put", &a, "from-a", "1"]).ok();
    knit(&["put", &b, "from-b", "2"]).ok();
    let report = knit(&["sync", &a, &b, "--direction", "download", "--json"])
        .ok()
        .json();
    assert!(report.get("upload").is_none(), "{report}");
    assert_eq!(counts(&report["download"])[1..3], [1, 1]);
    assert_eq!(knit(&["ls", &a]).ok().stdout, "from-a\t1\nfrom-b\t2\n");
    assert_eq!(knit(&["ls", &b]).ok().stdout, "from-b\t2\n");
    Ok(())
}

#[test]
fn a_conflicting_edit_under_source_wins_counts_one_conflict() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    let (b, _) = init(tmp.path(), "b");
    knit(&["put", &a, "doc", "v0"]).ok();
    knit(&["sync", &a, &b]).ok();
    knit(&["put", &a, "doc", "from a"]).ok();
    knit(&["put", &b, "doc", "from b"]).ok();

    let report = knit(&["sync", &a, &b, "--policy", "source-wins", "--json"])
        .ok()
        .json();
    let upload = &report["upload"];
    assert_eq!(counts(upload)[1..], [1, 1, 0, 0, 1]);
    assert_eq!(upload["conflict_outcomes"]["source_won"], 1);
    // b resolved the conflict as a fresh version of its own made with knowledge of both
    // sides, so the download delivers it to a as a plain update, not a second conflict.
    let download = &report["download"];
    assert_eq!(counts(download)[1..], [1, 1, 0, 0, 0]);
    assert_eq!(knit(&["get", &a, "doc"]).ok().stdout, "from a\n");
    assert_eq!(knit(&["get", &b, "doc"]).ok().stdout, "from a\n");
    let again = knit(&["sync", &a, &b, "--json"]).ok().json();
    assert_eq!(counts(&again["upload"])[1], 0);
    assert_eq!(counts(&again["download"])[1], 0);
    Ok(())
}

#[test]
fn status_json_describes_the_replica() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, a_id) = init(tmp.path(), "a");
    knit(&["put", &a, "x", "1"]).ok();
    knit(&["put", &a, "y", "2"]).ok();
    knit(&["del", &a, "x"]).ok();
    let status = knit(&["status", &a, "--json"]).ok().json();
    assert_eq!(status["id"], a_id.as_str());
    assert_eq!(status["tick"], 3);
    assert_eq!(status["live_items"], 1);
    assert_eq!(status["tombstones"], 1);
    assert_eq!(status["saved_conflicts"], 0);
    assert_eq!(known_ticks(&status["knowledge"], &a_id), (3, 3));
    assert_eq!(status["knowledge"]["exceptions"], 0);
    assert_eq!(status["forgotten"]["replicas"], serde_json::json!([]));
    Ok(())
}

#[test]
fn a_fresh_replica_has_no_conflicts_to_list_or_resolve() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    assert_eq!(knit(&["conflicts", &a]).ok().stdout, "");
    let before = state(&a);
    knit(&["resolve", &a, "doc", "--take", "local"]).fails_with(2, "doc");
    assert_eq!(state(&a), before);
    Ok(())
}

#[test]
fn a_saved_conflict_is_listed_and_resolved() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, a_id) = init(tmp.path(), "a");
    let (b, _) = init(tmp.path(), "b");
    knit(&["put", &a, "doc", "v0"]).ok();
    knit(&["sync", &a, &b]).ok();
    knit(&["put", &a, "doc", "from a"]).ok();
    knit(&["put", &b, "doc", "from b"]).ok();
    // Only an application-defined policy saves conflicts, and the CLI offers none:
    // make the conflict through the library, then close both replicas.
    {
        let mut ra = Replica::open(Path::new(&a))?;
        let mut rb = Replica::open(Path::new(&b))?;
        let options = SessionOptions {
            direction: Direction::Upload,
            policy: ConflictPolicy::ApplicationDefined(Arc::new(|_| Resolution::SaveConflict)),
            batch_size: 2,
            ..SessionOptions::default()
        };
        let report = ra.sync_with(&mut rb, &options, &mut NoObserver)?;
        assert_eq!(report.upload.map(|s| s.conflicts.saved), Some(1));
    }

    let listed = knit(&["conflicts", &b]).ok().stdout;
    assert_eq!(
        listed,
        format!("doc\tlocal: \"from b\"\tremote: \"from a\" (from {a_id})\n")
    );
    assert_eq!(
        knit(&["status", &b, "--json"]).ok().json()["saved_conflicts"],
        1
    );

    knit(&["resolve", &b, "doc", "--take", "remote"]).ok();
    assert_eq!(knit(&["get", &b, "doc"]).ok().stdout, "from a\n");
    assert_eq!(knit(&["conflicts", &b]).ok().stdout, "");
    let status = knit(&["status", &b, "--json"]).ok().json();
    assert_eq!(status["saved_conflicts"], 0);
    // The resolution learned a's version: b now knows a's tick 2.
    assert_eq!(known_ticks(&status["knowledge"], &a_id).1, 2);
    // It is a fresh version of b made with knowledge of both: a takes it as an update.
    let report = knit(&["sync", &a, &b, "--json"]).ok().json();
    assert_eq!(counts(&report["upload"])[1], 0);
    assert_eq!(counts(&report["download"])[1..], [1, 1, 0, 0, 0]);
    assert_eq!(knit(&["get", &a, "doc"]).ok().stdout, "from a\n");
    Ok(())
}

#[test]
fn gc_removes_old_tombstones_into_forgotten_knowledge() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, a_id) = init(tmp.path(), "a");
    knit(&["put", &a, "gone", "1"]).ok();
    knit(&["put", &a, "kept", "2"]).ok();
    knit(&["del", &a, "gone"]).ok();
    assert_eq!(knit(&["status", &a, "--json"]).ok().json()["tombstones"], 1);

    // A week is older than this tombstone: nothing goes.
    assert_eq!(
        knit(&["gc", &a, "--older-than", "7d"]).ok().stdout,
        "removed 0 tombstones\n"
    );
    assert_eq!(knit(&["status", &a, "--json"]).ok().json()["tombstones"], 1);

    assert_eq!(
        knit(&["gc", &a, "--older-than", "0s"]).ok().stdout,
        "removed 1 tombstone\n"
    );
    let status = knit(&["status", &a, "--json"]).ok().json();
    assert_eq!(status["tombstones"], 0);
    assert_eq!(status["live_items"], 1);
    // The delete was a's tick 3; its version now lies in forgotten knowledge.
    assert_eq!(known_ticks(&status["forgotten"], &a_id).1, 3);
    assert_eq!(knit(&["ls", &a]).ok().stdout, "kept\t2\n");
    Ok(())
}

#[test]
fn rekey_continues_under_a_new_id() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, old_id) = init(tmp.path(), "a");
    knit(&["put", &a, "k", "v"]).ok();
    let new_id = knit(&["rekey", &a]).ok().stdout.trim().to_string();
    assert!(
        ReplicaId::parse(&new_id).is_some(),
        "rekey printed {new_id:?}"
    );
    assert_ne!(new_id, old_id);
    let status = knit(&["status", &a, "--json"]).ok().json();
    assert_eq!(status["id"], new_id.as_str());
    assert_eq!(knit(&["get", &a, "k"]).ok().stdout, "v\n");
    Ok(())
}

#[test]
fn demo_converges_and_leaves_three_equal_replicas() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("demo");
    let run = knit(&["demo", "--engine", "--dir", s(&root)]).ok();
    assert!(
        run.stdout.contains("conflict on settings/theme"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("converged: 3 replicas hold the same 4 items"),
        "{}",
        run.stdout
    );
    let laptop = knit(&["ls", s(&root.join("laptop"))]).ok().stdout;
    assert_eq!(laptop.lines().count(), 4);
    assert!(
        !laptop.contains("note/groceries"),
        "the delete reached the laptop: {laptop}"
    );
    for other in ["phone", "hub"] {
        assert_eq!(
            knit(&["ls", s(&root.join(other))]).ok().stdout,
            laptop,
            "{other}"
        );
    }
    // A second demo in the same place refuses to overwrite the replicas.
    knit(&["demo", "--engine", "--dir", s(&root)]).fails_with(2, s(&root.join("laptop")));
    Ok(())
}

#[test]
fn demo_without_a_folder_makes_one_in_the_temp_dir() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let output = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(["demo", "--engine"])
        .env("TMPDIR", tmp.path())
        .output()?;
    let run = Run::of(output).ok();
    let made: Vec<_> = std::fs::read_dir(tmp.path())?.collect::<Result<_, _>>()?;
    assert_eq!(made.len(), 1);
    let name = made[0].file_name().to_string_lossy().into_owned();
    assert!(name.starts_with("knit-demo-"), "{name}");
    assert!(run.stdout.contains(&name), "the demo says where it is");
    assert!(run.stdout.contains("converged"), "{}", run.stdout);
    Ok(())
}

#[test]
fn a_missing_folder_is_an_error_and_is_not_created() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    let missing = tmp.path().join("missing");
    let m = s(&missing);
    knit(&["put", m, "k", "v"]).fails_with(2, m);
    knit(&["get", m, "k"]).fails_with(2, m);
    knit(&["ls", m]).fails_with(2, m);
    knit(&["status", m]).fails_with(2, m);
    knit(&["gc", m, "--older-than", "0s"]).fails_with(2, m);
    let before = state(&a);
    knit(&["sync", &a, m]).fails_with(2, m);
    assert!(!missing.exists());
    assert_eq!(state(&a), before);
    Ok(())
}

#[test]
fn a_folder_that_is_not_a_replica_is_left_untouched() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain)?;
    let p = s(&plain);
    for args in [
        vec!["put", p, "k", "v"],
        vec!["del", p, "k"],
        vec!["ls", p],
        vec!["status", p, "--json"],
        vec!["rekey", p],
        vec!["sync", &a, p],
        vec!["sync", p, &a],
    ] {
        let run = knit(&args);
        run.fails_with(2, p);
        assert!(
            run.stderr.contains("not a knit replica"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert_eq!(
        std::fs::read_dir(&plain)?.count(),
        0,
        "the folder stays empty"
    );
    Ok(())
}

#[test]
fn init_on_an_existing_replica_fails_and_keeps_it() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, id) = init(tmp.path(), "a");
    knit(&["put", &a, "k", "v"]).ok();
    knit(&["init", &a]).fails_with(2, &a);
    let status = knit(&["status", &a, "--json"]).ok().json();
    assert_eq!(status["id"], id.as_str());
    assert_eq!(status["live_items"], 1);
    Ok(())
}

#[test]
fn bad_flags_are_usage_errors_that_change_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    let (b, _) = init(tmp.path(), "b");
    knit(&["put", &a, "k", "v"]).ok();
    knit(&["del", &a, "k"]).ok();
    let (before_a, before_b) = (state(&a), state(&b));

    knit(&["sync", &a, &b, "--policy", "newest-wins"]).fails_with(2, "--policy");
    knit(&["sync", &a, &b, "--direction", "sideways"]).fails_with(2, "--direction");
    knit(&["sync", &a, &b, "--batch-size", "0"]).fails_with(2, "--batch-size");
    knit(&["gc", &a, "--older-than", "5x"]).fails_with(2, "--older-than");
    knit(&["gc", &a, "--older-than", "10"]).fails_with(2, "--older-than");
    knit(&["resolve", &a, "k", "--take", "both"]).fails_with(2, "--take");
    knit(&["sync", &a, &a]).fails_with(2, &a);

    assert_eq!(state(&a), before_a);
    assert_eq!(state(&b), before_b);
    Ok(())
}

#[test]
fn a_replica_held_by_another_process_fails_fast() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    let (b, _) = init(tmp.path(), "b");
    let held = Replica::open(Path::new(&a))?;

    for args in [vec!["put", &a, "k", "v"], vec!["sync", &b, &a]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_knit"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        // Not a timing assertion: a guard so that a knit waiting on the lock fails
        // this test instead of hanging the suite.
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                child.kill()?;
                panic!("knit {args:?} hangs on a replica in use");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let run = Run::of(child.wait_with_output()?);
        run.fails_with(2, &a);
        assert!(run.stderr.contains("in use"), "{}", run.stderr);
    }

    drop(held);
    knit(&["get", &a, "k"]).fails_with(1, "k");
    assert_eq!(knit(&["status", &a, "--json"]).ok().json()["tick"], 0);
    Ok(())
}

#[test]
fn a_damaged_store_is_one_clear_error() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, _) = init(tmp.path(), "a");
    knit(&["put", &a, "k", "v"]).ok();
    // Overwrite sled's log with bytes that are no valid segment.
    std::fs::write(Path::new(&a).join("db"), vec![0xAB; 4096])?;
    knit(&["ls", &a]).fails_with(2, &a);
    knit(&["put", &a, "k", "w"]).fails_with(2, &a);
    Ok(())
}

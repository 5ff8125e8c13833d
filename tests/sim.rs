//! The simulator: the shipped scenarios pass under a fixed seed set and exercise the
//! faults they promise, a seed reproduces a run byte for byte, and a provider that lies
//! (drops an applied change, or claims knowledge it has not stored) is caught with the
//! seed that shows it. A run's trace replays to the same report or violation, a
//! violating trace shrinks to a handful of operations, and a damaged trace file is
//! refused with the place at fault.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::TestResult;
use knit::{
    replay, replay_with, shrink, simulate, simulate_traced, simulate_with, BatchFault,
    BatchOutcome, BatchRequest, ChangeBatch, ChangeDestination, ChangeGroup, ChangeKind,
    ChangeSource, Clock, ConflictPolicy, GcReport, IdRange, ItemId, ItemMeta, Knowledge, PeerInfo,
    Replica, ReplicaFactory, ReplicaId, Scenario, ShrinkOptions, SimError, SimReplica,
    SledReplicas, StoreError, SyncError, SyncObserver, SyncProvider, Trace, TraceOp, Version,
    Violation, ViolationKind,
};

const EXAMPLES: [&str; 7] = [
    "mesh5",
    "star10_partitions",
    "ring8_cancel_gc",
    "mesh6_crashes",
    "ring6_lost_batches",
    "star6_duplicates",
    "changing6",
];
const SEEDS: std::ops::Range<u64> = 0..3;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/sim")
        .join(format!("{name}.toml"))
}

#[test]
fn the_example_scenarios_pass_a_fixed_seed_set() -> TestResult {
    for name in EXAMPLES {
        let scenario = Scenario::load(&example(name))?;
        for seed in SEEDS {
            let report = simulate(&scenario, seed)?;
            let totals = report.totals();
            assert_eq!(report.seed, seed);
            assert_eq!(report.steps.len(), usize::try_from(scenario.steps)?);
            // Something happened: the seed set is not vacuous.
            assert!(
                totals.syncs > 0 && totals.changes_sent > 0,
                "{name} {seed}: {totals:?}"
            );
            // The last convergence round is the quiet one.
            let quiet = report.convergence.last().ok_or("no convergence round")?;
            assert_eq!(quiet.changes_sent, 0, "{name} {seed}");
        }
    }
    Ok(())
}

/// The faults of each example happen at least once over the seed set, so the fixed
/// seeds exercise what the files promise.
#[test]
fn the_examples_exercise_their_faults() -> TestResult {
    let partitions = Scenario::load(&example("star10_partitions"))?;
    let report = simulate(&partitions, 0)?;
    assert!(report.steps.iter().any(|s| s.edges_down > 0));
    assert!(report.totals().conflicts.merged > 0);

    let ring = Scenario::load(&example("ring8_cancel_gc"))?;
    let report = simulate(&ring, 0)?;
    let sum = |f: fn(&knit::StepMetrics) -> u64| report.steps.iter().map(f).sum::<u64>();
    assert!(sum(|s| s.cancelled) > 0);
    assert!(sum(|s| s.tombstones_removed) > 0);
    assert!(sum(|s| s.full_enumerations) > 0);
    assert!(sum(|s| s.reopened) > 0);
    Ok(())
}

/// Sums a metric over a run's workload steps.
fn over_steps(report: &knit::SimReport, metric: fn(&knit::StepMetrics) -> u64) -> u64 {
    report.steps.iter().map(metric).sum()
}

/// Destinations are killed mid-batch and reopened from a copy of their folder; what
/// they had committed must be there after the reopen (the simulator compares), what
/// they were applying must not have been learned (the soundness check), and every run
/// still converges: `simulate` returns a report only then.
#[test]
fn killed_destinations_reopen_from_their_folder_and_converge() -> TestResult {
    let scenario = Scenario::load(&example("mesh6_crashes"))?;
    let mut kills = 0;
    for seed in SEEDS {
        let report = simulate(&scenario, seed)?;
        kills += over_steps(&report, |s| s.crashed);
        // Faults stop before the full mesh: nobody is killed while converging.
        assert_eq!(report.totals().crashed, over_steps(&report, |s| s.crashed));
    }
    assert!(kills >= 3, "only {kills} kills over seeds {SEEDS:?}");

    // Every session that sends a batch dies at it: the workload's sessions move
    // nothing for good, and the full mesh still brings everything.
    let mut always = scenario.clone();
    always.faults.crash_rate = 1.0;
    always.steps = 8;
    let report = simulate(&always, 0)?;
    let totals = report.totals();
    assert!(over_steps(&report, |s| s.crashed) >= 4, "{totals:?}");
    assert_eq!(over_steps(&report, |s| s.changes_sent), 0, "{totals:?}");
    Ok(())
}

/// Lost batches are sent but never applied; the sessions go on, the engine learns
/// nothing of them, and the convergence phase brings their changes.
#[test]
fn lost_batches_are_never_learned_and_the_replicas_still_converge() -> TestResult {
    let scenario = Scenario::load(&example("ring6_lost_batches"))?;
    for seed in SEEDS {
        let report = simulate(&scenario, seed)?;
        let lost = over_steps(&report, |s| s.batches_lost);
        assert!(lost > 0, "seed {seed} lost no batch");
        // Faults stop before the full mesh: nothing is lost while converging.
        assert_eq!(report.totals().batches_lost, lost);
    }
    Ok(())
}

/// Batches delivered twice (at once or after the next one) change nothing the second
/// time; `simulate` fails with `NotIdempotent` otherwise.
#[test]
fn duplicated_batches_change_nothing_the_second_time() -> TestResult {
    let scenario = Scenario::load(&example("star6_duplicates"))?;
    let mut full_enumerations = 0;
    for seed in SEEDS {
        let report = simulate(&scenario, seed)?;
        assert!(
            over_steps(&report, |s| s.batches_duplicated) > 0,
            "seed {seed} duplicated no batch"
        );
        full_enumerations += over_steps(&report, |s| s.full_enumerations);
    }
    assert!(full_enumerations > 0, "no full enumeration was duplicated");
    Ok(())
}

/// Each phase of a changing topology takes over at its step with its own edges.
#[test]
fn a_changing_topology_changes_its_edges_at_each_phase() -> TestResult {
    let scenario = Scenario::load(&example("changing6"))?;
    let report = simulate(&scenario, 0)?;
    let changes: Vec<u64> = report
        .steps
        .iter()
        .filter(|s| s.topology_changes > 0)
        .map(|s| s.step)
        .collect();
    assert_eq!(changes, [0, 8, 16, 24]);
    assert_eq!(report.totals().topology_changes, 4);
    let edges_at = |step: usize| report.steps.get(step).map(|s| s.edges);
    // A ring of six has six edges, a star five, a random graph at least a spanning tree.
    assert_eq!((edges_at(0), edges_at(8)), (Some(6), Some(5)));
    assert!(edges_at(16) >= Some(5) && edges_at(24) >= Some(5));
    // No partition outlives its edge.
    assert!(report.steps.iter().all(|s| s.edges_down <= s.edges));
    Ok(())
}

/// The knowledge's encoded size is measured after every step: it grows with the
/// replicas a knowledge names and with its exceptions.
#[test]
fn knowledge_bytes_are_measured_at_every_step() -> TestResult {
    let scenario = Scenario::load(&example("ring8_cancel_gc"))?;
    let report = simulate(&scenario, 0)?;
    for m in report.steps.iter().chain(&report.convergence) {
        assert!(
            m.knowledge_bytes_mean <= m.knowledge_bytes_max && m.knowledge_bytes_max > 0,
            "{m:?}"
        );
    }
    // A step where some replica holds exceptions has a larger knowledge than the quiet
    // round at the end, where every exception is gone.
    let quiet = report.convergence.last().ok_or("no convergence round")?;
    assert_eq!(quiet.exceptions_max, 0);
    let busiest = report
        .steps
        .iter()
        .max_by_key(|s| s.exceptions_max)
        .ok_or("no steps")?;
    assert!(busiest.exceptions_max > 0);
    assert_eq!(
        report.totals().knowledge_bytes_max,
        report
            .steps
            .iter()
            .chain(&report.convergence)
            .map(|s| s.knowledge_bytes_max)
            .max()
            .unwrap_or(0)
    );
    Ok(())
}

#[test]
fn a_seed_reproduces_a_run_byte_for_byte() -> TestResult {
    let scenario = Scenario::load(&example("ring8_cancel_gc"))?;
    let first = serde_json::to_string(&simulate(&scenario, 1)?)?;
    let second = serde_json::to_string(&simulate(&scenario, 1)?)?;
    assert_eq!(first, second);
    let other = serde_json::to_string(&simulate(&scenario, 2)?)?;
    assert_ne!(first, other, "two seeds ran the same schedule");
    Ok(())
}

fn knit_sim(args: &[&str]) -> Result<(i32, String, String), Box<dyn std::error::Error>> {
    let output = Command::new(env!("CARGO_BIN_EXE_knit"))
        .arg("sim")
        .args(args)
        .output()?;
    Ok((
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

#[test]
fn the_command_prints_the_same_bytes_for_the_same_seed() -> TestResult {
    let file = example("mesh5");
    let file = file.to_str().ok_or("path is not UTF-8")?;
    let (code, first, _) = knit_sim(&[file, "--seed", "4", "--json"])?;
    assert_eq!(code, 0);
    let (_, second, _) = knit_sim(&[file, "--seed", "4", "--json"])?;
    assert_eq!(first, second);
    let object: serde_json::Value = serde_json::from_str(first.trim())?;
    assert_eq!(
        (object["seed"].as_u64(), object["result"].as_str()),
        (Some(4), Some("ok"))
    );

    let (code, table, _) = knit_sim(&[file, "--seeds", "0..2"])?;
    assert_eq!(code, 0);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[2].trim_start().starts_with('0') && lines[2].ends_with("ok"),
        "{table}"
    );
    Ok(())
}

/// What each panel of `--plot` is captioned; a reader finds the metric by it.
const PLOT_LABELS: [&str; 6] = [
    "knowledge exceptions (max over replicas)",
    "knowledge size in bytes (max over replicas)",
    "knowledge size in bytes (mean over replicas)",
    "tombstones held (sum over replicas)",
    "conflicts per step",
    "changes sent per step",
];

#[test]
fn the_plot_is_svg_naming_scenario_seeds_and_metrics_and_the_same_bytes_each_run() -> TestResult {
    let dir = tempfile::tempdir()?;
    let file = example("mesh5");
    let file = file.to_str().ok_or("path is not UTF-8")?;
    let first = dir.path().join("first.svg");
    let second = dir.path().join("second.svg");

    let (code, table, stderr) = knit_sim(&[
        file,
        "--seeds",
        "0..2",
        "--plot",
        first.to_str().ok_or("path is not UTF-8")?,
    ])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        table.ends_with(&format!("plot: {} (seeds 0, 1)\n", first.display())),
        "{table}"
    );
    let svg = std::fs::read_to_string(&first)?;
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{}",
        &svg[..svg.len().min(100)]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    for text in ["scenario mesh5", "seeds 0, 1", "seed 0", "seed 1", "step ("]
        .into_iter()
        .chain(PLOT_LABELS)
    {
        assert!(svg.contains(text), "the plot lacks {text:?}");
    }

    // JSON output stays one object per seed, and the plot is the same bytes.
    let (code, json, stderr) = knit_sim(&[
        file,
        "--seeds",
        "0..2",
        "--json",
        "--plot",
        second.to_str().ok_or("path is not UTF-8")?,
    ])?;
    assert_eq!(code, 0, "{stderr}");
    for line in json.lines() {
        serde_json::from_str::<serde_json::Value>(line)?;
    }
    assert_eq!(json.lines().count(), 2, "{json}");
    assert!(
        std::fs::read(&second)? == svg.as_bytes(),
        "two runs drew different plots"
    );

    // Nothing else was left in the folder (no temporary file).
    let mut names: Vec<String> = std::fs::read_dir(dir.path())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    assert_eq!(names, ["first.svg", "second.svg"]);
    Ok(())
}

#[test]
fn a_plot_into_a_missing_folder_is_refused_before_any_seed_runs() -> TestResult {
    let dir = tempfile::tempdir()?;
    let plot = dir.path().join("no-such-folder").join("plot.svg");
    let plot_text = plot.to_str().ok_or("path is not UTF-8")?;
    let file = example("mesh5");
    let (code, stdout, stderr) = knit_sim(&[
        file.to_str().ok_or("path is not UTF-8")?,
        "--plot",
        plot_text,
    ])?;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(plot_text) && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert_eq!(stdout, "", "a seed ran before the path was checked");
    assert!(!plot.exists() && !dir.path().join("no-such-folder").exists());
    Ok(())
}

/// The folder exists but the file cannot be put there (a folder already has its
/// name): the simulation runs, the write fails, and neither a partial plot nor the
/// temporary file it was written to is left behind.
#[test]
fn a_plot_that_cannot_be_written_names_the_path_and_leaves_no_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let plot = dir.path().join("taken.svg");
    std::fs::create_dir(&plot)?;
    let plot_text = plot.to_str().ok_or("path is not UTF-8")?;
    let file = example("mesh5");
    let (code, _, stderr) = knit_sim(&[
        file.to_str().ok_or("path is not UTF-8")?,
        "--plot",
        plot_text,
    ])?;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&format!("cannot write the plot {plot_text}")),
        "{stderr}"
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())?.collect::<Result<_, _>>()?;
    assert_eq!(names.len(), 1, "left behind: {names:?}");
    assert_eq!(std::fs::read_dir(&plot)?.count(), 0);
    Ok(())
}

#[test]
fn a_bad_scenario_names_file_line_and_field() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.toml");
    let text =
        std::fs::read_to_string(example("mesh5"))?.replace("hot_share = 0.6", "hot_share = 1.5");
    std::fs::write(&path, text)?;
    let (code, _, stderr) = knit_sim(&[path.to_str().ok_or("path is not UTF-8")?])?;
    assert_eq!(code, 2);
    assert!(
        stderr.contains("bad.toml:") && stderr.contains("keys.hot_share"),
        "{stderr}"
    );
    Ok(())
}

/// How a faulty test replica lies when it applies a batch. A rewrite is told once per
/// replica object (a reopened replica may lie once more).
trait Lie: Send {
    /// The batch to pass to the honest replica instead, and how to adjust what it
    /// reports; `None` to apply `batch` honestly this time.
    fn rewrite(&mut self, _batch: &ChangeBatch) -> Option<Told> {
        None
    }
    /// Runs after every batch the replica applied.
    fn after(&mut self, _inner: &mut Replica, _batch: &ChangeBatch) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A rewritten batch and how to adjust the outcome the replica reports for it.
struct Told {
    batch: ChangeBatch,
    adjust: fn(&mut BatchOutcome),
}

/// Loses one incoming change and reports it applied: the first time a batch carries an
/// update, it passes the batch on without that change but counts it as applied. The
/// batch's groups still cover the item, so the replica learns the version without
/// storing it: exactly the lie "applied" must never tell.
struct DropsOneChange;

impl Lie for DropsOneChange {
    fn rewrite(&mut self, batch: &ChangeBatch) -> Option<Told> {
        let victim = batch
            .changes()
            .find(|c| c.kind == ChangeKind::Update)?
            .item
            .clone();
        let groups = batch
            .groups()
            .iter()
            .map(|g| {
                let kept = g
                    .changes()
                    .iter()
                    .filter(|c| c.item != victim)
                    .cloned()
                    .collect();
                ChangeGroup::new(g.range().clone(), kept, g.present().to_vec())
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Some(Told {
            batch: rebuild(batch, groups)?,
            adjust: |outcome| outcome.applied += 1,
        })
    }
}

/// Claims knowledge it has not stored: the first time a batch is not the session's
/// last, it stretches the batch's last group to the end of the id space before
/// applying it, so it learns what the source knows of every item after the batch
/// without receiving those items' changes. The next batches bring them, and it skips
/// them as already known.
struct ClaimsUnstoredKnowledge;

impl Lie for ClaimsUnstoredKnowledge {
    fn rewrite(&mut self, batch: &ChangeBatch) -> Option<Told> {
        if batch.is_last() {
            return None;
        }
        let (last, before) = batch.groups().split_last()?;
        let stretched = ChangeGroup::new(
            IdRange::from_start(last.range().start().to_vec()),
            last.changes().to_vec(),
            last.present().to_vec(),
        )
        .ok()?;
        let mut groups = before.to_vec();
        groups.push(stretched);
        Some(Told {
            batch: rebuild(batch, groups)?,
            adjust: |_| {},
        })
    }
}

/// Not idempotent: when a batch it has already applied arrives again, it writes the
/// batch's first item once more, as a fresh local version. A link that delivers a
/// batch twice must show it.
#[derive(Default)]
struct WritesOnRedelivery {
    seen: Vec<ChangeBatch>,
}

impl Lie for WritesOnRedelivery {
    fn after(&mut self, inner: &mut Replica, batch: &ChangeBatch) -> Result<(), StoreError> {
        if !self.seen.contains(batch) {
            self.seen.push(batch.clone());
        } else if let Some(change) = batch.changes().next() {
            inner.put(&change.item, b"delivered again")?;
        }
        Ok(())
    }
}

/// `batch` with other groups.
fn rebuild(batch: &ChangeBatch, groups: Vec<ChangeGroup>) -> Option<ChangeBatch> {
    ChangeBatch::new(
        batch.source(),
        batch.made_with().clone(),
        groups,
        batch.excluded().to_vec(),
        batch.mode().clone(),
        batch.is_last(),
    )
    .ok()
}

/// An honest replica that tells its lie once, in `process_batch`.
struct Faulty<L> {
    inner: Replica,
    lie: L,
    lied: bool,
}

impl<L: Send> SyncProvider for Faulty<L> {
    fn replica_id(&self) -> ReplicaId {
        self.inner.replica_id()
    }
    fn fetch_info(&mut self) -> Result<PeerInfo, SyncError> {
        self.inner.fetch_info()
    }
    fn begin_session(&mut self, peer: &PeerInfo) -> Result<(), SyncError> {
        self.inner.begin_session(peer)
    }
    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError> {
        self.inner.note_peer_epoch(peer, epoch)
    }
    fn end_session(&mut self, completed: bool) -> Result<(), SyncError> {
        self.inner.end_session(completed)
    }
}

impl<L: Send> ChangeSource for Faulty<L> {
    fn begin_sending(&mut self) -> Result<u64, SyncError> {
        self.inner.begin_sending()
    }
    fn forgotten_knowledge(&mut self) -> Result<Knowledge, SyncError> {
        self.inner.forgotten_knowledge()
    }
    fn estimate_changes(&mut self, request: &BatchRequest<'_>) -> Result<Option<u64>, SyncError> {
        self.inner.estimate_changes(request)
    }
    fn change_batch(&mut self, request: &BatchRequest<'_>) -> Result<ChangeBatch, SyncError> {
        self.inner.change_batch(request)
    }
}

impl<L: Lie> ChangeDestination for Faulty<L> {
    fn process_batch(
        &mut self,
        batch: ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError> {
        if !self.lied {
            if let Some(told) = self.lie.rewrite(&batch) {
                self.lied = true;
                let mut outcome = self.inner.process_batch(told.batch, policy, observer)?;
                (told.adjust)(&mut outcome);
                return Ok(outcome);
            }
        }
        let outcome = self.inner.process_batch(batch.clone(), policy, observer)?;
        self.lie
            .after(&mut self.inner, &batch)
            .map_err(|e| SyncError::InvalidOptions(e.to_string()))?;
        Ok(outcome)
    }
}

// The read-outs tell the truth: the checks must find the lie from what is stored.
impl<L: Lie> SimReplica for Faulty<L> {
    fn put(&mut self, item: &ItemId, value: &[u8]) -> Result<Version, StoreError> {
        self.inner.put(item, value)
    }
    fn delete(&mut self, item: &ItemId) -> Result<Option<Version>, StoreError> {
        self.inner.delete(item)
    }
    fn collect_garbage(&mut self, older_than_ms: u64) -> Result<GcReport, StoreError> {
        self.inner.collect_garbage(older_than_ms)
    }
    fn knowledge(&self) -> Knowledge {
        self.inner.knowledge()
    }
    fn forgotten(&self) -> Knowledge {
        self.inner.forgotten().clone()
    }
    fn item_metas(&self) -> Result<Vec<(ItemId, ItemMeta)>, StoreError> {
        self.inner.item_metas()
    }
    fn items(&self) -> Result<Vec<(ItemId, Vec<u8>)>, StoreError> {
        self.inner.items()
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        self.inner.flush()
    }
}

/// Honest replicas everywhere except replica `faulty`, which tells `lie`.
struct OneFaulty<L> {
    faulty: usize,
    lie: fn() -> L,
}

impl<L: Lie + 'static> ReplicaFactory for OneFaulty<L> {
    fn create(
        &mut self,
        index: usize,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Box<dyn SimReplica>, StoreError> {
        if index != self.faulty {
            return SledReplicas.create(index, path, clock);
        }
        let mut inner = Replica::create(path)?;
        inner.set_clock(clock);
        Ok(Box::new(Faulty {
            inner,
            lie: (self.lie)(),
            lied: false,
        }))
    }

    fn open(
        &mut self,
        index: usize,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Box<dyn SimReplica>, StoreError> {
        if index != self.faulty {
            return SledReplicas.open(index, path, clock);
        }
        let mut inner = Replica::open(path)?;
        inner.set_clock(clock);
        // A reopened faulty replica stays faulty (it may lie once more).
        Ok(Box::new(Faulty {
            inner,
            lie: (self.lie)(),
            lied: false,
        }))
    }
}

/// The first seed in `seeds` under which the simulator catches replica 1's lie, checked
/// to reproduce the same violation, from its seed and from its trace, and to pass with
/// honest replicas. Returns the violation and the run's trace.
fn caught_with_its_seed<L: Lie + 'static>(
    scenario: &Scenario,
    lie: fn() -> L,
    seeds: std::ops::Range<u64>,
) -> Result<(Violation, Trace), Box<dyn std::error::Error>> {
    let mut caught = None;
    for seed in seeds.clone() {
        match simulate_with(scenario, seed, &mut OneFaulty { faulty: 1, lie }) {
            Err(SimError::Violation(v)) => {
                caught = Some(v);
                break;
            }
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let violation = caught.ok_or(format!("no seed in {seeds:?} caught the lie"))?;
    // The seed reproduces it exactly, and so does the run's trace, replayed.
    let again = simulate_traced(scenario, violation.seed, &mut OneFaulty { faulty: 1, lie });
    match again.result {
        Err(SimError::Violation(v)) => assert_eq!(v, violation),
        other => {
            return Err(format!("seed {} did not reproduce: {other:?}", violation.seed).into())
        }
    }
    match replay_with(&again.trace, &mut OneFaulty { faulty: 1, lie }) {
        Err(SimError::Violation(v)) => assert_eq!(v, violation),
        other => return Err(format!("the trace did not reproduce: {other:?}").into()),
    }
    // The honest engine passes it.
    simulate(scenario, violation.seed)?;
    Ok((*violation, again.trace))
}

#[test]
fn a_replica_that_drops_an_applied_change_is_caught_with_its_seed() -> TestResult {
    let scenario = Scenario::load(&example("mesh5"))?;
    // A dropped change that would have lost a last-writer-wins conflict anyway leaves
    // no trace (the replica holds the winner either way), so look for the first seed
    // whose drop matters; with this scenario it is among the first few.
    let (violation, _) = caught_with_its_seed(&scenario, || DropsOneChange, 0..10)?;
    assert_eq!(violation.kind, ViolationKind::Unsound, "{violation}");
    assert!(violation.detail.contains("r1 knows"), "{violation}");
    // The step's operations, the reproduction, include the session into r1.
    assert!(
        violation
            .operations
            .iter()
            .any(|op| op.starts_with("sync ") && op.contains("→r1")),
        "{violation}"
    );
    Ok(())
}

#[test]
fn a_replica_that_claims_knowledge_it_has_not_stored_is_caught_with_its_seed() -> TestResult {
    let scenario = Scenario::load(&example("mesh5"))?;
    // The stretched group teaches r1 nothing false when the source holds nothing after
    // the batch that r1 lacks; the first seed where it does is among the first few.
    let (violation, _) = caught_with_its_seed(&scenario, || ClaimsUnstoredKnowledge, 0..10)?;
    assert_eq!(violation.kind, ViolationKind::Unsound, "{violation}");
    assert!(
        violation.detail.starts_with("r1 knows")
            && violation.detail.contains("which does not supersede it"),
        "{violation}"
    );
    assert!(
        violation
            .operations
            .iter()
            .any(|op| op.starts_with("sync ") && op.contains("→r1")),
        "{violation}"
    );
    Ok(())
}

#[test]
fn a_replica_that_changes_when_a_batch_arrives_twice_is_caught() -> TestResult {
    let scenario = Scenario::load(&example("star6_duplicates"))?;
    let (violation, _) = caught_with_its_seed(&scenario, WritesOnRedelivery::default, 0..5)?;
    assert_eq!(violation.kind, ViolationKind::NotIdempotent, "{violation}");
    assert!(
        violation
            .detail
            .contains("to r1 changed its item metadata, items"),
        "{violation}"
    );
    assert!(
        violation
            .operations
            .iter()
            .any(|op| op.ends_with("delivered again to r1")),
        "{violation}"
    );
    Ok(())
}

/// Shrinks the trace of a faulty replica's violation and checks the result: at most
/// `bound` operations, the same kind of violation when replayed again, and the same
/// result when shrunk twice (shrinking is deterministic).
fn shrinks_within<L: Lie + 'static>(
    violation: &Violation,
    trace: &Trace,
    lie: fn() -> L,
    bound: usize,
) -> Result<knit::Shrunk, Box<dyn std::error::Error>> {
    let shrunk = shrink(
        trace,
        violation.kind,
        &mut OneFaulty { faulty: 1, lie },
        ShrinkOptions::default(),
    )?;
    let operations = shrunk.trace.lines();
    assert!(
        operations.len() <= bound && !shrunk.replays_ran_out,
        "{} of {} operations left after {} replays:\n{}",
        operations.len(),
        trace.operations.len(),
        shrunk.replays,
        operations.join("\n")
    );
    assert_eq!(shrunk.violation.kind, violation.kind);
    assert_eq!(shrunk.violation.seed, violation.seed);
    // The shrunk trace, written to JSON and read back, still violates the same check.
    let reread = Trace::from_json(&shrunk.trace.to_json(), "shrunk.json")?;
    match replay_with(&reread, &mut OneFaulty { faulty: 1, lie }) {
        Err(SimError::Violation(v)) => assert_eq!(*v, shrunk.violation),
        other => return Err(format!("the shrunk trace did not violate: {other:?}").into()),
    }
    let again = shrink(
        trace,
        violation.kind,
        &mut OneFaulty { faulty: 1, lie },
        ShrinkOptions::default(),
    )?;
    assert_eq!(again, shrunk, "two shrinks of one trace differ");
    Ok(shrunk)
}

/// The replica that claims knowledge it has not stored is caught some 80 operations
/// into a run; the reproduction needs only the writes that give a source three items
/// (one more than a batch holds, so the first batch is not the last) and the session
/// into r1 whose first batch it stretches.
#[test]
fn a_claim_of_unstored_knowledge_shrinks_to_a_handful_of_operations() -> TestResult {
    let scenario = Scenario::load(&example("mesh5"))?;
    let (violation, trace) = caught_with_its_seed(&scenario, || ClaimsUnstoredKnowledge, 0..10)?;
    assert!(trace.operations.len() >= 40, "{}", trace.operations.len());
    let shrunk = shrinks_within(&violation, &trace, || ClaimsUnstoredKnowledge, 5)?;
    // The session into the liar survives, and only the replicas it needs are left.
    assert!(
        shrunk
            .trace
            .operations
            .iter()
            .any(|op| matches!(op, TraceOp::Sync { destination: 1, .. })),
        "{:?}",
        shrunk.trace.lines()
    );
    assert!(shrunk.trace.replicas.len() < trace.replicas.len());
    Ok(())
}

/// A redelivery fault is part of the reproduction: shrinking keeps the session's
/// duplicated batch and drops every other fault (31 operations shrink to a write, the
/// session that brings it to the hub, and the hub's session into r1 with the batch
/// delivered twice).
#[test]
fn a_non_idempotent_redelivery_shrinks_to_its_duplicated_batch() -> TestResult {
    let scenario = Scenario::load(&example("star6_duplicates"))?;
    let (violation, trace) = caught_with_its_seed(&scenario, WritesOnRedelivery::default, 0..5)?;
    assert!(trace.operations.len() >= 20, "{}", trace.operations.len());
    let shrunk = shrinks_within(&violation, &trace, WritesOnRedelivery::default, 3)?;
    let faults: Vec<&BatchFault> = shrunk
        .trace
        .operations
        .iter()
        .flat_map(|op| match op {
            TraceOp::Sync { faults, .. } => faults.as_slice(),
            _ => &[],
        })
        .collect();
    assert!(
        matches!(faults.as_slice(), [BatchFault::Duplicated { .. }]),
        "{:?}",
        shrunk.trace.lines()
    );
    Ok(())
}

/// The trace of a passing run replays to the same report, byte for byte, for scenarios
/// with every kind of operation: cancelled sessions, cleanup and reopens, kills,
/// lost and duplicated batches, partitions and a changing topology.
#[test]
fn replaying_a_seeded_runs_full_trace_gives_the_same_report() -> TestResult {
    for name in [
        "ring8_cancel_gc",
        "mesh6_crashes",
        "ring6_lost_batches",
        "star6_duplicates",
        "changing6",
    ] {
        let scenario = Scenario::load(&example(name))?;
        let run = simulate_traced(&scenario, 0, &mut SledReplicas);
        let report = run.result?;
        assert_eq!(
            serde_json::to_string(&report)?,
            serde_json::to_string(&simulate(&scenario, 0)?)?,
            "{name}: keeping a trace changed the run"
        );
        // Faults are in the trace, so the replay does not need the seed for them.
        let faulty_batches = run
            .trace
            .operations
            .iter()
            .map(|op| match op {
                TraceOp::Sync { faults, .. } => faults.len(),
                _ => 0,
            })
            .sum::<usize>();
        if scenario.faults.crash_rate + scenario.faults.lose_batch_rate > 0.0
            || scenario.faults.duplicate_batch_rate > 0.0
        {
            assert!(faulty_batches > 0, "{name}: no fault in the trace");
        }
        let reread = Trace::from_json(&run.trace.to_json(), &format!("{name}.json"))?;
        assert_eq!(reread, run.trace);
        let replayed = replay(&reread)?;
        assert_eq!(
            serde_json::to_string(&replayed)?,
            serde_json::to_string(&report)?,
            "{name}: the replay differs from the run"
        );
    }
    Ok(())
}

/// A scenario whose convergence may take one round only fails as soon as any change
/// is left to move: a real violation of the honest engine, which the command shrinks.
fn one_round_scenario(dir: &Path) -> Result<PathBuf, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(example("mesh5"))?
        .replace("steps = 30", "steps = 6")
        .replace(
            "policy = \"last_writer_wins\"",
            "policy = \"last_writer_wins\"\nconverge_rounds_max = 1",
        );
    let path = dir.join("one_round.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[test]
fn a_violation_prints_a_minimal_reproduction_that_replays_from_its_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let scenario = one_round_scenario(dir.path())?;
    let trace_file = dir.path().join("repro.json");
    let (code, stdout, stderr) = knit_sim(&[
        scenario.to_str().ok_or("path is not UTF-8")?,
        "--seed",
        "0",
        "--trace-out",
        trace_file.to_str().ok_or("path is not UTF-8")?,
    ])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--replay"), "{stderr}");
    // The seed, the step, the violation, then the operations, numbered: one write and
    // the convergence that cannot move it in one round.
    let at = stdout
        .find("reproduction of seed 0 (shrunk from ")
        .ok_or(format!("no reproduction in:\n{stdout}"))?;
    let reproduction: Vec<&str> = stdout[at..].lines().collect();
    assert!(
        reproduction
            .get(1)
            .is_some_and(|l| l.contains("violates at convergence round 0: NotConverged")),
        "{stdout}"
    );
    let numbered: Vec<&str> = reproduction
        .iter()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .copied()
        .collect();
    assert_eq!(numbered.len(), 2, "{stdout}");
    assert!(
        numbered[0].trim_start().starts_with("1. put ")
            && numbered[1].trim_start().starts_with("2. faults stop"),
        "{stdout}"
    );

    let trace = Trace::load(&trace_file)?;
    assert_eq!(trace.operations.len(), 2);
    let (code, replayed, stderr) = knit_sim(&[
        "--replay",
        trace_file.to_str().ok_or("path is not UTF-8")?,
        "--no-shrink",
    ])?;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        replayed.contains("NotConverged") && replayed.contains("as recorded, not shrunk"),
        "{replayed}"
    );

    // Unshrunk, the reproduction is the whole run up to the violation.
    let (code, full, _) = knit_sim(&[
        scenario.to_str().ok_or("path is not UTF-8")?,
        "--no-shrink",
        "--json",
    ])?;
    assert_eq!(code, 1);
    let last = full.lines().last().ok_or("no output")?;
    let object: serde_json::Value = serde_json::from_str(last)?;
    assert_eq!(object["result"], "reproduction");
    let operations = object["trace"]["operations"]
        .as_array()
        .ok_or("no operations")?;
    assert!(operations.len() > 10, "{last}");
    Ok(())
}

#[test]
fn a_damaged_trace_file_is_refused_naming_the_file_and_the_place() -> TestResult {
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.json");
    let (code, _, stderr) = knit_sim(&[
        example("mesh5").to_str().ok_or("path is not UTF-8")?,
        "--trace-out",
        good.to_str().ok_or("path is not UTF-8")?,
    ])?;
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(&good)?;
    let put = "{\"op\":\"put\",\"replica\":";
    let first_put = text.find(put).ok_or("no put in the trace")?;
    let put_line = text[..first_put].lines().count();
    // The first put's replica (one digit: mesh5 has five) becomes r9.
    let mut wrong_replica = text.clone();
    let digit = first_put + put.len();
    wrong_replica.replace_range(digit..digit + 1, "9");
    let damages = [
        // Cut short: JSON ends in the middle.
        (text[..text.len() / 2].to_string(), "bad.json:".to_string()),
        // An operation the format does not have, on its line.
        (
            text.replacen("\"op\":\"put\"", "\"op\":\"pot\"", 1),
            format!("bad.json:{put_line}:"),
        ),
        // A replica the trace does not list.
        (wrong_replica, "`operations[".to_string()),
        // A format this build does not read.
        (
            text.replacen("\"format\": 1", "\"format\": 7", 1),
            "`format` is 7".to_string(),
        ),
    ];
    for (damaged, place) in damages {
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, &damaged)?;
        let (code, stdout, stderr) =
            knit_sim(&["--replay", bad.to_str().ok_or("path is not UTF-8")?])?;
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains("bad.json") && stderr.contains(&place),
            "expected {place:?} in: {stderr}"
        );
        assert_eq!(stdout, "", "a replay ran from a damaged file");
    }
    Ok(())
}

//! The driver: runs a scenario over real replicas under one seed, checks after every
//! step, and measures.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::model::{encode_knowledge, ItemId, Knowledge};
use crate::sync::{
    run_session, CancelToken, Clock, NoObserver, Progress, SessionOptions, SessionStats,
    SyncObserver,
};

use super::history::{History, Snapshot};
use super::link::{Link, LinkFaults};
use super::report::LinkTally;
use super::{
    Phase, ReplicaFactory, Scenario, SimClock, SimError, SimReplica, SimReport, SimRng,
    SledReplicas, StepMetrics, Violation, ViolationKind,
};

/// Where the clock starts: far from 0, so "older than" arithmetic never saturates.
const CLOCK_START_MS: u64 = 1_000_000_000;
/// Mixed into the seed for the topology's own stream, so the random graph does not
/// shift the schedule's draws.
const TOPOLOGY_STREAM: u64 = 0x746F_706F_6C6F_6779;

/// Runs `scenario` under `seed` over the real engine (sled replicas in a temporary
/// folder that is removed afterwards).
pub fn simulate(scenario: &Scenario, seed: u64) -> Result<SimReport, SimError> {
    simulate_with(scenario, seed, &mut SledReplicas)
}

/// Runs `scenario` under `seed` over the replicas `factory` makes.
pub fn simulate_with(
    scenario: &Scenario,
    seed: u64,
    factory: &mut dyn ReplicaFactory,
) -> Result<SimReport, SimError> {
    scenario.check()?;
    let folder = SimFolder::new(seed)?;
    let mut sim = Sim::new(scenario, seed, factory, folder)?;
    sim.run()
}

/// A temporary folder for one run's replicas, removed on drop. (tempfile is only a
/// dev-dependency.) The name carries the process id and a counter besides the seed, so
/// parallel runs of one seed never share it; it never reaches the output.
struct SimFolder {
    path: PathBuf,
}

static FOLDERS_MADE: AtomicU64 = AtomicU64::new(0);

impl SimFolder {
    fn new(seed: u64) -> Result<Self, SimError> {
        let n = FOLDERS_MADE.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("knit-sim-{}-{seed}-{n}", std::process::id()));
        // A folder left by a killed process with a reused id would hold old replicas.
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|source| SimError::Folder {
                path: path.clone(),
                source,
            })?;
        }
        std::fs::create_dir_all(&path).map_err(|source| SimError::Folder {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path })
    }

    fn replica(&self, index: usize) -> PathBuf {
        self.path.join(format!("r{index}"))
    }

    /// Where replica `index` lives after its `kill`-th kill (each crash image is a new
    /// folder: the dead replica's sled threads may still touch the old one).
    fn crash_image(&self, index: usize, kill: u64) -> PathBuf {
        self.path.join(format!("r{index}-kill{kill}"))
    }
}

/// Copies a folder tree: the crash image of a killed replica.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl Drop for SimFolder {
    fn drop(&mut self) {
        // Best effort: a folder left in the temp dir is harmless, and a drop cannot
        // report an error.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Raises the cancel flag once the first batch has committed.
struct CancelAfterFirstBatch(CancelToken);

impl SyncObserver for CancelAfterFirstBatch {
    fn progress(&mut self, _progress: &Progress) {
        self.0.cancel();
    }
}

struct Sim<'a> {
    scenario: &'a Scenario,
    seed: u64,
    rng: SimRng,
    clock: Arc<SimClock>,
    factory: &'a mut dyn ReplicaFactory,
    keys: Vec<ItemId>,
    /// The edges of the topology (phase) in force.
    edges: Vec<(usize, usize)>,
    /// Which phase of a changing topology `edges` belong to.
    topology_phase: usize,
    /// The topology's own stream, so the random graph does not shift the schedule's
    /// draws; a changing topology draws each random phase from it as the phase starts.
    topology_rng: SimRng,
    /// Downed edges and the step at which each heals.
    down_until: BTreeMap<(usize, usize), u64>,
    history: History,
    next_value: u64,
    phase: Phase,
    step: u64,
    /// What the current step has done so far, for a violation's reproduction.
    operations: Vec<String>,
    /// `None` only while a replica is closed for a reopen or lent to a session.
    replicas: Vec<Option<Box<dyn SimReplica>>>,
    /// Each replica's folder: its first one, or the crash image of its last kill.
    paths: Vec<PathBuf>,
    /// Kills so far, to name crash images.
    kills: u64,
    /// Declared after `replicas`, so the replicas (and their sled locks) are dropped
    /// before the folder is removed.
    folder: SimFolder,
}

impl<'a> Sim<'a> {
    fn new(
        scenario: &'a Scenario,
        seed: u64,
        factory: &'a mut dyn ReplicaFactory,
        folder: SimFolder,
    ) -> Result<Self, SimError> {
        let width = scenario.keys.count.saturating_sub(1).to_string().len();
        let keys = (0..scenario.keys.count)
            .map(|k| ItemId::new(format!("k{k:0width$}").as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                SimError::Scenario(super::ScenarioError::Invalid {
                    file: format!("scenario {:?}", scenario.name),
                    line: 0,
                    field: "keys.count".into(),
                    reason: e.to_string(),
                })
            })?;
        let mut topology_rng = SimRng::new(seed ^ TOPOLOGY_STREAM);
        let (topology_phase, topology) = scenario.topology.phase_at(0);
        let edges = topology.edges(scenario.replicas, &mut topology_rng);
        let mut sim = Self {
            scenario,
            seed,
            rng: SimRng::new(seed),
            clock: Arc::new(SimClock::starting_at(CLOCK_START_MS)),
            factory,
            history: History::new(&keys),
            keys,
            edges,
            topology_phase,
            topology_rng,
            down_until: BTreeMap::new(),
            next_value: 0,
            phase: Phase::Workload,
            step: 0,
            operations: Vec::new(),
            replicas: Vec::new(),
            paths: Vec::new(),
            kills: 0,
            folder,
        };
        for index in 0..scenario.replicas {
            let clock: Arc<dyn Clock> = sim.clock.clone();
            let path = sim.folder.replica(index);
            let replica = sim.factory.create(index, &path, clock).map_err(|e| {
                sim.violation(ViolationKind::Engine, format!("create r{index}: {e}"))
            })?;
            sim.history.name_replica(replica.replica_id(), index);
            sim.replicas.push(Some(replica));
            sim.paths.push(path);
        }
        Ok(sim)
    }

    fn violation(&self, kind: ViolationKind, detail: String) -> SimError {
        SimError::Violation(Box::new(Violation {
            scenario: self.scenario.name.clone(),
            seed: self.seed,
            phase: self.phase,
            step: self.step,
            kind,
            detail,
            operations: self.operations.clone(),
        }))
    }

    fn engine(&self, what: &str, e: impl std::fmt::Display) -> SimError {
        self.violation(ViolationKind::Engine, format!("{what}: {e}"))
    }

    fn replica(&mut self, index: usize) -> Result<&mut (dyn SimReplica + 'static), SimError> {
        // Always open outside `session` and `reopen`, which put it back; the error is
        // for a broken driver, and borrows only the fields it names.
        let (scenario, seed, phase, step) = (&self.scenario.name, self.seed, self.phase, self.step);
        self.replicas
            .get_mut(index)
            .and_then(|slot| slot.as_deref_mut())
            .ok_or_else(|| {
                SimError::Violation(Box::new(Violation {
                    scenario: scenario.clone(),
                    seed,
                    phase,
                    step,
                    kind: ViolationKind::Engine,
                    detail: format!("r{index} is not open"),
                    operations: Vec::new(),
                }))
            })
    }

    fn run(&mut self) -> Result<SimReport, SimError> {
        let mut steps = Vec::new();
        for step in 0..self.scenario.steps {
            steps.push(self.workload_step(step)?);
        }
        let (convergence, rounds) = self.converge()?;
        self.final_checks()?;
        Ok(SimReport {
            scenario: self.scenario.name.clone(),
            seed: self.seed,
            replicas: u64::try_from(self.scenario.replicas).unwrap_or(u64::MAX),
            steps,
            convergence,
            rounds_to_converge: rounds,
            versions_made: u64::try_from(self.history.versions_made()).unwrap_or(u64::MAX),
        })
    }

    fn workload_step(&mut self, step: u64) -> Result<StepMetrics, SimError> {
        self.phase = Phase::Workload;
        self.step = step;
        self.operations.clear();
        self.clock.advance(self.scenario.step_ms);
        let mut metrics = StepMetrics {
            step,
            topology_changes: u64::from(step == 0),
            ..StepMetrics::default()
        };
        self.change_topology(step, &mut metrics);
        let healed: Vec<(usize, usize)> = self
            .down_until
            .iter()
            .filter(|(_, until)| **until <= step)
            .map(|(edge, _)| *edge)
            .collect();
        for (a, b) in healed {
            self.down_until.remove(&(a, b));
            self.operations.push(format!("heal r{a}–r{b}"));
        }
        let faults = &self.scenario.faults;
        if self.rng.chance(faults.partition_rate) {
            if let Some((a, b)) = self.random_up_edge() {
                let until = step + faults.partition_steps;
                self.down_until.insert((a, b), until);
                self.operations
                    .push(format!("partition r{a}–r{b} until step {until}"));
            }
        }
        for _ in 0..self.scenario.operations_per_step {
            if self.local_operation()? {
                metrics.operations += 1;
            }
        }
        let faults = &self.scenario.faults;
        if self.rng.chance(faults.gc_rate) {
            let index = self.rng.below(self.scenario.replicas);
            let age = faults.tombstone_age_ms;
            self.operations
                .push(format!("gc r{index} older than {age} ms"));
            let report = self
                .replica(index)?
                .collect_garbage(age)
                .map_err(|e| self.engine(&format!("gc r{index}"), e))?;
            metrics.tombstones_removed += report.tombstones_removed;
        }
        if self.rng.chance(self.scenario.faults.reopen_rate) {
            let index = self.rng.below(self.scenario.replicas);
            self.reopen(index)?;
            metrics.reopened += 1;
        }
        for _ in 0..self.scenario.syncs_per_step {
            let Some((a, b)) = self.random_up_edge() else {
                continue;
            };
            let (source, destination) = if self.rng.chance(0.5) { (a, b) } else { (b, a) };
            let cancel = self.rng.chance(self.scenario.faults.cancel_rate);
            let (stats, link) = self.session(source, destination, cancel)?;
            metrics.add_session(&stats, &link);
        }
        self.check_all(&mut metrics)?;
        metrics.edges = u64::try_from(self.edges.len()).unwrap_or(u64::MAX);
        metrics.edges_down = u64::try_from(self.down_until.len()).unwrap_or(u64::MAX);
        Ok(metrics)
    }

    /// Moves a changing topology to the phase in force at `step`; a partition of an
    /// edge the new phase lacks is dropped with the edge.
    fn change_topology(&mut self, step: u64, metrics: &mut StepMetrics) {
        let (phase, topology) = self.scenario.topology.phase_at(step);
        if phase == self.topology_phase {
            return;
        }
        self.topology_phase = phase;
        self.edges = topology.edges(self.scenario.replicas, &mut self.topology_rng);
        let edges = &self.edges;
        self.down_until.retain(|edge, _| edges.contains(edge));
        metrics.topology_changes += 1;
        self.operations.push(format!(
            "topology phase {phase}: {}, {} edges",
            topology.describe(),
            self.edges.len()
        ));
    }

    fn up_edges(&self) -> Vec<(usize, usize)> {
        self.edges
            .iter()
            .filter(|e| !self.down_until.contains_key(e))
            .copied()
            .collect()
    }

    /// An edge that is not partitioned; draws from the stream only when there is one.
    fn random_up_edge(&mut self) -> Option<(usize, usize)> {
        let up = self.up_edges();
        if up.is_empty() {
            return None;
        }
        let pick = self.rng.below(up.len());
        up.get(pick).copied()
    }

    /// A hot key with probability `hot_share`, else a cold one.
    fn pick_key(&mut self) -> usize {
        let k = &self.scenario.keys;
        if k.hot > 0 && (k.hot == k.count || self.rng.chance(k.hot_share)) {
            self.rng.below(k.hot)
        } else {
            k.hot + self.rng.below(k.count - k.hot)
        }
    }

    /// One put, update or delete on a random replica; false when it had nothing to do
    /// (an update or delete at a replica with no live key).
    fn local_operation(&mut self) -> Result<bool, SimError> {
        let mix = &self.scenario.operations;
        let Some(kind) = self.rng.weighted(&[mix.put, mix.update, mix.delete]) else {
            return Ok(false);
        };
        let index = self.rng.below(self.scenario.replicas);
        let key = if kind == 0 {
            let pick = self.pick_key();
            self.keys.get(pick).cloned()
        } else {
            let live = self
                .replica(index)?
                .items()
                .map_err(|e| self.engine(&format!("items of r{index}"), e))?;
            if live.is_empty() {
                let what = if kind == 1 { "update" } else { "delete" };
                self.operations
                    .push(format!("{what} at r{index}: no live key"));
                return Ok(false);
            }
            let pick = self.rng.below(live.len());
            live.get(pick).map(|(key, _)| key.clone())
        };
        // Both picks are below their list's length by construction.
        let Some(key) = key else {
            return Err(self.violation(
                ViolationKind::Engine,
                format!("a key chosen at r{index} is out of range"),
            ));
        };
        let knowledge = self.replica(index)?.knowledge();
        let known_before = self.history.known(&knowledge, &key);
        let (version, value) = if kind == 2 {
            self.operations.push(format!("delete {key} at r{index}"));
            let deleted = self
                .replica(index)?
                .delete(&key)
                .map_err(|e| self.engine(&format!("delete {key} at r{index}"), e))?;
            match deleted {
                Some(version) => (version, None),
                None => {
                    return Err(self.violation(
                        ViolationKind::Engine,
                        format!("r{index} listed {key} as live but the delete found nothing"),
                    ))
                }
            }
        } else {
            self.next_value += 1;
            let value = format!("v{}", self.next_value).into_bytes();
            self.operations.push(format!(
                "put {key}={} at r{index}",
                String::from_utf8_lossy(&value)
            ));
            let version = self
                .replica(index)?
                .put(&key, &value)
                .map_err(|e| self.engine(&format!("put {key} at r{index}"), e))?;
            (version, Some(value))
        };
        self.history
            .record_local(&key, version, known_before, value)
            .map_err(|detail| self.violation(ViolationKind::Unsound, detail))?;
        Ok(true)
    }

    /// Closes replica `index` (drops it: sled flushes and releases the folder) and
    /// opens it again.
    fn reopen(&mut self, index: usize) -> Result<(), SimError> {
        self.operations.push(format!("reopen r{index}"));
        if let Some(slot) = self.replicas.get_mut(index) {
            drop(slot.take());
        }
        self.open(index)
    }

    /// Replica `index` was killed in the middle of a session: copies its folder as the
    /// kill left it (every committed batch, see [`SimReplica::flush`], and nothing of
    /// the batch it was applying), drops the dead replica without ending its session,
    /// and opens the copy, so sled recovers a folder that was never closed.
    fn crash_reopen(&mut self, index: usize) -> Result<(), SimError> {
        self.kills += 1;
        let image = self.folder.crash_image(index, self.kills);
        let old = self.path(index)?;
        self.replica(index)?
            .flush()
            .map_err(|e| self.engine(&format!("flush r{index} at its kill"), e))?;
        let committed = self.snapshot(index)?;
        copy_tree(&old, &image).map_err(|source| SimError::Folder {
            path: image.clone(),
            source,
        })?;
        if let Some(slot) = self.replicas.get_mut(index) {
            drop(slot.take());
        }
        // Best effort: the run's folder is removed at the end anyway.
        let _ = std::fs::remove_dir_all(&old);
        if let Some(path) = self.paths.get_mut(index) {
            *path = image;
        }
        self.operations.push(format!(
            "r{index} reopened from its folder as the kill left it"
        ));
        self.open(index)?;
        let reopened = self.snapshot(index)?;
        let same =
            |a: &Knowledge, b: &Knowledge| a.contains_knowledge(b) && b.contains_knowledge(a);
        if reopened.metas != committed.metas
            || !same(&reopened.knowledge, &committed.knowledge)
            || !same(&reopened.forgotten, &committed.forgotten)
        {
            return Err(self.violation(
                ViolationKind::LostCommit,
                format!("r{index} reopened after its kill without all it had committed"),
            ));
        }
        Ok(())
    }

    /// Replica `index`'s folder; the error is for a broken driver.
    fn path(&self, index: usize) -> Result<PathBuf, SimError> {
        self.paths
            .get(index)
            .cloned()
            .ok_or_else(|| self.violation(ViolationKind::Engine, format!("r{index} has no folder")))
    }

    fn open(&mut self, index: usize) -> Result<(), SimError> {
        let clock: Arc<dyn Clock> = self.clock.clone();
        let path = self.path(index)?;
        let replica = self
            .factory
            .open(index, &path, clock)
            .map_err(|e| self.engine(&format!("reopen r{index}"), e))?;
        if let Some(slot) = self.replicas.get_mut(index) {
            *slot = Some(replica);
        }
        Ok(())
    }

    fn snapshot(&mut self, index: usize) -> Result<Snapshot, SimError> {
        let replica = self.replica(index)?;
        let knowledge = replica.knowledge();
        let forgotten = replica.forgotten();
        let metas = replica
            .item_metas()
            .map_err(|e| self.engine(&format!("metadata of r{index}"), e))?;
        Ok(Snapshot {
            knowledge,
            forgotten,
            metas: metas.into_iter().collect(),
        })
    }

    /// One session `source → destination` with the scenario's policy and batch size,
    /// through a link that injects the scenario's batch faults while the workload runs.
    /// A destination killed mid-batch is reopened from its crash image; its session has
    /// no statistics (the default is returned with the tally saying so).
    fn session(
        &mut self,
        source: usize,
        destination: usize,
        cancel_after_first_batch: bool,
    ) -> Result<(SessionStats, LinkTally), SimError> {
        let batch_size = self.scenario.batch_size;
        self.operations.push(format!(
            "sync r{source}→r{destination} batch {batch_size}{}",
            if cancel_after_first_batch {
                ", cancelled after the first batch"
            } else {
                ""
            }
        ));
        let faults = &self.scenario.faults;
        // Drawn only when a batch fault is set, so other scenarios keep their schedule.
        let link_faults = (self.phase == Phase::Workload && faults.touch_batches())
            .then(|| (LinkFaults::of(faults), SimRng::new(self.rng.next_u64())));
        let source_metas = self.snapshot(source)?.metas;
        let before = self.snapshot(destination)?;
        let destination_id = self.replica(destination)?.replica_id();
        let options = SessionOptions {
            policy: self.scenario.policy.conflict_policy(),
            batch_size,
            ..SessionOptions::default()
        };
        let mut lent = self.replicas.get_mut(source).and_then(Option::take);
        let result = match (
            lent.as_mut(),
            self.replicas.get_mut(destination).and_then(Option::as_mut),
        ) {
            (Some(src), Some(dst)) => {
                let clock: &dyn Clock = &*self.clock;
                let mut link = Link::new(&mut **dst, destination, link_faults);
                let result = if cancel_after_first_batch {
                    let mut observer = CancelAfterFirstBatch(options.cancel.clone());
                    run_session(&mut **src, &mut link, &options, &mut observer, clock)
                } else {
                    run_session(&mut **src, &mut link, &options, &mut NoObserver, clock)
                };
                Some((result, link.tally, link.log, link.trouble))
            }
            _ => None,
        };
        if let Some(slot) = self.replicas.get_mut(source) {
            *slot = lent;
        }
        let Some((result, tally, log, trouble)) = result else {
            return Err(self.violation(
                ViolationKind::Engine,
                format!("r{source} or r{destination} is not open"),
            ));
        };
        self.operations.extend(log);
        if let Some((kind, detail)) = trouble {
            return Err(self.violation(kind, detail));
        }
        let stats = match result {
            Ok(stats) => stats,
            Err(_) if tally.killed => {
                self.crash_reopen(destination)?;
                SessionStats::default()
            }
            Err(e) => return Err(self.engine("session", e)),
        };
        if !tally.killed
            && (stats.changes_sent
                != stats.changes_applied
                    + stats.changes_skipped
                    + stats.changes_failed
                    + tally.changes_lost
                || stats.changes_failed != 0
                || stats.conflicts.saved + stats.conflicts.skipped != 0
                || (!cancel_after_first_batch && stats.cancelled))
        {
            return Err(self.violation(
                ViolationKind::Accounting,
                format!(
                    "sent {}, applied {}, skipped {}, failed {}, lost {}, conflicts saved {} skipped {}, cancelled {}",
                    stats.changes_sent,
                    stats.changes_applied,
                    stats.changes_skipped,
                    stats.changes_failed,
                    tally.changes_lost,
                    stats.conflicts.saved,
                    stats.conflicts.skipped,
                    stats.cancelled
                ),
            ));
        }
        let after = self.snapshot(destination)?;
        self.history
            .after_session(
                destination_id,
                &source_metas,
                &before,
                &after,
                self.scenario.policy.keeps_versions(),
            )
            .map_err(|detail| self.violation(ViolationKind::Unsound, detail))?;
        Ok((stats, tally))
    }

    /// The soundness invariant at every replica; fills the state metrics.
    fn check_all(&mut self, metrics: &mut StepMetrics) -> Result<(), SimError> {
        metrics.exceptions_max = 0;
        metrics.exceptions_total = 0;
        metrics.knowledge_bytes_max = 0;
        metrics.tombstones = 0;
        let mut knowledge_bytes_total = 0u64;
        for index in 0..self.scenario.replicas {
            let snapshot = self.snapshot(index)?;
            self.history
                .check(index, &snapshot)
                .map_err(|detail| self.violation(ViolationKind::Unsound, detail))?;
            let exceptions =
                u64::try_from(snapshot.knowledge.exception_count()).unwrap_or(u64::MAX);
            metrics.exceptions_max = metrics.exceptions_max.max(exceptions);
            metrics.exceptions_total += exceptions;
            let bytes =
                u64::try_from(encode_knowledge(&snapshot.knowledge).len()).unwrap_or(u64::MAX);
            metrics.knowledge_bytes_max = metrics.knowledge_bytes_max.max(bytes);
            knowledge_bytes_total += bytes;
            metrics.tombstones +=
                u64::try_from(snapshot.metas.values().filter(|m| m.deleted).count())
                    .unwrap_or(u64::MAX);
        }
        metrics.knowledge_bytes_mean =
            knowledge_bytes_total / u64::try_from(self.scenario.replicas.max(1)).unwrap_or(1);
        Ok(())
    }

    /// Faults stop; every ordered pair syncs, round after round, until a round sends
    /// nothing. Returns each round's metrics and the rounds that still moved changes.
    fn converge(&mut self) -> Result<(Vec<StepMetrics>, u64), SimError> {
        self.phase = Phase::Convergence;
        self.down_until.clear();
        let replicas = u64::try_from(self.scenario.replicas).unwrap_or(u64::MAX);
        let mut rounds = Vec::new();
        for round in 0..self.scenario.converge_rounds_max {
            self.step = round;
            self.operations.clear();
            self.clock.advance(self.scenario.step_ms);
            let mut metrics = StepMetrics {
                step: round,
                edges: replicas * replicas.saturating_sub(1) / 2,
                ..StepMetrics::default()
            };
            for source in 0..self.scenario.replicas {
                for destination in 0..self.scenario.replicas {
                    if source == destination {
                        continue;
                    }
                    let (stats, link) = self.session(source, destination, false)?;
                    metrics.add_session(&stats, &link);
                    // Only the destination's state changed.
                    let snapshot = self.snapshot(destination)?;
                    self.history
                        .check(destination, &snapshot)
                        .map_err(|detail| self.violation(ViolationKind::Unsound, detail))?;
                }
            }
            self.check_all(&mut metrics)?;
            let quiet = metrics.changes_sent == 0;
            rounds.push(metrics);
            if quiet {
                return Ok((rounds, round));
            }
        }
        Err(self.violation(
            ViolationKind::NotConverged,
            format!(
                "the full mesh still moved changes after {} rounds",
                self.scenario.converge_rounds_max
            ),
        ))
    }

    /// Same live items and knowledge everywhere; causally ordered keys end as their
    /// last operation left them.
    fn final_checks(&mut self) -> Result<(), SimError> {
        self.phase = Phase::Final;
        self.step = 0;
        self.operations.clear();
        let mut items = Vec::new();
        let mut knowledges: Vec<Knowledge> = Vec::new();
        for index in 0..self.scenario.replicas {
            let replica = self.replica(index)?;
            knowledges.push(replica.knowledge());
            let live = replica
                .items()
                .map_err(|e| self.engine(&format!("items of r{index}"), e))?;
            items.push(live.into_iter().collect::<BTreeMap<ItemId, Vec<u8>>>());
        }
        let Some(reference) = items.first() else {
            return Ok(());
        };
        for (index, held) in items.iter().enumerate() {
            if held != reference {
                let keys: BTreeSet<&ItemId> = held.keys().chain(reference.keys()).collect();
                let differing: Vec<String> = keys
                    .into_iter()
                    .filter(|k| held.get(*k) != reference.get(*k))
                    .map(|k| {
                        format!(
                            "{k}: r0 {} r{index} {}",
                            super::history::show_value(reference.get(k).map(Vec::as_slice)),
                            super::history::show_value(held.get(k).map(Vec::as_slice))
                        )
                    })
                    .collect();
                return Err(self.violation(
                    ViolationKind::Diverged,
                    format!("r{index} differs from r0: {}", differing.join(", ")),
                ));
            }
        }
        for (a, ka) in knowledges.iter().enumerate() {
            for (b, kb) in knowledges.iter().enumerate() {
                if !ka.contains_knowledge(kb) {
                    return Err(self.violation(
                        ViolationKind::Diverged,
                        format!("the knowledge of r{a} does not contain that of r{b}"),
                    ));
                }
            }
        }
        self.history
            .check_causal_order(reference)
            .map_err(|detail| self.violation(ViolationKind::LostUpdate, detail))
    }
}

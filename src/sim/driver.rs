//! The driver: runs a scenario over real replicas, under one seed or from a trace,
//! checks after every step, and measures.
//!
//! Two front ends share one executor. [`Schedule`] draws a seeded run's decisions and
//! hands each to [`Sim`] as an operation; a replay ([`super::replay`]) hands it the
//! operations of a trace. `Sim` performs every operation the same way whoever chose
//! it, writes it into the trace it keeps, runs the checks and keeps the figures, so a
//! replay goes through the same code as the run it reproduces.

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
use super::link::{Link, LinkFaults, LinkPlan};
use super::report::LinkTally;
use super::{
    Phase, PolicyChoice, ReplicaFactory, Scenario, SimClock, SimError, SimReplica, SimReport,
    SimRng, SledReplicas, StepMetrics, Trace, TraceOp, Violation, ViolationKind, Wanted,
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
    simulate_traced(scenario, seed, factory).result
}

/// A seeded run and its trace: every operation the driver performed, up to the
/// violation if there was one, then the convergence if the run reached it.
#[derive(Debug)]
pub struct TracedRun {
    pub result: Result<SimReport, SimError>,
    pub trace: Trace,
}

/// Runs `scenario` under `seed` over the replicas `factory` makes, and keeps the trace
/// of the run (see [`super::replay_with`] and [`super::shrink`]).
pub fn simulate_traced(
    scenario: &Scenario,
    seed: u64,
    factory: &mut dyn ReplicaFactory,
) -> TracedRun {
    let mut trace = Trace::empty(&scenario.name, seed, scenario.replicas, &[]);
    let result = (|| {
        scenario.check()?;
        let keys = scenario_keys(scenario)?;
        trace = Trace::empty(&scenario.name, seed, scenario.replicas, &keys);
        let folder = SimFolder::new(seed)?;
        let places: Vec<usize> = (0..scenario.replicas).collect();
        let mut sim = Sim::new(&scenario.name, seed, &places, &keys, factory, folder)?;
        let result = Schedule::new(scenario, seed, keys).run(&mut sim);
        trace.operations = std::mem::take(&mut sim.trace);
        result
    })();
    TracedRun { result, trace }
}

/// The scenario's keys, `k0..kN` padded to one width so they sort in order.
fn scenario_keys(scenario: &Scenario) -> Result<Vec<ItemId>, SimError> {
    let width = scenario.keys.count.saturating_sub(1).to_string().len();
    (0..scenario.keys.count)
        .map(|k| ItemId::new(format!("k{k:0width$}").as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            SimError::Scenario(super::ScenarioError::Invalid {
                file: format!("scenario {:?}", scenario.name),
                line: 0,
                field: "keys.count".into(),
                reason: e.to_string(),
            })
        })
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

/// A seeded run's decisions: every choice comes from the seeded stream, in an order
/// old seeds rely on, and becomes an operation for [`Sim`].
struct Schedule<'s> {
    scenario: &'s Scenario,
    rng: SimRng,
    /// The topology's own stream, so the random graph does not shift the schedule's
    /// draws; a changing topology draws each random phase from it as the phase starts.
    topology_rng: SimRng,
    /// Which phase of a changing topology is in force.
    topology_phase: usize,
    keys: Vec<ItemId>,
    next_value: u64,
}

impl<'s> Schedule<'s> {
    fn new(scenario: &'s Scenario, seed: u64, keys: Vec<ItemId>) -> Self {
        Self {
            scenario,
            rng: SimRng::new(seed),
            topology_rng: SimRng::new(seed ^ TOPOLOGY_STREAM),
            topology_phase: 0,
            keys,
            next_value: 0,
        }
    }

    fn run(&mut self, sim: &mut Sim<'_>) -> Result<SimReport, SimError> {
        for step in 0..self.scenario.steps {
            self.workload_step(sim, step)?;
        }
        let s = self.scenario;
        sim.converge(s.converge_rounds_max, s.step_ms, s.batch_size, s.policy)?;
        Ok(sim.report())
    }

    fn workload_step(&mut self, sim: &mut Sim<'_>, step: u64) -> Result<(), SimError> {
        sim.begin_step(step, self.scenario.step_ms)?;
        self.change_topology(sim, step);
        let healed: Vec<(usize, usize)> = sim
            .down_until
            .iter()
            .filter(|(_, until)| **until <= step)
            .map(|(edge, _)| *edge)
            .collect();
        for (a, b) in healed {
            sim.heal(a, b);
        }
        let faults = &self.scenario.faults;
        if self.rng.chance(faults.partition_rate) {
            if let Some((a, b)) = self.random_up_edge(sim) {
                sim.partition(a, b, step + faults.partition_steps);
            }
        }
        for _ in 0..self.scenario.operations_per_step {
            self.local_operation(sim)?;
        }
        let faults = &self.scenario.faults;
        if self.rng.chance(faults.gc_rate) {
            let index = self.rng.below(self.scenario.replicas);
            sim.gc(index, faults.tombstone_age_ms)?;
        }
        if self.rng.chance(self.scenario.faults.reopen_rate) {
            let index = self.rng.below(self.scenario.replicas);
            sim.reopen(index)?;
        }
        for _ in 0..self.scenario.syncs_per_step {
            let Some((a, b)) = self.random_up_edge(sim) else {
                continue;
            };
            let (source, destination) = if self.rng.chance(0.5) { (a, b) } else { (b, a) };
            let cancel = self.rng.chance(self.scenario.faults.cancel_rate);
            let faults = &self.scenario.faults;
            // Drawn only when a batch fault is set, so other scenarios keep their schedule.
            let plan = if faults.touch_batches() {
                LinkPlan::Seeded(LinkFaults::of(faults), SimRng::new(self.rng.next_u64()))
            } else {
                LinkPlan::Forward
            };
            let s = self.scenario;
            sim.sync(source, destination, s.batch_size, s.policy, cancel, plan)?;
        }
        Ok(())
    }

    /// The topology in force at `step`: the first phase's at step 0, a changing
    /// topology's next phase at the step it starts (a partition of an edge the new
    /// phase lacks is dropped with the edge).
    fn change_topology(&mut self, sim: &mut Sim<'_>, step: u64) {
        let (phase, topology) = self.scenario.topology.phase_at(step);
        if step > 0 && phase == self.topology_phase {
            return;
        }
        self.topology_phase = phase;
        let edges = topology.edges(self.scenario.replicas, &mut self.topology_rng);
        sim.set_topology(phase, topology.describe(), edges);
    }

    /// An edge that is not partitioned; draws from the stream only when there is one.
    fn random_up_edge(&mut self, sim: &Sim<'_>) -> Option<(usize, usize)> {
        let up = sim.up_edges();
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

    /// One put, update or delete on a random replica (or nothing, for an update or
    /// delete at a replica with no live key).
    fn local_operation(&mut self, sim: &mut Sim<'_>) -> Result<(), SimError> {
        let mix = &self.scenario.operations;
        let Some(kind) = self.rng.weighted(&[mix.put, mix.update, mix.delete]) else {
            return Ok(());
        };
        let index = self.rng.below(self.scenario.replicas);
        let key = if kind == 0 {
            let pick = self.pick_key();
            self.keys.get(pick).cloned()
        } else {
            let live = sim.live_items(index)?;
            if live.is_empty() {
                let wanted = if kind == 1 {
                    Wanted::Update
                } else {
                    Wanted::Delete
                };
                sim.no_live_key(index, wanted);
                return Ok(());
            }
            let pick = self.rng.below(live.len());
            live.get(pick).map(|(key, _)| key.clone())
        };
        // Both picks are below their list's length by construction.
        let Some(key) = key else {
            return Err(sim.violation(
                ViolationKind::Engine,
                format!("a key chosen at r{index} is out of range"),
            ));
        };
        if kind == 2 {
            if !sim.delete(index, &key)? {
                return Err(sim.violation(
                    ViolationKind::Engine,
                    format!("r{index} listed {key} as live but the delete found nothing"),
                ));
            }
        } else {
            self.next_value += 1;
            let value = format!("v{}", self.next_value).into_bytes();
            sim.put(index, &key, value, kind == 1)?;
        }
        Ok(())
    }
}

/// The executor: the replicas of one run, the checks and the figures. It performs
/// operations, whoever chose them, and writes each into `trace`.
pub(crate) struct Sim<'a> {
    name: String,
    seed: u64,
    /// The replicas that take part, by their place in the scenario, ascending. Messages
    /// and the trace name replicas by place.
    places: Vec<usize>,
    clock: Arc<SimClock>,
    factory: &'a mut dyn ReplicaFactory,
    /// The edges of the topology (phase) in force, for the figures.
    edges: Vec<(usize, usize)>,
    /// Downed edges and the step at which each heals.
    down_until: BTreeMap<(usize, usize), u64>,
    history: History,
    phase: Phase,
    step: u64,
    /// What the current step has done so far, for a violation's reproduction.
    operations: Vec<String>,
    /// Every operation performed so far in the workload, then the convergence.
    pub(crate) trace: Vec<TraceOp>,
    /// The figures of the workload steps done.
    steps: Vec<StepMetrics>,
    /// The figures of the step under way; `None` before the first and after the last.
    current: Option<StepMetrics>,
    /// The full-mesh rounds, once the convergence ran, and how many moved changes.
    convergence: Vec<StepMetrics>,
    rounds_to_converge: u64,
    /// By place. `None` for a place that takes no part, and only while a replica is
    /// closed for a reopen or lent to a session for one that does.
    replicas: Vec<Option<Box<dyn SimReplica>>>,
    /// Each place's folder: its first one, or the crash image of its last kill.
    paths: Vec<PathBuf>,
    /// Kills so far, to name crash images.
    kills: u64,
    /// Declared after `replicas`, so the replicas (and their sled locks) are dropped
    /// before the folder is removed.
    folder: SimFolder,
}

impl<'a> Sim<'a> {
    /// Creates the replicas at `places` (ascending), in order, in `folder`.
    fn new(
        name: &str,
        seed: u64,
        places: &[usize],
        keys: &[ItemId],
        factory: &'a mut dyn ReplicaFactory,
        folder: SimFolder,
    ) -> Result<Self, SimError> {
        let size = places.iter().max().map_or(0, |p| p + 1);
        let mut sim = Self {
            name: name.to_string(),
            seed,
            places: places.to_vec(),
            clock: Arc::new(SimClock::starting_at(CLOCK_START_MS)),
            factory,
            history: History::new(keys),
            edges: Vec::new(),
            down_until: BTreeMap::new(),
            phase: Phase::Workload,
            step: 0,
            operations: Vec::new(),
            trace: Vec::new(),
            steps: Vec::new(),
            current: None,
            convergence: Vec::new(),
            rounds_to_converge: 0,
            replicas: (0..size).map(|_| None).collect(),
            paths: (0..size).map(|place| folder.replica(place)).collect(),
            kills: 0,
            folder,
        };
        for &index in places {
            let clock: Arc<dyn Clock> = sim.clock.clone();
            let path = sim.path(index)?;
            let replica = sim.factory.create(index, &path, clock).map_err(|e| {
                sim.violation(ViolationKind::Engine, format!("create r{index}: {e}"))
            })?;
            sim.history.name_replica(replica.replica_id(), index);
            if let Some(slot) = sim.replicas.get_mut(index) {
                *slot = Some(replica);
            }
        }
        Ok(sim)
    }

    pub(crate) fn violation(&self, kind: ViolationKind, detail: String) -> SimError {
        SimError::Violation(Box::new(Violation {
            scenario: self.name.clone(),
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
        // Always open outside `session` and `reopen`, which put it back, and for every
        // place that takes part (a trace is checked first); the error is for a broken
        // driver, and borrows only the fields it names.
        let (scenario, seed, phase, step) = (&self.name, self.seed, self.phase, self.step);
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

    /// The report of a run that passed every check.
    pub(crate) fn report(&mut self) -> SimReport {
        SimReport {
            scenario: self.name.clone(),
            seed: self.seed,
            replicas: u64::try_from(self.places.len()).unwrap_or(u64::MAX),
            steps: std::mem::take(&mut self.steps),
            convergence: std::mem::take(&mut self.convergence),
            rounds_to_converge: self.rounds_to_converge,
            versions_made: u64::try_from(self.history.versions_made()).unwrap_or(u64::MAX),
        }
    }

    /// Ends the step under way, if any, and begins workload step `step`: the clock
    /// moves `advance_ms` on.
    pub(crate) fn begin_step(&mut self, step: u64, advance_ms: u64) -> Result<(), SimError> {
        self.finish_step()?;
        self.trace.push(TraceOp::Step { step, advance_ms });
        self.phase = Phase::Workload;
        self.step = step;
        self.operations.clear();
        self.clock.advance(advance_ms);
        self.current = Some(StepMetrics {
            step,
            ..StepMetrics::default()
        });
        Ok(())
    }

    /// The figures of the step under way; an operation before any step opens one of
    /// its own (a replay of a trace that does not begin with a step).
    fn metrics(&mut self) -> &mut StepMetrics {
        let step = self.step;
        self.current.get_or_insert_with(|| StepMetrics {
            step,
            ..StepMetrics::default()
        })
    }

    /// Ends the step under way: the soundness check at every replica, then its figures.
    pub(crate) fn finish_step(&mut self) -> Result<(), SimError> {
        let Some(mut metrics) = self.current.take() else {
            return Ok(());
        };
        self.check_all(&mut metrics)?;
        metrics.edges = u64::try_from(self.edges.len()).unwrap_or(u64::MAX);
        metrics.edges_down = u64::try_from(self.down_until.len()).unwrap_or(u64::MAX);
        self.steps.push(metrics);
        Ok(())
    }

    /// The edges of topology phase `phase` are in force; a partition of an edge the
    /// phase lacks is dropped with the edge.
    pub(crate) fn set_topology(
        &mut self,
        phase: usize,
        description: String,
        edges: Vec<(usize, usize)>,
    ) {
        self.down_until.retain(|edge, _| edges.contains(edge));
        self.operations.push(format!(
            "topology phase {phase}: {description}, {} edges",
            edges.len()
        ));
        self.edges.clone_from(&edges);
        self.metrics().topology_changes += 1;
        self.trace.push(TraceOp::Topology {
            phase,
            description,
            edges,
        });
    }

    pub(crate) fn heal(&mut self, a: usize, b: usize) {
        self.trace.push(TraceOp::Heal { a, b });
        self.down_until.remove(&(a, b));
        self.operations.push(format!("heal r{a}–r{b}"));
    }

    pub(crate) fn partition(&mut self, a: usize, b: usize, until_step: u64) {
        self.trace.push(TraceOp::Partition { a, b, until_step });
        self.down_until.insert((a, b), until_step);
        self.operations
            .push(format!("partition r{a}–r{b} until step {until_step}"));
    }

    pub(crate) fn up_edges(&self) -> Vec<(usize, usize)> {
        self.edges
            .iter()
            .filter(|e| !self.down_until.contains_key(e))
            .copied()
            .collect()
    }

    /// The live items of replica `index`, in id order.
    pub(crate) fn live_items(&mut self, index: usize) -> Result<Vec<(ItemId, Vec<u8>)>, SimError> {
        self.replica(index)?
            .items()
            .map_err(|e| self.engine(&format!("items of r{index}"), e))
    }

    pub(crate) fn no_live_key(&mut self, index: usize, wanted: Wanted) {
        self.trace.push(TraceOp::NoLiveKey {
            replica: index,
            wanted,
        });
        let what = match wanted {
            Wanted::Update => "update",
            Wanted::Delete => "delete",
        };
        self.operations
            .push(format!("{what} at r{index}: no live key"));
    }

    /// A local put of `key` at replica `index` (an update: the key was live when
    /// chosen), checked against the history.
    pub(crate) fn put(
        &mut self,
        index: usize,
        key: &ItemId,
        value: Vec<u8>,
        update: bool,
    ) -> Result<(), SimError> {
        let shown = String::from_utf8_lossy(&value).into_owned();
        self.trace.push(if update {
            TraceOp::Update {
                replica: index,
                key: key.to_string(),
                value: shown.clone(),
            }
        } else {
            TraceOp::Put {
                replica: index,
                key: key.to_string(),
                value: shown.clone(),
            }
        });
        let knowledge = self.replica(index)?.knowledge();
        let known_before = self.history.known(&knowledge, key);
        self.operations
            .push(format!("put {key}={shown} at r{index}"));
        let version = self
            .replica(index)?
            .put(key, &value)
            .map_err(|e| self.engine(&format!("put {key} at r{index}"), e))?;
        self.history
            .record_local(key, version, known_before, Some(value))
            .map_err(|detail| self.violation(ViolationKind::Unsound, detail))?;
        self.metrics().operations += 1;
        Ok(())
    }

    /// A local delete of `key` at replica `index`; false when the key was not live
    /// there (nothing happened).
    pub(crate) fn delete(&mut self, index: usize, key: &ItemId) -> Result<bool, SimError> {
        self.trace.push(TraceOp::Delete {
            replica: index,
            key: key.to_string(),
        });
        let knowledge = self.replica(index)?.knowledge();
        let known_before = self.history.known(&knowledge, key);
        self.operations.push(format!("delete {key} at r{index}"));
        let deleted = self
            .replica(index)?
            .delete(key)
            .map_err(|e| self.engine(&format!("delete {key} at r{index}"), e))?;
        let Some(version) = deleted else {
            return Ok(false);
        };
        self.history
            .record_local(key, version, known_before, None)
            .map_err(|detail| self.violation(ViolationKind::Unsound, detail))?;
        self.metrics().operations += 1;
        Ok(true)
    }

    /// Tombstone cleanup at replica `index`.
    pub(crate) fn gc(&mut self, index: usize, older_than_ms: u64) -> Result<(), SimError> {
        self.trace.push(TraceOp::Gc {
            replica: index,
            older_than_ms,
        });
        self.operations
            .push(format!("gc r{index} older than {older_than_ms} ms"));
        let report = self
            .replica(index)?
            .collect_garbage(older_than_ms)
            .map_err(|e| self.engine(&format!("gc r{index}"), e))?;
        self.metrics().tombstones_removed += report.tombstones_removed;
        Ok(())
    }

    /// Closes replica `index` (drops it: sled flushes and releases the folder) and
    /// opens it again.
    pub(crate) fn reopen(&mut self, index: usize) -> Result<(), SimError> {
        self.trace.push(TraceOp::Reopen { replica: index });
        self.operations.push(format!("reopen r{index}"));
        if let Some(slot) = self.replicas.get_mut(index) {
            drop(slot.take());
        }
        self.open(index)?;
        self.metrics().reopened += 1;
        Ok(())
    }

    /// A workload session `source → destination` whose link follows `plan`.
    pub(crate) fn sync(
        &mut self,
        source: usize,
        destination: usize,
        batch_size: usize,
        policy: PolicyChoice,
        cancel_after_first_batch: bool,
        plan: LinkPlan,
    ) -> Result<(), SimError> {
        let (stats, link) = self.session(
            source,
            destination,
            batch_size,
            policy,
            cancel_after_first_batch,
            plan,
        )?;
        self.metrics().add_session(&stats, &link);
        Ok(())
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

    /// One session `source → destination` with `policy` and `batch_size`, through a
    /// link whose faults follow `plan`. A workload session goes into the trace with the
    /// faults its link injected (even when a check then fails), a convergence session
    /// does not (the convergence is one operation). A destination killed mid-batch is
    /// reopened from its crash image; its session has no statistics (the default is
    /// returned with the tally saying so).
    fn session(
        &mut self,
        source: usize,
        destination: usize,
        batch_size: usize,
        policy: PolicyChoice,
        cancel_after_first_batch: bool,
        plan: LinkPlan,
    ) -> Result<(SessionStats, LinkTally), SimError> {
        let traced = (self.phase == Phase::Workload).then(|| {
            self.trace.push(TraceOp::Sync {
                source,
                destination,
                batch_size,
                policy,
                cancel_after_first_batch,
                faults: Vec::new(),
            });
            self.trace.len() - 1
        });
        self.operations.push(format!(
            "sync r{source}→r{destination} batch {batch_size}{}",
            if cancel_after_first_batch {
                ", cancelled after the first batch"
            } else {
                ""
            }
        ));
        let source_metas = self.snapshot(source)?.metas;
        let before = self.snapshot(destination)?;
        let destination_id = self.replica(destination)?.replica_id();
        let options = SessionOptions {
            policy: policy.conflict_policy(),
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
                let mut link = Link::new(&mut **dst, destination, plan);
                let result = if cancel_after_first_batch {
                    let mut observer = CancelAfterFirstBatch(options.cancel.clone());
                    run_session(&mut **src, &mut link, &options, &mut observer, clock)
                } else {
                    run_session(&mut **src, &mut link, &options, &mut NoObserver, clock)
                };
                Some((result, link.tally, link.log, link.trouble, link.injected))
            }
            _ => None,
        };
        if let Some(slot) = self.replicas.get_mut(source) {
            *slot = lent;
        }
        let Some((result, tally, log, trouble, injected)) = result else {
            return Err(self.violation(
                ViolationKind::Engine,
                format!("r{source} or r{destination} is not open"),
            ));
        };
        if let Some(TraceOp::Sync { faults, .. }) = traced.and_then(|at| self.trace.get_mut(at)) {
            *faults = injected;
        }
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
                policy.keeps_versions(),
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
        for index in self.places.clone() {
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
            knowledge_bytes_total / u64::try_from(self.places.len().max(1)).unwrap_or(1);
        Ok(())
    }

    /// Ends the last workload step; then faults stop, every ordered pair syncs, round
    /// after round (each moves the clock `advance_ms` on), until a round sends nothing;
    /// then the final checks. Keeps each round's figures and the rounds that still
    /// moved changes.
    pub(crate) fn converge(
        &mut self,
        rounds_max: u64,
        advance_ms: u64,
        batch_size: usize,
        policy: PolicyChoice,
    ) -> Result<(), SimError> {
        self.finish_step()?;
        self.trace.push(TraceOp::Converge {
            rounds_max,
            advance_ms,
            batch_size,
            policy,
        });
        self.phase = Phase::Convergence;
        self.down_until.clear();
        let replicas = u64::try_from(self.places.len()).unwrap_or(u64::MAX);
        let places = self.places.clone();
        for round in 0..rounds_max {
            self.step = round;
            self.operations.clear();
            self.clock.advance(advance_ms);
            let mut metrics = StepMetrics {
                step: round,
                edges: replicas * replicas.saturating_sub(1) / 2,
                ..StepMetrics::default()
            };
            for &source in &places {
                for &destination in &places {
                    if source == destination {
                        continue;
                    }
                    let (stats, link) = self.session(
                        source,
                        destination,
                        batch_size,
                        policy,
                        false,
                        LinkPlan::Forward,
                    )?;
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
            self.convergence.push(metrics);
            if quiet {
                self.rounds_to_converge = round;
                return self.final_checks();
            }
        }
        Err(self.violation(
            ViolationKind::NotConverged,
            format!("the full mesh still moved changes after {rounds_max} rounds"),
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
        for index in self.places.clone() {
            let replica = self.replica(index)?;
            knowledges.push(replica.knowledge());
            let live = replica
                .items()
                .map_err(|e| self.engine(&format!("items of r{index}"), e))?;
            items.push(live.into_iter().collect::<BTreeMap<ItemId, Vec<u8>>>());
        }
        let (Some(reference), Some(&first)) = (items.first(), self.places.first()) else {
            return Ok(());
        };
        for (&index, held) in self.places.iter().zip(&items) {
            if held != reference {
                let keys: BTreeSet<&ItemId> = held.keys().chain(reference.keys()).collect();
                let differing: Vec<String> = keys
                    .into_iter()
                    .filter(|k| held.get(*k) != reference.get(*k))
                    .map(|k| {
                        format!(
                            "{k}: r{first} {} r{index} {}",
                            super::history::show_value(reference.get(k).map(Vec::as_slice)),
                            super::history::show_value(held.get(k).map(Vec::as_slice))
                        )
                    })
                    .collect();
                return Err(self.violation(
                    ViolationKind::Diverged,
                    format!("r{index} differs from r{first}: {}", differing.join(", ")),
                ));
            }
        }
        for (a, ka) in self.places.iter().zip(&knowledges) {
            for (b, kb) in self.places.iter().zip(&knowledges) {
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

/// Replays `trace` over the real engine (sled replicas in a temporary folder that is
/// removed afterwards): the same operations, checks and figures as the run it was
/// recorded from, without drawing anything.
pub fn replay(trace: &Trace) -> Result<SimReport, SimError> {
    replay_with(trace, &mut SledReplicas)
}

/// Replays `trace` over the replicas `factory` makes (each at its place in the
/// scenario, as the seeded run made them).
pub fn replay_with(trace: &Trace, factory: &mut dyn ReplicaFactory) -> Result<SimReport, SimError> {
    replay_counted(trace, factory).0
}

/// A replay, and how many of the trace's operations it began: a violation stops the
/// replay in the operation it began last (or in the check that operation's step
/// boundary ran), so the operations after it cannot matter.
pub(crate) fn replay_counted(
    trace: &Trace,
    factory: &mut dyn ReplicaFactory,
) -> (Result<SimReport, SimError>, usize) {
    let mut begun = 0;
    let result = (|| -> Result<SimReport, SimError> {
        trace.check()?;
        let mut keys = BTreeMap::new();
        let mut key_list = Vec::new();
        for name in &trace.keys {
            // `check` made sure every key is a valid id.
            let id = ItemId::new(name.as_bytes()).map_err(|e| {
                SimError::Trace(super::TraceError::Invalid {
                    file: format!("trace of {:?}", trace.scenario),
                    field: "keys".into(),
                    reason: e.to_string(),
                })
            })?;
            keys.insert(name.as_str(), id.clone());
            key_list.push(id);
        }
        let folder = SimFolder::new(trace.seed)?;
        let mut sim = Sim::new(
            &trace.scenario,
            trace.seed,
            &trace.replicas,
            &key_list,
            factory,
            folder,
        )?;
        for op in &trace.operations {
            begun += 1;
            replay_op(&mut sim, op, &keys)?;
        }
        sim.finish_step()?;
        Ok(sim.report())
    })();
    (result, begun)
}

/// Performs one operation of a trace.
fn replay_op(
    sim: &mut Sim<'_>,
    op: &TraceOp,
    keys: &BTreeMap<&str, ItemId>,
) -> Result<(), SimError> {
    let key = |sim: &Sim<'_>, name: &str| {
        keys.get(name).cloned().ok_or_else(|| {
            sim.violation(
                ViolationKind::Engine,
                format!("{name:?} is not among the trace's keys"),
            )
        })
    };
    match op {
        TraceOp::Step { step, advance_ms } => sim.begin_step(*step, *advance_ms)?,
        TraceOp::Topology {
            phase,
            description,
            edges,
        } => sim.set_topology(*phase, description.clone(), edges.clone()),
        TraceOp::Partition { a, b, until_step } => sim.partition(*a, *b, *until_step),
        TraceOp::Heal { a, b } => sim.heal(*a, *b),
        TraceOp::Put {
            replica,
            key: name,
            value,
        } => {
            let id = key(sim, name)?;
            sim.put(*replica, &id, value.clone().into_bytes(), false)?;
        }
        TraceOp::Update {
            replica,
            key: name,
            value,
        } => {
            let id = key(sim, name)?;
            sim.put(*replica, &id, value.clone().into_bytes(), true)?;
        }
        TraceOp::Delete { replica, key: name } => {
            let id = key(sim, name)?;
            // A delete of a key no longer live (a shrunk trace) does nothing.
            sim.delete(*replica, &id)?;
        }
        TraceOp::NoLiveKey { replica, wanted } => sim.no_live_key(*replica, *wanted),
        TraceOp::Gc {
            replica,
            older_than_ms,
        } => sim.gc(*replica, *older_than_ms)?,
        TraceOp::Reopen { replica } => sim.reopen(*replica)?,
        TraceOp::Sync {
            source,
            destination,
            batch_size,
            policy,
            cancel_after_first_batch,
            faults,
        } => {
            let plan = if faults.is_empty() {
                LinkPlan::Forward
            } else {
                LinkPlan::Scripted(faults.clone())
            };
            sim.sync(
                *source,
                *destination,
                *batch_size,
                *policy,
                *cancel_after_first_batch,
                plan,
            )?;
        }
        TraceOp::Converge {
            rounds_max,
            advance_ms,
            batch_size,
            policy,
        } => sim.converge(*rounds_max, *advance_ms, *batch_size, *policy)?,
    }
    Ok(())
}

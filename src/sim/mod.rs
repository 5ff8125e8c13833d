//! The simulator: seeded, deterministic convergence experiments over the real engine.
//!
//! A [`Scenario`] (replicas, keys, an operation mix, a topology that may change in
//! phases, a schedule, a conflict policy, faults) runs under one seed: replicas of the
//! real engine in a temporary folder, a workload of puts, updates and deletes, sessions
//! over the topology's edges, partitions that heal, sessions cancelled after their
//! first batch, tombstone cleanup racing stale replicas, replicas closed and reopened,
//! destinations killed in the middle of a batch and reopened from their folder, and
//! batches lost or delivered twice. Then faults stop and a full mesh syncs until a
//! round moves nothing.
//!
//! Invariants:
//! - A seed and a commit reproduce a run exactly: every choice comes from the seeded
//!   splitmix64 stream, time from a manual clock the schedule advances, and nothing reads
//!   wall time or iterates a hash map. Messages and reports name replicas `r0..rN` by
//!   their place in the scenario, never by their (random) ids.
//! - design.md's soundness invariant is checked at every replica after every workload
//!   step and after every convergence session, against the simulator's own record of
//!   every version made and what supersedes what ([`history`]).
//! - A run that returns a [`SimReport`] converged: same live items everywhere, every
//!   knowledge containing every other, and every key changed only in causal order ends
//!   as its last operation left it. Anything else is a [`Violation`] carrying the seed,
//!   the step and the operations of that step.
//! - A run is also a [`Trace`]: the operations the driver performed, in order, as data
//!   ([`simulate_traced`]). Replaying a trace ([`replay_with`]) performs them through
//!   the same code and checks as the seeded run, so the full trace of a run gives the
//!   same report or the same violation; [`shrink`] cuts a violating trace down to a
//!   minimal one that still violates the same kind of check.
//! - The simulator drives replicas only through [`SimReplica`], made by a
//!   [`ReplicaFactory`], so a test can inject a faulty provider.
//! - A killed replica is a crash of its metadata store, not a clean close: the batch it
//!   was applying never commits (or, killed just after the commit, is never
//!   acknowledged), its session never ends, and it is reopened from a copy of its
//!   folder taken at the kill, so sled recovers a log that was never closed. Committed
//!   batches survive the kill: the copy is taken after a flush ([`SimReplica::flush`]),
//!   which stands for sled's background flusher so that the run stays deterministic. A
//!   kill that also loses sled's unflushed tail is not simulated (tests/crash.rs kills
//!   a child process for real).
//! - A lost batch is sent and counted but never applied, and the session goes on; a
//!   duplicated batch is applied twice, and the second time must change nothing
//!   ([`link`]).
//!
//! With the `proptest` feature, [`strategies`] generates scenarios for property tests.

mod clock;
mod driver;
mod error;
mod history;
mod link;
mod node;
mod plot;
mod report;
mod rng;
mod scenario;
mod shrink;
#[cfg(feature = "proptest")]
pub mod strategies;
mod trace;

use clock::SimClock;
use rng::SimRng;

pub use driver::{replay, replay_with, simulate, simulate_traced, simulate_with, TracedRun};
pub use error::{Phase, SimError, Violation, ViolationKind};
pub use node::{ReplicaFactory, SimReplica, SledReplicas};
pub use plot::{check_plot_path, plot_reports, MAX_PLOTTED_SEEDS};
pub use report::{ConflictTally, RunTotals, SimReport, StepMetrics};
pub use scenario::{
    Faults, KeySpace, OperationMix, PolicyChoice, Scenario, ScenarioError, Topology, TopologyPhase,
    MAX_SIM_KEYS, MAX_SIM_REPLICAS, MAX_SIM_STEPS,
};
pub use shrink::{shrink, ShrinkOptions, Shrunk, SHRINK_REPLAYS_MAX};
pub use trace::{
    BatchFault, Trace, TraceError, TraceOp, Wanted, MAX_TRACE_OPERATIONS, TRACE_FORMAT,
};

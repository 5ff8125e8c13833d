//! The simulator: seeded, deterministic convergence experiments over the real engine.
//!
//! A [`Scenario`] (replicas, keys, an operation mix, a topology, a schedule, a conflict
//! policy, faults) runs under one seed: replicas of the real engine in a temporary
//! folder, a workload of puts, updates and deletes, sessions over the topology's edges,
//! partitions that heal, sessions cancelled after their first batch, tombstone cleanup
//! racing stale replicas, and replicas closed and reopened. Then faults stop and a full
//! mesh syncs until a round moves nothing.
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
//! - The simulator drives replicas only through [`SimReplica`], made by a
//!   [`ReplicaFactory`], so a test can inject a faulty provider.
//!
//! Replicas are closed cleanly (dropped) and reopened; a crash in the middle of a batch
//! is not simulated here (tests/crash.rs covers that with a killed child process).

mod clock;
mod driver;
mod error;
mod history;
mod node;
mod plot;
mod report;
mod rng;
mod scenario;

use clock::SimClock;
use rng::SimRng;

pub use driver::{simulate, simulate_with};
pub use error::{Phase, SimError, Violation, ViolationKind};
pub use node::{ReplicaFactory, SimReplica, SledReplicas};
pub use plot::{check_plot_path, plot_reports, MAX_PLOTTED_SEEDS};
pub use report::{ConflictTally, RunTotals, SimReport, StepMetrics};
pub use scenario::{
    Faults, KeySpace, OperationMix, PolicyChoice, Scenario, ScenarioError, Topology, MAX_SIM_KEYS,
    MAX_SIM_REPLICAS, MAX_SIM_STEPS,
};

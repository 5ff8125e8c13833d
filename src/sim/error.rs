//! What can stop a simulation: a scenario that cannot run, a temporary folder that
//! cannot be made, or a violation, which carries everything needed to reproduce it.

use std::path::PathBuf;

use serde::Serialize;

use super::{ScenarioError, TraceError};

/// Which part of a run a violation happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The scenario's steps: workload, faults and syncs over the topology.
    Workload,
    /// The full-mesh rounds after faults stop; `step` counts rounds.
    Convergence,
    /// The checks after the last round.
    Final,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Workload => "step",
            Self::Convergence => "convergence round",
            Self::Final => "final check",
        })
    }
}

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ViolationKind {
    /// design.md's soundness invariant failed at some replica.
    Unsound,
    /// A session's statistics do not add up (a change neither applied, skipped nor
    /// failed), or a change failed although the simulated stores cannot fail.
    Accounting,
    /// The full mesh did not go quiet within `converge_rounds_max` rounds.
    NotConverged,
    /// After a quiet round, replicas hold different items or knowledge.
    Diverged,
    /// A key changed only in causal order does not end as its last operation left it.
    LostUpdate,
    /// A batch delivered a second time changed the destination.
    NotIdempotent,
    /// A replica killed mid-batch reopened without something it had committed.
    LostCommit,
    /// The engine returned an error (a store, a sync or an open failed).
    Engine,
}

/// A failed check, with the seed and the step that reproduce it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error(
    "scenario {scenario:?}, seed {seed}, {phase} {step}: {kind:?}: {detail} (operations of the step: {})",
    operations.join("; ")
)]
pub struct Violation {
    pub scenario: String,
    pub seed: u64,
    pub phase: Phase,
    pub step: u64,
    pub kind: ViolationKind,
    pub detail: String,
    /// The operations of the step up to the failing one, in order: with the seed, a
    /// reproduction, and what to read first.
    pub operations: Vec<String>,
}

/// Why a simulation did not produce a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error("cannot prepare the simulation folder {}: {source}", path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Violation(Box<Violation>),
    /// A trace that cannot be replayed.
    #[error(transparent)]
    Trace(#[from] TraceError),
    /// A trace handed to the shrinker did not show the violation it was to keep: a
    /// replay that differs from its run, which is a bug of the simulator.
    #[error(
        "the trace of scenario {scenario:?}, seed {seed}, did not show a {kind:?} violation \
         when replayed: {outcome}"
    )]
    NotReproduced {
        scenario: String,
        seed: u64,
        kind: ViolationKind,
        outcome: String,
    },
}

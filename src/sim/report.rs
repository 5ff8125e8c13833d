//! What a run measured, step by step, as JSON-ready values.

use serde::Serialize;

use crate::sync::{ConflictCounts, SessionStats};

/// Conflicts by outcome (the engine's `ConflictCounts`, serialisable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConflictTally {
    pub source_won: u64,
    pub destination_won: u64,
    pub merged: u64,
    pub saved: u64,
    pub skipped: u64,
}

impl ConflictTally {
    pub fn total(&self) -> u64 {
        self.source_won + self.destination_won + self.merged + self.saved + self.skipped
    }

    fn add(&mut self, c: &ConflictCounts) {
        self.source_won += c.source_won;
        self.destination_won += c.destination_won;
        self.merged += c.merged;
        self.saved += c.saved;
        self.skipped += c.skipped;
    }

    fn add_tally(&mut self, c: &ConflictTally) {
        self.source_won += c.source_won;
        self.destination_won += c.destination_won;
        self.merged += c.merged;
        self.saved += c.saved;
        self.skipped += c.skipped;
    }
}

/// One step (or one convergence round) of a run. Counters cover the step; the fields
/// from `exceptions_max` on are the state after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Local puts, updates and deletes that made a version.
    pub operations: u64,
    pub syncs: u64,
    /// Sessions cut after their first batch.
    pub cancelled: u64,
    /// Sessions that recovered forgotten knowledge by full enumeration.
    pub full_enumerations: u64,
    /// Changes the sources sent, lost batches included; a session whose destination
    /// was killed counts none.
    pub changes_sent: u64,
    /// Item ids and data carried by the batches.
    pub bytes: u64,
    pub conflicts: ConflictTally,
    pub tombstones_removed: u64,
    pub reopened: u64,
    /// Destinations killed while applying a batch (and reopened from their folder).
    pub crashed: u64,
    /// Batches that never reached their destination.
    pub batches_lost: u64,
    /// Batches delivered a second time.
    pub batches_duplicated: u64,
    /// Phases of a changing topology that began at this step (the first at step 0).
    pub topology_changes: u64,
    /// Most knowledge exceptions (ranges and single items with their own vector) at any
    /// replica after the step.
    pub exceptions_max: u64,
    /// Knowledge exceptions summed over replicas after the step.
    pub exceptions_total: u64,
    /// Largest knowledge after the step, in bytes as the wire encodes it
    /// (`encode_knowledge`): what a session's first message carries.
    pub knowledge_bytes_max: u64,
    /// Mean knowledge size over the replicas after the step, in bytes, rounded down.
    pub knowledge_bytes_mean: u64,
    /// Tombstones held, summed over replicas, after the step.
    pub tombstones: u64,
    /// Edges of the topology in force after the step (the full mesh while converging).
    pub edges: u64,
    /// Topology edges down (partitioned) after the step.
    pub edges_down: u64,
}

impl StepMetrics {
    pub(crate) fn add_session(&mut self, stats: &SessionStats, link: &LinkTally) {
        self.syncs += 1;
        self.cancelled += u64::from(stats.cancelled);
        self.full_enumerations += u64::from(stats.full_enumeration);
        self.changes_sent += stats.changes_sent;
        self.bytes += stats.bytes;
        self.conflicts.add(&stats.conflicts);
        self.crashed += u64::from(link.killed);
        self.batches_lost += link.batches_lost;
        self.batches_duplicated += link.batches_duplicated;
    }
}

/// What the faulty link did in one session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LinkTally {
    /// The destination was killed mid-batch (the session has no statistics then).
    pub(crate) killed: bool,
    pub(crate) batches_lost: u64,
    /// Changes the lost batches carried: sent, but neither applied, skipped nor failed.
    pub(crate) changes_lost: u64,
    pub(crate) batches_duplicated: u64,
}

/// A run that passed every check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimReport {
    pub scenario: String,
    pub seed: u64,
    pub replicas: u64,
    /// One entry per workload step.
    pub steps: Vec<StepMetrics>,
    /// One entry per full-mesh round after faults stopped, the quiet one last.
    pub convergence: Vec<StepMetrics>,
    /// Full-mesh rounds that still moved changes before the quiet one.
    pub rounds_to_converge: u64,
    /// Versions made over the run: local operations plus fresh conflict versions.
    pub versions_made: u64,
}

/// Sums over a whole run, for the one-line summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunTotals {
    pub syncs: u64,
    pub changes_sent: u64,
    pub bytes: u64,
    pub conflicts: ConflictTally,
    pub full_enumerations: u64,
    pub crashed: u64,
    pub batches_lost: u64,
    pub batches_duplicated: u64,
    pub topology_changes: u64,
    pub exceptions_max: u64,
    pub knowledge_bytes_max: u64,
    pub tombstones_max: u64,
}

impl SimReport {
    pub fn totals(&self) -> RunTotals {
        let mut t = RunTotals::default();
        for m in self.steps.iter().chain(&self.convergence) {
            t.syncs += m.syncs;
            t.changes_sent += m.changes_sent;
            t.bytes += m.bytes;
            t.conflicts.add_tally(&m.conflicts);
            t.full_enumerations += m.full_enumerations;
            t.crashed += m.crashed;
            t.batches_lost += m.batches_lost;
            t.batches_duplicated += m.batches_duplicated;
            t.topology_changes += m.topology_changes;
            t.exceptions_max = t.exceptions_max.max(m.exceptions_max);
            t.knowledge_bytes_max = t.knowledge_bytes_max.max(m.knowledge_bytes_max);
            t.tombstones_max = t.tombstones_max.max(m.tombstones);
        }
        t
    }
}

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

/// One step (or one convergence round) of a run. Counters cover the step; the last
/// four fields are the state after it.
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
    pub changes_sent: u64,
    /// Item ids and data carried by the batches.
    pub bytes: u64,
    pub conflicts: ConflictTally,
    pub tombstones_removed: u64,
    pub reopened: u64,
    /// Most knowledge exceptions (ranges and single items with their own vector) at any
    /// replica after the step.
    pub exceptions_max: u64,
    /// Knowledge exceptions summed over replicas after the step.
    pub exceptions_total: u64,
    /// Tombstones held, summed over replicas, after the step.
    pub tombstones: u64,
    /// Topology edges down (partitioned) after the step.
    pub edges_down: u64,
}

impl StepMetrics {
    pub(crate) fn add_session(&mut self, stats: &SessionStats) {
        self.syncs += 1;
        self.cancelled += u64::from(stats.cancelled);
        self.full_enumerations += u64::from(stats.full_enumeration);
        self.changes_sent += stats.changes_sent;
        self.bytes += stats.bytes;
        self.conflicts.add(&stats.conflicts);
    }
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
    pub exceptions_max: u64,
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
            t.exceptions_max = t.exceptions_max.max(m.exceptions_max);
            t.tombstones_max = t.tombstones_max.max(m.tombstones);
        }
        t
    }
}

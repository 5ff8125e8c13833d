//! Shrinking: a trace that violates a check, cut down to a minimal reproduction.
//!
//! Invariants:
//! - Every trace the shrinker keeps was replayed and violated a check of the kind it
//!   was asked to keep; the violation it returns is that replay's own.
//! - Deterministic: replays are (see [`super::trace`]), and candidates are tried in a
//!   fixed order, so the same trace, kind and factory give the same result.
//! - At most [`ShrinkOptions::replays_max`] replays, the first of which confirms that
//!   the trace violates the check at all; when they run out the result is smaller but
//!   may not be minimal, and says so.
//! - A trace is cut after the operation its violation stopped in (the operations after
//!   it never ran), then, in passes until one changes nothing: chunks of operations and
//!   then single ones are removed (delta debugging: the complements of ddmin), faults
//!   and cancellations are taken out of sessions, and replicas and keys that no
//!   remaining operation touches are dropped. The result is 1-minimal when the replays
//!   did not run out: removing any one operation loses the violation.

use std::collections::BTreeSet;

use super::driver::replay_counted;
use super::{ReplicaFactory, SimError, Trace, TraceOp, Violation, ViolationKind};

/// Replays a shrink may make unless told otherwise: a run of a few dozen steps shrinks
/// to its handful of operations in far fewer.
pub const SHRINK_REPLAYS_MAX: usize = 400;

/// How far a shrink may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkOptions {
    /// Most replays, the confirming one included.
    pub replays_max: usize,
}

impl Default for ShrinkOptions {
    fn default() -> Self {
        Self {
            replays_max: SHRINK_REPLAYS_MAX,
        }
    }
}

/// A shrunk trace and the violation its replay shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shrunk {
    pub trace: Trace,
    pub violation: Violation,
    /// Replays made, the confirming one included.
    pub replays: usize,
    /// True when the replays ran out before a pass changed nothing: the trace may not
    /// be minimal.
    pub replays_ran_out: bool,
}

/// Shrinks `trace`, which must violate a check of kind `kind` when replayed over the
/// replicas `factory` makes, to a minimal trace that still does.
pub fn shrink(
    trace: &Trace,
    kind: ViolationKind,
    factory: &mut dyn ReplicaFactory,
    options: ShrinkOptions,
) -> Result<Shrunk, SimError> {
    // The confirming replay: the trace must show the violation before anything goes.
    let (violation, begun) = match replay_counted(trace, factory) {
        (Err(SimError::Violation(v)), begun) if v.kind == kind => (*v, begun),
        (result, _) => {
            return Err(SimError::NotReproduced {
                scenario: trace.scenario.clone(),
                seed: trace.seed,
                kind,
                outcome: match result {
                    Ok(_) => "it passed every check".into(),
                    Err(e) => e.to_string(),
                },
            })
        }
    };
    let mut best = trace.clone();
    best.operations.truncate(begun);
    let mut shrinker = Shrinker {
        factory,
        kind,
        replays: 1,
        replays_max: options.replays_max.max(1),
        best,
        violation,
    };
    loop {
        let mut changed = shrinker.remove_operations();
        changed |= shrinker.simplify_sessions();
        changed |= shrinker.drop_untouched();
        if !changed || shrinker.ran_out() {
            break;
        }
    }
    Ok(Shrunk {
        replays_ran_out: shrinker.ran_out(),
        trace: shrinker.best,
        violation: shrinker.violation,
        replays: shrinker.replays,
    })
}

struct Shrinker<'f> {
    factory: &'f mut dyn ReplicaFactory,
    kind: ViolationKind,
    replays: usize,
    replays_max: usize,
    /// The smallest trace known to violate the check.
    best: Trace,
    /// `best`'s violation, as its last replay showed it.
    violation: Violation,
}

impl Shrinker<'_> {
    fn ran_out(&self) -> bool {
        self.replays >= self.replays_max
    }

    /// Replays `candidate`; if it violates a check of the kind kept, it becomes the
    /// best trace, cut after the operation its violation stopped in.
    fn keep_if_violating(&mut self, mut candidate: Trace) -> bool {
        if self.ran_out() {
            return false;
        }
        self.replays += 1;
        match replay_counted(&candidate, self.factory) {
            (Err(SimError::Violation(v)), begun) if v.kind == self.kind => {
                candidate.operations.truncate(begun);
                self.best = candidate;
                self.violation = *v;
                true
            }
            _ => false,
        }
    }

    /// The best trace without its operations `start..start + len`.
    fn without(&self, start: usize, len: usize) -> Trace {
        let mut candidate = self.best.clone();
        let end = (start + len).min(candidate.operations.len());
        candidate.operations.drain(start..end);
        candidate
    }

    /// ddmin over the operations, complements only: remove one of `n` chunks; on
    /// success go on with `n - 1` chunks, else with twice as many, until the chunks
    /// are single operations and none of them can go.
    fn remove_operations(&mut self) -> bool {
        let mut changed = false;
        let mut n = 2usize;
        loop {
            let len = self.best.operations.len();
            if len == 0 || self.ran_out() {
                return changed;
            }
            let n_now = n.min(len);
            let chunk = len.div_ceil(n_now);
            let mut removed = false;
            let mut start = 0;
            while start < self.best.operations.len() && !self.ran_out() {
                if self.keep_if_violating(self.without(start, chunk)) {
                    removed = true;
                    break;
                }
                start += chunk;
            }
            if removed {
                changed = true;
                n = n_now.saturating_sub(1).max(2);
            } else if n_now >= len {
                return changed;
            } else {
                n = (n_now * 2).min(len);
            }
        }
    }

    /// Takes each fault out of each session, and each cancellation, one at a time.
    fn simplify_sessions(&mut self) -> bool {
        let mut changed = false;
        let mut index = 0;
        while index < self.best.operations.len() && !self.ran_out() {
            let Some(TraceOp::Sync {
                faults,
                cancel_after_first_batch,
                ..
            }) = self.best.operations.get(index)
            else {
                index += 1;
                continue;
            };
            let (fault_count, cancelled) = (faults.len(), *cancel_after_first_batch);
            let mut fault = 0;
            let mut remaining = fault_count;
            while fault < remaining && !self.ran_out() {
                let mut candidate = self.best.clone();
                if let Some(TraceOp::Sync { faults, .. }) = candidate.operations.get_mut(index) {
                    if fault < faults.len() {
                        faults.remove(fault);
                    }
                }
                if self.keep_if_violating(candidate) {
                    changed = true;
                    remaining -= 1;
                } else {
                    fault += 1;
                }
            }
            if cancelled {
                let mut candidate = self.best.clone();
                if let Some(TraceOp::Sync {
                    cancel_after_first_batch,
                    ..
                }) = candidate.operations.get_mut(index)
                {
                    *cancel_after_first_batch = false;
                }
                changed |= self.keep_if_violating(candidate);
            }
            index += 1;
        }
        changed
    }

    /// Drops the replicas and the keys that no operation touches: all at once, else
    /// one at a time (a replica that only converges may still matter).
    fn drop_untouched(&mut self) -> bool {
        let mut changed = false;
        let touched: BTreeSet<usize> = self
            .best
            .operations
            .iter()
            .flat_map(TraceOp::replicas)
            .collect();
        let untouched: Vec<usize> = self
            .best
            .replicas
            .iter()
            .copied()
            .filter(|r| !touched.contains(r))
            .collect();
        if !untouched.is_empty() && untouched.len() < self.best.replicas.len() {
            let mut candidate = self.best.clone();
            candidate.replicas.retain(|r| touched.contains(r));
            if self.keep_if_violating(candidate) {
                changed = true;
            } else {
                for replica in untouched {
                    let mut candidate = self.best.clone();
                    candidate.replicas.retain(|r| *r != replica);
                    changed |= self.keep_if_violating(candidate);
                }
            }
        }
        let used: BTreeSet<String> = self
            .best
            .operations
            .iter()
            .filter_map(|op| op.key().map(str::to_string))
            .collect();
        let unused: Vec<String> = self
            .best
            .keys
            .iter()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        if !unused.is_empty() {
            let mut candidate = self.best.clone();
            candidate.keys.retain(|k| used.contains(k));
            if self.keep_if_violating(candidate) {
                changed = true;
            } else {
                for key in unused {
                    let mut candidate = self.best.clone();
                    candidate.keys.retain(|k| *k != key);
                    changed |= self.keep_if_violating(candidate);
                }
            }
        }
        changed
    }
}

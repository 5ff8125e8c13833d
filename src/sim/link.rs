//! The faults between a session's source and its destination: a link that loses or
//! duplicates a batch, and a destination process killed while it applies one.
//!
//! Invariants:
//! - Under a seeded schedule, every choice comes from the link's own seeded stream,
//!   which the driver draws from the run's stream once per session and only when the
//!   scenario has a batch fault, so scenarios without one keep their schedules (and old
//!   seeds their runs). Under a replay, the faults come from the trace, by batch number,
//!   and nothing is drawn.
//! - Every fault injected is written down ([`Link::injected`]) as the trace records it,
//!   so replaying the trace injects the same faults into the same batches.
//! - Once the destination is killed, nothing reaches its replica any more: neither the
//!   end of the session nor another batch. The driver then reopens it from what its
//!   folder held at the kill.
//! - The applier stages a whole batch in one `Commit`, written as one sled batch, so a
//!   kill at any change before the commit loses the whole batch; the kill point after
//!   the last change stands for a kill between the commit and the acknowledgement.
//! - A lost batch never reaches the destination: the engine must not learn its versions
//!   (the soundness check sees it if it does).
//! - A batch delivered twice must leave the destination, the second time, exactly as
//!   the first delivery left it: same items, metadata, knowledge and forgotten knowledge.

use crate::metadata::MetadataError;
use crate::model::{ChangeBatch, Knowledge, ReplicaId};
use crate::sync::{
    BatchOutcome, ChangeDestination, ConflictPolicy, NoObserver, PeerInfo, SyncError, SyncObserver,
    SyncProvider,
};

use super::report::LinkTally;
use super::{BatchFault, Faults, SimReplica, SimRng, ViolationKind};

/// The per-batch chances of a session's faults.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LinkFaults {
    crash_rate: f64,
    lose_rate: f64,
    duplicate_rate: f64,
}

impl LinkFaults {
    pub(crate) fn of(faults: &Faults) -> Self {
        Self {
            crash_rate: faults.crash_rate,
            lose_rate: faults.lose_batch_rate,
            duplicate_rate: faults.duplicate_batch_rate,
        }
    }
}

/// Where a link's faults come from.
pub(crate) enum LinkPlan {
    /// No faults: the link only forwards.
    Forward,
    /// Chances per batch, drawn from the link's own stream.
    Seeded(LinkFaults, SimRng),
    /// The faults a trace recorded, by batch number, in batch order.
    Scripted(Vec<BatchFault>),
}

/// What happens to one batch.
enum Fate {
    Delivered,
    /// Killed before change `Some(n)` of the batch, or after its commit (`None`).
    Killed(Option<usize>),
    Lost,
    /// Delivered twice: at once, or (`true`) after the next batch.
    Duplicated(bool),
}

/// The destination of one session, as the source reaches it. Without faults it only
/// forwards.
pub(crate) struct Link<'r> {
    replica: &'r mut dyn SimReplica,
    /// The destination's place in the scenario, for the log.
    index: usize,
    plan: LinkPlan,
    /// The faults injected so far, for the trace.
    pub(crate) injected: Vec<BatchFault>,
    /// Batches the source has sent so far.
    batches: u64,
    /// A copy of a batch to deliver again after the next one, and its number.
    late_copy: Option<(u64, ChangeBatch)>,
    pub(crate) tally: LinkTally,
    /// What the faults did, for the step's reproduction.
    pub(crate) log: Vec<String>,
    /// Set when a second delivery changed the destination (or it could not be read
    /// back to tell): what the driver reports as a violation.
    pub(crate) trouble: Option<(ViolationKind, String)>,
}

/// What a duplicate delivery must not change.
struct Observed {
    metas: Vec<(crate::model::ItemId, crate::metadata::ItemMeta)>,
    items: Vec<(crate::model::ItemId, Vec<u8>)>,
    knowledge: Knowledge,
    forgotten: Knowledge,
}

impl<'r> Link<'r> {
    /// A link to `replica` (replica `index` of the scenario) whose faults follow `plan`.
    pub(crate) fn new(replica: &'r mut dyn SimReplica, index: usize, plan: LinkPlan) -> Self {
        Self {
            replica,
            index,
            plan,
            injected: Vec::new(),
            batches: 0,
            late_copy: None,
            tally: LinkTally::default(),
            log: Vec::new(),
            trouble: None,
        }
    }

    /// What happens to batch `number` of `changes` changes. A seeded plan draws in a
    /// fixed order (kill, then loss, then duplication, each only when its rate is above
    /// 0), which old seeds rely on.
    fn fate(&mut self, number: u64, changes: usize, last: bool) -> Fate {
        match &mut self.plan {
            LinkPlan::Forward => Fate::Delivered,
            LinkPlan::Seeded(faults, rng) => {
                // True with chance `rate`; draws only when the rate is above 0.
                fn chance(rng: &mut SimRng, rate: f64) -> bool {
                    rate > 0.0 && rng.chance(rate)
                }
                if chance(rng, faults.crash_rate) {
                    // Points 0..changes fall before the commit; `changes` is just after it.
                    let point = rng.below(changes + 1);
                    Fate::Killed((point < changes).then_some(point))
                } else if chance(rng, faults.lose_rate) {
                    Fate::Lost
                } else if chance(rng, faults.duplicate_rate) {
                    // The last batch has no next one to arrive after.
                    Fate::Duplicated(!last && rng.below(2) == 1)
                } else {
                    Fate::Delivered
                }
            }
            LinkPlan::Scripted(faults) => match faults.iter().find(|f| f.batch() == number) {
                None => Fate::Delivered,
                Some(BatchFault::Lost { .. }) => Fate::Lost,
                Some(BatchFault::Killed { at_change, .. }) => Fate::Killed(*at_change),
                // A replayed batch that is now the last has no next one to arrive after.
                Some(BatchFault::Duplicated { late, .. }) => Fate::Duplicated(*late && !last),
            },
        }
    }

    /// What a killed process answers: nothing. The closest the engine has is a store
    /// whose handle is poisoned and must be reopened, which is what the driver does.
    fn killed(&self) -> SyncError {
        SyncError::Metadata(MetadataError::Poisoned {
            replica: self.replica.replica_id(),
        })
    }

    fn observe(&self) -> Result<Observed, String> {
        let read = |e: crate::stores::StoreError| format!("r{}: {e}", self.index);
        Ok(Observed {
            metas: self.replica.item_metas().map_err(read)?,
            items: self.replica.items().map_err(read)?,
            knowledge: self.replica.knowledge(),
            forgotten: self.replica.forgotten(),
        })
    }

    /// Delivers `copy` (batch `number`) a second time and checks that nothing changed.
    fn redeliver(
        &mut self,
        number: u64,
        copy: ChangeBatch,
        policy: &ConflictPolicy,
    ) -> Result<(), SyncError> {
        let before = self.observe();
        // The orchestrator never sees the copy: its outcome is not the session's.
        self.replica.process_batch(copy, policy, &mut NoObserver)?;
        let after = self.observe();
        self.tally.batches_duplicated += 1;
        self.log
            .push(format!("batch {number} delivered again to r{}", self.index));
        if self.trouble.is_some() {
            return Ok(());
        }
        let (before, after) = match (before, after) {
            (Ok(before), Ok(after)) => (before, after),
            (Err(e), _) | (_, Err(e)) => {
                self.trouble = Some((ViolationKind::Engine, format!("read back {e}")));
                return Ok(());
            }
        };
        let same =
            |a: &Knowledge, b: &Knowledge| a.contains_knowledge(b) && b.contains_knowledge(a);
        // Equal knowledge in another layout is no change; anything else is.
        let changed: Vec<&str> = [
            (after.metas != before.metas, "item metadata"),
            (after.items != before.items, "items"),
            (!same(&after.knowledge, &before.knowledge), "knowledge"),
            (
                !same(&after.forgotten, &before.forgotten),
                "forgotten knowledge",
            ),
        ]
        .into_iter()
        .filter(|(changed, _)| *changed)
        .map(|(_, what)| what)
        .collect();
        if !changed.is_empty() {
            self.trouble = Some((
                ViolationKind::NotIdempotent,
                format!(
                    "the second delivery of batch {number} to r{} changed its {}",
                    self.index,
                    changed.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

impl SyncProvider for Link<'_> {
    fn replica_id(&self) -> ReplicaId {
        self.replica.replica_id()
    }
    fn fetch_info(&mut self) -> Result<PeerInfo, SyncError> {
        if self.tally.killed {
            return Err(self.killed());
        }
        self.replica.fetch_info()
    }
    fn begin_session(&mut self, peer: &PeerInfo) -> Result<(), SyncError> {
        if self.tally.killed {
            return Err(self.killed());
        }
        self.replica.begin_session(peer)
    }
    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError> {
        if self.tally.killed {
            return Err(self.killed());
        }
        self.replica.note_peer_epoch(peer, epoch)
    }
    fn end_session(&mut self, completed: bool) -> Result<(), SyncError> {
        if self.tally.killed {
            return Err(self.killed());
        }
        self.replica.end_session(completed)
    }
}

impl ChangeDestination for Link<'_> {
    fn process_batch(
        &mut self,
        batch: ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError> {
        if self.tally.killed {
            return Err(self.killed());
        }
        self.batches += 1;
        let number = self.batches;
        let changes = batch.change_count();
        let destination = self.index;
        let fate = self.fate(number, changes, batch.is_last());
        if let Fate::Killed(point) = fate {
            self.injected.push(BatchFault::Killed {
                batch: number,
                at_change: point,
            });
            let when = match point {
                Some(point) => {
                    format!("at change {point} of {changes}, before its commit: the batch is lost")
                }
                None => {
                    self.replica.process_batch(batch, policy, observer)?;
                    format!("after its commit ({changes} changes), before the acknowledgement")
                }
            };
            self.log.push(format!(
                "r{destination} killed applying batch {number} {when}"
            ));
            self.tally.killed = true;
            self.late_copy = None;
            return Err(self.killed());
        }
        if let Fate::Lost = fate {
            self.injected.push(BatchFault::Lost { batch: number });
            self.log.push(format!(
                "batch {number} ({changes} changes) lost on its way to r{destination}"
            ));
            self.tally.batches_lost += 1;
            self.tally.changes_lost += u64::try_from(changes).unwrap_or(u64::MAX);
            return Ok(BatchOutcome::default());
        }
        let copy = match fate {
            Fate::Duplicated(late) => {
                self.injected.push(BatchFault::Duplicated {
                    batch: number,
                    late,
                });
                Some((late, batch.clone()))
            }
            _ => None,
        };
        let late_copy = self.late_copy.take();
        let outcome = self.replica.process_batch(batch, policy, observer)?;
        if let Some((earlier, copy)) = late_copy {
            self.redeliver(earlier, copy, policy)?;
        }
        match copy {
            Some((true, copy)) => self.late_copy = Some((number, copy)),
            Some((false, copy)) => self.redeliver(number, copy, policy)?,
            None => {}
        }
        Ok(outcome)
    }
}

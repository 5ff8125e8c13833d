//! The simulator's clock: time moves only when the schedule moves it.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Clock;

/// A manual clock. The schedule advances it by a step's length; besides, every reading
/// moves it one millisecond on, so no two readings in a run are equal. That keeps every
/// hybrid-clock timestamp of a run distinct (each is a reading, or a logical tick past
/// one inside a single batch), so last-writer-wins never falls back to replica ids,
/// which are random, and a seed decides every winner.
#[derive(Debug)]
pub(crate) struct SimClock(AtomicU64);

impl SimClock {
    pub(crate) fn starting_at(ms: u64) -> Self {
        Self(AtomicU64::new(ms))
    }

    pub(crate) fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

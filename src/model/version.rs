use std::fmt;

use smallvec::SmallVec;

use super::ReplicaId;

/// `(replica, tick)`: the `tick`-th change made on `replica`. Ticks start at 1.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub replica: ReplicaId,
    pub tick: u64,
}

impl Version {
    pub fn new(replica: ReplicaId, tick: u64) -> Self {
        Self { replica, tick }
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}@{}", self.replica, self.tick)
    }
}

/// A clock vector: for each replica, the highest tick known. Absent replicas are 0.
///
/// Invariant: entries sorted by replica id, no zero ticks. So `==` is semantic.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ClockVector {
    entries: SmallVec<[(ReplicaId, u64); 4]>,
}

impl ClockVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a vector from arbitrary pairs: zero ticks are dropped and a replica named
    /// twice keeps its highest tick.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (ReplicaId, u64)>) -> Self {
        let mut v = Self::new();
        for (r, t) in pairs {
            v.raise(r, t);
        }
        v
    }

    pub fn get(&self, replica: ReplicaId) -> u64 {
        match self.entries.binary_search_by(|(r, _)| r.cmp(&replica)) {
            Ok(i) => self.entries[i].1,
            Err(_) => 0,
        }
    }

    pub fn contains(&self, version: Version) -> bool {
        version.tick <= self.get(version.replica)
    }

    /// Sets `replica`'s tick to `max(current, tick)`.
    pub fn raise(&mut self, replica: ReplicaId, tick: u64) {
        if tick == 0 {
            return;
        }
        match self.entries.binary_search_by(|(r, _)| r.cmp(&replica)) {
            Ok(i) => {
                if self.entries[i].1 < tick {
                    self.entries[i].1 = tick;
                }
            }
            Err(i) => self.entries.insert(i, (replica, tick)),
        }
    }

    /// Sets `replica`'s tick to exactly `tick` (0 removes the entry).
    pub fn set(&mut self, replica: ReplicaId, tick: u64) {
        match self.entries.binary_search_by(|(r, _)| r.cmp(&replica)) {
            Ok(i) if tick == 0 => {
                self.entries.remove(i);
            }
            Ok(i) => self.entries[i].1 = tick,
            Err(i) if tick != 0 => self.entries.insert(i, (replica, tick)),
            Err(_) => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (ReplicaId, u64)> + '_ {
        self.entries.iter().copied()
    }

    /// Pointwise maximum.
    pub fn max(&self, other: &Self) -> Self {
        self.zip(other, u64::max)
    }

    /// Pointwise minimum.
    pub fn min(&self, other: &Self) -> Self {
        self.zip(other, u64::min)
    }

    /// True when every tick of `other` is at most the same replica's tick here.
    pub fn dominates(&self, other: &Self) -> bool {
        other.entries.iter().all(|&(r, t)| t <= self.get(r))
    }

    fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let (a, b) = (&self.entries, &other.entries);
        let mut out = SmallVec::with_capacity(a.len().max(b.len()));
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            let (r, t) = match (a.get(i), b.get(j)) {
                (Some(&(ra, ta)), Some(&(rb, tb))) if ra == rb => {
                    i += 1;
                    j += 1;
                    (ra, f(ta, tb))
                }
                (Some(&(ra, ta)), Some(&(rb, _))) if ra < rb => {
                    i += 1;
                    (ra, f(ta, 0))
                }
                (Some(_), Some(&(rb, tb))) => {
                    j += 1;
                    (rb, f(0, tb))
                }
                (Some(&(ra, ta)), None) => {
                    i += 1;
                    (ra, f(ta, 0))
                }
                (None, Some(&(rb, tb))) => {
                    j += 1;
                    (rb, f(0, tb))
                }
                (None, None) => unreachable!("loop condition"),
            };
            if t != 0 {
                out.push((r, t));
            }
        }
        Self { entries: out }
    }
}

impl fmt::Debug for ClockVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (n, (r, t)) in self.entries.iter().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r:?}:{t}")?;
        }
        f.write_str("}")
    }
}

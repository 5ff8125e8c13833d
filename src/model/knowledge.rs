use std::cmp::Ordering;
use std::fmt;

use super::{ClockVector, ItemId, ModelError, ReplicaId, Version};

/// A half-open range `[start, end)` of item ids, in bytewise order. `end == None` means
/// "to the end of the id space". The empty byte string is the smallest id, so
/// `[b"", None)` is the whole space.
///
/// Bounds are byte strings rather than [`ItemId`]s because the exclusive end of a range
/// holding exactly one item is that item followed by a zero byte, one byte past the id
/// length limit for the longest ids.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdRange {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl IdRange {
    /// `[start, end)`; fails when the range would be empty.
    pub fn new(start: Vec<u8>, end: Option<Vec<u8>>) -> Result<Self, ModelError> {
        if let Some(e) = &end {
            if e.as_slice() <= start.as_slice() {
                return Err(ModelError::InvalidKnowledge(format!(
                    "empty id range [{start:?}, {e:?})"
                )));
            }
        }
        Ok(Self { start, end })
    }

    pub fn all() -> Self {
        Self {
            start: Vec::new(),
            end: None,
        }
    }

    /// The range that holds exactly `item`.
    pub fn single(item: &ItemId) -> Self {
        Self {
            start: item.as_bytes().to_vec(),
            end: Some(item.successor_bytes()),
        }
    }

    /// `[start, ∞)`.
    pub fn from_start(start: Vec<u8>) -> Self {
        Self { start, end: None }
    }

    pub fn start(&self) -> &[u8] {
        &self.start
    }

    pub fn end(&self) -> Option<&[u8]> {
        self.end.as_deref()
    }

    pub fn contains(&self, item: &[u8]) -> bool {
        self.start.as_slice() <= item && self.end.as_deref().is_none_or(|e| item < e)
    }
}

impl fmt::Debug for IdRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match &self.end {
            Some(e) => write!(f, "[{:?}, {:?})", show(&self.start), show(e)),
            None => write!(f, "[{:?}, ∞)", show(&self.start)),
        }
    }
}

/// Compares two exclusive ends, `None` being +∞.
fn cmp_end(a: Option<&[u8]>, b: Option<&[u8]>) -> Ordering {
    match (a, b) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => x.cmp(y),
    }
}

/// What a replica knows: for every item id a clock vector of the versions it has seen.
///
/// Stored as a base vector plus exceptions: disjoint id ranges (a single item is a range
/// of one id) that carry a vector of their own. An item outside every exception has the
/// base vector. Without exceptions the size is O(replicas) whatever the item count.
///
/// Invariant (canonical form): exceptions are sorted by start, non-empty, disjoint,
/// never carry the base vector, and two adjacent exceptions never carry equal vectors;
/// no exception extends to the end of the id space (that last segment *is* the base).
/// A piecewise-constant function has exactly one such form, so `==` is semantic
/// equality, and every operation returns its result in this form.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Knowledge {
    base: ClockVector,
    exceptions: Vec<(IdRange, ClockVector)>,
}

/// One piece of a knowledge's full segmentation of the id space.
#[derive(Clone, Copy)]
struct Segment<'a> {
    start: &'a [u8],
    end: Option<&'a [u8]>,
    vector: &'a ClockVector,
}

impl Knowledge {
    /// Knowledge of nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same vector for every item.
    pub fn from_vector(base: ClockVector) -> Self {
        Self {
            base,
            exceptions: Vec::new(),
        }
    }

    /// Builds knowledge from a base vector and exceptions, which must be sorted and
    /// disjoint (they need not be compact: the result is brought to canonical form).
    pub fn from_parts(
        base: ClockVector,
        exceptions: Vec<(IdRange, ClockVector)>,
    ) -> Result<Self, ModelError> {
        for pair in exceptions.windows(2) {
            let (a, b) = (&pair[0].0, &pair[1].0);
            if cmp_end(a.end(), Some(b.start())) == Ordering::Greater {
                return Err(ModelError::InvalidKnowledge(format!(
                    "exception ranges {a:?} and {b:?} overlap or are out of order"
                )));
            }
        }
        let raw = Self { base, exceptions };
        let segments = raw.segments();
        let out = Self::from_segments(segments.iter().map(|s| (s.start, s.end, s.vector.clone())));
        debug_assert!(out.is_well_formed());
        Ok(out)
    }

    pub fn base(&self) -> &ClockVector {
        &self.base
    }

    pub fn exceptions(&self) -> &[(IdRange, ClockVector)] {
        &self.exceptions
    }

    /// The vector that applies to `item`.
    pub fn vector_for(&self, item: &[u8]) -> &ClockVector {
        let after = self
            .exceptions
            .partition_point(|(r, _)| r.start() <= item);
        if after > 0 {
            let (range, vector) = &self.exceptions[after - 1];
            if range.contains(item) {
                return vector;
            }
        }
        &self.base
    }

    /// Whether this knowledge contains version `version` of `item`.
    pub fn contains(&self, item: &ItemId, version: Version) -> bool {
        self.vector_for(item.as_bytes()).contains(version)
    }

    /// Whether every version `other` contains, this one contains too.
    pub fn contains_knowledge(&self, other: &Knowledge) -> bool {
        let mut all = true;
        sweep(self, other, |_, _, mine, theirs| {
            if !mine.dominates(theirs) {
                all = false;
            }
            all
        });
        all
    }

    /// The union of two version sets: pointwise maximum per item.
    pub fn combine(&self, other: &Knowledge) -> Knowledge {
        self.zip_with(other, |a, b| a.max(b))
    }

    /// The intersection of two version sets: pointwise minimum per item.
    pub fn intersect(&self, other: &Knowledge) -> Knowledge {
        self.zip_with(other, |a, b| a.min(b))
    }

    /// This knowledge inside `range`, nothing outside it.
    pub fn project(&self, range: &IdRange) -> Knowledge {
        self.zip_with(&Self::indicator(range), |v, inside| {
            if inside.is_empty() {
                ClockVector::new()
            } else {
                v.clone()
            }
        })
    }

    /// This knowledge with nothing known about `item`. Combined into a destination's
    /// knowledge, an excluded item keeps the destination's previous vector.
    pub fn exclude(&self, item: &ItemId) -> Knowledge {
        self.zip_with(&Self::indicator(&IdRange::single(item)), |v, inside| {
            if inside.is_empty() {
                v.clone()
            } else {
                ClockVector::new()
            }
        })
    }

    /// Applies `f` to every vector (base and exceptions) and brings the result back to
    /// canonical form.
    pub fn map_vectors(&self, f: impl Fn(&ClockVector) -> ClockVector) -> Knowledge {
        let segments = self.segments();
        Self::from_segments(segments.iter().map(|s| (s.start, s.end, f(s.vector))))
    }

    /// Sets `replica`'s tick to exactly `tick` for every item.
    pub fn with_replica_tick(&self, replica: ReplicaId, tick: u64) -> Knowledge {
        self.map_vectors(|v| {
            let mut v = v.clone();
            v.set(replica, tick);
            v
        })
    }

    /// Caps `replica`'s tick at `tick` for every item.
    pub fn cut_replica(&self, replica: ReplicaId, tick: u64) -> Knowledge {
        self.map_vectors(|v| {
            let mut v = v.clone();
            if v.get(replica) > tick {
                v.set(replica, tick);
            }
            v
        })
    }

    /// The highest tick of `replica` known for any item.
    pub fn max_tick(&self, replica: ReplicaId) -> u64 {
        self.exceptions
            .iter()
            .map(|(_, v)| v.get(replica))
            .fold(self.base.get(replica), u64::max)
    }

    /// The lowest tick of `replica` known for any item: every change of `replica` at or
    /// below it is known everywhere, so a change scan may start just above it.
    pub fn min_tick(&self, replica: ReplicaId) -> u64 {
        self.exceptions
            .iter()
            .map(|(_, v)| v.get(replica))
            .fold(self.base.get(replica), u64::min)
    }

    /// Every replica named anywhere in this knowledge, sorted, without repeats.
    pub fn replicas(&self) -> Vec<ReplicaId> {
        let mut out: Vec<ReplicaId> = self.base.iter().map(|(r, _)| r).collect();
        for (_, v) in &self.exceptions {
            out.extend(v.iter().map(|(r, _)| r));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    pub fn exception_count(&self) -> usize {
        self.exceptions.len()
    }

    /// Checks the canonical-form invariant. Used by `debug_assert!` around reads and
    /// writes, and by the decoders.
    pub fn is_well_formed(&self) -> bool {
        let sorted_disjoint = self.exceptions.windows(2).all(|w| {
            cmp_end(w[0].0.end(), Some(w[1].0.start())) != Ordering::Greater
                && !(w[0].0.end() == Some(w[1].0.start()) && w[0].1 == w[1].1)
        });
        let bounded = self.exceptions.iter().all(|(r, _)| r.end().is_some());
        let not_base = self.exceptions.iter().all(|(_, v)| *v != self.base);
        sorted_disjoint && bounded && not_base
    }

    /// A range whose vector is a non-empty marker: the "inside" test of `project` and
    /// `exclude`.
    fn indicator(range: &IdRange) -> Knowledge {
        let marker = ClockVector::from_pairs([(ReplicaId::from_u128(0), 1)]);
        let mut pieces: Vec<(&[u8], Option<&[u8]>, ClockVector)> = Vec::with_capacity(3);
        if !range.start().is_empty() {
            pieces.push((b"", Some(range.start()), ClockVector::new()));
        }
        pieces.push((range.start(), range.end(), marker));
        if let Some(end) = range.end() {
            pieces.push((end, None, ClockVector::new()));
        }
        Self::from_segments(pieces)
    }

    /// The full segmentation: exceptions with the gaps between them filled by the base.
    fn segments(&self) -> Vec<Segment<'_>> {
        let mut out = Vec::with_capacity(self.exceptions.len() * 2 + 1);
        let mut cursor: Option<&[u8]> = Some(b"");
        for (range, vector) in &self.exceptions {
            let Some(at) = cursor else { break };
            if at < range.start() {
                out.push(Segment {
                    start: at,
                    end: Some(range.start()),
                    vector: &self.base,
                });
            }
            out.push(Segment {
                start: range.start(),
                end: range.end(),
                vector,
            });
            cursor = range.end();
        }
        if let Some(at) = cursor {
            out.push(Segment {
                start: at,
                end: None,
                vector: &self.base,
            });
        }
        out
    }

    /// Builds canonical knowledge from a full, sorted segmentation of the id space
    /// (the first piece starts at the empty id, the last is unbounded).
    fn from_segments<'a>(
        pieces: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>, ClockVector)>,
    ) -> Knowledge {
        // Merge adjacent pieces with equal vectors first: the result is the unique
        // minimal segmentation, whose last piece gives the base.
        let mut merged: Vec<(&'a [u8], Option<&'a [u8]>, ClockVector)> = Vec::new();
        for (start, end, vector) in pieces {
            match merged.last_mut() {
                Some(last) if last.2 == vector => last.1 = end,
                _ => merged.push((start, end, vector)),
            }
        }
        let base = merged.last().map(|p| p.2.clone()).unwrap_or_default();
        let exceptions = merged
            .into_iter()
            .filter(|p| p.2 != base)
            .map(|(start, end, vector)| {
                (
                    IdRange {
                        start: start.to_vec(),
                        end: end.map(<[u8]>::to_vec),
                    },
                    vector,
                )
            })
            .collect();
        Knowledge { base, exceptions }
    }

    fn zip_with(
        &self,
        other: &Knowledge,
        f: impl Fn(&ClockVector, &ClockVector) -> ClockVector,
    ) -> Knowledge {
        let mut pieces = Vec::new();
        sweep(self, other, |start, end, a, b| {
            pieces.push((start, end, f(a, b)));
            true
        });
        let out = Self::from_segments(pieces);
        debug_assert!(out.is_well_formed());
        out
    }
}

/// Walks the common refinement of two segmentations, calling `visit(start, end, a, b)`
/// for each piece; stops early when `visit` returns false.
fn sweep<'a>(
    a: &'a Knowledge,
    b: &'a Knowledge,
    mut visit: impl FnMut(&'a [u8], Option<&'a [u8]>, &'a ClockVector, &'a ClockVector) -> bool,
) {
    let (sa, sb) = (a.segments(), b.segments());
    let (mut i, mut j) = (0, 0);
    let mut start: &'a [u8] = b"";
    loop {
        let (pa, pb) = (sa[i], sb[j]);
        let end = match cmp_end(pa.end, pb.end) {
            Ordering::Greater => pb.end,
            _ => pa.end,
        };
        if !visit(start, end, pa.vector, pb.vector) {
            return;
        }
        let Some(end) = end else { return };
        if pa.end == Some(end) {
            i += 1;
        }
        if pb.end == Some(end) {
            j += 1;
        }
        start = end;
    }
}

impl fmt::Debug for Knowledge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.base)?;
        for (range, vector) in &self.exceptions {
            write!(f, " {range:?}={vector:?}")?;
        }
        Ok(())
    }
}

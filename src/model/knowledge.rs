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

/// `(start, end, vector)`: a piece of a segmentation under construction.
type Piece<'a> = (&'a [u8], Option<&'a [u8]>, ClockVector);

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
        let after = self.exceptions.partition_point(|(r, _)| r.start() <= item);
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
        let mut pieces: Vec<Piece<'_>> = Vec::with_capacity(3);
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
    fn from_segments<'a>(pieces: impl IntoIterator<Item = Piece<'a>>) -> Knowledge {
        // Merge adjacent pieces with equal vectors first: the result is the unique
        // minimal segmentation, whose last piece gives the base.
        let mut merged: Vec<Piece<'a>> = Vec::new();
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

#[cfg(test)]
mod tests {
    //! The algebra laws of design.md, checked two ways: as `==` (semantic, because
    //! knowledge is canonical) and by probing `contains` at every id where a generated
    //! knowledge can change value. Range bounds come from a small pool (the empty id,
    //! 1–2 byte ids over `a..=d`, and each of those followed by a zero byte), and every
    //! pool member is a probe, so probing sees every segment: it is an exact check.

    use std::sync::OnceLock;

    use proptest::prelude::*;

    use super::*;
    use crate::model::{decode_knowledge, encode_knowledge};

    fn replica(n: u128) -> ReplicaId {
        ReplicaId::from_u128(n)
    }

    /// 1–2 byte ids over `a..=d`, sorted.
    fn alphabet_ids() -> &'static [Vec<u8>] {
        static IDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
        IDS.get_or_init(|| {
            let letters = b"abcd";
            let mut ids: Vec<Vec<u8>> = letters.iter().map(|&c| vec![c]).collect();
            for &x in letters {
                for &y in letters {
                    ids.push(vec![x, y]);
                }
            }
            ids.sort();
            ids
        })
    }

    /// Where generated ranges start and end: the empty id, the alphabet ids and their
    /// successors (so `IdRange::single` ranges line up with the pool).
    fn bound_pool() -> &'static [Vec<u8>] {
        static POOL: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
        POOL.get_or_init(|| {
            let mut pool = vec![Vec::new()];
            for id in alphabet_ids() {
                pool.push(id.clone());
                let mut next = id.clone();
                next.push(0);
                pool.push(next);
            }
            pool.sort();
            pool.dedup();
            pool
        })
    }

    /// Every bound (each starts a segment, so probing them all is exhaustive), the ids
    /// just past each bound, and a few ids beyond every range.
    fn probes() -> &'static [ItemId] {
        static PROBES: OnceLock<Vec<ItemId>> = OnceLock::new();
        PROBES.get_or_init(|| {
            let mut out: Vec<Vec<u8>> = Vec::new();
            for b in bound_pool() {
                out.push(b.clone());
                let mut past = b.clone();
                past.push(0);
                out.push(past);
            }
            out.extend([b"e".to_vec(), b"aaa".to_vec(), b"dd\xff".to_vec()]);
            out.sort();
            out.dedup();
            out.iter()
                .map(|b| ItemId::new(b).expect("short probe id"))
                .collect()
        })
    }

    /// Replicas 1–3 appear in generated vectors; 4 never does. Ticks go up to 5.
    fn probe_versions() -> impl Iterator<Item = Version> {
        (1..=4u128).flat_map(|r| (1..=6u64).map(move |t| Version::new(replica(r), t)))
    }

    /// `contains` at every probe id and version, in a fixed order.
    fn probe(k: &Knowledge) -> Vec<bool> {
        probes()
            .iter()
            .flat_map(|item| probe_versions().map(move |v| k.contains(item, v)))
            .collect()
    }

    fn zip_bools(a: &[bool], b: &[bool], f: impl Fn(bool, bool) -> bool) -> Vec<bool> {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }

    /// `a` contains at least what `b` contains, judged by probing alone.
    fn probe_dominates(a: &Knowledge, b: &Knowledge) -> bool {
        probe(a).iter().zip(probe(b)).all(|(&x, y)| x || !y)
    }

    fn tick() -> impl Strategy<Value = u64> {
        // Zero half the time so vectors repeat and often name only 2 replicas.
        prop_oneof![Just(0u64), 1u64..=5]
    }

    fn vector() -> impl Strategy<Value = ClockVector> {
        (tick(), tick(), tick()).prop_map(|(a, b, c)| {
            ClockVector::from_pairs([(replica(1), a), (replica(2), b), (replica(3), c)])
        })
    }

    /// A range from the pool bounds; a range of exactly one item goes through
    /// `IdRange::single`.
    fn range_between(start: &[u8], end: Option<&[u8]>) -> IdRange {
        match end {
            Some(e)
                if e.len() == start.len() + 1 && e.starts_with(start) && e.last() == Some(&0) =>
            {
                IdRange::single(&ItemId::new(start).expect("short id"))
            }
            _ => IdRange::new(start.to_vec(), end.map(<[u8]>::to_vec)).expect("non-empty range"),
        }
    }

    /// Input for `from_parts`: sorted, disjoint exceptions, often adjacent, sometimes
    /// carrying the base vector or equal vectors side by side, sometimes open-ended.
    fn raw_parts() -> impl Strategy<Value = (ClockVector, Vec<(IdRange, ClockVector)>)> {
        let pool_len = bound_pool().len();
        (
            vector(),
            prop::collection::btree_set(0..pool_len, 0..=7),
            prop::collection::vec(prop::option::weighted(0.7, vector()), 8),
            prop::option::of(vector()),
            any::<bool>(),
        )
            .prop_map(|(base, bounds, pieces, open_end, copy_base)| {
                let pool = bound_pool();
                let bounds: Vec<&[u8]> = bounds.into_iter().map(|i| pool[i].as_slice()).collect();
                let mut exceptions = Vec::new();
                for (n, pair) in bounds.windows(2).enumerate() {
                    if let Some(v) = &pieces[n] {
                        // Now and then an exception that repeats the base vector.
                        let v = if copy_base && n % 3 == 0 {
                            base.clone()
                        } else {
                            v.clone()
                        };
                        exceptions.push((range_between(pair[0], Some(pair[1])), v));
                    }
                }
                if let (Some(v), Some(last)) = (open_end, bounds.last()) {
                    exceptions.push((IdRange::from_start(last.to_vec()), v));
                }
                (base, exceptions)
            })
    }

    fn knowledge() -> impl Strategy<Value = Knowledge> {
        raw_parts().prop_map(|(base, exceptions)| {
            Knowledge::from_parts(base, exceptions)
                .expect("generated exceptions are sorted and disjoint")
        })
    }

    fn id_range() -> impl Strategy<Value = IdRange> {
        let pool_len = bound_pool().len();
        prop_oneof![
            Just(IdRange::all()),
            (0..pool_len).prop_map(|i| IdRange::from_start(bound_pool()[i].clone())),
            (0..pool_len, 0..pool_len).prop_filter_map("empty range", |(i, j)| {
                let (lo, hi) = (i.min(j), i.max(j));
                (lo < hi).then(|| range_between(&bound_pool()[lo], Some(&bound_pool()[hi])))
            }),
            item().prop_map(|i| IdRange::single(&i)),
        ]
    }

    fn item() -> impl Strategy<Value = ItemId> {
        (0..probes().len()).prop_map(|i| probes()[i].clone())
    }

    /// What `from_parts` input means, read directly: the exception holding `item`,
    /// else the base.
    fn reference_vector<'a>(
        base: &'a ClockVector,
        exceptions: &'a [(IdRange, ClockVector)],
        item: &[u8],
    ) -> &'a ClockVector {
        exceptions
            .iter()
            .find(|(r, _)| r.contains(item))
            .map_or(base, |(_, v)| v)
    }

    /// Splits every exception with an inner pool bound into two adjacent pieces with
    /// the same vector, and fills every gap with an exception equal to the base: the
    /// same function, written as uncompactly as possible.
    fn decompact(k: &Knowledge) -> Vec<(IdRange, ClockVector)> {
        let mut out = Vec::new();
        let mut cursor: Vec<u8> = Vec::new();
        for (range, vector) in k.exceptions() {
            if cursor.as_slice() < range.start() {
                out.push((
                    range_between(&cursor, Some(range.start())),
                    k.base().clone(),
                ));
            }
            let inner = bound_pool().iter().find(|b| {
                b.as_slice() > range.start() && range.end().is_none_or(|e| b.as_slice() < e)
            });
            match inner {
                Some(mid) => {
                    out.push((range_between(range.start(), Some(mid)), vector.clone()));
                    out.push((range_between(mid, range.end()), vector.clone()));
                }
                None => out.push((range.clone(), vector.clone())),
            }
            cursor = range
                .end()
                .expect("canonical exceptions are bounded")
                .to_vec();
        }
        // The tail, as an open-ended exception carrying the base.
        out.push((IdRange::from_start(cursor), k.base().clone()));
        out
    }

    proptest! {
        #[test]
        fn from_parts_means_what_its_input_says((base, exceptions) in raw_parts()) {
            let k = Knowledge::from_parts(base.clone(), exceptions.clone())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(k.is_well_formed(), "{k:?}");
            for p in probes() {
                prop_assert_eq!(
                    k.vector_for(p.as_bytes()),
                    reference_vector(&base, &exceptions, p.as_bytes()),
                    "item {:?} of {:?}", p, k
                );
            }
        }

        #[test]
        fn from_parts_of_a_non_compact_input_is_the_compact_value(k in knowledge()) {
            let loose = decompact(&k);
            let again = Knowledge::from_parts(k.base().clone(), loose.clone())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(again.is_well_formed());
            prop_assert_eq!(&again, &k, "from {:?}", loose);
            prop_assert_eq!(probe(&again), probe(&k));
            // Another base with everything covered by exceptions: the same function, so
            // the same canonical value.
            let other_base = k.base().max(&ClockVector::from_pairs([(replica(4), 1)]));
            let covered = Knowledge::from_parts(other_base, decompact(&k))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&covered, &k);
        }

        #[test]
        fn combine_is_commutative(a in knowledge(), b in knowledge()) {
            let (ab, ba) = (a.combine(&b), b.combine(&a));
            prop_assert!(ab.is_well_formed() && ba.is_well_formed());
            prop_assert_eq!(&ab, &ba);
            prop_assert_eq!(probe(&ab), probe(&ba));
        }

        #[test]
        fn combine_is_associative(a in knowledge(), b in knowledge(), c in knowledge()) {
            let left = a.combine(&b).combine(&c);
            let right = a.combine(&b.combine(&c));
            prop_assert!(left.is_well_formed() && right.is_well_formed());
            prop_assert_eq!(&left, &right);
            prop_assert_eq!(probe(&left), probe(&right));
        }

        #[test]
        fn combine_is_idempotent(a in knowledge()) {
            let aa = a.combine(&a);
            prop_assert!(aa.is_well_formed());
            prop_assert_eq!(&aa, &a);
            prop_assert_eq!(probe(&aa), probe(&a));
            prop_assert_eq!(a.combine(&Knowledge::new()), a.clone());
        }

        #[test]
        fn combine_contains_what_either_side_contains(a in knowledge(), b in knowledge()) {
            let ab = a.combine(&b);
            prop_assert!(ab.is_well_formed());
            prop_assert_eq!(probe(&ab), zip_bools(&probe(&a), &probe(&b), |x, y| x || y));
        }

        #[test]
        fn intersect_contains_what_both_sides_contain(a in knowledge(), b in knowledge()) {
            let both = a.intersect(&b);
            prop_assert!(both.is_well_formed());
            prop_assert_eq!(probe(&both), zip_bools(&probe(&a), &probe(&b), |x, y| x && y));
            prop_assert_eq!(&both, &b.intersect(&a));
            prop_assert_eq!(a.intersect(&a), a.clone());
        }

        #[test]
        fn project_keeps_exactly_the_inside(k in knowledge(), range in id_range()) {
            let inside = k.project(&range);
            prop_assert!(inside.is_well_formed(), "{inside:?}");
            for p in probes() {
                let expected = if range.contains(p.as_bytes()) {
                    k.vector_for(p.as_bytes()).clone()
                } else {
                    ClockVector::new()
                };
                prop_assert_eq!(inside.vector_for(p.as_bytes()), &expected, "item {:?}", p);
                for v in probe_versions() {
                    prop_assert_eq!(
                        inside.contains(p, v),
                        range.contains(p.as_bytes()) && k.contains(p, v)
                    );
                }
            }
            prop_assert!(k.contains_knowledge(&inside));
        }

        #[test]
        fn exclude_forgets_one_item_and_nothing_else(k in knowledge(), gone in item()) {
            let out = k.exclude(&gone);
            prop_assert!(out.is_well_formed(), "{out:?}");
            for p in probes() {
                for v in probe_versions() {
                    let expected = *p != gone && k.contains(p, v);
                    prop_assert_eq!(out.contains(p, v), expected, "item {:?} version {:?}", p, v);
                }
            }
            // Combined into a destination, the excluded item keeps the destination's vector.
            let destination = Knowledge::from_vector(ClockVector::from_pairs([(replica(4), 2)]));
            let merged = destination.combine(&out);
            prop_assert_eq!(merged.vector_for(gone.as_bytes()), destination.vector_for(gone.as_bytes()));
        }

        #[test]
        fn contains_knowledge_agrees_with_probing(a in knowledge(), b in knowledge()) {
            prop_assert_eq!(a.contains_knowledge(&b), probe_dominates(&a, &b));
            prop_assert_eq!(b.contains_knowledge(&a), probe_dominates(&b, &a));
        }

        #[test]
        fn contains_knowledge_is_a_partial_order(a in knowledge(), b in knowledge(), c in knowledge()) {
            prop_assert!(a.contains_knowledge(&a));
            prop_assert!(a.contains_knowledge(&Knowledge::new()));
            let ab = a.combine(&b);
            prop_assert!(ab.contains_knowledge(&a) && ab.contains_knowledge(&b));
            // Antisymmetric: mutual containment is equality, because `==` is semantic.
            if a.contains_knowledge(&b) && b.contains_knowledge(&a) {
                prop_assert_eq!(&a, &b);
            }
            let abc = ab.combine(&c);
            prop_assert!(abc.contains_knowledge(&ab) && ab.contains_knowledge(&a));
            prop_assert!(abc.contains_knowledge(&a), "transitivity");
            // The combination is the least upper bound.
            if c.contains_knowledge(&a) && c.contains_knowledge(&b) {
                prop_assert!(c.contains_knowledge(&ab));
            }
        }

        #[test]
        fn cut_and_set_replica_tick_act_on_one_replica(k in knowledge(), tick in 0u64..=5) {
            let r = replica(2);
            let cut = k.cut_replica(r, tick);
            let set = k.with_replica_tick(r, tick);
            prop_assert!(cut.is_well_formed() && set.is_well_formed());
            prop_assert!(k.contains_knowledge(&cut));
            prop_assert!(cut.max_tick(r) <= tick);
            for p in probes() {
                for v in probe_versions() {
                    let (k_has, cut_has, set_has) = (k.contains(p, v), cut.contains(p, v), set.contains(p, v));
                    if v.replica == r {
                        prop_assert_eq!(cut_has, k_has && v.tick <= tick);
                        prop_assert_eq!(set_has, v.tick <= tick);
                    } else {
                        prop_assert_eq!(cut_has, k_has);
                        prop_assert_eq!(set_has, k_has);
                    }
                }
            }
            let ticks: Vec<u64> = probes().iter().map(|p| k.vector_for(p.as_bytes()).get(r)).collect();
            prop_assert_eq!(k.max_tick(r), ticks.iter().copied().max().unwrap_or(0));
            prop_assert_eq!(k.min_tick(r), ticks.iter().copied().min().unwrap_or(0));
        }

        #[test]
        fn encoding_round_trips_exactly(k in knowledge()) {
            let bytes = encode_knowledge(&k);
            let back = decode_knowledge(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(back.is_well_formed());
            prop_assert_eq!(&back, &k);
            prop_assert_eq!(encode_knowledge(&back), bytes);
        }
    }
}

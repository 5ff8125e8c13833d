//! Hostile bytes (design.md): every decoder — change batches, knowledge, metadata
//! records — answers arbitrary, truncated and corrupted input with an error, never a
//! panic, and never allocates by a length it read. Valid encodings decode back to the
//! values they came from.
//!
//! The allocation bound is checked with a counting global allocator: the decoders run
//! under bincode's byte limit and serde's cautious preallocation, so a small input may
//! not make them hold more than a few MiB, whatever length prefixes it claims.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::TestResult;
use knit::{
    check_record, decode_batch, decode_knowledge, encode_batch, encode_knowledge, BatchMode,
    ChangeBatch, ChangeGroup, ChangeKind, ClockVector, Hlc, IdRange, ItemChange, ItemId, ItemMeta,
    Knowledge, ModelError, ReplicaId, SavedConflict, Version, MAX_ITEM_ID_LEN,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// Allocation accounting
// ---------------------------------------------------------------------------------------

/// Counts, per thread, the bytes live and the largest single request, on top of the
/// system allocator. Only this test binary uses it.
struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK_LIVE: Cell<usize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    // `try_with`: allocations during thread teardown find the slots gone; skip them.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + size;
        live.set(now);
        let _ = PEAK_LIVE.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Most memory a decoder may hold at once for an input of a few KiB: serde preallocates
/// at most 1 MiB per sequence, and the layouts nest a handful of sequences deep.
const DECODE_MEMORY_MAX: usize = 8 << 20;

/// Runs `f` and returns its result with the peak of the bytes it held at once.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK_LIVE.with(|p| p.set(start));
    let out = f();
    let peak = PEAK_LIVE.with(Cell::get).saturating_sub(start);
    (out, peak)
}

/// What one decoder made of some bytes.
#[derive(Debug)]
enum Decoded {
    Batch(Result<ChangeBatch, ModelError>),
    Knowledge(Result<Knowledge, ModelError>),
    Record(Result<(), String>),
}

impl Decoded {
    fn is_ok(&self) -> bool {
        match self {
            Self::Batch(r) => r.is_ok(),
            Self::Knowledge(r) => r.is_ok(),
            Self::Record(r) => r.is_ok(),
        }
    }
}

/// Feeds `bytes` to all three decoders, checking the memory bound and that whatever
/// decodes also survives a round trip. Returns the three answers.
fn decode_all(bytes: &[u8]) -> Result<[Decoded; 3], TestCaseError> {
    let (batch, peak) = measured(|| decode_batch(bytes));
    prop_assert!(
        peak <= DECODE_MEMORY_MAX,
        "decode_batch held {} bytes for {} input bytes",
        peak,
        bytes.len()
    );
    if let Ok(b) = &batch {
        let again = decode_batch(&encode_batch(b));
        prop_assert_eq!(again.as_ref(), Ok(b));
    }
    let (knowledge, peak) = measured(|| decode_knowledge(bytes));
    prop_assert!(
        peak <= DECODE_MEMORY_MAX,
        "decode_knowledge held {} bytes for {} input bytes",
        peak,
        bytes.len()
    );
    if let Ok(k) = &knowledge {
        prop_assert!(k.is_well_formed());
        let again = decode_knowledge(&encode_knowledge(k));
        prop_assert_eq!(again.as_ref(), Ok(k));
    }
    let (record, peak) = measured(|| check_record(bytes));
    prop_assert!(
        peak <= DECODE_MEMORY_MAX,
        "check_record held {} bytes for {} input bytes",
        peak,
        bytes.len()
    );
    if let Ok(meta) = ItemMeta::decode(bytes) {
        prop_assert!(record.is_ok());
        prop_assert_eq!(ItemMeta::decode(&meta.encode()), Ok(meta));
    }
    if let Ok((meta, data)) = ItemMeta::decode_with_data(bytes) {
        prop_assert!(record.is_ok());
        let again = meta.encode_with_data(data);
        prop_assert_eq!(ItemMeta::decode_with_data(&again), Ok((meta, data)));
    }
    if let Ok(conflict) = SavedConflict::decode(bytes) {
        prop_assert!(record.is_ok());
        prop_assert_eq!(SavedConflict::decode(&conflict.encode()), Ok(conflict));
    }
    Ok([
        Decoded::Batch(batch),
        Decoded::Knowledge(knowledge),
        Decoded::Record(record),
    ])
}

// ---------------------------------------------------------------------------------------
// A hand writer for the layouts of docs/format.md, to build bytes no encoder would make
// ---------------------------------------------------------------------------------------

/// Bincode 2 standard configuration, written out by hand.
#[derive(Default)]
struct W(Vec<u8>);

type Pairs<'a> = &'a [(u8, u64)];
/// An exception range as written: `(start, end, vector)`.
type Exception<'a> = (&'a [u8], Option<&'a [u8]>, Pairs<'a>);

impl W {
    fn header(kind: u8, format: u8) -> Self {
        Self(vec![kind, format])
    }
    fn varint(&mut self, n: u64) -> &mut Self {
        match n {
            0..=250 => self.0.push(n as u8),
            251..=0xFFFF => {
                self.0.push(251);
                self.0.extend_from_slice(&(n as u16).to_le_bytes());
            }
            0x1_0000..=0xFFFF_FFFF => {
                self.0.push(252);
                self.0.extend_from_slice(&(n as u32).to_le_bytes());
            }
            _ => {
                self.0.push(253);
                self.0.extend_from_slice(&n.to_le_bytes());
            }
        }
        self
    }
    fn bool(&mut self, b: bool) -> &mut Self {
        self.0.push(u8::from(b));
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }
    fn opt_bytes(&mut self, b: Option<&[u8]>) -> &mut Self {
        match b {
            None => self.bool(false),
            Some(b) => self.bool(true).bytes(b),
        }
    }
    /// `ReplicaId::from_u128(n)`: 15 zero bytes and `n`.
    fn replica(&mut self, n: u8) -> &mut Self {
        self.0.extend_from_slice(&[0; 15]);
        self.0.push(n);
        self
    }
    fn version(&mut self, replica: u8, tick: u64) -> &mut Self {
        self.replica(replica).varint(tick)
    }
    fn vector(&mut self, pairs: Pairs<'_>) -> &mut Self {
        self.varint(pairs.len() as u64);
        for &(r, t) in pairs {
            self.version(r, t);
        }
        self
    }
    fn knowledge(&mut self, base: Pairs<'_>, exceptions: &[Exception<'_>]) -> &mut Self {
        self.vector(base).varint(exceptions.len() as u64);
        for (start, end, v) in exceptions {
            self.bytes(start).opt_bytes(*end).vector(v);
        }
        self
    }
    /// One change: `(item, deleted, version (replica, tick), data)`; creation = version.
    fn change(
        &mut self,
        item: &[u8],
        deleted: bool,
        version: (u8, u64),
        data: Option<&[u8]>,
    ) -> &mut Self {
        self.bytes(item)
            .bool(deleted)
            .version(version.0, version.1)
            .version(version.0, version.1)
            .varint(7 << 16)
            .opt_bytes(data)
    }
    fn done(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// A batch from replica 1 made with `{1: 5}` for every item, one group over the whole id
/// space holding the changes `body` writes (`count` of them), then no present ids, no
/// excluded ids, normal mode, last.
fn hand_batch(count: u64, body: impl FnOnce(&mut W)) -> Vec<u8> {
    let mut w = W::header(b'B', 1);
    w.replica(1).knowledge(&[(1, 5)], &[]);
    w.varint(1).bytes(b"").opt_bytes(None).varint(count);
    body(&mut w);
    w.varint(0).varint(0).bool(false).bool(true);
    w.done()
}

fn replica(n: u128) -> ReplicaId {
    ReplicaId::from_u128(n)
}

fn item(s: &str) -> ItemId {
    ItemId::try_from(s).expect("short test id")
}

fn is_decode_error<T: std::fmt::Debug>(r: &Result<T, ModelError>) -> bool {
    matches!(r, Err(ModelError::Decode { .. }))
}

fn decode_reason<T>(r: Result<T, ModelError>) -> String {
    match r {
        Err(ModelError::Decode { reason, .. }) => reason,
        Err(other) => format!("not a decode error: {other}"),
        Ok(_) => "decoded".into(),
    }
}

// ---------------------------------------------------------------------------------------
// Valid values, to truncate and corrupt
// ---------------------------------------------------------------------------------------

fn alphabet() -> Vec<Vec<u8>> {
    let mut ids: Vec<Vec<u8>> = b"abcd".iter().map(|&c| vec![c]).collect();
    for &x in b"abcd" {
        for &y in b"abcd" {
            ids.push(vec![x, y]);
        }
    }
    ids.sort();
    ids
}

fn vector() -> impl Strategy<Value = ClockVector> {
    prop::collection::vec(prop_oneof![Just(0u64), 1u64..=5], 3).prop_map(|ticks| {
        ClockVector::from_pairs(ticks.into_iter().zip(1u128..).map(|(t, r)| (replica(r), t)))
    })
}

fn knowledge() -> impl Strategy<Value = Knowledge> {
    let ids = alphabet();
    (
        vector(),
        prop::collection::btree_set(0..ids.len(), 0..=6),
        prop::collection::vec(vector(), 6),
    )
        .prop_map(move |(base, bounds, vectors)| {
            let bounds: Vec<&Vec<u8>> = bounds.into_iter().map(|i| &ids[i]).collect();
            let exceptions = bounds
                .windows(2)
                .zip(vectors)
                .map(|(pair, v)| {
                    let range = IdRange::new(pair[0].clone(), Some(pair[1].clone()))
                        .expect("sorted bounds");
                    (range, v)
                })
                .collect();
            Knowledge::from_parts(base, exceptions).expect("sorted, disjoint exceptions")
        })
}

/// A valid batch: groups tiling the id space, changes at versions the made-with
/// knowledge contains, present and excluded ids, sometimes a full enumeration.
fn batch() -> impl Strategy<Value = ChangeBatch> {
    let ids = alphabet();
    let n = ids.len();
    (
        knowledge(),
        prop::collection::btree_set(1..n, 0..=3),
        prop::collection::vec(
            (
                0u8..3,
                any::<bool>(),
                0usize..3,
                prop::collection::vec(any::<u8>(), 0..6),
                any::<u64>(),
            ),
            n,
        ),
        prop::collection::btree_set(0..n, 0..=2),
        prop::option::of(knowledge()),
        any::<bool>(),
        1u128..=3,
    )
        .prop_map(
            move |(made_with, cuts, per_item, excluded, forgotten, is_last, source)| {
                // Group boundaries: "", the cut ids, open end.
                let mut bounds: Vec<Vec<u8>> = vec![Vec::new()];
                bounds.extend(cuts.into_iter().map(|i| ids[i].clone()));
                let mut groups = Vec::new();
                for (g, start) in bounds.iter().enumerate() {
                    let end = bounds.get(g + 1).cloned();
                    let range = IdRange::new(start.clone(), end).expect("sorted bounds");
                    let (mut changes, mut present) = (Vec::new(), Vec::new());
                    for (id, (role, deleted, which, data, timestamp)) in ids.iter().zip(&per_item) {
                        if !range.contains(id) {
                            continue;
                        }
                        let id = ItemId::new(id).expect("short id");
                        // A version the made-with knowledge contains: some replica's tick for
                        // this item, or none if the item's vector is empty.
                        let vector = made_with.vector_for(id.as_bytes());
                        let known: Vec<(ReplicaId, u64)> = vector.iter().collect();
                        match role {
                            0 => {}
                            1 => present.push(id),
                            _ if known.is_empty() => {}
                            _ => {
                                let (r, top) = known[which % known.len()];
                                let version = Version::new(r, 1 + (*timestamp % top));
                                changes.push(ItemChange {
                                    item: id,
                                    kind: if *deleted {
                                        ChangeKind::Delete
                                    } else {
                                        ChangeKind::Update
                                    },
                                    creation: Version::new(replica(1), 1),
                                    version,
                                    timestamp: Hlc(*timestamp),
                                    data: (!*deleted).then(|| data.clone()),
                                });
                            }
                        }
                    }
                    groups.push(
                        ChangeGroup::new(range, changes, present)
                            .expect("sorted ids inside the group"),
                    );
                }
                let excluded = excluded
                    .into_iter()
                    .map(|i| ItemId::new(&ids[i]).expect("short id"))
                    .collect();
                let mode = match forgotten {
                    None => BatchMode::Normal,
                    Some(f) => BatchMode::FullEnumeration {
                        forgotten: f.intersect(&made_with),
                    },
                };
                ChangeBatch::new(replica(source), made_with, groups, excluded, mode, is_last)
                    .expect("a valid batch")
            },
        )
}

fn item_meta() -> impl Strategy<Value = ItemMeta> {
    (
        1u128..=3,
        1u64..1000,
        1u128..=3,
        1u64..1000,
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(cr, ct, vr, vt, ts, deleted)| ItemMeta {
            creation: Version::new(replica(cr), ct),
            version: Version::new(replica(vr), vt),
            timestamp: Hlc(ts),
            deleted,
        })
}

fn saved_conflict() -> impl Strategy<Value = SavedConflict> {
    (
        1u128..=3,
        prop::sample::select(alphabet()),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        item_meta(),
        knowledge(),
    )
        .prop_map(|(source, id, data, meta, made_with)| SavedConflict {
            source: replica(source),
            remote: ItemChange {
                item: ItemId::new(&id).expect("short id"),
                kind: if data.is_some() {
                    ChangeKind::Update
                } else {
                    ChangeKind::Delete
                },
                creation: meta.creation,
                version: meta.version,
                timestamp: meta.timestamp,
                data,
            },
            made_with,
        })
}

/// Valid encodings of every kind, each tagged with the decoder that must accept it.
fn valid_encoding() -> impl Strategy<Value = (usize, Vec<u8>)> {
    prop_oneof![
        batch().prop_map(|b| (0, encode_batch(&b))),
        knowledge().prop_map(|k| (1, encode_knowledge(&k))),
        item_meta().prop_map(|m| (2, m.encode())),
        (item_meta(), prop::collection::vec(any::<u8>(), 0..8)).prop_map(|(m, data)| {
            // Only a live item carries its data in the record.
            let data = (!m.deleted).then_some(data);
            (2, m.encode_with_data(data.as_deref()))
        }),
        saved_conflict().prop_map(|c| (2, c.encode())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_are_refused_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes)?;
    }

    /// Random bytes rarely start with a valid header; these always do, so the bodies get
    /// decoded.
    #[test]
    fn arbitrary_bodies_behind_valid_headers_are_refused_without_panic(
        // ... and the metadata store's item pages ('G') and index pages ('J').
        kind in prop::sample::select(vec![b'B', b'K', b'R', b'C', b'I', b'X', b'P', b'G', b'J']),
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = vec![kind, 1];
        bytes.extend_from_slice(&body);
        decode_all(&bytes)?;
    }

    #[test]
    fn valid_encodings_decode_and_round_trip((decoder, bytes) in valid_encoding()) {
        let decoded = decode_all(&bytes)?;
        prop_assert!(decoded[decoder].is_ok(), "{:?}", decoded[decoder]);
    }

    #[test]
    fn batches_round_trip_exactly(b in batch()) {
        let bytes = encode_batch(&b);
        prop_assert_eq!(decode_batch(&bytes), Ok(b));
    }

    #[test]
    fn every_truncation_of_a_valid_encoding_is_refused((decoder, bytes) in valid_encoding()) {
        for len in 0..bytes.len() {
            let decoded = decode_all(&bytes[..len])?;
            prop_assert!(!decoded[decoder].is_ok(), "a {}-byte prefix of {} bytes decoded", len, bytes.len());
        }
    }

    #[test]
    fn corrupted_encodings_are_refused_or_decode_to_valid_values(
        (_, bytes) in valid_encoding(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut bytes = bytes;
        for (at, mask) in flips {
            let at = at.index(bytes.len());
            bytes[at] ^= mask;
        }
        // Whatever decodes is checked for a round trip inside.
        decode_all(&bytes)?;
    }
}

// ---------------------------------------------------------------------------------------
// Specific hostile inputs
// ---------------------------------------------------------------------------------------

#[test]
fn the_hand_writer_matches_the_encoders() -> TestResult {
    // The tests below build bytes by hand; make sure the hand writer speaks the format.
    let k = Knowledge::from_parts(
        ClockVector::from_pairs([(replica(1), 3), (replica(2), 300)]),
        vec![(
            IdRange::new(b"a".to_vec(), Some(b"c".to_vec()))?,
            ClockVector::from_pairs([(replica(1), 70_000)]),
        )],
    )?;
    let by_hand = W::header(b'K', 1)
        .knowledge(&[(1, 3), (2, 300)], &[(b"a", Some(b"c"), &[(1, 70_000)])])
        .done();
    assert_eq!(by_hand, encode_knowledge(&k));

    let change = ItemChange {
        item: item("x"),
        kind: ChangeKind::Update,
        creation: Version::new(replica(1), 2),
        version: Version::new(replica(1), 2),
        timestamp: Hlc(7 << 16),
        data: Some(b"hi".to_vec()),
    };
    let b = ChangeBatch::new(
        replica(1),
        Knowledge::from_vector(ClockVector::from_pairs([(replica(1), 5)])),
        vec![ChangeGroup::new(IdRange::all(), vec![change], vec![])?],
        vec![],
        BatchMode::Normal,
        true,
    )?;
    let by_hand = hand_batch(1, |w| {
        w.change(b"x", false, (1, 2), Some(b"hi"));
    });
    assert_eq!(by_hand, encode_batch(&b));
    assert_eq!(decode_batch(&by_hand)?, b);
    Ok(())
}

#[test]
fn length_prefixes_claiming_2_pow_60_elements_are_refused_without_allocating() -> TestResult {
    let huge = 1u64 << 60;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "knowledge base vector",
            W::header(b'K', 1).varint(huge).done(),
        ),
        (
            "knowledge exceptions",
            W::header(b'K', 1).vector(&[]).varint(huge).done(),
        ),
        (
            "knowledge range start",
            W::header(b'K', 1).vector(&[]).varint(1).varint(huge).done(),
        ),
        ("batch made-with", {
            let mut w = W::header(b'B', 1);
            w.replica(1).varint(huge);
            w.done()
        }),
        ("batch groups", {
            let mut w = W::header(b'B', 1);
            w.replica(1).knowledge(&[(1, 5)], &[]).varint(huge);
            w.done()
        }),
        ("batch changes", {
            let mut w = W::header(b'B', 1);
            w.replica(1)
                .knowledge(&[(1, 5)], &[])
                .varint(1)
                .bytes(b"")
                .opt_bytes(None)
                .varint(huge);
            w.done()
        }),
        (
            "batch item data",
            hand_batch(1, |w| {
                w.bytes(b"x")
                    .bool(false)
                    .version(1, 1)
                    .version(1, 1)
                    .varint(0)
                    .bool(true)
                    .varint(huge);
            }),
        ),
        (
            "batch item id",
            hand_batch(1, |w| {
                w.varint(huge);
            }),
        ),
        ("saved conflict item", {
            let mut w = W::header(b'X', 1);
            w.replica(1).varint(huge);
            w.done()
        }),
        (
            "knowledge record",
            W::header(b'K', 1).vector(&[]).varint(huge).done(),
        ),
    ];
    for (what, bytes) in cases {
        let (answers, peak) = measured(|| {
            (
                decode_batch(&bytes).is_ok(),
                decode_knowledge(&bytes).is_ok(),
                check_record(&bytes).is_ok(),
            )
        });
        assert_eq!(answers, (false, false, false), "{what}");
        assert!(peak <= DECODE_MEMORY_MAX, "{what}: held {peak} bytes");
    }
    // The same claim one step below the 64 MiB limit, for a byte string: refused for
    // want of bytes, still without holding 64 MiB.
    let below_limit = hand_batch(1, |w| {
        w.bytes(b"x")
            .bool(false)
            .version(1, 1)
            .version(1, 1)
            .varint(0)
            .bool(true)
            .varint((64 << 20) - 64);
    });
    let (result, peak) = measured(|| decode_batch(&below_limit));
    assert!(is_decode_error(&result), "{result:?}");
    assert!(peak <= DECODE_MEMORY_MAX, "held {peak} bytes");
    Ok(())
}

#[test]
fn a_wrong_format_version_is_named_as_such() -> TestResult {
    let mut k = encode_knowledge(&Knowledge::new());
    k[1] = 2;
    assert_eq!(
        decode_knowledge(&k),
        Err(ModelError::FormatVersion {
            what: "knowledge",
            found: 2,
            expected: 1
        })
    );
    let mut b = hand_batch(0, |_| {});
    decode_batch(&b)?;
    b[1] = 0;
    assert_eq!(
        decode_batch(&b),
        Err(ModelError::FormatVersion {
            what: "change batch",
            found: 0,
            expected: 1
        })
    );
    let mut meta = ItemMeta {
        creation: Version::new(replica(1), 1),
        version: Version::new(replica(1), 2),
        timestamp: Hlc(9),
        deleted: false,
    }
    .encode();
    check_record(&meta)?;
    meta[1] = 7;
    let reason = check_record(&meta).expect_err("format 7 is unknown");
    assert!(reason.contains("format 7"), "{reason}");
    Ok(())
}

#[test]
fn a_wrong_kind_byte_is_refused() -> TestResult {
    let k = encode_knowledge(&Knowledge::new());
    let b = hand_batch(0, |_| {});
    // Each is a valid encoding of the other decoder's kind.
    assert_eq!(decode_reason(decode_batch(&k)), "wrong kind byte");
    assert_eq!(decode_reason(decode_knowledge(&b)), "wrong kind byte");
    let mut unknown = k.clone();
    unknown[0] = b'Z';
    assert_eq!(decode_reason(decode_knowledge(&unknown)), "wrong kind byte");
    assert!(check_record(&unknown)
        .expect_err("no record kind Z")
        .contains("unknown record kind"));
    assert!(check_record(&[]).is_err());
    assert!(decode_knowledge(b"K").is_err());
    assert!(decode_batch(&[]).is_err());
    Ok(())
}

#[test]
fn trailing_bytes_are_refused() -> TestResult {
    let mut k = encode_knowledge(&Knowledge::new());
    let mut b = hand_batch(0, |_| {});
    let mut meta = ItemMeta {
        creation: Version::new(replica(1), 1),
        version: Version::new(replica(1), 1),
        timestamp: Hlc(1),
        deleted: true,
    }
    .encode();
    for bytes in [&mut k, &mut b, &mut meta] {
        bytes.push(0);
    }
    assert!(decode_reason(decode_knowledge(&k)).contains("trailing"));
    assert!(decode_reason(decode_batch(&b)).contains("trailing"));
    assert!(check_record(&meta)
        .expect_err("one byte too many")
        .contains("trailing"));
    Ok(())
}

#[test]
fn item_ids_longer_than_the_limit_are_refused() -> TestResult {
    let longest = vec![b'z'; MAX_ITEM_ID_LEN];
    let too_long = vec![b'z'; MAX_ITEM_ID_LEN + 1];
    // At the limit: accepted, as a change, a present id and an excluded id.
    let at_limit = |id: &[u8]| {
        let mut w = W::header(b'B', 1);
        w.replica(1).knowledge(&[(1, 5)], &[]);
        w.varint(1).bytes(b"").opt_bytes(None);
        w.varint(1).change(id, false, (1, 2), Some(b"v"));
        w.varint(1).bytes(id);
        w.varint(1).bytes(id);
        w.bool(false).bool(true);
        w.done()
    };
    let batch = decode_batch(&at_limit(&longest))?;
    assert_eq!(
        batch.changes().next().map(|c| c.item.as_bytes().len()),
        Some(MAX_ITEM_ID_LEN)
    );
    assert!(is_decode_error(&decode_batch(&at_limit(&too_long))));
    // Only the present id too long; only the excluded id too long.
    for field in 0..2 {
        let mut w = W::header(b'B', 1);
        w.replica(1).knowledge(&[(1, 5)], &[]);
        w.varint(1).bytes(b"").opt_bytes(None).varint(0);
        w.varint(1)
            .bytes(if field == 0 { &too_long } else { &longest });
        w.varint(1)
            .bytes(if field == 1 { &too_long } else { &longest });
        w.bool(false).bool(true);
        let bytes = w.done();
        assert!(is_decode_error(&decode_batch(&bytes)), "field {field}");
    }
    // Knowledge range bounds may be one byte longer than an id (an id's successor), not two.
    let bound = |len: usize| {
        let mut end = vec![b'z'; len];
        end[len - 1] = 0;
        W::header(b'K', 1)
            .knowledge(&[], &[(b"", Some(&end), &[(1, 1)])])
            .done()
    };
    decode_knowledge(&bound(MAX_ITEM_ID_LEN + 1))?;
    assert!(is_decode_error(&decode_knowledge(&bound(
        MAX_ITEM_ID_LEN + 2
    ))));
    // A saved conflict record with an id one byte too long.
    let conflict = |id: &[u8]| {
        let mut w = W::header(b'X', 1);
        w.replica(2)
            .bytes(id)
            .bool(false)
            .version(1, 1)
            .version(1, 2)
            .varint(5)
            .opt_bytes(Some(b"d"));
        w.knowledge(&[(1, 2)], &[]);
        w.done()
    };
    check_record(&conflict(&longest))?;
    assert!(check_record(&conflict(&too_long)).is_err());
    assert!(ItemId::new(&too_long).is_err());
    Ok(())
}

#[test]
fn malformed_knowledge_is_refused() -> TestResult {
    let v: Pairs<'_> = &[(1, 1)];
    let refused: Vec<(&str, Vec<u8>)> = vec![
        (
            "overlapping ranges",
            W::header(b'K', 1)
                .knowledge(&[], &[(b"a", Some(b"c"), v), (b"b", Some(b"d"), &[(2, 1)])])
                .done(),
        ),
        (
            "ranges out of order",
            W::header(b'K', 1)
                .knowledge(&[], &[(b"c", Some(b"d"), v), (b"a", Some(b"b"), &[(2, 1)])])
                .done(),
        ),
        (
            "an open range before another",
            W::header(b'K', 1)
                .knowledge(&[], &[(b"a", None, v), (b"b", Some(b"c"), &[(2, 1)])])
                .done(),
        ),
        (
            "an empty range",
            W::header(b'K', 1)
                .knowledge(&[], &[(b"b", Some(b"b"), v)])
                .done(),
        ),
        (
            "a reversed range",
            W::header(b'K', 1)
                .knowledge(&[], &[(b"c", Some(b"b"), v)])
                .done(),
        ),
        (
            "a zero tick",
            W::header(b'K', 1).knowledge(&[(1, 0)], &[]).done(),
        ),
        (
            "replicas out of order",
            W::header(b'K', 1).knowledge(&[(2, 1), (1, 1)], &[]).done(),
        ),
        (
            "a replica named twice",
            W::header(b'K', 1).knowledge(&[(1, 1), (1, 2)], &[]).done(),
        ),
        ("a bool that is 2", {
            let mut bytes = W::header(b'K', 1)
                .knowledge(&[], &[(b"a", Some(b"b"), v)])
                .done();
            // The Option tag of the range end.
            let at = bytes.len() - 1 - 17 - 1 - 1 - 1;
            assert_eq!(bytes[at], 1);
            bytes[at] = 2;
            bytes
        }),
    ];
    for (what, bytes) in refused {
        let result = decode_knowledge(&bytes);
        assert!(is_decode_error(&result), "{what}: {result:?}");
        assert!(
            check_record(&bytes).is_err(),
            "{what} as a knowledge record"
        );
    }
    // Sorted, disjoint, but not compact: accepted and brought to canonical form.
    let loose = W::header(b'K', 1)
        .knowledge(
            &[(1, 1)],
            &[
                (b"a", Some(b"b"), &[(2, 1)]),
                (b"b", Some(b"c"), &[(2, 1)]),
                (b"d", Some(b"e"), &[(1, 1)]),
            ],
        )
        .done();
    let k = decode_knowledge(&loose)?;
    assert!(k.is_well_formed());
    assert_eq!(k.exception_count(), 1);
    assert_eq!(
        k.exceptions()[0].0,
        IdRange::new(b"a".to_vec(), Some(b"c".to_vec()))?
    );
    Ok(())
}

#[test]
fn a_change_outside_its_made_with_knowledge_is_refused() -> TestResult {
    // Made with {1: 5}; the change claims tick 6 of replica 1, then a tick of replica 2.
    for version in [(1, 6), (2, 1)] {
        let bytes = hand_batch(1, |w| {
            w.change(b"x", false, version, Some(b"v"));
        });
        assert!(
            matches!(decode_batch(&bytes), Err(ModelError::InvalidBatch(_))),
            "{version:?}"
        );
    }
    let inside = hand_batch(1, |w| {
        w.change(b"x", false, (1, 5), Some(b"v"));
    });
    decode_batch(&inside)?;
    // The same through the constructor.
    let change = ItemChange {
        item: item("x"),
        kind: ChangeKind::Update,
        creation: Version::new(replica(1), 6),
        version: Version::new(replica(1), 6),
        timestamp: Hlc(1),
        data: Some(b"v".to_vec()),
    };
    let made_with = Knowledge::from_vector(ClockVector::from_pairs([(replica(1), 5)]));
    let group = ChangeGroup::new(IdRange::all(), vec![change], vec![])?;
    assert!(ChangeBatch::new(
        replica(1),
        made_with,
        vec![group],
        vec![],
        BatchMode::Normal,
        true
    )
    .is_err());
    Ok(())
}

#[test]
fn an_update_without_data_or_a_delete_with_data_is_refused() -> TestResult {
    let update_without = hand_batch(1, |w| {
        w.change(b"x", false, (1, 2), None);
    });
    let delete_with = hand_batch(1, |w| {
        w.change(b"x", true, (1, 2), Some(b"v"));
    });
    for bytes in [&update_without, &delete_with] {
        assert!(matches!(
            decode_batch(bytes),
            Err(ModelError::InvalidBatch(_))
        ));
    }
    // An empty value is data: accepted.
    decode_batch(&hand_batch(1, |w| {
        w.change(b"x", false, (1, 2), Some(b""));
    }))?;
    // The same rule for saved conflict records.
    let conflict = |deleted: bool, data: Option<&[u8]>| {
        let mut w = W::header(b'X', 1);
        w.replica(2)
            .bytes(b"x")
            .bool(deleted)
            .version(1, 1)
            .version(1, 2)
            .varint(5)
            .opt_bytes(data);
        w.knowledge(&[(1, 2)], &[]);
        w.done()
    };
    check_record(&conflict(false, Some(b"d")))?;
    check_record(&conflict(true, None))?;
    assert!(check_record(&conflict(false, None)).is_err());
    assert!(check_record(&conflict(true, Some(b"d"))).is_err());
    Ok(())
}

#[test]
fn malformed_batch_structure_is_refused() -> TestResult {
    let group = |w: &mut W, start: &[u8], end: Option<&[u8]>, ids: &[&[u8]]| {
        w.bytes(start).opt_bytes(end).varint(ids.len() as u64);
        for id in ids {
            w.change(id, false, (1, 1), Some(b"v"));
        }
        w.varint(0);
    };
    let batch = |groups: &dyn Fn(&mut W), excluded: &[&[u8]]| {
        let mut w = W::header(b'B', 1);
        w.replica(1).knowledge(&[(1, 5)], &[]);
        groups(&mut w);
        w.varint(excluded.len() as u64);
        for e in excluded {
            w.bytes(e);
        }
        w.opt_bytes(None).bool(true).done()
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "changes out of order",
            batch(
                &|w| {
                    w.varint(1);
                    group(w, b"", None, &[b"b", b"a"]);
                },
                &[],
            ),
        ),
        (
            "a change repeated",
            batch(
                &|w| {
                    w.varint(1);
                    group(w, b"", None, &[b"a", b"a"]);
                },
                &[],
            ),
        ),
        (
            "a change outside its group",
            batch(
                &|w| {
                    w.varint(1);
                    group(w, b"a", Some(b"b"), &[b"c"]);
                },
                &[],
            ),
        ),
        (
            "overlapping groups",
            batch(
                &|w| {
                    w.varint(2);
                    group(w, b"", Some(b"c"), &[]);
                    group(w, b"b", None, &[]);
                },
                &[],
            ),
        ),
        (
            "an unbounded group before another",
            batch(
                &|w| {
                    w.varint(2);
                    group(w, b"", None, &[]);
                    group(w, b"b", None, &[]);
                },
                &[],
            ),
        ),
        (
            "an empty group range",
            batch(
                &|w| {
                    w.varint(1);
                    group(w, b"b", Some(b"a"), &[]);
                },
                &[],
            ),
        ),
        (
            "an excluded id outside every group",
            batch(
                &|w| {
                    w.varint(1);
                    group(w, b"a", Some(b"b"), &[]);
                },
                &[b"q"],
            ),
        ),
        (
            "a version with tick 0",
            hand_batch(1, |w| {
                w.change(b"a", false, (1, 0), Some(b"v"));
            }),
        ),
    ];
    for (what, bytes) in cases {
        let result = decode_batch(&bytes);
        assert!(
            matches!(
                result,
                Err(ModelError::InvalidBatch(_) | ModelError::Decode { .. })
            ),
            "{what}: {result:?}"
        );
    }
    // Full enumeration with forgotten knowledge the batch's made-with does not contain.
    let mut w = W::header(b'B', 1);
    w.replica(1).knowledge(&[(1, 5)], &[]);
    w.varint(1).bytes(b"").opt_bytes(None).varint(0).varint(0);
    w.varint(0).bool(true).knowledge(&[(2, 1)], &[]).bool(true);
    let bytes = w.done();
    assert!(matches!(
        decode_batch(&bytes),
        Err(ModelError::InvalidBatch(_))
    ));
    Ok(())
}

#[test]
fn records_with_tick_zero_or_bad_fields_are_refused() -> TestResult {
    // Item record: creation, version, timestamp, deleted, data_len, then the data tail.
    let meta = |creation_tick: u64, deleted: u8, data_len: Option<u64>, tail: &[u8]| {
        let mut w = W::header(b'I', 1);
        w.version(1, creation_tick).version(1, 3).varint(5);
        w.0.push(deleted);
        match data_len {
            None => w.bool(false),
            Some(n) => w.bool(true).varint(n),
        };
        w.0.extend_from_slice(tail);
        w.done()
    };
    check_record(&meta(1, 0, None, b""))?;
    check_record(&meta(1, 1, None, b""))?;
    assert!(check_record(&meta(0, 0, None, b"")).is_err(), "tick 0");
    assert!(
        check_record(&meta(1, 2, None, b"")).is_err(),
        "a bool that is 2"
    );
    let with_data = meta(1, 0, Some(3), b"abc");
    let (_, data) = ItemMeta::decode_with_data(&with_data)?;
    assert_eq!(data, Some(&b"abc"[..]));
    let refused = [
        ("a tail longer than announced", meta(1, 0, Some(2), b"abc")),
        ("a tail shorter than announced", meta(1, 0, Some(4), b"abc")),
        ("a tail without a length", meta(1, 0, None, b"abc")),
        ("a tombstone with data", meta(1, 1, Some(3), b"abc")),
        ("a length of 2^60", meta(1, 0, Some(1 << 60), b"abc")),
    ];
    for (what, bytes) in refused {
        let (result, peak) = measured(|| check_record(&bytes));
        assert!(result.is_err(), "{what}");
        assert!(ItemMeta::decode_with_data(&bytes).is_err(), "{what}");
        assert!(peak <= DECODE_MEMORY_MAX, "{what}: held {peak} bytes");
    }
    // Clock (tick, hlc, last sync tick, epoch), replica and peer records.
    check_record(
        &W::header(b'C', 1)
            .varint(3)
            .varint(1 << 40)
            .varint(2)
            .varint(1)
            .done(),
    )?;
    assert!(check_record(&W::header(b'C', 1).varint(3).varint(4).varint(2).done()).is_err());
    check_record(&W::header(b'R', 1).varint(1).replica(9).done())?;
    assert!(check_record(&W::header(b'R', 1).varint(1).done()).is_err());
    check_record(&W::header(b'P', 1).varint(7).done())?;
    assert!(check_record(&W::header(b'P', 1).done()).is_err());
    assert!(check_record(&W::header(b'P', 1).varint(7).varint(0).done()).is_err());
    Ok(())
}

#[test]
fn the_allocation_counter_sees_allocations() -> TestResult {
    // The memory bound above means something only if the counter counts.
    let (v, peak) = measured(|| vec![1u8; DECODE_MEMORY_MAX + 1]);
    assert!(peak > DECODE_MEMORY_MAX, "counted {peak} bytes");
    drop(v);
    let (_, peak) = measured(|| ());
    assert!(peak < 1024, "counted {peak} bytes for nothing");
    Ok(())
}

//! The metadata store against a reference model, and damaged stores.
//!
//! Random operations (put, delete, reopen, tombstone cleanup) run on a replica with a
//! tiny key space and on a `BTreeMap` that says what must be there (sled and redb test
//! their trees the same way). After every operation the replica must agree with the
//! model on items, tombstones, versions, ticks, the change index and knowledge, and a
//! reopen must change nothing.
//!
//! Then the damage cases: a store must refuse with an error that names the folder and
//! the record, never panic, never create a store where there was none, never hang.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use knit::{
    ClockVector, Hlc, ItemId, ItemMeta, Knowledge, MetadataError, Replica, ReplicaId, StoreError,
    Version, STORE_FORMAT,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const KEYS: u8 = 4;
/// The key space of the page test: several item pages' worth (a page holds 64 items).
const WIDE_KEYS: u8 = 250;

#[derive(Clone, Debug)]
enum Op {
    Put(u8, u8),
    Delete(u8),
    /// Put `n` keys from `k` on, upwards or downwards (key numbers wrap), one commit each:
    /// pages fill, split, and take ids below their first one.
    PutRun {
        k: u8,
        n: u8,
        v: u8,
        down: bool,
    },
    /// Delete `n` keys from `k` upwards.
    DeleteRun(u8, u8),
    /// Close the replica and open it again, as a new process would.
    Reopen,
    /// Remove every tombstone (cleanup with age 0).
    Gc,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 0..3u8).prop_map(|(k, v)| Op::Put(k, v)),
        3 => (0..KEYS).prop_map(Op::Delete),
        1 => Just(Op::Reopen),
        1 => Just(Op::Gc),
    ]
}

/// Operations over `WIDE_KEYS` keys in long runs, so that pages split and empty.
fn wide_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..WIDE_KEYS, 1..150u8, 0..3u8, any::<bool>())
            .prop_map(|(k, n, v, down)| Op::PutRun { k, n, v, down }),
        2 => (0..WIDE_KEYS, 1..150u8).prop_map(|(k, n)| Op::DeleteRun(k, n)),
        2 => (0..WIDE_KEYS, 0..3u8).prop_map(|(k, v)| Op::Put(k, v)),
        1 => Just(Op::Reopen),
        1 => Just(Op::Gc),
    ]
}

fn key(k: u8) -> ItemId {
    id(&format!("key{k:03}"))
}

fn value(v: u8) -> Vec<u8> {
    format!("value {v}").into_bytes()
}

/// What the model says about one item.
#[derive(Clone, Debug)]
struct Entry {
    /// `None`: a tombstone.
    value: Option<Vec<u8>>,
    version_tick: u64,
    creation_tick: u64,
}

/// The reference: items and tombstones, and the replica's tick.
#[derive(Default)]
struct Model {
    items: BTreeMap<ItemId, Entry>,
    tick: u64,
}

/// Everything a reopen must preserve.
#[derive(Debug, PartialEq)]
struct Image {
    id: ReplicaId,
    tick: u64,
    last_hlc: Hlc,
    knowledge: Knowledge,
    forgotten: Knowledge,
    items: Vec<(ItemId, Vec<u8>)>,
    metas: Vec<(ItemId, ItemMeta)>,
}

fn image(r: &Replica) -> Result<Image, StoreError> {
    Ok(Image {
        id: r.id(),
        tick: r.tick(),
        last_hlc: r.metadata().last_hlc(),
        knowledge: r.knowledge(),
        forgotten: r.forgotten().clone(),
        items: r.items()?,
        metas: r.item_metas()?,
    })
}

fn open(path: &Path, clock: &std::sync::Arc<ManualClock>) -> Result<Replica, StoreError> {
    let mut r = Replica::open(path)?;
    r.set_clock(clock.clone());
    Ok(r)
}

type CaseResult = Result<(), TestCaseError>;

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// The replica agrees with the model.
fn check(r: &Replica, model: &Model) -> CaseResult {
    let me = r.id();
    prop_assert_eq!(r.tick(), model.tick);

    let live: Vec<(ItemId, Vec<u8>)> = model
        .items
        .iter()
        .filter_map(|(k, e)| e.value.clone().map(|v| (k.clone(), v)))
        .collect();
    prop_assert_eq!(r.items().map_err(fail)?, live);
    let keys = (0..KEYS).map(key).chain(model.items.keys().cloned());
    for k in keys {
        let expected = model.items.get(&k).and_then(|e| e.value.clone());
        prop_assert_eq!(r.get(&k).map_err(fail)?, expected, "get {}", k);
    }
    // Listing from any key starts exactly there, wherever that key's page begins.
    if let Some(k) = model.items.keys().nth(model.items.len() / 2) {
        let from: Vec<ItemId> = r
            .metadata()
            .items_from(k.as_bytes())
            .map(|e| e.map(|(id, _)| id))
            .collect::<Result<_, _>>()
            .map_err(fail)?;
        let expected: Vec<ItemId> = model
            .items
            .range(k.clone()..)
            .map(|(k, _)| k.clone())
            .collect();
        prop_assert_eq!(from, expected);
    }

    // Every item and tombstone the model holds, at exactly the model's versions. (The
    // timestamps come from the clock; below, they must follow the ticks.)
    let metas = r.item_metas().map_err(fail)?;
    let expected: Vec<(ItemId, ItemMeta)> = model
        .items
        .iter()
        .map(|(k, e)| {
            let meta = r.item_meta(k).ok().flatten();
            let timestamp = meta.map_or(Hlc(0), |m| m.timestamp);
            let meta = ItemMeta {
                creation: Version::new(me, e.creation_tick),
                version: Version::new(me, e.version_tick),
                timestamp,
                deleted: e.value.is_none(),
            };
            (k.clone(), meta)
        })
        .collect();
    prop_assert_eq!(&metas, &expected);
    let mut versions: Vec<Version> = metas.iter().map(|(_, m)| m.version).collect();
    versions.sort_unstable();
    versions.dedup();
    prop_assert_eq!(versions.len(), metas.len(), "two items share a version");
    let mut stamps: Vec<(u64, Hlc)> = metas
        .iter()
        .map(|(_, m)| (m.version.tick, m.timestamp))
        .collect();
    stamps.sort_unstable();
    prop_assert!(
        stamps.windows(2).all(|w| w[0].1 < w[1].1),
        "a later tick must carry a later timestamp: {:?}",
        stamps
    );

    // The index holds one entry per item and none above the tick.
    let ids: Vec<ItemId> = metas.iter().map(|(k, _)| k.clone()).collect();
    prop_assert_eq!(
        r.metadata()
            .changes_unknown_to(&Knowledge::new())
            .map_err(fail)?,
        ids
    );
    let up_to_tick = Knowledge::from_vector(ClockVector::from_pairs([(me, model.tick)]));
    prop_assert!(r
        .metadata()
        .changes_unknown_to(&up_to_tick)
        .map_err(fail)?
        .is_empty());

    // A replica knows all its own changes, and forgotten knowledge stays inside knowledge.
    let knowledge = r.knowledge();
    prop_assert_eq!(knowledge.max_tick(me), model.tick);
    for (k, meta) in &metas {
        prop_assert!(knowledge.contains(k, meta.version));
    }
    prop_assert!(knowledge.contains_knowledge(r.forgotten()));
    Ok(())
}

fn put(r: &mut Replica, model: &mut Model, k: u8, v: u8) -> CaseResult {
    let version = r.put(&key(k), &value(v)).map_err(fail)?;
    model.tick += 1;
    prop_assert_eq!(version, Version::new(r.id(), model.tick));
    let creation_tick = match model.items.get(&key(k)) {
        Some(Entry {
            value: Some(_),
            creation_tick,
            ..
        }) => *creation_tick,
        // A put after a delete starts a new life of the item.
        _ => model.tick,
    };
    model.items.insert(
        key(k),
        Entry {
            value: Some(value(v)),
            version_tick: model.tick,
            creation_tick,
        },
    );
    Ok(())
}

fn delete(r: &mut Replica, model: &mut Model, k: u8) -> CaseResult {
    let deleted = r.delete(&key(k)).map_err(fail)?;
    match model.items.get_mut(&key(k)) {
        Some(entry) if entry.value.is_some() => {
            model.tick += 1;
            prop_assert_eq!(deleted, Some(Version::new(r.id(), model.tick)));
            entry.value = None;
            entry.version_tick = model.tick;
        }
        // Deleting what is not there takes no tick and leaves no trace.
        _ => prop_assert_eq!(deleted, None),
    }
    Ok(())
}

/// Runs `ops`; a commit rewrites a page once it changes `fold` of its items or index
/// entries (1: every commit writes pages; large: every record stays loose).
fn run_case(ops: &[Op], fold: usize) -> CaseResult {
    let dir = tempfile::tempdir().map_err(fail)?;
    let path = dir.path().join("r");
    let clock = ManualClock::starting_at(1_000_000);
    let mut r = Replica::create(&path).map_err(fail)?;
    r.set_clock(clock.clone());
    r.set_fold_threshold(fold);
    let mut model = Model::default();
    // Versions of cleaned-up tombstones: forgotten knowledge must contain them.
    let mut cleaned: Vec<(ItemId, Version)> = Vec::new();
    for op in ops {
        match *op {
            Op::Put(k, v) => put(&mut r, &mut model, k, v)?,
            Op::Delete(k) => delete(&mut r, &mut model, k)?,
            Op::PutRun { k, n, v, down } => {
                for i in 0..n {
                    let k = if down {
                        k.wrapping_sub(i) % WIDE_KEYS
                    } else {
                        k.wrapping_add(i) % WIDE_KEYS
                    };
                    put(&mut r, &mut model, k, v)?;
                }
            }
            Op::DeleteRun(k, n) => {
                for i in 0..n {
                    delete(&mut r, &mut model, k.wrapping_add(i) % WIDE_KEYS)?;
                }
            }
            Op::Reopen => {
                let before = image(&r).map_err(fail)?;
                drop(r);
                // Opening right after closing must work. sled 0.34 releases its file lock
                // from background threads a moment after the handle is dropped (sled
                // issue #1289), so an `InUse` here means `MetadataStore::open` does not
                // wait for that moment.
                r = open(&path, &clock).map_err(fail)?;
                r.set_fold_threshold(fold);
                prop_assert_eq!(image(&r).map_err(fail)?, before);
            }
            Op::Gc => {
                let tombstones: Vec<(ItemId, Version)> = model
                    .items
                    .iter()
                    .filter(|(_, e)| e.value.is_none())
                    .map(|(k, e)| (k.clone(), Version::new(r.id(), e.version_tick)))
                    .collect();
                let report = r.collect_garbage(0).map_err(fail)?;
                prop_assert_eq!(report.tombstones_removed, tombstones.len() as u64);
                model.items.retain(|_, e| e.value.is_some());
                cleaned.extend(tombstones);
            }
        }
        check(&r, &model)?;
        for (k, version) in &cleaned {
            // Unless the key lives again, its cleaned version stays forgotten.
            prop_assert!(r.forgotten().contains(k, *version));
        }
    }
    Ok(())
}

#[test]
fn metadata_store_agrees_with_a_reference_model() -> TestResult {
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(proptest::collection::vec(op(), 1..40), 1..4usize),
            |(ops, fold)| run_case(&ops, fold),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn metadata_store_agrees_with_the_model_while_pages_split_and_empty() -> TestResult {
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(proptest::collection::vec(wide_op(), 1..16), 1..4usize),
            |(ops, fold)| run_case(&ops, fold),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Overwrites one raw record of a closed replica.
fn overwrite_record(path: &Path, key: &[u8], bytes: &[u8]) -> TestResult {
    let r = Replica::open(path)?;
    let tree = r.metadata().raw_tree().ok_or("a sled store")?;
    tree.insert(key, bytes)?;
    tree.flush()?;
    Ok(())
}

fn read_record(path: &Path, key: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let r = Replica::open(path)?;
    let bytes = r
        .metadata()
        .raw_tree()
        .ok_or("a sled store")?
        .get(key)?
        .ok_or("record missing")?;
    Ok(bytes.to_vec())
}

const REPLICA_KEY: &[u8] = &[0x01];

/// A new replica in `path` whose replica record went through `damage`; returns the
/// error of opening it.
fn open_with_damaged_replica_record(
    path: &Path,
    damage: impl Fn(&mut Vec<u8>),
) -> Result<StoreError, Box<dyn std::error::Error>> {
    drop(Replica::create(path)?);
    let mut record = read_record(path, REPLICA_KEY)?;
    // `[kind 'R', record format 1, store_format as a one-byte varint, id ...]`.
    assert_eq!(record[..3], [b'R', 1, u8::try_from(STORE_FORMAT)?]);
    damage(&mut record);
    overwrite_record(path, REPLICA_KEY, &record)?;
    Ok(Replica::open(path).err().ok_or("a damaged store opened")?)
}

#[test]
fn a_replica_record_of_another_format_is_refused_by_name() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("newer");
    let err = open_with_damaged_replica_record(&path, |r| r[2] += 1)?;
    match &err {
        StoreError::Metadata(MetadataError::FormatVersion {
            path: at,
            found,
            expected,
        }) => assert_eq!(
            (at.as_path(), *found, *expected),
            (path.as_path(), STORE_FORMAT + 1, STORE_FORMAT)
        ),
        other => panic!("expected FormatVersion, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    // A wrong kind byte, a wrong record format byte, a cut record: damaged, by name.
    type Damage = fn(&mut Vec<u8>);
    let cases: [(&str, Damage); 4] = [
        ("kind", |r| r[0] = b'X'),
        ("record format", |r| r[1] = 9),
        ("cut", |r| r.truncate(5)),
        ("trailing bytes", |r| r.push(0)),
    ];
    for (case, damage) in cases {
        let path = dir.path().join(case);
        let err = open_with_damaged_replica_record(&path, damage)?;
        match &err {
            StoreError::Metadata(MetadataError::Damaged { path: at, key, .. }) => {
                assert_eq!(
                    (at.as_path(), key.as_str()),
                    (path.as_path(), "replica"),
                    "{case}"
                )
            }
            other => panic!("{case}: expected Damaged, got {other:?}"),
        }
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{case}: {err}"
        );
    }
    Ok(())
}

#[test]
fn a_damaged_item_record_is_an_error_that_names_the_item() -> TestResult {
    for paged in [false, true] {
        damaged_item_record_case(paged)?;
    }
    Ok(())
}

/// Puts a damaged record of `x` back where it came from (alone, or inside its page).
type Rewrap = Box<dyn Fn(&[u8]) -> Vec<u8>>;

/// One item of two damaged in every way, kept as a loose record or inside a page.
fn damaged_item_record_case(paged: bool) -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("r");
    {
        let mut r = Replica::create(&path)?;
        if paged {
            r.set_fold_threshold(1);
        }
        r.put(&id("x"), b"ex")?;
        r.put(&id("y"), b"why")?;
    }
    // Loose, `x`'s record is under `10 ‖ "x"`. Paged, both items live in the first item
    // page (key `20`): `'G' 01`, a count, then `(id, record)` byte strings
    // (docs/format.md), all lengths here one byte.
    let (key, record, wrap): (Vec<u8>, Vec<u8>, Rewrap) = if paged {
        let page = read_record(&path, &[0x20])?;
        assert_eq!(page[..5], [b'G', 1, 2, 1, b'x']);
        let record_len = usize::from(page[5]);
        let record = page[6..6 + record_len].to_vec();
        let rest = page[6 + record_len..].to_vec();
        let wrap = move |record: &[u8]| {
            let mut page = vec![b'G', 1, 2, 1, b'x', record.len() as u8];
            page.extend_from_slice(record);
            page.extend_from_slice(&rest);
            page
        };
        assert_eq!(wrap(&record), page);
        (vec![0x20], record, Box::new(wrap))
    } else {
        let key = vec![0x10, b'x'];
        let record = read_record(&path, &key)?;
        (key, record, Box::new(|record: &[u8]| record.to_vec()))
    };
    // `[kind 'I', record format 1, creation replica (16 bytes), creation tick, ...]`.
    assert_eq!((record[0], record[1], record[18]), (b'I', 1, 1));
    let mut wrong_kind = record.clone();
    wrong_kind[0] = b'K';
    let mut wrong_format = record.clone();
    wrong_format[1] = 9;
    let mut tick_zero = record.clone();
    tick_zero[18] = 0;
    let mut trailing = record.clone();
    trailing.push(0);
    let cases = [
        ("kind", wrong_kind),
        ("record format", wrong_format),
        ("tick zero", tick_zero),
        ("trailing bytes", trailing),
        ("cut", record[..10].to_vec()),
        ("empty", Vec::new()),
    ];
    for (case, bytes) in cases {
        overwrite_record(&path, &key, &wrap(&bytes))?;
        // Item records are read when asked for, so the replica opens; the damaged item
        // is an error wherever it is read, and the other item is still there.
        let r = Replica::open(&path)?;
        let is_damaged_x = |e: &StoreError| {
            matches!(e, StoreError::Metadata(MetadataError::Damaged { path: at, key, .. })
                if at == &path && key.contains("\"x\""))
        };
        let err = r
            .item_meta(&id("x"))
            .err()
            .ok_or(format!("{case}: read a damaged record"))?;
        assert!(is_damaged_x(&err), "{case}: {err:?}");
        assert!(err.to_string().contains("item \"x\""), "{case}: {err}");
        let err = r
            .get(&id("x"))
            .err()
            .ok_or(format!("{case}: got a damaged item"))?;
        assert!(is_damaged_x(&err), "{case}: {err:?}");
        let err = r
            .items()
            .err()
            .ok_or(format!("{case}: listed a damaged item"))?;
        assert!(is_damaged_x(&err), "{case}: {err:?}");
        assert_eq!(r.get(&id("y"))?, Some(b"why".to_vec()), "{case}");
    }
    Ok(())
}

#[test]
fn opening_a_folder_without_a_replica_creates_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    let missing = dir.path().join("missing");
    for path in [&empty, &missing] {
        let err = Replica::open(path)
            .err()
            .ok_or("opened a replica that does not exist")?;
        assert!(
            matches!(&err, StoreError::Metadata(MetadataError::NotAReplica { path: at }) if at == path),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
    assert_eq!(
        std::fs::read_dir(&empty)?.count(),
        0,
        "open must not create sled files"
    );
    assert!(!missing.exists(), "open must not create the folder");
    Ok(())
}

#[test]
fn opening_a_replica_that_is_already_open_is_refused_not_awaited() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("r");
    let mut first = Replica::create(&path)?;
    first.put(&id("x"), b"ex")?;

    // Opened on another thread with a generous watchdog: a hang fails the test instead
    // of stalling the suite.
    let (done, outcome) = mpsc::channel();
    let second = path.clone();
    std::thread::spawn(move || {
        let _ = done.send(Replica::open(&second).map(drop));
    });
    let result = outcome
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| "opening a replica in use hung")?;
    let err = result.err().ok_or("a replica in use opened twice")?;
    assert!(
        matches!(&err, StoreError::Metadata(MetadataError::InUse { path: at }) if at == &path),
        "{err:?}"
    );
    assert!(err.to_string().contains("in use"), "{err}");
    let err = Replica::create(&path)
        .err()
        .ok_or("created a replica over another")?;
    assert!(matches!(err, StoreError::Metadata(_)), "{err:?}");

    // The first handle is unharmed, and the replica opens once it is closed.
    first.put(&id("y"), b"why")?;
    let before = (first.id(), first.tick(), first.items()?);
    drop(first);
    let again = Replica::open(&path)?;
    assert_eq!((again.id(), again.tick(), again.items()?), before);
    Ok(())
}

/// An entry of a page: `(id, record)`, or `([tick], id)` for an index page.
type PageEntry = (Vec<u8>, Vec<u8>);

/// Reads the `(bytes, bytes)` or `(tick, bytes)` entries of a page whose lengths, counts
/// and ticks are all below 251 (one-byte varints; see docs/format.md).
fn small_page_entries(page: &[u8]) -> Result<Vec<PageEntry>, String> {
    let byte = |at: usize| -> Result<usize, String> {
        let b = *page.get(at).ok_or("page cut short")?;
        if b >= 251 {
            return Err("a varint of more than one byte".into());
        }
        Ok(usize::from(b))
    };
    let mut out = Vec::new();
    let mut at = 3;
    for _ in 0..byte(2)? {
        let (head, next) = if page[0] == b'J' {
            (
                vec![u8::try_from(byte(at)?).map_err(|e| e.to_string())?],
                at + 1,
            )
        } else {
            let len = byte(at)?;
            (page[at + 1..at + 1 + len].to_vec(), at + 1 + len)
        };
        let len = byte(next)?;
        out.push((head, page[next + 1..next + 1 + len].to_vec()));
        at = next + 1 + len;
    }
    Ok(out)
}

#[test]
fn a_store_of_format_1_opens_upgraded_with_everything_in_it() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("r");
    let before = {
        // Pages first, then loose records that shadow some of their entries.
        let mut r = Replica::create(&path)?;
        r.set_fold_threshold(1);
        for k in 0..150u8 {
            r.put(&key(k), &value(k % 3))?;
        }
        r.set_fold_threshold(8);
        for k in (0..150u8).step_by(7) {
            r.delete(&key(k))?;
        }
        image(&r)?
    };
    // Rewrite the store as format 1 had it: a record per item under `10 ‖ id`, an
    // entry per version under `11 ‖ replica ‖ tick (big-endian)`.
    {
        let r = Replica::open(&path)?;
        let tree = r.metadata().raw_tree().ok_or("a sled store")?;
        let mut items = 0;
        for entry in tree.iter() {
            let (k, v) = entry?;
            match k.first() {
                Some(0x20) => {
                    for (id, record) in small_page_entries(&v)? {
                        // A loose record is the item's record; the entry is stale.
                        let loose = [&[0x10][..], &id].concat();
                        if !tree.contains_key(&loose)? {
                            tree.insert(loose, record)?;
                        }
                        items += 1;
                    }
                }
                Some(0x21) => {
                    for (tick, id) in small_page_entries(&v)? {
                        let tick = u64::from(tick[0]).to_be_bytes();
                        tree.insert([&[0x11][..], &k[1..17], &tick].concat(), id)?;
                    }
                }
                _ => continue,
            }
            tree.remove(k)?;
        }
        assert_eq!(items, 150);
        let mut replica_record = tree.get(REPLICA_KEY)?.ok_or("replica record")?.to_vec();
        assert_eq!(replica_record[2], u8::try_from(STORE_FORMAT)?);
        replica_record[2] = 1;
        tree.insert(REPLICA_KEY, replica_record)?;
        tree.flush()?;
    }
    let r = Replica::open(&path)?;
    assert_eq!(image(&r)?, before);
    let tree = r.metadata().raw_tree().ok_or("a sled store")?;
    // Format 1's records are this format's loose records: they stay where they are.
    assert_eq!(tree.scan_prefix([0x10]).count(), 150);
    assert_eq!(tree.scan_prefix([0x20]).count(), 0);
    assert_eq!(tree.get(REPLICA_KEY)?.ok_or("replica record")?[2], 2);
    assert_eq!(
        r.metadata().changes_unknown_to(&Knowledge::new())?.len(),
        150
    );
    Ok(())
}

#[test]
fn sorted_lookups_read_ahead_past_a_page_with_many_loose_records() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut r = Replica::create(&dir.path().join("r"))?;
    let mut expected: BTreeMap<ItemId, Vec<u8>> = BTreeMap::new();
    let mut put = |r: &mut Replica, k: u8, v: u8| -> TestResult {
        r.put(&key(k), &value(v))?;
        expected.insert(key(k), value(v));
        Ok(())
    };
    // Pages for 0..100, then 150 loose records: 100..250 all in the last page's range,
    // and every third of 0..100 again, shadowing its page entry.
    r.set_fold_threshold(1);
    for k in 0..100 {
        put(&mut r, k, 0)?;
    }
    r.set_fold_threshold(8);
    for k in 100..250 {
        put(&mut r, k, 1)?;
    }
    for k in (0..100).step_by(3) {
        put(&mut r, k, 2)?;
    }
    // Ascending lookups, as a batch makes them, then descending, then one of every
    // five: each must see the item's record, never a stale page entry or nothing.
    let ascending: Vec<u8> = (0..=250).collect();
    let descending: Vec<u8> = (0..=250).rev().collect();
    let sparse: Vec<u8> = (0..=250).step_by(5).collect();
    for order in [ascending, descending, sparse] {
        for k in order {
            assert_eq!(r.get(&key(k))?, expected.get(&key(k)).cloned(), "key {k}");
        }
    }
    Ok(())
}

#[test]
fn sorted_lookups_in_a_store_without_pages_read_ahead_and_see_every_record() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut r = Replica::create(&dir.path().join("r"))?;
    // Single puts never fold a page: every record is loose, and no page exists.
    let mut expected: BTreeMap<ItemId, Vec<u8>> = BTreeMap::new();
    for k in (0..250).step_by(2) {
        r.put(&key(k), &value(1))?;
        expected.insert(key(k), value(1));
    }
    let ascending: Vec<u8> = (0..=250).collect();
    let descending: Vec<u8> = (0..=250).rev().collect();
    let sparse: Vec<u8> = (0..=250).step_by(5).collect();
    for order in [&ascending, &descending, &sparse] {
        for &k in order {
            assert_eq!(r.get(&key(k))?, expected.get(&key(k)).cloned(), "key {k}");
        }
    }
    // A put between two lookups of a run: what was read ahead is gone with the commit.
    for &k in &ascending {
        if k % 10 == 5 {
            r.put(&key(k + 1), &value(2))?;
            expected.insert(key(k + 1), value(2));
        }
        assert_eq!(r.get(&key(k))?, expected.get(&key(k)).cloned(), "key {k}");
    }
    Ok(())
}

#[test]
fn a_commit_that_keeps_data_is_read_back_as_written_not_as_it_was() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("r");
    {
        let mut r = Replica::create(&path)?;
        r.set_fold_threshold(1);
        for k in 0..10 {
            r.put(&key(k), &value(k))?;
        }
    }
    // New versions for two paged items, their data kept: building the commit reads the
    // stored records (two lookups in one page, so the store reads ahead), and what it
    // read ahead must not outlive the commit.
    let mut store = knit::MetadataStore::open(&path)?;
    let mut commit = store.begin();
    let mut written = Vec::new();
    for k in [3, 4] {
        let old = store.item(&key(k))?.ok_or("stored")?;
        let (version, timestamp) = commit.next_version(2_000_000_000_000);
        let new = ItemMeta {
            version,
            timestamp,
            ..old
        };
        commit.put_item(&key(k), &new, Some(&old));
        written.push((k, new));
    }
    store.commit(commit)?;
    for (k, new) in written {
        assert_eq!(store.item(&key(k))?, Some(new), "key {k}");
        assert_eq!(
            store.data(&key(k))?,
            Some(value(k)),
            "key {k} kept its data"
        );
    }
    Ok(())
}

#[test]
fn pending_marks_are_one_record_per_commit_and_clearing_keeps_the_rest() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("r");
    {
        let mut store = knit::MetadataStore::create(&path)?;
        for rows in [&[&b"a"[..], b"b", b"c"][..], &[b"c", b"d"], &[b"e"]] {
            let mut commit = store.begin();
            for row in rows {
                commit.mark_pending(row);
            }
            store.commit(commit)?;
        }
        let tree = store.raw_tree().ok_or("a sled store")?;
        assert_eq!(tree.scan_prefix([0x17]).count(), 3, "one set per commit");
        // A marker the way earlier builds wrote it, one record per row.
        tree.insert([&[0x15][..], b"f"].concat(), &[][..])?;
        store.flush()?;
    }
    let mut store = knit::MetadataStore::open(&path)?;
    let all: Vec<&[u8]> = vec![b"a", b"b", b"c", b"d", b"e", b"f"];
    assert_eq!(store.pending()?, all, "in order, each once");

    // Clearing c, e and f: the first two sets lose c, the third goes, f's record goes.
    let mut commit = store.begin();
    for row in [&b"c"[..], b"e", b"f"] {
        commit.clear_pending(row);
    }
    store.commit(commit)?;
    drop(store);
    let store = knit::MetadataStore::open(&path)?;
    assert_eq!(store.pending()?, [&b"a"[..], b"b", b"d"]);
    let tree = store.raw_tree().ok_or("a sled store")?;
    assert_eq!(tree.scan_prefix([0x17]).count(), 2);
    assert_eq!(tree.scan_prefix([0x15]).count(), 0);
    drop(store);

    // A damaged set is an error that says what it is, not a row list read wrong.
    {
        let store = knit::MetadataStore::open(&path)?;
        let tree = store.raw_tree().ok_or("a sled store")?;
        let (key, _) = tree.scan_prefix([0x17]).next().ok_or("a set")??;
        tree.insert(key, &b"M\x01\xff\xff"[..])?;
        tree.flush()?;
    }
    let err = knit::MetadataStore::open(&path)?
        .pending()
        .expect_err("damaged");
    assert!(err.to_string().contains("pending-apply set"), "{err}");
    Ok(())
}

#[test]
fn records_with_a_prefix_are_the_same_from_memory_and_from_a_scan() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut r = Replica::create(&dir.path().join("r"))?;
    let id = |s: &str| ItemId::new(s.as_bytes());
    // Rows "r<n>." with a few units each; pages for the first half, loose records
    // for the rest and for some units of the first half (shadowing page entries).
    r.set_fold_threshold(1);
    let names: Vec<String> = (0..40).map(|n| format!("r{n}.")).collect();
    let mut batch = Vec::new();
    for (n, row) in names.iter().enumerate().take(20) {
        batch.push((id(row)?, Some(vec![b'e'])));
        for unit in 0..n % 4 {
            batch.push((id(&format!("{row}{unit}"))?, Some(vec![b'p'])));
        }
    }
    batch.sort_by(|a, b| a.0.cmp(&b.0));
    r.apply_local(&batch)?;
    r.set_fold_threshold(8);
    for (n, row) in names.iter().enumerate() {
        if n >= 20 {
            r.put(&id(row)?, b"e")?;
        }
        if n % 3 == 0 {
            r.put(&id(&format!("{row}9"))?, b"l")?;
        }
    }
    r.delete(&id("r5.")?)?;
    // Each item of a row with its data (none for a tombstone).
    type Records = Vec<(ItemId, Vec<u8>)>;
    let expected = |row: &str| -> Result<Records, StoreError> {
        Ok(r.item_metas()?
            .into_iter()
            .filter(|(i, _)| i.as_bytes().starts_with(row.as_bytes()))
            .map(|(i, m)| {
                let data = if m.deleted {
                    Vec::new()
                } else {
                    r.get(&i).ok().flatten().unwrap_or_default()
                };
                (i, data)
            })
            .collect())
    };
    let read = |row: &str| -> Result<Records, Box<dyn std::error::Error>> {
        Ok(r.metadata()
            .records_with_prefix(&id(row)?)?
            .into_iter()
            .map(|(i, (_, data))| (i, data.unwrap_or_default()))
            .collect())
    };
    // In order, as a batch reads them (from memory after the first few), then every
    // third one cold (by a scan): the same records either way.
    for row in names.iter().chain(names.iter().step_by(3).rev()) {
        let want = expected(row)?;
        assert!(!want.is_empty() || row == "r5.", "{row}");
        assert_eq!(read(row)?, want, "row {row}");
    }
    Ok(())
}

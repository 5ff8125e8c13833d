//! Crash safety: a process killed with SIGKILL in the middle of a sync, or in the middle
//! of a run of local writes, must leave a store that the next process opens and finds
//! consistent.
//!
//! The story these tests guard against (design.md, "Torn batches" and "Reused ticks"):
//! a destination that keeps an item's data without its metadata, or learns a batch's
//! knowledge without its items, never asks for those items again, and a replica that
//! loses a tick it stamped on a change hands the same `(replica, tick)` out twice, so
//! peers skip the second change as already known. Both lose data silently. sled's own
//! crash tests kill the process at random points and check what recovery left; so do we.
//!
//! How the child process runs, without the CLI: the parent re-executes this very test
//! binary (`std::env::current_exe()`) with `--exact crash_child --nocapture` and the
//! environment variables `KNIT_CRASH_CHILD=<folder>` and `KNIT_CRASH_MODE=<mode>`.
//! libtest then runs only the test function `crash_child`, which does the child's work
//! and prints its progress on stdout for the parent to read. In an ordinary test run the
//! variable is unset and `crash_child` returns at once: it is an entry point for the
//! child, not a test of its own.
//!
//! Kill points come from a fixed-seed xorshift, and are placed by the child's own
//! progress reports ("after n batches", "after tick t") plus a few hundred microseconds
//! to a few milliseconds more, so they land inside batches and inside flushes however
//! fast or slow the machine is. No assertion depends on timing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use knit::{
    run_session, BatchOutcome, ChangeBatch, ChangeDestination, ClockVector, ConflictPolicy,
    Direction, ItemId, ItemMeta, Knowledge, NoObserver, PeerInfo, Progress, Replica, ReplicaId,
    SessionOptions, StoreError, SyncError, SyncObserver, SyncProvider, SystemClock, Version,
};

const CHILD_DIR: &str = "KNIT_CRASH_CHILD";
const CHILD_MODE: &str = "KNIT_CRASH_MODE";
/// Every line the child reports starts with this marker; libtest's own output around it
/// is ignored.
const MARK: &str = "KNIT-CRASH";

/// Items at A for the sync crash test, and the batch size of its sessions: 60 batches,
/// enough for kill points before, inside and after the sync.
const SYNC_ITEMS: usize = 3000;
const SYNC_BATCH: usize = 50;
const SYNC_ROUNDS: usize = 10;

/// Keys written cyclically by the local-write child, and how often it flushes.
const WRITE_KEYS: u64 = 500;
const WRITE_FLUSH_EVERY: u64 = 100;
const WRITE_ROUNDS: usize = 8;

/// A deterministic pseudo-random sequence (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn sync_item(i: usize) -> ItemId {
    id(&format!("item{i:05}"))
}

/// About 100 bytes, different for every item.
fn sync_value(i: usize) -> Vec<u8> {
    format!("value of item {i:05} ").repeat(5).into_bytes()
}

fn write_key(put: u64) -> ItemId {
    id(&format!("key{:03}", put % WRITE_KEYS))
}

fn write_value(put: u64) -> Vec<u8> {
    format!("written by put {put:07} ").repeat(4).into_bytes()
}

/// The child's entry point (see the module comment). Does nothing in a normal run.
#[test]
fn crash_child() -> TestResult {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    match std::env::var(CHILD_MODE)?.as_str() {
        "sync" => child_sync(&dir, false),
        "sync-flush-each-batch" => child_sync(&dir, true),
        "writes" => child_writes(&dir),
        other => Err(format!("unknown child mode {other:?}").into()),
    }
}

/// Prints the number of batches committed so far.
struct ReportProgress;

impl SyncObserver for ReportProgress {
    fn progress(&mut self, progress: &Progress) {
        println!("{MARK} {}", progress.batches_done);
    }
}

/// A destination that flushes after every batch it commits, so every batch the child
/// reports is on disk: the parent then knows a lower bound of what B must hold.
struct FlushEachBatch(Replica);

impl SyncProvider for FlushEachBatch {
    fn replica_id(&self) -> ReplicaId {
        self.0.id()
    }

    fn fetch_info(&mut self) -> Result<PeerInfo, SyncError> {
        self.0.fetch_info()
    }

    fn begin_session(&mut self, peer: &PeerInfo) -> Result<(), SyncError> {
        self.0.begin_session(peer)
    }

    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError> {
        self.0.note_peer_epoch(peer, epoch)
    }

    fn end_session(&mut self, completed: bool) -> Result<(), SyncError> {
        self.0.end_session(completed)
    }
}

impl ChangeDestination for FlushEachBatch {
    fn process_batch(
        &mut self,
        batch: ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError> {
        let outcome = self.0.process_batch(batch, policy, observer)?;
        match self.0.flush() {
            Ok(()) => Ok(outcome),
            Err(StoreError::Metadata(e)) => Err(SyncError::Metadata(e)),
            Err(e) => Err(SyncError::InvalidOptions(format!("flush failed: {e}"))),
        }
    }
}

fn sync_options() -> SessionOptions {
    SessionOptions {
        direction: Direction::Upload,
        batch_size: SYNC_BATCH,
        ..SessionOptions::default()
    }
}

/// Child: sync A→B, then report "done".
fn child_sync(dir: &Path, flush_each_batch: bool) -> TestResult {
    let mut a = Replica::open(&dir.join("A"))?;
    let b = Replica::open(&dir.join("B"))?;
    println!("{MARK} 0");
    let mut observer = ReportProgress;
    if flush_each_batch {
        let mut destination = FlushEachBatch(b);
        run_session(
            &mut a,
            &mut destination,
            &sync_options(),
            &mut observer,
            &SystemClock,
        )?;
    } else {
        let mut b = b;
        a.sync_with(&mut b, &sync_options(), &mut observer)?;
    }
    println!("{MARK} done");
    Ok(())
}

/// Child: put after put on A, following a pattern fixed by the tick (put number `i`
/// takes tick `i + 1` and writes `write_value(i)` under `write_key(i)`), so the parent
/// can compute what every tick must leave behind. Reports each flushed tick.
fn child_writes(dir: &Path) -> TestResult {
    let mut a = Replica::open(&dir.join("A"))?;
    loop {
        let put = a.tick();
        a.put(&write_key(put), &write_value(put))?;
        if (put + 1) % WRITE_FLUSH_EVERY == 0 {
            a.flush()?;
            println!("{MARK} {}", put + 1);
        }
    }
}

/// What the child last reported before the parent killed it.
#[derive(Debug, Default)]
struct Reported {
    /// The highest number the child reported.
    progress: u64,
    /// The child finished on its own before the kill point.
    finished: bool,
    /// A report that was not a number.
    garbled: Option<String>,
}

/// Spawns the child, waits until it reports `target` (or ends), waits `extra_micros`
/// more, kills it with SIGKILL and reaps it.
fn run_child_and_kill(
    dir: &Path,
    mode: &str,
    target: u64,
    extra_micros: u64,
) -> Result<Reported, Box<dyn std::error::Error>> {
    let mut child: Child = Command::new(std::env::current_exe()?)
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("child stdout")?;
    // A thread reads the child's stdout to its end, so the child never dies of a broken
    // pipe (and unwinds, flushing its stores) instead of the SIGKILL.
    let (lines, reports) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // libtest may print "test crash_child ... " on the same line as the marker.
            if let Some(at) = line.find(MARK) {
                let _ = lines.send(line[at + MARK.len()..].trim().to_string());
            }
        }
    });
    let mut reported = Reported::default();
    let mut reached = false;
    for word in reports.iter() {
        if word == "done" {
            reported.finished = true;
            break;
        }
        let Ok(progress) = word.parse() else {
            reported.garbled = Some(word);
            break;
        };
        reported.progress = progress;
        if progress >= target {
            reached = true;
            break;
        }
    }
    if reached {
        std::thread::sleep(Duration::from_micros(extra_micros));
    }
    // SIGKILL on Unix (a no-op if the child has exited meanwhile). Only a child that
    // reported "done" is left to exit by itself, so none outlives a failed test.
    if !reported.finished {
        child.kill()?;
    }
    let status = child.wait()?;
    reader.join().map_err(|_| "stdout reader panicked")?;
    if let Some(word) = reported.garbled {
        return Err(format!("crash child ({mode}) reported {word:?}").into());
    }
    if !reached && (!reported.finished || !status.success()) {
        return Err(format!("crash child ({mode}) ended on its own: {status}").into());
    }
    Ok(reported)
}

/// A's state, which no crash of a sync from A may change.
struct SourceState {
    id: ReplicaId,
    tick: u64,
    metas: Vec<(ItemId, ItemMeta)>,
    items: Vec<(ItemId, Vec<u8>)>,
}

impl SourceState {
    fn read(a: &Replica) -> Result<Self, StoreError> {
        Ok(Self {
            id: a.id(),
            tick: a.tick(),
            metas: a.item_metas()?,
            items: a.items()?,
        })
    }
}

/// Opens A and B after a kill and checks the crash image. Returns how many items B holds.
fn check_sync_crash_image(
    dir: &Path,
    source: &SourceState,
    held_before: usize,
) -> Result<usize, Box<dyn std::error::Error>> {
    let a = Replica::open(&dir.join("A"))?;
    assert_eq!(a.id(), source.id);
    assert_eq!(
        a.tick(),
        source.tick,
        "a sync must not change its source's tick"
    );
    assert_eq!(
        a.item_metas()?,
        source.metas,
        "a sync must not change its source's metadata"
    );
    assert_eq!(
        a.items()?,
        source.items,
        "a sync must not change its source's items"
    );
    drop(a);

    let b = Replica::open(&dir.join("B"))?;
    assert_eq!(
        b.tick(),
        0,
        "an applied change must never count as a local change of B"
    );
    let metas = b.item_metas()?;
    let items = b.items()?;
    let held = metas.len();
    // Batches travel in id order and commit whole, and sled recovers a prefix of the
    // commits: B holds exactly the first `held` items of A, at A's versions and values.
    assert_eq!(
        metas.as_slice(),
        &source.metas[..held],
        "B must hold a prefix of A's items, as A has them"
    );
    assert_eq!(
        items.as_slice(),
        &source.items[..held],
        "B's values must be A's"
    );
    assert!(
        held >= held_before,
        "B lost committed items: {held} < {held_before}"
    );
    // Knowledge and items moved together: B knows exactly the versions it holds.
    let knowledge = b.knowledge();
    for (i, (item, meta)) in source.metas.iter().enumerate() {
        assert_eq!(
            knowledge.contains(item, meta.version),
            i < held,
            "B's knowledge of {item} disagrees with what B holds ({held} items)"
        );
    }
    assert!(knowledge.max_tick(source.id) <= source.tick);
    // One index entry per item, no more: the index moved with the metadata.
    let indexed = b.metadata().changes_unknown_to(&Knowledge::new())?;
    let ids: Vec<ItemId> = metas.iter().map(|(item, _)| item.clone()).collect();
    assert_eq!(indexed, ids, "B's change index must hold exactly its items");
    let summary = b.status()?.summary;
    assert_eq!((summary.tombstones, summary.saved_conflicts), (0, 0));
    Ok(held)
}

#[test]
fn sync_killed_at_random_points_leaves_whole_batches() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a_path, b_path) = (dir.path().join("A"), dir.path().join("B"));
    let source = {
        let mut a = Replica::create(&a_path)?;
        for i in 0..SYNC_ITEMS {
            a.put(&sync_item(i), &sync_value(i))?;
        }
        a.flush()?;
        drop(Replica::create(&b_path)?);
        SourceState::read(&a)?
    };
    assert_eq!(
        (source.tick, source.items.len()),
        (SYNC_ITEMS as u64, SYNC_ITEMS)
    );

    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (mut before, mut partial, mut after) = (0, 0, 0);
    let mut held = 0usize;
    for round in 0..SYNC_ROUNDS {
        // Even rounds flush B after every batch, so the batches the child reports are a
        // lower bound of what B must hold; odd rounds run the engine exactly as a user
        // would, where sled's background flusher decides what reaches the disk.
        let flush_each_batch = round % 2 == 0;
        let mode = if flush_each_batch {
            "sync-flush-each-batch"
        } else {
            "sync"
        };
        let remaining = (SYNC_ITEMS - held).div_ceil(SYNC_BATCH) as u64;
        // Round 0 kills right after the child opened both replicas (at the start of the
        // session); later rounds after a random number of batches.
        let target = if round == 0 {
            0
        } else {
            rng.below(remaining / 2 + 2)
        };
        let extra_micros = rng.below(5000);
        let reported = run_child_and_kill(dir.path(), mode, target, extra_micros)?;
        let held_before = held;
        held = check_sync_crash_image(dir.path(), &source, held_before)?;
        if flush_each_batch {
            let durable = (held_before + reported.progress as usize * SYNC_BATCH).min(SYNC_ITEMS);
            assert!(
                held >= durable,
                "round {round}: {} batches were flushed but B holds {held} items",
                reported.progress
            );
        }
        if reported.finished {
            assert_eq!(held, SYNC_ITEMS, "a sync that finished must have filled B");
        }
        match held {
            0 => before += 1,
            n if n == SYNC_ITEMS => after += 1,
            _ => partial += 1,
        }
        println!(
            "round {round} ({mode}): kill after {} batches (+{extra_micros} µs), B holds {held} of {SYNC_ITEMS} items",
            reported.progress
        );
    }
    println!("kills with B empty: {before}, partially filled: {partial}, complete: {after}");
    assert!(partial >= 1, "no kill landed in the middle of the sync");

    // A last sync to completion, in this process, delivers exactly what is missing.
    let mut a = Replica::open(&a_path)?;
    let mut b = Replica::open(&b_path)?;
    let stats = run_session(
        &mut a,
        &mut b,
        &sync_options(),
        &mut NoObserver,
        &SystemClock,
    )?;
    let missing = (SYNC_ITEMS - held) as u64;
    assert_eq!(
        (
            stats.changes_sent,
            stats.changes_applied,
            stats.changes_failed
        ),
        (missing, missing, 0)
    );
    assert_eq!(stats.conflicts.total(), 0);
    assert_eq!(b.items()?, source.items);
    assert_eq!(b.item_metas()?, source.metas);
    assert_eq!(b.tick(), 0);
    assert!(
        b.knowledge().contains_knowledge(&a.knowledge()),
        "K_B must contain K_A"
    );
    let again = run_session(
        &mut a,
        &mut b,
        &sync_options(),
        &mut NoObserver,
        &SystemClock,
    )?;
    assert_eq!(again.changes_sent, 0);
    let back = run_session(
        &mut b,
        &mut a,
        &sync_options(),
        &mut NoObserver,
        &SystemClock,
    )?;
    assert_eq!(back.changes_sent, 0);
    Ok(())
}

/// What A must hold after exactly `tick` puts of the child's pattern.
fn check_writes_image(a: &Replica, tick: u64) -> TestResult {
    let me = a.id();
    assert_eq!(a.tick(), tick);
    let metas = a.item_metas()?;
    let items = a.items()?;
    let live = tick.min(WRITE_KEYS) as usize;
    assert_eq!((metas.len(), items.len()), (live, live));
    for ((item, meta), (item2, value)) in metas.iter().zip(&items) {
        assert_eq!(item, item2);
        let key: u64 = std::str::from_utf8(&item.as_bytes()[3..])?.parse()?;
        // The last put of this key before `tick`.
        let put = key + (tick - 1 - key) / WRITE_KEYS * WRITE_KEYS;
        assert_eq!(meta.version, Version::new(me, put + 1), "{item}: version");
        assert_eq!(meta.creation, Version::new(me, key + 1), "{item}: creation");
        assert!(!meta.deleted);
        assert_eq!(
            value,
            &write_value(put),
            "{item}: the data of another version"
        );
    }
    // The index holds one entry per item, and none above the tick: the tick is at or
    // above every version stored, so the next put cannot reuse one.
    let ids: Vec<ItemId> = metas.iter().map(|(item, _)| item.clone()).collect();
    assert_eq!(a.metadata().changes_unknown_to(&Knowledge::new())?, ids);
    let up_to_tick = Knowledge::from_vector(ClockVector::from_pairs([(me, tick)]));
    assert!(a.metadata().changes_unknown_to(&up_to_tick)?.is_empty());
    assert_eq!(a.knowledge().max_tick(me), tick);
    Ok(())
}

#[test]
fn local_writes_killed_at_random_points_never_reuse_a_tick() -> TestResult {
    let dir = tempfile::tempdir()?;
    let a_path = dir.path().join("A");
    drop(Replica::create(&a_path)?);
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
    let mut tick = 0u64;
    for round in 0..WRITE_ROUNDS {
        let target = tick + WRITE_FLUSH_EVERY * (1 + rng.below(15));
        let extra_micros = rng.below(5000);
        let reported = run_child_and_kill(dir.path(), "writes", target, extra_micros)?;
        assert!(
            !reported.finished,
            "the writing child never stops on its own"
        );
        let mut a = Replica::open(&a_path)?;
        let recovered = a.tick();
        assert!(
            recovered >= reported.progress,
            "round {round}: tick {} was flushed but A is at {recovered}",
            reported.progress
        );
        assert!(
            recovered >= tick,
            "round {round}: A went back from tick {tick} to {recovered}"
        );
        check_writes_image(&a, recovered)?;
        // The next put takes the next tick, above every version stored.
        let next = a.put(&write_key(recovered), &write_value(recovered))?;
        assert_eq!(next, Version::new(a.id(), recovered + 1));
        check_writes_image(&a, recovered + 1)?;
        tick = recovered + 1;
        println!(
            "round {round}: kill after tick {} (+{extra_micros} µs), recovered tick {recovered}",
            reported.progress
        );
    }
    // The probe puts survive a clean close.
    let a = Replica::open(&a_path)?;
    check_writes_image(&a, tick)?;
    Ok(())
}

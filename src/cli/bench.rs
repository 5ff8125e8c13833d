//! `knit bench`: the end-to-end benchmark. Fixed sizes, a fixed seed, sled replicas on
//! disk, and the physical baseline (raw batched sled writes of the same records)
//! measured in the same run, so the figures compare like with like.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::metadata::ItemMeta;
use crate::model::{Hlc, ItemId, ReplicaId, Version};
use crate::stores::Replica;
use crate::sync::{
    run_session, CancelToken, ConflictPolicy, Direction, ForgottenRecovery, NoObserver,
    SessionOptions, SystemClock,
};

/// Sizes of one benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// N: items in the large store.
    pub items: usize,
    /// K: changes for the incremental syncs.
    pub changes: usize,
}

/// The small store of the incremental comparison.
const SMALL_ITEMS: usize = 10_000;
const VALUE_LEN: usize = 100;
const BATCH_SIZE: usize = 1000;
/// Runs of each short measurement; the median is reported.
const REPEATS: usize = 5;

/// Figures of one run.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    pub items: usize,
    pub changes: usize,
    pub raw_items_per_s: f64,
    pub initial_items_per_s: f64,
    pub incremental_ms_small: f64,
    pub incremental_ms_large: f64,
    pub noop_ms: f64,
    pub metadata_bytes_per_item: f64,
}

impl BenchReport {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "items": self.items,
            "changes": self.changes,
            "small_items": SMALL_ITEMS,
            "raw_items_per_s": self.raw_items_per_s.round(),
            "initial_items_per_s": self.initial_items_per_s.round(),
            "initial_vs_raw": round3(self.initial_items_per_s / self.raw_items_per_s),
            "incremental_ms_small": round3(self.incremental_ms_small),
            "incremental_ms_large": round3(self.incremental_ms_large),
            "incremental_large_vs_small": round3(self.incremental_ms_large / self.incremental_ms_small),
            "noop_ms": round3(self.noop_ms),
            "metadata_bytes_per_item": self.metadata_bytes_per_item.round(),
        })
    }

    pub fn table(&self) -> String {
        let rows = [
            (
                "raw sled write (data + metadata, batched)".to_string(),
                format!("{:.0} items/s", self.raw_items_per_s),
            ),
            (
                format!("initial sync of {} items", self.items),
                format!(
                    "{:.0} items/s ({:.0} % of raw)",
                    self.initial_items_per_s,
                    100.0 * self.initial_items_per_s / self.raw_items_per_s
                ),
            ),
            (
                format!(
                    "incremental sync, {} changes in {} items",
                    self.changes, SMALL_ITEMS
                ),
                format!("{:.2} ms", self.incremental_ms_small),
            ),
            (
                format!(
                    "incremental sync, {} changes in {} items",
                    self.changes, self.items
                ),
                format!(
                    "{:.2} ms ({:.2} x the small store)",
                    self.incremental_ms_large,
                    self.incremental_ms_large / self.incremental_ms_small
                ),
            ),
            (
                format!("no-op sync, converged, {} items", self.items),
                format!("{:.3} ms", self.noop_ms),
            ),
            (
                "metadata bytes per item".to_string(),
                format!("{:.0}", self.metadata_bytes_per_item),
            ),
        ];
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A deterministic value generator (xorshift64*), so every run writes the same bytes.
struct Values(u64);

impl Values {
    fn next_value(&mut self) -> Vec<u8> {
        (0..VALUE_LEN)
            .map(|_| {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                b'a' + (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 59) as u8 % 26
            })
            .collect()
    }
}

fn key(i: usize) -> Result<ItemId, String> {
    ItemId::new(format!("item-{i:08}").as_bytes()).map_err(|e| e.to_string())
}

/// A scratch folder removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("knit-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options() -> SessionOptions {
    SessionOptions {
        direction: Direction::Upload,
        policy: ConflictPolicy::LastWriterWins,
        batch_size: BATCH_SIZE,
        recovery: ForgottenRecovery::FullEnumeration,
        cancel: CancelToken::new(),
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The physical limit: the same records a synced item costs (its record with the data
/// as its tail inside an item page, and its entry in an index page), encoded and
/// written with batched sled writes page by page, then flushed. No reads: a commit's
/// read-modify-write of the pages is knit's own cost.
fn raw_write_rate(path: &Path, items: usize) -> Result<f64, String> {
    use crate::metadata::pages::{encode_index_page, encode_item_page, INDEX_BUCKET, PAGE_ENTRIES};
    let db = sled::Config::new().path(path).open().map_err(err)?;
    let mut values = Values(0x9E37_79B9_7F4A_7C15);
    let replica = ReplicaId::from_u128(1);
    let started = Instant::now();
    let mut records: Vec<(ItemId, u64, Vec<u8>)> = Vec::with_capacity(BATCH_SIZE);
    for first in (0..items).step_by(BATCH_SIZE) {
        records.clear();
        for i in first..(first + BATCH_SIZE).min(items) {
            let version = Version::new(replica, i as u64 + 1);
            let meta = ItemMeta {
                creation: version,
                version,
                timestamp: Hlc(i as u64),
                deleted: false,
            };
            let data = values.next_value();
            records.push((key(i)?, version.tick, meta.encode_with_data(Some(&data))));
        }
        let mut batch = sled::Batch::default();
        for page in records.chunks(PAGE_ENTRIES) {
            let mut page_key = vec![0x20];
            page_key.extend_from_slice(page[0].0.as_bytes());
            let entries = page.iter().map(|(id, _, r)| (id.as_bytes(), r.as_slice()));
            batch.insert(page_key, encode_item_page(entries));
        }
        for page in records.chunk_by(|a, b| a.1 / INDEX_BUCKET == b.1 / INDEX_BUCKET) {
            let mut index_key = vec![0x21];
            index_key.extend_from_slice(replica.as_bytes());
            index_key.extend_from_slice(&(page[0].1 / INDEX_BUCKET).to_be_bytes());
            let entries = page.iter().map(|(id, tick, _)| (*tick, id.as_bytes()));
            batch.insert(index_key, encode_index_page(entries));
        }
        db.apply_batch(batch).map_err(err)?;
    }
    db.flush().map_err(err)?;
    Ok(items as f64 / started.elapsed().as_secs_f64())
}

fn load(replica: &mut Replica, items: usize, seed: u64) -> Result<(), String> {
    let mut values = Values(seed);
    for i in 0..items {
        replica.put(&key(i)?, &values.next_value()).map_err(err)?;
    }
    replica.flush().map_err(err)
}

/// Syncs `source → destination` once and returns the wall time in milliseconds.
fn timed_sync(
    source: &mut Replica,
    destination: &mut Replica,
    expect_sent: u64,
) -> Result<f64, String> {
    let started = Instant::now();
    let stats = run_session(
        source,
        destination,
        &options(),
        &mut NoObserver,
        &SystemClock,
    )
    .map_err(err)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if stats.changes_sent != expect_sent || stats.changes_applied != expect_sent {
        return Err(format!(
            "benchmark sync moved {} changes ({} applied); expected {expect_sent}",
            stats.changes_sent, stats.changes_applied
        ));
    }
    Ok(ms)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Times an incremental sync of `changes` updates spread over `items` items, as the
/// median of several rounds.
fn incremental_ms(
    source: &mut Replica,
    destination: &mut Replica,
    items: usize,
    changes: usize,
) -> Result<f64, String> {
    let mut values = Values(0xDEAD_BEEF);
    let step = (items / changes.max(1)).max(1);
    let mut times = Vec::with_capacity(REPEATS);
    for round in 0..REPEATS {
        for c in 0..changes {
            let i = (c * step + round) % items;
            source.put(&key(i)?, &values.next_value()).map_err(err)?;
        }
        times.push(timed_sync(source, destination, changes as u64)?);
    }
    Ok(median(times))
}

/// A pair of replicas, `a` loaded with `items` items and synced to `b`; returns the
/// initial sync rate.
fn converged_pair(
    scratch: &Scratch,
    tag: &str,
    items: usize,
) -> Result<(Replica, Replica, f64), String> {
    let mut a = Replica::create(&scratch.path(&format!("{tag}-a"))).map_err(err)?;
    let mut b = Replica::create(&scratch.path(&format!("{tag}-b"))).map_err(err)?;
    load(&mut a, items, 42)?;
    let ms = timed_sync(&mut a, &mut b, items as u64)?;
    Ok((a, b, items as f64 / (ms / 1000.0)))
}

pub fn run(options: &BenchOptions) -> Result<BenchReport, String> {
    if options.items < SMALL_ITEMS || options.changes == 0 || options.changes > options.items {
        return Err(format!(
            "--items must be at least {SMALL_ITEMS} and --changes between 1 and --items"
        ));
    }
    let scratch = Scratch::new()?;
    let raw_items_per_s = raw_write_rate(&scratch.path("raw"), options.items)?;

    let (mut large_a, mut large_b, initial_items_per_s) =
        converged_pair(&scratch, "large", options.items)?;
    let mut noop = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        noop.push(timed_sync(&mut large_a, &mut large_b, 0)?);
    }
    let noop_ms = median(noop);
    let incremental_ms_large =
        incremental_ms(&mut large_a, &mut large_b, options.items, options.changes)?;
    let summary = large_b.metadata().summary().map_err(err)?;
    let metadata_bytes_per_item = summary.metadata_bytes as f64 / options.items as f64;
    drop((large_a, large_b));

    let (mut small_a, mut small_b, _) = converged_pair(&scratch, "small", SMALL_ITEMS)?;
    let incremental_ms_small =
        incremental_ms(&mut small_a, &mut small_b, SMALL_ITEMS, options.changes)?;

    Ok(BenchReport {
        items: options.items,
        changes: options.changes,
        raw_items_per_s,
        initial_items_per_s,
        incremental_ms_small,
        incremental_ms_large,
        noop_ms,
        metadata_bytes_per_item,
    })
}

//! Rewrites: the workload that rewrites metadata pages the most, run long enough to
//! show a hang. A source replica updates every one of its items with single-item puts
//! (loose records), then syncs them to a destination in batches of 1,000, which rewrites
//! every page there; round after round, so sled's log fills with rewritten pages and
//! frees and truncates segments (where sled 0.34 hung once, see docs/format.md).
//!
//! `cargo bench --bench rewrites -- [ITEMS] [ROUNDS]` (default 20000 40) prints each
//! round's times. A round that makes no progress for two minutes ends the process with
//! an error instead of hanging. Under `cargo test --all-targets` it runs a small smoke
//! version that checks the destination holds every update.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use knit::{Direction, ItemId, NoObserver, Replica, SessionOptions};

/// The knit binary's allocator and its settings, so that these figures are the CLI's.
#[path = "../src/allocator.rs"]
mod allocator;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Seconds without progress after which the run is declared hung.
const STALL_LIMIT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    allocator::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benchmarking = args.iter().any(|a| a == "--bench");
    let numbers: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let (items, rounds, batch_size) = if benchmarking {
        (
            numbers.first().copied().unwrap_or(20_000),
            numbers.get(1).copied().unwrap_or(40),
            1000,
        )
    } else {
        (300, 3, 50)
    };
    let dir = tempfile::tempdir()?;
    let mut source = Replica::create(&dir.path().join("source"))?;
    let mut destination = Replica::create(&dir.path().join("destination"))?;
    let ids: Vec<ItemId> = (0..items)
        .map(|i| ItemId::new(format!("item-{i:08}").as_bytes()))
        .collect::<std::result::Result<_, _>>()?;
    let options = SessionOptions {
        direction: Direction::Upload,
        batch_size,
        ..SessionOptions::default()
    };
    let progress = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let watched = progress.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        let last = Duration::from_millis(watched.load(Ordering::Relaxed));
        if started.elapsed() > last + STALL_LIMIT {
            eprintln!(
                "no progress for {} s: the store is hung (see docs/format.md on sled 0.34)",
                STALL_LIMIT.as_secs()
            );
            std::process::exit(2);
        }
    });
    println!("Rewrites: {items} items updated by single puts, then synced in batches of {batch_size}, {rounds} rounds:");
    let (mut puts_total, mut sync_total) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let value = format!("round {round} {}", "x".repeat(80));
        let t = Instant::now();
        for id in &ids {
            source.put(id, value.as_bytes())?;
            progress.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        let puts = t.elapsed();
        let t = Instant::now();
        let report = source.sync_with(&mut destination, &options, &mut NoObserver)?;
        let sync = t.elapsed();
        progress.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let applied = report.upload.map_or(0, |s| s.changes_applied);
        if applied != items as u64 {
            return Err(format!("round {round}: {applied} of {items} changes applied").into());
        }
        println!(
            "  round {round:3}: {items} puts {:8.1} ms, sync {:8.1} ms",
            puts.as_secs_f64() * 1e3,
            sync.as_secs_f64() * 1e3
        );
        puts_total += puts;
        sync_total += sync;
    }
    let last = format!("round {} {}", rounds - 1, "x".repeat(80));
    for id in &ids {
        if destination.get(id)?.as_deref() != Some(last.as_bytes()) {
            return Err(format!("{id} does not hold the last round's value").into());
        }
    }
    let per = |total: Duration| total.as_secs_f64() * 1e6 / (items * rounds) as f64;
    println!(
        "  total: puts {:.1} s ({:.1} µs per put), syncs {:.1} s ({:.1} µs per change), no hang",
        puts_total.as_secs_f64(),
        per(puts_total),
        sync_total.as_secs_f64(),
        per(sync_total)
    );
    Ok(())
}

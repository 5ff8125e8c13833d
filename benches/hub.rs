//! Hub figures (issue 4), measured in one run and printed as a table and one JSON line.
//!
//! 1. **Load.** An in-process hub (sled storage, loopback) hosts one replica of ITEMS
//!    items. CLIENTS client threads each hold the dataset already (one client synced
//!    once, its folder copied and each copy rekeyed). For SECONDS, every client changes
//!    CHANGES random existing items locally (~100-byte values), then syncs
//!    upload-and-download with the hub; a client that finds the replica busy (409)
//!    backs off with jitter and retries. Figures: errors (syncs that failed for any
//!    reason other than busy; goal 0), busy retries, syncs per second, changes applied
//!    at the hub per second (the hub's own `/metrics` counter), p50 and p99 of the
//!    successful sync call and of first attempt to success (retries included).
//! 2. **Initial sync.** A client replica of INITIAL items uploads to an empty hosted
//!    replica; the sync call is timed. With `--pouchdb`, the same documents replicate
//!    from a PouchDB (LevelDB) to an express-pouchdb server on loopback
//!    (`benches/peers/pouchdb-hub.js`), in the same run, and the ratio is printed.
//!
//! ```sh
//! scripts/bench-hub [CLIENTS] [CHANGES] [ITEMS] [SECONDS] [INITIAL]   # installs the npm packages
//! cargo bench --bench hub -- --clients 200 --changes 100 --items 100000 --seconds 60 \
//!     --initial-items 10000 [--pouchdb]
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench` and no size given) it runs a smoke
//! version (3 clients, 10 changes, 200 items, 1 second) that fails if any sync fails.
//! Every file lives in one temporary folder under the system's temp dir, removed at the
//! end.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use knit::hub::{HubConfig, RemoteReplica, RunningHub};
use knit::{
    ConflictPolicy, Direction, ItemId, NoObserver, Replica, ReplicaId, SessionOptions, SyncError,
};

/// The knit binary's allocator and its settings, so that these figures are the CLI's.
#[path = "../src/allocator.rs"]
mod allocator;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Result<T> = std::result::Result<T, Error>;

/// The one token of the run; its `replica_ids` list every client.
const TOKEN: &str = "bench-token-0123456789abcdef";
const VALUE_LEN: usize = 100;
/// Local changes per commit when preloading a replica.
const PRELOAD_CHUNK: usize = 10_000;
const BATCH_SIZE: usize = 1000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A busy retry waits `BACKOFF_FIRST · 2^attempt`, at most `BACKOFF_MAX`: half of it
/// fixed, half random ("equal jitter"), so clients that collided once spread out
/// instead of colliding again, and none polls the hub faster than it can answer.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Seed of the hub's preloaded values and of the clients' choices.
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// Seed of the initial-sync values: the one `knit bench` and both PouchDB scripts use,
/// so knit and PouchDB carry the same bytes.
const INITIAL_SEED: u64 = 42;

fn main() -> Result<()> {
    allocator::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes = Sizes::from_args(&args)?;
    let scratch = tempfile::Builder::new()
        .prefix("knit-bench-hub-")
        .tempdir()?;

    // The two initial syncs first, back to back on a quiet machine, before the load
    // leaves gigabytes of client folders for the disk to write back.
    let mut figures = serde_json::Map::new();
    let initial_ms = initial_sync(&scratch.path().join("initial"), sizes.initial_items)?;
    let pouchdb = if sizes.pouchdb {
        Some(pouchdb_initial_sync(sizes.initial_items)?)
    } else {
        None
    };
    let rate = |ms: f64| sizes.initial_items as f64 / (ms / 1000.0);
    println!(
        "Initial sync of {} items (~{VALUE_LEN}-byte values) to an empty hub, loopback:",
        sizes.initial_items
    );
    row(
        "knit: client replica -> hosted replica (sled)",
        format!("{initial_ms:.1} ms   ({:.0} items/s)", rate(initial_ms)),
    );
    figures.insert("initial_items".into(), sizes.initial_items.into());
    figures.insert("initial_ms".into(), round1(initial_ms).into());
    figures.insert(
        "initial_items_per_s".into(),
        rate(initial_ms).round().into(),
    );
    match pouchdb {
        Some((pouch_ms, raw)) => {
            row(
                "PouchDB (LevelDB) -> express-pouchdb (LevelDB)",
                format!("{pouch_ms:.1} ms   ({:.0} items/s)", rate(pouch_ms)),
            );
            row(
                "knit faster than PouchDB (goal >= 10 x)",
                format!("{:.1} x", pouch_ms / initial_ms),
            );
            figures.insert("pouchdb_initial_ms".into(), round1(pouch_ms).into());
            figures.insert(
                "pouchdb_initial_items_per_s".into(),
                rate(pouch_ms).round().into(),
            );
            figures.insert(
                "knit_vs_pouchdb".into(),
                round1(pouch_ms / initial_ms).into(),
            );
            figures.insert("pouchdb".into(), raw);
        }
        None => println!(
            "  PouchDB part skipped: pass --pouchdb (scripts/bench-hub does, after installing it)"
        ),
    }

    let load = load(&scratch.path().join("load"), &sizes)?;
    load.print(&sizes);
    load.record(&sizes, &mut figures);
    println!("{}", serde_json::Value::Object(figures));

    if sizes.smoke && !load.errors.is_empty() {
        return Err(format!(
            "{} syncs failed with something other than busy; first: {}",
            load.errors.len(),
            load.errors[0]
        )
        .into());
    }
    Ok(())
}

/// The sizes of one run.
struct Sizes {
    clients: usize,
    changes: usize,
    items: usize,
    seconds: u64,
    initial_items: usize,
    pouchdb: bool,
    /// The tiny run of `cargo test --all-targets`: it fails on any failed sync.
    smoke: bool,
}

impl Sizes {
    /// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    /// without it, and both may pass filters: anything unknown is left alone.
    fn from_args(args: &[String]) -> Result<Self> {
        let mut sizes = Self {
            clients: 200,
            changes: 100,
            items: 100_000,
            seconds: 60,
            initial_items: 10_000,
            pouchdb: false,
            smoke: false,
        };
        let mut sized = false;
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            let slot = match arg.as_str() {
                "--clients" => &mut sizes.clients,
                "--changes" => &mut sizes.changes,
                "--items" => &mut sizes.items,
                "--initial-items" => &mut sizes.initial_items,
                "--seconds" => {
                    sizes.seconds = number(arg, rest.next())? as u64;
                    sized = true;
                    continue;
                }
                "--pouchdb" => {
                    sizes.pouchdb = true;
                    continue;
                }
                _ => continue,
            };
            *slot = number(arg, rest.next())?;
            sized = true;
        }
        if !sized && !args.iter().any(|a| a == "--bench") {
            return Ok(Self {
                clients: 3,
                changes: 10,
                items: 200,
                seconds: 1,
                initial_items: 200,
                pouchdb: false,
                smoke: true,
            });
        }
        if sizes.clients == 0 || sizes.seconds == 0 || sizes.initial_items == 0 {
            return Err("--clients, --seconds and --initial-items must be at least 1".into());
        }
        if sizes.changes == 0 || sizes.changes > sizes.items {
            return Err(
                format!("--changes must be between 1 and --items ({})", sizes.items).into(),
            );
        }
        Ok(sizes)
    }
}

fn number(flag: &str, value: Option<&String>) -> Result<usize> {
    value
        .and_then(|v| v.replace('_', "").parse().ok())
        .ok_or_else(|| format!("{flag} needs a whole number").into())
}

/// xorshift64*: the clients' choices and the values, reproducible from a seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (the modulo bias is far below what a benchmark can see).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// `VALUE_LEN` lowercase letters, the values of `knit bench` and the PouchDB scripts.
    fn value(&mut self) -> Vec<u8> {
        (0..VALUE_LEN)
            .map(|_| b'a' + (self.next_u64() >> 59) as u8 % 26)
            .collect()
    }
}

fn key(i: usize) -> Result<ItemId> {
    Ok(ItemId::new(format!("item-{i:08}").as_bytes())?)
}

fn options(direction: Direction) -> SessionOptions {
    SessionOptions {
        direction,
        policy: ConflictPolicy::LastWriterWins,
        batch_size: BATCH_SIZE,
        ..SessionOptions::default()
    }
}

/// Writes items `0..items` to `replica`, `PRELOAD_CHUNK` changes per commit.
fn preload(replica: &mut Replica, items: usize, values: &mut Rng) -> Result<()> {
    for start in (0..items).step_by(PRELOAD_CHUNK) {
        let chunk = (start..items.min(start + PRELOAD_CHUNK))
            .map(|i| Ok((key(i)?, Some(values.value()))))
            .collect::<Result<Vec<_>>>()?;
        replica.apply_local(&chunk)?;
    }
    Ok(replica.flush()?)
}

/// A hub on `127.0.0.1:0` hosting replica `notes` in `data`, with one token that may
/// read and write it as any of `clients`.
fn start_hub(data: &Path, clients: &[ReplicaId]) -> Result<RunningHub> {
    let ids: Vec<String> = clients.iter().map(|id| format!("\"{id}\"")).collect();
    let text = format!(
        r#"listen = "127.0.0.1:0"
data = "{data}"
[replicas.notes]
[tokens.bench]
token = "{TOKEN}"
read = ["notes"]
write = ["notes"]
replica_ids = [{ids}]
"#,
        data = data.display(),
        ids = ids.join(", "),
    );
    let config = HubConfig::parse(&text, &data.join("hub.toml"), |_| None)?;
    Ok(RunningHub::start(config)?)
}

fn connect(hub: &RunningHub) -> Result<RemoteReplica> {
    Ok(RemoteReplica::connect(
        &hub.replica_url("notes"),
        TOKEN,
        REQUEST_TIMEOUT,
    )?)
}

/// Figure 2: a client of `items` items uploads to an empty hosted replica; returns the
/// sync call's wall time in milliseconds.
fn initial_sync(dir: &Path, items: usize) -> Result<f64> {
    let mut client = Replica::create(&dir.join("client"))?;
    preload(&mut client, items, &mut Rng(INITIAL_SEED))?;
    // The client's own data is on disk before the clock starts, as PouchDB's is once
    // its bulkDocs calls return: the figure is the sync, not the preload's durability.
    client.flush()?;
    let hub = start_hub(&dir.join("hub"), &[client.id()])?;
    let mut remote = connect(&hub)?;
    let started = Instant::now();
    let report = client.sync_with(&mut remote, &options(Direction::Upload), &mut NoObserver)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let applied = report.upload.map_or(0, |s| s.changes_applied);
    if applied != items as u64 {
        return Err(
            format!("the initial sync applied {applied} of {items} items at the hub").into(),
        );
    }
    hub.shutdown()?;
    Ok(ms)
}

/// Runs `benches/peers/pouchdb-hub.js ITEMS`; returns its time and its JSON line.
fn pouchdb_initial_sync(items: usize) -> Result<(f64, serde_json::Value)> {
    let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers");
    if !peers.join("node_modules/express-pouchdb").is_dir() {
        return Err(format!(
            "{} lacks express-pouchdb: run scripts/bench-hub, which installs it",
            peers.join("node_modules").display()
        )
        .into());
    }
    let output = std::process::Command::new("node")
        .arg(peers.join("pouchdb-hub.js"))
        .arg(items.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running node: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("pouchdb-hub.js failed ({}): {stdout}", output.status).into());
    }
    let line = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| format!("pouchdb-hub.js printed {line:?}, not JSON: {e}"))?;
    let ms = json["initial_ms"]
        .as_f64()
        .ok_or_else(|| format!("pouchdb-hub.js printed no initial_ms: {line}"))?;
    Ok((ms, json))
}

/// What one client thread saw.
#[derive(Default)]
struct Tally {
    syncs: u64,
    busy: u64,
    errors: Vec<String>,
    /// Changes made locally whose sync was still retrying when the time was up.
    unfinished: u64,
    changes_made: u64,
    session: Vec<Duration>,
    end_to_end: Vec<Duration>,
}

/// Figure 1's results.
struct Load {
    setup: Duration,
    folder_bytes: u64,
    elapsed: Duration,
    syncs: u64,
    busy: u64,
    errors: Vec<String>,
    unfinished: u64,
    changes_made: u64,
    applied: u64,
    conflicts: u64,
    /// Upper bounds (ms) of the hub's own request latency, p50 and p99.
    hub_request_p50_ms: f64,
    hub_request_p99_ms: f64,
    session: Vec<Duration>,
    end_to_end: Vec<Duration>,
    peak_rss_bytes: Option<u64>,
}

/// Figure 1: the hub under `sizes.clients` clients for `sizes.seconds`.
fn load(dir: &Path, sizes: &Sizes) -> Result<Load> {
    let setup = Instant::now();
    let data = dir.join("hub");
    let clients_dir = dir.join("clients");
    // The hosted replica is filled before the hub opens it, and the first client
    // gets the dataset from it by a local sync: the same engine the hub runs, without
    // 100,000 items' worth of HTTP in the setup.
    let mut hosted = Replica::create(&data.join("notes"))?;
    preload(&mut hosted, sizes.items, &mut Rng(SEED))?;
    let seed_path = clients_dir.join("seed");
    let mut seed = Replica::create(&seed_path)?;
    let report = seed.sync_with(&mut hosted, &options(Direction::Download), &mut NoObserver)?;
    let received = report.download.map_or(0, |s| s.changes_applied);
    if received != sizes.items as u64 {
        return Err(format!(
            "the first client received {received} of {} items",
            sizes.items
        )
        .into());
    }
    seed.flush()?;
    drop((seed, hosted));
    let folder_bytes = folder_size(&seed_path)?;
    let mut replicas = Vec::with_capacity(sizes.clients);
    for c in 0..sizes.clients {
        let path = clients_dir.join(format!("client-{c:03}"));
        copy_folder(&seed_path, &path)?;
        let mut replica = Replica::open(&path)?;
        replica.rekey()?;
        replicas.push(replica);
    }
    std::fs::remove_dir_all(&seed_path)?;
    let ids: Vec<ReplicaId> = replicas.iter().map(Replica::id).collect();
    let hub = start_hub(&data, &ids)?;
    let setup = setup.elapsed();

    let before = HubCounters::scrape(&hub)?;
    let duration = Duration::from_secs(sizes.seconds);
    let start = Arc::new(Barrier::new(sizes.clients + 1));
    let mut threads = Vec::with_capacity(sizes.clients);
    for (index, replica) in replicas.into_iter().enumerate() {
        let remote = connect(&hub)?;
        let url = hub.replica_url("notes");
        let start = Arc::clone(&start);
        let (items, changes) = (sizes.items, sizes.changes);
        let thread = std::thread::Builder::new()
            .name(format!("client-{index:03}"))
            .spawn(move || {
                start.wait();
                let deadline = Instant::now() + duration;
                let rng = Rng(SEED ^ (index as u64 + 1).wrapping_mul(0xA076_1D64_78BD_642F));
                client_loop(replica, remote, &url, rng, items, changes, deadline)
            })?;
        threads.push(thread);
    }
    start.wait();
    let started = Instant::now();
    let mut all = Tally::default();
    for thread in threads {
        let tally = thread
            .join()
            .map_err(|_| "a client thread panicked".to_string())??;
        all.syncs += tally.syncs;
        all.busy += tally.busy;
        all.errors.extend(tally.errors);
        all.unfinished += tally.unfinished;
        all.changes_made += tally.changes_made;
        all.session.extend(tally.session);
        all.end_to_end.extend(tally.end_to_end);
    }
    let elapsed = started.elapsed();
    let after = HubCounters::scrape(&hub)?;
    hub.shutdown()?;
    all.session.sort();
    all.end_to_end.sort();
    Ok(Load {
        setup,
        folder_bytes,
        elapsed,
        syncs: all.syncs,
        busy: all.busy,
        errors: all.errors,
        unfinished: all.unfinished,
        changes_made: all.changes_made,
        applied: after.applied - before.applied,
        conflicts: after.conflicts - before.conflicts,
        hub_request_p50_ms: after.request_quantile(&before, 50.0) * 1000.0,
        hub_request_p99_ms: after.request_quantile(&before, 99.0) * 1000.0,
        session: all.session,
        end_to_end: all.end_to_end,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// One client until `deadline`: change `changes` random items, sync until it is not
/// busy, again. A sync that fails otherwise is counted and the next round goes on.
fn client_loop(
    mut replica: Replica,
    mut remote: RemoteReplica,
    url: &str,
    mut rng: Rng,
    items: usize,
    changes: usize,
    deadline: Instant,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let both = options(Direction::UploadAndDownload);
    'rounds: while Instant::now() < deadline {
        let mut chosen = BTreeSet::new();
        while chosen.len() < changes {
            chosen.insert(rng.below(items));
        }
        let batch = chosen
            .into_iter()
            .map(|i| Ok((key(i)?, Some(rng.value()))))
            .collect::<Result<Vec<_>>>()?;
        replica.apply_local(&batch)?;
        tally.changes_made += changes as u64;

        let first = Instant::now();
        for attempt in 0u32.. {
            let began = Instant::now();
            match replica.sync_with(&mut remote, &both, &mut NoObserver) {
                Ok(_) => {
                    tally.syncs += 1;
                    tally.session.push(began.elapsed());
                    tally.end_to_end.push(first.elapsed());
                    continue 'rounds;
                }
                Err(SyncError::ReplicaBusy { .. }) => {
                    tally.busy += 1;
                    let wait = backoff(attempt, &mut rng);
                    let left = deadline.saturating_duration_since(Instant::now());
                    if wait >= left {
                        tally.unfinished += changes as u64;
                        std::thread::sleep(left);
                        break 'rounds;
                    }
                    std::thread::sleep(wait);
                }
                Err(e) => {
                    tally.errors.push(e.to_string());
                    // A session left open at the hub is ended by its timeout; a fresh
                    // client starts from a clean state whatever the failure was.
                    match RemoteReplica::connect(url, TOKEN, REQUEST_TIMEOUT) {
                        Ok(fresh) => remote = fresh,
                        Err(e) => {
                            tally.errors.push(format!("reconnecting: {e}"));
                            break 'rounds;
                        }
                    }
                    continue 'rounds;
                }
            }
        }
    }
    Ok(tally)
}

fn backoff(attempt: u32, rng: &mut Rng) -> Duration {
    let full = BACKOFF_FIRST
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    let half = full / 2;
    let millis = u64::try_from(half.as_millis()).unwrap_or(u64::MAX).max(1);
    half + Duration::from_millis(rng.next_u64() % millis)
}

/// The hub's own counters, read from `/metrics`.
struct HubCounters {
    applied: u64,
    conflicts: u64,
    /// The request latency histogram: `(upper bound in seconds, requests at or below)`.
    latency: Vec<(f64, u64)>,
}

impl HubCounters {
    fn scrape(hub: &RunningHub) -> Result<Self> {
        let url = format!("http://{}/metrics", hub.addr());
        let text = reqwest::blocking::get(&url)?.error_for_status()?.text()?;
        let counter = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .ok_or_else(|| format!("{url} shows no counter {name}").into())
        };
        let latency = text
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix("knit_request_seconds_bucket{le=\"")?;
                let (bound, count) = rest.split_once("\"} ")?;
                let bound = if bound == "+Inf" {
                    f64::INFINITY
                } else {
                    bound.parse().ok()?
                };
                Some((bound, count.parse().ok()?))
            })
            .collect();
        Ok(Self {
            applied: counter("knit_changes_total{direction=\"applied\"}")?,
            conflicts: counter("knit_conflicts_total")?,
            latency,
        })
    }

    /// The smallest histogram bound that holds `q` % of the requests answered between
    /// `before` and `self`: what the hub itself took per request, client work excluded.
    fn request_quantile(&self, before: &Self, q: f64) -> f64 {
        let counts: Vec<(f64, u64)> = self
            .latency
            .iter()
            .zip(&before.latency)
            .map(|(&(bound, after), &(_, before))| (bound, after.saturating_sub(before)))
            .collect();
        let total = counts.last().map_or(0, |&(_, n)| n);
        let wanted = (total as f64 * q / 100.0).ceil() as u64;
        counts
            .iter()
            .find(|&&(_, n)| n >= wanted)
            .map_or(f64::INFINITY, |&(bound, _)| bound)
    }
}

impl Load {
    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, sizes: &Sizes) {
        println!(
            "Hub under load: {} clients x {} changes per sync, {} items, {} s, loopback, sled{}:",
            sizes.clients,
            sizes.changes,
            sizes.items,
            sizes.seconds,
            if sizes.smoke { " (smoke run)" } else { "" }
        );
        row(
            "setup (preload, first sync, copies, rekey)",
            format!(
                "{:.1} s   ({} copies of a {:.1} MiB client folder)",
                self.setup.as_secs_f64(),
                sizes.clients,
                mib(self.folder_bytes)
            ),
        );
        row(
            "errors (other than busy; goal 0)",
            self.errors.len().to_string(),
        );
        for error in self.errors.iter().take(3) {
            println!("    {error}");
        }
        row(
            "syncs completed (upload + download)",
            format!(
                "{}   ({:.2} /s over {:.1} s)",
                self.syncs,
                self.per_second(self.syncs),
                self.elapsed.as_secs_f64()
            ),
        );
        row(
            "busy retries",
            format!(
                "{}   ({:.1} per completed sync; backoff {}..{} ms, jittered)",
                self.busy,
                self.busy as f64 / self.syncs.max(1) as f64,
                BACKOFF_FIRST.as_millis(),
                BACKOFF_MAX.as_millis()
            ),
        );
        row(
            "changes applied at the hub",
            format!(
                "{}   ({:.0} /s; {} made, {} still waiting at the end)",
                self.applied,
                self.per_second(self.applied),
                self.changes_made,
                self.unfinished
            ),
        );
        row("conflicts at the hub", self.conflicts.to_string());
        row(
            "session latency p50 / p99",
            format!(
                "{:.1} / {:.1} ms",
                millis(percentile(&self.session, 50)),
                millis(percentile(&self.session, 99))
            ),
        );
        row(
            "hub's own request latency p50 / p99 (at most)",
            format!(
                "{} / {} ms   (from /metrics: the hub's time per request, clients excluded)",
                self.hub_request_p50_ms, self.hub_request_p99_ms
            ),
        );
        row(
            "end-to-end latency p50 / p99 (retries incl.)",
            format!(
                "{:.1} / {:.1} ms",
                millis(percentile(&self.end_to_end, 50)),
                millis(percentile(&self.end_to_end, 99))
            ),
        );
        if let Some(rss) = self.peak_rss_bytes {
            row("peak resident memory", format!("{:.0} MiB", mib(rss)));
        }
    }

    fn record(&self, sizes: &Sizes, figures: &mut serde_json::Map<String, serde_json::Value>) {
        let mut put = |k: &str, v: serde_json::Value| {
            figures.insert(k.into(), v);
        };
        put("clients", sizes.clients.into());
        put("changes_per_sync", sizes.changes.into());
        put("items", sizes.items.into());
        put("seconds", sizes.seconds.into());
        put("smoke", sizes.smoke.into());
        put("elapsed_s", round1(self.elapsed.as_secs_f64()).into());
        put("setup_s", round1(self.setup.as_secs_f64()).into());
        put("client_folder_mib", round1(mib(self.folder_bytes)).into());
        put("errors", self.errors.len().into());
        put("busy_retries", self.busy.into());
        put("syncs", self.syncs.into());
        put("syncs_per_s", round2(self.per_second(self.syncs)).into());
        put("changes_made", self.changes_made.into());
        put("changes_unfinished", self.unfinished.into());
        put("changes_applied", self.applied.into());
        put(
            "changes_per_s",
            self.per_second(self.applied).round().into(),
        );
        put("conflicts", self.conflicts.into());
        let p = |xs: &[Duration], q| round1(millis(percentile(xs, q)));
        put("session_p50_ms", p(&self.session, 50).into());
        put("session_p99_ms", p(&self.session, 99).into());
        put("end_to_end_p50_ms", p(&self.end_to_end, 50).into());
        put("end_to_end_p99_ms", p(&self.end_to_end, 99).into());
        put("hub_request_p50_le_ms", self.hub_request_p50_ms.into());
        put("hub_request_p99_le_ms", self.hub_request_p99_ms.into());
        if let Some(rss) = self.peak_rss_bytes {
            put("peak_rss_mib", mib(rss).round().into());
        }
    }
}

fn row(label: &str, value: String) {
    println!("  {label:<48}  {value}");
}

/// The nearest-rank percentile of sorted `xs` (zero when empty).
fn percentile(xs: &[Duration], q: usize) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * xs.len()).div_ceil(100).max(1);
    xs[rank.min(xs.len()) - 1]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn folder_size(path: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            folder_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Copies `from` into `to`, each file synced to disk: otherwise the page cache would
/// write gigabytes of copies back during the timed load, behind the clients' fsyncs.
fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_folder(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    Ok(())
}

/// The process's peak resident set (Linux `VmHWM`), or `None` elsewhere.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

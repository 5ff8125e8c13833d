//! The one helper every sync test goes through: named replicas in a temporary folder,
//! a manual clock, and one-line syncs, so each test reads like its scenario.
//!
//! A `Net` routes its sessions directly between the replicas' folders, or
//! ([`Route::ThroughHub`]) through a real hub on loopback hosting one side of each
//! session, so the same scenario checks the engine and the hub protocol.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use knit::hub::{HubConfig, RemoteReplica, RunningHub};
use knit::{
    run_session, Clock, ClockVector, ConflictPolicy, ItemId, NoObserver, Peer, Replica, ReplicaId,
    SessionOptions, SessionStats, SyncObserver, SyncReport,
};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A clock that moves one millisecond per reading, so every change gets a distinct,
/// increasing time and last-writer-wins follows the order a test makes changes in.
#[derive(Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn starting_at(ms: u64) -> Arc<Self> {
        Arc::new(Self(AtomicU64::new(ms)))
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

pub fn id(s: &str) -> ItemId {
    ItemId::try_from(s).expect("short test id")
}

/// How a [`Net`] runs its sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Between the two replicas' folders, in this process.
    Direct,
    /// Through a hub on loopback: for each session the Net closes one of the two
    /// replicas, starts a hub hosting its folder, reaches it with a `RemoteReplica`,
    /// and reopens the folder once the hub has shut down (see [`Net::session`]).
    ThroughHub,
}

/// The bearer token of every hub a `Net` starts; bound to the local side's replica id.
const HUB_TOKEN: &str = "net-scenario-token-0123456789";

/// Which side of a session a hub hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hosted {
    Source,
    Destination,
}

/// Named replicas sharing one temporary folder and one clock.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub replicas: BTreeMap<String, Replica>,
    route: Route,
    /// Replicas the test assembled from parts (another item store): only this process
    /// can hold them, so a hub never hosts one.
    built: BTreeSet<String>,
}

impl Net {
    /// Replicas whose sessions run directly between their folders.
    pub fn new(names: &[&str]) -> Self {
        Self::with_route(names, Route::Direct)
    }

    pub fn with_route(names: &[&str], route: Route) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::starting_at(1_000_000);
        let mut net = Self {
            dir,
            clock,
            replicas: BTreeMap::new(),
            route,
            built: BTreeSet::new(),
        };
        for name in names {
            net.add(name);
        }
        net
    }

    pub fn route(&self) -> Route {
        self.route
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn add(&mut self, name: &str) {
        let mut r = Replica::create(&self.path(name)).expect("create replica");
        r.set_clock(self.clock.clone());
        self.replicas.insert(name.to_string(), r);
    }

    /// Adds a replica the test assembled from parts (for example on another item
    /// store). It stays in this process on every route: a hub would open its folder
    /// with the built-in store, so through a hub the peer of each of its sessions is
    /// hosted instead.
    pub fn add_built(&mut self, name: &str, replica: Replica) {
        self.built.insert(name.to_string());
        self.replicas.insert(name.to_string(), replica);
    }

    /// Closes and reopens a replica (as a new process would).
    pub fn reopen(&mut self, name: &str) {
        self.replicas.remove(name);
        self.built.remove(name);
        let mut r = Replica::open(&self.path(name)).expect("reopen replica");
        r.set_clock(self.clock.clone());
        self.replicas.insert(name.to_string(), r);
    }

    pub fn r(&mut self, name: &str) -> &mut Replica {
        self.replicas.get_mut(name).expect("known replica")
    }

    pub fn put(&mut self, name: &str, key: &str, value: &str) -> knit::Version {
        self.r(name).put(&id(key), value.as_bytes()).expect("put")
    }

    pub fn del(&mut self, name: &str, key: &str) -> knit::Version {
        self.r(name)
            .delete(&id(key))
            .expect("delete")
            .expect("was live")
    }

    pub fn get(&mut self, name: &str, key: &str) -> Option<String> {
        self.r(name)
            .get(&id(key))
            .expect("get")
            .map(|v| String::from_utf8(v).expect("utf8"))
    }

    /// Runs `run(source, destination, clock)`, the work of one session `source →
    /// destination` under `policy`, on this Net's route: with the two replicas
    /// themselves, or with one of them hosted by a hub and reached over HTTP.
    ///
    /// Through a hub, the hub hosts the destination when it may apply the uploads
    /// itself, and otherwise the source:
    /// - an application-defined policy is code in this process and cannot travel to a
    ///   hub, so its conflicts are settled at a local destination;
    /// - a hub refuses an upload that teaches it versions of replicas other than the
    ///   client's own (docs/protocol.md, "Why a token is bound to replica ids"), so a
    ///   session relaying a third replica's versions downloads from the hub instead;
    /// - a replica built from parts never leaves this process.
    pub fn session<R>(
        &mut self,
        source: &str,
        destination: &str,
        policy: &ConflictPolicy,
        run: impl FnOnce(&mut dyn Peer, &mut dyn Peer, &dyn Clock) -> R,
    ) -> R {
        match self.hosted_side(source, destination, policy) {
            None => {
                let mut src = self.replicas.remove(source).expect("known source");
                let result = {
                    let dst = self
                        .replicas
                        .get_mut(destination)
                        .expect("known destination");
                    run(&mut src, dst, &*self.clock)
                };
                self.replicas.insert(source.to_string(), src);
                result
            }
            Some(Hosted::Destination) => {
                self.through_hub(destination, source, |local, hub, clock| {
                    run(local, hub, clock)
                })
            }
            Some(Hosted::Source) => self.through_hub(source, destination, |local, hub, clock| {
                run(hub, local, clock)
            }),
        }
    }

    /// One session `source → destination`.
    pub fn sync_with(
        &mut self,
        source: &str,
        destination: &str,
        options: &SessionOptions,
        observer: &mut dyn SyncObserver,
    ) -> Result<SessionStats, knit::SyncError> {
        self.session(source, destination, &options.policy, |src, dst, clock| {
            run_session(src, dst, options, observer, clock)
        })
    }

    /// `local.sync_with(remote)`: the sessions `options.direction` asks for, run from
    /// `local`. Through a hub, the hub hosts `remote`, as a server would, whatever the
    /// policy and whatever `local` relays: a hub refusing the upload is an error here.
    pub fn sync_pair(
        &mut self,
        local: &str,
        remote: &str,
        options: &SessionOptions,
        observer: &mut dyn SyncObserver,
    ) -> Result<SyncReport, knit::SyncError> {
        if self.route == Route::ThroughHub {
            assert!(
                !self.built.contains(remote),
                "replica {remote} was built from parts; a hub cannot host it"
            );
            return self.through_hub(remote, local, |local, hub, _| {
                local.sync_with(hub, options, observer)
            });
        }
        let mut peer = self.replicas.remove(remote).expect("known remote replica");
        let result = self.r(local).sync_with(&mut peer, options, observer);
        self.replicas.insert(remote.to_string(), peer);
        result
    }

    pub fn sync_policy(
        &mut self,
        source: &str,
        destination: &str,
        policy: ConflictPolicy,
    ) -> SessionStats {
        let options = SessionOptions {
            policy,
            batch_size: 2,
            ..SessionOptions::default()
        };
        self.sync_with(source, destination, &options, &mut NoObserver)
            .expect("sync")
    }

    /// `source → destination` with LastWriterWins and batch size 2.
    pub fn sync(&mut self, source: &str, destination: &str) -> SessionStats {
        self.sync_policy(source, destination, ConflictPolicy::LastWriterWins)
    }

    pub fn items(&mut self, name: &str) -> Vec<(String, String)> {
        items_of(self.r(name))
    }

    /// The side of `source → destination` a hub hosts on this route; `None` directly.
    fn hosted_side(
        &mut self,
        source: &str,
        destination: &str,
        policy: &ConflictPolicy,
    ) -> Option<Hosted> {
        if self.route == Route::Direct {
            return None;
        }
        let travels = !matches!(policy, ConflictPolicy::ApplicationDefined(_));
        if travels && !self.built.contains(destination) && !self.relays(source, destination) {
            return Some(Hosted::Destination);
        }
        assert!(
            !self.built.contains(source),
            "{source} → {destination}: no side of this session can be hosted by a hub"
        );
        Some(Hosted::Source)
    }

    /// True when `source` knows versions of replicas other than itself that
    /// `destination` does not: a session between them may teach those.
    fn relays(&mut self, source: &str, destination: &str) -> bool {
        let own = self.r(source).id();
        let others = self
            .r(source)
            .knowledge()
            .map_vectors(|v| ClockVector::from_pairs(v.iter().filter(|(r, _)| *r != own)));
        !self.r(destination).knowledge().contains_knowledge(&others)
    }

    /// Runs `run(local, hub, clock)` with replica `hosted` served by a hub on loopback
    /// that `local` reaches as a [`RemoteReplica`]. The hub opens `hosted`'s folder
    /// with this Net's clock and owns it until it shuts down; the Net then reopens it.
    fn through_hub<R>(
        &mut self,
        hosted: &str,
        local: &str,
        run: impl FnOnce(&mut Replica, &mut RemoteReplica, &dyn Clock) -> R,
    ) -> R {
        // sled locks a folder for the process holding it: the hub must be its only owner.
        self.replicas.remove(hosted).expect("known hosted replica");
        let peer = self.r(local).id();
        let config = hub_config(self.dir.path(), hosted, peer);
        let hub = RunningHub::start_with_clock(config, self.clock.clone()).expect("start hub");
        let mut remote =
            RemoteReplica::connect(&hub.replica_url(hosted), HUB_TOKEN, Duration::from_secs(30))
                .expect("connect to the hub");
        let result = {
            let local = self.replicas.get_mut(local).expect("known local replica");
            run(local, &mut remote, &*self.clock)
        };
        drop(remote);
        // Shutting down rolls back whatever session is still open, which would hide a
        // session the client failed to end: none may be.
        assert_eq!(
            sessions_open(&hub),
            0,
            "a session with hosted replica {hosted} is still open at the hub"
        );
        hub.shutdown().expect("hub shutdown");
        self.reopen(hosted);
        result
    }
}

/// A hub on an ephemeral loopback port hosting replica `hosted` from `data`, with one
/// token that may read and write it as replica `peer`.
fn hub_config(data: &Path, hosted: &str, peer: ReplicaId) -> HubConfig {
    let text = format!(
        r#"listen = "127.0.0.1:0"
data = '{data}'

[replicas.{hosted}]

[tokens.net]
token = "{HUB_TOKEN}"
read = ["{hosted}"]
write = ["{hosted}"]
replica_ids = ["{peer}"]
"#,
        data = data.display(),
    );
    HubConfig::parse(&text, &data.join("hub.toml"), |_| None).expect("hub config")
}

/// The `knit_sessions_open` gauge of a hub's metrics page.
fn sessions_open(hub: &RunningHub) -> u64 {
    let url = format!("http://{}/metrics", hub.addr());
    let page = reqwest::blocking::get(&url)
        .and_then(|r| r.text())
        .expect("metrics page");
    page.lines()
        .find_map(|line| line.strip_prefix("knit_sessions_open "))
        .and_then(|n| n.trim().parse().ok())
        .expect("the metrics page shows knit_sessions_open")
}

/// The connection string of the test PostgreSQL server (`KNIT_TEST_PG`, which
/// scripts/test sets after starting one). Without it a PostgreSQL test is skipped with
/// a line saying so, except under CI, where a skipped test would hide a broken setup:
/// there it fails.
pub fn pg_conninfo() -> Option<String> {
    match std::env::var("KNIT_TEST_PG") {
        Ok(conninfo) if !conninfo.trim().is_empty() => Some(conninfo),
        _ => {
            let test = std::thread::current()
                .name()
                .unwrap_or("a PostgreSQL test")
                .to_string();
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: KNIT_TEST_PG is not set; run the tests with scripts/test, which starts PostgreSQL");
            }
            // Straight to stderr: the test harness would swallow `eprintln!` of a
            // passing test, and the skip must show.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipped {test}: KNIT_TEST_PG is not set (scripts/test starts PostgreSQL and sets it)"
            );
            None
        }
    }
}

/// `knit serve --config CONFIG` as a child process, with the base URL
/// (`http://127.0.0.1:PORT`) it printed once it was listening.
pub fn spawn_hub(
    config: &std::path::Path,
) -> Result<(std::process::Child, String), Box<dyn std::error::Error>> {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_knit"))
        .args(["serve", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .ok_or_else(|| format!("the hub printed no URL: {line:?}"))?
        .to_string();
    Ok((child, url))
}

/// A replica's live items as `(key, value)` text, in key order.
pub fn items_of(replica: &Replica) -> Vec<(String, String)> {
    replica
        .items()
        .expect("items")
        .into_iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k.as_bytes().to_vec()).expect("utf8"),
                String::from_utf8(v).expect("utf8"),
            )
        })
        .collect()
}

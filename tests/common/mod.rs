//! The one helper every sync test goes through: named replicas in a temporary folder,
//! a manual clock, and one-line syncs, so each test reads like its scenario.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use knit::{
    run_session, Clock, ConflictPolicy, ItemId, NoObserver, Replica, SessionOptions, SessionStats,
    SyncObserver,
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

/// Named replicas sharing one temporary folder and one clock.
pub struct Net {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub replicas: BTreeMap<String, Replica>,
}

impl Net {
    pub fn new(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::starting_at(1_000_000);
        let mut net = Self {
            dir,
            clock,
            replicas: BTreeMap::new(),
        };
        for name in names {
            net.add(name);
        }
        net
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn add(&mut self, name: &str) {
        let mut r = Replica::create(&self.path(name)).expect("create replica");
        r.set_clock(self.clock.clone());
        self.replicas.insert(name.to_string(), r);
    }

    /// Closes and reopens a replica (as a new process would).
    pub fn reopen(&mut self, name: &str) {
        self.replicas.remove(name);
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

    /// One session `source → destination`.
    pub fn sync_with(
        &mut self,
        source: &str,
        destination: &str,
        options: &SessionOptions,
        observer: &mut dyn SyncObserver,
    ) -> Result<SessionStats, knit::SyncError> {
        let mut src = self.replicas.remove(source).expect("known source");
        let result = {
            let dst = self
                .replicas
                .get_mut(destination)
                .expect("known destination");
            run_session(&mut src, dst, options, observer, &*self.clock)
        };
        self.replicas.insert(source.to_string(), src);
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
        self.r(name)
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

//! Counters for `/metrics`, in the Prometheus text exposition format (version 0.0.4).
//!
//! Plain atomics: a scrape reads each counter once, so two counters may disagree by the
//! requests between their reads, never more.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::sync::BatchOutcome;

/// Upper bounds (seconds) of the request latency histogram's buckets.
const BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
pub(super) struct Metrics {
    sessions_started: AtomicU64,
    sessions_completed: AtomicU64,
    sessions_rolled_back: AtomicU64,
    sessions_timed_out: AtomicU64,
    sessions_failed: AtomicU64,
    changes_sent: AtomicU64,
    changes_applied: AtomicU64,
    changes_failed: AtomicU64,
    conflicts: AtomicU64,
    requests: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_micros: AtomicU64,
}

impl Metrics {
    pub fn session_started(&self) {
        self.sessions_started.fetch_add(1, Relaxed);
    }

    pub fn session_ended(&self, outcome: &str) {
        let counter = match outcome {
            "completed" => &self.sessions_completed,
            "timed out" => &self.sessions_timed_out,
            "error" => &self.sessions_failed,
            _ => &self.sessions_rolled_back,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn changes_sent(&self, n: u64) {
        self.changes_sent.fetch_add(n, Relaxed);
    }

    pub fn applied(&self, outcome: &BatchOutcome) {
        self.changes_applied.fetch_add(outcome.applied, Relaxed);
        self.changes_failed.fetch_add(outcome.failed, Relaxed);
        self.conflicts.fetch_add(outcome.conflicts.total(), Relaxed);
    }

    pub fn request(&self, status: u16, took: Duration) {
        self.requests.fetch_add(1, Relaxed);
        match status {
            400..=499 => self.client_errors.fetch_add(1, Relaxed),
            500..=599 => self.server_errors.fetch_add(1, Relaxed),
            _ => 0,
        };
        let secs = took.as_secs_f64();
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                bucket.fetch_add(1, Relaxed);
            }
        }
        self.latency_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn render(&self, sessions_open: u64) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP knit_{name} {help}\n# TYPE knit_{name} counter");
            for (labels, value) in samples {
                let _ = writeln!(out, "knit_{name}{labels} {value}");
            }
        };
        let get = |c: &AtomicU64| c.load(Relaxed);
        counter(
            "sessions_total",
            "Sessions begun, and how they ended.",
            &[
                ("{outcome=\"begun\"}", get(&self.sessions_started)),
                ("{outcome=\"completed\"}", get(&self.sessions_completed)),
                ("{outcome=\"rolled_back\"}", get(&self.sessions_rolled_back)),
                ("{outcome=\"timed_out\"}", get(&self.sessions_timed_out)),
                ("{outcome=\"error\"}", get(&self.sessions_failed)),
            ],
        );
        counter(
            "changes_total",
            "Changes sent by hosted replicas and applied or failed at them.",
            &[
                ("{direction=\"sent\"}", get(&self.changes_sent)),
                ("{direction=\"applied\"}", get(&self.changes_applied)),
                ("{direction=\"failed\"}", get(&self.changes_failed)),
            ],
        );
        counter(
            "conflicts_total",
            "Conflicts detected while applying batches at hosted replicas.",
            &[("", get(&self.conflicts))],
        );
        counter(
            "requests_total",
            "HTTP requests answered, by class.",
            &[
                ("{class=\"all\"}", get(&self.requests)),
                ("{class=\"4xx\"}", get(&self.client_errors)),
                ("{class=\"5xx\"}", get(&self.server_errors)),
            ],
        );
        let _ = writeln!(
            out,
            "# HELP knit_sessions_open Sessions in progress.\n# TYPE knit_sessions_open gauge\nknit_sessions_open {sessions_open}"
        );
        let _ = writeln!(
            out,
            "# HELP knit_request_seconds Request latency.\n# TYPE knit_request_seconds histogram"
        );
        for (bucket, bound) in self.latency_buckets.iter().zip(BUCKETS) {
            let _ = writeln!(
                out,
                "knit_request_seconds_bucket{{le=\"{bound}\"}} {}",
                get(bucket)
            );
        }
        let count = get(&self.requests);
        let _ = writeln!(out, "knit_request_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "knit_request_seconds_sum {}\nknit_request_seconds_count {count}",
            get(&self.latency_micros) as f64 / 1e6
        );
        out
    }
}

//! `knit sync`: options from flags, a progress line on a terminal, and the statistics
//! as a one-line summary or one JSON object.

use std::io::{IsTerminal, Write};
use std::path::Path;

use serde_json::json;

use super::{flush, in_dir, open, CliResult, Failure};
use crate::model::{ItemId, ReplicaId};
use crate::stores::Replica;
use crate::sync::Peer;
use crate::sync::{
    ConflictKind, ConflictOutcome, ConflictPolicy, Direction, Progress, SessionOptions,
    SessionStats, SyncObserver, SyncReport,
};

pub(super) struct SyncArgs {
    pub direction: Direction,
    pub policy: ConflictPolicy,
    pub batch_size: usize,
    pub json: bool,
}

pub(super) fn sync(
    local_dir: &Path,
    remote_dir: &Path,
    args: &SyncArgs,
    out: &mut dyn Write,
) -> CliResult {
    if let Some(url) = remote_dir.to_str().filter(|t| crate::hub::is_hub_url(t)) {
        let token = std::env::var(TOKEN_ENV).map_err(|_| {
            Failure::Error(format!(
                "{url}: set {TOKEN_ENV} to the bearer token the hub's config grants this replica"
            ))
        })?;
        let mut local = open(local_dir)?;
        let mut remote = crate::hub::RemoteReplica::connect(
            url,
            &token,
            std::time::Duration::from_secs(HUB_REQUEST_TIMEOUT_SECS),
        )
        .map_err(|e| Failure::Error(e.to_string()))?;
        // The hub makes what it committed durable itself.
        return run(
            &mut local,
            local_dir,
            &mut remote,
            url,
            |_| Ok(()),
            args,
            out,
        );
    }
    // Opening one folder twice would fail on sled's lock with a misleading "in use".
    if let (Ok(a), Ok(b)) = (local_dir.canonicalize(), remote_dir.canonicalize()) {
        if a == b {
            return Err(Failure::Error(format!(
                "{}: LOCAL and REMOTE are the same replica",
                local_dir.display()
            )));
        }
    }
    let mut local = open(local_dir)?;
    let mut remote = open(remote_dir)?;
    let name = remote_dir.display().to_string();
    run(
        &mut local,
        local_dir,
        &mut remote,
        &name,
        |remote| flush(remote, remote_dir),
        args,
        out,
    )
}

/// The environment variable `knit sync` reads a hub's bearer token from: a token on
/// the command line would show in `ps` and in shell history.
pub(super) const TOKEN_ENV: &str = "KNIT_TOKEN";

/// Seconds one request to a hub may take before the client gives up.
const HUB_REQUEST_TIMEOUT_SECS: u64 = 120;

/// Syncs `local` with `remote` (named `remote_name` in messages), makes both durable
/// and prints the statistics.
fn run<P: Peer>(
    local: &mut Replica,
    local_dir: &Path,
    remote: &mut P,
    remote_name: &str,
    flush_remote: impl FnOnce(&mut P) -> CliResult,
    args: &SyncArgs,
    out: &mut dyn Write,
) -> CliResult {
    let options = SessionOptions {
        direction: args.direction,
        policy: args.policy.clone(),
        batch_size: args.batch_size,
        ..SessionOptions::default()
    };
    let show_progress = !args.json && std::io::stderr().is_terminal();
    let mut observer = Observer::new(local.id(), show_progress);
    let result = local.sync_with(remote, &options, &mut observer);
    observer.clear_progress();
    // Committed batches stay committed even if the session failed: make them durable.
    let flushed = flush(local, local_dir).and(flush_remote(remote));
    let report = result.map_err(|e| {
        let message = e.to_string();
        let l = local_dir.display().to_string();
        if message.contains(&l) || message.contains(remote_name) {
            Failure::Error(message)
        } else {
            Failure::Error(format!("sync {l} {remote_name}: {message}"))
        }
    })?;
    flushed?;
    observer.report_failures();
    if args.json {
        writeln!(out, "{}", report_json(&report))?;
    } else {
        writeln!(out, "{}", summary(&report))?;
    }
    Ok(())
}

/// Collects what a session reports and, on a terminal, draws a progress line on stderr.
pub(super) struct Observer {
    local: ReplicaId,
    show_progress: bool,
    drawn: bool,
    pub conflicts: Vec<(ItemId, ConflictKind, ConflictOutcome)>,
    failures: Vec<(ItemId, String)>,
}

/// Failed items listed after a sync; the rest are counted.
const FAILURES_SHOWN: usize = 10;

impl Observer {
    pub fn new(local: ReplicaId, show_progress: bool) -> Self {
        Self {
            local,
            show_progress,
            drawn: false,
            conflicts: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn clear_progress(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            self.drawn = false;
        }
    }

    /// Items that were not applied come back next sync; say which and why.
    fn report_failures(&self) {
        for (item, reason) in self.failures.iter().take(FAILURES_SHOWN) {
            eprintln!("knit: item {item} not applied ({reason}); the next sync sends it again");
        }
        if self.failures.len() > FAILURES_SHOWN {
            eprintln!(
                "knit: ... and {} more items not applied",
                self.failures.len() - FAILURES_SHOWN
            );
        }
    }
}

impl SyncObserver for Observer {
    fn conflict(&mut self, item: &ItemId, kind: ConflictKind, outcome: ConflictOutcome) {
        self.conflicts.push((item.clone(), kind, outcome));
    }

    fn item_failed(&mut self, item: &ItemId, reason: &str) {
        self.failures.push((item.clone(), reason.to_string()));
    }

    fn progress(&mut self, p: &Progress) {
        if !self.show_progress {
            return;
        }
        let direction = if p.source == self.local {
            "upload"
        } else {
            "download"
        };
        let batches = plural(p.batches_done, "batch", "batches");
        let line = match p.changes_total {
            Some(total) if total > 0 => {
                const WIDTH: u64 = 30;
                let filled = (p.changes_done.min(total) * WIDTH) / total;
                let bar: String = (0..WIDTH)
                    .map(|i| if i < filled { '#' } else { '.' })
                    .collect();
                format!(
                    "{direction} [{bar}] {}/{total} changes, {batches}",
                    p.changes_done
                )
            }
            _ => format!("{direction} {} changes, {batches}", p.changes_done),
        };
        eprint!("\r{line}\x1b[K");
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `upload: 3 sent, 3 applied, 0 skipped, 0 failed, 1 conflict; download: ...`
pub(super) fn summary(report: &SyncReport) -> String {
    let mut parts = Vec::new();
    for (name, stats) in [("upload", &report.upload), ("download", &report.download)] {
        if let Some(s) = stats {
            parts.push(format!("{name}: {}", stats_line(s)));
        }
    }
    parts.join("; ")
}

pub(super) fn stats_line(s: &SessionStats) -> String {
    let mut line = format!(
        "{} sent, {} applied, {} skipped, {} failed, {}",
        s.changes_sent,
        s.changes_applied,
        s.changes_skipped,
        s.changes_failed,
        plural(s.conflicts.total(), "conflict", "conflicts")
    );
    if s.forgotten_removed > 0 {
        line.push_str(&format!(
            ", {} removed (deleted at the source)",
            s.forgotten_removed
        ));
    }
    if s.full_enumeration {
        line.push_str(", full enumeration");
    }
    if s.cancelled {
        line.push_str(", cancelled");
    }
    line
}

fn report_json(report: &SyncReport) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    if let Some(s) = &report.upload {
        object.insert("upload".into(), stats_json(s));
    }
    if let Some(s) = &report.download {
        object.insert("download".into(), stats_json(s));
    }
    serde_json::Value::Object(object)
}

fn stats_json(s: &SessionStats) -> serde_json::Value {
    let c = &s.conflicts;
    json!({
        "source": s.source.map(|r| r.to_string()),
        "destination": s.destination.map(|r| r.to_string()),
        "batches": s.batches,
        "changes_sent": s.changes_sent,
        "changes_applied": s.changes_applied,
        "changes_skipped": s.changes_skipped,
        "changes_failed": s.changes_failed,
        "conflicts": c.total(),
        "conflict_outcomes": {
            "source_won": c.source_won,
            "destination_won": c.destination_won,
            "merged": c.merged,
            "saved": c.saved,
            "skipped": c.skipped,
        },
        "forgotten_removed": s.forgotten_removed,
        "bytes": s.bytes,
        "full_enumeration": s.full_enumeration,
        "cancelled": s.cancelled,
    })
}

/// Syncs two open replicas with the defaults people get (used by the demo).
pub(super) fn sync_open(
    local: &mut Replica,
    local_dir: &Path,
    remote: &mut Replica,
    observer: &mut Observer,
) -> Result<SyncReport, Failure> {
    let report = local
        .sync_with(remote, &SessionOptions::default(), observer)
        .map_err(|e| in_dir(local_dir, e))?;
    observer.report_failures();
    Ok(report)
}

//! `knit run`: runs a schema file's schemas through `SyncManager`, one result per schema
//! (text, or one JSON object per line), a progress bar per schema on a terminal, Ctrl-C
//! to stop between batches, and `--every` to repeat.
//!
//! Exit status: 0 when every schema ended `success`; 1 when any was invalid (and so
//! skipped), partial, failed or cancelled; 2 for an error (a missing file, an unknown
//! schema id). With `--every`, the last round that finished decides.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::schema_cmd::{
    duration_text, error_line, problem_json, status_name, watermark_text, Place, Reach,
};
use super::{CliResult, Failure};
use crate::schema::{
    ConflictType, RowConflict, RowError, RunPhase, RunProgress, RunReport, RunStatus, SyncManager,
    Winner,
};
use crate::stores::Value;
use crate::sync::CancelToken;

/// What `knit run` was asked to do.
pub(super) struct RunArgs {
    pub place: Place,
    /// The schemas to run, in this order; empty is every schema in file order.
    pub schemas: Vec<String>,
    pub every: Option<Duration>,
    pub json: bool,
}

/// How one schema of a round ended.
pub(super) struct Outcome {
    pub schema: String,
    /// `success`, `partial`, `failed`, `cancelled`, or `invalid` for a skipped schema.
    pub status: String,
}

pub(super) fn run(args: &RunArgs, out: &mut dyn Write) -> CliResult {
    let cancel = CancelToken::new();
    on_ctrl_c(&cancel)?;
    let mut round = 1u64;
    loop {
        if args.every.is_some() && !args.json {
            if round > 1 {
                writeln!(out)?;
            }
            writeln!(out, "round {round}")?;
        }
        let outcomes = run_round(&args.place, &args.schemas, &cancel, args.json, out)?;
        out.flush()?;
        let Some(every) = args.every else {
            return verdict(&outcomes);
        };
        if cancel.is_cancelled() || !sleep_unless_cancelled(every, &cancel) {
            return verdict(&outcomes);
        }
        round += 1;
    }
}

/// Runs the schemas once (reloading the schema file, so edits between rounds count)
/// and prints one result per schema.
pub(super) fn run_round(
    place: &Place,
    only: &[String],
    cancel: &CancelToken,
    json: bool,
    out: &mut dyn Write,
) -> Result<Vec<Outcome>, Failure> {
    let mut manager = place.manager(Reach::Datasources)?;
    let ids = chosen(&manager, only, place)?;
    if ids.is_empty() && !json {
        writeln!(out, "no schemas in {}", place.file.display())?;
    }
    let mut bar = Bar::new(!json && std::io::stderr().is_terminal());
    let mut outcomes = Vec::new();
    for id in ids {
        if cancel.is_cancelled() {
            // Schemas not started are not run: a cancelled run stops the whole round.
            outcomes.push(Outcome {
                schema: id,
                status: "not run".into(),
            });
            continue;
        }
        let problems = manager.validate_schema(&id);
        if !problems.is_empty() {
            if json {
                let value = json!({
                    "schema": id,
                    "status": "invalid",
                    "problems": problems.iter().map(problem_json).collect::<Vec<_>>(),
                });
                writeln!(out, "{value}")?;
            } else {
                writeln!(
                    out,
                    "{id}: invalid, skipped ({} problem(s))",
                    problems.len()
                )?;
                for p in &problems {
                    writeln!(out, "  problem   {p}")?;
                }
            }
            outcomes.push(Outcome {
                schema: id,
                status: "invalid".into(),
            });
            continue;
        }
        let result = manager.sync(&id, cancel, &mut |p| bar.draw(p));
        bar.clear();
        let report = result.map_err(|e| Failure::Error(error_line(&e)))?;
        if json {
            writeln!(out, "{}", report_json(&report))?;
        } else {
            write_report(out, &report)?;
        }
        out.flush()?;
        outcomes.push(Outcome {
            schema: id,
            status: status_name(report.status).to_string(),
        });
    }
    Ok(outcomes)
}

/// The ids to run: every schema in file order, or the ones asked for in that order.
fn chosen(manager: &SyncManager, only: &[String], place: &Place) -> Result<Vec<String>, Failure> {
    if only.is_empty() {
        return Ok(manager.schemas().iter().map(|s| s.id.clone()).collect());
    }
    for id in only {
        if manager.schema(id).is_err() {
            let known: Vec<&str> = manager.schemas().iter().map(|s| s.id.as_str()).collect();
            return Err(Failure::Error(format!(
                "{}: no schema {id:?} (known: {})",
                place.file.display(),
                known.join(", ")
            )));
        }
    }
    Ok(only.to_vec())
}

/// Exit 0 when every schema succeeded, 1 (with the list) otherwise.
pub(super) fn verdict(outcomes: &[Outcome]) -> CliResult {
    let not_ok: Vec<String> = outcomes
        .iter()
        .filter(|o| o.status != status_name(RunStatus::Success))
        .map(|o| format!("{} ({})", o.schema, o.status))
        .collect();
    if not_ok.is_empty() {
        Ok(())
    } else {
        Err(Failure::Negative(format!(
            "{} of {} schema(s) did not succeed: {}",
            not_ok.len(),
            outcomes.len(),
            not_ok.join(", ")
        )))
    }
}

/// The first Ctrl-C cancels the run (it stops between batches and is recorded as
/// cancelled); a second one exits at once, for a run stuck on a slow datasource.
fn on_ctrl_c(cancel: &CancelToken) -> CliResult {
    let cancel = cancel.clone();
    let presses = AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        if presses.fetch_add(1, Ordering::SeqCst) == 0 {
            cancel.cancel();
            eprintln!(
                "\nknit: interrupted; stopping after the current batch (Ctrl-C again quits at once)"
            );
        } else {
            // 128 + SIGINT, as a shell reports a process killed by Ctrl-C.
            std::process::exit(130);
        }
    })
    .map_err(|e| Failure::Error(format!("cannot install the Ctrl-C handler: {e}")))
}

/// Sleeps `total` in short steps so that Ctrl-C is heard at once; false if cancelled.
fn sleep_unless_cancelled(total: Duration, cancel: &CancelToken) -> bool {
    const STEP: Duration = Duration::from_millis(100);
    let until = Instant::now() + total;
    loop {
        if cancel.is_cancelled() {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep(STEP.min(until - now));
    }
}

/// `--every`: `30s`, `5m`, `1h`, or a plain number of seconds; at least one second.
pub(super) fn parse_every(text: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "expected a number of seconds, or a number followed by s, m or h (30s, 5m, 1h), \
             not {text:?}"
        )
    };
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let seconds_per_unit: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!(
            "an interval of at least 1s is needed (30s, 5m, 1h), not {text:?}"
        ));
    }
    n.checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long an interval"))
}

/// One progress line per schema on stderr, redrawn in place.
struct Bar {
    show: bool,
    drawn: bool,
}

impl Bar {
    const WIDTH: u64 = 20;

    fn new(show: bool) -> Self {
        Self { show, drawn: false }
    }

    fn draw(&mut self, p: &RunProgress) {
        if !self.show {
            return;
        }
        let line = match (p.phase, p.total) {
            (RunPhase::Reading, _) | (_, None) => {
                format!("{} reading, {} rows so far", p.schema, p.rows_read)
            }
            (_, Some(total)) => {
                // Nothing to move is all done.
                let filled = (p.done.min(total) * Self::WIDTH)
                    .checked_div(total)
                    .unwrap_or(Self::WIDTH);
                let bar: String = (0..Self::WIDTH)
                    .map(|i| if i < filled { '#' } else { ' ' })
                    .collect();
                format!("{} [{bar}] {}/{total} rows", p.schema, p.done)
            }
        };
        eprint!("\r{line}\x1b[K");
        let _ = std::io::stderr().flush();
        self.drawn = true;
    }

    fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            let _ = std::io::stderr().flush();
            self.drawn = false;
        }
    }
}

/// A report for people: the figures on one line, then conflicts, failed rows,
/// warnings and the watermark.
pub(super) fn write_report(out: &mut dyn Write, r: &RunReport) -> CliResult {
    writeln!(
        out,
        "{}: {} in {}: read {}, inserted {}, updated {}, deleted {}, skipped {}, failed {}, \
         conflicts {}",
        r.schema,
        status_name(r.status),
        duration_text(r.duration_ms),
        r.rows_read,
        r.inserted,
        r.updated,
        r.deleted,
        r.skipped,
        r.failed,
        r.conflicts.len()
    )?;
    if r.status == RunStatus::Failed || r.status == RunStatus::Cancelled {
        writeln!(out, "  message   {}", r.message)?;
    }
    for c in &r.conflicts {
        writeln!(out, "  conflict  {}", conflict_text(c))?;
    }
    for e in &r.errors {
        writeln!(out, "  failed    {}", row_error_text(e))?;
    }
    for w in &r.warnings {
        writeln!(out, "  warning   {w}")?;
    }
    if r.watermark_before.is_some() || r.watermark_after.is_some() {
        writeln!(
            out,
            "  watermark {}",
            watermark_text(r.watermark_before.as_deref(), r.watermark_after.as_deref())
        )?;
    }
    Ok(())
}

fn conflict_text(c: &RowConflict) -> String {
    let field = c
        .field
        .as_deref()
        .map_or_else(|| "whole row".to_string(), |f| format!("field {f}"));
    let value = |v: &Option<Value>| v.as_ref().map_or("(none)".to_string(), Value::to_string);
    format!(
        "key {}, {field}: {}; source {}, destination {} -> {}",
        c.key.join(", "),
        conflict_kind(c.kind),
        value(&c.source),
        value(&c.destination),
        winner_text(c.winner)
    )
}

fn conflict_kind(kind: ConflictType) -> &'static str {
    match kind {
        ConflictType::UpdateUpdate => "both sides updated it",
        ConflictType::UpdateDelete => "updated on one side, deleted on the other",
    }
}

fn winner_text(winner: Winner) -> &'static str {
    match winner {
        Winner::Source => "source won",
        Winner::Destination => "destination won",
        Winner::Unresolved => "left unresolved",
    }
}

fn winner_name(winner: Winner) -> &'static str {
    match winner {
        Winner::Source => "source",
        Winner::Destination => "destination",
        Winner::Unresolved => "unresolved",
    }
}

/// A failed row; a problem of the whole run has no key and shows only its reason.
fn row_error_text(e: &RowError) -> String {
    if e.key.is_empty() {
        e.reason.clone()
    } else {
        e.to_string()
    }
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) => json!(f),
        Value::Text(s) => json!(s),
    }
}

/// A report as one JSON object.
pub(super) fn report_json(r: &RunReport) -> serde_json::Value {
    let conflicts: Vec<_> = r
        .conflicts
        .iter()
        .map(|c| {
            json!({
                "key": c.key,
                "field": c.field,
                "kind": match c.kind {
                    ConflictType::UpdateUpdate => "update_update",
                    ConflictType::UpdateDelete => "update_delete",
                },
                "source": c.source.as_ref().map(value_json),
                "destination": c.destination.as_ref().map(value_json),
                "winner": winner_name(c.winner),
            })
        })
        .collect();
    let errors: Vec<_> = r
        .errors
        .iter()
        .map(|e| json!({ "key": e.key, "field": e.field, "reason": e.reason }))
        .collect();
    json!({
        "schema": r.schema,
        "status": status_name(r.status),
        "message": r.message,
        "started": r.started,
        "ended": r.ended,
        "duration_ms": r.duration_ms,
        "rows_read": r.rows_read,
        "inserted": r.inserted,
        "updated": r.updated,
        "deleted": r.deleted,
        "skipped": r.skipped,
        "sent": r.sent,
        "applied": r.applied,
        "failed": r.failed,
        "errors": errors,
        "conflicts": conflicts,
        "warnings": r.warnings,
        "watermark_before": r.watermark_before,
        "watermark_after": r.watermark_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_take_seconds_minutes_or_hours() {
        assert_eq!(parse_every("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_every("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_every("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_every("1h"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "5x",
            "-5s",
            "1.5h",
            "5 s",
            "5d",
            "99999999999999999999h",
        ] {
            assert!(parse_every(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn the_verdict_is_success_only_when_every_schema_succeeded() {
        let outcome = |schema: &str, status: &str| Outcome {
            schema: schema.into(),
            status: status.into(),
        };
        assert!(verdict(&[outcome("a", "success"), outcome("b", "success")]).is_ok());
        match verdict(&[outcome("a", "success"), outcome("b", "invalid")]) {
            Err(Failure::Negative(message)) => {
                assert!(message.contains("b (invalid)"), "{message}")
            }
            other => panic!("want a negative verdict, got {other:?}"),
        }
    }
}

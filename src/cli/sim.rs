//! `knit sim`: runs a scenario file under one seed or a range of seeds, or replays a
//! trace file, and prints one line (or one JSON object) per run. Output depends only on
//! the scenario, the seeds (or the trace) and the commit, so two runs can be compared
//! byte for byte. `--plot FILE.svg` also draws the seeds that passed (the first
//! `MAX_PLOTTED_SEEDS`) over their steps; the file, too, is the same bytes for the same
//! seeds.
//!
//! On a violation, the trace of the first run that violated a check is shrunk to a
//! minimal reproduction (unless `--no-shrink`) and printed as numbered operations;
//! `--trace-out FILE.json` writes it, and `--replay FILE.json` runs it again. Shrinking
//! replays the trace many times, so only the first violation gets a reproduction; the
//! others keep their seed and step. Runs that pass print exactly what they printed
//! before traces existed.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::{CliResult, Failure};
use crate::sim::{
    check_plot_path, plot_reports, replay, shrink, simulate_traced, Scenario, ShrinkOptions,
    SimError, SimReport, SledReplicas, Trace, Violation, MAX_PLOTTED_SEEDS,
};

#[derive(clap::Args, Debug)]
pub(super) struct SimCommand {
    /// The scenario file (TOML); left out with --replay
    #[arg(required_unless_present = "replay")]
    scenario: Option<PathBuf>,
    /// The seed to run (default 0)
    #[arg(long, value_name = "N", conflicts_with_all = ["seeds", "replay"])]
    seed: Option<u64>,
    /// Run every seed from A up to B (B left out)
    #[arg(long, value_name = "A..B", value_parser = parse_seeds, conflicts_with = "replay")]
    seeds: Option<Range<u64>>,
    /// One JSON object per seed
    #[arg(long)]
    json: bool,
    /// Also draw exceptions, tombstones, conflicts and changes sent over the steps
    /// as an SVG file: one line per seed that passed, the first 8 at most
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Run the operations of a trace file (written by --trace-out) instead of a
    /// scenario's seeded schedule
    #[arg(long, value_name = "FILE.json", conflicts_with = "scenario")]
    replay: Option<PathBuf>,
    /// On a violation, keep the trace as recorded instead of shrinking it to a minimal
    /// reproduction
    #[arg(long)]
    no_shrink: bool,
    /// Write the reproduction of the first violation (when every run passed, the full
    /// trace of the first) to FILE.json, for --replay
    #[arg(long, value_name = "FILE.json")]
    trace_out: Option<PathBuf>,
}

/// `A..B`: the seeds from A up to B, B left out (as a Rust range).
pub(super) fn parse_seeds(text: &str) -> Result<Range<u64>, String> {
    let bad = || format!("expected START..END with whole numbers (0..10), not {text:?}");
    let (start, end) = text.split_once("..").ok_or_else(bad)?;
    let (start, end): (u64, u64) = (
        start.trim().parse().map_err(|_| bad())?,
        end.trim().parse().map_err(|_| bad())?,
    );
    if start >= end {
        return Err(format!("{text:?} holds no seed: END must be above START"));
    }
    Ok(start..end)
}

const HEADER: &str =
    "seed   steps   syncs  conflicts  rounds  max exceptions  max knowledge B  tombstones  result";

/// Where the runs come from.
enum Source {
    Scenario(Scenario, Range<u64>),
    Replay(PathBuf, Trace),
}

pub(super) fn sim(args: SimCommand, out: &mut dyn Write) -> CliResult {
    let error = |e: &dyn std::fmt::Display| Failure::Error(e.to_string());
    let source = match (&args.replay, &args.scenario) {
        (Some(file), _) => Source::Replay(file.clone(), Trace::load(file).map_err(|e| error(&e))?),
        (None, Some(file)) => {
            let seeds = args.seeds.clone().unwrap_or_else(|| {
                let seed = args.seed.unwrap_or(0);
                seed..seed.saturating_add(1)
            });
            Source::Scenario(Scenario::load(file).map_err(|e| error(&e))?, seeds)
        }
        // clap requires one of the two.
        (None, None) => return Err(Failure::Error("give a scenario file or --replay".into())),
    };
    // A mistyped folder fails now, not after every seed has run.
    if let Some(plot) = &args.plot {
        check_plot_path(plot).map_err(|e| error(&e))?;
    }
    if let Some(path) = &args.trace_out {
        Trace::check_path(path).map_err(|e| error(&e))?;
    }
    if !args.json {
        match &source {
            Source::Scenario(scenario, _) => writeln!(
                out,
                "scenario {}: {} replicas",
                scenario.name, scenario.replicas
            )?,
            Source::Replay(file, trace) => writeln!(
                out,
                "trace {}: scenario {}, seed {}, {} replicas, {} operations",
                file.display(),
                trace.scenario,
                trace.seed,
                trace.replicas.len(),
                trace.operations.len()
            )?,
        }
        writeln!(out, "{HEADER}")?;
    }
    let mut violations: Vec<Violation> = Vec::new();
    // Only two traces are kept: a long run's trace holds every operation.
    let mut first_trace: Option<Trace> = None;
    let mut violating_trace: Option<Trace> = None;
    // Kept only for the plot, and only as many as it draws: a long run's report holds
    // every step.
    let mut plotted: Vec<SimReport> = Vec::new();
    let mut passed = 0usize;
    let runs: Vec<u64> = match &source {
        Source::Scenario(_, seeds) => seeds.clone().collect(),
        Source::Replay(_, trace) => vec![trace.seed],
    };
    for seed in runs {
        let (result, trace) = match &source {
            Source::Scenario(scenario, _) => {
                let run = simulate_traced(scenario, seed, &mut SledReplicas);
                (run.result, run.trace)
            }
            Source::Replay(_, trace) => (replay(trace), trace.clone()),
        };
        match result {
            Ok(report) => {
                if args.json {
                    writeln!(out, "{}", report_json(&report))?;
                } else {
                    writeln!(out, "{}", report_line(&report))?;
                }
                passed += 1;
                if args.plot.is_some() && plotted.len() < MAX_PLOTTED_SEEDS {
                    plotted.push(report);
                }
            }
            Err(SimError::Violation(violation)) => {
                if args.json {
                    writeln!(
                        out,
                        "{}",
                        json!({"seed": seed, "result": "violation", "violation": *violation})
                    )?;
                } else {
                    writeln!(
                        out,
                        "{seed:>4}  {:>6}  {:>6}  {:>9}  {:>6}  {:>14}  {:>15}  {:>10}  VIOLATION",
                        "-", "-", "-", "-", "-", "-", "-"
                    )?;
                }
                violations.push(*violation);
                if violating_trace.is_none() {
                    violating_trace = Some(trace.clone());
                }
            }
            Err(e) => return Err(error(&e)),
        }
        if first_trace.is_none() && args.trace_out.is_some() {
            first_trace = Some(trace);
        }
    }
    if let Some(plot) = &args.plot {
        write_plot(&plotted, passed, plot, args.json, out)?;
    }
    let (Some(first), Some(trace)) = (violations.first(), violating_trace) else {
        if let (Some(path), Some(trace)) = (&args.trace_out, first_trace) {
            trace.write(path).map_err(|e| error(&e))?;
            if !args.json {
                writeln!(
                    out,
                    "trace: {} (seed {}, {} operations)",
                    path.display(),
                    trace.seed,
                    trace.operations.len()
                )?;
            }
        }
        return Ok(());
    };
    if !args.json {
        for v in &violations {
            writeln!(out, "{v}")?;
        }
    }
    reproduce(first, trace, &args, out)?;
    let what = match &source {
        Source::Scenario(_, seeds) => {
            let seed_list: Vec<String> = violations.iter().map(|v| v.seed.to_string()).collect();
            let scenario = args.scenario.as_deref().unwrap_or(Path::new("scenario"));
            format!(
                "{}: {} of {} seeds violated a check (seeds {}); rerun one with --seed",
                scenario.display(),
                violations.len(),
                seeds.end - seeds.start,
                seed_list.join(", ")
            )
        }
        Source::Replay(file, _) => format!("{}: the trace violated a check", file.display()),
    };
    let again = args.trace_out.as_ref().map_or(String::new(), |path| {
        format!(
            ", or replay its reproduction with --replay {}",
            path.display()
        )
    });
    Err(Failure::Negative(format!("{what}{again}")))
}

/// Shrinks the trace of the first violation (unless `--no-shrink`), prints it as
/// numbered operations (or one JSON object), and writes it with `--trace-out`.
fn reproduce(
    violation: &Violation,
    trace: Trace,
    args: &SimCommand,
    out: &mut dyn Write,
) -> CliResult {
    let recorded = trace.operations.len();
    let (trace, shown, note) = if args.no_shrink {
        (
            trace,
            violation.clone(),
            "as recorded, not shrunk".to_string(),
        )
    } else {
        match shrink(
            &trace,
            violation.kind,
            &mut SledReplicas,
            ShrinkOptions::default(),
        ) {
            Ok(shrunk) => {
                let note = format!(
                    "shrunk from {recorded} to {} operations in {} replays{}",
                    shrunk.trace.operations.len(),
                    shrunk.replays,
                    if shrunk.replays_ran_out {
                        ", when the replays ran out: it may not be minimal"
                    } else {
                        ""
                    }
                );
                (shrunk.trace, shrunk.violation, note)
            }
            // A trace that does not replay to its violation is a simulator bug; the
            // recorded one is still the best reproduction there is.
            Err(e) => (trace, violation.clone(), format!("not shrunk: {e}")),
        }
    };
    if args.json {
        writeln!(
            out,
            "{}",
            json!({
                "seed": violation.seed,
                "result": "reproduction",
                "shrunk": !args.no_shrink,
                "note": note,
                "violation": shown,
                "trace": trace,
            })
        )?;
    } else {
        let names = |items: Vec<String>| {
            if items.is_empty() {
                "none".to_string()
            } else {
                items.join(" ")
            }
        };
        writeln!(
            out,
            "reproduction of seed {} ({note}; replicas {}; keys {}):",
            violation.seed,
            names(trace.replicas.iter().map(|r| format!("r{r}")).collect()),
            names(trace.keys.clone())
        )?;
        writeln!(
            out,
            "  violates at {} {}: {:?}: {}",
            shown.phase, shown.step, shown.kind, shown.detail
        )?;
        for line in trace.lines() {
            writeln!(out, "  {line}")?;
        }
    }
    if let Some(path) = &args.trace_out {
        trace
            .write(path)
            .map_err(|e| Failure::Error(e.to_string()))?;
        if !args.json {
            writeln!(out, "trace: {}", path.display())?;
        }
    }
    Ok(())
}

/// Draws the passing runs; with none, says so and leaves no file (the violations that
/// follow are the answer). The table says where the plot went; JSON output stays one
/// object per seed.
fn write_plot(
    reports: &[SimReport],
    passed: usize,
    plot: &Path,
    json: bool,
    out: &mut dyn Write,
) -> CliResult {
    if reports.is_empty() {
        if !json {
            writeln!(out, "no plot: no seed passed")?;
        }
        return Ok(());
    }
    plot_reports(reports, plot).map_err(|e| Failure::Error(e.to_string()))?;
    if !json {
        let seeds: Vec<String> = reports.iter().map(|r| r.seed.to_string()).collect();
        let left_out = if passed > reports.len() {
            format!(", the first {} of {passed} that passed", reports.len())
        } else {
            String::new()
        };
        let word = if seeds.len() == 1 { "seed" } else { "seeds" };
        writeln!(
            out,
            "plot: {} ({word} {}{left_out})",
            plot.display(),
            seeds.join(", ")
        )?;
    }
    Ok(())
}

fn report_line(report: &SimReport) -> String {
    let t = report.totals();
    format!(
        "{:>4}  {:>6}  {:>6}  {:>9}  {:>6}  {:>14}  {:>15}  {:>10}  ok",
        report.seed,
        report.steps.len(),
        t.syncs,
        t.conflicts.total(),
        report.rounds_to_converge,
        t.exceptions_max,
        t.knowledge_bytes_max,
        t.tombstones_max
    )
}

fn report_json(report: &SimReport) -> serde_json::Value {
    json!({
        "seed": report.seed,
        "result": "ok",
        "totals": report.totals(),
        "report": report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges_are_start_to_end() {
        assert_eq!(parse_seeds("0..10"), Ok(0..10));
        assert_eq!(parse_seeds("7..8"), Ok(7..8));
        for bad in ["", "5", "5..5", "9..2", "a..b", "-1..3", "1...3"] {
            assert!(parse_seeds(bad).is_err(), "{bad:?} was accepted");
        }
    }
}

//! `knit sim`: runs a scenario file under one seed or a range of seeds and prints one
//! line (or one JSON object) per seed. Output depends only on the scenario, the seeds
//! and the commit, so two runs can be compared byte for byte. `--plot FILE.svg` also
//! draws the seeds that passed (the first `MAX_PLOTTED_SEEDS`) over their steps; the
//! file, too, is the same bytes for the same seeds.

use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::{CliResult, Failure};
use crate::sim::{
    check_plot_path, plot_reports, simulate, Scenario, SimError, SimReport, Violation,
    MAX_PLOTTED_SEEDS,
};

pub(super) struct SimArgs {
    pub scenario: PathBuf,
    pub seeds: Range<u64>,
    pub json: bool,
    /// Where to draw the metrics of the seeds that passed, as SVG.
    pub plot: Option<PathBuf>,
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

pub(super) fn sim(args: &SimArgs, out: &mut dyn Write) -> CliResult {
    let scenario = Scenario::load(&args.scenario).map_err(|e| Failure::Error(e.to_string()))?;
    // A mistyped folder fails now, not after every seed has run.
    if let Some(plot) = &args.plot {
        check_plot_path(plot).map_err(|e| Failure::Error(e.to_string()))?;
    }
    if !args.json {
        writeln!(
            out,
            "scenario {}: {} replicas",
            scenario.name, scenario.replicas
        )?;
        writeln!(out, "{HEADER}")?;
    }
    let mut violations: Vec<Violation> = Vec::new();
    // Kept only for the plot, and only as many as it draws: a long run's report holds
    // every step.
    let mut plotted: Vec<SimReport> = Vec::new();
    let mut passed = 0usize;
    for seed in args.seeds.clone() {
        match simulate(&scenario, seed) {
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
            }
            Err(e) => return Err(Failure::Error(e.to_string())),
        }
    }
    if let Some(plot) = &args.plot {
        write_plot(&plotted, passed, plot, args.json, out)?;
    }
    if violations.is_empty() {
        return Ok(());
    }
    if !args.json {
        for v in &violations {
            writeln!(out, "{v}")?;
        }
    }
    let seeds: Vec<String> = violations.iter().map(|v| v.seed.to_string()).collect();
    Err(Failure::Negative(format!(
        "{}: {} of {} seeds violated a check (seeds {}); rerun one with --seed",
        args.scenario.display(),
        violations.len(),
        args.seeds.end - args.seeds.start,
        seeds.join(", ")
    )))
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

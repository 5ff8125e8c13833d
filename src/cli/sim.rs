//! `knit sim`: runs a scenario file under one seed or a range of seeds and prints one
//! line (or one JSON object) per seed. Output depends only on the scenario, the seeds
//! and the commit, so two runs can be compared byte for byte.

use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;

use serde_json::json;

use super::{CliResult, Failure};
use crate::sim::{simulate, Scenario, SimError, SimReport, Violation};

pub(super) struct SimArgs {
    pub scenario: PathBuf,
    pub seeds: Range<u64>,
    pub json: bool,
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

const HEADER: &str = "seed   steps   syncs  conflicts  rounds  max exceptions  tombstones  result";

pub(super) fn sim(args: &SimArgs, out: &mut dyn Write) -> CliResult {
    let scenario = Scenario::load(&args.scenario).map_err(|e| Failure::Error(e.to_string()))?;
    if !args.json {
        writeln!(
            out,
            "scenario {}: {} replicas",
            scenario.name, scenario.replicas
        )?;
        writeln!(out, "{HEADER}")?;
    }
    let mut violations: Vec<Violation> = Vec::new();
    for seed in args.seeds.clone() {
        match simulate(&scenario, seed) {
            Ok(report) => {
                if args.json {
                    writeln!(out, "{}", report_json(&report))?;
                } else {
                    writeln!(out, "{}", report_line(&report))?;
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
                        "{seed:>4}  {:>6}  {:>6}  {:>9}  {:>6}  {:>14}  {:>10}  VIOLATION",
                        "-", "-", "-", "-", "-", "-"
                    )?;
                }
                violations.push(*violation);
            }
            Err(e) => return Err(Failure::Error(e.to_string())),
        }
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

fn report_line(report: &SimReport) -> String {
    let t = report.totals();
    format!(
        "{:>4}  {:>6}  {:>6}  {:>9}  {:>6}  {:>14}  {:>10}  ok",
        report.seed,
        report.steps.len(),
        t.syncs,
        t.conflicts.total(),
        report.rounds_to_converge,
        t.exceptions_max,
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

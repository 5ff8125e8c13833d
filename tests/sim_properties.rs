//! Property tests over the simulator, written with the strategies users get from the
//! `proptest` feature (`knit::sim_strategies`): any small scenario, under any policy,
//! topology (changing ones included) and mix of faults, converges under any seed, and
//! a seed reproduces its run. A failing case shrinks toward fewer replicas, steps and
//! faults; proptest prints the scenario and the seed, and `knit sim` reruns it from a
//! TOML file.
//!
//! Needs `--features proptest` (Cargo.toml's `required-features`); scripts/test sets it.

use knit::sim_strategies::{self, Sizes};
use knit::{simulate, Scenario};
use proptest::prelude::*;

/// Cases per property: each runs a whole simulation over sled replicas, so a few dozen
/// keep the file under half a minute in a debug build. `KNIT_SOAK_CASES` raises it.
fn cases(default: u32) -> u32 {
    std::env::var("KNIT_SOAK_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn converges(scenario: &Scenario, seed: u64) -> Result<knit::SimReport, TestCaseError> {
    simulate(scenario, seed).map_err(|e| TestCaseError::fail(e.to_string()))
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(24),
        max_shrink_iters: 200,
        ..ProptestConfig::default()
    })]

    /// Every generated scenario passes every check of the simulator: soundness after
    /// every step, convergence, no lost causally ordered update, accounting, idempotent
    /// duplicates and durable commits across kills.
    #[test]
    fn any_small_scenario_converges(
        scenario in sim_strategies::scenario(),
        seed in any::<u64>(),
    ) {
        let report = converges(&scenario, seed)?;
        let quiet = report.convergence.last().map(|m| m.changes_sent);
        prop_assert_eq!(quiet, Some(0));
        prop_assert_eq!(report.steps.len() as u64, scenario.steps);
    }

    /// Faults at high rates on small runs: the kills, losses and duplicates do happen,
    /// and the runs still converge.
    #[test]
    fn heavy_batch_faults_still_converge(
        scenario in sim_strategies::scenario_within(Sizes {
            replicas: 3..=4,
            steps: 4..=8,
            ..Sizes::default()
        }),
        seed in any::<u64>(),
        rates in (0.2..=0.6f64, 0.2..=0.6f64, 0.2..=0.6f64),
    ) {
        let mut scenario = scenario;
        (
            scenario.faults.crash_rate,
            scenario.faults.lose_batch_rate,
            scenario.faults.duplicate_batch_rate,
        ) = rates;
        converges(&scenario, seed)?;
    }

    /// A seed and a scenario fix the run.
    #[test]
    fn a_seed_reproduces_its_run(
        scenario in sim_strategies::scenario_within(Sizes {
            replicas: 3..=3,
            steps: 2..=5,
            ..Sizes::default()
        }),
        seed in any::<u64>(),
    ) {
        let first = converges(&scenario, seed)?;
        let second = converges(&scenario, seed)?;
        prop_assert_eq!(first, second);
    }
}

//! Proptest strategies that generate scenarios, so an experiment can be written as a
//! property test: "every small scenario converges under any seed", or the same over one
//! topology, one policy or one fault.
//!
//! ```ignore
//! use proptest::prelude::*;
//!
//! proptest! {
//!     #[test]
//!     fn small_scenarios_converge(
//!         scenario in knit::sim_strategies::scenario(),
//!         seed in any::<u64>(),
//!     ) {
//!         let report = knit::simulate(&scenario, seed);
//!         prop_assert!(report.is_ok(), "{}", report.err().map_or(String::new(), |e| e.to_string()));
//!     }
//! }
//! ```
//!
//! The module is compiled with the crate's `proptest` feature. proptest is an optional
//! dependency of the library (a user who does not ask for strategies does not build
//! it) and, at the same version, a dev-dependency for the crate's own unit tests; the
//! crate's tests that use these strategies (tests/sim_properties.rs) declare
//! `required-features = ["proptest"]`, and the project's test command
//! (`scripts/test`) turns the feature on.
//!
//! Invariants:
//! - Every scenario generated passes [`Scenario::check`].
//! - Sizes stay inside the [`Sizes`] given; the default is small enough for a debug
//!   build to run dozens of cases in seconds.
//! - Shrinking moves toward fewer replicas, steps and keys, toward a fixed topology and
//!   toward no faults at all, so a failing case shrinks to a short reproduction (its
//!   seed and its scenario, printed by proptest).

use std::ops::RangeInclusive;

use proptest::prelude::*;

use super::{
    Faults, KeySpace, OperationMix, PolicyChoice, Scenario, Topology, TopologyPhase, MAX_SIM_KEYS,
    MAX_SIM_REPLICAS,
};

/// The ranges a generated scenario's sizes are drawn from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sizes {
    /// Within 2..=[`MAX_SIM_REPLICAS`]; values outside are clamped.
    pub replicas: RangeInclusive<usize>,
    pub steps: RangeInclusive<u64>,
    /// Within 1..=[`MAX_SIM_KEYS`]; values outside are clamped.
    pub keys: RangeInclusive<usize>,
    pub operations_per_step: RangeInclusive<usize>,
    pub syncs_per_step: RangeInclusive<usize>,
    /// Within 1..=`MAX_CHANGES_PER_BATCH`; values outside are clamped.
    pub batch_size: RangeInclusive<usize>,
}

impl Default for Sizes {
    /// 3–5 replicas (four are needed to show divergence after resolution), 2–10 steps,
    /// 2–6 keys, batches of 1–3: batch edges and range exceptions come up all the time.
    fn default() -> Self {
        Self {
            replicas: 3..=5,
            steps: 2..=10,
            keys: 2..=6,
            operations_per_step: 1..=3,
            syncs_per_step: 1..=3,
            batch_size: 1..=3,
        }
    }
}

fn clamp(range: &RangeInclusive<usize>, low: usize, high: usize) -> RangeInclusive<usize> {
    let start = (*range.start()).clamp(low, high);
    let end = (*range.end()).clamp(start, high);
    start..=end
}

/// A scenario of the default [`Sizes`], any policy, topology and faults.
pub fn scenario() -> BoxedStrategy<Scenario> {
    scenario_within(Sizes::default())
}

/// A scenario whose sizes lie inside `sizes`, with any policy, topology and faults.
pub fn scenario_within(sizes: Sizes) -> BoxedStrategy<Scenario> {
    let replicas = clamp(&sizes.replicas, 2, MAX_SIM_REPLICAS);
    let keys = clamp(&sizes.keys, 1, MAX_SIM_KEYS);
    let batch_size = clamp(&sizes.batch_size, 1, crate::model::MAX_CHANGES_PER_BATCH);
    let steps_start = *sizes.steps.start();
    let steps = steps_start..=(*sizes.steps.end()).max(steps_start);
    (
        replicas,
        steps,
        sizes.operations_per_step,
        sizes.syncs_per_step,
        batch_size,
        policy(),
        key_space(keys),
        operation_mix(),
        faults(),
    )
        .prop_flat_map(
            |(replicas, steps, ops, syncs, batch_size, policy, keys, operations, faults)| {
                topology(steps).prop_map(move |topology| Scenario {
                    name: "generated".into(),
                    replicas,
                    steps,
                    operations_per_step: ops,
                    syncs_per_step: syncs,
                    batch_size,
                    policy,
                    step_ms: 1000,
                    converge_rounds_max: 10,
                    keys: keys.clone(),
                    operations: operations.clone(),
                    topology,
                    faults: faults.clone(),
                })
            },
        )
        .boxed()
}

/// Any of the engine's conflict policies.
pub fn policy() -> impl Strategy<Value = PolicyChoice> + Clone {
    prop::sample::select(
        &[
            PolicyChoice::LastWriterWins,
            PolicyChoice::SourceWins,
            PolicyChoice::DestinationWins,
            PolicyChoice::Merge,
        ][..],
    )
}

/// `count` keys, some of them hot.
pub fn key_space(count: RangeInclusive<usize>) -> impl Strategy<Value = KeySpace> + Clone {
    count
        .prop_flat_map(|count| (Just(count), 0..=count, 0.0..=1.0f64))
        .prop_map(|(count, hot, hot_share)| KeySpace {
            count,
            hot,
            hot_share,
        })
}

/// Operation weights, never all zero.
pub fn operation_mix() -> impl Strategy<Value = OperationMix> + Clone {
    (1..=4u32, 0..=3u32, 0..=3u32).prop_map(|(put, update, delete)| OperationMix {
        put,
        update,
        delete,
    })
}

/// A fixed topology, or for runs of `steps` steps one that changes in 2–3 phases.
pub fn topology(steps: u64) -> impl Strategy<Value = Topology> + Clone {
    let fixed = fixed_topology();
    let phases = (
        prop::collection::vec(fixed_topology(), 2..=3),
        prop::collection::vec(1..=steps.max(1), 1..=2),
    )
        .prop_map(|(topologies, mut starts)| {
            // Phases start at distinct steps, in order (two equal draws make one).
            starts.sort_unstable();
            starts.dedup();
            let starts = std::iter::once(0).chain(starts);
            Topology::Changing {
                phases: starts
                    .zip(topologies)
                    .map(|(from_step, topology)| TopologyPhase {
                        from_step,
                        topology,
                    })
                    .collect(),
            }
        });
    prop_oneof![3 => fixed, 1 => phases]
}

/// Mesh, star, ring or a random graph.
pub fn fixed_topology() -> impl Strategy<Value = Topology> + Clone {
    prop_oneof![
        Just(Topology::Mesh),
        Just(Topology::Star),
        Just(Topology::Ring),
        (0.0..=1.0f64).prop_map(|edge_probability| Topology::Random { edge_probability }),
    ]
}

/// A rate that is 0 half the time (and shrinks to 0), else up to `high`.
fn rate(high: f64) -> impl Strategy<Value = f64> + Clone {
    prop_oneof![Just(0.0), 0.0..=high]
}

/// Any mix of the simulator's faults, each absent half the time.
pub fn faults() -> impl Strategy<Value = Faults> + Clone {
    (
        (rate(0.5), 1..=5u64),
        rate(0.5),
        (rate(0.5), prop_oneof![Just(0u64), 0..=5000u64]),
        rate(0.3),
        rate(0.2),
        rate(0.3),
        rate(0.3),
    )
        .prop_map(
            |(
                (partition_rate, partition_steps),
                cancel_rate,
                (gc_rate, tombstone_age_ms),
                reopen_rate,
                crash_rate,
                lose_batch_rate,
                duplicate_batch_rate,
            )| Faults {
                partition_rate,
                partition_steps,
                cancel_rate,
                gc_rate,
                tombstone_age_ms,
                reopen_rate,
                crash_rate,
                lose_batch_rate,
                duplicate_batch_rate,
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn generated_scenarios_pass_their_checks_and_stay_in_their_sizes() -> Result<(), String> {
        let mut runner = TestRunner::deterministic();
        let strategy = scenario();
        let sizes = Sizes::default();
        for _ in 0..200 {
            let s = strategy
                .new_tree(&mut runner)
                .map_err(|e| e.to_string())?
                .current();
            s.check().map_err(|e| format!("{e}: {s:?}"))?;
            assert!(sizes.replicas.contains(&s.replicas), "{s:?}");
            assert!(sizes.steps.contains(&s.steps), "{s:?}");
            assert!(sizes.keys.contains(&s.keys.count), "{s:?}");
            assert!(sizes.batch_size.contains(&s.batch_size), "{s:?}");
        }
        Ok(())
    }

    #[test]
    fn sizes_outside_the_simulator_limits_are_clamped() -> Result<(), String> {
        let mut runner = TestRunner::deterministic();
        let strategy = scenario_within(Sizes {
            replicas: 0..=1,
            keys: 0..=0,
            batch_size: 0..=0,
            ..Sizes::default()
        });
        let s = strategy
            .new_tree(&mut runner)
            .map_err(|e| e.to_string())?
            .current();
        assert_eq!((s.replicas, s.keys.count, s.batch_size), (2, 1, 1));
        s.check().map_err(|e| e.to_string())
    }
}

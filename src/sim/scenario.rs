//! Scenarios: what an experiment runs (replicas, workload, topology, schedule, policy,
//! faults), read from TOML files such as `examples/sim/mesh5.toml`.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::MAX_CHANGES_PER_BATCH;
use crate::sync::{ConflictPolicy, Resolution};

use super::rng::SimRng;

/// Most replicas a scenario may ask for: each is a sled folder, and the checks compare
/// every pair.
pub const MAX_SIM_REPLICAS: usize = 64;
/// Most keys a scenario may ask for: the soundness check walks every key of every
/// replica after every step.
pub const MAX_SIM_KEYS: usize = 10_000;
/// Most steps a scenario may ask for.
pub const MAX_SIM_STEPS: u64 = 100_000;

/// An experiment. Fields are public like any options struct; [`Scenario::check`] (which
/// the simulator runs first) rejects values outside their ranges.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub replicas: usize,
    /// Steps of workload and faults, before the full-mesh convergence phase.
    pub steps: u64,
    /// Local operations per step, each on a random replica.
    #[serde(default = "one")]
    pub operations_per_step: usize,
    /// Sessions per step, each over a random edge of the topology that is up.
    #[serde(default = "one")]
    pub syncs_per_step: usize,
    /// Most changes per batch.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    pub policy: PolicyChoice,
    /// How far the clock moves per step (tombstone ages are measured on it).
    #[serde(default = "default_step_ms")]
    pub step_ms: u64,
    /// Full-mesh rounds the convergence phase may take before the run fails.
    #[serde(default = "default_converge_rounds_max")]
    pub converge_rounds_max: u64,
    pub keys: KeySpace,
    pub operations: OperationMix,
    pub topology: Topology,
    #[serde(default)]
    pub faults: Faults,
}

fn one() -> usize {
    1
}
fn default_batch_size() -> usize {
    2
}
fn default_step_ms() -> u64 {
    1000
}
fn default_converge_rounds_max() -> u64 {
    10
}

/// The keys the workload touches: the first `hot` of them take `hot_share` of the
/// operations.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpace {
    pub count: usize,
    #[serde(default)]
    pub hot: usize,
    #[serde(default)]
    pub hot_share: f64,
}

/// Relative weights of the local operations. A put writes any key; an update writes a
/// key live at that replica and a delete deletes one (both fall back to nothing when
/// the replica holds no live key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperationMix {
    #[serde(default)]
    pub put: u32,
    #[serde(default)]
    pub update: u32,
    #[serde(default)]
    pub delete: u32,
}

/// Which replicas sync with which while faults run (the convergence phase is always a
/// full mesh). Edges are undirected; each session picks a direction at random.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Topology {
    Mesh,
    /// Every replica with replica 0 only.
    Star,
    Ring,
    /// A seeded random spanning tree (so the graph is connected) plus every other pair
    /// with probability `edge_probability`.
    Random {
        edge_probability: f64,
    },
    /// Other topologies one after the other: each phase holds from its `from_step` until
    /// the next phase's. The first starts at step 0; a phase cannot itself change. A
    /// random phase draws its graph when it starts, so two random phases rewire the
    /// replicas twice.
    Changing {
        // Left out, it is empty, and `check` says a phase is needed.
        #[serde(default)]
        phases: Vec<TopologyPhase>,
    },
}

/// One phase of a [`Topology::Changing`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyPhase {
    /// The workload step the phase starts at.
    pub from_step: u64,
    pub topology: Topology,
}

impl Topology {
    /// The phase in force at `step` and its place among the phases (0 for a topology
    /// that does not change).
    pub(crate) fn phase_at(&self, step: u64) -> (usize, &Topology) {
        match self {
            Self::Changing { phases } => phases
                .iter()
                .enumerate()
                .rev()
                .find(|(_, p)| p.from_step <= step)
                .or_else(|| phases.iter().enumerate().next())
                .map_or((0, self), |(index, p)| (index, &p.topology)),
            _ => (0, self),
        }
    }

    /// A short name for reproductions: `ring`, `random 0.3`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Mesh => "mesh".into(),
            Self::Star => "star".into(),
            Self::Ring => "ring".into(),
            Self::Random { edge_probability } => format!("random {edge_probability}"),
            Self::Changing { phases } => format!("changing, {} phases", phases.len()),
        }
    }

    /// The edges `(a, b)` with `a < b`, in a fixed order; the random graph draws from
    /// `rng`. A changing topology gives its first phase's edges (the driver asks
    /// [`Topology::phase_at`] for the others).
    pub(crate) fn edges(&self, replicas: usize, rng: &mut SimRng) -> Vec<(usize, usize)> {
        let mut edges = Vec::new();
        match self {
            Self::Mesh => {
                for a in 0..replicas {
                    for b in a + 1..replicas {
                        edges.push((a, b));
                    }
                }
            }
            Self::Star => edges.extend((1..replicas).map(|b| (0, b))),
            Self::Ring => {
                edges.extend((1..replicas).map(|b| (b - 1, b)));
                if replicas > 2 {
                    edges.push((0, replicas - 1));
                }
            }
            Self::Random { edge_probability } => {
                for b in 1..replicas {
                    edges.push((rng.below(b), b));
                }
                for a in 0..replicas {
                    for b in a + 1..replicas {
                        if !edges.contains(&(a, b)) && rng.chance(*edge_probability) {
                            edges.push((a, b));
                        }
                    }
                }
                edges.sort_unstable();
            }
            Self::Changing { phases } => {
                // `check` rejects a phase that changes in turn, so this does not recurse
                // further than one level.
                if let Some(first) = phases.first() {
                    edges = first.topology.edges(replicas, rng);
                }
            }
        }
        edges
    }
}

/// The engine's conflict policies, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyChoice {
    SourceWins,
    DestinationWins,
    LastWriterWins,
    /// ApplicationDefined: two values merge into their bytewise maximum, and an update
    /// beats a delete (the merged value is the surviving one). Deterministic and
    /// commutative, so every replica settles a conflict alike.
    Merge,
}

impl PolicyChoice {
    pub fn conflict_policy(self) -> ConflictPolicy {
        match self {
            Self::SourceWins => ConflictPolicy::SourceWins,
            Self::DestinationWins => ConflictPolicy::DestinationWins,
            Self::LastWriterWins => ConflictPolicy::LastWriterWins,
            Self::Merge => ConflictPolicy::ApplicationDefined(Arc::new(|c| {
                match (c.local_data, c.remote.data.as_deref()) {
                    (Some(local), Some(remote)) => Resolution::Merge(local.max(remote).to_vec()),
                    (Some(local), None) => Resolution::Merge(local.to_vec()),
                    (None, Some(remote)) => Resolution::Merge(remote.to_vec()),
                    // Delete against delete never reaches a handler (the last-writer rule
                    // settles it); keep the local state should it ever come.
                    (None, None) => Resolution::DestinationWins,
                }
            })),
        }
    }

    /// True when the policy may keep a winner's version as it is (a last-writer-wins
    /// decision) rather than store a fresh version.
    pub(crate) fn keeps_versions(self) -> bool {
        self == Self::LastWriterWins
    }
}

/// Faults injected while the workload runs. Every rate is a chance in 0..=1 per step,
/// per session (`cancel_rate`) or per batch (`crash_rate`, `lose_batch_rate`,
/// `duplicate_batch_rate`); all default to none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Chance per step that one random edge goes down.
    #[serde(default)]
    pub partition_rate: f64,
    /// Steps a downed edge stays down before it heals.
    #[serde(default)]
    pub partition_steps: u64,
    /// Chance that a session is cancelled after its first batch.
    #[serde(default)]
    pub cancel_rate: f64,
    /// Chance per step that one random replica cleans up its tombstones.
    #[serde(default)]
    pub gc_rate: f64,
    /// Cleanup removes tombstones at least this old (0: every tombstone, seen by the
    /// other replicas or not).
    #[serde(default)]
    pub tombstone_age_ms: u64,
    /// Chance per step that one random replica is closed and reopened (a clean close).
    #[serde(default)]
    pub reopen_rate: f64,
    /// Chance per batch that the destination is killed while it applies the batch, at
    /// a seeded point inside it: the batch's uncommitted writes are lost (or, at the
    /// point after its commit, only the acknowledgement), the session dies without
    /// ending, and the replica is reopened from what its folder held at the kill.
    #[serde(default)]
    pub crash_rate: f64,
    /// Chance per batch that the batch never reaches the destination while the session
    /// goes on with the next one.
    #[serde(default)]
    pub lose_batch_rate: f64,
    /// Chance per batch that the batch reaches the destination twice: again at once, or
    /// after the next batch (a late retransmission). The second delivery must change
    /// nothing.
    #[serde(default)]
    pub duplicate_batch_rate: f64,
}

impl Faults {
    /// Whether any fault acts on the batches of a session.
    pub(crate) fn touch_batches(&self) -> bool {
        self.crash_rate > 0.0 || self.lose_batch_rate > 0.0 || self.duplicate_batch_rate > 0.0
    }
}

/// Why a scenario could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    #[error("{file}: cannot read the scenario: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value outside its range; `line` is 0 when the field was not written (a
    /// default) or the scenario was built in code.
    #[error("{}: `{field}` {reason}", place(file, *line))]
    Invalid {
        file: String,
        line: usize,
        field: String,
        reason: String,
    },
}

fn place(file: &str, line: usize) -> String {
    if line == 0 {
        file.to_string()
    } else {
        format!("{file}:{line}")
    }
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_toml(&text, &file)
    }

    /// Parses and checks a scenario; `file` names it in errors.
    pub fn from_toml(text: &str, file: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((0, 0), |span| line_column(text, span.start));
            ScenarioError::Syntax {
                file: file.to_string(),
                line,
                column,
                message: e.message().trim_end().to_string(),
            }
        })?;
        scenario.problem().map_or(Ok(scenario), |p| {
            Err(ScenarioError::Invalid {
                file: file.to_string(),
                line: find_line(text, p.table, p.entry, p.key),
                field: p.field,
                reason: p.reason,
            })
        })
    }

    /// Checks every value's range; the first problem is the error.
    pub fn check(&self) -> Result<(), ScenarioError> {
        self.problem().map_or(Ok(()), |p| {
            Err(ScenarioError::Invalid {
                file: format!("scenario {:?}", self.name),
                line: 0,
                field: p.field,
                reason: p.reason,
            })
        })
    }

    /// The first value out of range.
    fn problem(&self) -> Option<Problem> {
        let rate = |v: f64| !(0.0..=1.0).contains(&v);
        let f = &self.faults;
        let checks: [(bool, &'static str, &'static str, String); 17] = [
            (
                !(2..=MAX_SIM_REPLICAS).contains(&self.replicas),
                "",
                "replicas",
                format!("must be from 2 to {MAX_SIM_REPLICAS}"),
            ),
            (
                self.steps > MAX_SIM_STEPS,
                "",
                "steps",
                format!("must be at most {MAX_SIM_STEPS}"),
            ),
            (
                !(1..=MAX_CHANGES_PER_BATCH).contains(&self.batch_size),
                "",
                "batch_size",
                format!("must be from 1 to {MAX_CHANGES_PER_BATCH}"),
            ),
            (
                self.converge_rounds_max == 0,
                "",
                "converge_rounds_max",
                "must be at least 1".into(),
            ),
            (
                !(1..=MAX_SIM_KEYS).contains(&self.keys.count),
                "keys",
                "count",
                format!("must be from 1 to {MAX_SIM_KEYS}"),
            ),
            (
                self.keys.hot > self.keys.count,
                "keys",
                "hot",
                "must be at most `keys.count`".into(),
            ),
            (
                rate(self.keys.hot_share),
                "keys",
                "hot_share",
                "must be from 0 to 1".into(),
            ),
            (
                self.operations_per_step > 0
                    && self.operations.put + self.operations.update + self.operations.delete == 0,
                "operations",
                "put",
                "and `update` and `delete` are all 0: give some operation a weight".into(),
            ),
            (
                matches!(self.topology, Topology::Random { edge_probability } if rate(edge_probability)),
                "topology",
                "edge_probability",
                "must be from 0 to 1".into(),
            ),
            (
                rate(f.partition_rate),
                "faults",
                "partition_rate",
                "must be from 0 to 1".into(),
            ),
            (
                f.partition_rate > 0.0 && f.partition_steps == 0,
                "faults",
                "partition_steps",
                "must be at least 1 when `partition_rate` is above 0".into(),
            ),
            (
                rate(f.cancel_rate),
                "faults",
                "cancel_rate",
                "must be from 0 to 1".into(),
            ),
            (
                rate(f.gc_rate),
                "faults",
                "gc_rate",
                "must be from 0 to 1".into(),
            ),
            (
                rate(f.reopen_rate),
                "faults",
                "reopen_rate",
                "must be from 0 to 1".into(),
            ),
            (
                rate(f.crash_rate),
                "faults",
                "crash_rate",
                "must be from 0 to 1".into(),
            ),
            (
                rate(f.lose_batch_rate),
                "faults",
                "lose_batch_rate",
                "must be from 0 to 1".into(),
            ),
            (
                rate(f.duplicate_batch_rate),
                "faults",
                "duplicate_batch_rate",
                "must be from 0 to 1".into(),
            ),
        ];
        checks
            .into_iter()
            .find(|(bad, ..)| *bad)
            .map(|(_, table, key, reason)| Problem {
                table,
                entry: None,
                key,
                field: field_name(table, key),
                reason,
            })
            .or_else(|| self.phase_problem())
    }

    /// The first problem with the phases of a changing topology.
    fn phase_problem(&self) -> Option<Problem> {
        let Topology::Changing { phases } = &self.topology else {
            return None;
        };
        let Some(first) = phases.first() else {
            return Some(Problem {
                table: "topology",
                entry: None,
                key: "kind",
                field: "topology.phases".into(),
                reason: "must list at least one phase (`[[topology.phases]]`)".into(),
            });
        };
        let at = |entry: usize, key: &'static str, field: &str, reason: String| Problem {
            table: "topology.phases",
            entry: Some(entry),
            key,
            field: format!("topology.phases[{entry}].{field}"),
            reason,
        };
        if first.from_step != 0 {
            return Some(at(
                0,
                "from_step",
                "from_step",
                "must be 0: the first phase starts the run".into(),
            ));
        }
        for (entry, pair) in phases.windows(2).enumerate() {
            if let [before, after] = pair {
                if after.from_step <= before.from_step {
                    return Some(at(
                        entry + 1,
                        "from_step",
                        "from_step",
                        format!(
                            "must be above the previous phase's `from_step` ({})",
                            before.from_step
                        ),
                    ));
                }
            }
        }
        for (entry, phase) in phases.iter().enumerate() {
            match phase.topology {
                Topology::Changing { .. } => {
                    return Some(at(
                        entry,
                        "topology",
                        "topology.kind",
                        "cannot be `changing` inside a changing topology".into(),
                    ))
                }
                Topology::Random { edge_probability }
                    if !(0.0..=1.0).contains(&edge_probability) =>
                {
                    return Some(at(
                        entry,
                        "topology",
                        "topology.edge_probability",
                        "must be from 0 to 1".into(),
                    ))
                }
                _ => {}
            }
        }
        None
    }
}

/// A value out of range, and where a file sets it.
struct Problem {
    /// The TOML table that holds the value (`""`: the top level) and, for an array of
    /// tables such as `[[topology.phases]]`, which entry of it (from 0).
    table: &'static str,
    entry: Option<usize>,
    /// The key whose line the error points at.
    key: &'static str,
    /// The field as the error names it: `faults.crash_rate`, `topology.phases[1].from_step`.
    field: String,
    reason: String,
}

fn field_name(table: &str, key: &str) -> String {
    if table.is_empty() {
        key.to_string()
    } else {
        format!("{table}.{key}")
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The 1-based line where `key` is set inside `[table]` (`""`: the top level) or, with
/// `entry`, inside that entry of the array of tables `[[table]]`; 0 if it is not set.
fn find_line(text: &str, table: &str, entry: Option<usize>, key: &str) -> usize {
    let mut current = "";
    // Entries of `[[table]]` seen so far; the one being read is `seen - 1`.
    let mut seen = 0usize;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            current = trimmed
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            if trimmed.starts_with("[[") && current == table {
                seen += 1;
            }
            continue;
        }
        let name = trimmed.split('=').next().unwrap_or("").trim();
        let in_entry = entry.is_none_or(|e| seen == e + 1);
        if current == table && in_entry && trimmed.contains('=') && name == key {
            return index + 1;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
name = "small"
replicas = 3
steps = 4
policy = "merge"

[keys]
count = 4

[operations]
put = 1

[topology]
kind = "ring"
"#;

    #[test]
    fn defaults_fill_what_is_left_out() -> Result<(), ScenarioError> {
        let s = Scenario::from_toml(SMALL, "small.toml")?;
        assert_eq!((s.batch_size, s.syncs_per_step, s.step_ms), (2, 1, 1000));
        assert_eq!(s.faults, Faults::default());
        assert_eq!(s.topology, Topology::Ring);
        Ok(())
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let bad = SMALL.replace("count = 4", "count = 0");
        let e = Scenario::from_toml(&bad, "small.toml").map(|_| ());
        let Err(ScenarioError::Invalid { line, field, .. }) = &e else {
            panic!("expected Invalid, got {e:?}");
        };
        assert_eq!((*line, field.as_str()), (8, "keys.count"));

        let typo = SMALL.replace("steps = 4", "stepz = 4");
        let e = Scenario::from_toml(&typo, "small.toml").map(|_| ());
        let Err(ScenarioError::Syntax { message, .. }) = &e else {
            panic!("expected Syntax, got {e:?}");
        };
        assert!(message.contains("stepz"), "{message}");
    }

    #[test]
    fn batch_fault_rates_are_checked_like_the_others() {
        let bad = format!("{SMALL}\n[faults]\ncrash_rate = 0.1\nlose_batch_rate = 2\n");
        let e = Scenario::from_toml(&bad, "small.toml").map(|_| ());
        let Err(ScenarioError::Invalid { line, field, .. }) = &e else {
            panic!("expected Invalid, got {e:?}");
        };
        assert_eq!((*line, field.as_str()), (18, "faults.lose_batch_rate"));
    }

    const CHANGING: &str = r#"
name = "changing"
replicas = 4
steps = 30
policy = "merge"

[keys]
count = 4

[operations]
put = 1

[topology]
kind = "changing"

[[topology.phases]]
from_step = 0
topology = { kind = "ring" }

[[topology.phases]]
from_step = 10
topology = { kind = "random", edge_probability = 0.5 }

[[topology.phases]]
from_step = 20
topology = { kind = "star" }
"#;

    #[test]
    fn a_changing_topology_holds_each_phase_from_its_step() -> Result<(), ScenarioError> {
        let s = Scenario::from_toml(CHANGING, "changing.toml")?;
        let phase = |step| s.topology.phase_at(step);
        assert_eq!(phase(0), (0, &Topology::Ring));
        assert_eq!(phase(9), (0, &Topology::Ring));
        assert_eq!(phase(10).0, 1);
        assert_eq!(phase(25), (2, &Topology::Star));
        // Its edges before the first change are the first phase's.
        assert_eq!(s.topology.edges(4, &mut SimRng::new(0)).len(), 4);
        Ok(())
    }

    #[test]
    fn phase_errors_name_the_phase_and_its_line() {
        let cases = [
            (
                CHANGING.replace("from_step = 20", "from_step = 5"),
                (25, "topology.phases[2].from_step"),
            ),
            (
                CHANGING.replacen("from_step = 0", "from_step = 1", 1),
                (17, "topology.phases[0].from_step"),
            ),
            (
                CHANGING.replace("edge_probability = 0.5", "edge_probability = 1.5"),
                (22, "topology.phases[1].topology.edge_probability"),
            ),
            (
                CHANGING.replace(
                    r#"topology = { kind = "star" }"#,
                    r#"topology = { kind = "changing", phases = [] }"#,
                ),
                (26, "topology.phases[2].topology.kind"),
            ),
        ];
        for (text, (want_line, want_field)) in cases {
            let e = Scenario::from_toml(&text, "changing.toml").map(|_| ());
            let Err(ScenarioError::Invalid { line, field, .. }) = &e else {
                panic!("expected Invalid, got {e:?}");
            };
            assert_eq!((*line, field.as_str()), (want_line, want_field));
        }
        let empty = CHANGING.split("[[topology.phases]]").next().unwrap_or("");
        let e = Scenario::from_toml(empty, "changing.toml").map(|_| ());
        let Err(ScenarioError::Invalid { line, field, .. }) = &e else {
            panic!("expected Invalid, got {e:?}");
        };
        assert_eq!((*line, field.as_str()), (14, "topology.phases"));
    }

    #[test]
    fn topologies_have_the_edges_they_promise() {
        let mut rng = SimRng::new(1);
        assert_eq!(Topology::Mesh.edges(4, &mut rng).len(), 6);
        assert_eq!(
            Topology::Star.edges(4, &mut rng),
            vec![(0, 1), (0, 2), (0, 3)]
        );
        assert_eq!(Topology::Ring.edges(4, &mut rng).len(), 4);
        let random = Topology::Random {
            edge_probability: 0.0,
        }
        .edges(6, &mut rng);
        // A spanning tree and nothing more.
        assert_eq!(random.len(), 5);
    }
}

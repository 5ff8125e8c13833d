//! Traces: a run written down as the operations the driver performed, in order, as
//! data. A trace replays without its seed ([`super::replay_with`]), shrinks to a minimal
//! reproduction ([`super::shrink`]) and is stored as JSON (`knit sim --trace-out`,
//! `knit sim --replay`).
//!
//! Invariants:
//! - A trace holds every decision of a run, so replaying it draws nothing random: the
//!   workload's operations with their replica, key and value, each session's ends,
//!   batch size, policy and cancellation, and the faults its link injected, numbered
//!   by the batch they hit. Replaying the trace of a seeded run therefore makes the same
//!   engine calls in the same order, reads the same clock, and ends in the same report
//!   or the same violation.
//! - Replicas keep their place in the scenario (`r3` stays `r3` in a trace that dropped
//!   `r2`), so a shrunk trace speaks of the replicas the original run named, and a
//!   [`super::ReplicaFactory`] that treats one place differently still does.
//! - Topology, partition and heal operations only describe the edges the report counts:
//!   sessions name both their ends, so they never change what the engine does.
//! - A trace read from a file, or handed to a replay, is checked first
//!   ([`Trace::check`]): format, replicas, keys, every operation's replicas and keys,
//!   batch sizes, fault numbering, and `converge` only at the end. A bad trace is an
//!   error naming the file and the field (or the line and column of a syntax error),
//!   never a panic.

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::{ItemId, MAX_CHANGES_PER_BATCH};

use super::{PolicyChoice, MAX_SIM_KEYS, MAX_SIM_REPLICAS};

/// The trace format this build writes and reads.
pub const TRACE_FORMAT: u32 = 1;
/// Most operations a trace may hold (a run of [`super::MAX_SIM_STEPS`] busy steps fits).
pub const MAX_TRACE_OPERATIONS: usize = 10_000_000;

/// A run as the operations the driver performed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trace {
    /// [`TRACE_FORMAT`].
    pub format: u32,
    /// The scenario's name, for messages.
    pub scenario: String,
    /// The seed the trace was recorded under. A replay draws nothing from it; it names
    /// the run in messages and reports.
    pub seed: u64,
    /// The replicas that take part, by their place in the scenario, ascending.
    pub replicas: Vec<usize>,
    /// The keys operations may touch (the soundness check walks each of them).
    pub keys: Vec<String>,
    pub operations: Vec<TraceOp>,
}

/// One operation of a trace. A step ends, and the soundness check runs at every
/// replica, where the next step or the convergence begins, or where the trace ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum TraceOp {
    /// A workload step begins and the clock moves `advance_ms` on. Operations before
    /// the first step run in a step of their own, without a clock advance.
    Step { step: u64, advance_ms: u64 },
    /// The edges of a (new) topology phase, for the report's figures.
    Topology {
        phase: usize,
        description: String,
        edges: Vec<(usize, usize)>,
    },
    /// Edge `a`–`b` goes down until `until_step`, for the report's figures.
    Partition { a: usize, b: usize, until_step: u64 },
    /// Edge `a`–`b` comes back up.
    Heal { a: usize, b: usize },
    /// A local put of a key (new or not).
    Put {
        replica: usize,
        key: String,
        value: String,
    },
    /// A local put of a key that was live at the replica when the schedule chose it (a
    /// replay writes it whether or not it still is).
    Update {
        replica: usize,
        key: String,
        value: String,
    },
    /// A local delete (a replay of a key that is not live does nothing).
    Delete { replica: usize, key: String },
    /// The schedule wanted an update or a delete at a replica that held no live key:
    /// nothing happened.
    NoLiveKey { replica: usize, wanted: Wanted },
    /// Tombstone cleanup at a replica.
    Gc { replica: usize, older_than_ms: u64 },
    /// The replica is closed and opened again (a clean close).
    Reopen { replica: usize },
    /// A session `source → destination`.
    Sync {
        source: usize,
        destination: usize,
        batch_size: usize,
        policy: PolicyChoice,
        /// Left out when false.
        #[serde(default, skip_serializing_if = "is_false")]
        cancel_after_first_batch: bool,
        /// What the link did to the session's batches, in batch order; left out when
        /// it did nothing.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        faults: Vec<BatchFault>,
    },
    /// Faults stop; the full mesh of the trace's replicas syncs round after round (each
    /// round moves the clock `advance_ms` on) until a round moves nothing, and the final
    /// checks run. Only the last operation may be one.
    Converge {
        rounds_max: u64,
        advance_ms: u64,
        batch_size: usize,
        policy: PolicyChoice,
    },
}

/// What a [`TraceOp::NoLiveKey`] wanted to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wanted {
    Update,
    Delete,
}

/// A fault the link injected into batch `batch` of a session (1 is the first batch the
/// source sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "fault", rename_all = "snake_case", deny_unknown_fields)]
pub enum BatchFault {
    /// The batch never reached the destination; the session went on.
    Lost { batch: u64 },
    /// The batch reached the destination twice: again at once, or (`late`) after the
    /// next batch.
    Duplicated { batch: u64, late: bool },
    /// The destination was killed applying the batch: before change `at_change` (the
    /// batch is lost), or, when `at_change` is left out, after its commit and before
    /// the acknowledgement.
    Killed {
        batch: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at_change: Option<usize>,
    },
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl BatchFault {
    pub fn batch(&self) -> u64 {
        match *self {
            Self::Lost { batch } | Self::Duplicated { batch, .. } | Self::Killed { batch, .. } => {
                batch
            }
        }
    }
}

impl TraceOp {
    /// The replicas the operation acts on (topology, partitions and heals act on none).
    pub fn replicas(&self) -> Vec<usize> {
        match self {
            Self::Put { replica, .. }
            | Self::Update { replica, .. }
            | Self::Delete { replica, .. }
            | Self::NoLiveKey { replica, .. }
            | Self::Gc { replica, .. }
            | Self::Reopen { replica } => vec![*replica],
            Self::Sync {
                source,
                destination,
                ..
            } => vec![*source, *destination],
            Self::Step { .. }
            | Self::Topology { .. }
            | Self::Partition { .. }
            | Self::Heal { .. }
            | Self::Converge { .. } => Vec::new(),
        }
    }

    /// The key the operation writes, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Put { key, .. } | Self::Update { key, .. } | Self::Delete { key, .. } => {
                Some(key)
            }
            _ => None,
        }
    }
}

/// The name a policy has in scenario and trace files.
fn policy_name(policy: PolicyChoice) -> &'static str {
    match policy {
        PolicyChoice::SourceWins => "source_wins",
        PolicyChoice::DestinationWins => "destination_wins",
        PolicyChoice::LastWriterWins => "last_writer_wins",
        PolicyChoice::Merge => "merge",
    }
}

impl fmt::Display for BatchFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Lost { batch } => write!(f, "batch {batch} lost"),
            Self::Duplicated { batch, late: false } => {
                write!(f, "batch {batch} delivered twice")
            }
            Self::Duplicated { batch, late: true } => {
                write!(f, "batch {batch} delivered again after the next")
            }
            Self::Killed {
                batch,
                at_change: Some(change),
            } => write!(
                f,
                "destination killed at change {change} of batch {batch}, before its commit"
            ),
            Self::Killed {
                batch,
                at_change: None,
            } => write!(
                f,
                "destination killed after the commit of batch {batch}, before its acknowledgement"
            ),
        }
    }
}

/// One line a person can read, as `knit sim` prints a reproduction.
impl fmt::Display for TraceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Step { step, advance_ms } => {
                write!(f, "step {step} (the clock moves {advance_ms} ms on)")
            }
            Self::Topology {
                phase,
                description,
                edges,
            } => write!(
                f,
                "topology phase {phase}: {description}, {} edges",
                edges.len()
            ),
            Self::Partition { a, b, until_step } => {
                write!(f, "partition r{a}–r{b} until step {until_step}")
            }
            Self::Heal { a, b } => write!(f, "heal r{a}–r{b}"),
            Self::Put {
                replica,
                key,
                value,
            } => write!(f, "put {key}={value} at r{replica}"),
            Self::Update {
                replica,
                key,
                value,
            } => write!(f, "update {key}={value} at r{replica}"),
            Self::Delete { replica, key } => write!(f, "delete {key} at r{replica}"),
            Self::NoLiveKey { replica, wanted } => {
                let what = match wanted {
                    Wanted::Update => "update",
                    Wanted::Delete => "delete",
                };
                write!(f, "{what} at r{replica}: no live key, nothing done")
            }
            Self::Gc {
                replica,
                older_than_ms,
            } => write!(
                f,
                "gc r{replica}: clean up tombstones older than {older_than_ms} ms"
            ),
            Self::Reopen { replica } => write!(f, "reopen r{replica}"),
            Self::Sync {
                source,
                destination,
                batch_size,
                policy,
                cancel_after_first_batch,
                faults,
            } => {
                write!(
                    f,
                    "sync r{source}→r{destination} batch {batch_size}, {}",
                    policy_name(*policy)
                )?;
                if *cancel_after_first_batch {
                    f.write_str(", cancelled after the first batch")?;
                }
                for fault in faults {
                    write!(f, "; {fault}")?;
                }
                Ok(())
            }
            Self::Converge {
                rounds_max,
                advance_ms,
                batch_size,
                policy,
            } => write!(
                f,
                "faults stop; full mesh until quiet (at most {rounds_max} rounds of {advance_ms} ms, \
                 batch {batch_size}, {}), then the final checks",
                policy_name(*policy)
            ),
        }
    }
}

/// Why a trace could not be read, written or replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    #[error("{file}: cannot read the trace: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: cannot write the trace: {source}")]
    Write {
        file: String,
        source: std::io::Error,
    },
    #[error("cannot write the trace {file}: the folder {folder} does not exist")]
    NoFolder { file: String, folder: String },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value the replay cannot run; `field` is its path (`operations[12].replica`).
    #[error("{file}: `{field}` {reason}")]
    Invalid {
        file: String,
        field: String,
        reason: String,
    },
}

/// A field at fault and why.
struct Problem {
    field: String,
    reason: String,
}

fn problem(field: impl Into<String>, reason: impl Into<String>) -> Option<Problem> {
    Some(Problem {
        field: field.into(),
        reason: reason.into(),
    })
}

impl Trace {
    /// A trace of no operations over `replicas` replicas and `keys`.
    pub(crate) fn empty(scenario: &str, seed: u64, replicas: usize, keys: &[ItemId]) -> Self {
        Self {
            format: TRACE_FORMAT,
            scenario: scenario.to_string(),
            seed,
            replicas: (0..replicas).collect(),
            keys: keys.iter().map(ToString::to_string).collect(),
            operations: Vec::new(),
        }
    }

    /// Reads and checks a trace file.
    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_json(&text, &file)
    }

    /// Parses and checks a trace; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self, TraceError> {
        let trace: Trace = serde_json::from_str(text).map_err(|e| {
            // serde_json puts " at line L column C" at the end of its message; the
            // error names the place in front instead, as the scenario errors do.
            let message = e.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(m, _)| m)
                .to_string();
            TraceError::Syntax {
                file: file.to_string(),
                line: e.line(),
                column: e.column(),
                message,
            }
        })?;
        trace.check_as(file)?;
        Ok(trace)
    }

    /// Checks every value a replay relies on; the first problem is the error.
    pub fn check(&self) -> Result<(), TraceError> {
        self.check_as(&format!("trace of {:?}", self.scenario))
    }

    fn check_as(&self, file: &str) -> Result<(), TraceError> {
        self.problem().map_or(Ok(()), |p| {
            Err(TraceError::Invalid {
                file: file.to_string(),
                field: p.field,
                reason: p.reason,
            })
        })
    }

    fn problem(&self) -> Option<Problem> {
        if self.format != TRACE_FORMAT {
            return problem(
                "format",
                format!("is {}; this knit reads format {TRACE_FORMAT}", self.format),
            );
        }
        if self.replicas.is_empty() || self.replicas.len() > MAX_SIM_REPLICAS {
            return problem(
                "replicas",
                format!("must list from 1 to {MAX_SIM_REPLICAS} replicas"),
            );
        }
        for (index, pair) in self.replicas.windows(2).enumerate() {
            if let [a, b] = pair {
                if a >= b {
                    return problem(
                        format!("replicas[{}]", index + 1),
                        "must be above the one before it (places in ascending order)",
                    );
                }
            }
        }
        if let Some(last) = self.replicas.last() {
            if *last >= MAX_SIM_REPLICAS {
                return problem(
                    format!("replicas[{}]", self.replicas.len() - 1),
                    format!("must be below {MAX_SIM_REPLICAS}"),
                );
            }
        }
        if self.keys.len() > MAX_SIM_KEYS {
            return problem("keys", format!("must list at most {MAX_SIM_KEYS} keys"));
        }
        let mut keys = BTreeSet::new();
        for (index, key) in self.keys.iter().enumerate() {
            if let Err(e) = ItemId::new(key.as_bytes()) {
                return problem(format!("keys[{index}]"), e.to_string());
            }
            if !keys.insert(key.as_str()) {
                return problem(format!("keys[{index}]"), format!("repeats {key:?}"));
            }
        }
        if self.operations.len() > MAX_TRACE_OPERATIONS {
            return problem(
                "operations",
                format!("must hold at most {MAX_TRACE_OPERATIONS} operations"),
            );
        }
        let last = self.operations.len().saturating_sub(1);
        for (index, op) in self.operations.iter().enumerate() {
            if let Some(p) = self.op_problem(op, index == last, &keys) {
                return problem(format!("operations[{index}].{}", p.field), p.reason);
            }
        }
        None
    }

    /// The first problem of one operation, with a field path inside it.
    fn op_problem(&self, op: &TraceOp, last: bool, keys: &BTreeSet<&str>) -> Option<Problem> {
        let fields: &[&str] = match op {
            TraceOp::Sync { .. } => &["source", "destination"],
            _ => &["replica"],
        };
        for (field, replica) in fields.iter().zip(op.replicas()) {
            if !self.replicas.contains(&replica) {
                return problem(
                    *field,
                    format!(
                        "names r{replica}, which is not among the trace's replicas {:?}",
                        self.replicas
                    ),
                );
            }
        }
        if let Some(key) = op.key() {
            if !keys.contains(key) {
                return problem("key", format!("{key:?} is not among the trace's keys"));
            }
        }
        let batch_size_problem = |batch_size: usize| {
            (!(1..=MAX_CHANGES_PER_BATCH).contains(&batch_size)).then(|| Problem {
                field: "batch_size".into(),
                reason: format!("must be from 1 to {MAX_CHANGES_PER_BATCH}"),
            })
        };
        let edge_problem = |field: &str, a: usize, b: usize| {
            (a >= b || b >= MAX_SIM_REPLICAS).then(|| Problem {
                field: field.into(),
                reason: format!(
                    "must be an edge a–b with a below b below {MAX_SIM_REPLICAS}, not {a}–{b}"
                ),
            })
        };
        match op {
            TraceOp::Sync {
                source,
                destination,
                batch_size,
                faults,
                ..
            } => {
                if source == destination {
                    return problem("destination", "must differ from the source");
                }
                if let Some(p) = batch_size_problem(*batch_size) {
                    return Some(p);
                }
                let mut previous = 0;
                for (index, fault) in faults.iter().enumerate() {
                    if fault.batch() <= previous {
                        return problem(
                            format!("faults[{index}].batch"),
                            "must be at least 1 and above the batch of the fault before it",
                        );
                    }
                    previous = fault.batch();
                }
                None
            }
            TraceOp::Converge {
                rounds_max,
                batch_size,
                ..
            } => {
                if !last {
                    return problem("op", "`converge` must be the last operation");
                }
                if *rounds_max == 0 {
                    return problem("rounds_max", "must be at least 1");
                }
                batch_size_problem(*batch_size)
            }
            TraceOp::Partition { a, b, .. } | TraceOp::Heal { a, b } => edge_problem("a", *a, *b),
            TraceOp::Topology { edges, .. } => edges
                .iter()
                .enumerate()
                .find_map(|(index, (a, b))| edge_problem(&format!("edges[{index}]"), *a, *b)),
            _ => None,
        }
    }

    /// The trace as JSON: the header fields first, then one operation per line, so a
    /// person can read it and a diff shows which operations differ.
    pub fn to_json(&self) -> String {
        let mut text = String::from("{\n");
        text.push_str(&format!("  \"format\": {},\n", json(&self.format)));
        text.push_str(&format!("  \"scenario\": {},\n", json(&self.scenario)));
        text.push_str(&format!("  \"seed\": {},\n", json(&self.seed)));
        text.push_str(&format!("  \"replicas\": {},\n", json(&self.replicas)));
        text.push_str(&format!("  \"keys\": {},\n", json(&self.keys)));
        text.push_str("  \"operations\": [");
        for (index, op) in self.operations.iter().enumerate() {
            text.push_str(if index == 0 { "\n    " } else { ",\n    " });
            text.push_str(&json(op));
        }
        text.push_str(if self.operations.is_empty() {
            "]\n}\n"
        } else {
            "\n  ]\n}\n"
        });
        text
    }

    /// Writes the trace as [`Trace::to_json`] to `path`, replacing it whole.
    pub fn write(&self, path: &Path) -> Result<(), TraceError> {
        super::plot::write_whole(path, self.to_json().as_bytes()).map_err(|source| {
            TraceError::Write {
                file: path.display().to_string(),
                source,
            }
        })
    }

    /// Fails unless `path`'s folder exists, so a caller can refuse a mistyped path
    /// before it runs anything.
    pub fn check_path(path: &Path) -> Result<(), TraceError> {
        match path.parent() {
            // A bare file name lands in the working folder, which exists.
            Some(folder) if !folder.as_os_str().is_empty() && !folder.is_dir() => {
                Err(TraceError::NoFolder {
                    file: path.display().to_string(),
                    folder: folder.display().to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    /// The operations as numbered lines, as `knit sim` prints a reproduction.
    pub fn lines(&self) -> Vec<String> {
        let width = self.operations.len().to_string().len();
        self.operations
            .iter()
            .enumerate()
            .map(|(index, op)| format!("{:>width$}. {op}", index + 1))
            .collect()
    }
}

/// One value as compact JSON. Serialising the trace's types cannot fail (no maps with
/// non-string keys, no non-finite floats); were it ever to, the empty string would make
/// the file fail to load, loudly, rather than load as something else.
fn json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Trace {
        Trace {
            format: TRACE_FORMAT,
            scenario: "small".into(),
            seed: 7,
            replicas: vec![0, 2],
            keys: vec!["k0".into(), "k1".into()],
            operations: vec![
                TraceOp::Step {
                    step: 0,
                    advance_ms: 1000,
                },
                TraceOp::Put {
                    replica: 0,
                    key: "k1".into(),
                    value: "v1".into(),
                },
                TraceOp::Sync {
                    source: 0,
                    destination: 2,
                    batch_size: 2,
                    policy: PolicyChoice::Merge,
                    cancel_after_first_batch: false,
                    faults: vec![
                        BatchFault::Lost { batch: 1 },
                        BatchFault::Killed {
                            batch: 2,
                            at_change: None,
                        },
                    ],
                },
                TraceOp::Converge {
                    rounds_max: 10,
                    advance_ms: 1000,
                    batch_size: 2,
                    policy: PolicyChoice::Merge,
                },
            ],
        }
    }

    #[test]
    fn a_trace_reads_back_as_it_was_written() -> Result<(), TraceError> {
        let trace = small();
        let text = trace.to_json();
        assert_eq!(Trace::from_json(&text, "t.json")?, trace);
        // One operation per line, between seven lines of header and two of end.
        assert_eq!(text.lines().count(), 7 + trace.operations.len() + 2);
        Ok(())
    }

    #[test]
    fn lines_are_numbered_and_readable() {
        let lines = small().lines();
        assert_eq!(
            lines.first().map(String::as_str),
            Some("1. step 0 (the clock moves 1000 ms on)")
        );
        assert_eq!(
            lines.get(2).map(String::as_str),
            Some(
                "3. sync r0→r2 batch 2, merge; batch 1 lost; destination killed after the \
                 commit of batch 2, before its acknowledgement"
            )
        );
    }

    fn invalid(trace: &Trace) -> (String, String) {
        match Trace::from_json(&trace.to_json(), "t.json") {
            Err(TraceError::Invalid { field, reason, .. }) => (field, reason),
            other => (format!("{other:?}"), String::new()),
        }
    }

    #[test]
    fn bad_values_name_the_field() {
        let mut t = small();
        t.format = 2;
        assert_eq!(invalid(&t).0, "format");

        let mut t = small();
        t.operations.insert(1, TraceOp::Reopen { replica: 1 });
        let (field, reason) = invalid(&t);
        assert_eq!(field, "operations[1].replica");
        assert!(reason.contains("r1"), "{reason}");

        let mut t = small();
        t.operations.insert(
            1,
            TraceOp::Delete {
                replica: 2,
                key: "k9".into(),
            },
        );
        assert_eq!(invalid(&t).0, "operations[1].key");

        let mut t = small();
        t.operations.swap(2, 3);
        assert_eq!(invalid(&t).0, "operations[2].op");

        let mut t = small();
        if let Some(TraceOp::Sync { faults, .. }) = t.operations.get_mut(2) {
            faults.reverse();
        }
        assert_eq!(invalid(&t).0, "operations[2].faults[1].batch");

        let mut t = small();
        t.replicas = vec![2, 0];
        assert_eq!(invalid(&t).0, "replicas[1]");
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let text = small()
            .to_json()
            .replace("\"op\":\"put\"", "\"op\":\"pot\"");
        match Trace::from_json(&text, "t.json") {
            Err(TraceError::Syntax {
                file,
                line,
                message,
                ..
            }) => {
                assert_eq!((file.as_str(), line), ("t.json", 9));
                assert!(message.contains("pot"), "{message}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }
}

//! Convergence under random operations: 3–5 replicas put and delete a handful of keys,
//! sync in random pairs under every conflict policy, with batch sizes of 1–3, sessions
//! cancelled after their first batch and tombstone cleanups; a final full mesh must then
//! bring every replica to the same items and the same knowledge, and keys whose
//! operations were causally ordered must end as their last operation says.
//!
//! Along the way the test keeps its own record of every version ever made and of which
//! versions each one supersedes (those its maker knew, the loser of a last-writer-wins
//! decision, a forgotten delete an edit beat), and after every step checks design.md's
//! soundness invariant directly: nothing a replica knows supersedes what it holds, and
//! every version it knows is superseded by what it holds or by a version it forgot.
//!
//! The deterministic tests at the end are the stories of the bugs the properties found.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{id, Net};
use knit::{
    last_writer_wins, CancelToken, ConflictPolicy, ItemMeta, Knowledge, NoObserver, Progress,
    Resolution, SessionOptions, SessionStats, SyncObserver, Version,
};
use proptest::prelude::*;

const KEYS: [&str; 5] = ["k0", "k1", "k2", "k3", "k4"];
const NAMES: [&str; 5] = ["r0", "r1", "r2", "r3", "r4"];
/// A full mesh that needs more rounds than this has stopped converging.
const MESH_ROUNDS_MAX: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    SourceWins,
    DestinationWins,
    LastWriterWins,
    /// ApplicationDefined: merge two values into their bytewise maximum; an update
    /// beats a delete.
    Merge,
}

impl Policy {
    fn conflict_policy(self) -> ConflictPolicy {
        match self {
            Self::SourceWins => ConflictPolicy::SourceWins,
            Self::DestinationWins => ConflictPolicy::DestinationWins,
            Self::LastWriterWins => ConflictPolicy::LastWriterWins,
            Self::Merge => ConflictPolicy::ApplicationDefined(Arc::new(|c| {
                match (c.local_data, c.remote.data.as_deref()) {
                    (Some(local), Some(remote)) => Resolution::Merge(local.max(remote).to_vec()),
                    (Some(local), None) => Resolution::Merge(local.to_vec()),
                    (None, Some(remote)) => Resolution::Merge(remote.to_vec()),
                    // Delete against delete never reaches the handler (the last-writer
                    // rule settles it); keep the local state should it ever come.
                    (None, None) => Resolution::DestinationWins,
                }
            })),
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Put {
        replica: usize,
        key: usize,
    },
    Delete {
        replica: usize,
        key: usize,
    },
    Sync {
        source: usize,
        /// The destination is `source + 1 + offset` (mod the replica count), never the source.
        offset: usize,
        policy: Policy,
        batch_size: usize,
        cancel_after_first_batch: bool,
    },
    /// Tombstone cleanup (which tombstones: see [`CleanupRule`]), so later syncs from
    /// this replica may need a full enumeration.
    Cleanup {
        replica: usize,
    },
}

const ALL_POLICIES: &[Policy] = &[
    Policy::SourceWins,
    Policy::DestinationWins,
    Policy::LastWriterWins,
    Policy::Merge,
];

fn policy(among: &'static [Policy]) -> impl Strategy<Value = Policy> + Clone {
    prop::sample::select(among)
}

/// Random operations; `cleanup_weight` against puts 4, deletes 2 and syncs 4.
fn op(among: &'static [Policy], cleanup_weight: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..5usize, 0..KEYS.len()).prop_map(|(replica, key)| Op::Put { replica, key }),
        2 => (0..5usize, 0..KEYS.len()).prop_map(|(replica, key)| Op::Delete { replica, key }),
        4 => (0..5usize, 0..4usize, policy(among), 1..=3usize, prop::bool::weighted(0.25)).prop_map(
            |(source, offset, policy, batch_size, cancel_after_first_batch)| Op::Sync {
                source,
                offset,
                policy,
                batch_size,
                cancel_after_first_batch,
            }
        ),
        cleanup_weight => (0..5usize).prop_map(|replica| Op::Cleanup { replica }),
    ]
}

/// Raises the cancel flag once the first batch has committed.
struct CancelAfterFirstBatch(CancelToken);

impl SyncObserver for CancelAfterFirstBatch {
    fn progress(&mut self, _progress: &Progress) {
        self.0.cancel();
    }
}

/// One version ever made, as this test saw it.
#[derive(Debug)]
struct Made {
    key: String,
    /// Versions of the same key this one supersedes directly.
    supersedes: BTreeSet<Version>,
}

/// What happened to a key, for the final "causally ordered" check.
#[derive(Debug, Default)]
struct KeyHistory {
    /// Every local operation so far was made with knowledge of every earlier version.
    ordered: bool,
    /// The value the last local operation left (`None`: deleted).
    last: Option<String>,
    operations: usize,
}

/// The test's record of the run: every version, who supersedes whom.
struct Model {
    made: BTreeMap<Version, Made>,
    keys: BTreeMap<String, KeyHistory>,
    next_value: usize,
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

impl Model {
    fn new() -> Self {
        Self {
            made: BTreeMap::new(),
            keys: KEYS
                .iter()
                .map(|k| {
                    let history = KeyHistory {
                        ordered: true,
                        ..KeyHistory::default()
                    };
                    (k.to_string(), history)
                })
                .collect(),
            next_value: 0,
        }
    }

    fn versions_of<'a>(&'a self, key: &'a str) -> impl Iterator<Item = Version> + 'a {
        self.made
            .iter()
            .filter(move |(_, m)| m.key == key)
            .map(|(v, _)| *v)
    }

    /// The versions of `key` that `knowledge` contains.
    fn known(&self, knowledge: &Knowledge, key: &str) -> BTreeSet<Version> {
        self.versions_of(key)
            .filter(|v| knowledge.contains(&id(key), *v))
            .collect()
    }

    /// Every version `version` supersedes, directly or through others.
    fn closure(&self, version: Version) -> BTreeSet<Version> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![version];
        while let Some(v) = todo.pop() {
            if let Some(m) = self.made.get(&v) {
                for s in &m.supersedes {
                    if seen.insert(*s) {
                        todo.push(*s);
                    }
                }
            }
        }
        seen
    }

    fn supersedes(&self, winner: Version, loser: Version) -> bool {
        winner == loser || self.closure(winner).contains(&loser)
    }

    /// A local put or delete on `name`: records the new version as superseding every
    /// version of the key the replica knew just before.
    fn local_op(
        &mut self,
        net: &mut Net,
        name: &str,
        key: &str,
        put: bool,
    ) -> Result<(), TestCaseError> {
        let before = net.r(name).knowledge();
        let known = self.known(&before, key);
        let all: BTreeSet<Version> = self.versions_of(key).collect();
        let (version, value) = if put {
            self.next_value += 1;
            let value = format!("v{}", self.next_value);
            (net.put(name, key, &value), Some(value))
        } else {
            match net.r(name).delete(&id(key)).map_err(fail)? {
                Some(v) => (v, None),
                // Not live here: no operation happened.
                None => return Ok(()),
            }
        };
        let meta = net
            .r(name)
            .item_meta(&id(key))
            .map_err(fail)?
            .ok_or_else(|| fail("no metadata after a local change"))?;
        prop_assert_eq!(meta.version, version);
        prop_assert!(
            !self.made.contains_key(&version),
            "tick reused: {:?}",
            version
        );
        self.made.insert(
            version,
            Made {
                key: key.to_string(),
                supersedes: known.clone(),
            },
        );
        let history = self.keys.get_mut(key).expect("known key");
        history.ordered &= known == all;
        history.last = value;
        history.operations += 1;
        Ok(())
    }

    /// After a session `source → destination`: records the fresh versions the
    /// destination made to settle conflicts, and the last-writer-wins decisions, from
    /// the metadata before and after.
    fn after_session(
        &mut self,
        net: &mut Net,
        destination: &str,
        source_metas: &BTreeMap<String, ItemMeta>,
        destination_before: &BTreeMap<String, ItemMeta>,
        policy: Policy,
    ) -> Result<(), TestCaseError> {
        let destination_id = net.r(destination).id();
        let knowledge = net.r(destination).knowledge();
        let forgotten = net.r(destination).forgotten().clone();
        let after = metas(net, destination)?;
        for key in KEYS {
            let old = destination_before.get(key);
            let new = after.get(key);
            let remote = source_metas.get(key);
            let lww_applies = |local: &ItemMeta, remote: &ItemMeta| {
                policy == Policy::LastWriterWins || (local.deleted && remote.deleted)
            };
            match new {
                Some(n) if !self.made.contains_key(&n.version) => {
                    // A conflict settled as a fresh destination version, made with
                    // knowledge of both sides.
                    prop_assert_eq!(
                        n.version.replica,
                        destination_id,
                        "unknown version {:?} of {}",
                        n.version,
                        key
                    );
                    let supersedes = self.known(&knowledge, key);
                    self.made.insert(
                        n.version,
                        Made {
                            key: key.to_string(),
                            supersedes,
                        },
                    );
                }
                Some(n) if old.is_some_and(|o| o.version != n.version) => {
                    // The source's version stored as it is. If it does not supersede the
                    // old local version, only the last-writer rule may have chosen it.
                    let o = old.expect("checked above");
                    if !self.supersedes(n.version, o.version)
                        && lww_applies(o, n)
                        && last_writer_wins((o.timestamp, o.version), (n.timestamp, n.version))
                    {
                        self.add_edge(n.version, o.version);
                    }
                }
                Some(n) if old.is_some_and(|o| o.version == n.version) => {
                    // Local version kept: a last-writer-wins decision if the source's
                    // version is now known without being superseded.
                    if let Some(r) = remote {
                        if knowledge.contains(&id(key), r.version)
                            && !self.supersedes(n.version, r.version)
                            && lww_applies(n, r)
                            && !last_writer_wins((n.timestamp, n.version), (r.timestamp, r.version))
                        {
                            self.add_edge(n.version, r.version);
                        }
                    }
                }
                _ => {}
            }
            // Edit beats forgotten delete (scenario 22): a destination that holds a
            // version and knows, only as forgotten, a concurrent one (a tombstone some
            // replica cleaned up) keeps its version, and every later sync treats that
            // version as made with knowledge of the forgotten one.
            if let Some(n) = new {
                for v in self.known(&knowledge, key) {
                    if forgotten.contains(&id(key), v)
                        && !self.supersedes(n.version, v)
                        && !self.supersedes(v, n.version)
                    {
                        self.add_edge(n.version, v);
                    }
                }
            }
        }
        Ok(())
    }

    fn add_edge(&mut self, winner: Version, loser: Version) {
        if let Some(m) = self.made.get_mut(&winner) {
            m.supersedes.insert(loser);
        }
    }

    /// design.md's soundness invariant, for every replica, key and version ever made.
    fn check_soundness(
        &self,
        net: &mut Net,
        names: &[&str],
        step: &str,
    ) -> Result<(), TestCaseError> {
        for &name in names {
            let knowledge = net.r(name).knowledge();
            let forgotten = net.r(name).forgotten().clone();
            prop_assert!(
                knowledge.contains_knowledge(&forgotten),
                "{}: {} forgot what it does not know",
                step,
                name
            );
            for key in KEYS {
                let meta = net.r(name).item_meta(&id(key)).map_err(fail)?;
                if let Some(m) = meta {
                    prop_assert!(
                        self.made.contains_key(&m.version),
                        "{}: {} holds {:?} of {}, never made",
                        step,
                        name,
                        m.version,
                        key
                    );
                    prop_assert!(
                        knowledge.contains(&id(key), m.version),
                        "{}: {} does not know its own state {:?} of {}",
                        step,
                        name,
                        m.version,
                        key
                    );
                }
                // The versions of the key this replica has forgotten: tombstones it
                // cleaned up, or learned from a peer that did.
                let forgotten_versions: Vec<Version> = self
                    .versions_of(key)
                    .filter(|w| forgotten.contains(&id(key), *w))
                    .collect();
                for v in self.known(&knowledge, key) {
                    // Never a stale state: nothing it knows supersedes what it holds.
                    if let Some(m) = meta {
                        prop_assert!(
                            v == m.version || !self.supersedes(v, m.version),
                            "{}: {} holds {:?} of {} but knows {:?}, which supersedes it",
                            step,
                            name,
                            m.version,
                            key,
                            v
                        );
                    }
                    // And every version it knows is explained: its state supersedes it,
                    // or a forgotten version does (a replica that cleaned up a tombstone
                    // still learns, from peers, the older versions the tombstone beat).
                    let explained = meta.is_some_and(|m| self.supersedes(m.version, v))
                        || forgotten_versions.iter().any(|w| self.supersedes(*w, v));
                    prop_assert!(
                        explained,
                        "{}: {} knows {:?} of {} but holds {:?}, which does not supersede it (forgotten: {:?})",
                        step, name, v, key, meta, forgotten
                    );
                }
            }
        }
        Ok(())
    }
}

fn metas(net: &mut Net, name: &str) -> Result<BTreeMap<String, ItemMeta>, TestCaseError> {
    Ok(net
        .r(name)
        .item_metas()
        .map_err(fail)?
        .into_iter()
        .map(|(k, m)| (k.to_string(), m))
        .collect())
}

/// Every session moves each change to exactly one outcome; with these policies no
/// change fails (Save and Skip are never chosen, and the sled store does not fail).
fn check_stats(stats: &SessionStats, step: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        stats.changes_sent,
        stats.changes_applied + stats.changes_skipped + stats.changes_failed,
        "{}: {:?}",
        step,
        stats
    );
    prop_assert_eq!(stats.changes_failed, 0, "{}: {:?}", step, stats);
    prop_assert_eq!(stats.conflicts.saved + stats.conflicts.skipped, 0);
    Ok(())
}

struct Session<'a> {
    source: &'a str,
    destination: &'a str,
    policy: Policy,
    batch_size: usize,
    cancel_after_first_batch: bool,
}

fn run_session(
    model: &mut Model,
    net: &mut Net,
    s: &Session<'_>,
) -> Result<SessionStats, TestCaseError> {
    let step = format!(
        "{}→{} {:?} batch {}",
        s.source, s.destination, s.policy, s.batch_size
    );
    let source_metas = metas(net, s.source)?;
    let destination_before = metas(net, s.destination)?;
    let options = SessionOptions {
        policy: s.policy.conflict_policy(),
        batch_size: s.batch_size,
        ..SessionOptions::default()
    };
    let stats = if s.cancel_after_first_batch {
        let mut observer = CancelAfterFirstBatch(options.cancel.clone());
        net.sync_with(s.source, s.destination, &options, &mut observer)
    } else {
        net.sync_with(s.source, s.destination, &options, &mut NoObserver)
    }
    .map_err(|e| fail(format!("{step}: {e}")))?;
    check_stats(&stats, &step)?;
    if !s.cancel_after_first_batch {
        prop_assert!(!stats.cancelled);
    }
    model.after_session(
        net,
        s.destination,
        &source_metas,
        &destination_before,
        s.policy,
    )?;
    Ok(stats)
}

/// Which tombstones a cleanup step removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CleanupRule {
    /// Every tombstone, whoever has not seen the delete yet (retention 0).
    All,
    /// Only the tombstones every replica already knows: nobody can still hold a version
    /// such a delete superseded, or one concurrent with it, so a full enumeration finds
    /// nothing to remove and the property is about the sync core alone. Real deployments
    /// come close by keeping tombstones longer than any replica stays away.
    KnownEverywhere,
}

/// Cleans up the tombstones of `name` that every replica knows, and no others.
fn safe_cleanup(net: &mut Net, names: &[&str], name: &str) -> Result<(), TestCaseError> {
    let everyone: Vec<Knowledge> = names.iter().map(|n| net.r(n).knowledge()).collect();
    let mut unsafe_since: Option<u64> = None;
    for (item, meta) in net.r(name).item_metas().map_err(fail)? {
        let known_everywhere = everyone.iter().all(|k| k.contains(&item, meta.version));
        if meta.deleted && !known_everywhere {
            let ms = meta.timestamp.physical_ms();
            unsafe_since = Some(unsafe_since.map_or(ms, |u| u.min(ms)));
        }
    }
    // `collect_garbage` removes the tombstones at or before `now - older_than_ms`, and
    // the manual clock reads one millisecond later each time: aim just below the oldest
    // tombstone that must stay.
    let now = knit::Clock::now_ms(&*net.clock) + 1;
    let older_than_ms = unsafe_since.map_or(0, |ms| now - (ms - 1));
    let before = net.r(name).item_metas().map_err(fail)?;
    net.r(name).collect_garbage(older_than_ms).map_err(fail)?;
    for (item, meta) in before {
        let kept = net.r(name).item_meta(&item).map_err(fail)?.is_some();
        let known_everywhere = everyone.iter().all(|k| k.contains(&item, meta.version));
        prop_assert!(
            kept || (meta.deleted && known_everywhere),
            "{} cleaned up {:?} of {:?}",
            name,
            meta,
            item
        );
    }
    Ok(())
}

fn run_case(
    replica_count: usize,
    ops: Vec<Op>,
    mesh_policy: Policy,
    cleanup: CleanupRule,
) -> Result<(), TestCaseError> {
    let names = &NAMES[..replica_count];
    let mut net = Net::new(names);
    let mut model = Model::new();

    for (n, op) in ops.iter().enumerate() {
        let step = format!("step {n} {op:?}");
        match *op {
            Op::Put { replica, key } => {
                model.local_op(&mut net, names[replica % replica_count], KEYS[key], true)?
            }
            Op::Delete { replica, key } => {
                model.local_op(&mut net, names[replica % replica_count], KEYS[key], false)?
            }
            Op::Sync {
                source,
                offset,
                policy,
                batch_size,
                cancel_after_first_batch,
            } => {
                let source = source % replica_count;
                let destination = (source + 1 + offset % (replica_count - 1)) % replica_count;
                run_session(
                    &mut model,
                    &mut net,
                    &Session {
                        source: names[source],
                        destination: names[destination],
                        policy,
                        batch_size,
                        cancel_after_first_batch,
                    },
                )?;
            }
            Op::Cleanup { replica } => {
                let name = names[replica % replica_count];
                match cleanup {
                    CleanupRule::All => {
                        net.r(name).collect_garbage(0).map_err(fail)?;
                        let left = net.r(name).item_metas().map_err(fail)?;
                        prop_assert!(
                            left.iter().all(|(_, m)| !m.deleted),
                            "{} kept a tombstone",
                            name
                        );
                    }
                    CleanupRule::KnownEverywhere => safe_cleanup(&mut net, names, name)?,
                }
            }
        }
        model.check_soundness(&mut net, names, &step)?;
    }

    // Full mesh, every ordered pair, until a whole round moves nothing.
    let mut quiet = false;
    for round in 0..MESH_ROUNDS_MAX {
        let mut sent = 0;
        for &source in names {
            for &destination in names {
                if source == destination {
                    continue;
                }
                let stats = run_session(
                    &mut model,
                    &mut net,
                    &Session {
                        source,
                        destination,
                        policy: mesh_policy,
                        batch_size: 2,
                        cancel_after_first_batch: false,
                    },
                )?;
                sent += stats.changes_sent;
                model.check_soundness(
                    &mut net,
                    names,
                    &format!("mesh round {round} {source}→{destination}"),
                )?;
            }
        }
        if sent == 0 {
            quiet = true;
            break;
        }
    }
    prop_assert!(
        quiet,
        "no quiet round after {} full-mesh rounds",
        MESH_ROUNDS_MAX
    );

    // Same live items everywhere, and every knowledge contains every other.
    let reference = net.items(names[0]);
    for &name in names {
        prop_assert_eq!(
            &net.items(name),
            &reference,
            "{} differs from {}",
            name,
            names[0]
        );
    }
    let knowledges: Vec<Knowledge> = names.iter().map(|n| net.r(n).knowledge()).collect();
    for (a, ka) in names.iter().zip(&knowledges) {
        for (b, kb) in names.iter().zip(&knowledges) {
            prop_assert!(
                ka.contains_knowledge(kb),
                "K_{} does not contain K_{}: {:?} vs {:?}",
                a,
                b,
                ka,
                kb
            );
        }
    }

    // A further round, with other knobs, sends nothing at all.
    for &source in names {
        for &destination in names {
            if source != destination {
                let stats = net.sync(source, destination);
                prop_assert!(
                    stats.is_empty(),
                    "{}→{} after convergence: {:?}",
                    source,
                    destination,
                    stats
                );
                prop_assert_eq!(stats.changes_sent, 0);
            }
        }
    }

    // Keys whose every operation knew every earlier version end as the last one said.
    let live: BTreeMap<String, String> = reference.into_iter().collect();
    for (key, history) in &model.keys {
        if history.ordered && history.operations > 0 {
            prop_assert_eq!(
                live.get(key),
                history.last.as_ref(),
                "{} was only changed in causal order; its last operation left {:?}",
                key,
                history.last
            );
        }
    }
    Ok(())
}

fn replica_count() -> impl Strategy<Value = usize> {
    // Four or more replicas most of the time: the divergence-after-resolution trap
    // needs four.
    prop_oneof![1 => Just(3usize), 2 => Just(4usize), 2 => Just(5usize)]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("KNIT_SOAK_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
        max_shrink_iters: 400,
        ..ProptestConfig::default()
    })]

    /// Every policy; tombstones are cleaned up once every replica has the delete.
    #[test]
    fn random_operations_converge(
        replica_count in replica_count(),
        ops in prop::collection::vec(op(ALL_POLICIES, 1), 8..48),
        mesh_policy in policy(ALL_POLICIES),
    ) {
        run_case(replica_count, ops, mesh_policy, CleanupRule::KnownEverywhere)?;
    }

    /// Tombstones cleaned up at any time, so replicas that never saw a delete recover
    /// through full enumerations (scenarios 20–23), and concurrent edits meet forgotten
    /// deletes ("edit beats forgotten delete"); every policy must still converge.
    #[test]
    fn random_operations_with_early_cleanup_converge(
        replica_count in replica_count(),
        ops in prop::collection::vec(op(ALL_POLICIES, 2), 8..48),
        mesh_policy in policy(ALL_POLICIES),
    ) {
        run_case(replica_count, ops, mesh_policy, CleanupRule::All)?;
    }
}

/// The story (found by the random tests): r1 deletes an item that r0 created, then
/// cleans up the tombstone before r0 and r2 have the delete. Its forgotten knowledge
/// records only the delete's own version (r1's tick), not r0's creation, which r1 still
/// knows for the item. A full enumeration from r1 then keeps r2's copy, because its
/// version (r0's) is not "forgotten", while r2 learns r1's knowledge, delete included,
/// so nobody ever sends r2 the delete again: deleted at r1, alive at r0 and r2, for good.
/// (Scenario 20 with the delete made by another replica than the last writer.)
#[test]
fn a_delete_survives_the_cleanup_of_its_tombstone() -> common::TestResult {
    let mut net = Net::new(&["r0", "r1", "r2"]);
    let created = net.put("r0", "x", "hello");
    net.sync("r0", "r1");
    net.sync("r0", "r2");
    let deleted = net.del("r1", "x");
    let report = net.r("r1").collect_garbage(0)?;
    assert_eq!(report.tombstones_removed, 1);
    assert_eq!(net.r("r1").item_meta(&id("x"))?, None);
    let known = net.r("r1").knowledge();
    assert!(known.contains(&id("x"), created) && known.contains(&id("x"), deleted));
    assert!(net.r("r1").forgotten().contains(&id("x"), deleted));

    // r1 → r2 is a full enumeration that removes r2's copy.
    let s = net.sync("r1", "r2");
    assert!(s.full_enumeration);
    assert_eq!((s.changes_sent, s.forgotten_removed), (0, 1));
    assert_eq!(net.get("r2", "x"), None);
    // And the same for r0, the creator.
    let s = net.sync("r1", "r0");
    assert_eq!(s.forgotten_removed, 1);
    assert_eq!(net.get("r0", "x"), None);
    let k1 = net.r("r1").knowledge();
    for name in ["r0", "r1", "r2"] {
        assert_eq!(net.items(name), Vec::<(String, String)>::new(), "{name}");
        assert!(net.r(name).knowledge().contains_knowledge(&k1), "{name}");
    }
    Ok(())
}

/// The story (found by `random_operations_with_early_cleanup_converge`): r2 updates x,
/// then r0 deletes it, concurrently. r1 receives the delete and cleans up the tombstone;
/// then r2's older update reaches r1, which holds nothing for x and takes it as a plain
/// create ("edit beats forgotten delete"). r0 still holds the tombstone, sees the same
/// update as a conflict, and the last-writer rule keeps the delete, which is newer,
/// without a fresh version. Now r1 holds x, r0 and r2 do not, and every replica already
/// knows every version involved: no sync ever moves x again.
#[test]
fn an_update_older_than_a_forgotten_delete_converges() -> common::TestResult {
    let mut net = Net::new(&["r0", "r1", "r2"]);
    net.put("r0", "x", "first");
    net.sync("r0", "r1");
    net.sync("r0", "r2");
    let update = net.put("r2", "x", "older edit");
    let delete = net.del("r0", "x");
    net.sync("r0", "r1");
    assert_eq!(net.get("r1", "x"), None);
    assert_eq!(net.r("r1").collect_garbage(0)?.tombstones_removed, 1);

    // r1 never saw the update: a create for it.
    let s = net.sync("r2", "r1");
    assert_eq!((s.changes_applied, s.conflicts.total()), (1, 0));
    // r0 sees a conflict, and the newer delete wins.
    let s = net.sync("r2", "r0");
    assert_eq!(s.conflicts.destination_won, 1);
    assert!(net.r("r0").knowledge().contains(&id("x"), update));

    // Full mesh until nothing moves.
    let names = ["r0", "r1", "r2"];
    for _round in 0..MESH_ROUNDS_MAX {
        let mut sent = 0;
        for source in names {
            for destination in names {
                if source != destination {
                    sent += net.sync(source, destination).changes_sent;
                }
            }
        }
        if sent == 0 {
            break;
        }
    }
    let everywhere: Vec<_> = names.iter().map(|n| net.items(n)).collect();
    assert!(
        everywhere.iter().all(|items| *items == everywhere[0]),
        "replicas disagree after the mesh (delete {delete:?}, update {update:?}): {everywhere:?}"
    );
    Ok(())
}

/// The story (found by `random_operations_with_early_cleanup_converge`): forgotten
/// knowledge is a coarse vector that covers every item, so after r4 cleans up a delete
/// of k2, a replica that learns r4's forgotten knowledge "has forgotten" r4's ticks for
/// k0 too, though r4 never changed k0. A later create of k0 from a replica that never
/// heard of r4 must still be a plain create, not an edit against a forgotten delete:
/// stored as a fresh version it would turn r2's causally later update into a conflict
/// that the older value can win.
#[test]
fn a_create_after_learning_unrelated_forgotten_knowledge_stays_a_create() -> common::TestResult {
    let mut net = Net::new(&["r0", "r1", "r2", "r4"]);
    net.put("r4", "k2", "gone");
    net.del("r4", "k2");
    assert_eq!(net.r("r4").collect_garbage(0)?.tombstones_removed, 1);
    let first = net.put("r1", "k0", "v2");
    net.sync("r1", "r2");
    net.put("r2", "k0", "v3");
    let last = net.put("r2", "k0", "v4");

    // r0 learns r4's forgotten knowledge through a full enumeration.
    let s = net.sync("r4", "r0");
    assert!(s.full_enumeration);
    assert!(net
        .r("r0")
        .knowledge()
        .contains_knowledge(net.r("r4").forgotten()));
    // r1's version of k0 reaches r0.
    let s = net.sync("r1", "r0");
    assert_eq!((s.changes_applied, s.conflicts.total()), (1, 0));
    assert!(net.r("r0").knowledge().contains(&id("k0"), first));
    // r2's later version, made with knowledge of r1's, is a plain update.
    let s = net.sync("r2", "r0");
    assert_eq!((s.changes_applied, s.conflicts.total()), (1, 0));
    assert_eq!(net.get("r0", "k0").as_deref(), Some("v4"));
    assert_eq!(
        net.r("r0").item_meta(&id("k0"))?.map(|m| m.version),
        Some(last)
    );
    Ok(())
}

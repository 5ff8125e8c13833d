//! The simulator's own record of a run: every version ever made and which versions each
//! one supersedes, and design.md's soundness invariant checked against it. Pure: the
//! driver reads replicas into [`Snapshot`]s and hands them in.
//!
//! A version supersedes the versions of its key that its maker knew when it made it
//! (a local operation, or a fresh version settling a conflict), the loser of a
//! last-writer-wins decision that kept the winner's version as it was, and a forgotten
//! delete that an edit beat ("edit beats forgotten delete"). Superseding is transitive.

use std::collections::{BTreeMap, BTreeSet};

use crate::metadata::ItemMeta;
use crate::model::{ItemId, Knowledge, ReplicaId, Version};
use crate::sync::last_writer_wins;

/// What the checks read from one replica.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) knowledge: Knowledge,
    pub(crate) forgotten: Knowledge,
    pub(crate) metas: BTreeMap<ItemId, ItemMeta>,
}

/// One version ever made.
#[derive(Debug)]
struct Made {
    /// Versions of the same key this one supersedes directly.
    supersedes: BTreeSet<Version>,
}

/// What the local operations did to a key, for the final "causally ordered" check.
#[derive(Debug)]
struct KeyHistory {
    /// Every local operation so far was made with knowledge of every earlier version.
    ordered: bool,
    /// The value the last local operation left (`None`: deleted).
    last: Option<Vec<u8>>,
    operations: u64,
}

pub(crate) struct History {
    made: BTreeMap<Version, Made>,
    /// The versions of each key, in the order they were made.
    by_key: BTreeMap<ItemId, Vec<Version>>,
    keys: BTreeMap<ItemId, KeyHistory>,
    /// Replica ids are random; messages name replicas by their place in the scenario,
    /// so a seed reproduces a message byte for byte.
    names: BTreeMap<ReplicaId, usize>,
}

impl History {
    pub(crate) fn new(keys: &[ItemId]) -> Self {
        Self {
            made: BTreeMap::new(),
            by_key: keys.iter().map(|k| (k.clone(), Vec::new())).collect(),
            keys: keys
                .iter()
                .map(|k| {
                    let history = KeyHistory {
                        ordered: true,
                        last: None,
                        operations: 0,
                    };
                    (k.clone(), history)
                })
                .collect(),
            names: BTreeMap::new(),
        }
    }

    pub(crate) fn name_replica(&mut self, id: ReplicaId, index: usize) {
        self.names.insert(id, index);
    }

    /// `r2:17`: the 17th tick of replica 2.
    pub(crate) fn show(&self, v: Version) -> String {
        match self.names.get(&v.replica) {
            Some(index) => format!("r{index}:{}", v.tick),
            None => format!("{}:{}", v.replica, v.tick),
        }
    }

    fn show_meta(&self, meta: Option<&ItemMeta>) -> String {
        match meta {
            None => "nothing".into(),
            Some(m) if m.deleted => format!("a tombstone {}", self.show(m.version)),
            Some(m) => self.show(m.version),
        }
    }

    fn versions_of<'a>(&'a self, key: &ItemId) -> &'a [Version] {
        self.by_key.get(key).map_or(&[], Vec::as_slice)
    }

    /// The versions of `key` that `knowledge` contains.
    pub(crate) fn known(&self, knowledge: &Knowledge, key: &ItemId) -> BTreeSet<Version> {
        self.versions_of(key)
            .iter()
            .filter(|v| knowledge.contains(key, **v))
            .copied()
            .collect()
    }

    /// Whether `winner` is `loser` or supersedes it, directly or through others.
    fn supersedes(&self, winner: Version, loser: Version) -> bool {
        if winner == loser {
            return true;
        }
        let mut seen = BTreeSet::new();
        let mut todo = vec![winner];
        while let Some(v) = todo.pop() {
            if let Some(m) = self.made.get(&v) {
                for s in &m.supersedes {
                    if *s == loser {
                        return true;
                    }
                    if seen.insert(*s) {
                        todo.push(*s);
                    }
                }
            }
        }
        false
    }

    fn add_edge(&mut self, winner: Version, loser: Version) {
        if let Some(m) = self.made.get_mut(&winner) {
            m.supersedes.insert(loser);
        }
    }

    /// A local put (`value` is `Some`) or delete that made `version`, on a replica that
    /// knew `known_before` of the key just before.
    pub(crate) fn record_local(
        &mut self,
        key: &ItemId,
        version: Version,
        known_before: BTreeSet<Version>,
        value: Option<Vec<u8>>,
    ) -> Result<(), String> {
        if self.made.contains_key(&version) {
            return Err(format!(
                "tick reused: {} was made twice",
                self.show(version)
            ));
        }
        let all: BTreeSet<Version> = self.versions_of(key).iter().copied().collect();
        let history = self
            .keys
            .get_mut(key)
            .ok_or_else(|| format!("{key} is not a key of the scenario"))?;
        history.ordered &= known_before == all;
        history.last = value;
        history.operations += 1;
        self.insert(key, version, known_before);
        Ok(())
    }

    fn insert(&mut self, key: &ItemId, version: Version, supersedes: BTreeSet<Version>) {
        self.made.insert(version, Made { supersedes });
        self.by_key.entry(key.clone()).or_default().push(version);
    }

    /// After a session into a destination (`before` and `after` it), from a source
    /// whose metadata was `source_metas`: records the fresh versions the destination
    /// made to settle conflicts and the last-writer-wins decisions. `keeps_versions` is
    /// true under the last-writer-wins policy.
    pub(crate) fn after_session(
        &mut self,
        destination: ReplicaId,
        source_metas: &BTreeMap<ItemId, ItemMeta>,
        before: &Snapshot,
        after: &Snapshot,
        keeps_versions: bool,
    ) -> Result<(), String> {
        let keys: Vec<ItemId> = self.keys.keys().cloned().collect();
        for key in &keys {
            let old = before.metas.get(key);
            let new = after.metas.get(key);
            let remote = source_metas.get(key);
            // Two deletes always meet the last-writer rule, whatever the policy.
            let lww_applies = |local: &ItemMeta, remote: &ItemMeta| {
                keeps_versions || (local.deleted && remote.deleted)
            };
            match new {
                Some(n) if !self.made.contains_key(&n.version) => {
                    // A conflict settled as a fresh destination version, made with
                    // knowledge of both sides.
                    if n.version.replica != destination {
                        return Err(format!(
                            "{} of {key} appeared at {}, which never made it",
                            self.show(n.version),
                            self.show_replica(destination)
                        ));
                    }
                    let supersedes = self.known(&after.knowledge, key);
                    self.insert(key, n.version, supersedes);
                }
                Some(n) if old.is_some_and(|o| o.version != n.version) => {
                    // The source's version stored as it is. If it does not supersede the
                    // old local version, only the last-writer rule may have chosen it.
                    if let Some(o) = old {
                        if !self.supersedes(n.version, o.version)
                            && lww_applies(o, n)
                            && last_writer_wins((o.timestamp, o.version), (n.timestamp, n.version))
                        {
                            self.add_edge(n.version, o.version);
                        }
                    }
                }
                Some(n) if old.is_some_and(|o| o.version == n.version) => {
                    // Local version kept: a last-writer-wins decision if the source's
                    // version is now known without being superseded.
                    if let Some(r) = remote {
                        if after.knowledge.contains(key, r.version)
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
            // Edit beats forgotten delete: a destination that holds a version and knows,
            // only as forgotten, a concurrent one keeps its version, and every later sync
            // treats that version as made with knowledge of the forgotten one.
            if let Some(n) = new {
                for v in self.known(&after.knowledge, key) {
                    if after.forgotten.contains(key, v)
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

    fn show_replica(&self, id: ReplicaId) -> String {
        self.names
            .get(&id)
            .map_or_else(|| id.to_string(), |index| format!("r{index}"))
    }

    /// design.md's soundness invariant for replica `index`: every version it knows is
    /// superseded by what it holds or by a version it forgot, and nothing it knows
    /// supersedes what it holds.
    pub(crate) fn check(&self, index: usize, s: &Snapshot) -> Result<(), String> {
        if !s.knowledge.contains_knowledge(&s.forgotten) {
            return Err(format!("r{index} forgot what it does not know"));
        }
        for key in self.keys.keys() {
            let meta = s.metas.get(key);
            if let Some(m) = meta {
                if !self.made.contains_key(&m.version) {
                    return Err(format!(
                        "r{index} holds {} of {key}, which nobody made",
                        self.show(m.version)
                    ));
                }
                if !s.knowledge.contains(key, m.version) {
                    return Err(format!(
                        "r{index} does not know its own state {} of {key}",
                        self.show(m.version)
                    ));
                }
            }
            let forgotten_versions: Vec<Version> = self
                .versions_of(key)
                .iter()
                .filter(|w| s.forgotten.contains(key, **w))
                .copied()
                .collect();
            for v in self.known(&s.knowledge, key) {
                if let Some(m) = meta {
                    if v != m.version && self.supersedes(v, m.version) {
                        return Err(format!(
                            "r{index} holds {} of {key} but knows {}, which supersedes it",
                            self.show(m.version),
                            self.show(v)
                        ));
                    }
                }
                let explained = meta.is_some_and(|m| self.supersedes(m.version, v))
                    || forgotten_versions.iter().any(|w| self.supersedes(*w, v));
                if !explained {
                    return Err(format!(
                        "r{index} knows {} of {key} but holds {}, which does not supersede it",
                        self.show(v),
                        self.show_meta(meta)
                    ));
                }
            }
        }
        Ok(())
    }

    /// After convergence: a key whose every local operation knew every earlier version
    /// of it ends as its last operation left it. `live` is the converged live items.
    pub(crate) fn check_causal_order(
        &self,
        live: &BTreeMap<ItemId, Vec<u8>>,
    ) -> Result<(), String> {
        for (key, history) in &self.keys {
            if history.ordered && history.operations > 0 && live.get(key) != history.last.as_ref() {
                return Err(format!(
                    "{key} was only changed in causal order and its last operation left {}, \
                     but the replicas hold {}",
                    show_value(history.last.as_deref()),
                    show_value(live.get(key).map(Vec::as_slice))
                ));
            }
        }
        Ok(())
    }

    /// Versions made so far (local operations and fresh conflict versions).
    pub(crate) fn versions_made(&self) -> usize {
        self.made.len()
    }
}

pub(crate) fn show_value(value: Option<&[u8]>) -> String {
    match value {
        None => "nothing (deleted)".into(),
        Some(bytes) => format!("{:?}", String::from_utf8_lossy(bytes)),
    }
}

//! The simulator's own record of a run: every version ever made and which versions each
//! one supersedes, and design.md's soundness invariant checked against it. Pure: the
//! driver reads replicas into [`Snapshot`]s and hands them in.
//!
//! A version supersedes the versions of its key that its maker knew when it made it
//! (a local operation, or a fresh version settling a conflict), the loser of a
//! last-writer-wins decision that kept the winner's version as it was, and a forgotten
//! delete that an edit beat ("edit beats forgotten delete"). Superseding is transitive.

use std::cell::OnceCell;
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

/// The versions of one key and what supersedes what among them. Superseding never
/// crosses keys, so each key keeps its own small graph, indexed by the order its
/// versions were made.
#[derive(Debug, Default)]
struct KeyVersions {
    versions: Vec<Version>,
    /// `supersedes[i]`: the indices `versions[i]` supersedes directly.
    supersedes: Vec<Vec<usize>>,
    /// `reach[i]`: a bit set of every index `versions[i]` supersedes, directly or
    /// through others, itself included. Computed when first asked for after a change
    /// (the checks read it for every replica between two changes) and dropped by every
    /// change to this key.
    reach: OnceCell<Vec<Bits>>,
}

/// A fixed-size bit set over a key's version indices.
#[derive(Clone, Debug)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Self {
        Self(vec![0; len.div_ceil(64)])
    }
    fn has(&self, i: usize) -> bool {
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    /// Sets bit `i`; false if it was set already.
    fn set(&mut self, i: usize) -> bool {
        match self.0.get_mut(i / 64) {
            Some(w) => {
                let was = *w & (1 << (i % 64)) != 0;
                *w |= 1 << (i % 64);
                !was
            }
            None => false,
        }
    }
    fn union(&mut self, other: &Bits) {
        for (w, o) in self.0.iter_mut().zip(&other.0) {
            *w |= o;
        }
    }
}

impl KeyVersions {
    fn changed(&mut self) {
        self.reach = OnceCell::new();
    }

    fn reach(&self) -> &[Bits] {
        self.reach.get_or_init(|| {
            let n = self.versions.len();
            (0..n)
                .map(|from| {
                    // Depth-first from `from`; the graph may hold a cycle (two
                    // last-writer decisions seen from both sides), which `set` stops.
                    let mut seen = Bits::new(n);
                    seen.set(from);
                    let mut todo = vec![from];
                    while let Some(i) = todo.pop() {
                        for &j in self.supersedes.get(i).map_or(&[][..], Vec::as_slice) {
                            if seen.set(j) {
                                todo.push(j);
                            }
                        }
                    }
                    seen
                })
                .collect()
        })
    }

    /// Whether index `winner` is `loser` or supersedes it.
    fn supersedes(&self, winner: usize, loser: usize) -> bool {
        self.reach().get(winner).is_some_and(|r| r.has(loser))
    }
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
    /// Every version ever made and its index among its key's versions.
    made: BTreeMap<Version, usize>,
    by_key: BTreeMap<ItemId, KeyVersions>,
    keys: BTreeMap<ItemId, KeyHistory>,
    /// Replica ids are random; messages name replicas by their place in the scenario,
    /// so a seed reproduces a message byte for byte.
    names: BTreeMap<ReplicaId, usize>,
}

impl History {
    pub(crate) fn new(keys: &[ItemId]) -> Self {
        Self {
            made: BTreeMap::new(),
            by_key: keys
                .iter()
                .map(|k| (k.clone(), KeyVersions::default()))
                .collect(),
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
        self.by_key.get(key).map_or(&[], |k| k.versions.as_slice())
    }

    /// The index of `v` among the versions of `key`, if it is one of them.
    fn index_in(&self, key: &ItemId, v: Version) -> Option<usize> {
        let index = *self.made.get(&v)?;
        (self.versions_of(key).get(index) == Some(&v)).then_some(index)
    }

    /// The versions of `key` that `knowledge` contains.
    pub(crate) fn known(&self, knowledge: &Knowledge, key: &ItemId) -> BTreeSet<Version> {
        self.versions_of(key)
            .iter()
            .filter(|v| knowledge.contains(key, **v))
            .copied()
            .collect()
    }

    /// Whether `winner` is `loser` or supersedes it, directly or through others (both
    /// versions of `key`).
    fn supersedes(&self, key: &ItemId, winner: Version, loser: Version) -> bool {
        if winner == loser {
            return true;
        }
        match (self.index_in(key, winner), self.index_in(key, loser)) {
            (Some(w), Some(l)) => self.by_key.get(key).is_some_and(|k| k.supersedes(w, l)),
            _ => false,
        }
    }

    fn add_edge(&mut self, key: &ItemId, winner: Version, loser: Version) {
        let (Some(w), Some(l)) = (self.index_in(key, winner), self.index_in(key, loser)) else {
            return;
        };
        if let Some(k) = self.by_key.get_mut(key) {
            if let Some(edges) = k.supersedes.get_mut(w) {
                if !edges.contains(&l) {
                    edges.push(l);
                    k.changed();
                }
            }
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
        let edges: Vec<usize> = supersedes
            .iter()
            .filter_map(|v| self.index_in(key, *v))
            .collect();
        let k = self.by_key.entry(key.clone()).or_default();
        self.made.insert(version, k.versions.len());
        k.versions.push(version);
        k.supersedes.push(edges);
        k.changed();
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
                        if !self.supersedes(key, n.version, o.version)
                            && lww_applies(o, n)
                            && last_writer_wins((o.timestamp, o.version), (n.timestamp, n.version))
                        {
                            self.add_edge(key, n.version, o.version);
                        }
                    }
                }
                Some(n) if old.is_some_and(|o| o.version == n.version) => {
                    // Local version kept: a last-writer-wins decision if the source's
                    // version is now known without being superseded.
                    if let Some(r) = remote {
                        if after.knowledge.contains(key, r.version)
                            && !self.supersedes(key, n.version, r.version)
                            && lww_applies(n, r)
                            && !last_writer_wins((n.timestamp, n.version), (r.timestamp, r.version))
                        {
                            self.add_edge(key, n.version, r.version);
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
                        && !self.supersedes(key, n.version, v)
                        && !self.supersedes(key, v, n.version)
                    {
                        self.add_edge(key, n.version, v);
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
        for (key, versions) in &self.by_key {
            let meta = s.metas.get(key);
            let held = match meta {
                None => None,
                Some(m) => {
                    let Some(held) = self.index_in(key, m.version) else {
                        return Err(if self.made.contains_key(&m.version) {
                            format!(
                                "r{index} holds {} of {key}, which was made for another key",
                                self.show(m.version)
                            )
                        } else {
                            format!(
                                "r{index} holds {} of {key}, which nobody made",
                                self.show(m.version)
                            )
                        });
                    };
                    if !s.knowledge.contains(key, m.version) {
                        return Err(format!(
                            "r{index} does not know its own state {} of {key}",
                            self.show(m.version)
                        ));
                    }
                    Some(held)
                }
            };
            let reach = versions.reach();
            // Everything the held version or a forgotten one supersedes: what the
            // replica may know.
            let mut explained = Bits::new(versions.versions.len());
            if let Some(r) = held.and_then(|h| reach.get(h)) {
                explained.union(r);
            }
            for (w, version) in versions.versions.iter().enumerate() {
                if s.forgotten.contains(key, *version) {
                    if let Some(r) = reach.get(w) {
                        explained.union(r);
                    }
                }
            }
            for (v, version) in versions.versions.iter().enumerate() {
                if !s.knowledge.contains(key, *version) {
                    continue;
                }
                if let (Some(h), Some(m)) = (held, meta) {
                    if v != h && reach.get(v).is_some_and(|r| r.has(h)) {
                        return Err(format!(
                            "r{index} holds {} of {key} but knows {}, which supersedes it",
                            self.show(m.version),
                            self.show(*version)
                        ));
                    }
                }
                if !explained.has(v) {
                    return Err(format!(
                        "r{index} knows {} of {key} but holds {}, which does not supersede it",
                        self.show(*version),
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

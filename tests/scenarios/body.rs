// The engine scenarios, shared by `tests/scenarios.rs` (sessions between folders) and
// `tests/hub_scenarios.rs` (sessions through a hub). Each root declares `mod common;`
// and the `ROUTE` every `Net` below takes, then includes this file; cargo does not
// build this folder as a test of its own.

use common::*;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use knit::{
    run_session, BatchMode, BatchOutcome, CancelToken, ChangeBatch, ChangeDestination, Commit,
    Conflict, ConflictKind, ConflictOutcome, ConflictPolicy, Direction, ForgottenRecovery, IdRange,
    ItemId, ItemMeta, ItemStore, Knowledge, MetadataError, MetadataStore, NoObserver, Peer,
    Progress, Replica, ReplicaId, Resolution, SessionOptions, SessionStats, SledItems, SyncError,
    SyncObserver, Take, Version,
};

// ---------------------------------------------------------------------------------------
// Helpers of this file
// ---------------------------------------------------------------------------------------

fn options(policy: ConflictPolicy, batch_size: usize) -> SessionOptions {
    SessionOptions {
        policy,
        batch_size,
        ..SessionOptions::default()
    }
}

/// Everything a session tells its observer.
#[derive(Default)]
struct Recorder {
    conflicts: Vec<(ItemId, ConflictKind, ConflictOutcome)>,
    failed: Vec<ItemId>,
    progress: Vec<Progress>,
    /// Raise this token once this many batches have committed.
    cancel_after_batches: Option<(u64, CancelToken)>,
}

impl Recorder {
    /// The conflicts heard, as `"item kind outcome"`.
    fn log(&self) -> Vec<String> {
        self.conflicts
            .iter()
            .map(|(item, kind, outcome)| format!("{item} {kind:?} {outcome:?}"))
            .collect()
    }
}

impl SyncObserver for Recorder {
    fn conflict(&mut self, item: &ItemId, kind: ConflictKind, outcome: ConflictOutcome) {
        self.conflicts.push((item.clone(), kind, outcome));
    }
    fn item_failed(&mut self, item: &ItemId, _reason: &str) {
        self.failed.push(item.clone());
    }
    fn progress(&mut self, progress: &Progress) {
        if let Some((after, token)) = &self.cancel_after_batches {
            if progress.batches_done == *after {
                token.cancel();
            }
        }
        self.progress.push(progress.clone());
    }
}

/// A session's main figures on one line, so an assertion reads like the scenario.
fn tally(s: &SessionStats) -> String {
    format!(
        "sent {} applied {} failed {} conflicts {}",
        s.changes_sent,
        s.changes_applied,
        s.changes_failed,
        s.conflicts.total()
    )
}

/// `source → destination` with `policy`, batch size 2, recording what the observer hears.
fn sync_rec(
    net: &mut Net,
    source: &str,
    destination: &str,
    policy: ConflictPolicy,
) -> Result<(SessionStats, Recorder), SyncError> {
    let mut recorder = Recorder::default();
    let stats = net.sync_with(source, destination, &options(policy, 2), &mut recorder)?;
    Ok((stats, recorder))
}

/// A fresh version of `replica`: its id, a tick above `previous`.
fn assert_fresh(version: Version, replica: ReplicaId, previous: Version) {
    assert_eq!(
        version.replica, replica,
        "the resolving replica stamps the result"
    );
    assert_eq!(previous.replica, replica);
    assert!(
        version.tick > previous.tick,
        "fresh tick {} must pass the old one {}",
        version.tick,
        previous.tick
    );
}

fn meta(net: &mut Net, replica: &str, item: &str) -> ItemMeta {
    net.r(replica)
        .item_meta(&id(item))
        .expect("read metadata")
        .expect("item has metadata")
}

/// `K_who ⊇ K_of`.
fn knows_all_of(net: &mut Net, who: &str, of: &str) -> bool {
    let theirs = net.r(of).knowledge();
    net.r(who).knowledge().contains_knowledge(&theirs)
}

fn names(ids: &[ItemId]) -> Vec<String> {
    ids.iter().map(ToString::to_string).collect()
}

fn keys(items: &[(String, String)]) -> Vec<String> {
    items.iter().map(|(k, _)| k.clone()).collect()
}

/// A and B both hold X at A1 (A's data "a1").
fn x_at_a1_on_a_and_b(net: &mut Net) -> Version {
    let a1 = net.put("A", "X", "a1");
    let s = net.sync("A", "B");
    assert_eq!(s.changes_applied, 1);
    a1
}

/// An item store that fails (or kills the process) when staging chosen items, and
/// otherwise behaves as the built-in store.
struct InjectedItems {
    inner: SledItems,
    failing: Arc<Mutex<HashSet<ItemId>>>,
    kill_on: Option<ItemId>,
}

impl ItemStore for InjectedItems {
    fn read(&self, metadata: &MetadataStore, item: &ItemId) -> Result<Option<Vec<u8>>, String> {
        self.inner.read(metadata, item)
    }

    fn stage(
        &mut self,
        commit: &mut Commit,
        item: &ItemId,
        data: Option<&[u8]>,
    ) -> Result<(), String> {
        if self.kill_on.as_ref() == Some(item) {
            panic!("simulated kill of the destination while staging {item}, before the commit");
        }
        let fails = self
            .failing
            .lock()
            .map_err(|e| e.to_string())?
            .contains(item);
        if fails {
            return Err(format!("injected failure while saving {item}"));
        }
        self.inner.stage(commit, item, data)
    }
}

/// Adds replica `name` to `net`, built on `items` instead of the built-in store.
fn add_with_items(net: &mut Net, name: &str, items: InjectedItems) -> Result<(), MetadataError> {
    let metadata = MetadataStore::create(&net.path(name))?;
    let replica = Replica::with_parts(metadata, Box::new(items), net.clock.clone());
    net.add_built(name, replica);
    Ok(())
}

/// What a destination saw of one batch, and its knowledge right after committing it.
struct BatchSeen {
    is_last: bool,
    full_enumeration: bool,
    ranges: Vec<IdRange>,
    changes: Vec<ItemId>,
    present: Vec<ItemId>,
    knowledge_after: Knowledge,
}

/// A destination that delegates to a replica (local, or hosted by a hub) and records
/// every batch it processes.
struct Probe<'a> {
    replica: &'a mut dyn Peer,
    seen: Vec<BatchSeen>,
}

// Not imported: with `SyncProvider` in scope, `replica.knowledge()` on a `&mut Replica`
// would pick the trait's fallible method over the inherent one.
impl knit::SyncProvider for Probe<'_> {
    fn replica_id(&self) -> ReplicaId {
        knit::SyncProvider::replica_id(&*self.replica)
    }
    fn fetch_info(&mut self) -> Result<knit::PeerInfo, SyncError> {
        knit::SyncProvider::fetch_info(&mut *self.replica)
    }
    fn begin_session(&mut self, peer: &knit::PeerInfo) -> Result<(), SyncError> {
        knit::SyncProvider::begin_session(&mut *self.replica, peer)
    }
    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError> {
        knit::SyncProvider::note_peer_epoch(&mut *self.replica, peer, epoch)
    }
    fn end_session(&mut self, completed: bool) -> Result<(), SyncError> {
        knit::SyncProvider::end_session(&mut *self.replica, completed)
    }
}

impl ChangeDestination for Probe<'_> {
    fn process_batch(
        &mut self,
        batch: ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError> {
        let groups = batch.groups();
        let mut seen = BatchSeen {
            is_last: batch.is_last(),
            full_enumeration: matches!(batch.mode(), BatchMode::FullEnumeration { .. }),
            ranges: groups.iter().map(|g| g.range().clone()).collect(),
            changes: batch.changes().map(|c| c.item.clone()).collect(),
            present: groups
                .iter()
                .flat_map(|g| g.present().iter().cloned())
                .collect(),
            knowledge_after: Knowledge::new(),
        };
        let outcome = self.replica.process_batch(batch, policy, observer)?;
        // Asked of the replica itself (through a hub, a request of its own), not
        // derived from the outcome.
        seen.knowledge_after = knit::SyncProvider::fetch_info(&mut *self.replica)?.knowledge;
        self.seen.push(seen);
        Ok(outcome)
    }
}

/// `source → destination` through a [`Probe`].
fn sync_probed(
    net: &mut Net,
    source: &str,
    destination: &str,
    options: &SessionOptions,
) -> (Result<SessionStats, SyncError>, Vec<BatchSeen>) {
    net.session(
        source,
        destination,
        &options.policy,
        |src, replica, clock| {
            let mut probe = Probe {
                replica,
                seen: Vec::new(),
            };
            let result = run_session(src, &mut probe, options, &mut NoObserver, clock);
            (result, probe.seen)
        },
    )
}

// ---------------------------------------------------------------------------------------
// 1–3: propagation, echo, convergence
// ---------------------------------------------------------------------------------------

#[test]
fn s01_create_propagates() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    let a1 = net.put("A", "X", "hello");
    // B has never heard of X, so the applier can only classify it as a create.
    assert!(net.r("B").item_meta(&id("X"))?.is_none());

    let s = net.sync("A", "B");

    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 0");
    assert_eq!(s.changes_skipped, 0);
    let m = meta(&mut net, "B", "X");
    assert_eq!((m.version, m.creation, m.deleted), (a1, a1, false));
    assert_eq!(net.get("B", "X").as_deref(), Some("hello"));
    assert!(net.r("B").knowledge().contains(&id("X"), a1));
    // Storing a remote version is not a local change.
    assert_eq!(net.r("B").tick(), 0);
    Ok(())
}

#[test]
fn s02_no_echo() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    let a1 = net.put("A", "X", "hello");
    net.sync("A", "B");
    let k_a_before = net.r("A").knowledge();
    let k_b = net.r("B").knowledge();

    let back = net.sync("B", "A");
    assert!(back.is_empty(), "B→A sent {back:?}");
    // A learns B's vector and nothing else: no item, no tick.
    assert_eq!(net.r("A").knowledge(), k_a_before.combine(&k_b));
    assert_eq!(
        net.r("A").knowledge(),
        k_a_before,
        "B knows nothing A does not"
    );
    assert_eq!(net.r("A").tick(), a1.tick);
    assert_eq!(meta(&mut net, "A", "X").version, a1);

    let again = net.sync("A", "B");
    assert!(again.is_empty(), "A→B sent {again:?}");
    assert_eq!(net.r("B").knowledge(), k_b);
    Ok(())
}

#[test]
fn s03_converged_replicas_transfer_nothing() -> TestResult {
    let names = ["A", "B", "C"];
    let mut net = Net::with_route(&names, ROUTE);
    net.put("A", "X", "x");
    net.put("B", "Y", "y");
    net.put("C", "Z", "z");
    net.put("B", "W", "w");
    net.sync("B", "C");
    net.del("C", "W");
    // Two rounds over every ordered pair converge three replicas.
    for _ in 0..2 {
        for s in names {
            for d in names {
                if s != d {
                    net.sync(s, d);
                }
            }
        }
    }
    for s in names {
        for d in names {
            if s != d {
                let (ks, kd) = (net.r(s).knowledge(), net.r(d).knowledge());
                assert!(
                    ks.contains_knowledge(&kd),
                    "{s} must contain {d}'s knowledge"
                );
            }
        }
    }

    for s in names {
        for d in names {
            if s == d {
                continue;
            }
            let (k_d, tick_d, items_d) = (net.r(d).knowledge(), net.r(d).tick(), net.items(d));
            let stats = net.sync(s, d);
            assert!(stats.is_empty(), "{s}→{d}: {stats:?}");
            assert_eq!(
                (stats.batches, stats.bytes, stats.forgotten_removed),
                (0, 0, 0),
                "{s}→{d}: converged replicas need no batch at all"
            );
            assert!(!stats.full_enumeration && !stats.cancelled, "{s}→{d}");
            assert_eq!(net.r(d).knowledge(), k_d, "{s}→{d} changed knowledge");
            assert_eq!(net.r(d).tick(), tick_d);
            assert_eq!(net.items(d), items_d);
        }
    }
    assert_eq!(keys(&net.items("A")), ["X", "Y", "Z"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4–11: conflicts and their policies
// ---------------------------------------------------------------------------------------

#[test]
fn s04_update_update_source_wins() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.put("B", "X", "from B");
    let b = net.r("B").id();

    let (s, rec) = sync_rec(&mut net, "A", "B", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 1");
    assert_eq!(s.conflicts.source_won, 1);
    assert_eq!(rec.log(), ["X UpdateUpdate SourceWon"]);
    assert_eq!(net.get("B", "X").as_deref(), Some("from A"));
    let b4 = meta(&mut net, "B", "X").version;
    assert_fresh(b4, b, b3);
    let k_b = net.r("B").knowledge();
    assert!(k_b.contains(&id("X"), a2) && k_b.contains(&id("X"), b3) && k_b.contains(&id("X"), b4));

    // B4 was made with knowledge of A2: a plain update at A, no second conflict.
    let (back, rec) = sync_rec(&mut net, "B", "A", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(rec.conflicts.is_empty());
    assert_eq!(meta(&mut net, "A", "X").version, b4);
    assert_eq!(net.get("A", "X").as_deref(), Some("from A"));
    assert!(net.sync("A", "B").is_empty());
    Ok(())
}

#[test]
fn s05_update_update_destination_wins() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.put("B", "X", "from B");
    let b = net.r("B").id();

    let (s, rec) = sync_rec(&mut net, "A", "B", ConflictPolicy::DestinationWins)?;
    // The remote version is learned, so the conflict counts as applied.
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 1");
    assert_eq!(s.conflicts.destination_won, 1);
    assert_eq!(rec.log(), ["X UpdateUpdate DestinationWon"]);
    assert_eq!(net.get("B", "X").as_deref(), Some("from B"));
    let b4 = meta(&mut net, "B", "X").version;
    assert_fresh(b4, b, b3);
    assert!(net.r("B").knowledge().contains(&id("X"), a2));

    let (back, _) = sync_rec(&mut net, "B", "A", ConflictPolicy::DestinationWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert_eq!(meta(&mut net, "A", "X").version, b4);
    assert_eq!(net.get("A", "X").as_deref(), Some("from B"));
    assert_eq!(net.get("B", "X").as_deref(), Some("from B"));
    assert!(net.sync("A", "B").is_empty());
    Ok(())
}

#[test]
fn s06_update_vs_delete_destination_wins() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.del("B", "X");
    let b = net.r("B").id();

    let (s, rec) = sync_rec(&mut net, "A", "B", ConflictPolicy::DestinationWins)?;
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 1");
    assert_eq!(s.conflicts.destination_won, 1);
    assert_eq!(rec.log(), ["X LocalDeleteRemoteUpdate DestinationWon"]);
    let m = meta(&mut net, "B", "X");
    assert!(m.deleted, "X stays deleted at B");
    assert_eq!(net.get("B", "X"), None);
    assert_fresh(m.version, b, b3);
    assert!(net.r("B").knowledge().contains(&id("X"), a2));

    // The tombstone was made with knowledge of A2: A deletes without a conflict.
    let (back, rec) = sync_rec(&mut net, "B", "A", ConflictPolicy::DestinationWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(rec.conflicts.is_empty());
    let at_a = meta(&mut net, "A", "X");
    assert!(at_a.deleted);
    assert_eq!(at_a.version, m.version);
    assert!(net.items("A").is_empty() && net.items("B").is_empty());
    assert!(net.sync("A", "B").is_empty());
    Ok(())
}

#[test]
fn s07_update_vs_delete_source_wins() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    let a1 = x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.del("B", "X");
    let b = net.r("B").id();

    let (s, rec) = sync_rec(&mut net, "A", "B", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 1");
    assert_eq!(s.conflicts.source_won, 1);
    assert_eq!(rec.log(), ["X LocalDeleteRemoteUpdate SourceWon"]);
    // B revives X with A's data under a fresh B version.
    let m = meta(&mut net, "B", "X");
    assert!(!m.deleted);
    assert_fresh(m.version, b, b3);
    assert_eq!(m.creation, a1);
    assert_eq!(net.get("B", "X").as_deref(), Some("from A"));
    assert!(net.r("B").knowledge().contains(&id("X"), a2));

    let (back, _) = sync_rec(&mut net, "B", "A", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert_eq!(meta(&mut net, "A", "X").version, m.version);
    assert_eq!(net.get("A", "X").as_deref(), Some("from A"));
    assert!(net.sync("A", "B").is_empty());
    Ok(())
}

#[test]
fn s08_delete_vs_stale_update_is_not_a_conflict() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "a2");
    net.sync("A", "B");
    assert_eq!(meta(&mut net, "B", "X").version, a2);
    let b3 = net.del("B", "X");

    let s = net.sync("A", "B");
    assert!(s.is_empty(), "B knows A2: {s:?}");
    assert!(meta(&mut net, "B", "X").deleted);

    let (back, rec) = sync_rec(&mut net, "B", "A", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(rec.conflicts.is_empty());
    let at_a = meta(&mut net, "A", "X");
    assert!(at_a.deleted);
    assert_eq!(at_a.version, b3);
    assert!(net.r("A").knowledge().contains(&id("X"), b3));
    assert_eq!(net.get("A", "X"), None);
    Ok(())
}

#[test]
fn s09_merge() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.put("B", "X", "from B");
    let b = net.r("B").id();
    let merge = ConflictPolicy::ApplicationDefined(Arc::new(|c: &Conflict| {
        let local = String::from_utf8_lossy(c.local_data.unwrap_or_default()).into_owned();
        let remote =
            String::from_utf8_lossy(c.remote.data.as_deref().unwrap_or_default()).into_owned();
        Resolution::Merge(format!("{local}+{remote}").into_bytes())
    }));

    let (s, rec) = sync_rec(&mut net, "A", "B", merge.clone())?;
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 1");
    assert_eq!(s.conflicts.merged, 1);
    assert_eq!(rec.log(), ["X UpdateUpdate Merged"]);
    assert_eq!(net.get("B", "X").as_deref(), Some("from B+from A"));
    let b4 = meta(&mut net, "B", "X").version;
    assert_fresh(b4, b, b3);
    assert!(net.r("B").knowledge().contains(&id("X"), a2));

    let (back, rec) = sync_rec(&mut net, "B", "A", merge)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(rec.conflicts.is_empty());
    assert_eq!(meta(&mut net, "A", "X").version, b4);
    assert_eq!(net.get("A", "X").as_deref(), Some("from B+from A"));
    Ok(())
}

#[test]
fn s10_save_conflict() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.put("B", "X", "from B");
    let (a, b) = (net.r("A").id(), net.r("B").id());
    let save =
        ConflictPolicy::ApplicationDefined(Arc::new(|_: &Conflict| Resolution::SaveConflict));

    let (s, rec) = sync_rec(&mut net, "A", "B", save)?;
    assert_eq!(tally(&s), "sent 1 applied 0 failed 1 conflicts 1");
    assert_eq!(s.conflicts.saved, 1);
    assert_eq!(rec.log(), ["X UpdateUpdate Saved"]);
    // B's data unchanged, the remote version not learned, the conflict logged.
    assert_eq!(net.get("B", "X").as_deref(), Some("from B"));
    assert_eq!(meta(&mut net, "B", "X").version, b3);
    assert!(!net.r("B").knowledge().contains(&id("X"), a2));
    let saved = net.r("B").saved_conflicts()?;
    assert_eq!(saved.len(), 1);
    let conflict = &saved[0];
    assert_eq!(conflict.source, a);
    assert_eq!(
        (conflict.remote.item.clone(), conflict.remote.version),
        (id("X"), a2)
    );
    assert_eq!(conflict.remote.data.as_deref(), Some(&b"from A"[..]));
    assert!(
        conflict.made_with.contains(&id("X"), a2),
        "conflict knowledge holds A2"
    );

    let resolved = net.r("B").resolve_conflict(&id("X"), Take::Remote)?;
    assert_fresh(resolved, b, b3);
    assert_eq!(meta(&mut net, "B", "X").version, resolved);
    assert_eq!(net.get("B", "X").as_deref(), Some("from A"));
    assert!(net.r("B").saved_conflicts()?.is_empty());
    let k_b = net.r("B").knowledge();
    assert!(k_b.contains_knowledge(&conflict.made_with));
    assert!(k_b.contains(&id("X"), a2));

    // A2 is learned now: A→B sends nothing, and B→A is a plain update.
    assert!(net.sync("A", "B").is_empty());
    let (back, _) = sync_rec(&mut net, "B", "A", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert_eq!(net.get("A", "X").as_deref(), Some("from A"));
    Ok(())
}

#[test]
fn s11_skip_change() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    x_at_a1_on_a_and_b(&mut net);
    let a2 = net.put("A", "X", "from A");
    let b3 = net.put("B", "X", "from B");
    let asked: Arc<Mutex<Vec<Version>>> = Arc::default();
    let log = Arc::clone(&asked);
    let skip = ConflictPolicy::ApplicationDefined(Arc::new(move |c: &Conflict| {
        log.lock().expect("log").push(c.remote.version);
        Resolution::Skip
    }));

    let k_b_before = net.r("B").knowledge();
    let (s, rec) = sync_rec(&mut net, "A", "B", skip.clone())?;
    assert_eq!(tally(&s), "sent 1 applied 0 failed 1 conflicts 1");
    assert_eq!(s.conflicts.skipped, 1);
    assert_eq!(rec.failed, [id("X")]);
    assert_eq!(net.get("B", "X").as_deref(), Some("from B"));
    assert_eq!(meta(&mut net, "B", "X").version, b3);
    assert!(net.r("B").saved_conflicts()?.is_empty(), "nothing logged");
    assert!(!net.r("B").knowledge().contains(&id("X"), a2));
    assert_eq!(
        net.r("B").knowledge().vector_for(b"X"),
        k_b_before.vector_for(b"X"),
        "X keeps B's old vector"
    );

    let (again, rec) = sync_rec(&mut net, "A", "B", skip)?;
    assert_eq!(tally(&again), "sent 1 applied 0 failed 1 conflicts 1");
    assert_eq!(again.conflicts.skipped, 1);
    assert_eq!(rec.log(), ["X UpdateUpdate Skipped"]);
    assert_eq!(
        *asked.lock().expect("log"),
        [a2, a2],
        "the same conflict, raised twice"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 12–15: failures, batching, cancellation, crashes
// ---------------------------------------------------------------------------------------

#[test]
fn s12_recoverable_error() -> TestResult {
    let mut net = Net::with_route(&["A"], ROUTE);
    let failing: Arc<Mutex<HashSet<ItemId>>> = Arc::default();
    let items = InjectedItems {
        inner: SledItems,
        failing: Arc::clone(&failing),
        kill_on: None,
    };
    add_with_items(&mut net, "B", items)?;
    let three = options(ConflictPolicy::SourceWins, 3);
    let y1 = net.put("A", "Y", "y1");
    net.sync_with("A", "B", &three, &mut NoObserver)?;
    let y_vector_before = net.r("B").knowledge().vector_for(b"Y").clone();

    let x = net.put("A", "X", "x");
    let y2 = net.put("A", "Y", "y2");
    let z = net.put("A", "Z", "z");
    failing.lock().expect("lock").insert(id("Y"));
    let mut rec = Recorder::default();
    let s = net.sync_with("A", "B", &three, &mut rec)?;

    assert_eq!(s.batches, 1, "one batch of X, Y, Z");
    assert_eq!(tally(&s), "sent 3 applied 2 failed 1 conflicts 0");
    assert_eq!(rec.failed, [id("Y")], "ItemChangeSkipped once, for Y");
    let k_b = net.r("B").knowledge();
    assert!(k_b.contains(&id("X"), x) && k_b.contains(&id("Z"), z));
    assert!(!k_b.contains(&id("Y"), y2));
    assert_eq!(
        *k_b.vector_for(b"Y"),
        y_vector_before,
        "Y keeps B's old vector"
    );
    assert_eq!(meta(&mut net, "B", "Y").version, y1);
    let held = [("X", "x"), ("Y", "y1"), ("Z", "z")].map(|(k, v)| (k.into(), v.into()));
    assert_eq!(net.items("B"), held);

    failing.lock().expect("lock").clear();
    let next = net.sync_with("A", "B", &three, &mut NoObserver)?;
    assert_eq!(tally(&next), "sent 1 applied 1 failed 0 conflicts 0");
    assert_eq!(net.get("B", "Y").as_deref(), Some("y2"));
    assert!(knows_all_of(&mut net, "B", "A"));
    Ok(())
}

#[test]
fn s13_batching() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    let versions: Vec<(ItemId, Version)> = (0..25)
        .map(|n| {
            let key = format!("i{n:02}");
            let v = net.put("A", &key, "v");
            (id(&key), v)
        })
        .collect();
    let k_a = net.r("A").knowledge();
    let k_b0 = net.r("B").knowledge();

    let (result, seen) = sync_probed(&mut net, "A", "B", &options(ConflictPolicy::SourceWins, 10));
    let s = result?;

    assert_eq!(s.batches, 3);
    assert_eq!(tally(&s), "sent 25 applied 25 failed 0 conflicts 0");
    let flags: Vec<bool> = seen.iter().map(|b| b.is_last).collect();
    assert_eq!(
        flags,
        [false, false, true],
        "only the last batch says IsLastBatch"
    );
    let counts: Vec<usize> = seen.iter().map(|b| b.changes.len()).collect();
    assert_eq!(counts, [10, 10, 5]);
    let mut completed_end: Option<Vec<u8>> = Some(Vec::new());
    let mut sent = 0;
    for (n, batch) in seen.iter().enumerate() {
        assert_eq!(batch.ranges.len(), 1);
        let range = &batch.ranges[0];
        // Groups tile the id space: each starts where the previous one ended.
        assert_eq!(Some(range.start().to_vec()), completed_end, "batch {n}");
        completed_end = range.end().map(<[u8]>::to_vec);
        sent += batch.changes.len();
        let done = IdRange::new(Vec::new(), completed_end.clone())?;
        assert_eq!(
            batch.knowledge_after,
            k_b0.combine(&k_a.project(&done)),
            "after batch {n}, B knows exactly A's knowledge of the ranges done so far"
        );
        for (i, (item, v)) in versions.iter().enumerate() {
            assert_eq!(
                batch.knowledge_after.contains(item, *v),
                i < sent,
                "batch {n}, item {item}"
            );
        }
    }
    assert_eq!(
        completed_end, None,
        "the last group runs to the end of the id space"
    );
    assert_eq!(net.r("B").knowledge(), k_a);
    Ok(())
}

#[test]
fn s14_cancel_keeps_committed_batches() -> TestResult {
    let mut net = Net::with_route(&["A", "B"], ROUTE);
    let versions: Vec<(ItemId, Version)> = (0..1000)
        .map(|n| {
            let key = format!("i{n:04}");
            let v = net.put("A", &key, "v");
            (id(&key), v)
        })
        .collect();
    let opts = options(ConflictPolicy::SourceWins, 100);
    let mut rec = Recorder {
        cancel_after_batches: Some((4, opts.cancel.clone())),
        ..Recorder::default()
    };

    let s = net.sync_with("A", "B", &opts, &mut rec)?;

    assert!(s.cancelled);
    assert_eq!(s.batches, 4);
    assert_eq!(tally(&s), "sent 400 applied 400 failed 0 conflicts 0");
    let held = net.items("B");
    assert_eq!(held.len(), 400, "no rollback of committed batches");
    assert_eq!(keys(&held), keys(&net.items("A")[..400]));
    let k_b = net.r("B").knowledge();
    assert!(
        k_b.exception_count() > 0,
        "the done ranges are range exceptions"
    );
    for (i, (item, v)) in versions.iter().enumerate() {
        assert_eq!(k_b.contains(item, *v), i < 400, "item {item}");
    }

    // A new session with a new token: the old one stays raised.
    let opts = options(ConflictPolicy::SourceWins, 100);
    let next = net.sync_with("A", "B", &opts, &mut NoObserver)?;
    assert!(!next.cancelled);
    assert_eq!(tally(&next), "sent 600 applied 600 failed 0 conflicts 0");
    assert_eq!(next.changes_skipped, 0);
    assert!(knows_all_of(&mut net, "B", "A"));
    assert_eq!(net.items("B"), net.items("A"));
    Ok(())
}

#[test]
fn s15_crash_inside_a_batch() -> TestResult {
    // B dies while its applier stages the second item of batch 5 (the panic stands in for
    // kill -9): the first item of the batch is already staged, nothing is committed.
    let mut net = Net::with_route(&["A"], ROUTE);
    let items = InjectedItems {
        inner: SledItems,
        failing: Arc::default(),
        kill_on: Some(id("i09")),
    };
    add_with_items(&mut net, "B", items)?;
    let versions: Vec<(ItemId, Version)> = (0..10)
        .map(|n| {
            let key = format!("i{n:02}");
            (id(&key), net.put("A", &key, &key))
        })
        .collect();
    let opts = options(ConflictPolicy::SourceWins, 2);

    let mut rec = Recorder::default();
    let crashed = net.session("A", "B", &opts.policy, |a, b, clock| {
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_session(&mut *a, b, &opts, &mut rec, clock)
        }));
        // In a real deployment the source sees its peer's connection drop and leaves the
        // session; here the panic unwound past `run_session`, so A leaves it by hand.
        knit::SyncProvider::end_session(a, false).map(|()| crashed)
    })?;
    assert!(crashed.is_err(), "B was killed");
    assert_eq!(rec.progress.len(), 4, "killed inside batch 5");

    net.reopen("B");
    let k_b = net.r("B").knowledge();
    for (i, (item, v)) in versions.iter().enumerate() {
        let in_first_four = i < 8;
        assert_eq!(k_b.contains(item, *v), in_first_four, "knowledge of {item}");
        assert_eq!(
            net.r("B").item_meta(item)?.is_some(),
            in_first_four,
            "metadata of {item}"
        );
    }
    assert_eq!(keys(&net.items("B")), keys(&net.items("A")[..8]));
    assert_eq!(net.r("B").tick(), 0, "no item shows up as a local change");

    let s = net.sync_with("A", "B", &opts, &mut NoObserver)?;
    // Batch 5 only, and no duplicates: nothing is obsolete at B.
    assert_eq!(s.batches, 1);
    assert_eq!(tally(&s), "sent 2 applied 2 failed 0 conflicts 0");
    assert_eq!(s.changes_skipped, 0);
    assert_eq!(net.items("B"), net.items("A"));
    assert!(knows_all_of(&mut net, "B", "A"));
    assert_eq!(net.r("B").tick(), 0);
    assert!(
        net.sync("B", "A").is_empty(),
        "B has no change of its own to send"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 16–18: three replicas
// ---------------------------------------------------------------------------------------

#[test]
fn s16_transitive_learning() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    let a1 = net.put("A", "X", "x");
    net.sync("A", "C");

    let s = net.sync("C", "B");
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 0");
    let m = meta(&mut net, "B", "X");
    assert_eq!((m.version, m.creation), (a1, a1), "A1 verbatim");
    assert_eq!(net.get("B", "X").as_deref(), Some("x"));
    assert!(net.r("B").knowledge().contains(&id("X"), a1));

    let direct = net.sync("A", "B");
    assert!(direct.is_empty(), "B already knows A1: {direct:?}");
    Ok(())
}

#[test]
fn s17_three_replicas_no_false_conflict() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    let a1 = net.put("A", "X", "x1");
    net.sync("A", "C");
    net.sync("C", "B");
    let a2 = net.put("A", "X", "x2");

    let via_c = net.sync_policy("A", "C", ConflictPolicy::SourceWins);
    assert_eq!(tally(&via_c), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(
        net.r("C").knowledge().contains(&id("X"), a1),
        "B's version A1 ∈ MW_C"
    );
    let (s, rec) = sync_rec(&mut net, "C", "B", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(rec.conflicts.is_empty());
    assert_eq!(meta(&mut net, "B", "X").version, a2);
    assert_eq!(net.get("B", "X").as_deref(), Some("x2"));
    assert!(net.r("B").knowledge().contains(&id("X"), a2));
    Ok(())
}

#[test]
fn s18_real_conflict_through_a_relay() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    net.put("A", "X", "a1");
    net.sync("A", "B");
    net.sync("A", "C");
    let a2 = net.put("A", "X", "from A");
    let b5 = net.put("B", "X", "from B");
    let b = net.r("B").id();

    let (to_c, _) = sync_rec(&mut net, "A", "C", ConflictPolicy::SourceWins)?;
    assert_eq!(to_c.conflicts.total(), 0);
    let (s, rec) = sync_rec(&mut net, "C", "B", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 1");
    assert_eq!(s.conflicts.source_won, 1);
    assert_eq!(rec.log(), ["X UpdateUpdate SourceWon"]);
    assert_eq!(net.get("B", "X").as_deref(), Some("from A"));
    let fresh = meta(&mut net, "B", "X").version;
    assert_fresh(fresh, b, b5);
    assert!(net.r("B").knowledge().contains(&id("X"), a2));

    for (source, destination) in [("B", "C"), ("C", "B"), ("C", "A"), ("A", "C")] {
        let (s, rec) = sync_rec(&mut net, source, destination, ConflictPolicy::SourceWins)?;
        assert_eq!(s.conflicts.total(), 0, "{source}→{destination}");
        assert!(rec.conflicts.is_empty(), "{source}→{destination}");
    }
    for name in ["A", "B", "C"] {
        assert_eq!(net.get(name, "X").as_deref(), Some("from A"), "{name}");
        assert_eq!(meta(&mut net, name, "X").version, fresh, "{name}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 20–23: tombstone cleanup and forgotten knowledge
// ---------------------------------------------------------------------------------------

struct Cleaned {
    x1: Version,
    x_deleted: Version,
    z: Version,
    /// C's own update of X, when the setup made one.
    c_edit: Option<Version>,
}

/// A creates W, X, Y and sends them to B and C (so C holds X at A1); C may update X;
/// A deletes X and creates Z; B gets both; A cleans up its tombstones.
fn cleaned_up_delete(
    net: &mut Net,
    c_edits_x: bool,
) -> Result<Cleaned, Box<dyn std::error::Error>> {
    net.put("A", "W", "w");
    let x1 = net.put("A", "X", "x");
    net.put("A", "Y", "y");
    net.sync("A", "B");
    net.sync("A", "C");
    let c_edit = c_edits_x.then(|| net.put("C", "X", "edited at C"));
    let x_deleted = net.del("A", "X");
    let z = net.put("A", "Z", "z");
    net.sync("A", "B");
    assert!(meta(net, "B", "X").deleted, "B got the tombstone");

    let gc = net.r("A").collect_garbage(0)?;
    assert_eq!(gc.tombstones_removed, 1);
    assert!(net.r("A").item_meta(&id("X"))?.is_none());
    let f_a = net.r("A").forgotten().clone();
    assert!(f_a.contains(&id("X"), x_deleted), "F_A ∋ A3");
    assert!(
        !net.r("C").knowledge().contains_knowledge(&f_a),
        "K_C ⊉ F_A"
    );
    Ok(Cleaned {
        x1,
        x_deleted,
        z,
        c_edit,
    })
}

/// Batch size 2, SourceWins, and full enumeration when the destination lacks `F`.
fn full() -> SessionOptions {
    SessionOptions {
        recovery: ForgottenRecovery::FullEnumeration,
        ..options(ConflictPolicy::SourceWins, 2)
    }
}

/// Batch size 2, SourceWins, and an error when the destination lacks `F`.
fn abort() -> SessionOptions {
    SessionOptions {
        recovery: ForgottenRecovery::Abort,
        ..options(ConflictPolicy::SourceWins, 2)
    }
}

#[test]
fn s20_tombstone_cleanup_full_enumeration() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    let v = cleaned_up_delete(&mut net, false)?;
    assert_eq!(
        meta(&mut net, "C", "X").version,
        v.x1,
        "C still holds X at A1"
    );

    // B saw the delete before the cleanup: no recovery needed there.
    let b = net.sync_with("A", "B", &abort(), &mut NoObserver)?;
    assert!(b.is_empty() && !b.full_enumeration);

    let (result, seen) = sync_probed(&mut net, "A", "C", &full());
    let s = result?;
    assert!(s.full_enumeration);
    assert_eq!(s.forgotten_removed, 1, "X is removed at C");
    // Only Z, which C lacks, carries data.
    assert_eq!(tally(&s), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(seen.iter().all(|b| b.full_enumeration));
    // Every live item of A is named, in id order, across the batches.
    let named: Vec<String> = seen
        .iter()
        .flat_map(|b| {
            let mut ids: Vec<ItemId> = b.changes.iter().chain(&b.present).cloned().collect();
            ids.sort();
            ids
        })
        .map(|i| i.to_string())
        .collect();
    assert_eq!(named, ["W", "Y", "Z"]);
    let with_data: Vec<ItemId> = seen
        .iter()
        .flat_map(|b| b.changes.iter().cloned())
        .collect();
    assert_eq!(
        names(&with_data),
        ["Z"],
        "only the change C lacks carries data"
    );

    // DeleteAndRemoveTombstone: no data and no tombstone left at C.
    assert!(net.r("C").item_meta(&id("X"))?.is_none());
    assert_eq!(net.items("C"), net.items("A"));
    assert!(net.r("C").knowledge().contains(&id("Z"), v.z));
    let f_a = net.r("A").forgotten().clone();
    assert!(
        net.r("C").forgotten().contains_knowledge(&f_a),
        "C learns F_A"
    );
    assert!(knows_all_of(&mut net, "C", "A"));

    let again = net.sync_with("A", "C", &abort(), &mut NoObserver)?;
    assert!(again.is_empty() && !again.full_enumeration);
    Ok(())
}

#[test]
fn s21_recovery_abort() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    cleaned_up_delete(&mut net, false)?;
    let (a, c) = (net.r("A").id(), net.r("C").id());
    let before = (
        net.r("C").knowledge(),
        net.r("C").forgotten().clone(),
        net.r("C").item_metas()?,
        net.items("C"),
        net.r("C").tick(),
    );

    let result = net.sync_with("A", "C", &abort(), &mut NoObserver);
    match result {
        Err(SyncError::FullEnumerationNeeded {
            source_replica,
            destination,
        }) => assert_eq!((source_replica, destination), (a, c)),
        other => panic!("expected FullEnumerationNeeded, got {other:?}"),
    }
    let after = (
        net.r("C").knowledge(),
        net.r("C").forgotten().clone(),
        net.r("C").item_metas()?,
        net.items("C"),
        net.r("C").tick(),
    );
    assert_eq!(after, before, "nothing applied, K_C unchanged");
    assert_eq!(keys(&net.items("C")), ["W", "X", "Y"]);

    // The aborted session ended: both replicas can sync again.
    let s = net.sync_with("A", "C", &full(), &mut NoObserver)?;
    assert!(s.full_enumeration);
    assert_eq!(net.items("C"), net.items("A"));
    Ok(())
}

/// Edit beats forgotten delete: C's update of X is concurrent with A's delete, but A no
/// longer has the tombstone to raise a conflict with, so the edit survives and comes
/// back to A as a create.
#[test]
fn s22_recovery_concurrent_edit_survives() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    let v = cleaned_up_delete(&mut net, true)?;
    let c7 = v.c_edit.expect("C edited X");
    assert!(!net.r("A").forgotten().contains(&id("X"), c7), "C7 ∉ F_A");

    let s = net.sync_with("A", "C", &full(), &mut NoObserver)?;
    assert!(s.full_enumeration);
    assert_eq!(s.forgotten_removed, 0);
    assert_eq!(s.conflicts.total(), 0);
    // C keeps X with its edit ("edit beats forgotten delete"). It is about to learn
    // A's knowledge of X, which holds the versions A's forgotten delete superseded:
    // those are concurrent with C7, so C re-stamps X as a fresh C version made with
    // knowledge of both. Replicas holding them (or B's tombstone) then take the edit as a
    // plain update instead of settling edit-vs-delete by their own policies.
    let at_c = meta(&mut net, "C", "X");
    assert!(!at_c.deleted, "full enumeration keeps X at C");
    assert_fresh(at_c.version, c7.replica, c7);
    assert!(net.r("C").knowledge().contains(&id("X"), c7));
    assert!(net
        .r("C")
        .knowledge()
        .contains_knowledge(net.r("A").forgotten()));
    assert_eq!(net.get("C", "X").as_deref(), Some("edited at C"));

    assert!(net.r("A").item_meta(&id("X"))?.is_none());
    let (back, rec) = sync_rec(&mut net, "C", "A", ConflictPolicy::SourceWins)?;
    assert_eq!(tally(&back), "sent 1 applied 1 failed 0 conflicts 0");
    assert!(rec.conflicts.is_empty());
    assert_eq!(
        meta(&mut net, "A", "X").version,
        at_c.version,
        "A recreates X (Create)"
    );
    assert_eq!(net.get("A", "X").as_deref(), Some("edited at C"));
    assert_eq!(net.items("A"), net.items("C"));

    // B, which holds the tombstone, takes the edit as a plain update: no conflict.
    let (to_b, rec) = sync_rec(&mut net, "A", "B", ConflictPolicy::DestinationWins)?;
    assert_eq!(to_b.conflicts.total(), 0, "{:?}", rec.log());
    assert_eq!(net.items("B"), net.items("A"));
    assert!(net.sync("A", "C").is_empty());
    Ok(())
}

#[test]
fn s23_no_resurrection_by_a_stale_source() -> TestResult {
    let mut net = Net::with_route(&["A", "B", "C"], ROUTE);
    let v = cleaned_up_delete(&mut net, false)?;
    assert!(
        net.r("A").knowledge().contains(&id("X"), v.x1),
        "C's X at A1 ∈ K_A"
    );

    let s = net.sync_with("C", "A", &abort(), &mut NoObserver)?;
    assert!(s.is_empty(), "C sends nothing A knows: {s:?}");
    assert!(
        net.r("A").item_meta(&id("X"))?.is_none(),
        "A does not recreate X"
    );
    assert_eq!(keys(&net.items("A")), ["W", "Y", "Z"]);
    assert!(net.r("A").knowledge().contains(&id("X"), v.x_deleted));

    // The recovery that follows removes the stale X from C.
    let s = net.sync_with("A", "C", &full(), &mut NoObserver)?;
    assert_eq!(s.forgotten_removed, 1);
    assert_eq!(net.items("C"), net.items("A"));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 25: directions and statistics
// ---------------------------------------------------------------------------------------

#[test]
fn s25_directions_and_statistics() -> TestResult {
    let mut net = Net::with_route(&["L", "R"], ROUTE);
    net.put("L", "Q", "q0");
    net.sync("L", "R");
    net.put("L", "P", "p from L");
    let l_q = net.put("L", "Q", "q from L");
    let r_q = net.put("R", "Q", "q from R");
    net.put("R", "S", "s from R");
    net.put("R", "T", "t from R");
    let r = net.r("R").id();
    let opts = SessionOptions {
        direction: Direction::UploadAndDownload,
        ..options(ConflictPolicy::SourceWins, 2)
    };

    let mut rec = Recorder::default();
    let report = net.sync_pair("L", "R", &opts, &mut rec)?;

    let up = report.upload.expect("upload ran");
    assert_eq!(tally(&up), "sent 2 applied 2 failed 0 conflicts 1");
    assert_eq!(up.conflicts.source_won, 1);
    let at_r = meta(&mut net, "R", "Q");
    assert_fresh(at_r.version, r, r_q);
    assert!(net.r("R").knowledge().contains(&id("Q"), l_q));
    let down = report.download.expect("download ran");
    assert_eq!(tally(&down), "sent 3 applied 3 failed 0 conflicts 0");
    assert_eq!(
        rec.log(),
        ["Q UpdateUpdate SourceWon"],
        "one conflict in all"
    );
    assert_eq!(meta(&mut net, "L", "Q").version, at_r.version);
    assert_eq!(net.items("L"), net.items("R"));
    assert_eq!(net.get("L", "Q").as_deref(), Some("q from L"));
    assert_eq!(keys(&net.items("L")), ["P", "Q", "S", "T"]);

    let second = net.sync_pair("L", "R", &opts, &mut NoObserver)?;
    for stats in [
        second.upload.expect("upload"),
        second.download.expect("download"),
    ] {
        assert_eq!(tally(&stats), "sent 0 applied 0 failed 0 conflicts 0");
        assert!(stats.is_empty());
    }
    Ok(())
}

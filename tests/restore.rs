//! Restoring a replica from an old copy of its folder, and `rekey`.
//!
//! The story (design.md, "Reused ticks"): a replica restored from a backup counts its
//! ticks from the backup's value, so its next changes take `(replica, tick)` pairs the
//! lost original already gave out. Peers that hold the original's changes "know" those
//! pairs and would skip the restored copy's changes as obsolete: silent data loss. knit
//! notices when a peer knows a tick of the replica above the replica's own counter,
//! refuses the sync with `ReplicaRestored`, and `rekey` continues the replica under a
//! new id.

mod common;

use std::fs;
use std::io;
use std::path::Path;

use common::*;
use knit::{
    ConflictPolicy, Direction, ItemId, ItemMeta, NoObserver, ReplicaStatus, SessionOptions,
    SyncError, SyncReport, Version,
};

/// Copies a closed replica's folder, as a backup tool would.
fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

fn options(direction: Direction) -> SessionOptions {
    SessionOptions {
        direction,
        policy: ConflictPolicy::LastWriterWins,
        batch_size: 2,
        ..SessionOptions::default()
    }
}

/// `local.sync_with(remote)` in both directions (upload first).
fn sync_both(net: &mut Net, local: &str, remote: &str) -> Result<SyncReport, SyncError> {
    let mut l = net.replicas.remove(local).expect("known local replica");
    let result = {
        let r = net.replicas.get_mut(remote).expect("known remote replica");
        l.sync_with(r, &options(Direction::UploadAndDownload), &mut NoObserver)
    };
    net.replicas.insert(local.to_string(), l);
    result
}

/// Sent counts of both directions of a report.
fn sent(report: &SyncReport) -> (u64, u64) {
    let count = |s: &Option<knit::SessionStats>| s.as_ref().map_or(u64::MAX, |s| s.changes_sent);
    (count(&report.upload), count(&report.download))
}

/// Everything a failed sync must leave alone.
#[derive(Debug, PartialEq)]
struct Snapshot {
    status: ReplicaStatus,
    last_sync_tick: u64,
    metas: Vec<(ItemId, ItemMeta)>,
    items: Vec<(String, String)>,
}

fn snapshot(net: &mut Net, name: &str) -> Snapshot {
    let items = net.items(name);
    let r = net.r(name);
    Snapshot {
        status: r.status().expect("status"),
        last_sync_tick: r.metadata().last_sync_tick(),
        metas: r.item_metas().expect("item metas"),
        items,
    }
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Closes `name`, replaces its folder with `backup`, and reopens it.
fn restore(net: &mut Net, name: &str, backup: &Path) -> io::Result<()> {
    net.replicas.remove(name);
    fs::remove_dir_all(net.path(name))?;
    copy_dir(backup, &net.path(name))?;
    net.reopen(name);
    Ok(())
}

fn backup(net: &mut Net, name: &str, to: &Path) -> io::Result<()> {
    net.replicas.remove(name);
    copy_dir(&net.path(name), to)?;
    net.reopen(name);
    Ok(())
}

fn assert_versions_unique(metas: &[(ItemId, ItemMeta)]) {
    let mut versions: Vec<Version> = metas.iter().map(|(_, m)| m.version).collect();
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(
        versions.len(),
        metas.len(),
        "two items share a version: {metas:?}"
    );
}

#[test]
fn restored_copy_is_refused_until_rekeyed_and_then_loses_nothing() -> TestResult {
    let mut net = Net::new(&["A", "B"]);
    net.put("A", "k1", "one"); // A1
    net.put("A", "k2", "two"); // A2
    net.put("B", "b1", "bee");
    net.sync("A", "B");
    net.sync("B", "A");
    let (a, b) = (net.r("A").id(), net.r("B").id());
    let copy = net.dir.path().join("backup of A");
    backup(&mut net, "A", &copy)?;

    // The original goes on: A3, A4, A5, all delivered to B.
    net.put("A", "k3", "three");
    net.put("A", "k4", "four");
    let a5 = net.put("A", "k2", "two, edited");
    assert_eq!(a5, Version::new(a, 5));
    let s = net.sync("A", "B");
    assert_eq!((s.changes_sent, s.changes_applied), (3, 3));

    // The disk dies; A comes back from the copy, at tick 2, and makes two changes that
    // take ticks 3 and 4 again.
    restore(&mut net, "A", &copy)?;
    assert_eq!((net.r("A").id(), net.r("A").tick()), (a, 2));
    assert_eq!(net.put("A", "r1", "made on the copy"), Version::new(a, 3));
    assert_eq!(
        net.put("A", "k1", "one, edited on the copy"),
        Version::new(a, 4)
    );

    // Either direction refuses, naming the way out, and changes nothing on either side.
    // As the destination (begun first), the copy finds itself out: B knows a tick it
    // has not issued. As the source, B finds it out first: the copy presents a session
    // epoch below one B has seen from A.
    let (a_before, b_before) = (snapshot(&mut net, "A"), snapshot(&mut net, "B"));
    for (direction, evidence_wanted) in [
        (
            Direction::Download,
            "knows its tick 5 but the replica is at tick 4",
        ),
        (Direction::Upload, "has seen its session epoch"),
    ] {
        let mut l = net.replicas.remove("A").expect("A");
        let result = {
            let r = net.replicas.get_mut("B").expect("B");
            l.sync_with(r, &options(direction), &mut NoObserver)
        };
        net.replicas.insert("A".to_string(), l);
        let err = result.expect_err("a restored replica must not sync");
        match &err {
            SyncError::ReplicaRestored {
                replica,
                peer,
                evidence,
            } => {
                assert_eq!((*replica, *peer), (a, b), "{direction:?}");
                assert!(
                    evidence.contains(evidence_wanted),
                    "{direction:?}: {evidence}"
                );
            }
            other => panic!("expected ReplicaRestored, got {other:?}"),
        }
        assert!(err.to_string().contains("knit rekey"), "{err}");
    }
    let err = sync_both(&mut net, "A", "B").expect_err("a restored replica must not sync");
    assert!(matches!(err, SyncError::ReplicaRestored { .. }), "{err:?}");
    let err = net
        .sync_with("B", "A", &options(Direction::Upload), &mut NoObserver)
        .expect_err("a restored replica must not accept changes either");
    assert!(matches!(err, SyncError::ReplicaRestored { replica, .. } if replica == a));
    assert_eq!(snapshot(&mut net, "A"), a_before);
    assert_eq!(snapshot(&mut net, "B"), b_before);

    // Rekey: the copy's two changes are re-issued under the new id; knowledge of the
    // old id goes back to the last sync, so the original's A3..A5 come back.
    let n = net.r("A").rekey()?;
    assert_ne!(n, a);
    assert_eq!(net.r("A").id(), n);
    let r1 = net.r("A").item_meta(&id("r1"))?.expect("r1");
    assert_eq!((r1.version.replica, r1.creation), (n, r1.version));
    let k1 = net.r("A").item_meta(&id("k1"))?.expect("k1");
    assert_eq!((k1.version.replica, k1.creation), (n, Version::new(a, 1)));
    assert!(!net
        .r("A")
        .knowledge()
        .contains(&id("k3"), Version::new(a, 3)));

    let report = sync_both(&mut net, "A", "B")?;
    let (up, down) = (
        report.upload.as_ref().expect("upload"),
        report.download.as_ref().expect("download"),
    );
    assert_eq!(
        (up.changes_sent, up.changes_applied, up.changes_failed),
        (2, 2, 0)
    );
    assert_eq!(
        (down.changes_sent, down.changes_applied, down.changes_failed),
        (3, 3, 0)
    );
    assert_eq!((up.conflicts.total(), down.conflicts.total()), (0, 0));

    // Nothing is lost: the original's later changes and the copy's changes, everywhere.
    let expected = pairs(&[
        ("b1", "bee"),
        ("k1", "one, edited on the copy"),
        ("k2", "two, edited"),
        ("k3", "three"),
        ("k4", "four"),
        ("r1", "made on the copy"),
    ]);
    assert_eq!(net.items("A"), expected);
    assert_eq!(net.items("B"), expected);
    let (a_metas, b_metas) = (net.r("A").item_metas()?, net.r("B").item_metas()?);
    assert_eq!(a_metas, b_metas);
    assert_versions_unique(&a_metas);
    let at_b = |item: &str| {
        b_metas
            .iter()
            .find(|(i, _)| *i == id(item))
            .map(|(_, m)| m.version)
    };
    assert_eq!(
        at_b("r1").map(|v| v.replica),
        Some(n),
        "re-issued under the new id"
    );
    assert_eq!(at_b("k1").map(|v| v.replica), Some(n));
    assert_eq!(
        at_b("k3"),
        Some(Version::new(a, 3)),
        "the original's change, not the copy's"
    );
    assert_eq!(at_b("k2"), Some(a5));
    let (ka, kb) = (net.r("A").knowledge(), net.r("B").knowledge());
    assert!(ka.contains_knowledge(&kb) && kb.contains_knowledge(&ka));
    assert_eq!(sent(&sync_both(&mut net, "A", "B")?), (0, 0));
    Ok(())
}

#[test]
fn restored_copy_with_changes_from_before_the_copy_converges_after_rekey() -> TestResult {
    // The copy holds a change (k3, A3) that was not yet synced when the copy was taken;
    // the original delivered it later. rekey cannot tell it from the copy's own later
    // changes (both come after the last completed sync), so it re-issues it too; B then
    // holds the same data twice under two versions and settles it as a conflict. Nothing
    // may be lost, and the replicas must converge.
    let mut net = Net::new(&["A", "B"]);
    net.put("A", "k1", "one");
    net.put("A", "k2", "two");
    net.sync("A", "B");
    net.sync("B", "A");
    let a = net.r("A").id();
    let a3 = net.put("A", "k3", "three");
    let copy = net.dir.path().join("backup of A");
    backup(&mut net, "A", &copy)?;
    net.put("A", "k4", "four");
    net.put("A", "k5", "five");
    assert_eq!(net.sync("A", "B").changes_sent, 3);

    restore(&mut net, "A", &copy)?;
    assert_eq!(net.put("A", "r1", "made on the copy"), Version::new(a, 4));
    // B, the upload's destination and so the first side to begin, sees the copy's
    // session epoch go back.
    let err = sync_both(&mut net, "A", "B").expect_err("a restored replica must not sync");
    assert!(
        matches!(
            &err,
            SyncError::ReplicaRestored { replica, evidence, .. }
                if *replica == a && evidence.contains("has seen its session epoch")
        ),
        "{err:?}"
    );

    let n = net.r("A").rekey()?;
    let report = sync_both(&mut net, "A", "B")?;
    let (up, down) = (
        report.upload.as_ref().expect("upload"),
        report.download.as_ref().expect("download"),
    );
    // Up: k3 and r1 under the new id; down: k4 and k5 (B's k3 now carries A's new version).
    assert_eq!(
        (up.changes_sent, up.changes_applied, up.changes_failed),
        (2, 2, 0)
    );
    assert_eq!(
        (down.changes_sent, down.changes_applied, down.changes_failed),
        (2, 2, 0)
    );
    let expected = pairs(&[
        ("k1", "one"),
        ("k2", "two"),
        ("k3", "three"),
        ("k4", "four"),
        ("k5", "five"),
        ("r1", "made on the copy"),
    ]);
    assert_eq!(net.items("A"), expected);
    assert_eq!(net.items("B"), expected);
    let (a_metas, b_metas) = (net.r("A").item_metas()?, net.r("B").item_metas()?);
    assert_eq!(a_metas, b_metas);
    assert_versions_unique(&a_metas);
    // k3 was created after the last sync, so its creation is re-issued too.
    let k3 = net.r("B").item_meta(&id("k3"))?.expect("k3");
    assert_ne!(k3.creation, a3);
    assert_eq!((k3.version.replica, k3.creation.replica), (n, n));
    let (ka, kb) = (net.r("A").knowledge(), net.r("B").knowledge());
    assert!(ka.contains_knowledge(&kb) && kb.contains_knowledge(&ka));
    assert_eq!(sent(&sync_both(&mut net, "A", "B")?), (0, 0));
    Ok(())
}

#[test]
fn rekey_with_nothing_since_the_last_sync_changes_no_item() -> TestResult {
    let mut net = Net::new(&["A", "B"]);
    net.put("A", "x", "ex");
    net.put("A", "y", "why");
    net.del("A", "y");
    net.put("B", "z", "zed");
    // x and y's tombstone up, z down.
    assert_eq!(sent(&sync_both(&mut net, "A", "B")?), (2, 1));
    let old = net.r("A").id();
    let before = snapshot(&mut net, "A");
    let b_before = snapshot(&mut net, "B");

    let n = net.r("A").rekey()?;
    assert_ne!(n, old);
    let after = snapshot(&mut net, "A");
    assert_eq!(after.metas, before.metas, "no item is re-issued");
    assert_eq!(after.items, before.items);
    assert_eq!(after.status.tick, before.status.tick);
    assert!(after
        .status
        .knowledge
        .contains_knowledge(&before.status.knowledge));
    assert_eq!(after.status.forgotten, before.status.forgotten);

    // Nothing to exchange, and B is left exactly as it was.
    assert_eq!(sent(&sync_both(&mut net, "A", "B")?), (0, 0));
    let b_after = snapshot(&mut net, "B");
    assert_eq!(
        (b_after.metas, b_after.items),
        (b_before.metas, b_before.items)
    );
    // B may learn ticks of the new id up to A's counter (the new id continues from it and
    // never issues those), never above.
    assert!(b_after.status.knowledge.max_tick(n) <= net.r("A").tick());

    // The next change carries the new id and reaches B.
    let w = net.put("A", "w", "double-u");
    assert_eq!(w.replica, n);
    assert_eq!(sent(&sync_both(&mut net, "A", "B")?), (1, 0));
    assert_eq!(net.r("B").item_meta(&id("w"))?.map(|m| m.version), Some(w));
    assert_eq!(net.items("A"), net.items("B"));
    Ok(())
}

/// A deterministic pseudo-random sequence (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// No peer may know a tick of a replica above that replica's own counter.
fn assert_no_peer_knows_ahead(net: &mut Net, names: &[&str]) {
    for x in names {
        let (id, tick) = (net.r(x).id(), net.r(x).tick());
        for y in names {
            let known = net.r(y).knowledge().max_tick(id);
            assert!(
                known <= tick,
                "{y} knows tick {known} of {x}, which is at tick {tick}"
            );
        }
    }
}

#[test]
fn normal_syncs_between_three_replicas_are_never_taken_for_a_restore() -> TestResult {
    // False positives: interleaved changes, conflicts settled by policies that issue
    // fresh versions at the destination, reopened replicas, every direction. None of it
    // may make a peer know a tick of a replica above its counter.
    let names = ["A", "B", "C"];
    let mut net = Net::new(&names);
    let keys = ["k1", "k2", "k3", "k4", "k5"];
    let policies = [
        ConflictPolicy::LastWriterWins,
        ConflictPolicy::SourceWins,
        ConflictPolicy::DestinationWins,
    ];
    let directions = [
        Direction::Upload,
        Direction::Download,
        Direction::UploadAndDownload,
        Direction::DownloadAndUpload,
    ];
    let mut rng = XorShift(0xDEAD_BEEF_CAFE_F00D);
    let pick = |rng: &mut XorShift, n: usize| rng.below(n as u64) as usize;
    let (mut syncs, mut conflicts) = (0, 0);
    for step in 0..300 {
        let x = names[pick(&mut rng, 3)];
        match rng.below(10) {
            0..=3 => {
                let key = keys[pick(&mut rng, keys.len())];
                net.put(x, key, &format!("{x} at step {step}"));
            }
            4 => {
                let key = id(keys[pick(&mut rng, keys.len())]);
                net.r(x).delete(&key)?;
            }
            5 => net.reopen(x),
            _ => {
                let y = names[(names.iter().position(|n| *n == x).expect("named")
                    + 1
                    + pick(&mut rng, 2))
                    % 3];
                let options = SessionOptions {
                    direction: directions[pick(&mut rng, directions.len())],
                    policy: policies[pick(&mut rng, policies.len())].clone(),
                    batch_size: 1 + pick(&mut rng, 3),
                    ..SessionOptions::default()
                };
                let mut local = net.replicas.remove(x).expect("known");
                let result = local.sync_with(net.r(y), &options, &mut NoObserver);
                net.replicas.insert(x.to_string(), local);
                let report = match result {
                    Ok(report) => report,
                    Err(e) => panic!("step {step}: sync {x} with {y} failed: {e}"),
                };
                syncs += 1;
                for stats in [&report.upload, &report.download].into_iter().flatten() {
                    conflicts += stats.conflicts.total();
                }
            }
        }
        assert_no_peer_knows_ahead(&mut net, &names);
    }
    // Enough syncs, and enough conflicts settled with fresh destination versions, for
    // the check to mean something.
    assert!(
        syncs > 50 && conflicts > 10,
        "{syncs} syncs, {conflicts} conflicts"
    );

    // And they still converge.
    for _ in 0..2 {
        for (x, y) in [("A", "B"), ("B", "C"), ("A", "C")] {
            sync_both(&mut net, x, y)?;
        }
    }
    assert_eq!(net.items("A"), net.items("B"));
    assert_eq!(net.items("B"), net.items("C"));
    for (x, y) in [("A", "B"), ("B", "C"), ("A", "C")] {
        assert_eq!(sent(&sync_both(&mut net, x, y)?), (0, 0));
    }
    assert_no_peer_knows_ahead(&mut net, &names);
    Ok(())
}

#[test]
fn restored_copy_that_catches_up_to_the_lost_tick_is_still_refused() -> TestResult {
    // The copy comes back at tick 1 while B knows A's ticks up to 3, and the copy makes
    // two changes before its first sync: it is at tick 3 again, so "a peer knows a tick
    // above my counter" no longer holds. Its changes A2 and A3 are not the original's
    // A2 and A3 (other items), yet B "knows" them and A's enumeration never sends them:
    // without a refusal, both sides report success with nothing sent and stay different
    // forever (r2 and r3 exist only at A, k2 and k3 only at B).
    let mut net = Net::new(&["A", "B"]);
    net.put("A", "k1", "one");
    net.sync("A", "B");
    net.sync("B", "A");
    let a = net.r("A").id();
    let copy = net.dir.path().join("backup of A");
    backup(&mut net, "A", &copy)?;
    net.put("A", "k2", "two");
    net.put("A", "k3", "three");
    assert_eq!(net.sync("A", "B").changes_sent, 2);

    restore(&mut net, "A", &copy)?;
    assert_eq!(net.put("A", "r2", "made on the copy"), Version::new(a, 2));
    assert_eq!(
        net.put("A", "r3", "made on the copy too"),
        Version::new(a, 3)
    );
    let b_before = snapshot(&mut net, "B");
    let result = sync_both(&mut net, "A", "B");
    assert!(
        matches!(result, Err(SyncError::ReplicaRestored { .. })),
        "A reissued ticks 2 and 3 for other items; the sync must refuse, got {result:?} \
         with A holding {:?} and B holding {:?}",
        net.items("A"),
        net.items("B"),
    );
    assert_eq!(snapshot(&mut net, "B"), b_before);

    // After rekey nothing is lost: the original's k2, k3 come back from B, and the
    // copy's r2, r3 reach B under the new id.
    let new_id = net.r("A").rekey()?;
    sync_both(&mut net, "A", "B")?;
    let expected: Vec<(String, String)> = [
        ("k1", "one"),
        ("k2", "two"),
        ("k3", "three"),
        ("r2", "made on the copy"),
        ("r3", "made on the copy too"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(net.items("A"), expected);
    assert_eq!(net.items("B"), expected);
    let r2 = net.r("B").item_meta(&id("r2"))?.expect("r2 reached B");
    assert_eq!(r2.version.replica, new_id);
    Ok(())
}

#[test]
fn a_copied_folder_used_as_a_second_replica_is_refused_until_rekeyed() -> TestResult {
    // Copying a replica folder to start a new replica is an easy mistake: both copies
    // carry one id and would hand out the same ticks. A sync between them is refused
    // with the way out; after rekey the copy is a replica of its own.
    let mut net = Net::new(&["A"]);
    net.put("A", "x", "ex");
    let copy = net.path("A copy");
    backup(&mut net, "A", &copy)?;
    net.reopen("A copy");
    net.put("A copy", "y", "why");

    let err = sync_both(&mut net, "A copy", "A").expect_err("one id, two folders");
    assert!(matches!(err, SyncError::SameReplica { .. }), "{err:?}");
    assert!(err.to_string().contains("knit rekey"), "{err}");
    assert_eq!(net.items("A"), [("x".to_string(), "ex".to_string())]);

    let new_id = net.r("A copy").rekey()?;
    assert_ne!(new_id, net.r("A").id());
    sync_both(&mut net, "A copy", "A")?;
    assert_eq!(net.items("A"), net.items("A copy"));
    assert_eq!(net.get("A", "y").as_deref(), Some("why"));
    Ok(())
}

//! Scale-out: hosted replicas in one PostgreSQL database, served by several `knit serve`
//! processes at once. Needs the test server of scripts/postgres (`KNIT_TEST_PG`).

mod common;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use knit::hub::RemoteReplica;
use knit::{Direction, ItemId, NoObserver, Replica, ReplicaId, SessionOptions, SyncError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TOKEN: &str = "scale-out-token-0123456789";

/// A config for a hub process serving `replica` from the shared database.
fn config(dir: &Path, conninfo: &str, replica: &str, clients: &[ReplicaId]) -> String {
    let ids = clients
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"listen = "127.0.0.1:0"
data = "{data}"
session_timeout_secs = 5
[storage]
kind = "postgres"
conninfo = "{conninfo}"
[replicas.{replica}]
[tokens.clients]
token = "{TOKEN}"
read = ["{replica}"]
write = ["{replica}"]
replica_ids = [{ids}]
"#,
        data = dir.display()
    )
}

struct HubProcess {
    child: Child,
    base: String,
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_hub(config: &Path) -> Result<HubProcess, Box<dyn std::error::Error>> {
    let (child, base) = common::spawn_hub(config)?;
    Ok(HubProcess { child, base })
}

fn id(key: &str) -> ItemId {
    ItemId::try_from(key).expect("item id")
}

/// One full sync with the hub at `url`, retried while the replica is busy at the other
/// process (409 is the hub's answer to a second session, and the client's to wait).
fn sync_retrying(replica: &mut Replica, url: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut busy = 0;
    loop {
        let mut hub = RemoteReplica::connect(url, TOKEN, Duration::from_secs(30))?;
        let options = SessionOptions {
            direction: Direction::UploadAndDownload,
            batch_size: 3,
            ..SessionOptions::default()
        };
        match replica.sync_with(&mut hub, &options, &mut NoObserver) {
            Ok(_) => return Ok(busy),
            Err(SyncError::ReplicaBusy { .. }) if Instant::now() < deadline => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(5 + (busy % 7) * 3));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[test]
fn two_hub_processes_on_one_database_serve_clients_at_once_and_all_converge() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // A replica name of its own, so reruns and other tests share nothing in the table.
    let name = format!("notes_{}", uuid_suffix());
    let mut clients = Vec::new();
    for c in 0..4 {
        clients.push(Replica::create(&dir.path().join(format!("client{c}")))?);
    }
    let ids: Vec<ReplicaId> = clients.iter().map(|c| c.id()).collect();
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, config(dir.path(), &conninfo, &name, &ids))?;
    let hubs = [spawn_hub(&path)?, spawn_hub(&path)?];
    let urls: Vec<String> = hubs
        .iter()
        .map(|h| format!("{}/replicas/{name}", h.base))
        .collect();

    // Each client edits a tiny shared key space and syncs through both hubs in turn,
    // all four at once.
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut replica)| {
            let urls = urls.clone();
            std::thread::spawn(move || -> Result<(Replica, u64), String> {
                let mut busy = 0;
                for round in 0..6 {
                    let key = format!("k{}", (c + round) % 5);
                    if (c + round) % 4 == 3 {
                        let _ = replica.delete(&id(&key)).map_err(|e| e.to_string())?;
                    } else {
                        replica
                            .put(&id(&key), format!("c{c} r{round}").as_bytes())
                            .map_err(|e| e.to_string())?;
                    }
                    busy += sync_retrying(&mut replica, &urls[(c + round) % 2])
                        .map_err(|e| format!("client {c} round {round}: {e}"))?;
                }
                Ok((replica, busy))
            })
        })
        .collect();
    let mut clients = Vec::new();
    let mut busy = 0;
    for w in workers {
        let (replica, b) = w.join().map_err(|_| "a client panicked")??;
        busy += b;
        clients.push(replica);
    }
    // Quiet rounds, alternating hubs, until every client holds what the hub holds.
    for round in 0..2 {
        for (c, replica) in clients.iter_mut().enumerate() {
            sync_retrying(replica, &urls[(c + round) % 2])?;
        }
    }
    let first = common::items_of(&clients[0]);
    for (c, replica) in clients.iter().enumerate() {
        assert_eq!(common::items_of(replica), first, "client {c} converged");
        assert_eq!(replica.knowledge(), clients[0].knowledge(), "client {c}");
    }
    assert!(!first.is_empty());
    eprintln!("two hubs, four clients: converged; {busy} busy answers retried");
    Ok(())
}

/// A suffix unique to this run (the tests share one database).
fn uuid_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}_{}", std::process::id(), nanos % 1_000_000_000)
}

#[test]
fn a_process_whose_lease_was_taken_over_cannot_commit() -> TestResult {
    use knit::hub::Leases;
    use knit::MetadataStore;
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    let name = format!("fenced_{}", uuid_suffix());
    let location = format!("PostgreSQL replica {name}");
    let mut first = MetadataStore::open_or_create_postgres(&conninfo, &name, location.clone())?;
    let mut second = MetadataStore::open_or_create_postgres(&conninfo, &name, location)?;
    assert_eq!(first.id(), second.id(), "one replica, two handles");
    let leases = Leases::connect(&conninfo)?;

    assert!(leases.acquire(&name, b"session-1", "first", 1)?);
    assert!(!leases.acquire(&name, b"session-2", "second", 1)?, "held");
    first.set_fence(Some(b"session-1".to_vec()));
    let mut commit = first.begin();
    commit.next_version(1);
    first.commit(commit)?;

    // The first holder stalls past its lease; the second takes the replica over.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(leases.acquire(&name, b"session-2", "second", 30)?);
    second.set_fence(Some(b"session-2".to_vec()));
    second.reload()?;
    assert_eq!(
        second.tick(),
        1,
        "the takeover sees the first holder's commit"
    );

    let mut late = first.begin();
    late.next_version(2);
    let err = first.commit(late).unwrap_err().to_string();
    assert!(err.contains("taken over"), "{err}");
    assert!(
        !leases.renew(&name, b"session-1", 30)?,
        "the first lease is gone"
    );

    let mut commit = second.begin();
    commit.next_version(3);
    second.commit(commit)?;
    leases.release(&name, b"session-2")?;
    let reopened = MetadataStore::open_or_create_postgres(&conninfo, &name, "again".into())?;
    assert_eq!(reopened.tick(), 2, "only the lease holder's commits landed");
    Ok(())
}

#[test]
fn a_replica_stored_in_postgresql_syncs_with_one_in_sled_like_any_other() -> TestResult {
    let Some(conninfo) = common::pg_conninfo() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let name = format!("mirror_{}", uuid_suffix());
    let open_pg = || Replica::open_or_create_postgres(&conninfo, &name, format!("pg {name}"));
    let mut pg = open_pg()?;
    // Each handle writes pages at another threshold (1: every commit rewrites pages; 8,
    // the default: these small commits stay loose), so both layouts and loose records
    // shadowing page entries come up in PostgreSQL.
    let folds = [1, 2, 8];
    pg.set_fold_threshold(folds[0]);
    let mut local = Replica::create(&dir.path().join("local"))?;
    let options = SessionOptions {
        direction: Direction::UploadAndDownload,
        batch_size: 2,
        ..SessionOptions::default()
    };
    // A fixed pseudo-random walk over eight keys: puts and deletes on both sides,
    // a sync every few steps, the PostgreSQL handle reopened now and then.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for step in 0..120 {
        let r = next();
        let key = id(&format!("k{}", r % 8));
        let side: &mut Replica = if r % 3 == 0 { &mut pg } else { &mut local };
        if (r >> 8) % 4 == 0 {
            let _ = side.delete(&key)?;
        } else {
            side.put(&key, format!("v{step}").as_bytes())?;
        }
        if step % 7 == 6 {
            local.sync_with(&mut pg, &options, &mut NoObserver)?;
        }
        if step % 40 == 39 {
            drop(pg);
            pg = open_pg()?;
            pg.set_fold_threshold(folds[(step / 40 + 1) % folds.len()]);
        }
    }
    local.sync_with(&mut pg, &options, &mut NoObserver)?;
    local.sync_with(&mut pg, &options, &mut NoObserver)?;
    assert_eq!(common::items_of(&pg), common::items_of(&local));
    assert_eq!(pg.knowledge(), local.knowledge());
    let reopened = open_pg()?;
    assert_eq!(
        common::items_of(&reopened),
        common::items_of(&local),
        "durable in PostgreSQL"
    );
    let gc = pg.collect_garbage(0)?;
    assert!(
        gc.tombstones_removed > 0,
        "tombstone cleanup works there too"
    );
    Ok(())
}

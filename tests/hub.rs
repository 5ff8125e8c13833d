//! The hub over real HTTP on loopback: a real `knit serve` (in this process, or as a
//! child process where a test kills it), real clients, real sockets.

mod common;
use common::{items_of, spawn_hub};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use knit::hub::{HubConfig, RemoteReplica, RunningHub};
use knit::{Direction, ItemId, NoObserver, Replica, ReplicaId, SessionOptions, SyncError};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ALICE: &str = "alice-token-0123456789";
const READER: &str = "reader-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);

fn id(key: &str) -> ItemId {
    ItemId::try_from(key).expect("item id")
}

/// A hub config hosting `notes`: `alice` may read and write it as any of
/// `alice_ids`; `reader` may only read it, as any of `reader_ids`.
fn config_text(
    data: &Path,
    alice_ids: &[ReplicaId],
    reader_ids: &[ReplicaId],
    extra: &str,
) -> String {
    let list = |ids: &[ReplicaId]| {
        ids.iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"listen = "127.0.0.1:0"
data = "{data}"
{extra}
[replicas.notes]

[tokens.alice]
token = "{ALICE}"
read = ["notes"]
write = ["notes"]
replica_ids = [{alice}]

[tokens.reader]
token = "{READER}"
read = ["notes"]
replica_ids = [{reader}]
"#,
        data = data.display(),
        alice = list(alice_ids),
        reader = list(reader_ids),
    )
}

fn start_hub(dir: &Path, alice: &[ReplicaId], reader: &[ReplicaId], extra: &str) -> RunningHub {
    let path = dir.join("hub.toml");
    let text = config_text(&dir.join("hub-data"), alice, reader, extra);
    std::fs::write(&path, &text).expect("write config");
    let config = HubConfig::load(&path).expect("config");
    RunningHub::start(config).expect("start hub")
}

fn options(direction: Direction, batch_size: usize) -> SessionOptions {
    SessionOptions {
        direction,
        batch_size,
        ..SessionOptions::default()
    }
}

fn remote(hub: &RunningHub, token: &str) -> Result<RemoteReplica, knit::hub::HubError> {
    RemoteReplica::connect(&hub.replica_url("notes"), token, TIMEOUT)
}

#[test]
fn two_clients_converge_through_the_hub_with_deletes_and_a_conflict() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    let mut b = Replica::create(&dir.path().join("b"))?;
    let hub = start_hub(dir.path(), &[a.id(), b.id()], &[], "");

    for i in 0..7 {
        a.put(&id(&format!("k{i}")), format!("a{i}").as_bytes())?;
    }
    let both = options(Direction::UploadAndDownload, 3);
    let up = a.sync_with(&mut remote(&hub, ALICE)?, &both, &mut NoObserver)?;
    assert_eq!(up.upload.as_ref().map(|s| s.changes_applied), Some(7));
    assert!(up.upload.as_ref().is_some_and(|s| s.batches >= 3), "{up:?}");

    let down = b.sync_with(&mut remote(&hub, ALICE)?, &both, &mut NoObserver)?;
    assert_eq!(down.download.as_ref().map(|s| s.changes_applied), Some(7));
    assert_eq!(items_of(&a), items_of(&b));

    // Concurrent edits of k1, a delete of k2 on B, a new k9 on A.
    a.put(&id("k1"), b"from a")?;
    b.put(&id("k1"), b"from b")?;
    b.delete(&id("k2"))?;
    a.put(&id("k9"), b"nine")?;
    let mut conflicts = common_recorder::Conflicts::default();
    a.sync_with(&mut remote(&hub, ALICE)?, &both, &mut conflicts)?;
    b.sync_with(&mut remote(&hub, ALICE)?, &both, &mut conflicts)?;
    a.sync_with(&mut remote(&hub, ALICE)?, &both, &mut conflicts)?;
    assert_eq!(items_of(&a), items_of(&b));
    let keys: Vec<String> = items_of(&a).into_iter().map(|(k, _)| k).collect();
    assert!(
        !keys.contains(&"k2".to_string()),
        "the delete crossed: {keys:?}"
    );
    assert!(keys.contains(&"k9".to_string()));
    assert_eq!(
        conflicts.0,
        vec!["k1".to_string()],
        "one conflict, reported to the client"
    );
    assert_eq!(a.knowledge(), b.knowledge());
    hub.shutdown()?;
    Ok(())
}

mod common_recorder {
    use knit::{ConflictKind, ConflictOutcome, ItemId, SyncObserver};

    /// The items of every conflict a session reported.
    #[derive(Default)]
    pub struct Conflicts(pub Vec<String>);

    impl SyncObserver for Conflicts {
        fn conflict(&mut self, item: &ItemId, _: ConflictKind, _: ConflictOutcome) {
            self.0
                .push(String::from_utf8_lossy(item.as_bytes()).into_owned());
        }
    }
}

/// The hosted replica as it lies in the hub's data folder (the hub must be stopped).
fn hub_state(dir: &Path) -> (knit::Knowledge, Vec<(String, String)>) {
    let replica = Replica::open(&dir.join("hub-data").join("notes")).expect("open hub replica");
    (replica.knowledge(), items_of(&replica))
}

#[test]
fn bad_tokens_get_401_and_missing_rights_403_and_nothing_changes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    let mut stranger = Replica::create(&dir.path().join("s"))?;
    a.put(&id("x"), b"1")?;
    stranger.put(&id("y"), b"2")?;
    let hub = start_hub(dir.path(), &[a.id()], &[stranger.id()], "");
    let up = options(Direction::Upload, 10);
    a.sync_with(&mut remote(&hub, ALICE)?, &up, &mut NoObserver)?;
    hub.shutdown()?;
    let before = hub_state(dir.path());
    let hub = start_hub(dir.path(), &[a.id()], &[stranger.id()], "");

    // No token, a wrong token: 401 before anything else.
    let http = reqwest::blocking::Client::new();
    let url = hub.replica_url("notes");
    assert_eq!(http.get(&url).send()?.status(), 401);
    let wrong = http.get(&url).bearer_auth("not-a-token-at-all").send()?;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.text()?.contains("unknown token"));
    let err = remote(&hub, "not-a-token-at-all").unwrap_err().to_string();
    assert!(err.contains("401") && err.contains(&url), "{err}");

    // The reader may download but not upload.
    let err = stranger
        .sync_with(&mut remote(&hub, READER)?, &up, &mut NoObserver)
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Remote { status: Some(403), message, .. } if message.contains("no write right")),
        "{err}"
    );
    let down = options(Direction::Download, 10);
    stranger.sync_with(&mut remote(&hub, READER)?, &down, &mut NoObserver)?;

    // Alice's token is bound to A's id: it may not sync as the stranger.
    let err = stranger
        .sync_with(&mut remote(&hub, ALICE)?, &up, &mut NoObserver)
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Remote { status: Some(403), message, .. } if message.contains("may not sync as replica")),
        "{err}"
    );
    hub.shutdown()?;
    assert_eq!(
        hub_state(dir.path()),
        before,
        "no refused call changed the hub"
    );
    assert_eq!(items_of(&stranger).len(), 2, "the reader downloaded x");
    Ok(())
}

#[test]
fn a_second_session_gets_409_and_an_abandoned_one_is_rolled_back_after_its_timeout() -> TestResult {
    use knit::{ChangeSource, SyncProvider};
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    let mut b = Replica::create(&dir.path().join("b"))?;
    let hub = start_hub(
        dir.path(),
        &[a.id(), b.id()],
        &[],
        "session_timeout_secs = 1",
    );
    a.put(&id("a1"), b"x")?;
    b.put(&id("b1"), b"y")?;

    // A begins an upload and vanishes without ending it.
    let mut abandoned = remote(&hub, ALICE)?;
    let info = a.fetch_info()?;
    abandoned.begin_session(&info)?;
    let epoch = a.begin_sending()?;
    abandoned.note_peer_epoch(a.id(), epoch)?;

    let started = Instant::now();
    let err = b
        .sync_with(
            &mut remote(&hub, ALICE)?,
            &options(Direction::Upload, 10),
            &mut NoObserver,
        )
        .unwrap_err();
    assert!(matches!(err, SyncError::ReplicaBusy { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "409 at once, not a wait"
    );

    std::thread::sleep(Duration::from_millis(2500));
    b.sync_with(
        &mut remote(&hub, ALICE)?,
        &options(Direction::Upload, 10),
        &mut NoObserver,
    )?;
    let err = abandoned.end_session(true).unwrap_err();
    assert!(
        matches!(&err, SyncError::Remote { status: Some(404), message, .. } if message.contains("timed out")),
        "{err}"
    );
    let metrics = reqwest::blocking::get(format!("http://{}/metrics", hub.addr()))?.text()?;
    assert!(
        metrics.contains("knit_sessions_total{outcome=\"timed_out\"} 1"),
        "{metrics}"
    );
    hub.shutdown()?;
    let (_, hub_items) = hub_state(dir.path());
    assert_eq!(hub_items, vec![("b1".to_string(), "y".to_string())]);
    Ok(())
}

/// Sends `body` to `path` with Alice's token; the status and the error code.
fn post_raw(hub: &RunningHub, path: &str, body: Vec<u8>) -> Result<(u16, String), reqwest::Error> {
    let response = reqwest::blocking::Client::new()
        .post(format!("http://{}{path}", hub.addr()))
        .bearer_auth(ALICE)
        .body(body)
        .send()?;
    let status = response.status().as_u16();
    let text = response.text()?;
    let code = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or(text);
    Ok((status, code))
}

#[test]
fn malformed_bodies_get_4xx_and_change_nothing() -> TestResult {
    use knit::hub::protocol::{encode, Role, WireApply, WireBegin, WireInfo, WirePolicy};
    use knit::{ChangeSource, SyncProvider};
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    a.put(&id("k"), b"v")?;
    let hub = start_hub(dir.path(), &[a.id()], &[], "max_body_bytes = 4096");
    hub.shutdown()?;
    let before = hub_state(dir.path());
    let hub = start_hub(dir.path(), &[a.id()], &[], "max_body_bytes = 4096");

    let begin = encode(&WireBegin {
        role: Role::Destination,
        peer: WireInfo::from_info(&a.fetch_info()?),
    });
    let mut wrong_version = begin.clone();
    wrong_version[4] = 99;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "truncated",
            begin[..begin.len() / 2].to_vec(),
            400,
            "bad_request",
        ),
        ("header only", begin[..3].to_vec(), 400, "bad_request"),
        (
            "garbage",
            b"GET / HTTP/1.1 and then some garbage".to_vec(),
            400,
            "bad_request",
        ),
        ("wrong version", wrong_version, 400, "bad_request"),
        ("oversized", vec![7u8; 10_000], 413, ""),
    ];
    for (what, body, status, code) in cases {
        let (got, got_code) = post_raw(&hub, "/replicas/notes/sessions", body)?;
        assert_eq!(got, status, "{what}: {got_code}");
        assert!(got_code.contains(code), "{what}: {got_code}");
    }

    // A real session, then a damaged batch inside it.
    let (status, _) = post_raw(&hub, "/replicas/notes/sessions", begin)?;
    assert_eq!(status, 200);
    let batch = {
        a.begin_sending()?;
        a.change_batch(&knit::BatchRequest {
            destination: ReplicaId::new_random(),
            destination_knowledge: &knit::Knowledge::new(),
            start: b"",
            batch_size: 10,
            full_enumeration: false,
        })?
    };
    let mut damaged = knit::encode_batch(&batch);
    let last = damaged.len() - 1;
    damaged[last] ^= 0xff;
    damaged.truncate(damaged.len() - 2);
    let apply = encode(&WireApply {
        policy: WirePolicy::LastWriterWins,
        batch: damaged,
    });
    // The session id is not known to this raw client: any id is refused as 404, and a
    // damaged body is refused before the session is even looked up.
    let (status, code) = post_raw(
        &hub,
        "/replicas/notes/sessions/00000000000000000000000000000000/apply",
        apply,
    )?;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    hub.shutdown()?;
    assert_eq!(hub_state(dir.path()), before);
    Ok(())
}

#[test]
fn an_upload_that_claims_another_replicas_versions_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    let mut c = Replica::create(&dir.path().join("c"))?;
    c.put(&id("from-c"), b"c")?;
    // A learns C's change peer to peer, then uploads with a token bound to A only.
    c.sync_with(&mut a, &options(Direction::Upload, 10), &mut NoObserver)?;
    a.put(&id("from-a"), b"a")?;
    let hub = start_hub(dir.path(), &[a.id()], &[], "");
    let err = a
        .sync_with(
            &mut remote(&hub, ALICE)?,
            &options(Direction::Upload, 10),
            &mut NoObserver,
        )
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("403") && text.contains(&c.id().to_string()),
        "{text}"
    );
    hub.shutdown()?;
    assert_eq!(
        hub_state(dir.path()).1,
        vec![],
        "nothing of the batch landed"
    );
    Ok(())
}

fn knit_bin() -> &'static str {
    env!("CARGO_BIN_EXE_knit")
}

/// Changes applied at the hub so far, from its /metrics.
fn applied_at(base: &str) -> u64 {
    let Ok(response) = reqwest::blocking::get(format!("{base}/metrics")) else {
        return 0;
    };
    let text = response.text().unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("knit_changes_total{direction=\"applied\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the hub at `base` has applied `at_least` changes, then signals `child`
/// (SIGKILL, or `signal` through kill(1)) and returns its exit status.
fn signal_when_applied(
    child: &mut Child,
    base: &str,
    at_least: u64,
    signal: Option<&str>,
) -> Result<std::process::ExitStatus, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while applied_at(base) < at_least {
        if Instant::now() > deadline {
            return Err("the upload never got going".into());
        }
        if child.try_wait()?.is_some() {
            return Err("the process ended before it could be stopped mid-sync".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    match signal {
        None => child.kill()?,
        Some(signal) => {
            let sent = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()?;
            assert!(sent.success(), "kill {signal}");
        }
    }
    Ok(child.wait()?)
}

fn kill_when_applied(child: &mut Child, base: &str, at_least: u64) -> TestResult {
    signal_when_applied(child, base, at_least, None)?;
    Ok(())
}

const TOTAL: usize = 2000;

fn replica_with_items(path: &Path) -> Result<ReplicaId, Box<dyn std::error::Error>> {
    let mut a = Replica::create(path)?;
    for i in 0..TOTAL {
        a.put(&id(&format!("item{i:05}")), format!("value {i}").as_bytes())?;
    }
    a.flush()?;
    Ok(a.id())
}

/// A hub config (written to `dir/hub.toml`) for replica A at `dir/a`, which holds
/// `TOTAL` items.
fn upload_setup(dir: &Path, extra: &str) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error>> {
    let a_path = dir.join("a");
    let a_id = replica_with_items(&a_path)?;
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        config_text(&dir.join("hub-data"), &[a_id], &[], extra),
    )?;
    Ok((a_path, config))
}

/// Resumes A's upload through a new hub process after `committed` items had landed:
/// exactly the rest is sent, and the hub ends with every item.
fn resume_upload(dir: &Path, config: &Path, a_path: &Path, committed: usize) -> TestResult {
    let (mut hub, base) = spawn_hub(config)?;
    let mut a = Replica::open(a_path)?;
    let report = a.sync_with(
        &mut RemoteReplica::connect(&format!("{base}/replicas/notes"), ALICE, TIMEOUT)?,
        &options(Direction::Upload, 50),
        &mut NoObserver,
    )?;
    let sent = report.upload.map_or(0, |s| s.changes_sent);
    assert_eq!(
        sent as usize,
        TOTAL - committed,
        "exactly what the hub lacked was sent"
    );
    hub.kill()?;
    hub.wait()?;
    assert_eq!(hub_state(dir).1, items_of(&a), "nothing lost");
    Ok(())
}

/// A's upload on a thread of its own, in batches of 5, which must end with the hub
/// gone (a transport error), not succeed.
fn upload_until_the_hub_goes(
    a_path: &Path,
    url: String,
) -> std::thread::JoinHandle<Result<(), String>> {
    let a_path = a_path.to_path_buf();
    std::thread::spawn(move || {
        let mut a = Replica::open(&a_path).map_err(|e| e.to_string())?;
        let mut hub = RemoteReplica::connect(&url, ALICE, TIMEOUT).map_err(|e| e.to_string())?;
        let result = a.sync_with(&mut hub, &options(Direction::Upload, 5), &mut NoObserver);
        a.flush().map_err(|e| e.to_string())?;
        match result {
            Err(SyncError::Remote { .. }) => Ok(()),
            other => Err(format!(
                "expected the upload to stop with the hub: {other:?}"
            )),
        }
    })
}

#[test]
fn a_client_killed_mid_upload_resumes_without_loss_or_resending_what_was_committed() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a_path, config) = upload_setup(dir.path(), "session_timeout_secs = 1")?;
    let (mut hub, base) = spawn_hub(&config)?;
    let mut client = Command::new(knit_bin())
        .args(["sync", "--direction", "upload", "--batch-size", "5"])
        .arg(&a_path)
        .arg(format!("{base}/replicas/notes"))
        .env("KNIT_TOKEN", ALICE)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    kill_when_applied(&mut client, &base, 100)?;
    // The hub rolls the abandoned session back after its timeout; stop it then.
    std::thread::sleep(Duration::from_millis(1500));
    hub.kill()?;
    hub.wait()?;
    let committed = hub_state(dir.path()).1.len();
    assert!(
        (100..TOTAL).contains(&committed),
        "killed mid-sync: {committed}"
    );
    resume_upload(dir.path(), &config, &a_path, committed)
}

#[test]
fn a_hub_killed_mid_upload_keeps_what_it_committed_and_the_client_resumes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a_path, config) = upload_setup(dir.path(), "")?;
    let (mut hub, base) = spawn_hub(&config)?;
    let url = format!("{base}/replicas/notes");
    let uploader = upload_until_the_hub_goes(&a_path, url);
    kill_when_applied(&mut hub, &base, 100)?;
    uploader.join().map_err(|_| "uploader panicked")??;
    let committed = hub_state(dir.path()).1.len();
    assert!(committed < TOTAL, "killed mid-sync: {committed}");
    resume_upload(dir.path(), &config, &a_path, committed)
}

#[test]
fn sigterm_mid_upload_stops_the_hub_cleanly_and_the_client_resumes() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (a_path, config) = upload_setup(dir.path(), "")?;
    let (mut hub, base) = spawn_hub(&config)?;
    let url = format!("{base}/replicas/notes");
    let uploader = upload_until_the_hub_goes(&a_path, url);
    let status = signal_when_applied(&mut hub, &base, 100, Some("-TERM"))?;
    assert!(status.success(), "a graceful stop exits 0: {status}");
    uploader.join().map_err(|_| "uploader panicked")??;
    // Shut down, not killed: every batch the hub acknowledged is in its folder, and the
    // open session was rolled back, so the replica opens at once.
    let committed = hub_state(dir.path()).1.len();
    assert!(
        (100..TOTAL).contains(&committed),
        "stopped mid-sync: {committed}"
    );
    resume_upload(dir.path(), &config, &a_path, committed)
}

#[test]
fn shutdown_rolls_back_an_open_session_and_the_hub_reopens_consistent() -> TestResult {
    use knit::{ChangeSource, SyncProvider};
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    a.put(&id("k"), b"v")?;
    let hub = start_hub(dir.path(), &[a.id()], &[], "");
    let mut open = remote(&hub, ALICE)?;
    open.begin_session(&a.fetch_info()?)?;
    let epoch = a.begin_sending()?;
    open.note_peer_epoch(a.id(), epoch)?;
    hub.shutdown()?;
    let page_after_restart = {
        let hub = start_hub(dir.path(), &[a.id()], &[], "");
        a.sync_with(
            &mut remote(&hub, ALICE)?,
            &options(Direction::Upload, 10),
            &mut NoObserver,
        )?;
        let page = reqwest::blocking::get(format!("http://{}/", hub.addr()))?.text()?;
        hub.shutdown()?;
        page
    };
    assert!(
        page_after_restart.contains("completed"),
        "{page_after_restart}"
    );
    assert_eq!(
        hub_state(dir.path()).1,
        vec![("k".to_string(), "v".to_string())]
    );
    Ok(())
}

#[test]
fn metrics_count_sessions_changes_and_conflicts_in_prometheus_text() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    let mut b = Replica::create(&dir.path().join("b"))?;
    let hub = start_hub(dir.path(), &[a.id(), b.id()], &[], "");
    a.put(&id("k"), b"a")?;
    let both = options(Direction::UploadAndDownload, 10);
    a.sync_with(&mut remote(&hub, ALICE)?, &both, &mut NoObserver)?;
    b.put(&id("k"), b"b")?;
    b.sync_with(&mut remote(&hub, ALICE)?, &both, &mut NoObserver)?;
    let text = reqwest::blocking::get(format!("http://{}/metrics", hub.addr()))?.text()?;
    // Two upload-and-download syncs: four sessions at the hub (A's download carries
    // nothing but still takes place), B's upload conflicting on k.
    for line in [
        "knit_sessions_total{outcome=\"begun\"} 4",
        "knit_sessions_total{outcome=\"completed\"} 4",
        "knit_changes_total{direction=\"applied\"} 2",
        "knit_conflicts_total 1",
        "# TYPE knit_request_seconds histogram",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(!text.contains(ALICE));
    hub.shutdown()?;
    Ok(())
}

/// Debian's Chromium, or `None` (then the page test is skipped, except under CI, where
/// `.ci/run` installs it and a skip would hide a broken setup).
fn chromium() -> Option<&'static str> {
    let found = ["chromium", "chromium-browser"].into_iter().find(|name| {
        Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install Chromium for the status page test (.ci/run does)"
        );
        eprintln!("skipped: no chromium on PATH (apt-get install chromium)");
    }
    found
}

#[test]
fn the_status_page_renders_in_headless_chromium_with_replicas_sessions_and_conflicts() -> TestResult
{
    let Some(browser) = chromium() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    let mut b = Replica::create(&dir.path().join("b"))?;
    // A token name with markup: the page must show it as text.
    let text = config_text(&dir.path().join("hub-data"), &[a.id(), b.id()], &[], "")
        .replace("[tokens.alice]", "[tokens.\"<b>alice</b>\"]")
        .replace("[replicas.notes]", "[replicas.notes]\nconflicts = \"save\"");
    let path = dir.path().join("hub.toml");
    std::fs::write(&path, text)?;
    let hub = RunningHub::start(HubConfig::load(&path)?)?;
    a.put(&id("k"), b"from a")?;
    let both = options(Direction::UploadAndDownload, 10);
    a.sync_with(&mut remote(&hub, ALICE)?, &both, &mut NoObserver)?;
    // B edits k concurrently: the hub keeps A's version and saves the conflict.
    b.put(&id("k"), b"from b")?;
    let mut heard = common_recorder::Conflicts::default();
    b.sync_with(
        &mut remote(&hub, ALICE)?,
        &options(Direction::Upload, 10),
        &mut heard,
    )?;
    assert_eq!(heard.0, vec!["k".to_string()]);

    let page = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--dump-dom",
        ])
        .arg(format!("http://{}/", hub.addr()))
        .output()?;
    assert!(
        page.status.success(),
        "{}",
        String::from_utf8_lossy(&page.stderr)
    );
    let dom = String::from_utf8(page.stdout)?;
    assert!(dom.contains("<title>knit hub</title>"), "{dom}");
    assert!(
        dom.contains("<td>notes</td>"),
        "the hosted replica is listed: {dom}"
    );
    assert!(
        dom.contains(&a.id().to_string()),
        "A's session is listed: {dom}"
    );
    assert!(dom.contains("completed"), "{dom}");
    assert!(
        dom.contains("<tr class=\"conflict\"><td>notes</td><td><code>k</code></td>"),
        "the saved conflict is listed: {dom}"
    );
    assert!(dom.contains("&lt;b&gt;alice&lt;/b&gt;"), "escaped: {dom}");
    assert!(
        !dom.contains("<b>alice</b>"),
        "no markup from a name: {dom}"
    );
    assert!(!dom.contains(ALICE), "no token value on the page");
    hub.shutdown()?;
    Ok(())
}

#[test]
fn the_example_hub_config_loads_with_its_tokens_from_the_environment() -> TestResult {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hub/hub.toml");
    let text = std::fs::read_to_string(&path)?;
    let config = HubConfig::parse(&text, &path, |var| {
        Some(format!("{var}-a-long-random-value"))
    })?;
    assert_eq!(config.replicas, vec!["notes".to_string()]);
    assert_eq!(config.tokens.len(), 2);
    let err = HubConfig::parse(&text, &path, |_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hub.toml") && err.contains("is not set"),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_batch_over_the_hubs_limit_gets_413_and_a_stalled_body_408() -> TestResult {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir()?;
    let mut a = Replica::create(&dir.path().join("a"))?;
    for i in 0..5 {
        a.put(&id(&format!("k{i}")), b"v")?;
    }
    let hub = start_hub(
        dir.path(),
        &[a.id()],
        &[],
        "max_batch_changes = 3\nrequest_timeout_secs = 1",
    );
    let err = a
        .sync_with(
            &mut remote(&hub, ALICE)?,
            &options(Direction::Upload, 5),
            &mut NoObserver,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("413") && err.contains("at most 3"), "{err}");
    // Within the limit the same upload goes through.
    a.sync_with(
        &mut remote(&hub, ALICE)?,
        &options(Direction::Upload, 3),
        &mut NoObserver,
    )?;

    // A client that announces a body and stops sending it is cut off.
    let mut stream = std::net::TcpStream::connect(hub.addr())?;
    write!(
        stream,
        "POST /replicas/notes/sessions HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {ALICE}\r\n\
         Content-Length: 100\r\n\r\nknit"
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    hub.shutdown()?;
    assert_eq!(hub_state(dir.path()).1.len(), 5);
    Ok(())
}

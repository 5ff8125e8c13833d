//! The hub server: axum routes over hosted replicas.
//!
//! Each hosted replica sits behind one mutex with its session slot, so a replica takes
//! part in at most one session and every call of that session runs alone on it. The
//! engine's calls are blocking (sled), so they run on tokio's blocking pool.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::config::{HubConfig, Storage, TokenGrant, UploadConflicts};
use super::metrics::Metrics;
use super::protocol::{
    decode, encode, kind_code, outcome_code, Message, Role, WireApply, WireBatch, WireBatchRequest,
    WireBegin, WireDone, WireEnd, WireEpoch, WireEstimate, WireEvent, WireInfo, WireKnowledge,
    WireOutcome, WirePolicy, WireSession,
};
use super::status;
use super::HubError;
use crate::metadata::postgres::Leases;
use crate::model::{ClockVector, ItemId, ReplicaId};
use crate::stores::Replica;
use crate::sync::{
    BatchRequest, ChangeDestination, ChangeSource, Conflict, ConflictKind, ConflictOutcome,
    ConflictPolicy, PeerInfo, Resolution, SyncError, SyncObserver, SyncProvider,
};

/// How many finished sessions the status page lists.
const RECENT_SESSIONS: usize = 50;

pub(super) struct HubState {
    pub config: HubConfig,
    /// Cross-process leases, when the replicas live in a shared PostgreSQL database.
    pub leases: Option<Leases>,
    /// This process, as lease rows name it.
    pub holder: String,
    pub replicas: BTreeMap<String, Arc<Hosted>>,
    pub metrics: Metrics,
    pub recent: Mutex<VecDeque<SessionRecord>>,
}

pub(super) struct Hosted {
    pub name: String,
    pub state: Mutex<HostedState>,
    /// Whether a session is open, and when it last heard from its client: read without
    /// the replica's lock, so a second client gets its 409 at once even while the
    /// session's current call holds the replica.
    session_open: AtomicBool,
    last_seen_ms: AtomicU64,
    /// The replica's info as of its last call (single-process storage only): `GET`
    /// answers from it without waiting for the lock. Knowledge only grows and the
    /// epoch is refreshed inside the call that raises it, so a client may see it a
    /// call behind, never ahead: it then sends a change the hub already has, which
    /// the applier skips as obsolete.
    info: Mutex<Option<PeerInfo>>,
}

pub(super) struct HostedState {
    pub replica: Replica,
    pub slot: Option<Slot>,
}

pub(super) struct Slot {
    id: [u8; 16],
    token: String,
    role: Role,
    peer: PeerInfo,
    allowed: BTreeSet<ReplicaId>,
    started_ms: u64,
    changes: u64,
    conflicts: u64,
}

impl Slot {
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn peer(&self) -> ReplicaId {
        self.peer.replica
    }
}

/// A finished session, for the status page.
#[derive(Clone, Debug)]
pub(super) struct SessionRecord {
    pub replica: String,
    pub token: String,
    pub peer: ReplicaId,
    pub role: Role,
    pub started_ms: u64,
    pub ended_ms: u64,
    pub changes: u64,
    pub conflicts: u64,
    pub outcome: &'static str,
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Hosted {
    /// The lock, even after a panic in another request: the replica's own state is
    /// only ever changed through committed batches, so it is never half-updated.
    pub fn lock(&self) -> MutexGuard<'_, HostedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached_info(&self) -> Option<PeerInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn refresh_info(&self, replica: &mut Replica) {
        let info = replica.fetch_info().ok();
        *self.info.lock().unwrap_or_else(|p| p.into_inner()) = info;
    }

    fn mark_session(&self, open: bool) {
        self.last_seen_ms.store(now_ms(), Ordering::SeqCst);
        self.session_open.store(open, Ordering::SeqCst);
    }

    /// The session has not heard from its client for longer than `timeout`.
    fn idle(&self, timeout: Duration) -> bool {
        now_ms().saturating_sub(self.last_seen_ms.load(Ordering::SeqCst))
            > timeout.as_millis() as u64
    }

    /// A session is open and has heard from its client within `timeout`.
    fn busy(&self, timeout: Duration) -> bool {
        self.session_open.load(Ordering::SeqCst) && !self.idle(timeout)
    }
}

impl HubState {
    pub fn open(config: HubConfig) -> Result<Self, HubError> {
        let leases = match &config.storage {
            Storage::Sled => {
                std::fs::create_dir_all(&config.data).map_err(|source| HubError::DataFolder {
                    path: config.data.clone(),
                    source,
                })?;
                None
            }
            Storage::Postgres { conninfo } => {
                Some(Leases::connect(conninfo).map_err(|e| HubError::Storage {
                    message: e.to_string(),
                })?)
            }
        };
        let mut replicas = BTreeMap::new();
        for name in &config.replicas {
            let replica = match &config.storage {
                Storage::Sled => {
                    let path = config.data.join(name);
                    if crate::metadata::sled_folder::files_present(&path) {
                        Replica::open(&path)
                    } else {
                        Replica::create(&path)
                    }
                }
                Storage::Postgres { conninfo } => Replica::open_or_create_postgres(
                    conninfo,
                    name,
                    format!("PostgreSQL replica {name}"),
                ),
            }
            .map_err(|source| HubError::Replica {
                name: name.clone(),
                source,
            })?;
            let mut replica = replica;
            let info = match config.storage {
                Storage::Sled => replica.fetch_info().ok(),
                Storage::Postgres { .. } => None,
            };
            replicas.insert(
                name.clone(),
                Arc::new(Hosted {
                    name: name.clone(),
                    state: Mutex::new(HostedState {
                        replica,
                        slot: None,
                    }),
                    session_open: AtomicBool::new(false),
                    last_seen_ms: AtomicU64::new(0),
                    info: Mutex::new(info),
                }),
            );
        }
        Ok(Self {
            config,
            leases,
            holder: format!("{} (pid {})", uuid::Uuid::new_v4(), std::process::id()),
            replicas,
            metrics: Metrics::default(),
            recent: Mutex::new(VecDeque::new()),
        })
    }

    fn record(&self, record: SessionRecord) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT_SESSIONS {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// Ends `slot` (rolled back unless `completed`) and records it.
    fn finish(
        &self,
        hosted: &Hosted,
        state: &mut HostedState,
        completed: bool,
        outcome: &'static str,
    ) {
        let Some(slot) = state.slot.take() else {
            return;
        };
        hosted.mark_session(false);
        let ended = state.replica.end_session(completed);
        if let Err(e) = &ended {
            eprintln!("knit serve: replica {}: ending a session: {e}", hosted.name);
        }
        if let Some(leases) = &self.leases {
            state.replica.metadata().set_fence(None);
            if let Err(e) = leases.release(&hosted.name, &slot.id) {
                // The lease runs out on its own after the session timeout.
                eprintln!(
                    "knit serve: replica {}: releasing its lease: {e}",
                    hosted.name
                );
            }
        }
        let outcome = if ended.is_err() { "error" } else { outcome };
        self.metrics.session_ended(outcome);
        self.record(SessionRecord {
            replica: hosted.name.clone(),
            token: slot.token,
            peer: slot.peer.replica,
            role: slot.role,
            started_ms: slot.started_ms,
            ended_ms: now_ms(),
            changes: slot.changes,
            conflicts: slot.conflicts,
            outcome,
        });
    }

    /// Ends every session idle for longer than the timeout, leaving its replica
    /// consistent (only committed batches stay) and free for the next client.
    pub fn expire_idle(&self) {
        for hosted in self.replicas.values() {
            let mut state = hosted.lock();
            if state.slot.is_some() && hosted.idle(self.config.session_timeout) {
                eprintln!(
                    "knit serve: replica {}: session timed out after {} s idle; rolled back",
                    hosted.name,
                    self.config.session_timeout.as_secs()
                );
                self.finish(hosted, &mut state, false, "timed out");
            }
        }
    }

    /// Ends every open session (graceful shutdown) and flushes every replica.
    pub fn close_all(&self) {
        for hosted in self.replicas.values() {
            let mut state = hosted.lock();
            if state.slot.is_some() {
                self.finish(hosted, &mut state, false, "shut down");
            }
            if let Err(e) = state.replica.flush() {
                eprintln!(
                    "knit serve: replica {}: flush at shutdown: {e}",
                    hosted.name
                );
            }
        }
    }
}

/// An error answer: status, a stable code, and a message naming what is at fault.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    extra: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            extra: Vec::new(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    fn from_sync(replica: &str, e: SyncError) -> Self {
        match e {
            SyncError::ReplicaBusy { .. } => Self::new(
                StatusCode::CONFLICT,
                "busy",
                format!("replica {replica} is in another session"),
            ),
            SyncError::ReplicaRestored {
                replica: restored,
                peer,
                evidence,
            } => {
                let mut err = Self::new(
                    StatusCode::CONFLICT,
                    "restored",
                    format!("replica {restored} was restored from an old copy: {evidence}"),
                );
                err.extra = vec![
                    ("replica", restored.to_string()),
                    ("peer", peer.to_string()),
                    ("evidence", evidence),
                ];
                err
            }
            SyncError::SameReplica { .. } => Self::bad(format!(
                "the client's replica has the id of hosted replica {replica}"
            )),
            SyncError::BadBatch { reason, .. } => Self::bad(reason),
            SyncError::Model(e) => Self::bad(e.to_string()),
            other => Self::internal(format!("replica {replica}: {other}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::Map::new();
        body.insert("error".into(), self.code.into());
        body.insert("message".into(), self.message.into());
        for (k, v) in self.extra {
            body.insert(k.into(), v.into());
        }
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::Value::Object(body).to_string(),
        )
            .into_response()
    }
}

fn binary(bytes: Vec<u8>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/vnd.knit")],
        Bytes::from(bytes),
    )
        .into_response()
}

fn read<M: Message>(body: &[u8]) -> Result<M, ApiError> {
    decode::<M>(body).map_err(|e| ApiError::bad(e.to_string()))
}

/// The grant of the request's bearer token. Compared in constant time, so response
/// times do not reveal how much of a guess was right.
fn authorize<'a>(state: &'a HubState, headers: &HeaderMap) -> Result<&'a TokenGrant, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("no bearer token: send `Authorization: Bearer TOKEN`"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("the Authorization header is not `Bearer TOKEN`"))?;
    state
        .config
        .tokens
        .iter()
        .find(|g| constant_time_eq(g.secret.as_bytes(), token.as_bytes()))
        .ok_or_else(|| unauthorized("unknown token"))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn busy(replica: &str, timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "busy",
        format!(
            "replica {replica} is in another session; retry after it ends or times out \
             ({} s idle)",
            timeout.as_secs()
        ),
    )
}

fn hosted(state: &HubState, name: &str) -> Result<Arc<Hosted>, ApiError> {
    state.replicas.get(name).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("this hub hosts no replica {name:?}"),
        )
    })
}

fn require(grant: &TokenGrant, replica: &str, role: Role) -> Result<(), ApiError> {
    let (allowed, right) = match role {
        Role::Source => (grant.read.contains(replica), "read"),
        Role::Destination => (grant.write.contains(replica), "write"),
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {} has no {right} right on replica {replica}",
                grant.name
            ),
        ))
    }
}

/// Runs `f` on the blocking pool with the replica locked.
async fn on_replica<T: Send + 'static>(
    hosted: Arc<Hosted>,
    f: impl FnOnce(&Hosted, &mut HostedState) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut state = hosted.lock();
        let result = f(&hosted, &mut state);
        if hosted
            .info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            hosted.refresh_info(&mut state.replica);
        }
        result
    })
    .await
    .map_err(|e| ApiError::internal(format!("a request task failed: {e}")))?
}

/// The open session `sid` of `hosted`, owned by `grant`, in `role`. With shared
/// storage, the session's lease is renewed first; a lease another process took over
/// ends the session here.
fn session<'a>(
    hub: &HubState,
    hosted: &Hosted,
    state: &'a mut HostedState,
    sid: &str,
    grant: &str,
    role: Option<Role>,
) -> Result<(&'a mut Replica, &'a mut Slot), ApiError> {
    let gone = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_session",
            format!(
                "replica {} has no session {sid} (it ended or timed out); begin a new one",
                hosted.name
            ),
        )
    };
    let owned = state
        .slot
        .as_ref()
        .is_some_and(|slot| hex(&slot.id) == sid && slot.token == grant);
    if !owned {
        return Err(gone());
    }
    if let (Some(leases), Some(slot)) = (&hub.leases, &state.slot) {
        let ttl = hub.config.session_timeout.as_secs();
        let kept = leases
            .renew(&hosted.name, &slot.id, ttl)
            .map_err(|e| ApiError::internal(format!("replica {}: lease: {e}", hosted.name)))?;
        if !kept {
            hub.finish(hosted, state, false, "lease lost");
            return Err(gone());
        }
    }
    hosted.mark_session(true);
    let HostedState { replica, slot } = state;
    let slot = slot.as_mut().ok_or_else(gone)?;
    if let Some(role) = role {
        if slot.role != role {
            return Err(ApiError::bad(format!(
                "session {sid} has the hub replica as {}; this call needs it as {}",
                slot.role.as_str(),
                role.as_str()
            )));
        }
    }
    Ok((replica, slot))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Shared = State<Arc<HubState>>;

async fn info(
    State(hub): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let grant = authorize(&hub, &headers)?;
    let hosted = hosted(&hub, &name)?;
    if require(grant, &name, Role::Source).is_err() {
        require(grant, &name, Role::Destination)?;
    }
    if let Some(info) = hosted.cached_info() {
        return Ok(binary(encode(&WireInfo::from_info(&info))));
    }
    let shared = hub.leases.is_some();
    let info = on_replica(hosted, move |hosted, state| {
        // Another hub process may have committed since this one last looked.
        if shared && state.slot.is_none() {
            state
                .replica
                .reload()
                .map_err(|e| ApiError::internal(format!("replica {}: {e}", hosted.name)))?;
        }
        state
            .replica
            .fetch_info()
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await?;
    Ok(binary(encode(&WireInfo::from_info(&info))))
}

async fn begin(
    State(hub): Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let grant = authorize(&hub, &headers)?.clone();
    let hosted = hosted(&hub, &name)?;
    let request: WireBegin = read(&body)?;
    require(&grant, &name, request.role)?;
    let peer = request
        .peer
        .into_info()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    if !grant.replica_ids.contains(&peer.replica) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {} may not sync as replica {} (add it to the token's replica_ids)",
                grant.name, peer.replica
            ),
        ));
    }
    if hosted.busy(hub.config.session_timeout) {
        return Err(busy(&hosted.name, hub.config.session_timeout));
    }
    let hub2 = Arc::clone(&hub);
    let session = on_replica(hosted, move |hosted, state| {
        if state.slot.is_some() && hosted.idle(hub2.config.session_timeout) {
            hub2.finish(hosted, state, false, "timed out");
        }
        if state.slot.is_some() {
            return Err(busy(&hosted.name, hub2.config.session_timeout));
        }
        let id = *uuid::Uuid::new_v4().as_bytes();
        if let Some(leases) = &hub2.leases {
            let ttl = hub2.config.session_timeout.as_secs();
            let taken = leases
                .acquire(&hosted.name, &id, &hub2.holder, ttl)
                .map_err(|e| ApiError::internal(format!("replica {}: lease: {e}", hosted.name)))?;
            if !taken {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "busy",
                    format!(
                        "replica {} is in a session at another hub process; retry after it ends",
                        hosted.name
                    ),
                ));
            }
            // Another process may have committed since this one last looked.
            let fresh = state.replica.reload();
            state.replica.metadata().set_fence(Some(id.to_vec()));
            if let Err(e) = fresh {
                state.replica.metadata().set_fence(None);
                let _ = leases.release(&hosted.name, &id);
                return Err(ApiError::internal(format!("replica {}: {e}", hosted.name)));
            }
        }
        if let Err(e) = state.replica.begin_session(&peer) {
            if let Some(leases) = &hub2.leases {
                state.replica.metadata().set_fence(None);
                let _ = leases.release(&hosted.name, &id);
            }
            return Err(ApiError::from_sync(&hosted.name, e));
        }
        state.slot = Some(Slot {
            id,
            token: grant.name.clone(),
            role: request.role,
            peer,
            allowed: grant.replica_ids.clone(),
            started_ms: now_ms(),
            changes: 0,
            conflicts: 0,
        });
        hosted.mark_session(true);
        hub2.metrics.session_started();
        Ok(id)
    })
    .await?;
    Ok(binary(encode(&WireSession { session })))
}

/// What a session call runs on the hub's replica: the hub, the hosted replica, its
/// replica and the session's slot.
type SessionOp<A> =
    Box<dyn FnOnce(&HubState, &Hosted, &mut Replica, &mut Slot) -> Result<A, ApiError> + Send>;

/// Runs `op` in the open session `sid` of replica `name`: authorizes the token, checks
/// that the session is the token's and has the hub in `role` (renewing its lease), and
/// encodes the answer.
async fn in_session<A: Message + Send + 'static>(
    hub: Arc<HubState>,
    name: &str,
    sid: String,
    headers: &HeaderMap,
    role: Role,
    op: SessionOp<A>,
) -> Result<Response, ApiError> {
    let grant = authorize(&hub, headers)?.name.clone();
    let hosted = hosted(&hub, name)?;
    let answer = on_replica(hosted, move |hosted, state| {
        let (replica, slot) = session(&hub, hosted, state, &sid, &grant, Some(role))?;
        op(&hub, hosted, replica, slot)
    })
    .await?;
    Ok(binary(encode(&answer)))
}

async fn note_epoch(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // 401 before anything is read from the body.
    authorize(&hub, &headers)?;
    let request: WireEpoch = read(&body)?;
    let op: SessionOp<WireDone> = Box::new(move |_, hosted, replica, slot| {
        let peer = ReplicaId::from_bytes(request.peer);
        if peer != slot.peer.replica {
            return Err(ApiError::bad(format!(
                "the epoch names replica {peer}, but the session's peer is {}",
                slot.peer.replica
            )));
        }
        replica
            .note_peer_epoch(peer, request.epoch)
            .map_err(|e| ApiError::from_sync(&hosted.name, e))?;
        Ok(WireDone)
    });
    in_session(hub, &name, sid, &headers, Role::Destination, op).await
}

async fn sending(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let op: SessionOp<WireEpoch> = Box::new(|_, hosted, replica, _| {
        let epoch = replica
            .begin_sending()
            .map_err(|e| ApiError::from_sync(&hosted.name, e))?;
        Ok(WireEpoch {
            peer: *replica.replica_id().as_bytes(),
            epoch,
        })
    });
    in_session(hub, &name, sid, &headers, Role::Source, op).await
}

async fn forgotten(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let op: SessionOp<WireKnowledge> = Box::new(|_, hosted, replica, _| {
        let k = replica
            .forgotten_knowledge()
            .map_err(|e| ApiError::from_sync(&hosted.name, e))?;
        Ok(WireKnowledge::from_knowledge(&k))
    });
    in_session(hub, &name, sid, &headers, Role::Source, op).await
}

async fn estimate(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // 401 before anything is read from the body.
    authorize(&hub, &headers)?;
    let request: WireBatchRequest = read(&body)?;
    let op: SessionOp<WireEstimate> = Box::new(move |hub, hosted, replica, slot| {
        let max = hub.config.max_batch_changes;
        let changes = replica
            .estimate_changes(&batch_request(slot, &request, max))
            .map_err(|e| ApiError::from_sync(&hosted.name, e))?;
        Ok(WireEstimate { changes })
    });
    in_session(hub, &name, sid, &headers, Role::Source, op).await
}

fn batch_request<'a>(
    slot: &'a Slot,
    request: &'a WireBatchRequest,
    max: usize,
) -> BatchRequest<'a> {
    BatchRequest {
        destination: slot.peer.replica,
        destination_knowledge: &slot.peer.knowledge,
        start: &request.start,
        batch_size: (request.batch_size as usize).clamp(1, max),
        full_enumeration: request.full_enumeration,
    }
}

async fn batch(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    // 401 before anything is read from the body.
    authorize(&hub, &headers)?;
    let request: WireBatchRequest = read(&body)?;
    let op: SessionOp<WireBatch> = Box::new(move |hub, hosted, replica, slot| {
        let max = hub.config.max_batch_changes;
        let batch = replica
            .change_batch(&batch_request(slot, &request, max))
            .map_err(|e| ApiError::from_sync(&hosted.name, e))?;
        let n = batch.change_count() as u64;
        slot.changes += n;
        hub.metrics.changes_sent(n);
        Ok(WireBatch::from_batch(&batch))
    });
    in_session(hub, &name, sid, &headers, Role::Source, op).await
}

/// Collects the applier's notifications for the client.
#[derive(Default)]
struct Events(Vec<WireEvent>);

impl SyncObserver for Events {
    fn conflict(&mut self, item: &ItemId, kind: ConflictKind, outcome: ConflictOutcome) {
        self.0.push(WireEvent::Conflict {
            item: item.as_bytes().to_vec(),
            kind: kind_code(kind),
            outcome: outcome_code(outcome),
        });
    }

    fn item_failed(&mut self, item: &ItemId, reason: &str) {
        self.0.push(WireEvent::Failed {
            item: item.as_bytes().to_vec(),
            reason: reason.to_string(),
        });
    }
}

async fn apply(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let grant = authorize(&hub, &headers)?.name.clone();
    let request: WireApply = read(&body)?;
    let batch = WireBatch {
        batch: request.batch,
    }
    .into_batch()
    .map_err(|e| ApiError::bad(e.to_string()))?;
    if batch.change_count() > hub.config.max_batch_changes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "the batch holds {} changes; this hub takes at most {} per batch",
                batch.change_count(),
                hub.config.max_batch_changes
            ),
        ));
    }
    let fixed = hub
        .config
        .upload_conflicts
        .get(&name)
        .copied()
        .unwrap_or(UploadConflicts::Client);
    let policy = match (fixed, request.policy) {
        (UploadConflicts::Client, WirePolicy::SourceWins) | (UploadConflicts::SourceWins, _) => {
            ConflictPolicy::SourceWins
        }
        (UploadConflicts::Client, WirePolicy::DestinationWins)
        | (UploadConflicts::DestinationWins, _) => ConflictPolicy::DestinationWins,
        (UploadConflicts::Client, WirePolicy::LastWriterWins)
        | (UploadConflicts::LastWriterWins, _) => ConflictPolicy::LastWriterWins,
        (UploadConflicts::Save, _) => {
            ConflictPolicy::ApplicationDefined(Arc::new(|_: &Conflict<'_>| {
                Resolution::SaveConflict
            }))
        }
    };
    let op: SessionOp<WireOutcome> = Box::new(move |hub, hosted, replica, slot| {
        if batch.source() != slot.peer.replica {
            return Err(ApiError::bad(format!(
                "the batch comes from replica {}, but the session's peer is {}",
                batch.source(),
                slot.peer.replica
            )));
        }
        // A client may teach the hub only about the replicas it may sync as: knowledge
        // of anyone else's versions that the hub lacks would make that replica's real
        // changes look already known, and the hub would never take them.
        let learned = batch.learned_knowledge();
        let foreign = learned.map_vectors(|v| {
            ClockVector::from_pairs(v.iter().filter(|(r, _)| !slot.allowed.contains(r)))
        });
        if !replica.knowledge().contains_knowledge(&foreign) {
            let culprit = foreign
                .replicas()
                .into_iter()
                .find(|r| foreign.max_tick(*r) > replica.knowledge().max_tick(*r))
                .map_or_else(|| "another replica".to_string(), |r| format!("replica {r}"));
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token {grant} may not teach the hub versions of {culprit}, which it \
                     does not sync as and the hub does not know"
                ),
            ));
        }
        let mut events = Events::default();
        let outcome = replica
            .process_batch(batch, &policy, &mut events)
            .map_err(|e| ApiError::from_sync(&hosted.name, e))?;
        slot.changes += outcome.applied;
        slot.conflicts += outcome.conflicts.total();
        hub.metrics.applied(&outcome);
        Ok(WireOutcome::from_outcome(&outcome, events.0))
    });
    in_session(hub, &name, sid, &headers, Role::Destination, op).await
}

async fn end(
    State(hub): Shared,
    Path((name, sid)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let grant = authorize(&hub, &headers)?.name.clone();
    let hosted = hosted(&hub, &name)?;
    let request: WireEnd = read(&body)?;
    let hub2 = Arc::clone(&hub);
    on_replica(hosted, move |hosted, state| {
        session(&hub2, hosted, state, &sid, &grant, None)?;
        let outcome = if request.completed {
            "completed"
        } else {
            "rolled back"
        };
        hub2.finish(hosted, state, request.completed, outcome);
        Ok(())
    })
    .await?;
    Ok(binary(encode(&WireDone)))
}

async fn metrics_page(State(hub): Shared) -> Response {
    let mut sessions_open = 0;
    for hosted in hub.replicas.values() {
        if hosted.lock().slot.is_some() {
            sessions_open += 1;
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(sessions_open),
    )
        .into_response()
}

async fn status_page(State(hub): Shared) -> Response {
    let hub2 = Arc::clone(&hub);
    match tokio::task::spawn_blocking(move || status::render(&hub2)).await {
        Ok(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response(),
        Err(e) => ApiError::internal(format!("rendering the status page: {e}")).into_response(),
    }
}

/// Counts every answer and its latency, and bounds each request's time (body upload
/// included): a client that stalls mid-body gets 408 instead of holding a task.
async fn observe(State(hub): Shared, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let timeout = hub.config.request_timeout;
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {} s", timeout.as_secs()),
        )
        .into_response(),
    };
    hub.metrics
        .request(response.status().as_u16(), started.elapsed());
    response
}

pub(super) fn router(hub: Arc<HubState>) -> Router {
    let sessions = "/replicas/{name}/sessions/{sid}";
    Router::new()
        .route("/replicas/{name}", get(info))
        .route("/replicas/{name}/sessions", post(begin))
        .route(&format!("{sessions}/epoch"), post(note_epoch))
        .route(&format!("{sessions}/sending"), post(sending))
        .route(&format!("{sessions}/forgotten"), post(forgotten))
        .route(&format!("{sessions}/estimate"), post(estimate))
        .route(&format!("{sessions}/batch"), post(batch))
        .route(&format!("{sessions}/apply"), post(apply))
        .route(&format!("{sessions}/end"), post(end))
        .route("/metrics", get(metrics_page))
        .route("/", get(status_page))
        .layer(DefaultBodyLimit::max(hub.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(Arc::clone(&hub), observe))
        .with_state(hub)
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish, rolls back
/// every open session and flushes every replica.
pub(super) async fn serve(
    hub: Arc<HubState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let reaper_hub = Arc::clone(&hub);
    let period = (hub.config.session_timeout / 4).max(Duration::from_millis(100));
    let reaper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let h = Arc::clone(&reaper_hub);
            let _ = tokio::task::spawn_blocking(move || h.expire_idle()).await;
        }
    });
    let addr: SocketAddr = listener.local_addr().map_err(HubError::Serve)?;
    let served = axum::serve(listener, router(Arc::clone(&hub)))
        .with_graceful_shutdown(shutdown)
        .await;
    reaper.abort();
    let closing = Arc::clone(&hub);
    let _ = tokio::task::spawn_blocking(move || closing.close_all()).await;
    served.map_err(HubError::Serve)?;
    eprintln!("knit serve: {addr} stopped; every replica flushed");
    Ok(())
}

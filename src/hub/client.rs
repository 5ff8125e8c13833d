//! The client side: a hosted replica seen through HTTP as an ordinary provider.
//!
//! [`RemoteReplica`] implements the same provider traits as a local replica, so the
//! orchestrator runs a session with a hub exactly as it runs one between two folders.
//! Every call is one blocking request. A session the client leaves without ending
//! (a crash, a dropped connection) is rolled back by the hub after its idle timeout;
//! every batch the hub committed before that stays committed and is in its knowledge,
//! so the next session resumes after it.

use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::StatusCode;

use super::protocol::{
    decode, encode, item_of, kind_of, outcome_of, Message, Role, WireApply, WireBatch,
    WireBatchRequest, WireBegin, WireDone, WireEnd, WireEpoch, WireEstimate, WireEvent, WireInfo,
    WireKnowledge, WireOutcome, WirePolicy, WireSession, MAX_BODY_BYTES,
};
use super::HubError;
use crate::model::{ChangeBatch, Knowledge, ReplicaId};
use crate::sync::{
    BatchOutcome, BatchRequest, ChangeDestination, ChangeSource, ConflictPolicy, PeerInfo,
    SessionRole, SyncError, SyncObserver, SyncProvider,
};

/// A replica hosted by a hub, at `http://HOST:PORT/replicas/NAME`.
pub struct RemoteReplica {
    client: Client,
    /// `http://HOST:PORT/replicas/NAME`, without a trailing slash.
    base: String,
    token: String,
    id: ReplicaId,
    session: Option<(String, Role)>,
    /// The peer of a session begun locally but not yet opened at the hub.
    pending_peer: Option<PeerInfo>,
}

impl std::fmt::Debug for RemoteReplica {
    // By hand, so that the token never reaches a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteReplica")
            .field("url", &self.base)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// True when `text` names a hosted replica rather than a folder.
pub fn is_hub_url(text: &str) -> bool {
    text.starts_with("http://") || text.starts_with("https://")
}

impl RemoteReplica {
    /// Connects to the hosted replica at `url` and reads its id. `timeout` bounds each
    /// request.
    pub fn connect(url: &str, token: &str, timeout: Duration) -> Result<Self, HubError> {
        let base = url.trim_end_matches('/').to_string();
        let name = base
            .rsplit_once("/replicas/")
            .map(|(_, name)| name)
            .filter(|n| !n.is_empty() && !n.contains('/'));
        if !is_hub_url(&base) || name.is_none() {
            return Err(HubError::BadUrl {
                url: url.to_string(),
            });
        }
        let client = Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| HubError::Client {
                url: base.clone(),
                message: e.to_string(),
            })?;
        let mut remote = Self {
            client,
            base,
            token: token.to_string(),
            id: ReplicaId::from_bytes([0; 16]),
            session: None,
            pending_peer: None,
        };
        let info = remote.info().map_err(|e| HubError::Client {
            url: remote.base.clone(),
            message: e.to_string(),
        })?;
        remote.id = info.replica;
        Ok(remote)
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn info(&self) -> Result<PeerInfo, SyncError> {
        let url = self.base.clone();
        let answer: WireInfo = self.call(self.client.get(&url), &url)?;
        answer
            .into_info()
            .map_err(|e| self.remote_error(None, e.to_string()))
    }

    fn remote_error(&self, status: Option<u16>, message: String) -> SyncError {
        SyncError::Remote {
            url: self.base.clone(),
            status,
            message,
        }
    }

    /// Sends a request and reads the typed answer; an error answer becomes the
    /// `SyncError` it stands for.
    fn call<M: Message>(
        &self,
        request: reqwest::blocking::RequestBuilder,
        url: &str,
    ) -> Result<M, SyncError> {
        let response = request
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/vnd.knit")
            .send()
            .map_err(|e| SyncError::Remote {
                url: url.to_string(),
                status: None,
                message: without_url(&e),
            })?;
        let status = response.status();
        if response
            .content_length()
            .is_some_and(|n| n > MAX_BODY_BYTES as u64)
        {
            return Err(
                self.remote_error(Some(status.as_u16()), "answer over the size limit".into())
            );
        }
        let bytes = response.bytes().map_err(|e| SyncError::Remote {
            url: url.to_string(),
            status: Some(status.as_u16()),
            message: without_url(&e),
        })?;
        if bytes.len() > MAX_BODY_BYTES {
            return Err(
                self.remote_error(Some(status.as_u16()), "answer over the size limit".into())
            );
        }
        if status.is_success() {
            return decode::<M>(&bytes)
                .map_err(|e| self.remote_error(Some(status.as_u16()), e.to_string()));
        }
        Err(self.error_answer(status, &bytes))
    }

    fn error_answer(&self, status: StatusCode, body: &[u8]) -> SyncError {
        let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let field = |k: &str| json.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let message = field("message")
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
        match field("error").as_deref() {
            Some("busy") => SyncError::ReplicaBusy { replica: self.id },
            Some("restored") => {
                let parse = |k: &str| field(k).and_then(|t| ReplicaId::parse(&t));
                match (parse("replica"), parse("peer")) {
                    (Some(replica), Some(peer)) => SyncError::ReplicaRestored {
                        replica,
                        peer,
                        evidence: field("evidence").unwrap_or_default(),
                    },
                    _ => self.remote_error(Some(status.as_u16()), message),
                }
            }
            _ => self.remote_error(Some(status.as_u16()), message),
        }
    }

    fn session_url(&self, call: &str) -> Result<String, SyncError> {
        let (sid, _) = self
            .session
            .as_ref()
            .ok_or_else(|| self.remote_error(None, format!("`{call}` outside a session")))?;
        Ok(format!("{}/sessions/{sid}/{call}", self.base))
    }

    /// Opens the hub's side of the session once the hub's part is known.
    fn begin_as(&mut self, role: Role) -> Result<(), SyncError> {
        if let Some((_, open)) = &self.session {
            if *open == role {
                return Ok(());
            }
            return Err(self.remote_error(None, "a session cannot change direction".into()));
        }
        let peer = self
            .pending_peer
            .as_ref()
            .ok_or_else(|| self.remote_error(None, "no session begun".into()))?;
        let url = format!("{}/sessions", self.base);
        let body = encode(&WireBegin {
            role,
            peer: WireInfo::from_info(peer),
        });
        let answer: WireSession = self.call(self.client.post(&url).body(body), &url)?;
        self.session = Some((super::server::hex(&answer.session), role));
        Ok(())
    }

    fn post<Q: Message, A: Message>(&self, call: &str, body: &Q) -> Result<A, SyncError> {
        let url = self.session_url(call)?;
        self.call(self.client.post(&url).body(encode(body)), &url)
    }
}

/// A transport error's text without the URL (the caller names it once).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" ({url})"), "");
        text = text.replace(url.as_str(), "the hub");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

impl SyncProvider for RemoteReplica {
    fn replica_id(&self) -> ReplicaId {
        self.id
    }

    fn fetch_info(&mut self) -> Result<PeerInfo, SyncError> {
        self.info()
    }

    /// Without its part (an orchestrator that calls this rather than
    /// `begin_session_as`), the hub's side opens at the first call that shows it:
    /// `begin_sending` as source, `note_peer_epoch` as destination.
    fn begin_session(&mut self, peer: &PeerInfo) -> Result<(), SyncError> {
        if self.session.is_some() {
            return Err(SyncError::ReplicaBusy { replica: self.id });
        }
        self.pending_peer = Some(peer.clone());
        Ok(())
    }

    /// The orchestrator says which part the hub plays: its side opens at once, so a
    /// busy hub answers before the local side has done anything.
    fn begin_session_as(&mut self, peer: &PeerInfo, role: SessionRole) -> Result<(), SyncError> {
        self.begin_session(peer)?;
        let role = match role {
            SessionRole::Source => Role::Source,
            SessionRole::Destination => Role::Destination,
        };
        if let Err(e) = self.begin_as(role) {
            self.pending_peer = None;
            return Err(e);
        }
        Ok(())
    }

    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError> {
        self.begin_as(Role::Destination)?;
        let _: WireDone = self.post(
            "epoch",
            &WireEpoch {
                peer: *peer.as_bytes(),
                epoch,
            },
        )?;
        Ok(())
    }

    fn end_session(&mut self, completed: bool) -> Result<(), SyncError> {
        self.pending_peer = None;
        if self.session.is_none() {
            return Ok(());
        }
        let ended: Result<WireDone, _> = self.post("end", &WireEnd { completed });
        self.session = None;
        ended.map(|_| ())
    }
}

impl ChangeSource for RemoteReplica {
    fn begin_sending(&mut self) -> Result<u64, SyncError> {
        self.begin_as(Role::Source)?;
        let answer: WireEpoch = self.post("sending", &WireDone)?;
        Ok(answer.epoch)
    }

    fn forgotten_knowledge(&mut self) -> Result<Knowledge, SyncError> {
        let answer: WireKnowledge = self.post("forgotten", &WireDone)?;
        answer
            .into_knowledge()
            .map_err(|e| self.remote_error(None, e.to_string()))
    }

    fn estimate_changes(&mut self, request: &BatchRequest<'_>) -> Result<Option<u64>, SyncError> {
        let answer: WireEstimate = self.post("estimate", &wire_request(request))?;
        Ok(answer.changes)
    }

    fn change_batch(&mut self, request: &BatchRequest<'_>) -> Result<ChangeBatch, SyncError> {
        let answer: WireBatch = self.post("batch", &wire_request(request))?;
        answer.into_batch().map_err(|e| SyncError::BadBatch {
            source_replica: self.id,
            reason: e.to_string(),
        })
    }
}

/// The destination's knowledge does not travel with each request: the hub uses the
/// knowledge the client presented when the session began, which is the one the
/// orchestrator passes here.
fn wire_request(request: &BatchRequest<'_>) -> WireBatchRequest {
    WireBatchRequest {
        start: request.start.to_vec(),
        batch_size: u32::try_from(request.batch_size).unwrap_or(u32::MAX),
        full_enumeration: request.full_enumeration,
    }
}

impl ChangeDestination for RemoteReplica {
    fn process_batch(
        &mut self,
        batch: ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError> {
        let policy = match policy {
            ConflictPolicy::SourceWins => WirePolicy::SourceWins,
            ConflictPolicy::DestinationWins => WirePolicy::DestinationWins,
            ConflictPolicy::LastWriterWins => WirePolicy::LastWriterWins,
            ConflictPolicy::ApplicationDefined(_) => {
                return Err(SyncError::InvalidOptions(
                    "an application-defined conflict policy runs in this process; a hub \
                     applies uploads with source-wins, destination-wins or last-writer-wins"
                        .into(),
                ))
            }
        };
        self.begin_as(Role::Destination)?;
        let answer: WireOutcome = self.post(
            "apply",
            &WireApply {
                policy,
                batch: crate::model::encode_batch(&batch),
            },
        )?;
        for event in &answer.events {
            match event.clone() {
                WireEvent::Conflict {
                    item,
                    kind,
                    outcome,
                } => {
                    if let (Some(item), Some(kind), Some(outcome)) =
                        (item_of(item), kind_of(kind), outcome_of(outcome))
                    {
                        observer.conflict(&item, kind, outcome);
                    }
                }
                WireEvent::Failed { item, reason } => {
                    if let Some(item) = item_of(item) {
                        observer.item_failed(&item, &reason);
                    }
                }
            }
        }
        Ok(answer.outcome())
    }
}

//! The hub's wire protocol: the bodies a client and a hub exchange over HTTP.
//!
//! Every body starts with the four bytes `knit`, the protocol version and a message kind
//! byte, followed by a bincode (2.0, standard config) body of one wire type. Knowledge
//! and change batches travel inside those bodies in the engine's own encodings
//! ([`crate::model::encode_knowledge`], [`crate::model::encode_batch`]) and are decoded
//! by the engine's decoders, so a body off the network is bounded and validated exactly
//! like a batch read from disk. docs/protocol.md draws every message and route.

use serde::{Deserialize, Serialize};

use crate::model::{
    decode_batch, decode_knowledge, encode_batch, encode_knowledge, ChangeBatch, ItemId, Knowledge,
    ReplicaId, MAX_BATCH_BYTES,
};
use crate::sync::{BatchOutcome, ConflictCounts, ConflictKind, ConflictOutcome, PeerInfo};

/// The protocol version this build speaks. A body with another version is refused
/// with 400 and a message naming both versions.
pub const PROTOCOL_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"knit";
const HEADER_LEN: usize = 6;
/// Largest body either side accepts: a largest batch plus room for its envelope.
pub const MAX_BODY_BYTES: usize = MAX_BATCH_BYTES + (1 << 20);

/// Why a body could not be read. The message says what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{what}: the body is {len} bytes, shorter than the 6-byte header")]
    Truncated { what: &'static str, len: usize },
    #[error("{what}: the body does not start with the protocol's magic bytes `knit`")]
    NotKnit { what: &'static str },
    #[error("{what}: protocol version {found}; this build speaks version {PROTOCOL_VERSION}")]
    Version { what: &'static str, found: u8 },
    #[error("{what}: message kind {found:?} where {expected:?} was expected")]
    Kind {
        what: &'static str,
        found: u8,
        expected: u8,
    },
    #[error("{what}: {reason}")]
    Body { what: &'static str, reason: String },
}

/// A message type: its kind byte and a name for error messages.
pub trait Message: Serialize + for<'de> Deserialize<'de> {
    const KIND: u8;
    const WHAT: &'static str;
}

pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(M::KIND);
    // Plain data types always encode; a failure would be a bug in a wire type.
    let body = bincode::serde::encode_to_vec(message, bincode::config::standard())
        .expect("wire types always encode");
    out.extend_from_slice(&body);
    out
}

pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, ProtocolError> {
    let what = M::WHAT;
    if bytes.len() < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            what,
            len: bytes.len(),
        });
    }
    if &bytes[..4] != MAGIC {
        return Err(ProtocolError::NotKnit { what });
    }
    if bytes[4] != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            what,
            found: bytes[4],
        });
    }
    if bytes[5] != M::KIND {
        return Err(ProtocolError::Kind {
            what,
            found: bytes[5],
            expected: M::KIND,
        });
    }
    let body = &bytes[HEADER_LEN..];
    // The limit bounds every allocation the decoder makes by the body's own size cap.
    let config = bincode::config::standard().with_limit::<MAX_BODY_BYTES>();
    let (message, used) =
        bincode::serde::decode_from_slice::<M, _>(body, config).map_err(|e| body_error(what, e))?;
    if used != body.len() {
        return Err(body_error(
            what,
            format!("{} trailing bytes", body.len() - used),
        ));
    }
    Ok(message)
}

fn body_error(what: &'static str, reason: impl ToString) -> ProtocolError {
    ProtocolError::Body {
        what,
        reason: reason.to_string(),
    }
}

/// A replica's id, knowledge and session epoch (`GET /replicas/NAME`; also the peer
/// a client presents when it begins a session).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WireInfo {
    pub replica: [u8; 16],
    pub knowledge: Vec<u8>,
    pub epoch: u64,
}

impl Message for WireInfo {
    const KIND: u8 = b'I';
    const WHAT: &'static str = "replica info";
}

impl WireInfo {
    pub fn from_info(info: &PeerInfo) -> Self {
        Self {
            replica: *info.replica.as_bytes(),
            knowledge: encode_knowledge(&info.knowledge),
            epoch: info.epoch,
        }
    }

    pub fn into_info(self) -> Result<PeerInfo, ProtocolError> {
        Ok(PeerInfo {
            replica: ReplicaId::from_bytes(self.replica),
            knowledge: decode_knowledge(&self.knowledge).map_err(|e| body_error(Self::WHAT, e))?,
            epoch: self.epoch,
        })
    }
}

/// The hub replica's part in a session.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The hub sends changes (the client downloads): needs the read right.
    Source,
    /// The hub receives changes (the client uploads): needs the write right.
    Destination,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Source => "source",
            Role::Destination => "destination",
        }
    }
}

/// `POST /replicas/NAME/sessions`: join a session with the client's replica.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WireBegin {
    pub role: Role,
    pub peer: WireInfo,
}

impl Message for WireBegin {
    const KIND: u8 = b'S';
    const WHAT: &'static str = "session request";
}

/// The session a hub opened: every later call of the session names it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct WireSession {
    pub session: [u8; 16],
}

impl Message for WireSession {
    const KIND: u8 = b's';
    const WHAT: &'static str = "session";
}

/// `POST .../epoch`: the peer moved to a session epoch. Also the answer of
/// `POST .../sending` (the hub's own new epoch; `peer` is then the hub's id).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct WireEpoch {
    pub peer: [u8; 16],
    pub epoch: u64,
}

impl Message for WireEpoch {
    const KIND: u8 = b'E';
    const WHAT: &'static str = "epoch";
}

/// `POST .../forgotten` answer: the hub's forgotten knowledge.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WireKnowledge {
    pub knowledge: Vec<u8>,
}

impl Message for WireKnowledge {
    const KIND: u8 = b'K';
    const WHAT: &'static str = "knowledge";
}

impl WireKnowledge {
    pub fn from_knowledge(k: &Knowledge) -> Self {
        Self {
            knowledge: encode_knowledge(k),
        }
    }

    pub fn into_knowledge(self) -> Result<Knowledge, ProtocolError> {
        decode_knowledge(&self.knowledge).map_err(|e| body_error(Self::WHAT, e))
    }
}

/// `POST .../batch` and `POST .../estimate`: what the next batch starts at. The
/// destination's knowledge is the one the client presented when the session began.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WireBatchRequest {
    pub start: Vec<u8>,
    pub batch_size: u32,
    pub full_enumeration: bool,
}

impl Message for WireBatchRequest {
    const KIND: u8 = b'R';
    const WHAT: &'static str = "batch request";
}

/// The answer of `.../estimate`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct WireEstimate {
    pub changes: Option<u64>,
}

impl Message for WireEstimate {
    const KIND: u8 = b'e';
    const WHAT: &'static str = "estimate";
}

/// A change batch with its data (answer of `.../batch`, part of `.../apply`).
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WireBatch {
    pub batch: Vec<u8>,
}

impl Message for WireBatch {
    const KIND: u8 = b'B';
    const WHAT: &'static str = "change batch";
}

impl WireBatch {
    pub fn from_batch(batch: &ChangeBatch) -> Self {
        Self {
            batch: encode_batch(batch),
        }
    }

    pub fn into_batch(self) -> Result<ChangeBatch, ProtocolError> {
        decode_batch(&self.batch).map_err(|e| body_error(Self::WHAT, e))
    }
}

/// The conflict policies that can travel: an application-defined one runs code the
/// hub does not have.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WirePolicy {
    SourceWins,
    DestinationWins,
    LastWriterWins,
}

/// `POST .../apply`: a batch for the hub to push through its change applier.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WireApply {
    pub policy: WirePolicy,
    pub batch: Vec<u8>,
}

impl Message for WireApply {
    const KIND: u8 = b'A';
    const WHAT: &'static str = "apply request";
}

/// What the applier told its observer, replayed to the client's observer.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum WireEvent {
    Conflict {
        item: Vec<u8>,
        kind: u8,
        outcome: u8,
    },
    Failed {
        item: Vec<u8>,
        reason: String,
    },
}

/// The answer of `.../apply`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct WireOutcome {
    pub applied: u64,
    pub skipped: u64,
    pub failed: u64,
    /// Source won, destination won, merged, saved, skipped.
    pub conflicts: [u64; 5],
    pub forgotten_removed: u64,
    pub events: Vec<WireEvent>,
}

impl Message for WireOutcome {
    const KIND: u8 = b'a';
    const WHAT: &'static str = "apply outcome";
}

impl WireOutcome {
    pub fn from_outcome(o: &BatchOutcome, events: Vec<WireEvent>) -> Self {
        let c = &o.conflicts;
        Self {
            applied: o.applied,
            skipped: o.skipped,
            failed: o.failed,
            conflicts: [
                c.source_won,
                c.destination_won,
                c.merged,
                c.saved,
                c.skipped,
            ],
            forgotten_removed: o.forgotten_removed,
            events,
        }
    }

    pub fn outcome(&self) -> BatchOutcome {
        let [source_won, destination_won, merged, saved, skipped] = self.conflicts;
        BatchOutcome {
            applied: self.applied,
            skipped: self.skipped,
            failed: self.failed,
            conflicts: ConflictCounts {
                source_won,
                destination_won,
                merged,
                saved,
                skipped,
            },
            forgotten_removed: self.forgotten_removed,
        }
    }
}

/// `POST .../end`: leave the session.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct WireEnd {
    pub completed: bool,
}

impl Message for WireEnd {
    const KIND: u8 = b'X';
    const WHAT: &'static str = "end of session";
}

/// An empty answer (`.../epoch`, `.../end`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
pub struct WireDone;

impl Message for WireDone {
    const KIND: u8 = b'D';
    const WHAT: &'static str = "acknowledgement";
}

pub(crate) fn kind_code(kind: ConflictKind) -> u8 {
    match kind {
        ConflictKind::UpdateUpdate => 0,
        ConflictKind::LocalUpdateRemoteDelete => 1,
        ConflictKind::LocalDeleteRemoteUpdate => 2,
        ConflictKind::DeleteDelete => 3,
    }
}

pub(crate) fn kind_of(code: u8) -> Option<ConflictKind> {
    Some(match code {
        0 => ConflictKind::UpdateUpdate,
        1 => ConflictKind::LocalUpdateRemoteDelete,
        2 => ConflictKind::LocalDeleteRemoteUpdate,
        3 => ConflictKind::DeleteDelete,
        _ => return None,
    })
}

pub(crate) fn outcome_code(outcome: ConflictOutcome) -> u8 {
    match outcome {
        ConflictOutcome::SourceWon => 0,
        ConflictOutcome::DestinationWon => 1,
        ConflictOutcome::Merged => 2,
        ConflictOutcome::Saved => 3,
        ConflictOutcome::Skipped => 4,
    }
}

pub(crate) fn outcome_of(code: u8) -> Option<ConflictOutcome> {
    Some(match code {
        0 => ConflictOutcome::SourceWon,
        1 => ConflictOutcome::DestinationWon,
        2 => ConflictOutcome::Merged,
        3 => ConflictOutcome::Saved,
        4 => ConflictOutcome::Skipped,
        _ => return None,
    })
}

pub(crate) fn item_of(bytes: Vec<u8>) -> Option<ItemId> {
    ItemId::new(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_and_every_damaged_header_is_named() {
        let end = WireEnd { completed: true };
        let bytes = encode(&end);
        assert!(decode::<WireEnd>(&bytes).is_ok_and(|e| e.completed));

        assert!(matches!(
            decode::<WireEnd>(&bytes[..3]),
            Err(ProtocolError::Truncated { len: 3, .. })
        ));
        let mut other = bytes.clone();
        other[0] = b'K';
        assert!(matches!(
            decode::<WireEnd>(&other),
            Err(ProtocolError::NotKnit { .. })
        ));
        let mut other = bytes.clone();
        other[4] = 9;
        let err = decode::<WireEnd>(&other).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(matches!(
            decode::<WireDone>(&bytes),
            Err(ProtocolError::Kind { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode::<WireEnd>(&longer)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
    }

    #[test]
    fn a_length_prefix_larger_than_the_body_cap_allocates_nothing() {
        // A batch whose inner byte string claims 2^60 bytes.
        let mut bytes = Vec::from(&MAGIC[..]);
        bytes.extend([PROTOCOL_VERSION, WireBatch::KIND]);
        bytes.push(0xfd); // bincode varint: a u64 follows
        bytes.extend((1u64 << 60).to_le_bytes());
        assert!(matches!(
            decode::<WireBatch>(&bytes),
            Err(ProtocolError::Body { .. })
        ));
    }
}

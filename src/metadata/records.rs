//! On-disk records. Each is `[kind, format version] ++ bincode(raw type)`; the raw types
//! are private and decoding rebuilds model values through their checking constructors.

use serde::{Deserialize, Serialize};

use crate::model::{
    ChangeKind, Hlc, ItemChange, ItemId, Knowledge, ModelError, RawKnowledge, ReplicaId, Version,
};

pub(crate) const RECORD_FORMAT: u8 = 1;
const RECORD_LIMIT: usize = crate::model::MAX_BATCH_BYTES;

/// What a replica keeps about one item (live or tombstone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemMeta {
    pub creation: Version,
    /// The current change version: the index has an entry for exactly this version.
    pub version: Version,
    pub timestamp: Hlc,
    pub deleted: bool,
}

/// A conflict the application chose to save for later: the remote change, its data and
/// the knowledge it was made with ("conflict knowledge").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedConflict {
    pub source: ReplicaId,
    pub remote: ItemChange,
    pub made_with: Knowledge,
}

#[derive(Serialize, Deserialize)]
struct RawVersion([u8; 16], u64);

impl RawVersion {
    fn of(v: Version) -> Self {
        Self(*v.replica.as_bytes(), v.tick)
    }
    fn get(&self) -> Result<Version, String> {
        if self.1 == 0 {
            return Err("version with tick 0".into());
        }
        Ok(Version::new(ReplicaId::from_bytes(self.0), self.1))
    }
}

#[derive(Serialize, Deserialize)]
struct RawItemMeta {
    creation: RawVersion,
    version: RawVersion,
    timestamp: u64,
    deleted: bool,
    /// Length of the item's data carried as the record's tail (built-in store), or
    /// `None` when the data lives elsewhere or the item is a tombstone.
    data_len: Option<u64>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ReplicaRecord {
    pub(crate) store_format: u32,
    pub(crate) id: [u8; 16],
}

/// The counters that move with every local change, kept apart from knowledge so a
/// local put rewrites a few bytes, not the whole knowledge.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClockRecord {
    pub(crate) tick: u64,
    pub(crate) hlc: u64,
    /// This replica's tick when its last sync session completed (`knit rekey` cuts
    /// knowledge of the old id back to it).
    pub(crate) last_sync_tick: u64,
    /// Bumped (and flushed) before every session in which this replica sends changes.
    /// Peers remember the highest epoch they saw; a replica restored from an old copy
    /// presents a lower one, even once its tick count has caught up.
    pub(crate) epoch: u64,
}

/// The highest session epoch seen from one peer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PeerRecord {
    pub(crate) epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct RawConflict {
    source: [u8; 16],
    item: Vec<u8>,
    deleted: bool,
    creation: RawVersion,
    version: RawVersion,
    timestamp: u64,
    data: Option<Vec<u8>>,
    made_with: RawKnowledge,
}

pub(crate) const KIND_REPLICA: u8 = b'R';
pub(crate) const KIND_CLOCK: u8 = b'C';
pub(crate) const KIND_KNOWLEDGE: u8 = b'K';
pub(crate) const KIND_ITEM: u8 = b'I';
pub(crate) const KIND_CONFLICT: u8 = b'X';
pub(crate) const KIND_PEER: u8 = b'P';
pub(crate) const KIND_PENDING_SET: u8 = b'M';

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<RECORD_LIMIT>()
}

pub(crate) fn encode<T: Serialize>(kind: u8, raw: &T) -> Vec<u8> {
    encode_with_room(kind, raw, 0)
}

/// `encode`, leaving room for `extra` bytes the caller appends (an item's data).
fn encode_with_room<T: Serialize>(kind: u8, raw: &T, extra: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 48 + extra);
    out.extend_from_slice(&[kind, RECORD_FORMAT]);
    // Plain data types always encode into a Vec; failure would be a bug in a raw type.
    bincode::serde::encode_into_std_write(raw, &mut out, bincode::config::standard())
        .expect("raw records always encode");
    out
}

/// Decodes a record, returning a human-readable reason on failure.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(kind: u8, bytes: &[u8]) -> Result<T, String> {
    let (raw, rest) = decode_prefix(kind, bytes)?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes", rest.len()));
    }
    Ok(raw)
}

/// Decodes the head of a record and returns it with the bytes that follow it.
fn decode_prefix<T: serde::de::DeserializeOwned>(
    kind: u8,
    bytes: &[u8],
) -> Result<(T, &[u8]), String> {
    let body = match bytes {
        [k, v, body @ ..] if *k == kind && *v == RECORD_FORMAT => body,
        [k, v, ..] if *k == kind => {
            return Err(format!(
                "record format {v}; this build reads format {RECORD_FORMAT}"
            ))
        }
        [k, ..] => return Err(format!("record kind {k:#04x}, expected {kind:#04x}")),
        [] => return Err("empty record".into()),
    };
    let (raw, used): (T, usize) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| e.to_string())?;
    Ok((raw, &body[used..]))
}

impl ItemMeta {
    /// The item record without data.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_data(None)
    }

    /// The item record with the item's data as its tail (the built-in store keeps data
    /// there, so an item costs one key and one read, not two).
    pub fn encode_with_data(&self, data: Option<&[u8]>) -> Vec<u8> {
        let mut out = encode_with_room(
            KIND_ITEM,
            &RawItemMeta {
                creation: RawVersion::of(self.creation),
                version: RawVersion::of(self.version),
                timestamp: self.timestamp.0,
                deleted: self.deleted,
                data_len: data.map(|d| d.len() as u64),
            },
            data.map_or(0, <[u8]>::len),
        );
        if let Some(data) = data {
            out.extend_from_slice(data);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        Self::decode_with_data(bytes).map(|(meta, _)| meta)
    }

    /// Decodes an item record and returns its data tail, if it carries one.
    pub fn decode_with_data(bytes: &[u8]) -> Result<(Self, Option<&[u8]>), String> {
        let (raw, rest): (RawItemMeta, &[u8]) = decode_prefix(KIND_ITEM, bytes)?;
        let data = match raw.data_len {
            None if rest.is_empty() => None,
            None => return Err(format!("{} trailing bytes", rest.len())),
            Some(len) if len == rest.len() as u64 => Some(rest),
            Some(len) => {
                return Err(format!(
                    "record announces {len} bytes of data and carries {}",
                    rest.len()
                ))
            }
        };
        if raw.deleted && data.is_some() {
            return Err("a tombstone carries data".into());
        }
        let meta = Self {
            creation: raw.creation.get()?,
            version: raw.version.get()?,
            timestamp: Hlc(raw.timestamp),
            deleted: raw.deleted,
        };
        Ok((meta, data))
    }
}

impl SavedConflict {
    pub fn encode(&self) -> Vec<u8> {
        encode(
            KIND_CONFLICT,
            &RawConflict {
                source: *self.source.as_bytes(),
                item: self.remote.item.as_bytes().to_vec(),
                deleted: self.remote.is_delete(),
                creation: RawVersion::of(self.remote.creation),
                version: RawVersion::of(self.remote.version),
                timestamp: self.remote.timestamp.0,
                data: self.remote.data.clone(),
                made_with: RawKnowledge::from_knowledge(&self.made_with),
            },
        )
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let raw: RawConflict = decode(KIND_CONFLICT, bytes)?;
        let item = ItemId::new(&raw.item).map_err(|e| e.to_string())?;
        if raw.deleted == raw.data.is_some() {
            return Err("a delete must carry no data and an update must".into());
        }
        Ok(Self {
            source: ReplicaId::from_bytes(raw.source),
            remote: ItemChange {
                item,
                kind: if raw.deleted {
                    ChangeKind::Delete
                } else {
                    ChangeKind::Update
                },
                creation: raw.creation.get()?,
                version: raw.version.get()?,
                timestamp: Hlc(raw.timestamp),
                data: raw.data,
            },
            made_with: raw
                .made_with
                .into_knowledge("saved conflict")
                .map_err(|e: ModelError| e.to_string())?,
        })
    }
}

pub(crate) fn encode_knowledge_record(k: &Knowledge) -> Vec<u8> {
    encode(KIND_KNOWLEDGE, &RawKnowledge::from_knowledge(k))
}

pub(crate) fn decode_knowledge_record(bytes: &[u8]) -> Result<Knowledge, String> {
    let raw: RawKnowledge = decode(KIND_KNOWLEDGE, bytes)?;
    raw.into_knowledge("knowledge record")
        .map_err(|e| e.to_string())
}

/// Decodes `bytes` as whichever metadata record its kind byte names, and reports why it
/// is not a valid record. The store's own reads go through the same decoders; the
/// fuzzers and the hostile-bytes tests call this to reach all of them.
pub fn check_record(bytes: &[u8]) -> Result<(), String> {
    match bytes.first() {
        Some(&KIND_REPLICA) => decode::<ReplicaRecord>(KIND_REPLICA, bytes).map(drop),
        Some(&KIND_CLOCK) => decode::<ClockRecord>(KIND_CLOCK, bytes).map(drop),
        Some(&KIND_KNOWLEDGE) => decode_knowledge_record(bytes).map(drop),
        Some(&KIND_ITEM) => ItemMeta::decode(bytes).map(drop),
        Some(&KIND_CONFLICT) => SavedConflict::decode(bytes).map(drop),
        Some(&KIND_PEER) => decode::<PeerRecord>(KIND_PEER, bytes).map(drop),
        Some(&super::pages::KIND_ITEM_PAGE | &super::pages::KIND_INDEX_PAGE) => {
            super::pages::check_page(bytes)
        }
        Some(k) => Err(format!("unknown record kind {k:#04x}")),
        None => Err("empty record".into()),
    }
}

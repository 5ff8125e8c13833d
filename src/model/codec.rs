//! Byte encodings of knowledge and change batches, as they travel between providers
//! and rest on disk.
//!
//! Every encoding starts with a kind byte and a format version byte, followed by a
//! bincode (2.0, standard config) body of a private raw type. Decoding reads the raw
//! type under a byte limit, so no allocation is sized by the input beyond that limit,
//! then rebuilds the model value through its validating constructor: a decoded value
//! holds every invariant a constructed one does. Layouts are drawn in docs/format.md.

use serde::{Deserialize, Serialize};

use super::change::{ChangeGroup, ChangeKind};
use super::{
    BatchMode, ChangeBatch, ClockVector, Hlc, IdRange, ItemChange, ItemId, Knowledge, ModelError,
    ReplicaId, Version, MAX_ITEM_ID_LEN,
};

/// Largest encoded batch accepted (and produced: sources split batches below it).
pub const MAX_BATCH_BYTES: usize = 64 << 20;
/// Most changes (plus `present` ids) in one batch.
pub const MAX_CHANGES_PER_BATCH: usize = 65_536;
/// Largest data of one item.
pub const MAX_ITEM_DATA_LEN: usize = 16 << 20;
/// Most exception ranges in one knowledge.
pub const MAX_EXCEPTIONS: usize = 1 << 20;
/// Most replicas named in one clock vector.
pub const MAX_REPLICAS_PER_VECTOR: usize = 1 << 16;

const KIND_KNOWLEDGE: u8 = b'K';
const KIND_BATCH: u8 = b'B';
const KNOWLEDGE_FORMAT: u8 = 1;
const BATCH_FORMAT: u8 = 1;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_BATCH_BYTES>()
}

fn decode_error(what: &'static str, reason: impl ToString) -> ModelError {
    ModelError::Decode {
        what,
        reason: reason.to_string(),
    }
}

/// A clock vector as stored: `(replica bytes, tick)` pairs, sorted, no zero ticks.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawVector(Vec<([u8; 16], u64)>);

impl RawVector {
    pub(crate) fn from_vector(v: &ClockVector) -> Self {
        Self(v.iter().map(|(r, t)| (*r.as_bytes(), t)).collect())
    }

    pub(crate) fn into_vector(self, what: &'static str) -> Result<ClockVector, ModelError> {
        if self.0.len() > MAX_REPLICAS_PER_VECTOR {
            return Err(decode_error(what, "clock vector names too many replicas"));
        }
        for pair in self.0.windows(2) {
            if pair[0].0 >= pair[1].0 {
                return Err(decode_error(what, "clock vector entries out of order"));
            }
        }
        if self.0.iter().any(|&(_, t)| t == 0) {
            return Err(decode_error(what, "clock vector holds a zero tick"));
        }
        Ok(ClockVector::from_pairs(
            self.0
                .into_iter()
                .map(|(r, t)| (ReplicaId::from_bytes(r), t)),
        ))
    }
}

/// Knowledge as stored: base vector and `(start, end, vector)` exceptions.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawKnowledge {
    base: RawVector,
    exceptions: Vec<(Vec<u8>, Option<Vec<u8>>, RawVector)>,
}

impl RawKnowledge {
    pub(crate) fn from_knowledge(k: &Knowledge) -> Self {
        Self {
            base: RawVector::from_vector(k.base()),
            exceptions: k
                .exceptions()
                .iter()
                .map(|(r, v)| {
                    (
                        r.start().to_vec(),
                        r.end().map(<[u8]>::to_vec),
                        RawVector::from_vector(v),
                    )
                })
                .collect(),
        }
    }

    pub(crate) fn into_knowledge(self, what: &'static str) -> Result<Knowledge, ModelError> {
        if self.exceptions.len() > MAX_EXCEPTIONS {
            return Err(decode_error(what, "too many exception ranges"));
        }
        let base = self.base.into_vector(what)?;
        let mut exceptions = Vec::with_capacity(self.exceptions.len());
        for (start, end, vector) in self.exceptions {
            if start.len() > MAX_ITEM_ID_LEN + 1
                || end.as_ref().is_some_and(|e| e.len() > MAX_ITEM_ID_LEN + 1)
            {
                return Err(decode_error(what, "range bound longer than an item id"));
            }
            let range = IdRange::new(start, end).map_err(|e| decode_error(what, e))?;
            exceptions.push((range, vector.into_vector(what)?));
        }
        Knowledge::from_parts(base, exceptions).map_err(|e| decode_error(what, e))
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct RawVersion([u8; 16], u64);

impl RawVersion {
    fn from_version(v: Version) -> Self {
        Self(*v.replica.as_bytes(), v.tick)
    }

    fn into_version(self, what: &'static str) -> Result<Version, ModelError> {
        if self.1 == 0 {
            return Err(decode_error(what, "version with tick 0"));
        }
        Ok(Version::new(ReplicaId::from_bytes(self.0), self.1))
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct RawChange {
    item: Vec<u8>,
    deleted: bool,
    creation: RawVersion,
    version: RawVersion,
    timestamp: u64,
    data: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize, Debug)]
struct RawGroup {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    changes: Vec<RawChange>,
    present: Vec<Vec<u8>>,
}

#[derive(Serialize, Deserialize, Debug)]
struct RawBatch {
    source: [u8; 16],
    made_with: RawKnowledge,
    groups: Vec<RawGroup>,
    excluded: Vec<Vec<u8>>,
    /// Present only for a full-enumeration batch.
    forgotten: Option<RawKnowledge>,
    is_last: bool,
}

fn item_id(bytes: Vec<u8>, what: &'static str) -> Result<ItemId, ModelError> {
    ItemId::new(&bytes).map_err(|e| decode_error(what, e))
}

fn header(kind: u8, version: u8) -> Vec<u8> {
    vec![kind, version]
}

fn check_header<'a>(
    bytes: &'a [u8],
    kind: u8,
    expected: u8,
    what: &'static str,
) -> Result<&'a [u8], ModelError> {
    match bytes {
        [k, v, body @ ..] if *k == kind => {
            if *v != expected {
                return Err(ModelError::FormatVersion {
                    what,
                    found: *v,
                    expected,
                });
            }
            Ok(body)
        }
        [_, _, ..] => Err(decode_error(what, "wrong kind byte")),
        _ => Err(decode_error(what, "truncated header")),
    }
}

fn decode_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, ModelError> {
    let (raw, used): (T, usize) =
        bincode::serde::decode_from_slice(body, config()).map_err(|e| decode_error(what, e))?;
    if used != body.len() {
        return Err(decode_error(
            what,
            format!("{} trailing bytes", body.len() - used),
        ));
    }
    Ok(raw)
}

fn encode_body<T: Serialize>(mut out: Vec<u8>, raw: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these plain data types; an error here would be
    // a bug in a raw type, not bad input.
    let body = bincode::serde::encode_to_vec(raw, bincode::config::standard())
        .expect("raw types always encode");
    out.extend_from_slice(&body);
    out
}

pub fn encode_knowledge(k: &Knowledge) -> Vec<u8> {
    encode_body(
        header(KIND_KNOWLEDGE, KNOWLEDGE_FORMAT),
        &RawKnowledge::from_knowledge(k),
    )
}

pub fn decode_knowledge(bytes: &[u8]) -> Result<Knowledge, ModelError> {
    const WHAT: &str = "knowledge";
    let body = check_header(bytes, KIND_KNOWLEDGE, KNOWLEDGE_FORMAT, WHAT)?;
    decode_body::<RawKnowledge>(body, WHAT)?.into_knowledge(WHAT)
}

pub fn encode_batch(batch: &ChangeBatch) -> Vec<u8> {
    let raw = RawBatch {
        source: *batch.source().as_bytes(),
        made_with: RawKnowledge::from_knowledge(batch.made_with()),
        groups: batch
            .groups()
            .iter()
            .map(|g| RawGroup {
                start: g.range().start().to_vec(),
                end: g.range().end().map(<[u8]>::to_vec),
                changes: g
                    .changes()
                    .iter()
                    .map(|c| RawChange {
                        item: c.item.as_bytes().to_vec(),
                        deleted: c.is_delete(),
                        creation: RawVersion::from_version(c.creation),
                        version: RawVersion::from_version(c.version),
                        timestamp: c.timestamp.0,
                        data: c.data.clone(),
                    })
                    .collect(),
                present: g.present().iter().map(|i| i.as_bytes().to_vec()).collect(),
            })
            .collect(),
        excluded: batch
            .excluded()
            .iter()
            .map(|i| i.as_bytes().to_vec())
            .collect(),
        forgotten: match batch.mode() {
            BatchMode::Normal => None,
            BatchMode::FullEnumeration { forgotten } => {
                Some(RawKnowledge::from_knowledge(forgotten))
            }
        },
        is_last: batch.is_last(),
    };
    encode_body(header(KIND_BATCH, BATCH_FORMAT), &raw)
}

pub fn decode_batch(bytes: &[u8]) -> Result<ChangeBatch, ModelError> {
    const WHAT: &str = "change batch";
    let body = check_header(bytes, KIND_BATCH, BATCH_FORMAT, WHAT)?;
    let raw: RawBatch = decode_body(body, WHAT)?;
    let entries: usize = raw
        .groups
        .iter()
        .map(|g| g.changes.len() + g.present.len())
        .sum();
    if entries > MAX_CHANGES_PER_BATCH {
        return Err(decode_error(
            WHAT,
            format!("{entries} entries; the limit is {MAX_CHANGES_PER_BATCH}"),
        ));
    }
    let made_with = raw.made_with.into_knowledge(WHAT)?;
    let mut groups = Vec::with_capacity(raw.groups.len());
    for g in raw.groups {
        let range = IdRange::new(g.start, g.end).map_err(|e| decode_error(WHAT, e))?;
        let mut changes = Vec::with_capacity(g.changes.len());
        for c in g.changes {
            if c.data.as_ref().is_some_and(|d| d.len() > MAX_ITEM_DATA_LEN) {
                return Err(decode_error(WHAT, "item data over the size limit"));
            }
            changes.push(ItemChange {
                item: item_id(c.item, WHAT)?,
                kind: if c.deleted {
                    ChangeKind::Delete
                } else {
                    ChangeKind::Update
                },
                creation: c.creation.into_version(WHAT)?,
                version: c.version.into_version(WHAT)?,
                timestamp: Hlc(c.timestamp),
                data: c.data,
            });
        }
        let present = g
            .present
            .into_iter()
            .map(|i| item_id(i, WHAT))
            .collect::<Result<Vec<_>, _>>()?;
        groups.push(ChangeGroup::new(range, changes, present)?);
    }
    let excluded = raw
        .excluded
        .into_iter()
        .map(|i| item_id(i, WHAT))
        .collect::<Result<Vec<_>, _>>()?;
    let mode = match raw.forgotten {
        None => BatchMode::Normal,
        Some(f) => BatchMode::FullEnumeration {
            forgotten: f.into_knowledge(WHAT)?,
        },
    };
    ChangeBatch::new(
        ReplicaId::from_bytes(raw.source),
        made_with,
        groups,
        excluded,
        mode,
        raw.is_last,
    )
}

use std::fmt;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use uuid::Uuid;

use super::ModelError;

/// Longest item id accepted anywhere (keys, batches, records).
pub const MAX_ITEM_ID_LEN: usize = 1024;

/// A replica's identity: a random UUID chosen when the replica is created (or rekeyed).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(Uuid);

impl ReplicaId {
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Deterministic ids for tests and simulations: replica `n` sorts before `n + 1`.
    pub fn from_u128(n: u128) -> Self {
        Self(Uuid::from_u128(n))
    }

    pub fn parse(text: &str) -> Option<Self> {
        Uuid::parse_str(text).ok().map(Self)
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.hyphenated())
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 8 hex digits are enough to tell replicas apart in test output.
        let s = self.0.simple().to_string();
        write!(f, "R{}", &s[..8])
    }
}

/// An item's identity: an opaque byte string, ordered bytewise. Short ids (the common
/// case: keys, UUIDs) live inline without a heap allocation.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ItemId(SmallVec<[u8; 24]>);

impl ItemId {
    pub fn new(bytes: &[u8]) -> Result<Self, ModelError> {
        if bytes.len() > MAX_ITEM_ID_LEN {
            return Err(ModelError::ItemIdTooLong {
                len: bytes.len(),
                max: MAX_ITEM_ID_LEN,
            });
        }
        Ok(Self(SmallVec::from_slice(bytes)))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The smallest id greater than this one: the id followed by a zero byte. Used as
    /// the exclusive end of the range that holds exactly this item. It may be one byte
    /// longer than `MAX_ITEM_ID_LEN`, which is why range bounds are not `ItemId`s.
    pub(crate) fn successor_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.0.len() + 1);
        v.extend_from_slice(&self.0);
        v.push(0);
        v
    }
}

impl fmt::Debug for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "{s:?}"),
            Err(_) => write!(f, "0x{}", hex(&self.0)),
        }
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => f.write_str(s),
            Err(_) => write!(f, "0x{}", hex(&self.0)),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TryFrom<&str> for ItemId {
    type Error = ModelError;
    fn try_from(s: &str) -> Result<Self, ModelError> {
        Self::new(s.as_bytes())
    }
}

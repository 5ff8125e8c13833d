//! The replication model: identifiers, versions, clock vectors, knowledge and its
//! algebra, item changes and change batches. Pure data and pure functions.
//!
//! Invariants this layer keeps (each is enforced by a constructor, fields are private):
//! - An [`ItemId`] is at most [`MAX_ITEM_ID_LEN`] bytes; ids are ordered bytewise.
//! - A [`ClockVector`] is sorted by replica id and never stores a zero tick, so two
//!   vectors are equal exactly when they contain the same versions.
//! - A [`Knowledge`] is canonical: its exceptions are sorted, non-empty, disjoint,
//!   never equal to the base vector, and adjacent exceptions with equal vectors are
//!   merged. Hence `==` on knowledge is semantic equality.
//! - Nothing here performs I/O or reads a clock: timestamps come in as arguments.

mod change;
mod codec;
mod error;
mod hlc;
mod ids;
mod knowledge;
mod version;

pub use change::{BatchMode, ChangeBatch, ChangeGroup, ChangeKind, ItemChange};
pub(crate) use codec::RawKnowledge;
pub use codec::{
    decode_batch, decode_knowledge, encode_batch, encode_knowledge, MAX_BATCH_BYTES,
    MAX_CHANGES_PER_BATCH, MAX_EXCEPTIONS, MAX_ITEM_DATA_LEN, MAX_REPLICAS_PER_VECTOR,
};
pub use error::ModelError;
pub use hlc::Hlc;
pub use ids::{ItemId, ReplicaId, MAX_ITEM_ID_LEN};
pub use knowledge::{IdRange, Knowledge};
pub use version::{ClockVector, Version};

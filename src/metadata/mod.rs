//! The replica's metadata store on sled: replica id, tick counter, hybrid clock,
//! knowledge, forgotten knowledge, item metadata, the `(replica, tick)` change index,
//! saved conflicts, and the data of the built-in item store.
//!
//! Invariants:
//! - Everything lives in one sled tree under one-byte key prefixes, and a [`Commit`] is
//!   one `apply_batch`, which sled recovers atomically after a crash. Item data, item
//!   metadata, the index, learned knowledge and the tick that stamped a change are
//!   therefore all there or all absent.
//! - The tick is written in the same batch as the change that used it, so a tick is
//!   never issued twice by one store.
//! - The index holds exactly one entry per item: its current change version.
//! - An item's record is its loose record if it has one, else its entry in the item
//!   page whose range holds its id; an index entry is loose or in its bucket's page,
//!   never both (see `pages` and docs/format.md). Which layout a commit picks changes
//!   the cost of the writes, never what a read returns.
//! - The stored knowledge omits this replica's own entry; [`MetadataStore::knowledge`]
//!   adds `own id ↦ tick` to every vector, because a replica knows all its own changes.
//! - Every record starts with a kind byte and a format version; a record of another
//!   version or one that does not decode is an error that names the key, never a panic.
//! - After a failed commit the handle is poisoned: every later call fails until the
//!   store is reopened (sled recovery then decides what is there).

pub(crate) mod backend;
mod error;
pub(crate) mod pages;
pub mod postgres;
mod records;
pub(crate) mod sled_folder;
mod store;

pub use error::MetadataError;
pub use records::{check_record, ItemMeta, SavedConflict};
pub use store::{Commit, MetadataStore, StoreSummary, STORE_FORMAT};

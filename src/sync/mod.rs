//! Synchronization: the provider traits, the notifying change applier, conflict
//! policies, the orchestrator, statistics, progress and cancellation.
//!
//! Invariants:
//! - A change the destination's knowledge contains is never applied (no echo, no
//!   resurrection): the applier classifies it Obsolete before anything else.
//! - After a batch the destination's knowledge is `combine(K_d, learned)`, where
//!   `learned` is the source's made-with knowledge over the batch's groups minus every
//!   item the source excluded or the destination failed, skipped or saved: those keep
//!   their old vector and come back next session.
//! - SourceWins, DestinationWins and Merge store the result as a fresh version of the
//!   destination; only the last-writer rule keeps a version as it is, because every
//!   replica computes the same winner from the two versions alone.
//! - Data, metadata and learned knowledge of a batch go out in one commit; a cancelled
//!   session keeps every committed batch and nothing else.
//! - The sync layer never opens a sled tree: it goes through the metadata store.
//! - The orchestrator begins the destination first, and the source cuts batch k + 1 on
//!   a thread of its own while the destination applies batch k (providers are `Send`).
//!   A batch cut ahead is applied only if the session is still going when its turn
//!   comes; cutting changes nothing at the source, so dropping one is harmless. A
//!   batch's `made_with` is read when it is cut, which is sound because nothing else
//!   commits at the source during its session (one session per replica).

mod applier;
mod enumerator;
mod error;
mod orchestrator;
mod policy;
mod provider;
mod stats;

pub use applier::{apply_batch, classify, resolve_saved_conflict, Classification};
pub use enumerator::{change_batch, Enumeration};
pub use error::SyncError;
pub use orchestrator::{run_session, synchronize};
pub use policy::{
    last_writer_wins, Conflict, ConflictHandler, ConflictKind, ConflictOutcome, ConflictPolicy,
    ForgottenRecovery, Resolution,
};
pub use provider::{
    BatchRequest, CancelToken, ChangeDestination, ChangeSource, Clock, Direction, ItemStore,
    NoObserver, Peer, PeerInfo, SessionOptions, SessionRole, SyncObserver, SyncProvider,
    SystemClock,
};
pub use stats::{BatchOutcome, ConflictCounts, Progress, SessionStats, SyncReport};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::metadata::{Commit, MetadataStore};
use crate::model::{ChangeBatch, ItemId, Knowledge, ReplicaId};

use super::{BatchOutcome, ConflictKind, ConflictOutcome, ConflictPolicy, Progress, SyncError};

/// Wall-clock milliseconds, from outside: tests and the simulator pass their own.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A flag the caller raises to stop a sync between batches. Every batch committed
/// before the flag is seen stays committed.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Directions of a sync between a local and a remote replica.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Direction {
    /// Local → remote.
    Upload,
    /// Remote → local.
    Download,
    /// Local → remote, then remote → local.
    #[default]
    UploadAndDownload,
    /// Remote → local, then local → remote.
    DownloadAndUpload,
}

/// The knobs of a sync. Only the CLI and the hub pick defaults for people.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub direction: Direction,
    pub policy: ConflictPolicy,
    /// Most changes per batch (1 ..= MAX_CHANGES_PER_BATCH).
    pub batch_size: usize,
    pub recovery: super::ForgottenRecovery,
    pub cancel: CancelToken,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            direction: Direction::default(),
            policy: ConflictPolicy::default(),
            batch_size: 1000,
            recovery: super::ForgottenRecovery::default(),
            cancel: CancelToken::new(),
        }
    }
}

/// Notifications from a session. Every method has a default that ignores the event.
pub trait SyncObserver {
    /// A conflict was detected and settled with `outcome`.
    fn conflict(&mut self, _item: &ItemId, _kind: ConflictKind, _outcome: ConflictOutcome) {}
    /// A change could not be applied; it is not learned and comes back next session.
    fn item_failed(&mut self, _item: &ItemId, _reason: &str) {}
    /// A batch was committed at the destination.
    fn progress(&mut self, _progress: &Progress) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl SyncObserver for NoObserver {}

/// A request for the next batch of a session.
#[derive(Debug)]
pub struct BatchRequest<'a> {
    pub destination: ReplicaId,
    /// The destination's knowledge at the start of the session.
    pub destination_knowledge: &'a Knowledge,
    /// Where this batch's group starts: the end of the previous batch's last group.
    pub start: &'a [u8],
    pub batch_size: usize,
    pub full_enumeration: bool,
}

/// What one side of a session tells the other before anything moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub replica: ReplicaId,
    pub knowledge: Knowledge,
    /// The replica's session epoch: it grows before every session in which the replica
    /// sends changes, so it never goes back unless the replica was restored from a copy.
    pub epoch: u64,
}

/// The part a provider plays in one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionRole {
    Source,
    Destination,
}

/// What every provider offers, in either role. `Send`, because the orchestrator has
/// the source cut its next batch on a thread of its own while the destination applies
/// the current one.
pub trait SyncProvider: Send {
    fn replica_id(&self) -> ReplicaId;
    /// The provider's id, current knowledge and session epoch (for a remote provider,
    /// a round trip).
    fn fetch_info(&mut self) -> Result<PeerInfo, SyncError>;
    /// Joins a session with `peer`. Fails with `ReplicaBusy` if the replica is in
    /// another session, and with `ReplicaRestored` if either side was restored from an
    /// old copy: `peer` knows ticks of this replica above its counter, or presents a
    /// session epoch below one this replica has already seen from it.
    fn begin_session(&mut self, peer: &PeerInfo) -> Result<(), SyncError>;
    /// Joins a session knowing the part this provider plays in it. The orchestrator
    /// calls this, the destination first, so that a destination that refuses (busy,
    /// restored) does so before the source has made anything durable. The default
    /// ignores the part; a remote provider uses it to open its side at once.
    fn begin_session_as(&mut self, peer: &PeerInfo, _role: SessionRole) -> Result<(), SyncError> {
        self.begin_session(peer)
    }
    /// Records that `peer` moved to session `epoch` (it is about to send changes).
    fn note_peer_epoch(&mut self, peer: ReplicaId, epoch: u64) -> Result<(), SyncError>;
    /// Leaves the session. When `completed`, everything committed is flushed to disk
    /// before this returns, so a reported success is durable.
    fn end_session(&mut self, completed: bool) -> Result<(), SyncError>;
}

/// The source side: knowledge, change batches with their data.
pub trait ChangeSource: SyncProvider {
    /// Called once before the first batch of a session that sends changes: moves the
    /// source to its next session epoch, durably, and returns it.
    fn begin_sending(&mut self) -> Result<u64, SyncError>;
    fn forgotten_knowledge(&mut self) -> Result<Knowledge, SyncError>;
    /// How many changes the destination lacks, when the source can tell cheaply.
    fn estimate_changes(&mut self, _request: &BatchRequest<'_>) -> Result<Option<u64>, SyncError> {
        Ok(None)
    }
    fn change_batch(&mut self, request: &BatchRequest<'_>) -> Result<ChangeBatch, SyncError>;
}

/// The destination side: process a batch through the change applier.
pub trait ChangeDestination: SyncProvider {
    fn process_batch(
        &mut self,
        batch: ChangeBatch,
        policy: &ConflictPolicy,
        observer: &mut dyn SyncObserver,
    ) -> Result<BatchOutcome, SyncError>;
}

/// A replica that can be either side.
pub trait Peer: ChangeSource + ChangeDestination {}
impl<T: ChangeSource + ChangeDestination> Peer for T {}

/// Where a replica's item data lives. The applier stages writes through it, so data
/// and metadata commit together for stores that live in the metadata store's sled tree.
pub trait ItemStore: Send {
    /// True when the store keeps each item's data in its metadata record (the built-in
    /// store): the source then reads metadata and data with one lookup.
    fn data_in_record(&self) -> bool {
        false
    }
    /// The current data of an item, `None` if the store holds none.
    fn read(&self, metadata: &MetadataStore, item: &ItemId) -> Result<Option<Vec<u8>>, String>;
    /// The part of an item's id that names what a batch keeps whole (a table row, for
    /// a table replica's units). A batch counts these groups against its size and ends
    /// only between two of them, so the destination never commits part of a group.
    /// The default: every item is a group of its own.
    fn batch_group<'a>(&self, item: &'a [u8]) -> &'a [u8] {
        item
    }
    /// Called after each sync batch this store staged into has committed, with the
    /// store as committed: the moment its changes may leave for elsewhere.
    fn committed(&mut self, _metadata: &MetadataStore) {}
    /// Writes an item's new data (`None`: delete it) as part of `commit`. An error fails
    /// this item only: it is reported, not learned, and sent again next session.
    fn stage(
        &mut self,
        commit: &mut Commit,
        item: &ItemId,
        data: Option<&[u8]>,
    ) -> Result<(), String>;
}

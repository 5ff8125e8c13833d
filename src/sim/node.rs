//! The seam between the simulator and the replicas it drives: a trait for what a
//! simulated replica must offer and a factory that makes and reopens them, so a test
//! can hand in a replica that misbehaves on purpose and watch the checks catch it.

use std::path::Path;
use std::sync::Arc;

use crate::metadata::ItemMeta;
use crate::model::{ItemId, Knowledge, Version};
use crate::stores::{GcReport, Replica, StoreError};
use crate::sync::{ChangeDestination, ChangeSource, Clock};

/// One replica under simulation: both provider roles for sessions, the local operations
/// of the workload, and the read-outs the checks compare. The checks believe what these
/// read-outs say, so a replica that lies in them lies to the checks too: a faulty test
/// replica should lie in the provider methods and tell the truth here.
pub trait SimReplica: ChangeSource + ChangeDestination {
    fn put(&mut self, item: &ItemId, value: &[u8]) -> Result<Version, StoreError>;
    /// `None` when the item was not live (nothing happened).
    fn delete(&mut self, item: &ItemId) -> Result<Option<Version>, StoreError>;
    fn collect_garbage(&mut self, older_than_ms: u64) -> Result<GcReport, StoreError>;
    fn knowledge(&self) -> Knowledge;
    fn forgotten(&self) -> Knowledge;
    /// Every item's metadata, tombstones included, in id order.
    fn item_metas(&self) -> Result<Vec<(ItemId, ItemMeta)>, StoreError>;
    /// Every live item and its value, in id order.
    fn items(&self) -> Result<Vec<(ItemId, Vec<u8>)>, StoreError>;
    /// Makes every committed change durable. The simulator calls it just before it
    /// copies the folder of a replica it kills: sled writes committed batches to disk
    /// on a background thread within half a second, and the flush stands for that
    /// thread, so the crash image holds every committed batch whatever the wall clock
    /// did (a seed must reproduce the run).
    fn flush(&mut self) -> Result<(), StoreError>;
}

impl SimReplica for Replica {
    fn put(&mut self, item: &ItemId, value: &[u8]) -> Result<Version, StoreError> {
        Replica::put(self, item, value)
    }
    fn delete(&mut self, item: &ItemId) -> Result<Option<Version>, StoreError> {
        Replica::delete(self, item)
    }
    fn collect_garbage(&mut self, older_than_ms: u64) -> Result<GcReport, StoreError> {
        Replica::collect_garbage(self, older_than_ms)
    }
    fn knowledge(&self) -> Knowledge {
        Replica::knowledge(self)
    }
    fn forgotten(&self) -> Knowledge {
        Replica::forgotten(self).clone()
    }
    fn item_metas(&self) -> Result<Vec<(ItemId, ItemMeta)>, StoreError> {
        Replica::item_metas(self)
    }
    fn items(&self) -> Result<Vec<(ItemId, Vec<u8>)>, StoreError> {
        Replica::items(self)
    }
    fn flush(&mut self) -> Result<(), StoreError> {
        Replica::flush(self)
    }
}

/// Makes the replicas of a run. `index` is the replica's place in the scenario (0 is a
/// star's hub), so a factory can treat one replica differently.
pub trait ReplicaFactory {
    /// A new replica in the empty folder `path`, stamping its changes with `clock`.
    fn create(
        &mut self,
        index: usize,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Box<dyn SimReplica>, StoreError>;
    /// The replica in `path` again, after the simulator dropped it (a clean close) or
    /// killed it (`path` is then a copy of its folder taken at the kill).
    fn open(
        &mut self,
        index: usize,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Box<dyn SimReplica>, StoreError>;
}

/// The real engine: [`Replica`] with the built-in sled store.
#[derive(Clone, Copy, Debug, Default)]
pub struct SledReplicas;

impl ReplicaFactory for SledReplicas {
    fn create(
        &mut self,
        _index: usize,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Box<dyn SimReplica>, StoreError> {
        let mut replica = Replica::create(path)?;
        replica.set_clock(clock);
        Ok(Box::new(replica))
    }

    fn open(
        &mut self,
        _index: usize,
        path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Box<dyn SimReplica>, StoreError> {
        let mut replica = Replica::open(path)?;
        replica.set_clock(clock);
        Ok(Box::new(replica))
    }
}

//! The orchestrator: runs one or two sessions between a local and a remote replica,
//! pulling batches from the source and pushing them through the destination.

use super::{
    BatchRequest, ChangeDestination, ChangeSource, Clock, Direction, ForgottenRecovery, Peer,
    Progress, SessionOptions, SessionStats, SyncError, SyncObserver, SyncReport,
};
use crate::model::{Knowledge, MAX_CHANGES_PER_BATCH};

/// Syncs `local` with `remote` in the directions of `options`. A cancelled first
/// direction skips the second.
pub fn synchronize(
    local: &mut dyn Peer,
    remote: &mut dyn Peer,
    options: &SessionOptions,
    observer: &mut dyn SyncObserver,
    clock: &dyn Clock,
) -> Result<SyncReport, SyncError> {
    let mut report = SyncReport::default();
    let (upload_first, both) = match options.direction {
        Direction::Upload => (true, false),
        Direction::Download => (false, false),
        Direction::UploadAndDownload => (true, true),
        Direction::DownloadAndUpload => (false, true),
    };
    let mut upload_next = upload_first;
    for _ in 0..if both { 2 } else { 1 } {
        let stats = if upload_next {
            let s = run_session(&mut *local, &mut *remote, options, observer, clock)?;
            report.upload = Some(s.clone());
            s
        } else {
            let s = run_session(&mut *remote, &mut *local, options, observer, clock)?;
            report.download = Some(s.clone());
            s
        };
        if stats.cancelled {
            break;
        }
        upload_next = !upload_next;
    }
    Ok(report)
}

/// One direction: `source` → `destination`.
pub fn run_session<S, D>(
    source: &mut S,
    destination: &mut D,
    options: &SessionOptions,
    observer: &mut dyn SyncObserver,
    clock: &dyn Clock,
) -> Result<SessionStats, SyncError>
where
    S: ChangeSource + ?Sized,
    D: ChangeDestination + ?Sized,
{
    if options.batch_size == 0 || options.batch_size > MAX_CHANGES_PER_BATCH {
        return Err(SyncError::InvalidOptions(format!(
            "batch size {} is outside 1..={MAX_CHANGES_PER_BATCH}",
            options.batch_size
        )));
    }
    let (source_id, destination_id) = (source.replica_id(), destination.replica_id());
    if source_id == destination_id {
        return Err(SyncError::SameReplica { replica: source_id });
    }
    let mut stats = SessionStats {
        source: Some(source_id),
        destination: Some(destination_id),
        started_at_ms: clock.now_ms(),
        ..SessionStats::default()
    };
    let source_info = source.fetch_info()?;
    let destination_info = destination.fetch_info()?;
    source.begin_session(&destination_info)?;
    if let Err(e) = destination.begin_session(&source_info) {
        let _ = source.end_session(false);
        return Err(e);
    }
    let (source_knowledge, destination_knowledge) =
        (source_info.knowledge, destination_info.knowledge);
    // A panic inside a provider or the conflict callback must still take both replicas
    // out of the session, or they would refuse every later sync until reopened.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        transfer(
            &mut *source,
            &mut *destination,
            options,
            observer,
            &source_knowledge,
            &destination_knowledge,
            &mut stats,
        )
    }));
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(panic) => {
            let _ = destination.end_session(false);
            let _ = source.end_session(false);
            std::panic::resume_unwind(panic);
        }
    };
    let completed = matches!(outcome, Ok(true));
    // Close both sides whatever happened; the first error wins.
    let ended_destination = destination.end_session(completed);
    let ended_source = source.end_session(completed);
    outcome?;
    ended_destination?;
    ended_source?;
    stats.ended_at_ms = clock.now_ms();
    Ok(stats)
}

/// Moves batches until the last one (returns `Ok(true)`) or a cancellation (`Ok(false)`).
fn transfer<S, D>(
    source: &mut S,
    destination: &mut D,
    options: &SessionOptions,
    observer: &mut dyn SyncObserver,
    source_knowledge: &Knowledge,
    destination_knowledge: &Knowledge,
    stats: &mut SessionStats,
) -> Result<bool, SyncError>
where
    S: ChangeSource + ?Sized,
    D: ChangeDestination + ?Sized,
{
    // A destination that already knows everything the source knows has nothing to
    // receive and nothing to learn (and contains the source's forgotten knowledge,
    // which lies inside the source's knowledge): no batch at all.
    if destination_knowledge.contains_knowledge(source_knowledge) {
        return Ok(true);
    }
    let epoch = source.begin_sending()?;
    destination.note_peer_epoch(source.replica_id(), epoch)?;
    let forgotten = source.forgotten_knowledge()?;
    let full_enumeration = !destination_knowledge.contains_knowledge(&forgotten);
    if full_enumeration && options.recovery == ForgottenRecovery::Abort {
        return Err(SyncError::FullEnumerationNeeded {
            source_replica: source.replica_id(),
            destination: destination.replica_id(),
        });
    }
    stats.full_enumeration = full_enumeration;
    let mut start: Vec<u8> = Vec::new();
    let mut total = None;
    loop {
        if options.cancel.is_cancelled() {
            stats.cancelled = true;
            return Ok(false);
        }
        let request = BatchRequest {
            destination: destination.replica_id(),
            destination_knowledge,
            start: &start,
            batch_size: options.batch_size,
            full_enumeration,
        };
        if stats.batches == 0 {
            total = source.estimate_changes(&request)?;
        }
        let batch = source.change_batch(&request)?;
        let sent = batch.change_count() as u64;
        let bytes: u64 = batch
            .changes()
            .map(|c| (c.item.as_bytes().len() + c.data.as_ref().map_or(0, Vec::len)) as u64)
            .sum();
        let is_last = batch.is_last();
        let next_start = batch
            .groups()
            .last()
            .and_then(|g| g.range().end().map(<[u8]>::to_vec));
        if !is_last
            && next_start
                .as_deref()
                .is_none_or(|next| next <= start.as_slice())
        {
            return Err(SyncError::BadBatch {
                source_replica: source.replica_id(),
                reason:
                    "a batch that is not the last must end its groups ahead of where it started"
                        .into(),
            });
        }
        let outcome = destination.process_batch(batch, &options.policy, observer)?;
        stats.add_batch(sent, bytes, &outcome);
        observer.progress(&Progress {
            source: source.replica_id(),
            destination: destination.replica_id(),
            batches_done: stats.batches,
            changes_done: stats.changes_sent,
            changes_total: total,
        });
        if is_last {
            return Ok(true);
        }
        start = next_start.unwrap_or_default();
    }
}

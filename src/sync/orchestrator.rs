//! The orchestrator: runs one or two sessions between a local and a remote replica,
//! pulling batches from the source and pushing them through the destination.

use super::{
    BatchRequest, ChangeDestination, ChangeSource, Clock, Direction, ForgottenRecovery, Peer,
    Progress, SessionOptions, SessionRole, SessionStats, SyncError, SyncObserver, SyncReport,
};
use std::sync::mpsc;

use crate::model::{ChangeBatch, Knowledge, MAX_CHANGES_PER_BATCH};

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
    S: ChangeSource + Send + ?Sized,
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
    // The destination first: one that refuses (in another session, restored) does so
    // before the source has bumped or flushed anything.
    destination.begin_session_as(&source_info, SessionRole::Destination)?;
    if let Err(e) = source.begin_session_as(&destination_info, SessionRole::Source) {
        let _ = destination.end_session(false);
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
    S: ChangeSource + Send + ?Sized,
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
    let (source_id, destination_id) = (source.replica_id(), destination.replica_id());
    let (batch_size, cancel) = (options.batch_size, &options.cancel);
    let total = source.estimate_changes(&BatchRequest {
        destination: destination_id,
        destination_knowledge,
        start: &[],
        batch_size,
        full_enumeration,
    })?;
    // The source cuts batch k + 1 on a thread of its own while the destination applies
    // batch k: the next batch starts where this one's groups end, which the batch itself
    // says, so nothing the destination does can change it. A batch cut ahead and never
    // applied (the session failed or was cancelled meanwhile) is dropped: cutting
    // changes nothing at the source.
    std::thread::scope(|scope| {
        let (wanted, wants) = mpsc::sync_channel::<Vec<u8>>(1);
        let (cut, cuts) = mpsc::sync_channel::<Result<ChangeBatch, SyncError>>(1);
        scope.spawn(move || {
            for start in wants {
                let batch = source.change_batch(&BatchRequest {
                    destination: destination_id,
                    destination_knowledge,
                    start: &start,
                    batch_size,
                    full_enumeration,
                });
                let failed = batch.is_err();
                if cut.send(batch).is_err() || failed {
                    break;
                }
            }
        });
        let mut start: Vec<u8> = Vec::new();
        let _ = wanted.send(start.clone());
        loop {
            if cancel.is_cancelled() {
                stats.cancelled = true;
                return Ok(false);
            }
            // A closed channel means the cutting thread panicked: the scope re-raises
            // that panic when it ends.
            let batch = cuts.recv().map_err(|_| SyncError::BadBatch {
                source_replica: source_id,
                reason: "the source stopped while cutting a batch".into(),
            })??;
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
                    source_replica: source_id,
                    reason:
                        "a batch that is not the last must end its groups ahead of where it started"
                            .into(),
                });
            }
            if !is_last {
                let _ = wanted.send(next_start.clone().unwrap_or_default());
            }
            let outcome = destination.process_batch(batch, &options.policy, observer)?;
            stats.add_batch(sent, bytes, &outcome);
            observer.progress(&Progress {
                source: source_id,
                destination: destination_id,
                batches_done: stats.batches,
                changes_done: stats.changes_sent,
                changes_total: total,
            });
            if is_last {
                return Ok(true);
            }
            start = next_start.unwrap_or_default();
        }
    })
}

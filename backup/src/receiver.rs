//! The epoch receiver: feeds the session's chunks to its decoder, commits
//! each complete epoch to the image store, and acks it. A chunk counts as
//! the primary's word only once the decoder accepted it for the current
//! session. Any refusal ends the session (the primary resyncs); the image
//! stays at its last commit, or, if a commit failed half way, is left
//! unpromotable until the resync repairs it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use tonic::Status;
use understudy_checkpoint::epoch::{EpochDecoder, Received};
use understudy_checkpoint::{EpochError, EpochKind};
use understudy_common::ids::{Epoch, Generation, SessionId};
use understudy_common::status::StateKind;
use understudy_common::wire;
use understudy_proto::{Ack, EpochChunk};

use crate::replica::{Follower, LogAck};
use crate::{Phase, Session, SessionPhase, Shared};

/// The one mapping from epoch errors to gRPC status.
fn epoch_status(e: &EpochError) -> Status {
    match e {
        EpochError::StaleGeneration { image, .. } => wire::deposed(*image, wire::chain(e)),
        EpochError::WrongVm { .. } | EpochError::WrongRamSize { .. } => {
            Status::invalid_argument(wire::chain(e))
        }
        _ => Status::data_loss(format!(
            "epoch refused, image kept at its last commit: {}",
            wire::chain(e)
        )),
    }
}

/// Feeds one chunk to the session's decoder; commits and returns an ack
/// when an epoch completes.
pub(crate) fn receive_chunk(shared: &Shared, msg: EpochChunk) -> Result<Option<Ack>, Status> {
    let result = receive(shared, msg);
    if !matches!(result, Ok(None)) {
        // An epoch committed, or the session ended: a handover waiting for
        // its epoch (`service::await_commit`) looks again.
        shared.commits.notify_waiters();
    }
    result
}

fn receive(shared: &Shared, msg: EpochChunk) -> Result<Option<Ack>, Status> {
    let started = Instant::now();
    let mut state = shared.lock();
    let standby = match &mut state.phase {
        Phase::Standby(s) => s,
        Phase::Promoted(_) | Phase::HandedOver(_) | Phase::Postcopy(_) | Phase::Failed(_) => {
            return Err(shared.deposed(Generation(msg.generation)));
        }
    };
    if Generation(msg.generation) < standby.generation {
        return Err(shared.deposed(Generation(msg.generation)));
    }
    let Some(session) = standby
        .session
        .as_mut()
        .filter(|s| SessionId::from_raw(msg.session) == Some(s.id) && s.decoder.is_some())
    else {
        return Err(Status::failed_precondition(
            "no such replication session: say Hello first",
        ));
    };
    // A session that stood down commits nothing more: a late commit would
    // record the image as not retired again, and a restarted backup could
    // then resume a VM that runs elsewhere.
    if session.phase == SessionPhase::Retired {
        session.decoder = None;
        return Err(Status::failed_precondition(
            "this replication session said goodbye: it takes no more epochs (say Hello for a \
             new one)",
        ));
    }
    if !msg.trace_segment.is_empty() {
        return receive_segment(shared, session, msg, standby.generation);
    }
    let Some(decoder) = session.decoder.as_mut() else {
        return Err(Status::failed_precondition("no replication session"));
    };
    if let Some(follower) = session.follower.as_mut() {
        follower.chunk_arrived();
    }
    let received = decoder.push(&msg.chunk, &standby.store);
    let staged = match received {
        Ok(Received::NeedMore) => {
            shared.watch.heard();
            count_bytes(shared, &msg);
            return Ok(None);
        }
        Ok(Received::Complete(staged)) => staged,
        Err(e) => {
            session.decoder = None;
            return Err(epoch_status(&e));
        }
    };
    shared.watch.heard();
    count_bytes(shared, &msg);
    let epoch = staged.header.epoch;
    let checkpoint = staged.header.kind == EpochKind::Checkpoint;
    let applied = understudy_common::fault::check("backup.apply")
        .map_err(|point| format!("injected fault ({point})"))
        .and_then(|()| standby.store.apply(&staged).map_err(|e| wire::chain(&e)));
    if let Err(why) = applied {
        session.decoder = None;
        // A commit that failed half way leaves pages of the new epoch beside
        // the old record: not promotable until the resync.
        if let Err(e) = standby.store.promotable() {
            shared.watch.arm(false);
            shared.host.stats.set_state(
                StateKind::NotPromotable,
                format!("image not promotable: {}", wire::chain(&e)),
            );
            shared.host.stats.protected.store(false, Ordering::Release);
        }
        tracing::error!(epoch, error = %why, "cannot commit the epoch; the session ends");
        return Err(Status::internal(format!(
            "cannot commit epoch {epoch}: {why}"
        )));
    }
    if let Some(follower) = session.follower.as_mut() {
        follower.fault_in_ahead(&staged, standby.store.ram_bytes());
    }
    session.decoder = Some(EpochDecoder::with_buffers(staged.recycle()));
    if checkpoint {
        if session.phase == SessionPhase::Syncing {
            session.phase = SessionPhase::Protected;
        }
        // A checkpoint of a live session: the image is the newest state the
        // primary may have released (whatever made it stale is over).
        standby.stale = None;
        // A migration's image is the source's to hand over: silence never
        // promotes it (the source's own backup protects the VM meanwhile).
        shared.watch.arm(session.protected() && !session.migration);
        shared.host.stats.protected.store(true, Ordering::Release);
        shared.host.stats.set_last_epoch(Epoch(epoch));
        if session.migration {
            shared.host.stats.set_state(
                StateKind::Incoming,
                format!("incoming: the VM's state up to epoch {epoch} is here"),
            );
        } else {
            shared
                .host
                .stats
                .set_state(StateKind::Protecting, "protecting");
        }
    }
    let mut log = LogAck::default();
    if checkpoint && let Some(follower) = session.follower.as_mut() {
        let started = std::time::Instant::now();
        match follower.checkpoint_committed(&standby.store) {
            Ok(Some(exit)) => {
                let took_ms = started.elapsed().as_secs_f64() * 1e3;
                tracing::info!(
                    epoch,
                    took_ms,
                    "replica started from the checkpoint at exit {exit}"
                )
            }
            Ok(None) => {}
            // The VM stays protected by this checkpoint; output waits for
            // the next ones.
            Err(why) => {
                let why = wire::chain(&why);
                tracing::error!(epoch, %why, "replay mode: no replica follows the log");
                shared.host.stats.set_state(
                    StateKind::ReplicaStopped,
                    format!("no replica follows the log: {why}"),
                );
            }
        }
        log = replay_ack(shared, follower);
    }
    shared.host.stats.epochs.fetch_add(1, Ordering::Relaxed);
    shared.host.stats.metrics.epochs.inc();
    Ok(Some(Ack {
        epoch,
        generation: standby.generation.0,
        commit_micros: started.elapsed().as_micros() as u64,
        log_exits: log.log_exits,
        replica_exits: log.replica_exits,
        want_checkpoint: log.want_checkpoint,
        ..Ack::default()
    }))
}

/// Replay mode: one segment of the primary's log. Kept and fed to the
/// replica, and acked: the primary releases the output it covers.
fn receive_segment(
    shared: &Shared,
    session: &mut Session,
    msg: EpochChunk,
    generation: Generation,
) -> Result<Option<Ack>, Status> {
    let Some(follower) = session.follower.as_mut() else {
        return Err(Status::invalid_argument(
            "a trace segment in a checkpoint-mode session: the primary's Hello asked for \
             checkpoint mode",
        ));
    };
    let len = msg.trace_segment.len() as u64;
    if let Err(why) = follower.segment(msg.trace_segment.into()) {
        session.decoder = None;
        return Err(Status::data_loss(format!(
            "trace segment refused, the primary must resync: {}",
            wire::chain(&why)
        )));
    }
    shared.watch.heard();
    let stats = &shared.host.stats;
    stats.bytes_shipped.fetch_add(len, Ordering::Relaxed);
    stats.metrics.log_bytes.inc_by(len);
    Ok(Some(log_ack(generation, replay_ack(shared, follower))))
}

/// An ack of log alone (no epoch).
fn log_ack(generation: Generation, log: LogAck) -> Ack {
    Ack {
        epoch: 0,
        generation: generation.0,
        commit_micros: 0,
        log_exits: log.log_exits,
        replica_exits: log.replica_exits,
        want_checkpoint: log.want_checkpoint,
        ..Ack::default()
    }
}

/// Replay mode, between messages: an ack of log alone when the replica
/// moved since the last ack (see `Follower::progressed`).
pub(crate) fn progress_ack(shared: &Shared, session_id: SessionId) -> Option<Ack> {
    let mut state = shared.lock();
    let Phase::Standby(standby) = &mut state.phase else {
        return None;
    };
    let generation = standby.generation;
    let session = standby
        .session
        .as_mut()
        .filter(|s| s.id == session_id && s.decoder.is_some())?;
    let follower = session.follower.as_mut()?;
    follower.pump();
    if !follower.progressed() {
        return None;
    }
    Some(log_ack(generation, replay_ack(shared, follower)))
}

/// The replica's news (did it stop?), its lag for the status, and what the
/// next ack says about the log.
fn replay_ack(shared: &Shared, follower: &mut Follower) -> LogAck {
    let stats = &shared.host.stats;
    if let Some(why) = follower.pump() {
        tracing::error!(%why, "replay mode: the replica stopped; protecting by checkpoints until the next one commits and a new replica starts");
        stats.metrics.replica_restarts.inc();
        stats.set_state(
            StateKind::ReplicaStopped,
            format!("{why}; asked the primary for a checkpoint"),
        );
    }
    let (exits, age) = follower.lag();
    stats.replica_lag_exits.store(exits, Ordering::Relaxed);
    stats
        .replica_lag_us
        .store(age.as_micros() as u64, Ordering::Relaxed);
    follower.ack()
}

fn count_bytes(shared: &Shared, msg: &EpochChunk) {
    shared
        .host
        .stats
        .bytes_shipped
        .fetch_add(msg.chunk.len() as u64, Ordering::Relaxed);
}

//! The backup's gRPC Replication service: the primary's `Hello` (answered by
//! `hello::decide`), the epoch stream (fed to `receiver`), `Goodbye`,
//! `Probe` and `Handover`. Liveness is not here: heartbeats are datagrams
//! the `watch` thread handles.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use understudy_checkpoint::epoch::EpochDecoder;
use understudy_common::auth::Access;
use understudy_common::heartbeat::SessionKey;
use understudy_common::ids::{Generation, Incarnation, ReplicationMode, Role, RunState, SessionId};
use understudy_common::status::StateKind;
use understudy_common::wire;
use understudy_proto::replication_server::Replication;
use understudy_proto::{
    Ack, EpochChunk, GoodbyeReply, GoodbyeRequest, HandoverReply, HandoverRequest, HelloReply,
    HelloRequest, PROTOCOL_VERSION, PrepareHandoverReply, PrepareHandoverRequest, ProbeReply,
    ProbeRequest,
};

use crate::hello::{self, Claim, Decision, Facts, Kept};
use crate::promotion::{self, Trigger};
use crate::{Phase, Session, SessionPhase, Shared};

#[derive(Clone)]
pub(crate) struct ReplicationService(pub(crate) Arc<Shared>);

/// Replay mode: how often the replica's progress is acked while no message
/// comes (only when it moved).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;

impl ReplicationService {
    /// Opens a Replicate stream whose request `req` (its metadata, no
    /// message) came from the pair's other host: each message of
    /// `incoming` goes to the receiver, and the acks come out of the
    /// channel returned.
    pub(crate) fn open_replicate<S>(
        &self,
        req: &Request<()>,
        mut incoming: S,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Ack, Status>>, Status>
    where
        S: Stream<Item = Result<EpochChunk, Status>> + Send + Unpin + 'static,
    {
        self.0
            .opts
            .auth
            .check(req, "Replication.Replicate", Access::PeerHost)?;
        // Tests: a host that took the session but never answers its stream
        // (`backup.replicate~ms` stalls here).
        understudy_common::fault::check("backup.replicate")
            .map_err(|point| Status::unavailable(format!("injected fault ({point})")))?;
        let shared = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Ack, Status>>(64);
        tokio::spawn(async move {
            // Replay mode: the replica's progress goes to the primary even
            // while no message comes (it may be holding its guest back).
            let mut progress = tokio::time::interval(PROGRESS_EVERY);
            progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut session = None;
            // The session this stream carries (for a post-copy that loses it).
            let mut stream_session = None;
            loop {
                let next = tokio::select! {
                    next = incoming.next() => next,
                    // Post-copy: pages the VM here faulted on.
                    _ = shared.postcopy_notify.notified() => {
                        let wanted = shared
                            .postcopy
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_ref()
                            .filter(|p| Some(p.session) == stream_session)
                            .map(|p| p.take_requests())
                            .unwrap_or_default();
                        if !wanted.is_empty() {
                            let ack = Ack {
                                generation: shared.generation().0,
                                want_pages: wanted,
                                ..Ack::default()
                            };
                            if tx.send(Ok(ack)).await.is_err() {
                                break;
                            }
                        }
                        continue;
                    }
                    _ = progress.tick() => {
                        let Some(id) = session else { continue };
                        let shared2 = shared.clone();
                        let ack = tokio::task::block_in_place(|| {
                            crate::receiver::progress_ack(&shared2, id)
                        });
                        if let Some(ack) = ack
                            && tx.send(Ok(ack)).await.is_err()
                        {
                            break;
                        }
                        continue;
                    }
                };
                let msg = match next {
                    Some(Ok(msg)) => msg,
                    end => {
                        if let Some(Err(status)) = end {
                            // The peer hears why (malformed framing or an
                            // undecodable message), if it still listens.
                            tracing::debug!(%status, "replication stream ended");
                            let _ = tx.send(Err(status)).await;
                        }
                        break;
                    }
                };
                stream_session = SessionId::from_raw(msg.session);
                if msg.chunk.is_empty()
                    && msg.trace_segment.is_empty()
                    && msg.postcopy_pages.is_empty()
                    && !msg.postcopy_done
                {
                    // A stream's opening word: which session it carries (a
                    // post-copy learns of its source's loss by it).
                    continue;
                }
                // Replay-mode sessions only: checkpoint mode never takes
                // the state lock between its messages.
                if !msg.trace_segment.is_empty()
                    && let Some(id) = SessionId::from_raw(msg.session)
                {
                    session.get_or_insert(id);
                }
                let postcopy = !msg.postcopy_pages.is_empty() || msg.postcopy_done;
                let shared2 = shared.clone();
                let result = tokio::task::block_in_place(|| {
                    if postcopy {
                        crate::postcopy::receive(&shared2, &msg)
                    } else {
                        crate::receiver::receive_chunk(&shared2, msg)
                    }
                });
                match result {
                    Ok(None) => {}
                    Ok(Some(ack)) => {
                        if tx.send(Ok(ack)).await.is_err() {
                            break;
                        }
                    }
                    Err(status) => {
                        tracing::warn!(%status, "epoch refused; session ended, the primary must resync");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
            // However the stream ended (the peer's end, a refused message, or
            // acks nobody reads any more): a post-copy it carried is lost.
            if let Some(id) = stream_session {
                crate::postcopy::stream_ended(&shared, id);
            }
        });
        Ok(rx)
    }

    /// What the backup knows, for `hello::decide`.
    fn facts(&self, phase: &Phase) -> Facts {
        let shared = &self.0;
        let (kept, heard) = match phase {
            Phase::Standby(standby) => {
                let kept = standby.store.promotable().ok().map(|p| Kept {
                    incarnation: Incarnation::from_raw(p.incarnation),
                    epoch: p.epoch,
                });
                let heard = standby.session.is_some()
                    && shared.watch.since_heard() < shared.opts.heartbeat_timeout;
                (kept, heard)
            }
            Phase::Promoted(_) | Phase::HandedOver(_) | Phase::Postcopy(_) | Phase::Failed(_) => {
                (None, false)
            }
        };
        Facts {
            vm_id: shared.opts.vm_id.clone(),
            ram_bytes: shared.opts.ram_bytes,
            runs_here: !matches!(phase, Phase::Standby(_)),
            generation: shared.generation(),
            kept,
            primary_heard: heard,
            incoming: shared.opts.incoming,
            witness_key: shared
                .opts
                .witness
                .as_ref()
                .map(|w| w.key())
                .unwrap_or_default(),
        }
    }

    /// Starts a full sync for the caller's session; says whether the image
    /// holds only zeros as the sync starts (under the lock the sync's
    /// writes take: nothing changes it in between).
    fn start_sync(&self, req: &HelloRequest, incarnation: Incarnation) -> Result<bool, Status> {
        let shared = &self.0;
        let key = SessionKey::from_bytes(&req.heartbeat_key).ok_or_else(|| {
            Status::invalid_argument("the Hello carries no 32-byte heartbeat key")
        })?;
        let session_id = SessionId::from_raw(req.session).ok_or_else(|| {
            Status::invalid_argument("the Hello names no session (0): a primary picks a random one")
        })?;
        let mode = match understudy_proto::ReplicationMode::try_from(req.mode) {
            Ok(understudy_proto::ReplicationMode::Checkpoint) => ReplicationMode::Checkpoint,
            Ok(understudy_proto::ReplicationMode::Replay) => ReplicationMode::Replay,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown replication mode {} in Hello: this backup knows checkpoint and \
                     replay; upgrade it to the primary's version",
                    req.mode
                )));
            }
        };
        // A sync is about to write the image: reading it ahead would only
        // compete with it now.
        shared.warm_stop.store(true, Ordering::Relaxed);
        let mut state = shared.lock();
        let Phase::Standby(standby) = &mut state.phase else {
            return Err(shared.deposed(Generation(req.generation)));
        };
        standby
            .store
            .begin_sync(req.generation, incarnation.raw())
            .map_err(|e| Status::internal(format!("cannot start the sync: {}", wire::chain(&e))))?;
        let zeroed = standby.store.holds_only_zeros();
        let buffers = match standby.session.take() {
            Some(Session {
                decoder: Some(d), ..
            }) => d.into_buffers(),
            _ => std::mem::take(&mut standby.buffers),
        };
        standby.generation = Generation(req.generation);
        standby.stale = None;
        if req.migration && standby.postcopy_shell.is_none() {
            // The source may switch by post-copy (it decides later).
            standby.postcopy_shell = crate::build_postcopy_shell(shared.opts.ram_bytes);
        }
        standby.session = Some(Session {
            id: session_id,
            decoder: Some(EpochDecoder::with_buffers(buffers)),
            phase: SessionPhase::Syncing,
            migration: req.migration,
            // Replay mode: a backup's replica follows the log, and so does a
            // replay migration's destination (a VM replicated by its log
            // migrates only by replay).
            follower: (mode == ReplicationMode::Replay).then(crate::replica::Follower::new),
        });
        shared.host.stats.set_mode(mode);
        shared.watch.arm(false);
        shared.watch.set_session(Some((session_id, key)));
        shared.set_generation(Generation(req.generation), false);
        let stats = &shared.host.stats;
        stats.set_incarnation(Some(incarnation));
        shared.host.holding(incarnation);
        stats.protected.store(false, Ordering::Release);
        stats.link_up.store(true, Ordering::Release);
        let (kind, state, what) = if req.migration {
            (
                StateKind::Incoming,
                "incoming: receiving a live migration",
                "a live migration starts: receiving the VM",
            )
        } else {
            (
                StateKind::Syncing,
                "syncing",
                "primary connected: full sync",
            )
        };
        stats.set_state(kind, state);
        tracing::info!(
            session = req.session,
            generation = req.generation,
            %incarnation,
            image_zeroed = zeroed,
            "{what}"
        );
        Ok(zeroed)
    }
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        self.0
            .opts
            .auth
            .check(&req, "Replication.Hello", Access::PeerHost)?;
        let req = req.into_inner();
        let shared = &self.0;
        let previous = req.previous.as_ref().and_then(|p| {
            Some((
                Incarnation::from_raw(p.incarnation)?,
                RunState::from_proto(p.state)?,
            ))
        });
        let claim = Claim {
            protocol_version: req.protocol_version,
            vm_id: &req.vm_id,
            ram_bytes: req.ram_bytes,
            generation: Generation(req.generation),
            incarnation: Incarnation::from_raw(req.incarnation),
            previous,
            migration: req.migration,
            witness_key: &req.witness_key,
        };
        let decision = {
            let state = shared.lock();
            hello::decide(&self.facts(&state.phase), &claim)
        };
        match decision {
            Decision::Sync => {
                let incarnation = claim
                    .incarnation
                    .ok_or_else(|| Status::invalid_argument("no incarnation"))?;
                let image_zeroed = self.start_sync(&req, incarnation)?;
                Ok(Response::new(HelloReply {
                    protocol_version: PROTOCOL_VERSION,
                    generation: req.generation,
                    image_status: "syncing".into(),
                    // The decoder hashes every page it stages and checks the
                    // epoch's digest: no body CRC needed on Pages chunks.
                    pages_by_hash: true,
                    handover_awaits_commit: true,
                    prepares_handover: true,
                    image_zeroed,
                    // Tests: a host before it (the source then waits for
                    // the tail's ack).
                    handover_awaits_log: understudy_common::fault::check("backup.hello.awaits_log")
                        .is_ok(),
                }))
            }
            Decision::Deposed(_) => Err(shared.deposed(claim.generation)),
            Decision::ResumeHere => {
                tracing::warn!(
                    "the primary's host restarted and lost the VM it protected: resuming it here"
                );
                let shared2 = shared.clone();
                match tokio::task::block_in_place(|| promotion::promote(&shared2, Trigger::Restart))
                {
                    Ok(_) => Err(shared.deposed(claim.generation)),
                    Err(e) => {
                        // Nothing changed; the image is not resumable, so the
                        // VM is lost either way: say so, and let the
                        // operator decide (the primary waits).
                        tracing::error!(error = %wire::chain(&e), "cannot resume the VM the primary lost");
                        Err(wire::holds_vm(format!(
                            "the VM this backup holds cannot be resumed ({}); an operator decides: \
                             `understudyctl discard-image --config FILE` lets this primary boot a new VM",
                            wire::chain(&e)
                        )))
                    }
                }
            }
            Decision::Wait(why) => Err(Status::unavailable(why)),
            Decision::HoldsVm(why) => {
                shared
                    .host
                    .stats
                    .set_state(StateKind::Standby, format!("standby: {why}"));
                Err(wire::holds_vm(why))
            }
            Decision::Refuse {
                invalid_argument,
                message,
            } => Err(if invalid_argument {
                Status::invalid_argument(message)
            } else {
                Status::failed_precondition(message)
            }),
        }
    }

    type ReplicateStream = AckStream;

    async fn replicate(
        &self,
        req: Request<Streaming<EpochChunk>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        // The daemon's server reads this RPC without tonic's copies
        // (`crate::stream`); this path serves a `ReplicationServer` built
        // without it, with the same checks and the same session.
        let (metadata, extensions, incoming) = req.into_parts();
        let acks = self.open_replicate(&Request::from_parts(metadata, extensions, ()), incoming)?;
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(acks),
        )))
    }

    async fn goodbye(
        &self,
        req: Request<GoodbyeRequest>,
    ) -> Result<Response<GoodbyeReply>, Status> {
        self.0
            .opts
            .auth
            .check(&req, "Replication.Goodbye", Access::PeerHost)?;
        // Tests: a backup slow to answer (`backup.goodbye.slow~ms`: the
        // destination's restore ahead runs meanwhile), and one that will not
        // stand down (the source keeps the VM).
        understudy_common::fault::check_async("backup.goodbye.slow")
            .await
            .map_err(|point| Status::unavailable(format!("injected fault ({point})")))?;
        understudy_common::fault::check("backup.goodbye")
            .map_err(|point| Status::unavailable(format!("injected fault ({point})")))?;
        let req = req.into_inner();
        let shared = &self.0;
        // A switch's goodbye: once its final checkpoint committed (or the
        // session can commit nothing more: the checks below answer then).
        // Only the session's own primary may make it wait: a deposed one
        // learns that first.
        let generation = Generation(req.generation);
        if req.after_epoch > 0
            && let Some(session) = SessionId::from_raw(req.session)
        {
            shared.standby_for(&mut shared.lock().phase, generation)?;
            let wait = Duration::from_millis(req.commit_wait_millis.into()).min(MAX_COMMIT_WAIT);
            await_commit(shared, session, req.after_epoch, wait, "goodbye").await?;
        }
        let mut state = shared.lock();
        let standby = shared.standby_for(&mut state.phase, generation)?;
        let committed_epoch = standby.store.committed_epoch().unwrap_or(0);
        let Some(session) = standby
            .session
            .as_mut()
            .filter(|s| SessionId::from_raw(req.session) == Some(s.id))
        else {
            return Ok(Response::new(GoodbyeReply { committed_epoch: 0 }));
        };
        session.phase = SessionPhase::Retired;
        shared.watch.arm(false);
        // Persisted: a restarted backup must not resume a VM stopped on purpose.
        if let Err(e) = standby.store.retire() {
            tracing::warn!(error = %wire::chain(&e), "cannot record the retirement of the image");
        }
        shared.host.stats.set_state(
            StateKind::PrimaryStopped,
            "primary stopped on purpose: not promoting",
        );
        tracing::info!(
            committed_epoch,
            "primary said goodbye: it stopped on purpose, no promotion"
        );
        Ok(Response::new(GoodbyeReply { committed_epoch }))
    }

    async fn probe(&self, req: Request<ProbeRequest>) -> Result<Response<ProbeReply>, Status> {
        self.0
            .opts
            .auth
            .check(&req, "Replication.Probe", Access::PeerHost)?;
        // Lock-free: a probe is answered even while a commit waits for the disk.
        let shared = &self.0;
        Ok(Response::new(ProbeReply {
            generation: shared.generation().0,
            role: if shared.runs_here.load(Ordering::Acquire) {
                Role::Primary
            } else {
                Role::Backup
            }
            .name()
            .into(),
        }))
    }

    async fn prepare_handover(
        &self,
        req: Request<PrepareHandoverRequest>,
    ) -> Result<Response<PrepareHandoverReply>, Status> {
        self.0
            .opts
            .auth
            .check(&req, "Replication.PrepareHandover", Access::PeerHost)?;
        let req = req.into_inner();
        let shared = &self.0;
        if shared.opts.handover_unavailable.is_some() {
            return Err(Status::failed_precondition(
                "prepare refused: this host takes no handover",
            ));
        }
        let generation = Generation(req.generation);
        shared.standby_for(&mut shared.lock().phase, generation)?;
        let Some(session) = SessionId::from_raw(req.session) else {
            return Err(Status::invalid_argument(
                "prepare refused: it names no session (0)",
            ));
        };
        let wait = Duration::from_millis(req.commit_wait_millis.into()).min(MAX_COMMIT_WAIT);
        await_commit_then(
            shared,
            session,
            req.epoch,
            wait,
            "prepare",
            AtDeadline::Refuse,
        )
        .await?;
        let shared2 = shared.clone();
        let took = tokio::task::block_in_place(|| {
            promotion::prepare_ahead(&shared2, generation, session, req.epoch)
        })
        .map_err(|e| {
            Status::failed_precondition(format!("prepare refused: {}", wire::chain(&e)))
        })?;
        Ok(Response::new(PrepareHandoverReply {
            prepare_micros: took.as_micros() as u64,
        }))
    }

    async fn handover(
        &self,
        req: Request<HandoverRequest>,
    ) -> Result<Response<HandoverReply>, Status> {
        self.0
            .opts
            .auth
            .check(&req, "Replication.Handover", Access::PeerHost)?;
        let req = req.into_inner();
        let shared = &self.0;
        if let Some(why) = &shared.opts.handover_unavailable {
            return Err(Status::failed_precondition(format!(
                "handover refused: {why}"
            )));
        }
        {
            let mut state = shared.lock();
            let standby = shared.standby_for(&mut state.phase, Generation(req.generation))?;
            if Generation(req.generation) != standby.generation {
                return Err(Status::failed_precondition(format!(
                    "handover refused: generation {} is not this session's ({})",
                    req.generation, standby.generation
                )));
            }
        }
        // After the generation: a deposed caller learns that first.
        let Some(handover_session) = SessionId::from_raw(req.session) else {
            return Err(Status::invalid_argument(
                "handover refused: it names no session (0)",
            ));
        };
        tracing::info!(
            epoch = req.epoch,
            "primary hands the VM over (switchover): promoting now"
        );
        let shared2 = shared.clone();
        if req.postcopy {
            if !shared.opts.incoming {
                return Err(Status::failed_precondition(
                    "handover refused: post-copy is for a live migration's destination \
                     (`understudyd primary --incoming`)",
                ));
            }
            return match tokio::task::block_in_place(|| {
                crate::postcopy::promote(
                    &shared2,
                    handover_session,
                    req.epoch,
                    &req.valid_pages,
                    &req.zero_pages,
                    &req.postcopy_state,
                )
            }) {
                Ok(p) => Ok(Response::new(HandoverReply {
                    generation: p.generation.0,
                    resume_micros: p.resumed.as_micros() as u64,
                })),
                Err(e) => {
                    tracing::warn!(error = %wire::chain(&e), "post-copy handover refused");
                    Err(Status::failed_precondition(format!(
                        "handover refused: {}",
                        wire::chain(&e)
                    )))
                }
            };
        }
        let wait = Duration::from_millis(req.commit_wait_millis.into()).min(MAX_COMMIT_WAIT);
        if req.commit_wait_millis > 0 && !req.replay {
            await_commit(shared, handover_session, req.epoch, wait, "handover").await?;
        }
        if req.replay && req.log_exits > 0 {
            await_log(shared, handover_session, req.log_exits, wait).await?;
        }
        let trigger = Trigger::Handover {
            session: handover_session,
            epoch: req.epoch,
            replay: req.replay,
        };
        match tokio::task::block_in_place(|| promotion::promote(&shared2, trigger)) {
            Ok(Some(p)) => Ok(Response::new(HandoverReply {
                generation: p.generation.0,
                resume_micros: p.resumed.as_micros() as u64,
            })),
            Ok(None) => Err(Status::failed_precondition(
                "handover refused: this backup holds no promotable checkpoint",
            )),
            Err(e) => {
                tracing::warn!(error = %wire::chain(&e), "handover refused");
                Err(Status::failed_precondition(format!(
                    "handover refused: {}",
                    wire::chain(&e)
                )))
            }
        }
    }
}

/// The longest a handover waits for its epoch's commit, whatever it asks.
const MAX_COMMIT_WAIT: Duration = Duration::from_secs(60);

/// A handover (or a goodbye) sent with its migration's final epoch still
/// on the way (`commit_wait_millis`): returns once `epoch` committed, or
/// once the session can commit nothing more (the promotion's, or the
/// goodbye's, own checks then answer). Refuses at the end of `wait`, after
/// closing the session under the state lock, so the epoch cannot commit
/// after the refusal: the source, told no, resumes the VM, and nothing
/// here may run it. `what` names the request in the refusal.
pub(crate) async fn await_commit(
    shared: &Shared,
    session: SessionId,
    epoch: u64,
    wait: Duration,
    what: &str,
) -> Result<(), Status> {
    await_commit_then(shared, session, epoch, wait, what, AtDeadline::CloseSession).await
}

/// A replay handover sent with the log's tail still on its way
/// (`log_exits`): returns once the session's log reaches that exit, or once
/// the session takes no more log (the promotion's own checks then answer).
/// Refuses at the end of `wait`, after closing the session under the state
/// lock, so that no more log arrives after the refusal: the source, told
/// no, resumes the VM, and the replica here must never run past what it
/// had.
pub(crate) async fn await_log(
    shared: &Shared,
    session: SessionId,
    exits: u64,
    wait: Duration,
) -> Result<(), Status> {
    let held = |live: &Session| live.follower.as_ref().map_or(0, |f| f.received_exits());
    await_session(
        shared,
        session,
        wait,
        |_, live| held(live) >= exits,
        |_, live| {
            let held = held(live);
            live.decoder = None;
            tracing::warn!(
                exits,
                held,
                ?wait,
                "handover refused: the log's tail did not arrive in time; the session is closed"
            );
            Status::failed_precondition(format!(
                "handover refused: the log up to exit {exits} did not arrive within {wait:?} \
                 (held: up to exit {held}); the session is closed, so it never will"
            ))
        },
    )
    .await
}

/// Waits until `ready` (given the image's committed epoch and the session)
/// says so for the live `session`, looking again at each commit and each log
/// segment received (`shared.commits`). Ok at once when the session is gone
/// or the host no longer stands by (the request's own checks then answer).
/// At the end of `wait`, the error `refuse` makes (it may close the session,
/// under the state lock).
async fn await_session(
    shared: &Shared,
    session: SessionId,
    wait: Duration,
    mut ready: impl FnMut(Option<u64>, &Session) -> bool,
    mut refuse: impl FnMut(Option<u64>, &mut Session) -> Status,
) -> Result<(), Status> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = shared.commits.notified();
        tokio::pin!(notified);
        // Registered before the look: a commit right after it still wakes us.
        notified.as_mut().enable();
        {
            let mut state = shared.lock();
            let Phase::Standby(standby) = &mut state.phase else {
                return Ok(());
            };
            let committed = standby.store.committed_epoch();
            let Some(live) = standby
                .session
                .as_mut()
                .filter(|s| s.id == session && s.decoder.is_some())
            else {
                return Ok(());
            };
            if ready(committed, live) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(refuse(committed, live));
            }
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

/// What [`await_commit_then`] does when its wait runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtDeadline {
    /// Close the session (the epoch can then never commit) and refuse: for
    /// a request whose refusal the source acts on.
    CloseSession,
    /// Only refuse: for a request that changes nothing (a prepare).
    Refuse,
}

/// [`await_commit`], with what to do at the deadline.
pub(crate) async fn await_commit_then(
    shared: &Shared,
    session: SessionId,
    epoch: u64,
    wait: Duration,
    what: &str,
    at_deadline: AtDeadline,
) -> Result<(), Status> {
    await_session(
        shared,
        session,
        wait,
        |committed, _| committed >= Some(epoch),
        |committed, live| {
            if at_deadline == AtDeadline::Refuse {
                return Status::deadline_exceeded(format!(
                    "{what} refused: epoch {epoch} did not commit within {wait:?} \
                     (committed: {committed:?})"
                ));
            }
            live.decoder = None;
            tracing::warn!(
                epoch,
                ?wait,
                "{what} refused: its epoch did not commit in time; the session is closed"
            );
            Status::failed_precondition(format!(
                "{what} refused: epoch {epoch} did not commit within {wait:?} (committed: \
                 {committed:?}); the session is closed, so it never will"
            ))
        },
    )
    .await
}

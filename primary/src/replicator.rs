//! The replicator thread: owns the VM and the sender state, so the pause path
//! never waits on the async runtime. Per session: the initial sync rounds
//! while the guest runs, then the checkpoint loop (pause, harvest, copy,
//! capture, resume, encode, ship), back-pressure on unacked epochs, the
//! graceful stop, and the switchover's final checkpoint and handover.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use understudy_checkpoint::PAGE_SIZE;
use understudy_checkpoint::epoch::{EncodeError, EpochKind, SenderState};
use understudy_common::backlog::Backlog;
use understudy_common::console::ConsoleLog;
use understudy_common::fault;
use understudy_common::ids::{Epoch, RunState, SessionId};
use understudy_common::payload::CheckpointPayload;
use understudy_common::status::StateKind;
use understudy_proto::{EpochChunk, HandoverReply, SwitchoverReply};
use understudy_vmm::deterministic::Sealed;
use understudy_vmm::wp::{WpError, WriteProtectCopy};
use understudy_vmm::{Vm, VmEnd, VmError};

use crate::migration::{
    FinalSent, LogStep, Migration, MigrationError, MigrationMode, Step, SwitchFigures,
    handover_until_answered,
};
use crate::peer::{
    Goodbye, HandoverKind, HandoverOutcome, PostcopyHandover, handover, handover_to, say_goodbye,
};
use crate::{
    MAX_SYNC_ROUNDS, Phase, STREAM_EVERY_PAGES, SYNC_CONVERGED_PAGES, SessionLink, Shared,
    SwitchoverResponder,
};

/// A failure inside the primary that it cannot carry on from. It ends the
/// primary like a crash: no goodbye (the backup promotes), a non-zero exit
/// (systemd restarts the host, which then rejoins as the backup).
#[derive(Debug, thiserror::Error)]
pub enum InternalError {
    /// The vCPU did not pause.
    #[error("cannot pause the VM")]
    Pause(#[source] VmError),
    /// KVM's dirty log cannot be read.
    #[error("cannot read the dirty log")]
    DirtyLog(#[source] VmError),
    /// Pages or device state cannot be captured.
    #[error("cannot capture the VM's state")]
    Capture(#[source] VmError),
    /// The vCPU did not resume.
    #[error("cannot resume the VM")]
    Resume(#[source] VmError),
    /// The VM state does not encode.
    #[error("cannot encode the VM's state")]
    EncodeState(#[source] understudy_vmm::state::StateError),
    /// The checkpoint does not encode.
    #[error("cannot encode the checkpoint")]
    Encode(#[source] EncodeError),
    /// A test's fault injection (`UNDERSTUDY_FAULTS`).
    #[error("injected fault ({0})")]
    Fault(&'static str),
}

/// Registers `vm`'s RAM for the copy after the resume, if allowed and the
/// kernel can (it cannot for a disk file mapped shared: a promoted host's
/// image, unless `image_dir` is on tmpfs).
fn late_copy_for(vm: &Vm, allowed: bool) -> LateCopy {
    if !allowed {
        tracing::info!("checkpoints copy their pages in the stop (copy_after_resume = false)");
        return LateCopy::Off;
    }
    match WriteProtectCopy::new(vm.ram()) {
        Ok(wp) => LateCopy::Ready(Arc::new(wp)),
        Err(e) => {
            let hint = if vm.ram().is_anonymous() {
                ""
            } else {
                " (it is mapped from a file; a host that took the VM over runs on its image, \
                 which can be write-protected in an image_dir on tmpfs)"
            };
            tracing::info!(
                error = %understudy_common::wire::chain(&e),
                "checkpoints copy their pages in the stop: this VM's RAM cannot be write-protected{hint}"
            );
            LateCopy::Off
        }
    }
}

/// Where the VM runs after a switchover or migration failed before the VM
/// ran elsewhere, for the operator: here, unless this host was deposed
/// meanwhile.
fn after_a_failed_switch(phase: Phase) -> String {
    match phase {
        Phase::Fenced(generation) => format!(
            "this host was deposed (its backup promoted, generation {generation}): the VM \
             runs there, not here"
        ),
        _ => "the VM runs on here".to_owned(),
    }
}

fn fault_point(point: &'static str) -> Result<(), InternalError> {
    fault::check(point).map_err(InternalError::Fault)
}

/// A step of the copy after the resume behind its fault point. Its failure
/// is not an internal error (the primary falls back to copying in the
/// stop), so it comes back as its chain of causes, for the log.
fn late_copy_step<T>(
    point: &'static str,
    step: impl FnOnce() -> Result<T, WpError>,
) -> Result<T, String> {
    fault_point(point).map_err(|e| e.to_string())?;
    step().map_err(|e| understudy_common::wire::chain(&e))
}

/// How long a switch whose session broke waits for the session's task to
/// say how it ended (it notices a break within a heartbeat interval).
const SESSION_VERDICT_WAIT: Duration = Duration::from_millis(500);

/// How long a checkpoint may wait for its ack before the session counts as
/// broken (a backup that is slow but alive acks well within it).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a clean stop waits for its last checkpoint's ack.
const STOP_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Replay mode: a checkpoint is due after this much log, whatever the time
/// (a restarted backup's replica catches up from it quickly).
const LOG_BYTES_PER_CHECKPOINT: usize = 8 << 20;
/// Replay mode: how often the log forwarder looks at the session, the
/// backup's lag and the next checkpoint while no segment comes.
const FORWARD_POLL: Duration = Duration::from_millis(5);

/// The thread that owns the VM.
pub(crate) struct Replicator {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    /// The session the last checkpoint was acked in (for the goodbye).
    last_session: Option<SessionId>,
    vm: Option<Vm>,
    output: crossbeam_channel::Receiver<u8>,
    log: Arc<ConsoleLog>,
    next_epoch: u64,
    staging: understudy_vmm::StagingBuffer,
    page: Box<[u8; PAGE_SIZE]>,
    /// The guest is paused because more console output than allowed is
    /// held unreleased (see [`Replicator::hold_for_output`]).
    held_for_output: bool,
    /// Replay mode: the VM's sealed log segments.
    trace: Option<crossbeam_channel::Receiver<Sealed>>,
    /// The console offset of the VM's first output byte since its boot or
    /// restore (a segment's `output_end` counts from there).
    output_base: u64,
    /// Replay mode: segments shipped that the backup's replica has not
    /// replayed yet.
    unreplayed: Backlog,
    /// Replay mode: log bytes shipped since the last checkpoint.
    log_since_checkpoint: usize,
    /// Replay mode: the guest is paused until the replica catches up.
    held_for_lag: bool,
    /// A live migration under way.
    migration: Option<Migration>,
    /// The console and device payload of the last checkpoint (a migration's
    /// switch sends the same state to the destination).
    last_payload: Vec<u8>,
    /// Copying checkpoints after the resume: not tried yet, refused (why,
    /// once logged), or ready.
    late_copy: LateCopy,
    /// The copy in the stop's measured time per page, in ns (what the copy
    /// after the resume must beat).
    copy_ns_per_page: f64,
}

/// Whether checkpoints may copy their pages after the guest resumed
/// ([`understudy_vmm::wp`]).
enum LateCopy {
    /// Not tried yet (the RAM is registered at the first checkpoint).
    Untried,
    /// Off by configuration, or the kernel refused this VM's RAM.
    Off,
    Ready(Arc<WriteProtectCopy>),
}

/// The copy in the stop's time per page before any was measured (a page
/// copy on these machines: 0.3–0.8 µs).
const INITIAL_COPY_NS_PER_PAGE: f64 = 400.0;

/// Why a session ended, from the replicator's side.
enum SessionEnd {
    Broken,
    Stop,
    VmEnded(VmEnd),
    /// A switchover: the backup runs the VM now.
    HandedOver,
    /// The primary cannot go on (see [`InternalError`]).
    Failed(InternalError),
}

impl Replicator {
    pub(crate) fn new(
        shared: Arc<Shared>,
        vm: Vm,
        output: crossbeam_channel::Receiver<u8>,
        log: Arc<ConsoleLog>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            shared,
            runtime,
            last_session: None,
            vm: Some(vm),
            output,
            log,
            next_epoch: 1,
            staging: understudy_vmm::StagingBuffer::new(),
            page: Box::new([0; PAGE_SIZE]),
            held_for_output: false,
            trace: None,
            output_base: 0,
            unreplayed: Backlog::default(),
            log_since_checkpoint: 0,
            held_for_lag: false,
            migration: None,
            last_payload: Vec::new(),
            late_copy: LateCopy::Untried,
            copy_ns_per_page: INITIAL_COPY_NS_PER_PAGE,
        }
    }

    /// Replay mode: the VM records its log into `trace`; `output_taken` of
    /// its output bytes are in the console log already.
    pub(crate) fn with_trace(
        mut self,
        trace: Option<crossbeam_channel::Receiver<Sealed>>,
        output_taken: u64,
    ) -> Self {
        self.trace = trace;
        self.output_base = self.log.end().saturating_sub(output_taken);
        self
    }

    fn vm(&self) -> &Vm {
        self.vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("the VM lives until run() returns"))
    }

    pub(crate) fn run(mut self) {
        let end = match self.main_loop() {
            Ok(end) => end,
            Err(e) => {
                // Like a crash: no goodbye, so the backup promotes.
                tracing::error!(error = %understudy_common::wire::chain(&e), "the primary cannot go on: ending like a crash, the backup takes over");
                self.shared.fail(e);
                None
            }
        };
        // A clean stop or a guest that ended by itself: the VM is stopped on
        // purpose (recorded first, so a restart boots anew), and the backup
        // is told not to promote while the session is still up. A fenced or
        // failed primary says nothing, nor one that handed the VM over.
        if self.shared.phase() == Phase::Stopping || end.is_some() {
            self.shared.record(RunState::Stopped);
            if let Some(session) = self.last_session {
                let opts = self.shared.opts.clone();
                let generation = self.shared.generation;
                self.runtime
                    .block_on(say_goodbye(&opts, generation, session, None, None));
            }
        }
        let vm = self.vm.take();
        if let Some(vm) = vm {
            let how = vm.stop();
            tracing::info!(reason = %how, "VM stopped");
        }
        if let Some(end) = end {
            *self
                .shared
                .vm_ended
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(end);
        }
        // Output still unreleased: a fence drops it (done in fence()); a clean
        // stop releases what the last ack covered (done on that ack).
        self.shared.done.cancel();
    }

    fn main_loop(&mut self) -> Result<Option<VmEnd>, InternalError> {
        loop {
            if self.shared.phase().ending() {
                return Ok(None);
            }
            if let Some(end) = self.vm().ended() {
                return Ok(Some(end));
            }
            let Some(link) = self.current_session() else {
                if self.migration_active() {
                    let deadline = Instant::now() + self.shared.opts.epoch_interval;
                    if let Some(end) = self.migrate(None, deadline) {
                        return match end {
                            SessionEnd::VmEnded(end) => Ok(Some(end)),
                            SessionEnd::Failed(e) => Err(e),
                            _ => Ok(None),
                        };
                    }
                    self.drain_output_unprotected();
                    continue;
                }
                self.idle();
                continue;
            };
            self.drain_output_unprotected();
            match self.run_session(&link) {
                SessionEnd::Broken => link.broken.store(true, Ordering::Release),
                SessionEnd::Stop | SessionEnd::HandedOver => return Ok(None),
                SessionEnd::VmEnded(end) => return Ok(Some(end)),
                SessionEnd::Failed(e) => return Err(e),
            }
        }
    }

    fn current_session(&self) -> Option<SessionLink> {
        self.shared
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|l| !l.broken.load(Ordering::Acquire))
    }

    /// No session: passes the guest's output on as it comes (released or
    /// held, by the policy; a VM just taken over prints at once), and looks
    /// for a session at least every epoch interval.
    fn idle(&mut self) {
        self.drop_log();
        let woke = crossbeam_channel::select! {
            recv(self.output) -> first => Some(first),
            // A session was set: the main loop starts it now.
            recv(self.shared.session_set.1) -> _ => None,
            default(self.shared.opts.epoch_interval) => None,
        };
        match woke {
            Some(Ok(first)) => {
                let mut bytes = vec![first];
                bytes.extend(self.output.try_iter());
                self.log.append(&bytes);
                self.shared.releaser.produced_unprotected();
            }
            // The guest is gone; the loop sees it end.
            Some(Err(crossbeam_channel::RecvError)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            None => {}
        }
        self.apply_output_bound();
    }

    /// Replay mode without a session: the log is of no use to anyone (a
    /// new session starts from a checkpoint).
    fn drop_log(&mut self) {
        if let Some(trace) = &self.trace {
            trace.try_iter().for_each(drop);
        }
        self.unreplayed.clear();
    }

    /// Between sessions the guest runs on; its output follows the policy.
    fn drain_output_unprotected(&mut self) {
        let bytes: Vec<u8> = self.output.try_iter().collect();
        if !bytes.is_empty() {
            self.log.append(&bytes);
            self.shared.releaser.produced_unprotected();
        }
        self.apply_output_bound();
    }

    /// Whether the guest must stay paused: more console output is held
    /// unreleased than `max_held_output` (no backup acks it, under
    /// hold-output). Pausing bounds the memory it takes and the size of
    /// every checkpoint that carries it; the guest runs again once output
    /// goes out (a backup acks). Reports changes.
    fn hold_for_output(&mut self) -> bool {
        let held = self.log.unreleased_len();
        self.shared
            .stats
            .held_output
            .store(held as u64, Ordering::Relaxed);
        let hold = held > self.shared.opts.max_held_output;
        if hold != self.held_for_output {
            self.held_for_output = hold;
            if hold {
                tracing::warn!(
                    held_bytes = held,
                    limit = self.shared.opts.max_held_output,
                    "console output held past its limit: the guest is paused until a backup acks it"
                );
                self.shared.stats.set_state(
                    StateKind::OutputBound,
                    format!(
                        "guest paused: {} KiB of console output held, no backup acks it",
                        held >> 10
                    ),
                );
            } else {
                tracing::info!("held console output went out: the guest runs again");
            }
        }
        hold
    }

    /// Outside checkpoints: pause or resume the guest by [`Self::hold_for_output`].
    fn apply_output_bound(&mut self) {
        let hold = self.hold_for_output();
        let Some(vm) = self.vm.as_ref() else { return };
        let result = if hold { vm.pause() } else { vm.resume() };
        if let Err(e) = result
            && vm.ended().is_none()
        {
            tracing::error!(error = %e, "cannot pause or resume the guest for held output");
        }
    }

    fn send(&self, link: &SessionLink, chunks: Vec<Vec<u8>>) -> bool {
        for chunk in chunks {
            let msg = EpochChunk {
                session: link.id.raw(),
                generation: self.shared.generation,
                chunk: chunk.into(),
                ..Default::default()
            };
            if link.broken.load(Ordering::Acquire) || link.chunks.blocking_send(msg).is_err() {
                return false;
            }
        }
        true
    }

    fn run_session(&mut self, link: &SessionLink) -> SessionEnd {
        let opts = self.shared.opts.clone();
        let ram_pages = (opts.ram_bytes / PAGE_SIZE) as u32;
        let sync_started = Instant::now();
        // A new session owes acks only for its own epochs, and its backup
        // has none of the log yet.
        *self.shared.acked() = Epoch(self.next_epoch).previous();
        self.link_rate().new_session();
        self.shared.log_acked.store(0, Ordering::Release);
        self.shared.replica_exits.store(0, Ordering::Release);
        self.shared.want_checkpoint.store(false, Ordering::Release);
        self.unreplayed.clear();
        let mut sender = match crate::peer::sync_sender(
            &opts,
            ram_pages,
            self.shared.generation,
            link.pages_by_hash,
            link.image_zeroed,
        ) {
            Ok(s) => s,
            Err(e) => return SessionEnd::Failed(InternalError::Encode(e)),
        };
        // Clear the dirty log, then copy everything while the guest runs: any
        // page written after the clear is dirty again for the next round.
        if let Err(e) = self.vm().harvest_dirty() {
            return SessionEnd::Failed(InternalError::DirtyLog(e));
        }
        let all: Vec<u32> = (0..ram_pages).collect();
        match self.sync_round(link, &mut sender, &all, 1) {
            Ok(true) => {}
            Ok(false) => return SessionEnd::Broken,
            Err(e) => return SessionEnd::Failed(e),
        }
        for round in 2..=MAX_SYNC_ROUNDS {
            let dirty = match self.vm().harvest_dirty() {
                Ok(d) => d,
                Err(e) => return SessionEnd::Failed(InternalError::DirtyLog(e)),
            };
            let pages = dirty.page_numbers();
            tracing::debug!(round, pages = pages.len(), "sync round");
            match self.sync_round(link, &mut sender, &pages, round) {
                Ok(true) => {}
                Ok(false) => return SessionEnd::Broken,
                Err(e) => return SessionEnd::Failed(e),
            }
            if pages.len() <= SYNC_CONVERGED_PAGES {
                break;
            }
        }
        // Checkpoints: the first completes the sync and protects the VM.
        let mut next_tick = Instant::now();
        let mut protected = false;
        loop {
            // Replay migration: this checkpoint is also the destination's
            // base, read from the guest before it runs on.
            let base = self.migration.as_ref().is_some_and(Migration::base_wanted);
            let paused_at = Instant::now();
            match self.checkpoint(link, &mut sender, base, !protected) {
                Ok(true) => {}
                Ok(false) => {
                    // A base's checkpoint left the guest paused: it runs on
                    // (the migration fails with the session, see `migrate`).
                    if base {
                        self.resume_after_failed_switchover();
                    }
                    return SessionEnd::Broken;
                }
                Err(end) => return end,
            }
            if base {
                self.send_replay_base(paused_at);
            }
            if !protected {
                if !self.wait_acked(link, self.next_epoch - 1) {
                    return if self.shared.phase().ending() {
                        SessionEnd::Stop
                    } else {
                        SessionEnd::Broken
                    };
                }
                protected = true;
                self.shared.releaser.session_protected();
                // Everything released from here on waits for acks: the
                // backup's image is the newest state clients can have seen.
                // No output waits for the record that says so (until it is
                // on disk it says "released unprotected", which only makes
                // a restart here more careful), so its fsync is not put
                // between this checkpoint and the next.
                self.shared.record_later(RunState::Protected);
                self.last_session = Some(link.id);
                self.shared.stats.protected.store(true, Ordering::Release);
                self.shared
                    .stats
                    .set_state(StateKind::Protected, "protected");
                if let Some(seat) = self.shared.seat.clone() {
                    self.runtime
                        .spawn(crate::claim_protected(self.shared.clone(), seat));
                }
                // To a tenth of a millisecond: an idle VM's sync takes a few.
                let ms = |d: Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
                tracing::info!(
                    setup_ms = ms(link.hello_took + sync_started.duration_since(link.opening)),
                    sync_ms = ms(sync_started.elapsed()),
                    epoch = self.next_epoch - 1,
                    "VM protected"
                );
            }
            if self.shared.phase() == Phase::Stopping {
                // Graceful stop: the last checkpoint is acked; its output is
                // out (a backup that does not answer in time is not waited for).
                self.wait_acked_for(link, self.next_epoch - 1, STOP_ACK_TIMEOUT);
                return SessionEnd::Stop;
            }
            if let Some(responder) = self.shared.take_switchover()
                && let Some(end) = self.hand_over(link, &mut sender, responder)
            {
                return end;
            }
            // Back-pressure: at most max_in_flight epochs unacked.
            let oldest_allowed = (self.next_epoch - 1).saturating_sub(opts.max_in_flight);
            if oldest_allowed > 0 && !self.wait_acked(link, oldest_allowed) {
                return if self.shared.phase().ending() {
                    SessionEnd::Stop
                } else {
                    SessionEnd::Broken
                };
            }
            if self.trace.is_some() {
                // Replay mode: the log carries the VM until the next
                // checkpoint is due.
                match self.forward_log(link, Instant::now() + opts.checkpoint_interval) {
                    Ok(true) => {}
                    Ok(false) => return SessionEnd::Broken,
                    Err(end) => return end,
                }
                if matches!(self.shared.phase(), Phase::Fenced(_)) {
                    return SessionEnd::Stop;
                }
                continue;
            }
            next_tick += opts.epoch_interval;
            if self.migration_active() {
                // A live migration uses the time between checkpoints, and at
                // least a quarter of an epoch interval: when the backup's acks
                // hold the loop past the next tick (a backup slower than the
                // epoch rate), the migration got no time at all and never
                // finished, nor failed (0 bytes sent in 40 s).
                let deadline = next_tick.max(Instant::now() + opts.epoch_interval / 4);
                if let Some(end) = self.migrate(Some((link, &mut sender)), deadline) {
                    return end;
                }
            }
            let now = Instant::now();
            if next_tick > now {
                std::thread::sleep(next_tick - now);
            } else {
                next_tick = now;
            }
            if matches!(self.shared.phase(), Phase::Fenced(_)) {
                return SessionEnd::Stop;
            }
        }
    }

    /// A planned switchover: the final checkpoint with the VM left paused,
    /// its ack, then `Handover`. The VM never runs here again unless the
    /// backup certainly did not promote (it refused, or the request never
    /// reached it). Returns how the session ends, or None to carry on.
    fn hand_over(
        &mut self,
        link: &SessionLink,
        sender: &mut SenderState,
        responder: SwitchoverResponder,
    ) -> Option<SessionEnd> {
        let started = Instant::now();
        let shared = self.shared.clone();
        let fail = |responder: SwitchoverResponder, why: String| {
            let whereabouts = after_a_failed_switch(shared.phase());
            tracing::warn!(%why, "switchover failed; {whereabouts}");
            let _ = responder.send(Err(tonic::Status::unavailable(format!(
                "switchover failed, {whereabouts}: {why}"
            ))));
        };
        let bytes_before = self.shared.stats.bytes_shipped.load(Ordering::Relaxed);
        let pages = match self.checkpoint(link, sender, true, false) {
            Ok(true) => self.staging.len() / PAGE_SIZE,
            Ok(false) => {
                self.await_session_verdict(link);
                self.resume_after_failed_switchover();
                fail(
                    responder,
                    "the session broke during the final checkpoint".into(),
                );
                return Some(SessionEnd::Broken);
            }
            Err(end) => {
                fail(responder, "the final checkpoint failed".into());
                return Some(end);
            }
        };
        let final_bytes = self.shared.stats.bytes_shipped.load(Ordering::Relaxed) - bytes_before;
        let epoch = self.next_epoch - 1;
        if !self.wait_acked(link, epoch) {
            if matches!(self.shared.phase(), Phase::Fenced(_)) {
                fail(responder, "deposed during the switchover".into());
                return Some(SessionEnd::Stop);
            }
            self.resume_after_failed_switchover();
            fail(
                responder,
                format!("the backup did not ack the final checkpoint {epoch}"),
            );
            return Some(SessionEnd::Broken);
        }
        let opts = self.shared.opts.clone();
        let generation = self.shared.generation;
        // From here the backup's promotion is the expected outcome.
        if !self.shared.begin_handover() {
            fail(responder, "the primary is stopping".into());
            return Some(SessionEnd::Stop);
        }
        let outcome = self.runtime.block_on(handover(
            &opts,
            generation,
            link.id,
            epoch,
            link.live_channel(),
        ));
        let seen = match self.shared.phase() {
            Phase::HandingOver { seen } => seen,
            _ => 0,
        };
        let not_handing_over = || self.shared.end_handover(None);
        let reply = match outcome {
            HandoverOutcome::Done(reply) => reply,
            // The answer says no, yet the backup was seen promoted: it runs
            // the VM (from our final checkpoint); ours stays stopped.
            HandoverOutcome::NotTaken(why) if seen > generation => {
                tracing::warn!(%why, generation = seen, "the handover was refused, yet the backup promoted: it runs the VM");
                HandoverReply {
                    generation: seen,
                    resume_micros: 0,
                }
            }
            HandoverOutcome::NotTaken(why) => {
                not_handing_over();
                self.resume_after_failed_switchover();
                fail(responder, why);
                return None;
            }
            HandoverOutcome::Deposed(g) => {
                not_handing_over();
                self.shared.fence(g);
                fail(responder, format!("deposed by generation {g}"));
                return Some(SessionEnd::Stop);
            }
            HandoverOutcome::Unknown(why) => {
                // The backup may have promoted. Either way the VM must not
                // run here again: if the request was lost, our silence
                // promotes the backup from this same final checkpoint.
                tracing::warn!(%why, "no answer to the handover: the backup promotes either way (handover or silence)");
                HandoverReply {
                    generation: generation + 1,
                    resume_micros: 0,
                }
            }
        };
        let downtime = started.elapsed();
        self.shared.end_handover(Some(reply.generation));
        self.shared.record(RunState::Gone);
        self.shared.stats.metrics.switchovers.inc();
        self.shared.stats.set_state(
            StateKind::HandedOver,
            format!("handed over at epoch {epoch}"),
        );
        // All output up to the final checkpoint went out with its ack; the
        // clients follow the guest to its new host.
        self.log.disconnect_clients();
        tracing::info!(
            epoch,
            generation = reply.generation,
            downtime_ms = downtime.as_secs_f64() * 1e3,
            "switchover: the backup runs the VM now"
        );
        let _ = responder.send(Ok(SwitchoverReply {
            generation: reply.generation,
            final_epoch: epoch,
            downtime_micros: downtime.as_micros() as u64,
            resume_micros: reply.resume_micros,
            final_pages: pages as u64,
            final_bytes,
            new_primary: opts.backup.to_string(),
        }));
        Some(SessionEnd::HandedOver)
    }

    /// Waits, briefly, until the task of `link`'s broken session has ended:
    /// a refusal from a promoted backup fences this host there, and the
    /// replicator may see the break first (a send that failed).
    fn await_session_verdict(&self, link: &SessionLink) {
        let ended = || {
            matches!(self.shared.phase(), Phase::Fenced(_))
                || !matches!(
                    &*self.shared.session.lock().unwrap_or_else(|p| p.into_inner()),
                    Some(l) if l.id == link.id
                )
        };
        let guard = self.shared.acked();
        let _ = self
            .shared
            .acked_cv
            .wait_timeout_while(guard, SESSION_VERDICT_WAIT, |_| !ended());
    }

    /// After a switch that failed before the VM ran elsewhere, the guest
    /// runs on here, unless this host was deposed meanwhile (the session
    /// broke because its backup promoted): then it stays paused and the
    /// host stops, fenced.
    fn resume_after_failed_switchover(&mut self) {
        if let Phase::Fenced(generation) = self.shared.phase() {
            tracing::warn!(
                generation,
                "the switch failed because the backup promoted: the VM stays paused here"
            );
            return;
        }
        // The guest runs again: a hold for the replica's lag starts anew.
        self.held_for_lag = false;
        match self.vm().resume() {
            Ok(()) => tracing::info!("the VM runs on here after the failed switch"),
            Err(e) => tracing::error!(error = %e, "cannot resume the VM after a failed switchover"),
        }
    }

    /// Waits until `epoch` is acked. False if the session broke or we stop.
    fn wait_acked(&self, link: &SessionLink, epoch: u64) -> bool {
        self.wait_acked_for(link, epoch, ACK_TIMEOUT)
    }

    /// [`Self::wait_acked`], for at most `timeout`.
    fn wait_acked_for(&self, link: &SessionLink, epoch: u64, timeout: Duration) -> bool {
        let epoch = Epoch(epoch);
        let guard = self.shared.acked();
        let deadline = Instant::now() + timeout;
        let (guard, _) = self
            .shared
            .acked_cv
            .wait_timeout_while(guard, timeout, |acked| {
                !epoch.covered_by(*acked)
                    && !link.broken.load(Ordering::Acquire)
                    && !matches!(self.shared.phase(), Phase::Fenced(_))
                    && Instant::now() < deadline
            })
            .unwrap_or_else(|p| p.into_inner());
        epoch.covered_by(*guard)
    }

    /// Ships `pages` read from the running guest as one sync round, in
    /// epochs of [`SYNC_EPOCH_PAGES`](crate::SYNC_EPOCH_PAGES).
    fn sync_round(
        &mut self,
        link: &SessionLink,
        sender: &mut SenderState,
        pages: &[u32],
        round: usize,
    ) -> Result<bool, InternalError> {
        // The first round reads all of RAM: pages the guest never touched
        // are zero without reading them (the dirty log was cleared first).
        let untouched = if round == 1 {
            self.vm().ram().untouched_pages()
        } else {
            None
        };
        // Of those, the pages the backup's image holds as zeros already are
        // left out before the round is cut into epochs: each would be left
        // out of its epoch anyway, and an idle VM of 1 GiB over a new image
        // went as 128 epochs with next to nothing in them, ~8 ms of a sync
        // of 8–11 (the checkpoint after may follow any round, or none).
        let kept: Vec<u32>;
        let pages = match &untouched {
            Some(u) => {
                kept = pages
                    .iter()
                    .copied()
                    .filter(|&p| !(u[p as usize] && sender.holds_zero(p)))
                    .collect();
                &kept[..]
            }
            None => pages,
        };
        for (n, batch) in pages.chunks(crate::SYNC_EPOCH_PAGES).enumerate() {
            let progress = (round, n * crate::SYNC_EPOCH_PAGES, pages.len());
            if !self.sync_epoch(link, sender, batch, untouched.as_deref(), progress)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// One epoch of a sync round; `progress` = (round, pages before this
    /// epoch, pages in the round), for the status.
    fn sync_epoch(
        &mut self,
        link: &SessionLink,
        sender: &mut SenderState,
        pages: &[u32],
        untouched: Option<&[bool]>,
        progress: (usize, usize, usize),
    ) -> Result<bool, InternalError> {
        let (round, before, total) = progress;
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let mut enc = sender
            .begin(epoch, EpochKind::SyncRound)
            .map_err(InternalError::Encode)?;
        for (i, &p) in pages.iter().enumerate() {
            let vm = self
                .vm
                .as_ref()
                .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
            if untouched.is_some_and(|u| u[p as usize]) {
                enc.add_zero_page(p)
            } else {
                vm.ram()
                    .copy_page(p as usize, &mut self.page)
                    .map_err(|e| InternalError::Capture(e.into()))?;
                enc.add_page(p, &self.page)
            }
            .map_err(InternalError::Encode)?;
            if i % STREAM_EVERY_PAGES == STREAM_EVERY_PAGES - 1 {
                if !self.send(link, enc.take_chunks()) {
                    return Ok(false);
                }
                // Unprotected output goes out during a long sync too.
                self.drain_output_unprotected();
            }
            if i % (STREAM_EVERY_PAGES * 8) == 0 {
                self.shared.stats.set_state(
                    StateKind::Syncing,
                    format!(
                        "syncing: round {round}, {}% of {total} pages",
                        (before + i) * 100 / total.max(1),
                    ),
                );
            }
        }
        let encoded = enc.finish(&[]).map_err(InternalError::Encode)?;
        self.shared
            .stats
            .bytes_shipped
            .fetch_add(encoded.report.bytes_out, Ordering::Relaxed);
        self.shared.sent.set(Some(Epoch(epoch)));
        self.shared.record_lag(*self.shared.acked());
        Ok(self.send(link, encoded.chunks))
    }

    /// Takes and ships one checkpoint. `Ok(false)`: the session broke.
    /// In replay mode the log sealed before its pause goes first (`first`,
    /// the session's first checkpoint: dropped, the backup starts here).
    fn checkpoint(
        &mut self,
        link: &SessionLink,
        sender: &mut SenderState,
        leave_paused: bool,
        first: bool,
    ) -> Result<bool, SessionEnd> {
        let epoch = self.next_epoch;
        // A migration's switch or base takes this checkpoint's payload (they
        // are the callers that leave the guest paused).
        let keep_payload = leave_paused && self.migration.is_some();
        let vm = self.vm.as_ref().ok_or(SessionEnd::Stop)?;
        let ended_or = |vm: &Vm, e: InternalError| match vm.ended() {
            Some(end) => SessionEnd::VmEnded(end),
            None => SessionEnd::Failed(e),
        };
        // Registering the RAM (once) is not the guest's stop's business.
        if matches!(self.late_copy, LateCopy::Untried) {
            self.late_copy = late_copy_for(vm, self.shared.opts.copy_after_resume);
        }
        let started = Instant::now();
        // The vCPU thread captures its state while this thread harvests and
        // copies (`save_state` below collects it).
        if let Err(e) = fault_point("primary.pause")
            .and_then(|()| vm.pause_saving().map_err(InternalError::Pause))
        {
            return Err(ended_or(vm, e));
        }
        // Replay mode: the log up to the pause (sealed before the pause was
        // reported); what is sealed from here on follows this checkpoint.
        let before_pause: Vec<Sealed> = self
            .trace
            .as_ref()
            .map(|t| t.try_iter().collect())
            .unwrap_or_default();
        let late = match &self.late_copy {
            // A guest left paused gains nothing from a copy after the resume.
            LateCopy::Ready(wp) if !leave_paused => Some(wp.clone()),
            _ => None,
        };
        let (staging, copy_ns_per_page) = (&mut self.staging, &mut self.copy_ns_per_page);
        let mut late_failed = false;
        let captured = (|| {
            fault_point("primary.dirty_log")?;
            let dirty = vm.harvest_dirty().map_err(InternalError::DirtyLog)?;
            let pages = dirty.page_numbers();
            staging
                .set_len(pages.len() * PAGE_SIZE)
                .map_err(|e| InternalError::Capture(e.into()))?;
            let protected = match late.as_ref().map(|wp| {
                late_copy_step("primary.protect", || {
                    wp.protect_if_shorter(&pages, *copy_ns_per_page)
                })
            }) {
                Some(Ok(protected)) => protected,
                Some(Err(error)) => {
                    // What was protected is unprotected again; this and
                    // later checkpoints copy in the stop.
                    tracing::warn!(%error, "cannot write-protect the dirty pages: copying in the stop from now on");
                    late_failed = true;
                    None
                }
                None => None,
            };
            if protected.is_none() {
                let copy_started = Instant::now();
                for (i, &p) in pages.iter().enumerate() {
                    let page: &mut [u8; PAGE_SIZE] = (&mut staging
                        [i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                        .try_into()
                        .unwrap_or_else(|_| unreachable!("a page-sized slice"));
                    vm.ram()
                        .copy_page(p as usize, page)
                        .map_err(|e| InternalError::Capture(e.into()))?;
                }
                if pages.len() >= 64 {
                    let ns = copy_started.elapsed().as_nanos() as f64 / pages.len() as f64;
                    *copy_ns_per_page = 0.75 * *copy_ns_per_page + 0.25 * ns;
                }
            }
            fault_point("primary.capture")?;
            let state = vm.save_state(false).map_err(InternalError::Capture)?;
            Ok::<_, InternalError>((pages, state, protected))
        })();
        if let (Ok((pages, _, _)), Some(migration)) = (&captured, self.migration.as_mut()) {
            migration.dirtied(pages);
        }
        // Output up to the pause belongs to this epoch.
        let bytes: Vec<u8> = self.output.try_iter().collect();
        let end_offset = self.log.append(&bytes);
        let leave_paused = self.hold_for_output() || self.held_for_lag || leave_paused;
        let vm = self.vm.as_ref().ok_or(SessionEnd::Stop)?;
        let resumed = if leave_paused {
            Ok(())
        } else {
            vm.resume().map_err(InternalError::Resume)
        };
        let pause = started.elapsed();
        let (pages, state, protected) = match (captured, resumed) {
            (Ok(c), Ok(())) => c,
            (Err(e), _) | (_, Err(e)) => return Err(ended_or(vm, e)),
        };
        // The dirty pages protected in the stop are copied now, while the
        // guest runs; a write to one not copied yet waits for its copy.
        if late_failed {
            self.late_copy = LateCopy::Off;
        }
        if let Some(protected) = protected {
            // An injected failure drops `protected` uncopied: its pages are
            // unprotected, as after a copy that fails half way.
            let copied = late_copy_step("primary.late_copy", || {
                protected.copy(vm.ram(), &mut self.staging)
            });
            match copied {
                Ok(report) => self
                    .shared
                    .stats
                    .record_copy_after_resume(report.pages, report.faults),
                Err(error) => {
                    // The staged pages may be a mix: this checkpoint is not
                    // sent. Its dirty log is spent, so the session starts
                    // over (a new session syncs all of RAM), copying in the
                    // stop from now on.
                    tracing::error!(%error, "cannot copy the checkpoint's pages after the resume: resyncing, copying in the stop from now on");
                    self.late_copy = LateCopy::Off;
                    return Ok(false);
                }
            }
        }
        self.next_epoch += 1;
        // Output is keyed by epoch, or in replay mode by exit index (the
        // log's acks say up to which exit the backup holds the VM).
        let release_key = match (&self.trace, state.deterministic) {
            (Some(_), Some(d)) => {
                if !first {
                    for segment in before_pause {
                        if !self.ship_segment(link, segment) {
                            return Ok(false);
                        }
                    }
                }
                self.log_since_checkpoint = 0;
                d.exit_index
            }
            _ => epoch,
        };
        let (console_offset, console_out) = self.log.unreleased();
        let vm_state = match fault_point("primary.encode")
            .and_then(|()| state.encode().map_err(InternalError::EncodeState))
        {
            Ok(s) => s,
            Err(e) => return Err(SessionEnd::Failed(e)),
        };
        let payload = CheckpointPayload {
            vm_state,
            console_offset,
            console_out,
        }
        .encode();
        if keep_payload {
            self.last_payload.clone_from(&payload);
        }
        self.shared
            .releaser
            .checkpoint_taken(release_key, end_offset);
        self.shared
            .taken_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((epoch, started));
        let encode = |sender: &mut SenderState, staging: &[u8]| {
            let mut enc = sender.begin(epoch, EpochKind::Checkpoint)?;
            for (i, &p) in pages.iter().enumerate() {
                let page: &[u8; PAGE_SIZE] = staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("a page-sized slice"));
                enc.add_page(p, page)?;
            }
            enc.finish(&payload)
        };
        sender.set_link_rate(self.link_rate().rate());
        let encoded = match encode(sender, &self.staging) {
            Ok(e) => e,
            Err(e) => return Err(SessionEnd::Failed(InternalError::Encode(e))),
        };
        self.shared
            .stats
            .set_codec(crate::link_rate::codec_status(sender));
        self.shared.stats.record_epoch(
            pause,
            pages.len(),
            encoded.report.bytes_in,
            encoded.report.bytes_out,
        );
        self.shared.sent.set(Some(Epoch(epoch)));
        self.shared.record_lag(*self.shared.acked());
        self.link_rate()
            .shipped(epoch, Instant::now(), encoded.report.bytes_out);
        Ok(self.send(link, encoded.chunks))
    }

    fn link_rate(&self) -> std::sync::MutexGuard<'_, crate::link_rate::LinkRate> {
        self.shared
            .link_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Replay mode: ships one log segment; the output its exits produced
    /// goes out once the backup acks the log up to its end exit.
    fn ship_segment(&mut self, link: &SessionLink, segment: Sealed) -> bool {
        // The output the segment covers was written before it was sealed:
        // into the log with it, so that its ack can release it.
        let bytes: Vec<u8> = self.output.try_iter().collect();
        if !bytes.is_empty() {
            self.log.append(&bytes);
        }
        let end = (self.output_base + segment.output_end).min(self.log.end());
        self.shared
            .releaser
            .checkpoint_taken(segment.exits_end, end);
        self.unreplayed.push(segment.exits_end);
        let len = segment.bytes.len();
        self.log_since_checkpoint += len;
        let stats = &self.shared.stats;
        stats.bytes_shipped.fetch_add(len as u64, Ordering::Relaxed);
        stats.metrics.log_bytes.inc_by(len as u64);
        // Replay migration, after the base: the destination's replica
        // follows the same log.
        if let Some(m) = self.migration.as_mut()
            && m.log_phase()
            && let Err(why) = m.forward_segment(&segment.bytes, segment.exits_end)
            && let Some(m) = self.migration.take()
        {
            self.fail_migration(m, format!("lost the destination: {}", why.explain()));
        }
        let msg = EpochChunk {
            session: link.id.raw(),
            generation: self.shared.generation,
            trace_segment: segment.bytes.into(),
            ..Default::default()
        };
        !link.broken.load(Ordering::Acquire) && link.chunks.blocking_send(msg).is_ok()
    }

    /// Replay mode, between checkpoints: ships the log as it is sealed
    /// until the next checkpoint is due (`due`, the log's volume, or the
    /// backup asked for one), the role changes, or the session breaks
    /// (`Ok(false)`). Holds the guest while the backup's replica lags too
    /// far behind.
    fn forward_log(&mut self, link: &SessionLink, due: Instant) -> Result<bool, SessionEnd> {
        let result = self.forward_log_until(link, due);
        // A hold lasts through checkpoints (they leave the guest paused),
        // not past the session.
        if self.held_for_lag && !matches!(result, Ok(true)) {
            self.held_for_lag = false;
            if let Some(vm) = self.vm.as_ref()
                && let Err(e) = vm.resume()
                && vm.ended().is_none()
            {
                tracing::error!(error = %e, "cannot resume the guest held for the replica's lag");
            }
        }
        result
    }

    fn forward_log_until(&mut self, link: &SessionLink, due: Instant) -> Result<bool, SessionEnd> {
        let Some(trace) = self.trace.clone() else {
            return Ok(true);
        };
        loop {
            if link.broken.load(Ordering::Acquire) {
                return Ok(false);
            }
            if self.shared.phase() != Phase::Running || self.shared.switchover_waiting() {
                return Ok(true);
            }
            if let Some(end) = self.vm().ended() {
                return Err(SessionEnd::VmEnded(end));
            }
            if Instant::now() >= due
                || self.log_since_checkpoint >= LOG_BYTES_PER_CHECKPOINT
                || self.shared.want_checkpoint.swap(false, Ordering::AcqRel)
            {
                return Ok(true);
            }
            if self.migration_active() {
                match self.replay_migration_tick(link) {
                    Tick::Carry => {}
                    Tick::Checkpoint => return Ok(true),
                    Tick::Ended(end) => return Err(end),
                }
            }
            self.hold_for_lag();
            match trace.recv_timeout(FORWARD_POLL) {
                Ok(segment) => {
                    if !self.ship_segment(link, segment) {
                        return Ok(false);
                    }
                    while let Ok(segment) = trace.try_recv() {
                        if !self.ship_segment(link, segment) {
                            return Ok(false);
                        }
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                // The guest is gone; the next look sees it end.
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(FORWARD_POLL);
                }
            }
        }
    }

    /// Replay mode: how far the backup is behind the log (its replica's
    /// position, or without a replica the log it acked), in exits and in
    /// time since the oldest segment it has not caught up with was shipped.
    fn replica_lag(&mut self) -> (u64, Duration) {
        let replica = self.shared.replica_exits.load(Ordering::Acquire);
        let reference = if replica > 0 {
            replica
        } else {
            self.shared.log_acked.load(Ordering::Acquire)
        };
        let (exits, age) = self.unreplayed.behind(reference);
        let stats = &self.shared.stats;
        stats.replica_lag_exits.store(exits, Ordering::Relaxed);
        stats
            .replica_lag_us
            .store(age.as_micros() as u64, Ordering::Relaxed);
        (exits, age)
    }

    /// Back-pressure: pauses the guest while the replica is more than
    /// `max_replica_lag` behind, until it is within half of it (a failover
    /// replays at most that much log).
    fn hold_for_lag(&mut self) {
        let (exits, age) = self.replica_lag();
        let limit = self.shared.opts.max_replica_lag;
        let hold = if self.held_for_lag {
            age > limit / 2
        } else {
            age > limit
        };
        if hold == self.held_for_lag {
            return;
        }
        let Some(vm) = self.vm.as_ref() else { return };
        self.held_for_lag = hold;
        let result = if hold {
            tracing::warn!(
                lag_ms = age.as_millis() as u64,
                lag_exits = exits,
                "the backup's replica is too far behind: the guest waits for it"
            );
            self.shared.stats.set_state(
                StateKind::ReplicaBehind,
                format!(
                    "guest paused: the backup's replica is {} ms ({exits} exits) behind",
                    age.as_millis()
                ),
            );
            vm.pause()
        } else {
            tracing::info!("the backup's replica caught up: the guest runs again");
            self.shared
                .stats
                .set_state(StateKind::Protected, "protected");
            vm.resume()
        };
        if let Err(e) = result
            && vm.ended().is_none()
        {
            tracing::error!(error = %e, "cannot pause or resume the guest for the replica's lag");
        }
    }
}

/// Live migration (see `migration.rs`): the replicator drives it in the time
/// between checkpoints, or while idle without a backup session.
impl Replicator {
    /// A migration is requested or under way.
    fn migration_active(&mut self) -> bool {
        if self.migration.is_none()
            && self.shared.migrating.load(Ordering::Acquire)
            && let Some(request) = self.shared.take_migration()
        {
            let ram_pages = self.shared.opts.ram_bytes / PAGE_SIZE;
            let stats = &self.shared.stats;
            let before = (stats.state_kind(), stats.state());
            self.migration = Some(Migration::new(request, ram_pages, before));
        }
        self.migration.is_some()
    }

    /// Works on the migration until `deadline`: connects, sends pre-copy
    /// rounds, or switches. `session`: the backup's session, if any (its
    /// checkpoints harvest the dirty log for the migration too). Returns how
    /// the role's session ends if it does.
    fn migrate(
        &mut self,
        session: Option<(&SessionLink, &mut SenderState)>,
        deadline: Instant,
    ) -> Option<SessionEnd> {
        let mut m = self.migration.take()?;
        if self.shared.phase() != Phase::Running {
            self.fail_migration(m, "the primary is stopping".into());
            return None;
        }
        if let Err(why) = self.connect_migration(&mut m) {
            let why = format!("cannot reach the destination: {}", why.explain());
            self.fail_migration(m, why);
            return None;
        }
        let step = match m.request.mode {
            MigrationMode::StopAndCopy | MigrationMode::Postcopy => Ok(Step::Switch),
            // The replay-mode loop drives it (`replay_migration_tick`); here
            // the VM is not protected, and the log has nowhere to go.
            MigrationMode::Replay => Err(MigrationError::NotProtected),
            MigrationMode::Precopy | MigrationMode::Hybrid => {
                let may_hold = !self.held_for_output && !self.held_for_lag;
                let vm = self
                    .vm
                    .as_ref()
                    .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
                m.precopy_until(vm, &mut self.page, deadline, session.is_none(), may_hold)
            }
        };
        match step {
            Ok(Step::Continue) => {
                self.show_migration(&m, "precopy", |p| {
                    format!(
                        "migrating to {}: pre-copy round {}, {} pages to go",
                        p.destination, p.round, p.remaining_pages
                    )
                });
                self.migration = Some(m);
                None
            }
            Ok(Step::Switch) => self.migration_switch(m, session),
            Err(why) => {
                if let Some(end) = self.vm().ended() {
                    self.fail_migration(m, "the guest ended".into());
                    return Some(SessionEnd::VmEnded(end));
                }
                self.fail_migration(m, why.explain());
                None
            }
        }
    }

    /// The switch: the guest stops here (the backup's final checkpoint),
    /// the rest goes to the destination (committed there), the backup
    /// stands down once it committed the final checkpoint, and the
    /// destination takes the VM by a Handover. The backup's commit of the
    /// final checkpoint overlaps the destination's part and the goodbye
    /// (awaited in turn, its ack and the goodbye were a third of an idle
    /// VM's ~4 ms stop on loopback).
    /// Before the handover is sent any failure resumes the guest here.
    fn migration_switch(
        &mut self,
        mut m: Migration,
        session: Option<(&SessionLink, &mut SenderState)>,
    ) -> Option<SessionEnd> {
        let phase = match m.request.mode {
            MigrationMode::StopAndCopy => "stop-and-copy",
            _ => "switch",
        };
        self.shared.stats.set_migration(m.progress(phase, ""));
        if let Err(e) = fault_point("primary.switch") {
            self.fail_migration(m, e.to_string());
            return None;
        }
        let started = Instant::now();
        let backup = session.as_ref().map(|(link, _)| (*link).clone());
        let mut backup_final = None;
        // 1. Stop the guest with its state: by the backup's final checkpoint,
        // or here when no backup holds the VM.
        let payload = match session {
            Some((link, sender)) => {
                // The checkpoint's harvest goes to the migration too.
                self.migration = Some(m);
                let taken = self.checkpoint(link, sender, true, false);
                m = self
                    .migration
                    .take()
                    .unwrap_or_else(|| unreachable!("put back above"));
                match taken {
                    Ok(true) => {}
                    Ok(false) => {
                        self.await_session_verdict(link);
                        self.resume_after_failed_switchover();
                        self.fail_migration(
                            m,
                            "the backup's session broke during the final checkpoint".into(),
                        );
                        return Some(SessionEnd::Broken);
                    }
                    Err(end) => {
                        self.fail_migration(m, "the final checkpoint failed".into());
                        return Some(end);
                    }
                }
                // Not awaited here: the goodbye names it, and the backup
                // stands down once it committed (`backup_stands_down`);
                // meanwhile the rest goes to the destination.
                backup_final = Some(self.next_epoch - 1);
                std::mem::take(&mut self.last_payload)
            }
            None => match self.pause_for_migration(&mut m) {
                Ok(payload) => payload,
                Err(why) => {
                    self.resume_after_failed_switchover();
                    self.fail_migration(m, why);
                    return None;
                }
            },
        };
        let state_taken = started.elapsed();
        if !self.shared.begin_handover() {
            self.fail_migration(m, "the primary is stopping".into());
            return Some(SessionEnd::Stop);
        }
        // 2. The rest to the destination, committed there; in post-copy
        // only the state, and which pages it holds current.
        let vm = self
            .vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
        let postcopy = m.request.mode.is_postcopy();
        let sent = if postcopy {
            m.flush_for_postcopy(vm).map(|(epoch, valid, zero)| {
                let sent = FinalSent {
                    epoch,
                    pages: 0,
                    bytes: 0,
                    commit_wait: Duration::ZERO,
                };
                (sent, Some((valid, zero)))
            })
        } else {
            m.send_final(vm, &mut self.page, &payload)
                .map(|sent| (sent, None))
        };
        let (final_sent, valid) = match sent {
            Ok(sent) => sent,
            Err(why) => {
                self.shared.end_handover(None);
                self.resume_after_failed_switchover();
                self.fail_migration(m, why.explain());
                return None;
            }
        };
        let kind = match &valid {
            Some((valid, zero)) => HandoverKind::Postcopy(PostcopyHandover {
                valid,
                zero,
                state: &payload,
            }),
            None => HandoverKind::Plain {
                commit_wait: final_sent.commit_wait,
            },
        };
        self.complete_switch(
            m,
            backup.as_ref(),
            Switched {
                started,
                state_taken,
                rest_sent: started.elapsed(),
                epoch: final_sent.epoch,
                final_pages: final_sent.pages,
                final_bytes: final_sent.bytes,
                backup_final,
            },
            kind,
        )
    }

    /// A migration's goodbye: the backup stands down once it has committed
    /// `final_checkpoint` (if the switch took one) in this session, and
    /// says which epoch it held. Why not, if it did not confirm.
    fn backup_stands_down(
        &self,
        link: &SessionLink,
        final_checkpoint: Option<u64>,
    ) -> Result<(), String> {
        const UNCONFIRMED: &str = "the backup did not confirm that it stands down; the VM runs \
                                   on here and the backup resyncs";
        let opts = &self.shared.opts;
        let goodbye = |after| {
            self.runtime.block_on(say_goodbye(
                opts,
                self.shared.generation,
                link.id,
                link.live_channel(),
                after,
            ))
        };
        let confirmed = |answer| match answer {
            Goodbye::Held(held) => Ok(held),
            // Its silence rule promoted it (this host was frozen, or its
            // heartbeats starved): the VM must never run here again.
            Goodbye::Deposed(g) => {
                // Not the promotion a handover expects (the destination's):
                // the handover ends, and this host is fenced.
                self.shared.end_handover(None);
                self.shared.fence(g);
                Err(format!("the backup promoted (generation {g})"))
            }
            Goodbye::Undelivered => Err(UNCONFIRMED.to_owned()),
        };
        let held = confirmed(goodbye(final_checkpoint.map(|e| (e, ACK_TIMEOUT))))?;
        match final_checkpoint {
            // A backup before `after_epoch` stood down at once (it answers
            // 0): its ack says the epoch committed, and a second goodbye
            // retires the image that commit recorded as not retired.
            Some(epoch) if held < epoch => {
                if !self.wait_acked(link, epoch) {
                    return Err(format!(
                        "the backup did not ack the final checkpoint {epoch}"
                    ));
                }
                confirmed(goodbye(None)).map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// A migration's switch from step 3, the guest paused and its state at
    /// the destination (`switched`): the backup stands down, the
    /// destination takes the VM, post-copy serves the rest. Returns how the
    /// session ends (None: no session, the VM runs on here).
    fn complete_switch(
        &mut self,
        mut m: Migration,
        backup: Option<&SessionLink>,
        switched: Switched,
        kind: HandoverKind<'_>,
    ) -> Option<SessionEnd> {
        let Switched {
            started,
            state_taken,
            rest_sent,
            epoch,
            final_pages,
            final_bytes,
            backup_final,
        } = switched;
        let postcopy = matches!(kind, HandoverKind::Postcopy(_));
        let opts = self.shared.opts.clone();
        let generation = self.shared.generation;
        // Meanwhile the destination may restore the VM, paused.
        if let HandoverKind::Plain { commit_wait } = kind {
            m.prepare_handover(&self.runtime, epoch, commit_wait);
        }
        // 3. The backup stands down (from here its silence rule would make a
        // second copy), once it has committed the final checkpoint in this
        // session (it says which epoch it held). Unconfirmed: the VM runs on
        // here, protected.
        if let Some(link) = backup
            && let Err(why) = self.backup_stands_down(link, backup_final)
        {
            let fenced = matches!(self.shared.phase(), Phase::Fenced(_));
            self.shared.end_handover(None);
            // Not if deposed (the function checks): the backup runs it.
            self.resume_after_failed_switchover();
            // The goodbye may have arrived: resync before relying on it.
            link.broken.store(true, Ordering::Release);
            self.fail_migration(m, why);
            return Some(if fenced {
                SessionEnd::Stop
            } else {
                SessionEnd::Broken
            });
        }
        let stood_down = started.elapsed();
        // 4. The destination takes the VM.
        let target = m.request.target.clone();
        let session_id = m.session();
        // The first request goes on the stream's connection (no new round
        // trips at the switch); a retry opens a new one.
        let mut stream_client = m.client();
        // A handover that waits for its epoch's commit may take that long
        // more to answer.
        let outcome = self.runtime.block_on(handover_until_answered(
            MIGRATION_HANDOVER_RETRY + kind.commit_wait(),
            Duration::from_millis(100),
            || {
                handover_to(
                    &opts,
                    &target,
                    generation,
                    session_id,
                    epoch,
                    kind,
                    stream_client.take(),
                )
            },
        ));
        let (new_generation, resume, error) = match outcome {
            HandoverOutcome::Done(reply) => (
                reply.generation,
                Duration::from_micros(reply.resume_micros),
                None,
            ),
            // Asked again after a lost answer: it runs the VM already.
            HandoverOutcome::Deposed(g) => (g, Duration::ZERO, None),
            HandoverOutcome::NotTaken(why) => {
                self.shared.end_handover(None);
                self.resume_after_failed_switchover();
                if let Some(link) = backup {
                    // The backup stood down: it resyncs.
                    link.broken.store(true, Ordering::Release);
                }
                self.fail_migration(m, format!("the destination refused the handover: {why}"));
                return backup.map(|_| SessionEnd::Broken);
            }
            HandoverOutcome::Unknown(why) => (
                generation + 1,
                Duration::ZERO,
                Some(format!(
                    "no answer to the handover ({why}): the destination may run the VM. It never \
                     runs here again; check the destination (`understudyctl status`) and, if it \
                     does not run the VM, resume it there with `understudyctl promote`"
                )),
            ),
        };
        let downtime = started.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            downtime_ms = ms(downtime),
            state_ms = ms(state_taken),
            rest_sent_ms = ms(rest_sent),
            backup_stood_down_ms = ms(stood_down),
            restore_there_ms = ms(resume),
            "the switch, from the guest's stop: its state taken, the rest sent to the \
             destination, the backup stood down, the handover answered (downtime)"
        );
        // Post-copy: the destination runs the VM on the pages it has; the
        // rest go from here, the guest here paused for good.
        let (postcopy_figures, error) = if postcopy {
            // The guest answers there from now on: its clients go now, not
            // when the last page is in.
            self.log.disconnect_clients();
            self.shared.stats.set_migration(m.progress("postcopy", ""));
            self.shared.stats.set_state(
                StateKind::Migrating,
                "post-copy: the destination runs the VM; sending it the rest",
            );
            let vm = self
                .vm
                .as_ref()
                .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
            match m.postcopy_serve(vm, &mut self.page) {
                Ok(f) => {
                    tracing::info!(
                        requests = f.requests,
                        pages = f.pages,
                        took_ms = f.took.as_secs_f64() * 1e3,
                        fault_wait_p50_us = f.fault_wait_p50_us,
                        fault_wait_p99_us = f.fault_wait_p99_us,
                        "post-copy done: every page is at the destination"
                    );
                    (Some(f), error)
                }
                Err(failure) if failure.all_sent => (
                    None,
                    Some(format!(
                        "post-copy sent every page but the destination never confirmed it holds \
                         them ({}): it may run the VM (check `understudyctl status` there); it \
                         never runs here again",
                        failure.why.explain()
                    )),
                ),
                Err(failure) => (
                    None,
                    Some(format!(
                        "post-copy failed after the switch ({}): the VM ran at the destination, \
                         which cannot go on without the pages it lacks, and cannot run here \
                         again: it is lost",
                        failure.why.explain()
                    )),
                ),
            }
        } else {
            (None, error)
        };
        self.finish_migration(
            m,
            SwitchFigures {
                generation: new_generation,
                downtime,
                sent: rest_sent,
                resume,
                final_pages,
                final_bytes,
                postcopy: postcopy_figures,
            },
            error,
        );
        Some(SessionEnd::HandedOver)
    }

    /// Shows a migration's progress in status: its `phase`, and the state
    /// line `line` writes from it.
    fn show_migration(
        &self,
        m: &Migration,
        phase: &str,
        line: impl FnOnce(&understudy_proto::MigrationProgress) -> String,
    ) {
        let progress = m.progress(phase, "");
        self.shared
            .stats
            .set_state(StateKind::Migrating, line(&progress));
        self.shared.stats.set_migration(progress);
    }

    /// Connects the migration to its destination, once (the status says so
    /// meanwhile).
    fn connect_migration(&mut self, m: &mut Migration) -> Result<(), MigrationError> {
        if m.connected() {
            return Ok(());
        }
        self.show_migration(m, "setup", |p| {
            format!("migrating to {}: connecting", p.destination)
        });
        let opts = self.shared.opts.clone();
        m.connect(
            &self.runtime,
            &opts,
            self.shared.generation,
            self.shared.incarnation,
        )?;
        tracing::info!(destination = %m.request.target.addr, mode = m.request.mode.name(), "migration: connected to the destination");
        Ok(())
    }

    /// Replay migration, called between segments of the log: connects,
    /// sends a slice of pre-copy, asks for the checkpoint that makes the
    /// base, or (the base sent) watches the destination's replica and
    /// switches once it keeps up.
    fn replay_migration_tick(&mut self, link: &SessionLink) -> Tick {
        let Some(mut m) = self.migration.take() else {
            return Tick::Carry;
        };
        if self.shared.phase() != Phase::Running {
            self.fail_migration(m, "the primary is stopping".into());
            return Tick::Carry;
        }
        if m.request.mode != MigrationMode::Replay {
            // Refused when asked (`lib.rs`); here for a request that raced
            // a change of mode.
            self.fail_migration(
                m,
                "a VM replicated by its log migrates by replay (--mode replay)".into(),
            );
            return Tick::Carry;
        }
        if let Err(why) = self.connect_migration(&mut m) {
            let why = format!("cannot reach the destination: {}", why.explain());
            self.fail_migration(m, why);
            return Tick::Carry;
        }
        if m.log_phase() {
            // At the switch, output waits for the destination too: what it
            // holds goes out.
            self.shared.releaser.second_acked(m.destination_log());
            let may_hold = !self.held_for_output && !self.held_for_lag;
            let vm = self
                .vm
                .as_ref()
                .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
            return match m.replay_step(vm, may_hold) {
                Ok(LogStep::Gate) => {
                    let released = self.shared.releaser.gate();
                    tracing::info!(
                        released,
                        "migration: the switch is due; output waits for the destination too \
                         until it holds the log of all output released"
                    );
                    m.gated(released);
                    self.migration = Some(m);
                    Tick::Carry
                }
                Ok(LogStep::Continue) => {
                    self.show_migration(&m, "log", |p| {
                        format!(
                            "migrating to {}: the destination replays the log",
                            p.destination
                        )
                    });
                    self.migration = Some(m);
                    Tick::Carry
                }
                Ok(LogStep::Switch) => match self.replay_switch(link, m) {
                    Some(end) => Tick::Ended(end),
                    None => Tick::Carry,
                },
                Err(why) => {
                    self.fail_migration(m, why.explain());
                    Tick::Carry
                }
            };
        }
        if m.base_wanted() {
            self.migration = Some(m);
            return Tick::Checkpoint;
        }
        let may_hold = !self.held_for_output && !self.held_for_lag;
        let vm = self
            .vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
        let deadline = Instant::now() + REPLAY_PRECOPY_SLICE;
        match m.precopy_until(vm, &mut self.page, deadline, false, may_hold) {
            Ok(Step::Continue) => {
                self.show_migration(&m, "precopy", |p| {
                    format!(
                        "migrating to {}: pre-copy round {} before the base, {} pages to go",
                        p.destination, p.round, p.remaining_pages
                    )
                });
                self.migration = Some(m);
                Tick::Carry
            }
            Ok(Step::Switch) => {
                m.want_base();
                self.migration = Some(m);
                Tick::Checkpoint
            }
            Err(why) => {
                self.fail_migration(m, why.explain());
                Tick::Carry
            }
        }
    }

    /// Replay migration: the checkpoint just taken (guest left paused) is
    /// the base: the pages the destination lacks and the state go to it,
    /// then the guest runs on, recording.
    fn send_replay_base(&mut self, paused_at: Instant) {
        let Some(mut m) = self.migration.take() else {
            return;
        };
        let payload = std::mem::take(&mut self.last_payload);
        let vm = self
            .vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
        let sent = m.send_base(vm, &mut self.page, &payload);
        if !self.hold_for_output() && !self.held_for_lag {
            self.resume_after_failed_switchover();
        }
        m.base_paused(paused_at.elapsed());
        match sent {
            Ok(()) => {
                self.shared.stats.set_migration(m.progress("log", ""));
                self.migration = Some(m);
            }
            Err(why) => self.fail_migration(m, why.explain()),
        }
    }

    /// Replay migration's switch: the guest stops, the log up to the stop
    /// goes to the backup and the destination, and once the destination
    /// holds all of it, it takes the VM from its replica (which replays the
    /// rest there).
    fn replay_switch(&mut self, link: &SessionLink, m: Migration) -> Option<SessionEnd> {
        self.shared.stats.set_migration(m.progress("switch", ""));
        let started = Instant::now();
        // The guest stops for the switch, not for the lag (a hold must not
        // be lifted after the VM left).
        self.held_for_lag = false;
        if let Err(e) = self.vm().pause() {
            self.fail_migration(m, format!("cannot pause the VM: {e}"));
            return None;
        }
        // Tests: the guest stopped, its log's tail not yet sent.
        if let Err(e) = fault_point("primary.switch.tail") {
            self.resume_after_failed_switchover();
            self.fail_migration(m, e.to_string());
            return None;
        }
        let bytes_before = m.bytes_sent();
        // The log up to the pause, sealed by it: ship_segment sends it to
        // the backup and, in the log phase, to the destination.
        let segments: Vec<Sealed> = self
            .trace
            .as_ref()
            .map(|t| t.try_iter().collect())
            .unwrap_or_default();
        self.migration = Some(m);
        let mut shipped = true;
        for segment in segments {
            if !self.ship_segment(link, segment) {
                shipped = false;
                break;
            }
        }
        let Some(mut m) = self.migration.take() else {
            // Forwarding failed: the migration failed with it.
            self.resume_after_failed_switchover();
            return (!shipped).then_some(SessionEnd::Broken);
        };
        if !shipped {
            self.resume_after_failed_switchover();
            self.fail_migration(m, "the backup's session broke at the switch".into());
            return Some(SessionEnd::Broken);
        }
        if !self.shared.begin_handover() {
            self.fail_migration(m, "the primary is stopping".into());
            return Some(SessionEnd::Stop);
        }
        let (epoch, log_exits) = match m.flush_log() {
            Ok(flushed) => flushed,
            Err(why) => {
                self.shared.end_handover(None);
                self.resume_after_failed_switchover();
                self.fail_migration(m, why.explain());
                return None;
            }
        };
        let final_bytes = m.bytes_sent() - bytes_before;
        self.complete_switch(
            m,
            Some(link),
            Switched {
                started,
                state_taken: Duration::ZERO,
                rest_sent: started.elapsed(),
                epoch,
                final_pages: 0,
                final_bytes,
                backup_final: None,
            },
            HandoverKind::Replay {
                log_exits,
                // Its tail left with the handover (log_exits > 0): it is
                // there half a round trip after the pause, unless the link
                // failed, and then the handover cannot come either.
                wait: if log_exits > 0 {
                    REPLAY_TAIL_WAIT
                } else {
                    Duration::ZERO
                },
            },
        )
    }

    /// No backup session: pauses the guest and captures its state and the
    /// console payload for the destination.
    fn pause_for_migration(&mut self, m: &mut Migration) -> Result<Vec<u8>, String> {
        let vm = self
            .vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("the VM lives until run() returns"));
        // The vCPU thread captures its state while this one harvests.
        vm.pause_saving()
            .map_err(|e| format!("cannot pause the VM: {e}"))?;
        let dirty = vm
            .harvest_dirty()
            .map_err(|e| format!("cannot read the dirty log: {e}"))?;
        m.dirtied_bitmap(&dirty);
        let state = vm
            .save_state(false)
            .map_err(|e| format!("cannot capture the VM's state: {e}"))?;
        // Output up to the pause: released now if the policy releases
        // unprotected output, else held and carried to the destination.
        let bytes: Vec<u8> = self.output.try_iter().collect();
        if !bytes.is_empty() {
            self.log.append(&bytes);
            self.shared.releaser.produced_unprotected();
        }
        let (console_offset, console_out) = self.log.unreleased();
        let vm_state = state
            .encode()
            .map_err(|e| format!("cannot encode the VM's state: {e}"))?;
        Ok(CheckpointPayload {
            vm_state,
            console_offset,
            console_out,
        }
        .encode())
    }

    /// The migration failed before the switch: the VM runs on here, or, if
    /// this host was deposed meanwhile, on its backup.
    fn fail_migration(&mut self, m: Migration, why: String) {
        // Output waits for the backup alone again (a replay switch's gate).
        self.shared.releaser.ungate();
        let whereabouts = after_a_failed_switch(self.shared.phase());
        tracing::warn!(%why, destination = %m.request.target.addr, "live migration failed; {whereabouts}");
        let stats = &self.shared.stats;
        stats.set_migration(m.progress("failed", &why));
        stats.metrics.migration_ended("failed");
        stats.metrics.migration_bytes.inc_by(m.bytes());
        // The state the host was in (a broken session says its own next).
        let (kind, text) = &m.state_before;
        stats.set_state(*kind, text.clone());
        self.shared.migrating.store(false, Ordering::Release);
        let _ = m.request.responder.send(Err(tonic::Status::aborted(format!(
            "migration failed, {whereabouts}: {why}"
        ))));
    }

    /// The destination runs the VM: nothing of it runs here again.
    fn finish_migration(&mut self, m: Migration, figures: SwitchFigures, error: Option<String>) {
        let destination = m.request.target.addr;
        let generation = figures.generation;
        self.shared.end_migration(generation, destination);
        // A restart of this host must not boot the VM again: it runs there.
        self.shared.record(RunState::Gone);
        if let Err(e) = self
            .shared
            .host_state
            .mark_fenced(understudy_common::ids::Generation(generation))
        {
            tracing::error!(error = %understudy_common::wire::chain(&e), "cannot record that the VM left this host");
        }
        // Output not yet released went with the final state: the
        // destination releases it.
        let carried = self.shared.releaser.fence();
        self.log.disconnect_clients();
        let report = m.report(figures);
        let metrics = &self.shared.stats.metrics;
        // After the switch: done, or (no answer to the handover, a post-copy
        // that broke off) the VM is not known to run anywhere.
        metrics.migration_ended(if error.is_none() { "done" } else { "lost" });
        metrics.migration_bytes.inc_by(report.bytes_transferred);
        metrics
            .migration_downtime
            .observe(report.downtime_micros as f64 / 1e6);
        let mut progress = m.progress("done", error.as_deref().unwrap_or(""));
        progress.remaining_pages = 0;
        self.shared.stats.set_migration(progress);
        self.shared.stats.set_state(
            StateKind::MigratedAway,
            format!("migrated to {destination} (generation {generation})"),
        );
        tracing::info!(
            %destination,
            generation,
            downtime_ms = report.downtime_micros as f64 / 1e3,
            total_ms = report.total_micros as f64 / 1e3,
            bytes = report.bytes_transferred,
            rounds = report.rounds,
            carried_output_bytes = carried,
            "live migration done: the destination runs the VM"
        );
        let answer = match error {
            None => Ok(report),
            Some(why) => Err(tonic::Status::unknown(why)),
        };
        let _ = m.request.responder.send(answer);
    }
}

/// How long the migration's handover is asked again while its answer is lost.
const MIGRATION_HANDOVER_RETRY: Duration = Duration::from_secs(10);

/// A replay handover sent with the log's tail: how long the destination
/// waits for the tail (it is on the same connection, just ahead; at the
/// end of the wait the destination closes the session and refuses, and the
/// VM runs on here).
const REPLAY_TAIL_WAIT: Duration = Duration::from_secs(2);

/// Where a migration's switch stands once the destination holds the state.
#[derive(Clone, Copy, Debug)]
struct Switched {
    /// When the guest stopped.
    started: Instant,
    /// From then: the state taken (the backup's final checkpoint handed to
    /// its stream, or read here without a backup), and the rest sent to the
    /// destination (committed there, or handed to the stream to go with
    /// the handover).
    state_taken: Duration,
    rest_sent: Duration,
    /// The epoch the handover names.
    epoch: u64,
    final_pages: u64,
    final_bytes: u64,
    /// The backup's final checkpoint, if the switch took one: the goodbye
    /// names it (see `backup_stands_down`).
    backup_final: Option<u64>,
}

/// What a replay migration's tick asks of the log loop.
enum Tick {
    /// Go on forwarding the log.
    Carry,
    /// Take a checkpoint now (the destination's base).
    Checkpoint,
    /// The session ends (the VM moved).
    Ended(SessionEnd),
}

/// Replay migration before the base: how long one slice of pre-copy may
/// keep the log from the backup.
const REPLAY_PRECOPY_SLICE: Duration = Duration::from_millis(20);

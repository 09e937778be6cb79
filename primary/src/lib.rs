//! The primary role: runs the VM, syncs it to the backup while it runs, then
//! every epoch pauses, harvests, copies, captures device state, resumes,
//! encodes and ships; releases the guest's console output of epoch N only when
//! the backup has acked N (output commit).
//!
//! ```text
//!  start ─▶ Hello ─▶ full sync (rounds while running) ─▶ checkpoint loop ─┐
//!    ▲  (fenced marker or a higher generation: refuse)                    │
//!    └──── session lost: probe backup ── higher generation ──▶ FENCED     │
//!                │ unreachable: keep-running ⇒ release output, run        │
//!                │              hold-output  ⇒ hold output, run           │
//!                └─ alive: resync ◀────────────────────────────────────────┘
//! ```
//!
//! A planned switchover ([`understudy_proto::SwitchoverRequest`] on the Control
//! service): a final checkpoint with the VM left paused, its ack, then
//! `Handover`; the backup promotes at once and this primary stops its VM for
//! good ([`PrimaryExit::HandedOver`]). A primary can also start around a VM
//! this host took over, by a handover or a promotion ([`Start::Adopt`]).
//! While a primary runs, the host's replication address answers that the VM
//! runs here, so an old primary that comes back learns it was deposed.
//!
//! Modules: the *replicator* thread (`replicator`) owns the VM and the sender
//! state, so the pause path never waits on the async runtime; the async
//! *session manager* here owns the gRPC streams, acks, heartbeats and failure
//! handling. They meet in `Shared`. Every output release goes through the
//! `releaser`, which a fence closes for good; `peer` holds the calls to the
//! other host.

mod beats;
pub mod host_state;
pub mod link_rate;
pub mod migration;
mod peer;
mod releaser;
mod replicator;
mod witness;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use understudy_checkpoint::CodecPolicy;
use understudy_checkpoint::trace::TraceWriter;
use understudy_common::ids::{
    Epoch, EpochCell, Incarnation, ReplicationMode, Role, RunState, SessionId,
};
use understudy_common::operator::{OperatorRequest, SwitchoverResult};
use understudy_common::role::{HostIo, RunningVm};
use understudy_common::status::{StateKind, Stats};
use understudy_common::wire;
use understudy_proto::EpochChunk;
use understudy_proto::replication_server::ReplicationServer;
use understudy_vmm::deterministic::TraceMode;
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, RamBacking, Vm, VmEnd};

use crate::beats::Beats;
use crate::host_state::{HostState, HostStateError, RecordWriter, RunRecord};
use crate::peer::{Accepted, HelloOutcome, RunsHere, SessionOffer, hello, probe};
use crate::releaser::Releaser;
use crate::replicator::Replicator;
use crate::witness::{Seat, Verdict};

pub use crate::peer::PeerError;
pub use crate::replicator::InternalError;

/// What to do when the backup is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupLoss {
    /// Availability: keep running unprotected and release output.
    KeepRunning,
    /// Safety: keep running but hold all output until a backup acks again.
    HoldOutput,
}

/// What the primary needs to know.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// The VM's name (its identity on both hosts).
    pub vm_id: String,
    /// The built-in guest to boot and its parameters.
    pub boot: BuiltinBoot,
    /// Guest RAM in bytes.
    pub ram_bytes: usize,
    /// Where this host keeps its generation, fence marker and run record.
    pub state_dir: PathBuf,
    /// The backup's replication address.
    pub backup: SocketAddr,
    /// Checkpoint mode: the time between checkpoints.
    pub epoch_interval: Duration,
    /// How often heartbeats go to the backup.
    pub heartbeat_interval: Duration,
    /// The backup's promotion timeout (the primary gives up on a silent
    /// backup after `max(3 × timeout, 1 s)`).
    pub heartbeat_timeout: Duration,
    /// What to do when the backup is lost.
    pub backup_loss: BackupLoss,
    /// How pages are encoded on the wire.
    pub codec: CodecPolicy,
    /// Epochs shipped but not yet acked before the epoch loop waits.
    pub max_in_flight: u64,
    /// Console output held unreleased beyond which the guest is paused until
    /// output goes out again.
    pub max_held_output: usize,
    /// Let checkpoints copy their dirty pages after the guest resumed
    /// (write-protected until copied) when that shortens the stop.
    pub copy_after_resume: bool,
    /// Boot without a first handshake with the backup (never by default: a
    /// primary that cannot ask the backup cannot know it was not deposed).
    pub start_unprotected: bool,
    /// Mutual TLS for the replication and control channels (None: plaintext).
    pub tls: Option<wire::TlsFiles>,
    /// The name the backup's certificate must carry (default: its IP).
    pub backup_name: Option<String>,
    /// Why this host could not become the backup after a switchover (None:
    /// it can, so switchovers are accepted).
    pub switchover_unavailable: Option<String>,
    /// Who may call the replication service this host answers while it runs
    /// the VM (only the other host).
    pub auth: understudy_common::auth::Authority,
    /// How the VM is replicated.
    pub mode: ReplicationMode,
    /// Replay mode: the time between checkpoints (the log carries the VM
    /// between them).
    pub checkpoint_interval: Duration,
    /// Replay mode: how far the backup's replica may fall behind the log
    /// before the guest is paused until it catches up (back-pressure).
    pub max_replica_lag: Duration,
    /// The etcd witness that must agree before output goes out without a
    /// backup (None: the backup-loss policy alone decides).
    pub witness: Option<understudy_common::witness::Witness>,
}

/// How the primary gets its VM.
#[derive(Debug)]
pub enum Start {
    /// Boot the configured guest (after the first handshake with the backup).
    Boot,
    /// Protect a VM a handover or promotion left running on this host. The
    /// caller records the host's new generation (`HostState::adopt`): the
    /// daemon does so on a thread beside this role's start, so that the VM's
    /// output waits for no more than the run record (`RunState`).
    Adopt(Box<RunningVm>),
}

/// Why the primary stopped or refused to start.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// This host's fence marker says a backup was promoted over it.
    #[error(
        "this primary was deposed: the backup was promoted at generation {generation}, so VM {vm:?} \
         runs there now. Refusing to run it here too. Make this host the backup of the new primary; \
         only if you are sure no other copy runs, delete {marker} to override"
    )]
    Fenced {
        /// The VM's name.
        vm: String,
        /// The generation the backup was promoted at.
        generation: u64,
        /// The fence marker file.
        marker: PathBuf,
    },
    /// A state file cannot be read or written.
    #[error(transparent)]
    HostState(#[from] HostStateError),
    /// An address cannot be listened on.
    #[error(transparent)]
    Listen(#[from] wire::ListenError),
    /// The backup refused the session for good (another VM, another RAM
    /// size, another protocol version…).
    #[error("the backup at {addr} refused the primary: {message}")]
    Refused {
        /// The backup's replication address.
        addr: SocketAddr,
        /// Its reason.
        message: String,
    },
    /// The VM cannot be booted or adopted.
    #[error("cannot start the VM")]
    Vm(#[source] understudy_vmm::VmError),
    /// A thread of the role did not start (its name).
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
    /// No kernel randomness for a session key or a stream id.
    #[error("the kernel gave no randomness for a session key")]
    NoRandomness,
    /// An internal failure ended the role like a crash.
    #[error("the primary failed and ended like a crash (the backup takes over)")]
    Internal(#[source] InternalError),
    /// The replication server (answering that the VM runs here) failed.
    #[error("gRPC server failed")]
    Server(#[source] tonic::transport::Error),
    /// The TLS files cannot be used.
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// How a primary run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum PrimaryExit {
    /// Asked to stop; the backup was told not to promote.
    Shutdown,
    /// The guest ended by itself.
    VmEnded(VmEnd),
    /// A higher generation was seen: the VM was stopped, output dropped.
    Fenced {
        /// The generation that deposed this primary.
        generation: u64,
    },
    /// A switchover handed the VM to the backup, which runs it now at
    /// `generation`; the VM here is stopped and this host should become the
    /// backup.
    HandedOver {
        /// The new primary's generation.
        generation: u64,
    },
    /// A live migration moved the VM to `destination`, which runs it at
    /// `generation`; nothing of it runs here, and this host's state says so
    /// (a restart refuses to boot it again).
    MigratedAway {
        /// The destination's generation.
        generation: u64,
        /// The destination's replication address.
        destination: SocketAddr,
    },
}

/// Sync rounds stop when this few pages are still dirty (or after MAX_ROUNDS).
const SYNC_CONVERGED_PAGES: usize = 256;
const MAX_SYNC_ROUNDS: usize = 8;
/// Pages encoded between chunk hand-offs during a sync round.
const STREAM_EVERY_PAGES: usize = 512;
/// Pages per epoch of a sync round: the backup stages an epoch whole before
/// it writes it, so a round of all RAM as one epoch would make it stage all
/// of RAM (and fault in that much fresh memory); 8 MiB epochs reuse the
/// memory of the epoch before and let it write while the next one arrives.
/// 32 MiB epochs (as before 2026-12-03) protected a 1 GiB VM from cold in
/// 367–394 ms, 8 MiB ones in 352–354 and 2 MiB ones in 344–352 (the resync
/// bench's log, primary daemons taking turns, three runs each): a backup
/// holding less of a round at once touches less fresh memory.
pub const SYNC_EPOCH_PAGES: usize = 2048;
/// How long a primary waits before asking again while the backup holds
/// another VM that an operator has to decide about.
const HOLDS_VM_RETRY: Duration = Duration::from_secs(1);
/// How long a primary that cannot reach the backup waits before it tries
/// again, before the VM boots.
const FIRST_HELLO_RETRY: Duration = Duration::from_millis(200);
/// How long a role that stops waits for its replication server to let go
/// of the shared socket before aborting it (a deposed peer's open
/// connection is not waited for).
const SERVER_RELEASE_WAIT: Duration = Duration::from_millis(200);
/// The reconnect back-off never grows past the heartbeat timeout, nor
/// stays under this (a backup restarting after a switchover takes that
/// long to listen).
const MIN_RECONNECT_BACKOFF: Duration = Duration::from_millis(200);
/// For how long after a handover made this host the primary its backup
/// being unreachable is logged at INFO, not WARN: in a switchover the old
/// primary stands down and listens as the backup within a second (it first
/// answers that it runs the VM at the older generation, or closes the
/// connection as its role ends); one still unreachable after this is worth
/// an operator's look.
const HANDOVER_QUIET: Duration = Duration::from_secs(10);

/// One switchover request: where to answer.
type SwitchoverResponder = tokio::sync::oneshot::Sender<SwitchoverResult>;

/// A live replication session, as the replicator thread sees it.
#[derive(Debug, Clone)]
struct SessionLink {
    id: SessionId,
    chunks: tokio::sync::mpsc::Sender<EpochChunk>,
    broken: Arc<AtomicBool>,
    /// The backup takes Pages chunks checked by hash (no body CRC).
    pages_by_hash: bool,
    /// The backup's image held only zeros when the session began.
    image_zeroed: bool,
    /// The connection and the Hello's round trip, and when the stream
    /// began to open (after them, and for a first session after the VM's
    /// boot): with the replicator's start of the sync, the session's cost
    /// before its first page (`setup_ms` in "VM protected").
    hello_took: Duration,
    opening: Instant,
    /// The connection the session's stream goes on: a migration's goodbye
    /// goes on it too (a new one cost the switch ~1 ms on loopback, a TLS
    /// handshake more).
    channel: tonic::transport::Channel,
}

impl SessionLink {
    /// The session's connection while its stream lives (None once it broke:
    /// a call then opens a new one), for the calls made while the guest is
    /// stopped (a switchover's handover, a migration's goodbye).
    fn live_channel(&self) -> Option<tonic::transport::Channel> {
        (!self.broken.load(Ordering::Acquire)).then(|| self.channel.clone())
    }
}

/// The role's phase.
///
/// ```text
///  Running ──switchover──▶ HandingOver{seen} ──answer──▶ HandedOver(g)
///     │  ▲                        └──── refused: Running
///     │  └────────────────────────────
///     ├── SIGTERM ─▶ Stopping (finish the epoch, its ack, goodbye)
///     ├── a higher generation ─▶ Fenced(g) (drop output, stop the VM)
///     └── an internal error ─▶ Failed (like a crash: no goodbye, exit ≠ 0)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// A handover is in flight: the backup's promotion (a higher generation)
    /// is expected, not a fence; `seen` is the highest one seen meanwhile.
    HandingOver {
        seen: u64,
    },
    Stopping,
    Fenced(u64),
    HandedOver(u64),
    /// A live migration handed the VM to this destination at this
    /// generation.
    MigratedAway(u64, SocketAddr),
    Failed,
}

impl Phase {
    /// The role is ending: no new session, the replicator winds down.
    pub(crate) fn ending(self) -> bool {
        !matches!(self, Self::Running | Self::HandingOver { .. })
    }
}

/// What the replicator thread and the async side share.
#[derive(Debug)]
struct Shared {
    opts: PrimaryOptions,
    generation: u64,
    incarnation: Incarnation,
    host_state: HostState,
    /// Writes the VM record (see [`Self::record`], [`Self::record_later`]).
    records: Arc<RecordWriter>,
    stats: Arc<Stats>,
    releaser: Releaser,
    session: Mutex<Option<SessionLink>>,
    /// Says a session was set: wakes a replicator idling without one (it
    /// waited for guest output or an epoch interval, and a protection
    /// started up to that late).
    session_set: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
    /// The last acked epoch (None: none of this session's yet, nor any
    /// before it), with a condvar for back-pressure.
    acked: Mutex<Option<Epoch>>,
    acked_cv: Condvar,
    /// The last epoch handed to the session (sync round or checkpoint).
    sent: EpochCell,
    phase: tokio::sync::watch::Sender<Phase>,
    vm_ended: Mutex<Option<VmEnd>>,
    failure: Mutex<Option<InternalError>>,
    done: CancellationToken,
    /// When each unacked checkpoint was taken, for ack latency.
    taken_at: Mutex<VecDeque<(u64, Instant)>>,
    /// The link's measured rate, for the adaptive codec.
    link_rate: Mutex<link_rate::LinkRate>,
    /// A switchover the replicator is to carry out at its next checkpoint.
    switchover: Mutex<Option<SwitchoverResponder>>,
    /// A live migration the replicator is to start.
    migration: Mutex<Option<migration::Request>>,
    /// A live migration is requested or under way.
    migrating: AtomicBool,
    beats: Arc<Beats>,
    /// Replay mode, from the backup's acks: the exit up to which it holds
    /// the log, the exit its replica replayed to (0: none), and whether it
    /// asked for a checkpoint (its replica stopped).
    log_acked: AtomicU64,
    replica_exits: AtomicU64,
    want_checkpoint: AtomicBool,
    /// This host's claims on the witness's key (None: no witness).
    seat: Option<Arc<Seat>>,
    /// The VM came by a planned handover (see `RunningVm::by_handover`).
    by_handover: bool,
}

impl Shared {
    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Replication lag: epochs sent and not yet acked.
    fn record_lag(&self, acked: Option<Epoch>) {
        self.stats
            .in_flight
            .store(Epoch::distance(self.sent.get(), acked), Ordering::Relaxed);
    }

    /// Whether a switchover waits for the replicator.
    fn switchover_waiting(&self) -> bool {
        self.switchover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn take_switchover(&self) -> Option<SwitchoverResponder> {
        self.switchover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Records how this host's run of the VM stands (see `host_state`),
    /// after any record queued by [`Self::record_later`], and returns once
    /// it is on disk: false if it could not be written.
    fn record(&self, state: RunState) -> bool {
        let record = RunRecord {
            incarnation: self.incarnation,
            state,
        };
        match self.records.write(record) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %wire::chain(&e), %state, "cannot record the VM's run");
                false
            }
        }
    }

    /// Queues a record of how this host's run of the VM stands, for a
    /// record no output waits for (see [`RecordWriter`]).
    fn record_later(&self, state: RunState) {
        let record = RunRecord {
            incarnation: self.incarnation,
            state,
        };
        self.records.write_later(record, move |result| {
            if let Err(e) = result {
                tracing::error!(error = %wire::chain(&e), %state, "cannot record the VM's run");
            }
        });
    }

    /// A graceful stop: finish the epoch in flight, its ack, goodbye.
    fn stop(&self) {
        self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Running) {
                *p = Phase::Stopping;
                true
            } else {
                false
            }
        });
        self.wake();
    }

    /// Starts a handover; false if the role is already ending.
    fn begin_handover(&self) -> bool {
        self.phase.send_if_modified(|p| {
            if matches!(p, Phase::Running) {
                *p = Phase::HandingOver { seen: 0 };
                true
            } else {
                false
            }
        })
    }

    fn take_migration(&self) -> Option<migration::Request> {
        self.migration
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Ends a migration's handover: the destination runs the VM.
    fn end_migration(&self, generation: u64, destination: SocketAddr) {
        self.phase.send_if_modified(|p| {
            if let Phase::HandingOver { .. } = p {
                *p = Phase::MigratedAway(generation, destination);
                true
            } else {
                false
            }
        });
    }

    /// Ends a handover: done at `generation`, or refused (None).
    fn end_handover(&self, generation: Option<u64>) {
        self.phase.send_if_modified(|p| {
            if let Phase::HandingOver { .. } = p {
                *p = match generation {
                    Some(g) => Phase::HandedOver(g),
                    None => Phase::Running,
                };
                true
            } else {
                false
            }
        });
    }

    /// An internal error: the role ends like a crash.
    fn fail(&self, error: InternalError) {
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
        self.phase.send_replace(Phase::Failed);
        self.wake();
    }

    /// Fences: from now on nothing is released; the replicator stops the VM.
    /// During and after a handover the backup's promotion is the expected
    /// outcome: the replicator, which holds the paused VM, finishes the
    /// handover instead.
    fn fence(&self, generation: u64) {
        let fenced = self.phase.send_if_modified(|p| match p {
            Phase::HandingOver { seen } => {
                *seen = (*seen).max(generation);
                false
            }
            Phase::HandedOver(_) | Phase::MigratedAway(..) | Phase::Fenced(_) => false,
            Phase::Running | Phase::Stopping | Phase::Failed => {
                *p = Phase::Fenced(generation);
                true
            }
        });
        if !fenced {
            return;
        }
        let dropped = self.releaser.fence();
        tracing::error!(
            generation,
            dropped_output_bytes = dropped,
            "deposed by a higher generation: fencing"
        );
        self.stats.set_state(
            StateKind::Fenced,
            format!("fenced: deposed by generation {generation}"),
        );
        if let Err(e) = self
            .host_state
            .mark_fenced(understudy_common::ids::Generation(generation))
        {
            tracing::error!(error = %wire::chain(&e), "cannot write the fence marker");
        }
        self.record(RunState::Gone);
        self.wake();
        self.done.cancel();
    }

    /// Wakes a replicator waiting for acks.
    fn wake(&self) {
        drop(self.acked());
        self.acked_cv.notify_all();
    }

    fn set_session(&self, link: Option<SessionLink>) {
        let set = link.is_some();
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = link;
        if set {
            // Full: a wake is pending already.
            let _ = self.session_set.0.try_send(());
        }
    }

    fn acked(&self) -> MutexGuard<'_, Option<Epoch>> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs the primary until `shutdown`, a fence, a handover, the guest's end,
/// or an internal failure (an error: the daemon exits like a crash). `host`
/// holds the console (served by the daemon), the status the daemon reports,
/// and the slot operator requests arrive through.
pub async fn run(
    opts: PrimaryOptions,
    host: HostIo,
    shutdown: CancellationToken,
    start: Start,
) -> Result<PrimaryExit, PrimaryError> {
    let stats = host.stats.clone();
    let mut opts = opts;
    if let Start::Adopt(running) = &start {
        // The mode is the VM's for the life of its incarnation: a VM taken
        // over records its inputs if it was replicated by its log.
        let mode = if running.trace.is_some() {
            ReplicationMode::Replay
        } else {
            ReplicationMode::Checkpoint
        };
        if mode != opts.mode {
            tracing::warn!(
                configured = %opts.mode,
                %mode,
                "the VM taken over was replicated in another mode than configured: keeping its \
                 mode until its next boot"
            );
            opts.mode = mode;
        }
    }
    stats.set_mode(opts.mode);

    let host_state = HostState::open(&opts.state_dir)?;
    let (generation, incarnation, previous) = match &start {
        Start::Boot => {
            if let Some(g) = host_state.fenced()? {
                return Err(PrimaryError::Fenced {
                    vm: opts.vm_id.clone(),
                    generation: g.0,
                    marker: host_state.fenced_marker(),
                });
            }
            (
                host_state.generation()?.0,
                Incarnation::new_random(),
                host_state.record()?,
            )
        }
        // The caller records the host's new generation (see `Start::Adopt`).
        Start::Adopt(running) => (
            running.generation.0,
            running.incarnation.unwrap_or_else(Incarnation::new_random),
            None,
        ),
    };
    let seat = opts
        .witness
        .clone()
        .map(|w| Arc::new(Seat::new(w, generation)));
    stats.generation.store(generation, Ordering::Release);
    stats.set_incarnation(Some(incarnation));
    host.log.set_generation(generation);
    let fenced = |g: u64| {
        if let Err(e) = host_state.mark_fenced(understudy_common::ids::Generation(g)) {
            tracing::error!(error = %wire::chain(&e), "cannot write the fence marker");
        }
        PrimaryError::Fenced {
            vm: opts.vm_id.clone(),
            generation: g,
            marker: host_state.fenced_marker(),
        }
    };

    let mut first_session = None;
    let adopted = matches!(start, Start::Adopt(_));
    let by_handover = matches!(&start, Start::Adopt(running) if running.by_handover);
    let (vm, output, trace, output_taken) = match start {
        Start::Boot => {
            // First handshake before the VM runs: a primary that cannot ask
            // the backup cannot know it was not deposed, nor whether the
            // backup holds the VM this host ran before.
            if let Some(p) = previous {
                tracing::info!(previous = %p.incarnation, state = %p.state, "this host ran the VM before: telling the backup");
            }
            stats.set_state(StateKind::WaitingForBackup, "waiting for the backup");
            loop {
                let offer = SessionOffer::new(generation, incarnation, previous)?;
                match hello(&opts, &offer).await {
                    HelloOutcome::Accepted(accepted) => {
                        first_session = Some((offer, accepted));
                        break;
                    }
                    HelloOutcome::Deposed(g) => return Err(fenced(g)),
                    HelloOutcome::Refused(message) => {
                        return Err(PrimaryError::Refused {
                            addr: opts.backup,
                            message,
                        });
                    }
                    HelloOutcome::HoldsVm(why) => {
                        if stats.state() != format!("waiting: {why}") {
                            tracing::warn!(%why, "the backup holds a VM this boot would replace: waiting for an operator");
                        }
                        stats.set_state(StateKind::WaitingForOperator, format!("waiting: {why}"));
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(PrimaryExit::Shutdown),
                            _ = tokio::time::sleep(HOLDS_VM_RETRY) => {}
                        }
                    }
                    HelloOutcome::Unreachable(why) => {
                        if opts.start_unprotected {
                            tracing::warn!(%why, "backup unreachable; starting unprotected as configured");
                            break;
                        }
                        tracing::info!(%why, backup = %opts.backup, "waiting for the backup");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(PrimaryExit::Shutdown),
                            _ = tokio::time::sleep(FIRST_HELLO_RETRY) => {}
                        }
                    }
                }
            }
            // The witness's key names this host before the VM runs here.
            if let Some(seat) = &seat {
                loop {
                    match seat.claim("boot the VM", false, || true).await {
                        Verdict::Granted | Verdict::Moot => break,
                        Verdict::Deposed(g) => return Err(fenced(g)),
                        Verdict::Unreachable(e) => {
                            let why = wire::chain(&e);
                            tracing::warn!(%why, "waiting for the witness before booting the VM");
                            stats.set_state(
                                StateKind::WitnessUnreachable,
                                format!("waiting for the witness before booting: {why}"),
                            );
                            tokio::select! {
                                _ = shutdown.cancelled() => return Ok(PrimaryExit::Shutdown),
                                _ = tokio::time::sleep(seat.check_interval()) => {}
                            }
                        }
                    }
                }
            }
            // Nothing released yet: whatever the backup commits is the
            // newest state clients can see. (After any record of an earlier
            // role still queued: see `RecordWriter`.)
            RecordWriter::of(&host_state).write(RunRecord {
                incarnation,
                state: RunState::Protected,
            })?;
            let ram = GuestRam::new(opts.ram_bytes, RamBacking::Anonymous)
                .map_err(|e| PrimaryError::Vm(e.into()))?;
            // Huge pages: the copy after the resume protects them faster.
            ram.advise_huge_pages();
            let boot_options = BootOptions {
                boot_record: Some(opts.boot.clone()),
                start_paused: false,
                dirty_logging: true,
            };
            let (vm, vm_console, trace) = match opts.mode {
                ReplicationMode::Checkpoint => {
                    let (vm, console) = Vm::boot(ram, &opts.boot.clone(), boot_options)
                        .map_err(PrimaryError::Vm)?;
                    (vm, console, None)
                }
                ReplicationMode::Replay => {
                    let (sink, trace) = crossbeam_channel::unbounded();
                    let writer = TraceWriter::new(
                        understudy_common::ids::random_stream()
                            .ok_or(PrimaryError::NoRandomness)?,
                        0,
                    );
                    let (vm, console) = Vm::boot_deterministic(
                        ram,
                        &opts.boot.clone(),
                        boot_options,
                        TraceMode::Record { writer, sink },
                    )
                    .map_err(PrimaryError::Vm)?;
                    (vm, console, Some(trace))
                }
            };
            host.input.set(Some(vm_console.input.clone()));
            tracing::info!(vm = %opts.vm_id, guest = %opts.boot.guest, generation, %incarnation, mode = %opts.mode, "VM booted");
            (vm, vm_console.output, trace, 0)
        }
        Start::Adopt(running) => {
            let RunningVm {
                mut vm,
                output,
                trace,
                output_taken,
                ..
            } = *running;
            vm.start_dirty_logging().map_err(PrimaryError::Vm)?;
            // Clients without a resume offset get output from now on.
            host.log.set_raw_start(None);
            tracing::info!(vm = %opts.vm_id, generation, %incarnation, backup = %opts.backup, mode = %opts.mode, "protecting the VM this host took over");
            (vm, output, trace, output_taken)
        }
    };
    // Whoever dials this host's replication address learns that the VM runs
    // here (an old primary coming back is deposed and rejoins as the backup).
    let answers = match &host.replication {
        Some(shared) => {
            let listener = shared
                .take_turn()
                .map_err(|source| wire::ListenError::new("replication", shared.addr, source))?;
            let tls = wire::server_tls(opts.tls.as_ref()).map_err(PrimaryError::Tls)?;
            let router =
                tonic::transport::Server::builder().add_service(ReplicationServer::new(RunsHere {
                    generation,
                    auth: opts.auth.clone(),
                }));
            let server = wire::serve(router, listener, tls, shutdown.clone().cancelled_owned());
            Some(tokio::spawn(server))
        }
        None => None,
    };

    let beats = Beats::new();
    let beat_threads = beats::spawn(
        beats.clone(),
        opts.backup,
        opts.heartbeat_interval,
        generation,
        stats.clone(),
    )
    .map_err(|e| PrimaryError::Thread("heartbeat", e))?;
    let shared = Arc::new(Shared {
        generation,
        incarnation,
        records: RecordWriter::of(&host_state),
        host_state,
        stats: stats.clone(),
        releaser: Releaser::new(host.log.clone()),
        session: Mutex::new(None),
        session_set: crossbeam_channel::bounded(1),
        acked: Mutex::new(None),
        acked_cv: Condvar::new(),
        sent: EpochCell::new(),
        phase: tokio::sync::watch::Sender::new(Phase::Running),
        vm_ended: Mutex::new(None),
        failure: Mutex::new(None),
        done: CancellationToken::new(),
        taken_at: Mutex::default(),
        link_rate: Mutex::default(),
        switchover: Mutex::new(None),
        migration: Mutex::new(None),
        migrating: AtomicBool::new(false),
        beats: beats.clone(),
        log_acked: AtomicU64::new(0),
        replica_exits: AtomicU64::new(0),
        want_checkpoint: AtomicBool::new(false),
        seat,
        by_handover,
        opts: opts.clone(),
    });
    if adopted {
        // A VM this host took over runs unprotected until the other host
        // syncs as its backup, and its output goes out whatever the policy:
        // the old primary is stopped, deposed, or (partitioned under
        // hold-output) holds its own output, so no other copy serves. The
        // record that says so is on disk before that output, usually written
        // ahead while this host was the backup (`host_state::RecordsAhead`):
        // then this finds it written and writes nothing.
        if shared.record(RunState::ReleasedUnprotected) {
            shared.releaser.set_unprotected(true);
            stats.set_state(
                StateKind::UnprotectedReleasing,
                "unprotected: no backup yet, releasing output",
            );
        } else {
            stats.set_state(
                StateKind::UnprotectedHolding,
                "unprotected: no backup yet, holding output (cannot record the run)",
            );
        }
    } else if first_session.is_none() {
        // Started without a backup (start_unprotected): the policy decides.
        unprotected(&shared, "no backup yet");
    }
    let replicator = {
        let shared = shared.clone();
        let log = host.log.clone();
        std::thread::Builder::new()
            .name("replicator".into())
            .spawn({
                let runtime = tokio::runtime::Handle::current();
                move || {
                    Replicator::new(shared, vm, output, log, runtime)
                        .with_trace(trace, output_taken)
                        .run()
                }
            })
            .map_err(|e| PrimaryError::Thread("replicator", e))?
    };
    let (operator_tx, operator_rx) = tokio::sync::mpsc::channel(4);
    host.operator.install(operator_tx);
    let operator = tokio::spawn(accept_operator_requests(shared.clone(), operator_rx));

    let manager = tokio::spawn(session_manager(
        shared.clone(),
        first_session,
        shutdown.clone(),
    ));
    let witness_watch = shared
        .seat
        .clone()
        .map(|seat| tokio::spawn(watch_witness(shared.clone(), seat)));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = shared.done.cancelled() => {}
    }
    host.operator.clear();
    operator.abort();
    // Graceful stop: the replicator finishes its epoch, waits for the last ack
    // and says goodbye (see Replicator::run); a fenced one just stops.
    shared.stop();
    let _ = tokio::task::spawn_blocking(move || replicator.join()).await;
    // The VM no longer runs here: console input waits for the next one, and
    // clients are closed once they have every released byte (they follow the
    // VM to the other host by offset).
    host.input.set(None);
    host.log.disconnect_clients();
    let _ = manager.await;
    if let Some(w) = witness_watch {
        w.abort();
    }
    beats.stop();
    let _ = tokio::task::spawn_blocking(move || {
        for t in beat_threads {
            let _ = t.join();
        }
    })
    .await;
    // Stop answering for the VM: the next role takes its turn on the socket.
    shutdown.cancel();
    if let Some(mut answers) = answers {
        // The server lets go of the socket as soon as it stops accepting; a
        // deposed peer's open connection is not waited for long.
        if tokio::time::timeout(SERVER_RELEASE_WAIT, &mut answers)
            .await
            .is_err()
        {
            answers.abort();
        }
    }
    if let Some(responder) = shared.take_switchover() {
        let _ = responder.send(Err(tonic::Status::aborted(
            "the primary stopped before the switchover could start",
        )));
    }
    if let Some(request) = shared.take_migration() {
        let _ = request.responder.send(Err(tonic::Status::aborted(
            "the primary stopped before the migration could start",
        )));
    }
    if let Some(e) = shared
        .failure
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Err(PrimaryError::Internal(e));
    }
    match shared.phase() {
        Phase::Fenced(generation) => return Ok(PrimaryExit::Fenced { generation }),
        Phase::HandedOver(generation) => return Ok(PrimaryExit::HandedOver { generation }),
        Phase::MigratedAway(generation, destination) => {
            return Ok(PrimaryExit::MigratedAway {
                generation,
                destination,
            });
        }
        _ => {}
    }
    if let Some(end) = shared
        .vm_ended
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        return Ok(PrimaryExit::VmEnded(end));
    }
    Ok(PrimaryExit::Shutdown)
}

/// No backup holds the VM (`why`): output follows the backup-loss policy.
/// Before anything goes out unprotected, the run is recorded as such: a
/// restarted host then knows the backup's image is older than what clients
/// saw.
fn unprotected(shared: &Shared, why: &str) {
    match shared.opts.backup_loss {
        BackupLoss::KeepRunning => {
            if shared.record(RunState::ReleasedUnprotected) {
                shared.releaser.set_unprotected(true);
                shared.stats.set_state(
                    StateKind::UnprotectedReleasing,
                    format!("unprotected: {why}, releasing output"),
                );
            } else {
                shared.stats.set_state(
                    StateKind::UnprotectedHolding,
                    format!("unprotected: {why}, holding output (cannot record the run)"),
                );
            }
        }
        BackupLoss::HoldOutput => {
            shared.stats.set_state(
                StateKind::UnprotectedHolding,
                format!("unprotected: {why}, holding output"),
            );
        }
    }
}

/// How asking the witness about a lost backup ended.
#[derive(Debug, PartialEq, Eq)]
enum Loss {
    /// The backup-loss policy applies (with a witness: the key agreed).
    Settled,
    /// The witness did not answer: output stays held; ask again.
    Pending,
    /// The key names another host: this one is fenced.
    Deposed,
}

/// No backup holds the VM (`why`). With a witness and keep-running, output
/// goes out alone only once the key says this host runs the VM unprotected:
/// a backup that promoted first wins, and this host fences.
async fn lose_backup(shared: &Shared, why: &str) -> Loss {
    let Some(seat) = shared
        .seat
        .as_ref()
        .filter(|_| shared.opts.backup_loss == BackupLoss::KeepRunning)
    else {
        unprotected(shared, why);
        return Loss::Settled;
    };
    shared.stats.set_state(
        StateKind::UnprotectedHolding,
        format!("unprotected: {why}, asking the witness before releasing output"),
    );
    let no_backup = || !shared.stats.protected.load(Ordering::Acquire);
    match seat
        .claim("release output without a backup", false, no_backup)
        .await
    {
        Verdict::Granted => {
            unprotected(shared, why);
            Loss::Settled
        }
        Verdict::Moot => Loss::Settled,
        Verdict::Deposed(g) => {
            shared.fence(g);
            Loss::Deposed
        }
        Verdict::Unreachable(e) => {
            let e = wire::chain(&e);
            tracing::warn!(error = %e, "the witness cannot be asked: holding output");
            shared.stats.set_state(
                StateKind::WitnessUnreachable,
                format!("unprotected: {why}; the witness cannot be asked ({e}): holding output"),
            );
            Loss::Pending
        }
    }
}

/// While this host runs the VM, reads the witness's key every
/// `check_interval`: a host that could hear neither its backup nor the
/// witness learns it was deposed as soon as it hears the witness again.
async fn watch_witness(shared: Arc<Shared>, seat: Arc<Seat>) {
    loop {
        tokio::select! {
            _ = shared.done.cancelled() => return,
            _ = tokio::time::sleep(seat.check_interval()) => {}
        }
        if shared.phase().ending() {
            return;
        }
        if let Ok(Some(g)) = seat.check().await {
            tracing::error!(generation = g, "the witness gave the VM to another host");
            shared.fence(g);
            return;
        }
    }
}

/// Once a backup holds the VM, the key says so, which lets that backup
/// promote. Asked again while etcd does not answer and the VM stays
/// protected.
pub(crate) async fn claim_protected(shared: Arc<Shared>, seat: Arc<Seat>) {
    loop {
        let protected =
            || shared.stats.protected.load(Ordering::Acquire) && !shared.phase().ending();
        match seat.claim("protected by a backup", true, protected).await {
            Verdict::Granted | Verdict::Moot => return,
            Verdict::Deposed(g) => {
                shared.fence(g);
                return;
            }
            Verdict::Unreachable(e) => {
                tracing::warn!(error = %wire::chain(&e), "the witness cannot be told the VM is protected: the backup cannot promote until it is");
                tokio::select! {
                    _ = shared.done.cancelled() => return,
                    _ = tokio::time::sleep(seat.check_interval()) => {}
                }
            }
        }
    }
}

/// Takes operator requests from the Control service: switchovers are
/// queued for the replicator (refused at once when they cannot work); the
/// backup's requests are refused.
async fn accept_operator_requests(
    shared: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<OperatorRequest>,
) {
    while let Some(request) = requests.recv().await {
        let responder = match request {
            OperatorRequest::Switchover(responder) => responder,
            OperatorRequest::Migrate(req, responder) => {
                accept_migration(&shared, &req, responder);
                continue;
            }
            other => {
                let what = other.name();
                other.refuse(tonic::Status::failed_precondition(format!(
                    "{what} refused: this host runs the VM as the primary (ask the backup's control address)"
                )));
                continue;
            }
        };
        let refuse = if let Some(why) = &shared.opts.switchover_unavailable {
            Some(why.clone())
        } else if shared.migrating.load(Ordering::Acquire) {
            Some("a live migration is under way".into())
        } else if !shared.stats.protected.load(Ordering::Acquire) {
            Some(format!(
                "the VM is not protected ({}): the backup has no checkpoint to take over from",
                shared.stats.state()
            ))
        } else {
            None
        };
        if let Some(why) = refuse {
            let _ = responder.send(Err(tonic::Status::failed_precondition(format!(
                "switchover refused: {why}"
            ))));
            continue;
        }
        let mut slot = shared.switchover.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            let _ = responder.send(Err(tonic::Status::failed_precondition(
                "switchover refused: one is already under way",
            )));
        } else {
            tracing::info!("switchover requested: handing the VM to the backup");
            *slot = Some(responder);
        }
    }
}

/// Queues a live migration for the replicator, or refuses it at once.
fn accept_migration(
    shared: &Shared,
    req: &understudy_proto::MigrateRequest,
    responder: migration::Responder,
) {
    let refuse = |responder: migration::Responder, why: String| {
        let _ = responder.send(Err(tonic::Status::failed_precondition(format!(
            "migrate refused: {why}"
        ))));
    };
    let request = match migration::Request::parse(req, responder) {
        Ok(r) => r,
        Err((why, responder)) => return refuse(responder, why.to_string()),
    };
    let by_log = shared.opts.mode == ReplicationMode::Replay;
    match (by_log, request.mode == migration::MigrationMode::Replay) {
        (true, false) => {
            return refuse(
                request.responder,
                format!(
                    "the VM is replicated by its log (mode = \"replay\"): it migrates by replay \
                     (--mode replay), not {}",
                    request.mode.name()
                ),
            );
        }
        (false, true) => {
            return refuse(
                request.responder,
                "--mode replay ships the VM's log, and this VM is not recorded (mode = \
                 \"checkpoint\"): choose precopy, postcopy, hybrid or stop-and-copy, or run the \
                 VM with mode = \"replay\""
                    .into(),
            );
        }
        _ => {}
    }
    if shared.phase() != Phase::Running {
        return refuse(
            request.responder,
            "the primary is handing over or stopping".into(),
        );
    }
    if shared.switchover_waiting() {
        return refuse(request.responder, "a switchover is under way".into());
    }
    if shared.migrating.swap(true, Ordering::AcqRel) {
        return refuse(request.responder, "a migration is under way already".into());
    }
    tracing::info!(
        destination = %request.target.addr,
        mode = request.mode.name(),
        max_downtime = ?request.max_downtime,
        "live migration requested"
    );
    *shared.migration.lock().unwrap_or_else(|p| p.into_inner()) = Some(request);
    shared.wake();
}

/// Owns the gRPC side of each session until the primary stops or is fenced.
async fn session_manager(
    shared: Arc<Shared>,
    mut first: Option<(SessionOffer, Accepted)>,
    shutdown: CancellationToken,
) {
    let opts = shared.opts.clone();
    // Reconnect quickly at first (a backup that is just starting, as after a
    // switchover), then back off to the heartbeat timeout.
    let max_retry = opts.heartbeat_timeout.max(MIN_RECONNECT_BACKOFF);
    let mut retry = opts.heartbeat_interval;
    // Why the backup was lost, while the witness has not answered about it.
    let mut pending: Option<String> = None;
    // Why the last attempt to reach the backup failed, logged once per
    // reason (retries run every few hundred ms; a refused certificate or a
    // backup that is down would flood the log).
    let mut last_failure: Option<(String, bool)> = None;
    // After a handover, until when the backup being unreachable is expected.
    let quiet_until = shared.by_handover.then(|| Instant::now() + HANDOVER_QUIET);
    'sessions: loop {
        if shared.phase().ending() {
            return;
        }
        let (offer, client) = match first.take() {
            Some(s) => s,
            None => 'hello: {
                let offer = match SessionOffer::new(shared.generation, shared.incarnation, None) {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot open a session");
                        return;
                    }
                };
                // Why not, and whether to say so quietly: just after a
                // handover the other host is changing roles (a refusal is
                // never a passing state).
                let failed = match hello(&opts, &offer).await {
                    HelloOutcome::Accepted(accepted) => break 'hello (offer, accepted),
                    HelloOutcome::Deposed(g) => {
                        shared.fence(g);
                        return;
                    }
                    HelloOutcome::HoldsVm(why) => {
                        tracing::warn!(%why, "the backup holds another VM: this one stays unprotected until an operator decides");
                        let why = format!("the backup holds another VM ({why})");
                        match lose_backup(&shared, &why).await {
                            Loss::Deposed => return,
                            Loss::Pending => pending = Some(why),
                            Loss::Settled => pending = None,
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = shared.done.cancelled() => return,
                            _ = tokio::time::sleep(HOLDS_VM_RETRY) => {}
                        }
                        continue 'sessions;
                    }
                    HelloOutcome::Refused(message) => (message, false),
                    HelloOutcome::Unreachable(message) => {
                        (message, quiet_until.is_some_and(|t| Instant::now() < t))
                    }
                };
                if last_failure.as_ref() != Some(&failed) {
                    let message = &failed.0;
                    if failed.1 {
                        tracing::info!(%message, "backup not available yet (the hosts are changing roles): retrying");
                    } else {
                        tracing::warn!(%message, "backup not available yet: retrying");
                    }
                    last_failure = Some(failed);
                }
                if let Some(why) = pending.take() {
                    match lose_backup(&shared, &why).await {
                        Loss::Deposed => return,
                        Loss::Pending => pending = Some(why),
                        Loss::Settled => {}
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = shared.done.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(max_retry);
                continue 'sessions;
            }
        };
        retry = opts.heartbeat_interval;
        pending = None;
        last_failure = None;
        shared.releaser.new_session();
        shared.stats.set_state(StateKind::Syncing, "syncing");
        let reason = run_session(&shared, offer, client).await;
        shared.stats.protected.store(false, Ordering::Release);
        // A handover ends the session from the other side; let the
        // replicator settle it before treating this as a lost backup.
        let _ = shared
            .phase
            .subscribe()
            .wait_for(|p| !matches!(p, Phase::HandingOver { .. }))
            .await;
        if shared.phase().ending() {
            return;
        }
        tracing::warn!(%reason, "replication session lost");
        shared.stats.set_state(
            StateKind::Reconnecting,
            format!("replication session lost ({reason}): reconnecting"),
        );
        // Before releasing anything unprotected, ask the backup: a promotion we
        // could learn of must win over our own output.
        match probe(&opts, shared.generation).await {
            Ok((g, role)) if g > shared.generation || role == Some(Role::Primary) => {
                shared.fence(g.max(shared.generation + 1));
                return;
            }
            Ok(_) => tracing::info!("backup still there: resyncing"),
            Err(why) => {
                tracing::warn!(why = %wire::chain(&why), policy = ?opts.backup_loss, "backup unreachable");
                match lose_backup(&shared, "backup lost").await {
                    Loss::Deposed => return,
                    Loss::Pending => pending = Some("backup lost".into()),
                    Loss::Settled => {}
                }
            }
        }
    }
}

/// One session: chunk stream out, acks in; the heartbeat thread beats for
/// it. Returns why it ended.
async fn run_session(shared: &Arc<Shared>, offer: SessionOffer, accepted: Accepted) -> String {
    let opts = &shared.opts;
    let generation = shared.generation;
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<EpochChunk>(64);
    let channel = accepted.channel.clone();
    let opening = Instant::now();
    let acks = understudy_proto::framing::replicate(
        accepted.channel,
        tokio_stream::wrappers::ReceiverStream::new(chunk_rx),
    )
    .await;
    let mut acks = match acks {
        Ok(acks) => acks,
        Err(status) => return session_error(shared, &status),
    };
    shared
        .beats
        .set_session(Some((offer.id, offer.key.clone())));
    let broken = Arc::new(AtomicBool::new(false));
    shared.set_session(Some(SessionLink {
        id: offer.id,
        chunks: chunk_tx,
        broken: broken.clone(),
        pages_by_hash: accepted.pages_by_hash,
        image_zeroed: accepted.image_zeroed,
        hello_took: accepted.took,
        opening,
        channel,
    }));
    let give_up = understudy_common::heartbeat::primary_gives_up(opts.heartbeat_timeout);
    let mut last_ack = Instant::now();
    let mut tick = tokio::time::interval(opts.heartbeat_interval);
    // Not torn down on shutdown: the replicator finishes its last epoch and
    // says goodbye through this session first, then cancels `done`.
    let reason = loop {
        tokio::select! {
            _ = shared.done.cancelled() => break "stopping".to_string(),
            ack = acks.next() => match ack {
                Some(Ok(ack)) => {
                    last_ack = Instant::now();
                    if ack.generation > generation {
                        shared.fence(ack.generation);
                        break "deposed".into();
                    }
                    match shared.opts.mode {
                        ReplicationMode::Checkpoint => shared.releaser.acked(ack.epoch),
                        // Output is keyed by exit index: the backup holds a
                        // checkpoint and the log up to `log_exits`.
                        ReplicationMode::Replay => {
                            if ack.log_exits > 0 {
                                shared.log_acked.fetch_max(ack.log_exits, Ordering::AcqRel);
                                shared.releaser.acked(ack.log_exits);
                            }
                            shared.replica_exits.store(ack.replica_exits, Ordering::Release);
                            if ack.want_checkpoint {
                                shared.want_checkpoint.store(true, Ordering::Release);
                            }
                        }
                    }
                    let Some(epoch) = Epoch::from_wire(ack.epoch) else {
                        // An ack of log alone.
                        continue;
                    };
                    {
                        let mut acked = shared.acked();
                        *acked = (*acked).max(Some(epoch));
                        shared.record_lag(*acked);
                    }
                    shared.acked_cv.notify_all();
                    shared.stats.set_last_epoch(epoch);
                    shared
                        .link_rate
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .acked(epoch.0, Instant::now());
                    let mut taken = shared.taken_at.lock().unwrap_or_else(|p| p.into_inner());
                    while let Some(&(epoch, at)) = taken.front() {
                        if epoch > ack.epoch {
                            break;
                        }
                        if epoch == ack.epoch {
                            shared.stats.record_ack(at.elapsed());
                        }
                        taken.pop_front();
                    }
                }
                Some(Err(status)) => break session_error(shared, &status),
                None => break "the backup closed the replication stream".into(),
            },
            _ = tick.tick() => {
                // Lenient on this side: a false "backup lost" costs a resync,
                // and fencing does not depend on it (a promoted backup's
                // answers carry its higher generation).
                let silent = last_ack.elapsed().min(shared.beats.since_echo());
                if silent > give_up {
                    break format!("no word from the backup for {silent:?}");
                }
                if broken.load(Ordering::Acquire) {
                    break "the replicator left the session".into();
                }
            }
        }
    };
    shared.beats.set_session(None);
    broken.store(true, Ordering::Release);
    shared.set_session(None);
    // Wake a replicator waiting for acks of this session: it must not sleep
    // through the loss (holding output, stalling re-protection).
    shared.wake();
    reason
}

fn session_error(shared: &Shared, status: &tonic::Status) -> String {
    if let Some(g) = wire::deposed_generation(status)
        && g > shared.generation
    {
        shared.fence(g);
        return "deposed".into();
    }
    format!("{}: {}", status.code(), status.message())
}

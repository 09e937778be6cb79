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
//! good ([`PrimaryExit::HandedOver`]). A primary can also start around a VM a
//! handover gave this host ([`Start::Adopt`]).
//!
//! Threads: the *replicator* (a std thread) owns the VM and the sender state, so
//! the pause path never waits on the async runtime; the async *session manager*
//! owns the gRPC streams, acks, heartbeats and failure handling. They meet in
//! [`Shared`]. Every output release goes through [`Releaser`], which a fence
//! closes for good.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use understudy_checkpoint::epoch::{EpochKind, SenderState};
use understudy_checkpoint::{CodecPolicy, PAGE_SIZE};
use understudy_common::console::ConsoleLog;
use understudy_common::payload::CheckpointPayload;
use understudy_common::role::{HostIo, RunningVm, SwitchoverResponder};
use understudy_common::status::Stats;
use understudy_common::wire;
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::replication_server::{Replication, ReplicationServer};
use understudy_proto::{
    Beat, EpochChunk, GoodbyeRequest, HandoverReply, HandoverRequest, HelloRequest,
    PROTOCOL_VERSION, ProbeRequest, SwitchoverReply,
};
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, RamBacking, Vm, VmEnd};

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
    pub vm_id: String,
    pub boot: BuiltinBoot,
    pub ram_bytes: usize,
    pub state_dir: PathBuf,
    pub backup: SocketAddr,
    pub epoch_interval: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub backup_loss: BackupLoss,
    pub codec: CodecPolicy,
    /// Epochs shipped but not yet acked before the epoch loop waits.
    pub max_in_flight: u64,
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
}

/// How the primary gets its VM.
#[derive(Debug)]
pub enum Start {
    /// Boot the configured guest (after the first handshake with the backup).
    Boot,
    /// Protect a VM a handover left running on this host.
    Adopt(Box<RunningVm>),
}

/// Why the primary stopped or refused to start.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error(
        "this primary was deposed: the backup was promoted at generation {generation}, so VM {vm:?} \
         runs there now. Refusing to run it here too. Make this host the backup of the new primary; \
         only if you are sure no other copy runs, delete {marker} to override"
    )]
    Fenced {
        vm: String,
        generation: u64,
        marker: PathBuf,
    },
    #[error("state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Listen(#[from] wire::ListenError),
    #[error("the backup at {addr} refused the primary: {message}")]
    Refused { addr: SocketAddr, message: String },
    #[error("cannot start the VM")]
    Vm(#[source] understudy_vmm::VmError),
    #[error("replication failed: {0}")]
    Replication(String),
    #[error("gRPC server failed")]
    Server(#[source] tonic::transport::Error),
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
    Fenced { generation: u64 },
    /// A switchover handed the VM to the backup, which runs it now at
    /// `generation`; the VM here is stopped and this host should become the
    /// backup.
    HandedOver { generation: u64 },
}

const FENCED_FILE: &str = "fenced";
const GENERATION_FILE: &str = "generation";
/// Sync rounds stop when this few pages are still dirty (or after MAX_ROUNDS).
const SYNC_CONVERGED_PAGES: usize = 256;
const MAX_SYNC_ROUNDS: usize = 8;
/// Pages encoded between chunk hand-offs during a sync round.
const STREAM_EVERY_PAGES: usize = 512;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a handover may take (the backup maps its image and restores).
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Releases console output, unless fenced.
#[derive(Debug)]
struct Releaser {
    log: Arc<ConsoleLog>,
    state: Mutex<ReleaseState>,
}

#[derive(Debug, Default)]
struct ReleaseState {
    fenced: bool,
    /// Backup lost under keep-running: output goes out at once.
    unprotected: bool,
    /// (epoch, console end offset) of checkpoints not yet acked.
    pending: VecDeque<(u64, u64)>,
}

impl Releaser {
    fn lock(&self) -> MutexGuard<'_, ReleaseState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checkpoint `epoch` covers output up to `end`.
    fn checkpoint_taken(&self, epoch: u64, end: u64) {
        let mut s = self.lock();
        if s.unprotected && !s.fenced {
            self.log.release_to(end);
        } else {
            s.pending.push_back((epoch, end));
        }
    }

    /// The backup committed `epoch`: its output (and all before) may go out.
    fn acked(&self, epoch: u64) {
        let mut s = self.lock();
        let mut release = None;
        while let Some(&(e, end)) = s.pending.front() {
            if e > epoch {
                break;
            }
            release = Some(end);
            s.pending.pop_front();
        }
        if let (Some(end), false) = (release, s.fenced) {
            self.log.release_to(end);
        }
    }

    /// Output produced while no session runs.
    fn produced_unprotected(&self) {
        let s = self.lock();
        if s.unprotected && !s.fenced {
            self.log.release_all();
        }
    }

    fn set_unprotected(&self, on: bool) {
        let mut s = self.lock();
        if s.fenced {
            return;
        }
        s.unprotected = on;
        if on {
            s.pending.clear();
            self.log.release_all();
        }
    }

    /// A new session: epochs of the old one will never be acked. Output
    /// released unprotected (keep-running) stays so through the new
    /// session's sync: no backup could promote from it before its first
    /// checkpoint commits.
    fn new_session(&self) {
        self.lock().pending.clear();
    }

    /// The new session's first checkpoint is acked: from here on output
    /// waits for the ack of its epoch again.
    fn session_protected(&self) {
        self.lock().unprotected = false;
    }

    /// Closes the releaser for good and drops everything unreleased.
    fn fence(&self) -> usize {
        let mut s = self.lock();
        s.fenced = true;
        s.pending.clear();
        self.log.discard_unreleased()
    }
}

/// A live replication session, as the replicator thread sees it.
#[derive(Debug, Clone)]
struct SessionLink {
    id: u64,
    chunks: tokio::sync::mpsc::Sender<EpochChunk>,
    broken: Arc<AtomicBool>,
}

/// What the replicator thread and the async side share.
#[derive(Debug)]
struct Shared {
    opts: PrimaryOptions,
    generation: u64,
    stats: Arc<Stats>,
    releaser: Releaser,
    session: Mutex<Option<SessionLink>>,
    /// Last acked epoch + 1 (0 = none), with a condvar for back-pressure.
    acked: Mutex<u64>,
    acked_cv: Condvar,
    /// Last epoch handed to the session (sync round or checkpoint) + 1.
    sent: AtomicU64,
    stop: AtomicBool,
    /// Generation that deposed us (0 = not fenced).
    fenced_by: AtomicU64,
    vm_ended: Mutex<Option<VmEnd>>,
    done: CancellationToken,
    /// When each unacked checkpoint was taken, for ack latency.
    taken_at: Mutex<VecDeque<(u64, Instant)>>,
    /// A switchover the replicator is to carry out at its next checkpoint.
    switchover: Mutex<Option<SwitchoverResponder>>,
    /// The generation the VM was handed over at (0 = not handed over).
    handed_over: AtomicU64,
    /// A handover is under way: the backup's promotion (a higher generation
    /// in its beats) is expected, not a fence.
    handing_over: AtomicBool,
    /// The highest generation seen while handing over.
    seen_while_handing_over: AtomicU64,
}

impl Shared {
    /// Replication lag: epochs sent and not yet acked (`acked` = last acked + 1).
    fn record_lag(&self, acked: u64) {
        let sent = self.sent.load(Ordering::Acquire);
        self.stats
            .in_flight
            .store(sent.saturating_sub(acked), Ordering::Relaxed);
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
            || self.fenced_by.load(Ordering::Acquire) != 0
            || self.handed_over.load(Ordering::Acquire) != 0
    }

    fn take_switchover(&self) -> Option<SwitchoverResponder> {
        self.switchover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Fences: from now on nothing is released; the replicator stops the VM.
    /// During and after a handover the backup's promotion is the expected
    /// outcome: the replicator, which holds the paused VM, finishes the
    /// handover instead.
    fn fence(&self, generation: u64) {
        if self.handing_over.load(Ordering::Acquire)
            || self.handed_over.load(Ordering::Acquire) != 0
        {
            self.seen_while_handing_over
                .fetch_max(generation, Ordering::AcqRel);
            return;
        }
        if self
            .fenced_by
            .compare_exchange(0, generation, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let dropped = self.releaser.fence();
        tracing::error!(
            generation,
            dropped_output_bytes = dropped,
            "deposed by a higher generation: fencing"
        );
        self.stats
            .set_state(format!("fenced: deposed by generation {generation}"));
        let marker = self.opts.state_dir.join(FENCED_FILE);
        if let Err(e) = std::fs::write(&marker, format!("{generation}\n")) {
            tracing::error!(error = %e, path = %marker.display(), "cannot write the fenced marker");
        }
        self.acked_cv.notify_all();
        self.done.cancel();
    }

    fn set_session(&self, link: Option<SessionLink>) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = link;
    }

    fn acked_plus_one(&self) -> MutexGuard<'_, u64> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn check_not_fenced(opts: &PrimaryOptions) -> Result<u64, PrimaryError> {
    let dir = &opts.state_dir;
    let io = |source| PrimaryError::StateDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let marker = dir.join(FENCED_FILE);
    match std::fs::read_to_string(&marker) {
        Ok(text) => {
            return Err(PrimaryError::Fenced {
                vm: opts.vm_id.clone(),
                generation: text.trim().parse().unwrap_or_default(),
                marker,
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let path = dir.join(GENERATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            io(std::io::Error::other(format!(
                "{} does not hold a generation number",
                path.display()
            )))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::write(&path, "1\n").map_err(io)?;
            Ok(1)
        }
        Err(e) => Err(io(e)),
    }
}

/// The one place channels to the backup are built (mutual TLS unless the
/// configuration says insecure).
fn endpoint(opts: &PrimaryOptions) -> Result<Endpoint, PrimaryError> {
    let addr = opts.backup;
    let mut endpoint =
        Endpoint::from_shared(format!("{}://{addr}", wire::scheme(opts.tls.is_some())))
            .map_err(|e| PrimaryError::Replication(e.to_string()))?
            .connect_timeout(wire::CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(wire::STREAM_WINDOW)
            .initial_connection_window_size(wire::CONNECTION_WINDOW);
    if let Some(tls) = &opts.tls {
        let server_name = opts
            .backup_name
            .clone()
            .unwrap_or_else(|| addr.ip().to_string());
        let config = tls
            .client(&server_name)
            .map_err(|e| PrimaryError::Tls(wire::chain(&e)))?;
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| PrimaryError::Tls(wire::chain(&e)))?;
    }
    Ok(endpoint)
}

/// What the backup said to a Hello.
enum HelloOutcome {
    Accepted(ReplicationClient<Channel>),
    Deposed(u64),
    Refused(String),
    Unreachable(String),
}

async fn hello(opts: &PrimaryOptions, generation: u64, session: u64) -> HelloOutcome {
    let channel = match endpoint(opts) {
        Ok(e) => match e.connect().await {
            Ok(c) => c,
            Err(e) => return HelloOutcome::Unreachable(e.to_string()),
        },
        Err(e) => return HelloOutcome::Unreachable(e.to_string()),
    };
    let mut client = ReplicationClient::new(channel);
    let req = HelloRequest {
        protocol_version: PROTOCOL_VERSION,
        vm_id: opts.vm_id.clone(),
        generation,
        ram_bytes: opts.ram_bytes as u64,
        session,
    };
    match client.hello(req).await {
        Ok(_) => HelloOutcome::Accepted(client),
        // Only the backup's deliberate answers refuse us for good (wrong VM,
        // RAM size or protocol); anything else, such as a TLS handshake the
        // backup broke off or a reset connection, is worth another try.
        Err(status) => match wire::deposed_generation(&status) {
            Some(g) if g > generation => HelloOutcome::Deposed(g),
            _ if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ) =>
            {
                HelloOutcome::Refused(status.message().into())
            }
            _ => HelloOutcome::Unreachable(match std::error::Error::source(&status) {
                Some(source) => format!("{}: {}", status.message(), wire::chain(source)),
                None => status.message().into(),
            }),
        },
    }
}

/// Runs the primary until `shutdown`, a fence, a handover, or the guest's
/// end. `host` holds the console (served by the daemon), the status the
/// daemon reports, and the slot switchover requests arrive through.
pub async fn run(
    opts: PrimaryOptions,
    host: HostIo,
    shutdown: CancellationToken,
    start: Start,
) -> Result<PrimaryExit, PrimaryError> {
    let stats = host.stats.clone();
    let generation = match &start {
        Start::Boot => check_not_fenced(&opts)?,
        Start::Adopt(running) => adopt_generation(&opts, running.generation)?,
    };
    stats.generation.store(generation, Ordering::Release);

    let mut first_session = None;
    let adopted = matches!(start, Start::Adopt(_));
    let (vm, output, unprotected_start) = match start {
        Start::Boot => {
            // First handshake before the VM runs: a primary that cannot ask
            // the backup cannot know it was not deposed.
            stats.set_state("waiting for the backup");
            let mut next_session = session_id();
            loop {
                match hello(&opts, generation, next_session).await {
                    HelloOutcome::Accepted(client) => {
                        first_session = Some((next_session, client));
                        break;
                    }
                    HelloOutcome::Deposed(g) => {
                        let marker = opts.state_dir.join(FENCED_FILE);
                        let _ = std::fs::write(&marker, format!("{g}\n"));
                        return Err(PrimaryError::Fenced {
                            vm: opts.vm_id.clone(),
                            generation: g,
                            marker,
                        });
                    }
                    HelloOutcome::Refused(message) => {
                        return Err(PrimaryError::Refused {
                            addr: opts.backup,
                            message,
                        });
                    }
                    HelloOutcome::Unreachable(why) => {
                        if opts.start_unprotected {
                            tracing::warn!(%why, "backup unreachable; starting unprotected as configured");
                            break;
                        }
                        tracing::info!(%why, backup = %opts.backup, "waiting for the backup");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(PrimaryExit::Shutdown),
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                        next_session = session_id();
                    }
                }
            }
            let ram = GuestRam::new(opts.ram_bytes, RamBacking::Anonymous)
                .map_err(|e| PrimaryError::Vm(e.into()))?;
            let (vm, vm_console) = Vm::boot(
                ram,
                &opts.boot.clone(),
                BootOptions {
                    boot_record: Some(opts.boot.clone()),
                    start_paused: false,
                    dirty_logging: true,
                },
            )
            .map_err(PrimaryError::Vm)?;
            host.input.set(Some(vm_console.input.clone()));
            tracing::info!(vm = %opts.vm_id, guest = %opts.boot.guest, generation, "VM booted");
            (vm, vm_console.output, first_session.is_none())
        }
        Start::Adopt(running) => {
            let RunningVm { mut vm, output, .. } = *running;
            vm.start_dirty_logging().map_err(PrimaryError::Vm)?;
            // Clients without a resume offset get output from now on.
            host.log.set_raw_start(None);
            tracing::info!(vm = %opts.vm_id, generation, backup = %opts.backup, "protecting the VM this host took over");
            (vm, output, true)
        }
    };
    // Whoever dials this host's replication address learns that the VM runs
    // here (an old primary coming back is deposed and rejoins as the backup).
    let answers = match &host.replication {
        Some(shared) => {
            let listener = shared
                .take_turn()
                .map_err(|source| wire::ListenError::new("replication", shared.addr, source))?;
            let server = wire::server(opts.tls.as_ref())
                .map_err(PrimaryError::Tls)?
                .add_service(ReplicationServer::new(RunsHere { generation }))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown.clone().cancelled_owned(),
                );
            Some(tokio::spawn(server))
        }
        None => None,
    };

    let shared = Arc::new(Shared {
        generation,
        stats: stats.clone(),
        releaser: Releaser {
            log: host.log.clone(),
            state: Mutex::default(),
        },
        session: Mutex::new(None),
        acked: Mutex::new(0),
        acked_cv: Condvar::new(),
        sent: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        fenced_by: AtomicU64::new(0),
        vm_ended: Mutex::new(None),
        done: CancellationToken::new(),
        taken_at: Mutex::default(),
        switchover: Mutex::new(None),
        handed_over: AtomicU64::new(0),
        handing_over: AtomicBool::new(false),
        seen_while_handing_over: AtomicU64::new(0),
        opts: opts.clone(),
    });
    if unprotected_start {
        // A VM this host took over runs unprotected until the other host
        // syncs as its backup, and its output goes out (as it did right after
        // a promotion: the old primary is stopped or deposed, no other copy
        // runs). A primary started without a backup follows the policy.
        if adopted {
            shared.releaser.set_unprotected(true);
            stats.set_state("unprotected: no backup yet, releasing output");
        } else {
            unprotected(&shared, "no backup yet");
        }
    }
    let replicator = {
        let shared = shared.clone();
        let log = host.log.clone();
        std::thread::Builder::new()
            .name("replicator".into())
            .spawn({
                let runtime = tokio::runtime::Handle::current();
                move || Replicator::new(shared, vm, output, log, runtime).run()
            })
            .map_err(|e| PrimaryError::Replication(e.to_string()))?
    };
    let (switchover_tx, switchover_rx) = tokio::sync::mpsc::channel(1);
    host.switchover.install(switchover_tx);
    let switchovers = tokio::spawn(accept_switchovers(shared.clone(), switchover_rx));

    let manager = tokio::spawn(session_manager(
        shared.clone(),
        first_session,
        shutdown.clone(),
    ));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = shared.done.cancelled() => {}
    }
    host.switchover.clear();
    switchovers.abort();
    // Graceful stop: the replicator finishes its epoch, waits for the last ack
    // and says goodbye (see Replicator::run); a fenced one just stops.
    shared.stop.store(true, Ordering::Release);
    shared.acked_cv.notify_all();
    let _ = tokio::task::spawn_blocking(move || replicator.join()).await;
    let _ = manager.await;
    // Stop answering for the VM: the next role takes its turn on the socket.
    shutdown.cancel();
    if let Some(mut answers) = answers {
        // The server lets go of the socket as soon as it stops accepting; a
        // deposed peer's open connection is not waited for long.
        if tokio::time::timeout(Duration::from_millis(200), &mut answers)
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
    let fenced = shared.fenced_by.load(Ordering::Acquire);
    if fenced != 0 {
        return Ok(PrimaryExit::Fenced { generation: fenced });
    }
    let handed_over = shared.handed_over.load(Ordering::Acquire);
    if handed_over != 0 {
        return Ok(PrimaryExit::HandedOver {
            generation: handed_over,
        });
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

/// A handed-over VM runs at the generation its promotion recorded; this
/// host's primary state follows (a fence marker left from an older
/// generation no longer applies).
fn adopt_generation(opts: &PrimaryOptions, generation: u64) -> Result<u64, PrimaryError> {
    let dir = &opts.state_dir;
    let io = |source| PrimaryError::StateDir {
        path: dir.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join(GENERATION_FILE), format!("{generation}\n")).map_err(io)?;
    match std::fs::remove_file(dir.join(FENCED_FILE)) {
        Ok(()) => tracing::info!(generation, "removed a fence marker of an older generation"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    Ok(generation)
}

/// No backup holds the VM (`why`): output follows the backup-loss policy.
fn unprotected(shared: &Shared, why: &str) {
    match shared.opts.backup_loss {
        BackupLoss::KeepRunning => {
            shared.releaser.set_unprotected(true);
            shared
                .stats
                .set_state(format!("unprotected: {why}, releasing output"));
        }
        BackupLoss::HoldOutput => {
            shared
                .stats
                .set_state(format!("unprotected: {why}, holding output"));
        }
    }
}

/// Takes switchover requests from the Control service and queues one for
/// the replicator, refusing at once what cannot work.
async fn accept_switchovers(
    shared: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<SwitchoverResponder>,
) {
    while let Some(responder) = requests.recv().await {
        let refuse = if let Some(why) = &shared.opts.switchover_unavailable {
            Some(why.clone())
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

async fn say_goodbye(opts: &PrimaryOptions, generation: u64, session: u64) {
    if let Ok(e) = endpoint(opts)
        && let Ok(channel) = e.connect().await
    {
        let mut client = ReplicationClient::new(channel);
        match client
            .goodbye(GoodbyeRequest {
                generation,
                session,
            })
            .await
        {
            Ok(_) => tracing::info!("told the backup we stop on purpose"),
            Err(status) => tracing::warn!(%status, "goodbye refused"),
        }
    }
}

/// The replication service of a host whose primary role runs the VM: it
/// takes no replication and answers every primary that dials it that it was
/// deposed, with this generation (a probe learns who runs the VM).
struct RunsHere {
    generation: u64,
}

impl RunsHere {
    fn deposed<T>(&self) -> Result<T, tonic::Status> {
        Err(wire::deposed(
            self.generation,
            format!(
                "deposed: the VM runs on this host as the primary at generation {}; this host is not a backup",
                self.generation
            ),
        ))
    }
}

type Refused<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Replication for RunsHere {
    async fn hello(
        &self,
        _: tonic::Request<HelloRequest>,
    ) -> Result<tonic::Response<understudy_proto::HelloReply>, tonic::Status> {
        self.deposed()
    }

    type ReplicateStream = Refused<understudy_proto::Ack>;

    async fn replicate(
        &self,
        _: tonic::Request<tonic::Streaming<EpochChunk>>,
    ) -> Result<tonic::Response<Self::ReplicateStream>, tonic::Status> {
        self.deposed()
    }

    type HeartbeatStream = Refused<Beat>;

    async fn heartbeat(
        &self,
        _: tonic::Request<tonic::Streaming<Beat>>,
    ) -> Result<tonic::Response<Self::HeartbeatStream>, tonic::Status> {
        self.deposed()
    }

    async fn goodbye(
        &self,
        _: tonic::Request<GoodbyeRequest>,
    ) -> Result<tonic::Response<understudy_proto::GoodbyeReply>, tonic::Status> {
        self.deposed()
    }

    async fn probe(
        &self,
        _: tonic::Request<ProbeRequest>,
    ) -> Result<tonic::Response<understudy_proto::ProbeReply>, tonic::Status> {
        Ok(tonic::Response::new(understudy_proto::ProbeReply {
            generation: self.generation,
            role: "primary".into(),
        }))
    }

    async fn handover(
        &self,
        _: tonic::Request<HandoverRequest>,
    ) -> Result<tonic::Response<HandoverReply>, tonic::Status> {
        self.deposed()
    }
}

/// What the backup said to a handover.
enum HandoverOutcome {
    Done(HandoverReply),
    /// It certainly did not promote (refused, or never reached).
    NotTaken(String),
    Deposed(u64),
    /// The request may have reached it.
    Unknown(String),
}

async fn handover(
    opts: &PrimaryOptions,
    generation: u64,
    session: u64,
    epoch: u64,
) -> HandoverOutcome {
    let connect = async {
        endpoint(opts)?
            .connect()
            .await
            .map_err(|e| PrimaryError::Replication(e.to_string()))
    };
    let channel = match tokio::time::timeout(wire::CONNECT_TIMEOUT, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return HandoverOutcome::NotTaken(format!("cannot reach the backup: {e}")),
        Err(_) => return HandoverOutcome::NotTaken("cannot reach the backup: timed out".into()),
    };
    let mut client = ReplicationClient::new(channel);
    let request = client.handover(HandoverRequest {
        generation,
        session,
        epoch,
    });
    match tokio::time::timeout(HANDOVER_TIMEOUT, request).await {
        Ok(Ok(reply)) => HandoverOutcome::Done(reply.into_inner()),
        Ok(Err(status)) => match wire::deposed_generation(&status) {
            Some(g) if g > generation => HandoverOutcome::Deposed(g),
            _ if status.code() == tonic::Code::FailedPrecondition => {
                HandoverOutcome::NotTaken(status.message().into())
            }
            _ => HandoverOutcome::Unknown(status.to_string()),
        },
        Err(_) => HandoverOutcome::Unknown(format!("no answer within {HANDOVER_TIMEOUT:?}")),
    }
}

fn session_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1
}

/// Owns the gRPC side of each session until the primary stops or is fenced.
async fn session_manager(
    shared: Arc<Shared>,
    mut first: Option<(u64, ReplicationClient<Channel>)>,
    shutdown: CancellationToken,
) {
    let opts = shared.opts.clone();
    // Reconnect quickly at first (a backup that is just starting, as after a
    // switchover), then back off to the heartbeat timeout.
    let max_retry = opts.heartbeat_timeout.max(Duration::from_millis(200));
    let mut retry = opts.heartbeat_interval;
    loop {
        if shared.stopping() {
            return;
        }
        let (session, client) = match first.take() {
            Some(s) => s,
            None => {
                let id = session_id();
                match hello(&opts, shared.generation, id).await {
                    HelloOutcome::Accepted(client) => (id, client),
                    HelloOutcome::Deposed(g) => {
                        shared.fence(g);
                        return;
                    }
                    HelloOutcome::Refused(message) | HelloOutcome::Unreachable(message) => {
                        tracing::debug!(%message, "backup not available yet");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = shared.done.cancelled() => return,
                            _ = tokio::time::sleep(retry) => {}
                        }
                        retry = (retry * 2).min(max_retry);
                        continue;
                    }
                }
            }
        };
        retry = opts.heartbeat_interval;
        shared.releaser.new_session();
        shared.stats.set_state("syncing");
        let reason = run_session(&shared, session, client).await;
        shared.stats.protected.store(false, Ordering::Release);
        // A handover ends the session from the other side; let the
        // replicator settle it before treating this as a lost backup.
        while shared.handing_over.load(Ordering::Acquire) && !shared.stopping() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if shared.stopping() {
            return;
        }
        tracing::warn!(%reason, "replication session lost");
        shared
            .stats
            .set_state(format!("replication session lost ({reason}): reconnecting"));
        // Before releasing anything unprotected, ask the backup: a promotion we
        // could learn of must win over our own output.
        match probe(&opts, shared.generation).await {
            Ok((g, role)) if g > shared.generation || role == "primary" => {
                shared.fence(g.max(shared.generation + 1));
                return;
            }
            Ok(_) => tracing::info!("backup still there: resyncing"),
            Err(why) => {
                tracing::warn!(%why, policy = ?opts.backup_loss, "backup unreachable");
                unprotected(&shared, "backup lost");
            }
        }
    }
}

async fn probe(opts: &PrimaryOptions, generation: u64) -> Result<(u64, String), String> {
    let attempt = async {
        let channel = endpoint(opts)
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let reply = ReplicationClient::new(channel)
            .probe(ProbeRequest { generation })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        Ok((reply.generation, reply.role))
    };
    tokio::time::timeout(PROBE_TIMEOUT, attempt)
        .await
        .map_err(|_| "probe timed out".to_string())?
}

/// One session: chunk stream out, acks in, heartbeats both ways. Returns why
/// it ended.
async fn run_session(
    shared: &Arc<Shared>,
    session: u64,
    mut client: ReplicationClient<Channel>,
) -> String {
    let opts = &shared.opts;
    let generation = shared.generation;
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<EpochChunk>(64);
    let acks = client
        .replicate(tokio_stream::wrappers::ReceiverStream::new(chunk_rx))
        .await;
    let mut acks = match acks {
        Ok(r) => r.into_inner(),
        Err(status) => return session_error(shared, &status),
    };
    let interval = opts.heartbeat_interval;
    let beat_times: BeatTimes = Arc::default();
    let beats_out = async_stream_beats(generation, interval, beat_times.clone());
    let mut beats = match client.heartbeat(beats_out).await {
        Ok(r) => r.into_inner(),
        Err(status) => return session_error(shared, &status),
    };
    let broken = Arc::new(AtomicBool::new(false));
    shared.set_session(Some(SessionLink {
        id: session,
        chunks: chunk_tx,
        broken: broken.clone(),
    }));
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(interval);
    // Not torn down on shutdown: the replicator finishes its last epoch and
    // says goodbye through this session first, then cancels `done`.
    let reason = loop {
        tokio::select! {
            _ = shared.done.cancelled() => break "stopping".to_string(),
            ack = acks.next() => match ack {
                Some(Ok(ack)) => {
                    last_heard = Instant::now();
                    if ack.generation > generation {
                        shared.fence(ack.generation);
                        break "deposed".into();
                    }
                    shared.releaser.acked(ack.epoch);
                    {
                        let mut acked = shared.acked_plus_one();
                        *acked = (*acked).max(ack.epoch + 1);
                        shared.record_lag(*acked);
                    }
                    shared.acked_cv.notify_all();
                    shared.stats.set_last_epoch(ack.epoch);
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
            beat = beats.next() => match beat {
                Some(Ok(beat)) => {
                    if beat.generation > generation {
                        shared.fence(beat.generation);
                        break "deposed".into();
                    }
                    let echoed = beat_times
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .find(|(seq, _)| *seq == beat.echo_seq)
                        .map(|(_, at)| at.elapsed());
                    if let Some(rtt) = echoed {
                        shared.stats.record_heartbeat_rtt(rtt);
                    }
                    last_heard = Instant::now();
                }
                Some(Err(status)) => break session_error(shared, &status),
                None => break "the backup closed the heartbeat stream".into(),
            },
            _ = tick.tick() => {
                // Lenient on this side: a false "backup lost" costs a resync,
                // and fencing does not depend on it (a promoted backup's beats
                // and answers carry its higher generation).
                if last_heard.elapsed() > (opts.heartbeat_timeout * 3).max(Duration::from_secs(1)) {
                    break format!("no word from the backup for {:?}", last_heard.elapsed());
                }
                if broken.load(Ordering::Acquire) {
                    break "the replicator left the session".into();
                }
            }
        }
    };
    broken.store(true, Ordering::Release);
    shared.set_session(None);
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

/// When each recent beat was sent, by seq, for round-trip times.
type BeatTimes = Arc<Mutex<VecDeque<(u64, Instant)>>>;

fn async_stream_beats(
    generation: u64,
    interval: Duration,
    sent: BeatTimes,
) -> impl tokio_stream::Stream<Item = Beat> {
    let mut seq = 0u64;
    tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(interval)).map(move |_| {
        seq += 1;
        let mut sent = sent.lock().unwrap_or_else(|p| p.into_inner());
        if sent.len() >= 64 {
            sent.pop_front();
        }
        sent.push_back((seq, Instant::now()));
        Beat {
            generation,
            seq,
            role: "primary".into(),
            echo_seq: 0,
        }
    })
}

/// The thread that owns the VM.
struct Replicator {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    /// The session the last checkpoint was acked in (for the goodbye).
    last_session: Option<u64>,
    vm: Option<Vm>,
    output: crossbeam_channel::Receiver<u8>,
    log: Arc<ConsoleLog>,
    next_epoch: u64,
    staging: Vec<u8>,
    page: Box<[u8; PAGE_SIZE]>,
}

/// Why a session ended, from the replicator's side.
enum SessionEnd {
    Broken,
    Stop,
    VmEnded(VmEnd),
    /// A switchover: the backup runs the VM now.
    HandedOver,
}

impl Replicator {
    fn new(
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
            staging: Vec::new(),
            page: Box::new([0; PAGE_SIZE]),
        }
    }

    fn vm(&self) -> &Vm {
        self.vm
            .as_ref()
            .unwrap_or_else(|| unreachable!("the VM lives until run() returns"))
    }

    fn run(mut self) {
        let end = self.main_loop();
        // A clean stop or a guest that ended by itself: tell the backup not to
        // promote, while the session is still up. A fenced primary says
        // nothing, nor one that handed the VM over.
        if self.shared.fenced_by.load(Ordering::Acquire) == 0
            && self.shared.handed_over.load(Ordering::Acquire) == 0
            && let Some(session) = self.last_session
        {
            let opts = self.shared.opts.clone();
            let generation = self.shared.generation;
            self.runtime
                .block_on(say_goodbye(&opts, generation, session));
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

    fn main_loop(&mut self) -> Option<VmEnd> {
        loop {
            if self.shared.stopping() {
                return None;
            }
            if let Some(end) = self.vm().ended() {
                return Some(end);
            }
            let Some(link) = self.current_session() else {
                self.idle();
                continue;
            };
            self.drain_output_unprotected();
            match self.run_session(&link) {
                SessionEnd::Broken => link.broken.store(true, Ordering::Release),
                SessionEnd::Stop | SessionEnd::HandedOver => return None,
                SessionEnd::VmEnded(end) => return Some(end),
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
        match self.output.recv_timeout(self.shared.opts.epoch_interval) {
            Ok(first) => {
                let mut bytes = vec![first];
                bytes.extend(self.output.try_iter());
                self.log.append(&bytes);
                self.shared.releaser.produced_unprotected();
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            // The guest is gone; the loop sees it end.
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Between sessions the guest runs on; its output follows the policy.
    fn drain_output_unprotected(&mut self) {
        let bytes: Vec<u8> = self.output.try_iter().collect();
        if !bytes.is_empty() {
            self.log.append(&bytes);
            self.shared.releaser.produced_unprotected();
        }
    }

    fn send(&self, link: &SessionLink, chunks: Vec<Vec<u8>>) -> bool {
        for chunk in chunks {
            let msg = EpochChunk {
                session: link.id,
                generation: self.shared.generation,
                chunk: chunk.into(),
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
        // A new session owes acks only for its own epochs.
        *self.shared.acked_plus_one() = self.next_epoch;
        let mut sender =
            match SenderState::new(&opts.vm_id, ram_pages, self.shared.generation, opts.codec) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the sender");
                    return SessionEnd::Stop;
                }
            };
        // Clear the dirty log, then copy everything while the guest runs: any
        // page written after the clear is dirty again for the next round.
        if let Err(e) = self.vm().harvest_dirty() {
            tracing::error!(error = %e, "cannot clear the dirty log");
            return SessionEnd::Stop;
        }
        let all: Vec<u32> = (0..ram_pages).collect();
        if !self.sync_round(link, &mut sender, &all, 1) {
            return SessionEnd::Broken;
        }
        for round in 2..=MAX_SYNC_ROUNDS {
            let dirty = match self.vm().harvest_dirty() {
                Ok(d) => d,
                Err(_) => break,
            };
            let pages: Vec<u32> = dirty.iter().map(|p| p as u32).collect();
            tracing::debug!(round, pages = pages.len(), "sync round");
            if !self.sync_round(link, &mut sender, &pages, round) {
                return SessionEnd::Broken;
            }
            if pages.len() <= SYNC_CONVERGED_PAGES {
                break;
            }
        }
        // Checkpoints: the first completes the sync and protects the VM.
        let mut next_tick = Instant::now();
        let mut protected = false;
        loop {
            match self.checkpoint(link, &mut sender, false) {
                Ok(true) => {}
                Ok(false) => return SessionEnd::Broken,
                Err(end) => return end,
            }
            if !protected {
                if !self.wait_acked(link, self.next_epoch - 1) {
                    return if self.shared.stopping() {
                        SessionEnd::Stop
                    } else {
                        SessionEnd::Broken
                    };
                }
                protected = true;
                self.shared.releaser.session_protected();
                self.last_session = Some(link.id);
                self.shared.stats.protected.store(true, Ordering::Release);
                self.shared.stats.set_state("protected");
                tracing::info!(
                    sync_ms = sync_started.elapsed().as_millis() as u64,
                    epoch = self.next_epoch - 1,
                    "VM protected"
                );
            }
            if self.shared.stop.load(Ordering::Acquire) {
                // Graceful stop: the last checkpoint is acked; its output is out.
                self.wait_acked(link, self.next_epoch - 1);
                return SessionEnd::Stop;
            }
            if let Some(responder) = self.shared.take_switchover()
                && let Some(end) = self.hand_over(link, &mut sender, responder)
            {
                return end;
            }
            // Back-pressure: at most max_in_flight epochs unacked.
            let oldest_allowed = (self.next_epoch - 1).saturating_sub(opts.max_in_flight);
            if !self.wait_acked(link, oldest_allowed) {
                return if self.shared.stopping() {
                    SessionEnd::Stop
                } else {
                    SessionEnd::Broken
                };
            }
            next_tick += opts.epoch_interval;
            let now = Instant::now();
            if next_tick > now {
                std::thread::sleep(next_tick - now);
            } else {
                next_tick = now;
            }
            if self.shared.stopping() && self.shared.fenced_by.load(Ordering::Acquire) != 0 {
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
        let fail = |responder: SwitchoverResponder, why: String| {
            tracing::warn!(%why, "switchover failed; still the primary");
            let _ = responder.send(Err(tonic::Status::unavailable(format!(
                "switchover failed, the VM runs on here: {why}"
            ))));
        };
        let bytes_before = self.shared.stats.bytes_shipped.load(Ordering::Relaxed);
        let pages = match self.checkpoint(link, sender, true) {
            Ok(true) => self.staging.len() / PAGE_SIZE,
            Ok(false) => {
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
            if self.shared.fenced_by.load(Ordering::Acquire) != 0 {
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
        self.shared.handing_over.store(true, Ordering::Release);
        let outcome = self
            .runtime
            .block_on(handover(&opts, generation, link.id, epoch));
        let seen = self.shared.seen_while_handing_over.load(Ordering::Acquire);
        let not_handing_over = || self.shared.handing_over.store(false, Ordering::Release);
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
        self.shared
            .handed_over
            .store(reply.generation, Ordering::Release);
        not_handing_over();
        self.shared.stats.metrics.switchovers.inc();
        self.shared
            .stats
            .set_state(format!("handed over at epoch {epoch}"));
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

    fn resume_after_failed_switchover(&self) {
        if let Err(e) = self.vm().resume() {
            tracing::error!(error = %e, "cannot resume the VM after a failed switchover");
        }
    }

    /// Waits until `epoch` is acked. False if the session broke or we stop.
    fn wait_acked(&self, link: &SessionLink, epoch: u64) -> bool {
        let guard = self.shared.acked_plus_one();
        let deadline = Instant::now() + Duration::from_secs(30);
        let (guard, _) = self
            .shared
            .acked_cv
            .wait_timeout_while(guard, Duration::from_secs(30), |acked| {
                *acked < epoch + 1
                    && !link.broken.load(Ordering::Acquire)
                    && self.shared.fenced_by.load(Ordering::Acquire) == 0
                    && Instant::now() < deadline
            })
            .unwrap_or_else(|p| p.into_inner());
        *guard > epoch
    }

    /// Ships `pages` read from the running guest as one sync round.
    fn sync_round(
        &mut self,
        link: &SessionLink,
        sender: &mut SenderState,
        pages: &[u32],
        round: usize,
    ) -> bool {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let Ok(mut enc) = sender.begin(epoch, EpochKind::SyncRound) else {
            return false;
        };
        for (i, &p) in pages.iter().enumerate() {
            if self
                .vm
                .as_ref()
                .map(|vm| vm.ram().copy_page(p as usize, &mut self.page))
                .is_none()
            {
                return false;
            }
            if enc.add_page(p, &self.page).is_err() {
                return false;
            }
            if i % STREAM_EVERY_PAGES == STREAM_EVERY_PAGES - 1 {
                if !self.send(link, enc.take_chunks()) {
                    return false;
                }
                // Unprotected output goes out during a long sync too.
                self.drain_output_unprotected();
            }
            if i % (STREAM_EVERY_PAGES * 8) == 0 {
                self.shared.stats.set_state(format!(
                    "syncing: round {round}, {}% of {} pages",
                    i * 100 / pages.len().max(1),
                    pages.len()
                ));
            }
        }
        match enc.finish(&[]) {
            Ok(encoded) => {
                self.shared
                    .stats
                    .bytes_shipped
                    .fetch_add(encoded.report.bytes_out, Ordering::Relaxed);
                self.shared.sent.store(epoch + 1, Ordering::Release);
                self.shared.record_lag(*self.shared.acked_plus_one());
                self.send(link, encoded.chunks)
            }
            Err(_) => false,
        }
    }

    /// Takes and ships one checkpoint. `Ok(false)`: the session broke.
    fn checkpoint(
        &mut self,
        link: &SessionLink,
        sender: &mut SenderState,
        leave_paused: bool,
    ) -> Result<bool, SessionEnd> {
        let epoch = self.next_epoch;
        let vm = self.vm.as_ref().ok_or(SessionEnd::Stop)?;
        let started = Instant::now();
        if let Err(e) = vm.pause() {
            return Err(match vm.ended() {
                Some(end) => SessionEnd::VmEnded(end),
                None => {
                    tracing::error!(error = %e, "cannot pause the VM");
                    SessionEnd::Stop
                }
            });
        }
        let captured = (|| {
            let dirty = vm.harvest_dirty()?;
            let pages: Vec<u32> = dirty.iter().map(|p| p as u32).collect();
            self.staging.resize(pages.len() * PAGE_SIZE, 0);
            for (i, &p) in pages.iter().enumerate() {
                let page: &mut [u8; PAGE_SIZE] = (&mut self.staging
                    [i * PAGE_SIZE..(i + 1) * PAGE_SIZE])
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("a page-sized slice"));
                vm.ram().copy_page(p as usize, page)?;
            }
            let state = vm.save_state(false)?;
            Ok::<_, understudy_vmm::VmError>((pages, state))
        })();
        // Output up to the pause belongs to this epoch.
        let bytes: Vec<u8> = self.output.try_iter().collect();
        let end_offset = self.log.append(&bytes);
        let resumed = if leave_paused { Ok(()) } else { vm.resume() };
        let pause = started.elapsed();
        let (pages, state) = match (captured, resumed) {
            (Ok(c), Ok(())) => c,
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "checkpoint capture failed");
                return Err(match vm.ended() {
                    Some(end) => SessionEnd::VmEnded(end),
                    None => SessionEnd::Stop,
                });
            }
        };
        self.next_epoch += 1;
        let (console_offset, console_out) = self.log.unreleased();
        let vm_state = match state.encode() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode VM state");
                return Err(SessionEnd::Stop);
            }
        };
        let payload = CheckpointPayload {
            vm_state,
            console_offset,
            console_out,
        }
        .encode();
        self.shared.releaser.checkpoint_taken(epoch, end_offset);
        self.shared
            .taken_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((epoch, started));
        let mut enc = match sender.begin(epoch, EpochKind::Checkpoint) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode checkpoint");
                return Ok(false);
            }
        };
        for (i, &p) in pages.iter().enumerate() {
            let page: &[u8; PAGE_SIZE] = self.staging[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                .try_into()
                .unwrap_or_else(|_| unreachable!("a page-sized slice"));
            if enc.add_page(p, page).is_err() {
                return Ok(false);
            }
        }
        let encoded = match enc.finish(&payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot finish checkpoint");
                return Ok(false);
            }
        };
        self.shared.stats.record_epoch(
            pause,
            pages.len(),
            encoded.report.bytes_in,
            encoded.report.bytes_out,
        );
        self.shared.sent.store(epoch + 1, Ordering::Release);
        self.shared.record_lag(*self.shared.acked_plus_one());
        Ok(self.send(link, encoded.chunks))
    }
}

/// The fenced marker path (for tools and tests).
pub fn fenced_marker(state_dir: &Path) -> PathBuf {
    state_dir.join(FENCED_FILE)
}

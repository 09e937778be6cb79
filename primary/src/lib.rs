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

mod peer;
mod releaser;
mod replicator;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use understudy_checkpoint::CodecPolicy;
use understudy_common::role::{HostIo, RunningVm, SwitchoverResponder};
use understudy_common::status::Stats;
use understudy_common::wire;
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::replication_server::ReplicationServer;
use understudy_proto::{Beat, EpochChunk};
use understudy_vmm::{BootOptions, BuiltinBoot, GuestRam, RamBacking, Vm, VmEnd};

use crate::peer::{HelloOutcome, RunsHere, hello, probe};
use crate::releaser::Releaser;
use crate::replicator::Replicator;

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
    /// (A watch: the session manager waits for the handover to settle.)
    handing_over: tokio::sync::watch::Sender<bool>,
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
        if *self.handing_over.borrow() || self.handed_over.load(Ordering::Acquire) != 0 {
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
    let (vm, output) = match start {
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
            (vm, vm_console.output)
        }
        Start::Adopt(running) => {
            let RunningVm { mut vm, output, .. } = *running;
            vm.start_dirty_logging().map_err(PrimaryError::Vm)?;
            // Clients without a resume offset get output from now on.
            host.log.set_raw_start(None);
            tracing::info!(vm = %opts.vm_id, generation, backup = %opts.backup, "protecting the VM this host took over");
            (vm, output)
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
        releaser: Releaser::new(host.log.clone()),
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
        handing_over: tokio::sync::watch::Sender::new(false),
        seen_while_handing_over: AtomicU64::new(0),
        opts: opts.clone(),
    });
    if adopted {
        // A VM this host took over runs unprotected until the other host
        // syncs as its backup, and its output goes out (as it did right after
        // a promotion: the old primary is stopped or deposed, no other copy
        // runs).
        shared.releaser.set_unprotected(true);
        stats.set_state("unprotected: no backup yet, releasing output");
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
        let _ = shared
            .handing_over
            .subscribe()
            .wait_for(|handing_over| !handing_over)
            .await;
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
    // Wake a replicator waiting for acks of this session: it must not sleep
    // through the loss (holding output, stalling re-protection). Taking the
    // lock orders the notification after its check of `broken`.
    drop(shared.acked_plus_one());
    shared.acked_cv.notify_all();
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

/// The fenced marker path (for tools and tests).
pub fn fenced_marker(state_dir: &Path) -> PathBuf {
    state_dir.join(FENCED_FILE)
}

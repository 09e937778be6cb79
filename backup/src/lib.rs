//! The standby role: receives epochs from the primary, stages, verifies and
//! commits them to the image store, acks them, watches the primary's
//! heartbeats, and on their loss promotes: the committed image becomes the
//! running VM's RAM (mapped shared, no copy), the device state is restored, and
//! the console is served with output released directly.
//!
//! ```text
//!   Standby ──Hello──▶ Syncing ──first checkpoint──▶ Protected ──no word for
//!      ▲                  │                              │  │  heartbeat_timeout──▶ Promoted
//!      └── stream error / new Hello (resync) ◀──────────┘  │       (generation + 1)
//!                                                           └─Handover──▶ HandedOver: the
//!                                                              running VM goes to the primary role
//! ```
//!
//! Fencing: promotion bumps the generation stored with the image; every later
//! message from the old primary is answered "deposed" with that generation.
//! The console and the Control service belong to the host ([`HostIo`]), so
//! clients stay connected across a promotion and a switchover.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use understudy_checkpoint::epoch::{EpochDecoder, Received, StagingBuffers};
use understudy_checkpoint::store::{ImageStatus, ImageStore, StoreOptions};
use understudy_checkpoint::{CommittedImage, EpochError, StoreError};
use understudy_common::payload::CheckpointPayload;
use understudy_common::role::{HostIo, RunningVm};
use understudy_common::wire;
use understudy_proto::replication_server::{Replication, ReplicationServer};
use understudy_proto::{
    Ack, Beat, EpochChunk, GoodbyeReply, GoodbyeRequest, HandoverReply, HandoverRequest,
    HelloReply, HelloRequest, PROTOCOL_VERSION, ProbeReply, ProbeRequest,
};
use understudy_vmm::{GuestRam, RamBacking, Vm, VmEnd, VmState};

/// What the backup needs to know.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub vm_id: String,
    pub ram_bytes: u64,
    pub image_dir: PathBuf,
    pub replication_listen: SocketAddr,
    /// Why this host could not protect the VM as the primary (None: it can,
    /// so handovers are accepted, and a promotion after silence hands the VM
    /// to the primary role too, which re-protects it once the other host
    /// returns as the backup).
    pub handover_unavailable: Option<String>,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub fsync: bool,
    /// Mutual TLS for the replication and control services (None: plaintext).
    pub tls: Option<wire::TlsFiles>,
}

/// Why the backup stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot open the image in {dir}")]
    Image {
        dir: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error(transparent)]
    Listen(#[from] wire::ListenError),
    #[error("promotion failed: {0}")]
    Promotion(String),
    #[error("the replication server's task failed")]
    ServerTask(#[source] tokio::task::JoinError),
    #[error("gRPC server failed")]
    Server(#[source] tonic::transport::Error),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// How a backup run ended.
#[derive(Debug)]
pub enum BackupExit {
    /// Asked to stop.
    Shutdown,
    /// Promoted, and the VM then ended on its own.
    VmEnded(VmEnd),
    /// This host runs the VM now, by a handover (a switchover) or by a
    /// promotion after silence, and knows where the other host serves as the
    /// backup: its primary role is to protect the VM.
    TookOver(Box<RunningVm>),
}

enum Role {
    Standby,
    /// Promoted after the primary went silent: runs the VM here, unprotected.
    Promoted(Box<Vm>),
    /// Promoted (by a handover, or after silence on a host that can protect
    /// the VM); the VM is on its way to the primary role.
    HandedOver(Option<Box<RunningVm>>),
}

impl Role {
    fn name(&self) -> &'static str {
        match self {
            Self::Standby => "backup",
            Self::Promoted(_) | Self::HandedOver(_) => "primary",
        }
    }
}

/// What set off a promotion.
#[derive(Clone, Copy, Debug)]
enum Trigger {
    /// The primary was silent this long.
    Silence(Duration),
    /// The primary handed over after `epoch` of `session` (a switchover).
    Handover { session: u64, epoch: u64 },
}

struct State {
    role: Role,
    store: Option<ImageStore>,
    generation: u64,
    session: u64,
    decoder: Option<EpochDecoder>,
    buffers: StagingBuffers,
    /// A checkpoint of the current session is committed: promotable.
    protected: bool,
    /// The primary said goodbye: do not promote.
    goodbye: bool,
}

struct Shared {
    opts: BackupOptions,
    host: HostIo,
    state: Mutex<State>,
    /// Nanoseconds since `epoch_start` when the primary was last heard.
    last_heard: AtomicU64,
    clock: Instant,
    /// Cancelled when the VM goes to the primary role (it leaves this role).
    handed_over: CancellationToken,
    vm_ended: tokio::sync::watch::Sender<Option<VmEnd>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn heard(&self) {
        self.last_heard
            .store(self.clock.elapsed().as_nanos() as u64, Ordering::Release);
    }

    fn silence(&self) -> Duration {
        let now = self.clock.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(self.last_heard.load(Ordering::Acquire)))
    }

    fn deposed_if_promoted(&self, state: &State, who: u64) -> Result<(), Status> {
        if !matches!(state.role, Role::Standby) {
            return Err(wire::deposed(
                state.generation,
                format!(
                    "deposed: the VM was promoted on the backup at generation {}; the sender at generation {who} must not run it",
                    state.generation
                ),
            ));
        }
        if who < state.generation {
            return Err(wire::deposed(
                state.generation,
                format!(
                    "deposed: generation {who} is older than the backup's image (generation {})",
                    state.generation
                ),
            ));
        }
        Ok(())
    }
}

/// Runs the backup until `shutdown`, until a promoted VM ends, or until a
/// handover passes the VM to this host's primary role. `host` holds the
/// console (served by the daemon; filled at promotion) and the status the
/// daemon reports (`understudyctl status`, systemd notifications, metrics).
pub async fn run(
    opts: BackupOptions,
    host: HostIo,
    shutdown: CancellationToken,
) -> Result<BackupExit, BackupError> {
    let store = open_store(&opts)?;
    let generation = store.generation();
    let stats = &host.stats;
    stats.generation.store(generation, Ordering::Release);
    stats.set_state(match store.status() {
        ImageStatus::Committed { .. } => "standby: image from an earlier session (needs resync)",
        _ => "standby: waiting for the primary",
    });
    let (vm_ended, mut vm_ended_rx) = tokio::sync::watch::channel(None);
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            role: Role::Standby,
            store: Some(store),
            generation,
            session: 0,
            decoder: None,
            buffers: StagingBuffers::default(),
            protected: false,
            goodbye: false,
        }),
        last_heard: AtomicU64::new(0),
        clock: Instant::now(),
        handed_over: CancellationToken::new(),
        vm_ended,
        opts: opts.clone(),
        host: host.clone(),
    });

    // The host's socket when it has one: it stays bound across role changes.
    let replication = match &host.replication {
        Some(shared) => shared
            .take_turn()
            .map_err(|source| wire::ListenError::new("replication", shared.addr, source))?,
        None => wire::listen("replication", opts.replication_listen).await?,
    };
    tracing::info!(vm = %opts.vm_id, generation, replication = %opts.replication_listen, "backup listening");

    // The server stops accepting when the role ends (shutdown or handover);
    // connections it already has (the handover's answer) finish on their own.
    let role_done = shutdown.child_token();
    let service = ReplicationService(shared.clone());
    let server = wire::server(opts.tls.as_ref())
        .map_err(BackupError::Tls)?
        .initial_stream_window_size(wire::STREAM_WINDOW)
        .initial_connection_window_size(wire::CONNECTION_WINDOW)
        .max_frame_size(wire::MAX_FRAME)
        .tcp_nodelay(true)
        .add_service(ReplicationServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(replication),
            role_done.clone().cancelled_owned(),
        );
    let detector = tokio::spawn(failure_detector(shared.clone(), role_done.clone()));
    let mut server = tokio::spawn(server);
    let exit = tokio::select! {
        // Stopping: the primary's streams never end on their own, so the
        // server is not left to drain them (it is aborted below).
        _ = shutdown.cancelled() => Ok(BackupExit::Shutdown),
        r = &mut server => match r {
            Ok(r) => r.map(|_| BackupExit::Shutdown).map_err(BackupError::Server),
            Err(e) => Err(BackupError::ServerTask(e)),
        },
        end = async {
            loop {
                if let Some(end) = vm_ended_rx.borrow_and_update().clone() {
                    return end;
                }
                if vm_ended_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        } => Ok(BackupExit::VmEnded(end)),
        _ = shared.handed_over.cancelled() => {
            let role = std::mem::replace(&mut shared.lock().role, Role::HandedOver(None));
            match role {
                Role::HandedOver(Some(running)) => Ok(BackupExit::TookOver(running)),
                _ => Err(BackupError::Promotion("the handed-over VM went missing".into())),
            }
        }
    };
    detector.abort();
    role_done.cancel();
    if shutdown.is_cancelled() {
        server.abort();
    }
    // Stop a promoted VM.
    let role = std::mem::replace(&mut shared.lock().role, Role::Standby);
    if let Role::Promoted(vm) = role {
        vm.stop();
    }
    exit
}

fn open_store(opts: &BackupOptions) -> Result<ImageStore, BackupError> {
    let store_opts = StoreOptions { fsync: opts.fsync };
    let image = |source| BackupError::Image {
        dir: opts.image_dir.clone(),
        source,
    };
    let store = if opts.image_dir.join("meta").exists() {
        let (store, recovery) = ImageStore::open(&opts.image_dir, store_opts).map_err(image)?;
        tracing::info!(?recovery, status = ?store.status(), "image opened");
        store
    } else {
        ImageStore::create(&opts.image_dir, &opts.vm_id, opts.ram_bytes, store_opts)
            .map_err(image)?
    };
    if store.vm_id() != opts.vm_id || store.ram_bytes() != opts.ram_bytes {
        return Err(image(StoreError::NotAnImage {
            path: opts.image_dir.clone(),
            why: format!(
                "it holds VM {:?} with {} bytes of RAM, the configuration says VM {:?} with {}",
                store.vm_id(),
                store.ram_bytes(),
                opts.vm_id,
                opts.ram_bytes
            ),
        }));
    }
    Ok(store)
}

async fn failure_detector(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(shared.opts.heartbeat_interval / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let silence = shared.silence();
        let should = {
            let state = shared.lock();
            matches!(state.role, Role::Standby)
                && state.protected
                && !state.goodbye
                && silence > shared.opts.heartbeat_timeout
        };
        if should {
            tracing::warn!(
                silence_ms = silence.as_millis() as u64,
                "primary silent past the heartbeat timeout: promoting"
            );
            let shared2 = shared.clone();
            let result =
                tokio::task::spawn_blocking(move || promote(&shared2, Trigger::Silence(silence)))
                    .await;
            match result {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    // Not promotable as it stands: wait for a new checkpoint
                    // (a primary that comes back resyncs) instead of retrying.
                    tracing::error!(error = %e, "promotion failed; waiting for a new checkpoint");
                    shared.lock().protected = false;
                    shared.host.stats.protected.store(false, Ordering::Release);
                    shared
                        .host
                        .stats
                        .set_state(format!("promotion failed: {e}"));
                }
                Err(e) => tracing::error!(error = %e, "promotion task failed"),
            }
        }
    }
}

/// Promotes: fence by generation, map the committed image as RAM, restore the
/// device state, run. After silence the console is served from here with
/// output released directly; after a handover the VM and its output go to
/// the primary role, which protects it. Returns the new generation and how
/// long promotion → VM running took, or None when silence no longer calls
/// for a promotion (the state changed before the lock was taken). A handover
/// that does not match the committed image is refused before anything
/// changes.
fn promote(shared: &Shared, trigger: Trigger) -> Result<Option<(u64, Duration)>, String> {
    let started = Instant::now();
    let mut state = shared.lock();
    if let Trigger::Handover { session, epoch } = trigger {
        let committed = state.store.as_ref().and_then(|s| s.committed_epoch());
        if !matches!(state.role, Role::Standby) {
            return Err(format!(
                "this host already runs the VM (generation {})",
                state.generation
            ));
        }
        if session != state.session || !state.protected || committed != Some(epoch) {
            return Err(format!(
                "the image does not hold epoch {epoch} of session {session} as its committed checkpoint \
                 (session {}, committed epoch {committed:?}); the primary must resume and try again",
                state.session
            ));
        }
    } else if !matches!(state.role, Role::Standby) || !state.protected {
        return Ok(None);
    }
    // Check that the committed epoch can be brought back before committing
    // to the promotion: a bad payload must not leave a bumped generation
    // behind (that would refuse every primary from then on).
    let (epoch, payload, vm_state, mem_path) = {
        let store = state.store.as_ref().ok_or("no image")?;
        let epoch = store
            .committed_epoch()
            .ok_or("image holds no committed epoch")?;
        let payload = CheckpointPayload::decode(store.device_state())
            .map_err(|e| format!("the committed checkpoint cannot be resumed: {e}"))?;
        let vm_state = VmState::decode(&payload.vm_state)
            .map_err(|e| format!("the committed VM state cannot be resumed: {e}"))?;
        (epoch, payload, vm_state, store.memory_path())
    };
    // Any partial epoch is dropped: the image holds exactly the last commit.
    state.decoder = None;
    state.session = 0;
    let new_generation = state.generation + 1;
    // From here memory.img is the VM's RAM, no longer a committed epoch.
    if let Some(store) = state.store.as_mut() {
        store
            .go_live(new_generation)
            .map_err(|e| format!("cannot record generation {new_generation}: {e}"))?;
    }
    state.generation = new_generation;
    // The VM maps memory.img itself from here on; the store lets go of it.
    state.store = None;
    let fenced = started.elapsed();
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&mem_path)
        .map_err(|e| format!("cannot open {}: {e}", mem_path.display()))?;
    let ram = GuestRam::new(
        vm_state.memory.size_bytes as usize,
        RamBacking::SharedFile(file),
    )
    .map_err(|e| e.to_string())?;
    // Serve the output the primary may not have delivered, then the new output.
    let host = &shared.host;
    host.log.restart_at(payload.console_offset);
    host.log.append(&payload.console_out);
    host.log.release_all();
    host.log.set_raw_start(Some(payload.console_offset));
    let (vm, console) = Vm::restore(&vm_state, ram, false).map_err(|e| e.to_string())?;
    let resumed = started.elapsed();
    host.input.set(Some(console.input));
    let stats = &host.stats;
    stats.generation.store(new_generation, Ordering::Release);
    stats.set_role("primary");
    stats.protected.store(false, Ordering::Release);
    stats
        .promotion_resume_us
        .store(resumed.as_micros() as u64, Ordering::Relaxed);
    let detect = match trigger {
        Trigger::Handover { .. } => {
            stats.metrics.switchovers.inc();
            stats.set_state(format!("took over from epoch {epoch} by handover"));
            Duration::ZERO
        }
        Trigger::Silence(silence) => {
            stats.metrics.failovers.inc();
            stats.set_state(format!("promoted from epoch {epoch}: running unprotected"));
            silence
        }
    };
    stats
        .promotion_detect_us
        .store(detect.as_micros() as u64, Ordering::Relaxed);
    tracing::info!(
        epoch,
        generation = new_generation,
        ?trigger,
        fence_us = fenced.as_micros() as u64,
        resume_us = resumed.as_micros() as u64,
        "promoted: VM running"
    );
    // A host that knows where the other one serves as the backup protects
    // the VM as the primary; otherwise it serves it from here, unprotected.
    if matches!(trigger, Trigger::Handover { .. }) || shared.opts.handover_unavailable.is_none() {
        state.role = Role::HandedOver(Some(Box::new(RunningVm {
            vm,
            output: console.output,
            generation: new_generation,
        })));
        drop(state);
        shared.handed_over.cancel();
        return Ok(Some((new_generation, resumed)));
    }
    let log = host.log.clone();
    let output = console.output;
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            while let Ok(first) = output.recv() {
                let mut bytes = vec![first];
                bytes.extend(output.try_iter());
                log.append(&bytes);
                log.release_all();
            }
        })
        .map_err(|e| e.to_string())?;
    let watch = vm.end_watch();
    state.role = Role::Promoted(Box::new(vm));
    drop(state);
    // Report the VM's end (guest shutdown or failure) to the daemon.
    let ended = shared.vm_ended.clone();
    std::thread::Builder::new()
        .name("vm-watch".into())
        .spawn(move || {
            if let Some(end) = watch.wait(Duration::MAX) {
                ended.send_replace(Some(end));
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(Some((new_generation, resumed)))
}

#[derive(Clone)]
struct ReplicationService(Arc<Shared>);

type AckStream = Pin<Box<dyn Stream<Item = Result<Ack, Status>> + Send>>;
type BeatStream = Pin<Box<dyn Stream<Item = Result<Beat, Status>> + Send>>;

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

#[tonic::async_trait]
impl Replication for ReplicationService {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let req = req.into_inner();
        let shared = &self.0;
        let mut state = shared.lock();
        shared.deposed_if_promoted(&state, req.generation)?;
        if req.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "protocol version {} is not supported: this backup speaks version {PROTOCOL_VERSION}; run the same understudy release on both hosts",
                req.protocol_version
            )));
        }
        if req.vm_id != shared.opts.vm_id {
            return Err(Status::invalid_argument(format!(
                "wrong VM: this backup protects VM {:?}, not {:?}",
                shared.opts.vm_id, req.vm_id
            )));
        }
        if req.ram_bytes != shared.opts.ram_bytes {
            return Err(Status::invalid_argument(format!(
                "VM {:?} has {} bytes of RAM here but the primary has {}: the configurations differ",
                req.vm_id, shared.opts.ram_bytes, req.ram_bytes
            )));
        }
        let store = state
            .store
            .as_mut()
            .ok_or_else(|| Status::unavailable("no image"))?;
        store
            .begin_sync(req.generation)
            .map_err(|e| Status::internal(format!("cannot start the sync: {e}")))?;
        state.generation = req.generation;
        state.session = req.session;
        state.decoder = Some(EpochDecoder::with_buffers(std::mem::take(
            &mut state.buffers,
        )));
        state.protected = false;
        state.goodbye = false;
        shared.heard();
        shared
            .host
            .stats
            .generation
            .store(req.generation, Ordering::Release);
        shared.host.stats.protected.store(false, Ordering::Release);
        shared.host.stats.set_state("syncing");
        shared.host.stats.link_up.store(true, Ordering::Release);
        tracing::info!(
            session = req.session,
            generation = req.generation,
            "primary connected: full sync"
        );
        Ok(Response::new(HelloReply {
            protocol_version: PROTOCOL_VERSION,
            generation: req.generation,
            image_status: "syncing".into(),
        }))
    }

    type ReplicateStream = AckStream;

    async fn replicate(
        &self,
        req: Request<Streaming<EpochChunk>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let mut incoming = req.into_inner();
        let shared = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Ack, Status>>(64);
        tokio::spawn(async move {
            loop {
                let msg = match incoming.next().await {
                    None => return,
                    Some(Err(status)) => {
                        tracing::debug!(%status, "replication stream ended");
                        return;
                    }
                    Some(Ok(msg)) => msg,
                };
                shared.heard();
                let shared2 = shared.clone();
                let result = tokio::task::block_in_place(|| receive_chunk(&shared2, msg));
                match result {
                    Ok(None) => {}
                    Ok(Some(ack)) => {
                        if tx.send(Ok(ack)).await.is_err() {
                            return;
                        }
                    }
                    Err(status) => {
                        tracing::warn!(%status, "epoch refused; session ended, the primary must resync");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type HeartbeatStream = BeatStream;

    async fn heartbeat(
        &self,
        req: Request<Streaming<Beat>>,
    ) -> Result<Response<Self::HeartbeatStream>, Status> {
        let mut incoming = req.into_inner();
        let shared = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Beat, Status>>(16);
        // Answer every beat at once, echoing its seq (the primary measures the
        // round trip) and carrying our generation and role (a stale primary
        // learns of a promotion from its next beat).
        tokio::spawn(async move {
            let mut seq = 0;
            while let Some(Ok(beat)) = incoming.next().await {
                let (generation, role) = {
                    let state = shared.lock();
                    (state.generation, state.role.name())
                };
                if beat.generation >= generation && role == "backup" {
                    shared.heard();
                }
                seq += 1;
                let reply = Beat {
                    generation,
                    seq,
                    role: role.into(),
                    echo_seq: beat.seq,
                };
                // A primary that does not read its beats does not need more.
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send(Ok(reply))
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn goodbye(
        &self,
        req: Request<GoodbyeRequest>,
    ) -> Result<Response<GoodbyeReply>, Status> {
        let req = req.into_inner();
        let mut state = self.0.lock();
        self.0.deposed_if_promoted(&state, req.generation)?;
        if req.session == state.session {
            state.goodbye = true;
            self.0
                .host
                .stats
                .set_state("primary stopped on purpose: not promoting");
            tracing::info!("primary said goodbye: it stopped on purpose, no promotion");
        }
        Ok(Response::new(GoodbyeReply {}))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeReply>, Status> {
        let state = self.0.lock();
        Ok(Response::new(ProbeReply {
            generation: state.generation,
            role: state.role.name().into(),
        }))
    }

    async fn handover(
        &self,
        req: Request<HandoverRequest>,
    ) -> Result<Response<HandoverReply>, Status> {
        let req = req.into_inner();
        if let Some(why) = &self.0.opts.handover_unavailable {
            return Err(Status::failed_precondition(format!(
                "handover refused: {why}"
            )));
        }
        {
            let state = self.0.lock();
            self.0.deposed_if_promoted(&state, req.generation)?;
            if req.generation != state.generation {
                return Err(Status::failed_precondition(format!(
                    "handover refused: generation {} is not this session's ({})",
                    req.generation, state.generation
                )));
            }
        }
        tracing::info!(
            epoch = req.epoch,
            "primary hands the VM over (switchover): promoting now"
        );
        let shared = self.0.clone();
        let trigger = Trigger::Handover {
            session: req.session,
            epoch: req.epoch,
        };
        match tokio::task::block_in_place(|| promote(&shared, trigger)) {
            Ok(Some((generation, resumed))) => Ok(Response::new(HandoverReply {
                generation,
                resume_micros: resumed.as_micros() as u64,
            })),
            Ok(None) => Err(Status::failed_precondition(
                "handover refused: this backup holds no promotable checkpoint",
            )),
            Err(why) => {
                tracing::warn!(%why, "handover refused");
                Err(Status::failed_precondition(format!(
                    "handover refused: {why}"
                )))
            }
        }
    }
}

/// Feeds one chunk to the session's decoder; commits and returns an ack when an
/// epoch completes.
fn receive_chunk(shared: &Shared, msg: EpochChunk) -> Result<Option<Ack>, Status> {
    let started = Instant::now();
    let mut guard = shared.lock();
    let state = &mut *guard;
    shared.deposed_if_promoted(state, msg.generation)?;
    if msg.session != state.session || state.session == 0 {
        return Err(Status::failed_precondition(
            "no such replication session: say Hello first",
        ));
    }
    let (Some(store), Some(decoder)) = (state.store.as_mut(), state.decoder.as_mut()) else {
        return Err(Status::failed_precondition("no replication session"));
    };
    shared
        .host
        .stats
        .bytes_shipped
        .fetch_add(msg.chunk.len() as u64, Ordering::Relaxed);
    let received = decoder.push(&msg.chunk, store);
    let staged = match received {
        Ok(Received::NeedMore) => return Ok(None),
        Ok(Received::Complete(staged)) => staged,
        Err(e) => {
            state.session = 0;
            state.decoder = None;
            return Err(epoch_status(&e));
        }
    };
    let epoch = staged.header.epoch;
    let checkpoint = staged.header.kind == understudy_checkpoint::EpochKind::Checkpoint;
    if let Err(e) = store.apply(&staged) {
        state.session = 0;
        state.decoder = None;
        return Err(Status::internal(format!(
            "cannot commit epoch {epoch}: {}",
            wire::chain(&e)
        )));
    }
    state.decoder = Some(EpochDecoder::with_buffers(staged.recycle()));
    if checkpoint {
        state.protected = true;
        shared.host.stats.protected.store(true, Ordering::Release);
        shared.host.stats.set_last_epoch(epoch);
        shared.host.stats.set_state("protecting");
    }
    shared.host.stats.epochs.fetch_add(1, Ordering::Relaxed);
    shared.host.stats.metrics.epochs.inc();
    Ok(Some(Ack {
        epoch,
        generation: state.generation,
        commit_micros: started.elapsed().as_micros() as u64,
    }))
}

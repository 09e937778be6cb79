//! The standby role: receives epochs from the primary, stages, verifies and
//! commits them to the image store, acks them, watches the primary's
//! heartbeats, and on their loss promotes: the committed image becomes the
//! running VM's RAM (mapped shared, no copy), the device state is restored,
//! and the console is served with output released directly.
//!
//! ```text
//!                 Hello (decided by `hello`)            first checkpoint
//!   Standby{no session} ─────────▶ Standby{syncing} ───────────────▶ Standby{protected, armed}
//!        ▲   ▲                                                         │ │ │ │
//!        │   └── goodbye (image retired) / stall (stale) / refusal ◀───┘ │ │ │
//!        │                                                               │ │ │
//!        └── failed promotion (nothing changed) ◀──── promote ◀──────────┘ │ │
//!                                       silence | restart Hello | operator  │ │
//!                                                      Handover ────────────┘ │
//!   Promoted (runs here, unprotected) ◀── or ── HandedOver (to the primary role)
//! ```
//!
//! Modules: `hello` decides what a primary's `Hello` gets; `service` is the
//! gRPC service; `receiver` decodes and commits epochs; `watch` is the
//! heartbeat thread and failure detector; `promotion` brings the image to
//! life; `operator` takes an operator's promote and discard requests.
//!
//! Fencing: promotion persists generation + 1 before the VM runs; every later
//! message from the old primary is answered "deposed" with that generation.
//! The console and the Control service belong to the host ([`HostIo`]), so
//! clients stay connected across a promotion and a switchover.

mod hello;
mod operator;
mod postcopy;
mod promotion;
mod receiver;
mod replica;
mod service;
mod stream;
#[cfg(test)]
mod tests;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Status;
use understudy_checkpoint::epoch::{EpochDecoder, StagingBuffers};
use understudy_checkpoint::store::{ImageStore, StoreOptions};
use understudy_checkpoint::{CommittedImage, StoreError};
use understudy_common::ids::{Generation, Incarnation, SessionId};
use understudy_common::role::{HostIo, RunningVm};
use understudy_common::status::StateKind;
use understudy_common::wire;
use understudy_vmm::{GuestRam, RamBacking, Vm, VmEnd, VmShell};

pub use promotion::PromotionError;

/// What the backup needs to know.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    /// The VM's name (a primary's `Hello` must carry the same).
    pub vm_id: String,
    /// Guest RAM in bytes (a primary's `Hello` must carry the same).
    pub ram_bytes: u64,
    /// Where the image store lives (`memory.img`, `meta`, the journal).
    pub image_dir: PathBuf,
    /// The replication address: gRPC (TCP) and heartbeats (UDP).
    pub replication_listen: SocketAddr,
    /// Why this host could not protect the VM as the primary (None: it can,
    /// so handovers are accepted, and a promotion after silence hands the VM
    /// to the primary role too, which re-protects it once the other host
    /// returns as the backup).
    pub handover_unavailable: Option<String>,
    /// How often the primary beats.
    pub heartbeat_interval: Duration,
    /// Silence after which the backup promotes.
    pub heartbeat_timeout: Duration,
    /// The primary releases output when it loses this backup (keep-running):
    /// a backup that was itself stalled past the primary's give-up window
    /// may then hold an image older than what clients saw.
    pub primary_releases_alone: bool,
    /// fsync the image at every commit (power-loss safety).
    pub fsync: bool,
    /// The largest device state a checkpoint may carry (the VM's state and
    /// the console output the primary may hold for an ack): the image's
    /// record keeps room for it ([`ImageStore::reserve_record`]).
    pub max_device_state: usize,
    /// Mutual TLS for the replication and control services (None: plaintext).
    pub tls: Option<wire::TlsFiles>,
    /// Who may call the replication service (only the other host).
    pub auth: understudy_common::auth::Authority,
    /// This host waits for a live migration (`understudyd primary
    /// --incoming`): it takes migration sessions only, never promotes on
    /// silence, and runs the VM when the source hands it over.
    pub incoming: bool,
    /// The etcd witness whose key must move to this host before it runs the
    /// VM (None: promotion needs no one's consent).
    pub witness: Option<understudy_common::witness::Witness>,
}

/// Why the backup stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The image store in `dir` cannot be opened (or repaired).
    #[error("cannot open the image in {dir}")]
    Image {
        /// The image directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The replication address cannot be listened on.
    #[error(transparent)]
    Listen(#[from] wire::ListenError),
    /// The heartbeat thread did not start.
    #[error("cannot start the heartbeat thread")]
    Heartbeats(#[source] std::io::Error),
    /// A handover promoted, but the VM was gone before the primary role
    /// could take it (a bug).
    #[error("the handed-over VM went missing")]
    HandedOverVmMissing,
    /// The replication server's task panicked or was cancelled.
    #[error("the replication server's task failed")]
    ServerTask(#[source] tokio::task::JoinError),
    /// The replication server failed.
    #[error("gRPC server failed")]
    Server(#[source] tonic::transport::Error),
    /// The TLS files cannot be used.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// A post-copy migration failed after the switch (the VM is lost).
    #[error("{0}")]
    Postcopy(String),
}

/// How a backup run ended.
#[derive(Debug)]
pub enum BackupExit {
    /// Asked to stop.
    Shutdown,
    /// Promoted, and the VM then ended on its own.
    VmEnded(VmEnd),
    /// This host runs the VM now, by a handover (a switchover) or by a
    /// promotion, and knows where the other host serves as the backup: its
    /// primary role is to protect the VM.
    TookOver(Box<RunningVm>),
}

/// The role's phase (see the diagram at the top).
enum Phase {
    Standby(Box<Standby>),
    /// Promoted: runs the VM here, unprotected.
    Promoted(Box<Vm>),
    /// Promoted; the VM is on its way to the primary role.
    HandedOver(Option<Box<RunningVm>>),
    /// Post-copy migration: the VM runs here while its pages arrive.
    Postcopy(Box<postcopy::PostcopyVm>),
    /// A post-copy migration failed after the switch: the VM is lost (why).
    Failed(String),
}

/// A backup holding an image, maybe with a primary's session.
struct Standby {
    store: ImageStore,
    /// The generation of the image (and of the session's primary).
    generation: Generation,
    buffers: StagingBuffers,
    session: Option<Session>,
    /// Why the image may be older than output the primary released (this
    /// backup stalled past the primary's give-up window): not promoted on
    /// silence until a new session's checkpoint commits.
    stale: Option<String>,
    /// The VM a promotion restores into, built ahead over the image
    /// (`build_shell_later`, once the backup listens): 5–30 ms of KVM setup
    /// that no longer counts in a failover or a migration's downtime. None
    /// until it is built, where it could not be (no /dev/kvm), or after a
    /// failed promotion used it: a promotion then builds its VM itself.
    shell: Option<VmShell>,
    /// For a post-copy, whose VM runs on anonymous memory that faults for
    /// pages not there yet: a VM built ahead over such memory when a
    /// migration's session begins (`build_postcopy_shell`).
    postcopy_shell: Option<VmShell>,
    /// A migration's VM restored ahead of its handover, paused
    /// (`promotion::prepare_ahead`).
    prepared: Option<Box<promotion::PreparedAhead>>,
}

impl Drop for Standby {
    /// A VM built ahead and never used (a post-copy's VM runs on other RAM;
    /// a replica took over; the daemon stops) is torn down on a thread of
    /// its own: KVM takes ~10 ms to destroy a VM, which would otherwise
    /// count in a post-copy's downtime.
    fn drop(&mut self) {
        let shells = [self.shell.take(), self.postcopy_shell.take()];
        if shells.iter().any(Option::is_some) {
            tear_down_in_background(shells);
        }
        if let Some(prepared) = self.prepared.take() {
            tear_down_in_background(prepared);
        }
    }
}

/// Drops VMs (built ahead, or restored ahead) on a thread of their own:
/// KVM takes ~10 ms to destroy a VM. Without a thread, here and now.
fn tear_down_in_background<T: Send + 'static>(vms: T) {
    let spawned = std::thread::Builder::new()
        .name("vm-teardown".into())
        .spawn(move || drop(vms));
    // The Err holds nothing to drop: `vms` went with the closure.
    drop(spawned);
}

/// The current primary's replication session.
struct Session {
    id: SessionId,
    /// None once a refusal ended the stream: only a new Hello continues.
    decoder: Option<EpochDecoder>,
    /// Where the session stands.
    phase: SessionPhase,
    /// A live migration to this host (`--incoming`): only a Handover makes
    /// it run the VM, never silence.
    migration: bool,
    /// Replay mode: the log and the replica that follows it.
    follower: Option<replica::Follower>,
}

/// Where a session stands, as the backup sees its primary.
///
/// ```text
///  Syncing ──first checkpoint commits──▶ Protected
///     └──────── goodbye / discard ────────┴──▶ Retired
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionPhase {
    /// No checkpoint of this session is committed yet: silence promotes
    /// nothing (the image is not this session's VM).
    Syncing,
    /// A checkpoint of this session is committed: the image is the newest
    /// state the primary may have released, and silence may promote it.
    Protected,
    /// The primary stopped on purpose (or an operator discarded the image):
    /// nothing promotes for this session.
    Retired,
}

impl Session {
    /// A checkpoint of this session is committed and the primary did not
    /// stop on purpose.
    fn protected(&self) -> bool {
        self.phase == SessionPhase::Protected
    }
}

struct State {
    phase: Phase,
}

struct Shared {
    opts: BackupOptions,
    host: HostIo,
    state: Mutex<State>,
    watch: Arc<watch::Watch>,
    /// Generation and whether the VM runs here, readable without the state
    /// lock (probes answer at once even while a commit waits for the disk).
    generation: AtomicU64,
    runs_here: AtomicBool,
    /// Set when a primary says Hello: a fresh image stops being read ahead
    /// (`warm_in_background`).
    warm_stop: Arc<AtomicBool>,
    /// Cancelled when the VM goes to the primary role (it leaves this role),
    /// or a post-copy failed.
    handed_over: CancellationToken,
    /// A post-copy migration's pages, while they arrive.
    postcopy: Mutex<Option<Arc<postcopy::Pager>>>,
    /// Post-copy: pages to ask the source for (the stream's task sends them).
    postcopy_notify: tokio::sync::Notify,
    /// Woken when an epoch commits or a session's stream ends (a handover
    /// waiting for its epoch, `service::await_commit`).
    commits: tokio::sync::Notify,
    vm_ended: tokio::sync::watch::Sender<Option<VmEnd>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::Acquire))
    }

    fn set_generation(&self, generation: Generation, runs_here: bool) {
        self.generation.store(generation.0, Ordering::Release);
        self.runs_here.store(runs_here, Ordering::Release);
        self.host
            .stats
            .generation
            .store(generation.0, Ordering::Release);
    }

    /// The standby state for a caller at `claimed`, or "you were deposed"
    /// (nothing stands by here, or the image is of a newer generation).
    fn standby_for<'a>(
        &self,
        phase: &'a mut Phase,
        claimed: Generation,
    ) -> Result<&'a mut Standby, Status> {
        match phase {
            Phase::Standby(standby) if claimed >= standby.generation => Ok(standby),
            _ => Err(self.deposed(claimed)),
        }
    }

    /// "You were deposed" for a caller at `claimed`.
    fn deposed(&self, claimed: Generation) -> Status {
        let generation = self.generation();
        let message = if self.runs_here.load(Ordering::Acquire) {
            format!(
                "deposed: the VM was promoted on the backup at generation {generation}; the sender at generation {claimed} must not run it"
            )
        } else {
            format!(
                "deposed: generation {claimed} is older than the backup's image (generation {generation})"
            )
        };
        wire::deposed(generation.0, message)
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
    let warm_stop = Arc::new(AtomicBool::new(false));
    let store = open_store(&opts, &warm_stop)?;
    let generation = Generation(store.generation());
    let stats = &host.stats;
    stats.generation.store(generation.0, Ordering::Release);
    let held = Incarnation::from_raw(store.incarnation());
    stats.set_incarnation(held);
    if let Some(incarnation) = held {
        host.holding(incarnation);
    }
    if opts.incoming {
        stats.set_state(StateKind::Incoming, match store.promotable() {
            Ok(p) => format!(
                "incoming: waiting for a live migration (holds epoch {} of an earlier one that did \
                 not finish; `understudyctl promote` resumes it if its source is gone)",
                p.epoch
            ),
            Err(_) => "incoming: waiting for a live migration".to_owned(),
        });
    } else {
        stats.set_state(StateKind::Standby, match store.promotable() {
        Ok(p) => format!(
            "standby: holds epoch {} from an earlier session (a primary resyncs it, or an operator resumes it)",
            p.epoch
        ),
        Err(_) => "standby: waiting for the primary".to_owned(),
    });
    }
    // The VM a promotion restores into is built once the backup listens
    // (`build_shell_later`): a primary can sync meanwhile.
    let shell_ram = shell_ram(&store);
    let (vm_ended, mut vm_ended_rx) = tokio::sync::watch::channel(None);
    let watch = watch::Watch::new();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            phase: Phase::Standby(Box::new(Standby {
                shell: None,
                postcopy_shell: None,
                prepared: None,
                store,
                generation,
                buffers: StagingBuffers::default(),
                session: None,
                stale: None,
            })),
        }),
        watch: watch.clone(),
        generation: AtomicU64::new(generation.0),
        runs_here: AtomicBool::new(false),
        warm_stop,
        handed_over: CancellationToken::new(),
        postcopy: Mutex::new(None),
        postcopy_notify: tokio::sync::Notify::new(),
        commits: tokio::sync::Notify::new(),
        vm_ended,
        opts: opts.clone(),
        host: host.clone(),
    });

    // The host's sockets when it has them: they stay bound across role changes.
    let (replication, heartbeats) = match &host.replication {
        Some(listener) => (
            listener
                .take_turn()
                .map_err(|source| wire::ListenError::new("replication", listener.addr, source))?,
            listener.heartbeats().map_err(|source| {
                wire::ListenError::new("heartbeats (UDP)", listener.addr, source)
            })?,
        ),
        None => (
            wire::listen("replication", opts.replication_listen).await?,
            std::net::UdpSocket::bind(opts.replication_listen).map_err(|source| {
                wire::ListenError::new("heartbeats (UDP)", opts.replication_listen, source)
            })?,
        ),
    };
    tracing::info!(vm = %opts.vm_id, %generation, replication = %opts.replication_listen, "backup listening");
    // Not waited for: a promotion before it is done builds its own VM.
    drop(build_shell_later(shared.clone(), shell_ram));

    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let detector = watch::spawn(
        watch.clone(),
        heartbeats,
        watch::Settings {
            interval: opts.heartbeat_interval,
            timeout: opts.heartbeat_timeout,
            primary_gives_up: understudy_common::heartbeat::primary_gives_up(
                opts.heartbeat_timeout,
            ),
            primary_releases_alone: opts.primary_releases_alone,
        },
        events_tx,
    )
    .map_err(BackupError::Heartbeats)?;
    let watcher = tokio::spawn(handle_events(shared.clone(), events));
    let (operator_tx, operator_rx) = tokio::sync::mpsc::channel(4);
    host.operator.install(operator_tx);
    let mut operator = tokio::spawn(operator::serve(shared.clone(), operator_rx));

    // The server stops accepting when the role ends (shutdown or handover);
    // connections it already has (the handover's answer) finish on their own.
    let role_done = shutdown.child_token();
    let tls = wire::server_tls(opts.tls.as_ref()).map_err(BackupError::Tls)?;
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(wire::STREAM_WINDOW)
        .initial_connection_window_size(wire::CONNECTION_WINDOW)
        .max_frame_size(wire::MAX_FRAME)
        .tcp_nodelay(true)
        .add_service(stream::Router::new(service::ReplicationService(
            shared.clone(),
        )));
    let server = wire::serve(
        router,
        replication,
        tls,
        role_done.clone().cancelled_owned(),
    );
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
            let phase = std::mem::replace(&mut shared.lock().phase, Phase::HandedOver(None));
            match phase {
                Phase::HandedOver(Some(running)) => Ok(BackupExit::TookOver(running)),
                Phase::Failed(why) => Err(BackupError::Postcopy(why)),
                _ => Err(BackupError::HandedOverVmMissing),
            }
        }
    };
    host.operator.clear();
    // An operator's promote that ended the role (an incoming destination
    // takes the VM as its primary) answers first: aborted, its caller heard
    // that the backup stopped, though the VM runs here. Its queue is closed
    // now, so the task ends once it answered what it took.
    if tokio::time::timeout(OPERATOR_DRAIN, &mut operator)
        .await
        .is_err()
    {
        operator.abort();
    }
    watcher.abort();
    watch.stop();
    // The detector wakes at least every half heartbeat interval to see that
    // it was stopped. A VM taken over does not wait for that (3.5 ms on
    // average with the default 10 ms interval, on the path to its first
    // output): the thread ends on its own, its events go nowhere (the watcher
    // is gone), and the primary role does not read the heartbeat socket.
    let detector = tokio::task::spawn_blocking(move || detector.join());
    if !matches!(exit, Ok(BackupExit::TookOver(_))) {
        let _ = detector.await;
    }
    role_done.cancel();
    if shutdown.is_cancelled() {
        server.abort();
    }
    // Stop a promoted VM.
    let phase = std::mem::replace(&mut shared.lock().phase, Phase::HandedOver(None));
    match phase {
        Phase::Promoted(vm) => drop(vm.stop()),
        Phase::Postcopy(p) => p.stop(),
        _ => {}
    }
    exit
}

/// Opens the image, or makes a new one. An image that cannot be trusted (its
/// record or pages are damaged, as a power loss without fsync can leave
/// them) is moved aside to `<image_dir>.discarded` and replaced by an empty
/// one, so the primary resyncs: a backup that cannot start helps nobody.
fn open_store(
    opts: &BackupOptions,
    warm_stop: &Arc<AtomicBool>,
) -> Result<ImageStore, BackupError> {
    let store_opts = StoreOptions { fsync: opts.fsync };
    let image = |source| BackupError::Image {
        dir: opts.image_dir.clone(),
        source,
    };
    let create = || -> Result<ImageStore, BackupError> {
        let store = ImageStore::create(&opts.image_dir, &opts.vm_id, opts.ram_bytes, store_opts)
            .map_err(image)?;
        warm_in_background(
            Some((store.journal_path(), store.memory_path())),
            receive_heap(opts.ram_bytes),
            warm_stop.clone(),
        );
        Ok(store)
    };
    let mut store = if opts.image_dir.join("meta").exists() {
        let started = std::time::Instant::now();
        match ImageStore::open(&opts.image_dir, store_opts) {
            Ok((store, recovery)) => {
                tracing::info!(
                    ?recovery,
                    status = ?store.status(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "image opened"
                );
                warm_in_background(None, receive_heap(opts.ram_bytes), warm_stop.clone());
                store
            }
            Err(
                e @ (StoreError::DigestMismatch { .. }
                | StoreError::NotAnImage { .. }
                | StoreError::Torn { .. }),
            ) => {
                let aside = opts.image_dir.with_extension("discarded");
                tracing::error!(
                    error = %wire::chain(&e),
                    moved_to = %aside.display(),
                    "the image cannot be trusted: discarding it; the primary resyncs this backup"
                );
                let _ = std::fs::remove_dir_all(&aside);
                std::fs::rename(&opts.image_dir, &aside).map_err(|source| {
                    image(StoreError::Io {
                        action: "cannot move aside",
                        path: opts.image_dir.clone(),
                        source,
                    })
                })?;
                create()?
            }
            Err(e) => return Err(image(e)),
        }
    } else {
        create()?
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
    // Room in the image's record for the largest checkpoint, made now,
    // while the disk has room to spare.
    if let Err(e) = store.reserve_record(opts.max_device_state) {
        tracing::warn!(error = %wire::chain(&e), "cannot make room in the image's record: on a full disk, a checkpoint larger than any before could not commit");
    }
    Ok(store)
}

/// The image's RAM file mapped as the RAM of the VM a promotion will
/// restore into (see [`VmShell`] and `build_shell_later`). None for an
/// image a VM may not map ([`image_mappable`]): a promotion runs the VM on
/// a copy of it.
fn shell_ram(store: &ImageStore) -> Option<Result<GuestRam, String>> {
    image_mappable(store).then(|| {
        store
            .ram_file()
            .map_err(|e| format!("cannot open the image's RAM file again: {e}"))
            .and_then(|file| {
                GuestRam::new(store.ram_bytes() as usize, RamBacking::SharedFile(file))
                    .map_err(|e| wire::chain(&e))
            })
    })
}

/// Builds the VM a promotion restores into, over `ram`, on a thread of its
/// own and hands it to the standby, off the path to listening: KVM's setup
/// took 5–30 ms here, and a re-protecting host (the old primary of a
/// switchover or a failover) listened that much later, its new primary
/// waiting. The image's store is never replaced while the backup runs, so
/// the RAM mapped now stays the image's. A backup that cannot build it
/// still protects: a promotion that finds no VM built (not yet, or not at
/// all) builds its own, and says why if it cannot either; a VM built here
/// after that is torn down unused. The thread answers whether the standby
/// took the VM (None: no thread, as no VM may map the image).
fn build_shell_later(
    shared: Arc<Shared>,
    ram: Option<Result<GuestRam, String>>,
) -> Option<std::thread::JoinHandle<bool>> {
    let ram = ram?;
    let spawned = std::thread::Builder::new()
        .name("vm-ahead".into())
        .spawn(move || {
            let Some(shell) = built_ahead("a promotion", ram) else {
                return false;
            };
            let mut state = shared.lock();
            if let Phase::Standby(standby) = &mut state.phase
                && standby.shell.is_none()
            {
                standby.shell = Some(shell);
                return true;
            }
            drop(state);
            // Torn down here, on this thread of its own (KVM takes ~10 ms).
            drop(shell);
            false
        });
    match spawned {
        Ok(thread) => Some(thread),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a thread to build the VM ahead: a promotion builds it");
            None
        }
    }
}

/// Whether a promoted VM may map the image's RAM file shared as its RAM:
/// only where all its blocks are reserved (`ImageStore::blocks_reserved`;
/// a guest store into a hole a full disk cannot fill would end the VM with
/// a `SIGBUS`). The fault point `backup.image.unreserved` answers no, as a
/// filesystem without `fallocate` would.
pub(crate) fn image_mappable(store: &ImageStore) -> bool {
    store.blocks_reserved() && understudy_common::fault::check("backup.image.unreserved").is_ok()
}

/// A VM built ahead for a replica, over RAM faulted in while the epochs it
/// will hold arrived ([`replica::Follower::fault_in_ahead`]): `touched`
/// says which pages were.
pub(crate) struct FaultedIn {
    pub shell: VmShell,
    pub touched: Vec<bool>,
}

/// The committed image's RAM copied into fresh anonymous memory of `size`
/// bytes (checked against the image's), for a VM that must not see later
/// commits (a replica) or cannot map the image; `ram_error` and
/// `read_error` say what failed in the caller's terms. See
/// [`copy_image_into`].
pub(crate) fn copy_image<E>(
    store: &ImageStore,
    size: usize,
    ram_error: impl Fn(understudy_vmm::memory::MemoryError) -> E,
    read_error: impl Fn(PathBuf, std::io::Error) -> E,
) -> Result<GuestRam, E> {
    if size as u64 != store.ram_bytes() {
        let why = format!(
            "the image holds {} bytes of RAM, the VM's state says {size}",
            store.ram_bytes()
        );
        return Err(read_error(
            store.memory_path(),
            std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        ));
    }
    let ram = GuestRam::new(size, RamBacking::Anonymous).map_err(&ram_error)?;
    copy_image_into(store, &ram, &[]).map_err(&ram_error)?;
    Ok(ram)
}

/// The committed image's RAM copied into `ram`, anonymous memory of the
/// image's size that is zero except where it was faulted in (`touched`,
/// empty for fresh RAM). Only the pages with content are read and written:
/// the image's page hashes say which are zero, so a mostly-zero image costs
/// its pages with content, not its size (reading all of a 256 MiB image not
/// in the page cache took ~450 ms), and the rest stay untouched (a full
/// sync from this RAM skips them unread). Pages faulted in ahead cost no
/// first touch here (the host already backs them); those of them that hold
/// no content in the image are dropped again, untouched as well.
pub(crate) fn copy_image_into(
    store: &ImageStore,
    ram: &GuestRam,
    touched: &[bool],
) -> Result<(), understudy_vmm::memory::MemoryError> {
    use understudy_checkpoint::PAGE_SIZE;
    /// Pages copied in one write at most.
    const RUN: usize = 256;
    let pages = (ram.size() / PAGE_SIZE).min(store.ram_bytes() as usize / PAGE_SIZE);
    let image = store.memory();
    let mut page = 0;
    while page < pages {
        if store.page_is_zero(page as u32) {
            page += 1;
            continue;
        }
        let start = page;
        while page < pages && page - start < RUN && !store.page_is_zero(page as u32) {
            page += 1;
        }
        let (from, to) = (start * PAGE_SIZE, page * PAGE_SIZE);
        ram.write_at(from as u64, &image[from..to])?;
    }
    // Faulted in ahead, zero in the image: they read zero either way;
    // dropped, they are untouched again. Only bookkeeping if it fails.
    let touched = &touched[..touched.len().min(pages)];
    let mut page = 0;
    while page < touched.len() {
        let start = page;
        while page < touched.len() && touched[page] && store.page_is_zero(page as u32) {
            page += 1;
        }
        if page > start {
            if let Err(e) = ram.discard(start, page - start) {
                tracing::debug!(error = %wire::chain(&e), "pages faulted in ahead stay mapped");
            }
        } else {
            page += 1;
        }
    }
    Ok(())
}

/// The VM a post-copy will restore into, over fresh anonymous memory of
/// `ram_bytes` (nothing is touched until the post-copy fills it).
fn build_postcopy_shell(ram_bytes: u64) -> Option<VmShell> {
    built_ahead(
        "a post-copy",
        GuestRam::new(ram_bytes as usize, RamBacking::Anonymous).map_err(|e| wire::chain(&e)),
    )
}

/// A VM built over `ram` for `what`, or None with a warning saying why.
fn built_ahead(what: &str, ram: Result<GuestRam, String>) -> Option<VmShell> {
    let started = std::time::Instant::now();
    match ram.and_then(|ram| VmShell::new(ram).map_err(|e| wire::chain(&e))) {
        Ok(shell) => {
            tracing::info!(
                took_us = started.elapsed().as_micros() as u64,
                "built the VM {what} restores into"
            );
            Some(shell)
        }
        Err(why) => {
            tracing::warn!(
                %why,
                "cannot build the VM ahead: {what} will build it (slower by ~10 ms)"
            );
            None
        }
    }
}

/// The longest the role's end waits for an operator request it took to be
/// answered (a promote is done by then: it is what ended the role).
const OPERATOR_DRAIN: Duration = Duration::from_secs(2);

/// The heap a backup takes while it waits for its first primary
/// ([`understudy_common::alloc::warm_heap`]): what its receive path grew
/// by in a full sync of 256 MiB on loopback, 11–35 MiB, the stream piling
/// up in the HTTP/2 window while it commits (never more than the VM's RAM).
const RECEIVE_HEAP: u64 = 32 << 20;

/// The heap a backup of a VM with `ram_bytes` of RAM takes ahead.
fn receive_heap(ram_bytes: u64) -> usize {
    // At most 32 MiB: the cast cannot truncate.
    RECEIVE_HEAP.min(ram_bytes) as usize
}

/// Takes the memory the first sync will need while the backup waits for
/// its first primary, on a thread of its own at idle priority: a fresh
/// image's journal and memory (`image`; see
/// [`understudy_checkpoint::store::warm_image`]), then the heap its receive
/// path will fill (`heap` bytes). `stop` (a primary's Hello) ends it early.
/// The daemon does not wait for it.
fn warm_in_background(image: Option<(PathBuf, PathBuf)>, heap: usize, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("warm-ahead".into())
        .spawn(move || {
            understudy_checkpoint::store::idle_priority();
            let warmed = image.map(|(journal, memory)| {
                understudy_checkpoint::store::warm_image(&journal, &memory, &stop)
                    .map_err(|e| (e, memory))
            });
            let heap = understudy_common::alloc::warm_heap(heap, &stop);
            match warmed {
                Some(Ok(w)) => tracing::info!(
                    journal_mib = w.journal_bytes >> 20,
                    mib = w.bytes >> 20,
                    heap_mib = heap >> 20,
                    took_ms = w.took.as_millis() as u64,
                    stopped_by_a_primary = stop.load(Ordering::Relaxed),
                    "read the new image into the page cache ahead of the first sync"
                ),
                Some(Err((e, memory))) => tracing::warn!(
                    error = %e,
                    path = %memory.display(),
                    heap_mib = heap >> 20,
                    "cannot read the new image ahead of the first sync (it only runs slower)"
                ),
                None => tracing::info!(
                    heap_mib = heap >> 20,
                    stopped_by_a_primary = stop.load(Ordering::Relaxed),
                    "took the receive heap ahead of the first sync"
                ),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the thread that takes memory ahead of the first sync (it only runs slower)");
    }
}

/// After a silence the witness could not be asked about, the detector is
/// armed again this much later (it reports again if the silence lasts).
const WITNESS_RETRY: Duration = Duration::from_millis(200);

/// Acts on what the heartbeat thread reports.
async fn handle_events(
    shared: Arc<Shared>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<watch::Event>,
) {
    while let Some(event) = events.recv().await {
        match event {
            watch::Event::Silent(silence) => {
                tracing::warn!(
                    silence_ms = silence.as_millis() as u64,
                    "primary silent past the heartbeat timeout: promoting"
                );
                let shared2 = shared.clone();
                let trigger = promotion::Trigger::Silence(silence);
                match tokio::task::spawn_blocking(move || promotion::promote(&shared2, trigger))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e @ promotion::PromotionError::Witness(_))) => {
                        // Nobody takes a new role without the witness: ask
                        // again while the primary stays silent.
                        tracing::warn!(error = %wire::chain(&e), "not promoting: the witness cannot be asked; asking again");
                        shared.host.stats.set_state(
                            StateKind::WitnessUnreachable,
                            format!("primary silent, not promoting: {}", wire::chain(&e)),
                        );
                        let shared = shared.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(WITNESS_RETRY).await;
                            let standby = matches!(&shared.lock().phase, Phase::Standby(s)
                                if s.stale.is_none() && s.session.as_ref().is_some_and(Session::protected));
                            if standby {
                                shared.watch.arm(true);
                            }
                        });
                    }
                    Ok(Err(e)) => {
                        // Nothing changed; a primary that comes back resyncs.
                        tracing::error!(error = %wire::chain(&e), "promotion failed; waiting for a primary");
                        shared.host.stats.protected.store(false, Ordering::Release);
                        let kind = match e {
                            promotion::PromotionError::WitnessRefused(_) => {
                                StateKind::WitnessRefused
                            }
                            _ => StateKind::PromotionFailed,
                        };
                        shared
                            .host
                            .stats
                            .set_state(kind, format!("promotion failed: {}", wire::chain(&e)));
                    }
                    Err(e) => tracing::error!(error = %e, "promotion task failed"),
                }
            }
            watch::Event::Stalled(stall) => mark_stale(&shared, stall),
        }
    }
}

/// This backup did not run for `stall`, long enough for a primary that
/// releases output alone to have given it up: its image may be older than
/// what clients saw. The session ends (a live primary resyncs) and silence
/// does not promote until a new checkpoint commits.
fn mark_stale(shared: &Shared, stall: Duration) {
    let mut state = shared.lock();
    if let Phase::Standby(standby) = &mut state.phase {
        let why = format!(
            "this backup was not running for {:.1} s, past the primary's give-up window: the primary \
             may have released output this image does not hold",
            stall.as_secs_f64()
        );
        tracing::warn!(
            stall_ms = stall.as_millis() as u64,
            "{why}; not promoting on silence until the primary resyncs (if it is gone for good, an \
             operator can resume the image: understudyctl promote)"
        );
        if let Some(session) = standby.session.as_mut() {
            session.decoder = None;
        }
        standby.stale = Some(why.clone());
        shared.host.stats.protected.store(false, Ordering::Release);
        shared
            .host
            .stats
            .set_state(StateKind::Stale, format!("stale: {why}"));
    }
    shared.watch.arm(false);
    shared.watch.stall_handled();
}

//! What a daemon's roles hand each other when they change in one process (a
//! switchover, a promotion, a deposed primary rejoining as the backup): the
//! host-level console, status and replication sockets that outlive any one
//! role, the running VM a promoted backup passes to the primary role, and the
//! slot through which the Control service passes operator requests
//! (switchover, promote, discard the image) to whichever role runs.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use understudy_proto::{DiscardImageReply, PromoteReply, SwitchoverReply};
use understudy_vmm::Vm;

use crate::ids::{Generation, Incarnation};

use crate::console::{ConsoleLog, InputSink};
use crate::status::Stats;

/// The pieces of a daemon that belong to the host, not to a role: clients
/// stay connected to the console and the control service across a role
/// change, and counters carry on.
#[derive(Debug, Clone)]
pub struct HostIo {
    pub stats: Arc<Stats>,
    pub log: Arc<ConsoleLog>,
    pub input: Arc<InputSink>,
    pub operator: OperatorSlot,
    /// The host's replication address, if it has one: the backup role serves
    /// replication on it, the primary role answers there that it runs the VM.
    pub replication: Option<Arc<SharedListener>>,
}

impl HostIo {
    pub fn new(stats: Arc<Stats>, replication: Option<SharedListener>) -> Self {
        Self {
            stats,
            log: ConsoleLog::new(0),
            input: InputSink::new(None),
            operator: OperatorSlot::default(),
            replication: replication.map(Arc::new),
        }
    }
}

/// A listening socket that outlives the servers taking turns on it: while one
/// role's server stops and the next one starts, a peer's connection waits in
/// the backlog instead of being refused (a refused probe would tell an old
/// primary that nobody runs the VM here).
///
/// The same address's UDP port carries heartbeats (`crate::heartbeat`); its
/// socket is bound here too, so beats never meet a closed port during a
/// role change.
#[derive(Debug)]
pub struct SharedListener {
    listener: std::net::TcpListener,
    heartbeats: std::net::UdpSocket,
    pub addr: std::net::SocketAddr,
}

impl SharedListener {
    /// Binds `addr` for `what` (the error names both).
    pub async fn bind(
        what: &'static str,
        addr: std::net::SocketAddr,
    ) -> Result<Self, crate::wire::ListenError> {
        let listener = crate::wire::listen(what, addr).await?;
        let listener = listener
            .into_std()
            .map_err(|source| crate::wire::ListenError::new(what, addr, source))?;
        let heartbeats = std::net::UdpSocket::bind(addr)
            .map_err(|source| crate::wire::ListenError::new("heartbeats (UDP)", addr, source))?;
        Ok(Self {
            listener,
            heartbeats,
            addr,
        })
    }

    /// The heartbeat socket (UDP, same address), for the backup role's
    /// heartbeat thread.
    pub fn heartbeats(&self) -> std::io::Result<std::net::UdpSocket> {
        self.heartbeats.try_clone()
    }

    /// A handle on the socket for one server; the socket stays bound after
    /// the server drops it.
    pub fn take_turn(&self) -> std::io::Result<tokio::net::TcpListener> {
        let listener = self.listener.try_clone()?;
        listener.set_nonblocking(true)?;
        tokio::net::TcpListener::from_std(listener)
    }
}

/// A VM running on this host, taken over by a planned handover: the backup
/// role promoted it and hands it to the primary role, which protects it.
#[derive(Debug)]
pub struct RunningVm {
    pub vm: Vm,
    /// The guest's console output (nothing read from it yet since the restore).
    pub output: crossbeam_channel::Receiver<u8>,
    /// The generation it was promoted at.
    pub generation: Generation,
    /// Which boot of the VM this is (unknown for an image written before
    /// incarnations existed: the primary role then gives it a new one).
    pub incarnation: Option<Incarnation>,
}

/// What a switchover request gets back.
pub type SwitchoverResult = Result<SwitchoverReply, tonic::Status>;

/// An operator's request, for whichever role runs on this host; the role
/// answers on the enclosed channel (or refuses what it does not do).
#[derive(Debug)]
pub enum OperatorRequest {
    /// A planned role swap (the primary role).
    Switchover(oneshot::Sender<SwitchoverResult>),
    /// Resume the VM from the backup's image (the backup role).
    Promote(oneshot::Sender<Result<PromoteReply, tonic::Status>>),
    /// Forget the VM the backup's image holds (the backup role).
    DiscardImage(oneshot::Sender<Result<DiscardImageReply, tonic::Status>>),
}

impl OperatorRequest {
    /// What the request is called, for refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Switchover(_) => "switchover",
            Self::Promote(_) => "promote",
            Self::DiscardImage(_) => "discard-image",
        }
    }

    /// Refuses the request with `status`.
    pub fn refuse(self, status: tonic::Status) {
        match self {
            Self::Switchover(tx) => drop(tx.send(Err(status))),
            Self::Promote(tx) => drop(tx.send(Err(status))),
            Self::DiscardImage(tx) => drop(tx.send(Err(status))),
        }
    }
}

/// Where the Control service finds the running role, if any.
#[derive(Debug, Clone, Default)]
pub struct OperatorSlot(Arc<Mutex<Option<mpsc::Sender<OperatorRequest>>>>);

impl OperatorSlot {
    /// The running role takes requests from `requests` until [`Self::clear`].
    pub fn install(&self, requests: mpsc::Sender<OperatorRequest>) {
        *self.lock() = Some(requests);
    }

    pub fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<OperatorRequest>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `make(answer)` to the running role and waits for its answer.
    /// `role` names this daemon's role for the error when none runs.
    pub async fn request<T>(
        &self,
        role: &str,
        make: impl FnOnce(oneshot::Sender<Result<T, tonic::Status>>) -> OperatorRequest,
    ) -> Result<T, tonic::Status> {
        let (tx, rx) = oneshot::channel();
        let request = make(tx);
        let what = request.name();
        let unavailable = || {
            tonic::Status::unavailable(format!(
                "{what} refused: no role is running on this host right now (role: {role}); try again"
            ))
        };
        let requests = self.lock().clone().ok_or_else(unavailable)?;
        requests.send(request).await.map_err(|_| unavailable())?;
        rx.await.unwrap_or_else(|_| {
            Err(tonic::Status::aborted(format!(
                "the {role} stopped before the {what} finished"
            )))
        })
    }
}

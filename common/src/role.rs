//! What a daemon's roles hand each other when they change in one process (a
//! switchover, a promotion, a deposed primary rejoining as the backup): the
//! host-level console, status and replication socket that outlive any one
//! role, the running VM a promoted backup passes to the primary role, and the
//! slot through which the Control service asks the primary role for a
//! switchover.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use understudy_proto::SwitchoverReply;
use understudy_vmm::Vm;

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
    pub switchover: SwitchoverSlot,
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
            switchover: SwitchoverSlot::default(),
            replication: replication.map(Arc::new),
        }
    }
}

/// A listening socket that outlives the servers taking turns on it: while one
/// role's server stops and the next one starts, a peer's connection waits in
/// the backlog instead of being refused (a refused probe would tell an old
/// primary that nobody runs the VM here).
#[derive(Debug)]
pub struct SharedListener {
    listener: std::net::TcpListener,
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
        Ok(Self { listener, addr })
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
    pub generation: u64,
}

/// What a switchover request gets back.
pub type SwitchoverResult = Result<SwitchoverReply, tonic::Status>;
/// One switchover request: where to answer.
pub type SwitchoverResponder = oneshot::Sender<SwitchoverResult>;

/// Where the Control service finds the running primary role, if any.
#[derive(Debug, Clone, Default)]
pub struct SwitchoverSlot(Arc<Mutex<Option<mpsc::Sender<SwitchoverResponder>>>>);

impl SwitchoverSlot {
    /// The primary role takes requests from `requests` until [`Self::clear`].
    pub fn install(&self, requests: mpsc::Sender<SwitchoverResponder>) {
        *self.lock() = Some(requests);
    }

    pub fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<SwitchoverResponder>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the primary role for a switchover and waits for its outcome.
    /// `role` names this daemon's role for the error when it is not a primary.
    pub async fn request(&self, role: &str) -> SwitchoverResult {
        let not_primary = || {
            tonic::Status::failed_precondition(format!(
                "this daemon takes no switchover (role: {role}, not a primary protecting its VM): \
                 ask the protected primary's control address"
            ))
        };
        let requests = self.lock().clone().ok_or_else(not_primary)?;
        let (tx, rx) = oneshot::channel();
        requests.send(tx).await.map_err(|_| not_primary())?;
        rx.await.unwrap_or_else(|_| {
            Err(tonic::Status::aborted(
                "the primary stopped before the switchover finished",
            ))
        })
    }
}

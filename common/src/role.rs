//! What a daemon's roles hand each other when they change in one process (a
//! switchover, a promotion, a deposed primary rejoining as the backup): the
//! host-level console, status and replication sockets that outlive any one
//! role, the running VM a promoted backup passes to the primary role, and the
//! slot through which the Control service passes operator requests
//! (switchover, promote, discard the image) to whichever role runs.

use std::sync::Arc;

use understudy_vmm::Vm;

use crate::ids::{Generation, Incarnation};

use crate::console::{ConsoleLog, InputSink};
use crate::operator::OperatorSlot;
use crate::status::Stats;

/// The pieces of a daemon that belong to the host, not to a role: clients
/// stay connected to the console and the control service across a role
/// change, and counters carry on.
#[derive(Debug, Clone)]
pub struct HostIo {
    /// The status and metrics of whichever role runs.
    pub stats: Arc<Stats>,
    /// The console's output log (offsets, output commit).
    pub log: Arc<ConsoleLog>,
    /// Where console input goes (the VM running here, if any).
    pub input: Arc<InputSink>,
    /// Operator requests to whichever role runs.
    pub operator: OperatorSlot,
    /// The host's replication address, if it has one: the backup role serves
    /// replication on it, the primary role answers there that it runs the VM.
    pub replication: Option<Arc<SharedListener>>,
    /// Where the backup role says which VM it holds, so that the host
    /// records ahead of a takeover what the takeover would otherwise record
    /// before the VM's first output (None: nothing is recorded ahead).
    pub record_ahead: Option<Arc<dyn RecordAhead>>,
}

/// Records, while this host is a VM's backup, what a takeover of that VM
/// must have on disk before the VM's first output goes out here: that this
/// host runs it unprotected (the primary's VM record, `state_dir/vm`). A
/// write that waits for the takeover puts its fsyncs between the failure
/// and the clients; one made ahead does not (see `docs/ARCHITECTURE.md`,
/// "Roles and how they change").
pub trait RecordAhead: std::fmt::Debug + Send + Sync {
    /// The backup role now holds (or starts to receive) `incarnation`.
    /// Returns at once; the record is written on a thread of its own.
    fn holding(&self, incarnation: Incarnation);
}

impl HostIo {
    /// The host's pieces: an empty console, no VM, `replication` bound.
    pub fn new(stats: Arc<Stats>, replication: Option<SharedListener>) -> Self {
        Self {
            stats,
            log: ConsoleLog::new(0),
            input: InputSink::new(None),
            operator: OperatorSlot::default(),
            replication: replication.map(Arc::new),
            record_ahead: None,
        }
    }

    /// The backup role holds (or starts to receive) `incarnation`: the host
    /// records ahead what a takeover of it needs (see [`RecordAhead`]).
    pub fn holding(&self, incarnation: Incarnation) {
        if let Some(ahead) = &self.record_ahead {
            ahead.holding(incarnation);
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
    /// The address both sockets are bound to.
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
    /// The VM, paused or running.
    pub vm: Vm,
    /// The guest's console output (nothing read from it yet since the restore).
    pub output: crossbeam_channel::Receiver<u8>,
    /// The generation it was promoted at.
    pub generation: Generation,
    /// Which boot of the VM this is (unknown for an image written before
    /// incarnations existed: the primary role then gives it a new one).
    pub incarnation: Option<Incarnation>,
    /// The VM records its trace log here (it was brought back in the
    /// deterministic mode, for replication by log shipping).
    pub trace: Option<crossbeam_channel::Receiver<understudy_vmm::deterministic::Sealed>>,
    /// Console output bytes of this VM (since its restore) already in the
    /// host's console log (a replica's replayed output, served at promotion).
    pub output_taken: u64,
    /// It came by a planned handover (a switchover or a live migration), not
    /// a promotion over a silent primary: the other hosts are changing roles,
    /// so the new primary's first attempts to reach its backup may fail for
    /// a moment without anything being wrong.
    pub by_handover: bool,
}

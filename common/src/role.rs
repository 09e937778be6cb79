//! What a daemon's roles hand each other when a switchover swaps them in one
//! process: the host-level console and status that outlive any one role, the
//! running VM a promoted backup passes to the primary role, and the slot
//! through which the Control service asks the primary role for a switchover.

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
}

impl HostIo {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            log: ConsoleLog::new(0),
            input: InputSink::new(None),
            switchover: SwitchoverSlot::default(),
        }
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

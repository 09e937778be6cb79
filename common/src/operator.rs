//! Operator requests (switchover, promote, discard the image) on their way
//! from the Control service to whichever role runs on this host: the slot a
//! running role installs its channel in, and the requests with their answer
//! channels.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use understudy_proto::{
    DiscardImageReply, MigrateReply, MigrateRequest, PromoteReply, SwitchoverReply,
};

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
    /// Move the running VM to another host (the primary role).
    Migrate(
        MigrateRequest,
        oneshot::Sender<Result<MigrateReply, tonic::Status>>,
    ),
}

impl OperatorRequest {
    /// What the request is called, for refusals.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Switchover(_) => "switchover",
            Self::Promote(_) => "promote",
            Self::DiscardImage(_) => "discard-image",
            Self::Migrate(..) => "migrate",
        }
    }

    /// Refuses the request with `status`.
    pub fn refuse(self, status: tonic::Status) {
        match self {
            Self::Switchover(tx) => drop(tx.send(Err(status))),
            Self::Promote(tx) => drop(tx.send(Err(status))),
            Self::DiscardImage(tx) => drop(tx.send(Err(status))),
            Self::Migrate(_, tx) => drop(tx.send(Err(status))),
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

    /// The role ends: requests are refused until the next one installs.
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

//! Operator requests a backup takes (`understudyctl promote`, `understudyctl
//! discard-image`): the two choices only a person can make when the primary
//! is gone and this host cannot tell whether its image is the newest state
//! (see `hello`). Both are refused while a primary is heard.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tonic::Status;
use understudy_common::ids::Incarnation;
use understudy_common::operator::OperatorRequest;
use understudy_common::status::StateKind;
use understudy_common::wire;
use understudy_proto::{DiscardImageReply, PromoteReply};

use crate::promotion::{self, Trigger};
use crate::{Phase, Shared};

/// Answers operator requests until the role ends.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    mut requests: tokio::sync::mpsc::Receiver<OperatorRequest>,
) {
    while let Some(request) = requests.recv().await {
        match request {
            OperatorRequest::Promote(answer) => {
                tracing::warn!("an operator asks to resume the VM from this backup's image");
                let shared2 = shared.clone();
                let result = tokio::task::spawn_blocking(move || {
                    promotion::promote(&shared2, Trigger::Operator)
                })
                .await;
                let reply = match result {
                    Ok(Ok(Some(p))) => Ok(PromoteReply {
                        generation: p.generation.0,
                        epoch: p.epoch,
                    }),
                    Ok(Ok(None)) => Err(Status::failed_precondition("nothing to promote")),
                    Ok(Err(e)) => Err(Status::failed_precondition(format!(
                        "promote refused: {}",
                        wire::chain(&e)
                    ))),
                    Err(e) => Err(Status::internal(format!("promotion task failed: {e}"))),
                };
                let _ = answer.send(reply);
            }
            OperatorRequest::DiscardImage(answer) => {
                let _ = answer.send(discard(&shared));
            }
            other @ (OperatorRequest::Switchover(_) | OperatorRequest::Migrate(..)) => {
                let what = other.name();
                other.refuse(Status::failed_precondition(format!(
                    "this daemon takes no {what} (it is the backup): ask the primary's control \
                     address"
                )))
            }
        }
    }
}

/// Retires the image: nobody resumes it, and a primary may boot a new VM.
fn discard(shared: &Shared) -> Result<DiscardImageReply, Status> {
    let mut state = shared.lock();
    let Phase::Standby(standby) = &mut state.phase else {
        return Err(Status::failed_precondition(
            "discard-image refused: the VM runs on this host",
        ));
    };
    let since = shared.watch.since_heard();
    if standby.session.is_some() && since < shared.opts.heartbeat_timeout {
        return Err(Status::failed_precondition(format!(
            "discard-image refused: a primary is replicating to this backup (heard {since:?} ago)"
        )));
    }
    let incarnation = Incarnation::from_raw(standby.store.incarnation());
    let epoch = standby.store.committed_epoch().unwrap_or_default();
    standby
        .store
        .retire()
        .map_err(|e| Status::internal(format!("cannot record the discard: {}", wire::chain(&e))))?;
    if let Some(session) = standby.session.as_mut() {
        session.phase = crate::SessionPhase::Retired;
    }
    shared.watch.arm(false);
    shared.host.stats.protected.store(false, Ordering::Release);
    shared.host.stats.set_state(
        StateKind::Standby,
        "standby: image discarded by an operator; a primary may boot a new VM",
    );
    tracing::warn!(
        incarnation = ?incarnation,
        epoch,
        "an operator discarded the image: a primary may boot a new VM over it"
    );
    Ok(DiscardImageReply {
        incarnation: incarnation.map(|i| i.to_string()).unwrap_or_default(),
        epoch,
    })
}

//! Live migration: moving the running VM to another host (one started with
//! `understudyd primary --incoming`) while the backup, if any, keeps
//! protecting it until the switch.
//!
//! ```text
//!  request ─▶ setup: Hello{migration} to the destination, a Replicate stream
//!    │
//!    ├─ stop-and-copy: ─────────────────────────────────────────────┐
//!    │                                                              ▼
//!    └─ precopy: rounds while the guest runs (in the time between    switch:
//!       checkpoints): round 1 = every page, round n = the pages       pause (the backup's final checkpoint, acked),
//!       dirtied during round n−1 ── remaining × rate ≤ budget ──▶     the rest to the destination (acked; ≤ 1 MiB: not waited for),
//!       ── not converging: auto-converge holds the vCPU a growing     goodbye to the backup, Handover ─▶ the
//!          share of the time (20 %, +10 % a round, ≤ 99 %)           destination runs the VM: MigratedAway
//! ```
//!
//! Failure rules: until the destination has acked the final state and the
//! backup has said it stands down, any failure resumes the VM here, still
//! protected (the destination never promotes on silence; its half image is
//! never run). A source that dies before the switch is an ordinary failover
//! to its backup. The one window without an automatic outcome is between the
//! backup's goodbye and the handover's answer: a source that dies there
//! leaves the VM paused with its final state on the destination, which an
//! operator resumes with `understudyctl promote` on the destination. A rest
//! of at most 1 MiB goes with the handover, not acked first (one round trip
//! less): the handover asks the destination to wait for its commit, and a
//! destination that refuses has closed the session first, so the rest never
//! commits after; that window then starts when the rest is sent.
//!
//! This module holds the migration's state, its link to the destination and
//! its decisions; the replicator thread, which owns the VM, drives it.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::StreamExt;
use tonic::transport::Channel;
use understudy_checkpoint::PAGE_SIZE;
use understudy_checkpoint::codec::Codec;
use understudy_checkpoint::epoch::EncodeError;
use understudy_checkpoint::epoch::{EncodeReport, EpochKind, SenderState};
use understudy_common::ids::{Epoch, EpochCell, Incarnation, SessionId};
use understudy_common::postcopy::PageRecords;
use understudy_proto::replication_client::ReplicationClient;
use understudy_proto::{
    EpochChunk, MigrateReply, MigrateRequest, MigrationProgress, PrepareHandoverRequest,
};
use understudy_vmm::memory::MemoryError;
use understudy_vmm::{DirtyBitmap, Vm, VmError};

use crate::PrimaryOptions;
use crate::link_rate::LinkRate;
use crate::peer::{Accepted, HandoverOutcome, HelloOutcome, SessionOffer, Target, hello_to};

/// The guest stop a pre-copy switch may take unless asked otherwise (QEMU's
/// default).
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(300);
/// Pre-copy rounds before auto-converge starts holding the vCPU.
const THROTTLE_AFTER_ROUNDS: u32 = 2;
/// Auto-converge: the first hold, its step per round, and its ceiling (in
/// percent of the guest's time), as QEMU's defaults.
const THROTTLE_INITIAL: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
/// Auto-converge holds the vCPU its share of every slice this long.
const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// Replay mode's slice: every hold of a recording guest seals a log segment
/// (one message to the backup and one to the destination), so the log phase
/// holds it less often, for longer.
const LOG_THROTTLE_SLICE: Duration = Duration::from_millis(25);
/// A pre-copy that has not converged after this many rounds gives up (the
/// VM runs on here).
const MAX_ROUNDS: u32 = 60;
/// Pages copied per pre-copy epoch, between looks at the clock and the
/// throttle (each epoch costs the destination a commit: 256 made an idle
/// 256 MiB round take ~200 ms).
const BATCH_PAGES: usize = 2048;
/// Pages a pre-copy epoch may pass over besides those it reads: pages the
/// guest never touched are known zero without a read, and over a zeroed
/// destination image they go as nothing, so an idle guest's first round is
/// one or two epochs, not one per [`BATCH_PAGES`] (each a commit there and
/// ~250 bytes of framing: 32 made an idle 256 MiB round overflow TCP's
/// first window on a long link, a round trip more).
const BATCH_SCAN: usize = 64 * BATCH_PAGES;
/// How long the destination may take to commit the final state.
const FINAL_ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// What a switch costs beyond the final copy (the destination restores;
/// measured ~15 ms on loopback, ~5 ms since the destination builds its VM
/// ahead; kept at the older figure for a destination of an older release
/// or one without the VM built ahead), for the downtime estimate.
const SWITCH_FIXED: Duration = Duration::from_millis(20);
/// The largest final epoch sent together with the handover (a larger one
/// is waited for first). Together, a link cut while the epoch is on its
/// way leaves the handover unanswered, and the switch's outcome unknown
/// until the link is back (the source must not resume, see
/// `handover_until_answered`); waited for, such a cut resumes the VM here.
/// So only an epoch that goes in about a round trip on a slow link is
/// sent together: the saving is that round trip, the risk a window as
/// short.
const PIPELINED_FINAL_BYTES: u64 = 1 << 20;
/// How long the destination may wait for a final epoch sent together with
/// its handover before it refuses (and closes the session, so the epoch
/// never commits after the refusal).
const HANDOVER_COMMIT_WAIT: Duration = Duration::from_secs(5);
/// A final checkpoint asks which pages were never touched when at least
/// this share (1/n) of RAM is pending.
const UNTOUCHED_LOOK_SHARE: usize = 8;
/// A round this small always converges.
const CONVERGED_PAGES: usize = 64;
/// Post-copy: pages sent after each faulting page (pre-paging).
const PREPAGE: usize = 16;
/// Post-copy: pages per pushed message.
const POSTCOPY_BATCH: usize = 64;
/// Post-copy: pushed messages queued ahead of a fault's page at most.
const POSTCOPY_QUEUED: usize = 2;
/// Chunks queued to the destination's stream before sending waits.
const LINK_DEPTH: usize = 64;
/// Bytes sent and not yet committed by the destination before more pages
/// are read: keeps the buffered data (and so the downtime estimate) honest.
const MAX_UNACKED_BYTES: u64 = 8 << 20;
/// A destination that takes nothing for this long is given up (a cut link
/// or a frozen host); the VM runs on here.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Replay mode: the least time the destination's replica follows the log
/// before the switch (a replica that just started proves little).
const MIN_LOG_PHASE: Duration = Duration::from_millis(200);

/// Replay mode: how often the log phase measures the destination replica's
/// pace against the guest's and sets the share of time the guest here is
/// held ([`log_throttle`]): a replica replays no faster than the guest ran,
/// so a guest that computes flat out is otherwise never caught. Also the
/// time in which the hold means to bring the backlog within the switch's.
const LOG_LOOK_EVERY: Duration = Duration::from_millis(250);

/// Replay mode: how long the destination's replica may take to catch up
/// with the log before the migration gives up (the VM stays here).
const REPLAY_CATCH_UP: Duration = Duration::from_secs(30);
/// How often a full link is looked at again.
const LINK_POLL: Duration = Duration::from_micros(250);

/// How the VM moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationMode {
    /// Pause, copy everything, resume there (the baseline).
    StopAndCopy,
    /// Rounds of dirty pages while the guest runs, then a stop that fits the
    /// downtime budget.
    Precopy,
    /// Switch at once: the destination runs the VM and fetches its pages
    /// on demand (userfaultfd) while the rest is pushed.
    Postcopy,
    /// One pre-copy round, then post-copy for what it dirtied.
    Hybrid,
    /// CR/TR-Motion: pre-copy rounds, then a checkpoint (the base) while the
    /// source goes on recording; from there only its log goes, and the
    /// destination replays it as it comes; the switch ships the log's tail.
    /// For a VM replicated by its log (`mode = "replay"`).
    Replay,
}

impl MigrationMode {
    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::StopAndCopy => "stop-and-copy",
            Self::Precopy => "precopy",
            Self::Postcopy => "postcopy",
            Self::Hybrid => "hybrid",
            Self::Replay => "replay",
        }
    }

    /// The destination runs the VM before all its pages are there.
    pub fn is_postcopy(self) -> bool {
        matches!(self, Self::Postcopy | Self::Hybrid)
    }
}

impl FromStr for MigrationMode {
    type Err = RequestError;

    fn from_str(s: &str) -> Result<Self, RequestError> {
        match s {
            "stop-and-copy" => Ok(Self::StopAndCopy),
            "precopy" | "" => Ok(Self::Precopy),
            "postcopy" => Ok(Self::Postcopy),
            "hybrid" => Ok(Self::Hybrid),
            "replay" => Ok(Self::Replay),
            other => Err(RequestError::UnknownMode(other.into())),
        }
    }
}

/// An operator's request that cannot be carried out as given (the refusal
/// names what to fix).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `--mode` names no mode.
    #[error(
        "unknown migration mode {0:?}: choose stop-and-copy, precopy, postcopy, hybrid or replay"
    )]
    UnknownMode(String),
    /// `--to` is not an address.
    #[error(
        "destination {0:?} is not an address: give the destination's replication address as \
         IP:PORT"
    )]
    BadDestination(String),
}

/// Why a migration cannot go on (before the switch: the VM runs on here).
#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrationError {
    /// No session with the destination (yet, or any more).
    #[error("not connected")]
    NotConnected,
    /// The destination refused the session or could not be reached; its
    /// own words, or the transport's.
    #[error("{0}")]
    Refused(String),
    /// The destination runs the VM already.
    #[error("the destination runs the VM already (generation {0})")]
    Deposed(u64),
    /// The stream to the destination ended (how its end was seen).
    #[error("{0}")]
    LinkLost(String),
    /// The destination took nothing queued for it this long.
    #[error("the destination took nothing for {0:?} (a cut link or a frozen host)")]
    Stalled(Duration),
    /// Post-copy: the destination neither took nor asked for anything.
    #[error(
        "the destination took nothing and said nothing for {0:?} (a cut link or a frozen host)"
    )]
    Silent(Duration),
    /// An epoch was not committed in time.
    #[error("the destination did not commit epoch {epoch} within {timeout:?}")]
    NotCommitted { epoch: u64, timeout: Duration },
    /// Replay: the log's end was not confirmed in time.
    #[error("the destination did not confirm the log up to exit {exit} within {timeout:?}")]
    LogNotHeld { exit: u64, timeout: Duration },
    /// Replay: the destination's replica fell behind for good.
    #[error(
        "the destination's replica did not catch up with the log within {limit:?} (base \
         committed: {base_committed}, replayed to exit {replayed}, {lag:?} behind)"
    )]
    ReplicaBehind {
        limit: Duration,
        base_committed: bool,
        replayed: u64,
        lag: Duration,
    },
    /// Pre-copy: the rounds never fit the budget, even throttled.
    #[error(
        "pre-copy did not converge in {MAX_ROUNDS} rounds: the guest dirties {dirty_rate:.0} \
         pages/s against {mb_per_s:.1} MB/s to the destination even with the vCPU held \
         {throttle}% of the time; try stop-and-copy or a larger --max-downtime"
    )]
    NoConvergence {
        dirty_rate: f64,
        mb_per_s: f64,
        throttle: u32,
    },
    #[error("cannot start the encoder")]
    Encoder(#[source] EncodeError),
    #[error("cannot encode")]
    Encode(#[source] EncodeError),
    #[error("cannot read guest page {page}")]
    ReadPage {
        page: u32,
        #[source]
        source: MemoryError,
    },
    #[error("cannot read the dirty log")]
    DirtyLog(#[source] VmError),
    #[error("cannot hold the vCPU")]
    Hold(#[source] VmError),
    #[error("cannot resume the vCPU")]
    Resume(#[source] VmError),
    #[error("cannot open a session")]
    Session(#[source] crate::PrimaryError),
    /// Replay: the log has nowhere to go without the backup's session.
    #[error(
        "a replay migration runs beside the backup's session, and this VM is not protected now: \
         retry once `understudyctl status` says protected"
    )]
    NotProtected,
    /// A test's fault injection (`UNDERSTUDY_FAULTS`).
    #[error("injected fault ({0})")]
    Fault(&'static str),
}

impl MigrationError {
    /// The whole story, sources included, for the operator.
    pub(crate) fn explain(&self) -> String {
        understudy_common::wire::chain(self)
    }
}

/// Where a migration's outcome goes (the operator's `Migrate` call).
pub(crate) type Responder = tokio::sync::oneshot::Sender<Result<MigrateReply, tonic::Status>>;

/// One operator request, checked.
#[derive(Debug)]
pub(crate) struct Request {
    pub target: Target,
    pub mode: MigrationMode,
    pub max_downtime: Duration,
    pub responder: Responder,
}

impl Request {
    /// Checks an operator's request (the answer goes to `responder`); the
    /// error names what to fix.
    pub(crate) fn parse(
        req: &MigrateRequest,
        responder: Responder,
    ) -> Result<Self, (RequestError, Responder)> {
        match Self::check(req) {
            Ok((target, mode, max_downtime)) => Ok(Self {
                target,
                mode,
                max_downtime,
                responder,
            }),
            Err(why) => Err((why, responder)),
        }
    }

    fn check(req: &MigrateRequest) -> Result<(Target, MigrationMode, Duration), RequestError> {
        let addr = req
            .destination
            .parse()
            .map_err(|_| RequestError::BadDestination(req.destination.clone()))?;
        let target = Target {
            addr,
            name: Some(req.destination_name.clone()).filter(|n| !n.is_empty()),
        };
        let max_downtime = match req.max_downtime_micros {
            0 => DEFAULT_MAX_DOWNTIME,
            us => Duration::from_micros(us),
        };
        Ok((target, req.mode.parse()?, max_downtime))
    }
}

/// A switch's final epoch, sent (see [`Migration::send_final`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FinalSent {
    pub epoch: u64,
    pub pages: u64,
    pub bytes: u64,
    /// Zero: committed. Else sent with the handover, which asks the
    /// destination to wait this long for the commit.
    pub commit_wait: Duration,
}

/// The replication stream to the destination.
pub(crate) struct Link {
    pub id: SessionId,
    chunks: tokio::sync::mpsc::Sender<EpochChunk>,
    broken: Arc<AtomicBool>,
    /// The last epoch the destination committed.
    acked: Arc<EpochCell>,
    why: Arc<Mutex<Option<String>>>,
    generation: u64,
    /// The destination takes Pages chunks checked by hash (no body CRC).
    pages_by_hash: bool,
    /// The destination's image held only zeros when the migration began.
    image_zeroed: bool,
    /// The destination's handover can wait for its epoch's commit.
    awaits_commit: bool,
    /// The destination restores the VM ahead of the handover when asked.
    prepares_handover: bool,
    /// The destination's replay handover can wait for the log's tail.
    awaits_log: bool,
    /// Chunks encoded and not yet handed to the stream.
    outbox: std::collections::VecDeque<EpochChunk>,
    /// Epochs sent and not yet acked, with their bytes.
    unacked: std::collections::VecDeque<(u64, u64)>,
    unacked_bytes: u64,
    /// Bytes the destination committed, and since when it has been sent to.
    acked_bytes: u64,
    acked_epochs: u64,
    first_send: Option<Instant>,
    /// The last time the destination took or committed anything.
    progress_at: Instant,
    /// Post-copy: pages the destination's VM waits for, and its word that
    /// every page is in (faults, fault wait p50 and p99 in µs).
    wanted: Arc<Mutex<Vec<u32>>>,
    done: Arc<Mutex<Option<(u64, u64, u64)>>>,
    /// Replay: the exit up to which the destination holds the log, and the
    /// one its replica replayed to (0: none yet).
    log_exits: Arc<AtomicU64>,
    replica_exits: Arc<AtomicU64>,
    /// The connection the stream runs on, for the handover: a new one would
    /// cost the switch a round trip or two (TCP, then HTTP/2) on a long link.
    client: ReplicationClient<Channel>,
    /// How fast the link and the destination behind it take epochs, for the
    /// adaptive codec (as the replication link's, from the acks).
    delivery: LinkRate,
}

impl Link {
    /// Opens a migration session with the destination.
    pub(crate) async fn open(
        opts: &PrimaryOptions,
        target: &Target,
        generation: u64,
        incarnation: Incarnation,
    ) -> Result<Self, MigrationError> {
        let offer =
            SessionOffer::new(generation, incarnation, None).map_err(MigrationError::Session)?;
        let accepted = match hello_to(opts, target, &offer, true).await {
            HelloOutcome::Accepted(accepted) => accepted,
            HelloOutcome::Deposed(g) => {
                return Err(MigrationError::Deposed(g));
            }
            HelloOutcome::HoldsVm(why)
            | HelloOutcome::Refused(why)
            | HelloOutcome::Unreachable(why) => return Err(MigrationError::Refused(why)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(LINK_DEPTH);
        let handover_client = ReplicationClient::new(accepted.channel.clone());
        // The stream opens without waiting for its answer's headers: HTTP/2
        // carries the chunks behind the request at once, and a refusal or a
        // destination that never answers (the link cut right after the
        // Hello, a frozen host: the stall rule holds here too) breaks the
        // link like a lost stream. On a long link that saves a round trip
        // before the first page.
        let opening = tokio::time::timeout(
            STALL_TIMEOUT,
            understudy_proto::framing::replicate(
                accepted.channel.clone(),
                tokio_stream::wrappers::ReceiverStream::new(rx),
            ),
        );
        // The stream's opening word: the destination learns which session
        // it carries before any data (a post-copy that loses it must know).
        tx.send(EpochChunk {
            session: offer.id.raw(),
            generation,
            ..Default::default()
        })
        .await
        .map_err(|_| {
            MigrationError::LinkLost("the stream to the destination closed at once".into())
        })?;
        let link = Self::new(offer.id, tx, handover_client, generation, &accepted);
        tokio::spawn({
            let (broken, acked, why) = (link.broken.clone(), link.acked.clone(), link.why.clone());
            let (wanted, done) = (link.wanted.clone(), link.done.clone());
            let (log_exits, replica_exits) = (link.log_exits.clone(), link.replica_exits.clone());
            async move {
                let reason = 'ended: {
                    let mut acks = match opening.await {
                        Ok(Ok(acks)) => acks,
                        Ok(Err(s)) => {
                            break 'ended format!(
                                "the destination refused the stream ({}: {})",
                                s.code(),
                                s.message()
                            );
                        }
                        // The stall rule's words, whichever of the two
                        // sees it first (this or `pump`).
                        Err(_) => break 'ended MigrationError::Stalled(STALL_TIMEOUT).to_string(),
                    };
                    loop {
                        match acks.next().await {
                            Some(Ok(ack)) => {
                                log_exits.fetch_max(ack.log_exits, Ordering::AcqRel);
                                replica_exits.fetch_max(ack.replica_exits, Ordering::AcqRel);
                                if !ack.want_pages.is_empty() {
                                    wanted
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .extend_from_slice(&ack.want_pages);
                                }
                                if ack.postcopy_done {
                                    *done.lock().unwrap_or_else(|p| p.into_inner()) = Some((
                                        ack.postcopy_faults,
                                        ack.fault_wait_p50_micros,
                                        ack.fault_wait_p99_micros,
                                    ));
                                }
                                if let Some(epoch) = Epoch::from_wire(ack.epoch) {
                                    acked.raise(epoch);
                                }
                            }
                            Some(Err(s)) => {
                                break format!(
                                    "lost the destination ({}: {})",
                                    s.code(),
                                    s.message()
                                );
                            }
                            None => break "the destination closed the stream".to_string(),
                        }
                    }
                };
                *why.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
                broken.store(true, Ordering::Release);
            }
        });
        Ok(link)
    }

    /// A link on the stream `chunks` goes to, nothing sent or heard yet
    /// (the acks are fed in by `open`'s task).
    fn new(
        id: SessionId,
        chunks: tokio::sync::mpsc::Sender<EpochChunk>,
        client: ReplicationClient<Channel>,
        generation: u64,
        accepted: &Accepted,
    ) -> Self {
        Self {
            id,
            chunks,
            broken: Default::default(),
            acked: Arc::new(EpochCell::new()),
            why: Default::default(),
            generation,
            pages_by_hash: accepted.pages_by_hash,
            image_zeroed: accepted.image_zeroed,
            awaits_commit: accepted.handover_awaits_commit,
            prepares_handover: accepted.prepares_handover,
            awaits_log: accepted.handover_awaits_log,
            outbox: Default::default(),
            unacked: Default::default(),
            unacked_bytes: 0,
            acked_bytes: 0,
            acked_epochs: 0,
            first_send: None,
            progress_at: Instant::now(),
            wanted: Default::default(),
            done: Default::default(),
            log_exits: Default::default(),
            replica_exits: Default::default(),
            client,
            delivery: LinkRate::default(),
        }
    }

    /// Post-copy: queues page records (first: ahead of what waits).
    fn queue_pages(&mut self, records: Vec<u8>, done: bool, first: bool) {
        let msg = EpochChunk {
            session: self.id.raw(),
            generation: self.generation,
            postcopy_pages: records.into(),
            postcopy_done: done,
            ..Default::default()
        };
        if first {
            self.outbox.push_front(msg);
        } else {
            self.outbox.push_back(msg);
        }
    }

    /// Messages handed to the stream that it has not taken yet.
    fn queued(&self) -> usize {
        LINK_DEPTH - self.chunks.capacity()
    }

    /// Pages the destination asked for since the last call (a sign of life).
    fn take_wanted(&mut self) -> Vec<u32> {
        let wanted = std::mem::take(&mut *self.wanted.lock().unwrap_or_else(|p| p.into_inner()));
        if !wanted.is_empty() {
            self.progress_at = Instant::now();
        }
        wanted
    }

    fn postcopy_done(&self) -> Option<(u64, u64, u64)> {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the first chunks of an epoch still being encoded.
    fn queue_chunks(&mut self, chunks: Vec<Vec<u8>>) {
        for chunk in chunks {
            self.outbox.push_back(EpochChunk {
                session: self.id.raw(),
                generation: self.generation,
                chunk: chunk.into(),
                ..Default::default()
            });
        }
    }

    /// Queues the last `chunks` of `epoch` (its `bytes` in all) for the
    /// destination.
    fn queue(&mut self, epoch: u64, bytes: u64, chunks: Vec<Vec<u8>>) {
        self.queue_chunks(chunks);
        self.unacked.push_back((epoch, bytes));
        self.unacked_bytes += bytes;
        let now = Instant::now();
        self.first_send.get_or_insert(now);
        self.delivery.shipped(epoch, now, bytes);
    }

    /// Hands queued chunks to the stream as far as it takes them, and
    /// accounts for the destination's acks. Never blocks. An error says why
    /// the link is gone (broken, or stalled for [`STALL_TIMEOUT`]).
    fn pump(&mut self) -> Result<(), MigrationError> {
        if self.broken.load(Ordering::Acquire) {
            return Err(MigrationError::LinkLost(self.why()));
        }
        let acked = self.acked.get();
        let mut newest = None;
        while let Some(&(epoch, bytes)) = self.unacked.front() {
            if !Epoch(epoch).covered_by(acked) {
                break;
            }
            self.unacked.pop_front();
            self.unacked_bytes -= bytes;
            self.acked_bytes += bytes;
            self.acked_epochs += 1;
            self.progress_at = Instant::now();
            newest = Some(epoch);
        }
        if let Some(epoch) = newest {
            // Seen here, up to one poll after the ack came.
            self.delivery.acked(epoch, self.progress_at);
        }
        while let Some(msg) = self.outbox.pop_front() {
            match self.chunks.try_send(msg) {
                Ok(()) => self.progress_at = Instant::now(),
                Err(tokio::sync::mpsc::error::TrySendError::Full(msg)) => {
                    self.outbox.push_front(msg);
                    break;
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    return Err(MigrationError::LinkLost(self.why()));
                }
            }
        }
        if (!self.outbox.is_empty() || !self.unacked.is_empty())
            && self.progress_at.elapsed() > STALL_TIMEOUT
        {
            return Err(MigrationError::Stalled(STALL_TIMEOUT));
        }
        Ok(())
    }

    /// Room for another batch: everything queued is handed over and the
    /// unacked bytes are under the window.
    fn has_room(&self) -> bool {
        self.outbox.is_empty() && self.unacked_bytes < MAX_UNACKED_BYTES
    }

    /// The destination's pace: bytes it committed per second since the
    /// first send (0 until it committed something).
    fn rate(&self) -> f64 {
        match self.first_send {
            Some(t) if self.acked_bytes > 0 => {
                self.acked_bytes as f64 / t.elapsed().as_secs_f64().max(1e-6)
            }
            _ => 0.0,
        }
    }

    /// How long the destination would take to commit `bytes` more in one
    /// epoch, at its measured pace in bytes and in epochs (a commit has a
    /// cost of its own, whatever its size); unbounded until it committed
    /// something.
    fn commit_estimate(&self, bytes: u64) -> Duration {
        let Some(since) = self.first_send.map(|t| t.elapsed().as_secs_f64().max(1e-6)) else {
            return Duration::MAX;
        };
        if self.acked_epochs == 0 {
            return Duration::MAX;
        }
        let by_bytes = bytes as f64 / self.rate().max(1.0);
        let by_epochs = since / self.acked_epochs as f64;
        Duration::from_secs_f64(by_bytes.max(by_epochs))
    }

    /// Pumps until everything queued is handed to the stream.
    fn flush_sent(&mut self, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump()?;
            if self.outbox.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::Stalled(timeout));
            }
            std::thread::sleep(LINK_POLL);
        }
    }

    /// Pumps until everything up to `epoch` is handed over and committed.
    fn flush_acked(&mut self, epoch: u64, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.pump()?;
            if self.outbox.is_empty() && self.acked.covers(Epoch(epoch)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::NotCommitted { epoch, timeout });
            }
            std::thread::sleep(LINK_POLL);
        }
    }

    fn why(&self) -> String {
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| "the link to the destination broke".into())
    }
}

/// Reads guest page `p` into `page` and adds it to the epoch; a page known
/// to be zero (never touched) is not read.
fn encode_page(
    vm: &Vm,
    p: u32,
    page: &mut [u8; PAGE_SIZE],
    known_zero: bool,
    enc: &mut understudy_checkpoint::epoch::EpochEncoder<'_>,
) -> Result<(), MigrationError> {
    if known_zero {
        return enc.add_zero_page(p).map_err(MigrationError::Encode);
    }
    vm.ram()
        .copy_page(p as usize, page)
        .map_err(|source| MigrationError::ReadPage { page: p, source })?;
    enc.add_page(p, page).map_err(MigrationError::Encode)
}

/// How long the handover asks the destination to wait for a final epoch of
/// `bytes` sent right before it: zero (the epoch is acked before the
/// handover goes) for a destination that cannot wait (`awaits_commit`
/// false: an older release) or an epoch over [`PIPELINED_FINAL_BYTES`].
fn final_commit_wait(awaits_commit: bool, bytes: u64) -> Duration {
    if awaits_commit && bytes <= PIPELINED_FINAL_BYTES {
        HANDOVER_COMMIT_WAIT
    } else {
        Duration::ZERO
    }
}

/// Sends the migration's handover (`ask`) until it is answered, for at most
/// `give_up`, `pause` between tries. Once a request went unanswered, a later
/// refusal proves nothing (the first may have promoted the destination,
/// which then refuses a second): the outcome stays unknown, and the source
/// must not resume.
pub(crate) async fn handover_until_answered<F, Fut>(
    give_up: Duration,
    pause: Duration,
    mut ask: F,
) -> HandoverOutcome
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = HandoverOutcome>,
{
    let deadline = Instant::now() + give_up;
    let mut unanswered: Option<String> = None;
    loop {
        match ask().await {
            HandoverOutcome::Unknown(why) if Instant::now() < deadline => {
                tracing::warn!(%why, "no answer to the migration's handover yet: asking again");
                unanswered = Some(why);
                tokio::time::sleep(pause).await;
            }
            HandoverOutcome::NotTaken(why) => {
                return match unanswered {
                    Some(first) => HandoverOutcome::Unknown(format!(
                        "a first request went unanswered ({first}), a later one was refused ({why})"
                    )),
                    None => HandoverOutcome::NotTaken(why),
                };
            }
            other => return other,
        }
    }
}

/// What the pre-copy loop does after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Stop the guest and send the rest.
    Switch,
    /// Another round, holding the vCPU this share (percent) of the time.
    Round { throttle: u32 },
    /// Not converging even at the highest hold: give up.
    GiveUp,
}

/// After round `round` (1 = the first, committed by the destination), with
/// `remaining` pages dirtied meanwhile and `estimate`: how long the
/// destination would take to commit them, at its measured pace. Switch if
/// that fits `budget`, or when the set is so small that the link, not the
/// guest, is the limit; otherwise another round, holding the vCPU more once
/// the rounds stop shrinking the set (auto-converge).
pub(crate) fn next_step(
    round: u32,
    remaining: usize,
    estimate: Duration,
    budget: Duration,
    throttle: u32,
) -> Next {
    if estimate.saturating_add(SWITCH_FIXED) <= budget || remaining <= CONVERGED_PAGES {
        return Next::Switch;
    }
    if round >= MAX_ROUNDS {
        return Next::GiveUp;
    }
    let throttle = if round < THROTTLE_AFTER_ROUNDS {
        0
    } else if throttle == 0 {
        THROTTLE_INITIAL
    } else {
        (throttle + THROTTLE_STEP).min(THROTTLE_MAX)
    };
    Next::Round { throttle }
}

/// Replay mode's auto-converge, at a look: the hold (percent of the guest's
/// time) that brings the destination replica's backlog ([`replay_backlog`])
/// down to the switch's `target` by the next look, from what the last
/// interval measured: the backlog `before` and `now`, `elapsed` between the
/// looks, `held` of it with the guest held. The replica replayed
/// r = (1 − held share) − Δbacklog ÷ elapsed seconds of the guest's work a
/// second; held a share h from now, the backlog changes by 1 − h − r a
/// second, so h = 1 − r + (now − target) ÷ [`LOG_LOOK_EVERY`], within
/// 0–[`THROTTLE_MAX`] %.
///
/// It was a ladder, as pre-copy's (20 %, +10 % at every look that did not
/// see the backlog fall by a quarter, never eased): the guest was held too
/// little for a look or three while the backlog grew, so the log phase took
/// 1.0–1.7 s on loopback and 1.1–2.1 s over 100 Mbit/s with 50 ms for the
/// flat-out dirtier. A replica that replays faster than the guest ran (idle
/// time costs it nothing) holds nothing.
pub(crate) fn log_throttle(
    before: Duration,
    now: Duration,
    elapsed: Duration,
    held: Duration,
    target: Duration,
) -> u32 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return 0;
    }
    let held_share = (held.as_secs_f64() / secs).min(1.0);
    let grew = (now.as_secs_f64() - before.as_secs_f64()) / secs;
    let replayed = (1.0 - held_share) - grew;
    let over = now.saturating_sub(target).as_secs_f64() / LOG_LOOK_EVERY.as_secs_f64();
    let hold = 1.0 - replayed + over;
    if hold.is_nan() || hold <= 0.0 {
        return 0;
    }
    ((hold * 100.0).round() as u32).min(THROTTLE_MAX)
}

/// How long to hold the vCPU after `ran` of work so that it is held
/// `throttle` percent of the time.
pub(crate) fn hold_for(ran: Duration, throttle: u32) -> Duration {
    if throttle == 0 {
        return Duration::ZERO;
    }
    let t = f64::from(throttle.min(THROTTLE_MAX)) / 100.0;
    ran.mul_f64(t / (1.0 - t))
}

/// Auto-converge's duty cycle: after the guest ran `ran` unheld, the hold
/// due now (None: not yet). One slice's hold at most, however long the guest
/// ran unwatched (the time between checkpoints is not the migration's to
/// hold: a hold proportional to it starved the migration). `slice`: the
/// duty cycle's period.
pub(crate) fn slice_hold(ran: Duration, throttle: u32, slice: Duration) -> Option<Duration> {
    if throttle == 0 {
        return None;
    }
    let share = f64::from(throttle.min(THROTTLE_MAX)) / 100.0;
    let run_slice = slice.mul_f64(1.0 - share);
    (ran >= run_slice).then(|| hold_for(run_slice, throttle))
}

/// What the pre-copy loop wants from the replicator.
pub(crate) enum Step {
    /// Carry on (more rounds, or the deadline came).
    Continue,
    /// Time to switch: pause and send the rest.
    Switch,
}

/// What replay's log phase wants from the replicator.
pub(crate) enum LogStep {
    /// Carry on: the destination's replica follows the log.
    Continue,
    /// To a destination whose handover waits for the log's tail: the switch
    /// is due once the destination holds the log whose output went out. From
    /// now on output waits for it too ([`crate::releaser::Releaser::gate`];
    /// [`Migration::gated`] with what went out so far).
    Gate,
    /// Time to switch: pause, send the log's tail, hand over.
    Switch,
}

/// A migration under way (owned by the replicator thread).
pub(crate) struct Migration {
    pub request: Request,
    /// What the host's status said before (said again if the migration
    /// fails).
    pub state_before: (understudy_common::status::StateKind, String),
    link: Option<Link>,
    sender: Option<SenderState>,
    requested: Instant,
    setup: Duration,
    /// This round's pages and the next to send.
    round_pages: Vec<u32>,
    next: usize,
    /// Pages dirtied since this round's list was taken.
    pending: DirtyBitmap,
    /// Pages whose last content sent was all zero.
    sent_zero: DirtyBitmap,
    /// The first round: pages nothing had touched when it began (zero
    /// without reading them; a later write is in the dirty log).
    untouched: Option<Vec<bool>>,
    round: u32,
    round_started: Instant,
    throttle: u32,
    max_throttle: u32,
    /// Auto-converge's duty cycle (pre-copy's, or the log phase's).
    throttle_slice: Duration,
    next_epoch: u64,
    /// Figures.
    bytes: u64,
    pages: u64,
    zero_pages: u64,
    duplicate_pages: u64,
    /// Pages left out: the destination held them already.
    held_pages: u64,
    held: Duration,
    /// Auto-converge: the guest has run since then without a hold.
    ran_since: Instant,
    rate: f64,
    dirty_rate: f64,
    ram_pages: usize,
    /// Replay mode, once the base is sent: the log's progress there.
    replay: Option<ReplayLog>,
    /// Replay mode: the pre-copy converged; the next checkpoint is the base.
    base_wanted: bool,
}

/// Replay mode after the base: the log sent to the destination and how far
/// its replica has replayed it.
#[derive(Debug)]
struct ReplayLog {
    /// The base checkpoint's epoch (the handover names it).
    base_epoch: u64,
    sent_at: Instant,
    /// Segments sent and not yet replayed there: (their last exit, when sent).
    unreplayed: std::collections::VecDeque<(u64, Instant)>,
    /// The last exit sent.
    last_exit: u64,
    log_bytes: u64,
    /// The guest's stop for the base (from its pause to its resume).
    base_pause: Duration,
    /// Auto-converge's last look (None: the replica has not started), the
    /// backlog then and the guest's held time by then.
    looked: Option<(Instant, Duration, Duration)>,
    /// The guest's pace, from the segments sent.
    pace: ExitPace,
    /// When the last segment was sent.
    last_sent: Instant,
    /// Segments sent that the destination has not said it holds: (their
    /// last exit, when sent).
    unheld: std::collections::VecDeque<(u64, Instant)>,
    /// The shortest time from a segment's send to the destination's word
    /// that it holds it: the link's round trip, about.
    round_trip: Option<Duration>,
    /// The switch is due and output waits for the destination too
    /// ([`LogStep::Gate`]): the exit up to which output went out before. The
    /// guest stops once the destination holds the log up to it.
    gate: Option<u64>,
}

/// Replay mode: the guest's pace in exits a second of it running (the time
/// auto-converge held it left out), from the first and the latest segment
/// sent: (its last exit, when sent, the guest's held time by then).
#[derive(Debug, Default)]
pub(crate) struct ExitPace {
    first: Option<(u64, Instant, Duration)>,
    last: Option<(u64, Instant, Duration)>,
}

impl ExitPace {
    /// A segment ending at exit `exit` sent `at`, the guest held `held` in
    /// all by then.
    pub(crate) fn segment(&mut self, exit: u64, at: Instant, held: Duration) {
        self.first.get_or_insert((exit, at, held));
        self.last = Some((exit, at, held));
    }

    /// Exits a second of the guest running; None before 50 ms of it.
    pub(crate) fn per_second(&self) -> Option<f64> {
        let ((e0, t0, h0), (e1, t1, h1)) = (self.first?, self.last?);
        let ran = t1
            .saturating_duration_since(t0)
            .saturating_sub(h1.saturating_sub(h0));
        (ran >= Duration::from_millis(50) && e1 > e0).then(|| (e1 - e0) as f64 / ran.as_secs_f64())
    }
}

/// Replay mode: the backlog ([`replay_backlog`]) the switch waits for, with
/// the downtime `budget` and the link's round trip (`round_trip`, None
/// while not measured). The replica replays on while the switch's round
/// trips go (the log's tail and its ack, then the handover: its tail is
/// there half a round trip after the pause, the handover a round trip
/// later), so a round trip and a half of backlog costs the stop nothing
/// more; beyond that, an eighth of the budget. Never more than half the
/// budget (half of it before the round trip is known). On loopback this
/// took the flat-out dirtier's stop from 121 ms (the replay of up to half
/// the default budget) to 18–20 ms; over 100 Mbit/s with a 50 ms round
/// trip the stop is those round trips either way (108–115 ms).
///
/// With the tail and the handover sent together (`tail_with_handover`:
/// [`LogStep::Gate`]) both arrive half a round trip after the pause, and that
/// half is what the replica replays unseen.
pub(crate) fn replay_switch_backlog(
    budget: Duration,
    round_trip: Option<Duration>,
    tail_with_handover: bool,
) -> Duration {
    let half = budget / 2;
    match round_trip {
        Some(rtt) if tail_with_handover => (rtt / 2 + budget / 8).min(half),
        Some(rtt) => (rtt + rtt / 2 + budget / 8).min(half),
        None => half,
    }
}

/// Replay mode: how long the destination's replica needs, at the guest's
/// own pace (`per_second`), to replay what it has not: the exits sent and
/// not replayed (`last_exit` − `replayed`), and what the guest ran since
/// the last segment (`unsealed`, at most that long). MAX while the pace is
/// not known and the replica is behind.
///
/// Not the age of the oldest segment not replayed (the measure before):
/// a segment holds up to 100 ms of the guest's work when it is sent, so
/// that age said 118–149 ms where 150–230 ms of work was left, and the
/// replica was still replaying 63–83 ms into the handover.
pub(crate) fn replay_backlog(
    last_exit: u64,
    replayed: u64,
    per_second: Option<f64>,
    unsealed: Duration,
) -> Duration {
    let behind = last_exit.saturating_sub(replayed);
    let sent = if behind == 0 {
        Duration::ZERO
    } else {
        match per_second {
            Some(rate) => {
                Duration::try_from_secs_f64(behind as f64 / rate).unwrap_or(Duration::MAX)
            }
            None => return Duration::MAX,
        }
    };
    sent.saturating_add(unsealed)
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Migration {
    pub(crate) fn new(
        request: Request,
        ram_pages: usize,
        state_before: (understudy_common::status::StateKind, String),
    ) -> Self {
        Self {
            request,
            state_before,
            link: None,
            sender: None,
            requested: Instant::now(),
            setup: Duration::ZERO,
            round_pages: Vec::new(),
            next: 0,
            pending: DirtyBitmap::full(ram_pages),
            sent_zero: DirtyBitmap::new(ram_pages),
            untouched: None,
            round: 0,
            round_started: Instant::now(),
            throttle: 0,
            max_throttle: 0,
            throttle_slice: THROTTLE_SLICE,
            next_epoch: 1,
            bytes: 0,
            pages: 0,
            zero_pages: 0,
            duplicate_pages: 0,
            held_pages: 0,
            held: Duration::ZERO,
            ran_since: Instant::now(),
            rate: 0.0,
            dirty_rate: 0.0,
            ram_pages,
            replay: None,
            base_wanted: false,
        }
    }

    /// Connects to the destination (blocking on `runtime`).
    pub(crate) fn connect(
        &mut self,
        runtime: &tokio::runtime::Handle,
        opts: &PrimaryOptions,
        generation: u64,
        incarnation: Incarnation,
    ) -> Result<(), MigrationError> {
        let link = runtime.block_on(Link::open(
            opts,
            &self.request.target,
            generation,
            incarnation,
        ))?;
        let sender = crate::peer::sync_sender(
            opts,
            self.ram_pages as u32,
            generation,
            link.pages_by_hash,
            link.image_zeroed,
        )
        .map_err(MigrationError::Encoder)?;
        self.link = Some(link);
        self.sender = Some(sender);
        self.setup = self.requested.elapsed();
        self.round_started = Instant::now();
        Ok(())
    }

    pub(crate) fn connected(&self) -> bool {
        self.link.is_some()
    }

    /// Pages the guest dirtied (from a checkpoint's or our own harvest).
    pub(crate) fn dirtied(&mut self, pages: &[u32]) {
        for &p in pages {
            self.pending.set(p as usize);
        }
    }

    /// As [`Self::dirtied`], from a bitmap.
    pub(crate) fn dirtied_bitmap(&mut self, dirty: &DirtyBitmap) {
        self.pending.union_words(dirty.words());
    }

    fn account(&mut self, report: &EncodeReport) {
        self.bytes += report.bytes_out;
        self.pages += report.pages;
        self.zero_pages += report.pages_by_codec[Codec::Zero as usize];
        self.duplicate_pages += report.pages_by_codec[Codec::SameAs as usize]
            + report.pages_by_codec[Codec::RepeatOf as usize];
        self.held_pages += report.pages_held;
    }

    /// Pre-copy: sends this round's pages from the running guest until
    /// `deadline`; at a round's end decides what comes next. `harvest`:
    /// no checkpoint harvests for us (no backup session), so harvest here.
    pub(crate) fn precopy_until(
        &mut self,
        vm: &Vm,
        page: &mut [u8; PAGE_SIZE],
        deadline: Instant,
        harvest: bool,
        may_hold: bool,
    ) -> Result<Step, MigrationError> {
        loop {
            self.link_mut()?.pump()?;
            if self.next >= self.round_pages.len() {
                if self.round > 0 && self.link_mut()?.unacked_bytes > 0 {
                    // A round ends when the destination has it all: rounds
                    // then follow the link's pace, and the measurements
                    // below are of what it did.
                    if Instant::now() >= deadline {
                        return Ok(Step::Continue);
                    }
                    std::thread::sleep(LINK_POLL);
                    self.throttle_tick(vm, may_hold)?;
                    continue;
                }
                if self.round > 0 && self.request.mode == MigrationMode::Hybrid {
                    // One round, committed there, then post-copy for what it
                    // dirtied (nothing left in flight to wait for at the stop).
                    return Ok(Step::Switch);
                }
                if self.round > 0 {
                    if harvest {
                        let dirty = vm.harvest_dirty().map_err(MigrationError::DirtyLog)?;
                        self.dirtied_bitmap(&dirty);
                    }
                    let took = self.round_started.elapsed().as_secs_f64().max(1e-6);
                    self.dirty_rate = self.pending.count() as f64 / took;
                    let per_page = if self.pages > 0 {
                        self.bytes as f64 / self.pages as f64
                    } else {
                        PAGE_SIZE as f64
                    };
                    let remaining = self.pending.count();
                    let link = self.link_mut()?;
                    let estimate = link.commit_estimate((remaining as f64 * per_page) as u64);
                    self.rate = link.rate();
                    match next_step(
                        self.round,
                        remaining,
                        estimate,
                        self.request.max_downtime,
                        self.throttle,
                    ) {
                        Next::Switch => {
                            tracing::info!(
                                round = self.round,
                                remaining,
                                estimate_ms = estimate.as_secs_f64() * 1e3,
                                "migration: the rest fits the downtime budget: switching"
                            );
                            return Ok(Step::Switch);
                        }
                        Next::GiveUp => {
                            return Err(MigrationError::NoConvergence {
                                dirty_rate: self.dirty_rate,
                                mb_per_s: self.rate / 1e6,
                                throttle: self.throttle,
                            });
                        }
                        Next::Round { throttle } => {
                            if throttle != self.throttle {
                                tracing::info!(
                                    round = self.round,
                                    throttle,
                                    "migration: auto-converge holds the vCPU more"
                                );
                            }
                            self.throttle = throttle;
                            self.max_throttle = self.max_throttle.max(throttle);
                        }
                    }
                }
                self.start_round();
                if self.round_pages.is_empty() {
                    // Nothing dirtied: wait for the destination to catch up
                    // (the next look decides on its measured pace).
                    if Instant::now() >= deadline {
                        return Ok(Step::Continue);
                    }
                    std::thread::sleep(LINK_POLL);
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return Ok(Step::Continue);
            }
            if self.link_mut()?.has_room() {
                self.send_batch(vm, page)?;
            } else {
                std::thread::sleep(LINK_POLL);
            }
            self.throttle_tick(vm, may_hold)?;
        }
    }

    fn link_mut(&mut self) -> Result<&mut Link, MigrationError> {
        self.link.as_mut().ok_or(MigrationError::NotConnected)
    }

    fn start_round(&mut self) {
        let pending = std::mem::replace(&mut self.pending, DirtyBitmap::new(self.ram_pages));
        self.round_pages = pending.page_numbers();
        self.next = 0;
        self.round += 1;
        self.untouched = None;
        self.round_started = Instant::now();
        tracing::debug!(
            round = self.round,
            pages = self.round_pages.len(),
            "migration round"
        );
    }

    /// At the switch: the pages of this round not sent yet are pending
    /// like those dirtied since.
    fn end_round_early(&mut self) {
        for &p in &self.round_pages[self.next..] {
            self.pending.set(p as usize);
        }
        self.round_pages.clear();
        self.next = 0;
    }

    /// Bytes sent to the destination so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// One batch of this round's pages, as one epoch, read while the guest
    /// runs: up to [`BATCH_PAGES`] read, up to [`BATCH_SCAN`] in all.
    fn send_batch(&mut self, vm: &Vm, page: &mut [u8; PAGE_SIZE]) -> Result<(), MigrationError> {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let (Some(link), Some(sender)) = (self.link.as_mut(), self.sender.as_mut()) else {
            return Err(MigrationError::NotConnected);
        };
        sender.set_link_rate(link.delivery.rate());
        let mut enc = sender
            .begin(epoch, EpochKind::SyncRound)
            .map_err(MigrationError::Encode)?;
        if self.round == 1 && self.next == 0 {
            self.untouched = vm.ram().untouched_pages();
        }
        let scan_end = (self.next + BATCH_SCAN).min(self.round_pages.len());
        let mut read = 0;
        let mut end = self.next;
        while end < scan_end && read < BATCH_PAGES {
            let p = self.round_pages[end];
            end += 1;
            let known_zero = self.untouched.as_ref().is_some_and(|u| u[p as usize]);
            encode_page(vm, p, page, known_zero, &mut enc)?;
            if known_zero || understudy_checkpoint::page::is_zero(page) {
                self.sent_zero.set(p as usize);
            } else {
                self.sent_zero.unset(p as usize);
            }
            read += usize::from(!known_zero);
        }
        let encoded = enc.finish(&[]).map_err(MigrationError::Encode)?;
        link.queue(epoch, encoded.report.bytes_out, encoded.chunks);
        link.pump()?;
        self.account(&encoded.report);
        self.next = end;
        Ok(())
    }

    /// Auto-converge's duty cycle over wall time (sending or waiting for
    /// the link alike): after [`THROTTLE_SLICE`] of running, less the held
    /// share, the vCPU is held for that share.
    fn throttle_tick(&mut self, vm: &Vm, may_hold: bool) -> Result<(), MigrationError> {
        let hold = if may_hold {
            slice_hold(self.ran_since.elapsed(), self.throttle, self.throttle_slice)
        } else {
            None
        };
        let Some(hold) = hold else {
            if self.throttle == 0 || !may_hold {
                self.ran_since = Instant::now();
            }
            return Ok(());
        };
        vm.pause().map_err(MigrationError::Hold)?;
        std::thread::sleep(hold);
        vm.resume().map_err(MigrationError::Resume)?;
        self.held += hold;
        self.ran_since = Instant::now();
        Ok(())
    }

    /// The switch: the pages still pending (dirtied up to the pause) read
    /// from the paused guest, with the device state and console payload, as
    /// one checkpoint. A destination that can wait for it at the handover
    /// (`handover_awaits_commit`) gets the handover right behind it when it
    /// is small (at most [`PIPELINED_FINAL_BYTES`]): this returns once the
    /// stream took it, and the handover names the wait. Otherwise this
    /// returns once the destination committed it, and the handover follows.
    pub(crate) fn send_final(
        &mut self,
        vm: &Vm,
        page: &mut [u8; PAGE_SIZE],
        payload: &[u8],
    ) -> Result<FinalSent, MigrationError> {
        let (epoch, pages, bytes) = self.queue_checkpoint(vm, page, payload)?;
        let link = self.link_mut()?;
        let commit_wait = final_commit_wait(link.awaits_commit, bytes);
        if commit_wait.is_zero() {
            link.flush_acked(epoch, FINAL_ACK_TIMEOUT)?;
        } else {
            link.flush_sent(FINAL_ACK_TIMEOUT)?;
        }
        Ok(FinalSent {
            epoch,
            pages,
            bytes,
            commit_wait,
        })
    }

    /// Replay mode's base: [`send_final`](Self::send_final)'s checkpoint,
    /// queued (the guest runs on and its log follows it on the stream), not
    /// waited for. From here on, the log goes instead of pages.
    pub(crate) fn send_base(
        &mut self,
        vm: &Vm,
        page: &mut [u8; PAGE_SIZE],
        payload: &[u8],
    ) -> Result<(), MigrationError> {
        let (epoch, _, _) = self.queue_checkpoint(vm, page, payload)?;
        self.replay = Some(ReplayLog {
            base_epoch: epoch,
            sent_at: Instant::now(),
            unreplayed: Default::default(),
            last_exit: 0,
            log_bytes: 0,
            base_pause: Duration::ZERO,
            looked: None,
            pace: ExitPace::default(),
            last_sent: Instant::now(),
            unheld: Default::default(),
            round_trip: None,
            gate: None,
        });
        // The pre-copy's hold ends with it: the log phase holds the guest
        // only if the destination's replica does not gain on the log.
        self.throttle = 0;
        self.throttle_slice = LOG_THROTTLE_SLICE;
        tracing::info!(
            epoch,
            "migration: the base checkpoint is on its way; the log follows it"
        );
        Ok(())
    }

    /// Encodes the pending pages and `payload` as one checkpoint and queues
    /// it: its epoch, pages and bytes.
    fn queue_checkpoint(
        &mut self,
        vm: &Vm,
        page: &mut [u8; PAGE_SIZE],
        payload: &[u8],
    ) -> Result<(u64, u64, u64), MigrationError> {
        self.end_round_early();
        let pages = self.pending.page_numbers();
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let (Some(link), Some(sender)) = (self.link.as_mut(), self.sender.as_mut()) else {
            return Err(MigrationError::NotConnected);
        };
        sender.set_link_rate(link.delivery.rate());
        let mut enc = sender
            .begin(epoch, EpochKind::Checkpoint)
            .map_err(MigrationError::Encode)?;
        // A stop-and-copy stops the guest for every page of RAM: those
        // nothing ever touched go as zero pages without a read (reading one
        // costs a fault). The look costs a read of the page table's entries,
        // worth it only when many pages are pending.
        let untouched = (pages.len() >= self.ram_pages / UNTOUCHED_LOOK_SHARE)
            .then(|| vm.ram().untouched_pages())
            .flatten();
        for (i, &p) in pages.iter().enumerate() {
            let known_zero = untouched.as_ref().is_some_and(|u| u[p as usize]);
            encode_page(vm, p, page, known_zero, &mut enc)?;
            if i % BATCH_PAGES == BATCH_PAGES - 1 {
                // Out while the rest is read (queued as one epoch below).
                link.queue_chunks(enc.take_chunks());
                link.pump()?;
            }
        }
        let encoded = enc.finish(payload).map_err(MigrationError::Encode)?;
        let report = encoded.report;
        link.queue(epoch, report.bytes_out, encoded.chunks);
        let pumped = link.pump();
        self.account(&report);
        pumped?;
        self.pending = DirtyBitmap::new(self.ram_pages);
        Ok((epoch, pages.len() as u64, report.bytes_out))
    }

    /// Replay mode: the pre-copy converged: the next checkpoint is the base.
    pub(crate) fn want_base(&mut self) {
        self.base_wanted = true;
    }

    /// Replay mode: the next checkpoint is the base (not sent yet).
    pub(crate) fn base_wanted(&self) -> bool {
        self.base_wanted && self.replay.is_none()
    }

    /// Replay mode: the base's stop, from the checkpoint's pause to the
    /// guest's resume.
    pub(crate) fn base_paused(&mut self, pause: Duration) {
        if let Some(log) = self.replay.as_mut() {
            log.base_pause = pause;
        }
    }

    /// Bytes sent so far.
    pub(crate) fn bytes_sent(&self) -> u64 {
        self.bytes
    }

    /// Replay mode: whether the base is sent (the log goes from here on).
    pub(crate) fn log_phase(&self) -> bool {
        self.replay.is_some()
    }

    /// Replay mode: one segment of the log (sealed after the base's pause),
    /// ending at exit `exits_end`, to the destination.
    pub(crate) fn forward_segment(
        &mut self,
        bytes: &[u8],
        exits_end: u64,
    ) -> Result<(), MigrationError> {
        let (Some(link), Some(log)) = (self.link.as_mut(), self.replay.as_mut()) else {
            return Err(MigrationError::NotConnected);
        };
        link.outbox.push_back(EpochChunk {
            session: link.id.raw(),
            generation: link.generation,
            trace_segment: bytes.to_vec().into(),
            ..Default::default()
        });
        let now = Instant::now();
        log.unreplayed.push_back((exits_end, now));
        log.unheld.push_back((exits_end, now));
        log.pace.segment(exits_end, now, self.held);
        log.last_sent = now;
        log.last_exit = exits_end;
        log.log_bytes += bytes.len() as u64;
        self.bytes += bytes.len() as u64;
        link.pump()
    }

    /// Replay mode after the base: switch once the destination committed
    /// the base and its replica's backlog ([`replay_backlog`]) is within
    /// [`replay_switch_backlog`] (the rest replays within the budget at the
    /// switch), and has followed the log for at least
    /// [`MIN_LOG_PHASE`]; give up if it does not catch up within
    /// [`REPLAY_CATCH_UP`]. Meanwhile the guest (`vm`) is held a growing
    /// share of the time while the replica does not gain on the log
    /// (`may_hold`: no one else holds it now).
    pub(crate) fn replay_step(
        &mut self,
        vm: &Vm,
        may_hold: bool,
    ) -> Result<LogStep, MigrationError> {
        let budget = self.request.max_downtime;
        let (Some(link), Some(log)) = (self.link.as_mut(), self.replay.as_mut()) else {
            return Err(MigrationError::NotConnected);
        };
        link.pump()?;
        let replayed = link.replica_exits.load(Ordering::Acquire);
        while log.unreplayed.front().is_some_and(|(e, _)| *e <= replayed) {
            log.unreplayed.pop_front();
        }
        let held_to = link.log_exits.load(Ordering::Acquire);
        while let Some(&(e, at)) = log.unheld.front()
            && e <= held_to
        {
            log.unheld.pop_front();
            let took = at.elapsed();
            log.round_trip = Some(log.round_trip.map_or(took, |rtt| rtt.min(took)));
        }
        let base_committed = link.acked.covers(Epoch(log.base_epoch));
        // The age of the oldest segment not replayed, for the give-up's
        // words.
        let lag = log
            .unreplayed
            .front()
            .map_or(Duration::ZERO, |(_, at)| at.elapsed());
        let backlog = replay_backlog(
            log.last_exit,
            replayed,
            log.pace.per_second(),
            log.last_sent.elapsed(),
        );
        let since = log.sent_at.elapsed();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let target = replay_switch_backlog(budget, log.round_trip, link.awaits_log);
        if let Some(released) = log.gate {
            // The backlog may have grown while the gate's round trip went
            // by: still within the target (the hold goes on meanwhile).
            if held_to >= released && backlog <= target {
                tracing::info!(
                    held_to,
                    backlog_ms = ms(backlog),
                    "migration: the destination holds the log of all output released: switching"
                );
                return Ok(LogStep::Switch);
            }
        } else if base_committed && replayed > 0 && backlog <= target && since >= MIN_LOG_PHASE {
            tracing::info!(
                log_bytes = log.log_bytes,
                backlog_ms = ms(backlog),
                target_ms = ms(target),
                lag_ms = ms(lag),
                throttle = self.throttle,
                "migration: the destination's replica keeps up with the log: switching"
            );
            return Ok(if link.awaits_log {
                LogStep::Gate
            } else {
                LogStep::Switch
            });
        }
        if since > REPLAY_CATCH_UP {
            return Err(MigrationError::ReplicaBehind {
                limit: REPLAY_CATCH_UP,
                base_committed,
                replayed,
                lag,
            });
        }
        if base_committed && replayed > 0 {
            match log.looked {
                // The first look: the replica's pace is measured from here.
                // (Taking it as the guest's and holding at once held a kv
                // guest, which the replica catches at once, 99 % of the time:
                // its clients waited 56-59 ms at the switch against 16-19.)
                None => log.looked = Some((Instant::now(), backlog, self.held)),
                Some((at, before, held)) if at.elapsed() >= LOG_LOOK_EVERY => {
                    let throttle = log_throttle(
                        before,
                        backlog,
                        at.elapsed(),
                        self.held.saturating_sub(held),
                        target,
                    );
                    if throttle != self.throttle {
                        tracing::info!(
                            throttle,
                            backlog_ms = ms(backlog),
                            backlog_before_ms = ms(before),
                            target_ms = ms(target),
                            "migration: auto-converge holds the vCPU so that the destination's \
                             replica is within the switch's backlog by the next look"
                        );
                        self.throttle = throttle;
                        self.max_throttle = self.max_throttle.max(throttle);
                    }
                    log.looked = Some((Instant::now(), backlog, self.held));
                }
                Some(_) => {}
            }
        }
        self.throttle_tick(vm, may_hold)?;
        Ok(LogStep::Continue)
    }

    /// Replay mode, the switch due ([`LogStep::Gate`]): output went out up to
    /// exit `released`; the guest stops once the destination holds the log
    /// up to it.
    pub(crate) fn gated(&mut self, released: u64) {
        if let Some(log) = self.replay.as_mut() {
            log.gate = Some(released);
        }
    }

    /// Replay mode: the exit up to which the destination holds the log.
    pub(crate) fn destination_log(&self) -> u64 {
        self.link
            .as_ref()
            .map_or(0, |l| l.log_exits.load(Ordering::Acquire))
    }

    /// Replay mode's switch, the guest paused and its last segment sent:
    /// returns the base's epoch (the handover names it) and the log's last
    /// exit. To a destination whose handover waits for the log
    /// (`awaits_log`, the log of all output released already there:
    /// [`LogStep::Gate`]) once the tail is handed to the stream; else once the
    /// destination holds the log up to the last exit (the exit returned is
    /// then 0: nothing to wait for).
    pub(crate) fn flush_log(&mut self) -> Result<(u64, u64), MigrationError> {
        let (Some(link), Some(log)) = (self.link.as_mut(), self.replay.as_ref()) else {
            return Err(MigrationError::NotConnected);
        };
        let (last, base) = (log.last_exit, log.base_epoch);
        if link.awaits_log && log.gate.is_some() {
            link.flush_sent(FINAL_ACK_TIMEOUT)?;
            return Ok((base, last));
        }
        let deadline = Instant::now() + FINAL_ACK_TIMEOUT;
        loop {
            link.pump()?;
            if link.outbox.is_empty()
                && link.acked.covers(Epoch(base))
                && link.log_exits.load(Ordering::Acquire) >= last
            {
                return Ok((base, 0));
            }
            if Instant::now() >= deadline {
                return Err(MigrationError::LogNotHeld {
                    exit: last,
                    timeout: FINAL_ACK_TIMEOUT,
                });
            }
            std::thread::sleep(LINK_POLL);
        }
    }

    /// Post-copy's switch: waits until the destination committed every
    /// pre-copy epoch; returns the last one (0: none), the bitmap (u64 LE
    /// words) of the pages it holds current (sent, and not dirtied since),
    /// and of those that are all zero.
    pub(crate) fn flush_for_postcopy(
        &mut self,
        vm: &Vm,
    ) -> Result<(u64, Vec<u8>, Vec<u8>), MigrationError> {
        self.end_round_early();
        let last = self.next_epoch - 1;
        let link = self.link_mut()?;
        if last > 0 {
            link.flush_acked(last, FINAL_ACK_TIMEOUT)?;
        }
        // Pages nothing ever touched are zero: valid, installed there as
        // zero pages at their first touch, and not pushed (an idle 256 MiB
        // guest's pure post-copy pushed 0.34 MB of zero-page records). Only
        // over a zeroed image, where a destination that installs no zero
        // pages reads zeros for them too; and only when many pages are
        // pending (the look reads the page table's entries).
        let zeroed = link.image_zeroed;
        if zeroed
            && self.pending.count() >= self.ram_pages / UNTOUCHED_LOOK_SHARE
            && let Some(untouched) = vm.ram().untouched_pages()
        {
            for (p, _) in untouched.iter().enumerate().filter(|(_, u)| **u) {
                if self.pending.contains(p) {
                    self.pending.unset(p);
                    self.sent_zero.set(p);
                }
            }
        }
        let valid: Vec<u64> = self
            .pending
            .words()
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                // Bits past the last page stay clear.
                let bits = (self.ram_pages - i * 64).min(64);
                let mask = if bits == 64 {
                    u64::MAX
                } else {
                    (1u64 << bits) - 1
                };
                !w & mask
            })
            .collect();
        let zero: Vec<u64> = valid
            .iter()
            .zip(self.sent_zero.words())
            .map(|(v, z)| v & z)
            .collect();
        let bytes =
            |words: &[u64]| -> Vec<u8> { words.iter().flat_map(|w| w.to_le_bytes()).collect() };
        Ok((last, bytes(&valid), bytes(&zero)))
    }

    /// Post-copy, after the switch: sends every page the destination lacks,
    /// those its VM faults on first (with the next [`PREPAGE`] pages), the
    /// rest in order; returns once the destination says every page is in.
    /// The guest here stays paused throughout (it runs there now).
    pub(crate) fn postcopy_serve(
        &mut self,
        vm: &Vm,
        page: &mut [u8; PAGE_SIZE],
    ) -> Result<PostcopyFigures, PostcopyFailure> {
        let started = Instant::now();
        // A test's stall: the source silent between the switch and its
        // first page.
        understudy_common::fault::check("primary.postcopy.serve").map_err(MigrationError::Fault)?;
        let order = self.pending.page_numbers();
        let mut sent = DirtyBitmap::new(self.ram_pages);
        let mut next = 0;
        let mut requests = 0u64;
        let mut pages = 0u64;
        let mut done_sent = false;
        let ram_pages = self.ram_pages;
        let pending = std::mem::replace(&mut self.pending, DirtyBitmap::new(ram_pages));
        let mut read = |p: u32, records: &mut PageRecords| -> Result<(), MigrationError> {
            vm.ram()
                .copy_page(p as usize, page)
                .map_err(|source| MigrationError::ReadPage { page: p, source })?;
            records.push(p, page);
            Ok(())
        };
        loop {
            let link = self.link.as_mut().ok_or(MigrationError::NotConnected)?;
            link.pump()?;
            let wanted = link.take_wanted();
            if !wanted.is_empty() {
                let mut records = PageRecords::new();
                for p in wanted {
                    requests += 1;
                    let end = (p as usize + 1 + PREPAGE).min(ram_pages) as u32;
                    for q in p..end {
                        if pending.contains(q as usize) && !sent.contains(q as usize) {
                            read(q, &mut records)?;
                            sent.set(q as usize);
                        }
                    }
                }
                pages += self.queue_records(records, true)?;
                continue;
            }
            // Pushed pages wait behind at most a couple of messages, so that
            // a fault's page overtakes the push.
            if link.outbox.is_empty() && link.queued() <= POSTCOPY_QUEUED {
                if next < order.len() {
                    // A test's stall: a source slow to push (killed while
                    // pages are still on their way).
                    understudy_common::fault::check("primary.postcopy.push")
                        .map_err(MigrationError::Fault)?;
                    let mut records = PageRecords::new();
                    while records.pages() < POSTCOPY_BATCH && next < order.len() {
                        let p = order[next];
                        next += 1;
                        if !sent.contains(p as usize) {
                            read(p, &mut records)?;
                            sent.set(p as usize);
                        }
                    }
                    pages += self.queue_records(records, false)?;
                    continue;
                }
                if !done_sent {
                    link.queue_pages(Vec::new(), true, false);
                    done_sent = true;
                    continue;
                }
            }
            // Waiting on the destination (for room in the stream, or for its
            // word that every page is in): a cut link shows no error, only
            // silence.
            if link.progress_at.elapsed() > STALL_TIMEOUT && link.postcopy_done().is_none() {
                return Err(PostcopyFailure {
                    why: MigrationError::Silent(STALL_TIMEOUT),
                    all_sent: done_sent && link.queued() == 0,
                });
            }
            if let Some((faults, p50, p99)) = link.postcopy_done() {
                self.pages += pages;
                return Ok(PostcopyFigures {
                    requests,
                    pages,
                    took: started.elapsed(),
                    faults,
                    fault_wait_p50_us: p50,
                    fault_wait_p99_us: p99,
                });
            }
            std::thread::sleep(LINK_POLL);
        }
    }

    /// Post-copy: queues page records for the destination (`first`: ahead
    /// of the push) and counts them; returns the pages.
    fn queue_records(&mut self, records: PageRecords, first: bool) -> Result<u64, MigrationError> {
        if records.is_empty() {
            return Ok(0);
        }
        let pages = records.pages() as u64;
        self.zero_pages += records.zero_pages() as u64;
        self.bytes += records.len() as u64;
        let link = self.link_mut()?;
        link.queue_pages(records.into_bytes(), false, first);
        link.pump()?;
        Ok(pages)
    }

    /// The session the destination knows this migration by.
    pub(crate) fn session(&self) -> Option<SessionId> {
        self.link.as_ref().map(|l| l.id)
    }

    /// The switch, as the source's backup stands down: asks the destination
    /// to restore the VM of `epoch` (once it committed, within
    /// `commit_wait`) ahead of the handover (`PrepareHandover`), so that the
    /// handover only resumes it (~0.5 ms less downtime on loopback). Not
    /// awaited, and its answer changes nothing here: a handover that finds
    /// no VM restored ahead, or one of another image, restores its own.
    pub(crate) fn prepare_handover(
        &self,
        runtime: &tokio::runtime::Handle,
        epoch: u64,
        commit_wait: Duration,
    ) {
        let Some(link) = self
            .link
            .as_ref()
            .filter(|l| l.prepares_handover && !l.broken.load(Ordering::Acquire))
        else {
            return;
        };
        let mut client = link.client.clone();
        let request = PrepareHandoverRequest {
            generation: link.generation,
            session: link.id.raw(),
            epoch,
            commit_wait_millis: u32::try_from(commit_wait.as_millis()).unwrap_or(u32::MAX),
        };
        runtime.spawn(async move {
            let answer = tokio::time::timeout(
                commit_wait + STALL_TIMEOUT,
                client.prepare_handover(request),
            )
            .await;
            match answer {
                Ok(Ok(reply)) => tracing::debug!(
                    prepare_us = reply.into_inner().prepare_micros,
                    "the destination restored the VM ahead of the handover"
                ),
                Ok(Err(status)) => tracing::debug!(
                    %status,
                    "the destination did not restore the VM ahead (its handover will)"
                ),
                Err(_) => tracing::debug!("no answer to the prepare (the handover restores)"),
            }
        });
    }

    /// A client on the stream's connection, for the handover; None once the
    /// stream broke (a request on a dead connection would leave its fate
    /// unknown, where a new connection that fails proves it never arrived).
    pub(crate) fn client(&self) -> Option<ReplicationClient<Channel>> {
        self.link
            .as_ref()
            .filter(|l| !l.broken.load(Ordering::Acquire))
            .map(|l| l.client.clone())
    }

    /// Where the migration stands, for status.
    pub(crate) fn progress(&self, phase: &str, error: &str) -> MigrationProgress {
        MigrationProgress {
            mode: self.request.mode.name().into(),
            destination: self.request.target.addr.to_string(),
            phase: phase.into(),
            round: self.round,
            bytes_transferred: self.bytes,
            remaining_pages: (self.round_pages.len() - self.next.min(self.round_pages.len()))
                as u64
                + self.pending.count() as u64,
            rate_bytes_per_second: self.rate,
            dirty_pages_per_second: self.dirty_rate,
            throttle_percent: self.throttle,
            elapsed_micros: self.requested.elapsed().as_micros() as u64,
            error: error.into(),
            codec: self.codec(),
        }
    }

    /// The report of a finished migration.
    pub(crate) fn report(&self, done: SwitchFigures) -> MigrateReply {
        let total = self.requested.elapsed();
        let ran = total.saturating_sub(done.downtime);
        let guest_run_share = if ran.is_zero() {
            1.0
        } else {
            1.0 - self.held.as_secs_f64() / ran.as_secs_f64()
        };
        MigrateReply {
            generation: done.generation,
            mode: self.request.mode.name().into(),
            downtime_micros: done.downtime.as_micros() as u64,
            sent_micros: done.sent.as_micros() as u64,
            total_micros: total.as_micros() as u64,
            setup_micros: self.setup.as_micros() as u64,
            bytes_transferred: self.bytes,
            pages_transferred: self.pages,
            zero_pages: self.zero_pages,
            duplicate_pages: self.duplicate_pages,
            held_pages: self.held_pages,
            rounds: match self.request.mode {
                MigrationMode::StopAndCopy | MigrationMode::Postcopy => 0,
                MigrationMode::Precopy | MigrationMode::Hybrid | MigrationMode::Replay => {
                    self.round
                }
            },
            dirty_pages_per_second: self.dirty_rate,
            final_pages: done.final_pages,
            final_bytes: done.final_bytes,
            throttle_percent: self.max_throttle,
            resume_micros: done.resume.as_micros() as u64,
            destination: self.request.target.addr.to_string(),
            guest_run_share,
            postcopy_requests: done.postcopy.map_or(0, |p| p.faults),
            postcopy_pages: done.postcopy.map_or(0, |p| p.pages),
            postcopy_micros: done.postcopy.map_or(0, |p| p.took.as_micros() as u64),
            fault_wait_p50_micros: done.postcopy.map_or(0, |p| p.fault_wait_p50_us),
            fault_wait_p99_micros: done.postcopy.map_or(0, |p| p.fault_wait_p99_us),
            log_bytes: self.replay.as_ref().map_or(0, |l| l.log_bytes),
            base_pause_micros: self
                .replay
                .as_ref()
                .map_or(0, |l| l.base_pause.as_micros() as u64),
            log_phase_micros: self.replay.as_ref().map_or(0, |l| {
                l.sent_at
                    .elapsed()
                    .saturating_sub(done.downtime)
                    .as_micros() as u64
            }),
            codec: self.codec(),
        }
    }

    /// The adaptive codec's last decision for this migration's pages.
    fn codec(&self) -> Option<understudy_proto::CodecStatus> {
        self.sender
            .as_ref()
            .and_then(crate::link_rate::codec_status)
    }
}

/// What the switch measured.
pub(crate) struct SwitchFigures {
    pub generation: u64,
    pub downtime: Duration,
    /// The stop until the rest was handed to the destination's connection.
    pub sent: Duration,
    pub resume: Duration,
    pub final_pages: u64,
    pub final_bytes: u64,
    pub postcopy: Option<PostcopyFigures>,
}

/// Why post-copy ended before the destination confirmed every page.
#[derive(Debug)]
pub(crate) struct PostcopyFailure {
    pub why: MigrationError,
    /// Every page had left this host: the destination may hold them all and
    /// run the VM (only its confirmation was missing).
    pub all_sent: bool,
}

impl From<MigrationError> for PostcopyFailure {
    fn from(why: MigrationError) -> Self {
        Self {
            why,
            all_sent: false,
        }
    }
}

/// What post-copy measured after the switch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PostcopyFigures {
    /// Page requests that came from the destination.
    pub requests: u64,
    /// Pages sent after the switch.
    pub pages: u64,
    /// Switch → the last page in.
    pub took: Duration,
    /// Faults the destination asked pages for (its own count), and how
    /// long they waited.
    pub faults: u64,
    pub fault_wait_p50_us: u64,
    pub fault_wait_p99_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link around a plain channel (no destination): the test plays the
    /// stream (takes the chunks) and the destination's acks.
    fn detached_link() -> (Link, tokio::sync::mpsc::Receiver<EpochChunk>) {
        let (tx, rx) = tokio::sync::mpsc::channel(LINK_DEPTH);
        let channel = Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let link = Link::new(
            SessionId::from_raw(7).unwrap(),
            tx,
            ReplicationClient::new(channel.clone()),
            1,
            &Accepted {
                channel,
                pages_by_hash: true,
                handover_awaits_commit: true,
                prepares_handover: true,
                image_zeroed: true,
                handover_awaits_log: true,
                took: Duration::ZERO,
            },
        );
        (link, rx)
    }

    #[tokio::test]
    async fn the_link_measures_its_rate_from_the_acks_for_the_codec() {
        let (mut link, mut stream) = detached_link();
        assert_eq!(link.delivery.rate(), None);
        // Four epochs of 1 MB each, taken by the stream, acked 40 ms later:
        // about 4 MB in 40 ms (the span), 100 MB/s.
        for epoch in 1..=4 {
            link.queue(epoch, 1_000_000, vec![vec![0u8; 64]]);
        }
        link.pump().unwrap();
        for _ in 1..=4 {
            assert!(stream.try_recv().is_ok(), "the chunks went to the stream");
        }
        assert_eq!(link.delivery.rate(), None, "nothing acked yet");
        std::thread::sleep(Duration::from_millis(40));
        link.acked.raise(Epoch(4));
        link.pump().unwrap();
        let rate = link.delivery.rate().expect("a rate once 4 MB were acked");
        // Taken as sent at their queueing, acked at the pump after the
        // sleep: at most 100 MB/s, less by whatever this machine added.
        assert!((20e6..=100e6).contains(&rate), "{rate}");
        assert_eq!(link.unacked_bytes, 0);
        assert_eq!(link.acked_bytes, 4_000_000);
    }

    #[test]
    fn a_round_that_fits_the_budget_switches() {
        let ms = Duration::from_millis;
        assert_eq!(
            next_step(1, 1000, ms(4), DEFAULT_MAX_DOWNTIME, 0),
            Next::Switch
        );
        // Over the budget: another round.
        assert_eq!(
            next_step(1, 1000, ms(900), DEFAULT_MAX_DOWNTIME, 0),
            Next::Round { throttle: 0 }
        );
        // A handful of pages: the link is the limit, nothing better can come.
        assert_eq!(
            next_step(1, 10, Duration::MAX, Duration::ZERO, 0),
            Next::Switch
        );
        // Nothing measured (an unbounded estimate), a large set: a round.
        assert_eq!(
            next_step(1, 1000, Duration::MAX, DEFAULT_MAX_DOWNTIME, 0),
            Next::Round { throttle: 0 }
        );
    }

    #[test]
    fn a_guest_that_outruns_the_link_is_held_more_each_round_then_given_up() {
        // 1 GiB dirty at 100 MB/s: ~10 s, far over the budget.
        let big = 1 << 18;
        let estimate = Duration::from_secs(10);
        assert_eq!(
            next_step(1, big, estimate, DEFAULT_MAX_DOWNTIME, 0),
            Next::Round { throttle: 0 },
            "the first rounds run free"
        );
        let mut throttle = 0;
        let mut seen = Vec::new();
        for round in THROTTLE_AFTER_ROUNDS..MAX_ROUNDS {
            match next_step(round, big, estimate, DEFAULT_MAX_DOWNTIME, throttle) {
                Next::Round { throttle: t } => {
                    assert!(t >= throttle && t <= THROTTLE_MAX);
                    throttle = t;
                    seen.push(t);
                }
                other => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(seen[0], THROTTLE_INITIAL);
        assert_eq!(*seen.last().unwrap(), THROTTLE_MAX);
        assert_eq!(
            next_step(MAX_ROUNDS, big, estimate, DEFAULT_MAX_DOWNTIME, throttle),
            Next::GiveUp
        );
    }

    /// `handover_until_answered` over a script of answers.
    fn answered(script: Vec<HandoverOutcome>) -> (HandoverOutcome, usize) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut script = script.into_iter();
        let mut asked = 0;
        let outcome = runtime.block_on(handover_until_answered(
            Duration::from_secs(10),
            Duration::ZERO,
            || {
                asked += 1;
                let next = script.next().unwrap();
                async move { next }
            },
        ));
        (outcome, asked)
    }

    #[test]
    fn a_refusal_after_an_unanswered_handover_is_not_trusted() {
        let unknown = || HandoverOutcome::Unknown("timed out".into());
        let refused = || HandoverOutcome::NotTaken("this host already runs the VM".into());
        // The first may have promoted it: the source must not resume.
        match answered(vec![unknown(), refused()]) {
            (HandoverOutcome::Unknown(why), 2) => assert!(why.contains("went unanswered"), "{why}"),
            (other, n) => panic!("{n} asks: {other:?}"),
        }
        // A refusal at the first ask is one.
        assert!(matches!(
            answered(vec![refused()]),
            (HandoverOutcome::NotTaken(_), 1)
        ));
        // Asked again after a lost answer, it says it runs the VM: done.
        assert!(matches!(
            answered(vec![unknown(), unknown(), HandoverOutcome::Deposed(2)]),
            (HandoverOutcome::Deposed(2), 3)
        ));
    }

    #[test]
    fn only_a_small_final_epoch_goes_with_the_handover_and_only_to_a_host_that_waits() {
        // A destination of this release, a converged pre-copy's rest.
        assert_eq!(final_commit_wait(true, 80_000), HANDOVER_COMMIT_WAIT);
        assert_eq!(
            final_commit_wait(true, PIPELINED_FINAL_BYTES),
            HANDOVER_COMMIT_WAIT
        );
        // A bigger rest (a stop-and-copy of a busy VM): acked first, so
        // that a cut link while it goes resumes the VM here.
        assert_eq!(
            final_commit_wait(true, PIPELINED_FINAL_BYTES + 1),
            Duration::ZERO
        );
        // A destination of the release before: it would refuse a handover
        // for an epoch it has not committed yet.
        assert_eq!(final_commit_wait(false, 80_000), Duration::ZERO);
    }

    #[test]
    fn a_hold_is_one_slice_however_long_the_guest_ran_unwatched() {
        assert_eq!(slice_hold(Duration::from_secs(3), 0, THROTTLE_SLICE), None);
        // At 99 % the guest runs 0.1 ms of each 10 ms slice.
        assert_eq!(
            slice_hold(Duration::from_micros(50), 99, THROTTLE_SLICE),
            None
        );
        for ran in [
            Duration::from_micros(100),
            Duration::from_millis(25),
            Duration::from_secs(3),
        ] {
            let hold = slice_hold(ran, 99, THROTTLE_SLICE).unwrap();
            assert!(hold <= THROTTLE_SLICE, "{ran:?} unwatched: held {hold:?}");
            assert!(hold >= THROTTLE_SLICE.mul_f64(0.98), "{hold:?}");
        }
        let hold = slice_hold(Duration::from_secs(1), 20, THROTTLE_SLICE).unwrap();
        assert!((hold.as_secs_f64() - 0.002).abs() < 1e-9, "{hold:?}");
    }

    #[test]
    fn the_log_phase_holds_the_guest_so_that_the_replica_is_caught_by_the_next_look() {
        let ms = Duration::from_millis;
        let target = ms(40);
        let look = LOG_LOOK_EVERY;
        // A replica as fast as the guest, the backlog steady at 290 ms: a
        // hold of 250 ÷ 250 would be needed to catch it in one look.
        assert_eq!(log_throttle(ms(290), ms(290), look, ms(0), target), 99);
        // Steady at 65 ms: 25 ms over the target in 250 ms, 10 %.
        assert_eq!(log_throttle(ms(65), ms(65), look, ms(0), target), 10);
        // The backlog grew by 50 ms in 250 ms unheld: the replica runs at
        // 0.8 of the guest; 20 % for that, 10 % for the 25 ms over.
        assert_eq!(log_throttle(ms(15), ms(65), look, ms(0), target), 30);
        // The same growth while the guest was held half the time: the
        // replica runs at 0.3 of it; 70 % + 10 %.
        assert_eq!(log_throttle(ms(15), ms(65), look, ms(125), target), 80);
        // A replica that gains on an unheld guest (it skips idle time) by
        // more than the excess: no hold. One that gained 135 ms on a guest
        // held half the time replays as fast as the guest runs: the hold
        // eases to the excess alone.
        assert_eq!(log_throttle(ms(200), ms(65), look, ms(0), target), 0);
        assert_eq!(log_throttle(ms(200), ms(65), look, ms(125), target), 6);
        // A replica that replayed nothing: the most the hold gives.
        assert_eq!(
            log_throttle(ms(65), ms(315), look, ms(0), target),
            THROTTLE_MAX
        );
        // No time between the looks measures nothing.
        assert_eq!(log_throttle(ms(65), ms(315), ms(0), ms(0), target), 0);
        // The log phase's slice is the longer one.
        let hold = slice_hold(ms(1000), 50, LOG_THROTTLE_SLICE).unwrap();
        assert_eq!(hold, LOG_THROTTLE_SLICE / 2);
    }

    #[test]
    fn the_replay_backlog_is_the_work_the_replica_has_not_replayed_at_the_guests_pace() {
        let ms = Duration::from_millis;
        let close = |a: Duration, b: Duration| a.abs_diff(b) < Duration::from_micros(1);
        // 10k exits a second: 2000 exits behind are 200 ms of work, plus
        // what the guest ran since the last segment.
        let b = replay_backlog(5000, 3000, Some(10_000.0), ms(30));
        assert!(close(b, ms(230)), "{b:?}");
        // Caught up (or reported past the last exit sent): the unsealed
        // part alone, pace known or not.
        assert_eq!(replay_backlog(5000, 5000, None, ms(30)), ms(30));
        assert_eq!(replay_backlog(5000, 6000, Some(1.0), ms(0)), ms(0));
        // Behind at a pace not known yet: never a switch.
        assert_eq!(replay_backlog(5000, 3000, None, ms(0)), Duration::MAX);
        assert_eq!(
            replay_backlog(u64::MAX, 0, Some(1e-300), ms(1)),
            Duration::MAX
        );

        let t0 = Instant::now();
        let mut pace = ExitPace::default();
        pace.segment(1000, t0, ms(0));
        assert_eq!(pace.per_second(), None, "one segment");
        pace.segment(2000, t0 + ms(100), ms(0));
        let rate = pace.per_second().unwrap();
        assert!((rate - 10_000.0).abs() < 1e-6, "{rate}");
        // The time auto-converge held the guest is not its pace: 2000
        // exits in 200 ms, 100 of them held.
        pace.segment(3000, t0 + ms(200), ms(100));
        let rate = pace.per_second().unwrap();
        assert!((rate - 20_000.0).abs() < 1e-6, "{rate}");
    }

    #[test]
    fn the_switch_waits_for_less_backlog_than_its_round_trips_hide_and_an_eighth_of_the_budget() {
        let ms = Duration::from_millis;
        // Round trip unknown: half the budget.
        assert_eq!(replay_switch_backlog(ms(300), None, false), ms(150));
        // Loopback: an eighth of the budget, about.
        assert_eq!(
            replay_switch_backlog(ms(300), Some(ms(0)), false),
            ms(37) + Duration::from_micros(500)
        );
        // 50 ms: the round trip and a half it hides, and the eighth.
        assert_eq!(
            replay_switch_backlog(ms(300), Some(ms(50)), false),
            ms(112) + Duration::from_micros(500)
        );
        // Never more than half the budget.
        assert_eq!(
            replay_switch_backlog(ms(300), Some(ms(400)), false),
            ms(150)
        );
        assert_eq!(replay_switch_backlog(ms(40), Some(ms(10)), false), ms(20));
        // The tail with the handover: half a round trip hides replay.
        assert_eq!(
            replay_switch_backlog(ms(300), Some(ms(50)), true),
            ms(62) + Duration::from_micros(500)
        );
        assert_eq!(replay_switch_backlog(ms(300), None, true), ms(150));
    }

    #[test]
    fn the_hold_gives_the_asked_share_of_time() {
        let ran = Duration::from_millis(10);
        assert_eq!(hold_for(ran, 0), Duration::ZERO);
        let h = hold_for(ran, 20);
        let share = h.as_secs_f64() / (h + ran).as_secs_f64();
        assert!((share - 0.20).abs() < 1e-9, "{share}");
        let h = hold_for(ran, 99);
        let share = h.as_secs_f64() / (h + ran).as_secs_f64();
        assert!((share - 0.99).abs() < 1e-9, "{share}");
    }

    #[test]
    fn modes_parse_and_unknown_ones_say_which_exist() {
        for mode in [
            MigrationMode::StopAndCopy,
            MigrationMode::Precopy,
            MigrationMode::Postcopy,
            MigrationMode::Hybrid,
            MigrationMode::Replay,
        ] {
            assert_eq!(mode.name().parse(), Ok(mode));
        }
        let e = "teleport".parse::<MigrationMode>().unwrap_err();
        assert_eq!(e, RequestError::UnknownMode("teleport".into()));
        assert!(e.to_string().contains("choose stop-and-copy"), "{e}");
    }
}

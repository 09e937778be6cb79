//! Promotion: the committed image becomes the running VM.
//!
//! ```text
//!  checks (standby, trigger still holds) ─▶ image promotable (committed, not
//!  retired, digest whole) ─▶ payload and VM state decode ─▶ RAM mapped from
//!  memory.img ─▶ VM restored, paused ─▶ threads started
//!        ── point of no return: the new generation is persisted ──
//!  ─▶ console served from the checkpoint's offset ─▶ VM resumed
//! ```
//!
//! Everything that can fail happens before the generation moves: a failed
//! promotion leaves the image, the generation and the primary (if it lives)
//! exactly as they were, so the VM still runs somewhere. Only the write of
//! the new generation and the resume of a VM that never ran follow it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use understudy_checkpoint::store::ImageStore;
use understudy_checkpoint::trace::TraceWriter;
use understudy_checkpoint::{CommittedImage, ImageDigest, StoreError};
use understudy_common::fault;
use understudy_common::ids::{Generation, Incarnation, SessionId};
use understudy_common::payload::{CheckpointPayload, PayloadError};
use understudy_common::role::RunningVm;
use understudy_common::status::StateKind;
use understudy_common::witness::{Claim, Held, Swap, Witness, WitnessError};
use understudy_vmm::deterministic::{Sealed, TraceMode};
use understudy_vmm::{GuestRam, RamBacking, Vm, VmState};

use crate::{Phase, Shared, Standby};

/// What set off a promotion.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Trigger {
    /// The primary was silent this long.
    Silence(Duration),
    /// The primary handed over after `epoch` of `session` (a switchover or
    /// a migration); `replay`: a replay migration's, which runs the replica
    /// that replayed the log after `epoch` to its end.
    Handover {
        session: SessionId,
        epoch: u64,
        replay: bool,
    },
    /// The primary's host restarted and lost the VM it protected.
    Restart,
    /// An operator asked (`understudyctl promote`).
    Operator,
}

/// Why a promotion did not happen. Nothing changed in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum PromotionError {
    /// The VM already runs here.
    #[error("this host already runs the VM (generation {0})")]
    AlreadyRunning(Generation),
    /// A handover named a checkpoint that is not this image's committed one.
    #[error(
        "the image does not hold epoch {epoch} of session {session:#x} as its committed \
         checkpoint (committed: {committed:?}); the primary must resume and try again"
    )]
    HandoverMismatch {
        /// The final checkpoint the primary named.
        epoch: u64,
        /// The session it named.
        session: SessionId,
        /// What the image holds.
        committed: Option<u64>,
    },
    /// An operator asked while the primary still beats.
    #[error("a primary is still heard (last {0:?} ago): promoting would run a second copy")]
    PrimaryHeard(Duration),
    /// The image is not committed, retired, or fails its digest.
    #[error("the image cannot be resumed")]
    NotPromotable(#[source] StoreError),
    /// The committed checkpoint's payload does not decode.
    #[error("the committed checkpoint cannot be resumed")]
    Payload(#[source] PayloadError),
    /// The committed VM state does not decode.
    #[error("the committed VM state cannot be resumed")]
    VmState(#[source] understudy_vmm::state::StateError),
    /// `memory.img` cannot be opened.
    #[error("cannot open {path} as guest RAM")]
    OpenRam {
        /// The image's memory file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `memory.img` cannot be mapped as guest RAM.
    #[error("cannot map the image as guest RAM")]
    Ram(#[source] understudy_vmm::memory::MemoryError),
    /// KVM refused the restore.
    #[error("cannot restore the VM")]
    Restore(#[source] understudy_vmm::VmError),
    /// A helper thread (console output, VM watch) did not start.
    #[error("cannot start a thread for the promoted VM")]
    Thread(#[source] std::io::Error),
    /// The new generation could not be persisted: the point of no return
    /// was not passed.
    #[error("cannot record generation {generation}: the VM stays here unpromoted")]
    RecordGeneration {
        /// The generation the promotion would have moved to.
        generation: Generation,
        /// Why it could not be written.
        #[source]
        source: StoreError,
    },
    /// A test's fault injection (`UNDERSTUDY_FAULTS`).
    #[error("injected fault ({0})")]
    Fault(&'static str),
    /// A post-copy handover that cannot be taken (a bad bitmap, no
    /// userfaultfd).
    #[error("post-copy: {0}")]
    Postcopy(String),
    /// A replay migration's handover to a host that follows no log.
    #[error("replay: no log follows this image (the session is not replayed)")]
    NoLog,
    /// A replay migration's handover whose log cannot be replayed to its
    /// end here (the source runs on).
    #[error("replay: the log cannot be replayed to its end")]
    Replay(#[source] crate::replica::ReplicaError),
    /// The witness could not be asked: no host takes a new role without it.
    #[error("the witness cannot be asked")]
    Witness(#[source] understudy_common::witness::WitnessError),
    /// The witness's key says this host may not run the VM.
    #[error("the witness refuses: {0}")]
    WitnessRefused(String),
}

/// What set off a promotion, as the witness's decision names it.
fn decision(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Silence(_) => "promote after silence",
        Trigger::Handover { .. } => "take over by handover",
        Trigger::Restart => "promote after the primary's restart",
        Trigger::Operator => "promote by an operator",
    }
}

/// Moves the witness's key to this host, from the primary's claim at
/// `generation` to this host's at `next` (see `understudy_common::witness`),
/// or says why not. A silence or a restart needs the claim protected: a
/// primary that released output alone holds state this image lacks. A
/// handover (the source is paused and asked for it) or an operator takes any
/// claim at `generation`.
pub(crate) fn claim_witness(
    witness: &Witness,
    decision: &str,
    needs_protected: bool,
    generation: Generation,
    next: Generation,
) -> Result<Witnessed, PromotionError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| {
        PromotionError::Witness(WitnessError::Unreachable(format!(
            "no async runtime here: {e}"
        )))
    })?;
    let held = runtime
        .block_on(witness.read())
        .map_err(PromotionError::Witness)?
        .ok_or_else(|| {
            PromotionError::WitnessRefused(format!(
                "its key {} holds no claim: no primary registered the VM there (is [witness] \
                 set on both hosts, with the same prefix?)",
                witness.key()
            ))
        })?;
    let claim = &held.claim;
    if claim.generation != generation || claim.owner == witness.me() {
        return Err(PromotionError::WitnessRefused(format!(
            "it holds \"{claim}\", not this host's primary at generation {generation}: another \
             host took the VM since"
        )));
    }
    if needs_protected && !claim.protected {
        return Err(PromotionError::WitnessRefused(format!(
            "it holds \"{claim}\": the primary released output no backup holds, so this image \
             is older than what clients saw (an operator can still promote it: understudyctl \
             promote)"
        )));
    }
    let to = Claim {
        generation: next,
        owner: witness.me().to_owned(),
        protected: false,
    };
    match runtime.block_on(witness.swap(decision, Some(&held), &to)) {
        Ok(Swap::Won(won)) => Ok(Witnessed {
            previous: held.claim,
            won,
        }),
        Ok(Swap::Lost(now)) => Err(PromotionError::WitnessRefused(format!(
            "another host moved its key first: it holds {}",
            now.map_or("nothing".into(), |h| format!("\"{}\"", h.claim))
        ))),
        Err(e) => Err(PromotionError::Witness(e)),
    }
}

/// The witness's key, moved to this host.
pub(crate) struct Witnessed {
    /// What it held before.
    previous: Claim,
    /// What it holds now.
    won: Held,
}

/// A promotion that won the witness but could not pass its point of no
/// return gives the key back, so the primary (if it lives) may go on.
pub(crate) fn give_back(witness: &Witness, witnessed: &Witnessed) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let swap = witness.swap(
        "give the key back",
        Some(&witnessed.won),
        &witnessed.previous,
    );
    match runtime.block_on(swap) {
        Ok(Swap::Won(_)) => {}
        Ok(Swap::Lost(_)) | Err(_) => tracing::error!(
            "the witness's key names this host, which could not run the VM: only an operator can \
             bring it back (understudyctl promote on a host with its image)"
        ),
    }
}

/// A promotion that happened.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Promoted {
    pub generation: Generation,
    pub epoch: u64,
    /// Promotion started → VM running.
    pub resumed: Duration,
}

/// A VM restored and paused, not yet committed to: dropping it stops it.
struct Prepared {
    vm: Vm,
    input: understudy_vmm::ConsoleInput,
    output: crossbeam_channel::Receiver<u8>,
    /// The log the VM records once it runs (replay mode).
    trace: Option<crossbeam_channel::Receiver<Sealed>>,
    /// The console to serve: from `console_offset`, these bytes, then what
    /// the VM writes.
    console_offset: u64,
    console_out: Vec<u8>,
    /// Of the VM's own output (since its restore), bytes already in
    /// `console_out`.
    output_taken: u64,
    epoch: u64,
    incarnation: Option<Incarnation>,
    /// Replay mode: the replica replayed the log to this exit.
    replayed_to: Option<u64>,
}

/// How long a promotion waits for the replica to replay the rest of the
/// log (the primary's back-pressure keeps it far shorter).
const REPLICA_FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Replay mode: the replica replays the rest of the log received and is
/// the VM to run (the image holds only the last checkpoint, older than
/// output the primary released on the log's acks). A handover promotes
/// from the final checkpoint instead, which is exact.
fn prepare_from_replica(
    standby: &mut Standby,
    trigger: Trigger,
) -> Option<Result<Prepared, PromotionError>> {
    // A replay migration's handover: the replica is the VM, or nothing is
    // (its base is older than what the source ran since).
    let replay_handover = matches!(trigger, Trigger::Handover { replay: true, .. });
    if matches!(trigger, Trigger::Handover { replay: false, .. }) {
        return None;
    }
    let Some(follower) = standby.session.as_mut().and_then(|s| s.follower.as_mut()) else {
        return replay_handover.then_some(Err(PromotionError::NoLog));
    };
    let first_try = if follower.has_replica() {
        follower.finish(REPLICA_FINISH_TIMEOUT)
    } else {
        Err(crate::replica::ReplicaError::NoReplica)
    };
    let finished = match first_try {
        Ok(f) => f,
        Err(why) => {
            let why = understudy_common::wire::chain(&why);
            tracing::error!(%why, "replay mode: the replica cannot finish the log; replaying it again from the last checkpoint");
            match follower.finish_from_base(&standby.store, REPLICA_FINISH_TIMEOUT) {
                Ok(f) => f,
                Err(why) if replay_handover => {
                    return Some(Err(PromotionError::Replay(why)));
                }
                Err(why) => {
                    let why = understudy_common::wire::chain(&why);
                    tracing::error!(%why, "replay mode: the log cannot be replayed from the last checkpoint either; promoting from the checkpoint alone (output the primary released after it is not in this VM)");
                    return None;
                }
            }
        }
    };
    let kept = match standby.store.promotable() {
        Ok(p) => p,
        Err(e) => return Some(Err(PromotionError::NotPromotable(e))),
    };
    Some(Ok(Prepared {
        vm: finished.vm,
        input: finished.input,
        output: finished.output,
        trace: Some(finished.trace),
        console_offset: finished.output_start,
        console_out: finished.output_kept,
        output_taken: finished.output_taken,
        epoch: kept.epoch,
        incarnation: Incarnation::from_raw(kept.incarnation),
        replayed_to: Some(finished.exit),
    }))
}

/// A VM restored ahead of its handover ([`prepare_ahead`]): what it was
/// restored from, so that a promotion uses it only for exactly that image.
pub(crate) struct PreparedAhead {
    session: SessionId,
    epoch: u64,
    digest: ImageDigest,
    prepared: Prepared,
}

impl PreparedAhead {
    /// Whether it is the VM of the image as it stands: the same session
    /// (epochs count per session), committed epoch and content (nothing
    /// written since). Its memory is the image itself, which it maps; its
    /// vCPU and devices are the epoch's.
    fn holds(&self, standby: &Standby) -> bool {
        standby
            .session
            .as_ref()
            .is_some_and(|s| s.id == self.session)
            && standby.store.committed_epoch() == Some(self.epoch)
            && standby.store.digest() == self.digest
    }
}

/// A live migration's switch, while the source's backup stands down
/// (`PrepareHandover`): restores the VM of `epoch`, committed in `session`,
/// paused, so that the handover only resumes it. Nothing runs and nothing
/// is recorded: a promotion uses it only if the image is still exactly that
/// (`PreparedAhead::holds`), else restores anew. Returns how long the
/// restore took.
pub(crate) fn prepare_ahead(
    shared: &Shared,
    generation: Generation,
    session: SessionId,
    epoch: u64,
) -> Result<Duration, PromotionError> {
    let started = Instant::now();
    let mut state = shared.lock();
    let Phase::Standby(standby) = &mut state.phase else {
        return Err(PromotionError::AlreadyRunning(shared.generation()));
    };
    // A replay session's VM is its replica, finished at the handover.
    let ours = standby
        .session
        .as_ref()
        .is_some_and(|s| s.id == session && s.protected() && s.follower.is_none());
    let committed = standby.store.committed_epoch();
    if generation != standby.generation || !ours || committed != Some(epoch) {
        return Err(PromotionError::HandoverMismatch {
            epoch,
            session,
            committed,
        });
    }
    if standby.prepared.as_ref().is_some_and(|p| p.holds(standby)) {
        return Ok(Duration::ZERO);
    }
    if let Some(stale) = standby.prepared.take() {
        crate::tear_down_in_background(stale);
    }
    let prepared = prepare(standby, false)?;
    standby.prepared = Some(Box::new(PreparedAhead {
        session,
        epoch,
        digest: standby.store.digest(),
        prepared,
    }));
    let took = started.elapsed();
    tracing::info!(
        epoch,
        took_us = took.as_micros() as u64,
        "restored the VM ahead of the handover (paused: it runs only if the handover comes)"
    );
    Ok(took)
}

/// The VM restored ahead, if it is the image's as it stands (and the
/// promotion is not a replay's); one that is not is torn down.
fn take_prepared_ahead(standby: &mut Standby, replay: bool) -> Option<Prepared> {
    let ahead = standby.prepared.take()?;
    if !replay && ahead.holds(standby) {
        return Some(ahead.prepared);
    }
    crate::tear_down_in_background(ahead);
    None
}

/// The RAM a promoted VM runs on: the store's own file, mapped shared (as
/// the VM built ahead maps it), where a VM may map it
/// ([`crate::image_mappable`]); else a copy of it in anonymous memory. The
/// copy costs the promotion a read of the image.
fn promoted_ram(store: &ImageStore, size: usize) -> Result<GuestRam, PromotionError> {
    if !crate::image_mappable(store) {
        tracing::warn!(
            path = %store.memory_path().display(),
            "the image's blocks are not reserved (no fallocate here, or a sparse image on a full \
             disk): the promoted VM runs on a copy of it in anonymous memory"
        );
        return crate::copy_image(store, size, PromotionError::Ram, |path, source| {
            PromotionError::OpenRam { path, source }
        });
    }
    let file = store.ram_file().map_err(|source| PromotionError::OpenRam {
        path: store.memory_path(),
        source,
    })?;
    GuestRam::new(size, RamBacking::SharedFile(file)).map_err(PromotionError::Ram)
}

fn prepare(standby: &mut Standby, replay: bool) -> Result<Prepared, PromotionError> {
    let promotable = standby
        .store
        .promotable()
        .map_err(PromotionError::NotPromotable)?;
    let payload =
        CheckpointPayload::decode(&promotable.device_state).map_err(PromotionError::Payload)?;
    let vm_state = VmState::decode(&payload.vm_state).map_err(PromotionError::VmState)?;
    let open_ram = || promoted_ram(&standby.store, vm_state.memory.size_bytes as usize);
    fault::check("backup.promote.restore").map_err(PromotionError::Fault)?;
    // Replay mode: the VM records from its checkpoint on, so that the new
    // primary protects it by its log too.
    let (vm, console, trace) = match (replay, vm_state.deterministic) {
        (true, Some(det)) => {
            let ram = open_ram()?;
            let (sink, trace) = crossbeam_channel::unbounded();
            let stream = understudy_common::ids::random_stream().ok_or_else(|| {
                PromotionError::Thread(std::io::Error::other("the kernel gave no randomness"))
            })?;
            let (vm, console) = Vm::restore_deterministic(
                &vm_state,
                ram,
                true,
                TraceMode::Record {
                    writer: TraceWriter::new(stream, det.exit_index),
                    sink,
                },
            )
            .map_err(PromotionError::Restore)?;
            (vm, console, Some(trace))
        }
        _ => {
            // Into the VM built ahead over the image, if there is one (a
            // failed restore used it up: the next promotion builds its own).
            let (vm, console) = match standby.shell.take() {
                Some(shell) => Vm::restore_in(shell, &vm_state, true),
                None => Vm::restore(&vm_state, open_ram()?, true),
            }
            .map_err(PromotionError::Restore)?;
            (vm, console, None)
        }
    };
    Ok(Prepared {
        vm,
        input: console.input,
        output: console.output,
        trace,
        console_offset: payload.console_offset,
        console_out: payload.console_out,
        output_taken: 0,
        epoch: promotable.epoch,
        incarnation: Incarnation::from_raw(promotable.incarnation),
        replayed_to: None,
    })
}

/// Promotes if `trigger` still calls for it (see the module doc). Returns
/// None when it no longer does (a silence that lost a race with a new
/// session or a handover): nothing changed.
pub(crate) fn promote(
    shared: &Arc<Shared>,
    trigger: Trigger,
) -> Result<Option<Promoted>, PromotionError> {
    let started = Instant::now();
    // The witness agrees first, or nothing happens (see `claim_witness`). It
    // is asked without the state lock: the async side takes that lock, and
    // a runtime whose workers wait for it cannot carry the request to etcd.
    let witnessed = match &shared.opts.witness {
        Some(w) => {
            let seen = {
                let mut state = shared.lock();
                match trigger_holds(shared, &mut state.phase, trigger)? {
                    Some(seen) => seen,
                    None => return Ok(None),
                }
            };
            let needs_protected = matches!(trigger, Trigger::Silence(_) | Trigger::Restart);
            let won = claim_witness(
                w,
                decision(trigger),
                needs_protected,
                seen.generation,
                seen.generation.next(),
            )?;
            Some((w, won, seen))
        }
        None => None,
    };
    let result = promote_locked(shared, trigger, started, witnessed.as_ref().map(|w| w.2));
    if let Some((w, won, _)) = &witnessed
        && !matches!(result, Ok(Some(_)))
    {
        // The key moved here but the VM does not run here: give it back,
        // so the primary (if it lives) may go on.
        give_back(w, won);
    }
    result
}

/// What a promotion checked before it asked the witness: the same must hold
/// once it holds the state lock again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Seen {
    generation: Generation,
    session: Option<SessionId>,
}

/// Whether `trigger` still calls for a promotion (None: it no longer does,
/// nothing to do), and what it saw.
pub(crate) fn trigger_holds(
    shared: &Shared,
    phase: &mut Phase,
    trigger: Trigger,
) -> Result<Option<Seen>, PromotionError> {
    let standby = match phase {
        Phase::Standby(s) => s,
        Phase::Promoted(_) | Phase::HandedOver(_) | Phase::Postcopy(_) | Phase::Failed(_) => {
            return match trigger {
                Trigger::Silence(_) => Ok(None),
                _ => Err(PromotionError::AlreadyRunning(shared.generation())),
            };
        }
    };
    match trigger {
        Trigger::Handover { session, epoch, .. } => {
            let committed = standby.store.committed_epoch();
            let ours = standby
                .session
                .as_ref()
                .is_some_and(|s| s.id == session && s.protected());
            if !ours || committed != Some(epoch) {
                return Err(PromotionError::HandoverMismatch {
                    epoch,
                    session,
                    committed,
                });
            }
        }
        // The detector disarms before it asks; a new session or a goodbye
        // since then means the silence is over.
        Trigger::Silence(_) => {
            let protected = standby
                .session
                .as_ref()
                .is_some_and(crate::Session::protected);
            if !protected || standby.stale.is_some() {
                return Ok(None);
            }
        }
        Trigger::Operator => {
            let since = shared.watch.since_heard();
            if standby.session.is_some() && since < shared.opts.heartbeat_timeout {
                return Err(PromotionError::PrimaryHeard(since));
            }
        }
        Trigger::Restart => {}
    }
    Ok(Some(Seen {
        generation: standby.generation,
        session: standby.session.as_ref().map(|s| s.id),
    }))
}

/// The promotion itself, under the state lock; `seen` is what the checks
/// saw before the witness was asked (None: no witness).
fn promote_locked(
    shared: &Arc<Shared>,
    trigger: Trigger,
    started: Instant,
    seen: Option<Seen>,
) -> Result<Option<Promoted>, PromotionError> {
    let mut state = shared.lock();
    let now = match trigger_holds(shared, &mut state.phase, trigger)? {
        Some(now) => now,
        None => return Ok(None),
    };
    if seen.is_some_and(|seen| seen != now) {
        // A new session or another promotion while the witness answered:
        // the claim was for a state that is gone.
        tracing::warn!(
            ?seen,
            ?now,
            "the backup's state changed while the witness was asked: not promoting"
        );
        return match trigger {
            Trigger::Silence(_) => Ok(None),
            _ => Err(PromotionError::WitnessRefused(
                "this host's state changed while the witness was asked; ask again".into(),
            )),
        };
    }
    let Phase::Standby(standby) = &mut state.phase else {
        return Ok(None);
    };
    let replay = standby
        .session
        .as_ref()
        .is_some_and(|s| s.follower.is_some());
    let ahead = take_prepared_ahead(standby, replay);
    let prepared = match prepare_from_replica(standby, trigger) {
        Some(prepared) => prepared?,
        None => match ahead {
            Some(prepared) => prepared,
            None => prepare(standby, replay)?,
        },
    };
    let new_generation = standby.generation.next();
    // Start the helper threads before the point of no return (they only
    // wait; a failure to start them changes nothing).
    let log = shared.host.log.clone();
    let serves_here = !(matches!(trigger, Trigger::Handover { .. })
        || shared.opts.handover_unavailable.is_none());
    let output_thread = if serves_here {
        Some(start_console_output(
            prepared.output.clone(),
            log.clone(),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )?)
    } else {
        None
    };
    let watch = prepared.vm.end_watch();
    let ended = shared.vm_ended.clone();
    let watch_thread = if serves_here {
        Some(
            std::thread::Builder::new()
                .name("vm-watch".into())
                .spawn(move || {
                    if let Some(end) = watch.wait(Duration::MAX) {
                        ended.send_replace(Some(end));
                    }
                })
                .map_err(PromotionError::Thread)?,
        )
    } else {
        None
    };
    // ── Point of no return: the generation that fences the old primary. ──
    if let Err(source) = standby.store.go_live(new_generation.0) {
        // The VM never ran; dropping it stops it (and its threads end with
        // its channels). The old generation stands.
        drop(prepared);
        drop((output_thread, watch_thread));
        return Err(PromotionError::RecordGeneration {
            generation: new_generation,
            source,
        });
    }
    let fenced = started.elapsed();
    shared.set_generation(new_generation, true);
    let Prepared {
        vm,
        input,
        output,
        trace,
        console_offset,
        console_out,
        output_taken,
        epoch,
        incarnation,
        replayed_to,
    } = prepared;
    // Any partial epoch is dropped with the standby state: the image held
    // exactly the last commit. The VM maps memory.img itself from here on.
    shared.watch.arm(false);
    shared.watch.set_session(None);
    // Serve the output the primary may not have delivered, then the new output.
    let host = &shared.host;
    host.log.set_generation(new_generation.0);
    host.log.take_over(console_offset, &console_out);
    host.log.set_raw_start(Some(console_offset));
    host.input.set(Some(input));
    if let Err(e) = vm.resume() {
        // A VM restored paused that never ran cannot normally fail to
        // resume; if it does, the VM is lost here (the generation moved):
        // say so loudly.
        tracing::error!(error = %e, "the promoted VM did not resume");
    }
    let resumed = started.elapsed();
    record(shared, trigger, epoch, new_generation, resumed, incarnation);
    tracing::info!(
        epoch,
        ?replayed_to,
        generation = %new_generation,
        ?trigger,
        fence_us = fenced.as_micros() as u64,
        resume_us = resumed.as_micros() as u64,
        "promoted: VM running"
    );
    state.phase = if serves_here {
        Phase::Promoted(Box::new(vm))
    } else {
        Phase::HandedOver(Some(Box::new(RunningVm {
            vm,
            output,
            generation: new_generation,
            incarnation,
            trace,
            output_taken,
            by_handover: matches!(trigger, Trigger::Handover { .. }),
        })))
    };
    let handed_over = matches!(state.phase, Phase::HandedOver(_));
    drop(state);
    if handed_over {
        shared.handed_over.cancel();
    }
    Ok(Some(Promoted {
        generation: new_generation,
        epoch,
        resumed,
    }))
}

/// Serves the VM's console output, released at once, until the VM is gone
/// or `stop` is set (a post-copy hands the output on to the primary role).
pub(crate) fn start_console_output(
    output: crossbeam_channel::Receiver<u8>,
    log: Arc<understudy_common::console::ConsoleLog>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, PromotionError> {
    std::thread::Builder::new()
        .name("console-out".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let first = match output.recv_timeout(Duration::from_millis(20)) {
                    Ok(b) => b,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                };
                let mut bytes = vec![first];
                bytes.extend(output.try_iter());
                log.append(&bytes);
                log.release_all();
            }
        })
        .map_err(PromotionError::Thread)
}

pub(crate) fn record(
    shared: &Shared,
    trigger: Trigger,
    epoch: u64,
    generation: Generation,
    resumed: Duration,
    incarnation: Option<Incarnation>,
) {
    let stats = &shared.host.stats;
    stats.generation.store(generation.0, Ordering::Release);
    stats.set_role(understudy_common::ids::Role::Primary);
    stats.set_incarnation(incarnation);
    stats.protected.store(false, Ordering::Release);
    stats
        .promotion_resume_us
        .store(resumed.as_micros() as u64, Ordering::Relaxed);
    let (detect, state) = match trigger {
        Trigger::Handover { .. } => {
            stats.metrics.switchovers.inc();
            (
                Duration::ZERO,
                format!("took over from epoch {epoch} by handover"),
            )
        }
        Trigger::Silence(silence) => {
            stats.metrics.failovers.inc();
            (
                silence,
                format!("promoted from epoch {epoch} after silence: running unprotected"),
            )
        }
        Trigger::Restart => {
            stats.metrics.failovers.inc();
            (
                Duration::ZERO,
                format!(
                    "promoted from epoch {epoch}: the primary's host restarted and lost the VM; running unprotected"
                ),
            )
        }
        Trigger::Operator => {
            stats.metrics.failovers.inc();
            (
                Duration::ZERO,
                format!("promoted from epoch {epoch} by an operator: running unprotected"),
            )
        }
    };
    stats.set_state(StateKind::Promoted, state);
    stats
        .promotion_detect_us
        .store(detect.as_micros() as u64, Ordering::Relaxed);
}

//! Replay mode on the backup: the primary's trace log, kept from the last
//! committed checkpoint, and a **replica** that replays it as it arrives.
//!
//! ```text
//!  stream:  … segments ─ checkpoint N chunks ─ segments … ─ checkpoint N+1 …
//!                        (segments after N's first chunk were recorded
//!                         after N's pause: they follow N)
//!  commit N ─▶ base = N (exit E), tail = the segments after it
//!          ─▶ no replica? start one from N's image (RAM copied, paused at
//!             E) following the tail and every segment after it
//!  segment  ─▶ checked (seq, exits follow on), kept, fed to the replica,
//!             acked as "log held up to exit X" (output before X may go out)
//!  replica stops (divergence, bad log) ─▶ say so, drop it, ack no more log,
//!             ask for a checkpoint; the next commit starts a new replica
//!  promote  ─▶ close the feed: the replica replays the rest and parks at
//!             the log's end, recording a new stream once resumed
//! ```
//!
//! The replica's RAM is its own copy of the image (later commits write the
//! image, never the replica), so it may run from an older checkpoint than
//! the newest one while it follows the log.

use std::collections::VecDeque;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use understudy_checkpoint::store::ImageStore;
use understudy_checkpoint::trace::{TraceError, parse_segment};
use understudy_checkpoint::{Slot, StagedEpoch};
use understudy_common::backlog::Backlog;
use understudy_common::payload::{CheckpointPayload, PayloadError};
use understudy_common::wire;
use understudy_vmm::deterministic::{AfterReplay, ReplayOutcome, Sealed, TraceMode};
use understudy_vmm::memory::MemoryError;
use understudy_vmm::state::StateError;
use understudy_vmm::{ConsoleInput, GuestRam, RamBacking, Vm, VmEnd, VmError, VmShell, VmState};

use crate::FaultedIn;

/// Why the log cannot be followed, or a replica cannot run it.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("a bad trace segment")]
    Segment(#[source] TraceError),
    #[error("a trace message holds {0} bytes after its segment")]
    TrailingBytes(usize),
    #[error("trace segment of stream {got:#x}, the VM records stream {recording:#x}")]
    WrongStream { got: u64, recording: u64 },
    #[error(
        "trace segment {seq} (first exit {first_exit}) does not follow the log (next: segment \
         {next_seq:?}, exit {next_exit:?}): the primary must resync"
    )]
    OutOfOrder {
        seq: u32,
        first_exit: u64,
        next_seq: Option<u32>,
        next_exit: Option<u64>,
    },
    #[error("cannot read the checkpoint's payload")]
    Payload(#[source] PayloadError),
    #[error("cannot read the checkpoint's VM state")]
    State(#[source] StateError),
    #[error(
        "the primary's checkpoint was not taken in the deterministic mode, so its log cannot be \
         replayed"
    )]
    NotDeterministic,
    #[error("the checkpoint's VM records stream {checkpoint:#x}, its log is stream {log:#x?}")]
    StreamMismatch { checkpoint: u64, log: Option<u64> },
    #[error("the log after the checkpoint at exit {base} starts at exit {first}")]
    LogGap { base: u64, first: u64 },
    #[error("the replica stopped: {0}")]
    Stopped(VmEnd),
    #[error("no replica runs")]
    NoReplica,
    #[error("the replica did not reach the log's end")]
    Replay(#[source] VmError),
    #[error("the kernel gave no randomness")]
    NoRandomness,
    #[error("cannot start the replica")]
    Start(#[source] VmError),
    #[error("cannot fill the replica's RAM")]
    Ram(#[source] MemoryError),
    #[error("cannot read the image {}", path.display())]
    ReadImage {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The log and replica of one replay-mode session.
pub(crate) struct Follower {
    /// The stream's next segment: its seq (None until the first segment
    /// after the session's first checkpoint, which joins the stream part
    /// way) and its first exit (None until that checkpoint commits).
    next_seq: Option<u32>,
    next_exit: Option<u64>,
    stream: Option<u64>,
    /// A checkpoint's chunks are arriving: segments from here follow it.
    checkpoint_open: bool,
    /// Segments after the last committed checkpoint, and after the one
    /// arriving now.
    tail: Vec<Vec<u8>>,
    next_tail: Vec<Vec<u8>>,
    /// The committed checkpoint's exit index.
    base_exit: Option<u64>,
    /// The segments' arrival times, for the replica's lag.
    arrivals: Backlog,
    replica: Option<Replica>,
    /// Why the last replica stopped (no log is acked until a checkpoint
    /// commits and a new replica starts from it).
    stopped: Option<VmEnd>,
    /// Ask the primary for a checkpoint in the next ack.
    want_checkpoint: bool,
    /// The replica's position in the last ack (progress acks go out only
    /// when it moved).
    reported_replica: u64,
    /// The next replica's RAM, its pages with content faulted in as the
    /// epochs that wrote them committed ([`Self::fault_in_ahead`]).
    ahead: Option<FaultedIn>,
    /// Faulting in ahead failed once: the next replica starts on fresh RAM.
    ahead_off: bool,
}

/// A VM replaying the log. Field order matters: the feed closes before the
/// VM is stopped, so a vCPU waiting for more log wakes up.
struct Replica {
    feed: Sender<Vec<u8>>,
    vm: Vm,
    input: ConsoleInput,
    output: Receiver<u8>,
    /// The log the VM records once it goes live (after a promotion).
    trace: Receiver<Sealed>,
    /// Console output from offset `output_start`: the base checkpoint's
    /// unreleased output, then what the replica wrote.
    output_start: u64,
    output_kept: VecDeque<u8>,
    /// Bytes taken from the replica's own output channel.
    output_taken: u64,
}

/// A replica that replayed all the log there was and waits, paused, to run.
pub(crate) struct Finished {
    pub vm: Vm,
    pub input: ConsoleInput,
    pub output: Receiver<u8>,
    pub trace: Receiver<Sealed>,
    /// The console from `output_start` on (served as the promoted VM's).
    pub output_start: u64,
    pub output_kept: Vec<u8>,
    pub output_taken: u64,
    /// The exit it replayed to.
    pub exit: u64,
}

/// What an ack says about the log in replay mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LogAck {
    pub log_exits: u64,
    pub replica_exits: u64,
    pub want_checkpoint: bool,
}

impl Follower {
    pub(crate) fn new() -> Self {
        Self {
            next_seq: None,
            next_exit: None,
            stream: None,
            checkpoint_open: false,
            tail: Vec::new(),
            next_tail: Vec::new(),
            base_exit: None,
            arrivals: Backlog::default(),
            replica: None,
            stopped: None,
            want_checkpoint: false,
            reported_replica: 0,
            ahead: None,
            ahead_off: false,
        }
    }

    /// An epoch committed while no replica runs: faults its pages with
    /// content in, in the next replica's RAM, so that the replica's start
    /// copies the image into memory the host already backs. On a host that
    /// takes free memory back from this machine the first touch of fresh
    /// memory was most of that start (15–33 ms for the dirtier's 32 MiB,
    /// once 215 ms), on the critical path of a replay migration; here it is
    /// spread over the commits that bring the pages, while the rest of the
    /// base is still on its way. It changes no content: the copy stays the
    /// replica's source.
    pub(crate) fn fault_in_ahead(&mut self, staged: &StagedEpoch, ram_bytes: u64) {
        if self.replica.is_some() || self.ahead_off {
            return;
        }
        let ahead = match &mut self.ahead {
            Some(ahead) => ahead,
            None => {
                let started = std::time::Instant::now();
                let built = GuestRam::new(ram_bytes as usize, RamBacking::Anonymous)
                    .map_err(|e| wire::chain(&e))
                    .and_then(|ram| VmShell::new_deterministic(ram).map_err(|e| wire::chain(&e)));
                match built {
                    Ok(shell) => {
                        tracing::debug!(
                            took_us = started.elapsed().as_micros() as u64,
                            "built the VM the next replica restores into"
                        );
                        let touched = vec![false; shell.ram().pages()];
                        self.ahead.insert(FaultedIn { shell, touched })
                    }
                    Err(why) => {
                        tracing::debug!(%why, "no VM built ahead for the replica");
                        self.ahead_off = true;
                        return;
                    }
                }
            }
        };
        let wanted = |touched: &[bool], i: usize| {
            !matches!(staged.slots[i], Slot::Zero)
                && touched
                    .get(staged.pages[i] as usize)
                    .is_some_and(|touched| !touched)
        };
        let mut i = 0;
        while i < staged.pages.len() {
            if !wanted(&ahead.touched, i) {
                i += 1;
                continue;
            }
            let first = staged.pages[i] as usize;
            let mut n = 1;
            while i + n < staged.pages.len()
                && staged.pages[i + n] as usize == first + n
                && wanted(&ahead.touched, i + n)
            {
                n += 1;
            }
            if let Err(e) = ahead.shell.ram().populate(first, n) {
                tracing::debug!(error = %wire::chain(&e), "the replica's RAM is not faulted in ahead");
                self.ahead = None;
                self.ahead_off = true;
                return;
            }
            ahead.touched[first..first + n].fill(true);
            i += n;
        }
    }

    /// An epoch chunk arrived: a checkpoint (or sync round) is on its way,
    /// and segments from here on follow it.
    pub(crate) fn chunk_arrived(&mut self) {
        self.checkpoint_open = true;
    }

    /// A segment arrived: checks that it follows the log so far, keeps it
    /// and feeds it to the replica. An error ends the session (the primary
    /// resyncs).
    pub(crate) fn segment(&mut self, bytes: Vec<u8>) -> Result<(), ReplicaError> {
        let (header, _, used) = parse_segment(&bytes).map_err(ReplicaError::Segment)?;
        if used != bytes.len() {
            return Err(ReplicaError::TrailingBytes(bytes.len() - used));
        }
        if let Some(stream) = self.stream
            && stream != header.stream
        {
            return Err(ReplicaError::WrongStream {
                got: header.stream,
                recording: stream,
            });
        }
        let out_of_order = self.next_seq.is_some_and(|seq| seq != header.seq);
        let gap = self.next_exit.is_some_and(|exit| exit != header.first_exit);
        if out_of_order || gap {
            return Err(ReplicaError::OutOfOrder {
                seq: header.seq,
                first_exit: header.first_exit,
                next_seq: self.next_seq,
                next_exit: self.next_exit,
            });
        }
        let exits_end = header.first_exit + u64::from(header.exits);
        self.stream = Some(header.stream);
        self.next_seq = Some(header.seq.wrapping_add(1));
        self.next_exit = Some(exits_end);
        self.arrivals.push(exits_end);
        if let Some(replica) = &self.replica {
            let fed = if understudy_common::fault::check("backup.replica.feed").is_err() {
                // Test hook: a log the replica cannot use (as a divergence
                // would leave it).
                let mut bad = bytes.clone();
                if let Some(last) = bad.last_mut() {
                    *last ^= 0xff;
                }
                replica.feed.send(bad)
            } else {
                replica.feed.send(bytes.clone())
            };
            if fed.is_err() {
                tracing::debug!("the replica no longer takes log");
            }
        }
        if self.checkpoint_open {
            self.next_tail.push(bytes);
        } else {
            self.tail.push(bytes);
        }
        Ok(())
    }

    /// The pages faulted in ahead in the next replica's RAM.
    #[cfg(test)]
    pub(crate) fn faulted_in_ahead(&self) -> Option<Vec<usize>> {
        let ahead = self.ahead.as_ref()?;
        Some(
            (0..ahead.touched.len())
                .filter(|&p| ahead.touched[p])
                .collect(),
        )
    }

    /// The exit index the log received reaches.
    pub(crate) fn received_exits(&self) -> u64 {
        self.next_exit.unwrap_or(0)
    }

    /// A checkpoint committed: it is the new base. Starts a replica from it
    /// if none runs; returns the exit it started at.
    pub(crate) fn checkpoint_committed(
        &mut self,
        store: &ImageStore,
    ) -> Result<Option<u64>, ReplicaError> {
        self.checkpoint_open = false;
        self.tail = std::mem::take(&mut self.next_tail);
        let payload =
            CheckpointPayload::decode(store.device_state()).map_err(ReplicaError::Payload)?;
        let state = VmState::decode(&payload.vm_state).map_err(ReplicaError::State)?;
        let Some(det) = state.deterministic else {
            return Err(ReplicaError::NotDeterministic);
        };
        if self.stream.is_some_and(|s| s != det.stream) {
            return Err(ReplicaError::StreamMismatch {
                checkpoint: det.stream,
                log: self.stream,
            });
        }
        self.base_exit = Some(det.exit_index);
        self.stream = Some(det.stream);
        // The log after the checkpoint starts right at its pause (later
        // checkpoints: the log before it was sealed there, so it follows on).
        match self.tail.first() {
            Some(first) => {
                let (header, _, _) = parse_segment(first).map_err(ReplicaError::Segment)?;
                if header.first_exit != det.exit_index {
                    return Err(ReplicaError::LogGap {
                        base: det.exit_index,
                        first: header.first_exit,
                    });
                }
            }
            None => {
                self.next_exit.get_or_insert(det.exit_index);
            }
        }
        if let Some(replica) = &mut self.replica {
            replica.trim_output(payload.console_offset);
            return Ok(None);
        }
        let ahead = self.ahead.take();
        self.replica = Some(Replica::start(store, &state, &payload, &self.tail, ahead)?);
        self.stopped = None;
        Ok(Some(det.exit_index))
    }

    /// Takes the replica's output and sees whether it still runs. Returns
    /// why it stopped, once.
    pub(crate) fn pump(&mut self) -> Option<String> {
        let replica = self.replica.as_mut()?;
        replica.take_output();
        let end = replica.vm.ended()?;
        let why = format!("the replica stopped: {end}");
        self.replica = None;
        self.stopped = Some(end);
        self.want_checkpoint = true;
        Some(why)
    }

    /// What the next ack says about the log (the request for a checkpoint
    /// goes out once).
    pub(crate) fn ack(&mut self) -> LogAck {
        let replica_exits = self
            .replica
            .as_ref()
            .and_then(|r| r.vm.exit_index())
            .unwrap_or(0);
        let log_exits = match (self.base_exit, &self.stopped, &self.replica) {
            (Some(base), None, Some(_)) => self.received_exits().max(base),
            _ => 0,
        };
        self.reported_replica = replica_exits;
        LogAck {
            log_exits,
            replica_exits,
            want_checkpoint: std::mem::take(&mut self.want_checkpoint),
        }
    }

    /// Whether the replica moved (or stopped) since the last ack: the
    /// primary hears of it even while no log comes (a guest it holds back
    /// for the replica's lag sends none).
    pub(crate) fn progressed(&self) -> bool {
        let at = self
            .replica
            .as_ref()
            .and_then(|r| r.vm.exit_index())
            .unwrap_or(0);
        at != self.reported_replica || self.want_checkpoint
    }

    /// How far the replica is behind the log received: in exits, and the
    /// time since the oldest segment it has not replayed arrived.
    pub(crate) fn lag(&mut self) -> (u64, Duration) {
        let Some(at) = self.replica.as_ref().and_then(|r| r.vm.exit_index()) else {
            self.arrivals.clear();
            return (0, Duration::ZERO);
        };
        let (_, age) = self.arrivals.behind(at);
        (self.received_exits().saturating_sub(at), age)
    }

    /// Whether a replica runs.
    pub(crate) fn has_replica(&self) -> bool {
        self.replica.is_some()
    }

    /// Promotion without a usable replica (it stopped, or never started): a
    /// new one from the committed checkpoint replays the log kept since it.
    /// A replica that stopped on a broken feed or a fault of its own gets
    /// there; one that met a real divergence most likely stops again.
    pub(crate) fn finish_from_base(
        &mut self,
        store: &ImageStore,
        timeout: Duration,
    ) -> Result<Finished, ReplicaError> {
        let payload =
            CheckpointPayload::decode(store.device_state()).map_err(ReplicaError::Payload)?;
        let state = VmState::decode(&payload.vm_state).map_err(ReplicaError::State)?;
        if state.deterministic.is_none() {
            return Err(ReplicaError::NotDeterministic);
        }
        let ahead = self.ahead.take();
        self.replica = Some(Replica::start(store, &state, &payload, &self.tail, ahead)?);
        self.stopped = None;
        self.finish(timeout)
    }

    /// Promotion: the replica replays the rest of the log and parks at its
    /// end (within `timeout`), ready to run and record a new stream.
    pub(crate) fn finish(&mut self, timeout: Duration) -> Result<Finished, ReplicaError> {
        let Some(replica) = self.replica.take() else {
            return Err(match self.stopped.clone() {
                Some(end) => ReplicaError::Stopped(end),
                None => ReplicaError::NoReplica,
            });
        };
        let Replica {
            feed,
            vm,
            input,
            output,
            trace,
            output_start,
            output_kept,
            output_taken,
        } = replica;
        drop(feed);
        let outcome = vm.wait_replay(timeout).map_err(ReplicaError::Replay)?;
        let ReplayOutcome::Reached { exit, .. } = outcome;
        let mut finished = Finished {
            vm,
            input,
            output,
            trace,
            output_start,
            output_kept: output_kept.into(),
            output_taken,
            exit,
        };
        // Everything it wrote while replaying is the primary's output.
        let rest: Vec<u8> = finished.output.try_iter().collect();
        finished.output_taken += rest.len() as u64;
        finished.output_kept.extend(rest);
        Ok(finished)
    }
}

impl Replica {
    /// A replica from the committed image (`store`, whose checkpoint is
    /// `state` and `payload`), following `tail` and what comes after it.
    fn start(
        store: &ImageStore,
        state: &VmState,
        payload: &CheckpointPayload,
        tail: &[Vec<u8>],
        ahead: Option<FaultedIn>,
    ) -> Result<Self, ReplicaError> {
        let (feed, source) = crossbeam_channel::unbounded();
        for segment in tail {
            let _ = feed.send(segment.clone());
        }
        let (sink, trace) = crossbeam_channel::unbounded();
        let stream = understudy_common::ids::random_stream().ok_or(ReplicaError::NoRandomness)?;
        let follow = TraceMode::Follow {
            source,
            then: AfterReplay::Record { stream, sink },
        };
        // A copy: the image keeps changing under later commits; the
        // replica's RAM must not. Into the VM built ahead when there is one
        // of the size.
        let started = std::time::Instant::now();
        let size = state.memory.size_bytes as usize;
        let ahead =
            ahead.filter(|a| a.shell.ram().size() == size && store.ram_bytes() == size as u64);
        // Counted for the debug line only: a pass over every page of RAM.
        let faulted_in = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            ahead
                .as_ref()
                .map_or(0, |a| a.touched.iter().filter(|&&t| t).count())
        });
        let (copied, started_vm) = match ahead {
            Some(FaultedIn { shell, touched }) => {
                crate::copy_image_into(store, shell.ram(), &touched).map_err(ReplicaError::Ram)?;
                let copied = started.elapsed();
                (
                    copied,
                    Vm::restore_deterministic_in(shell, state, false, follow),
                )
            }
            None => {
                let ram = crate::copy_image(store, size, ReplicaError::Ram, |path, source| {
                    ReplicaError::ReadImage { path, source }
                })?;
                let copied = started.elapsed();
                (copied, Vm::restore_deterministic(state, ram, false, follow))
            }
        };
        let (vm, console) = started_vm.map_err(ReplicaError::Start)?;
        tracing::debug!(
            faulted_in = faulted_in.unwrap_or_default(),
            copy_ms = copied.as_secs_f64() * 1e3,
            restore_ms = (started.elapsed() - copied).as_secs_f64() * 1e3,
            "replica: its RAM copied from the image, the VM restored"
        );
        Ok(Self {
            feed,
            vm,
            input: console.input,
            output: console.output,
            trace,
            output_start: payload.console_offset,
            output_kept: payload.console_out.iter().copied().collect(),
            output_taken: 0,
        })
    }

    fn take_output(&mut self) {
        for byte in self.output.try_iter() {
            self.output_kept.push_back(byte);
            self.output_taken += 1;
        }
    }

    /// A newer checkpoint says the primary released everything before
    /// `offset`: no promotion serves it again.
    fn trim_output(&mut self, offset: u64) {
        self.take_output();
        let drop = offset
            .saturating_sub(self.output_start)
            .min(self.output_kept.len() as u64);
        self.output_kept.drain(..drop as usize);
        self.output_start += drop;
    }
}

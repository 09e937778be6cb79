//! The deterministic mode: the VM runs without KVM's in-kernel irqchip and
//! timer, so every interrupt reaches the guest when the VMM decides, and the
//! VMM decides only while the vCPU is stopped at a synchronous exit: one the
//! guest's own instruction caused (port I/O, `hlt`, MMIO). An exit's
//! position is its index (every such exit counts; an `EINTR` does not). That
//! index is the clock of record and replay — this machine has no
//! performance counters to count instructions with.
//!
//! Interrupts go in only at an exit where the guest accepts one (interrupts
//! enabled, no `sti`/`mov ss` shadow): KVM's interrupt-window exit is never
//! asked for, because it comes at the first *kernel* exit after the window
//! opens (a host timer, a page fault on fresh RAM), a point no replay finds
//! again — found by this module's tests, where a replay from a snapshot
//! took its window exit in another place than the recording. A guest must
//! therefore give an exit regularly with interrupts enabled (the built-in
//! ones do: `sti; hlt` when idle, and the dirtier's port write every 64
//! pages).
//!
//! ```text
//!               exit k
//!  guest ──────────┤  count k, handle it (devices answer), record or check it
//!                  │  events after k: ticks due, console input taken
//!                  │    (record: from the wall clock and the console;
//!                  │     replay: from the log)
//!                  │  inject the PIC's vector if the guest can take it,
//!                  │    else keep it pending for a later exit
//!                  │  (hlt and nothing to inject: record waits for a tick or
//!                  │    input; replay takes the log's next event)
//!  guest ◀─────────┘  pauses, snapshots and stops happen here, never in
//!                     the middle of the guest's instruction stream
//! ```
//!
//! A recording's log holds every exit and every input; a replay from a
//! snapshot at exit k feeds the inputs at the same exits and compares every
//! exit (kind, port, value), each injected vector and a register digest every
//! [`SYNC_EVERY`] exits: the first difference stops it, naming the exit.
//!
//! What the guest may not do here: read the host without an exit (`rdtsc`,
//! `rdrand`, `rdseed`). The built-in guests do not; the loader refuses an
//! image that contains those instructions (see
//! [`crate::loader::refuse_nondeterminism`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use kvm_ioctls::VcpuFd;
use understudy_checkpoint::trace::{Exit, Record, SYNC_EVERY, TraceReader, TraceWriter};

use crate::devices::PortIoBus;

/// The PIC line the UART is wired to.
const COM1_IRQ_LINE: u8 = 4;
/// The PIC line of the PIT.
const TIMER_IRQ_LINE: u8 = 0;
/// How far behind the wall clock the virtual timer may fall before it skips
/// ahead (a long pause must not replay as a burst of ticks).
const MAX_TICK_LAG: u32 = 100;
/// The longest a halted guest waits between looks at its inputs.
const HALT_POLL: Duration = Duration::from_micros(500);
/// The longest records wait in the open segment before it is sealed and
/// handed on (a reader follows a live log at most this far behind).
const SEAL_EVERY: Duration = Duration::from_millis(100);
/// The longest console output waits in the open segment: output may leave
/// the primary only once a peer holds the log that produced it, so a
/// segment with output is sealed when the guest halts (it is done for now)
/// or at the latest after this.
const SEAL_OUTPUT_WITHIN: Duration = Duration::from_millis(1);

/// A sealed log segment as a recording hands it on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// The segment, in the trace format (`understudy_checkpoint::trace`).
    pub bytes: Vec<u8>,
    /// The exit index the stream reaches with this segment: a replay that
    /// has it holds every input up to that exit.
    pub exits_end: u64,
    /// Console output bytes the VM wrote (since it was booted or restored)
    /// up to the seal: what this segment's exits produced, and all before.
    pub output_end: u64,
}

/// Where a recording hands its sealed segments.
pub type Sink = Sender<Sealed>;

pub use crate::state::DeterministicState;

/// Where a replay stops, and what happens then.
#[derive(Debug)]
pub enum AfterReplay {
    /// Park the vCPU (the VM stays, paused, for inspection or a snapshot).
    Stop,
    /// Carry on live from exactly that point, without a log.
    GoLive,
    /// Record a new stream (id `stream`, segments to `sink`) from exactly
    /// that point: the vCPU parks first, so that the caller can take the new
    /// recording's start snapshot, and records once resumed.
    Record {
        /// The new stream's id.
        stream: u64,
        /// Where its sealed segments go.
        sink: Sink,
    },
}

/// How the deterministic mode runs.
#[derive(Debug)]
pub enum TraceMode {
    /// Live, and every exit and input goes to the log (sealed segments to
    /// `sink`).
    Record {
        /// Seals records into segments.
        writer: TraceWriter,
        /// Where sealed segments go.
        sink: Sink,
    },
    /// Inputs from the log (segments from `source`), exits checked against
    /// it, until exit `until` (or the log's end).
    Replay {
        /// The log's segments, in order.
        source: Receiver<Vec<u8>>,
        /// Stop at this exit (None: at the log's end).
        until: Option<u64>,
        /// What to do once there.
        then: AfterReplay,
    },
    /// A replica: replays a log that another host is still recording and
    /// that starts exactly at this snapshot (its first segment is the one
    /// the recording sealed at the snapshot's pause, whatever its seq).
    /// There is no end exit: the replay ends when `source` closes and the
    /// log received so far is used up, then does what `then` says.
    Follow {
        /// The log's segments as they arrive.
        source: Receiver<Vec<u8>>,
        /// What to do once the log is used up.
        then: AfterReplay,
    },
    /// Live with deterministic devices, no log.
    Live,
}

/// What stopped a replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// It reached `exit` (the requested one, or the log's end) and parked
    /// or went live.
    Reached {
        /// The exit it stopped at.
        exit: u64,
        /// It went live there (else it parked).
        went_live: bool,
    },
}

/// Why a deterministic run cannot go on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The replay disagreed with the log.
    Diverged(String),
    /// The log cannot be read.
    BadLog(String),
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Diverged(why) => write!(f, "replay diverged: {why}"),
            Self::BadLog(why) => write!(f, "the trace log cannot be used: {why}"),
        }
    }
}

enum Mode {
    Record {
        writer: TraceWriter,
        sink: Sink,
    },
    Replay {
        reader: TraceReader,
        source: Receiver<Vec<u8>>,
        until: Option<u64>,
        then: Option<AfterReplay>,
        /// Records still to skip before the replay starts (the snapshot was
        /// taken that far into the log).
        skip_exits: u64,
        skip_events: u32,
        /// The log starts exactly at the snapshot (a replica).
        follows: bool,
    },
    Live,
}

/// The engine on the vCPU thread.
pub(crate) struct Engine {
    mode: Mode,
    state: DeterministicState,
    serial_irq: Arc<AtomicBool>,
    /// The exit index, published for [`crate::Vm::exit_index`].
    progress: Arc<AtomicU64>,
    /// The console's input offset (`ConsoleInput::next_offset`): input a
    /// replay takes from the log counts as the VM's too, so a client that
    /// resumes on a replica that went live resends only what it lacks.
    input_offset: Option<Arc<AtomicU64>>,
    /// Record/live: when the next tick is due on the wall clock.
    next_tick: Option<Instant>,
    /// Record: when the last segment was sealed.
    sealed_at: Instant,
    /// Record: console output written up to the last seal, and since when
    /// output waits in the open segment.
    sealed_output: u64,
    output_since: Option<Instant>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("exit_index", &self.state.exit_index)
            .finish()
    }
}

/// What the engine concluded after an exit.
pub(crate) enum After {
    /// Run the guest again.
    Run,
    /// The guest halted and nothing could be injected yet: call
    /// [`Engine::wait_halted`] (serving pauses in between) until it injects.
    Halted,
    /// The replay is over and the VM parks (its outcome is reported).
    Parked(ReplayOutcome),
    /// Stop the VM.
    End(Stop),
}

impl Engine {
    pub(crate) fn new(
        state: DeterministicState,
        serial_irq: Arc<AtomicBool>,
        progress: Arc<AtomicU64>,
        trace: TraceMode,
    ) -> Self {
        let mut state = state;
        progress.store(state.exit_index, Ordering::Relaxed);
        let mode = match trace {
            TraceMode::Record { writer, sink } => {
                state.stream = writer.stream();
                state.events_after_exit = 0;
                Mode::Record { writer, sink }
            }
            TraceMode::Live => Mode::Live,
            TraceMode::Replay {
                source,
                until,
                then,
            } => Mode::Replay {
                reader: TraceReader::expecting(state.stream),
                source,
                until,
                then: Some(then),
                skip_exits: state.exit_index,
                skip_events: state.events_after_exit,
                follows: false,
            },
            TraceMode::Follow { source, then } => Mode::Replay {
                reader: TraceReader::joining(state.stream),
                source,
                until: None,
                then: Some(then),
                skip_exits: 0,
                skip_events: 0,
                follows: true,
            },
        };
        Self {
            mode,
            state,
            serial_irq,
            progress,
            input_offset: None,
            next_tick: None,
            sealed_at: Instant::now(),
            sealed_output: 0,
            output_since: None,
        }
    }

    pub(crate) fn share_input_offset(&mut self, offset: Arc<AtomicU64>) {
        self.input_offset = Some(offset);
    }

    pub(crate) fn state(&self, bus: &PortIoBus) -> DeterministicState {
        let legacy = bus.legacy.unwrap_or_default();
        DeterministicState {
            pics: legacy.pics,
            pit: legacy.pit,
            serial_irq_pending: self.serial_irq.load(Ordering::Acquire),
            ..self.state
        }
    }

    /// The guest waits in `hlt`: call [`Engine::wait_halted`], not KVM_RUN.
    pub(crate) fn halted(&self) -> bool {
        self.state.halted
    }

    /// Before the first run (boot or restore): never an interrupt window.
    pub(crate) fn prepare(&mut self, fd: &mut VcpuFd) {
        fd.get_kvm_run().request_interrupt_window = 0;
    }

    fn is_replay(&self) -> bool {
        matches!(self.mode, Mode::Replay { .. })
    }

    /// Records or checks one record.
    fn note(&mut self, record: Record) -> Result<(), Stop> {
        match &mut self.mode {
            Mode::Record { writer, .. } => {
                writer.push(&record);
                if !matches!(record, Record::Exit(_)) {
                    self.state.events_after_exit += 1;
                }
                Ok(())
            }
            Mode::Live => Ok(()),
            Mode::Replay { .. } => {
                if !matches!(record, Record::Exit(_)) {
                    self.state.events_after_exit += 1;
                }
                let logged = self.next_logged()?;
                if logged != Some(record.clone()) {
                    return Err(Stop::Diverged(format!(
                        "at exit {}: the guest did {} where the log says {}",
                        self.state.exit_index,
                        describe(Some(&record)),
                        describe(logged.as_ref())
                    )));
                }
                Ok(())
            }
        }
    }

    /// The log's next record (blocking on the source for more segments);
    /// None once the log has ended.
    fn next_logged(&mut self) -> Result<Option<Record>, Stop> {
        let Mode::Replay { reader, source, .. } = &mut self.mode else {
            return Ok(None);
        };
        loop {
            if let Some(r) = reader.next_record() {
                return Ok(Some(r));
            }
            if reader.ended() {
                return Ok(None);
            }
            match source.recv() {
                Ok(segment) => {
                    reader
                        .push_segment(&segment)
                        .map_err(|e| Stop::BadLog(e.to_string()))?;
                }
                Err(_) => return Ok(None),
            }
        }
    }

    /// The log's next record without taking it.
    fn peek_logged(&mut self) -> Result<Option<&Record>, Stop> {
        let Mode::Replay { reader, source, .. } = &mut self.mode else {
            return Ok(None);
        };
        while reader.peek().is_none() && !reader.ended() {
            match source.recv() {
                Ok(segment) => {
                    reader
                        .push_segment(&segment)
                        .map_err(|e| Stop::BadLog(e.to_string()))?;
                }
                Err(_) => break,
            }
        }
        Ok(reader.peek())
    }

    /// A replay from a snapshot taken into the log: skip what the snapshot
    /// already holds.
    pub(crate) fn skip_to_snapshot(&mut self) -> Result<(), Stop> {
        let (exits, events) = match &mut self.mode {
            Mode::Replay { follows: true, .. } => return self.check_follow_start(),
            Mode::Replay {
                skip_exits,
                skip_events,
                ..
            } => (std::mem::take(skip_exits), std::mem::take(skip_events)),
            _ => return Ok(()),
        };
        let base = {
            self.peek_logged()?;
            match &self.mode {
                Mode::Replay { reader, .. } => reader.base_exit().unwrap_or(exits),
                _ => exits,
            }
        };
        if exits < base {
            return Err(Stop::BadLog(format!(
                "the log starts at exit {base}, after the snapshot's exit {exits}"
            )));
        }
        let mut to_skip = exits - base;
        while to_skip > 0 {
            match self.next_logged()? {
                Some(Record::Exit(_)) => to_skip -= 1,
                Some(_) => {}
                None => {
                    return Err(Stop::BadLog(format!(
                        "the log ends before the snapshot's exit {exits}"
                    )));
                }
            }
        }
        for _ in 0..events {
            match self.next_logged()? {
                Some(Record::Exit(_)) | None => {
                    return Err(Stop::BadLog(format!(
                        "the log does not hold the snapshot's {events} events after exit {exits}"
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// A replica's log must start where its snapshot was taken (nothing to
    /// skip, nothing missing).
    fn check_follow_start(&mut self) -> Result<(), Stop> {
        self.peek_logged()?;
        let Mode::Replay { reader, .. } = &self.mode else {
            return Ok(());
        };
        match reader.start_exit() {
            Some(start) if start != self.state.exit_index => Err(Stop::BadLog(format!(
                "the followed log starts at exit {start}, not at the snapshot's exit {}",
                self.state.exit_index
            ))),
            _ => Ok(()),
        }
    }

    /// Handles the guest's exit `exit` (already answered by the devices):
    /// counts and records or checks it, applies the inputs that follow it,
    /// injects what can be injected.
    pub(crate) fn after_exit(
        &mut self,
        fd: &mut VcpuFd,
        bus: &mut PortIoBus,
        input: &Receiver<Vec<u8>>,
        exit: Exit,
    ) -> After {
        self.state.halted = exit == Exit::Halt;
        self.state.exit_index += 1;
        self.progress
            .store(self.state.exit_index, Ordering::Relaxed);
        self.state.events_after_exit = 0;
        if let Err(stop) = self.note(Record::Exit(exit)) {
            return After::End(stop);
        }
        self.state.ready = fd.get_kvm_run().ready_for_interrupt_injection != 0;
        if self.state.exit_index % SYNC_EVERY == 0 {
            let digest = match fd.get_regs() {
                Ok(regs) => register_digest(&regs),
                Err(e) => return After::End(Stop::BadLog(format!("cannot read registers: {e}"))),
            };
            if let Err(stop) = self.note(Record::Sync(digest)) {
                return After::End(stop);
            }
        }
        self.deliver_and_check(fd, bus, input)
    }

    /// A halted guest waits for its next interrupt: recording or live, one
    /// short wait for a tick or input; replaying, the log's next events. The
    /// caller serves pauses between calls.
    pub(crate) fn wait_halted(
        &mut self,
        fd: &mut VcpuFd,
        bus: &mut PortIoBus,
        input: &Receiver<Vec<u8>>,
    ) -> After {
        if !self.is_replay() {
            let wait = match self.next_tick {
                Some(t) => t.saturating_duration_since(Instant::now()).min(HALT_POLL),
                None => HALT_POLL,
            };
            if input.is_empty() || !bus.serial.wants_input() {
                std::thread::sleep(wait);
            }
        }
        self.deliver_and_check(fd, bus, input)
    }

    fn deliver_and_check(
        &mut self,
        fd: &mut VcpuFd,
        bus: &mut PortIoBus,
        input: &Receiver<Vec<u8>>,
    ) -> After {
        if let Err(stop) = self.deliver(fd, bus, input) {
            return After::End(stop);
        }
        self.flush(bus, false);
        if let Some(parked) = self.park_if_ended() {
            return parked;
        }
        if self.state.halted {
            After::Halted
        } else {
            After::Run
        }
    }

    /// A replay that reached its end (the requested exit, or the log's:
    /// its source closed and used up) parks, or goes on as `then` says;
    /// None while it has more to replay (or it is no replay). Called after
    /// every exit, and once before the first run: a log that ends at the
    /// snapshot (a replay migration whose guest made no progress after its
    /// base) must not let the guest run to an exit the log never saw.
    pub(crate) fn park_if_ended(&mut self) -> Option<After> {
        let Mode::Replay { until, .. } = &self.mode else {
            return None;
        };
        let at_end = until.is_some_and(|u| self.state.exit_index >= u)
            || match self.peek_logged() {
                Ok(next) => next.is_none(),
                Err(stop) => return Some(After::End(stop)),
            };
        at_end.then(|| self.finish_replay())
    }

    fn finish_replay(&mut self) -> After {
        let Mode::Replay { then, .. } = &mut self.mode else {
            return After::Run;
        };
        let exit = self.state.exit_index;
        match then.take().unwrap_or(AfterReplay::Stop) {
            AfterReplay::Stop => {
                self.mode = Mode::Live;
                After::Parked(ReplayOutcome::Reached {
                    exit,
                    went_live: false,
                })
            }
            AfterReplay::GoLive => {
                self.mode = Mode::Live;
                self.state.events_after_exit = 0;
                self.next_tick = None;
                tracing::info!(exit, "replay done: the VM goes live from this exit");
                After::Parked(ReplayOutcome::Reached {
                    exit,
                    went_live: true,
                })
            }
            AfterReplay::Record { stream, sink } => {
                self.mode = Mode::Record {
                    writer: TraceWriter::new(stream, exit),
                    sink,
                };
                self.state.stream = stream;
                self.state.events_after_exit = 0;
                self.next_tick = None;
                tracing::info!(
                    exit,
                    stream,
                    "replay done: parked, recording from this exit"
                );
                After::Parked(ReplayOutcome::Reached {
                    exit,
                    went_live: false,
                })
            }
        }
    }

    /// Applies the inputs that follow the current exit and injects; an
    /// injection wakes a halted guest.
    fn deliver(
        &mut self,
        fd: &mut VcpuFd,
        bus: &mut PortIoBus,
        input: &Receiver<Vec<u8>>,
    ) -> Result<(), Stop> {
        if !self.is_replay() {
            // Record or live: ticks due by the wall clock, input that waits.
            self.take_due_ticks(bus)?;
            self.take_input(bus, input)?;
            self.raise_serial(bus);
            if self.inject(fd, bus)? {
                self.state.halted = false;
            }
            return Ok(());
        }
        // The log's inputs after this exit, then the injection they lead to
        // (recomputed, and checked against the log). A halted guest may
        // have waited through several rounds of inputs while recording;
        // only the last can have injected.
        loop {
            match self.peek_logged()? {
                Some(Record::Tick) => {
                    self.next_logged()?;
                    self.state.events_after_exit += 1;
                    self.tick(bus);
                }
                Some(Record::Input(_)) => {
                    if let Some(Record::Input(bytes)) = self.next_logged()? {
                        self.state.events_after_exit += 1;
                        bus.serial.enqueue_input(&bytes);
                        if let Some(offset) = &self.input_offset {
                            offset.fetch_add(bytes.len() as u64, Ordering::AcqRel);
                        }
                    }
                }
                _ => break,
            }
        }
        self.raise_serial(bus);
        if self.inject(fd, bus)? {
            self.state.halted = false;
        }
        let halted = self.state.halted;
        match self.peek_logged()? {
            None => Ok(()),
            Some(Record::Exit(_)) if !halted => Ok(()),
            other => {
                let what = describe(other);
                let doing = if halted {
                    "stays halted with nothing to take"
                } else {
                    "goes on to its next exit"
                };
                Err(Stop::Diverged(format!(
                    "at exit {}: the log has {what} where the replayed guest {doing}",
                    self.state.exit_index
                )))
            }
        }
    }

    fn tick(&mut self, bus: &mut PortIoBus) {
        self.state.ticks += 1;
        if let Some(legacy) = bus.legacy.as_mut() {
            legacy.pics.raise(TIMER_IRQ_LINE);
        }
    }

    fn take_due_ticks(&mut self, bus: &mut PortIoBus) -> Result<(), Stop> {
        let Some(period) = bus.legacy.as_ref().and_then(|l| l.pit.period()) else {
            self.next_tick = None;
            return Ok(());
        };
        let now = Instant::now();
        let next = *self.next_tick.get_or_insert(now + period);
        if now >= next {
            // One edge per exit at most (the PIC would coalesce more). An
            // edge while the last one still waits in the PIC (a masked or
            // busy timer) changes nothing: it is neither counted nor logged,
            // so an idle guest that masks its timer logs nothing.
            let waiting = bus
                .legacy
                .as_ref()
                .is_some_and(|l| l.pics.master.irr & (1 << TIMER_IRQ_LINE) != 0);
            if !waiting {
                self.tick(bus);
                self.note(Record::Tick)?;
            }
            let mut following = next + period;
            if now > following + period * MAX_TICK_LAG {
                following = now + period;
            }
            self.next_tick = Some(following);
        }
        Ok(())
    }

    fn take_input(&mut self, bus: &mut PortIoBus, input: &Receiver<Vec<u8>>) -> Result<(), Stop> {
        while bus.serial.wants_input() {
            let Ok(bytes) = input.try_recv() else { break };
            bus.serial.enqueue_input(&bytes);
            self.note(Record::Input(bytes))?;
        }
        Ok(())
    }

    fn raise_serial(&mut self, bus: &mut PortIoBus) {
        if self.serial_irq.swap(false, Ordering::AcqRel)
            && let Some(legacy) = bus.legacy.as_mut()
        {
            legacy.pics.raise(COM1_IRQ_LINE);
        }
    }

    /// Injects the PIC's vector if the guest can take it now (else it stays
    /// pending in the PIC for a later exit). Returns whether it injected.
    fn inject(&mut self, fd: &mut VcpuFd, bus: &mut PortIoBus) -> Result<bool, Stop> {
        let Some(legacy) = bus.legacy.as_mut() else {
            return Ok(false);
        };
        let pending = legacy.pics.pending_vector().is_some();
        let mut injected = false;
        if pending && self.state.ready {
            if let Some(vector) = legacy.pics.acknowledge() {
                inject_interrupt(fd, vector)
                    .map_err(|e| Stop::BadLog(format!("cannot inject vector {vector:#x}: {e}")))?;
                self.state.ready = false;
                injected = true;
                self.note(Record::Inject(vector))?;
            }
        }
        Ok(injected)
    }

    /// Seals the open log segment and hands it to the sink: at pauses
    /// (`always`), when it is big enough or old enough, and soon after the
    /// guest wrote console output (see [`SEAL_OUTPUT_WITHIN`]).
    pub(crate) fn flush(&mut self, bus: &PortIoBus, always: bool) {
        let Mode::Record { writer, sink } = &mut self.mode else {
            return;
        };
        if writer.is_empty() {
            return;
        }
        let output = bus.serial.output_total();
        let output_due = if output > self.sealed_output {
            let since = *self.output_since.get_or_insert_with(Instant::now);
            self.state.halted || since.elapsed() >= SEAL_OUTPUT_WITHIN
        } else {
            false
        };
        if always || output_due || writer.wants_seal() || self.sealed_at.elapsed() >= SEAL_EVERY {
            let exits_end = writer.next_exit();
            let bytes = writer.seal(false);
            let _ = sink.send(Sealed {
                bytes,
                exits_end,
                output_end: output,
            });
            self.sealed_at = Instant::now();
            self.sealed_output = output;
            self.output_since = None;
        }
    }

    /// The run ends: the log's last segment.
    pub(crate) fn end(&mut self, bus: &PortIoBus) {
        if let Mode::Record { writer, sink } = &mut self.mode {
            let exits_end = writer.next_exit();
            let _ = sink.send(Sealed {
                bytes: writer.seal(true),
                exits_end,
                output_end: bus.serial.output_total(),
            });
        }
    }
}

/// KVM_INTERRUPT (not wrapped by kvm-ioctls 0.25): queue `vector` for the
/// next entry. Only valid without an in-kernel irqchip, when KVM said the
/// guest is ready for an interrupt.
fn inject_interrupt(fd: &VcpuFd, vector: u8) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // _IOW(KVMIO, 0x86, struct kvm_interrupt)
    const KVM_INTERRUPT: libc::c_ulong = 0x4004_ae86;
    let irq = kvm_bindings::kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: a valid vCPU fd and a kvm_interrupt that outlives the call;
    // the kernel only reads it.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_INTERRUPT as _, &irq) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A digest of the general registers, instruction pointer and flags.
fn register_digest(r: &kvm_bindings::kvm_regs) -> u64 {
    let words = [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let low = crc32c::crc32c(&bytes);
    let high = crc32c::crc32c_append(0x5bd1_e995, &bytes);
    (u64::from(high) << 32) | u64::from(low)
}

fn describe(record: Option<&Record>) -> String {
    match record {
        None => "nothing (the log ended)".into(),
        Some(Record::Exit(Exit::Out { port, size, value })) => {
            format!("`out` of {value:#x} ({size} bytes) to port {port:#x}")
        }
        Some(Record::Exit(Exit::In { port, size, value })) => {
            format!("`in` from port {port:#x} reading {value:#x} ({size} bytes)")
        }
        Some(Record::Exit(Exit::Halt)) => "`hlt`".into(),
        Some(Record::Exit(Exit::Window)) => "an interrupt-window exit".into(),
        Some(Record::Exit(Exit::MmioRead { addr, .. })) => format!("an MMIO read at {addr:#x}"),
        Some(Record::Exit(Exit::MmioWrite { addr, data })) => {
            format!("an MMIO write of {data:02x?} at {addr:#x}")
        }
        Some(Record::Tick) => "a timer tick".into(),
        Some(Record::Input(b)) => format!("console input {:?}", String::from_utf8_lossy(b)),
        Some(Record::Inject(v)) => format!("an injection of vector {v:#x}"),
        Some(Record::Sync(d)) => format!("registers with digest {d:#018x}"),
    }
}

//! The vCPU thread and the control protocol other threads use to pause, resume,
//! inspect and stop it.
//!
//! ```text
//!            pause()                 vCPU parks            resume()
//! Running ─────────────▶ PauseRequested ─────────▶ Paused ─────────▶ Running
//!    ▲                        │  (a new pause request seen on wake      │
//!    │                        │   while parked means "stay parked")     │
//!    └────────────────────────┴─────────────── stop() ─▶ StopRequested ─▶ Ended
//!   guest reset / triple fault / KVM error ───────────────────────────▶ Ended
//! ```
//!
//! Requests are delivered by setting the state, raising an `attention` flag and
//! kicking the thread with a real-time signal whose handler sets
//! `kvm_run.immediate_exit`, so a `KVM_RUN` in progress or about to start
//! returns `EINTR` at once. Before parking, the thread re-enters `KVM_RUN` once
//! with `immediate_exit` set, which completes a pending port read/write (its
//! data would otherwise be lost from the saved registers).
//!
//! A pause may ask for a save with it (`pause_saving`, a checkpoint's stop):
//! the thread reports itself parked, then saves with the control lock
//! released, so the pausing thread harvests and copies meanwhile and
//! collects the save after. A save is only ever of the pause it was taken
//! in: a resume drops one asked for, done or under way.
//!
//! Every vCPU ioctl (setup, state save and restore) runs on this thread, as
//! KVM's API documentation asks; all device state is owned by it as well.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use kvm_bindings::{CpuId, KVM_MAX_MSR_ENTRIES, Msrs, kvm_fpu, kvm_msr_entry, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};

use understudy_checkpoint::trace::Exit;

use crate::arch;
use crate::deterministic::{After, DeterministicState, Engine, ReplayOutcome};
use crate::devices::PortIoBus;
use crate::loader::BootEntry;
use crate::state::{
    self, CpuidEntry, DebugRegs, Msr, Persist, Regs, SerialDeviceState, Sregs, VcpuEvents,
    VcpuState,
};

/// Errors from the vCPU thread and its control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread did not start.
    #[error("cannot start the vCPU thread")]
    Spawn(#[source] std::io::Error),
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {step} failed")]
    Kvm {
        /// Which ioctl.
        step: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread did not answer a request in time.
    #[error("the vCPU did not {what} within {timeout:?}")]
    Timeout {
        /// What it was asked.
        what: &'static str,
        /// How long it had.
        timeout: Duration,
    },
    /// The VM is over.
    #[error("the VM has ended ({0})")]
    Ended(VmEnd),
    /// A request that needs the vCPU paused.
    #[error("the vCPU must be paused to {0}")]
    NotPaused(&'static str),
    /// A saved state KVM or the devices refuse.
    #[error("saved vCPU state is not usable: {0}")]
    BadState(String),
}

fn kvm(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { step, source }
}

/// Why a VM stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest asked the i8042 for a CPU reset (reboot or shutdown).
    GuestReset,
    /// The guest triple-faulted.
    TripleFault,
    /// The host asked it to stop.
    Stopped,
    /// KVM could not go on (e.g. an instruction its emulator lacks).
    Failed(String),
    /// A replay disagreed with its log, or the log could not be used (the
    /// message names the exit and what differed).
    Diverged(String),
}

impl std::fmt::Display for VmEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::GuestReset => f.write_str("the guest reset itself"),
            Self::TripleFault => f.write_str("the guest triple-faulted"),
            Self::Stopped => f.write_str("stopped by the host"),
            Self::Failed(why) => write!(f, "failed: {why}"),
            Self::Diverged(why) => f.write_str(why),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RunState {
    Running,
    PauseRequested,
    Paused,
    StopRequested,
    Ended(VmEnd),
}

/// What the parked vCPU thread can be asked to do.
enum Request {
    Save,
}

type SaveResult = Result<SavedVcpu, VcpuError>;

/// What the vCPU thread saves: its registers, the UART, and the
/// deterministic mode's devices.
#[derive(Debug)]
pub struct SavedVcpu {
    /// Every register set.
    pub vcpu: VcpuState,
    /// The UART.
    pub serial: SerialDeviceState,
    /// The deterministic mode's devices and position (None: kernel mode).
    pub deterministic: Option<DeterministicState>,
}

struct ControlInner {
    state: RunState,
    /// A save asked for and not begun yet.
    request: Option<Request>,
    /// The vCPU thread is saving (with the lock released meanwhile).
    saving: bool,
    /// A save of the pause the vCPU is in (a resume clears it).
    response: Option<SaveResult>,
    /// Where a replay stopped (the deterministic mode).
    replay: Option<ReplayOutcome>,
}

struct Control {
    inner: Mutex<ControlInner>,
    changed: Condvar,
    attention: AtomicBool,
    /// The deterministic mode: requests wait for the vCPU's next exit
    /// instead of kicking it out of the guest's instruction stream (a pause
    /// must fall between two exits, where a replay can find it again).
    deterministic: bool,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, ControlInner> {
        // A poisoned lock means the vCPU thread panicked; the state is still a
        // plain enum, so carry on and let callers see `Ended`.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(
        &self,
        guard: MutexGuard<'a, ControlInner>,
        deadline: Instant,
    ) -> (MutexGuard<'a, ControlInner>, bool) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (guard, timeout) = self
            .changed
            .wait_timeout(guard, left)
            .unwrap_or_else(|p| p.into_inner());
        (guard, timeout.timed_out())
    }
}

thread_local! {
    /// The `kvm_run` page of the vCPU running on this thread, for the kick
    /// signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set
            // before the first KVM_RUN and cleared before the VcpuFd is
            // dropped; a volatile byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    (*INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)))
    .map_err(VcpuError::Signal)
}

/// How the vCPU starts.
pub(crate) enum VcpuSetup {
    /// A fresh boot at `entry` in long mode, CPUID as given.
    Boot { entry: BootEntry, cpuid: CpuId },
    /// Continue from saved state (which carries its own CPUID).
    Restore(Box<VcpuState>),
}

/// Handle to a running vCPU thread.
pub struct VcpuHandle {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle")
            .field("state", &self.control.lock().state)
            .finish()
    }
}

/// Waits for a VM's end without owning it.
#[derive(Clone)]
pub struct EndWatch(Arc<Control>);

impl std::fmt::Debug for EndWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndWatch")
    }
}

impl EndWatch {
    /// Blocks until the VM ends (or `timeout` passes; `Duration::MAX` = forever).
    pub fn wait(&self, timeout: Duration) -> Option<VmEnd> {
        // Capped so the deadline cannot overflow (~136 years is "forever").
        let deadline = Instant::now() + timeout.min(Duration::from_secs(1 << 32));
        let mut inner = self.0.lock();
        loop {
            if let RunState::Ended(end) = &inner.state {
                return Some(end.clone());
            }
            let (guard, timed_out) = self.0.wait(inner, deadline);
            inner = guard;
            if timed_out {
                return None;
            }
        }
    }
}

/// Console input chunks queued for the vCPU at most: with the serial
/// device's own bound, input a guest does not read backs up to the clients
/// (their sockets stop being read) instead of growing without bound.
const INPUT_QUEUE_CHUNKS: usize = 16;

/// Why console input was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputRefused {
    /// The guest has not read what it was given yet: try again shortly.
    Full,
    /// The VM has ended.
    Ended,
}

/// Sends console input to the guest (cloneable; kicks the vCPU to take it).
#[derive(Clone)]
pub struct ConsoleInput {
    tx: Sender<Vec<u8>>,
    control: Arc<Control>,
    thread: libc::pthread_t,
    /// Console input bytes queued here since this handle's VM started, plus
    /// what the VM had taken before (a restored VM's count): the input
    /// offset of the next byte.
    next_offset: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleInput")
    }
}

impl ConsoleInput {
    /// Queues bytes for the guest's COM1, waiting while the queue is full.
    /// Returns false once the VM has ended.
    pub fn send(&self, bytes: &[u8]) -> bool {
        loop {
            match self.try_send(bytes) {
                Ok(()) => return true,
                Err(InputRefused::Ended) => return false,
                Err(InputRefused::Full) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Queues bytes for the guest's COM1 if there is room.
    pub fn try_send(&self, bytes: &[u8]) -> Result<(), InputRefused> {
        match self.tx.try_send(bytes.to_vec()) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                let inner = self.control.lock();
                // Make sure the vCPU looks at its queue.
                kick(&self.control, &inner, self.thread);
                return Err(InputRefused::Full);
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                return Err(InputRefused::Ended);
            }
        }
        self.next_offset
            .fetch_add(bytes.len() as u64, Ordering::AcqRel);
        let inner = self.control.lock();
        if kick(&self.control, &inner, self.thread) {
            Ok(())
        } else {
            Err(InputRefused::Ended)
        }
    }

    /// The input offset the next byte sent here gets: every byte this VM
    /// (and the VM it was restored from) took or has queued.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }
}

/// Raises the attention flag and signals the vCPU thread. The caller holds the
/// control lock (`inner`), which keeps the thread alive: it records `Ended`
/// under that lock as its last act and is joined only after. Returns false if
/// the VM has already ended.
fn kick(control: &Control, inner: &ControlInner, thread: libc::pthread_t) -> bool {
    if matches!(inner.state, RunState::Ended(_)) {
        return false;
    }
    control.attention.store(true, Ordering::Release);
    if !control.deterministic {
        // SAFETY: `thread` has not ended (see above), so the pthread_t is valid.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
    }
    true
}

/// Everything the vCPU thread owns.
struct VcpuThread {
    fd: VcpuFd,
    bus: PortIoBus,
    control: Arc<Control>,
    input: Receiver<Vec<u8>>,
    cpuid: Vec<CpuidEntry>,
    msr_indices: Vec<u32>,
    /// The deterministic mode's engine (None: the kernel mode).
    det: Option<Engine>,
}

impl VcpuHandle {
    /// Starts the vCPU thread: applies `setup` on that thread, then runs the
    /// guest (or parks, if `start_paused`). Returns once setup succeeded.
    pub(crate) fn spawn(
        fd: VcpuFd,
        bus: PortIoBus,
        setup: VcpuSetup,
        msr_indices: Vec<u32>,
        start_paused: bool,
        det: Option<Engine>,
    ) -> Result<(Self, ConsoleInput), VcpuError> {
        install_kick_handler()?;
        let control = Arc::new(Control {
            inner: Mutex::new(ControlInner {
                state: if start_paused {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                request: None,
                saving: false,
                response: None,
                replay: None,
            }),
            changed: Condvar::new(),
            attention: AtomicBool::new(true),
            deterministic: det.is_some(),
        });
        let (input_tx, input_rx) = crossbeam_channel::bounded(INPUT_QUEUE_CHUNKS);
        let input_base = bus.serial.input_total();
        let next_offset = Arc::new(std::sync::atomic::AtomicU64::new(input_base));
        let mut det = det;
        if let Some(det) = det.as_mut() {
            // A replay takes input from the log: it counts as taken too.
            det.share_input_offset(next_offset.clone());
        }
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let thread_control = control.clone();
        let thread = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                let mut vcpu = VcpuThread {
                    fd,
                    bus,
                    control: thread_control,
                    input: input_rx,
                    cpuid: Vec::new(),
                    msr_indices,
                    det,
                };
                match vcpu.setup(setup) {
                    Ok(()) => {
                        let _ = ready_tx.send(Ok(()));
                        vcpu.run();
                    }
                    Err(e) => {
                        vcpu.end(VmEnd::Failed(e.to_string()));
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(VcpuError::Spawn)?;
        let ready = ready_rx.recv().unwrap_or_else(|_| {
            Err(VcpuError::Ended(VmEnd::Failed(
                "vCPU thread died during setup".into(),
            )))
        });
        let pthread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread);
        let handle = Self {
            control: control.clone(),
            thread: Some(thread),
        };
        ready?;
        let input = ConsoleInput {
            tx: input_tx,
            control,
            thread: pthread,
            next_offset,
        };
        Ok((handle, input))
    }

    fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread
            .as_ref()
            .map(std::os::unix::thread::JoinHandleExt::as_pthread_t)
    }

    fn kick(&self, inner: &ControlInner) {
        if let Some(t) = self.pthread() {
            kick(&self.control, inner, t);
        }
    }

    /// Stops the guest and waits until the vCPU thread is parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.pause_with(timeout, false)
    }

    /// [`Self::pause`], and the vCPU thread saves its state as soon as it
    /// parks, while the caller goes on (harvesting the dirty log, copying
    /// pages): the next [`Self::save`] of this pause collects that save
    /// instead of asking for one. The capture overlaps the rest of a
    /// checkpoint's stop, and a hand-over between the threads is saved.
    pub fn pause_saving(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.pause_with(timeout, true)
    }

    fn pause_with(&self, timeout: Duration, save: bool) -> Result<(), VcpuError> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.control.lock();
        match &inner.state {
            RunState::Ended(end) => return Err(VcpuError::Ended(end.clone())),
            RunState::StopRequested => return Err(VcpuError::Ended(VmEnd::Stopped)),
            RunState::Running | RunState::PauseRequested | RunState::Paused => {}
        }
        if save {
            self.ask_save(&mut inner);
        }
        if inner.state == RunState::Paused {
            return Ok(());
        }
        inner.state = RunState::PauseRequested;
        self.kick(&inner);
        loop {
            match &inner.state {
                RunState::Paused => return Ok(()),
                RunState::Ended(end) => return Err(VcpuError::Ended(end.clone())),
                _ => {}
            }
            let (guard, timed_out) = self.control.wait(inner, deadline);
            inner = guard;
            if timed_out && inner.state != RunState::Paused {
                return Err(VcpuError::Timeout {
                    what: "pause",
                    timeout,
                });
            }
        }
    }

    /// Lets a paused guest run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        let mut inner = self.control.lock();
        match &inner.state {
            RunState::Paused | RunState::PauseRequested => {
                inner.state = RunState::Running;
                // A save of this pause is of a state the guest now leaves
                // (one under way is dropped when it ends).
                inner.request = None;
                inner.response = None;
                self.control.changed.notify_all();
                Ok(())
            }
            RunState::Running => Ok(()),
            RunState::Ended(end) => Err(VcpuError::Ended(end.clone())),
            RunState::StopRequested => Err(VcpuError::Ended(VmEnd::Stopped)),
        }
    }

    /// Asks the parked (or parking) vCPU thread for a save, unless one of
    /// this pause is asked for, under way or done.
    fn ask_save(&self, inner: &mut ControlInner) {
        if inner.request.is_none() && !inner.saving && inner.response.is_none() {
            inner.request = Some(Request::Save);
            self.control.changed.notify_all();
        }
    }

    /// Captures vCPU and serial state (or collects the capture that
    /// [`Self::pause_saving`] began). The vCPU must be paused.
    pub fn save(&self, timeout: Duration) -> SaveResult {
        let deadline = Instant::now() + timeout;
        let mut inner = self.control.lock();
        if inner.state != RunState::Paused {
            return Err(VcpuError::NotPaused("save its state"));
        }
        self.ask_save(&mut inner);
        loop {
            if let Some(response) = inner.response.take() {
                return response;
            }
            if let RunState::Ended(end) = &inner.state {
                return Err(VcpuError::Ended(end.clone()));
            }
            let (guard, timed_out) = self.control.wait(inner, deadline);
            inner = guard;
            if timed_out && inner.response.is_none() {
                return Err(VcpuError::Timeout {
                    what: "save its state",
                    timeout,
                });
            }
        }
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        match &self.control.lock().state {
            RunState::Ended(end) => Some(end.clone()),
            _ => None,
        }
    }

    /// Waits until a replay reaches its end (or the VM ends, e.g. on a
    /// divergence): the outcome, or how the VM ended.
    pub fn wait_replay(&self, timeout: Duration) -> Result<ReplayOutcome, VcpuError> {
        let deadline = Instant::now() + timeout.min(Duration::from_secs(1 << 32));
        let mut inner = self.control.lock();
        loop {
            if let Some(outcome) = inner.replay.take() {
                return Ok(outcome);
            }
            if let RunState::Ended(end) = &inner.state {
                return Err(VcpuError::Ended(end.clone()));
            }
            let (guard, timed_out) = self.control.wait(inner, deadline);
            inner = guard;
            if timed_out {
                return Err(VcpuError::Timeout {
                    what: "finish its replay",
                    timeout,
                });
            }
        }
    }

    /// Waits up to `timeout` for the VM to end on its own.
    pub fn wait_end(&self, timeout: Duration) -> Option<VmEnd> {
        self.end_watch().wait(timeout)
    }

    /// Stops the vCPU thread and joins it. Returns how the VM ended.
    pub fn stop(&mut self) -> VmEnd {
        {
            let mut inner = self.control.lock();
            if !matches!(inner.state, RunState::Ended(_)) {
                inner.state = RunState::StopRequested;
                self.control.changed.notify_all();
                self.kick(&inner);
            }
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.ended()
            .unwrap_or(VmEnd::Failed("vCPU thread exited without a reason".into()))
    }

    /// A handle that waits for the VM's end from another thread.
    pub fn end_watch(&self) -> EndWatch {
        EndWatch(self.control.clone())
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// KVM's paravirtual MSRs that need an in-kernel LAPIC to be written
/// (async page faults' interrupt vector and acknowledgement, PV EOI).
fn needs_lapic(index: u32) -> bool {
    matches!(index, 0x4b56_4d04 | 0x4b56_4d06 | 0x4b56_4d07)
}

fn is_interrupted(e: &kvm_ioctls::Error) -> bool {
    matches!(e.errno(), libc::EINTR | libc::EAGAIN)
}

impl VcpuThread {
    fn setup(&mut self, setup: VcpuSetup) -> Result<(), VcpuError> {
        match setup {
            VcpuSetup::Boot { entry, cpuid } => self.boot(entry, cpuid),
            VcpuSetup::Restore(state) => self.restore(&state),
        }
    }

    fn boot(&mut self, entry: BootEntry, cpuid: CpuId) -> Result<(), VcpuError> {
        self.fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        self.cpuid = cpuid.as_slice().iter().map(CpuidEntry::from).collect();
        self.fd
            .set_regs(&arch::entry_regs(entry.rip, entry.rsp))
            .map_err(kvm("set registers"))?;
        let mut sregs = self.fd.get_sregs().map_err(kvm("get sregs"))?;
        arch::set_long_mode(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(kvm("set sregs"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm("set FPU"))?;
        if self.det.is_some() {
            // No in-kernel LAPIC: the deterministic mode's PIC is the VMM's.
            return Ok(());
        }
        let mut lapic = self.fd.get_lapic().map_err(kvm("get LAPIC"))?;
        arch::set_virtual_wire(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(kvm("set LAPIC"))
    }

    /// Restore order (each step's reason):
    /// CPUID first (KVM validates later state against the CPU model);
    /// MP state; regs; sregs before the LAPIC (writing APIC_BASE through sregs
    /// resets the LAPIC); xsave and xcrs; debug registers; LAPIC before MSRs
    /// (the TSC-deadline MSR needs the LAPIC mode in place); vCPU events last
    /// (pending exceptions/interrupts must not be clobbered by the other sets).
    fn restore(&mut self, s: &VcpuState) -> Result<(), VcpuError> {
        if s.xsave.len() != state::XSAVE_WORDS || s.lapic.len() != state::LAPIC_BYTES {
            return Err(VcpuError::BadState("xsave or LAPIC size".into()));
        }
        let entries: Vec<_> = s
            .cpuid
            .iter()
            .map(kvm_bindings::kvm_cpuid_entry2::from)
            .collect();
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|e| VcpuError::BadState(format!("CPUID: {e:?}")))?;
        self.fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
        self.cpuid = s.cpuid.clone();
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: s.mp_state,
            })
            .map_err(kvm("set MP state"))?;
        self.fd
            .set_regs(&(&s.regs).into())
            .map_err(kvm("set registers"))?;
        self.fd
            .set_sregs(&(&s.sregs).into())
            .map_err(kvm("set sregs"))?;
        let xsave = state::words_to_xsave(&s.xsave);
        // SAFETY: `xsave` is a complete kvm_xsave without extra FAM words, the
        // size KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(kvm("set xsave"))?;
        self.fd
            .set_xcrs(&state::vec_to_xcrs(&s.xcrs))
            .map_err(kvm("set XCRs"))?;
        self.fd
            .set_debug_regs(&(&s.debug_regs).into())
            .map_err(kvm("set debug registers"))?;
        if self.det.is_none() {
            self.fd
                .set_lapic(&state::bytes_to_lapic(&s.lapic))
                .map_err(kvm("set LAPIC"))?;
        }
        // Without an in-kernel LAPIC (the deterministic mode) KVM refuses
        // the MSRs of features that need one (e.g. async page faults'
        // interrupt); at their reset value 0 there is nothing to restore.
        let skipped: Vec<u32> = if self.det.is_some() {
            s.msrs
                .iter()
                .filter(|m| m.data == 0 && needs_lapic(m.index))
                .map(|m| m.index)
                .collect()
        } else {
            Vec::new()
        };
        let entries: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .filter(|m| !skipped.contains(&m.index))
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|e| VcpuError::BadState(format!("MSRs: {e:?}")))?;
        let written = self.fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if written != entries.len() {
            let index = entries.get(written).map(|e| e.index).unwrap_or_default();
            return Err(VcpuError::BadState(format!(
                "KVM refused MSR {index:#x} ({written} of {} restored)",
                entries.len()
            )));
        }
        self.msr_indices = s.msrs.iter().map(|m| m.index).collect();
        self.fd
            .set_vcpu_events(&(&s.events).into())
            .map_err(kvm("set vCPU events"))
    }

    /// Save order: MP state first (reading it can settle pending APIC events),
    /// the register sets, vCPU events last (so they reflect everything above).
    fn save(&mut self) -> SaveResult {
        let mp_state = state::mp_state(self.fd.get_mp_state().map_err(kvm("get MP state"))?);
        let regs = Regs::from(&self.fd.get_regs().map_err(kvm("get registers"))?);
        let sregs = Sregs::from(&self.fd.get_sregs().map_err(kvm("get sregs"))?);
        let xsave = state::xsave_to_words(&self.fd.get_xsave().map_err(kvm("get xsave"))?);
        let xcrs = state::xcrs_to_vec(&self.fd.get_xcrs().map_err(kvm("get XCRs"))?);
        let lapic = if self.det.is_some() {
            vec![0; state::LAPIC_BYTES] // no in-kernel LAPIC
        } else {
            state::lapic_to_bytes(&self.fd.get_lapic().map_err(kvm("get LAPIC"))?)
        };
        let msrs = self.read_msrs()?;
        let debug_regs = DebugRegs::from(
            &self
                .fd
                .get_debug_regs()
                .map_err(kvm("get debug registers"))?,
        );
        let events = VcpuEvents::from(&self.fd.get_vcpu_events().map_err(kvm("get vCPU events"))?);
        let vcpu = VcpuState {
            cpuid: self.cpuid.clone(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            lapic,
            msrs,
            debug_regs,
            events,
        };
        Ok(SavedVcpu {
            vcpu,
            serial: self.bus.serial.save(),
            deterministic: self.det.as_ref().map(|d| d.state(&self.bus)),
        })
    }

    /// Reads every MSR in the index list. KVM stops at the first MSR it cannot
    /// read; such MSRs are dropped from the list for good.
    fn read_msrs(&mut self) -> Result<Vec<Msr>, VcpuError> {
        let mut out = Vec::with_capacity(self.msr_indices.len());
        let mut start = 0;
        while start < self.msr_indices.len() {
            let batch: Vec<kvm_msr_entry> = self.msr_indices[start..]
                .iter()
                .take(KVM_MAX_MSR_ENTRIES)
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&batch)
                .map_err(|e| VcpuError::BadState(format!("MSR list: {e:?}")))?;
            let read = self.fd.get_msrs(&mut msrs).map_err(kvm("get MSRs"))?;
            out.extend(msrs.as_slice()[..read].iter().map(|e| Msr {
                index: e.index,
                data: e.data,
            }));
            start += read;
            if read < batch.len() {
                let skipped = self.msr_indices.remove(start);
                tracing::debug!(msr = skipped, "MSR not readable; left out of snapshots");
            }
        }
        Ok(out)
    }

    fn end(&self, end: VmEnd) {
        let mut inner = self.control.lock();
        inner.state = RunState::Ended(end);
        self.control.changed.notify_all();
    }

    fn run(&mut self) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let end = if self.det.is_some() {
            self.run_loop_deterministic()
        } else {
            self.run_loop()
        };
        if let Some(det) = self.det.as_mut() {
            det.end(&self.bus);
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        match &end {
            VmEnd::Failed(why) | VmEnd::Diverged(why) => {
                tracing::error!(reason = %why, "VM failed")
            }
            other => tracing::info!(reason = %other, "VM ended"),
        }
        self.end(end);
    }

    fn run_loop(&mut self) -> VmEnd {
        loop {
            self.fd.set_kvm_immediate_exit(0);
            if self.control.attention.swap(false, Ordering::AcqRel) {
                if let Some(end) = self.handle_attention() {
                    return end;
                }
                continue;
            }
            match self.fd.run() {
                Ok(exit) => {
                    if let Some(end) = handle_exit(&mut self.bus, exit) {
                        return self.describe_failure(end);
                    }
                }
                Err(e) if is_interrupted(&e) => {}
                Err(e) => return VmEnd::Failed(format!("KVM_RUN: {e}")),
            }
            // The guest read its input down: take the next chunks.
            if self.bus.serial.wants_input() && !self.input.is_empty() {
                self.take_input();
            }
        }
    }

    /// Moves console input from the queue into the serial device while it
    /// has room (the rest waits in the queue, then in the clients' sockets).
    fn take_input(&mut self) {
        while self.bus.serial.wants_input() {
            match self.input.try_recv() {
                Ok(bytes) => self.bus.serial.enqueue_input(&bytes),
                Err(_) => break,
            }
        }
    }

    /// The deterministic mode's loop: interrupts are delivered and requests
    /// served only between exits (see `deterministic.rs`).
    fn run_loop_deterministic(&mut self) -> VmEnd {
        if let Some(det) = self.det.as_mut() {
            if let Err(stop) = det.skip_to_snapshot() {
                return VmEnd::Diverged(stop.to_string());
            }
            det.prepare(&mut self.fd);
            match det.park_if_ended() {
                Some(After::End(stop)) => return VmEnd::Diverged(stop.to_string()),
                Some(After::Parked(outcome)) => self.report_replay(outcome),
                Some(After::Run | After::Halted) | None => {}
            }
        }
        loop {
            self.fd.set_kvm_immediate_exit(0);
            if self.control.attention.swap(false, Ordering::AcqRel) {
                if let Some(end) = self.handle_attention() {
                    return end;
                }
                continue;
            }
            let Some(det) = self.det.as_mut() else {
                return VmEnd::Failed("the deterministic engine went missing".into());
            };
            let after = if det.halted() {
                det.wait_halted(&mut self.fd, &mut self.bus, &self.input)
            } else {
                let traced = match self.fd.run() {
                    Ok(exit) => trace_exit(&mut self.bus, exit),
                    Err(e) if is_interrupted(&e) => continue,
                    Err(e) => return VmEnd::Failed(format!("KVM_RUN: {e}")),
                };
                match self.after_traced(traced) {
                    Ok(after) => after,
                    Err(end) => return self.describe_failure(end),
                }
            };
            match after {
                After::Run | After::Halted => {}
                After::Parked(outcome) => self.report_replay(outcome),
                After::End(stop) => return VmEnd::Diverged(stop.to_string()),
            }
        }
    }

    /// One exit in the deterministic mode, answered by the devices: the
    /// engine counts, records or checks it and delivers what follows it.
    fn after_traced(&mut self, traced: Result<Exit, VmEnd>) -> Result<After, VmEnd> {
        let exit = traced?;
        let reset = self.bus.reset_requested();
        let Some(det) = self.det.as_mut() else {
            return Err(VmEnd::Failed(
                "the deterministic engine went missing".into(),
            ));
        };
        let after = det.after_exit(&mut self.fd, &mut self.bus, &self.input, exit);
        if reset {
            return Err(VmEnd::GuestReset);
        }
        Ok(after)
    }

    /// A replay reached its end: tell the waiter; park unless it went live.
    fn report_replay(&mut self, outcome: ReplayOutcome) {
        let ReplayOutcome::Reached { went_live, .. } = outcome;
        let mut inner = self.control.lock();
        inner.replay = Some(outcome);
        if !went_live && inner.state == RunState::Running {
            inner.state = RunState::PauseRequested;
            self.control.attention.store(true, Ordering::Release);
        }
        self.control.changed.notify_all();
    }

    fn describe_failure(&mut self, end: VmEnd) -> VmEnd {
        match end {
            VmEnd::Failed(why) => {
                let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
                VmEnd::Failed(format!("{why} at guest rip {rip:#x}"))
            }
            other => other,
        }
    }

    /// Takes console input and serves control requests. Returns `Some` when the
    /// thread must end.
    fn handle_attention(&mut self) -> Option<VmEnd> {
        let control = self.control.clone();
        let mut inner = control.lock();
        loop {
            match inner.state {
                RunState::Running => {
                    drop(inner);
                    // The deterministic mode takes input only at exits,
                    // where the log can place it.
                    if self.det.is_none() {
                        self.take_input();
                    }
                    return None;
                }
                RunState::StopRequested => return Some(VmEnd::Stopped),
                RunState::Ended(ref end) => return Some(end.clone()),
                RunState::PauseRequested => {
                    drop(inner);
                    if let Some(end) = self.complete_pending_io() {
                        return Some(end);
                    }
                    if let Some(det) = self.det.as_mut() {
                        // The log up to this point leaves before the pause
                        // is reported (a snapshot here must find it).
                        det.flush(&self.bus, true);
                    }
                    inner = control.lock();
                    if inner.state == RunState::PauseRequested {
                        inner.state = RunState::Paused;
                        control.changed.notify_all();
                    }
                }
                RunState::Paused => {
                    if let Some(Request::Save) = inner.request.take() {
                        // Unlocked: a `pause_saving` caller goes on (and
                        // may resume the guest) while the state is read.
                        inner.saving = true;
                        drop(inner);
                        let saved = self.save();
                        inner = control.lock();
                        inner.saving = false;
                        // Only this thread parks the vCPU, so still Paused
                        // means still the same pause; otherwise the guest
                        // was resumed and the save is of a state left behind.
                        if inner.state == RunState::Paused {
                            inner.response = Some(saved);
                        }
                        control.changed.notify_all();
                        continue;
                    }
                    inner = control
                        .changed
                        .wait(inner)
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Re-enters KVM_RUN with `immediate_exit` set: KVM finishes the port I/O
    /// of the last exit (e.g. stores an `in` result into RAX) and returns
    /// without running guest code, so the registers are complete.
    fn complete_pending_io(&mut self) -> Option<VmEnd> {
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if is_interrupted(&e) => None,
            Err(e) => Some(VmEnd::Failed(format!("KVM_RUN (completing I/O): {e}"))),
            Ok(exit) if self.det.is_some() => {
                let traced = trace_exit(&mut self.bus, exit);
                match self.after_traced(traced) {
                    Ok(After::End(stop)) => Some(VmEnd::Diverged(stop.to_string())),
                    Ok(_) => None,
                    Err(end) => Some(end),
                }
            }
            Ok(exit) => handle_exit(&mut self.bus, exit),
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }
}

/// Handles one exit in the deterministic mode and says what it was, for the
/// log. Errors end the VM.
fn trace_exit(bus: &mut PortIoBus, exit: VcpuExit<'_>) -> Result<Exit, VmEnd> {
    let value = |data: &[u8]| {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        u32::from_le_bytes(v)
    };
    Ok(match exit {
        VcpuExit::IoIn(port, data) => {
            bus.read(port, data);
            Exit::In {
                port,
                size: data.len() as u8,
                value: value(data),
            }
        }
        VcpuExit::IoOut(port, data) => {
            bus.write(port, data);
            Exit::Out {
                port,
                size: data.len() as u8,
                value: value(data),
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            data.fill(0xff);
            Exit::MmioRead {
                addr,
                data: data.to_vec(),
            }
        }
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite {
            addr,
            data: data.to_vec(),
        },
        VcpuExit::Hlt => Exit::Halt,
        VcpuExit::IrqWindowOpen => Exit::Window,
        other => {
            // Everything else ends the VM, as in the kernel mode.
            return Err(handle_exit(bus, other).unwrap_or(VmEnd::Failed(
                "an exit the deterministic mode does not handle".into(),
            )));
        }
    })
}

/// Handles one VM exit; `Some` ends the VM.
fn handle_exit(bus: &mut PortIoBus, exit: VcpuExit<'_>) -> Option<VmEnd> {
    match exit {
        VcpuExit::IoIn(port, data) => bus.read(port, data),
        VcpuExit::IoOut(port, data) => {
            bus.write(port, data);
            if bus.reset_requested() {
                return Some(VmEnd::GuestReset);
            }
        }
        // No MMIO devices yet: reads see all ones, writes are dropped.
        VcpuExit::MmioRead(_, data) => data.fill(0xff),
        VcpuExit::MmioWrite(..) => {}
        VcpuExit::Shutdown => return Some(VmEnd::TripleFault),
        VcpuExit::Hlt => {
            return Some(VmEnd::Failed(
                "guest halted with no interrupt controller".into(),
            ));
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET | kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    VmEnd::GuestReset
                }
                other => VmEnd::Failed(format!("system event {other}")),
            });
        }
        VcpuExit::InternalError => {
            return Some(VmEnd::Failed(
                "KVM internal error (on these machines usually an instruction KVM's emulator cannot run)"
                    .into(),
            ));
        }
        VcpuExit::FailEntry(reason, _) => {
            return Some(VmEnd::Failed(format!(
                "VM entry failed (reason {reason:#x})"
            )));
        }
        other => return Some(VmEnd::Failed(format!("unexpected VM exit {other:?}"))),
    }
    None
}

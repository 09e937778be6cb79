//! One microVM: KVM VM with in-kernel irqchip and PIT (or, in the
//! deterministic mode, the VMM's own PIC and PIT: `deterministic.rs`), one
//! memory slot of guest RAM, one vCPU thread, COM1 and the i8042. Created fresh from a [`Loader`] or
//! restored from a [`VmState`] plus RAM; paused and resumed from any thread;
//! its dirty pages harvested as KVM's dirty log ∪ the VMM's own writes.
//!
//! This module knows nothing of replication: the primary drives it through
//! `pause`, `harvest_dirty`, `save_state` and `resume`.

use std::time::Duration;

use crossbeam_channel::Receiver;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_irqchip, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::deterministic::{DeterministicState, Engine, TraceMode};
use crate::devices::{COM1_IRQ, ConsoleWriter, IrqLine, Legacy, PortIoBus, SerialDevice};
use crate::dirty::DirtyBitmap;
use crate::loader::{BuiltinBoot, LoadError, Loader};
use crate::memory::{GuestRam, MemoryError};
use crate::state::{
    ClockState, DeviceStates, IoapicState, KvmVmState, MemoryState, Persist, PicState, PitState,
    StateError, VmState,
};
use crate::vcpu::{ConsoleInput, VcpuError, VcpuHandle, VcpuSetup, VmEnd};

/// How long a pause or state capture may take before it is reported as stuck.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
const RAM_SLOT: u32 = 0;
/// Three pages below 4 GiB for Intel's real-mode TSS (outside guest RAM).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors creating, running or capturing a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No usable /dev/kvm.
    #[error(
        "cannot open /dev/kvm: this host needs KVM. Load the kvm module (or run on a host that \
         has /dev/kvm) and make /dev/kvm readable and writable by this user"
    )]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM VM ioctl failed.
    #[error("KVM {step} failed")]
    Kvm {
        /// Which ioctl.
        step: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No eventfd for the serial interrupt.
    #[error("cannot create an eventfd for the serial interrupt")]
    EventFd(#[source] std::io::Error),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the guest.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A saved state.
    #[error(transparent)]
    State(#[from] StateError),
    /// RAM of another size than the state's.
    #[error("snapshot is for {expected} bytes of RAM but {actual} bytes were given")]
    RamSizeMismatch {
        /// The state's RAM.
        expected: u64,
        /// The RAM given.
        actual: u64,
    },
    /// A kernel-mode snapshot given to the deterministic mode.
    #[error(
        "this snapshot was taken in the kernel mode (KVM's own interrupt controller and timer), \
         which no trace can replay: record a run with `understudyctl run --record` and replay \
         from its snapshots"
    )]
    NotDeterministic,
    /// A guest or state the deterministic mode cannot run faithfully.
    #[error("{0}")]
    Nondeterministic(String),
}

fn kvm_step(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { step, source }
}

/// The guest's console: input to COM1, and every byte COM1 outputs.
#[derive(Debug)]
pub struct Console {
    /// Bytes for the guest's COM1.
    pub input: ConsoleInput,
    /// Every byte the guest writes to COM1.
    pub output: Receiver<u8>,
}

/// Options for a fresh boot.
#[derive(Clone, Debug)]
pub struct BootOptions {
    /// Record of a built-in guest, stored in snapshots (None for raw code).
    pub boot_record: Option<BuiltinBoot>,
    /// Create the VM paused (call [`Vm::resume`] to start it).
    pub start_paused: bool,
    /// Enable dirty logging from the first instruction.
    pub dirty_logging: bool,
}

/// A running (or paused) microVM.
#[derive(Debug)]
pub struct Vm {
    // Drop order: the vCPU thread first, then the VM, then the RAM it maps.
    vcpu: VcpuHandle,
    vm_fd: VmFd,
    ram: GuestRam,
    boot_record: Option<BuiltinBoot>,
    dirty_logging: bool,
    /// The deterministic mode's exit index, as the vCPU thread publishes it.
    progress: Option<Arc<AtomicU64>>,
}

/// A VM built ahead of the state it will run: KVM's VM, its irqchip and
/// PIT, the RAM slot over `ram` and the vCPU exist; nothing runs and no
/// state is loaded. [`Vm::restore_in`] finishes it. Registering the RAM slot
/// waits for a grace period of KVM's memslot SRCU, which on these machines
/// takes ~5–10 ms whatever the RAM size (the larger part of a restore):
/// a backup builds its VM while it waits, not while the guest is down.
///
/// Until it is restored the VM never runs, so the RAM may change under it
/// (a backup keeps committing epochs into the mapped image): KVM maps guest
/// pages only when the vCPU first touches them.
pub struct VmShell {
    // Drop order: the VM before the RAM it maps.
    parts: Parts,
    ram: GuestRam,
    /// Built for the deterministic mode: the serial line's flag, which its
    /// userspace PIC reads (no in-kernel irqchip or PIT).
    flag: Option<Arc<AtomicBool>>,
}

impl VmShell {
    /// Builds the VM over `ram` (a VM of the ordinary mode: with KVM's
    /// irqchip and PIT).
    pub fn new(ram: GuestRam) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let parts = create_parts(&kvm, &ram, false, None)?;
        Ok(Self {
            parts,
            ram,
            flag: None,
        })
    }

    /// Builds the VM over `ram` for a state of the deterministic mode
    /// ([`Vm::restore_deterministic_in`]): no in-kernel irqchip or PIT.
    pub fn new_deterministic(ram: GuestRam) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let flag = Arc::new(AtomicBool::new(false));
        let parts = create_parts(&kvm, &ram, false, Some(flag.clone()))?;
        Ok(Self {
            parts,
            ram,
            flag: Some(flag),
        })
    }

    /// The RAM it maps.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell")
            .field("ram_bytes", &self.ram.size())
            .finish_non_exhaustive()
    }
}

/// A state `ram` can take: valid, and of `ram`'s size.
fn check_restorable(state: &VmState, ram: &GuestRam) -> Result<(), VmError> {
    state.validate()?;
    if ram.size() as u64 != state.memory.size_bytes {
        return Err(VmError::RamSizeMismatch {
            expected: state.memory.size_bytes,
            actual: ram.size() as u64,
        });
    }
    Ok(())
}

/// Opens /dev/kvm with a clear error when it is missing.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::KvmUnavailable)
}

struct Parts {
    vm_fd: VmFd,
    vcpu_fd: kvm_ioctls::VcpuFd,
    irq: IrqLine,
    msr_indices: Vec<u32>,
}

/// Creates the VM-wide pieces in the order KVM needs: irqchip and PIT exist
/// before the vCPU is created; RAM is registered before anything runs. With
/// `serial_flag` (the deterministic mode) there is no in-kernel irqchip or
/// PIT: the UART raises that flag and the vCPU thread's PIC takes it.
fn create_parts(
    kvm: &Kvm,
    ram: &GuestRam,
    dirty_logging: bool,
    serial_flag: Option<Arc<AtomicBool>>,
) -> Result<Parts, VmError> {
    let vm_fd = kvm.create_vm().map_err(kvm_step("create VM"))?;
    vm_fd
        .set_tss_address(TSS_ADDRESS)
        .map_err(kvm_step("set TSS address"))?;
    if serial_flag.is_none() {
        vm_fd
            .create_irq_chip()
            .map_err(kvm_step("create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_step("create PIT"))?;
    }
    set_ram_slot(&vm_fd, ram, dirty_logging)?;
    let vcpu_fd = vm_fd.create_vcpu(0).map_err(kvm_step("create vCPU"))?;
    let irq = match serial_flag {
        Some(flag) => IrqLine::Flag(flag),
        None => {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm_fd
                .register_irqfd(&evt, COM1_IRQ)
                .map_err(kvm_step("register serial irqfd"))?;
            IrqLine::Kvm(evt)
        }
    };
    let msr_indices = kvm
        .get_msr_index_list()
        .map_err(kvm_step("get MSR index list"))?
        .as_slice()
        .to_vec();
    Ok(Parts {
        vm_fd,
        vcpu_fd,
        irq,
        msr_indices,
    })
}

fn set_ram_slot(vm_fd: &VmFd, ram: &GuestRam, dirty_logging: bool) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot: RAM_SLOT,
        guest_phys_addr: 0,
        memory_size: ram.size() as u64,
        userspace_addr: ram.host_address(),
        flags: if dirty_logging {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
    };
    // SAFETY: the region is `ram`'s mapping, which the `Vm` owns and drops only
    // after the VM fd (field order in `Vm`).
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_step("set memory region"))
}

impl Vm {
    /// Boots a fresh guest from `loader` in `ram`.
    pub fn boot(
        ram: GuestRam,
        loader: &dyn Loader,
        options: BootOptions,
    ) -> Result<(Self, Console), VmError> {
        Self::boot_inner(ram, loader, options, None)
    }

    /// Boots a fresh guest in the deterministic mode (the VMM's own PIC and
    /// PIT; see `deterministic.rs`), recording its trace, or not. Refuses a
    /// guest image that reads the host without an exit.
    pub fn boot_deterministic(
        ram: GuestRam,
        loader: &dyn Loader,
        options: BootOptions,
        trace: TraceMode,
    ) -> Result<(Self, Console), VmError> {
        Self::boot_inner(ram, loader, options, Some(trace))
    }

    fn boot_inner(
        ram: GuestRam,
        loader: &dyn Loader,
        options: BootOptions,
        trace: Option<TraceMode>,
    ) -> Result<(Self, Console), VmError> {
        let kvm = open_kvm()?;
        let entry = loader.load(&ram)?;
        if trace.is_some() {
            loader
                .refuse_nondeterminism()
                .map_err(VmError::Nondeterministic)?;
        }
        let flag = trace.as_ref().map(|_| Arc::new(AtomicBool::new(false)));
        let parts = create_parts(&kvm, &ram, options.dirty_logging, flag.clone())?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_step("get supported CPUID"))?;
        let (tx, output) = crossbeam_channel::unbounded();
        let serial = SerialDevice::new(parts.irq, ConsoleWriter::new(tx));
        let progress = flag.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        let (bus, det) = match (trace, flag, &progress) {
            (Some(trace), Some(flag), Some(progress)) => (
                PortIoBus::with_legacy(serial, Legacy::default()),
                Some(Engine::new(
                    DeterministicState::default(),
                    flag,
                    progress.clone(),
                    trace,
                )),
            ),
            _ => (PortIoBus::new(serial), None),
        };
        let (vcpu, input) = VcpuHandle::spawn(
            parts.vcpu_fd,
            bus,
            VcpuSetup::Boot { entry, cpuid },
            parts.msr_indices,
            options.start_paused,
            det,
        )?;
        let vm = Self {
            vcpu,
            vm_fd: parts.vm_fd,
            ram,
            boot_record: options.boot_record,
            dirty_logging: options.dirty_logging,
            progress,
        };
        Ok((vm, Console { input, output }))
    }

    /// Brings a saved VM back in this process, with `ram` holding the saved
    /// contents (typically a snapshot or image file mapped as guest RAM). A
    /// state from the deterministic mode comes back in that mode, live.
    pub fn restore(
        state: &VmState,
        ram: GuestRam,
        start_paused: bool,
    ) -> Result<(Self, Console), VmError> {
        let trace = state.deterministic.map(|_| TraceMode::Live);
        Self::restore_inner(state, ram, start_paused, trace)
    }

    /// Brings back a state saved in the deterministic mode to replay a
    /// trace from it, or to record on from it.
    pub fn restore_deterministic(
        state: &VmState,
        ram: GuestRam,
        start_paused: bool,
        trace: TraceMode,
    ) -> Result<(Self, Console), VmError> {
        if state.deterministic.is_none() {
            return Err(VmError::NotDeterministic);
        }
        Self::restore_inner(state, ram, start_paused, Some(trace))
    }

    /// [`Vm::restore`] into a VM built ahead ([`VmShell::new`]): what is
    /// left is the state (registers, irqchip, devices) and the vCPU thread.
    /// A state of the other mode than the shell's needs a VM built
    /// differently: the shell is dropped and the VM built as `restore` does.
    pub fn restore_in(
        shell: VmShell,
        state: &VmState,
        start_paused: bool,
    ) -> Result<(Self, Console), VmError> {
        if state.deterministic.is_some() || shell.flag.is_some() {
            let VmShell { parts, ram, .. } = shell;
            drop(parts);
            return Self::restore(state, ram, start_paused);
        }
        check_restorable(state, &shell.ram)?;
        Self::restore_parts(state, shell.parts, shell.ram, start_paused, None, None)
    }

    /// [`Vm::restore_deterministic`] into a VM built ahead
    /// ([`VmShell::new_deterministic`]; a shell of the ordinary mode is
    /// dropped and the VM built as `restore_deterministic` does). Building a
    /// VM registers its RAM slot, which waits for a grace period of KVM's
    /// memslot SRCU: usually a few milliseconds, but now and then 60–80 ms
    /// and once 1.6 s on these machines, which a replica that must start
    /// at once should not wait for.
    pub fn restore_deterministic_in(
        shell: VmShell,
        state: &VmState,
        start_paused: bool,
        trace: TraceMode,
    ) -> Result<(Self, Console), VmError> {
        let VmShell { parts, ram, flag } = shell;
        let Some(flag) = flag else {
            drop(parts);
            return Self::restore_deterministic(state, ram, start_paused, trace);
        };
        if state.deterministic.is_none() {
            return Err(VmError::NotDeterministic);
        }
        check_restorable(state, &ram)?;
        Self::restore_parts(state, parts, ram, start_paused, Some(trace), Some(flag))
    }

    fn restore_inner(
        state: &VmState,
        ram: GuestRam,
        start_paused: bool,
        trace: Option<TraceMode>,
    ) -> Result<(Self, Console), VmError> {
        check_restorable(state, &ram)?;
        let started = std::time::Instant::now();
        let kvm = open_kvm()?;
        let det_state = match (&trace, state.deterministic) {
            (Some(_), Some(d)) => Some(d),
            (None, None) => None,
            _ => return Err(VmError::NotDeterministic),
        };
        let flag = det_state.map(|d| Arc::new(AtomicBool::new(d.serial_irq_pending)));
        let parts = create_parts(&kvm, &ram, false, flag.clone())?;
        let created = started.elapsed();
        let restored = Self::restore_parts(state, parts, ram, start_paused, trace, flag);
        // Now and then a restore takes a second or more (once 1.6 s for a
        // replica that usually starts in 2–6 ms): which step, if it recurs.
        tracing::debug!(
            create_ms = created.as_secs_f64() * 1e3,
            rest_ms = (started.elapsed() - created).as_secs_f64() * 1e3,
            "VM restored: KVM's VM built, then the devices and the vCPU"
        );
        restored
    }

    /// The rest of a restore, into `parts` built for `state` (with `flag`
    /// exactly when `state` is of the deterministic mode and `trace` says
    /// how to run it).
    fn restore_parts(
        state: &VmState,
        parts: Parts,
        ram: GuestRam,
        start_paused: bool,
        trace: Option<TraceMode>,
        flag: Option<Arc<AtomicBool>>,
    ) -> Result<(Self, Console), VmError> {
        let det_state = trace.as_ref().and(state.deterministic);
        if det_state.is_none() {
            // VM-wide state before the first KVM_RUN, and before the serial
            // device exists (so its first interrupt meets a restored irqchip).
            restore_kvm_vm_state(&parts.vm_fd, &state.kvm)?;
        }
        let (tx, output) = crossbeam_channel::unbounded();
        let serial =
            SerialDevice::restore((parts.irq, ConsoleWriter::new(tx)), &state.devices.serial)?;
        if let (Some(flag), Some(d)) = (&flag, det_state) {
            // vm-superio re-raises a pending UART interrupt when it is
            // restored (right for KVM's irqchip, which lost the edge). The
            // deterministic mode saved whether that edge still waited for
            // the PIC; an edge raised again here would reach the guest
            // where the recording had none.
            flag.store(d.serial_irq_pending, std::sync::atomic::Ordering::Release);
        }
        let progress = flag.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        let (bus, det) = match (trace, det_state, flag, &progress) {
            (Some(trace), Some(d), Some(flag), Some(progress)) => (
                PortIoBus::with_legacy(
                    serial,
                    Legacy {
                        pics: d.pics,
                        pit: d.pit,
                    },
                ),
                Some(Engine::new(d, flag, progress.clone(), trace)),
            ),
            _ => (PortIoBus::new(serial), None),
        };
        let (vcpu, input) = VcpuHandle::spawn(
            parts.vcpu_fd,
            bus,
            VcpuSetup::Restore(Box::new(state.vcpu.clone())),
            parts.msr_indices,
            start_paused,
            det,
        )?;
        let vm = Self {
            vcpu,
            vm_fd: parts.vm_fd,
            ram,
            boot_record: state.boot.clone(),
            dirty_logging: false,
            progress,
        };
        Ok((vm, Console { input, output }))
    }

    /// The deterministic mode: waits until a replay reaches its end (or the
    /// VM ends, e.g. on a divergence, which the error names).
    pub fn wait_replay(
        &self,
        timeout: Duration,
    ) -> Result<crate::deterministic::ReplayOutcome, VmError> {
        Ok(self.vcpu.wait_replay(timeout)?)
    }

    /// The deterministic mode: how many exits the guest has made (the
    /// position of a recording or a replay), read without pausing it.
    pub fn exit_index(&self) -> Option<u64> {
        self.progress
            .as_ref()
            .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// What was booted, if a built-in guest.
    pub fn boot_record(&self) -> Option<&BuiltinBoot> {
        self.boot_record.as_ref()
    }

    /// Stops the guest; returns once the vCPU is parked (state is then stable).
    pub fn pause(&self) -> Result<(), VmError> {
        Ok(self.vcpu.pause(CONTROL_TIMEOUT)?)
    }

    /// Stops the guest as [`Self::pause`] does, and its vCPU thread
    /// captures the vCPU's state as soon as it parks while the caller goes
    /// on (harvests the dirty log, copies or protects pages): the next
    /// [`Self::save_state`] of this pause collects that capture. A
    /// checkpoint's stop no longer waits for the capture after the rest.
    pub fn pause_saving(&self) -> Result<(), VmError> {
        Ok(self.vcpu.pause_saving(CONTROL_TIMEOUT)?)
    }

    /// Lets the guest run again.
    pub fn resume(&self) -> Result<(), VmError> {
        Ok(self.vcpu.resume()?)
    }

    /// Turns on KVM's dirty log. Pages written before this call are not
    /// reported (the caller copies all of RAM after enabling), so the VMM-side
    /// record is cleared too.
    pub fn start_dirty_logging(&mut self) -> Result<(), VmError> {
        set_ram_slot(&self.vm_fd, &self.ram, true)?;
        self.ram.take_vmm_dirty();
        self.dirty_logging = true;
        Ok(())
    }

    /// Takes the pages dirtied since the last harvest: KVM's log (cleared by
    /// reading it) ∪ pages the VMM wrote. If the consumer of the result fails,
    /// hand it to [`Vm::put_back_dirty`] so that no page is ever lost.
    pub fn harvest_dirty(&self) -> Result<DirtyBitmap, VmError> {
        let mut dirty = self.ram.take_vmm_dirty();
        if self.dirty_logging {
            let words = match self.vm_fd.get_dirty_log(RAM_SLOT, self.ram.size()) {
                Ok(words) => words,
                Err(source) => {
                    // Nothing was taken from KVM; give the VMM's bits back.
                    self.ram.mark_dirty(&dirty);
                    return Err(VmError::Kvm {
                        step: "get dirty log",
                        source,
                    });
                }
            };
            dirty.union_words(&words);
        }
        Ok(dirty)
    }

    /// Re-marks pages from a harvest whose consumer failed; the next harvest
    /// reports them again.
    pub fn put_back_dirty(&self, pages: &DirtyBitmap) {
        self.ram.mark_dirty(pages);
    }

    /// Captures vCPU, in-kernel and device state (not RAM). The VM must be
    /// paused; the vCPU's part is the capture [`Self::pause_saving`] began,
    /// if it did. `ram_crc` adds a checksum of all RAM (for snapshots).
    pub fn save_state(&self, ram_crc: bool) -> Result<VmState, VmError> {
        let saved = self.vcpu.save(CONTROL_TIMEOUT)?;
        // The deterministic mode has no in-kernel devices to save.
        let kvm = if saved.deterministic.is_some() {
            KvmVmState::default()
        } else {
            save_kvm_vm_state(&self.vm_fd)?
        };
        let crc32c = if ram_crc {
            Some(self.ram.crc32c()?)
        } else {
            None
        };
        Ok(VmState {
            memory: MemoryState {
                size_bytes: self.ram.size() as u64,
                crc32c,
            },
            boot: self.boot_record.clone(),
            vcpu: saved.vcpu,
            kvm,
            devices: DeviceStates {
                serial: saved.serial,
            },
            deterministic: saved.deterministic,
        })
    }

    /// How the VM ended, if it has.
    pub fn ended(&self) -> Option<VmEnd> {
        self.vcpu.ended()
    }

    /// Waits up to `timeout` for the guest to end by itself.
    pub fn wait_end(&self, timeout: Duration) -> Option<VmEnd> {
        self.vcpu.wait_end(timeout)
    }

    /// A handle that waits for this VM's end from another thread.
    pub fn end_watch(&self) -> crate::vcpu::EndWatch {
        self.vcpu.end_watch()
    }

    /// Stops the vCPU thread; returns how the VM ended.
    pub fn stop(mut self) -> VmEnd {
        self.vcpu.stop()
    }
}

fn get_irqchip(vm_fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm_fd
        .get_irqchip(&mut chip)
        .map_err(kvm_step("get irqchip"))?;
    Ok(chip)
}

fn save_kvm_vm_state(vm_fd: &VmFd) -> Result<KvmVmState, VmError> {
    let pit = PitState::from(&vm_fd.get_pit2().map_err(kvm_step("get PIT"))?);
    let clock = ClockState::from(&vm_fd.get_clock().map_err(kvm_step("get clock"))?);
    let master = get_irqchip(vm_fd, KVM_IRQCHIP_PIC_MASTER)?;
    let slave = get_irqchip(vm_fd, KVM_IRQCHIP_PIC_SLAVE)?;
    let ioapic = get_irqchip(vm_fd, KVM_IRQCHIP_IOAPIC)?;
    // SAFETY: KVM filled each union with the variant named by its chip_id.
    let (pic_master, pic_slave, ioapic) = unsafe {
        (
            PicState::from(&master.chip.pic),
            PicState::from(&slave.chip.pic),
            IoapicState::from(&ioapic.chip.ioapic),
        )
    };
    Ok(KvmVmState {
        pit,
        clock,
        pic_master,
        pic_slave,
        ioapic,
    })
}

/// Restores PIT, clock, both PICs and the IOAPIC. The clock is set with no
/// flags: the guest's kvmclock continues from the saved value, so time does not
/// jump by the downtime (freeze-time semantics).
fn restore_kvm_vm_state(vm_fd: &VmFd, s: &KvmVmState) -> Result<(), VmError> {
    vm_fd
        .set_pit2(&(&s.pit).into())
        .map_err(kvm_step("set PIT"))?;
    let mut clock: kvm_bindings::kvm_clock_data = (&s.clock).into();
    clock.flags = 0;
    vm_fd.set_clock(&clock).map_err(kvm_step("set clock"))?;
    for (chip_id, pic) in [
        (KVM_IRQCHIP_PIC_MASTER, &s.pic_master),
        (KVM_IRQCHIP_PIC_SLAVE, &s.pic_slave),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        chip.chip.pic = pic.into();
        vm_fd.set_irqchip(&chip).map_err(kvm_step("set PIC"))?;
    }
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    chip.chip.ioapic = (&s.ioapic).into();
    vm_fd.set_irqchip(&chip).map_err(kvm_step("set IOAPIC"))
}

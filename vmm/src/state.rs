//! Saved VM state: our own types for every part (so an upstream change to the
//! rust-vmm crates cannot change our format), `From` conversions to and from the
//! KVM structures, the [`Persist`] trait every stateful part implements, and the
//! versioned, checksummed byte encoding of a [`VmState`].
//!
//! Encoding of a state blob (all little-endian):
//!
//! ```text
//! +----------+---------+-------------+--------------+---------------------+
//! | magic 8B | ver u32 | payload u64 | crc32c u32   | payload (postcard)  |
//! +----------+---------+-------------+--------------+---------------------+
//! ```
//!
//! This module does not touch KVM; `vcpu.rs` and `vm.rs` move the state in and
//! out of the kernel.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_ioapic_state, kvm_lapic_state,
    kvm_mp_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::loader::BuiltinBoot;

/// A part of the VM that can be saved and brought back.
///
/// There are no default methods: a part that forgets to save itself does not
/// compile. `save` cannot fail: the parts are device models whose state is
/// in memory (the vCPU's and KVM's state, read with ioctls that can fail,
/// is saved by `vcpu.rs` and `vm.rs` with their own errors). `restore`
/// validates what it is given, so it can.
pub trait Persist: Sized {
    /// The saved form.
    type State;
    /// Live resources the restored part needs (file descriptors, channels).
    type RestoreArgs;
    /// What can go wrong.
    type Error;

    /// Captures the current state.
    fn save(&self) -> Self::State;
    /// Rebuilds the part from `state`, validating every field.
    fn restore(args: Self::RestoreArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Magic at the start of every encoded VM state.
pub const STATE_MAGIC: [u8; 8] = *b"USTDVMST";
/// Current format version. Bump on any change to the types below (2: the
/// serial device counts the console input it has taken; 3: the
/// deterministic mode's devices and exit index). Versions 1 and 2 are still
/// read.
pub const STATE_FORMAT_VERSION: u32 = 3;
const OLDEST_READABLE_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Refuse absurd payload lengths before allocating (real states are ~12 KB).
const MAX_PAYLOAD: u64 = 16 << 20;

/// Errors decoding or validating a saved state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Shorter than the header.
    #[error(
        "state is {len} bytes, shorter than its {HEADER_LEN}-byte header: the file is truncated"
    )]
    TruncatedHeader {
        /// The state's length.
        len: usize,
    },
    /// Not a VM state.
    #[error("not an understudy VM state (magic {found:02x?}, expected {STATE_MAGIC:02x?})")]
    BadMagic {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A format version this build does not read.
    #[error(
        "VM state format version {found} is not supported (this build reads versions {OLDEST_READABLE_VERSION} to {STATE_FORMAT_VERSION}): \
         restore it with the understudy release that wrote it"
    )]
    UnsupportedVersion {
        /// The state's version.
        found: u32,
    },
    /// The payload is not as long as the header says.
    #[error(
        "state payload claims {claimed} bytes but {actual} follow the header: the file is truncated or padded"
    )]
    LengthMismatch {
        /// The header's length.
        claimed: u64,
        /// The bytes after the header.
        actual: u64,
    },
    /// The payload does not match its CRC.
    #[error(
        "state checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt"
    )]
    Checksum {
        /// The header's CRC.
        stored: u32,
        /// The payload's.
        computed: u32,
    },
    /// The payload does not decode.
    #[error("cannot decode the VM state payload")]
    Decode(#[source] postcard::Error),
    /// The state cannot be encoded.
    #[error("cannot encode the VM state")]
    Encode(#[source] postcard::Error),
    /// A field that decodes but cannot be true.
    #[error("invalid {field} in VM state: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Everything needed to bring a paused VM back, except the RAM contents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM's size and (snapshots) checksum.
    pub memory: MemoryState,
    /// What was booted (kept so tools can tell which guest a snapshot holds).
    pub boot: Option<BuiltinBoot>,
    /// The vCPU's registers.
    pub vcpu: VcpuState,
    /// KVM's in-kernel devices (the kernel mode; all zero in the
    /// deterministic mode, which has none).
    pub kvm: KvmVmState,
    /// understudy's own device models.
    pub devices: DeviceStates,
    /// The deterministic mode: its userspace PIC and PIT, and where the VM
    /// is in its exit count (None: the kernel mode).
    pub deterministic: Option<DeterministicState>,
}

/// What the deterministic mode (`deterministic.rs`) saves with the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeterministicState {
    /// The trace stream the VM records into, or was recorded into (a replay
    /// refuses a log of another stream).
    pub stream: u64,
    /// Exits since the VM booted.
    pub exit_index: u64,
    /// Event records logged after the latest exit when the state was taken
    /// (a replay from this state skips that many).
    pub events_after_exit: u32,
    /// The userspace 8259 pair.
    pub pics: crate::pic::Pics,
    /// The userspace 8254 timer.
    pub pit: crate::pit::Pit,
    /// Timer ticks delivered since boot (the guest's virtual time).
    pub ticks: u64,
    /// The UART raised its line and the PIC has not been told yet.
    pub serial_irq_pending: bool,
    /// The guest is halted (`hlt`) and waits for an interrupt.
    pub halted: bool,
    /// At the last exit the guest could take an interrupt.
    pub ready: bool,
}

/// Guest RAM layout and a checksum of its contents when saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// Guest RAM in bytes.
    pub size_bytes: u64,
    /// CRC-32C of all RAM, for snapshots (epoch checkpoints use page digests).
    pub crc32c: Option<u32>,
}

/// Device models' state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialDeviceState,
    // The i8042 has no state: it only turns a reset command into a VM exit.
}

/// The 8250 UART on COM1, plus console input accepted but not yet in its FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// DLL: the baud divisor's low byte.
    pub baud_divisor_low: u8,
    /// DLM: the baud divisor's high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// The receive FIFO.
    pub in_buffer: Vec<u8>,
    /// Console input accepted but not yet in the FIFO.
    pub pending_input: Vec<u8>,
    /// Console input bytes the device has taken since the VM booted (the
    /// FIFO and `pending_input` hold the last of them): the input offset a
    /// resuming console client continues from.
    pub input_total: u64,
}

/// Version 1 of the state, read for compatibility (postcard is not
/// self-describing, so the old layout is spelled out).
mod v1 {
    use serde::Deserialize;

    use super::{BuiltinBoot, KvmVmState, MemoryState, VcpuState};

    #[derive(Deserialize)]
    pub(super) struct VmState {
        pub memory: MemoryState,
        pub boot: Option<BuiltinBoot>,
        pub vcpu: VcpuState,
        pub kvm: KvmVmState,
        pub devices: DeviceStates,
    }

    #[derive(Deserialize)]
    pub(super) struct DeviceStates {
        pub serial: SerialDeviceState,
    }

    #[derive(Deserialize)]
    pub(super) struct SerialDeviceState {
        pub baud_divisor_low: u8,
        pub baud_divisor_high: u8,
        pub interrupt_enable: u8,
        pub interrupt_identification: u8,
        pub line_control: u8,
        pub line_status: u8,
        pub modem_control: u8,
        pub modem_status: u8,
        pub scratch: u8,
        pub in_buffer: Vec<u8>,
        pub pending_input: Vec<u8>,
    }

    impl From<VmState> for super::VmState {
        fn from(v: VmState) -> Self {
            let s = v.devices.serial;
            Self {
                memory: v.memory,
                boot: v.boot,
                vcpu: v.vcpu,
                kvm: v.kvm,
                devices: super::DeviceStates {
                    serial: super::SerialDeviceState {
                        baud_divisor_low: s.baud_divisor_low,
                        baud_divisor_high: s.baud_divisor_high,
                        interrupt_enable: s.interrupt_enable,
                        interrupt_identification: s.interrupt_identification,
                        line_control: s.line_control,
                        line_status: s.line_status,
                        modem_control: s.modem_control,
                        modem_status: s.modem_status,
                        scratch: s.scratch,
                        // Unknown before version 2: count what is queued.
                        input_total: (s.in_buffer.len() + s.pending_input.len()) as u64,
                        in_buffer: s.in_buffer,
                        pending_input: s.pending_input,
                    },
                },
                deterministic: None,
            }
        }
    }
}

/// One vCPU: every register set KVM exposes for x86-64.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest sees (KVM_SET_CPUID2).
    pub cpuid: Vec<CpuidEntry>,
    /// KVM's mp_state (running, halted, …).
    pub mp_state: u32,
    /// General-purpose registers.
    pub regs: Regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: Sregs,
    /// KVM_GET_XSAVE region (legacy FPU/SSE area + extended state), 1024 words.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: Vec<Xcr>,
    /// The local APIC register page, 1024 bytes.
    pub lapic: Vec<u8>,
    /// The MSRs KVM saves (index and value).
    pub msrs: Vec<Msr>,
    /// Debug registers.
    pub debug_regs: DebugRegs,
    /// Pending events.
    pub events: VcpuEvents,
}

/// One CPUID leaf (`kvm_cpuid_entry2`, fields by its names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// The leaf (EAX in).
    pub function: u32,
    /// The subleaf (ECX in).
    pub index: u32,
    /// KVM_CPUID_FLAG_*.
    pub flags: u32,
    /// EAX out.
    pub eax: u32,
    /// EBX out.
    pub ebx: u32,
    /// ECX out.
    pub ecx: u32,
    /// EDX out.
    pub edx: u32,
}

/// `kvm_regs`: rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8–r15 in `gpr`, then rip and rflags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8–r15.
    pub gpr: [u64; 16],
    /// The instruction pointer.
    pub rip: u64,
    /// The flags.
    pub rflags: u64,
}

/// A segment register (`kvm_segment`, fields by its names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type (`type` in KVM).
    pub type_: u8,
    /// Present bit.
    pub present: u8,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operand size (D/B).
    pub db: u8,
    /// Code/data (1) or system (0).
    pub s: u8,
    /// 64-bit code segment.
    pub l: u8,
    /// Granularity.
    pub g: u8,
    /// Available bit.
    pub avl: u8,
    /// Unusable (a null selector).
    pub unusable: u8,
}

/// The GDT or IDT register (`kvm_dtable`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Base address.
    pub base: u64,
    /// Limit.
    pub limit: u16,
}

/// `kvm_sregs`: segments, descriptor tables, control registers, EFER, the APIC base and the pending-interrupt bitmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    /// cs, ds, es, fs, gs, ss, tr, ldt.
    pub segments: [Segment; 8],
    /// The GDT register.
    pub gdt: DescriptorTable,
    /// The IDT register.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2 (the last page-fault address).
    pub cr2: u64,
    /// CR3 (the page tables).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (the task priority).
    pub cr8: u64,
    /// The EFER MSR.
    pub efer: u64,
    /// The APIC base MSR.
    pub apic_base: u64,
    /// External interrupts pending injection.
    pub interrupt_bitmap: [u64; 4],
}

/// One extended control register (`kvm_xcr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xcr {
    /// Which register.
    pub xcr: u32,
    /// Its value.
    pub value: u64,
}

/// One MSR (`kvm_msr_entry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    /// The MSR.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// `kvm_debugregs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    /// DR0–DR3.
    pub db: [u64; 4],
    /// DR6.
    pub dr6: u64,
    /// DR7.
    pub dr7: u64,
    /// KVM's flags.
    pub flags: u64,
}

/// Pending exceptions, interrupts, NMIs and SMIs (KVM_GET_VCPU_EVENTS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    /// Injected, number, has an error code, pending.
    pub exception: [u8; 4],
    /// The exception's error code.
    pub exception_error_code: u32,
    /// Injected, number, soft, shadow.
    pub interrupt: [u8; 4],
    /// Injected, pending, masked.
    pub nmi: [u8; 3],
    /// The SIPI vector.
    pub sipi_vector: u32,
    /// KVM_VCPUEVENT_VALID_*.
    pub flags: u32,
    /// In SMM, pending, in SMM inside an NMI, latched INIT.
    pub smi: [u8; 4],
    /// A triple fault is pending.
    pub triple_fault_pending: u8,
    /// The exception carries a payload.
    pub exception_has_payload: u8,
    /// The payload (e.g. CR2 of a page fault).
    pub exception_payload: u64,
}

/// VM-wide in-kernel device state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The 8254.
    pub pit: PitState,
    /// The KVM clock.
    pub clock: ClockState,
    /// The master 8259.
    pub pic_master: PicState,
    /// The slave 8259.
    pub pic_slave: PicState,
    /// The IOAPIC.
    pub ioapic: IoapicState,
}

/// One channel of KVM's in-kernel 8254 (`kvm_pit_channel_state`, fields by its names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannel {
    /// The reload count.
    pub count: u32,
    /// The latched count.
    pub latched_count: u16,
    /// A count is latched.
    pub count_latched: u8,
    /// A status is latched.
    pub status_latched: u8,
    /// The latched status.
    pub status: u8,
    /// Which byte a read returns next.
    pub read_state: u8,
    /// Which byte a write sets next.
    pub write_state: u8,
    /// The first byte of a 16-bit write.
    pub write_latch: u8,
    /// The access mode.
    pub rw_mode: u8,
    /// The counter mode (0–5).
    pub mode: u8,
    /// BCD counting.
    pub bcd: u8,
    /// The gate input.
    pub gate: u8,
    /// When the count was loaded (host ns).
    pub count_load_time: i64,
}

/// KVM's in-kernel 8254 (`kvm_pit_state2`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Channels 0–2.
    pub channels: [PitChannel; 3],
    /// KVM_PIT_FLAGS_*.
    pub flags: u32,
}

/// KVM's clock (`kvm_clock_data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// The guest's kvmclock value (ns).
    pub clock: u64,
    /// KVM_CLOCK_*.
    pub flags: u32,
    /// Host realtime when saved (ns).
    pub realtime: u64,
    /// Host TSC when saved.
    pub host_tsc: u64,
}

/// One of KVM's in-kernel 8259s (`kvm_pic_state`, as bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    /// last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll,
    /// special_mask, init_state, auto_eoi, rotate_on_auto_eoi,
    /// special_fully_nested_mode, init4, elcr, elcr_mask.
    pub regs: [u8; 16],
}

/// KVM's in-kernel IOAPIC (`kvm_ioapic_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// Its MMIO base.
    pub base_address: u64,
    /// The register select.
    pub ioregsel: u32,
    /// Its id.
    pub id: u32,
    /// Interrupt request lines.
    pub irr: u32,
    /// The redirection table.
    pub redirection: [u64; 24],
}

// ---- encoding -------------------------------------------------------------

impl VmState {
    /// Encodes with header and checksum.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let payload = postcard::to_stdvec(self).map_err(StateError::Encode)?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes and validates an encoded state. Anything unknown is refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < HEADER_LEN {
            return Err(StateError::TruncatedHeader { len: bytes.len() });
        }
        let (header, payload) = bytes.split_at(HEADER_LEN);
        let field = |range: std::ops::Range<usize>| &header[range];
        let mut magic = [0u8; 8];
        magic.copy_from_slice(field(0..8));
        if magic != STATE_MAGIC {
            return Err(StateError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes(le4(field(8..12)));
        if !(OLDEST_READABLE_VERSION..=STATE_FORMAT_VERSION).contains(&version) {
            return Err(StateError::UnsupportedVersion { found: version });
        }
        let claimed = u64::from_le_bytes(le8(field(12..20)));
        if claimed > MAX_PAYLOAD || claimed != payload.len() as u64 {
            return Err(StateError::LengthMismatch {
                claimed,
                actual: payload.len() as u64,
            });
        }
        let stored = u32::from_le_bytes(le4(field(20..24)));
        let computed = crc32c::crc32c(payload);
        if stored != computed {
            return Err(StateError::Checksum { stored, computed });
        }
        let state: VmState = match version {
            1 => postcard::from_bytes::<v1::VmState>(payload)
                .map_err(StateError::Decode)?
                .into(),
            // Version 2 is version 3 without the trailing option (None).
            2 => {
                let mut v3 = payload.to_vec();
                v3.push(0);
                postcard::from_bytes(&v3).map_err(StateError::Decode)?
            }
            _ => postcard::from_bytes(payload).map_err(StateError::Decode)?,
        };
        state.validate()?;
        Ok(state)
    }

    /// Checks invariants that the encoding alone cannot express.
    pub fn validate(&self) -> Result<(), StateError> {
        let invalid = |field, reason: String| Err(StateError::Invalid { field, reason });
        if crate::memory::validate_ram_size(self.memory.size_bytes as usize).is_err() {
            return invalid("memory size", format!("{} bytes", self.memory.size_bytes));
        }
        if self.vcpu.xsave.len() != XSAVE_WORDS {
            return invalid(
                "xsave",
                format!("{} words, expected {XSAVE_WORDS}", self.vcpu.xsave.len()),
            );
        }
        if self.vcpu.lapic.len() != LAPIC_BYTES {
            return invalid(
                "lapic",
                format!("{} bytes, expected {LAPIC_BYTES}", self.vcpu.lapic.len()),
            );
        }
        if self.vcpu.xcrs.len() > MAX_XCRS {
            return invalid(
                "xcrs",
                format!("{} entries, at most {MAX_XCRS}", self.vcpu.xcrs.len()),
            );
        }
        if self.vcpu.cpuid.is_empty() || self.vcpu.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES
        {
            return invalid("cpuid", format!("{} entries", self.vcpu.cpuid.len()));
        }
        if self.vcpu.msrs.len() > kvm_bindings::KVM_MAX_MSR_ENTRIES {
            return invalid("msrs", format!("{} entries", self.vcpu.msrs.len()));
        }
        let serial = &self.devices.serial;
        if serial.pending_input.len() > MAX_PENDING_INPUT {
            return invalid(
                "serial pending input",
                format!(
                    "{} bytes, at most {MAX_PENDING_INPUT} are held",
                    serial.pending_input.len()
                ),
            );
        }
        if serial.input_total < (serial.pending_input.len() + serial.in_buffer.len()) as u64 {
            return invalid(
                "serial input count",
                format!(
                    "{} bytes taken, fewer than the {} queued",
                    serial.input_total,
                    serial.pending_input.len() + serial.in_buffer.len()
                ),
            );
        }
        if self.devices.serial.in_buffer.len() > SERIAL_FIFO_BYTES {
            return invalid(
                "serial FIFO",
                format!(
                    "{} bytes, the FIFO holds {SERIAL_FIFO_BYTES}",
                    self.devices.serial.in_buffer.len()
                ),
            );
        }
        Ok(())
    }
}

fn le4(b: &[u8]) -> [u8; 4] {
    let mut out = [0; 4];
    out.copy_from_slice(b);
    out
}

fn le8(b: &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    out.copy_from_slice(b);
    out
}

pub(crate) const XSAVE_WORDS: usize = 1024;
pub(crate) const LAPIC_BYTES: usize = 1024;
pub(crate) const MAX_XCRS: usize = 16;
/// vm-superio's receive FIFO size.
pub(crate) const SERIAL_FIFO_BYTES: usize = 64;
/// Console input the serial device holds beyond its FIFO at most: the vCPU
/// takes more from the console only below this, so a client that writes
/// faster than the guest reads is held back (its socket stops being read)
/// instead of growing every checkpoint. Chunks of up to 4 KiB arrive whole,
/// hence the slack.
pub const MAX_PENDING_INPUT: usize = 16 << 10;
/// Below this the vCPU takes the next chunk of console input.
pub const PENDING_INPUT_LOW: usize = 4 << 10;

// ---- conversions to and from KVM's structures --------------------------------

impl From<&kvm_regs> for Regs {
    fn from(r: &kvm_regs) -> Self {
        Self {
            gpr: [
                r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
                r.r12, r.r13, r.r14, r.r15,
            ],
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&Regs> for kvm_regs {
    fn from(r: &Regs) -> Self {
        let [
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
        ] = r.gpr;
        kvm_regs {
            rax,
            rbx,
            rcx,
            rdx,
            rsi,
            rdi,
            rsp,
            rbp,
            r8,
            r9,
            r10,
            r11,
            r12,
            r13,
            r14,
            r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

impl From<&kvm_segment> for Segment {
    fn from(s: &kvm_segment) -> Self {
        Self {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
        }
    }
}

impl From<&Segment> for kvm_segment {
    fn from(s: &Segment) -> Self {
        kvm_segment {
            base: s.base,
            limit: s.limit,
            selector: s.selector,
            type_: s.type_,
            present: s.present,
            dpl: s.dpl,
            db: s.db,
            s: s.s,
            l: s.l,
            g: s.g,
            avl: s.avl,
            unusable: s.unusable,
            padding: 0,
        }
    }
}

impl From<&kvm_sregs> for Sregs {
    fn from(s: &kvm_sregs) -> Self {
        let seg = |x: &kvm_segment| Segment::from(x);
        Self {
            segments: [
                seg(&s.cs),
                seg(&s.ds),
                seg(&s.es),
                seg(&s.fs),
                seg(&s.gs),
                seg(&s.ss),
                seg(&s.tr),
                seg(&s.ldt),
            ],
            gdt: DescriptorTable {
                base: s.gdt.base,
                limit: s.gdt.limit,
            },
            idt: DescriptorTable {
                base: s.idt.base,
                limit: s.idt.limit,
            },
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
        }
    }
}

impl From<&Sregs> for kvm_sregs {
    fn from(s: &Sregs) -> Self {
        let [cs, ds, es, fs, gs, ss, tr, ldt] = s.segments.map(|x| kvm_segment::from(&x));
        let mut out = kvm_sregs {
            cs,
            ds,
            es,
            fs,
            gs,
            ss,
            tr,
            ldt,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
            interrupt_bitmap: s.interrupt_bitmap,
            ..Default::default()
        };
        out.gdt.base = s.gdt.base;
        out.gdt.limit = s.gdt.limit;
        out.idt.base = s.idt.base;
        out.idt.limit = s.idt.limit;
        out
    }
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// The fixed 4 KiB legacy region of KVM_GET_XSAVE.
pub(crate) fn xsave_to_words(x: &kvm_xsave) -> Vec<u32> {
    x.region.to_vec()
}

pub(crate) fn words_to_xsave(words: &[u32]) -> kvm_xsave {
    let mut x = kvm_xsave::default();
    x.region.copy_from_slice(&words[..XSAVE_WORDS]);
    x
}

pub(crate) fn xcrs_to_vec(x: &kvm_xcrs) -> Vec<Xcr> {
    x.xcrs
        .iter()
        .take((x.nr_xcrs as usize).min(MAX_XCRS))
        .map(|e| Xcr {
            xcr: e.xcr,
            value: e.value,
        })
        .collect()
}

pub(crate) fn vec_to_xcrs(v: &[Xcr]) -> kvm_xcrs {
    let mut x = kvm_xcrs {
        nr_xcrs: v.len() as u32,
        ..Default::default()
    };
    for (dst, src) in x.xcrs.iter_mut().zip(v) {
        dst.xcr = src.xcr;
        dst.value = src.value;
    }
    x
}

pub(crate) fn lapic_to_bytes(l: &kvm_lapic_state) -> Vec<u8> {
    l.regs.iter().map(|b| *b as u8).collect()
}

pub(crate) fn bytes_to_lapic(b: &[u8]) -> kvm_lapic_state {
    let mut l = kvm_lapic_state::default();
    for (dst, src) in l.regs.iter_mut().zip(b) {
        *dst = *src as libc::c_char;
    }
    l
}

impl From<&kvm_debugregs> for DebugRegs {
    fn from(d: &kvm_debugregs) -> Self {
        Self {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
        }
    }
}

impl From<&DebugRegs> for kvm_debugregs {
    fn from(d: &DebugRegs) -> Self {
        kvm_debugregs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
            flags: d.flags,
            ..Default::default()
        }
    }
}

impl From<&kvm_vcpu_events> for VcpuEvents {
    fn from(e: &kvm_vcpu_events) -> Self {
        Self {
            exception: [
                e.exception.injected,
                e.exception.nr,
                e.exception.has_error_code,
                e.exception.pending,
            ],
            exception_error_code: e.exception.error_code,
            interrupt: [
                e.interrupt.injected,
                e.interrupt.nr,
                e.interrupt.soft,
                e.interrupt.shadow,
            ],
            nmi: [e.nmi.injected, e.nmi.pending, e.nmi.masked],
            sipi_vector: e.sipi_vector,
            flags: e.flags,
            smi: [
                e.smi.smm,
                e.smi.pending,
                e.smi.smm_inside_nmi,
                e.smi.latched_init,
            ],
            triple_fault_pending: e.triple_fault.pending,
            exception_has_payload: e.exception_has_payload,
            exception_payload: e.exception_payload,
        }
    }
}

impl From<&VcpuEvents> for kvm_vcpu_events {
    fn from(e: &VcpuEvents) -> Self {
        let mut out = kvm_vcpu_events::default();
        [
            out.exception.injected,
            out.exception.nr,
            out.exception.has_error_code,
            out.exception.pending,
        ] = e.exception;
        out.exception.error_code = e.exception_error_code;
        [
            out.interrupt.injected,
            out.interrupt.nr,
            out.interrupt.soft,
            out.interrupt.shadow,
        ] = e.interrupt;
        [out.nmi.injected, out.nmi.pending, out.nmi.masked] = e.nmi;
        out.sipi_vector = e.sipi_vector;
        out.flags = e.flags;
        [
            out.smi.smm,
            out.smi.pending,
            out.smi.smm_inside_nmi,
            out.smi.latched_init,
        ] = e.smi;
        out.triple_fault.pending = e.triple_fault_pending;
        out.exception_has_payload = e.exception_has_payload;
        out.exception_payload = e.exception_payload;
        out
    }
}

impl From<&kvm_pit_channel_state> for PitChannel {
    fn from(c: &kvm_pit_channel_state) -> Self {
        Self {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }
    }
}

impl From<&PitChannel> for kvm_pit_channel_state {
    fn from(c: &PitChannel) -> Self {
        kvm_pit_channel_state {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        }
    }
}

impl From<&kvm_pit_state2> for PitState {
    fn from(p: &kvm_pit_state2) -> Self {
        Self {
            channels: p.channels.each_ref().map(PitChannel::from),
            flags: p.flags,
        }
    }
}

impl From<&PitState> for kvm_pit_state2 {
    fn from(p: &PitState) -> Self {
        kvm_pit_state2 {
            channels: p.channels.each_ref().map(kvm_pit_channel_state::from),
            flags: p.flags,
            ..Default::default()
        }
    }
}

impl From<&kvm_clock_data> for ClockState {
    fn from(c: &kvm_clock_data) -> Self {
        Self {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
        }
    }
}

impl From<&ClockState> for kvm_clock_data {
    fn from(c: &ClockState) -> Self {
        kvm_clock_data {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
            ..Default::default()
        }
    }
}

impl From<&kvm_pic_state> for PicState {
    fn from(p: &kvm_pic_state) -> Self {
        Self {
            regs: [
                p.last_irr,
                p.irr,
                p.imr,
                p.isr,
                p.priority_add,
                p.irq_base,
                p.read_reg_select,
                p.poll,
                p.special_mask,
                p.init_state,
                p.auto_eoi,
                p.rotate_on_auto_eoi,
                p.special_fully_nested_mode,
                p.init4,
                p.elcr,
                p.elcr_mask,
            ],
        }
    }
}

impl From<&PicState> for kvm_pic_state {
    fn from(p: &PicState) -> Self {
        let [
            last_irr,
            irr,
            imr,
            isr,
            priority_add,
            irq_base,
            read_reg_select,
            poll,
            special_mask,
            init_state,
            auto_eoi,
            rotate_on_auto_eoi,
            special_fully_nested_mode,
            init4,
            elcr,
            elcr_mask,
        ] = p.regs;
        kvm_pic_state {
            last_irr,
            irr,
            imr,
            isr,
            priority_add,
            irq_base,
            read_reg_select,
            poll,
            special_mask,
            init_state,
            auto_eoi,
            rotate_on_auto_eoi,
            special_fully_nested_mode,
            init4,
            elcr,
            elcr_mask,
        }
    }
}

impl From<&kvm_ioapic_state> for IoapicState {
    fn from(s: &kvm_ioapic_state) -> Self {
        Self {
            base_address: s.base_address,
            ioregsel: s.ioregsel,
            id: s.id,
            irr: s.irr,
            // SAFETY: every variant of the redirection-entry union is plain
            // integers of the same 8 bytes; reading `bits` is always valid.
            redirection: s.redirtbl.each_ref().map(|e| unsafe { e.bits }),
        }
    }
}

impl From<&IoapicState> for kvm_ioapic_state {
    fn from(s: &IoapicState) -> Self {
        let mut out = kvm_ioapic_state {
            base_address: s.base_address,
            ioregsel: s.ioregsel,
            id: s.id,
            irr: s.irr,
            ..Default::default()
        };
        for (dst, bits) in out.redirtbl.iter_mut().zip(s.redirection) {
            dst.bits = bits;
        }
        out
    }
}

pub(crate) fn mp_state(m: kvm_mp_state) -> u32 {
    m.mp_state
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A state with every field non-default, for round trips.
    pub(crate) fn sample_state() -> VmState {
        VmState {
            memory: MemoryState {
                size_bytes: 64 << 20,
                crc32c: Some(0xdead_beef),
            },
            boot: Some(BuiltinBoot::counter(10)),
            vcpu: VcpuState {
                cpuid: vec![CpuidEntry {
                    function: 1,
                    index: 0,
                    flags: 0,
                    eax: 2,
                    ebx: 3,
                    ecx: 4,
                    edx: 5,
                }],
                mp_state: 0,
                regs: Regs {
                    gpr: std::array::from_fn(|i| i as u64 * 3),
                    rip: 0x10_0000,
                    rflags: 0x202,
                },
                sregs: Sregs {
                    cr0: 0x8001_0033,
                    efer: 0x500,
                    ..Default::default()
                },
                xsave: (0..XSAVE_WORDS as u32).collect(),
                xcrs: vec![Xcr { xcr: 0, value: 1 }],
                lapic: (0..LAPIC_BYTES).map(|i| i as u8).collect(),
                msrs: vec![Msr {
                    index: 0x10,
                    data: 99,
                }],
                debug_regs: DebugRegs {
                    dr7: 0x400,
                    ..Default::default()
                },
                events: VcpuEvents {
                    nmi: [0, 1, 0],
                    ..Default::default()
                },
            },
            kvm: KvmVmState {
                pit: PitState {
                    flags: 1,
                    ..Default::default()
                },
                clock: ClockState {
                    clock: 12345,
                    ..Default::default()
                },
                pic_master: PicState { regs: [1; 16] },
                pic_slave: PicState { regs: [2; 16] },
                ioapic: IoapicState {
                    redirection: [0x1_0000; 24],
                    ..Default::default()
                },
            },
            devices: DeviceStates {
                serial: SerialDeviceState {
                    baud_divisor_low: 12,
                    baud_divisor_high: 0,
                    interrupt_enable: 1,
                    interrupt_identification: 1,
                    line_control: 3,
                    line_status: 0x60,
                    modem_control: 8,
                    modem_status: 0xb0,
                    scratch: 0,
                    in_buffer: b"GET".to_vec(),
                    pending_input: b" k\n".to_vec(),
                    input_total: 6,
                },
            },
            deterministic: None,
        }
    }

    #[test]
    fn a_deterministic_state_round_trips() {
        let mut state = sample_state();
        let mut det = DeterministicState {
            exit_index: 123_456,
            events_after_exit: 2,
            ticks: 999,
            ..Default::default()
        };
        det.pics.master.base = 0x20;
        det.pit.divisor = 1193;
        state.deterministic = Some(det);
        let bytes = state.encode().unwrap();
        assert_eq!(VmState::decode(&bytes).unwrap(), state);
    }

    #[test]
    fn state_round_trips_through_encoding() {
        let state = sample_state();
        let bytes = state.encode().unwrap();
        assert_eq!(VmState::decode(&bytes).unwrap(), state);
    }

    #[test]
    fn a_version_1_state_is_read_with_its_queued_input_counted() {
        let state = sample_state();
        // Version 1 is version 2 without the trailing input counter.
        let mut payload = postcard::to_stdvec(&state).unwrap();
        payload.pop(); // no deterministic state (version 2 had none)
        payload.pop(); // the input counter (version 1 had none)
        let mut bytes = STATE_MAGIC.to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let decoded = VmState::decode(&bytes).unwrap();
        assert_eq!(decoded, state, "6 bytes queued = 6 taken");
    }

    #[test]
    fn every_single_byte_corruption_is_refused() {
        let bytes = sample_state().encode().unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                VmState::decode(&bad).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_magic_and_version_errors_are_specific() {
        let bytes = sample_state().encode().unwrap();
        assert!(matches!(
            VmState::decode(&bytes[..10]),
            Err(StateError::TruncatedHeader { len: 10 })
        ));
        assert!(matches!(
            VmState::decode(&bytes[..bytes.len() - 1]),
            Err(StateError::LengthMismatch { .. })
        ));
        let mut foreign = bytes.clone();
        foreign[..8].copy_from_slice(b"QEVM\0\0\0\0");
        assert!(matches!(
            VmState::decode(&foreign),
            Err(StateError::BadMagic { .. })
        ));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&4u32.to_le_bytes());
        let err = VmState::decode(&newer).unwrap_err();
        assert!(matches!(err, StateError::UnsupportedVersion { found: 4 }));
        assert!(err.to_string().contains("this build reads versions 1 to 3"));
    }

    #[test]
    fn well_formed_but_invalid_fields_are_refused() {
        let mut state = sample_state();
        state.vcpu.xsave.truncate(10);
        let err = VmState::decode(&state.encode().unwrap()).unwrap_err();
        assert!(
            matches!(err, StateError::Invalid { field: "xsave", .. }),
            "{err}"
        );
        let mut state = sample_state();
        state.devices.serial.in_buffer = vec![0; 65];
        assert!(VmState::decode(&state.encode().unwrap()).is_err());
    }

    #[test]
    fn kvm_conversions_round_trip() {
        let state = sample_state();
        let v = &state.vcpu;
        assert_eq!(Regs::from(&kvm_regs::from(&v.regs)), v.regs);
        assert_eq!(Sregs::from(&kvm_sregs::from(&v.sregs)), v.sregs);
        assert_eq!(
            VcpuEvents::from(&kvm_vcpu_events::from(&v.events)),
            v.events
        );
        assert_eq!(
            DebugRegs::from(&kvm_debugregs::from(&v.debug_regs)),
            v.debug_regs
        );
        assert_eq!(xsave_to_words(&words_to_xsave(&v.xsave)), v.xsave);
        assert_eq!(xcrs_to_vec(&vec_to_xcrs(&v.xcrs)), v.xcrs);
        assert_eq!(lapic_to_bytes(&bytes_to_lapic(&v.lapic)), v.lapic);
        let k = &state.kvm;
        assert_eq!(PitState::from(&kvm_pit_state2::from(&k.pit)), k.pit);
        assert_eq!(ClockState::from(&kvm_clock_data::from(&k.clock)), k.clock);
        assert_eq!(
            PicState::from(&kvm_pic_state::from(&k.pic_master)),
            k.pic_master
        );
        assert_eq!(
            IoapicState::from(&kvm_ioapic_state::from(&k.ioapic)),
            k.ioapic
        );
        let e = v.cpuid[0];
        assert_eq!(CpuidEntry::from(&kvm_cpuid_entry2::from(&e)), e);
    }
}

//! understudy's KVM microVM.
//!
//! One vCPU in 64-bit mode, guest RAM mapped with memmap2 (anonymous or
//! file-backed), the in-kernel irqchip and PIT, an 8250 UART on COM1 and an
//! i8042 for resets. It can report exactly which guest pages changed
//! ([`Vm::harvest_dirty`]), stop briefly from another thread ([`Vm::pause`]),
//! capture all of its state ([`Vm::save_state`]) and bring that state back to
//! life in another process ([`Vm::restore`], [`snapshot`]).
//!
//! This crate is the only one that touches `/dev/kvm`. It knows nothing of
//! replication, networks or checkpoint formats.

pub mod arch;
pub mod deterministic;
pub mod devices;
pub mod dirty;
pub mod loader;
pub mod memory;
pub mod pic;
pub mod pit;
pub mod snapshot;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod wp;

pub use dirty::DirtyBitmap;
pub use loader::{BootEntry, BuiltinBoot, BuiltinGuest, Loader, RawCode};
pub use memory::{GuestRam, PAGE_SIZE, RamBacking, StagingBuffer};
pub use state::{Persist, VmState};
pub use vcpu::{ConsoleInput, EndWatch, InputRefused, VmEnd};
pub use vm::{BootOptions, Console, Vm, VmError, VmShell, open_kvm};

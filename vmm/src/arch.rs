//! x86-64 boot state: the flat GDT, identity page tables, the registers a guest
//! starts with in long mode, and the local APIC wiring for the legacy PIC.
//!
//! Only the initial state lives here; saving and restoring a running vCPU is
//! `state.rs`'s job.

use kvm_bindings::{kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};

use crate::memory::{GuestRam, MemoryError};

/// Guest-physical address of the GDT.
pub const GDT_GPA: u64 = 0x500;
/// PML4, then one PDPT, then four page directories (identity map of 4 GiB).
pub const PML4_GPA: u64 = 0x9000;
const PDPT_GPA: u64 = 0xa000;
const PD_GPA: u64 = 0xb000;
const PD_COUNT: u64 = 4;

const CODE_SELECTOR: u16 = 0x08;
const DATA_SELECTOR: u16 = 0x10;
const TSS_SELECTOR: u16 = 0x18;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;

/// Writes the GDT and the identity page tables into guest RAM.
///
/// Accessed and dirty bits are preset in every entry, so the CPU (or KVM's
/// shadow MMU) never writes to the page tables: a guest's dirty set is exactly
/// the pages its own code writes.
pub fn write_boot_tables(ram: &GuestRam) -> Result<(), MemoryError> {
    let gdt: [u64; 4] = [
        0,
        0x00af_9b00_0000_ffff, // 64-bit code, DPL 0
        0x00cf_9300_0000_ffff, // data, 4 GiB
        0x008f_8b00_0000_ffff, // busy 64-bit TSS (never used, but TR must be valid)
    ];
    ram.write_at(GDT_GPA, &words_to_bytes(&gdt))?;

    let table = PTE_PRESENT | PTE_WRITABLE | PTE_ACCESSED;
    ram.write_at(PML4_GPA, &(PDPT_GPA | table).to_le_bytes())?;
    let pdpt: Vec<u64> = (0..PD_COUNT)
        .map(|i| (PD_GPA + i * 0x1000) | table)
        .collect();
    ram.write_at(PDPT_GPA, &words_to_bytes(&pdpt))?;
    let pds: Vec<u64> = (0..PD_COUNT * 512)
        .map(|i| (i << 21) | table | PTE_DIRTY | PTE_HUGE)
        .collect();
    ram.write_at(PD_GPA, &words_to_bytes(&pds))
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` into 64-bit long mode with paging on the boot page tables.
pub fn set_long_mode(sregs: &mut kvm_sregs) {
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        s: 0,
        db: 0,
        type_: 0xb,
        ..segment(TSS_SELECTOR, 0xb, false)
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE;
    // Set explicitly: a fresh vCPU starts with CD|NW set.
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers at entry.
pub fn entry_regs(rip: u64, rsp: u64) -> kvm_regs {
    kvm_regs {
        rip,
        rsp,
        rflags: 0x2, // reserved bit 1; interrupts off
        ..Default::default()
    }
}

const APIC_SVR: usize = 0xf0;
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;
const APIC_LVT_MASKED: u32 = 1 << 16;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as libc::c_char;
    }
}

/// Puts the local APIC in "virtual wire" mode, as a PC BIOS leaves it: software
/// enabled, LINT0 delivers the 8259 PIC's interrupts (ExtINT), LINT1 NMIs.
pub fn set_virtual_wire(lapic: &mut kvm_lapic_state) {
    let svr = lapic_reg(lapic, APIC_SVR);
    set_lapic_reg(lapic, APIC_SVR, svr | 0x100 | 0xff);
    let with_mode = |lvt: u32, mode: u32| (lvt & !(0x700 | APIC_LVT_MASKED)) | (mode << 8);
    let lint0 = lapic_reg(lapic, APIC_LVT_LINT0);
    set_lapic_reg(lapic, APIC_LVT_LINT0, with_mode(lint0, APIC_MODE_EXTINT));
    let lint1 = lapic_reg(lapic, APIC_LVT_LINT1);
    set_lapic_reg(lapic, APIC_LVT_LINT1, with_mode(lint1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MIN_RAM_BYTES, RamBacking};

    #[test]
    fn page_tables_identity_map_with_preset_accessed_dirty_bits() {
        let ram = GuestRam::new(MIN_RAM_BYTES, RamBacking::Anonymous).unwrap();
        write_boot_tables(&ram).unwrap();
        assert_eq!(ram.read_u64(PML4_GPA).unwrap(), PDPT_GPA | 0x23);
        assert_eq!(
            ram.read_u64(PDPT_GPA + 8 * 3).unwrap(),
            (PD_GPA + 0x3000) | 0x23
        );
        // The PDE for 2 GiB + 2 MiB maps exactly that address.
        let pde = ram.read_u64(PD_GPA + 8 * (1024 + 1)).unwrap();
        assert_eq!(pde & !0xfff, (2 << 30) + (2 << 20));
        assert_eq!(pde & 0xfff, 0xe3);
    }

    #[test]
    fn virtual_wire_unmasks_lint0_as_extint() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, APIC_LVT_MASKED);
        set_virtual_wire(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x400);
        assert_eq!(lapic_reg(&lapic, APIC_SVR) & 0x1ff, 0x1ff);
    }
}

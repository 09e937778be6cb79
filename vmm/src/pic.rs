//! The 8259A interrupt controller pair (master at 0x20, slave at 0xa0,
//! cascaded on IRQ 2), modelled in userspace for the deterministic mode: the
//! VMM, not KVM, decides when an interrupt reaches the guest, so a recorded
//! run can place every interrupt at an exact exit and a replay can put it
//! there again.
//!
//! What the model covers is what x86 firmware and our guests use: the
//! ICW1–ICW4 initialisation sequence, the mask register (OCW1), non-specific
//! and specific EOI (OCW2), reading IRR or ISR (OCW3), edge-triggered lines,
//! fixed priority (IRQ 0 highest), cascade through IRQ 2, and auto-EOI.
//! Special mask mode, rotation and level triggering are not modelled (a
//! guest that asks for them is told nothing; the writes are ignored).
//!
//! It knows nothing of KVM: when the guest can take an interrupt, the vCPU
//! thread asks [`Pics::pending_vector`] and takes it with
//! [`Pics::acknowledge`].

use serde::{Deserialize, Serialize};

/// One 8259A.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pic {
    /// Interrupt request register (edges seen, not yet acknowledged).
    pub irr: u8,
    /// In-service register.
    pub isr: u8,
    /// Interrupt mask register.
    pub imr: u8,
    /// Vector of IRQ 0 (ICW2).
    pub base: u8,
    /// Which ICW comes next (0: none; 2, 3 or 4).
    pub init_step: u8,
    /// ICW1 asked for an ICW4.
    pub needs_icw4: bool,
    /// ICW1 said single (no cascade, no ICW3).
    pub single: bool,
    /// ICW4 auto-EOI.
    pub auto_eoi: bool,
    /// OCW3: a read of the command port returns ISR (else IRR).
    pub read_isr: bool,
}

impl Pic {
    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1: start of initialisation.
            *self = Self {
                base: self.base,
                init_step: 2,
                needs_icw4: value & 0x01 != 0,
                single: value & 0x02 != 0,
                ..Self::default()
            };
        } else if value & 0x08 != 0 {
            // OCW3.
            match value & 0x03 {
                0x02 => self.read_isr = false,
                0x03 => self.read_isr = true,
                _ => {}
            }
        } else {
            // OCW2.
            match value >> 5 {
                // Non-specific EOI: the highest-priority bit in service.
                0b001 if self.isr != 0 => self.isr &= self.isr - 1,
                // Specific EOI.
                0b011 => self.isr &= !(1 << (value & 0x07)),
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            2 => {
                self.base = value & 0xf8;
                self.init_step = if self.single {
                    if self.needs_icw4 { 4 } else { 0 }
                } else {
                    3
                };
            }
            3 => self.init_step = if self.needs_icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = value & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    fn read_command(&self) -> u8 {
        if self.read_isr { self.isr } else { self.irr }
    }

    /// The highest-priority request this chip would raise now, if any (an
    /// unmasked request above everything in service).
    fn pending(&self) -> Option<u8> {
        let requests = self.irr & !self.imr;
        if requests == 0 {
            return None;
        }
        let irq = requests.trailing_zeros() as u8;
        // Fixed priority: a request at or below an in-service level waits.
        let in_service = if self.isr == 0 {
            8
        } else {
            self.isr.trailing_zeros() as u8
        };
        (irq < in_service).then_some(irq)
    }

    fn acknowledge(&mut self, irq: u8) {
        self.irr &= !(1 << irq);
        if !self.auto_eoi {
            self.isr |= 1 << irq;
        }
    }
}

/// The cascaded pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pics {
    /// IRQs 0–7; the slave cascades on IRQ 2.
    pub master: Pic,
    /// IRQs 8–15.
    pub slave: Pic,
}

/// The master's command port.
pub const MASTER_COMMAND: u16 = 0x20;
/// The master's data port.
pub const MASTER_DATA: u16 = 0x21;
/// The slave's command port.
pub const SLAVE_COMMAND: u16 = 0xa0;
/// The slave's data port.
pub const SLAVE_DATA: u16 = 0xa1;

impl Pics {
    /// Handles an `out` to one of the four ports; false if the port is not ours.
    pub fn write(&mut self, port: u16, value: u8) -> bool {
        match port {
            MASTER_COMMAND => self.master.write_command(value),
            MASTER_DATA => self.master.write_data(value),
            SLAVE_COMMAND => self.slave.write_command(value),
            SLAVE_DATA => self.slave.write_data(value),
            _ => return false,
        }
        true
    }

    /// Handles an `in`; None if the port is not ours.
    pub fn read(&self, port: u16) -> Option<u8> {
        Some(match port {
            MASTER_COMMAND => self.master.read_command(),
            MASTER_DATA => self.master.imr,
            SLAVE_COMMAND => self.slave.read_command(),
            SLAVE_DATA => self.slave.imr,
            _ => return None,
        })
    }

    /// An edge on line `irq` (0–15).
    pub fn raise(&mut self, irq: u8) {
        if irq < 8 {
            self.master.irr |= 1 << irq;
        } else if irq < 16 {
            self.slave.irr |= 1 << (irq - 8);
        }
    }

    /// The master as the CPU sees it: a slave request shows on IRQ 2.
    fn master_view(&self) -> Pic {
        let mut m = self.master;
        if !m.single && self.slave.pending().is_some() {
            m.irr |= 1 << 2;
        }
        m
    }

    /// The vector the pair would deliver now, if any.
    pub fn pending_vector(&self) -> Option<u8> {
        let m = self.master_view();
        match m.pending()? {
            2 if !m.single => Some(self.slave.base.wrapping_add(self.slave.pending()?)),
            irq => Some(m.base.wrapping_add(irq)),
        }
    }

    /// Delivers the pending interrupt (the guest's INTA cycle): returns its
    /// vector and moves it to service.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let m = self.master_view();
        match m.pending()? {
            2 if !m.single => {
                let irq = self.slave.pending()?;
                self.slave.acknowledge(irq);
                self.master.acknowledge(2);
                Some(self.slave.base.wrapping_add(irq))
            }
            irq => {
                self.master.acknowledge(irq);
                Some(self.master.base.wrapping_add(irq))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `guests/lib.c` does in `irq_init(1 << 0 | 1 << 4)`.
    fn as_the_guests_set_it_up() -> Pics {
        let mut p = Pics::default();
        for (port, value) in [
            (0x20, 0x11),
            (0xa0, 0x11),
            (0x21, 0x20),
            (0xa1, 0x28),
            (0x21, 0x04),
            (0xa1, 0x02),
            (0x21, 0x01),
            (0xa1, 0x01),
            (0x21, !0x11u8),
            (0xa1, 0xff),
        ] {
            assert!(p.write(port, value));
        }
        p
    }

    #[test]
    fn the_guests_setup_delivers_the_timer_then_the_uart_by_priority() {
        let mut p = as_the_guests_set_it_up();
        assert_eq!(p.master.base, 0x20);
        assert_eq!(p.slave.base, 0x28);
        assert_eq!(p.read(0x21), Some(!0x11u8));
        assert_eq!(p.pending_vector(), None);
        p.raise(4);
        p.raise(0);
        p.raise(1); // masked
        assert_eq!(p.acknowledge(), Some(0x20), "IRQ 0 first");
        // IRQ 4 waits while IRQ 0 is in service.
        assert_eq!(p.pending_vector(), None);
        p.write(0x20, 0x20); // EOI
        assert_eq!(p.acknowledge(), Some(0x24));
        p.write(0x20, 0x20);
        assert_eq!(p.acknowledge(), None);
        assert_eq!(p.master.isr, 0);
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_edges_coalesce() {
        let mut p = as_the_guests_set_it_up();
        p.raise(0);
        p.raise(0);
        p.write(0x20, 0x0a);
        assert_eq!(p.read(0x20), Some(0x01));
        p.acknowledge();
        p.write(0x20, 0x0b);
        assert_eq!(p.read(0x20), Some(0x01), "in service");
        assert_eq!(p.pending_vector(), None, "two edges, one request");
    }

    #[test]
    fn slave_requests_come_through_the_cascade() {
        let mut p = as_the_guests_set_it_up();
        p.write(0x21, 0x00);
        p.write(0xa1, 0x00);
        p.raise(12);
        assert_eq!(p.acknowledge(), Some(0x2c));
        assert_eq!(p.slave.isr, 1 << 4);
        assert_eq!(p.master.isr, 1 << 2);
        p.write(0xa0, 0x20);
        p.write(0x20, 0x20);
        assert_eq!((p.slave.isr, p.master.isr), (0, 0));
    }
}

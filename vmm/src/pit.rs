//! The 8254 timer's channel 0 (ports 0x40–0x43), modelled in userspace for
//! the deterministic mode: it records how the guest programmed it (mode and
//! divisor, hence the tick period) and nothing else. When ticks happen is the
//! VMM's decision (virtual time: wall-clock ticks while recording, logged
//! ticks while replaying), so the counter the guest could read back is not
//! modelled: a read returns 0, the same in every run. Channels 1 and 2 and
//! the speaker gate (port 0x61) read as 0 and ignore writes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The PIT's input clock.
pub const PIT_HZ: u64 = 1_193_182;

/// Channel 0 as programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pit {
    /// Operating mode (bits 3..1 of the command byte).
    pub mode: u8,
    /// Reload value (0 means 65536).
    pub divisor: u16,
    /// Access mode (bits 5..4): 1 low byte, 2 high byte, 3 low then high.
    pub access: u8,
    /// In low/high access: the low byte came, the high byte is next.
    pub high_next: bool,
    /// A full divisor was written: the channel runs.
    pub running: bool,
}

/// The ports the model answers.
pub fn is_pit_port(port: u16) -> bool {
    (0x40..=0x43).contains(&port) || port == 0x61
}

impl Pit {
    /// Handles an `out`.
    pub fn write(&mut self, port: u16, value: u8) {
        match port {
            0x43 => {
                let channel = value >> 6;
                let access = (value >> 4) & 0x03;
                // Only channel 0 is modelled; a latch command (access 0) is
                // a read request, answered with 0.
                if channel == 0 && access != 0 {
                    self.access = access;
                    self.mode = (value >> 1) & 0x07;
                    self.high_next = false;
                    self.running = false;
                }
            }
            0x40 => match self.access {
                1 => {
                    self.divisor = u16::from(value);
                    self.running = true;
                }
                2 => {
                    self.divisor = u16::from(value) << 8;
                    self.running = true;
                }
                3 if !self.high_next => {
                    self.divisor = (self.divisor & 0xff00) | u16::from(value);
                    self.high_next = true;
                }
                3 => {
                    self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8);
                    self.high_next = false;
                    self.running = true;
                }
                _ => {}
            },
            _ => {}
        }
    }

    /// Handles an `in`: the count is not modelled (see the module doc).
    pub fn read(&self, _port: u16) -> u8 {
        0
    }

    /// The time between IRQ 0 ticks, once the guest started the channel in
    /// a periodic mode (2 or 3).
    pub fn period(&self) -> Option<Duration> {
        if !self.running || !matches!(self.mode, 2 | 3 | 6 | 7) {
            return None;
        }
        let divisor = if self.divisor == 0 {
            65_536
        } else {
            u64::from(self.divisor)
        };
        Some(Duration::from_nanos(divisor * 1_000_000_000 / PIT_HZ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_one_kilohertz_setup_gives_a_one_millisecond_period() {
        let mut pit = Pit::default();
        assert_eq!(pit.period(), None);
        let divisor = (PIT_HZ / 1000) as u16;
        pit.write(0x43, 0x34);
        pit.write(0x40, (divisor & 0xff) as u8);
        assert_eq!(pit.period(), None, "half a divisor does not start it");
        pit.write(0x40, (divisor >> 8) as u8);
        let period = pit.period().unwrap();
        assert!(
            (999_000..=1_001_000).contains(&period.as_nanos()),
            "{period:?}"
        );
        assert_eq!(pit.read(0x40), 0);
        // A one-shot mode ticks no period.
        pit.write(0x43, 0x30);
        pit.write(0x40, 1);
        pit.write(0x40, 0);
        assert_eq!(pit.period(), None);
    }
}

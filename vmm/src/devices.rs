//! Port-I/O devices: the 8250 UART on COM1 (vm-superio) wired to IRQ 4, and the
//! i8042 controller (vm-superio), which turns the guest's reset command into a
//! clean end of the VM.
//!
//! All device state is owned by the vCPU thread: console input reaches the UART
//! through that thread (see `vcpu.rs`), so a paused VM's devices never change
//! and a captured state is a single instant. Console output leaves through a
//! channel the caller owns; this module does not decide when output is
//! released (the primary's output commit does).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::Sender;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::state::{Persist, SERIAL_FIFO_BYTES, SerialDeviceState, StateError};

/// COM1's port range.
pub const COM1_BASE: u16 = 0x3f8;
const COM1_LEN: u16 = 8;
/// COM1's interrupt line (GSI).
pub const COM1_IRQ: u32 = 4;
const I8042_BASE: u16 = 0x60;
const I8042_LEN: u16 = 5;

/// An interrupt line: through a KVM irqfd to the in-kernel irqchip, or (the
/// deterministic mode) a flag the vCPU thread hands to its userspace PIC at
/// the next exit.
#[derive(Debug)]
pub enum IrqLine {
    /// KVM's in-kernel irqchip: an irqfd.
    Kvm(EventFd),
    /// The deterministic mode: a flag the vCPU thread reads at its next exit.
    Flag(Arc<AtomicBool>),
}

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        match self {
            Self::Kvm(evt) => evt.write(1),
            Self::Flag(flag) => {
                flag.store(true, Ordering::Release);
                Ok(())
            }
        }
    }
}

/// Set when the guest asks the i8042 to reset the CPU.
#[derive(Clone, Debug, Default)]
pub struct ResetRequest(Arc<AtomicBool>);

impl ResetRequest {
    /// The guest asked for a reset.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl Trigger for ResetRequest {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// Where console output goes: one channel message per guest write, and
/// the count of bytes written (the deterministic mode tells a replication
/// peer how much output a log segment covers).
#[derive(Clone, Debug)]
pub struct ConsoleWriter {
    tx: Sender<u8>,
    written: u64,
}

impl ConsoleWriter {
    /// A writer into `tx` (the console's output channel).
    pub fn new(tx: Sender<u8>) -> Self {
        Self { tx, written: 0 }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A dropped receiver means nobody listens; the guest carries on.
        for &byte in buf {
            let _ = self.tx.send(byte);
        }
        self.written += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The COM1 UART plus console input that did not fit its 64-byte FIFO yet,
/// and the count of input bytes taken since boot (the console's input
/// offset, saved with the device).
pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, ConsoleWriter>,
    pending_input: VecDeque<u8>,
    input_total: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("pending_input", &self.pending_input.len())
            .finish()
    }
}

impl SerialDevice {
    /// A UART raising `irq`, writing to `out`.
    pub fn new(irq: IrqLine, out: ConsoleWriter) -> Self {
        Self {
            uart: Serial::new(irq, out),
            pending_input: VecDeque::new(),
            input_total: 0,
        }
    }

    /// Queues console input for the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        self.pending_input.extend(bytes);
        self.input_total += bytes.len() as u64;
        self.refill_fifo();
    }

    /// Whether the device has room for more console input (the vCPU takes
    /// the next chunk only then: back-pressure to the console's clients).
    pub fn wants_input(&self) -> bool {
        self.pending_input.len() < crate::state::PENDING_INPUT_LOW
    }

    /// Console input bytes taken since boot.
    pub fn input_total(&self) -> u64 {
        self.input_total
    }

    /// Console output bytes this device wrote since it was created (boot or
    /// restore).
    pub fn output_total(&self) -> u64 {
        self.uart.writer().written
    }

    fn refill_fifo(&mut self) {
        let n = self.uart.fifo_capacity().min(self.pending_input.len());
        if n == 0 {
            return;
        }
        let chunk: Vec<u8> = self.pending_input.drain(..n).collect();
        if let Err(err) = self.uart.enqueue_raw_bytes(&chunk) {
            tracing::warn!(?err, "serial: cannot raise the receive interrupt");
        }
    }

    fn read(&mut self, offset: u8) -> u8 {
        let value = self.uart.read(offset);
        if offset == 0 {
            self.refill_fifo();
        }
        value
    }

    fn write(&mut self, offset: u8, value: u8) {
        if let Err(err) = self.uart.write(offset, value) {
            tracing::warn!(?err, "serial: write failed");
        }
    }
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type RestoreArgs = (IrqLine, ConsoleWriter);
    type Error = StateError;

    fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            pending_input: self.pending_input.iter().copied().collect(),
            input_total: self.input_total,
        }
    }

    fn restore(
        (irq, out): (IrqLine, ConsoleWriter),
        state: &SerialDeviceState,
    ) -> Result<Self, StateError> {
        if state.in_buffer.len() > SERIAL_FIFO_BYTES {
            return Err(StateError::Invalid {
                field: "serial FIFO",
                reason: format!("{} bytes", state.in_buffer.len()),
            });
        }
        let uart_state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&uart_state, irq, NoEvents, out).map_err(|e| {
            StateError::Invalid {
                field: "serial",
                reason: format!("{e:?}"),
            }
        })?;
        Ok(Self {
            uart,
            pending_input: state.pending_input.iter().copied().collect(),
            input_total: state.input_total,
        })
    }
}

/// The legacy interrupt controller and timer the deterministic mode models
/// in userspace (the kernel mode has KVM's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Legacy {
    /// The master and slave 8259s.
    pub pics: crate::pic::Pics,
    /// The 8254 timer.
    pub pit: crate::pit::Pit,
}

/// The devices on the port-I/O bus.
#[derive(Debug)]
pub struct PortIoBus {
    /// COM1.
    pub serial: SerialDevice,
    i8042: I8042Device<ResetRequest>,
    reset: ResetRequest,
    /// The deterministic mode's PIC pair and PIT.
    pub legacy: Option<Legacy>,
}

impl PortIoBus {
    /// The bus with `serial` on COM1 and the i8042.
    pub fn new(serial: SerialDevice) -> Self {
        let reset = ResetRequest::default();
        Self {
            serial,
            i8042: I8042Device::new(reset.clone()),
            reset,
            legacy: None,
        }
    }

    /// A bus with userspace PIC and PIT (the deterministic mode).
    pub fn with_legacy(serial: SerialDevice, legacy: Legacy) -> Self {
        Self {
            legacy: Some(legacy),
            ..Self::new(serial)
        }
    }

    /// Whether the guest asked for a reset (the VM should end).
    pub fn reset_requested(&self) -> bool {
        self.reset.is_set()
    }

    /// Handles an `in` instruction. Unclaimed ports read as all ones, as on a PC.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let legacy = self.legacy.as_ref().and_then(|l| match port {
            p if crate::pit::is_pit_port(p) => Some(l.pit.read(p)),
            p => l.pics.read(p),
        });
        let value = if let Some(offset) = offset_in(port, COM1_BASE, COM1_LEN) {
            self.serial.read(offset)
        } else if let Some(value) = legacy {
            value
        } else if let Some(offset) = offset_in(port, I8042_BASE, I8042_LEN) {
            self.i8042.read(offset)
        } else {
            0xff
        };
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    /// Handles an `out` instruction. Writes to unclaimed ports are dropped.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if let Some(offset) = offset_in(port, COM1_BASE, COM1_LEN) {
            self.serial.write(offset, value);
        } else if let Some(legacy) = self.legacy.as_mut()
            && (crate::pit::is_pit_port(port) || legacy.pics.write(port, value))
        {
            if crate::pit::is_pit_port(port) {
                legacy.pit.write(port, value);
            }
        } else if let Some(offset) = offset_in(port, I8042_BASE, I8042_LEN) {
            // ResetRequest's trigger cannot fail.
            let _ = self.i8042.write(offset, value);
        }
    }
}

fn offset_in(port: u16, base: u16, len: u16) -> Option<u8> {
    (base..base + len)
        .contains(&port)
        .then(|| (port - base) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial() -> (SerialDevice, crossbeam_channel::Receiver<u8>, EventFd) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = IrqLine::Kvm(evt.try_clone().unwrap());
        (SerialDevice::new(irq, ConsoleWriter::new(tx)), rx, evt)
    }

    #[test]
    fn output_reaches_the_channel_and_reset_is_seen() {
        let (dev, rx, _evt) = serial();
        let mut bus = PortIoBus::new(dev);
        for b in b"hi\n" {
            bus.write(COM1_BASE, &[*b]);
        }
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), b"hi\n");
        bus.write(0x80, &[1]); // POST code port: ignored
        assert!(!bus.reset_requested());
        bus.write(0x64, &[0xfe]);
        assert!(bus.reset_requested());
    }

    #[test]
    fn input_beyond_the_fifo_waits_and_survives_save_restore() {
        let (mut dev, _rx, evt) = serial();
        dev.write(1, 0x01); // IER: received-data interrupt
        let input: Vec<u8> = (0..100u8).collect();
        dev.enqueue_input(&input);
        assert_eq!(evt.read().unwrap(), 1, "data-ready raised IRQ 4");
        let mut got = vec![dev.read(0)];
        let saved = dev.save();
        assert_eq!(saved.in_buffer.len() + saved.pending_input.len(), 99);
        assert_eq!(saved.input_total, 100, "every byte taken counts");

        let (tx, _rx2) = crossbeam_channel::unbounded();
        let evt2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored = SerialDevice::restore(
            (
                IrqLine::Kvm(evt2.try_clone().unwrap()),
                ConsoleWriter::new(tx),
            ),
            &saved,
        )
        .unwrap();
        while restored.read(5) & 1 == 1 {
            got.push(restored.read(0));
        }
        assert_eq!(got, input, "every input byte arrives once, in order");
    }
}

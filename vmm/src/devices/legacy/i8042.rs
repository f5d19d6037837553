//! Just enough of the i8042 keyboard controller for Linux: it answers the controller commands
//! the driver sends while probing (so "Can't read CTR" never happens) and turns the reset pulse
//! (command 0xFE on port 0x64, Linux's `reboot=k`) into a VM reset. No keyboard is attached.

use super::{PowerEvent, PowerEventSink};
use crate::bus::BusDevice;

/// Data port.
pub const DATA_PORT: u64 = 0x60;
/// Status/command port.
pub const COMMAND_PORT: u64 = 0x64;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
/// Set when the keyboard is not inhibited by the key lock.
const STATUS_UNLOCKED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_WRITE_KBD_BUF: u8 = 0xd2;
const CMD_WRITE_AUX_BUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;

/// The i8042 controller. Insert it at port 0x60 with length 5 (0x60..=0x64).
pub struct I8042 {
    ctr: u8,
    output: Option<u8>,
    status_command: bool,
    /// Command waiting for its data byte on port 0x60.
    pending: Option<u8>,
    events: PowerEventSink,
}

impl I8042 {
    /// A controller reporting resets to `events`.
    pub fn new(events: PowerEventSink) -> Self {
        Self {
            // Keyboard interrupt on, system flag, translation; aux disabled.
            ctr: 0x65,
            output: None,
            status_command: false,
            pending: None,
            events,
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status_command = true;
        match cmd {
            CMD_READ_CTR => self.output = Some(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT | CMD_WRITE_KBD_BUF | CMD_WRITE_AUX_BUF
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_SELF_TEST => self.output = Some(0x55),
            CMD_TEST_KBD => self.output = Some(0x00),
            // Non-zero: the aux port test failed, so Linux decides there is no mouse port.
            CMD_TEST_AUX => self.output = Some(0x01),
            CMD_PULSE_RESET => (self.events)(PowerEvent::Reset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.status_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            // Bit 0 of the output port is the CPU reset line (active low).
            Some(CMD_WRITE_OUTPUT) if value & 1 == 0 => (self.events)(PowerEvent::Reset),
            Some(CMD_WRITE_KBD_BUF) => self.output = Some(value),
            // No aux device: answer the loopback with something else so the port is not used.
            Some(CMD_WRITE_AUX_BUF) => self.output = Some(!value),
            // Bytes for the (absent) keyboard or mouse go nowhere.
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let value = match base + offset {
            DATA_PORT => self.output.take().unwrap_or(0),
            COMMAND_PORT => {
                let mut s = STATUS_SYSTEM | STATUS_UNLOCKED;
                if self.output.is_some() {
                    s |= STATUS_OBF;
                }
                if self.status_command {
                    s |= STATUS_COMMAND;
                }
                s
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match base + offset {
            DATA_PORT => self.data(value),
            COMMAND_PORT => self.command(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn dev() -> (I8042, mpsc::Receiver<PowerEvent>) {
        let (tx, rx) = mpsc::channel();
        let d = I8042::new(Box::new(move |e| {
            let _ = tx.send(e);
        }));
        (d, rx)
    }

    fn inb(d: &mut I8042, port: u64) -> u8 {
        let mut b = [0];
        d.read(DATA_PORT, port - DATA_PORT, &mut b);
        b[0]
    }

    fn outb(d: &mut I8042, port: u64, v: u8) {
        d.write(DATA_PORT, port - DATA_PORT, &[v]);
    }

    #[test]
    fn ctr_reads_back_what_was_written() {
        let (mut d, _rx) = dev();
        outb(&mut d, COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(inb(&mut d, COMMAND_PORT) & STATUS_OBF, STATUS_OBF);
        let ctr = inb(&mut d, DATA_PORT);
        assert_eq!(inb(&mut d, COMMAND_PORT) & STATUS_OBF, 0);
        outb(&mut d, COMMAND_PORT, CMD_WRITE_CTR);
        outb(&mut d, DATA_PORT, ctr ^ 0x01);
        outb(&mut d, COMMAND_PORT, CMD_READ_CTR);
        assert_eq!(inb(&mut d, DATA_PORT), ctr ^ 0x01);
    }

    #[test]
    fn reset_pulse_requests_a_reset() {
        let (mut d, rx) = dev();
        outb(&mut d, COMMAND_PORT, CMD_SELF_TEST);
        assert_eq!(inb(&mut d, DATA_PORT), 0x55);
        assert!(rx.try_recv().is_err());
        outb(&mut d, COMMAND_PORT, CMD_PULSE_RESET);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
    }
}

//! ACPI fixed-hardware power management: the PM1a event and control blocks the FADT points at.
//! Writing SLP_EN with the S5 sleep type (from the DSDT's `_S5`) powers the VM off; that is how
//! Linux's `poweroff` ends the VMM.

use super::{PowerEvent, PowerEventSink};
use crate::bus::BusDevice;

/// SLP_TYP value the DSDT declares for S5.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Length of the PM1a event block (status u16 + enable u16).
pub const PM1_EVT_LEN: u8 = 4;
/// Length of the PM1a control block.
pub const PM1_CNT_LEN: u8 = 2;

const SCI_EN: u16 = 1 << 0;
const SLP_EN: u16 = 1 << 13;

/// PM1a event + control registers. Insert the event block and control block as two ranges
/// (the device tells them apart by `base`).
pub struct AcpiPm {
    evt_base: u64,
    enable: u16,
    control: u16,
    events: PowerEventSink,
}

impl AcpiPm {
    /// Registers whose event block is at `evt_base`; power events go to `events`.
    pub fn new(evt_base: u64, events: PowerEventSink) -> Self {
        Self {
            evt_base,
            enable: 0,
            // No SMI handshake: the platform is in ACPI mode from the start.
            control: SCI_EN,
            events,
        }
    }
}

fn read_u16(value: u16, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
    }
}

fn write_u16(value: &mut u16, offset: u64, data: &[u8]) {
    let mut bytes = value.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(offset as usize + i) {
            *slot = *b;
        }
    }
    *value = u16::from_le_bytes(bytes);
}

impl BusDevice for AcpiPm {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == self.evt_base {
            // Status (offset 0) is always clear: no fixed events are ever raised.
            match offset {
                0 | 1 => read_u16(0, offset, data),
                _ => read_u16(self.enable, offset - 2, data),
            }
        } else {
            read_u16(self.control, offset, data);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if base == self.evt_base {
            if offset >= 2 {
                write_u16(&mut self.enable, offset - 2, data);
            }
            return;
        }
        let mut value = self.control;
        write_u16(&mut value, offset, data);
        let sleep_type = ((value >> 10) & 7) as u8;
        if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            (self.events)(PowerEvent::PowerOff);
        }
        // SLP_EN is write-only; SCI_EN stays set.
        self.control = (value & !SLP_EN) | SCI_EN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (tx, rx) = mpsc::channel();
        let mut pm = AcpiPm::new(
            0x600,
            Box::new(move |e| {
                let _ = tx.send(e);
            }),
        );
        let mut b = [0u8; 2];
        pm.read(0x604, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        let typ = (S5_SLEEP_TYPE as u16) << 10;
        pm.write(0x604, 0, &typ.to_le_bytes());
        assert!(rx.try_recv().is_err(), "SLP_TYP alone does nothing");
        pm.write(0x604, 0, &(typ | SLP_EN).to_le_bytes());
        assert_eq!(rx.try_recv(), Ok(PowerEvent::PowerOff));
        // Another sleep state (S3) is not supported and ignored.
        pm.write(0x604, 0, &((3u16 << 10) | SLP_EN).to_le_bytes());
        assert!(rx.try_recv().is_err());
    }
}

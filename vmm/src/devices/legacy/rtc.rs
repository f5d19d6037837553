//! CMOS RAM and the MC146818 real-time clock behind ports 0x70 (index) and 0x71 (data).
//! The clock registers read the host's current UTC time; writes to them are ignored.

use crate::bus::BusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// CMOS RAM with an RTC. Insert it at port 0x70 with length 2.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0u8; 128];
        // 32.768 kHz time base, no update in progress; 24-hour BCD; clock valid.
        ram[STATUS_A as usize] = 0x26;
        ram[STATUS_B as usize] = 0x02;
        ram[STATUS_D as usize] = 0x80;
        Self { index: 0, ram }
    }
}

fn bcd(v: i32) -> u8 {
    let v = v.rem_euclid(100) as u8;
    ((v / 10) << 4) | (v % 10)
}

fn utc_now() -> libc::tm {
    // SAFETY: an all-zero tm is a valid value for gmtime_r to overwrite.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: time(NULL) has no preconditions.
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    // SAFETY: both pointers are valid for the duration of the call.
    unsafe { libc::gmtime_r(&now, &mut tm) };
    tm
}

impl Cmos {
    fn read_reg(&self, index: u8) -> u8 {
        let tm = || utc_now();
        match index {
            SECONDS => bcd(tm().tm_sec),
            MINUTES => bcd(tm().tm_min),
            HOURS => bcd(tm().tm_hour),
            WEEKDAY => bcd(tm().tm_wday + 1),
            DAY => bcd(tm().tm_mday),
            MONTH => bcd(tm().tm_mon + 1),
            YEAR => bcd(tm().tm_year),
            CENTURY => bcd((tm().tm_year + 1900) / 100),
            // Reading status C acknowledges interrupts; none are raised.
            STATUS_C => 0,
            i => self.ram[(i & 0x7f) as usize],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0 => self.index,
            _ => self.read_reg(self.index),
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask, not part of the index.
            0 => self.index = value & 0x7f,
            _ => match self.index {
                SECONDS..=YEAR | STATUS_C | STATUS_D | CENTURY => {}
                i => self.ram[i as usize] = value,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, index: u8) -> u8 {
        c.write(0x70, 0, &[index | 0x80]);
        let mut b = [0];
        c.read(0x70, 1, &mut b);
        b[0]
    }

    #[test]
    fn clock_reads_the_current_year_in_bcd() {
        let mut c = Cmos::default();
        let year = utc_now().tm_year + 1900;
        let cen = read(&mut c, CENTURY);
        let yy = read(&mut c, YEAR);
        let from_bcd = |v: u8| i32::from((v >> 4) * 10 + (v & 0xf));
        let got = from_bcd(cen) * 100 + from_bcd(yy);
        assert_eq!(got, year);
        assert_eq!(read(&mut c, STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(read(&mut c, STATUS_D), 0x80, "battery good");
    }

    #[test]
    fn ram_keeps_writes() {
        let mut c = Cmos::default();
        c.write(0x70, 0, &[0x40]);
        c.write(0x70, 1, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
    }
}

//! The legacy PC devices a Linux kernel probes at boot: COM1, the i8042 reset line, the CMOS
//! clock, ACPI power management and the POST port. The PIC, IOAPIC and PIT are KVM's.

pub mod i8042;
pub mod pm;
pub mod rtc;
pub mod serial;

pub use i8042::I8042;
pub use pm::AcpiPm;
pub use rtc::Cmos;
pub use serial::Serial;

use crate::bus::BusDevice;

/// Port 0x80 (POST codes, also used by Linux as an I/O delay): writes are dropped.
pub struct PostPort;

impl BusDevice for PostPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// A guest request that ends or restarts the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// Power off (ACPI S5).
    PowerOff,
    /// Reset (i8042 pulse, ACPI reset register).
    Reset,
}

/// Where devices send [`PowerEvent`]s (the VM thread).
pub type PowerEventSink = Box<dyn Fn(PowerEvent) + Send>;

//! PCI: one root bus (segment 0, bus 0) with a host bridge at 00:00.0, configuration space
//! through the legacy type-1 mechanism (I/O ports 0xCF8 address, 0xCFC..0xCFF data), and
//! 32-bit memory BARs placed on the MMIO bus.
//!
//! Why PCI and not virtio-mmio: the guest is an unmodified Debian cloud kernel. Its virtio
//! drivers are modules, and it builds VIRTIO_MMIO as a module without
//! `VIRTIO_MMIO_CMDLINE_DEVICES`, so virtio-mmio devices could only be found through ACPI or a
//! device tree. virtio-pci (modern, virtio 1.x, MSI-X) is found by the generic PCI probe over
//! the type-1 ports, which Linux x86 uses without any firmware table, and the `virtio_pci`
//! module sits in every initramfs that carries virtio drivers. MSI-X lets every queue have its
//! own vector routed by KVM, so interrupts never pass through the VMM either.
//!
//! No ECAM: Linux only uses MMCONFIG when ACPI's MCFG table announces it, which this VMM does
//! not build; the extended configuration space (offsets >= 256) is not needed by virtio.

mod configuration;
pub mod msix;

pub use configuration::{
    BarMove, ConfigSpaceError, PciConfiguration, PciHeader, CONFIG_SPACE_SIZE, NUM_BARS,
};

use std::sync::{Arc, Mutex};

use crate::bus::{Bus, BusDevice};
use crate::interrupt::lock;

/// First I/O port of the type-1 configuration mechanism.
pub const PCI_CONFIG_IO_PORT: u64 = 0xCF8;
/// Ports 0xCF8..0xCFF.
pub const PCI_CONFIG_IO_PORT_SIZE: u64 = 8;
/// Devices (slots) on a bus.
pub const PCI_SLOTS: usize = 32;

/// A PCI function on the root bus.
pub trait PciDevice: Send {
    /// Read configuration space at `offset` (any size; offset < 256 for valid data).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Write configuration space. Returns BARs whose bus mapping must move; the device has
    /// already moved its own per-address resources (ioeventfds).
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove>;
    /// Read from BAR `bar` at `offset` from its base.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Write to BAR `bar` at `offset` from its base.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Current BAR mappings: (index, address, size).
    fn bars(&self) -> Vec<(usize, u64, u64)>;
}

/// Errors wiring PCI devices.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All 31 device slots are taken.
    #[error("no free PCI slot")]
    NoFreeSlot,
    /// The 32-bit BAR window is full.
    #[error("no room for a {0:#x}-byte BAR in the PCI MMIO window")]
    NoBarSpace(u64),
    /// Inserting a BAR on the MMIO bus failed.
    #[error("cannot map BAR at {0:#x}: {1}")]
    MapBar(u64, String),
    /// Inserting the configuration ports on the PIO bus failed.
    #[error("cannot register PCI configuration ports: {0}")]
    ConfigPorts(String),
    /// Building a configuration space failed.
    #[error(transparent)]
    ConfigSpace(#[from] ConfigSpaceError),
}

/// Hands out naturally aligned 32-bit BAR addresses from a window.
pub struct BarAllocator {
    next: u64,
    end: u64,
}

impl BarAllocator {
    /// Allocate from `start..end`.
    pub fn new(start: u64, end: u64) -> Self {
        BarAllocator { next: start, end }
    }

    /// A `size`-aligned range of `size` bytes (size a power of two).
    pub fn allocate(&mut self, size: u64) -> Result<u64, PciError> {
        let addr = self
            .next
            .checked_next_multiple_of(size)
            .filter(|a| a.checked_add(size).is_some_and(|end| end <= self.end))
            .ok_or(PciError::NoBarSpace(size))?;
        self.next = addr + size;
        Ok(addr)
    }
}

/// Forwards MMIO accesses of one BAR to its device.
struct PciBarAccess {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
}

impl BusDevice for PciBarAccess {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

struct PciSlot {
    device: Arc<Mutex<dyn PciDevice>>,
    bar_access: Vec<(usize, Arc<Mutex<PciBarAccess>>)>,
}

/// The root bus: slot 0 is the host bridge.
pub struct PciRoot {
    slots: Vec<Option<PciSlot>>,
    mmio_bus: Arc<Bus>,
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new(mmio_bus: Arc<Bus>) -> Self {
        let mut slots: Vec<Option<PciSlot>> = (0..PCI_SLOTS).map(|_| None).collect();
        slots[0] = Some(PciSlot {
            device: Arc::new(Mutex::new(HostBridge::new())),
            bar_access: Vec::new(),
        });
        PciRoot { slots, mmio_bus }
    }

    /// Put `device` in the first free slot and map its BARs; returns the slot number.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<usize, PciError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;
        let bars = lock(&device).bars();
        let mut bar_access = Vec::new();
        for (bar, addr, size) in bars {
            let access = Arc::new(Mutex::new(PciBarAccess {
                device: device.clone(),
                bar,
            }));
            self.mmio_bus
                .insert(access.clone(), addr, size)
                .map_err(|e| PciError::MapBar(addr, format!("{e:?}")))?;
            bar_access.push((bar, access));
        }
        self.slots[slot] = Some(PciSlot { device, bar_access });
        Ok(slot)
    }

    fn config_read(&self, slot: usize, function: usize, offset: usize, data: &mut [u8]) {
        match self.slots.get(slot) {
            Some(Some(s)) if function == 0 => lock(&s.device).config_read(offset, data),
            // No device: all-ones, which is how the guest learns the slot is empty.
            _ => data.fill(0xFF),
        }
    }

    fn config_write(&self, slot: usize, function: usize, offset: usize, data: &[u8]) {
        let Some(Some(s)) = self.slots.get(slot) else {
            return;
        };
        if function != 0 {
            return;
        }
        // The device lock is released before the bus is touched: vCPUs in MMIO handlers take
        // the bus first and the device second.
        let moves = lock(&s.device).config_write(offset, data);
        for m in moves {
            self.move_bar(s, m);
        }
    }

    fn move_bar(&self, slot: &PciSlot, m: BarMove) {
        let Some((_, access)) = slot.bar_access.iter().find(|(b, _)| *b == m.bar) else {
            return;
        };
        if let Err(e) = self.mmio_bus.remove(m.from) {
            log::warn!("PCI BAR move: cannot unmap {:#x}: {e:?}", m.from);
        }
        if let Err(e) = self.mmio_bus.insert(access.clone(), m.to, m.size) {
            log::warn!(
                "PCI BAR move to {:#x} refused ({e:?}); the BAR stays unreachable until moved again",
                m.to
            );
        } else {
            log::debug!("PCI BAR {} moved {:#x} -> {:#x}", m.bar, m.from, m.to);
        }
    }
}

/// The type-1 configuration mechanism on ports 0xCF8..0xCFF.
pub struct PciConfigIo {
    address: u32,
    root: Arc<PciRoot>,
}

/// Address register: enable bit.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    /// Serve configuration cycles of `root`.
    pub fn new(root: Arc<PciRoot>) -> Self {
        PciConfigIo { address: 0, root }
    }

    /// (bus, slot, function, register offset) of the current address, if enabled.
    fn target(&self, data_offset: u64) -> Option<(usize, usize, usize, usize)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bus = ((self.address >> 16) & 0xFF) as usize;
        let slot = ((self.address >> 11) & 0x1F) as usize;
        let function = ((self.address >> 8) & 0x7) as usize;
        let register = (self.address & 0xFC) as usize + data_offset as usize;
        Some((bus, slot, function, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            // The address register, possibly bytewise (Linux probes 0xCFB with a byte access).
            let bytes = self.address.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = bytes.get(offset as usize + i).copied().unwrap_or(0xFF);
            }
            return;
        }
        let data_offset = offset - 4;
        match self.target(data_offset) {
            Some((0, slot, function, register)) if data_offset + data.len() as u64 <= 4 => {
                self.root.config_read(slot, function, register, data)
            }
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 4 {
            let mut bytes = self.address.to_le_bytes();
            for (i, b) in data.iter().enumerate() {
                if let Some(dst) = bytes.get_mut(offset as usize + i) {
                    *dst = *b;
                }
            }
            self.address = u32::from_le_bytes(bytes);
            return;
        }
        let data_offset = offset - 4;
        if let Some((0, slot, function, register)) = self.target(data_offset) {
            if data_offset + data.len() as u64 <= 4 {
                self.root.config_write(slot, function, register, data);
            }
        }
    }
}

/// The host bridge at 00:00.0; Linux's type-1 probe wants to see one.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciHeader {
                // Intel's ID, like the bridges Linux's sanity check looks for; a made-up
                // device ID.
                vendor_id: 0x8086,
                device_id: 0x0d57,
                revision_id: 0,
                class_code: 0x06_00_00,
                header_type: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        self.config.write(offset, data)
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}

    fn bars(&self) -> Vec<(usize, u64, u64)> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with one BAR whose accesses are recorded.
    struct TestDevice {
        config: PciConfiguration,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl TestDevice {
        fn new(addr: u32) -> Self {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                revision_id: 1,
                class_code: 0x018000,
                header_type: 0,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x40,
            });
            config.add_mem32_bar(0, addr, 0x1000).unwrap();
            TestDevice {
                config,
                last_write: None,
            }
        }
    }

    impl PciDevice for TestDevice {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data)
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
            self.config.write(offset, data)
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn bars(&self) -> Vec<(usize, u64, u64)> {
            self.config
                .bar(0)
                .map(|(a, s)| vec![(0, a, s)])
                .unwrap_or_default()
        }
    }

    fn select(io: &mut PciConfigIo, slot: u32, reg: u32) {
        io.write(0xCF8, 0, &(0x8000_0000 | slot << 11 | reg).to_le_bytes());
    }

    fn read32(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
        select(io, slot, reg);
        let mut b = [0u8; 4];
        io.read(0xCF8, 4, &mut b);
        u32::from_le_bytes(b)
    }

    fn setup() -> (Arc<Bus>, Arc<Mutex<TestDevice>>, PciConfigIo) {
        let bus = Arc::new(Bus::new());
        let mut root = PciRoot::new(bus.clone());
        let dev = Arc::new(Mutex::new(TestDevice::new(0xC000_0000)));
        assert_eq!(root.add_device(dev.clone()).unwrap(), 1);
        (bus, dev, PciConfigIo::new(Arc::new(root)))
    }

    #[test]
    fn type1_probe_sees_host_bridge_and_device() {
        let (_bus, _dev, mut io) = setup();
        // Linux's check: the address register reads back what was written.
        io.write(0xCF8, 0, &0x8000_0000u32.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(0xCF8, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x8000_0000);
        // Byte write to 0xCFB must not disturb anything fatal.
        io.write(0xCF8, 3, &[0x01]);
        assert_eq!(read32(&mut io, 0, 0) & 0xFFFF, 0x8086);
        assert_eq!(read32(&mut io, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(read32(&mut io, 1, 0), 0x1042_1af4);
        assert_eq!(read32(&mut io, 2, 0), 0xFFFF_FFFF);
        // Function 1 and other buses are empty.
        io.write(0xCF8, 0, &(0x8000_0000u32 | 1 << 11 | 1 << 8).to_le_bytes());
        io.read(0xCF8, 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xFFFF_FFFF);
        io.write(0xCF8, 0, &(0x8001_0000u32).to_le_bytes());
        io.read(0xCF8, 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xFFFF_FFFF);
        // Disabled address: all-ones.
        io.write(0xCF8, 0, &0u32.to_le_bytes());
        io.read(0xCF8, 4, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0xFFFF_FFFF);
    }

    #[test]
    fn sub_dword_config_accesses_use_port_offset() {
        let (_bus, _dev, mut io) = setup();
        select(&mut io, 1, 0);
        let mut w = [0u8; 2];
        io.read(0xCF8, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x1042);
        let mut byte = [0u8; 1];
        io.read(0xCF8, 5, &mut byte);
        assert_eq!(byte[0], 0x1a);
        // Straddling the data window is refused, not a panic.
        let mut wide = [0u8; 4];
        io.read(0xCF8, 6, &mut wide);
        assert_eq!(wide, [0xFF; 4]);
        io.write(0xCF8, 7, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_reprogramming_moves_the_bus_mapping() {
        let (bus, dev, mut io) = setup();
        let mut b = [0u8; 1];
        assert!(bus.read(0xC000_0010, &mut b));
        assert_eq!(b[0], 0x10);
        // Sizing does not move the mapping.
        select(&mut io, 1, 0x10);
        io.write(0xCF8, 4, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&mut io, 1, 0x10), 0xFFFF_F000);
        assert!(bus.read(0xC000_0010, &mut b));
        select(&mut io, 1, 0x10);
        io.write(0xCF8, 4, &0xC000_0000u32.to_le_bytes());
        // Reprogramming does.
        select(&mut io, 1, 0x10);
        io.write(0xCF8, 4, &0xC010_0000u32.to_le_bytes());
        assert!(!bus.read(0xC000_0010, &mut b));
        assert!(bus.write(0xC010_0004, &[7]));
        assert_eq!(
            dev.lock().unwrap().last_write.clone(),
            Some((0, 4, vec![7]))
        );
    }

    #[test]
    fn bar_allocator_aligns_and_bounds() {
        let mut a = BarAllocator::new(0xC000_0000, 0xC002_0000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xC000_0000);
        assert_eq!(a.allocate(0x1000).unwrap(), 0xC000_8000);
        assert_eq!(a.allocate(0x8000).unwrap(), 0xC001_0000);
        assert!(a.allocate(0x10000).is_err());
    }
}

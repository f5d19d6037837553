//! The 256-byte type-0 configuration header of a PCI function: identity registers, BARs with
//! the sizing protocol, and the capability list.

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const HEADER_TYPE: usize = 0x0E;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
const SUBSYSTEM_ID: usize = 0x2E;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3C;
const INTERRUPT_PIN: usize = 0x3D;
/// Capabilities start after the standard header.
const FIRST_CAPABILITY: usize = 0x40;

/// Command register bits the guest may change: I/O space, memory space, bus master,
/// parity error response, SERR# enable, interrupt disable.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
/// Status bit: the function has a capability list.
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Memory BAR low bits: 32-bit, non-prefetchable, memory space.
const BAR_MEM32_FLAGS: u32 = 0;

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Class code, subclass and programming interface (24 bits).
    pub class_code: u32,
    /// Header type (0 for endpoints and the host bridge).
    pub header_type: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// A BAR's mapping moved because the guest reprogrammed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// BAR index.
    pub bar: usize,
    /// Address the BAR was mapped at.
    pub from: u64,
    /// Address the guest programmed.
    pub to: u64,
    /// BAR size.
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u64,
    /// Where the BAR is mapped on the bus; differs from the register while the guest sizes it.
    mapped: u64,
}

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error)]
pub enum ConfigSpaceError {
    /// BAR sizes must be powers of two of at least 16 bytes, below 4 GiB.
    #[error("invalid BAR {0} size {1:#x}")]
    InvalidBarSize(usize, u64),
    /// The capability list ran out of the 256-byte space.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// Configuration space of one function.
pub struct PciConfiguration {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    last_capability: Option<usize>,
    next_capability: usize,
}

impl PciConfiguration {
    /// A header with the given identity, no BARs and no capabilities; no INTx pin.
    pub fn new(header: &PciHeader) -> Self {
        let mut cfg = PciConfiguration {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAPABILITY,
        };
        cfg.put(VENDOR_ID, &header.vendor_id.to_le_bytes());
        cfg.put(DEVICE_ID, &header.device_id.to_le_bytes());
        cfg.put(REVISION_ID, &[header.revision_id]);
        cfg.put(CLASS_CODE, &header.class_code.to_le_bytes()[..3]);
        cfg.put(HEADER_TYPE, &[header.header_type]);
        cfg.put(
            SUBSYSTEM_VENDOR_ID,
            &header.subsystem_vendor_id.to_le_bytes(),
        );
        cfg.put(SUBSYSTEM_ID, &header.subsystem_id.to_le_bytes());
        cfg.put(INTERRUPT_PIN, &[0]);
        cfg.set_writable(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        cfg.set_writable(INTERRUPT_LINE, &[0xFF]);
        cfg
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Mark bits at `offset` as guest-writable (1 = writable).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = self.writable.get_mut(offset..offset + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Declare BAR `index` as a 32-bit memory BAR of `size` bytes mapped at `addr`.
    pub fn add_mem32_bar(
        &mut self,
        index: usize,
        addr: u32,
        size: u64,
    ) -> Result<(), ConfigSpaceError> {
        if index >= NUM_BARS || !size.is_power_of_two() || !(16..=1 << 31).contains(&size) {
            return Err(ConfigSpaceError::InvalidBarSize(index, size));
        }
        let mask = !(size as u32 - 1);
        let off = BAR0 + index * 4;
        self.put(off, &((addr & mask) | BAR_MEM32_FLAGS).to_le_bytes());
        self.set_writable(off, &mask.to_le_bytes());
        self.bars[index] = Some(Bar {
            size,
            mapped: u64::from(addr & mask),
        });
        Ok(())
    }

    /// Current mapping of BAR `index`: (address, size).
    pub fn bar(&self, index: usize) -> Option<(u64, u64)> {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .map(|b| (b.mapped, b.size))
    }

    /// Append a capability. `body` is the whole capability including its ID byte at 0 and
    /// a placeholder next-pointer byte at 1. Returns its offset in configuration space.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, ConfigSpaceError> {
        // Capabilities are dword aligned.
        let len = body.len().div_ceil(4) * 4;
        let offset = self.next_capability;
        if body.len() < 2 || offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::CapabilitySpace(body.len()));
        }
        self.put(offset, body);
        self.bytes[offset + 1] = 0;
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES_LIST;
                self.put(STATUS, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    /// Read any bytes; outside the space reads as all-ones like an absent register.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.bytes.get(o))
                .copied()
                .unwrap_or(0xFF);
        }
    }

    /// Little-endian 16-bit read (0xFFFF outside the space).
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian 32-bit read (all-ones outside the space).
    pub fn read_u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Write any bytes through the writable mask. Returns the BARs whose mapping must move.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        let mut touched_bars = false;
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i) else {
                break;
            };
            let (Some(cur), Some(mask)) = (self.bytes.get(o).copied(), self.writable.get(o)) else {
                break;
            };
            self.bytes[o] = (cur & !mask) | (b & mask);
            touched_bars |= (BAR0..BAR0 + NUM_BARS * 4).contains(&o);
        }
        if touched_bars {
            self.bar_moves()
        } else {
            Vec::new()
        }
    }

    /// Compare the BAR registers with their mappings. Writing all-ones (the sizing probe) or
    /// zero does not move a mapping: Linux restores the old value right after sizing.
    fn bar_moves(&mut self) -> Vec<BarMove> {
        let mut moves = Vec::new();
        for index in 0..NUM_BARS {
            let Some(bar) = self.bars[index] else {
                continue;
            };
            let size_mask = !(bar.size as u32 - 1);
            let addr = self.read_u32(BAR0 + index * 4) & size_mask;
            if addr == size_mask || addr == 0 || u64::from(addr) == bar.mapped {
                continue;
            }
            moves.push(BarMove {
                bar: index,
                from: bar.mapped,
                to: u64::from(addr),
                size: bar.size,
            });
            self.bars[index] = Some(Bar {
                size: bar.size,
                mapped: u64::from(addr),
            });
        }
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class_code: 0x018000,
            header_type: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn identity_registers_read_back() {
        let cfg = PciConfiguration::new(&header());
        assert_eq!(cfg.read_u32(0), 0x1042_1af4);
        assert_eq!(cfg.read_u32(0x08), 0x0180_0001);
        assert_eq!(cfg.read_u16(0x2C), 0x1af4);
        assert_eq!(cfg.read_u16(0x2E), 0x40);
        // No INTx.
        let mut pin = [0xAAu8];
        cfg.read(0x3D, &mut pin);
        assert_eq!(pin, [0]);
        // Past the end reads as all-ones, and odd sizes/offsets do not panic.
        let mut buf = [0u8; 8];
        cfg.read(252, &mut buf);
        assert_eq!(&buf[4..], &[0xFF; 4]);
        cfg.read(usize::MAX, &mut buf);
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.write(0, &[0xFF; 4]);
        assert_eq!(cfg.read_u32(0), 0x1042_1af4);
        cfg.write(0x04, &0xFFFFu16.to_le_bytes());
        assert_eq!(cfg.read_u16(0x04), COMMAND_WRITABLE);
        cfg.write(250, &[0xFF; 16]);
        cfg.write(usize::MAX - 1, &[0xFF; 4]);
    }

    #[test]
    fn bar_sizing_returns_size_mask_and_restore_keeps_mapping() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_mem32_bar(0, 0xC000_0000, 0x8000).unwrap();
        assert_eq!(cfg.read_u32(0x10), 0xC000_0000);
        // Linux's probe: write all-ones, read the size mask, restore.
        assert!(cfg.write(0x10, &u32::MAX.to_le_bytes()).is_empty());
        assert_eq!(cfg.read_u32(0x10), 0xFFFF_8000);
        assert_eq!(!(cfg.read_u32(0x10) & !0xF) + 1, 0x8000);
        assert!(cfg.write(0x10, &0xC000_0000u32.to_le_bytes()).is_empty());
        assert_eq!(cfg.bar(0), Some((0xC000_0000, 0x8000)));
        // Unimplemented BARs read as zero even after the all-ones probe.
        cfg.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(cfg.read_u32(0x14), 0);
    }

    #[test]
    fn bar_reprogramming_reports_a_move() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_mem32_bar(0, 0xC000_0000, 0x8000).unwrap();
        let moves = cfg.write(0x10, &0xD000_1234u32.to_le_bytes());
        assert_eq!(
            moves,
            vec![BarMove {
                bar: 0,
                from: 0xC000_0000,
                to: 0xD000_0000,
                size: 0x8000
            }]
        );
        assert_eq!(cfg.bar(0), Some((0xD000_0000, 0x8000)));
        // Byte-wise reprogramming (odd sizes) ends in one move once the value differs.
        let mut total = Vec::new();
        for (i, b) in 0xC800_0000u32.to_le_bytes().iter().enumerate() {
            total.extend(cfg.write(0x10 + i, &[*b]));
        }
        assert_eq!(total.last().map(|m| m.to), Some(0xC800_0000));
    }

    #[test]
    fn capability_list_is_chained() {
        let mut cfg = PciConfiguration::new(&header());
        let a = cfg
            .add_capability(&[0x11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .unwrap();
        let b = cfg.add_capability(&[0x09, 0xAA, 16, 1]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4C);
        assert_eq!(
            cfg.read_u16(0x06) & STATUS_CAPABILITIES_LIST,
            STATUS_CAPABILITIES_LIST
        );
        let mut p = [0u8];
        cfg.read(0x34, &mut p);
        assert_eq!(p[0] as usize, a);
        cfg.read(a + 1, &mut p);
        assert_eq!(p[0] as usize, b);
        cfg.read(b + 1, &mut p);
        assert_eq!(p[0], 0);
        assert!(cfg.add_capability(&[0u8; 200]).is_err());
    }

    #[test]
    fn bad_bar_sizes_are_rejected() {
        let mut cfg = PciConfiguration::new(&header());
        assert!(cfg.add_mem32_bar(0, 0, 0x3000).is_err());
        assert!(cfg.add_mem32_bar(6, 0, 0x1000).is_err());
        assert!(cfg.add_mem32_bar(0, 0, 8).is_err());
    }
}

//! Address buses that route port I/O and MMIO exits to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a [`Bus`].
pub trait BusDevice: Send {
    /// Read at `offset` (= address - `base`) from the range the device was inserted at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Write at `offset` (= address - `base`) to the range the device was inserted at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors of bus registration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A zero-length range or one that wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// No range starts at this address.
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Non-overlapping address ranges, each served by one device. Shared by all vCPU threads.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, BusEntry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `dev` at `base..base+len`.
    pub fn insert(
        &self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::InvalidRange { base, len }),
        };
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, BusEntry { len, device: dev });
        Ok(())
    }

    /// Remove the range that starts at `base`.
    pub fn remove(&self, base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges
            .remove(&base)
            .map(|_| ())
            .ok_or(BusError::NotFound(base))
    }

    fn resolve(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (base, entry.device.clone()))
    }

    /// Read from the device at `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Write to the device at `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            data.fill((base + offset) as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_to_the_range_holding_the_address() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x10, 0x10).unwrap();
        assert!(bus.write(0x1f, &[7]));
        assert_eq!(a.lock().unwrap().last, Some((0x10, 0xf, vec![7])));
        let mut b = [0u8; 2];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b, [0x12, 0x12]);
        assert!(!bus.read(0x20, &mut b));
        assert!(!bus.write(0xf, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d.clone(), 0x100, 0x10).unwrap();
        for (base, len) in [(0xf8, 0x10), (0x108, 1), (0x10f, 0x10), (0x0, 0x1000)] {
            assert_eq!(
                bus.insert(d.clone(), base, len),
                Err(BusError::Overlap { base, len })
            );
        }
        assert!(bus.insert(d.clone(), 0x110, 0x10).is_ok());
        assert!(bus.insert(d.clone(), 0xf0, 0x10).is_ok());
        assert!(matches!(
            bus.insert(d.clone(), 0x1000, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(d, u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn removed_range_no_longer_answers() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x40, 4)
            .unwrap();
        bus.remove(0x40).unwrap();
        assert!(!bus.write(0x40, &[0]));
        assert_eq!(bus.remove(0x40), Err(BusError::NotFound(0x40)));
    }
}

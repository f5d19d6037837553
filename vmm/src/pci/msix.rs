//! MSI-X capability, table and pending-bit array of one function.
//!
//! The table lives in a BAR; each entry is {address low, address high, data, vector control}.
//! Delivery itself is [`crate::interrupt::MsiVectors`]' job; this module keeps the guest-visible
//! registers and tells it, after every change, whether a vector may deliver.

use crate::interrupt::{InterruptError, MsiMessage, MsiVectors};

/// Capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Message control: MSI-X enable.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: per-vector mask.
const VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug)]
struct MsixEntry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        MsixEntry {
            address_lo: 0,
            address_hi: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

impl MsixEntry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_hi) << 32 | u64::from(self.address_lo),
            data: self.data,
        }
    }
}

/// The MSI-X state of a function.
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    enabled: bool,
    function_masked: bool,
    vectors: MsiVectors,
}

impl MsixTable {
    /// A table with one entry per vector of `vectors` (at most 2048).
    pub fn new(vectors: MsiVectors) -> Self {
        MsixTable {
            entries: vec![MsixEntry::default(); vectors.len().min(2048)],
            enabled: false,
            function_masked: false,
            vectors,
        }
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The capability body (ID, next, message control, table and PBA offset/BIR).
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> [u8; 12] {
        let mut cap = [0u8; 12];
        cap[0] = MSIX_CAPABILITY_ID;
        let table_size = (self.entries.len().max(1) - 1) as u16;
        cap[2..4].copy_from_slice(&table_size.to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        cap
    }

    /// Writable bits of the message control register.
    pub fn control_writable_mask() -> u16 {
        CONTROL_ENABLE | CONTROL_FUNCTION_MASK
    }

    /// Whether MSI-X is enabled in the capability.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The irqfd of vector `index`, if that vector exists.
    pub fn irqfd(&self, index: u16) -> Option<&vmm_sys_util::eventfd::EventFd> {
        if usize::from(index) < self.entries.len() {
            self.vectors.irqfd(usize::from(index))
        } else {
            None
        }
    }

    /// Raise vector `index` from the VMM side (held pending while masked).
    pub fn trigger(&self, index: u16) {
        if usize::from(index) < self.entries.len() {
            self.vectors.trigger(usize::from(index));
        }
    }

    /// The guest wrote the message control register.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let masked = control & CONTROL_FUNCTION_MASK != 0;
        if enabled == self.enabled && masked == self.function_masked {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for i in 0..self.entries.len() {
            self.sync(i);
        }
    }

    fn sync(&mut self, index: usize) {
        let Some(entry) = self.entries.get(index) else {
            return;
        };
        let deliver = self.enabled && !self.function_masked && entry.control & VECTOR_MASKED == 0;
        if let Err(e) = self.vectors.update(index, entry.message(), deliver) {
            report(index, e);
        }
    }

    /// Guest read from the table region.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get(index) else {
            return;
        };
        let words = [
            entry.address_lo,
            entry.address_hi,
            entry.data,
            entry.control,
        ];
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = (offset % MSIX_ENTRY_SIZE) as usize;
        // Accesses must not straddle entries; the tail past the entry reads as zero.
        let n = data.len().min(16 - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }

    /// Guest write to the table region (dword or qword accesses per the spec; others are
    /// merged bytewise so that odd accesses cannot corrupt anything but the entry itself).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let mut bytes = [0u8; 16];
        for (i, w) in [
            entry.address_lo,
            entry.address_hi,
            entry.data,
            entry.control,
        ]
        .iter()
        .enumerate()
        {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let start = (offset % MSIX_ENTRY_SIZE) as usize;
        let n = data.len().min(16 - start);
        bytes[start..start + n].copy_from_slice(&data[..n]);
        let word =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let before = *entry;
        entry.address_lo = word(0);
        entry.address_hi = word(4);
        entry.data = word(8);
        // Only the mask bit of vector control is defined.
        entry.control = word(12) & VECTOR_MASKED;
        let mask_changed = (before.control ^ entry.control) & VECTOR_MASKED != 0;
        let message_changed = before.message() != entry.message();
        // A message change of an unmasked vector takes effect at once (the spec leaves it
        // undefined; following it is the kind choice).
        if mask_changed || (message_changed && entry.control & VECTOR_MASKED == 0) {
            self.sync(index);
        }
    }

    /// Guest read from the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let pba_bytes = self.entries.len().div_ceil(8) as u64;
        for (i, b) in data.iter_mut().enumerate() {
            *b = 0;
            let byte_index = offset.saturating_add(i as u64);
            if byte_index >= pba_bytes {
                continue;
            }
            for bit in 0..8 {
                let vector = byte_index as usize * 8 + bit;
                if vector < self.entries.len() && self.vectors.is_pending(vector) {
                    *b |= 1 << bit;
                }
            }
        }
    }

    /// Detach all vectors from the hypervisor.
    pub fn release(&mut self) {
        self.vectors.release();
    }
}

fn report(index: usize, e: InterruptError) {
    log::error!("MSI-X vector {index}: {e}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::tests::RecordingVm;
    use crate::interrupt::{lock, MsiRouter};
    use std::sync::Arc;

    fn table(n: usize) -> (Arc<RecordingVm>, MsixTable) {
        let vm = Arc::new(RecordingVm::default());
        let router = Arc::new(MsiRouter::new(vm.clone()));
        (vm, MsixTable::new(MsiVectors::new(router, n).unwrap()))
    }

    fn program(t: &mut MsixTable, v: u64, addr: u64, data: u32, masked: bool) {
        let base = v * MSIX_ENTRY_SIZE;
        t.write_table(base, &(addr as u32).to_le_bytes());
        t.write_table(base + 4, &((addr >> 32) as u32).to_le_bytes());
        t.write_table(base + 8, &data.to_le_bytes());
        t.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn entries_start_masked_and_read_back() {
        let (_vm, mut t) = table(3);
        let mut ctrl = [0u8; 4];
        t.read_table(2 * 16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 1);
        program(&mut t, 1, 0xFEE0_1000, 0x4021, true);
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xFEE0_1000);
        let mut d = [0u8; 4];
        t.read_table(16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4021);
        let cap = t.capability(0, 0x4000, 0x5000);
        assert_eq!(cap[0], 0x11);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 2);
    }

    #[test]
    fn delivery_needs_enable_and_no_masks() {
        let (vm, mut t) = table(2);
        program(&mut t, 0, 0xFEE0_0000, 0x30, false);
        // MSI-X not enabled yet: nothing attached.
        assert!(lock(&vm.irqfds).is_empty());
        t.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(lock(&vm.irqfds).is_empty());
        t.set_control(CONTROL_ENABLE);
        assert_eq!(lock(&vm.irqfds).len(), 1);
        assert_eq!(lock(&vm.routes)[0].1.data, 0x30);
        // Per-vector mask detaches; the signal then shows in the PBA.
        t.write_table(12, &1u32.to_le_bytes());
        assert!(lock(&vm.irqfds).is_empty());
        t.irqfd(0).unwrap().write(1).unwrap();
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        t.write_table(12, &0u32.to_le_bytes());
        assert_eq!(lock(&vm.irqfds).len(), 1);
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
    }

    #[test]
    fn hostile_accesses_do_not_panic() {
        let (_vm, mut t) = table(2);
        t.write_table(u64::MAX - 3, &[1, 2, 3, 4]);
        t.write_table(15, &[0xFF; 8]);
        t.write_table(2 * 16, &[0xFF; 4]);
        let mut big = [0u8; 64];
        t.read_table(14, &mut big);
        t.read_table(u64::MAX, &mut big);
        t.read_pba(u64::MAX / 16, &mut big);
        assert!(t.irqfd(2).is_none());
        assert!(t.irqfd(0xFFFF).is_none());
        t.trigger(0xFFFF);
    }
}

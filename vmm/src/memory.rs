//! Guest RAM: one memfd, mapped MAP_SHARED, so vhost-user daemons can map the same pages;
//! each hot-plugged block ([`GuestRam::add_block`]) has a memfd of its own.
//!
//! RAM up to 3 GiB sits at guest address 0; the rest continues at 4 GiB (see [`crate::layout`]).
//! Each region keeps its `FileOffset`, which is what VHOST_USER_SET_MEM_TABLE sends.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::unix::io::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::layout::{RAM_32BIT_END, RAM_64BIT_START};

/// The guest memory type used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// memfd_create failed.
    #[error("cannot create the guest memory file: {0}")]
    Memfd(#[source] io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file to {0} bytes: {1}")]
    Truncate(u64, #[source] io::Error),
    /// Not enough free huge pages.
    #[error("--hugepages needs {need} free 2 MiB huge pages, the host has {free} (see /proc/sys/vm/nr_hugepages)")]
    HugePages {
        /// Pages needed.
        need: u64,
        /// Pages free.
        free: u64,
    },
    /// Mapping a region failed.
    #[error("cannot map guest memory: {0}")]
    Mmap(String),
    /// KVM refused a memory slot.
    #[error("cannot register guest memory with KVM: {0}")]
    Slot(#[source] kvm_ioctls::Error),
}

/// Guest RAM and the ranges it occupies in guest physical space.
pub struct GuestRam {
    /// All regions, shared with the device side.
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// (start, length) of each RAM range, ascending.
    pub ranges: Vec<(u64, u64)>,
    /// The memfd backing the boot regions.
    pub file: File,
}

/// Split `size` bytes of RAM around the 32-bit MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(RAM_32BIT_END);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((RAM_64BIT_START, size - low));
    }
    ranges
}

fn free_huge_pages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl GuestRam {
    /// Create `size` bytes of guest RAM (`size` is a multiple of 4 KiB, or 2 MiB with
    /// `hugepages`).
    pub fn new(size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        let file = memfd(c"vmm-guest-ram", size, hugepages)?;
        let ranges = ram_ranges(size);
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for &(start, len) in &ranges {
            regions.push(map_region(&file, offset, start, len, hugepages)?);
            offset += len;
        }
        let mem =
            GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(Self {
            mem: GuestMemoryAtomic::new(mem),
            ranges,
            file,
        })
    }

    /// Register every region with KVM as one memory slot each.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        let mem = self.mem.memory();
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Mmap(e.to_string()))?;
            let slot_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping stays alive as long as `self.mem`, which the VM owns and
            // drops only after the VM fd (the Vm struct holds both, fd declared first).
            unsafe { vm.set_user_memory_region(slot_region) }.map_err(MemoryError::Slot)?;
        }
        Ok(())
    }

    /// Total RAM in bytes, hot-plugged blocks included.
    pub fn size(&self) -> u64 {
        self.mem.memory().iter().map(|r| r.len()).sum()
    }

    /// Hot-plug a block of `len` bytes at guest address `start`: a memfd of its own (so that
    /// vhost-user daemons can map it), KVM memory `slot`, and the shared guest memory map.
    /// Returns the new region, for the daemons.
    pub fn add_block(
        &self,
        vm: &VmFd,
        slot: u32,
        start: u64,
        len: u64,
        hugepages: bool,
    ) -> Result<Arc<GuestRegionMmap<()>>, MemoryError> {
        let file = memfd(c"vmm-guest-ram-hotplug", len, hugepages)?;
        let region = Arc::new(map_region(&file, 0, start, len, hugepages)?);
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        let slot_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: start,
            memory_size: len,
            userspace_addr: host as u64,
        };
        let mem = self
            .mem
            .memory()
            .insert_region(region.clone())
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        // SAFETY: the mapping lives in `self.mem` from the next line on, which the VM drops
        // only after the VM fd, as for the boot regions.
        unsafe { vm.set_user_memory_region(slot_region) }.map_err(MemoryError::Slot)?;
        self.mem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(mem);
        Ok(region)
    }
}

/// A memfd of `size` bytes (huge pages: MFD_HUGETLB), checking that enough are free.
fn memfd(name: &CStr, size: u64, hugepages: bool) -> Result<File, MemoryError> {
    if hugepages {
        let need = size.div_ceil(crate::config::HUGE_PAGE_SIZE);
        let free = free_huge_pages();
        // A memfd with too few huge pages maps fine and then SIGBUSes on first touch.
        if free < need {
            return Err(MemoryError::HugePages { need, free });
        }
    }
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;
    Ok(file)
}

/// Map `len` bytes of `file` from `offset` as guest RAM at `start` (MAP_SHARED).
fn map_region(
    file: &File,
    offset: u64,
    start: u64,
    len: u64,
    hugepages: bool,
) -> Result<GuestRegionMmap<()>, MemoryError> {
    let fo = FileOffset::new(
        file.try_clone()
            .map_err(|e| MemoryError::Mmap(e.to_string()))?,
        offset,
    );
    let len_usize =
        usize::try_from(len).map_err(|_| MemoryError::Mmap("region too large".into()))?;
    let mut flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
    if hugepages {
        flags |= libc::MAP_HUGETLB;
    }
    let mapping = MmapRegion::build(
        Some(fo),
        len_usize,
        libc::PROT_READ | libc::PROT_WRITE,
        flags,
    )
    .map_err(|e| MemoryError::Mmap(e.to_string()))?;
    GuestRegionMmap::new(mapping, GuestAddress(start))
        .ok_or_else(|| MemoryError::Mmap("region wraps the address space".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use vm_memory::Bytes;

    #[test]
    fn ranges_skip_the_pci_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(0, 3 << 30), (RAM_64BIT_START, 2 << 30)]
        );
    }

    #[test]
    fn memory_is_shared_through_the_memfd() {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        let mem = ram.mem.memory();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let mut f = ram.file.try_clone().unwrap();
        f.seek(SeekFrom::Start(0x1000)).unwrap();
        let mut b = [0u8; 4];
        f.read_exact(&mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
        f.seek(SeekFrom::Start(0x2000)).unwrap();
        f.write_all(&[1, 2, 3]).unwrap();
        let mut g = [0u8; 3];
        mem.read_slice(&mut g, GuestAddress(0x2000)).unwrap();
        assert_eq!(g, [1, 2, 3]);
        let region = mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
    }
}

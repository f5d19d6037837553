//! Guest memory: one memfd region at guest physical address 0, shared with the daemon.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::error::{Error, Result};

/// Guest memory with a bump allocator for rings and buffers.
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
    /// First byte the allocator wraps back to (after the rings).
    floor: u64,
    next: u64,
}

impl GuestMemory {
    /// `size` bytes of zeroed guest memory in a fresh memfd.
    pub fn new(size: usize) -> Result<GuestMemory> {
        // SAFETY: memfd_create with a static NUL-terminated name; the result is checked.
        let fd =
            unsafe { libc::memfd_create(c"vhost-user-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Setup("memfd", std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a new descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)
            .map_err(|e| Error::Setup("memfd", e))?;
        let clone = file.try_clone().map_err(|e| Error::Setup("memfd", e))?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(clone, 0)),
        )])
        .map_err(|e| Error::Setup("guest memory mapping", std::io::Error::other(e)))?;
        Ok(GuestMemory {
            mem,
            file,
            size: size as u64,
            // Address 0 stays unused so that a zero address in a test is never valid data.
            floor: 4096,
            next: 4096,
        })
    }

    /// The mapping (shared references to it may go to several threads).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes; every address at or beyond it is outside guest memory.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `len` bytes aligned to `align` (a power of two); wraps around to the first buffer
    /// after [`GuestMemory::pin`] when memory runs out, so long runs must not keep old
    /// buffers in use.
    pub fn alloc_aligned(&mut self, len: usize, align: u64) -> u64 {
        let len = len.max(1) as u64;
        let mut at = (self.next + align - 1) & !(align - 1);
        if at + len > self.size {
            at = (self.floor + align - 1) & !(align - 1);
            assert!(
                at + len <= self.size,
                "guest memory too small for {len} bytes"
            );
        }
        self.next = at + len;
        at
    }

    /// `len` bytes, 64-byte aligned.
    pub fn alloc(&mut self, len: usize) -> u64 {
        self.alloc_aligned(len, 64)
    }

    /// Everything allocated so far stays allocated when the allocator wraps.
    pub fn pin(&mut self) {
        self.floor = self.next;
    }

    /// A buffer holding `data`; returns its address.
    pub fn put(&mut self, data: &[u8]) -> u64 {
        let at = self.alloc(data.len());
        self.write(at, data);
        at
    }

    /// Write `data` at `addr` (which must be inside guest memory).
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr))
            .expect("write inside guest memory");
    }

    /// Read `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr))
            .expect("read inside guest memory");
        v
    }

    /// Write a plain value at `addr`.
    pub fn write_obj<T: ByteValued>(&self, addr: u64, v: T) {
        self.mem
            .write_obj(v, GuestAddress(addr))
            .expect("write inside guest memory");
    }

    /// Read a plain value at `addr`.
    pub fn read_obj<T: ByteValued>(&self, addr: u64) -> T {
        self.mem
            .read_obj(GuestAddress(addr))
            .expect("read inside guest memory")
    }

    /// The host address guest address 0 is mapped at (vring addresses are given in it).
    pub fn host_base(&self) -> u64 {
        self.mem
            .get_host_address(GuestAddress(0))
            .expect("guest memory starts at 0") as u64
    }

    /// The SET_MEM_TABLE description of this memory.
    pub fn regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        vec![VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_base(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_wrap_above_pinned_memory() {
        let mut g = GuestMemory::new(64 << 10).unwrap();
        let ring = g.alloc_aligned(4096, 4096);
        assert_eq!(ring, 4096, "address 0 is never handed out");
        g.pin();
        let a = g.put(b"hello");
        assert_eq!(a % 64, 0);
        assert_eq!(g.read(a, 5), b"hello");
        let big = g.alloc(40 << 10);
        assert!(big > a && big + (40 << 10) <= g.size());
        // No room left for another 40 KiB: it wraps to the first byte above the pinned ring.
        assert_eq!(g.alloc(40 << 10), 8192);
        g.write_obj(g.size() - 8, 7u64);
        assert_eq!(g.read_obj::<u64>(g.size() - 8), 7);
        let regions = g.regions();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].memory_size, g.size());
        assert_eq!(regions[0].userspace_addr, g.host_base());
    }
}

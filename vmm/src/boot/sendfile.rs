//! Copying the kernel and initramfs into guest RAM with `sendfile(2)`.
//!
//! Guest RAM is a memfd. Reading a file into its mapping makes the vmm fault in every page
//! from user space before the copy; `sendfile` from the file into the memfd lets the kernel
//! copy page cache to page cache instead, which is most of what the vmm does between its
//! start and the guest's first instruction (a 14 MiB bzImage: 24 ms by `read`, 14 ms by
//! `sendfile` on the PVM development host). The loaders (linux-loader, the initramfs) keep
//! their `read_exact_volatile_from` calls: [`SendfileSource`] stands in for the file and turns
//! each read into a `sendfile` at the memfd offset behind the destination. Where that cannot
//! work (a region without a memfd, hugetlbfs which has no write path, an old kernel) it falls
//! back to an ordinary read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::io::{AsRawFd, RawFd};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::{Error as VolatileMemoryError, VolatileSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::memory::GuestMemoryMmap;

/// One memfd-backed guest RAM mapping: host address range and where it starts in its file.
struct MemfdMapping {
    host_start: usize,
    len: usize,
    fd: RawFd,
    file_offset: u64,
}

/// A file read into guest RAM through `sendfile` into the memfd behind it.
pub(crate) struct SendfileSource<'a> {
    file: &'a mut File,
    mappings: Vec<MemfdMapping>,
}

impl<'a> SendfileSource<'a> {
    /// `file` as a source for reads into `mem`.
    pub(crate) fn new(file: &'a mut File, mem: &GuestMemoryMmap) -> Self {
        let mappings = mem
            .iter()
            .filter_map(|r| {
                let fo = r.file_offset()?;
                let host = r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()?;
                Some(MemfdMapping {
                    host_start: host as usize,
                    len: usize::try_from(r.len()).ok()?,
                    fd: fo.file().as_raw_fd(),
                    file_offset: fo.start(),
                })
            })
            .collect();
        SendfileSource { file, mappings }
    }

    /// Copy up to `len` bytes from the file's position into the memfd behind host address
    /// `dst`; None when that is not possible and the caller should read instead.
    fn sendfile_to(&mut self, dst: usize, len: usize) -> Option<usize> {
        let m = self
            .mappings
            .iter()
            .find(|m| dst >= m.host_start && dst - m.host_start < m.len)?;
        let count = len.min(m.len - (dst - m.host_start));
        let offset = i64::try_from(m.file_offset + (dst - m.host_start) as u64).ok()?;
        // sendfile writes at the output's file position. Nothing else uses the memfd's
        // position (the vmm and the daemons only mmap it), so moving it is harmless.
        // SAFETY: lseek on a valid fd; no memory is passed.
        if unsafe { libc::lseek(m.fd, offset, libc::SEEK_SET) } != offset {
            return None;
        }
        // SAFETY: both fds are valid; a null offset pointer makes sendfile use and advance
        // the input file's position, as a read would.
        let n = unsafe { libc::sendfile(m.fd, self.file.as_raw_fd(), std::ptr::null_mut(), count) };
        usize::try_from(n).ok()
    }
}

impl ReadVolatile for SendfileSource<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let dst = buf.ptr_guard_mut().as_ptr() as usize;
        match self.sendfile_to(dst, buf.len()) {
            Some(n) => {
                buf.bitmap().mark_dirty(0, n);
                Ok(n)
            }
            None => self.file.read_volatile(buf),
        }
    }
}

// Headers (ELF, bzImage setup) are read into vmm memory the ordinary way.
impl Read for SendfileSource<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Seek for SendfileSource<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    /// An unlinked file in /tmp holding `data`, positioned at its start.
    fn temp_file(data: &[u8]) -> File {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open("/tmp")
            .unwrap();
        f.write_all(data).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    #[test]
    fn copies_into_both_memfd_regions() {
        // 3 GiB + 64 KiB: two regions of one memfd, split around the PCI hole.
        let ram = crate::memory::GuestRam::new((3 << 30) + (64 << 10), false).unwrap();
        let mem = ram.mem.memory();
        let data = pattern(3 * 4096 + 100);
        let mut file = temp_file(&data);
        // Up to the last byte of the low region.
        let addr = GuestAddress((3 << 30) - data.len() as u64);
        let mut src = SendfileSource::new(&mut file, &mem);
        mem.read_exact_volatile_from(addr, &mut src, data.len())
            .unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, addr).unwrap();
        assert_eq!(back, data);
        // The high region maps the memfd from offset 3 GiB: a copy there lands there too.
        let high = GuestAddress(crate::layout::RAM_64BIT_START + 4096);
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut src = SendfileSource::new(&mut file, &mem);
        mem.read_exact_volatile_from(high, &mut src, 5000).unwrap();
        let mut back = vec![0u8; 5000];
        mem.read_slice(&mut back, high).unwrap();
        assert_eq!(back, data[..5000]);
        // The file position advanced as a read would have moved it.
        assert_eq!(file.stream_position().unwrap(), 5000);
        // And the copies went through sendfile, not the fallback.
        let host = mem.get_host_address(high).unwrap() as usize;
        let mut src = SendfileSource::new(&mut file, &mem);
        assert_eq!(src.sendfile_to(host, 4096), Some(4096));
    }

    #[test]
    fn falls_back_to_read_without_a_memfd() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let data = pattern(10_000);
        let mut file = temp_file(&data);
        let mut src = SendfileSource::new(&mut file, &mem);
        mem.read_exact_volatile_from(GuestAddress(0x1000), &mut src, data.len())
            .unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, data);
        let host = mem.get_host_address(GuestAddress(0x1000)).unwrap() as usize;
        let mut src = SendfileSource::new(&mut file, &mem);
        assert_eq!(src.sendfile_to(host, 10), None);
    }

    #[test]
    fn a_short_file_is_an_error_not_garbage() {
        let ram = crate::memory::GuestRam::new(1 << 20, false).unwrap();
        let mem = ram.mem.memory();
        let mut file = temp_file(&pattern(100));
        let mut src = SendfileSource::new(&mut file, &mem);
        assert!(mem
            .read_exact_volatile_from(GuestAddress(0), &mut src, 200)
            .is_err());
    }
}

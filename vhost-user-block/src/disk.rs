//! The disk: positional, lock-free I/O on one shared file descriptor, straight between the
//! image and guest memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why the disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// Determining the size failed.
    #[error("cannot determine the size of {path}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// One raw disk image, shared by all queue threads (every operation is positional).
#[derive(Debug)]
pub struct Disk {
    file: File,
    /// Size in bytes, rounded down to whole 512-byte sectors.
    size: u64,
    block_device: bool,
    direct: bool,
}

// Linux block-device ioctls (linux/fs.h): _IO(0x12, 119) and _IO(0x12, 127).
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Alignment of buffers for O_DIRECT I/O through the bounce path.
const DIRECT_ALIGN: usize = 4096;

impl Disk {
    /// Open `path` (read-only, or with O_DIRECT) and find its size.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(path).map_err(|source| DiskError::Open {
            path: path.to_owned(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| DiskError::Size {
            path: path.to_owned(),
            source,
        })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(DiskError::NotADisk(path.to_owned()));
        }
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_owned(),
                source,
            })?;
        Ok(Disk {
            file,
            size: size & !511,
            block_device,
            direct,
        })
    }

    /// The open descriptor, for asynchronous engines.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Usable size in bytes (whole sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read into `iovs` from `offset`, all or nothing.
    pub fn read_vectored(&self, iovs: &mut [libc::iovec], offset: u64) -> io::Result<()> {
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        match self.transfer(iovs, offset, total, Direction::Read, false) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.bounce(iovs, offset, total, Direction::Read, false)
            }
            r => r,
        }
    }

    /// Write `iovs` at `offset`, all or nothing; `durable` asks for RWF_DSYNC semantics.
    pub fn write_vectored(
        &self,
        iovs: &mut [libc::iovec],
        offset: u64,
        durable: bool,
    ) -> io::Result<()> {
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        match self.transfer(iovs, offset, total, Direction::Write, durable) {
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.bounce(iovs, offset, total, Direction::Write, durable)
            }
            r => r,
        }
    }

    fn transfer(
        &self,
        iovs: &mut [libc::iovec],
        offset: u64,
        total: usize,
        dir: Direction,
        durable: bool,
    ) -> io::Result<()> {
        let mut done = 0usize;
        let mut first = 0usize;
        while done < total {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let cnt = (iovs.len() - first).min(libc::UIO_MAXIOV as usize) as libc::c_int;
            let flags = if durable { libc::RWF_DSYNC } else { 0 };
            // SAFETY: every iovec points into guest memory mapped for the lifetime of this
            // request (validated against the memory map when the request was parsed) or into a
            // live local buffer; the kernel only accesses iov_len bytes of each.
            let n = unsafe {
                match dir {
                    Direction::Read => libc::preadv(
                        self.file.as_raw_fd(),
                        iovs[first..].as_ptr(),
                        cnt,
                        pos as libc::off_t,
                    ),
                    Direction::Write => libc::pwritev2(
                        self.file.as_raw_fd(),
                        iovs[first..].as_ptr(),
                        cnt,
                        pos as libc::off_t,
                        flags,
                    ),
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n as usize;
            // Skip the iovecs the call completed and trim a partially done one.
            let mut left = n as usize;
            while first < iovs.len() && left >= iovs[first].iov_len {
                left -= iovs[first].iov_len;
                first += 1;
            }
            if left > 0 {
                let v = &mut iovs[first];
                // SAFETY: left < iov_len, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(left) } as *mut libc::c_void;
                v.iov_len -= left;
            }
        }
        Ok(())
    }

    /// O_DIRECT needs aligned buffers; guest buffers need not be. Copy through an aligned one.
    fn bounce(
        &self,
        iovs: &mut [libc::iovec],
        offset: u64,
        total: usize,
        dir: Direction,
        durable: bool,
    ) -> io::Result<()> {
        let layout = std::alloc::Layout::from_size_align(total.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has non-zero size.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        if buf.is_null() {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        let copy = |to_guest: bool| {
            let mut pos = 0usize;
            for v in iovs.iter() {
                // SAFETY: `buf` holds `total` bytes and the iovecs together are `total` bytes
                // long; each iovec is valid for iov_len bytes (see `transfer`).
                unsafe {
                    if to_guest {
                        std::ptr::copy_nonoverlapping(
                            buf.add(pos),
                            v.iov_base as *mut u8,
                            v.iov_len,
                        );
                    } else {
                        std::ptr::copy_nonoverlapping(
                            v.iov_base as *const u8,
                            buf.add(pos),
                            v.iov_len,
                        );
                    }
                }
                pos += v.iov_len;
            }
        };
        let mut one = [libc::iovec {
            iov_base: buf as *mut libc::c_void,
            iov_len: total,
        }];
        let result = match dir {
            Direction::Read => {
                let r = self.transfer(&mut one, offset, total, dir, false);
                if r.is_ok() {
                    copy(true);
                }
                r
            }
            Direction::Write => {
                copy(false);
                self.transfer(&mut one, offset, total, dir, durable)
            }
        };
        // SAFETY: `buf` was allocated above with `layout`.
        unsafe { std::alloc::dealloc(buf, layout) };
        result
    }

    /// Make every completed write durable.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocate a range (reads return zeroes afterwards for files; a hint for devices).
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return self.range_ioctl(BLKDISCARD, offset, len);
        }
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    /// Zero a range; with `unmap` the space may be deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.block_device {
            return self.range_ioctl(BLKZEROOUT, offset, len);
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_buffers(offset, len)
            }
            r => r,
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            let mut iov = [libc::iovec {
                iov_base: chunk.as_ptr() as *mut libc::c_void,
                iov_len: n,
            }];
            self.write_vectored(&mut iov, offset + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read a two-u64 array, which `range` is.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn vectored_io_round_trips_and_zeroing_works() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0xAAu8; 8192 + 100]).unwrap();
        let disk = Disk::open(f.path(), false, false).unwrap();
        assert_eq!(disk.size(), 8192, "size is rounded down to whole sectors");

        let a = vec![1u8; 512];
        let b = vec![2u8; 1024];
        let mut iovs = [
            libc::iovec {
                iov_base: a.as_ptr() as *mut _,
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            },
        ];
        disk.write_vectored(&mut iovs, 512, true).unwrap();
        let mut out = vec![0u8; 1536];
        let mut iov = [libc::iovec {
            iov_base: out.as_mut_ptr() as *mut _,
            iov_len: out.len(),
        }];
        disk.read_vectored(&mut iov, 512).unwrap();
        assert!(out[..512].iter().all(|&x| x == 1));
        assert!(out[512..].iter().all(|&x| x == 2));

        disk.write_zeroes(512, 512, false).unwrap();
        disk.discard(1024, 1024).unwrap();
        let data = std::fs::read(f.path()).unwrap();
        assert!(data[..512].iter().all(|&x| x == 0xAA));
        assert!(data[512..2048].iter().all(|&x| x == 0));
        assert!(data[2048..4096].iter().all(|&x| x == 0xAA));
    }

    #[test]
    fn reading_past_the_end_fails() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 512]).unwrap();
        let disk = Disk::open(f.path(), true, false).unwrap();
        let mut out = vec![0u8; 1024];
        let mut iov = [libc::iovec {
            iov_base: out.as_mut_ptr() as *mut _,
            iov_len: out.len(),
        }];
        assert!(disk.read_vectored(&mut iov, 0).is_err());
    }

    #[test]
    fn explains_bad_paths() {
        let err = Disk::open(Path::new("/nonexistent/disk.img"), false, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/disk.img"));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Disk::open(dir.path(), true, false),
            Err(DiskError::NotADisk(_))
        ));
    }
}

//! Thin, checked wrappers around the `*at()` system calls the passthrough filesystem uses.
//! Every path argument here is a single component or a `/proc/self/fd` entry name: the
//! filesystem never hands a multi-component guest path to the kernel.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// openat(2) returning an owned descriptor; `O_CLOEXEC` is always added.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated and `dir` is a valid descriptor for the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    let fd = check(fd)?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// open(2) of an absolute host path (start-up only: the shared directory, /proc).
pub fn open_path(path: &std::path::Path, flags: i32) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is NUL-terminated.
    let fd = check(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fresh descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// fstatat(2) with `AT_SYMLINK_NOFOLLOW`; an empty `name` stats `dir` itself.
pub fn statat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat64> {
    // SAFETY: all-zero is a valid stat64.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    let mut flags = libc::AT_SYMLINK_NOFOLLOW;
    if name.is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    // SAFETY: `st` is a valid out-pointer; `name` is NUL-terminated.
    check(unsafe { libc::fstatat64(dir.as_raw_fd(), name.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// Stat an open descriptor.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat64> {
    statat(fd, c"")
}

/// pread(2) into a buffer.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    check_size(unsafe {
        libc::pread64(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as i64,
        )
    })
}

/// pwrite(2) from a buffer.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    check_size(unsafe {
        libc::pwrite64(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            offset as i64,
        )
    })
}

/// A descriptor's entry name in `/proc/self/fd`: its number in decimal, NUL-terminated, kept
/// on the stack (it is built on every OPEN, SETATTR and ACCESS).
pub struct FdName {
    buf: [u8; 12],
    len: usize,
}

impl std::ops::Deref for FdName {
    type Target = CStr;
    fn deref(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.buf[..self.len]).expect("decimal digits and one NUL")
    }
}

/// The `/proc/self/fd` entry name of `fd`.
pub fn fd_name(fd: BorrowedFd<'_>) -> FdName {
    // Descriptors are non-negative, so at most 10 digits.
    let mut n = fd.as_raw_fd().unsigned_abs();
    let mut digits = [0u8; 10];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut name = FdName {
        buf: [0; 12],
        len: count + 1,
    };
    for (i, d) in digits[..count].iter().rev().enumerate() {
        name.buf[i] = *d;
    }
    name
}

/// Raw syscall return to io::Result.
pub fn check_ret(ret: libc::c_int) -> io::Result<()> {
    check(ret).map(|_| ())
}

/// Raw size return to io::Result.
pub fn check_len(ret: isize) -> io::Result<usize> {
    check_size(ret)
}

/// getdents64(2) into `buf`; returns bytes filled (0 at the end).
pub fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    check_size(ret as isize)
}

/// lseek(2).
pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<u64> {
    // SAFETY: plain syscall on a valid descriptor.
    let ret = unsafe { libc::lseek64(fd.as_raw_fd(), offset, whence) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_name_is_the_decimal_number() {
        for n in [0, 7, 10, 255, 1_000_000, i32::MAX] {
            // SAFETY: the borrowed descriptor is only formatted, never used.
            let fd = unsafe { BorrowedFd::borrow_raw(n) };
            assert_eq!(fd_name(fd).to_bytes(), n.to_string().as_bytes());
        }
    }
}

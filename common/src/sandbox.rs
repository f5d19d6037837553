//! Process confinement for daemons that serve a host directory or file: a private mount
//! namespace whose root is that directory (`pivot_root`), or a plain `chroot`.
//!
//! Call after every host path the daemon needs was opened (the listening socket, `/proc/self/fd`,
//! the shared directory): afterwards the rest of the host filesystem is unreachable by path.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How a daemon confines itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxMode {
    /// New mount namespace with the directory as its root (needs CAP_SYS_ADMIN).
    Namespace,
    /// chroot(2) into the directory (needs CAP_SYS_CHROOT).
    Chroot,
    /// No confinement beyond the daemon's own path checks.
    None,
}

/// A confinement step failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The directory path contains a NUL byte.
    #[error("{0}: path contains a NUL byte")]
    Path(String),
    /// The process root is the initramfs (rootfs), which pivot_root(2) cannot leave.
    #[error(
        "sandbox: pivot_root is impossible while / is an initramfs (rootfs); use --sandbox chroot"
    )]
    RootIsInitramfs,
    /// A system call failed.
    #[error("sandbox: {step} failed")]
    Syscall {
        /// What we were doing.
        step: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn check(step: &'static str, ret: libc::c_int) -> Result<(), SandboxError> {
    if ret < 0 {
        Err(SandboxError::Syscall {
            step,
            source: io::Error::last_os_error(),
        })
    } else {
        Ok(())
    }
}

/// Confine the calling process to `dir` as `mode` says. Must run before other threads exist
/// (unshare of the mount namespace applies to the calling thread's process only when it is
/// single-threaded).
pub fn enter(mode: SandboxMode, dir: &Path) -> Result<(), SandboxError> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| SandboxError::Path(dir.display().to_string()))?;
    match mode {
        SandboxMode::None => Ok(()),
        SandboxMode::Chroot => {
            // SAFETY: NUL-terminated path.
            check("chdir", unsafe { libc::chdir(c.as_ptr()) })?;
            // SAFETY: NUL-terminated path.
            check("chroot", unsafe { libc::chroot(c".".as_ptr()) })?;
            // SAFETY: NUL-terminated path.
            check("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })
        }
        SandboxMode::Namespace => {
            // SAFETY: plain syscall.
            check("unshare(CLONE_NEWNS)", unsafe {
                libc::unshare(libc::CLONE_NEWNS)
            })?;
            // Keep our mounts from propagating back to the host.
            // SAFETY: null source/fstype/data are allowed for a propagation change.
            check("make / private", unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })?;
            // pivot_root needs a mount point: bind the directory onto itself.
            // SAFETY: NUL-terminated paths; null fstype/data for a bind mount.
            check("bind-mount the shared directory", unsafe {
                libc::mount(
                    c.as_ptr(),
                    c.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            })?;
            // SAFETY: NUL-terminated path.
            check("chdir", unsafe { libc::chdir(c.as_ptr()) })?;
            // pivot_root(".", ".") stacks the old root on top of the new one; detaching it
            // leaves only the shared directory.
            // SAFETY: NUL-terminated paths.
            let pivot = check("pivot_root", unsafe {
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int
            });
            if let Err(SandboxError::Syscall { source, .. }) = &pivot {
                // EINVAL for valid arguments: the current root is rootfs (an initramfs).
                if source.raw_os_error() == Some(libc::EINVAL) {
                    return Err(SandboxError::RootIsInitramfs);
                }
            }
            pivot?;
            // SAFETY: NUL-terminated path.
            check("detach the old root", unsafe {
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH)
            })?;
            // SAFETY: NUL-terminated path.
            check("chdir /", unsafe { libc::chdir(c"/".as_ptr()) })
        }
    }
}

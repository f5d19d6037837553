//! The passthrough filesystem: FUSE operations on a host directory tree.
//!
//! Every inode the guest knows is an `O_PATH` descriptor; every operation names at most one
//! path component relative to such a descriptor (with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`), so
//! nothing the guest sends is ever resolved as a multi-component host path. Names with `/`,
//! `.` and `..` are refused, symlinks are never followed on the host (the guest resolves them
//! in its own namespace), files are reopened for I/O through `/proc/self/fd` only after their
//! type was checked, and device nodes cannot be created unless allowed.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::fuse::abi::{self, setattr_valid as sv, Attr, EntryOut, Kstatfs, SetattrIn};
use crate::sys;

/// A positive errno value as the FUSE reply carries it (negated on the wire).
pub type Errno = i32;
/// Result of a filesystem operation.
pub type FsResult<T> = Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn last_errno() -> Errno {
    errno(io::Error::last_os_error())
}

/// How much the guest may cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CachePolicy {
    /// No caching: every access goes to the host (files opened with direct I/O).
    Never,
    /// Short timeouts (1 s): the host may change files under the guest.
    Auto,
    /// Long timeouts and kept page cache: only the guest changes the directory.
    Always,
}

/// A contiguous range of ids mapped between guest and host (`GUEST:HOST:COUNT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    /// First id as the guest sees it.
    pub guest: u32,
    /// First id on the host.
    pub host: u32,
    /// Ids in the range.
    pub count: u32,
}

impl std::str::FromStr for IdRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let [g, h, c] = parts[..] else {
            return Err(format!("expected GUEST:HOST:COUNT, got {s:?}"));
        };
        let num = |x: &str| x.parse::<u32>().map_err(|e| format!("{x:?}: {e}"));
        let r = IdRange {
            guest: num(g)?,
            host: num(h)?,
            count: num(c)?,
        };
        if r.count == 0
            || r.guest.checked_add(r.count - 1).is_none()
            || r.host.checked_add(r.count - 1).is_none()
        {
            return Err(format!("id range {s:?} is empty or overflows"));
        }
        Ok(r)
    }
}

/// Guest↔host id translation; ids outside every range pass unchanged.
#[derive(Debug, Clone, Default)]
pub struct IdMap(pub Vec<IdRange>);

impl IdMap {
    /// Host id for a guest id.
    pub fn to_host(&self, id: u32) -> u32 {
        for r in &self.0 {
            if id >= r.guest && id - r.guest < r.count {
                return r.host + (id - r.guest);
            }
        }
        id
    }

    /// Guest id for a host id.
    pub fn to_guest(&self, id: u32) -> u32 {
        for r in &self.0 {
            if id >= r.host && id - r.host < r.count {
                return r.guest + (id - r.host);
            }
        }
        id
    }
}

/// Passthrough configuration.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Directory shared with the guest.
    pub root: PathBuf,
    /// Refuse every change.
    pub readonly: bool,
    /// Caching policy.
    pub cache: CachePolicy,
    /// Pass extended attributes through.
    pub xattr: bool,
    /// Flag host mount points so the guest shows them as submounts.
    pub announce_submounts: bool,
    /// Allow MKNOD of block and character devices.
    pub allow_devices: bool,
    /// Uid translation.
    pub uid_map: IdMap,
    /// Gid translation.
    pub gid_map: IdMap,
    /// Most inodes the guest may hold at once.
    pub max_inodes: usize,
    /// Most open file and directory handles.
    pub max_handles: usize,
}

impl FsConfig {
    /// Defaults for sharing `root`.
    pub fn new(root: PathBuf) -> Self {
        FsConfig {
            root,
            readonly: false,
            cache: CachePolicy::Auto,
            xattr: false,
            announce_submounts: false,
            allow_devices: false,
            uid_map: IdMap::default(),
            gid_map: IdMap::default(),
            max_inodes: 1 << 20,
            max_handles: 1 << 16,
        }
    }
}

/// Who sent a request (from the FUSE in-header).
#[derive(Debug, Clone, Copy, Default)]
pub struct Caller {
    /// Guest uid.
    pub uid: u32,
    /// Guest gid.
    pub gid: u32,
}

struct Inode {
    /// `O_PATH | O_NOFOLLOW` descriptor.
    fd: OwnedFd,
    dev: u64,
    ino: u64,
    /// File type bits of st_mode.
    kind: u32,
    /// FUSE lookup count; the inode goes when FORGET brings it to zero.
    lookups: AtomicU64,
}

enum Handle {
    File(OwnedFd),
    Dir(Mutex<OwnedFd>),
}

#[derive(Default)]
struct Inodes {
    by_id: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
}

/// The passthrough filesystem; shared by all queue threads.
pub struct PassthroughFs {
    cfg: FsConfig,
    inodes: RwLock<Inodes>,
    next_node: AtomicU64,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    next_handle: AtomicU64,
    /// `/proc/self/fd`, opened before any sandboxing, to reopen `O_PATH` descriptors.
    proc_self_fd: OwnedFd,
    root_dev: u64,
    am_root: bool,
    /// Our effective uid and gid.
    own_ids: (u32, u32),
}

/// A name the guest sent, checked to be one path component, NUL-terminated on the stack.
struct Component {
    buf: [u8; 256],
    len: usize,
}

impl std::ops::Deref for Component {
    type Target = CStr;
    fn deref(&self) -> &CStr {
        CStr::from_bytes_with_nul(&self.buf[..=self.len]).expect("one NUL, at the end")
    }
}

/// Check that `name` is one path component.
fn component(name: &[u8]) -> FsResult<Component> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    if name.contains(&0) {
        return Err(libc::EINVAL);
    }
    let mut c = Component {
        buf: [0; 256],
        len: name.len(),
    };
    c.buf[..name.len()].copy_from_slice(name);
    Ok(c)
}

impl PassthroughFs {
    /// Open the shared directory (and `/proc/self/fd`).
    pub fn new(cfg: FsConfig) -> io::Result<Self> {
        let proc_self_fd = sys::open_path(
            std::path::Path::new("/proc/self/fd"),
            libc::O_PATH | libc::O_DIRECTORY,
        )?;
        let root = sys::open_path(&cfg.root, libc::O_PATH | libc::O_DIRECTORY)?;
        let st = sys::fstat(root.as_fd())?;
        let root_inode = Arc::new(Inode {
            fd: root,
            dev: st.st_dev,
            ino: st.st_ino,
            kind: st.st_mode & libc::S_IFMT,
            lookups: AtomicU64::new(2),
        });
        let mut inodes = Inodes::default();
        inodes.by_key.insert((st.st_dev, st.st_ino), abi::ROOT_ID);
        inodes.by_id.insert(abi::ROOT_ID, root_inode);
        // Modes the guest asks for are applied exactly (the guest already applied its umask).
        // SAFETY: umask cannot fail.
        unsafe { libc::umask(0) };
        // SAFETY: geteuid cannot fail.
        let am_root = unsafe { libc::geteuid() } == 0;
        Ok(PassthroughFs {
            root_dev: st.st_dev,
            cfg,
            inodes: RwLock::new(inodes),
            next_node: AtomicU64::new(abi::ROOT_ID + 1),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            proc_self_fd,
            am_root,
            // SAFETY: getegid cannot fail.
            own_ids: (unsafe { libc::geteuid() }, unsafe { libc::getegid() }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    /// Inodes held by the guest (root included).
    pub fn inode_count(&self) -> usize {
        self.inodes.read().map(|i| i.by_id.len()).unwrap_or(0)
    }

    /// Open handles.
    pub fn handle_count(&self) -> usize {
        self.handles.read().map(|h| h.len()).unwrap_or(0)
    }

    fn timeout(&self) -> Duration {
        match self.cfg.cache {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86400),
        }
    }

    fn inode(&self, node: u64) -> FsResult<Arc<Inode>> {
        let inodes = self.inodes.read().map_err(|_| libc::EIO)?;
        inodes.by_id.get(&node).cloned().ok_or(libc::EBADF)
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        let handles = self.handles.read().map_err(|_| libc::EIO)?;
        handles.get(&fh).cloned().ok_or(libc::EBADF)
    }

    /// The descriptor of an open file handle, for READ/WRITE.
    pub fn file_fd(&self, fh: u64) -> FsResult<FileRef> {
        let h = self.handle(fh)?;
        let raw = match &*h {
            Handle::File(fd) => fd.as_raw_fd(),
            Handle::Dir(_) => return Err(libc::EISDIR),
        };
        Ok(FileRef { _handle: h, raw })
    }

    fn writable(&self) -> FsResult<()> {
        if self.cfg.readonly {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    fn to_attr(&self, st: &libc::stat64) -> Attr {
        let mut flags = 0;
        if self.cfg.announce_submounts
            && st.st_dev != self.root_dev
            && st.st_mode & libc::S_IFMT == libc::S_IFDIR
        {
            flags |= abi::ATTR_SUBMOUNT;
        }
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime as u64,
            mtime: st.st_mtime as u64,
            ctime: st.st_ctime as u64,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: self.cfg.uid_map.to_guest(st.st_uid),
            gid: self.cfg.gid_map.to_guest(st.st_gid),
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags,
        }
    }

    fn entry(&self, node: u64, st: &libc::stat64) -> EntryOut {
        let t = self.timeout();
        EntryOut {
            nodeid: node,
            generation: 0,
            entry_valid: t.as_secs(),
            attr_valid: t.as_secs(),
            entry_valid_nsec: 0,
            attr_valid_nsec: 0,
            attr: self.to_attr(st),
        }
    }

    /// Count one more lookup of an inode already in the table.
    fn reference_known(&self, st: &libc::stat64) -> Option<EntryOut> {
        let inodes = self.inodes.read().ok()?;
        let node = *inodes.by_key.get(&(st.st_dev, st.st_ino))?;
        let inode = inodes.by_id.get(&node)?;
        // FORGET removes entries under the write lock, so the inode stays while we hold the
        // read lock.
        inode.lookups.fetch_add(1, Ordering::Relaxed);
        Some(self.entry(node, st))
    }

    /// Register (or re-reference) the inode behind `fd`, counting one lookup.
    fn intern(&self, fd: OwnedFd, st: &libc::stat64) -> FsResult<EntryOut> {
        let key = (st.st_dev, st.st_ino);
        let mut inodes = self.inodes.write().map_err(|_| libc::EIO)?;
        if let Some(&node) = inodes.by_key.get(&key) {
            if let Some(inode) = inodes.by_id.get(&node) {
                inode.lookups.fetch_add(1, Ordering::Relaxed);
                return Ok(self.entry(node, st));
            }
        }
        if inodes.by_id.len() >= self.cfg.max_inodes {
            log::warn!("inode table full ({} entries)", self.cfg.max_inodes);
            return Err(libc::ENFILE);
        }
        let node = self.next_node.fetch_add(1, Ordering::Relaxed);
        inodes.by_id.insert(
            node,
            Arc::new(Inode {
                fd,
                dev: st.st_dev,
                ino: st.st_ino,
                kind: st.st_mode & libc::S_IFMT,
                lookups: AtomicU64::new(1),
            }),
        );
        inodes.by_key.insert(key, node);
        Ok(self.entry(node, st))
    }

    fn lookup_cstr(&self, parent: &Inode, name: &CStr) -> FsResult<EntryOut> {
        // Most lookups find an inode the guest already holds: one fstatat, no descriptor.
        let st = sys::statat(parent.fd.as_fd(), name).map_err(errno)?;
        if let Some(entry) = self.reference_known(&st) {
            return Ok(entry);
        }
        let fd = sys::openat(parent.fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(errno)?;
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        self.intern(fd, &st)
    }

    /// LOOKUP.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<EntryOut> {
        let name = component(name).map_err(|e| if e == libc::EINVAL { libc::ENOENT } else { e })?;
        let parent = self.inode(parent)?;
        self.lookup_cstr(&parent, &name)
    }

    /// FORGET: drop `count` lookups of `node`.
    pub fn forget(&self, node: u64, count: u64) {
        if node == abi::ROOT_ID {
            return;
        }
        let Ok(mut inodes) = self.inodes.write() else {
            return;
        };
        let Some(inode) = inodes.by_id.get(&node) else {
            return;
        };
        let left = inode.lookups.load(Ordering::Relaxed).saturating_sub(count);
        inode.lookups.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = (inode.dev, inode.ino);
            inodes.by_id.remove(&node);
            if inodes.by_key.get(&key) == Some(&node) {
                inodes.by_key.remove(&key);
            }
        }
    }

    /// GETATTR.
    pub fn getattr(&self, node: u64) -> FsResult<(Attr, Duration)> {
        let inode = self.inode(node)?;
        let st = sys::fstat(inode.fd.as_fd()).map_err(errno)?;
        Ok((self.to_attr(&st), self.timeout()))
    }

    /// Reopen an inode for I/O through /proc/self/fd (regular files and directories only).
    fn reopen(&self, inode: &Inode, flags: i32) -> FsResult<OwnedFd> {
        if inode.kind != libc::S_IFREG && inode.kind != libc::S_IFDIR {
            return Err(if inode.kind == libc::S_IFLNK {
                libc::ELOOP
            } else {
                libc::ENXIO
            });
        }
        let name = sys::fd_name(inode.fd.as_fd());
        sys::openat(
            self.proc_self_fd.as_fd(),
            &name,
            flags & !libc::O_NOFOLLOW,
            0,
        )
        .map_err(errno)
    }

    /// SETATTR.
    pub fn setattr(&self, node: u64, s: &SetattrIn) -> FsResult<(Attr, Duration)> {
        self.writable()?;
        let inode = self.inode(node)?;
        let proc_name = sys::fd_name(inode.fd.as_fd());
        let fh_fd = if s.valid & sv::FH != 0 {
            match &*self.handle(s.fh)? {
                Handle::File(fd) => Some(fd.try_clone().map_err(errno)?),
                Handle::Dir(_) => None,
            }
        } else {
            None
        };
        if s.valid & sv::MODE != 0 {
            if inode.kind == libc::S_IFLNK {
                return Err(libc::EOPNOTSUPP);
            }
            // SAFETY: the name is NUL-terminated; the proc dir fd is valid.
            let r = unsafe {
                libc::fchmodat(
                    self.proc_self_fd.as_raw_fd(),
                    proc_name.as_ptr(),
                    s.mode & 0o7777,
                    0,
                )
            };
            sys::check_ret(r).map_err(errno)?;
        }
        if s.valid & (sv::UID | sv::GID) != 0 {
            let uid = if s.valid & sv::UID != 0 {
                self.cfg.uid_map.to_host(s.uid)
            } else {
                u32::MAX
            };
            let gid = if s.valid & sv::GID != 0 {
                self.cfg.gid_map.to_host(s.gid)
            } else {
                u32::MAX
            };
            // SAFETY: empty name with AT_EMPTY_PATH acts on the O_PATH descriptor itself.
            let r = unsafe {
                libc::fchownat(
                    inode.fd.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            sys::check_ret(r).map_err(errno)?;
        }
        if s.valid & sv::SIZE != 0 {
            let fd = match fh_fd {
                Some(ref fd) => fd.try_clone().map_err(errno)?,
                None => {
                    if inode.kind != libc::S_IFREG {
                        return Err(if inode.kind == libc::S_IFDIR {
                            libc::EISDIR
                        } else {
                            libc::EINVAL
                        });
                    }
                    self.reopen(&inode, libc::O_WRONLY)?
                }
            };
            // SAFETY: plain syscall on a valid descriptor.
            let r = unsafe { libc::ftruncate64(fd.as_raw_fd(), s.size as i64) };
            sys::check_ret(r).map_err(errno)?;
        }
        if s.valid & (sv::ATIME | sv::MTIME | sv::ATIME_NOW | sv::MTIME_NOW) != 0 {
            let omit = libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            };
            let now = libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            };
            let pick = |set: u32, set_now: u32, sec: u64, nsec: u32| {
                if s.valid & set_now != 0 {
                    now
                } else if s.valid & set != 0 {
                    libc::timespec {
                        tv_sec: sec as i64,
                        tv_nsec: i64::from(nsec),
                    }
                } else {
                    omit
                }
            };
            let times = [
                pick(sv::ATIME, sv::ATIME_NOW, s.atime, s.atimensec),
                pick(sv::MTIME, sv::MTIME_NOW, s.mtime, s.mtimensec),
            ];
            let r = if inode.kind == libc::S_IFLNK {
                // No way to set times on a symlink by descriptor without a path: refuse.
                return Err(libc::EOPNOTSUPP);
            } else {
                // SAFETY: valid name and times array of two.
                unsafe {
                    libc::utimensat(
                        self.proc_self_fd.as_raw_fd(),
                        proc_name.as_ptr(),
                        times.as_ptr(),
                        0,
                    )
                }
            };
            sys::check_ret(r).map_err(errno)?;
        }
        self.getattr(node)
    }

    /// READLINK.
    pub fn readlink(&self, node: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(node)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: empty path reads the link the O_PATH descriptor refers to; buf is valid.
        let r = unsafe {
            libc::readlinkat(
                inode.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = sys::check_len(r).map_err(errno)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Give a freshly created entry to the caller, then look it up.
    fn finish_create(&self, parent: &Inode, name: &CStr, caller: Caller) -> FsResult<EntryOut> {
        let uid = self.cfg.uid_map.to_host(caller.uid);
        let gid = self.cfg.gid_map.to_host(caller.gid);
        // New entries belong to the caller; nothing to do when that is us.
        if self.am_root && (uid, gid) != self.own_ids {
            // SAFETY: single component, no follow.
            let r = unsafe {
                libc::fchownat(
                    parent.fd.as_raw_fd(),
                    name.as_ptr(),
                    uid,
                    gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if r < 0 {
                log::debug!(
                    "cannot give new entry to {uid}:{gid}: {}",
                    io::Error::last_os_error()
                );
            }
        }
        self.lookup_cstr(parent, name)
    }

    /// Give the file just created and opened as `file` to the caller and count a lookup of
    /// it. Unlike a lookup by name this needs no path walk, and the entry is the very inode
    /// `file` refers to even if the name was replaced meanwhile: one fstat, plus an `O_PATH`
    /// reopen through `/proc/self/fd` when the inode is new to the guest.
    fn register_created(&self, file: &OwnedFd, caller: Caller) -> FsResult<EntryOut> {
        let uid = self.cfg.uid_map.to_host(caller.uid);
        let gid = self.cfg.gid_map.to_host(caller.gid);
        if self.am_root && (uid, gid) != self.own_ids {
            // SAFETY: plain syscall on a valid descriptor.
            if unsafe { libc::fchown(file.as_raw_fd(), uid, gid) } < 0 {
                log::debug!(
                    "cannot give new entry to {uid}:{gid}: {}",
                    io::Error::last_os_error()
                );
            }
        }
        let st = sys::fstat(file.as_fd()).map_err(errno)?;
        if let Some(entry) = self.reference_known(&st) {
            return Ok(entry);
        }
        let path = sys::openat(
            self.proc_self_fd.as_fd(),
            &sys::fd_name(file.as_fd()),
            libc::O_PATH,
            0,
        )
        .map_err(errno)?;
        self.intern(path, &st)
    }

    /// SYMLINK: `name` in `parent` pointing to `target` (stored verbatim; never followed here).
    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<EntryOut> {
        self.writable()?;
        let name = component(name)?;
        let target = CString::new(target).map_err(|_| libc::EINVAL)?;
        let parent = self.inode(parent)?;
        // SAFETY: both strings NUL-terminated; dir fd valid.
        let r = unsafe { libc::symlinkat(target.as_ptr(), parent.fd.as_raw_fd(), name.as_ptr()) };
        sys::check_ret(r).map_err(errno)?;
        self.finish_create(&parent, &name, caller)
    }

    /// MKNOD.
    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> FsResult<EntryOut> {
        self.writable()?;
        let name = component(name)?;
        let kind = mode & libc::S_IFMT;
        if (kind == libc::S_IFCHR || kind == libc::S_IFBLK) && !self.cfg.allow_devices {
            return Err(libc::EPERM);
        }
        let parent = self.inode(parent)?;
        // SAFETY: single component name, valid dir fd.
        let r = unsafe {
            libc::mknodat(
                parent.fd.as_raw_fd(),
                name.as_ptr(),
                mode & !umask,
                u64::from(rdev),
            )
        };
        sys::check_ret(r).map_err(errno)?;
        self.finish_create(&parent, &name, caller)
    }

    /// MKDIR.
    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
    ) -> FsResult<EntryOut> {
        self.writable()?;
        let name = component(name)?;
        let parent = self.inode(parent)?;
        // SAFETY: single component name, valid dir fd.
        let r =
            unsafe { libc::mkdirat(parent.fd.as_raw_fd(), name.as_ptr(), mode & !umask & 0o7777) };
        sys::check_ret(r).map_err(errno)?;
        self.finish_create(&parent, &name, caller)
    }

    fn remove(&self, parent: u64, name: &[u8], flags: i32) -> FsResult<()> {
        self.writable()?;
        let name = component(name)?;
        let parent = self.inode(parent)?;
        // SAFETY: single component name, valid dir fd.
        let r = unsafe { libc::unlinkat(parent.fd.as_raw_fd(), name.as_ptr(), flags) };
        sys::check_ret(r).map_err(errno)
    }

    /// UNLINK.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, 0)
    }

    /// RMDIR.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, libc::AT_REMOVEDIR)
    }

    /// RENAME / RENAME2 (`flags`: RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT).
    pub fn rename(
        &self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.writable()?;
        let oldname = component(oldname)?;
        let newname = component(newname)?;
        let olddir = self.inode(olddir)?;
        let newdir = self.inode(newdir)?;
        // SAFETY: single component names, valid dir fds.
        let r = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                olddir.fd.as_raw_fd(),
                oldname.as_ptr(),
                newdir.fd.as_raw_fd(),
                newname.as_ptr(),
                flags,
            )
        };
        sys::check_ret(r as i32).map_err(errno)
    }

    /// LINK: a new name for `node` (an inode the guest already holds, so always inside).
    pub fn link(&self, node: u64, newparent: u64, newname: &[u8]) -> FsResult<EntryOut> {
        self.writable()?;
        let newname = component(newname)?;
        let inode = self.inode(node)?;
        if inode.kind == libc::S_IFDIR {
            return Err(libc::EPERM);
        }
        let newparent = self.inode(newparent)?;
        let proc_name = sys::fd_name(inode.fd.as_fd());
        // SAFETY: the proc entry resolves to exactly the inode we hold; names are valid.
        let r = unsafe {
            libc::linkat(
                self.proc_self_fd.as_raw_fd(),
                proc_name.as_ptr(),
                newparent.fd.as_raw_fd(),
                newname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        sys::check_ret(r).map_err(errno)?;
        self.lookup_cstr(&newparent, &newname)
    }

    fn add_handle(&self, h: Handle) -> FsResult<u64> {
        let mut handles = self.handles.write().map_err(|_| libc::EIO)?;
        if handles.len() >= self.cfg.max_handles {
            return Err(libc::ENFILE);
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        handles.insert(fh, Arc::new(h));
        Ok(fh)
    }

    fn open_flags_out(&self, dir: bool) -> u32 {
        match (self.cfg.cache, dir) {
            (CachePolicy::Never, false) => abi::open_out::DIRECT_IO,
            (CachePolicy::Always, false) => abi::open_out::KEEP_CACHE,
            (CachePolicy::Always, true) => abi::open_out::CACHE_DIR,
            _ => 0,
        }
    }

    fn sanitize_open_flags(&self, flags: u32) -> FsResult<i32> {
        let flags = flags as i32 & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_PATH);
        if self.cfg.readonly
            && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0)
        {
            return Err(libc::EROFS);
        }
        Ok(flags)
    }

    /// OPEN: returns (fh, open_out flags).
    pub fn open(&self, node: u64, flags: u32) -> FsResult<(u64, u32)> {
        let flags = self.sanitize_open_flags(flags)?;
        let inode = self.inode(node)?;
        if inode.kind == libc::S_IFDIR {
            return Err(libc::EISDIR);
        }
        let fd = self.reopen(&inode, flags)?;
        Ok((
            self.add_handle(Handle::File(fd))?,
            self.open_flags_out(false),
        ))
    }

    /// CREATE: create-and-open `name` in `parent`.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        flags: u32,
        mode: u32,
        umask: u32,
    ) -> FsResult<(EntryOut, u64, u32)> {
        self.writable()?;
        let name = component(name)?;
        let parent_inode = self.inode(parent)?;
        let flags = (flags as i32 & !(libc::O_NOCTTY | libc::O_PATH | libc::O_DIRECTORY))
            | libc::O_CREAT
            | libc::O_NOFOLLOW;
        let fd = sys::openat(
            parent_inode.fd.as_fd(),
            &name,
            flags,
            (mode & !umask) & 0o7777,
        )
        .map_err(errno)?;
        let entry = self.register_created(&fd, caller)?;
        let fh = match self.add_handle(Handle::File(fd)) {
            Ok(fh) => fh,
            Err(e) => {
                self.forget(entry.nodeid, 1);
                return Err(e);
            }
        };
        Ok((entry, fh, self.open_flags_out(false)))
    }

    /// RELEASE / RELEASEDIR.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let mut handles = self.handles.write().map_err(|_| libc::EIO)?;
        handles.remove(&fh).map(|_| ()).ok_or(libc::EBADF)
    }

    /// STATFS.
    pub fn statfs(&self, node: u64) -> FsResult<Kstatfs> {
        let inode = self.inode(node)?;
        // SAFETY: zeroed statvfs is valid; fstatvfs fills it.
        let mut s: libc::statvfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and out-pointer (fstatvfs works on O_PATH descriptors).
        let r = unsafe { libc::fstatvfs64(inode.fd.as_raw_fd(), &mut s) };
        sys::check_ret(r).map_err(errno)?;
        Ok(Kstatfs {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_bsize as u32,
            namelen: s.f_namemax as u32,
            frsize: s.f_frsize as u32,
            ..Default::default()
        })
    }

    /// FSYNC / FSYNCDIR.
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let h = self.handle(fh)?;
        let run = |fd: &OwnedFd| {
            // SAFETY: plain syscalls on a valid descriptor.
            let r = unsafe {
                if datasync {
                    libc::fdatasync(fd.as_raw_fd())
                } else {
                    libc::fsync(fd.as_raw_fd())
                }
            };
            sys::check_ret(r).map_err(errno)
        };
        match &*h {
            Handle::File(fd) => run(fd),
            Handle::Dir(fd) => run(&*fd.lock().map_err(|_| libc::EIO)?),
        }
    }

    /// FLUSH: close(2) semantics for the guest's close of one descriptor.
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        if let Handle::File(fd) = &*h {
            // Closing a duplicate triggers the filesystem's flush (NFS, etc.) like close(2).
            // SAFETY: dup of a valid descriptor; the duplicate is closed right away.
            let dup = unsafe { libc::dup(fd.as_raw_fd()) };
            if dup < 0 {
                return Err(last_errno());
            }
            // SAFETY: we own `dup`.
            let r = unsafe { libc::close(dup) };
            sys::check_ret(r).map_err(errno)?;
        }
        Ok(())
    }

    fn xattr_allowed(&self, inode: &Inode) -> FsResult<()> {
        if !self.cfg.xattr {
            return Err(libc::EOPNOTSUPP);
        }
        if inode.kind != libc::S_IFREG && inode.kind != libc::S_IFDIR {
            return Err(libc::EPERM);
        }
        Ok(())
    }

    fn xattr_fd(&self, inode: &Inode) -> FsResult<OwnedFd> {
        let flags = if inode.kind == libc::S_IFDIR {
            libc::O_RDONLY | libc::O_DIRECTORY
        } else {
            libc::O_RDONLY | libc::O_NONBLOCK
        };
        self.reopen(inode, flags)
    }

    /// SETXATTR.
    pub fn setxattr(&self, node: u64, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        self.writable()?;
        let inode = self.inode(node)?;
        self.xattr_allowed(&inode)?;
        let name = CString::new(name).map_err(|_| libc::EINVAL)?;
        let fd = self.xattr_fd(&inode)?;
        // SAFETY: valid fd, name and value buffer.
        let r = unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags as i32,
            )
        };
        sys::check_ret(r).map_err(errno)
    }

    /// GETXATTR: with `size == 0` only the value's size is returned (as `Err(len)` style:
    /// the caller gets `XattrReply::Size`).
    pub fn getxattr(&self, node: u64, name: &[u8], size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(node)?;
        self.xattr_allowed(&inode)?;
        let name = CString::new(name).map_err(|_| libc::EINVAL)?;
        let fd = self.xattr_fd(&inode)?;
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid fd and name; buf valid for its length (null size asks for the size).
        let r = unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = sys::check_len(r).map_err(errno)?;
        if size == 0 {
            return Ok(XattrReply::Size(n as u32));
        }
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    /// LISTXATTR.
    pub fn listxattr(&self, node: u64, size: u32) -> FsResult<XattrReply> {
        let inode = self.inode(node)?;
        self.xattr_allowed(&inode)?;
        let fd = self.xattr_fd(&inode)?;
        let mut buf = vec![0u8; size as usize];
        // SAFETY: valid fd; buf valid for its length.
        let r = unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let n = sys::check_len(r).map_err(errno)?;
        if size == 0 {
            return Ok(XattrReply::Size(n as u32));
        }
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    /// REMOVEXATTR.
    pub fn removexattr(&self, node: u64, name: &[u8]) -> FsResult<()> {
        self.writable()?;
        let inode = self.inode(node)?;
        self.xattr_allowed(&inode)?;
        let name = CString::new(name).map_err(|_| libc::EINVAL)?;
        let fd = self.xattr_fd(&inode)?;
        // SAFETY: valid fd and name.
        let r = unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) };
        sys::check_ret(r).map_err(errno)
    }

    /// OPENDIR.
    pub fn opendir(&self, node: u64) -> FsResult<(u64, u32)> {
        let inode = self.inode(node)?;
        if inode.kind != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        let fd = sys::openat(
            inode.fd.as_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(errno)?;
        Ok((
            self.add_handle(Handle::Dir(Mutex::new(fd)))?,
            self.open_flags_out(true),
        ))
    }

    /// READDIR / READDIRPLUS: call `emit` for entries from `offset` on until it returns false
    /// (no room). With `plus`, each entry (but `.` and `..`) is looked up first; `emit` gets
    /// the entry and must return false without keeping it when out of room, in which case the
    /// lookup is undone.
    pub fn readdir(
        &self,
        node: u64,
        fh: u64,
        offset: u64,
        plus: bool,
        emit: &mut dyn FnMut(&DirEntry<'_>, Option<&EntryOut>) -> bool,
    ) -> FsResult<()> {
        let h = self.handle(fh)?;
        let Handle::Dir(dir) = &*h else {
            return Err(libc::ENOTDIR);
        };
        let parent = if plus { Some(self.inode(node)?) } else { None };
        let dir = dir.lock().map_err(|_| libc::EIO)?;
        sys::lseek(dir.as_fd(), offset as i64, libc::SEEK_SET).map_err(errno)?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = sys::getdents(dir.as_fd(), &mut buf).map_err(errno)?;
            if n == 0 {
                return Ok(());
            }
            let mut pos = 0;
            while pos + 19 <= n {
                let rec = &buf[pos..n];
                let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
                let off = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
                let reclen = usize::from(u16::from_ne_bytes([rec[16], rec[17]]));
                let typ = rec[18];
                if reclen < 19 || reclen > rec.len() {
                    return Err(libc::EIO);
                }
                let name_bytes = &rec[19..reclen];
                let name_len = name_bytes
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(name_bytes.len());
                let name = &name_bytes[..name_len];
                pos += reclen;
                let entry = DirEntry {
                    ino,
                    offset: off,
                    typ: u32::from(typ),
                    name,
                };
                let kept = match &parent {
                    Some(p) if name != b"." && name != b".." => {
                        let Ok(cname) = CString::new(name) else {
                            continue;
                        };
                        match self.lookup_cstr(p, &cname) {
                            Ok(e) => {
                                let kept = emit(&entry, Some(&e));
                                if !kept {
                                    self.forget(e.nodeid, 1);
                                }
                                kept
                            }
                            // Gone since getdents: skip it.
                            Err(_) => true,
                        }
                    }
                    Some(_) => emit(&entry, Some(&EntryOut::default())),
                    None => emit(&entry, None),
                };
                if !kept {
                    return Ok(());
                }
            }
        }
    }

    /// ACCESS: checked against the host inode with the daemon's credentials, after the
    /// guest's own permission checks.
    pub fn access(&self, node: u64, mask: u32) -> FsResult<()> {
        let inode = self.inode(node)?;
        if mask & libc::W_OK as u32 != 0 && self.cfg.readonly {
            return Err(libc::EROFS);
        }
        let name = sys::fd_name(inode.fd.as_fd());
        if inode.kind == libc::S_IFLNK {
            return Ok(());
        }
        // SAFETY: valid dir fd and name.
        let r = unsafe {
            libc::faccessat(self.proc_self_fd.as_raw_fd(), name.as_ptr(), mask as i32, 0)
        };
        sys::check_ret(r).map_err(errno)
    }

    /// FALLOCATE.
    pub fn fallocate(&self, fh: u64, mode: u32, offset: u64, length: u64) -> FsResult<()> {
        self.writable()?;
        let f = self.file_fd(fh)?;
        // SAFETY: plain syscall on a valid descriptor.
        let r = unsafe {
            libc::fallocate64(
                f.fd().as_raw_fd(),
                mode as i32,
                offset as i64,
                length as i64,
            )
        };
        sys::check_ret(r).map_err(errno)
    }

    /// LSEEK (SEEK_DATA / SEEK_HOLE and the plain ones).
    pub fn lseek(&self, fh: u64, offset: u64, whence: u32) -> FsResult<u64> {
        let f = self.file_fd(fh)?;
        sys::lseek(f.fd(), offset as i64, whence as i32).map_err(errno)
    }

    /// COPY_FILE_RANGE between two open handles.
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u64,
    ) -> FsResult<u64> {
        self.writable()?;
        let fin = self.file_fd(fh_in)?;
        let fout = self.file_fd(fh_out)?;
        let mut oi = off_in as i64;
        let mut oo = off_out as i64;
        // SAFETY: valid descriptors and offset pointers.
        let r = unsafe {
            libc::copy_file_range(
                fin.fd().as_raw_fd(),
                &mut oi,
                fout.fd().as_raw_fd(),
                &mut oo,
                len.min(isize::MAX as u64) as usize,
                flags as u32,
            )
        };
        sys::check_len(r).map(|n| n as u64).map_err(errno)
    }

    /// SYNCFS.
    pub fn syncfs(&self, node: u64) -> FsResult<()> {
        let inode = self.inode(node)?;
        let fd = self.reopen(
            &inode,
            libc::O_RDONLY
                | if inode.kind == libc::S_IFDIR {
                    libc::O_DIRECTORY
                } else {
                    libc::O_NONBLOCK
                },
        )?;
        // SAFETY: plain syscall on a valid descriptor.
        sys::check_ret(unsafe { libc::syncfs(fd.as_raw_fd()) }).map_err(errno)
    }

    /// DESTROY: the guest unmounted; drop everything it held.
    pub fn destroy(&self) {
        if let Ok(mut h) = self.handles.write() {
            h.clear();
        }
        if let Ok(mut inodes) = self.inodes.write() {
            inodes.by_id.retain(|&id, _| id == abi::ROOT_ID);
            inodes.by_key.retain(|_, id| *id == abi::ROOT_ID);
        }
    }
}

/// A GETXATTR/LISTXATTR answer.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    /// Size probe answer.
    Size(u32),
    /// The value or list.
    Data(Vec<u8>),
}

/// One directory entry from the host.
pub struct DirEntry<'a> {
    /// Host inode number.
    pub ino: u64,
    /// Offset of the next entry.
    pub offset: u64,
    /// DT_* type.
    pub typ: u32,
    /// Name.
    pub name: &'a [u8],
}

/// An open file handle kept alive during one I/O request (RELEASE may race with it).
pub struct FileRef {
    _handle: Arc<Handle>,
    raw: std::os::fd::RawFd,
}

impl FileRef {
    /// The descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: `raw` belongs to the OwnedFd inside `_handle`, which this FileRef keeps
        // alive for at least the borrow's lifetime.
        unsafe { BorrowedFd::borrow_raw(self.raw) }
    }
}

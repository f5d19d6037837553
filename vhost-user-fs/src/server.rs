//! Request dispatch: decodes one FUSE request, runs it on the [`PassthroughFs`] and encodes the
//! reply. Transport-neutral: the virtqueue backend and the unit tests drive it the same way.

use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::ByteValued;

use crate::fuse::abi::{self, init_flags as f, opcode as op, InHeader, OutHeader};
use crate::fuse::{BodyReader, DecodeError, ReplySink, WritePayload};
use crate::passthrough::{Caller, Errno, PassthroughFs, XattrReply};

/// Largest WRITE (and READ) we accept: the guest splits bigger I/O.
pub const MAX_WRITE: u32 = 1 << 20;
const OUT_HEADER: usize = std::mem::size_of::<OutHeader>();
const INIT_FLAGS: u64 = f::ASYNC_READ
    | f::ATOMIC_O_TRUNC
    | f::BIG_WRITES
    | f::AUTO_INVAL_DATA
    | f::DO_READDIRPLUS
    | f::READDIRPLUS_AUTO
    | f::ASYNC_DIO
    | f::PARALLEL_DIROPS
    | f::MAX_PAGES
    | f::CACHE_SYMLINKS;

/// A FUSE session over one passthrough filesystem.
pub struct Server {
    fs: PassthroughFs,
    initialized: AtomicBool,
}

impl From<DecodeError> for Fail {
    fn from(e: DecodeError) -> Self {
        log::debug!("bad request: {e}");
        Fail(libc::EINVAL)
    }
}

/// An operation's error, sent as the reply's negative errno.
struct Fail(Errno);

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail(e)
    }
}

type Outcome = Result<Reply, Fail>;

/// What to answer.
enum Reply {
    /// No reply at all (FORGET, BATCH_FORGET, INTERRUPT).
    None,
    /// A reply already written to the sink, with this payload length.
    Written(usize),
    /// A reply payload to write after the header.
    Data(Vec<u8>),
    /// A small reply payload (the first `.1` bytes), kept off the heap.
    Inline([u8; INLINE_REPLY], usize),
}

/// Room for the largest fixed-size reply (CREATE: entry and open parts).
const INLINE_REPLY: usize = 144;

fn obj<T: ByteValued>(v: T) -> Reply {
    concat(&[v.as_slice()])
}

/// `parts` one after the other as a reply payload; on the stack when it fits.
fn concat(parts: &[&[u8]]) -> Reply {
    let len = parts.iter().map(|p| p.len()).sum();
    if len > INLINE_REPLY {
        return Reply::Data(parts.concat());
    }
    let mut buf = [0u8; INLINE_REPLY];
    let mut at = 0;
    for p in parts {
        buf[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    Reply::Inline(buf, len)
}

impl Server {
    /// A session over `fs`.
    pub fn new(fs: PassthroughFs) -> Self {
        Server {
            fs,
            initialized: AtomicBool::new(false),
        }
    }

    /// The filesystem.
    pub fn fs(&self) -> &PassthroughFs {
        &self.fs
    }

    /// Forget all session state (frontend gone).
    pub fn reset(&self) {
        self.initialized.store(false, Ordering::Relaxed);
        self.fs.destroy();
    }

    /// Handle one request; returns the reply's length in `out` (0: no reply written).
    ///
    /// `body` holds the request after its header (for WRITE only the `fuse_write_in`; the
    /// data is in `payload`).
    pub fn handle(
        &self,
        h: &InHeader,
        body: &[u8],
        payload: &mut dyn WritePayload,
        out: &mut dyn ReplySink,
    ) -> usize {
        let result = if !self.initialized.load(Ordering::Relaxed)
            && h.opcode != op::INIT
            && h.opcode != op::FORGET
            && h.opcode != op::BATCH_FORGET
            && h.opcode != op::INTERRUPT
        {
            Err(Fail(libc::EIO))
        } else {
            self.dispatch(h, body, payload, out)
        };
        match result {
            Ok(Reply::None) => 0,
            Ok(Reply::Written(n)) => finish(out, h.unique, 0, n),
            Ok(Reply::Data(data)) => reply(out, h.unique, &data),
            Ok(Reply::Inline(buf, len)) => reply(out, h.unique, &buf[..len]),
            Err(Fail(e)) => error(out, h.unique, e),
        }
    }

    fn dispatch(
        &self,
        h: &InHeader,
        body: &[u8],
        payload: &mut dyn WritePayload,
        out: &mut dyn ReplySink,
    ) -> Outcome {
        let fs = &self.fs;
        let mut r = BodyReader::new(body);
        let node = h.nodeid;
        let caller = Caller {
            uid: h.uid,
            gid: h.gid,
        };
        match h.opcode {
            op::INIT => self.init(&mut r),
            op::DESTROY => {
                self.reset();
                Ok(Reply::Data(Vec::new()))
            }
            op::LOOKUP => Ok(obj(fs.lookup(node, r.name()?)?)),
            op::FORGET => {
                let a: abi::ForgetIn = r.obj()?;
                fs.forget(node, a.nlookup);
                Ok(Reply::None)
            }
            op::BATCH_FORGET => {
                let a: abi::BatchForgetIn = r.obj()?;
                // Only as many entries as the body holds, whatever `count` claims.
                for _ in 0..a.count {
                    let Ok(one) = r.obj::<abi::ForgetOne>() else {
                        break;
                    };
                    fs.forget(one.nodeid, one.nlookup);
                }
                Ok(Reply::None)
            }
            op::INTERRUPT => Ok(Reply::None),
            op::GETATTR => {
                let (attr, t) = fs.getattr(node)?;
                Ok(obj(abi::AttrOut {
                    attr_valid: t.as_secs(),
                    attr,
                    ..Default::default()
                }))
            }
            op::SETATTR => {
                let a: abi::SetattrIn = r.obj()?;
                let (attr, t) = fs.setattr(node, &a)?;
                Ok(obj(abi::AttrOut {
                    attr_valid: t.as_secs(),
                    attr,
                    ..Default::default()
                }))
            }
            op::READLINK => Ok(Reply::Data(fs.readlink(node)?)),
            op::SYMLINK => {
                let name = r.name()?;
                let target = r.name()?;
                Ok(obj(fs.symlink(caller, node, name, target)?))
            }
            op::MKNOD => {
                let a: abi::MknodIn = r.obj()?;
                Ok(obj(fs.mknod(
                    caller,
                    node,
                    r.name()?,
                    a.mode,
                    a.rdev,
                    a.umask,
                )?))
            }
            op::MKDIR => {
                let a: abi::MkdirIn = r.obj()?;
                let mode = a.mode | libc::S_IFDIR;
                Ok(obj(fs.mkdir(caller, node, r.name()?, mode, a.umask)?))
            }
            op::UNLINK => {
                fs.unlink(node, r.name()?)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::RMDIR => {
                fs.rmdir(node, r.name()?)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::RENAME | op::RENAME2 => {
                let (newdir, flags) = if h.opcode == op::RENAME {
                    (r.obj::<abi::RenameIn>()?.newdir, 0)
                } else {
                    let a: abi::Rename2In = r.obj()?;
                    (a.newdir, a.flags)
                };
                let old = r.name()?;
                let new = r.name()?;
                fs.rename(node, old, newdir, new, flags)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::LINK => {
                let a: abi::LinkIn = r.obj()?;
                Ok(obj(fs.link(a.oldnodeid, node, r.name()?)?))
            }
            op::OPEN => {
                let a: abi::OpenIn = r.obj()?;
                let (fh, open_flags) = fs.open(node, a.flags)?;
                Ok(obj(abi::OpenOut {
                    fh,
                    open_flags,
                    backing_id: 0,
                }))
            }
            op::CREATE => {
                let a: abi::CreateIn = r.obj()?;
                let (entry, fh, open_flags) =
                    fs.create(caller, node, r.name()?, a.flags, a.mode, a.umask)?;
                let open = abi::OpenOut {
                    fh,
                    open_flags,
                    backing_id: 0,
                };
                Ok(concat(&[entry.as_slice(), open.as_slice()]))
            }
            op::READ => {
                let a: abi::ReadIn = r.obj()?;
                let file = fs.file_fd(a.fh)?;
                let room = out.capacity().saturating_sub(OUT_HEADER);
                if room == 0 && a.size > 0 {
                    return Err(Fail(libc::EOVERFLOW));
                }
                let len = (a.size.min(MAX_WRITE) as usize).min(room);
                let n = out
                    .read_file_into(OUT_HEADER, file.fd(), a.offset, len)
                    .map_err(|e| Fail(e.raw_os_error().unwrap_or(libc::EIO)))?;
                Ok(Reply::Written(n))
            }
            op::WRITE => {
                let a: abi::WriteIn = r.obj()?;
                if fs.config().readonly {
                    return Err(Fail(libc::EROFS));
                }
                if a.size > MAX_WRITE || (a.size as usize) > payload.len() {
                    return Err(Fail(libc::EINVAL));
                }
                let file = fs.file_fd(a.fh)?;
                let n = payload
                    .write_to_file(file.fd(), a.offset, a.size as usize)
                    .map_err(|e| Fail(e.raw_os_error().unwrap_or(libc::EIO)))?;
                Ok(obj(abi::WriteOut {
                    size: n as u32,
                    padding: 0,
                }))
            }
            op::STATFS => Ok(obj(abi::Kstatfs { ..fs.statfs(node)? })),
            op::RELEASE | op::RELEASEDIR => {
                let a: abi::ReleaseIn = r.obj()?;
                fs.release(a.fh)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::FSYNC | op::FSYNCDIR => {
                let a: abi::FsyncIn = r.obj()?;
                fs.fsync(a.fh, a.fsync_flags & 1 != 0)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::FLUSH => {
                let a: abi::FlushIn = r.obj()?;
                fs.flush(a.fh)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::SETXATTR => {
                let a: abi::SetxattrIn = r.obj()?;
                let name = r.name()?;
                let value = r.bytes(a.size as usize)?;
                fs.setxattr(node, name, value, a.flags)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::GETXATTR | op::LISTXATTR => {
                let a: abi::GetxattrIn = r.obj()?;
                let size = a.size.min(1 << 16);
                let reply = if h.opcode == op::GETXATTR {
                    fs.getxattr(node, r.name()?, size)?
                } else {
                    fs.listxattr(node, size)?
                };
                Ok(match reply {
                    XattrReply::Size(n) => obj(abi::GetxattrOut {
                        size: n,
                        padding: 0,
                    }),
                    XattrReply::Data(d) => Reply::Data(d),
                })
            }
            op::REMOVEXATTR => {
                fs.removexattr(node, r.name()?)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::OPENDIR => {
                let _a: abi::OpenIn = r.obj()?;
                let (fh, open_flags) = fs.opendir(node)?;
                Ok(obj(abi::OpenOut {
                    fh,
                    open_flags,
                    backing_id: 0,
                }))
            }
            op::READDIR | op::READDIRPLUS => {
                let a: abi::ReadIn = r.obj()?;
                let room = (a.size as usize)
                    .min(out.capacity().saturating_sub(OUT_HEADER))
                    .min(MAX_WRITE as usize);
                let data = self.readdir(node, &a, room, h.opcode == op::READDIRPLUS)?;
                Ok(Reply::Data(data))
            }
            op::ACCESS => {
                let a: abi::AccessIn = r.obj()?;
                fs.access(node, a.mask)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::FALLOCATE => {
                let a: abi::FallocateIn = r.obj()?;
                fs.fallocate(a.fh, a.mode, a.offset, a.length)?;
                Ok(Reply::Data(Vec::new()))
            }
            op::LSEEK => {
                let a: abi::LseekIn = r.obj()?;
                let offset = fs.lseek(a.fh, a.offset, a.whence)?;
                Ok(obj(abi::LseekOut { offset }))
            }
            op::COPY_FILE_RANGE => {
                let a: abi::CopyFileRangeIn = r.obj()?;
                let n =
                    fs.copy_file_range(a.fh_in, a.off_in, a.fh_out, a.off_out, a.len, a.flags)?;
                Ok(obj(abi::WriteOut {
                    size: n.min(u64::from(u32::MAX)) as u32,
                    padding: 0,
                }))
            }
            op::SYNCFS => {
                fs.syncfs(node)?;
                Ok(Reply::Data(Vec::new()))
            }
            other => {
                log::debug!("unsupported opcode {other}");
                Err(Fail(libc::ENOSYS))
            }
        }
    }

    fn init(&self, r: &mut BodyReader<'_>) -> Outcome {
        let a: abi::InitIn = r.obj()?;
        if a.major < abi::KERNEL_VERSION {
            log::warn!("guest speaks FUSE {}.{}: too old", a.major, a.minor);
            return Err(Fail(libc::EPROTO));
        }
        let mut out = abi::InitOut {
            major: abi::KERNEL_VERSION,
            minor: abi::KERNEL_MINOR_VERSION,
            ..Default::default()
        };
        if a.major > abi::KERNEL_VERSION {
            // The kernel retries INIT with our major version.
            return Ok(obj(out));
        }
        if a.minor < abi::MIN_KERNEL_MINOR_VERSION {
            log::warn!("guest speaks FUSE 7.{}: too old", a.minor);
            return Err(Fail(libc::EPROTO));
        }
        let mut kernel = u64::from(a.flags);
        if kernel & f::INIT_EXT != 0 {
            if let Ok(flags2) = r.obj::<u32>() {
                kernel |= u64::from(flags2) << 32;
            }
        }
        let mut ours = INIT_FLAGS;
        if self.fs.config().announce_submounts {
            ours |= f::SUBMOUNTS;
        }
        let flags = kernel & ours;
        out.minor = a.minor.min(abi::KERNEL_MINOR_VERSION);
        out.max_readahead = a.max_readahead;
        out.flags = flags as u32;
        out.flags2 = (flags >> 32) as u32;
        out.max_background = 64;
        out.congestion_threshold = 48;
        out.max_write = MAX_WRITE;
        out.time_gran = 1;
        out.max_pages = (MAX_WRITE / 4096) as u16;
        // No DAX window: map alignment stays 0.
        out.map_alignment = 0;
        self.initialized.store(true, Ordering::Relaxed);
        log::info!(
            "guest connected: FUSE 7.{} (ours 7.{}), flags {flags:#x}",
            a.minor,
            abi::KERNEL_MINOR_VERSION
        );
        Ok(obj(out))
    }

    fn readdir(
        &self,
        node: u64,
        a: &abi::ReadIn,
        room: usize,
        plus: bool,
    ) -> Result<Vec<u8>, Fail> {
        let mut data = Vec::with_capacity(room.min(64 * 1024));
        self.fs
            .readdir(node, a.fh, a.offset, plus, &mut |e, entry| {
                let padded = (e.name.len() + 7) & !7;
                let entry_len = if plus {
                    std::mem::size_of::<abi::EntryOut>()
                } else {
                    0
                };
                let need = entry_len + std::mem::size_of::<abi::Dirent>() + padded;
                if data.len() + need > room {
                    return false;
                }
                if let Some(entry) = entry {
                    data.extend_from_slice(entry.as_slice());
                }
                let d = abi::Dirent {
                    ino: e.ino,
                    off: e.offset,
                    namelen: e.name.len() as u32,
                    typ: e.typ,
                };
                data.extend_from_slice(d.as_slice());
                data.extend_from_slice(e.name);
                data.resize(data.len() + padded - e.name.len(), 0);
                true
            })?;
        Ok(data)
    }
}

/// A successful reply with `data` after the header.
fn reply(out: &mut dyn ReplySink, unique: u64, data: &[u8]) -> usize {
    if OUT_HEADER + data.len() > out.capacity() {
        return error(out, unique, libc::EOVERFLOW);
    }
    match out.write_at(OUT_HEADER, &[data]) {
        Ok(()) => finish(out, unique, 0, data.len()),
        Err(_) => error(out, unique, libc::EIO),
    }
}

fn finish(out: &mut dyn ReplySink, unique: u64, err: i32, payload: usize) -> usize {
    let len = OUT_HEADER + payload;
    let h = OutHeader {
        len: len as u32,
        error: err,
        unique,
    };
    match out.write_at(0, &[h.as_slice()]) {
        Ok(()) => len,
        Err(_) => 0,
    }
}

fn error(out: &mut dyn ReplySink, unique: u64, errno: Errno) -> usize {
    if out.capacity() < OUT_HEADER {
        return 0;
    }
    finish(out, unique, -errno, 0)
}

//! The `VhostUserBackend` of the fs device: the hiprio queue plus N request queues, each
//! served by its own worker thread; config space; and the transport between descriptor
//! chains and the FUSE [`Server`]: the request is read from the chain's readable part, the
//! reply written into its writable part, and READ/WRITE data moves between the file and guest
//! memory with preadv/pwritev on the mapped guest buffers.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::{DeviceBackend, GuestMemoryAtomic, GuestMemoryMmap, Vring};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::fuse::abi::{opcode, InHeader, OutHeader};
use crate::fuse::{ReplySink, WritePayload};
use crate::server::{Server, MAX_WRITE};

/// Largest queue size (QEMU's vhost-user-fs-pci accepts up to 1024).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Most request queues (queues map to threads through a 64-bit mask; one is hiprio).
pub const MAX_REQUEST_QUEUES: usize = 63;
/// Length of the tag in config space.
pub const TAG_LEN: usize = 36;
/// Largest non-WRITE request body we copy out of the guest (SETXATTR values are ≤ 64 KiB).
const MAX_BODY: usize = 128 * 1024;
const IN_HEADER: usize = std::mem::size_of::<InHeader>();

/// Bad device configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The tag does not fit config space.
    #[error("--tag must be 1 to {TAG_LEN} bytes, not {0}")]
    Tag(usize),
    /// Request queue count out of range.
    #[error("--num-request-queues must be between 1 and {MAX_REQUEST_QUEUES}, not {0}")]
    Queues(usize),
}

/// One descriptor's guest range.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: u64,
    len: usize,
}

/// The fs device; clones share one FUSE session.
#[derive(Clone)]
pub struct FsBackend(Arc<Inner>);

struct Inner {
    server: Arc<Server>,
    tag: [u8; TAG_LEN],
    request_queues: usize,
    mem: RwLock<Option<GuestMemoryAtomic>>,
    event_idx: AtomicBool,
    /// How long a queue thread keeps looking for the next request before sleeping.
    poll: Duration,
}

impl FsBackend {
    /// A device serving `server` under `tag` with `request_queues` request queues.
    pub fn new(
        server: Arc<Server>,
        tag: &str,
        request_queues: usize,
        poll: Duration,
    ) -> Result<Self, ConfigError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(ConfigError::Tag(tag.len()));
        }
        if request_queues == 0 || request_queues > MAX_REQUEST_QUEUES {
            return Err(ConfigError::Queues(request_queues));
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        Ok(FsBackend(Arc::new(Inner {
            server,
            tag: t,
            request_queues,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            poll,
        })))
    }

    /// virtio_fs_config: tag[36] then le32 num_request_queues.
    fn config_space(&self) -> [u8; TAG_LEN + 4] {
        let mut c = [0u8; TAG_LEN + 4];
        c[..TAG_LEN].copy_from_slice(&self.0.tag);
        c[TAG_LEN..].copy_from_slice(&(self.0.request_queues as u32).to_le_bytes());
        c
    }

    fn process_queue(&self, queue: usize, vring: &Vring) -> io::Result<()> {
        let Some(atomic) = self.0.mem.read().ok().and_then(|m| m.clone()) else {
            return Ok(());
        };
        let mem = atomic.memory();
        let event_idx = self.0.event_idx.load(Ordering::Relaxed);
        let mut segments = ChainSegments::default();
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mut completed = false;
            loop {
                let chain = {
                    let mut state = vring.get_mut();
                    state.get_queue_mut().pop_descriptor_chain(&*mem)
                };
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let used = handle_chain(&self.0.server, &mem, chain, queue, &mut segments);
                vring.add_used(head, used).map_err(io::Error::other)?;
                completed = true;
            }
            if completed && vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            // A guest doing synchronous I/O sends its next request right after our reply:
            // catching it here saves a sleep and a wake-up per request.
            if completed && !self.0.poll.is_zero() && self.wait_for_more(vring, &mem) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl FsBackend {
    /// Look for a new available chain on `vring` until the poll window ends. Between looks
    /// the thread yields rather than spins: on a busy host the thread about to post that chain
    /// may be waiting for this very CPU.
    fn wait_for_more(&self, vring: &Vring, mem: &GuestMemoryMmap) -> bool {
        let deadline = Instant::now() + self.0.poll;
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                if queue
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
                {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::yield_now();
        }
    }
}

/// The readable and writable descriptors of one chain; kept across the chains a queue thread
/// handles in a row so that a request costs no allocation for them.
#[derive(Default)]
struct ChainSegments {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

/// Request bodies up to this size are read onto the stack (all but SETXATTR, and names of
/// some hundred bytes).
const STACK_BODY: usize = 512;

/// Run one request chain; returns the bytes written to its writable part.
fn handle_chain<I: Iterator<Item = virtio_queue::desc::split::Descriptor>>(
    server: &Server,
    mem: &GuestMemoryMmap,
    chain: I,
    queue: usize,
    segments: &mut ChainSegments,
) -> u32 {
    let ChainSegments { readable, writable } = segments;
    readable.clear();
    writable.clear();
    for d in chain {
        let seg = Segment {
            addr: d.addr().0,
            len: d.len() as usize,
        };
        if d.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            log::warn!("queue {queue}: readable descriptor after a writable one");
            return 0;
        } else {
            readable.push(seg);
        }
    }
    let mut out = GuestSink::new(mem, writable);
    let reader = GuestRegion::new(mem, readable);
    let mut header = InHeader::default();
    if reader.read_at(0, header.as_mut_slice()).is_err() {
        log::warn!("queue {queue}: request without a readable FUSE header");
        return reply_error(&mut out, 0, libc::EINVAL);
    }
    let len = header.len as usize;
    if len < IN_HEADER || len > reader.len {
        log::warn!(
            "queue {queue}: request {} claims {len} bytes, chain has {}",
            header.unique,
            reader.len
        );
        return reply_error(&mut out, header.unique, libc::EINVAL);
    }
    let body_len = if header.opcode == opcode::WRITE {
        (len - IN_HEADER).min(std::mem::size_of::<crate::fuse::abi::WriteIn>())
    } else {
        len - IN_HEADER
    };
    if body_len > MAX_BODY {
        return reply_error(&mut out, header.unique, libc::EINVAL);
    }
    let mut stack_body = [0u8; STACK_BODY];
    let mut heap_body = Vec::new();
    let body = if body_len <= STACK_BODY {
        &mut stack_body[..body_len]
    } else {
        heap_body.resize(body_len, 0);
        &mut heap_body[..]
    };
    if reader.read_at(IN_HEADER, body).is_err() {
        return reply_error(&mut out, header.unique, libc::EFAULT);
    }
    let payload_start = IN_HEADER + body_len;
    let mut payload = GuestPayload {
        region: &reader,
        start: payload_start,
        end: len,
    };
    server.handle(&header, body, &mut payload, &mut out) as u32
}

fn reply_error(out: &mut GuestSink<'_, '_>, unique: u64, errno: i32) -> u32 {
    let h = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    if out.capacity() < h.len as usize || out.write_at(0, &[h.as_slice()]).is_err() {
        return 0;
    }
    h.len
}

/// The readable or writable part of a chain as one byte range.
struct GuestRegion<'a, 's> {
    mem: &'a GuestMemoryMmap,
    segs: &'s [Segment],
    len: usize,
}

/// The guest ranges covering a span of a [`GuestRegion`], in order.
struct Ranges<'s> {
    segs: std::slice::Iter<'s, Segment>,
    /// Bytes still to skip before the span.
    offset: usize,
    /// Bytes of the span not yielded yet.
    len: usize,
}

impl Iterator for Ranges<'_> {
    type Item = io::Result<(GuestAddress, usize)>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.len > 0 {
            let Some(s) = self.segs.next() else {
                self.len = 0;
                return Some(Err(io::Error::from_raw_os_error(libc::ERANGE)));
            };
            if self.offset >= s.len {
                self.offset -= s.len;
                continue;
            }
            let n = (s.len - self.offset).min(self.len);
            let addr = s.addr.checked_add(self.offset as u64);
            self.offset = 0;
            self.len -= n;
            return Some(
                addr.map(|a| (GuestAddress(a), n))
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT)),
            );
        }
        None
    }
}

impl<'a, 's> GuestRegion<'a, 's> {
    fn new(mem: &'a GuestMemoryMmap, segs: &'s [Segment]) -> Self {
        let len = segs.iter().fold(0usize, |acc, s| acc.saturating_add(s.len));
        GuestRegion { mem, segs, len }
    }

    /// The guest ranges covering `[offset, offset + len)`; ERANGE (before any range) when
    /// the region is shorter.
    fn ranges(&self, offset: usize, len: usize) -> io::Result<Ranges<'s>> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::from_raw_os_error(libc::ERANGE));
        }
        Ok(Ranges {
            segs: self.segs.iter(),
            offset,
            len,
        })
    }

    fn read_at(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        let mut at = 0;
        for range in self.ranges(offset, buf.len())? {
            let (addr, n) = range?;
            self.mem
                .read_slice(&mut buf[at..at + n], addr)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
            at += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: usize, buf: &[u8]) -> io::Result<()> {
        let mut at = 0;
        for range in self.ranges(offset, buf.len())? {
            let (addr, n) = range?;
            self.mem
                .write_slice(&buf[at..at + n], addr)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
            at += n;
        }
        Ok(())
    }

    /// Host iovecs for `[offset, offset + len)` plus the slices to mark dirty after a write.
    /// The pointers stay valid while `self.mem` (a loaded guest memory snapshot) lives.
    fn iovecs(
        &self,
        offset: usize,
        len: usize,
    ) -> io::Result<
        Vec<(
            libc::iovec,
            vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, BitmapMmapRegion>>,
        )>,
    > {
        let mut v = Vec::new();
        for range in self.ranges(offset, len)? {
            let (addr, n) = range?;
            for slice in self.mem.get_slices(addr, n) {
                let slice = slice.map_err(|_| io::Error::from_raw_os_error(libc::EFAULT))?;
                let iov = libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                };
                v.push((iov, slice));
            }
        }
        // preadv/pwritev take at most IOV_MAX entries; a longer list is cut (short transfer).
        v.truncate(1024);
        Ok(v)
    }
}

/// The writable part of a chain, as a FUSE reply sink.
struct GuestSink<'a, 's> {
    region: GuestRegion<'a, 's>,
}

impl<'a, 's> GuestSink<'a, 's> {
    fn new(mem: &'a GuestMemoryMmap, segs: &'s [Segment]) -> Self {
        GuestSink {
            region: GuestRegion::new(mem, segs),
        }
    }
}

impl ReplySink for GuestSink<'_, '_> {
    fn capacity(&self) -> usize {
        self.region.len
    }

    fn write_at(&mut self, offset: usize, parts: &[&[u8]]) -> io::Result<()> {
        let mut at = offset;
        for p in parts {
            self.region.write_at(at, p)?;
            at += p.len();
        }
        Ok(())
    }

    fn read_file_into(
        &mut self,
        offset: usize,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        let iovs = self.region.iovecs(offset, len)?;
        let raw: Vec<libc::iovec> = iovs.iter().map(|(i, _)| *i).collect();
        // SAFETY: every iovec points into mapped guest memory that the loaded memory snapshot
        // keeps mapped for this call; the kernel writes at most iov_len bytes to each.
        let n = unsafe {
            libc::preadv64(
                fd.as_raw_fd(),
                raw.as_ptr(),
                raw.len() as i32,
                file_offset as i64,
            )
        };
        let n = crate::sys::check_len(n)?;
        // Dirty-page logging for live migration: mark what the kernel wrote.
        let mut left = n;
        for (_, slice) in &iovs {
            if left == 0 {
                break;
            }
            let m = left.min(slice.len());
            slice.bitmap().mark_dirty(0, m);
            left -= m;
        }
        Ok(n)
    }
}

/// The data of a WRITE request, still in guest memory.
struct GuestPayload<'r, 'a, 's> {
    region: &'r GuestRegion<'a, 's>,
    start: usize,
    end: usize,
}

impl WritePayload for GuestPayload<'_, '_, '_> {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn write_to_file(
        &mut self,
        fd: BorrowedFd<'_>,
        file_offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        let len = len.min(self.len()).min(MAX_WRITE as usize);
        if len == 0 {
            return Ok(0);
        }
        let iovs = self.region.iovecs(self.start, len)?;
        let raw: Vec<libc::iovec> = iovs.iter().map(|(i, _)| *i).collect();
        // SAFETY: every iovec points into mapped guest memory kept mapped by the loaded memory
        // snapshot; the kernel only reads from them.
        let n = unsafe {
            libc::pwritev64(
                fd.as_raw_fd(),
                raw.as_ptr(),
                raw.len() as i32,
                file_offset as i64,
            )
        };
        crate::sys::check_len(n)
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1 + self.0.request_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        if let Ok(mut m) = self.0.mem.write() {
            *m = Some(mem);
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue: hiprio on thread 0, request queue i on thread i.
        (0..self.num_queues()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        common::new_exit_event()
    }

    fn handle_event(
        &self,
        _device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected events {evset:?}"),
            ));
        }
        // One queue per thread: `vrings` holds only this thread's queue (numbered 0 within it).
        let vring = vrings.first().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("thread {thread_id} has no queue"),
            )
        })?;
        self.process_queue(thread_id, vring)
    }
}

impl DeviceBackend for FsBackend {
    fn disconnected(&self) {
        if let Ok(mut m) = self.0.mem.write() {
            *m = None;
        }
        self.0.event_idx.store(false, Ordering::Relaxed);
        // A new frontend starts a new FUSE session: drop inodes and handles of the old one.
        self.0.server.reset();
    }
}

//! virtio-blk requests: walking a guest's descriptor chain with every check a hostile guest
//! needs, and executing the request against the [`Disk`].

use std::io;

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::Disk;

/// virtio-blk request types (virtio spec 5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush the write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device serial number.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Zero ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Request completed.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;
const SECTOR: u64 = 512;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// Limits the device advertises and enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most descriptors in one chain (direct or indirect).
    pub max_descriptors: usize,
    /// Most ranges in one DISCARD request.
    pub max_discard_seg: u32,
    /// Most sectors in one DISCARD range.
    pub max_discard_sectors: u32,
    /// Most ranges in one WRITE_ZEROES request.
    pub max_write_zeroes_seg: u32,
    /// Most sectors in one WRITE_ZEROES range.
    pub max_write_zeroes_sectors: u32,
}

/// Why a descriptor chain is malformed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A descriptor index beyond the (indirect) table.
    #[error("descriptor index {0} beyond the table")]
    IndexOutOfRange(u16),
    /// A descriptor could not be read from guest memory.
    #[error("descriptor table outside guest memory")]
    TableOutsideMemory,
    /// An indirect descriptor inside an indirect table.
    #[error("nested indirect descriptor")]
    NestedIndirect,
    /// INDIRECT and NEXT set on one descriptor.
    #[error("descriptor has both INDIRECT and NEXT")]
    IndirectWithNext,
    /// Indirect table length not a non-zero multiple of 16.
    #[error("indirect table of {0} bytes")]
    BadIndirectTable(u32),
    /// The chain loops or is longer than allowed.
    #[error("chain loops or exceeds {0} descriptors")]
    TooLong(usize),
}

/// Collect the descriptors of the chain at `head` into `out`.
pub fn collect_chain<M: GuestMemoryBackend>(
    mem: &M,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    max: usize,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = desc_table;
    let mut size = queue_size;
    let mut index = head;
    let mut indirect = false;
    // Bounds the walk even if the guest links descriptors into a cycle.
    let mut budget = usize::from(queue_size);
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange(index));
        }
        let addr = table
            .checked_add(u64::from(index) * 16)
            .ok_or(ChainError::TableOutsideMemory)?;
        let desc: Descriptor = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| ChainError::TableOutsideMemory)?;
        if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
            if indirect {
                return Err(ChainError::NestedIndirect);
            }
            if desc.flags() & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::IndirectWithNext);
            }
            let len = desc.len();
            if len == 0 || !len.is_multiple_of(16) || len / 16 > u32::from(u16::MAX) {
                return Err(ChainError::BadIndirectTable(len));
            }
            table = desc.addr().0;
            size = (len / 16) as u16;
            index = 0;
            indirect = true;
            budget = usize::from(size);
            continue;
        }
        out.push(desc);
        if out.len() > max {
            return Err(ChainError::TooLong(max));
        }
        if desc.flags() & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        budget -= 1;
        if budget == 0 {
            return Err(ChainError::TooLong(max));
        }
        index = desc.next();
    }
}

/// A byte range of guest memory.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A validated IN or OUT request whose data transfer is still to be done.
#[derive(Debug)]
pub struct Transfer {
    /// IN (disk to guest) rather than OUT.
    pub read: bool,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Total bytes.
    pub len: u64,
    /// The guest buffers, in order.
    pub segs: Vec<Segment>,
    /// Where the status byte goes.
    pub status_addr: u64,
    /// OUT must be durable on completion (write cache off).
    pub durable: bool,
}

impl Transfer {
    /// Host iovecs over the guest buffers. They stay valid while the guest memory mapping
    /// `mem` belongs to is alive.
    pub fn iovecs<M: GuestMemoryBackend>(&self, mem: &M) -> io::Result<Vec<libc::iovec>> {
        let mut iovs = Vec::with_capacity(self.segs.len());
        with_iovecs(mem, &self.segs, false, |v| {
            iovs.extend_from_slice(v);
            Ok(())
        })?;
        Ok(iovs)
    }

    /// Finish the request: status byte, dirty log for data the device wrote into guest
    /// memory; returns the used length.
    pub fn complete<M: GuestMemoryBackend>(&self, mem: &M, ok: bool) -> u32 {
        let status = if ok {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        };
        if ok && self.read {
            for s in &self.segs {
                for slice in mem
                    .get_slices(GuestAddress(s.addr), s.len as usize)
                    .flatten()
                {
                    slice.bitmap().mark_dirty(0, slice.len());
                }
            }
        }
        let data_len = if ok && self.read { self.len as u32 } else { 0 };
        match mem.write_obj(status, GuestAddress(self.status_addr)) {
            Ok(()) => data_len.saturating_add(1),
            Err(_) => 0,
        }
    }
}

/// What became of a request after validation.
#[derive(Debug)]
pub enum Outcome {
    /// Finished (or refused); the used length.
    Done(u32),
    /// A data transfer the I/O engine must run, then [`Transfer::complete`].
    Transfer(Transfer),
}

/// What the device state a request may depend on.
pub struct RequestContext<'a> {
    /// The disk.
    pub disk: &'a Disk,
    /// Read-only device.
    pub readonly: bool,
    /// Write cache enabled (false: writes are durable on completion).
    pub writeback: bool,
    /// GET_ID answer.
    pub serial: &'a [u8; VIRTIO_BLK_ID_BYTES],
    /// Enforced limits.
    pub limits: &'a Limits,
}

/// Execute the request described by `descs` synchronously; returns the number of bytes written
/// to the guest (the used length), including the status byte when it could be written.
pub fn execute<M: GuestMemoryBackend>(ctx: &RequestContext, mem: &M, descs: &[Descriptor]) -> u32 {
    match prepare(ctx, mem, descs) {
        Outcome::Done(used) => used,
        Outcome::Transfer(t) => {
            let result = with_iovecs(mem, &t.segs, false, |iovs| {
                if t.read {
                    ctx.disk.read_vectored(iovs, t.offset)
                } else {
                    ctx.disk.write_vectored(iovs, t.offset, t.durable)
                }
            });
            if let Err(e) = &result {
                log::warn!(
                    "{} of {} bytes at offset {} failed: {e}",
                    if t.read { "read" } else { "write" },
                    t.len,
                    t.offset
                );
            }
            t.complete(mem, result.is_ok())
        }
    }
}

/// Validate the request described by `descs` and run everything but its data transfer.
pub fn prepare<M: GuestMemoryBackend>(
    ctx: &RequestContext,
    mem: &M,
    descs: &[Descriptor],
) -> Outcome {
    let readable_count = descs
        .iter()
        .take_while(|d| d.flags() & VRING_DESC_F_WRITE == 0)
        .count();
    let (readable, writable) = descs.split_at(readable_count);
    if writable.iter().any(|d| d.flags() & VRING_DESC_F_WRITE == 0) {
        // Readable after writable: the layout is broken, but a status byte may still exist.
        log::debug!("request with a readable descriptor after a writable one");
    }
    // The status byte is the last byte of the last descriptor, which must be writable.
    let Some(last) = descs
        .last()
        .filter(|d| d.flags() & VRING_DESC_F_WRITE != 0 && d.len() > 0)
    else {
        log::debug!("request without a writable status byte; returning it unanswered");
        return Outcome::Done(0);
    };
    let status_addr = last.addr().0.checked_add(u64::from(last.len()) - 1);
    // A request whose status cannot be reported must not run: the guest would never learn
    // that its write reached the disk.
    let Some(status_addr) = status_addr.filter(|&a| mem.address_in_range(GuestAddress(a))) else {
        log::debug!("request whose status byte is outside guest memory; returning it unanswered");
        return Outcome::Done(0);
    };
    let write_status = |status: u8, data_len: u32| -> Outcome {
        Outcome::Done(match mem.write_obj(status, GuestAddress(status_addr)) {
            Ok(()) => data_len.saturating_add(1),
            Err(_) => 0,
        })
    };
    // Zero-sized buffers are not allowed (QEMU's virtqueue_pop refuses them too): a driver
    // never sends one, so a chain with one is broken or hostile.
    if writable.iter().any(|d| d.flags() & VRING_DESC_F_WRITE == 0)
        || descs.iter().any(|d| d.len() == 0)
    {
        return write_status(VIRTIO_BLK_S_IOERR, 0);
    }

    let mut readable_segs: Vec<Segment> = readable
        .iter()
        .map(|d| Segment {
            addr: d.addr().0,
            len: u64::from(d.len()),
        })
        .collect();
    let mut writable_segs: Vec<Segment> = writable
        .iter()
        .map(|d| Segment {
            addr: d.addr().0,
            len: u64::from(d.len()),
        })
        .collect();
    // The status byte is not data.
    if let Some(s) = writable_segs.last_mut() {
        s.len -= 1;
        if s.len == 0 {
            writable_segs.pop();
        }
    }

    let mut header = [0u8; HEADER_LEN];
    if take_bytes(mem, &mut readable_segs, &mut header).is_err() {
        return write_status(VIRTIO_BLK_S_IOERR, 0);
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    readable_segs.retain(|s| s.len > 0);
    let readable_len: u64 = readable_segs.iter().map(|s| s.len).sum();
    let writable_len: u64 = writable_segs.iter().map(|s| s.len).sum();

    let (status, data_len) = match request_type {
        VIRTIO_BLK_T_IN => {
            if readable_len != 0 {
                (VIRTIO_BLK_S_IOERR, 0)
            } else {
                match disk_range(ctx.disk, sector, writable_len) {
                    Some(offset) => {
                        return Outcome::Transfer(Transfer {
                            read: true,
                            offset,
                            len: writable_len,
                            segs: writable_segs,
                            status_addr,
                            durable: false,
                        })
                    }
                    None => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
        }
        VIRTIO_BLK_T_OUT => {
            if writable_len != 0 || ctx.readonly {
                (VIRTIO_BLK_S_IOERR, 0)
            } else {
                match disk_range(ctx.disk, sector, readable_len) {
                    Some(offset) => {
                        return Outcome::Transfer(Transfer {
                            read: false,
                            offset,
                            len: readable_len,
                            segs: readable_segs,
                            status_addr,
                            durable: !ctx.writeback,
                        })
                    }
                    None => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => match ctx.disk.flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => {
                log::error!("flush failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        },
        VIRTIO_BLK_T_GET_ID => {
            let n = (writable_len as usize).min(VIRTIO_BLK_ID_BYTES);
            match put_bytes(mem, &writable_segs, &ctx.serial[..n]) {
                Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                Err(()) => (VIRTIO_BLK_S_IOERR, 0),
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if ctx.readonly || writable_len != 0 {
                (VIRTIO_BLK_S_IOERR, 0)
            } else {
                (
                    ranges(ctx, mem, request_type, &mut readable_segs, readable_len),
                    0,
                )
            }
        }
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    };
    write_status(status, data_len)
}

/// Byte offset of a transfer of `len` bytes at `sector`, if it is whole sectors inside the disk.
fn disk_range(disk: &Disk, sector: u64, len: u64) -> Option<u64> {
    if !len.is_multiple_of(SECTOR) {
        return None;
    }
    let offset = sector.checked_mul(SECTOR)?;
    (offset.checked_add(len)? <= disk.size()).then_some(offset)
}

/// Copy the first `out.len()` bytes of `segs` into `out`, consuming them from `segs`.
fn take_bytes<M: GuestMemoryBackend>(
    mem: &M,
    segs: &mut [Segment],
    out: &mut [u8],
) -> Result<(), ()> {
    let mut got = 0;
    for s in segs.iter_mut() {
        if got == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - got);
        mem.read_slice(&mut out[got..got + n], GuestAddress(s.addr))
            .map_err(|_| ())?;
        s.addr += n as u64;
        s.len -= n as u64;
        got += n;
    }
    if got == out.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Write `data` into the start of `segs`.
fn put_bytes<M: GuestMemoryBackend>(mem: &M, segs: &[Segment], data: &[u8]) -> Result<(), ()> {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], GuestAddress(s.addr))
            .map_err(|_| ())?;
        done += n;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(())
    }
}

/// Run `io` over iovecs covering `segs` of guest memory; with `guest_written`, the pages are
/// marked dirty afterwards (for live migration's dirty log).
fn with_iovecs<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Segment],
    guest_written: bool,
    io: impl FnOnce(&mut [libc::iovec]) -> io::Result<()>,
) -> io::Result<()> {
    let mut slices = Vec::with_capacity(segs.len());
    for s in segs {
        let len = usize::try_from(s.len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        for slice in mem.get_slices(GuestAddress(s.addr), len) {
            slice
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("buffer outside guest memory: {e}"),
                    )
                })
                .map(|sl| slices.push(sl))?;
        }
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(&slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        })
        .collect();
    io(&mut iovs)?;
    if guest_written {
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
    Ok(())
}

/// DISCARD and WRITE_ZEROES: a list of {sector, num_sectors, flags} ranges.
fn ranges<M: GuestMemoryBackend>(
    ctx: &RequestContext,
    mem: &M,
    request_type: u32,
    segs: &mut [Segment],
    len: u64,
) -> u8 {
    let (max_seg, max_sectors) = if request_type == VIRTIO_BLK_T_DISCARD {
        (ctx.limits.max_discard_seg, ctx.limits.max_discard_sectors)
    } else {
        (
            ctx.limits.max_write_zeroes_seg,
            ctx.limits.max_write_zeroes_sectors,
        )
    };
    if len == 0
        || !len.is_multiple_of(SEGMENT_LEN as u64)
        || len / SEGMENT_LEN as u64 > u64::from(max_seg)
    {
        return VIRTIO_BLK_S_IOERR;
    }
    let mut raw = vec![0u8; len as usize];
    if take_bytes(mem, segs, &mut raw).is_err() {
        return VIRTIO_BLK_S_IOERR;
    }
    for seg in raw.chunks_exact(SEGMENT_LEN) {
        let sector = u64::from_le_bytes([
            seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
        ]);
        let num = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        if flags & !WRITE_ZEROES_FLAG_UNMAP != 0
            || (request_type == VIRTIO_BLK_T_DISCARD && flags != 0)
        {
            return VIRTIO_BLK_S_UNSUPP;
        }
        if num > max_sectors {
            return VIRTIO_BLK_S_IOERR;
        }
        let bytes = u64::from(num) * SECTOR;
        let Some(offset) = disk_range(ctx.disk, sector, bytes) else {
            return VIRTIO_BLK_S_IOERR;
        };
        let result = if request_type == VIRTIO_BLK_T_DISCARD {
            match ctx.disk.discard(offset, bytes) {
                // Discard is a hint; a disk that cannot deallocate still answers correctly.
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
                r => r,
            }
        } else {
            ctx.disk
                .write_zeroes(offset, bytes, flags & WRITE_ZEROES_FLAG_UNMAP != 0)
        };
        if let Err(e) = result {
            log::warn!("range operation at sector {sector} failed: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
    }
    if !ctx.writeback {
        if let Err(e) = ctx.disk.flush() {
            log::warn!("flush after a range operation failed: {e}");
            return VIRTIO_BLK_S_IOERR;
        }
    }
    VIRTIO_BLK_S_OK
}

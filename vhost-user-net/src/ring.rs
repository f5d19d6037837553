//! Split-virtqueue access the way a network device needs it, with every check a hostile guest
//! requires: walking descriptor chains (indirect tables, loops, out-of-range indices, memory
//! bounds), looking at available chains before consuming them (a received frame may need
//! several), and publishing a group of used chains with a single index update, so that a
//! guest never sees part of a merged frame.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_DESC_F_INDIRECT: u16 = 4;
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const DESC_SIZE: u64 = 16;

/// Why a descriptor chain cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available ring names a head beyond the queue.
    #[error("head index {0} beyond the queue")]
    HeadOutOfRange(u16),
    /// A `next` field points beyond the (indirect) table.
    #[error("descriptor index {0} beyond the table")]
    IndexOutOfRange(u16),
    /// The descriptor table is not in guest memory.
    #[error("descriptor table outside guest memory")]
    TableOutsideMemory,
    /// A buffer is not in guest memory.
    #[error("buffer at {addr:#x}+{len} outside guest memory")]
    BufferOutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// An indirect descriptor inside an indirect table, or with NEXT set.
    #[error("misplaced indirect descriptor")]
    BadIndirect,
    /// An indirect table whose length is not a non-zero multiple of 16.
    #[error("indirect table of {0} bytes")]
    BadIndirectTable(u32),
    /// The chain loops or is longer than its table.
    #[error("chain loops or is longer than its table")]
    Loop,
    /// A receive chain too small to hold even the virtio-net header.
    #[error("receive chain of {0} bytes cannot hold the virtio-net header")]
    TooSmall(usize),
    /// The chain has buffers of the wrong direction for its queue.
    #[error("{0} buffer in a chain that must hold only {1} buffers")]
    WrongDirection(&'static str, &'static str),
}

/// Which buffers a queue's chains must consist of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Device reads (transmit queue).
    DeviceReads,
    /// Device writes (receive queue).
    DeviceWrites,
}

/// Walk the chain starting at `head` into `out` (indirect tables flattened).
pub fn walk_chain<M: GuestMemoryBackend>(
    mem: &M,
    queue: &Queue,
    head: u16,
    direction: Direction,
    out: &mut Vec<Descriptor>,
) -> Result<(), ChainError> {
    out.clear();
    let mut table = queue.desc_table();
    let mut size = queue.size();
    if head >= size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    let mut index = head;
    let mut indirect = false;
    // A chain visits each entry of its table at most once; more means a loop.
    let mut budget = usize::from(size);
    loop {
        if index >= size {
            return Err(ChainError::IndexOutOfRange(index));
        }
        let addr = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::TableOutsideMemory)?;
        let desc: Descriptor = mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| ChainError::TableOutsideMemory)?;
        if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
            if indirect || desc.flags() & VRING_DESC_F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            let len = desc.len();
            let entries = len / DESC_SIZE as u32;
            if len == 0 || !len.is_multiple_of(DESC_SIZE as u32) || entries > u32::from(u16::MAX) {
                return Err(ChainError::BadIndirectTable(len));
            }
            table = desc.addr().0;
            size = entries as u16;
            index = 0;
            indirect = true;
            budget = usize::from(size);
            continue;
        }
        let writes = desc.flags() & VRING_DESC_F_WRITE != 0;
        match (direction, writes) {
            (Direction::DeviceReads, true) => {
                return Err(ChainError::WrongDirection("device-writable", "readable"))
            }
            (Direction::DeviceWrites, false) => {
                return Err(ChainError::WrongDirection("device-readable", "writable"))
            }
            _ => {}
        }
        if desc.len() > 0 && !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(ChainError::BufferOutsideMemory {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        out.push(desc);
        if desc.flags() & VRING_DESC_F_NEXT == 0 {
            return Ok(());
        }
        budget -= 1;
        if budget == 0 {
            return Err(ChainError::Loop);
        }
        index = desc.next();
    }
}

/// The guest's avail index and how many chains it has made available beyond the ones we
/// consumed; `None` when the index is impossible (more than a full ring ahead) or unreadable.
pub fn available<M: GuestMemoryBackend>(mem: &M, queue: &Queue) -> Option<(u16, u16)> {
    let idx = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    let count = (idx - Wrapping(queue.next_avail())).0;
    (count <= queue.size()).then_some((idx.0, count))
}

/// The head index of the `offset`-th available chain not yet consumed.
pub fn peek_head<M: GuestMemoryBackend>(mem: &M, queue: &Queue, offset: u16) -> Option<u16> {
    let size = queue.size();
    if size == 0 {
        return None;
    }
    let slot = (Wrapping(queue.next_avail()) + Wrapping(offset)).0 % size;
    let addr = queue.avail_ring().checked_add(4 + 2 * u64::from(slot))?;
    mem.read_obj::<u16>(GuestAddress(addr))
        .ok()
        .map(u16::from_le)
}

/// Mark `count` available chains as consumed.
pub fn consume(queue: &mut Queue, count: u16) {
    let next = Wrapping(queue.next_avail()) + Wrapping(count);
    queue.set_next_avail(next.0);
}

/// Append `entries` (head, bytes written) to the used ring and publish them with one index
/// update.
pub fn publish_used<M: GuestMemoryBackend>(
    mem: &M,
    queue: &mut Queue,
    entries: &[(u16, u32)],
) -> Result<(), vm_memory::GuestMemoryError> {
    if entries.is_empty() {
        return Ok(());
    }
    let size = queue.size();
    let ring = queue.used_ring();
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in entries {
        let slot = u64::from(next.0 % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&elem, GuestAddress(ring.wrapping_add(4 + slot * 8)))?;
        next += Wrapping(1);
    }
    // Release: the elements must be visible before the index that announces them.
    mem.store(
        next.0.to_le(),
        GuestAddress(ring.wrapping_add(2)),
        Ordering::Release,
    )?;
    queue.set_next_used(next.0);
    Ok(())
}

/// Whether the guest wants an interrupt for the used entries published since the last call
/// (`last` holds the used index of that call and is updated).
pub fn needs_interrupt<M: GuestMemoryBackend>(mem: &M, queue: &Queue, last: &mut u16) -> bool {
    let new = Wrapping(queue.next_used());
    let old = Wrapping(*last);
    if new == old {
        return false;
    }
    *last = new.0;
    // The used index store must be ordered before we read the guest's suppression state.
    std::sync::atomic::fence(Ordering::SeqCst);
    let avail = queue.avail_ring();
    if queue.event_idx_enabled() {
        let addr = avail.wrapping_add(4 + 2 * u64::from(queue.size()));
        let Ok(event) = mem.load::<u16>(GuestAddress(addr), Ordering::Acquire) else {
            return true;
        };
        let event = Wrapping(u16::from_le(event));
        return (new - event - Wrapping(1)).0 < (new - old).0;
    }
    match mem.load::<u16>(GuestAddress(avail), Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Ask the guest to kick once it makes chains available beyond avail index `seen`; returns
/// true when it already has (so the caller should look again instead of waiting).
///
/// Unlike enabling notifications at our consumer position, this does not fire for chains
/// the guest already published: a receive queue may hold too few buffers for a frame, and
/// waiting on those would either miss the refill (EVENT_IDX) or spin.
pub fn kick_when_beyond<M: GuestMemoryBackend>(mem: &M, queue: &Queue, seen: u16) -> bool {
    let used = queue.used_ring();
    let result = if queue.event_idx_enabled() {
        let addr = used.wrapping_add(4 + 8 * u64::from(queue.size()));
        mem.store(seen.to_le(), GuestAddress(addr), Ordering::Release)
    } else {
        mem.store(0u16, GuestAddress(used), Ordering::Release)
    };
    if result.is_err() {
        return false;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    match queue.avail_idx(mem, Ordering::Acquire) {
        Ok(idx) => idx.0 != seen,
        Err(_) => false,
    }
}

/// Ask the guest not to kick (without EVENT_IDX; with it, kicks already stop once the
/// guest passes the index we last asked for).
pub fn suppress_kicks<M: GuestMemoryBackend>(mem: &M, queue: &Queue) {
    if !queue.event_idx_enabled() {
        let _ = mem.store(
            VRING_USED_F_NO_NOTIFY.to_le(),
            GuestAddress(queue.used_ring()),
            Ordering::Relaxed,
        );
    }
}

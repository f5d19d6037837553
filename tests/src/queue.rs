//! The driver side of a split virtqueue (virtio spec 2.7), written by hand so that tests can
//! also post chains no well-behaved driver would.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::VringConfigData;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};
use crate::guest::GuestMemory;

/// The chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// The buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// One buffer of a chain. `flags` holds WRITE or INDIRECT; [`SplitQueue::push`] links the
/// chain itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Descriptor flags.
    pub flags: u16,
}

impl Desc {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: DESC_F_WRITE,
        }
    }
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head of the chain.
    pub id: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

/// One queue: its rings in guest memory, its eventfds and the free descriptor slots.
pub struct SplitQueue {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    /// `avail_idx` when the device was last kicked by [`SplitQueue::notify`].
    kicked_idx: u16,
    last_used: u16,
    event_idx: bool,
    free: Vec<u16>,
    /// Descriptor slots of each posted chain, by head.
    chains: Vec<Vec<u16>>,
    kick: EventFd,
    call: EventFd,
}

impl SplitQueue {
    /// Queue `index` of `size` entries (a power of two), its rings allocated in `guest`.
    pub fn new(guest: &mut GuestMemory, index: usize, size: u16) -> Result<SplitQueue> {
        assert!(size.is_power_of_two(), "queue size must be a power of two");
        let n = u64::from(size);
        let desc = guest.alloc_aligned(16 * n as usize, 4096);
        let avail = guest.alloc_aligned(6 + 2 * n as usize, 4096);
        let used = guest.alloc_aligned(6 + 8 * n as usize, 4096);
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Setup("eventfd", e));
        Ok(SplitQueue {
            index,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            event_idx: false,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            kick: eventfd()?,
            call: eventfd()?,
        })
    }

    /// Queue index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc
    }

    /// The eventfd the driver kicks.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device signals.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// SET_VRING_ADDR data (ring addresses in the frontend's virtual address space).
    pub fn config_data(&self, host_base: u64) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: host_base + self.desc,
            used_ring_addr: host_base + self.used,
            avail_ring_addr: host_base + self.avail,
            log_addr: None,
        }
    }

    /// Chains posted and not yet seen used.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Free descriptor slots.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Write one raw descriptor into table slot `slot` (anything goes: tests of hostile
    /// chains use this, then [`SplitQueue::publish`]).
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        slot: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        write_desc(
            mem,
            self.desc + 16 * u64::from(slot % self.size),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Make the chain at `head` available and kick, without any check.
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        self.make_available(mem, head);
        self.kick();
    }

    /// Write `chain` into free slots, linked in order, and make it available; no kick (see
    /// [`SplitQueue::kick`]). None when too few slots are free.
    pub fn push(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> Option<u16> {
        if chain.is_empty() || chain.len() > self.free.len() {
            return None;
        }
        let slots: Vec<u16> = (0..chain.len()).filter_map(|_| self.free.pop()).collect();
        for (i, d) in chain.iter().enumerate() {
            let (flags, next) = match slots.get(i + 1) {
                Some(&n) => (d.flags | DESC_F_NEXT, n),
                None => (d.flags & !DESC_F_NEXT, 0),
            };
            self.write_desc(mem, slots[i], d.addr, d.len, flags, next);
        }
        let head = slots[0];
        self.chains[usize::from(head)] = slots;
        self.make_available(mem, head);
        Some(head)
    }

    /// Post `chain` and kick. Panics when the queue has too few free slots.
    pub fn add(&mut self, mem: &GuestMemoryMmap, chain: &[Desc]) -> u16 {
        let head = self.push(mem, chain).expect("free descriptor slots");
        self.kick();
        head
    }

    /// Post `chain` through an indirect table written at `table` (16 bytes per entry) and
    /// kick; the chain takes one slot of the queue.
    pub fn add_indirect(&mut self, mem: &GuestMemoryMmap, table: u64, chain: &[Desc]) -> u16 {
        write_table(mem, table, chain);
        let d = Desc {
            addr: table,
            len: 16 * chain.len() as u32,
            flags: DESC_F_INDIRECT,
        };
        self.add(mem, &[d])
    }

    /// VIRTIO_RING_F_EVENT_IDX was negotiated: [`SplitQueue::notify`] honours the device's
    /// avail_event.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Kick if the device asked for it (with EVENT_IDX: its avail_event lies among the chains
    /// made available since the last notify), as a Linux driver does.
    pub fn notify(&mut self, mem: &GuestMemoryMmap) {
        let old = self.kicked_idx;
        let new = self.avail_idx;
        self.kicked_idx = new;
        if new == old {
            return;
        }
        if self.event_idx {
            fence(Ordering::SeqCst);
            let event: u16 = read(mem, self.used + 4 + 8 * u64::from(self.size));
            // vring_need_event()
            if new.wrapping_sub(event).wrapping_sub(1) >= new.wrapping_sub(old) {
                return;
            }
        }
        self.kick();
    }

    /// Tell the device there is work, unconditionally.
    pub fn kick(&self) {
        // An eventfd counter write only fails on overflow, which a pending kick already covers.
        let _ = self.kick.write(1);
    }

    fn make_available(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        write(mem, slot, head);
        // The ring entry before the index the device reads.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        write(mem, self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Used elements that arrived since the last call, without waiting. Their descriptor
    /// slots become free again.
    pub fn poll_used(&mut self, mem: &GuestMemoryMmap) -> Vec<Used> {
        fence(Ordering::SeqCst);
        let idx: u16 = read(mem, self.used + 2);
        let mut out = Vec::new();
        while self.last_used != idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = read(mem, e);
            let len: u32 = read(mem, e + 4);
            let id = id as u16;
            if let Some(slots) = self.chains.get_mut(usize::from(id)) {
                self.free.append(slots);
            }
            out.push(Used { id, len });
            self.last_used = self.last_used.wrapping_add(1);
        }
        // VIRTIO_RING_F_EVENT_IDX: ask for a call on the next used element (ignored otherwise).
        write(
            mem,
            self.avail + 4 + 2 * u64::from(self.size),
            self.last_used,
        );
        fence(Ordering::SeqCst);
        out
    }

    /// Wait until `n` more chains are used, or the daemon closes `hangup_fd` (the frontend
    /// socket, if given), or `timeout` passes.
    pub fn wait_used(
        &mut self,
        mem: &GuestMemoryMmap,
        n: usize,
        timeout: Duration,
        hangup_fd: Option<RawFd>,
    ) -> Result<Vec<Used>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            out.extend(self.poll_used(mem));
            if out.len() >= n {
                return Ok(out);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    queue: self.index,
                    got: out.len(),
                    want: n,
                });
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.call.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: hangup_fd.unwrap_or(-1),
                    events: libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let ms = left.as_millis().clamp(1, 1000) as i32;
            // SAFETY: poll on two valid pollfd structs (a negative fd is ignored by poll).
            unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            let _ = self.call.read();
            if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                out.extend(self.poll_used(mem));
                if out.len() >= n {
                    return Ok(out);
                }
                return Err(Error::Disconnected);
            }
        }
    }
}

/// Write an indirect table (or any run of linked descriptors) at `table`.
pub fn write_table(mem: &GuestMemoryMmap, table: u64, chain: &[Desc]) {
    for (i, d) in chain.iter().enumerate() {
        let (flags, next) = if i + 1 < chain.len() {
            (d.flags | DESC_F_NEXT, (i + 1) as u16)
        } else {
            (d.flags, 0)
        };
        write_desc(mem, table + 16 * i as u64, d.addr, d.len, flags, next);
    }
}

fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    write(mem, at, addr);
    write(mem, at + 8, len);
    write(mem, at + 12, flags);
    write(mem, at + 14, next);
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64, v: T) {
    mem.write_obj(v, GuestAddress(addr))
        .expect("rings lie inside guest memory");
}

fn read<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64) -> T {
    mem.read_obj(GuestAddress(addr))
        .expect("rings lie inside guest memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Play the device: take the next available head, put it in the used ring.
    fn device_uses(mem: &GuestMemoryMmap, q: &SplitQueue, nth: u16, len: u32) -> u16 {
        let head: u16 = read(mem, q.avail + 4 + 2 * u64::from(nth % q.size));
        let e = q.used + 4 + 8 * u64::from(nth % q.size);
        write(mem, e, u32::from(head));
        write(mem, e + 4, len);
        write(mem, q.used + 2, nth.wrapping_add(1));
        head
    }

    fn desc_at(mem: &GuestMemoryMmap, q: &SplitQueue, slot: u16) -> (u64, u32, u16, u16) {
        let at = q.desc + 16 * u64::from(slot);
        (
            read(mem, at),
            read(mem, at + 8),
            read(mem, at + 12),
            read(mem, at + 14),
        )
    }

    #[test]
    fn chains_are_linked_published_and_their_slots_come_back() {
        let mut g = GuestMemory::new(1 << 20).unwrap();
        let mut q = SplitQueue::new(&mut g, 0, 8).unwrap();
        let mem = g.mem();
        let chain = [
            Desc::readable(0x8000, 16),
            Desc::writable(0x9000, 512),
            Desc::writable(0xa000, 1),
        ];
        let h1 = q.push(mem, &chain).unwrap();
        let h2 = q.push(mem, &chain).unwrap();
        assert_eq!(q.free_slots(), 2);
        assert!(q.push(mem, &chain).is_none(), "only 2 slots left");
        assert_eq!(read::<u16>(mem, q.avail + 2), 2, "avail idx");
        // The chain at h1 follows NEXT links through 3 descriptors with the right flags.
        let (addr, len, flags, next) = desc_at(mem, &q, h1);
        assert_eq!((addr, len, flags), (0x8000, 16, DESC_F_NEXT));
        let (addr, len, flags, next) = desc_at(mem, &q, next);
        assert_eq!(
            (addr, len, flags),
            (0x9000, 512, DESC_F_NEXT | DESC_F_WRITE)
        );
        let (addr, _, flags, _) = desc_at(mem, &q, next);
        assert_eq!((addr, flags), (0xa000, DESC_F_WRITE));

        assert!(q.poll_used(mem).is_empty());
        assert_eq!(device_uses(mem, &q, 0, 513), h1);
        assert_eq!(q.poll_used(mem), vec![Used { id: h1, len: 513 }]);
        assert_eq!(q.free_slots(), 5);
        assert_eq!(q.in_flight(), 1);
        // used_event asks for a call on the next used element.
        assert_eq!(read::<u16>(mem, q.avail + 4 + 2 * 8), 1);
        device_uses(mem, &q, 1, 1);
        let used = q
            .wait_used(mem, 1, Duration::from_millis(100), None)
            .unwrap();
        assert_eq!(used, vec![Used { id: h2, len: 1 }]);
        assert_eq!(q.free_slots(), 8);
        assert!(matches!(
            q.wait_used(mem, 1, Duration::from_millis(20), None),
            Err(Error::Timeout {
                got: 0,
                want: 1,
                ..
            })
        ));
    }

    #[test]
    fn notify_kicks_only_when_the_device_asks_with_event_idx() {
        let mut g = GuestMemory::new(1 << 20).unwrap();
        let mut q = SplitQueue::new(&mut g, 0, 8).unwrap();
        q.set_event_idx(true);
        let mem = g.mem().clone();
        let avail_event = q.used + 4 + 8 * 8;
        let kicks = |q: &SplitQueue| q.kick.read().unwrap_or(0);
        // The device wants a kick once entry 0 is available.
        write(&mem, avail_event, 0u16);
        q.push(&mem, &[Desc::readable(0x8000, 16)]).unwrap();
        q.notify(&mem);
        assert_eq!(kicks(&q), 1);
        // It has not re-armed (avail_event still 0): no kick for entries 1 and 2.
        q.push(&mem, &[Desc::readable(0x8000, 16)]).unwrap();
        q.push(&mem, &[Desc::readable(0x8000, 16)]).unwrap();
        q.notify(&mem);
        assert_eq!(kicks(&q), 0);
        // Re-armed for entry 3: the next batch kicks.
        write(&mem, avail_event, 3u16);
        q.push(&mem, &[Desc::readable(0x8000, 16)]).unwrap();
        q.notify(&mem);
        assert_eq!(kicks(&q), 1);
        // Nothing new: no kick.
        q.notify(&mem);
        assert_eq!(kicks(&q), 0);
    }
}

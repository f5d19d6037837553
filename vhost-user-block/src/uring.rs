//! The io_uring engine: many requests in flight per queue, for disks where one synchronous
//! request at a time per queue thread cannot keep the device busy (O_DIRECT on real disks).
//!
//! Each queue owns a ring whose file descriptor the queue's worker thread polls next to the kick
//! eventfd: it is readable while completions wait, so no eventfd is signalled and read per
//! burst. The ring is sized to the largest virtqueue, so every request the guest can have
//! outstanding fits. A request keeps its guest memory mapping alive (an `Arc` of the memory map
//! it was parsed against) until its completion is reaped.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

use crate::disk::Disk;
use crate::request::Transfer;

struct InFlight {
    head: u16,
    transfer: Transfer,
    iovs: Vec<libc::iovec>,
    mem: Arc<common::GuestMemoryMmap>,
}

// SAFETY: the raw pointers in `iovs` point into the guest memory mapping that `mem` keeps
// alive; they are only dereferenced by the kernel while the request is in flight, and the
// struct moves between threads only together with that mapping.
unsafe impl Send for InFlight {}

/// One queue's ring and its in-flight requests.
pub struct UringQueue {
    ring: IoUring,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Completions taken off the ring by `reap`, kept to reuse its allocation.
    finished: Vec<(u64, i32)>,
}

impl UringQueue {
    /// A ring with room for `entries` requests (the queue size).
    pub fn new(entries: u16) -> io::Result<Self> {
        let ring = IoUring::new(u32::from(entries))?;
        Ok(UringQueue {
            ring,
            slots: (0..entries).map(|_| None).collect(),
            free: (0..usize::from(entries)).rev().collect(),
            finished: Vec::with_capacity(usize::from(entries)),
        })
    }

    /// Readable when completions are waiting (the ring's own descriptor).
    pub fn completion_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queue a transfer; it is handed back if it cannot be queued, for the caller to run it
    /// synchronously or fail it.
    pub fn push(
        &mut self,
        disk: &Disk,
        head: u16,
        transfer: Transfer,
        mem: Arc<common::GuestMemoryMmap>,
    ) -> Result<(), (Transfer, io::Error)> {
        let iovs = match transfer.iovecs(&*mem) {
            Ok(v) => v,
            Err(e) => return Err((transfer, e)),
        };
        let Some(slot) = self.free.pop() else {
            return Err((transfer, io::Error::other("io_uring full")));
        };
        let fd = types::Fd(disk.raw_fd());
        let entry = if transfer.read {
            opcode::Readv::new(fd, iovs.as_ptr(), iovs.len() as u32)
                .offset(transfer.offset)
                .build()
        } else {
            let flags = if transfer.durable { libc::RWF_DSYNC } else { 0 };
            opcode::Writev::new(fd, iovs.as_ptr(), iovs.len() as u32)
                .offset(transfer.offset)
                .rw_flags(flags)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the entry points at `iovs`, whose heap buffer (and the guest memory it
        // describes, kept alive by `mem`) lives in `slots[slot]` until the completion is reaped.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err((transfer, io::Error::other("submission queue full")));
        }
        log::trace!(
            "queued head {head} in slot {slot}: {} {} bytes",
            if transfer.read { "read" } else { "write" },
            transfer.len
        );
        self.slots[slot] = Some(InFlight {
            head,
            transfer,
            iovs,
            mem,
        });
        Ok(())
    }

    /// Hand queued entries to the kernel.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit()?;
        Ok(())
    }

    /// Complete every finished request: `done(head, used_len)` for each.
    pub fn reap(&mut self, disk: &Disk, mut done: impl FnMut(u16, u32)) {
        let mut finished = std::mem::take(&mut self.finished);
        finished.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(slot, result) in &finished {
            let Some(req) = self.slots.get_mut(slot as usize).and_then(Option::take) else {
                log::error!("io_uring completion for an unknown slot {slot}");
                continue;
            };
            self.free.push(slot as usize);
            let t = &req.transfer;
            log::trace!("completed head {} slot {slot}: {result}", req.head);
            let ok = if result == -libc::EINVAL {
                // O_DIRECT refused the guest's alignment: redo it through the aligned path.
                let mut iovs = req.iovs.clone();
                let r = if t.read {
                    disk.read_vectored(&mut iovs, t.offset)
                } else {
                    disk.write_vectored(&mut iovs, t.offset, t.durable)
                };
                r.is_ok()
            } else if result < 0 || result as u64 != t.len {
                log::warn!(
                    "{} of {} bytes at offset {} failed: {}",
                    if t.read { "read" } else { "write" },
                    t.len,
                    t.offset,
                    if result < 0 {
                        io::Error::from_raw_os_error(-result).to_string()
                    } else {
                        format!("short transfer of {result}")
                    }
                );
                false
            } else {
                true
            };
            done(req.head, t.complete(&*req.mem, ok));
        }
        finished.clear();
        self.finished = finished;
    }

    /// Wait for every in-flight request and complete it.
    pub fn drain(&mut self, disk: &Disk, mut done: impl FnMut(u16, u32)) {
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("waiting for in-flight I/O failed: {e}");
                    return;
                }
            }
            self.reap(disk, &mut done);
        }
    }
}

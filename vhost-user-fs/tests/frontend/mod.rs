//! A minimal virtio-fs driver for socket-level tests and the benchmark: memfd guest memory
//! shared with the daemon, split virtqueues, and FUSE requests posted as descriptor chains.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_fs::fuse::abi::{InHeader, OutHeader};
use vm_memory::{ByteValued, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;

/// Guest memory: queues in the first MiB, then a bump allocator for buffers.
pub const MEM_SIZE: usize = 64 << 20;
const DATA_START: u64 = 1 << 20;
const QUEUE_SIZE: u16 = 256;

/// The daemon under test.
pub fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-fs"))
}

/// A daemon process, SIGTERMed when dropped.
pub struct Daemon {
    pub child: Child,
}

impl Daemon {
    /// Run `cmd` and wait for `socket` to appear.
    pub fn spawn(cmd: &mut Command, socket: &Path) -> Daemon {
        let child = cmd.stdin(Stdio::null()).spawn().expect("start daemon");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        Daemon { child }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Guest memory in a memfd.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    file: File,
    next: u64,
}

impl Guest {
    fn new() -> Guest {
        // SAFETY: static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"fs-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).unwrap();
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Guest {
            mem,
            file,
            next: DATA_START,
        }
    }

    /// A buffer of `len` bytes; wraps around (callers keep only a few requests in flight).
    pub fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 63) & !63;
        if self.next + len > MEM_SIZE as u64 {
            self.next = DATA_START;
        }
        let at = self.next;
        self.next += len;
        at
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.mem.get_host_address(GuestAddress(0)).unwrap() as u64,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// One descriptor to post.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

/// The driver side of one split virtqueue.
pub struct Queue {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Queue {
    fn new(index: usize) -> Queue {
        let base = index as u64 * 0x4000;
        Queue {
            desc: base,
            avail: base + 16 * u64::from(QUEUE_SIZE),
            used: base + 0x2000,
            avail_idx: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// Write `descs` at table slots 0.. with `next` links exactly as given, publish slot 0.
    pub fn post_raw(&mut self, g: &Guest, descs: &[(Desc, u16)]) {
        for (i, (d, next)) in descs.iter().enumerate() {
            let at = self.desc + 16 * i as u64;
            g.mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            g.mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            g.mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
            g.mem.write_obj(*next, GuestAddress(at + 14)).unwrap();
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        g.mem.write_obj(0u16, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Post a chain (linked in order) and wait for it to be used; returns the used length.
    pub fn run(&mut self, g: &Guest, chain: &[Desc]) -> u32 {
        let linked: Vec<(Desc, u16)> = chain
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut d = *d;
                if i + 1 < chain.len() {
                    d.flags |= DESC_NEXT;
                }
                (d, (i + 1) as u16)
            })
            .collect();
        self.post_raw(g, &linked);
        self.wait_used(g)
    }

    /// Wait for the next used element; returns its length.
    pub fn wait_used(&mut self, g: &Guest) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            fence(Ordering::SeqCst);
            let idx: u16 = g.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx != self.last_used {
                let e = self.used + 4 + 8 * u64::from(self.last_used % QUEUE_SIZE);
                let len: u32 = g.mem.read_obj(GuestAddress(e + 4)).unwrap();
                self.last_used = self.last_used.wrapping_add(1);
                return len;
            }
            assert!(Instant::now() < deadline, "daemon never used the chain");
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = self.call.read();
        }
    }
}

/// A FUSE reply: positive errno (0 = success) and payload.
#[derive(Debug)]
pub struct Reply {
    pub errno: i32,
    pub data: Vec<u8>,
    pub used: u32,
}

/// A connected virtio-fs frontend: queue 0 is hiprio, 1.. are request queues.
pub struct Session {
    pub fe: Frontend,
    pub guest: Guest,
    pub queues: Vec<Queue>,
    unique: u64,
}

impl Session {
    pub fn connect(socket: &Path, nqueues: usize) -> Session {
        let guest = Guest::new();
        let mut fe = Frontend::connect(socket, nqueues as u64).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap() & (F_VERSION_1 | F_PROTOCOL_FEATURES);
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            proto
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK),
        )
        .unwrap();
        fe.set_mem_table(&[guest.region()]).unwrap();
        let base = guest.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
        let mut queues = Vec::new();
        for i in 0..nqueues {
            let q = Queue::new(i);
            fe.set_vring_num(i, QUEUE_SIZE).unwrap();
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: base + q.desc,
                    used_ring_addr: base + q.used,
                    avail_ring_addr: base + q.avail,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(i, 0).unwrap();
            fe.set_vring_call(i, &q.call).unwrap();
            fe.set_vring_kick(i, &q.kick).unwrap();
            fe.set_vring_enable(i, true).unwrap();
            queues.push(q);
        }
        // A round trip: everything above was handled before the first kick.
        fe.get_features().unwrap();
        Session {
            fe,
            guest,
            queues,
            unique: 0,
        }
    }

    /// Config space bytes.
    pub fn config(&mut self, len: u32) -> Vec<u8> {
        let (_, data) = self
            .fe
            .get_config(
                0,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .unwrap();
        data
    }

    /// Send a FUSE request on queue `q`: header + `body` (split into readable descriptors of at
    /// most `seg` bytes), reply room `reply_cap` (split likewise).
    pub fn request_split(
        &mut self,
        q: usize,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_cap: usize,
        seg: usize,
    ) -> Reply {
        self.unique += 1;
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            ..Default::default()
        };
        let mut req = h.as_slice().to_vec();
        req.extend_from_slice(body);
        let req_addr = self.guest.alloc(req.len());
        self.guest
            .mem
            .write_slice(&req, GuestAddress(req_addr))
            .unwrap();
        let reply_addr = self.guest.alloc(reply_cap);
        let mut chain = Vec::new();
        for (off, len) in pieces(req.len(), seg) {
            chain.push(Desc {
                addr: req_addr + off as u64,
                len: len as u32,
                flags: 0,
            });
        }
        for (off, len) in pieces(reply_cap, seg) {
            chain.push(Desc {
                addr: reply_addr + off as u64,
                len: len as u32,
                flags: DESC_WRITE,
            });
        }
        let used = self.queues[q].run(&self.guest, &chain);
        if used == 0 {
            return Reply {
                errno: -1,
                data: Vec::new(),
                used,
            };
        }
        let mut out = vec![0u8; used as usize];
        self.guest
            .mem
            .read_slice(&mut out, GuestAddress(reply_addr))
            .unwrap();
        let oh = *OutHeader::from_slice(&out[..16]).unwrap();
        assert_eq!(oh.unique, self.unique, "reply to another request");
        assert_eq!(oh.len, used, "header length disagrees with used length");
        Reply {
            errno: -oh.error,
            data: out[16..].to_vec(),
            used,
        }
    }

    /// Write a request (header + body) into guest memory once, for reuse; returns its address
    /// and length.
    pub fn prepare(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> (u64, usize) {
        let h = InHeader {
            len: (40 + body.len()) as u32,
            opcode,
            unique: 1,
            nodeid,
            ..Default::default()
        };
        let addr = self.guest.alloc(40 + body.len());
        self.guest
            .mem
            .write_slice(h.as_slice(), GuestAddress(addr))
            .unwrap();
        self.guest
            .mem
            .write_slice(body, GuestAddress(addr + 40))
            .unwrap();
        (addr, 40 + body.len())
    }

    /// Post a prepared request with `reply_cap` bytes of reply room at `reply_addr`, both
    /// split into `seg`-byte descriptors; returns the used length (no copies on our side).
    pub fn run_prepared(
        &mut self,
        q: usize,
        req: (u64, usize),
        reply_addr: u64,
        reply_cap: usize,
        seg: usize,
    ) -> u32 {
        let mut chain = Vec::new();
        for (off, len) in pieces(req.1, seg) {
            chain.push(Desc {
                addr: req.0 + off as u64,
                len: len as u32,
                flags: 0,
            });
        }
        for (off, len) in pieces(reply_cap, seg) {
            chain.push(Desc {
                addr: reply_addr + off as u64,
                len: len as u32,
                flags: DESC_WRITE,
            });
        }
        self.queues[q].run(&self.guest, &chain)
    }

    /// A request on request queue 1 with a single reply descriptor.
    pub fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8], reply_cap: usize) -> Reply {
        self.request_split(1, opcode, nodeid, body, reply_cap, usize::MAX)
    }
}

fn pieces(total: usize, seg: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut off = 0;
    while off < total {
        let n = seg.min(total - off);
        v.push((off, n));
        off += n;
    }
    v
}

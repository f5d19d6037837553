//! A small vhost-user frontend acting as the guest's driver: shared memfd memory, split
//! virtqueues it fills with descriptor chains, and the daemon process it talks to.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{fence, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;
pub const F_SIZE: u64 = 1 << 0;
pub const F_MULTIPORT: u64 = 1 << 1;
pub const F_EMERG_WRITE: u64 = 1 << 2;

pub const DESC_NEXT: u16 = 1;
pub const DESC_WRITE: u16 = 2;
pub const DESC_INDIRECT: u16 = 4;

/// Guest memory size.
pub const MEM_SIZE: usize = 64 << 20;
/// Where data buffers start (queues live below).
pub const DATA_START: u64 = 1 << 20;

/// The path of the daemon binary under test.
pub fn daemon_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vhost-user-console"))
}

/// Start an arbitrary daemon command, waiting until `socket` accepts connections.
pub fn spawn(cmd: &mut Command, socket: &Path) -> Daemon {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start daemon");
    // Only look for the file: a probing connection would be a frontend session to a daemon
    // that serves a single one.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(100));
    Daemon {
        child,
        socket: socket.to_owned(),
    }
}

/// A daemon process, terminated (SIGTERM) when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Start `binary` with `args` and wait until `socket` accepts connections.
    pub fn start(binary: &Path, args: &[&str], socket: &Path) -> Daemon {
        Self::start_with(binary, args, socket, Stdio::null())
    }

    pub fn start_with(binary: &Path, args: &[&str], socket: &Path, stdin: Stdio) -> Daemon {
        let child = Command::new(binary)
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start daemon");
        wait_for_socket(socket);
        Daemon {
            child,
            socket: socket.to_owned(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill on the pid of our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Wait until something accepts connections on `path`.
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Guest memory shared with the daemon through a memfd.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    file: File,
    next_data: u64,
}

impl Guest {
    pub fn new() -> Guest {
        // SAFETY: memfd_create with a static NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create returned a new descriptor we own.
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
            next_data: DATA_START,
        }
    }

    /// A fresh buffer of `len` bytes (16-byte aligned) in guest memory.
    pub fn alloc(&mut self, len: usize) -> u64 {
        let at = self.next_data;
        self.next_data += (len as u64 + 15) & !15;
        assert!(
            self.next_data <= MEM_SIZE as u64,
            "test guest out of memory"
        );
        at
    }

    /// Forget all data buffers (for long-running loops that recycle memory).
    pub fn reset_data(&mut self) {
        self.next_data = DATA_START;
    }

    fn host_base(&self) -> u64 {
        self.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.host_base(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }
}

/// One descriptor of a chain to post.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// The driver side of a split virtqueue.
pub struct Queue {
    pub index: usize,
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
    next_free: u16,
    pub kick: EventFd,
    pub call: EventFd,
}

impl Queue {
    fn new(index: usize, size: u16) -> Queue {
        let base = index as u64 * 0x4000;
        assert!(base + 0x4000 <= DATA_START);
        Queue {
            index,
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + 0x2000,
            avail_idx: 0,
            last_used: 0,
            next_free: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    /// Write raw descriptors at table index `at` (no linking done for the caller).
    pub fn write_desc(&self, g: &Guest, at: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * u64::from(at % self.size);
        g.mem.write_obj(addr, GuestAddress(d)).unwrap();
        g.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
        g.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
        g.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
    }

    /// Make the chain starting at `head` available and kick.
    pub fn publish(&mut self, g: &Guest, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        g.mem.write_obj(head, GuestAddress(slot)).unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Post a chain of `bufs` (descriptors taken round-robin from the table) and kick.
    pub fn add(&mut self, g: &Guest, bufs: &[Buf]) -> u16 {
        let head = self.next_free;
        for (i, b) in bufs.iter().enumerate() {
            let at = self.next_free;
            let last = i + 1 == bufs.len();
            let flags = if b.writable { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            let next = at.wrapping_add(1) % self.size;
            self.write_desc(g, at, b.addr, b.len, flags, next);
            self.next_free = next;
        }
        self.publish(g, head);
        head
    }

    /// Post one device-readable buffer holding `data`.
    pub fn send(&mut self, g: &mut Guest, data: &[u8]) -> u16 {
        let addr = g.alloc(data.len());
        g.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.add(
            g,
            &[Buf {
                addr,
                len: data.len() as u32,
                writable: false,
            }],
        )
    }

    /// Post one device-writable buffer of `len` bytes; returns its address.
    pub fn post_rx(&mut self, g: &mut Guest, len: u32) -> (u16, u64) {
        let addr = g.alloc(len as usize);
        let head = self.add(
            g,
            &[Buf {
                addr,
                len,
                writable: true,
            }],
        );
        (head, addr)
    }

    /// Used elements returned since the last call (without waiting).
    pub fn take_used(&mut self, g: &Guest) -> Vec<(u16, u32)> {
        fence(Ordering::SeqCst);
        let idx: u16 = g.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.last_used != idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = g.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = g.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    /// Wait until at least `n` more chains were used, returning them.
    pub fn wait_used(&mut self, g: &Guest, n: usize) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        loop {
            out.extend(self.take_used(g));
            if out.len() >= n {
                return out;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "queue {}: {} of {n} chains used",
                self.index,
                out.len()
            );
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = self.call.read();
        }
    }

    /// Make the single-descriptor chains `heads` (buffers `(addr, len)`) available with one
    /// kick, as a driver with a batch of output does.
    pub fn publish_batch(&mut self, g: &Guest, chains: &[(u16, u64, u32)]) {
        for &(head, addr, len) in chains {
            self.write_desc(g, head, addr, len, 0, 0);
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            g.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        fence(Ordering::SeqCst);
        g.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        fence(Ordering::SeqCst);
        self.kick.write(1).unwrap();
    }

    /// Wait (up to `timeout`) for the device to signal this queue.
    pub fn wait_call(&self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        let _ = self.call.read();
    }

    /// How many chains are outstanding (posted, not yet used).
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }
}

/// A connected frontend with its queues set up and enabled.
pub struct Session {
    pub fe: Frontend,
    pub guest: Guest,
    pub queues: Vec<Queue>,
    pub features: u64,
}

impl Session {
    /// Connect, negotiate `want` (masked by what the daemon offers) and set up `nqueues` queues.
    pub fn connect(socket: &Path, want: u64, nqueues: usize) -> Session {
        Self::connect_sized(socket, want, nqueues, 256)
    }

    pub fn connect_sized(socket: &Path, want: u64, nqueues: usize, size: u16) -> Session {
        let guest = Guest::new();
        let mut fe = Frontend::connect(socket, nqueues as u64).expect("connect to daemon");
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let features = offered & (want | F_VERSION_1 | F_PROTOCOL_FEATURES);
        fe.set_features(features).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(
            proto
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ),
        )
        .unwrap();
        fe.set_mem_table(&[guest.region()]).unwrap();
        let mut queues = Vec::new();
        for i in 0..nqueues {
            let q = Queue::new(i, size);
            let base = guest.host_base();
            fe.set_vring_num(i, size).unwrap();
            fe.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: size,
                    queue_size: size,
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
        // A request with a reply: every message before it has been handled, so no kick can
        // reach a ring the daemon has not enabled yet.
        fe.get_features().unwrap();
        Session {
            fe,
            guest,
            queues,
            features,
        }
    }

    /// Set up the backend-request channel (VHOST_USER_SET_BACKEND_REQ_FD), acknowledging the
    /// daemon's requests as QEMU does when REPLY_ACK is negotiated.
    pub fn backend_requests(&mut self) -> BackendRequests {
        let changes = Arc::new(ConfigChanges::default());
        let mut handler = FrontendReqHandler::new(changes.clone()).unwrap();
        handler.set_reply_ack_flag(true);
        self.fe
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .unwrap();
        // Without NEED_REPLY in the header nothing answers SET_BACKEND_REQ_FD, so the daemon may
        // not have taken the channel yet when this returns; the answer to a later request means
        // it has (one connection's messages are handled in order).
        self.fe.get_features().unwrap();
        BackendRequests { handler, changes }
    }

    /// The device config space bytes `offset..offset+len`.
    pub fn config(&mut self, offset: u32, len: u32) -> Vec<u8> {
        let (_, data) = self
            .fe
            .get_config(
                offset,
                len,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .unwrap();
        data
    }

    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> io::Result<()> {
        self.fe
            .set_config(
                offset,
                vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
                data,
            )
            .map_err(io::Error::other)
    }

    /// Post `data` on queue `q` and wait until the daemon took it.
    pub fn send(&mut self, q: usize, data: &[u8]) {
        let head = self.queues[q].send(&mut self.guest, data);
        let used = self.queues[q].wait_used(&self.guest, 1);
        assert_eq!(used[0].0, head);
    }

    /// Read `len` bytes at `addr` of guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.guest
            .mem
            .read_slice(&mut v, GuestAddress(addr))
            .unwrap();
        v
    }

    /// Post `n` receive buffers of `len` bytes on queue `q`; returns (head, addr) of each.
    pub fn post_rx(&mut self, q: usize, n: usize, len: u32) -> Vec<(u16, u64)> {
        (0..n)
            .map(|_| self.queues[q].post_rx(&mut self.guest, len))
            .collect()
    }

    /// Collect `want` bytes of input from queue `q`, whose buffers were posted as `posted`.
    pub fn receive(&mut self, q: usize, posted: &mut Vec<(u16, u64)>, want: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < want {
            for (head, len) in self.queues[q].wait_used(&self.guest, 1) {
                let pos = posted
                    .iter()
                    .position(|(h, _)| *h == head)
                    .expect("used an unknown chain");
                let (_, addr) = posted.remove(pos);
                got.extend(self.read(addr, len as usize));
            }
        }
        got
    }
}

/// Counts `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` requests.
#[derive(Default)]
pub struct ConfigChanges(AtomicUsize);

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

/// The frontend's end of the backend-request channel; requests are served only while a test
/// waits for them.
pub struct BackendRequests {
    handler: FrontendReqHandler<ConfigChanges>,
    changes: Arc<ConfigChanges>,
}

impl BackendRequests {
    /// Config-change notifications received so far.
    pub fn config_changes(&self) -> usize {
        self.changes.0.load(Ordering::SeqCst)
    }

    /// Serve the daemon's requests until `n` config changes arrived in all (20 s at most).
    pub fn wait_config_changes(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.config_changes() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} config-change notifications",
                self.config_changes()
            );
            self.serve_one(Duration::from_millis(100));
        }
    }

    /// Serve the daemon's requests for `period`.
    pub fn serve_for(&mut self, period: Duration) {
        let end = Instant::now() + period;
        while Instant::now() < end {
            self.serve_one(end.saturating_duration_since(Instant::now()));
        }
    }

    /// Serve one request if one arrives within `timeout`.
    fn serve_one(&mut self, timeout: Duration) {
        let mut pfd = libc::pollfd {
            fd: self.handler.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) } > 0 {
            self.handler.handle_request().expect("backend request");
        }
    }
}

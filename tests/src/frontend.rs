//! A connected frontend: negotiation, memory table, rings, config space.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use crate::error::{Error, Result};
use crate::guest::GuestMemory;
use crate::queue::{Desc, SplitQueue, Used};

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// VIRTIO_RING_F_EVENT_IDX.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// How long [`Session::wait`] waits for the daemon.
const WAIT: Duration = Duration::from_secs(20);

/// What to negotiate and set up.
#[derive(Clone, Debug)]
pub struct Options {
    /// Device features wanted (masked by what the daemon offers; VERSION_1 and
    /// PROTOCOL_FEATURES are always taken when offered).
    pub features: u64,
    /// Protocol features wanted (masked by what the daemon offers).
    pub protocol: VhostUserProtocolFeatures,
    /// Queues to set up and enable, from 0.
    pub num_queues: usize,
    /// Entries per queue.
    pub queue_size: u16,
    /// Guest memory size in bytes.
    pub mem_size: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            features: 0,
            protocol: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK,
            num_queues: 1,
            queue_size: 256,
            mem_size: 64 << 20,
        }
    }
}

/// How a chain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The device used it.
    Used(Used),
    /// The daemon dropped the connection instead.
    Disconnected,
}

/// A frontend connected to a daemon with its queues enabled.
pub struct Session {
    /// The vhost-user connection, for messages the harness does not wrap.
    pub fe: Frontend,
    /// Shared guest memory.
    pub guest: GuestMemory,
    /// The queues, by index.
    pub queues: Vec<SplitQueue>,
    /// Features the daemon offered.
    pub offered: u64,
    /// Features negotiated.
    pub features: u64,
    /// Protocol features negotiated.
    pub protocol: VhostUserProtocolFeatures,
}

impl Session {
    /// Connect to `socket` (retrying for a few seconds while nobody listens yet), negotiate,
    /// send the memory table and set up `opts.num_queues` queues.
    pub fn connect(socket: &Path, opts: &Options) -> Result<Session> {
        let mut guest = GuestMemory::new(opts.mem_size)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut fe = loop {
            match Frontend::connect(socket, opts.num_queues as u64) {
                Ok(fe) => break fe,
                Err(vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketConnect(
                    e,
                ))) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(Error::Message("connect", e)),
            }
        };
        let msg = |step| move |e| Error::Message(step, e);
        fe.set_owner().map_err(msg("SET_OWNER"))?;
        let offered = fe.get_features().map_err(msg("GET_FEATURES"))?;
        let features = offered & (opts.features | F_VERSION_1 | F_PROTOCOL_FEATURES);
        fe.set_features(features).map_err(msg("SET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        if features & F_PROTOCOL_FEATURES != 0 {
            let p = fe
                .get_protocol_features()
                .map_err(msg("GET_PROTOCOL_FEATURES"))?;
            protocol = p & opts.protocol;
            fe.set_protocol_features(protocol)
                .map_err(msg("SET_PROTOCOL_FEATURES"))?;
        }
        fe.set_mem_table(&guest.regions())
            .map_err(msg("SET_MEM_TABLE"))?;
        let base = guest.host_base();
        let mut queues = Vec::with_capacity(opts.num_queues);
        for i in 0..opts.num_queues {
            let mut q = SplitQueue::new(&mut guest, i, opts.queue_size)?;
            q.set_event_idx(features & F_EVENT_IDX != 0);
            fe.set_vring_num(i, opts.queue_size)
                .map_err(msg("SET_VRING_NUM"))?;
            fe.set_vring_addr(i, &q.config_data(base))
                .map_err(msg("SET_VRING_ADDR"))?;
            fe.set_vring_base(i, 0).map_err(msg("SET_VRING_BASE"))?;
            fe.set_vring_call(i, q.call_fd())
                .map_err(msg("SET_VRING_CALL"))?;
            fe.set_vring_kick(i, q.kick_fd())
                .map_err(msg("SET_VRING_KICK"))?;
            if features & F_PROTOCOL_FEATURES != 0 {
                fe.set_vring_enable(i, true)
                    .map_err(msg("SET_VRING_ENABLE"))?;
            }
            queues.push(q);
        }
        guest.pin();
        // A message with a reply: the daemon has handled everything above before the first
        // kick can reach it.
        fe.get_features().map_err(msg("GET_FEATURES"))?;
        Ok(Session {
            fe,
            guest,
            queues,
            offered,
            features,
            protocol,
        })
    }

    /// Config space bytes `offset..offset + len` (GET_CONFIG).
    pub fn config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>> {
        let (_, data) = self
            .fe
            .get_config(
                offset,
                len,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; len as usize],
            )
            .map_err(|e| Error::Message("GET_CONFIG", e))?;
        Ok(data)
    }

    /// Write config space bytes at `offset` (SET_CONFIG).
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<()> {
        self.fe
            .set_config(offset, VhostUserConfigFlags::WRITABLE, data)
            .map_err(|e| Error::Message("SET_CONFIG", e))
    }

    /// The socket, to poll for the daemon hanging up.
    pub fn socket_fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    /// Post `chain` on queue `q` and kick; returns its head.
    pub fn add(&mut self, q: usize, chain: &[Desc]) -> u16 {
        self.queues[q].add(self.guest.mem(), chain)
    }

    /// Post `chain` on queue `q` through an indirect table allocated in guest memory.
    pub fn add_indirect(&mut self, q: usize, chain: &[Desc]) -> u16 {
        let table = self.guest.alloc_aligned(16 * chain.len(), 16);
        self.queues[q].add_indirect(self.guest.mem(), table, chain)
    }

    /// Wait for `n` used elements on queue `q`; panics after 20 s or if the daemon hangs up.
    pub fn wait(&mut self, q: usize, n: usize) -> Vec<Used> {
        let fd = self.socket_fd();
        match self.queues[q].wait_used(self.guest.mem(), n, WAIT, Some(fd)) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        }
    }

    /// Wait for one used element on queue `q`, or for the daemon to drop the connection.
    /// Panics after `timeout` with neither.
    pub fn wait_or_disconnect(&mut self, q: usize, timeout: Duration) -> Completion {
        let fd = self.socket_fd();
        match self.queues[q].wait_used(self.guest.mem(), 1, timeout, Some(fd)) {
            Ok(u) => Completion::Used(u[0]),
            Err(Error::Disconnected) => Completion::Disconnected,
            Err(e) => panic!("{e}"),
        }
    }

    /// Post `chain` on queue `q` and wait until it is used (or the daemon hangs up).
    pub fn run(&mut self, q: usize, chain: &[Desc]) -> Completion {
        let head = self.add(q, chain);
        let c = self.wait_or_disconnect(q, WAIT);
        if let Completion::Used(u) = c {
            assert_eq!(u.id, head, "queue {q}: another chain was used");
        }
        c
    }

    /// Whether the daemon still answers messages.
    pub fn is_connected(&mut self) -> bool {
        self.fe.get_features().is_ok()
    }
}

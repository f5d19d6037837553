//! The `VhostUserBackend` of the network device: features, config space, offload
//! negotiation onto the tap, and the mapping of queue pairs onto worker threads.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use common::{DeviceBackend, GuestMemoryAtomic, Vring};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::pair::{Negotiated, QueuePair};
use crate::tap::{HostConfig, Tap, TapError};

/// Most queue pairs (vhost-user-backend maps queues to threads with a 64-bit mask).
pub const MAX_QUEUE_PAIRS: usize = 32;
/// Largest queue size accepted.
pub const MAX_QUEUE_SIZE: u16 = 4096;
/// Config space size served: `struct virtio_net_config` fields we define (mac, status,
/// max_virtqueue_pairs, mtu, speed, duplex: 17 bytes), zeros after them up to the
/// vhost-user limit, so a frontend reading the whole newer structure gets an answer.
const CONFIG_MAX: usize = 256;
const RX: u16 = 0;
const TX: u16 = 1;

/// What the user asked for on the command line.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Tap name (`None` or containing `%d`: the kernel picks).
    pub tap: Option<String>,
    /// Host-side settings of the tap.
    pub host: HostConfig,
    /// Guest MAC address.
    pub mac: [u8; 6],
    /// Guest MTU.
    pub mtu: u16,
    /// Queue pairs (tap queues, worker threads).
    pub queue_pairs: usize,
    /// Largest queue size.
    pub queue_size: u16,
}

/// Bad configuration or a tap that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// --num-queue-pairs out of range.
    #[error("--num-queue-pairs must be between 1 and {MAX_QUEUE_PAIRS}, not {0}")]
    QueuePairs(usize),
    /// --queue-size out of range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    /// --mtu out of range.
    #[error("--mtu must be between 68 and 65535, not {0}")]
    Mtu(u16),
    /// The tap could not be opened or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
}

struct Inner {
    config: NetConfig,
    tap: Tap,
    /// Guest MAC as the config space shows it (a legacy guest may write it).
    mac: Mutex<[u8; 6]>,
    acked_features: AtomicU64,
    /// One per worker thread; each is locked only by its own thread on the data path.
    pairs: Vec<Mutex<QueuePair>>,
}

/// The network device; clones share one tap.
#[derive(Clone)]
pub struct NetBackend(Arc<Inner>);

impl NetBackend {
    /// Validate the configuration, open the tap and configure its host side.
    pub fn new(config: NetConfig) -> Result<Self, ConfigError> {
        if config.queue_pairs == 0 || config.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(ConfigError::QueuePairs(config.queue_pairs));
        }
        if !config.queue_size.is_power_of_two()
            || config.queue_size < 2
            || config.queue_size > MAX_QUEUE_SIZE
        {
            return Err(ConfigError::QueueSize(config.queue_size));
        }
        if config.mtu < 68 {
            return Err(ConfigError::Mtu(config.mtu));
        }
        let tap = Tap::open(config.tap.as_deref(), config.queue_pairs)?;
        tap.set_vnet_hdr_len(12)?;
        let mut host = config.host.clone();
        host.mtu = Some(config.mtu);
        tap.configure_host(&host)?;
        let pairs = tap
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| Mutex::new(QueuePair::new(i, q.clone(), config.queue_pairs)))
            .collect();
        Ok(NetBackend(Arc::new(Inner {
            mac: Mutex::new(config.mac),
            config,
            tap,
            acked_features: AtomicU64::new(0),
            pairs,
        })))
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        &self.0.tap.name
    }

    /// Whether we attached to a tap that existed before.
    pub fn tap_existed(&self) -> bool {
        self.0.tap.existed
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated {
            features: self.0.acked_features.load(Ordering::Acquire),
        }
    }

    fn pair(&self, index: usize) -> Option<MutexGuard<'_, QueuePair>> {
        // A poisoned pair lock means a worker panicked mid-frame; its state is still sound
        // (no invariant spans the panic point), so keep serving.
        self.0
            .pairs
            .get(index)
            .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The epoll id of the tap in every worker thread.
    fn tap_event(&self) -> u16 {
        (self.num_queues() + 1) as u16
    }

    /// The virtio_net_config structure (virtio spec 5.1.4), little-endian.
    fn config_space(&self) -> [u8; CONFIG_MAX] {
        let mut b = [0u8; CONFIG_MAX];
        b[0..6].copy_from_slice(&self.0.mac.lock().map(|m| *m).unwrap_or(self.0.config.mac));
        b[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        b[8..10].copy_from_slice(&(self.0.config.queue_pairs as u16).to_le_bytes());
        b[10..12].copy_from_slice(&self.0.config.mtu.to_le_bytes());
        // Speed and duplex unknown.
        b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        b[16] = 0xff;
        b
    }
}

/// Feature names for the negotiation log line.
const FEATURE_NAMES: &[(u32, &str)] = &[
    (VIRTIO_F_VERSION_1, "version_1"),
    (VIRTIO_RING_F_EVENT_IDX, "event_idx"),
    (VIRTIO_RING_F_INDIRECT_DESC, "indirect_desc"),
    (VIRTIO_NET_F_CSUM, "csum"),
    (VIRTIO_NET_F_GUEST_CSUM, "guest_csum"),
    (VIRTIO_NET_F_GUEST_TSO4, "guest_tso4"),
    (VIRTIO_NET_F_GUEST_TSO6, "guest_tso6"),
    (VIRTIO_NET_F_GUEST_ECN, "guest_ecn"),
    (VIRTIO_NET_F_GUEST_UFO, "guest_ufo"),
    (VIRTIO_NET_F_HOST_TSO4, "host_tso4"),
    (VIRTIO_NET_F_HOST_TSO6, "host_tso6"),
    (VIRTIO_NET_F_HOST_ECN, "host_ecn"),
    (VIRTIO_NET_F_HOST_UFO, "host_ufo"),
    (VIRTIO_NET_F_MRG_RXBUF, "mrg_rxbuf"),
    (VIRTIO_NET_F_MAC, "mac"),
    (VIRTIO_NET_F_MTU, "mtu"),
    (VIRTIO_NET_F_STATUS, "status"),
    (VIRTIO_NET_F_MQ, "mq"),
];

/// TUN_F_* offloads the tap may hand us, from what the guest accepts on receive.
fn tap_offloads(features: u64) -> u32 {
    let has = |bit: u32| features & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN)
            && (has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6))
        {
            flags |= libc::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= libc::TUN_F_UFO;
        }
    }
    flags
}

impl VhostUserBackend for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.config.queue_pairs * 2
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.config.queue_size)
    }

    fn features(&self) -> u64 {
        let bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_STATUS,
        ];
        let mut f = bits.iter().fold(0u64, |f, &b| f | 1u64 << b)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // Linux refuses MQ without a control queue, which the frontend provides (QEMU and
        // Cloud Hypervisor handle it themselves); a single pair needs neither.
        if self.0.config.queue_pairs > 1 {
            f |= 1u64 << VIRTIO_NET_F_MQ;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.0.acked_features.store(features, Ordering::Release);
        let neg = Negotiated { features };
        let offloads = tap_offloads(features);
        if let Err(e) = self.0.tap.set_vnet_hdr_len(neg.hdr_len()) {
            log::error!("{e}: {}", e.source_text());
        }
        if let Err(e) = self.0.tap.set_offload(offloads) {
            log::error!("{e}: {}", e.source_text());
        }
        let names: Vec<&str> = FEATURE_NAMES
            .iter()
            .filter(|(bit, _)| features & (1u64 << bit) != 0)
            .map(|(_, name)| *name)
            .collect();
        log::info!(
            "guest negotiated {features:#x} ({}); {}-byte virtio-net headers, tap offloads {offloads:#x}",
            names.join(" "),
            neg.hdr_len()
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The queues carry the flag themselves (ring.rs reads it from the queue).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= space.len() => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the MAC is writable (legacy drivers set it through config space).
        let start = offset as usize;
        match start.checked_add(buf.len()) {
            Some(end) if end <= 6 => {
                let mut mac = self.0.mac.lock().unwrap_or_else(|e| e.into_inner());
                mac[start..end].copy_from_slice(buf);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "only the MAC address is writable",
            )),
        }
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        for i in 0..self.0.pairs.len() {
            if let Some(mut p) = self.pair(i) {
                p.set_memory(mem.clone());
            }
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.0.config.queue_pairs)
            .map(|i| 0b11u64 << (2 * i))
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        common::new_exit_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(rx), Some(tx)) = (vrings.get(usize::from(RX)), vrings.get(usize::from(TX)))
        else {
            return Ok(());
        };
        let Some(mut pair) = self.pair(thread_id) else {
            return Ok(());
        };
        let neg = self.negotiated();
        // Errors here are failures to signal the guest (its call eventfd); they are logged
        // and the worker keeps running, since ending it would kill the whole pair.
        let result = match device_event {
            RX => pair.process_rx(rx, neg),
            TX => pair.process_tx(tx, neg),
            e if e == self.tap_event() => {
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    pair.tap_failed();
                }
                let mut r = Ok(());
                if evset.contains(EventSet::OUT) {
                    r = pair.tap_writable(tx, neg);
                }
                if evset.contains(EventSet::IN) {
                    r = r.and(pair.process_rx(rx, neg));
                }
                r
            }
            other => {
                log::debug!("ignoring unknown event {other}");
                Ok(())
            }
        };
        if let Err(e) = result {
            log::error!("queue pair {thread_id}: cannot notify the guest: {e}");
        }
        Ok(())
    }
}

impl DeviceBackend for NetBackend {
    fn attach_workers(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        let id = u64::from(self.tap_event());
        for (i, handler) in handlers.iter().enumerate() {
            let Some(mut pair) = self.pair(i) else {
                continue;
            };
            // Record the registration before making it, so that the first tap event (which
            // waits for this lock) finds it.
            pair.attach(handler.as_raw_fd(), id, libc::EPOLLIN as u32);
            handler.register_listener(pair.tap_fd(), EventSet::IN, id)?;
        }
        Ok(())
    }

    fn vring_enabled(&self, index: u32, enabled: bool) {
        // A pair follows its receive queue: that is where the tap's frames go.
        if index % 2 == u32::from(RX) {
            if let Some(mut pair) = self.pair(index as usize / 2) {
                pair.follow_enable(enabled);
            }
        }
    }

    fn disconnected(&self) {
        for i in 0..self.0.pairs.len() {
            if let Some(mut p) = self.pair(i) {
                let s = p.reset();
                log::info!(
                    "queue pair {i}: sent {} frames ({} bytes), received {} frames ({} bytes); \
                     dropped {} transmitted, {} received, {} malformed receive chains",
                    s.tx_frames,
                    s.tx_bytes,
                    s.rx_frames,
                    s.rx_bytes,
                    s.tx_dropped,
                    s.rx_dropped,
                    s.rx_bad_chains
                );
            }
        }
        self.0.acked_features.store(0, Ordering::Release);
    }
}

/// The causes of an error, for one log line.
trait SourceText {
    fn source_text(&self) -> String;
}

impl<E: std::error::Error> SourceText for E {
    fn source_text(&self) -> String {
        self.source().map(|s| s.to_string()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_guest_features() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |f, &b| f | 1u64 << b);
        assert_eq!(tap_offloads(0), 0);
        // Segmentation offloads without checksum offload are meaningless to the tap.
        assert_eq!(tap_offloads(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tap_offloads(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN
            ])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        );
    }
}

//! One RX/TX queue pair and its tap queue, served by one worker thread.
//!
//! Receive: a frame is read from the tap into a bounce buffer, then copied into as many of the
//! guest's receive chains as it needs (one without MRG_RXBUF), which are published together.
//! When the guest has no buffers the frame stays pending, the tap is no longer polled and
//! the guest is asked to kick the receive queue; the kernel queues (and eventually drops)
//! further frames on the tap, which is the back-pressure a real NIC gives.
//!
//! Transmit: each chain is written to the tap with one `writev` straight from guest memory.
//! When the tap answers EAGAIN the chain stays available and the worker waits for EPOLLOUT.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{GuestMemoryAtomic, Vring};
use vhost_user_backend::{VringState, VringT};
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::volatile_memory::PtrGuard;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend};

use crate::ring::{self, ChainError, Direction};
use crate::tap::TapQueue;

/// Largest frame the tap hands us: a 64 KiB GSO packet, Ethernet and VLAN headers, the
/// virtio-net header, with room to spare.
pub const MAX_FRAME: usize = 65536 + 1024;
/// Smallest frame worth writing to the tap: an Ethernet header.
const ETH_HLEN: usize = 14;
/// Frames received per wake-up before other events of the thread get their turn.
const RX_BATCH: usize = 256;
/// Frames received between checks whether the guest wants an interrupt.
const RX_SIGNAL_BATCH: usize = 64;
/// Iovecs for one transmitted chain before we linearize it instead.
const TX_IOV_MAX: usize = 64;
/// Most frames whose used entries we publish (and tell the guest of) at once on transmit.
const TX_USED_BATCH: usize = 64;
/// At most one drop warning per pair per this interval.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What the guest and we agreed on, as the data path needs it.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    /// Acked virtio feature bits.
    pub features: u64,
}

impl Negotiated {
    fn has(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    /// Length of the virtio-net header: 12 bytes with VERSION_1 or MRG_RXBUF, else 10.
    pub fn hdr_len(&self) -> usize {
        if self.has(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
            || self.has(VIRTIO_NET_F_MRG_RXBUF)
        {
            12
        } else {
            10
        }
    }

    fn mrg_rxbuf(&self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// Whether a transmit header asks only for offloads the guest negotiated.
    fn tx_header_allowed(&self, flags: u8, gso_type: u8) -> bool {
        if u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && !self.has(VIRTIO_NET_F_CSUM) {
            return false;
        }
        if u32::from(gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0 && !self.has(VIRTIO_NET_F_HOST_ECN) {
            return false;
        }
        match u32::from(gso_type) & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.has(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.has(VIRTIO_NET_F_HOST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => self.has(VIRTIO_NET_F_HOST_UFO),
            _ => false,
        }
    }
}

/// Traffic and drop counters of one pair.
#[derive(Debug, Default, Clone, Copy)]
pub struct PairStats {
    /// Frames the guest sent that reached the tap.
    pub tx_frames: u64,
    /// Their bytes (headers included).
    pub tx_bytes: u64,
    /// Guest chains dropped on transmit (malformed, oversize, refused by the tap).
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes (headers included).
    pub rx_bytes: u64,
    /// Frames from the tap dropped because the guest's buffer could never hold them.
    pub rx_dropped: u64,
    /// Malformed receive chains returned unused.
    pub rx_bad_chains: u64,
}

/// Rate-limited warnings: one line per interval, with a count of what was suppressed.
#[derive(Debug, Default)]
struct DropLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl DropLog {
    fn warn(&mut self, pair: usize, what: std::fmt::Arguments) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < DROP_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            log::warn!(
                "queue pair {pair}: {what} ({} similar events not logged)",
                self.suppressed
            );
        } else {
            log::warn!("queue pair {pair}: {what}");
        }
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// A receive chain chosen for the pending frame: its head and its descriptors within
/// `rx_descs`.
#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    start: usize,
    end: usize,
}

/// Outcome of one attempt to hand the pending frame to the guest.
enum Delivery {
    Delivered,
    /// The guest has too few buffers for the frame now; its avail index was this.
    NoBuffers(u16),
    /// The ring's avail index is corrupt: wait for the guest to kick again.
    RingBroken,
    /// The frame can never be delivered.
    Dropped,
    /// Malformed chains were returned; try again with the next ones.
    Retry,
}

/// State of one queue pair; only its own worker thread locks it on the data path.
pub struct QueuePair {
    index: usize,
    tap: Arc<TapQueue>,
    mem: Option<GuestMemoryAtomic>,
    /// The epoll instance of the worker thread serving this pair (this connection's).
    epoll: Option<RawFd>,
    /// Epoll id of the tap.
    tap_event: u64,
    /// Events the tap is currently registered for.
    interest: u32,
    /// The tap has other queues, so this one may leave it while the guest disables the pair.
    detachable: bool,
    /// This queue is detached from the tap (and out of the worker's epoll set).
    detached: bool,
    rx_frame: Vec<u8>,
    /// Length of the frame in `rx_frame` still to be delivered (0: none).
    rx_pending: usize,
    /// The guest may be kicking the receive queue (we asked it to, or it is the ring's
    /// initial state).
    rx_kicks_on: bool,
    rx_signalled: u16,
    rx_descs: Vec<Descriptor>,
    rx_chains: Vec<RxChain>,
    scratch: Vec<Descriptor>,
    used: Vec<(u16, u32)>,
    tx_blocked: bool,
    tx_signalled: u16,
    tx_descs: Vec<Descriptor>,
    tx_linear: Vec<u8>,
    stats: PairStats,
    drops: DropLog,
}

/// epoll event bits as u32.
const EPOLLIN: u32 = libc::EPOLLIN as u32;
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;

fn vring_running(vring: &Vring) -> bool {
    let state = vring.get_ref();
    state.is_enabled() && state.get_queue().ready()
}

impl QueuePair {
    /// A pair serving `tap`, one of `tap_queues` queues of its tap.
    pub fn new(index: usize, tap: Arc<TapQueue>, tap_queues: usize) -> Self {
        QueuePair {
            index,
            tap,
            mem: None,
            epoll: None,
            tap_event: 0,
            interest: 0,
            detachable: tap_queues > 1,
            detached: false,
            rx_frame: vec![0; MAX_FRAME],
            rx_pending: 0,
            rx_kicks_on: true,
            rx_signalled: 0,
            rx_descs: Vec::new(),
            rx_chains: Vec::new(),
            scratch: Vec::new(),
            used: Vec::new(),
            tx_blocked: false,
            tx_signalled: 0,
            tx_descs: Vec::new(),
            tx_linear: Vec::new(),
            stats: PairStats::default(),
            drops: DropLog::default(),
        }
    }

    /// The tap queue's descriptor.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.as_raw_fd()
    }

    /// New guest memory.
    pub fn set_memory(&mut self, mem: GuestMemoryAtomic) {
        self.mem = Some(mem);
    }

    /// The worker thread of a new connection registered the tap with `events` under `id`.
    pub fn attach(&mut self, epoll: RawFd, id: u64, events: u32) {
        self.epoll = Some(epoll);
        self.tap_event = id;
        self.interest = events;
    }

    /// Forget everything tied to the connection that ended; returns its counters.
    pub fn reset(&mut self) -> PairStats {
        self.mem = None;
        self.epoll = None;
        self.interest = 0;
        // The next connection's worker registers the tap queue, which must be attached.
        if self.detached {
            match self.tap.set_attached(true) {
                Ok(()) => self.detached = false,
                Err(e) => log::error!(
                    "queue pair {}: cannot attach the tap queue again: {e}",
                    self.index
                ),
            }
        }
        self.rx_pending = 0;
        self.rx_kicks_on = true;
        self.rx_signalled = 0;
        self.tx_blocked = false;
        self.tx_signalled = 0;
        std::mem::take(&mut self.stats)
    }

    /// Register the tap for exactly `want_in` / `want_out` readiness.
    fn set_interest(&mut self, want_in: bool, want_out: bool) {
        let events = if want_in { EPOLLIN } else { 0 } | if want_out { EPOLLOUT } else { 0 };
        if events == self.interest || self.detached {
            return;
        }
        let Some(epoll) = self.epoll else {
            return;
        };
        let mut ev = libc::epoll_event {
            events,
            u64: self.tap_event,
        };
        // SAFETY: modifies the registration of our tap fd in the worker's live epoll
        // instance; `ev` is a valid epoll_event.
        let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_MOD, self.tap_fd(), &mut ev) };
        if rc < 0 {
            log::error!(
                "queue pair {}: cannot change tap polling: {}",
                self.index,
                io::Error::last_os_error()
            );
            return;
        }
        self.interest = events;
    }

    /// Follow the frontend enabling or disabling this pair (SET_VRING_ENABLE on its receive
    /// queue, as QEMU sends for a guest that uses fewer pairs than there are, e.g. with fewer
    /// vCPUs). A disabled pair's tap queue leaves the tap, so that the kernel steers its flows
    /// to the pairs the guest reads instead of queueing them where nobody does; it joins again
    /// when the pair is enabled. Called from the relay thread, while the worker may be waiting.
    pub fn follow_enable(&mut self, enabled: bool) {
        if !self.detachable || enabled != self.detached {
            return;
        }
        if enabled {
            if let Err(e) = self.tap.set_attached(true) {
                log::error!(
                    "queue pair {}: cannot attach the tap queue: {e}",
                    self.index
                );
                return;
            }
            self.detached = false;
            if let Some(epoll) = self.epoll {
                let mut ev = libc::epoll_event {
                    events: EPOLLIN,
                    u64: self.tap_event,
                };
                // SAFETY: adds our tap fd to the worker's live epoll instance; `ev` is a valid
                // epoll_event.
                let rc =
                    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, self.tap_fd(), &mut ev) };
                if rc < 0 {
                    log::error!(
                        "queue pair {}: cannot poll the tap again: {}",
                        self.index,
                        io::Error::last_os_error()
                    );
                } else {
                    self.interest = EPOLLIN;
                }
            }
            log::info!("queue pair {}: enabled; tap queue attached", self.index);
        } else {
            // Out of the epoll set first: a detached queue polls as an error.
            self.unwatch_tap();
            self.interest = 0;
            self.tx_blocked = false;
            if self.rx_pending > 0 {
                // Read before the guest disabled the pair; nobody can take it now.
                self.stats.rx_dropped += 1;
                self.rx_pending = 0;
            }
            if let Err(e) = self.tap.set_attached(false) {
                log::error!(
                    "queue pair {}: cannot detach the tap queue: {e}",
                    self.index
                );
            }
            // Detached or not, the queue is out of the epoll set now; attaching it again
            // restores both.
            self.detached = true;
            log::info!(
                "queue pair {}: disabled by the frontend; tap queue detached",
                self.index
            );
        }
    }

    /// Takes the tap fd out of the worker's epoll set, if the pair has one.
    fn unwatch_tap(&self) {
        if let Some(epoll) = self.epoll {
            // SAFETY: removes our tap fd from the worker's live epoll instance; no memory is
            // passed (EPOLL_CTL_DEL ignores the event argument).
            unsafe {
                libc::epoll_ctl(
                    epoll,
                    libc::EPOLL_CTL_DEL,
                    self.tap_fd(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    /// The tap reported an error condition (interface deleted): stop polling it, or the
    /// level-triggered error would spin the thread.
    pub fn tap_failed(&mut self) {
        if self.epoll.is_some() {
            log::error!(
                "queue pair {}: the tap reports an error (interface gone?); no more traffic on this pair",
                self.index
            );
            self.unwatch_tap();
            self.epoll = None;
        }
    }

    /// Move frames from the tap to the guest until the tap is empty or the guest is out of
    /// buffers.
    pub fn process_rx(&mut self, rx: &Vring, neg: Negotiated) -> io::Result<()> {
        if self.detached {
            return Ok(());
        }
        let Some(atomic) = self.mem.clone() else {
            self.set_interest(false, self.tx_blocked);
            return Ok(());
        };
        if !vring_running(rx) {
            self.set_interest(false, self.tx_blocked);
            return Ok(());
        }
        let mem = atomic.memory();
        let hdr_len = neg.hdr_len();
        if self.rx_kicks_on {
            self.rx_kicks_on = false;
            ring::suppress_kicks(&*mem, rx.get_ref().get_queue());
        }
        let mut delivered = 0;
        let mut want_in = true;
        loop {
            if self.rx_pending == 0 {
                if delivered >= RX_BATCH {
                    break;
                }
                match self.tap.read(&mut self.rx_frame) {
                    Ok(n) if n > hdr_len => self.rx_pending = n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::error!("queue pair {}: tap read failed: {e}", self.index);
                        break;
                    }
                }
            }
            match self.deliver(&*mem, rx, neg) {
                Delivery::Delivered => {
                    delivered += 1;
                    self.rx_pending = 0;
                    if delivered % RX_SIGNAL_BATCH == 0 {
                        // Let the guest take these and post new buffers while we go on.
                        let notify = ring::needs_interrupt(
                            &*mem,
                            rx.get_ref().get_queue(),
                            &mut self.rx_signalled,
                        );
                        if notify {
                            rx.signal_used_queue()?;
                        }
                    }
                }
                Delivery::Dropped => self.rx_pending = 0,
                Delivery::Retry => {}
                Delivery::NoBuffers(seen) => {
                    // Ask for a kick when more buffers arrive, then look again: they may
                    // have arrived before the request was visible.
                    let moved = ring::kick_when_beyond(&*mem, rx.get_ref().get_queue(), seen);
                    if moved {
                        ring::suppress_kicks(&*mem, rx.get_ref().get_queue());
                        continue;
                    }
                    self.rx_kicks_on = true;
                    want_in = false;
                    break;
                }
                Delivery::RingBroken => {
                    let _ = rx.enable_notification();
                    self.rx_kicks_on = true;
                    want_in = false;
                    break;
                }
            }
        }
        let notify = {
            let state = rx.get_ref();
            ring::needs_interrupt(&*mem, state.get_queue(), &mut self.rx_signalled)
        };
        if notify {
            rx.signal_used_queue()?;
        }
        self.set_interest(want_in, self.tx_blocked);
        Ok(())
    }

    /// Copy the pending frame into the guest's receive chains.
    fn deliver<M: GuestMemoryBackend>(&mut self, mem: &M, rx: &Vring, neg: Negotiated) -> Delivery {
        let len = self.rx_pending;
        let mut state = rx.get_mut();
        let queue: &mut Queue = state.get_queue_mut();
        let Some((avail_idx, avail)) = ring::available(mem, queue) else {
            self.drops.warn(
                self.index,
                format_args!("receive ring index is corrupt; waiting for the next kick"),
            );
            return Delivery::RingBroken;
        };
        self.rx_chains.clear();
        self.rx_descs.clear();
        let mut capacity = 0usize;
        let mut offset = 0u16;
        let mut bad: Option<ChainError> = None;
        while offset < avail && capacity < len {
            let Some(head) = ring::peek_head(mem, queue, offset) else {
                bad = Some(ChainError::TableOutsideMemory);
                break;
            };
            offset += 1;
            if let Err(e) =
                ring::walk_chain(mem, queue, head, Direction::DeviceWrites, &mut self.scratch)
            {
                self.rx_chains.push(RxChain {
                    head,
                    start: 0,
                    end: 0,
                });
                bad = Some(e);
                break;
            }
            let chain_cap: usize = self.scratch.iter().map(|d| d.len() as usize).sum();
            let first = self.rx_chains.is_empty();
            if chain_cap == 0 || (first && chain_cap < neg.hdr_len()) {
                self.rx_chains.push(RxChain {
                    head,
                    start: 0,
                    end: 0,
                });
                bad = Some(ChainError::TooSmall(chain_cap));
                break;
            }
            let start = self.rx_descs.len();
            self.rx_descs.extend_from_slice(&self.scratch);
            self.rx_chains.push(RxChain {
                head,
                start,
                end: self.rx_descs.len(),
            });
            capacity += chain_cap;
            if !neg.mrg_rxbuf() {
                break;
            }
        }
        if let Some(e) = bad {
            // Return every chain looked at unused; the frame stays pending for the next ones.
            self.stats.rx_bad_chains += 1;
            self.drops
                .warn(self.index, format_args!("malformed receive chain: {e}"));
            self.used.clear();
            let size = queue.size();
            // A head beyond the queue cannot be returned: it names no buffer.
            self.used.extend(
                self.rx_chains
                    .iter()
                    .filter(|c| c.head < size)
                    .map(|c| (c.head, 0u32)),
            );
            ring::consume(queue, offset);
            if let Err(e) = ring::publish_used(mem, queue, &self.used) {
                log::debug!("queue pair {}: used ring unwritable: {e}", self.index);
            }
            return Delivery::Retry;
        }
        if capacity < len {
            if !neg.mrg_rxbuf() && !self.rx_chains.is_empty() {
                // A single chain is all the guest may use for a frame and it is too small:
                // the frame can never be delivered. The chain stays available.
                self.stats.rx_dropped += 1;
                self.drops.warn(
                    self.index,
                    format_args!(
                        "dropping a {len}-byte frame: the guest's receive buffer holds {capacity}"
                    ),
                );
                return Delivery::Dropped;
            }
            return Delivery::NoBuffers(avail_idx);
        }
        if neg.hdr_len() == 12 {
            let buffers = if neg.mrg_rxbuf() {
                self.rx_chains.len() as u16
            } else {
                1
            };
            self.rx_frame[10..12].copy_from_slice(&buffers.to_le_bytes());
        }
        self.used.clear();
        let mut copied = 0usize;
        for chain in &self.rx_chains {
            let mut written = 0usize;
            for d in &self.rx_descs[chain.start..chain.end] {
                if copied == len {
                    break;
                }
                let n = (d.len() as usize).min(len - copied);
                if mem
                    .write_slice(&self.rx_frame[copied..copied + n], d.addr())
                    .is_err()
                {
                    // Checked in walk_chain; memory cannot shrink under us within a call.
                    break;
                }
                copied += n;
                written += n;
            }
            self.used.push((chain.head, written as u32));
        }
        ring::consume(queue, self.rx_chains.len() as u16);
        if let Err(e) = ring::publish_used(mem, queue, &self.used) {
            log::debug!("queue pair {}: used ring unwritable: {e}", self.index);
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += len as u64;
        Delivery::Delivered
    }

    /// Send the guest's transmit chains to the tap.
    pub fn process_tx(&mut self, tx: &Vring, neg: Negotiated) -> io::Result<()> {
        if self.tx_blocked {
            return Ok(());
        }
        let Some(atomic) = self.mem.clone() else {
            return Ok(());
        };
        if !vring_running(tx) {
            return Ok(());
        }
        let mem = atomic.memory();
        loop {
            if let Err(e) = tx.disable_notification() {
                log::debug!("queue pair {}: {e}", self.index);
            }
            if !self.drain_tx(&*mem, tx, neg) {
                // A corrupt ring: let the guest's next kick bring us back.
                let _ = tx.enable_notification();
                break;
            }
            if self.tx_blocked {
                break;
            }
            match tx.enable_notification() {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    log::debug!("queue pair {}: {e}", self.index);
                    break;
                }
            }
        }
        let notify = {
            let state = tx.get_ref();
            ring::needs_interrupt(&*mem, state.get_queue(), &mut self.tx_signalled)
        };
        if notify {
            tx.signal_used_queue()?;
        }
        let want_in = self.interest & EPOLLIN != 0;
        self.set_interest(want_in, self.tx_blocked);
        Ok(())
    }

    /// The tap became writable again.
    pub fn tap_writable(&mut self, tx: &Vring, neg: Negotiated) -> io::Result<()> {
        self.tx_blocked = false;
        self.process_tx(tx, neg)
    }

    /// Write every available transmit chain, publishing used entries in groups. Returns
    /// false when the ring itself is unusable.
    fn drain_tx<M: GuestMemoryBackend>(&mut self, mem: &M, tx: &Vring, neg: Negotiated) -> bool {
        self.used.clear();
        let mut state = tx.get_mut();
        let mut sound = true;
        // Reused for every chain of this burst (one allocation per burst, not per frame).
        let mut guards = Vec::with_capacity(TX_IOV_MAX);
        loop {
            let queue: &mut Queue = state.get_queue_mut();
            let Some((_, avail)) = ring::available(mem, queue) else {
                self.drops.warn(
                    self.index,
                    format_args!("transmit ring index is corrupt; waiting for the next kick"),
                );
                sound = false;
                break;
            };
            if avail == 0 {
                break;
            }
            let Some(head) = ring::peek_head(mem, queue, 0) else {
                sound = false;
                break;
            };
            let sent = self.transmit(mem, queue, head, neg, &mut guards);
            guards.clear();
            match sent {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Leave the chain available and wait for EPOLLOUT.
                    self.tx_blocked = true;
                    break;
                }
                Err(e) => {
                    self.stats.tx_dropped += 1;
                    self.drops
                        .warn(self.index, format_args!("dropped a transmitted frame: {e}"));
                }
            }
            ring::consume(queue, 1);
            // A head beyond the queue cannot be returned: it names no buffer.
            if head < queue.size() {
                self.used.push((head, 0));
            }
            if self.used.len() >= TX_USED_BATCH {
                self.publish_tx(mem, &mut state);
            }
        }
        self.publish_tx(mem, &mut state);
        sound
    }

    /// Publish the transmit chains used so far and, when the guest asked to hear of them,
    /// tell it at once: it refills the ring while we go on writing.
    fn publish_tx<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        state: &mut VringState<GuestMemoryAtomic>,
    ) {
        if self.used.is_empty() {
            return;
        }
        if let Err(e) = ring::publish_used(mem, state.get_queue_mut(), &self.used) {
            log::debug!("queue pair {}: used ring unwritable: {e}", self.index);
        }
        self.used.clear();
        if ring::needs_interrupt(mem, state.get_queue(), &mut self.tx_signalled) {
            if let Err(e) = state.signal_used_queue() {
                log::error!("queue pair {}: cannot notify the guest: {e}", self.index);
            }
        }
    }

    /// Write the chain at `head` to the tap. Errors other than `WouldBlock` mean the chain
    /// is dropped (and still returned to the guest).
    fn transmit<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        queue: &Queue,
        head: u16,
        neg: Negotiated,
        guards: &mut Vec<PtrGuard>,
    ) -> io::Result<()> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
        ring::walk_chain(mem, queue, head, Direction::DeviceReads, &mut self.tx_descs)
            .map_err(|e| invalid(format!("malformed chain: {e}")))?;
        let hdr_len = neg.hdr_len();
        let total: usize = self.tx_descs.iter().map(|d| d.len() as usize).sum();
        if total < hdr_len + ETH_HLEN {
            return Err(invalid(format!(
                "chain of {total} bytes is shorter than the {hdr_len}-byte header and an Ethernet header"
            )));
        }
        if total > MAX_FRAME {
            return Err(invalid(format!("oversize frame of {total} bytes")));
        }
        let mut hdr = [0u8; 2];
        let mut got = 0;
        for d in &self.tx_descs {
            let n = (d.len() as usize).min(hdr.len() - got);
            mem.read_slice(&mut hdr[got..got + n], d.addr())
                .map_err(|e| invalid(format!("unreadable header: {e}")))?;
            got += n;
            if got == hdr.len() {
                break;
            }
        }
        if !neg.tx_header_allowed(hdr[0], hdr[1]) {
            return Err(invalid(format!(
                "header asks for offloads that were not negotiated (flags {:#x}, gso {:#x})",
                hdr[0], hdr[1]
            )));
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; TX_IOV_MAX];
        let mut count = 0;
        let mut fits = true;
        'descs: for d in &self.tx_descs {
            for slice in mem.get_slices(d.addr(), d.len() as usize) {
                let slice = slice.map_err(|e| invalid(format!("buffer unreadable: {e}")))?;
                if count == TX_IOV_MAX {
                    fits = false;
                    break 'descs;
                }
                let guard = slice.ptr_guard();
                iov[count] = libc::iovec {
                    iov_base: guard.as_ptr() as *mut libc::c_void,
                    iov_len: slice.len(),
                };
                guards.push(guard);
                count += 1;
            }
        }
        let written = if fits {
            // SAFETY: each iovec points into guest memory checked by get_slices and kept
            // mapped by `guards` and the memory guard the caller holds during the call.
            unsafe { self.tap.writev(&iov[..count]) }
        } else {
            guards.clear();
            self.tx_linear.clear();
            self.tx_linear.resize(total, 0);
            let mut off = 0;
            for d in &self.tx_descs {
                let n = d.len() as usize;
                mem.read_slice(&mut self.tx_linear[off..off + n], d.addr())
                    .map_err(|e| invalid(format!("buffer unreadable: {e}")))?;
                off += n;
            }
            let one = [libc::iovec {
                iov_base: self.tx_linear.as_mut_ptr() as *mut libc::c_void,
                iov_len: total,
            }];
            // SAFETY: the iovec covers tx_linear, which lives across the call.
            unsafe { self.tap.writev(&one) }
        };
        let n = written.map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                e
            } else {
                invalid(format!("the tap refused it: {e}"))
            }
        })?;
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += n as u64;
        Ok(())
    }
}

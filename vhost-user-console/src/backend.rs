//! The `VhostUserBackend` of the console: features, config space, the multiport control
//! protocol, and the single worker thread that moves bytes between the guest's queues and the
//! ports' host endpoints.
//!
//! Queue layout (virtio spec 5.3.2): port 0 receive/transmit are queues 0/1; with
//! VIRTIO_CONSOLE_F_MULTIPORT the control receive/transmit queues are 2/3 and port N (N >= 1)
//! uses 2N+2/2N+3.
//!
//! Flow control: guest output is taken from the transmit queue as fast as the endpoint takes it;
//! a client that stops reading holds the port back for at most [`STALL_PATIENCE`] and is then
//! detached. Host input waits in a bounded buffer until the guest posts receive buffers; when
//! the buffer is full the endpoint is not read any more, so the writer is held by the kernel.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use common::{BackendChannel, DeviceBackend, GuestMemoryAtomic, Vring};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use crate::chain::{self, ChainError};
use crate::control::{self, Control};
use crate::host::{HostEnd, Listener, MAX_CLIENTS};
use crate::port::{Port, PortConfig, PortError, ReadOutcome};

/// virtio-console feature bits (virtio spec 5.3.3).
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Multiple ports and the control queues.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// Emergency write through the config space.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// Most ports (the control protocol allows more; nobody needs them).
pub const MAX_PORTS: usize = 31;
/// Largest queue size accepted.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Largest history kept per port.
pub const MAX_HISTORY: usize = 64 << 20;
/// How long a client that stopped reading may hold guest output back.
pub const STALL_PATIENCE: Duration = Duration::from_secs(3);
/// Device-to-driver control messages kept while the guest posts no control buffers.
const MAX_CONTROL_BACKLOG: usize = 1024;
/// Guest output is handed to the endpoint in batches of about this size.
const OUTPUT_BATCH: usize = 256 * 1024;
/// Config space answered: `struct virtio_console_config` (cols, rows, max_nr_ports, emerg_wr;
/// 12 bytes) padded to the largest config vhost-user carries.
const CONFIG_WINDOW: usize = 256;
/// Config-space offset of `emerg_wr`.
const EMERG_WR_OFFSET: u32 = 8;
/// Epoll ids per port: the endpoint's main descriptor, then one per client slot.
const SLOTS: usize = 1 + MAX_CLIENTS;

/// What the daemon serves.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// Port 0 (the console) first, then the named ports.
    pub ports: Vec<PortConfig>,
    /// Bytes of recent output kept per port and replayed to clients that attach.
    pub history: usize,
    /// Largest queue size the frontend may use.
    pub queue_size: u16,
    /// Console size (cols, rows) to report when port 0 is not a pty.
    pub size: Option<(u16, u16)>,
}

/// Bad configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A port could not be opened.
    #[error(transparent)]
    Port(#[from] PortError),
    /// Too many ports.
    #[error("at most {MAX_PORTS} ports are supported, not {0}")]
    TooManyPorts(usize),
    /// --queue-size out of range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    /// --history out of range.
    #[error("--history must be at most {MAX_HISTORY} bytes, not {0}")]
    History(usize),
    /// The periodic timer (window size, stalled clients) could not be created.
    #[error("cannot create a timer")]
    Timer(#[source] io::Error),
}

/// The role of a queue index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueRole {
    Receive(usize),
    Transmit(usize),
    ControlReceive,
    ControlTransmit,
}

fn queue_role(index: usize) -> QueueRole {
    match index {
        0 => QueueRole::Receive(0),
        1 => QueueRole::Transmit(0),
        2 => QueueRole::ControlReceive,
        3 => QueueRole::ControlTransmit,
        q if q % 2 == 0 => QueueRole::Receive(q / 2 - 1),
        q => QueueRole::Transmit(q / 2 - 1),
    }
}

fn receive_queue(port: usize) -> usize {
    if port == 0 {
        0
    } else {
        2 * port + 2
    }
}

const CONTROL_RECEIVE: usize = 2;
const CONTROL_TRANSMIT: usize = 3;

/// Counts an event and logs it at counts 1, 2, 4, 8...: a hostile guest cannot flood the log.
#[derive(Debug, Default)]
struct RateLimited(u64);

impl RateLimited {
    fn hit(&mut self) -> Option<u64> {
        self.0 += 1;
        self.0.is_power_of_two().then_some(self.0)
    }
}

/// Epoll registrations of the current connection's worker thread.
#[derive(Default)]
struct Poller {
    handler: Option<Arc<VringEpollHandler<ConsoleBackend>>>,
    registered: HashMap<u64, (RawFd, u32)>,
}

impl Poller {
    /// Make `id` watch `fd` for `events` (nothing when `fd` is None or `events` empty).
    fn set(&mut self, id: u64, fd: Option<RawFd>, events: EventSet) -> io::Result<()> {
        let want = fd
            .filter(|_| !events.is_empty())
            .map(|f| (f, events.bits()));
        let have = self.registered.get(&id).copied();
        if want == have {
            return Ok(());
        }
        let Some(handler) = &self.handler else {
            return Ok(());
        };
        if let Some((f, e)) = have {
            self.registered.remove(&id);
            let _ = handler.unregister_listener(f, EventSet::from_bits_truncate(e), id);
        }
        if let Some((f, e)) = want {
            handler.register_listener(f, EventSet::from_bits_truncate(e), id)?;
            self.registered.insert(id, (f, e));
        }
        Ok(())
    }
}

/// One pass over a queue's available chains: each is popped, handled and put back used; the
/// guest is signalled once, when the pass ends, if any chain was used.
struct ChainPass<'a> {
    vring: &'a Vring,
    mem: vm_memory::GuestMemoryLoadGuard<common::GuestMemoryMmap>,
    queue: usize,
    used: bool,
}

impl ChainPass<'_> {
    /// The next available chain: its head index, and whether its descriptors (collected into
    /// `descs`) are sound and all `writable` or all not.
    fn next(
        &mut self,
        writable: bool,
        descs: &mut Vec<Descriptor>,
    ) -> Option<(u16, Result<(), ChainError>)> {
        let chain = self
            .vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(&*self.mem)?;
        let head = chain.head_index();
        Some((head, chain::collect(chain, writable, descs)))
    }

    /// Give chain `head` back to the guest with `len` bytes written; false if that failed.
    fn put(&mut self, head: u16, len: u32) -> bool {
        self.used = true;
        match self.vring.add_used(head, len) {
            Ok(()) => true,
            Err(e) => {
                log::debug!("queue {}: cannot return chain {head}: {e}", self.queue);
                false
            }
        }
    }
}

impl Drop for ChainPass<'_> {
    fn drop(&mut self) {
        if self.used {
            if let Err(e) = self.vring.signal_used_queue() {
                log::debug!("queue {}: cannot signal the guest: {e}", self.queue);
            }
        }
    }
}

/// Everything the worker thread and the vhost-user request thread share.
struct Device {
    ports: Vec<Port>,
    num_queues: usize,
    acked_multiport: bool,
    /// (cols, rows) reported in the config space.
    size: (u16, u16),
    /// The frontend's backend-request channel, when it set one up.
    channel: Option<BackendChannel>,
    /// The config space changed since the frontend was last told.
    config_changed: bool,
    control_out: VecDeque<Vec<u8>>,
    mem: Option<GuestMemoryAtomic>,
    poller: Poller,
    timer: TimerFd,
    /// Ports whose transmit queue waits for a slow client.
    tx_waiting: Vec<bool>,
    descs: Vec<Descriptor>,
    scratch: Vec<u8>,
    bad_chains: RateLimited,
    bad_control: RateLimited,
    dropped_control: RateLimited,
    failed_notices: RateLimited,
}

struct Inner {
    num_ports: usize,
    queue_size: u16,
    size_known: bool,
    device: Mutex<Device>,
}

/// The console device; clones share one state.
#[derive(Clone)]
pub struct ConsoleBackend(Arc<Inner>);

impl ConsoleBackend {
    /// Validate the configuration and open every port's endpoint and log.
    pub fn new(config: ConsoleConfig) -> Result<Self, ConfigError> {
        if config.ports.is_empty() || config.ports.len() > MAX_PORTS {
            return Err(ConfigError::TooManyPorts(config.ports.len()));
        }
        if !config.queue_size.is_power_of_two()
            || config.queue_size < 2
            || config.queue_size > MAX_QUEUE_SIZE
        {
            return Err(ConfigError::QueueSize(config.queue_size));
        }
        if config.history > MAX_HISTORY {
            return Err(ConfigError::History(config.history));
        }
        let mut ports = Vec::with_capacity(config.ports.len());
        for (i, pc) in config.ports.iter().enumerate() {
            ports.push(Port::open(i as u32, pc, config.history)?);
        }
        let pty_size = match &ports[0].host {
            HostEnd::Pty(p) => Some(p.window_size().unwrap_or((0, 0))),
            _ => None,
        };
        // Telnet clients report their window size once attached.
        let follows_clients = matches!(ports[0].host, HostEnd::Listen(Listener::Telnet(_), _));
        let size_known = pty_size.is_some() || config.size.is_some() || follows_clients;
        let size = pty_size.or(config.size).unwrap_or((0, 0));
        let num_ports = ports.len();
        let num_queues = if num_ports > 1 { 2 * num_ports + 2 } else { 2 };
        // Only a single-port device, or port 0 before the driver negotiated multiport, takes
        // input without a handshake.
        ports[0].guest_open = true;
        let mut timer = TimerFd::new().map_err(|e| ConfigError::Timer(e.into()))?;
        timer
            .reset(Duration::from_secs(1), Some(Duration::from_secs(1)))
            .map_err(|e| ConfigError::Timer(e.into()))?;
        Ok(Self(Arc::new(Inner {
            num_ports,
            queue_size: config.queue_size,
            size_known,
            device: Mutex::new(Device {
                tx_waiting: vec![false; num_ports],
                ports,
                num_queues,
                acked_multiport: false,
                size,
                channel: None,
                config_changed: false,
                control_out: VecDeque::new(),
                mem: None,
                poller: Poller::default(),
                timer,
                descs: Vec::new(),
                scratch: Vec::new(),
                bad_chains: RateLimited::default(),
                bad_control: RateLimited::default(),
                dropped_control: RateLimited::default(),
                failed_notices: RateLimited::default(),
            }),
        })))
    }

    /// Where each port's endpoint is, for the start-up message.
    pub fn describe_ports(&self) -> Vec<String> {
        self.device().ports.iter().map(Port::describe).collect()
    }

    fn device(&self) -> MutexGuard<'_, Device> {
        // A panic elsewhere must not take the console down with it.
        self.0.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell the frontend the config space changed. Called without the device lock: the
    /// frontend may read the config space (GET_CONFIG, served under that lock) before it
    /// acknowledges.
    fn notify_config_change(&self, channel: &BackendChannel) {
        if let Err(e) = channel.config_changed() {
            if let Some(n) = self.device().failed_notices.hit() {
                log::warn!("cannot notify the frontend of the new console size: {e} ({n} so far)");
            }
        }
    }

    fn num_queues_for(&self) -> usize {
        if self.0.num_ports > 1 {
            2 * self.0.num_ports + 2
        } else {
            2
        }
    }
}

impl Device {
    fn event_id(&self, port: usize, slot: usize) -> u64 {
        (self.num_queues + 2 + port * SLOTS + slot) as u64
    }

    fn timer_id(&self) -> u64 {
        (self.num_queues + 1) as u64
    }

    fn note_bad_chain(&mut self, queue: usize, head: u16, e: &ChainError) {
        if let Some(n) = self.bad_chains.hit() {
            log::warn!("queue {queue}: descriptor chain {head} refused: {e} ({n} so far)");
        }
    }

    /// Bring the epoll registrations in line with what every endpoint needs now, and close
    /// clients that went away (after unregistering them, so a reused descriptor number is never
    /// confused with theirs).
    fn sync_interest(&mut self) {
        let timer_fd = self.timer.as_raw_fd();
        let timer_id = self.timer_id();
        if let Err(e) = self.poller.set(timer_id, Some(timer_fd), EventSet::IN) {
            log::warn!("cannot watch the timer: {e}");
        }
        for p in 0..self.ports.len() {
            let main_id = self.event_id(p, 0);
            let client_ids: Vec<u64> = (1..SLOTS).map(|s| self.event_id(p, s)).collect();
            let input_events = if self.ports[p].input_full() {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            let port = &mut self.ports[p];
            let main_events = match &port.host {
                HostEnd::Listen(..) => EventSet::IN,
                _ => input_events,
            };
            if let Err(e) = self.poller.set(main_id, port.host.main_fd(), main_events) {
                if let HostEnd::Stdio(s) = &mut port.host {
                    // Regular files (stdin < /dev/null) cannot be polled: no input then.
                    log::info!("port {p}: stdin cannot be polled ({e}); no input from it");
                    s.input_open = false;
                } else {
                    log::warn!("port {p}: cannot watch the endpoint: {e}");
                }
            }
            if let HostEnd::Listen(_, clients) = &mut port.host {
                for (slot, c) in clients.iter_mut().enumerate() {
                    let id = client_ids[slot];
                    match c {
                        Some(client) if client.dead => {
                            let _ = self.poller.set(id, None, EventSet::empty());
                            *c = None;
                        }
                        Some(client) => {
                            let mut events = input_events;
                            if !client.pending.is_empty() {
                                events |= EventSet::OUT;
                            }
                            if let Err(e) =
                                self.poller.set(id, Some(client.conn.as_raw_fd()), events)
                            {
                                log::warn!("port {p}: cannot watch a client: {e}");
                            }
                        }
                        None => {
                            let _ = self.poller.set(id, None, EventSet::empty());
                        }
                    }
                }
            }
        }
    }

    /// A pass over `queue`'s available chains, if the queue is running.
    fn pass<'a>(&self, vrings: &'a [Vring], queue: usize) -> Option<ChainPass<'a>> {
        let vring = vrings.get(queue)?;
        if !vring.get_ref().is_enabled() {
            return None;
        }
        Some(ChainPass {
            vring,
            mem: self.mem.as_ref()?.memory(),
            queue,
            used: false,
        })
    }

    /// Take guest output from port `p`'s transmit queue.
    fn process_tx(&mut self, p: usize, vrings: &[Vring]) {
        let queue = receive_queue(p) + 1;
        let Some(mut pass) = self.pass(vrings, queue) else {
            return;
        };
        let mut data = std::mem::take(&mut self.scratch);
        data.clear();
        self.tx_waiting[p] = false;
        loop {
            if self.ports[p].output_blocked() {
                self.tx_waiting[p] = true;
                break;
            }
            let Some((head, collected)) = pass.next(false, &mut self.descs) else {
                break;
            };
            let result =
                collected.and_then(|()| chain::read_into(&*pass.mem, &self.descs, &mut data));
            if let Err(e) = result {
                self.note_bad_chain(queue, head, &e);
            }
            if !pass.put(head, 0) {
                self.note_bad_chain(queue, head, &ChainError::Broken);
            }
            if data.len() >= OUTPUT_BATCH {
                self.ports[p].output(&data);
                data.clear();
            }
        }
        self.ports[p].output(&data);
        data.clear();
        self.scratch = data;
    }

    /// Hand waiting input of port `p` to the guest's receive buffers.
    fn fill_rx(&mut self, p: usize, vrings: &[Vring]) {
        let may_receive = if p == 0 {
            !self.acked_multiport || self.ports[0].guest_open
        } else {
            self.acked_multiport && self.ports[p].guest_open
        };
        if !may_receive || self.ports[p].input.is_empty() {
            return;
        }
        let queue = receive_queue(p);
        let Some(mut pass) = self.pass(vrings, queue) else {
            return;
        };
        while !self.ports[p].input.is_empty() {
            let Some((head, collected)) = pass.next(true, &mut self.descs) else {
                break;
            };
            let written = collected.and_then(|()| {
                chain::write_from(&*pass.mem, &self.descs, &mut self.ports[p].input)
            });
            let len = written.unwrap_or_else(|e| {
                self.note_bad_chain(queue, head, &e);
                0
            });
            pass.put(head, len);
        }
    }

    fn queue_control(&mut self, msg: Vec<u8>) {
        if self.control_out.len() >= MAX_CONTROL_BACKLOG {
            if let Some(n) = self.dropped_control.hit() {
                log::warn!("control queue backlog full; dropping messages ({n} so far)");
            }
            return;
        }
        self.control_out.push_back(msg);
    }

    /// Hand waiting control messages to the guest's control receive buffers.
    fn fill_control(&mut self, vrings: &[Vring]) {
        if !self.acked_multiport || self.control_out.is_empty() {
            return;
        }
        let Some(mut pass) = self.pass(vrings, CONTROL_RECEIVE) else {
            return;
        };
        while let Some(msg) = self.control_out.front() {
            let Some((head, collected)) = pass.next(true, &mut self.descs) else {
                break;
            };
            let written =
                collected.and_then(|()| chain::write_message(&*pass.mem, &self.descs, msg));
            // A buffer that cannot hold the message costs the message: retrying it forever on
            // a hostile guest's buffers would be worse.
            self.control_out.pop_front();
            let len = written.unwrap_or_else(|e| {
                self.note_bad_chain(CONTROL_RECEIVE, head, &e);
                0
            });
            pass.put(head, len);
        }
    }

    /// Read the driver's control messages and answer them.
    fn process_control(&mut self, vrings: &[Vring]) {
        let mut messages = Vec::new();
        if let Some(mut pass) = self.pass(vrings, CONTROL_TRANSMIT) {
            while let Some((head, collected)) = pass.next(false, &mut self.descs) {
                let mut header = [0u8; control::CONTROL_LEN];
                let read = collected
                    .and_then(|()| chain::read_prefix(&*pass.mem, &self.descs, &mut header));
                match read {
                    Ok(n) => match Control::parse(&header[..n]) {
                        Some(c) => messages.push(c),
                        None => {
                            if let Some(k) = self.bad_control.hit() {
                                log::warn!(
                                    "control message of {n} bytes is too short ({k} so far)"
                                );
                            }
                        }
                    },
                    Err(e) => self.note_bad_chain(CONTROL_TRANSMIT, head, &e),
                }
                pass.put(head, 0);
            }
        }
        for c in messages {
            self.handle_control(c, vrings);
        }
        self.fill_control(vrings);
    }

    fn handle_control(&mut self, c: Control, vrings: &[Vring]) {
        let port = c.id as usize;
        match c.event {
            control::DEVICE_READY => {
                if c.value != 1 {
                    log::warn!("the guest driver failed to set up the device");
                    return;
                }
                log::info!(
                    "guest driver ready; announcing {} port(s)",
                    self.ports.len()
                );
                // A driver starting over forgets what it was told before.
                self.control_out.clear();
                for id in 0..self.ports.len() as u32 {
                    self.queue_control(control::announce(id, control::DEVICE_ADD, &[]));
                }
            }
            control::PORT_READY if port < self.ports.len() => {
                if c.value != 1 {
                    log::warn!("port {port}: the guest could not set it up");
                    return;
                }
                let id = c.id;
                if port == 0 {
                    self.queue_control(control::announce(id, control::CONSOLE_PORT, &[]));
                    let (cols, rows) = self.size;
                    if cols != 0 && rows != 0 {
                        self.queue_control(control::resize(0, cols, rows));
                    }
                    // Console ports take input from the start (Linux hooks them to hvc).
                    self.ports[0].guest_open = true;
                }
                if let Some(name) = self.ports[port].name.clone() {
                    self.queue_control(control::announce(id, control::PORT_NAME, name.as_bytes()));
                }
                // The daemon keeps output for absent clients, so the host side is always open.
                self.queue_control(control::announce(id, control::PORT_OPEN, &[]));
            }
            control::PORT_OPEN if port < self.ports.len() => {
                let open = c.value != 0;
                log::debug!(
                    "port {port}: guest {}",
                    if open { "opened it" } else { "closed it" }
                );
                if port != 0 {
                    self.ports[port].guest_open = open;
                }
                self.fill_rx(port, vrings);
            }
            event => {
                if let Some(k) = self.bad_control.hit() {
                    log::warn!(
                        "unexpected control message {} ({event}) for port {} ({k} so far)",
                        control::event_name(event),
                        c.id
                    );
                }
            }
        }
    }

    /// The periodic tick: follow the pty's window size and detach clients that stalled.
    fn tick(&mut self, vrings: &[Vring]) {
        let _ = self.timer.wait();
        if let HostEnd::Pty(pty) = &self.ports[0].host {
            if let Some(size) = pty.window_size() {
                if size != self.size {
                    self.set_size(size, vrings);
                }
            }
        }
        for p in 0..self.ports.len() {
            if self.tx_waiting[p] {
                self.ports[p].detach_stalled_clients(STALL_PATIENCE);
                if !self.ports[p].output_blocked() {
                    self.process_tx(p, vrings);
                }
            }
        }
    }

    fn set_size(&mut self, (cols, rows): (u16, u16), vrings: &[Vring]) {
        log::info!("console size now {cols}x{rows}");
        self.size = (cols, rows);
        if self.acked_multiport {
            self.queue_control(control::resize(0, cols, rows));
            self.fill_control(vrings);
        }
        // Single-port guests re-read the config space on a config-change interrupt, which the
        // frontend raises when told through its backend-request channel.
        self.config_changed = self.channel.is_some();
    }

    /// The channel to notify of a config change made since the last call, if any.
    fn take_config_notice(&mut self) -> Option<BackendChannel> {
        std::mem::take(&mut self.config_changed)
            .then(|| self.channel.clone())
            .flatten()
    }

    /// An endpoint descriptor of port `p` is ready.
    fn endpoint_event(&mut self, p: usize, slot: usize, evset: EventSet, vrings: &[Vring]) {
        let Some(port) = self.ports.get_mut(p) else {
            return;
        };
        if slot == 0 && matches!(port.host, HostEnd::Listen(..)) {
            port.accept_clients();
            return;
        }
        if slot > 0 && evset.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            port.flush_client(slot);
        }
        if evset
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            // Stdin stays blocking (it is shared with the shell): one read per readiness event.
            let once = matches!(port.host, HostEnd::Stdio(_));
            while !port.input_full() && port.read_input(slot) == ReadOutcome::Read && !once {}
            if let Some(size) = port.reported_size.take() {
                // Only the console (port 0) has a size.
                if p == 0 && size != self.size {
                    self.set_size(size, vrings);
                }
            }
            self.fill_rx(p, vrings);
        }
        if self.tx_waiting[p] && !self.ports[p].output_blocked() {
            self.process_tx(p, vrings);
        }
    }

    fn handle(&mut self, id: usize, evset: EventSet, vrings: &[Vring]) {
        if id < self.num_queues {
            match queue_role(id) {
                QueueRole::Receive(p) => {
                    if p < self.ports.len() {
                        self.fill_rx(p, vrings);
                    }
                }
                QueueRole::Transmit(p) => {
                    if p < self.ports.len() {
                        self.process_tx(p, vrings);
                    }
                }
                QueueRole::ControlReceive => self.fill_control(vrings),
                QueueRole::ControlTransmit => self.process_control(vrings),
            }
        } else if id as u64 == self.timer_id() {
            self.tick(vrings);
        } else if let Some(k) = id.checked_sub(self.num_queues + 2) {
            self.endpoint_event(k / SLOTS, k % SLOTS, evset, vrings);
        }
        // Resumes reading endpoints whose input buffer drained, watches new clients, closes
        // departed ones.
        self.sync_interest();
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues_for()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.size_known {
            f |= 1 << VIRTIO_CONSOLE_F_SIZE;
        }
        if self.0.num_ports > 1 {
            f |= 1 << VIRTIO_CONSOLE_F_MULTIPORT;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.device().acked_multiport = features & (1 << VIRTIO_CONSOLE_F_MULTIPORT) != 0;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (cols, rows) = self.device().size;
        // Zero beyond the structure: frontends may read a larger, generic config window.
        let mut space = [0u8; CONFIG_WINDOW];
        space[0..2].copy_from_slice(&cols.to_le_bytes());
        space[2..4].copy_from_slice(&rows.to_le_bytes());
        space[4..8].copy_from_slice(&(self.0.num_ports as u32).to_le_bytes());
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= CONFIG_WINDOW => space[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // emerg_wr: one character for port 0, written before the queues may work.
        if offset == EMERG_WR_OFFSET && (1..=4).contains(&buf.len()) {
            let mut dev = self.device();
            dev.ports[0].output(&buf[..1]);
            dev.sync_interest();
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "only emerg_wr is writable in the console config space",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        self.device().mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread: console traffic is small and every queue shares the ports' state.
        vec![(1u64 << self.num_queues_for()) - 1]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        common::new_exit_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors are handled inside: returning one would stop the worker thread.
        let notice = {
            let mut dev = self.device();
            dev.handle(usize::from(device_event), evset, vrings);
            dev.take_config_notice()
        };
        if let Some(channel) = notice {
            self.notify_config_change(&channel);
        }
        Ok(())
    }
}

impl DeviceBackend for ConsoleBackend {
    fn attach_workers(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        let Some(handler) = handlers.first() else {
            return Err(io::Error::other("no worker thread"));
        };
        let mut dev = self.device();
        dev.poller = Poller {
            handler: Some(handler.clone()),
            registered: HashMap::new(),
        };
        dev.sync_interest();
        Ok(())
    }

    fn backend_channel(&self, channel: BackendChannel) {
        self.device().channel = Some(channel);
    }

    fn disconnected(&self) {
        let mut dev = self.device();
        dev.channel = None;
        dev.config_changed = false;
        // Dropping the handler ends the cycle backend -> handler -> backend and its epoll fd.
        dev.poller = Poller::default();
        dev.mem = None;
        dev.acked_multiport = false;
        // Ports, their clients, history and pending input stay: they belong to the process.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_layout_follows_the_spec() {
        assert_eq!(queue_role(0), QueueRole::Receive(0));
        assert_eq!(queue_role(1), QueueRole::Transmit(0));
        assert_eq!(queue_role(2), QueueRole::ControlReceive);
        assert_eq!(queue_role(3), QueueRole::ControlTransmit);
        assert_eq!(queue_role(4), QueueRole::Receive(1));
        assert_eq!(queue_role(5), QueueRole::Transmit(1));
        assert_eq!(queue_role(7), QueueRole::Transmit(2));
        assert_eq!(receive_queue(2), 6);
    }
}

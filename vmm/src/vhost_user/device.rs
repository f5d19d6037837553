//! One vhost-user device: the frontend end of the socket to its daemon, negotiation, ring
//! start/stop, and reconnection after the daemon restarts.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::config::{VhostUserDeviceConfig, VhostUserDeviceKind};
use crate::virtio::{
    ActivateError, ActivatedQueue, VirtioBackend, DEVICE_FEATURES_MASK, TRANSPORT_FEATURES,
    VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_FS, VIRTIO_ID_NET,
};

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Protocol features the VMM uses when the daemon offers them.
const WANTED_PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::BACKEND_REQ);
/// How long the first connection in client mode keeps retrying a missing daemon socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long server mode waits for the daemon to connect at startup.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Reconnect attempts after a daemon died, in client mode.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);
/// Queue indices the frontend accepts before the daemon told its queue count.
const MAX_QUEUES_BEFORE_MQ: u64 = 1024;
/// Longest the VM thread waits on a backend-request channel whose daemon stopped mid-message
/// (or does not read its acknowledgements).
const BACKEND_REQ_TIMEOUT: Duration = Duration::from_millis(500);

/// virtio-net feature bits that need the control queue, which vhost-user daemons do not
/// serve (the frontend would have to): CTRL_VQ, CTRL_RX, CTRL_VLAN, CTRL_RX_EXTRA,
/// GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR.
const NET_CTRL_FEATURES: u64 = 0x7F << 17;
/// virtio-net: the device has a MAC address in its config.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// virtio-blk: multiqueue; num_queues config field is valid.
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Offset of virtio_blk_config.num_queues.
const BLK_CONFIG_NUM_QUEUES: u64 = 34;
/// virtio-fs config: tag (36 bytes) then num_request_queues (le32).
const FS_TAG_LEN: usize = 36;
const FS_CONFIG_NUM_REQUEST_QUEUES: u64 = 36;

/// Errors of a vhost-user device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// Connecting to the daemon's socket failed for good.
    #[error("cannot connect to the vhost-user daemon at {0}: {1} (is the daemon running?)")]
    Connect(PathBuf, #[source] io::Error),
    /// Listening on the socket (server mode) failed.
    #[error("cannot listen on {0}: {1}")]
    Listen(PathBuf, #[source] io::Error),
    /// The daemon did not connect in time (server mode).
    #[error("no vhost-user daemon connected to {0} within {1:?} (start it with --client)")]
    AcceptTimeout(PathBuf, Duration),
    /// A vhost-user request failed.
    #[error("vhost-user request {0} to {1} failed: {2}")]
    Request(&'static str, PathBuf, #[source] vhost::Error),
    /// The daemon lacks something the device needs.
    #[error("vhost-user daemon at {0} is unusable: {1}")]
    Unsupported(PathBuf, String),
    /// Creating an eventfd/timerfd or registering with epoll failed.
    #[error("cannot set up event handling for {0}: {1}")]
    Events(PathBuf, #[source] io::Error),
    /// Guest memory lacks the file backing vhost-user needs.
    #[error("guest memory region at {0:#x} is not file-backed (memfd); vhost-user needs it")]
    MemoryNotShared(u64),
}

/// Tokens in the device manager's epoll: `device index * TOKENS_PER_DEVICE + kind`.
pub(crate) const TOKENS_PER_DEVICE: u64 = 4;
pub(crate) const TOKEN_SOCKET: u64 = 0;
pub(crate) const TOKEN_TIMER: u64 = 1;
pub(crate) const TOKEN_LISTENER: u64 = 2;
pub(crate) const TOKEN_BACKEND_REQ: u64 = 3;

/// Where a device registers its fds for the VM thread to watch.
pub(crate) struct EventRegistration {
    pub(crate) epoll: Arc<Epoll>,
    pub(crate) index: u64,
}

impl EventRegistration {
    fn token(&self, kind: u64) -> u64 {
        self.index * TOKENS_PER_DEVICE + kind
    }

    fn add(&self, fd: RawFd, kind: u64, events: EventSet) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, self.token(kind)),
        )
    }

    fn remove(&self, fd: RawFd) {
        // ENOENT when it was never added: nothing to undo.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// What the VMM does for requests a daemon sends on its backend-request channel: a config
/// change is noted for the VM thread (which raises the guest's config interrupt); everything
/// else (shared objects, shared memory maps) is answered with the trait's ENOSYS.
#[derive(Default)]
struct BackendRequests {
    config_changed: AtomicBool,
}

impl VhostUserFrontendReqHandler for BackendRequests {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.config_changed.store(true, Ordering::Release);
        Ok(0)
    }
}

/// The VMM's end of a daemon's backend-request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ).
struct BackendChannel {
    server: FrontendReqHandler<BackendRequests>,
    requests: Arc<BackendRequests>,
}

struct Connection {
    frontend: Frontend,
    protocol: VhostUserProtocolFeatures,
    /// Features the daemon offered.
    features: u64,
    /// Queues the daemon supports (GET_QUEUE_NUM), if it has MQ.
    queue_num: Option<u64>,
    /// Set up when the daemon has BACKEND_REQ; dropped when it misbehaves on it.
    backend_channel: Option<BackendChannel>,
}

impl Connection {
    fn has_protocol_features(&self) -> bool {
        self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }
}

/// What the guest driver started, kept to replay after a reconnect.
struct ActiveState {
    features: u64,
    queues: Vec<ActivatedQueue>,
}

/// A vhost-user device as the virtio transport's backend.
pub struct VhostUserDevice {
    kind: VhostUserDeviceKind,
    socket: PathBuf,
    listener: Option<UnixListener>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    conn: Option<Connection>,
    /// Features offered to the guest (fixed at creation: the guest may already rely on them).
    guest_features: u64,
    /// The part of `guest_features` the VMM implements itself rather than the daemon.
    vmm_features: u64,
    num_queues: usize,
    queue_size: u16,
    tag: Option<String>,
    mac: Option<[u8; 6]>,
    active: Option<ActiveState>,
    events: Option<EventRegistration>,
    retry_timer: TimerFd,
    /// Whether the current outage was already reported (one log line per outage).
    outage_reported: bool,
}

fn request_err(what: &'static str, path: &Path) -> impl FnOnce(vhost::Error) -> VhostUserError {
    let path = path.to_path_buf();
    move |e| VhostUserError::Request(what, path, e)
}

/// Whether a request error means the connection is gone (as opposed to a refusal).
fn is_connection_error(e: &VhostUserError) -> bool {
    use vhost::vhost_user::Error as E;
    match e {
        VhostUserError::Request(_, _, vhost::Error::VhostUserProtocol(e)) => matches!(
            e,
            E::SocketBroken(_)
                | E::SocketError(_)
                | E::SocketRetry(_)
                | E::Disconnected
                | E::PartialMessage
                | E::InvalidMessage
        ),
        VhostUserError::Request(_, _, vhost::Error::IOError(_)) => true,
        _ => false,
    }
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

fn device_type(kind: &VhostUserDeviceKind) -> u32 {
    match kind {
        VhostUserDeviceKind::Block => VIRTIO_ID_BLOCK,
        VhostUserDeviceKind::Net => VIRTIO_ID_NET,
        VhostUserDeviceKind::Fs => VIRTIO_ID_FS,
        VhostUserDeviceKind::Console => VIRTIO_ID_CONSOLE,
    }
}

/// Size of the device's config layout (virtio 1.3, section 5.x "Device configuration layout").
///
/// Reads beyond it are answered with zeros without asking the daemon: vhost 0.18's frontend
/// waits for a full payload even when the backend refuses a GET_CONFIG with a short reply, so a
/// request a daemon cannot serve would stall the vCPU doing the read.
fn config_size(kind: &VhostUserDeviceKind) -> u64 {
    match kind {
        // Up to and including the secure-erase fields.
        VhostUserDeviceKind::Block => 60,
        // mac, status, max_virtqueue_pairs, mtu, speed, duplex, rss fields.
        VhostUserDeviceKind::Net => 24,
        // tag[36], num_request_queues, notify_buf_size.
        VhostUserDeviceKind::Fs => 44,
        // cols, rows, max_nr_ports, emerg_wr.
        VhostUserDeviceKind::Console => 12,
    }
}

/// Queues a device has when the daemon cannot tell (no MQ protocol feature).
fn default_queues(kind: &VhostUserDeviceKind) -> u64 {
    match kind {
        VhostUserDeviceKind::Block => 1,
        // rx + tx; console: receiveq + transmitq of port 0; fs: hiprio + one request queue.
        VhostUserDeviceKind::Net | VhostUserDeviceKind::Console | VhostUserDeviceKind::Fs => 2,
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own with integer arguments; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Watch a connection's socket (hang-ups) and its backend-request channel (requests).
fn watch_connection(reg: &EventRegistration, conn: &Connection) -> io::Result<()> {
    reg.add(
        conn.frontend.as_raw_fd(),
        TOKEN_SOCKET,
        EventSet::IN | EventSet::READ_HANG_UP,
    )?;
    if let Some(channel) = &conn.backend_channel {
        reg.add(channel.server.as_raw_fd(), TOKEN_BACKEND_REQ, EventSet::IN)?;
    }
    Ok(())
}

fn unwatch_connection(reg: &EventRegistration, conn: &Connection) {
    reg.remove(conn.frontend.as_raw_fd());
    if let Some(channel) = &conn.backend_channel {
        reg.remove(channel.server.as_raw_fd());
    }
}

/// Whether the peer of a connected socket is gone, judged without consuming data.
fn peer_closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid one-byte buffer; MSG_PEEK leaves the socket's data in place.
    let n = unsafe {
        libc::recv(
            fd,
            &mut byte as *mut u8 as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => {
            // The daemon never speaks first on this channel; unsolicited data means the
            // protocol is out of step, which only a fresh connection fixes.
            log::warn!("unexpected data from vhost-user daemon; resetting the connection");
            true
        }
        _ => {
            let err = io::Error::last_os_error();
            !matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            )
        }
    }
}

/// Connect to a daemon socket, retrying for `timeout` while it does not exist yet.
fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream, VhostUserError> {
    let deadline = Instant::now() + timeout;
    let mut logged = false;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                if !logged {
                    log::info!("waiting for vhost-user daemon socket {}", path.display());
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(VhostUserError::Connect(path.to_path_buf(), e)),
        }
    }
}

fn listen(path: &Path) -> Result<UnixListener, VhostUserError> {
    // A socket file left by a previous run would make bind fail; only sockets are removed.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|e| VhostUserError::Listen(path.to_path_buf(), e))
}

fn accept_with_timeout(
    listener: &UnixListener,
    path: &Path,
    timeout: Duration,
) -> Result<UnixStream, VhostUserError> {
    log::info!(
        "waiting for a vhost-user daemon to connect to {}",
        path.display()
    );
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n <= 0 {
        return Err(VhostUserError::AcceptTimeout(path.to_path_buf(), timeout));
    }
    let (stream, _) = listener
        .accept()
        .map_err(|e| VhostUserError::Listen(path.to_path_buf(), e))?;
    stream
        .set_nonblocking(false)
        .map_err(|e| VhostUserError::Listen(path.to_path_buf(), e))?;
    Ok(stream)
}

/// SET_OWNER, feature and protocol-feature negotiation, queue count.
fn handshake(stream: UnixStream, path: &Path) -> Result<Connection, VhostUserError> {
    let mut frontend = Frontend::from_stream(stream, MAX_QUEUES_BEFORE_MQ);
    frontend
        .set_owner()
        .map_err(request_err("SET_OWNER", path))?;
    let features = frontend
        .get_features()
        .map_err(request_err("GET_FEATURES", path))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(request_err("GET_PROTOCOL_FEATURES", path))?;
        protocol = offered & WANTED_PROTOCOL_FEATURES;
        frontend
            .set_protocol_features(protocol)
            .map_err(request_err("SET_PROTOCOL_FEATURES", path))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request without a natural reply gets acked: errors surface per request.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    let queue_num = if protocol.contains(VhostUserProtocolFeatures::MQ) {
        Some(
            frontend
                .get_queue_num()
                .map_err(request_err("GET_QUEUE_NUM", path))?,
        )
    } else {
        None
    };
    let backend_channel = if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        open_backend_channel(&mut frontend, protocol, path)?
    } else {
        None
    };
    Ok(Connection {
        frontend,
        protocol,
        features,
        queue_num,
        backend_channel,
    })
}

/// Create the backend-request channel (a socket pair) and hand the daemon its end with
/// SET_BACKEND_REQ_FD. A daemon that refuses it still works, without config-change
/// notifications; a lost connection is an error like any other request's.
fn open_backend_channel(
    frontend: &mut Frontend,
    protocol: VhostUserProtocolFeatures,
    path: &Path,
) -> Result<Option<BackendChannel>, VhostUserError> {
    let requests = Arc::new(BackendRequests::default());
    let mut server = FrontendReqHandler::new(requests.clone())
        .map_err(|e| VhostUserError::Events(path.to_path_buf(), io::Error::other(e)))?;
    server.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
    set_socket_timeouts(server.as_raw_fd(), BACKEND_REQ_TIMEOUT)
        .map_err(|e| VhostUserError::Events(path.to_path_buf(), e))?;
    match frontend
        .set_backend_request_fd(&server.get_tx_raw_fd())
        .map_err(request_err("SET_BACKEND_REQ_FD", path))
    {
        Ok(()) => Ok(Some(BackendChannel { server, requests })),
        Err(e) if is_connection_error(&e) => Err(e),
        Err(e) => {
            log::warn!("{e}; the guest will not be told of config changes");
            Ok(None)
        }
    }
}

/// Bound blocking reads and writes on a socket (SO_RCVTIMEO, SO_SNDTIMEO).
fn set_socket_timeouts(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads one timeval from the local `tv`, whose size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl VhostUserDevice {
    /// Connect to (or, with `server`, wait for) the daemon and negotiate. Blocks until the
    /// daemon answers or the startup timeout passes.
    pub fn new(
        cfg: &VhostUserDeviceConfig,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<Self, VhostUserError> {
        let path = cfg.socket.clone();
        let (listener, stream) = if cfg.server {
            let listener = listen(&path)?;
            let stream = accept_with_timeout(&listener, &path, ACCEPT_TIMEOUT)?;
            (Some(listener), stream)
        } else {
            (None, connect_with_retry(&path, CONNECT_TIMEOUT)?)
        };
        let conn = handshake(stream, &path)?;

        if conn.features & (1 << crate::virtio::VIRTIO_F_VERSION_1) == 0 {
            return Err(VhostUserError::Unsupported(
                path,
                "it does not offer VIRTIO_F_VERSION_1".into(),
            ));
        }
        let mac = match &cfg.mac {
            Some(s) => Some(parse_mac(s).ok_or_else(|| {
                VhostUserError::Unsupported(path.clone(), format!("invalid MAC address {s:?}"))
            })?),
            None => None,
        };
        let mut guest_features = conn.features & (DEVICE_FEATURES_MASK | TRANSPORT_FEATURES);
        let mut vmm_features = 0;
        let backend_queues = conn.queue_num.unwrap_or(default_queues(&cfg.kind)) as usize;
        let num_queues = match cfg.kind {
            VhostUserDeviceKind::Net => {
                guest_features &= !NET_CTRL_FEATURES;
                if mac.is_some() && guest_features & VIRTIO_NET_F_MAC == 0 {
                    guest_features |= VIRTIO_NET_F_MAC;
                    vmm_features |= VIRTIO_NET_F_MAC;
                }
                2
            }
            _ => cfg
                .num_queues
                .unwrap_or(backend_queues)
                .min(backend_queues)
                .max(1),
        };
        if num_queues > backend_queues {
            return Err(VhostUserError::Unsupported(
                path,
                format!("it serves {backend_queues} queues, the device needs {num_queues}"),
            ));
        }
        if cfg.kind == VhostUserDeviceKind::Fs
            && cfg.tag.is_none()
            && !conn.protocol.contains(VhostUserProtocolFeatures::CONFIG)
        {
            return Err(VhostUserError::Unsupported(
                path,
                "it has no CONFIG protocol feature, so the fs device needs tag=".into(),
            ));
        }
        if let Some(tag) = &cfg.tag {
            if tag.is_empty() || tag.len() > FS_TAG_LEN {
                return Err(VhostUserError::Unsupported(
                    path,
                    format!("fs tag {tag:?} must be 1..={FS_TAG_LEN} bytes"),
                ));
            }
        }
        for region in mem.memory().iter() {
            if region.file_offset().is_none() {
                return Err(VhostUserError::MemoryNotShared(
                    region.start_addr().raw_value(),
                ));
            }
        }
        let retry_timer = TimerFd::new().map_err(|e| {
            VhostUserError::Events(path.clone(), io::Error::from_raw_os_error(e.errno()))
        })?;
        set_nonblocking(retry_timer.as_raw_fd())
            .map_err(|e| VhostUserError::Events(path.clone(), e))?;
        if let Some(l) = &listener {
            l.set_nonblocking(true)
                .map_err(|e| VhostUserError::Listen(path.clone(), e))?;
        }
        log::info!(
            "vhost-user {:?} at {}: features {:#x}, protocol {:#x}, {} queues of up to {}",
            cfg.kind,
            path.display(),
            guest_features,
            conn.protocol.bits(),
            num_queues,
            cfg.queue_size
        );
        Ok(VhostUserDevice {
            kind: cfg.kind.clone(),
            socket: path,
            listener,
            mem,
            conn: Some(conn),
            guest_features,
            vmm_features,
            num_queues,
            queue_size: cfg.queue_size,
            tag: cfg.tag.clone(),
            mac,
            active: None,
            events: None,
            retry_timer,
            outage_reported: false,
        })
    }

    /// The daemon socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether a daemon is connected right now.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Start watching the connection from the VM thread's event loop.
    pub(crate) fn register_events(&mut self, reg: EventRegistration) -> Result<(), VhostUserError> {
        let err = |e| VhostUserError::Events(self.socket.clone(), e);
        reg.add(self.retry_timer.as_raw_fd(), TOKEN_TIMER, EventSet::IN)
            .map_err(err)?;
        if let Some(conn) = &self.conn {
            watch_connection(&reg, conn)
                .map_err(|e| VhostUserError::Events(self.socket.clone(), e))?;
        }
        self.events = Some(reg);
        Ok(())
    }

    /// Dispatch an event of kind `TOKEN_*` from the VM thread. Returns whether the daemon
    /// reported a change of the device's config space, which the caller passes on to the
    /// guest (a config-change interrupt).
    pub(crate) fn handle_event(&mut self, kind: u64) -> bool {
        match kind {
            TOKEN_BACKEND_REQ => return self.serve_backend_request(),
            TOKEN_SOCKET => {
                let dead = self
                    .conn
                    .as_ref()
                    .is_some_and(|c| peer_closed(c.frontend.as_raw_fd()));
                if dead {
                    self.disconnect("the daemon closed the connection");
                }
            }
            TOKEN_TIMER => {
                // Drain the expiration count; EAGAIN when a reset raced with the event.
                let _ = self.retry_timer.wait();
                if self.conn.is_none() && self.listener.is_none() {
                    match UnixStream::connect(&self.socket) {
                        Ok(stream) => self.reconnect(stream),
                        Err(e) => log::debug!("reconnect to {}: {e}", self.socket.display()),
                    }
                }
            }
            TOKEN_LISTENER => {
                let accepted = self.listener.as_ref().map(|l| l.accept());
                match accepted {
                    Some(Ok((stream, _))) if self.conn.is_none() => {
                        if let Err(e) = stream.set_nonblocking(false) {
                            log::warn!("{}: {e}", self.socket.display());
                            return false;
                        }
                        self.reconnect(stream)
                    }
                    // A second daemon while one is connected is turned away.
                    Some(Ok(_)) => {}
                    Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Some(Err(e)) => log::warn!("accept on {}: {e}", self.socket.display()),
                    None => {}
                }
            }
            _ => {}
        }
        false
    }

    /// One request from the daemon on its backend-request channel (answered, with REPLY_ACK,
    /// before this returns). A channel that breaks (closed, cut mid-message, silent past
    /// [`BACKEND_REQ_TIMEOUT`]) is dropped; the device itself keeps working.
    fn serve_backend_request(&mut self) -> bool {
        use vhost::vhost_user::Error as E;
        let Some(channel) = self.conn.as_mut().and_then(|c| c.backend_channel.as_mut()) else {
            return false;
        };
        match channel.server.handle_request() {
            Ok(_) => {}
            // Refused requests (not a config change) got their error reply; the stream is
            // still in step.
            Err(E::ReqHandlerError(e)) => {
                log::debug!("{}: backend request refused: {e}", self.socket.display());
            }
            Err(E::InvalidMessage) => {
                log::warn!(
                    "vhost-user daemon at {}: invalid backend request",
                    self.socket.display()
                );
            }
            Err(e) => {
                log::warn!(
                    "vhost-user daemon at {}: backend request channel closed ({e}); config changes will not reach the guest",
                    self.socket.display()
                );
                if let Some(channel) = self.conn.as_mut().and_then(|c| c.backend_channel.take()) {
                    if let Some(reg) = &self.events {
                        reg.remove(channel.server.as_raw_fd());
                    }
                }
                return false;
            }
        }
        channel
            .requests
            .config_changed
            .swap(false, Ordering::AcqRel)
    }

    /// Drop the connection and start trying to get a new one.
    fn disconnect(&mut self, why: &str) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if let Some(reg) = &self.events {
            unwatch_connection(reg, &conn);
        }
        drop(conn);
        if !self.outage_reported {
            log::warn!(
                "vhost-user {:?} daemon at {}: {why}; the device is paused until it is back",
                self.kind,
                self.socket.display()
            );
            self.outage_reported = true;
        }
        self.wait_for_daemon();
    }

    fn wait_for_daemon(&mut self) {
        let result = match (&self.listener, &self.events) {
            (Some(l), Some(reg)) => reg
                .add(l.as_raw_fd(), TOKEN_LISTENER, EventSet::IN)
                .or_else(|e| {
                    if e.raw_os_error() == Some(libc::EEXIST) {
                        Ok(())
                    } else {
                        Err(e)
                    }
                }),
            (None, Some(_)) => self
                .retry_timer
                .reset(RECONNECT_INTERVAL, Some(RECONNECT_INTERVAL))
                .map_err(|e| io::Error::from_raw_os_error(e.errno())),
            // Not yet wired to an event loop (startup or tests): nothing to arm.
            (_, None) => Ok(()),
        };
        if let Err(e) = result {
            log::error!(
                "cannot wait for the daemon at {} to come back: {e}",
                self.socket.display()
            );
        }
    }

    /// A new connection to a restarted daemon: renegotiate and replay the running state.
    fn reconnect(&mut self, stream: UnixStream) {
        let conn = match handshake(stream, &self.socket) {
            Ok(c) => c,
            Err(e) => {
                log::debug!("reconnect handshake: {e}");
                return;
            }
        };
        let missing = self.guest_features & !self.vmm_features & !conn.features;
        if missing != 0 {
            log::error!(
                "vhost-user daemon at {} came back without features {missing:#x} the guest may use; still waiting",
                self.socket.display()
            );
            return;
        }
        self.conn = Some(conn);
        if let Some(active) = self.active.take() {
            let result = self.start_rings(&active, true);
            self.active = Some(active);
            if let Err(e) = result {
                log::error!("replaying queue state to {}: {e}", self.socket.display());
                self.disconnect("replay failed");
                return;
            }
        }
        let Some(conn) = &self.conn else { return };
        if let Some(reg) = &self.events {
            if let Err(e) = watch_connection(reg, conn) {
                log::error!("cannot watch {}: {e}", self.socket.display());
            }
            if let Some(l) = &self.listener {
                reg.remove(l.as_raw_fd());
            }
        }
        if let Err(e) = self.retry_timer.clear() {
            log::warn!("cannot stop the reconnect timer: {e}");
        }
        self.outage_reported = false;
        log::info!(
            "vhost-user {:?} daemon at {} reconnected",
            self.kind,
            self.socket.display()
        );
    }

    fn host_address(&self, gpa: u64) -> Option<u64> {
        self.mem
            .memory()
            .get_host_address(GuestAddress(gpa))
            .ok()
            .map(|p| p as u64)
    }

    /// The used ring's idx as the guest sees it: where a restarted daemon must resume.
    fn used_index(&self, used_ring: u64) -> u16 {
        self.mem
            .memory()
            .read_obj::<u16>(GuestAddress(used_ring).unchecked_add(2))
            .unwrap_or(0)
    }

    fn mem_table(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, VhostUserError> {
        let mem = self.mem.memory();
        mem.iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| VhostUserError::MemoryNotShared(r.start_addr().raw_value()))
            })
            .collect()
    }

    /// Give the daemon a RAM region hot-plugged into the guest (already in `self.mem`), before
    /// the guest is told about it: ADD_MEM_REG, or the whole table again for a daemon without
    /// CONFIGURE_MEM_SLOTS. A daemon that has no table yet (rings not started) or is away gets
    /// the whole table, region included, when its rings start.
    pub fn add_memory_region(
        &mut self,
        region: &vm_memory::GuestRegionMmap<()>,
    ) -> Result<(), VhostUserError> {
        if self.active.is_none() {
            return Ok(());
        }
        let table = self.mem_table()?;
        let path = self.socket.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let result = if conn
            .protocol
            .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
        {
            let info = VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| VhostUserError::MemoryNotShared(region.start_addr().raw_value()))?;
            conn.frontend
                .add_mem_region(&info)
                .map(|_| ())
                .map_err(request_err("ADD_MEM_REG", &path))
        } else {
            conn.frontend
                .set_mem_table(&table)
                .map(|_| ())
                .map_err(request_err("SET_MEM_TABLE", &path))
        };
        if let Err(e) = &result {
            if is_connection_error(e) {
                // The reconnect sends the whole table.
                self.disconnect("lost while adding guest memory");
                return Ok(());
            }
        }
        result
    }

    /// Send features, memory table and every queue of `active`, then enable the queues.
    /// After a reconnect (`kick`) each queue is kicked so the daemon looks at work the guest
    /// queued while it was away, and the guest is interrupted once per queue.
    fn start_rings(&mut self, active: &ActiveState, kick: bool) -> Result<(), VhostUserError> {
        let regions = self.mem_table()?;
        let mut addrs = Vec::with_capacity(active.queues.len());
        for q in &active.queues {
            let c = &q.config;
            let (Some(desc), Some(avail), Some(used)) = (
                self.host_address(c.desc_table),
                self.host_address(c.avail_ring),
                self.host_address(c.used_ring),
            ) else {
                return Err(VhostUserError::Unsupported(
                    self.socket.clone(),
                    format!("queue {} rings are outside guest RAM", c.index),
                ));
            };
            addrs.push((desc, avail, used, self.used_index(c.used_ring)));
        }
        let path = self.socket.clone();
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let protocol_bit = conn.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        // Features the VMM implements itself (the net MAC) are not the daemon's to see.
        let daemon_features = active.features & conn.features;
        let fe = &mut conn.frontend;
        fe.set_features(daemon_features | protocol_bit)
            .map_err(request_err("SET_FEATURES", &path))?;
        fe.set_mem_table(&regions)
            .map_err(request_err("SET_MEM_TABLE", &path))?;
        for (q, (desc, avail, used, base)) in active.queues.iter().zip(addrs) {
            let i = q.config.index;
            fe.set_vring_num(i, q.config.size)
                .map_err(request_err("SET_VRING_NUM", &path))?;
            fe.set_vring_base(i, base)
                .map_err(request_err("SET_VRING_BASE", &path))?;
            let ring = VringConfigData {
                queue_max_size: self.queue_size,
                queue_size: q.config.size,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            };
            fe.set_vring_addr(i, &ring)
                .map_err(request_err("SET_VRING_ADDR", &path))?;
            fe.set_vring_call(i, &q.call)
                .map_err(request_err("SET_VRING_CALL", &path))?;
            fe.set_vring_kick(i, &q.kick)
                .map_err(request_err("SET_VRING_KICK", &path))?;
        }
        if protocol_bit != 0 {
            for q in &active.queues {
                fe.set_vring_enable(q.config.index, true)
                    .map_err(request_err("SET_VRING_ENABLE", &path))?;
            }
        }
        if kick {
            for q in &active.queues {
                if let Err(e) = q.kick.write(1) {
                    log::warn!("cannot kick queue {}: {e}", q.config.index);
                }
                // The old daemon may have published completions in the used ring and died
                // before signalling them; the driver would wait for them forever. A spurious
                // interrupt only makes it look.
                if let Err(e) = q.call.write(1) {
                    log::warn!(
                        "cannot interrupt the guest for queue {}: {e}",
                        q.config.index
                    );
                }
            }
        }
        Ok(())
    }

    /// Stop the daemon's rings (GET_VRING_BASE) and forget the running state.
    fn stop_rings(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        let path = self.socket.clone();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let enable_known = conn.has_protocol_features();
        let mut result = Ok(());
        for q in &active.queues {
            let i = q.config.index;
            if enable_known {
                result = conn
                    .frontend
                    .set_vring_enable(i, false)
                    .map_err(request_err("SET_VRING_ENABLE", &path));
                if result.is_err() {
                    break;
                }
            }
            result = conn
                .frontend
                .get_vring_base(i)
                .map(|_| ())
                .map_err(request_err("GET_VRING_BASE", &path));
            if result.is_err() {
                break;
            }
        }
        if let Err(e) = result {
            self.handle_request_error(e);
        }
    }

    fn handle_request_error(&mut self, e: VhostUserError) {
        if is_connection_error(&e) {
            self.disconnect(&e.to_string());
        } else {
            log::warn!("{e}");
        }
    }

    /// Stop the rings and close the connection for good (VMM shutdown).
    pub fn shutdown(&mut self) {
        self.stop_rings();
        // The listening socket goes first: a daemon in --client mode reconnects as soon as
        // its connection closes, and would otherwise get in just before the end.
        if let Some(l) = self.listener.take() {
            if let Some(reg) = &self.events {
                reg.remove(l.as_raw_fd());
            }
            let _ = std::fs::remove_file(&self.socket);
            drop(l);
        }
        if let Some(conn) = self.conn.take() {
            if let Some(reg) = &self.events {
                unwatch_connection(reg, &conn);
            }
        }
        let _ = self.retry_timer.clear();
    }

    /// Config bytes the VMM itself supplies, overlaid on the daemon's: (offset, bytes).
    fn config_overlay(&self) -> Vec<(u64, Vec<u8>)> {
        let has_config = self
            .conn
            .as_ref()
            .is_some_and(|c| c.protocol.contains(VhostUserProtocolFeatures::CONFIG));
        let mut overlay = Vec::new();
        match self.kind {
            VhostUserDeviceKind::Net => {
                if let Some(mac) = self.mac {
                    overlay.push((0, mac.to_vec()));
                }
            }
            VhostUserDeviceKind::Fs if !has_config => {
                if let Some(tag) = &self.tag {
                    let mut bytes = vec![0u8; FS_TAG_LEN];
                    bytes[..tag.len()].copy_from_slice(tag.as_bytes());
                    overlay.push((0, bytes));
                }
                let request_queues = (self.num_queues.saturating_sub(1)) as u32;
                overlay.push((
                    FS_CONFIG_NUM_REQUEST_QUEUES,
                    request_queues.to_le_bytes().to_vec(),
                ));
            }
            _ => {}
        }
        overlay
    }

    /// Clamp queue counts the daemon reports in config to what the transport exposes.
    fn clamp_queue_counts(&self, offset: u64, data: &mut [u8]) {
        let (field, width, limit) = match self.kind {
            VhostUserDeviceKind::Block if self.guest_features & VIRTIO_BLK_F_MQ != 0 => {
                (BLK_CONFIG_NUM_QUEUES, 2, self.num_queues as u64)
            }
            VhostUserDeviceKind::Fs => (
                FS_CONFIG_NUM_REQUEST_QUEUES,
                4,
                self.num_queues.saturating_sub(1) as u64,
            ),
            _ => return,
        };
        // Only whole-field reads are clamped; Linux reads these fields at their width.
        if offset != field || data.len() != width {
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..width].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        if value > limit {
            data.copy_from_slice(&limit.to_le_bytes()[..width]);
        }
    }
}

impl VirtioBackend for VhostUserDevice {
    fn device_type(&self) -> u32 {
        device_type(&self.kind)
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.guest_features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let path = self.socket.clone();
        let limit = config_size(&self.kind);
        let fetched = match self.conn.as_mut() {
            Some(c) if c.protocol.contains(VhostUserProtocolFeatures::CONFIG) => {
                let len = (data.len() as u64).min(limit.saturating_sub(offset));
                match (u32::try_from(offset), u32::try_from(len)) {
                    (Ok(off), Ok(len)) if len > 0 => {
                        let zeros = vec![0u8; len as usize];
                        c.frontend
                            .get_config(off, len, VhostUserConfigFlags::empty(), &zeros)
                            .map(|(_, payload)| payload)
                            .map_err(request_err("GET_CONFIG", &path))
                    }
                    _ => Ok(Vec::new()),
                }
            }
            _ => Ok(Vec::new()),
        };
        match fetched {
            Ok(bytes) => {
                let n = bytes.len().min(data.len());
                data[..n].copy_from_slice(&bytes[..n]);
            }
            Err(e) => {
                // A read beyond the daemon's config is refused with an error reply: zeros.
                log::debug!("{e}");
                if is_connection_error(&e) {
                    self.handle_request_error(e);
                }
            }
        }
        for (start, bytes) in self.config_overlay() {
            for (i, b) in bytes.iter().enumerate() {
                let pos = start + i as u64;
                if let Some(d) = pos
                    .checked_sub(offset)
                    .and_then(|rel| data.get_mut(rel as usize))
                {
                    *d = *b;
                }
            }
        }
        self.clamp_queue_counts(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let path = self.socket.clone();
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if !c.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return;
        }
        let Ok(off) = u32::try_from(offset) else {
            return;
        };
        if let Err(e) = c
            .frontend
            .set_config(off, VhostUserConfigFlags::WRITABLE, data)
            .map_err(request_err("SET_CONFIG", &path))
        {
            self.handle_request_error(e);
        }
    }

    fn activate(
        &mut self,
        features: u64,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let active = ActiveState { features, queues };
        if self.conn.is_none() {
            // Replayed when the daemon is back.
            self.active = Some(active);
            return Ok(());
        }
        let result = self.start_rings(&active, false);
        self.active = Some(active);
        match result {
            Ok(()) => Ok(()),
            Err(e) if is_connection_error(&e) => {
                self.handle_request_error(e);
                Ok(())
            }
            Err(e) => {
                self.active = None;
                Err(ActivateError::Backend(e.to_string()))
            }
        }
    }

    fn set_queue_call(&mut self, index: usize, call: EventFd) {
        let path = self.socket.clone();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.iter_mut().find(|q| q.config.index == index) else {
            return;
        };
        q.call = call;
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = c
            .frontend
            .set_vring_call(index, &q.call)
            .map_err(request_err("SET_VRING_CALL", &path))
        {
            self.handle_request_error(e);
        }
    }

    fn reset(&mut self) {
        self.stop_rings();
    }
}

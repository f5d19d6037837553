//! Frontend tests against a mock vhost-user daemon (vhost crate's backend request handler on
//! a thread) that records every request, plus a whole-stack test driving PCI/virtio registers
//! the way Linux does.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::*;
use vhost::vhost_user::{
    Backend, BackendReqHandler, GpuBackend, VhostUserBackendReqHandlerMut,
    VhostUserFrontendReqHandler, VhostUserProtocolFeatures,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{
    ByteValued, Bytes, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic,
};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{EventRegistration, TOKENS_PER_DEVICE};
use super::*;
use crate::config::{VhostUserDeviceConfig, VhostUserDeviceKind};
use crate::interrupt::tests::RecordingVm;
use crate::virtio::{ActivatedQueue, QueueConfig, VirtioBackend};

type Result<T> = vhost::vhost_user::Result<T>;

const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const VERSION_1: u64 = 1 << 32;
const ACCESS_PLATFORM: u64 = 1 << 33;
const RING_PACKED: u64 = 1 << 34;
const BLK_F_MQ: u64 = 1 << 12;
const BLK_F_FLUSH: u64 = 1 << 9;
const CONSOLE_F_SIZE: u64 = 1 << 0;

/// A request the mock daemon received.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Req {
    SetOwner,
    SetFeatures(u64),
    SetProtocolFeatures(u64),
    SetMemTable(usize),
    VringNum(u32, u32),
    VringBase(u32, u32),
    VringAddr(u32),
    VringCall(u8),
    VringKick(u8),
    VringEnable(u32, bool),
    GetVringBase(u32),
    SetConfig(u32, Vec<u8>),
    /// ADD_MEM_REG: guest address and size.
    AddMemReg(u64, u64),
    SetBackendReqFd,
}

struct MockState {
    features: u64,
    protocol: VhostUserProtocolFeatures,
    queue_num: u64,
    config: Vec<u8>,
    requests: Vec<Req>,
    kicks: Vec<File>,
    /// Serve each connection through the daemons' relay (common::relay), which hands over the
    /// backend-request channel as `channels`.
    relayed: bool,
    /// Backend-request channels, one per connection that set one up, newest last.
    channels: Vec<common::BackendChannel>,
    /// vhost's own proxy on the newest backend-request channel.
    backend: Option<Backend>,
}

struct MockDaemon(Arc<Mutex<MockState>>);

impl MockDaemon {
    fn log(&self, r: Req) {
        self.0.lock().unwrap().requests.push(r);
    }
}

impl VhostUserBackendReqHandlerMut for MockDaemon {
    fn set_owner(&mut self) -> Result<()> {
        self.log(Req::SetOwner);
        Ok(())
    }
    fn reset_owner(&mut self) -> Result<()> {
        Ok(())
    }
    fn reset_device(&mut self) -> Result<()> {
        Ok(())
    }
    fn get_features(&mut self) -> Result<u64> {
        Ok(self.0.lock().unwrap().features)
    }
    fn set_features(&mut self, features: u64) -> Result<()> {
        self.log(Req::SetFeatures(features));
        Ok(())
    }
    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        _files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        self.log(Req::SetMemTable(ctx.len()));
        Ok(None)
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        self.log(Req::VringNum(index, num));
        Ok(())
    }
    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        _descriptor: u64,
        _used: u64,
        _available: u64,
        _log: u64,
    ) -> Result<()> {
        self.log(Req::VringAddr(index));
        Ok(())
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.log(Req::VringBase(index, base));
        Ok(())
    }
    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        self.log(Req::GetVringBase(index));
        Ok(VhostUserVringState::new(index, 0))
    }
    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> Result<()> {
        self.log(Req::VringKick(index));
        if let Some(f) = fd {
            self.0.lock().unwrap().kicks.push(f);
        }
        Ok(())
    }
    fn set_vring_call(&mut self, index: u8, _fd: Option<File>) -> Result<()> {
        self.log(Req::VringCall(index));
        Ok(())
    }
    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> Result<()> {
        Ok(())
    }
    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.0.lock().unwrap().protocol)
    }
    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.log(Req::SetProtocolFeatures(features));
        Ok(())
    }
    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.0.lock().unwrap().queue_num)
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        self.log(Req::VringEnable(index, enable));
        Ok(())
    }
    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>> {
        let state = self.0.lock().unwrap();
        let (o, s) = (offset as usize, size as usize);
        state
            .config
            .get(o..o + s)
            .map(<[u8]>::to_vec)
            .ok_or(vhost::vhost_user::Error::InvalidParam)
    }
    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> Result<()> {
        self.log(Req::SetConfig(offset, buf.to_vec()));
        Ok(())
    }
    fn set_backend_req_fd(&mut self, backend: Backend) {
        self.log(Req::SetBackendReqFd);
        self.0.lock().unwrap().backend = Some(backend);
    }
    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> Result<()> {
        Ok(())
    }
    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(vhost::vhost_user::Error::InvalidOperation("unsupported"))
    }
    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> Result<(VhostUserInflight, File)> {
        Err(vhost::vhost_user::Error::InvalidOperation("unsupported"))
    }
    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> Result<()> {
        Ok(())
    }
    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(32)
    }
    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        self.log(Req::AddMemReg(region.guest_phys_addr, region.memory_size));
        Ok(None)
    }
    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> Result<()> {
        Ok(())
    }
    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> Result<Option<File>> {
        Err(vhost::vhost_user::Error::InvalidOperation("unsupported"))
    }
    fn check_device_state(&mut self) -> Result<()> {
        Ok(())
    }
    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(vhost::vhost_user::Error::InvalidOperation("unsupported"))
    }
    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> Result<()> {
        Ok(())
    }
}

fn block_daemon_state() -> Arc<Mutex<MockState>> {
    // virtio_blk_config: capacity 0x800 sectors, num_queues (offset 34) = 4.
    let mut config = vec![0u8; 60];
    config[0..8].copy_from_slice(&0x800u64.to_le_bytes());
    config[34..36].copy_from_slice(&4u16.to_le_bytes());
    Arc::new(Mutex::new(MockState {
        features: VERSION_1
            | PROTOCOL_FEATURES_BIT
            | BLK_F_MQ
            | BLK_F_FLUSH
            | ACCESS_PLATFORM
            | RING_PACKED,
        protocol: VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD,
        queue_num: 4,
        config,
        requests: Vec::new(),
        kicks: Vec::new(),
        relayed: false,
        channels: Vec::new(),
        backend: None,
    }))
}

/// A console daemon (single port, 80x25) with a backend-request channel, served through the
/// daemons' relay as vhost-user-console is.
fn console_daemon_state() -> Arc<Mutex<MockState>> {
    let state = block_daemon_state();
    {
        let mut s = state.lock().unwrap();
        s.features = VERSION_1 | PROTOCOL_FEATURES_BIT | CONSOLE_F_SIZE;
        s.protocol = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ;
        s.queue_num = 2;
        s.config = console_config(80, 25);
        s.relayed = true;
    }
    state
}

/// virtio_console_config: cols, rows, max_nr_ports (1), emerg_wr.
fn console_config(cols: u16, rows: u16) -> Vec<u8> {
    let mut config = vec![0u8; 12];
    config[0..2].copy_from_slice(&cols.to_le_bytes());
    config[2..4].copy_from_slice(&rows.to_le_bytes());
    config[4..8].copy_from_slice(&1u32.to_le_bytes());
    config
}

/// Serve one connection on `stream` until it closes.
fn serve(stream: UnixStream, state: Arc<Mutex<MockState>>) {
    if state.lock().unwrap().relayed {
        let (relay_end, daemon_end) = UnixStream::pair().unwrap();
        let daemon_state = state.clone();
        let daemon = std::thread::spawn(move || serve_directly(daemon_end, daemon_state));
        let _ = common::relay::run(
            stream,
            relay_end,
            |channel| state.lock().unwrap().channels.push(channel),
            |_, _| {},
        );
        daemon.join().unwrap();
        return;
    }
    serve_directly(stream, state)
}

fn serve_directly(stream: UnixStream, state: Arc<Mutex<MockState>>) {
    let mut handler =
        BackendReqHandler::from_stream(stream, Arc::new(Mutex::new(MockDaemon(state))));
    while handler.handle_request().is_ok() {}
}

/// A daemon that listens on `path` and serves connections one after another; each accepted
/// stream's clone is sent on the channel so the test can cut it (a daemon "crash").
fn spawn_listening_daemon(path: &Path, state: Arc<Mutex<MockState>>) -> mpsc::Receiver<UnixStream> {
    let listener = UnixListener::bind(path).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            if tx.send(stream.try_clone().unwrap()).is_err() {
                return;
            }
            serve(stream, state.clone());
        }
    });
    rx
}

fn memfd_memory(size: usize) -> GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vmm-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh memfd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    GuestMemoryAtomic::new(mem)
}

fn block_config(path: &Path) -> VhostUserDeviceConfig {
    VhostUserDeviceConfig {
        kind: VhostUserDeviceKind::Block,
        socket: path.to_path_buf(),
        server: false,
        num_queues: Some(2),
        queue_size: 256,
        tag: None,
        mac: None,
    }
}

fn requests(state: &Arc<Mutex<MockState>>) -> Vec<Req> {
    state.lock().unwrap().requests.clone()
}

/// Wait (bounded, so a bug fails instead of hanging) until `cond` holds, serving device events.
fn serve_events_until(
    epoll: &Epoll,
    device: &mut VhostUserDevice,
    mut cond: impl FnMut(&VhostUserDevice) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond(device) {
        assert!(
            Instant::now() < deadline,
            "device never reached the expected state"
        );
        let mut events = [EpollEvent::default(); 4];
        let n = epoll.wait(200, &mut events).unwrap();
        for e in &events[..n] {
            device.handle_event(e.data() % TOKENS_PER_DEVICE);
        }
    }
}

fn queue(index: usize, mem_base: u64) -> ActivatedQueue {
    ActivatedQueue {
        config: QueueConfig {
            index,
            size: 128,
            desc_table: mem_base,
            avail_ring: mem_base + 0x1000,
            used_ring: mem_base + 0x2000,
        },
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("daemon.sock")
}

/// A mock block daemon listening on a fresh socket, and 1 MiB of memfd guest memory.
struct BlockFixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    state: Arc<Mutex<MockState>>,
    streams: mpsc::Receiver<UnixStream>,
    mem: GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
}

impl BlockFixture {
    /// Starts the daemon after `configure` has adjusted its state.
    fn new(configure: impl FnOnce(&mut MockState)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(&dir);
        let state = block_daemon_state();
        configure(&mut state.lock().unwrap());
        let streams = spawn_listening_daemon(&path, state.clone());
        let mem = memfd_memory(1 << 20);
        BlockFixture {
            _dir: dir,
            path,
            state,
            streams,
            mem,
        }
    }

    /// Connects a frontend to the daemon (client mode).
    fn device(&self) -> VhostUserDevice {
        VhostUserDevice::new(&block_config(&self.path), self.mem.clone()).unwrap()
    }
}

#[test]
fn negotiation_filters_features_and_clamps_queues() {
    let fx = BlockFixture::new(|_| {});
    let state = fx.state.clone();
    let mut dev = fx.device();

    // Transport features the VMM cannot honour are withheld; PROTOCOL_FEATURES is vhost-user's.
    assert_eq!(dev.features(), VERSION_1 | BLK_F_MQ | BLK_F_FLUSH);
    assert_eq!(dev.num_queues(), 2);
    assert_eq!(dev.max_queue_size(), 256);
    assert_eq!(dev.device_type(), 2);
    // LOG_SHMFD is not asked for (yet); the rest is.
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    assert!(requests(&state).contains(&Req::SetProtocolFeatures(wanted.bits())));
    // A daemon without BACKEND_REQ gets no backend-request channel.
    assert!(!requests(&state).contains(&Req::SetBackendReqFd));

    // Config comes from the daemon; num_queues is clamped to the queues the guest can use.
    let mut capacity = [0u8; 8];
    dev.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 0x800);
    let mut nq = [0u8; 2];
    dev.read_config(34, &mut nq);
    assert_eq!(u16::from_le_bytes(nq), 2);
    // Beyond the device type's config layout: zeros, without a request the daemon cannot serve.
    let mut far = [0xAAu8; 4];
    dev.read_config(0x800, &mut far);
    assert_eq!(far, [0; 4]);
    assert!(dev.is_connected());
    dev.write_config(32, &[1]);
    assert!(requests(&state).contains(&Req::SetConfig(32, vec![1])));
}

#[test]
fn activation_sends_rings_and_reset_stops_them() {
    let fx = BlockFixture::new(|_| {});
    let state = fx.state.clone();
    let mut dev = fx.device();
    state.lock().unwrap().requests.clear();

    dev.activate(
        VERSION_1 | BLK_F_FLUSH,
        vec![queue(0, 0x10000), queue(1, 0x20000)],
    )
    .unwrap();
    let reqs = requests(&state);
    assert_eq!(
        reqs,
        vec![
            Req::SetFeatures(VERSION_1 | BLK_F_FLUSH | PROTOCOL_FEATURES_BIT),
            Req::SetMemTable(1),
            Req::VringNum(0, 128),
            Req::VringBase(0, 0),
            Req::VringAddr(0),
            Req::VringCall(0),
            Req::VringKick(0),
            Req::VringNum(1, 128),
            Req::VringBase(1, 0),
            Req::VringAddr(1),
            Req::VringCall(1),
            Req::VringKick(1),
            Req::VringEnable(0, true),
            Req::VringEnable(1, true),
        ]
    );
    state.lock().unwrap().requests.clear();
    dev.reset();
    assert_eq!(
        requests(&state),
        vec![
            Req::VringEnable(0, false),
            Req::GetVringBase(0),
            Req::VringEnable(1, false),
            Req::GetVringBase(1),
        ]
    );
    // A second reset has nothing to stop.
    state.lock().unwrap().requests.clear();
    dev.reset();
    assert!(requests(&state).is_empty());
}

#[test]
fn missing_daemon_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.sock");
    // A plain file where the socket should be: connect fails at once (not after the retry).
    File::create(&path).unwrap().write_all(b"x").unwrap();
    let err = VhostUserDevice::new(&block_config(&path), memfd_memory(1 << 20))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("absent.sock"), "{msg}");
    assert!(msg.contains("cannot connect"), "{msg}");
}

#[test]
fn anonymous_guest_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let _streams = spawn_listening_daemon(&path, block_daemon_state());
    let anon =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let err = VhostUserDevice::new(&block_config(&path), GuestMemoryAtomic::new(anon))
        .err()
        .unwrap();
    assert!(matches!(err, VhostUserError::MemoryNotShared(0)), "{err}");
}

#[test]
fn client_mode_reconnect_replays_rings_from_used_index_and_kicks() {
    let fx = BlockFixture::new(|_| {});
    let (state, mem, streams) = (fx.state.clone(), fx.mem.clone(), &fx.streams);
    let mut dev = fx.device();
    let epoll = Arc::new(Epoll::new().unwrap());
    dev.register_events(EventRegistration {
        epoll: epoll.clone(),
        index: 0,
    })
    .unwrap();
    let first = streams.recv().unwrap();
    let q = queue(0, 0x10000);
    let guest_interrupt = q.call.try_clone().unwrap();
    dev.activate(VERSION_1, vec![q]).unwrap();
    assert!(
        guest_interrupt.read().is_err(),
        "no interrupt at activation"
    );

    // The daemon crashes after completing 5 requests (guest's used.idx == 5).
    mem.memory()
        .write_obj::<u16>(5, GuestAddress(0x12000 + 2))
        .unwrap();
    first.shutdown(std::net::Shutdown::Both).unwrap();
    serve_events_until(&epoll, &mut dev, |d| !d.is_connected());
    state.lock().unwrap().requests.clear();
    state.lock().unwrap().kicks.clear();

    // The listening daemon accepts the retry: the state is replayed with base = used.idx.
    serve_events_until(&epoll, &mut dev, |d| d.is_connected());
    let reqs = requests(&state);
    assert_eq!(reqs.first(), Some(&Req::SetOwner));
    let ring_part: Vec<Req> = reqs
        .into_iter()
        .skip_while(|r| !matches!(r, Req::SetFeatures(_)))
        .collect();
    assert_eq!(
        ring_part,
        vec![
            Req::SetFeatures(VERSION_1 | PROTOCOL_FEATURES_BIT),
            Req::SetMemTable(1),
            Req::VringNum(0, 128),
            Req::VringBase(0, 5),
            Req::VringAddr(0),
            Req::VringCall(0),
            Req::VringKick(0),
            Req::VringEnable(0, true),
        ]
    );
    // The queue was kicked once so the new daemon looks at pending requests.
    let kick = state.lock().unwrap().kicks.pop().unwrap();
    let mut count = [0u8; 8];
    (&kick).read_exact(&mut count).unwrap();
    assert_eq!(u64::from_le_bytes(count), 1);
    // And the guest was interrupted once, for completions the old daemon did not signal.
    assert_eq!(guest_interrupt.read().unwrap(), 1);
    dev.shutdown();
}

#[test]
fn server_mode_waits_for_daemon_and_takes_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let state = block_daemon_state();
    let (tx, rx) = mpsc::channel::<UnixStream>();
    let daemon_path = path.clone();
    let daemon_state = state.clone();
    // The daemon in --client mode: connects (retrying until the VMM listens), twice.
    std::thread::spawn(move || {
        for _ in 0..2 {
            let stream = loop {
                match UnixStream::connect(&daemon_path) {
                    Ok(s) => break s,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            tx.send(stream.try_clone().unwrap()).unwrap();
            serve(stream, daemon_state.clone());
        }
    });
    let mut cfg = block_config(&path);
    cfg.server = true;
    let mem = memfd_memory(1 << 20);
    let mut dev = VhostUserDevice::new(&cfg, mem).unwrap();
    let epoll = Arc::new(Epoll::new().unwrap());
    dev.register_events(EventRegistration {
        epoll: epoll.clone(),
        index: 3,
    })
    .unwrap();
    dev.activate(VERSION_1, vec![queue(0, 0x10000)]).unwrap();
    rx.recv()
        .unwrap()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    serve_events_until(&epoll, &mut dev, |d| !d.is_connected());
    state.lock().unwrap().requests.clear();
    serve_events_until(&epoll, &mut dev, |d| d.is_connected());
    assert!(requests(&state).contains(&Req::VringEnable(0, true)));
    dev.shutdown();
    // Server mode removes its socket on shutdown.
    assert!(!path.exists());
}

#[test]
fn fs_tag_from_vmm_config_when_daemon_has_no_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let state = block_daemon_state();
    {
        let mut s = state.lock().unwrap();
        s.protocol = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        s.queue_num = 3;
    }
    let _streams = spawn_listening_daemon(&path, state);
    let cfg = VhostUserDeviceConfig {
        kind: VhostUserDeviceKind::Fs,
        socket: path.clone(),
        server: false,
        num_queues: None,
        queue_size: 128,
        tag: Some("shared".into()),
        mac: None,
    };
    let mut dev = VhostUserDevice::new(&cfg, memfd_memory(1 << 20)).unwrap();
    assert_eq!(dev.device_type(), 26);
    assert_eq!(dev.num_queues(), 3);
    let mut cfg_bytes = [0xFFu8; 40];
    dev.read_config(0, &mut cfg_bytes);
    assert_eq!(&cfg_bytes[..6], b"shared");
    assert!(cfg_bytes[6..36].iter().all(|b| *b == 0));
    assert_eq!(u32::from_le_bytes(cfg_bytes[36..40].try_into().unwrap()), 2);

    // Without a tag and without CONFIG the device cannot work: refused with a reason.
    let dir2 = tempfile::tempdir().unwrap();
    let path2 = socket_path(&dir2);
    let state2 = block_daemon_state();
    state2.lock().unwrap().protocol = VhostUserProtocolFeatures::MQ;
    let _s2 = spawn_listening_daemon(&path2, state2);
    let mut cfg2 = cfg;
    cfg2.socket = path2;
    cfg2.tag = None;
    let err = VhostUserDevice::new(&cfg2, memfd_memory(1 << 20))
        .err()
        .unwrap();
    assert!(err.to_string().contains("tag="), "{err}");
}

/// The whole device side, driven like Linux would: find the device through 0xCF8/0xCFC,
/// program MSI-X and the queue through BAR 0 on the MMIO bus, set DRIVER_OK, and see the
/// daemon get its rings, the KVM side get ioeventfds/irqfds.
#[test]
fn guest_bring_up_through_pci_reaches_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let state = block_daemon_state();
    let _streams = spawn_listening_daemon(&path, state.clone());
    let vm = Arc::new(RecordingVm::default());
    let pio = Arc::new(crate::bus::Bus::new());
    let mmio = Arc::new(crate::bus::Bus::new());
    let mem = memfd_memory(1 << 20);
    let mut manager =
        attach_devices_with(vm.clone(), mem, &pio, &mmio, &[block_config(&path)]).unwrap();
    assert_eq!(manager.event_fds().len(), 1);

    let cfg_read = |slot: u32, reg: u32| {
        pio.write(0xCF8, &(0x8000_0000u32 | slot << 11 | reg).to_le_bytes());
        let mut b = [0u8; 4];
        assert!(pio.read(0xCFC, &mut b));
        u32::from_le_bytes(b)
    };
    let cfg_write = |slot: u32, reg: u32, v: &[u8]| {
        pio.write(
            0xCF8,
            &(0x8000_0000u32 | slot << 11 | (reg & !3)).to_le_bytes(),
        );
        assert!(pio.write(0xCFC + u64::from(reg & 3), v));
    };
    assert_eq!(cfg_read(0, 0) & 0xFFFF, 0x8086);
    assert_eq!(cfg_read(1, 0), 0x1042_1af4);
    let bar = u64::from(cfg_read(1, 0x10) & !0xF);
    assert_eq!(bar, 0xC000_0000);
    // Memory decoding + bus mastering, then MSI-X enable (capability at 0x40).
    cfg_write(1, 4, &6u16.to_le_bytes());
    assert_eq!(cfg_read(1, 0x40) & 0xFF, 0x11);
    cfg_write(1, 0x42, &0x8000u16.to_le_bytes());

    let w = |off: u64, v: &[u8]| assert!(mmio.write(bar + off, v));
    let r32 = |off: u64| {
        let mut b = [0u8; 4];
        assert!(mmio.read(bar + off, &mut b));
        u32::from_le_bytes(b)
    };
    // MSI-X vector 1 -> LAPIC 0, unmasked.
    w(0x4010, &0xFEE0_0000u32.to_le_bytes());
    w(0x4018, &0x0000_4022u32.to_le_bytes());
    w(0x401C, &0u32.to_le_bytes());
    w(0x14, &[1]);
    w(0x14, &[3]);
    w(0x00, &1u32.to_le_bytes());
    assert_eq!(r32(0x04), 1); // VERSION_1 in the high word
    w(0x08, &0u32.to_le_bytes());
    w(0x0C, &(BLK_F_FLUSH as u32).to_le_bytes());
    w(0x08, &1u32.to_le_bytes());
    w(0x0C, &1u32.to_le_bytes());
    w(0x14, &[0xB]);
    assert_eq!(r32(0x14) & 0xFF, 0xB);
    // Device config through the daemon.
    assert_eq!(r32(0x2000), 0x800);
    w(0x16, &0u16.to_le_bytes());
    w(0x18, &64u16.to_le_bytes());
    w(0x1A, &1u16.to_le_bytes());
    w(0x20, &0x10000u64.to_le_bytes());
    w(0x28, &0x11000u64.to_le_bytes());
    w(0x30, &0x12000u64.to_le_bytes());
    w(0x1C, &1u16.to_le_bytes());
    state.lock().unwrap().requests.clear();
    w(0x14, &[0xF]);
    let reqs = requests(&state);
    assert!(reqs.contains(&Req::VringNum(0, 64)), "{reqs:?}");
    assert!(reqs.contains(&Req::VringEnable(0, true)), "{reqs:?}");
    assert!(!reqs.iter().any(|r| matches!(r, Req::VringNum(1, _))));
    // KVM side: notify ioeventfds for both queues, vector 1's irqfd attached with its route.
    let io: Vec<u64> = crate::interrupt::lock(&vm.ioeventfds)
        .iter()
        .map(|e| e.1)
        .collect();
    assert_eq!(io, vec![bar + 0x3000, bar + 0x3004]);
    let irqfds = crate::interrupt::lock(&vm.irqfds).clone();
    assert_eq!(irqfds.len(), 1);
    assert_eq!(irqfds[0].1, 25);
    assert_eq!(crate::interrupt::lock(&vm.routes).clone()[0].1.data, 0x4022);

    // Reset by the driver stops the rings.
    state.lock().unwrap().requests.clear();
    w(0x14, &[0]);
    assert!(requests(&state).contains(&Req::GetVringBase(0)));
    manager.shutdown();
}

/// A region hot-plugged into `mem` at `gpa` (its own memfd, as `GuestRam::add_block` makes).
fn hot_add(
    mem: &GuestMemoryAtomic<vm_memory::GuestMemoryMmap<()>>,
    gpa: u64,
    size: usize,
) -> Arc<vm_memory::GuestRegionMmap<()>> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vmm-test-hotplug".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh memfd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64).unwrap();
    let region = vm_memory::GuestRegionMmap::new(
        vm_memory::MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap(),
        GuestAddress(gpa),
    )
    .map(Arc::new)
    .unwrap();
    let grown = mem.memory().insert_region(region.clone()).unwrap();
    mem.lock().unwrap().replace(grown);
    region
}

#[test]
fn hot_added_memory_reaches_the_daemon() {
    let fx = BlockFixture::new(|_| {});
    let (state, mem) = (fx.state.clone(), fx.mem.clone());
    let mut dev = fx.device();
    state.lock().unwrap().requests.clear();

    // Before the rings run the daemon has no table: nothing to send now, all of it later.
    let early = hot_add(&mem, 1 << 32, 1 << 20);
    dev.add_memory_region(&early).unwrap();
    assert!(requests(&state).is_empty());
    dev.activate(VERSION_1, vec![queue(0, 0x10000)]).unwrap();
    assert!(requests(&state).contains(&Req::SetMemTable(2)));

    // While they run: ADD_MEM_REG with the new region only.
    state.lock().unwrap().requests.clear();
    let late = hot_add(&mem, (1 << 32) + (1 << 20), 2 << 20);
    dev.add_memory_region(&late).unwrap();
    assert_eq!(
        requests(&state),
        vec![Req::AddMemReg((1 << 32) + (1 << 20), 2 << 20)]
    );
}

#[test]
fn hot_added_memory_without_mem_slots_resends_the_table() {
    let fx = BlockFixture::new(|state| {
        state.protocol = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
    });
    let (state, mem) = (fx.state.clone(), fx.mem.clone());
    let mut dev = fx.device();
    dev.activate(VERSION_1, vec![queue(0, 0x10000)]).unwrap();
    state.lock().unwrap().requests.clear();
    let region = hot_add(&mem, 1 << 32, 1 << 20);
    dev.add_memory_region(&region).unwrap();
    assert_eq!(requests(&state), vec![Req::SetMemTable(2)]);
}

/// The guest side of one virtio-pci function at slot 1: its BAR 0 on the MMIO bus.
struct GuestView {
    mmio: Arc<crate::bus::Bus>,
    bar: u64,
}

impl GuestView {
    fn read<const N: usize>(&self, off: u64) -> [u8; N] {
        let mut b = [0u8; N];
        assert!(self.mmio.read(self.bar + off, &mut b));
        b
    }
    fn write(&self, off: u64, v: &[u8]) {
        assert!(self.mmio.write(self.bar + off, v));
    }
    fn config_generation(&self) -> u8 {
        self.read::<1>(0x15)[0]
    }
    /// Reading the ISR acknowledges it.
    fn isr(&self) -> u8 {
        self.read::<1>(0x1000)[0]
    }
    /// (cols, rows) from the device config space.
    fn console_size(&self) -> (u16, u16) {
        let cfg = self.read::<4>(0x2000);
        (
            u16::from_le_bytes([cfg[0], cfg[1]]),
            u16::from_le_bytes([cfg[2], cfg[3]]),
        )
    }
}

/// Find the device at slot 1, enable memory decoding and MSI-X, and point the config-change
/// interrupt at MSI-X vector 0 (unmasked), as Linux's virtio-pci driver does.
fn guest_enables_config_interrupt(pio: &crate::bus::Bus, mmio: Arc<crate::bus::Bus>) -> GuestView {
    let cfg_addr = |reg: u32| (0x8000_0000u32 | 1 << 11 | reg).to_le_bytes();
    pio.write(0xCF8, &cfg_addr(0x10));
    let mut b = [0u8; 4];
    assert!(pio.read(0xCFC, &mut b));
    let bar = u64::from(u32::from_le_bytes(b) & !0xF);
    pio.write(0xCF8, &cfg_addr(4));
    assert!(pio.write(0xCFC, &6u16.to_le_bytes()));
    pio.write(0xCF8, &cfg_addr(0x40));
    assert!(pio.write(0xCFE, &0x8000u16.to_le_bytes()));
    let guest = GuestView { mmio, bar };
    guest.write(0x4000, &0xFEE0_0000u32.to_le_bytes());
    guest.write(0x4004, &0u32.to_le_bytes());
    guest.write(0x4008, &0x0000_4021u32.to_le_bytes());
    guest.write(0x400C, &0u32.to_le_bytes());
    guest.write(0x14, &[1]);
    guest.write(0x14, &[3]);
    guest.write(0x10, &0u16.to_le_bytes());
    assert_eq!(u16::from_le_bytes(guest.read::<2>(0x10)), 0);
    guest
}

/// The irqfd KVM would deliver vector `gsi` from (a duplicate, to read its counter).
fn irqfd_for(vm: &RecordingVm, gsi: u32) -> EventFd {
    let fd: RawFd = crate::interrupt::lock(&vm.irqfds)
        .iter()
        .find(|(_, g)| *g == gsi)
        .map(|(fd, _)| *fd)
        .expect("the config vector has an irqfd");
    // SAFETY: dup of an eventfd the transport keeps open; the duplicate is checked and then
    // owned by the returned EventFd.
    let dup = unsafe { libc::dup(fd) };
    assert!(dup >= 0);
    // SAFETY: `dup` is a fresh descriptor nothing else owns.
    unsafe { EventFd::from_raw_fd(dup) }
}

/// Run `request` (a daemon's backend request, which waits for the VMM's answer) on a thread
/// while this thread serves the VM's device events, as the VM thread does; its result.
fn with_vm_thread<T: Send + 'static>(
    manager: &mut DeviceManager,
    request: impl FnOnce() -> T + Send + 'static,
) -> T {
    let daemon = std::thread::spawn(request);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.is_finished() {
        // The thread is left behind: failing beats hanging.
        assert!(
            Instant::now() < deadline,
            "the backend request got no answer"
        );
        manager.handle_event(0);
        std::thread::sleep(Duration::from_millis(2));
    }
    daemon.join().unwrap()
}

/// A daemon's VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (sent as vhost-user-console sends it) reaches
/// the guest as a virtio-pci config change: new generation, ISR bit, the config vector's
/// interrupt, and the new size in the config space. Other backend requests are refused without
/// breaking the channel, and a restarted daemon gets a new channel that works the same.
#[test]
fn daemon_config_change_interrupts_the_guest_across_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let state = console_daemon_state();
    let streams = spawn_listening_daemon(&path, state.clone());
    let vm = Arc::new(RecordingVm::default());
    let pio = Arc::new(crate::bus::Bus::new());
    let mmio = Arc::new(crate::bus::Bus::new());
    let cfg = VhostUserDeviceConfig {
        kind: VhostUserDeviceKind::Console,
        socket: path.clone(),
        server: false,
        num_queues: None,
        queue_size: 128,
        tag: None,
        mac: None,
    };
    let mut manager =
        attach_devices_with(vm.clone(), memfd_memory(1 << 20), &pio, &mmio, &[cfg]).unwrap();
    let wanted = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ;
    let reqs = requests(&state);
    assert!(
        reqs.contains(&Req::SetProtocolFeatures(wanted.bits())),
        "{reqs:?}"
    );
    assert!(reqs.contains(&Req::SetBackendReqFd), "{reqs:?}");
    let first_channel = state.lock().unwrap().channels.pop().expect("a channel");

    let guest = guest_enables_config_interrupt(&pio, mmio.clone());
    let config_irq = irqfd_for(&vm, 24);
    assert_eq!(guest.console_size(), (80, 25));
    let generation = guest.config_generation();
    assert_eq!(guest.isr(), 0);
    assert!(config_irq.read().is_err(), "no interrupt before a change");

    state.lock().unwrap().config = console_config(132, 43);
    let channel = first_channel.clone();
    with_vm_thread(&mut manager, move || channel.config_changed()).unwrap();
    assert_eq!(config_irq.read().unwrap(), 1);
    assert_eq!(guest.isr(), 2);
    assert_eq!(guest.config_generation(), generation.wrapping_add(1));
    assert_eq!(guest.console_size(), (132, 43));

    // A request the VMM does not serve gets an error reply (vhost's proxy, with REPLY_ACK)...
    let backend = state.lock().unwrap().backend.take().unwrap();
    backend.set_reply_ack_flag(true);
    backend.set_shared_object_flag(true);
    let mut object = VhostUserSharedMsg::default();
    object.as_mut_slice()[0] = 1;
    let refused = with_vm_thread(&mut manager, move || backend.shared_object_add(&object));
    assert!(refused.is_err());
    assert!(
        config_irq.read().is_err(),
        "a refused request is no config change"
    );
    // ... and the channel still carries config changes.
    state.lock().unwrap().config = console_config(100, 30);
    let channel = first_channel.clone();
    with_vm_thread(&mut manager, move || channel.config_changed()).unwrap();
    assert_eq!(config_irq.read().unwrap(), 1);
    assert_eq!(guest.console_size(), (100, 30));

    // The daemon dies; the VMM reconnects and sets up a new channel.
    streams
        .recv()
        .unwrap()
        .shutdown(std::net::Shutdown::Both)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let second_channel = loop {
        manager.handle_event(0);
        if let Some(c) = state.lock().unwrap().channels.pop() {
            break c;
        }
        assert!(Instant::now() < deadline, "no channel after the reconnect");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!second_channel.same_as(&first_channel));
    while !manager.all_connected() {
        assert!(Instant::now() < deadline, "never reconnected");
        manager.handle_event(0);
        std::thread::sleep(Duration::from_millis(10));
    }
    let generation = guest.config_generation();
    state.lock().unwrap().config = console_config(120, 40);
    with_vm_thread(&mut manager, move || second_channel.config_changed()).unwrap();
    assert_eq!(config_irq.read().unwrap(), 1);
    assert_eq!(guest.config_generation(), generation.wrapping_add(1));
    assert_eq!(guest.console_size(), (120, 40));
    manager.shutdown();
}

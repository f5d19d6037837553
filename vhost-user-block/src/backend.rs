//! The `VhostUserBackend` of the block device: features, config space, and the workers that pop
//! requests and run them against the disk (a thread per queue for synchronous I/O, one thread
//! for all queues with io_uring).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{DeviceBackend, GuestMemoryAtomic, Vring};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::disk::{Disk, DiskError};
use crate::request::{self, Limits, Outcome, RequestContext, VIRTIO_BLK_ID_BYTES};
use crate::uring::UringQueue;

/// Largest queue size accepted: bounds chains (and iovec arrays) per request.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most queues (vhost-user-backend maps queues to threads with a 64-bit mask).
pub const MAX_QUEUES: usize = 64;
/// Largest single data segment the guest may use.
const SIZE_MAX: u32 = 1 << 20;
/// Config-space offset of the `writeback` byte (struct virtio_blk_config).
const CONFIG_WRITEBACK_OFFSET: u32 = 32;
const CONFIG_LEN: usize = 60;

/// What the user asked for on the command line.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Image file or block device.
    pub path: PathBuf,
    /// Read-only device.
    pub readonly: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Request queues.
    pub num_queues: usize,
    /// Maximum queue size.
    pub queue_size: u16,
    /// GET_ID answer.
    pub serial: Option<String>,
    /// Initial write-cache mode.
    pub writeback: bool,
    /// I/O engine.
    pub engine: IoEngine,
    /// With io_uring, a worker thread per queue instead of one for all queues.
    pub uring_thread_per_queue: bool,
}

/// How requests reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// io_uring with O_DIRECT, synchronous otherwise.
    Auto,
    /// One positional read/write at a time per queue thread: lowest latency on cached files.
    Sync,
    /// io_uring: many requests in flight on every queue, all served by one thread.
    Uring,
}

/// Bad configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// --num-queues out of range.
    #[error("--num-queues must be between 1 and {MAX_QUEUES}, not {0}")]
    NumQueues(usize),
    /// --queue-size out of range.
    #[error("--queue-size must be a power of two between 2 and {MAX_QUEUE_SIZE}, not {0}")]
    QueueSize(u16),
    /// --serial too long.
    #[error("--serial must be at most {VIRTIO_BLK_ID_BYTES} bytes, not {0}")]
    Serial(usize),
    /// io_uring was asked for and is not available.
    #[error("--io-engine uring: cannot set up io_uring")]
    Uring(#[source] io::Error),
    /// An empty disk cannot be served.
    #[error("{0} is smaller than one 512-byte sector")]
    Empty(PathBuf),
}

/// Per-queue worker state; each lock is only ever taken by its own queue's thread (and by
/// memory updates), so queues never contend on the I/O path.
struct QueueWorker {
    mem: Option<GuestMemoryAtomic>,
    descs: Vec<Descriptor>,
    uring: Option<UringQueue>,
    /// The vring of the current connection, for completions reaped outside its events.
    vring: Option<Vring>,
}

struct Inner {
    disk: Disk,
    config: BlockConfig,
    serial: [u8; VIRTIO_BLK_ID_BYTES],
    limits: Limits,
    writeback: AtomicBool,
    event_idx: AtomicBool,
    workers: Vec<Mutex<QueueWorker>>,
    /// All queues are served by one worker thread (the io_uring engine), not one thread each.
    one_thread: bool,
}

/// The block device; clones share one disk.
#[derive(Clone)]
pub struct BlockBackend(Arc<Inner>);

impl BlockBackend {
    /// Validate the configuration and open the disk.
    pub fn new(config: BlockConfig) -> Result<Self, ConfigError> {
        if config.num_queues == 0 || config.num_queues > MAX_QUEUES {
            return Err(ConfigError::NumQueues(config.num_queues));
        }
        if !config.queue_size.is_power_of_two()
            || config.queue_size < 2
            || config.queue_size > MAX_QUEUE_SIZE
        {
            return Err(ConfigError::QueueSize(config.queue_size));
        }
        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(s) = &config.serial {
            if s.len() > VIRTIO_BLK_ID_BYTES {
                return Err(ConfigError::Serial(s.len()));
            }
            serial[..s.len()].copy_from_slice(s.as_bytes());
        }
        let disk = Disk::open(&config.path, config.readonly, config.direct)?;
        if disk.size() == 0 {
            return Err(ConfigError::Empty(config.path.clone()));
        }
        log::info!(
            "serving {} ({} bytes{}{}), {} queue(s) of up to {} entries",
            config.path.display(),
            disk.size(),
            if config.readonly { ", read-only" } else { "" },
            if config.direct { ", O_DIRECT" } else { "" },
            config.num_queues,
            config.queue_size
        );
        let limits = Limits {
            max_descriptors: usize::from(config.queue_size),
            max_discard_seg: 32,
            max_discard_sectors: 1 << 21,
            max_write_zeroes_seg: 32,
            max_write_zeroes_sectors: 1 << 21,
        };
        let use_uring = match config.engine {
            IoEngine::Sync => false,
            IoEngine::Uring => true,
            IoEngine::Auto => config.direct,
        };
        let mut workers = Vec::with_capacity(config.num_queues);
        for _ in 0..config.num_queues {
            let uring = if use_uring {
                match UringQueue::new(config.queue_size) {
                    Ok(u) => Some(u),
                    Err(e) if config.engine == IoEngine::Auto => {
                        log::warn!("io_uring unavailable ({e}); using synchronous I/O");
                        None
                    }
                    Err(e) => return Err(ConfigError::Uring(e)),
                }
            } else {
                None
            };
            workers.push(Mutex::new(QueueWorker {
                mem: None,
                descs: Vec::with_capacity(usize::from(config.queue_size)),
                uring,
                vring: None,
            }));
        }
        // With io_uring a worker only submits and completes, so one thread keeps every queue's
        // requests in flight, and a wake-up serves whatever queues have work together instead of
        // one thread waking per queue and request (what costs CPU at low depth on many queues).
        let uring = workers
            .iter()
            .any(|w| w.lock().is_ok_and(|w| w.uring.is_some()));
        let one_thread = uring && !config.uring_thread_per_queue;
        if uring && !one_thread {
            log::info!("I/O engine: io_uring, one worker thread per queue");
        }
        if one_thread {
            log::info!("I/O engine: io_uring, one worker thread for all queues");
        }
        Ok(BlockBackend(Arc::new(Inner {
            disk,
            serial,
            limits,
            writeback: AtomicBool::new(config.writeback),
            event_idx: AtomicBool::new(false),
            workers,
            one_thread,
            config,
        })))
    }

    /// The virtio_blk_config structure (virtio spec 5.2.4), little-endian.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let c = &self.0;
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&(c.disk.size() / 512).to_le_bytes());
        b[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        let seg_max = u32::from(c.config.queue_size) - 2;
        b[12..16].copy_from_slice(&seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&512u32.to_le_bytes());
        // Topology: 4 KiB physical blocks (exponent 3), minimum I/O one logical block.
        b[24] = 3;
        b[26..28].copy_from_slice(&1u16.to_le_bytes());
        b[32] = u8::from(c.writeback.load(Ordering::Relaxed));
        b[34..36].copy_from_slice(&(c.config.num_queues as u16).to_le_bytes());
        b[36..40].copy_from_slice(&c.limits.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&c.limits.max_discard_seg.to_le_bytes());
        // Discard granularity: 4 KiB (8 sectors), the unit a file system hole punch frees.
        b[44..48].copy_from_slice(&8u32.to_le_bytes());
        b[48..52].copy_from_slice(&c.limits.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&c.limits.max_write_zeroes_seg.to_le_bytes());
        b[56] = 1;
        b
    }

    fn process_queue(&self, index: usize, vring: &Vring) -> io::Result<()> {
        let inner = &self.0;
        let Some(worker) = inner.workers.get(index) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such queue"));
        };
        let mut worker = worker
            .lock()
            .map_err(|_| io::Error::other("queue worker poisoned"))?;
        let Some(atomic) = worker.mem.clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mem_arc = worker.uring.is_some().then(|| atomic.memory().into_inner());
        if worker.uring.is_some() && worker.vring.is_none() {
            worker.vring = Some(vring.clone());
        }
        let event_idx = inner.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mut completed = false;
            loop {
                let popped = {
                    let mut state = vring.get_mut();
                    let queue = state.get_queue_mut();
                    let table = queue.desc_table();
                    let size = queue.size();
                    queue
                        .pop_descriptor_chain(&*mem)
                        .map(|c| (c.head_index(), table, size))
                };
                let Some((head, table, size)) = popped else {
                    break;
                };
                let ctx = RequestContext {
                    disk: &inner.disk,
                    readonly: inner.config.readonly,
                    writeback: inner.writeback.load(Ordering::Relaxed),
                    serial: &inner.serial,
                    limits: &inner.limits,
                };
                let worker = &mut *worker;
                let chain = request::collect_chain(
                    &*mem,
                    table,
                    size,
                    head,
                    inner.limits.max_descriptors,
                    &mut worker.descs,
                );
                let used = match chain {
                    Err(e) => {
                        log::warn!("queue {index}: malformed descriptor chain at {head}: {e}");
                        answer_malformed(&*mem, &worker.descs)
                    }
                    Ok(()) => match (&mut worker.uring, &mem_arc) {
                        (Some(uring), Some(arc)) => {
                            match request::prepare(&ctx, &*mem, &worker.descs) {
                                Outcome::Done(used) => used,
                                Outcome::Transfer(t) => {
                                    match uring.push(&inner.disk, head, t, arc.clone()) {
                                        // Completed later, when the ring reports it.
                                        Ok(()) => continue,
                                        Err((t, e)) => {
                                            log::warn!(
                                                "queue {index}: cannot queue a request: {e}"
                                            );
                                            t.complete(&*mem, false)
                                        }
                                    }
                                }
                            }
                        }
                        _ => request::execute(&ctx, &*mem, &worker.descs),
                    },
                };
                vring.add_used(head, used).map_err(io::Error::other)?;
                completed = true;
            }
            if let Some(uring) = worker.uring.as_mut() {
                uring.submit()?;
            }
            if completed && vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }
}

impl BlockBackend {
    /// io_uring completions for queue `index`.
    fn reap_queue(&self, index: usize, vring: &Vring) -> io::Result<()> {
        let inner = &self.0;
        let Some(worker) = inner.workers.get(index) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no such queue"));
        };
        let mut worker = worker
            .lock()
            .map_err(|_| io::Error::other("queue worker poisoned"))?;
        let Some(uring) = worker.uring.as_mut() else {
            return Ok(());
        };
        let mut result = Ok(());
        let mut completed = false;
        uring.reap(&inner.disk, |head, used| {
            completed = true;
            log::trace!(
                "queue {index}: used head {head} len {used} at next_used {}",
                vring.get_ref().get_queue().next_used()
            );
            if let Err(e) = vring.add_used(head, used) {
                result = Err(io::Error::other(e));
            }
        });
        result?;
        if completed && vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Wait for queue `index`'s in-flight requests and complete them into its vring.
    fn drain_queue(&self, index: usize) {
        let Some(worker) = self.0.workers.get(index) else {
            return;
        };
        let Ok(mut worker) = worker.lock() else {
            return;
        };
        let worker = &mut *worker;
        let (Some(uring), vring) = (worker.uring.as_mut(), worker.vring.as_ref()) else {
            return;
        };
        uring.drain(&self.0.disk, |head, used| {
            if let Some(v) = vring {
                let _ = v.add_used(head, used);
            }
        });
        if let Some(v) = vring {
            let _ = v.signal_used_queue();
        }
    }
}

/// A chain we could not walk completely still gets IOERR in its status byte if the part we
/// saw ends in a writable byte; otherwise it is returned with nothing written.
fn answer_malformed<M: vm_memory::GuestMemoryBackend>(mem: &M, seen: &[Descriptor]) -> u32 {
    use vm_memory::{Bytes, GuestAddress};
    let Some(last) = seen.last().filter(|d| d.is_write_only() && d.len() > 0) else {
        return 0;
    };
    let Some(addr) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
        return 0;
    };
    match mem.write_obj(request::VIRTIO_BLK_S_IOERR, GuestAddress(addr)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.0.config.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.0.config.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.0.config.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
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
        if offset == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 {
            let on = buf[0] != 0;
            if !on {
                // Switching to write-through: what was cached must be durable first.
                self.0.disk.flush()?;
            }
            self.0.writeback.store(on, Ordering::Relaxed);
            log::info!(
                "guest set the write cache to {}",
                if on { "writeback" } else { "writethrough" }
            );
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "only the writeback field is writable",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic) -> io::Result<()> {
        for w in &self.0.workers {
            if let Ok(mut w) = w.lock() {
                w.mem = Some(mem.clone());
            }
        }
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE must see every accepted request completed.
        self.drain_queue(queue_index as usize);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.0.config.num_queues;
        if self.0.one_thread {
            return vec![u64::MAX >> (64 - n)];
        }
        (0..n).map(|q| 1u64 << q).collect()
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
        if evset != EventSet::IN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unexpected events {evset:?}"),
            ));
        }
        // vhost-user-backend numbers a thread's vrings from 0: with a thread per queue the thread
        // id is the queue index and `vrings` holds just that queue; one thread holds them all.
        let num_queues = self.0.config.num_queues;
        let event = usize::from(device_event);
        let (queue, completions) = match event.checked_sub(num_queues + 1) {
            // The queue's io_uring (its descriptor is registered in attach_workers).
            Some(queue) => (queue, true),
            None if self.0.one_thread => (event, false),
            None => (thread_id, false),
        };
        let local = if self.0.one_thread { queue } else { 0 };
        let vring = vrings.get(local).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("thread {thread_id} has no queue {queue}"),
            )
        })?;
        if completions {
            return self.reap_queue(queue, vring);
        }
        self.process_queue(queue, vring)
    }
}

impl DeviceBackend for BlockBackend {
    fn attach_workers(&self, handlers: &[Arc<VringEpollHandler<Self>>]) -> io::Result<()> {
        let num_queues = self.0.config.num_queues;
        for (queue, worker) in self.0.workers.iter().enumerate() {
            let Ok(w) = worker.lock() else { continue };
            let thread = if self.0.one_thread { 0 } else { queue };
            if let (Some(uring), Some(handler)) = (w.uring.as_ref(), handlers.get(thread)) {
                handler
                    .register_listener(
                        uring.completion_fd(),
                        EventSet::IN,
                        (num_queues + 1 + queue) as u64,
                    )
                    .map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    fn disconnected(&self) {
        for (queue, w) in self.0.workers.iter().enumerate() {
            // Requests still in flight complete into memory the old mapping keeps alive.
            self.drain_queue(queue);
            if let Ok(mut w) = w.lock() {
                w.mem = None;
                w.vring = None;
            }
        }
        self.0.event_idx.store(false, Ordering::Relaxed);
    }
}

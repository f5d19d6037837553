//! vhost-user devices: each configured device is a virtio-pci function whose queues are served
//! by an external daemon over a unix socket (vhost crate's `Frontend`).
//!
//! The VMM's part is the control plane: it negotiates features with the guest driver and the
//! daemon, shares guest RAM (memfd regions, SET_MEM_TABLE), and at DRIVER_OK hands the daemon
//! each queue's rings plus two eventfds: the kick fd, which KVM signals on the guest's notify
//! write (ioeventfd), and the call fd, which is the irqfd of the queue's MSI-X vector. Requests
//! and completions then flow guest <-> KVM <-> daemon without the VMM.
//!
//! Daemon restarts: the [`DeviceManager`] hands the VM thread one epoll fd
//! ([`DeviceManager::event_fds`]). A hang-up on a daemon socket marks the device
//! disconnected; in client mode a timer retries the socket, in server mode the listening
//! socket waits for the daemon to connect again. A new connection gets the negotiation, the
//! memory table and, for each running queue, its size, addresses, kick/call fds and a base
//! index read from the used ring in guest memory (the new daemon has no state). The queues are
//! then enabled and kicked once, so requests the guest queued meanwhile are served, and each
//! queue's interrupt fires once, for completions the old daemon published but did not signal.
//! The guest keeps running throughout; its I/O just stalls while the daemon is away.
//!
//! Config changes: a daemon with VHOST_USER_PROTOCOL_F_BACKEND_REQ gets a backend-request
//! channel (a socket pair, SET_BACKEND_REQ_FD) on every connection, served on the same epoll
//! fd. Its VHOST_USER_BACKEND_CONFIG_CHANGE_MSG (a console resized, say) raises the device's
//! virtio-pci config-change interrupt; the guest then reads the config space, which comes from
//! the daemon (GET_CONFIG). Other backend requests are refused with an error reply.
//!
//! Requests in flight when the daemon died are resubmitted from the used index on (block
//! requests may run twice); exact resumption needs VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, which
//! fits here later: the inflight fd would be kept in `ActiveState` and re-sent on reconnect.
//! Likewise live migration (SET_LOG_BASE, device state) slots into `VhostUserDevice` next to
//! `start_rings`. Hot-plugged RAM reaches running daemons through ADD_MEM_REG
//! (`DeviceManager::add_memory_region`), or a new SET_MEM_TABLE without CONFIGURE_MEM_SLOTS.

mod device;
#[cfg(test)]
mod tests;

pub use device::{VhostUserDevice, VhostUserError};

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use crate::bus::Bus;
use crate::config::VhostUserDeviceConfig;
use crate::interrupt::{lock, KvmVm, MsiRouter, VmInterface};
use crate::layout::{PCI_MMCONFIG_START, PCI_MMIO32_START};
use crate::pci::{
    BarAllocator, PciConfigIo, PciError, PciRoot, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use crate::virtio::pci_transport::BAR_SIZE;
use crate::virtio::{VirtioBackend, VirtioPciDevice, VirtioPciError};
use device::{EventRegistration, TOKENS_PER_DEVICE};

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A vhost-user daemon could not be reached or negotiated with.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// The virtio-pci function could not be created.
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    /// PCI slots, BAR space or bus registration failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// The device event loop could not be created.
    #[error("cannot create the device event loop: {0}")]
    Epoll(#[source] io::Error),
}

/// All devices of a VM, owned by the VM thread.
pub struct DeviceManager {
    epoll: Arc<Epoll>,
    devices: Vec<Arc<Mutex<VhostUserDevice>>>,
    /// The transport of each device, by the same index; the buses hold further references.
    transports: Vec<Arc<Mutex<VirtioPciDevice>>>,
    _pci_root: Arc<PciRoot>,
}

/// Create the PCI root (ports 0xCF8..0xCFF on `ctx.pio_bus`), connect every vhost-user
/// daemon and put each device on the bus with its BAR on `ctx.mmio_bus`.
pub fn attach_devices(
    ctx: &crate::vm::DeviceContext,
    devices: &[VhostUserDeviceConfig],
) -> Result<DeviceManager, DeviceError> {
    let vm: Arc<dyn VmInterface> = Arc::new(KvmVm::new(ctx.vm_fd.clone()));
    attach_devices_with(vm, ctx.mem.clone(), &ctx.pio_bus, &ctx.mmio_bus, devices)
}

/// [`attach_devices`] against any [`VmInterface`] (tests use a recording one).
pub fn attach_devices_with(
    vm: Arc<dyn VmInterface>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    pio_bus: &Arc<Bus>,
    mmio_bus: &Arc<Bus>,
    devices: &[VhostUserDeviceConfig],
) -> Result<DeviceManager, DeviceError> {
    // A daemon dying mid-write must cost an EPIPE, not the VMM process.
    // SAFETY: installing SIG_IGN for SIGPIPE has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    let epoll = Arc::new(Epoll::new().map_err(DeviceError::Epoll)?);
    let router = Arc::new(MsiRouter::new(vm));
    let mut root = PciRoot::new(mmio_bus.clone());
    let mut bars = BarAllocator::new(PCI_MMIO32_START, PCI_MMCONFIG_START);
    let mut vhost_devices = Vec::new();
    let mut transports = Vec::new();
    for (index, cfg) in devices.iter().enumerate() {
        let mut device = VhostUserDevice::new(cfg, mem.clone())?;
        device.register_events(EventRegistration {
            epoll: epoll.clone(),
            index: index as u64,
        })?;
        let device = Arc::new(Mutex::new(device));
        let bar = bars.allocate(BAR_SIZE)?;
        let backend: Arc<Mutex<dyn VirtioBackend>> = device.clone();
        let bar32 = u32::try_from(bar).map_err(|_| PciError::NoBarSpace(BAR_SIZE))?;
        let transport = Arc::new(Mutex::new(VirtioPciDevice::new(
            backend,
            bar32,
            router.clone(),
            mem.clone(),
        )?));
        let slot = root.add_device(transport.clone())?;
        log::info!(
            "PCI 00:{slot:02x}.0: vhost-user {:?} ({}), BAR0 {bar:#x}",
            cfg.kind,
            cfg.socket.display()
        );
        vhost_devices.push(device);
        transports.push(transport);
    }
    let root = Arc::new(root);
    pio_bus
        .insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_PORT_SIZE,
        )
        .map_err(|e| PciError::ConfigPorts(format!("{e:?}")))?;
    Ok(DeviceManager {
        epoll,
        devices: vhost_devices,
        transports,
        _pci_root: root,
    })
}

impl DeviceManager {
    /// Fds the VM thread's epoll must watch (readable => call [`DeviceManager::handle_event`]).
    /// The set never changes after attach.
    pub fn event_fds(&self) -> Vec<(RawFd, u64)> {
        vec![(self.epoll.as_raw_fd(), 0)]
    }

    /// Serve whatever made the device event fd readable (daemon hang-ups, reconnect timers,
    /// daemons connecting back in server mode, requests on backend-request channels). Never
    /// blocks on an idle fd.
    pub fn handle_event(&mut self, _token: u64) {
        let mut events = [EpollEvent::default(); 16];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("device event loop: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let data = event.data();
            let index = (data / TOKENS_PER_DEVICE) as usize;
            let Some(device) = self.devices.get(index) else {
                continue;
            };
            // The device lock is released before the transport's is taken: a vCPU reading
            // the config space holds the transport's and then takes the device's.
            let config_changed = lock(device).handle_event(data % TOKENS_PER_DEVICE);
            if config_changed {
                if let Some(transport) = self.transports.get(index) {
                    lock(transport).notify_config_changed();
                }
            }
        }
    }

    /// Whether every daemon is connected (for status reporting).
    pub fn all_connected(&self) -> bool {
        self.devices.iter().all(|d| lock(d).is_connected())
    }

    /// Give every daemon a RAM region hot-plugged into the guest (see
    /// [`VhostUserDevice::add_memory_region`]); the first failure is returned after all were
    /// tried.
    pub fn add_memory_region(
        &mut self,
        region: &vm_memory::GuestRegionMmap<()>,
    ) -> Result<(), VhostUserError> {
        let mut result = Ok(());
        for device in &self.devices {
            if let Err(e) = lock(device).add_memory_region(region) {
                log::error!("{e}");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Stop every device's rings and disconnect from the daemons.
    pub fn shutdown(&mut self) {
        for device in &self.devices {
            lock(device).shutdown();
        }
    }
}

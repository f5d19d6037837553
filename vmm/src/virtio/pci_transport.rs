//! The modern (virtio 1.x) virtio-pci transport.
//!
//! BAR 0 (32-bit memory, 32 KiB) holds every register structure; the vendor capabilities in
//! configuration space point the driver at them:
//!
//! | BAR 0 offset | structure                                   |
//! |--------------|---------------------------------------------|
//! | 0x0000       | common configuration                        |
//! | 0x1000       | ISR status                                  |
//! | 0x2000       | device-specific configuration (backend's)   |
//! | 0x3000       | notifications, 4 bytes per queue (ioeventfd)|
//! | 0x4000       | MSI-X table                                 |
//! | 0x5000       | MSI-X pending-bit array                     |

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivatedQueue, QueueConfig, VirtioBackend, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_FS,
    VIRTIO_ID_NET, VIRTIO_PCI_MODERN_DEVICE_ID_BASE, VIRTIO_PCI_VENDOR_ID,
};
use crate::interrupt::{lock, InterruptError, MsiRouter, MsiVectors, VmInterface};
use crate::pci::msix::MsixTable;
use crate::pci::{BarMove, ConfigSpaceError, PciConfiguration, PciDevice, PciHeader};

type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LENGTH: u64 = 0x3C;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LENGTH: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LENGTH: u64 = 0x1000;
/// Each queue notifies at its own address so that each gets its own ioeventfd.
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const REGION_SIZE: u64 = 0x1000;
/// The table region holds this many 16-byte entries.
pub const MAX_VECTORS: usize = (REGION_SIZE / 16) as usize;
/// One vector stays for configuration changes.
pub const MAX_QUEUES: usize = MAX_VECTORS - 1;

/// "No vector" in the MSI-X vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xFFFF;

/// ISR bit: configuration changed.
const ISR_CONFIG_CHANGED: u8 = 2;

/// virtio_pci_cap cfg_type values.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
/// PCI capability ID of vendor-specific (virtio) capabilities.
const CAP_ID_VENDOR: u8 = 0x09;

/// Errors creating a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The backend reports more queues than the transport lays out.
    #[error("device has {0} queues, the virtio-pci transport supports at most {MAX_QUEUES}")]
    TooManyQueues(usize),
    /// A per-queue kick eventfd could not be created.
    #[error("cannot create a queue kick eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Registering an ioeventfd with the hypervisor failed.
    #[error("cannot register the notify ioeventfd at {0:#x}: {1}")]
    IoEventFd(u64, #[source] std::io::Error),
    /// MSI vectors could not be set up.
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    /// The configuration space could not be built.
    #[error(transparent)]
    ConfigSpace(#[from] ConfigSpaceError),
}

#[derive(Clone, Copy, Debug)]
struct QueueState {
    size: u16,
    enabled: bool,
    vector: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            size: max_size,
            enabled: false,
            vector: VIRTIO_MSI_NO_VECTOR,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }
}

/// The common configuration registers (struct virtio_pci_common_cfg), by offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommonField {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc,
    QueueDriver,
    QueueDevice,
    QueueNotifyData,
    QueueReset,
}

impl CommonField {
    /// The field containing byte `offset`: (field, field start, field size).
    fn at(offset: u64) -> Option<(CommonField, u64, usize)> {
        use CommonField::*;
        const FIELDS: [(CommonField, u64, usize); 18] = [
            (DeviceFeatureSelect, 0x00, 4),
            (DeviceFeature, 0x04, 4),
            (DriverFeatureSelect, 0x08, 4),
            (DriverFeature, 0x0C, 4),
            (ConfigMsixVector, 0x10, 2),
            (NumQueues, 0x12, 2),
            (DeviceStatus, 0x14, 1),
            (ConfigGeneration, 0x15, 1),
            (QueueSelect, 0x16, 2),
            (QueueSize, 0x18, 2),
            (QueueMsixVector, 0x1A, 2),
            (QueueEnable, 0x1C, 2),
            (QueueNotifyOff, 0x1E, 2),
            (QueueDesc, 0x20, 8),
            (QueueDriver, 0x28, 8),
            (QueueDevice, 0x30, 8),
            (QueueNotifyData, 0x38, 2),
            (QueueReset, 0x3A, 2),
        ];
        FIELDS
            .iter()
            .find(|(_, start, size)| (*start..*start + *size as u64).contains(&offset))
            .copied()
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    msix_cap_offset: usize,
    msix: MsixTable,
    backend: Arc<Mutex<dyn VirtioBackend>>,
    vm: Arc<dyn VmInterface>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    num_queues: usize,
    max_queue_size: u16,
    queues: Vec<QueueState>,
    kick_evts: Vec<EventFd>,
    /// Call fd for queues without a vector: signalled by the backend, read by nobody.
    unrouted_call: EventFd,
    bar_addr: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    isr: u8,
}

fn class_code(device_type: u32) -> u32 {
    match device_type {
        VIRTIO_ID_NET => 0x02_00_00, // network controller, ethernet
        VIRTIO_ID_BLOCK | VIRTIO_ID_FS => 0x01_80_00, // mass storage, other
        VIRTIO_ID_CONSOLE => 0x07_80_00, // communication, other
        _ => 0xFF_00_00,
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![
        CAP_ID_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

impl VirtioPciDevice {
    /// Create the device with BAR 0 at `bar_addr` and register its notify ioeventfds.
    pub fn new(
        backend: Arc<Mutex<dyn VirtioBackend>>,
        bar_addr: u32,
        router: Arc<MsiRouter>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, num_queues, max_queue_size) = {
            let b = lock(&backend);
            (b.device_type(), b.num_queues(), b.max_queue_size())
        };
        if num_queues > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(num_queues));
        }
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device_type as u16,
            // Modern-only devices have revision >= 1.
            revision_id: 1,
            class_code: class_code(device_type),
            header_type: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: device_type as u16,
        });
        config.add_mem32_bar(0, bar_addr, BAR_SIZE)?;

        let vectors = MsiVectors::new(router.clone(), num_queues + 1)?;
        let msix = MsixTable::new(vectors);
        let msix_cap_offset = config.add_capability(&msix.capability(
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        ))?;
        config.set_writable(
            msix_cap_offset + 2,
            &MsixTable::control_writable_mask().to_le_bytes(),
        );
        config.add_capability(&virtio_cap(
            CAP_COMMON_CFG,
            COMMON_OFFSET,
            COMMON_LENGTH,
            &[],
        ))?;
        config.add_capability(&virtio_cap(CAP_ISR_CFG, ISR_OFFSET, 1, &[]))?;
        config.add_capability(&virtio_cap(
            CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_LENGTH,
            &[],
        ))?;
        config.add_capability(&virtio_cap(
            CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            NOTIFY_LENGTH,
            &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
        ))?;

        let mut kick_evts = Vec::with_capacity(num_queues);
        for _ in 0..num_queues {
            kick_evts.push(EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?);
        }
        let vm = router.vm().clone();
        let dev = VirtioPciDevice {
            config,
            msix_cap_offset,
            msix,
            backend,
            vm,
            mem,
            num_queues,
            max_queue_size,
            queues: vec![QueueState::new(max_queue_size); num_queues],
            kick_evts,
            unrouted_call: EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)?,
            bar_addr: u64::from(bar_addr),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            isr: 0,
        };
        dev.register_ioeventfds(dev.bar_addr)?;
        Ok(dev)
    }

    fn notify_addr(bar: u64, queue: usize) -> u64 {
        bar + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    fn register_ioeventfds(&self, bar: u64) -> Result<(), VirtioPciError> {
        for (i, evt) in self.kick_evts.iter().enumerate() {
            let addr = Self::notify_addr(bar, i);
            self.vm
                .register_ioeventfd(evt, addr)
                .map_err(|e| VirtioPciError::IoEventFd(addr, e))?;
        }
        Ok(())
    }

    fn unregister_ioeventfds(&self, bar: u64) {
        for (i, evt) in self.kick_evts.iter().enumerate() {
            let addr = Self::notify_addr(bar, i);
            if let Err(e) = self.vm.unregister_ioeventfd(evt, addr) {
                log::warn!("cannot unregister ioeventfd at {addr:#x}: {e}");
            }
        }
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Raise a configuration-change interrupt (e.g. after the backend came back).
    pub fn notify_config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.isr |= ISR_CONFIG_CHANGED;
        if self.config_vector != VIRTIO_MSI_NO_VECTOR {
            self.msix.trigger(self.config_vector);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_value(&mut self, field: CommonField) -> u64 {
        use CommonField::*;
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        match field {
            DeviceFeatureSelect => u64::from(self.device_feature_select),
            DeviceFeature => {
                let features = lock(&self.backend).features();
                match self.device_feature_select {
                    0 => features & 0xFFFF_FFFF,
                    1 => features >> 32,
                    _ => 0,
                }
            }
            DriverFeatureSelect => u64::from(self.driver_feature_select),
            DriverFeature => match self.driver_feature_select {
                0 => self.driver_features & 0xFFFF_FFFF,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            ConfigMsixVector => u64::from(self.config_vector),
            NumQueues => self.num_queues as u64,
            DeviceStatus => u64::from(self.status),
            ConfigGeneration => u64::from(self.config_generation),
            QueueSelect => u64::from(self.queue_select),
            QueueSize => q.map_or(0, |q| u64::from(q.size)),
            QueueMsixVector => q.map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| u64::from(q.vector)),
            QueueEnable => q.map_or(0, |q| u64::from(q.enabled)),
            QueueNotifyOff => {
                if q.is_some() {
                    u64::from(self.queue_select)
                } else {
                    0
                }
            }
            QueueDesc => q.map_or(0, |q| q.desc_table),
            QueueDriver => q.map_or(0, |q| q.avail_ring),
            QueueDevice => q.map_or(0, |q| q.used_ring),
            QueueNotifyData | QueueReset => 0,
        }
    }

    fn set_common_value(&mut self, field: CommonField, value: u64) {
        use CommonField::*;
        let driver_ok = self.status & STATUS_DRIVER_OK != 0;
        let features_ok = self.status & STATUS_FEATURES_OK != 0;
        match field {
            DeviceFeatureSelect => self.device_feature_select = value as u32,
            DriverFeatureSelect => self.driver_feature_select = value as u32,
            DriverFeature if !features_ok => match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xFFFF_FFFF) | value,
                1 => self.driver_features = (self.driver_features & 0xFFFF_FFFF) | (value << 32),
                _ => {}
            },
            ConfigMsixVector => self.config_vector = self.valid_vector(value as u16),
            DeviceStatus => self.set_status(value as u8),
            QueueSelect => self.queue_select = value as u16,
            QueueSize if !driver_ok => {
                let max = self.max_queue_size;
                let size = value as u16;
                // Split rings need a power of two; anything else is ignored and the driver
                // reads back the old size.
                if let Some(q) = self.selected_queue() {
                    if size.is_power_of_two() && size <= max {
                        q.size = size;
                    }
                }
            }
            QueueMsixVector => {
                let vector = self.valid_vector(value as u16);
                let index = usize::from(self.queue_select);
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let changed = q.vector != vector;
                q.vector = vector;
                let running = q.enabled && driver_ok;
                if changed && running {
                    let call = self.call_fd(vector);
                    match call {
                        Ok(fd) => lock(&self.backend).set_queue_call(index, fd),
                        Err(e) => log::error!("cannot duplicate call eventfd: {e}"),
                    }
                }
            }
            // Writing 0 is not allowed by the spec; once enabled a queue stays so until reset.
            QueueEnable if !driver_ok && value == 1 => {
                if let Some(q) = self.selected_queue() {
                    q.enabled = true;
                }
            }
            QueueDesc if !driver_ok => {
                if let Some(q) = self.selected_queue() {
                    q.desc_table = value;
                }
            }
            QueueDriver if !driver_ok => {
                if let Some(q) = self.selected_queue() {
                    q.avail_ring = value;
                }
            }
            QueueDevice if !driver_ok => {
                if let Some(q) = self.selected_queue() {
                    q.used_ring = value;
                }
            }
            _ => {}
        }
    }

    /// A vector number the table has, else NO_VECTOR (which tells the driver it failed).
    fn valid_vector(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.msix.len() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn call_fd(&self, vector: u16) -> std::io::Result<EventFd> {
        match self.msix.irqfd(vector) {
            Some(fd) => fd.try_clone(),
            None => self.unrouted_call.try_clone(),
        }
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = value;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = lock(&self.backend).features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                log::warn!(
                    "virtio-pci: driver features {:#x} not a subset of {:#x} or lack VERSION_1",
                    self.driver_features,
                    offered
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        // Keep bits the device set itself.
        new |= old & STATUS_DEVICE_NEEDS_RESET;
        self.status = new;
        let starting = new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0;
        if starting {
            if new & STATUS_FEATURES_OK == 0 {
                log::warn!("virtio-pci: DRIVER_OK without FEATURES_OK");
                self.needs_reset();
                return;
            }
            self.activate();
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.notify_config_changed();
    }

    fn queue_in_memory(&self, q: &QueueState) -> bool {
        let size = u64::from(q.size);
        let mem = self.mem.memory();
        let fits = |addr: u64, align: u64, len: u64| {
            addr.is_multiple_of(align)
                && usize::try_from(len).is_ok_and(|len| {
                    GuestMemoryBackend::check_range(&*mem, GuestAddress(addr), len)
                })
        };
        q.size.is_power_of_two()
            && q.size <= self.max_queue_size
            && fits(q.desc_table, 16, 16 * size)
            && fits(q.avail_ring, 2, 6 + 2 * size)
            && fits(q.used_ring, 4, 6 + 8 * size)
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.enabled {
                continue;
            }
            if !self.queue_in_memory(q) {
                log::warn!(
                    "virtio-pci: queue {index} (size {}, desc {:#x}, avail {:#x}, used {:#x}) is not in guest RAM",
                    q.size,
                    q.desc_table,
                    q.avail_ring,
                    q.used_ring
                );
                self.needs_reset();
                return;
            }
            let fds = self.kick_evts[index]
                .try_clone()
                .and_then(|kick| Ok((kick, self.call_fd(q.vector)?)));
            let (kick, call) = match fds {
                Ok(fds) => fds,
                Err(e) => {
                    log::error!("virtio-pci: cannot duplicate queue eventfds: {e}");
                    self.needs_reset();
                    return;
                }
            };
            queues.push(ActivatedQueue {
                config: QueueConfig {
                    index,
                    size: q.size,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                },
                kick,
                call,
            });
        }
        let result = lock(&self.backend).activate(self.driver_features, queues);
        if let Err(e) = result {
            log::error!("virtio-pci: {e}");
            self.needs_reset();
        }
    }

    fn reset(&mut self) {
        lock(&self.backend).reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.queue_select = 0;
        self.isr = 0;
        self.queues = vec![QueueState::new(self.max_queue_size); self.num_queues];
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((field, start, size)) = CommonField::at(offset) else {
            return;
        };
        let bytes = self.common_value(field).to_le_bytes();
        let from = (offset - start) as usize;
        let n = data.len().min(size - from);
        data[..n].copy_from_slice(&bytes[from..from + n]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let Some((field, start, size)) = CommonField::at(offset) else {
            return;
        };
        // Merge partial writes (the 64-bit fields come as two dwords) into the field value.
        let mut bytes = self.common_value(field).to_le_bytes();
        let from = (offset - start) as usize;
        let n = data.len().min(size - from);
        bytes[from..from + n].copy_from_slice(&data[..n]);
        let mut value = u64::from_le_bytes(bytes);
        if size < 8 {
            value &= (1u64 << (size * 8)) - 1;
        }
        // A 64-bit field written in halves must not look like a complete address halfway:
        // only the value matters at DRIVER_OK, so intermediate states are harmless.
        self.set_common_value(field, value);
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + REGION_SIZE => self.common_read(o - COMMON_OFFSET, data),
            o if (ISR_OFFSET..ISR_OFFSET + REGION_SIZE).contains(&o) => {
                data.fill(0);
                if o == ISR_OFFSET {
                    if let Some(b) = data.first_mut() {
                        // Reading ISR acknowledges it.
                        *b = std::mem::take(&mut self.isr);
                    }
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                lock(&self.backend).read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION_SIZE).contains(&o) => {
                self.msix.read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + REGION_SIZE).contains(&o) => {
                self.msix.read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + REGION_SIZE => self.common_write(o - COMMON_OFFSET, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                lock(&self.backend).write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                // Normally KVM's ioeventfd swallows these; this path covers accesses it does
                // not match.
                let queue = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(evt) = self.kick_evts.get(queue) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("cannot kick queue {queue}: {e}");
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + REGION_SIZE).contains(&o) => {
                self.msix.write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data)
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<BarMove> {
        let moves = self.config.write(offset, data);
        let control = self.msix_cap_offset + 2;
        if offset < control + 2 && offset.saturating_add(data.len()) > control {
            let value = self.config.read_u16(control);
            self.msix.set_control(value);
        }
        for m in &moves {
            if m.bar == 0 {
                self.unregister_ioeventfds(m.from);
                if let Err(e) = self.register_ioeventfds(m.to) {
                    // Kicks still reach the device through the MMIO exit path.
                    log::warn!("virtio-pci: {e}");
                }
                self.bar_addr = m.to;
            }
        }
        moves
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            self.bar0_read(offset, data)
        } else {
            data.fill(0)
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            self.bar0_write(offset, data)
        }
    }

    fn bars(&self) -> Vec<(usize, u64, u64)> {
        self.config
            .bar(0)
            .map(|(addr, size)| vec![(0, addr, size)])
            .unwrap_or_default()
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.unregister_ioeventfds(self.bar_addr);
        self.msix.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::tests::RecordingVm;
    use crate::virtio::{ActivateError, STATUS_ACKNOWLEDGE, STATUS_DRIVER};
    use std::os::unix::io::AsRawFd;

    #[derive(Default)]
    struct FakeBackend {
        activated: Option<(u64, Vec<ActivatedQueue>)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        calls: Vec<(usize, EventFd)>,
    }

    const FEATURES: u64 = 1 << VIRTIO_F_VERSION_1 | 1 << 1 | 1 << 9;

    impl VirtioBackend for FakeBackend {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            FEATURES
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config_writes.push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            features: u64,
            queues: Vec<ActivatedQueue>,
        ) -> Result<(), ActivateError> {
            self.activated = Some((features, queues));
            Ok(())
        }
        fn set_queue_call(&mut self, index: usize, call: EventFd) {
            self.calls.push((index, call));
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
    }

    const BAR: u32 = 0xC000_0000;

    struct Rig {
        vm: Arc<RecordingVm>,
        backend: Arc<Mutex<FakeBackend>>,
        dev: VirtioPciDevice,
    }

    fn rig() -> Rig {
        let vm = Arc::new(RecordingVm::default());
        let router = Arc::new(MsiRouter::new(vm.clone()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let backend = Arc::new(Mutex::new(FakeBackend::default()));
        let dev = VirtioPciDevice::new(backend.clone(), BAR, router, GuestMemoryAtomic::new(mem))
            .unwrap();
        Rig { vm, backend, dev }
    }

    fn w8(d: &mut VirtioPciDevice, off: u64, v: u8) {
        d.bar_write(0, off, &[v]);
    }
    fn w16(d: &mut VirtioPciDevice, off: u64, v: u16) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn w32(d: &mut VirtioPciDevice, off: u64, v: u32) {
        d.bar_write(0, off, &v.to_le_bytes());
    }
    fn r8(d: &mut VirtioPciDevice, off: u64) -> u8 {
        let mut b = [0u8; 1];
        d.bar_read(0, off, &mut b);
        b[0]
    }
    fn r16(d: &mut VirtioPciDevice, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.bar_read(0, off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r32(d: &mut VirtioPciDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    /// What Linux's virtio_pci_modern does up to DRIVER_OK, with queue 0 at `desc`.
    fn bring_up(d: &mut VirtioPciDevice, desc: u64) {
        w8(d, 0x14, STATUS_ACKNOWLEDGE);
        w8(d, 0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(d, 0x08, 0);
        w32(d, 0x0C, FEATURES as u32);
        w32(d, 0x08, 1);
        w32(d, 0x0C, (FEATURES >> 32) as u32);
        w8(
            d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w16(d, 0x16, 0);
        w16(d, 0x18, 128);
        w16(d, 0x1A, 1);
        w32(d, 0x20, desc as u32);
        w32(d, 0x24, (desc >> 32) as u32);
        w32(d, 0x28, (desc + 0x1000) as u32);
        w32(d, 0x2C, 0);
        w32(d, 0x30, (desc + 0x2000) as u32);
        w32(d, 0x34, 0);
        w16(d, 0x1C, 1);
        w8(
            d,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    #[test]
    fn pci_identity_and_capabilities() {
        let mut r = rig();
        let mut id = [0u8; 4];
        r.dev.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
        let mut rev = [0u8; 1];
        r.dev.config_read(8, &mut rev);
        assert_eq!(rev[0], 1);
        // Walk the capability list: MSI-X, then common, ISR, device, notify cfg types.
        let mut ptr = [0u8; 1];
        r.dev.config_read(0x34, &mut ptr);
        let mut seen = Vec::new();
        while ptr[0] != 0 {
            let off = ptr[0] as usize;
            let mut hdr = [0u8; 4];
            r.dev.config_read(off, &mut hdr);
            seen.push(if hdr[0] == CAP_ID_VENDOR {
                hdr[3]
            } else {
                hdr[0]
            });
            ptr[0] = hdr[1];
        }
        assert_eq!(seen, vec![0x11, 1, 3, 4, 2]);
        assert_eq!(r.dev.bars(), vec![(0, u64::from(BAR), BAR_SIZE)]);
        // One ioeventfd per queue at its notify address.
        let io = lock(&r.vm.ioeventfds).clone();
        let addrs: Vec<u64> = io.iter().map(|e| e.1).collect();
        assert_eq!(addrs, vec![0xC000_3000, 0xC000_3004]);
    }

    #[test]
    fn feature_negotiation_and_driver_ok_activate_backend() {
        let mut r = rig();
        assert_eq!(r16(&mut r.dev, 0x12), 2);
        w32(&mut r.dev, 0x00, 1);
        assert_eq!(r32(&mut r.dev, 0x04), 1);
        w32(&mut r.dev, 0x00, 0);
        assert_eq!(r32(&mut r.dev, 0x04), FEATURES as u32);
        assert_eq!(r16(&mut r.dev, 0x18), 256);
        bring_up(&mut r.dev, 0x1000);
        assert_eq!(r8(&mut r.dev, 0x14) & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
        let b = lock(&r.backend);
        let (features, queues) = b.activated.as_ref().unwrap();
        assert_eq!(*features, FEATURES);
        assert_eq!(queues.len(), 1);
        assert_eq!(
            queues[0].config,
            QueueConfig {
                index: 0,
                size: 128,
                desc_table: 0x1000,
                avail_ring: 0x2000,
                used_ring: 0x3000
            }
        );
        // The call fd is a duplicate of vector 1's irqfd.
        assert_ne!(
            queues[0].call.as_raw_fd(),
            r.dev.msix.irqfd(1).unwrap().as_raw_fd()
        );
        r.dev.msix.irqfd(1).unwrap().write(1).unwrap();
        assert_eq!(queues[0].call.read().unwrap(), 1);
    }

    #[test]
    fn features_beyond_offer_fail_features_ok() {
        let mut r = rig();
        w8(&mut r.dev, 0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut r.dev, 0x08, 0);
        w32(&mut r.dev, 0x0C, 1 << 5);
        w32(&mut r.dev, 0x08, 1);
        w32(&mut r.dev, 0x0C, 1);
        w8(
            &mut r.dev,
            0x14,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r8(&mut r.dev, 0x14) & STATUS_FEATURES_OK, 0);
        // Without VERSION_1 as well.
        let mut r = rig();
        w32(&mut r.dev, 0x08, 0);
        w32(&mut r.dev, 0x0C, 1 << 1);
        w8(&mut r.dev, 0x14, STATUS_FEATURES_OK);
        assert_eq!(r8(&mut r.dev, 0x14) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn reset_stops_backend_and_clears_state() {
        let mut r = rig();
        bring_up(&mut r.dev, 0x1000);
        w8(&mut r.dev, 0x14, 0);
        assert_eq!(r8(&mut r.dev, 0x14), 0);
        assert_eq!(lock(&r.backend).resets, 1);
        assert!(lock(&r.backend).activated.is_none());
        assert_eq!(r16(&mut r.dev, 0x1C), 0);
        assert_eq!(r16(&mut r.dev, 0x1A), VIRTIO_MSI_NO_VECTOR);
        assert_eq!(r16(&mut r.dev, 0x18), 256);
    }

    #[test]
    fn queue_outside_ram_sets_needs_reset_instead_of_activating() {
        let mut r = rig();
        bring_up(&mut r.dev, 0xFFFF_0000);
        assert!(lock(&r.backend).activated.is_none());
        assert_ne!(r8(&mut r.dev, 0x14) & STATUS_DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn invalid_queue_registers_are_refused() {
        let mut r = rig();
        w16(&mut r.dev, 0x18, 100);
        assert_eq!(r16(&mut r.dev, 0x18), 256);
        w16(&mut r.dev, 0x18, 512);
        assert_eq!(r16(&mut r.dev, 0x18), 256);
        w16(&mut r.dev, 0x18, 0);
        assert_eq!(r16(&mut r.dev, 0x18), 256);
        // Vector beyond the table reads back NO_VECTOR.
        w16(&mut r.dev, 0x1A, 3);
        assert_eq!(r16(&mut r.dev, 0x1A), VIRTIO_MSI_NO_VECTOR);
        w16(&mut r.dev, 0x10, 0x7FFF);
        assert_eq!(r16(&mut r.dev, 0x10), VIRTIO_MSI_NO_VECTOR);
        w16(&mut r.dev, 0x1A, 2);
        assert_eq!(r16(&mut r.dev, 0x1A), 2);
        // Selecting a queue that does not exist: size 0, writes ignored.
        w16(&mut r.dev, 0x16, 9);
        assert_eq!(r16(&mut r.dev, 0x18), 0);
        w16(&mut r.dev, 0x18, 64);
        w16(&mut r.dev, 0x1C, 1);
        assert_eq!(r16(&mut r.dev, 0x1C), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut r = rig();
        for off in [
            0u64,
            1,
            3,
            0x13,
            0x37,
            0x3B,
            0x3C,
            0xFFF,
            0x1001,
            0x2FFF,
            0x3FFF,
            0x4FFF,
            0x5FFF,
            0x7FFF,
            0x8000,
            u64::MAX,
        ] {
            for len in [1usize, 2, 3, 4, 8, 16] {
                let mut buf = vec![0u8; len];
                r.dev.bar_read(0, off, &mut buf);
                r.dev.bar_write(0, off, &buf);
                r.dev.bar_read(3, off, &mut buf);
                r.dev.bar_write(3, off, &buf);
            }
        }
        r.dev.config_write(0xFF, &[0xFF; 4]);
    }

    #[test]
    fn notify_writes_kick_queue_eventfd() {
        let mut r = rig();
        w16(&mut r.dev, NOTIFY_OFFSET + 4, 1);
        assert_eq!(r.dev.kick_evts[1].read().unwrap(), 1);
    }

    #[test]
    fn device_config_goes_to_backend() {
        let mut r = rig();
        assert_eq!(r8(&mut r.dev, DEVICE_CFG_OFFSET + 5), 5);
        w16(&mut r.dev, DEVICE_CFG_OFFSET + 8, 0xABCD);
        assert_eq!(lock(&r.backend).config_writes, vec![(8, vec![0xCD, 0xAB])]);
    }

    #[test]
    fn msix_enable_through_config_space_and_bar_move_moves_ioeventfds() {
        let mut r = rig();
        let cap = r.dev.msix_cap_offset;
        // Program vector 0 unmasked, then enable MSI-X via message control.
        w32(&mut r.dev, MSIX_TABLE_OFFSET, 0xFEE0_0000);
        w32(&mut r.dev, MSIX_TABLE_OFFSET + 8, 0x31);
        w32(&mut r.dev, MSIX_TABLE_OFFSET + 12, 0);
        assert!(lock(&r.vm.irqfds).is_empty());
        r.dev.config_write(cap + 2, &0x8000u16.to_le_bytes());
        assert_eq!(lock(&r.vm.irqfds).len(), 1);

        let moves = r.dev.config_write(0x10, &0xD000_0000u32.to_le_bytes());
        assert_eq!(moves.len(), 1);
        let addrs: Vec<u64> = lock(&r.vm.ioeventfds).iter().map(|e| e.1).collect();
        assert_eq!(addrs, vec![0xD000_3000, 0xD000_3004]);
    }

    #[test]
    fn vector_change_on_running_queue_reaches_backend() {
        let mut r = rig();
        bring_up(&mut r.dev, 0x1000);
        w16(&mut r.dev, 0x16, 0);
        w16(&mut r.dev, 0x1A, 2);
        assert_eq!(lock(&r.backend).calls.len(), 1);
        assert_eq!(lock(&r.backend).calls[0].0, 0);
    }
}

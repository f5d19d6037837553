//! Virtio devices as the guest sees them: the modern virtio-pci transport
//! ([`VirtioPciDevice`]) in front of a [`VirtioBackend`] that does the device work (here
//! always a vhost-user daemon, see [`crate::vhost_user`]).
//!
//! The transport owns the guest-visible registers (common configuration, notification, ISR,
//! MSI-X); the backend gets the negotiated features and, at DRIVER_OK, the queues with their
//! kick eventfd (a KVM ioeventfd on the queue's notify address) and call eventfd (the irqfd of
//! the queue's MSI-X vector). After that the data path is guest <-> KVM <-> backend only.

pub mod pci_transport;

pub use pci_transport::{VirtioPciDevice, VirtioPciError};

use vmm_sys_util::eventfd::EventFd;

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device IDs are this plus the virtio device ID.
pub const VIRTIO_PCI_MODERN_DEVICE_ID_BASE: u16 = 0x1040;

/// Virtio device ID: network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// Virtio device ID: block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Virtio device ID: console.
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// Virtio device ID: file system (virtio-fs).
pub const VIRTIO_ID_FS: u32 = 26;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver for it.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is set up and the device may run.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
/// Device status: the driver gave up on the device.
pub const STATUS_FAILED: u8 = 0x80;

/// Feature bit: indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event index suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Feature bit: virtio 1.x device (mandatory for the modern transport).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: buffers are used in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;

/// Transport feature bits (24..) the VMM's transport can honour. Everything else above bit 23
/// is withheld from the guest: no IOMMU (ACCESS_PLATFORM), no packed ring (reconnect reads
/// the split used ring), no notification data, no per-queue reset, no SR-IOV, no admin queue.
pub const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_F_IN_ORDER);
/// Device-specific feature bits (0..23) pass through unless a device filters them.
pub const DEVICE_FEATURES_MASK: u64 = (1 << 24) - 1;

/// Where a queue's rings are in guest memory, as the driver programmed them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue index.
    pub index: usize,
    /// Number of descriptors (a power of two).
    pub size: u16,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available (driver) ring.
    pub avail_ring: u64,
    /// Guest physical address of the used (device) ring.
    pub used_ring: u64,
}

/// A queue handed to the backend at DRIVER_OK.
#[derive(Debug)]
pub struct ActivatedQueue {
    /// The rings.
    pub config: QueueConfig,
    /// Signalled by KVM when the guest writes the queue's notify address.
    pub kick: EventFd,
    /// Raises the queue's MSI-X vector in KVM when written.
    pub call: EventFd,
}

/// Errors a backend reports when the driver starts it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The backend refused the queues or features.
    #[error("device backend refused activation: {0}")]
    Backend(String),
}

/// The device behind a virtio transport.
pub trait VirtioBackend: Send {
    /// Virtio device ID.
    fn device_type(&self) -> u32;
    /// Number of queues the device exposes.
    fn num_queues(&self) -> usize;
    /// Largest queue size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// Feature bits offered to the driver (VERSION_1 included).
    fn features(&self) -> u64;
    /// Read the device-specific configuration space (anything beyond it reads as zero).
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device with the driver's features and its enabled queues.
    fn activate(&mut self, features: u64, queues: Vec<ActivatedQueue>)
        -> Result<(), ActivateError>;
    /// The driver moved a running queue to another MSI-X vector.
    fn set_queue_call(&mut self, index: usize, call: EventFd);
    /// The driver reset the device: stop all queues.
    fn reset(&mut self);
}

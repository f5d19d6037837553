//! MSI-X delivery through KVM without the VMM on the data path.
//!
//! Every MSI-X vector of every device owns a KVM GSI (from [`FIRST_MSI_GSI`] up) and an eventfd
//! registered as that GSI's irqfd. The eventfd is handed to the vhost-user daemon as the
//! queue's call fd, so a completion interrupt goes daemon -> eventfd -> KVM -> guest vCPU.
//!
//! Masking: a masked vector (or a disabled / function-masked MSI-X capability) has its irqfd
//! detached from KVM. Signals the daemon sends meanwhile accumulate in the eventfd counter, the
//! PBA reports them (the eventfd is readable), and re-attaching the irqfd on unmask makes KVM
//! inject the pending one at once. That is the MSI-X pending-bit semantic Linux relies on.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, so every commit re-states the
//! default irqchip routes for GSIs 0..23 (PIC + IOAPIC) that the legacy devices (serial on GSI
//! 4) depend on, followed by all MSI routes of all devices.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// GSIs below this one are the legacy irqchip pins (PIC 0..15, IOAPIC 0..23).
pub const FIRST_MSI_GSI: u32 = 24;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES); the 40 irqchip entries count too.
const MAX_ROUTES: usize = 4096;
/// Number of routing entries the default irqchip routes take: GSIs 0..15 are routed to both
/// the PIC and the IOAPIC, GSIs 16..23 to the IOAPIC only.
const IRQCHIP_ROUTES: usize = 16 * 2 + 8;
/// MSI writes must target the local APIC window; anything else is a guest error.
const MSI_ADDRESS_MASK: u64 = 0xFFF0_0000;
const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;

/// Errors of interrupt setup.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// All GSIs usable for MSI routes are taken.
    #[error("no free GSI left for {0} MSI vectors")]
    OutOfGsis(usize),
    /// An eventfd could not be created.
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// KVM rejected the routing table.
    #[error("cannot set the KVM GSI routing table: {0}")]
    SetRouting(#[source] io::Error),
    /// KVM rejected an irqfd (un)registration.
    #[error("cannot (un)register irqfd for GSI {0}: {1}")]
    Irqfd(u32, #[source] io::Error),
}

/// One MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high dwords).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// Whether the message targets the local APIC window, i.e. can be delivered at all.
    pub fn is_deliverable(&self) -> bool {
        self.address & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE
    }
}

/// The hypervisor operations the device side needs. KVM implements them ([`KvmVm`]); unit
/// tests substitute a recorder so that transport logic is tested without /dev/kvm.
pub trait VmInterface: Send + Sync {
    /// Replace the MSI part of the routing table by `routes` (GSI, message).
    fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> io::Result<()>;
    /// Make writes to `fd` inject `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Undo [`VmInterface::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Make guest writes (any size) to MMIO address `addr` signal `fd` without a VM exit.
    fn register_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Undo [`VmInterface::register_ioeventfd`].
    fn unregister_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}

/// [`VmInterface`] on a KVM VM with an in-kernel irqchip.
pub struct KvmVm {
    vm_fd: Arc<VmFd>,
}

impl KvmVm {
    /// Wrap the VM's fd.
    pub fn new(vm_fd: Arc<VmFd>) -> Self {
        KvmVm { vm_fd }
    }
}

fn kvm_err(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

/// The routes KVM installs by itself at KVM_CREATE_IRQCHIP, which a table replace must keep.
fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut routes = Vec::with_capacity(IRQCHIP_ROUTES);
    for gsi in 0..24u32 {
        routes.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(irqchip_route(gsi, chip, gsi % 8));
        }
    }
    routes
}

impl VmInterface for KvmVm {
    fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> io::Result<()> {
        let mut entries = default_irqchip_routes();
        for (gsi, msg) in routes {
            let mut entry = kvm_irq_routing_entry {
                gsi: *gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = msg.address as u32;
            entry.u.msi.address_hi = (msg.address >> 32) as u32;
            entry.u.msi.data = msg.data;
            entries.push(entry);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table too large: {e:?}")))?;
        self.vm_fd.set_gsi_routing(&table).map_err(kvm_err)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm_fd.register_irqfd(fd, gsi).map_err(kvm_err)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm_fd.unregister_irqfd(fd, gsi).map_err(kvm_err)
    }

    fn register_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm_fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err)
    }

    fn unregister_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm_fd
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_err)
    }
}

/// Locks a mutex even if another thread panicked while holding it: the state it guards is
/// plain data that stays consistent between our statements, and a VMM must keep serving.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct RouterState {
    next_gsi: u32,
    routes: BTreeMap<u32, MsiMessage>,
}

/// The VM-wide MSI routing table, shared by all devices.
pub struct MsiRouter {
    vm: Arc<dyn VmInterface>,
    state: Mutex<RouterState>,
}

impl MsiRouter {
    /// A router with no MSI routes yet.
    pub fn new(vm: Arc<dyn VmInterface>) -> Self {
        MsiRouter {
            vm,
            state: Mutex::new(RouterState {
                next_gsi: FIRST_MSI_GSI,
                routes: BTreeMap::new(),
            }),
        }
    }

    /// The hypervisor this router programs.
    pub fn vm(&self) -> &Arc<dyn VmInterface> {
        &self.vm
    }

    /// Reserve `count` consecutive GSIs and return the first.
    fn allocate(&self, count: usize) -> Result<u32, InterruptError> {
        let mut state = lock(&self.state);
        let used = (state.next_gsi - FIRST_MSI_GSI) as usize + IRQCHIP_ROUTES;
        if used + count > MAX_ROUTES {
            return Err(InterruptError::OutOfGsis(count));
        }
        let first = state.next_gsi;
        state.next_gsi += count as u32;
        Ok(first)
    }

    /// Point `gsi` at `msg`, or remove its route (`None`); commits the table if it changed.
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut state = lock(&self.state);
        let changed = match msg {
            Some(m) => state.routes.insert(gsi, m) != Some(m),
            None => state.routes.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let routes: Vec<(u32, MsiMessage)> = state.routes.iter().map(|(g, m)| (*g, *m)).collect();
        self.vm
            .set_msi_routes(&routes)
            .map_err(InterruptError::SetRouting)
    }
}

struct MsiVector {
    gsi: u32,
    irqfd: EventFd,
    /// Whether `irqfd` is currently attached to KVM.
    attached: bool,
}

/// The MSI vectors of one device: one GSI and one irqfd each.
pub struct MsiVectors {
    router: Arc<MsiRouter>,
    vectors: Vec<MsiVector>,
}

impl MsiVectors {
    /// Allocate `count` vectors (GSIs + eventfds); none delivers until [`MsiVectors::update`].
    pub fn new(router: Arc<MsiRouter>, count: usize) -> Result<Self, InterruptError> {
        let first = router.allocate(count)?;
        let mut vectors = Vec::with_capacity(count);
        for i in 0..count {
            vectors.push(MsiVector {
                gsi: first + i as u32,
                irqfd: EventFd::new(EFD_NONBLOCK).map_err(InterruptError::EventFd)?,
                attached: false,
            });
        }
        Ok(MsiVectors { router, vectors })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The eventfd that raises vector `index` (to be used as a vhost-user call fd).
    pub fn irqfd(&self, index: usize) -> Option<&EventFd> {
        self.vectors.get(index).map(|v| &v.irqfd)
    }

    /// The GSI of vector `index`.
    pub fn gsi(&self, index: usize) -> Option<u32> {
        self.vectors.get(index).map(|v| v.gsi)
    }

    /// Apply the guest's view of vector `index`: deliver `msg` when `deliver` (enabled and
    /// unmasked), else hold signals pending in the eventfd.
    pub fn update(
        &mut self,
        index: usize,
        msg: MsiMessage,
        deliver: bool,
    ) -> Result<(), InterruptError> {
        let Some(vector) = self.vectors.get_mut(index) else {
            return Ok(());
        };
        let vm = self.router.vm();
        if deliver && msg.is_deliverable() {
            // Route first so that a pending signal injected on attach goes to the new target.
            self.router.set_route(vector.gsi, Some(msg))?;
            if !vector.attached {
                vm.register_irqfd(&vector.irqfd, vector.gsi)
                    .map_err(|e| InterruptError::Irqfd(vector.gsi, e))?;
                vector.attached = true;
            }
        } else if vector.attached {
            vm.unregister_irqfd(&vector.irqfd, vector.gsi)
                .map_err(|e| InterruptError::Irqfd(vector.gsi, e))?;
            vector.attached = false;
        }
        Ok(())
    }

    /// Whether vector `index` has a signal held back (the PBA bit).
    pub fn is_pending(&self, index: usize) -> bool {
        match self.vectors.get(index) {
            Some(v) if !v.attached => fd_readable(&v.irqfd),
            _ => false,
        }
    }

    /// Raise vector `index` from the VMM itself (e.g. a configuration change).
    pub fn trigger(&self, index: usize) {
        if let Some(v) = self.vectors.get(index) {
            if let Err(e) = v.irqfd.write(1) {
                log::warn!("cannot signal MSI vector {index}: {e}");
            }
        }
    }

    /// Detach every irqfd and drop the routes (device going away).
    pub fn release(&mut self) {
        for v in self.vectors.iter_mut() {
            if v.attached {
                if let Err(e) = self.router.vm().unregister_irqfd(&v.irqfd, v.gsi) {
                    log::warn!("cannot unregister irqfd of GSI {}: {e}", v.gsi);
                }
                v.attached = false;
            }
            if let Err(e) = self.router.set_route(v.gsi, None) {
                log::warn!("{e}");
            }
        }
    }
}

/// Whether an eventfd has a non-zero counter, without consuming it.
pub(crate) fn fd_readable(fd: &EventFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd array of length 1 for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::io::RawFd;

    /// Records what the device side asked of the hypervisor.
    #[derive(Default)]
    pub struct RecordingVm {
        pub routes: Mutex<Vec<(u32, MsiMessage)>>,
        pub route_commits: Mutex<usize>,
        pub irqfds: Mutex<Vec<(RawFd, u32)>>,
        pub ioeventfds: Mutex<Vec<(RawFd, u64)>>,
    }

    impl VmInterface for RecordingVm {
        fn set_msi_routes(&self, routes: &[(u32, MsiMessage)]) -> io::Result<()> {
            *lock(&self.routes) = routes.to_vec();
            *lock(&self.route_commits) += 1;
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            lock(&self.irqfds).push((fd.as_raw_fd(), gsi));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            let mut v = lock(&self.irqfds);
            let before = v.len();
            v.retain(|e| *e != (fd.as_raw_fd(), gsi));
            if v.len() == before {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            Ok(())
        }
        fn register_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut v = lock(&self.ioeventfds);
            if v.iter().any(|e| e.1 == addr) {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            v.push((fd.as_raw_fd(), addr));
            Ok(())
        }
        fn unregister_ioeventfd(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut v = lock(&self.ioeventfds);
            let before = v.len();
            v.retain(|e| *e != (fd.as_raw_fd(), addr));
            if v.len() == before {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            Ok(())
        }
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xFEE0_0000,
        data: 0x41,
    };

    #[test]
    fn default_routes_cover_pic_and_ioapic() {
        let routes = default_irqchip_routes();
        assert_eq!(routes.len(), IRQCHIP_ROUTES);
        // The serial port's GSI 4 must reach both interrupt controllers.
        let gsi4: Vec<_> = routes.iter().filter(|r| r.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2);
        // SAFETY: irqchip routes were built with the irqchip member of the union.
        let chips: Vec<u32> = gsi4
            .iter()
            .map(|r| unsafe { r.u.irqchip.irqchip })
            .collect();
        assert!(chips.contains(&KVM_IRQCHIP_IOAPIC) && chips.contains(&KVM_IRQCHIP_PIC_MASTER));
        assert!(routes.iter().all(|r| r.gsi < FIRST_MSI_GSI));
    }

    #[test]
    fn vectors_get_distinct_gsis_from_24() {
        let vm = Arc::new(RecordingVm::default());
        let router = Arc::new(MsiRouter::new(vm));
        let a = MsiVectors::new(router.clone(), 3).unwrap();
        let b = MsiVectors::new(router, 2).unwrap();
        assert_eq!(a.gsi(0), Some(24));
        assert_eq!(a.gsi(2), Some(26));
        assert_eq!(b.gsi(0), Some(27));
        assert_eq!(b.gsi(2), None);
    }

    #[test]
    fn gsi_exhaustion_is_an_error() {
        let vm = Arc::new(RecordingVm::default());
        let router = Arc::new(MsiRouter::new(vm));
        assert!(MsiVectors::new(router.clone(), MAX_ROUTES).is_err());
        assert!(MsiVectors::new(router, MAX_ROUTES - IRQCHIP_ROUTES).is_ok());
    }

    #[test]
    fn unmask_routes_and_attaches_mask_detaches_and_holds_pending() {
        let vm = Arc::new(RecordingVm::default());
        let router = Arc::new(MsiRouter::new(vm.clone()));
        let mut v = MsiVectors::new(router, 2).unwrap();

        v.update(1, MSG, true).unwrap();
        assert_eq!(*lock(&vm.routes), vec![(25, MSG)]);
        assert_eq!(lock(&vm.irqfds).len(), 1);
        // Same message again: no new routing commit, no double attach.
        let commits = *lock(&vm.route_commits);
        v.update(1, MSG, true).unwrap();
        assert_eq!(*lock(&vm.route_commits), commits);
        assert_eq!(lock(&vm.irqfds).len(), 1);

        v.update(1, MSG, false).unwrap();
        assert!(lock(&vm.irqfds).is_empty());
        assert!(!v.is_pending(1));
        v.irqfd(1).unwrap().write(1).unwrap();
        assert!(v.is_pending(1));
        // Attached vectors never report pending: KVM delivers them.
        v.update(1, MSG, true).unwrap();
        assert!(!v.is_pending(1));
    }

    #[test]
    fn message_outside_lapic_window_is_not_delivered() {
        let vm = Arc::new(RecordingVm::default());
        let router = Arc::new(MsiRouter::new(vm.clone()));
        let mut v = MsiVectors::new(router, 1).unwrap();
        let bogus = MsiMessage {
            address: 0x1000,
            data: 0,
        };
        v.update(0, bogus, true).unwrap();
        assert!(lock(&vm.irqfds).is_empty());
        assert!(lock(&vm.routes).is_empty());
        // Out-of-range vector index is ignored.
        v.update(7, MSG, true).unwrap();
        assert!(lock(&vm.irqfds).is_empty());
    }
}

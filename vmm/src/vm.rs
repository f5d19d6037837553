//! The VM and the thread that owns it.
//!
//! [`Vm`] is one boot of the guest: KVM VM, guest RAM, buses, legacy devices, vhost-user
//! devices, vCPU threads and, when the configuration allows growth, ACPI hot-plug. [`Vmm`]
//! owns the configuration and the current `Vm` on one thread and serves [`VmMessage`]s: API
//! requests (each with a reply channel, checked against [`crate::api::state`]) and guest
//! events from vCPU threads and devices. Anyone else (the HTTP API thread, signal handlers,
//! tests) holds a [`VmHandle`]: the sending half of the channel plus an eventfd that wakes the
//! VM thread's epoll loop, which also watches the device manager's fds and stdin for the
//! serial console.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{kvm_clock_data, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::state::{self as api_state, VmAction};
use crate::api::{ApiError, ApiRequest, ApiResponse, VmInfo, VmResize, VmState, VmmPingResponse};
use crate::boot::{self, regs, BootEntry, BootError};
use crate::bus::{Bus, BusDevice};
use crate::config::{SerialMode, VmConfig};
use crate::devices::legacy::{
    i8042, AcpiPm, Cmos, PostPort, PowerEvent, PowerEventSink, Serial, I8042,
};
use crate::hotplug::{self, HotplugController, HotplugLayout, HotplugState};
use crate::layout;
use crate::memory::{GuestMemoryMmap, GuestRam, MemoryError};
use crate::vcpu::{VcpuContext, VcpuEvent, VcpuHandle};
use crate::vhost_user::{attach_devices, DeviceError, DeviceManager};

/// When the process started (set by `main`), for the start-up time measurement.
pub static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// What A2's device side gets to attach devices to the VM.
pub struct DeviceContext {
    /// The KVM VM (irqfds, ioeventfds, GSI routes).
    pub vm_fd: Arc<VmFd>,
    /// Guest RAM (memfd-backed regions).
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Port I/O bus (PCI config ports go here).
    pub pio_bus: Arc<Bus>,
    /// MMIO bus (BARs go here).
    pub mmio_bus: Arc<Bus>,
}

/// Errors building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing or unusable.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM call failed.
    #[error("{0}: {1}")]
    KvmCall(&'static str, #[source] kvm_ioctls::Error),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initramfs or boot data could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU register setup failed.
    #[error("vCPU {0}: {1}")]
    VcpuSetup(u8, #[source] regs::RegsError),
    /// A vCPU thread could not be started.
    #[error("cannot start vCPU thread {0}: {1}")]
    VcpuThread(u8, #[source] io::Error),
    /// A legacy device could not be registered.
    #[error("cannot set up {0}: {1}")]
    Device(&'static str, String),
    /// vhost-user devices could not be attached.
    #[error("cannot attach devices: {0}")]
    Devices(#[from] DeviceError),
    /// The serial output file could not be opened.
    #[error("cannot open serial output {0}: {1}")]
    SerialFile(std::path::PathBuf, #[source] io::Error),
    /// The VM thread's event loop failed.
    #[error("VM event loop: {0}")]
    EventLoop(#[source] io::Error),
    /// A vCPU hit an error the guest cannot continue after.
    #[error("vCPU {0} stopped: {1}")]
    Guest(u8, String),
}

/// How the VM ended; [`ExitStatus::code`] is the process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest powered off (status 0).
    PowerOff,
    /// The guest rebooted and `--no-reboot` was given (status 2).
    Reset,
    /// Shut down by request: API or SIGTERM/SIGINT/SIGHUP (status 0).
    Shutdown,
}

impl ExitStatus {
    /// Process exit status.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::PowerOff | ExitStatus::Shutdown => 0,
            ExitStatus::Reset => 2,
        }
    }
}

/// What the VM thread receives.
pub enum VmMessage {
    /// A request and where to send the reply.
    Api(ApiRequest, Sender<Result<ApiResponse, ApiError>>),
    /// A vCPU stopped on its own.
    Vcpu(u8, VcpuEvent),
    /// A device asked to power off or reset.
    Power(PowerEvent),
}

/// Sending side of the VM thread's channel; cheap to clone.
#[derive(Clone)]
pub struct VmHandle {
    tx: Sender<VmMessage>,
    wake: Arc<EventFd>,
}

/// Create a channel to a VM thread: the handle and what the VM thread receives.
pub fn channel_pair() -> io::Result<(VmHandle, Receiver<VmMessage>, Arc<EventFd>)> {
    let (tx, rx) = channel();
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    Ok((
        VmHandle {
            tx,
            wake: wake.clone(),
        },
        rx,
        wake,
    ))
}

impl VmHandle {
    /// Post a message and wake the VM thread.
    pub fn post(&self, msg: VmMessage) -> Result<(), ApiError> {
        self.tx.send(msg).map_err(|_| ApiError::Gone)?;
        self.wake.write(1).map_err(|_| ApiError::Gone)
    }

    /// Send a request and wait for its reply.
    pub fn request(&self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        let (tx, rx) = channel();
        self.post(VmMessage::Api(req, tx))?;
        rx.recv().map_err(|_| ApiError::Gone)?
    }

    fn power_sink(&self) -> PowerEventSink {
        let h = self.clone();
        Box::new(move |e| {
            // The VM thread being gone means the VM is ending anyway.
            let _ = h.post(VmMessage::Power(e));
        })
    }
}

/// One boot of the guest.
pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    devices: Option<DeviceManager>,
    serial: Option<Arc<Mutex<Serial>>>,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    kvm: Kvm,
    cpus: u8,
    paused: bool,
    /// kvmclock saved by [`Vm::pause`], restored by [`Vm::resume`].
    clock: Option<kvm_clock_data>,
    /// vCPU count the CPUID topology describes (`max_cpus` with hot-plug).
    max_cpus: u8,
    /// RAM is backed by huge pages (hot-plugged blocks too).
    hugepages: bool,
    /// What creating a vCPU needs after boot (set by [`Vm::start`]).
    vcpu_setup: Option<VcpuSetup>,
    /// ACPI hot-plug, when the configuration allows growth.
    hotplug: Option<VmHotplug>,
}

struct VcpuSetup {
    supported: kvm_bindings::CpuId,
    events: crate::vcpu::VcpuEventSink,
}

struct VmHotplug {
    layout: HotplugLayout,
    state: Arc<Mutex<HotplugState>>,
    ged: EventFd,
    /// RAM blocks already mapped and given to KVM and the daemons.
    mapped: Vec<bool>,
}

/// KVM memory slot of the first hot-plug RAM block (boot RAM uses the slots below).
const FIRST_HOTPLUG_SLOT: u32 = 8;

/// Why a running VM could not be resized.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The configuration did not leave room for it.
    #[error("{0} cannot grow beyond the boot size: the VM was created without {1}")]
    NoHotplug(&'static str, &'static str),
    /// The request is out of range.
    #[error("{0}")]
    Invalid(String),
    /// Not possible with this VMM.
    #[error("{0}")]
    NotSupported(String),
    /// A KVM or device call failed.
    #[error("{0}")]
    Failed(String),
}

impl From<ResizeError> for ApiError {
    fn from(e: ResizeError) -> Self {
        match e {
            ResizeError::NoHotplug(..) | ResizeError::Invalid(_) => {
                ApiError::InvalidConfig(e.to_string())
            }
            ResizeError::NotSupported(m) => ApiError::NotSupported(m),
            ResizeError::Failed(m) => ApiError::Failed(m),
        }
    }
}

fn insert(
    bus: &Bus,
    dev: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    len: u64,
    what: &'static str,
) -> Result<(), VmError> {
    bus.insert(dev, base, len)
        .map_err(|e| VmError::Device(what, e.to_string()))
}

impl Vm {
    /// A VM with RAM, in-kernel irqchip and PIT, and the legacy devices; no vCPUs yet.
    /// `serial_out` None: no serial port at all.
    pub fn create(
        cpus: u8,
        memory: u64,
        hugepages: bool,
        handle: &VmHandle,
        serial_out: Option<Option<Box<dyn Write + Send>>>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| VmError::KvmCall("KVM_CREATE_VM", e))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(|e| VmError::KvmCall("KVM_SET_TSS_ADDR", e))?;
        vm_fd
            .create_irq_chip()
            .map_err(|e| VmError::KvmCall("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(|e| VmError::KvmCall("KVM_CREATE_PIT2", e))?;
        let ram = GuestRam::new(memory, hugepages)?;
        ram.register(&vm_fd)?;

        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let serial = match serial_out {
            Some(out) => {
                let irq = EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| VmError::Device("the serial port", e.to_string()))?;
                vm_fd
                    .register_irqfd(&irq, layout::SERIAL_GSI)
                    .map_err(|e| VmError::KvmCall("KVM_IRQFD (serial)", e))?;
                let serial = Arc::new(Mutex::new(Serial::new(out, irq)));
                insert(&pio_bus, serial.clone(), 0x3f8, 8, "the serial port")?;
                Some(serial)
            }
            None => None,
        };
        insert(
            &pio_bus,
            Arc::new(Mutex::new(I8042::new(handle.power_sink()))),
            i8042::DATA_PORT,
            i8042::COMMAND_PORT - i8042::DATA_PORT + 1,
            "the i8042 controller",
        )?;
        insert(
            &pio_bus,
            Arc::new(Mutex::new(Cmos::default())),
            0x70,
            2,
            "the CMOS clock",
        )?;
        insert(
            &pio_bus,
            Arc::new(Mutex::new(PostPort)),
            0x80,
            1,
            "port 0x80",
        )?;
        let pm = Arc::new(Mutex::new(AcpiPm::new(
            u64::from(layout::PM1A_EVT_PORT),
            handle.power_sink(),
        )));
        insert(
            &pio_bus,
            pm.clone(),
            u64::from(layout::PM1A_EVT_PORT),
            4,
            "ACPI PM1 event",
        )?;
        insert(
            &pio_bus,
            pm,
            u64::from(layout::PM1A_CNT_PORT),
            2,
            "ACPI PM1 control",
        )?;

        Ok(Self {
            vcpus: Vec::new(),
            devices: None,
            serial,
            pio_bus,
            mmio_bus,
            vm_fd: Arc::new(vm_fd),
            ram,
            kvm,
            cpus,
            paused: false,
            clock: None,
            max_cpus: cpus,
            hugepages,
            vcpu_setup: None,
            hotplug: None,
        })
    }

    /// Build the VM `config` describes and start its vCPUs.
    pub fn boot(
        config: &VmConfig,
        handle: &VmHandle,
        serial_out: Option<Option<Box<dyn Write + Send>>>,
    ) -> Result<Self, VmError> {
        let mut vm = Self::create(
            config.cpus,
            config.memory,
            config.hugepages,
            handle,
            serial_out,
        )?;
        let layout = HotplugLayout::new(config);
        if layout.enabled() {
            vm.enable_hotplug(layout.clone())?;
        }
        // Even without devices: the PCI root brings the host bridge and config ports.
        vm.devices = Some(attach_devices(&vm.device_context(), &config.devices)?);
        let entry = boot::load_linux(
            &vm.memory(),
            &vm.ram.ranges,
            &config.kernel,
            config.initramfs.as_deref(),
            &config.cmdline,
            &layout,
        )?;
        vm.start(entry, handle)?;
        Ok(vm)
    }

    /// What the device side needs to attach devices.
    pub fn device_context(&self) -> DeviceContext {
        DeviceContext {
            vm_fd: self.vm_fd.clone(),
            mem: self.ram.mem.clone(),
            pio_bus: self.pio_bus.clone(),
            mmio_bus: self.mmio_bus.clone(),
        }
    }

    /// Guest RAM (a snapshot of the current regions).
    pub fn memory(&self) -> GuestMemoryMmap {
        (*self.ram.mem.memory()).clone()
    }

    /// The memfd backing guest RAM.
    pub fn memory_file(&self) -> &File {
        &self.ram.file
    }

    /// Port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio_bus
    }

    /// MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// Create, configure and start the vCPUs; vCPU 0 enters 64-bit mode at `entry`.
    pub fn start(&mut self, entry: BootEntry, handle: &VmHandle) -> Result<(), VmError> {
        regs::write_boot_tables(&self.memory()).map_err(|e| VmError::VcpuSetup(0, e))?;
        let supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::KvmCall("KVM_GET_SUPPORTED_CPUID", e))?;
        let events_handle = handle.clone();
        let events: crate::vcpu::VcpuEventSink = Arc::new(move |id, event| {
            let _ = events_handle.post(VmMessage::Vcpu(id, event));
        });
        self.vcpu_setup = Some(VcpuSetup { supported, events });
        let mut fds = Vec::new();
        for id in 0..self.cpus {
            fds.push(self.create_vcpu(id, (id == 0).then_some(entry))?);
        }
        // Application processors wait in KVM for INIT/SIPI from the boot processor.
        for (id, vcpu) in fds.into_iter().enumerate() {
            self.spawn_vcpu(id as u8, vcpu)?;
        }
        Ok(())
    }

    /// Create and configure vCPU `id`; with `entry` it starts in 64-bit mode there, otherwise
    /// it waits for INIT/SIPI like any application processor.
    fn create_vcpu(&self, id: u8, entry: Option<BootEntry>) -> Result<VcpuFd, VmError> {
        let setup = self
            .vcpu_setup
            .as_ref()
            .expect("create_vcpu is only called after start() set up the CPUID");
        let vcpu = self
            .vm_fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::KvmCall("KVM_CREATE_VCPU", e))?;
        // The topology covers every possible vCPU, so hot-added ones fit in.
        let cpuid = boot::cpuid::vcpu_cpuid(&setup.supported, id, self.max_cpus);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| VmError::VcpuSetup(id, regs::RegsError::Kvm("KVM_SET_CPUID2", e)))?;
        let check = |r: Result<(), regs::RegsError>| r.map_err(|e| VmError::VcpuSetup(id, e));
        check(regs::setup_msrs(&vcpu))?;
        check(regs::setup_fpu(&vcpu))?;
        check(regs::setup_lapic(&vcpu))?;
        if let Some(entry) = entry {
            check(regs::setup_long_mode(&vcpu, entry.entry, entry.zero_page))?;
        }
        Ok(vcpu)
    }

    fn spawn_vcpu(&mut self, id: u8, vcpu: VcpuFd) -> Result<(), VmError> {
        let events = self
            .vcpu_setup
            .as_ref()
            .expect("spawn_vcpu is only called after start()")
            .events
            .clone();
        let ctx = VcpuContext {
            pio_bus: self.pio_bus.clone(),
            mmio_bus: self.mmio_bus.clone(),
            events,
            started: PROCESS_START.get().copied(),
        };
        let h = VcpuHandle::spawn(id, vcpu, ctx).map_err(|e| VmError::VcpuThread(id, e))?;
        self.vcpus.push(h);
        Ok(())
    }

    /// Set up ACPI hot-plug: the controller ports and the GED interrupt.
    fn enable_hotplug(&mut self, layout: HotplugLayout) -> Result<(), VmError> {
        let ged = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| VmError::Device("the hot-plug event device", e.to_string()))?;
        self.vm_fd
            .register_irqfd(&ged, hotplug::GED_GSI)
            .map_err(|e| VmError::KvmCall("KVM_IRQFD (hot-plug event)", e))?;
        let (controller, state) = HotplugController::new(&layout);
        let controller = Arc::new(Mutex::new(controller));
        insert(
            &self.pio_bus,
            controller.clone(),
            u64::from(hotplug::CPU_PORT),
            u64::from(layout.max_cpus),
            "the vCPU hot-plug controller",
        )?;
        if !layout.mem_blocks.is_empty() {
            insert(
                &self.pio_bus,
                controller,
                u64::from(hotplug::MEM_PORT),
                layout.mem_blocks.len() as u64,
                "the RAM hot-plug controller",
            )?;
        }
        self.max_cpus = layout.max_cpus;
        let mapped = vec![false; layout.mem_blocks.len()];
        self.hotplug = Some(VmHotplug {
            layout,
            state,
            ged,
            mapped,
        });
        Ok(())
    }

    fn hotplug_state(&self) -> Option<std::sync::MutexGuard<'_, HotplugState>> {
        self.hotplug
            .as_ref()
            .map(|h| h.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Ask the guest to have `desired` vCPUs: new ones are created (or ejected ones reused)
    /// and announced; the highest ones above `desired` are asked to leave. Returns once the
    /// guest has been notified.
    pub fn resize_vcpus(&mut self, desired: u8) -> Result<(), ResizeError> {
        let Some(max) = self.hotplug.as_ref().map(|h| h.layout.max_cpus) else {
            if desired == self.cpus {
                return Ok(());
            }
            return Err(ResizeError::NoHotplug("vCPUs", "max_cpus"));
        };
        if desired > max {
            return Err(ResizeError::Invalid(format!(
                "desired_vcpus {desired} is above max_cpus {max}"
            )));
        }
        let flags: Vec<u8> = self
            .hotplug_state()
            .map(|s| s.cpus.clone())
            .unwrap_or_default();
        let mut changed = false;
        for id in 0..max {
            let flag = flags[usize::from(id)];
            let present = flag & hotplug::PRESENT != 0;
            if id < desired && !present {
                if usize::from(id) >= self.vcpus.len() {
                    let vcpu = self
                        .create_vcpu(id, None)
                        .map_err(|e| ResizeError::Failed(e.to_string()))?;
                    self.spawn_vcpu(id, vcpu)
                        .map_err(|e| ResizeError::Failed(e.to_string()))?;
                }
                if let Some(mut s) = self.hotplug_state() {
                    s.cpus[usize::from(id)] = hotplug::PRESENT | hotplug::INSERT;
                }
                changed = true;
            } else if id < desired && flag & hotplug::REMOVE != 0 {
                // Wanted again before the guest acted on the removal request.
                if let Some(mut s) = self.hotplug_state() {
                    s.cpus[usize::from(id)] &= !hotplug::REMOVE;
                }
            } else if id >= desired && present && flag & hotplug::REMOVE == 0 {
                if let Some(mut s) = self.hotplug_state() {
                    let f = &mut s.cpus[usize::from(id)];
                    *f = (*f & !hotplug::INSERT) | hotplug::REMOVE;
                }
                changed = true;
            }
        }
        if changed {
            self.notify_hotplug();
        }
        Ok(())
    }

    /// Grow guest RAM to `desired` bytes by whole hot-plug blocks: each block is mapped, given
    /// to KVM and to every vhost-user daemon, and only then announced to the guest. Returns
    /// once the guest has been notified.
    pub fn resize_memory(&mut self, desired: u64) -> Result<(), ResizeError> {
        let now = self.memory_size();
        if desired < now {
            return Err(ResizeError::NotSupported("memory unplug".into()));
        }
        if desired == now {
            return Ok(());
        }
        let Some((blocks, block)) = self
            .hotplug
            .as_ref()
            .filter(|h| !h.layout.mem_blocks.is_empty())
            .map(|h| (h.layout.mem_blocks.clone(), h.layout.block_size()))
        else {
            return Err(ResizeError::NoHotplug("RAM", "max_memory"));
        };
        if !(desired - now).is_multiple_of(block) {
            return Err(ResizeError::Invalid(format!(
                "desired_ram {desired} must be the current size ({now} bytes) plus a multiple \
                 of the {} MiB hot-plug block",
                block >> 20
            )));
        }
        let wanted = ((desired - now) / block) as usize;
        let flags: Vec<u8> = self
            .hotplug_state()
            .map(|s| s.mem.clone())
            .unwrap_or_default();
        let free: Vec<usize> = (0..blocks.len())
            .filter(|&i| flags[i] & hotplug::PRESENT == 0)
            .collect();
        if wanted > free.len() {
            let max = now + free.len() as u64 * block;
            return Err(ResizeError::Invalid(format!(
                "desired_ram {desired} is above max_memory ({max} bytes)"
            )));
        }
        for &i in free.iter().take(wanted) {
            let (start, len) = blocks[i];
            let mapped = self.hotplug.as_ref().is_some_and(|h| h.mapped[i]);
            if !mapped {
                let slot = FIRST_HOTPLUG_SLOT + i as u32;
                let region = self
                    .ram
                    .add_block(&self.vm_fd, slot, start, len, self.hugepages)
                    .map_err(|e| ResizeError::Failed(e.to_string()))?;
                if let Some(h) = self.hotplug.as_mut() {
                    h.mapped[i] = true;
                }
                log::info!(
                    "RAM block {i}: {} MiB at {start:#x} (KVM slot {slot})",
                    len >> 20
                );
                if let Some(d) = self.devices.as_mut() {
                    d.add_memory_region(&region)
                        .map_err(|e| ResizeError::Failed(format!("RAM block {i}: {e}")))?;
                }
            }
            if let Some(mut s) = self.hotplug_state() {
                s.mem[i] = hotplug::PRESENT | hotplug::INSERT;
            }
        }
        self.notify_hotplug();
        Ok(())
    }

    /// Pulse the GED interrupt: the guest scans the controller.
    fn notify_hotplug(&self) {
        if let Some(h) = &self.hotplug {
            if let Err(e) = h.ged.write(1) {
                log::warn!("cannot signal the hot-plug event: {e}");
            }
        }
    }

    /// Stop all vCPUs (they leave KVM_RUN and wait) and save kvmclock, so that the guest's
    /// clock does not count the pause.
    pub fn pause(&mut self) {
        for v in &self.vcpus {
            v.pause();
        }
        for v in &self.vcpus {
            v.wait_parked();
        }
        self.clock = match self.vm_fd.get_clock() {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("KVM_GET_CLOCK: {e}: the guest clock will jump by the pause");
                None
            }
        };
        self.paused = true;
    }

    /// Restore kvmclock and resume paused vCPUs.
    pub fn resume(&mut self) {
        if let Some(mut clock) = self.clock.take() {
            // Set the clock to the saved value "now"; flags from GET_CLOCK are not inputs.
            clock.flags = 0;
            if let Err(e) = self.vm_fd.set_clock(&clock) {
                log::warn!("KVM_SET_CLOCK: {e}: the guest clock jumps by the pause");
            }
        }
        for v in &self.vcpus {
            v.resume();
        }
        self.paused = false;
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// vCPUs the guest has: with hot-plug, those present and not ejected.
    pub fn cpus(&self) -> u8 {
        self.hotplug_state().map_or(self.cpus, |s| s.present_cpus())
    }

    /// Guest RAM in bytes.
    pub fn memory_size(&self) -> u64 {
        self.ram.size()
    }

    /// Whether every vhost-user daemon is connected.
    pub fn devices_connected(&self) -> bool {
        self.devices.as_ref().is_none_or(|d| d.all_connected())
    }

    /// Stop the vCPU threads and disconnect the devices.
    pub fn shutdown(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.vcpus.clear();
        if let Some(d) = self.devices.as_mut() {
            d.shutdown();
        }
    }

    /// Queue serial input for the guest.
    pub fn serial_input(&self, bytes: &[u8]) {
        if let Some(s) = &self.serial {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .queue_input(bytes);
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Set by the termination signal handler; the VM thread shuts down when it sees it.
static TERMINATE: AtomicBool = AtomicBool::new(false);
/// The VM thread's wake-up eventfd, for the signal handler.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn terminate_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    TERMINATE.store(true, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd with a valid 8-byte buffer; async-signal-safe.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

const TOKEN_WAKE: u64 = 0;
const TOKEN_STDIN: u64 = 1;
const TOKEN_DEVICES: u64 = 1 << 32;

/// Ctrl-A, then x: leave the VMM from a raw terminal.
const ESCAPE: u8 = 0x01;

/// The serial output `mode` asks for: `None` no port, `Some(None)` a port writing nowhere.
fn serial_writer(mode: &SerialMode) -> Result<Option<Option<Box<dyn Write + Send>>>, VmError> {
    Ok(match mode {
        SerialMode::Stdout => {
            // SAFETY: dup(2) of stdout; the result is checked and owned by the File.
            let fd = unsafe { libc::dup(1) };
            if fd < 0 {
                return Err(VmError::EventLoop(io::Error::last_os_error()));
            }
            // SAFETY: `fd` is a fresh descriptor nothing else owns.
            Some(Some(Box::new(unsafe { File::from_raw_fd(fd) })))
        }
        SerialMode::File(p) => Some(Some(Box::new(
            File::options()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmError::SerialFile(p.clone(), e))?,
        ))),
        SerialMode::Off => None,
    })
}

/// The VM thread: owns the configuration and the [`Vm`], serves [`VmMessage`]s (API requests
/// and guest events) and ends with an [`ExitStatus`].
///
/// The VM's life cycle follows [`crate::api::state`]: every request is checked against it
/// before anything is touched. A guest that powers off ends the VMM; a guest reset reboots it
/// (or ends the VMM under `no_reboot`).
pub struct Vmm {
    config: Option<VmConfig>,
    state: Option<VmState>,
    vm: Option<Vm>,
    /// Device fds of the current VM in the epoll set.
    device_fds: Vec<RawFd>,
    handle: VmHandle,
    rx: Receiver<VmMessage>,
    wake: Arc<EventFd>,
    epoll: Epoll,
    /// API requests that arrived while a VM was torn down, served next.
    pending: VecDeque<VmMessage>,
    stdin_polled: bool,
    stdin_closed: bool,
    stdin_is_tty: bool,
    escape_pending: bool,
    boots: u32,
}

impl Vmm {
    /// Prepare the VM thread. With a configuration, [`Vmm::run`] boots it at once (the command
    /// line); without one it waits for `vm.create` and `vm.boot` (an empty `--api-socket` vmm).
    pub fn new(config: Option<VmConfig>) -> Result<Self, VmError> {
        let (handle, rx, wake) = channel_pair().map_err(VmError::EventLoop)?;
        let epoll = Epoll::new().map_err(VmError::EventLoop)?;
        epoll
            .ctl(
                ControlOperation::Add,
                wake.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_WAKE),
            )
            .map_err(VmError::EventLoop)?;
        // SAFETY: isatty has no preconditions.
        let stdin_is_tty = unsafe { libc::isatty(0) } == 1;
        Ok(Self {
            state: config.as_ref().map(|_| VmState::Created),
            config,
            vm: None,
            device_fds: Vec::new(),
            handle,
            rx,
            wake,
            epoll,
            pending: VecDeque::new(),
            stdin_polled: false,
            stdin_closed: false,
            stdin_is_tty,
            escape_pending: false,
            boots: 0,
        })
    }

    /// A handle for sending requests to this VM thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// Make SIGTERM, SIGINT and SIGHUP shut the VM down cleanly.
    pub fn handle_termination_signals(&self) {
        WAKE_FD.store(self.wake.as_raw_fd(), Ordering::SeqCst);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, terminate_handler) {
                log::warn!("cannot handle signal {sig}: {e}");
            }
        }
    }

    /// Run until the guest powers off, a request or signal ends the VMM, or an error.
    pub fn run(mut self) -> Result<ExitStatus, VmError> {
        if self.config.is_some() {
            self.boot()?;
            self.state = Some(VmState::Running);
        }
        let result = self.serve();
        self.teardown();
        result
    }

    fn serve(&mut self) -> Result<ExitStatus, VmError> {
        let mut events = [EpollEvent::default(); 8];
        loop {
            while let Some(msg) = self.pending.pop_front() {
                if let Some(status) = self.handle_message(msg)? {
                    return Ok(status);
                }
            }
            if TERMINATE.load(Ordering::SeqCst) {
                log::info!("termination signal: shutting down");
                return Ok(ExitStatus::Shutdown);
            }
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmError::EventLoop(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.wake.read();
                        while let Some(msg) =
                            self.pending.pop_front().or_else(|| self.rx.try_recv().ok())
                        {
                            if let Some(status) = self.handle_message(msg)? {
                                return Ok(status);
                            }
                        }
                    }
                    TOKEN_STDIN => {
                        if let Some(status) = self.read_stdin() {
                            return Ok(status);
                        }
                    }
                    t => {
                        if let Some(d) = self.vm.as_mut().and_then(|vm| vm.devices.as_mut()) {
                            d.handle_event(t - TOKEN_DEVICES);
                        }
                    }
                }
            }
        }
    }

    /// Build the VM from the configuration and start it.
    fn boot(&mut self) -> Result<(), VmError> {
        let Some(config) = self.config.as_ref() else {
            return Ok(());
        };
        let serial = serial_writer(&config.serial)?;
        let vm = Vm::boot(config, &self.handle, serial)?;
        let device_fds = vm
            .devices
            .as_ref()
            .map(|d| d.event_fds())
            .unwrap_or_default();
        for &(fd, token) in &device_fds {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, TOKEN_DEVICES + token),
            ) {
                for &(fd, _) in &device_fds {
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                }
                return Err(VmError::EventLoop(e));
            }
        }
        self.device_fds = device_fds.iter().map(|&(fd, _)| fd).collect();
        if config.serial == SerialMode::Stdout && !self.stdin_polled && !self.stdin_closed {
            match self.epoll.ctl(
                ControlOperation::Add,
                0,
                EpollEvent::new(EventSet::IN, TOKEN_STDIN),
            ) {
                Ok(()) => self.stdin_polled = true,
                Err(e) => {
                    log::debug!("serial input disabled: stdin cannot be polled ({e})");
                    self.stdin_closed = true;
                }
            }
        }
        self.boots += 1;
        self.vm = Some(vm);
        Ok(())
    }

    /// Stop the vCPUs, disconnect the devices and drop the VM; guest events it sent before it
    /// stopped are dropped, API requests kept for [`Self::serve`].
    fn teardown(&mut self) {
        let Some(mut vm) = self.vm.take() else {
            return;
        };
        for fd in self.device_fds.drain(..) {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        vm.shutdown();
        drop(vm);
        while let Ok(msg) = self.rx.try_recv() {
            if let VmMessage::Api(..) = msg {
                self.pending.push_back(msg);
            }
        }
    }

    fn read_stdin(&mut self) -> Option<ExitStatus> {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a valid buffer of the given length.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, 0, EpollEvent::default());
                self.stdin_polled = false;
                self.stdin_closed = true;
            }
            return None;
        }
        let input = &buf[..n as usize];
        let mut out = Vec::with_capacity(input.len());
        if self.stdin_is_tty {
            for &b in input {
                if self.escape_pending {
                    self.escape_pending = false;
                    match b {
                        b'x' | b'X' => {
                            log::info!("Ctrl-A x: shutting down");
                            return Some(ExitStatus::Shutdown);
                        }
                        ESCAPE => out.push(ESCAPE),
                        _ => out.extend([ESCAPE, b]),
                    }
                } else if b == ESCAPE {
                    self.escape_pending = true;
                } else {
                    out.push(b);
                }
            }
        } else {
            out.extend_from_slice(input);
        }
        if let Some(vm) = &self.vm {
            vm.serial_input(&out);
        }
        None
    }

    /// A guest reset: reboot in place, or end the VMM under `no_reboot`.
    fn guest_reset(&mut self, why: &str) -> Result<Option<ExitStatus>, VmError> {
        if self.config.as_ref().is_some_and(|c| c.no_reboot) {
            log::info!("guest reset ({why}) with no_reboot: exiting");
            return Ok(Some(ExitStatus::Reset));
        }
        log::info!("guest reset ({why}): restarting the VM");
        self.teardown();
        if let Err(e) = self.boot() {
            self.state = Some(VmState::Shutdown);
            return Err(e);
        }
        self.state = Some(VmState::Running);
        Ok(None)
    }

    fn handle_message(&mut self, msg: VmMessage) -> Result<Option<ExitStatus>, VmError> {
        // Guest events only come from the VM that runs now: teardown() drops older ones.
        let booted = self.vm.is_some();
        Ok(match msg {
            VmMessage::Vcpu(_, VcpuEvent::PowerOff) | VmMessage::Power(PowerEvent::PowerOff)
                if booted =>
            {
                log::info!("guest powered off");
                Some(ExitStatus::PowerOff)
            }
            VmMessage::Vcpu(_, VcpuEvent::Reset(why)) if booted => return self.guest_reset(why),
            VmMessage::Power(PowerEvent::Reset) if booted => {
                return self.guest_reset("reset request")
            }
            VmMessage::Vcpu(id, VcpuEvent::Error(e)) if booted => {
                return Err(VmError::Guest(id, e))
            }
            VmMessage::Vcpu(..) | VmMessage::Power(_) => None,
            VmMessage::Api(req, reply) => {
                let exit = req == ApiRequest::VmmShutdown;
                let result = self.api(req);
                if exit {
                    // Disconnect every device before the answer says it is done.
                    self.teardown();
                }
                let _ = reply.send(result);
                exit.then_some(ExitStatus::Shutdown)
            }
        })
    }

    fn info(&self) -> VmInfo {
        let config = self
            .config
            .clone()
            .expect("vm.info is refused without a VM");
        let vm = self.vm.as_ref();
        VmInfo {
            state: self.state.unwrap_or(VmState::Created),
            cpus: vm.map_or(config.cpus, Vm::cpus),
            memory: vm.map_or(config.memory, Vm::memory_size),
            devices: config.devices.len(),
            devices_connected: vm.is_none_or(Vm::devices_connected),
            boots: self.boots,
            config,
        }
    }

    /// Serve one API request on the VM thread.
    fn api(&mut self, req: ApiRequest) -> Result<ApiResponse, ApiError> {
        let action = match &req {
            ApiRequest::VmmPing => return Ok(ApiResponse::Pong(VmmPingResponse::current())),
            ApiRequest::VmmShutdown => return Ok(ApiResponse::Done),
            ApiRequest::VmCreate(_) => VmAction::Create,
            ApiRequest::VmBoot => VmAction::Boot,
            ApiRequest::VmDelete => VmAction::Delete,
            ApiRequest::VmInfo => VmAction::Info,
            ApiRequest::VmPause => VmAction::Pause,
            ApiRequest::VmResume => VmAction::Resume,
            ApiRequest::VmReboot => VmAction::Reboot,
            ApiRequest::VmShutdown => VmAction::Shutdown,
            ApiRequest::VmResize(_) => VmAction::Resize,
        };
        let next = api_state::transition(self.state, action)?;
        match req {
            ApiRequest::VmmPing | ApiRequest::VmmShutdown => {}
            ApiRequest::VmCreate(config) => {
                config
                    .validate()
                    .map_err(|e| ApiError::InvalidConfig(e.to_string()))?;
                self.config = Some(*config);
            }
            ApiRequest::VmBoot => {
                self.boot().map_err(|e| ApiError::Failed(e.to_string()))?;
            }
            ApiRequest::VmDelete => {
                self.teardown();
                self.config = None;
            }
            ApiRequest::VmInfo => return Ok(ApiResponse::Info(Box::new(self.info()))),
            ApiRequest::VmPause => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.pause();
                }
            }
            ApiRequest::VmResume => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.resume();
                }
            }
            ApiRequest::VmReboot => {
                self.teardown();
                if let Err(e) = self.boot() {
                    self.state = Some(VmState::Shutdown);
                    return Err(ApiError::Failed(format!("reboot: {e}")));
                }
            }
            ApiRequest::VmShutdown => self.teardown(),
            ApiRequest::VmResize(resize) => self.resize(&resize)?,
        }
        self.state = next;
        Ok(ApiResponse::Done)
    }

    /// `vm.resize`: before boot, the configuration; on a running VM, hot-plug.
    fn resize(&mut self, resize: &VmResize) -> Result<(), ApiError> {
        let config = self
            .config
            .as_mut()
            .expect("resize is refused without a VM");
        let mut next = config.clone();
        if let Some(cpus) = resize.desired_vcpus {
            if cpus > next.max_vcpus() && next.max_cpus.is_some() {
                return Err(ApiError::InvalidConfig(format!(
                    "desired_vcpus {cpus} is above max_cpus {}",
                    next.max_vcpus()
                )));
            }
            next.cpus = cpus;
        }
        if let Some(ram) = resize.desired_ram {
            next.memory = ram;
        }
        let Some(vm) = self.vm.as_mut() else {
            next.validate()
                .map_err(|e| ApiError::InvalidConfig(e.to_string()))?;
            *config = next;
            return Ok(());
        };
        // A reboot keeps what the guest was resized to.
        if let Some(cpus) = resize.desired_vcpus {
            vm.resize_vcpus(cpus)?;
            config.cpus = cpus;
        }
        if let Some(ram) = resize.desired_ram {
            vm.resize_memory(ram)?;
            config.memory = ram;
        }
        Ok(())
    }
}

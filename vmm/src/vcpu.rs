//! vCPU threads: each runs KVM_RUN in a loop, dispatches port I/O and MMIO exits to the buses,
//! and reports the exits that end the VM (power off, reset, errors) to the VM thread.
//!
//! Control (pause, resume, stop) is a state word the thread checks before every KVM_RUN, plus
//! a kick: a real-time signal whose handler sets `immediate_exit` in the thread's `kvm_run`, so
//! a kick that lands just before KVM_RUN still makes it return at once (EINTR). A paused vCPU
//! has left KVM_RUN and waits on a condition variable: its registers can then be read from
//! the VM thread for a snapshot (through the same state word, not yet exposed).

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;

/// Why a vCPU stopped running the guest on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// The guest asked to power off.
    PowerOff,
    /// The guest reset the machine (triple fault, reset request).
    Reset(&'static str),
    /// KVM failed or the guest did something KVM cannot run.
    Error(String),
}

/// What the VM thread wants a vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Leave KVM_RUN and wait.
    Paused,
    /// Leave KVM_RUN and end the thread.
    Stopping,
}

struct Control {
    state: RunState,
    /// The thread is outside KVM_RUN, waiting (paused, or done after a terminal exit).
    parked: bool,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's kvm_run mapping, set by the thread that owns the
        // VcpuFd and cleared before the fd is dropped; a signal handler runs on that thread.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            log::error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

/// Where vCPU threads send their [`VcpuEvent`]s.
pub type VcpuEventSink = Arc<dyn Fn(u8, VcpuEvent) + Send + Sync>;

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Terminal exits go here.
    pub events: VcpuEventSink,
    /// Process start, for the "first guest instruction" measurement.
    pub started: Option<Instant>,
}

impl VcpuHandle {
    /// Start a thread running `vcpu` (already configured).
    pub fn spawn(id: u8, vcpu: VcpuFd, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                state: RunState::Running,
                parked: false,
            }),
            changed: Condvar::new(),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run_vcpu(id, vcpu, ctx, thread_shared))?;
        Ok(Self {
            id,
            shared,
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread handle belongs to a thread not yet joined (we hold its
            // JoinHandle); the signal has a handler installed.
            let rc = unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            if rc != 0 && rc != libc::ESRCH {
                log::warn!("cannot kick vCPU {}: error {rc}", self.id);
            }
        }
    }

    fn set_state(&self, state: RunState) {
        let mut c = self.shared.lock();
        if c.state == RunState::Stopping {
            return;
        }
        c.state = state;
        self.shared.changed.notify_all();
    }

    /// Ask the vCPU to leave KVM_RUN and wait (does not wait for it; see [`Self::wait_parked`]).
    pub fn pause(&self) {
        self.set_state(RunState::Paused);
        self.kick();
    }

    /// Wait until the vCPU is outside KVM_RUN.
    pub fn wait_parked(&self) {
        let mut c = self.shared.lock();
        while !c.parked && self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            let (g, _) = self
                .shared
                .changed
                .wait_timeout(c, std::time::Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner());
            c = g;
            if !c.parked {
                // The kick may have come while the thread handled an exit; repeat it.
                drop(c);
                self.kick();
                c = self.shared.lock();
            }
        }
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        self.set_state(RunState::Running);
    }

    /// End the thread and wait for it.
    pub fn stop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.state = RunState::Stopping;
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            while !t.is_finished() {
                // SAFETY: as in kick(): the thread is not joined yet.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if t.join().is_err() {
                log::error!("vCPU {} thread panicked", self.id);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Block until the state is not Paused; returns false when the thread must end.
fn park(shared: &Shared, terminal: bool) -> bool {
    let mut c = shared.lock();
    c.parked = true;
    shared.changed.notify_all();
    while c.state == RunState::Paused || (terminal && c.state != RunState::Stopping) {
        c = shared.changed.wait(c).unwrap_or_else(|e| e.into_inner());
    }
    c.parked = false;
    c.state != RunState::Stopping
}

fn run_vcpu(id: u8, mut vcpu: VcpuFd, ctx: VcpuContext, shared: Arc<Shared>) {
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    if let Some(started) = ctx.started {
        if id == 0 {
            log::info!(
                "vCPU 0 enters the guest {:.1} ms after process start",
                started.elapsed().as_secs_f64() * 1000.0
            );
        }
    }
    loop {
        let state = shared.lock().state;
        match state {
            RunState::Running => {}
            RunState::Paused => {
                if park(&shared, false) {
                    continue;
                }
                break;
            }
            RunState::Stopping => break,
        }
        let event = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VcpuEvent::Error(format!("KVM_RUN failed: {e}"))),
        };
        if let Some(event) = event {
            (ctx.events)(id, event);
            // The VM is ending or restarting; never enter the guest again.
            park(&shared, true);
            break;
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

fn handle_exit(exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<VcpuEvent> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if !ctx.pio_bus.read(u64::from(port), data) {
                // Nothing decodes the port: the bus floats high.
                data.fill(0xff);
            }
        }
        VcpuExit::IoOut(port, data) => {
            ctx.pio_bus.write(u64::from(port), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio_bus.read(addr, data) {
                log::debug!("unhandled MMIO read at {addr:#x}");
                data.fill(0xff);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio_bus.write(addr, data) {
                log::debug!("unhandled MMIO write at {addr:#x}");
            }
        }
        VcpuExit::Shutdown => return Some(VcpuEvent::Reset("triple fault")),
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuEvent::PowerOff,
                KVM_SYSTEM_EVENT_RESET => VcpuEvent::Reset("system reset"),
                KVM_SYSTEM_EVENT_CRASH => VcpuEvent::Error("guest crashed".into()),
                k => VcpuEvent::Error(format!("unknown system event {k}")),
            })
        }
        // Only without an in-kernel local APIC; ours has one, so this is a halted machine.
        VcpuExit::Hlt => return Some(VcpuEvent::PowerOff),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(VcpuEvent::Error(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            )))
        }
        VcpuExit::InternalError => {
            return Some(VcpuEvent::Error(
                "KVM internal error (emulation failure)".into(),
            ))
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        other => return Some(VcpuEvent::Error(format!("unexpected vCPU exit {other:?}"))),
    }
    None
}

//! The daemon skeleton shared by every vhost-user device daemon of this suite.
//!
//! A daemon crate holds only its device logic: a [`VhostUserBackend`] that also implements
//! [`DeviceBackend`]. Everything around it is written once here: the command-line conventions
//! of the vhost-user spec ("Backend program conventions": `--socket-path`, `--fd`,
//! `--print-capabilities`), systemd socket activation and readiness, client mode, serving one
//! frontend after another without a restart, clean exit on SIGTERM/SIGINT, logging, and the
//! control-message [`relay`] that keeps QEMU 10 sessions alive.
//!
//! ```ignore
//! let cli = Cli::parse();
//! common::init(&cli.daemon, &INFO);
//! let backend = match MyBackend::new(&cli) {
//!     Ok(b) => b,
//!     Err(e) => return common::exit_error(&INFO, &e),
//! };
//! common::exit_result(&INFO, common::serve(&cli.daemon, &INFO, backend))
//! ```

mod args;
mod backend_channel;
mod capabilities;
mod error;
pub mod relay;
pub mod sandbox;
mod serve;
mod socket;

use std::process::ExitCode;
use std::sync::Arc;

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub use args::DaemonArgs;
pub use backend_channel::{BackendChannel, ACK_TIMEOUT};
pub use capabilities::capabilities_json;
pub use error::{Error, Result};
pub use serve::serve;

/// Guest memory as the daemons see it: mmap'ed frontend regions with a dirty-page bitmap
/// (ready for live migration's dirty logging).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<BitmapMmapRegion>;
/// The atomically replaceable guest memory handed to backends on every memory-table update.
pub type GuestMemoryAtomic = vm_memory::GuestMemoryAtomic<GuestMemoryMmap>;
/// The vring type every daemon uses.
pub type Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic>;

/// What a daemon is, for logs, thread names and `--print-capabilities`.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    /// Binary name, e.g. `vhost-user-block`.
    pub name: &'static str,
    /// `VHostUserBackendType` of QEMU's vhost-user.json schema: `block`, `net`, `fs`, `console`.
    pub device_type: &'static str,
    /// Backend capabilities listed by `--print-capabilities` (e.g. `read-only-mode`).
    pub capabilities: &'static [&'static str],
}

/// The hooks the serve loop calls around each frontend connection.
///
/// Note on `VhostUserBackend::handle_event(device_event, evset, vrings, thread_id)`:
/// vhost-user-backend hands each worker thread only the vrings of its queues
/// (`queues_per_thread()[thread_id]`, in queue order), and a kick's `device_event` is the
/// vring's index within that thread, not the global queue index.
pub trait DeviceBackend:
    VhostUserBackend<Bitmap = BitmapMmapRegion, Vring = Vring> + Clone + 'static
{
    /// Called for every new frontend connection once its worker threads exist (index `i` is
    /// worker thread `i`, per `queues_per_thread()`). Register extra file descriptors (a tap,
    /// a console backend) here with ids above `num_queues()`.
    fn attach_workers(&self, _handlers: &[Arc<VringEpollHandler<Self>>]) -> std::io::Result<()> {
        Ok(())
    }

    /// Called when the frontend hands over its backend-request channel
    /// (`VHOST_USER_SET_BACKEND_REQ_FD`, which needs `VHOST_USER_PROTOCOL_F_BACKEND_REQ` in
    /// `protocol_features()`), from the relay thread before vhost-user-backend sees the message.
    /// Keep it to notify the frontend (config-space changes); drop it in `disconnected`.
    fn backend_channel(&self, _channel: BackendChannel) {}

    /// Called when the frontend enables or disables queue `index`
    /// (`VHOST_USER_SET_VRING_ENABLE` once the features are acked), from the relay thread right
    /// after the message went on to vhost-user-backend, which tells backends nothing of it.
    /// For a device whose host side follows its rings (a tap queue leaving a multi-queue tap).
    fn vring_enabled(&self, _index: u32, _enabled: bool) {}

    /// Called after a frontend disconnected and its worker threads have exited, before the
    /// next connection is served: drop per-connection state.
    fn disconnected(&self) {}
}

/// A fresh exit-event pair for `VhostUserBackend::exit_event`. The serve loop builds new worker
/// threads for each connection, so backends must hand out a new pair on every call.
pub fn new_exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
        Ok(pair) => Some(pair),
        Err(e) => {
            log::error!("cannot create worker exit event: {e}");
            None
        }
    }
}

/// First step of every daemon's `main`: set up logging and signal handling, and answer
/// `--print-capabilities` (prints the JSON and exits 0).
pub fn init(args: &DaemonArgs, info: &DeviceInfo) {
    if args.print_capabilities {
        println!("{}", capabilities_json(info));
        std::process::exit(0);
    }
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if let Some(level) = args.log_level {
        builder.filter_level(level);
    }
    builder.format_timestamp_millis();
    let _ = builder.try_init();
    if let Err(e) = serve::block_termination_signals() {
        log::warn!("cannot block SIGTERM/SIGINT for orderly shutdown: {e}");
    }
}

/// Print `error` (with its causes) the way every daemon reports a fatal start-up problem.
pub fn exit_error(info: &DeviceInfo, error: &dyn std::error::Error) -> ExitCode {
    let mut msg = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    eprintln!("{}: error: {msg}", info.name);
    ExitCode::FAILURE
}

/// Turn the result of [`serve`] into the process exit status.
pub fn exit_result(info: &DeviceInfo, result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_error(info, &e),
    }
}

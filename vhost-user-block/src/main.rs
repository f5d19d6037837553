//! `vhost-user-block`: serves a raw image file or a block device to a vhost-user frontend
//! (QEMU's `vhost-user-blk-pci`, our `vmm --disk socket=...`) as a virtio-blk device.

mod backend;
mod disk;
mod request;
mod uring;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::{DaemonArgs, DeviceInfo};

use crate::backend::{BlockBackend, BlockConfig, IoEngine};

const INFO: DeviceInfo = DeviceInfo {
    name: "vhost-user-block",
    device_type: "block",
    capabilities: &["read-only-mode", "blk-file"],
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "vhost-user virtio-blk daemon: serves a raw image file or a block device"
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// Raw image file or block device to serve.
    #[arg(
        long,
        visible_alias = "blk-file",
        value_name = "FILE",
        required_unless_present = "print_capabilities"
    )]
    path: Option<PathBuf>,

    /// Serve the disk read-only (VIRTIO_BLK_F_RO); writes fail with an I/O error.
    #[arg(long, visible_alias = "read-only")]
    readonly: bool,

    /// Open the disk with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,

    /// Number of request queues (1-64): the sync engine gives each its own worker thread, uring
    /// serves them all from one (see --uring-thread-per-queue).
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_queues: usize,

    /// Largest queue size the frontend may use (power of two, 2-1024).
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,

    /// Disk serial number returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    #[arg(long, value_name = "ID")]
    serial: Option<String>,

    /// Start with the guest-visible write cache enabled: writes complete before they are
    /// durable and FLUSH makes them so (default).
    #[arg(long, conflicts_with = "writethrough")]
    writeback: bool,

    /// I/O engine: `uring` keeps many requests in flight on every queue from one thread (best
    /// with --direct on real disks), `sync` does one positional read/write at a time per queue
    /// thread (best on cached or in-memory files); `auto` picks uring with --direct.
    #[arg(long, value_enum, default_value_t = IoEngine::Auto)]
    io_engine: IoEngine,

    /// With the uring engine, give every queue its own worker thread instead of one for all
    /// (for many queues on a host with cores to spare and devices one thread cannot keep busy).
    #[arg(long)]
    uring_thread_per_queue: bool,

    /// Start with the write cache disabled: every write is durable before it completes.
    #[arg(long)]
    writethrough: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init(&cli.daemon, &INFO);
    let Some(path) = cli.path.clone() else {
        eprintln!("{}: error: --path FILE is required", INFO.name);
        return ExitCode::FAILURE;
    };
    let config = BlockConfig {
        path,
        readonly: cli.readonly,
        direct: cli.direct,
        num_queues: cli.num_queues,
        queue_size: cli.queue_size,
        serial: cli.serial.clone(),
        writeback: !cli.writethrough,
        engine: cli.io_engine,
        uring_thread_per_queue: cli.uring_thread_per_queue,
    };
    let backend = match BlockBackend::new(config) {
        Ok(b) => b,
        Err(e) => return common::exit_error(&INFO, &e),
    };
    common::exit_result(&INFO, common::serve(&cli.daemon, &INFO, backend))
}

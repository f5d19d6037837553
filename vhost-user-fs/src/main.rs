//! vhost-user-fs: share a host directory with a guest over virtio-fs.
//!
//! ```text
//! vhost-user-fs --socket /run/vm0-fs.sock --shared-dir /srv/share --tag share
//! guest# mount -t virtiofs share /mnt
//! ```

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use common::sandbox::SandboxMode;
use common::{DaemonArgs, DeviceInfo};
use vhost_user_fs::seccomp::SeccompMode;
use vhost_user_fs::{CachePolicy, FsBackend, FsConfig, IdMap, IdRange, PassthroughFs, Server};

const INFO: DeviceInfo = DeviceInfo {
    name: "vhost-user-fs",
    device_type: "fs",
    capabilities: &[],
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "virtio-fs device daemon: shares one host directory with a guest over vhost-user",
    after_help = "Guest: mount -t virtiofs TAG /mnt. QEMU: -chardev socket,id=fs0,path=SOCK \
                  -device vhost-user-fs-pci,chardev=fs0,tag=TAG (with shared guest memory)."
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// Host directory to share.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "print_capabilities"
    )]
    shared_dir: Option<PathBuf>,

    /// Mount tag the guest uses (at most 36 bytes; also given to QEMU with tag=).
    #[arg(long, default_value = "myfs")]
    tag: String,

    /// Request queues, each served by its own thread (the guest may use them in parallel).
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_request_queues: usize,

    /// Refuse every change to the shared directory.
    #[arg(long)]
    readonly: bool,

    /// Guest caching: never (always ask the host), auto (1 s timeouts), always (only the guest
    /// changes the directory).
    #[arg(long, value_enum, default_value = "auto")]
    cache: CachePolicy,

    /// Pass extended attributes through (regular files and directories).
    #[arg(long)]
    xattr: bool,

    /// Show host mount points inside the shared directory as submounts in the guest.
    #[arg(long)]
    announce_submounts: bool,

    /// Allow the guest to create block and character device nodes.
    #[arg(long)]
    allow_device_nodes: bool,

    /// Confinement: namespace (pivot into the shared directory in a new mount namespace; needs
    /// root), chroot, or none. Default: namespace when running as root, else none.
    #[arg(long, value_enum)]
    sandbox: Option<SandboxMode>,

    /// System-call allow-list: kill (default when given alone), errno, log, none.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "kill", default_value = "none")]
    seccomp: SeccompMode,

    /// Accepted for virtiofsd compatibility; requests run on their queue's thread (use
    /// --num-request-queues for parallelism).
    #[arg(long, value_name = "N")]
    thread_pool_size: Option<usize>,

    /// Map guest ids to host ids, GUEST:HOST:COUNT (repeatable): e.g. an unprivileged daemon
    /// run as uid 1000 shows its files as root's with --translate-uid 0:1000:1.
    #[arg(long, value_name = "GUEST:HOST:COUNT")]
    translate_uid: Vec<IdRange>,

    /// Map guest gids to host gids, GUEST:HOST:COUNT (repeatable).
    #[arg(long, value_name = "GUEST:HOST:COUNT")]
    translate_gid: Vec<IdRange>,

    /// After answering, keep looking for the guest's next request for this many microseconds
    /// before sleeping: lower latency for synchronous I/O at the cost of up to that much CPU
    /// time per reply (0: sleep at once).
    #[arg(long, default_value_t = 50, value_name = "US")]
    poll_us: u64,

    /// Most inodes the guest may hold at once.
    #[arg(long, default_value_t = 1 << 20, value_name = "N")]
    inode_limit: usize,
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot share {0}")]
    SharedDir(PathBuf, #[source] io::Error),
    #[error(transparent)]
    Config(#[from] vhost_user_fs::backend::ConfigError),
    #[error(
        "--sandbox {0:?} cannot be used with --client (the socket path would be out of reach)"
    )]
    SandboxClient(SandboxMode),
    #[error("cannot listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    #[error("{0} is served by a running daemon")]
    InUse(PathBuf),
    #[error(transparent)]
    Sandbox(#[from] common::sandbox::SandboxError),
    #[error(transparent)]
    Seccomp(#[from] vhost_user_fs::seccomp::SeccompError),
}

/// Bind the socket before the sandbox hides its path; the serve loop then uses it as an
/// inherited listener.
fn prebind(path: &Path) -> Result<UnixListener, StartError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|e| StartError::Listen(path.to_path_buf(), e))
}

/// Raises the open-file limit so that `inodes` inodes (one descriptor each) fit, with room for
/// open files and the daemon's own descriptors; returns the soft limit in force afterwards.
///
/// The hard limit is raised too where the process may (root, CAP_SYS_RESOURCE), up to the
/// kernel's `fs.nr_open`; otherwise the soft limit goes up to the hard one.
fn raise_fd_limit(inodes: u64) -> u64 {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let want = inodes
        .saturating_add(inodes / 4)
        .saturating_add(1024)
        .min(nr_open);
    // SAFETY: zeroed rlimit is valid; getrlimit fills it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur >= want {
        return lim.rlim_cur;
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: valid in-pointer; fails harmlessly (EPERM) without the privilege to raise the
    // hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return want;
    }
    lim.rlim_cur = lim.rlim_max.min(want);
    // SAFETY: valid in-pointer; the soft limit may always go up to the hard one.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

fn start(cli: &mut Cli) -> Result<FsBackend, StartError> {
    let Some(dir) = cli.shared_dir.clone() else {
        // clap requires it; only --print-capabilities runs without it, and exits earlier.
        return Err(StartError::SharedDir(
            PathBuf::new(),
            io::ErrorKind::NotFound.into(),
        ));
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| StartError::SharedDir(dir.clone(), e))?;
    if !dir.is_dir() {
        return Err(StartError::SharedDir(
            dir,
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    let fd_limit = raise_fd_limit(cli.inode_limit as u64);
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let sandbox = cli.sandbox.unwrap_or(if root && !cli.daemon.client {
        SandboxMode::Namespace
    } else {
        SandboxMode::None
    });
    if sandbox != SandboxMode::None && cli.daemon.client {
        return Err(StartError::SandboxClient(sandbox));
    }
    let mut cfg = FsConfig::new(dir.clone());
    cfg.readonly = cli.readonly;
    cfg.cache = cli.cache;
    cfg.xattr = cli.xattr;
    cfg.announce_submounts = cli.announce_submounts;
    cfg.allow_devices = cli.allow_device_nodes;
    cfg.uid_map = IdMap(cli.translate_uid.clone());
    cfg.gid_map = IdMap(cli.translate_gid.clone());
    // Inodes get four fifths of the descriptors left after the daemon's own; open files and
    // directories the rest. Past that the guest gets ENFILE from a full inode table instead of
    // EMFILE from an exhausted descriptor table at random places.
    let fd_room = usize::try_from(fd_limit.saturating_sub(256) / 5 * 4).unwrap_or(usize::MAX);
    cfg.max_inodes = cli.inode_limit.min(fd_room).max(16);
    if cfg.max_inodes < cli.inode_limit {
        log::warn!(
            "open-file limit {fd_limit} leaves room for {} inodes, fewer than --inode-limit {} \
             (raise it with `ulimit -Hn` or run with CAP_SYS_RESOURCE)",
            cfg.max_inodes,
            cli.inode_limit
        );
    }
    let fs = PassthroughFs::new(cfg).map_err(|e| StartError::SharedDir(dir.clone(), e))?;
    let backend = FsBackend::new(
        Arc::new(Server::new(fs)),
        &cli.tag,
        cli.num_request_queues,
        std::time::Duration::from_micros(cli.poll_us.min(10_000)),
    )?;
    if sandbox != SandboxMode::None {
        if let Some(path) = cli.daemon.socket.take() {
            let listener = prebind(&path)?;
            log::info!("listening on {}", path.display());
            cli.daemon.fd = Some(listener.as_raw_fd());
            // The listener lives for the whole process, as the inherited --fd it now is.
            let _ = listener.into_raw_fd();
        }
        common::sandbox::enter(sandbox, &dir)?;
    }
    vhost_user_fs::seccomp::install(cli.seccomp)?;
    if cli.thread_pool_size.is_some() {
        log::info!("--thread-pool-size ignored: each request queue has its own thread");
    }
    log::info!(
        "sharing {} as {:?}: {} request queue(s), cache {:?}, sandbox {:?}{}{}",
        dir.display(),
        cli.tag,
        cli.num_request_queues,
        cli.cache,
        sandbox,
        if cli.readonly { ", read-only" } else { "" },
        if cli.xattr { ", xattr" } else { "" }
    );
    Ok(backend)
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    common::init(&cli.daemon, &INFO);
    let backend = match start(&mut cli) {
        Ok(b) => b,
        Err(e) => return common::exit_error(&INFO, &e),
    };
    common::exit_result(&INFO, common::serve(&cli.daemon, &INFO, backend))
}

//! The serve loop: one frontend connection after another, each with fresh vhost-user state.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::socket::{connect_retrying, ConnectionSource};
use crate::{
    relay, DaemonArgs, DeviceBackend, DeviceInfo, Error, GuestMemoryAtomic, GuestMemoryMmap, Result,
};

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the local set; no other memory used.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Block SIGTERM and SIGINT in the calling thread (and every thread it spawns later), so that
/// they are only ever consumed through the serve loop's signalfd.
pub(crate) fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is an initialised sigset; the old-mask pointer may be null.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// A signalfd that becomes readable on SIGTERM/SIGINT.
struct TerminationSignals(OwnedFd);

impl TerminationSignals {
    fn new() -> io::Result<Self> {
        block_termination_signals()?;
        let set = termination_set();
        // SAFETY: creates a new descriptor from an initialised sigset.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Whether a termination signal is pending, consuming it.
    fn pending(&self) -> bool {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most info.len() bytes into the local buffer.
        let n = unsafe {
            libc::read(
                self.raw(),
                info.as_mut_ptr() as *mut libc::c_void,
                info.len(),
            )
        };
        n == info.len() as isize
    }
}

/// Wait until one of `fds` is readable; returns the index of the first readable one.
fn wait_readable(fds: &[RawFd]) -> io::Result<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: pfds is a valid, correctly sized array of pollfd.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if let Some(i) = pfds.iter().position(|p| p.revents != 0) {
            return Ok(i);
        }
    }
}

/// How a frontend session ended.
enum SessionEnd {
    Disconnected,
    Terminated,
}

/// Serve frontends with `backend` until SIGTERM/SIGINT (or after one session with `--once`).
///
/// Each connection gets a fresh `VhostUserDaemon` (fresh vrings and worker threads) built from
/// a clone of `backend`, reached through the [`relay`]. The socket file we created is removed
/// on exit.
pub fn serve<B: DeviceBackend>(args: &DaemonArgs, info: &DeviceInfo, backend: B) -> Result<()> {
    let signals = TerminationSignals::new().map_err(Error::Signals)?;
    let source = ConnectionSource::from_args(args)?;
    let result = serve_source(args, info, &backend, &signals, &source);
    if let ConnectionSource::Listen {
        owned_path: Some(path),
        ..
    } = &source
    {
        let _ = std::fs::remove_file(path);
    }
    log::info!("exiting");
    result
}

fn serve_source<B: DeviceBackend>(
    args: &DaemonArgs,
    info: &DeviceInfo,
    backend: &B,
    signals: &TerminationSignals,
    source: &ConnectionSource,
) -> Result<()> {
    let mut notified = false;
    let notify_ready = |notified: &mut bool| {
        if !*notified {
            *notified = true;
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    };
    loop {
        let stream = match source {
            ConnectionSource::Listen {
                listener,
                owned_path,
            } => {
                if let Some(p) = owned_path {
                    log::info!("listening on {}", p.display());
                } else {
                    log::info!("listening on an inherited socket");
                }
                notify_ready(&mut notified);
                if wait_readable(&[signals.raw(), listener.as_raw_fd()]).map_err(Error::Accept)?
                    == 0
                {
                    return Ok(());
                }
                listener.accept().map_err(Error::Accept)?.0
            }
            ConnectionSource::Client(path) => match connect_retrying(path, || signals.pending()) {
                Ok(s) => s,
                Err(_) => return Ok(()),
            },
        };
        log::info!("frontend connected");
        notify_ready(&mut notified);
        let end = serve_connection(info, backend, signals, stream)?;
        backend.disconnected();
        match end {
            SessionEnd::Terminated => return Ok(()),
            SessionEnd::Disconnected if args.once => return Ok(()),
            SessionEnd::Disconnected => log::info!("frontend disconnected"),
        }
    }
}

/// A connected socket pair between the relay and vhost-user-backend's listener: the backend
/// side accepts on a fresh abstract-namespace socket with an unguessable name, which we connect
/// to at once and close after the single accept.
fn backend_listener(info: &DeviceInfo) -> io::Result<(vhost::vhost_user::Listener, UnixStream)> {
    let mut nonce = [0u8; 8];
    // SAFETY: getrandom writes at most nonce.len() bytes into the local buffer.
    let n = unsafe { libc::getrandom(nonce.as_mut_ptr() as *mut libc::c_void, nonce.len(), 0) };
    if n != nonce.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let name = format!(
        "{}-relay-{}-{:016x}",
        info.name,
        std::process::id(),
        u64::from_le_bytes(nonce)
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
    let listener = UnixListener::bind_addr(&addr)?;
    let relay_side = UnixStream::connect_addr(&addr)?;
    Ok((vhost::vhost_user::Listener::from(listener), relay_side))
}

fn serve_connection<B: DeviceBackend>(
    info: &DeviceInfo,
    backend: &B,
    signals: &TerminationSignals,
    frontend: UnixStream,
) -> Result<SessionEnd> {
    let mut daemon = VhostUserDaemon::new(
        info.name.to_string(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| Error::Daemon(e.to_string()))?;
    let (mut listener, relay_backend) = backend_listener(info).map_err(Error::Relay)?;
    daemon
        .start(&mut listener)
        .map_err(|e| Error::Daemon(e.to_string()))?;
    drop(listener);

    let frontend_ctl = frontend.try_clone().map_err(Error::Relay)?;
    if let Err(e) = backend.attach_workers(&daemon.get_epoll_handlers()) {
        log::error!("cannot attach the device to its worker threads: {e}");
        let _ = frontend_ctl.shutdown(std::net::Shutdown::Both);
    }

    let done = EventFd::new(EFD_NONBLOCK).map_err(Error::Relay)?;
    let done_signal = done.try_clone().map_err(Error::Relay)?;
    let device = backend.clone();
    let relay_thread = std::thread::Builder::new()
        .name(format!("{}-relay", info.name))
        .spawn(move || {
            let result = relay::run(
                frontend,
                relay_backend,
                |channel| device.backend_channel(channel),
                |index, enabled| device.vring_enabled(index, enabled),
            );
            let _ = done_signal.write(1);
            result
        })
        .map_err(Error::Relay)?;

    let mut end = SessionEnd::Disconnected;
    match wait_readable(&[signals.raw(), done.as_raw_fd()]) {
        Ok(0) => {
            log::info!("termination signal received; closing the frontend connection");
            end = SessionEnd::Terminated;
            let _ = frontend_ctl.shutdown(std::net::Shutdown::Both);
        }
        Ok(_) => {}
        Err(e) => {
            log::error!("waiting on the session failed: {e}");
            let _ = frontend_ctl.shutdown(std::net::Shutdown::Both);
        }
    }
    match relay_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => log::warn!("frontend connection dropped: {e}"),
        Err(_) => log::error!("relay thread panicked"),
    }
    if let Err(e) = daemon.wait() {
        // The vhost crate reports a closed socket as an error too; only a real protocol
        // failure is worth a warning.
        let text = e.to_string();
        if text.contains("disconnect") || text.contains("partial message") {
            log::debug!("session ended: {text}");
        } else {
            log::warn!("session ended: {text}");
        }
    }
    // Dropping the daemon fires the workers' exit events and joins them.
    drop(daemon);
    Ok(end)
}

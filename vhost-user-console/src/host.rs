//! The host side of a console port: where guest output goes and guest input comes from.
//!
//! Every endpoint is opened once, at start-up, and belongs to the process: listening sockets,
//! attached clients and the pty stay the same while frontends come and go.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use crate::telnet::{self, Telnet};

/// Most clients attached to one socket or TCP port at a time.
pub const MAX_CLIENTS: usize = 4;

/// What the user asked a port to be connected to (`--backend`, `--port backend=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSpec {
    /// Our own stdin/stdout.
    Stdio,
    /// A new pseudo-terminal; its path is printed at start-up.
    Pty,
    /// A Unix socket we listen on; clients attach and detach at will.
    Socket(PathBuf),
    /// A TCP port we listen on (loopback unless an address is given).
    Tcp(SocketAddr),
    /// A TCP port whose clients speak telnet: their window size becomes the console size.
    Telnet(SocketAddr),
    /// Nothing: output is only logged (see `--log`) and kept for replay.
    Null,
}

/// A `--backend` value that cannot be understood.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid backend '{0}': expected stdio, pty, null, socket=PATH, tcp=[ADDR:]PORT or telnet=[ADDR:]PORT (loopback by default)"
)]
pub struct BadHostSpec(String);

impl FromStr for HostSpec {
    type Err = BadHostSpec;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadHostSpec(s.to_string());
        match s {
            "stdio" => return Ok(Self::Stdio),
            "pty" => return Ok(Self::Pty),
            "null" | "none" => return Ok(Self::Null),
            _ => {}
        }
        let (kind, arg) = s
            .split_once('=')
            .or_else(|| s.split_once(':'))
            .ok_or_else(bad)?;
        match kind {
            "socket" | "unix" if !arg.is_empty() => Ok(Self::Socket(PathBuf::from(arg))),
            "tcp" => tcp_addr(arg).map(Self::Tcp).ok_or_else(bad),
            "telnet" => tcp_addr(arg).map(Self::Telnet).ok_or_else(bad),
            _ => Err(bad()),
        }
    }
}

/// `[ADDR:]PORT`, loopback when only a port is given.
fn tcp_addr(arg: &str) -> Option<SocketAddr> {
    if let Ok(port) = arg.parse::<u16>() {
        return Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    arg.parse().ok()
}

impl fmt::Display for HostSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdio => write!(f, "stdio"),
            Self::Pty => write!(f, "pty"),
            Self::Socket(p) => write!(f, "socket={}", p.display()),
            Self::Tcp(a) => write!(f, "tcp={a}"),
            Self::Telnet(a) => write!(f, "telnet={a}"),
            Self::Null => write!(f, "null"),
        }
    }
}

/// Why an endpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Creating the pseudo-terminal failed.
    #[error("cannot create a pseudo-terminal")]
    Pty(#[source] io::Error),
    /// The socket's path is taken by something that is not a stale socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another process serves the socket path.
    #[error("console socket {0} is already served by a live process")]
    SocketInUse(PathBuf),
    /// Binding the Unix socket failed.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Binding the TCP port failed.
    #[error("cannot listen on TCP {addr}")]
    BindTcp {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// A connection of an attached client.
#[derive(Debug)]
pub enum Conn {
    /// Unix socket client.
    Unix(UnixStream),
    /// TCP client.
    Tcp(TcpStream),
}

impl Conn {
    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_nonblocking(true),
            Self::Tcp(s) => {
                // Keystrokes should not wait for Nagle.
                let _ = s.set_nodelay(true);
                s.set_nonblocking(true)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// An attached client and the output it has not taken yet.
#[derive(Debug)]
pub struct Client {
    /// The connection.
    pub conn: Conn,
    /// Output waiting for the client to read (starts with the replayed history).
    pub pending: VecDeque<u8>,
    /// Last time the client took some output (or attached).
    pub last_progress: Instant,
    /// The client went away; it is closed once its epoll registration is removed.
    pub dead: bool,
    /// The client speaks telnet.
    pub telnet: Option<Telnet>,
}

impl Client {
    fn new(conn: Conn, replay: impl IntoIterator<Item = u8>, telnet: bool) -> io::Result<Self> {
        conn.set_nonblocking()?;
        let pending = if telnet {
            let history: Vec<u8> = replay.into_iter().collect();
            let mut pending = VecDeque::from(telnet::GREETING.to_vec());
            pending.extend(telnet::escape(&history).iter());
            pending
        } else {
            replay.into_iter().collect()
        };
        Ok(Self {
            conn,
            pending,
            last_progress: Instant::now(),
            dead: false,
            telnet: telnet.then(Telnet::new),
        })
    }

    /// Write as much pending output as the client takes without blocking. `Err` means the
    /// client is gone.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.conn.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Send guest output `data` after what is already pending. `Err` means the client is gone.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if self.telnet.is_some() {
            return self.send_raw(&telnet::escape(data));
        }
        self.send_raw(data)
    }

    /// Send `data` as it is (telnet negotiation, or output of a plain client).
    pub fn send_raw(&mut self, data: &[u8]) -> io::Result<()> {
        let mut data = data;
        if self.pending.is_empty() {
            loop {
                match self.conn.write(data) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.last_progress = Instant::now();
                        data = &data[n..];
                        if data.is_empty() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.pending.extend(data);
        Ok(())
    }
}

/// A listening socket of a port.
#[derive(Debug)]
pub enum Listener {
    /// Unix socket; the path is removed when the daemon exits.
    Unix(UnixListener, PathBuf),
    /// TCP socket.
    Tcp(TcpListener),
    /// TCP socket whose clients speak telnet.
    Telnet(TcpListener),
}

impl Listener {
    /// Accept one pending connection; `Ok(None)` when there is none.
    pub fn accept(&self) -> io::Result<Option<Conn>> {
        let result = match self {
            Self::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Self::Tcp(l) | Self::Telnet(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
        };
        match result {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Attach `conn` as a client whose pending output starts with `replay`.
    pub fn client(&self, conn: Conn, replay: impl IntoIterator<Item = u8>) -> io::Result<Client> {
        Client::new(conn, replay, matches!(self, Self::Telnet(_)))
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(l, _) => l.as_raw_fd(),
            Self::Tcp(l) | Self::Telnet(l) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A pseudo-terminal whose other side (the printed path) a user opens with screen, minicom...
#[derive(Debug)]
pub struct Pty {
    /// Our side.
    pub master: File,
    /// Held open so the master never reports a hang-up while no user is attached.
    _slave: File,
    /// Path of the side users open.
    pub path: PathBuf,
}

impl Pty {
    /// Create a pseudo-terminal in raw mode.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: posix_openpt returned a new descriptor that only we own.
        let master = unsafe { File::from_raw_fd(fd) };
        // Never block the worker thread on the pty, whatever posix_openpt did with the flag.
        // SAFETY: fcntl on the descriptor we own, integer arguments only.
        let rc = unsafe {
            libc::fcntl(
                master.as_raw_fd(),
                libc::F_SETFL,
                libc::O_RDWR | libc::O_NONBLOCK,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain calls on the descriptor we own.
        if unsafe { libc::grantpt(master.as_raw_fd()) } != 0
            // SAFETY: as above.
            || unsafe { libc::unlockpt(master.as_raw_fd()) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name of at most name.len() bytes.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
        let cname = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let path = PathBuf::from(cname.to_string_lossy().into_owned());
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)?;
        // Raw mode: the guest's bytes pass unchanged, and what we write is not echoed back to
        // us as if typed.
        set_raw(slave.as_raw_fd())?;
        Ok(Self {
            master,
            _slave: slave,
            path,
        })
    }

    /// The window size users' terminals set on the pty, as (cols, rows).
    pub fn window_size(&self) -> Option<(u16, u16)> {
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the local struct.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
        (rc == 0).then_some((ws.ws_col, ws.ws_row))
    }
}

fn set_raw(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills the local struct.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let saved = t;
    // SAFETY: cfmakeraw edits the local struct.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: tcsetattr reads the local struct.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(saved)
}

/// Our stdin/stdout; a terminal stdin is put in raw mode and restored on exit.
#[derive(Debug)]
pub struct Stdio {
    /// Whether stdin can still deliver input (false after EOF or when it cannot be polled).
    pub input_open: bool,
    saved: Option<libc::termios>,
}

impl Stdio {
    fn new() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        let saved = if unsafe { libc::isatty(libc::STDIN_FILENO) } == 1 {
            match set_raw(libc::STDIN_FILENO) {
                Ok(t) => Some(t),
                Err(e) => {
                    log::warn!("cannot put the terminal in raw mode: {e}");
                    None
                }
            }
        } else {
            None
        };
        Self {
            input_open: true,
            saved,
        }
    }
}

impl Drop for Stdio {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the settings read at start-up from a local struct.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// An opened endpoint.
#[derive(Debug)]
pub enum HostEnd {
    /// No endpoint.
    Null,
    /// Stdin/stdout.
    Stdio(Stdio),
    /// A pseudo-terminal.
    Pty(Pty),
    /// A listening socket with its attached clients (slots, so each keeps its epoll id).
    Listen(Listener, Vec<Option<Client>>),
}

impl HostEnd {
    /// Open what `spec` names.
    pub fn open(spec: &HostSpec) -> Result<Self, HostError> {
        match spec {
            HostSpec::Null => Ok(Self::Null),
            HostSpec::Stdio => Ok(Self::Stdio(Stdio::new())),
            HostSpec::Pty => Pty::open().map(Self::Pty).map_err(HostError::Pty),
            HostSpec::Socket(path) => {
                let l = bind_unix(path)?;
                l.set_nonblocking(true).map_err(|source| HostError::Bind {
                    path: path.clone(),
                    source,
                })?;
                Ok(Self::Listen(Listener::Unix(l, path.clone()), empty_slots()))
            }
            HostSpec::Tcp(addr) => Ok(Self::Listen(Listener::Tcp(bind_tcp(addr)?), empty_slots())),
            HostSpec::Telnet(addr) => Ok(Self::Listen(
                Listener::Telnet(bind_tcp(addr)?),
                empty_slots(),
            )),
        }
    }

    /// The descriptor whose readability means input (or a connection) is waiting.
    pub fn main_fd(&self) -> Option<RawFd> {
        match self {
            Self::Null => None,
            Self::Stdio(s) => s.input_open.then_some(libc::STDIN_FILENO),
            Self::Pty(p) => Some(p.master.as_raw_fd()),
            Self::Listen(l, _) => Some(l.raw_fd()),
        }
    }

    /// Where users find this endpoint (for the start-up message).
    pub fn describe(&self) -> String {
        match self {
            Self::Null => "no endpoint".into(),
            Self::Stdio(_) => "stdio".into(),
            Self::Pty(p) => format!("pty {}", p.path.display()),
            Self::Listen(Listener::Unix(_, p), _) => format!("socket {}", p.display()),
            Self::Listen(Listener::Tcp(l), _) => match l.local_addr() {
                Ok(a) => format!("tcp {a}"),
                Err(_) => "tcp".into(),
            },
            Self::Listen(Listener::Telnet(l), _) => match l.local_addr() {
                Ok(a) => format!("telnet {a}"),
                Err(_) => "telnet".into(),
            },
        }
    }
}

fn bind_tcp(addr: &SocketAddr) -> Result<TcpListener, HostError> {
    if !addr.ip().is_loopback() {
        log::warn!("console on TCP {addr} is reachable from other hosts, unauthenticated");
    }
    TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| HostError::BindTcp {
            addr: *addr,
            source,
        })
}

fn empty_slots() -> Vec<Option<Client>> {
    (0..MAX_CLIENTS).map(|_| None).collect()
}

/// Bind a Unix socket, replacing a stale socket file but never a live one or a non-socket.
fn bind_unix(path: &Path) -> Result<UnixListener, HostError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(HostError::NotASocket(path.to_owned()));
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(HostError::SocketInUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| HostError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Read from a raw descriptor without taking ownership of it.
pub fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Write all of `data` to stdout, blocking as needed.
pub fn write_stdout(data: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(data)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_specs() {
        assert_eq!("stdio".parse::<HostSpec>().unwrap(), HostSpec::Stdio);
        assert_eq!("pty".parse::<HostSpec>().unwrap(), HostSpec::Pty);
        assert_eq!(
            "socket=/run/c.sock".parse::<HostSpec>().unwrap(),
            HostSpec::Socket("/run/c.sock".into())
        );
        assert_eq!(
            "tcp=4555".parse::<HostSpec>().unwrap(),
            HostSpec::Tcp("127.0.0.1:4555".parse().unwrap())
        );
        assert_eq!(
            "tcp=[::1]:4555".parse::<HostSpec>().unwrap(),
            HostSpec::Tcp("[::1]:4555".parse().unwrap())
        );
        assert_eq!(
            "telnet=4556".parse::<HostSpec>().unwrap(),
            HostSpec::Telnet("127.0.0.1:4556".parse().unwrap())
        );
        for bad in ["", "tty", "socket=", "tcp=host", "tcp=99999", "telnet="] {
            assert!(bad.parse::<HostSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pty_reports_window_size_set_by_its_user() {
        let pty = Pty::open().unwrap();
        let user = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pty.path)
            .unwrap();
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 132,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the local struct.
        let rc = unsafe { libc::ioctl(user.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0);
        assert_eq!(pty.window_size(), Some((132, 40)));
    }

    #[test]
    fn live_socket_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let first = HostEnd::open(&HostSpec::Socket(path.clone())).unwrap();
        assert!(matches!(
            HostEnd::open(&HostSpec::Socket(path.clone())),
            Err(HostError::SocketInUse(_))
        ));
        drop(first);
        assert!(!path.exists(), "socket file removed with its listener");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            HostEnd::open(&HostSpec::Socket(file)),
            Err(HostError::NotASocket(_))
        ));
    }
}

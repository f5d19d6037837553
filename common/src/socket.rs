//! Where frontend connections come from: a socket we bind, an inherited listening socket
//! (`--fd` or systemd activation), or a socket the frontend listens on (`--client`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::{DaemonArgs, Error, Result};

/// A source of frontend connections.
pub enum ConnectionSource {
    /// We accept connections.
    Listen {
        /// The listening socket.
        listener: UnixListener,
        /// The path to remove on exit, when we created it.
        owned_path: Option<PathBuf>,
    },
    /// We connect to the frontend.
    Client(PathBuf),
}

impl ConnectionSource {
    /// Pick the source the command line (or the environment, for socket activation) asks for.
    pub fn from_args(args: &DaemonArgs) -> Result<Self> {
        if let Some(fd) = args.fd {
            return Ok(Self::Listen {
                listener: listener_from_fd(fd)?,
                owned_path: None,
            });
        }
        if let Some(path) = &args.socket {
            if args.client {
                return Ok(Self::Client(path.clone()));
            }
            return Ok(Self::Listen {
                listener: bind(path)?,
                owned_path: Some(path.clone()),
            });
        }
        let fds: Vec<RawFd> = sd_notify::listen_fds()
            .map(|fds| fds.collect())
            .unwrap_or_default();
        match fds.len() {
            0 => Err(Error::NoSocket),
            1 => Ok(Self::Listen {
                listener: listener_from_fd(fds[0])?,
                owned_path: None,
            }),
            n => Err(Error::ActivationFdCount(n)),
        }
    }
}

/// Bind `path`, replacing a stale socket file but never a live one or a non-socket.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            return Err(Error::MissingDirectory {
                path: path.to_owned(),
                dir: dir.to_owned(),
            });
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket(path.to_owned()));
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_owned()));
            }
            // Nobody listens: a leftover of a daemon that did not exit cleanly.
            log::info!("removing stale socket {}", path.display());
            let _ = std::fs::remove_file(path);
        }
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|source| Error::Listen {
        path: path.to_owned(),
        source,
    })
}

fn listener_from_fd(fd: RawFd) -> Result<UnixListener> {
    if !is_listening_unix_socket(fd) {
        return Err(Error::BadListenFd { fd });
    }
    // SAFETY: `fd` was handed to us (--fd or LISTEN_FDS) for our exclusive use, and we just
    // checked that it is an open, listening Unix socket; nothing else in the process owns it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // Inherited descriptors may lack FD_CLOEXEC; nothing we might exec should keep it.
    // SAFETY: fcntl on a descriptor we own, no pointers involved.
    unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(listener)
}

fn is_listening_unix_socket(fd: RawFd) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the out-pointers point to properly sized locals; an invalid fd just fails.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut accepting as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 || accepting == 0 {
        return false;
    }
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut domain as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && domain == libc::AF_UNIX
}

/// Connect to a frontend's socket, retrying until it accepts or `stop()` says to give up.
pub fn connect_retrying(path: &Path, mut stop: impl FnMut() -> bool) -> io::Result<UnixStream> {
    let mut delay = std::time::Duration::from_millis(20);
    let mut logged = false;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if !logged {
                    log::info!("waiting for the frontend socket {} ({e})", path.display());
                    logged = true;
                }
            }
        }
        if stop() {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(std::time::Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_live_socket_replaces_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = bind(&path).unwrap();
        assert!(matches!(bind(&path), Err(Error::SocketInUse(_))));
        drop(live);
        // The file is still there but nobody listens: it must be replaced.
        assert!(path.exists());
        bind(&path).unwrap();
    }

    #[test]
    fn explains_missing_directory_and_non_socket() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/s.sock");
        let err = bind(&missing).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(Error::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn fd_must_be_a_listening_socket() {
        let file = tempfile::tempfile().unwrap();
        assert!(!is_listening_unix_socket(file.as_raw_fd()));
        let dir = tempfile::tempdir().unwrap();
        let l = UnixListener::bind(dir.path().join("l")).unwrap();
        assert!(is_listening_unix_socket(l.as_raw_fd()));
    }
}

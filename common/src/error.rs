use std::io;
use std::path::PathBuf;

/// Why a daemon could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// None of --socket, --fd or systemd socket activation was given.
    #[error(
        "no socket to serve: pass --socket PATH, --fd N, or start under systemd socket activation"
    )]
    NoSocket,
    /// The socket's directory does not exist.
    #[error("cannot listen on {path}: directory {dir} does not exist")]
    MissingDirectory {
        /// Socket path.
        path: PathBuf,
        /// Its missing parent.
        dir: PathBuf,
    },
    /// A live process already accepts connections on the socket path.
    #[error("socket {0} is already served by a live process; stop it or choose another path")]
    SocketInUse(PathBuf),
    /// The socket path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding or listening failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The inherited descriptor is unusable.
    #[error("file descriptor {fd} is not a listening Unix socket")]
    BadListenFd {
        /// The descriptor number.
        fd: i32,
    },
    /// systemd passed a number of sockets other than one.
    #[error("socket activation passed {0} sockets; exactly one is supported")]
    ActivationFdCount(usize),
    /// Accepting a connection failed.
    #[error("cannot accept a frontend connection")]
    Accept(#[source] io::Error),
    /// Setting up signal handling failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] io::Error),
    /// vhost-user-backend refused to set up the device.
    #[error("cannot start the vhost-user device: {0}")]
    Daemon(String),
    /// Creating the relay between frontend and backend failed.
    #[error("cannot set up the vhost-user relay")]
    Relay(#[source] io::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

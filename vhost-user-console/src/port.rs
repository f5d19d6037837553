//! A console port: its host endpoint, the log of its output, the history replayed to clients
//! that attach later, and the input waiting for the guest.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use crate::host::{read_fd, write_stdout, HostEnd, HostError, HostSpec};

/// Input (host -> guest) held while the guest posts no receive buffers; beyond this the
/// daemon stops reading the endpoint, so the kernel's flow control holds the writer.
pub const INPUT_LIMIT: usize = 64 * 1024;
/// Output a client may have waiting beyond the replayed history before the port stops taking
/// guest output (for a while, see [`crate::backend`]) to let it catch up.
pub const CLIENT_SLACK: usize = 1024 * 1024;

/// How a port was configured on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Name shown to the guest (`/dev/virtio-ports/NAME`); ports 1.. need one.
    pub name: Option<String>,
    /// Host endpoint.
    pub host: HostSpec,
    /// File that records all guest output of this port.
    pub log: Option<PathBuf>,
}

/// Why a port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The endpoint failed to open.
    #[error("port {port}: {source}")]
    Host {
        /// Port number.
        port: u32,
        /// Cause.
        #[source]
        source: HostError,
    },
    /// The log file failed to open.
    #[error("port {port}: cannot open log file {path}")]
    Log {
        /// Port number.
        port: u32,
        /// Log path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The most recent output, bounded.
#[derive(Debug)]
pub struct History {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl History {
    /// An empty history keeping at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity.min(1 << 20)),
            capacity,
        }
    }

    /// Append, forgetting the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(self.capacity)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    /// The kept bytes, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        self.bytes.iter().copied()
    }
}

/// What reading an endpoint produced.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Nothing more to read now.
    Idle,
    /// Bytes were added to the input.
    Read,
}

/// A console port.
#[derive(Debug)]
pub struct Port {
    /// Port number (0 is the console of a single-port device).
    pub id: u32,
    /// Name given to the guest.
    pub name: Option<String>,
    /// Host endpoint.
    pub host: HostEnd,
    log: Option<(File, PathBuf)>,
    log_errors: u64,
    history: History,
    /// Input waiting for receive buffers, in arrival order.
    pub input: VecDeque<u8>,
    /// The guest takes input on this port (single port: always; multiport: after PORT_READY
    /// for the console, after the guest opened it for other ports).
    pub guest_open: bool,
    /// The last window size a telnet client reported, not yet taken by the device.
    pub reported_size: Option<(u16, u16)>,
    /// Output bytes a pty or stdout could not take.
    pub dropped: u64,
    /// Writes that lost output, for a log line at counts 1, 2, 4, 8...
    lossy_writes: u64,
    history_capacity: usize,
}

impl Port {
    /// Open the endpoint and log file of `config`.
    pub fn open(id: u32, config: &PortConfig, history: usize) -> Result<Self, PortError> {
        let host =
            HostEnd::open(&config.host).map_err(|source| PortError::Host { port: id, source })?;
        let log = match &config.log {
            Some(path) => Some((
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| PortError::Log {
                        port: id,
                        path: path.clone(),
                        source,
                    })?,
                path.clone(),
            )),
            None => None,
        };
        Ok(Self {
            id,
            name: config.name.clone(),
            host,
            log,
            log_errors: 0,
            history: History::new(history),
            input: VecDeque::new(),
            guest_open: false,
            reported_size: None,
            dropped: 0,
            lossy_writes: 0,
            history_capacity: history,
        })
    }

    /// Deliver guest output to the log, the history and the endpoint. Never blocks on a client:
    /// what a client cannot take now waits in its own buffer.
    pub fn output(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some((file, path)) = &mut self.log {
            if let Err(e) = file.write_all(data) {
                self.log_errors += 1;
                if self.log_errors.is_power_of_two() {
                    log::warn!(
                        "port {}: cannot write log {} ({} failures): {e}",
                        self.id,
                        path.display(),
                        self.log_errors
                    );
                }
            }
        }
        self.history.push(data);
        match &mut self.host {
            HostEnd::Null => {}
            HostEnd::Stdio(_) => {
                if write_stdout(data).is_err() {
                    self.note_dropped(data.len(), "stdout refused it");
                }
            }
            HostEnd::Pty(pty) => {
                // Nobody may be reading the pty: what it cannot take is dropped, never waited for.
                let mut rest = data;
                while !rest.is_empty() {
                    match pty.master.write(rest) {
                        Ok(0) => break,
                        Ok(n) => rest = &rest[n..],
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
                if !rest.is_empty() {
                    self.note_dropped(rest.len(), "nobody reads the pty");
                }
            }
            HostEnd::Listen(_, clients) => {
                for c in clients.iter_mut().flatten().filter(|c| !c.dead) {
                    if let Err(e) = c.send(data) {
                        log::info!("port {}: client detached ({e})", self.id);
                        c.dead = true;
                    }
                }
            }
        }
    }

    fn note_dropped(&mut self, bytes: usize, why: &str) {
        self.dropped += bytes as u64;
        self.lossy_writes += 1;
        if self.lossy_writes.is_power_of_two() {
            log::info!(
                "port {}: guest output dropped ({why}); {} bytes so far (the log and history keep it)",
                self.id,
                self.dropped
            );
        }
    }

    /// Whether a client has so much output waiting that the port should stop taking more.
    pub fn output_blocked(&self) -> bool {
        let limit = self.history_capacity + CLIENT_SLACK;
        match &self.host {
            HostEnd::Listen(_, clients) => clients
                .iter()
                .flatten()
                .any(|c| !c.dead && c.pending.len() >= limit),
            _ => false,
        }
    }

    /// Clients stuck beyond the output limit for longer than `patience`: detach them so the
    /// guest never waits on a client that stopped reading.
    pub fn detach_stalled_clients(&mut self, patience: std::time::Duration) {
        let limit = self.history_capacity + CLIENT_SLACK;
        if let HostEnd::Listen(_, clients) = &mut self.host {
            for c in clients.iter_mut().flatten().filter(|c| !c.dead) {
                if c.pending.len() >= limit && c.last_progress.elapsed() >= patience {
                    log::warn!(
                        "port {}: a client stopped reading for {patience:?}; detaching it (it can re-attach and gets the history)",
                        self.id
                    );
                    c.dead = true;
                }
            }
        }
    }

    /// Whether the input buffer is full (stop reading the endpoint).
    pub fn input_full(&self) -> bool {
        self.input.len() >= INPUT_LIMIT
    }

    /// Read input from the endpoint's main descriptor (slot 0) or client `slot - 1`.
    pub fn read_input(&mut self, slot: usize) -> ReadOutcome {
        let room = INPUT_LIMIT.saturating_sub(self.input.len());
        if room == 0 {
            return ReadOutcome::Idle;
        }
        let mut buf = [0u8; 16 * 1024];
        let buf = &mut buf[..room.min(16 * 1024)];
        let id = self.id;
        let result = match (&mut self.host, slot) {
            (HostEnd::Stdio(s), 0) if s.input_open => match read_fd(libc::STDIN_FILENO, buf) {
                Ok(0) | Err(_) => {
                    log::info!("port {id}: end of stdin");
                    s.input_open = false;
                    return ReadOutcome::Idle;
                }
                Ok(n) => Ok(n),
            },
            (HostEnd::Pty(p), 0) => p.master.read(buf),
            (HostEnd::Listen(_, clients), s) if s > 0 => {
                let Some(Some(c)) = clients.get_mut(s - 1) else {
                    return ReadOutcome::Idle;
                };
                if c.dead {
                    return ReadOutcome::Idle;
                }
                match c.conn.read(buf) {
                    Ok(n) if n > 0 && c.telnet.is_some() => {
                        let mut reply = Vec::new();
                        if let Some(t) = &mut c.telnet {
                            if let Some(size) = t.decode(&buf[..n], &mut self.input, &mut reply) {
                                self.reported_size = Some(size);
                            }
                        }
                        if reply.is_empty() {
                            return ReadOutcome::Read;
                        }
                        if let Err(e) = c.send_raw(&reply) {
                            log::info!("port {id}: client detached ({e})");
                            c.dead = true;
                        }
                        return ReadOutcome::Read;
                    }
                    Ok(0) => {
                        log::info!("port {id}: client detached");
                        c.dead = true;
                        return ReadOutcome::Idle;
                    }
                    Err(e)
                        if e.kind() != io::ErrorKind::WouldBlock
                            && e.kind() != io::ErrorKind::Interrupted =>
                    {
                        log::info!("port {id}: client detached ({e})");
                        c.dead = true;
                        return ReadOutcome::Idle;
                    }
                    other => other,
                }
            }
            _ => return ReadOutcome::Idle,
        };
        match result {
            Ok(n) if n > 0 => {
                self.input.extend(&buf[..n]);
                ReadOutcome::Read
            }
            _ => ReadOutcome::Idle,
        }
    }

    /// Accept waiting connections on a listening endpoint; each new client first gets the
    /// history. Connections beyond the client slots are told so and closed.
    pub fn accept_clients(&mut self) {
        let id = self.id;
        let HostEnd::Listen(listener, clients) = &mut self.host else {
            return;
        };
        loop {
            let conn = match listener.accept() {
                Ok(Some(c)) => c,
                Ok(None) => return,
                Err(e) => {
                    log::warn!("port {id}: accept failed: {e}");
                    return;
                }
            };
            let Some(slot) = clients.iter().position(|c| c.is_none()) else {
                let mut conn = conn;
                let _ = conn.write(b"vhost-user-console: too many clients attached\r\n");
                continue;
            };
            match listener.client(conn, self.history.iter()) {
                Ok(c) => {
                    log::info!("port {id}: client attached");
                    clients[slot] = Some(c);
                }
                Err(e) => log::warn!("port {id}: cannot set up a client: {e}"),
            }
        }
    }

    /// Write pending output of client `slot - 1` as far as it goes.
    pub fn flush_client(&mut self, slot: usize) {
        let id = self.id;
        if let HostEnd::Listen(_, clients) = &mut self.host {
            if let Some(Some(c)) = slot.checked_sub(1).and_then(|i| clients.get_mut(i)) {
                if !c.dead {
                    if let Err(e) = c.flush_pending() {
                        log::info!("port {id}: client detached ({e})");
                        c.dead = true;
                    }
                }
            }
        }
    }

    /// Where users find the endpoint.
    pub fn describe(&self) -> String {
        self.host.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_bytes() {
        let mut h = History::new(5);
        h.push(b"abc");
        h.push(b"defg");
        assert_eq!(h.iter().collect::<Vec<_>>(), b"cdefg");
        h.push(b"0123456789");
        assert_eq!(h.iter().collect::<Vec<_>>(), b"56789");
    }

    #[test]
    fn log_gets_every_byte_and_attaching_client_gets_history() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let log = dir.path().join("c.log");
        let mut port = Port::open(
            0,
            &PortConfig {
                name: None,
                host: HostSpec::Socket(sock.clone()),
                log: Some(log.clone()),
            },
            3,
        )
        .unwrap();
        port.output(b"boot: ok\n");
        let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        port.accept_clients();
        port.flush_client(1);
        port.output(b"login:");
        let mut got = [0u8; 9];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ok\nlogin:");
        assert_eq!(std::fs::read(&log).unwrap(), b"boot: ok\nlogin:");

        client.write_all(b"root\n").unwrap();
        while port.read_input(1) != ReadOutcome::Read {}
        assert_eq!(port.input.iter().copied().collect::<Vec<_>>(), b"root\n");
    }

    #[test]
    fn unread_pty_drops_output_instead_of_blocking() {
        let mut port = Port::open(
            0,
            &PortConfig {
                name: None,
                host: HostSpec::Pty,
                log: None,
            },
            64,
        )
        .unwrap();
        // Far beyond what a pty buffers; nobody has the other side open.
        port.output(&vec![b'x'; 1 << 20]);
        assert!(port.dropped > 0);
        assert_eq!(port.history.iter().count(), 64);
    }
}

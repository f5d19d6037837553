//! The backend-request channel of the vhost-user spec ("backend communication channel"): the
//! socket a frontend hands over with `VHOST_USER_SET_BACKEND_REQ_FD` once
//! `VHOST_USER_PROTOCOL_F_BACKEND_REQ` is negotiated, on which the backend sends requests of its
//! own. The [`relay`](crate::relay) passes one to [`DeviceBackend::backend_channel`].
//!
//! The frontend is not trusted to answer: waits for its acknowledgement are bounded by
//! [`ACK_TIMEOUT`], and a channel that failed once (timeout, closed, garbled reply) stays failed
//! rather than reading a late reply as the answer to a later request.
//!
//! [`DeviceBackend::backend_channel`]: crate::DeviceBackend::backend_channel

use std::fmt;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::relay::{self, Message, FLAG_NEED_REPLY, FLAG_REPLY, FLAG_VERSION};

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const REQ_CONFIG_CHANGE: u32 = 2;

/// Longest wait for the frontend to take a request or acknowledge it.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The device's handle on the frontend's backend-request channel; clones share one socket.
#[derive(Clone)]
pub struct BackendChannel(Arc<Mutex<Channel>>);

struct Channel {
    sock: UnixStream,
    /// `VHOST_USER_PROTOCOL_F_REPLY_ACK` was negotiated: ask for, and wait for, an ack.
    reply_ack: bool,
    failed: bool,
}

impl BackendChannel {
    /// Wrap the channel's socket; with `reply_ack` every request asks for an acknowledgement.
    pub fn new(sock: UnixStream, reply_ack: bool) -> io::Result<Self> {
        sock.set_read_timeout(Some(ACK_TIMEOUT))?;
        sock.set_write_timeout(Some(ACK_TIMEOUT))?;
        Ok(Self(Arc::new(Mutex::new(Channel {
            sock,
            reply_ack,
            failed: false,
        }))))
    }

    /// Tell the frontend that the device's config space changed; it reads it again
    /// (`VHOST_USER_GET_CONFIG`) and raises the guest's config-change interrupt.
    ///
    /// Blocks for up to [`ACK_TIMEOUT`]: call it without holding locks that the vhost-user
    /// request thread needs (a frontend may send `GET_CONFIG` before it acknowledges).
    pub fn config_changed(&self) -> io::Result<()> {
        let mut channel = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if channel.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the backend request channel failed earlier",
            ));
        }
        match channel.request(REQ_CONFIG_CHANGE) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(status)) => Err(io::Error::other(format!(
                "the frontend refused the request (status {status})"
            ))),
            Err(e) => {
                channel.failed = true;
                Err(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the frontend did not answer within {ACK_TIMEOUT:?}"),
                    ),
                    _ => e,
                })
            }
        }
    }

    /// Whether `self` and `other` are handles on the same channel.
    pub fn same_as(&self, other: &BackendChannel) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for BackendChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BackendChannel")
    }
}

impl Channel {
    /// Send a request without payload; the inner result is the frontend's answer (a non-zero
    /// ack status), the outer one the channel's health.
    fn request(&self, request: u32) -> io::Result<Result<(), u64>> {
        let flags = if self.reply_ack {
            FLAG_VERSION | FLAG_NEED_REPLY
        } else {
            FLAG_VERSION
        };
        relay::send_message(&self.sock, &Message::new(request, flags, Vec::new()))?;
        if !self.reply_ack {
            return Ok(Ok(()));
        }
        let reply = relay::recv_message(&self.sock)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the frontend closed the backend request channel",
            )
        })?;
        match reply.payload_u64() {
            Some(status)
                if reply.request() == request
                    && reply.flags() & FLAG_REPLY != 0
                    && reply.payload.len() == 8 =>
            {
                Ok(if status == 0 { Ok(()) } else { Err(status) })
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "malformed acknowledgement (request {}, flags {:#x}, {} bytes)",
                    reply.request(),
                    reply.flags(),
                    reply.payload.len()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(reply_ack: bool) -> (BackendChannel, UnixStream) {
        let (ours, frontend) = UnixStream::pair().unwrap();
        (BackendChannel::new(ours, reply_ack).unwrap(), frontend)
    }

    #[test]
    fn config_change_without_reply_ack_asks_for_nothing() {
        let (channel, frontend) = pair(false);
        channel.config_changed().unwrap();
        let msg = relay::recv_message(&frontend).unwrap().unwrap();
        assert_eq!(msg.request(), REQ_CONFIG_CHANGE);
        assert_eq!(msg.flags(), FLAG_VERSION);
        assert!(msg.payload.is_empty());
    }

    #[test]
    fn config_change_waits_for_the_ack_and_reports_a_refusal() {
        let (channel, frontend) = pair(true);
        let answer = |status: u64| {
            let msg = relay::recv_message(&frontend).unwrap().unwrap();
            assert_eq!(msg.request(), REQ_CONFIG_CHANGE);
            assert_eq!(msg.flags(), FLAG_VERSION | FLAG_NEED_REPLY);
            let reply = Message::new(
                REQ_CONFIG_CHANGE,
                FLAG_VERSION | FLAG_REPLY,
                status.to_le_bytes().to_vec(),
            );
            relay::send_message(&frontend, &reply).unwrap();
        };
        std::thread::scope(|s| {
            s.spawn(|| answer(0));
            channel.config_changed().unwrap();
        });
        std::thread::scope(|s| {
            s.spawn(|| answer(38));
            let e = channel.config_changed().unwrap_err();
            assert!(e.to_string().contains("status 38"), "{e}");
        });
        // A refusal leaves the channel usable.
        std::thread::scope(|s| {
            s.spawn(|| answer(0));
            channel.config_changed().unwrap();
        });
    }

    #[test]
    fn a_silent_frontend_costs_one_timeout_then_nothing() {
        let (channel, frontend) = pair(true);
        let started = std::time::Instant::now();
        let e = channel.config_changed().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() >= ACK_TIMEOUT);
        let started = std::time::Instant::now();
        assert!(channel.config_changed().is_err());
        assert!(started.elapsed() < ACK_TIMEOUT);
        // Only the first request was sent.
        let msg = relay::recv_message(&frontend).unwrap().unwrap();
        assert_eq!(msg.request(), REQ_CONFIG_CHANGE);
        frontend.set_nonblocking(true).unwrap();
        assert!(relay::recv_message(&frontend).is_err());
    }

    #[test]
    fn a_garbled_ack_fails_the_channel() {
        let (channel, frontend) = pair(true);
        std::thread::scope(|s| {
            s.spawn(|| {
                relay::recv_message(&frontend).unwrap().unwrap();
                // A reply to some other request.
                let reply = Message::new(7, FLAG_VERSION | FLAG_REPLY, 0u64.to_le_bytes().to_vec());
                relay::send_message(&frontend, &reply).unwrap();
            });
            assert_eq!(
                channel.config_changed().unwrap_err().kind(),
                io::ErrorKind::InvalidData
            );
        });
        assert_eq!(
            channel.config_changed().unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }
}

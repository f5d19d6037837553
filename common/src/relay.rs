//! A vhost-user control-message relay between the frontend and vhost-user-backend.
//!
//! The serve loop never hands the frontend's socket to vhost-user-backend directly. Messages
//! (with the file descriptors they carry) pass through this relay, which forwards them as they
//! are except where the frontend does something the vhost crate would answer by ending the
//! session although the spec and real frontends allow it:
//!
//! * QEMU 10's virtio-net (and other devices) send `VHOST_USER_SET_VRING_ENABLE` at device
//!   reset before `VHOST_USER_SET_FEATURES`. vhost 0.18 checks that `VHOST_USER_F_PROTOCOL_FEATURES`
//!   was acked and otherwise fails the request, and vhost-user-backend then drops the
//!   connection, so the guest's device never comes up. Before the features are acked, a ring
//!   is not running and enabling or disabling it has no effect, so the relay answers the
//!   request itself (with an ack when one was asked for) instead of forwarding it.
//!
//! The relay also keeps a duplicate of the socket the frontend hands over with
//! `VHOST_USER_SET_BACKEND_REQ_FD` and gives it to the device as a [`BackendChannel`]: vhost
//! 0.18's own `Backend` proxy cannot send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
//!
//! It tells the device, too, when the frontend enables or disables a ring: vhost-user-backend
//! passes `VHOST_USER_SET_VRING_ENABLE` to no backend hook, and a device whose host side has to
//! follow (a tap queue leaving its multi-queue tap) needs to know.
//!
//! Only control messages cross the relay: the data path (guest memory, kick and call
//! eventfds, the backend-request channel) goes directly between frontend and backend.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::BackendChannel;

/// vhost-user message header: request, flags, payload size (all little-endian u32).
pub const HEADER_SIZE: usize = 12;
/// Largest payload we relay; vhost 0.18 itself accepts at most 4 KiB.
pub const MAX_PAYLOAD: usize = 0x1000;
/// Most descriptors one message may carry (vhost's MAX_ATTACHED_FD_ENTRIES).
pub const MAX_FDS: usize = 32;

const REQ_SET_FEATURES: u32 = 2;
const REQ_RESET_OWNER: u32 = 4;
const REQ_SET_PROTOCOL_FEATURES: u32 = 16;
const REQ_SET_VRING_ENABLE: u32 = 18;
const REQ_SET_BACKEND_REQ_FD: u32 = 21;
/// Header flags: protocol version 1, a reply, a reply wanted.
pub(crate) const FLAG_VERSION: u32 = 0x1;
pub(crate) const FLAG_REPLY: u32 = 0x4;
pub(crate) const FLAG_NEED_REPLY: u32 = 0x8;
const F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;
const PROTOCOL_F_BACKEND_REQ: u64 = 1 << 5;

/// One vhost-user message and the descriptors that came with it.
#[derive(Debug)]
pub struct Message {
    /// The raw header.
    pub header: [u8; HEADER_SIZE],
    /// The payload (header's size field bytes).
    pub payload: Vec<u8>,
    /// Attached descriptors.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// A message with a header built from `request`, `flags` and the payload's size.
    pub fn new(request: u32, flags: u32, payload: Vec<u8>) -> Self {
        let mut header = [0u8; HEADER_SIZE];
        header[0..4].copy_from_slice(&request.to_le_bytes());
        header[4..8].copy_from_slice(&flags.to_le_bytes());
        header[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        Self {
            header,
            payload,
            fds: Vec::new(),
        }
    }

    /// The request code.
    pub fn request(&self) -> u32 {
        u32::from_le_bytes([
            self.header[0],
            self.header[1],
            self.header[2],
            self.header[3],
        ])
    }

    /// The flags word.
    pub fn flags(&self) -> u32 {
        u32::from_le_bytes([
            self.header[4],
            self.header[5],
            self.header[6],
            self.header[7],
        ])
    }

    /// The payload's first eight bytes as a little-endian u64 (a feature mask, an ack status).
    pub fn payload_u64(&self) -> Option<u64> {
        let bytes: [u8; 8] = self.payload.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// Read one whole message. `Ok(None)` means the peer closed the connection cleanly.
pub fn recv_message(sock: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER_SIZE];
    let (n, mut fds) = recv_with_fds(sock, &mut header)?;
    if n == 0 {
        return Ok(None);
    }
    let mut stream = sock;
    if n < HEADER_SIZE {
        stream.read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("vhost-user message payload of {size} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    let mut payload = vec![0u8; size];
    let mut got = 0;
    while got < size {
        let (n, more) = recv_with_fds(sock, &mut payload[got..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        fds.extend(more);
        got += n;
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many file descriptors attached to one vhost-user message",
        ));
    }
    Ok(Some(Message {
        header,
        payload,
        fds,
    }))
}

/// Write one whole message, passing its descriptors along.
pub fn send_message(sock: &UnixStream, msg: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut data = Vec::with_capacity(HEADER_SIZE + msg.payload.len());
    data.extend_from_slice(&msg.header);
    data.extend_from_slice(&msg.payload);
    let sent = send_with_fds(sock, &data, &fds)?;
    let mut stream = sock;
    stream.write_all(&data[sent..])
}

fn recv_with_fds(sock: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; we fill in the pointers next.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf) as _;
    let n = loop {
        // SAFETY: msg points to a valid iovec over `buf` and a control buffer of the size
        // given; both outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, bounded by
    // msg_controllen.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points into cmsg_buf (see above).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is a pure computation.
            let data_len = hdr.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` descriptors inside this cmsg.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const RawFd;
            for i in 0..count {
                // SAFETY: reading the i-th descriptor within the bounds computed above;
                // read_unaligned because CMSG_DATA need not be aligned for RawFd.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: SCM_RIGHTS installed this fresh descriptor in our table; we are its
                // only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: advancing within the kernel-filled control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "file descriptors truncated on a vhost-user message",
        ));
    }
    Ok((n, fds))
}

fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let mut cmsg_buf = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let fd_bytes = std::mem::size_of_val(fds);
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        if space > std::mem::size_of_val(&cmsg_buf) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds"));
        }
        msg.msg_control = cmsg_buf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes, enough for one cmsghdr with the
        // descriptors; CMSG_FIRSTHDR is non-null because msg_controllen >= sizeof(cmsghdr).
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: msg points to valid buffers that outlive the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Per-connection protocol state the relay needs for its decisions.
#[derive(Debug, Default)]
pub struct RelayState {
    acked_features: u64,
    acked_protocol_features: u64,
    /// SET_VRING_ENABLE requests answered by the relay itself.
    pub answered_early_enables: u64,
}

impl RelayState {
    /// Decide what to do with a frontend message: `Some(reply)` means answer it here (the
    /// reply may be empty when the frontend wants none) instead of forwarding it.
    pub fn intercept(&mut self, msg: &Message) -> Option<Option<Message>> {
        match msg.request() {
            REQ_SET_FEATURES => {
                if let Some(f) = msg.payload_u64() {
                    self.acked_features = f;
                }
                None
            }
            REQ_SET_PROTOCOL_FEATURES => {
                if let Some(f) = msg.payload_u64() {
                    self.acked_protocol_features = f;
                }
                None
            }
            REQ_RESET_OWNER => {
                self.acked_features = 0;
                self.acked_protocol_features = 0;
                None
            }
            REQ_SET_VRING_ENABLE if self.acked_features & F_PROTOCOL_FEATURES == 0 => {
                self.answered_early_enables += 1;
                log::debug!("answering SET_VRING_ENABLE sent before the features were acked");
                if msg.flags() & FLAG_NEED_REPLY == 0 {
                    return Some(None);
                }
                Some(Some(Message::new(
                    REQ_SET_VRING_ENABLE,
                    FLAG_VERSION | FLAG_REPLY,
                    0u64.to_le_bytes().to_vec(),
                )))
            }
            _ => None,
        }
    }

    /// For a forwarded `VHOST_USER_SET_VRING_ENABLE`: the queue index and whether it is being
    /// enabled. `None` for anything else or a short payload.
    pub fn vring_enable(&self, msg: &Message) -> Option<(u32, bool)> {
        if msg.request() != REQ_SET_VRING_ENABLE {
            return None;
        }
        let state = msg.payload_u64()?;
        Some((state as u32, (state >> 32) as u32 != 0))
    }

    /// For a forwarded `VHOST_USER_SET_BACKEND_REQ_FD` with BACKEND_REQ negotiated: the device's
    /// own handle on the channel (a duplicate of the descriptor; vhost-user-backend keeps the
    /// original). Anything else, or a descriptor that is not a Unix stream socket: `None`.
    pub fn backend_channel(&self, msg: &Message) -> Option<BackendChannel> {
        if msg.request() != REQ_SET_BACKEND_REQ_FD
            || self.acked_protocol_features & PROTOCOL_F_BACKEND_REQ == 0
        {
            return None;
        }
        let [fd] = msg.fds.as_slice() else {
            return None;
        };
        if !is_unix_stream(fd) {
            log::warn!("the backend request channel is not a Unix stream socket; ignored");
            return None;
        }
        let reply_ack = self.acked_protocol_features & PROTOCOL_F_REPLY_ACK != 0;
        match fd
            .try_clone()
            .and_then(|dup| BackendChannel::new(UnixStream::from(dup), reply_ack))
        {
            Ok(channel) => Some(channel),
            Err(e) => {
                log::warn!("cannot keep the backend request channel: {e}");
                None
            }
        }
    }
}

fn is_unix_stream(fd: &OwnedFd) -> bool {
    let get = |option: libc::c_int| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the local int.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                &mut value as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    get(libc::SO_DOMAIN) == Some(libc::AF_UNIX) && get(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Relay messages between `frontend` and `backend` until either side closes or fails, handing
/// each backend-request channel the frontend sets up to `on_channel` and telling `on_enable`
/// of each ring the frontend enables or disables (queue index, enabled), once the message has
/// gone on to the backend. Both sockets are shut down on return, so the other side sees the
/// end too.
pub fn run(
    frontend: UnixStream,
    backend: UnixStream,
    mut on_channel: impl FnMut(BackendChannel),
    mut on_enable: impl FnMut(u32, bool),
) -> io::Result<()> {
    let mut state = RelayState::default();
    let result = relay_loop(
        &frontend,
        &backend,
        &mut state,
        &mut on_channel,
        &mut on_enable,
    );
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
    result
}

fn relay_loop(
    frontend: &UnixStream,
    backend: &UnixStream,
    state: &mut RelayState,
    on_channel: &mut dyn FnMut(BackendChannel),
    on_enable: &mut dyn FnMut(u32, bool),
) -> io::Result<()> {
    let mut pfds = [
        libc::pollfd {
            fd: frontend.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: backend.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: pfds is a valid array of two pollfd structs.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if pfds[0].revents != 0 {
            let Some(msg) = recv_message(frontend)? else {
                log::debug!("frontend closed the connection");
                return Ok(());
            };
            match state.intercept(&msg) {
                None => {
                    if let Some(channel) = state.backend_channel(&msg) {
                        on_channel(channel);
                    }
                    send_message(backend, &msg)?;
                    if let Some((index, enabled)) = state.vring_enable(&msg) {
                        on_enable(index, enabled);
                    }
                }
                Some(Some(reply)) => send_message(frontend, &reply)?,
                Some(None) => {}
            }
        }
        if pfds[1].revents != 0 {
            let Some(msg) = recv_message(backend)? else {
                log::debug!("backend ended the session");
                return Ok(());
            };
            send_message(frontend, &msg)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    fn message(request: u32, flags: u32, payload: &[u8], fds: Vec<OwnedFd>) -> Message {
        Message {
            fds,
            ..Message::new(request, flags, payload.to_vec())
        }
    }

    fn vring_state(index: u32, num: u32) -> Vec<u8> {
        let mut v = index.to_le_bytes().to_vec();
        v.extend_from_slice(&num.to_le_bytes());
        v
    }

    struct Pair {
        frontend: UnixStream,
        backend: UnixStream,
        thread: std::thread::JoinHandle<io::Result<()>>,
    }

    fn relay_pair() -> Pair {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || run(relay_front, relay_back, |_| {}, |_, _| {}));
        Pair {
            frontend,
            backend,
            thread,
        }
    }

    #[test]
    fn early_vring_enable_is_acked_not_forwarded() {
        let p = relay_pair();
        let enable = message(
            REQ_SET_VRING_ENABLE,
            FLAG_VERSION | FLAG_NEED_REPLY,
            &vring_state(0, 0),
            vec![],
        );
        send_message(&p.frontend, &enable).unwrap();
        let reply = recv_message(&p.frontend).unwrap().unwrap();
        assert_eq!(reply.request(), REQ_SET_VRING_ENABLE);
        assert_eq!(reply.flags() & FLAG_REPLY, FLAG_REPLY);
        assert_eq!(reply.payload, 0u64.to_le_bytes());

        // Once PROTOCOL_FEATURES is acked the same request reaches the backend untouched.
        let features = message(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            &(F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes(),
            vec![],
        );
        send_message(&p.frontend, &features).unwrap();
        send_message(&p.frontend, &enable).unwrap();
        let first = recv_message(&p.backend).unwrap().unwrap();
        assert_eq!(first.request(), REQ_SET_FEATURES);
        let second = recv_message(&p.backend).unwrap().unwrap();
        assert_eq!(second.request(), REQ_SET_VRING_ENABLE);
        assert_eq!(second.payload, vring_state(0, 0));
        drop(p.frontend);
        p.thread.join().unwrap().unwrap();
    }

    #[test]
    fn the_device_hears_of_rings_enabled_and_disabled() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            run(
                relay_front,
                relay_back,
                |_| {},
                move |i, on| tx.send((i, on)).unwrap(),
            )
        });
        let enable = |index, on| {
            message(
                REQ_SET_VRING_ENABLE,
                FLAG_VERSION,
                &vring_state(index, on),
                vec![],
            )
        };
        // Answered by the relay before the features are acked: nothing to tell.
        send_message(&frontend, &enable(0, 1)).unwrap();
        let features = message(
            REQ_SET_FEATURES,
            FLAG_VERSION,
            &(F_PROTOCOL_FEATURES | 1 << 32).to_le_bytes(),
            vec![],
        );
        send_message(&frontend, &features).unwrap();
        send_message(&frontend, &enable(3, 0)).unwrap();
        send_message(&frontend, &enable(2, 1)).unwrap();
        for want in [REQ_SET_FEATURES, REQ_SET_VRING_ENABLE, REQ_SET_VRING_ENABLE] {
            assert_eq!(recv_message(&backend).unwrap().unwrap().request(), want);
        }
        drop(frontend);
        thread.join().unwrap().unwrap();
        assert_eq!(rx.iter().collect::<Vec<_>>(), [(3, false), (2, true)]);
    }

    #[test]
    fn descriptors_and_replies_pass_through() {
        let p = relay_pair();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"guest memory").unwrap();
        let fd: OwnedFd = file.try_clone().unwrap().into();
        send_message(&p.frontend, &message(5, FLAG_VERSION, &[7u8; 40], vec![fd])).unwrap();
        let got = recv_message(&p.backend).unwrap().unwrap();
        assert_eq!(got.request(), 5);
        assert_eq!(got.payload, [7u8; 40]);
        assert_eq!(got.fds.len(), 1);
        let mut received = std::fs::File::from(got.fds.into_iter().next().unwrap());
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "guest memory");

        send_message(
            &p.backend,
            &message(5, FLAG_VERSION | FLAG_REPLY, &[1, 2, 3], vec![]),
        )
        .unwrap();
        let reply = recv_message(&p.frontend).unwrap().unwrap();
        assert_eq!(reply.payload, [1, 2, 3]);

        // The backend ending the session ends the relay and closes the frontend side.
        drop(p.backend);
        p.thread.join().unwrap().unwrap();
        assert!(recv_message(&p.frontend).unwrap().is_none());
    }

    #[test]
    fn backend_request_channel_is_shared_with_the_device() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            run(
                relay_front,
                relay_back,
                move |c| tx.send(c).unwrap(),
                |_, _| {},
            )
        });
        let set_fd = |frontend_end: &UnixStream| {
            let fd: OwnedFd = frontend_end.try_clone().unwrap().into();
            message(REQ_SET_BACKEND_REQ_FD, FLAG_VERSION, &[], vec![fd])
        };
        let protocol = |bits: u64| {
            message(
                REQ_SET_PROTOCOL_FEATURES,
                FLAG_VERSION,
                &bits.to_le_bytes(),
                vec![],
            )
        };
        let (ours, theirs) = UnixStream::pair().unwrap();

        // Without BACKEND_REQ negotiated the device gets nothing; the message still passes.
        send_message(&frontend, &set_fd(&theirs)).unwrap();
        let got = recv_message(&backend).unwrap().unwrap();
        assert_eq!((got.request(), got.fds.len()), (REQ_SET_BACKEND_REQ_FD, 1));

        send_message(&frontend, &protocol(PROTOCOL_F_BACKEND_REQ)).unwrap();
        recv_message(&backend).unwrap().unwrap();
        send_message(&frontend, &set_fd(&theirs)).unwrap();
        let got = recv_message(&backend).unwrap().unwrap();
        assert_eq!((got.request(), got.fds.len()), (REQ_SET_BACKEND_REQ_FD, 1));
        let channel = rx.recv().unwrap();
        assert!(rx.try_recv().is_err(), "one channel for one message");
        channel.config_changed().unwrap();
        let msg = recv_message(&ours).unwrap().unwrap();
        assert_eq!((msg.request(), msg.flags()), (2, FLAG_VERSION));

        // A descriptor that is no stream socket is not handed over.
        let file: OwnedFd = tempfile::tempfile().unwrap().into();
        let bogus = message(REQ_SET_BACKEND_REQ_FD, FLAG_VERSION, &[], vec![file]);
        send_message(&frontend, &bogus).unwrap();
        recv_message(&backend).unwrap().unwrap();
        drop(frontend);
        thread.join().unwrap().unwrap();
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn oversized_message_ends_the_session_cleanly() {
        let p = relay_pair();
        let mut header = [0u8; HEADER_SIZE];
        header[0..4].copy_from_slice(&1u32.to_le_bytes());
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        (&p.frontend).write_all(&header).unwrap();
        assert!(p.thread.join().unwrap().is_err());
        assert!(recv_message(&p.backend).unwrap().is_none());
    }
}

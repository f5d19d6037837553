//! The host side of network tests: a private network namespace for the daemon's tap, a raw
//! packet socket on that tap (what the host sends to and receives from the guest), the
//! virtio-net header, and builders for the frames the tests and the benchmark send.
//!
//! Everything a test does on the network happens inside a namespace it made itself; the
//! namespace lives as long as its [`NetNs`] handle (and any process started in it).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// VIRTIO_NET_HDR_F_NEEDS_CSUM.
pub const HDR_F_NEEDS_CSUM: u8 = 1;
/// VIRTIO_NET_HDR_F_DATA_VALID.
pub const HDR_F_DATA_VALID: u8 = 2;
/// VIRTIO_NET_HDR_GSO_NONE.
pub const GSO_NONE: u8 = 0;
/// VIRTIO_NET_HDR_GSO_TCPV4.
pub const GSO_TCPV4: u8 = 1;
/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// An ethertype from the IEEE "local experimental" range, for test frames no stack answers.
pub const ETHERTYPE_TEST: u16 = 0x88b5;
/// The IPv4 ethertype.
pub const ETHERTYPE_IPV4: u16 = 0x0800;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A network namespace made for one test; it goes away with the handle and the processes in it.
pub struct NetNs {
    fd: OwnedFd,
}

impl NetNs {
    /// A new, empty network namespace (needs CAP_SYS_ADMIN). IPv6 is off in it, so that the
    /// kernel sends no neighbour discovery or router solicitations through the tap.
    pub fn new() -> io::Result<NetNs> {
        // unshare(CLONE_NEWNET) moves only the calling thread: do it on a thread of its own.
        let fd = std::thread::spawn(|| -> io::Result<OwnedFd> {
            // SAFETY: plain syscall; affects only this short-lived thread.
            cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
            let f = File::open("/proc/thread-self/ns/net")?;
            // No IPv6 on interfaces created from now on (the daemon's tap).
            std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").ok();
            std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1").ok();
            Ok(OwnedFd::from(f))
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))??;
        Ok(NetNs { fd })
    }

    /// Make `cmd` start inside the namespace.
    pub fn command(&self, cmd: &mut Command) {
        let fd = self.fd.as_raw_fd();
        // SAFETY: the closure only calls setns, which is async-signal-safe, in the child.
        unsafe {
            cmd.pre_exec(move || {
                cvt(libc::setns(fd, libc::CLONE_NEWNET))?;
                Ok(())
            });
        }
    }

    /// Run `f` on a thread that has entered the namespace; sockets it opens stay in the
    /// namespace wherever they are used later.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let fd = self.fd.try_clone()?;
        std::thread::spawn(move || -> io::Result<T> {
            // SAFETY: joins this thread to the namespace `fd` refers to.
            cvt(unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) })?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("namespace thread panicked"))?
    }

    /// The index of interface `name` in the namespace, if it exists.
    pub fn if_index(&self, name: &str) -> Option<u32> {
        let cname = CString::new(name).ok()?;
        self.run(move || {
            // SAFETY: reads a NUL-terminated string.
            Ok(unsafe { libc::if_nametoindex(cname.as_ptr()) })
        })
        .ok()
        .filter(|&i| i != 0)
    }

    /// Wait until interface `name` exists and is up (the daemon made it).
    pub fn wait_up(&self, name: &str, timeout: Duration) -> io::Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(index) = self.if_index(name) {
                if self.counters(name)?.is_some() && self.is_up(name)? {
                    return Ok(index);
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("interface {name} never came up"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn is_up(&self, name: &str) -> io::Result<bool> {
        let name = name.to_string();
        self.run(move || {
            let sock = ioctl_socket()?;
            let mut req = ifreq(&name);
            // SAFETY: SIOCGIFFLAGS reads and writes a 40-byte ifreq, which `req` is.
            cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, req.as_mut_ptr()) })?;
            let flags = i16::from_ne_bytes([req[16], req[17]]);
            Ok(flags & libc::IFF_UP as i16 != 0)
        })
    }

    /// Host-side settings of interface `name`: MAC, IPv4 address and netmask (if any), MTU.
    pub fn if_info(&self, name: &str) -> io::Result<IfInfo> {
        let name = name.to_string();
        self.run(move || {
            let sock = ioctl_socket()?;
            let get = |request: libc::Ioctl| -> io::Result<[u8; 40]> {
                let mut req = ifreq(&name);
                // SAFETY: the SIOCGIF* requests used here fill a 40-byte ifreq, which `req` is.
                cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, req.as_mut_ptr()) })?;
                Ok(req)
            };
            let ipv4 = |req: [u8; 40]| Ipv4Addr::new(req[20], req[21], req[22], req[23]);
            let hw = get(libc::SIOCGIFHWADDR)?;
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&hw[18..24]);
            let mtu = get(libc::SIOCGIFMTU)?;
            Ok(IfInfo {
                mac,
                ip: get(libc::SIOCGIFADDR).ok().map(ipv4),
                netmask: get(libc::SIOCGIFNETMASK).ok().map(ipv4),
                mtu: i32::from_ne_bytes([mtu[16], mtu[17], mtu[18], mtu[19]]) as u32,
            })
        })
    }

    /// Packet and drop counters of interface `name` (from /proc/net/dev in the namespace),
    /// `None` when it does not exist.
    pub fn counters(&self, name: &str) -> io::Result<Option<IfCounters>> {
        let name = name.to_string();
        self.run(move || {
            let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
            Ok(text.lines().find_map(|line| {
                let (ifname, rest) = line.split_once(':')?;
                if ifname.trim() != name {
                    return None;
                }
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                (v.len() >= 12).then(|| IfCounters {
                    rx_packets: v[1],
                    rx_dropped: v[3],
                    tx_packets: v[9],
                    tx_dropped: v[11],
                })
            }))
        })
    }

    /// Create a persistent tap named `name` with virtio-net headers (as `ip tuntap add
    /// mode tap vnet_hdr [multi_queue]` would), for tests of attaching to an existing one.
    pub fn create_persistent_tap(&self, name: &str, multi_queue: bool) -> io::Result<()> {
        let name = name.to_string();
        self.run(move || {
            let f = tun_queue(&name, multi_queue)?;
            // SAFETY: integer-argument ioctl on our own descriptor.
            cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) })?;
            Ok(())
        })
    }

    /// Create tap `name` with `queues` non-blocking queues carrying 12-byte virtio-net
    /// headers, and bring it up: what the daemon does, without the daemon (the benchmark's
    /// baseline).
    pub fn open_tap(&self, name: &str, queues: usize) -> io::Result<Vec<File>> {
        let name = name.to_string();
        self.run(move || {
            let files = (0..queues)
                .map(|_| tun_queue(&name, queues > 1))
                .collect::<io::Result<Vec<File>>>()?;
            let mut len: i32 = 12;
            // SAFETY: TUNSETVNETHDRSZ reads an int, which `len` is.
            cvt(unsafe { libc::ioctl(files[0].as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut len) })?;
            for f in &files {
                // SAFETY: fcntl flag change on our own descriptor.
                cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })?;
            }
            let sock = ioctl_socket()?;
            let mut req = ifreq(&name);
            // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS use a 40-byte ifreq, which `req` is.
            cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, req.as_mut_ptr()) })?;
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            // SAFETY: as above.
            cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, req.as_mut_ptr()) })?;
            Ok(files)
        })
    }
}

/// Open one queue of tap `name` (created if need be) with virtio-net headers.
fn tun_queue(name: &str, multi_queue: bool) -> io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name);
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    req[16..18].copy_from_slice(&(flags as i16).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte ifreq, which `req` is.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) })?;
    Ok(f)
}

/// Host-side settings of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfInfo {
    /// Hardware address.
    pub mac: [u8; 6],
    /// IPv4 address, if it has one.
    pub ip: Option<Ipv4Addr>,
    /// Its netmask.
    pub netmask: Option<Ipv4Addr>,
    /// MTU.
    pub mtu: u32,
}

/// Interface counters as /proc/net/dev shows them. For a tap, "rx" is what its file
/// descriptors wrote into the kernel (the guest's transmissions) and "tx" what the kernel
/// queued for them (what the guest receives).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfCounters {
    /// Frames written into the tap by its owner.
    pub rx_packets: u64,
    /// Of those, dropped.
    pub rx_dropped: u64,
    /// Frames the kernel queued for the tap's owner.
    pub tx_packets: u64,
    /// Frames dropped because the owner did not read them in time.
    pub tx_dropped: u64,
}

/// The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes; the first 10 are the legacy
/// header packet sockets and taps use without MRG_RXBUF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// VIRTIO_NET_HDR_F_*.
    pub flags: u8,
    /// VIRTIO_NET_HDR_GSO_*.
    pub gso_type: u8,
    /// Length of the headers to repeat in each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from csum_start.
    pub csum_offset: u16,
    /// Buffers a merged receive frame spans.
    pub num_buffers: u16,
}

impl VnetHdr {
    /// The header as bytes (10 or 12 of them).
    pub fn to_bytes(&self, len: usize) -> Vec<u8> {
        let mut b = vec![self.flags, self.gso_type];
        for v in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.truncate(len);
        b
    }

    /// Parse the first 10 or 12 bytes of `b`.
    pub fn parse(b: &[u8]) -> VnetHdr {
        let u = |i: usize| {
            b.get(i..i + 2)
                .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
        };
        VnetHdr {
            flags: b.first().copied().unwrap_or(0),
            gso_type: b.get(1).copied().unwrap_or(0),
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }
}

/// A raw packet socket bound to one interface of a namespace: frames sent on it go out of the
/// interface (for a tap: to its owner, the daemon, hence to the guest), frames the interface
/// receives (from the guest) can be read from it.
pub struct PacketSocket {
    fd: OwnedFd,
    index: u32,
    vnet_hdr: bool,
}

impl PacketSocket {
    /// Open one on interface `name` in `ns`. With `vnet_hdr` every frame read or sent starts
    /// with a 10-byte virtio-net header (PACKET_VNET_HDR), so offloads are visible and usable.
    pub fn open(ns: &NetNs, name: &str, vnet_hdr: bool) -> io::Result<PacketSocket> {
        let index = ns.if_index(name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}"))
        })?;
        let fd = ns.run(move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket creation; checked.
            let fd = cvt(unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            })?;
            // SAFETY: a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if vnet_hdr {
                setsockopt_int(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
            }
            // Big buffers: the benchmark sends and receives in bursts.
            setsockopt_int(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                32 << 20,
            )?;
            setsockopt_int(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                32 << 20,
            )?;
            // SAFETY: zeroed sockaddr_ll is a valid value; fields set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            // SAFETY: binds to a valid sockaddr_ll of the size given.
            cvt(unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            })?;
            Ok(fd)
        })?;
        Ok(PacketSocket {
            fd,
            index,
            vnet_hdr,
        })
    }

    /// Hand sent frames straight to the interface, past the queueing discipline: a full
    /// tap queue then fails the send with ENOBUFS instead of dropping behind our back (the
    /// benchmark's generator backs off on it).
    pub fn bypass_qdisc(&self) -> io::Result<()> {
        setsockopt_int(
            self.fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            1,
        )
    }

    /// The interface index.
    pub fn if_index(&self) -> u32 {
        self.index
    }

    /// Send a frame out of the interface (with its header first when opened with one).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.send_many(&[frame]).and_then(|n| {
            if n == 1 {
                Ok(())
            } else {
                Err(io::Error::other("frame not sent"))
            }
        })
    }

    /// Send several frames with one system call (sendmmsg); returns how many went.
    pub fn send_many(&self, frames: &[&[u8]]) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // The frame's own ethertype as the packet's protocol, so that the kernel can segment
        // and checksum it (a packet socket would otherwise send it as ETH_P_ALL).
        let hdr = if self.vnet_hdr { 10 } else { 0 };
        let mut addrs: Vec<libc::sockaddr_ll> = frames
            .iter()
            .map(|f| {
                // SAFETY: a zeroed sockaddr_ll is a valid value; fields set below.
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_ifindex = self.index as i32;
                sll.sll_protocol = f
                    .get(hdr + 12..hdr + 14)
                    .map_or(0, |t| u16::from_ne_bytes([t[0], t[1]]));
                sll
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(addrs.iter_mut())
            .map(|(iov, sll)| {
                // SAFETY: a zeroed msghdr is valid; fields set below.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_name = sll as *mut libc::sockaddr_ll as *mut libc::c_void;
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                m
            })
            .collect();
        // SAFETY: each mmsghdr points at one iovec (into a live frame) and one sockaddr_ll.
        let n =
            unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The next frame the interface received (not one it sent) that `keep` accepts, waiting
    /// at most `timeout`. With a vnet header, the frame starts with it.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !poll_in(self.fd.as_raw_fd(), left)? {
                return Ok(None);
            }
            // SAFETY: a zeroed sockaddr_ll is valid; recvfrom fills at most its size.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut fromlen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: writes at most buf.len() bytes into buf and fromlen bytes into from.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut fromlen,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if keep(frame) {
                return Ok(Some(frame.to_vec()));
            }
        }
    }

    /// Count frames received (not sent) until `timeout` passes with none; returns
    /// (frames, bytes). For the benchmark's sink.
    pub fn drain_count(&self, idle: Duration) -> io::Result<(u64, u64)> {
        let mut frames = 0;
        let mut bytes = 0;
        let mut buf = vec![0u8; 70000];
        loop {
            if !poll_in(self.fd.as_raw_fd(), idle)? {
                return Ok((frames, bytes));
            }
            loop {
                // SAFETY: writes at most buf.len() bytes into buf.
                let n = unsafe {
                    libc::recv(
                        self.fd.as_raw_fd(),
                        buf.as_mut_ptr() as *mut libc::c_void,
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    break;
                }
                frames += 1;
                bytes += n as u64;
            }
        }
    }

    /// Whether frames carry a vnet header.
    pub fn has_vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A `struct ifreq` (40 bytes) naming `name`, its union zeroed.
fn ifreq(name: &str) -> [u8; 40] {
    let mut req = [0u8; 40];
    let n = name.len().min(15);
    req[..n].copy_from_slice(&name.as_bytes()[..n]);
    req
}

fn setsockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to an int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        )
    })
    .map(|_| ())
}

/// Wait until `fd` is readable; false on timeout.
pub fn poll_in(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A frame of `len` bytes (at least 14) with ethertype [`ETHERTYPE_TEST`], whose payload is a
/// pattern derived from `seed`, so that a test can tell frames apart and check every byte.
pub fn test_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend_from_slice(&seed.to_be_bytes());
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        f.push(x as u8);
    }
    f.truncate(len.max(ETH_HLEN));
    f
}

/// Whether `frame` (no vnet header) is a test frame, and its seed.
pub fn test_frame_seed(frame: &[u8]) -> Option<u32> {
    if frame.len() >= 18 && frame[12..14] == ETHERTYPE_TEST.to_be_bytes() {
        Some(u32::from_be_bytes([
            frame[14], frame[15], frame[16], frame[17],
        ]))
    } else {
        None
    }
}

/// The Internet checksum of `data` folded into `sum`.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Addresses of an IPv4 frame.
#[derive(Debug, Clone, Copy)]
pub struct Ipv4Flow {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

fn ipv4_header(flow: &Ipv4Flow, proto: u8, payload_len: usize) -> Vec<u8> {
    let total = (20 + payload_len) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&flow.src.octets());
    ip.extend_from_slice(&flow.dst.octets());
    let c = csum_fold(csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip
}

fn eth_header(flow: &Ipv4Flow) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&flow.dst_mac);
    f.extend_from_slice(&flow.src_mac);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f
}

fn pseudo_sum(flow: &Ipv4Flow, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend_from_slice(&flow.src.octets());
    p.extend_from_slice(&flow.dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    csum_add(0, &p)
}

/// A complete UDP/IPv4 frame of `len` bytes (at least 42) with a correct checksum.
pub fn udp_frame(flow: &Ipv4Flow, len: usize, seed: u32) -> Vec<u8> {
    let payload =
        test_frame([0; 6], [0; 6], len.max(42) - 42 + ETH_HLEN, seed)[ETH_HLEN..].to_vec();
    let udp_len = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&flow.sport.to_be_bytes());
    udp.extend_from_slice(&flow.dport.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&payload);
    let c = csum_fold(csum_add(pseudo_sum(flow, 17, udp_len), &udp));
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    let mut f = eth_header(flow);
    f.extend_from_slice(&ipv4_header(flow, 17, udp_len));
    f.extend_from_slice(&udp);
    f
}

/// A TCP/IPv4 frame carrying `payload` whose TCP checksum is left partial (pseudo-header
/// sum only), as a stack that offloads checksumming hands it over: send it with a header
/// from [`tcp_offload_hdr`].
pub fn tcp_frame_partial_csum(flow: &Ipv4Flow, seq: u32, payload: &[u8]) -> Vec<u8> {
    let tcp_len = 20 + payload.len();
    let mut tcp = Vec::with_capacity(tcp_len);
    tcp.extend_from_slice(&flow.sport.to_be_bytes());
    tcp.extend_from_slice(&flow.dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&1u32.to_be_bytes());
    // Data offset 5 words, flags ACK|PSH, window.
    tcp.extend_from_slice(&[0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    // Partial checksum: the folded pseudo-header sum, not complemented.
    let partial = !csum_fold(pseudo_sum(flow, 6, tcp_len));
    tcp[16..18].copy_from_slice(&partial.to_be_bytes());
    let mut f = eth_header(flow);
    f.extend_from_slice(&ipv4_header(flow, 6, tcp_len));
    f.extend_from_slice(&tcp);
    f
}

/// The vnet header for a frame from [`tcp_frame_partial_csum`]: checksum needed from the
/// TCP header on, segmented into `mss`-byte segments when `mss` is non-zero.
pub fn tcp_offload_hdr(mss: u16) -> VnetHdr {
    VnetHdr {
        flags: HDR_F_NEEDS_CSUM,
        gso_type: if mss > 0 { GSO_TCPV4 } else { GSO_NONE },
        hdr_len: (ETH_HLEN + 20 + 20) as u16,
        gso_size: mss,
        csum_start: (ETH_HLEN + 20) as u16,
        csum_offset: 16,
        num_buffers: 0,
    }
}

/// Whether the TCP/UDP checksum of an IPv4 `frame` (no vnet header) is correct.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != ETHERTYPE_IPV4.to_be_bytes() {
        return false;
    }
    let ihl = usize::from(frame[ETH_HLEN] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let proto = frame[ETH_HLEN + 9];
    let Some(l4) = frame.get(ETH_HLEN + ihl..ETH_HLEN + total) else {
        return false;
    };
    let mut p = Vec::new();
    p.extend_from_slice(&frame[ETH_HLEN + 12..ETH_HLEN + 20]);
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    csum_fold(csum_add(csum_add(0, &p), l4)) == 0
}

/// A datagram socket used only as a handle for interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: creates a socket; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Ipv4Flow {
        Ipv4Flow {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(10, 0, 0, 2),
            dst: Ipv4Addr::new(10, 0, 0, 1),
            sport: 1000,
            dport: 2000,
        }
    }

    #[test]
    fn udp_frames_have_valid_checksums() {
        for len in [60, 64, 1514] {
            let f = udp_frame(&flow(), len, 7);
            assert_eq!(f.len(), len);
            assert!(l4_checksum_ok(&f));
            let mut bad = f.clone();
            bad[len - 1] ^= 1;
            assert!(!l4_checksum_ok(&bad));
        }
    }

    #[test]
    fn partial_checksum_completes_to_a_valid_one() {
        // Finish the checksum the way a NIC would: fold the sum over csum_start.. into the
        // field at csum_start + csum_offset.
        let mut f = tcp_frame_partial_csum(&flow(), 1, &[0xab; 333]);
        let h = tcp_offload_hdr(0);
        let start = usize::from(h.csum_start);
        let c = csum_fold(csum_add(0, &f[start..]));
        let at = start + usize::from(h.csum_offset);
        f[at..at + 2].copy_from_slice(&c.to_be_bytes());
        assert!(l4_checksum_ok(&f));
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = tcp_offload_hdr(1448);
        assert_eq!(VnetHdr::parse(&h.to_bytes(12)), h);
        assert_eq!(h.to_bytes(10).len(), 10);
    }
}

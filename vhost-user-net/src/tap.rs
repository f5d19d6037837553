//! The host side of the device: a Linux tap interface opened with one file descriptor per
//! queue pair (`IFF_MULTI_QUEUE`), carrying a virtio-net header in front of every frame
//! (`IFF_VNET_HDR`) so that checksum and segmentation offloads pass through untouched.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Length of an interface name including its NUL (IFNAMSIZ).
const IFNAMSIZ: usize = 16;

/// Why the tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty, too long or contains a NUL.
    #[error("invalid tap name {0:?}: at most 15 bytes, no NUL")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error(
        "cannot open /dev/net/tun (is the tun module loaded, and are we root or CAP_NET_ADMIN?)"
    )]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error("cannot create or attach tap {name} (queue {queue}){hint}")]
    SetIff {
        /// Requested name.
        name: String,
        /// Queue being opened.
        queue: usize,
        /// Extra advice.
        hint: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A tap ioctl failed.
    #[error("cannot configure tap {name}: {what}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// The step that failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// The ifreq structure of the SIOC*/TUN* ioctls: a name and a 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        let len = name.len().min(IFNAMSIZ - 1);
        req.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        req
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    /// A `struct sockaddr_in` in the union.
    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[4..8].copy_from_slice(&addr.octets());
    }

    /// A `struct sockaddr` holding an Ethernet address.
    fn set_hwaddr(&mut self, mac: [u8; 6]) {
        self.data = [0; 24];
        self.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
        self.data[2..8].copy_from_slice(&mac);
    }
}

/// ioctl with a pointer argument; `what` names the step for the error message.
fn ioctl_ptr<T>(fd: RawFd, request: libc::Ioctl, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used in this module takes a pointer to an object of the size of
    // `T` (ifreq or int), which `arg` points to and which outlives the call.
    let rc = unsafe { libc::ioctl(fd, request, arg as *mut T) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One queue of the tap: a non-blocking file descriptor that reads and writes whole frames,
/// each preceded by the virtio-net header.
#[derive(Debug)]
pub struct TapQueue {
    file: File,
}

impl TapQueue {
    /// Attach this queue to its (multi-queue) tap, or detach it: the kernel steers frames
    /// only to attached queues, and a detached queue's pending frames are dropped.
    pub fn set_attached(&self, attached: bool) -> io::Result<()> {
        let mut req = IfReq::new("");
        let flag = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        req.set_short(flag as i16);
        ioctl_ptr(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req)
    }

    /// Read one frame (with its header) into `buf`; `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: writes at most buf.len() bytes into `buf`.
            let n = unsafe {
                libc::read(
                    self.file.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    /// Write one frame (with its header) gathered from `iov`; `WouldBlock` when the tap's
    /// queue is full.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory readable for its whole length during the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        loop {
            // SAFETY: the caller guarantees the iovecs are readable; the count is the slice's.
            let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Host-side settings applied after the tap exists.
#[derive(Debug, Clone, Default)]
pub struct HostConfig {
    /// IPv4 address of the host end.
    pub ip: Option<Ipv4Addr>,
    /// Its netmask.
    pub mask: Option<Ipv4Addr>,
    /// MAC address of the host end.
    pub mac: Option<[u8; 6]>,
    /// MTU of the host end.
    pub mtu: Option<u16>,
}

/// An opened tap interface.
#[derive(Debug)]
pub struct Tap {
    /// The interface name the kernel reports.
    pub name: String,
    /// Whether the interface existed before we attached to it.
    pub existed: bool,
    /// One queue per queue pair.
    pub queues: Vec<Arc<TapQueue>>,
}

const TUN_FLAGS: i32 = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

fn open_queue(name: &str, flags: i32) -> Result<(TapQueue, String), (io::Error, bool)> {
    // SAFETY: a plain open of a NUL-terminated path; the result is checked.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err((io::Error::last_os_error(), true));
    }
    // SAFETY: open returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name);
    req.set_short(flags as i16);
    ioctl_ptr(fd.as_raw_fd(), libc::TUNSETIFF, &mut req).map_err(|e| (e, false))?;
    Ok((
        TapQueue {
            file: File::from(fd),
        },
        req.name(),
    ))
}

impl Tap {
    /// Create the tap `name` (a `%d` in it, or no name at all, lets the kernel pick a free
    /// one) or attach to an existing persistent tap of that name, with `queues` queues.
    pub fn open(name: Option<&str>, queues: usize) -> Result<Tap, TapError> {
        let requested = name.unwrap_or("tap%d");
        if requested.is_empty() || requested.len() >= IFNAMSIZ || requested.contains('\0') {
            return Err(TapError::BadName(requested.to_string()));
        }
        let existed = !requested.contains('%') && interface_index(requested).is_some();
        let mut flags = TUN_FLAGS;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let set_iff_error = |queue: usize, source: io::Error| {
            let hint = match source.raw_os_error() {
                Some(libc::EINVAL) if existed => {
                    ": the existing interface is not a tap of matching multi_queue mode"
                }
                Some(libc::EBUSY) => ": it is in use by another process",
                Some(libc::EPERM) => ": permission denied (need CAP_NET_ADMIN or tap owner)",
                _ => "",
            };
            TapError::SetIff {
                name: requested.to_string(),
                queue,
                hint,
                source,
            }
        };
        let (first, actual) = match open_queue(requested, flags) {
            Ok(q) => q,
            // A persistent single-queue request against a multi_queue tap: attach in its mode.
            Err((e, false)) if existed && queues == 1 && e.raw_os_error() == Some(libc::EINVAL) => {
                flags |= libc::IFF_MULTI_QUEUE;
                open_queue(requested, flags).map_err(|(e, open)| {
                    if open {
                        TapError::OpenTun(e)
                    } else {
                        set_iff_error(0, e)
                    }
                })?
            }
            Err((e, true)) => return Err(TapError::OpenTun(e)),
            Err((e, false)) => return Err(set_iff_error(0, e)),
        };
        let mut tap_queues = vec![Arc::new(first)];
        for q in 1..queues {
            let (queue, _) = open_queue(&actual, flags).map_err(|(e, open)| {
                if open {
                    TapError::OpenTun(e)
                } else {
                    set_iff_error(q, e)
                }
            })?;
            tap_queues.push(Arc::new(queue));
        }
        Ok(Tap {
            name: actual,
            existed,
            queues: tap_queues,
        })
    }

    fn err(&self, what: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }

    fn first_fd(&self) -> RawFd {
        self.queues.first().map(|q| q.as_raw_fd()).unwrap_or(-1)
    }

    /// Set the size of the virtio-net header in front of each frame (10 or 12 bytes).
    /// The setting is per interface, so it covers every queue.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let mut v = len as i32;
        ioctl_ptr(self.first_fd(), libc::TUNSETVNETHDRSZ, &mut v)
            .map_err(self.err("TUNSETVNETHDRSZ"))
    }

    /// Tell the kernel which offloads the guest accepts on frames it receives
    /// (TUN_F_* flags), so that it only hands us partial checksums / GSO frames then.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes its argument by value.
        // SAFETY: an integer-argument ioctl on our own descriptor.
        let rc = unsafe {
            libc::ioctl(
                self.first_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(self.err("TUNSETOFFLOAD")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Apply the host-side settings and bring the interface up.
    pub fn configure_host(&self, cfg: &HostConfig) -> Result<(), TapError> {
        // SAFETY: creates a socket used only as an ioctl handle; the result is checked.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(self.err("socket for interface ioctls")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: socket returned a fresh descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let fd = sock.as_raw_fd();
        if let Some(mac) = cfg.mac {
            let mut req = IfReq::new(&self.name);
            req.set_hwaddr(mac);
            ioctl_ptr(fd, libc::SIOCSIFHWADDR, &mut req).map_err(self.err("set host MAC"))?;
        }
        if let Some(mtu) = cfg.mtu {
            let mut req = IfReq::new(&self.name);
            req.set_int(i32::from(mtu));
            ioctl_ptr(fd, libc::SIOCSIFMTU, &mut req).map_err(self.err("set MTU"))?;
        }
        if let Some(ip) = cfg.ip {
            let mut req = IfReq::new(&self.name);
            req.set_ipv4(ip);
            ioctl_ptr(fd, libc::SIOCSIFADDR, &mut req).map_err(self.err("set IPv4 address"))?;
            let mask = cfg.mask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
            let mut req = IfReq::new(&self.name);
            req.set_ipv4(mask);
            ioctl_ptr(fd, libc::SIOCSIFNETMASK, &mut req).map_err(self.err("set netmask"))?;
        }
        let mut req = IfReq::new(&self.name);
        ioctl_ptr(fd, libc::SIOCGIFFLAGS, &mut req).map_err(self.err("read flags"))?;
        let up = req.short() | libc::IFF_UP as i16;
        req.set_short(up);
        ioctl_ptr(fd, libc::SIOCSIFFLAGS, &mut req).map_err(self.err("bring the interface up"))
    }
}

/// The interface index of `name` in our network namespace, if it exists.
fn interface_index(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads the NUL-terminated string only.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        let mut req = IfReq::new("vm0tap");
        assert_eq!(req.name(), "vm0tap");
        req.set_ipv4(Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(&req.data[4..8], &[10, 1, 2, 3]);
    }

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(
            Tap::open(Some("this-name-is-far-too-long"), 1),
            Err(TapError::BadName(_))
        ));
        assert!(matches!(Tap::open(Some(""), 1), Err(TapError::BadName(_))));
    }
}

//! Socket-level tests of vhost-user-net: the daemon runs in a network namespace each test
//! makes, with its tap there; the test plays the guest through the mock frontend and the host
//! through a packet socket on the tap.
//!
//! Needs root (namespaces, taps) and `target/<profile>/vhost-user-net` built first.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use vhost_user_test::net::{
    l4_checksum_ok, tcp_frame_partial_csum, tcp_offload_hdr, test_frame, test_frame_seed,
    udp_frame, Ipv4Flow, NetNs, PacketSocket, VnetHdr, GSO_TCPV4, HDR_F_NEEDS_CSUM,
};
use vhost_user_test::{binary, Daemon, Desc, Options, Session, Used, DESC_F_INDIRECT, DESC_F_NEXT};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const TAP: &str = "vut0";
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
const BROADCAST: [u8; 6] = [0xff; 6];
/// virtio-net header length with VERSION_1 (always negotiated here).
const HDR: usize = 12;
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

fn bit(b: u32) -> u64 {
    1u64 << b
}

/// The daemon in its namespace, with its log and stdout captured.
struct Rig {
    ns: NetNs,
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
}

impl Rig {
    /// Start the daemon with `--tap vut0` and `args`.
    fn start(args: &[&str]) -> Rig {
        let mut all = vec!["--tap", TAP];
        all.extend_from_slice(args);
        Rig::start_in(NetNs::new().expect("network namespace (run as root)"), &all)
    }

    fn start_in(ns: NetNs, args: &[&str]) -> Rig {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("net.sock");
        let mut cmd = Command::new(binary("vhost-user-net"));
        cmd.args(args)
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .stdout(File::create(dir.path().join("stdout")).expect("stdout file"))
            .stderr(File::create(dir.path().join("log")).expect("log file"));
        ns.command(&mut cmd);
        let daemon = Daemon::spawn(&mut cmd, &socket);
        Rig {
            ns,
            daemon: Some(daemon),
            dir,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("net.sock")
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("daemon running")
    }

    /// What the daemon logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Wait until the log contains `needle` (the daemon writes it asynchronously).
    fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "daemon never logged {needle:?}; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A frontend with `pairs` queue pairs negotiating `features` (VERSION_1 always).
    fn connect(&self, features: u64, pairs: usize) -> Session {
        let opts = Options {
            features,
            num_queues: 2 * pairs,
            ..Options::default()
        };
        Session::connect(&self.socket(), &opts).expect("frontend session")
    }

    /// The host's end: a packet socket on the tap.
    fn host(&self, vnet_hdr: bool) -> PacketSocket {
        PacketSocket::open(&self.ns, TAP, vnet_hdr).expect("packet socket on the tap")
    }
}

/// Send `frame` (header included) from the guest on transmit queue `q`, split into
/// descriptors of at most `seg` bytes; returns the used element.
fn transmit(s: &mut Session, q: usize, frame: &[u8], seg: usize) -> Used {
    let addr = s.guest.put(frame);
    let chain: Vec<Desc> = (0..frame.len())
        .step_by(seg)
        .map(|off| Desc::readable(addr + off as u64, (frame.len() - off).min(seg) as u32))
        .collect();
    let head = s.add(q, &chain);
    let used = s.wait(q, 1);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].id, head);
    used[0]
}

/// A frame as the guest sends it: a plain 12-byte header, then `frame`.
fn with_hdr(hdr: VnetHdr, frame: &[u8]) -> Vec<u8> {
    let mut v = hdr.to_bytes(HDR);
    v.extend_from_slice(frame);
    v
}

/// The next test frame with seed `seed` the host sees on the tap (without vnet header).
fn host_receives(host: &PacketSocket, seed: u32) -> Option<Vec<u8>> {
    host.recv_matching(WAIT, |f| test_frame_seed(f) == Some(seed))
        .expect("packet socket")
}

/// A frame received by the guest: its header, its bytes, and the used elements it took.
struct RxFrame {
    hdr: VnetHdr,
    frame: Vec<u8>,
    used: Vec<Used>,
}

/// The guest's receive queue `q`: chains posted, used elements not yet consumed.
struct RxQueue {
    q: usize,
    chains: HashMap<u16, Vec<Desc>>,
    pending: VecDeque<Used>,
    mrg: bool,
}

impl RxQueue {
    fn new(q: usize, mrg: bool) -> RxQueue {
        RxQueue {
            q,
            chains: HashMap::new(),
            pending: VecDeque::new(),
            mrg,
        }
    }

    /// Post `n` chains of `descs` descriptors of `len` bytes each.
    fn post(&mut self, s: &mut Session, n: usize, descs: usize, len: u32) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let chain: Vec<Desc> = (0..descs)
                    .map(|_| Desc::writable(s.guest.alloc(len as usize), len))
                    .collect();
                self.post_chain(s, chain)
            })
            .collect()
    }

    fn post_chain(&mut self, s: &mut Session, chain: Vec<Desc>) -> u16 {
        let head = s.add(self.q, &chain);
        self.chains.insert(head, chain);
        head
    }

    fn next_used(&mut self, s: &mut Session) -> Used {
        if self.pending.is_empty() {
            self.pending.extend(s.wait(self.q, 1));
        }
        self.pending.pop_front().expect("a used element")
    }

    /// Bytes the device wrote into the chain of `u`.
    fn data(&self, s: &Session, u: Used) -> Vec<u8> {
        let mut out = Vec::new();
        let mut left = u.len as usize;
        for d in &self.chains[&u.id] {
            let n = left.min(d.len as usize);
            out.extend(s.guest.read(d.addr, n));
            left -= n;
        }
        assert_eq!(left, 0, "used length {} beyond the chain", u.len);
        out
    }

    /// The next frame, gathered over `num_buffers` chains with MRG_RXBUF.
    fn frame(&mut self, s: &mut Session) -> RxFrame {
        let first = self.next_used(s);
        let mut bytes = self.data(s, first);
        assert!(bytes.len() >= HDR, "used element of {} bytes", bytes.len());
        let hdr = VnetHdr::parse(&bytes[..HDR]);
        let mut used = vec![first];
        if self.mrg {
            assert!(hdr.num_buffers >= 1, "num_buffers is 0");
            for _ in 1..hdr.num_buffers {
                let u = self.next_used(s);
                bytes.extend(self.data(s, u));
                used.push(u);
            }
        } else {
            assert_eq!(hdr.num_buffers, 1, "num_buffers without MRG_RXBUF");
        }
        RxFrame {
            hdr,
            frame: bytes.split_off(HDR),
            used,
        }
    }

    /// The next received frame that is a test frame with seed `seed` (others are skipped).
    fn frame_with_seed(&mut self, s: &mut Session, seed: u32) -> RxFrame {
        loop {
            let f = self.frame(s);
            if test_frame_seed(&f.frame) == Some(seed) {
                return f;
            }
        }
    }

    /// Whether a used element arrives within `t`.
    fn quiet_for(&mut self, s: &mut Session, t: Duration) -> bool {
        let deadline = Instant::now() + t;
        while Instant::now() < deadline {
            self.pending
                .extend(s.queues[self.q].poll_used(s.guest.mem()));
            if !self.pending.is_empty() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

fn flow(sport: u16) -> Ipv4Flow {
    Ipv4Flow {
        dst_mac: GUEST_MAC,
        src_mac: HOST_MAC,
        src: Ipv4Addr::new(10, 77, 0, 1),
        dst: Ipv4Addr::new(10, 77, 0, 2),
        sport,
        dport: 5001,
    }
}

/// The number in "... {N} {what}" of the daemon's per-pair summary lines, summed.
fn summary_count(log: &str, what: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("queue pair") && l.contains(what))
        .filter_map(|l| {
            let before = &l[..l.find(what)?];
            before.split_whitespace().last()?.parse::<u64>().ok()
        })
        .sum()
}

#[test]
fn config_space_features_and_host_side_of_the_tap() {
    let rig = Rig::start(&[
        "--mac",
        "52:54:00:12:34:56",
        "--mtu",
        "9000",
        "--ip",
        "10.9.8.1",
        "--mask",
        "255.255.0.0",
        "--host-mac",
        "02:11:22:33:44:55",
        "--num-queue-pairs",
        "2",
    ]);
    let mut s = rig.connect(bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_MTU), 2);
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MQ,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert!(s.offered & bit(b) != 0, "feature bit {b} not offered");
    }
    let c = s.config(0, 12).expect("GET_CONFIG");
    assert_eq!(&c[0..6], &GUEST_MAC, "mac");
    assert_eq!(
        u16::from_le_bytes([c[6], c[7]]),
        VIRTIO_NET_S_LINK_UP as u16,
        "status"
    );
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2, "max_virtqueue_pairs");
    assert_eq!(u16::from_le_bytes([c[10], c[11]]), 9000, "mtu");

    let info = rig.ns.if_info(TAP).expect("tap settings");
    assert_eq!(info.mac, HOST_MAC);
    assert_eq!(info.ip, Some(Ipv4Addr::new(10, 9, 8, 1)));
    assert_eq!(info.netmask, Some(Ipv4Addr::new(255, 255, 0, 0)));
    assert_eq!(info.mtu, 9000);
    rig.ns.wait_up(TAP, WAIT).expect("tap up");
}

#[test]
fn single_queue_daemon_offers_no_mq() {
    let rig = Rig::start(&[]);
    let mut s = rig.connect(0, 1);
    assert_eq!(s.offered & bit(VIRTIO_NET_F_MQ), 0);
    let c = s.config(0, 10).expect("GET_CONFIG");
    assert_eq!(u16::from_le_bytes([c[8], c[9]]), 1);
}

#[test]
fn kernel_named_tap_is_printed_and_goes_away_with_the_daemon() {
    let ns = NetNs::new().expect("network namespace (run as root)");
    let mut rig = Rig::start_in(ns, &[]);
    let name = rig.stdout().trim().to_string();
    assert!(!name.is_empty(), "no tap name on stdout");
    assert!(rig.ns.if_index(&name).is_some(), "{name} does not exist");
    rig.daemon().signal_and_wait(libc::SIGTERM);
    assert!(
        rig.ns.if_index(&name).is_none(),
        "{name} outlived the daemon"
    );
}

#[test]
fn existing_persistent_tap_is_attached_and_kept() {
    let ns = NetNs::new().expect("network namespace (run as root)");
    ns.create_persistent_tap("ptap0", false)
        .expect("persistent tap");
    let mut rig = Rig::start_in(ns, &["--tap", "ptap0"]);
    rig.wait_log("attached to tap ptap0");
    // Traffic flows through it like through a tap the daemon made.
    let host = PacketSocket::open(&rig.ns, "ptap0", false).expect("packet socket");
    let mut s = rig.connect(0, 1);
    let f = test_frame(BROADCAST, GUEST_MAC, 100, 1);
    transmit(&mut s, 1, &with_hdr(VnetHdr::default(), &f), 4096);
    assert_eq!(host_receives(&host, 1), Some(f));
    drop(s);
    rig.daemon().signal_and_wait(libc::SIGTERM);
    assert!(rig.ns.if_index("ptap0").is_some(), "persistent tap deleted");
}

#[test]
fn transmitted_frames_appear_on_the_tap() {
    let rig = Rig::start(&[]);
    let host = rig.host(false);
    let mut s = rig.connect(bit(VIRTIO_RING_F_EVENT_IDX), 1);
    // One descriptor, header and frame apart, a frame over many small descriptors, and
    // an indirect table.
    for (seed, len, seg) in [(1, 60, 4096), (2, 1514, 12), (3, 1000, 7)] {
        let f = test_frame(HOST_MAC, GUEST_MAC, len, seed);
        let u = transmit(&mut s, 1, &with_hdr(VnetHdr::default(), &f), seg);
        assert_eq!(u.len, 0, "a transmit chain has nothing written");
        assert_eq!(host_receives(&host, seed), Some(f), "frame {seed}");
    }
    let f = test_frame(HOST_MAC, GUEST_MAC, 600, 4);
    let bytes = with_hdr(VnetHdr::default(), &f);
    let a = s.guest.put(&bytes[..HDR]);
    let b = s.guest.put(&bytes[HDR..]);
    s.add_indirect(
        1,
        &[
            Desc::readable(a, HDR as u32),
            Desc::readable(b, f.len() as u32),
        ],
    );
    s.wait(1, 1);
    assert_eq!(host_receives(&host, 4), Some(f), "indirect chain");
    // A burst: every frame, in order.
    let frames: Vec<Vec<u8>> = (100..200)
        .map(|i| test_frame(HOST_MAC, GUEST_MAC, 64 + i as usize, i))
        .collect();
    for f in &frames {
        let addr = s.guest.put(&with_hdr(VnetHdr::default(), f));
        s.queues[1]
            .push(
                s.guest.mem(),
                &[Desc::readable(addr, (HDR + f.len()) as u32)],
            )
            .expect("free slots");
    }
    s.queues[1].kick();
    s.wait(1, frames.len());
    for f in &frames {
        let got = host
            .recv_matching(WAIT, |g| test_frame_seed(g).is_some_and(|x| x >= 100))
            .expect("packet socket");
        assert_eq!(got.as_ref(), Some(f));
    }
}

#[test]
fn frames_from_the_tap_arrive_on_the_receive_ring() {
    let rig = Rig::start(&[]);
    let host = rig.host(false);
    let mut s = rig.connect(0, 1);
    let mut rx = RxQueue::new(0, false);
    rx.post(&mut s, 8, 1, 1526);
    for (seed, len) in [(1u32, 60usize), (2, 1514), (3, 333)] {
        let f = test_frame(GUEST_MAC, HOST_MAC, len, seed);
        host.send(&f).expect("send");
        let got = rx.frame_with_seed(&mut s, seed);
        assert_eq!(got.frame, f);
        assert_eq!(got.used.len(), 1);
        assert_eq!(got.used[0].len as usize, HDR + len, "used length");
        assert_eq!(
            got.hdr,
            VnetHdr {
                num_buffers: 1,
                ..VnetHdr::default()
            },
            "plain frame, plain header"
        );
    }
    // Without MRG_RXBUF a frame may fill one chain of several small descriptors.
    let head = rx.post(&mut s, 1, 6, 256)[0];
    let mut got = None;
    for _ in 0..6 {
        let f = test_frame(GUEST_MAC, HOST_MAC, 1200, 9);
        host.send(&f).expect("send");
        let r = rx.frame_with_seed(&mut s, 9);
        assert_eq!(r.frame, f);
        if r.used[0].id == head {
            got = Some(r);
            break;
        }
    }
    assert!(got.is_some(), "the 6x256-byte chain never held a frame");
}

#[test]
fn mrg_rxbuf_spreads_a_frame_over_several_buffers() {
    let rig = Rig::start(&["--mtu", "9000"]);
    let host = rig.host(false);
    let mut s = rig.connect(
        bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX),
        1,
    );
    let mut rx = RxQueue::new(0, true);
    let heads = rx.post(&mut s, 32, 1, 1024);
    let f = test_frame(GUEST_MAC, HOST_MAC, 9014, 5);
    host.send(&f).expect("send");
    let got = rx.frame_with_seed(&mut s, 5);
    assert_eq!(got.frame, f);
    // 12 + 9014 bytes in 1024-byte buffers.
    assert_eq!(got.hdr.num_buffers, 9);
    assert_eq!(got.used.len(), 9);
    let ids: Vec<u16> = got.used.iter().map(|u| u.id).collect();
    assert_eq!(ids, heads[..9], "buffers used in the order posted");
    assert!(got.used[..8].iter().all(|u| u.len == 1024));
    assert_eq!(got.used[8].len, (HDR + 9014 - 8 * 1024) as u32);

    // Too few buffers for a big frame: it waits for more, and is neither cut nor dropped.
    // 23 buffers are left: two 9-buffer frames fit, the third waits.
    for seed in 10..13 {
        host.send(&test_frame(GUEST_MAC, HOST_MAC, 9014, seed))
            .expect("send");
    }
    for seed in 10..12 {
        assert_eq!(rx.frame_with_seed(&mut s, seed).hdr.num_buffers, 9);
    }
    assert!(
        rx.quiet_for(&mut s, QUIET),
        "a frame was delivered into too few buffers"
    );
    rx.post(&mut s, 9, 1, 1024);
    let third = rx.frame_with_seed(&mut s, 12);
    assert_eq!(third.frame, test_frame(GUEST_MAC, HOST_MAC, 9014, 12));
    assert_eq!(third.hdr.num_buffers, 9);
}

#[test]
fn two_queue_pairs_carry_traffic_independently() {
    let rig = Rig::start(&["--num-queue-pairs", "2"]);
    let host = rig.host(false);
    let mut s = rig.connect(bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_RING_F_EVENT_IDX), 2);
    // Transmit on both pairs.
    for (q, seed) in [(1, 1), (3, 2), (1, 3), (3, 4)] {
        let f = test_frame(HOST_MAC, GUEST_MAC, 200, seed);
        transmit(&mut s, q, &with_hdr(VnetHdr::default(), &f), 4096);
        assert_eq!(host_receives(&host, seed), Some(f), "from queue {q}");
    }
    // Receive: the tap spreads flows over its queues; every frame arrives once, on one
    // of the two receive queues, and both queues get some.
    let mut rx = [RxQueue::new(0, false), RxQueue::new(2, false)];
    for r in &mut rx {
        r.post(&mut s, 128, 1, 1526);
    }
    let flows = 64u16;
    for p in 0..flows {
        host.send(&udp_frame(&flow(10000 + p), 200, u32::from(p)))
            .expect("send");
    }
    let seen = collect_flows(&mut s, &mut rx, usize::from(flows), WAIT);
    assert_eq!(seen.len(), usize::from(flows), "frames lost");
    let on_first = seen.values().filter(|&&i| i == 0).count();
    assert!(
        on_first > 0 && on_first < usize::from(flows),
        "all {flows} flows on one queue pair ({on_first} on the first)"
    );
}

#[test]
fn offloads_pass_through_both_ways() {
    let rig = Rig::start(&[]);
    let host = rig.host(true);
    let mut s = rig.connect(
        bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_MRG_RXBUF),
        1,
    );
    let is_tcp =
        |f: &[u8]| f.len() > 10 + 14 + 20 && f[10 + 12..10 + 14] == [8, 0] && f[10 + 23] == 6;
    // Guest to host: a 3000-byte TCP segment with a partial checksum, to be cut into
    // 1000-byte segments, leaves the tap as one GSO packet with the guest's header.
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let frame = tcp_frame_partial_csum(&flow(4000), 1, &payload);
    let hdr = tcp_offload_hdr(1000);
    transmit(&mut s, 1, &with_hdr(hdr, &frame), 4096);
    let got = host
        .recv_matching(WAIT, is_tcp)
        .expect("packet socket")
        .expect("the GSO frame on the tap");
    let h = VnetHdr::parse(&got[..10]);
    assert_eq!(h.gso_type, GSO_TCPV4);
    assert_eq!(h.gso_size, 1000);
    assert_eq!(h.flags & HDR_F_NEEDS_CSUM, HDR_F_NEEDS_CSUM);
    assert_eq!((h.csum_start, h.csum_offset), (34, 16));
    assert_eq!(&got[10..], &frame[..], "frame changed on the way");

    // Host to guest: the tap hands the daemon a GSO packet, which reaches the guest
    // whole, with its offload header.
    let mut rx = RxQueue::new(0, true);
    rx.post(&mut s, 16, 1, 1536);
    let frame = tcp_frame_partial_csum(&flow(4001), 1, &payload);
    host.send(&with_hdr_len(hdr, &frame, 10)).expect("send GSO");
    let got = rx.frame(&mut s);
    assert_eq!(got.frame, frame);
    assert_eq!(got.hdr.gso_type, GSO_TCPV4);
    assert_eq!(got.hdr.gso_size, 1000);
    assert_eq!(got.hdr.flags & HDR_F_NEEDS_CSUM, HDR_F_NEEDS_CSUM);
    assert_eq!((got.hdr.csum_start, got.hdr.csum_offset), (34, 16));
    assert_eq!(got.hdr.num_buffers as usize, got.used.len());
}

fn with_hdr_len(hdr: VnetHdr, frame: &[u8], len: usize) -> Vec<u8> {
    let mut v = hdr.to_bytes(len);
    v.extend_from_slice(frame);
    v
}

#[test]
fn offloads_the_guest_did_not_accept_are_done_by_the_host() {
    let rig = Rig::start(&[]);
    let host = rig.host(true);
    // Receive offloads off: the kernel must segment and checksum before the tap.
    let mut s = rig.connect(bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_MRG_RXBUF), 1);
    let mut rx = RxQueue::new(0, true);
    rx.post(&mut s, 16, 1, 1536);
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13) as u8).collect();
    let frame = tcp_frame_partial_csum(&flow(4002), 1, &payload);
    host.send(&with_hdr_len(tcp_offload_hdr(1000), &frame, 10))
        .expect("send GSO");
    let mut data = Vec::new();
    for _ in 0..3 {
        let got = rx.frame(&mut s);
        assert_eq!(
            got.hdr.gso_type, 0,
            "GSO frame for a guest without GUEST_TSO4"
        );
        assert_eq!(got.hdr.flags & HDR_F_NEEDS_CSUM, 0);
        assert_eq!(got.frame.len(), 14 + 20 + 20 + 1000);
        assert!(l4_checksum_ok(&got.frame), "segment checksum");
        data.extend_from_slice(&got.frame[54..]);
    }
    assert_eq!(data, payload);

    // Transmit: a header asking for segmentation the guest did not negotiate (no
    // HOST_TSO4) is refused: the frame is dropped and counted, not sent half-done.
    let frame = tcp_frame_partial_csum(&flow(4003), 1, &payload);
    let u = transmit(&mut s, 1, &with_hdr(tcp_offload_hdr(1000), &frame), 4096);
    assert_eq!(u.len, 0);
    let sent = host
        .recv_matching(QUIET, |f| {
            f.len() > 10 + 35 && f[10 + 34..10 + 36] == 4003u16.to_be_bytes()
        })
        .expect("packet socket");
    assert!(sent.is_none(), "unnegotiated GSO frame reached the tap");
    // Checksum offload alone was negotiated: that one passes.
    let small = tcp_frame_partial_csum(&flow(4004), 1, &payload[..500]);
    transmit(&mut s, 1, &with_hdr(tcp_offload_hdr(0), &small), 4096);
    let got = host
        .recv_matching(WAIT, |f| {
            f.len() > 10 + 35 && f[10 + 34..10 + 36] == 4004u16.to_be_bytes()
        })
        .expect("packet socket")
        .expect("checksum-offloaded frame on the tap");
    assert_eq!(&got[10..], &small[..]);
    drop(s);
    let log = rig.wait_log("dropped 1 transmitted");
    assert!(log.contains("offloads that were not negotiated"), "{log}");
}

#[test]
fn hostile_transmit_chains_are_dropped_and_counted() {
    let rig = Rig::start(&[]);
    let host = rig.host(false);
    let mut s = rig.connect(bit(VIRTIO_RING_F_INDIRECT_DESC), 1);
    let mem_size = s.guest.size();
    let good = s.guest.put(&with_hdr(
        VnetHdr::default(),
        &test_frame(HOST_MAC, GUEST_MAC, 100, 0),
    ));
    let table = s.guest.alloc_aligned(64, 16);
    let big = s.guest.alloc(100_000);
    // Raw chains at the top of the table, where the harness never allocates here.
    let q = 1;
    let mut bad = 0u64;
    let mut post = |s: &mut Session, descs: &[(u64, u32, u16, u16)], head: u16| {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            s.queues[q].write_desc(s.guest.mem(), 240 + i as u16, addr, len, flags, next);
        }
        s.queues[q].publish(s.guest.mem(), head);
        let u = s.wait(q, 1);
        assert_eq!((u[0].id, u[0].len), (head, 0));
        bad += 1;
    };
    let n = DESC_F_NEXT;
    // Buffer outside guest memory, and straddling its end.
    post(&mut s, &[(mem_size + 4096, 100, 0, 0)], 240);
    post(&mut s, &[(mem_size - 50, 126, 0, 0)], 240);
    // A loop, and a next index beyond the queue.
    post(&mut s, &[(good, 20, n, 241), (good, 20, n, 240)], 240);
    post(&mut s, &[(good, 20, n, 999)], 240);
    // Oversize: 100000 bytes is more than any frame.
    post(&mut s, &[(big, 100_000, 0, 0)], 240);
    // Too short for the virtio-net header and an Ethernet header.
    post(&mut s, &[(good, 6, 0, 0)], 240);
    post(&mut s, &[(good, 20, 0, 0)], 240);
    // A device-writable buffer in a transmit chain.
    post(&mut s, &[(good, 112, 2, 0)], 240);
    // Indirect tables: empty, ragged, nested, with NEXT set.
    post(&mut s, &[(table, 0, DESC_F_INDIRECT, 0)], 240);
    post(&mut s, &[(table, 24, DESC_F_INDIRECT, 0)], 240);
    s.guest.write_obj(table, table);
    s.guest.write_obj(table + 8, 16u32);
    s.guest.write_obj(table + 12, DESC_F_INDIRECT);
    post(&mut s, &[(table, 16, DESC_F_INDIRECT, 0)], 240);
    post(
        &mut s,
        &[(table, 16, DESC_F_INDIRECT | n, 241), (good, 112, 0, 0)],
        240,
    );
    // A head beyond the queue names no buffer: consumed, nothing to return.
    s.queues[q].publish(s.guest.mem(), 999);
    bad += 1;
    // The daemon is alive and the queue still works.
    let f = test_frame(HOST_MAC, GUEST_MAC, 100, 0);
    transmit(&mut s, 1, &with_hdr(VnetHdr::default(), &f), 4096);
    assert_eq!(host_receives(&host, 0), Some(f));
    drop(s);
    // The counters are logged when the frontend leaves.
    let log = rig.wait_log(" transmitted, ");
    assert_eq!(
        summary_count(&log, "transmitted"),
        bad,
        "drop counter:\n{log}"
    );
    let warnings = log.matches("dropped a transmitted frame").count();
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} drop warnings for {bad} drops in well under 3 s: not rate-limited\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");

    // The next frontend is served.
    let mut s = rig.connect(0, 1);
    let f = test_frame(HOST_MAC, GUEST_MAC, 100, 77);
    transmit(&mut s, 1, &with_hdr(VnetHdr::default(), &f), 4096);
    assert_eq!(host_receives(&host, 77), Some(f));
}

#[test]
fn hostile_receive_chains_are_returned_unused() {
    let rig = Rig::start(&[]);
    let host = rig.host(false);
    let mut s = rig.connect(bit(VIRTIO_NET_F_MRG_RXBUF), 1);
    let mut rx = RxQueue::new(0, true);
    // A read-only buffer, one outside memory, one too small for the header; then good ones.
    let ro = s.guest.alloc(1526);
    let outside = s.guest.size() + 8192;
    let tiny = s.guest.alloc(4);
    let bad_heads = [
        rx.post_chain(&mut s, vec![Desc::readable(ro, 1526)]),
        rx.post_chain(&mut s, vec![Desc::writable(outside, 1526)]),
        rx.post_chain(&mut s, vec![Desc::writable(tiny, 4)]),
    ];
    rx.post(&mut s, 4, 1, 1526);
    let f = test_frame(GUEST_MAC, HOST_MAC, 500, 3);
    host.send(&f).expect("send");
    let mut returned = Vec::new();
    loop {
        let u = rx.next_used(&mut s);
        if bad_heads.contains(&u.id) {
            assert_eq!(u.len, 0, "a malformed chain was written");
            returned.push(u.id);
            continue;
        }
        rx.pending.push_front(u);
        break;
    }
    assert_eq!(
        returned, bad_heads,
        "malformed chains not returned in order"
    );
    let got = rx.frame_with_seed(&mut s, 3);
    assert_eq!(got.frame, f);
    drop(s);
    let log = rig.wait_log("malformed receive chains");
    assert_eq!(summary_count(&log, "malformed receive chains"), 3, "{log}");
}

#[test]
fn no_receive_buffers_means_back_pressure_not_loss_or_spinning() {
    let mut rig = Rig::start(&[]);
    let host = rig.host(false);
    let mut s = rig.connect(bit(VIRTIO_RING_F_EVENT_IDX), 1);
    // Idle with a connected frontend: the daemon sleeps.
    let t0 = rig.daemon().cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let idle = rig.daemon().cpu_time() - t0;
    assert!(
        idle < Duration::from_millis(50),
        "{idle:?} of CPU in 1 s idle"
    );
    // Frames arrive while the guest has no receive buffers: nothing spins...
    for seed in 0..20 {
        host.send(&test_frame(GUEST_MAC, HOST_MAC, 300, seed))
            .expect("send");
    }
    let t0 = rig.daemon().cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let waiting = rig.daemon().cpu_time() - t0;
    assert!(
        waiting < Duration::from_millis(50),
        "{waiting:?} of CPU in 1 s waiting for receive buffers"
    );
    // ... and nothing is lost: the frames come in order once buffers do.
    let mut rx = RxQueue::new(0, false);
    rx.post(&mut s, 32, 1, 1526);
    for seed in 0..20 {
        let got = rx.frame(&mut s);
        assert_eq!(test_frame_seed(&got.frame), Some(seed));
    }
    let counters = rig.ns.counters(TAP).expect("counters").expect("tap");
    assert_eq!(counters.tx_dropped, 0, "the tap dropped frames");
}

#[test]
fn the_next_frontend_is_served_after_a_disconnect() {
    let rig = Rig::start(&[]);
    let host = rig.host(false);
    for round in 0..3u32 {
        // Alternate header layouts: the daemon must renegotiate each time.
        let mrg = round % 2 == 1;
        let mut s = rig.connect(if mrg { bit(VIRTIO_NET_F_MRG_RXBUF) } else { 0 }, 1);
        let mut rx = RxQueue::new(0, mrg);
        rx.post(&mut s, 8, 1, 1526);
        let f = test_frame(HOST_MAC, GUEST_MAC, 300, round);
        transmit(&mut s, 1, &with_hdr(VnetHdr::default(), &f), 4096);
        assert_eq!(
            host_receives(&host, round),
            Some(f),
            "round {round} transmit"
        );
        let f = test_frame(GUEST_MAC, HOST_MAC, 300, 100 + round);
        host.send(&f).expect("send");
        assert_eq!(rx.frame_with_seed(&mut s, 100 + round).frame, f);
        // Leave with frames pending and buffers posted.
        for seed in 0..5 {
            host.send(&test_frame(GUEST_MAC, HOST_MAC, 300, 200 + seed))
                .expect("send");
        }
    }
    let log = rig.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// Collect the 200-byte UDP test frames arriving on the receive queues of `rx` until `want`
/// flows were seen or `timeout` passes; returns source port -> index into `rx`.
fn collect_flows(
    s: &mut Session,
    rx: &mut [RxQueue],
    want: usize,
    timeout: Duration,
) -> HashMap<u16, usize> {
    let mut seen = HashMap::new();
    let deadline = Instant::now() + timeout;
    while seen.len() < want && Instant::now() < deadline {
        for (i, r) in rx.iter_mut().enumerate() {
            r.pending.extend(s.queues[r.q].poll_used(s.guest.mem()));
            while let Some(u) = r.pending.pop_front() {
                let bytes = r.data(s, u);
                let frame = &bytes[HDR..];
                if frame.len() == 200 && l4_checksum_ok(frame) {
                    let sport = u16::from_be_bytes([frame[34], frame[35]]);
                    assert!(seen.insert(sport, i).is_none(), "flow {sport} twice");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    seen
}

#[test]
fn a_queue_pair_the_guest_disables_gets_no_traffic_and_loses_none() {
    use vhost::vhost_user::VhostUserFrontend;
    // A guest with fewer vCPUs than queue pairs enables only some of them.
    let rig = Rig::start(&["--num-queue-pairs", "2"]);
    let host = rig.host(false);
    let mut s = rig.connect(bit(VIRTIO_NET_F_MQ), 2);
    for q in [2, 3] {
        s.fe.set_vring_enable(q, false).expect("SET_VRING_ENABLE");
    }
    let mut rx = [RxQueue::new(0, false)];
    rx[0].post(&mut s, 200, 1, 1526);
    rig.wait_log("queue pair 1: disabled by the frontend; tap queue detached");
    // Flows the tap would have spread over both of its queues all reach the enabled pair.
    for p in 0..64u16 {
        host.send(&udp_frame(&flow(10000 + p), 200, u32::from(p)))
            .expect("send");
    }
    let seen = collect_flows(&mut s, &mut rx, 64, WAIT);
    assert_eq!(seen.len(), 64, "flows lost on the disabled pair");
    // Enabled again, the pair carries traffic again.
    let mut rx2 = RxQueue::new(2, false);
    for q in [2, 3] {
        s.fe.set_vring_enable(q, true).expect("SET_VRING_ENABLE");
    }
    rx2.post(&mut s, 128, 1, 1526);
    rx[0].post(&mut s, 64, 1, 1526);
    rig.wait_log("queue pair 1: enabled; tap queue attached");
    let mut both = [rx.into_iter().next().expect("rx"), rx2];
    for p in 0..64u16 {
        host.send(&udp_frame(&flow(20000 + p), 200, u32::from(p)))
            .expect("send");
    }
    let seen = collect_flows(&mut s, &mut both, 64, WAIT);
    assert_eq!(seen.len(), 64, "frames lost after re-enabling");
    assert!(
        seen.values().any(|&i| i == 1),
        "no flow on the re-enabled pair"
    );
}

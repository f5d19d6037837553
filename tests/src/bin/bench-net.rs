//! bench-net: frames per second and Gbit/s through vhost-user-net, driven by the mock
//! frontend, with the daemon's tap in a network namespace made for each run.
//!
//! Transmit (guest to host): one thread per queue pair keeps its transmit ring full of
//! frames, reposting each chain the daemon returns; the figure is what the tap's kernel side
//! received (its rx_packets counter). Receive (host to guest): one generator thread sends UDP
//! frames of 16 flows per pair into the tap with a packet socket (sendmmsg, past the qdisc,
//! backing off while the tap's queues are full); one thread per pair keeps the receive ring
//! full of 2 KiB buffers; the figure is the frames that reached the receive rings.
//!
//! The same loads run against the tap alone ("raw tap": one thread per tap queue writing or
//! reading frames with their virtio-net header, one system call per frame, as the daemon
//! does), the ceiling of any tap-backed vhost-user-net daemon on this machine.
//!
//! With `--dpdk PATH` the same loads also run through DPDK's testpmd forwarding between its
//! vhost-user PMD and its tap PMD (one polling forwarding core), the peer.
//!
//! Usage: bench-net [--seconds S] [--daemon PATH] [--dpdk TESTPMD] [--sizes 64,1500] [--pairs 1,2] [--rounds N]

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_test::net::{poll_in, udp_frame, Ipv4Flow, NetNs, PacketSocket, VnetHdr};
use vhost_user_test::{binary, Daemon, Desc, Options, Session, SplitQueue};
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::GuestMemoryMmap;

const TAP: &str = "bn0";
/// testpmd's runtime directory name under /var/run/dpdk (removed after each run).
const DPDK_PREFIX: &str = "bench-net";
const HDR: usize = 12;
const RX_BUF: u32 = 2048;
const QUEUE_SIZE: u16 = 256;
const WARMUP: Duration = Duration::from_millis(300);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Frames sent to this MAC are not for the host's stack: dropped right after the tap.
const ELSEWHERE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x09];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, Debug)]
struct Case {
    dir: Dir,
    size: usize,
    pairs: usize,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    frames: u64,
    secs: f64,
    size: usize,
    /// CPU the daemon used, in cores.
    cpu: Option<f64>,
}

impl Figures {
    fn mpps(&self) -> f64 {
        self.frames as f64 / self.secs / 1e6
    }

    fn gbps(&self) -> f64 {
        (self.frames * self.size as u64 * 8) as f64 / self.secs / 1e9
    }
}

struct Args {
    secs: f64,
    /// Runs of each load per backend; the best is shown.
    rounds: usize,
    daemon: PathBuf,
    /// DPDK's testpmd, the peer, when available.
    dpdk: Option<PathBuf>,
    sizes: Vec<usize>,
    pairs: Vec<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        secs: 1.5,
        rounds: 1,
        daemon: PathBuf::new(),
        dpdk: None,
        sizes: vec![64, 1500],
        pairs: vec![1, 2],
    };
    let mut daemon = None;
    let mut it = std::env::args().skip(1);
    let list = |v: Option<String>| -> Result<Vec<usize>, String> {
        v.ok_or("missing value")?
            .split(',')
            .map(|x| x.parse::<usize>().map_err(|e| format!("{x}: {e}")))
            .collect()
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                args.secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&s: &f64| s > 0.0)
                    .ok_or("--seconds needs a positive number")?
            }
            "--daemon" => daemon = Some(PathBuf::from(it.next().ok_or("--daemon needs a path")?)),
            "--dpdk" => args.dpdk = Some(PathBuf::from(it.next().ok_or("--dpdk needs a path")?)),
            "--sizes" => args.sizes = list(it.next())?,
            "--pairs" => args.pairs = list(it.next())?,
            "--rounds" => {
                args.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&r: &usize| r > 0)
                    .ok_or("--rounds needs a positive number")?
            }
            "-h" | "--help" => {
                println!("usage: bench-net [--seconds S] [--daemon PATH] [--dpdk TESTPMD] [--sizes 64,1500] [--pairs 1,2] [--rounds N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.sizes.iter().any(|&s| !(60..=1514).contains(&s)) {
        return Err("frame sizes must be between 60 and 1514 bytes".into());
    }
    if args.pairs.iter().any(|&p| p == 0 || p > 8) {
        return Err("queue pairs must be between 1 and 8".into());
    }
    args.daemon = daemon.unwrap_or_else(|| binary("vhost-user-net"));
    Ok(args)
}

fn flow(i: usize, to_guest: bool) -> Ipv4Flow {
    Ipv4Flow {
        dst_mac: if to_guest { GUEST_MAC } else { ELSEWHERE_MAC },
        src_mac: if to_guest { HOST_MAC } else { GUEST_MAC },
        src: Ipv4Addr::new(10, 88, 0, 1),
        dst: Ipv4Addr::new(10, 88, 0, 2),
        sport: 10000 + i as u16,
        dport: 5001,
    }
}

/// The frame pair `p` transmits, with its virtio-net header.
fn tx_frame(p: usize, size: usize) -> Vec<u8> {
    let mut v = VnetHdr::default().to_bytes(HDR);
    v.extend(udp_frame(&flow(p, false), size, p as u32));
    v
}

/// Frames of the host-to-guest load: 16 flows per pair, so the tap spreads them.
fn rx_frames(case: &Case) -> Vec<Vec<u8>> {
    (0..16 * case.pairs)
        .map(|i| udp_frame(&flow(i, true), case.size, i as u32))
        .collect()
}

/// Send `frames` round and round until `stop`; back off while the tap is full.
fn generate(sock: PacketSocket, frames: Vec<Vec<u8>>, stop: Arc<AtomicBool>) {
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    let batch: Vec<&[u8]> = refs.iter().cycle().take(64).copied().collect();
    while !stop.load(Ordering::Relaxed) {
        match sock.send_many(&batch) {
            Ok(n) if n == batch.len() => {}
            Ok(_) => std::thread::sleep(Duration::from_micros(20)),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                std::thread::sleep(Duration::from_micros(20))
            }
            Err(e) => panic!("generator: {e}"),
        }
    }
}

/// One ring the benchmark keeps full: every chain the device returns is posted again.
struct Ring<'a> {
    mem: &'a GuestMemoryMmap,
    q: &'a mut SplitQueue,
    /// Buffer of each posted chain, by head.
    bufs: Vec<u64>,
    len: u32,
    writable: bool,
}

impl<'a> Ring<'a> {
    fn new(
        mem: &'a GuestMemoryMmap,
        q: &'a mut SplitQueue,
        bufs: &[u64],
        len: u32,
        writable: bool,
    ) -> Ring<'a> {
        let size = usize::from(q.size());
        let mut ring = Ring {
            mem,
            q,
            bufs: vec![0; size],
            len,
            writable,
        };
        for &b in bufs {
            ring.post(b);
        }
        ring.q.notify(mem);
        ring
    }

    fn post(&mut self, buf: u64) {
        let d = if self.writable {
            Desc::writable(buf, self.len)
        } else {
            Desc::readable(buf, self.len)
        };
        let head = self
            .q
            .push(self.mem, &[d])
            .expect("a free slot for each returned chain");
        self.bufs[usize::from(head)] = buf;
    }

    /// Repost what the device returned; counts frames in `frames`. Sleeps on the call
    /// eventfd when nothing came back.
    fn turn(&mut self, frames: &AtomicU64) {
        let used = self.q.poll_used(self.mem);
        if used.is_empty() {
            let _ = poll_in(self.q.call_fd().as_raw_fd(), Duration::from_millis(10));
            let _ = self.q.call_fd().read();
            return;
        }
        for u in &used {
            let buf = self.bufs[usize::from(u.id)];
            self.post(buf);
        }
        self.q.notify(self.mem);
        frames.fetch_add(used.len() as u64, Ordering::Relaxed);
    }
}

/// Measure `counter()` over the run after a warm-up; returns (frames, seconds, cpu seconds).
fn measure(
    secs: f64,
    mut counter: impl FnMut() -> u64,
    cpu: impl Fn() -> Duration,
) -> (u64, f64, f64) {
    std::thread::sleep(WARMUP);
    let (f0, c0, t0) = (counter(), cpu(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (f1, c1, t1) = (counter(), cpu(), Instant::now());
    let dt = (t1 - t0).as_secs_f64();
    (f1 - f0, dt, (c1 - c0).as_secs_f64())
}

fn tap_rx_packets(ns: &NetNs) -> u64 {
    ns.counters(TAP).ok().flatten().map_or(0, |c| c.rx_packets)
}

/// A vhost-user-net backend on a tap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// vhost-user-net.
    Ours,
    /// DPDK's testpmd forwarding between its vhost-user PMD and its tap PMD.
    Dpdk,
}

/// The command line that starts `backend` serving `sock` with tap [`TAP`].
fn backend_command(args: &Args, backend: Backend, case: &Case, sock: &std::path::Path) -> Command {
    match backend {
        Backend::Ours => {
            let mut cmd = Command::new(&args.daemon);
            cmd.args(["--tap", TAP, "--log-level", "warn", "--num-queue-pairs"])
                .arg(case.pairs.to_string())
                .arg("--socket")
                .arg(sock);
            cmd
        }
        Backend::Dpdk => {
            let testpmd = args.dpdk.as_ref().expect("--dpdk given");
            let mut cmd = Command::new(testpmd);
            // Main lcore 0, one forwarding lcore (1) polling every queue; no hugepages, no
            // PCI, no shared config. testpmd runs until SIGTERM with --stats-period.
            cmd.args([
                "-l",
                "0-1",
                "--no-huge",
                "-m",
                "512",
                "--no-pci",
                "--no-shconf",
            ])
            .arg(format!("--file-prefix={DPDK_PREFIX}"))
            .arg("--vdev")
            .arg(format!(
                "net_vhost0,iface={},queues={}",
                sock.display(),
                case.pairs
            ))
            .arg("--vdev")
            .arg(format!("net_tap0,iface={TAP}"))
            .args(["--", "--forward-mode=io", "--nb-cores=1", "--auto-start"])
            .arg(format!("--rxq={}", case.pairs))
            .arg(format!("--txq={}", case.pairs))
            .args(["--total-num-mbufs=32768", "--stats-period=3600"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
            cmd
        }
    }
}

/// The load through a vhost-user-net backend.
fn run_backend(args: &Args, backend: Backend, case: &Case) -> Figures {
    let ns = NetNs::new().expect("network namespace (run as root)");
    let dir = tempfile::tempdir().expect("temporary directory");
    let sock = dir.path().join("net.sock");
    let mut cmd = backend_command(args, backend, case, &sock);
    ns.command(&mut cmd);
    let daemon = Daemon::spawn(&mut cmd, &sock);
    let mut features = 1u64 << VIRTIO_RING_F_EVENT_IDX | 1u64 << VIRTIO_NET_F_MRG_RXBUF;
    if case.pairs > 1 {
        features |= 1u64 << VIRTIO_NET_F_MQ;
    }
    let opts = Options {
        features,
        num_queues: 2 * case.pairs,
        queue_size: QUEUE_SIZE,
        mem_size: 128 << 20,
        ..Options::default()
    };
    let mut s = Session::connect(&sock, &opts).expect("frontend session");
    ns.wait_up(TAP, Duration::from_secs(5)).expect("tap up");
    // Buffers: each transmit ring's frame, or receive buffers.
    let mut bufs = Vec::new();
    for p in 0..case.pairs {
        let b: Vec<u64> = match case.dir {
            Dir::Tx => {
                let f = tx_frame(p, case.size);
                (0..QUEUE_SIZE).map(|_| s.guest.put(&f)).collect()
            }
            Dir::Rx => (0..QUEUE_SIZE)
                .map(|_| s.guest.alloc(RX_BUF as usize))
                .collect(),
        };
        bufs.push(b);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let frames = AtomicU64::new(0);
    let generator = (case.dir == Dir::Rx).then(|| {
        let sock = PacketSocket::open(&ns, TAP, false).expect("packet socket");
        sock.bypass_qdisc().expect("PACKET_QDISC_BYPASS");
        let frames = rx_frames(case);
        let stop = stop.clone();
        std::thread::spawn(move || generate(sock, frames, stop))
    });
    let mem = s.guest.mem().clone();
    let (n, secs, cpu) = std::thread::scope(|scope| {
        for (i, q) in s.queues.iter_mut().enumerate() {
            let p = i / 2;
            let is_tx = i % 2 == 1;
            if is_tx != (case.dir == Dir::Tx) {
                continue;
            }
            let (len, writable) = match case.dir {
                Dir::Tx => ((HDR + case.size) as u32, false),
                Dir::Rx => (RX_BUF, true),
            };
            let (mem, bufs, stop, frames) = (&mem, &bufs[p], &stop, &frames);
            scope.spawn(move || {
                let mut ring = Ring::new(mem, q, bufs, len, writable);
                while !stop.load(Ordering::Relaxed) {
                    ring.turn(frames);
                }
            });
        }
        let r = match case.dir {
            Dir::Tx => measure(args.secs, || tap_rx_packets(&ns), || daemon.cpu_time()),
            Dir::Rx => measure(
                args.secs,
                || frames.load(Ordering::Relaxed),
                || daemon.cpu_time(),
            ),
        };
        stop.store(true, Ordering::Relaxed);
        r
    });
    if let Some(g) = generator {
        g.join().expect("generator");
    }
    drop(s);
    drop(daemon);
    if backend == Backend::Dpdk {
        let _ = std::fs::remove_dir_all(format!("/var/run/dpdk/{DPDK_PREFIX}"));
    }
    Figures {
        frames: n,
        secs,
        size: case.size,
        cpu: Some(cpu / secs),
    }
}

/// The same load on the tap alone: the kernel's tap path, no vhost-user device.
fn run_raw_tap(args: &Args, case: &Case) -> Figures {
    let ns = NetNs::new().expect("network namespace (run as root)");
    let taps = ns.open_tap(TAP, case.pairs).expect("tap");
    ns.wait_up(TAP, Duration::from_secs(5)).expect("tap up");
    let stop = Arc::new(AtomicBool::new(false));
    let frames = AtomicU64::new(0);
    let generator = (case.dir == Dir::Rx).then(|| {
        let sock = PacketSocket::open(&ns, TAP, false).expect("packet socket");
        sock.bypass_qdisc().expect("PACKET_QDISC_BYPASS");
        let frames = rx_frames(case);
        let stop = stop.clone();
        std::thread::spawn(move || generate(sock, frames, stop))
    });
    let (n, secs, _) = std::thread::scope(|scope| {
        for (p, tap) in taps.iter().enumerate() {
            let (stop, frames) = (&stop, &frames);
            let dir = case.dir;
            let size = case.size;
            scope.spawn(move || raw_queue(tap, dir, tx_frame(p, size), stop, frames));
        }
        let r = match case.dir {
            Dir::Tx => measure(args.secs, || tap_rx_packets(&ns), || Duration::ZERO),
            Dir::Rx => measure(
                args.secs,
                || frames.load(Ordering::Relaxed),
                || Duration::ZERO,
            ),
        };
        stop.store(true, Ordering::Relaxed);
        r
    });
    if let Some(g) = generator {
        g.join().expect("generator");
    }
    Figures {
        frames: n,
        secs,
        size: case.size,
        cpu: None,
    }
}

/// One tap queue: write `frame` or read frames, one system call each, until `stop`.
fn raw_queue(mut tap: &File, dir: Dir, frame: Vec<u8>, stop: &AtomicBool, frames: &AtomicU64) {
    let mut buf = vec![0u8; 65536];
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let r = match dir {
            Dir::Tx => tap.write(&frame),
            Dir::Rx => tap.read(&mut buf),
        };
        match r {
            Ok(_) => {
                n += 1;
                if n.is_multiple_of(64) {
                    frames.fetch_add(64, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if dir == Dir::Rx {
                    let _ = poll_in(tap.as_raw_fd(), Duration::from_millis(10));
                } else {
                    std::thread::yield_now();
                }
            }
            Err(e) => panic!("tap: {e}"),
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-net: {e}");
            return ExitCode::from(2);
        }
    };
    let mut cases = Vec::new();
    for dir in [Dir::Tx, Dir::Rx] {
        for &size in &args.sizes {
            for &pairs in &args.pairs {
                cases.push(Case { dir, size, pairs });
            }
        }
    }
    println!(
        "bench-net: {} s per run after {} ms warm-up, best of {} round(s); daemon {}; peer {}",
        args.secs,
        WARMUP.as_millis(),
        args.rounds,
        args.daemon.display(),
        args.dpdk.as_ref().map_or("none".to_string(), |p| format!(
            "DPDK testpmd ({})",
            p.display()
        ))
    );
    let mut rows = Vec::new();
    for case in &cases {
        eprintln!(
            "[bench-net] {:?} {} B, {} pair(s): vhost-user-net{}, raw tap",
            case.dir,
            case.size,
            case.pairs,
            if args.dpdk.is_some() { ", DPDK" } else { "" }
        );
        // Other work on the machine only ever slows a run down: keep each one's best round.
        let best = |a: Figures, b: Figures| {
            if a.secs == 0.0 || b.mpps() > a.mpps() {
                b
            } else {
                a
            }
        };
        let mut ours = Figures::default();
        let mut peer: Option<Figures> = None;
        let mut raw = Figures::default();
        for _ in 0..args.rounds {
            ours = best(ours, run_backend(&args, Backend::Ours, case));
            if args.dpdk.is_some() {
                let p = run_backend(&args, Backend::Dpdk, case);
                peer = Some(peer.map_or(p, |q| best(q, p)));
            }
            raw = best(raw, run_raw_tap(&args, case));
        }
        rows.push((*case, ours, peer, raw));
    }
    let ratio = |a: &Figures, b: &Figures| {
        if b.frames > 0 {
            format!("{:.0}%", 100.0 * a.mpps() / b.mpps())
        } else {
            "-".to_string()
        }
    };
    let cpu = |f: &Figures| format!("{:.0}%", f.cpu.unwrap_or(0.0) * 100.0);
    println!();
    println!(
        "{:<3} {:>6} {:>5} | {:>24} | {:>24} | {:>14} | {:>8} {:>8}",
        "", "", "", "vhost-user-net", "DPDK testpmd (peer)", "raw tap", "ours/", "ours/"
    );
    println!(
        "{:<3} {:>6} {:>5} | {:>7} {:>7} {:>8} | {:>7} {:>7} {:>8} | {:>7} {:>6} | {:>8} {:>8}",
        "dir",
        "frame",
        "pairs",
        "Mpps",
        "Gbit/s",
        "CPU",
        "Mpps",
        "Gbit/s",
        "CPU",
        "Mpps",
        "Gbit/s",
        "peer",
        "raw"
    );
    println!("{}", "-".repeat(108));
    for (case, ours, peer, raw) in &rows {
        let (pm, pg, pc, pr) = match peer {
            Some(p) => (
                format!("{:.3}", p.mpps()),
                format!("{:.2}", p.gbps()),
                cpu(p),
                ratio(ours, p),
            ),
            None => ("n/a".into(), "n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "{:<3} {:>5}B {:>5} | {:>7.3} {:>7.2} {:>8} | {:>7} {:>7} {:>8} | {:>7.3} {:>6.2} | {:>8} {:>8}",
            match case.dir {
                Dir::Tx => "TX",
                Dir::Rx => "RX",
            },
            case.size,
            case.pairs,
            ours.mpps(),
            ours.gbps(),
            cpu(ours),
            pm,
            pg,
            pc,
            raw.mpps(),
            raw.gbps(),
            pr,
            ratio(ours, raw)
        );
    }
    println!(
        "CPU: the backend process's CPU time over the run (100% = one core). TX counts frames \
         the kernel got from the tap; RX counts frames that reached the receive rings."
    );
    ExitCode::SUCCESS
}

//! 4 KiB random read and write through the mock frontend against vhost-user-block and
//! qemu-storage-daemon's vhost-user-blk export, on the same image in the same run.
//!
//! Each daemon serves the image with 4 queues; for every workload the frontend keeps QD
//! requests in flight on each of Q queues (one thread per queue, its own ring and buffers),
//! measures IOPS and per-request latency (post to used-ring completion), and reads the
//! daemon's CPU time (utime + stime of all its threads) over the measured interval.
//! The daemons take turns on each workload (`--rounds N` repeats the turns and keeps each
//! daemon's best run: other work on a shared machine only ever slows a run down), so a burst
//! of load from elsewhere hits both rather than whichever happened to run then.
//! `--also PATH` adds a second build of vhost-user-block (for before/after comparisons).
//! Run it through `scripts/bench-block`, which builds and installs what it needs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vhost_user_test::blk::{self, SECTOR};
use vhost_user_test::{cpu_time, Daemon, Desc, Options, Session, SplitQueue, F_EVENT_IDX};
use vm_memory::GuestMemoryMmap;

const BLOCK: usize = 4096;
const QUEUES: usize = 4;

struct Args {
    seconds: f64,
    size_mib: u64,
    dir: PathBuf,
    direct: bool,
    ours: PathBuf,
    also: Option<PathBuf>,
    peer: String,
    rounds: usize,
    event_idx: bool,
    only: Option<String>,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-block [--seconds S] [--size-mib N] [--dir DIR] [--direct] [--no-event-idx]\n\
         \x20                  [--only NAME-PART] [--rounds N] [--ours PATH] [--also PATH] [--peer PATH]\n\
         defaults: 2 s per workload, a 256 MiB image in /dev/shm, page-cache I/O"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut a = Args {
        seconds: 2.0,
        size_mib: 256,
        dir: PathBuf::from("/dev/shm"),
        direct: false,
        ours: exe.with_file_name("vhost-user-block"),
        also: None,
        peer: "qemu-storage-daemon".into(),
        rounds: 1,
        event_idx: true,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--seconds" => a.seconds = val().parse().unwrap_or_else(|_| usage()),
            "--size-mib" => a.size_mib = val().parse().unwrap_or_else(|_| usage()),
            "--dir" => a.dir = PathBuf::from(val()),
            "--direct" => a.direct = true,
            "--no-event-idx" => a.event_idx = false,
            "--only" => a.only = Some(val()),
            "--ours" => a.ours = PathBuf::from(val()),
            "--also" => a.also = Some(PathBuf::from(val())),
            "--rounds" => {
                a.rounds = val().parse().unwrap_or_else(|_| usage());
                if a.rounds == 0 {
                    usage();
                }
            }
            "--peer" => a.peer = val(),
            _ => usage(),
        }
    }
    a
}

#[derive(Clone, Copy)]
struct Workload {
    write: bool,
    depth: usize,
    queues: usize,
}

impl Workload {
    fn name(&self) -> String {
        format!(
            "rand{} QD{} x{}q",
            if self.write { "write" } else { "read" },
            self.depth,
            self.queues
        )
    }
}

#[derive(Default, Clone)]
struct Figures {
    done: u64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_s: f64,
    /// CPU time of this frontend process over the same interval.
    frontend_cpu_s: f64,
    errors: u64,
}

impl Figures {
    /// Requests per second of daemon CPU time.
    fn iops_per_cpu(&self) -> f64 {
        if self.cpu_s > 0.0 {
            self.done as f64 / self.cpu_s
        } else {
            0.0
        }
    }
}

/// Buffers of one request slot in guest memory.
struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
    posted: Instant,
}

/// xorshift64*: cheap, and the same sequence for both daemons.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct QueueResult {
    done: u64,
    errors: u64,
    latencies_ns: Vec<u64>,
}

/// Keep `depth` requests in flight on `q` until `end`; count those completed in `[t0, end)`.
#[allow(clippy::too_many_arguments)]
fn drive(
    q: &mut SplitQueue,
    mem: &GuestMemoryMmap,
    guest_slots: &mut [Slot],
    w: Workload,
    blocks: u64,
    seed: u64,
    t0: Instant,
    end: Instant,
) -> QueueResult {
    use vm_memory::{Bytes, GuestAddress};
    let mut rng = Rng(seed | 1);
    let mut by_head = vec![usize::MAX; usize::from(q.size())];
    let mut res = QueueResult {
        done: 0,
        errors: 0,
        latencies_ns: Vec::with_capacity(1 << 20),
    };
    let post = |q: &mut SplitQueue, slot: &mut Slot, rng: &mut Rng| -> u16 {
        let sector = rng.next() % blocks * (BLOCK as u64 / SECTOR);
        let t = if w.write { blk::T_OUT } else { blk::T_IN };
        let hdr = blk::header(t, sector);
        mem.write_slice(&hdr, GuestAddress(slot.hdr))
            .expect("header in guest memory");
        mem.write_obj(0xffu8, GuestAddress(slot.status))
            .expect("status in guest memory");
        let data = if w.write {
            Desc::readable(slot.data, BLOCK as u32)
        } else {
            Desc::writable(slot.data, BLOCK as u32)
        };
        slot.posted = Instant::now();
        q.push(
            mem,
            &[
                Desc::readable(slot.hdr, 16),
                data,
                Desc::writable(slot.status, 1),
            ],
        )
        .expect("three free descriptors per slot")
    };
    for (i, slot) in guest_slots.iter_mut().enumerate() {
        let head = post(q, slot, &mut rng);
        by_head[usize::from(head)] = i;
    }
    q.notify(mem);
    let mut stopping = false;
    while q.in_flight() > 0 {
        let now = Instant::now();
        if now >= end {
            stopping = true;
        }
        let timeout = Duration::from_secs(10);
        let used = match q.wait_used(mem, 1, timeout, None) {
            Ok(u) => u,
            Err(e) => {
                eprintln!("bench-block: {e}");
                res.errors += u64::from(q.in_flight());
                break;
            }
        };
        let now = Instant::now();
        for u in used {
            let i = by_head[usize::from(u.id)];
            let slot = &mut guest_slots[i];
            let status: u8 = mem
                .read_obj(GuestAddress(slot.status))
                .expect("status in guest memory");
            if slot.posted >= t0 && now < end {
                res.done += 1;
                res.latencies_ns
                    .push(now.duration_since(slot.posted).as_nanos() as u64);
                if status != blk::S_OK {
                    res.errors += 1;
                }
            }
            if !stopping {
                let head = post(q, slot, &mut rng);
                by_head[usize::from(head)] = i;
            }
        }
        q.notify(mem);
    }
    res
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn run_workload(s: &mut Session, pid: u32, w: Workload, blocks: u64, seconds: f64) -> Figures {
    let warmup = Duration::from_millis(300);
    let start = Instant::now();
    let t0 = start + warmup;
    let end = t0 + Duration::from_secs_f64(seconds);
    // Per queue: `depth` slots of buffers, allocated afresh (the allocator wraps).
    let mut slots: Vec<Vec<Slot>> = (0..w.queues)
        .map(|_| {
            (0..w.depth)
                .map(|_| Slot {
                    hdr: s.guest.alloc(16),
                    data: s.guest.alloc_aligned(BLOCK, 4096),
                    status: s.guest.alloc(1),
                    posted: start,
                })
                .collect()
        })
        .collect();
    let mem = s.guest.mem();
    let mut cpu = (Duration::ZERO, Duration::ZERO);
    let mut own = (Duration::ZERO, Duration::ZERO);
    let results: Vec<QueueResult> = std::thread::scope(|scope| {
        let handles: Vec<_> = s.queues[..w.queues]
            .iter_mut()
            .zip(slots.iter_mut())
            .enumerate()
            .map(|(i, (q, sl))| {
                scope.spawn(move || drive(q, mem, sl, w, blocks, 0x9e37_79b9 + i as u64, t0, end))
            })
            .collect();
        std::thread::sleep(t0.saturating_duration_since(Instant::now()));
        cpu.0 = cpu_time(pid);
        own.0 = cpu_time(std::process::id());
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        cpu.1 = cpu_time(pid);
        own.1 = cpu_time(std::process::id());
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread"))
            .collect()
    });
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let done: u64 = results.iter().map(|r| r.done).sum();
    Figures {
        done,
        iops: done as f64 / seconds,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        cpu_s: cpu.1.saturating_sub(cpu.0).as_secs_f64(),
        frontend_cpu_s: own.1.saturating_sub(own.0).as_secs_f64(),
        errors: results.iter().map(|r| r.errors).sum(),
    }
}

/// A daemon under test with its frontend session.
struct Contender {
    label: String,
    daemon: Daemon,
    session: Session,
    socket: PathBuf,
}

impl Contender {
    fn start(label: &str, cmd: &mut Command, socket: &Path, args: &Args) -> Result<Self, String> {
        eprintln!("bench-block: {label}: starting");
        let daemon = Daemon::spawn(cmd.stdout(Stdio::null()), socket);
        let features = if args.event_idx { F_EVENT_IDX } else { 0 };
        let opts = Options {
            features,
            num_queues: QUEUES,
            queue_size: 256,
            mem_size: 64 << 20,
            ..Options::default()
        };
        let session = Session::connect(socket, &opts).map_err(|e| format!("{label}: {e}"))?;
        Ok(Contender {
            label: label.to_owned(),
            daemon,
            session,
            socket: socket.to_owned(),
        })
    }
}

impl Drop for Contender {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Run every workload on every daemon, the daemons taking turns, `rounds` times; each
/// daemon's best run (highest IOPS) per workload, indexed `[daemon][workload]`.
fn bench(
    contenders: &mut [Contender],
    args: &Args,
    workloads: &[Workload],
    blocks: u64,
) -> Vec<Vec<Figures>> {
    let mut best = vec![Vec::new(); contenders.len()];
    for w in workloads {
        let mut round_best: Vec<Option<Figures>> = vec![None; contenders.len()];
        for round in 0..args.rounds {
            for (c, slot) in contenders.iter_mut().zip(round_best.iter_mut()) {
                let f = run_workload(&mut c.session, c.daemon.pid(), *w, blocks, args.seconds);
                eprintln!(
                    "bench-block: {:<19} {:<20} round {}: {:>9.0} IOPS  p50 {:>7.1} us  p99 {:>7.1} us  CPU {:.2} s (frontend {:.2} s){}",
                    c.label,
                    w.name(),
                    round + 1,
                    f.iops,
                    f.p50_us,
                    f.p99_us,
                    f.cpu_s,
                    f.frontend_cpu_s,
                    if f.errors > 0 {
                        format!("  {} ERRORS", f.errors)
                    } else {
                        String::new()
                    }
                );
                // Errors are never hidden by a better round.
                let errors = f.errors + slot.as_ref().map_or(0, |b| b.errors);
                if slot.as_ref().is_none_or(|b| f.iops > b.iops) {
                    *slot = Some(f);
                }
                if let Some(b) = slot.as_mut() {
                    b.errors = errors;
                }
            }
        }
        for (b, f) in best.iter_mut().zip(round_best) {
            b.push(f.unwrap_or_default());
        }
    }
    best
}

/// Write the image and leave none of it dirty or cached: otherwise whichever daemon runs first
/// with O_DIRECT pays for writing back the page cache (and for invalidating it) under its load.
fn write_image(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    // SAFETY: fadvise on our own open descriptor; no memory is passed.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

fn main() -> ExitCode {
    let args = parse_args();
    let dir = match tempfile::Builder::new()
        .prefix("bench-block.")
        .tempdir_in(&args.dir)
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "bench-block: cannot make a directory in {}: {e}",
                args.dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let image = dir.path().join("disk.img");
    let size = args.size_mib << 20;
    eprintln!(
        "bench-block: writing a {} MiB image at {}",
        args.size_mib,
        image.display()
    );
    let mut rng = Rng(0x1234_5678);
    let data: Vec<u8> = (0..size / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    if let Err(e) = write_image(&image, &data) {
        eprintln!("bench-block: cannot write {}: {e}", image.display());
        return ExitCode::FAILURE;
    }
    let blocks = size / BLOCK as u64;
    let workloads: Vec<Workload> = [false, true]
        .iter()
        .flat_map(|&write| {
            [(1, 1), (32, 1), (1, QUEUES), (32, QUEUES)].map(|(depth, queues)| Workload {
                write,
                depth,
                queues,
            })
        })
        .filter(|w| {
            args.only
                .as_ref()
                .is_none_or(|o| w.name().contains(o.as_str()))
        })
        .collect();
    if workloads.is_empty() {
        usage();
    }

    let ours_sock = dir.path().join("ours.sock");
    let our_command = |binary: &Path, socket: &Path| {
        let mut cmd = Command::new(binary);
        cmd.arg("--path")
            .arg(&image)
            .args(["--num-queues", &QUEUES.to_string(), "--socket"])
            .arg(socket)
            .env("RUST_LOG", "warn");
        if args.direct {
            cmd.arg("--direct");
        }
        cmd
    };
    let mut ours = our_command(&args.ours, &ours_sock);
    let peer_sock = dir.path().join("peer.sock");
    let cache = if args.direct {
        "cache.direct=on,aio=io_uring"
    } else {
        "cache.direct=off"
    };
    let mut peer = Command::new(&args.peer);
    peer.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={},{cache}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues={QUEUES}",
            peer_sock.display()
        ));

    let mut contenders = Vec::new();
    let also_sock = dir.path().join("also.sock");
    let mut also = args.also.as_ref().map(|path| our_command(path, &also_sock));
    let mut starts = vec![("vhost-user-block", &mut ours, &ours_sock)];
    if let Some(cmd) = also.as_mut() {
        starts.push(("vhost-user-block-b", cmd, &also_sock));
    }
    starts.push(("qemu-storage-daemon", &mut peer, &peer_sock));
    for (label, cmd, socket) in starts {
        match Contender::start(label, cmd, socket, &args) {
            Ok(c) => contenders.push(c),
            Err(e) => {
                eprintln!("bench-block: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let figures = bench(&mut contenders, &args, &workloads, blocks);
    drop(contenders);
    let peer_fig = figures.last().expect("the peer was benchmarked");

    println!(
        "\n4 KiB random I/O, {} MiB image in {}{}, {} s per workload, best of {} interleaved round(s), EVENT_IDX {}; qsd = qemu-storage-daemon",
        args.size_mib,
        args.dir.display(),
        if args.direct { " (O_DIRECT)" } else { " (page cache)" },
        args.seconds,
        args.rounds,
        if args.event_idx { "on" } else { "off" }
    );
    let mut errors = peer_fig.iter().map(|f| f.errors).sum::<u64>();
    let names = ["ours = vhost-user-block", "ours = --also build"];
    for (ours_fig, name) in figures[..figures.len() - 1].iter().zip(names) {
        println!("{name}");
        println!(
            "{:<20} {:>9} {:>9} {:>6} | {:>15} {:>15} {:>6} | {:>9} {:>9} {:>6}",
            "workload",
            "ours IOPS",
            "qsd IOPS",
            "ratio",
            "ours p50/p99 us",
            "qsd p50/p99 us",
            "p50",
            "ours/CPUs",
            "qsd/CPUs",
            "ratio"
        );
        for ((w, o), p) in workloads.iter().zip(ours_fig).zip(peer_fig) {
            errors += o.errors;
            println!(
                "{:<20} {:>9.0} {:>9.0} {:>6} | {:>15} {:>15} {:>6} | {:>9.0} {:>9.0} {:>6}",
                w.name(),
                o.iops,
                p.iops,
                ratio(o.iops, p.iops),
                format!("{:.1}/{:.1}", o.p50_us, o.p99_us),
                format!("{:.1}/{:.1}", p.p50_us, p.p99_us),
                ratio(o.p50_us, p.p50_us),
                o.iops_per_cpu(),
                p.iops_per_cpu(),
                ratio(o.iops_per_cpu(), p.iops_per_cpu()),
            );
        }
    }
    println!(
        "(IOPS/CPUs = requests per second of daemon CPU time; p50 ratio < 1 means ours is faster)"
    );
    if errors > 0 {
        eprintln!("bench-block: {errors} request(s) failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

//! Measures a virtio-fs daemon through the mock frontend of the socket tests: metadata
//! operations per second (CREATE+RELEASE, LOOKUP, UNLINK of small files) and sequential 1 MiB
//! WRITE/READ throughput. One request in flight on request queue 1, as a single guest process
//! doing synchronous I/O would; payload descriptors are 16 KiB each.
//!
//! `cargo bench -p vhost-user-fs --bench fsbench -- --socket PATH [--files N] [--mib N]`
//! Prints `metric value` lines; scripts/bench-fs runs it against us and virtiofsd.

#[path = "../tests/frontend/mod.rs"]
mod frontend;

use std::path::PathBuf;
use std::time::Instant;

use frontend::Session;
use vhost_user_fs::fuse::abi::{self, init_flags as f, opcode as op, ROOT_ID};
use vm_memory::ByteValued;

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn ok(r: &frontend::Reply, what: &str) {
    if r.errno != 0 {
        eprintln!("fsbench: {what} failed: errno {}", r.errno);
        std::process::exit(1);
    }
}

fn main() {
    let mut socket = None;
    let mut files = 5000usize;
    let mut mib = 256usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "--files" => files = args.next().and_then(|v| v.parse().ok()).unwrap_or(files),
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).unwrap_or(mib),
            "--bench" => {}
            other => {
                eprintln!("fsbench: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    let Some(socket) = socket else {
        eprintln!("fsbench: --socket PATH required");
        std::process::exit(2);
    };
    let mut s = Session::connect(&socket, 2);
    let mut init = abi::InitIn {
        major: 7,
        minor: 38,
        max_readahead: 1 << 20,
        flags: (f::ASYNC_READ
            | f::BIG_WRITES
            | f::DO_READDIRPLUS
            | f::MAX_PAGES
            | f::PARALLEL_DIROPS) as u32,
    }
    .as_slice()
    .to_vec();
    init.extend_from_slice(&[0u8; 48]);
    let r = s.request(op::INIT, 0, &init, 4096);
    ok(&r, "INIT");

    // A fresh directory per run.
    let dirname = format!("bench-{}", std::process::id());
    let m = abi::MkdirIn {
        mode: 0o755,
        umask: 0,
    };
    let r = s.request(
        op::MKDIR,
        ROOT_ID,
        &[m.as_slice(), &name(&dirname)].concat(),
        4096,
    );
    ok(&r, "MKDIR");
    let dir = abi::EntryOut::from_slice(&r.data[..128])
        .map(|e| e.nodeid)
        .unwrap_or(0);

    let create = abi::CreateIn {
        flags: libc::O_RDWR as u32,
        mode: libc::S_IFREG | 0o644,
        umask: 0,
        open_flags: 0,
    };
    let t = Instant::now();
    for i in 0..files {
        let r = s.request(
            op::CREATE,
            dir,
            &[create.as_slice(), &name(&format!("f{i}"))].concat(),
            4096,
        );
        ok(&r, "CREATE");
        let node = abi::EntryOut::from_slice(&r.data[..128])
            .map(|e| e.nodeid)
            .unwrap_or(0);
        let fh = abi::OpenOut::from_slice(&r.data[128..])
            .map(|o| o.fh)
            .unwrap_or(0);
        let rel = abi::ReleaseIn {
            fh,
            ..Default::default()
        };
        ok(
            &s.request(op::RELEASE, node, rel.as_slice(), 4096),
            "RELEASE",
        );
    }
    println!(
        "create_per_s {:.0}",
        files as f64 / t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    for i in 0..files {
        ok(
            &s.request(op::LOOKUP, dir, &name(&format!("f{i}")), 4096),
            "LOOKUP",
        );
    }
    println!("stat_per_s {:.0}", files as f64 / t.elapsed().as_secs_f64());

    let t = Instant::now();
    for i in 0..files {
        ok(
            &s.request(op::UNLINK, dir, &name(&format!("f{i}")), 4096),
            "UNLINK",
        );
    }
    println!(
        "unlink_per_s {:.0}",
        files as f64 / t.elapsed().as_secs_f64()
    );

    // Sequential 1 MiB I/O.
    let r = s.request(
        op::CREATE,
        dir,
        &[create.as_slice(), &name("seq")].concat(),
        4096,
    );
    ok(&r, "CREATE seq");
    let node = abi::EntryOut::from_slice(&r.data[..128])
        .map(|e| e.nodeid)
        .unwrap_or(0);
    let fh = abi::OpenOut::from_slice(&r.data[128..])
        .map(|o| o.fh)
        .unwrap_or(0);
    // Requests and buffers are written into guest memory once, so the figures measure the
    // daemon, not this frontend's copies; only the offset changes between requests.
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i * 7) as u8).collect();
    let w = abi::WriteIn {
        fh,
        offset: 0,
        size: 1 << 20,
        ..Default::default()
    };
    let write_req = s.prepare(op::WRITE, node, &[w.as_slice(), &chunk].concat());
    let rd = abi::ReadIn {
        fh,
        offset: 0,
        size: 1 << 20,
        ..Default::default()
    };
    let read_req = s.prepare(op::READ, node, rd.as_slice());
    let status = s.guest.alloc(4096);
    let reply = s.guest.alloc(16 + (1 << 20));
    // fuse_write_in.offset / fuse_read_in.offset sit 8 bytes into the body.
    let set_offset = |s: &Session, req: (u64, usize), off: u64| {
        s.guest.write_obj(req.0 + 40 + 8, off);
    };
    let t = Instant::now();
    for i in 0..mib {
        set_offset(&s, write_req, (i as u64) << 20);
        let used = s.run_prepared(1, write_req, status, 4096, 16 << 10);
        if used != 24 {
            eprintln!("fsbench: WRITE reply of {used} bytes");
            std::process::exit(1);
        }
    }
    println!("write_mb_s {:.0}", mib as f64 / t.elapsed().as_secs_f64());
    let t = Instant::now();
    for i in 0..mib {
        set_offset(&s, read_req, (i as u64) << 20);
        let used = s.run_prepared(1, read_req, reply, 16 + (1 << 20), 16 << 10);
        if used != 16 + (1 << 20) {
            eprintln!("fsbench: READ reply of {used} bytes");
            std::process::exit(1);
        }
    }
    println!("read_mb_s {:.0}", mib as f64 / t.elapsed().as_secs_f64());
    let rel = abi::ReleaseIn {
        fh,
        ..Default::default()
    };
    ok(
        &s.request(op::RELEASE, node, rel.as_slice(), 4096),
        "RELEASE seq",
    );
    ok(
        &s.request(op::UNLINK, dir, &name("seq"), 4096),
        "UNLINK seq",
    );
    ok(
        &s.request(op::RMDIR, ROOT_ID, &name(&dirname), 4096),
        "RMDIR",
    );
}

//! vhost-user-block through the mock frontend: request types, config space, read-only,
//! multiqueue, hostile descriptor chains, reconnects and durability. Every check reads what a
//! user would: bytes in the image file, status bytes in guest memory.
//!
//! Needs the daemon built with the same profile (`cargo build -p vhost-user-block`).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vhost_user_test::blk::{self, Config};
use vhost_user_test::{
    binary, write_table, Completion, Daemon, Desc, Options, Session, DESC_F_INDIRECT, F_EVENT_IDX,
};
use vhost_user_test::{DESC_F_NEXT, DESC_F_WRITE};

const MIB: u64 = 1 << 20;
const F_INDIRECT: u64 = 1 << 28;

/// A temporary image file and a daemon serving it.
struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    socket: PathBuf,
    daemon: Daemon,
}

/// An image of `size` bytes where byte `i` is `fill(i)`, served with `args`.
fn serve(size: u64, fill: impl Fn(u64) -> u8, args: &[&str]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = dir.path().join("disk.img");
    let bytes: Vec<u8> = (0..size).map(fill).collect();
    fs::write(&image, bytes).expect("write image");
    let socket = dir.path().join("blk.sock");
    let mut all: Vec<&str> = vec!["--path", image.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    all.push("--socket");
    let daemon = Daemon::start(&binary("vhost-user-block"), &all, &socket);
    Fixture {
        _dir: dir,
        image,
        socket,
        daemon,
    }
}

fn connect(socket: &Path, num_queues: usize) -> Session {
    connect_sized(socket, num_queues, 256)
}

fn connect_sized(socket: &Path, num_queues: usize, queue_size: u16) -> Session {
    let opts = Options {
        features: F_INDIRECT | 1 << blk::VIRTIO_BLK_F_FLUSH | 1 << blk::VIRTIO_BLK_F_MQ,
        num_queues,
        queue_size,
        ..Options::default()
    };
    Session::connect(socket, &opts).expect("connect to the daemon")
}

fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(path).expect("open image");
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).expect("read image");
    v
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn read_write_flush_reach_the_image() {
    let fx = serve(4 * MIB, |i| (i / 512) as u8, &[]);
    let mut s = connect(&fx.socket, 1);

    // IN sees what is in the file.
    let r = s.blk_read(0, 100, 1024);
    assert_eq!(r.status, blk::S_OK);
    assert_eq!(r.data, file_bytes(&fx.image, 100 * 512, 1024));
    assert_eq!(r.used_len, 1025, "used length = data + status byte");

    // OUT lands in the file, and IN returns it.
    let data = pattern(7, 8192);
    assert_eq!(s.blk_write(0, 8, &data), blk::S_OK);
    assert_eq!(file_bytes(&fx.image, 8 * 512, data.len()), data);
    assert_eq!(s.blk_read(0, 8, data.len()).data, data);
    // The bytes around it are untouched.
    assert_eq!(file_bytes(&fx.image, 7 * 512, 512), vec![7u8; 512]);
    assert_eq!(file_bytes(&fx.image, 24 * 512, 512), vec![24u8; 512]);

    assert_eq!(s.blk_flush(0), blk::S_OK);

    // The last sector of the disk is in range; a scatter list of many buffers works.
    let last = 4 * MIB / 512 - 1;
    let r = s.blk_read(0, last, 512);
    assert_eq!(r.status, blk::S_OK);
    let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
    let bufs: Vec<u64> = (0..16).map(|_| s.guest.alloc(512)).collect();
    let status = s.guest.put(&[0xff]);
    let mut chain = vec![Desc::readable(hdr, 16)];
    chain.extend(bufs.iter().map(|&b| Desc::writable(b, 512)));
    chain.push(Desc::writable(status, 1));
    assert!(matches!(s.run(0, &chain), Completion::Used(u) if u.len == 16 * 512 + 1));
    assert_eq!(s.guest.read(status, 1)[0], blk::S_OK);
    let got: Vec<u8> = bufs.iter().flat_map(|&b| s.guest.read(b, 512)).collect();
    assert_eq!(got, file_bytes(&fx.image, 0, 16 * 512));
}

#[test]
fn indirect_chains_and_event_idx_over_many_ring_wraps() {
    event_idx_ring_wraps(&["--io-engine", "sync"]);
}

#[test]
fn indirect_chains_and_event_idx_with_direct_io_uring() {
    event_idx_ring_wraps(&["--direct", "--io-engine", "uring"]);
}

fn event_idx_ring_wraps(args: &[&str]) {
    let fx = serve(MIB, |_| 0, args);
    let opts = Options {
        features: F_INDIRECT | F_EVENT_IDX,
        queue_size: 16,
        ..Options::default()
    };
    let mut s = Session::connect(&fx.socket, &opts).expect("connect");
    assert_ne!(s.features & F_EVENT_IDX, 0, "daemon offers EVENT_IDX");
    // Batches of 1 to 5 requests with one notification each (kicks only when the device's
    // avail_event asks), half through indirect tables: 100 requests wrap the 16-entry ring.
    let mut i = 0u64;
    let mut batch = 1;
    while i < 100 {
        let n = batch.min(100 - i);
        let mut statuses = Vec::new();
        for k in i..i + n {
            let hdr = s.guest.put(&blk::header(blk::T_OUT, k));
            let buf = s.guest.put(&pattern(k as u8, 512));
            let status = s.guest.put(&[0xff]);
            let chain = [
                Desc::readable(hdr, 16),
                Desc::readable(buf, 512),
                Desc::writable(status, 1),
            ];
            let posted = if k % 2 == 0 {
                let table = s.guest.alloc(48);
                write_table(s.guest.mem(), table, &chain);
                let d = Desc {
                    addr: table,
                    len: 48,
                    flags: DESC_F_INDIRECT,
                };
                s.queues[0].push(s.guest.mem(), &[d])
            } else {
                s.queues[0].push(s.guest.mem(), &chain)
            };
            posted.expect("free descriptors");
            statuses.push(status);
        }
        s.queues[0].notify(s.guest.mem());
        assert_eq!(s.wait(0, n as usize).len(), n as usize);
        for (k, st) in statuses.iter().enumerate() {
            assert_eq!(
                s.guest.read(*st, 1)[0],
                blk::S_OK,
                "request {}",
                i + k as u64
            );
        }
        i += n;
        batch = batch % 5 + 1;
    }
    for i in 0..100u64 {
        assert_eq!(file_bytes(&fx.image, i * 512, 512), pattern(i as u8, 512));
    }
}

#[test]
fn get_id_returns_the_serial() {
    let fx = serve(MIB, |_| 0, &["--serial", "vol-0042"]);
    let mut s = connect(&fx.socket, 1);
    let r = s.blk_request(0, blk::T_GET_ID, 0, &[], 20).expect("answer");
    assert_eq!(r.status, blk::S_OK);
    let mut want = b"vol-0042".to_vec();
    want.resize(20, 0);
    assert_eq!(r.data, want);

    let plain = serve(MIB, |_| 0, &[]);
    let mut s = connect(&plain.socket, 1);
    let r = s.blk_request(0, blk::T_GET_ID, 0, &[], 20).expect("answer");
    assert_eq!((r.status, r.data), (blk::S_OK, vec![0u8; 20]));
}

#[test]
fn discard_and_write_zeroes() {
    let fx = serve(4 * MIB, |_| 0xaa, &[]);
    let mut s = connect(&fx.socket, 1);
    let run = |s: &mut Session, t: u32, ranges: &[[u8; 16]]| -> u8 {
        let body: Vec<u8> = ranges.concat();
        s.blk_request(0, t, 0, &body, 0).expect("answer").status
    };

    // WRITE_ZEROES without and with UNMAP: zeros in the file, neighbours untouched.
    assert_eq!(
        run(&mut s, blk::T_WRITE_ZEROES, &[blk::range(8, 8, 0)]),
        blk::S_OK
    );
    assert_eq!(file_bytes(&fx.image, 8 * 512, 4096), vec![0; 4096]);
    assert_eq!(file_bytes(&fx.image, 7 * 512, 512), vec![0xaa; 512]);
    assert_eq!(file_bytes(&fx.image, 16 * 512, 512), vec![0xaa; 512]);
    assert_eq!(
        run(
            &mut s,
            blk::T_WRITE_ZEROES,
            &[
                blk::range(64, 256, blk::WRITE_ZEROES_UNMAP),
                blk::range(1024, 8, 0)
            ]
        ),
        blk::S_OK
    );
    assert_eq!(
        file_bytes(&fx.image, 64 * 512, 256 * 512),
        vec![0; 256 * 512]
    );
    assert_eq!(file_bytes(&fx.image, 1024 * 512, 4096), vec![0; 4096]);
    assert_eq!(file_bytes(&fx.image, 320 * 512, 512), vec![0xaa; 512]);

    // DISCARD: the file gives the space back; what it covers reads back the same through the
    // device as in the file, and nothing outside it changes.
    let allocated = || std::os::unix::fs::MetadataExt::blocks(&fs::metadata(&fx.image).unwrap());
    let before = allocated();
    assert_eq!(
        run(&mut s, blk::T_DISCARD, &[blk::range(2048, 2048, 0)]),
        blk::S_OK
    );
    assert!(
        allocated() + 2048 <= before,
        "1 MiB discarded, but the image went from {before} to {} allocated sectors",
        allocated()
    );
    assert_eq!(
        s.blk_read(0, 2048, 2048 * 512).data,
        file_bytes(&fx.image, 2048 * 512, 2048 * 512)
    );
    assert_eq!(file_bytes(&fx.image, 2047 * 512, 512), vec![0xaa; 512]);
    assert_eq!(file_bytes(&fx.image, 4096 * 512, 512), vec![0xaa; 512]);

    // Bad ranges: beyond capacity, unknown flags, DISCARD with UNMAP, no range at all.
    let end = 4 * MIB / 512;
    assert_eq!(
        run(&mut s, blk::T_WRITE_ZEROES, &[blk::range(end - 4, 8, 0)]),
        blk::S_IOERR
    );
    assert_eq!(
        file_bytes(&fx.image, (end - 4) * 512, 2048),
        vec![0xaa; 2048]
    );
    assert_eq!(
        run(&mut s, blk::T_DISCARD, &[blk::range(u64::MAX / 2, 8, 0)]),
        blk::S_IOERR
    );
    assert_eq!(
        run(&mut s, blk::T_WRITE_ZEROES, &[blk::range(0, 8, 2)]),
        blk::S_UNSUPP
    );
    assert_eq!(
        run(
            &mut s,
            blk::T_DISCARD,
            &[blk::range(0, 8, blk::WRITE_ZEROES_UNMAP)]
        ),
        blk::S_UNSUPP
    );
    assert_eq!(file_bytes(&fx.image, 0, 4096), vec![0xaa; 4096]);
    assert_eq!(run(&mut s, blk::T_WRITE_ZEROES, &[]), blk::S_IOERR);
    assert_eq!(fs::metadata(&fx.image).expect("image").len(), 4 * MIB);
}

#[test]
fn unsupported_request_types_get_unsupp() {
    let fx = serve(MIB, |_| 0x55, &[]);
    let mut s = connect(&fx.socket, 1);
    for t in [2u32, 3, 7, 99, u32::MAX] {
        let r = s.blk_request(0, t, 0, &[], 512).expect("answer");
        assert_eq!(r.status, blk::S_UNSUPP, "type {t}");
    }
    assert_eq!(file_bytes(&fx.image, 0, 512), vec![0x55; 512]);
}

#[test]
fn config_space_describes_the_disk() {
    let fx = serve(
        6 * MIB,
        |_| 0,
        &["--num-queues", "3", "--queue-size", "128"],
    );
    let mut s = connect_sized(&fx.socket, 1, 128);
    for bit in [
        blk::VIRTIO_BLK_F_SEG_MAX,
        blk::VIRTIO_BLK_F_SIZE_MAX,
        blk::VIRTIO_BLK_F_BLK_SIZE,
        blk::VIRTIO_BLK_F_FLUSH,
        blk::VIRTIO_BLK_F_CONFIG_WCE,
        blk::VIRTIO_BLK_F_MQ,
        blk::VIRTIO_BLK_F_DISCARD,
        blk::VIRTIO_BLK_F_WRITE_ZEROES,
        blk::VIRTIO_BLK_F_TOPOLOGY,
    ] {
        assert_ne!(s.offered & 1 << bit, 0, "feature bit {bit} offered");
    }
    assert_eq!(s.offered & 1 << blk::VIRTIO_BLK_F_RO, 0);
    assert_eq!(s.fe_queue_num(), 3);
    let c = Config::parse(&s.config(0, blk::CONFIG_LEN).expect("config")).expect("parse");
    assert_eq!(c.capacity, 6 * MIB / 512);
    assert_eq!(c.blk_size, 512);
    assert_eq!(c.seg_max, 126, "queue size minus header and status");
    assert!(c.size_max >= 4096);
    assert_eq!(c.num_queues, 3);
    assert_eq!(c.writeback, 1, "write cache on by default");
    assert!(c.max_discard_sectors > 0 && c.max_discard_seg > 0);
    assert!(c.max_write_zeroes_sectors > 0 && c.max_write_zeroes_seg > 0);
    assert_eq!(c.write_zeroes_may_unmap, 1);
    // A partial read at an offset, as frontends do for single fields.
    assert_eq!(
        s.config(34, 2).expect("num_queues field"),
        3u16.to_le_bytes()
    );

    // CONFIG_WCE: the driver turns the cache off and the config space says so.
    s.set_config(32, &[0]).expect("set writeback");
    assert_eq!(s.config(32, 1).expect("writeback field"), [0]);

    let wt = serve(MIB, |_| 0, &["--writethrough"]);
    let mut s = connect(&wt.socket, 1);
    let c = Config::parse(&s.config(0, blk::CONFIG_LEN).expect("config")).expect("parse");
    assert_eq!(c.writeback, 0);
}

/// GET_QUEUE_NUM through the session's frontend.
trait QueueNum {
    fn fe_queue_num(&mut self) -> u64;
}

impl QueueNum for Session {
    fn fe_queue_num(&mut self) -> u64 {
        use vhost::vhost_user::VhostUserFrontend;
        self.fe.get_queue_num().expect("GET_QUEUE_NUM")
    }
}

#[test]
fn readonly_refuses_writes() {
    let fx = serve(MIB, |_| 0x3c, &["--readonly"]);
    let mut s = connect(&fx.socket, 1);
    assert_ne!(s.offered & 1 << blk::VIRTIO_BLK_F_RO, 0, "RO offered");
    assert_eq!(s.offered & 1 << blk::VIRTIO_BLK_F_DISCARD, 0);
    assert_eq!(s.offered & 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES, 0);
    assert_eq!(s.blk_write(0, 0, &[0u8; 4096]), blk::S_IOERR);
    let zero = blk::range(0, 8, 0);
    for t in [blk::T_WRITE_ZEROES, blk::T_DISCARD] {
        let r = s.blk_request(0, t, 0, &zero, 0).expect("answer");
        assert_eq!(r.status, blk::S_IOERR, "type {t}");
    }
    assert_eq!(file_bytes(&fx.image, 0, 8192), vec![0x3c; 8192]);
    let r = s.blk_read(0, 0, 4096);
    assert_eq!((r.status, r.data), (blk::S_OK, vec![0x3c; 4096]));
    assert_eq!(s.blk_flush(0), blk::S_OK);
}

#[test]
fn two_queues_serve_requests_at_once() {
    two_queues(&["--num-queues", "2", "--io-engine", "sync"]);
}

/// io_uring serves both queues from one worker thread.
#[test]
fn two_queues_serve_requests_at_once_with_direct_io_uring() {
    two_queues(&["--num-queues", "2", "--direct", "--io-engine", "uring"]);
}

/// io_uring with a worker thread per queue.
#[test]
fn two_queues_serve_requests_at_once_with_a_uring_thread_per_queue() {
    two_queues(&[
        "--num-queues",
        "2",
        "--direct",
        "--io-engine",
        "uring",
        "--uring-thread-per-queue",
    ]);
}

fn two_queues(args: &[&str]) {
    let fx = serve(4 * MIB, |_| 0, args);
    let mut s = connect(&fx.socket, 2);
    // Several writes in flight on both queues before waiting for any.
    let mut statuses = Vec::new();
    for i in 0..16u64 {
        let q = (i % 2) as usize;
        let hdr = s.guest.put(&blk::header(blk::T_OUT, i * 8));
        let buf = s.guest.put(&pattern(i as u8, 4096));
        let status = s.guest.put(&[0xff]);
        let chain = [
            Desc::readable(hdr, 16),
            Desc::readable(buf, 4096),
            Desc::writable(status, 1),
        ];
        s.queues[q].push(s.guest.mem(), &chain).expect("slots");
        statuses.push(status);
    }
    s.queues[0].kick();
    s.queues[1].kick();
    assert_eq!(s.wait(0, 8).len(), 8);
    assert_eq!(s.wait(1, 8).len(), 8);
    for (i, st) in statuses.iter().enumerate() {
        assert_eq!(s.guest.read(*st, 1)[0], blk::S_OK, "request {i}");
        let i = i as u64;
        assert_eq!(
            file_bytes(&fx.image, i * 4096, 4096),
            pattern(i as u8, 4096)
        );
    }
    // Each queue reads what the other wrote.
    assert_eq!(s.blk_read(1, 0, 4096).data, pattern(0, 4096));
    assert_eq!(s.blk_read(0, 8, 4096).data, pattern(1, 4096));
}

/// What a hostile chain's answer must look like if the daemon answers it at all.
enum Status {
    /// The chain has a proper status byte here: it must read IOERR.
    Ioerr(u64),
    /// The chain never ends (a loop, or longer than allowed), so no byte is its status byte;
    /// the one the driver meant must not read OK.
    NotOk(u64),
    /// No status byte the device could write: the chain comes back with nothing written.
    None,
}

/// A hostile request and how to post it.
struct Hostile {
    name: &'static str,
    /// Posts the chain on queue 0.
    post: fn(&mut Session) -> Status,
}

fn hdr_data_status(s: &mut Session, t: u32, sector: u64, data: Desc) -> u64 {
    let hdr = s.guest.put(&blk::header(t, sector));
    let status = s.guest.put(&[0xff]);
    s.add(
        0,
        &[Desc::readable(hdr, 16), data, Desc::writable(status, 1)],
    );
    status
}

const CAPACITY_SECTORS: u64 = 2 * MIB / 512;

fn hostile_cases() -> Vec<Hostile> {
    vec![
        Hostile {
            name: "data buffer outside guest memory",
            post: |s| {
                let far = s.guest.size() + 4096;
                Status::Ioerr(hdr_data_status(s, blk::T_IN, 0, Desc::writable(far, 4096)))
            },
        },
        Hostile {
            name: "data buffer running past the end of guest memory",
            post: |s| {
                let edge = s.guest.size() - 512;
                Status::Ioerr(hdr_data_status(
                    s,
                    blk::T_OUT,
                    0,
                    Desc::readable(edge, 4096),
                ))
            },
        },
        Hostile {
            name: "header outside guest memory",
            post: |s| {
                let status = s.guest.put(&[0xff]);
                let buf = s.guest.alloc(512);
                s.add(
                    0,
                    &[
                        Desc::readable(u64::MAX - 8, 16),
                        Desc::writable(buf, 512),
                        Desc::writable(status, 1),
                    ],
                );
                Status::Ioerr(status)
            },
        },
        Hostile {
            name: "IN into a device-readable buffer",
            post: |s| {
                let buf = s.guest.alloc(4096);
                Status::Ioerr(hdr_data_status(s, blk::T_IN, 0, Desc::readable(buf, 4096)))
            },
        },
        Hostile {
            name: "OUT from a device-writable buffer",
            post: |s| {
                let buf = s.guest.put(&[0x99; 4096]);
                Status::Ioerr(hdr_data_status(s, blk::T_OUT, 0, Desc::writable(buf, 4096)))
            },
        },
        Hostile {
            name: "writable header",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_OUT, 0));
                let buf = s.guest.put(&[0x99; 512]);
                let status = s.guest.put(&[0xff]);
                s.add(
                    0,
                    &[
                        Desc::writable(hdr, 16),
                        Desc::readable(buf, 512),
                        Desc::writable(status, 1),
                    ],
                );
                Status::Ioerr(status)
            },
        },
        Hostile {
            name: "short header",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_OUT, 0)[..8]);
                let status = s.guest.put(&[0xff]);
                s.add(0, &[Desc::readable(hdr, 8), Desc::writable(status, 1)]);
                Status::Ioerr(status)
            },
        },
        Hostile {
            name: "zero-length header",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let buf = s.guest.alloc(512);
                let status = s.guest.put(&[0xff]);
                s.add(
                    0,
                    &[
                        Desc::readable(hdr, 0),
                        Desc::writable(buf, 512),
                        Desc::writable(status, 1),
                    ],
                );
                Status::Ioerr(status)
            },
        },
        Hostile {
            name: "zero-length data buffer",
            post: |s| {
                let buf = s.guest.alloc(512);
                Status::Ioerr(hdr_data_status(s, blk::T_IN, 0, Desc::writable(buf, 0)))
            },
        },
        Hostile {
            name: "zero-length descriptor among the data",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_OUT, 0));
                let a = s.guest.put(&[0x99; 512]);
                let b = s.guest.put(&[0x99; 512]);
                let status = s.guest.put(&[0xff]);
                s.add(
                    0,
                    &[
                        Desc::readable(hdr, 16),
                        Desc::readable(a, 512),
                        Desc::readable(b, 0),
                        Desc::readable(b, 512),
                        Desc::writable(status, 1),
                    ],
                );
                Status::Ioerr(status)
            },
        },
        Hostile {
            name: "no status descriptor (readable last)",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_OUT, 0));
                let buf = s.guest.put(&[0x99; 512]);
                s.add(0, &[Desc::readable(hdr, 16), Desc::readable(buf, 512)]);
                Status::None
            },
        },
        Hostile {
            name: "zero-length status descriptor",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_OUT, 0));
                let buf = s.guest.put(&[0x99; 512]);
                let status = s.guest.put(&[0xff]);
                s.add(
                    0,
                    &[
                        Desc::readable(hdr, 16),
                        Desc::readable(buf, 512),
                        Desc::writable(status, 0),
                    ],
                );
                Status::None
            },
        },
        Hostile {
            name: "status byte outside guest memory",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_OUT, 0));
                let buf = s.guest.put(&[0x99; 512]);
                let far = s.guest.size() + 1;
                s.add(
                    0,
                    &[
                        Desc::readable(hdr, 16),
                        Desc::readable(buf, 512),
                        Desc::writable(far, 1),
                    ],
                );
                Status::None
            },
        },
        Hostile {
            name: "read at the capacity",
            post: |s| {
                let buf = s.guest.alloc(512);
                Status::Ioerr(hdr_data_status(
                    s,
                    blk::T_IN,
                    CAPACITY_SECTORS,
                    Desc::writable(buf, 512),
                ))
            },
        },
        Hostile {
            name: "write across the end of the disk",
            post: |s| {
                let buf = s.guest.put(&[0x99; 4096]);
                Status::Ioerr(hdr_data_status(
                    s,
                    blk::T_OUT,
                    CAPACITY_SECTORS - 1,
                    Desc::readable(buf, 4096),
                ))
            },
        },
        Hostile {
            name: "sector whose byte offset overflows 64 bits",
            post: |s| {
                let buf = s.guest.put(&[0x99; 512]);
                Status::Ioerr(hdr_data_status(
                    s,
                    blk::T_OUT,
                    u64::MAX / 256,
                    Desc::readable(buf, 512),
                ))
            },
        },
        Hostile {
            name: "offset + length overflows 64 bits",
            post: |s| {
                let buf = s.guest.alloc(4096);
                Status::Ioerr(hdr_data_status(
                    s,
                    blk::T_IN,
                    u64::MAX / 512,
                    Desc::writable(buf, 4096),
                ))
            },
        },
        Hostile {
            name: "data length not a multiple of the sector",
            post: |s| {
                let buf = s.guest.put(&[0x99; 700]);
                Status::Ioerr(hdr_data_status(s, blk::T_OUT, 0, Desc::readable(buf, 700)))
            },
        },
        Hostile {
            name: "total length overflowing 32 bits over many descriptors",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let status = s.guest.put(&[0xff]);
                let mut chain = vec![Desc::readable(hdr, 16)];
                // Eight descriptors of 2 GiB - 512 each, all over the same small region.
                let buf = s.guest.alloc(4096);
                chain.extend((0..8).map(|_| Desc::writable(buf, (1 << 31) - 512)));
                chain.push(Desc::writable(status, 1));
                s.add(0, &chain);
                Status::Ioerr(status)
            },
        },
        Hostile {
            name: "chain that loops",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let buf = s.guest.alloc(512);
                let status = s.guest.put(&[0xff]);
                let q = &mut s.queues[0];
                let mem = s.guest.mem();
                q.write_desc(mem, 200, hdr, 16, DESC_F_NEXT, 201);
                q.write_desc(mem, 201, buf, 512, DESC_F_WRITE | DESC_F_NEXT, 202);
                q.write_desc(mem, 202, status, 1, DESC_F_WRITE | DESC_F_NEXT, 200);
                q.publish(mem, 200);
                Status::NotOk(status)
            },
        },
        Hostile {
            name: "next index beyond the queue",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let status = s.guest.put(&[0xff]);
                let q = &mut s.queues[0];
                let mem = s.guest.mem();
                q.write_desc(mem, 210, status, 1, DESC_F_WRITE, 0);
                q.write_desc(mem, 211, hdr, 16, DESC_F_NEXT, 4000);
                q.publish(mem, 211);
                Status::None
            },
        },
        Hostile {
            name: "indirect chain longer than the queue",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let buf = s.guest.alloc(512);
                let status = s.guest.put(&[0xff]);
                let mut chain = vec![Desc::readable(hdr, 16)];
                chain.extend((0..300).map(|_| Desc::writable(buf, 512)));
                chain.push(Desc::writable(status, 1));
                s.add_indirect(0, &chain);
                Status::NotOk(status)
            },
        },
        Hostile {
            name: "indirect table that loops",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let status = s.guest.put(&[0xff]);
                let table = s.guest.alloc(32);
                // Entries 0 and 1 point at each other.
                write_raw(
                    s,
                    table,
                    &[
                        (hdr, 16, DESC_F_NEXT, 1),
                        (status, 1, DESC_F_WRITE | DESC_F_NEXT, 0),
                    ],
                );
                let d = Desc {
                    addr: table,
                    len: 32,
                    flags: DESC_F_INDIRECT,
                };
                s.add(0, &[d]);
                Status::NotOk(status)
            },
        },
        Hostile {
            name: "INDIRECT and NEXT on one descriptor",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let buf = s.guest.alloc(512);
                let status = s.guest.put(&[0xff]);
                let table = s.guest.alloc(48);
                write_raw(
                    s,
                    table,
                    &[
                        (hdr, 16, DESC_F_NEXT, 1),
                        (buf, 512, DESC_F_WRITE | DESC_F_NEXT, 2),
                        (status, 1, DESC_F_WRITE, 0),
                    ],
                );
                let status2 = s.guest.put(&[0xff]);
                let q = &mut s.queues[0];
                let mem = s.guest.mem();
                q.write_desc(mem, 220, table, 48, DESC_F_INDIRECT | DESC_F_NEXT, 221);
                q.write_desc(mem, 221, status2, 1, DESC_F_WRITE, 0);
                q.publish(mem, 220);
                Status::NotOk(status2)
            },
        },
        Hostile {
            name: "nested indirect table",
            post: |s| {
                let hdr = s.guest.put(&blk::header(blk::T_IN, 0));
                let status = s.guest.put(&[0xff]);
                let inner = s.guest.alloc(32);
                write_raw(
                    s,
                    inner,
                    &[(hdr, 16, DESC_F_NEXT, 1), (status, 1, DESC_F_WRITE, 0)],
                );
                let outer = s.guest.alloc(16);
                write_raw(s, outer, &[(inner, 32, DESC_F_INDIRECT, 0)]);
                let d = Desc {
                    addr: outer,
                    len: 16,
                    flags: DESC_F_INDIRECT,
                };
                s.add(0, &[d]);
                Status::None
            },
        },
        Hostile {
            name: "zero-length indirect table",
            post: |s| {
                let table = s.guest.alloc(16);
                let d = Desc {
                    addr: table,
                    len: 0,
                    flags: DESC_F_INDIRECT,
                };
                s.add(0, &[d]);
                Status::None
            },
        },
        Hostile {
            name: "indirect table outside guest memory",
            post: |s| {
                let d = Desc {
                    addr: s.guest.size() - 16,
                    len: 64,
                    flags: DESC_F_INDIRECT,
                };
                s.add(0, &[d]);
                Status::None
            },
        },
    ]
}

fn write_raw(s: &Session, at: u64, entries: &[(u64, u32, u16, u16)]) {
    for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
        let d = at + 16 * i as u64;
        s.guest.write_obj(d, addr);
        s.guest.write_obj(d + 8, len);
        s.guest.write_obj(d + 12, flags);
        s.guest.write_obj(d + 14, next);
    }
}

/// Every hostile chain gets IOERR (or, without a usable status byte, is returned unanswered)
/// or costs the frontend its connection; never OK, never a crash, never a write to the
/// image; and the next frontend is served.
#[test]
fn hostile_chains_never_succeed_and_the_daemon_keeps_serving() {
    hostile_chains(&["--io-engine", "sync"]);
}

#[test]
fn hostile_chains_with_direct_io_uring() {
    hostile_chains(&["--direct", "--io-engine", "uring"]);
}

fn hostile_chains(args: &[&str]) {
    let mut fx = serve(2 * MIB, |_| 0x11, args);
    let mut s = connect(&fx.socket, 1);
    let mut disconnects = 0;
    for (n, case) in hostile_cases().iter().enumerate() {
        let status = (case.post)(&mut s);
        match s.wait_or_disconnect(0, Duration::from_secs(10)) {
            Completion::Used(u) => match status {
                Status::Ioerr(at) => {
                    let got = s.guest.read(at, 1)[0];
                    assert_eq!(got, blk::S_IOERR, "{}: status byte", case.name);
                    assert_eq!(u.len, 1, "{}: used length is the status byte", case.name);
                }
                Status::NotOk(at) => {
                    let got = s.guest.read(at, 1)[0];
                    assert_ne!(got, blk::S_OK, "{}: status byte", case.name);
                    assert!(u.len <= 1, "{}: used length {}", case.name, u.len);
                }
                Status::None => assert!(u.len <= 1, "{}: used length {}", case.name, u.len),
            },
            Completion::Disconnected => {
                disconnects += 1;
                eprintln!("{}: the daemon dropped the connection", case.name);
            }
        }
        assert!(fx.daemon.alive(), "{}: the daemon died", case.name);
        // The same frontend if it is still connected, else a new one: it is served.
        if !s.is_connected() {
            s = connect(&fx.socket, 1);
        }
        let data = pattern(n as u8, 512);
        assert_eq!(
            s.blk_write(0, 64, &data),
            blk::S_OK,
            "{}: next request",
            case.name
        );
        assert_eq!(s.blk_read(0, 64, 512).data, data, "{}", case.name);
    }
    eprintln!("{disconnects} hostile case(s) ended in a disconnect");
    // Nothing but the good writes at sector 64 reached the image.
    let image = fs::read(&fx.image).expect("image");
    assert_eq!(image.len() as u64, 2 * MIB, "image size unchanged");
    let bad: Vec<usize> = image
        .iter()
        .enumerate()
        .filter(|&(i, &b)| !(64 * 512..65 * 512).contains(&i) && b != 0x11)
        .map(|(i, _)| i)
        .collect();
    assert!(
        bad.is_empty(),
        "{} bytes changed outside the good writes, from offset {:?}",
        bad.len(),
        bad.first()
    );
}

#[test]
fn a_new_frontend_is_served_after_each_disconnect() {
    let mut fx = serve(MIB, |_| 0, &[]);
    for round in 0..4u8 {
        let mut s = connect(&fx.socket, 1);
        if round > 0 {
            assert_eq!(
                s.blk_read(0, 0, 4096).data,
                pattern(round - 1, 4096),
                "round {round} reads what the previous frontend wrote"
            );
        }
        assert_eq!(s.blk_write(0, 0, &pattern(round, 4096)), blk::S_OK);
        // Leave a request in flight when going away, as a crashing VMM would.
        let hdr = s.guest.put(&blk::header(blk::T_OUT, 8));
        let buf = s.guest.put(&pattern(round, 4096));
        let st = s.guest.put(&[0xff]);
        s.add(
            0,
            &[
                Desc::readable(hdr, 16),
                Desc::readable(buf, 4096),
                Desc::writable(st, 1),
            ],
        );
        drop(s);
        assert!(fx.daemon.alive());
    }
    let mut s = connect(&fx.socket, 1);
    assert_eq!(s.blk_read(0, 0, 4096).data, pattern(3, 4096));
}

fn durability(args: &[&str]) {
    let mut fx = serve(8 * MIB, |_| 0, args);
    let mut s = connect(&fx.socket, 1);
    let data = pattern(0x5a, 256 << 10);
    for (i, chunk) in data.chunks(64 << 10).enumerate() {
        assert_eq!(s.blk_write(0, 1000 + i as u64 * 128, chunk), blk::S_OK);
    }
    assert_eq!(s.blk_flush(0), blk::S_OK);
    fx.daemon.kill9();
    assert_eq!(file_bytes(&fx.image, 1000 * 512, data.len()), data);
}

#[test]
fn flushed_writes_survive_kill_9() {
    durability(&[]);
}

#[test]
fn flushed_direct_io_uring_writes_survive_kill_9() {
    durability(&["--direct", "--io-engine", "uring"]);
}

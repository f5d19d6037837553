//! Guest-to-host console throughput: the mock frontend keeps the transmit queue full of 4 KiB
//! chains and a client on the host endpoint reads everything. Run through
//! `scripts/bench-console`, which also provides rust-vmm's vhost-device-console as the peer:
//!
//! ```text
//! cargo bench -p vhost-user-console --bench throughput -- [--peer PATH] [--mib N]
//! ```

#[path = "../tests/frontend/mod.rs"]
mod frontend;

use std::io::Read;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use frontend::{daemon_binary, spawn, Session};
use vm_memory::{Bytes, GuestAddress};

const CHUNK: usize = 4096;
const BATCH: usize = 64;

enum Client {
    Unix(PathBuf),
    Tcp(u16),
}

fn connect(client: &Client) -> Box<dyn Read + Send> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r: std::io::Result<Box<dyn Read + Send>> = match client {
            Client::Unix(p) => UnixStream::connect(p).map(|s| Box::new(s) as _),
            Client::Tcp(port) => TcpStream::connect(("127.0.0.1", *port)).map(|s| Box::new(s) as _),
        };
        match r {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot attach a client: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn connect_frontend(socket: &Path, queues: usize) -> Session {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // 128 entries: the most vhost-device-console accepts, used for every daemon alike.
        match std::panic::catch_unwind(|| Session::connect_sized(socket, 0, queues, 128)) {
            Ok(s) => return s,
            Err(_) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Push `total` bytes through queue 1 and return MB/s as seen by the client.
fn measure(socket: &Path, queues: usize, client: &Client, total: usize) -> f64 {
    let mut reader = connect(client);
    let mut fe = connect_frontend(socket, queues);
    // Warm-up: the client is attached and served once this marker arrives.
    fe.send(1, b"ready\n");
    let mut marker = [0u8; 6];
    reader.read_exact(&mut marker).expect("marker");
    assert_eq!(&marker, b"ready\n");

    let consumer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 18];
        let mut got = 0usize;
        while got < total {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("client read: {e}"),
            }
        }
        (got, Instant::now())
    });

    // One 4 KiB buffer per descriptor, filled once with printable text (the peer insists on
    // UTF-8).
    let size = fe.queues[1].size;
    let line: Vec<u8> = (0..CHUNK)
        .map(|i| {
            if i % 64 == 63 {
                b'\n'
            } else {
                b'a' + (i % 26) as u8
            }
        })
        .collect();
    let bufs: Vec<u64> = (0..size)
        .map(|_| {
            let a = fe.guest.alloc(CHUNK);
            fe.guest.mem.write_slice(&line, GuestAddress(a)).unwrap();
            a
        })
        .collect();
    let mut free: Vec<u16> = (0..size).rev().collect();
    let start = Instant::now();
    let mut posted = 0usize;
    while posted < total {
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH && posted < total {
            let Some(head) = free.pop() else { break };
            batch.push((head, bufs[usize::from(head)], CHUNK as u32));
            posted += CHUNK;
        }
        if !batch.is_empty() {
            fe.queues[1].publish_batch(&fe.guest, &batch);
        }
        if free.len() < BATCH {
            loop {
                let used = fe.queues[1].take_used(&fe.guest);
                if !used.is_empty() {
                    free.extend(used.into_iter().map(|(h, _)| h));
                    break;
                }
                fe.queues[1].wait_call(Duration::from_millis(100));
            }
        }
    }
    let (got, end) = consumer.join().expect("consumer");
    assert!(got >= total, "client got {got} of {total} bytes");
    total as f64 / end.duration_since(start).as_secs_f64() / 1e6
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn main() {
    let mut peer: Option<PathBuf> = None;
    let mut mib = 256usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--peer" => peer = args.next().map(PathBuf::from),
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).unwrap_or(mib),
            _ => {} // cargo bench passes --bench
        }
    }
    let total = mib << 20;
    let dir = tempfile::tempdir().unwrap();
    println!("guest->host console throughput: {mib} MiB in {CHUNK}-byte chains, client reading on the host");

    let ours_socket = {
        let sock = dir.path().join("ours.sock");
        let con = dir.path().join("con.sock");
        let _d = spawn(
            Command::new(daemon_binary())
                .arg("--socket")
                .arg(&sock)
                .arg("--backend")
                .arg(format!("socket={}", con.display()))
                .env("RUST_LOG", "warn"),
            &sock,
        );
        measure(&sock, 2, &Client::Unix(con), total)
    };
    println!("  vhost-user-console   socket backend: {ours_socket:8.1} MB/s");

    let ours_tcp = {
        let sock = dir.path().join("ours-tcp.sock");
        let port = free_port();
        let _d = spawn(
            Command::new(daemon_binary())
                .arg("--socket")
                .arg(&sock)
                .arg("--backend")
                .arg(format!("tcp={port}"))
                .env("RUST_LOG", "warn"),
            &sock,
        );
        measure(&sock, 2, &Client::Tcp(port), total)
    };
    println!("  vhost-user-console   tcp backend:    {ours_tcp:8.1} MB/s");

    let Some(peer) = peer else {
        println!("  (no --peer given: vhost-device-console not measured)");
        return;
    };
    let peer_rate = {
        let sock = dir.path().join("peer.sock");
        let port = free_port();
        // vhost-device-console appends the socket index to the path.
        let served = dir.path().join("peer.sock0");
        let _d = spawn(
            Command::new(&peer)
                .arg("--socket-path")
                .arg(&sock)
                .arg("--backend")
                .arg("network")
                .arg("--tcp-port")
                .arg(port.to_string()),
            &served,
        );
        measure(&served, 4, &Client::Tcp(port), total)
    };
    println!("  vhost-device-console tcp (network):  {peer_rate:8.1} MB/s");
    println!(
        "ratio vs vhost-device-console: socket {:.1}x, tcp {:.1}x (goal >= 2x)",
        ours_socket / peer_rate,
        ours_tcp / peer_rate
    );
}

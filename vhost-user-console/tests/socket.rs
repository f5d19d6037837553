//! The console daemon driven over its vhost-user socket by a mock frontend, with real clients
//! on its socket, TCP and pty endpoints.

mod frontend;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use frontend::{
    daemon_binary, Buf, Daemon, Session, DESC_NEXT, DESC_WRITE, F_EMERG_WRITE, F_MULTIPORT, F_SIZE,
};

struct Setup {
    dir: tempfile::TempDir,
    daemon: Daemon,
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn socket(&self) -> PathBuf {
        self.path("vhost.sock")
    }
}

/// Start the daemon with `args`; `{}` in an argument stands for the test's directory.
fn start(args: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let socket = dir.path().join("vhost.sock");
    let mut full: Vec<String> = vec!["--socket".into(), socket.to_str().unwrap().into()];
    full.extend(args.iter().map(|a| a.replace("{}", &d)));
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    let daemon = Daemon::start(&daemon_binary(), &refs, &socket);
    Setup { dir, daemon }
}

fn attach(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "cannot attach to {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_n(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("client read");
    v
}

/// Wait until `path` holds exactly `want`.
fn wait_file(path: &Path, want: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = std::fs::read(path).unwrap_or_default();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {:?}, want {:?}",
            path.display(),
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn guest_output_reaches_socket_client_and_log() {
    let s = start(&["--backend", "socket={}/con.sock", "--log", "{}/con.log"]);
    let mut client = attach(&s.path("con.sock"));
    let mut fe = Session::connect(&s.socket(), 0, 2);
    fe.send(1, b"Linux version 6.1\r\n");
    fe.send(1, b"login: ");
    assert_eq!(read_n(&mut client, 26), b"Linux version 6.1\r\nlogin: ");
    wait_file(&s.path("con.log"), b"Linux version 6.1\r\nlogin: ");
}

#[test]
fn late_and_returning_clients_get_the_recent_output() {
    let s = start(&["--backend", "socket={}/con.sock", "--history", "16"]);
    let mut fe = Session::connect(&s.socket(), 0, 2);
    fe.send(1, b"early boot messages\n");
    // Attached after the output: the last 16 bytes are replayed.
    let mut client = attach(&s.path("con.sock"));
    assert_eq!(read_n(&mut client, 16), b"y boot messages\n");
    drop(client);
    // While detached the guest keeps writing, never blocked.
    fe.send(1, b"more\n");
    fe.send(1, b"login: ");
    let mut again = attach(&s.path("con.sock"));
    let all = b"early boot messages\nmore\nlogin: ";
    assert_eq!(read_n(&mut again, 16), &all[all.len() - 16..]);
    fe.send(1, b"x");
    assert_eq!(read_n(&mut again, 1), b"x");
}

#[test]
fn host_input_reaches_the_guest_in_order() {
    let s = start(&["--backend", "socket={}/con.sock"]);
    let mut client = attach(&s.path("con.sock"));
    let mut fe = Session::connect(&s.socket(), 0, 2);
    // Typed before the guest posted any buffer: it waits, it is not dropped.
    client.write_all(b"root\n").unwrap();
    client.write_all(b"uname -a\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut posted = fe.post_rx(0, 8, 4);
    let got = fe.receive(0, &mut posted, 14);
    assert_eq!(got, b"root\nuname -a\n");
}

#[test]
fn a_flood_of_input_is_held_back_not_dropped() {
    let s = start(&["--backend", "socket={}/con.sock"]);
    let client = attach(&s.path("con.sock"));
    let mut fe = Session::connect(&s.socket(), 0, 2);
    // Far more than the daemon buffers: the writer is held by the socket, nothing is lost.
    let data: Vec<u8> = (0..600_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let writer = {
        let mut c = client.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || c.write_all(&data).unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut got = Vec::new();
    while got.len() < data.len() {
        // A round of 64 buffers, refilled once every one of them came back.
        fe.guest.reset_data();
        let mut posted = fe.post_rx(0, 64, 4096);
        while !posted.is_empty() && got.len() < data.len() {
            let want = got.len() + 1;
            let more = fe.receive(0, &mut posted, 1);
            got.extend(more);
            assert!(got.len() >= want);
        }
        if got.len() >= data.len() {
            break;
        }
    }
    writer.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "input arrived reordered or corrupted");
}

fn control(id: u32, event: u16, value: u16) -> Vec<u8> {
    let mut v = id.to_le_bytes().to_vec();
    v.extend_from_slice(&event.to_le_bytes());
    v.extend_from_slice(&value.to_le_bytes());
    v
}

/// Read control messages until `n` arrived.
fn control_messages(fe: &mut Session, posted: &mut Vec<(u16, u64)>, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while out.len() < n {
        for (head, len) in fe.queues[2].wait_used(&fe.guest, 1) {
            let pos = posted.iter().position(|(h, _)| *h == head).unwrap();
            let (_, addr) = posted.remove(pos);
            out.push(fe.read(addr, len as usize));
        }
    }
    out
}

#[test]
fn multiport_handshake_names_ports_and_carries_their_data() {
    let s = start(&[
        "--backend",
        "socket={}/con.sock",
        "--size",
        "100x30",
        "--port",
        "name=org.qemu.guest_agent.0,backend=socket={}/qga.sock,log={}/qga.log",
    ]);
    let mut fe = Session::connect(&s.socket(), F_MULTIPORT | F_SIZE, 6);
    assert_ne!(fe.features & F_MULTIPORT, 0, "multiport offered");
    let config = fe.config(0, 12);
    assert_eq!(&config[0..4], &[100, 0, 30, 0], "cols, rows");
    assert_eq!(&config[4..8], &2u32.to_le_bytes(), "max_nr_ports");

    let mut posted = fe.post_rx(2, 16, 64);
    fe.send(3, &control(0, 0, 1)); // DEVICE_READY
    let adds = control_messages(&mut fe, &mut posted, 2);
    assert_eq!(adds, vec![control(0, 1, 1), control(1, 1, 1)]);

    fe.send(3, &control(0, 3, 1)); // PORT_READY 0
    let mut resize = control(0, 5, 0); // cols, rows
    resize.extend_from_slice(&100u16.to_le_bytes());
    resize.extend_from_slice(&30u16.to_le_bytes());
    assert_eq!(
        control_messages(&mut fe, &mut posted, 3),
        vec![control(0, 4, 1), resize, control(0, 6, 1)]
    );
    fe.send(3, &control(1, 3, 1)); // PORT_READY 1
    let mut name = control(1, 7, 1);
    name.extend_from_slice(b"org.qemu.guest_agent.0");
    assert_eq!(
        control_messages(&mut fe, &mut posted, 2),
        vec![name, control(1, 6, 1)]
    );

    // Port 1 is queues 4 (receive) and 5 (transmit).
    let mut agent = attach(&s.path("qga.sock"));
    fe.send(5, b"{\"return\": {}}\n");
    assert_eq!(read_n(&mut agent, 15), b"{\"return\": {}}\n");
    wait_file(&s.path("qga.log"), b"{\"return\": {}}\n");

    // Input for a generic port waits until the guest opened it.
    agent.write_all(b"{\"execute\":\"guest-ping\"}\n").unwrap();
    let mut rx = fe.post_rx(4, 4, 64);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        fe.queues[4].take_used(&fe.guest).is_empty(),
        "input before PORT_OPEN"
    );
    fe.send(3, &control(1, 6, 1)); // PORT_OPEN 1
    assert_eq!(
        fe.receive(4, &mut rx, 25),
        b"{\"execute\":\"guest-ping\"}\n"
    );
}

#[test]
fn pty_resize_reaches_a_multiport_guest() {
    let s = start(&["--backend", "pty", "--port", "name=p1,backend=null"]);
    // The daemon prints the pty's path on stderr; the test finds it among its descriptors.
    let mut fe = Session::connect(&s.socket(), F_MULTIPORT | F_SIZE, 6);
    assert_ne!(fe.features & F_SIZE, 0, "size offered for a pty");
    let mut posted = fe.post_rx(2, 16, 64);
    fe.send(3, &control(0, 0, 1));
    control_messages(&mut fe, &mut posted, 2);
    fe.send(3, &control(0, 3, 1));
    // CONSOLE_PORT, PORT_OPEN (a fresh pty has no size yet).
    let first = control_messages(&mut fe, &mut posted, 2);
    assert_eq!(first, vec![control(0, 4, 1), control(0, 6, 1)]);

    let user = open_pty(&s);
    set_window_size(&user, 160, 50);
    let mut resize = control(0, 5, 0); // cols, rows
    resize.extend_from_slice(&160u16.to_le_bytes());
    resize.extend_from_slice(&50u16.to_le_bytes());
    assert_eq!(control_messages(&mut fe, &mut posted, 1), vec![resize]);
    assert_eq!(&fe.config(0, 4), &[160, 0, 50, 0]);

    // And the pty carries the console.
    assert_pty_gets(&mut fe, &user, b"hello pty\n");
}

#[test]
fn pty_resize_notifies_a_single_port_guest_through_the_backend_channel() {
    let s = start(&["--backend", "pty"]);
    let mut fe = Session::connect(&s.socket(), F_SIZE, 2);
    assert_ne!(fe.features & F_SIZE, 0, "size offered for a pty");
    let mut requests = fe.backend_requests();
    let user = open_pty(&s);

    set_window_size(&user, 160, 50);
    requests.wait_config_changes(1);
    assert_eq!(&fe.config(0, 4), &[160, 0, 50, 0]);
    set_window_size(&user, 80, 24);
    requests.wait_config_changes(2);
    assert_eq!(&fe.config(0, 4), &[80, 0, 24, 0]);
    // One notification per change: a further tick of the unchanged pty sends none.
    requests.serve_for(Duration::from_millis(1500));
    assert_eq!(requests.config_changes(), 2);
    assert_pty_gets(&mut fe, &user, b"hello pty\n");
}

#[test]
fn a_frontend_that_never_answers_its_backend_channel_cannot_stall_the_console() {
    let s = start(&["--backend", "pty"]);
    let mut fe = Session::connect(&s.socket(), F_SIZE, 2);
    // Set up, never served: the daemon's request waits for an ack that never comes.
    let _silent = fe.backend_requests();
    let user = open_pty(&s);
    set_window_size(&user, 100, 40);
    wait_config_size(&mut fe, 100, 40);
    // The guest's output still flows (Session::send gives the daemon 20 s).
    assert_pty_gets(&mut fe, &user, b"still here\n");
    // And a later resize still updates the config space.
    set_window_size(&user, 90, 30);
    wait_config_size(&mut fe, 90, 30);
}

/// Wait until the config space reports `cols` x `rows`.
fn wait_config_size(fe: &mut Session, cols: u16, rows: u16) {
    let mut want = cols.to_le_bytes().to_vec();
    want.extend_from_slice(&rows.to_le_bytes());
    let deadline = Instant::now() + Duration::from_secs(20);
    while fe.config(0, 4) != want {
        assert!(Instant::now() < deadline, "size never became {cols}x{rows}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Guest output `text` on the console reaches the pty's user.
fn assert_pty_gets(fe: &mut Session, user: &std::fs::File, text: &[u8]) {
    fe.send(1, text);
    let mut u = user.try_clone().unwrap();
    assert_eq!(read_n(&mut u, text.len()), text);
}

/// The user's side of the daemon's pty, opened read-write.
fn open_pty(s: &Setup) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(pty_of(s.daemon.child.id()))
        .unwrap()
}

/// Resize the pty as a user's terminal does.
fn set_window_size(user: &std::fs::File, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(user);
    // SAFETY: TIOCSWINSZ reads one winsize from the local struct.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0);
}

/// The pty a daemon process holds open (its only /dev/pts descriptor).
fn pty_of(pid: u32) -> PathBuf {
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        if let Ok(target) = std::fs::read_link(e.unwrap().path()) {
            if target.starts_with("/dev/pts/") {
                return target;
            }
        }
    }
    panic!("daemon holds no pty");
}

#[test]
fn emergency_write_reaches_the_console() {
    let s = start(&["--backend", "socket={}/con.sock"]);
    let mut client = attach(&s.path("con.sock"));
    let mut fe = Session::connect(&s.socket(), F_EMERG_WRITE, 2);
    assert_ne!(fe.features & F_EMERG_WRITE, 0);
    fe.write_config(8, &u32::from(b'!').to_le_bytes()).unwrap();
    assert_eq!(read_n(&mut client, 1), b"!");
}

#[test]
fn hostile_chains_are_returned_and_the_device_keeps_working() {
    let s = start(&["--backend", "socket={}/con.sock", "--log", "{}/con.log"]);
    let mut client = attach(&s.path("con.sock"));
    let mut fe = Session::connect(&s.socket(), 0, 2);
    let g = &mut fe.guest;
    let tx = &mut fe.queues[1];

    // A device-writable buffer on the transmit queue.
    let a = g.alloc(16);
    let h1 = tx.add(
        g,
        &[Buf {
            addr: a,
            len: 16,
            writable: true,
        }],
    );
    // A buffer beyond guest memory.
    let h2 = tx.add(
        g,
        &[Buf {
            addr: (frontend::MEM_SIZE as u64) - 8,
            len: 64,
            writable: false,
        }],
    );
    // A chain that loops on itself.
    tx.write_desc(g, 10, a, 4, DESC_NEXT, 10);
    tx.publish(g, 10);
    // A next index beyond the table.
    tx.write_desc(g, 11, a, 4, DESC_NEXT, 5000);
    tx.publish(g, 11);
    // A head index beyond the table.
    tx.publish(g, 9999);
    // An enormous length.
    tx.write_desc(g, 12, a, u32::MAX, 0, 0);
    tx.publish(g, 12);
    let used = tx.wait_used(g, 5);
    for (head, len) in &used {
        assert_eq!(*len, 0, "chain {head} returned with data length");
    }
    let heads: Vec<u16> = used.iter().map(|u| u.0).collect();
    for h in [h1, h2, 10, 11, 12] {
        assert!(heads.contains(&h), "chain {h} not returned: {heads:?}");
    }

    // A device-readable buffer on the receive queue and a short control message.
    let rx = &mut fe.queues[0];
    let b = fe.guest.alloc(8);
    rx.add(
        &fe.guest,
        &[Buf {
            addr: b,
            len: 8,
            writable: false,
        }],
    );
    client.write_all(b"k").unwrap();
    let used = fe.queues[0].wait_used(&fe.guest, 1);
    assert_eq!(used[0].1, 0);

    // Nothing of that reached the client or the log, and good traffic still flows both ways.
    fe.send(1, b"still alive\n");
    assert_eq!(read_n(&mut client, 12), b"still alive\n");
    wait_file(&s.path("con.log"), b"still alive\n");
    let mut posted = fe.post_rx(0, 1, 8);
    assert_eq!(fe.receive(0, &mut posted, 1), b"k");
    let _ = DESC_WRITE;
}

#[test]
fn hostile_control_messages_get_no_answer_and_break_nothing() {
    let s = start(&["--backend", "null", "--port", "name=a,backend=null"]);
    let mut fe = Session::connect(&s.socket(), F_MULTIPORT, 6);
    let mut posted = fe.post_rx(2, 8, 64);
    fe.send(3, &[1, 2, 3]); // too short
    fe.send(3, &control(77, 3, 1)); // PORT_READY for a port that does not exist
    fe.send(3, &control(0, 1, 1)); // DEVICE_ADD is the device's message, not the driver's
    fe.send(3, &control(0, 999, 0)); // unknown event
    fe.send(3, &control(0, 0, 1)); // and then a proper DEVICE_READY
    let adds = control_messages(&mut fe, &mut posted, 2);
    assert_eq!(adds, vec![control(0, 1, 1), control(1, 1, 1)]);
}

#[test]
fn clients_and_input_survive_a_frontend_reconnect() {
    let s = start(&["--backend", "socket={}/con.sock"]);
    let mut client = attach(&s.path("con.sock"));
    {
        let mut fe = Session::connect(&s.socket(), 0, 2);
        fe.send(1, b"first boot\n");
        assert_eq!(read_n(&mut client, 11), b"first boot\n");
    }
    // No frontend now: typed input waits for the next one.
    client.write_all(b"typed while away\n").unwrap();
    let mut fe = Session::connect(&s.socket(), 0, 2);
    let mut posted = fe.post_rx(0, 4, 64);
    assert_eq!(fe.receive(0, &mut posted, 17), b"typed while away\n");
    fe.send(1, b"second session\n");
    assert_eq!(read_n(&mut client, 15), b"second session\n");
}

#[test]
fn tcp_backend_listens_on_loopback() {
    let port = free_tcp_port();
    let s = start(&["--backend", &format!("tcp={port}")]);
    let mut fe = Session::connect(&s.socket(), 0, 2);
    fe.send(1, b"over tcp\n");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(read_n(&mut c, 9), b"over tcp\n");
    c.write_all(b"ls\n").unwrap();
    let mut posted = fe.post_rx(0, 2, 64);
    assert_eq!(fe.receive(0, &mut posted, 3), b"ls\n");
}

#[test]
fn telnet_client_sets_the_console_size_and_keeps_0xff_intact() {
    let port = free_tcp_port();
    let s = start(&["--backend", &format!("telnet={port}")]);
    let mut fe = Session::connect(&s.socket(), F_SIZE, 2);
    assert_ne!(fe.features & F_SIZE, 0, "size offered for telnet clients");
    let mut requests = fe.backend_requests();
    fe.send(1, b"boot \xff log\n");
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // WILL ECHO, WILL SUPPRESS-GO-AHEAD, DO NAWS; then the history, 0xFF doubled.
    assert_eq!(read_n(&mut c, 9), [255, 251, 1, 255, 251, 3, 255, 253, 31]);
    assert_eq!(read_n(&mut c, 12), b"boot \xff\xff log\n");

    // What `telnet` sends: agreement, then its window size.
    c.write_all(&[255, 251, 31, 255, 250, 31, 0, 132, 0, 43, 255, 240])
        .unwrap();
    requests.wait_config_changes(1);
    assert_eq!(&fe.config(0, 4), &[132, 0, 43, 0]);
    // A resize of the client's window.
    c.write_all(&[255, 250, 31, 0, 100, 0, 30, 255, 240])
        .unwrap();
    requests.wait_config_changes(2);
    assert_eq!(&fe.config(0, 4), &[100, 0, 30, 0]);

    // Typed bytes reach the guest as typed: Enter (CR NUL) is CR, IAC IAC is 0xFF.
    c.write_all(b"ls\r\0\xff\xff").unwrap();
    let mut posted = fe.post_rx(0, 2, 64);
    assert_eq!(fe.receive(0, &mut posted, 4), b"ls\r\xff");
    // An option the console does not do is refused.
    c.write_all(&[255, 251, 24]).unwrap();
    assert_eq!(read_n(&mut c, 3), [255, 254, 24]);
    assert_eq!(requests.config_changes(), 2);
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The daemon with the stdio backend and `stdin`, and a frontend connected to it.
fn start_stdio(stdin: std::process::Stdio) -> (tempfile::TempDir, Daemon, Session) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vhost.sock");
    let d = Daemon::start_with(
        &daemon_binary(),
        &["--socket", socket.to_str().unwrap(), "--backend", "stdio"],
        &socket,
        stdin,
    );
    let fe = Session::connect(&socket, 0, 2);
    (dir, d, fe)
}

#[test]
fn stdio_backend_works_without_a_terminal() {
    let (_dir, mut d, mut fe) = start_stdio(std::process::Stdio::null());
    fe.send(1, b"to stdout\n");
    let mut out = d.child.stdout.take().unwrap();
    assert_eq!(read_n(&mut out, 10), b"to stdout\n");
}

#[test]
fn a_client_that_stops_reading_cannot_hold_the_guest_for_long() {
    let s = start(&["--backend", "socket={}/con.sock", "--history", "1024"]);
    let stuck = attach(&s.path("con.sock"));
    let mut fe = Session::connect(&s.socket(), 0, 2);
    // Much more than the client's socket and its allowance in the daemon hold.
    let chunk = vec![b'x'; 32 * 1024];
    for _ in 0..128 {
        fe.queues[1].send(&mut fe.guest, &chunk);
    }
    // The daemon waits a few seconds for the client, then detaches it and takes the rest.
    fe.queues[1].wait_used(&fe.guest, 128);
    fe.send(1, b"\nlast line\n");
    let mut late = attach(&s.path("con.sock"));
    let replay = read_n(&mut late, 1024);
    assert!(replay.ends_with(b"xx\nlast line\n"));
    drop(stuck);
}

#[test]
fn stdio_backend_takes_piped_input_without_stalling() {
    let (_dir, mut d, mut fe) = start_stdio(std::process::Stdio::piped());
    let mut stdin = d.child.stdin.take().unwrap();
    stdin.write_all(b"echo hi\n").unwrap();
    let mut posted = fe.post_rx(0, 2, 64);
    assert_eq!(fe.receive(0, &mut posted, 8), b"echo hi\n");
    // The worker is not sitting in a read of the (blocking) stdin: output still flows.
    fe.send(1, b"hi\n");
    let mut out = d.child.stdout.take().unwrap();
    assert_eq!(read_n(&mut out, 3), b"hi\n");
    drop(stdin);
}

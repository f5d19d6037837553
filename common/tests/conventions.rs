//! The command-line and lifecycle conventions every daemon gets from `common`, checked on the
//! real binaries: capabilities JSON, bad start-up input, relisten, client mode, `--fd`, systemd
//! socket activation, `--once`, SIGTERM, and QEMU 10's early SET_VRING_ENABLE.
//!
//! The daemons are found in this test's own profile directory (`target/<profile>/`): build
//! them first (`cargo build --workspace --bins`, as scripts/test does).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vhost_user_test::binary;

const DAEMONS: [(&str, &str); 4] = [
    ("vhost-user-block", "block"),
    ("vhost-user-net", "net"),
    ("vhost-user-fs", "fs"),
    ("vhost-user-console", "console"),
];

fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    p
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("daemon did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// One vhost-user request/reply with no descriptors, raw on the wire.
fn request(sock: &mut UnixStream, code: u32, flags: u32, payload: &[u8]) -> Option<(u32, Vec<u8>)> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&(0x1 | flags).to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    sock.write_all(&msg).ok()?;
    let mut hdr = [0u8; 12];
    sock.read_exact(&mut hdr).ok()?;
    let size = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]) as usize;
    let mut body = vec![0u8; size];
    sock.read_exact(&mut body).ok()?;
    Some((u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]), body))
}

const GET_FEATURES: u32 = 1;
const SET_VRING_ENABLE: u32 = 18;
const NEED_REPLY: u32 = 0x8;

fn features(sock: &mut UnixStream) -> u64 {
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (code, body) = request(sock, GET_FEATURES, 0, &[]).expect("GET_FEATURES reply");
    assert_eq!(code, GET_FEATURES);
    u64::from_le_bytes(body[..8].try_into().unwrap())
}

fn run(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin).args(args).output().unwrap()
}

#[test]
fn every_daemon_prints_spec_capabilities_and_version() {
    for (name, kind) in DAEMONS {
        let out = run(&binary(name), &["--print-capabilities"]);
        assert!(out.status.success(), "{name} --print-capabilities failed");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{name} printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        assert_eq!(json["type"], kind, "{name}");
        assert!(json["features"].is_array(), "{name}");
        let out = run(&binary(name), &["--version"]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains(name));
    }
}

#[test]
fn every_daemon_describes_itself_in_help() {
    for (name, kind) in DAEMONS {
        let out = run(&binary(name), &["--help"]);
        assert!(out.status.success(), "{name}");
        let help = String::from_utf8_lossy(&out.stdout);
        let first = help.lines().next().unwrap_or_default();
        let device = format!("virtio-{}", if kind == "block" { "blk" } else { kind });
        assert!(
            first.contains(&device),
            "{name} --help starts with {first:?}, not its own description"
        );
        assert!(help.contains("--socket"), "{name}");
    }
}

#[test]
fn every_daemon_rejects_unknown_options() {
    for (name, _) in DAEMONS {
        let out = run(&binary(name), &["--bogus-option"]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--bogus-option"),
            "{name}"
        );
    }
}

#[test]
fn bad_startup_input_gets_a_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let bin = binary("vhost-user-block");
    let sock = dir.path().join("s.sock");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--socket".into(),
                sock.display().to_string(),
                "--path".into(),
                "/nonexistent/disk.img".into(),
            ],
            "/nonexistent/disk.img",
        ),
        (
            vec![
                "--socket".into(),
                "/nonexistent-dir/s.sock".into(),
                "--path".into(),
                img.display().to_string(),
            ],
            "does not exist",
        ),
        (
            vec![
                "--socket".into(),
                sock.display().to_string(),
                "--path".into(),
                img.display().to_string(),
                "--num-queues".into(),
                "0".into(),
            ],
            "--num-queues",
        ),
        (vec!["--path".into(), img.display().to_string()], "--socket"),
        (
            vec![
                "--fd".into(),
                "0".into(),
                "--path".into(),
                img.display().to_string(),
            ],
            "not a listening",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(&bin)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn serves_again_after_disconnect_refuses_second_daemon_and_cleans_up_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let bin = binary("vhost-user-block");
    let mut child = Command::new(&bin)
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--path",
            img.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("socket", || UnixStream::connect(&sock).is_ok());
    for _ in 0..3 {
        let mut s = UnixStream::connect(&sock).unwrap();
        assert_ne!(features(&mut s) & (1 << 32), 0, "VERSION_1 offered");
    }
    // A second daemon on the same live socket must refuse, not steal it.
    let out = run(
        &bin,
        &[
            "--socket",
            sock.to_str().unwrap(),
            "--path",
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already served"));
    let mut s = UnixStream::connect(&sock).unwrap();
    features(&mut s);
    drop(s);

    sigterm(&child);
    assert!(wait_exit(&mut child).success(), "SIGTERM exits 0");
    assert!(!sock.exists(), "socket file removed on exit");
}

#[test]
fn early_set_vring_enable_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let mut child = Command::new(binary("vhost-user-block"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--path",
            img.to_str().unwrap(),
            "--once",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("socket", || sock.exists());
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // What QEMU 10 does at device reset: disable rings before any SET_FEATURES.
    let mut state = 0u32.to_le_bytes().to_vec();
    state.extend_from_slice(&0u32.to_le_bytes());
    let (code, body) = request(&mut s, SET_VRING_ENABLE, NEED_REPLY, &state).expect("ack");
    assert_eq!(code, SET_VRING_ENABLE);
    assert_eq!(body, 0u64.to_le_bytes(), "success ack");
    // The session is still alive.
    features(&mut s);
    drop(s);
    // --once: the daemon exits after its single session.
    assert!(wait_exit(&mut child).success());
}

#[test]
fn client_mode_waits_for_the_frontend_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("front.sock");
    let mut child = Command::new(binary("vhost-user-block"))
        .args([
            "--client",
            "--socket",
            sock.to_str().unwrap(),
            "--path",
            img.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The frontend appears only after the daemon started.
    std::thread::sleep(Duration::from_millis(200));
    let listener = UnixListener::bind(&sock).unwrap();
    for _ in 0..2 {
        let (mut s, _) = listener.accept().unwrap();
        features(&mut s);
        drop(s);
    }
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
    assert!(sock.exists(), "the frontend's socket is not ours to remove");
}

#[test]
fn inherited_fd_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("inherited.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(binary("vhost-user-block"));
    cmd.args(["--fd", "7", "--path", img.to_str().unwrap()])
        .stderr(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let mut s = UnixStream::connect(&sock).unwrap();
    features(&mut s);
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
}

#[test]
fn systemd_socket_activation() {
    let Ok(activate) = which("systemd-socket-activate") else {
        eprintln!("skipped: systemd-socket-activate not installed (apt-get install systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("activated.sock");
    let mut child = Command::new(activate)
        .arg("-l")
        .arg(&sock)
        .arg(binary("vhost-user-block"))
        .args(["--path", img.to_str().unwrap()])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("activation socket", || sock.exists());
    let mut s = UnixStream::connect(&sock).unwrap();
    assert_ne!(features(&mut s) & (1 << 32), 0);
    drop(s);
    let mut s = UnixStream::connect(&sock).unwrap();
    features(&mut s);
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.exists())
        })
        .ok_or(())
}

/// Malformed vhost-user messages end at worst the session that sent them: the daemon answers
/// the next frontend as if nothing happened.
#[test]
fn hostile_frontend_messages_never_take_the_daemon_down() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let sock = dir.path().join("blk.sock");
    let log = dir.path().join("daemon.log");
    let mut child = Command::new(binary("vhost-user-block"))
        .args([
            "--socket",
            sock.to_str().unwrap(),
            "--path",
            img.to_str().unwrap(),
            "--num-queues",
            "2",
        ])
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    wait_for("socket", || UnixStream::connect(&sock).is_ok());

    let msg = |code: u32, flags: u32, size: u32, payload: &[u8]| {
        let mut m = Vec::new();
        m.extend_from_slice(&code.to_le_bytes());
        m.extend_from_slice(&flags.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(payload);
        m
    };
    let vring_state = |index: u32, num: u32| {
        let mut v = index.to_le_bytes().to_vec();
        v.extend_from_slice(&num.to_le_bytes());
        v
    };
    let set_owner = msg(3, 1, 0, &[]);
    let cases: Vec<Vec<Vec<u8>>> = vec![
        vec![msg(0xdead, 1, 0, &[])],               // unknown request
        vec![msg(1, 1, 0x10_0000, &[])],            // absurd payload size
        vec![msg(2, 1, 8, &[1, 2, 3])],             // truncated payload
        vec![msg(2, 1, 4, &[0, 0, 0, 0])],          // SET_FEATURES too short
        vec![set_owner.clone(), set_owner.clone()], // SET_OWNER twice
        vec![set_owner.clone(), msg(8, 1, 8, &vring_state(0, 0))], // SET_VRING_NUM 0
        vec![set_owner.clone(), msg(8, 1, 8, &vring_state(0, 65535))], // SET_VRING_NUM too large
        vec![set_owner.clone(), msg(8, 1, 8, &vring_state(99, 256))], // queue index out of range
        vec![set_owner.clone(), msg(5, 1, 8, &[0u8; 8])], // SET_MEM_TABLE, no regions/fds
        vec![set_owner.clone(), msg(9, 1, 40, &[0xffu8; 40])], // SET_VRING_ADDR garbage
        vec![set_owner.clone(), msg(11, 1, 8, &vring_state(1, 0))], // GET_VRING_BASE on a dead ring
        vec![set_owner.clone(), msg(12, 1, 8, &0x1ffu64.to_le_bytes())], // SET_VRING_KICK index, no fd
        vec![msg(24, 1, 12, &[0xffu8; 12])],                             // GET_CONFIG, bogus size
        vec![msg(16, 1, 8, &u64::MAX.to_le_bytes())], // SET_PROTOCOL_FEATURES all ones
        vec![(0..200u32)
            .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
            .collect()], // noise
    ];
    for (i, case) in cases.iter().enumerate() {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        for m in case {
            let _ = s.write_all(m);
        }
        // Whatever the daemon answers (or whether it hangs up), it must serve the next frontend.
        let mut sink = [0u8; 256];
        let _ = s.read(&mut sink);
        drop(s);
        let mut next =
            UnixStream::connect(&sock).unwrap_or_else(|e| panic!("case {i}: daemon gone: {e}"));
        features(&mut next);
        assert!(
            child.try_wait().unwrap().is_none(),
            "case {i}: daemon exited"
        );
    }
    sigterm(&child);
    assert!(wait_exit(&mut child).success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("panicked"), "daemon panicked:\n{log}");
}

//! The control API of a `vmm --api-socket` process, over its socket: what an orchestrator
//! sees. Requests that need no guest run everywhere; the life cycle of a tiny guest that
//! counts on the serial port runs on /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmm::api::client::{request, Reply};
use vmm::api::http::Method;

/// A `vmm --api-socket` process, killed if a test fails before it ends.
struct Vmm {
    child: Option<Child>,
    socket: PathBuf,
}

impl Vmm {
    fn start(socket: &Path, extra: &[&str]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("--api-socket")
            .arg(socket)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmm");
        let vmm = Self {
            child: Some(child),
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        vmm
    }

    fn get(&self, endpoint: &str) -> Reply {
        request(&self.socket, Method::Get, endpoint, None).expect("API request")
    }

    fn put(&self, endpoint: &str, body: &str) -> Reply {
        let body = (!body.is_empty()).then_some(body.as_bytes());
        request(&self.socket, Method::Put, endpoint, body).expect("API request")
    }

    /// Wait for the process to end (it must within 30 s).
    fn wait(mut self) -> Output {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmm did not exit");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().expect("output")
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Status and the `error` text of an answer.
fn error(r: &Reply) -> (u16, String) {
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {:?}", r.body));
    let msg = v["error"].as_str().expect("error field").to_string();
    (r.status, msg)
}

fn json(r: &Reply) -> serde_json::Value {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    serde_json::from_slice(&r.body).expect("JSON body")
}

fn assert_error(r: &Reply, status: u16, says: &str) {
    let (got, msg) = error(r);
    assert_eq!(got, status, "{msg}");
    assert!(msg.contains(says), "'{msg}' does not say '{says}'");
}

fn exited_ok(status: ExitStatus, out: &Output) {
    assert_eq!(
        status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Send raw bytes and read whatever comes back until the server closes or 5 s pass.
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn an_empty_vmm_answers_and_refuses_what_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // Validation reads the kernel file but does not parse it: any readable file does.
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, b"not run").unwrap();
    let vmm = Vmm::start(&sock, &[]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let ping = json(&vmm.get("vmm.ping"));
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(ping["pid"], vmm.child.as_ref().unwrap().id());

    // Nothing created yet.
    for (m, ep) in [
        (Method::Get, "vm.info"),
        (Method::Put, "vm.boot"),
        (Method::Put, "vm.pause"),
        (Method::Put, "vm.resume"),
        (Method::Put, "vm.reboot"),
        (Method::Put, "vm.shutdown"),
        (Method::Put, "vm.delete"),
    ] {
        let r = request(&sock, m, ep, None).unwrap();
        assert_error(&r, 404, "no VM has been created");
    }
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_vcpus": 2}"#),
        404,
        "no VM",
    );

    // Bad bodies and configurations: 400, nothing created.
    assert_error(&vmm.put("vm.create", "{"), 400, "invalid JSON");
    assert_error(&vmm.put("vm.create", ""), 400, "needs a JSON body");
    let k = kernel.display();
    assert_error(
        &vmm.put("vm.create", &format!(r#"{{"kernel": "{k}", "vcpus": 2}}"#)),
        400,
        "unknown field `vcpus`",
    );
    assert_error(
        &vmm.put("vm.create", r#"{"kernel": "/nonexistent/vmlinuz"}"#),
        400,
        "kernel image /nonexistent/vmlinuz",
    );
    assert_error(
        &vmm.put("vm.create", &format!(r#"{{"kernel": "{k}", "cpus": 0}}"#)),
        400,
        "--cpus must be between 1",
    );
    assert_error(
        &vmm.put(
            "vm.create",
            &format!(r#"{{"kernel": "{k}", "cpus": 2, "max_cpus": 1}}"#),
        ),
        400,
        "max-cpus",
    );
    assert_error(
        &vmm.put(
            "vm.create",
            &format!(r#"{{"kernel": "{k}", "memory": "256M", "max_memory": "300M"}}"#),
        ),
        400,
        "multiple of 128 MiB",
    );
    let missing = dir.path().join("no-daemon.sock");
    assert_error(
        &vmm.put(
            "vm.create",
            &format!(
                r#"{{"kernel": "{k}", "devices": [{{"kind": "block", "socket": "{}"}}]}}"#,
                missing.display()
            ),
        ),
        400,
        "does not exist",
    );
    assert_error(
        &vmm.put(
            "vm.create",
            &format!(
                r#"{{"kernel": "{k}", "devices": [{{"kind": "fs", "socket": "{}", "server": true}}]}}"#,
                missing.display()
            ),
        ),
        400,
        "tag=TAG is required",
    );
    assert_error(&vmm.get("vm.info"), 404, "no VM");

    // Create; what does not fit the Created state is 409.
    let config = format!(
        r#"{{"kernel": "{k}", "cpus": 2, "max_cpus": 4, "memory": "64M", "serial": "off"}}"#
    );
    assert_eq!(vmm.put("vm.create", &config).status, 204);
    assert_error(
        &vmm.put("vm.create", &config),
        409,
        "already created (state: created)",
    );
    assert_error(&vmm.put("vm.pause", ""), 409, "not running");
    assert_error(&vmm.put("vm.resume", ""), 409, "not paused");
    assert_error(&vmm.put("vm.reboot", ""), 409, "not booted");
    assert_error(&vmm.put("vm.shutdown", ""), 409, "not booted");
    let info = json(&vmm.get("vm.info"));
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["memory"], 64 << 20);
    assert_eq!(info["config"]["serial"], "off");
    assert_eq!(
        (info["cpus"].as_u64(), info["boots"].as_u64()),
        (Some(2), Some(0))
    );

    // Before boot a resize changes the configuration, within max_cpus.
    assert_eq!(vmm.put("vm.resize", r#"{"desired_vcpus": 3}"#).status, 204);
    assert_eq!(json(&vmm.get("vm.info"))["config"]["cpus"], 3);
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_vcpus": 5}"#),
        400,
        "above max_cpus 4",
    );
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_vcpus": 0}"#),
        400,
        "at least 1",
    );
    assert_error(&vmm.put("vm.resize", "{}"), 400, "desired_vcpus and/or");

    // HTTP-level errors.
    assert_error(&vmm.get("vm.nope"), 404, "unknown endpoint");
    let r = vmm.get("vm.boot");
    assert_error(&r, 405, "vm.boot takes PUT, not GET");
    assert_eq!(r.header("allow"), Some("PUT"));
    let big = format!(
        r#"{{"kernel": "{k}", "cmdline": "{}"}}"#,
        "x".repeat(70 << 10)
    );
    assert_error(
        &vmm.put("vm.create", &big),
        413,
        "over the 65536-byte limit",
    );
    assert!(raw(&sock, b"\x00\x01garbage\r\n\r\n").starts_with("HTTP/1.1 4"));
    let _ = raw(
        &sock,
        b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Length: 100\r\n\r\n{",
    );

    // After all that, the VM is still as it was and the vmm still serves.
    assert_eq!(json(&vmm.get("vm.info"))["state"], "Created");
    assert_eq!(vmm.put("vm.delete", "").status, 204);
    assert_error(&vmm.get("vm.info"), 404, "no VM");
    assert_eq!(vmm.put("vm.create", &config).status, 204);

    assert_eq!(vmm.put("vmm.shutdown", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
    assert!(!sock.exists(), "the API socket is removed");
}

#[test]
fn concurrent_clients_and_a_stalled_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, b"not run").unwrap();
    let vmm = Vmm::start(&sock, &[]);
    // A client that sends half a request and holds the connection.
    let mut stalled = UnixStream::connect(&sock).unwrap();
    stalled
        .write_all(b"PUT /api/v1/vm.create HTTP/1.1\r\nContent-Le")
        .unwrap();
    // Many clients race to create; exactly one wins, the others hear 409.
    let config = format!(r#"{{"kernel": "{}", "serial": "off"}}"#, kernel.display());
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let sock = sock.clone();
            let config = config.clone();
            std::thread::spawn(move || {
                let body = config.as_bytes();
                let create = request(&sock, Method::Put, "vm.create", Some(body)).unwrap();
                let ping = request(&sock, Method::Get, "vmm.ping", None).unwrap();
                let info = request(
                    &sock,
                    Method::Get,
                    if i % 2 == 0 { "vm.info" } else { "vmm.ping" },
                    None,
                )
                .unwrap();
                (create.status, ping.status, info.status)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(
        results.iter().filter(|r| r.0 == 204).count(),
        1,
        "{results:?}"
    );
    assert_eq!(
        results.iter().filter(|r| r.0 == 409).count(),
        7,
        "{results:?}"
    );
    assert!(
        results.iter().all(|r| r.1 == 200 && r.2 == 200),
        "{results:?}"
    );
    drop(stalled);
    assert_eq!(vmm.put("vmm.shutdown", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
}

#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let first = Vmm::start(&sock, &[]);
    let second = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--api-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("in use by another process"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(first.get("vmm.ping").status, 200);
    drop(first); // killed: leaves its socket behind
    assert!(sock.exists());
    let third = Vmm::start(&sock, &[]);
    assert_eq!(third.get("vmm.ping").status, 200);
    let file = dir.path().join("plain");
    std::fs::write(&file, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--api-socket")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
}

#[test]
fn vmm_remote_prints_json_and_fails_with_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let vmm = Vmm::start(&sock, &[]);
    let remote = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmm"))
            .arg("remote")
            .arg("--api-socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    let out = remote(&["ping"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let out = remote(&["info"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert!(v["error"]
        .as_str()
        .unwrap()
        .contains("no VM has been created"));
    let cfg = dir.path().join("vm.json");
    std::fs::write(&cfg, r#"{"kernel": "/nonexistent"}"#).unwrap();
    let out = remote(&["create", cfg.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(remote(&["frobnicate"]).status.code(), Some(2));
    let out = remote(&["shutdown-vmm"]);
    assert_eq!((out.status.code(), out.stdout.len()), (Some(0), 0));
    let out = vmm.wait();
    exited_ok(out.status, &out);
    // Nothing listens any more.
    assert_eq!(remote(&["ping"]).status.code(), Some(1));
}

/// A guest that prints '.' on COM1 forever, with a delay loop between characters.
fn counter() -> Asm {
    // mov dx, COM1; mov al, '.'; out dx, al; mov ecx, 20000; dec ecx; jnz -4; jmp start
    Asm::new()
        .mov_dx(COM1)
        .mov_al(b'.')
        .out_al()
        .raw(&[0xb9])
        .raw(&20_000u32.to_le_bytes())
        .raw(&[0xff, 0xc9, 0x75, 0xfc])
        .raw(&[0xeb, 0xee])
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// Wait until the file grows past `than` bytes.
fn wait_growth(p: &Path, than: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while size(p) <= than {
        assert!(
            Instant::now() < deadline,
            "{what}: the guest's output did not grow"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_guest_boots_pauses_resumes_reboots_shuts_down_and_boots_again() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = write_kernel(dir.path(), "counter.elf", &counter());
    let serial = dir.path().join("serial.log");
    let vmm = Vmm::start(&sock, &[]);
    let config = serde_json::json!({
        "kernel": kernel, "memory": "16M", "cpus": 1,
        "serial": {"file": serial},
    });
    assert_eq!(vmm.put("vm.create", &config.to_string()).status, 204);
    assert_eq!(vmm.put("vm.boot", "").status, 204);
    assert_error(&vmm.put("vm.boot", ""), 409, "already booted");
    wait_growth(&serial, 0, "boot");
    let info = json(&vmm.get("vm.info"));
    assert_eq!(
        (info["state"].as_str(), info["boots"].as_u64()),
        (Some("Running"), Some(1))
    );

    assert_eq!(vmm.put("vm.pause", "").status, 204);
    assert_eq!(json(&vmm.get("vm.info"))["state"], "Paused");
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_vcpus": 1}"#),
        409,
        "paused",
    );
    let paused_at = size(&serial);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(size(&serial), paused_at, "the guest ran while paused");
    assert_eq!(vmm.put("vm.resume", "").status, 204);
    wait_growth(&serial, paused_at, "resume");

    // Created without max_cpus/max_memory: nothing to grow into; shrinking RAM is 501.
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_vcpus": 2}"#),
        400,
        "created without max_cpus",
    );
    assert_eq!(vmm.put("vm.resize", r#"{"desired_vcpus": 1}"#).status, 204);
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_ram": 8388608}"#),
        501,
        "not supported yet: memory unplug",
    );

    assert_eq!(vmm.put("vm.reboot", "").status, 204);
    let info = json(&vmm.get("vm.info"));
    assert_eq!(
        (info["state"].as_str(), info["boots"].as_u64()),
        (Some("Running"), Some(2))
    );
    wait_growth(&serial, size(&serial), "reboot");

    assert_eq!(vmm.put("vm.shutdown", "").status, 204);
    assert_eq!(json(&vmm.get("vm.info"))["state"], "Shutdown");
    let stopped_at = size(&serial);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(size(&serial), stopped_at, "the guest ran after vm.shutdown");
    assert_error(&vmm.put("vm.resume", ""), 409, "not paused");
    assert_eq!(vmm.put("vm.boot", "").status, 204);
    wait_growth(&serial, stopped_at, "boot again");
    assert_eq!(json(&vmm.get("vm.info"))["boots"], 3);

    assert_eq!(vmm.put("vm.delete", "").status, 204);
    assert_error(&vmm.get("vm.info"), 404, "no VM");
    let deleted_at = size(&serial);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(size(&serial), deleted_at, "the guest ran after vm.delete");
    assert_eq!(vmm.put("vmm.shutdown", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
}

#[test]
fn a_boot_that_fails_leaves_the_vm_created() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = dir.path().join("not-a-kernel");
    std::fs::write(&kernel, vec![0u8; 4096]).unwrap();
    let vmm = Vmm::start(&sock, &[]);
    let config = serde_json::json!({"kernel": kernel, "memory": "16M", "serial": "off"});
    assert_eq!(vmm.put("vm.create", &config.to_string()).status, 204);
    let (status, _) = error(&vmm.put("vm.boot", ""));
    assert_eq!(status, 500);
    assert_eq!(json(&vmm.get("vm.info"))["state"], "Created");
    assert_eq!(vmm.put("vmm.shutdown", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
}

#[test]
fn a_command_line_vm_serves_the_api_too() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = write_kernel(dir.path(), "spin.elf", &Asm::new().raw(&[0xeb, 0xfe]));
    let vmm = Vmm::start(
        &sock,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "16M",
            "--cpus",
            "2",
            "--serial",
            "off",
        ],
    );
    let info = json(&vmm.get("vm.info"));
    assert_eq!(info["state"], "Running");
    assert_eq!(
        (info["cpus"].as_u64(), info["memory"].as_u64()),
        (Some(2), Some(16 << 20))
    );
    assert_eq!(info["config"]["kernel"], kernel.to_str().unwrap());
    assert_eq!(vmm.put("vm.pause", "").status, 204);
    assert_eq!(vmm.put("vm.resume", "").status, 204);
    assert_eq!(vmm.put("vmm.shutdown", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
}

#[test]
fn a_guest_power_off_ends_an_api_vmm_with_status_0() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = write_kernel(dir.path(), "off.elf", &Asm::new().poweroff().halt());
    let vmm = Vmm::start(&sock, &[]);
    let config = serde_json::json!({"kernel": kernel, "memory": "16M", "serial": "off"});
    assert_eq!(vmm.put("vm.create", &config.to_string()).status, 204);
    assert_eq!(vmm.put("vm.boot", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
    assert!(!sock.exists());
}

/// A guest that plays the OS side of vCPU unplug: it polls vCPU 1's hot-plug byte and, when
/// asked to give the vCPU back, acknowledges and ejects it (what Linux's `_EJ0` does).
fn ejector() -> Asm {
    // loop: mov dx, 0xa01; in al, dx; test al, REMOVE; jz loop; mov al, REMOVE|EJECT;
    //       out dx, al; jmp loop
    Asm::new()
        .mov_dx(0xa01)
        .in_al()
        .raw(&[0xa8, 0x04, 0x74, 0xf7])
        .mov_al(0x0c)
        .out_al()
        .raw(&[0xeb, 0xf2])
}

#[test]
fn a_running_guest_gets_vcpus_and_ram_hot_plugged() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = write_kernel(dir.path(), "ejector.elf", &ejector());
    let vmm = Vmm::start(&sock, &[]);
    let config = serde_json::json!({
        "kernel": kernel, "memory": "16M", "max_memory": "272M", "cpus": 1, "max_cpus": 3,
        "serial": "off",
    });
    assert_eq!(vmm.put("vm.create", &config.to_string()).status, 204);
    assert_eq!(vmm.put("vm.boot", "").status, 204);
    let info = |what: &str| json(&vmm.get("vm.info"))[what].as_u64().unwrap();
    assert_eq!((info("cpus"), info("memory")), (1, 16 << 20));

    // Grow to 3 vCPUs: created in KVM and present at once (the guest onlines them itself).
    assert_eq!(vmm.put("vm.resize", r#"{"desired_vcpus": 3}"#).status, 204);
    assert_eq!(info("cpus"), 3);
    assert_eq!(json(&vmm.get("vm.info"))["config"]["cpus"], 3);
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_vcpus": 4}"#),
        400,
        "above max_cpus 3",
    );
    // Shrink to 1: vCPU 2 stays until the guest ejects it (this one never does), vCPU 1 is
    // ejected by the guest program.
    assert_eq!(vmm.put("vm.resize", r#"{"desired_vcpus": 1}"#).status, 204);
    let deadline = Instant::now() + Duration::from_secs(30);
    while info("cpus") != 2 {
        assert!(
            Instant::now() < deadline,
            "the guest's eject of vCPU 1 was not seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And back: the ejected vCPU is plugged again.
    assert_eq!(vmm.put("vm.resize", r#"{"desired_vcpus": 3}"#).status, 204);
    assert_eq!(info("cpus"), 3);

    // RAM: 256 MiB of room in two 128 MiB blocks (16 divides 2 granules: 2 blocks).
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_ram": 100663296}"#),
        400,
        "plus a multiple of the 128 MiB hot-plug block",
    );
    let plus_one = (16 << 20) + (128 << 20);
    let r = vmm.put("vm.resize", &format!(r#"{{"desired_ram": {plus_one}}}"#));
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(info("memory"), plus_one);
    assert_error(
        &vmm.put(
            "vm.resize",
            &format!(r#"{{"desired_ram": {}}}"#, plus_one + (256 << 20)),
        ),
        400,
        "above max_memory",
    );
    assert_error(
        &vmm.put("vm.resize", r#"{"desired_ram": 16777216}"#),
        501,
        "not supported yet: memory unplug",
    );
    let full = (16 << 20) + (256 << 20);
    assert_eq!(
        vmm.put("vm.resize", &format!(r#"{{"desired_ram": {full}}}"#))
            .status,
        204
    );
    assert_eq!(info("memory"), full);

    // A reboot starts with what the VM was resized to.
    assert_eq!(vmm.put("vm.reboot", "").status, 204);
    assert_eq!((info("cpus"), info("memory")), (3, full));
    assert_eq!(vmm.put("vmm.shutdown", "").status, 204);
    let out = vmm.wait();
    exited_ok(out.status, &out);
}

//! The `vmm` binary end to end on /dev/kvm with tiny guest programs: what a user sees on
//! stdout and in the exit status.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Run the vmm with `args` (and `input` on stdin); kill it if it hangs.
fn vmm(args: &[&str], input: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    // Kept open until the vmm exits, so the input never races end-of-file handling.
    let _stdin = input.map(|input| {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
        stdin
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "vmm hung; stdout: {:?} stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn run_guest(code: Asm, extra: &[&str], input: Option<&[u8]>) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "guest.elf", &code);
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "16M"];
    args.extend_from_slice(extra);
    vmm(&args, input)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn long_mode_guest_prints_on_serial_and_powers_off_with_status_0() {
    if !kvm_available() {
        return;
    }
    // The top byte of a 64-bit immediate only reaches AL in 64-bit mode.
    let code = Asm::new()
        .print(b"hello ")
        .mov_rax(0x4c00_0000_0000_0000)
        .raw(&[0x48, 0xc1, 0xe8, 0x38]) // shr rax, 56
        .mov_dx(COM1)
        .out_al()
        .print(b"\n")
        .poweroff()
        .halt();
    let out = run_guest(code, &[], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello L\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn two_vcpus_boot_and_power_off() {
    if !kvm_available() {
        return;
    }
    let code = Asm::new().print(b"bsp\n").poweroff().halt();
    let out = run_guest(code, &["--cpus", "2"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "bsp\n");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn serial_input_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    // Poll LSR.DR, read the byte, print it + 1, power off.
    let code = Asm::new()
        .mov_dx(COM1 + 5)
        .in_al()
        .raw(&[0xa8, 0x01, 0x74, 0xfb]) // test al, 1; jz back to in
        .mov_dx(COM1)
        .in_al()
        .raw(&[0xfe, 0xc0]) // inc al
        .out_al()
        .poweroff()
        .halt();
    let out = run_guest(code, &[], Some(b"a"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn i8042_reset_with_no_reboot_exits_with_status_2() {
    if !kvm_available() {
        return;
    }
    let code = Asm::new()
        .print(b"r")
        .mov_dx(0x64)
        .mov_al(0xfe)
        .out_al()
        .halt();
    let out = run_guest(code, &["--no-reboot"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "r");
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
}

#[test]
fn triple_fault_is_a_reset_and_never_a_hang() {
    if !kvm_available() {
        return;
    }
    // ud2 with an empty IDT: #UD -> #GP -> double fault -> triple fault.
    let code = Asm::new().print(b"t").raw(&[0x0f, 0x0b]);
    let out = run_guest(code, &["--no-reboot"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "t");
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
}

#[test]
fn reset_without_no_reboot_restarts_the_guest() {
    if !kvm_available() {
        return;
    }
    // The guest resets on every boot; count the boots on the console, then SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let code = Asm::new()
        .print(b"B")
        .mov_dx(0x64)
        .mov_al(0xfe)
        .out_al()
        .halt();
    let kernel = write_kernel(dir.path(), "guest.elf", &code);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "16M"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1];
    while seen.len() < 3 {
        use std::io::Read;
        match stdout.read(&mut buf) {
            Ok(1) => seen.push(buf[0]),
            _ => break,
        }
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(seen, b"BBB", "the guest booted three times");
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean shutdown");
}

#[test]
fn bad_configurations_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(dir.path(), "k.elf", &Asm::new().halt());
    let k = kernel.to_str().unwrap();
    let missing_sock = dir.path().join("d.sock");
    let disk = format!("socket={}", missing_sock.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinuz"],
            "kernel image /nonexistent/vmlinuz",
        ),
        (
            vec!["--kernel", k, "--memory", "12Q"],
            "invalid memory size '12Q'",
        ),
        (vec!["--kernel", k, "--memory", "1K"], "at least 2 MiB"),
        (
            vec!["--kernel", k, "--cpus", "0"],
            "--cpus must be between 1 and",
        ),
        (vec!["--kernel", k, "--disk", &disk], "does not exist"),
        (
            vec!["--kernel", k, "--fs", "socket=/x"],
            "tag=TAG is required",
        ),
        (vec!["--kernel", k, "--serial", "tty"], "--serial 'tty'"),
        (
            vec!["--kernel", k, "--initramfs", "/nonexistent/initrd"],
            "initramfs /nonexistent/initrd",
        ),
    ];
    for (args, message) in cases {
        let out = vmm(&args, None);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(message),
            "{args:?}: expected '{message}' in: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_non_kernel_file_is_rejected() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![0x55u8; 8192]).unwrap();
    let out = vmm(
        &["--kernel", junk.to_str().unwrap(), "--memory", "16M"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot load kernel"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn terminal_is_raw_while_running_and_restored_after_ctrl_a_x() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::io::{FromRawFd, OwnedFd};
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_kernel(
        dir.path(),
        "spin.elf",
        &Asm::new().print(b"up").raw(&[0xeb, 0xfe]),
    );
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints; other arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just created by openpty and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let lflag = |fd: &OwnedFd| {
        use std::os::unix::io::AsRawFd;
        // SAFETY: zeroed termios is a valid buffer; fd is a valid terminal.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
        t.c_lflag
    };
    assert_ne!(lflag(&slave) & libc::ICANON, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", kernel.to_str().unwrap(), "--memory", "16M"])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut term = std::fs::File::from(master);
    let mut seen = Vec::new();
    while !seen.ends_with(b"up") {
        use std::io::Read;
        let mut b = [0u8; 1];
        term.read_exact(&mut b).unwrap();
        seen.push(b[0]);
    }
    assert_eq!(
        lflag(&slave) & libc::ICANON,
        0,
        "raw mode while the guest runs"
    );
    term.write_all(&[0x01, b'x']).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_ne!(lflag(&slave) & libc::ICANON, 0, "terminal restored");
}

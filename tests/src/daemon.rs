//! The daemon process under test.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary built beside the running test or benchmark (`target/<profile>/NAME`).
///
/// Tests of another crate's daemon cannot depend on its binary, so the test run needs it
/// built first (`cargo build -p NAME`, as `scripts/test` does); `VHOST_USER_TEST_BIN_DIR`
/// points elsewhere.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("VHOST_USER_TEST_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("path of the running executable");
            let mut dir = exe.parent().expect("executable in a directory").to_owned();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p {name}, with the same profile)",
        path.display()
    );
    path
}

/// A daemon process, SIGTERMed and reaped when dropped.
pub struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    /// Start `binary args... socket` (the socket path is the last argument) and wait for the
    /// socket to appear.
    pub fn start<S: AsRef<OsStr>>(binary: &Path, args: &[S], socket: &Path) -> Daemon {
        let mut cmd = Command::new(binary);
        cmd.args(args).arg(socket);
        Daemon::spawn(&mut cmd, socket)
    }

    /// Spawn `cmd` (stdin from /dev/null) and wait until `socket` exists. Only the file is
    /// looked for: a probing connection would be a frontend session of its own.
    pub fn spawn(cmd: &mut Command, socket: &Path) -> Daemon {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let mut daemon = Daemon {
            child,
            socket: socket.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("{:?} exited before listening: {status}", cmd.get_program());
            }
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        daemon
    }

    /// The socket the daemon serves.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Send `signal` and wait for the process to end.
    pub fn signal_and_wait(&mut self, signal: i32) -> ExitStatus {
        if self.alive() {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as i32, signal) };
        }
        self.child.wait().expect("wait for the daemon")
    }

    /// `kill -9`: the daemon gets no chance to write anything back.
    pub fn kill9(&mut self) -> ExitStatus {
        self.signal_and_wait(libc::SIGKILL)
    }

    /// User plus system CPU time the process (all its threads) has used so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.child.id())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.alive() {
            return;
        }
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        // A daemon that ignores SIGTERM must not hang the test run.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() {
            if Instant::now() >= deadline {
                eprintln!("daemon {} ignored SIGTERM for 10 s; killing it", self.pid());
                self.kill9();
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// utime + stime of process `pid` from /proc/PID/stat; zero if it cannot be read.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name (field 2) may contain spaces; fields are counted after its ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the file; `rest` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

//! `vmm` binary: parse the command line, run the VM thread (and the API server with
//! `--api-socket`), exit with the guest's outcome. `vmm remote ...` is the API client.
//!
//! Exit status: 0 when the guest powered off (or on SIGTERM/SIGINT/Ctrl-A x/`vmm.shutdown`),
//! 2 when the guest rebooted under `--no-reboot`, 1 on configuration or VM errors.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::api::server::start as start_api;
use vmm::config::{Cli, SerialMode, VmConfig};
use vmm::vm::{Vmm, PROCESS_START};

/// Puts the terminal on stdin in raw mode and restores it when dropped.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enable() -> Option<Self> {
        // SAFETY: isatty has no preconditions.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid buffer for tcgetattr to fill.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so that log lines on stderr still start at column 0.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: valid fd and pointer.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in enable() on the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args();
    if std::env::args().nth(1).as_deref() == Some("remote") {
        return vmm::api::client::main(args.by_ref().skip(2));
    }
    let _ = PROCESS_START.set(Instant::now());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let api_socket = cli.api_socket.clone();
    // Without --kernel (allowed only with --api-socket) the vmm starts empty.
    let config = match cli
        .kernel
        .is_some()
        .then(|| VmConfig::from_cli(cli))
        .transpose()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    let vmm = match Vmm::new(config.clone()) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    vmm.handle_termination_signals();
    let server = match api_socket.map(|p| start_api(&p, vmm.handle())).transpose() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(1);
        }
    };
    let terminal = if config.is_some_and(|c| c.serial == SerialMode::Stdout) {
        RawTerminal::enable()
    } else {
        None
    };
    let result = vmm.run();
    drop(terminal);
    // Answers the request in progress (vmm.shutdown) before the socket goes.
    drop(server);
    match result {
        Ok(status) => ExitCode::from(status.code() as u8),
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(1)
        }
    }
}

//! `vhost-user-console`: a virtio-console device daemon for vhost-user frontends (our `vmm
//! --console socket=...`, Cloud Hypervisor or crosvm generic vhost-user devices). The guest sees
//! `/dev/hvc0`; the host side is a pty, a Unix socket, a TCP port on loopback, or stdio, and
//! every byte the guest writes can also go to a log file.
//!
//! ```text
//! vhost-user-console --socket /run/vm0-con.sock --backend pty
//! vhost-user-console --socket /run/vm0-con.sock --backend socket=/run/vm0-console --log /var/log/vm0.log
//! vhost-user-console --socket S --backend tcp=4555 \
//!     --port name=org.qemu.guest_agent.0,backend=socket=/run/vm0-qga.sock
//! ```
//!
//! * `--backend` (port 0, the console): `stdio`, `pty` (the path is printed at start-up),
//!   `socket=PATH` (clients attach and detach at will, e.g. `socat -,raw,echo=0
//!   UNIX-CONNECT:PATH`), `tcp=[ADDR:]PORT` (127.0.0.1 unless an address is given),
//!   `telnet=[ADDR:]PORT` (the same for telnet clients: `telnet 127.0.0.1 PORT` gets character
//!   mode, and its window size becomes the console size), `null`.
//! * `--log FILE` appends all of port 0's guest output, whatever the backend.
//! * A client that attaches first gets the most recent output (`--history` bytes, the boot log).
//! * `--port name=NAME,backend=SPEC[,log=FILE]` adds named ports (VIRTIO_CONSOLE_F_MULTIPORT);
//!   the guest finds them as `/dev/virtio-ports/NAME`.
//! * Console size (VIRTIO_CONSOLE_F_SIZE): from the pty (users' terminals set it; followed
//!   every second), from the last telnet client that reported it, or `--size COLSxROWS`
//!   (socket and plain TCP clients have no resize channel). A multiport guest gets resizes as
//!   control messages; a single-port guest gets a config-change interrupt when the frontend set
//!   up its backend-request channel (BACKEND_REQ), and otherwise reads the new size from the
//!   config space when it next looks.
//! * Endpoints and their clients belong to the process: a frontend that reconnects finds the
//!   same pty, sockets, clients and history.

mod backend;
mod chain;
mod control;
mod host;
mod port;
mod telnet;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use common::{DaemonArgs, DeviceInfo};

use crate::backend::{ConsoleBackend, ConsoleConfig};
use crate::host::HostSpec;
use crate::port::PortConfig;

const INFO: DeviceInfo = DeviceInfo {
    name: "vhost-user-console",
    device_type: "console",
    capabilities: &[],
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "vhost-user virtio-console daemon: the guest's /dev/hvc0 on a pty, socket, TCP port or stdio",
    long_about = None,
    after_help = "Examples:\n  vhost-user-console --socket /run/vm0-con.sock --backend pty\n  \
vhost-user-console --socket /run/vm0-con.sock --backend socket=/run/vm0-console --log /var/log/vm0.log\n  \
vhost-user-console --socket S --backend tcp=4555 --port name=org.qemu.guest_agent.0,backend=socket=/run/qga.sock\n\n\
Attach to a socket backend with: socat -,raw,echo=0 UNIX-CONNECT:/run/vm0-console\n\
Attach to a telnet backend with: telnet 127.0.0.1 PORT (the console size follows the window)"
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// Host side of the console (port 0): stdio, pty, socket=PATH, tcp=[ADDR:]PORT,
    /// telnet=[ADDR:]PORT (loopback unless ADDR is given) or null.
    #[arg(
        long,
        value_name = "SPEC",
        required_unless_present = "print_capabilities"
    )]
    backend: Option<HostSpec>,

    /// Append all guest output of the console to FILE (in addition to the backend).
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,

    /// Add a named port (multiport): name=NAME,backend=SPEC[,log=FILE]. Repeatable.
    #[arg(long = "port", value_name = "name=NAME,backend=SPEC[,log=FILE]", value_parser = parse_port)]
    ports: Vec<PortConfig>,

    /// Bytes of recent output kept per port and replayed to a client when it attaches.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    history: usize,

    /// Console size reported to the guest until a pty user or telnet client sets one, e.g. 120x40.
    #[arg(long, value_name = "COLSxROWS", value_parser = parse_size)]
    size: Option<(u16, u16)>,

    /// Largest queue size the frontend may use (power of two, 2-1024).
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,
}

fn parse_size(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("'{s}' is not COLSxROWS (e.g. 120x40)");
    let (c, r) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let cols: u16 = c.trim().parse().map_err(|_| bad())?;
    let rows: u16 = r.trim().parse().map_err(|_| bad())?;
    if cols == 0 || rows == 0 {
        return Err(bad());
    }
    Ok((cols, rows))
}

/// Port names become /dev/virtio-ports/NAME in the guest: keep them to a safe alphabet.
fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn parse_port(s: &str) -> Result<PortConfig, String> {
    let mut name = None;
    let mut host = None;
    let mut log = None;
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' is not KEY=VALUE"))?;
        match key {
            "name" => {
                if !valid_port_name(value) {
                    return Err(format!(
                        "port name '{value}' must be 1-255 characters of A-Z a-z 0-9 . _ -"
                    ));
                }
                name = Some(value.to_string());
            }
            "backend" => host = Some(value.parse::<HostSpec>().map_err(|e| e.to_string())?),
            "log" if !value.is_empty() => log = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown port option '{key}' (name, backend, log)")),
        }
    }
    let name = name.ok_or("a port needs name=NAME")?;
    Ok(PortConfig {
        name: Some(name),
        host: host.unwrap_or(HostSpec::Null),
        log,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init(&cli.daemon, &INFO);
    let Some(host) = cli.backend.clone() else {
        eprintln!("{}: error: --backend SPEC is required", INFO.name);
        return ExitCode::FAILURE;
    };
    let mut ports = vec![PortConfig {
        name: None,
        host,
        log: cli.log.clone(),
    }];
    for p in &cli.ports {
        if ports.iter().any(|q| q.name.is_some() && q.name == p.name) {
            eprintln!(
                "{}: error: port name {} given twice",
                INFO.name,
                p.name.as_deref().unwrap_or_default()
            );
            return ExitCode::FAILURE;
        }
        ports.push(p.clone());
    }
    let config = ConsoleConfig {
        ports,
        history: cli.history,
        queue_size: cli.queue_size,
        size: cli.size,
    };
    let backend = match ConsoleBackend::new(config) {
        Ok(b) => b,
        Err(e) => return common::exit_error(&INFO, &e),
    };
    for (i, where_) in backend.describe_ports().iter().enumerate() {
        eprintln!("{}: port {i}: {where_}", INFO.name);
    }
    common::exit_result(&INFO, common::serve(&cli.daemon, &INFO, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_sizes() {
        let p = parse_port("name=org.qemu.guest_agent.0,backend=socket=/run/q.sock,log=/tmp/q")
            .unwrap();
        assert_eq!(p.name.as_deref(), Some("org.qemu.guest_agent.0"));
        assert_eq!(p.host, HostSpec::Socket("/run/q.sock".into()));
        assert_eq!(p.log, Some(PathBuf::from("/tmp/q")));
        assert!(parse_port("backend=pty").is_err());
        assert!(parse_port("name=../etc,backend=pty").is_err());
        assert!(parse_port("name=a,colour=red").is_err());
        assert_eq!(parse_size("120x40"), Ok((120, 40)));
        assert!(parse_size("0x40").is_err());
        assert!(parse_size("wide").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

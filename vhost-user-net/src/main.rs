//! `vhost-user-net`: serves a Linux tap interface to a vhost-user frontend (QEMU's
//! `-netdev vhost-user` with `virtio-net-pci`, our `vmm --net socket=...`) as a virtio-net
//! device, with one tap queue and one worker thread per queue pair.

mod backend;
mod pair;
mod ring;
mod tap;

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::ExitCode;

use clap::Parser;
use common::{DaemonArgs, DeviceInfo};

use crate::backend::{NetBackend, NetConfig};
use crate::tap::HostConfig;

const INFO: DeviceInfo = DeviceInfo {
    name: "vhost-user-net",
    device_type: "net",
    capabilities: &[],
};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "vhost-user virtio-net daemon: connects a guest's NIC to a Linux tap interface"
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// Tap interface to create, or existing persistent tap to attach to. Omit it (or put
    /// `%d` in the name) to let the kernel choose; the chosen name is then printed on stdout.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,

    /// IPv4 address for the host end of the tap.
    #[arg(long, value_name = "ADDR")]
    ip: Option<Ipv4Addr>,

    /// Netmask for --ip.
    #[arg(
        long,
        value_name = "MASK",
        requires = "ip",
        default_value = "255.255.255.0"
    )]
    mask: Ipv4Addr,

    /// MAC address of the host end of the tap.
    #[arg(long, value_name = "MAC", value_parser = parse_mac)]
    host_mac: Option<[u8; 6]>,

    /// MAC address of the guest's NIC (default: a random locally administered one).
    #[arg(long, value_name = "MAC", value_parser = parse_unicast_mac)]
    mac: Option<[u8; 6]>,

    /// MTU of the guest's NIC and of the tap.
    #[arg(long, default_value_t = 1500, value_name = "BYTES")]
    mtu: u16,

    /// Queue pairs: tap queues (IFF_MULTI_QUEUE) and worker threads, one each.
    #[arg(long, default_value_t = 1, value_name = "N")]
    num_queue_pairs: usize,

    /// Largest queue size the frontend may use (power of two).
    #[arg(long, default_value_t = 256, value_name = "N")]
    queue_size: u16,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address like 52:54:00:12:34:56"));
    }
    for (byte, part) in mac.iter_mut().zip(&parts) {
        *byte = u8::from_str_radix(part, 16)
            .ok()
            .filter(|_| part.len() == 2)
            .ok_or_else(|| format!("{s:?} is not a MAC address like 52:54:00:12:34:56"))?;
    }
    Ok(mac)
}

fn parse_unicast_mac(s: &str) -> Result<[u8; 6], String> {
    let mac = parse_mac(s)?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("{s} is not a unicast MAC address"));
    }
    Ok(mac)
}

/// A random locally administered unicast MAC.
fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most mac.len() bytes into the local buffer.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr() as *mut libc::c_void, mac.len(), 0) };
    if n != mac.len() as isize {
        let pid = std::process::id().to_le_bytes();
        mac[2..6].copy_from_slice(&pid);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    common::init(&cli.daemon, &INFO);
    let config = NetConfig {
        tap: cli.tap.clone(),
        host: HostConfig {
            ip: cli.ip,
            mask: cli.ip.map(|_| cli.mask),
            mac: cli.host_mac,
            mtu: None,
        },
        mac: cli.mac.unwrap_or_else(random_mac),
        mtu: cli.mtu,
        queue_pairs: cli.num_queue_pairs,
        queue_size: cli.queue_size,
    };
    let backend = match NetBackend::new(config.clone()) {
        Ok(b) => b,
        Err(e) => return common::exit_error(&INFO, &e),
    };
    let name = backend.tap_name().to_string();
    log::info!(
        "{} tap {name}: {} queue pair(s) of up to {} entries, guest MAC {}, MTU {}",
        if backend.tap_existed() {
            "attached to"
        } else {
            "created"
        },
        config.queue_pairs,
        config.queue_size,
        format_mac(&config.mac),
        config.mtu
    );
    if cli.tap.as_deref().is_none_or(|t| t.contains('%')) {
        // The kernel chose the name; whoever started us needs it.
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{name}");
        let _ = out.flush();
    }
    common::exit_result(&INFO, common::serve(&cli.daemon, &INFO, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:0f"),
            Ok([0x52, 0x54, 0, 0xab, 0xcd, 0x0f])
        );
        assert!(parse_mac("52:54:00:ab:cd").is_err());
        assert!(parse_mac("52:54:00:ab:cd:0fff").is_err());
        assert!(parse_mac("52-54-00-ab-cd-0f").is_err());
        assert!(parse_unicast_mac("01:00:5e:00:00:01").is_err());
        let m = random_mac();
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
    }
}

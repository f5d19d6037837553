//! VM configuration: the command line and its validation.
//!
//! Everything a user can get wrong is checked here, before any KVM call, so that a bad
//! configuration ends with one clear message instead of a half-built VM.

use std::path::PathBuf;

use clap::Parser;

/// Kind of vhost-user device.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum VhostUserDeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-fs.
    Fs,
    /// virtio-console.
    Console,
}

/// One vhost-user device (a daemon reached by socket path).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserDeviceConfig {
    /// What the daemon serves.
    pub kind: VhostUserDeviceKind,
    /// The daemon's unix socket.
    pub socket: PathBuf,
    /// VMM listens on `socket` and the daemon connects (daemon --client); default: VMM connects.
    pub server: bool,
    /// None: device default / what the backend offers (MQ).
    pub num_queues: Option<usize>,
    /// Ring size of each queue (default 256).
    pub queue_size: u16,
    /// fs only (mandatory there).
    pub tag: Option<String>,
    /// net only, optional.
    pub mac: Option<String>,
}

/// Where the guest's serial port (COM1) goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// Output to stdout; input from stdin (raw mode when it is a terminal).
    Stdout,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// No serial port.
    Off,
}

/// A validated VM configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Back guest RAM with huge pages (memfd MFD_HUGETLB).
    pub hugepages: bool,
    /// Serial console destination.
    pub serial: SerialMode,
    /// vhost-user devices, in PCI slot order.
    pub devices: Vec<VhostUserDeviceConfig>,
    /// A guest reboot ends the VMM (exit status 2) instead of restarting the VM.
    pub no_reboot: bool,
}

/// Configuration errors (all from the command line).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--memory` could not be parsed.
    #[error("invalid memory size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M, 2G)")]
    MemorySyntax(String),
    /// `--memory` is out of range.
    #[error("memory size {0}: {1}")]
    MemoryRange(String, &'static str),
    /// `--cpus` is out of range.
    #[error("--cpus must be between 1 and {max}, got {got}")]
    Cpus {
        /// What was asked for.
        got: u32,
        /// Largest supported count.
        max: u32,
    },
    /// The kernel image does not exist or cannot be read.
    #[error("kernel image {0}: {1}")]
    Kernel(PathBuf, String),
    /// The initramfs does not exist or cannot be read.
    #[error("initramfs {0}: {1}")]
    Initramfs(PathBuf, String),
    /// A device option string is malformed.
    #[error("--{option} '{value}': {reason}")]
    Device {
        /// `disk`, `net`, `fs` or `console`.
        option: &'static str,
        /// The offending argument.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--serial` has an unknown value.
    #[error("--serial '{0}': expected stdout, file=PATH or off")]
    Serial(String),
    /// The command line is too long for the zero page.
    #[error("kernel command line is {0} bytes, at most {max} fit", max = crate::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
}

/// Largest vCPU count: APIC ids are 8-bit in the MADT entries used here, 0xff is broadcast.
pub const MAX_CPUS: u32 = 254;
/// Smallest guest RAM accepted.
const MIN_MEMORY: u64 = 2 << 20;
/// Largest guest RAM accepted (the top of the identity map is not the limit; this is sanity).
const MAX_MEMORY: u64 = 1 << 40;
/// Huge page size used with `--hugepages` (the kernel's default MFD_HUGETLB size on x86_64).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Command line of the `vmm` binary.
#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "A lean KVM VMM with vhost-user devices"
)]
pub struct Cli {
    /// Kernel: bzImage or ELF vmlinux (64-bit boot protocol).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM: a number with K/M/G/T suffix (a bare number is MiB).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Back guest RAM with 2 MiB huge pages (they must be reserved in the host).
    #[arg(long)]
    pub hugepages: bool,
    /// Serial console: stdout, file=PATH or off.
    #[arg(long, default_value = "stdout")]
    pub serial: String,
    /// vhost-user-blk: socket=PATH[,num_queues=N][,queue_size=N][,server=on] (repeatable).
    #[arg(long, value_name = "OPTIONS")]
    pub disk: Vec<String>,
    /// vhost-user-net: socket=PATH[,num_queues=N][,queue_size=N][,mac=MAC][,server=on].
    #[arg(long, value_name = "OPTIONS")]
    pub net: Vec<String>,
    /// vhost-user-fs: socket=PATH,tag=TAG[,num_queues=N][,queue_size=N][,server=on].
    #[arg(long, value_name = "OPTIONS")]
    pub fs: Vec<String>,
    /// vhost-user console: socket=PATH[,server=on].
    #[arg(long, value_name = "OPTIONS")]
    pub console: Vec<String>,
    /// Exit with status 2 when the guest reboots instead of restarting it.
    #[arg(long)]
    pub no_reboot: bool,
}

/// Parse a memory size: `512M`, `2G`, `1024K`, `1T`, optional `iB`/`B`; a bare number is MiB.
pub fn parse_memory_size(s: &str) -> Result<u64, ConfigError> {
    let syntax = || ConfigError::MemorySyntax(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(syntax());
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" => 20,
        "K" => 10,
        "G" => 30,
        "T" => 40,
        _ => return Err(syntax()),
    };
    let n: u64 = num.parse().map_err(|_| syntax())?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or(ConfigError::MemoryRange(s.to_string(), "too large"))?;
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryRange(s.to_string(), "at least 2 MiB"));
    }
    if bytes > MAX_MEMORY {
        return Err(ConfigError::MemoryRange(s.to_string(), "at most 1 TiB"));
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemoryRange(
            s.to_string(),
            "must be a multiple of 4 KiB",
        ));
    }
    Ok(bytes)
}

fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s {
        "stdout" => Ok(SerialMode::Stdout),
        "off" => Ok(SerialMode::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(ConfigError::Serial(s.to_string())),
        },
    }
}

fn option_name(kind: &VhostUserDeviceKind) -> &'static str {
    match kind {
        VhostUserDeviceKind::Block => "disk",
        VhostUserDeviceKind::Net => "net",
        VhostUserDeviceKind::Fs => "fs",
        VhostUserDeviceKind::Console => "console",
    }
}

impl VhostUserDeviceConfig {
    /// Parse `key=value[,key=value]...` for a device of `kind`.
    pub fn parse(kind: VhostUserDeviceKind, s: &str) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::Device {
            option: option_name(&kind),
            value: s.to_string(),
            reason,
        };
        let mut socket = None;
        let mut server = false;
        let mut num_queues = None;
        let mut queue_size = 256u16;
        let mut tag = None;
        let mut mac = None;
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
            match (key, &kind) {
                ("socket", _) if !value.is_empty() => socket = Some(PathBuf::from(value)),
                ("server", _) => {
                    server = match value {
                        "on" | "true" | "1" => true,
                        "off" | "false" | "0" => false,
                        _ => return Err(err(format!("server={value}: expected on or off"))),
                    }
                }
                ("num_queues", k) if *k != VhostUserDeviceKind::Console => {
                    let n: usize = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| err(format!("num_queues={value}: expected 1..64")))?;
                    num_queues = Some(n);
                }
                ("queue_size", _) => {
                    queue_size = value
                        .parse()
                        .ok()
                        .filter(|n: &u16| n.is_power_of_two() && (2..=32768).contains(n))
                        .ok_or_else(|| {
                            err(format!(
                                "queue_size={value}: expected a power of two, 2..32768"
                            ))
                        })?;
                }
                ("tag", VhostUserDeviceKind::Fs) => {
                    if value.is_empty() || value.len() > 36 {
                        return Err(err("tag must be 1..36 bytes".to_string()));
                    }
                    tag = Some(value.to_string());
                }
                ("mac", VhostUserDeviceKind::Net) => {
                    let ok = value.split(':').count() == 6
                        && value
                            .split(':')
                            .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
                    if !ok {
                        return Err(err(format!("mac={value}: expected xx:xx:xx:xx:xx:xx")));
                    }
                    mac = Some(value.to_string());
                }
                _ => return Err(err(format!("unknown or misplaced option '{key}'"))),
            }
        }
        let socket = socket.ok_or_else(|| err("socket=PATH is required".to_string()))?;
        if kind == VhostUserDeviceKind::Fs && tag.is_none() {
            return Err(err("tag=TAG is required".to_string()));
        }
        if !server && !socket.exists() {
            return Err(err(format!(
                "socket {} does not exist (is the daemon running?)",
                socket.display()
            )));
        }
        Ok(Self {
            kind,
            socket,
            server,
            num_queues,
            queue_size,
            tag,
            mac,
        })
    }
}

fn check_readable(path: &PathBuf) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

impl VmConfig {
    /// A configuration with defaults (1 vCPU, 512 MiB, serial on stdout, no devices).
    pub fn new(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0".to_string(),
            cpus: 1,
            memory: 512 << 20,
            hugepages: false,
            serial: SerialMode::Stdout,
            devices: Vec::new(),
            no_reboot: false,
        }
    }

    /// Validate the parsed command line.
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        if cli.cpus == 0 || cli.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus {
                got: cli.cpus,
                max: MAX_CPUS,
            });
        }
        let memory = parse_memory_size(&cli.memory)?;
        if cli.hugepages && !memory.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(ConfigError::MemoryRange(
                cli.memory,
                "must be a multiple of 2 MiB with --hugepages",
            ));
        }
        check_readable(&cli.kernel).map_err(|e| ConfigError::Kernel(cli.kernel.clone(), e))?;
        if let Some(initramfs) = &cli.initramfs {
            check_readable(initramfs).map_err(|e| ConfigError::Initramfs(initramfs.clone(), e))?;
        }
        if cli.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(cli.cmdline.len()));
        }
        let mut devices = Vec::new();
        for (kind, list) in [
            (VhostUserDeviceKind::Block, &cli.disk),
            (VhostUserDeviceKind::Net, &cli.net),
            (VhostUserDeviceKind::Fs, &cli.fs),
            (VhostUserDeviceKind::Console, &cli.console),
        ] {
            for s in list {
                devices.push(VhostUserDeviceConfig::parse(kind.clone(), s)?);
            }
        }
        Ok(Self {
            kernel: cli.kernel,
            initramfs: cli.initramfs,
            cmdline: cli.cmdline,
            cpus: cli.cpus as u8,
            memory,
            hugepages: cli.hugepages,
            serial: parse_serial(&cli.serial)?,
            devices,
            no_reboot: cli.no_reboot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("1G"), Ok(1 << 30));
        assert_eq!(parse_memory_size("512M"), Ok(512 << 20));
        assert_eq!(parse_memory_size("256"), Ok(256 << 20));
        assert_eq!(parse_memory_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_memory_size("4096k"), Ok(4 << 20));
        for bad in ["12Q", "", "G", "-1G", "1.5G", "1 G x"] {
            assert_eq!(
                parse_memory_size(bad),
                Err(ConfigError::MemorySyntax(bad.to_string())),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_memory_size("1K"),
            Err(ConfigError::MemoryRange(..))
        ));
        assert!(matches!(
            parse_memory_size("2T"),
            Err(ConfigError::MemoryRange(..))
        ));
        assert!(matches!(
            parse_memory_size("99999999999999999999G"),
            Err(ConfigError::MemorySyntax(_))
        ));
        assert!(matches!(
            parse_memory_size("17592186044416T"),
            Err(ConfigError::MemoryRange(..))
        ));
    }

    #[test]
    fn device_options() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fs.sock");
        std::fs::write(&sock, b"").unwrap();
        let s = format!("socket={},tag=share,queue_size=1024", sock.display());
        let fs = VhostUserDeviceConfig::parse(VhostUserDeviceKind::Fs, &s).unwrap();
        assert_eq!(fs.tag.as_deref(), Some("share"));
        assert_eq!(fs.queue_size, 1024);
        assert!(!fs.server);

        let no_tag = format!("socket={}", sock.display());
        assert!(VhostUserDeviceConfig::parse(VhostUserDeviceKind::Fs, &no_tag).is_err());
        let bad_q = format!("socket={},queue_size=100", sock.display());
        assert!(VhostUserDeviceConfig::parse(VhostUserDeviceKind::Block, &bad_q).is_err());
        let tag_on_disk = format!("socket={},tag=x", sock.display());
        assert!(VhostUserDeviceConfig::parse(VhostUserDeviceKind::Block, &tag_on_disk).is_err());
        let mac = format!(
            "socket={},mac=52:54:00:12:34:56,num_queues=4",
            sock.display()
        );
        let net = VhostUserDeviceConfig::parse(VhostUserDeviceKind::Net, &mac).unwrap();
        assert_eq!(net.num_queues, Some(4));

        let missing = dir.path().join("nope.sock");
        let e = VhostUserDeviceConfig::parse(
            VhostUserDeviceKind::Block,
            &format!("socket={}", missing.display()),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        // In server mode the VMM creates the socket.
        let server = format!("socket={},server=on", missing.display());
        assert!(
            VhostUserDeviceConfig::parse(VhostUserDeviceKind::Block, &server)
                .unwrap()
                .server
        );
    }

    #[test]
    fn serial_modes() {
        assert_eq!(parse_serial("stdout"), Ok(SerialMode::Stdout));
        assert_eq!(parse_serial("off"), Ok(SerialMode::Off));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tty").is_err());
    }
}

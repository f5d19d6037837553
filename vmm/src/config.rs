//! VM configuration: the command line and its validation.
//!
//! Everything a user can get wrong is checked here, before any KVM call, so that a bad
//! configuration ends with one clear message instead of a half-built VM.

use std::path::PathBuf;

use clap::Parser;

/// Kind of vhost-user device.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
///
/// In `vm.create` JSON the same keys as on the command line; unknown keys are refused.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostUserDeviceConfig {
    /// What the daemon serves.
    pub kind: VhostUserDeviceKind,
    /// The daemon's unix socket.
    pub socket: PathBuf,
    /// VMM listens on `socket` and the daemon connects (daemon --client); default: VMM connects.
    #[serde(default)]
    pub server: bool,
    /// None: device default / what the backend offers (MQ).
    #[serde(default)]
    pub num_queues: Option<usize>,
    /// Ring size of each queue (default 256).
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// fs only (mandatory there).
    #[serde(default)]
    pub tag: Option<String>,
    /// net only, optional.
    #[serde(default)]
    pub mac: Option<String>,
}

fn default_queue_size() -> u16 {
    256
}

/// Where the guest's serial port (COM1) goes.
///
/// In JSON: `"stdout"`, `"off"` or `{"file": PATH}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialMode {
    /// Output to stdout; input from stdin (raw mode when it is a terminal).
    #[default]
    Stdout,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// No serial port.
    Off,
}

/// A VM configuration: from the command line ([`VmConfig::from_cli`]) or from `vm.create`
/// JSON (serde, then [`VmConfig::validate`] on the VM thread).
///
/// JSON keys are the field names; only `kernel` is required; unknown keys are refused;
/// `memory` and `max_memory` take bytes or a size string (`"512M"`) and are written as bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs at boot.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Largest vCPU count `vm.resize` may reach (None: `cpus`, no hot-plug).
    #[serde(default)]
    pub max_cpus: Option<u8>,
    /// Guest RAM in bytes.
    #[serde(default = "default_memory", deserialize_with = "de_memory")]
    pub memory: u64,
    /// Largest RAM `vm.resize` may reach, in bytes (None: `memory`, no hot-plug).
    #[serde(default, deserialize_with = "de_opt_memory")]
    pub max_memory: Option<u64>,
    /// Back guest RAM with huge pages (memfd MFD_HUGETLB).
    #[serde(default)]
    pub hugepages: bool,
    /// Serial console destination.
    #[serde(default)]
    pub serial: SerialMode,
    /// vhost-user devices, in PCI slot order.
    #[serde(default)]
    pub devices: Vec<VhostUserDeviceConfig>,
    /// A guest reboot ends the VMM (exit status 2) instead of restarting the VM.
    #[serde(default)]
    pub no_reboot: bool,
}

fn default_cmdline() -> String {
    "console=ttyS0".to_string()
}

fn default_cpus() -> u8 {
    1
}

fn default_memory() -> u64 {
    512 << 20
}

/// A memory size in JSON: bytes, or a string [`parse_memory_size`] accepts.
struct MemorySize;

impl serde::de::Visitor<'_> for MemorySize {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a size in bytes or a string such as \"512M\"")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
        check_memory_range(&v.to_string(), v).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            .and_then(|v| self.visit_u64(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
        parse_memory_size(v).map_err(E::custom)
    }
}

fn de_memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(MemorySize)
}

fn de_opt_memory<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            MemorySize.expecting(f)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            de_memory(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
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
    /// `--max-cpus` is below `--cpus` or out of range.
    #[error("--max-cpus {max} must be between --cpus ({cpus}) and {limit}", limit = MAX_CPUS)]
    MaxCpus {
        /// Boot vCPUs.
        cpus: u8,
        /// What was asked for.
        max: u32,
    },
    /// `--max-memory` is not `memory` plus a multiple of the hot-plug granule.
    #[error("--max-memory {max} must be at least --memory ({memory}) plus a multiple of {granule} MiB", granule = HOTPLUG_GRANULE >> 20)]
    MaxMemory {
        /// Boot RAM in bytes.
        memory: u64,
        /// What was asked for, in bytes.
        max: u64,
    },
    /// Neither `--kernel` nor `--api-socket` was given.
    #[error("--kernel is required (or start empty with --api-socket PATH)")]
    NoKernel,
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
/// RAM hot-plug works in multiples of this (Linux's x86_64 memory block size).
pub const HOTPLUG_GRANULE: u64 = 128 << 20;
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
    /// Serve the control API (HTTP/1.1 + JSON) on this Unix socket; without --kernel the vmm
    /// starts empty and waits for vm.create and vm.boot. `vmm remote --help` is the client.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Kernel: bzImage or ELF vmlinux (64-bit boot protocol).
    #[arg(long, value_name = "PATH", required_unless_present = "api_socket")]
    pub kernel: Option<PathBuf>,
    /// Initramfs (cpio, optionally compressed).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Largest vCPU count vm.resize may hot-plug to (default: --cpus).
    #[arg(long, value_name = "N")]
    pub max_cpus: Option<u32>,
    /// Guest RAM: a number with K/M/G/T suffix (a bare number is MiB).
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Largest RAM vm.resize may hot-plug to: --memory plus a multiple of 128 MiB.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
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
    check_memory_range(s, bytes)
}

/// `bytes` (written `s` by the user) if it is a usable RAM size.
fn check_memory_range(s: &str, bytes: u64) -> Result<u64, ConfigError> {
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
    /// Parse `key=value[,key=value]...` for a device of `kind`, then [`Self::validate`] it.
    pub fn parse(kind: VhostUserDeviceKind, s: &str) -> Result<Self, ConfigError> {
        let option = option_name(&kind);
        let err = |reason: String| ConfigError::Device {
            option,
            value: s.to_string(),
            reason,
        };
        let mut socket = None;
        let mut server = false;
        let mut num_queues = None;
        let mut queue_size = default_queue_size();
        let mut tag = None;
        let mut mac = None;
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| err(format!("'{item}' is not key=value")))?;
            match key {
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                "server" => {
                    server = match value {
                        "on" | "true" | "1" => true,
                        "off" | "false" | "0" => false,
                        _ => return Err(err(format!("server={value}: expected on or off"))),
                    }
                }
                "num_queues" => {
                    let n = value
                        .parse()
                        .map_err(|_| err(format!("num_queues={value}: expected 1..64")))?;
                    num_queues = Some(n);
                }
                "queue_size" => {
                    queue_size = value.parse().map_err(|_| {
                        err(format!(
                            "queue_size={value}: expected a power of two, 2..32768"
                        ))
                    })?;
                }
                "tag" => tag = Some(value.to_string()),
                "mac" => mac = Some(value.to_string()),
                _ => return Err(err(format!("unknown or misplaced option '{key}'"))),
            }
        }
        let socket = socket.ok_or_else(|| err("socket=PATH is required".to_string()))?;
        let device = Self {
            kind,
            socket,
            server,
            num_queues,
            queue_size,
            tag,
            mac,
        };
        device.check().map_err(err)?;
        Ok(device)
    }

    /// Check the settings (the same rules for the command line and `vm.create`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|reason| ConfigError::Device {
            option: option_name(&self.kind),
            value: format!("socket={}", self.socket.display()),
            reason,
        })
    }

    fn check(&self) -> Result<(), String> {
        let kind = &self.kind;
        if let Some(n) = self.num_queues {
            if *kind == VhostUserDeviceKind::Console {
                return Err("unknown or misplaced option 'num_queues'".to_string());
            }
            if !(1..=64).contains(&n) {
                return Err(format!("num_queues={n}: expected 1..64"));
            }
        }
        let q = self.queue_size;
        if !q.is_power_of_two() || !(2..=32768).contains(&q) {
            return Err(format!("queue_size={q}: expected a power of two, 2..32768"));
        }
        match (&self.tag, kind) {
            (Some(tag), VhostUserDeviceKind::Fs) if tag.is_empty() || tag.len() > 36 => {
                return Err("tag must be 1..36 bytes".to_string())
            }
            (Some(_), VhostUserDeviceKind::Fs) => {}
            (Some(_), _) => return Err("unknown or misplaced option 'tag'".to_string()),
            (None, VhostUserDeviceKind::Fs) => return Err("tag=TAG is required".to_string()),
            (None, _) => {}
        }
        if let Some(mac) = &self.mac {
            if *kind != VhostUserDeviceKind::Net {
                return Err("unknown or misplaced option 'mac'".to_string());
            }
            let ok = mac.split(':').count() == 6
                && mac
                    .split(':')
                    .all(|b| b.len() == 2 && u8::from_str_radix(b, 16).is_ok());
            if !ok {
                return Err(format!("mac={mac}: expected xx:xx:xx:xx:xx:xx"));
            }
        }
        if self.socket.as_os_str().is_empty() {
            return Err("socket=PATH is required".to_string());
        }
        if !self.server && !self.socket.exists() {
            return Err(format!(
                "socket {} does not exist (is the daemon running?)",
                self.socket.display()
            ));
        }
        Ok(())
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
            cmdline: default_cmdline(),
            cpus: default_cpus(),
            max_cpus: None,
            memory: default_memory(),
            max_memory: None,
            hugepages: false,
            serial: SerialMode::Stdout,
            devices: Vec::new(),
            no_reboot: false,
        }
    }

    /// Largest vCPU count (`max_cpus`, or `cpus` without hot-plug).
    pub fn max_vcpus(&self) -> u8 {
        self.max_cpus.unwrap_or(self.cpus).max(self.cpus)
    }

    /// Largest RAM size (`max_memory`, or `memory` without hot-plug).
    pub fn max_ram(&self) -> u64 {
        self.max_memory.unwrap_or(self.memory).max(self.memory)
    }

    /// Check everything a user can get wrong: sizes, files, devices.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || u32::from(self.cpus) > MAX_CPUS {
            return Err(ConfigError::Cpus {
                got: self.cpus.into(),
                max: MAX_CPUS,
            });
        }
        if let Some(max) = self.max_cpus {
            if max < self.cpus || u32::from(max) > MAX_CPUS {
                return Err(ConfigError::MaxCpus {
                    cpus: self.cpus,
                    max: max.into(),
                });
            }
        }
        let shown = |b: u64| format!("{} MiB", b >> 20);
        check_memory_range(&shown(self.memory), self.memory)?;
        if self.hugepages && !self.memory.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(ConfigError::MemoryRange(
                shown(self.memory),
                "must be a multiple of 2 MiB with --hugepages",
            ));
        }
        if let Some(max) = self.max_memory {
            if max < self.memory
                || !(max - self.memory).is_multiple_of(HOTPLUG_GRANULE)
                || max > MAX_MEMORY
            {
                return Err(ConfigError::MaxMemory {
                    memory: self.memory,
                    max,
                });
            }
        }
        check_readable(&self.kernel).map_err(|e| ConfigError::Kernel(self.kernel.clone(), e))?;
        if let Some(initramfs) = &self.initramfs {
            check_readable(initramfs).map_err(|e| ConfigError::Initramfs(initramfs.clone(), e))?;
        }
        if self.cmdline.len() >= crate::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        for d in &self.devices {
            d.validate()?;
        }
        Ok(())
    }

    /// Build and validate the configuration the command line describes (`--kernel` given).
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let kernel = cli.kernel.clone().ok_or(ConfigError::NoKernel)?;
        if cli.cpus == 0 || cli.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus {
                got: cli.cpus,
                max: MAX_CPUS,
            });
        }
        let max_cpus = match cli.max_cpus {
            Some(max) if max < cli.cpus || max > MAX_CPUS => {
                return Err(ConfigError::MaxCpus {
                    cpus: cli.cpus as u8,
                    max,
                })
            }
            max => max.map(|m| m as u8),
        };
        let memory = parse_memory_size(&cli.memory)?;
        if cli.hugepages && !memory.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(ConfigError::MemoryRange(
                cli.memory,
                "must be a multiple of 2 MiB with --hugepages",
            ));
        }
        let max_memory = cli
            .max_memory
            .as_deref()
            .map(parse_memory_size)
            .transpose()?;
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
        let config = Self {
            kernel,
            initramfs: cli.initramfs,
            cmdline: cli.cmdline,
            cpus: cli.cpus as u8,
            max_cpus,
            memory,
            max_memory,
            hugepages: cli.hugepages,
            serial: parse_serial(&cli.serial)?,
            devices,
            no_reboot: cli.no_reboot,
        };
        config.validate()?;
        Ok(config)
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

//! The command line (Cloud Hypervisor's syntax for the options we share) and the JSON
//! config file with the same settings; both become a [`vmm::VmConfig`].

use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;
use virtio::block::IoEngineKind;
use vmm::{
    DiskConfig, IrqchipMode, LandlockAccess, LandlockConfig, LandlockRule, NetConfig,
    PlatformConfig, SeccompMode, SerialConfig, VmConfig,
};

/// A user error in the command line or config file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("--kernel is required (on the command line or in the --config file)")]
    NoKernel,
    #[error("{option}: unknown parameter '{key}' (expected {expected})")]
    UnknownKey {
        option: &'static str,
        key: String,
        expected: &'static str,
    },
    #[error("{option}: '{value}' is not a valid {what}")]
    BadValue {
        option: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("{option}: '{key}' is given more than once")]
    RepeatedKey { option: &'static str, key: String },
    #[error("--serial: '{0}' is not one of tty, off, null, file=PATH")]
    BadSerial(String),
    #[error("--config {path}: {reason}")]
    ConfigFile { path: String, reason: String },
}

#[derive(Parser, Debug, Default)]
#[command(
    name = "vireo",
    version,
    about = "A virtual machine monitor on Linux KVM"
)]
pub struct Cli {
    /// Kernel image: an ELF vmlinux (booted through its PVH entry when it has one) or a bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial RAM disk handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// vCPUs: boot=N (1 to 254; default 1).
    #[arg(long, value_name = "boot=N")]
    pub cpus: Option<String>,
    /// Guest RAM: size=SIZE with a K, M or G suffix (default 512M)[,thp=on|off] (transparent
    /// huge pages, default on).
    #[arg(long, value_name = "size=SIZE[,thp=on|off]")]
    pub memory: Option<String>,
    /// Guest console (COM1): tty (stdin/stdout), off, or file=PATH (default tty).
    #[arg(long, value_name = "tty|off|file=PATH")]
    pub serial: Option<String>,
    /// A virtio-blk disk on a raw image: path=FILE[,readonly=on][,direct=on][,id=ID];
    /// repeatable.
    #[arg(long, value_name = "path=FILE,...")]
    pub disk: Vec<String>,
    /// A virtio-net interface on a host tap: tap=NAME[,mac=MAC][,ip=IP,mask=MASK] (with ip,
    /// a missing tap is created and given that host address); repeatable.
    #[arg(long, value_name = "tap=NAME,...")]
    pub net: Vec<String>,
    /// Platform options: virtio_mmio_cmdline=on also lists virtio-mmio devices on the
    /// kernel command line (they are always in the ACPI DSDT).
    #[arg(long, value_name = "virtio_mmio_cmdline=on|off")]
    pub platform: Option<String>,
    /// JSON file with the same settings; options given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// seccomp filters on every thread: true (a forbidden system call ends vireo), log (the
    /// kernel logs it and lets it through) or false (default true).
    #[arg(long, value_name = "true|false|log")]
    pub seccomp: Option<String>,
    /// Landlock: once set-up is done, the process reaches only the files it was given
    /// (kernel, initramfs, disks, console file, /dev/kvm, /dev/net/tun) and the paths of
    /// --landlock-rules: on or off (default on where the kernel has Landlock).
    #[arg(long, value_name = "on|off", num_args = 0..=1, default_missing_value = "on")]
    pub landlock: Option<String>,
    /// A path the process may still reach under Landlock: path=P,access=read|rw; repeatable.
    #[arg(long, value_name = "path=P,access=read|rw")]
    pub landlock_rules: Vec<String>,
    /// Log level: error, warn, info, debug or trace (default info).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// The config file: `{"kernel": "...", "initramfs": "...", "cmdline": "...",
/// "cpus": {"boot": 2}, "memory": {"size": "1G"}, "serial": "tty" | "off" | "file=PATH"}`.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: Option<CpusFile>,
    memory: Option<MemoryFile>,
    serial: Option<String>,
    disks: Option<Vec<DiskFile>>,
    nets: Option<Vec<NetFile>>,
    platform: Option<PlatformFile>,
    seccomp: Option<SeccompValue>,
    landlock: Option<bool>,
    landlock_rules: Option<Vec<LandlockRuleFile>>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct LandlockRuleFile {
    path: PathBuf,
    access: String,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum SeccompValue {
    Switch(bool),
    Text(String),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct NetFile {
    tap: String,
    mac: Option<String>,
    ip: Option<String>,
    mask: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    path: PathBuf,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    direct: bool,
    id: Option<String>,
    io_engine: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct PlatformFile {
    #[serde(default)]
    virtio_mmio_cmdline: bool,
    irqchip: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct CpusFile {
    boot: u64,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MemoryFile {
    size: Option<SizeValue>,
    thp: Option<bool>,
}

#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

pub const DEFAULT_VCPUS: u8 = 1;
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Parses "512M", "1G", "4096", "64K" (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match &s[i..] {
                "K" | "k" | "KiB" => 1 << 10,
                "M" | "m" | "MiB" => 1 << 20,
                "G" | "g" | "GiB" => 1 << 30,
                "T" | "t" | "TiB" => 1 << 40,
                _ => return None,
            };
            (&s[..i], mult)
        }
    };
    if digits.is_empty() {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// Splits "a=1,b=2" into pairs, refusing keys not in `allowed` and keys given twice (the
/// second would silently override the first).
fn key_values<'a>(
    option: &'static str,
    s: &'a str,
    allowed: &'static [&'static str],
    expected: &'static str,
) -> Result<Vec<(&'a str, &'a str)>, CliError> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for p in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        if !allowed.contains(&k) {
            return Err(CliError::UnknownKey {
                option,
                key: k.to_string(),
                expected,
            });
        }
        if pairs.iter().any(|(seen, _)| *seen == k) {
            return Err(CliError::RepeatedKey {
                option,
                key: k.to_string(),
            });
        }
        pairs.push((k, v));
    }
    Ok(pairs)
}

/// The log levels `--log-level` takes (anything else would be read as a filter directive
/// that matches nothing and silently turns logging off).
pub fn parse_log_level(s: &str) -> Result<&'static str, CliError> {
    ["off", "error", "warn", "info", "debug", "trace"]
        .into_iter()
        .find(|l| l.eq_ignore_ascii_case(s))
        .ok_or_else(|| CliError::BadValue {
            option: "--log-level",
            value: s.to_string(),
            what: "log level (off, error, warn, info, debug, trace)",
        })
}

fn io_engine(v: &str) -> Result<IoEngineKind, CliError> {
    match v {
        "auto" => Ok(IoEngineKind::Auto),
        "io_uring" => Ok(IoEngineKind::Uring),
        "sync" => Ok(IoEngineKind::Sync),
        _ => Err(CliError::BadValue {
            option: "--disk io_engine",
            value: v.to_string(),
            what: "I/O engine (auto, io_uring or sync)",
        }),
    }
}

pub fn parse_cpus(s: &str) -> Result<u8, CliError> {
    let mut boot = DEFAULT_VCPUS;
    for (_, v) in key_values("--cpus", s, &["boot"], "boot=N")? {
        let n: u64 = v.parse().map_err(|_| CliError::BadValue {
            option: "--cpus",
            value: v.to_string(),
            what: "vCPU count",
        })?;
        boot = vcpu_count(n)?;
    }
    Ok(boot)
}

fn vcpu_count(n: u64) -> Result<u8, CliError> {
    // Range checks with the message users expect live in VmConfig::validate; here only
    // make sure the number survives the conversion.
    u8::try_from(n).map_err(|_| CliError::BadValue {
        option: "--cpus",
        value: n.to_string(),
        what: "vCPU count (1 to 254)",
    })
}

/// `--memory size=SIZE[,thp=on|off]` → (bytes, transparent huge pages).
pub fn parse_memory(s: &str) -> Result<(u64, bool), CliError> {
    let (mut size, mut thp) = (DEFAULT_MEMORY, true);
    for (k, v) in key_values("--memory", s, &["size", "thp"], "size=SIZE[,thp=on|off]")? {
        if k == "thp" {
            thp = on_off("--memory thp", v)?;
            continue;
        }
        size = parse_size(v).ok_or_else(|| CliError::BadValue {
            option: "--memory",
            value: v.to_string(),
            what: "size (a number with an optional K, M or G suffix)",
        })?;
    }
    Ok((size, thp))
}

fn on_off(option: &'static str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(CliError::BadValue {
            option,
            value: v.to_string(),
            what: "switch (on or off)",
        }),
    }
}

pub fn parse_disk(s: &str) -> Result<DiskConfig, CliError> {
    let mut path = None;
    let (mut readonly, mut direct, mut id) = (false, false, None);
    let mut engine = IoEngineKind::default();
    for (k, v) in key_values(
        "--disk",
        s,
        &["path", "readonly", "direct", "id", "io_engine"],
        "path=FILE[,readonly=on][,direct=on][,id=ID][,io_engine=auto|io_uring|sync]",
    )? {
        match k {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "readonly" => readonly = on_off("--disk readonly", v)?,
            "direct" => direct = on_off("--disk direct", v)?,
            "id" => id = Some(v.to_string()),
            "io_engine" => engine = io_engine(v)?,
            _ => {
                return Err(CliError::BadValue {
                    option: "--disk",
                    value: s.to_string(),
                    what: "disk (path=FILE is required)",
                })
            }
        }
    }
    let path = path.ok_or_else(|| CliError::BadValue {
        option: "--disk",
        value: s.to_string(),
        what: "disk (path=FILE is required)",
    })?;
    Ok(DiskConfig {
        path,
        readonly,
        direct,
        id,
        io_engine: engine,
    })
}

fn net_config(
    tap: Option<&str>,
    mac: Option<&str>,
    ip: Option<&str>,
    mask: Option<&str>,
    whole: &str,
) -> Result<NetConfig, CliError> {
    let bad = |what: &'static str, value: &str| CliError::BadValue {
        option: "--net",
        value: value.to_string(),
        what,
    };
    let tap = match tap {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => return Err(bad("interface (tap=NAME is required)", whole)),
    };
    let mac = match mac {
        Some(m) => Some(
            virtio::net::tap::parse_mac(m)
                .ok_or_else(|| bad("MAC address (unicast, aa:bb:cc:dd:ee:ff)", m))?,
        ),
        None => None,
    };
    let ip = match (ip, mask) {
        (Some(ip), Some(mask)) => Some((
            ip.parse().map_err(|_| bad("IPv4 address", ip))?,
            mask.parse().map_err(|_| bad("IPv4 netmask", mask))?,
        )),
        (None, None) => None,
        _ => return Err(bad("interface (ip= and mask= go together)", whole)),
    };
    Ok(NetConfig { tap, mac, ip })
}

pub fn parse_net(s: &str) -> Result<NetConfig, CliError> {
    let (mut tap, mut mac, mut ip, mut mask) = (None, None, None, None);
    for (k, v) in key_values(
        "--net",
        s,
        &["tap", "mac", "ip", "mask"],
        "tap=NAME[,mac=MAC][,ip=IP,mask=MASK]",
    )? {
        match k {
            "tap" => tap = Some(v),
            "mac" => mac = Some(v),
            "ip" => ip = Some(v),
            _ => mask = Some(v),
        }
    }
    net_config(tap, mac, ip, mask, s)
}

fn irqchip(v: &str) -> Result<IrqchipMode, CliError> {
    match v {
        "split" => Ok(IrqchipMode::Split),
        "kernel" => Ok(IrqchipMode::Kernel),
        _ => Err(CliError::BadValue {
            option: "--platform irqchip",
            value: v.to_string(),
            what: "irqchip (split or kernel)",
        }),
    }
}

pub fn parse_platform(s: &str) -> Result<PlatformConfig, CliError> {
    let mut p = PlatformConfig::default();
    for (k, v) in key_values(
        "--platform",
        s,
        &["virtio_mmio_cmdline", "irqchip"],
        "virtio_mmio_cmdline=on|off,irqchip=split|kernel",
    )? {
        match k {
            "irqchip" => p.irqchip = irqchip(v)?,
            _ => p.virtio_mmio_cmdline = on_off("--platform virtio_mmio_cmdline", v)?,
        }
    }
    Ok(p)
}

fn landlock_access(v: &str) -> Result<LandlockAccess, CliError> {
    match v {
        "read" => Ok(LandlockAccess::Read),
        "rw" => Ok(LandlockAccess::ReadWrite),
        _ => Err(CliError::BadValue {
            option: "--landlock-rules access",
            value: v.to_string(),
            what: "access (read or rw)",
        }),
    }
}

pub fn parse_landlock_rule(s: &str) -> Result<LandlockRule, CliError> {
    let (mut path, mut access) = (None, None);
    for (k, v) in key_values(
        "--landlock-rules",
        s,
        &["path", "access"],
        "path=P,access=read|rw",
    )? {
        match k {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "access" => access = Some(landlock_access(v)?),
            _ => {}
        }
    }
    match (path, access) {
        (Some(path), Some(access)) => Ok(LandlockRule { path, access }),
        _ => Err(CliError::BadValue {
            option: "--landlock-rules",
            value: s.to_string(),
            what: "rule (path=P,access=read|rw)",
        }),
    }
}

pub fn parse_seccomp(s: &str) -> Result<SeccompMode, CliError> {
    match s {
        "true" | "on" => Ok(SeccompMode::Enforce),
        "false" | "off" => Ok(SeccompMode::Off),
        "log" => Ok(SeccompMode::Log),
        _ => Err(CliError::BadValue {
            option: "--seccomp",
            value: s.to_string(),
            what: "seccomp mode (true, false or log)",
        }),
    }
}

pub fn parse_serial(s: &str) -> Result<SerialConfig, CliError> {
    match s {
        "tty" => Ok(SerialConfig::Tty),
        "off" | "null" => Ok(SerialConfig::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(CliError::BadSerial(s.to_string())),
        },
    }
}

pub fn parse_config_file(path: &std::path::Path, text: &str) -> Result<ConfigFile, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::ConfigFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

impl Cli {
    /// Merges the config file (if any) under the command line and builds the VM config.
    pub fn into_vm_config(self, file: Option<ConfigFile>) -> Result<VmConfig, CliError> {
        let file = file.unwrap_or_default();
        let kernel = self.kernel.or(file.kernel).ok_or(CliError::NoKernel)?;
        let vcpus = match (&self.cpus, &file.cpus) {
            (Some(s), _) => parse_cpus(s)?,
            (None, Some(c)) => vcpu_count(c.boot)?,
            (None, None) => DEFAULT_VCPUS,
        };
        let (memory_size, memory_thp) = match (&self.memory, &file.memory) {
            (Some(s), _) => parse_memory(s)?,
            (None, Some(m)) => {
                let size = match &m.size {
                    Some(SizeValue::Bytes(b)) => *b,
                    Some(SizeValue::Text(t)) => {
                        parse_size(t).ok_or_else(|| CliError::BadValue {
                            option: "memory.size",
                            value: t.clone(),
                            what: "size (a number with an optional K, M or G suffix)",
                        })?
                    }
                    None => DEFAULT_MEMORY,
                };
                (size, m.thp.unwrap_or(true))
            }
            (None, None) => (DEFAULT_MEMORY, true),
        };
        let serial = match self.serial.as_deref().or(file.serial.as_deref()) {
            Some(s) => parse_serial(s)?,
            None => SerialConfig::Tty,
        };
        let disks = if !self.disk.is_empty() {
            self.disk
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            file.disks
                .unwrap_or_default()
                .into_iter()
                .map(|d| {
                    Ok(DiskConfig {
                        io_engine: d
                            .io_engine
                            .as_deref()
                            .map(io_engine)
                            .transpose()?
                            .unwrap_or_default(),
                        path: d.path,
                        readonly: d.readonly,
                        direct: d.direct,
                        id: d.id,
                    })
                })
                .collect::<Result<Vec<_>, CliError>>()?
        };
        let nets = if !self.net.is_empty() {
            self.net
                .iter()
                .map(|n| parse_net(n))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            file.nets
                .unwrap_or_default()
                .iter()
                .map(|n| {
                    net_config(
                        Some(&n.tap),
                        n.mac.as_deref(),
                        n.ip.as_deref(),
                        n.mask.as_deref(),
                        &n.tap,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let platform = match (&self.platform, &file.platform) {
            (Some(s), _) => parse_platform(s)?,
            (None, Some(p)) => PlatformConfig {
                virtio_mmio_cmdline: p.virtio_mmio_cmdline,
                irqchip: p
                    .irqchip
                    .as_deref()
                    .map(irqchip)
                    .transpose()?
                    .unwrap_or_default(),
            },
            (None, None) => PlatformConfig::default(),
        };
        let seccomp = match (&self.seccomp, &file.seccomp) {
            (Some(s), _) => parse_seccomp(s)?,
            (None, Some(SeccompValue::Switch(true))) => SeccompMode::Enforce,
            (None, Some(SeccompValue::Switch(false))) => SeccompMode::Off,
            (None, Some(SeccompValue::Text(t))) => parse_seccomp(t)?,
            (None, None) => SeccompMode::default(),
        };
        let enabled = match (&self.landlock, file.landlock) {
            (Some(v), _) => on_off("--landlock", v)?,
            (None, Some(b)) => b,
            (None, None) => true,
        };
        let rules = if !self.landlock_rules.is_empty() {
            self.landlock_rules
                .iter()
                .map(|r| parse_landlock_rule(r))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            file.landlock_rules
                .unwrap_or_default()
                .into_iter()
                .map(|r| {
                    Ok(LandlockRule {
                        path: r.path,
                        access: landlock_access(&r.access)?,
                    })
                })
                .collect::<Result<Vec<_>, CliError>>()?
        };
        Ok(VmConfig {
            landlock: LandlockConfig { enabled, rules },
            seccomp,
            kernel,
            initramfs: self.initramfs.or(file.initramfs),
            cmdline: self.cmdline.or(file.cmdline).unwrap_or_default(),
            vcpus,
            memory_size,
            memory_thp,
            serial,
            disks,
            nets,
            platform,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vireo").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("6GiB"), Some(6 << 30));
        for bad in ["", "M", "12X", "1.5G", "-1G", "99999999999999999999G"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn defaults() {
        let c = cli(&["--kernel", "k"]).into_vm_config(None).unwrap();
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.memory_size, 512 << 20);
        assert!(c.memory_thp);
        assert_eq!(c.serial, SerialConfig::Tty);
        assert_eq!(c.cmdline, "");
        assert_eq!(c.initramfs, None);
    }

    #[test]
    fn all_options() {
        let c = cli(&[
            "--kernel",
            "k",
            "--initramfs",
            "i",
            "--cmdline",
            "a b",
            "--cpus",
            "boot=4",
            "--memory",
            "size=1G",
            "--serial",
            "file=/tmp/x",
        ])
        .into_vm_config(None)
        .unwrap();
        assert_eq!(c.vcpus, 4);
        assert_eq!(c.memory_size, 1 << 30);
        assert_eq!(parse_memory("size=2G,thp=off"), Ok((2 << 30, false)));
        assert!(parse_memory("size=2G,thp=maybe").is_err());
        assert_eq!(c.cmdline, "a b");
        assert_eq!(c.initramfs, Some(PathBuf::from("i")));
        assert_eq!(c.serial, SerialConfig::File("/tmp/x".into()));
    }

    #[test]
    fn bad_options_name_the_problem() {
        let e = cli(&["--kernel", "k", "--cpus", "max=4"])
            .into_vm_config(None)
            .unwrap_err();
        assert!(matches!(e, CliError::UnknownKey { key, .. } if key == "max"));
        let e = cli(&["--kernel", "k", "--cpus", "boot=x"])
            .into_vm_config(None)
            .unwrap_err();
        assert!(e.to_string().contains("--cpus"));
        let e = cli(&["--kernel", "k", "--cpus", "boot=300"])
            .into_vm_config(None)
            .unwrap_err();
        assert!(e.to_string().contains("300"));
        let e = cli(&["--kernel", "k", "--memory", "size=lots"])
            .into_vm_config(None)
            .unwrap_err();
        assert!(e.to_string().contains("lots"));
        let e = cli(&["--kernel", "k", "--serial", "pty"])
            .into_vm_config(None)
            .unwrap_err();
        assert_eq!(e, CliError::BadSerial("pty".into()));
        assert_eq!(
            cli(&[]).into_vm_config(None).unwrap_err(),
            CliError::NoKernel
        );
        assert!(parse_serial("file=").is_err());
        assert_eq!(parse_serial("null").unwrap(), SerialConfig::Off);
    }

    #[test]
    fn config_file_gives_the_same_settings() {
        let path = std::path::Path::new("vm.json");
        let f = parse_config_file(
            path,
            r#"{"kernel": "k", "initramfs": "i", "cmdline": "c", "cpus": {"boot": 2},
                "memory": {"size": "128M"}, "serial": "off"}"#,
        )
        .unwrap();
        let c = Cli::default().into_vm_config(Some(f)).unwrap();
        assert_eq!(c.kernel, PathBuf::from("k"));
        assert_eq!(c.initramfs, Some(PathBuf::from("i")));
        assert_eq!((c.vcpus, c.memory_size), (2, 128 << 20));
        assert_eq!(c.serial, SerialConfig::Off);
        assert_eq!(c.cmdline, "c");

        let f = parse_config_file(path, r#"{"kernel": "k", "memory": {"size": 1048576}}"#).unwrap();
        assert_eq!(
            Cli::default().into_vm_config(Some(f)).unwrap().memory_size,
            1 << 20
        );
    }

    #[test]
    fn command_line_overrides_config_file() {
        let f = parse_config_file(
            std::path::Path::new("vm.json"),
            r#"{"kernel": "k", "cpus": {"boot": 2}}"#,
        )
        .unwrap();
        let c = cli(&["--cpus", "boot=3"]).into_vm_config(Some(f)).unwrap();
        assert_eq!(c.vcpus, 3);
    }

    #[test]
    fn disks_and_platform() {
        let c = cli(&[
            "--kernel",
            "k",
            "--disk",
            "path=/a.img",
            "--disk",
            "path=/b.img,readonly=on,direct=on,id=disk-b",
            "--platform",
            "virtio_mmio_cmdline=on",
        ])
        .into_vm_config(None)
        .unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, PathBuf::from("/a.img"));
        assert!(!c.disks[0].readonly && !c.disks[0].direct && c.disks[0].id.is_none());
        assert!(c.disks[1].readonly && c.disks[1].direct);
        assert_eq!(c.disks[1].id.as_deref(), Some("disk-b"));
        assert!(c.platform.virtio_mmio_cmdline);
        for bad in [
            "readonly=on",
            "path=/a,readonly=maybe",
            "path=/a,cache=none",
            "",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert!(parse_platform("virtio_mmio_cmdline=yes").is_err());
        let f = parse_config_file(
            std::path::Path::new("vm.json"),
            r#"{"kernel": "k", "disks": [{"path": "/a.img", "readonly": true, "id": "x"}],
                "platform": {"virtio_mmio_cmdline": true}}"#,
        )
        .unwrap();
        let c = Cli::default().into_vm_config(Some(f)).unwrap();
        assert!(c.disks[0].readonly && c.platform.virtio_mmio_cmdline);
    }

    #[test]
    fn nets() {
        let c = cli(&[
            "--kernel",
            "k",
            "--net",
            "tap=vtap0",
            "--net",
            "tap=vtap1,mac=02:00:00:00:00:01,ip=10.9.0.1,mask=255.255.255.0",
        ])
        .into_vm_config(None)
        .unwrap();
        assert_eq!(c.nets.len(), 2);
        assert_eq!(c.nets[0].tap, "vtap0");
        assert_eq!(c.nets[1].mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(
            c.nets[1].ip,
            Some((
                "10.9.0.1".parse().unwrap(),
                "255.255.255.0".parse().unwrap()
            ))
        );
        for bad in [
            "mac=02:00:00:00:00:01",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=zz",
            "tap=t,ip=10.0.0.1",
            "tap=t,ip=300.0.0.1,mask=255.0.0.0",
            "tap=t,vhost=on",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        let f = parse_config_file(
            std::path::Path::new("vm.json"),
            r#"{"kernel": "k", "nets": [{"tap": "t0", "mac": "02:01:02:03:04:05"}]}"#,
        )
        .unwrap();
        let c = Cli::default().into_vm_config(Some(f)).unwrap();
        assert_eq!(c.nets[0].mac, Some([2, 1, 2, 3, 4, 5]));
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let p = std::path::Path::new("vm.json");
        for bad in [
            r#"{"kernel": 3}"#,
            r#"{"kernal": "k"}"#,
            "not json",
            r#"{"cpus": {"max": 2}}"#,
        ] {
            let e = parse_config_file(p, bad).unwrap_err();
            assert!(e.to_string().starts_with("--config vm.json:"), "{e}");
        }
    }
}

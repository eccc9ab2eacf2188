//! The slow group: real Linux kernels, as far as they run on this host (on PVM hosts a
//! stock kernel's ring-0 code is emulated; it boots for tens of seconds and cannot finish).
//! `cargo xtask test` runs these one at a time, after every build, with `--ignored`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const LINUX_TIMEOUT: Duration = Duration::from_secs(180);

/// The test kernel's boot is emulated instruction by instruction on PVM hosts: tens of
/// seconds to its device probes when the host is idle, more beside other work. The device
/// tests use one vCPU: with more vCPUs than host cores, Linux's stop_machine (its clocksource
/// switch) spins every vCPU and stops making progress on such hosts, under QEMU too.
const TEST_KERNEL_TIMEOUT: Duration = Duration::from_secs(360);

/// What vireo adds for PVM hosts (`noxsave clearcpuid=...`) is not repeated here: the tests
/// check that vireo's own additions and CPUID are enough. `panic=-1` makes a kernel that
/// finds no root file system reset the VM (vireo then exits) instead of spinning.
const TEST_KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1";

/// One boot of the test kernel: the console lines that matched each awaited pattern, with
/// the time since vireo started, and everything vireo printed.
struct LinuxBoot {
    seen: Vec<Option<(String, Duration)>>,
    patterns: Vec<String>,
    run: Finished,
}

impl LinuxBoot {
    /// Boots the test kernel with `args` and `cmdline` (after [`TEST_KERNEL_CMDLINE`]), waits
    /// until a line containing each of `patterns` has appeared (in any order), then ends
    /// vireo.
    fn run(test: &str, args: &[&str], cmdline: &str, patterns: &[&str]) -> Option<Self> {
        if !kvm_available(test) {
            return None;
        }
        let kernel = test_kernel();
        let cmdline = format!("{TEST_KERNEL_CMDLINE} {cmdline}");
        let mut all = vec!["--kernel", kernel.to_str().unwrap(), "--cmdline", &cmdline];
        all.extend_from_slice(args);
        let running = spawn(&all);
        let mut seen: Vec<Option<(String, Duration)>> = vec![None; patterns.len()];
        while seen.iter().any(Option::is_none) {
            let left = TEST_KERNEL_TIMEOUT.saturating_sub(running.elapsed());
            let Some(line) = running.wait_for_line(left, |_| true) else {
                break;
            };
            for (i, p) in patterns.iter().enumerate() {
                if seen[i].is_none() && line.contains(p) {
                    seen[i] = Some((line.clone(), running.elapsed()));
                }
            }
        }
        let run = running.kill();
        let boot = Self {
            seen,
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            run,
        };
        for (p, s) in boot.patterns.iter().zip(&boot.seen) {
            match s {
                Some((line, t)) => eprintln!("{test}: {:>6.1} s  {}", t.as_secs_f64(), line.trim()),
                None => eprintln!("{test}: never saw '{p}'"),
            }
        }
        Some(boot)
    }

    /// The line that matched `pattern`, or a failure showing the whole console.
    fn line(&self, pattern: &str) -> &str {
        let i = self
            .patterns
            .iter()
            .position(|p| p == pattern)
            .expect("pattern was awaited");
        match &self.seen[i] {
            Some((line, _)) => line,
            None => panic!(
                "Linux never printed '{pattern}' within {TEST_KERNEL_TIMEOUT:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                self.run.stdout, self.run.stderr
            ),
        }
    }

    fn console_has(&self, needle: &str) -> bool {
        self.run.stdout.contains(needle)
    }
}

/// A raw image with an MBR partition table: `parts` are (first sector, sectors), type 0x83.
fn write_mbr_image(path: &Path, sectors: u64, parts: &[(u32, u32)]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(sectors * 512).unwrap();
    let mut mbr = [0u8; 512];
    for (i, &(start, len)) in parts.iter().enumerate() {
        let e = &mut mbr[446 + 16 * i..462 + 16 * i];
        // CHS fields say "use the LBA fields" (the maximum CHS address).
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = 0x83;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::os::unix::fs::FileExt::write_all_at(&f, &mbr, 0).unwrap();
}

/// An ext4 file system filling a raw image.
fn write_ext4_image(path: &Path, sectors: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(sectors * 512)
        .unwrap();
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .expect("run mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4 failed");
}

#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_brings_up_4_cpus_with_our_acpi_tables_and_memory() {
    four_cpus(
        "linux_brings_up_4_cpus_with_our_acpi_tables_and_memory",
        &[],
    );
}

/// The same under KVM's in-kernel irqchip (the split irqchip is the default).
#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_brings_up_4_cpus_with_the_in_kernel_irqchip() {
    four_cpus(
        "linux_brings_up_4_cpus_with_the_in_kernel_irqchip",
        &["--platform", "irqchip=kernel"],
    );
}

fn four_cpus(test: &str, extra: &[&str]) {
    let mut args = vec!["--cpus", "boot=4", "--memory", "size=256M"];
    args.extend_from_slice(extra);
    let Some(boot) = LinuxBoot::run(
        test,
        &args,
        "",
        &[
            "ACPI: FACP",
            "ACPI: DSDT",
            "ACPI: APIC",
            "Memory: ",
            "Brought up 1 node, 4 CPUs",
        ],
    ) else {
        return;
    };
    for table in ["ACPI: FACP", "ACPI: DSDT", "ACPI: APIC"] {
        assert!(boot.line(table).contains("VIREO"), "{}", boot.line(table));
    }
    let up = boot.line("Brought up 1 node, 4 CPUs");
    let before_up = &boot.run.stdout[..boot.run.stdout.find(up).unwrap()];
    for bad in ["ACPI Error", "ACPI BIOS Error", "ACPI Warning"] {
        assert!(
            !before_up.contains(bad),
            "Linux complained about our ACPI tables:\n{before_up}"
        );
    }
    // "Memory: 228716K/261752K available (...)": the second figure is the RAM Linux found
    // in the e820 map; only the legacy hole below 1 MiB may be missing from --memory.
    let memory = boot.line("Memory: ");
    let total_kib: u64 = memory
        .split('/')
        .nth(1)
        .and_then(|s| s.split('K').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse {memory}"));
    let want = 256 * 1024;
    assert!(
        total_kib <= want && total_kib >= want - 1024,
        "Linux found {total_kib} KiB of RAM for --memory size=256M: {memory}"
    );
}

#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_reads_two_virtio_mmio_disks_found_through_acpi() {
    let dir = scratch("linux-acpi-disks");
    let parted = dir.join("parted.img");
    let rootfs = dir.join("rootfs.img");
    write_mbr_image(&parted, 16384, &[(2048, 4096), (6144, 8192)]);
    write_ext4_image(&rootfs, 8192);
    let parted_arg = format!("path={}", parted.display());
    let rootfs_arg = format!("path={},readonly=on", rootfs.display());
    let Some(boot) = LinuxBoot::run(
        "linux_reads_two_virtio_mmio_disks_found_through_acpi",
        &["--disk", &parted_arg, "--disk", &rootfs_arg],
        // `rw`: a read-only disk makes the kernel retry the mount read-only and say so.
        "root=/dev/vdb rootfstype=ext4 rw",
        &[
            "[vda] 16384 512-byte logical blocks",
            " vda: vda1 vda2",
            "[vdb] 8192 512-byte logical blocks",
            "VFS: Mounted root",
        ],
    ) else {
        return;
    };
    boot.line(" vda: vda1 vda2");
    boot.line("[vda] 16384 512-byte logical blocks");
    boot.line("[vdb] 8192 512-byte logical blocks");
    let mounted = boot.line("VFS: Mounted root");
    assert!(
        mounted.contains("(ext4 filesystem) readonly"),
        "the read-only disk was mounted writable: {mounted}"
    );
    // Found through the DSDT alone: command-line devices announce themselves.
    assert!(
        !boot.console_has("Registering device virtio-mmio"),
        "{}",
        boot.run.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_finds_virtio_mmio_disks_through_the_command_line() {
    let dir = scratch("linux-cmdline-disks");
    let parted = dir.join("parted.img");
    write_mbr_image(&parted, 16384, &[(2048, 4096), (6144, 8192)]);
    let parted_arg = format!("path={}", parted.display());
    // acpi=ht: Linux reads the MADT but runs no AML, so the DSDT's devices stay unseen and
    // the command line is the only way to the disk. (acpi=off would do too, but on PVM hosts
    // it leads the kernel into a ring-0 `fwait` the emulator rejects; see the test below.)
    let Some(boot) = LinuxBoot::run(
        "linux_finds_virtio_mmio_disks_through_the_command_line",
        &[
            "--disk",
            &parted_arg,
            "--platform",
            "virtio_mmio_cmdline=on",
        ],
        "acpi=ht",
        &[
            "Registering device virtio-mmio.0",
            "[vda] 16384 512-byte logical blocks",
            " vda: vda1 vda2",
        ],
    ) else {
        return;
    };
    boot.line("Registering device virtio-mmio.0");
    boot.line("[vda] 16384 512-byte logical blocks");
    boot.line(" vda: vda1 vda2");
    let _ = std::fs::remove_dir_all(dir);
}

/// A tap with a host address and a dnsmasq serving DHCP on it alone; both removed on drop.
struct DhcpServer {
    tap: String,
    dnsmasq: std::process::Child,
    dir: std::path::PathBuf,
}

impl DhcpServer {
    fn start(tap: &str, host: &str, range: (&str, &str)) -> Self {
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?} failed");
        };
        let _ = Command::new("ip")
            .args(["link", "del", tap])
            .stderr(Stdio::null())
            .status();
        ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ip(&["addr", "add", &format!("{host}/24"), "dev", tap]);
        ip(&["link", "set", tap, "up"]);
        let dir = scratch(&format!("dnsmasq-{tap}"));
        let dnsmasq = Command::new("dnsmasq")
            .arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--port=0")
            .arg(format!("--interface={tap}"))
            .arg("--bind-interfaces")
            .arg("--except-interface=lo")
            .arg(format!(
                "--dhcp-range={},{},255.255.255.0,1h",
                range.0, range.1
            ))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg("--pid-file")
            .arg("--user=root")
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq (dnsmasq-base)");
        Self {
            tap: tap.to_string(),
            dnsmasq,
            dir,
        }
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = Command::new("ip").args(["link", "del", &self.tap]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_configures_virtio_net_by_dhcp_with_our_mac() {
    dhcp("linux_configures_virtio_net_by_dhcp_with_our_mac", &[]);
}

/// The same under KVM's in-kernel irqchip.
#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_dhcp_with_the_in_kernel_irqchip() {
    dhcp(
        "linux_dhcp_with_the_in_kernel_irqchip",
        &["--platform", "irqchip=kernel"],
    );
}

fn dhcp(test: &str, extra: &[&str]) {
    if !kvm_available(test) {
        return;
    }
    let tap = "vrl-dhcp0";
    let _server = DhcpServer::start(tap, "10.231.7.1", ("10.231.7.50", "10.231.7.59"));
    let net = format!("tap={tap},mac=52:54:00:a7:0c:35");
    let mut args = vec!["--net", net.as_str()];
    args.extend_from_slice(extra);
    let Some(boot) = LinuxBoot::run(
        test,
        &args,
        "ip=dhcp",
        &["Got DHCP answer from 10.231.7.1", "hwaddr="],
    ) else {
        return;
    };
    let answer = boot.line("Got DHCP answer from 10.231.7.1");
    assert!(answer.contains("my address is 10.231.7.5"), "{answer}");
    let hw = boot.line("hwaddr=");
    assert!(hw.contains("hwaddr=52:54:00:a7:0c:35"), "{hw}");
    assert!(hw.contains("ipaddr=10.231.7.5"), "{hw}");
}

#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn debian_vmlinux_boots_through_pvh_to_its_banner() {
    if !kvm_available("debian_vmlinux_boots_through_pvh_to_its_banner") {
        return;
    }
    let vmlinux = debian_vmlinux();
    let running = spawn(&[
        "--kernel",
        vmlinux.to_str().unwrap(),
        "--cmdline",
        "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr",
        "--memory",
        "size=512M",
    ]);
    let started = std::time::Instant::now();
    let banner = running.wait_for_line(LINUX_TIMEOUT, |l| l.contains("Linux version"));
    let elapsed = started.elapsed();
    // Linux echoes its command line right after the banner.
    let cmdline = running.wait_for_line(LINUX_TIMEOUT, |l| l.contains("Command line:"));
    let run = running.kill();
    let banner = banner.unwrap_or_else(|| {
        panic!(
            "no 'Linux version' within {LINUX_TIMEOUT:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            run.stdout, run.stderr
        )
    });
    eprintln!("Linux banner after {elapsed:.1?}: {banner}");
    assert!(banner.contains("Linux version 6."), "{banner}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // On PVM hosts vireo hides what the CPUID mask cannot on the Linux command line.
        let cmdline = cmdline.unwrap_or_else(|| panic!("no command line echoed:\n{}", run.stdout));
        for word in arch::cpuid::PVM_LINUX_CMDLINE.split_whitespace() {
            assert!(cmdline.contains(word), "{word} missing from {cmdline}");
        }
    }
}

#[test]
#[ignore = "slow group: run by `cargo xtask test`"]
fn linux_emulator_failure_ends_vireo_with_one_line() {
    let test = "linux_emulator_failure_ends_vireo_with_one_line";
    if !kvm_available(test) {
        return;
    }
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("\n!!!!!!!! SKIPPED {test}: needs a PVM host, whose emulator rejects `fwait` !!!!!!!!\n");
        return;
    }
    // With acpi=off the test kernel reaches fpu__drop()'s `fwait` in ring 0 about a minute
    // in; the emulator cannot run it and KVM reports an internal error.
    let kernel = test_kernel();
    let cmdline = format!("{TEST_KERNEL_CMDLINE} acpi=off");
    let run = spawn(&["--kernel", kernel.to_str().unwrap(), "--cmdline", &cmdline])
        .finish(TEST_KERNEL_TIMEOUT);
    assert!(
        !run.timed_out && run.code == Some(1),
        "vireo did not end with status 1: code {:?}, timed out {}\n--- console ---\n{}\n--- stderr ---\n{}",
        run.code,
        run.timed_out,
        run.stdout,
        run.stderr
    );
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    let error = errors[0];
    eprintln!("{test}: after {:.1?}: {error}", run.elapsed);
    assert!(
        error.starts_with("vireo: error: vCPU 0: KVM internal error")
            && error.contains("instruction bytes 9b")
            && error.contains("guest RIP 0xffffffff"),
        "{error}"
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

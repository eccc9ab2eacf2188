//! Boots the probe guest in vireo and checks what the guest itself reports: boot protocol,
//! command line, memory map, ACPI tables, DSDT devices, CPUs, CPUID, initrd and exits.

mod common;

use common::*;

const MIB: u64 = 1 << 20;

fn probe_boot(kernel: &std::path::Path, extra_cmdline: &str, args: &[&str]) -> Finished {
    let cmdline = format!("probe.mode=boot {extra_cmdline}");
    let run = boot_probe(kernel, cmdline.trim(), args);
    run.assert_probe_ok();
    run
}

fn check_common_facts(run: &Finished, protocol: &str, vcpus: usize, mem: u64) {
    assert_eq!(
        run.field("probe: boot", "protocol").as_deref(),
        Some(protocol)
    );
    // One `rep outsb` of a whole line: each byte must reach the UART as its own access.
    assert!(
        run.lines()
            .any(|l| l == "probe: string-io rep-outsb=intact"),
        "string port I/O was not split into byte accesses:\n{}",
        run.stdout
    );
    // The memory map's RAM is what the layout promises for this size.
    assert_eq!(
        run.field("probe: memory", "ram"),
        Some(arch::layout::usable_ram(mem).to_string()),
        "{}",
        run.stdout
    );
    assert_eq!(
        run.field("probe: acpi checksums", "checksums").as_deref(),
        Some("ok")
    );
    for sig in ["RSD PTR", "XSDT", "FACP", "APIC", "DSDT"] {
        let sig_key = sig.split(' ').next().unwrap_or(sig);
        assert!(
            run.lines_with("probe: acpi table")
                .iter()
                .any(|l| l.contains(&format!("sig={sig_key}")) && l.contains("checksum=ok")),
            "table {sig} missing or bad:\n{}",
            run.stdout
        );
    }
    assert_eq!(run.field("probe: madt", "cpus"), Some(vcpus.to_string()));
    assert_eq!(run.field("probe: cpus", "running"), Some(vcpus.to_string()));
    assert_eq!(
        run.field("probe: cpus", "apic_ids").as_deref(),
        Some("distinct")
    );
    assert_eq!(
        run.field("probe: cpus", "madt_match").as_deref(),
        Some("yes")
    );
}

#[test]
fn pvh_boot_reports_everything_vireo_promised() {
    if !kvm_available("pvh_boot_reports_everything_vireo_promised") {
        return;
    }
    let run = probe_boot(&probe_elf(), "probe.exit=i8042", &[]);
    check_common_facts(&run, "pvh", 1, 512 * MIB);
    assert_eq!(
        run.line("probe: cmdline="),
        Some("probe: cmdline=probe.mode=boot probe.exit=i8042")
    );
    assert_eq!(run.line("probe: initrd"), Some("probe: initrd none"));
}

/// KVM's in-kernel PIC, IOAPIC and PIT instead of the split irqchip (the default).
#[test]
fn pvh_boot_with_the_in_kernel_irqchip() {
    if !kvm_available("pvh_boot_with_the_in_kernel_irqchip") {
        return;
    }
    let run = probe_boot(
        &probe_elf(),
        "",
        &["--platform", "irqchip=kernel", "--cpus", "boot=2"],
    );
    check_common_facts(&run, "pvh", 2, 512 * MIB);
}

#[test]
fn bzimage_boot_reports_the_same_facts() {
    if !kvm_available("bzimage_boot_reports_the_same_facts") {
        return;
    }
    let run = probe_boot(&probe_bzimage(), "", &["--cpus", "boot=2"]);
    check_common_facts(&run, "linux64", 2, 512 * MIB);
    assert_eq!(
        run.line("probe: cmdline="),
        Some("probe: cmdline=probe.mode=boot")
    );
    assert!(run.field("probe: acpi rsdp", "source").as_deref() == Some("bootparams"));
}

#[test]
fn dsdt_scanner_finds_com1_with_its_resources() {
    if !kvm_available("dsdt_scanner_finds_com1_with_its_resources") {
        return;
    }
    let run = probe_boot(&probe_elf(), "", &[]);
    let com1 = run
        .lines_with("probe: dsdt device")
        .into_iter()
        .find(|l| l.contains("hid=PNP0501"))
        .unwrap_or_else(|| panic!("no COM1 in the DSDT:\n{}", run.stdout))
        .to_string();
    assert!(com1.contains("name=COM1"), "{com1}");
    assert!(com1.contains("io=0x3f8-0x3ff"), "{com1}");
    assert!(com1.contains("irq=4"), "{com1}");
}

fn smp(n: usize) {
    let cpus = format!("boot={n}");
    let run = probe_boot(&probe_elf(), "", &["--cpus", &cpus]);
    check_common_facts(&run, "pvh", n, 512 * MIB);
    let cpu_lines = run.lines_with("probe: cpu index=");
    assert_eq!(cpu_lines.len(), n, "{}", run.stdout);
    let mut ids: Vec<u32> = cpu_lines
        .iter()
        .map(|l| field(l, "apic_id").unwrap().parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..n as u32).collect::<Vec<_>>());
    let core_bits = if n <= 1 {
        0
    } else {
        32 - ((n as u32) - 1).leading_zeros()
    };
    for l in cpu_lines {
        // Topology leaves agree with N on every CPU.
        assert_eq!(field(l, "leaf1_logical"), Some(n.to_string()), "{l}");
        assert_eq!(
            field(l, "leafb_core"),
            Some(format!("{core_bits}/{n}")),
            "{l}"
        );
        assert_eq!(field(l, "apic_id"), field(l, "x2apic_id"), "{l}");
    }
}

#[test]
fn smp_1_vcpu() {
    if kvm_available("smp_1_vcpu") {
        smp(1);
    }
}

#[test]
fn smp_2_vcpus() {
    if kvm_available("smp_2_vcpus") {
        smp(2);
    }
}

#[test]
fn smp_4_vcpus() {
    if kvm_available("smp_4_vcpus") {
        smp(4);
    }
}

#[test]
fn smp_8_vcpus() {
    if kvm_available("smp_8_vcpus") {
        smp(8);
    }
}

fn memory(size: &str, bytes: u64) {
    let arg = format!("size={size}");
    let run = probe_boot(&probe_elf(), "", &["--memory", &arg]);
    check_common_facts(&run, "pvh", 1, bytes);
    if bytes > arch::layout::MEM_32BIT_HOLE_START {
        // RAM past 3 GiB continues at 4 GiB.
        let high = format!(
            "base={:#x} size={:#x} type=1",
            arch::layout::RAM_64BIT_START,
            bytes - arch::layout::MEM_32BIT_HOLE_START
        );
        assert!(
            run.lines_with("probe: memory region")
                .iter()
                .any(|l| l.contains(&high)),
            "no region {high}:\n{}",
            run.stdout
        );
    }
}

#[test]
fn memory_128m() {
    if kvm_available("memory_128m") {
        memory("128M", 128 * MIB);
    }
}

#[test]
fn memory_1g() {
    if kvm_available("memory_1g") {
        memory("1G", 1024 * MIB);
    }
}

#[test]
fn memory_4g_skips_the_hole() {
    if kvm_available("memory_4g_skips_the_hole") {
        memory("4G", 4096 * MIB);
    }
}

#[test]
fn memory_6g_skips_the_hole() {
    if kvm_available("memory_6g_skips_the_hole") {
        memory("6G", 6144 * MIB);
    }
}

fn initrd(kernel: std::path::PathBuf, name: &str) {
    let dir = scratch(name);
    // Not a multiple of 8, so the hash's zero padding is exercised too.
    let bytes: Vec<u8> = (0..40_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let path = dir.join("initrd.img");
    std::fs::write(&path, &bytes).unwrap();
    let run = probe_boot(
        &kernel,
        "",
        &[
            "--initramfs",
            path.to_str().unwrap(),
            "--memory",
            "size=256M",
        ],
    );
    assert_eq!(
        run.field("probe: initrd", "size"),
        Some(bytes.len().to_string())
    );
    assert_eq!(
        run.field("probe: initrd", "fnv1a64w"),
        Some(format!("{:#018x}", fnv1a64w(&bytes))),
        "{}",
        run.stdout
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn initrd_reaches_a_pvh_guest_intact() {
    if kvm_available("initrd_reaches_a_pvh_guest_intact") {
        initrd(probe_elf(), "initrd-pvh");
    }
}

#[test]
fn initrd_reaches_a_bzimage_guest_intact() {
    if kvm_available("initrd_reaches_a_bzimage_guest_intact") {
        initrd(probe_bzimage(), "initrd-bz");
    }
}

/// What the guest sees of vireo's CPUID: KVM's hypervisor leaf, and on a PVM host the
/// features vireo hides. PVM applies the vCPU's CPUID to CX16 and RDTSCP but shows the guest
/// XSAVE, POPCNT, BMI1/2, ERMS and FSRM regardless (vireo then hides those from Linux guests
/// on their command line; the Linux group checks that).
#[test]
fn cpuid_seen_by_the_guest() {
    if !kvm_available("cpuid_seen_by_the_guest") {
        return;
    }
    let run = probe_boot(&probe_elf(), "", &[]);
    assert_eq!(
        run.field("probe: cpuid", "hypervisor").as_deref(),
        Some("1")
    );
    assert_eq!(
        run.field("probe: cpuid", "vendor").as_deref(),
        Some("KVMKVMKVM")
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        for feature in ["cx16", "rdtscp"] {
            assert_eq!(
                run.field("probe: cpuid", feature).as_deref(),
                Some("0"),
                "{feature} still visible to the guest on a PVM host:\n{}",
                run.line("probe: cpuid").unwrap_or("")
            );
        }
    }
}

#[test]
fn every_probe_exit_ends_vireo_with_status_0() {
    if !kvm_available("every_probe_exit_ends_vireo_with_status_0") {
        return;
    }
    for exit in ["i8042", "acpi-reset", "acpi-poweroff", "port:0xf4"] {
        let run = boot_probe(
            &probe_elf(),
            &format!("probe.mode=quick probe.exit={exit}"),
            &[],
        );
        assert!(
            run.code == Some(0) && run.lines().any(|l| l == "PROBE-OK"),
            "probe.exit={exit}: code {:?}\n{}\n{}",
            run.code,
            run.stdout,
            run.stderr
        );
    }
}

#[test]
fn sigterm_and_sigint_end_vireo_with_128_plus_signal() {
    if !kvm_available("sigterm_and_sigint_end_vireo_with_128_plus_signal") {
        return;
    }
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let elf = probe_elf();
        // The echo mode waits for console input that never comes.
        let running = spawn(&[
            "--kernel",
            elf.to_str().unwrap(),
            "--cmdline",
            "probe.mode=echo",
        ]);
        assert!(
            running
                .wait_for_line(PROBE_TIMEOUT, |l| l == "probe: echo ready")
                .is_some(),
            "the guest never got ready"
        );
        running.signal(sig);
        let run = running.finish(std::time::Duration::from_secs(20));
        assert_eq!(run.code, Some(code), "signal {sig}: {}", run.stderr);
    }
}

/// A guest instruction KVM cannot emulate, and a triple fault, each end the VM with one
/// line naming the exit (suberror and guest RIP for the internal error) and status 1.
#[test]
fn fatal_guest_exits_end_vireo_with_one_line_and_status_1() {
    if !kvm_available("fatal_guest_exits_end_vireo_with_one_line_and_status_1") {
        return;
    }
    let on_pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    for (mode, needle) in [
        (
            "fault-triple",
            "triple fault, KVM_EXIT_SHUTDOWN) at guest RIP 0x",
        ),
        (
            "fault-emulation",
            "KVM internal error, suberror 1 (instruction emulation failed",
        ),
    ] {
        // Only a software KVM backend refuses the ring-0 int3; hardware KVM delivers #BP.
        if mode == "fault-emulation" && !on_pvm {
            continue;
        }
        let run = boot_probe(&probe_elf(), &format!("probe.mode={mode}"), &[]);
        assert!(!run.timed_out, "{mode}: vireo hung\n{}", run.stderr);
        assert_eq!(run.code, Some(1), "{mode}: {}", run.stderr);
        let errors: Vec<&str> = run.stderr.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "{mode}: {}", run.stderr);
        assert!(errors[0].contains(needle), "{mode}: {}", errors[0]);
        assert!(errors[0].contains("guest RIP 0x"), "{mode}: {}", errors[0]);
        assert!(
            run.stdout.contains(&format!("probe: fault {}", &mode[6..])),
            "{}",
            run.stdout
        );
    }
}

//! The slow group: real Linux kernels, as far as they run on this host (on PVM hosts a
//! stock kernel's ring-0 code is emulated; it boots for tens of seconds and cannot finish).
//! `cargo xtask test` runs these one at a time, after every build, with `--ignored`.

mod common;

use std::time::Duration;

use common::*;

const LINUX_TIMEOUT: Duration = Duration::from_secs(180);

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

//! virtio-blk over virtio-mmio, checked from both sides: what the probe guest's own driver
//! reports, and what the host then finds in the image files.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;

const PATTERN_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The word the guest writes at disk byte offset `o`.
fn pattern(o: u64, seed: u64) -> u64 {
    o.wrapping_mul(PATTERN_MUL) ^ seed
}

fn image(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    sparse_image(dir, name, bytes)
}

fn disk_arg(p: &Path, extra: &str) -> String {
    format!("path={}{extra}", p.display())
}

/// Starts the probe guest with `disks`, extra vireo arguments and a probe command line.
fn blk_spawn(disks: &[String], extra: &[&str], cmdline: &str) -> Running {
    let elf = probe_elf();
    let mut args = vec![
        "--kernel".to_string(),
        elf.display().to_string(),
        "--cmdline".to_string(),
        cmdline.to_string(),
    ];
    for d in disks {
        args.push("--disk".into());
        args.push(d.clone());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn(&args)
}

fn blk_run(disks: &[String], cmdline: &str) -> Finished {
    blk_spawn(disks, &[], cmdline).finish(PROBE_TIMEOUT)
}

/// Checks the host file holds the guest's pattern over `[start, start + len)`.
fn assert_pattern(path: &Path, start: u64, len: u64, seed: u64) {
    let bytes = fs::read(path).unwrap();
    for o in (start..start + len).step_by(8) {
        let w = u64::from_le_bytes(bytes[o as usize..o as usize + 8].try_into().unwrap());
        assert_eq!(w, pattern(o, seed), "{}: word at {o:#x}", path.display());
    }
}

/// A pattern written and read back under KVM's in-kernel irqchip.
#[test]
fn guest_pattern_round_trip_with_the_in_kernel_irqchip() {
    if !kvm_available("guest_pattern_round_trip_with_the_in_kernel_irqchip") {
        return;
    }
    let dir = scratch("blk-kernel-irqchip");
    let img = image(&dir, "d0.img", 4 << 20);
    let run = blk_spawn(
        &[disk_arg(&img, "")],
        &["--platform", "irqchip=kernel"],
        "probe.mode=blk probe.blk.region=0:262144 probe.blk.seed=3",
    )
    .finish(PROBE_TIMEOUT);
    run.assert_probe_ok();
    assert_eq!(
        run.field("probe: blk disk=0 verify", "mismatches")
            .as_deref(),
        Some("0"),
        "{}",
        run.stdout
    );
    assert_pattern(&img, 0, 262144, 3);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn guest_pattern_lands_in_the_file_and_a_second_boot_verifies_it() {
    if !kvm_available("guest_pattern_lands_in_the_file_and_a_second_boot_verifies_it") {
        return;
    }
    let dir = scratch("blk-integrity");
    let img = image(&dir, "d0.img", 8 << 20);
    let region = (1 << 20, 1 << 20);
    let cmd = format!(
        "probe.mode=blk probe.blk.region={}:{} probe.blk.seed=7",
        region.0, region.1
    );
    let run = blk_run(&[disk_arg(&img, "")], &cmd);
    run.assert_probe_ok();
    assert_eq!(
        run.field("probe: blk disk=0 verify", "mismatches")
            .as_deref(),
        Some("0"),
        "{}",
        run.stdout
    );
    assert_eq!(
        run.field("probe: blk disk=0 flush", "status").as_deref(),
        Some("ok")
    );
    let inflight: u32 = run
        .field("probe: blk disk=0 write", "inflight_max")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(inflight > 1, "the guest never had two requests in flight");
    // Without `id=`, GET_ID answers the image's device and inode numbers in hex.
    let meta = fs::metadata(&img).unwrap();
    let mut want = {
        use std::os::unix::fs::MetadataExt;
        format!("{:x}{:x}{:x}", meta.dev(), meta.rdev(), meta.ino())
    };
    want.truncate(20);
    assert_eq!(
        run.field("probe: blk disk=0 id", "id").as_deref(),
        Some(want.as_str())
    );
    assert_pattern(&img, region.0, region.1, 7);
    // Nothing outside the region (and the discard/zero range after it) was written.
    let bytes = fs::read(&img).unwrap();
    assert!(bytes[..region.0 as usize].iter().all(|&b| b == 0));

    let run = blk_run(
        &[disk_arg(&img, "")],
        &format!("{cmd} probe.blk.verify-only=1"),
    );
    run.assert_probe_ok();
    assert_eq!(
        run.field("probe: blk disk=0 verify", "mismatches")
            .as_deref(),
        Some("0"),
        "{}",
        run.stdout
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn flushed_data_is_in_the_file_even_if_vireo_is_killed() {
    if !kvm_available("flushed_data_is_in_the_file_even_if_vireo_is_killed") {
        return;
    }
    let dir = scratch("blk-flush");
    let img = image(&dir, "d0.img", 4 << 20);
    let running = blk_spawn(
        &[disk_arg(&img, "")],
        &[],
        "probe.mode=blk probe.blk.region=0:131072 probe.blk.seed=3",
    );
    let flushed = running.wait_for_line(PROBE_TIMEOUT, |l| l.contains("flush status="));
    let run = running.kill();
    let flushed = flushed.unwrap_or_else(|| panic!("no flush line:\n{}", run.stdout));
    assert!(flushed.ends_with("status=ok"), "{flushed}");
    assert_pattern(&img, 0, 131072, 3);
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn two_disks_are_found_with_their_sizes_and_ids() {
    if !kvm_available("two_disks_are_found_with_their_sizes_and_ids") {
        return;
    }
    let dir = scratch("blk-two");
    let a = image(&dir, "a.img", 8 << 20);
    let b = image(&dir, "b.img", (4 << 20) + 100);
    let run = blk_run(
        &[disk_arg(&a, ",id=disk-a"), disk_arg(&b, ",id=disk-b")],
        "probe.mode=blk probe.blk.region=0:65536",
    );
    run.assert_probe_ok();
    assert_eq!(
        run.field("probe: virtio devices", "devices").as_deref(),
        Some("2")
    );
    assert_eq!(run.lines_with("probe: virtio device source=dsdt").len(), 2);
    assert_eq!(
        run.field("probe: blk disk=0 base", "capacity").as_deref(),
        Some("16384")
    );
    // Not a multiple of 512: rounded down.
    assert_eq!(
        run.field("probe: blk disk=1 base", "capacity").as_deref(),
        Some("8192")
    );
    assert_eq!(
        run.field("probe: blk disk=0 id", "id").as_deref(),
        Some("disk-a")
    );
    assert_eq!(
        run.field("probe: blk disk=1 id", "id").as_deref(),
        Some("disk-b")
    );
    assert!(
        run.stderr.contains("not a multiple of 512"),
        "{}",
        run.stderr
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn command_line_discovery_finds_the_same_disks() {
    if !kvm_available("command_line_discovery_finds_the_same_disks") {
        return;
    }
    let dir = scratch("blk-cmdline");
    let a = image(&dir, "a.img", 1 << 20);
    let run = blk_spawn(
        &[disk_arg(&a, "")],
        &["--platform", "virtio_mmio_cmdline=on"],
        "probe.mode=blk probe.blk.region=0:65536",
    )
    .finish(PROBE_TIMEOUT);
    run.assert_probe_ok();
    let cmdline = run.line("probe: cmdline=").unwrap_or("");
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xc0000000:5"),
        "{cmdline}"
    );
    assert_eq!(
        run.field("probe: virtio devices", "devices").as_deref(),
        Some("1")
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    if !kvm_available("a_read_only_disk_refuses_writes") {
        return;
    }
    let dir = scratch("blk-ro");
    let img = image(&dir, "ro.img", 1 << 20);
    fs::write(&img, vec![0x5a; 1 << 20]).unwrap();
    let run = blk_run(
        &[disk_arg(&img, ",readonly=on")],
        "probe.mode=blk probe.blk.region=0:65536 probe.blk.verify-only=1",
    );
    assert_eq!(
        run.field("probe: blk disk=0 base", "ro").as_deref(),
        Some("1"),
        "{}",
        run.stdout
    );
    assert_eq!(
        run.field("probe: blk disk=0 ro-write", "status").as_deref(),
        Some("ioerr"),
        "{}",
        run.stdout
    );
    assert!(fs::read(&img).unwrap().iter().all(|&b| b == 0x5a));
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn discard_frees_blocks_on_the_host() {
    if !kvm_available("discard_frees_blocks_on_the_host") {
        return;
    }
    let dir = scratch("blk-discard");
    let img = dir.join("d.img");
    // Fully allocated: every block holds data.
    fs::write(&img, vec![0xa5u8; 2 << 20]).unwrap();
    let before = fs::metadata(&img).unwrap().blocks();
    // The probe writes, then discards and zeroes, the 128 KiB after its region.
    let run = blk_run(
        &[disk_arg(&img, "")],
        "probe.mode=blk probe.blk.region=0:65536",
    );
    run.assert_probe_ok();
    let line = run
        .line("probe: blk disk=0 discard")
        .unwrap_or("")
        .to_string();
    assert_eq!(field(&line, "status").as_deref(), Some("ok"), "{line}");
    assert_eq!(field(&line, "zero_check").as_deref(), Some("ok"), "{line}");
    let after = fs::metadata(&img).unwrap().blocks();
    assert!(
        after < before,
        "discard freed nothing: {before} blocks before, {after} after"
    );
    let _ = fs::remove_dir_all(dir);
}

#[test]
fn hostile_requests_get_their_answers_and_the_vmm_survives() {
    if !kvm_available("hostile_requests_get_their_answers_and_the_vmm_survives") {
        return;
    }
    hostile_requests(&[], "blk-hostile");
}

/// The same under KVM's in-kernel irqchip (the split irqchip is the default).
#[test]
fn hostile_requests_with_the_in_kernel_irqchip() {
    if !kvm_available("hostile_requests_with_the_in_kernel_irqchip") {
        return;
    }
    hostile_requests(&["--platform", "irqchip=kernel"], "blk-hostile-kernel");
}

fn hostile_requests(extra: &[&str], name: &str) {
    let dir = scratch(name);
    let img = image(&dir, "d.img", 1 << 20);
    let run =
        blk_spawn(&[disk_arg(&img, "")], extra, "probe.mode=blk-hostile").finish(PROBE_TIMEOUT);
    run.assert_probe_ok();
    let case = |name: &str| {
        run.lines_with("probe: blk-hostile case=")
            .into_iter()
            .find(|l| field(l, "case").as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no case {name}:\n{}", run.stdout))
            .to_string()
    };
    for name in [
        "addr-outside-ram",
        "header-device-writable",
        "sector-past-end",
        "absurd-length",
    ] {
        assert_eq!(
            field(&case(name), "status").as_deref(),
            Some("ioerr"),
            "{name}"
        );
    }
    assert_eq!(
        field(&case("unknown-type"), "status").as_deref(),
        Some("unsupp")
    );
    for name in ["queue-num-not-pow2", "queue-addr-outside-ram"] {
        assert_eq!(
            field(&case(name), "queue_ready").as_deref(),
            Some("0"),
            "{name}"
        );
    }
    assert_eq!(
        field(&case("features-ok-unoffered"), "features_ok").as_deref(),
        Some("0")
    );
    // Chains with no usable status byte are returned without one; the device lives on.
    for name in ["desc-loop", "no-status-desc", "zero-len-status"] {
        let l = case(name);
        assert_ne!(field(&l, "status").as_deref(), Some("no-completion"), "{l}");
    }
    assert_eq!(
        run.field("probe: blk-hostile recovery", "recovery")
            .as_deref(),
        Some("ok")
    );
    assert!(run.stderr.contains("malformed request"), "{}", run.stderr);
    let _ = fs::remove_dir_all(dir);
}

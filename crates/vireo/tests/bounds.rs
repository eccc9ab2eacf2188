//! Resource bounds under a hostile guest: what vireo spends (memory, time to stop) stays
//! bounded while the guest attacks, and a console nobody reads cannot keep it from stopping.

mod common;

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sends SIGTERM and waits at most `limit` for the exit; returns (status code, how long).
fn sigterm_and_wait(run: Running, limit: Duration) -> (Finished, Duration) {
    let t0 = Instant::now();
    run.signal(libc::SIGTERM);
    let fin = run.finish_within(limit);
    (fin, t0.elapsed())
}

/// The requests-in-flight attack (the guest keeps re-posting a head the device holds, just
/// ahead of the worker): before the fix the worker never returned to its event loop and
/// vireo grew by hundreds of MB per second; now every round ends in DEVICE_NEEDS_RESET and
/// a reset, memory stays flat, and SIGTERM stops vireo at once.
#[test]
fn blk_inflight_attack_stays_bounded_and_stoppable() {
    if !kvm_available("blk_inflight_attack_stays_bounded_and_stoppable") {
        return;
    }
    let dir = scratch("inflight");
    let img = sparse_image(&dir, "d.img", 16 << 20);
    let elf = probe_elf();
    let run = spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--disk",
        &format!("path={}", img.display()),
        "--cmdline",
        "probe.mode=blk-inflight",
    ]);
    assert!(
        run.wait_for_line(PROBE_TIMEOUT, |l| l == "probe: blk-inflight start")
            .is_some(),
        "the attack did not start"
    );
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let rss_5s = rss_kib(run.pid());
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(20) {
        if let Some(l) = run.wait_for_line(Duration::from_millis(200), |l| {
            l.starts_with("probe: blk-inflight rounds=")
        }) {
            last = l;
        }
    }
    let rss_20s = rss_kib(run.pid());
    let (fin, took) = sigterm_and_wait(run, Duration::from_secs(2));
    assert_eq!(
        fin.code,
        Some(143),
        "SIGTERM did not end vireo within 2 s ({took:?}): {}",
        fin.stderr
    );
    assert!(
        rss_5s > 0 && rss_20s <= rss_5s + 1024,
        "VmRSS grew from {rss_5s} KiB at 5 s to {rss_20s} KiB at 20 s"
    );
    let rounds: u64 = field(&last, "rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let broke: u64 = field(&last, "needs-reset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(rounds >= 1000, "only {rounds} attack rounds: {last}");
    assert!(
        broke * 10 >= rounds * 9,
        "the device did not answer most rounds with DEVICE_NEEDS_RESET: {last}"
    );
    // Each round's warning comes from a new worker: they share one rate limit.
    let warnings = fin.stderr.matches("still holds").count();
    assert!(
        warnings <= 60,
        "{warnings} warning lines for {rounds} rounds"
    );
    eprintln!("blk-inflight: {last}; VmRSS {rss_5s} -> {rss_20s} KiB; SIGTERM took {took:?}");
}

/// A console whose reader never reads (a full pipe): the vCPU printing to it must not block,
/// so SIGTERM still stops the VM in order (devices drained, disks flushed, counters logged).
#[test]
fn a_console_nobody_reads_does_not_block_shutdown() {
    if !kvm_available("a_console_nobody_reads_does_not_block_shutdown") {
        return;
    }
    let dir = scratch("stuck-console");
    let img = sparse_image(&dir, "d.img", 1 << 20);
    let elf = probe_elf();
    let mut child = Command::new(vireo_bin())
        .args([
            "--kernel",
            elf.to_str().unwrap(),
            "--disk",
            &format!("path={}", img.display()),
            "--cmdline",
            "probe.mode=chatter probe.count=0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start vireo");
    // Never read stdout: after 64 KiB the pipe is full and stays full.
    let _stdout = child.stdout.take();
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    std::thread::sleep(Duration::from_secs(4));
    let pid = child.id() as i32;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(2) {
            // SAFETY: as above; the whole group, so nothing is left behind.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = err_reader.join().unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("SIGTERM did not stop vireo: {stderr}"));
    assert_eq!(
        status.code(),
        Some(143),
        "{status:?} {:?}: {stderr}",
        status.signal()
    );
    // The console thread is the one stuck in write(2), and the exit path leaves it there.
    assert!(
        stderr.contains("the output sink stopped taking the guest's output"),
        "{stderr}"
    );
    assert!(
        stderr.contains("virtio-blk") && stderr.contains("requests"),
        "the orderly shutdown did not run (no device report): {stderr}"
    );
}

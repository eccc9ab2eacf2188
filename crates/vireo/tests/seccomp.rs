//! seccomp on a running VM: every thread of vireo (vCPUs, device workers, io_uring's own
//! `iou-*` threads, console, spawner, the VMM thread) runs under a filter, and `--seccomp
//! false` turns them off.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;

/// Thread name → the Seccomp field of its status, for every thread of `pid`.
fn thread_seccomp(pid: i32) -> BTreeMap<String, Vec<String>> {
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for t in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue;
        };
        let get = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        by_name
            .entry(get("Name:"))
            .or_default()
            .push(get("Seccomp:"));
    }
    by_name
}

fn assert_all_filtered(what: &str, threads: &BTreeMap<String, Vec<String>>, expect: &[&str]) {
    for name in expect {
        assert!(
            threads.keys().any(|k| k.starts_with(name)),
            "{what}: no {name} thread in {threads:?}"
        );
    }
    for (name, modes) in threads {
        assert!(
            modes.iter().all(|m| m == "2"),
            "{what}: thread {name} is not filtered: {threads:?}"
        );
    }
}

#[test]
fn every_thread_of_a_running_vm_is_filtered() {
    if !kvm_available("every_thread_of_a_running_vm_is_filtered") {
        return;
    }
    let dir = scratch("seccomp-threads");
    let img = sparse_image(&dir, "d.img", 16 << 20);
    let elf = probe_elf();
    let k = elf.to_str().unwrap();

    // Disks at work (O_DIRECT reads keep io_uring's own workers busy), two vCPUs.
    let blk = spawn(&[
        "--kernel",
        k,
        "--cpus",
        "boot=2",
        "--disk",
        &format!("path={},direct=on", img.display()),
        "--cmdline",
        "probe.mode=blk-inflight",
    ]);
    assert!(blk
        .wait_for_line(PROBE_TIMEOUT, |l| l
            .starts_with("probe: blk-inflight rounds="))
        .is_some());
    // The attack resets the disk over and over, so its worker comes and goes: look until
    // one sample has it (every sample must be all filtered).
    let mut seen_worker = false;
    for _ in 0..500 {
        let threads = thread_seccomp(blk.pid());
        assert_all_filtered(
            "blk",
            &threads,
            &["vireo", "vcpu0", "vcpu1", "console", "spawner"],
        );
        if threads.contains_key("virtio-blk") {
            seen_worker = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(seen_worker, "never saw the virtio-blk worker");
    let fin = blk.kill();
    assert!(!fin.stderr.contains("forbidden"), "{}", fin.stderr);

    // A NIC whose worker is up and idle.
    let net = spawn(&[
        "--kernel",
        k,
        "--net",
        "tap=vtsec0,ip=10.230.40.1,mask=255.255.255.0",
        "--cmdline",
        "probe.mode=net-idle probe.net.ip=10.230.40.2 probe.net.host=10.230.40.1 probe.net.wait=3000 probe.net.count=0",
    ]);
    assert!(net
        .wait_for_line(PROBE_TIMEOUT, |l| l == "probe: net-idle start")
        .is_some());
    let threads = thread_seccomp(net.pid());
    assert_all_filtered(
        "net",
        &threads,
        &["vireo", "vcpu0", "virtio-net", "console"],
    );
    let fin = net.finish(PROBE_TIMEOUT);
    assert!(!fin.stderr.contains("forbidden"), "{}", fin.stderr);
    fin.assert_probe_ok();
}

#[test]
fn seccomp_false_runs_without_filters() {
    if !kvm_available("seccomp_false_runs_without_filters") {
        return;
    }
    let elf = probe_elf();
    let run = spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--seccomp",
        "false",
        "--cmdline",
        "probe.mode=echo",
    ]);
    assert!(run
        .wait_for_line(PROBE_TIMEOUT, |l| l == "probe: echo ready")
        .is_some());
    let threads = thread_seccomp(run.pid());
    assert!(threads.values().flatten().all(|m| m == "0"), "{threads:?}");
    let fin = run.kill();
    assert!(fin.code.is_none());
    std::thread::sleep(Duration::from_millis(10));
}

//! Bad host input gets one line naming the problem and exit status 1 — never a panic.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Runs vireo and returns (exit code, stderr).
fn vireo(args: &[&str]) -> (Option<i32>, String) {
    let run = spawn_cmd(Command::new(vireo_bin()).args(args).stdin(Stdio::null()))
        .finish(Duration::from_secs(30));
    (run.code, run.stderr)
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, stderr) = vireo(args);
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: {stderr}");
    assert!(
        errors[0].contains(needle),
        "{args:?}: expected '{needle}' in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_or_non_kernel_files() {
    let dir = scratch("bad-kernel");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_one_line_error(&["--kernel", "/nonexistent/vmlinux"], "No such file");
    assert_one_line_error(&["--kernel", junk.to_str().unwrap()], "neither an ELF");
    assert_one_line_error(&["--kernel", empty.to_str().unwrap()], "neither an ELF");
    assert_one_line_error(&["--kernel", dir.to_str().unwrap()], "not a regular file");
    assert_one_line_error(&[], "--kernel is required");
}

#[test]
fn bad_sizes_and_counts() {
    let elf = probe_elf();
    let k = elf.to_str().unwrap();
    assert_one_line_error(&["--kernel", k, "--memory", "size=0"], "too small");
    assert_one_line_error(
        &["--kernel", k, "--memory", "size=64T"],
        "larger than this host",
    );
    assert_one_line_error(
        &["--kernel", k, "--memory", "size=lots"],
        "not a valid size",
    );
    assert_one_line_error(&["--kernel", k, "--cpus", "boot=0"], "between 1 and 254");
    assert_one_line_error(&["--kernel", k, "--cpus", "boot=255"], "between 1 and 254");
    assert_one_line_error(&["--kernel", k, "--cpus", "boot=1000"], "1000");
    assert_one_line_error(&["--kernel", k, "--serial", "pty"], "--serial");
    assert_one_line_error(&["--kernel", k, "--bogus"], "--bogus");
}

#[test]
fn initramfs_that_does_not_fit() {
    let dir = scratch("big-initrd");
    let big = dir.join("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(200 << 20).unwrap(); // sparse: costs no disk
    let elf = probe_elf();
    assert_one_line_error(
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--initramfs",
            big.to_str().unwrap(),
            "--memory",
            "size=128M",
        ],
        "does not fit",
    );
    assert_one_line_error(
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--initramfs",
            "/nonexistent.img",
        ],
        "initramfs /nonexistent.img",
    );
}

#[test]
fn config_file_errors() {
    let dir = scratch("config");
    let bad = dir.join("vm.json");
    std::fs::write(&bad, r#"{"kernel": "k", "cpus": {"boot": "two"}}"#).unwrap();
    assert_one_line_error(&["--config", bad.to_str().unwrap()], "--config");
    assert_one_line_error(&["--config", "/nonexistent.json"], "No such file");
}

#[test]
fn config_file_boots_the_same_guest() {
    if !kvm_available("config_file_boots_the_same_guest") {
        return;
    }
    let dir = scratch("config-ok");
    let cfg = dir.join("vm.json");
    let json = format!(
        r#"{{"kernel": "{}", "cmdline": "probe.mode=boot", "cpus": {{"boot": 2}}, "memory": {{"size": "256M"}}, "serial": "tty"}}"#,
        probe_elf().display()
    );
    std::fs::write(&cfg, json).unwrap();
    let run = spawn(&["--config", cfg.to_str().unwrap()]).finish(PROBE_TIMEOUT);
    run.assert_probe_ok();
    assert_eq!(run.field("probe: cpus", "running").as_deref(), Some("2"));
    assert_eq!(
        run.field("probe: memory", "ram"),
        Some(arch::layout::usable_ram(256 << 20).to_string())
    );
}

#[test]
fn serial_file_receives_the_console() {
    if !kvm_available("serial_file_receives_the_console") {
        return;
    }
    let dir = scratch("serial-file");
    let out = dir.join("console.log");
    let elf = probe_elf();
    let run = spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--cmdline",
        "probe.mode=quick",
        "--serial",
        &format!("file={}", out.display()),
    ])
    .finish(PROBE_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stdout.contains("PROBE-OK"));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("PROBE-OK"), "{text}");
    assert_one_line_error(
        &[
            "--kernel",
            elf.to_str().unwrap(),
            "--serial",
            "file=/nonexistent/dir/log",
        ],
        "--serial file=/nonexistent/dir/log",
    );
}

/// The console file is appended to, never truncated, and cannot be one of the VM's inputs,
/// however its path is spelled (a symlink, a relative path).
#[test]
fn serial_file_appends_and_never_overwrites_an_input() {
    if !kvm_available("serial_file_appends_and_never_overwrites_an_input") {
        return;
    }
    let dir = scratch("serial-clash");
    let log = dir.join("console.log");
    std::fs::write(&log, "earlier run\n").unwrap();
    let kernel = dir.join("probe.elf");
    std::fs::copy(probe_elf(), &kernel).unwrap();
    let kernel_bytes = std::fs::read(&kernel).unwrap();
    let img = dir.join("d.img");
    std::fs::write(&img, vec![0x42u8; 1 << 20]).unwrap();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"initrd bytes").unwrap();
    let link = dir.join("link-to-disk");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let k = kernel.to_str().unwrap();
    let disk = format!("path={}", img.display());
    let run = spawn(&[
        "--kernel",
        k,
        "--cmdline",
        "probe.mode=quick",
        "--serial",
        &format!("file={}", log.display()),
    ])
    .finish(PROBE_TIMEOUT);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.starts_with("earlier run\n") && text.contains("PROBE-OK"),
        "{text}"
    );
    for (target, what) in [(&kernel, "kernel"), (&link, "disk"), (&initrd, "initramfs")] {
        assert_one_line_error(
            &[
                "--kernel",
                k,
                "--disk",
                &disk,
                "--initramfs",
                initrd.to_str().unwrap(),
                "--serial",
                &format!("file={}", target.display()),
            ],
            &format!("is also the VM's {what}"),
        );
    }
    assert_eq!(std::fs::read(&kernel).unwrap(), kernel_bytes);
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x42));
    assert_eq!(std::fs::read(&initrd).unwrap(), b"initrd bytes");
}

/// A FIFO named as kernel, initramfs or config file would block the open forever (beyond
/// SIGTERM): it is refused at once.
#[test]
fn fifos_are_refused_instead_of_waited_on() {
    let dir = scratch("fifo");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let f = fifo.to_str().unwrap();
    let elf = probe_elf();
    let started = std::time::Instant::now();
    assert_one_line_error(&["--kernel", f], "not a regular file");
    assert_one_line_error(
        &["--kernel", elf.to_str().unwrap(), "--initramfs", f],
        "not a regular file",
    );
    assert_one_line_error(&["--config", f], "not a regular file");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Option values that used to be taken silently.
#[test]
fn ambiguous_or_invalid_option_values() {
    let elf = probe_elf();
    let k = elf.to_str().unwrap();
    assert_one_line_error(&["--kernel", k, "--log-level", "verbose"], "--log-level");
    assert_one_line_error(
        &["--kernel", k, "--memory", "size=128M,size=256M"],
        "'size' is given more than once",
    );
    assert_one_line_error(
        &["--kernel", k, "--disk", "path=/a.img,path=/b.img"],
        "'path' is given more than once",
    );
    assert_one_line_error(
        &["--kernel", k, "--net", "tap=vt0,mac=00:00:00:00:00:00"],
        "MAC address",
    );
    assert_one_line_error(
        &["--kernel", k, "--disk", "path=/a.img,io_engine=aio"],
        "I/O engine",
    );
    assert_one_line_error(&["--kernel", k, "--seccomp", "maybe"], "--seccomp");
    assert_one_line_error(&["--kernel", k, "--landlock", "sometimes"], "--landlock");
    assert_one_line_error(
        &["--kernel", k, "--landlock-rules", "path=/tmp,access=write"],
        "access (read or rw)",
    );
    assert_one_line_error(
        &[
            "--kernel",
            k,
            "--landlock-rules",
            "path=/nonexistent/snapshots,access=rw",
        ],
        "--landlock-rules path=/nonexistent/snapshots",
    );
}

/// Runs vireo as an unprivileged user (no access to the root-only /dev/kvm), and in a
/// mount namespace where /dev has no kvm node at all.
#[test]
fn no_kvm_device_or_no_permission() {
    let (_dir, k) = world_readable_kernel("nokvm");
    let ks = k.to_str().unwrap();
    let Some((code, stderr)) = vireo_as_nobody("no_kvm_device_or_no_permission", &["--kernel", ks])
    else {
        return;
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("/dev/kvm") && stderr.contains("ermission denied"),
        "{stderr}"
    );

    let script = format!(
        "mount -t tmpfs none /dev && exec {} --kernel {ks}",
        vireo_bin()
    );
    let (code, stderr) = vireo_via("unshare", &["--mount", "sh", "-c", &script]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("/dev/kvm") && stderr.contains("No such file"),
        "{stderr}"
    );
}

/// A scratch directory an unprivileged user can read, holding a copy of the probe guest.
fn world_readable_kernel(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch(name);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = dir.join("probe.elf");
    std::fs::copy(probe_elf(), &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    (dir, k)
}

/// Runs vireo as user nobody; None when not root (the caller skips, loudly).
fn vireo_as_nobody(test: &str, args: &[&str]) -> Option<(Option<i32>, String)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("!!!!!!!! SKIPPED {test}: needs root to drop privileges !!!!!!!!");
        return None;
    }
    let mut all = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        vireo_bin(),
    ];
    all.extend_from_slice(args);
    Some(vireo_via("setpriv", &all))
}

fn vireo_via(tool: &str, args: &[&str]) -> (Option<i32>, String) {
    let run = spawn_cmd(Command::new(tool).args(args).stdin(Stdio::null()))
        .finish(Duration::from_secs(30));
    (run.code, run.stderr)
}

#[test]
fn bad_disk_images() {
    let elf = probe_elf();
    let k = elf.to_str().unwrap();
    let dir = scratch("bad-disk");
    assert_one_line_error(
        &["--kernel", k, "--disk", "path=/nonexistent/d.img"],
        "disk image /nonexistent/d.img: No such file",
    );
    assert_one_line_error(
        &["--kernel", k, "--disk", &format!("path={}", dir.display())],
        "not a regular file",
    );
    assert_one_line_error(
        &["--kernel", k, "--disk", "readonly=on"],
        "path=FILE is required",
    );
    let tiny = dir.join("tiny.img");
    std::fs::write(&tiny, b"x").unwrap();
    assert_one_line_error(
        &["--kernel", k, "--disk", &format!("path={}", tiny.display())],
        "smaller than one 512-byte sector",
    );
}

#[test]
fn a_disk_in_use_by_another_vm_is_refused() {
    if !kvm_available("a_disk_in_use_by_another_vm_is_refused") {
        return;
    }
    let dir = scratch("locked-disk");
    let img = sparse_image(&dir, "d.img", 1 << 20);
    let elf = probe_elf();
    let disk = format!("path={}", img.display());
    let first = spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--disk",
        &disk,
        "--cmdline",
        "probe.mode=echo",
    ]);
    assert!(
        first
            .wait_for_line(PROBE_TIMEOUT, |l| l == "probe: echo ready")
            .is_some(),
        "first VM did not start"
    );
    assert_one_line_error(
        &["--kernel", elf.to_str().unwrap(), "--disk", &disk],
        "in use by another process",
    );
    first.kill();
}

#[test]
fn a_disk_without_permission_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, k) = world_readable_kernel("perm-disk");
    let img = sparse_image(&dir, "root-only.img", 1 << 20);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
    let disk = format!("path={}", img.display());
    let Some((code, stderr)) = vireo_as_nobody(
        "a_disk_without_permission_is_refused",
        &["--kernel", k.to_str().unwrap(), "--disk", &disk],
    ) else {
        return;
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("root-only.img") && stderr.contains("ermission denied"),
        "{stderr}"
    );
}

#[test]
fn bad_network_interfaces() {
    let elf = probe_elf();
    let k = elf.to_str().unwrap();
    assert_one_line_error(
        &["--kernel", k, "--net", "tap=vbadmissing0"],
        "tap vbadmissing0 does not exist",
    );
    assert_one_line_error(
        &["--kernel", k, "--net", "tap=vbad0,mac=01:02:03:04:05:06"],
        "not a valid MAC address",
    );
    assert_one_line_error(&["--kernel", k, "--net", "tap=vbad0,mac=nope"], "MAC");
    assert_one_line_error(
        &[
            "--kernel",
            k,
            "--net",
            "tap=a-name-much-too-long,ip=10.9.9.1,mask=255.255.255.0",
        ],
        "longer than 15 bytes",
    );
    assert_one_line_error(
        &["--kernel", k, "--net", "ip=10.0.0.1"],
        "tap=NAME is required",
    );
}

#[test]
fn a_busy_tap_is_refused() {
    if !kvm_available("a_busy_tap_is_refused") {
        return;
    }
    let elf = probe_elf();
    let net = "tap=vbusy0,ip=10.211.0.1,mask=255.255.255.0";
    let first = spawn(&[
        "--kernel",
        elf.to_str().unwrap(),
        "--net",
        net,
        "--cmdline",
        "probe.mode=echo",
    ]);
    assert!(
        first
            .wait_for_line(PROBE_TIMEOUT, |l| l == "probe: echo ready")
            .is_some(),
        "first VM did not start"
    );
    assert_one_line_error(
        &["--kernel", elf.to_str().unwrap(), "--net", "tap=vbusy0"],
        "tap vbusy0 is busy",
    );
    first.kill();
    // vireo created the tap, so it is gone with the first VM.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!std::path::Path::new("/sys/class/net/vbusy0").exists());
}

#[test]
fn a_tap_without_permission_is_refused() {
    let (_dir, k) = world_readable_kernel("perm-tap");
    let Some((code, stderr)) = vireo_as_nobody(
        "a_tap_without_permission_is_refused",
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--net",
            "tap=vperm0,ip=10.212.0.1,mask=255.255.255.0",
        ],
    ) else {
        return;
    };
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("ermission denied") || stderr.contains("no permission"),
        "{stderr}"
    );
}

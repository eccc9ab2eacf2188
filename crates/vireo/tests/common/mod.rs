//! The shared harness of the guest tests: finds the guest kit, starts vireo on it with a
//! hard timeout that kills the VMM's whole process group, and reads what the guest printed
//! on its console.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous: an 8-vCPU probe boot takes well under a second alone, but tests run beside
/// each other on 2 host cores with guest code emulated.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(90);

/// True if /dev/kvm exists; otherwise says loudly that the test is skipped.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: /dev/kvm is absent on this host !!!!!!!!\n");
    false
}

pub fn kit_dir() -> PathBuf {
    std::env::var_os("VIREO_KIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kit"))
}

fn kit_file(rel: &str) -> PathBuf {
    let p = kit_dir().join(rel);
    assert!(
        p.exists(),
        "guest kit file {} is missing: build the kit with `cargo xtask kit` (or run the tests with `cargo xtask test`)",
        p.display()
    );
    p
}

pub fn probe_elf() -> PathBuf {
    kit_file("probe/probe.elf")
}

pub fn probe_bzimage() -> PathBuf {
    kit_file("probe/probe.bzimage")
}

pub fn debian_vmlinux() -> PathBuf {
    kit_file("debian/vmlinux")
}

/// The project's minimal test kernel (tinyconfig + `kit/linux/vireo.config`).
pub fn test_kernel() -> PathBuf {
    kit_file("linux/vmlinux")
}

pub fn vireo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vireo")
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// A sparse file of `bytes` at `dir/name` (a raw disk image for a test).
pub fn sparse_image(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    p
}

/// The word-wise FNV-1a the probe guest computes over its initrd.
pub fn fnv1a64w(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What a finished run left behind.
#[derive(Debug)]
pub struct Finished {
    /// The exit code, or None if the process was killed by a signal (e.g. our timeout).
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.stdout.lines().map(|l| l.trim_end_matches('\r'))
    }

    /// The first console line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> Option<&str> {
        self.lines().find(|l| l.starts_with(prefix))
    }

    pub fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    /// `key=value` from the first line starting with `prefix`.
    pub fn field(&self, prefix: &str, key: &str) -> Option<String> {
        field(self.line(prefix)?, key)
    }

    /// Asserts the guest printed PROBE-OK and vireo exited 0, showing everything if not.
    pub fn assert_probe_ok(&self) {
        assert!(
            !self.timed_out && self.code == Some(0) && self.lines().any(|l| l == "PROBE-OK"),
            "guest run failed: code {:?}, timed out {}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.timed_out,
            self.stdout,
            self.stderr
        );
    }
}

/// `key=value` out of a space-separated line.
pub fn field(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
}

/// A vireo process with its console being read line by line.
pub struct Running {
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
    readers: Vec<std::thread::JoinHandle<()>>,
    reaped: bool,
}

impl Drop for Running {
    /// A test that panics half-way must not leave a guest running.
    fn drop(&mut self) {
        if !self.reaped {
            libc_kill(-self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn pump<R: Read + Send + 'static>(
    r: R,
    sink: Arc<Mutex<String>>,
    tx: Option<std::sync::mpsc::Sender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        while let Ok(n) = r.read_until(b'\n', &mut buf) {
            if n == 0 {
                break;
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            sink.lock().unwrap().push_str(&line);
            if let Some(tx) = &tx {
                let _ = tx.send(line.trim_end().to_string());
            }
            buf.clear();
        }
    })
}

/// Starts `vireo ARGS` in its own process group with stdin from /dev/null.
pub fn spawn(args: &[&str]) -> Running {
    spawn_cmd(Command::new(vireo_bin()).args(args).stdin(Stdio::null()))
}

pub fn spawn_cmd(cmd: &mut Command) -> Running {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start vireo");
    let (tx, rx) = channel();
    let stdout = Arc::new(Mutex::new(String::new()));
    let stderr = Arc::new(Mutex::new(String::new()));
    let readers = vec![
        pump(child.stdout.take().unwrap(), stdout.clone(), Some(tx)),
        pump(child.stderr.take().unwrap(), stderr.clone(), None),
    ];
    Running {
        child,
        lines: rx,
        stdout,
        stderr,
        started: Instant::now(),
        readers,
        reaped: false,
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Time since vireo was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for a console line satisfying `pred`; None on timeout or end of output.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return None
                }
            }
        }
    }

    pub fn signal(&self, sig: i32) {
        libc_kill(self.pid(), sig);
    }

    /// Waits for exit; past `timeout` (counted from the start) the whole process group is
    /// killed.
    pub fn finish(self, timeout: Duration) -> Finished {
        let deadline = self.started + timeout;
        self.finish_by(deadline)
    }

    /// Waits at most `limit` from now for the exit, then kills the process group.
    pub fn finish_within(self, limit: Duration) -> Finished {
        self.finish_by(Instant::now() + limit)
    }

    fn finish_by(mut self, deadline: Instant) -> Finished {
        let mut timed_out = false;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait for vireo") {
                break s;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                libc_kill(-self.pid(), libc::SIGKILL);
                break self.child.wait().expect("wait for killed vireo");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.reaped = true;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let _ = status.signal();
        Finished {
            code: status.code(),
            timed_out,
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
            elapsed: self.started.elapsed(),
        }
    }

    /// Kills the process group now (for tests that stop once they saw what they needed).
    pub fn kill(self) -> Finished {
        libc_kill(-self.pid(), libc::SIGKILL);
        self.finish(Duration::from_secs(10))
    }
}

fn libc_kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Boots `kernel` with the probe command line `cmdline` and extra vireo arguments.
pub fn boot_probe(kernel: &Path, cmdline: &str, extra: &[&str]) -> Finished {
    let kernel = kernel.to_str().expect("utf-8 path");
    let mut args = vec!["--kernel", kernel, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    spawn(&args).finish(PROBE_TIMEOUT)
}

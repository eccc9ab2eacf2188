//! `cargo xtask bench boot [N]`: the probe guest's quick mode (spawn → first guest line,
//! spawn → the VMM's exit after the guest's reset, peak RSS) and pio mode (cost of one
//! port-I/O exit), N times in each VMM, interleaved: vireo (and its in-kernel and split
//! irqchip where the binary has them), QEMU microvm, Firecracker (`FC_BIN`) and Cloud
//! Hypervisor (`CH_BIN`). `--concurrent N [ROUNDS]`: N small VMs at once per VMM, VMs per
//! second and the sum of their peak RSS. Numbers and ratios only: nothing here passes or fails.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The probe's first line in every VMM (Firecracker's own log lines share its stdout).
const HELLO: &str = "probe: hello";
/// The probe's last line, printed just before it resets the machine.
const DONE: &str = "PROBE-OK";
const PIO_COUNT: u32 = 20_000;
const PIO_START: &str = "probe: pio start";
const PIO_DONE: &str = "probe: pio done";
const QUICK: &str = "probe.mode=quick";

pub struct Options {
    runs: usize,
    /// VMs at once, and how many rounds of that.
    concurrent: Option<(usize, usize)>,
}

impl Options {
    pub fn parse(args: &[&str]) -> Result<Options> {
        let num = |s: &str, what: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .with_context(|| format!("{what}: expected a positive number, got {s:?}"))
        };
        Ok(match args {
            [] => Options {
                runs: 20,
                concurrent: None,
            },
            [n] => Options {
                runs: num(n, "N")?,
                concurrent: None,
            },
            ["--concurrent", n] => Options {
                runs: 0,
                concurrent: Some((num(n, "--concurrent")?, 3)),
            },
            ["--concurrent", n, r] => Options {
                runs: 0,
                concurrent: Some((num(n, "--concurrent")?, num(r, "ROUNDS")?)),
            },
            _ => bail!("usage: cargo xtask bench boot [N] | bench boot --concurrent N [ROUNDS]"),
        })
    }
}

enum Kind {
    Vireo {
        bin: PathBuf,
        irqchip: Option<&'static str>,
    },
    Qemu,
    Firecracker {
        bin: PathBuf,
        /// Where its `--config-file`s are written.
        scratch: PathBuf,
    },
    CloudHypervisor {
        bin: PathBuf,
    },
}

struct Vmm {
    name: String,
    kind: Kind,
}

impl Vmm {
    /// Cloud Hypervisor boots the VM again on a guest reset instead of exiting: its run ends
    /// at the reboot (the guest's first line seen twice) and is then killed.
    fn reboots(&self) -> bool {
        matches!(self.kind, Kind::CloudHypervisor { .. })
    }

    fn command(&self, guest: &Path, mode: &str, mem_mib: u32) -> Result<Command> {
        Ok(match &self.kind {
            // The probe's default exit is an i8042 reset, which vireo, Firecracker and Cloud
            // Hypervisor handle; QEMU's microvm has no i8042, so its guest uses isa-debug-exit.
            Kind::Vireo { bin, irqchip } => {
                let mut c = Command::new(bin);
                c.arg("--kernel")
                    .arg(guest)
                    .args(["--cpus", "boot=1", "--memory"])
                    .arg(format!("size={mem_mib}M"))
                    .args(["--log-level", "warn", "--cmdline", mode]);
                if let Some(i) = irqchip {
                    c.arg("--platform").arg(format!("irqchip={i}"));
                }
                c
            }
            Kind::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-M", "microvm", "-enable-kvm"])
                    .args(["-cpu", "host,-arch-capabilities"])
                    .arg("-m")
                    .arg(format!("{mem_mib}M"))
                    .args(["-smp", "1", "-nodefaults", "-no-user-config"])
                    .args(["-nographic", "-serial", "stdio", "-no-reboot"])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
                    .arg("-kernel")
                    .arg(guest)
                    .arg("-append")
                    .arg(format!("{mode} probe.exit=port:0xf4"));
                c
            }
            Kind::Firecracker { bin, scratch } => {
                let config = firecracker_config(scratch, guest, mode, mem_mib)?;
                let mut c = Command::new(bin);
                // Its log shares stdout with the guest's serial console, unsynchronised: a
                // warning (a vCPU kick it reports under load) can split the guest's line.
                c.args(["--no-api", "--level", "error", "--config-file"])
                    .arg(config);
                c
            }
            Kind::CloudHypervisor { bin } => {
                let mut c = Command::new(bin);
                c.arg("--kernel")
                    .arg(guest)
                    .args(["--cmdline", mode, "--cpus", "boot=1", "--memory"])
                    .arg(format!("size={mem_mib}M"))
                    .args(["--serial", "tty", "--console", "off"]);
                c
            }
        })
    }

    fn version(&self) -> String {
        let bin: &Path = match &self.kind {
            Kind::Vireo { bin, .. } => bin,
            Kind::Qemu => Path::new("qemu-system-x86_64"),
            Kind::Firecracker { bin, .. } | Kind::CloudHypervisor { bin } => bin,
        };
        Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|o| {
                let text = String::from_utf8_lossy(&o.stdout).into_owned();
                text.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "(version unknown)".into())
    }
}

/// Firecracker's VM description for one guest command line and memory size, written once
/// (atomically, since concurrent instances read it) and reused.
fn firecracker_config(scratch: &Path, guest: &Path, mode: &str, mem_mib: u32) -> Result<PathBuf> {
    let tag: String = mode
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let path = scratch.join(format!("firecracker-{mem_mib}-{tag}.json"));
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest,
            "boot_args": mode,
        },
        "drives": [],
        "machine-config": {
            "vcpu_count": 1,
            "mem_size_mib": mem_mib,
        },
    });
    let text = serde_json::to_string_pretty(&config)?;
    if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// The binary an environment variable names, or None (with a note) when it is unset.
fn peer_bin(var: &str, what: &str) -> Result<Option<PathBuf>> {
    match std::env::var_os(var) {
        None => {
            eprintln!("note: {var} is not set: {what} skipped");
            Ok(None)
        }
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                bail!("{var}={} is not a file", p.display());
            }
            Ok(Some(p))
        }
    }
}

/// Whether this vireo binary takes `--platform irqchip=MODE`: with a kernel that does not
/// exist, a binary that knows the option fails on the kernel, one that does not fails on the
/// option.
fn vireo_has_irqchip(vireo: &Path, mode: &str) -> bool {
    let out = Command::new(vireo)
        .arg("--platform")
        .arg(format!("irqchip={mode}"))
        .args(["--kernel", "/nonexistent"])
        .stdin(Stdio::null())
        .output();
    match out {
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            err.contains("/nonexistent") && !err.contains("irqchip") && !err.contains("--platform")
        }
        Err(_) => false,
    }
}

fn vmms(root: &Path, vireo: &Path, irqchip_modes: bool) -> Result<Vec<Vmm>> {
    let mut v = vec![Vmm {
        name: "vireo".into(),
        kind: Kind::Vireo {
            bin: vireo.into(),
            irqchip: None,
        },
    }];
    if irqchip_modes {
        for mode in ["kernel", "split"] {
            if vireo_has_irqchip(vireo, mode) {
                v.push(Vmm {
                    name: format!("vireo irqchip={mode}"),
                    kind: Kind::Vireo {
                        bin: vireo.into(),
                        irqchip: Some(mode),
                    },
                });
            } else {
                eprintln!(
                    "note: this vireo does not take --platform irqchip={mode}: only its default runs"
                );
            }
        }
    }
    super::ensure_qemu()?;
    v.push(Vmm {
        name: "QEMU microvm".into(),
        kind: Kind::Qemu,
    });
    if let Some(bin) = peer_bin("FC_BIN", "Firecracker")? {
        let scratch = root.join("target/bench");
        std::fs::create_dir_all(&scratch)?;
        v.push(Vmm {
            name: "Firecracker".into(),
            kind: Kind::Firecracker { bin, scratch },
        });
    }
    if let Some(bin) = peer_bin("CH_BIN", "Cloud Hypervisor")? {
        v.push(Vmm {
            name: "Cloud Hypervisor".into(),
            kind: Kind::CloudHypervisor { bin },
        });
    }
    Ok(v)
}

/// What one VM did.
struct Outcome {
    /// Spawn → the guest's first line.
    first_line: Option<Duration>,
    /// Spawn → the VMM's exit, or for a VMM that reboots, spawn → the reboot.
    exit: Duration,
    peak_rss_kib: u64,
    /// Marker lines seen (by prefix) and when.
    marks: Vec<(String, Duration)>,
    timed_out: bool,
    /// A VMM that reboots on the guest's reset ended without rebooting.
    no_reboot: bool,
    /// The last of what the VMM wrote to stdout and stderr, for error messages (Firecracker
    /// logs to stdout).
    stdout_tail: String,
    stderr_tail: String,
}

impl Outcome {
    fn mark(&self, prefix: &str) -> Option<Duration> {
        self.marks
            .iter()
            .find(|(l, _)| l.starts_with(prefix))
            .map(|(_, t)| *t)
    }

    /// Why this run does not count, if it does not.
    fn problem(&self, need: &[&str]) -> Option<String> {
        let why = if self.timed_out {
            "timed out".to_string()
        } else if self.first_line.is_none() {
            "the guest printed nothing".to_string()
        } else if self.no_reboot {
            "the VMM ended without rebooting the guest".to_string()
        } else if let Some(m) = need.iter().find(|m| self.mark(m).is_none()) {
            format!("no {m:?} line")
        } else {
            return None;
        };
        let mut text = why;
        for (what, tail) in [("stdout", &self.stdout_tail), ("stderr", &self.stderr_tail)] {
            if !tail.trim().is_empty() {
                text.push_str(&format!("; {what}:\n{}", tail.trim()));
            }
        }
        Some(text)
    }
}

/// VmHWM of a live process, in KiB.
fn vm_hwm_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn kill_group(pid: i32) {
    // SAFETY: signals the process group of a child we spawned with process_group(0) and
    // have not reaped yet, so the group id cannot have been reused.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Blocks until `pid` has exited, leaving it unreaped (a zombie keeps its process group id
/// reserved, so killing the group stays safe).
fn wait_exited(pid: i32) -> Result<()> {
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waiting for our own child with a valid out-pointer.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            bail!("waitid({pid}) failed: {e}");
        }
    }
}

struct Lines {
    first: Option<Duration>,
    reboot: Option<Duration>,
    marks: Vec<(String, Duration)>,
    peak_rss_kib: u64,
    /// The last few lines.
    tail: std::collections::VecDeque<String>,
}

/// Reads a VM's console: when the guest's first line came, marker lines, and (for a VMM
/// that reboots) the reboot, at which it kills the VMM. Reads VmHWM at the guest's last line
/// too, just before the reset, so the peak does not depend on the sampler's timing.
fn read_console(
    stdout: std::process::ChildStdout,
    start: Instant,
    pid: i32,
    marks: Vec<String>,
    reboots: bool,
) -> Lines {
    let mut out = Lines {
        first: None,
        reboot: None,
        marks: Vec::new(),
        peak_rss_kib: 0,
        tail: std::collections::VecDeque::new(),
    };
    let mut reader = BufReader::new(stdout);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let t = start.elapsed();
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim();
        if out.tail.len() == 20 {
            out.tail.pop_front();
        }
        out.tail.push_back(line.to_string());
        if line.contains(HELLO) {
            if out.first.is_none() {
                out.first = Some(t);
            } else if reboots {
                out.reboot = Some(t);
                out.peak_rss_kib = out.peak_rss_kib.max(vm_hwm_kib(pid).unwrap_or(0));
                kill_group(pid);
                break;
            }
        }
        if line.starts_with(DONE) {
            out.peak_rss_kib = out.peak_rss_kib.max(vm_hwm_kib(pid).unwrap_or(0));
        }
        if let Some(m) = marks.iter().find(|m| line.starts_with(m.as_str())) {
            // Only the first boot's lines count for a VMM that reboots.
            if out.reboot.is_none() && !out.marks.iter().any(|(l, _)| l.starts_with(m.as_str())) {
                out.marks.push((line.to_string(), t));
            }
        }
    }
    out
}

fn read_tail(mut stderr: std::process::ChildStderr) -> String {
    let mut all = Vec::new();
    let _ = stderr.read_to_end(&mut all);
    let keep = all.len().saturating_sub(2048);
    String::from_utf8_lossy(&all[keep..]).into_owned()
}

struct Started {
    child: Child,
    pid: i32,
    start: Instant,
    console: JoinHandle<Lines>,
    stderr: JoinHandle<String>,
}

/// Starts every command at once (as fast as they can be spawned), waits for all of them and
/// returns what each did and the wall time from the first spawn to the last exit. A sampler
/// reads each VMM's own high-water RSS (VmHWM) every `sample_every` and kills every process
/// group still running at `timeout`. (wait4's ru_maxrss is no use: it counts the forking
/// parent's RSS from before exec.)
fn run_batch(
    cmds: Vec<Command>,
    marks: &[&str],
    reboots: bool,
    sample_every: Duration,
    timeout: Duration,
) -> Result<(Vec<Outcome>, Duration)> {
    let t0 = Instant::now();
    let mut started: Vec<Started> = Vec::with_capacity(cmds.len());
    for mut cmd in cmds {
        let start = Instant::now();
        let spawned = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                for s in &mut started {
                    kill_group(s.pid);
                    let _ = s.child.wait();
                }
                return Err(e);
            }
        };
        let pid = child.id() as i32;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            bail!("no pipes to {cmd:?}");
        };
        let m: Vec<String> = marks.iter().map(|s| s.to_string()).collect();
        started.push(Started {
            child,
            pid,
            start,
            console: std::thread::spawn(move || read_console(stdout, start, pid, m, reboots)),
            stderr: std::thread::spawn(move || read_tail(stderr)),
        });
    }

    let pids: Vec<i32> = started.iter().map(|s| s.pid).collect();
    let exited: Arc<Vec<AtomicBool>> =
        Arc::new(pids.iter().map(|_| AtomicBool::new(false)).collect());
    let timed_out = Arc::new(Mutex::new(vec![false; pids.len()]));
    let sampler = {
        let (exited, timed_out, pids) = (exited.clone(), timed_out.clone(), pids.clone());
        std::thread::spawn(move || {
            let deadline = t0 + timeout;
            let mut peaks = vec![0u64; pids.len()];
            loop {
                let mut live = false;
                for (i, &pid) in pids.iter().enumerate() {
                    if exited[i].load(Ordering::Acquire) {
                        continue;
                    }
                    live = true;
                    if let Some(k) = vm_hwm_kib(pid) {
                        peaks[i] = peaks[i].max(k);
                    }
                    if Instant::now() > deadline {
                        if let Ok(mut t) = timed_out.lock() {
                            t[i] = true;
                        }
                        kill_group(pid);
                    }
                }
                if !live {
                    break;
                }
                std::thread::sleep(sample_every);
            }
            peaks
        })
    };

    // Wait for every exit, unreaped, so no group id is reused while the sampler may still
    // signal it; the last exit ends the wall time.
    let mut exits = Vec::with_capacity(started.len());
    let mut last = t0;
    let mut wait_error = None;
    for (i, s) in started.iter().enumerate() {
        if let Err(e) = wait_exited(s.pid) {
            kill_group(s.pid);
            wait_error.get_or_insert(e);
        }
        let now = Instant::now();
        last = last.max(now);
        exits.push(now - s.start);
        // Whatever the VMM left in its group (helpers, a killed reboot) goes with it.
        kill_group(s.pid);
        exited[i].store(true, Ordering::Release);
    }
    let wall = last - t0;
    let peaks = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))?;
    let timed_out = timed_out.lock().map(|t| t.clone()).unwrap_or_default();

    let mut outcomes = Vec::with_capacity(started.len());
    for (i, s) in started.into_iter().enumerate() {
        let mut child = s.child;
        let _ = child.wait();
        let lines = s
            .console
            .join()
            .map_err(|_| anyhow::anyhow!("a console reader panicked"))?;
        let stderr_tail = s.stderr.join().unwrap_or_default();
        outcomes.push(Outcome {
            first_line: lines.first,
            exit: if reboots {
                lines.reboot.unwrap_or(exits[i])
            } else {
                exits[i]
            },
            peak_rss_kib: peaks[i].max(lines.peak_rss_kib),
            marks: lines.marks,
            timed_out: timed_out.get(i).copied().unwrap_or(false),
            no_reboot: reboots && lines.reboot.is_none(),
            stdout_tail: Vec::from(lines.tail).join("\n"),
            stderr_tail,
        });
    }
    if let Some(e) = wait_error {
        return Err(e);
    }
    Ok((outcomes, wall))
}

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// One VM, sampled every millisecond.
fn run_one(vmm: &Vmm, guest: &Path, mode: &str, mem_mib: u32, need: &[&str]) -> Result<Outcome> {
    let cmd = vmm.command(guest, mode, mem_mib)?;
    let (mut o, _) = run_batch(
        vec![cmd],
        need,
        vmm.reboots(),
        Duration::from_millis(1),
        RUN_TIMEOUT,
    )?;
    let o = o.pop().context("no outcome")?;
    if let Some(p) = o.problem(need) {
        bail!("{} ({mode}): {p}", vmm.name);
    }
    Ok(o)
}

/// Median, min, max and p90 (nearest rank) of the finite values.
fn summary(v: &[f64]) -> Option<(f64, f64, f64, f64)> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let p90 = v[(n * 9).div_ceil(10).max(1) - 1];
    Some((med, v[0], v[n - 1], p90))
}

/// One metric for every VMM: median, min–max, p90 and the ratio of medians to vireo's (the
/// first VMM).
fn table(title: &str, names: &[&str], values: &[Vec<f64>], digits: usize) {
    println!();
    println!(
        "{title:<42} {:>10} {:>21} {:>10} {:>9}",
        "median", "min..max", "p90", "x vireo"
    );
    let base = values.first().and_then(|v| summary(v)).map(|s| s.0);
    for (name, v) in names.iter().zip(values) {
        match summary(v) {
            Some((med, min, max, p90)) => {
                let ratio = base.map_or(f64::NAN, |b| med / b);
                let range = format!("{min:.digits$}..{max:.digits$}");
                println!(
                    "  {name:<40} {med:>10.digits$} {range:>21} {p90:>10.digits$} {ratio:>9.2}"
                );
            }
            None => println!("  {name:<40} (no samples)"),
        }
    }
}

pub fn run(root: &Path, vireo: &Path, guest: &Path, opts: &Options) -> Result<()> {
    match opts.concurrent {
        None => sequential(root, vireo, guest, opts.runs),
        Some((n, rounds)) => concurrent(root, vireo, guest, n, rounds),
    }
}

fn print_versions(vmms: &[Vmm]) {
    for v in vmms {
        println!("  {:<32} {}", v.name, v.version());
    }
}

/// One try of each VMM first: one that cannot boot the probe here is left out with a note
/// rather than ending the benchmark; it also warms the page cache.
fn keep_working(vmms: Vec<Vmm>, guest: &Path, mem_mib: u32) -> Vec<Vmm> {
    vmms.into_iter()
        .filter(|v| match run_one(v, guest, QUICK, mem_mib, &[DONE]) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("note: {} left out: {e:#}", v.name);
                false
            }
        })
        .collect()
}

fn sequential(root: &Path, vireo: &Path, guest: &Path, n: usize) -> Result<()> {
    let vmms = keep_working(vmms(root, vireo, true)?, guest, 512);
    let pio = format!("probe.mode=pio probe.count={PIO_COUNT}");
    let mut quick: Vec<Vec<Outcome>> = vmms.iter().map(|_| Vec::new()).collect();
    let mut pios: Vec<Vec<Outcome>> = vmms.iter().map(|_| Vec::new()).collect();
    // A run that does not count (the host is shared) is left out and reported, not fatal.
    let mut failed: Vec<Vec<String>> = vmms.iter().map(|_| Vec::new()).collect();
    let mut keep = |k: usize, r: Result<Outcome>, out: &mut Vec<Outcome>| match r {
        Ok(o) => out.push(o),
        Err(e) => failed[k].push(format!("{e:#}")),
    };
    for i in 0..n {
        eprint!("\rbench boot: run {}/{n}", i + 1);
        for (k, (v, out)) in vmms.iter().zip(&mut quick).enumerate() {
            keep(k, run_one(v, guest, QUICK, 512, &[DONE]), out);
        }
        for (k, (v, out)) in vmms.iter().zip(&mut pios).enumerate() {
            keep(k, run_one(v, guest, &pio, 512, &[PIO_START, PIO_DONE]), out);
        }
    }
    eprintln!();
    println!("probe guest (PVH ELF, {QUICK}), 1 vCPU, 512 MiB, {n} runs per VMM, interleaved");
    print_versions(&vmms);
    let names: Vec<&str> = vmms.iter().map(|v| v.name.as_str()).collect();
    let ms = |f: fn(&Outcome) -> Option<Duration>| -> Vec<Vec<f64>> {
        quick
            .iter()
            .map(|runs| {
                runs.iter()
                    .map(|o| f(o).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3))
                    .collect()
            })
            .collect()
    };
    table(
        "spawn -> first guest line (ms)",
        &names,
        &ms(|o| o.first_line),
        2,
    );
    table(
        "spawn -> exit after reset (ms)",
        &names,
        &ms(|o| Some(o.exit)),
        2,
    );
    if vmms.iter().any(Vmm::reboots) {
        println!("  (Cloud Hypervisor reboots on the guest's reset: its time is to the reboot)");
    }
    let rss: Vec<Vec<f64>> = quick
        .iter()
        .map(|runs| {
            runs.iter()
                .map(|o| o.peak_rss_kib as f64 / 1024.0)
                .collect()
        })
        .collect();
    table("peak RSS, VmHWM (MiB)", &names, &rss, 1);
    let per_exit: Vec<Vec<f64>> = pios
        .iter()
        .map(|runs| {
            runs.iter()
                .map(|o| match (o.mark(PIO_START), o.mark(PIO_DONE)) {
                    (Some(a), Some(b)) if b > a => {
                        (b - a).as_secs_f64() * 1e6 / f64::from(PIO_COUNT)
                    }
                    _ => f64::NAN,
                })
                .collect()
        })
        .collect();
    table("one port-I/O exit, UART LSR (us)", &names, &per_exit, 2);
    for (v, f) in vmms.iter().zip(&failed) {
        if let Some(first) = f.first() {
            println!(
                "  {}: {} of {} runs left out; first: {first}",
                v.name,
                f.len(),
                2 * n
            );
        }
    }
    Ok(())
}

const CONCURRENT_MIB: u32 = 128;
const CONCURRENT_TIMEOUT: Duration = Duration::from_secs(300);

fn concurrent(root: &Path, vireo: &Path, guest: &Path, n: usize, rounds: usize) -> Result<()> {
    let vmms = keep_working(vmms(root, vireo, false)?, guest, CONCURRENT_MIB);
    // Per VMM, per round: VMs/s, wall ms, sum of peak RSS MiB, median per-VM exit ms, failures.
    let mut results: Vec<Vec<[f64; 5]>> = vmms.iter().map(|_| Vec::new()).collect();
    let mut first_failure: Vec<Option<String>> = vmms.iter().map(|_| None).collect();
    for r in 0..rounds {
        for (k, v) in vmms.iter().enumerate() {
            eprint!(
                "\rbench boot --concurrent {n}: round {}/{rounds}, {:<20}",
                r + 1,
                v.name
            );
            let cmds = (0..n)
                .map(|_| v.command(guest, QUICK, CONCURRENT_MIB))
                .collect::<Result<Vec<_>>>()?;
            // A coarser sampler: 50 processes read every millisecond would eat a core of
            // the two; the guest's last line gives each VM's peak anyway.
            let (outs, wall) = run_batch(
                cmds,
                &[DONE],
                v.reboots(),
                Duration::from_millis(10),
                CONCURRENT_TIMEOUT,
            )?;
            let failures: Vec<String> = outs.iter().filter_map(|o| o.problem(&[DONE])).collect();
            if let Some(f) = failures.first() {
                first_failure[k].get_or_insert_with(|| f.clone());
            }
            let rss: f64 = outs.iter().map(|o| o.peak_rss_kib as f64 / 1024.0).sum();
            let exits: Vec<f64> = outs.iter().map(|o| o.exit.as_secs_f64() * 1e3).collect();
            results[k].push([
                n as f64 / wall.as_secs_f64(),
                wall.as_secs_f64() * 1e3,
                rss,
                summary(&exits).map_or(f64::NAN, |s| s.0),
                failures.len() as f64,
            ]);
        }
    }
    eprintln!();
    println!(
        "{n} VMs at once per VMM (probe guest {QUICK}, 1 vCPU, {CONCURRENT_MIB} MiB each), {rounds} rounds, interleaved"
    );
    print_versions(&vmms);
    let names: Vec<&str> = vmms.iter().map(|v| v.name.as_str()).collect();
    let col = |j: usize| -> Vec<Vec<f64>> {
        results
            .iter()
            .map(|rs| rs.iter().map(|r| r[j]).collect())
            .collect()
    };
    table(
        &format!("VMs per second ({n} / wall time)"),
        &names,
        &col(0),
        1,
    );
    table(
        "wall time, first spawn -> last exit (ms)",
        &names,
        &col(1),
        0,
    );
    table(&format!("sum of {n} peak RSS (MiB)"), &names, &col(2), 0);
    table("median spawn -> exit of one VM (ms)", &names, &col(3), 0);
    if vmms.iter().any(Vmm::reboots) {
        println!("  (Cloud Hypervisor reboots on the guest's reset: a VM's end is its reboot)");
    }
    for ((v, rs), f) in vmms.iter().zip(&results).zip(&first_failure) {
        let failed: f64 = rs.iter().map(|r| r[4]).sum();
        if failed > 0.0 {
            println!(
                "  {}: {failed} of {} VMs did not finish cleanly; first: {}",
                v.name,
                n * rounds,
                f.as_deref().unwrap_or("?")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_is_median_min_max_and_nearest_rank_p90() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(summary(&v), Some((10.5, 1.0, 20.0, 18.0)));
        assert_eq!(
            summary(&[3.0, f64::NAN, 1.0, 2.0]),
            Some((2.0, 1.0, 3.0, 3.0))
        );
        assert_eq!(summary(&[f64::NAN]), None);
    }

    #[test]
    fn options() {
        let o = Options::parse(&[]).unwrap();
        assert_eq!((o.runs, o.concurrent), (20, None));
        assert_eq!(Options::parse(&["5"]).unwrap().runs, 5);
        let o = Options::parse(&["--concurrent", "50"]).unwrap();
        assert_eq!(o.concurrent, Some((50, 3)));
        let o = Options::parse(&["--concurrent", "50", "5"]).unwrap();
        assert_eq!(o.concurrent, Some((50, 5)));
        assert!(Options::parse(&["0"]).is_err());
        assert!(Options::parse(&["--concurrent"]).is_err());
        assert!(Options::parse(&["--concurrent", "x"]).is_err());
    }

    #[test]
    fn firecracker_config_describes_the_vm() {
        let dir = std::env::temp_dir().join(format!("vireo-fc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = firecracker_config(&dir, Path::new("/k.elf"), "probe.mode=quick", 128).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["boot-source"]["kernel_image_path"], "/k.elf");
        assert_eq!(v["boot-source"]["boot_args"], "probe.mode=quick");
        assert_eq!(v["machine-config"]["vcpu_count"], 1);
        assert_eq!(v["machine-config"]["mem_size_mib"], 128);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Side-by-side benchmarks of vireo and QEMU on the same guest, interleaved, repeated,
//! reported as median, min and max with the vireo/QEMU ratio.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One guest run: when its first console line and the given marker lines arrived, when the
/// process exited, and its peak RSS.
struct Sample {
    first_line: Duration,
    exit: Duration,
    peak_rss_kib: u64,
    marks: Vec<(String, Duration)>,
}

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn timed_run(cmd: &mut Command, marks: &[&str]) -> Result<Sample> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().context("no stdout")?;
    let marks: Vec<String> = marks.iter().map(|s| s.to_string()).collect();
    let reader = std::thread::spawn(move || {
        let mut first = None;
        let mut seen = Vec::new();
        let mut lines = BufReader::new(stdout).lines();
        while let Some(Ok(l)) = lines.next() {
            let t = start.elapsed();
            first.get_or_insert(t);
            if let Some(m) = marks.iter().find(|m| l.starts_with(m.as_str())) {
                seen.push((m.clone(), t));
            }
        }
        (first, seen)
    });
    // A sampler reads the VMM's own high-water RSS (VmHWM) until its memory is gone, and
    // kills the process group if the guest hangs. (wait4's ru_maxrss is no use here: it
    // counts the forking parent's RSS from before exec.)
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler_done = done.clone();
    let sampler = std::thread::spawn(move || {
        let deadline = Instant::now() + RUN_TIMEOUT;
        let status = format!("/proc/{pid}/status");
        let mut peak = 0u64;
        while !sampler_done.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(text) = std::fs::read_to_string(&status) {
                if let Some(kib) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak = peak.max(kib);
                }
            }
            if Instant::now() > deadline {
                // SAFETY: killing the process group we created.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        peak
    });
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    let exit = start.elapsed();
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (first, marks) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let peak_rss_kib = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))?;
    if exit >= RUN_TIMEOUT {
        bail!("{cmd:?} timed out");
    }
    Ok(Sample {
        first_line: first.context("the guest printed nothing")?,
        exit,
        peak_rss_kib,
        marks,
    })
}

fn ensure_qemu() -> Result<()> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Ok(());
    }
    eprintln!("bench: installing qemu-system-x86 from apt");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-qq", "qemu-system-x86"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?
        .success()
        || (Command::new("apt-get")
            .args(["update", "-qq"])
            .status()?
            .success()
            && Command::new("apt-get")
                .args(["install", "-y", "-qq", "qemu-system-x86"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()?
                .success());
    if !ok {
        bail!("cannot install qemu-system-x86");
    }
    Ok(())
}

fn vireo_cmd(vireo: &Path, guest: &Path, cmdline: &str) -> Command {
    let mut c = Command::new(vireo);
    c.arg("--kernel")
        .arg(guest)
        .args(["--cpus", "boot=1", "--memory", "size=512M"])
        .args(["--log-level", "warn", "--cmdline", cmdline]);
    c
}

fn qemu_cmd(guest: &Path, cmdline: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", "512M", "-smp", "1", "-nodefaults", "-no-user-config"])
    .args(["-nographic", "-serial", "stdio", "-no-reboot"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
    .arg("-kernel")
    .arg(guest)
    .args(["-append", cmdline]);
    c
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (med, v[0], v[v.len() - 1])
}

fn row(name: &str, unit: &str, vireo: Vec<f64>, qemu: Vec<f64>, target: &str) {
    let (vm, vmin, vmax) = stats(vireo);
    let (qm, qmin, qmax) = stats(qemu);
    println!(
        "{name:<28} vireo {vm:>9.3} {unit:<4} [{vmin:.3}..{vmax:.3}]   qemu {qm:>9.3} {unit:<4} [{qmin:.3}..{qmax:.3}]   ratio {:.3}   target {target}",
        vm / qm
    );
}

/// `cargo xtask bench boot`: the probe guest's quick mode (boot time, RSS) and pio mode
/// (cost of one port-I/O exit), N times each in vireo and QEMU microvm, interleaved.
pub fn boot(vireo: &Path, guest: &Path, n: usize) -> Result<()> {
    ensure_qemu()?;
    let quick = "probe.mode=quick probe.exit=port:0xf4";
    let pio_count = 20_000;
    let pio = format!("probe.mode=pio probe.count={pio_count} probe.exit=port:0xf4");
    let marks = ["probe: pio start", "probe: pio done"];
    let (mut vq, mut qq, mut vp, mut qp) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        eprint!("\rbench boot: run {}/{n}", i + 1);
        vq.push(timed_run(&mut vireo_cmd(vireo, guest, quick), &[])?);
        qq.push(timed_run(&mut qemu_cmd(guest, quick), &[])?);
        vp.push(timed_run(&mut vireo_cmd(vireo, guest, &pio), &marks)?);
        qp.push(timed_run(&mut qemu_cmd(guest, &pio), &marks)?);
    }
    eprintln!();
    let ms = |s: &[Sample], f: fn(&Sample) -> Duration| -> Vec<f64> {
        s.iter().map(|x| f(x).as_secs_f64() * 1e3).collect()
    };
    let per_exit = |s: &[Sample]| -> Result<Vec<f64>> {
        s.iter()
            .map(|x| {
                let t = |m: &str| x.marks.iter().find(|(k, _)| k == m).map(|(_, t)| *t);
                match (t(marks[0]), t(marks[1])) {
                    (Some(a), Some(b)) => Ok((b - a).as_secs_f64() * 1e6 / f64::from(pio_count)),
                    _ => bail!("the pio run printed no start/done lines"),
                }
            })
            .collect()
    };
    println!("probe guest, 1 vCPU, 512 MiB, {n} runs each, interleaved (median [min..max])");
    row(
        "spawn -> first guest line",
        "ms",
        ms(&vq, |s| s.first_line),
        ms(&qq, |s| s.first_line),
        "<= 0.1x",
    );
    row(
        "spawn -> exit after reset",
        "ms",
        ms(&vq, |s| s.exit),
        ms(&qq, |s| s.exit),
        "<= 0.2x",
    );
    row(
        "peak RSS",
        "MiB",
        vq.iter().map(|s| s.peak_rss_kib as f64 / 1024.0).collect(),
        qq.iter().map(|s| s.peak_rss_kib as f64 / 1024.0).collect(),
        "< 4 MiB",
    );
    row(
        "port-I/O exit",
        "us",
        per_exit(&vp)?,
        per_exit(&qp)?,
        "<= 1.0x",
    );
    Ok(())
}

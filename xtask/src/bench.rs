//! Side-by-side benchmarks of vireo and QEMU on the same guest, interleaved, repeated,
//! reported as median, min and max with the vireo/QEMU ratio. `boot` (with Firecracker and
//! Cloud Hypervisor beside them) lives in its own module.

pub mod boot;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One guest run's marker lines: each line seen, when it arrived, and the CPU time (ns) the
/// VMM's non-vCPU threads had used by then.
struct Sample {
    marks: Vec<(String, Duration, Option<VmmCpu>)>,
}

/// CPU nanoseconds of a VMM's non-vCPU threads, and how many threads that was.
type VmmCpu = (u64, usize);

/// CPU nanoseconds used so far by `pid`'s threads whose name does not mark them as vCPU
/// threads (vireo's `vcpuN`, QEMU's `CPU N/KVM` with debug-threads=on), from schedstat, and
/// how many such threads there were. A thread that has exited takes its CPU time with it.
fn vmm_thread_cpu_ns(pid: i32) -> Option<VmmCpu> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let per_thread: Vec<u64> = tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            !(comm.starts_with("vcpu") || comm.starts_with("CPU "))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .collect();
    Some((per_thread.iter().sum(), per_thread.len()))
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
            if marks.iter().any(|m| l.starts_with(m.as_str())) {
                seen.push((l.clone(), t, vmm_thread_cpu_ns(pid)));
            }
        }
        (first, seen)
    });
    // A watchdog kills the process group if the guest hangs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog_done = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while !watchdog_done.load(std::sync::atomic::Ordering::Relaxed) {
            if Instant::now() > deadline {
                // SAFETY: killing the process group we created.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
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
    watchdog
        .join()
        .map_err(|_| anyhow::anyhow!("watchdog panicked"))?;
    if exit >= RUN_TIMEOUT {
        bail!("{cmd:?} timed out");
    }
    first.context("the guest printed nothing")?;
    Ok(Sample { marks })
}

pub(super) fn ensure_qemu() -> Result<()> {
    crate::apt::ensure("bench", &["qemu-system-x86"])
}

fn vireo_cmd(vireo: &Path, guest: &Path, cmdline: &str) -> Command {
    let mut c = Command::new(vireo);
    c.arg("--kernel")
        .arg(guest)
        .args(["--cpus", "boot=1", "--memory", "size=512M"])
        .args(["--log-level", "warn", "--cmdline", cmdline]);
    c
}

fn qemu_cmd(guest: &Path, cmdline: &str, machine: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        machine,
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

fn stats(v: Vec<f64>) -> (f64, f64, f64) {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (med, v[0], v[v.len() - 1])
}

fn row(name: &str, unit: &str, vireo: Vec<f64>, qemu: Vec<f64>, target: &str) {
    if vireo.is_empty() || qemu.is_empty() {
        println!("{name:<28} (no samples)");
        return;
    }
    let (vm, vmin, vmax) = stats(vireo);
    let (qm, qmin, qmax) = stats(qemu);
    println!(
        "{name:<28} vireo {vm:>9.3} {unit:<4} [{vmin:.3}..{vmax:.3}]   qemu {qm:>9.3} {unit:<4} [{qmin:.3}..{qmax:.3}]   ratio {:.3}   target {target}",
        vm / qm
    );
}

/// A host-only reference figure (no VMM) printed under the rows it bounds.
fn floor_row(name: &str, host: Vec<f64>) {
    if host.is_empty() {
        return;
    }
    let (m, min, max) = stats(host);
    println!("{name:<28} host  {m:>9.3} us   [{min:.3}..{max:.3}]   (the same I/O from a host thread, no VMM)");
}

const GIB: u64 = 1 << 30;
const MIB: f64 = (1 << 20) as f64;
const BLK_REGION: u64 = 256 << 20;
const BLK_RANDREADS: u64 = 4096;
const BLK_PHASES: [&str; 3] = ["seqwrite", "seqread", "randread"];

/// A 1 GiB image whose every block is allocated and written (reads must reach the disk).
fn bench_image(root: &Path) -> Result<std::path::PathBuf> {
    use std::io::Write;
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("blk-1g.img");
    if std::fs::metadata(&path).map(|m| m.len()).ok() == Some(GIB) {
        return Ok(path);
    }
    eprintln!("bench blk: writing a 1 GiB image at {}", path.display());
    let mut f = std::fs::File::create(&path)?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    for _ in 0..GIB >> 20 {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    Ok(path)
}

fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn ensure_fio() -> Result<()> {
    crate::apt::ensure("bench", &["fio"])
}

/// One phase's result: MB/s, requests/s, VMM CPU µs per MiB and per request.
#[derive(Clone, Copy, Debug)]
struct Phase {
    mb_s: f64,
    iops: f64,
    cpu_us_per_mib: f64,
    cpu_us_per_req: f64,
}

/// A phase between a `{prefix}{phase} start` and a `{prefix}{phase} done ...` line: its
/// length in seconds, the VMM's non-vCPU CPU µs in it, and the done line.
fn phase_window<'a>(s: &'a Sample, prefix: &str, phase: &str) -> Result<(f64, f64, &'a str)> {
    let find = |what: &str| {
        s.marks
            .iter()
            .find(|(l, _, _)| l.starts_with(&format!("{prefix}{phase} {what}")))
    };
    let (Some(start), Some(done)) = (find("start"), find("done")) else {
        bail!("phase {phase} has no start/done lines");
    };
    let secs = (done.1 - start.1).as_secs_f64().max(1e-9);
    // A window in which a VMM thread exited (the VM was already going away when the line was
    // read) has no valid CPU figure: NaN, left out of the statistics.
    let cpu_us = match (start.2, done.2) {
        (Some((a, na)), Some((b, nb))) if nb >= na && b >= a => (b - a) as f64 / 1e3,
        _ => f64::NAN,
    };
    Ok((secs, cpu_us, &done.0))
}

/// `key=N` from a probe line, 0 when absent.
fn line_num(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn phases(s: &Sample) -> Result<Vec<Phase>> {
    BLK_PHASES
        .iter()
        .map(|p| {
            let (secs, cpu_us, done) = phase_window(s, "probe: blk-bench phase=", p)?;
            let (bytes, reqs) = (line_num(done, "bytes"), line_num(done, "requests"));
            Ok(Phase {
                mb_s: bytes / secs / 1e6,
                iops: reqs / secs,
                cpu_us_per_mib: cpu_us / (bytes / MIB).max(1e-9),
                cpu_us_per_req: cpu_us / reqs.max(1.0),
            })
        })
        .collect()
}

fn fio(
    image: &Path,
    rw: &str,
    bs: &str,
    depth: u32,
    size: &str,
    number_ios: Option<u64>,
) -> Result<Phase> {
    let mut c = Command::new("fio");
    c.args([
        "--name=bench",
        "--direct=1",
        "--ioengine=io_uring",
        "--output-format=json",
    ])
    .arg(format!("--filename={}", image.display()))
    .arg(format!("--rw={rw}"))
    .arg(format!("--bs={bs}"))
    .arg(format!("--iodepth={depth}"))
    .arg(format!("--size={size}"));
    if let Some(n) = number_ios {
        c.arg(format!("--number_ios={n}"));
    }
    let out = c.stderr(Stdio::null()).output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio output")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("write") {
        &job["write"]
    } else {
        &job["read"]
    };
    // fio's own CPU (user + system, percent of its runtime): the host's cost of the same
    // O_DIRECT I/O without any VMM, the floor under every VMM's per-request CPU.
    let pct = job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
    let cpu_us = pct / 100.0 * job["job_runtime"].as_f64().unwrap_or(0.0) * 1000.0;
    let bytes = side["io_bytes"].as_f64().unwrap_or(0.0);
    let ios = side["total_ios"].as_f64().unwrap_or(0.0);
    Ok(Phase {
        mb_s: side["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        iops: side["iops"].as_f64().unwrap_or(0.0),
        cpu_us_per_mib: cpu_us / (bytes / MIB).max(1.0),
        cpu_us_per_req: cpu_us / ios.max(1.0),
    })
}

/// `cargo xtask bench blk`: the probe guest's blk-bench on a 1 GiB allocated image in
/// vireo (direct=on) and QEMU microvm (cache=none, aio=io_uring), interleaved with the host
/// page cache dropped before each, plus host fio O_DIRECT on the same file.
pub fn blk(root: &Path, vireo: &Path, guest: &Path, n: usize) -> Result<()> {
    ensure_qemu()?;
    ensure_fio()?;
    let image = bench_image(root)?;
    let cmdline = format!(
        "probe.mode=blk-bench probe.blk.region=0:{BLK_REGION} probe.blk.count={BLK_RANDREADS} probe.exit=port:0xf4"
    );
    let marks = ["probe: blk-bench phase="];
    let (mut v, mut q, mut f) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        eprint!("\rbench blk: run {}/{n}", i + 1);
        drop_caches();
        let mut c = vireo_cmd(vireo, guest, &cmdline);
        c.arg("--disk")
            .arg(format!("path={},direct=on", image.display()));
        v.push(phases(&timed_run(&mut c, &marks)?)?);
        drop_caches();
        let mut c = qemu_cmd(guest, &cmdline, "microvm,acpi=off");
        c.args(["-name", "bench,debug-threads=on"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .arg("-drive")
            .arg(format!(
                "id=d0,file={},format=raw,if=none,cache=none,aio=io_uring",
                image.display()
            ))
            .args(["-device", "virtio-blk-device,drive=d0"]);
        q.push(phases(&timed_run(&mut c, &marks)?)?);
        drop_caches();
        let region = format!("{}M", BLK_REGION >> 20);
        f.push(vec![
            fio(&image, "write", "1M", 8, &region, None)?,
            fio(&image, "read", "1M", 8, &region, None)?,
            fio(&image, "randread", "4k", 32, &region, Some(BLK_RANDREADS))?,
        ]);
    }
    eprintln!();
    println!(
        "probe guest blk-bench, 1 GiB allocated image, region {} MiB, {n} runs each, interleaved (median [min..max]); fio = host O_DIRECT io_uring",
        BLK_REGION >> 20
    );
    for (i, name) in BLK_PHASES.iter().enumerate() {
        let col = |runs: &[Vec<Phase>], g: fn(&Phase) -> f64| -> Vec<f64> {
            runs.iter().map(|r| g(&r[i])).collect()
        };
        let (fm, _, _) = stats(col(&f, |p| p.mb_s));
        let (fi, _, _) = stats(col(&f, |p| p.iops));
        if i < 2 {
            row(
                &format!("{name} MB/s (fio {fm:.0})"),
                "MB/s",
                col(&v, |p| p.mb_s),
                col(&q, |p| p.mb_s),
                ">= 1.0x",
            );
            row(
                &format!("{name} VMM CPU/MiB"),
                "us",
                col(&v, |p| p.cpu_us_per_mib),
                col(&q, |p| p.cpu_us_per_mib),
                "<= 0.5x",
            );
            floor_row(
                &format!("{name} fio CPU/MiB"),
                col(&f, |p| p.cpu_us_per_mib),
            );
        } else {
            row(
                &format!("{name} IOPS (fio {fi:.0})"),
                "IOPS",
                col(&v, |p| p.iops),
                col(&q, |p| p.iops),
                ">= 1.0x",
            );
            row(
                &format!("{name} VMM CPU/req"),
                "us",
                col(&v, |p| p.cpu_us_per_req),
                col(&q, |p| p.cpu_us_per_req),
                "<= 0.5x",
            );
            floor_row(
                &format!("{name} fio CPU/req"),
                col(&f, |p| p.cpu_us_per_req),
            );
        }
    }
    Ok(())
}

/// One network phase: frames/s, MB/s and VMM CPU µs per frame.
#[derive(Clone, Copy, Debug)]
struct NetPhase {
    fps: f64,
    mb_s: f64,
    cpu_us_per_frame: f64,
}

const NET_FRAMES: u64 = 20_000;

fn net_phases(s: &Sample) -> Result<Vec<NetPhase>> {
    ["tx", "rx"]
        .iter()
        .map(|p| {
            let (secs, cpu_us, done) = phase_window(s, "probe: net-bench phase=", p)?;
            let (frames, bytes) = (line_num(done, "frames"), line_num(done, "bytes"));
            Ok(NetPhase {
                fps: frames / secs,
                mb_s: bytes / secs / 1e6,
                cpu_us_per_frame: cpu_us / frames.max(1.0),
            })
        })
        .collect()
}

pub(crate) fn sh(args: &[&str]) -> Result<()> {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::null())
        .status()?
        .success();
    if !ok {
        bail!("{args:?} failed");
    }
    Ok(())
}

/// The host side of one guest run: a UDP sink counting what the guest sends, and a
/// flooder that starts when the guest's rx phase starts.
fn net_peer(
    host: std::net::Ipv4Addr,
    guest: std::net::Ipv4Addr,
    size: usize,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use std::net::UdpSocket;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sink = UdpSocket::bind((host, 5000))?;
    sink.set_read_timeout(Some(Duration::from_millis(100)))?;
    let s1 = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !s1.load(Ordering::Relaxed) {
            let _ = sink.recv_from(&mut buf);
        }
    });
    let s2 = stop.clone();
    let flood = UdpSocket::bind((host, 0))?;
    std::thread::spawn(move || {
        let payload = vec![0x5au8; size];
        // Paced bursts, so the tap queue (not the host CPU) decides what is dropped.
        while !s2.load(Ordering::Relaxed) {
            for _ in 0..64 {
                let _ = flood.send_to(&payload, (guest, 4000));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    Ok(stop)
}

/// `cargo xtask bench net`: the probe guest's net-bench (UDP out, then a host flood in)
/// with 64- and 1472-byte datagrams, in vireo and QEMU microvm (tap, vhost=off),
/// interleaved; frames/s, MB/s and the VMM's CPU per frame.
pub fn net(vireo: &Path, guest: &Path, n: usize) -> Result<()> {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering;
    ensure_qemu()?;
    let (vh, vg) = (Ipv4Addr::new(10, 220, 0, 1), Ipv4Addr::new(10, 220, 0, 2));
    let (qh, qg) = (Ipv4Addr::new(10, 220, 1, 1), Ipv4Addr::new(10, 220, 1, 2));
    let qtap = "vbenchq0";
    let _ = sh(&["ip", "link", "del", qtap]);
    sh(&["ip", "tuntap", "add", "dev", qtap, "mode", "tap"])?;
    sh(&["ip", "addr", "add", &format!("{qh}/24"), "dev", qtap])?;
    sh(&["ip", "link", "set", qtap, "up"])?;
    let marks = ["probe: net-bench phase="];
    let mut results = Vec::new();
    let mut run = || -> Result<()> {
        for size in [64usize, 1472] {
            let (mut v, mut q, mut floor) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..n {
                eprint!("\rbench net: {size} B, run {}/{n}", i + 1);
                let cmd = |ip: Ipv4Addr, host: Ipv4Addr| {
                    format!(
                        "probe.mode=net-bench probe.net.ip={ip} probe.net.host={host} probe.net.port=5000 probe.net.size={size} probe.net.count={NET_FRAMES} probe.exit=port:0xf4"
                    )
                };
                let mut c = vireo_cmd(vireo, guest, &cmd(vg, vh));
                c.arg("--net")
                    .arg(format!("tap=vbenchv0,ip={vh},mask=255.255.255.0"));
                // The tap appears when vireo starts; the peer binds once it exists.
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let binder = {
                    let stop = stop.clone();
                    std::thread::spawn(
                        move || -> Option<std::sync::Arc<std::sync::atomic::AtomicBool>> {
                            let deadline = Instant::now() + Duration::from_secs(10);
                            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                                if let Ok(s) = net_peer(vh, vg, size) {
                                    return Some(s);
                                }
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            None
                        },
                    )
                };
                let sample = timed_run(&mut c, &marks);
                stop.store(true, Ordering::Relaxed);
                if let Ok(Some(peer)) = binder.join() {
                    peer.store(true, Ordering::Relaxed);
                }
                v.push(net_phases(&sample?)?);

                let peer = net_peer(qh, qg, size)?;
                let mut c = qemu_cmd(guest, &cmd(qg, qh), "microvm,acpi=off");
                c.args(["-name", "bench,debug-threads=on"])
                    .args(["-global", "virtio-mmio.force-legacy=false"])
                    .arg("-netdev")
                    .arg(format!(
                        "tap,id=n0,ifname={qtap},script=no,downscript=no,vhost=off"
                    ))
                    .args(["-device", "virtio-net-device,netdev=n0"]);
                let sample = timed_run(&mut c, &marks);
                peer.store(true, Ordering::Relaxed);
                q.push(net_phases(&sample?)?);
                std::thread::sleep(Duration::from_millis(150));
                floor.push(crate::tapfloor::measure(size, NET_FRAMES)?);
            }
            results.push((size, v, q, floor));
        }
        Ok(())
    };
    let outcome = run();
    let _ = sh(&["ip", "link", "del", qtap]);
    outcome?;
    eprintln!();
    println!("probe guest net-bench, {NET_FRAMES} UDP datagrams out, then a host flood in; {n} runs each, interleaved (median [min..max])");
    for (size, v, q, floor) in results {
        for (i, phase) in ["tx", "rx"].iter().enumerate() {
            let floor: Vec<f64> = floor
                .iter()
                .map(|f| if i == 0 { f.tx_us } else { f.rx_us })
                .collect();
            let col = |r: &[Vec<NetPhase>], g: fn(&NetPhase) -> f64| -> Vec<f64> {
                r.iter().map(|x| g(&x[i])).collect()
            };
            row(
                &format!("{phase} {size} B frames/s"),
                "f/s",
                col(&v, |p| p.fps),
                col(&q, |p| p.fps),
                ">= 1.0x",
            );
            row(
                &format!("{phase} {size} B MB/s"),
                "MB/s",
                col(&v, |p| p.mb_s),
                col(&q, |p| p.mb_s),
                "-",
            );
            row(
                &format!("{phase} {size} B VMM CPU/frame"),
                "us",
                col(&v, |p| p.cpu_us_per_frame),
                col(&q, |p| p.cpu_us_per_frame),
                "<= 0.5x",
            );
            // The host's own cost of the tap read/write per frame, paid by every VMM.
            floor_row(&format!("{phase} {size} B tap CPU/frame"), floor.clone());
            let above = |r: &[Vec<NetPhase>]| -> Vec<f64> {
                r.iter()
                    .zip(&floor)
                    .map(|(x, f)| {
                        let d = x[i].cpu_us_per_frame - f;
                        if d.is_nan() {
                            d
                        } else {
                            d.max(0.0)
                        }
                    })
                    .collect()
            };
            row(
                &format!("{phase} {size} B VMM CPU above floor"),
                "us",
                above(&v),
                above(&q),
                "-",
            );
        }
    }
    Ok(())
}

//! Project tasks: the guest kit, the test groups, the demo boot and the benchmarks.
//!
//! - `cargo xtask boot`  — build vireo (release) and the probe guest, then boot it
//! - `cargo xtask test`  — build the kit, run every test group
//! - `cargo xtask kit`   — build the guest kit only
//! - `cargo xtask bench boot [N]` — vireo vs QEMU microvm, Firecracker (`FC_BIN`) and Cloud
//!   Hypervisor (`CH_BIN`): boot time, RSS, port-I/O exits; `--concurrent N` for N VMs at once
//! - `cargo xtask bench blk [N]` — virtio-blk throughput and VMM CPU per request, with fio
//! - `cargo xtask bench net [N]` — virtio-net frames/s both ways and VMM CPU per frame
//! - `cargo xtask fuzz [SECONDS]` — every fuzz target for SECONDS (default 60), one by one

mod apt;
mod bench;
mod cross;
mod fuzz;
mod kernel;
mod kit;
mod probe;
mod tapfloor;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn root() -> Result<PathBuf> {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` to completion and returns its stdout; a failure carries what it printed.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

pub struct Kit {
    pub probe: probe::ProbeImages,
    pub debian: kit::DebianKernel,
    pub linux: kernel::TestKernel,
}

fn build_kit(root: &Path) -> Result<Kit> {
    let dir = root.join("target/kit");
    let probe = probe::build(root, &dir.join("probe"))?;
    let debian = kit::build(&dir.join("debian"))?;
    let linux = kernel::build(root, &dir.join("linux"))?;
    // What the Linux tests run beside the guest: a DHCP server on a tap, mkfs.ext4.
    apt::ensure("kit", &["dnsmasq-base", "e2fsprogs", "iproute2"])?;
    Ok(Kit {
        probe,
        debian,
        linux,
    })
}

fn build_vireo(root: &Path) -> Result<PathBuf> {
    // Either build can take minutes from cold; say what is being waited for.
    eprintln!("building vireo (release)…");
    // Statically linked: only the parts of the C library vireo calls are mapped, and no
    // dynamic loader runs, so each VM process starts sooner and touches ~1 MiB fewer pages.
    // An explicit --target keeps the flag off build scripts and proc-macros (built for the
    // host, where static linking is not supported).
    run(cargo()
        .current_dir(root)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env_remove("RUSTFLAGS")
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "vireo",
            "--target",
            HOST_TARGET,
        ]))?;
    Ok(root.join("target").join(HOST_TARGET).join("release/vireo"))
}

/// The target triple vireo's release binary is built for.
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The probe guest alone, for what boots nothing else (the demo boot, the benchmarks).
fn build_probe(root: &Path) -> Result<probe::ProbeImages> {
    eprintln!("building the probe guest…");
    probe::build(root, &root.join("target/kit/probe"))
}

fn main() -> Result<()> {
    let root = root()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["probe"] => {
            let images = probe::build(&root, &root.join("target/kit/probe"))?;
            println!("{}\n{}", images.elf.display(), images.bzimage.display());
        }
        ["kit"] => {
            let kit = build_kit(&root)?;
            println!("probe (PVH ELF): {}", kit.probe.elf.display());
            println!("probe (bzImage): {}", kit.probe.bzimage.display());
            println!(
                "Debian kernel {}: {}",
                kit.debian.version,
                kit.debian.vmlinux.display()
            );
            println!(
                "test kernel {}: {}",
                kit.linux.release,
                kit.linux.vmlinux.display()
            );
        }
        ["boot"] => {
            let vireo = build_vireo(&root)?;
            let probe = build_probe(&root)?;
            eprintln!(
                "booting the probe guest: {} --kernel {} --cpus boot=2 --memory size=512M --cmdline 'probe.mode=boot'",
                vireo.display(),
                probe.elf.display()
            );
            let status = Command::new(&vireo)
                .arg("--kernel")
                .arg(&probe.elf)
                .args(["--cpus", "boot=2", "--memory", "size=512M"])
                .args(["--cmdline", "probe.mode=boot"])
                .status()?;
            if !status.success() {
                bail!("vireo exited with {status}");
            }
        }
        ["test", rest @ ..] => {
            build_kit(&root)?;
            let kit_dir = root.join("target/kit");
            // Fast group: unit tests and probe-guest boots, in parallel.
            run(cargo()
                .current_dir(&root)
                .env("VIREO_KIT", &kit_dir)
                .arg("test")
                .args(rest))?;
            // Slow group: Linux guests, one at a time, after every build has finished.
            run(cargo()
                .current_dir(&root)
                .env("VIREO_KIT", &kit_dir)
                .args(["test", "-p", "vireo", "--test", "linux"])
                .args(rest)
                .args(["--", "--ignored", "--test-threads=1"]))?;
        }
        // Every benchmark runs the probe guest only: no test kernel to build.
        ["bench", "boot", rest @ ..] => {
            let opts = bench::boot::Options::parse(rest)?;
            let vireo = build_vireo(&root)?;
            let probe = build_probe(&root)?;
            bench::boot::run(&root, &vireo, &probe.elf, &opts)?;
        }
        ["bench", "blk", rest @ ..] => {
            let vireo = build_vireo(&root)?;
            let probe = build_probe(&root)?;
            let n = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(5);
            bench::blk(&root, &vireo, &probe.elf, n)?;
        }
        ["bench", "net", rest @ ..] => {
            let vireo = build_vireo(&root)?;
            let probe = build_probe(&root)?;
            let n = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(3);
            bench::net(&vireo, &probe.elf, n)?;
        }
        ["fuzz", rest @ ..] => fuzz::fuzz(&root, rest)?,
        // `devices`, `virtio` and `arch` checked and linted for aarch64 with Debian's toolchain.
        ["cross-check"] => cross::cross_check(&root)?,
        _ => bail!(
            "usage: cargo xtask boot | test | kit | probe | bench boot [N] | bench boot --concurrent N [ROUNDS] | bench blk [N] | bench net [N] | fuzz [SECONDS]"
        ),
    }
    Ok(())
}

//! `cargo xtask cross-check`: the aarch64 build of the crates that do not depend on the host's
//! architecture (`devices`, `virtio`, `arch`), checked and linted with Debian's Rust toolchain,
//! which ships an aarch64 standard library (rustup's toolchains here have none).
//!
//! Debian installs `/usr/bin/cargo` and `/usr/bin/rustc`, but rustup's proxies come first in
//! `PATH`, so both are named explicitly. The build goes to its own target directory: a second
//! compiler version in `target/` would rebuild the host's dependencies back and forth.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::{apt, output, run};

const TARGET: &str = "aarch64-unknown-linux-gnu";
const CARGO: &str = "/usr/bin/cargo";
/// Called directly: `cargo clippy` would find rustup's `cargo-clippy` in `~/.cargo/bin` first.
const CARGO_CLIPPY: &str = "/usr/bin/cargo-clippy";
const RUSTC: &str = "/usr/bin/rustc";
const LINKER: &str = "aarch64-linux-gnu-gcc";
/// The crates that must build for aarch64 today (`vmm` still holds x86-only KVM calls).
const CRATES: [&str; 4] = ["devices", "virtio", "arch", "pci"];
/// Rust 1.96 for the host with the aarch64 std, its linter, and the cross linker and C library.
const PACKAGES: [&str; 6] = [
    "rustc-web",
    "cargo-web",
    "rust-web-clippy",
    "libstd-rust-web-dev:arm64",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
];

/// Adds arm64 as a foreign dpkg architecture (for `libstd-rust-web-dev:arm64`) and installs
/// the toolchain when missing.
fn ensure_toolchain() -> Result<()> {
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if !foreign.lines().any(|a| a.trim() == "arm64") {
        eprintln!("cross-check: adding the arm64 dpkg architecture");
        run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        // The new architecture has no package lists until the next update.
        run(Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    apt::ensure("cross-check", &PACKAGES)
}

/// `program` (Debian's cargo or cargo-clippy) set up for the cross build.
fn debian_cargo(root: &Path, program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(root)
        .env("RUSTC", RUSTC)
        .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
        .env("CARGO_TARGET_DIR", root.join("target/cross"))
        // What the outer (rustup) cargo set for xtask itself must not leak into this build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        // cargo-clippy runs `$CARGO check` with its own clippy-driver.
        .env("CARGO", CARGO);
    cmd
}

fn with_crates(cmd: &mut Command) -> &mut Command {
    cmd.args(["--target", TARGET]);
    for c in CRATES {
        cmd.args(["-p", c]);
    }
    cmd
}

pub fn cross_check(root: &Path) -> Result<()> {
    let start = Instant::now();
    ensure_toolchain()?;
    eprintln!(
        "cross-check: toolchain ready in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let version = output(Command::new(RUSTC).arg("--version"))
        .with_context(|| format!("{RUSTC} is not usable"))?;
    eprintln!("cross-check: {}", version.trim());

    let start = Instant::now();
    run(with_crates(
        debian_cargo(root, CARGO).args(["check", "--quiet"]),
    ))?;
    eprintln!(
        "cross-check: cargo check --target {TARGET} passed in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let start = Instant::now();
    run(
        with_crates(debian_cargo(root, CARGO_CLIPPY).args(["clippy", "--quiet"]))
            .args(["--", "-D", "warnings"]),
    )?;
    eprintln!(
        "cross-check: cargo clippy --target {TARGET} -D warnings passed in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

//! `cargo xtask fuzz [SECONDS] [--no-build]`: builds the fuzz targets of `fuzz/` with
//! cargo-fuzz (on stable: no sanitizer), then runs each for SECONDS, one after another, and
//! prints what it did: executions, coverage, corpus size and crashes.
//!
//! Each target starts from its committed seeds (`fuzz/corpus/<target>`, read only) and
//! grows a scratch corpus under `fuzz/target/corpus/<target>`; crashes land in
//! `fuzz/artifacts/<target>/`. `cargo fuzz cmin <target>` folds new finds into the seeds.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{cargo, run};

/// The targets, in the order they run (`fuzz/Cargo.toml` names the same).
pub const TARGETS: [&str; 10] = [
    "blk_request",
    "port_io",
    "ioapic",
    "pci_config",
    "cli_config",
    "kernel_loader",
    "virtio_mmio",
    "blk_queue",
    "net_tx_ctrl",
    "net_rx",
];

/// Flags for every build: optimised, with debug assertions and overflow checks (an overflow
/// a guest can cause is a bug even where release builds would wrap), no sanitizer (the
/// sanitizers need a nightly compiler).
const BUILD_FLAGS: [&str; 4] = ["-O", "--debug-assertions", "--sanitizer", "none"];

/// What one run reported.
struct Report {
    target: &'static str,
    executions: Option<u64>,
    coverage: Option<u64>,
    corpus: Option<u64>,
    crash: Option<String>,
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = cargo()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        eprintln!("installing cargo-fuzz");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// The number after `key` in a libFuzzer status line, e.g. `cov: 123`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn parse_report(target: &'static str, log: &str) -> Report {
    let mut report = Report {
        target,
        executions: None,
        coverage: None,
        corpus: None,
        crash: None,
    };
    for line in log.lines() {
        if let Some(n) = number_after(line, "stat::number_of_executed_units:") {
            report.executions = Some(n);
        }
        if line.starts_with('#') {
            if let Some(n) = number_after(line, "cov:") {
                report.coverage = Some(n);
            }
            if let Some(n) = number_after(line, "corp:") {
                report.corpus = Some(n);
            }
        }
        if let Some(i) = line.find("Test unit written to ") {
            report.crash = Some(line[i + "Test unit written to ".len()..].trim().to_string());
        }
    }
    report
}

fn run_target(root: &Path, target: &'static str, seconds: u64) -> Result<Report> {
    let fuzz = root.join("fuzz");
    let binary = fuzz
        .join("target/x86_64-unknown-linux-gnu/release")
        .join(target);
    let scratch = fuzz.join("target/corpus").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    for dir in [&scratch, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = Command::new(&binary)
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-print_final_stats=1", "-timeout=20", "-max_len=16384"])
        .arg(&scratch)
        .arg(fuzz.join("corpus").join(target))
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let log_path = fuzz.join("target").join(format!("{target}.log"));
    std::fs::write(&log_path, log.as_bytes())
        .with_context(|| format!("writing {}", log_path.display()))?;
    let mut report = parse_report(target, &log);
    if !out.status.success() && report.crash.is_none() {
        // Killed without an artifact (out of memory, a signal): still a failure.
        report.crash = Some(format!("{} ({})", log_path.display(), out.status));
    }
    Ok(report)
}

pub fn fuzz(root: &Path, args: &[&str]) -> Result<()> {
    let mut seconds = 60;
    let mut build = true;
    for a in args {
        match *a {
            "--no-build" => build = false,
            n => {
                seconds = n
                    .parse()
                    .with_context(|| format!("'{n}' is not a number of seconds"))?
            }
        }
    }
    if build {
        ensure_cargo_fuzz()?;
        run(cargo()
            .current_dir(root.join("fuzz"))
            .args(["fuzz", "build"])
            .args(BUILD_FLAGS))?;
    }
    let mut reports = Vec::new();
    for target in TARGETS {
        eprintln!("fuzzing {target} for {seconds} s");
        reports.push(run_target(root, target, seconds)?);
    }
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |n| n.to_string());
    println!(
        "{:<14} {:>12} {:>8} {:>8}  crashes",
        "target", "executions", "cov", "corpus"
    );
    for r in &reports {
        println!(
            "{:<14} {:>12} {:>8} {:>8}  {}",
            r.target,
            show(r.executions),
            show(r.coverage),
            show(r.corpus),
            r.crash.as_deref().unwrap_or("0")
        );
    }
    let crashed: Vec<_> = reports
        .iter()
        .filter(|r| r.crash.is_some())
        .map(|r| r.target)
        .collect();
    if !crashed.is_empty() {
        bail!("crashes in {}", crashed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_is_read() {
        let log = "#1024\tpulse  cov: 77 ft: 80 corp: 12/300b exec/s: 512 rss: 40Mb\n\
                   #2000\tDONE   cov: 81 ft: 90 corp: 14/350b lim: 4096 exec/s: 1000 rss: 41Mb\n\
                   stat::number_of_executed_units: 2000\n";
        let r = parse_report("x", log);
        assert_eq!(
            (r.executions, r.coverage, r.corpus),
            (Some(2000), Some(81), Some(14))
        );
        assert!(r.crash.is_none());
        let r = parse_report(
            "x",
            "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='a/'; Test unit written to a/crash-12ab\n",
        );
        assert_eq!(r.crash.as_deref(), Some("a/crash-12ab"));
    }
}

//! The guest kit's test kernel: a minimal x86_64 Linux built from Debian's
//! `linux-source-6.1` with `tinyconfig` plus the project's fragment and patches in
//! `kit/linux/`. Built once per machine under `target/kit/linux` (about 7 minutes on two
//! cores), and rebuilt — incrementally — when the source package, the fragment, a patch or
//! the compiler changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::output;

pub struct TestKernel {
    pub vmlinux: PathBuf,
    pub release: String,
}

const SOURCE_PACKAGE: &str = "linux-source-6.1";
const BUILD_PACKAGES: &[&str] = &[
    SOURCE_PACKAGE,
    "gcc",
    "make",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "patch",
    "xz-utils",
];

/// FNV-1a over the parts: a cache key, not a security boundary.
fn fingerprint(parts: &[&[u8]]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// `CONFIG_X=v` lines must appear verbatim in the final config, `# CONFIG_X is not set`
/// lines must leave X unset: Kconfig silently drops what a missing dependency forbids.
fn check_config(fragment: &str, config: &str) -> Result<()> {
    let mut wrong = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if line.starts_with("CONFIG_") {
            if !config.lines().any(|l| l == line) {
                wrong.push(line.to_string());
            }
        } else if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            let set = format!("{name}=");
            if config.lines().any(|l| l.starts_with(&set)) {
                wrong.push(line.to_string());
            }
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the kernel config does not hold these fragment lines (a dependency is missing): {}",
            wrong.join(", ")
        );
    }
    Ok(())
}

/// A pristine, patched source tree in `out/src`. tar keeps the archive's timestamps, so a
/// re-extracted tree leaves the objects in `out/build` valid and the rebuild incremental.
fn prepare_source(
    out: &Path,
    recipe: &Path,
    version: &str,
    patches: &[(String, Vec<u8>)],
) -> Result<PathBuf> {
    let src = out.join("src");
    let mut parts: Vec<&[u8]> = vec![version.as_bytes()];
    for (name, body) in patches {
        parts.push(name.as_bytes());
        parts.push(body);
    }
    let key = fingerprint(&parts);
    let marker = src.join(".vireo-source");
    if fs::read_to_string(&marker).ok().as_deref() == Some(key.as_str()) {
        return Ok(src);
    }
    eprintln!("kit: unpacking {SOURCE_PACKAGE} {version}");
    let _ = fs::remove_dir_all(&src);
    let unpack = out.join("unpack");
    let _ = fs::remove_dir_all(&unpack);
    fs::create_dir_all(&unpack)?;
    output(
        Command::new("tar")
            .arg("-xf")
            .arg(format!("/usr/src/{SOURCE_PACKAGE}.tar.xz"))
            .arg("-C")
            .arg(&unpack),
    )?;
    let top = fs::read_dir(&unpack)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("Makefile").exists())
        .context("the source archive has no kernel tree")?;
    fs::rename(&top, &src)?;
    let _ = fs::remove_dir_all(&unpack);
    for (name, _) in patches {
        output(
            Command::new("patch")
                .current_dir(&src)
                .args(["-p1", "--forward", "-i"])
                .arg(recipe.join(name)),
        )
        .with_context(|| format!("patch {name} does not apply"))?;
    }
    fs::write(&marker, &key)?;
    Ok(src)
}

pub fn build(root: &Path, out: &Path) -> Result<TestKernel> {
    let recipe = root.join("kit/linux");
    crate::apt::ensure("kit", BUILD_PACKAGES)?;
    let version = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    let fragment_path = recipe.join("vireo.config");
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("cannot read {}", fragment_path.display()))?;
    let mut patches: Vec<(String, Vec<u8>)> = fs::read_dir(&recipe)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "patch"))
        .map(|p| -> Result<(String, Vec<u8>)> {
            let name = p
                .file_name()
                .context("no file name")?
                .to_string_lossy()
                .into_owned();
            Ok((name, fs::read(&p)?))
        })
        .collect::<Result<_>>()?;
    patches.sort();
    let gcc = output(Command::new("gcc").arg("--version"))?;
    let gcc = gcc.lines().next().unwrap_or_default().to_string();

    let mut parts: Vec<&[u8]> = vec![version.as_bytes(), fragment.as_bytes(), gcc.as_bytes()];
    for (name, body) in &patches {
        parts.push(name.as_bytes());
        parts.push(body);
    }
    let key = fingerprint(&parts);
    let stamp = out.join("stamp");
    let vmlinux = out.join("vmlinux");
    let release_file = out.join("release");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(key.as_str()) && vmlinux.exists() {
        let release = fs::read_to_string(&release_file).unwrap_or_default();
        return Ok(TestKernel {
            vmlinux,
            release: release.trim().to_string(),
        });
    }

    fs::create_dir_all(out)?;
    let src = prepare_source(out, &recipe, &version, &patches)?;
    let build = out.join("build");
    fs::create_dir_all(&build)?;
    let obj = format!("O={}", build.display());
    output(
        Command::new("make")
            .current_dir(&src)
            .args([&obj, "tinyconfig"]),
    )?;
    output(
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .arg("-m")
            .arg("-O")
            .arg(&build)
            .arg(build.join(".config"))
            .arg(&fragment_path),
    )?;
    output(
        Command::new("make")
            .current_dir(&src)
            .args([&obj, "olddefconfig"]),
    )?;
    check_config(&fragment, &fs::read_to_string(build.join(".config"))?)?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!(
        "kit: building the test kernel with {jobs} jobs (about 7 minutes on 2 cores from clean; log in {})",
        out.join("build.log").display()
    );
    let started = Instant::now();
    let log = fs::File::create(out.join("build.log"))?;
    let status = Command::new("make")
        .current_dir(&src)
        .args([&obj, &format!("-j{jobs}"), "vmlinux"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()?;
    if !status.success() {
        let log = fs::read_to_string(out.join("build.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "the test kernel build failed ({status}):\n{}",
            tail.join("\n")
        );
    }
    eprintln!("kit: test kernel built in {:.0?}", started.elapsed());
    fs::copy(build.join("vmlinux"), &vmlinux)?;
    let release = fs::read_to_string(build.join("include/config/kernel.release"))
        .unwrap_or_default()
        .trim()
        .to_string();
    fs::write(&release_file, &release)?;
    fs::write(&stamp, &key)?;
    Ok(TestKernel { vmlinux, release })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_check_finds_dropped_and_unwanted_options() {
        let fragment = "CONFIG_A=y\n# CONFIG_B is not set\n# comment\n";
        assert!(check_config(fragment, "CONFIG_A=y\n# CONFIG_B is not set\n").is_ok());
        assert!(check_config(fragment, "# CONFIG_A is not set\n").is_err());
        assert!(check_config(fragment, "CONFIG_A=y\nCONFIG_B=y\n").is_err());
    }

    #[test]
    fn fingerprint_separates_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
    }
}

//! Debian packages the project needs, installed on first use (never by hand).

use std::process::{Command, Stdio};

use anyhow::{bail, Result};

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_get(args: &[&str]) -> Result<bool> {
    Ok(Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()?
        .success())
}

/// Installs whichever of `packages` are missing, refreshing the package lists when the
/// first attempt fails (a fresh machine may have none).
pub fn ensure(why: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("{why}: installing {} from apt", missing.join(" "));
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    if apt_get(&install)? || (apt_get(&["update", "-qq"])? && apt_get(&install)?) {
        return Ok(());
    }
    bail!("cannot install {} with apt-get", missing.join(" "))
}

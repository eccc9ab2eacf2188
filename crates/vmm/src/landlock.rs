//! Landlock: once every host file the VM uses is open, the process gives up filesystem
//! access to anything else. What stays reachable is what the user named (kernel, initramfs,
//! disks, the console file), the devices vireo works through (`/dev/kvm`, `/dev/net/tun`),
//! and the paths of `--landlock-rules`. Applied on the main thread before it starts any
//! other thread, so every thread inherits the domain.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

/// The newest ABI whose filesystem rights we ask for (V5: device ioctls); older kernels get
/// what they support (best effort), and a kernel without Landlock gets a log line.
const TARGET_ABI: ABI = ABI::V5;

/// What a rule lets the process do under its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockAccess {
    Read,
    ReadWrite,
}

/// One `--landlock-rules path=P,access=read|rw`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandlockRule {
    pub path: PathBuf,
    pub access: LandlockAccess,
}

/// `--landlock` and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandlockConfig {
    pub enabled: bool,
    pub rules: Vec<LandlockRule>,
}

impl Default for LandlockConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            rules: Vec::new(),
        }
    }
}

/// Errors setting up the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("--landlock-rules path={path}: {source}")]
    Path {
        path: String,
        source: landlock::PathFdError,
    },
    #[error("landlock: {0}")]
    Ruleset(#[from] landlock::RulesetError),
}

/// How the restriction went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enforcement {
    Full,
    Partial,
    /// The kernel has no Landlock.
    None,
}

fn rights(access: LandlockAccess, is_dir: bool) -> BitFlags<AccessFs> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::from_read(TARGET_ABI);
    let wanted = match access {
        LandlockAccess::Read => read,
        LandlockAccess::ReadWrite => all,
    };
    if is_dir {
        wanted
    } else {
        // Directory-only rights on a file are refused by the kernel.
        wanted & AccessFs::from_file(TARGET_ABI)
    }
}

/// Restricts the calling thread (and every thread it starts afterwards) to `paths`.
pub fn restrict(paths: &[(PathBuf, LandlockAccess)]) -> Result<Enforcement, LandlockError> {
    let mut created = Ruleset::default()
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        .create()?;
    for (path, access) in paths {
        let fd = PathFd::new(path).map_err(|source| LandlockError::Path {
            path: path.display().to_string(),
            source,
        })?;
        let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
        created = created.add_rule(PathBeneath::new(fd, rights(*access, is_dir)))?;
    }
    let status = created.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => Enforcement::Full,
        RulesetStatus::PartiallyEnforced => Enforcement::Partial,
        RulesetStatus::NotEnforced => Enforcement::None,
    })
}

/// The files a VM works with, and the rules the user added.
pub fn vm_paths(config: &crate::VmConfig) -> Vec<(PathBuf, LandlockAccess)> {
    use LandlockAccess::*;
    let mut v = vec![(config.kernel.clone(), Read)];
    if let Some(i) = &config.initramfs {
        v.push((i.clone(), Read));
    }
    for d in &config.disks {
        v.push((d.path.clone(), if d.readonly { Read } else { ReadWrite }));
    }
    if let crate::SerialConfig::File(p) = &config.serial {
        v.push((p.clone(), ReadWrite));
    }
    for dev in ["/dev/kvm", "/dev/net/tun"] {
        if (dev == "/dev/kvm" || !config.nets.is_empty()) && Path::new(dev).exists() {
            v.push((PathBuf::from(dev), ReadWrite));
        }
    }
    // A rule whose path is missing is the user's mistake: restrict() names it.
    for r in &config.landlock.rules {
        v.push((r.path.clone(), r.access));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child (Landlock cannot be undone): a file inside the rules opens, one
    /// outside them is EACCES, and a directory rule covers what is beneath it.
    #[test]
    fn a_restricted_process_reaches_only_its_rules() {
        if landlock_abi() < 1 {
            eprintln!("\n!!!!!!!! SKIPPED landlock test: this kernel has no Landlock !!!!!!!!\n");
            return;
        }
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let inside = dir.as_path().join("inside");
        let outside = dir.as_path().join("outside");
        let sub = dir.as_path().join("snapshots");
        std::fs::write(&inside, b"ok").unwrap();
        std::fs::write(&outside, b"no").unwrap();
        std::fs::create_dir(&sub).unwrap();
        let rules = vec![
            (inside.clone(), LandlockAccess::Read),
            (sub.clone(), LandlockAccess::ReadWrite),
        ];
        // SAFETY: the child only makes system calls and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = match restrict(&rules) {
                Ok(Enforcement::Full) | Ok(Enforcement::Partial) => {
                    let read_inside = std::fs::read(&inside).is_ok();
                    let outside_err = std::fs::read(&outside).err().and_then(|e| e.raw_os_error());
                    let write_inside = std::fs::write(&inside, b"x").is_err();
                    let create_sub = std::fs::write(sub.join("state"), b"s").is_ok();
                    match (read_inside, outside_err, write_inside, create_sub) {
                        (true, Some(libc::EACCES), true, true) => 0,
                        (false, ..) => 10,
                        (_, _, false, _) => 12,
                        (_, _, _, false) => 13,
                        _ => 11,
                    }
                }
                _ => 20,
            };
            // SAFETY: ending the child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(libc::WEXITSTATUS(status), 0, "child status {status:#x}");
        // The parent is unaffected.
        assert_eq!(std::fs::read(&outside).unwrap(), b"no");
    }

    fn landlock_abi() -> i64 {
        // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION).
        unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<u8>(),
                0usize,
                1u32,
            )
        }
    }

    #[test]
    fn a_missing_rule_path_is_an_error() {
        let r = restrict(&[(PathBuf::from("/nonexistent/x"), LandlockAccess::Read)]);
        assert!(matches!(r, Err(LandlockError::Path { .. })), "{r:?}");
    }
}

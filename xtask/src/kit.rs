//! The guest kit's Linux part: Debian's cloud kernel, fetched with `apt-get download`,
//! unpacked with `dpkg -x` (never installed into /), as the bzImage and the ELF vmlinux
//! extracted from it (the vmlinux carries the PVH note). Cached under `target/kit/debian`
//! and rebuilt only when the package version changes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::output;

pub struct DebianKernel {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    pub version: String,
}

const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The versioned kernel package the metapackage points at, and its version.
fn resolve_package() -> Result<(String, String)> {
    let try_resolve = || -> Result<(String, String)> {
        let deps = output(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
        let pkg = deps
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(|rest| format!("linux-image-{rest}"))
            .context("the metapackage names no kernel package")?;
        let policy = output(Command::new("apt-cache").args(["policy", &pkg]))?;
        let version = policy
            .lines()
            .find_map(|l| l.trim().strip_prefix("Candidate: "))
            .map(str::to_string)
            .context("no candidate version")?;
        Ok((pkg, version))
    };
    match try_resolve() {
        Ok(r) => Ok(r),
        Err(_) => {
            // A fresh machine may have no package lists yet.
            output(Command::new("apt-get").args(["update", "-qq"]))?;
            try_resolve()
        }
    }
}

pub fn build(out_dir: &Path) -> Result<DebianKernel> {
    let stamp = out_dir.join("stamp");
    let bzimage = out_dir.join("bzImage");
    let vmlinux = out_dir.join("vmlinux");
    let cached = fs::read_to_string(&stamp).ok();
    // Offline once built: only ask apt when the lists say something newer exists.
    let resolved = resolve_package();
    let (pkg, version) = match (&resolved, &cached) {
        (Ok(r), _) => r.clone(),
        (Err(_), Some(c)) if bzimage.exists() && vmlinux.exists() => {
            let (p, v) = c.trim().split_once(' ').unwrap_or((c.trim(), ""));
            return Ok(DebianKernel {
                bzimage,
                vmlinux,
                version: format!("{p} {v}"),
            });
        }
        (Err(e), _) => bail!("cannot resolve {META_PACKAGE}: {e}"),
    };
    let want = format!("{pkg} {version}");
    if cached.as_deref().map(str::trim) == Some(want.as_str())
        && bzimage.exists()
        && vmlinux.exists()
    {
        return Ok(DebianKernel {
            bzimage,
            vmlinux,
            version: want,
        });
    }

    // About to download: refresh the package lists first, so the version we ask for is one
    // the mirror still has (lists on a machine can be old).
    let _ = output(Command::new("apt-get").args(["update", "-qq"]));
    let (pkg, version) = resolve_package().unwrap_or((pkg, version));
    let want = format!("{pkg} {version}");
    eprintln!("kit: fetching {pkg} {version}");
    let work = out_dir.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    output(Command::new("apt-get").current_dir(&work).args([
        "download",
        "-qq",
        &format!("{pkg}={version}"),
    ]))?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download produced no .deb")?;
    let root = work.join("root");
    output(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{} has no /boot", deb.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the package has no /boot/vmlinuz-*")?;
    let image = fs::read(&vmlinuz)?;
    let elf = extract_vmlinux(&image).context("cannot extract vmlinux from the bzImage")?;
    fs::write(&bzimage, &image)?;
    fs::write(&vmlinux, &elf)?;
    fs::write(&stamp, &want)?;
    let _ = fs::remove_dir_all(&work);
    Ok(DebianKernel {
        bzimage,
        vmlinux,
        version: want,
    })
}

/// The bzImage's payload (setup header `payload_offset`/`payload_length`, boot protocol
/// 2.08+), decompressed. Debian's cloud kernels use LZ4's legacy frame format.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>> {
    let u32_at = |o: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            image.get(o..o + 4).context("image too short")?.try_into()?,
        ))
    };
    if u32_at(0x202)? != 0x5372_6448 {
        bail!("not a bzImage (no HdrS)");
    }
    let setup_sects = match *image.get(0x1f1).context("image too short")? {
        0 => 4,
        n => usize::from(n),
    };
    let pm_start = (setup_sects + 1) * 512;
    let off = pm_start + u32_at(0x248)? as usize;
    let len = u32_at(0x24c)? as usize;
    let payload = image
        .get(off..off + len)
        .context("payload outside the image")?;
    let elf = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(payload)?,
        [0x1f, 0x8b, ..] => bail!("gzip payloads are not supported"),
        [0xfd, b'7', b'z', b'X', b'Z', ..] => bail!("xz payloads are not supported"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => bail!("zstd payloads are not supported"),
        _ => bail!("unknown payload compression"),
    };
    if !elf.starts_with(b"\x7fELF") {
        bail!("the payload is not an ELF");
    }
    Ok(elf)
}

/// LZ4 legacy frame: magic, then blocks of (u32 compressed size, data), each block at most
/// 8 MiB decompressed. The kernel appends its size after the last block.
fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>> {
    const BLOCK: usize = 8 << 20;
    let mut out = Vec::new();
    let mut pos = 4;
    let mut block = vec![0u8; BLOCK];
    while pos + 4 <= data.len() {
        let size = u32::from_le_bytes(data[pos..pos + 4].try_into()?) as usize;
        if size == 0x184c_2102 {
            pos += 4; // another frame's magic
            continue;
        }
        pos += 4;
        let Some(chunk) = data.get(pos..pos + size) else {
            break; // the trailing size field
        };
        let n = lz4_flex::block::decompress_into(chunk, &mut block)
            .map_err(|e| anyhow::anyhow!("LZ4 block at {pos:#x}: {e}"))?;
        out.extend_from_slice(&block[..n]);
        pos += size;
    }
    Ok(out)
}

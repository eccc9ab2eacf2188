//! Host files the user names: opened so that a FIFO or device cannot hang vireo, and so that
//! the console file can never be one of the VM's own inputs (a kernel, initramfs or disk).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Errors opening a file the user named.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("--serial file={path}: {source}")]
    ConsoleOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: String },
    #[error("--serial file={path} is also the VM's {other} {other_path}: refusing to write the console over it")]
    ConsoleClash {
        path: String,
        other: &'static str,
        other_path: String,
    },
}

/// A file's identity: device and inode, which no path spelling or symlink can hide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Opens `path` for reading and checks it is a regular file. The open itself is
/// non-blocking, so a FIFO without a writer is refused instead of hanging the process
/// beyond any signal.
pub fn open_regular(what: &'static str, path: &Path) -> Result<File, FileError> {
    let err = |source| FileError::Open {
        what,
        path: path.display().to_string(),
        source,
    };
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    if !f.metadata().map_err(err)?.is_file() {
        return Err(FileError::NotAFile {
            what,
            path: path.display().to_string(),
        });
    }
    // Regular files ignore O_NONBLOCK; clear it anyway so nothing later depends on it.
    // SAFETY: F_SETFL on a descriptor we own.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_SETFL, 0) };
    Ok(f)
}

/// Opens the console file for appending (creating it if needed), never truncating it, and
/// refuses it when it is the same file as one of `inputs` (what, path, identity): pointed at
/// a disk image or the kernel, the console would otherwise write over them.
pub fn open_console_file(
    path: &Path,
    inputs: &[(&'static str, String, FileId)],
) -> Result<File, FileError> {
    let err = |source| FileError::ConsoleOpen {
        path: path.display().to_string(),
        source,
    };
    let clash = |id: FileId| {
        inputs
            .iter()
            .find(|(_, _, other)| *other == id)
            .map(|(other, other_path, _)| FileError::ConsoleClash {
                path: path.display().to_string(),
                other,
                other_path: other_path.clone(),
            })
    };
    // Checked before opening too, so nothing about an input changes (not even its
    // timestamps) when it is refused.
    if let Ok(meta) = std::fs::metadata(path) {
        if let Some(e) = clash(FileId::of(&meta)) {
            return Err(e);
        }
    }
    // O_NONBLOCK: a FIFO with no reader fails at once (ENXIO) instead of blocking.
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(err)?;
    // And after: the path may have been swapped in between.
    if let Some(e) = clash(FileId::of(&f.metadata().map_err(err)?)) {
        return Err(e);
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let fifo = dir.as_path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            open_regular("kernel", &fifo),
            Err(FileError::NotAFile { .. })
        ));
        assert!(matches!(
            open_regular("kernel", Path::new("/nonexistent")),
            Err(FileError::Open { .. })
        ));
    }

    #[test]
    fn the_console_file_appends_and_cannot_be_an_input() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let disk = dir.as_path().join("disk.img");
        std::fs::write(&disk, b"precious").unwrap();
        let link = dir.as_path().join("link");
        std::os::unix::fs::symlink(&disk, &link).unwrap();
        let id = FileId::of(&std::fs::metadata(&disk).unwrap());
        let inputs = [("disk", disk.display().to_string(), id)];
        for p in [&disk, &link] {
            assert!(matches!(
                open_console_file(p, &inputs),
                Err(FileError::ConsoleClash { other: "disk", .. })
            ));
        }
        assert_eq!(std::fs::read(&disk).unwrap(), b"precious");

        let log = dir.as_path().join("console.log");
        std::fs::write(&log, b"before\n").unwrap();
        let mut f = open_console_file(&log, &inputs).unwrap();
        f.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"before\nafter\n");
    }
}

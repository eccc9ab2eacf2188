//! The block backend: a raw image file, locked against other VMs, and an io_uring that keeps
//! many guest requests in flight at once (reads and writes straight between the file and
//! guest memory, `fdatasync` for FLUSH, `fallocate` for DISCARD and WRITE_ZEROES).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::SECTOR_SIZE;

/// Errors opening an image or driving the ring.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is in use by another process (another VM?): cannot lock it")]
    Locked { path: PathBuf },
    #[error("disk image {path} is smaller than one 512-byte sector")]
    TooSmall { path: PathBuf },
    #[error("cannot set up io_uring for {path}: {source}")]
    Ring {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An opened raw image.
pub struct DiskImage {
    file: File,
    /// With O_DIRECT: a page-cache descriptor of the same image for buffers O_DIRECT cannot
    /// take (not 512-byte aligned). Opened with the image, never at the guest's request.
    buffered: Option<File>,
    path: PathBuf,
    readonly: bool,
    /// Capacity in 512-byte sectors.
    sectors: u64,
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Takes an OFD record lock over the whole file (shared for reading, exclusive for
/// writing); false when another open file description holds a conflicting one.
fn ofd_lock(file: &File, shared: bool) -> bool {
    // SAFETY: an all-zero flock is a valid value to fill in.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = if shared { libc::F_RDLCK } else { libc::F_WRLCK } as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start 0, l_len 0: from the start to the end of the file, however it grows.
    // SAFETY: F_OFD_SETLK reads the flock we own for the call.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) == 0 }
}

impl DiskImage {
    /// Opens and locks `path`: an exclusive lock for a writable image, a shared one for a
    /// read-only image, so two VMs cannot write the same image. `direct` bypasses the host
    /// page cache (O_DIRECT).
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(DiskError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(!readonly);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path).map_err(open_err)?;
        let op = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } != 0 {
            return Err(DiskError::Locked {
                path: path.to_path_buf(),
            });
        }
        // QEMU and Cloud Hypervisor lock images with open file description (OFD) record
        // locks, which flock does not see: take one over the whole file too.
        if !ofd_lock(&file, readonly) {
            return Err(DiskError::Locked {
                path: path.to_path_buf(),
            });
        }
        let bytes = if ft.is_block_device() {
            let mut size = 0u64;
            // SAFETY: BLKGETSIZE64 writes one u64.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
                return Err(open_err(std::io::Error::last_os_error()));
            }
            size
        } else {
            meta.len()
        };
        let sectors = bytes / SECTOR_SIZE;
        if sectors == 0 {
            return Err(DiskError::TooSmall {
                path: path.to_path_buf(),
            });
        }
        if bytes % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk image {}: size {bytes} is not a multiple of 512; the guest sees {} bytes",
                path.display(),
                sectors * SECTOR_SIZE
            );
        }
        let buffered = if direct {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(!readonly)
                    .open(path)
                    .map_err(open_err)?,
            )
        } else {
            None
        };
        Ok(Self {
            file,
            buffered,
            path: path.to_path_buf(),
            readonly,
            sectors,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The page-cache descriptor of an O_DIRECT image.
    pub fn buffered_fd(&self) -> Option<RawFd> {
        self.buffered.as_ref().map(|f| f.as_raw_fd())
    }

    /// fdatasync: everything written so far is on stable storage.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// One backend operation. Buffers are host addresses of guest memory the caller has
/// bounds-checked and keeps mapped until the operation completes.
#[derive(Debug)]
pub enum IoOp {
    Read {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    Write {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    Flush,
    /// Deallocate (punch a hole); reads return zeroes afterwards.
    Discard {
        offset: u64,
        len: u64,
    },
    /// Make the range read as zeroes; `unmap` allows deallocating it.
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

// SAFETY: the iovecs point into guest memory, which is shared with the guest anyway; the
// engine hands them only to the kernel.
unsafe impl Send for IoOp {}

/// What a completed operation returned: bytes moved, or a negative errno.
pub type IoResult = i32;

/// Which backend moves a disk's data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IoEngineKind {
    /// io_uring, or the synchronous engine when io_uring cannot be set up (disabled by
    /// sysctl, refused by a container's seccomp filter, an old kernel).
    #[default]
    Auto,
    /// io_uring only: a disk whose ring cannot be set up fails to start.
    Uring,
    /// `preadv`/`pwritev`/`fdatasync`/`fallocate` on the worker thread, one at a time.
    Sync,
}

/// The block backend behind one worker: many operations in flight on an io_uring, or the
/// synchronous fallback. Either way completions are collected with [`IoEngine::reap`] when
/// [`IoEngine::completion_fd`] is readable, so the worker is the same for both.
pub struct IoEngine {
    completion_evt: EventFd,
    /// Operations started and not yet reaped, keyed by token (their iovec arrays live here).
    in_flight: HashMap<u64, IoOp>,
    max_in_flight: usize,
    backend: Backend,
}

enum Backend {
    Uring {
        ring: Box<IoUring>,
        /// Operations that did not fit the submission queue yet.
        backlog: Vec<(RawFd, u64, IoOp)>,
    },
    /// Results of operations already done, waiting to be reaped.
    Sync { done: Vec<(u64, IoResult)> },
}

impl IoEngine {
    /// An engine of `kind` with room for `entries` operations in flight on io_uring.
    pub fn new(entries: u32, path: &Path, kind: IoEngineKind) -> Result<Self, DiskError> {
        let ring_err = |source| DiskError::Ring {
            path: path.to_path_buf(),
            source,
        };
        let completion_evt = EventFd::new(EFD_NONBLOCK).map_err(ring_err)?;
        let backend = match kind {
            IoEngineKind::Sync => Backend::Sync { done: Vec::new() },
            IoEngineKind::Uring | IoEngineKind::Auto => {
                match Self::ring(entries, &completion_evt) {
                    Ok(ring) => Backend::Uring {
                        ring: Box::new(ring),
                        backlog: Vec::new(),
                    },
                    Err(e) if kind == IoEngineKind::Auto => {
                        tracing::warn!(
                            "disk image {}: io_uring unavailable ({e}); using synchronous I/O",
                            path.display()
                        );
                        Backend::Sync { done: Vec::new() }
                    }
                    Err(e) => return Err(ring_err(e)),
                }
            }
        };
        Ok(Self {
            completion_evt,
            in_flight: HashMap::new(),
            max_in_flight: 0,
            backend,
        })
    }

    fn ring(entries: u32, evt: &EventFd) -> std::io::Result<IoUring> {
        let ring = IoUring::new(entries)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(ring)
    }

    /// Whether operations run synchronously (io_uring was not used).
    pub fn is_sync(&self) -> bool {
        matches!(self.backend, Backend::Sync { .. })
    }

    /// Readable when completions are waiting.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_evt.as_raw_fd()
    }

    /// The most operations the kernel held at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub fn in_flight(&self) -> usize {
        let backlog = match &self.backend {
            Backend::Uring { backlog, .. } => backlog.len(),
            Backend::Sync { .. } => 0,
        };
        self.in_flight.len() + backlog
    }

    /// Queues `op` on `fd`; `submit` hands queued operations to the kernel. The synchronous
    /// engine does the operation here.
    pub fn push(&mut self, fd: RawFd, token: u64, op: IoOp) {
        match &mut self.backend {
            Backend::Sync { done } => {
                done.push((token, run_sync(fd, &op)));
                self.in_flight.insert(token, op);
                let _ = self.completion_evt.write(1);
            }
            Backend::Uring { ring, backlog } => {
                let entry = uring_entry(fd, token, &op);
                // SAFETY: the entry's buffers (iovec arrays and what they point to) stay
                // valid until the completion: the iovecs are owned by `in_flight`, guest
                // memory by the VM.
                let pushed = unsafe { ring.submission().push(&entry) }.is_ok();
                if pushed {
                    self.in_flight.insert(token, op);
                } else {
                    backlog.push((fd, token, op));
                }
            }
        }
        self.max_in_flight = self.max_in_flight.max(self.in_flight.len());
    }

    /// Submits what was pushed.
    pub fn submit(&mut self) -> std::io::Result<()> {
        let Backend::Uring { ring, .. } = &mut self.backend else {
            return Ok(());
        };
        loop {
            match ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: completions must be reaped first; the caller will come back.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Collects finished operations as (token, op, result), then refills the submission
    /// queue from the backlog.
    pub fn reap(&mut self, out: &mut Vec<(u64, IoOp, IoResult)>) {
        let done: Vec<(u64, i32)> = match &mut self.backend {
            Backend::Uring { ring, .. } => ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect(),
            Backend::Sync { done } => std::mem::take(done),
        };
        for (token, result) in done {
            if let Some(op) = self.in_flight.remove(&token) {
                out.push((token, op, result));
            }
        }
        if let Backend::Uring { backlog, .. } = &mut self.backend {
            let backlog = std::mem::take(backlog);
            for (fd, token, op) in backlog {
                self.push(fd, token, op);
            }
        }
    }

    /// Blocks until at least one completion is available (tests, and draining at reset). A
    /// signal that interrupts the wait (SIGSTOP/SIGCONT, a vCPU kick) does not end it.
    pub fn wait(&mut self) -> std::io::Result<()> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let Backend::Uring { ring, .. } = &mut self.backend else {
            return Ok(());
        };
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

fn uring_entry(fd: RawFd, token: u64, op: &IoOp) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd);
    match op {
        IoOp::Read { offset, iovecs } => {
            opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(*offset)
                .build()
        }
        IoOp::Write { offset, iovecs } => {
            opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                .offset(*offset)
                .build()
        }
        // IO_DRAIN: a FLUSH covers every write submitted before it (§5.2.6.1).
        IoOp::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .flags(io_uring::squeue::Flags::IO_DRAIN),
        IoOp::Discard { offset, len } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
        IoOp::WriteZeroes { offset, len, unmap } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(zeroing_mode(*unmap))
            .build(),
    }
    .user_data(token)
}

fn zeroing_mode(unmap: bool) -> i32 {
    if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// Does `op` with plain system calls, as io_uring would: bytes moved or a negative errno.
/// A short transfer is continued, so only an error or end of file ends one early.
fn run_sync(fd: RawFd, op: &IoOp) -> IoResult {
    let errno = || {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    let retry = |r: isize| {
        r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
    };
    match op {
        IoOp::Read { offset, iovecs } | IoOp::Write { offset, iovecs } => {
            let write = matches!(op, IoOp::Write { .. });
            let mut iovecs = iovecs.clone();
            let mut done: usize = 0;
            let mut first = 0usize;
            while first < iovecs.len() {
                let count = (iovecs.len() - first).min(1024) as libc::c_int;
                let at = (*offset + done as u64) as libc::off_t;
                // SAFETY: the iovecs point into guest memory the caller bounds-checked and
                // keeps mapped for the call.
                let n = unsafe {
                    if write {
                        libc::pwritev(fd, iovecs[first..].as_ptr(), count, at)
                    } else {
                        libc::preadv(fd, iovecs[first..].as_ptr(), count, at)
                    }
                };
                if retry(n) {
                    continue;
                }
                if n < 0 {
                    return errno();
                }
                if n == 0 {
                    break;
                }
                let mut n = n as usize;
                done += n;
                while first < iovecs.len() && n >= iovecs[first].iov_len {
                    n -= iovecs[first].iov_len;
                    first += 1;
                }
                if n > 0 {
                    let v = &mut iovecs[first];
                    // SAFETY: advancing inside the same buffer by less than its length.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                    v.iov_len -= n;
                }
            }
            i32::try_from(done).unwrap_or(i32::MAX)
        }
        IoOp::Flush => loop {
            // SAFETY: fdatasync on a descriptor the disk owns.
            let r = unsafe { libc::fdatasync(fd) } as isize;
            if retry(r) {
                continue;
            }
            return if r < 0 { errno() } else { 0 };
        },
        IoOp::Discard { offset, len } | IoOp::WriteZeroes { offset, len, .. } => {
            let mode = match op {
                IoOp::WriteZeroes { unmap, .. } => zeroing_mode(*unmap),
                _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            };
            loop {
                // SAFETY: fallocate on a descriptor the disk owns.
                let r = unsafe {
                    libc::fallocate(fd, mode, *offset as libc::off_t, *len as libc::off_t)
                } as isize;
                if retry(r) {
                    continue;
                }
                return if r < 0 { errno() } else { 0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom};

    fn image(bytes: usize) -> (vmm_sys_util::tempfile::TempFile, PathBuf) {
        let t = vmm_sys_util::tempfile::TempFile::new().unwrap();
        t.as_file().set_len(bytes as u64).unwrap();
        let p = t.as_path().to_path_buf();
        (t, p)
    }

    #[test]
    fn capacity_rounds_down_and_tiny_or_odd_files_are_refused() {
        let (_t, p) = image(4096 + 100);
        let d = DiskImage::open(&p, false, false).unwrap();
        assert_eq!(d.sectors(), 8);
        let (_t2, p2) = image(100);
        assert!(matches!(
            DiskImage::open(&p2, false, false),
            Err(DiskError::TooSmall { .. })
        ));
        assert!(matches!(
            DiskImage::open(Path::new("/"), false, false),
            Err(DiskError::NotAFile { .. })
        ));
        assert!(matches!(
            DiskImage::open(Path::new("/nonexistent.img"), false, false),
            Err(DiskError::Open { .. })
        ));
    }

    #[test]
    fn a_writable_image_is_locked_against_a_second_opener() {
        let (_t, p) = image(1 << 20);
        let first = DiskImage::open(&p, false, false).unwrap();
        assert!(matches!(
            DiskImage::open(&p, false, false),
            Err(DiskError::Locked { .. })
        ));
        assert!(matches!(
            DiskImage::open(&p, true, false),
            Err(DiskError::Locked { .. })
        ));
        drop(first);
        let _ro1 = DiskImage::open(&p, true, false).unwrap();
        let _ro2 = DiskImage::open(&p, true, false).unwrap();
    }

    /// QEMU's and Cloud Hypervisor's way of locking: OFD record locks, not flock.
    #[test]
    fn an_image_another_vmm_holds_with_ofd_locks_is_refused() {
        let (_t, p) = image(1 << 20);
        let other = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert!(
            ofd_lock(&other, true),
            "a shared lock, as a read-only user holds"
        );
        assert!(matches!(
            DiskImage::open(&p, false, false),
            Err(DiskError::Locked { .. })
        ));
        let _ro = DiskImage::open(&p, true, false).unwrap();
        drop(other);
        drop(_ro);
        let other = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        assert!(ofd_lock(&other, false));
        assert!(matches!(
            DiskImage::open(&p, true, false),
            Err(DiskError::Locked { .. })
        ));
    }

    fn run(engine: &mut IoEngine, fd: RawFd, ops: Vec<IoOp>) -> Vec<(u64, IoResult)> {
        for (i, op) in ops.into_iter().enumerate() {
            engine.push(fd, i as u64, op);
        }
        engine.submit().unwrap();
        let mut done = Vec::new();
        while engine.in_flight() > 0 {
            engine.wait().unwrap();
            let mut out = Vec::new();
            engine.reap(&mut out);
            done.extend(out.into_iter().map(|(t, _, r)| (t, r)));
        }
        done.sort_unstable();
        done
    }

    #[test]
    fn reads_writes_flush_and_zeroing_through_the_ring() {
        engine_round_trip(IoEngineKind::Uring);
    }

    #[test]
    fn reads_writes_flush_and_zeroing_without_io_uring() {
        engine_round_trip(IoEngineKind::Sync);
    }

    fn engine_round_trip(kind: IoEngineKind) {
        let (_t, p) = image(1 << 20);
        let disk = DiskImage::open(&p, false, false).unwrap();
        let mut engine = IoEngine::new(8, &p, kind).unwrap();
        let mut a = vec![0xaau8; 4096];
        let mut b = vec![0xbbu8; 4096];
        let iov = |buf: &mut Vec<u8>| libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // More operations than ring entries: the backlog must carry them.
        let mut ops = vec![IoOp::Write {
            offset: 8192,
            iovecs: vec![iov(&mut a), iov(&mut b)],
        }];
        for _ in 0..10 {
            ops.push(IoOp::Flush);
        }
        let done = run(&mut engine, disk.fd(), ops);
        assert_eq!(done.len(), 11);
        assert_eq!(done[0], (0, 8192));
        assert!(done[1..].iter().all(|&(_, r)| r == 0));

        let mut f = File::open(&p).unwrap();
        let mut back = vec![0u8; 8192];
        f.seek(SeekFrom::Start(8192)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back[..4096].iter().all(|&x| x == 0xaa));
        assert!(back[4096..].iter().all(|&x| x == 0xbb));

        let mut r = vec![0u8; 4096];
        let done = run(
            &mut engine,
            disk.fd(),
            vec![
                IoOp::WriteZeroes {
                    offset: 8192,
                    len: 4096,
                    unmap: false,
                },
                IoOp::Discard {
                    offset: 12288,
                    len: 4096,
                },
            ],
        );
        assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
        let done = run(
            &mut engine,
            disk.fd(),
            vec![IoOp::Read {
                offset: 8192,
                iovecs: vec![iov(&mut r)],
            }],
        );
        assert_eq!(done, vec![(0, 4096)]);
        assert!(r.iter().all(|&x| x == 0));
        assert!(engine.max_in_flight() >= 2);
        assert_eq!(engine.is_sync(), kind == IoEngineKind::Sync);
    }
}

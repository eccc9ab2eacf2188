//! crashfs: a FUSE filesystem with one fixed-size image file, `disk.img`, for crash-consistency
//! tests. A SIGKILL of a process cannot lose what it wrote into the host page cache, so killing
//! a VMM proves nothing about its FLUSH; this filesystem can lose data the way a power cut does.
//!
//! Durability model: the image exists twice, as `latest` (what reads return: every write,
//! synced or not) and `durable` (what survives a crash). A write lands in `latest` and marks its
//! 4 KiB pages dirty. `fsync`/`fdatasync` (the FUSE FSYNC request) copies the dirty pages into
//! `durable`. [`CrashFs::crash`] throws every dirty page away (`latest` goes back to
//! `durable`), fences the files opened before it (their writes and syncs fail with EIO from
//! then on, so a late request of a dead writer cannot leak into the next run) and returns the
//! durable image. Closing a file (FUSE FLUSH/RELEASE) makes nothing durable.
//!
//! Files are opened with FOPEN_DIRECT_IO, so the kernel caches no data: every read and write
//! reaches this process, and reads after a crash see the durable image. Byte-range and flock
//! locks are left to the kernel (the filesystem does not ask for FUSE_POSIX_LOCKS or
//! FUSE_FLOCK_LOCKS, so they work as on a local filesystem); fallocate is refused
//! (EOPNOTSUPP). The session is served by one thread of the calling process; mounting needs
//! `/dev/fuse` and root (the mount(2) call) or `fusermount3`.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// The image's name in the mount's root directory.
pub const IMAGE: &str = "disk.img";

/// Granularity of the dirty tracking.
const PAGE: u64 = 4096;
const IMAGE_INO: INodeNo = INodeNo(2);
/// The attributes never change (fixed size), so the kernel may keep them for a while.
const TTL: Duration = Duration::from_secs(1);

/// Counters since the mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub writes: u64,
    pub written_bytes: u64,
    pub syncs: u64,
    /// Writes and syncs refused because their file was opened before the last crash/reset.
    pub fenced: u64,
}

/// What a crash left.
#[derive(Clone, Debug)]
pub struct Crashed {
    /// The durable image: everything synced before the crash.
    pub durable: Vec<u8>,
    /// Pages that held unsynced data and lost it.
    pub lost_pages: u64,
}

struct State {
    latest: Vec<u8>,
    durable: Vec<u8>,
    /// Per 4 KiB page: written since the last sync.
    dirty: Vec<bool>,
    /// Handed out as the file handle; bumped by crash and reset to fence older opens.
    epoch: u64,
    stats: Stats,
}

impl State {
    fn new(size: u64) -> Self {
        let len = size as usize;
        State {
            latest: vec![0; len],
            durable: vec![0; len],
            dirty: vec![false; size.div_ceil(PAGE) as usize],
            epoch: 1,
            stats: Stats::default(),
        }
    }

    fn pages(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        let first = (off / PAGE) as usize;
        let end = (off + len).div_ceil(PAGE) as usize;
        first..end.min(self.dirty.len())
    }

    fn page_bytes(&self, p: usize) -> std::ops::Range<usize> {
        let start = p * PAGE as usize;
        start..(start + PAGE as usize).min(self.latest.len())
    }

    fn write(&mut self, fh: u64, off: u64, data: &[u8]) -> Result<u32, Errno> {
        if fh != self.epoch {
            self.stats.fenced += 1;
            return Err(Errno::EIO);
        }
        let size = self.latest.len() as u64;
        let end = off.checked_add(data.len() as u64).ok_or(Errno::EINVAL)?;
        if end > size {
            // A fixed-size image: growing it is refused like a full disk.
            return Err(Errno::ENOSPC);
        }
        self.latest[off as usize..end as usize].copy_from_slice(data);
        for p in self.pages(off, data.len() as u64) {
            self.dirty[p] = true;
        }
        self.stats.writes += 1;
        self.stats.written_bytes += data.len() as u64;
        u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
    }

    fn read(&self, off: u64, size: u32) -> &[u8] {
        let len = self.latest.len() as u64;
        let start = off.min(len) as usize;
        let end = off.saturating_add(size as u64).min(len) as usize;
        &self.latest[start..end]
    }

    fn sync(&mut self, fh: u64) -> Result<(), Errno> {
        if fh != self.epoch {
            self.stats.fenced += 1;
            return Err(Errno::EIO);
        }
        for p in 0..self.dirty.len() {
            if self.dirty[p] {
                let r = self.page_bytes(p);
                self.durable[r.clone()].copy_from_slice(&self.latest[r]);
                self.dirty[p] = false;
            }
        }
        self.stats.syncs += 1;
        Ok(())
    }

    fn crash(&mut self) -> Crashed {
        let mut lost_pages = 0;
        for p in 0..self.dirty.len() {
            if self.dirty[p] {
                let r = self.page_bytes(p);
                self.latest[r.clone()].copy_from_slice(&self.durable[r]);
                self.dirty[p] = false;
                lost_pages += 1;
            }
        }
        self.epoch += 1;
        Crashed {
            durable: self.durable.clone(),
            lost_pages,
        }
    }

    fn reset(&mut self) {
        self.latest.fill(0);
        self.durable.fill(0);
        self.dirty.fill(false);
        self.epoch += 1;
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves plain bytes behind, still usable.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

struct Fs {
    state: Arc<Mutex<State>>,
    size: u64,
    uid: u32,
    gid: u32,
}

impl Fs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o755, 0, 2),
            IMAGE_INO => (FileType::RegularFile, 0o644, self.size, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.attr(IMAGE_INO) {
            Some(a) if parent == INodeNo::ROOT && name == IMAGE => {
                reply.entry(&TTL, &a, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.attr(ino) {
            // The size is fixed; other attribute changes are accepted and ignored.
            Some(_) if size.is_some_and(|s| s != self.size) => reply.error(Errno::EPERM),
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        let epoch = lock(&self.state).epoch;
        reply.opened(FileHandle(epoch), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        reply.data(lock(&self.state).read(offset, size));
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        match lock(&self.state).write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    /// close(2): nothing becomes durable.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// fsync(2) and fdatasync(2) alike: the file has no metadata that changes.
    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino != IMAGE_INO {
            return reply.ok();
        }
        match lock(&self.state).sync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EOPNOTSUPP);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, IMAGE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted crashfs; unmounted when dropped.
pub struct CrashFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl CrashFs {
    /// Mounts a crashfs on `mountpoint` (an existing empty directory) with an all-zero image
    /// of `size` bytes.
    pub fn mount(mountpoint: &Path, size: u64) -> io::Result<CrashFs> {
        if usize::try_from(size).is_err() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "image too large",
            ));
        }
        let state = Arc::new(Mutex::new(State::new(size)));
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let fs = Fs {
            state: state.clone(),
            size,
            uid,
            gid,
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("crashfs".into()),
            MountOption::Subtype("crashfs".into()),
        ];
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(CrashFs {
            state,
            mountpoint: mountpoint.to_path_buf(),
            session: Some(session),
        })
    }

    /// The image file inside the mount.
    pub fn image(&self) -> PathBuf {
        self.mountpoint.join(IMAGE)
    }

    /// Loses every unsynced write, fences the files open now, and returns the durable image.
    pub fn crash(&self) -> Crashed {
        lock(&self.state).crash()
    }

    /// All zeroes again, durable and latest alike; files open now are fenced.
    pub fn reset(&self) {
        lock(&self.state).reset();
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state).stats
    }

    /// Unmounts and waits for the session thread.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for CrashFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // Nothing to report to from a destructor; a busy mount is detached by the kernel
            // when its last user goes.
            let _ = s.umount_and_join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsynced_pages_are_lost_and_synced_ones_kept() {
        let mut s = State::new(4 * PAGE);
        let fh = s.epoch;
        s.write(fh, 0, &[1; 10]).unwrap();
        s.write(fh, PAGE + 100, &[2; 8]).unwrap();
        assert_eq!(s.read(0, 3), &[1, 1, 1]);
        s.sync(fh).unwrap();
        s.write(fh, 5, &[3; 2]).unwrap();
        s.write(fh, 3 * PAGE, &[4; 4]).unwrap();
        // Reads see the unsynced data while running.
        assert_eq!(s.read(4, 4), &[1, 3, 3, 1]);
        let c = s.crash();
        assert_eq!(c.lost_pages, 2);
        assert_eq!(&c.durable[..10], &[1; 10]);
        assert_eq!(
            &c.durable[PAGE as usize + 100..PAGE as usize + 108],
            &[2; 8]
        );
        assert!(c.durable[3 * PAGE as usize..].iter().all(|&b| b == 0));
        // Reads after the crash see only the durable image.
        assert_eq!(s.read(4, 4), &[1, 1, 1, 1]);
        // The file opened before the crash is fenced; a new open works.
        assert_eq!(s.write(fh, 0, &[9]), Err(Errno::EIO));
        assert_eq!(s.sync(fh), Err(Errno::EIO));
        assert_eq!(s.stats.fenced, 2);
        let fh2 = s.epoch;
        assert_eq!(s.write(fh2, 0, &[9]), Ok(1));
    }

    #[test]
    fn writes_past_the_end_are_refused_and_reads_clamped() {
        let mut s = State::new(PAGE + 512);
        let fh = s.epoch;
        assert_eq!(s.write(fh, PAGE, &[1; 512]), Ok(512));
        assert_eq!(s.write(fh, PAGE + 1, &[1; 512]), Err(Errno::ENOSPC));
        assert_eq!(s.write(fh, u64::MAX, &[1; 2]), Err(Errno::EINVAL));
        assert_eq!(s.read(PAGE + 500, 100).len(), 12);
        assert!(s.read(u64::MAX, 100).is_empty());
        // The short last page syncs and crashes like the others.
        s.sync(fh).unwrap();
        assert_eq!(s.crash().durable[PAGE as usize..], [1; 512]);
    }

    #[test]
    fn reset_zeroes_both_images() {
        let mut s = State::new(PAGE);
        let fh = s.epoch;
        s.write(fh, 0, &[5; 16]).unwrap();
        s.sync(fh).unwrap();
        s.reset();
        assert!(s.read(0, 16).iter().all(|&b| b == 0));
        assert!(s.crash().durable.iter().all(|&b| b == 0));
    }
}

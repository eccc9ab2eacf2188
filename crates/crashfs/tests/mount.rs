//! crashfs through the kernel: what vireo does to an image (open O_RDWR, flock, an OFD lock,
//! pwrite, pread, fdatasync, fallocate) on a real mount, and a crash afterwards.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crashfs::CrashFs;

fn fuse_available(test: &str) -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: /dev/fuse is absent on this host !!!!!!!!\n");
    false
}

#[test]
fn only_synced_writes_survive_a_crash_through_the_mount() {
    if !fuse_available("only_synced_writes_survive_a_crash_through_the_mount") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("crashfs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fs = CrashFs::mount(&dir, 1 << 20).expect("mount crashfs (needs root or fusermount3)");
    assert_eq!(std::fs::metadata(fs.image()).unwrap().len(), 1 << 20);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(fs.image())
        .unwrap();
    // The locks vireo takes: flock, and an OFD record lock over the whole file.
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    // SAFETY: an all-zero flock is valid; F_OFD_SETLK reads it.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: as above.
    assert_eq!(
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &l) },
        0
    );
    // A second open cannot take the lock (so the kernel really keeps it).
    let g = OpenOptions::new().read(true).open(fs.image()).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_ne!(
        unsafe { libc::flock(g.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) },
        0
    );

    f.write_all_at(&[0xaa; 8192], 0).unwrap();
    f.sync_data().unwrap();
    f.write_all_at(&[0xbb; 4096], 4096).unwrap();
    f.write_all_at(&[0xcc; 4096], 65536).unwrap();
    // Reads see every write while running, synced or not.
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, 4094).unwrap();
    assert_eq!(b, [0xaa, 0xaa, 0xbb, 0xbb]);
    f.read_exact_at(&mut b, 65536).unwrap();
    assert_eq!(b, [0xcc; 4]);
    // fallocate is refused, as vireo expects of some filesystems.
    // SAFETY: fallocate on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    assert_ne!(r, 0);

    let crashed = fs.crash();
    assert_eq!(crashed.lost_pages, 2);
    assert!(crashed.durable[..8192].iter().all(|&x| x == 0xaa));
    assert!(crashed.durable[8192..].iter().all(|&x| x == 0));
    // After the crash reads see the durable image (no page cache), and the old file is dead.
    f.read_exact_at(&mut b, 4096).unwrap();
    assert_eq!(b, [0xaa; 4]);
    assert!(f.write_all_at(&[1], 0).is_err());
    assert!(f.sync_data().is_err());
    drop((f, g));
    let stats = fs.stats();
    assert_eq!((stats.writes, stats.syncs), (3, 1));
    fs.unmount().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

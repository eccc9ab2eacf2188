//! Crash consistency of virtio-blk FLUSH. Killing vireo alone proves nothing (the host page
//! cache keeps everything it wrote), so the image lives on crashfs (`crates/crashfs`), a FUSE
//! filesystem that keeps writes unsynced until fsync/fdatasync and loses every unsynced one
//! when told to crash. Each trial boots the probe guest in `blk-crash` mode on a zeroed image,
//! SIGKILLs vireo at a random moment after its first acknowledged FLUSH, crashes the
//! filesystem, and checks the durable image: every block whose last write before the last
//! acknowledged FLUSH must hold that write, or a later one, intact.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use crashfs::CrashFs;

const TRIALS: u64 = 100;
/// 256 blocks of 4 KiB: small, so that later writes often land on blocks written before.
const DISK: u64 = 1 << 20;
const BLOCK: usize = 4096;
/// The longest a trial runs on after the guest's first acknowledged FLUSH.
const MAX_DELAY_MS: u64 = 300;

// What crates/probe/src/blkcrash.rs writes.
const MAGIC: u64 = 0x4853_4152_4343_4c42;
const PATTERN: u64 = 0x9E37_79B9_7F4A_7C15;

fn index(seed: u64, g: u64, mask: u64) -> u64 {
    let x = (g ^ seed).wrapping_mul(PATTERN);
    (x ^ x >> 29) & mask
}

fn checksum(seed: u64, i: u64, g: u64) -> u64 {
    (i ^ g.rotate_left(32) ^ seed).wrapping_mul(PATTERN) ^ MAGIC
}

fn words(b: &[u8]) -> impl Iterator<Item = u64> + '_ {
    b.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8-byte chunk")))
}

/// The write a block holds: None for all zeroes, Some(g) for write g intact, Err otherwise.
fn holds(b: &[u8], seed: u64, i: u64, mask: u64) -> Result<Option<u64>, String> {
    if b.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let w: Vec<u64> = words(b).collect();
    let g = w[3];
    let sum = checksum(seed, i, g);
    if w[0] != MAGIC || w[1] != seed || w[2] != i || index(seed, g, mask) != i {
        return Err(format!(
            "block {i}: header {:#x?} is no write of this run",
            &w[..4]
        ));
    }
    if let Some(k) = w[4..].iter().position(|&x| x != sum) {
        return Err(format!("block {i}: write g={g} is torn at word {}", k + 4));
    }
    Ok(Some(g))
}

/// Checks the durable image after the guest saw FLUSH acknowledged for writes `0..acked`,
/// written `batch` at a time. Writes of one batch are in flight together, so of two to the
/// same block either may land last; the block must hold one of the last batch that wrote it
/// before `acked`, or a later write. Returns how many blocks the acknowledged writes covered.
fn check(image: &[u8], seed: u64, batch: u64, acked: u64) -> Result<u64, String> {
    let blocks = (image.len() / BLOCK) as u64;
    let mask = blocks - 1;
    // Per block: the first acknowledged write of the last batch that wrote it.
    let mut last: Vec<Option<u64>> = vec![None; blocks as usize];
    for g in 0..acked {
        let l = &mut last[index(seed, g, mask) as usize];
        if l.is_none_or(|f| f / batch != g / batch) {
            *l = Some(g);
        }
    }
    let mut errors = Vec::new();
    for (i, b) in image.chunks_exact(BLOCK).enumerate() {
        match (last[i], holds(b, seed, i as u64, mask)) {
            (_, Err(e)) => errors.push(e),
            (Some(want), Ok(None)) => errors.push(format!(
                "block {i}: acknowledged write g={want} lost (block is zero)"
            )),
            (Some(want), Ok(Some(g))) if g < want => errors.push(format!(
                "block {i}: holds write g={g}, older than acknowledged write g={want} \
                 (or one after it in its batch)"
            )),
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(last.iter().filter(|l| l.is_some()).count() as u64)
    } else {
        Err(errors.join("\n"))
    }
}

fn fuse_available(test: &str) -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("\n!!!!!!!! SKIPPED {test}: /dev/fuse is absent on this host !!!!!!!!\n");
    false
}

/// xorshift64*: trial parameters from one printed seed, so a failing run can be replayed
/// with VIREO_CRASH_SEED.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Waits until no open file holds the image's lock: a killed vireo's io_uring is torn down
/// after the process is reaped, and with it the last reference to the image's open file.
fn wait_unlocked(image: &Path) {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let f = std::fs::File::open(image).expect("open the image");
        // SAFETY: flock on a descriptor we own; closing it drops the lock again.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the killed vireo's image stayed locked for 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn flushed(fin: &Finished) -> Option<u64> {
    fin.lines_with("probe: blk-crash flushed")
        .iter()
        .filter_map(|l| field(l, "gen")?.parse().ok())
        .max()
}

#[test]
fn acknowledged_flushes_survive_a_host_crash_at_any_moment() {
    let name = "acknowledged_flushes_survive_a_host_crash_at_any_moment";
    if !kvm_available(name) || !fuse_available(name) {
        return;
    }
    let dir = scratch("crash");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = CrashFs::mount(&mnt, DISK).expect("mount crashfs (needs root or fusermount3)");
    let image = fs.image();
    let elf = probe_elf();
    let elf = elf.to_str().unwrap();

    let seed = std::env::var("VIREO_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            t.as_nanos() as u64 | 1
        });
    eprintln!("crash: VIREO_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let (mut failed, mut acked_total, mut covered_total) = (Vec::new(), 0u64, 0u64);
    let (mut lost_total, mut trials_losing) = (0u64, 0u64);
    for trial in 0..TRIALS {
        fs.reset();
        let guest_seed = rng.next() >> 1;
        let batch = 1 + rng.next() % 8;
        let delay = Duration::from_millis(rng.next() % (MAX_DELAY_MS + 1));
        // Both I/O engines: io_uring's Fsync and the synchronous fdatasync.
        let engine = ["io_uring", "sync"][trial as usize % 2];
        let disk = format!("path={},io_engine={engine}", image.display());
        let cmdline =
            format!("probe.mode=blk-crash probe.blk.seed={guest_seed} probe.blk.batch={batch}");
        let run = spawn(&["--kernel", elf, "--cmdline", &cmdline, "--disk", &disk]);
        let first = run.wait_for_line(PROBE_TIMEOUT, |l| {
            l.starts_with("probe: blk-crash flushed") || l.starts_with("probe: error")
        });
        if first
            .as_deref()
            .is_some_and(|l| !l.starts_with("probe: error"))
        {
            std::thread::sleep(delay);
        }
        let fin = run.kill();
        wait_unlocked(&image);
        let crashed = fs.crash();
        let what = format!(
            "trial {trial} ({cmdline}, io_engine={engine}, killed {delay:?} after the first flush)"
        );
        let acked = flushed(&fin);
        let errors: Vec<&str> = fin.lines_with("probe: error");
        // The guest must still have been running (killed, not exited) with no errors.
        if acked.is_none() || fin.code.is_some() || !errors.is_empty() {
            panic!(
                "{what}: the guest did not run as expected: exit code {:?}\n--- console ---\n{}\n--- stderr ---\n{}",
                fin.code, fin.stdout, fin.stderr
            );
        }
        let acked = acked.unwrap_or(0);
        acked_total += acked;
        lost_total += crashed.lost_pages;
        trials_losing += (crashed.lost_pages > 0) as u64;
        match check(&crashed.durable, guest_seed, batch, acked) {
            Ok(covered) => covered_total += covered,
            Err(e) => failed.push(format!(
                "{what}: acknowledged writes 0..{acked}, {} unsynced pages lost:\n{e}",
                crashed.lost_pages
            )),
        }
    }
    let stats = fs.stats();
    eprintln!(
        "crash: {TRIALS} trials in {:.1} s, {} failed; {acked_total} acknowledged writes covering \
         {covered_total} blocks; {lost_total} unsynced pages lost in {trials_losing} trials; \
         crashfs saw {} writes, {} syncs, {} fenced requests",
        started.elapsed().as_secs_f64(),
        failed.len(),
        stats.writes,
        stats.syncs,
        stats.fenced
    );
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failed.is_empty(),
        "{} of {TRIALS} trials lost acknowledged writes (VIREO_CRASH_SEED={seed}):\n{}",
        failed.len(),
        failed.join("\n\n")
    );
    // The crash must have had something to lose, or the test proved nothing.
    assert!(
        trials_losing > 0,
        "no trial had unsynced data when it crashed"
    );
}

/// Write `g` as the guest makes it, into its block of `image`; the block's index.
fn put(image: &mut [u8], seed: u64, mask: u64, g: u64) -> usize {
    let i = index(seed, g, mask) as usize;
    let sum = checksum(seed, i as u64, g);
    for (k, w) in image[i * BLOCK..(i + 1) * BLOCK]
        .chunks_exact_mut(8)
        .enumerate()
    {
        let v = [MAGIC, seed, i as u64, g].get(k).copied().unwrap_or(sum);
        w.copy_from_slice(&v.to_le_bytes());
    }
    i
}

/// The check itself catches each way a block can be wrong.
#[test]
fn the_check_finds_lost_stale_torn_and_foreign_blocks() {
    let (seed, blocks) = (12345u64, 16u64);
    let mask = blocks - 1;
    let mut image = vec![0u8; blocks as usize * BLOCK];
    for g in 0..40 {
        put(&mut image, seed, mask, g);
    }
    assert!(check(&image, seed, 1, 40).is_ok());
    // Writes past the acknowledged ones may or may not be there.
    assert!(check(&image, seed, 1, 20).is_ok());
    let good = image.clone();

    // Lost: the last write's block back to zero.
    let i = index(seed, 39, mask) as usize;
    image[i * BLOCK..(i + 1) * BLOCK].fill(0);
    assert!(check(&image, seed, 1, 40).unwrap_err().contains("lost"));

    // Stale: an older write to the same block in its place.
    let older = (0..39).rev().find(|&g| index(seed, g, mask) as usize == i);
    put(
        &mut image,
        seed,
        mask,
        older.expect("40 writes on 16 blocks repeat one"),
    );
    assert!(check(&image, seed, 1, 40).unwrap_err().contains("older"));

    // Two writes to one block in one batch were in flight together: either may be last.
    let mut image = good.clone();
    let (a, b) = (0..40u64)
        .flat_map(|a| (a + 1..(a / 4 + 1) * 4).map(move |b| (a, b)))
        .filter(|&(a, b)| index(seed, a, mask) == index(seed, b, mask))
        .find(|&(_, b)| (b + 1..40).all(|c| index(seed, c, mask) != index(seed, b, mask)))
        .expect("two writes to one block in one batch of 4");
    assert!(b > a);
    put(&mut image, seed, mask, a);
    assert!(check(&image, seed, 4, 40).is_ok());
    assert!(check(&image, seed, 1, 40).unwrap_err().contains("older"));

    // Torn and foreign.
    let mut torn = good.clone();
    torn[i * BLOCK + 100] ^= 1;
    assert!(check(&torn, seed, 1, 40).unwrap_err().contains("torn"));
    let mut foreign = good.clone();
    foreign[i * BLOCK + 8] ^= 1;
    assert!(check(&foreign, seed, 1, 40)
        .unwrap_err()
        .contains("no write of this run"));
}

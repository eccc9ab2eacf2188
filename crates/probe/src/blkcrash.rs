//! `probe.mode=blk-crash`: writes for a crash-consistency test, on the first disk. Write number
//! g (the generation, from 0) goes to the 4 KiB block `index(seed, g)` of the first 2^k blocks
//! of the disk and fills it with `block(seed, index, g)`: words MAGIC, seed, index, g, then
//! the checksum word repeated to the end. Writes go in batches of `probe.blk.batch=N` (default
//! 4, at most 16) in flight together; once the whole batch has completed, a FLUSH; once the
//! device has acknowledged it, `probe: blk-crash flushed gen=N`: every write with g < N is on
//! stable storage. Then the next batch, until the VM is killed (or `probe.blk.rounds=N`
//! batches, then PROBE-OK). Seed: `probe.blk.seed=N`.
//!
//! The line goes out once the next batch's first write has completed: printing takes longer
//! than the I/O (every byte is an exit), so a kill during it finds unsynced writes to lose.
//!
//! The host recomputes indices and contents from the seed (crates/vireo/tests/crash.rs), so
//! the guest's loop is a few dozen instructions and one `rep stosq` per block.

use crate::blk::{self, Job, Status, F_FLUSH, ST_OK, T_FLUSH, T_OUT};
use crate::phys::Arena;
use crate::say;
use crate::serial::{Dec, Text};
use crate::virtio;

pub const MAGIC: u64 = 0x4853_4152_4343_4c42; // "BLCCRASH" little-endian
const BLOCK: u64 = 4096;
const MAX_BATCH: u64 = 16;

/// The block write number `g` goes to (of `mask + 1` blocks, a power of two).
fn index(seed: u64, g: u64, mask: u64) -> u64 {
    let x = (g ^ seed).wrapping_mul(blk::PATTERN);
    (x ^ x >> 29) & mask
}

/// The word that fills block `i` after its header, for write `g`.
fn checksum(seed: u64, i: u64, g: u64) -> u64 {
    (i ^ g.rotate_left(32) ^ seed).wrapping_mul(blk::PATTERN) ^ MAGIC
}

fn fill(buf: u64, seed: u64, i: u64, g: u64) {
    // SAFETY: `[buf, buf + BLOCK)` is a request buffer of ours.
    unsafe {
        core::arch::asm!("rep stosq", inout("rcx") BLOCK / 8 => _, inout("rdi") buf => _,
                         in("rax") checksum(seed, i, g), options(nostack, preserves_flags));
        let w = buf as *mut u64;
        w.write_volatile(MAGIC);
        w.add(1).write_volatile(seed);
        w.add(2).write_volatile(i);
        w.add(3).write_volatile(g);
    }
}

/// `probe.blk.batch=` and `probe.blk.rounds=` (0: until the VM is stopped).
fn words(cmdline: &'static [u8]) -> Option<(u64, u64)> {
    let (mut batch, mut rounds) = (Some(4), Some(0));
    for w in cmdline.split(|&c| c == b' ') {
        if let Some(v) = w.strip_prefix(b"probe.blk.batch=") {
            batch = crate::number(v).filter(|&b| (1..=MAX_BATCH).contains(&b));
        } else if let Some(v) = w.strip_prefix(b"probe.blk.rounds=") {
            rounds = crate::number(v);
        } else {
            continue;
        }
        if batch.is_none() || rounds.is_none() {
            say!("probe: error blk-crash unparsable ", Text(w));
            return None;
        }
    }
    batch.zip(rounds)
}

pub fn run(cmdline: &'static [u8]) -> bool {
    let o = blk::opts(cmdline);
    let Some((batch, rounds)) = words(cmdline) else {
        return false;
    };
    let mut ok = !o.bad;
    let devs = virtio::discover(cmdline);
    let mut arena = Arena::new(crate::bootinfo::get());
    let Some(bufs) = arena.alloc(MAX_BATCH * BLOCK, 4096) else {
        say!("probe: error blk-crash no memory");
        return false;
    };
    let mut list = blk::disks(&devs, &mut arena, 1, &mut ok);
    let Some(d) = list.d[0].as_mut() else {
        say!("probe: error blk-crash no disk");
        return false;
    };
    if !d.has(F_FLUSH) || d.ro() {
        say!("probe: error blk-crash disk is read-only or has no FLUSH");
        return false;
    }
    let mut blocks = 1;
    while blocks * 2 <= d.bytes() / BLOCK {
        blocks *= 2;
    }
    let (seed, mask) = (o.seed, blocks - 1);
    say!(
        "probe: blk-crash start blocks=",
        Dec(blocks),
        " batch=",
        Dec(batch),
        " seed=",
        Dec(seed)
    );
    let (mut gen, mut round) = (0u64, 0u64);
    // An acknowledged FLUSH whose line is not out yet.
    let mut acked = None;
    let line = |n: u64| say!("probe: blk-crash flushed gen=", Dec(n));
    while ok && (rounds == 0 || round < rounds) {
        let end = gen + batch;
        let writes = blk::pipeline(
            d,
            bufs,
            BLOCK,
            batch as usize,
            |buf| {
                if gen == end {
                    return None;
                }
                let i = index(seed, gen, mask);
                fill(buf, seed, i, gen);
                gen += 1;
                Some(Job {
                    typ: T_OUT,
                    sector: i * (BLOCK / 512),
                    len: BLOCK as u32,
                })
            },
            |_, _, _| {
                if let Some(n) = acked.take() {
                    line(n);
                }
            },
        );
        let flush = writes.and_then(|st| {
            if st.not_ok != 0 {
                say!("probe: error blk-crash write status=", Status(st.status()));
                return Ok(None);
            }
            let j = Job {
                typ: T_FLUSH,
                sector: 0,
                len: 0,
            };
            blk::single(d, bufs, j).map(Some)
        });
        match flush {
            Ok(Some(ST_OK)) => acked = Some(gen),
            Ok(Some(s)) => {
                say!("probe: error blk-crash flush status=", Status(s));
                ok = false;
            }
            Ok(None) => ok = false,
            Err(e) => {
                say!("probe: error blk-crash ", e);
                ok = false;
            }
        }
        round += 1;
    }
    if let Some(n) = acked {
        line(n);
    }
    d.m.reset();
    ok
}

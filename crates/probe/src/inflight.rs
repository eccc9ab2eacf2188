//! `probe.mode=blk-inflight`: the requests-in-flight attack. Each round makes one read
//! available (head 0, 64 KiB) with a few copies of the same head behind it, then keeps the
//! available ring just ahead of the device by making that head available again and again
//! while the device still holds it, paced so
//! the available index never runs more than a queue ahead of what was used (a device cannot
//! call that ring malformed). A device that trusted the ring would keep taking the same
//! request forever, growing its in-flight work; a correct one raises DEVICE_NEEDS_RESET
//! (the driver broke §2.7.13). The round then resets the device and starts over.
//!
//! `probe.blk.rounds=N` (0, the default: until the VM is stopped) rounds; a progress line
//! every 100 rounds: `probe: blk-inflight rounds=N needs-reset=N completed=N`.

use crate::blk::{self, T_IN};
use crate::phys::{self, rdtsc, Arena};
use crate::say;
use crate::serial::{Dec, Text};
use crate::virtio::{self, D_NEXT, D_WRITE, S_NEEDS_RESET};

const DATA: u64 = 64 * 1024;
/// Copies of the head made available at once at the start of a round.
const BURST: u16 = 4;
/// TSC ticks one round waits for the device's answer to the re-posted head.
const ROUND_WAIT: u64 = 200_000_000;

fn rounds(cmdline: &'static [u8]) -> Option<u64> {
    let mut n = Some(0);
    for w in cmdline.split(|&c| c == b' ') {
        if let Some(v) = w.strip_prefix(b"probe.blk.rounds=") {
            n = crate::number(v);
            if n.is_none() {
                say!("probe: error blk unparsable ", Text(w));
            }
        }
    }
    n
}

pub fn run(cmdline: &'static [u8]) -> bool {
    let Some(limit) = rounds(cmdline) else {
        return false;
    };
    let mut ok = true;
    let devs = virtio::discover(cmdline);
    let mut arena = Arena::new(crate::bootinfo::get());
    let Some(buf) = arena.alloc(DATA, 4096) else {
        say!("probe: error blk-inflight no memory");
        return false;
    };
    let mut list = blk::disks(&devs, &mut arena, 1, &mut ok);
    let Some(d) = list.d[0].as_mut() else {
        say!("probe: error blk-inflight no disk");
        return false;
    };
    say!("probe: blk-inflight start");
    let (mut round, mut needs_reset, mut completed) = (0u64, 0u64, 0u64);
    while limit == 0 || round < limit {
        if let Err(e) = d.reopen() {
            say!("probe: error blk-inflight ", e);
            return false;
        }
        let c = d.ctrl;
        // SAFETY: slot 0's control bytes are ours.
        unsafe {
            (c as *mut u64).write_volatile(T_IN as u64);
            ((c + 8) as *mut u64).write_volatile(0);
            ((c + 32) as *mut u8).write_volatile(0xff);
        }
        d.q.set(0, c, 16, D_NEXT, 1);
        d.q.set(1, buf, DATA as u32, D_NEXT | D_WRITE, 2);
        d.q.set(2, c + 32, 1, D_WRITE, 0);
        // The head, and at once a few copies of it behind it on the ring.
        for _ in 0..BURST {
            d.q.push(0);
        }
        d.q.kick();
        // Then the same head again and again, never more than a queue ahead.
        let start = rdtsc();
        let mut broke = false;
        loop {
            if d.m.status() & S_NEEDS_RESET != 0 {
                broke = true;
                break;
            }
            while let Ok(Some(_)) = d.q.pop() {
                completed += 1;
            }
            if d.q.outstanding() < d.q.size {
                d.q.push(0);
                d.q.kick();
            }
            if rdtsc().wrapping_sub(start) >= ROUND_WAIT {
                break;
            }
        }
        needs_reset += broke as u64;
        round += 1;
        if round % 100 == 0 || round == limit {
            say!(
                "probe: blk-inflight rounds=",
                Dec(round),
                " needs-reset=",
                Dec(needs_reset),
                " completed=",
                Dec(completed)
            );
        }
        // Touch the buffer so a device that wrote it can be seen to have (and stay cheap).
        let _ = phys::rd8(buf);
    }
    d.m.reset();
    ok && needs_reset > 0
}

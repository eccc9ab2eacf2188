//! `probe.mode=blk-hostile`: requests and transport writes a correct driver never makes, one at
//! a time on a freshly reset device, each reported with what the device did; then a reset, a
//! new negotiation and a normal write and read, to show the device recovered.

use crate::blk::{self, Disk, Job, Status, ST_OK, T_IN, T_OUT, WANTED};
use crate::phys::{self, Arena};
use crate::say;
use crate::serial::{Dec, Emit, Hex};
use crate::virtio::{
    self, Wait, D_NEXT, D_WRITE, R_DEVICE_FEATURES, R_DEVICE_FEATURES_SEL, R_QUEUE_NUM,
    R_QUEUE_NUM_MAX, R_QUEUE_READY, R_QUEUE_SEL, S_ACKNOWLEDGE, S_DRIVER, S_FEATURES_OK,
    S_NEEDS_RESET,
};

const SCRATCH: u64 = 4 * 64 * 1024;

/// A guest-physical address with no RAM: 0x7_0000_0000, or the first 4 GiB boundary above
/// all RAM the memory map names.
pub fn outside_ram() -> u64 {
    let top = crate::bootinfo::get()
        .regions()
        .iter()
        .filter(|r| r.kind == 1)
        .map(|r| r.base.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    (0x7_0000_0000u64).max(top.div_ceil(1 << 32) << 32)
}

fn device_status(d: &Disk) {
    let s = d.m.status();
    say!(
        " device_status=",
        Hex(s as u64),
        " needs_reset=",
        Dec((s & S_NEEDS_RESET != 0) as u64)
    );
}

/// Posts one hand-made chain (descriptors 0.., head 0) on a fresh device and reports it.
fn request_case(
    d: &mut Disk,
    o: &blk::Opts,
    name: &str,
    typ: u32,
    sector: u64,
    chain: &[(u64, u32, u16, u16)],
) -> Result<(), &'static str> {
    if o.skipped(name) {
        say!("probe: blk-hostile case=", name, " skipped");
        return Ok(());
    }
    d.reopen()?;
    let c = d.ctrl;
    // SAFETY: slot 0's control bytes are ours.
    unsafe {
        (c as *mut u64).write_volatile(typ as u64);
        ((c + 8) as *mut u64).write_volatile(sector);
        ((c + 32) as *mut u8).write_volatile(0xff);
    }
    for (k, &(a, l, f, n)) in chain.iter().enumerate() {
        d.q.set(k as u16, a, l, f, n);
    }
    d.q.push(0);
    d.q.kick();
    let r = d.q.wait(Some(&d.m), virtio::WAIT);
    "probe: blk-hostile case=".emit();
    name.emit();
    " status=".emit();
    match r {
        Ok(_) => Status(phys::rd8(c + 32)).emit(),
        Err(Wait::Bad) => "bad-used-index".emit(),
        Err(_) => "no-completion".emit(),
    }
    device_status(d);
    d.m.reset();
    Ok(())
}

pub fn run(cmdline: &'static [u8]) -> bool {
    let o = blk::opts(cmdline);
    let mut ok = !o.bad;
    let devs = virtio::discover(cmdline);
    ok &= !devs.bad;
    let mut arena = Arena::new(crate::bootinfo::get());
    let Some(scratch) = arena.alloc(SCRATCH, 4096) else {
        say!("probe: error blk-hostile no memory");
        return false;
    };
    let mut list = blk::disks(&devs, &mut arena, 8, &mut ok);
    let ro_index = list
        .d
        .iter()
        .take(list.n)
        .position(|d| d.as_ref().is_some_and(|d| d.ro()));
    let Some(d) = list.d[0].as_mut() else {
        say!("probe: error blk-hostile no disk");
        return false;
    };
    match requests(d, &o, scratch) {
        Ok(()) => {}
        Err(e) => {
            say!("probe: error blk-hostile ", e);
            ok = false;
        }
    }
    // A write to a read-only disk (the first one that is).
    if o.skipped("ro-write") {
        say!("probe: blk-hostile case=ro-write skipped");
    } else {
        match ro_index.and_then(|k| list.d[k].as_mut()) {
            Some(r) => ro_write(r, scratch),
            None => say!("probe: blk-hostile case=ro-write skipped=no-read-only-disk"),
        }
    }
    let Some(d) = list.d[0].as_mut() else {
        return false;
    };
    transport(d, &o);
    let rec = recovery(d, &o, scratch);
    say!(
        "probe: blk-hostile recovery=",
        if rec { "ok" } else { "failed" }
    );
    d.m.reset();
    ok && rec
}

fn requests(d: &mut Disk, o: &blk::Opts, b: u64) -> Result<(), &'static str> {
    let (h, s) = (d.ctrl, d.ctrl + 32);
    let far = outside_ram();
    const NW: u16 = D_NEXT | D_WRITE;
    let cap = d.cfg.capacity;
    // A write, so every descriptor of the loop is device-readable: only loop detection (not
    // a readable-after-writable order check) can stop it.
    request_case(
        d,
        o,
        "desc-loop",
        T_OUT,
        0,
        &[(h, 16, D_NEXT, 1), (b, 512, D_NEXT, 0)],
    )?;
    request_case(
        d,
        o,
        "addr-outside-ram",
        T_IN,
        0,
        &[(h, 16, D_NEXT, 1), (far, 512, NW, 2), (s, 1, D_WRITE, 0)],
    )?;
    // A write: header and data, nothing the device may write to.
    request_case(
        d,
        o,
        "no-status-desc",
        T_OUT,
        0,
        &[(h, 16, D_NEXT, 1), (b, 512, 0, 0)],
    )?;
    request_case(
        d,
        o,
        "zero-len-status",
        T_IN,
        0,
        &[(h, 16, D_NEXT, 1), (b, 512, NW, 2), (s, 0, D_WRITE, 0)],
    )?;
    request_case(
        d,
        o,
        "header-device-writable",
        T_IN,
        0,
        &[(h, 16, NW, 1), (b, 512, NW, 2), (s, 1, D_WRITE, 0)],
    )?;
    request_case(
        d,
        o,
        "sector-past-end",
        T_IN,
        cap,
        &[(h, 16, D_NEXT, 1), (b, 512, NW, 2), (s, 1, D_WRITE, 0)],
    )?;
    // A write (the device only reads the data), so a device that accepts it cannot scribble
    // over guest memory.
    request_case(
        d,
        o,
        "absurd-length",
        T_OUT,
        0,
        &[
            (h, 16, D_NEXT, 1),
            (b, 0xffff_f000, D_NEXT, 2),
            (s, 1, D_WRITE, 0),
        ],
    )?;
    request_case(
        d,
        o,
        "unknown-type",
        0x77,
        0,
        &[(h, 16, D_NEXT, 1), (s, 1, D_WRITE, 0)],
    )?;
    Ok(())
}

/// Reads the region's first 4 KiB and writes it back unchanged: if the device does take the
/// write, nothing on the disk changes.
fn ro_write(d: &mut Disk, b: u64) {
    let rd = Job {
        typ: T_IN,
        sector: 0,
        len: 4096,
    };
    let r = d
        .reopen()
        .and_then(|()| blk::single(d, b, rd))
        .and_then(|_| blk::single(d, b, Job { typ: T_OUT, ..rd }));
    "probe: blk-hostile case=ro-write status=".emit();
    match r {
        Ok(s) => Status(s).emit(),
        Err(_) => "no-completion".emit(),
    }
    device_status(d);
    d.m.reset();
}

/// Transport violations: each on a freshly negotiated device, then a reset.
fn transport(d: &mut Disk, o: &blk::Opts) {
    let m = d.m;
    let mem = d.qmem;
    let ready_case = |name: &str, num: Option<u32>, desc: u64| {
        if o.skipped(name) {
            say!("probe: blk-hostile case=", name, " skipped");
            return;
        }
        if let Err(e) = m.negotiate(WANTED) {
            say!("probe: error blk-hostile case=", name, " ", e);
            return;
        }
        m.wr(R_QUEUE_SEL, 0);
        let max = m.rd(R_QUEUE_NUM_MAX).min(virtio::MAX_QUEUE as u32);
        let num = match num {
            // A size that is not a power of two, within QueueNumMax.
            Some(n) => {
                let n = n.min(max);
                if n.is_power_of_two() {
                    n - 1
                } else {
                    n
                }
            }
            None => 1 << (31 - max.max(1).leading_zeros()),
        };
        phys::zero(mem.desc, virtio::QueueMem::BYTES);
        m.wr(R_QUEUE_NUM, num);
        m.queue_addresses(desc, mem.avail, mem.used);
        m.wr(R_QUEUE_READY, 1);
        let ready = m.rd(R_QUEUE_READY);
        say!(
            "probe: blk-hostile case=",
            name,
            " queue_ready=",
            Dec((ready & 1) as u64)
        );
        m.reset();
    };
    ready_case("queue-num-not-pow2", Some(100), mem.desc);
    ready_case("queue-addr-outside-ram", None, outside_ram());

    let name = "features-ok-unoffered";
    if o.skipped(name) {
        say!("probe: blk-hostile case=", name, " skipped");
        return;
    }
    if !m.reset() {
        say!(
            "probe: error blk-hostile case=",
            name,
            " reset did not complete"
        );
        return;
    }
    m.set_status(S_ACKNOWLEDGE);
    m.set_status(S_ACKNOWLEDGE | S_DRIVER);
    m.wr(R_DEVICE_FEATURES_SEL, 0);
    let lo = m.rd(R_DEVICE_FEATURES) as u64;
    m.wr(R_DEVICE_FEATURES_SEL, 1);
    let offered = (m.rd(R_DEVICE_FEATURES) as u64) << 32 | lo;
    // The lowest bit the device does not offer (bit 0, the legacy BARRIER, on most devices).
    let bit = (0..64).find(|b| offered & (1 << b) == 0).unwrap_or(63);
    m.driver_features(offered & WANTED | 1 << bit);
    m.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    let kept = m.status() & S_FEATURES_OK != 0;
    say!(
        "probe: blk-hostile case=",
        name,
        " features_ok=",
        Dec(kept as u64)
    );
    m.reset();
}

/// A normal 64 KiB write and read back at the region's start (the disk's start if the region
/// does not fit), after a new negotiation. On a read-only disk, the read alone.
fn recovery(d: &mut Disk, o: &blk::Opts, b: u64) -> bool {
    if let Err(e) = d.reopen() {
        say!("probe: error blk-hostile recovery: ", e);
        return false;
    }
    const LEN: u64 = 64 * 1024;
    let mut at = o.region_off & !511;
    if at.saturating_add(LEN) > d.bytes() {
        at = 0;
    }
    let (seed, write) = (o.seed, !d.ro());
    let w = if write {
        blk::sequential(
            d,
            b,
            T_OUT,
            (at, LEN),
            LEN,
            2,
            |buf, pos, l| blk::fill(buf, pos, l, seed),
            |_, _, _, _| {},
        )
    } else {
        Ok(blk::Stats::default())
    };
    let mut bad = 0;
    let r = blk::sequential(
        d,
        b,
        T_IN,
        (at, LEN),
        LEN,
        2,
        |_, _, _| {},
        |buf, pos, l, s| {
            bad += match s {
                ST_OK if write => blk::check(buf, pos, l, seed).0,
                ST_OK => 0,
                _ => 1,
            }
        },
    );
    match (w, r) {
        (Ok(w), Ok(r)) if w.not_ok == 0 && r.not_ok == 0 && r.bytes == LEN && bad == 0 => true,
        (Err(e), _) | (_, Err(e)) => {
            say!("probe: error blk-hostile recovery: ", e);
            false
        }
        _ => {
            say!("probe: error blk-hostile recovery: bad status or data");
            false
        }
    }
}

//! A polled virtio-blk driver (virtio 1.2 section 5.2) over virtio-mmio, and the `blk` and
//! `blk-bench` modes. Requests are chains: a 16-byte header (device-readable), data in one or
//! more descriptors, a 1-byte status (device-writable). Each request slot owns a fixed run of
//! descriptors, so the used ring's id names the slot; many slots are in flight at once.
//!
//! Command-line words: `probe.blk.region=OFFSET:LENGTH` (bytes, whole sectors; default
//! `0:262144`), `probe.blk.seed=N` (default 1), `probe.blk.verify-only=1`, `probe.blk.count=N`
//! (random reads of `blk-bench`, default 4096), `probe.blk.skip=CASE,CASE` (`blk-hostile`).
//! The pattern: the 8-byte little-endian word at disk byte offset o holds
//! `o.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed`.
//!
//! `blk`, on every modern block device: the pattern over the region (64 KiB requests, up to 16
//! in flight; not with verify-only or on a read-only disk), FLUSH, read back and compare,
//! DISCARD and WRITE_ZEROES on the 128 KiB after the region (zeroed half read back), GET_ID,
//! and on a read-only disk one write (of what the disk already holds). `blk-bench`, on the
//! first disk: sequential 1 MiB writes and reads (8 in flight) over the region, then `count`
//! 4 KiB reads at random 4 KiB-aligned offsets in it (32 in flight), timed in TSC ticks.
//! Any failure prints `probe: error ...` and ends the run with PROBE-FAIL.
use crate::phys::{self, rdtsc, Arena};
use crate::say;
use crate::serial::{Dec, Emit, Hex, Text};
use crate::virtio::{
    self, Found, Mmio, Queue, QueueMem, Wait, D_NEXT, D_WRITE, F_EVENT_IDX, F_VERSION_1,
};

// Request types (section 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

// Status values.
pub const ST_OK: u8 = 0;
pub const ST_IOERR: u8 = 1;
pub const ST_UNSUPP: u8 = 2;

// Feature bits (section 5.2.3).
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

/// What a Linux driver would accept, of what the probe can use.
pub const WANTED: u64 = F_VERSION_1
    | F_FLUSH
    | F_SEG_MAX
    | F_SIZE_MAX
    | F_BLK_SIZE
    | F_RO
    | F_EVENT_IDX
    | F_DISCARD
    | F_WRITE_ZEROES;

pub const DEVICE_ID_BLOCK: u32 = 2;

/// Per-slot control bytes: header at +0 (16), status at +32 (1).
const SLOT_CTRL: u64 = 64;
const STATUS_AT: u64 = 32;
pub const MAX_SLOTS: usize = 64;
/// Data descriptors per request at most.
const MAX_SEGS: u64 = 32;
/// A request's wait for its next completion, in TSC ticks.
const WAIT_IO: u64 = 5_000_000_000;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

pub struct Opts {
    pub region_off: u64,
    pub region_len: u64,
    pub seed: u64,
    pub verify_only: bool,
    pub count: u64,
    pub skip: &'static [u8],
    /// A `probe.blk.` word could not be parsed (reported; the run fails).
    pub bad: bool,
}

/// The `probe.blk.` words of the command line.
pub fn opts(cmdline: &'static [u8]) -> Opts {
    let mut o = Opts {
        region_off: 0,
        region_len: 256 * KIB,
        seed: 1,
        verify_only: false,
        count: 4096,
        skip: b"",
        bad: false,
    };
    for w in cmdline.split(|&c| c == b' ') {
        let Some(opt) = w.strip_prefix(b"probe.blk.") else {
            continue;
        };
        let parsed = if let Some(v) = opt.strip_prefix(b"region=") {
            let mut it = v.splitn(2, |&c| c == b':');
            let off = it.next().and_then(crate::number);
            let len = it.next().and_then(crate::number);
            off.zip(len).map(|r| (o.region_off, o.region_len) = r)
        } else if let Some(v) = opt.strip_prefix(b"seed=") {
            crate::number(v).map(|n| o.seed = n)
        } else if let Some(v) = opt.strip_prefix(b"verify-only=") {
            o.verify_only = v == b"1";
            Some(())
        } else if let Some(v) = opt.strip_prefix(b"count=") {
            crate::number(v).map(|n| o.count = n)
        } else if let Some(v) = opt.strip_prefix(b"skip=") {
            o.skip = v;
            Some(())
        } else {
            Some(()) // unknown words are ignored
        };
        if parsed.is_none() {
            say!("probe: error blk unparsable ", Text(w));
            o.bad = true;
        }
    }
    o
}

impl Opts {
    pub fn skipped(&self, case: &str) -> bool {
        self.skip
            .split(|&c| c == b',')
            .any(|c| c == case.as_bytes())
    }
}

pub fn data_in(typ: u32) -> bool {
    typ == T_IN || typ == T_GET_ID
}

pub fn status_name(s: u8) -> &'static str {
    match s {
        ST_OK => "ok",
        ST_IOERR => "ioerr",
        ST_UNSUPP => "unsupp",
        _ => "bad",
    }
}

/// A status byte as `ok`/`ioerr`/`unsupp`, any other value in hex.
pub struct Status(pub u8);

impl Emit for Status {
    fn emit(&self) {
        match self.0 {
            ST_OK | ST_IOERR | ST_UNSUPP => status_name(self.0).emit(),
            s => Hex(s as u64).emit(),
        }
    }
}

/// The block device configuration the probe uses (section 5.2.4).
#[derive(Clone, Copy, Default)]
pub struct Config {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub blk_size: u32,
    pub max_discard: u32,
    pub max_write_zeroes: u32,
}

fn read_config(m: &Mmio) -> Config {
    let mut c = Config::default();
    // Re-read while ConfigGeneration moves (section 4.2.2.2), a bounded number of times.
    for _ in 0..4 {
        let g = m.generation();
        c = Config {
            capacity: m.cfg(0, 4) | m.cfg(4, 4) << 32,
            size_max: m.cfg(8, 4) as u32,
            seg_max: m.cfg(12, 4) as u32,
            blk_size: m.cfg(20, 4) as u32,
            max_discard: m.cfg(36, 4) as u32,
            max_write_zeroes: m.cfg(48, 4) as u32,
        };
        if m.generation() == g {
            break;
        }
    }
    c
}

pub struct Disk {
    pub index: usize,
    pub m: Mmio,
    pub offered: u64,
    pub features: u64,
    pub cfg: Config,
    pub qmem: QueueMem,
    /// SLOT_CTRL bytes per request slot (headers and status bytes).
    pub ctrl: u64,
    pub q: Queue,
}

/// Negotiation, configuration, queue 0 and DRIVER_OK.
fn bring_up(m: &Mmio, qmem: QueueMem) -> Result<(u64, u64, Config, Queue), &'static str> {
    let (offered, features) = m.negotiate(WANTED)?;
    let cfg = read_config(m);
    let q = m.queue(qmem, features & F_EVENT_IDX != 0)?;
    m.driver_ok()?;
    Ok((offered, features, cfg, q))
}

impl Disk {
    pub fn open(index: usize, f: &Found, arena: &mut Arena) -> Result<Disk, &'static str> {
        let m = Mmio {
            base: f.base,
            size: f.size,
        };
        let qmem = QueueMem::alloc(arena).ok_or("out of memory for a queue")?;
        let ctrl = arena
            .alloc(SLOT_CTRL * MAX_SLOTS as u64, 4096)
            .ok_or("out of memory for request headers")?;
        let (offered, features, cfg, q) = bring_up(&m, qmem)?;
        Ok(Disk {
            index,
            m,
            offered,
            features,
            cfg,
            qmem,
            ctrl,
            q,
        })
    }

    /// Reset and the whole bring-up again.
    pub fn reopen(&mut self) -> Result<(), &'static str> {
        let (offered, features, cfg, q) = bring_up(&self.m, self.qmem)?;
        (self.offered, self.features, self.cfg, self.q) = (offered, features, cfg, q);
        Ok(())
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }
    pub fn ro(&self) -> bool {
        self.has(F_RO)
    }
    pub fn bytes(&self) -> u64 {
        self.cfg.capacity.saturating_mul(512)
    }
    pub fn blk_size(&self) -> u32 {
        if self.has(F_BLK_SIZE) {
            self.cfg.blk_size
        } else {
            512
        }
    }
    pub fn seg_max(&self) -> u32 {
        if self.has(F_SEG_MAX) {
            self.cfg.seg_max
        } else {
            0
        }
    }
    pub fn size_max(&self) -> u32 {
        if self.has(F_SIZE_MAX) {
            self.cfg.size_max
        } else {
            0
        }
    }

    /// The largest data segment: SIZE_MAX rounded down to whole sectors (4 MiB without it).
    fn seg_cap(&self) -> u64 {
        match self.size_max() as u64 {
            0 => 4 * MIB,
            s => (s & !511).max(512),
        }
    }

    /// Data segments per request: SEG_MAX (0 counts as 1, as Linux does), at most the queue
    /// less header and status, and MAX_SEGS.
    fn seg_limit(&self) -> u64 {
        let limit = if self.has(F_SEG_MAX) {
            (self.cfg.seg_max as u64).max(1)
        } else {
            u64::MAX
        };
        limit.min(self.q.size as u64 - 2).min(MAX_SEGS)
    }

    /// The largest request the segment limits allow.
    pub fn max_request(&self) -> u64 {
        self.seg_cap() * self.seg_limit()
    }

    /// How many data segments a request of `len` bytes gets: enough for SIZE_MAX, and at
    /// least two for anything over 4 KiB.
    fn segments(&self, len: u64) -> u64 {
        let mut n = len.div_ceil(self.seg_cap()).max(1);
        if len > 4 * KIB {
            n = n.max(2);
        }
        n.min(self.seg_limit())
    }

    pub fn line(&self) {
        say!(
            "probe: blk disk=",
            Dec(self.index as u64),
            " base=",
            Hex(self.m.base),
            " capacity=",
            Dec(self.cfg.capacity),
            " blk_size=",
            Dec(self.blk_size() as u64),
            " seg_max=",
            Dec(self.seg_max() as u64),
            " size_max=",
            Dec(self.size_max() as u64),
            " ro=",
            Dec(self.ro() as u64),
            " features=",
            Hex(self.features)
        );
    }

    /// Writes slot `slot`'s whole chain (descriptors from `head`) for requests of `len` data
    /// bytes in `chunk`-byte segments, device-writable or not: header, data, status.
    #[inline(never)]
    fn write_chain(&mut self, slot: usize, head: u16, len: u64, chunk: u64, write: bool, buf: u64) {
        let c = self.ctrl + slot as u64 * SLOT_CTRL;
        let mut i = head;
        self.q.set(i, c, 16, D_NEXT, i + 1);
        let flags = if write { D_NEXT | D_WRITE } else { D_NEXT };
        let mut off = 0;
        while off < len {
            let l = chunk.min(len - off);
            i += 1;
            self.q.set(i, buf + off, l as u32, flags, i + 1);
            off += l;
        }
        self.q.set(i + 1, c + STATUS_AT, 1, D_WRITE, 0);
    }
}

#[derive(Clone, Copy, Default)]
pub struct Job {
    pub typ: u32,
    pub sector: u64,
    pub len: u32,
}

#[derive(Clone, Copy, Default)]
pub struct Stats {
    pub requests: u64,
    pub bytes: u64,
    pub inflight_max: u64,
    pub not_ok: u64,
    pub first_status: u8,
}

impl Stats {
    #[cold]
    fn note(&mut self, status: u8) {
        if self.not_ok == 0 {
            self.first_status = status;
        }
        self.not_ok += 1;
    }

    /// The status to report for the whole run: ok, or the first one that was not.
    pub fn status(&self) -> u8 {
        if self.not_ok == 0 {
            ST_OK
        } else {
            self.first_status
        }
    }
}

fn wait_error(w: Wait) -> &'static str {
    match w {
        Wait::Timeout => "no completion within the time limit",
        Wait::NeedsReset => "device set DEVICE_NEEDS_RESET",
        Wait::Bad => "used index moved past the requests in flight",
    }
}

/// Runs the requests `next` hands out (given the slot's buffer, `buf_len` bytes at
/// `bufs + slot * buf_len`), at most `depth` in flight: fill every free slot, one kick,
/// then reap whatever has completed (calling `done` with the job, its buffer and status),
/// and refill. Each slot owns descriptors `[slot * per, slot * per + per)`; its chain is
/// rewritten only when its request's length or direction changes, so the usual request costs
/// two header stores, the status byte and an avail ring entry (every instruction is emulated).
pub fn pipeline(
    d: &mut Disk,
    bufs: u64,
    buf_len: u64,
    depth: usize,
    mut next: impl FnMut(u64) -> Option<Job>,
    mut done: impl FnMut(&Job, u64, u8),
) -> Result<Stats, &'static str> {
    let nseg = d.segments(buf_len);
    // Whole sectors, and no more than SIZE_MAX: nseg >= buf_len / seg_cap.
    let chunk = buf_len.div_ceil(nseg).div_ceil(512) * 512;
    let per = 2 + nseg as u16;
    let nslots = depth.min(MAX_SLOTS).min((d.q.size / per) as usize);
    if nslots == 0 {
        return Err("queue too small for one request");
    }
    // Used-ring id -> slot, for the heads of the slots' chains.
    let mut slot_of = [u8::MAX; virtio::MAX_QUEUE as usize];
    let mut free = [0u8; MAX_SLOTS];
    for s in 0..nslots {
        slot_of[s * per as usize] = s as u8;
        free[s] = s as u8;
    }
    // Per slot: the job in flight, and the (length, direction) its chain was written for.
    let mut jobs = [Job::default(); MAX_SLOTS];
    let mut layout = [u64::MAX; MAX_SLOTS];
    let mut wmax = [0u32; MAX_SLOTS];
    let (mut nfree, mut busy, mut inflight, mut more) = (nslots, 0u64, 0u64, true);
    let mut st = Stats::default();
    loop {
        let mut batch = 0;
        while more && nfree > 0 {
            let slot = free[nfree - 1] as usize;
            let buf = bufs + slot as u64 * buf_len;
            let Some(j) = next(buf) else {
                more = false;
                break;
            };
            nfree -= 1;
            let write = data_in(j.typ);
            let key = j.len as u64 | (write as u64) << 32;
            let head = slot as u16 * per;
            if layout[slot] != key {
                d.write_chain(slot, head, (j.len as u64).min(buf_len), chunk, write, buf);
                layout[slot] = key;
            }
            let c = d.ctrl + slot as u64 * SLOT_CTRL;
            // SAFETY: the slot's control bytes are ours.
            unsafe {
                (c as *mut u64).write_volatile(j.typ as u64);
                ((c + 8) as *mut u64).write_volatile(j.sector);
                ((c + STATUS_AT) as *mut u8).write_volatile(0xff);
            }
            d.q.push(head);
            wmax[slot] = if write { j.len + 1 } else { 1 };
            jobs[slot] = j;
            busy |= 1 << slot;
            batch += 1;
        }
        if batch > 0 {
            d.q.kick();
            inflight += batch;
            st.inflight_max = st.inflight_max.max(inflight);
        }
        if inflight == 0 {
            return Ok(st);
        }
        let n = d.q.wait_ready(WAIT_IO).map_err(wait_error)?;
        for _ in 0..n {
            let (id, len) = d.q.take();
            let slot = *slot_of.get(id as usize).unwrap_or(&u8::MAX) as usize;
            if slot >= nslots || busy & (1 << slot) == 0 {
                return Err("used ring names a descriptor not in flight");
            }
            if len > wmax[slot] {
                return Err("used length larger than the request's writable buffers");
            }
            let status = phys::rd8(d.ctrl + slot as u64 * SLOT_CTRL + STATUS_AT);
            if status != ST_OK {
                st.note(status);
            }
            let j = &jobs[slot];
            done(j, bufs + slot as u64 * buf_len, status);
            st.requests += 1;
            st.bytes += j.len as u64;
            busy &= !(1 << slot);
            free[nfree] = slot as u8;
            nfree += 1;
        }
        inflight -= n as u64;
    }
}

/// One request on its own; its status.
pub fn single(d: &mut Disk, buf: u64, j: Job) -> Result<u8, &'static str> {
    let mut once = Some(j);
    let mut status = 0xff;
    let buf_len = (j.len as u64).max(512);
    pipeline(d, buf, buf_len, 1, |_| once.take(), |_, _, s| status = s)?;
    Ok(status)
}

/// Sequential requests of up to `req` bytes of type `typ` over `[off, off + len)`.
/// `prepare` fills an OUT request's buffer, `check` looks at an IN request's.
pub fn sequential(
    d: &mut Disk,
    bufs: u64,
    typ: u32,
    (off, len): (u64, u64),
    req: u64,
    depth: usize,
    mut prepare: impl FnMut(u64, u64, u64),
    mut check: impl FnMut(u64, u64, u64, u8),
) -> Result<Stats, &'static str> {
    sequential_dyn(
        d,
        bufs,
        typ,
        (off, len),
        req,
        depth,
        &mut prepare,
        &mut check,
    )
}

/// `sequential` behind one indirect call per request, so that its many callers share one
/// copy of the pipeline (the image stays small).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn sequential_dyn(
    d: &mut Disk,
    bufs: u64,
    typ: u32,
    (off, len): (u64, u64),
    req: u64,
    depth: usize,
    prepare: &mut dyn FnMut(u64, u64, u64),
    check: &mut dyn FnMut(u64, u64, u64, u8),
) -> Result<Stats, &'static str> {
    let req = req.min(d.max_request()) & !511;
    let (mut pos, end) = (off, off + len);
    pipeline(
        d,
        bufs,
        req,
        depth,
        |buf| {
            if pos >= end {
                return None;
            }
            let l = req.min(end - pos);
            prepare(buf, pos, l);
            let j = Job {
                typ,
                sector: pos / 512,
                len: l as u32,
            };
            pos += l;
            Some(j)
        },
        |j, buf, s| check(buf, j.sector * 512, j.len as u64, s),
    )
}

pub const PATTERN: u64 = 0x9E37_79B9_7F4A_7C15;

/// XORs the word at disk offset o of `[buf, buf + len)` (disk bytes from `off`; `len` a
/// multiple of 8) with o * PATTERN, in place. Two instructions per word (a memory-operand XOR
/// and an add), eight words per loop step: every instruction is emulated.
fn xor_progression(buf: u64, off: u64, len: u64) {
    let step = 8u64.wrapping_mul(PATTERN);
    let bulk = len & !63;
    if bulk > 0 {
        // SAFETY: `[buf, buf + bulk)` is a request buffer of ours.
        unsafe {
            core::arch::asm!(
                "2:",
                "xor [{p}], {a}",
                "add {a}, {s}",
                "xor [{p} + 8], {a}",
                "add {a}, {s}",
                "xor [{p} + 16], {a}",
                "add {a}, {s}",
                "xor [{p} + 24], {a}",
                "add {a}, {s}",
                "xor [{p} + 32], {a}",
                "add {a}, {s}",
                "xor [{p} + 40], {a}",
                "add {a}, {s}",
                "xor [{p} + 48], {a}",
                "add {a}, {s}",
                "xor [{p} + 56], {a}",
                "add {a}, {s}",
                "add {p}, 64",
                "cmp {p}, {end}",
                "jb 2b",
                p = inout(reg) buf => _,
                a = inout(reg) off.wrapping_mul(PATTERN) => _,
                s = in(reg) step,
                end = in(reg) buf + bulk,
                options(nostack),
            );
        }
    }
    let mut o = off.wrapping_add(bulk);
    for w in (buf + bulk..buf + (len & !7)).step_by(8) {
        // SAFETY: as above.
        unsafe {
            (w as *mut u64)
                .write_volatile((w as *const u64).read_volatile() ^ o.wrapping_mul(PATTERN))
        };
        o = o.wrapping_add(8);
    }
}

/// The pattern for disk bytes `[off, off + len)` into `buf` (len a multiple of 8): the word
/// at disk offset o is o * PATTERN ^ seed. `rep stosq` of the seed, then the progression.
pub fn fill(buf: u64, off: u64, len: u64, seed: u64) {
    // SAFETY: `[buf, buf + len)` is a request buffer of ours.
    unsafe {
        core::arch::asm!("rep stosq", inout("rcx") len / 8 => _, inout("rdi") buf => _,
                         in("rax") seed, options(nostack, preserves_flags));
    }
    xor_progression(buf, off, len);
}

/// Words of `[buf, buf + len)` that differ from `v`, and the index of the first: `repe
/// scasq` (one emulated step per word), restarted after each difference.
fn scan(buf: u64, len: u64, v: u64) -> (u64, Option<u64>) {
    let (mut bad, mut first) = (0u64, None);
    let (mut p, mut left) = (buf, len / 8);
    while left > 0 {
        // SAFETY: `[p, p + 8 * left)` lies in the caller's buffer.
        unsafe {
            core::arch::asm!("repe scasq", inout("rcx") left, inout("rdi") p,
                             in("rax") v, options(nostack, readonly));
        }
        // rdi is past the word that stopped the scan (or past the end).
        if phys::rd64(p - 8) != v {
            bad += 1;
            first = first.or(Some((p - 8 - buf) / 8));
        }
    }
    (bad, first)
}

/// Mismatching words of `buf` against the pattern for disk bytes `[off, off + len)` (len a
/// multiple of 8), and the disk offset of the first. Destroys the buffer: XORing the
/// progression in leaves every good word equal to the seed.
pub fn check(buf: u64, off: u64, len: u64, seed: u64) -> (u64, Option<u64>) {
    xor_progression(buf, off, len);
    let (bad, first) = scan(buf, len, seed);
    (bad, first.map(|w| off + 8 * w))
}

/// True when `[buf, buf + len)` is all zero bytes.
fn all_zero(buf: u64, len: u64) -> bool {
    scan(buf, len, 0).0 == 0
}

/// Prints `probe: error blk disk=<i> <what>`.
fn fail(disk: usize, what: &str) {
    say!("probe: error blk disk=", Dec(disk as u64), " ", what);
}

/// The usable (modern, block) devices, opened in discovery order; prints each disk line.
/// Stops at `limit` disks.
pub fn disks(devs: &virtio::Devices, arena: &mut Arena, limit: usize, ok: &mut bool) -> DiskList {
    let mut list = DiskList {
        d: [const { None }; 8],
        n: 0,
    };
    for f in devs.all() {
        if !f.usable || f.id != DEVICE_ID_BLOCK {
            continue;
        }
        if f.version != 2 {
            say!(
                "probe: virtio device base=",
                Hex(f.base),
                " skipped: version ",
                Dec(f.version as u64),
                " (legacy)"
            );
            continue;
        }
        if list.n >= limit.min(list.d.len()) {
            break;
        }
        let index = list.n;
        match Disk::open(index, f, arena) {
            Ok(d) => {
                d.line();
                list.d[index] = Some(d);
            }
            Err(e) => {
                fail(index, e);
                *ok = false;
            }
        }
        list.n += 1;
    }
    list
}

pub struct DiskList {
    pub d: [Option<Disk>; 8],
    pub n: usize,
}

/// Request buffers: `n` of `len` bytes each.
fn buffers(arena: &mut Arena, n: u64, len: u64) -> Option<u64> {
    arena.alloc(n * len, 4096)
}

/// `blk` mode: requests of 64 KiB, up to 16 in flight.
const REQ: u64 = 64 * KIB;
const DEPTH: usize = 16;

/// `probe.mode=blk`: write, flush, verify, discard/write-zeroes, GET_ID, read-only write, on
/// every disk. Returns false when anything failed.
pub fn run(cmdline: &'static [u8]) -> bool {
    let o = opts(cmdline);
    let mut ok = !o.bad;
    let devs = virtio::discover(cmdline);
    ok &= !devs.bad;
    let mut arena = Arena::new(crate::bootinfo::get());
    let Some(bufs) = buffers(&mut arena, DEPTH as u64, REQ) else {
        say!("probe: error blk no memory for request buffers");
        return false;
    };
    let mut list = disks(&devs, &mut arena, 8, &mut ok);
    if list.n == 0 {
        say!("probe: error blk no disks");
        return false;
    }
    for slot in list.d.iter_mut().take(list.n) {
        if let Some(d) = slot {
            if let Err(e) = disk_test(d, &o, bufs, &mut ok) {
                fail(d.index, e);
                ok = false;
            }
            d.m.reset();
        }
    }
    ok
}

fn disk_test(d: &mut Disk, o: &Opts, bufs: u64, ok: &mut bool) -> Result<(), &'static str> {
    let i = d.index;
    let mut bad = |what: &str| {
        fail(i, what);
        *ok = false;
    };
    if o.region_off % 512 != 0 || o.region_len % 512 != 0 || o.region_len == 0 {
        return Err("region is not whole 512-byte sectors");
    }
    let off = o.region_off;
    let len = o.region_len.min(d.bytes().saturating_sub(off));
    if len != o.region_len {
        say!(
            "probe: blk disk=",
            Dec(i as u64),
            " region clamped to capacity bytes=",
            Dec(len)
        );
        if len == 0 {
            return Err("region starts past the end of the disk");
        }
    }
    let seed = o.seed;
    let writable = !o.verify_only && !d.ro();

    // 1. The pattern over the region.
    if writable {
        let st = sequential(
            d,
            bufs,
            T_OUT,
            (off, len),
            REQ,
            DEPTH,
            |buf, pos, l| fill(buf, pos, l, seed),
            |_, _, _, _| {},
        )?;
        say!(
            "probe: blk disk=",
            Dec(i as u64),
            " write bytes=",
            Dec(st.bytes),
            " requests=",
            Dec(st.requests),
            " inflight_max=",
            Dec(st.inflight_max)
        );
        if st.not_ok != 0 {
            bad("write status not ok");
        }
    }

    // 2. FLUSH.
    let flush = if d.has(F_FLUSH) {
        let j = Job {
            typ: T_FLUSH,
            sector: 0,
            len: 0,
        };
        Some(single(d, bufs, j)?)
    } else {
        None
    };
    "probe: blk disk=".emit();
    Dec(i as u64).emit();
    " flush status=".emit();
    match flush {
        Some(s) => Status(s).emit(),
        None => "skipped".emit(),
    }
    say!();
    if flush.is_some_and(|s| s != ST_OK) {
        bad("flush status not ok");
    }

    // 3. Read back and compare.
    let (mut mismatches, mut first_bad) = (0u64, None::<u64>);
    let st = sequential(
        d,
        bufs,
        T_IN,
        (off, len),
        REQ,
        DEPTH,
        |_, _, _| {},
        |buf, pos, l, s| {
            if s == ST_OK {
                let (n, f) = check(buf, pos, l, seed);
                mismatches += n;
                first_bad = match (first_bad, f) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        },
    )?;
    "probe: blk disk=".emit();
    Dec(i as u64).emit();
    " verify bytes=".emit();
    Dec(st.bytes).emit();
    " mismatches=".emit();
    Dec(mismatches).emit();
    " first_bad=".emit();
    match first_bad {
        Some(f) => Hex(f).emit(),
        None => "none".emit(),
    }
    say!();
    if st.not_ok != 0 {
        bad("read status not ok");
    }
    if mismatches != 0 {
        bad("verify found mismatches");
    }

    // 4. DISCARD and WRITE_ZEROES just after the region.
    discard_zeroes(d, bufs, off + len, seed, writable, &mut bad)?;

    // 5. GET_ID.
    phys::zero(bufs, 64);
    let s = single(
        d,
        bufs,
        Job {
            typ: T_GET_ID,
            sector: 0,
            len: 20,
        },
    )?;
    let id = phys::bytes(bufs, 20).unwrap_or(&[]);
    let n = if s == ST_OK {
        id.iter().position(|&c| c == 0).unwrap_or(id.len())
    } else {
        0
    };
    say!("probe: blk disk=", Dec(i as u64), " id=", Text(&id[..n]));
    if s == ST_IOERR {
        bad("get-id status ioerr");
    }

    // 6. A write to a read-only disk: the region's first bytes, read first and written back
    // unchanged (so a device that takes the write changes nothing).
    if d.ro() {
        let rd = Job {
            typ: T_IN,
            sector: off / 512,
            len: len.min(4096) as u32,
        };
        let r = single(d, bufs, rd)?;
        let s = single(d, bufs, Job { typ: T_OUT, ..rd })?;
        say!(
            "probe: blk disk=",
            Dec(i as u64),
            " ro-write status=",
            Status(s)
        );
        if r != ST_OK {
            bad("read before the read-only write failed");
        }
    }
    Ok(())
}

/// Step 4 of `blk`: pattern over `[at, at + 128 KiB)`, DISCARD the first half, WRITE_ZEROES
/// the second, read the second back and check it is zero.
fn discard_zeroes(
    d: &mut Disk,
    bufs: u64,
    at: u64,
    seed: u64,
    writable: bool,
    bad: &mut impl FnMut(&str),
) -> Result<(), &'static str> {
    const HALF: u64 = 64 * KIB;
    let i = d.index;
    let line = |disc: Option<u8>, wz: Option<u8>, zero: Option<bool>| {
        "probe: blk disk=".emit();
        Dec(i as u64).emit();
        " discard status=".emit();
        match disc {
            Some(s) => Status(s).emit(),
            None => "skipped".emit(),
        }
        " write-zeroes status=".emit();
        match wz {
            Some(s) => Status(s).emit(),
            None => "skipped".emit(),
        }
        say!(
            " zero_check=",
            match zero {
                Some(true) => "ok",
                Some(false) => "bad",
                None => "skipped",
            }
        );
    };
    let (dis, wz) = (d.has(F_DISCARD), d.has(F_WRITE_ZEROES));
    if !writable || !(dis || wz) || at.saturating_add(2 * HALF) > d.bytes() {
        line(None, None, None);
        return Ok(());
    }
    let st = sequential(
        d,
        bufs,
        T_OUT,
        (at, 2 * HALF),
        HALF,
        2,
        |buf, pos, l| fill(buf, pos, l, seed),
        |_, _, _, _| {},
    )?;
    if st.not_ok != 0 {
        bad("write before discard not ok");
    }
    // One request per piece the device's per-segment limit allows; the payload is one
    // struct virtio_blk_discard_write_zeroes { le64 sector; le32 num_sectors; le32 flags }.
    let ranged = |d: &mut Disk, typ: u32, start: u64, max: u32| {
        let piece = match max {
            0 => HALF / 512,
            m => (m as u64).min(HALF / 512),
        };
        let (mut s, end) = (start / 512, (start + HALF) / 512);
        pipeline(
            d,
            bufs,
            4096,
            8,
            |buf| {
                if s >= end {
                    return None;
                }
                let n = piece.min(end - s);
                // SAFETY: the slot's buffer.
                unsafe {
                    (buf as *mut u64).write_volatile(s);
                    ((buf + 8) as *mut u64).write_volatile(n);
                }
                s += n;
                Some(Job {
                    typ,
                    sector: 0,
                    len: 16,
                })
            },
            |_, _, _| {},
        )
        .map(|st| st.status())
    };
    let ds = if dis {
        Some(ranged(d, T_DISCARD, at, d.cfg.max_discard)?)
    } else {
        None
    };
    let ws = if wz {
        Some(ranged(
            d,
            T_WRITE_ZEROES,
            at + HALF,
            d.cfg.max_write_zeroes,
        )?)
    } else {
        None
    };
    let zero = match ws {
        Some(ST_OK) => {
            let mut z = true;
            let st = sequential(
                d,
                bufs,
                T_IN,
                (at + HALF, HALF),
                HALF,
                1,
                |_, _, _| {},
                |buf, _, l, s| z &= s == ST_OK && all_zero(buf, l),
            )?;
            Some(z && st.not_ok == 0)
        }
        _ => None,
    };
    line(ds, ws, zero);
    if ds.is_some_and(|s| s != ST_OK) {
        bad("discard status not ok");
    }
    if ws.is_some_and(|s| s != ST_OK) {
        bad("write-zeroes status not ok");
    }
    if zero == Some(false) {
        bad("write-zeroes range not zero");
    }
    Ok(())
}

/// `probe.mode=blk-bench`: sequential write, sequential read, random 4 KiB reads on the first
/// disk, timed in TSC ticks. Data is neither filled nor checked.
pub fn bench(cmdline: &'static [u8]) -> bool {
    let o = opts(cmdline);
    let mut ok = !o.bad;
    let devs = virtio::discover(cmdline);
    ok &= !devs.bad;
    let mut arena = Arena::new(crate::bootinfo::get());
    const SEQ: u64 = MIB;
    let Some(bufs) = buffers(&mut arena, 8, SEQ) else {
        say!("probe: error blk-bench no memory for request buffers");
        return false;
    };
    let mut list = disks(&devs, &mut arena, 1, &mut ok);
    let Some(d) = list.d[0].as_mut() else {
        say!("probe: error blk-bench no disk");
        return false;
    };
    let off = o.region_off & !4095;
    let len = o.region_len.min(d.bytes().saturating_sub(off)) & !4095;
    if len == 0 {
        say!("probe: error blk-bench empty region");
        return false;
    }
    let phase = |name: &str,
                 d: &mut Disk,
                 run: &mut dyn FnMut(&mut Disk) -> Result<Stats, &'static str>| {
        say!("probe: blk-bench phase=", name, " start");
        let t0 = rdtsc();
        let r = run(d);
        let t = rdtsc().wrapping_sub(t0);
        match r {
            Ok(st) => {
                say!(
                    "probe: blk-bench phase=",
                    name,
                    " done bytes=",
                    Dec(st.bytes),
                    " requests=",
                    Dec(st.requests),
                    " tsc=",
                    Dec(t)
                );
                if st.not_ok != 0 {
                    say!(
                        "probe: error blk-bench phase=",
                        name,
                        " status=",
                        Status(st.first_status)
                    );
                    return false;
                }
                true
            }
            Err(e) => {
                say!("probe: error blk-bench phase=", name, " ", e);
                false
            }
        }
    };
    let seq = |typ: u32| {
        move |d: &mut Disk| {
            sequential(
                d,
                bufs,
                typ,
                (off, len),
                SEQ,
                8,
                |_, _, _| {},
                |_, _, _, _| {},
            )
        }
    };
    ok &= phase("seqwrite", d, &mut seq(T_OUT));
    ok &= ok && phase("seqread", d, &mut seq(T_IN));
    let (count, blocks) = (o.count, len / 4096);
    ok &= ok
        && phase("randread", d, &mut |d: &mut Disk| {
            let (mut left, mut x) = (count, 0x2545_f491_4f6c_dd1d_u64 ^ o.seed);
            pipeline(
                d,
                bufs,
                4096,
                32,
                |_| {
                    if left == 0 {
                        return None;
                    }
                    left -= 1;
                    // xorshift64
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    Some(Job {
                        typ: T_IN,
                        sector: (off + x % blocks * 4096) / 512,
                        len: 4096,
                    })
                },
                |_, _, _| {},
            )
        });
    d.m.reset();
    ok
}

//! virtio over MMIO (virtio 1.2 section 4.2): finding the devices (the DSDT's `LNRO0005`
//! devices and Linux's `virtio_mmio.device=` command-line words), the transport registers,
//! feature negotiation (section 3.1.1), and one split virtqueue (section 2.7) that the driver
//! polls. Everything read from the device (registers, config space, the used ring) is checked
//! before it is used: the VMM under test may be wrong or hostile.

use crate::phys::{self, mfence, rdtsc};
use crate::say;
use crate::serial::{Dec, Hex, Text};

pub const MAGIC: u32 = 0x7472_6976; // "virt"

// Register offsets (section 4.2.2).
pub const R_MAGIC: u64 = 0x000;
pub const R_VERSION: u64 = 0x004;
pub const R_DEVICE_ID: u64 = 0x008;
pub const R_DEVICE_FEATURES: u64 = 0x010;
pub const R_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const R_DRIVER_FEATURES: u64 = 0x020;
pub const R_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const R_QUEUE_SEL: u64 = 0x030;
pub const R_QUEUE_NUM_MAX: u64 = 0x034;
pub const R_QUEUE_NUM: u64 = 0x038;
pub const R_QUEUE_READY: u64 = 0x044;
pub const R_QUEUE_NOTIFY: u64 = 0x050;
pub const R_STATUS: u64 = 0x070;
pub const R_QUEUE_DESC: u64 = 0x080;
pub const R_QUEUE_DRIVER: u64 = 0x090;
pub const R_QUEUE_DEVICE: u64 = 0x0a0;
pub const R_CONFIG_GENERATION: u64 = 0x0fc;
pub const R_CONFIG: u64 = 0x100;

// Device status bits (section 2.1).
pub const S_ACKNOWLEDGE: u32 = 1;
pub const S_DRIVER: u32 = 2;
pub const S_DRIVER_OK: u32 = 4;
pub const S_FEATURES_OK: u32 = 8;
pub const S_NEEDS_RESET: u32 = 0x40;
pub const S_FAILED: u32 = 0x80;

// Reserved feature bits (section 6).
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

// Descriptor flags (section 2.7.5).
pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;

/// The largest queue `Mmio::queue` sets up (virtio-net's queues go to 256).
pub const MAX_QUEUE: u16 = 128;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Dsdt,
    Cmdline,
}

#[derive(Clone, Copy)]
pub struct Found {
    pub source: Source,
    pub base: u64,
    pub size: u64,
    pub irq: u64,
    pub version: u32,
    pub id: u32,
    /// The magic value matched and the window is large enough to use.
    pub usable: bool,
}

pub const MAX_DEVICES: usize = 32;

pub struct Devices {
    pub list: [Found; MAX_DEVICES],
    pub n: usize,
    /// Something was reported as an error (unparsable word, unusable window, bad magic).
    pub bad: bool,
}

impl Devices {
    pub fn all(&self) -> &[Found] {
        &self.list[..self.n.min(MAX_DEVICES)]
    }

    fn add(&mut self, source: Source, base: u64, size: u64, irq: u64) {
        if self.all().iter().any(|f| f.base == base) {
            return; // the same device through the other source
        }
        if let Some(slot) = self.list.get_mut(self.n) {
            *slot = Found {
                source,
                base,
                size,
                irq,
                version: 0,
                id: 0,
                usable: false,
            };
            self.n += 1;
        }
    }
}

/// Linux's `memparse`: a number (0x for hex) with an optional K/M/G suffix.
fn memparse(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    crate::number(digits)?.checked_mul(1 << shift)
}

/// `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` (Linux drivers/virtio/virtio_mmio.c).
fn cmdline_device(w: &[u8]) -> Option<(u64, u64, u64)> {
    let v = w.strip_prefix(b"virtio_mmio.device=")?;
    let at = v.iter().position(|&c| c == b'@')?;
    let size = memparse(&v[..at])?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&c| c == b':')?;
    let base = crate::number(&rest[..colon])?;
    let irq_s = rest[colon + 1..].split(|&c| c == b':').next()?;
    let irq = crate::number(irq_s)?;
    Some((base, size, irq))
}

/// Prints the command line, finds the virtio-mmio devices, reads their Version and DeviceID,
/// and prints a line for each and the count.
pub fn discover(cmdline: &[u8]) -> Devices {
    let mut d = Devices {
        list: [Found {
            source: Source::Dsdt,
            base: 0,
            size: 0,
            irq: 0,
            version: 0,
            id: 0,
            usable: false,
        }; MAX_DEVICES],
        n: 0,
        bad: false,
    };
    say!("probe: cmdline=", Text(cmdline));
    // No RSDP (microvm with acpi=off) is normal here: the command line is the other source.
    if let Some(aml) = crate::acpi::walk(false).ok().and_then(|a| a.aml()) {
        crate::dsdt::virtio_mmio(aml, |base, size, irq| d.add(Source::Dsdt, base, size, irq));
    }
    for w in cmdline.split(|&c| c == b' ') {
        if w.starts_with(b"virtio_mmio.device=") {
            match cmdline_device(w) {
                Some((base, size, irq)) => d.add(Source::Cmdline, base, size, irq),
                None => {
                    say!("probe: error virtio unparsable ", Text(w));
                    d.bad = true;
                }
            }
        }
    }
    for f in d.list[..d.n].iter_mut() {
        // The registers need 0x100 bytes, a device's configuration more.
        if f.size >= 0x100 && f.base & 3 == 0 && phys::map(f.base, f.size) {
            let m = Mmio {
                base: f.base,
                size: f.size,
            };
            let magic = m.rd(R_MAGIC);
            f.version = m.rd(R_VERSION);
            f.id = m.rd(R_DEVICE_ID);
            f.usable = magic == MAGIC;
            if !f.usable {
                d.bad = true;
                say!(
                    "probe: error virtio base=",
                    Hex(f.base),
                    " magic=",
                    Hex(magic as u64)
                );
            }
        } else {
            d.bad = true;
            say!(
                "probe: error virtio base=",
                Hex(f.base),
                " size=",
                Hex(f.size),
                " unusable window"
            );
        }
        say!(
            "probe: virtio device source=",
            match f.source {
                Source::Dsdt => "dsdt",
                Source::Cmdline => "cmdline",
            },
            " base=",
            Hex(f.base),
            " size=",
            Hex(f.size),
            " irq=",
            Dec(f.irq),
            " version=",
            Dec(f.version as u64),
            " id=",
            Dec(f.id as u64)
        );
    }
    say!("probe: virtio devices=", Dec(d.n as u64));
    d
}

/// A virtio-mmio register window.
#[derive(Clone, Copy)]
pub struct Mmio {
    pub base: u64,
    pub size: u64,
}

impl Mmio {
    pub fn rd(&self, off: u64) -> u32 {
        phys::mmio_read32(self.base + off)
    }
    pub fn wr(&self, off: u64, v: u32) {
        phys::mmio_write32(self.base + off, v)
    }
    pub fn status(&self) -> u32 {
        self.rd(R_STATUS)
    }
    pub fn set_status(&self, v: u32) {
        self.wr(R_STATUS, v)
    }

    /// Writes 0 to Status and waits (bounded) until it reads back 0 (section 4.2.3.1).
    pub fn reset(&self) -> bool {
        self.set_status(0);
        for _ in 0..1000 {
            if self.status() == 0 {
                return true;
            }
        }
        false
    }

    /// A configuration-space field of `n` (1, 2, 4) bytes; 0 past the window. 8-byte fields
    /// are read as two 4-byte halves (section 4.2.2.2), so generation is checked by the caller.
    pub fn cfg(&self, off: u64, n: u64) -> u64 {
        let a = R_CONFIG + off;
        if a + n > self.size {
            return 0;
        }
        let p = self.base + a;
        // SAFETY: inside the device's register window, which `discover` mapped.
        unsafe {
            match n {
                1 => (p as *const u8).read_volatile() as u64,
                2 => (p as *const u16).read_volatile() as u64,
                _ => (p as *const u32).read_volatile() as u64,
            }
        }
    }

    pub fn generation(&self) -> u32 {
        self.rd(R_CONFIG_GENERATION)
    }

    /// DeviceFeatures, pages 0 and 1 (bits 0..63).
    pub fn device_features(&self) -> u64 {
        self.wr(R_DEVICE_FEATURES_SEL, 0);
        let lo = self.rd(R_DEVICE_FEATURES) as u64;
        self.wr(R_DEVICE_FEATURES_SEL, 1);
        let hi = self.rd(R_DEVICE_FEATURES) as u64;
        hi << 32 | lo
    }

    pub fn driver_features(&self, f: u64) {
        self.wr(R_DRIVER_FEATURES_SEL, 0);
        self.wr(R_DRIVER_FEATURES, f as u32);
        self.wr(R_DRIVER_FEATURES_SEL, 1);
        self.wr(R_DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (those in `wanted` the device offers),
    /// FEATURES_OK, and FEATURES_OK read back (section 3.1.1). Returns (offered, accepted).
    pub fn negotiate(&self, wanted: u64) -> Result<(u64, u64), &'static str> {
        self.negotiate_with(|offered| offered & wanted)
    }

    /// `negotiate`, with the accepted features chosen by `choose` from those offered.
    pub fn negotiate_with(
        &self,
        choose: impl FnOnce(u64) -> u64,
    ) -> Result<(u64, u64), &'static str> {
        if !self.reset() {
            return Err("reset: status did not read back 0");
        }
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        let offered = self.device_features();
        if offered & F_VERSION_1 == 0 {
            self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
            return Err("device does not offer VERSION_1");
        }
        let accepted = choose(offered);
        self.driver_features(accepted);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FAILED);
            return Err("device cleared FEATURES_OK");
        }
        Ok((offered, accepted))
    }

    /// Sets up queue 0 in `mem` (zeroed here) with min(QueueNumMax, 128) entries, rounded
    /// down to a power of two, and sets QueueReady.
    pub fn queue(&self, mem: QueueMem, event_idx: bool) -> Result<Queue, &'static str> {
        self.queue_at(0, MAX_QUEUE, mem, event_idx)
    }

    /// Sets up queue `index` in `mem` (zeroed here) with min(QueueNumMax, `max`) entries
    /// (`max` at most 256, what three pages hold), rounded down to a power of two, and sets
    /// QueueReady.
    pub fn queue_at(
        &self,
        index: u32,
        max: u16,
        mem: QueueMem,
        event_idx: bool,
    ) -> Result<Queue, &'static str> {
        self.wr(R_QUEUE_SEL, index);
        if self.rd(R_QUEUE_READY) != 0 {
            return Err("queue ready before set-up");
        }
        let num_max = self.rd(R_QUEUE_NUM_MAX);
        if num_max < 4 {
            // Header, data and status need three descriptors; a power of two, four.
            return Err("queue too small (QueueNumMax below 4)");
        }
        let mut size = max.min(256);
        while size as u32 > num_max {
            size /= 2;
        }
        phys::zero(mem.desc, QueueMem::BYTES);
        self.wr(R_QUEUE_NUM, size as u32);
        self.queue_addresses(mem.desc, mem.avail, mem.used);
        self.wr(R_QUEUE_READY, 1);
        if self.rd(R_QUEUE_READY) != 1 {
            return Err("QueueReady did not read back 1");
        }
        Ok(Queue {
            size,
            index,
            desc: mem.desc,
            avail: mem.avail,
            used: mem.used,
            notify: self.base + R_QUEUE_NOTIFY,
            avail_idx: 0,
            kicked: 0,
            last_used: 0,
            event_idx,
            notifies: 0,
        })
    }

    pub fn queue_addresses(&self, desc: u64, avail: u64, used: u64) {
        for (reg, a) in [
            (R_QUEUE_DESC, desc),
            (R_QUEUE_DRIVER, avail),
            (R_QUEUE_DEVICE, used),
        ] {
            self.wr(reg, a as u32);
            self.wr(reg + 4, (a >> 32) as u32);
        }
    }

    /// Sets DRIVER_OK; the device must not ask for a reset at that point.
    pub fn driver_ok(&self) -> Result<(), &'static str> {
        let s = self.status();
        self.set_status(s | S_DRIVER_OK);
        let s = self.status();
        if s & S_NEEDS_RESET != 0 || s & S_DRIVER_OK == 0 {
            return Err("device refused DRIVER_OK");
        }
        Ok(())
    }
}

/// Where a queue lives: three pages below 4 GiB (descriptor table, driver area, device area),
/// enough for 256 entries.
#[derive(Clone, Copy)]
pub struct QueueMem {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueMem {
    pub const BYTES: u64 = 3 * 4096;

    pub fn alloc(a: &mut phys::Arena) -> Option<QueueMem> {
        let desc = a.alloc(Self::BYTES, 4096)?;
        Some(QueueMem {
            desc,
            avail: desc + 4096,
            used: desc + 8192,
        })
    }
}

/// A split virtqueue (section 2.7) driven by polling.
pub struct Queue {
    pub size: u16,
    /// The queue's index (the value written to QueueNotify).
    pub index: u32,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    /// Next free avail ring index (published by `kick`).
    avail_idx: u16,
    /// avail idx at the last `kick`.
    kicked: u16,
    /// Next used ring index to read.
    last_used: u16,
    event_idx: bool,
    pub notifies: u64,
}

/// TSC ticks the probe waits for a device before giving up.
pub const WAIT: u64 = 2_000_000_000;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing within the deadline.
    Timeout,
    /// The device stopped: DEVICE_NEEDS_RESET set, and nothing came for a while after it.
    NeedsReset,
    /// The used ring is not a ring: its index moved further than the driver made available.
    Bad,
}

impl Queue {
    /// Writes descriptor `i` (masked into the table): two 8-byte stores.
    #[inline(always)]
    pub fn set(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let p = (self.desc + 16 * (i & (self.size - 1)) as u64) as *mut u64;
        // SAFETY: inside the descriptor table (index masked by the power-of-two size).
        unsafe {
            p.write_volatile(addr);
            p.add(1)
                .write_volatile(len as u64 | (flags as u64) << 32 | (next as u64) << 48);
        }
    }

    /// Puts a chain head in the avail ring (not yet visible to the device).
    #[inline(always)]
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx & (self.size - 1)) as u64;
        // SAFETY: inside the driver area.
        unsafe { ((self.avail + 4 + 2 * slot) as *mut u16).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes what `push` added and notifies the device if it asked for it: with
    /// EVENT_IDX when avail_event lies in the published span (section 2.7.10), else unless
    /// VIRTQ_USED_F_NO_NOTIFY. Keeps used_event far ahead so the device may skip interrupts.
    pub fn kick(&mut self) {
        let (new, old) = (self.avail_idx, self.kicked);
        let sz = self.size as u64;
        // SAFETY: the driver area (flags, idx, ring, used_event) and device area are ours.
        unsafe {
            if self.event_idx {
                let ue = (self.avail + 4 + 2 * sz) as *mut u16;
                ue.write_volatile(self.last_used.wrapping_add(0x8000));
            } else {
                (self.avail as *mut u16).write_volatile(1); // VIRTQ_AVAIL_F_NO_INTERRUPT
            }
            // The stores above are volatile (kept in order by the compiler) and x86 keeps
            // stores in order.
            ((self.avail + 2) as *mut u16).write_volatile(new);
            mfence(); // the idx store before the avail_event / flags load
            let notify = if self.event_idx {
                let ev = ((self.used + 4 + 8 * sz) as *const u16).read_volatile();
                new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old)
            } else {
                (self.used as *const u16).read_volatile() & 1 == 0
            };
            self.kicked = new;
            if notify {
                phys::mmio_write32(self.notify, self.index);
                self.notifies += 1;
            }
        }
    }

    /// Requests made available and not yet used.
    pub fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used)
    }

    /// Used elements the device has returned and the driver not yet taken; `Bad` when the
    /// used index claims more than is outstanding.
    #[inline(always)]
    pub fn ready(&self) -> Result<u16, Wait> {
        // SAFETY: the device area is ours.
        let idx = unsafe { ((self.used + 2) as *const u16).read_volatile() };
        let n = idx.wrapping_sub(self.last_used);
        if n > self.outstanding() {
            return Err(Wait::Bad);
        }
        Ok(n)
    }

    /// The next used element (id, len); only after `ready` counted it. The element load is
    /// volatile, like the index load before it, so the compiler keeps them in order; x86
    /// keeps loads in order.
    #[inline(always)]
    pub fn take(&mut self) -> (u32, u32) {
        let slot = (self.last_used & (self.size - 1)) as u64;
        // SAFETY: inside the used ring.
        let e = unsafe { ((self.used + 4 + 8 * slot) as *const u64).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        (e as u32, (e >> 32) as u32)
    }

    /// Takes up to `n` used elements (that `ready` counted) while `keep(id, len)` accepts
    /// them and the id is a descriptor of the queue, making each head available again at
    /// once (not yet published: `kick`). Returns how many; the first refused is left. The
    /// ring state stays in registers: a few instructions per element.
    #[inline(always)]
    pub fn recycle(&mut self, n: u16, mut keep: impl FnMut(u32, u32) -> bool) -> u16 {
        let mask = self.size - 1;
        let (mut last, mut ai, mut done) = (self.last_used, self.avail_idx, 0u16);
        while done < n {
            let slot = (last & mask) as u64;
            // SAFETY: inside the used ring.
            let e = unsafe { ((self.used + 4 + 8 * slot) as *const u64).read_volatile() };
            let id = e as u32;
            if id >= self.size as u32 || !keep(id, (e >> 32) as u32) {
                break;
            }
            let a = (ai & mask) as u64;
            // SAFETY: inside the driver area.
            unsafe { ((self.avail + 4 + 2 * a) as *mut u16).write_volatile(id as u16) };
            last = last.wrapping_add(1);
            ai = ai.wrapping_add(1);
            done += 1;
        }
        self.last_used = last;
        self.avail_idx = ai;
        done
    }

    /// For a driver's own loop over the rings: (used ring entries, avail ring entries,
    /// next used index to read, next avail index). `advance` then records what it did.
    pub fn rings(&self) -> (u64, u64, u16, u16) {
        (
            self.used + 4,
            self.avail + 4,
            self.last_used,
            self.avail_idx,
        )
    }

    /// `n` used elements taken and their heads made available again (see `rings`).
    pub fn advance(&mut self, n: u16) {
        self.last_used = self.last_used.wrapping_add(n);
        self.avail_idx = self.avail_idx.wrapping_add(n);
    }

    /// Drops `n` used elements (that `ready` counted) unread.
    pub fn discard(&mut self, n: u16) {
        self.last_used = self.last_used.wrapping_add(n);
    }

    /// The next used element (id, len), if the device has returned one.
    #[inline(always)]
    pub fn pop(&mut self) -> Result<Option<(u32, u32)>, Wait> {
        if self.ready()? == 0 {
            return Ok(None);
        }
        Ok(Some(self.take()))
    }

    /// Waits (bounded) until the device has returned something; how many.
    #[inline(always)]
    pub fn wait_ready(&mut self, ticks: u64) -> Result<u16, Wait> {
        match self.ready()? {
            0 => self.wait_ready_slow(ticks),
            n => Ok(n),
        }
    }

    #[inline(never)]
    fn wait_ready_slow(&mut self, ticks: u64) -> Result<u16, Wait> {
        let start = rdtsc();
        loop {
            for _ in 0..64 {
                let n = self.ready()?;
                if n != 0 {
                    return Ok(n);
                }
            }
            if rdtsc().wrapping_sub(start) >= ticks {
                return Err(Wait::Timeout);
            }
        }
    }

    /// Waits (bounded) for the next used element. With `watch`, also reads the device's
    /// Status now and then and gives up soon after DEVICE_NEEDS_RESET appears.
    pub fn wait(&mut self, m: Option<&Mmio>, ticks: u64) -> Result<(u32, u32), Wait> {
        let start = rdtsc();
        let mut deadline = start.wrapping_add(ticks);
        let mut stopped = false;
        loop {
            for _ in 0..64 {
                if let Some(e) = self.pop()? {
                    return Ok(e);
                }
            }
            let now = rdtsc();
            if now.wrapping_sub(start) >= deadline.wrapping_sub(start) {
                return Err(if stopped {
                    Wait::NeedsReset
                } else {
                    Wait::Timeout
                });
            }
            if let Some(m) = m.filter(|_| !stopped) {
                if m.status() & S_NEEDS_RESET != 0 {
                    // A late completion is still possible: give it 50 M ticks.
                    stopped = true;
                    deadline = deadline.min(now.wrapping_add(50_000_000));
                }
            }
        }
    }
}

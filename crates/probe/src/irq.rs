//! `probe.mode=irq`: interrupt delivery through the I/O APIC, seen from inside the guest.
//!
//! The probe installs an IDT whose stubs only count (asm/irq.s), masks the 8259s, enables its
//! local APIC, and routes two lines through the MADT's I/O APIC to itself: COM1 (ISA IRQ 4, or
//! what the MADT's interrupt source override makes of it) and the first virtio-mmio disk (its
//! GSI from the DSDT or `virtio_mmio.device=`). For each line, one line of output per check:
//!
//! - `delivered=N`: one event with the entry unmasked; exactly one interrupt arrives;
//! - `masked events=E count=N`: the entry masked, E events; nothing arrives;
//! - `unmasked count=N`: after unmasking; what was latched while masked arrives once. The
//!   82093AA datasheet (§3.2.4, Interrupt Mask) says edges on a masked pin are ignored, and
//!   KVM's in-kernel I/O APIC drops them; `probe.irq.masked-edge=drop` makes 0 the expected
//!   count instead of 1 (default `latch`);
//! - `eoi isr=B before=N irr=B next=N`: an interrupt left without EOI is in service (ISR), a
//!   second event then stays pending in IRR (Intel SDM vol. 3, 11.8.4: the processor priority
//!   is the in-service vector's class) and arrives after the EOI. On a PVM host KVM's local
//!   APIC shows nothing in service and takes the second at once (QEMU on the same KVM does
//!   too); `probe.irq.eoi-hold=0` expects that instead (isr=0 before=1 irr=0 next=0).
//!
//! A COM1 event: IER 0, a read of IIR, IER with THRE (bit 1), IER 0. vm-superio's 16550 raises
//! THRE once per IIR read (on an IER write or a transmitted byte) and QEMU's when THRI goes
//! 0 -> 1 with the transmitter empty, so each event is one edge on both and the console gets no
//! stray bytes. A disk event: one GET_ID request with interrupts requested (no EVENT_IDX, avail
//! flags 0), polled to completion, then InterruptStatus acknowledged (virtio 1.2, 4.2.2) so a
//! level-style line (QEMU's) drops before the next one.
//!
//! Interrupts are enabled only inside `irq_wait` (asm), each wait bounded by the TSC.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi;
use crate::blk::{ST_OK, T_GET_ID};
use crate::phys::{self, le, mfence, rdmsr, rdtsc, wrmsr, Arena, Global};
use crate::say;
use crate::serial::{inb, outb, Dec, Emit, Hex, COM1};
use crate::virtio::{self, Mmio, Queue, QueueMem, D_NEXT, D_WRITE, F_VERSION_1, R_QUEUE_NOTIFY};

core::arch::global_asm!(include_str!("asm/irq.s"), options(att_syntax));

extern "C" {
    /// asm/irq.s: 256 entry stubs, 16 bytes apart.
    static irq_stubs: u8;
    /// asm/irq.s: interrupts on until `*counter >= until` or `ticks` TSC ticks passed.
    fn irq_wait(counter: *const u64, until: u64, ticks: u64) -> u64;
}

/// Interrupts taken per vector (incremented by the stubs in asm/irq.s).
#[no_mangle]
static IRQ_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

#[repr(C, align(16))]
struct Idt([u64; 512]);

/// Every gate is written before `lidt`, so it needs no zeroing at boot.
#[link_section = ".noinit.idt"]
static IDT: Global<Idt> = Global::new(Idt([0; 512]));

const VEC_COM1: u8 = 0x34;
const VEC_DISK: u8 = 0x45;
/// Spurious-interrupt vector (SVR bits 0-7); counted like any other.
const VEC_SPURIOUS: u32 = 0xff;

/// TSC ticks (the host runs at >= 1 GHz, so >= 1.5 s) for an interrupt that must arrive.
const ARRIVE: u64 = 4_000_000_000;
/// TSC ticks (>= 100 ms at up to 2.6 GHz) in which one that must not arrive does not.
const SETTLE: u64 = 260_000_000;
/// Events while masked: several, so "delivered once" on unmask means once, not once each.
const MASKED_EVENTS: u64 = 3;

const IOAPIC_SEL: u64 = 0x00;
const IOAPIC_WIN: u64 = 0x10;
// Redirection entry bits (82093AA §3.2.4).
const RTE_MASKED: u32 = 1 << 16;

/// The exception stubs of asm/irq.s land here: report the vector and where, and fail.
#[no_mangle]
extern "C" fn irq_exception(vector: u64, frame: u64) -> ! {
    // These push an error code below RIP (SDM vol. 3, 6.13).
    let code = matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30);
    let rip = phys::rd64(frame + if code { 8 } else { 0 });
    say!(
        "probe: error irq exception vector=",
        Dec(vector),
        " rip=",
        Hex(rip)
    );
    panic!("exception")
}

fn count(v: u8) -> u64 {
    IRQ_COUNTS[v as usize].load(Ordering::Relaxed)
}

fn wait(v: u8, until: u64, ticks: u64) -> u64 {
    // SAFETY: the counter is a static; the IDT is installed before any wait.
    unsafe { irq_wait(IRQ_COUNTS[v as usize].as_ptr(), until, ticks) }
}

fn install_idt() {
    let stubs = &raw const irq_stubs as u64;
    // SAFETY: BSP-only, interrupts off; the table is ours.
    let idt = unsafe { &mut (*IDT.get()).0 };
    for v in 0..256u64 {
        let h = stubs + 16 * v;
        // 64-bit interrupt gate (SDM vol. 3, 6.14.1): selector 0x08 (asm/entry.s), type 0xE,
        // present, DPL 0, no IST; the gate clears IF on entry.
        idt[2 * v as usize] = (h & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | (h >> 16 & 0xffff) << 48;
        idt[2 * v as usize + 1] = h >> 32;
    }
    let base = idt.as_ptr() as u64;
    let desc: [u16; 5] = [
        4095,
        base as u16,
        (base >> 16) as u16,
        (base >> 32) as u16,
        (base >> 48) as u16,
    ];
    // SAFETY: a complete IDT of valid gates; interrupts stay off.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(readonly, nostack, preserves_flags))
    }
}

/// The local APIC, xAPIC MMIO or x2APIC MSRs (SDM vol. 3, 11.4 and 11.12).
struct Lapic {
    base: u64,
    x2: bool,
}

impl Lapic {
    fn rd(&self, reg: u32) -> u32 {
        if self.x2 {
            rdmsr(0x800 + (reg >> 4)) as u32
        } else {
            phys::mmio_read32(self.base + reg as u64)
        }
    }
    fn wr(&self, reg: u32, v: u32) {
        if self.x2 {
            wrmsr(0x800 + (reg >> 4), v as u64);
        } else {
            phys::mmio_write32(self.base + reg as u64, v);
        }
    }
    fn id(&self) -> u32 {
        let id = self.rd(0x20);
        if self.x2 {
            id
        } else {
            id >> 24
        }
    }
    fn eoi(&self) {
        self.wr(0xb0, 0);
    }
    /// The vector's bit in a 256-bit register: ISR at 0x100, IRR at 0x200 (0x10 per 32).
    fn bit(&self, reg: u32, v: u8) -> bool {
        self.rd(reg + 0x10 * (v as u32 / 32)) >> (v % 32) & 1 != 0
    }
    fn isr(&self, v: u8) -> bool {
        self.bit(0x100, v)
    }
    fn irr(&self, v: u8) -> bool {
        self.bit(0x200, v)
    }
}

fn enable_lapic(address: u64) -> Result<Lapic, &'static str> {
    let base_msr = rdmsr(0x1b);
    if base_msr & (1 << 11) == 0 {
        wrmsr(0x1b, base_msr | 1 << 11); // IA32_APIC_BASE global enable
    }
    let l = Lapic {
        base: address,
        x2: base_msr & (1 << 10) != 0,
    };
    if !l.x2 && (address == 0 || !phys::map(address, 0x1000)) {
        return Err("irq local apic address unusable");
    }
    // Software enable (SVR bit 8) with the spurious vector; TPR 0 so every class is accepted.
    l.wr(0xf0, 0x100 | VEC_SPURIOUS);
    l.wr(0x80, 0);
    Ok(l)
}

#[derive(Clone, Copy, Default)]
struct Ioapic {
    base: u64,
    gsi_base: u32,
    pins: u32,
}

impl Ioapic {
    fn rd(&self, reg: u32) -> u32 {
        phys::mmio_write32(self.base + IOAPIC_SEL, reg);
        phys::mmio_read32(self.base + IOAPIC_WIN)
    }
    fn wr(&self, reg: u32, v: u32) {
        phys::mmio_write32(self.base + IOAPIC_SEL, reg);
        phys::mmio_write32(self.base + IOAPIC_WIN, v);
    }

    /// The entry for `gsi`: fixed delivery, physical destination `dest`, active high, edge
    /// (bits 8-11, 13, 15 all 0), masked or not. High half first, so an unmasked entry never
    /// has a stale destination. Reads the low half back.
    fn route(&self, gsi: u32, vector: u8, dest: u32, masked: bool) -> Result<(), &'static str> {
        let pin = gsi - self.gsi_base;
        let low = vector as u32 | if masked { RTE_MASKED } else { 0 };
        self.wr(0x11 + 2 * pin, dest << 24);
        self.wr(0x10 + 2 * pin, low);
        // Delivery status (12) and remote IRR (14) are read-only; the rest reads back.
        if self.rd(0x10 + 2 * pin) & !(1 << 12 | 1 << 14) != low {
            return Err("redirection entry did not read back");
        }
        Ok(())
    }
}

/// What the probe needs from the MADT (ACPI 6.5, 5.2.12): the local APIC address, the I/O
/// APICs (type 1) and the GSI of ISA IRQ 4 (type 2 overrides; identity without one).
struct Platform {
    lapic: u64,
    ioapics: [Ioapic; 4],
    n: usize,
    com1_gsi: u32,
}

fn platform() -> Result<Platform, &'static str> {
    let a = acpi::walk(false)?;
    let t = phys::bytes(a.madt, a.madt_len).ok_or("irq madt not found")?;
    let mut p = Platform {
        lapic: le(t, 36, 4),
        ioapics: [Ioapic::default(); 4],
        n: 0,
        com1_gsi: 4,
    };
    let mut off = 44;
    while off + 2 <= t.len() {
        let (kind, len) = (t[off], t[off + 1] as usize);
        if len < 2 || off + len > t.len() {
            break;
        }
        let f = |o: usize, n: usize| le(t, off + o, n);
        match kind {
            1 if len >= 12 && p.n < p.ioapics.len() => {
                let base = f(4, 4);
                if !phys::map(base, 0x20) {
                    return Err("irq ioapic address unusable");
                }
                let mut io = Ioapic {
                    base,
                    gsi_base: f(8, 4) as u32,
                    pins: 0,
                };
                // IOAPICVER bits 16-23: the highest entry (82093AA §3.2.2).
                io.pins = (io.rd(1) >> 16 & 0xff) + 1;
                p.ioapics[p.n] = io;
                p.n += 1;
            }
            2 if len >= 10 && f(2, 1) == 0 && f(3, 1) == 4 => p.com1_gsi = f(4, 4) as u32,
            5 if len >= 12 => p.lapic = f(4, 8),
            _ => {}
        }
        off += len;
    }
    Ok(p)
}

impl Platform {
    fn ioapic_for(&self, gsi: u32) -> Option<Ioapic> {
        self.ioapics[..self.n]
            .iter()
            .copied()
            .find(|io| gsi >= io.gsi_base && gsi - io.gsi_base < io.pins)
    }
}

/// A virtio-blk device with one 4-entry queue and one GET_ID chain (header, 20-byte id,
/// status) that is posted again for every event.
struct Disk {
    m: Mmio,
    mem: QueueMem,
    size: u16,
    ctrl: u64,
    next: u16,
}

const R_INTERRUPT_STATUS: u64 = 0x060;
const R_INTERRUPT_ACK: u64 = 0x064;

fn w16(a: u64, v: u16) {
    // SAFETY: queue memory of ours.
    unsafe { (a as *mut u16).write_volatile(v) }
}
fn r16(a: u64) -> u16 {
    // SAFETY: as w16.
    unsafe { (a as *const u16).read_volatile() }
}

impl Disk {
    fn open(f: &virtio::Found, arena: &mut Arena) -> Result<Disk, &'static str> {
        let m = Mmio {
            base: f.base,
            size: f.size,
        };
        let mem = QueueMem::alloc(arena).ok_or("out of memory for a queue")?;
        let ctrl = arena.alloc(64, 64).ok_or("out of memory for a request")?;
        // VERSION_1 only: without EVENT_IDX the device notifies for every used buffer unless
        // the driver sets VIRTQ_AVAIL_F_NO_INTERRUPT (virtio 1.2, 2.7.7), which it never does
        // (queue_at zeroes the driver area).
        m.negotiate(F_VERSION_1)?;
        let q: Queue = m.queue_at(0, 4, mem, false)?;
        m.driver_ok()?;
        q.set(0, ctrl, 16, D_NEXT, 1);
        q.set(1, ctrl + 16, 20, D_NEXT | D_WRITE, 2);
        q.set(2, ctrl + 48, 1, D_WRITE, 0);
        Ok(Disk {
            m,
            mem,
            size: q.size,
            ctrl,
            next: 0,
        })
    }

    /// One GET_ID (virtio 1.2, 5.2.6) to completion, with interrupts off, and InterruptStatus
    /// acknowledged.
    fn event(&mut self) -> Result<(), &'static str> {
        let c = self.ctrl;
        // SAFETY: the request's control bytes are ours.
        unsafe {
            (c as *mut u64).write_volatile(T_GET_ID as u64);
            ((c + 8) as *mut u64).write_volatile(0);
            ((c + 48) as *mut u8).write_volatile(0xff);
        }
        let slot = (self.next & (self.size - 1)) as u64;
        w16(self.mem.avail + 4 + 2 * slot, 0);
        self.next = self.next.wrapping_add(1);
        w16(self.mem.avail + 2, self.next);
        mfence(); // the avail idx before the notify
        self.m.wr(R_QUEUE_NOTIFY, 0);
        // The used idx comes before InterruptStatus (and the interrupt): wait for both.
        let t0 = rdtsc();
        let mut isr = 0;
        while r16(self.mem.used + 2) != self.next || isr & 1 == 0 {
            if rdtsc().wrapping_sub(t0) > virtio::WAIT {
                return Err("GET_ID: no used buffer and InterruptStatus bit 0 in time");
            }
            isr = self.m.rd(R_INTERRUPT_STATUS);
        }
        let used = phys::rd64(self.mem.used + 4 + 8 * slot);
        if used as u32 != 0 || phys::rd8(c + 48) != ST_OK {
            return Err("GET_ID: wrong used id or status not ok");
        }
        self.m.wr(R_INTERRUPT_ACK, isr);
        Ok(())
    }
}

enum Kind {
    Com1,
    Disk(Disk),
}

struct Line {
    name: &'static str,
    vector: u8,
    gsi: u32,
    io: Ioapic,
    kind: Kind,
}

const IER: u16 = COM1 + 1;
const IIR: u16 = COM1 + 2;

impl Line {
    fn event(&mut self) -> Result<(), &'static str> {
        match &mut self.kind {
            Kind::Com1 => {
                // THRE enabled (IER bit 1) with the transmitter empty: vm-superio fires its
                // irqfd if IIR was read since the last time, QEMU raises its line until IER 0.
                outb(IER, 0);
                inb(IIR);
                outb(IER, 2);
                outb(IER, 0);
                Ok(())
            }
            Kind::Disk(d) => d.event(),
        }
    }
}

/// Interrupts of `v` that arrive: the first within `first` ticks, then more while each window
/// of SETTLE after an EOI brings one (the local APIC holds a second of the same vector in IRR
/// until the first is EOIed: SDM vol. 3, 11.8.4), at most 4. Each one gets its EOI.
fn arrivals(lapic: &Lapic, v: u8, first: u64) -> u64 {
    let n0 = count(v);
    let mut n = wait(v, n0 + 1, first);
    let mut last = n0;
    for _ in 0..4 {
        if n == last {
            break;
        }
        last = n;
        lapic.eoi();
        n = wait(v, n + 1, SETTLE);
    }
    n - n0
}

/// The start of a result line: `probe: irq vector=V source=S`.
fn head(l: &Line) {
    "probe: irq vector=".emit();
    Hex(l.vector as u64).emit();
    " source=".emit();
    l.name.emit();
}

struct Checker<'a> {
    lapic: &'a Lapic,
    dest: u32,
    /// What arrives on unmask after edges on a masked entry: one (`latch`) or none.
    latch: bool,
    /// The local APIC holds a second interrupt of an in-service vector until the EOI.
    eoi_hold: bool,
    ok: bool,
}

impl Checker<'_> {
    fn expect(&mut self, l: &Line, what: &str, got: u64, want: u64) {
        if got != want {
            self.ok = false;
            say!(
                "probe: error irq vector=",
                Hex(l.vector as u64),
                " source=",
                l.name,
                " ",
                what,
                "=",
                Dec(got),
                " expected ",
                Dec(want)
            );
        }
    }

    fn line(&mut self, l: &mut Line) -> Result<(), &'static str> {
        let (v, lapic) = (l.vector, self.lapic);

        l.io.route(l.gsi, v, self.dest, false)?;
        l.event()?;
        let n = arrivals(lapic, v, ARRIVE);
        head(l);
        say!(" delivered=", Dec(n));
        self.expect(l, "delivered", n, 1);

        l.io.route(l.gsi, v, self.dest, true)?;
        for _ in 0..MASKED_EVENTS {
            l.event()?;
        }
        let n = arrivals(lapic, v, SETTLE);
        head(l);
        say!(" masked events=", Dec(MASKED_EVENTS), " count=", Dec(n));
        self.expect(l, "masked count", n, 0);

        l.io.route(l.gsi, v, self.dest, false)?;
        let n = arrivals(lapic, v, 2 * SETTLE);
        head(l);
        say!(" unmasked count=", Dec(n));
        self.expect(l, "unmasked count", n, self.latch as u64);

        let n0 = count(v);
        l.event()?;
        let n1 = wait(v, n0 + 1, ARRIVE);
        let isr = lapic.isr(v);
        l.event()?;
        let n2 = wait(v, n1 + 1, SETTLE);
        let irr = lapic.irr(v);
        for _ in n0..n2 {
            lapic.eoi(); // the first, and any that was not held
        }
        let next = arrivals(lapic, v, if self.eoi_hold { ARRIVE } else { SETTLE });
        head(l);
        say!(
            " eoi isr=",
            Dec(isr as u64),
            " before=",
            Dec(n2 - n1),
            " irr=",
            Dec(irr as u64),
            " next=",
            Dec(next)
        );
        let hold = self.eoi_hold as u64;
        self.expect(l, "eoi first", n1 - n0, 1);
        self.expect(l, "eoi isr", isr as u64, hold);
        self.expect(l, "eoi before", n2 - n1, 1 - hold);
        self.expect(l, "eoi irr", irr as u64, hold);
        self.expect(l, "eoi next", next, hold);
        l.io.route(l.gsi, v, self.dest, true)
    }
}

/// `probe.mode=irq`; false when a check failed.
pub fn run(cmdline: &'static [u8]) -> bool {
    let (mut latch, mut eoi_hold, mut ok) = (true, true, true);
    for w in cmdline.split(|&c| c == b' ') {
        match w {
            b"probe.irq.masked-edge=latch" => latch = true,
            b"probe.irq.masked-edge=drop" => latch = false,
            b"probe.irq.eoi-hold=1" => eoi_hold = true,
            b"probe.irq.eoi-hold=0" => eoi_hold = false,
            _ if w.starts_with(b"probe.irq.") => {
                say!("probe: error irq unparsable ", crate::serial::Text(w));
                ok = false;
            }
            _ => {}
        }
    }
    install_idt();
    // OCW1 (8259A datasheet): mask every input of both PICs. KVM's in-kernel PIC sees GSIs
    // 0-15 too and the VMM points LINT0 at it (ExtINT); only the I/O APIC may deliver here.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    let p = match platform() {
        Ok(p) => p,
        Err(e) => {
            say!("probe: error ", e);
            return false;
        }
    };
    let lapic = match enable_lapic(p.lapic) {
        Ok(l) => l,
        Err(e) => {
            say!("probe: error ", e);
            return false;
        }
    };
    let dest = lapic.id();
    for io in &p.ioapics[..p.n] {
        say!(
            "probe: irq ioapic base=",
            Hex(io.base),
            " gsi_base=",
            Dec(io.gsi_base as u64),
            " pins=",
            Dec(io.pins as u64),
            " lapic=",
            Hex(p.lapic),
            " apic_id=",
            Dec(dest as u64)
        );
    }
    let mut c = Checker {
        lapic: &lapic,
        dest,
        latch,
        eoi_hold,
        ok,
    };
    let mut lines: [Option<Line>; 2] = [None, None];
    match p.ioapic_for(p.com1_gsi) {
        Some(io) => {
            lines[0] = Some(Line {
                name: "com1",
                vector: VEC_COM1,
                gsi: p.com1_gsi,
                io,
                kind: Kind::Com1,
            })
        }
        None => {
            say!(
                "probe: error irq com1 gsi=",
                Dec(p.com1_gsi as u64),
                " on no ioapic"
            );
            c.ok = false;
        }
    }
    let devs = virtio::discover(cmdline);
    let mut arena = Arena::new(crate::bootinfo::get());
    let disk = devs
        .all()
        .iter()
        .find(|f| f.usable && f.id == crate::blk::DEVICE_ID_BLOCK && f.version == 2);
    match disk.map(|f| (f, p.ioapic_for(f.irq as u32))) {
        None => {
            say!("probe: error irq no modern virtio-mmio block device");
            c.ok = false;
        }
        Some((f, None)) => {
            say!("probe: error irq disk gsi=", Dec(f.irq), " on no ioapic");
            c.ok = false;
        }
        Some((f, Some(io))) => match Disk::open(f, &mut arena) {
            Ok(d) => {
                lines[1] = Some(Line {
                    name: "disk",
                    vector: VEC_DISK,
                    gsi: f.irq as u32,
                    io,
                    kind: Kind::Disk(d),
                })
            }
            Err(e) => {
                say!("probe: error irq disk ", e);
                c.ok = false;
            }
        },
    }
    for l in lines.iter_mut().flatten() {
        say!(
            "probe: irq vector=",
            Hex(l.vector as u64),
            " source=",
            l.name,
            " gsi=",
            Dec(l.gsi as u64),
            " ioapic=",
            Hex(l.io.base)
        );
        if let Err(e) = c.line(l) {
            say!("probe: error irq source=", l.name, " ", e);
            c.ok = false;
        }
        if let Kind::Disk(d) = &l.kind {
            d.m.reset();
        }
    }
    // Anything on another vector (spurious included) was not asked for.
    for (v, n) in IRQ_COUNTS.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        if n != 0 && v != VEC_COM1 as usize && v != VEC_DISK as usize {
            say!(
                "probe: error irq unexpected vector=",
                Hex(v as u64),
                " count=",
                Dec(n)
            );
            c.ok = false;
        }
    }
    c.ok
}

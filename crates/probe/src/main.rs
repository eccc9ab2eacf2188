//! The probe guest: boots like a kernel (PVH, or the Linux 32/64-bit boot protocol), checks
//! what the VMM gave it, prints one fact per line on COM1 and ends the VM.
//!
//! Built by `cargo xtask probe` only: no SSE/x87, no `core::fmt`, freestanding.

#![no_std]
#![no_main]

mod acpi;
mod blk;
mod blkcrash;
mod bootinfo;
mod dsdt;
mod hostile;
mod inet;
mod inflight;
mod irq;
mod net;
mod nethostile;
mod netmodes;
mod phys;
mod serial;
mod smp;
mod virtio;

use core::sync::atomic::{AtomicBool, Ordering};

use acpi::Write;
use phys::{cpuid, rdtsc, Global};
use serial::{inb, outb, outw, Dec, Emit, Hex, Hex16, Text, COM1, COM1_LSR};
use smp::CpuRec;

core::arch::global_asm!(
    include_str!("asm/entry.s"),
    bsp_stack = const 64 * 1024,
    ap_stack = const smp::AP_STACK,
    max_aps = const smp::MAX_APS,
    options(att_syntax)
);
core::arch::global_asm!(include_str!("asm/setup.s"), options(att_syntax));
core::arch::global_asm!(include_str!("asm/fault.s"), options(att_syntax));

extern "C" {
    /// asm/fault.s: executes an instruction KVM's emulator rejects (KVM_EXIT_INTERNAL_ERROR).
    fn fault_emulation_insn() -> !;
    /// asm/fault.s: loads a zero-limit IDT and divides by zero (triple fault, KVM_EXIT_SHUTDOWN).
    fn fault_triple() -> !;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Boot,
    Quick,
    Echo,
    Pio,
    FaultEmulation,
    FaultTriple,
    Blk,
    BlkBench,
    BlkHostile,
    BlkInflight,
    BlkCrash,
    Chatter,
    Net(netmodes::Mode),
    NetHostile,
    Irq,
}

#[derive(Clone, Copy)]
enum Exit {
    I8042,
    AcpiReset,
    AcpiPoweroff,
    Port(u16),
}

struct Options {
    mode: Mode,
    exit: Exit,
    count: u64,
}

fn number(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v = 0u64;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

fn parse(cmdline: &[u8]) -> Options {
    let mut o = Options {
        mode: Mode::Boot,
        exit: Exit::I8042,
        count: 10_000,
    };
    for w in cmdline.split(|&c| c == b' ') {
        if let Some(v) = w.strip_prefix(b"probe.mode=") {
            o.mode = match v {
                b"quick" => Mode::Quick,
                b"echo" => Mode::Echo,
                b"pio" => Mode::Pio,
                b"fault-emulation" => Mode::FaultEmulation,
                b"fault-triple" => Mode::FaultTriple,
                b"blk" => Mode::Blk,
                b"blk-bench" => Mode::BlkBench,
                b"blk-hostile" => Mode::BlkHostile,
                b"blk-inflight" => Mode::BlkInflight,
                b"blk-crash" => Mode::BlkCrash,
                b"chatter" => Mode::Chatter,
                b"net-ping" => Mode::Net(netmodes::Mode::Ping),
                b"net-udp" => Mode::Net(netmodes::Mode::Udp),
                b"net-ctrl" => Mode::Net(netmodes::Mode::Ctrl),
                b"net-bench" => Mode::Net(netmodes::Mode::Bench),
                b"net-idle" => Mode::Net(netmodes::Mode::Idle),
                b"net-hostile" => Mode::NetHostile,
                b"irq" => Mode::Irq,
                _ => Mode::Boot,
            };
        } else if let Some(v) = w.strip_prefix(b"probe.exit=") {
            o.exit = match v {
                b"acpi-reset" => Exit::AcpiReset,
                b"acpi-poweroff" => Exit::AcpiPoweroff,
                _ => match v
                    .strip_prefix(b"port:")
                    .and_then(number)
                    .and_then(|p| u16::try_from(p).ok())
                {
                    Some(p) => Exit::Port(p),
                    None => Exit::I8042,
                },
            };
        } else if let Some(v) = w.strip_prefix(b"probe.count=") {
            o.count = number(v).unwrap_or(o.count);
        }
    }
    o
}

static EXIT: Global<Exit> = Global::new(Exit::I8042);

/// The register write that ends the VM; printing an error if it cannot be found.
fn exit_write(e: Exit) -> Write {
    let r = match e {
        Exit::I8042 => Ok(Write::Io8(0x64, 0xfe)), // pulse reset through the i8042
        Exit::Port(p) => Ok(Write::Io8(p, 0)),
        Exit::AcpiReset => acpi::reset_write(),
        Exit::AcpiPoweroff => acpi::poweroff_write(),
    };
    r.unwrap_or_else(|what| {
        say!("probe: error ", what);
        Write::Io8(0x64, 0xfe)
    })
}

fn fire(w: Write) -> ! {
    match w {
        Write::Io8(p, v) => outb(p, v),
        Write::Io16(p, v) => outw(p, v),
        Write::Mem8(a, v) => phys::mmio_write8(a, v),
    }
    phys::halt()
}

/// Rust entry of the BSP (from asm/entry.s): protocol 0 = PVH, 1 = Linux 64-bit, 2 = 32-bit.
#[no_mangle]
extern "C" fn probe_main(protocol: u32, ptr: u64) -> ! {
    let boot = bootinfo::capture(protocol, ptr);
    let o = parse(boot.cmdline());
    // SAFETY: BSP-only global.
    unsafe { *EXIT.get() = o.exit };
    say!("probe: hello");
    if let Some(e) = boot.error {
        say!("probe: error ", e);
    }
    let mut pass = true;
    match o.mode {
        Mode::Quick => {}
        Mode::Blk => pass = blk::run(boot.cmdline()),
        Mode::BlkBench => pass = blk::bench(boot.cmdline()),
        Mode::BlkHostile => pass = hostile::run(boot.cmdline()),
        Mode::BlkInflight => pass = inflight::run(boot.cmdline()),
        Mode::BlkCrash => pass = blkcrash::run(boot.cmdline()),
        Mode::Chatter => chatter(o.count),
        Mode::Net(m) => pass = netmodes::run(m, boot.cmdline()),
        Mode::NetHostile => pass = nethostile::run(boot.cmdline()),
        Mode::Irq => pass = irq::run(boot.cmdline()),
        Mode::Boot => report(boot),
        Mode::Echo => echo(),
        Mode::Pio => pio(o.count),
        Mode::FaultEmulation => {
            say!("probe: fault emulation");
            // SAFETY: ends the VM; never returns.
            unsafe { fault_emulation_insn() }
        }
        Mode::FaultTriple => {
            say!("probe: fault triple");
            // SAFETY: ends the VM; never returns.
            unsafe { fault_triple() }
        }
    }
    let w = exit_write(o.exit);
    say!(if pass { "PROBE-OK" } else { "PROBE-FAIL" });
    fire(w)
}

fn echo() {
    say!("probe: echo ready");
    let mut line = [0u8; 256];
    let mut n = 0;
    loop {
        while inb(COM1_LSR) & 1 == 0 {}
        let c = inb(COM1);
        if c == b'\n' || c == b'\r' {
            break;
        }
        if let Some(slot) = line.get_mut(n) {
            *slot = c;
            n += 1;
        }
    }
    say!("probe: echo line=", Text(&line[..n]));
}

/// Console output as fast as the UART takes it: `count` lines (0: until the VM is stopped).
fn chatter(count: u64) {
    let mut n = 0u64;
    while count == 0 || n < count {
        say!(
            "probe: chatter n=",
            Dec(n),
            " ................................................................"
        );
        n += 1;
    }
}

fn pio(count: u64) {
    say!("probe: pio start count=", Dec(count));
    let t0 = rdtsc();
    for _ in 0..count {
        inb(COM1_LSR);
    }
    let t = rdtsc().wrapping_sub(t0);
    say!("probe: pio done count=", Dec(count), " tsc=", Dec(t));
}

fn report(boot: &bootinfo::BootInfo) {
    say!("probe: boot protocol=", boot.protocol.name());
    serial::outsb(COM1, b"probe: string-io rep-outsb=intact\n");
    say!("probe: cmdline=", Text(boot.cmdline()));
    let ram = boot.regions().iter().filter(|r| r.kind == 1);
    let (bytes, n) = ram.fold((0u64, 0u64), |(s, n), r| (s.wrapping_add(r.size), n + 1));
    say!(
        "probe: memory ram=",
        Dec(bytes),
        " regions=",
        Dec(n),
        " entries=",
        Dec(boot.map_entries)
    );
    for r in boot.regions() {
        say!(
            "probe: memory region base=",
            Hex(r.base),
            " size=",
            Hex(r.size),
            " type=",
            Dec(r.kind as u64)
        );
    }

    let acpi = acpi::walk(true).unwrap_or_else(|what| {
        say!("probe: error ", what);
        acpi::Acpi::default()
    });
    match acpi.aml() {
        Some(aml) => dsdt::report(aml),
        None if acpi.rsdp != 0 => say!("probe: error dsdt not found"),
        None => {}
    }
    let madt = acpi::madt(&acpi);
    if let Some(m) = &madt {
        "probe: madt cpus=".emit();
        Dec(m.n as u64).emit();
        " apic_ids=".emit();
        for (i, id) in m.ids[..m.n].iter().enumerate() {
            if i > 0 {
                outb(COM1, b',');
            }
            Dec(*id as u64).emit();
        }
        say!(" ioapics=", Dec(m.ioapics), " overrides=", Dec(m.overrides));
    } else if acpi.rsdp != 0 {
        say!("probe: error madt not found");
    }
    cpus(madt.as_ref());
    cpuid_line();
    initrd(boot);
}

fn cpu_line(index: usize, r: &CpuRec) {
    "probe: cpu index=".emit();
    Dec(index as u64).emit();
    " apic_id=".emit();
    Dec(r.apic_id() as u64).emit();
    " x2apic_id=".emit();
    match r.x2apic_id() {
        Some(id) => Dec(id as u64).emit(),
        None => "none".emit(),
    }
    " leaf1_logical=".emit();
    Dec((r.leaf1_ebx >> 16 & 0xff) as u64).emit();
    for (k, name) in [" leafb_smt=", " leafb_core="].iter().enumerate() {
        name.emit();
        match r.leafb {
            Some(b) => {
                Dec((b[k][0] & 0x1f) as u64).emit();
                outb(COM1, b'/');
                Dec((b[k][1] & 0xffff) as u64).emit();
            }
            None => "none".emit(),
        }
    }
    say!();
}

/// One line per running CPU (the BSP, then the APs in MADT order), then the summary:
/// APIC ids distinct, and the running CPUs exactly the MADT's enabled ones.
fn cpus(madt: Option<&acpi::Madt>) {
    let bsp = CpuRec::read();
    let started = madt.map_or(0, |m| smp::start_aps(m, bsp.apic_id()));
    let ids = madt.map_or(&[][..], |m| &m.ids[..m.n]);
    let mut seen = [0u64; 4];
    let (mut distinct, mut in_madt) = (true, madt.is_some());
    for i in 0..=started {
        let r = if i == 0 { bsp } else { smp::ap_record(i - 1) };
        cpu_line(i, &r);
        let id = r.apic_id();
        let bit = 1u64 << (id % 64);
        distinct &= seen[id as usize / 64] & bit == 0;
        seen[id as usize / 64] |= bit;
        // The x2APIC id stands in where an 8-bit xAPIC id cannot hold the MADT's.
        in_madt &= ids.contains(&id) || r.x2apic_id().is_some_and(|x| ids.contains(&x));
    }
    let matched = distinct && in_madt && ids.len() == started + 1;
    say!(
        "probe: cpus running=",
        Dec(started as u64 + 1),
        " apic_ids=",
        if distinct { "distinct" } else { "duplicate" },
        " madt_match=",
        if matched { "yes" } else { "no" }
    );
}

fn cpuid_line() {
    let max = cpuid(0, 0)[0];
    let l1 = cpuid(1, 0);
    let l7 = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
    let ext = cpuid(0x8000_0000, 0)[0];
    let e1 = if ext >= 0x8000_0001 {
        cpuid(0x8000_0001, 0)
    } else {
        [0; 4]
    };
    let bit = |r: u32, b: u32| Dec((r >> b & 1) as u64);
    let hv = l1[2] >> 31 & 1 != 0;
    let mut vendor = [0u8; 12];
    if hv {
        let v = cpuid(0x4000_0000, 0);
        for (k, r) in [v[1], v[2], v[3]].iter().enumerate() {
            vendor[4 * k..4 * k + 4].copy_from_slice(&r.to_le_bytes());
        }
    }
    // Trailing NULs are padding ("KVMKVMKVM\0\0\0").
    let vlen = vendor.iter().rposition(|&c| c != 0).map_or(0, |p| p + 1);
    "probe: cpuid hypervisor=".emit();
    bit(l1[2], 31).emit();
    " vendor=".emit();
    if vlen == 0 {
        "none".emit();
    } else {
        Text(&vendor[..vlen]).emit();
    }
    say!(
        " xsave=",
        bit(l1[2], 26),
        " popcnt=",
        bit(l1[2], 23),
        " cx16=",
        bit(l1[2], 13),
        " rdtscp=",
        bit(e1[3], 27),
        " bmi1=",
        bit(l7[1], 3),
        " bmi2=",
        bit(l7[1], 8),
        " erms=",
        bit(l7[1], 9),
        " fsrm=",
        bit(l7[3], 4)
    );
}

/// FNV-1a over little-endian 64-bit words (the last one zero-padded): one multiply per 8 bytes,
/// four words per loop step to keep the emulated instruction count low.
fn fnv1a64w(b: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let word = |c: &[u8], k: usize| {
        // SAFETY: callers pass chunks of at least 8 * (k + 1) bytes.
        unsafe { (c.as_ptr().add(8 * k) as *const u64).read_unaligned() }
    };
    let mut quads = b.chunks_exact(32);
    for c in &mut quads {
        h = (h ^ word(c, 0)).wrapping_mul(PRIME);
        h = (h ^ word(c, 1)).wrapping_mul(PRIME);
        h = (h ^ word(c, 2)).wrapping_mul(PRIME);
        h = (h ^ word(c, 3)).wrapping_mul(PRIME);
    }
    for c in quads.remainder().chunks(8) {
        h = (h ^ phys::le(c, 0, c.len())).wrapping_mul(PRIME);
    }
    h
}

fn initrd(boot: &bootinfo::BootInfo) {
    match boot.initrd {
        None => say!("probe: initrd none"),
        Some((addr, size)) => match phys::bytes(addr, size) {
            Some(b) => say!(
                "probe: initrd size=",
                Dec(size),
                " fnv1a64w=",
                Hex16(fnv1a64w(b))
            ),
            None => say!(
                "probe: error initrd at ",
                Hex(addr),
                " size ",
                Dec(size),
                " unmapped"
            ),
        },
    }
}

static PANICKED: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    if PANICKED.swap(true, Ordering::Relaxed) {
        phys::halt();
    }
    say!("probe: error panic");
    say!("PROBE-FAIL");
    // SAFETY: BSP-only global (an AP does not panic: its code only reads CPUID).
    fire(exit_write(unsafe { *EXIT.get() }))
}

//! ACPI: RSDP discovery, the XSDT/RSDT walk, FADT, MADT (ACPI 6.5 chapter 5).

use crate::bootinfo::{self, Protocol};
use crate::dsdt;
use crate::phys::{self, le, rd32, rd64, rd8};
use crate::say;
use crate::serial::{Dec, Hex, Text};

/// Longest table accepted (a guard against garbage lengths).
const MAX_TABLE: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Pvh,
    BootParams,
    Scan,
}

#[derive(Clone, Copy, Default)]
pub struct Acpi {
    pub rsdp: u64,
    pub fadt: u64,
    pub fadt_len: u64,
    pub dsdt: u64,
    pub dsdt_len: u64,
    pub madt: u64,
    pub madt_len: u64,
}

impl Acpi {
    /// The DSDT's AML (after its 36-byte header).
    pub fn aml(&self) -> Option<&'static [u8]> {
        let t = phys::bytes(self.dsdt, self.dsdt_len)?;
        t.get(36..)
    }
}

/// Byte sum mod 256, eight bytes per step: 16-bit lanes of even and odd bytes, folded before
/// they can overflow (every instruction counts under the emulator).
fn sum(b: &[u8]) -> u8 {
    const EVEN: u64 = 0x00ff_00ff_00ff_00ff;
    let mut words = b.chunks_exact(8);
    let mut total = 0u64;
    while words.len() != 0 {
        let mut lanes = 0u64;
        for w in words.by_ref().take(128) {
            // SAFETY: `w` is 8 bytes long.
            let w = unsafe { (w.as_ptr() as *const u64).read_unaligned() };
            lanes += (w & EVEN) + (w >> 8 & EVEN);
        }
        total += (lanes & 0xffff) + (lanes >> 16 & 0xffff) + (lanes >> 32 & 0xffff) + (lanes >> 48);
    }
    let tail = words.remainder().iter().fold(0u64, |s, &x| s + x as u64);
    (total + tail) as u8
}

/// RSDP (5.2.5): "RSD PTR " and a zero checksum over the first 20 bytes.
fn rsdp_at(a: u64) -> bool {
    match phys::bytes(a, 20) {
        Some(b) => &b[..8] == b"RSD PTR " && sum(b) == 0,
        None => false,
    }
}

/// The RSDP the loader gave, else the BIOS areas of 5.2.5.1: the first KiB of the EBDA and
/// 0xE0000..0xFFFFF, on 16-byte boundaries.
pub fn find_rsdp() -> Option<(u64, Source)> {
    let boot = bootinfo::get();
    if boot.rsdp != 0 && rsdp_at(boot.rsdp) {
        let src = if boot.protocol == Protocol::Pvh {
            Source::Pvh
        } else {
            Source::BootParams
        };
        return Some((boot.rsdp, src));
    }
    let ebda = (phys::rd16(0x40e) as u64) << 4;
    let ebda = if (0x80000..0xa0000).contains(&ebda) {
        ebda
    } else {
        0
    };
    let areas = [
        (ebda, if ebda != 0 { 1024 } else { 0 }),
        (0xe0000u64, 0x20000u64),
    ];
    for (base, len) in areas {
        let mut a = base;
        while a + 20 <= base + len {
            if rd64(a) == u64::from_le_bytes(*b"RSD PTR ") && rsdp_at(a) {
                return Some((a, Source::Scan));
            }
            a += 16;
        }
    }
    None
}

/// Header of the table at `a`: (signature, length), if it can be mapped and is plausible.
fn header(a: u64) -> Option<([u8; 4], u64)> {
    let h = phys::bytes(a, 36)?;
    let len = le(h, 4, 4);
    if !(36..=MAX_TABLE).contains(&len) {
        return None;
    }
    Some(([h[0], h[1], h[2], h[3]], len))
}

struct Walk {
    verbose: bool,
    tables: u64,
    all_ok: bool,
}

impl Walk {
    fn line(&mut self, sig: &[u8], addr: u64, len: u64, ok: bool) {
        self.tables += 1;
        self.all_ok &= ok;
        if self.verbose {
            let ck = if ok { "ok" } else { "bad" };
            say!(
                "probe: acpi table sig=",
                Text(sig),
                " addr=",
                Hex(addr),
                " len=",
                Dec(len),
                " checksum=",
                ck
            );
        }
    }

    /// Checks and prints the table at `a`; returns its signature and length.
    fn table(&mut self, a: u64) -> Option<([u8; 4], u64)> {
        let Some((sig, len)) = header(a) else {
            if self.verbose {
                say!("probe: error acpi table unreadable at ", Hex(a));
            }
            self.all_ok = false;
            return None;
        };
        let ok = phys::bytes(a, len).is_some_and(|t| sum(t) == 0);
        self.line(&sig, a, len, ok);
        Some((sig, len))
    }
}

/// Finds the tables the probe uses; with `verbose`, prints the `acpi` lines of the boot report.
pub fn walk(verbose: bool) -> Result<Acpi, &'static str> {
    let (rsdp, src) = find_rsdp().ok_or("acpi rsdp not found")?;
    let rev = rd8(rsdp + 15);
    let mut w = Walk {
        verbose,
        tables: 0,
        all_ok: true,
    };
    if verbose {
        let src = match src {
            Source::Pvh => "pvh",
            Source::BootParams => "bootparams",
            Source::Scan => "scan",
        };
        say!(
            "probe: acpi rsdp=",
            Hex(rsdp),
            " source=",
            src,
            " revision=",
            Dec(rev as u64)
        );
    }
    // Revision 2+ RSDPs are 36 bytes (length at 20) with an extended checksum.
    let (rlen, rok) = if rev >= 2 {
        let len = phys::bytes(rsdp, 24).map_or(0, |b| le(b, 20, 4));
        let ok = (36..=4096).contains(&len) && phys::bytes(rsdp, len).is_some_and(|b| sum(b) == 0);
        (len, ok)
    } else {
        (20, true)
    };
    w.line(b"RSDP", rsdp, rlen, rok);

    let xsdt = if rev >= 2 { rd64(rsdp + 24) } else { 0 };
    let (root, width) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (rd32(rsdp + 16) as u64, 4)
    };
    let (_, root_len) = w.table(root).ok_or("acpi root table unreadable")?;
    let entries = phys::bytes(root, root_len).ok_or("acpi root table unmapped")?;
    let mut acpi = Acpi {
        rsdp,
        ..Acpi::default()
    };
    let mut off = 36;
    // At most 256 entries: a garbage length must not turn into millions of lines.
    while off + width <= entries.len().min(36 + 256 * width) {
        let a = le(entries, off, width);
        off += width;
        let Some((sig, len)) = w.table(a) else {
            continue;
        };
        match &sig {
            b"FACP" => {
                acpi.fadt = a;
                acpi.fadt_len = len;
                // X_DSDT (offset 140) when present, else DSDT (offset 40): 5.2.9.
                let x = if len >= 148 { rd64(a + 140) } else { 0 };
                let d = if x != 0 { x } else { rd32(a + 40) as u64 };
                if let Some((_, dlen)) = w.table(d) {
                    acpi.dsdt = d;
                    acpi.dsdt_len = dlen;
                }
            }
            b"APIC" => {
                acpi.madt = a;
                acpi.madt_len = len;
            }
            _ => {}
        }
    }
    if verbose {
        say!(
            "probe: acpi checksums=",
            if w.all_ok { "ok" } else { "bad" },
            " tables=",
            Dec(w.tables)
        );
    }
    Ok(acpi)
}

pub const MAX_MADT_CPUS: usize = 256;

pub struct Madt {
    pub lapic: u64,
    /// APIC ids of the enabled processors, in table order.
    pub ids: [u32; MAX_MADT_CPUS],
    pub n: usize,
    pub ioapics: u64,
    pub overrides: u64,
}

/// MADT (5.2.12): enabled Processor Local APIC (type 0) and x2APIC (type 9) entries, I/O
/// APICs (1), interrupt source overrides (2), and a local APIC address override (5).
pub fn madt(acpi: &Acpi) -> Option<Madt> {
    let t = phys::bytes(acpi.madt, acpi.madt_len)?;
    let mut m = Madt {
        lapic: le(t, 36, 4),
        ids: [0; MAX_MADT_CPUS],
        n: 0,
        ioapics: 0,
        overrides: 0,
    };
    let mut off = 44;
    while off + 2 <= t.len() {
        let (kind, len) = (t[off], t[off + 1] as usize);
        if len < 2 || off + len > t.len() {
            break;
        }
        let f = |o: usize, n: usize| le(t, off + o, n);
        match kind {
            0 if len >= 8 && f(4, 4) & 1 != 0 => push_cpu(&mut m, f(3, 1) as u32),
            9 if len >= 16 && f(8, 4) & 1 != 0 => push_cpu(&mut m, f(4, 4) as u32),
            1 => m.ioapics += 1,
            2 => m.overrides += 1,
            5 if len >= 12 => m.lapic = f(4, 8),
            _ => {}
        }
        off += len;
    }
    Some(m)
}

fn push_cpu(m: &mut Madt, id: u32) {
    if let Some(slot) = m.ids.get_mut(m.n) {
        *slot = id;
        m.n += 1;
    }
}

/// How the VM is ended: one register write.
#[derive(Clone, Copy)]
pub enum Write {
    Io8(u16, u8),
    Io16(u16, u16),
    Mem8(u64, u8),
}

/// A Generic Address Structure (5.2.3.2) at `a`: system memory (0) or system I/O (1).
fn gas(a: u64, value: u8) -> Option<Write> {
    let (space, addr) = (rd8(a), rd64(a + 4));
    match (space, addr) {
        (_, 0) => None,
        (0, _) => phys::map(addr, 1).then_some(Write::Mem8(addr, value)),
        (1, _) => u16::try_from(addr).ok().map(|p| Write::Io8(p, value)),
        _ => None,
    }
}

/// The FADT's RESET_REG and RESET_VALUE (offsets 116 and 128).
pub fn reset_write() -> Result<Write, &'static str> {
    let acpi = walk(false)?;
    if acpi.fadt == 0 || acpi.fadt_len < 129 {
        return Err("acpi-reset: no FADT RESET_REG");
    }
    gas(acpi.fadt + 116, rd8(acpi.fadt + 128)).ok_or("acpi-reset: unusable RESET_REG")
}

/// S5 through SLEEP_CONTROL_REG (hardware-reduced ACPI, 4.8.3.7; offset 244), else PM1a_CNT
/// (offset 64): SLP_TYP from the DSDT's _S5_, SLP_EN.
pub fn poweroff_write() -> Result<Write, &'static str> {
    let acpi = walk(false)?;
    if acpi.fadt == 0 {
        return Err("acpi-poweroff: no FADT");
    }
    let typ = acpi.aml().and_then(dsdt::s5_type).unwrap_or(5) & 7;
    if acpi.fadt_len >= 256 && rd64(acpi.fadt + 248) != 0 {
        return gas(acpi.fadt + 244, typ << 2 | 1 << 5)
            .ok_or("acpi-poweroff: unusable SLEEP_CONTROL_REG");
    }
    let pm1a = rd32(acpi.fadt + 64);
    match u16::try_from(pm1a) {
        Ok(p) if p != 0 => Ok(Write::Io16(p, (typ as u16) << 10 | 1 << 13)),
        _ => Err("acpi-poweroff: no SLEEP_CONTROL_REG or PM1a_CNT"),
    }
}

//! A DSDT scan without an AML interpreter, the way SeaBIOS does it: find each DeviceOp, then
//! `Name(_HID, ...)` and `Name(_CRS, ResourceTemplate)` in its scope. AML encodings from
//! ACPI 6.5 section 20.2 (AML grammar); resource descriptors from section 6.4.
//! Every read is bounds-checked: the table comes from the VMM and may be garbage.

use crate::say;
use crate::serial::{Dec, Emit, Hex, Text};

const NAME_OP: u8 = 0x08;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const EXT_OP: u8 = 0x5b;
const DEVICE_OP: u8 = 0x82;

fn at(aml: &[u8], i: usize) -> Option<u8> {
    aml.get(i).copied()
}

/// The first index at or after `i` holding `a` or `b`. Eight bytes per step where neither is
/// present (a byte is zero in `w ^ pattern` exactly when `(x - 0x01..) & !x & 0x80..` is set).
fn find2(h: &[u8], mut i: usize, a: u8, b: u8) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let (pa, pb) = (ONES * a as u64, ONES * b as u64);
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    loop {
        while let Some(w) = h.get(i..i + 8) {
            // SAFETY: `w` is 8 bytes long.
            let w = unsafe { (w.as_ptr() as *const u64).read_unaligned() };
            if zero_byte(w ^ pa) || zero_byte(w ^ pb) {
                break;
            }
            i += 8;
        }
        let end = h.len().min(i + 8);
        while i < end {
            if h[i] == a || h[i] == b {
                return Some(i);
            }
            i += 1;
        }
        if i >= h.len() {
            return None;
        }
    }
}

/// PkgLength (20.2.4) at `i`: (length, bytes used). The length counts its own bytes.
fn pkg_length(aml: &[u8], i: usize) -> Option<(usize, usize)> {
    let lead = at(aml, i)?;
    let extra = (lead >> 6) as usize;
    if extra == 0 {
        return Some(((lead & 0x3f) as usize, 1));
    }
    let mut len = (lead & 0x0f) as usize;
    for k in 0..extra {
        len |= (at(aml, i + 1 + k)? as usize) << (4 + 8 * k);
    }
    Some((len, 1 + extra))
}

fn is_name_seg(s: &[u8]) -> bool {
    s.len() == 4
        && (s[0].is_ascii_uppercase() || s[0] == b'_')
        && s[1..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
}

/// NameString (20.2.2) at `i`: (last NameSeg, bytes used).
fn name_string(aml: &[u8], mut i: usize) -> Option<([u8; 4], usize)> {
    let start = i;
    if at(aml, i)? == b'\\' {
        i += 1;
    }
    while at(aml, i)? == b'^' {
        i += 1;
    }
    let segs = match at(aml, i)? {
        0x2e => {
            i += 1;
            2
        }
        0x2f => {
            i += 2;
            at(aml, i - 1)? as usize
        }
        0x00 => return None,
        _ => 1,
    };
    if segs == 0 {
        return None;
    }
    let last = aml.get(i + 4 * (segs - 1)..i + 4 * segs)?;
    for k in 0..segs {
        if !is_name_seg(aml.get(i + 4 * k..i + 4 * k + 4)?) {
            return None;
        }
    }
    let mut seg = [0u8; 4];
    seg.copy_from_slice(last);
    Some((seg, i + 4 * segs - start))
}

/// `Name(<seg>, ...)` at `i`: the offset of the data object.
fn name_of(aml: &[u8], i: usize, seg: &[u8; 4]) -> Option<usize> {
    if at(aml, i)? != NAME_OP {
        return None;
    }
    let (name, used) = name_string(aml, i + 1)?;
    (&name == seg).then_some(i + 1 + used)
}

/// An Integer data object (ZeroOp, OneOp, Byte/Word/DWord/QWordConst): (value, bytes used).
fn integer(aml: &[u8], i: usize) -> Option<(u64, usize)> {
    let n = match at(aml, i)? {
        0x00 => return Some((0, 1)),
        0x01 => return Some((1, 1)),
        0xff => return Some((u64::MAX, 1)),
        0x0a => 1,
        0x0b => 2,
        0x0c => 4,
        0x0e => 8,
        _ => return None,
    };
    let b = aml.get(i + 1..i + 1 + n)?;
    Some((crate::phys::le(b, 0, n), 1 + n))
}

enum Hid {
    Eisa([u8; 7]),
    Str([u8; 16], usize),
}

impl Emit for Hid {
    fn emit(&self) {
        match self {
            Hid::Eisa(s) => Text(s).emit(),
            Hid::Str(s, n) => Text(&s[..*n]).emit(),
        }
    }
}

fn hid(aml: &[u8], i: usize) -> Option<Hid> {
    match at(aml, i)? {
        0x0c => {
            // Compressed EISA id (6.1.5): the DWord's bytes, big-endian, hold three 5-bit
            // letters and four hex digits.
            let v = u32::from_be_bytes(aml.get(i + 1..i + 5)?.try_into().ok()?);
            let mut s = [0u8; 7];
            s[0] = b'@' + ((v >> 26) & 0x1f) as u8;
            s[1] = b'@' + ((v >> 21) & 0x1f) as u8;
            s[2] = b'@' + ((v >> 16) & 0x1f) as u8;
            for k in 0..4 {
                let d = ((v >> (12 - 4 * k)) & 0xf) as u8;
                s[3 + k] = if d < 10 { b'0' + d } else { b'A' + d - 10 };
            }
            Some(Hid::Eisa(s))
        }
        0x0d => {
            let mut s = [0u8; 16];
            let mut n = 0;
            loop {
                let c = at(aml, i + 1 + n)?;
                if c == 0 {
                    break;
                }
                *s.get_mut(n)? = c;
                n += 1;
            }
            Some(Hid::Str(s, n))
        }
        _ => None,
    }
}

/// The bytes of `Name(_CRS, Buffer(...){...})` whose data object starts at `i`.
fn crs_buffer(aml: &[u8], i: usize) -> Option<&[u8]> {
    if at(aml, i)? != BUFFER_OP {
        return None;
    }
    let (pkg, used) = pkg_length(aml, i + 1)?;
    let end = (i + 1).checked_add(pkg)?;
    let (size, isize) = integer(aml, i + 1 + used)?;
    let data = i + 1 + used + isize;
    let end = end.min(aml.len()).min(data.checked_add(size as usize)?);
    aml.get(data..end)
}

/// One resource of a resource template.
#[derive(Clone, Copy)]
pub enum Res {
    Io(u64, u64),
    Mem(u64, u64),
    Irq(u64),
}

/// Calls `f` for each descriptor of a resource template (6.4) the probe understands.
fn resources(r: &[u8], mut f: impl FnMut(Res)) {
    let mut i = 0;
    while let Some(&tag) = r.get(i) {
        let le = |off: usize, n: usize| crate::phys::le(r, i + off, n);
        if tag & 0x80 == 0 {
            let (kind, len) = (tag >> 3 & 0xf, (tag & 7) as usize);
            match kind {
                0xf => return, // End tag
                0x4 => {
                    // IRQ descriptor: a mask of IRQs 0..15.
                    let mask = le(1, 2);
                    for irq in 0..16 {
                        if mask & (1 << irq) != 0 {
                            f(Res::Irq(irq));
                        }
                    }
                }
                0x8 if len >= 7 => f(Res::Io(le(2, 2), le(7, 1))),
                0x9 if len >= 3 => f(Res::Io(le(1, 2) & 0x3ff, le(3, 1))),
                _ => {}
            }
            i += 1 + len;
        } else {
            let len = le(1, 2) as usize;
            let space = |kind: u64, min: u64, len: u64| match kind {
                0 => Some(Res::Mem(min, len)),
                1 => Some(Res::Io(min, len)),
                _ => None,
            };
            let res = match tag {
                0x86 if len >= 9 => Some(Res::Mem(le(4, 4), le(8, 4))),
                0x89 if len >= 6 => {
                    let count = le(4, 1) as usize;
                    for k in 0..count.min((len - 2) / 4) {
                        f(Res::Irq(le(5 + 4 * k, 4)));
                    }
                    None
                }
                // QWord, DWord, Word address space: resource type 0 memory, 1 I/O.
                0x8a if len >= 43 => space(le(3, 1), le(14, 8), le(38, 8)),
                0x87 if len >= 23 => space(le(3, 1), le(10, 4), le(22, 4)),
                0x88 if len >= 13 => space(le(3, 1), le(8, 2), le(14, 2)),
                _ => None,
            };
            if let Some(res) = res {
                f(res);
            }
            i += 3 + len;
        }
    }
}

/// Prints ` io=.. irq=.. mem=..` for each descriptor of a resource template.
fn print_resources(r: &[u8]) {
    resources(r, |res| match res {
        Res::Io(min, len) => range("io", min, len),
        Res::Mem(min, len) => range("mem", min, len),
        Res::Irq(irq) => {
            " irq=".emit();
            Dec(irq).emit();
        }
    });
}

fn range(what: &str, min: u64, len: u64) {
    if len == 0 {
        return;
    }
    " ".emit();
    what.emit();
    "=".emit();
    Hex(min).emit();
    "-".emit();
    Hex(min.wrapping_add(len - 1)).emit();
}

/// A Device with a _HID, and its _CRS if it has one.
struct Device<'a> {
    name: [u8; 4],
    hid: Hid,
    crs: Option<&'a [u8]>,
}

/// Calls `f` for each Device with a _HID.
fn devices<'a>(aml: &'a [u8], mut f: impl FnMut(&Device<'a>)) {
    let mut i = 0;
    while let Some(at) = find2(aml, i, EXT_OP, EXT_OP) {
        if aml.get(at + 1) == Some(&DEVICE_OP) {
            if let Some(d) = device(aml, at + 2) {
                f(&d);
            }
        }
        i = at + 1;
    }
}

/// Prints one line per Device with a _HID, then the count.
pub fn report(aml: &[u8]) {
    let mut n = 0u64;
    devices(aml, |d| {
        n += 1;
        "probe: dsdt device name=".emit();
        Text(&d.name).emit();
        " hid=".emit();
        d.hid.emit();
        if let Some(r) = d.crs {
            print_resources(r);
        }
        say!();
    });
    say!("probe: dsdt devices=", Dec(n));
}

/// Calls `f(base, size, irq)` for each virtio-mmio device (`_HID "LNRO0005"`, the id Linux's
/// virtio_mmio driver matches) with a memory resource; irq is its first interrupt, or 0.
pub fn virtio_mmio(aml: &[u8], mut f: impl FnMut(u64, u64, u64)) {
    devices(aml, |d| {
        let is_virtio = matches!(&d.hid, Hid::Str(s, n) if &s[..*n] == b"LNRO0005");
        let Some(crs) = d.crs.filter(|_| is_virtio) else {
            return;
        };
        let (mut mem, mut irq) = (None, None);
        resources(crs, |r| match r {
            Res::Mem(base, len) if mem.is_none() && len > 0 => mem = Some((base, len)),
            Res::Irq(n) if irq.is_none() => irq = Some(n),
            _ => {}
        });
        if let Some((base, len)) = mem {
            f(base, len, irq.unwrap_or(0));
        }
    });
}

/// The Device whose PkgLength is at `p`, if it has a _HID.
fn device(aml: &[u8], p: usize) -> Option<Device<'_>> {
    let (pkg, used) = pkg_length(aml, p)?;
    let end = p.checked_add(pkg)?;
    if end > aml.len() {
        return None;
    }
    let (name, nused) = name_string(aml, p + used)?;
    let (mut hid_at, mut crs) = (None, None);
    let scope = &aml[..end];
    let mut i = p + used + nused;
    while let Some(at) = find2(scope, i, EXT_OP, NAME_OP) {
        i = at + 1;
        if scope[at] == EXT_OP {
            if scope.get(at + 1) == Some(&DEVICE_OP) {
                // A nested Device has its own scope: skip it.
                let (n, _) = pkg_length(scope, at + 2)?;
                i = at + 2 + n.max(1);
            }
        } else if let Some(d) = name_of(scope, at, b"_HID") {
            hid_at = hid_at.or(Some(d));
        } else if let Some(d) = name_of(scope, at, b"_CRS") {
            crs = crs.or_else(|| crs_buffer(scope, d));
        }
    }
    let hid = hid(aml, hid_at?)?;
    Some(Device { name, hid, crs })
}

/// SLP_TYP for S5: the first element of `Name(_S5_, Package(){...})` (ACPI 7.4.2).
pub fn s5_type(aml: &[u8]) -> Option<u8> {
    let mut i = 0;
    while let Some(n) = find2(aml, i, NAME_OP, NAME_OP) {
        i = n + 1;
        if let Some(d) = name_of(aml, n, b"_S5_") {
            if at(aml, d) == Some(PACKAGE_OP) {
                let (_, used) = pkg_length(aml, d + 1)?;
                // PkgLength, NumElements, then the first element.
                return integer(aml, d + 1 + used + 1).map(|(v, _)| v as u8);
            }
        }
    }
    None
}

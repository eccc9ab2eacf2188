//! Just enough of Ethernet, ARP, IPv4, ICMP and UDP for the virtio-net modes: field offsets,
//! big-endian stores, addresses as printed and parsed, and the Internet checksum (RFC 1071).
//!
//! Checksums are computed in "memory order": the bytes are summed as little-endian words and
//! the folded result is stored little-endian, which puts the network-order checksum in place
//! (RFC 1071 section 2(B), byte order independence). Eight bytes per `adc`.

use crate::phys;
use crate::serial::{outb, Dec, Emit, COM1};

/// Ethernet header bytes.
pub const ETH: u64 = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IEEE 802 local experimental ethertype: frames the probe sends that no host stack takes.
pub const ETHERTYPE_LOCAL: u16 = 0x88b5;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_UDP: u8 = 17;
/// IPv4 header without options, UDP header, ICMP echo header.
pub const IP: u64 = 20;
pub const UDP: u64 = 8;
pub const ICMP: u64 = 8;
pub const BROADCAST: u64 = 0xffff_ffff_ffff;

/// Stores `v` big-endian at `a`.
#[inline(always)]
pub fn put16(a: u64, v: u16) {
    // SAFETY: callers write into frame buffers they own.
    unsafe { (a as *mut u16).write_unaligned(v.swap_bytes()) }
}
#[inline(always)]
pub fn get16(a: u64) -> u16 {
    phys::rd16(a).swap_bytes()
}
/// A little-endian (memory order) store of a 16-bit checksum.
#[inline(always)]
pub fn put16le(a: u64, v: u16) {
    // SAFETY: as put16.
    unsafe { (a as *mut u16).write_unaligned(v) }
}
#[inline(always)]
pub fn put32le(a: u64, v: u32) {
    // SAFETY: as put16.
    unsafe { (a as *mut u32).write_unaligned(v) }
}
#[inline(always)]
pub fn put64le(a: u64, v: u64) {
    // SAFETY: as put16.
    unsafe { (a as *mut u64).write_unaligned(v) }
}

/// A MAC address: its six bytes in memory order in the low 48 bits.
#[inline(always)]
pub fn put_mac(a: u64, mac: u64) {
    put32le(a, mac as u32);
    put16le(a + 4, (mac >> 32) as u16);
}
#[inline(always)]
pub fn get_mac(a: u64) -> u64 {
    phys::rd32(a) as u64 | (phys::rd16(a + 4) as u64) << 32
}

/// The 14-byte Ethernet header.
pub fn eth(f: u64, dst: u64, src: u64, ethertype: u16) {
    put_mac(f, dst);
    put_mac(f + 6, src);
    put16(f + 12, ethertype);
}

/// A 20-byte IPv4 header (no options, DF, TTL 64) at `p` for `len` payload bytes, with its
/// checksum. Addresses are in memory order (the four bytes as they appear on the wire).
pub fn ipv4(p: u64, proto: u8, len: u64, src: u32, dst: u32, ident: u16) {
    let total = (IP + len) as u16;
    put64le(
        p,
        0x45 | (total.swap_bytes() as u64) << 16 | (ident.swap_bytes() as u64) << 32 | 0x40 << 48,
    );
    put64le(p + 8, 64 | (proto as u64) << 8 | (src as u64) << 32);
    put32le(p + 16, dst);
    put16le(p + 10, !fold(sum(p, IP, 0)));
}

/// The UDP pseudo-header sum (not folded) for `len` UDP bytes (header included).
pub fn pseudo(src: u32, dst: u32, proto: u8, len: u64) -> u64 {
    src as u64 + dst as u64 + ((proto as u64) << 8) + (len as u16).swap_bytes() as u64
}

/// Adds `[p, p + len)` as little-endian 64-bit words (the last zero-padded) to `acc`, with
/// end-around carry; not folded.
pub fn sum(p: u64, len: u64, acc: u64) -> u64 {
    let mut acc = acc;
    let quads = len / 32;
    if quads > 0 {
        // SAFETY: reads `[p, p + 32 * quads)`, inside the caller's buffer. `lea` and `dec`
        // leave CF alone, so the carry runs through the loop; the last is added at the end.
        unsafe {
            core::arch::asm!(
                "clc",
                "2:",
                "adc {acc}, [{p}]",
                "adc {acc}, [{p} + 8]",
                "adc {acc}, [{p} + 16]",
                "adc {acc}, [{p} + 24]",
                "lea {p}, [{p} + 32]",
                "dec {n}",
                "jnz 2b",
                "adc {acc}, 0",
                acc = inout(reg) acc,
                p = inout(reg) p => _,
                n = inout(reg) quads => _,
                options(nostack, readonly),
            );
        }
    }
    let mut at = p + quads * 32;
    let end = p + len;
    while at + 8 <= end {
        let (s, c) = acc.overflowing_add(phys::rd64(at));
        acc = s + c as u64;
        at += 8;
    }
    if at < end {
        let tail = phys::bytes(at, end - at).map_or(0, |b| phys::le(b, 0, b.len()));
        let (s, c) = acc.overflowing_add(tail);
        acc = s + c as u64;
    }
    acc
}

/// Folds a 64-bit one's-complement sum to 16 bits (not complemented).
pub fn fold(s: u64) -> u16 {
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The checksum to store for `[p, p + len)` plus `init`.
pub fn csum(p: u64, len: u64, init: u64) -> u16 {
    !fold(sum(p, len, init))
}

/// The UDP checksum to store: as `csum`, with 0 sent as 0xffff (RFC 768).
pub fn udp_csum(p: u64, len: u64, init: u64) -> u16 {
    match csum(p, len, init) {
        0 => 0xffff,
        c => c,
    }
}

/// An IPv4 address in memory order, printed dotted.
pub struct Ip(pub u32);

impl Emit for Ip {
    fn emit(&self) {
        for k in 0..4 {
            if k > 0 {
                outb(COM1, b'.');
            }
            Dec((self.0 >> (8 * k) & 0xff) as u64).emit();
        }
    }
}

/// A MAC address, printed `xx:xx:xx:xx:xx:xx`.
pub struct Mac(pub u64);

impl Emit for Mac {
    fn emit(&self) {
        for k in 0..6 {
            if k > 0 {
                outb(COM1, b':');
            }
            let b = (self.0 >> (8 * k)) as u8;
            for d in [b >> 4, b & 15] {
                outb(COM1, if d < 10 { b'0' + d } else { b'a' + d - 10 });
            }
        }
    }
}

/// `A.B.C.D` into memory order.
pub fn parse_ip(s: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    let mut n = 0;
    for part in s.split(|&c| c == b'.') {
        if n == 4 || part.is_empty() || part.len() > 3 || part.starts_with(b"0x") {
            return None;
        }
        let b = crate::number(part).filter(|&b| b < 256)?;
        v |= (b as u32) << (8 * n);
        n += 1;
    }
    (n == 4).then_some(v)
}

/// `xx:xx:xx:xx:xx:xx` (hex, one or two digits each) into memory order.
pub fn parse_mac(s: &[u8]) -> Option<u64> {
    let mut v = 0u64;
    let mut n = 0;
    for part in s.split(|&c| c == b':') {
        if n == 6 || part.is_empty() || part.len() > 2 {
            return None;
        }
        let mut b = 0u64;
        for &c in part {
            b = b << 4 | (c as char).to_digit(16)? as u64;
        }
        v |= b << (8 * n);
        n += 1;
    }
    (n == 6).then_some(v)
}

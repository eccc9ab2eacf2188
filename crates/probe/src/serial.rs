//! Port I/O and line output on COM1 (a 16550: bytes go straight to THR; every access is a VM
//! exit, so the transmitter status is never polled).

use core::arch::asm;

pub const COM1: u16 = 0x3f8;
pub const COM1_LSR: u16 = COM1 + 5;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects the compiler needs to know about.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn outw(port: u16, v: u16) {
    // SAFETY: as above.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// `rep outsb`: the whole buffer in one string instruction (one exit for the lot, which
/// the VMM must split into byte accesses).
pub fn outsb(port: u16, s: &[u8]) {
    // SAFETY: reads `s.len()` bytes from `s`, which we borrow; rsi/rcx are clobbered.
    unsafe {
        asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") s.as_ptr() => _,
            inout("rcx") s.len() => _,
            options(readonly, nostack, preserves_flags)
        )
    }
}

pub fn put(s: &[u8]) {
    for &b in s {
        outb(COM1, b);
    }
}

/// Something that can be printed as part of a line.
pub trait Emit {
    fn emit(&self);
}

impl Emit for &str {
    fn emit(&self) {
        put(self.as_bytes());
    }
}

/// Decimal.
pub struct Dec(pub u64);
/// `0x` and the shortest lowercase hex.
pub struct Hex(pub u64);
/// `0x` and exactly 16 hex digits.
pub struct Hex16(pub u64);
/// Bytes from the guest's environment, with control bytes shown as `?`.
pub struct Text<'a>(pub &'a [u8]);

impl Emit for Dec {
    fn emit(&self) {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        let mut v = self.0;
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        put(&buf[i..]);
    }
}

fn hex_digits(v: u64, min: usize) {
    let mut buf = [0u8; 18];
    buf[0] = b'0';
    buf[1] = b'x';
    let mut n = 1;
    while n < 16 && (v >> (4 * n)) != 0 {
        n += 1;
    }
    let n = n.max(min);
    for k in 0..n {
        let d = ((v >> (4 * (n - 1 - k))) & 0xf) as u8;
        buf[2 + k] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
    }
    put(&buf[..2 + n]);
}

impl Emit for Hex {
    fn emit(&self) {
        hex_digits(self.0, 1);
    }
}

impl Emit for Hex16 {
    fn emit(&self) {
        hex_digits(self.0, 16);
    }
}

impl Emit for Text<'_> {
    fn emit(&self) {
        for &b in self.0 {
            outb(COM1, if (0x20..0x7f).contains(&b) { b } else { b'?' });
        }
    }
}

/// Prints its arguments (each `Emit`) and a newline.
#[macro_export]
macro_rules! say {
    ($($x:expr),* $(,)?) => {{
        $( $crate::serial::Emit::emit(&$x); )*
        $crate::serial::outb($crate::serial::COM1, b'\n');
    }};
}

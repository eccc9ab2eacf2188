//! Physical memory: the identity map, globals, and the few CPU instructions the probe uses.

use core::arch::asm;
use core::cell::UnsafeCell;

/// A global touched only by the BSP (APs write only their own records, through atomics).
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: see the type's documentation; the probe has a single thread of control on the BSP.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(v: T) -> Self {
        Global(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

const GIB: u64 = 1 << 30;
const SPARE_PDS: usize = 8;

#[repr(C, align(4096))]
struct PageDir([u64; 512]);

extern "C" {
    /// The boot PDPT (asm/entry.s): slots 0..3 map the first 4 GiB, the rest start empty.
    static mut pdpt: [u64; 512];
}

#[link_section = ".noinit.pd"]
static SPARE: Global<[PageDir; SPARE_PDS]> = Global::new([const { PageDir([0; 512]) }; SPARE_PDS]);
static SPARE_USED: Global<usize> = Global::new(0);

/// Makes `[addr, addr + len)` accessible through the identity map. The first 4 GiB always are;
/// higher GiBs get a page directory on first use (up to 512 GiB, eight of them).
pub fn map(addr: u64, len: u64) -> bool {
    let Some(end) = addr.checked_add(len.max(1)) else {
        return false;
    };
    if end <= 4 * GIB {
        return true;
    }
    let mut changed = false;
    for gib in (addr / GIB)..=((end - 1) / GIB) {
        if gib >= 512 {
            return false;
        }
        // SAFETY: BSP-only; the PDPT and spare directories are ours.
        unsafe {
            let slot = (&raw mut pdpt as *mut u64).add(gib as usize);
            if slot.read_volatile() != 0 {
                continue;
            }
            let used = &mut *SPARE_USED.get();
            if *used >= SPARE_PDS {
                return false;
            }
            let pd = (SPARE.get() as *mut PageDir).add(*used);
            *used += 1;
            for (i, e) in (*pd).0.iter_mut().enumerate() {
                *e = gib * GIB + ((i as u64) << 21) + 0x83;
            }
            slot.write_volatile(pd as u64 + 0x3);
            changed = true;
        }
    }
    if changed {
        // SAFETY: reloading CR3 with its own value only flushes the TLB.
        unsafe { asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack)) }
    }
    true
}

/// A view of guest-physical memory, or None if it cannot be mapped (or starts at 0).
pub fn bytes(addr: u64, len: u64) -> Option<&'static [u8]> {
    if addr == 0 || len > usize::MAX as u64 || !map(addr, len) {
        return None;
    }
    // SAFETY: identity-mapped; reads of guest RAM (or MMIO, which the VMM answers) cannot fault.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
}

pub fn rd8(a: u64) -> u8 {
    // SAFETY: callers map `a` first (or it is below 4 GiB).
    unsafe { (a as *const u8).read_volatile() }
}
pub fn rd16(a: u64) -> u16 {
    // SAFETY: as rd8.
    unsafe { (a as *const u16).read_unaligned() }
}
pub fn rd32(a: u64) -> u32 {
    // SAFETY: as rd8.
    unsafe { (a as *const u32).read_unaligned() }
}
pub fn rd64(a: u64) -> u64 {
    // SAFETY: as rd8.
    unsafe { (a as *const u64).read_unaligned() }
}

/// Little-endian fields of a byte slice; out of range reads give 0.
pub fn le(b: &[u8], off: usize, n: usize) -> u64 {
    let mut v = 0u64;
    for i in (0..n).rev() {
        v = (v << 8) | *b.get(off + i).unwrap_or(&0) as u64;
    }
    v
}

pub fn mmio_write32(a: u64, v: u32) {
    // SAFETY: an MMIO register the caller located (LAPIC).
    unsafe { (a as *mut u32).write_volatile(v) }
}
pub fn mmio_read32(a: u64) -> u32 {
    // SAFETY: as mmio_write32.
    unsafe { (a as *const u32).read_volatile() }
}
pub fn mmio_write8(a: u64, v: u8) {
    // SAFETY: a register named by an ACPI Generic Address Structure.
    unsafe { (a as *mut u8).write_volatile(v) }
}

pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let (a, b, c, d);
    // SAFETY: cpuid has no memory effects; rbx is saved around it (LLVM reserves it).
    unsafe {
        asm!("mov {t:r}, rbx", "cpuid", "xchg {t:r}, rbx", t = out(reg) b,
             inout("eax") leaf => a, inout("ecx") sub => c, out("edx") d,
             options(nomem, nostack, preserves_flags));
    }
    [a, b, c, d]
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: callers read architectural MSRs only.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (hi as u64) << 32 | lo as u64
}

pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: callers write architectural MSRs only.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nostack, preserves_flags));
    }
}

pub fn pause() {
    // SAFETY: a spin-loop hint.
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

pub fn halt() -> ! {
    loop {
        // SAFETY: stops this CPU with interrupts off.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

// The memory functions LLVM may call (there is no libc). String instructions are emulated one
// step at a time (~1 us each), so whole words go first.

/// # Safety
/// The usual `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    asm!("rep movsq", "mov rcx, {tail}", "rep movsb", tail = in(reg) n & 7,
         inout("rcx") n / 8 => _, inout("rdi") d => _, inout("rsi") s => _,
         options(nostack, preserves_flags));
    d
}

/// # Safety
/// The usual `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize).wrapping_sub(s as usize) >= n {
        return memcpy(d, s, n);
    }
    asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") d.add(n).wrapping_sub(1) => _,
         inout("rsi") s.add(n).wrapping_sub(1) => _, options(nostack));
    d
}

/// # Safety
/// The usual `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    let fill = (c as u8 as u64) * 0x0101_0101_0101_0101;
    asm!("rep stosq", "mov rcx, {tail}", "rep stosb", tail = in(reg) n & 7,
         inout("rcx") n / 8 => _, inout("rdi") d => _, in("rax") fill,
         options(nostack, preserves_flags));
    d
}

/// # Safety
/// The usual `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (a.add(i).read_volatile(), b.add(i).read_volatile());
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// The usual `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

extern "C" {
    /// End of the loaded image, stacks and spare page directories included (link.ld).
    static __image_end: u8;
}

/// Memory for device DMA (virtqueues, request buffers): a bump allocator over the largest
/// piece of RAM the memory map gives above the image, below 4 GiB and clear of the initrd.
/// Never freed; not zeroed.
pub struct Arena {
    next: u64,
    end: u64,
}

impl Arena {
    pub fn new(boot: &crate::bootinfo::BootInfo) -> Arena {
        const MIB2: u64 = 2 << 20;
        let image_end = &raw const __image_end as u64;
        let floor = image_end.div_ceil(MIB2) * MIB2;
        let mut best = Arena { next: 0, end: 0 };
        for r in boot.regions().iter().filter(|r| r.kind == 1) {
            let lo = r.base.max(floor);
            let mut hi = r.base.saturating_add(r.size).min(4 * GIB);
            if let Some((a, n)) = boot.initrd {
                if a.saturating_add(n) > lo && a < hi {
                    hi = hi.min(a.max(lo));
                }
            }
            if hi > lo && hi - lo > best.end - best.next {
                best = Arena { next: lo, end: hi };
            }
        }
        best
    }

    /// `len` bytes aligned to `align` (a power of two), or None when the arena is used up.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let at = self.next.checked_add(align - 1)? & !(align - 1);
        let end = at.checked_add(len)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(at)
    }
}

/// Zeroes `len` bytes at `a` (8 at a time; `len` a multiple of 8).
pub fn zero(a: u64, len: u64) {
    // SAFETY: callers pass memory they allocated from an Arena.
    unsafe {
        asm!("rep stosq", inout("rcx") len / 8 => _, inout("rdi") a => _, in("rax") 0u64,
             options(nostack, preserves_flags));
    }
}

pub fn mfence() {
    // SAFETY: a full memory barrier.
    unsafe { asm!("mfence", options(nostack, preserves_flags)) }
}

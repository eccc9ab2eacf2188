//! Application processors: INIT-SIPI-SIPI through the local APIC (Intel SDM vol. 3, 11.6 and
//! the MP start-up algorithm of B.4, without the legacy delays KVM does not need), and the
//! CPUID facts each CPU records.

use core::sync::atomic::{AtomicU32, Ordering};

use crate::acpi::Madt;
use crate::phys::{self, cpuid, rdmsr, rdtsc, wrmsr};

pub const MAX_APS: usize = 63;
pub const AP_STACK: usize = 8 * 1024;
/// Where the real-mode trampoline runs: SIPI vector 0x08.
const TRAMPOLINE: u64 = 0x8000;
/// TSC ticks: at least 1 GHz on every host, so 3e9 is a few seconds at most.
const TIMEOUT: u64 = 3_000_000_000;
const FIRST_SIPI_WAIT: u64 = 20_000_000;

/// Next AP ordinal, taken with `lock xadd` by asm/entry.s (it also picks the AP's stack).
#[no_mangle]
static AP_NEXT: AtomicU32 = AtomicU32::new(0);
static CHECKINS: AtomicU32 = AtomicU32::new(0);

/// What one CPU reports: CPUID leaf 1 EBX, and leaf 0xB subleaves 0 and 1 (EAX, EBX, ECX, EDX).
#[derive(Clone, Copy, Default)]
pub struct CpuRec {
    pub leaf1_ebx: u32,
    pub leafb: Option<[[u32; 4]; 2]>,
}

impl CpuRec {
    pub fn read() -> CpuRec {
        let max = cpuid(0, 0)[0];
        let leafb =
            (max >= 0xb && cpuid(0xb, 0)[1] & 0xffff != 0).then(|| [cpuid(0xb, 0), cpuid(0xb, 1)]);
        CpuRec {
            leaf1_ebx: cpuid(1, 0)[1],
            leafb,
        }
    }
    pub fn apic_id(&self) -> u32 {
        self.leaf1_ebx >> 24
    }
    pub fn x2apic_id(&self) -> Option<u32> {
        self.leafb.map(|b| b[0][3])
    }
}

struct Slot {
    leaf1_ebx: AtomicU32,
    leafb: [AtomicU32; 8],
    has_leafb: AtomicU32,
}

/// Not zeroed at boot (each AP writes its whole slot before checking in).
#[link_section = ".noinit.slots"]
static SLOTS: [Slot; MAX_APS] = [const {
    Slot {
        leaf1_ebx: AtomicU32::new(0),
        leafb: [const { AtomicU32::new(0) }; 8],
        has_leafb: AtomicU32::new(0),
    }
}; MAX_APS];

/// Rust entry of an AP (from asm/entry.s, on its own stack): record, check in, halt.
#[no_mangle]
extern "C" fn ap_main(ordinal: u32) -> ! {
    let rec = CpuRec::read();
    if let Some(s) = SLOTS.get(ordinal as usize) {
        s.leaf1_ebx.store(rec.leaf1_ebx, Ordering::Relaxed);
        let b = rec.leafb.unwrap_or_default();
        for (k, v) in b.iter().flatten().enumerate() {
            s.leafb[k].store(*v, Ordering::Relaxed);
        }
        s.has_leafb
            .store(rec.leafb.is_some() as u32, Ordering::Relaxed);
        CHECKINS.fetch_add(1, Ordering::Release);
    }
    phys::halt()
}

/// The record of the AP with this ordinal (after it checked in).
pub fn ap_record(ordinal: usize) -> CpuRec {
    let Some(s) = SLOTS.get(ordinal) else {
        return CpuRec::default();
    };
    let mut b = [[0u32; 4]; 2];
    for (k, v) in b.iter_mut().flatten().enumerate() {
        *v = s.leafb[k].load(Ordering::Relaxed);
    }
    CpuRec {
        leaf1_ebx: s.leaf1_ebx.load(Ordering::Relaxed),
        leafb: (s.has_leafb.load(Ordering::Relaxed) != 0).then_some(b),
    }
}

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

struct Lapic {
    base: u64,
    x2: bool,
}

impl Lapic {
    /// ICR (xAPIC 0x300/0x310, x2APIC MSR 0x830).
    fn ipi(&self, dest: u32, low: u32) -> bool {
        if self.x2 {
            wrmsr(0x830, (dest as u64) << 32 | low as u64);
            return true;
        }
        phys::mmio_write32(self.base + 0x310, dest << 24);
        phys::mmio_write32(self.base + 0x300, low);
        // Delivery status (bit 12) clears once the IPI is sent.
        let t0 = rdtsc();
        while phys::mmio_read32(self.base + 0x300) & (1 << 12) != 0 {
            if rdtsc().wrapping_sub(t0) > TIMEOUT {
                return false;
            }
            phys::pause();
        }
        true
    }
}

fn wait_checkins(target: u32, ticks: u64) -> bool {
    let t0 = rdtsc();
    while CHECKINS.load(Ordering::Acquire) < target {
        if rdtsc().wrapping_sub(t0) > ticks {
            return false;
        }
        phys::pause();
    }
    true
}

/// Starts every enabled MADT CPU other than the BSP, one at a time (so AP ordinals follow the
/// MADT order). Returns how many checked in; errors are printed.
pub fn start_aps(m: &Madt, bsp_id: u32) -> usize {
    let base_msr = rdmsr(0x1b);
    let x2 = base_msr & (1 << 10) != 0;
    if base_msr & (1 << 11) == 0 {
        wrmsr(0x1b, base_msr | 1 << 11); // APIC global enable
    }
    let lapic = Lapic { base: m.lapic, x2 };
    if !x2 && (m.lapic == 0 || !phys::map(m.lapic, 0x400)) {
        crate::say!("probe: error lapic address");
        return 0;
    }
    // Software-enable the APIC (spurious vector register, bit 8).
    if x2 {
        wrmsr(0x80f, 0x1ff);
    } else {
        phys::mmio_write32(m.lapic + 0xf0, 0x1ff);
    }
    // SAFETY: the trampoline symbols delimit code in our image; the destination page below
    // 1 MiB is free once the boot structures were copied.
    unsafe {
        let start = &raw const ap_tramp_start;
        let len = (&raw const ap_tramp_end as usize).saturating_sub(start as usize);
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    let vector = (TRAMPOLINE >> 12) as u32;
    let mut started = 0usize;
    for &id in &m.ids[..m.n] {
        if id == bsp_id {
            continue;
        }
        if started >= MAX_APS {
            crate::say!("probe: error too many cpus");
            break;
        }
        if !x2 && id > 0xfe {
            crate::say!(
                "probe: error apic id ",
                crate::serial::Dec(id as u64),
                " needs x2apic"
            );
            continue;
        }
        let want = started as u32 + 1;
        let ok = lapic.ipi(id, 0x4500) // INIT, level assert
            && lapic.ipi(id, 0x4600 | vector) // start-up
            && (wait_checkins(want, FIRST_SIPI_WAIT)
                || (lapic.ipi(id, 0x4600 | vector) && wait_checkins(want, TIMEOUT)));
        if !ok {
            crate::say!(
                "probe: error cpu apic_id=",
                crate::serial::Dec(id as u64),
                " did not start"
            );
            // A late AP would take the next ordinal; stop rather than mislabel the rest.
            break;
        }
        started += 1;
    }
    started
}

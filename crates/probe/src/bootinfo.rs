//! What the loader handed over, copied into the probe's own memory before anything else runs.
//! PVH: Xen include/public/arch-x86/hvm/start_info.h. Linux: Documentation/arch/x86/zero-page.rst
//! and boot.rst (the setup header inside `struct boot_params`).

use crate::phys::{self, rd32, rd64, rd8, Global};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pvh,
    Linux64,
    Linux32,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pvh => "pvh",
            Protocol::Linux64 => "linux64",
            Protocol::Linux32 => "linux32",
        }
    }
}

#[derive(Clone, Copy)]
pub struct Region {
    pub base: u64,
    pub size: u64,
    pub kind: u32,
}

pub const MAX_REGIONS: usize = 128;
const CMDLINE_MAX: usize = 4095;

pub struct BootInfo {
    pub protocol: Protocol,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    regions: [Region; MAX_REGIONS],
    nregions: usize,
    /// Map entries the loader reported (more than `MAX_REGIONS` are counted, not kept).
    pub map_entries: u64,
    /// (address, size) of the initrd, or of PVH module 0.
    pub initrd: Option<(u64, u64)>,
    /// RSDP address given by the loader, 0 if none.
    pub rsdp: u64,
    pub error: Option<&'static str>,
}

impl BootInfo {
    pub fn cmdline(&self) -> &[u8] {
        &self.cmdline[..self.cmdline_len.min(CMDLINE_MAX)]
    }
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.nregions.min(MAX_REGIONS)]
    }
}

static BOOT: Global<BootInfo> = Global::new(BootInfo {
    protocol: Protocol::Pvh,
    cmdline: [0; CMDLINE_MAX],
    cmdline_len: 0,
    regions: [Region {
        base: 0,
        size: 0,
        kind: 0,
    }; MAX_REGIONS],
    nregions: 0,
    map_entries: 0,
    initrd: None,
    rsdp: 0,
    error: None,
});

pub fn get() -> &'static BootInfo {
    // SAFETY: written once by `capture` before any reader runs; read-only afterwards.
    unsafe { &*BOOT.get() }
}

const PVH_MAGIC: u32 = 0x336e_c578;

/// Copies the boot structures at `ptr` (protocol 0 = PVH, 1 = Linux 64-bit, 2 = Linux 32-bit).
pub fn capture(protocol: u32, ptr: u64) -> &'static BootInfo {
    // SAFETY: called once, first thing on the BSP.
    let b = unsafe { &mut *BOOT.get() };
    b.protocol = match protocol {
        0 => Protocol::Pvh,
        1 => Protocol::Linux64,
        _ => Protocol::Linux32,
    };
    let r = if b.protocol == Protocol::Pvh {
        capture_pvh(b, ptr)
    } else {
        capture_linux(b, ptr)
    };
    if let Err(e) = r {
        b.error = Some(e);
    }
    b
}

fn capture_pvh(b: &mut BootInfo, si: u64) -> Result<(), &'static str> {
    if si == 0 || !phys::map(si, 56) {
        return Err("pvh start_info unmapped");
    }
    if rd32(si) != PVH_MAGIC {
        return Err("pvh start_info magic");
    }
    let version = rd32(si + 4);
    let nr_modules = rd32(si + 12);
    let modlist = rd64(si + 16);
    b.rsdp = rd64(si + 32);
    copy_cmdline(b, rd64(si + 24))?;
    if nr_modules > 0 && modlist != 0 {
        if !phys::map(modlist, 32) {
            return Err("pvh modlist unmapped");
        }
        let (addr, size) = (rd64(modlist), rd64(modlist + 8));
        if size > 0 {
            b.initrd = Some((addr, size));
        }
    }
    if version >= 1 {
        let (map, n) = (rd64(si + 40), rd32(si + 48) as u64);
        b.map_entries = n;
        let keep = n.min(MAX_REGIONS as u64);
        if keep > 0 && !phys::map(map, keep * 24) {
            return Err("pvh memmap unmapped");
        }
        // struct hvm_memmap_table_entry { u64 addr, size; u32 type, reserved; }
        for i in 0..keep {
            let e = map + i * 24;
            push_region(b, rd64(e), rd64(e + 8), rd32(e + 16));
        }
    }
    Ok(())
}

fn capture_linux(b: &mut BootInfo, bp: u64) -> Result<(), &'static str> {
    if bp == 0 || !phys::map(bp, 4096) {
        return Err("boot_params unmapped");
    }
    // A loader that did not clear boot_params leaves `sentinel` (0x1ef) set: then the fields
    // outside the setup header are not to be trusted (boot.rst, "Details of header fields").
    let clean = rd8(bp + 0x1ef) == 0;
    let ext = |off: u64| if clean { rd32(bp + off) as u64 } else { 0 };
    b.rsdp = if clean { rd64(bp + 0x070) } else { 0 };
    let cmdline = rd32(bp + 0x228) as u64 | ext(0x0c8) << 32;
    let rd_image = rd32(bp + 0x218) as u64 | ext(0x0c0) << 32;
    let rd_size = rd32(bp + 0x21c) as u64 | ext(0x0c4) << 32;
    if rd_size > 0 {
        b.initrd = Some((rd_image, rd_size));
    }
    let n = rd8(bp + 0x1e8) as u64;
    b.map_entries = n;
    for i in 0..n.min(MAX_REGIONS as u64) {
        let e = bp + 0x2d0 + i * 20;
        push_region(b, rd64(e), rd64(e + 8), rd32(e + 16));
    }
    copy_cmdline(b, cmdline)
}

fn push_region(b: &mut BootInfo, base: u64, size: u64, kind: u32) {
    if let Some(r) = b.regions.get_mut(b.nregions) {
        *r = Region { base, size, kind };
        b.nregions += 1;
    }
}

fn copy_cmdline(b: &mut BootInfo, addr: u64) -> Result<(), &'static str> {
    if addr == 0 {
        return Ok(());
    }
    if !phys::map(addr, CMDLINE_MAX as u64) {
        return Err("cmdline unmapped");
    }
    let mut n = 0;
    while n < CMDLINE_MAX {
        let c = rd8(addr + n as u64);
        if c == 0 {
            break;
        }
        b.cmdline[n] = c;
        n += 1;
    }
    b.cmdline_len = n;
    Ok(())
}

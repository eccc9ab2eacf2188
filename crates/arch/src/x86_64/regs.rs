//! Boot vCPU state: GDT, identity-mapped page tables, general, segment and FPU registers.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{BOOT_STACK_POINTER, GDT_START, PDPT_START, PD_START, PML4_START};

/// Errors while setting up boot registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT or page tables into guest memory failed.
    #[error("cannot write boot {what} at {addr:#x} into guest memory: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM_SET_REGS failed: {0}")]
    SetRegs(kvm_ioctls::Error),
    #[error("KVM_GET_SREGS failed: {0}")]
    GetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_SREGS failed: {0}")]
    SetSregs(kvm_ioctls::Error),
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
}

type Result<T> = std::result::Result<T, RegsError>;

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `ebx` = hvm_start_info.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode, identity paging, `rsi` = boot_params.
    Linux64 { entry: u64, boot_params: u64 },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries as (flags, base, limit), packed as the CPU expects (Intel SDM vol. 3 §3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit_raw = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The boot GDT: null, code, data, TSS.
fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code_flags = if long_mode { 0xa09b } else { 0xc09b };
    [
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

fn write_gdt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<()> {
    for (i, entry) in gdt.iter().enumerate() {
        let addr = GDT_START.unchecked_add_offset(i as u64 * 8);
        mem.write_obj(*entry, addr)
            .map_err(|source| RegsError::GuestWrite {
                what: "GDT",
                addr: addr.0,
                source,
            })?;
    }
    Ok(())
}

trait AddOffset {
    fn unchecked_add_offset(self, offset: u64) -> GuestAddress;
}
impl AddOffset for GuestAddress {
    fn unchecked_add_offset(self, offset: u64) -> GuestAddress {
        GuestAddress(self.0 + offset)
    }
}

/// Identity-maps the first 4 GiB with 2 MiB pages: enough for a 64-bit entry to reach its
/// image, boot data, and the LAPIC/IOAPIC before the kernel installs its own tables.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let w = |what: &'static str, addr: GuestAddress, val: u64| {
        mem.write_obj(val, addr)
            .map_err(|source| RegsError::GuestWrite {
                what,
                addr: addr.0,
                source,
            })
    };
    w("PML4", PML4_START, PDPT_START.0 | 0x03)?;
    for pd in 0..4u64 {
        let pd_addr = PD_START.0 + pd * 0x1000;
        w(
            "PDPT",
            PDPT_START.unchecked_add_offset(pd * 8),
            pd_addr | 0x03,
        )?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            // Present, writable, 2 MiB page.
            w("PD", GuestAddress(pd_addr + i * 8), phys | 0x83)?;
        }
    }
    Ok(())
}

/// Sets up the boot vCPU's registers for `entry`, writing the GDT (and, for long mode, the
/// page tables) into guest memory.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: BootEntry) -> Result<()> {
    let long_mode = matches!(entry, BootEntry::Linux64 { .. });
    let gdt = boot_gdt(long_mode);
    write_gdt(mem, &gdt)?;

    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if long_mode {
        write_page_tables(mem)?;
        sregs.cr3 = PML4_START.0;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, boot_params } => {
            regs.rip = entry;
            regs.rsi = boot_params;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// The FPU's power-on state (x87 control word 0x37f, MXCSR 0x1f80).
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let gdt = boot_gdt(true);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!(
            (cs.base, cs.limit, cs.l, cs.db, cs.present),
            (0, 0xffff_ffff, 1, 0, 1)
        );
        assert_eq!(cs.selector, 8);
        let cs32 = segment_from_gdt(boot_gdt(false)[1], 1);
        assert_eq!((cs32.l, cs32.db, cs32.type_), (0, 1, 0xb));
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.type_, ds.s, ds.limit), (3, 1, 0xffff_ffff));
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(boot_gdt(false)[1], 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("test memory");
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_START.0);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_START.0 + 24)).unwrap();
        // The last 2 MiB page of the 4th GiB (LAPIC lives there).
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpt3 & !0xfff) + 511 * 8))
            .unwrap();
        assert_eq!(pde & !0xfff, 0xffe0_0000);
        assert_eq!(pde & 0x83, 0x83);
    }
}

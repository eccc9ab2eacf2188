//! The guest physical address layout: one place defines where everything lives.
//!
//! ```text
//! 0x0000_0500  GDT (boot vCPU state)
//! 0x0000_6000  PVH hvm_start_info, module list, memory map
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  page tables: PML4, PDPT, 4 PDs (identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables, RSDP first (reserved)
//! 0x0010_0000  kernel (bzImage) / ELF segments; RAM up to the 32-bit hole
//! 0xc000_0000  32-bit MMIO hole: device windows, IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above 4 GiB, the part of --memory that did not fit below the hole
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: GuestAddress = GuestAddress(0x500);
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(0x6040);
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6080);
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPT_START: GuestAddress = GuestAddress(0xa000);
pub const PD_START: GuestAddress = GuestAddress(0xb000);
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line we accept, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
pub const ACPI_END: u64 = 0x10_0000;
/// Where kernels are loaded and where RAM above the legacy area starts.
pub const HIGH_MEMORY_START: GuestAddress = GuestAddress(0x10_0000);

pub const MEM_32BIT_HOLE_START: u64 = 0xc000_0000;
pub const MEM_32BIT_HOLE_SIZE: u64 = 0x4000_0000;
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// Device MMIO windows are allocated from here up to the IOAPIC.
pub const MMIO_32BIT_START: u64 = MEM_32BIT_HOLE_START;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const IOAPIC_SIZE: u64 = 0x1000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS and identity-map pages (needed by the in-kernel real-mode emulation) sit in
/// the hole, below the BIOS area.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Legacy I/O ports.
pub const PORT_I8042: u64 = 0x60;
pub const PORT_DEBUG_EXIT: u64 = 0xf4;
pub const PORT_ACPI_PM: u64 = 0x600;
pub const PORT_COM1: u64 = 0x3f8;
pub const IRQ_COM1: u32 = 4;
/// GSIs handed to devices beyond the legacy ISA lines (the IOAPIC has 24 pins).
pub const GSI_FIRST_FREE: u32 = 5;
pub const GSI_LAST: u32 = 23;

/// The most memory a VM can have: what 46 physical-address bits allow.
pub const MAX_MEMORY: u64 = 1 << 46;

// The PVH memory map (16 entries of 24 bytes at most) stays in the start-info page, and the
// boot stack sits between the zero page and the page tables.
const _: () = assert!(PVH_MEMMAP_START.0 + 16 * 24 <= PVH_INFO_START.0 + 0x1000);
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START.0 && BOOT_STACK_POINTER > ZERO_PAGE_START.0 + 0x1000);

/// The type of an e820 / PVH memory-map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// Guest RAM regions for `mem_size` bytes: below the 32-bit hole, then above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MEM_32BIT_HOLE_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MEM_32BIT_HOLE_START),
            (
                GuestAddress(RAM_64BIT_START),
                mem_size - MEM_32BIT_HOLE_START,
            ),
        ]
    }
}

/// The memory map the guest is given (e820 for Linux boot, the PVH memmap otherwise).
/// RAM below 1 MiB stops at the EBDA; the legacy area up to 1 MiB, which holds our ACPI
/// tables, is reserved.
pub fn e820_entries(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MEM_32BIT_HOLE_START);
    let mut entries = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIGH_MEMORY_START.0 - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    if low_end > HIGH_MEMORY_START.0 {
        entries.push(E820Entry {
            addr: HIGH_MEMORY_START.0,
            size: low_end - HIGH_MEMORY_START.0,
            kind: E820Type::Ram,
        });
    }
    if mem_size > MEM_32BIT_HOLE_START {
        entries.push(E820Entry {
            addr: RAM_64BIT_START,
            size: mem_size - MEM_32BIT_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    entries
}

/// Bytes of RAM the memory map offers the guest.
pub fn usable_ram(mem_size: u64) -> u64 {
    e820_entries(mem_size)
        .iter()
        .filter(|e| e.kind == E820Type::Ram)
        .map(|e| e.size)
        .sum()
}

/// The end (exclusive) of RAM below the 32-bit hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MEM_32BIT_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_vm_is_one_region() {
        assert_eq!(ram_regions(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(ram_regions(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
    }

    #[test]
    fn ram_past_the_hole_moves_above_4g() {
        assert_eq!(
            ram_regions(6 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 3 * GIB)]
        );
        let e = e820_entries(6 * GIB);
        assert_eq!(e.last().unwrap().addr, 4 * GIB);
        assert_eq!(e.last().unwrap().size, 3 * GIB);
        // Nothing in the memory map overlaps the hole.
        for entry in &e {
            let end = entry.addr + entry.size;
            assert!(end <= MEM_32BIT_HOLE_START || entry.addr >= RAM_64BIT_START);
        }
    }

    #[test]
    fn e820_is_sorted_and_disjoint() {
        for size in [128 * MIB, GIB, 3 * GIB, 4 * GIB, 6 * GIB] {
            let e = e820_entries(size);
            for pair in e.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{size:#x}");
            }
        }
    }

    #[test]
    fn usable_ram_is_memory_minus_legacy_area() {
        let legacy = HIGH_MEMORY_START.0 - EBDA_START;
        for size in [128 * MIB, GIB, 4 * GIB, 6 * GIB] {
            assert_eq!(usable_ram(size), size - legacy, "{size:#x}");
        }
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT_START.0, 0x100),
            (PVH_INFO_START.0, 0x1000),
            (ZERO_PAGE_START.0, 0x1000),
            (PML4_START.0, 0x6000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
            (ACPI_START.0, ACPI_END - ACPI_START.0),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:x?} {b:x?}");
            }
        }
    }
}

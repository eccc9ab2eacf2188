//! The aarch64 guest physical address layout: one place defines where everything lives.
//!
//! Devices sit below 1 GiB, RAM starts at 1 GiB (as on QEMU's `virt` machine, so the same
//! kernels and device trees apply):
//!
//! ```text
//! 0x0800_0000  GICv3 distributor (GICD), 64 KiB
//! 0x0808_0000  GICv3 ITS, 128 KiB (reserved for MSIs once PCI lands)
//! 0x080a_0000  GICv3 redistributors (GICR), 128 KiB per vCPU, room for MAX_VCPUS
//! 0x0b00_0000  PL011 UART, 4 KiB
//! 0x0b00_1000  PL031 RTC, 4 KiB
//! 0x0b10_0000  virtio-mmio windows, 4 KiB each
//! 0x1000_0000  32-bit PCI MMIO window, 512 MiB (reserved)
//! 0x3000_0000  PCI ECAM, 256 MiB: 256 buses (reserved)
//! 0x4000_0000  RAM: the FDT in its first 2 MiB, the kernel at +2 MiB (+ text_offset),
//!              the initrd at the top
//! ```
//!
//! Interrupts are GIC SPIs, numbered as the device tree numbers them (INTID − 32; Arm GICv3
//! architecture specification, IHI 0069, section 2.2 "INTIDs").

use vm_memory::GuestAddress;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// GICv3 distributor: one 64 KiB frame (IHI 0069, section 12.8 "The GIC Distributor
/// register map").
pub const GIC_DIST_START: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 64 * KIB;
/// GICv3 ITS: control frame and translation frame, 64 KiB each (IHI 0069, section 12.19).
/// Reserved until PCI MSIs need it.
pub const GIC_ITS_START: u64 = 0x0808_0000;
pub const GIC_ITS_SIZE: u64 = 128 * KIB;
/// GICv3 redistributors: each vCPU has an RD_base and an SGI_base frame of 64 KiB
/// (IHI 0069, section 12.10 "The GIC Redistributor register map"), contiguous in vCPU order.
pub const GIC_REDIST_START: u64 = 0x080a_0000;
pub const GIC_REDIST_SIZE_PER_VCPU: u64 = 128 * KIB;
/// The most vCPUs a VM can have: KVM's vGICv3 takes up to 512, the redistributor region
/// here is sized for 256.
pub const MAX_VCPUS: u32 = 256;
/// The end (exclusive) of the redistributor region at `MAX_VCPUS`.
pub const GIC_REDIST_END: u64 = GIC_REDIST_START + MAX_VCPUS as u64 * GIC_REDIST_SIZE_PER_VCPU;

/// PL011 UART (ARM DDI 0183, PrimeCell UART TRM: a 4 KiB register page).
pub const UART_START: u64 = 0x0b00_0000;
pub const UART_SIZE: u64 = 4 * KIB;
/// PL031 RTC (ARM DDI 0224: a 4 KiB register page).
pub const RTC_START: u64 = 0x0b00_1000;
pub const RTC_SIZE: u64 = 4 * KIB;

/// virtio-mmio windows (virtio v1.2, section 4.2.2: registers up to 0x100 plus the
/// device's configuration space; one 4 KiB page each).
pub const VIRTIO_MMIO_START: u64 = 0x0b10_0000;
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 4 * KIB;
/// One window per free SPI: every virtio-mmio device has an interrupt line of its own.
pub const VIRTIO_MMIO_MAX_DEVICES: u32 = SPI_LAST - VIRTIO_SPI_FIRST + 1;
pub const VIRTIO_MMIO_SIZE: u64 = VIRTIO_MMIO_MAX_DEVICES as u64 * VIRTIO_MMIO_WINDOW_SIZE;

/// The 32-bit PCI MMIO window (for non-prefetchable BARs), reserved until PCI lands.
pub const PCI_MMIO32_START: u64 = 0x1000_0000;
pub const PCI_MMIO32_SIZE: u64 = 512 * MIB;
/// PCI ECAM: 1 MiB per bus (PCI Express Base Specification, section 7.2.2), 256 buses.
pub const PCI_ECAM_START: u64 = 0x3000_0000;
pub const PCI_ECAM_SIZE: u64 = 256 * MIB;

/// Guest RAM starts at 1 GiB.
pub const RAM_START: GuestAddress = GuestAddress(GIB);
/// KVM's default IPA size is 40 bits (`KVM_CREATE_VM` with type 0,
/// Documentation/virt/kvm/api.rst "KVM_CAP_ARM_VM_IPA_SIZE"); RAM must end below it.
pub const IPA_BITS_DEFAULT: u32 = 40;
/// The most memory a VM can have with the default IPA size.
pub const MAX_MEMORY: u64 = (1 << IPA_BITS_DEFAULT) - GIB;

/// The FDT lives at the base of RAM. Linux's arm64 boot protocol (Documentation/arch/arm64/
/// booting.rst, "Setup the device tree") wants it 8-byte aligned, at most 2 MiB, and alone in
/// its 2 MiB-aligned block.
pub const FDT_START: GuestAddress = RAM_START;
pub const FDT_MAX_SIZE: u64 = 2 * MIB;
/// The 2 MiB-aligned base the kernel Image is placed above (booting.rst, "Call the kernel
/// image": the Image sits `text_offset` bytes above a 2 MiB-aligned base in RAM).
pub const KERNEL_BASE: GuestAddress = GuestAddress(RAM_START.0 + 2 * MIB);
/// The initrd is page aligned (booting.rst only requires it in RAM, not overlapping the
/// kernel; a page keeps it off everything else the VMM places).
pub const INITRD_ALIGN: u64 = 4 * KIB;

/// GIC interrupt numbers as the device tree gives them (`arm,gic-v3` binding: cell 1 is
/// 0 for SPI, 1 for PPI; cell 2 the number within that kind; cell 3 the flags).
pub const GIC_FDT_IRQ_TYPE_SPI: u32 = 0;
pub const GIC_FDT_IRQ_TYPE_PPI: u32 = 1;
/// The vGIC's interrupt count (`KVM_DEV_ARM_VGIC_GRP_NR_IRQS`): 32 private INTIDs + 96 SPIs.
pub const GIC_NR_IRQS: u32 = 128;
/// SPIs are INTIDs 32 to 1019 (IHI 0069, section 2.2.1).
pub const GIC_SPI_BASE_INTID: u32 = 32;
pub const SPI_LAST: u32 = GIC_NR_IRQS - GIC_SPI_BASE_INTID - 1;
pub const UART_SPI: u32 = 1;
pub const RTC_SPI: u32 = 2;
/// PCI INTA..INTD, reserved until PCI lands.
pub const PCI_INTX_SPI_FIRST: u32 = 4;
pub const PCI_INTX_SPIS: u32 = 4;
/// virtio-mmio devices take SPIs from here to `SPI_LAST`.
pub const VIRTIO_SPI_FIRST: u32 = 16;

/// PPIs (INTID − 16; IHI 0069, section 2.2.1; the Server Base System Architecture's PPI
/// assignments, Arm DEN 0029, appendix "PPI assignments").
pub const GIC_MAINTENANCE_PPI: u32 = 9;
pub const TIMER_HYP_PPI: u32 = 10;
pub const TIMER_VIRT_PPI: u32 = 11;
pub const TIMER_SEC_PHYS_PPI: u32 = 13;
pub const TIMER_PHYS_PPI: u32 = 14;

/// Errors placing things in the layout.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The vCPU count is outside what the redistributor region holds.
    #[error("{0} vCPUs: aarch64 VMs have 1 to {MAX_VCPUS}")]
    VcpuCount(u32),
    /// The memory size is zero or ends past the guest's physical address space.
    #[error("memory size {0:#x}: aarch64 VMs have 1 byte to {MAX_MEMORY:#x}")]
    MemorySize(u64),
    /// The kernel does not fit in RAM above its load base.
    #[error("kernel of {size:#x} bytes at text_offset {text_offset:#x} does not fit in {mem_size:#x} bytes of RAM")]
    KernelTooBig {
        text_offset: u64,
        size: u64,
        mem_size: u64,
    },
    /// The initrd does not fit between the kernel's end and the top of RAM.
    #[error("initrd of {size:#x} bytes does not fit between the kernel's end {kernel_end:#x} and the end of RAM {ram_end:#x}")]
    InitrdTooBig {
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    /// There is no virtio-mmio window with this index.
    #[error("virtio-mmio device {0}: at most {VIRTIO_MMIO_MAX_DEVICES} fit in the layout")]
    VirtioMmioIndex(u32),
}

/// The redistributor region for `vcpus` vCPUs: `(base, size)`.
pub fn gic_redist_region(vcpus: u32) -> Result<(u64, u64), LayoutError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(LayoutError::VcpuCount(vcpus));
    }
    Ok((
        GIC_REDIST_START,
        u64::from(vcpus) * GIC_REDIST_SIZE_PER_VCPU,
    ))
}

/// The single RAM region of a VM with `mem_size` bytes.
pub fn ram_region(mem_size: u64) -> Result<(GuestAddress, u64), LayoutError> {
    if mem_size == 0 || mem_size > MAX_MEMORY {
        return Err(LayoutError::MemorySize(mem_size));
    }
    Ok((RAM_START, mem_size))
}

/// The end (exclusive) of RAM.
pub fn ram_end(mem_size: u64) -> Result<u64, LayoutError> {
    ram_region(mem_size).map(|(start, size)| start.0 + size)
}

/// Where an Image with the header's `text_offset` and `image_size` (booting.rst, "Call the
/// kernel image") is loaded in `mem_size` bytes of RAM.
pub fn kernel_start(
    text_offset: u64,
    image_size: u64,
    mem_size: u64,
) -> Result<GuestAddress, LayoutError> {
    let too_big = LayoutError::KernelTooBig {
        text_offset,
        size: image_size,
        mem_size,
    };
    let end = ram_end(mem_size)?;
    let start = KERNEL_BASE
        .0
        .checked_add(text_offset)
        .ok_or_else(|| too_big.clone())?;
    match start.checked_add(image_size) {
        Some(kernel_end) if kernel_end <= end => Ok(GuestAddress(start)),
        _ => Err(too_big),
    }
}

/// Where an initrd of `size` bytes goes: as high in RAM as it fits, page aligned, above the
/// kernel, which ends (exclusive) at `kernel_end`.
pub fn initrd_start(
    mem_size: u64,
    kernel_end: u64,
    size: u64,
) -> Result<GuestAddress, LayoutError> {
    let ram_end = ram_end(mem_size)?;
    let too_big = LayoutError::InitrdTooBig {
        size,
        kernel_end,
        ram_end,
    };
    let start = ram_end.checked_sub(size).ok_or_else(|| too_big.clone())? & !(INITRD_ALIGN - 1);
    if start < kernel_end || start < KERNEL_BASE.0 {
        return Err(too_big);
    }
    Ok(GuestAddress(start))
}

/// The MMIO window and SPI of virtio-mmio device `index`.
pub fn virtio_mmio_device(index: u32) -> Result<(u64, u32), LayoutError> {
    if index >= VIRTIO_MMIO_MAX_DEVICES {
        return Err(LayoutError::VirtioMmioIndex(index));
    }
    Ok((
        VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_WINDOW_SIZE,
        VIRTIO_SPI_FIRST + index,
    ))
}

/// Every fixed region below RAM, by name: `(name, base, size)`, in address order.
pub fn mmio_regions() -> [(&'static str, u64, u64); 9] {
    [
        ("gic-dist", GIC_DIST_START, GIC_DIST_SIZE),
        ("gic-its", GIC_ITS_START, GIC_ITS_SIZE),
        (
            "gic-redist",
            GIC_REDIST_START,
            GIC_REDIST_END - GIC_REDIST_START,
        ),
        ("uart", UART_START, UART_SIZE),
        ("rtc", RTC_START, RTC_SIZE),
        ("virtio-mmio", VIRTIO_MMIO_START, VIRTIO_MMIO_SIZE),
        ("pci-mmio32", PCI_MMIO32_START, PCI_MMIO32_SIZE),
        ("pci-ecam", PCI_ECAM_START, PCI_ECAM_SIZE),
        ("ram", RAM_START.0, MAX_MEMORY),
    ]
}

// The redistributors for MAX_VCPUS end before the UART, and everything else in order below RAM.
const _: () = assert!(GIC_DIST_START + GIC_DIST_SIZE <= GIC_ITS_START);
const _: () = assert!(GIC_ITS_START + GIC_ITS_SIZE <= GIC_REDIST_START);
const _: () = assert!(GIC_REDIST_END <= UART_START);
const _: () = assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= RAM_START.0);
const _: () = assert!(PCI_INTX_SPI_FIRST + PCI_INTX_SPIS <= VIRTIO_SPI_FIRST);
const _: () = assert!(RTC_SPI < PCI_INTX_SPI_FIRST && UART_SPI < RTC_SPI);
// The FDT is 8-byte aligned and leaves the kernel's 2 MiB block alone (booting.rst).
const _: () = assert!(FDT_START.0.is_multiple_of(8) && FDT_START.0 + FDT_MAX_SIZE <= KERNEL_BASE.0);

#[cfg(test)]
mod tests {
    use super::*;

    fn disjoint(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0
    }

    #[test]
    fn fixed_regions_are_sorted_and_disjoint() {
        let regions = mmio_regions();
        for pair in regions.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert!(
                a.1 + a.2 <= b.1,
                "{} {:#x}+{:#x} runs into {} {:#x}",
                a.0,
                a.1,
                a.2,
                b.0,
                b.1
            );
        }
        for (i, a) in regions.iter().enumerate() {
            assert!(a.2 > 0, "{} is empty", a.0);
            for b in &regions[i + 1..] {
                assert!(disjoint((a.1, a.2), (b.1, b.2)), "{} overlaps {}", a.0, b.0);
            }
        }
        // Everything but RAM is below 1 GiB; RAM ends inside the default IPA space.
        for r in &regions[..regions.len() - 1] {
            assert!(r.1 + r.2 <= RAM_START.0, "{}", r.0);
        }
        assert_eq!(RAM_START.0 + MAX_MEMORY, 1 << IPA_BITS_DEFAULT);
    }

    #[test]
    fn regions_are_aligned_to_their_granule() {
        // GIC frames are 64 KiB aligned (IHI 0069, section 12.1), pages 4 KiB, ECAM 1 MiB.
        for base in [GIC_DIST_START, GIC_ITS_START, GIC_REDIST_START] {
            assert_eq!(base % (64 * KIB), 0, "{base:#x}");
        }
        for base in [UART_START, RTC_START, VIRTIO_MMIO_START, PCI_MMIO32_START] {
            assert_eq!(base % (4 * KIB), 0, "{base:#x}");
        }
        assert_eq!(PCI_ECAM_START % MIB, 0);
        assert_eq!(KERNEL_BASE.0 % (2 * MIB), 0);
    }

    #[test]
    fn redistributors_for_every_vcpu_count_fit_below_the_uart() {
        for n in [1, 2, 4, 123, 124, 255, MAX_VCPUS] {
            let (base, size) = gic_redist_region(n).unwrap();
            assert_eq!(base, GIC_REDIST_START);
            assert_eq!(size, u64::from(n) * 0x2_0000);
            assert!(base + size <= UART_START, "{n} vCPUs");
            assert!(base + size <= GIC_REDIST_END);
        }
        // 256 vCPUs end exactly at 0x0a0a_0000.
        let (base, size) = gic_redist_region(256).unwrap();
        assert_eq!(base + size, 0x0a0a_0000);
        assert_eq!(gic_redist_region(0), Err(LayoutError::VcpuCount(0)));
        assert_eq!(gic_redist_region(257), Err(LayoutError::VcpuCount(257)));
    }

    #[test]
    fn ram_is_bounded_by_the_ipa_space() {
        assert_eq!(
            ram_region(512 * MIB).unwrap(),
            (GuestAddress(GIB), 512 * MIB)
        );
        assert_eq!(ram_end(GIB).unwrap(), 2 * GIB);
        assert_eq!(ram_region(0), Err(LayoutError::MemorySize(0)));
        assert!(ram_region(MAX_MEMORY).is_ok());
        assert_eq!(
            ram_region(MAX_MEMORY + 1),
            Err(LayoutError::MemorySize(MAX_MEMORY + 1))
        );
    }

    #[test]
    fn kernel_sits_above_the_fdt_at_base_plus_text_offset() {
        // Since Linux 5.8 the header's text_offset is 0; older kernels said 0x80000.
        assert_eq!(
            kernel_start(0, 33 * MIB, GIB).unwrap(),
            GuestAddress(0x4020_0000)
        );
        assert_eq!(
            kernel_start(0x8_0000, 33 * MIB, GIB).unwrap(),
            GuestAddress(0x4028_0000)
        );
        // A kernel bigger than RAM above its base is refused.
        assert!(matches!(
            kernel_start(0, 63 * MIB, 64 * MIB),
            Err(LayoutError::KernelTooBig { .. })
        ));
        assert!(kernel_start(0, 62 * MIB, 64 * MIB).is_ok());
        assert!(kernel_start(u64::MAX, 1, GIB).is_err());
    }

    #[test]
    fn initrd_goes_to_the_top_of_ram_above_the_kernel() {
        let kernel_end = KERNEL_BASE.0 + 33 * MIB;
        let size = 5 * MIB + 123;
        let start = initrd_start(GIB, kernel_end, size).unwrap().0;
        assert_eq!(start % INITRD_ALIGN, 0);
        assert!(start + size <= 2 * GIB);
        assert!(
            2 * GIB - (start + size) < INITRD_ALIGN,
            "as high as it fits"
        );
        assert!(start >= kernel_end);
        // Too big to fit above the kernel, or bigger than RAM.
        assert!(matches!(
            initrd_start(64 * MIB, kernel_end, 32 * MIB),
            Err(LayoutError::InitrdTooBig { .. })
        ));
        assert!(initrd_start(64 * MIB, kernel_end, u64::MAX).is_err());
        assert!(initrd_start(64 * MIB, kernel_end, 64 * MIB - 35 * MIB).is_ok());
    }

    #[test]
    fn virtio_windows_and_spis_are_distinct_and_in_range() {
        assert_eq!(VIRTIO_MMIO_MAX_DEVICES, 80);
        let mut last = None;
        for i in 0..VIRTIO_MMIO_MAX_DEVICES {
            let (base, spi) = virtio_mmio_device(i).unwrap();
            assert!(base >= VIRTIO_MMIO_START);
            assert!(base + VIRTIO_MMIO_WINDOW_SIZE <= VIRTIO_MMIO_START + VIRTIO_MMIO_SIZE);
            assert!((VIRTIO_SPI_FIRST..=SPI_LAST).contains(&spi));
            assert!(spi != UART_SPI && spi != RTC_SPI);
            if let Some((b, s)) = last {
                assert_eq!(base, b + VIRTIO_MMIO_WINDOW_SIZE);
                assert_eq!(spi, s + 1);
            }
            last = Some((base, spi));
        }
        // The last SPI is the vGIC's last interrupt.
        assert_eq!(SPI_LAST + GIC_SPI_BASE_INTID, GIC_NR_IRQS - 1);
        assert_eq!(
            virtio_mmio_device(VIRTIO_MMIO_MAX_DEVICES),
            Err(LayoutError::VirtioMmioIndex(80))
        );
    }
}

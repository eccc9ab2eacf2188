//! The flattened device tree an aarch64 guest boots with (Devicetree Specification v0.4;
//! Linux's bindings under Documentation/devicetree/bindings/), built with `vm-fdt`.
//!
//! ```text
//! /                 interrupt-parent = <&gic>, #address-cells = #size-cells = 2
//!   cpus/cpu@N      one per vCPU, reg = MPIDR_EL1 affinity, PSCI enable method
//!   memory@40000000
//!   chosen          bootargs, initrd range, stdout-path
//!   psci            arm,psci-0.2 over hvc
//!   intc@8000000    GICv3: distributor + redistributors, maintenance PPI
//!   timer           the generic timer's four PPIs
//!   apb-pclk        the fixed clock the PrimeCell devices name
//!   pl011@…, pl031@…, virtio_mmio@…
//! ```

use vm_fdt::{FdtWriter, FdtWriterNode};
use vm_memory::GuestAddress;

use super::layout::{
    self, LayoutError, FDT_MAX_SIZE, GIC_DIST_SIZE, GIC_DIST_START, GIC_FDT_IRQ_TYPE_PPI,
    GIC_FDT_IRQ_TYPE_SPI, GIC_MAINTENANCE_PPI, RAM_START, TIMER_HYP_PPI, TIMER_PHYS_PPI,
    TIMER_SEC_PHYS_PPI, TIMER_VIRT_PPI,
};

/// Interrupt flags of the `arm,gic-v3` binding's third cell (include/dt-bindings/interrupt-
/// controller/irq.h).
pub const IRQ_TYPE_EDGE_RISING: u32 = 1;
pub const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// The GIC's phandle (the root's `interrupt-parent`).
pub const PHANDLE_GIC: u32 = 1;
/// The fixed APB clock's phandle (the PrimeCells' `clocks`).
pub const PHANDLE_APB_PCLK: u32 = 2;
/// The APB clock rate: QEMU's `virt` uses 24 MHz, which Linux's PL011 driver divides down
/// to any standard baud rate (ARM DDI 0183, section 3.3.6 "Fractional Baud Rate Register").
pub const APB_PCLK_HZ: u32 = 24_000_000;

/// MPIDR_EL1's affinity fields Aff3 [39:32], Aff2 [23:16], Aff1 [15:8] and Aff0 [7:0]
/// (Arm ARM DDI 0487, D23.2 "MPIDR_EL1"); the arm,cpus binding takes exactly these as `reg`.
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Errors building the device tree.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdtError {
    /// `vm-fdt` refused a node or property.
    #[error("cannot write device tree node {node}: {source}")]
    Write {
        node: &'static str,
        #[source]
        source: vm_fdt::Error,
    },
    /// The vCPU count does not fit the GIC's redistributor region.
    #[error("device tree cpus: {0}")]
    Vcpus(#[source] LayoutError),
    /// Two vCPUs have the same MPIDR affinity.
    #[error("vCPUs {first} and {second} share the MPIDR affinity {affinity:#x}")]
    DuplicateMpidr {
        first: usize,
        second: usize,
        affinity: u64,
    },
    /// The memory size does not fit the layout.
    #[error("device tree memory: {0}")]
    Memory(#[source] LayoutError),
    /// The initrd range is empty, wraps or lies outside RAM.
    #[error("initrd at {start:#x}+{size:#x} is not inside RAM ({ram_start:#x}..{ram_end:#x})")]
    InitrdOutsideRam {
        start: u64,
        size: u64,
        ram_start: u64,
        ram_end: u64,
    },
    /// The blob exceeds what the boot protocol allows.
    #[error("device tree of {0} bytes exceeds the {FDT_MAX_SIZE}-byte limit")]
    TooLarge(usize),
}

/// What kind of MMIO device a node describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// An ARM PL011 UART (`arm,pl011` binding); the first one is the console.
    Pl011,
    /// An ARM PL031 RTC (`arm,pl031` binding).
    Pl031,
    /// A virtio-mmio transport (`virtio,mmio` binding).
    VirtioMmio,
}

/// One MMIO device: its register window and its SPI (INTID − 32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdtDevice {
    pub kind: DeviceKind,
    pub base: u64,
    pub size: u64,
    pub spi: u32,
}

/// Everything the device tree describes.
#[derive(Clone, Debug)]
pub struct FdtConfig<'a> {
    /// Each vCPU's MPIDR_EL1 as KVM reports it, in vCPU order (vCPU 0 boots).
    pub vcpu_mpidrs: &'a [u64],
    /// RAM from `layout::RAM_START`.
    pub mem_size: u64,
    pub cmdline: &'a str,
    /// The initrd's start and size in guest memory.
    pub initrd: Option<(GuestAddress, u64)>,
    pub devices: &'a [FdtDevice],
}

/// `vm-fdt` calls on one node, with the node's name in the error.
struct Writer {
    fdt: FdtWriter,
    node: &'static str,
}

impl Writer {
    fn at(&mut self, node: &'static str) -> &mut Self {
        self.node = node;
        self
    }

    fn ok<T>(&self, r: Result<T, vm_fdt::Error>) -> Result<T, FdtError> {
        r.map_err(|source| FdtError::Write {
            node: self.node,
            source,
        })
    }

    fn begin(&mut self, name: &str) -> Result<FdtWriterNode, FdtError> {
        let r = self.fdt.begin_node(name);
        self.ok(r)
    }

    fn end(&mut self, node: FdtWriterNode) -> Result<(), FdtError> {
        let r = self.fdt.end_node(node);
        self.ok(r)
    }

    fn u32(&mut self, name: &str, val: u32) -> Result<(), FdtError> {
        let r = self.fdt.property_u32(name, val);
        self.ok(r)
    }

    fn u64(&mut self, name: &str, val: u64) -> Result<(), FdtError> {
        let r = self.fdt.property_u64(name, val);
        self.ok(r)
    }

    fn cells(&mut self, name: &str, cells: &[u32]) -> Result<(), FdtError> {
        let r = self.fdt.property_array_u32(name, cells);
        self.ok(r)
    }

    /// `reg` (and anything else) as 2-cell numbers.
    fn cells64(&mut self, name: &str, cells: &[u64]) -> Result<(), FdtError> {
        let r = self.fdt.property_array_u64(name, cells);
        self.ok(r)
    }

    fn string(&mut self, name: &str, val: &str) -> Result<(), FdtError> {
        let r = self.fdt.property_string(name, val);
        self.ok(r)
    }

    fn strings(&mut self, name: &str, vals: &[&str]) -> Result<(), FdtError> {
        let r = self
            .fdt
            .property_string_list(name, vals.iter().map(|s| s.to_string()).collect());
        self.ok(r)
    }

    fn null(&mut self, name: &str) -> Result<(), FdtError> {
        let r = self.fdt.property_null(name);
        self.ok(r)
    }

    fn phandle(&mut self, val: u32) -> Result<(), FdtError> {
        let r = self.fdt.property_phandle(val);
        self.ok(r)
    }
}

/// The node name of a device (Devicetree Specification v0.4, section 2.2.2 "Generic Names
/// Recommendation", with the names Linux and QEMU give these devices).
fn node_name(device: &FdtDevice) -> String {
    let prefix = match device.kind {
        DeviceKind::Pl011 => "pl011",
        DeviceKind::Pl031 => "pl031",
        DeviceKind::VirtioMmio => "virtio_mmio",
    };
    format!("{prefix}@{:x}", device.base)
}

/// Builds the DTB for `config`.
pub fn create_fdt(config: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    let (redist_base, redist_size) =
        layout::gic_redist_region(vcpu_count(config.vcpu_mpidrs)?).map_err(FdtError::Vcpus)?;
    let affinities = check_mpidrs(config.vcpu_mpidrs)?;
    let (ram_start, ram_size) = layout::ram_region(config.mem_size).map_err(FdtError::Memory)?;
    if let Some((start, size)) = config.initrd {
        check_initrd(start.0, size, ram_start.0, ram_start.0 + ram_size)?;
    }

    let mut w = Writer {
        fdt: FdtWriter::new().map_err(|source| FdtError::Write { node: "/", source })?,
        node: "/",
    };
    let root = w.begin("")?;
    w.string("compatible", "linux,dummy-virt")?;
    w.u32("#address-cells", 2)?;
    w.u32("#size-cells", 2)?;
    w.u32("interrupt-parent", PHANDLE_GIC)?;

    cpus(&mut w, &affinities)?;
    memory(&mut w, ram_start.0, ram_size)?;
    chosen(&mut w, config)?;
    psci(&mut w)?;
    gic(&mut w, redist_base, redist_size)?;
    timer(&mut w)?;
    apb_pclk(&mut w)?;
    for device in config.devices {
        mmio_device(&mut w, device)?;
    }

    w.at("/").end(root)?;
    let Writer { fdt, .. } = w;
    let dtb = fdt
        .finish()
        .map_err(|source| FdtError::Write { node: "/", source })?;
    if dtb.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge(dtb.len()));
    }
    Ok(dtb)
}

fn vcpu_count(mpidrs: &[u64]) -> Result<u32, FdtError> {
    u32::try_from(mpidrs.len()).map_err(|_| FdtError::Vcpus(LayoutError::VcpuCount(u32::MAX)))
}

/// Each vCPU's affinity (the `reg` of its node), all distinct.
fn check_mpidrs(mpidrs: &[u64]) -> Result<Vec<u64>, FdtError> {
    let affinities: Vec<u64> = mpidrs.iter().map(|m| m & MPIDR_AFFINITY_MASK).collect();
    for (second, a) in affinities.iter().enumerate() {
        if let Some(first) = affinities[..second].iter().position(|b| b == a) {
            return Err(FdtError::DuplicateMpidr {
                first,
                second,
                affinity: *a,
            });
        }
    }
    Ok(affinities)
}

fn check_initrd(start: u64, size: u64, ram_start: u64, ram_end: u64) -> Result<(), FdtError> {
    let inside = start
        .checked_add(size)
        .is_some_and(|end| size > 0 && start >= ram_start && end <= ram_end);
    if inside {
        Ok(())
    } else {
        Err(FdtError::InitrdOutsideRam {
            start,
            size,
            ram_start,
            ram_end,
        })
    }
}

/// Documentation/devicetree/bindings/arm/cpus.yaml: with `#address-cells = <2>`, `reg` is
/// MPIDR_EL1's Aff3 in the first cell and Aff2..Aff0 in the second; PSCI starts the
/// secondaries (arm/psci.yaml).
fn cpus(w: &mut Writer, affinities: &[u64]) -> Result<(), FdtError> {
    let cpus = w.at("/cpus").begin("cpus")?;
    w.u32("#address-cells", 2)?;
    w.u32("#size-cells", 0)?;
    for affinity in affinities {
        let cpu = w.at("/cpus/cpu").begin(&format!("cpu@{affinity:x}"))?;
        w.string("device_type", "cpu")?;
        w.string("compatible", "arm,arm-v8")?;
        w.string("enable-method", "psci")?;
        w.u64("reg", *affinity)?;
        w.end(cpu)?;
    }
    w.at("/cpus").end(cpus)
}

/// Devicetree Specification v0.4, section 3.4 "/memory node".
fn memory(w: &mut Writer, start: u64, size: u64) -> Result<(), FdtError> {
    let node = w.at("/memory").begin(&format!("memory@{start:x}"))?;
    w.string("device_type", "memory")?;
    w.cells64("reg", &[start, size])?;
    w.end(node)
}

/// Devicetree Specification v0.4, section 3.6 "/chosen Node"; the initrd properties are
/// Linux's (Documentation/devicetree/bindings/chosen.txt, end exclusive).
fn chosen(w: &mut Writer, config: &FdtConfig) -> Result<(), FdtError> {
    let node = w.at("/chosen").begin("chosen")?;
    w.string("bootargs", config.cmdline)?;
    if let Some((start, size)) = config.initrd {
        w.u64("linux,initrd-start", start.0)?;
        w.u64("linux,initrd-end", start.0 + size)?;
    }
    if let Some(console) = config.devices.iter().find(|d| d.kind == DeviceKind::Pl011) {
        w.string("stdout-path", &format!("/{}", node_name(console)))?;
    }
    w.end(node)
}

/// Documentation/devicetree/bindings/arm/psci.yaml; KVM implements PSCI 0.2+ behind HVC
/// (Arm DEN 0022, "Arm Power State Coordination Interface").
fn psci(w: &mut Writer) -> Result<(), FdtError> {
    let node = w.at("/psci").begin("psci")?;
    w.string("compatible", "arm,psci-0.2")?;
    w.string("method", "hvc")?;
    w.end(node)
}

/// Documentation/devicetree/bindings/interrupt-controller/arm,gic-v3.yaml: `reg` is the
/// distributor, then the redistributor region(s); the maintenance interrupt is PPI 9.
fn gic(w: &mut Writer, redist_base: u64, redist_size: u64) -> Result<(), FdtError> {
    let node = w.at("/intc").begin(&format!("intc@{GIC_DIST_START:x}"))?;
    w.string("compatible", "arm,gic-v3")?;
    w.u32("#interrupt-cells", 3)?;
    w.null("interrupt-controller")?;
    // The parent unit-address size for `interrupt-map`s (Devicetree Specification v0.4,
    // section 2.4.3.1) and the address space of a later ITS child node.
    w.u32("#address-cells", 2)?;
    w.u32("#size-cells", 2)?;
    w.null("ranges")?;
    w.cells64(
        "reg",
        &[GIC_DIST_START, GIC_DIST_SIZE, redist_base, redist_size],
    )?;
    w.u32("#redistributor-regions", 1)?;
    w.cells(
        "interrupts",
        &[
            GIC_FDT_IRQ_TYPE_PPI,
            GIC_MAINTENANCE_PPI,
            IRQ_TYPE_LEVEL_HIGH,
        ],
    )?;
    w.phandle(PHANDLE_GIC)?;
    w.end(node)
}

/// Documentation/devicetree/bindings/timer/arm,arch_timer.yaml: secure physical,
/// non-secure physical, virtual and hypervisor timer PPIs, in that order.
fn timer(w: &mut Writer) -> Result<(), FdtError> {
    let node = w.at("/timer").begin("timer")?;
    w.string("compatible", "arm,armv8-timer")?;
    let mut irqs = Vec::with_capacity(12);
    for ppi in [
        TIMER_SEC_PHYS_PPI,
        TIMER_PHYS_PPI,
        TIMER_VIRT_PPI,
        TIMER_HYP_PPI,
    ] {
        irqs.extend([GIC_FDT_IRQ_TYPE_PPI, ppi, IRQ_TYPE_LEVEL_HIGH]);
    }
    w.cells("interrupts", &irqs)?;
    // The counter keeps running in every power state KVM puts a vCPU in.
    w.null("always-on")?;
    w.end(node)
}

/// Documentation/devicetree/bindings/clock/fixed-clock.yaml: the APB clock the PrimeCell
/// bus binding requires (`apb_pclk`) and the PL011's reference clock.
fn apb_pclk(w: &mut Writer) -> Result<(), FdtError> {
    let node = w.at("/apb-pclk").begin("apb-pclk")?;
    w.string("compatible", "fixed-clock")?;
    w.u32("#clock-cells", 0)?;
    w.u32("clock-frequency", APB_PCLK_HZ)?;
    w.string("clock-output-names", "clk24mhz")?;
    w.phandle(PHANDLE_APB_PCLK)?;
    w.end(node)
}

/// Documentation/devicetree/bindings/serial/arm,pl011.yaml, rtc/arm,pl031.yaml and
/// virtio/mmio.yaml.
fn mmio_device(w: &mut Writer, device: &FdtDevice) -> Result<(), FdtError> {
    let node = w.at("mmio device").begin(&node_name(device))?;
    match device.kind {
        DeviceKind::Pl011 => {
            w.strings("compatible", &["arm,pl011", "arm,primecell"])?;
            w.cells("clocks", &[PHANDLE_APB_PCLK, PHANDLE_APB_PCLK])?;
            w.strings("clock-names", &["uartclk", "apb_pclk"])?;
        }
        DeviceKind::Pl031 => {
            w.strings("compatible", &["arm,pl031", "arm,primecell"])?;
            w.cells("clocks", &[PHANDLE_APB_PCLK])?;
            w.string("clock-names", "apb_pclk")?;
        }
        DeviceKind::VirtioMmio => {
            w.string("compatible", "virtio,mmio")?;
            // Guest memory is ordinary cacheable memory to the VMM's device threads.
            w.null("dma-coherent")?;
        }
    }
    w.cells64("reg", &[device.base, device.size])?;
    // The UART and virtio-mmio interrupts are irqfds, which KVM injects as a pulse (line up,
    // then down): on a level-sensitive SPI the vGIC forgets a pulse the vCPU has not taken
    // yet, so they are declared edge-rising (the PL011 model raises its eventfd when its
    // masked status becomes non-zero). The RTC keeps the PL031's level line (DDI 0224,
    // section 2.4 "Interrupts"); vm-superio's RTC never raises it.
    let flags = match device.kind {
        DeviceKind::VirtioMmio | DeviceKind::Pl011 => IRQ_TYPE_EDGE_RISING,
        DeviceKind::Pl031 => IRQ_TYPE_LEVEL_HIGH,
    };
    w.cells("interrupts", &[GIC_FDT_IRQ_TYPE_SPI, device.spi, flags])?;
    w.end(node)
}

// The DTB's address must not move with RAM size: it is at the base of RAM.
const _: () = assert!(layout::FDT_START.0 == RAM_START.0);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aarch64::layout::{
        RTC_SIZE, RTC_SPI, RTC_START, UART_SIZE, UART_SPI, UART_START, VIRTIO_MMIO_WINDOW_SIZE,
    };

    const MIB: u64 = 1 << 20;

    fn be32s(value: &[u8]) -> Vec<u32> {
        assert_eq!(value.len() % 4, 0, "{value:?}");
        value
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn be64s(value: &[u8]) -> Vec<u64> {
        assert_eq!(value.len() % 8, 0, "{value:?}");
        value
            .chunks(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn strings(value: &[u8]) -> Vec<&str> {
        let s = std::str::from_utf8(value).unwrap();
        s.strip_suffix('\0').unwrap().split('\0').collect()
    }

    fn mmio_devices(disks: u32) -> Vec<FdtDevice> {
        let mut d = vec![
            FdtDevice {
                kind: DeviceKind::Pl011,
                base: UART_START,
                size: UART_SIZE,
                spi: UART_SPI,
            },
            FdtDevice {
                kind: DeviceKind::Pl031,
                base: RTC_START,
                size: RTC_SIZE,
                spi: RTC_SPI,
            },
        ];
        for i in 0..disks {
            let (base, spi) = layout::virtio_mmio_device(i).unwrap();
            d.push(FdtDevice {
                kind: DeviceKind::VirtioMmio,
                base,
                size: VIRTIO_MMIO_WINDOW_SIZE,
                spi,
            });
        }
        d
    }

    /// MPIDR_EL1 as KVM gives it: RES1 bit 31, Aff0 = vCPU index % 16, Aff1 = index / 16.
    fn mpidrs(n: u64) -> Vec<u64> {
        (0..n).map(|i| 1 << 31 | (i / 16) << 8 | (i % 16)).collect()
    }

    const INITRD: (GuestAddress, u64) = (GuestAddress(0x7f00_0000), 0x12_3456);

    fn two_vcpus_one_disk() -> Vec<u8> {
        let mpidrs = mpidrs(2);
        let devices = mmio_devices(1);
        create_fdt(&FdtConfig {
            vcpu_mpidrs: &mpidrs,
            mem_size: 1 << 30,
            cmdline: "console=ttyAMA0 root=/dev/vda rw",
            initrd: Some(INITRD),
            devices: &devices,
        })
        .unwrap()
    }

    #[test]
    fn root_and_gic_phandles() {
        let dtb = two_vcpus_one_disk();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let root = fdt.find_node("/").unwrap();
        assert_eq!(root.property("#address-cells").unwrap().as_usize(), Some(2));
        assert_eq!(root.property("#size-cells").unwrap().as_usize(), Some(2));
        let parent = root
            .property("interrupt-parent")
            .unwrap()
            .as_usize()
            .unwrap();
        // The interrupt parent is the one node with that phandle, and it is the GICv3.
        let gic = fdt.find_phandle(parent as u32).unwrap();
        assert_eq!(gic.name, "intc@8000000");
        assert_eq!(
            strings(gic.property("compatible").unwrap().value),
            ["arm,gic-v3"]
        );
        assert!(gic
            .property("interrupt-controller")
            .unwrap()
            .value
            .is_empty());
        assert_eq!(
            gic.property("#interrupt-cells").unwrap().as_usize(),
            Some(3)
        );
        assert_eq!(gic.property("#address-cells").unwrap().as_usize(), Some(2));
        assert_eq!(
            be64s(gic.property("reg").unwrap().value),
            [0x0800_0000, 0x1_0000, 0x080a_0000, 2 * 0x2_0000]
        );
        assert_eq!(be32s(gic.property("interrupts").unwrap().value), [1, 9, 4]);
        // Phandles are unique: exactly one node per value.
        let phandles: Vec<u32> = fdt
            .all_nodes()
            .filter_map(|n| n.property("phandle"))
            .map(|p| be32s(p.value)[0])
            .collect();
        assert_eq!(phandles, [PHANDLE_GIC, PHANDLE_APB_PCLK]);
    }

    #[test]
    fn one_cpu_node_per_vcpu_with_its_affinity() {
        let mpidrs = mpidrs(20);
        let dtb = create_fdt(&FdtConfig {
            vcpu_mpidrs: &mpidrs,
            mem_size: 512 * MIB,
            cmdline: "",
            initrd: None,
            devices: &[],
        })
        .unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let cpus = fdt.find_node("/cpus").unwrap();
        assert_eq!(cpus.property("#address-cells").unwrap().as_usize(), Some(2));
        assert_eq!(cpus.property("#size-cells").unwrap().as_usize(), Some(0));
        let nodes: Vec<_> = cpus.children().collect();
        assert_eq!(nodes.len(), 20);
        for (i, cpu) in nodes.iter().enumerate() {
            let reg = be64s(cpu.property("reg").unwrap().value);
            // RES1 bit 31 is not affinity; vCPU 17 is Aff1 = 1, Aff0 = 1.
            let want = ((i as u64 / 16) << 8) | (i as u64 % 16);
            assert_eq!(reg, [want], "cpu {i}");
            assert_eq!(cpu.name, format!("cpu@{want:x}"));
            assert_eq!(cpu.property("device_type").unwrap().as_str(), Some("cpu"));
            assert_eq!(
                cpu.property("compatible").unwrap().as_str(),
                Some("arm,arm-v8")
            );
            assert_eq!(
                cpu.property("enable-method").unwrap().as_str(),
                Some("psci")
            );
        }
        assert_eq!(nodes[17].name, "cpu@101");
        // The redistributor region grows with the vCPU count.
        let gic = fdt.find_node("/intc").unwrap();
        assert_eq!(be64s(gic.property("reg").unwrap().value)[3], 20 * 0x2_0000);
        // Aff3 goes into the first reg cell.
        let dtb = create_fdt(&FdtConfig {
            vcpu_mpidrs: &[0x8000_0000, 0x01_8000_0000],
            mem_size: 512 * MIB,
            cmdline: "",
            initrd: None,
            devices: &[],
        })
        .unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let cpu = fdt.find_node("/cpus/cpu@100000000").unwrap();
        assert_eq!(be32s(cpu.property("reg").unwrap().value), [1, 0]);
    }

    #[test]
    fn memory_and_chosen() {
        let dtb = two_vcpus_one_disk();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let mem = fdt.find_node("/memory@40000000").unwrap();
        assert_eq!(
            mem.property("device_type").unwrap().as_str(),
            Some("memory")
        );
        assert_eq!(
            be64s(mem.property("reg").unwrap().value),
            [0x4000_0000, 1 << 30]
        );
        let chosen = fdt.chosen();
        assert_eq!(chosen.bootargs(), Some("console=ttyAMA0 root=/dev/vda rw"));
        let node = fdt.find_node("/chosen").unwrap();
        let start = be64s(node.property("linux,initrd-start").unwrap().value);
        let end = be64s(node.property("linux,initrd-end").unwrap().value);
        assert_eq!(start, [INITRD.0 .0]);
        assert_eq!(end, [INITRD.0 .0 + INITRD.1], "end is exclusive");
        // stdout-path names the PL011 node itself.
        let stdout = chosen.stdout().unwrap();
        assert_eq!(stdout.name, "pl011@b000000");
        assert_eq!(
            node.property("stdout-path").unwrap().as_str(),
            Some("/pl011@b000000")
        );
    }

    #[test]
    fn psci_timer_and_clock() {
        let dtb = two_vcpus_one_disk();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let psci = fdt.find_node("/psci").unwrap();
        assert_eq!(
            psci.property("compatible").unwrap().as_str(),
            Some("arm,psci-0.2")
        );
        assert_eq!(psci.property("method").unwrap().as_str(), Some("hvc"));
        let timer = fdt.find_node("/timer").unwrap();
        assert_eq!(
            timer.property("compatible").unwrap().as_str(),
            Some("arm,armv8-timer")
        );
        assert_eq!(
            be32s(timer.property("interrupts").unwrap().value),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );
        assert!(timer.property("always-on").unwrap().value.is_empty());
        let clk = fdt.find_phandle(PHANDLE_APB_PCLK).unwrap();
        assert_eq!(clk.name, "apb-pclk");
        assert_eq!(
            clk.property("compatible").unwrap().as_str(),
            Some("fixed-clock")
        );
        assert_eq!(clk.property("#clock-cells").unwrap().as_usize(), Some(0));
        assert_eq!(
            clk.property("clock-frequency").unwrap().as_usize(),
            Some(24_000_000)
        );
    }

    #[test]
    fn uart_rtc_and_virtio_nodes() {
        let dtb = two_vcpus_one_disk();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let uart = fdt.find_node("/pl011@b000000").unwrap();
        assert_eq!(
            strings(uart.property("compatible").unwrap().value),
            ["arm,pl011", "arm,primecell"]
        );
        assert_eq!(
            be64s(uart.property("reg").unwrap().value),
            [0x0b00_0000, 0x1000]
        );
        assert_eq!(be32s(uart.property("interrupts").unwrap().value), [0, 1, 1]);
        assert_eq!(
            be32s(uart.property("clocks").unwrap().value),
            [PHANDLE_APB_PCLK, PHANDLE_APB_PCLK]
        );
        assert_eq!(
            strings(uart.property("clock-names").unwrap().value),
            ["uartclk", "apb_pclk"]
        );
        let rtc = fdt.find_node("/pl031@b001000").unwrap();
        assert_eq!(
            strings(rtc.property("compatible").unwrap().value),
            ["arm,pl031", "arm,primecell"]
        );
        assert_eq!(be32s(rtc.property("interrupts").unwrap().value), [0, 2, 4]);
        assert_eq!(
            be32s(rtc.property("clocks").unwrap().value),
            [PHANDLE_APB_PCLK]
        );
        let disk = fdt.find_node("/virtio_mmio@b100000").unwrap();
        assert_eq!(
            disk.property("compatible").unwrap().as_str(),
            Some("virtio,mmio")
        );
        assert_eq!(
            be64s(disk.property("reg").unwrap().value),
            [0x0b10_0000, 0x1000]
        );
        // SPI 16, edge rising.
        assert_eq!(
            be32s(disk.property("interrupts").unwrap().value),
            [0, 16, 1]
        );
        assert!(disk.property("dma-coherent").unwrap().value.is_empty());
        // Every interrupt specifier is a triplet the GIC binding accepts: SPI or PPI, a
        // number in range, level-high or edge-rising.
        for node in fdt.all_nodes() {
            if let Some(p) = node.property("interrupts") {
                let cells = be32s(p.value);
                assert_eq!(cells.len() % 3, 0, "{}", node.name);
                for t in cells.chunks(3) {
                    match t[0] {
                        GIC_FDT_IRQ_TYPE_SPI => assert!(t[1] <= layout::SPI_LAST, "{}", node.name),
                        GIC_FDT_IRQ_TYPE_PPI => assert!(t[1] < 16, "{}", node.name),
                        other => panic!("{}: type {other}", node.name),
                    }
                    assert!(matches!(t[2], IRQ_TYPE_EDGE_RISING | IRQ_TYPE_LEVEL_HIGH));
                }
            }
        }
    }

    #[test]
    fn bad_configs_are_refused() {
        let devices = mmio_devices(0);
        let base = FdtConfig {
            vcpu_mpidrs: &[0x8000_0000],
            mem_size: 512 * MIB,
            cmdline: "",
            initrd: None,
            devices: &devices,
        };
        assert!(create_fdt(&base).is_ok());
        assert_eq!(
            create_fdt(&FdtConfig {
                vcpu_mpidrs: &[],
                ..base.clone()
            }),
            Err(FdtError::Vcpus(LayoutError::VcpuCount(0)))
        );
        let too_many = mpidrs(257);
        assert_eq!(
            create_fdt(&FdtConfig {
                vcpu_mpidrs: &too_many,
                ..base.clone()
            }),
            Err(FdtError::Vcpus(LayoutError::VcpuCount(257)))
        );
        // Bit 31 differs but the affinity is the same.
        assert_eq!(
            create_fdt(&FdtConfig {
                vcpu_mpidrs: &[0x8000_0001, 0x1, 0x2],
                ..base.clone()
            }),
            Err(FdtError::DuplicateMpidr {
                first: 0,
                second: 1,
                affinity: 1
            })
        );
        assert!(matches!(
            create_fdt(&FdtConfig {
                mem_size: 0,
                ..base.clone()
            }),
            Err(FdtError::Memory(_))
        ));
        for initrd in [
            (GuestAddress(0x3fff_f000), 0x2000),
            (GuestAddress(0x5fff_f000), 0x2000),
            (GuestAddress(0x4100_0000), 0),
            (GuestAddress(u64::MAX), 2),
        ] {
            assert!(
                matches!(
                    create_fdt(&FdtConfig {
                        initrd: Some(initrd),
                        ..base.clone()
                    }),
                    Err(FdtError::InitrdOutsideRam { .. })
                ),
                "{initrd:x?}"
            );
        }
        // A NUL inside the command line cannot be a DT string.
        assert!(matches!(
            create_fdt(&FdtConfig {
                cmdline: "a\0b",
                ..base.clone()
            }),
            Err(FdtError::Write {
                node: "/chosen",
                source: vm_fdt::Error::InvalidString
            })
        ));
        // The most vCPUs and virtio devices still fit the 2 MiB limit.
        let all = mpidrs(u64::from(layout::MAX_VCPUS));
        let many = mmio_devices(layout::VIRTIO_MMIO_MAX_DEVICES);
        let dtb = create_fdt(&FdtConfig {
            vcpu_mpidrs: &all,
            devices: &many,
            ..base
        })
        .unwrap();
        assert!(dtb.len() as u64 <= FDT_MAX_SIZE);
    }

    /// Decompiles the DTB with `dtc` (device-tree-compiler) when it is installed: it must
    /// accept the blob without a warning (its checks include phandle references, unit
    /// addresses against `reg`, interrupt-parent and #interrupt-cells).
    #[test]
    fn dtc_reads_it_without_warnings() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts", "-o", "-", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("dtc not installed: skipped");
            return;
        };
        let dtb = two_vcpus_one_disk();
        child.stdin.take().unwrap().write_all(&dtb).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let dts = String::from_utf8_lossy(&out.stdout);
        println!("{dts}");
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.trim().is_empty(), "dtc warned:\n{stderr}");
        for line in [
            "interrupt-parent = <0x01>;",
            "reg = <0x00 0x8000000 0x00 0x10000 0x00 0x80a0000 0x00 0x40000>;",
            "interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;",
            "stdout-path = \"/pl011@b000000\";",
            "linux,initrd-start = <0x00 0x7f000000>;",
            "linux,initrd-end = <0x00 0x7f123456>;",
            "enable-method = \"psci\";",
        ] {
            assert!(dts.contains(line), "{line} missing from\n{dts}");
        }
    }
}

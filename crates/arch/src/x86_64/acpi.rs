//! ACPI tables (ACPI 6.5 §5.2): RSDP → XSDT → {FADT → DSDT, MADT}. The platform is
//! hardware-reduced (§4.1): no PM1 blocks or SCI; reset and S5 go through the FADT's reset
//! register and sleep control register, which the VMM's ACPI PM device implements.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use super::layout::{ACPI_END, ACPI_START, APIC_START, IOAPIC_START};

/// Errors while building ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {needed:#x} bytes but only {room:#x} are reserved for them")]
    TooLarge { needed: u64, room: u64 },
    #[error("cannot write ACPI table {sig} at {addr:#x}: {source}")]
    GuestWrite {
        sig: String,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

pub const OEM_ID: [u8; 6] = *b"VIREO ";
const OEM_REVISION: u32 = 1;

/// I/O ports of the hardware-reduced power registers (the ACPI PM device's block).
#[derive(Clone, Copy, Debug)]
pub struct AcpiPmPorts {
    pub sleep_control: u16,
    pub sleep_status: u16,
    pub reset: u16,
    pub reset_value: u8,
    /// SLP_TYP for S5, announced in the DSDT's `\_S5_` object.
    pub s5_slp_typ: u8,
}

/// What the tables describe.
pub struct AcpiConfig<'a> {
    pub vcpu_count: u8,
    pub pm: AcpiPmPorts,
    /// Devices for `\_SB_` in the DSDT (each already a `Device` AML object).
    pub dsdt_devices: &'a [&'a dyn Aml],
    /// ISA IRQs to describe with identity interrupt source overrides.
    pub isa_irq_overrides: &'a [u8],
}

/// MADT Interrupt Source Override (ACPI 6.5 §5.2.12.5).
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// IAPC_BOOT_ARCH (ACPI 6.5 §5.2.9.3): an 8042 exists (its reset line), no VGA, no RTC.
const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const IAPC_BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"VIREODSD", OEM_REVISION);
    aml::Scope::new("_SB_".into(), cfg.dsdt_devices.to_vec()).to_aml_bytes(&mut dsdt);
    let typ = cfg.pm.s5_slp_typ;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&typ, &typ, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut dsdt);
    dsdt.as_slice().to_vec()
}

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"VIREOFAC", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = io_register(cfg.pm.reset);
    b.reset_value = cfg.pm.reset_value;
    b.sleep_control_reg = io_register(cfg.pm.sleep_control);
    b.sleep_status_reg = io_register(cfg.pm.sleep_status);
    b.iapc_boot_arch =
        (IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_NO_VGA | IAPC_BOOT_ARCH_NO_CMOS_RTC).into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"VIREO\0\0\0").into();
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        *b"VIREOAPC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..cfg.vcpu_count {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    for &irq in cfg.isa_irq_overrides {
        madt.add_structure(InterruptSourceOverride {
            r#type: 2,
            length: 10,
            bus: 0,
            source: irq,
            gsi: u32::from(irq).into(),
            flags: 0.into(), // conforms to the ISA bus: edge, active high
        });
    }
    let mut out = Vec::new();
    madt.to_aml_bytes(&mut out);
    out
}

/// The tables with the guest addresses they go to, RSDP first.
pub fn build_tables(cfg: &AcpiConfig) -> Result<Vec<(GuestAddress, Vec<u8>)>, AcpiError> {
    let align = |a: u64| (a + 15) & !15;
    let mut next = align(ACPI_START.0 + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align(next + len as u64);
        at
    };
    let dsdt = dsdt(cfg);
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(cfg, dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(cfg);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, *b"VIREOXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(xsdt_bytes.len());
    if next > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: next - ACPI_START.0,
            room: ACPI_END - ACPI_START.0,
        });
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    Ok(vec![
        (ACPI_START, rsdp),
        (GuestAddress(dsdt_addr), dsdt),
        (GuestAddress(fadt_addr), fadt),
        (GuestAddress(madt_addr), madt),
        (GuestAddress(xsdt_addr), xsdt_bytes),
    ])
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    for (addr, bytes) in build_tables(cfg)? {
        mem.write_slice(&bytes, addr)
            .map_err(|source| AcpiError::GuestWrite {
                sig: String::from_utf8_lossy(&bytes[..4.min(bytes.len())]).into_owned(),
                addr: addr.0,
                source,
            })?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> AcpiPmPorts {
        AcpiPmPorts {
            sleep_control: 0x600,
            sleep_status: 0x601,
            reset: 0x602,
            reset_value: 1,
            s5_slp_typ: 5,
        }
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn tables(n: u8) -> Vec<(GuestAddress, Vec<u8>)> {
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
        let irq = aml::Interrupt::new(true, true, false, false, 4);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
        let com1 = aml::Device::new("COM1".into(), vec![&hid, &crs]);
        let devices: [&dyn Aml; 1] = [&com1];
        build_tables(&AcpiConfig {
            vcpu_count: n,
            pm: pm(),
            dsdt_devices: &devices,
            isa_irq_overrides: &[0, 4],
        })
        .unwrap()
    }

    #[test]
    fn every_table_has_a_valid_checksum_and_length() {
        let t = tables(4);
        let rsdp = &t[0].1;
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, b) in &t[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "{:?}", &b[..4]);
            assert_eq!(sum(b), 0, "{:?}", String::from_utf8_lossy(&b[..4]));
        }
    }

    #[test]
    fn pointers_chain_rsdp_xsdt_fadt_dsdt() {
        let t = tables(2);
        let by_addr = |a: u64| &t.iter().find(|(g, _)| g.0 == a).expect("table at addr").1;
        let xsdt = by_addr(u64_at(&t[0].1, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| &by_addr(u64_at(xsdt, o))[..4])
            .collect();
        assert_eq!(entries, vec![b"FACP", b"APIC"]);
        let fadt = by_addr(u64_at(xsdt, 36));
        assert_eq!(&by_addr(u64_at(fadt, 140))[..4], b"DSDT");
        // Hardware-reduced with a reset register.
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0);
        assert_ne!(u32_at(fadt, 112) & (1 << 10), 0);
        assert_eq!((fadt[116], u64_at(fadt, 120), fadt[128]), (1, 0x602, 1));
        assert_eq!((fadt[244], u64_at(fadt, 248)), (1, 0x600));
        assert_eq!((fadt[256], u64_at(fadt, 260)), (1, 0x601));
        assert!(fadt.len() >= 276);
    }

    #[test]
    fn madt_lists_each_vcpu_the_ioapic_and_overrides() {
        for n in [1u8, 2, 8, 254] {
            let t = tables(n);
            let madt = &t.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap().1;
            assert_eq!(u32_at(madt, 36), 0xfee0_0000);
            let mut lapic_ids = Vec::new();
            let (mut ioapics, mut isos) = (0, Vec::new());
            let mut o = 44;
            while o < madt.len() {
                let (kind, len) = (madt[o], madt[o + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(u32_at(madt, o + 4) & 1, 1, "enabled");
                        lapic_ids.push(madt[o + 3]);
                    }
                    1 => {
                        ioapics += 1;
                        assert_eq!(u32_at(madt, o + 4), 0xfec0_0000);
                    }
                    2 => isos.push((madt[o + 3], u32_at(madt, o + 4))),
                    _ => panic!("unexpected MADT entry {kind}"),
                }
                o += len;
            }
            assert_eq!(lapic_ids, (0..n).collect::<Vec<_>>());
            assert_eq!(ioapics, 1);
            assert_eq!(isos, vec![(0, 0), (4, 4)]);
        }
    }

    #[test]
    fn dsdt_has_com1_and_s5() {
        let t = tables(1);
        let dsdt = &t.iter().find(|(_, b)| &b[..4] == b"DSDT").unwrap().1;
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"COM1"));
        assert!(has(b"_HID"));
        // EISAID("PNP0501") compressed.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        // IO descriptor for 0x3f8, length 8.
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x00, 0x08]));
        assert!(has(b"_S5_"));
    }

    #[test]
    fn tables_fit_the_reserved_area_even_for_254_vcpus() {
        let t = tables(254);
        let end = t.iter().map(|(a, b)| a.0 + b.len() as u64).max().unwrap();
        assert!(end <= ACPI_END);
    }
}

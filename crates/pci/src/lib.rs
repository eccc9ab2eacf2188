//! PCI for vireo, without KVM: configuration space with writable masks, the capability list,
//! BARs with size probing and moves, MSI-X (capability, table, PBA), the [`PciDevice`] trait,
//! and a segment's bus 0 with its host bridge behind the 0xCF8/0xCFC ports and ECAM.
//!
//! Everything here is a register model in the shape of `devices`: the guest's accesses come
//! in as `read(offset, data)` / `write(offset, data)`, and what the VMM must do about them
//! goes out through traits it implements: [`BarMapper`] (apply or refuse a BAR move) and
//! [`MsixNotifier`] (MSI-X route changes, in batches, and pending vectors to deliver). The
//! VMM owns KVM, the GSI routing table and the MMIO/port buses; this crate never calls them.
//!
//! References: PCI Local Bus Specification 3.0 ("PCI 3.0") and PCI Express Base
//! Specification 6.0 ("PCIe 6.0").

pub mod bar;
pub mod bus;
pub mod configuration;
pub mod device;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod msix;

pub use bar::{Bar, BarInfo, BarKind, BarMove, BarMoveRefused, MoveBar};
pub use bus::{
    BarMapper, Bdf, HostBridge, PciBusError, PciConfigIo, PciConfigMmio, PciSegment,
    CONFIG_IO_PORTS_LEN, CONFIG_IO_PORT_BASE, ECAM_BUS_SIZE, HOST_BRIDGE_DEVICE_ID,
    HOST_BRIDGE_VENDOR_ID,
};
pub use configuration::{
    ClassCode, ConfigurationError, ConfigurationSize, ConfigurationSpace, InterruptPin, Type0Header,
};
pub use device::{BarRegion, PciDevice};
pub use msix::{Msix, MsixError, MsixLocation, MsixNotifier, MsixRoute, MsixTrigger};

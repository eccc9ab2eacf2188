//! Emulated devices and the buses that route guest port I/O and MMIO to them.
//!
//! Every device here is a register model: the guest reads and writes registers through a
//! [`Bus`], and the device answers without blocking. Interrupts and VM exits are signalled
//! through eventfds handed in by the VMM.

pub mod bus;
pub mod exit;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod ioapic;
pub mod legacy;
pub mod limiter;

pub use bus::{Bus, BusDevice, BusError, BusStats};
pub use exit::{ExitHandle, VmExitReason};
pub use ioapic::{Ioapic, IoapicRouter, MsiMessage, IOAPIC_NUM_PINS, IOAPIC_WINDOW};
pub use limiter::{SharedWarnLimiter, WarnLimiter};

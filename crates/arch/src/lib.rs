//! Architecture code: the guest physical layout, vCPU register and CPUID set-up, boot
//! protocols and ACPI tables. Only x86_64 exists today; aarch64 will sit beside it.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub mod fuzz_targets;

/// Re-exported so the device manager can describe devices in the DSDT.
pub use acpi_tables;

//! Architecture code: the guest physical layout, vCPU register and CPUID set-up, boot
//! protocols and ACPI tables. x86_64 builds on x86_64 hosts only; aarch64's layout and
//! device tree are plain data and build everywhere (its KVM code is gated inside `aarch64`).

pub mod aarch64;

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub mod fuzz_targets;

/// Re-exported so the device manager can describe devices in the DSDT.
pub use acpi_tables;

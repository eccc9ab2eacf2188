//! x86_64: PVH and Linux 64-bit boot, CPUID templates, MSRs, LAPIC and ACPI.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod msr;
pub mod regs;

/// True when `/dev/kvm` is backed by kvm_pvm, the software "Pagetable-based Virtual
/// Machine": its instruction emulator runs guest ring-0 code and rejects some instructions,
/// so guests must not be offered the CPUID features that lead to them.
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

//! aarch64: the guest physical layout and the device tree. Both are data and bytes, so they
//! build and are tested on every host; code that calls KVM's aarch64 ioctls (vCPU init,
//! vGIC set-up) will sit here behind `#[cfg(target_arch = "aarch64")]`.

pub mod fdt;
pub mod layout;

//! The VMM: turns a [`VmConfig`] into a running KVM virtual machine — memory, vCPU threads
//! and their exit loop, devices and their buses — and stops it in order.

pub mod config;
pub mod console;
pub mod device_manager;
pub mod files;
pub mod interrupts;
pub mod landlock;
pub mod memory;
pub mod seccomp;
pub mod terminal;
pub mod vcpu;
pub mod vm;
pub mod workers;

pub use config::{
    DiskConfig, IrqchipMode, LandlockAccess, LandlockConfig, LandlockRule, NetConfig,
    PlatformConfig, SeccompMode, SerialConfig, VmConfig,
};
pub use vm::{run, ExitStatus, VmError};

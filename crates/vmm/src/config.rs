//! What a VM is made of, as the user asked for it. The binary fills this from the CLI or a
//! JSON file; [`VmConfig::validate`] checks what can be checked before touching KVM.

use std::path::PathBuf;

pub use crate::interrupts::IrqchipMode;
pub use crate::landlock::{LandlockAccess, LandlockConfig, LandlockRule};
pub use crate::seccomp::SeccompMode;

/// Where the guest's COM1 goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// Output to stdout, stdin to the guest (raw mode when stdin is a terminal).
    Tty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// Platform options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Also announce virtio-mmio devices as `virtio_mmio.device=SIZE@BASE:IRQ` on the kernel
    /// command line (for kernels with VIRTIO_MMIO_CMDLINE_DEVICES and guests without an ACPI
    /// DSDT parser). Off by default: a kernel reading both would claim each window twice.
    pub virtio_mmio_cmdline: bool,
    /// Where the interrupt controllers live.
    pub irqchip: IrqchipMode,
}

pub use virtio::block::BlockConfig as DiskConfig;
pub use virtio::net::NetConfig;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_size: u64,
    /// Back guest RAM with transparent huge pages.
    pub memory_thp: bool,
    pub serial: SerialConfig,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub platform: PlatformConfig,
    /// seccomp filters on every thread.
    pub seccomp: SeccompMode,
    /// The Landlock domain the process enters once its files are open.
    pub landlock: LandlockConfig,
}

/// The most vCPUs: APIC IDs are 8-bit in the MADT's LAPIC entries and 255 is broadcast.
pub const MAX_VCPUS: u8 = 254;
/// The least memory: the legacy area, boot structures and a small kernel.
pub const MIN_MEMORY: u64 = 2 << 20;

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus boot={0}: the number of vCPUs must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u64),
    #[error("--memory size={0}: too small, at least {min} MiB is needed", min = MIN_MEMORY >> 20)]
    MemoryTooSmall(u64),
    #[error("--memory size={size}: larger than this host's {host} bytes of RAM")]
    MemoryTooLarge { size: u64, host: u64 },
    #[error("--memory size={0}: must be a multiple of 4 KiB")]
    MemoryUnaligned(u64),
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(u64::from(self.vcpus)));
        }
        if self.memory_size < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(self.memory_size));
        }
        if !self.memory_size.is_multiple_of(4096) {
            return Err(ConfigError::MemoryUnaligned(self.memory_size));
        }
        let host = host_ram();
        if host > 0 && self.memory_size > host.min(arch::layout::MAX_MEMORY) {
            return Err(ConfigError::MemoryTooLarge {
                size: self.memory_size,
                host,
            });
        }
        Ok(())
    }
}

/// Physical RAM of this host in bytes (0 if unknown).
pub fn host_ram() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGE_SIZE),
        )
    };
    if pages <= 0 || page_size <= 0 {
        return 0;
    }
    (pages as u64).saturating_mul(page_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initramfs: None,
            cmdline: String::new(),
            vcpus: 1,
            memory_size: 512 << 20,
            memory_thp: true,
            serial: SerialConfig::Tty,
            disks: Vec::new(),
            nets: Vec::new(),
            platform: PlatformConfig::default(),
            seccomp: SeccompMode::Enforce,
            landlock: LandlockConfig::default(),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(cfg().validate(), Ok(()));
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = cfg();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(0)));
        c.vcpus = 255;
        assert_eq!(c.validate(), Err(ConfigError::VcpuCount(255)));
        let mut c = cfg();
        c.memory_size = 0;
        assert_eq!(c.validate(), Err(ConfigError::MemoryTooSmall(0)));
        c.memory_size = (512 << 20) + 1;
        assert!(matches!(c.validate(), Err(ConfigError::MemoryUnaligned(_))));
        c.memory_size = host_ram() + 4096;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
    }
}

//! Address-range dispatch for port I/O and MMIO exits.
//!
//! A [`Bus`] maps non-overlapping ranges to devices, keyed by base address in a `BTreeMap`
//! so a lookup is one range query. Accesses nobody claims are answered with all ones (reads)
//! or dropped (writes), counted, and logged at debug level: a guest probing for hardware
//! must never be able to stop the VM that way.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A device that answers register accesses. `offset` is relative to the base the device
/// was registered at.
pub trait BusDevice: Send {
    /// Fills `data` with the register contents at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Applies a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a device already on the bus.
    #[error("{name} at {base:#x}+{len:#x} overlaps {other} at {other_base:#x}+{other_len:#x}")]
    Overlap {
        name: String,
        base: u64,
        len: u64,
        other: String,
        other_base: u64,
        other_len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("{name} has an invalid range {base:#x}+{len:#x}")]
    InvalidRange { name: String, base: u64, len: u64 },
}

/// Counters of accesses that reached no device.
#[derive(Debug, Default)]
pub struct BusStats {
    pub unclaimed_reads: AtomicU64,
    pub unclaimed_writes: AtomicU64,
}

struct BusEntry {
    len: u64,
    name: String,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (port I/O or MMIO) with its devices.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, BusEntry>,
    stats: BusStats,
    /// The guest decides how often it touches unclaimed addresses.
    log: crate::limiter::SharedWarnLimiter,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`. Overlaps are a build-time error.
    pub fn insert(
        &mut self,
        name: &str,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::InvalidRange {
                name: name.to_string(),
                base,
                len,
            });
        };
        // The only candidates for overlap: the last range starting below `end`.
        if let Some((&other_base, other)) = self.devices.range(..end).next_back() {
            if other_base + other.len > base {
                return Err(BusError::Overlap {
                    name: name.to_string(),
                    base,
                    len,
                    other: other.name.clone(),
                    other_base,
                    other_len: other.len,
                });
            }
        }
        self.devices.insert(
            base,
            BusEntry {
                len,
                name: name.to_string(),
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&BusEntry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must sit inside the device's range.
        (offset.checked_add(size as u64)? <= entry.len).then_some((entry, offset))
    }

    /// Dispatches a read; returns false (and fills all ones) when no device claims it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.stats.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                if self.log.allow() {
                    tracing::debug!(
                        addr = format_args!("{addr:#x}"),
                        len = data.len(),
                        "unclaimed read"
                    );
                }
                false
            }
        }
    }

    /// Dispatches a write; returns false (dropping it) when no device claims it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => {
                self.stats.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                if self.log.allow() {
                    tracing::debug!(
                        addr = format_args!("{addr:#x}"),
                        len = data.len(),
                        "unclaimed write"
                    );
                }
                false
            }
        }
    }

    pub fn stats(&self) -> &BusStats {
        &self.stats
    }
}

/// A poisoned device lock means another vCPU panicked inside the device; the register state
/// is still usable, and refusing every later access would only hang the guest.
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch {
        regs: [u8; 16],
        writes: usize,
    }

    impl BusDevice for Scratch {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            let o = offset as usize;
            data.copy_from_slice(&self.regs[o..o + data.len()]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            let o = offset as usize;
            self.regs[o..o + data.len()].copy_from_slice(data);
            self.writes += 1;
        }
    }

    fn scratch() -> Arc<Mutex<Scratch>> {
        Arc::new(Mutex::new(Scratch {
            regs: [0; 16],
            writes: 0,
        }))
    }

    #[test]
    fn dispatches_with_offset_inside_device() {
        let mut bus = Bus::new();
        let dev = scratch();
        bus.insert("scratch", dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fa, &[0xab]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 0xab);
        assert_eq!(dev.lock().unwrap().regs[2], 0xab);
        assert_eq!(dev.lock().unwrap().writes, 1);
    }

    #[test]
    fn unclaimed_reads_are_all_ones_and_counted() {
        let mut bus = Bus::new();
        bus.insert("scratch", scratch(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.read(0x3f7, &mut b[..1]));
        assert!(!bus.write(0x10, &[1]));
        assert_eq!(bus.stats().unclaimed_reads.load(Ordering::Relaxed), 2);
        assert_eq!(bus.stats().unclaimed_writes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn access_straddling_the_end_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert("scratch", scratch(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut b));
        assert!(bus.read(0x3fc, &mut b));
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert("a", scratch(), 0x100, 0x10).unwrap();
        for (base, len) in [(0x100, 1), (0xf8, 0x10), (0x10f, 1), (0x0, 0x1000)] {
            let err = bus.insert("b", scratch(), base, len).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { .. }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent ranges are fine.
        bus.insert("below", scratch(), 0xf0, 0x10).unwrap();
        bus.insert("above", scratch(), 0x110, 0x10).unwrap();
    }

    #[test]
    fn empty_or_wrapping_ranges_are_rejected() {
        let mut bus = Bus::new();
        assert!(matches!(
            bus.insert("z", scratch(), 0x100, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert("w", scratch(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }
}

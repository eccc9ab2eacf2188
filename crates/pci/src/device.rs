//! The trait every PCI function implements (emulated ones such as virtio-pci, and VFIO
//! passthrough later), and the adapter that puts one of its BARs on a `devices::Bus`.
//!
//! A function is its configuration space and its BARs, nothing more: what it does with
//! them is its own business. An emulated function composes the parts of this crate — a
//! [`ConfigurationSpace`](crate::ConfigurationSpace) for the header, capabilities and BAR
//! registers, an [`Msix`](crate::Msix) for its vectors — and forwards to them; a VFIO
//! function answers most configuration reads from the host device and keeps its BAR
//! registers and MSI-X capability emulated with the same parts. Either way the VMM sees
//! the same five calls, and learns about BAR moves and MSI-X routes through
//! [`BarMapper`](crate::BarMapper) and [`MsixNotifier`](crate::MsixNotifier), which it
//! implements.

use std::sync::{Arc, Mutex};

use devices::BusDevice;

use crate::bar::{BarInfo, MoveBar};

/// A PCI function.
pub trait PciDevice: Send {
    /// A configuration read of `data.len()` bytes at `offset` (below 4096). The segment
    /// passes only 1, 2 or 4 bytes inside one dword.
    fn read_config(&mut self, offset: u16, data: &mut [u8]);

    /// A configuration write. A write that moves a decoding BAR calls `move_bar`, which
    /// applies the move or refuses it (the function then rolls the register back).
    fn write_config(&mut self, offset: u16, data: &[u8], move_bar: &mut MoveBar<'_>);

    /// The function's BARs with their sizes and kinds, each where it decodes now.
    fn bars(&self) -> Vec<BarInfo>;

    /// A read at `offset` inside BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// A write at `offset` inside BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);
}

/// One BAR of a function as a bus device: the VMM registers it on its MMIO (or port-I/O)
/// bus at the BAR's address and moves it when the [`BarMapper`](crate::BarMapper) applies
/// a move; offsets on the bus are offsets in the BAR.
pub struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: u8,
}

impl BarRegion {
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, bar: u8) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.bar, offset, data);
    }
}

/// A function whose lock was poisoned by a panic elsewhere is still a register model.
pub(crate) fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar::{Bar, BarKind};

    /// Records BAR accesses.
    #[derive(Default)]
    struct Probe {
        reads: Vec<(u8, u64, usize)>,
        writes: Vec<(u8, u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn read_config(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _offset: u16, _data: &[u8], _move_bar: &mut MoveBar<'_>) {}
        fn bars(&self) -> Vec<BarInfo> {
            vec![BarInfo {
                index: 3,
                bar: Bar {
                    kind: BarKind::Memory32,
                    size: 0x1000,
                    prefetchable: false,
                },
                address: 0xc000_0000,
            }]
        }
        fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
            self.reads.push((bar, offset, data.len()));
            data.fill(bar);
        }
        fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    #[test]
    fn bar_region_forwards_with_its_bar_number() {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mut region = BarRegion::new(probe.clone(), 3);
        let mut data = [0u8; 4];
        region.read(0x10, &mut data);
        assert_eq!(data, [3; 4]);
        region.write(0x20, &[1, 2]);
        let p = probe.lock().unwrap();
        assert_eq!(p.reads, vec![(3, 0x10, 4)]);
        assert_eq!(p.writes, vec![(3, 0x20, vec![1, 2])]);
        assert_eq!(p.bars()[0].index, 3);
    }
}

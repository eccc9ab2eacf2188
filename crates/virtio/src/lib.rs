//! Virtio devices and their transports (virtio spec v1.2), on `virtio-queue`.
//!
//! A device implements [`VirtioDevice`] and works unchanged over any transport; a transport
//! (virtio-mmio now, virtio-pci later) turns the driver's register accesses into the device
//! status state machine, feature negotiation and virtqueue set-up of spec sections 2 and 3,
//! then hands the device its queues. Nothing here knows about KVM: guest memory and the
//! eventfds for notifications and interrupts are handed in by the VMM.

pub mod block;
pub mod device;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod net;
pub mod transport;

pub use device::{
    features, status, ActivateContext, ActivateError, ConfigGeneration, DeviceNeedsReset,
    DeviceState, DirectSpawner, VirtioDevice, VirtioInterrupt, VirtioInterruptType, WorkerKind,
    WorkerSpawner,
};
pub use transport::mmio::{
    MmioError, MmioInterrupt, MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
pub use transport::TransportStats;

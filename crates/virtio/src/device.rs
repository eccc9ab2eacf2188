//! The transport-independent side of a virtio device (virtio spec v1.2 §2, §3).
//!
//! A device implements [`VirtioDevice`]: what it is (Device ID, §5), what it offers (feature
//! bits, §2.2), how many virtqueues it has and how large they may be (§2.7), and its
//! device-specific configuration space (§2.5). A transport (virtio-mmio §4.2, later virtio-pci
//! §4.1) runs the driver's side of device initialization (§3.1.1) and, when the driver sets
//! DRIVER_OK, hands the device an [`ActivateContext`]: guest memory, the negotiated features,
//! the virtqueues the driver made ready with their notification eventfds, and a
//! [`VirtioInterrupt`] to notify the driver with. From then on the device (or its worker
//! thread) owns the queues and the transport keeps only registers. A device reset (§2.4) takes
//! everything back through [`VirtioDevice::reset`].

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Feature bits reserved for the transport and the virtqueues (§6), as masks over the 64
/// feature bits a device offers.
pub mod features {
    use virtio_bindings::virtio_config as config;
    use virtio_bindings::virtio_ring as ring;

    /// §2.7.5.3: the driver may use indirect descriptors.
    pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// §2.7.7, §2.7.10: `used_event` / `avail_event` notification suppression.
    pub const VIRTIO_F_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
    /// §6: the device complies with this specification (a modern device).
    pub const VIRTIO_F_VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;
    /// §6: the device sits behind a platform IOMMU.
    pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << config::VIRTIO_F_ACCESS_PLATFORM;
    /// §2.8: packed virtqueue layout.
    pub const VIRTIO_F_RING_PACKED: u64 = 1 << config::VIRTIO_F_RING_PACKED;
    /// §6: buffers are used in the order they were made available.
    pub const VIRTIO_F_IN_ORDER: u64 = 1 << config::VIRTIO_F_IN_ORDER;
    /// §6: memory accesses need platform ordering (real hardware).
    pub const VIRTIO_F_ORDER_PLATFORM: u64 = 1 << config::VIRTIO_F_ORDER_PLATFORM;
    /// §6: the device supports single root I/O virtualization.
    pub const VIRTIO_F_SR_IOV: u64 = 1 << config::VIRTIO_F_SR_IOV;
    /// §6: available buffer notifications carry extra data.
    pub const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << config::VIRTIO_F_NOTIFICATION_DATA;
    /// §6: the notification value comes from the device's configuration.
    pub const VIRTIO_F_NOTIF_CONFIG_DATA: u64 = 1 << config::VIRTIO_F_NOTIF_CONFIG_DATA;
    /// §6: individual virtqueues can be reset.
    pub const VIRTIO_F_RING_RESET: u64 = 1 << config::VIRTIO_F_RING_RESET;
}

/// Device status bits (§2.1), as the DeviceStatus field holds them.
pub mod status {
    use virtio_bindings::virtio_config as config;

    /// The guest OS has noticed the device.
    pub const ACKNOWLEDGE: u32 = config::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u32 = config::VIRTIO_CONFIG_S_DRIVER;
    /// The driver has acknowledged the features it understands; negotiation is complete.
    pub const FEATURES_OK: u32 = config::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = config::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The device has hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = config::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The guest has given up on the device.
    pub const FAILED: u32 = config::VIRTIO_CONFIG_S_FAILED;
}

/// What a device notifies the driver about (§2.3 "Notifications").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// A configuration change notification: the device-specific configuration space changed,
    /// or the device set DEVICE_NEEDS_RESET (§2.1.2).
    Config,
    /// A used buffer notification for the virtqueue with this index.
    Queue(u16),
}

/// How a device notifies the driver. virtio-mmio has one interrupt line for everything;
/// virtio-pci will have an MSI-X vector per queue.
pub trait VirtioInterrupt: Send + Sync {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()>;
}

/// The version of the device-specific configuration space (§2.5.1, §4.2.2 ConfigGeneration).
///
/// A device whose configuration can change while the driver runs (a disk resized, a link
/// going down) keeps one of these, calls [`ConfigGeneration::bump_and_notify`] after each
/// change, and returns [`ConfigGeneration::get`] from [`VirtioDevice::config_generation`].
/// Clones share the counter, so a worker thread can hold one.
#[derive(Debug, Clone, Default)]
pub struct ConfigGeneration(Arc<AtomicU32>);

impl ConfigGeneration {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }

    /// Marks the configuration as changed; call after the change is visible to readers.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks the configuration as changed and sends the configuration change notification
    /// (§2.5: the device notifies the driver when its configuration changes).
    pub fn bump_and_notify(&self, interrupt: &dyn VirtioInterrupt) -> std::io::Result<()> {
        self.bump();
        interrupt.trigger(VirtioInterruptType::Config)
    }
}

/// Lets an activated device report an error it cannot recover from: the transport shows
/// DEVICE_NEEDS_RESET in the device status, and the driver gets a configuration change
/// notification (§2.1.2). Clones share the flag; a device reset clears it.
#[derive(Clone)]
pub struct DeviceNeedsReset {
    flag: Arc<AtomicBool>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl DeviceNeedsReset {
    pub fn new(interrupt: Arc<dyn VirtioInterrupt>) -> Self {
        Self {
            flag: Arc::new(AtomicBool::new(false)),
            interrupt,
        }
    }

    /// Sets DEVICE_NEEDS_RESET and notifies the driver (which must have set DRIVER_OK: only
    /// an activated device or a transport after DRIVER_OK calls this).
    pub fn raise(&self) -> std::io::Result<()> {
        self.flag.store(true, Ordering::Release);
        self.interrupt.trigger(VirtioInterruptType::Config)
    }

    pub fn is_raised(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Clears the flag; the transport calls this on a device reset.
    pub fn clear(&self) {
        self.flag.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for DeviceNeedsReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceNeedsReset")
            .field("raised", &self.is_raised())
            .finish_non_exhaustive()
    }
}

/// Everything a device gets when the driver sets DRIVER_OK (§3.1.1 step 8).
pub struct ActivateContext {
    /// Guest memory. A `GuestMemoryAtomic` rather than a snapshot: an activated device runs
    /// for the VM's lifetime, and `memory()` always returns the current map, so a later
    /// change of the memory map (hotplug, virtio-mem) reaches it without re-activation.
    pub mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// The features both sides agreed on (§2.2), VIRTIO_F_VERSION_1 among them.
    pub acked_features: u64,
    /// The virtqueues the driver set QueueReady on, in index order: the queue index, the
    /// queue (size, ring addresses and EVENT_IDX already set), and the eventfd its
    /// available buffer notifications arrive on.
    pub queues: Vec<(u16, Queue, EventFd)>,
    /// Used buffer and configuration change notifications to the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Reports an unrecoverable device error to the driver.
    pub needs_reset: DeviceNeedsReset,
    /// Starts the device's worker thread (the VMM's choice of creator, not the vCPU thread
    /// that wrote DRIVER_OK).
    pub spawner: Arc<dyn WorkerSpawner>,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<_> = self.queues.iter().map(|(i, q, _)| (i, q)).collect();
        f.debug_struct("ActivateContext")
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("queues", &queues)
            .finish_non_exhaustive()
    }
}

/// What a worker thread is, so the VMM can give each kind its own system-call filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    Block,
    Net,
}

impl WorkerKind {
    /// The thread's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Block => "virtio-blk",
            Self::Net => "virtio-net",
        }
    }
}

/// Starts device worker threads. The VMM hands one to every transport so that workers are
/// created by a thread it controls (a thread inherits its creator's seccomp filter, and a
/// vCPU thread is filtered too tightly to create threads), and so that each worker can
/// install its own filter before it touches guest memory.
pub trait WorkerSpawner: Send + Sync {
    /// Runs `body` on a new thread of `kind`.
    fn spawn(
        &self,
        kind: WorkerKind,
        body: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<std::thread::JoinHandle<()>>;
}

/// Starts workers directly from the calling thread (tests, and VMs without seccomp).
#[derive(Debug, Default)]
pub struct DirectSpawner;

impl WorkerSpawner for DirectSpawner {
    fn spawn(
        &self,
        kind: WorkerKind,
        body: Box<dyn FnOnce() + Send>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name(kind.name().into())
            .spawn(body)
    }
}

/// Starts a worker whose set-up (`build`) runs on the worker thread itself, so nothing of it
/// (epoll, io_uring, eventfds) happens on the activating vCPU; waits for the set-up to
/// succeed or fail and returns the thread, or the set-up's error.
pub fn start_worker<W, E>(
    spawner: &dyn WorkerSpawner,
    kind: WorkerKind,
    what: String,
    build: impl FnOnce() -> Result<W, E> + Send + 'static,
    run: impl FnOnce(W) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, ActivateError>
where
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let handle = spawner
        .spawn(
            kind,
            Box::new(move || match build() {
                Ok(w) => {
                    let _ = tx.send(Ok(()));
                    run(w);
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }),
        )
        .map_err(|source| ActivateError::Worker {
            name: what.clone(),
            source,
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(reason)) => {
            let _ = handle.join();
            Err(ActivateError::Backend { reason })
        }
        Err(_) => {
            let _ = handle.join();
            Err(ActivateError::Backend {
                reason: format!("the worker thread of {what} ended during set-up"),
            })
        }
    }
}

/// Errors while activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make ready a virtqueue the device cannot work without.
    #[error("virtqueue {index} is required but the driver did not set it ready")]
    MissingQueue { index: u16 },
    /// The device was activated twice without a reset in between.
    #[error("device is already activated")]
    AlreadyActivated,
    /// An eventfd the device needs could not be created or duplicated.
    #[error("eventfd for {purpose}: {source}")]
    EventFd {
        purpose: &'static str,
        source: std::io::Error,
    },
    /// The device's worker thread could not be started.
    #[error("starting worker thread {name}: {source}")]
    Worker {
        name: String,
        source: std::io::Error,
    },
    /// The device's backend (disk image, tap device) refused to start.
    #[error("backend: {reason}")]
    Backend { reason: String },
}

/// Where a device is in its life: before DRIVER_OK it has nothing to process; once activated
/// it holds what activation handed over (or the worker that now owns it).
#[derive(Debug, Default)]
pub enum DeviceState<T> {
    #[default]
    Inactive,
    Activated(T),
}

impl<T> DeviceState<T> {
    pub fn is_activated(&self) -> bool {
        matches!(self, Self::Activated(_))
    }

    /// The activated state, if any.
    pub fn active(&self) -> Option<&T> {
        match self {
            Self::Inactive => None,
            Self::Activated(t) => Some(t),
        }
    }

    pub fn active_mut(&mut self) -> Option<&mut T> {
        match self {
            Self::Inactive => None,
            Self::Activated(t) => Some(t),
        }
    }

    /// Returns to `Inactive`, handing back what was activated (for a reset to tear down).
    pub fn take(&mut self) -> Option<T> {
        match std::mem::take(self) {
            Self::Inactive => None,
            Self::Activated(t) => Some(t),
        }
    }
}

/// A virtio device, independent of the transport it is reached through.
pub trait VirtioDevice: Send {
    /// The Device ID (§5), e.g. 2 for a block device.
    fn device_type(&self) -> u32;

    /// The feature bits the device offers (§2.2), device-specific and reserved ones (§6)
    /// together. A modern device includes [`features::VIRTIO_F_VERSION_1`].
    fn avail_features(&self) -> u64;

    /// The maximum size of each virtqueue, indexed by queue index (§2.7: a power of two, at
    /// most 32768). The length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` bytes of the device-specific configuration space at `offset`
    /// (§2.5). Must bounds-check: an access not entirely inside the configuration space
    /// reads as zeros (the spec leaves it undefined). [`read_config_bytes`] does this.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration space at `offset` (§2.5). Must bounds-check:
    /// an access not entirely inside the configuration space, or to a field the driver may
    /// not write, is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with what the driver set up (§3.1.1 step 8). On error the transport
    /// sets DEVICE_NEEDS_RESET and the device must stay (or return to) inactive.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Returns the device to its state before activation (§2.4): stops its workers, drops its
    /// queues, memory and interrupt, and restores its configuration space. Called on every
    /// device reset, activated or not, so it must be idempotent.
    fn reset(&mut self);

    /// The current version of the configuration space (§2.5.1). Devices whose configuration
    /// never changes on their own keep the default; the others return
    /// [`ConfigGeneration::get`].
    fn config_generation(&self) -> u32 {
        0
    }
}

/// Whether the driver's available ring can be walked: an avail index more than the queue
/// size ahead of the device (or a queue no longer ready) cannot (§2.7.13.3). A worker that
/// sees this must stop using the queue and raise DEVICE_NEEDS_RESET, not poll it again.
pub fn avail_ring_is_sane<M: vm_memory::GuestMemory>(queue: &mut Queue, mem: &M) -> bool {
    use virtio_queue::QueueOwnedT;
    queue.iter(mem).is_ok()
}

/// The descriptor heads a device holds: made available by the driver and not yet returned
/// through the used ring. A driver may not make a buffer available again before the device
/// has used it (§2.7.13), so a head that is already held is a driver error, and the set
/// bounds what a device keeps in flight by the queue size.
#[derive(Debug, Clone)]
pub struct HeldHeads {
    bits: Vec<u64>,
    len: usize,
}

impl HeldHeads {
    /// A set for a queue of `size` descriptors.
    pub fn new(size: u16) -> Self {
        Self {
            bits: vec![0; usize::from(size).div_ceil(64).max(1)],
            len: 0,
        }
    }

    /// Marks `head` held; false when it already was (or is outside the queue).
    pub fn insert(&mut self, head: u16) -> bool {
        let (word, bit) = (usize::from(head) / 64, 1u64 << (head % 64));
        match self.bits.get_mut(word) {
            Some(w) if *w & bit == 0 => {
                *w |= bit;
                self.len += 1;
                true
            }
            _ => false,
        }
    }

    /// Returns `head` to the driver.
    pub fn remove(&mut self, head: u16) {
        let (word, bit) = (usize::from(head) / 64, 1u64 << (head % 64));
        if let Some(w) = self.bits.get_mut(word) {
            if *w & bit != 0 {
                *w &= !bit;
                self.len -= 1;
            }
        }
    }

    pub fn contains(&self, head: u16) -> bool {
        let (word, bit) = (usize::from(head) / 64, 1u64 << (head % 64));
        self.bits.get(word).is_some_and(|w| w & bit != 0)
    }

    /// How many heads are held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The two ends of the eventfd that stops a device's worker thread: the device keeps one,
/// the worker waits on the other.
pub fn kill_eventfds(device: &'static str) -> Result<(EventFd, EventFd), ActivateError> {
    let err = |source| ActivateError::EventFd {
        purpose: device,
        source,
    };
    let kill = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).map_err(err)?;
    let worker_end = kill.try_clone().map_err(err)?;
    Ok((kill, worker_end))
}

/// Copies `config[offset..offset + data.len()]` into `data`, or fills `data` with zeros when
/// the access is not entirely inside `config`.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    match config_range(config.len(), offset, data.len()) {
        Some(range) => data.copy_from_slice(&config[range]),
        None => data.fill(0),
    }
}

/// Copies `data` into `config` at `offset`; returns false (and changes nothing) when the
/// access is not entirely inside `config`.
pub fn write_config_bytes(config: &mut [u8], offset: u64, data: &[u8]) -> bool {
    match config_range(config.len(), offset, data.len()) {
        Some(range) => {
            config[range].copy_from_slice(data);
            true
        }
        None => false,
    }
}

fn config_range(config_len: usize, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= config_len).then_some(start..end)
}

#[cfg(test)]
mod tests {
    #[test]
    fn held_heads_refuse_a_head_twice_and_bound_the_count() {
        let mut h = super::HeldHeads::new(256);
        assert!(h.insert(0) && h.insert(255) && h.insert(64));
        assert!(!h.insert(64), "a held head cannot be made available again");
        assert!(!h.insert(256), "outside the queue");
        assert_eq!(h.len(), 3);
        h.remove(64);
        h.remove(64);
        assert_eq!(h.len(), 2);
        assert!(h.insert(64) && h.contains(255) && !h.contains(1));
        assert!((0..256).filter(|&i| h.insert(i)).count() == 253);
        assert_eq!(h.len(), 256);
    }

    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<VirtioInterruptType>>);

    impl VirtioInterrupt for Recorder {
        fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
            self.0.lock().unwrap().push(kind);
            Ok(())
        }
    }

    #[test]
    fn feature_masks_match_the_spec_bit_numbers() {
        assert_eq!(features::VIRTIO_F_INDIRECT_DESC, 1 << 28);
        assert_eq!(features::VIRTIO_F_EVENT_IDX, 1 << 29);
        assert_eq!(features::VIRTIO_F_VERSION_1, 1 << 32);
        assert_eq!(features::VIRTIO_F_ACCESS_PLATFORM, 1 << 33);
        assert_eq!(features::VIRTIO_F_RING_PACKED, 1 << 34);
        assert_eq!(features::VIRTIO_F_RING_RESET, 1 << 40);
        assert_eq!(status::DEVICE_NEEDS_RESET, 64);
        assert_eq!(status::FAILED, 128);
    }

    #[test]
    fn config_bytes_are_bounds_checked() {
        let mut config = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut d = [0xffu8; 4];
        read_config_bytes(&config, 4, &mut d);
        assert_eq!(d, [5, 6, 7, 8]);
        // Straddling the end, past the end, and offsets that overflow all read zeros.
        for offset in [5, 8, 100, u64::MAX - 1, u64::MAX] {
            let mut d = [0xffu8; 4];
            read_config_bytes(&config, offset, &mut d);
            assert_eq!(d, [0; 4], "offset {offset:#x}");
            assert!(!write_config_bytes(&mut config, offset, &[9; 4]));
        }
        assert_eq!(config, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(write_config_bytes(&mut config, 0, &[9, 9]));
        assert_eq!(config[..3], [9, 9, 3]);
        // An empty access at the end is inside.
        assert!(write_config_bytes(&mut config, 8, &[]));
    }

    #[test]
    fn config_generation_bumps_and_notifies() {
        let generation = ConfigGeneration::default();
        let shared = generation.clone();
        let irq = Recorder::default();
        assert_eq!(generation.get(), 0);
        shared.bump_and_notify(&irq).unwrap();
        assert_eq!(generation.get(), 1);
        assert_eq!(*irq.0.lock().unwrap(), [VirtioInterruptType::Config]);
    }

    #[test]
    fn needs_reset_is_shared_and_notifies() {
        let irq = Arc::new(Recorder::default());
        let transport_side = DeviceNeedsReset::new(irq.clone());
        let device_side = transport_side.clone();
        assert!(!transport_side.is_raised());
        device_side.raise().unwrap();
        assert!(transport_side.is_raised());
        assert_eq!(*irq.0.lock().unwrap(), [VirtioInterruptType::Config]);
        transport_side.clear();
        assert!(!device_side.is_raised());
    }

    #[test]
    fn device_state_take_returns_to_inactive() {
        let mut state = DeviceState::Activated(7);
        assert!(state.is_activated());
        assert_eq!(state.active(), Some(&7));
        assert_eq!(state.take(), Some(7));
        assert!(!state.is_activated());
        assert_eq!(state.take(), None);
    }
}

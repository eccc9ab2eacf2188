//! The virtio-mmio transport (virtio spec v1.2 §4.2), modern interface only (Version 2).
//!
//! [`MmioTransport`] is a register model: a vCPU's MMIO exit reaches it through the bus as a
//! read or write at an offset inside the device's window, and it answers without blocking. It
//! keeps the registers of §4.2.2 (table 4.1), runs the DeviceStatus state machine (§2.1,
//! §3.1.1), and when the driver sets DRIVER_OK hands the device the virtqueues the driver made
//! ready. From then on the device owns those queues.
//!
//! Available buffer notifications arrive on one eventfd per virtqueue. The VMM registers each
//! with KVM as an ioeventfd on [`QUEUE_NOTIFY_OFFSET`] with the queue index as datamatch
//! (§4.2.3.3: without VIRTIO_F_NOTIFICATION_DATA the value written is the queue index); a
//! QueueNotify write that still reaches the transport signals the same eventfd. Used buffer and
//! configuration change notifications go through [`MmioInterrupt`]: InterruptStatus bits plus
//! one eventfd the VMM registers as a KVM irqfd (§4.2.3.4).
//!
//! A driver access that breaks the rules is ignored, counted and logged (rate-limited). After
//! DRIVER_OK, an attempt to change the virtqueues the device already owns, or a failed
//! activation, sets DEVICE_NEEDS_RESET and sends a configuration change notification (§2.1.2).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use devices::BusDevice;
use virtio_bindings::virtio_mmio;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{TransportStats, WarnLimiter};
use crate::device::features::{
    VIRTIO_F_EVENT_IDX, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_NOTIF_CONFIG_DATA,
    VIRTIO_F_RING_PACKED, VIRTIO_F_RING_RESET, VIRTIO_F_SR_IOV, VIRTIO_F_VERSION_1,
};
use crate::device::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use crate::device::{
    ActivateContext, ActivateError, DeviceNeedsReset, DirectSpawner, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, WorkerSpawner,
};

/// MagicValue (§4.2.2): "virt" in little-endian ASCII.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version (§4.2.2): 2 is the modern interface; 1 was the legacy one (§4.2.4).
pub const VERSION: u32 = 2;
/// VendorID (§4.2.2). The spec assigns no IDs; drivers ignore it. "VIRE" in ASCII.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"VIRE");
/// Offset of QueueNotify, where the VMM registers each queue's ioeventfd (datamatch: index).
pub const QUEUE_NOTIFY_OFFSET: u64 = virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device-specific configuration space (§4.2.2 "Config").
pub const CONFIG_SPACE_OFFSET: u64 = virtio_mmio::VIRTIO_MMIO_CONFIG as u64;
/// Size of one virtio-mmio window: the registers and up to 0xf00 bytes of configuration
/// space in one page.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// The largest Queue Size of a split virtqueue (§2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

/// InterruptStatus bits (§4.2.2).
const INT_USED_BUFFER: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
const INT_CONFIG_CHANGE: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Features this transport cannot carry, whatever the device offers: packed virtqueues
/// (`virtio-queue` drives split ones), notification data (QueueNotify carries the queue index
/// only, which is what an ioeventfd datamatch needs), per-queue reset (no QueueReset register)
/// and SR-IOV (a PCI concept).
const TRANSPORT_UNSUPPORTED: u64 = VIRTIO_F_RING_PACKED
    | VIRTIO_F_NOTIFICATION_DATA
    | VIRTIO_F_NOTIF_CONFIG_DATA
    | VIRTIO_F_RING_RESET
    | VIRTIO_F_SR_IOV;

/// Register offsets, in the spec's names (§4.2.2, table 4.1).
mod reg {
    use virtio_bindings::virtio_mmio as m;

    pub const MAGIC_VALUE: u32 = m::VIRTIO_MMIO_MAGIC_VALUE;
    pub const VERSION: u32 = m::VIRTIO_MMIO_VERSION;
    pub const DEVICE_ID: u32 = m::VIRTIO_MMIO_DEVICE_ID;
    pub const VENDOR_ID: u32 = m::VIRTIO_MMIO_VENDOR_ID;
    pub const DEVICE_FEATURES: u32 = m::VIRTIO_MMIO_DEVICE_FEATURES;
    pub const DEVICE_FEATURES_SEL: u32 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL;
    pub const DRIVER_FEATURES: u32 = m::VIRTIO_MMIO_DRIVER_FEATURES;
    pub const DRIVER_FEATURES_SEL: u32 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL;
    pub const QUEUE_SEL: u32 = m::VIRTIO_MMIO_QUEUE_SEL;
    pub const QUEUE_NUM_MAX: u32 = m::VIRTIO_MMIO_QUEUE_NUM_MAX;
    pub const QUEUE_NUM: u32 = m::VIRTIO_MMIO_QUEUE_NUM;
    pub const QUEUE_READY: u32 = m::VIRTIO_MMIO_QUEUE_READY;
    pub const QUEUE_NOTIFY: u32 = m::VIRTIO_MMIO_QUEUE_NOTIFY;
    pub const INTERRUPT_STATUS: u32 = m::VIRTIO_MMIO_INTERRUPT_STATUS;
    pub const INTERRUPT_ACK: u32 = m::VIRTIO_MMIO_INTERRUPT_ACK;
    pub const STATUS: u32 = m::VIRTIO_MMIO_STATUS;
    pub const QUEUE_DESC_LOW: u32 = m::VIRTIO_MMIO_QUEUE_DESC_LOW;
    pub const QUEUE_DESC_HIGH: u32 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH;
    pub const QUEUE_DRIVER_LOW: u32 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW;
    pub const QUEUE_DRIVER_HIGH: u32 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH;
    pub const QUEUE_DEVICE_LOW: u32 = m::VIRTIO_MMIO_QUEUE_USED_LOW;
    pub const QUEUE_DEVICE_HIGH: u32 = m::VIRTIO_MMIO_QUEUE_USED_HIGH;
    pub const SHM_SEL: u32 = m::VIRTIO_MMIO_SHM_SEL;
    pub const SHM_LEN_LOW: u32 = m::VIRTIO_MMIO_SHM_LEN_LOW;
    pub const SHM_LEN_HIGH: u32 = m::VIRTIO_MMIO_SHM_LEN_HIGH;
    pub const SHM_BASE_LOW: u32 = m::VIRTIO_MMIO_SHM_BASE_LOW;
    pub const SHM_BASE_HIGH: u32 = m::VIRTIO_MMIO_SHM_BASE_HIGH;
    pub const CONFIG_GENERATION: u32 = m::VIRTIO_MMIO_CONFIG_GENERATION;
}

/// Errors of the virtio-mmio transport: building one, and the reasons it refuses a driver's
/// virtqueue set-up.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declares a virtqueue maximum that is not a valid Queue Size (§2.7).
    #[error("virtqueue {index}: maximum size {size} is not a power of two between 1 and 32768")]
    QueueMaxSize { index: usize, size: u16 },
    /// The device declares more virtqueues than a 16-bit queue index can name.
    #[error("{count} virtqueues: more than a 16-bit queue index can name")]
    TooManyQueues { count: usize },
    /// The eventfd for a virtqueue's available buffer notifications could not be created.
    #[error("virtqueue {index}: creating the notification eventfd: {source}")]
    Notifier { index: u16, source: std::io::Error },
    /// QueueNum is not a valid Queue Size for this virtqueue (§2.7, §4.2.2.2).
    #[error(
        "virtqueue {index}: QueueNum {size} is not a power of two between 1 and QueueNumMax {max}"
    )]
    QueueSize { index: u16, size: u32, max: u16 },
    /// A virtqueue part is not aligned as §2.7 requires.
    #[error("virtqueue {index}: {area} at {addr:#x} is not aligned to {align} bytes")]
    QueueAlignment {
        index: u16,
        area: &'static str,
        addr: u64,
        align: u64,
    },
    /// A virtqueue part does not lie in guest memory.
    #[error("virtqueue {index}: {area} at {addr:#x}+{len:#x} is not in guest memory")]
    QueueOutsideMemory {
        index: u16,
        area: &'static str,
        addr: u64,
        len: u64,
    },
    /// `virtio-queue` rejected a virtqueue this transport had checked.
    #[error("virtqueue {index}: rejected by virtio-queue")]
    QueueInvalid { index: u16 },
    /// A driver area at guest address 0: `virtio-queue` takes that for "not set up" and
    /// would refuse every later walk of the ring, so the queue is refused up front.
    #[error("virtqueue {index}: driver area at guest address 0 is not supported")]
    QueueDriverAreaAtZero { index: u16 },
    /// The notification eventfd could not be duplicated for the device.
    #[error("virtqueue {index}: duplicating the notification eventfd: {source}")]
    NotifierClone { index: u16, source: std::io::Error },
    /// The device refused to start.
    #[error("activating device type {device_type}: {source}")]
    Activate {
        device_type: u32,
        source: ActivateError,
    },
}

/// Notifications from a virtio-mmio device to the driver (§4.2.3.4): a bit in InterruptStatus
/// and a write to the eventfd the VMM registered as the device's irqfd.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
    stats: Arc<TransportStats>,
}

impl MmioInterrupt {
    fn new(irq: EventFd, stats: Arc<TransportStats>) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
            stats,
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The eventfd written on every notification (the device's irqfd).
    pub fn irq_eventfd(&self) -> &EventFd {
        &self.irq
    }

    /// InterruptACK: clears the acknowledged bits; undefined bits are ignored.
    fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(
            !(bits & (INT_USED_BUFFER | INT_CONFIG_CHANGE)),
            Ordering::AcqRel,
        );
    }

    /// §4.2.2.1: upon reset the device clears all bits in InterruptStatus.
    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let bit = match kind {
            VirtioInterruptType::Config => INT_CONFIG_CHANGE,
            VirtioInterruptType::Queue(_) => INT_USED_BUFFER,
        };
        // The bit is set before the irqfd fires, so the driver's handler sees it.
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        self.irq.write(1)
    }
}

impl std::fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// How far the driver has come through device initialization (§3.1.1); each stage adds one
/// DeviceStatus bit to the previous one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum InitStage {
    Reset,
    Acknowledge,
    Driver,
    FeaturesOk,
    DriverOk,
}

impl InitStage {
    const ALL: [Self; 5] = [
        Self::Reset,
        Self::Acknowledge,
        Self::Driver,
        Self::FeaturesOk,
        Self::DriverOk,
    ];
    /// All the bits the stages set.
    const MASK: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

    /// The DeviceStatus bits of this stage.
    fn bits(self) -> u32 {
        match self {
            Self::Reset => 0,
            Self::Acknowledge => ACKNOWLEDGE,
            Self::Driver => ACKNOWLEDGE | DRIVER,
            Self::FeaturesOk => ACKNOWLEDGE | DRIVER | FEATURES_OK,
            Self::DriverOk => ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        }
    }

    /// The stage whose bits are exactly `bits`, if the bits form one.
    fn from_bits(bits: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|stage| stage.bits() == bits)
    }

    fn next(self) -> Option<Self> {
        match self {
            Self::Reset => Some(Self::Acknowledge),
            Self::Acknowledge => Some(Self::Driver),
            Self::Driver => Some(Self::FeaturesOk),
            Self::FeaturesOk => Some(Self::DriverOk),
            Self::DriverOk => None,
        }
    }
}

/// The per-queue registers selected by QueueSel, as the driver wrote them. They are checked
/// when the driver sets QueueReady and turned into a `virtio_queue::Queue` on DRIVER_OK.
struct QueueRegisters {
    /// QueueNumMax.
    max_size: u16,
    /// QueueNum as written (32 bits, so an oversized value is seen, not truncated).
    size: u32,
    /// QueueReady.
    ready: bool,
    /// QueueDescLow/High.
    desc_table: u64,
    /// QueueDriverLow/High: the available ring.
    driver_area: u64,
    /// QueueDeviceLow/High: the used ring.
    device_area: u64,
    /// Signalled on QueueNotify for this queue (by KVM, or by the transport as a fallback).
    notifier: EventFd,
}

impl QueueRegisters {
    fn new(max_size: u16, notifier: EventFd) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            desc_table: 0,
            driver_area: 0,
            device_area: 0,
            notifier,
        }
    }

    /// Back to the values after a device reset (§4.2.2.1: QueueReady cleared).
    fn reset(&mut self) {
        self.size = u32::from(self.max_size);
        self.ready = false;
        self.desc_table = 0;
        self.driver_area = 0;
        self.device_area = 0;
        // Notifications left over from before the reset must not wake the next activation.
        // One read takes the whole count; with nothing pending it fails with EAGAIN.
        let _ = self.notifier.read();
    }

    /// The queue these registers describe, checked against guest memory: QueueNum a power of
    /// two no larger than QueueNumMax, each part aligned and inside memory (§2.7).
    fn build(
        &self,
        index: u16,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, MmioError> {
        let bad_size = || MmioError::QueueSize {
            index,
            size: self.size,
            max: self.max_size,
        };
        let size = u16::try_from(self.size).map_err(|_| bad_size())?;
        let mut queue = Queue::new(self.max_size).map_err(|_| bad_size())?;
        queue.try_set_size(size).map_err(|_| bad_size())?;

        if self.driver_area == 0 {
            return Err(MmioError::QueueDriverAreaAtZero { index });
        }
        let misaligned = |area, addr, align| MmioError::QueueAlignment {
            index,
            area,
            addr,
            align,
        };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| misaligned("descriptor table", self.desc_table, 16))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver_area))
            .map_err(|_| misaligned("driver area", self.driver_area, 2))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device_area))
            .map_err(|_| misaligned("device area", self.device_area, 4))?;

        // Part sizes of a split virtqueue (§2.7), the used event / avail event fields included.
        let n = u64::from(size);
        let parts = [
            ("descriptor table", self.desc_table, 16 * n),
            ("driver area", self.driver_area, 6 + 2 * n),
            ("device area", self.device_area, 6 + 8 * n),
        ];
        for (area, addr, len) in parts {
            let inside = usize::try_from(len)
                .is_ok_and(|len| GuestMemoryBackend::check_range(mem, GuestAddress(addr), len));
            if !inside {
                return Err(MmioError::QueueOutsideMemory {
                    index,
                    area,
                    addr,
                    len,
                });
            }
        }

        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(MmioError::QueueInvalid { index });
        }
        Ok(queue)
    }
}

/// The queue registers the driver writes while setting up a virtqueue (§4.2.3.2).
#[derive(Debug, Clone, Copy)]
enum QueueField {
    Num,
    DescLow,
    DescHigh,
    DriverLow,
    DriverHigh,
    DeviceLow,
    DeviceHigh,
}

impl QueueField {
    fn name(self) -> &'static str {
        match self {
            Self::Num => "QueueNum",
            Self::DescLow => "QueueDescLow",
            Self::DescHigh => "QueueDescHigh",
            Self::DriverLow => "QueueDriverLow",
            Self::DriverHigh => "QueueDriverHigh",
            Self::DeviceLow => "QueueDeviceLow",
            Self::DeviceHigh => "QueueDeviceHigh",
        }
    }

    fn apply(self, queue: &mut QueueRegisters, value: u32) {
        fn low(reg: &mut u64, value: u32) {
            *reg = (*reg & !0xffff_ffff) | u64::from(value);
        }
        fn high(reg: &mut u64, value: u32) {
            *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
        }
        match self {
            Self::Num => queue.size = value,
            Self::DescLow => low(&mut queue.desc_table, value),
            Self::DescHigh => high(&mut queue.desc_table, value),
            Self::DriverLow => low(&mut queue.driver_area, value),
            Self::DriverHigh => high(&mut queue.driver_area, value),
            Self::DeviceLow => low(&mut queue.device_area, value),
            Self::DeviceHigh => high(&mut queue.device_area, value),
        }
    }
}

/// Counts a driver error and logs it, rate-limited.
macro_rules! driver_error {
    ($transport:expr, $($arg:tt)+) => {{
        $transport.stats.driver_errors.fetch_add(1, Ordering::Relaxed);
        if $transport.warn.allow() {
            tracing::warn!(device_type = $transport.device_type, $($arg)+);
        }
    }};
}

/// A virtio device behind the virtio-mmio register interface (§4.2).
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    device_type: u32,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<MmioInterrupt>,
    needs_reset: DeviceNeedsReset,
    stats: Arc<TransportStats>,
    /// DeviceStatus: the initialization stage plus FAILED; DEVICE_NEEDS_RESET lives in
    /// `needs_reset`, which the device can raise too.
    stage: InitStage,
    failed: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    /// DriverFeatures pages 0 and 1.
    driver_features: u64,
    /// The driver set a bit in a DriverFeatures page above 1: a feature nobody offered.
    driver_features_beyond_64: bool,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    /// Driver writes to the configuration space, part of ConfigGeneration.
    config_writes: u32,
    warn: WarnLimiter,
    /// Starts the device's workers at activation.
    spawner: Arc<dyn WorkerSpawner>,
}

impl MmioTransport {
    /// Puts `device` behind virtio-mmio registers. `irq` is written on every notification to
    /// the driver; the VMM registers it (or a clone) as the device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.len() > usize::from(u16::MAX) + 1 {
            return Err(MmioError::TooManyQueues {
                count: max_sizes.len(),
            });
        }
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(MmioError::QueueMaxSize { index, size });
            }
            let index = index as u16; // fits: the count was checked above
            let notifier = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| MmioError::Notifier { index, source })?;
            queues.push(QueueRegisters::new(size, notifier));
        }
        let unsupported = device.avail_features() & TRANSPORT_UNSUPPORTED;
        if unsupported != 0 {
            tracing::debug!(
                device_type = device.device_type(),
                "virtio-mmio does not offer features {unsupported:#x} of the device"
            );
        }
        let stats = Arc::new(TransportStats::default());
        let interrupt = Arc::new(MmioInterrupt::new(irq, stats.clone()));
        let needs_reset = DeviceNeedsReset::new(interrupt.clone());
        Ok(Self {
            device_type: device.device_type(),
            device,
            mem,
            interrupt,
            needs_reset,
            stats,
            stage: InitStage::Reset,
            failed: false,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            driver_features_beyond_64: false,
            queue_sel: 0,
            queues,
            config_writes: 0,
            warn: WarnLimiter::default(),
            spawner: Arc::new(DirectSpawner),
        })
    }

    /// Has the device's workers started by `spawner` (by default, directly from the thread
    /// that activates the device).
    pub fn with_spawner(mut self, spawner: Arc<dyn WorkerSpawner>) -> Self {
        self.spawner = spawner;
        self
    }

    /// Each virtqueue's index and the eventfd its available buffer notifications go to: the
    /// VMM registers each as a KVM ioeventfd on [`QUEUE_NOTIFY_OFFSET`] with the index as
    /// datamatch. The eventfds stay the same across device resets.
    pub fn queue_notifiers(&self) -> Vec<(u16, &EventFd)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(index, queue)| (index as u16, &queue.notifier))
            .collect()
    }

    /// The eventfd written on every notification to the driver.
    pub fn interrupt_eventfd(&self) -> &EventFd {
        self.interrupt.irq_eventfd()
    }

    /// The DeviceStatus register (§2.1).
    pub fn device_status(&self) -> u32 {
        let mut status = self.stage.bits();
        if self.failed {
            status |= FAILED;
        }
        if self.needs_reset.is_raised() {
            status |= DEVICE_NEEDS_RESET;
        }
        status
    }

    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The transport's counters, for a reader that does not take the device lock.
    pub fn stats(&self) -> Arc<TransportStats> {
        Arc::clone(&self.stats)
    }

    /// The features offered in DeviceFeatures: the device's, less what this transport cannot
    /// carry, and always VIRTIO_F_VERSION_1 (this is the modern interface, §6.2).
    fn offered_features(&self) -> u64 {
        (self.device.avail_features() & !TRANSPORT_UNSUPPORTED) | VIRTIO_F_VERSION_1
    }

    fn config_generation(&self) -> u32 {
        self.device
            .config_generation()
            .wrapping_add(self.config_writes)
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn read_register(&self, offset: u32) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            // 0 for a queue that does not exist (§4.2.2).
            reg::QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.max_size)),
            reg::QUEUE_READY => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.device_status(),
            // No shared memory regions: every SHMSel reads as absent, a length of -1
            // (§4.2.2); the base is all ones too.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation(),
            // Write-only registers (which the driver MUST NOT read, §4.2.2.2), the legacy
            // ones (§4.2.4), QueueReset (VIRTIO_F_RING_RESET is not offered) and the gaps.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => self.write_queue_field(QueueField::Num, value),
            reg::QUEUE_READY => self.write_queue_ready(value),
            reg::QUEUE_NOTIFY => self.queue_notify(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => self.write_queue_field(QueueField::DescLow, value),
            reg::QUEUE_DESC_HIGH => self.write_queue_field(QueueField::DescHigh, value),
            reg::QUEUE_DRIVER_LOW => self.write_queue_field(QueueField::DriverLow, value),
            reg::QUEUE_DRIVER_HIGH => self.write_queue_field(QueueField::DriverHigh, value),
            reg::QUEUE_DEVICE_LOW => self.write_queue_field(QueueField::DeviceLow, value),
            reg::QUEUE_DEVICE_HIGH => self.write_queue_field(QueueField::DeviceHigh, value),
            // Selects nothing: there are no shared memory regions.
            reg::SHM_SEL => {}
            reg::MAGIC_VALUE
            | reg::VERSION
            | reg::DEVICE_ID
            | reg::VENDOR_ID
            | reg::DEVICE_FEATURES
            | reg::QUEUE_NUM_MAX
            | reg::INTERRUPT_STATUS
            | reg::SHM_LEN_LOW
            | reg::SHM_LEN_HIGH
            | reg::SHM_BASE_LOW
            | reg::SHM_BASE_HIGH
            | reg::CONFIG_GENERATION => {
                driver_error!(
                    self,
                    "write of {value:#x} to read-only register {offset:#x} ignored (§4.2.2.2)"
                )
            }
            _ => driver_error!(
                self,
                "write of {value:#x} to undefined register {offset:#x} ignored"
            ),
        }
    }

    /// DriverFeatures: only between DRIVER and FEATURES_OK (§3.1.1 step 4); later writes are
    /// ignored, so negotiated features cannot change under an accepted FEATURES_OK.
    fn write_driver_features(&mut self, value: u32) {
        if self.stage != InitStage::Driver || self.failed {
            driver_error!(
                self,
                "DriverFeatures write in DeviceStatus {:#x} ignored: only after DRIVER and before FEATURES_OK (§3.1.1)",
                self.device_status()
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value),
            1 => {
                self.driver_features =
                    (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
            }
            _ => self.driver_features_beyond_64 |= value != 0,
        }
    }

    /// The feature check behind FEATURES_OK (§2.2.1, §2.2.2, §6.2): the driver accepted only
    /// offered features, VIRTIO_F_VERSION_1 among them.
    fn features_acceptable(&mut self) -> bool {
        let unoffered = self.driver_features & !self.offered_features();
        if unoffered != 0 || self.driver_features_beyond_64 {
            driver_error!(
                self,
                "FEATURES_OK refused: the driver accepted features {unoffered:#x} (or bits above 63) the device did not offer (§2.2.1)"
            );
            false
        } else if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            driver_error!(
                self,
                "FEATURES_OK refused: the driver did not accept VIRTIO_F_VERSION_1, and this transport is modern only (§6.2)"
            );
            false
        } else {
            true
        }
    }

    /// A Status write (§2.1, §3.1.1). 0 resets the device. Otherwise the driver may add the
    /// next initialization bits in order (several at once, as some firmware writes
    /// ACKNOWLEDGE | DRIVER), or set FAILED; it may not clear bits (§2.1.1). DEVICE_NEEDS_RESET
    /// belongs to the device: drivers write back what they read, so it is masked off.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let value = value & !DEVICE_NEEDS_RESET;
        let current = self.stage.bits();
        if value & FAILED != 0 {
            // The driver gave up on the device (§2.1); honoured whatever else the write says.
            // Only a reset brings the device back.
            self.failed = true;
            if value & !FAILED != current {
                driver_error!(
                    self,
                    "Status {value:#x}: FAILED set, the other bits ignored (status was {current:#x})"
                );
            }
            return;
        }
        let target = InitStage::from_bits(value & InitStage::MASK)
            .filter(|target| value & !InitStage::MASK == 0 && *target >= self.stage);
        let Some(target) = target else {
            driver_error!(
                self,
                "Status {value:#x} ignored: from {current:#x} it is not a step of §3.1.1 (drivers add bits in order and never clear one, §2.1.1)"
            );
            return;
        };
        if target == self.stage {
            return;
        }
        if self.failed || self.needs_reset.is_raised() {
            driver_error!(
                self,
                "Status {value:#x} ignored: the device status is {:#x} and needs a reset first",
                self.device_status()
            );
            return;
        }
        while self.stage < target {
            let Some(next) = self.stage.next() else { break };
            if !self.enter(next) {
                break;
            }
        }
    }

    /// Moves to the next initialization stage; false if the device refuses it.
    fn enter(&mut self, next: InitStage) -> bool {
        match next {
            InitStage::FeaturesOk if !self.features_acceptable() => false,
            InitStage::DriverOk => {
                self.stage = next;
                if let Err(e) = self.activate() {
                    self.needs_reset_after_driver_ok(&e);
                }
                true
            }
            _ => {
                self.stage = next;
                true
            }
        }
    }

    /// DRIVER_OK: hands the ready virtqueues to the device (§3.1.1 step 8). Each queue is
    /// checked again, as guest memory may have changed since QueueReady.
    fn activate(&mut self) -> Result<(), MmioError> {
        let event_idx = self.driver_features & VIRTIO_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        {
            let mem = self.mem.memory();
            for (index, regs) in self.queues.iter().enumerate() {
                if !regs.ready {
                    continue;
                }
                let index = index as u16; // fits: checked in `new`
                let queue = regs.build(index, &mem, event_idx)?;
                let notifier = regs
                    .notifier
                    .try_clone()
                    .map_err(|source| MmioError::NotifierClone { index, source })?;
                queues.push((index, queue, notifier));
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.driver_features,
            queues,
            interrupt: self.interrupt.clone(),
            needs_reset: self.needs_reset.clone(),
            spawner: self.spawner.clone(),
        };
        self.device
            .activate(ctx)
            .map_err(|source| MmioError::Activate {
                device_type: self.device_type,
                source,
            })
    }

    /// A spec violation after DRIVER_OK, or a failed activation: DEVICE_NEEDS_RESET and a
    /// configuration change notification (§2.1.2).
    fn needs_reset_after_driver_ok(&mut self, reason: &dyn std::fmt::Display) {
        driver_error!(self, "device needs reset: {reason}");
        if self.needs_reset.is_raised() {
            return;
        }
        if let Err(e) = self.needs_reset.raise() {
            tracing::warn!(
                device_type = self.device_type,
                "configuration change notification: {e}"
            );
        }
    }

    /// Whether the driver may set up virtqueues now: after FEATURES_OK and before DRIVER_OK
    /// (§3.1.1 step 7). After DRIVER_OK the device owns the queues, so trying is a violation.
    fn queue_setup_allowed(&mut self, what: &str, index: u16) -> bool {
        if self.failed || self.needs_reset.is_raised() {
            driver_error!(
                self,
                "{what} for virtqueue {index} ignored in DeviceStatus {:#x}",
                self.device_status()
            );
            return false;
        }
        match self.stage {
            InitStage::FeaturesOk => true,
            InitStage::DriverOk => {
                self.needs_reset_after_driver_ok(&format_args!(
                    "{what} for virtqueue {index} after DRIVER_OK"
                ));
                false
            }
            _ => {
                driver_error!(
                    self,
                    "{what} for virtqueue {index} ignored: virtqueues are set up after FEATURES_OK (§3.1.1)"
                );
                false
            }
        }
    }

    /// The selected queue's index, or a logged driver error when QueueSel names none.
    fn selected_index(&mut self, what: &str) -> Option<u16> {
        if self.selected_queue().is_some() {
            return Some(self.queue_sel as u16);
        }
        driver_error!(
            self,
            "{what} ignored: QueueSel {} names no virtqueue",
            self.queue_sel
        );
        None
    }

    /// QueueNum and the ring addresses (§4.2.3.2): ignored while the queue is ready
    /// (§4.2.2.2: the driver MUST NOT access them then).
    fn write_queue_field(&mut self, field: QueueField, value: u32) {
        let Some(index) = self.selected_index(field.name()) else {
            return;
        };
        if self.queues[usize::from(index)].ready {
            driver_error!(
                self,
                "{} for virtqueue {index} ignored: the queue is ready (§4.2.2.2)",
                field.name()
            );
            return;
        }
        if self.queue_setup_allowed(field.name(), index) {
            field.apply(&mut self.queues[usize::from(index)], value);
        }
    }

    /// QueueReady (§4.2.2): 1 makes the queue ready if QueueNum and the ring addresses pass
    /// the checks of §2.7 (otherwise it stays 0, which the driver can read back); 0 stops it.
    fn write_queue_ready(&mut self, value: u32) {
        let Some(index) = self.selected_index("QueueReady") else {
            return;
        };
        let i = usize::from(index);
        match value {
            1 if self.queues[i].ready => {}
            1 => {
                if !self.queue_setup_allowed("QueueReady", index) {
                    return;
                }
                let checked = self.queues[i].build(index, &self.mem.memory(), false);
                match checked {
                    Ok(_) => self.queues[i].ready = true,
                    Err(e) => driver_error!(self, "QueueReady refused: {e}"),
                }
            }
            0 if !self.queues[i].ready => {}
            0 if self.stage == InitStage::DriverOk => {
                // The device owns the queue and has no way to give back one queue: stop the
                // whole device so that nothing touches a queue whose QueueReady reads 0
                // (§4.2.2.1), and ask the driver for a reset.
                self.device.reset();
                self.queues[i].ready = false;
                self.needs_reset_after_driver_ok(&format_args!(
                    "QueueReady 0 for virtqueue {index} after DRIVER_OK; device stopped"
                ));
            }
            0 => self.queues[i].ready = false,
            _ => driver_error!(
                self,
                "QueueReady {value:#x} for virtqueue {index} ignored: only 0 and 1 are defined"
            ),
        }
    }

    /// QueueNotify (§4.2.3.3) that reached the transport rather than an ioeventfd.
    fn queue_notify(&mut self, value: u32) {
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        if self.stage != InitStage::DriverOk {
            driver_error!(
                self,
                "QueueNotify {value} ignored: the driver MUST NOT notify before DRIVER_OK (§3.1.1)"
            );
            return;
        }
        let queue = usize::try_from(value)
            .ok()
            .and_then(|index| self.queues.get(index))
            .filter(|queue| queue.ready);
        match queue {
            Some(queue) => {
                if let Err(e) = queue.notifier.write(1) {
                    tracing::warn!(
                        device_type = self.device_type,
                        "virtqueue {value} notification: {e}"
                    );
                }
            }
            None => driver_error!(self, "QueueNotify {value} ignored: no such ready virtqueue"),
        }
    }

    /// Device reset (§2.4, §4.2.3.1): the device stops and drops its queues; status,
    /// features, queue registers and InterruptStatus return to their initial values.
    fn reset(&mut self) {
        self.device.reset();
        self.stage = InitStage::Reset;
        self.failed = false;
        self.needs_reset.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_beyond_64 = false;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            queue.reset();
        }
        self.interrupt.clear();
    }

    /// The device-specific configuration space (§4.2.2 "Config"): 8, 16, 32 and 64-bit
    /// accesses (§4.2.2.2); the device bounds-checks the offset.
    fn config_width_ok(&mut self, offset: u64, len: usize) -> bool {
        if matches!(len, 1 | 2 | 4 | 8) {
            return true;
        }
        driver_error!(
            self,
            "{len}-byte access to configuration space offset {offset:#x} ignored"
        );
        false
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(config_offset) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
            if self.config_width_ok(config_offset, data.len()) {
                self.device.read_config(config_offset, data);
            } else {
                data.fill(0);
            }
            return;
        }
        // Registers: 32-bit wide and aligned only (§4.2.2.2).
        if data.len() == 4 && offset % 4 == 0 {
            let value = self.read_register(offset as u32);
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0);
            driver_error!(
                self,
                "{}-byte read of register {offset:#x} ignored: registers are 32-bit (§4.2.2.2)",
                data.len()
            );
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(config_offset) = offset.checked_sub(CONFIG_SPACE_OFFSET) {
            if self.config_width_ok(config_offset, data.len()) {
                self.device.write_config(config_offset, data);
                self.config_writes = self.config_writes.wrapping_add(1);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => {
                self.write_register(offset as u32, u32::from_le_bytes(bytes))
            }
            _ => driver_error!(
                self,
                "{}-byte write to register {offset:#x} ignored: registers are 32-bit (§4.2.2.2)",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{read_config_bytes, write_config_bytes, ConfigGeneration, DeviceState};
    use std::sync::{Mutex, MutexGuard};

    const RAM_SIZE: u64 = 0x10_0000;
    const DEVICE_TYPE: u32 = 2;
    /// A device-specific feature bit, for negotiation tests.
    const F_DEVICE: u64 = 1 << 5;
    const DEVICE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | F_DEVICE;
    const MAX_SIZES: [u16; 3] = [256, 128, 64];
    const FEATURES_OK_STATUS: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK;
    const DRIVER_OK_STATUS: u32 = FEATURES_OK_STATUS | DRIVER_OK;

    /// A queue as the device received it on activation.
    #[derive(Debug, PartialEq, Eq)]
    struct QueueSeen {
        index: u16,
        size: u16,
        desc_table: u64,
        driver_area: u64,
        device_area: u64,
        event_idx: bool,
    }

    /// What the transport did to the mock device.
    #[derive(Default)]
    struct Calls {
        activations: Vec<(u64, Vec<QueueSeen>)>,
        resets: usize,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        needs_reset: Option<DeviceNeedsReset>,
    }

    struct MockDevice {
        calls: Arc<Mutex<Calls>>,
        config: [u8; 16],
        generation: ConfigGeneration,
        /// Once activated, the device holds its queues' notifiers.
        state: DeviceState<Vec<EventFd>>,
        fail_activation: bool,
    }

    impl VirtioDevice for MockDevice {
        fn device_type(&self) -> u32 {
            DEVICE_TYPE
        }
        fn avail_features(&self) -> u64 {
            // RING_PACKED is offered by the device but not carried by the transport.
            DEVICE_FEATURES | VIRTIO_F_RING_PACKED
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &MAX_SIZES
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            write_config_bytes(&mut self.config, offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.state.is_activated() {
                return Err(ActivateError::AlreadyActivated);
            }
            if self.fail_activation {
                return Err(ActivateError::Backend {
                    reason: "mock backend refuses".into(),
                });
            }
            let seen = ctx
                .queues
                .iter()
                .map(|(index, queue, _)| {
                    assert!(queue.ready());
                    QueueSeen {
                        index: *index,
                        size: queue.size(),
                        desc_table: queue.desc_table(),
                        driver_area: queue.avail_ring(),
                        device_area: queue.used_ring(),
                        event_idx: queue.event_idx_enabled(),
                    }
                })
                .collect();
            let mut calls = self.calls.lock().unwrap();
            calls.activations.push((ctx.acked_features, seen));
            calls.interrupt = Some(ctx.interrupt.clone());
            calls.needs_reset = Some(ctx.needs_reset.clone());
            self.state = DeviceState::Activated(ctx.queues.into_iter().map(|q| q.2).collect());
            Ok(())
        }
        fn reset(&mut self) {
            self.state.take();
            self.calls.lock().unwrap().resets += 1;
        }
        fn config_generation(&self) -> u32 {
            self.generation.get()
        }
    }

    struct Harness {
        t: MmioTransport,
        calls: Arc<Mutex<Calls>>,
        irq: EventFd,
        generation: ConfigGeneration,
    }

    fn harness() -> Harness {
        harness_with(false)
    }

    fn harness_with(fail_activation: bool) -> Harness {
        let mem =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap();
        let calls = Arc::default();
        let generation = ConfigGeneration::default();
        let device = MockDevice {
            calls: Arc::clone(&calls),
            config: std::array::from_fn(|i| i as u8),
            generation: generation.clone(),
            state: DeviceState::Inactive,
            fail_activation,
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Box::new(device),
            GuestMemoryAtomic::new(mem),
            irq.try_clone().unwrap(),
        )
        .unwrap();
        Harness {
            t,
            calls,
            irq,
            generation,
        }
    }

    impl Harness {
        fn read(&mut self, offset: u32) -> u32 {
            let mut data = [0u8; 4];
            self.t.read(u64::from(offset), &mut data);
            u32::from_le_bytes(data)
        }

        fn write(&mut self, offset: u32, value: u32) {
            self.t.write(u64::from(offset), &value.to_le_bytes());
        }

        fn status(&mut self) -> u32 {
            self.read(reg::STATUS)
        }

        fn set_status(&mut self, value: u32) {
            self.write(reg::STATUS, value);
        }

        fn device_features(&mut self) -> u64 {
            self.write(reg::DEVICE_FEATURES_SEL, 0);
            let low = self.read(reg::DEVICE_FEATURES);
            self.write(reg::DEVICE_FEATURES_SEL, 1);
            let high = self.read(reg::DEVICE_FEATURES);
            u64::from(high) << 32 | u64::from(low)
        }

        fn write_driver_features(&mut self, features: u64) {
            self.write(reg::DRIVER_FEATURES_SEL, 0);
            self.write(reg::DRIVER_FEATURES, features as u32);
            self.write(reg::DRIVER_FEATURES_SEL, 1);
            self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        }

        /// Reset, ACKNOWLEDGE, DRIVER, DriverFeatures, FEATURES_OK (§3.1.1 steps 1-5);
        /// returns the status the driver reads back (step 6).
        fn negotiate(&mut self, features: u64) -> u32 {
            self.set_status(0);
            self.set_status(ACKNOWLEDGE);
            self.set_status(ACKNOWLEDGE | DRIVER);
            self.write_driver_features(features);
            self.set_status(FEATURES_OK_STATUS);
            self.status()
        }

        /// Virtqueue configuration (§4.2.3.2); returns QueueReady as read back.
        fn setup_queue(
            &mut self,
            index: u32,
            size: u32,
            desc: u64,
            driver: u64,
            device: u64,
        ) -> bool {
            self.write(reg::QUEUE_SEL, index);
            self.write(reg::QUEUE_NUM, size);
            self.write(reg::QUEUE_DESC_LOW, desc as u32);
            self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
            self.write(reg::QUEUE_DRIVER_LOW, driver as u32);
            self.write(reg::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
            self.write(reg::QUEUE_DEVICE_LOW, device as u32);
            self.write(reg::QUEUE_DEVICE_HIGH, (device >> 32) as u32);
            self.write(reg::QUEUE_READY, 1);
            self.read(reg::QUEUE_READY) == 1
        }

        /// A valid layout for queue `index` with `size` entries.
        fn setup_standard_queue(&mut self, index: u32, size: u32) -> bool {
            let (desc, driver, device) = standard_layout(index);
            self.setup_queue(index, size, desc, driver, device)
        }

        /// Negotiates `features`, sets up queues 0 and 2 (not 1) and sets DRIVER_OK.
        fn bring_up(&mut self, features: u64) {
            assert_eq!(self.negotiate(features), FEATURES_OK_STATUS);
            assert!(self.setup_standard_queue(0, 16));
            assert!(self.setup_standard_queue(2, 64));
            self.set_status(DRIVER_OK_STATUS);
        }

        fn calls(&self) -> MutexGuard<'_, Calls> {
            self.calls.lock().unwrap()
        }

        /// How often the irqfd fired since the last call.
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
    }

    fn standard_layout(index: u32) -> (u64, u64, u64) {
        let base = 0x1_0000 * u64::from(index + 1);
        (base, base + 0x1000, base + 0x2000)
    }

    fn seen(index: u16, size: u16, event_idx: bool) -> QueueSeen {
        let (desc_table, driver_area, device_area) = standard_layout(u32::from(index));
        QueueSeen {
            index,
            size,
            desc_table,
            driver_area,
            device_area,
            event_idx,
        }
    }

    #[test]
    fn identification_registers() {
        let mut h = harness();
        assert_eq!(h.read(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(h.read(reg::VERSION), 2);
        assert_eq!(h.read(reg::DEVICE_ID), DEVICE_TYPE);
        assert_eq!(h.read(reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(h.read(reg::STATUS), 0);
        assert_eq!(h.read(reg::CONFIG_GENERATION), 0);
        for (index, max) in MAX_SIZES.iter().enumerate() {
            h.write(reg::QUEUE_SEL, index as u32);
            assert_eq!(h.read(reg::QUEUE_NUM_MAX), u32::from(*max));
            assert_eq!(h.read(reg::QUEUE_READY), 0);
        }
        // A queue that does not exist has QueueNumMax 0 (§4.2.2).
        for sel in [3, 0xffff, u32::MAX] {
            h.write(reg::QUEUE_SEL, sel);
            assert_eq!(h.read(reg::QUEUE_NUM_MAX), 0);
            assert_eq!(h.read(reg::QUEUE_READY), 0);
        }
        assert_eq!(QUEUE_NOTIFY_OFFSET, 0x50);
        assert_eq!(CONFIG_SPACE_OFFSET, 0x100);
        assert_eq!(h.t.device_type(), DEVICE_TYPE);
    }

    #[test]
    fn read_only_registers_ignore_writes_and_write_only_ones_read_zero() {
        let mut h = harness();
        h.write(reg::MAGIC_VALUE, 0);
        h.write(reg::VERSION, 1);
        h.write(reg::DEVICE_ID, 9);
        h.write(reg::QUEUE_NUM_MAX, 2);
        h.write(reg::INTERRUPT_STATUS, 3);
        h.write(reg::CONFIG_GENERATION, 7);
        assert_eq!(h.read(reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(h.read(reg::VERSION), 2);
        assert_eq!(h.read(reg::DEVICE_ID), DEVICE_TYPE);
        assert_eq!(h.read(reg::QUEUE_NUM_MAX), 256);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
        assert_eq!(h.read(reg::CONFIG_GENERATION), 0);
        h.write(reg::QUEUE_SEL, 1);
        h.write(reg::DEVICE_FEATURES_SEL, 1);
        for offset in [
            reg::DEVICE_FEATURES_SEL,
            reg::DRIVER_FEATURES,
            reg::DRIVER_FEATURES_SEL,
            reg::QUEUE_SEL,
            reg::QUEUE_NUM,
            reg::QUEUE_NOTIFY,
            reg::INTERRUPT_ACK,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DEVICE_HIGH,
            reg::SHM_SEL,
        ] {
            assert_eq!(h.read(offset), 0, "register {offset:#x}");
        }
        assert!(h.t.stats().driver_errors.load(Ordering::Relaxed) >= 6);
    }

    #[test]
    fn device_features_come_in_32_bit_pages() {
        let mut h = harness();
        let offered = h.device_features();
        // The transport drops what it cannot carry (packed virtqueues) and keeps the rest.
        assert_eq!(offered, DEVICE_FEATURES);
        h.write(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            h.read(reg::DEVICE_FEATURES),
            (VIRTIO_F_EVENT_IDX | F_DEVICE) as u32
        );
        h.write(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            h.read(reg::DEVICE_FEATURES),
            1,
            "VIRTIO_F_VERSION_1 is bit 32"
        );
        for page in [2, 3, u32::MAX] {
            h.write(reg::DEVICE_FEATURES_SEL, page);
            assert_eq!(h.read(reg::DEVICE_FEATURES), 0);
        }
    }

    #[test]
    fn features_ok_is_refused_for_features_not_offered() {
        let mut h = harness();
        let status = h.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_RING_PACKED);
        assert_eq!(
            status,
            ACKNOWLEDGE | DRIVER,
            "FEATURES_OK must read back clear"
        );
        let status = h.negotiate(VIRTIO_F_VERSION_1 | 1 << 63);
        assert_eq!(status, ACKNOWLEDGE | DRIVER);
        // A bit in a page above 63 is a feature nobody offered either.
        h.negotiate(0);
        h.write_driver_features(VIRTIO_F_VERSION_1);
        h.write(reg::DRIVER_FEATURES_SEL, 2);
        h.write(reg::DRIVER_FEATURES, 1);
        h.set_status(FEATURES_OK_STATUS);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        // DRIVER_OK without FEATURES_OK is not a legal step.
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        assert!(h.calls().activations.is_empty());
        // The offered subset is accepted.
        assert_eq!(h.negotiate(DEVICE_FEATURES), FEATURES_OK_STATUS);
        assert_eq!(h.negotiate(VIRTIO_F_VERSION_1), FEATURES_OK_STATUS);
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let mut h = harness();
        assert_eq!(h.negotiate(0), ACKNOWLEDGE | DRIVER);
        assert_eq!(
            h.negotiate(F_DEVICE | VIRTIO_F_EVENT_IDX),
            ACKNOWLEDGE | DRIVER
        );
        // The driver may fix its selection and try again (§3.1.1 step 6 failing is not final).
        h.write_driver_features(VIRTIO_F_VERSION_1 | F_DEVICE);
        h.set_status(FEATURES_OK_STATUS);
        assert_eq!(h.status(), FEATURES_OK_STATUS);
    }

    #[test]
    fn feature_writes_outside_negotiation_are_ignored() {
        let mut h = harness();
        // Before DRIVER.
        h.set_status(ACKNOWLEDGE);
        h.write_driver_features(VIRTIO_F_VERSION_1 | F_DEVICE);
        h.set_status(ACKNOWLEDGE | DRIVER);
        h.set_status(FEATURES_OK_STATUS);
        assert_eq!(
            h.status(),
            ACKNOWLEDGE | DRIVER,
            "nothing was acked, so no VERSION_1"
        );
        // After FEATURES_OK the negotiated set is frozen.
        h.write_driver_features(VIRTIO_F_VERSION_1);
        h.set_status(FEATURES_OK_STATUS);
        h.write_driver_features(DEVICE_FEATURES);
        assert!(h.setup_standard_queue(0, 16));
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations[0].0, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_steps_out_of_order_are_ignored() {
        let mut h = harness();
        for bad in [
            DRIVER,
            FEATURES_OK,
            DRIVER_OK,
            ACKNOWLEDGE | FEATURES_OK,
            0x10,
            0x20,
        ] {
            h.set_status(bad);
            assert_eq!(h.status(), 0, "from 0, writing {bad:#x}");
        }
        h.set_status(ACKNOWLEDGE);
        // Clearing a bit is not allowed (§2.1.1); neither is skipping DRIVER.
        for bad in [DRIVER, ACKNOWLEDGE | FEATURES_OK, ACKNOWLEDGE | DRIVER_OK] {
            h.set_status(bad);
            assert_eq!(
                h.status(),
                ACKNOWLEDGE,
                "from ACKNOWLEDGE, writing {bad:#x}"
            );
        }
        h.set_status(ACKNOWLEDGE | DRIVER);
        h.set_status(ACKNOWLEDGE);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        // Writing the same value again changes nothing.
        h.set_status(ACKNOWLEDGE | DRIVER);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        assert!(h.calls().activations.is_empty());
    }

    #[test]
    fn several_status_bits_at_once_are_taken_in_order() {
        let mut h = harness();
        // Firmware drivers write ACKNOWLEDGE | DRIVER in one go.
        h.set_status(ACKNOWLEDGE | DRIVER);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        h.write_driver_features(VIRTIO_F_VERSION_1);
        // FEATURES_OK and DRIVER_OK together: the feature check still runs first.
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations.len(), 1);
        // A refused FEATURES_OK stops the walk before DRIVER_OK.
        h.set_status(0);
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
        assert_eq!(h.calls().activations.len(), 1);
    }

    #[test]
    fn failed_sticks_until_reset() {
        let mut h = harness();
        h.set_status(ACKNOWLEDGE | DRIVER);
        h.set_status(ACKNOWLEDGE | DRIVER | FAILED);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FAILED);
        h.write_driver_features(VIRTIO_F_VERSION_1);
        h.set_status(FEATURES_OK_STATUS | FAILED);
        h.set_status(FEATURES_OK_STATUS);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FAILED);
        h.set_status(0);
        assert_eq!(h.status(), 0);
        // FAILED alone is honoured too, without clearing what was set.
        h.set_status(ACKNOWLEDGE);
        h.set_status(FAILED);
        assert_eq!(h.status(), ACKNOWLEDGE | FAILED);
        h.set_status(0);
        assert_eq!(h.negotiate(VIRTIO_F_VERSION_1), FEATURES_OK_STATUS);
    }

    #[test]
    fn bad_queue_sizes_leave_the_queue_not_ready() {
        let mut h = harness();
        h.negotiate(VIRTIO_F_VERSION_1);
        // Queue 1 has QueueNumMax 128.
        for size in [0, 3, 100, 256, 0x1_0000, 0x1_0010, u32::MAX] {
            assert!(!h.setup_standard_queue(1, size), "QueueNum {size}");
        }
        assert!(h.setup_standard_queue(1, 128));
        h.write(reg::QUEUE_SEL, 2);
        h.write(reg::QUEUE_READY, 0);
        assert!(h.setup_standard_queue(2, 1), "a one-entry queue is legal");
    }

    #[test]
    fn untouched_queue_num_defaults_to_the_maximum() {
        let mut h = harness();
        h.negotiate(VIRTIO_F_VERSION_1);
        let (desc, driver, device) = standard_layout(1);
        h.write(reg::QUEUE_SEL, 1);
        h.write(reg::QUEUE_DESC_LOW, desc as u32);
        h.write(reg::QUEUE_DRIVER_LOW, driver as u32);
        h.write(reg::QUEUE_DEVICE_LOW, device as u32);
        h.write(reg::QUEUE_READY, 1);
        assert_eq!(h.read(reg::QUEUE_READY), 1);
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations[0].1, [seen(1, 128, false)]);
    }

    #[test]
    fn queue_parts_outside_ram_or_misaligned_leave_the_queue_not_ready() {
        let mut h = harness();
        h.negotiate(VIRTIO_F_VERSION_1);
        let end = RAM_SIZE;
        let cases = [
            // Misaligned: descriptor table 16, driver area 2, device area 4 (§2.7).
            (0x1008, 0x2000, 0x3000),
            (0x1000, 0x2001, 0x3000),
            (0x1000, 0x2000, 0x3002),
            // Outside RAM, entirely or straddling its end.
            (end, 0x2000, 0x3000),
            (0x1000, end + 0x1000, 0x3000),
            (0x1000, 0x2000, end - 0x10),
            (end - 16 * 16 + 16, 0x2000, 0x3000),
            // High halves.
            (1 << 32 | 0x1000, 0x2000, 0x3000),
            (0x1000, 0x2000, 0xffff_ffff_ffff_f000),
            (0xffff_ffff_ffff_fff0, 0x2000, 0x3000),
        ];
        for (desc, driver, device) in cases {
            assert!(
                !h.setup_queue(0, 16, desc, driver, device),
                "desc {desc:#x} driver {driver:#x} device {device:#x}"
            );
        }
        // Each part exactly fitting at the end of RAM is fine: 16 entries make a 256-byte
        // descriptor table, a 38-byte driver area and a 134-byte device area.
        assert!(h.setup_queue(0, 16, end - 256, end - 38 - 2, end - 136));
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations[0].1.len(), 1);
    }

    #[test]
    fn queue_registers_are_ignored_while_ready_and_before_features_ok() {
        let mut h = harness();
        h.set_status(ACKNOWLEDGE | DRIVER);
        assert!(
            !h.setup_standard_queue(0, 16),
            "queues are set up after FEATURES_OK"
        );
        h.write_driver_features(VIRTIO_F_VERSION_1);
        h.set_status(FEATURES_OK_STATUS);
        assert!(h.setup_standard_queue(0, 16));
        // Rewriting a ready queue changes nothing.
        h.write(reg::QUEUE_NUM, 32);
        h.write(reg::QUEUE_DESC_LOW, 0x8000);
        h.write(reg::QUEUE_DRIVER_LOW, 0x9000);
        h.write(reg::QUEUE_DEVICE_LOW, 0xa000);
        // Registers of a nonexistent queue go nowhere.
        h.write(reg::QUEUE_SEL, 7);
        h.write(reg::QUEUE_NUM, 16);
        h.write(reg::QUEUE_READY, 1);
        assert_eq!(h.read(reg::QUEUE_READY), 0);
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations[0].1, [seen(0, 16, false)]);
    }

    /// Found by the virtio_mmio fuzz target: a driver area at address 0 passed QueueReady,
    /// then every walk of the ring failed and the device asked for a reset. Now QueueReady
    /// refuses it, as it refuses any queue it cannot use.
    #[test]
    fn a_driver_area_at_address_zero_is_refused_at_queue_ready() {
        let mut h = harness();
        h.negotiate(VIRTIO_F_VERSION_1);
        let (desc, _, device) = standard_layout(0);
        assert!(!h.setup_queue(0, 16, desc, 0, device));
        assert_eq!(h.read(reg::QUEUE_READY), 0);
        assert!(h.setup_standard_queue(0, 16), "a usable layout still works");
    }

    #[test]
    fn queue_ready_can_be_cleared_before_driver_ok() {
        let mut h = harness();
        h.negotiate(VIRTIO_F_VERSION_1);
        assert!(h.setup_standard_queue(0, 16));
        h.write(reg::QUEUE_READY, 0);
        assert_eq!(h.read(reg::QUEUE_READY), 0);
        h.write(reg::QUEUE_READY, 2);
        assert_eq!(h.read(reg::QUEUE_READY), 0, "only 0 and 1 are defined");
        // Once not ready, the queue can be reconfigured.
        assert!(h.setup_standard_queue(0, 32));
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations[0].1, [seen(0, 32, false)]);
    }

    #[test]
    fn driver_ok_activates_the_device_with_the_ready_queues() {
        let mut h = harness();
        h.bring_up(DEVICE_FEATURES);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
        let calls = h.calls();
        assert_eq!(calls.activations.len(), 1);
        let (features, queues) = &calls.activations[0];
        assert_eq!(*features, DEVICE_FEATURES);
        // Queue 1 was never made ready, so the device does not get it; EVENT_IDX was
        // negotiated, so the queues use it.
        assert_eq!(*queues, [seen(0, 16, true), seen(2, 64, true)]);
        drop(calls);
        // Nothing but reads changes after DRIVER_OK: status stays.
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.calls().activations.len(), 1);
    }

    #[test]
    fn failed_activation_sets_device_needs_reset() {
        let mut h = harness_with(true);
        h.bring_up(VIRTIO_F_VERSION_1);
        assert_eq!(h.status(), DRIVER_OK_STATUS | DEVICE_NEEDS_RESET);
        // §2.1.2: with DRIVER_OK set, DEVICE_NEEDS_RESET comes with a config change notification.
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_eq!(h.irqs(), 1);
        // Writing back what it read (NEEDS_RESET included) changes nothing; a reset clears it.
        h.set_status(DRIVER_OK_STATUS | DEVICE_NEEDS_RESET);
        assert_eq!(h.status(), DRIVER_OK_STATUS | DEVICE_NEEDS_RESET);
        h.set_status(0);
        assert_eq!(h.status(), 0);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_changes_after_driver_ok_set_device_needs_reset() {
        // Enabling a queue the device did not get at activation.
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        h.irqs();
        h.write(reg::QUEUE_SEL, 1);
        h.write(reg::QUEUE_NUM, 16);
        assert_eq!(h.status(), DRIVER_OK_STATUS | DEVICE_NEEDS_RESET);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert_eq!(h.irqs(), 1);
        h.write(reg::QUEUE_READY, 1);
        assert_eq!(h.read(reg::QUEUE_READY), 0);
        assert_eq!(h.irqs(), 0, "one notification per DEVICE_NEEDS_RESET");

        // Stopping a queue the device owns stops the device.
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        let resets = h.calls().resets;
        h.write(reg::QUEUE_SEL, 2);
        h.write(reg::QUEUE_READY, 0);
        assert_eq!(h.read(reg::QUEUE_READY), 0);
        assert_eq!(h.calls().resets, resets + 1);
        assert_eq!(h.status(), DRIVER_OK_STATUS | DEVICE_NEEDS_RESET);

        // Registers of a ready queue are only ignored, as before DRIVER_OK.
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        h.write(reg::QUEUE_SEL, 0);
        h.write(reg::QUEUE_NUM, 32);
        h.write(reg::QUEUE_READY, 1);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
    }

    #[test]
    fn reset_after_driver_ok_makes_the_device_reusable() {
        let mut h = harness();
        h.bring_up(DEVICE_FEATURES);
        let interrupt = h.calls().interrupt.clone().unwrap();
        interrupt.trigger(VirtioInterruptType::Queue(0)).unwrap();
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_USED_BUFFER);
        let resets = h.calls().resets;

        h.set_status(0);
        assert_eq!(h.calls().resets, resets + 1);
        assert_eq!(h.status(), 0);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
        for index in 0..3 {
            h.write(reg::QUEUE_SEL, index);
            assert_eq!(h.read(reg::QUEUE_READY), 0, "queue {index}");
        }
        // Features were cleared: FEATURES_OK without a new selection fails (no VERSION_1).
        h.set_status(ACKNOWLEDGE | DRIVER);
        h.set_status(FEATURES_OK_STATUS);
        assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);

        // A second negotiation with other features and queues.
        assert_eq!(
            h.negotiate(VIRTIO_F_VERSION_1 | F_DEVICE),
            FEATURES_OK_STATUS
        );
        assert!(h.setup_standard_queue(1, 128));
        h.set_status(DRIVER_OK_STATUS);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
        let calls = h.calls();
        assert_eq!(calls.activations.len(), 2);
        assert_eq!(calls.activations[1].0, VIRTIO_F_VERSION_1 | F_DEVICE);
        assert_eq!(calls.activations[1].1, [seen(1, 128, false)]);
    }

    #[test]
    fn reset_clears_device_needs_reset_raised_by_the_device() {
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        let needs_reset = h.calls().needs_reset.clone().unwrap();
        needs_reset.raise().unwrap();
        assert_eq!(h.status(), DRIVER_OK_STATUS | DEVICE_NEEDS_RESET);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        // The driver may not go on, only reset.
        h.write(reg::QUEUE_SEL, 1);
        h.write(reg::QUEUE_READY, 1);
        assert_eq!(h.read(reg::QUEUE_READY), 0);
        h.set_status(0);
        assert_eq!(h.status(), 0);
        h.bring_up(VIRTIO_F_VERSION_1);
        assert_eq!(h.status(), DRIVER_OK_STATUS);
    }

    #[test]
    fn config_space_accesses_of_every_width() {
        let mut h = harness();
        // The mock's configuration space is 16 bytes holding 0, 1, 2, ...
        for (len, offset) in [(1usize, 3u64), (2, 2), (4, 4), (8, 8)] {
            let mut data = vec![0xaa; len];
            h.t.read(CONFIG_SPACE_OFFSET + offset, &mut data);
            let expected: Vec<u8> = (offset..offset + len as u64).map(|b| b as u8).collect();
            assert_eq!(data, expected, "{len} bytes at {offset}");
        }
        // Out of range and straddling the end read zeros; odd widths too.
        for (len, offset) in [
            (1usize, 16u64),
            (4, 14),
            (8, 12),
            (8, 0xe00),
            (3, 0),
            (16, 0),
        ] {
            let mut data = vec![0xaa; len];
            h.t.read(CONFIG_SPACE_OFFSET + offset, &mut data);
            assert_eq!(data, vec![0; len], "{len} bytes at {offset}");
        }
        let generation = h.read(reg::CONFIG_GENERATION);
        for (len, offset) in [(1usize, 0u64), (2, 2), (4, 4), (8, 8)] {
            h.t.write(CONFIG_SPACE_OFFSET + offset, &vec![0xee; len]);
        }
        let mut all = [0u8; 8];
        h.t.read(CONFIG_SPACE_OFFSET, &mut all);
        assert_eq!(all, [0xee, 1, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
        h.t.read(CONFIG_SPACE_OFFSET + 8, &mut all);
        assert_eq!(all, [0xee; 8]);
        // A driver write is a configuration change (ConfigGeneration moves).
        assert_ne!(h.read(reg::CONFIG_GENERATION), generation);
        // Out-of-range writes and odd widths are ignored.
        h.t.write(CONFIG_SPACE_OFFSET + 14, &[1; 4]);
        h.t.write(CONFIG_SPACE_OFFSET + 1, &[1; 3]);
        let mut tail = [0u8; 2];
        h.t.read(CONFIG_SPACE_OFFSET + 14, &mut tail);
        assert_eq!(tail, [0xee, 0xee]);
        let mut one = [0u8; 1];
        h.t.read(CONFIG_SPACE_OFFSET + 1, &mut one);
        assert_eq!(one, [1]);
    }

    #[test]
    fn config_generation_follows_device_changes() {
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        let before = h.read(reg::CONFIG_GENERATION);
        let interrupt = h.calls().interrupt.clone().unwrap();
        h.generation.bump_and_notify(interrupt.as_ref()).unwrap();
        assert_ne!(h.read(reg::CONFIG_GENERATION), before);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        // Stable while nothing changes.
        let now = h.read(reg::CONFIG_GENERATION);
        assert_eq!(h.read(reg::CONFIG_GENERATION), now);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        let interrupt = h.calls().interrupt.clone().unwrap();
        assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
        interrupt.trigger(VirtioInterruptType::Queue(2)).unwrap();
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_USED_BUFFER);
        interrupt.trigger(VirtioInterruptType::Config).unwrap();
        assert_eq!(
            h.read(reg::INTERRUPT_STATUS),
            INT_USED_BUFFER | INT_CONFIG_CHANGE
        );
        assert_eq!(h.irqs(), 2);
        assert_eq!(h.t.stats().interrupts.load(Ordering::Relaxed), 2);
        h.write(reg::INTERRUPT_ACK, INT_USED_BUFFER);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        // Undefined bits in the ACK are ignored.
        h.write(reg::INTERRUPT_ACK, !INT_CONFIG_CHANGE);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        h.write(reg::INTERRUPT_ACK, u32::MAX);
        assert_eq!(h.read(reg::INTERRUPT_STATUS), 0);
        assert_eq!(
            h.t.interrupt_eventfd().read().ok(),
            None,
            "nothing new fired"
        );
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let mut h = harness();
        let notifiers: Vec<(u16, EventFd)> =
            h.t.queue_notifiers()
                .into_iter()
                .map(|(index, fd)| (index, fd.try_clone().unwrap()))
                .collect();
        assert_eq!(notifiers.iter().map(|n| n.0).collect::<Vec<_>>(), [0, 1, 2]);
        let pending = |index: usize| notifiers[index].1.read().unwrap_or(0);

        // Before DRIVER_OK a notification is a driver error.
        h.negotiate(VIRTIO_F_VERSION_1);
        h.write(reg::QUEUE_NOTIFY, 0);
        assert_eq!(pending(0), 0);
        assert!(h.setup_standard_queue(0, 16));
        assert!(h.setup_standard_queue(2, 16));
        h.set_status(DRIVER_OK_STATUS);

        h.write(reg::QUEUE_NOTIFY, 2);
        h.write(reg::QUEUE_NOTIFY, 2);
        h.write(reg::QUEUE_NOTIFY, 0);
        assert_eq!(pending(2), 2);
        assert_eq!(pending(0), 1);
        // Queue 1 is not ready; queues 3 and up do not exist.
        for index in [1, 3, 0xffff, u32::MAX] {
            h.write(reg::QUEUE_NOTIFY, index);
        }
        assert_eq!((pending(0), pending(1), pending(2)), (0, 0, 0));
        assert_eq!(h.t.stats().notifications.load(Ordering::Relaxed), 8);

        // Notifications left pending at a reset are dropped; the eventfds stay the same.
        h.write(reg::QUEUE_NOTIFY, 0);
        h.set_status(0);
        assert_eq!(pending(0), 0);
        let again = h.t.queue_notifiers();
        assert_eq!(again.len(), 3);
    }

    #[test]
    fn activated_device_shares_the_notifier() {
        let mut h = harness();
        h.bring_up(VIRTIO_F_VERSION_1);
        h.write(reg::QUEUE_NOTIFY, 0);
        // The notifier the VMM would register as an ioeventfd is the one the device waits on:
        // a write through either is seen through the other.
        let (_, vmm_side) = h.t.queue_notifiers()[0];
        assert_eq!(vmm_side.read().unwrap(), 1);
    }

    #[test]
    fn shared_memory_registers_report_no_regions() {
        let mut h = harness();
        for sel in [0, 1, 255] {
            h.write(reg::SHM_SEL, sel);
            let len =
                u64::from(h.read(reg::SHM_LEN_HIGH)) << 32 | u64::from(h.read(reg::SHM_LEN_LOW));
            assert_eq!(len, u64::MAX, "a length of -1 means no region (§4.2.2)");
            assert_eq!(h.read(reg::SHM_BASE_LOW), u32::MAX);
            assert_eq!(h.read(reg::SHM_BASE_HIGH), u32::MAX);
        }
    }

    #[test]
    fn registers_need_32_bit_aligned_accesses() {
        let mut h = harness();
        for len in [1usize, 2, 8] {
            let mut data = vec![0xaa; len];
            h.t.read(u64::from(reg::MAGIC_VALUE), &mut data);
            assert_eq!(data, vec![0; len]);
        }
        let mut data = [0xaa; 4];
        h.t.read(u64::from(reg::MAGIC_VALUE) + 2, &mut data);
        assert_eq!(data, [0; 4]);
        // A narrow or misaligned Status write does nothing.
        h.t.write(u64::from(reg::STATUS), &[ACKNOWLEDGE as u8]);
        h.t.write(u64::from(reg::STATUS) + 1, &ACKNOWLEDGE.to_le_bytes());
        h.t.write(
            u64::from(reg::STATUS),
            &u64::from(ACKNOWLEDGE).to_le_bytes(),
        );
        assert_eq!(h.status(), 0);
    }

    /// Every offset of the window and past it, every width, read and written with junk, in
    /// every phase of a device's life: nothing panics.
    #[test]
    fn any_offset_and_width_is_survivable() {
        let junk: [u32; 4] = [0, 1, 0xffff_ffff, 0x8000_0001];
        for phase in 0..3 {
            let mut h = harness();
            match phase {
                0 => {}
                1 => {
                    h.negotiate(VIRTIO_F_VERSION_1);
                }
                _ => h.bring_up(DEVICE_FEATURES),
            }
            for offset in (0..0x200u64).chain([0xfff, 0x1000, u64::MAX - 8, u64::MAX]) {
                for len in [1usize, 2, 4, 8] {
                    let mut data = vec![0u8; len];
                    h.t.read(offset, &mut data);
                    for value in junk {
                        let bytes: Vec<u8> = value
                            .to_le_bytes()
                            .iter()
                            .cycle()
                            .take(len)
                            .copied()
                            .collect();
                        h.t.write(offset, &bytes);
                        h.t.read(offset, &mut data);
                    }
                }
            }
            // Still answers, and a reset brings it back to a working state.
            assert_eq!(h.read(reg::MAGIC_VALUE), MAGIC_VALUE);
            h.set_status(0);
            h.calls().activations.clear();
            h.bring_up(VIRTIO_F_VERSION_1);
            assert_eq!(h.status(), DRIVER_OK_STATUS, "phase {phase}");
            assert_eq!(h.calls().activations.len(), 1);
        }
    }

    #[test]
    fn invalid_queue_maximums_are_rejected_at_construction() {
        struct Sizes(Vec<u16>);
        impl VirtioDevice for Sizes {
            fn device_type(&self) -> u32 {
                1
            }
            fn avail_features(&self) -> u64 {
                VIRTIO_F_VERSION_1
            }
            fn queue_max_sizes(&self) -> &[u16] {
                &self.0
            }
            fn read_config(&self, _: u64, data: &mut [u8]) {
                data.fill(0);
            }
            fn write_config(&mut self, _: u64, _: &[u8]) {}
            fn activate(&mut self, _: ActivateContext) -> Result<(), ActivateError> {
                Ok(())
            }
            fn reset(&mut self) {}
        }
        let mem = GuestMemoryAtomic::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap(),
        );
        for sizes in [vec![0], vec![256, 3], vec![u16::MAX]] {
            let result = MmioTransport::new(
                Box::new(Sizes(sizes.clone())),
                mem.clone(),
                EventFd::new(0).unwrap(),
            );
            assert!(
                matches!(result, Err(MmioError::QueueMaxSize { .. })),
                "{sizes:?}"
            );
        }
        let ok = MmioTransport::new(
            Box::new(Sizes(vec![1, 32768])),
            mem,
            EventFd::new(0).unwrap(),
        );
        assert!(ok.is_ok());
    }
}

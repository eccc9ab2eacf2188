//! Creates the devices, registers them on the buses, wires their interrupts (irqfds), and
//! describes them for the guest's DSDT.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use virtio::{MmioTransport, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use arch::acpi::AcpiPmPorts;
use arch::acpi_tables::{aml, Aml, AmlSink};
use arch::layout;
use devices::legacy::{AcpiPmDevice, DebugExitDevice, Serial, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP};
use devices::{Bus, BusError, ExitHandle, Ioapic, IOAPIC_WINDOW};

use crate::interrupts::InterruptManager;

use crate::memory::{MemoryError, SystemAllocator};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Errors while creating devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot register {0}")]
    Bus(#[from] BusError),
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot connect the interrupt of {what}: {source}")]
    Interrupt {
        what: &'static str,
        source: crate::interrupts::InterruptError,
    },
    #[error("cannot place {what}: {source}")]
    Resources { what: String, source: MemoryError },
    #[error("cannot create the virtio-mmio transport of {what}: {source}")]
    Transport {
        what: String,
        source: virtio::MmioError,
    },
    #[error("cannot register the ioeventfd of {what} queue {queue}: {source}")]
    Ioeventfd {
        what: String,
        queue: u16,
        source: kvm_ioctls::Error,
    },
}

/// A device's entry in the DSDT, serialized once.
struct DsdtDevice(Vec<u8>);

impl Aml for DsdtDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

pub struct DeviceManager {
    pio_bus: Bus,
    mmio_bus: Bus,
    serial: Arc<Mutex<Serial>>,
    dsdt_devices: Vec<DsdtDevice>,
    /// `virtio_mmio.device=` words for kernels that find devices on the command line.
    virtio_mmio_cmdline: Vec<String>,
    virtio_count: usize,
    /// Every disk image, so they can be flushed even when a device cannot be reached.
    disk_images: Vec<Arc<virtio::block::io::DiskImage>>,
    /// Per-device counters, logged when the VM stops.
    block_metrics: Vec<(String, Arc<virtio::block::BlockMetrics>)>,
    net_metrics: Vec<(String, Arc<virtio::net::NetMetrics>)>,
}

use virtio::transport::mmio::{
    MMIO_WINDOW_SIZE as VIRTIO_MMIO_WINDOW, QUEUE_NOTIFY_OFFSET as VIRTIO_MMIO_QUEUE_NOTIFY,
};

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { what, source })
}

/// Writes the guest's console to stdout without Rust's line buffering, so a partial line
/// (a prompt) shows at once.
pub struct RawStdout;

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a valid buffer to fd 1.
        let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl DeviceManager {
    /// The legacy devices; COM1's output goes to `console` (which must never block).
    pub fn new(
        irqs: &InterruptManager,
        exit: &ExitHandle,
        console: Box<dyn Write + Send>,
    ) -> Result<Self, DeviceError> {
        let mut pio_bus = Bus::new();
        let mmio_bus = Bus::new();
        let out = console;
        let serial_irq = eventfd("COM1")?;
        irqs.connect(layout::IRQ_COM1, &serial_irq)
            .map_err(|source| DeviceError::Interrupt {
                what: "COM1",
                source,
            })?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, out)));
        pio_bus.insert("COM1", serial.clone(), layout::PORT_COM1, 8)?;
        pio_bus.insert(
            "i8042",
            Arc::new(Mutex::new(devices::legacy::I8042::new(exit.clone()))),
            layout::PORT_I8042,
            5,
        )?;
        pio_bus.insert(
            "ACPI PM",
            Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone()))),
            layout::PORT_ACPI_PM,
            AcpiPmDevice::LEN,
        )?;
        pio_bus.insert(
            "debug exit",
            Arc::new(Mutex::new(DebugExitDevice::new(exit.clone()))),
            layout::PORT_DEBUG_EXIT,
            1,
        )?;

        let dsdt_devices = vec![com1_dsdt()];
        Ok(Self {
            pio_bus,
            mmio_bus,
            serial,
            dsdt_devices,
            virtio_mmio_cmdline: Vec::new(),
            virtio_count: 0,
            disk_images: Vec::new(),
            block_metrics: Vec::new(),
            net_metrics: Vec::new(),
        })
    }

    /// Puts `device` behind a virtio-mmio transport: an MMIO window and an interrupt line
    /// from the allocators, an irqfd for its interrupt, an ioeventfd per queue on
    /// QueueNotify (so a notification costs no exit to user space), a DSDT entry
    /// (`LNRO0005`, as Linux expects) and a command-line entry for kernels that want one.
    #[allow(clippy::too_many_arguments)]
    pub fn add_virtio_mmio(
        &mut self,
        vm: &VmFd,
        irqs: &InterruptManager,
        allocator: &mut SystemAllocator,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        device: Box<dyn VirtioDevice>,
        spawner: Arc<dyn virtio::WorkerSpawner>,
        what: &str,
    ) -> Result<(), DeviceError> {
        let resources = |source| DeviceError::Resources {
            what: what.to_string(),
            source,
        };
        let window = allocator
            .allocate_mmio(VIRTIO_MMIO_WINDOW)
            .map_err(resources)?;
        let gsi = allocator.allocate_gsi().map_err(resources)?;
        let base = window.start();
        let irq = eventfd("virtio-mmio interrupt")?;
        irqs.connect(gsi, &irq)
            .map_err(|source| DeviceError::Interrupt {
                what: "virtio-mmio device",
                source,
            })?;
        let transport = MmioTransport::new(device, mem, irq)
            .map_err(|source| DeviceError::Transport {
                what: what.to_string(),
                source,
            })?
            .with_spawner(spawner);
        for (queue, evt) in transport.queue_notifiers() {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY),
                u32::from(queue),
            )
            .map_err(|source| DeviceError::Ioeventfd {
                what: what.to_string(),
                queue,
                source,
            })?;
        }
        self.mmio_bus.insert(
            what,
            Arc::new(Mutex::new(transport)),
            base,
            VIRTIO_MMIO_WINDOW,
        )?;
        let n = self.virtio_count;
        self.virtio_count += 1;
        self.dsdt_devices.push(virtio_mmio_dsdt(n, base, gsi));
        self.virtio_mmio_cmdline.push(format!(
            "virtio_mmio.device={}K@{base:#x}:{gsi}",
            VIRTIO_MMIO_WINDOW >> 10
        ));
        Ok(())
    }

    /// The I/O APIC model of the split irqchip, at its MADT address on the MMIO bus; its
    /// routes go through `irqs`. The vCPUs take its EOIs.
    pub fn add_ioapic(
        &mut self,
        irqs: &InterruptManager,
    ) -> Result<Arc<Mutex<Ioapic>>, DeviceError> {
        let ioapic = Arc::new(Mutex::new(Ioapic::new(irqs.ioapic_router())));
        self.mmio_bus.insert(
            "I/O APIC",
            ioapic.clone(),
            layout::IOAPIC_START,
            IOAPIC_WINDOW,
        )?;
        Ok(ioapic)
    }

    /// Keeps a disk image for [`DeviceManager::sync_disks`].
    pub fn track_disk_image(&mut self, image: Arc<virtio::block::io::DiskImage>) {
        self.disk_images.push(image);
    }

    /// fdatasync on every writable image: what the guest wrote is on stable storage even
    /// when its device could not be stopped in order (a vCPU stuck in the kernel still holds
    /// the buses).
    pub fn sync_disks(&self) {
        for d in self.disk_images.iter().filter(|d| !d.readonly()) {
            if let Err(e) = d.sync() {
                tracing::warn!("disk image {}: fdatasync failed: {e}", d.path().display());
            }
        }
    }

    /// Keeps a block device's counters for the report at VM exit.
    pub fn track_block_metrics(&mut self, what: &str, metrics: Arc<virtio::block::BlockMetrics>) {
        self.block_metrics.push((what.to_string(), metrics));
    }

    /// Keeps a network device's counters for the report at VM exit.
    pub fn track_net_metrics(&mut self, what: &str, metrics: Arc<virtio::net::NetMetrics>) {
        self.net_metrics.push((what.to_string(), metrics));
    }

    /// What each device did, for the log when the VM stops.
    pub fn metrics_report(&self) -> Vec<String> {
        let blocks = self
            .block_metrics
            .iter()
            .map(|(what, m)| format!("{what}: {m}"));
        let nets = self
            .net_metrics
            .iter()
            .map(|(what, m)| format!("{what}: {m}"));
        blocks.chain(nets).collect()
    }

    pub fn virtio_mmio_cmdline(&self) -> &[String] {
        &self.virtio_mmio_cmdline
    }

    /// The ports the FADT announces for reset and sleep.
    pub fn acpi_pm_ports() -> AcpiPmPorts {
        let base = layout::PORT_ACPI_PM as u16;
        AcpiPmPorts {
            sleep_control: base + AcpiPmDevice::SLEEP_CONTROL_OFFSET as u16,
            sleep_status: base + AcpiPmDevice::SLEEP_STATUS_OFFSET as u16,
            reset: base + AcpiPmDevice::RESET_OFFSET as u16,
            reset_value: ACPI_RESET_VALUE,
            s5_slp_typ: ACPI_S5_SLP_TYP,
        }
    }

    pub fn dsdt_devices(&self) -> Vec<&dyn Aml> {
        self.dsdt_devices.iter().map(|d| d as &dyn Aml).collect()
    }

    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Hands the buses over to the vCPUs.
    pub fn take_buses(&mut self) -> (Arc<Bus>, Arc<Bus>) {
        (
            Arc::new(std::mem::take(&mut self.pio_bus)),
            Arc::new(std::mem::take(&mut self.mmio_bus)),
        )
    }
}

/// A virtio-mmio window as Linux's ACPI probe expects it (drivers/virtio/virtio_mmio.c
/// matches `LNRO0005`): the register window and its interrupt.
fn virtio_mmio_dsdt(n: usize, base: u64, gsi: u32) -> DsdtDevice {
    let name = format!("VR{n:02X}");
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &(n as u32));
    let mem = aml::Memory32Fixed::new(true, base as u32, VIRTIO_MMIO_WINDOW as u32);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
    let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
    let mut bytes = Vec::new();
    dev.to_aml_bytes(&mut bytes);
    DsdtDevice(bytes)
}

/// COM1 as a PC BIOS describes it: PNP0501, ports 0x3f8-0x3ff, ISA IRQ 4.
fn com1_dsdt() -> DsdtDevice {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(layout::PORT_COM1 as u16, layout::PORT_COM1 as u16, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::IRQ_COM1);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
    let dev = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let mut bytes = Vec::new();
    dev.to_aml_bytes(&mut bytes);
    DsdtDevice(bytes)
}

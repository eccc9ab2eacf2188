//! A PCI segment's bus 0 (PCIe 6.0 §7.2): 32 device slots, the host bridge at 00:00.0, a
//! BDF → function map, and configuration access through the two mechanisms a PC has:
//!
//! - **0xCF8/0xCFC** (PCI 3.0 §3.2.2.3.2, configuration mechanism #1): CONFIG_ADDRESS at
//!   0xCF8 latches only full-dword writes (enable bit 31, bus 23:16, device 15:11, function
//!   10:8, register 7:2) and reads back what it holds; other accesses to 0xCF8-0xCFB do
//!   nothing and read all ones. CONFIG_DATA at 0xCFC-0xCFF takes any width inside its dword:
//!   the port's offset picks the bytes of the addressed register. With the enable bit clear
//!   the data port is not a configuration access (reads all ones, writes dropped).
//! - **ECAM** (PCIe 6.0 §7.2.2): 1 MiB per bus, offset = bus << 20 | device << 15 |
//!   function << 12 | register, any width inside one dword.
//!
//! Both reach the same functions. A function that is not there (an empty slot, a function
//! other than 0 of a single-function device, another bus) reads all ones and ignores
//! writes, as a master abort / Unsupported Request completes (PCIe 6.0 §2.3.2); so does an
//! access that crosses a dword (see [`configuration`](crate::configuration)).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use devices::limiter::WarnLimiter;
use devices::BusDevice;

use crate::bar::{BarInfo, BarMove, BarMoveRefused, MoveBar};
use crate::configuration::{
    is_dword_contained, ClassCode, ConfigurationSize, ConfigurationSpace, InterruptPin, Type0Header,
};
use crate::device::{lock, PciDevice};

/// The host bridge's identity (an Intel host bridge ID, as Cloud Hypervisor's).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
/// Device numbers on a bus, functions per device (PCI 3.0 §3.2.2.3.2).
pub const DEVICES_PER_BUS: u8 = 32;
pub const FUNCTIONS_PER_DEVICE: u8 = 8;
/// CONFIG_ADDRESS and CONFIG_DATA: eight ports from 0xCF8.
pub const CONFIG_IO_PORT_BASE: u64 = 0xcf8;
pub const CONFIG_IO_PORTS_LEN: u64 = 8;
/// The ECAM window of one bus: 32 devices × 8 functions × 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// CONFIG_ADDRESS bit 31: the data port is a configuration access.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// The bits of CONFIG_ADDRESS that hold something; 30:24 are reserved and 1:0 read as 0.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
/// CONFIG_DATA's offset in the port window.
const CONFIG_DATA: u64 = 4;

/// A function's address on its segment: bus, device (0-31), function (0-7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// `None` when the device or function number is out of range.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Self> {
        (device < DEVICES_PER_BUS && function < FUNCTIONS_PER_DEVICE).then_some(Self {
            bus,
            device,
            function,
        })
    }

    pub fn bus(&self) -> u8 {
        self.bus
    }

    pub fn device(&self) -> u8 {
        self.device
    }

    pub fn function(&self) -> u8 {
        self.function
    }

    /// The function and register an ECAM offset addresses (PCIe 6.0 §7.2.2, table 7-1).
    fn from_ecam(offset: u64) -> Option<(Self, u16)> {
        let bus = u8::try_from(offset >> 20).ok()?;
        let bdf = Self {
            bus,
            device: (offset >> 15) as u8 & 0x1f,
            function: (offset >> 12) as u8 & 0x7,
        };
        Some((bdf, (offset & 0xfff) as u16))
    }

    /// The function and register base a CONFIG_ADDRESS value addresses.
    fn from_config_address(address: u32) -> (Self, u16) {
        let bdf = Self {
            bus: (address >> 16) as u8,
            device: (address >> 11) as u8 & 0x1f,
            function: (address >> 8) as u8 & 0x7,
        };
        (bdf, (address & 0xfc) as u16)
    }

    /// The ECAM offset of this function's configuration space.
    pub fn ecam_offset(&self) -> u64 {
        u64::from(self.bus) << 20 | u64::from(self.device) << 15 | u64::from(self.function) << 12
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// The VMM's side of BAR moves: apply the move (the BAR's region on the VMM's bus, or its
/// memory slot) or refuse it (into RAM, onto another BAR, outside the window), and the
/// function keeps decoding at `mv.old`. Called with the segment and the function locked:
/// it must not lock either.
pub trait BarMapper: Send {
    fn move_bar(&mut self, device: Bdf, mv: &BarMove) -> Result<(), BarMoveRefused>;
}

/// Errors of a segment.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PciBusError {
    /// Every device slot of bus 0 holds a function.
    #[error("PCI segment {segment}: all {DEVICES_PER_BUS} device slots of bus 0 are taken")]
    Full { segment: u16 },
}

/// The host bridge at 00:00.0: a type-0 function of class 06/00 (PCI Code and ID
/// Assignment §1.7) with no BARs and no capabilities.
#[derive(Debug)]
pub struct HostBridge {
    config: ConfigurationSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        let header = Type0Header {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            revision_id: 0,
            class: ClassCode::HOST_BRIDGE,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
            interrupt_pin: InterruptPin::None,
            multi_function: false,
        };
        Self {
            config: ConfigurationSpace::new(&header, ConfigurationSize::Conventional),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8], move_bar: &mut MoveBar<'_>) {
        self.config.write(offset, data, move_bar);
    }

    fn bars(&self) -> Vec<BarInfo> {
        Vec::new()
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}

/// Bus 0 of one PCI segment.
pub struct PciSegment {
    id: u16,
    devices: BTreeMap<Bdf, Arc<Mutex<dyn PciDevice>>>,
    /// CONFIG_ADDRESS as last written (0xCF8; only segment 0 is reached that way).
    config_address: u32,
    mapper: Box<dyn BarMapper>,
    /// Refused accesses are the guest's doing.
    log: WarnLimiter,
}

impl fmt::Debug for PciSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciSegment")
            .field("id", &self.id)
            .field("devices", &self.devices.keys().collect::<Vec<_>>())
            .field(
                "config_address",
                &format_args!("{:#x}", self.config_address),
            )
            .finish_non_exhaustive()
    }
}

impl PciSegment {
    /// Segment `id` with the host bridge at 00:00.0; BAR moves go to `mapper`.
    pub fn new(id: u16, mapper: Box<dyn BarMapper>) -> Self {
        let mut devices: BTreeMap<Bdf, Arc<Mutex<dyn PciDevice>>> = BTreeMap::new();
        let host = Bdf {
            bus: 0,
            device: 0,
            function: 0,
        };
        devices.insert(host, Arc::new(Mutex::new(HostBridge::new())));
        Self {
            id,
            devices,
            config_address: 0,
            mapper,
            log: WarnLimiter::default(),
        }
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    /// Puts `device` in the first free slot of bus 0 as function 0 and returns its address.
    pub fn add_device(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Result<Bdf, PciBusError> {
        let bdf = (0..DEVICES_PER_BUS)
            .filter_map(|d| Bdf::new(0, d, 0))
            .find(|bdf| !self.devices.contains_key(bdf))
            .ok_or(PciBusError::Full { segment: self.id })?;
        self.devices.insert(bdf, device);
        Ok(bdf)
    }

    /// The function at `bdf`, if there is one.
    pub fn device(&self, bdf: Bdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.devices.get(&bdf).cloned()
    }

    /// Every function with its address, in BDF order (the host bridge first).
    pub fn devices(&self) -> impl Iterator<Item = (Bdf, &Arc<Mutex<dyn PciDevice>>)> {
        self.devices.iter().map(|(bdf, d)| (*bdf, d))
    }

    /// A configuration read of `bdf` at `offset`: all ones when the function is absent or
    /// the access is not inside one dword.
    pub fn read_config(&mut self, bdf: Bdf, offset: u16, data: &mut [u8]) {
        if !self.accepts(bdf, offset, data.len()) {
            data.fill(0xff);
            return;
        }
        match self.devices.get(&bdf) {
            Some(device) => lock(device).read_config(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A configuration write of `bdf` at `offset`: dropped when the function is absent or
    /// the access is not inside one dword.
    pub fn write_config(&mut self, bdf: Bdf, offset: u16, data: &[u8]) {
        if !self.accepts(bdf, offset, data.len()) {
            return;
        }
        let Some(device) = self.devices.get(&bdf) else {
            return;
        };
        let mapper = &mut self.mapper;
        lock(device).write_config(offset, data, &mut |mv| mapper.move_bar(bdf, mv));
    }

    fn accepts(&mut self, bdf: Bdf, offset: u16, len: usize) -> bool {
        let ok = is_dword_contained(offset, len) && usize::from(offset) < 4096;
        if !ok && self.log.allow() {
            tracing::debug!(
                segment = self.id,
                %bdf,
                offset = format_args!("{offset:#x}"),
                len,
                "configuration access refused: not inside one dword"
            );
        }
        ok
    }

    /// A read of the 0xCF8-0xCFF ports, `offset` from 0xCF8.
    pub fn config_io_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
            return;
        }
        match self.config_data_target(offset, data.len()) {
            Some((bdf, register)) => self.read_config(bdf, register, data),
            None => data.fill(0xff),
        }
    }

    /// A write of the 0xCF8-0xCFF ports, `offset` from 0xCF8.
    pub fn config_io_write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let mut value = [0u8; 4];
            value.copy_from_slice(data);
            self.config_address = u32::from_le_bytes(value) & CONFIG_ADDRESS_MASK;
            return;
        }
        if let Some((bdf, register)) = self.config_data_target(offset, data.len()) {
            self.write_config(bdf, register, data);
        }
    }

    /// The function and register a CONFIG_DATA access reaches, if it is one.
    fn config_data_target(&self, offset: u64, len: usize) -> Option<(Bdf, u16)> {
        let byte = offset.checked_sub(CONFIG_DATA)?;
        if byte + len as u64 > 4 || self.config_address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let (bdf, register) = Bdf::from_config_address(self.config_address);
        Some((bdf, register | byte as u16))
    }

    /// A read at `offset` in the segment's ECAM window.
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        match Bdf::from_ecam(offset) {
            Some((bdf, register)) => self.read_config(bdf, register, data),
            None => data.fill(0xff),
        }
    }

    /// A write at `offset` in the segment's ECAM window.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        if let Some((bdf, register)) = Bdf::from_ecam(offset) {
            self.write_config(bdf, register, data);
        }
    }
}

fn lock_segment(segment: &Mutex<PciSegment>) -> std::sync::MutexGuard<'_, PciSegment> {
    segment.lock().unwrap_or_else(|e| e.into_inner())
}

/// The 0xCF8-0xCFF ports of a segment, as a port-I/O bus device (register it at
/// [`CONFIG_IO_PORT_BASE`] for [`CONFIG_IO_PORTS_LEN`]).
pub struct PciConfigIo(Arc<Mutex<PciSegment>>);

impl PciConfigIo {
    pub fn new(segment: Arc<Mutex<PciSegment>>) -> Self {
        Self(segment)
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_segment(&self.0).config_io_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_segment(&self.0).config_io_write(offset, data);
    }
}

/// A segment's ECAM window, as an MMIO bus device (register it for [`ECAM_BUS_SIZE`]
/// bytes: bus 0).
pub struct PciConfigMmio(Arc<Mutex<PciSegment>>);

impl PciConfigMmio {
    pub fn new(segment: Arc<Mutex<PciSegment>>) -> Self {
        Self(segment)
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock_segment(&self.0).ecam_read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock_segment(&self.0).ecam_write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar::BarKind;
    use crate::configuration::{BAR0, COMMAND, COMMAND_MEMORY_SPACE, INTERRUPT_LINE};
    use crate::fuzz_targets::{TestDevice, TestPlacement};
    use crate::msix::{MsixNotifier, MsixRoute};
    use devices::{Bus, MsiMessage};

    struct NoMsix;
    impl MsixNotifier for NoMsix {
        fn update_routes(&mut self, _routes: &[(u16, MsixRoute)]) {}
        fn deliver(&mut self, _vector: u16, _message: MsiMessage) {}
    }

    /// Records moves; refuses the ones into the first 2 GiB ("RAM").
    #[derive(Clone, Default)]
    struct Mapper(Arc<Mutex<Vec<(Bdf, BarMove)>>>);
    impl BarMapper for Mapper {
        fn move_bar(&mut self, device: Bdf, mv: &BarMove) -> Result<(), BarMoveRefused> {
            self.0.lock().unwrap().push((device, *mv));
            if mv.new < 0x8000_0000 && mv.bar.kind != BarKind::Io {
                Err(BarMoveRefused::GuestRam)
            } else {
                Ok(())
            }
        }
    }

    const ECAM: u64 = 0xe000_0000;

    fn placement(n: u64) -> TestPlacement {
        TestPlacement {
            mem32: 0xc000_0000 + n * 0x1_0000,
            io: 0xc000 + n * 0x100,
            mem64: 0x10_0000_0000 + n * 0x1_0000,
        }
    }

    fn test_device(n: u64) -> Arc<Mutex<TestDevice>> {
        let device = TestDevice::new(placement(n), 4, Box::new(NoMsix)).unwrap();
        Arc::new(Mutex::new(device))
    }

    struct Rig {
        segment: Arc<Mutex<PciSegment>>,
        io: Bus,
        mmio: Bus,
        moves: Mapper,
    }

    impl Rig {
        fn new(devices: u64) -> Self {
            let moves = Mapper::default();
            let segment = Arc::new(Mutex::new(PciSegment::new(0, Box::new(moves.clone()))));
            for n in 0..devices {
                segment.lock().unwrap().add_device(test_device(n)).unwrap();
            }
            let mut io = Bus::new();
            let config_io = Arc::new(Mutex::new(PciConfigIo::new(segment.clone())));
            io.insert(
                "pci-config-io",
                config_io,
                CONFIG_IO_PORT_BASE,
                CONFIG_IO_PORTS_LEN,
            )
            .unwrap();
            let mut mmio = Bus::new();
            let ecam = Arc::new(Mutex::new(PciConfigMmio::new(segment.clone())));
            mmio.insert("pci-ecam", ecam, ECAM, ECAM_BUS_SIZE).unwrap();
            Self {
                segment,
                io,
                mmio,
                moves,
            }
        }

        fn select(&self, device: u8, function: u8, register: u8) {
            let address = CONFIG_ADDRESS_ENABLE
                | u32::from(device) << 11
                | u32::from(function) << 8
                | u32::from(register);
            self.io.write(CONFIG_IO_PORT_BASE, &address.to_le_bytes());
        }

        /// Reads `len` bytes of register `register` through 0xCF8/0xCFC.
        fn io_read(&self, device: u8, register: u16, len: usize) -> Vec<u8> {
            self.select(device, 0, (register & 0xfc) as u8);
            let mut data = vec![0u8; len];
            let port = CONFIG_IO_PORT_BASE + CONFIG_DATA + u64::from(register & 3);
            self.io.read(port, &mut data);
            data
        }

        fn io_write(&self, device: u8, register: u16, data: &[u8]) {
            self.select(device, 0, (register & 0xfc) as u8);
            let port = CONFIG_IO_PORT_BASE + CONFIG_DATA + u64::from(register & 3);
            self.io.write(port, data);
        }

        fn ecam_read(&self, device: u8, function: u8, register: u16, len: usize) -> Vec<u8> {
            let mut data = vec![0u8; len];
            let offset = u64::from(device) << 15 | u64::from(function) << 12;
            self.mmio
                .read(ECAM + offset + u64::from(register), &mut data);
            data
        }

        fn ecam_write(&self, device: u8, register: u16, data: &[u8]) {
            let offset = u64::from(device) << 15;
            self.mmio.write(ECAM + offset + u64::from(register), data);
        }
    }

    fn u32_of(bytes: &[u8]) -> u32 {
        u32::from_le_bytes(bytes.try_into().unwrap())
    }

    #[test]
    fn host_bridge_at_00_00_0_through_both_mechanisms() {
        let rig = Rig::new(0);
        let id = u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID);
        assert_eq!(u32_of(&rig.io_read(0, 0, 4)), id);
        assert_eq!(u32_of(&rig.ecam_read(0, 0, 0, 4)), id);
        assert_eq!(u32_of(&rig.io_read(0, 0x08, 4)), 0x0600_0000);
        assert_eq!(rig.ecam_read(0, 0, 0x0e, 1), vec![0], "header type 0");
        assert!(rig
            .segment
            .lock()
            .unwrap()
            .device(Bdf::new(0, 0, 0).unwrap())
            .is_some());
        let bridge = rig
            .segment
            .lock()
            .unwrap()
            .device(Bdf::new(0, 0, 0).unwrap())
            .unwrap();
        assert!(bridge.lock().unwrap().bars().is_empty());
    }

    #[test]
    fn devices_take_the_next_free_slot_until_the_bus_is_full() {
        let mut segment = PciSegment::new(3, Box::new(Mapper::default()));
        for d in 1..DEVICES_PER_BUS {
            let bdf = segment
                .add_device(Arc::new(Mutex::new(HostBridge::new())))
                .unwrap();
            assert_eq!(bdf, Bdf::new(0, d, 0).unwrap());
        }
        assert_eq!(
            segment.add_device(Arc::new(Mutex::new(HostBridge::new()))),
            Err(PciBusError::Full { segment: 3 })
        );
        assert_eq!(segment.devices().count(), 32);
        assert_eq!(segment.id(), 3);
        assert_eq!(Bdf::new(0, 0x1f, 7).unwrap().to_string(), "00:1f.7");
        assert_eq!(Bdf::new(0, 32, 0), None);
        assert_eq!(Bdf::new(0, 0, 8), None);
        assert_eq!(Bdf::new(1, 2, 3).unwrap().ecam_offset(), 0x11_3000);
    }

    #[test]
    fn absent_functions_read_all_ones() {
        let rig = Rig::new(1);
        // An empty slot, function 1 of a single-function device, a device on bus 1.
        assert_eq!(rig.ecam_read(5, 0, 0, 4), vec![0xff; 4]);
        assert_eq!(rig.ecam_read(1, 1, 0, 2), vec![0xff; 2]);
        assert_eq!(rig.io_read(7, 0, 4), vec![0xff; 4]);
        let bus1 = CONFIG_ADDRESS_ENABLE | 1 << 16;
        rig.io.write(CONFIG_IO_PORT_BASE, &bus1.to_le_bytes());
        let mut data = [0u8; 4];
        rig.io.read(CONFIG_IO_PORT_BASE + 4, &mut data);
        assert_eq!(data, [0xff; 4]);
        // Past bus 0's ECAM window nothing is registered.
        assert!(!rig.mmio.read(ECAM + ECAM_BUS_SIZE, &mut data));
        let mut segment = rig.segment.lock().unwrap();
        segment.ecam_read(1 << 20, &mut data);
        assert_eq!(data, [0xff; 4]);
        segment.ecam_read(u64::MAX, &mut data);
        assert_eq!(data, [0xff; 4]);
        // Writes to absent functions go nowhere (and do not panic).
        drop(segment);
        rig.ecam_write(9, INTERRUPT_LINE, &[5]);
        assert_eq!(rig.ecam_read(9, 0, INTERRUPT_LINE, 1), vec![0xff]);
    }

    #[test]
    fn config_address_takes_dword_writes_only() {
        let rig = Rig::new(1);
        rig.io
            .write(CONFIG_IO_PORT_BASE, &0xffff_ffffu32.to_le_bytes());
        let mut data = [0u8; 4];
        rig.io.read(CONFIG_IO_PORT_BASE, &mut data);
        assert_eq!(u32_of(&data), CONFIG_ADDRESS_MASK, "reserved bits read 0");
        // Byte and word accesses to 0xCF8-0xCFB: no effect, read all ones.
        rig.io.write(CONFIG_IO_PORT_BASE, &[0]);
        rig.io.write(CONFIG_IO_PORT_BASE + 2, &[0, 0]);
        rig.io.read(CONFIG_IO_PORT_BASE, &mut data);
        assert_eq!(u32_of(&data), CONFIG_ADDRESS_MASK);
        let mut byte = [0u8; 1];
        rig.io.read(CONFIG_IO_PORT_BASE + 1, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut word = [0u8; 2];
        rig.io.read(CONFIG_IO_PORT_BASE, &mut word);
        assert_eq!(word, [0xff; 2]);
        // Enable bit clear: the data port is no configuration access.
        let vendor_only = 1u32 << 11;
        rig.io
            .write(CONFIG_IO_PORT_BASE, &vendor_only.to_le_bytes());
        rig.io.read(CONFIG_IO_PORT_BASE + 4, &mut data);
        assert_eq!(data, [0xff; 4]);
        rig.io.write(CONFIG_IO_PORT_BASE + 4, &[0xff; 4]);
        assert_eq!(rig.ecam_read(1, 0, COMMAND, 2), vec![0, 0]);
    }

    #[test]
    fn config_data_takes_any_width_inside_its_dword() {
        let rig = Rig::new(1);
        let dword = rig.ecam_read(1, 0, 0x08, 4);
        for byte in 0..4u16 {
            assert_eq!(
                rig.io_read(1, 0x08 + byte, 1),
                vec![dword[usize::from(byte)]]
            );
        }
        for byte in 0..3u16 {
            let b = usize::from(byte);
            assert_eq!(rig.io_read(1, 0x08 + byte, 2), dword[b..b + 2].to_vec());
        }
        // Wider than what is left of the ports: the bus does not route it.
        rig.select(1, 0, 0x08);
        let mut data = [0u8; 4];
        assert!(!rig.io.read(CONFIG_IO_PORT_BASE + 5, &mut data));
        assert_eq!(data, [0xff; 4]);
        // Direct calls with such an access are refused too.
        let mut segment = rig.segment.lock().unwrap();
        segment.config_io_read(6, &mut data);
        assert_eq!(data, [0xff; 4]);
        segment.config_io_read(8, &mut data[..1]);
        assert_eq!(data[0], 0xff);
    }

    #[test]
    fn one_mechanism_writes_what_the_other_reads() {
        let rig = Rig::new(2);
        rig.io_write(2, INTERRUPT_LINE, &[0x0b]);
        assert_eq!(rig.ecam_read(2, 0, INTERRUPT_LINE, 1), vec![0x0b]);
        rig.ecam_write(1, INTERRUPT_LINE, &[0x0a, 0xff]);
        assert_eq!(rig.io_read(1, INTERRUPT_LINE, 2), vec![0x0a, 0x01]);
        // A BAR probed through one, restored through the other.
        rig.io_write(1, BAR0, &[0xff; 4]);
        assert_eq!(u32_of(&rig.ecam_read(1, 0, BAR0, 4)), 0xffff_f000);
        rig.ecam_write(1, BAR0, &0xc000_0000u32.to_le_bytes());
        assert_eq!(u32_of(&rig.io_read(1, BAR0, 4)), 0xc000_0000);
    }

    #[test]
    fn ecam_refuses_accesses_crossing_a_dword() {
        let rig = Rig::new(1);
        rig.ecam_write(1, INTERRUPT_LINE, &[0x07]);
        assert_eq!(rig.ecam_read(1, 0, 0x3b, 2), vec![0xff; 2]);
        assert_eq!(rig.ecam_read(1, 0, 0x3c, 8), vec![0xff; 8]);
        assert_eq!(rig.ecam_read(1, 0, 0x3d, 4), vec![0xff; 4]);
        rig.ecam_write(1, 0x3b, &[0x09, 0x09]);
        rig.ecam_write(1, 0x3c, &[0x09; 8]);
        assert_eq!(rig.ecam_read(1, 0, INTERRUPT_LINE, 1), vec![0x07]);
        // A conventional function's extended space reads zeros through ECAM.
        assert_eq!(rig.ecam_read(1, 0, 0x100, 4), vec![0; 4]);
        assert_eq!(rig.ecam_read(1, 0, 0xffc, 4), vec![0; 4]);
    }

    #[test]
    fn bar_moves_reach_the_mapper_with_the_bdf() {
        let rig = Rig::new(2);
        let bdf = Bdf::new(0, 2, 0).unwrap();
        rig.ecam_write(2, BAR0, &0xd000_0000u32.to_le_bytes());
        assert!(rig.moves.0.lock().unwrap().is_empty(), "decoding is off");
        rig.ecam_write(2, COMMAND, &COMMAND_MEMORY_SPACE.to_le_bytes());
        let moves = std::mem::take(&mut *rig.moves.0.lock().unwrap());
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].0, bdf);
        assert_eq!((moves[0].1.old, moves[0].1.new), (0xc001_0000, 0xd000_0000));
        let device = rig.segment.lock().unwrap().device(bdf).unwrap();
        assert_eq!(device.lock().unwrap().bars()[0].address, 0xd000_0000);
        // Refused (into "RAM"): the register rolls back through either mechanism.
        rig.io_write(2, BAR0, &0x1000_0000u32.to_le_bytes());
        assert_eq!(rig.moves.0.lock().unwrap().len(), 1);
        assert_eq!(u32_of(&rig.ecam_read(2, 0, BAR0, 4)), 0xd000_0000);
        assert_eq!(device.lock().unwrap().bars()[0].address, 0xd000_0000);
    }
}

//! Fuzz target body for the PCI crate, and the test function it (and the unit tests) use.
//! The `fuzz/` crate calls [`pci_config`]; `cargo test` replays the committed corpus
//! through it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::fuzz_targets::Input;
use devices::{Bus, MsiMessage};

use crate::bar::{Bar, BarInfo, BarKind, BarMove, BarMoveRefused, MoveBar};
use crate::bus::{
    BarMapper, Bdf, PciConfigIo, PciConfigMmio, PciSegment, CONFIG_IO_PORTS_LEN,
    CONFIG_IO_PORT_BASE, ECAM_BUS_SIZE, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID,
};
use crate::configuration::{
    is_dword_contained, ClassCode, ConfigurationSize, ConfigurationSpace, InterruptPin,
    Type0Header, BAR0, CAPABILITIES_POINTER, COMMAND, EXPANSION_ROM_BASE, INTERRUPT_LINE, STATUS,
    STATUS_CAPABILITIES_LIST,
};
use crate::device::PciDevice;
use crate::msix::{
    Msix, MsixError, MsixLocation, MsixNotifier, MsixRoute, MsixTrigger, MESSAGE_CONTROL_ENABLE,
    MESSAGE_CONTROL_FUNCTION_MASK, MSIX_CAPABILITY_ID, MSIX_TABLE_ENTRY_SIZE, VIRTIO_MSI_NO_VECTOR,
};

/// The test function's identity (a vendor-specific class, so no driver claims it).
pub const TEST_HEADER: Type0Header = Type0Header {
    vendor_id: 0x1af4,
    device_id: 0x10f0,
    revision_id: 0x02,
    class: ClassCode {
        base: 0xff,
        sub: 0x00,
        prog_if: 0x00,
    },
    subsystem_vendor_id: 0x1af4,
    subsystem_id: 0x0042,
    interrupt_pin: InterruptPin::IntA,
    multi_function: false,
};
/// BAR0: registers (a scratch area), BAR1: the same through I/O, BAR2: MSI-X.
pub const TEST_MEM32: Bar = Bar {
    kind: BarKind::Memory32,
    size: 0x1000,
    prefetchable: false,
};
pub const TEST_IO: Bar = Bar {
    kind: BarKind::Io,
    size: 0x20,
    prefetchable: false,
};
pub const TEST_MEM64: Bar = Bar {
    kind: BarKind::Memory64,
    size: 0x4000,
    prefetchable: true,
};
pub const TEST_MSIX_BAR: u8 = 2;
pub const TEST_PBA_OFFSET: u32 = 0x2000;
const SCRATCH_LEN: usize = 64;

/// Where a [`TestDevice`]'s BARs first decode.
#[derive(Debug, Clone, Copy)]
pub struct TestPlacement {
    pub mem32: u64,
    pub io: u64,
    pub mem64: u64,
}

/// A function composed the way an emulated device is: a configuration space with three
/// BARs and the MSI-X capability, a table and PBA in BAR2, and scratch registers in BAR0
/// (and BAR1, its I/O view).
#[derive(Debug)]
pub struct TestDevice {
    config: ConfigurationSpace,
    msix: Msix,
    scratch: [u8; SCRATCH_LEN],
}

impl TestDevice {
    pub fn new(
        at: TestPlacement,
        vectors: u16,
        notifier: Box<dyn MsixNotifier>,
    ) -> Result<Self, MsixError> {
        let mut config = ConfigurationSpace::new(&TEST_HEADER, ConfigurationSize::Conventional);
        config.add_bar(0, TEST_MEM32, at.mem32)?;
        config.add_bar(1, TEST_IO, at.io)?;
        config.add_bar(TEST_MSIX_BAR, TEST_MEM64, at.mem64)?;
        let table = MsixLocation {
            bir: TEST_MSIX_BAR,
            offset: 0,
        };
        let pba = MsixLocation {
            bir: TEST_MSIX_BAR,
            offset: TEST_PBA_OFFSET,
        };
        let mut msix = Msix::new(vectors, table, pba, notifier)?;
        msix.add_capability(&mut config)?;
        Ok(Self {
            config,
            msix,
            scratch: [0; SCRATCH_LEN],
        })
    }

    pub fn config(&self) -> &ConfigurationSpace {
        &self.config
    }

    pub fn msix(&self) -> &Msix {
        &self.msix
    }

    /// The device raises an interrupt on `vector`.
    pub fn trigger(&mut self, vector: u16) -> MsixTrigger {
        self.msix.trigger(vector)
    }

    fn scratch(&mut self, offset: u64, len: usize) -> Option<&mut [u8]> {
        let start = usize::try_from(offset).ok()?;
        self.scratch.get_mut(start..start.checked_add(len)?)
    }
}

impl PciDevice for TestDevice {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: u16, data: &[u8], move_bar: &mut MoveBar<'_>) {
        self.config.write(offset, data, move_bar);
        self.msix.config_written(&self.config, offset, data.len());
    }

    fn bars(&self) -> Vec<BarInfo> {
        self.config.bars()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        match bar {
            0 | 1 => match self.scratch(offset, data.len()) {
                Some(bytes) => data.copy_from_slice(bytes),
                None => data.fill(0),
            },
            TEST_MSIX_BAR => {
                if !self.msix.read_bar(bar, offset, data) {
                    data.fill(0);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        match bar {
            0 | 1 => {
                if let Some(bytes) = self.scratch(offset, data.len()) {
                    bytes.copy_from_slice(data);
                }
            }
            TEST_MSIX_BAR => {
                self.msix.write_bar(bar, offset, data);
            }
            _ => {}
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const ECAM_BASE: u64 = 0xe000_0000;
const VECTORS: [u16; 2] = [5, 70];
const PLACEMENTS: [TestPlacement; 2] = [
    TestPlacement {
        mem32: 0xc000_0000,
        io: 0xc000,
        mem64: 0x10_0000_0000,
    },
    TestPlacement {
        mem32: 0xc100_0000,
        io: 0xc100,
        mem64: 0x10_1000_0000,
    },
];
/// What the mapper takes: memory BARs in the 32-bit hole below ECAM or in a 64-bit window,
/// I/O BARs above the legacy ports; below `RAM_END` is guest RAM.
const RAM_END: u64 = 0x8000_0000;
const MEM32_WINDOW: Range<u64> = 0xc000_0000..ECAM_BASE;
const MEM64_WINDOW: Range<u64> = 1 << 36..1 << 37;
const IO_WINDOW: Range<u64> = 0xc000..0x1_0000;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
const WIDTHS: [usize; 8] = [1, 2, 4, 4, 8, 3, 2, 4];

/// Where the mapper has placed each BAR.
type Placed = Arc<Mutex<BTreeMap<(Bdf, u8), (Bar, u64)>>>;

struct FuzzMapper(Placed);

impl BarMapper for FuzzMapper {
    fn move_bar(&mut self, device: Bdf, mv: &BarMove) -> Result<(), BarMoveRefused> {
        let mut placed = lock(&self.0);
        let key = (device, mv.index);
        assert_eq!(
            placed.get(&key),
            Some(&(mv.bar, mv.old)),
            "a move starts where the BAR was applied"
        );
        assert_ne!(mv.old, mv.new, "a move goes somewhere");
        assert!(!mv.bar.is_probe(mv.new), "a size probe is not a move");
        assert_eq!(mv.new & (mv.bar.size - 1), 0, "a move is size aligned");
        let Some(end) = mv.new.checked_add(mv.bar.size) else {
            return Err(BarMoveRefused::OutsideWindow);
        };
        let io = mv.bar.kind == BarKind::Io;
        if !io && mv.new < RAM_END {
            return Err(BarMoveRefused::GuestRam);
        }
        let inside = |w: &Range<u64>| w.start <= mv.new && end <= w.end;
        let fits = if io {
            inside(&IO_WINDOW)
        } else {
            inside(&MEM32_WINDOW) || inside(&MEM64_WINDOW)
        };
        if !fits {
            return Err(BarMoveRefused::OutsideWindow);
        }
        let clash = placed.iter().find(|(k, (bar, at))| {
            **k != key
                && (bar.kind == BarKind::Io) == io
                && *at < end
                && mv.new < at.saturating_add(bar.size)
        });
        if let Some(((bdf, index), _)) = clash {
            return Err(BarMoveRefused::Overlap {
                other: format!("BAR {index} of {bdf}"),
            });
        }
        placed.insert(key, (mv.bar, mv.new));
        Ok(())
    }
}

/// What the notifier was told.
struct MsixLog {
    routes: Vec<MsixRoute>,
    delivered: Vec<u16>,
}

struct FuzzNotifier(Arc<Mutex<MsixLog>>);

impl MsixNotifier for FuzzNotifier {
    fn update_routes(&mut self, routes: &[(u16, MsixRoute)]) {
        assert!(!routes.is_empty(), "an empty batch");
        assert!(
            routes.windows(2).all(|w| w[0].0 < w[1].0),
            "a batch is in vector order"
        );
        let mut log = lock(&self.0);
        for &(vector, route) in routes {
            log.routes[usize::from(vector)] = route;
        }
    }

    fn deliver(&mut self, vector: u16, message: MsiMessage) {
        let mut log = lock(&self.0);
        let route = log.routes[usize::from(vector)];
        assert!(
            !route.masked,
            "vector {vector} delivered while its route is masked"
        );
        assert_eq!(
            route.message, message,
            "vector {vector} delivered elsewhere"
        );
        log.delivered.push(vector);
    }
}

/// What the guest wrote into one vector, and whether it is pending.
#[derive(Debug, Clone, Copy)]
struct VectorModel {
    address_low: u32,
    address_high: u32,
    data: u32,
    masked: bool,
    pending: bool,
}

impl VectorModel {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }
}

struct DeviceModel {
    device: Arc<Mutex<TestDevice>>,
    bdf: Bdf,
    capability: u16,
    log: Arc<Mutex<MsixLog>>,
    vectors: Vec<VectorModel>,
}

impl DeviceModel {
    fn table_len(&self) -> u64 {
        self.vectors.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    fn pba_len(&self) -> u64 {
        (self.vectors.len() as u64).div_ceil(64) * 8
    }

    fn pending_qword(&self, q: usize) -> u64 {
        let mut bits = 0u64;
        for (i, v) in self.vectors.iter().enumerate().skip(q * 64).take(64) {
            if v.pending {
                bits |= 1 << (i % 64);
            }
        }
        bits
    }

    /// The bytes a table or PBA read must return, and the model's update for a write.
    fn msix_access(&mut self, offset: u64, data: &[u8], write: bool) -> Option<Vec<u8>> {
        let len = data.len();
        let valid = |at: u64, limit: u64| {
            matches!(len, 4 | 8)
                && at.is_multiple_of(len as u64)
                && at.checked_add(len as u64).is_some_and(|e| e <= limit)
        };
        let pba = u64::from(TEST_PBA_OFFSET);
        if offset < self.table_len() {
            if !valid(offset, self.table_len()) {
                return Some(vec![0; len]);
            }
            let mut out = Vec::with_capacity(len);
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                let at = offset + 4 * i as u64;
                let v = &mut self.vectors[(at / MSIX_TABLE_ENTRY_SIZE) as usize];
                let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                let field = match at % MSIX_TABLE_ENTRY_SIZE {
                    0 => &mut v.address_low,
                    4 => &mut v.address_high,
                    8 => &mut v.data,
                    _ => {
                        if write {
                            v.masked = value & 1 != 0;
                        }
                        out.extend_from_slice(&u32::from(v.masked).to_le_bytes());
                        continue;
                    }
                };
                if write {
                    *field = if at.is_multiple_of(MSIX_TABLE_ENTRY_SIZE) {
                        value & !3
                    } else {
                        value
                    };
                }
                out.extend_from_slice(&field.to_le_bytes());
            }
            Some(out)
        } else if (pba..pba + self.pba_len()).contains(&offset) {
            let inner = offset - pba;
            if !valid(inner, self.pba_len()) {
                return Some(vec![0; len]);
            }
            let qword = self.pending_qword((inner / 8) as usize).to_le_bytes();
            let start = (inner % 8) as usize;
            Some(qword[start..start + len].to_vec())
        } else {
            None
        }
    }
}

/// `pci_config`: a segment with the host bridge and two test functions, reached through
/// 0xCF8/0xCFC and ECAM on `devices` buses, plus BAR MMIO, MSI-X table and PBA accesses and
/// interrupts raised on vectors, in any order and width. Asserts: no panic; read-only
/// registers keep their values; BAR registers keep their type bits and zeros below their
/// size, and a decoding BAR reads its applied address (or a probe); applied BARs are where
/// the mapper put them and every move starts from there; both configuration mechanisms read
/// the same; absent functions and refused accesses read all ones; MSI-X table, PBA and
/// routes match a model of what the guest wrote; vectors stay masked until unmasked, masked
/// interrupts pend and are delivered once when they can be.
pub fn pci_config(data: &[u8]) {
    let mut input = Input::new(data);
    let placed: Placed = Arc::default();
    let mapper = Box::new(FuzzMapper(placed.clone()));
    let segment = Arc::new(Mutex::new(PciSegment::new(0, mapper)));
    let mut models = Vec::new();
    for (vectors, at) in VECTORS.into_iter().zip(PLACEMENTS) {
        let masked = MsixRoute {
            message: MsiMessage {
                address: 0,
                data: 0,
            },
            masked: true,
        };
        let log = Arc::new(Mutex::new(MsixLog {
            routes: vec![masked; usize::from(vectors)],
            delivered: Vec::new(),
        }));
        let notifier = Box::new(FuzzNotifier(log.clone()));
        let device = TestDevice::new(at, vectors, notifier).expect("test device");
        let capability = device.msix().capability_offset().expect("MSI-X capability");
        let device = Arc::new(Mutex::new(device));
        let bdf = lock(&segment)
            .add_device(device.clone())
            .expect("a free slot");
        for bar in lock(&device).bars() {
            lock(&placed).insert((bdf, bar.index), (bar.bar, bar.address));
        }
        let reset = VectorModel {
            address_low: 0,
            address_high: 0,
            data: 0,
            masked: true,
            pending: false,
        };
        models.push(DeviceModel {
            device,
            bdf,
            capability,
            log,
            vectors: vec![reset; usize::from(vectors)],
        });
    }
    let mut io = Bus::new();
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(segment.clone())));
    io.insert(
        "pci-config-io",
        config_io,
        CONFIG_IO_PORT_BASE,
        CONFIG_IO_PORTS_LEN,
    )
    .expect("insert");
    let mut mmio = Bus::new();
    let ecam = Arc::new(Mutex::new(PciConfigMmio::new(segment.clone())));
    mmio.insert("pci-ecam", ecam, ECAM_BASE, ECAM_BUS_SIZE)
        .expect("insert");

    let mut config_address = 0u32;
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        let op = input.u8();
        let len = WIDTHS[usize::from((op >> 3) & 7)];
        let write = op & 0x40 != 0;
        let model = &mut models[usize::from(op >> 7)];
        match op & 7 {
            0 => {
                let port = CONFIG_IO_PORT_BASE + u64::from(input.u8() % 9);
                port_access(
                    &io,
                    &mmio,
                    &mut config_address,
                    port,
                    len,
                    write,
                    &mut input,
                );
            }
            1 => {
                let b = input.u8();
                let value = if b & 0x80 != 0 {
                    input.u32()
                } else {
                    let function = if b & 0x40 != 0 { (b >> 2) & 7 } else { 0 };
                    CONFIG_ADDRESS_ENABLE
                        | u32::from(b & 3) << 11
                        | u32::from(function) << 8
                        | u32::from(input.u8() & 0xfc)
                };
                io.write(CONFIG_IO_PORT_BASE, &value.to_le_bytes());
                config_address = value & CONFIG_ADDRESS_MASK;
            }
            2 => {
                let b = input.u8();
                let offset = if b == 0xff {
                    u64::from(input.u32()) % (2 * ECAM_BUS_SIZE)
                } else {
                    let function = if b & 4 != 0 { (b >> 3) & 7 } else { 0 };
                    let limit = if b & 0x80 != 0 { 0xfff } else { 0xff };
                    u64::from(b & 3) << 15
                        | u64::from(function) << 12
                        | u64::from(input.u16() & limit)
                };
                ecam_access(&mmio, offset, len, write, &mut input);
            }
            3 => {
                let bar = input.u8() % 6;
                let offset = u64::from(input.u16()) % 0x4100;
                bar_access(model, bar, offset, len, write, &mut input);
            }
            4 => {
                let offset = u64::from(input.u16()) % (model.table_len() + 32);
                bar_access(model, TEST_MSIX_BAR, offset, len, write, &mut input);
            }
            5 => {
                let offset = u64::from(TEST_PBA_OFFSET) + u64::from(input.u8() % 24);
                bar_access(model, TEST_MSIX_BAR, offset, len, write, &mut input);
            }
            6 => {
                let v = input.u8();
                let vector = if v == 0xff {
                    VIRTIO_MSI_NO_VECTOR
                } else {
                    u16::from(v) % (model.vectors.len() as u16 + 2)
                };
                trigger(model, vector);
            }
            _ => structured_write(&mmio, model, &mut input),
        }
        for model in &mut models {
            check(&mmio, model, &placed);
        }
        check_host_bridge(&mmio);
    }
}

fn ecam_read(mmio: &Bus, bdf: Bdf, register: u16, len: usize) -> Vec<u8> {
    let mut buf = vec![0x5a; len];
    mmio.read(
        ECAM_BASE + bdf.ecam_offset() + u64::from(register),
        &mut buf,
    );
    buf
}

fn ecam_u32(mmio: &Bus, bdf: Bdf, register: u16) -> u32 {
    let b = ecam_read(mmio, bdf, register, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn ecam_write(mmio: &Bus, bdf: Bdf, register: u16, data: &[u8]) {
    mmio.write(ECAM_BASE + bdf.ecam_offset() + u64::from(register), data);
}

fn value(input: &mut Input<'_>, len: usize) -> Vec<u8> {
    let mut v = input.bytes(len).to_vec();
    v.resize(len, 0);
    v
}

/// Functions present: the host bridge and the two test functions, all on bus 0.
fn present(bdf: Bdf) -> bool {
    bdf.bus() == 0 && bdf.function() == 0 && bdf.device() <= 2
}

fn port_access(
    io: &Bus,
    mmio: &Bus,
    config_address: &mut u32,
    port: u64,
    len: usize,
    write: bool,
    input: &mut Input<'_>,
) {
    let offset = port - CONFIG_IO_PORT_BASE;
    let routed = offset + len as u64 <= CONFIG_IO_PORTS_LEN;
    let target = (offset >= 4 && *config_address & CONFIG_ADDRESS_ENABLE != 0).then(|| {
        let a = *config_address;
        let bdf = Bdf::new((a >> 16) as u8, (a >> 11) as u8 & 0x1f, (a >> 8) as u8 & 7);
        (bdf, (a & 0xfc) as u16 | (offset - 4) as u16)
    });
    if write {
        let data = value(input, len);
        assert_eq!(io.write(port, &data), routed, "port write routed");
        if routed && offset == 0 && len == 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            *config_address = v & CONFIG_ADDRESS_MASK;
        }
        return;
    }
    let mut buf = vec![0x5a; len];
    assert_eq!(io.read(port, &mut buf), routed, "port read routed");
    if routed && offset == 0 && len == 4 {
        assert_eq!(
            buf,
            config_address.to_le_bytes(),
            "CONFIG_ADDRESS reads back"
        );
        return;
    }
    match target {
        Some((Some(bdf), register)) if routed && present(bdf) => {
            let expect = ecam_read(mmio, bdf, register, len);
            assert_eq!(
                buf, expect,
                "0xCFC and ECAM read {bdf} {register:#x}/{len} alike"
            );
        }
        _ => assert!(
            buf.iter().all(|&b| b == 0xff),
            "port {port:#x}/{len} reads ones"
        ),
    }
}

fn ecam_access(mmio: &Bus, offset: u64, len: usize, write: bool, input: &mut Input<'_>) {
    let routed = offset + len as u64 <= ECAM_BUS_SIZE;
    if write {
        let data = value(input, len);
        assert_eq!(
            mmio.write(ECAM_BASE + offset, &data),
            routed,
            "ECAM write routed"
        );
        return;
    }
    let mut buf = vec![0x5a; len];
    assert_eq!(
        mmio.read(ECAM_BASE + offset, &mut buf),
        routed,
        "ECAM read routed"
    );
    let register = (offset & 0xfff) as u16;
    let bdf = Bdf::new(0, (offset >> 15) as u8 & 0x1f, (offset >> 12) as u8 & 7);
    let answered = routed && is_dword_contained(register, len) && bdf.is_some_and(present);
    if !answered {
        assert!(
            buf.iter().all(|&b| b == 0xff),
            "ECAM {offset:#x}/{len} reads ones"
        );
    } else if register >= 0x100 {
        assert!(
            buf.iter().all(|&b| b == 0),
            "extended space {offset:#x} reads zeros"
        );
    }
}

fn bar_access(
    model: &mut DeviceModel,
    bar: u8,
    offset: u64,
    len: usize,
    write: bool,
    input: &mut Input<'_>,
) {
    let device = model.device.clone();
    if write {
        let data = value(input, len);
        lock(&device).write_bar(bar, offset, &data);
        if bar == TEST_MSIX_BAR {
            model.msix_access(offset, &data, true);
        }
        return;
    }
    let mut buf = vec![0x5a; len];
    lock(&device).read_bar(bar, offset, &mut buf);
    match bar {
        TEST_MSIX_BAR => {
            let expect = model
                .msix_access(offset, &buf.clone(), false)
                .unwrap_or_else(|| vec![0; len]);
            assert_eq!(buf, expect, "MSI-X BAR read at {offset:#x}/{len}");
        }
        0 | 1 => {}
        _ => assert!(buf.iter().all(|&b| b == 0xff), "no BAR {bar}"),
    }
}

fn trigger(model: &mut DeviceModel, vector: u16) {
    let mut device = lock(&model.device);
    let (enabled, function_mask) = (device.msix().enabled(), device.msix().function_masked());
    let got = device.trigger(vector);
    drop(device);
    let Some(v) = model.vectors.get_mut(usize::from(vector)) else {
        assert_eq!(got, MsixTrigger::NoVector, "vector {vector}");
        return;
    };
    let expect = if !enabled {
        MsixTrigger::Disabled
    } else if function_mask || v.masked {
        v.pending = true;
        MsixTrigger::Pending
    } else {
        MsixTrigger::Deliver(v.message())
    };
    assert_eq!(got, expect, "trigger vector {vector}");
}

/// Writes that reach the interesting states quickly: decoding on and off, BARs probed and
/// moved, MSI-X enabled and masked, Status bits written.
fn structured_write(mmio: &Bus, model: &DeviceModel, input: &mut Input<'_>) {
    let bdf = model.bdf;
    match input.u8() % 4 {
        0 => {
            let command = input.u16() & 0x0507;
            ecam_write(mmio, bdf, COMMAND, &command.to_le_bytes());
        }
        1 => {
            let index = input.u8() % 6;
            let value = match input.u8() % 5 {
                0 => 0xffff_ffff,
                1 => 0xffff_fff0,
                2 => 0xc000_0000 | u32::from(input.u16()) << 12,
                3 => 0xc000 | u32::from(input.u8()) << 5 | 1,
                _ => input.u32(),
            };
            let register = BAR0 + 4 * u16::from(index);
            ecam_write(mmio, bdf, register, &value.to_le_bytes());
        }
        2 => {
            let control = u16::from(input.u8() & 0xc0) << 8;
            ecam_write(mmio, bdf, model.capability + 2, &control.to_le_bytes());
        }
        _ => {
            let status = input.u16();
            ecam_write(mmio, bdf, STATUS, &status.to_le_bytes());
        }
    }
}

fn check(mmio: &Bus, model: &mut DeviceModel, placed: &Placed) {
    let bdf = model.bdf;
    let h = TEST_HEADER;
    let class = &h.class;
    let identity = [
        (0x00, u32::from(h.device_id) << 16 | u32::from(h.vendor_id)),
        (
            0x08,
            u32::from(class.base) << 24
                | u32::from(class.sub) << 16
                | u32::from(class.prog_if) << 8
                | u32::from(h.revision_id),
        ),
        (
            0x2c,
            u32::from(h.subsystem_id) << 16 | u32::from(h.subsystem_vendor_id),
        ),
        (EXPANSION_ROM_BASE, 0),
        (CAPABILITIES_POINTER, u32::from(model.capability)),
        (BAR0 + 16, 0),
        (BAR0 + 20, 0),
        (model.capability + 4, u32::from(TEST_MSIX_BAR)),
        (
            model.capability + 8,
            TEST_PBA_OFFSET | u32::from(TEST_MSIX_BAR),
        ),
    ];
    for (register, expect) in identity {
        assert_eq!(
            ecam_u32(mmio, bdf, register),
            expect,
            "{bdf} register {register:#x}"
        );
    }
    assert_eq!(ecam_read(mmio, bdf, 0x0e, 1), [0], "header type");
    assert_eq!(
        ecam_read(mmio, bdf, INTERRUPT_LINE + 1, 1),
        [1],
        "interrupt pin"
    );
    let command_status = ecam_u32(mmio, bdf, COMMAND);
    let command = command_status as u16;
    assert_ne!(
        (command_status >> 16) as u16 & STATUS_CAPABILITIES_LIST,
        0,
        "capabilities list bit"
    );
    assert_eq!(command & !0x0547, 0, "unimplemented Command bits");
    let cap = ecam_u32(mmio, bdf, model.capability);
    assert_eq!(
        cap & 0xffff,
        u32::from(MSIX_CAPABILITY_ID),
        "last capability, MSI-X"
    );
    let control = (cap >> 16) as u16;
    let vectors = model.vectors.len() as u16;
    assert_eq!(control & 0x3fff, vectors - 1, "Table Size");
    let registers: Vec<u32> = (0..6).map(|i| ecam_u32(mmio, bdf, BAR0 + 4 * i)).collect();

    let device = lock(&model.device);
    let msix = device.msix();
    let enabled = control & MESSAGE_CONTROL_ENABLE != 0;
    let function_mask = control & MESSAGE_CONTROL_FUNCTION_MASK != 0;
    assert_eq!(
        msix.enabled(),
        enabled,
        "MSI-X Enable follows Message Control"
    );
    assert_eq!(
        msix.function_masked(),
        function_mask,
        "Function Mask follows"
    );
    let placed = lock(placed);
    let bars = device.bars();
    assert_eq!(bars.len(), 3);
    for info in bars {
        let bar = info.bar;
        let i = usize::from(info.index);
        assert_eq!(
            placed.get(&(bdf, info.index)),
            Some(&(bar, info.address)),
            "BAR {i} applied where the mapper put it"
        );
        let low = registers[i];
        assert_eq!(
            low & !bar.writable_low(),
            bar.type_bits(),
            "BAR {i} low bits"
        );
        let high = registers.get(i + 1).copied().unwrap_or(0);
        if bar.kind == BarKind::Memory64 {
            assert_eq!(high & !bar.writable_high(), 0, "BAR {i} upper bits");
        } else if device.config().decodes(bar.kind) {
            let at = bar.decode(low, 0);
            assert!(
                at == info.address || bar.is_probe(at),
                "decoding BAR {i} reads {at:#x}, applied at {:#x}",
                info.address
            );
        }
    }
    drop(placed);
    let mut log = lock(&model.log);
    for vector in std::mem::take(&mut log.delivered) {
        let v = &mut model.vectors[usize::from(vector)];
        assert!(v.pending, "vector {vector} delivered without being pending");
        v.pending = false;
    }
    for (i, v) in model.vectors.iter().enumerate() {
        let masked = !enabled || function_mask || v.masked;
        let route = log.routes[i];
        assert_eq!(route.masked, masked, "vector {i} route masked");
        if !masked {
            assert_eq!(route.message, v.message(), "vector {i} route message");
        }
        assert!(!v.pending || masked, "vector {i} pending while deliverable");
        assert_eq!(
            msix.is_pending(i as u16),
            v.pending,
            "vector {i} pending bit"
        );
    }
}

fn check_host_bridge(mmio: &Bus) {
    let Some(host) = Bdf::new(0, 0, 0) else {
        return;
    };
    let id = u32::from(HOST_BRIDGE_DEVICE_ID) << 16 | u32::from(HOST_BRIDGE_VENDOR_ID);
    assert_eq!(ecam_u32(mmio, host, 0), id, "host bridge ID");
    assert_eq!(
        ecam_u32(mmio, host, 0x08) >> 8,
        0x06_0000,
        "host bridge class"
    );
    for i in 0..6 {
        assert_eq!(ecam_u32(mmio, host, BAR0 + 4 * i), 0, "host bridge BAR {i}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::fuzz_targets::replay_corpus;

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn pci_config_corpus() {
        replay_corpus(&root(), "pci_config", pci_config);
    }

    #[test]
    fn pci_config_takes_any_input() {
        pci_config(&[]);
        pci_config(&[0xff; 64]);
        let all: Vec<u8> = (0..=255).collect();
        pci_config(&all);
    }
}

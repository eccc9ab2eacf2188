//! Fuzz target bodies for the port-I/O devices, and the byte reader the other crates' bodies
//! share. The `fuzz/` crate calls these; `cargo test` replays the committed corpus through
//! them, so every input that once found a bug stays a regression test.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::legacy::{AcpiPmDevice, DebugExitDevice, Serial, I8042};
use crate::{Bus, ExitHandle, VmExitReason};

/// Reads fuzz input front to back; past the end every read is zero, so any input is valid.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Replays every file of `fuzz/corpus/<target>` (from the workspace root, `root`) through
/// `body`; panics if the directory is missing or empty, so a lost corpus fails the test.
pub fn replay_corpus(root: &std::path::Path, target: &str, body: impl Fn(&[u8])) {
    let dir = root.join("fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut files: Vec<_> = entries.into_iter().filter(|p| p.is_file()).collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    for path in files {
        let data =
            std::fs::read(&path).unwrap_or_else(|e| panic!("corpus {}: {e}", path.display()));
        body(&data);
    }
}

/// The PC ports the VMM registers these devices at (arch's layout; `devices` does not
/// depend on `arch`).
const PORT_I8042: u64 = 0x60;
const PORT_DEBUG_EXIT: u64 = 0xf4;
const PORT_COM1: u64 = 0x3f8;
const PORT_ACPI_PM: u64 = 0x600;
const RANGES: [(u64, u64); 4] = [
    (PORT_I8042, 5),
    (PORT_DEBUG_EXIT, 1),
    (PORT_COM1, 8),
    (PORT_ACPI_PM, AcpiPmDevice::LEN),
];
const UART_FIFO: usize = 64;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the guest has done to the UART, as far as the model needs it.
struct UartModel {
    lcr: u8,
    mcr: u8,
    scratch: u8,
    fifo: VecDeque<u8>,
    out: Vec<u8>,
}

impl Default for UartModel {
    /// A 16550 after power-on: 8N1, OUT2 set.
    fn default() -> Self {
        Self {
            lcr: 0x03,
            mcr: 0x08,
            scratch: 0,
            fifo: VecDeque::new(),
            out: Vec::new(),
        }
    }
}

impl UartModel {
    fn dlab(&self) -> bool {
        self.lcr & 0x80 != 0
    }
    fn loopback(&self) -> bool {
        self.mcr & 0x10 != 0
    }
}

fn claimed(port: u64, len: usize) -> Option<(u64, u64)> {
    RANGES.into_iter().find_map(|(base, size)| {
        let offset = port.checked_sub(base)?;
        (offset + len as u64 <= size).then_some((base, offset))
    })
}

/// `port_io`: arbitrary reads and writes (any port, widths 1, 2, 4 and odd ones) through a
/// port-I/O bus holding COM1, the i8042, the ACPI PM block and the debug-exit port, plus host
/// input for the UART. Asserts: unclaimed accesses read all ones; each device's answer to a
/// wrong width; the UART's transmitted bytes, receive FIFO, line status and scratch register
/// against a model; and that the VM exit reason is exactly the first one the writes asked
/// for.
pub fn port_io(data: &[u8]) {
    let mut input = Input::new(data);
    let exit = ExitHandle::new().expect("eventfd");
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let out = Captured::default();
    let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(out.clone()))));
    let mut bus = Bus::new();
    bus.insert(
        "i8042",
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        PORT_I8042,
        5,
    )
    .expect("insert");
    bus.insert(
        "debug-exit",
        Arc::new(Mutex::new(DebugExitDevice::new(exit.clone()))),
        PORT_DEBUG_EXIT,
        1,
    )
    .expect("insert");
    bus.insert("COM1", serial.clone(), PORT_COM1, 8)
        .expect("insert");
    bus.insert(
        "acpi-pm",
        Arc::new(Mutex::new(AcpiPmDevice::new(exit.clone()))),
        PORT_ACPI_PM,
        AcpiPmDevice::LEN,
    )
    .expect("insert");

    let mut uart = UartModel::default();
    let mut expected_exit: Option<VmExitReason> = None;
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        let op = input.u8();
        // Mostly ports near the devices, sometimes any 16-bit port (and the wrap at 0xffff).
        let port = match op >> 5 {
            0 => PORT_COM1 + u64::from(input.u8() % 10),
            1 => PORT_I8042 + u64::from(input.u8() % 6),
            2 => PORT_ACPI_PM + u64::from(input.u8() % 4),
            3 => PORT_DEBUG_EXIT + u64::from(input.u8() % 2),
            _ => u64::from(input.u16()),
        };
        let len = [1usize, 1, 1, 2, 4, 3, 8, 0][usize::from((op >> 2) & 7)];
        match op & 3 {
            0 | 1 => {
                let mut value = input.bytes(len).to_vec();
                value.resize(len, 0);
                let hit = bus.write(port, &value);
                assert_eq!(
                    hit,
                    claimed(port, len).is_some(),
                    "write {port:#x}/{len} claimed"
                );
                model_write(&mut uart, &mut expected_exit, port, &value);
            }
            2 => {
                let mut buf = vec![0x5au8; len];
                let hit = bus.read(port, &mut buf);
                let claim = claimed(port, len);
                assert_eq!(hit, claim.is_some(), "read {port:#x}/{len} claimed");
                check_read(&mut uart, port, claim, &buf);
            }
            _ => {
                let n = usize::from(input.u8() % 80);
                let bytes = input.bytes(n);
                let taken = serial
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_input(bytes);
                let expect = if uart.loopback() {
                    0
                } else {
                    (UART_FIFO - uart.fifo.len()).min(bytes.len())
                };
                assert_eq!(taken, expect, "host input taken by the UART FIFO");
                uart.fifo.extend(&bytes[..taken]);
            }
        }
        assert_eq!(exit.reason(), expected_exit, "VM exit reason");
        assert_eq!(
            *out.0.lock().unwrap_or_else(|e| e.into_inner()),
            uart.out,
            "UART output"
        );
    }
}

fn model_write(
    uart: &mut UartModel,
    expected_exit: &mut Option<VmExitReason>,
    port: u64,
    value: &[u8],
) {
    let Some((base, offset)) = claimed(port, value.len()) else {
        return;
    };
    let mut request = |reason| {
        if expected_exit.is_none() {
            *expected_exit = Some(reason);
        }
    };
    match base {
        PORT_DEBUG_EXIT => {
            if let Some(&status) = value.first() {
                request(VmExitReason::DebugExit(status));
            }
        }
        PORT_I8042 if value == [0xfe] && offset == 4 => request(VmExitReason::Reset),
        PORT_ACPI_PM => match (offset, value) {
            (0, [v]) if v & 0x20 != 0 && (v >> 2) & 7 == 5 => request(VmExitReason::Poweroff),
            (2, [1]) => request(VmExitReason::Reset),
            _ => {}
        },
        PORT_COM1 => {
            let [v] = value else { return };
            match offset {
                0 if !uart.dlab() => {
                    if uart.loopback() {
                        if uart.fifo.len() < UART_FIFO {
                            uart.fifo.push_back(*v);
                        }
                    } else {
                        uart.out.push(*v);
                    }
                }
                3 => uart.lcr = *v,
                4 => uart.mcr = *v,
                7 => uart.scratch = *v,
                _ => {}
            }
        }
        _ => {}
    }
}

fn check_read(uart: &mut UartModel, port: u64, claim: Option<(u64, u64)>, buf: &[u8]) {
    let Some((base, offset)) = claim else {
        assert!(buf.iter().all(|&b| b == 0xff), "unclaimed read {port:#x}");
        return;
    };
    match base {
        PORT_ACPI_PM => assert!(buf.iter().all(|&b| b == 0), "ACPI PM reads zero"),
        PORT_DEBUG_EXIT => assert!(buf.iter().all(|&b| b == 0xff), "debug exit reads ones"),
        PORT_I8042 | PORT_COM1 if buf.len() != 1 => {
            assert!(buf.iter().all(|&b| b == 0xff), "wide read of {port:#x}")
        }
        PORT_COM1 => match offset {
            0 if !uart.dlab() => {
                let expect = uart.fifo.pop_front().unwrap_or(0);
                assert_eq!(buf[0], expect, "UART receive buffer");
            }
            3 => assert_eq!(buf[0], uart.lcr, "LCR"),
            4 => assert_eq!(buf[0], uart.mcr, "MCR"),
            5 => assert_eq!(buf[0] & 1 != 0, !uart.fifo.is_empty(), "LSR data ready"),
            7 => assert_eq!(buf[0], uart.scratch, "scratch register"),
            _ => {}
        },
        _ => {}
    }
}

#[derive(Default)]
struct RouteLog {
    routes: [Option<(crate::MsiMessage, bool)>; crate::IOAPIC_NUM_PINS],
    injected: Vec<usize>,
}

#[derive(Clone, Default)]
struct Routes(Arc<Mutex<RouteLog>>);

impl crate::IoapicRouter for Routes {
    fn set_route(&mut self, pin: usize, route: Option<(crate::MsiMessage, bool)>) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        assert!(pin < crate::IOAPIC_NUM_PINS, "route for pin {pin}");
        assert_ne!(
            log.routes[pin], route,
            "a route update that changes nothing"
        );
        log.routes[pin] = route;
    }
    fn inject(&mut self, pin: usize, _msi: crate::MsiMessage) {
        let mut log = self.0.lock().unwrap_or_else(|e| e.into_inner());
        log.injected.push(pin);
    }
}

/// `ioapic`: arbitrary register reads and writes (any offset and width), level changes on
/// any pin and EOIs of any vector. Asserts: every pin's route is exactly what its
/// redirection entry says (none while masked), updates come only on change, only unmasked
/// level-triggered pins whose line is high are injected, and each injection leaves Remote
/// IRR set until an EOI of its vector.
pub fn ioapic(data: &[u8]) {
    let mut input = Input::new(data);
    let routes = Routes::default();
    let mut io = crate::Ioapic::new(Box::new(routes.clone()));
    let mut high = [false; crate::IOAPIC_NUM_PINS];
    let mut ops = 0;
    while !input.is_empty() && ops < 4096 {
        ops += 1;
        let before = routes
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .injected
            .len();
        match input.u8() % 4 {
            0 => {
                let offset = u64::from(input.u8() % 0x50);
                let len = usize::from(input.u8() % 9);
                let bytes = input.bytes(len);
                let mut buf = [0u8; 8];
                buf[..bytes.len()].copy_from_slice(bytes);
                crate::BusDevice::write(&mut io, offset, &buf[..len]);
            }
            1 => {
                let offset = u64::from(input.u8() % 0x50);
                let len = usize::from(input.u8() % 9);
                let mut buf = [0u8; 8];
                crate::BusDevice::read(&mut io, offset, &mut buf[..len]);
                if len != 4 {
                    assert!(buf[..len].iter().all(|&b| b == 0), "narrow read");
                }
            }
            2 => {
                let pin = usize::from(input.u8() % 32);
                let level = input.u8() & 1 == 1;
                if let Some(h) = high.get_mut(pin) {
                    *h = level;
                }
                io.set_level(pin, level);
            }
            _ => io.end_of_interrupt(input.u8()),
        }
        let log = routes.0.lock().unwrap_or_else(|e| e.into_inner());
        for pin in log.injected[before..].iter().copied() {
            let e = io.entry(pin).unwrap_or(0);
            assert!(high[pin], "pin {pin} injected while low");
            assert_ne!(e & (1 << 15), 0, "edge pin {pin} injected by the model");
            assert_eq!(e & (1 << 16), 0, "masked pin {pin} injected");
            assert_ne!(e & (1 << 14), 0, "injected without Remote IRR");
        }
        for pin in 0..crate::IOAPIC_NUM_PINS {
            let e = io.entry(pin).unwrap_or(0);
            assert_eq!(
                log.routes[pin],
                crate::Ioapic::msi(e),
                "pin {pin}: entry {e:#x}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioapic_corpus() {
        replay_corpus(&root(), "ioapic", ioapic);
    }

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn port_io_corpus() {
        replay_corpus(&root(), "port_io", port_io);
    }

    #[test]
    fn input_reads_zeros_past_the_end() {
        let mut i = Input::new(&[1, 2, 3]);
        assert_eq!(i.u16(), 0x0201);
        assert_eq!(i.u32(), 3);
        assert_eq!(i.u64(), 0);
        assert!(i.is_empty());
    }
}

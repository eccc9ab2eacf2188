//! The I/O APIC (Intel 82093AA datasheet) as a register model, for KVM's split irqchip: the
//! local APICs stay in the kernel, the I/O APIC lives here. It never injects an interrupt
//! itself for an edge line: each unmasked redirection entry becomes an MSI message that the
//! VMM installs as the pin's KVM route, so a device's irqfd reaches the guest without an exit.
//! A masked entry has no route (the VMM also detaches the pin's irqfd, which then holds what
//! arrives until the entry is unmasked: delivered once).
//!
//! Level-triggered lines (PCI INTx) go through the model: [`Ioapic::set_level`] delivers
//! when the line rises (or is high) and Remote IRR is clear, Remote IRR stays set until the
//! local APIC's EOI for that vector ([`Ioapic::end_of_interrupt`], from KVM's
//! `KVM_EXIT_IOAPIC_EOI`), and a line still high then is delivered again.

use crate::bus::BusDevice;
use crate::limiter::WarnLimiter;

/// Redirection entries (pins); what the MADT's I/O APIC entry covers from GSI 0.
pub const IOAPIC_NUM_PINS: usize = 24;
/// The register window's size.
pub const IOAPIC_WINDOW: u64 = 0x1000;

// Memory-mapped registers (§3.0): the index, and the data window it selects.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
/// EOI register of I/O APIC version 0x20 (written with a vector).
const IOEOI: u64 = 0x40;

// Indirect registers (§3.1).
const IOAPICID: u32 = 0x00;
const IOAPICVER: u32 = 0x01;
const IOAPICARB: u32 = 0x02;
const IOREDTBL: u32 = 0x10;

/// Version 0x20 (with the EOI register), maximum redirection entry 23 (§3.2.2).
const VERSION: u32 = 0x20 | ((IOAPIC_NUM_PINS as u32 - 1) << 16);

// Redirection entry fields (§3.2.4).
const VECTOR_MASK: u64 = 0xff;
const DELIVERY_MODE_SHIFT: u32 = 8;
const DEST_MODE_LOGICAL: u64 = 1 << 11;
const DELIVERY_STATUS: u64 = 1 << 12;
const POLARITY_LOW: u64 = 1 << 13;
const REMOTE_IRR: u64 = 1 << 14;
const TRIGGER_LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const DEST_SHIFT: u32 = 56;
/// Bits the guest may write (Delivery Status and Remote IRR are read-only).
const WRITABLE: u64 = !(DELIVERY_STATUS | REMOTE_IRR);

/// An MSI write as the local APICs take it (Intel SDM vol. 3 §11.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// How the VMM turns the model's decisions into KVM state.
pub trait IoapicRouter: Send {
    /// The pin's route: `Some` for an unmasked entry (the MSI its interrupts become, and
    /// whether the line is level-triggered), `None` for a masked or unusable one.
    fn set_route(&mut self, pin: usize, route: Option<(MsiMessage, bool)>);
    /// Delivers one interrupt now (a level line rising, or re-delivered after EOI).
    fn inject(&mut self, pin: usize, msi: MsiMessage);
}

pub struct Ioapic {
    id: u32,
    ioregsel: u32,
    redirection: [u64; IOAPIC_NUM_PINS],
    /// Level-triggered lines asserted by their device.
    level: [bool; IOAPIC_NUM_PINS],
    /// What the router was last told per pin, so unchanged writes cost no KVM call.
    routed: [Option<(MsiMessage, bool)>; IOAPIC_NUM_PINS],
    router: Box<dyn IoapicRouter>,
    log: WarnLimiter,
}

impl Ioapic {
    /// An I/O APIC after reset: every entry masked (§3.2.4).
    pub fn new(router: Box<dyn IoapicRouter>) -> Self {
        Self {
            id: 0,
            ioregsel: 0,
            redirection: [MASKED; IOAPIC_NUM_PINS],
            level: [false; IOAPIC_NUM_PINS],
            routed: [None; IOAPIC_NUM_PINS],
            router,
            log: WarnLimiter::default(),
        }
    }

    /// The redirection entry of `pin` as the guest last wrote it (with Remote IRR).
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// The MSI an entry's interrupts become, or None when masked or not deliverable as a
    /// message (SMI, INIT, ExtINT and reserved delivery modes have no MSI form here).
    pub(crate) fn msi(entry: u64) -> Option<(MsiMessage, bool)> {
        if entry & MASKED != 0 {
            return None;
        }
        let delivery_mode = ((entry >> DELIVERY_MODE_SHIFT) & 0x7) as u32;
        // Fixed, lowest priority, NMI.
        if !matches!(delivery_mode, 0 | 1 | 4) {
            return None;
        }
        let level = entry & TRIGGER_LEVEL != 0;
        let dest = (entry >> DEST_SHIFT) & 0xff;
        let logical = entry & DEST_MODE_LOGICAL != 0;
        let address = 0xfee0_0000 | (dest << 12) | (u64::from(logical) << 2);
        let mut data = (entry & VECTOR_MASK) as u32 | (delivery_mode << 8);
        if level {
            // Trigger mode level, asserted: KVM then asks for the EOI of this vector.
            data |= (1 << 15) | (1 << 14);
        }
        Some((MsiMessage { address, data }, level))
    }

    /// Tells the router when a pin's route changed.
    fn update_route(&mut self, pin: usize) {
        let route = Self::msi(self.redirection[pin]);
        if route != self.routed[pin] {
            self.routed[pin] = route;
            self.router.set_route(pin, route);
        }
        // A level line held high while masked is delivered on unmask.
        self.deliver_level(pin);
    }

    /// Delivers a level-triggered pin if it is high, routable and not awaiting an EOI.
    fn deliver_level(&mut self, pin: usize) {
        let e = self.redirection[pin];
        if e & TRIGGER_LEVEL == 0 || e & REMOTE_IRR != 0 || !self.level[pin] {
            return;
        }
        if let Some((msi, _)) = Self::msi(e) {
            self.redirection[pin] |= REMOTE_IRR;
            self.router.inject(pin, msi);
        }
    }

    /// A level-triggered device's line (INTx): high (`true`) or low.
    pub fn set_level(&mut self, pin: usize, high: bool) {
        let Some(l) = self.level.get_mut(pin) else {
            return;
        };
        *l = high;
        if high {
            self.deliver_level(pin);
        }
    }

    /// The local APIC's EOI for `vector` (KVM_EXIT_IOAPIC_EOI): clears Remote IRR of the
    /// level entries with that vector and re-delivers those whose line is still high.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_NUM_PINS {
            let e = self.redirection[pin];
            if e & TRIGGER_LEVEL != 0 && e & REMOTE_IRR != 0 && (e & VECTOR_MASK) as u8 == vector {
                self.redirection[pin] &= !REMOTE_IRR;
                self.deliver_level(pin);
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            IOAPICID => self.id,
            IOAPICVER => VERSION,
            IOAPICARB => self.id,
            r if (IOREDTBL..IOREDTBL + 2 * IOAPIC_NUM_PINS as u32).contains(&r) => {
                let pin = ((r - IOREDTBL) / 2) as usize;
                let e = self.redirection[pin];
                if (r - IOREDTBL).is_multiple_of(2) {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.ioregsel {
            // Bits 24..27 hold the ID (§3.2.1).
            IOAPICID => self.id = value & 0x0f00_0000,
            r if (IOREDTBL..IOREDTBL + 2 * IOAPIC_NUM_PINS as u32).contains(&r) => {
                let pin = ((r - IOREDTBL) / 2) as usize;
                let old = self.redirection[pin];
                let new = if (r - IOREDTBL).is_multiple_of(2) {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut e = (old & !WRITABLE) | (new & WRITABLE);
                if e & TRIGGER_LEVEL == 0 {
                    // Remote IRR is undefined for edge entries: keep it clear.
                    e &= !REMOTE_IRR;
                }
                if e & POLARITY_LOW != 0 && self.log.allow() {
                    // Our lines are active-high; an active-low entry still gets the pin's
                    // events (the VMM drives the line's logical state).
                    tracing::debug!(pin, "I/O APIC entry programmed active-low");
                }
                self.redirection[pin] = e;
                self.update_route(pin);
            }
            // Version and arbitration are read-only; other indexes do not exist.
            _ => {}
        }
    }
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // 32-bit accesses only (§3.0); anything else reads as zeros.
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            IOREGSEL => self.ioregsel,
            IOWIN => self.read_register(),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.ioregsel = v & 0xff,
            IOWIN => self.write_register(v),
            IOEOI => self.end_of_interrupt(v as u8),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Debug)]
    struct Log {
        routes: Vec<(usize, Option<(MsiMessage, bool)>)>,
        injected: Vec<(usize, MsiMessage)>,
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Log>>);
    impl IoapicRouter for Recorder {
        fn set_route(&mut self, pin: usize, route: Option<(MsiMessage, bool)>) {
            self.0.lock().unwrap().routes.push((pin, route));
        }
        fn inject(&mut self, pin: usize, msi: MsiMessage) {
            self.0.lock().unwrap().injected.push((pin, msi));
        }
    }

    fn rig() -> (Ioapic, Recorder) {
        let r = Recorder::default();
        (Ioapic::new(Box::new(r.clone())), r)
    }

    fn write_reg(io: &mut Ioapic, reg: u32, v: u32) {
        io.write(IOREGSEL, &reg.to_le_bytes());
        io.write(IOWIN, &v.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, reg: u32) -> u32 {
        io.write(IOREGSEL, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        io.read(IOWIN, &mut b);
        u32::from_le_bytes(b)
    }

    /// Programs pin's entry as Linux does: high dword first, then the low one.
    fn program(io: &mut Ioapic, pin: u32, low: u32, dest: u32) {
        write_reg(io, IOREDTBL + 2 * pin + 1, dest << 24);
        write_reg(io, IOREDTBL + 2 * pin, low);
    }

    #[test]
    fn version_entries_masked_at_reset_and_narrow_accesses_ignored() {
        let (mut io, r) = rig();
        assert_eq!(read_reg(&mut io, IOAPICVER), 0x0017_0020);
        for pin in 0..IOAPIC_NUM_PINS as u32 {
            assert_eq!(read_reg(&mut io, IOREDTBL + 2 * pin), MASKED as u32);
        }
        let mut b = [0xffu8; 2];
        io.read(IOWIN, &mut b);
        assert_eq!(b, [0, 0]);
        io.write(IOREGSEL, &[0x10]); // one byte: ignored
        write_reg(&mut io, 0x7f, 1); // no such register
        write_reg(&mut io, IOAPICVER, 0); // read-only
        assert_eq!(read_reg(&mut io, IOAPICVER), 0x0017_0020);
        assert!(r.0.lock().unwrap().routes.is_empty());
    }

    #[test]
    fn an_unmasked_edge_entry_becomes_its_msi_route_and_masking_removes_it() {
        let (mut io, r) = rig();
        program(&mut io, 4, 0x0000_0031 | MASKED as u32, 2); // still masked: no route
        assert!(r.0.lock().unwrap().routes.is_empty());
        write_reg(&mut io, IOREDTBL + 8, 0x31); // unmask
        let msi = MsiMessage {
            address: 0xfee0_2000,
            data: 0x31,
        };
        assert_eq!(r.0.lock().unwrap().routes, vec![(4, Some((msi, false)))]);
        // The same value again changes nothing, so costs no routing update.
        write_reg(&mut io, IOREDTBL + 8, 0x31);
        assert_eq!(r.0.lock().unwrap().routes.len(), 1);
        write_reg(&mut io, IOREDTBL + 8, 0x31 | MASKED as u32);
        assert_eq!(r.0.lock().unwrap().routes[1], (4, None));
        // Edge lines are never injected by the model.
        assert!(r.0.lock().unwrap().injected.is_empty());
    }

    #[test]
    fn logical_destination_lowest_priority_and_undeliverable_modes() {
        let (mut io, r) = rig();
        program(&mut io, 5, 0x40 | (1 << 8) | DEST_MODE_LOGICAL as u32, 0x0f);
        program(&mut io, 6, 0x41 | (7 << 8), 0); // ExtINT: no MSI form
        let routes = &r.0.lock().unwrap().routes;
        assert_eq!(
            routes[0],
            (
                5,
                Some((
                    MsiMessage {
                        address: 0xfee0_f004,
                        data: 0x140
                    },
                    false
                ))
            )
        );
        assert_eq!(routes.len(), 1);
    }

    #[test]
    fn level_lines_wait_for_eoi_and_are_redelivered_while_high() {
        let (mut io, r) = rig();
        let low = 0x50 | TRIGGER_LEVEL as u32;
        program(&mut io, 10, low, 0);
        let msi = MsiMessage {
            address: 0xfee0_0000,
            data: 0x50 | (1 << 15) | (1 << 14),
        };
        assert_eq!(r.0.lock().unwrap().routes, vec![(10, Some((msi, true)))]);
        io.set_level(10, true);
        assert_eq!(r.0.lock().unwrap().injected, vec![(10, msi)]);
        assert_ne!(io.entry(10).unwrap() & REMOTE_IRR, 0, "Remote IRR set");
        // Still high, but Remote IRR holds it until the EOI.
        io.set_level(10, true);
        assert_eq!(r.0.lock().unwrap().injected.len(), 1);
        // An EOI for another vector changes nothing.
        io.end_of_interrupt(0x51);
        assert_eq!(r.0.lock().unwrap().injected.len(), 1);
        // EOI while the line is still high: delivered again.
        io.end_of_interrupt(0x50);
        assert_eq!(r.0.lock().unwrap().injected.len(), 2);
        // The device lowers the line (the driver read its ISR); EOI: nothing more.
        io.set_level(10, false);
        io.end_of_interrupt(0x50);
        assert_eq!(r.0.lock().unwrap().injected.len(), 2);
        assert_eq!(io.entry(10).unwrap() & REMOTE_IRR, 0);
        // Remote IRR is read-only for the guest.
        write_reg(&mut io, IOREDTBL + 20, low | REMOTE_IRR as u32);
        assert_eq!(io.entry(10).unwrap() & REMOTE_IRR, 0);
    }

    #[test]
    fn a_level_line_raised_while_masked_is_delivered_once_on_unmask() {
        let (mut io, r) = rig();
        let low = 0x60 | TRIGGER_LEVEL as u32;
        program(&mut io, 11, low | MASKED as u32, 0);
        io.set_level(11, true);
        io.set_level(11, true);
        assert!(r.0.lock().unwrap().injected.is_empty(), "masked: nothing");
        write_reg(&mut io, IOREDTBL + 22, low);
        assert_eq!(r.0.lock().unwrap().injected.len(), 1, "once on unmask");
        write_reg(&mut io, IOREDTBL + 22, low);
        assert_eq!(r.0.lock().unwrap().injected.len(), 1);
        // The version-0x20 EOI register works like the local APIC's EOI.
        io.write(IOEOI, &0x60u32.to_le_bytes());
        assert_eq!(r.0.lock().unwrap().injected.len(), 2);
    }
}

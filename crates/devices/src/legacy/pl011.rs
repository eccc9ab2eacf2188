//! The ARM PrimeCell UART (PL011) as a register model, after the PL011 Technical Reference
//! Manual (ARM DDI 0183G, r1p5; section numbers below are that document's).
//!
//! `vm-superio` 0.8 has a 16550 and a PL031 but no PL011, hence this model. Transmission is
//! instantaneous (the transmit FIFO is always empty, never busy); the receive FIFO is filled
//! by the VMM with [`Pl011::enqueue_input`]. The interrupt is an injected
//! [`vm_superio::Trigger`] (an eventfd registered as a KVM irqfd in production), raised when
//! the masked interrupt status (UARTRIS & UARTIMSC) goes from zero to non-zero: KVM injects an
//! irqfd as an edge, and the device tree declares the line edge-rising.

use std::collections::VecDeque;
use std::io::Write;

use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::limiter::WarnLimiter;

/// Register offsets (section 3.2 "Summary of registers", table 3-1).
const UARTDR: u64 = 0x000;
const UARTRSR_ECR: u64 = 0x004;
const UARTFR: u64 = 0x018;
const UARTILPR: u64 = 0x020;
const UARTIBRD: u64 = 0x024;
const UARTFBRD: u64 = 0x028;
const UARTLCR_H: u64 = 0x02c;
const UARTCR: u64 = 0x030;
const UARTIFLS: u64 = 0x034;
const UARTIMSC: u64 = 0x038;
const UARTRIS: u64 = 0x03c;
const UARTMIS: u64 = 0x040;
const UARTICR: u64 = 0x044;
const UARTDMACR: u64 = 0x048;
/// UARTPeriphID0-3 then UARTPCellID0-3, one byte per word (sections 3.3.14-3.3.15).
const ID_START: u64 = 0xfe0;
const ID_BYTES: [u8; 8] = [0x11, 0x10, 0x04, 0x00, 0x0d, 0xf0, 0x05, 0xb1];
/// The register page (section 3.1).
pub const PL011_SIZE: u64 = 0x1000;

/// UARTFR bits (section 3.3.3).
const FR_BUSY: u32 = 1 << 3;
const FR_RXFE: u32 = 1 << 4;
const FR_TXFF: u32 = 1 << 5;
const FR_RXFF: u32 = 1 << 6;
const FR_TXFE: u32 = 1 << 7;
/// UARTLCR_H.FEN: FIFOs enabled (section 3.3.7).
const LCR_H_FEN: u32 = 1 << 4;
/// UARTCR bits (section 3.3.8).
const CR_UARTEN: u32 = 1 << 0;
const CR_LBE: u32 = 1 << 7;
const CR_RXE: u32 = 1 << 9;
/// UARTCR reset value: TXE and RXE set, the UART itself disabled.
const CR_RESET: u32 = 0x0300;
/// UARTIFLS reset value: both FIFOs interrupt at half full (section 3.3.9).
const IFLS_RESET: u32 = 0x12;
/// Interrupt bits shared by UARTIMSC/RIS/MIS/ICR (sections 3.3.10-3.3.13).
pub const INT_RX: u32 = 1 << 4;
pub const INT_TX: u32 = 1 << 5;
pub const INT_RT: u32 = 1 << 6;
const INT_MASK: u32 = 0x7ff;

/// Depth of each FIFO (section 2.4.2: 16 entries); one holding register with FEN clear.
pub const FIFO_DEPTH: usize = 16;

/// What went wrong inside the UART (logged; the guest keeps running).
#[derive(Debug, thiserror::Error)]
pub enum Pl011Error {
    /// The console's writer failed (a closed pipe, a full disk).
    #[error("PL011 output: {0}")]
    Output(#[source] std::io::Error),
    /// The interrupt could not be raised.
    #[error("PL011 interrupt: {0}")]
    Interrupt(String),
    /// An access the PL011's APB interface does not decode.
    #[error("PL011 {width}-byte access at offset {offset:#x} ignored")]
    Access { offset: u64, width: usize },
}

/// A PL011 whose transmitted bytes go to `out`, with its interrupt on `T`.
pub struct Pl011<T: Trigger> {
    rx: VecDeque<u8>,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
    ris: u32,
    dmacr: u32,
    /// Whether UARTMIS was non-zero after the last update (the trigger fires on the rise).
    asserted: bool,
    interrupt: T,
    out: Box<dyn Write + Send>,
    log: WarnLimiter,
}

impl<T: Trigger> Pl011<T> {
    pub fn new(interrupt: T, out: Box<dyn Write + Send>) -> Self {
        Self {
            rx: VecDeque::with_capacity(FIFO_DEPTH),
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            imsc: 0,
            ris: 0,
            dmacr: 0,
            asserted: false,
            interrupt,
            out,
            log: WarnLimiter::default(),
        }
    }

    /// Queues host input for the guest; returns how many bytes were taken (the receive FIFO
    /// has room for `FIFO_DEPTH`, one with FIFOs disabled). A disabled receiver takes none,
    /// as hardware would drop them (section 3.3.8, RXE and UARTEN).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        if self.cr & (CR_UARTEN | CR_RXE) != CR_UARTEN | CR_RXE {
            return 0;
        }
        let n = self.receive(input);
        let r = self.update_interrupt();
        self.log_err(r);
        n
    }

    fn depth(&self) -> usize {
        if self.lcr_h & LCR_H_FEN != 0 {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// The receive FIFO level at which UARTRIS.RXRIS is set: UARTIFLS.RXIFLSEL (bits 5:3) of
    /// 1/8, 1/4, 1/2, 3/4 or 7/8 full (section 3.3.9); one byte with FIFOs disabled.
    fn rx_trigger(&self) -> usize {
        if self.lcr_h & LCR_H_FEN == 0 {
            return 1;
        }
        match (self.ifls >> 3) & 7 {
            0 => FIFO_DEPTH / 8,
            1 => FIFO_DEPTH / 4,
            3 => FIFO_DEPTH * 3 / 4,
            4 => FIFO_DEPTH * 7 / 8,
            // 2 and the reserved encodings.
            _ => FIFO_DEPTH / 2,
        }
    }

    fn receive(&mut self, input: &[u8]) -> usize {
        let room = self.depth().saturating_sub(self.rx.len());
        let n = room.min(input.len());
        self.rx.extend(&input[..n]);
        self.update_rx_status();
        n
    }

    /// RXRIS follows the FIFO level against the trigger; RTRIS (receive timeout) stands for
    /// data below the trigger that nothing else will follow: the host has handed over all it
    /// had. Both clear when the FIFO empties (section 3.4.3 "UARTRXINTR", 3.4.4 "UARTRTINTR").
    fn update_rx_status(&mut self) {
        let level = self.rx.len();
        if level >= self.rx_trigger() {
            self.ris |= INT_RX;
        } else {
            self.ris &= !INT_RX;
        }
        if level > 0 && level < self.rx_trigger() {
            self.ris |= INT_RT;
        } else if level == 0 {
            self.ris &= !INT_RT;
        }
    }

    fn read_dr(&mut self) -> u32 {
        // An empty FIFO reads as 0; no framing, parity, break or overrun errors happen here,
        // so bits 11:8 are always clear.
        let byte = self.rx.pop_front().unwrap_or(0);
        self.update_rx_status();
        u32::from(byte)
    }

    fn write_dr(&mut self, byte: u8) -> Result<(), Pl011Error> {
        // Hardware sends only with UARTEN and TXE set; Linux's earlycon writes to a UART that
        // firmware would have enabled, and there is no firmware here, so send regardless
        // (QEMU does the same).
        let sent = if self.cr & CR_LBE != 0 {
            // Loopback: the transmitted byte arrives at the receiver (section 3.3.8, LBE).
            self.receive(&[byte]);
            Ok(())
        } else {
            self.out
                .write_all(&[byte])
                .and_then(|()| self.out.flush())
                .map_err(Pl011Error::Output)
        };
        // The byte left at once: the transmit FIFO is empty, at or below any trigger level
        // (section 3.4.2 "UARTTXINTR").
        self.ris |= INT_TX;
        sent
    }

    fn flags(&self) -> u32 {
        let mut fr = FR_TXFE;
        if self.rx.is_empty() {
            fr |= FR_RXFE;
        }
        if self.rx.len() >= self.depth() {
            fr |= FR_RXFF;
        }
        // Never busy, never full: transmission is instantaneous.
        debug_assert_eq!(fr & (FR_BUSY | FR_TXFF), 0);
        fr
    }

    /// Reads the 32-bit register at `offset` (word aligned).
    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            UARTDR => self.read_dr(),
            // Errors are never latched (see `read_dr`).
            UARTRSR_ECR => 0,
            UARTFR => self.flags(),
            UARTILPR => self.ilpr,
            UARTIBRD => self.ibrd,
            UARTFBRD => self.fbrd,
            UARTLCR_H => self.lcr_h,
            UARTCR => self.cr,
            UARTIFLS => self.ifls,
            UARTIMSC => self.imsc,
            UARTRIS => self.ris,
            UARTMIS => self.ris & self.imsc,
            UARTDMACR => self.dmacr,
            ID_START..=0xffc => u32::from(ID_BYTES[((offset - ID_START) / 4) as usize]),
            // UARTICR is write-only; reserved words read as zero.
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `offset` (word aligned); field widths per table 3-1.
    fn write_reg(&mut self, offset: u64, val: u32) -> Result<(), Pl011Error> {
        let mut sent = Ok(());
        match offset {
            UARTDR => sent = self.write_dr(val as u8),
            // UARTECR: any write clears the error flags, which are never set here.
            UARTRSR_ECR => {}
            UARTILPR => self.ilpr = val & 0xff,
            UARTIBRD => self.ibrd = val & 0xffff,
            UARTFBRD => self.fbrd = val & 0x3f,
            UARTLCR_H => {
                self.lcr_h = val & 0xff;
                // Disabling the FIFOs leaves a one-byte holding register: keep what is
                // queued, but the levels are now measured against it.
                self.update_rx_status();
            }
            UARTCR => self.cr = val & 0xffff,
            UARTIFLS => {
                self.ifls = val & 0x3f;
                self.update_rx_status();
            }
            UARTIMSC => self.imsc = val & INT_MASK,
            UARTICR => self.ris &= !(val & INT_MASK),
            UARTDMACR => self.dmacr = val & 0x7,
            // UARTFR, UARTRIS, UARTMIS and the ID registers are read-only.
            _ => {}
        }
        let raised = self.update_interrupt();
        sent.and(raised)
    }

    /// Raises the interrupt when UARTMIS becomes non-zero (section 3.4.6 "UARTINTR": the OR
    /// of the masked sources).
    fn update_interrupt(&mut self) -> Result<(), Pl011Error> {
        let asserted = self.ris & self.imsc != 0;
        let rose = asserted && !self.asserted;
        self.asserted = asserted;
        if rose {
            self.interrupt
                .trigger()
                .map_err(|e| Pl011Error::Interrupt(format!("{e:?}")))?;
        }
        Ok(())
    }

    fn log_err(&mut self, r: Result<(), Pl011Error>) {
        if let Err(e) = r {
            if self.log.allow() {
                tracing::debug!("{e}");
            }
        }
    }

    /// The register word and byte lane of an access: 1, 2 or 4 bytes inside one word
    /// (section 3.1: the registers are word-aligned; Linux's driver uses 16-bit accesses
    /// and its earlycon 8-bit ones).
    fn decode(offset: u64, width: usize) -> Option<(u64, u32)> {
        let lane = (offset % 4) as usize;
        let fits = matches!(width, 1 | 2 | 4) && lane + width <= 4 && offset < PL011_SIZE;
        fits.then_some((offset - lane as u64, (lane * 8) as u32))
    }
}

impl<T: Trigger + Send> BusDevice for Pl011<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some((reg, shift)) = Self::decode(offset, data.len()) else {
            data.fill(0xff);
            let width = data.len();
            self.log_err(Err(Pl011Error::Access { offset, width }));
            return;
        };
        let val = self.read_reg(reg) >> shift;
        let bytes = val.to_le_bytes();
        let n = data.len();
        data.copy_from_slice(&bytes[..n]);
        // Reading UARTDR may have lowered the receive interrupts.
        let r = self.update_interrupt();
        self.log_err(r);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some((reg, shift)) = Self::decode(offset, data.len()) else {
            let width = data.len();
            self.log_err(Err(Pl011Error::Access { offset, width }));
            return;
        };
        // A narrow write puts its bytes in their lanes with the others zero, as an APB
        // bridge without byte strobes presents it.
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let val = u32::from_le_bytes(bytes) << shift;
        let r = self.write_reg(reg, val);
        self.log_err(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Counter(Arc<AtomicU32>);
    impl Trigger for Counter {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    impl Counter {
        fn get(&self) -> u32 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Pl011<Counter>, Counter, Captured) {
        let irq = Counter::default();
        let out = Captured::default();
        (Pl011::new(irq.clone(), Box::new(out.clone())), irq, out)
    }

    fn r32(u: &mut Pl011<Counter>, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        u.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w32(u: &mut Pl011<Counter>, offset: u64, val: u32) {
        u.write(offset, &val.to_le_bytes());
    }

    /// What Linux's pl011_startup/set_termios do: 8N1 with FIFOs, UART, TX and RX enabled.
    fn enable(u: &mut Pl011<Counter>) {
        w32(u, UARTIBRD, 13);
        w32(u, UARTFBRD, 1);
        w32(u, UARTLCR_H, LCR_H_FEN | 0x60);
        w32(u, UARTCR, CR_UARTEN | 0x300);
    }

    #[test]
    fn reset_values_and_primecell_ids() {
        let (mut u, irq, _) = uart();
        assert_eq!(r32(&mut u, UARTFR), FR_TXFE | FR_RXFE);
        assert_eq!(r32(&mut u, UARTCR), 0x300);
        assert_eq!(r32(&mut u, UARTIFLS), 0x12);
        assert_eq!(r32(&mut u, UARTIMSC), 0);
        assert_eq!(r32(&mut u, UARTRIS), 0);
        assert_eq!(r32(&mut u, UARTMIS), 0);
        assert_eq!(r32(&mut u, UARTRSR_ECR), 0);
        // The AMBA bus driver assembles these into the periph and cell IDs.
        let id = |u: &mut Pl011<Counter>, base: u64| {
            (0..4).fold(0u32, |acc, i| {
                acc | (r32(u, base + 4 * i) & 0xff) << (8 * i)
            })
        };
        assert_eq!(id(&mut u, 0xfe0), 0x0004_1011);
        assert_eq!(id(&mut u, 0xff0), 0xb105_f00d);
        assert_eq!(irq.get(), 0);
    }

    #[test]
    fn writable_registers_keep_their_field_widths() {
        let (mut u, _, _) = uart();
        for (reg, mask) in [
            (UARTILPR, 0xff),
            (UARTIBRD, 0xffff),
            (UARTFBRD, 0x3f),
            (UARTLCR_H, 0xff),
            (UARTCR, 0xffff),
            (UARTIFLS, 0x3f),
            (UARTIMSC, 0x7ff),
            (UARTDMACR, 0x7),
        ] {
            w32(&mut u, reg, 0xffff_ffff);
            assert_eq!(r32(&mut u, reg), mask, "{reg:#x}");
            w32(&mut u, reg, 0);
            assert_eq!(r32(&mut u, reg), 0, "{reg:#x}");
        }
        // Read-only registers ignore writes.
        w32(&mut u, UARTFR, 0);
        assert_eq!(r32(&mut u, UARTFR), FR_TXFE | FR_RXFE);
        w32(&mut u, 0xfe0, 0);
        assert_eq!(r32(&mut u, 0xfe0), 0x11);
    }

    #[test]
    fn transmit_reaches_output_and_raises_tx_interrupt_once() {
        let (mut u, irq, out) = uart();
        enable(&mut u);
        for b in b"hi\n" {
            w32(&mut u, UARTDR, u32::from(*b));
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // TXRIS is set but masked: no interrupt yet.
        assert_eq!(r32(&mut u, UARTRIS) & INT_TX, INT_TX);
        assert_eq!(r32(&mut u, UARTMIS), 0);
        assert_eq!(irq.get(), 0);
        // Unmasking a pending source raises the line; more pending bits do not raise it again.
        w32(&mut u, UARTIMSC, INT_TX);
        assert_eq!(irq.get(), 1);
        w32(&mut u, UARTDR, u32::from(b'!'));
        assert_eq!(irq.get(), 1);
        // Clearing it drops the line; the next transmission raises it again.
        w32(&mut u, UARTICR, INT_TX);
        assert_eq!(r32(&mut u, UARTMIS), 0);
        w32(&mut u, UARTDR, u32::from(b'?'));
        assert_eq!(irq.get(), 2);
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n!?");
        assert_eq!(r32(&mut u, UARTFR) & (FR_BUSY | FR_TXFF), 0);
    }

    #[test]
    fn receive_fifo_fills_to_its_depth_and_drains_in_order() {
        let (mut u, irq, _) = uart();
        // A disabled UART takes no input.
        assert_eq!(u.enqueue_input(b"x"), 0);
        enable(&mut u);
        w32(&mut u, UARTIMSC, INT_RX | INT_RT);
        let input: Vec<u8> = (0..20).collect();
        assert_eq!(u.enqueue_input(&input), FIFO_DEPTH);
        assert_eq!(u.enqueue_input(&input), 0, "full");
        assert_eq!(r32(&mut u, UARTFR) & (FR_RXFF | FR_RXFE), FR_RXFF);
        // At or above the trigger level (half full at reset): RXRIS, one interrupt.
        assert_eq!(r32(&mut u, UARTMIS), INT_RX);
        assert_eq!(irq.get(), 1);
        for i in 0..FIFO_DEPTH as u32 {
            let dr = r32(&mut u, UARTDR);
            assert_eq!(dr, i, "in order, no error bits");
        }
        assert_eq!(r32(&mut u, UARTFR) & FR_RXFE, FR_RXFE);
        assert_eq!(r32(&mut u, UARTRIS) & (INT_RX | INT_RT), 0);
        assert_eq!(r32(&mut u, UARTDR), 0, "empty FIFO reads 0");
        // A few bytes below the trigger: the receive timeout interrupt instead.
        assert_eq!(u.enqueue_input(b"ab"), 2);
        assert_eq!(r32(&mut u, UARTMIS), INT_RT);
        assert_eq!(irq.get(), 2);
        assert_eq!(r32(&mut u, UARTDR), u32::from(b'a'));
        assert_eq!(r32(&mut u, UARTMIS), INT_RT, "still data");
        assert_eq!(r32(&mut u, UARTDR), u32::from(b'b'));
        assert_eq!(r32(&mut u, UARTMIS), 0, "cleared once empty");
    }

    #[test]
    fn trigger_levels_follow_ifls_and_fifo_enable() {
        let (mut u, _, _) = uart();
        enable(&mut u);
        // RXIFLSEL = 0b000: 1/8 of 16 = 2 bytes.
        w32(&mut u, UARTIFLS, 0);
        assert_eq!(u.enqueue_input(b"a"), 1);
        assert_eq!(r32(&mut u, UARTRIS) & (INT_RX | INT_RT), INT_RT);
        assert_eq!(u.enqueue_input(b"b"), 1);
        assert_eq!(r32(&mut u, UARTRIS) & (INT_RX | INT_RT), INT_RX | INT_RT);
        // Writing ICR clears RTRIS while data remains; RXRIS follows the level.
        w32(&mut u, UARTICR, INT_RT);
        assert_eq!(r32(&mut u, UARTRIS) & (INT_RX | INT_RT), INT_RX);
        // RXIFLSEL = 0b100: 7/8 = 14 bytes; two queued are now below it.
        w32(&mut u, UARTIFLS, 4 << 3);
        assert_eq!(r32(&mut u, UARTRIS) & INT_RX, 0);
        while r32(&mut u, UARTFR) & FR_RXFE == 0 {
            r32(&mut u, UARTDR);
        }
        // FIFOs disabled: a one-byte holding register, RXRIS on every byte.
        w32(&mut u, UARTLCR_H, 0x60);
        assert_eq!(u.enqueue_input(b"xyz"), 1);
        assert_eq!(r32(&mut u, UARTFR) & FR_RXFF, FR_RXFF);
        assert_eq!(r32(&mut u, UARTRIS) & INT_RX, INT_RX);
        assert_eq!(r32(&mut u, UARTDR), u32::from(b'x'));
        assert_eq!(r32(&mut u, UARTRIS) & INT_RX, 0);
    }

    #[test]
    fn loopback_sends_to_the_receiver() {
        let (mut u, _, out) = uart();
        enable(&mut u);
        w32(&mut u, UARTCR, CR_UARTEN | CR_LBE | 0x300);
        w32(&mut u, UARTDR, u32::from(b'L'));
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(r32(&mut u, UARTDR), u32::from(b'L'));
    }

    #[test]
    fn narrow_accesses_use_byte_lanes_and_bad_ones_are_ignored() {
        let (mut u, _, out) = uart();
        enable(&mut u);
        // 8- and 16-bit writes to UARTDR (earlycon, Linux's default 16-bit I/O).
        u.write(UARTDR, b"A");
        u.write(UARTDR, &[b'B', 0]);
        assert_eq!(&*out.0.lock().unwrap(), b"AB");
        // A 16-bit read of UARTFR, a byte read of an ID register.
        let mut h = [0u8; 2];
        u.read(UARTFR, &mut h);
        assert_eq!(u16::from_le_bytes(h), (FR_TXFE | FR_RXFE) as u16);
        let mut b = [0u8];
        u.read(0xff4, &mut b);
        assert_eq!(b[0], 0xf0);
        // The upper half of UARTCR through a 16-bit access at offset 2 reads zero; a byte
        // at offset 1 is CR[15:8].
        u.read(UARTCR + 2, &mut h);
        assert_eq!(h, [0, 0]);
        u.read(UARTCR + 1, &mut b);
        assert_eq!(b[0], 0x03);
        // A byte write to lane 1 of UARTIBRD sets bits 15:8 and zeroes the rest.
        u.write(UARTIBRD + 1, &[0x12]);
        assert_eq!(r32(&mut u, UARTIBRD), 0x1200);
        // Crossing a word, 8-byte or 3-byte accesses: reads all ones, writes dropped.
        let mut d = [0u8; 4];
        u.read(UARTCR + 2, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut q = [0u8; 8];
        u.read(UARTDR, &mut q);
        assert_eq!(q, [0xff; 8]);
        u.write(UARTDR, &[b'C', 0, 0]);
        u.write(UARTDR + 2, &[b'D', 0, 0, 0]);
        u.write(PL011_SIZE, b"E");
        assert_eq!(&*out.0.lock().unwrap(), b"AB");
        // Reserved words read as zero.
        assert_eq!(r32(&mut u, 0x100), 0);
    }

    #[test]
    fn a_failing_output_does_not_stop_the_uart() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let irq = Counter::default();
        let mut u = Pl011::new(irq.clone(), Box::new(Broken));
        w32(&mut u, UARTIMSC, INT_TX);
        w32(&mut u, UARTDR, u32::from(b'x'));
        // The guest still sees the byte leave and its interrupt.
        assert_eq!(irq.get(), 1);
        assert_eq!(r32(&mut u, UARTFR) & FR_TXFE, FR_TXFE);
    }
}

//! Base Address Registers (PCI 3.0 §6.2.5.1): what a BAR decodes, how its register encodes
//! type and address, and how size probing reads back.
//!
//! A BAR's register keeps its type in the low bits (read-only) and its address in the bits
//! above the size (writable); the bits in between are read-only zeros. Writing all ones
//! (or `0xFFFF_FFF0`) therefore reads back the size mask with the type bits, which is how a
//! guest sizes a BAR. [`ConfigurationSpace`](crate::ConfigurationSpace) stores BAR registers
//! with that writable mask and tells its user when a decoding BAR moves ([`BarMove`]).

/// Type bits of a memory BAR (§6.2.5.1): bits 2:1 are the locatable type.
const MEMORY_TYPE_64: u32 = 0b10 << 1;
const MEMORY_PREFETCHABLE: u32 = 1 << 3;
/// Bit 0 set: an I/O BAR.
const IO_SPACE: u32 = 1;
/// Read-only low bits of each register kind: memory 3:0, I/O 1:0.
const MEMORY_LOW_BITS: u32 = 0xf;
const IO_LOW_BITS: u32 = 0x3;

/// Smallest sizes the spec allows (§6.2.5.1: memory 16 bytes, I/O 4 bytes) and the largest
/// I/O BAR (256 bytes).
pub const MIN_MEMORY_BAR_SIZE: u64 = 16;
pub const MIN_IO_BAR_SIZE: u64 = 4;
pub const MAX_IO_BAR_SIZE: u64 = 256;

/// The address space a BAR decodes, and its register width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// I/O space (one register; addresses up to 32 bits, x86 decodes 16).
    Io,
    /// Memory space below 4 GiB (one register).
    Memory32,
    /// Memory space anywhere in 64 bits (this register and the next one, the upper dword).
    Memory64,
}

/// What a BAR is: its kind, its size (a power of two) and, for memory, prefetchability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Bar {
    pub kind: BarKind,
    pub size: u64,
    pub prefetchable: bool,
}

/// A BAR as a device reports it: its index (0-5; a 64-bit BAR uses index and index + 1) and
/// where it decodes now (the last applied address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    pub index: u8,
    pub bar: Bar,
    pub address: u64,
}

/// A decoding BAR the guest moved: from the last applied address `old` to `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarMove {
    pub index: u8,
    pub bar: Bar,
    pub old: u64,
    pub new: u64,
}

/// Why the VMM refused a BAR move; the BAR keeps decoding at its old address and its
/// register reads back that address.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BarMoveRefused {
    /// The new range overlaps guest RAM.
    #[error("the new range overlaps guest RAM")]
    GuestRam,
    /// The new range overlaps another BAR or a fixed device region.
    #[error("the new range overlaps {other}")]
    Overlap { other: String },
    /// The new range is outside the segment's window for this kind of BAR.
    #[error("the new range is outside the PCI window")]
    OutsideWindow,
    /// The VMM could not move the region on its bus.
    #[error("the VMM could not move the region: {reason}")]
    Unavailable { reason: String },
}

/// How a configuration space asks its user to apply a BAR move: `Ok` once the BAR decodes
/// at `new`, or why not (the register is then rolled back to `old`). The segment passes a
/// closure that adds the device's address and calls the VMM's [`BarMapper`](crate::BarMapper).
pub type MoveBar<'a> = dyn FnMut(&BarMove) -> Result<(), BarMoveRefused> + 'a;

impl Bar {
    /// The read-only type bits of the (lower) register.
    pub fn type_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => IO_SPACE,
            BarKind::Memory32 => self.prefetch_bit(),
            BarKind::Memory64 => MEMORY_TYPE_64 | self.prefetch_bit(),
        }
    }

    fn prefetch_bit(&self) -> u32 {
        if self.prefetchable {
            MEMORY_PREFETCHABLE
        } else {
            0
        }
    }

    /// Address bits the guest can set: those at and above the size, as wide as the kind.
    pub fn address_mask(&self) -> u64 {
        let width = match self.kind {
            BarKind::Io | BarKind::Memory32 => u64::from(u32::MAX),
            BarKind::Memory64 => u64::MAX,
        };
        !(self.size.max(1) - 1) & width
    }

    /// Writable bits of the lower register.
    pub fn writable_low(&self) -> u32 {
        let low_bits = match self.kind {
            BarKind::Io => IO_LOW_BITS,
            BarKind::Memory32 | BarKind::Memory64 => MEMORY_LOW_BITS,
        };
        self.address_mask() as u32 & !low_bits
    }

    /// Writable bits of the upper register (64-bit BARs only).
    pub fn writable_high(&self) -> u32 {
        match self.kind {
            BarKind::Memory64 => (self.address_mask() >> 32) as u32,
            BarKind::Io | BarKind::Memory32 => 0,
        }
    }

    /// The lower and upper register values for `address` (the upper is 0 unless 64-bit).
    pub fn encode(&self, address: u64) -> (u32, u32) {
        let low = (address as u32 & self.writable_low()) | self.type_bits();
        let high = (address >> 32) as u32 & self.writable_high();
        (low, high)
    }

    /// The address the registers hold.
    pub fn decode(&self, low: u32, high: u32) -> u64 {
        let low = u64::from(low & self.writable_low());
        match self.kind {
            BarKind::Memory64 => low | u64::from(high & self.writable_high()) << 32,
            BarKind::Io | BarKind::Memory32 => low,
        }
    }

    /// Whether registers holding `address` are a size probe rather than a place: every
    /// writable address bit set, or for a 64-bit BAR the upper dword's (nothing decodes
    /// up there). A probe is never reported as a move.
    pub fn is_probe(&self, address: u64) -> bool {
        let mask = self.address_mask();
        match self.kind {
            BarKind::Memory64 => {
                let high = mask & !u64::from(u32::MAX);
                address & high == high
            }
            BarKind::Io | BarKind::Memory32 => address & mask == mask,
        }
    }

    /// The number of registers the BAR takes.
    pub fn registers(&self) -> usize {
        match self.kind {
            BarKind::Memory64 => 2,
            BarKind::Io | BarKind::Memory32 => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(kind: BarKind, size: u64, prefetchable: bool) -> Bar {
        Bar {
            kind,
            size,
            prefetchable,
        }
    }

    #[test]
    fn type_bits_follow_the_spec() {
        assert_eq!(bar(BarKind::Io, 32, false).type_bits(), 0b01);
        assert_eq!(bar(BarKind::Memory32, 4096, false).type_bits(), 0b0000);
        assert_eq!(bar(BarKind::Memory32, 4096, true).type_bits(), 0b1000);
        assert_eq!(bar(BarKind::Memory64, 4096, false).type_bits(), 0b0100);
        assert_eq!(bar(BarKind::Memory64, 4096, true).type_bits(), 0b1100);
    }

    #[test]
    fn writable_bits_are_the_address_above_the_size() {
        let m32 = bar(BarKind::Memory32, 0x1000, false);
        assert_eq!(m32.writable_low(), 0xffff_f000);
        assert_eq!(m32.writable_high(), 0);
        let io = bar(BarKind::Io, 0x20, false);
        assert_eq!(io.writable_low(), 0xffff_ffe0);
        // Tiny BARs keep the type bits read-only even when the size would free them.
        assert_eq!(bar(BarKind::Io, 4, false).writable_low(), 0xffff_fffc);
        assert_eq!(
            bar(BarKind::Memory32, 16, false).writable_low(),
            0xffff_fff0
        );
        let m64 = bar(BarKind::Memory64, 0x4000, true);
        assert_eq!(m64.writable_low(), 0xffff_c000);
        assert_eq!(m64.writable_high(), 0xffff_ffff);
        let huge = bar(BarKind::Memory64, 1 << 33, false);
        assert_eq!(huge.writable_low(), 0);
        assert_eq!(huge.writable_high(), 0xffff_fffe);
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let m64 = bar(BarKind::Memory64, 0x4000, true);
        let (low, high) = m64.encode(0x1_2345_8000);
        assert_eq!(low, 0x2345_800c);
        assert_eq!(high, 1);
        assert_eq!(m64.decode(low, high), 0x1_2345_8000);
        let io = bar(BarKind::Io, 0x20, false);
        assert_eq!(io.encode(0xc040), (0xc041, 0));
        assert_eq!(io.decode(0xc041, 0xdead), 0xc040);
    }

    #[test]
    fn probes_are_all_ones_in_the_address_bits() {
        let m32 = bar(BarKind::Memory32, 0x1000, false);
        assert!(m32.is_probe(m32.decode(0xffff_ffff, 0)));
        assert!(m32.is_probe(m32.decode(0xffff_fff0, 0)));
        assert!(!m32.is_probe(0xc000_0000));
        let m64 = bar(BarKind::Memory64, 0x4000, false);
        assert!(m64.is_probe(m64.decode(0xffff_ffff, 0xffff_ffff)));
        // The upper dword alone probing (Linux writes the lower one first).
        assert!(m64.is_probe(m64.decode(0xc000_0000, 0xffff_ffff)));
        assert!(!m64.is_probe(m64.decode(0xffff_ffff, 0)));
    }
}

//! A function's configuration space (PCI 3.0 §6; PCIe 6.0 §7.5): 256 bytes for conventional
//! PCI, 4 KiB for the extended space ECAM reaches, kept as dwords with a writable mask and a
//! write-1-to-clear mask per register, so read-only bits stay whatever the guest writes.
//!
//! Accesses are 1, 2 or 4 bytes and must lie inside one dword (byte enables within one
//! DW, as a configuration request carries them, PCIe 6.0 §7.2.2.2). An access crossing a
//! dword boundary, or of any other width, is refused: a write is dropped and a read returns
//! all ones, what a root complex returns for a request it cannot complete. The refusal is
//! the same at every level (this type, [`PciSegment`](crate::PciSegment)'s 0xCFC and ECAM
//! paths), so it is never split into two accesses. Offsets past the implemented space read
//! zeros and ignore writes: a conventional function seen through ECAM has an empty extended
//! space, with no extended capability at 0x100 (PCIe 6.0 §7.6.3).
//!
//! The header is type 0 (§6.1): vireo's segments have one bus and no bridges, so there is
//! no type-1 header. The capability list starts at 0x40 (§6.7); BARs (§6.2.5.1) are stored
//! with writable masks that make size probing read back the size, and moves of a decoding
//! BAR go to the user through a [`MoveBar`] callback that can refuse them.

use devices::limiter::WarnLimiter;

use crate::bar::{
    Bar, BarInfo, BarKind, BarMove, MoveBar, MAX_IO_BAR_SIZE, MIN_IO_BAR_SIZE, MIN_MEMORY_BAR_SIZE,
};

/// Conventional configuration space (PCI 3.0 §6.1).
pub const CONFIGURATION_SPACE_SIZE: usize = 256;
/// PCI Express extended configuration space (PCIe 6.0 §7.2.2).
pub const EXTENDED_CONFIGURATION_SPACE_SIZE: usize = 4096;

// Type-0 header (PCI 3.0 §6.1, figure 6-1), byte offsets.
pub const VENDOR_ID: u16 = 0x00;
pub const DEVICE_ID: u16 = 0x02;
pub const COMMAND: u16 = 0x04;
pub const STATUS: u16 = 0x06;
pub const REVISION_ID: u16 = 0x08;
pub const CLASS_CODE: u16 = 0x09;
pub const CACHE_LINE_SIZE: u16 = 0x0c;
pub const HEADER_TYPE: u16 = 0x0e;
pub const BAR0: u16 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const SUBSYSTEM_ID: u16 = 0x2e;
pub const EXPANSION_ROM_BASE: u16 = 0x30;
pub const CAPABILITIES_POINTER: u16 = 0x34;
pub const INTERRUPT_LINE: u16 = 0x3c;
pub const INTERRUPT_PIN: u16 = 0x3d;
/// The first byte after the type-0 header: where capabilities start (§6.7).
pub const CAPABILITIES_START: u16 = 0x40;
/// Six BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;

// Command (§6.2.2).
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
pub const COMMAND_SERR_ENABLE: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The Command bits a virtual function implements; the rest are hardwired to 0.
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;

// Status (§6.2.3).
pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
pub const STATUS_MASTER_DATA_PARITY_ERROR: u16 = 1 << 8;
pub const STATUS_SIGNALED_TARGET_ABORT: u16 = 1 << 11;
pub const STATUS_RECEIVED_TARGET_ABORT: u16 = 1 << 12;
pub const STATUS_RECEIVED_MASTER_ABORT: u16 = 1 << 13;
pub const STATUS_SIGNALED_SYSTEM_ERROR: u16 = 1 << 14;
pub const STATUS_DETECTED_PARITY_ERROR: u16 = 1 << 15;
/// The error bits software clears by writing 1.
const STATUS_WRITE_1_TO_CLEAR: u16 = STATUS_MASTER_DATA_PARITY_ERROR
    | STATUS_SIGNALED_TARGET_ABORT
    | STATUS_RECEIVED_TARGET_ABORT
    | STATUS_RECEIVED_MASTER_ABORT
    | STATUS_SIGNALED_SYSTEM_ERROR
    | STATUS_DETECTED_PARITY_ERROR;

/// Header Type bit 7: the device has functions other than 0 (§6.2.1).
pub const HEADER_TYPE_MULTI_FUNCTION: u8 = 0x80;

/// Dword index of the Command/Status register and of BAR0.
const COMMAND_REGISTER: usize = COMMAND as usize / 4;
const BAR0_REGISTER: usize = BAR0 as usize / 4;

/// Errors while building a configuration space.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfigurationError {
    /// The capability does not fit between the last one and the end of the 256 bytes.
    #[error("no room for capability {id:#04x} of {len} bytes (next free offset {next:#x})")]
    NoCapabilitySpace { id: u8, len: usize, next: u16 },
    /// The writable mask of a capability is longer than its body.
    #[error("capability {id:#04x}: writable mask of {mask} bytes for a {len}-byte body")]
    CapabilityMask { id: u8, mask: usize, len: usize },
    /// There is no such BAR register (0-5, and a 64-bit BAR needs the next one too).
    #[error("BAR {index} does not exist for a {kind:?} BAR")]
    NoSuchBar { index: u8, kind: BarKind },
    /// The BAR register (or the one a 64-bit BAR needs) is taken.
    #[error("BAR {index} is already in use")]
    BarInUse { index: u8 },
    /// The size is not a power of two within what the spec allows for the kind.
    #[error("BAR {index}: {size:#x} bytes is not a valid {kind:?} BAR size")]
    BarSize { index: u8, kind: BarKind, size: u64 },
    /// The address is not aligned to the size, or does not fit the kind's width.
    #[error("BAR {index}: {address:#x} is not a valid address for a {kind:?} BAR of {size:#x}")]
    BarAddress {
        index: u8,
        kind: BarKind,
        size: u64,
        address: u64,
    },
    /// I/O BARs have no prefetchable bit.
    #[error("BAR {index}: an I/O BAR cannot be prefetchable")]
    PrefetchableIo { index: u8 },
    /// A device-side access outside the space.
    #[error("{offset:#x}+{len} is outside the {size}-byte configuration space")]
    OutOfRange {
        offset: u16,
        len: usize,
        size: usize,
    },
}

/// How much configuration space a function implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigurationSize {
    /// 256 bytes (PCI 3.0).
    Conventional,
    /// 4 KiB (PCIe extended configuration space).
    Extended,
}

impl ConfigurationSize {
    pub fn bytes(self) -> usize {
        match self {
            ConfigurationSize::Conventional => CONFIGURATION_SPACE_SIZE,
            ConfigurationSize::Extended => EXTENDED_CONFIGURATION_SPACE_SIZE,
        }
    }
}

/// Class Code (§6.2.1, PCI Code and ID Assignment): base class, sub-class, programming
/// interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassCode {
    pub base: u8,
    pub sub: u8,
    pub prog_if: u8,
}

impl ClassCode {
    /// Bridge device, host bridge (06/00/00).
    pub const HOST_BRIDGE: ClassCode = ClassCode {
        base: 0x06,
        sub: 0x00,
        prog_if: 0x00,
    };
}

/// Interrupt Pin (§6.2.4): which INTx# the function uses, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptPin {
    None = 0,
    IntA = 1,
    IntB = 2,
    IntC = 3,
    IntD = 4,
}

/// The read-only identity of a type-0 function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type0Header {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class: ClassCode,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub interrupt_pin: InterruptPin,
    pub multi_function: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarRegister {
    Unused,
    /// The (lower) register of a BAR, with where it decodes now.
    Bar {
        bar: Bar,
        applied: u64,
    },
    /// The upper dword of the 64-bit BAR in the register before.
    Upper,
}

/// Whether an access of `len` bytes at `offset` is one a configuration space answers: 1, 2
/// or 4 bytes inside one dword.
pub fn is_dword_contained(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && usize::from(offset % 4) + len <= 4
}

/// One function's configuration space.
#[derive(Debug)]
pub struct ConfigurationSpace {
    registers: Vec<u32>,
    writable: Vec<u32>,
    write_1_to_clear: Vec<u32>,
    bars: [BarRegister; BAR_COUNT],
    /// Offset of the last capability in the list (0 while there is none).
    last_capability: u16,
    /// Where the next capability goes (dword aligned).
    next_capability: u16,
    /// BAR moves the VMM refused are the guest's doing.
    log: WarnLimiter,
}

impl ConfigurationSpace {
    /// A type-0 function with `header`'s identity, decoding nothing (Command 0), no BARs and
    /// no capabilities.
    pub fn new(header: &Type0Header, size: ConfigurationSize) -> Self {
        let dwords = size.bytes() / 4;
        let mut space = Self {
            registers: vec![0; dwords],
            writable: vec![0; dwords],
            write_1_to_clear: vec![0; dwords],
            bars: [BarRegister::Unused; BAR_COUNT],
            last_capability: 0,
            next_capability: CAPABILITIES_START,
            log: WarnLimiter::default(),
        };
        let header_type = if header.multi_function {
            HEADER_TYPE_MULTI_FUNCTION
        } else {
            0
        };
        let class = header.class;
        space.registers[0] = u32::from(header.vendor_id) | u32::from(header.device_id) << 16;
        space.registers[2] = u32::from(header.revision_id)
            | u32::from(class.prog_if) << 8
            | u32::from(class.sub) << 16
            | u32::from(class.base) << 24;
        space.registers[3] = u32::from(header_type) << 16;
        space.registers[11] =
            u32::from(header.subsystem_vendor_id) | u32::from(header.subsystem_id) << 16;
        space.registers[15] = (header.interrupt_pin as u32) << 8;
        space.writable[COMMAND_REGISTER] = u32::from(COMMAND_WRITABLE);
        space.write_1_to_clear[COMMAND_REGISTER] = u32::from(STATUS_WRITE_1_TO_CLEAR) << 16;
        // Cache Line Size is read/write; Latency Timer, BIST are hardwired to 0 (PCIe
        // 6.0 §7.5.1.1.6).
        space.writable[3] = 0xff;
        // Interrupt Line is read/write for the OS's own bookkeeping (§6.2.4).
        space.writable[15] = 0xff;
        space
    }

    /// The implemented size in bytes.
    pub fn size(&self) -> usize {
        self.registers.len() * 4
    }

    /// A guest read: `data` is filled from `offset` (see the module's access rules).
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        if !is_dword_contained(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let Some(&value) = self.registers.get(usize::from(offset / 4)) else {
            data.fill(0);
            return;
        };
        let shift = u32::from(offset % 4) * 8;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (value >> (shift + 8 * i as u32)) as u8;
        }
    }

    /// A guest write of `data` at `offset`: only writable bits change, write-1-to-clear
    /// bits written as 1 clear. A write to Command or a BAR may move decoding BARs; each
    /// move goes to `move_bar`, and a refused one rolls the BAR's register back.
    pub fn write(&mut self, offset: u16, data: &[u8], move_bar: &mut MoveBar<'_>) {
        if !is_dword_contained(offset, data.len()) {
            return;
        }
        let register = usize::from(offset / 4);
        if register >= self.registers.len() {
            return;
        }
        let shift = u32::from(offset % 4) * 8;
        let mut value = 0u32;
        let mut bytes = 0u32;
        for (i, &byte) in data.iter().enumerate() {
            value |= u32::from(byte) << (shift + 8 * i as u32);
            bytes |= 0xff << (shift + 8 * i as u32);
        }
        let writable = self.writable[register] & bytes;
        let clear = self.write_1_to_clear[register] & bytes & value;
        let old = self.registers[register];
        self.registers[register] = ((old & !writable) | (value & writable)) & !clear;
        let bar_registers = BAR0_REGISTER..BAR0_REGISTER + BAR_COUNT;
        if register == COMMAND_REGISTER || bar_registers.contains(&register) {
            self.settle_bars(register, move_bar);
        }
    }

    /// Device-side read of a byte, word or dword (any offset; zeros outside the space).
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        self.read(offset, &mut b);
        b[0]
    }

    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side write of raw bytes, ignoring the masks (a device updating its own
    /// read-only fields).
    pub fn set_bytes(&mut self, offset: u16, bytes: &[u8]) -> Result<(), ConfigurationError> {
        let start = usize::from(offset);
        if start + bytes.len() > self.size() {
            return Err(ConfigurationError::OutOfRange {
                offset,
                len: bytes.len(),
                size: self.size(),
            });
        }
        for (i, &byte) in bytes.iter().enumerate() {
            let at = start + i;
            let shift = (at % 4) * 8;
            let register = &mut self.registers[at / 4];
            *register = (*register & !(0xff << shift)) | u32::from(byte) << shift;
        }
        Ok(())
    }

    /// Makes bits of the byte range writable by the guest (or read-only again), one mask
    /// byte per configuration byte.
    fn set_writable(&mut self, offset: u16, mask: &[u8]) {
        for (i, &byte) in mask.iter().enumerate() {
            let at = usize::from(offset) + i;
            let shift = (at % 4) * 8;
            let register = &mut self.writable[at / 4];
            *register = (*register & !(0xff << shift)) | u32::from(byte) << shift;
        }
    }

    /// The Command register.
    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REGISTER] as u16
    }

    /// The Status register.
    pub fn status(&self) -> u16 {
        (self.registers[COMMAND_REGISTER] >> 16) as u16
    }

    /// Whether the function decodes BARs of `kind` (I/O or Memory Space Enable).
    pub fn decodes(&self, kind: BarKind) -> bool {
        decodes(self.command(), kind)
    }

    /// Device-side: sets Status error bits (the guest clears them by writing 1s).
    pub fn set_status_errors(&mut self, bits: u16) {
        let bits = bits & STATUS_WRITE_1_TO_CLEAR;
        self.registers[COMMAND_REGISTER] |= u32::from(bits) << 16;
    }

    /// Device-side: the Interrupt Status bit, set while the function asserts INTx (§6.2.3).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let bit = u32::from(STATUS_INTERRUPT) << 16;
        if asserted {
            self.registers[COMMAND_REGISTER] |= bit;
        } else {
            self.registers[COMMAND_REGISTER] &= !bit;
        }
    }

    /// Declares BAR `index` with its first address; it decodes there once the guest enables
    /// its space in Command.
    pub fn add_bar(&mut self, index: u8, bar: Bar, address: u64) -> Result<(), ConfigurationError> {
        let i = usize::from(index);
        if i + bar.registers() > BAR_COUNT {
            return Err(ConfigurationError::NoSuchBar {
                index,
                kind: bar.kind,
            });
        }
        if self.bars[i..i + bar.registers()]
            .iter()
            .any(|r| *r != BarRegister::Unused)
        {
            return Err(ConfigurationError::BarInUse { index });
        }
        let (min, max) = match bar.kind {
            BarKind::Io => (MIN_IO_BAR_SIZE, MAX_IO_BAR_SIZE),
            BarKind::Memory32 => (MIN_MEMORY_BAR_SIZE, 1 << 31),
            BarKind::Memory64 => (MIN_MEMORY_BAR_SIZE, 1 << 63),
        };
        if !bar.size.is_power_of_two() || bar.size < min || bar.size > max {
            return Err(ConfigurationError::BarSize {
                index,
                kind: bar.kind,
                size: bar.size,
            });
        }
        if bar.kind == BarKind::Io && bar.prefetchable {
            return Err(ConfigurationError::PrefetchableIo { index });
        }
        let fits = address & !bar.address_mask() == 0
            && address.checked_add(bar.size - 1).is_some()
            && !bar.is_probe(address);
        if !fits {
            return Err(ConfigurationError::BarAddress {
                index,
                kind: bar.kind,
                size: bar.size,
                address,
            });
        }
        self.bars[i] = BarRegister::Bar {
            bar,
            applied: address,
        };
        self.writable[BAR0_REGISTER + i] = bar.writable_low();
        if bar.kind == BarKind::Memory64 {
            self.bars[i + 1] = BarRegister::Upper;
            self.writable[BAR0_REGISTER + i + 1] = bar.writable_high();
        }
        self.store_bar(i, bar, address);
        Ok(())
    }

    /// The BARs and where each decodes now (its last applied address).
    pub fn bars(&self) -> Vec<BarInfo> {
        (0..BAR_COUNT).filter_map(|i| self.bar(i as u8)).collect()
    }

    /// BAR `index`, if it is the (lower) register of a BAR.
    pub fn bar(&self, index: u8) -> Option<BarInfo> {
        match self.bars.get(usize::from(index))? {
            BarRegister::Bar { bar, applied } => Some(BarInfo {
                index,
                bar: *bar,
                address: *applied,
            }),
            BarRegister::Unused | BarRegister::Upper => None,
        }
    }

    /// The address BAR `index`'s registers hold now (a probe value or a move not yet
    /// applied included).
    pub fn bar_register_address(&self, index: u8) -> Option<u64> {
        let info = self.bar(index)?;
        let i = BAR0_REGISTER + usize::from(index);
        let high = self.registers.get(i + 1).copied().unwrap_or(0);
        Some(info.bar.decode(self.registers[i], high))
    }

    fn store_bar(&mut self, index: usize, bar: Bar, address: u64) {
        let (low, high) = bar.encode(address);
        self.registers[BAR0_REGISTER + index] = low;
        if bar.kind == BarKind::Memory64 {
            self.registers[BAR0_REGISTER + index + 1] = high;
        }
    }

    /// After a write to Command or a BAR register: every BAR whose space decodes and whose
    /// registers hold a new address (not a size probe) is moved through `move_bar`. The
    /// lower dword of a 64-bit BAR written while decoding waits for its upper dword (or
    /// the next Command write), so a guest rewriting both halves moves it once, not
    /// through a half-written address.
    fn settle_bars(&mut self, written: usize, move_bar: &mut MoveBar<'_>) {
        let command = self.command();
        for i in 0..BAR_COUNT {
            let BarRegister::Bar { bar, applied } = self.bars[i] else {
                continue;
            };
            if !decodes(command, bar.kind) {
                continue;
            }
            if bar.kind == BarKind::Memory64 && written == BAR0_REGISTER + i {
                continue;
            }
            let Some(new) = self.bar_register_address(i as u8) else {
                continue;
            };
            if new == applied || bar.is_probe(new) {
                continue;
            }
            let mv = BarMove {
                index: i as u8,
                bar,
                old: applied,
                new,
            };
            match move_bar(&mv) {
                Ok(()) => self.bars[i] = BarRegister::Bar { bar, applied: new },
                Err(e) => {
                    if self.log.allow() {
                        tracing::warn!(
                            bar = i,
                            old = format_args!("{applied:#x}"),
                            new = format_args!("{new:#x}"),
                            "BAR move refused: {e}"
                        );
                    }
                    self.store_bar(i, bar, applied);
                }
            }
        }
    }

    /// Appends a capability (§6.7) to the list: `id`, the next pointer (read-only, kept by
    /// the list), then `body` from the capability's offset 2. `writable` gives the guest-
    /// writable bits of the body's first bytes (the rest is read-only). Returns the
    /// capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, ConfigurationError> {
        if writable.len() > body.len() {
            return Err(ConfigurationError::CapabilityMask {
                id,
                mask: writable.len(),
                len: body.len(),
            });
        }
        let len = 2 + body.len();
        let offset = self.next_capability;
        // Dword aligned, inside the first 256 bytes (pointers are one byte).
        let end = usize::from(offset) + len.div_ceil(4) * 4;
        if end > CONFIGURATION_SPACE_SIZE {
            return Err(ConfigurationError::NoCapabilitySpace {
                id,
                len,
                next: offset,
            });
        }
        self.set_bytes(offset, &[id, 0])?;
        self.set_bytes(offset + 2, body)?;
        self.set_writable(offset + 2, writable);
        let link = offset as u8;
        if self.last_capability == 0 {
            self.set_bytes(CAPABILITIES_POINTER, &[link])?;
            self.registers[COMMAND_REGISTER] |= u32::from(STATUS_CAPABILITIES_LIST) << 16;
        } else {
            self.set_bytes(self.last_capability + 1, &[link])?;
        }
        self.last_capability = offset;
        self.next_capability = end as u16;
        Ok(offset)
    }

    /// The capability list as the guest walks it: (ID, offset) pairs from the Capabilities
    /// Pointer, at most one per dword of the device-specific region.
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        if self.status() & STATUS_CAPABILITIES_LIST == 0 {
            return out;
        }
        let mut at = u16::from(self.read_u8(CAPABILITIES_POINTER) & !3);
        while at >= CAPABILITIES_START && out.len() < 48 {
            out.push((self.read_u8(at), at));
            at = u16::from(self.read_u8(at + 1) & !3);
        }
        out
    }
}

fn decodes(command: u16, kind: BarKind) -> bool {
    let bit = match kind {
        BarKind::Io => COMMAND_IO_SPACE,
        BarKind::Memory32 | BarKind::Memory64 => COMMAND_MEMORY_SPACE,
    };
    command & bit != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar::{BarMove, BarMoveRefused};

    const HEADER: Type0Header = Type0Header {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        revision_id: 0x01,
        class: ClassCode {
            base: 0x01,
            sub: 0x80,
            prog_if: 0x00,
        },
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0002,
        interrupt_pin: InterruptPin::IntA,
        multi_function: false,
    };

    fn space() -> ConfigurationSpace {
        ConfigurationSpace::new(&HEADER, ConfigurationSize::Conventional)
    }

    fn accept(_: &BarMove) -> Result<(), BarMoveRefused> {
        Ok(())
    }

    fn write(c: &mut ConfigurationSpace, offset: u16, data: &[u8]) {
        c.write(offset, data, &mut accept);
    }

    fn write32(c: &mut ConfigurationSpace, offset: u16, value: u32) {
        write(c, offset, &value.to_le_bytes());
    }

    fn write16(c: &mut ConfigurationSpace, offset: u16, value: u16) {
        write(c, offset, &value.to_le_bytes());
    }

    /// Records every move and answers with `answer`.
    fn recorder(
        moves: &mut Vec<BarMove>,
        answer: Result<(), BarMoveRefused>,
    ) -> impl FnMut(&BarMove) -> Result<(), BarMoveRefused> + '_ {
        move |mv| {
            moves.push(*mv);
            answer.clone()
        }
    }

    #[test]
    fn header_fields_read_back() {
        let c = space();
        assert_eq!(c.read_u16(VENDOR_ID), 0x1af4);
        assert_eq!(c.read_u16(DEVICE_ID), 0x1042);
        assert_eq!(c.read_u32(REVISION_ID), 0x0180_0001);
        assert_eq!(c.read_u8(CLASS_CODE + 2), 0x01);
        assert_eq!(c.read_u8(HEADER_TYPE), 0);
        assert_eq!(c.read_u16(SUBSYSTEM_VENDOR_ID), 0x1af4);
        assert_eq!(c.read_u16(SUBSYSTEM_ID), 0x0002);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        assert_eq!(c.command(), 0);
        assert_eq!(c.status(), 0);
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0);
        assert_eq!(c.size(), 256);
        let multi = ConfigurationSpace::new(
            &Type0Header {
                multi_function: true,
                ..HEADER
            },
            ConfigurationSize::Extended,
        );
        assert_eq!(multi.read_u8(HEADER_TYPE), 0x80);
        assert_eq!(multi.size(), 4096);
    }

    #[test]
    fn read_only_registers_ignore_all_ones() {
        let mut c = space();
        let before: Vec<u32> = (0..64).map(|r| c.read_u32(r * 4)).collect();
        for r in 0..64u16 {
            write32(&mut c, r * 4, 0xffff_ffff);
        }
        for r in 0..64u16 {
            let now = c.read_u32(r * 4);
            let expect = match r * 4 {
                // Command's implemented bits; Status bits are RO or W1C (clear already).
                COMMAND => u32::from(COMMAND_WRITABLE),
                CACHE_LINE_SIZE => 0xff,
                INTERRUPT_LINE => before[15] | 0xff,
                _ => before[usize::from(r)],
            };
            assert_eq!(now, expect, "register {:#x}", r * 4);
        }
        // The expansion ROM BAR is hardwired to 0: no ROM (§6.2.5.2).
        assert_eq!(c.read_u32(EXPANSION_ROM_BASE), 0);
    }

    #[test]
    fn command_bits() {
        let mut c = space();
        write16(&mut c, COMMAND, COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER);
        assert!(c.decodes(BarKind::Memory32));
        assert!(c.decodes(BarKind::Memory64));
        assert!(!c.decodes(BarKind::Io));
        write16(
            &mut c,
            COMMAND,
            COMMAND_IO_SPACE | COMMAND_INTX_DISABLE | 0x0080,
        );
        assert_eq!(c.command(), COMMAND_IO_SPACE | COMMAND_INTX_DISABLE);
        assert!(c.decodes(BarKind::Io));
        assert!(!c.decodes(BarKind::Memory32));
    }

    #[test]
    fn status_error_bits_are_write_1_to_clear() {
        let mut c = space();
        c.set_status_errors(STATUS_RECEIVED_MASTER_ABORT | STATUS_DETECTED_PARITY_ERROR);
        c.set_interrupt_status(true);
        c.add_capability(0x09, &[4, 0], &[]).unwrap();
        let all = STATUS_RECEIVED_MASTER_ABORT
            | STATUS_DETECTED_PARITY_ERROR
            | STATUS_INTERRUPT
            | STATUS_CAPABILITIES_LIST;
        assert_eq!(c.status(), all);
        // Writing 0s (a Command-only dword write) clears nothing.
        write32(&mut c, COMMAND, u32::from(COMMAND_MEMORY_SPACE));
        assert_eq!(c.status(), all);
        // A 1 clears its own bit only; read-only bits ignore the 1s.
        write16(
            &mut c,
            STATUS,
            STATUS_RECEIVED_MASTER_ABORT | STATUS_INTERRUPT | STATUS_CAPABILITIES_LIST,
        );
        assert_eq!(c.status(), all & !STATUS_RECEIVED_MASTER_ABORT);
        // A byte write to Command's high byte does not touch Status.
        write(&mut c, COMMAND + 1, &[0xff]);
        assert_eq!(c.status(), all & !STATUS_RECEIVED_MASTER_ABORT);
        assert_eq!(c.command(), COMMAND_MEMORY_SPACE | 0x0500);
        c.set_interrupt_status(false);
        assert_eq!(c.status() & STATUS_INTERRUPT, 0);
    }

    #[test]
    fn byte_word_and_dword_accesses_at_any_alignment_within_a_dword() {
        let mut c = space();
        let dword = c.read_u32(REVISION_ID);
        for offset in 0..4u16 {
            assert_eq!(
                c.read_u8(REVISION_ID + offset),
                (dword >> (8 * offset)) as u8
            );
        }
        for offset in 0..3u16 {
            let mut b = [0u8; 2];
            c.read(REVISION_ID + offset, &mut b);
            assert_eq!(u16::from_le_bytes(b), (dword >> (8 * offset)) as u16);
        }
        // A word over Interrupt Line (RW) and Interrupt Pin (RO): the line changes, the pin
        // stays.
        write16(&mut c, INTERRUPT_LINE, 0xabcd);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 0xcd);
        assert_eq!(c.read_u8(INTERRUPT_PIN), 1);
        // A word in the middle of a dword (byte enables 0110).
        write(&mut c, COMMAND + 1, &[0x04, 0x00]);
        assert_eq!(c.command(), COMMAND_INTX_DISABLE);
    }

    #[test]
    fn accesses_crossing_a_dword_or_of_odd_width_are_refused() {
        let mut c = space();
        write16(&mut c, INTERRUPT_LINE, 0x0011);
        // Reads: all ones.
        for (offset, len) in [
            (0x02u16, 4usize),
            (0x03, 2),
            (0x3d, 4),
            (0x00, 3),
            (0x00, 8),
        ] {
            let mut b = vec![0u8; len];
            c.read(offset, &mut b);
            assert!(b.iter().all(|&x| x == 0xff), "{offset:#x}/{len}");
        }
        let mut empty = [];
        c.read(0, &mut empty);
        // Writes: dropped whole, not split.
        write(&mut c, 0x3b, &[0x22, 0x22]);
        write(&mut c, 0x3a, &[0x33; 4]);
        write(&mut c, COMMAND, &[0xff; 3]);
        write(&mut c, COMMAND, &[0xff; 8]);
        assert_eq!(c.read_u8(INTERRUPT_LINE), 0x11);
        assert_eq!(c.command(), 0);
        assert!(is_dword_contained(0x3e, 2));
        assert!(!is_dword_contained(0x3f, 2));
    }

    #[test]
    fn reads_past_the_implemented_space_are_zero() {
        let mut c = space();
        write32(&mut c, 0x100, 0xffff_ffff);
        assert_eq!(c.read_u32(0x100), 0);
        assert_eq!(c.read_u32(0xffc), 0);
        assert_eq!(c.read_u16(0xfffe), 0);
        let mut e = ConfigurationSpace::new(&HEADER, ConfigurationSize::Extended);
        // Extended space exists but holds nothing writable: no extended capability.
        write32(&mut e, 0x100, 0xffff_ffff);
        assert_eq!(e.read_u32(0x100), 0);
        write32(&mut e, 0x1000, 0xffff_ffff);
        assert_eq!(e.read_u32(0x1000), 0);
        assert_eq!(
            e.set_bytes(0xffe, &[1, 2, 3]),
            Err(ConfigurationError::OutOfRange {
                offset: 0xffe,
                len: 3,
                size: 4096
            })
        );
        e.set_bytes(0x100, &[1, 2, 3]).unwrap();
        assert_eq!(e.read_u32(0x100), 0x03_0201);
    }

    #[test]
    fn capabilities_chain_from_the_pointer() {
        let mut c = space();
        assert!(c.capabilities().is_empty());
        // A 12-byte capability whose bytes 2-3 are partly writable.
        let first = c
            .add_capability(0x11, &[0x03, 0x00, 1, 2, 3, 4, 5, 6, 7, 8], &[0x00, 0xc0])
            .unwrap();
        // A 3-byte one: rounded up to a dword.
        let second = c.add_capability(0x09, &[3], &[]).unwrap();
        let third = c.add_capability(0x05, &[0; 22], &[0xff; 22]).unwrap();
        assert_eq!((first, second, third), (0x40, 0x4c, 0x50));
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        assert_ne!(c.status() & STATUS_CAPABILITIES_LIST, 0);
        assert_eq!(c.read_u16(0x40), 0x4c11);
        assert_eq!(c.read_u16(0x4c), 0x5009);
        assert_eq!(c.read_u16(0x50), 0x0005);
        assert_eq!(
            c.capabilities(),
            vec![(0x11, 0x40), (0x09, 0x4c), (0x05, 0x50)]
        );
        // The capability's own writable bits, and nothing else of it.
        write32(&mut c, 0x40, 0xffff_ffff);
        assert_eq!(c.read_u32(0x40), 0xc003_4c11);
        write32(&mut c, 0x40, 0);
        assert_eq!(c.read_u32(0x40), 0x0003_4c11);
        write32(&mut c, 0x44, 0);
        assert_eq!(c.read_u32(0x44), 0x0403_0201);
        write32(&mut c, 0x54, 0xdead_beef);
        assert_eq!(c.read_u32(0x54), 0xdead_beef);
        // Next pointers are read-only.
        write(&mut c, 0x4d, &[0x00]);
        assert_eq!(c.read_u8(0x4d), 0x50);
    }

    #[test]
    fn capability_space_runs_out_and_masks_must_fit() {
        let mut c = space();
        assert_eq!(
            c.add_capability(0x09, &[1], &[1, 2]),
            Err(ConfigurationError::CapabilityMask {
                id: 0x09,
                mask: 2,
                len: 1
            })
        );
        // 0x40..0x100 is 192 bytes: three 62-byte capabilities (64 with padding).
        for _ in 0..3 {
            c.add_capability(0x09, &[0; 60], &[]).unwrap();
        }
        assert_eq!(
            c.add_capability(0x09, &[0; 1], &[]),
            Err(ConfigurationError::NoCapabilitySpace {
                id: 0x09,
                len: 3,
                next: 0x100
            })
        );
        assert_eq!(c.capabilities().len(), 3);
    }

    const MEM32: Bar = Bar {
        kind: BarKind::Memory32,
        size: 0x1000,
        prefetchable: false,
    };
    const MEM64: Bar = Bar {
        kind: BarKind::Memory64,
        size: 0x4000,
        prefetchable: true,
    };
    const IO: Bar = Bar {
        kind: BarKind::Io,
        size: 0x20,
        prefetchable: false,
    };

    fn with_bars() -> ConfigurationSpace {
        let mut c = space();
        c.add_bar(0, MEM32, 0xc000_0000).unwrap();
        c.add_bar(1, IO, 0xc040).unwrap();
        c.add_bar(2, MEM64, 0x1_0000_0000).unwrap();
        c
    }

    #[test]
    fn bar_registers_hold_type_and_address() {
        let c = with_bars();
        assert_eq!(c.read_u32(BAR0), 0xc000_0000);
        assert_eq!(c.read_u32(BAR0 + 4), 0xc041);
        assert_eq!(c.read_u32(BAR0 + 8), 0x0000_000c);
        assert_eq!(c.read_u32(BAR0 + 12), 1);
        assert_eq!(c.read_u32(BAR0 + 16), 0);
        assert_eq!(c.bars().len(), 3);
        assert_eq!(
            c.bar(2),
            Some(BarInfo {
                index: 2,
                bar: MEM64,
                address: 0x1_0000_0000
            })
        );
        assert_eq!(c.bar(3), None);
        assert_eq!(c.bar(9), None);
    }

    #[test]
    fn size_probing_reads_the_size_mask() {
        let mut c = with_bars();
        for probe in [0xffff_ffffu32, 0xffff_fff0] {
            write32(&mut c, BAR0, probe);
            assert_eq!(c.read_u32(BAR0), 0xffff_f000, "{probe:#x}");
            write32(&mut c, BAR0 + 4, probe);
            assert_eq!(c.read_u32(BAR0 + 4), 0xffff_ffe1, "{probe:#x}");
            write32(&mut c, BAR0 + 8, probe);
            assert_eq!(c.read_u32(BAR0 + 8), 0xffff_c00c, "{probe:#x}");
        }
        write32(&mut c, BAR0 + 12, 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 12), 0xffff_ffff);
        // Unimplemented BARs and the upper dword of nothing read 0.
        write32(&mut c, BAR0 + 16, 0xffff_ffff);
        write32(&mut c, BAR0 + 20, 0xffff_ffff);
        assert_eq!(c.read_u32(BAR0 + 16), 0);
        assert_eq!(c.read_u32(BAR0 + 20), 0);
        // The register stores the probe; nothing moved (decoding is off).
        assert_eq!(c.bar_register_address(0), Some(0xffff_f000));
        assert_eq!(c.bar(0).unwrap().address, 0xc000_0000);
        // A byte write to the type bits changes nothing.
        write(&mut c, BAR0, &[0x0f]);
        assert_eq!(c.read_u32(BAR0), 0xffff_f000);
    }

    #[test]
    fn moves_are_reported_only_while_decoding() {
        let mut c = with_bars();
        let mut moves = Vec::new();
        // Decoding off: the register takes the address, nothing is reported.
        c.write(
            BAR0,
            &0xd000_0000u32.to_le_bytes(),
            &mut recorder(&mut moves, Ok(())),
        );
        assert!(moves.is_empty());
        assert_eq!(c.read_u32(BAR0), 0xd000_0000);
        assert_eq!(c.bar(0).unwrap().address, 0xc000_0000);
        // Memory Space Enable: the memory BARs that changed move, I/O ones do not.
        let enable = u32::from(COMMAND_MEMORY_SPACE).to_le_bytes();
        c.write(COMMAND, &enable, &mut recorder(&mut moves, Ok(())));
        assert_eq!(
            moves,
            vec![BarMove {
                index: 0,
                bar: MEM32,
                old: 0xc000_0000,
                new: 0xd000_0000
            }]
        );
        assert_eq!(c.bar(0).unwrap().address, 0xd000_0000);
        // Enabling again with nothing changed reports nothing.
        moves.clear();
        c.write(COMMAND, &enable, &mut recorder(&mut moves, Ok(())));
        assert!(moves.is_empty());
        // A BAR written while decoding moves at once.
        c.write(
            BAR0,
            &0xe000_0000u32.to_le_bytes(),
            &mut recorder(&mut moves, Ok(())),
        );
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].old, moves[0].new), (0xd000_0000, 0xe000_0000));
        // An I/O BAR while only memory decodes: stored, not moved.
        moves.clear();
        c.write(
            BAR0 + 4,
            &0xc080u32.to_le_bytes(),
            &mut recorder(&mut moves, Ok(())),
        );
        assert!(moves.is_empty());
        let both = u32::from(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE).to_le_bytes();
        c.write(COMMAND, &both, &mut recorder(&mut moves, Ok(())));
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].index, moves[0].new), (1, 0xc080));
        assert_eq!(c.bar(1).unwrap().address, 0xc080);
    }

    #[test]
    fn a_refused_move_rolls_the_register_back() {
        let mut c = with_bars();
        write16(&mut c, COMMAND, COMMAND_MEMORY_SPACE);
        let mut moves = Vec::new();
        let refuse = Err(BarMoveRefused::GuestRam);
        c.write(
            BAR0,
            &0x1000u32.to_le_bytes(),
            &mut recorder(&mut moves, refuse.clone()),
        );
        assert_eq!(moves.len(), 1);
        assert_eq!(c.read_u32(BAR0), 0xc000_0000);
        assert_eq!(c.bar(0).unwrap().address, 0xc000_0000);
        // The same for a 64-bit BAR: both halves come back.
        moves.clear();
        c.write(
            BAR0 + 8,
            &0x8000u32.to_le_bytes(),
            &mut recorder(&mut moves, refuse.clone()),
        );
        c.write(
            BAR0 + 12,
            &2u32.to_le_bytes(),
            &mut recorder(&mut moves, refuse.clone()),
        );
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].old, moves[0].new), (0x1_0000_0000, 0x2_0000_8000));
        assert_eq!(c.read_u32(BAR0 + 8), 0x0000_000c);
        assert_eq!(c.read_u32(BAR0 + 12), 1);
        // Refused on enable: rolled back too, and decoding stays where it was.
        let mut c = with_bars();
        write32(&mut c, BAR0, 0x2000);
        moves.clear();
        let enable = COMMAND_MEMORY_SPACE.to_le_bytes();
        c.write(COMMAND, &enable, &mut recorder(&mut moves, refuse));
        assert_eq!(moves.len(), 1);
        assert_eq!(c.read_u32(BAR0), 0xc000_0000);
        assert!(c.decodes(BarKind::Memory32));
    }

    #[test]
    fn a_64_bit_bar_moves_once_when_its_upper_dword_is_written() {
        let mut c = with_bars();
        write16(&mut c, COMMAND, COMMAND_MEMORY_SPACE);
        let mut moves = Vec::new();
        c.write(
            BAR0 + 8,
            &0x4000u32.to_le_bytes(),
            &mut recorder(&mut moves, Ok(())),
        );
        assert!(moves.is_empty(), "the lower dword alone waits");
        c.write(
            BAR0 + 12,
            &3u32.to_le_bytes(),
            &mut recorder(&mut moves, Ok(())),
        );
        assert_eq!(moves.len(), 1);
        assert_eq!((moves[0].old, moves[0].new), (0x1_0000_0000, 0x3_0000_4000));
        // A lower-dword-only change is picked up by the next Command write.
        moves.clear();
        c.write(
            BAR0 + 8,
            &0x8000u32.to_le_bytes(),
            &mut recorder(&mut moves, Ok(())),
        );
        assert!(moves.is_empty());
        let enable = COMMAND_MEMORY_SPACE.to_le_bytes();
        c.write(COMMAND, &enable, &mut recorder(&mut moves, Ok(())));
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].new, 0x3_0000_8000);
        assert_eq!(c.bar(2).unwrap().address, 0x3_0000_8000);
    }

    #[test]
    fn probing_while_decoding_is_not_a_move() {
        let mut c = with_bars();
        write16(&mut c, COMMAND, COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE);
        let mut moves = Vec::new();
        let mut probe = |c: &mut ConfigurationSpace, offset: u16| {
            let before = c.read_u32(offset);
            c.write(
                offset,
                &[0xff; 4],
                &mut recorder(&mut moves, Err(BarMoveRefused::OutsideWindow)),
            );
            let size = c.read_u32(offset);
            c.write(
                offset,
                &before.to_le_bytes(),
                &mut recorder(&mut moves, Err(BarMoveRefused::OutsideWindow)),
            );
            size
        };
        assert_eq!(probe(&mut c, BAR0), 0xffff_f000);
        assert_eq!(probe(&mut c, BAR0 + 4), 0xffff_ffe1);
        // Linux's order for a 64-bit BAR: lower, upper, then both restored.
        assert_eq!(probe(&mut c, BAR0 + 8), 0xffff_c00c);
        assert_eq!(probe(&mut c, BAR0 + 12), 0xffff_ffff);
        assert!(moves.is_empty(), "{moves:?}");
        assert_eq!(c.read_u32(BAR0 + 8), 0xc);
        assert_eq!(c.read_u32(BAR0 + 12), 1);
        for bar in c.bars() {
            assert_eq!(Some(bar.address), c.bar_register_address(bar.index));
        }
    }

    #[test]
    fn add_bar_checks_what_it_is_given() {
        let mut c = with_bars();
        assert_eq!(
            c.add_bar(2, MEM32, 0xc000_0000),
            Err(ConfigurationError::BarInUse { index: 2 })
        );
        assert_eq!(
            c.add_bar(3, MEM32, 0xc000_0000),
            Err(ConfigurationError::BarInUse { index: 3 })
        );
        assert_eq!(
            c.add_bar(5, MEM64, 0),
            Err(ConfigurationError::NoSuchBar {
                index: 5,
                kind: BarKind::Memory64
            })
        );
        assert_eq!(
            c.add_bar(6, MEM32, 0),
            Err(ConfigurationError::NoSuchBar {
                index: 6,
                kind: BarKind::Memory32
            })
        );
        let odd = Bar {
            size: 0x1800,
            ..MEM32
        };
        assert!(matches!(
            c.add_bar(4, odd, 0),
            Err(ConfigurationError::BarSize { .. })
        ));
        let big_io = Bar { size: 0x200, ..IO };
        assert!(matches!(
            c.add_bar(4, big_io, 0),
            Err(ConfigurationError::BarSize { .. })
        ));
        let tiny = Bar { size: 8, ..MEM32 };
        assert!(matches!(
            c.add_bar(4, tiny, 0),
            Err(ConfigurationError::BarSize { .. })
        ));
        assert!(matches!(
            c.add_bar(4, MEM32, 0xc000_0800),
            Err(ConfigurationError::BarAddress { .. })
        ));
        assert!(matches!(
            c.add_bar(4, MEM32, 0x1_0000_0000),
            Err(ConfigurationError::BarAddress { .. })
        ));
        let prefetch_io = Bar {
            prefetchable: true,
            ..IO
        };
        assert_eq!(
            c.add_bar(4, prefetch_io, 0x1000),
            Err(ConfigurationError::PrefetchableIo { index: 4 })
        );
        c.add_bar(4, MEM32, 0xc000_1000).unwrap();
        assert_eq!(c.bars().len(), 4);
    }
}

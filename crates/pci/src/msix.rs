//! MSI-X (PCI 3.0 §6.8.2; PCIe 6.0 §7.7.2): the capability in configuration space, the
//! vector table and the Pending Bit Array in a BAR.
//!
//! The model never delivers an interrupt itself. Each vector's route (its message and
//! whether it is masked: the vector's Mask bit, Function Mask, or MSI-X disabled) goes to
//! the VMM through [`MsixNotifier::update_routes`], all the vectors one guest access changed
//! in one call, so the VMM can commit its GSI routing table once. An interrupt the device
//! raises on a masked vector sets the vector's pending bit; when the vector becomes
//! deliverable again, the model clears the bit and asks for one delivery
//! ([`MsixNotifier::deliver`], §6.8.2.9 "Pending Bits").
//!
//! Table and PBA accesses must be aligned DWORDs or QWORDs (§6.8.2: "software must use
//! aligned full DWORD or aligned full QWORD transactions"); anything else is ignored and
//! reads zero.

use devices::limiter::WarnLimiter;
use devices::MsiMessage;

use crate::configuration::{ConfigurationError, ConfigurationSpace};

/// Capability ID of MSI-X (PCI Code and ID Assignment §2).
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Table Size is 11 bits, N - 1 encoded.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Bytes per table entry (§6.8.2.6).
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// What a virtio driver writes for "no vector" (virtio 1.2 §4.1.5.1.2); any vector outside
/// the table is equally harmless here.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

// The capability's registers, from its offset (§6.8.2.1).
const MESSAGE_CONTROL: u16 = 2;
/// The capability's body (from offset 2): Message Control, Table and PBA Offset/BIR.
const CAPABILITY_BODY_LEN: usize = 10;

// Message Control (§6.8.2.3).
pub const MESSAGE_CONTROL_TABLE_SIZE: u16 = 0x07ff;
pub const MESSAGE_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
pub const MESSAGE_CONTROL_ENABLE: u16 = 1 << 15;

// A table entry (§6.8.2.6-9).
const ENTRY_ADDRESS_LOW: u64 = 0x0;
const ENTRY_ADDRESS_HIGH: u64 = 0x4;
const ENTRY_DATA: u64 = 0x8;
// Vector Control is the dword at 0xc.
/// Message Address bits 1:0 are zero for DWORD alignment.
const ADDRESS_LOW_WRITABLE: u32 = !0x3;
/// Vector Control: Mask bit; the other bits are reserved (no TPH steering tags).
pub const VECTOR_CONTROL_MASK: u32 = 1;

/// Errors while building an MSI-X function.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MsixError {
    /// Table Size must be 1 to 2048 vectors.
    #[error("{0} MSI-X vectors: the table holds 1 to 2048")]
    TableSize(u16),
    /// A BIR names BAR 0-5 and an offset is QWORD aligned (§6.8.2.4).
    #[error("MSI-X {what} at BAR {bir} offset {offset:#x}: BIR must be 0-5, offset QWORD aligned")]
    Location {
        what: &'static str,
        bir: u8,
        offset: u32,
    },
    /// The table and the PBA overlap in their BAR.
    #[error("the MSI-X table and PBA overlap in BAR {bir}")]
    Overlap { bir: u8 },
    /// The capability did not fit the configuration space.
    #[error("MSI-X capability: {0}")]
    Capability(#[from] ConfigurationError),
}

/// Where the table or the PBA lives: a BAR (BIR) and an offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLocation {
    pub bir: u8,
    pub offset: u32,
}

impl MsixLocation {
    /// The Table/PBA Offset/BIR register (§6.8.2.4-5): offset bits 31:3, BIR 2:0.
    fn register(self) -> u32 {
        self.offset | u32::from(self.bir)
    }

    fn contains(self, bar: u8, len: u64, offset: u64) -> bool {
        bar == self.bir && (u64::from(self.offset)..u64::from(self.offset) + len).contains(&offset)
    }
}

/// A vector's route as the VMM installs it: where its message goes and whether it may
/// deliver at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixRoute {
    pub message: MsiMessage,
    /// The vector's Mask bit, Function Mask, or MSI-X Enable clear.
    pub masked: bool,
}

impl MsixRoute {
    /// Whether the VMM must hear about a change from `self` to `other`: a masked route's
    /// message does not matter until it is unmasked (and is reported then).
    fn differs(&self, other: &MsixRoute) -> bool {
        self.masked != other.masked || (!self.masked && self.message != other.message)
    }
}

/// How the VMM learns what the guest did to MSI-X.
pub trait MsixNotifier: Send {
    /// The routes one guest access changed, by vector number, in increasing order.
    fn update_routes(&mut self, routes: &[(u16, MsixRoute)]);
    /// A vector that was pending became deliverable: deliver one interrupt now. Called
    /// after [`update_routes`](Self::update_routes) reported it unmasked.
    fn deliver(&mut self, vector: u16, message: MsiMessage);
}

/// What became of an interrupt the device raised on a vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixTrigger {
    /// Deliverable: the caller signals it (its irqfd) with this message.
    Deliver(MsiMessage),
    /// Masked: its pending bit is set and it is delivered once when unmasked.
    Pending,
    /// MSI-X is disabled: the function uses INTx instead (§6.8.2.3).
    Disabled,
    /// No such vector (out of the table, or `VIRTIO_MSI_NO_VECTOR`): nothing happens.
    NoVector,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    vector_control: u32,
}

impl Entry {
    /// After reset every vector is masked (§6.8.2.9).
    const RESET: Entry = Entry {
        address_low: 0,
        address_high: 0,
        data: 0,
        vector_control: VECTOR_CONTROL_MASK,
    };

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }
}

/// One function's MSI-X state.
pub struct Msix {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    table: MsixLocation,
    pba: MsixLocation,
    enabled: bool,
    function_mask: bool,
    /// The capability's offset in configuration space, once added.
    capability: Option<u16>,
    /// What the notifier was last told per vector.
    reported: Vec<MsixRoute>,
    /// Scratch for one access's route changes (no allocation per access).
    changes: Vec<(u16, MsixRoute)>,
    notifier: Box<dyn MsixNotifier>,
    /// Wrong-width accesses are the guest's doing.
    log: WarnLimiter,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("vectors", &self.entries.len())
            .field("table", &self.table)
            .field("pba", &self.pba)
            .field("enabled", &self.enabled)
            .field("function_mask", &self.function_mask)
            .finish_non_exhaustive()
    }
}

impl Msix {
    /// `vectors` entries, all masked, MSI-X disabled; the table and PBA at `table` and
    /// `pba` (the device maps them in its BARs and forwards the accesses).
    pub fn new(
        vectors: u16,
        table: MsixLocation,
        pba: MsixLocation,
        notifier: Box<dyn MsixNotifier>,
    ) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(MsixError::TableSize(vectors));
        }
        for (what, at) in [("table", table), ("PBA", pba)] {
            if at.bir > 5 || at.offset % 8 != 0 {
                return Err(MsixError::Location {
                    what,
                    bir: at.bir,
                    offset: at.offset,
                });
            }
        }
        let table_len = u64::from(vectors) * MSIX_TABLE_ENTRY_SIZE;
        let pba_len = pba_len(vectors);
        let (t, p) = (u64::from(table.offset), u64::from(pba.offset));
        if table.bir == pba.bir && t < p + pba_len && p < t + table_len {
            return Err(MsixError::Overlap { bir: table.bir });
        }
        let n = usize::from(vectors);
        let masked = MsixRoute {
            message: Entry::RESET.message(),
            masked: true,
        };
        Ok(Self {
            entries: vec![Entry::RESET; n],
            pending: vec![0; n.div_ceil(64)],
            table,
            pba,
            enabled: false,
            function_mask: false,
            capability: None,
            reported: vec![masked; n],
            changes: Vec::with_capacity(n),
            notifier,
            log: WarnLimiter::default(),
        })
    }

    /// The number of vectors.
    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes of the table in its BAR.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors()) * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes of the PBA in its BAR (QWORDs of 64 bits).
    pub fn pba_len(&self) -> u64 {
        pba_len(self.vectors())
    }

    pub fn table_location(&self) -> MsixLocation {
        self.table
    }

    pub fn pba_location(&self) -> MsixLocation {
        self.pba
    }

    /// Adds the capability (§6.8.2.1) to `config`: Table Size read-only, Function Mask and
    /// MSI-X Enable writable, the table and PBA locations read-only. Returns its offset.
    pub fn add_capability(&mut self, config: &mut ConfigurationSpace) -> Result<u16, MsixError> {
        let mut body = [0u8; CAPABILITY_BODY_LEN];
        body[0..2].copy_from_slice(&self.message_control().to_le_bytes());
        body[2..6].copy_from_slice(&self.table.register().to_le_bytes());
        body[6..10].copy_from_slice(&self.pba.register().to_le_bytes());
        let writable = (MESSAGE_CONTROL_FUNCTION_MASK | MESSAGE_CONTROL_ENABLE).to_le_bytes();
        let offset = config.add_capability(MSIX_CAPABILITY_ID, &body, &writable)?;
        self.capability = Some(offset);
        Ok(offset)
    }

    /// The capability's offset, once added.
    pub fn capability_offset(&self) -> Option<u16> {
        self.capability
    }

    /// After a guest configuration write of `len` bytes at `offset`: if it reached Message
    /// Control, take MSI-X Enable and Function Mask from `config`.
    pub fn config_written(&mut self, config: &ConfigurationSpace, offset: u16, len: usize) {
        let Some(cap) = self.capability else {
            return;
        };
        let control = cap + MESSAGE_CONTROL;
        let end = usize::from(offset) + len;
        if offset < control + 2 && end > usize::from(control) {
            self.set_message_control(config.read_u16(control));
        }
    }

    /// Message Control as the function implements it.
    pub fn message_control(&self) -> u16 {
        let mut value = self.vectors() - 1;
        if self.function_mask {
            value |= MESSAGE_CONTROL_FUNCTION_MASK;
        }
        if self.enabled {
            value |= MESSAGE_CONTROL_ENABLE;
        }
        value
    }

    /// Applies MSI-X Enable and Function Mask from a Message Control value.
    pub fn set_message_control(&mut self, value: u16) {
        self.enabled = value & MESSAGE_CONTROL_ENABLE != 0;
        self.function_mask = value & MESSAGE_CONTROL_FUNCTION_MASK != 0;
        self.refresh(0..self.vectors());
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_mask
    }

    /// Back to the reset state: all vectors masked with empty messages, nothing pending,
    /// MSI-X disabled (also in `config`'s Message Control, once the capability is there).
    pub fn reset(&mut self, config: &mut ConfigurationSpace) {
        self.entries.fill(Entry::RESET);
        self.pending.fill(0);
        self.enabled = false;
        self.function_mask = false;
        if let Some(cap) = self.capability {
            let control = self.message_control().to_le_bytes();
            // The capability was placed by `add_capability`, inside the space.
            let _ = config.set_bytes(cap + MESSAGE_CONTROL, &control);
        }
        self.refresh(0..self.vectors());
    }

    /// The route vector `vector` has now, if it exists.
    pub fn route(&self, vector: u16) -> Option<MsixRoute> {
        let entry = self.entries.get(usize::from(vector))?;
        Some(MsixRoute {
            message: entry.message(),
            masked: !self.enabled
                || self.function_mask
                || entry.vector_control & VECTOR_CONTROL_MASK != 0,
        })
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|q| q & (1 << (v % 64)) != 0)
    }

    /// The device raises an interrupt on `vector`.
    pub fn trigger(&mut self, vector: u16) -> MsixTrigger {
        let Some(route) = self.route(vector) else {
            return MsixTrigger::NoVector;
        };
        if !self.enabled {
            MsixTrigger::Disabled
        } else if route.masked {
            let v = usize::from(vector);
            self.pending[v / 64] |= 1 << (v % 64);
            MsixTrigger::Pending
        } else {
            MsixTrigger::Deliver(route.message)
        }
    }

    /// A guest read in a BAR: answered (and `true`) when `offset` in BAR `bar` falls in the
    /// table or the PBA.
    pub fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        if self.table.contains(bar, self.table_len(), offset) {
            self.read_table(offset - u64::from(self.table.offset), data);
            true
        } else if self.pba.contains(bar, self.pba_len(), offset) {
            self.read_pba(offset - u64::from(self.pba.offset), data);
            true
        } else {
            false
        }
    }

    /// A guest write in a BAR: taken (and `true`) when it falls in the table or the PBA.
    pub fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) -> bool {
        if self.table.contains(bar, self.table_len(), offset) {
            self.write_table(offset - u64::from(self.table.offset), data);
            true
        } else {
            // The PBA is read-only (§6.8.2.10): writes are taken and dropped.
            self.pba.contains(bar, self.pba_len(), offset)
        }
    }

    /// Whether an access is one the table and PBA answer: aligned 4 or 8 bytes, inside.
    fn valid(&mut self, offset: u64, len: usize, limit: u64) -> bool {
        let ok = matches!(len, 4 | 8)
            && offset.is_multiple_of(len as u64)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= limit);
        if !ok && self.log.allow() {
            tracing::debug!(
                offset = format_args!("{offset:#x}"),
                len,
                "MSI-X access ignored: not an aligned DWORD or QWORD"
            );
        }
        ok
    }

    /// Reads the table at `offset` from its start.
    pub fn read_table(&mut self, offset: u64, data: &mut [u8]) {
        if !self.valid(offset, data.len(), self.table_len()) {
            data.fill(0);
            return;
        }
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let entry = &self.entries[(at / MSIX_TABLE_ENTRY_SIZE) as usize];
            let value = match at % MSIX_TABLE_ENTRY_SIZE {
                ENTRY_ADDRESS_LOW => entry.address_low,
                ENTRY_ADDRESS_HIGH => entry.address_high,
                ENTRY_DATA => entry.data,
                _ => entry.vector_control, // 0xc
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Writes the table at `offset` from its start; an 8-byte write changes one entry's
    /// two dwords and reports its route once.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !self.valid(offset, data.len(), self.table_len()) {
            return;
        }
        let vector = (offset / MSIX_TABLE_ENTRY_SIZE) as u16;
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let at = offset + 4 * i as u64;
            let mut value = [0u8; 4];
            value.copy_from_slice(chunk);
            let value = u32::from_le_bytes(value);
            let entry = &mut self.entries[usize::from(vector)];
            match at % MSIX_TABLE_ENTRY_SIZE {
                ENTRY_ADDRESS_LOW => entry.address_low = value & ADDRESS_LOW_WRITABLE,
                ENTRY_ADDRESS_HIGH => entry.address_high = value,
                ENTRY_DATA => entry.data = value,
                // 0xc: Vector Control.
                _ => entry.vector_control = value & VECTOR_CONTROL_MASK,
            }
        }
        self.refresh(vector..vector + 1);
    }

    /// Reads the PBA at `offset` from its start.
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        if !self.valid(offset, data.len(), self.pba_len()) {
            data.fill(0);
            return;
        }
        let qword = self.pending[(offset / 8) as usize].to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&qword[start..start + data.len()]);
    }

    /// Reports the routes of `vectors` that changed, then delivers the pending ones that
    /// can deliver now.
    fn refresh(&mut self, vectors: std::ops::Range<u16>) {
        self.changes.clear();
        for vector in vectors.clone() {
            let Some(route) = self.route(vector) else {
                continue;
            };
            let reported = &mut self.reported[usize::from(vector)];
            if route.differs(reported) {
                *reported = route;
                self.changes.push((vector, route));
            }
        }
        if !self.changes.is_empty() {
            self.notifier.update_routes(&self.changes);
        }
        for vector in vectors {
            let Some(route) = self.route(vector) else {
                continue;
            };
            if !route.masked && self.is_pending(vector) {
                let v = usize::from(vector);
                self.pending[v / 64] &= !(1 << (v % 64));
                self.notifier.deliver(vector, route.message);
            }
        }
    }
}

fn pba_len(vectors: u16) -> u64 {
    u64::from(vectors).div_ceil(64) * 8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use crate::bar::{BarMove, BarMoveRefused};
    use crate::configuration::{ClassCode, ConfigurationSize, InterruptPin, Type0Header};

    #[derive(Default)]
    struct Log {
        batches: Vec<Vec<(u16, MsixRoute)>>,
        delivered: Vec<(u16, MsiMessage)>,
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Log>>);

    type Taken = (Vec<Vec<(u16, MsixRoute)>>, Vec<(u16, MsiMessage)>);

    impl MsixNotifier for Recorder {
        fn update_routes(&mut self, routes: &[(u16, MsixRoute)]) {
            self.0.lock().unwrap().batches.push(routes.to_vec());
        }
        fn deliver(&mut self, vector: u16, message: MsiMessage) {
            self.0.lock().unwrap().delivered.push((vector, message));
        }
    }

    impl Recorder {
        fn take(&self) -> Taken {
            let mut log = self.0.lock().unwrap();
            (
                std::mem::take(&mut log.batches),
                std::mem::take(&mut log.delivered),
            )
        }
    }

    const TABLE: MsixLocation = MsixLocation { bir: 2, offset: 0 };
    const PBA: MsixLocation = MsixLocation {
        bir: 2,
        offset: 0x2000,
    };

    fn msix(vectors: u16) -> (Msix, Recorder) {
        let rec = Recorder::default();
        let m = Msix::new(vectors, TABLE, PBA, Box::new(rec.clone())).unwrap();
        (m, rec)
    }

    fn write32(m: &mut Msix, offset: u64, value: u32) {
        m.write_table(offset, &value.to_le_bytes());
    }

    fn read32(m: &mut Msix, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read_table(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Programs vector `v` with a message and unmasks it.
    fn program(m: &mut Msix, v: u16, address: u64, data: u32) {
        let base = u64::from(v) * 16;
        m.write_table(base, &address.to_le_bytes());
        write32(m, base + 8, data);
        write32(m, base + 12, 0);
    }

    fn route(address: u64, data: u32, masked: bool) -> MsixRoute {
        MsixRoute {
            message: MsiMessage { address, data },
            masked,
        }
    }

    fn config() -> ConfigurationSpace {
        let header = Type0Header {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class: ClassCode {
                base: 0x02,
                sub: 0,
                prog_if: 0,
            },
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 1,
            interrupt_pin: InterruptPin::IntA,
            multi_function: false,
        };
        ConfigurationSpace::new(&header, ConfigurationSize::Conventional)
    }

    fn accept(_: &BarMove) -> Result<(), BarMoveRefused> {
        Ok(())
    }

    #[test]
    fn every_entry_is_masked_at_reset() {
        let (mut m, rec) = msix(5);
        for v in 0..5u64 {
            assert_eq!(read32(&mut m, v * 16 + 12), VECTOR_CONTROL_MASK);
            assert_eq!(read32(&mut m, v * 16), 0);
        }
        let mut pba = [0xffu8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8]);
        assert!(!m.enabled());
        assert_eq!(m.message_control(), 4);
        assert_eq!(rec.take(), (vec![], vec![]));
        assert_eq!((m.table_len(), m.pba_len()), (80, 8));
    }

    #[test]
    fn capability_layout_and_writable_bits() {
        let (mut m, _rec) = msix(5);
        let mut c = config();
        let cap = m.add_capability(&mut c).unwrap();
        assert_eq!(m.capability_offset(), Some(cap));
        assert_eq!(c.read_u8(cap), MSIX_CAPABILITY_ID);
        assert_eq!(c.read_u16(cap + 2), 4, "Table Size is N - 1");
        assert_eq!(c.read_u32(cap + 4), 0x0000_0002, "Table Offset/BIR");
        assert_eq!(c.read_u32(cap + 8), 0x0000_2002, "PBA Offset/BIR");
        // Only Function Mask and MSI-X Enable take a write.
        c.write(cap + 2, &[0xff, 0xff], &mut accept);
        m.config_written(&c, cap + 2, 2);
        assert_eq!(c.read_u16(cap + 2), 0xc004);
        assert!(m.enabled() && m.function_masked());
        c.write(cap + 4, &[0xff; 4], &mut accept);
        c.write(cap + 8, &[0xff; 4], &mut accept);
        assert_eq!(c.read_u32(cap + 4), 2);
        assert_eq!(c.read_u32(cap + 8), 0x2002);
        // A dword write over ID, next and Message Control reaches Message Control too.
        c.write(cap, &0u32.to_le_bytes(), &mut accept);
        m.config_written(&c, cap, 4);
        assert!(!m.enabled() && !m.function_masked());
        // A write that does not touch Message Control changes nothing.
        c.write(cap + 3, &[0x80], &mut accept);
        m.config_written(&c, cap + 4, 4);
        assert!(!m.enabled());
        m.config_written(&c, cap + 3, 1);
        assert!(m.enabled());
        // Reset disables MSI-X in configuration space too.
        m.reset(&mut c);
        assert_eq!(c.read_u16(cap + 2), 4);
        assert!(!m.enabled());
    }

    #[test]
    fn table_takes_aligned_dwords_and_qwords_only() {
        let (mut m, _rec) = msix(3);
        m.write_table(16, &0x1_fee0_1003u64.to_le_bytes());
        // Address bits 1:0 are zero.
        assert_eq!(read32(&mut m, 16), 0xfee0_1000);
        assert_eq!(read32(&mut m, 20), 1);
        let mut q = [0u8; 8];
        m.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_1000);
        // Vector Control's reserved bits read 0.
        write32(&mut m, 28, 0xffff_fffe);
        assert_eq!(read32(&mut m, 28), 0);
        // Bytes, words, odd widths, misaligned: ignored, read zeros.
        for (offset, len) in [
            (32u64, 1usize),
            (32, 2),
            (33, 4),
            (36, 8),
            (32, 3),
            (32, 16),
        ] {
            m.write_table(offset, &vec![0xaa; len]);
            let mut b = vec![0x55u8; len];
            m.read_table(offset, &mut b);
            assert!(b.iter().all(|&x| x == 0), "{offset}/{len}");
        }
        assert_eq!(read32(&mut m, 32), 0);
        assert_eq!(read32(&mut m, 44), VECTOR_CONTROL_MASK);
        // Past the table.
        write32(&mut m, 48, 5);
        assert_eq!(read32(&mut m, 48), 0);
        let mut b = [0x55u8; 8];
        m.read_table(u64::MAX - 7, &mut b);
        assert_eq!(b, [0; 8]);
    }

    #[test]
    fn routes_reported_when_they_change() {
        let (mut m, rec) = msix(4);
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        // Enabling with every vector masked changes no route.
        assert_eq!(rec.take(), (vec![], vec![]));
        // Programming a masked vector is not reported; unmasking it is, with its message.
        m.write_table(16, &0xfee0_0000u64.to_le_bytes());
        write32(&mut m, 24, 0x41);
        assert_eq!(rec.take().0, Vec::<Vec<_>>::new());
        write32(&mut m, 28, 0);
        assert_eq!(
            rec.take().0,
            vec![vec![(1, route(0xfee0_0000, 0x41, false))]]
        );
        // A new message on an unmasked vector is reported.
        write32(&mut m, 24, 0x42);
        assert_eq!(
            rec.take().0,
            vec![vec![(1, route(0xfee0_0000, 0x42, false))]]
        );
        // An 8-byte write of data and vector control: one report.
        m.write_table(24, &(1u64 << 32 | 0x43).to_le_bytes());
        assert_eq!(
            rec.take().0,
            vec![vec![(1, route(0xfee0_0000, 0x43, true))]]
        );
        // Rewriting the same values is not a change.
        m.write_table(24, &(1u64 << 32 | 0x43).to_le_bytes());
        assert_eq!(rec.take().0, Vec::<Vec<_>>::new());
        program(&mut m, 0, 0xfee0_1000, 0x30);
        program(&mut m, 1, 0xfee0_2000, 0x31);
        rec.take();
        // Function Mask: every unmasked vector masked, in one batch.
        m.set_message_control(MESSAGE_CONTROL_ENABLE | MESSAGE_CONTROL_FUNCTION_MASK);
        assert_eq!(
            rec.take().0,
            vec![vec![
                (0, route(0xfee0_1000, 0x30, true)),
                (1, route(0xfee0_2000, 0x31, true)),
            ]]
        );
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        assert_eq!(rec.take().0[0].len(), 2);
        // Disabling MSI-X masks them as well.
        m.set_message_control(0);
        assert_eq!(rec.take().0[0].len(), 2);
        assert!(m.route(0).unwrap().masked);
        assert_eq!(m.route(4), None);
    }

    #[test]
    fn masked_interrupts_pend_and_deliver_once_on_unmask() {
        let (mut m, rec) = msix(4);
        assert_eq!(m.trigger(0), MsixTrigger::Disabled);
        assert!(!m.is_pending(0));
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        // Entry masked: pending, PBA bit set.
        assert_eq!(m.trigger(2), MsixTrigger::Pending);
        assert_eq!(m.trigger(2), MsixTrigger::Pending);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 2);
        // Programming address and data keeps it pending; unmasking delivers once.
        m.write_table(32, &0xfee0_0000u64.to_le_bytes());
        write32(&mut m, 40, 0x55);
        assert_eq!(rec.take().1, vec![]);
        write32(&mut m, 44, 0);
        let (batches, delivered) = rec.take();
        assert_eq!(batches, vec![vec![(2, route(0xfee0_0000, 0x55, false))]]);
        let message = MsiMessage {
            address: 0xfee0_0000,
            data: 0x55,
        };
        assert_eq!(delivered, vec![(2, message)]);
        assert!(!m.is_pending(2));
        m.read_pba(0, &mut pba);
        assert_eq!(pba, [0; 8]);
        // Unmasked now: the caller delivers.
        assert_eq!(m.trigger(2), MsixTrigger::Deliver(message));
        // Mask and unmask with nothing pending: no delivery.
        write32(&mut m, 44, 1);
        write32(&mut m, 44, 0);
        assert_eq!(rec.take().1, vec![]);
    }

    #[test]
    fn function_mask_pends_every_vector_and_unmask_delivers_each() {
        let (mut m, rec) = msix(3);
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x20);
        program(&mut m, 1, 0xfee0_0000, 0x21);
        m.set_message_control(MESSAGE_CONTROL_ENABLE | MESSAGE_CONTROL_FUNCTION_MASK);
        rec.take();
        assert_eq!(m.trigger(0), MsixTrigger::Pending);
        assert_eq!(m.trigger(1), MsixTrigger::Pending);
        // Vector 2 is masked on its own too: still pending after the function unmask.
        assert_eq!(m.trigger(2), MsixTrigger::Pending);
        // Rewriting Message Control with Function Mask still set delivers nothing.
        m.set_message_control(MESSAGE_CONTROL_ENABLE | MESSAGE_CONTROL_FUNCTION_MASK);
        assert_eq!(rec.take().1, vec![]);
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        let delivered: Vec<u16> = rec.take().1.into_iter().map(|(v, _)| v).collect();
        assert_eq!(delivered, vec![0, 1]);
        assert!(m.is_pending(2) && !m.is_pending(0) && !m.is_pending(1));
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        assert_eq!(rec.take().1, vec![]);
    }

    #[test]
    fn no_vector_and_out_of_range_vectors_are_harmless() {
        let (mut m, rec) = msix(2);
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        for v in [2, 63, 64, 2047, VIRTIO_MSI_NO_VECTOR] {
            assert_eq!(m.trigger(v), MsixTrigger::NoVector);
            assert!(!m.is_pending(v));
        }
        assert_eq!(rec.take(), (vec![], vec![]));
    }

    #[test]
    fn pba_spans_qwords_and_ignores_writes() {
        let (mut m, _rec) = msix(70);
        assert_eq!(m.pba_len(), 16);
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        assert_eq!(m.trigger(69), MsixTrigger::Pending);
        let mut q = [0u8; 8];
        m.read_pba(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 5);
        let mut d = [0u8; 4];
        m.read_pba(8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1 << 5);
        m.read_pba(12, &mut d);
        assert_eq!(d, [0; 4]);
        // Through the BAR: writes are taken and dropped.
        assert!(m.write_bar(2, 0x2008, &[0u8; 8]));
        assert!(m.is_pending(69));
        let mut b = [0u8; 2];
        m.read_pba(8, &mut b);
        assert_eq!(b, [0; 2]);
    }

    #[test]
    fn bar_accesses_reach_table_and_pba_only() {
        let (mut m, _rec) = msix(2);
        assert!(m.write_bar(2, 0x1c, &0u32.to_le_bytes()));
        let mut d = [0xffu8; 4];
        assert!(m.read_bar(2, 0x1c, &mut d));
        assert_eq!(d, [0; 4]);
        assert!(m.read_bar(2, 0x2000, &mut d));
        // Outside both, or another BAR: not ours.
        assert!(!m.read_bar(2, 0x20, &mut d));
        assert!(!m.read_bar(2, 0x2008, &mut d));
        assert!(!m.read_bar(0, 0x1c, &mut d));
        assert!(!m.write_bar(3, 0, &d));
        assert!(!m.write_bar(2, 0x1000, &d));
    }

    #[test]
    fn construction_checks() {
        let rec = || Box::new(Recorder::default());
        assert_eq!(
            Msix::new(0, TABLE, PBA, rec()).err(),
            Some(MsixError::TableSize(0))
        );
        assert_eq!(
            Msix::new(2049, TABLE, PBA, rec()).err(),
            Some(MsixError::TableSize(2049))
        );
        let far_pba = MsixLocation {
            bir: 2,
            offset: 0x8000,
        };
        assert!(Msix::new(2048, TABLE, far_pba, rec()).is_ok());
        // 2048 entries are 32 KiB: they reach a PBA at 8 KiB.
        assert_eq!(
            Msix::new(2048, TABLE, PBA, rec()).err(),
            Some(MsixError::Overlap { bir: 2 })
        );
        let bad_bir = MsixLocation { bir: 6, offset: 0 };
        assert!(matches!(
            Msix::new(1, bad_bir, PBA, rec()),
            Err(MsixError::Location { what: "table", .. })
        ));
        let misaligned = MsixLocation {
            bir: 2,
            offset: 0x2004,
        };
        assert!(matches!(
            Msix::new(1, TABLE, misaligned, rec()),
            Err(MsixError::Location { what: "PBA", .. })
        ));
        let overlapping = MsixLocation {
            bir: 2,
            offset: 0x30,
        };
        assert_eq!(
            Msix::new(4, TABLE, overlapping, rec()).err(),
            Some(MsixError::Overlap { bir: 2 })
        );
        let other_bar = MsixLocation { bir: 3, offset: 0 };
        assert!(Msix::new(4, TABLE, other_bar, rec()).is_ok());
    }

    #[test]
    fn reset_masks_and_reports() {
        let (mut m, rec) = msix(2);
        let mut c = config();
        m.add_capability(&mut c).unwrap();
        m.set_message_control(MESSAGE_CONTROL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x60);
        write32(&mut m, 12, 1);
        assert_eq!(m.trigger(0), MsixTrigger::Pending);
        rec.take();
        m.reset(&mut c);
        assert_eq!(rec.take().0, vec![vec![(1, route(0, 0, true))]]);
        assert!(!m.is_pending(0));
        assert_eq!(read32(&mut m, 16 + 12), VECTOR_CONTROL_MASK);
        assert_eq!(read32(&mut m, 16 + 8), 0);
    }
}

//! Turning one descriptor chain into a typed virtio-blk request (virtio v1.2 §5.2.6), with
//! every check in one place: this is the attack surface a hostile guest sees.
//!
//! The layout is not assumed (§2.6.4, message framing): the header is the first 16
//! device-readable bytes, the status is the last device-writable byte, and the data is
//! what lies between, in however many descriptors the driver chose.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
pub const HEADER_LEN: usize = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const DISCARD_SEGMENT_LEN: u64 = 16;
/// Most descriptors one request may use: SEG_MAX data segments, header and status.
pub const MAX_DESCRIPTORS: usize = super::device::SEG_MAX as usize + 2;
/// Bytes of a GET_ID answer.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// What the driver asked for (§5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

impl RequestType {
    /// Whether the data buffers are written by the device.
    fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }
}

/// A guest buffer already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request that passed every structural check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// Data buffers: device-writable for IN and GET_ID, device-readable otherwise.
    pub data: Vec<Segment>,
    pub data_len: u64,
    pub status: GuestAddress,
    pub head: u16,
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    /// The chain ends in a descriptor that points further (a loop or an index past the
    /// queue): its extent is unknown.
    #[error("descriptor chain is truncated (a loop or an out-of-range next index)")]
    Truncated,
    /// No device-writable byte at the end of the chain to hold the status.
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    /// A descriptor's buffer is not entirely inside guest RAM.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// A device-readable descriptor follows a device-writable one (§2.7.4.2).
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is {0} bytes, 16 are needed")]
    ShortHeader(u64),
    /// Data buffers point the wrong way for the request type.
    #[error("{kind:?} request with {what} data buffers")]
    DataDirection {
        kind: RequestType,
        what: &'static str,
    },
    /// IN/OUT data is not a whole number of sectors.
    #[error("{kind:?} data length {len} is not a multiple of 512")]
    UnalignedLength { kind: RequestType, len: u64 },
    /// More data than the device accepts in one request.
    #[error("request data of {len} bytes exceeds the limit of {limit}")]
    TooLong { len: u64, limit: u64 },
    /// DISCARD/WRITE_ZEROES payload is not a whole number of segments.
    #[error("discard/write-zeroes payload of {0} bytes is not a multiple of 16")]
    BadDiscardPayload(u64),
}

/// The outcome of parsing: a request, or an error to answer with IOERR (when a status byte
/// exists) or with an empty used entry (when it does not).
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Request(Request),
    Invalid {
        head: u16,
        status: Option<GuestAddress>,
        error: RequestError,
    },
}

struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

fn in_memory<M: GuestMemory + ?Sized>(mem: &M, addr: GuestAddress, len: u32) -> bool {
    len == 0 || mem.check_range(addr, len as usize, vm_memory::Permissions::ReadWrite)
}

/// Parses the chain (whose buffers live in `mem`); `max_data` bounds the data bytes of one
/// request.
pub fn parse<M, G>(chain: DescriptorChain<M>, mem: &G, max_data: u64) -> Parsed
where
    M: Deref,
    M::Target: GuestMemory,
    G: GuestMemory + ?Sized,
{
    let head = chain.head_index();
    let mut descs = Vec::new();
    let mut truncated = false;
    // SEG_MAX data segments plus header and status: anything longer is refused unread (an
    // indirect table can hold 65535 descriptors).
    for d in chain.take(MAX_DESCRIPTORS) {
        truncated = d.has_next();
        descs.push(Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
    }
    let invalid = |status, error| Parsed::Invalid {
        head,
        status,
        error,
    };
    if truncated {
        return invalid(None, RequestError::Truncated);
    }

    // Status: the last byte of the last descriptor, which must be device-writable.
    let status = match descs.last() {
        Some(d) if d.writable && d.len > 0 => {
            let at = GuestAddress(d.addr.0.wrapping_add(u64::from(d.len) - 1));
            if d.addr.0.checked_add(u64::from(d.len)).is_some() && in_memory(mem, at, 1) {
                at
            } else {
                return invalid(None, RequestError::NoStatus);
            }
        }
        _ => return invalid(None, RequestError::NoStatus),
    };
    let fail = |error| invalid(Some(status), error);

    // Every buffer inside guest memory; readable ones before writable ones.
    let mut seen_writable = false;
    for d in &descs {
        if !in_memory(mem, d.addr, d.len) {
            return fail(RequestError::OutsideMemory {
                addr: d.addr.0,
                len: d.len,
            });
        }
        if d.writable {
            seen_writable = true;
        } else if seen_writable {
            return fail(RequestError::ReadableAfterWritable);
        }
    }

    // Split into readable and writable byte ranges; the status byte leaves the writable
    // side.
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        let len = if i + 1 == descs.len() {
            d.len - 1
        } else {
            d.len
        };
        if len == 0 {
            continue;
        }
        let seg = Segment { addr: d.addr, len };
        if d.writable {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }

    // Header: the first 16 readable bytes, wherever they are.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0usize;
    let mut rest = Vec::new();
    for seg in readable {
        if got < HEADER_LEN {
            let take = (HEADER_LEN - got).min(seg.len as usize);
            if mem
                .read_slice(&mut header[got..got + take], seg.addr)
                .is_err()
            {
                return fail(RequestError::OutsideMemory {
                    addr: seg.addr.0,
                    len: seg.len,
                });
            }
            got += take;
            if take < seg.len as usize {
                rest.push(Segment {
                    addr: GuestAddress(seg.addr.0 + take as u64),
                    len: seg.len - take as u32,
                });
            }
        } else {
            rest.push(seg);
        }
    }
    if got < HEADER_LEN {
        return fail(RequestError::ShortHeader(got as u64));
    }
    let kind = RequestType::from(u32::from_le_bytes([
        header[0], header[1], header[2], header[3],
    ]));
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);

    let (data, other) = if kind.device_writes_data() {
        (writable, rest)
    } else {
        (rest, writable)
    };
    let data_len: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    let other_len: u64 = other.iter().map(|s| u64::from(s.len)).sum();
    match kind {
        RequestType::In | RequestType::Out | RequestType::GetId if other_len > 0 => {
            return fail(RequestError::DataDirection {
                kind,
                what: if kind.device_writes_data() {
                    "device-readable"
                } else {
                    "device-writable"
                },
            })
        }
        RequestType::Flush if data_len > 0 || other_len > 0 => {
            return fail(RequestError::DataDirection { kind, what: "any" })
        }
        RequestType::Discard | RequestType::WriteZeroes if other_len > 0 => {
            return fail(RequestError::DataDirection {
                kind,
                what: "device-writable",
            })
        }
        _ => {}
    }
    match kind {
        RequestType::In | RequestType::Out if data_len % SECTOR_SIZE != 0 => {
            return fail(RequestError::UnalignedLength {
                kind,
                len: data_len,
            })
        }
        RequestType::Discard | RequestType::WriteZeroes
            if data_len == 0 || data_len % DISCARD_SEGMENT_LEN != 0 =>
        {
            return fail(RequestError::BadDiscardPayload(data_len))
        }
        _ => {}
    }
    if data_len > max_data {
        return fail(RequestError::TooLong {
            len: data_len,
            limit: max_data,
        });
    }
    Parsed::Request(Request {
        kind,
        sector,
        data,
        data_len,
        status,
        head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM: u64 = 0x10_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Builds a chain from (addr, len, flags) and parses it.
    fn parse_chain(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Parsed {
        parse_chain_limit(mem, descs, 1 << 20)
    }

    fn parse_chain_limit(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)], limit: u64) -> Parsed {
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if flags & F_NEXT != 0 { i as u16 + 1 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(mem).unwrap().next().expect("a chain");
        parse(chain, mem, limit)
    }

    fn request(p: Parsed) -> Request {
        match p {
            Parsed::Request(r) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn error(p: Parsed) -> (Option<GuestAddress>, RequestError) {
        match p {
            Parsed::Invalid { status, error, .. } => (status, error),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn read_with_two_data_segments() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let r = request(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 512, F_NEXT | F_WRITE),
                (0x3000, 1024, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.sector, 7);
        assert_eq!(r.data_len, 1536);
        assert_eq!(r.data.len(), 2);
        assert_eq!(r.status, GuestAddress(0x4000));
    }

    #[test]
    fn any_layout_header_and_data_in_one_descriptor_status_in_data() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 3);
        // Header followed by 512 bytes of data in one readable descriptor; the status shares
        // a writable descriptor with nothing else.
        let r = request(parse_chain(
            &m,
            &[(0x1000, 16 + 512, F_NEXT), (0x5000, 1, F_WRITE)],
        ));
        assert_eq!((r.kind, r.sector, r.data_len), (RequestType::Out, 3, 512));
        assert_eq!(r.data[0].addr, GuestAddress(0x1010));
        // IN data and status in one writable descriptor.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let r = request(parse_chain(
            &m,
            &[(0x1000, 16, F_NEXT), (0x6000, 513, F_WRITE)],
        ));
        assert_eq!((r.data_len, r.status), (512, GuestAddress(0x6200)));
    }

    #[test]
    fn missing_or_readable_or_empty_status_has_no_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        for descs in [
            vec![(0x1000, 16, F_NEXT), (0x2000, 512, 0)],
            vec![(0x1000, 16, F_NEXT), (0x2000, 0, F_WRITE)],
            vec![(0x1000, 16, 0)],
        ] {
            assert_eq!(
                error(parse_chain(&m, &descs)),
                (None, RequestError::NoStatus)
            );
        }
    }

    #[test]
    fn buffers_outside_memory_are_refused_with_a_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (status, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x7_0000_0000, 4096, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert_eq!(status, Some(GuestAddress(0x4000)));
        assert!(matches!(e, RequestError::OutsideMemory { .. }));
        // A buffer straddling the end of RAM.
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (MEM - 512, 1024, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert!(matches!(e, RequestError::OutsideMemory { .. }));
        // A status byte outside RAM: nowhere to answer.
        let (status, e) = error(parse_chain(&m, &[(0x1000, 16, F_NEXT), (MEM, 1, F_WRITE)]));
        assert_eq!((status, e), (None, RequestError::NoStatus));
    }

    #[test]
    fn header_in_a_device_writable_buffer_is_refused() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (status, e) = error(parse_chain(
            &m,
            &[(0x1000, 16, F_NEXT | F_WRITE), (0x4000, 1, F_WRITE)],
        ));
        assert_eq!(status, Some(GuestAddress(0x4000)));
        assert_eq!(e, RequestError::ShortHeader(0));
    }

    #[test]
    fn readable_after_writable_and_wrong_direction_are_refused() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 512, F_NEXT | F_WRITE),
                (0x3000, 512, F_NEXT),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert_eq!(e, RequestError::ReadableAfterWritable);
        // OUT with writable data.
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 512, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert!(matches!(e, RequestError::DataDirection { .. }));
        // IN with readable data.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 512, F_NEXT),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert!(matches!(e, RequestError::DataDirection { .. }));
        // FLUSH with data.
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 512, F_NEXT),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert!(matches!(e, RequestError::DataDirection { .. }));
    }

    #[test]
    fn lengths_are_checked() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 100, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert!(matches!(e, RequestError::UnalignedLength { .. }));
        let (_, e) = error(parse_chain_limit(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x8000, 0x2000, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
            0x1000,
        ));
        assert_eq!(
            e,
            RequestError::TooLong {
                len: 0x2000,
                limit: 0x1000
            }
        );
        let (_, e) = error(parse_chain(
            &m,
            &[(0x1000, 8, F_NEXT), (0x4000, 1, F_WRITE)],
        ));
        assert_eq!(e, RequestError::ShortHeader(8));
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let (_, e) = error(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 20, F_NEXT),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert_eq!(e, RequestError::BadDiscardPayload(20));
    }

    #[test]
    fn flush_get_id_and_unknown_types_parse() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let r = request(parse_chain(
            &m,
            &[(0x1000, 16, F_NEXT), (0x4000, 1, F_WRITE)],
        ));
        assert_eq!((r.kind, r.data_len), (RequestType::Flush, 0));
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let r = request(parse_chain(
            &m,
            &[
                (0x1000, 16, F_NEXT),
                (0x2000, 20, F_NEXT | F_WRITE),
                (0x4000, 1, F_WRITE),
            ],
        ));
        assert_eq!((r.kind, r.data_len), (RequestType::GetId, 20));
        header(&m, 0x1000, 0x77, 0);
        let r = request(parse_chain(
            &m,
            &[(0x1000, 16, F_NEXT), (0x4000, 1, F_WRITE)],
        ));
        assert_eq!(r.kind, RequestType::Unsupported(0x77));
    }

    #[test]
    fn a_descriptor_loop_is_truncated_not_followed_forever() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 0 -> ...
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(0x1000, 16, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x2000, 512, F_NEXT | F_WRITE, 0)),
        ];
        vq.build_desc_chain(&raw).unwrap();
        // build_desc_chain rewrites `next` for chaining; point the second back at the first.
        vq.desc_table()
            .store(
                1,
                RawDescriptor::from(SplitDescriptor::new(0x2000, 512, F_NEXT | F_WRITE, 0)),
            )
            .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(&m).unwrap().next().unwrap();
        assert_eq!(
            error(parse(chain, &m, 1 << 20)),
            (None, RequestError::Truncated)
        );
        let _ = q.is_valid(&m);
    }
}

//! The `blk_queue` fuzz body (see `crate::fuzz_targets` for the shared helpers).

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::io::IoEngineKind;
use super::request::MAX_DESCRIPTORS;
use super::{Block, BlockConfig};
use crate::device::{features, ActivateContext, DeviceNeedsReset, DirectSpawner, VirtioDevice};
use crate::fuzz_targets::{
    changed_ranges, copy_memory, fill, guarded_memory, memfd_image, overlaps, CountingIrq, Input,
    Ring,
};

const LAYOUT: [(u64, usize); 2] = [(0, 0x10000), (0x20000, 0x10000)];
/// 128 sectors.
const DISK_BYTES: u64 = 64 << 10;

/// `blk_queue`: a virtqueue of any size with an arbitrary available ring, descriptor table
/// and buffers (the input is guest memory from address 0: available ring at 0x100, descriptor table
/// at 0x400; the used ring at 0x1400 starts zeroed) processed by the virtio-blk worker
/// (synchronous engine, in-memory image, read-only or not, EVENT_IDX or not), started by
/// `Block::activate` and stopped by `Block::reset`.
/// Asserts, once the worker has stopped: an impossible available index raises
/// DEVICE_NEEDS_RESET and uses nothing; otherwise at most one used entry per available one,
/// and exactly one when every head is distinct and inside the queue; every used id is a
/// head the driver made available; every used length fits the chain's device-writable
/// bytes; a used length of at least one means the status byte (the chain's last byte) holds
/// OK, IOERR or UNSUPP. Guard pages catch any access outside guest memory.
pub fn blk_queue(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let flags = input.u8();
    let event_idx = flags & 1 != 0;
    let readonly = flags & 2 != 0;
    let notify = flags & 4 != 0;

    let mem = guarded_memory("blk_queue", &LAYOUT);
    let snap = guarded_memory("blk_queue.snapshot", &LAYOUT);
    fill(&mem, 0, input.rest());
    let ring = Ring::at(0, size);
    ring.clear_used(&mem);
    copy_memory(&mem, &snap);

    let (_image, path) = memfd_image(DISK_BYTES);
    let irq = Arc::new(CountingIrq::default());
    let needs_reset = DeviceNeedsReset::new(irq.clone());
    let queue = ring.queue(&mem, event_idx);
    let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut block = Block::new(&BlockConfig {
        path,
        readonly,
        direct: false,
        id: Some("fuzz".into()),
        io_engine: IoEngineKind::Sync,
    })
    .expect("block device");
    let mut acked = block.avail_features() & !features::VIRTIO_F_EVENT_IDX;
    if event_idx {
        acked |= features::VIRTIO_F_EVENT_IDX;
    }
    block
        .activate(ActivateContext {
            mem: GuestMemoryAtomic::new(mem.clone()),
            acked_features: acked,
            queues: vec![(0, queue, evt.try_clone().expect("eventfd"))],
            interrupt: irq,
            needs_reset: needs_reset.clone(),
            spawner: Arc::new(DirectSpawner),
        })
        .expect("activate");
    if notify {
        evt.write(1).expect("notify");
    }
    // The worker takes its first pass over the ring as it starts; the reset returns only
    // once it has stopped and finished its I/O.
    block.reset();
    check_completions(&ring, &mem, &snap, needs_reset.is_raised());
}

fn check_completions(ring: &Ring, mem: &GuestMemoryMmap, snap: &GuestMemoryMmap, raised: bool) {
    let avail = ring.avail_idx(snap);
    let (used_idx, used) = ring.used(mem);
    let Some(chains) = ring.chains(snap, MAX_DESCRIPTORS) else {
        assert!(avail > ring.size);
        assert!(
            raised,
            "impossible avail index {avail} without DEVICE_NEEDS_RESET"
        );
        assert_eq!(used_idx, 0, "used entries for a ring that cannot be walked");
        return;
    };
    // What the device wrote besides the used ring may have changed the rings, the tables or
    // the used ring itself (a hostile driver points buffers there): check only what such
    // writes cannot have changed.
    let changed = changed_ranges(snap, mem);
    let (used_start, used_end) = ring.used_area();
    let written: Vec<(u64, u64)> = chains.iter().flat_map(|c| c.writable()).collect();
    if overlaps(&written, used_start, used_end - used_start) {
        return;
    }
    let metadata = ring.metadata(snap);
    if metadata
        .iter()
        .any(|&(s, e)| overlaps(&changed, s, e.saturating_sub(s)))
    {
        return;
    }
    assert!(used_idx <= avail, "{used_idx} used of {avail} available");
    let mut heads: Vec<u16> = chains.iter().map(|c| c.head).collect();
    heads.sort_unstable();
    heads.dedup();
    let distinct = heads.len() == chains.len() && heads.iter().all(|&h| h < ring.size);
    if distinct {
        assert_eq!(used_idx, avail, "every available chain is used");
        assert!(!raised, "DEVICE_NEEDS_RESET for a well-formed ring");
    }
    // A byte of the guest's buffers other than a status byte may receive data (IN,
    // GET_ID) after another request's status was written there.
    let data_bytes: Vec<(u64, u64)> = chains
        .iter()
        .flat_map(|c| {
            let status = c.descs.last().filter(|d| d.is_write_only() && d.len() > 0);
            let status = status.map(|d| d.addr().0.wrapping_add(u64::from(d.len()) - 1));
            c.writable()
                .flat_map(move |(s, e)| match status {
                    Some(st) if (s..e).contains(&st) => vec![(s, st), (st + 1, e)],
                    _ => vec![(s, e)],
                })
                .collect::<Vec<_>>()
        })
        .collect();
    for (id, len) in used {
        let chain = chains
            .iter()
            .find(|c| u32::from(c.head) == id)
            .unwrap_or_else(|| panic!("used id {id} was never made available"));
        assert!(id < u32::from(ring.size));
        assert!(
            u64::from(len) <= chain.writable_bytes(),
            "used length {len} of a chain with {} writable bytes",
            chain.writable_bytes()
        );
        if len == 0 {
            continue;
        }
        let last = chain.descs.last().expect("a used chain with a status");
        assert!(last.is_write_only() && last.len() > 0, "status descriptor");
        let Some(status) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
            panic!("a used length for a status byte past the address space");
        };
        if overlaps(&data_bytes, status, 1) || (used_start..used_end).contains(&status) {
            continue;
        }
        let value: u8 = mem
            .read_obj(GuestAddress(status))
            .expect("status in memory");
        assert!(value <= 2, "status byte {value} at {status:#x}");
    }
}

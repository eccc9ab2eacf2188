//! Fuzz target bodies for the guest-facing virtio code: the virtio-mmio transport, the
//! virtio-blk request parser and worker, the virtio-net transmit, control and receive paths.
//! The `fuzz/` crate calls these; `cargo test` replays the committed corpus through them.
//!
//! Each body treats its input as what a hostile driver controls (registers, rings,
//! descriptors, buffers) and asserts what the device must guarantee whatever the driver
//! does. Guest memory is mapped between guard pages, so an access that escapes guest memory
//! through a host pointer faults instead of going unnoticed.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use devices::BusDevice;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use crate::block::fuzz_targets::blk_queue;
use crate::block::request::{self, Parsed, RequestError, RequestType, MAX_DESCRIPTORS};
use crate::block::{Block, BlockConfig, IoEngineKind};
use crate::device::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use crate::device::{features, VirtioInterrupt, VirtioInterruptType};
pub use crate::net::fuzz_targets::{net_rx, net_tx_ctrl};
use crate::transport::mmio::{MmioTransport, CONFIG_SPACE_OFFSET, MAGIC_VALUE};
pub use devices::fuzz_targets::{replay_corpus, Input};

const PAGE: usize = 4096;

/// Guest memory laid out as `layout` ((guest address, size) pairs, sorted), zero-filled, each
/// region between two PROT_NONE pages. The mappings are made once per thread and `name`
/// and never unmapped (a device clone of the memory can never outlive them); each call
/// zeroes them again with MADV_DONTNEED, which costs only the pages a run touched.
pub(crate) fn guarded_memory(name: &'static str, layout: &[(u64, usize)]) -> GuestMemoryMmap {
    thread_local! {
        static POOL: RefCell<Vec<(&'static str, Vec<usize>)>> = const { RefCell::new(Vec::new()) };
    }
    let hosts = POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if let Some((_, hosts)) = pool.iter().find(|(n, _)| *n == name) {
            return hosts.clone();
        }
        let hosts: Vec<usize> = layout.iter().map(|&(_, size)| reserve(size)).collect();
        pool.push((name, hosts.clone()));
        hosts
    });
    let regions = layout
        .iter()
        .zip(hosts)
        .map(|(&(base, size), host)| {
            // SAFETY: `host` is a private anonymous read-write mapping of `size` bytes made
            // by `reserve` and never unmapped; MADV_DONTNEED only zeroes it.
            unsafe {
                assert_eq!(
                    libc::madvise(host as *mut libc::c_void, size, libc::MADV_DONTNEED),
                    0
                );
                let region = MmapRegion::build_raw(
                    host as *mut u8,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
                .expect("raw region");
                GuestRegionMmap::new(region, GuestAddress(base)).expect("region")
            }
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest memory")
}

/// Maps `size` bytes (a multiple of the page size) read-write between two PROT_NONE pages.
fn reserve(size: usize) -> usize {
    assert_eq!(size % PAGE, 0);
    // SAFETY: a fresh anonymous mapping; only its middle is made accessible.
    unsafe {
        let base = libc::mmap(
            std::ptr::null_mut(),
            size + 2 * PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        let inner = base.cast::<u8>().add(PAGE);
        assert_eq!(
            libc::mprotect(inner.cast(), size, libc::PROT_READ | libc::PROT_WRITE),
            0
        );
        inner as usize
    }
}

/// Copies `image` into guest memory at `at`, as far as it fits in that region.
pub(crate) fn fill(mem: &GuestMemoryMmap, at: u64, image: &[u8]) {
    let Some(region) = mem.find_region(GuestAddress(at)) else {
        return;
    };
    let room = (region.start_addr().0 + region.len() - at) as usize;
    let n = image.len().min(room);
    mem.write_slice(&image[..n], GuestAddress(at))
        .expect("inside the region");
}

/// Copies every region of `src` into `dst` (same layout).
pub(crate) fn copy_memory(src: &GuestMemoryMmap, dst: &GuestMemoryMmap) {
    for region in src.iter() {
        let mut buf = vec![0u8; region.len() as usize];
        src.read_slice(&mut buf, region.start_addr())
            .expect("region");
        dst.write_slice(&buf, region.start_addr()).expect("region");
    }
}

/// The guest addresses (as half-open ranges) where `a` and `b` differ.
pub(crate) fn changed_ranges(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for region in a.iter() {
        let len = region.len() as usize;
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        a.read_slice(&mut x, region.start_addr()).expect("region");
        b.read_slice(&mut y, region.start_addr()).expect("region");
        let base = region.start_addr().0;
        let mut i = 0;
        while i < len {
            if x[i] == y[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < len && x[i] != y[i] {
                i += 1;
            }
            out.push((base + start as u64, base + i as u64));
        }
    }
    out
}

pub(crate) fn inside(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
    GuestMemoryBackend::check_range(mem, addr, len)
}

/// Whether `[start, start + len)` meets any of `ranges`.
pub(crate) fn overlaps(ranges: &[(u64, u64)], start: u64, len: u64) -> bool {
    let end = start.saturating_add(len);
    ranges.iter().any(|&(s, e)| s < end && start < e)
}

/// A split virtqueue at fixed guest addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ring {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Ring {
    /// A queue of `size` (a power of two) whose parts start near `base`: the available ring
    /// at +0x100 (`virtio-queue` takes an available ring at address 0 for an unset one), the
    /// descriptor table at +0x400, the used ring at +0x1400 (room for 256 entries each).
    pub fn at(base: u64, size: u16) -> Self {
        Self {
            size,
            avail: base + 0x100,
            desc: base + 0x400,
            used: base + 0x1400,
        }
    }

    /// The queue as a transport would hand it to the device.
    pub fn queue(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(self.used))
            .expect("aligned");
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(mem), "ring inside guest memory");
        q
    }

    pub fn used_area(&self) -> (u64, u64) {
        (self.used, self.used + 6 + 8 * u64::from(self.size))
    }

    /// The descriptor table, the available ring and every indirect table the direct
    /// descriptors point at: what the device reads to find chains.
    pub fn metadata(&self, snap: &GuestMemoryMmap) -> Vec<(u64, u64)> {
        let n = u64::from(self.size);
        let mut out = vec![
            (self.desc, self.desc + 16 * n),
            (self.avail, self.avail + 6 + 2 * n),
        ];
        for i in 0..n {
            if let Ok(d) = snap.read_obj::<Descriptor>(GuestAddress(self.desc + 16 * i)) {
                if d.refers_to_indirect_table() {
                    let start = d.addr().0;
                    out.push((start, start.saturating_add(u64::from(d.len()))));
                }
            }
        }
        out
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap_or(0)
    }

    /// The used ring's index and its first `min(idx, size)` (id, len) entries.
    pub fn used(&self, mem: &GuestMemoryMmap) -> (u16, Vec<(u32, u32)>) {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0);
        let entries = (0..u64::from(idx.min(self.size)))
            .map(|i| {
                let at = self.used + 4 + 8 * i;
                let id: u32 = mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
                let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
                (id, len)
            })
            .collect();
        (idx, entries)
    }

    /// Zeroes the used ring, as a driver leaves it before DRIVER_OK.
    pub fn clear_used(&self, mem: &GuestMemoryMmap) {
        let (start, end) = self.used_area();
        let _ = mem.write_slice(&vec![0u8; (end - start) as usize], GuestAddress(start));
    }

    /// The chains the driver made available, in ring order, read from `snap` (memory as it
    /// was before the device ran) with the same walker the device uses, at most `limit`
    /// descriptors each; None if the available index is impossible.
    pub fn chains(&self, snap: &GuestMemoryMmap, limit: usize) -> Option<Vec<Chain>> {
        let mut q = self.queue(snap, false);
        let iter = q.iter(snap).ok()?;
        Some(
            iter.map(|chain| Chain {
                head: chain.head_index(),
                descs: chain.take(limit).collect(),
            })
            .collect(),
        )
    }
}

/// One available chain as the driver laid it out.
#[derive(Debug, Clone)]
pub(crate) struct Chain {
    pub head: u16,
    pub descs: Vec<Descriptor>,
}

impl Chain {
    pub fn writable_bytes(&self) -> u64 {
        self.descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum()
    }

    /// Device-writable byte ranges.
    pub fn writable(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.descs
            .iter()
            .filter(|d| d.is_write_only())
            .map(|d| (d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))))
    }
}

/// Counts notifications; the bodies only need them not to fail.
#[derive(Default)]
pub(crate) struct CountingIrq(pub AtomicU64);

impl VirtioInterrupt for CountingIrq {
    fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A zero-filled disk image of `len` bytes in memory (a memfd), and a path that opens it.
pub(crate) fn memfd_image(len: u64) -> (File, PathBuf) {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is ours.
    let file = unsafe {
        let fd = libc::memfd_create(c"vireo-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        File::from_raw_fd(fd)
    };
    file.set_len(len).expect("memfd size");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    (file, path)
}

// ---------------------------------------------------------------------------------------
// blk_request

const REQ_LAYOUT: [(u64, usize); 2] = [(0, 0x8000), (0x10000, 0x1000)];

/// `blk_request`: arbitrary descriptor tables and available rings (the input is guest
/// memory from address 0: available ring at 0x100, descriptor table at 0x400, buffers
/// anywhere) fed
/// to `request::parse`. Asserts: a parsed request's segments lie inside guest memory and
/// inside the chain's descriptors of the right direction, its header is the chain's first
/// 16 readable bytes, its lengths follow its type and the limit; the status byte is the last
/// byte of the last, device-writable descriptor; a chain is truncated exactly when it does
/// not end within the descriptors the parser follows.
pub fn blk_request(data: &[u8]) {
    let mut input = Input::new(data);
    let size = 1u16 << (input.u8() % 9);
    let max_data = match input.u8() % 4 {
        0 => u64::from(crate::block::SEG_MAX) * u64::from(crate::block::SIZE_MAX),
        1 => 4096,
        2 => 0,
        _ => u64::from(input.u32()),
    };
    let mem = guarded_memory("blk_request", &REQ_LAYOUT);
    fill(&mem, 0, input.rest());
    let ring = Ring::at(0, size);
    let mut q = ring.queue(&mem, false);
    let Ok(iter) = q.iter(&mem) else {
        // An impossible available index: the device's worker refuses the ring.
        assert!(ring.avail_idx(&mem) > size);
        return;
    };
    for chain in iter.take(64) {
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.clone().take(MAX_DESCRIPTORS + 1).collect();
        let followed = &descs[..descs.len().min(MAX_DESCRIPTORS)];
        let truncated = followed.last().is_some_and(|d| d.has_next());
        let status_of_last = followed.last().and_then(|d| {
            (d.is_write_only() && d.len() > 0)
                .then(|| d.addr().0.checked_add(u64::from(d.len()) - 1))
                .flatten()
        });
        match request::parse(chain, &mem, max_data) {
            Parsed::Request(r) => {
                assert!(!truncated, "a truncated chain parsed");
                assert_eq!(r.head, head);
                assert_eq!(Some(r.status.0), status_of_last, "status byte");
                assert!(inside(&mem, r.status, 1), "status inside memory");
                check_request(&mem, &r, followed, max_data);
            }
            Parsed::Invalid {
                head: h,
                status,
                error,
            } => {
                assert_eq!(h, head);
                assert_eq!(error == RequestError::Truncated, truncated, "{error:?}");
                if let Some(s) = status {
                    assert_eq!(Some(s.0), status_of_last, "status byte of {error:?}");
                    assert!(inside(&mem, s, 1), "status inside memory");
                }
            }
        }
    }
}

fn check_request(mem: &GuestMemoryMmap, r: &request::Request, descs: &[Descriptor], max: u64) {
    let device_writes = matches!(r.kind, RequestType::In | RequestType::GetId);
    let mut total = 0u64;
    for seg in &r.data {
        assert!(seg.len > 0, "empty segment");
        assert!(
            inside(mem, seg.addr, seg.len as usize),
            "segment inside memory"
        );
        let end = seg.addr.0 + u64::from(seg.len);
        let inside = descs.iter().any(|d| {
            d.is_write_only() == device_writes
                && d.addr().0 <= seg.addr.0
                && end <= d.addr().0 + u64::from(d.len())
        });
        assert!(
            inside,
            "segment {seg:?} inside a descriptor of its direction"
        );
        total += u64::from(seg.len);
    }
    assert_eq!(total, r.data_len);
    assert!(r.data_len <= max, "data over the limit");
    assert!(r.data.len() <= MAX_DESCRIPTORS);
    let chain_bytes: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    assert!(
        16 + r.data_len < chain_bytes,
        "header, data and status fit the chain"
    );
    match r.kind {
        RequestType::In | RequestType::Out => assert_eq!(r.data_len % 512, 0),
        RequestType::Flush => assert_eq!(r.data_len, 0),
        RequestType::Discard | RequestType::WriteZeroes => {
            assert!(r.data_len > 0 && r.data_len % 16 == 0)
        }
        _ => {}
    }
    // The header is the first 16 device-readable bytes.
    let mut header = Vec::new();
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let take = (16 - header.len()).min(d.len() as usize);
        let mut buf = vec![0u8; take];
        mem.read_slice(&mut buf, d.addr())
            .expect("header inside memory");
        header.extend_from_slice(&buf);
        if header.len() == 16 {
            break;
        }
    }
    assert_eq!(header.len(), 16);
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    assert_eq!(r.kind, RequestType::from(kind));
    assert_eq!(r.sector, sector);
}

// ---------------------------------------------------------------------------------------
// virtio_mmio

const MMIO_LAYOUT: [(u64, usize); 2] = [(0, 0x10000), (0x20000, 0x10000)];
const DISK_BYTES: u64 = 64 << 10;
const STATUS: u64 = 0x70;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_READY: u64 = 0x44;
const INTERRUPT_STATUS: u64 = 0x60;

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0xa5u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// DeviceStatus must be a prefix of the initialization bits plus FAILED and
/// DEVICE_NEEDS_RESET, and DEVICE_NEEDS_RESET only once the device was live.
fn check_status(status: u32) {
    let stage = status & !(FAILED | DEVICE_NEEDS_RESET);
    let stages = [
        0,
        ACKNOWLEDGE,
        ACKNOWLEDGE | DRIVER,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ];
    assert!(stages.contains(&stage), "status {status:#x}");
    if status & DEVICE_NEEDS_RESET != 0 {
        assert_eq!(stage, stages[4], "DEVICE_NEEDS_RESET before DRIVER_OK");
    }
}

fn check_register_read(offset: u64, value: u32) {
    match offset {
        0x000 => assert_eq!(value, MAGIC_VALUE),
        0x004 => assert_eq!(value, 2, "Version"),
        0x008 => assert_eq!(value, 2, "DeviceID: block"),
        0x060 => assert_eq!(value & !3, 0, "InterruptStatus bits"),
        0x070 => check_status(value),
        _ => {}
    }
}

fn check_reset(t: &mut MmioTransport) {
    assert_eq!(read32(t, STATUS), 0, "status after reset");
    assert_eq!(read32(t, INTERRUPT_STATUS), 0, "interrupts after reset");
    assert_eq!(read32(t, QUEUE_READY), 0, "queue 0 ready after reset");
    assert_eq!(read32(t, 0x34), 256, "QueueNumMax of queue 0");
}

/// `virtio_mmio`: a sequence of register reads and writes at any offset and width, status
/// transitions, feature negotiation, queue set-up, notifications, configuration accesses,
/// guest memory changes and resets, against the virtio-mmio transport with a virtio-blk
/// device (synchronous engine, in-memory image) behind it. Asserts: identification
/// registers, DeviceStatus always a legal value (DEVICE_NEEDS_RESET only after DRIVER_OK),
/// wrong-width register reads answer zeros, the configuration space answers the disk's
/// capacity and zeros outside it, FEATURES_OK is kept exactly when the driver accepted only
/// offered features with VERSION_1, and a reset returns (the worker stops) and clears the
/// registers.
pub fn virtio_mmio(data: &[u8]) {
    let mut input = Input::new(data);
    let readonly = input.u8() & 1 != 0;
    let mem = guarded_memory("virtio_mmio", &MMIO_LAYOUT);
    let image_len = usize::from(input.u16() % 0x2000);
    fill(&mem, 0, input.bytes(image_len));
    let (_image, path) = memfd_image(DISK_BYTES);
    let block = Block::new(&BlockConfig {
        path,
        readonly,
        direct: false,
        id: Some("fuzz".into()),
        io_engine: IoEngineKind::Sync,
    })
    .expect("block device");
    let offered = block_features(&block);
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let mut t = MmioTransport::new(Box::new(block), GuestMemoryAtomic::new(mem.clone()), irq)
        .expect("transport");
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 8 {
            0 => {
                let offset = u64::from(input.u8() % 0x40) * 4;
                let value = input.u32();
                write32(&mut t, offset, value);
            }
            1 => {
                let offset = u64::from(input.u8() % 0x40) * 4;
                let value = read32(&mut t, offset);
                check_register_read(offset, value);
            }
            2 => {
                let op = input.u8();
                let offset = u64::from(input.u16() % 0x1000);
                let len = [1usize, 2, 3, 4, 8, 16, 0, 5][usize::from(op & 7)];
                if op & 8 != 0 {
                    let mut value = input.bytes(len).to_vec();
                    value.resize(len, 0);
                    t.write(offset, &value);
                } else {
                    let mut buf = vec![0xa5u8; len];
                    t.read(offset, &mut buf);
                    if offset < CONFIG_SPACE_OFFSET && !(len == 4 && offset % 4 == 0) {
                        assert!(buf.iter().all(|&b| b == 0), "bad-width register read");
                    }
                    if offset >= CONFIG_SPACE_OFFSET && !matches!(len, 1 | 2 | 4 | 8) {
                        assert!(buf.iter().all(|&b| b == 0), "bad-width config read");
                    }
                }
            }
            3 => bring_up(&mut t, &mut input, offered),
            4 => {
                let at = u64::from(input.u16());
                let n = usize::from(input.u8());
                let _ = mem.write_slice(input.bytes(n), GuestAddress(at));
            }
            5 => write32(&mut t, 0x50, u32::from(input.u8() % 3)),
            6 => {
                write32(&mut t, STATUS, 0);
                check_reset(&mut t);
            }
            _ => {
                let offset = u64::from(input.u8() % 0x48);
                let len = [1usize, 2, 4, 8, 3, 0, 16, 8][usize::from(input.u8() & 7)];
                let mut buf = vec![0xa5u8; len];
                t.read(CONFIG_SPACE_OFFSET + offset, &mut buf);
                let capacity = (DISK_BYTES / 512).to_le_bytes();
                match (offset, len) {
                    (0, 8) => assert_eq!(buf, capacity, "capacity"),
                    (o, 1 | 2 | 4 | 8) if o + len as u64 > 60 => {
                        assert!(buf.iter().all(|&b| b == 0), "beyond the config space")
                    }
                    _ => {}
                }
            }
        }
        check_status(read32(&mut t, STATUS));
    }
    // A reset stops the worker (this returns) and brings every register back.
    write32(&mut t, STATUS, 0);
    check_reset(&mut t);
}

fn block_features(block: &Block) -> u64 {
    use crate::VirtioDevice;
    (block.avail_features() & !features::VIRTIO_F_RING_PACKED) | features::VIRTIO_F_VERSION_1
}

/// The driver side of §3.1.1 in one step, with features and queue layout from the input.
fn bring_up(t: &mut MmioTransport, input: &mut Input<'_>, offered: u64) {
    let how = input.u8();
    let wanted = input.u64();
    let features = if how & 1 == 0 {
        (wanted & offered) | features::VIRTIO_F_VERSION_1
    } else {
        wanted
    };
    write32(t, STATUS, 0);
    write32(t, STATUS, ACKNOWLEDGE);
    write32(t, STATUS, ACKNOWLEDGE | DRIVER);
    write32(t, 0x14, 0); // DeviceFeaturesSel
    let low = read32(t, 0x10);
    write32(t, 0x14, 1);
    let high = read32(t, 0x10);
    assert_eq!(
        u64::from(low) | (u64::from(high) << 32),
        offered,
        "DeviceFeatures"
    );
    write32(t, 0x24, 0); // DriverFeaturesSel
    write32(t, 0x20, features as u32);
    write32(t, 0x24, 1);
    write32(t, 0x20, (features >> 32) as u32);
    write32(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let acceptable = features & !offered == 0 && features & features::VIRTIO_F_VERSION_1 != 0;
    let status = read32(t, STATUS);
    assert_eq!(
        status & FEATURES_OK != 0,
        acceptable,
        "FEATURES_OK for {features:#x} (offered {offered:#x})"
    );
    let size = 1u32 << (input.u8() % 10);
    write32(t, QUEUE_SEL, u32::from(how >> 4) % 2);
    write32(t, 0x38, size); // QueueNum
    let desc = u32::from(input.u16()) & !15;
    let avail = u32::from(input.u16()) & !1;
    let used = u32::from(input.u16()) & !3;
    for (low_reg, value) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        write32(t, low_reg, value);
        write32(t, low_reg + 4, 0);
    }
    write32(t, QUEUE_READY, 1);
    write32(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    if how & 2 != 0 {
        write32(t, 0x50, 0); // QueueNotify
    }
    write32(t, QUEUE_SEL, 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn virtio_mmio_corpus() {
        replay_corpus(&root(), "virtio_mmio", virtio_mmio);
    }

    #[test]
    fn blk_request_corpus() {
        replay_corpus(&root(), "blk_request", blk_request);
    }

    #[test]
    fn blk_queue_corpus() {
        replay_corpus(&root(), "blk_queue", blk_queue);
    }

    #[test]
    fn net_tx_ctrl_corpus() {
        replay_corpus(&root(), "net_tx_ctrl", net_tx_ctrl);
    }

    #[test]
    fn net_rx_corpus() {
        replay_corpus(&root(), "net_rx", net_rx);
    }

    #[test]
    fn guarded_memory_is_zeroed_between_runs() {
        let m = guarded_memory("self-test", &[(0, 0x2000)]);
        m.write_obj(7u8, GuestAddress(0x1fff)).unwrap();
        let m = guarded_memory("self-test", &[(0, 0x2000)]);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 0);
    }
}

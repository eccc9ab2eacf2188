//! The virtio-blk device (virtio v1.2 §5.2): features, configuration space, activation and
//! reset. Requests are processed by a worker thread started at activation
//! (`event_handler.rs`), never on a vCPU thread.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::Worker;
use super::io::{DiskError, DiskImage, IoEngineKind};
use super::metrics::BlockMetrics;
use super::request::{ID_LEN, SECTOR_SIZE};
use crate::device::{
    features, kill_eventfds, read_config_bytes, start_worker, ActivateContext, ActivateError,
    DeviceState, WorkerKind,
};
use crate::transport::SharedWarnLimiter;
use crate::VirtioDevice;

/// The one request queue's size.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments in one request (the queue size minus header and status).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest data segment.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest DISCARD / WRITE_ZEROES request, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 23;
/// Bytes of data one request may carry.
pub const MAX_REQUEST_DATA: u64 = SEG_MAX as u64 * SIZE_MAX as u64;

/// How a disk is backed, as the user configured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// What GET_ID answers (at most 20 bytes).
    pub id: Option<String>,
    /// What moves the data: io_uring, or plain system calls on the worker.
    pub io_engine: IoEngineKind,
}

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("disk id '{0}' is longer than 20 bytes")]
    IdTooLong(String),
}

/// The worker thread of an activated device.
struct Active {
    kill: EventFd,
    worker: JoinHandle<()>,
}

pub struct Block {
    disk: Arc<DiskImage>,
    io_engine: IoEngineKind,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    id: [u8; ID_LEN],
    metrics: Arc<BlockMetrics>,
    state: DeviceState<Active>,
    /// Bounds the log lines the driver can cause, across resets (each activation's worker
    /// shares it, so a driver that resets in a loop gets no fresh budget).
    log: Arc<SharedWarnLimiter>,
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (§5.2.4).
const CONFIG_LEN: usize = 60;

fn put_u32(config: &mut [u8], offset: usize, v: u32) {
    config[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
}

/// The GET_ID answer for a disk given no `id=`: the image's device and inode numbers in hex
/// (as Firecracker and Cloud Hypervisor derive theirs), so it is stable across boots and
/// differs between images. Truncated to the 20 bytes GET_ID carries.
fn default_id(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut id = format!("{:x}{:x}{:x}", meta.dev(), meta.rdev(), meta.ino());
    id.truncate(ID_LEN);
    id
}

impl Block {
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let disk = DiskImage::open(&cfg.path, cfg.readonly, cfg.direct)?;
        let id_string = match &cfg.id {
            Some(s) if s.len() > ID_LEN => return Err(BlockError::IdTooLong(s.clone())),
            Some(s) => s.clone(),
            None => std::fs::metadata(&cfg.path)
                .map(|m| default_id(&m))
                .unwrap_or_default(),
        };
        let mut id = [0u8; ID_LEN];
        let n = id_string.len().min(ID_LEN);
        id[..n].copy_from_slice(&id_string.as_bytes()[..n]);
        let bit = |b: u32| 1u64 << b;
        let mut avail_features = features::VIRTIO_F_VERSION_1
            | features::VIRTIO_F_EVENT_IDX
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE);
        if cfg.readonly {
            avail_features |= bit(VIRTIO_BLK_F_RO);
        } else {
            avail_features |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&disk.sectors().to_le_bytes()); // capacity
        put_u32(&mut config, 8, SIZE_MAX);
        put_u32(&mut config, 12, SEG_MAX);
        put_u32(&mut config, 20, SECTOR_SIZE as u32); // blk_size
        put_u32(&mut config, 36, MAX_DISCARD_SECTORS); // max_discard_sectors
        put_u32(&mut config, 40, 1); // max_discard_seg
        put_u32(&mut config, 44, 8); // discard_sector_alignment: 4 KiB
        put_u32(&mut config, 48, MAX_DISCARD_SECTORS); // max_write_zeroes_sectors
        put_u32(&mut config, 52, 1); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        Ok(Self {
            disk: Arc::new(disk),
            io_engine: cfg.io_engine,
            avail_features,
            config,
            id,
            metrics: Arc::new(BlockMetrics::default()),
            state: DeviceState::Inactive,
            log: Arc::default(),
        })
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The image behind the device (for a flush the VMM makes on its own).
    pub fn image(&self) -> Arc<DiskImage> {
        self.disk.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in our configuration is driver-writable (no CONFIG_WCE).
        if self.log.allow() {
            tracing::debug!(offset, len = data.len(), "virtio-blk: ignored config write");
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.state.is_activated() {
            return Err(ActivateError::AlreadyActivated);
        }
        let Some((index, queue, queue_evt)) = ctx.queues.into_iter().find(|(i, _, _)| *i == 0)
        else {
            return Err(ActivateError::MissingQueue { index: 0 });
        };
        let (kill, worker_kill) = kill_eventfds("virtio-blk kill")?;
        let (disk, engine, id, metrics, log) = (
            self.disk.clone(),
            self.io_engine,
            self.id,
            self.metrics.clone(),
            self.log.clone(),
        );
        let (mem, interrupt, needs_reset) = (ctx.mem, ctx.interrupt, ctx.needs_reset);
        let handle = start_worker(
            &*ctx.spawner,
            WorkerKind::Block,
            format!("virtio-blk {}", self.disk.path().display()),
            move || {
                Worker::new(
                    mem,
                    index,
                    queue,
                    queue_evt,
                    interrupt,
                    needs_reset,
                    disk,
                    engine,
                    id,
                    metrics,
                    log,
                    worker_kill,
                )
            },
            Worker::run,
        )?;
        self.state = DeviceState::Activated(Active {
            kill,
            worker: handle,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.state.take() {
            // The worker finishes the I/O it started (it writes into guest memory) before
            // it returns, so nothing touches the rings after the reset.
            let _ = active.kill.write(1);
            let _ = active.worker.join();
        }
    }
}

impl Drop for Block {
    /// When the VM goes away: finish the I/O in flight, then put what the guest wrote on
    /// stable storage, as if it had flushed.
    fn drop(&mut self) {
        self.reset();
        if !self.disk.readonly() {
            if let Err(e) = self.disk.sync() {
                tracing::warn!(
                    "disk image {}: final fdatasync failed: {e}",
                    self.disk.path().display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{DeviceNeedsReset, VirtioInterrupt, VirtioInterruptType};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    #[derive(Default)]
    struct CountingIrq(AtomicU32);
    impl VirtioInterrupt for CountingIrq {
        fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    struct Rig {
        mem: GuestMemoryMmap,
        _img: vmm_sys_util::tempfile::TempFile,
        block: Block,
    }

    fn rig(readonly: bool) -> Rig {
        let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let block = Block::new(&BlockConfig {
            path: img.as_path().to_path_buf(),
            readonly,
            direct: false,
            id: Some("unit".into()),
            io_engine: IoEngineKind::Auto,
        })
        .unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        Rig {
            mem,
            _img: img,
            block,
        }
    }

    #[test]
    fn images_without_an_id_get_distinct_stable_ids() {
        let a = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let b = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let id_of = |f: &vmm_sys_util::tempfile::TempFile| {
            f.as_file().set_len(1 << 20).unwrap();
            Block::new(&BlockConfig {
                path: f.as_path().to_path_buf(),
                readonly: true,
                direct: false,
                id: None,
                io_engine: IoEngineKind::Auto,
            })
            .unwrap()
            .id
        };
        let (ida, idb) = (id_of(&a), id_of(&b));
        assert_ne!(ida, idb);
        assert_eq!(ida, id_of(&a));
        assert!(ida[0] != 0 && ida.iter().all(|&c| c == 0 || c.is_ascii_hexdigit()));
    }

    fn activate(r: &mut Rig, vq: &MockSplitQueue<GuestMemoryMmap>) -> EventFd {
        activate_watching(r, vq).0
    }

    fn activate_watching(
        r: &mut Rig,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> (EventFd, DeviceNeedsReset) {
        let q: Queue = vq.create_queue().unwrap();
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(CountingIrq::default());
        let needs_reset = DeviceNeedsReset::new(irq.clone());
        r.block
            .activate(ActivateContext {
                mem: GuestMemoryAtomic::new(r.mem.clone()),
                acked_features: r.block.avail_features(),
                queues: vec![(0, q, evt.try_clone().unwrap())],
                interrupt: irq,
                needs_reset: needs_reset.clone(),
                spawner: Arc::new(crate::DirectSpawner),
            })
            .unwrap();
        (evt, needs_reset)
    }

    /// An avail index far ahead of the device cannot be walked: the device asks for a reset
    /// instead of polling the ring forever, and the reset returns.
    #[test]
    fn an_impossible_avail_index_raises_needs_reset_instead_of_spinning() {
        let mut r = rig(false);
        let m = r.mem.clone();
        let vq = MockSplitQueue::new(&m, 16);
        let (evt, needs_reset) = activate_watching(&mut r, &vq);
        vq.avail().idx().store(17);
        evt.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !needs_reset.is_raised() {
            assert!(Instant::now() < deadline, "DEVICE_NEEDS_RESET never raised");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let block = std::thread::spawn(move || {
            r.block.reset();
            let _ = tx.send(());
            r
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("reset hung on the worker");
        let _ = block.join();
    }

    /// A driver that makes a head available again while the device holds it (the attack that
    /// kept a worker popping forever and grew its memory without bound) breaks the ring: the
    /// device raises DEVICE_NEEDS_RESET, answers the first copy, and resets promptly.
    #[test]
    fn a_head_posted_again_while_held_raises_needs_reset() {
        let mut r = rig(false);
        let m = r.mem.clone();
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_GET_ID, 0);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 16, NEXT, 1),
                desc(0x10_1000, 20, NEXT | WRITE, 2),
                desc(0x10_2000, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        // The same head twice more on the available ring before the device has used it.
        for slot in 1..3 {
            vq.avail().ring().ref_at(slot).unwrap().store(0);
        }
        vq.avail().idx().store(3);
        let (_evt, needs_reset) = activate_watching(&mut r, &vq);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !needs_reset.is_raised() {
            assert!(Instant::now() < deadline, "DEVICE_NEEDS_RESET never raised");
            std::thread::sleep(Duration::from_millis(1));
        }
        wait_used(&vq, 1);
        r.block.reset();
        assert_eq!(vq.used().idx().load(), 1, "only the first copy is answered");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_2000)).unwrap(), 0);
    }

    /// The synchronous engine serves the same requests as io_uring.
    #[test]
    fn the_sync_engine_serves_requests() {
        let img = vmm_sys_util::tempfile::TempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let mut r = Rig {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap(),
            block: Block::new(&BlockConfig {
                path: img.as_path().to_path_buf(),
                readonly: false,
                direct: false,
                id: None,
                io_engine: IoEngineKind::Sync,
            })
            .unwrap(),
            _img: img,
        };
        let m = r.mem.clone();
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 4);
        m.write_slice(&[0x5a; 1024], GuestAddress(0x10_1000))
            .unwrap();
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 16, NEXT, 1),
                desc(0x10_1000, 1024, NEXT, 2),
                desc(0x10_2000, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let _evt = activate(&mut r, &vq);
        wait_used(&vq, 1);
        r.block.reset();
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_2000)).unwrap(), 0);
        let mut back = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(r._img.as_file(), &mut back, 2048).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
    }

    /// Waits until the used ring's index reaches `n`.
    fn wait_used(vq: &MockSplitQueue<GuestMemoryMmap>, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while vq.used().idx().load() < n {
            assert!(
                Instant::now() < deadline,
                "used ring stuck at {}",
                vq.used().idx().load()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn used_len(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> u32 {
        vq.used().ring().ref_at(i).unwrap().load().len()
    }

    #[test]
    fn write_read_get_id_and_a_malformed_chain_through_the_worker() {
        let mut r = rig(false);
        let m = r.mem.clone();
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 2);
        m.write_slice(&[0xab; 512], GuestAddress(0x10_1000))
            .unwrap();
        header(&m, 0x10_3000, VIRTIO_BLK_T_IN, 2);
        header(&m, 0x10_6000, VIRTIO_BLK_T_GET_ID, 0);
        for status in [0x10_2000, 0x10_5000, 0x10_8000] {
            m.write_obj(0xffu8, GuestAddress(status)).unwrap();
        }
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 16, NEXT, 1),
                desc(0x10_1000, 512, NEXT, 2),
                desc(0x10_2000, 1, WRITE, 0),
                desc(0x10_6000, 16, NEXT, 4),
                desc(0x10_7000, 20, NEXT | WRITE, 5),
                desc(0x10_8000, 1, WRITE, 0),
                // No status descriptor at all.
                desc(0x10_9000, 16, 0, 0),
            ],
            0,
        )
        .unwrap();
        let evt = activate(&mut r, &vq);
        wait_used(&vq, 3);
        // Requests in flight together are unordered (§5.2.6): read back after the write
        // completed, as a driver must.
        vq.add_desc_chains(
            &[
                desc(0x10_3000, 16, NEXT, 8),
                desc(0x10_4000, 512, NEXT | WRITE, 9),
                desc(0x10_5000, 1, WRITE, 0),
            ],
            7,
        )
        .unwrap();
        evt.write(1).unwrap();
        wait_used(&vq, 4);
        r.block.reset();
        let status = |a: u64| m.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(status(0x10_2000), 0, "write status");
        assert_eq!(status(0x10_5000), 0, "read status");
        assert_eq!(status(0x10_8000), 0, "get-id status");
        let mut back = [0u8; 512];
        m.read_slice(&mut back, GuestAddress(0x10_4000)).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
        let mut id = [0u8; 4];
        m.read_slice(&mut id, GuestAddress(0x10_7000)).unwrap();
        assert_eq!(&id, b"unit");
        // Used lengths: nothing; status only; the 20-byte id + status; data + status.
        let mut lens: Vec<u32> = (0..4).map(|i| used_len(&vq, i)).collect();
        lens.sort_unstable();
        assert_eq!(lens, vec![0, 1, 21, 513]);
        let metrics = r.block.metrics();
        assert_eq!(BlockMetrics::get(&metrics.dropped), 1);
        assert_eq!(BlockMetrics::get(&metrics.write_bytes), 512);
    }

    #[test]
    fn reads_past_the_end_and_writes_to_a_read_only_disk_get_ioerr() {
        let mut r = rig(true);
        let m = r.mem.clone();
        let vq = MockSplitQueue::new(&m, 16);
        header(&m, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
        header(&m, 0x10_3000, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        vq.add_desc_chains(
            &[
                desc(0x10_0000, 16, NEXT, 1),
                desc(0x10_1000, 512, NEXT, 2),
                desc(0x10_2000, 1, WRITE, 0),
                desc(0x10_3000, 16, NEXT, 4),
                desc(0x10_4000, 512, NEXT | WRITE, 5),
                desc(0x10_5000, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let _evt = activate(&mut r, &vq);
        wait_used(&vq, 2);
        r.block.reset();
        for status in [0x10_2000u64, 0x10_5000] {
            assert_eq!(m.read_obj::<u8>(GuestAddress(status)).unwrap(), 1);
        }
    }

    #[test]
    fn reset_in_the_middle_of_io_drains_it_and_the_device_activates_again() {
        let mut r = rig(false);
        let m = r.mem.clone();
        let vq = MockSplitQueue::new(&m, 64);
        let mut descs = Vec::new();
        for i in 0..20u16 {
            let base = 0x10_0000 + u64::from(i) * 0x4000;
            header(&m, base, VIRTIO_BLK_T_OUT, u64::from(i) * 8);
            descs.push(desc(base, 16, NEXT, i * 3 + 1));
            descs.push(desc(base + 0x1000, 4096, NEXT, i * 3 + 2));
            descs.push(desc(base + 0x3000, 1, WRITE, 0));
        }
        vq.add_desc_chains(&descs, 0).unwrap();
        let evt = activate(&mut r, &vq);
        evt.write(1).unwrap();
        // Reset at once: whatever was started completes before reset returns.
        r.block.reset();
        let done = vq.used().idx().load();
        assert!(done <= 20);
        // Activating again works (a fresh queue after the driver's re-initialisation).
        let vq2 = MockSplitQueue::create(&m, GuestAddress(0x80_0000), 16);
        header(&m, 0x90_0000, VIRTIO_BLK_T_IN, 0);
        vq2.add_desc_chains(
            &[
                desc(0x90_0000, 16, NEXT, 1),
                desc(0x90_1000, 512, NEXT | WRITE, 2),
                desc(0x90_2000, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        let _evt2 = activate(&mut r, &vq2);
        wait_used(&vq2, 1);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x90_2000)).unwrap(), 0);
    }
}

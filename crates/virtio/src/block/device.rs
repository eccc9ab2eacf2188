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
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::event_handler::Worker;
use super::io::{DiskError, DiskImage};
use super::metrics::BlockMetrics;
use super::request::{ID_LEN, SECTOR_SIZE};
use crate::device::{features, read_config_bytes, ActivateContext, ActivateError, DeviceState};
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
    direct: bool,
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    id: [u8; ID_LEN],
    metrics: Arc<BlockMetrics>,
    state: DeviceState<Active>,
}

/// `struct virtio_blk_config` up to `write_zeroes_may_unmap` (§5.2.4).
const CONFIG_LEN: usize = 60;

fn put_u32(config: &mut [u8], offset: usize, v: u32) {
    config[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
}

impl Block {
    pub fn new(cfg: &BlockConfig) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_LEN];
        if let Some(s) = &cfg.id {
            if s.len() > ID_LEN {
                return Err(BlockError::IdTooLong(s.clone()));
            }
            id[..s.len()].copy_from_slice(s.as_bytes());
        }
        let disk = DiskImage::open(&cfg.path, cfg.readonly, cfg.direct)?;
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
            direct: cfg.direct,
            avail_features,
            config,
            id,
            metrics: Arc::new(BlockMetrics::default()),
            state: DeviceState::Inactive,
        })
    }

    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
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
        tracing::debug!(offset, len = data.len(), "virtio-blk: ignored config write");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.state.is_activated() {
            return Err(ActivateError::AlreadyActivated);
        }
        let Some((index, queue, queue_evt)) = ctx.queues.into_iter().find(|(i, _, _)| *i == 0)
        else {
            return Err(ActivateError::MissingQueue { index: 0 });
        };
        let kill = EventFd::new(EFD_NONBLOCK).map_err(|source| ActivateError::EventFd {
            purpose: "virtio-blk kill",
            source,
        })?;
        let worker_kill = kill.try_clone().map_err(|source| ActivateError::EventFd {
            purpose: "virtio-blk kill",
            source,
        })?;
        let worker = Worker::new(
            ctx.mem,
            index,
            queue,
            queue_evt,
            ctx.interrupt,
            ctx.acked_features,
            self.disk.clone(),
            self.direct,
            self.id,
            self.metrics.clone(),
            worker_kill,
        )
        .map_err(|e| ActivateError::Backend {
            reason: e.to_string(),
        })?;
        let name = format!("virtio-blk {}", self.disk.path().display());
        let handle = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || worker.run())
            .map_err(|source| ActivateError::Worker { name, source })?;
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
    fn drop(&mut self) {
        self.reset();
    }
}

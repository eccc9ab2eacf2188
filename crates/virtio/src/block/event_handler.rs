//! The virtio-blk worker: one thread per activated device, waiting in epoll on the queue's
//! notification eventfd (a KVM ioeventfd), the io_uring's completion eventfd and a kill
//! eventfd. It pops every available chain, parses it (`request.rs`), merges adjacent reads
//! and writes into one backend operation, keeps them all in flight, and completes them into
//! the used ring in batches with one interrupt per batch (none when EVENT_IDX says the
//! driver does not want it).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::io::{DiskImage, IoEngine, IoEngineKind, IoOp};
use super::metrics::BlockMetrics;
use super::request::{
    parse, Parsed, Request, RequestType, Segment, DISCARD_SEGMENT_LEN, ID_LEN, SECTOR_SIZE,
};
use crate::device::{
    avail_ring_is_sane, DeviceNeedsReset, HeldHeads, VirtioInterrupt, VirtioInterruptType,
};
use crate::transport::SharedWarnLimiter;

use super::device::MAX_REQUEST_DATA;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_COMPLETION: u64 = 1;
const TOKEN_KILL: u64 = 2;
/// Ring entries: enough for a full queue of requests.
const RING_ENTRIES: u32 = 256;
/// Most iovecs one merged read or write may carry (the kernel's UIO_MAXIOV).
const MAX_IOVECS: usize = 1024;
/// Most bytes one merged read or write may move (the kernel moves at most ~2 GiB per call).
const MAX_MERGED_BYTES: u64 = 1 << 30;
/// Chains taken from the available ring before the worker returns to its epoll.
const PASS_LIMIT: usize = super::device::QUEUE_SIZE as usize;

/// Errors setting up a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("epoll: {0}")]
    Epoll(std::io::Error),
    #[error(transparent)]
    Disk(#[from] super::io::DiskError),
}

/// A request waiting for its backend operation.
struct Pending {
    head: u16,
    status: GuestAddress,
    /// Bytes this request moves (its share of a merged operation).
    len: u64,
    /// What the used ring reports as written into device-writable buffers on success.
    used_len_ok: u32,
}

pub(super) struct Worker {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    queue_index: u16,
    queue: Queue,
    /// Registered (edge-triggered) in `epoll`; also written by us to come back later.
    queue_evt: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    disk: Arc<DiskImage>,
    engine: IoEngine,
    kill: EventFd,
    epoll: Epoll,
    pending: HashMap<u64, Vec<Pending>>,
    next_token: u64,
    id: [u8; ID_LEN],
    metrics: Arc<BlockMetrics>,
    /// Used entries added since the last interrupt decision.
    used_since_signal: bool,
    /// Keeps a hostile guest from flooding the host log.
    warn_limiter: Arc<SharedWarnLimiter>,
    needs_reset: DeviceNeedsReset,
    /// The driver broke the available ring; nothing more is taken from it until a reset.
    broken: bool,
    /// Heads taken from the available ring and not yet put in the used ring: at most the
    /// queue size, whatever the driver does.
    held: HeldHeads,
}

/// How one request is answered right away, without the backend.
enum Immediate {
    Status {
        head: u16,
        status: GuestAddress,
        value: u32,
        used_len: u32,
    },
    /// No status byte can be written: return the chain with nothing written.
    Drop { head: u16 },
}

impl Worker {
    /// Logs a guest-caused problem, a few per window at most.
    fn warn(&self, msg: &str) {
        if self.warn_limiter.allow() {
            tracing::warn!("{msg}");
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        queue_index: u16,
        queue: Queue,
        queue_evt: EventFd,
        interrupt: Arc<dyn VirtioInterrupt>,
        needs_reset: DeviceNeedsReset,
        disk: Arc<DiskImage>,
        io_engine: IoEngineKind,
        id: [u8; ID_LEN],
        metrics: Arc<BlockMetrics>,
        log: Arc<SharedWarnLimiter>,
        kill: EventFd,
    ) -> Result<Self, WorkerError> {
        let engine = IoEngine::new(RING_ENTRIES, disk.path(), io_engine)?;
        let queue_size = queue.size();
        let epoll = Epoll::new().map_err(WorkerError::Epoll)?;
        // The queue and completion eventfds are edge-triggered and never read: every write
        // (a guest notification through the ioeventfd, an io_uring completion) wakes us once,
        // and each wake-up drains the whole available ring or completion queue, so reading
        // the counters back would only cost two system calls per request.
        for (fd, token, events) in [
            (
                queue_evt.as_raw_fd(),
                TOKEN_QUEUE,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (
                engine.completion_fd(),
                TOKEN_COMPLETION,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (kill.as_raw_fd(), TOKEN_KILL, EventSet::IN),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(WorkerError::Epoll)?;
        }
        Ok(Self {
            mem,
            queue_index,
            queue,
            queue_evt,
            interrupt,
            disk,
            engine,
            kill,
            epoll,
            pending: HashMap::new(),
            next_token: 0,
            id,
            metrics,
            used_since_signal: false,
            warn_limiter: log,
            needs_reset,
            broken: false,
            held: HeldHeads::new(queue_size),
        })
    }

    /// Runs until killed; then finishes the I/O in flight and returns.
    pub(super) fn run(mut self) {
        // Buffers may already be waiting (the driver can notify before DRIVER_OK lands).
        self.process_queue();
        let mut events = vec![EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!("virtio-blk: epoll failed, stopping the device: {e}");
                    break;
                }
            };
            let mut killed = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_QUEUE => {
                        BlockMetrics::add(&self.metrics.notifications, 1);
                        self.process_queue();
                    }
                    TOKEN_COMPLETION => {
                        self.complete_io();
                        self.process_queue();
                    }
                    TOKEN_KILL => {
                        let _ = self.kill.read();
                        killed = true;
                    }
                    _ => {}
                }
            }
            self.signal_used();
            if killed {
                break;
            }
        }
        self.drain();
    }

    /// Waits for every operation in flight and completes it.
    fn drain(&mut self) {
        while self.engine.in_flight() > 0 {
            if self.engine.wait().is_err() {
                break;
            }
            self.complete_io();
        }
        self.signal_used();
    }

    /// Takes every available chain, answers or submits it, and decides whether the driver
    /// must notify again: while I/O is in flight its completion brings us back here anyway,
    /// so notifications stay off (§2.7.10) and new requests are picked up then, in batches,
    /// without a QueueNotify exit per request; only when nothing is in flight are they
    /// re-enabled (and the ring checked once more for what raced with that).
    fn process_queue(&mut self) {
        let mut taken = 0usize;
        loop {
            if self.broken {
                return;
            }
            let mem = self.mem.memory();
            if !avail_ring_is_sane(&mut self.queue, &*mem) {
                drop(mem);
                self.ring_broken();
                return;
            }
            let _ = self.queue.disable_notification(&*mem);
            let mut immediate = Vec::new();
            let mut io = Vec::new();
            // At most a queue's worth per pass: a driver that keeps the ring just ahead of
            // us cannot keep the worker from its other events.
            while taken < PASS_LIMIT {
                let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                BlockMetrics::add(&self.metrics.requests, 1);
                taken += 1;
                if !self.held.insert(chain.head_index()) {
                    // The driver made a buffer available that we still own (§2.7.13): its
                    // request may be in flight, so the chain cannot be answered either.
                    self.broken = true;
                    break;
                }
                match parse(chain, &*mem, MAX_REQUEST_DATA) {
                    Parsed::Request(r) => self.classify(&*mem, r, &mut immediate, &mut io),
                    Parsed::Invalid {
                        head,
                        status,
                        error,
                    } => {
                        self.warn(&format!("virtio-blk: malformed request: {error}"));
                        match status {
                            Some(status) => immediate.push(Immediate::Status {
                                head,
                                status,
                                value: VIRTIO_BLK_S_IOERR,
                                used_len: 1,
                            }),
                            None => immediate.push(Immediate::Drop { head }),
                        }
                    }
                }
            }
            drop(mem);
            for i in immediate {
                self.finish(i);
            }
            self.submit_io(io);
            if self.broken {
                self.held_head_reused();
                return;
            }
            if self.engine.in_flight() > 0 {
                break;
            }
            if taken >= PASS_LIMIT {
                // A full queue's worth this round: look at other events (a reset) first and
                // come back through our own eventfd, with notifications still off.
                let _ = self.queue_evt.write(1);
                break;
            }
            let mem = self.mem.memory();
            match self.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    /// The driver re-posted a head the device holds: stop taking from the ring (what is in
    /// flight still completes) and tell the driver (§2.1.2).
    fn held_head_reused(&mut self) {
        self.warn(
            "virtio-blk: the driver made a buffer available that the device still holds; device needs reset",
        );
        if let Err(e) = self.needs_reset.raise() {
            tracing::error!("virtio-blk: cannot signal the guest: {e}");
        }
    }

    /// Puts a finished chain in the used ring and returns its head to the driver.
    fn put_used<M: GuestMemory>(&mut self, mem: &M, head: u16, len: u32) {
        self.held.remove(head);
        if self.queue.add_used(mem, head, len).is_ok() {
            self.used_since_signal = true;
        }
    }

    /// The available ring cannot be walked: stop using it and tell the driver (§2.1.2).
    fn ring_broken(&mut self) {
        self.broken = true;
        self.warn("virtio-blk: the driver's available ring index is invalid; device needs reset");
        if let Err(e) = self.needs_reset.raise() {
            tracing::error!("virtio-blk: cannot signal the guest: {e}");
        }
    }

    /// Checks a parsed request against the disk and either answers it now or queues it
    /// for the backend.
    fn classify<M: GuestMemory>(
        &mut self,
        mem: &M,
        r: Request,
        immediate: &mut Vec<Immediate>,
        io: &mut Vec<Request>,
    ) {
        let answer = |value: u32, used_len: u32| Immediate::Status {
            head: r.head,
            status: r.status,
            value,
            used_len,
        };
        let capacity = self.disk.sectors();
        let writes = matches!(
            r.kind,
            RequestType::Out | RequestType::Discard | RequestType::WriteZeroes
        );
        if writes && self.disk.readonly() {
            BlockMetrics::add(&self.metrics.io_errors, 1);
            immediate.push(answer(VIRTIO_BLK_S_IOERR, 1));
            return;
        }
        match r.kind {
            RequestType::In | RequestType::Out => {
                let end = r
                    .sector
                    .checked_add(r.data_len / SECTOR_SIZE)
                    .filter(|&e| e <= capacity);
                if end.is_none() {
                    self.warn("virtio-blk: request past the end of the disk");
                    BlockMetrics::add(&self.metrics.io_errors, 1);
                    immediate.push(answer(VIRTIO_BLK_S_IOERR, 1));
                } else {
                    io.push(r);
                }
            }
            RequestType::Flush | RequestType::Discard | RequestType::WriteZeroes => io.push(r),
            RequestType::GetId => {
                let mut written = 0u32;
                let mut src = &self.id[..];
                for seg in &r.data {
                    if src.is_empty() {
                        break;
                    }
                    let n = (seg.len as usize).min(src.len());
                    if mem.write_slice(&src[..n], seg.addr).is_err() {
                        break;
                    }
                    written += n as u32;
                    src = &src[n..];
                }
                immediate.push(answer(VIRTIO_BLK_S_OK, written + 1));
            }
            RequestType::Unsupported(t) => {
                self.warn(&format!("virtio-blk: unsupported request type {t}"));
                BlockMetrics::add(&self.metrics.unsupported, 1);
                immediate.push(answer(VIRTIO_BLK_S_UNSUPP, 1));
            }
        }
    }

    fn finish(&mut self, i: Immediate) {
        let mem = self.mem.memory();
        let (head, used_len) = match i {
            Immediate::Status {
                head,
                status,
                value,
                used_len,
            } => {
                let _ = mem.write_obj(value as u8, status);
                (head, used_len)
            }
            Immediate::Drop { head } => {
                BlockMetrics::add(&self.metrics.dropped, 1);
                (head, 0)
            }
        };
        self.put_used(&*mem, head, used_len);
    }

    /// Host iovecs for guest segments; None if a segment cannot be mapped in one piece.
    fn iovecs<M: GuestMemoryBackend>(mem: &M, segs: &[Segment]) -> Option<Vec<libc::iovec>> {
        segs.iter()
            .map(|s| {
                let slice = mem.get_slice(s.addr, s.len as usize).ok()?;
                Some(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: s.len as usize,
                })
            })
            .collect()
    }

    fn token(&mut self) -> u64 {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token
    }

    /// Sorts the batch, merges runs of adjacent reads or writes (as QEMU does), and pushes
    /// every operation to the ring.
    fn submit_io(&mut self, mut batch: Vec<Request>) {
        if batch.is_empty() {
            return;
        }
        let mem = self.mem.memory();
        // Stable: FLUSH keeps its place after the writes before it (IO_DRAIN orders it).
        let order = |r: &Request| match r.kind {
            RequestType::In => (0, r.sector),
            RequestType::Out => (1, r.sector),
            _ => (2, 0),
        };
        batch.sort_by_key(order);
        let mut answers = Vec::new();
        let mut i = 0;
        while i < batch.len() {
            let r = &batch[i];
            match r.kind {
                RequestType::In | RequestType::Out => {
                    // Extend the run while the next request starts where this one ends.
                    let mut j = i + 1;
                    let mut end = r.sector + r.data_len / SECTOR_SIZE;
                    let mut nseg = r.data.len();
                    let mut bytes = r.data_len;
                    while j < batch.len()
                        && batch[j].kind == r.kind
                        && batch[j].sector == end
                        && nseg + batch[j].data.len() <= MAX_IOVECS
                        && bytes + batch[j].data_len <= MAX_MERGED_BYTES
                    {
                        end += batch[j].data_len / SECTOR_SIZE;
                        nseg += batch[j].data.len();
                        bytes += batch[j].data_len;
                        j += 1;
                    }
                    let run = &batch[i..j];
                    let segs: Vec<Segment> = run.iter().flat_map(|r| r.data.clone()).collect();
                    match Self::iovecs(&*mem, &segs) {
                        Some(iovecs) => {
                            BlockMetrics::add(&self.metrics.merged, (run.len() - 1) as u64);
                            let offset = r.sector * SECTOR_SIZE;
                            let aligned = iovecs.iter().all(|v| {
                                (v.iov_base as usize | v.iov_len) % SECTOR_SIZE as usize == 0
                            });
                            let fd = match (self.disk.buffered_fd(), aligned) {
                                (Some(fd), false) => {
                                    BlockMetrics::add(&self.metrics.unaligned, 1);
                                    fd
                                }
                                _ => self.disk.fd(),
                            };
                            let op = if r.kind == RequestType::In {
                                IoOp::Read { offset, iovecs }
                            } else {
                                IoOp::Write { offset, iovecs }
                            };
                            let waiting = run
                                .iter()
                                .map(|q| Pending {
                                    head: q.head,
                                    status: q.status,
                                    len: q.data_len,
                                    used_len_ok: if q.kind == RequestType::In {
                                        q.data_len as u32 + 1
                                    } else {
                                        1
                                    },
                                })
                                .collect();
                            self.push(fd, op, waiting);
                        }
                        None => {
                            for q in run {
                                answers.push((q.head, q.status));
                            }
                        }
                    }
                    i = j;
                }
                RequestType::Flush => {
                    BlockMetrics::add(&self.metrics.flushes, 1);
                    let fd = self.disk.fd();
                    self.push(fd, IoOp::Flush, vec![pending_no_data(r)]);
                    i += 1;
                }
                RequestType::Discard | RequestType::WriteZeroes => {
                    match self.zeroing_op(&*mem, r) {
                        Ok(op) => {
                            let fd = self.disk.fd();
                            self.push(fd, op, vec![pending_no_data(r)]);
                        }
                        Err(value) => {
                            if value == VIRTIO_BLK_S_UNSUPP {
                                BlockMetrics::add(&self.metrics.unsupported, 1);
                            } else {
                                BlockMetrics::add(&self.metrics.io_errors, 1);
                            }
                            let _ = mem.write_obj(value as u8, r.status);
                            self.put_used(&*mem, r.head, 1);
                        }
                    }
                    i += 1;
                }
                _ => i += 1,
            }
        }
        for (head, status) in answers {
            BlockMetrics::add(&self.metrics.io_errors, 1);
            let _ = mem.write_obj(VIRTIO_BLK_S_IOERR as u8, status);
            self.put_used(&*mem, head, 1);
        }
        drop(mem);
        if let Err(e) = self.engine.submit() {
            tracing::error!("virtio-blk: io_uring submit failed: {e}");
        }
        BlockMetrics::raise_max(
            &self.metrics.max_in_flight,
            self.engine.max_in_flight() as u64,
        );
    }

    /// Reads the one `virtio_blk_discard_write_zeroes` segment (§5.2.6.2) and turns it into
    /// a backend operation, or the status to answer with.
    fn zeroing_op<M: GuestMemory>(&self, mem: &M, r: &Request) -> Result<IoOp, u32> {
        if r.data_len != DISCARD_SEGMENT_LEN {
            // max_discard_seg and max_write_zeroes_seg are 1.
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        let mut raw = [0u8; DISCARD_SEGMENT_LEN as usize];
        let mut got = 0;
        for seg in &r.data {
            let n = (seg.len as usize).min(raw.len() - got);
            mem.read_slice(&mut raw[got..got + n], seg.addr)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            got += n;
        }
        let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or([0; 8]));
        let num = u32::from_le_bytes(raw[8..12].try_into().unwrap_or([0; 4]));
        let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or([0; 4]));
        let end = sector.checked_add(u64::from(num));
        if num == 0
            || num > super::device::MAX_DISCARD_SECTORS
            || end.is_none_or(|e| e > self.disk.sectors())
        {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let (offset, len) = (sector * SECTOR_SIZE, u64::from(num) * SECTOR_SIZE);
        match r.kind {
            // §5.2.6.2: for DISCARD the unmap flag is reserved.
            RequestType::Discard if flags != 0 => Err(VIRTIO_BLK_S_UNSUPP),
            RequestType::Discard => {
                BlockMetrics::add(&self.metrics.discards, 1);
                Ok(IoOp::Discard { offset, len })
            }
            _ if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 => Err(VIRTIO_BLK_S_UNSUPP),
            _ => {
                BlockMetrics::add(&self.metrics.write_zeroes, 1);
                Ok(IoOp::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                })
            }
        }
    }

    fn push(&mut self, fd: RawFd, op: IoOp, waiting: Vec<Pending>) {
        let token = self.token();
        self.pending.insert(token, waiting);
        self.engine.push(fd, token, op);
    }

    /// Completes finished backend operations into the used ring.
    fn complete_io(&mut self) {
        let mut done = Vec::new();
        self.engine.reap(&mut done);
        if done.is_empty() {
            if let Err(e) = self.engine.submit() {
                tracing::error!("virtio-blk: io_uring submit failed: {e}");
            }
            return;
        }
        let mem = self.mem.memory();
        for (token, op, result) in done {
            let Some(waiting) = self.pending.remove(&token) else {
                continue;
            };
            let expected: u64 = match op {
                IoOp::Read { .. } | IoOp::Write { .. } => waiting.iter().map(|p| p.len).sum(),
                _ => 0,
            };
            let ok = result >= 0 && result as u64 == expected;
            if !ok {
                self.warn(&format!(
                    "virtio-blk: backend I/O on {} failed: {}",
                    self.disk.path().display(),
                    if result < 0 {
                        std::io::Error::from_raw_os_error(-result).to_string()
                    } else {
                        format!("short transfer of {result} of {expected} bytes")
                    }
                ));
                BlockMetrics::add(&self.metrics.io_errors, waiting.len() as u64);
            } else {
                match op {
                    IoOp::Read { .. } => BlockMetrics::add(&self.metrics.read_bytes, expected),
                    IoOp::Write { .. } => BlockMetrics::add(&self.metrics.write_bytes, expected),
                    _ => {}
                }
            }
            for p in waiting {
                let (value, used) = if ok {
                    (VIRTIO_BLK_S_OK, p.used_len_ok)
                } else {
                    (VIRTIO_BLK_S_IOERR, 1)
                };
                let _ = mem.write_obj(value as u8, p.status);
                self.put_used(&*mem, p.head, used);
            }
        }
        drop(mem);
        // Operations that waited for ring space went in during reap.
        if let Err(e) = self.engine.submit() {
            tracing::error!("virtio-blk: io_uring submit failed: {e}");
        }
    }

    /// One used-buffer notification for everything completed since the last one, unless
    /// EVENT_IDX says the driver does not want it (§2.7.10).
    fn signal_used(&mut self) {
        if !self.used_since_signal {
            return;
        }
        self.used_since_signal = false;
        let mem = self.mem.memory();
        if self.queue.needs_notification(&*mem).unwrap_or(true) {
            BlockMetrics::add(&self.metrics.interrupts, 1);
            if let Err(e) = self
                .interrupt
                .trigger(VirtioInterruptType::Queue(self.queue_index))
            {
                tracing::error!("virtio-blk: cannot signal the guest: {e}");
            }
        }
    }
}

fn pending_no_data(r: &Request) -> Pending {
    Pending {
        head: r.head,
        status: r.status,
        len: 0,
        used_len_ok: 1,
    }
}

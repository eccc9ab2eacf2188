//! The virtio-net worker: one thread per activated device, in epoll over the transmit,
//! receive and control queue notifications, the tap and a kill eventfd.
//!
//! Transmit: each chain (header + frame, device-readable) is checked and written to the tap
//! with one writev. Receive: a frame read from the tap is filtered (MAC, promiscuous,
//! multicast) and copied into the guest's buffers — several of them with MRG_RXBUF, its
//! `num_buffers` telling the driver how many (§5.1.6.4). When the guest has posted no
//! buffers the frame waits and the tap is not read again until the guest adds some: no busy
//! loop, and no frame dropped by vireo.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::NetMetrics;
use super::tap::{Tap, VNET_HDR_LEN};
use crate::device::{
    avail_ring_is_sane, ActivateContext, ActivateError, DeviceNeedsReset, HeldHeads,
    VirtioInterrupt, VirtioInterruptType,
};
use crate::transport::SharedWarnLimiter;

const RX: u16 = 0;
const TX: u16 = 1;
const CTRL: u16 = 2;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_CTRL: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_KILL: u64 = 4;
/// The largest frame the tap hands us: a 64 KiB GSO frame plus the header.
const MAX_FRAME: usize = 65_562;
/// The largest frame a guest may send: 64 KiB of payload, the Ethernet header and ours.
const MAX_TX: u64 = 65_550 + VNET_HDR_LEN as u64;
/// Most descriptors followed in one transmit or control chain (an indirect table could
/// hold 65535).
const MAX_CHAIN_DESCS: usize = 256;
/// Transmit chains taken before the worker looks at its other events.
const TX_BATCH: u16 = 256;
/// Control commands taken before the worker looks at its other events.
const CTRL_BATCH: u16 = 64;
/// Frames delivered, and receive chains taken for one frame, before the worker looks at
/// its other events.
const RX_BATCH: usize = 256;
/// Longest control command we read.
const MAX_CTRL: u64 = 4096;

struct QueueIo {
    index: u16,
    queue: Queue,
    /// Registered (edge-triggered) in epoll; also written by us to come back later.
    evt: EventFd,
    used_since_signal: bool,
}

/// What the control queue set (§5.1.6.5).
struct RxFilter {
    mac: [u8; 6],
    promisc: bool,
    allmulti: bool,
    unicast: Vec<[u8; 6]>,
    multicast: Vec<[u8; 6]>,
}

impl RxFilter {
    fn accepts(&self, dst: &[u8]) -> bool {
        if self.promisc || dst.len() < 6 {
            return true;
        }
        let dst: [u8; 6] = [dst[0], dst[1], dst[2], dst[3], dst[4], dst[5]];
        if dst == [0xff; 6] || dst == self.mac {
            return true;
        }
        if dst[0] & 1 == 1 {
            self.allmulti || self.multicast.contains(&dst)
        } else {
            self.unicast.contains(&dst)
        }
    }
}

pub(super) struct Worker {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    rx: QueueIo,
    tx: QueueIo,
    ctrl: Option<QueueIo>,
    mrg_rxbuf: bool,
    interrupt: Arc<dyn VirtioInterrupt>,
    tap: Tap,
    kill: EventFd,
    epoll: Epoll,
    filter: RxFilter,
    /// A frame read from the tap that still waits for receive buffers.
    pending: Option<usize>,
    /// Receive chains taken for a frame that did not fit in them alone.
    rx_reserved: std::collections::VecDeque<RxChain>,
    /// Heads of the reserved chains: a driver that posts one again breaks the ring.
    rx_held: HeldHeads,
    /// Whether epoll watches the tap; not while the guest has no receive buffers, so a
    /// flood then costs no wake-ups at all.
    tap_armed: bool,
    frame: Vec<u8>,
    metrics: Arc<NetMetrics>,
    /// Keeps a hostile guest from flooding the host log.
    warn_limiter: Arc<SharedWarnLimiter>,
    needs_reset: DeviceNeedsReset,
    /// The driver broke an available ring; no queue is used again until a reset.
    broken: bool,
}

type NewResult = Result<Worker, (Tap, ActivateError)>;

impl Worker {
    /// Logs a guest-caused problem, a few per window at most.
    fn warn(&self, msg: &str) {
        if self.warn_limiter.allow() {
            tracing::warn!("{msg}");
        }
    }

    pub(super) fn new(
        ctx: ActivateContext,
        tap: Tap,
        mac: [u8; 6],
        metrics: Arc<NetMetrics>,
        log: Arc<SharedWarnLimiter>,
        kill: EventFd,
    ) -> NewResult {
        let mrg_rxbuf = ctx.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let want_ctrl = ctx.acked_features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0;
        let mut rx = None;
        let mut tx = None;
        let mut ctrl = None;
        for (index, queue, evt) in ctx.queues {
            let q = QueueIo {
                index,
                queue,
                evt,
                used_since_signal: false,
            };
            match index {
                RX => rx = Some(q),
                TX => tx = Some(q),
                CTRL if want_ctrl => ctrl = Some(q),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            return Err((tap, ActivateError::MissingQueue { index: RX }));
        };
        let rx_size = rx.queue.size();
        if want_ctrl && ctrl.is_none() {
            return Err((tap, ActivateError::MissingQueue { index: CTRL }));
        }
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                return Err((
                    tap,
                    ActivateError::Backend {
                        reason: format!("epoll: {e}"),
                    },
                ))
            }
        };
        let edge = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let mut fds = vec![
            (rx.evt.as_raw_fd(), TOKEN_RX, edge),
            (tx.evt.as_raw_fd(), TOKEN_TX, edge),
            (tap.fd(), TOKEN_TAP, edge),
            (kill.as_raw_fd(), TOKEN_KILL, EventSet::IN),
        ];
        if let Some(c) = &ctrl {
            fds.push((c.evt.as_raw_fd(), TOKEN_CTRL, edge));
        }
        for (fd, token, events) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token)) {
                return Err((
                    tap,
                    ActivateError::Backend {
                        reason: format!("epoll: {e}"),
                    },
                ));
            }
        }
        Ok(Worker {
            mem: ctx.mem,
            rx,
            tx,
            ctrl,
            mrg_rxbuf,
            interrupt: ctx.interrupt,
            tap,
            kill,
            epoll,
            filter: RxFilter {
                mac,
                // On until the driver says otherwise, as QEMU does: a driver without
                // CTRL_RX still sees everything the tap delivers.
                promisc: true,
                allmulti: true,
                unicast: Vec::new(),
                multicast: Vec::new(),
            },
            pending: None,
            rx_reserved: std::collections::VecDeque::new(),
            rx_held: HeldHeads::new(rx_size),
            tap_armed: true,
            frame: vec![0u8; MAX_FRAME],
            metrics,
            warn_limiter: log,
            needs_reset: ctx.needs_reset,
            broken: false,
        })
    }

    /// Runs until killed; returns the tap for the next activation.
    pub(super) fn run(mut self) -> Tap {
        self.process_tx();
        self.process_rx();
        if self.ctrl.is_some() {
            self.process_ctrl();
        }
        self.signal_all();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    tracing::error!("virtio-net: epoll failed, stopping the device: {e}");
                    break;
                }
            };
            let mut killed = false;
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_TX => {
                        NetMetrics::add(&self.metrics.notifications, 1);
                        self.process_tx();
                    }
                    // New receive buffers, or new frames: both mean "deliver what we can".
                    TOKEN_RX => {
                        NetMetrics::add(&self.metrics.notifications, 1);
                        self.arm_tap(true);
                        self.process_rx();
                    }
                    TOKEN_TAP => self.process_rx(),
                    TOKEN_CTRL => self.process_ctrl(),
                    TOKEN_KILL => {
                        let _ = self.kill.read();
                        killed = true;
                    }
                    _ => {}
                }
            }
            self.signal_all();
            if killed {
                break;
            }
        }
        self.tap
    }

    fn signal_all(&mut self) {
        let mem = self.mem.memory();
        let interrupt = self.interrupt.clone();
        let metrics = self.metrics.clone();
        let signal = |q: &mut QueueIo| {
            if !q.used_since_signal {
                return;
            }
            q.used_since_signal = false;
            if q.queue.needs_notification(&*mem).unwrap_or(true) {
                NetMetrics::add(&metrics.interrupts, 1);
                if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(q.index)) {
                    tracing::error!("virtio-net: cannot signal the guest: {e}");
                }
            }
        };
        signal(&mut self.rx);
        signal(&mut self.tx);
        if let Some(c) = &mut self.ctrl {
            signal(c);
        }
    }

    /// Transmits every available chain (§5.1.6.2).
    fn process_tx(&mut self) {
        let mut taken = 0usize;
        loop {
            if self.broken {
                return;
            }
            let mem = self.mem.memory();
            if !avail_ring_is_sane(&mut self.tx.queue, &*mem) {
                drop(mem);
                self.ring_broken("transmit");
                return;
            }
            while taken < usize::from(TX_BATCH) {
                let Some(chain) = self.tx.queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                taken += 1;
                let head = chain.head_index();
                let mut iovecs = Vec::new();
                let mut total = 0u64;
                let mut bad = false;
                let mut truncated = false;
                for d in chain.take(MAX_CHAIN_DESCS) {
                    truncated = d.has_next();
                    total += u64::from(d.len());
                    if d.is_write_only() || total > MAX_TX {
                        bad = true;
                        break;
                    }
                    match mem.get_slice(d.addr(), d.len() as usize) {
                        Ok(s) => iovecs.push(libc::iovec {
                            iov_base: s.ptr_guard_mut().as_ptr().cast(),
                            iov_len: d.len() as usize,
                        }),
                        Err(_) => {
                            bad = true;
                            break;
                        }
                    }
                }
                if bad || truncated || total <= VNET_HDR_LEN as u64 {
                    self.warn("virtio-net: malformed transmit chain dropped");
                    NetMetrics::add(&self.metrics.tx_dropped, 1);
                } else {
                    match self.tap.writev(&iovecs) {
                        Ok(_) => {
                            NetMetrics::add(&self.metrics.tx_frames, 1);
                            NetMetrics::add(&self.metrics.tx_bytes, total - VNET_HDR_LEN as u64);
                        }
                        Err(e) => {
                            self.warn(&format!("virtio-net: tap write failed: {e}"));
                            NetMetrics::add(&self.metrics.tx_dropped, 1);
                        }
                    }
                }
                if self.tx.queue.add_used(&*mem, head, 0).is_ok() {
                    self.tx.used_since_signal = true;
                }
            }
            if taken >= usize::from(TX_BATCH) {
                // Come back through our own eventfd after looking at other events.
                let _ = self.tx.evt.write(1);
                return;
            }
            match self.tx.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
    }

    /// Delivers frames from the tap while the guest has buffers for them.
    fn process_rx(&mut self) {
        for _ in 0..RX_BATCH {
            if self.broken {
                return;
            }
            let sane = {
                let mem = self.mem.memory();
                avail_ring_is_sane(&mut self.rx.queue, &*mem)
            };
            if !sane {
                self.ring_broken("receive");
                return;
            }
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read(&mut self.frame) {
                    Ok(len) => len,
                    // WouldBlock: the tap is drained; an edge will come with the next frame.
                    Err(_) => return,
                },
            };
            if len <= VNET_HDR_LEN {
                continue;
            }
            if !self
                .filter
                .accepts(&self.frame[VNET_HDR_LEN..len.min(VNET_HDR_LEN + 6)])
            {
                NetMetrics::add(&self.metrics.rx_filtered, 1);
                continue;
            }
            match self.deliver(len) {
                Delivery::Done => {
                    NetMetrics::add(&self.metrics.rx_frames, 1);
                    NetMetrics::add(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Delivery::TooBig => {
                    self.warn("virtio-net: frame larger than the receive buffers dropped");
                    NetMetrics::add(&self.metrics.rx_too_big, 1);
                }
                Delivery::Broken => {
                    self.ring_broken("receive");
                    return;
                }
                Delivery::Yield => {
                    // The driver kept the ring busy with chains that hold nothing: look at
                    // the other events first, then come back for this frame.
                    self.pending = Some(len);
                    let _ = self.rx.evt.write(1);
                    return;
                }
                Delivery::NoBuffers => {
                    // Keep the frame and stop watching the tap; the guest's next receive
                    // notification brings us back.
                    NetMetrics::add(&self.metrics.rx_deferred, 1);
                    self.pending = Some(len);
                    // Every chain on the ring is reserved, so "new buffers" from here on
                    // means the driver added some and notified us.
                    let raced = {
                        let mem = self.mem.memory();
                        matches!(self.rx.queue.enable_notification(&*mem), Ok(true))
                    };
                    if raced {
                        continue;
                    }
                    self.arm_tap(false);
                    return;
                }
            }
        }
        // A batch delivered and the tap may hold more: come back after the other events.
        let _ = self.rx.evt.write(1);
    }

    /// An available ring cannot be walked: stop using the queues and tell the driver (§2.1.2).
    fn ring_broken(&mut self, which: &str) {
        self.broken = true;
        self.warn(&format!(
            "virtio-net: the driver's {which} ring index is invalid; device needs reset"
        ));
        if let Err(e) = self.needs_reset.raise() {
            tracing::error!("virtio-net: cannot signal the guest: {e}");
        }
    }

    fn arm_tap(&mut self, on: bool) {
        if self.tap_armed == on {
            return;
        }
        let events = if on {
            EventSet::IN | EventSet::EDGE_TRIGGERED
        } else {
            EventSet::empty()
        };
        // MOD re-checks readiness, so frames that queued while disarmed wake us at once.
        match self.epoll.ctl(
            ControlOperation::Modify,
            self.tap.fd(),
            EpollEvent::new(events, TOKEN_TAP),
        ) {
            Ok(()) => self.tap_armed = on,
            Err(e) => tracing::error!("virtio-net: epoll on the tap: {e}"),
        }
    }

    /// Takes the next receive chain off the ring as a list of its writable buffers.
    fn pop_rx_chain(&mut self) -> Option<RxChain> {
        let mem = self.mem.memory();
        let chain = self.rx.queue.pop_descriptor_chain(&*mem)?;
        let head = chain.head_index();
        let mut segs = Vec::new();
        let mut cap = 0usize;
        for d in chain {
            if segs.len() >= usize::from(RX_MAX_SEGS) {
                break;
            }
            if d.is_write_only() && d.len() > 0 && mem.check_range(d.addr(), d.len() as usize) {
                segs.push((d.addr(), d.len()));
                cap += d.len() as usize;
            }
        }
        Some(RxChain { head, segs, cap })
    }

    /// Returns a chain to the driver unused (it cannot hold anything we have to give).
    fn return_empty(&mut self, head: u16) {
        let mem = self.mem.memory();
        if self.rx.queue.add_used(&*mem, head, 0).is_ok() {
            self.rx.used_since_signal = true;
        }
    }

    /// Copies `self.frame[..len]` into receive chains. Chains taken from the ring for a
    /// frame that did not fit yet stay reserved for it, so the ring is never rewound and the
    /// driver's next buffers always notify us (§2.7.10).
    fn deliver(&mut self, len: usize) -> Delivery {
        let mut cap: usize = self.rx_reserved.iter().map(|c| c.cap).sum();
        let mut taken = 0usize;
        loop {
            let enough = if self.mrg_rxbuf {
                cap >= len
            } else {
                !self.rx_reserved.is_empty()
            };
            if enough {
                break;
            }
            if taken >= RX_BATCH {
                return Delivery::Yield;
            }
            taken += 1;
            match self.pop_rx_chain() {
                Some(c) if self.rx_held.contains(c.head) => {
                    // Already reserved for this frame: the driver posted a buffer we hold.
                    let _ = c;
                    return Delivery::Broken;
                }
                Some(c) if c.cap == 0 => self.return_empty(c.head),
                Some(c) => {
                    cap += c.cap;
                    self.rx_held.insert(c.head);
                    self.rx_reserved.push_back(c);
                }
                None => return Delivery::NoBuffers,
            }
        }
        if !self.mrg_rxbuf {
            // One buffer per frame without MRG_RXBUF (§5.1.6.3.1): it must hold it all.
            if let Some(c) = self.rx_reserved.front() {
                if c.cap < len {
                    let head = c.head;
                    self.rx_reserved.pop_front();
                    self.rx_held.remove(head);
                    self.return_empty(head);
                    return Delivery::TooBig;
                }
            }
        }
        let mem = self.mem.memory();
        let mut off = 0usize;
        let mut used: Vec<(u16, u32)> = Vec::new();
        // Where the header's num_buffers (frame bytes 10 and 11) landed in guest memory.
        let mut num_buffers_at: [Option<GuestAddress>; 2] = [None, None];
        while off < len {
            let Some(c) = self.rx_reserved.pop_front() else {
                break;
            };
            let mut written = 0u32;
            for &(addr, seg_len) in &c.segs {
                if off >= len {
                    break;
                }
                let n = (seg_len as usize).min(len - off);
                if mem.write_slice(&self.frame[off..off + n], addr).is_err() {
                    break;
                }
                for (k, slot) in num_buffers_at.iter_mut().enumerate() {
                    let at = 10 + k;
                    if (off..off + n).contains(&at) {
                        *slot = Some(GuestAddress(addr.0 + (at - off) as u64));
                    }
                }
                off += n;
                written += n as u32;
            }
            used.push((c.head, written));
        }
        // num_buffers sits at offset 10 of virtio_net_hdr_v1 (§5.1.6.4).
        let count = (used.len() as u16).to_le_bytes();
        for (slot, byte) in num_buffers_at.iter().zip(count) {
            if let Some(at) = slot {
                let _ = mem.write_obj(byte, *at);
            }
        }
        for (head, n) in used {
            self.rx_held.remove(head);
            if self.rx.queue.add_used(&*mem, head, n).is_ok() {
                self.rx.used_since_signal = true;
            }
        }
        if off < len {
            // A buffer failed to take its share (a write outside memory): the frame is lost.
            return Delivery::TooBig;
        }
        Delivery::Done
    }

    /// Control commands (§5.1.6.5): class, command, data, then a one-byte ack.
    fn process_ctrl(&mut self) {
        let Some(mut ctrl) = self.ctrl.take() else {
            return;
        };
        let mut taken = 0usize;
        loop {
            let mem = self.mem.memory();
            if self.broken || !avail_ring_is_sane(&mut ctrl.queue, &*mem) {
                drop(mem);
                if !self.broken {
                    self.ring_broken("control");
                }
                break;
            }
            while taken < usize::from(CTRL_BATCH) {
                let Some(chain) = ctrl.queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                taken += 1;
                let head = chain.head_index();
                let mut cmd = Vec::new();
                let mut ack: Option<GuestAddress> = None;
                let mut ok_shape = true;
                let mut truncated = false;
                for d in chain.take(MAX_CHAIN_DESCS) {
                    truncated = d.has_next();
                    if d.is_write_only() {
                        // The ack is the last device-writable byte; a buffer that wraps the
                        // address space has none (the write below then fails harmlessly).
                        ack = d
                            .addr()
                            .0
                            .checked_add(u64::from(d.len()))
                            .and_then(|end| end.checked_sub(1))
                            .filter(|_| d.len() > 0)
                            .map(GuestAddress);
                    } else if ack.is_some() || cmd.len() as u64 + u64::from(d.len()) > MAX_CTRL {
                        ok_shape = false;
                    } else {
                        let start = cmd.len();
                        cmd.resize(start + d.len() as usize, 0);
                        if mem.read_slice(&mut cmd[start..], d.addr()).is_err() {
                            ok_shape = false;
                        }
                    }
                }
                if truncated {
                    // A loop or an over-long chain: where its ack byte is, is unknown.
                    ok_shape = false;
                    ack = None;
                }
                let result = if ok_shape && cmd.len() >= 2 {
                    self.control(cmd[0], cmd[1], &cmd[2..])
                } else {
                    false
                };
                NetMetrics::add(
                    if result {
                        &self.metrics.ctrl_ok
                    } else {
                        &self.metrics.ctrl_err
                    },
                    1,
                );
                let mut len = 0;
                if let Some(a) = ack {
                    let v = if result {
                        VIRTIO_NET_OK
                    } else {
                        VIRTIO_NET_ERR
                    } as u8;
                    if mem.write_obj(v, a).is_ok() {
                        len = 1;
                    }
                }
                if ctrl.queue.add_used(&*mem, head, len).is_ok() {
                    ctrl.used_since_signal = true;
                }
            }
            if taken >= usize::from(CTRL_BATCH) {
                // Come back through our own eventfd after looking at other events.
                let _ = ctrl.evt.write(1);
                break;
            }
            match ctrl.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        self.ctrl = Some(ctrl);
    }

    fn control(&mut self, class: u8, cmd: u8, data: &[u8]) -> bool {
        match (u32::from(class), u32::from(cmd)) {
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC) if data.len() == 1 => {
                self.filter.promisc = data[0] != 0;
                true
            }
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI) if data.len() == 1 => {
                self.filter.allmulti = data[0] != 0;
                true
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) if data.len() == 6 => {
                self.filter.mac.copy_from_slice(data);
                true
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
                // Two tables, each a u32 count and that many MACs (§5.1.6.5.2).
                let table = |d: &[u8]| -> Option<(Vec<[u8; 6]>, usize)> {
                    let n = u32::from_le_bytes(d.get(..4)?.try_into().ok()?) as usize;
                    let bytes = n.checked_mul(6)?;
                    let body = d.get(4..4 + bytes)?;
                    let macs = body
                        .chunks_exact(6)
                        .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
                        .collect();
                    Some((macs, 4 + bytes))
                };
                match table(data).and_then(|(uc, used)| {
                    let (mc, used2) = table(&data[used..])?;
                    (used + used2 == data.len()).then_some((uc, mc))
                }) {
                    Some((uc, mc)) => {
                        self.filter.unicast = uc;
                        self.filter.multicast = mc;
                        true
                    }
                    None => false,
                }
            }
            _ => {
                self.warn(&format!(
                    "virtio-net: unsupported or malformed control command {class}/{cmd}"
                ));
                false
            }
        }
    }
}

/// A receive chain off the ring: its writable buffers and their total size.
struct RxChain {
    head: u16,
    segs: Vec<(GuestAddress, u32)>,
    cap: usize,
}

/// Descriptors we follow in one receive chain.
const RX_MAX_SEGS: u16 = 64;

enum Delivery {
    Done,
    TooBig,
    NoBuffers,
    /// Too many chains taken for one frame this time; try again after other events.
    Yield,
    /// The driver posted a chain the device holds (§2.7.13).
    Broken,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceNeedsReset;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    struct NoIrq;
    impl VirtioInterrupt for NoIrq {
        fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Malformed transmit chains are completed and dropped, a good one reaches the "tap",
    /// and nothing panics.
    #[test]
    fn malformed_transmit_chains_are_dropped() {
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
        mem.write_slice(&[0xee; 74], GuestAddress(0x40_0000))
            .unwrap();
        txq.add_desc_chains(
            &[
                // Header in a device-writable buffer.
                desc(0x40_0000, 12, NEXT | WRITE, 1),
                desc(0x40_1000, 60, 0, 0),
                // Only part of a header.
                desc(0x40_0000, 4, 0, 0),
                // Data outside guest memory.
                desc(0x40_0000, 12, NEXT, 4),
                desc(0x7_0000_0000, 60, 0, 0),
                // Longer than any frame.
                desc(0x40_0000, 12, NEXT, 6),
                desc(0x0, 0xf0_0000, 0, 0),
                // A good frame: header and 62 bytes.
                desc(0x40_0000, 12, NEXT, 8),
                desc(0x40_1000, 62, 0, 0),
            ],
            0,
        )
        .unwrap();
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        // SAFETY: the descriptor is ours alone from here on.
        let file = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(ours)) };
        let tap = Tap::from_file(file, "test");
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(NoIrq);
        let queues = vec![
            (RX, rxq.create_queue().unwrap(), EventFd::new(0).unwrap()),
            (TX, txq.create_queue().unwrap(), EventFd::new(0).unwrap()),
        ];
        let ctx = ActivateContext {
            mem: GuestMemoryAtomic::new(mem.clone()),
            acked_features: 0,
            queues,
            interrupt: irq.clone(),
            needs_reset: DeviceNeedsReset::new(irq),
            spawner: Arc::new(crate::DirectSpawner),
        };
        let metrics = Arc::new(NetMetrics::default());
        let Ok(mut w) = Worker::new(
            ctx,
            tap,
            [2, 0, 0, 0, 0, 1],
            metrics.clone(),
            Arc::default(),
            EventFd::new(0).unwrap(),
        ) else {
            panic!("worker");
        };
        w.process_tx();
        assert_eq!(txq.used().idx().load(), 5, "every chain is returned");
        assert_eq!(NetMetrics::get(&metrics.tx_dropped), 4);
        assert_eq!(NetMetrics::get(&metrics.tx_frames), 1);
        let mut buf = [0u8; 256];
        assert_eq!(theirs.recv(&mut buf).unwrap(), 74);
        assert!(
            theirs.recv(&mut buf).is_err(),
            "only the good frame went out"
        );
    }

    /// A receive chain the device holds for a frame, posted again by the driver, breaks the
    /// ring (§2.7.13): DEVICE_NEEDS_RESET, and the worker stops taking chains instead of
    /// reserving the same buffer over and over.
    #[test]
    fn a_receive_head_posted_again_while_reserved_breaks_the_ring() {
        const WRITE: u16 = 2;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(0x10_0000), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(0x20_0000), 16);
        // One 16-byte buffer: too small for the frame, so it is reserved and more are taken.
        rxq.add_desc_chains(&[desc(0x40_0000, 16, WRITE, 0)], 0)
            .unwrap();
        for slot in 1..4 {
            rxq.avail().ring().ref_at(slot).unwrap().store(0);
        }
        rxq.avail().idx().store(4);
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        // SAFETY: the descriptor is ours alone from here on.
        let file = unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(ours)) };
        let tap = Tap::from_file(file, "test");
        // A broadcast frame of 200 bytes after the 12-byte header.
        let mut frame = vec![0u8; VNET_HDR_LEN + 200];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].fill(0xff);
        theirs.send(&frame).unwrap();
        let irq: Arc<dyn VirtioInterrupt> = Arc::new(NoIrq);
        let needs_reset = DeviceNeedsReset::new(irq.clone());
        let queues = vec![
            (RX, rxq.create_queue().unwrap(), EventFd::new(0).unwrap()),
            (TX, txq.create_queue().unwrap(), EventFd::new(0).unwrap()),
        ];
        let ctx = ActivateContext {
            mem: GuestMemoryAtomic::new(mem.clone()),
            acked_features: 1 << VIRTIO_NET_F_MRG_RXBUF,
            queues,
            interrupt: irq,
            needs_reset: needs_reset.clone(),
            spawner: Arc::new(crate::DirectSpawner),
        };
        let Ok(mut w) = Worker::new(
            ctx,
            tap,
            [2, 0, 0, 0, 0, 1],
            Arc::new(NetMetrics::default()),
            Arc::default(),
            EventFd::new(0).unwrap(),
        ) else {
            panic!("worker");
        };
        w.process_rx();
        assert!(needs_reset.is_raised());
        assert!(w.broken);
        assert_eq!(w.rx_reserved.len(), 1, "the head was reserved once");
        assert_eq!(
            rxq.used().idx().load(),
            0,
            "nothing delivered into a doubled buffer"
        );
        // A broken device takes nothing more.
        w.process_rx();
        assert_eq!(w.rx_reserved.len(), 1);
    }

    #[test]
    fn filter_follows_the_control_settings() {
        let mac = [0x02, 1, 2, 3, 4, 5];
        let mut f = RxFilter {
            mac,
            promisc: false,
            allmulti: false,
            unicast: vec![],
            multicast: vec![],
        };
        assert!(f.accepts(&mac));
        assert!(f.accepts(&[0xff; 6]));
        assert!(!f.accepts(&[0x02, 9, 9, 9, 9, 9]));
        assert!(!f.accepts(&[0x01, 0, 0x5e, 0, 0, 1]));
        f.allmulti = true;
        assert!(f.accepts(&[0x01, 0, 0x5e, 0, 0, 1]));
        f.unicast.push([0x02, 9, 9, 9, 9, 9]);
        assert!(f.accepts(&[0x02, 9, 9, 9, 9, 9]));
        f.promisc = true;
        assert!(f.accepts(&[0x06, 7, 7, 7, 7, 7]));
    }
}

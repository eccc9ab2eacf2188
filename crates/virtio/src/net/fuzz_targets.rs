//! The virtio-net fuzz bodies (see `crate::fuzz_targets` for the shared helpers). A
//! datagram socketpair stands in for the tap: one end is the device's "tap", the test reads
//! what the device transmitted from the other and sends it the frames to receive.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::Net;
use super::tap::{Tap, VNET_HDR_LEN};
use crate::device::{features, ActivateContext, DeviceNeedsReset, DirectSpawner, VirtioDevice};
use crate::fuzz_targets::{
    changed_ranges, copy_memory, fill, guarded_memory, overlaps, Chain, CountingIrq, Input, Ring,
};

const LAYOUT: [(u64, usize); 2] = [(0, 0x20000), (0x30000, 0x10000)];
const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
/// The worker's limits (`event_handler.rs`).
const MAX_TX: u64 = 65_550 + VNET_HDR_LEN as u64;
const MAX_FRAME: usize = 65_562;
const MAX_CHAIN_DESCS: usize = 256;
const RX_MAX_SEGS: usize = 64;
const MAX_CTRL: u64 = 4096;

fn bit(b: u32) -> u64 {
    1 << b
}

/// The socketpair: the device's end as a tap, and ours.
fn fake_tap() -> (Tap, UnixDatagram) {
    let (device_end, ours) = UnixDatagram::pair().expect("socketpair");
    // Non-blocking both ways, as a tap is: a full socket must not stall the worker.
    device_end.set_nonblocking(true).expect("nonblocking");
    ours.set_nonblocking(true).expect("nonblocking");
    let file = File::from(OwnedFd::from(device_end));
    (Tap::from_file(file, "fuzz"), ours)
}

/// Activates a device on `tap` with `queues`, lets its worker take its first pass over
/// every queue, and resets it (which returns only once the worker has stopped).
fn run_device(
    tap: Tap,
    mem: &GuestMemoryMmap,
    acked: u64,
    queues: Vec<(u16, Ring)>,
    event_idx: bool,
) -> bool {
    let mut net = Net::with_tap(tap, "fuzz", MAC);
    let acked = acked & net.avail_features();
    let irq = Arc::new(CountingIrq::default());
    let needs_reset = DeviceNeedsReset::new(irq.clone());
    let queues = queues
        .into_iter()
        .map(|(index, ring)| {
            let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            (index, ring.queue(mem, event_idx), evt)
        })
        .collect();
    net.activate(ActivateContext {
        mem: GuestMemoryAtomic::new(mem.clone()),
        acked_features: acked,
        queues,
        interrupt: irq,
        needs_reset: needs_reset.clone(),
        spawner: Arc::new(DirectSpawner),
    })
    .expect("activate");
    net.reset();
    needs_reset.is_raised()
}

/// Whether the device's reads of the rings and tables saw what `snap` holds.
fn metadata_unchanged(rings: &[Ring], snap: &GuestMemoryMmap, changed: &[(u64, u64)]) -> bool {
    rings.iter().all(|r| {
        r.metadata(snap)
            .iter()
            .all(|&(s, e)| !overlaps(changed, s, e.saturating_sub(s)))
    })
}

fn used_areas(rings: &[Ring]) -> Vec<(u64, u64)> {
    rings.iter().map(|r| r.used_area()).collect()
}

// ---------------------------------------------------------------------------------------
// net_tx_ctrl

const TX_BASE: u64 = 0;
const RX_BASE: u64 = 0x4000;
const CTRL_BASE: u64 = 0x8000;

/// `net_tx_ctrl`: arbitrary transmit and control chains (the input: queue sizes, then an
/// image of the transmit ring's area at 0 — available ring at 0x100, descriptor table at 0x400 —
/// then one of the control ring's area at 0x8000; buffers anywhere). Asserts, once the
/// worker has stopped: every transmit and control chain with a head inside its queue is
/// used; transmit used lengths are 0 and what reached the tap is, in order, exactly the
/// well-formed chains' bytes (device-readable only, header and more, at most 64 KiB of
/// payload, inside guest memory); control used lengths are 0 or 1, the ack byte holds OK or
/// ERR, and OK exactly for the well-formed commands of §5.1.6.5 (promiscuous and
/// all-multicast with one byte, a 6-byte MAC, two well-formed MAC tables).
pub fn net_tx_ctrl(data: &[u8]) {
    let mut input = Input::new(data);
    let tx = Ring::at(TX_BASE, 1 << (input.u8() % 9));
    let ctrl = Ring::at(CTRL_BASE, 1 << (input.u8() % 7));
    let rx = Ring::at(RX_BASE, 16);
    let event_idx = input.u8() & 1 != 0;
    let mem = guarded_memory("net_tx_ctrl", &LAYOUT);
    let snap = guarded_memory("net_tx_ctrl.snapshot", &LAYOUT);
    let tx_len = usize::from(input.u16() % 0x4000);
    fill(&mem, TX_BASE, input.bytes(tx_len));
    fill(&mem, CTRL_BASE, input.rest());
    // No receive buffers.
    let _ = mem.write_slice(&[0u8; 0x400], GuestAddress(RX_BASE));
    let rings = [rx, tx, ctrl];
    for r in &rings {
        r.clear_used(&mem);
    }
    copy_memory(&mem, &snap);

    let (tap, ours) = fake_tap();
    let acked = features::VIRTIO_F_VERSION_1
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
        | if event_idx {
            features::VIRTIO_F_EVENT_IDX
        } else {
            0
        };
    run_device(
        tap,
        &mem,
        acked,
        vec![(0, rx), (1, tx), (2, ctrl)],
        event_idx,
    );
    let mut frames = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME + 1];
    while let Ok(n) = ours.recv(&mut buf) {
        frames.push(buf[..n].to_vec());
    }

    let changed = changed_ranges(&snap, &mem);
    let used = used_areas(&rings);
    let tx_chains = tx.chains(&snap, MAX_CHAIN_DESCS);
    let ctrl_chains = ctrl.chains(&snap, MAX_CHAIN_DESCS);
    let (Some(tx_chains), Some(ctrl_chains)) = (tx_chains, ctrl_chains) else {
        return;
    };
    let writes_rings = ctrl_chains
        .iter()
        .flat_map(|c| c.writable())
        .any(|(s, e)| overlaps(&used, s, e - s));
    if !metadata_unchanged(&rings, &snap, &changed) || writes_rings {
        return;
    }

    // Transmit.
    let (tx_used_idx, tx_used) = tx.used(&mem);
    let valid_heads = tx_chains.iter().filter(|c| c.head < tx.size).count();
    assert_eq!(
        usize::from(tx_used_idx),
        valid_heads,
        "transmit chains used"
    );
    assert!(
        tx_used.iter().all(|&(_, len)| len == 0),
        "transmit used length"
    );
    let expected: Vec<Vec<u8>> = tx_chains
        .iter()
        .filter(|c| c.head < tx.size)
        .filter_map(|c| tx_frame(&snap, c))
        .collect();
    // Ack bytes written into transmit buffers change what a later pass would send.
    let tx_bytes: Vec<(u64, u64)> = tx_chains
        .iter()
        .flat_map(|c| c.descs.iter())
        .map(|d| (d.addr().0, d.addr().0.saturating_add(u64::from(d.len()))))
        .collect();
    let acked_into_tx = changed.iter().any(|&(s, e)| overlaps(&tx_bytes, s, e - s));
    if !acked_into_tx {
        let mut want = expected.iter();
        for frame in &frames {
            assert!(
                want.any(|w| w == frame),
                "a frame of {} bytes that no chain holds",
                frame.len()
            );
        }
        let total: usize = expected.iter().map(Vec::len).sum();
        if expected.len() <= 8 && total <= 100_000 {
            assert_eq!(frames.len(), expected.len(), "every good frame went out");
        }
    } else {
        assert!(frames.len() <= expected.len());
    }

    // Control.
    let (ctrl_used_idx, ctrl_used) = ctrl.used(&mem);
    let valid_heads = ctrl_chains.iter().filter(|c| c.head < ctrl.size).count();
    assert_eq!(
        usize::from(ctrl_used_idx),
        valid_heads,
        "control chains used"
    );
    let acks: Vec<u64> = ctrl_chains.iter().filter_map(ack_of).collect();
    for (id, len) in ctrl_used {
        assert!(len <= 1, "control used length {len}");
        let chain = ctrl_chains
            .iter()
            .find(|c| u32::from(c.head) == id)
            .expect("used id was made available");
        let Some(at) = ack_of(chain) else {
            assert_eq!(len, 0, "an ack without an ack byte");
            continue;
        };
        if snap.check_range(GuestAddress(at), 1) {
            assert_eq!(len, 1, "an ack byte in memory is written");
        }
        if len == 0 {
            continue;
        }
        let value: u8 = mem.read_obj(GuestAddress(at)).expect("ack in memory");
        assert!(
            value == VIRTIO_NET_OK as u8 || value == VIRTIO_NET_ERR as u8,
            "ack {value}"
        );
        let shared = acks.iter().filter(|&&a| a == at).count() > 1;
        // Another chain's ack written over this command changes what the device read.
        let rewritten = chain
            .descs
            .iter()
            .any(|d| !d.is_write_only() && overlaps(&changed, d.addr().0, u64::from(d.len())));
        if let (Some(expect), false, false) = (expected_ack(&snap, chain), shared, rewritten) {
            assert_eq!(value, expect, "ack of a well-formed chain");
        }
    }
}

/// The bytes a well-formed transmit chain sends, or None if the device must drop it.
fn tx_frame(snap: &GuestMemoryMmap, c: &Chain) -> Option<Vec<u8>> {
    if c.descs.last().is_some_and(|d| d.has_next()) {
        return None;
    }
    let mut frame = Vec::new();
    for d in &c.descs {
        if d.is_write_only() || frame.len() as u64 + u64::from(d.len()) > MAX_TX {
            return None;
        }
        let slice = snap.get_slice(d.addr(), d.len() as usize).ok()?;
        let mut b = vec![0u8; d.len() as usize];
        slice.copy_to(&mut b);
        frame.extend_from_slice(&b);
    }
    (frame.len() > VNET_HDR_LEN).then_some(frame)
}

/// Where the device writes a control chain's ack: the last byte of its last
/// device-writable descriptor.
fn ack_of(c: &Chain) -> Option<u64> {
    if c.descs.last().is_some_and(|d| d.has_next()) {
        return None;
    }
    let d = c.descs.iter().rev().find(|d| d.is_write_only())?;
    (d.len() > 0)
        .then(|| d.addr().0.checked_add(u64::from(d.len()) - 1))
        .flatten()
}

/// The ack §5.1.6.5 asks for, for chains of the plain shape: device-readable command
/// buffers inside memory, then one device-writable ack buffer.
fn expected_ack(snap: &GuestMemoryMmap, c: &Chain) -> Option<u8> {
    let (last, cmd_descs) = c.descs.split_last()?;
    if !last.is_write_only() || last.has_next() || cmd_descs.iter().any(|d| d.is_write_only()) {
        return None;
    }
    let mut cmd = Vec::new();
    for d in cmd_descs {
        if cmd.len() as u64 + u64::from(d.len()) > MAX_CTRL {
            return Some(VIRTIO_NET_ERR as u8);
        }
        let mut b = vec![0u8; d.len() as usize];
        if snap.read_slice(&mut b, d.addr()).is_err() {
            return Some(VIRTIO_NET_ERR as u8);
        }
        cmd.extend_from_slice(&b);
    }
    let ok = match cmd.as_slice() {
        [class, command, data @ ..] => {
            match (u32::from(*class), u32::from(*command)) {
                (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC)
                | (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI) => data.len() == 1,
                (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => data.len() == 6,
                (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
                    // Two tables: a little-endian count, then that many MACs each.
                    let table = |d: &[u8]| -> Option<usize> {
                        let n = u32::from_le_bytes(d.get(..4)?.try_into().ok()?) as u64;
                        let len = 4 + n * 6;
                        (len <= d.len() as u64).then_some(len as usize)
                    };
                    table(data)
                        .and_then(|a| Some(a + table(&data[a..])?))
                        .is_some_and(|n| n == data.len())
                }
                _ => false,
            }
        }
        _ => false,
    };
    Some(if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8)
}

// ---------------------------------------------------------------------------------------
// net_rx

/// `net_rx`: arbitrary receive chains (the input: queue size and features, then up to 16
/// frames, each a length and its bytes, padded with a pattern, then an image of the receive
/// ring's area at 0 — available ring at 0x100, descriptor table at 0x400; buffers anywhere) and
/// frames arriving on the tap. Asserts, once the worker has stopped: every used id was made
/// available and no used length exceeds the chain's device-writable room; with
/// VIRTIO_NET_F_MRG_RXBUF the used buffers hold, in order, whole frames, each spread over
/// consecutive buffers whose count is its header's `num_buffers`; without it each used
/// buffer holds one whole frame (in order, frames larger than a buffer dropped) with
/// `num_buffers` 1.
pub fn net_rx(data: &[u8]) {
    let mut input = Input::new(data);
    let rx = Ring::at(0, 1 << (input.u8() % 9));
    let flags = input.u8();
    let mrg = flags & 1 != 0;
    let event_idx = flags & 2 != 0;
    let tx = Ring::at(0x8000, 16);
    let mem = guarded_memory("net_rx", &LAYOUT);
    let snap = guarded_memory("net_rx.snapshot", &LAYOUT);

    let (tap, ours) = fake_tap();
    let mut sent = Vec::new();
    for i in 0..input.u8() % 17 {
        let len = usize::from(input.u16()) % (MAX_FRAME + 1);
        let given = usize::from(input.u8());
        let mut frame = input.bytes(given.min(len)).to_vec();
        frame.extend((frame.len()..len).map(|k| (k as u8) ^ i));
        if ours.send(&frame).is_ok() {
            sent.push(frame);
        }
    }
    fill(&mem, 0, input.rest());
    let _ = mem.write_slice(&[0u8; 0x400], GuestAddress(0x8000));
    let rings = [rx, tx];
    for r in &rings {
        r.clear_used(&mem);
    }
    copy_memory(&mem, &snap);

    let mut acked = features::VIRTIO_F_VERSION_1;
    if mrg {
        acked |= bit(VIRTIO_NET_F_MRG_RXBUF);
    }
    if event_idx {
        acked |= features::VIRTIO_F_EVENT_IDX;
    }
    run_device(tap, &mem, acked, vec![(0, rx), (1, tx)], event_idx);

    let Some(chains) = rx.chains(&snap, usize::MAX) else {
        return;
    };
    let changed = changed_ranges(&snap, &mem);
    if !metadata_unchanged(&rings, &snap, &changed) {
        return;
    }
    // Frame bytes written over the used ring leave nothing to check there.
    let (used_start, used_end) = rx.used_area();
    let into_used = chains
        .iter()
        .flat_map(|c| c.writable())
        .any(|(s, e)| s < used_end && used_start < e);
    if into_used {
        return;
    }
    let (_, used) = rx.used(&mem);
    let room = |c: &Chain| -> Vec<(u64, u32)> {
        c.descs
            .iter()
            .filter(|d| d.is_write_only() && d.len() > 0)
            .filter(|d| snap.check_range(d.addr(), d.len() as usize))
            .take(RX_MAX_SEGS)
            .map(|d| (d.addr().0, d.len()))
            .collect()
    };
    let mut buffers = Vec::new();
    for &(id, len) in &used {
        let chain = chains
            .iter()
            .find(|c| u32::from(c.head) == id)
            .unwrap_or_else(|| panic!("used id {id} was never made available"));
        let segs = room(chain);
        let cap: u64 = segs.iter().map(|&(_, l)| u64::from(l)).sum();
        assert!(
            u64::from(len) <= cap,
            "used length {len} of a chain with room {cap}"
        );
        if len > 0 {
            buffers.push(segs);
        }
    }
    // Content checks need buffers that nothing else wrote: no overlap between the used
    // buffers, nor with the rings.
    let mut spans: Vec<(u64, u64)> = buffers
        .iter()
        .flatten()
        .map(|&(a, l)| (a, a + u64::from(l)))
        .collect();
    spans.extend(used_areas(&rings));
    spans.sort_unstable();
    if spans.windows(2).any(|w| w[1].0 < w[0].1) {
        return;
    }
    let filled: Vec<Vec<u8>> = used
        .iter()
        .filter(|&&(_, len)| len > 0)
        .zip(&buffers)
        .map(|(&(_, len), segs)| gather(&mem, segs, len as usize))
        .collect();
    let mut frames = sent.iter().filter(|f| f.len() > VNET_HDR_LEN);
    if mrg {
        let mut next = filled.iter();
        while let Some(first) = next.next() {
            let frame = frames.next().expect("more data than frames");
            let mut got = first.clone();
            let mut count = 1u16;
            while got.len() < frame.len() {
                got.extend_from_slice(next.next().expect("frame spread over buffers"));
                count += 1;
            }
            assert!(
                frame_matches(&got, frame, count),
                "frame over {count} buffers"
            );
        }
    } else {
        for got in &filled {
            // Frames larger than their buffer were dropped in between.
            assert!(
                frames.any(|f| frame_matches(got, f, 1)),
                "a buffer of {} bytes that holds no frame",
                got.len()
            );
        }
    }
}

fn gather(mem: &GuestMemoryMmap, segs: &[(u64, u32)], len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for &(addr, seg_len) in segs {
        let n = (seg_len as usize).min(len - out.len());
        let mut b = vec![0u8; n];
        mem.read_slice(&mut b, GuestAddress(addr)).expect("segment");
        out.extend_from_slice(&b);
        if out.len() == len {
            break;
        }
    }
    out
}

/// The guest sees the frame as sent, but for `num_buffers` (header bytes 10 and 11).
fn frame_matches(got: &[u8], frame: &[u8], num_buffers: u16) -> bool {
    got.len() == frame.len()
        && got[..10] == frame[..10]
        && got[10..12] == num_buffers.to_le_bytes()
        && got[12..] == frame[12..]
}

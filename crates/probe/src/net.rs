//! A polled virtio-net driver (virtio 1.2 section 5.1) over virtio-mmio, and the `net-ping`,
//! `net-udp`, `net-ctrl` and `net-bench` modes (`net-hostile` is in nethostile.rs).
//!
//! The driver takes what a Linux driver would of VERSION_1, MAC, STATUS, MTU, CSUM,
//! GUEST_CSUM, MRG_RXBUF, EVENT_IDX, CTRL_VQ, CTRL_RX and CTRL_MAC_ADDR; queues are rx (0),
//! tx (1) and ctrl (2), each up to 256 entries, polled (no interrupts: used_event is kept far
//! ahead, and avail_event is read before every notification). Every frame carries the 12-byte
//! `virtio_net_hdr_v1`. Receive descriptor i is buffer i for good: 512 bytes each with
//! MRG_RXBUF (a full frame spans several, `num_buffers` > 1, reassembled by copying), else
//! room for a whole frame of the MTU. Transmit descriptor i is slot i (header and frame in one
//! descriptor), handed out from a free list as completions come back.
//!
//! Command-line words: `probe.net.ip=A.B.C.D` (guest, default 10.200.0.2),
//! `probe.net.host=A.B.C.D` (host, default 10.200.0.1), `probe.net.port=N` (host UDP port,
//! default 5000), `probe.net.count=N`, `probe.net.size=N` (UDP payload bytes, default 64),
//! `probe.net.mac=xx:xx:xx:xx:xx:xx` (net-ctrl's new address), `probe.net.interval=MS`
//! (between echo requests, default 200), `probe.net.wait=MS` (net-hostile's wait for a frame
//! into tiny buffers, default 5000), `probe.net.skip=CASE,CASE` (net-hostile cases not run).
//! Timeouts are TSC ticks from the CPUID TSC frequency leaves, 2.5 GHz assumed without them.
//!
//! The stack: ARP for the host (requests for the guest address are answered), ICMP echo both
//! ways, UDP to guest port 4000. Frames not for the guest's MAC (or broadcast) are dropped.
//! UDP payloads of `net-udp`: byte i of datagram seq s is `(s + i) mod 256`; received ones
//! are put back in seq order (the seq nearest the arrival index with the first byte's value)
//! before they are hashed. `net-bench` sends one datagram `count` times (phase tx), then
//! counts datagrams to port 4000 (phase rx; a batch taken from the used ring is counted
//! whole, so the count may pass `count` by what the device had already delivered).

use crate::inet::{
    self, get16, get_mac, put16, put16le, put32le, put64le, put_mac, Ip, Mac, BROADCAST, ETH,
    ETHERTYPE_ARP, ETHERTYPE_IPV4, ICMP, IP, PROTO_ICMP, PROTO_UDP, UDP,
};
use crate::phys::{self, cpuid, rdtsc, Arena, Global};
use crate::say;
use crate::serial::{Dec, Emit, Hex, Text};
use crate::virtio::{
    self, Found, Mmio, Queue, QueueMem, Wait, D_NEXT, D_WRITE, F_EVENT_IDX, F_VERSION_1,
};

pub const DEVICE_ID_NET: u32 = 1;

// Feature bits (section 5.1.3).
pub const F_CSUM: u64 = 1 << 0;
pub const F_GUEST_CSUM: u64 = 1 << 1;
pub const F_MTU: u64 = 1 << 3;
pub const F_MAC: u64 = 1 << 5;
pub const F_MRG_RXBUF: u64 = 1 << 15;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_CTRL_RX: u64 = 1 << 18;
pub const F_CTRL_MAC_ADDR: u64 = 1 << 23;

pub const WANTED: u64 = F_VERSION_1
    | F_MAC
    | F_STATUS
    | F_MTU
    | F_CSUM
    | F_GUEST_CSUM
    | F_MRG_RXBUF
    | F_EVENT_IDX
    | F_CTRL_VQ
    | F_CTRL_RX
    | F_CTRL_MAC_ADDR;

/// `virtio_net_hdr_v1` bytes (num_buffers included with VERSION_1) and its flags.
pub const HDR: u64 = 12;
pub const HDR_F_NEEDS_CSUM: u8 = 1;
pub const HDR_F_DATA_VALID: u8 = 2;

// Control classes and commands (section 5.1.6.5), acks.
pub const CTRL_RX: u8 = 0;
pub const CTRL_RX_PROMISC: u8 = 0;
pub const CTRL_RX_ALLMULTI: u8 = 1;
pub const CTRL_MAC: u8 = 1;
pub const CTRL_MAC_ADDR_SET: u8 = 1;
pub const ACK_OK: u8 = 0;
pub const ACK_ERR: u8 = 1;

/// Entries per queue at most (three pages hold 256).
pub const QMAX: u16 = 256;
/// A transmit slot: header and frame.
pub const TX_SLOT: u64 = 2048;
/// A receive buffer with MRG_RXBUF.
const MRG_BUF: u64 = 512;
/// The reassembly buffer for frames spread over several receive buffers.
const ASM_MAX: u64 = 64 * 1024 + 4096;
/// Control command bytes: header at +0, data at +8 (up to 56 bytes), ack at +64.
pub const CTRL_DATA: u64 = 8;
pub const CTRL_ACK: u64 = 64;

pub const GUEST_PORT: u16 = 4000;
const ICMP_ID: u16 = 0x7072;
const ECHO_DATA: u64 = 56;
/// The MAC used when the device offers none: locally administered.
const DEFAULT_MAC: u64 = 0x01_00_62_72_70_02; // 02:70:72:62:00:01

pub struct Opts {
    pub ip: u32,
    pub host: u32,
    pub port: u16,
    pub count: Option<u64>,
    pub size: u64,
    pub mac: Option<u64>,
    pub interval_ms: u64,
    pub wait_ms: u64,
    /// `net-hostile` cases not to run (comma-separated names).
    pub skip: &'static [u8],
    /// Which virtio-net device to use (in discovery order).
    pub dev: u64,
    /// A `probe.net.` word could not be parsed (reported; the run fails).
    pub bad: bool,
}

/// The `probe.net.` words of the command line (unknown ones are ignored).
pub fn opts(cmdline: &'static [u8]) -> Opts {
    let mut o = Opts {
        ip: 0x0200_c80a,   // 10.200.0.2
        host: 0x0100_c80a, // 10.200.0.1
        port: 5000,
        count: None,
        size: 64,
        mac: None,
        interval_ms: 200,
        wait_ms: 5000,
        skip: b"",
        dev: 0,
        bad: false,
    };
    for w in cmdline.split(|&c| c == b' ') {
        let Some(opt) = w.strip_prefix(b"probe.net.") else {
            continue;
        };
        let v = |p: &[u8]| opt.strip_prefix(p);
        let parsed = if let Some(v) = v(b"ip=") {
            inet::parse_ip(v).map(|a| o.ip = a)
        } else if let Some(v) = v(b"host=") {
            inet::parse_ip(v).map(|a| o.host = a)
        } else if let Some(v) = v(b"port=") {
            crate::number(v)
                .and_then(|p| u16::try_from(p).ok())
                .map(|p| o.port = p)
        } else if let Some(v) = v(b"count=") {
            crate::number(v).map(|n| o.count = Some(n))
        } else if let Some(v) = v(b"size=") {
            crate::number(v).map(|n| o.size = n)
        } else if let Some(v) = v(b"mac=") {
            inet::parse_mac(v).map(|m| o.mac = Some(m))
        } else if let Some(v) = v(b"interval=") {
            crate::number(v).map(|n| o.interval_ms = n)
        } else if let Some(v) = v(b"wait=") {
            crate::number(v).map(|n| o.wait_ms = n)
        } else if let Some(v) = v(b"dev=") {
            crate::number(v).map(|n| o.dev = n)
        } else if let Some(v) = v(b"skip=") {
            o.skip = v;
            Some(())
        } else {
            Some(())
        };
        if parsed.is_none() {
            say!("probe: error net unparsable ", Text(w));
            o.bad = true;
        }
    }
    o
}

impl Opts {
    pub fn skipped(&self, case: &str) -> bool {
        self.skip
            .split(|&c| c == b',')
            .any(|c| c == case.as_bytes())
    }
}

static TSC_KHZ: Global<u64> = Global::new(0);

/// TSC ticks in `n` milliseconds: the hypervisor's TSC leaf (0x40000010), CPUID 0x15, 0x16,
/// else 2.5 GHz.
pub fn ms(n: u64) -> u64 {
    // SAFETY: BSP-only global.
    let cached = unsafe { *TSC_KHZ.get() };
    let khz = if cached != 0 {
        cached
    } else {
        let mut khz = 0u64;
        let hv = cpuid(0x4000_0000, 0)[0];
        if (0x4000_0010..0x4000_0100).contains(&hv) {
            khz = cpuid(0x4000_0010, 0)[0] as u64;
        }
        let max = cpuid(0, 0)[0];
        if khz == 0 && max >= 0x15 {
            let [a, b, c, _] = cpuid(0x15, 0);
            if a != 0 && b != 0 && c != 0 {
                khz = c as u64 * b as u64 / a as u64 / 1000;
            }
        }
        if khz == 0 && max >= 0x16 {
            khz = (cpuid(0x16, 0)[0] & 0xffff) as u64 * 1000;
        }
        if khz == 0 {
            khz = 2_500_000;
        }
        // SAFETY: as above.
        unsafe { *TSC_KHZ.get() = khz };
        khz
    };
    khz.saturating_mul(n)
}

/// Word-wise FNV-1a (`crate::fnv1a64w`) fed in pieces: the hash of their concatenation.
pub struct Fnv {
    h: u64,
    pend: u64,
    n: u32,
}

const FNV_PRIME: u64 = 0x0100_0000_01b3;

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv::new()
    }
}

impl Fnv {
    pub fn new() -> Fnv {
        Fnv {
            h: 0xcbf2_9ce4_8422_2325,
            pend: 0,
            n: 0,
        }
    }

    pub fn feed(&mut self, b: &[u8]) {
        let mut b = b;
        while self.n != 0 && !b.is_empty() {
            self.pend |= (b[0] as u64) << (8 * self.n);
            self.n = (self.n + 1) & 7;
            b = &b[1..];
            if self.n == 0 {
                self.h = (self.h ^ self.pend).wrapping_mul(FNV_PRIME);
                self.pend = 0;
            }
        }
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            // SAFETY: an 8-byte chunk.
            let v = unsafe { (w.as_ptr() as *const u64).read_unaligned() };
            self.h = (self.h ^ v).wrapping_mul(FNV_PRIME);
        }
        for &c in words.remainder() {
            self.pend |= (c as u64) << (8 * self.n);
            self.n += 1;
        }
    }

    pub fn finish(&self) -> u64 {
        if self.n != 0 {
            (self.h ^ self.pend).wrapping_mul(FNV_PRIME)
        } else {
            self.h
        }
    }
}

/// A transmit header: no GSO; with `csum`, NEEDS_CSUM and (csum_start, csum_offset).
fn write_hdr(h: u64, csum: Option<(u16, u16)>) {
    match csum {
        Some((start, off)) => {
            put64le(h, HDR_F_NEEDS_CSUM as u64 | (start as u64) << 48);
            put32le(h + 8, off as u32);
        }
        None => {
            put64le(h, 0);
            put32le(h + 8, 0);
        }
    }
}

/// A slice of guest memory (DMA buffers the probe owns).
pub(crate) fn mem(a: u64, len: u64) -> &'static [u8] {
    // SAFETY: callers pass buffers of their own, inside the identity map below 4 GiB.
    unsafe { core::slice::from_raw_parts(a as *const u8, len as usize) }
}

pub(crate) fn copy(dst: u64, src: u64, len: u64) {
    // SAFETY: callers copy between buffers of their own that do not overlap.
    unsafe { phys::memcpy(dst as *mut u8, src as *const u8, len as usize) };
}

/// The network device configuration the probe uses (section 5.1.4).
#[derive(Clone, Copy, Default)]
pub struct Config {
    pub mac: u64,
    pub status: u16,
    pub mtu: u16,
}

fn read_config(m: &Mmio) -> Config {
    let mut c = Config::default();
    for _ in 0..4 {
        let g = m.generation();
        let mut mac = 0u64;
        for k in 0..6 {
            mac |= m.cfg(k, 1) << (8 * k);
        }
        c = Config {
            mac,
            status: m.cfg(6, 2) as u16,
            mtu: m.cfg(10, 2) as u16,
        };
        if m.generation() == g {
            break;
        }
    }
    c
}

/// Where the device's queues and buffers live (allocated once, reused by every bring-up).
#[derive(Clone, Copy)]
pub struct NetMem {
    pub rxq: QueueMem,
    pub txq: QueueMem,
    pub ctrlq: QueueMem,
    /// QMAX receive buffers of `rx_len / QMAX` bytes at most.
    pub rx: u64,
    pub rx_len: u64,
    /// QMAX transmit slots of TX_SLOT bytes.
    pub tx: u64,
    /// One page for control commands.
    pub ctrl: u64,
    pub asm: u64,
}

#[derive(Clone, Copy, Default)]
pub struct RxStats {
    pub frames: u64,
    /// Frames that used more than one buffer.
    pub multi: u64,
    pub data_valid: u64,
    pub needs_csum: u64,
    pub bad_csum: u64,
    /// Frames too large to reassemble.
    pub dropped: u64,
}

/// A control command's outcome.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// The feature (or the control queue) was not negotiated.
    Unsupported,
    /// No completion.
    None,
    /// The ack byte the device wrote (0xff: not written).
    Byte(u8),
}

impl Emit for Ack {
    fn emit(&self) {
        match *self {
            Ack::Unsupported => "unsupported".emit(),
            Ack::None => "none".emit(),
            Ack::Byte(ACK_OK) => "ok".emit(),
            Ack::Byte(ACK_ERR) => "err".emit(),
            Ack::Byte(0xff) => "none".emit(), // completed without writing the ack
            Ack::Byte(b) => Hex(b as u64).emit(),
        }
    }
}

pub struct Net {
    pub index: usize,
    pub m: Mmio,
    pub offered: u64,
    pub features: u64,
    pub cfg: Config,
    pub mac: u64,
    pub mem: NetMem,
    pub rx: Queue,
    pub tx: Queue,
    pub ctrl: Option<Queue>,
    /// Bytes per receive buffer.
    pub rxbuf: u64,
    tx_free: [u16; QMAX as usize],
    tx_nfree: usize,
    tx_busy: [u64; QMAX as usize / 64],
    // The stack.
    pub ip: u32,
    pub host_ip: u32,
    pub host_mac: Option<u64>,
    echo_seq: u32,
    echo_got: bool,
    ident: u16,
    pub st: RxStats,
}

struct Up {
    offered: u64,
    features: u64,
    cfg: Config,
    rx: Queue,
    tx: Queue,
    ctrl: Option<Queue>,
    rxbuf: u64,
}

/// What the probe accepts of `offered`: WANTED, less the control features when there is no
/// control queue (they require it, section 5.1.3.1).
pub fn choose(offered: u64) -> u64 {
    let f = offered & WANTED;
    if f & F_CTRL_VQ == 0 {
        f & !(F_CTRL_RX | F_CTRL_MAC_ADDR)
    } else {
        f
    }
}

/// Receive buffer bytes: 512 with MRG_RXBUF, else header, Ethernet, a VLAN tag and the MTU
/// (1500 at least), in 64-byte units.
fn rx_buf_len(features: u64, mtu: u16) -> u64 {
    if features & F_MRG_RXBUF != 0 {
        return MRG_BUF;
    }
    let mtu = if features & F_MTU != 0 { mtu as u64 } else { 0 };
    (HDR + ETH + 4 + mtu.max(1500)).div_ceil(64) * 64
}

/// Reset, negotiation, configuration, the queues, receive buffers (`tiny`: 8 bytes each),
/// DRIVER_OK and the first receive notification.
fn bring_up(m: &Mmio, mem: &NetMem, tiny: bool) -> Result<Up, &'static str> {
    let (offered, features) = m.negotiate_with(choose)?;
    let cfg = read_config(m);
    let ev = features & F_EVENT_IDX != 0;
    let mut rx = m.queue_at(0, QMAX, mem.rxq, ev)?;
    let tx = m.queue_at(1, QMAX, mem.txq, ev)?;
    let ctrl = if features & F_CTRL_VQ != 0 {
        Some(m.queue_at(2, 64, mem.ctrlq, ev)?)
    } else {
        None
    };
    let rxbuf = if tiny {
        8
    } else {
        rx_buf_len(features, cfg.mtu)
    };
    if rxbuf * QMAX as u64 > mem.rx_len {
        return Err("receive buffers larger than the memory set aside");
    }
    for i in 0..rx.size {
        rx.set(i, mem.rx + i as u64 * rxbuf, rxbuf as u32, D_WRITE, 0);
        rx.push(i);
    }
    m.driver_ok()?;
    rx.kick();
    Ok(Up {
        offered,
        features,
        cfg,
        rx,
        tx,
        ctrl,
        rxbuf,
    })
}

fn wait_error(w: Wait) -> &'static str {
    match w {
        Wait::Timeout => "no completion within the time limit",
        Wait::NeedsReset => "device set DEVICE_NEEDS_RESET",
        Wait::Bad => "used index moved past the buffers made available",
    }
}

impl Net {
    pub fn open(index: usize, f: &Found, arena: &mut Arena, o: &Opts) -> Result<Net, &'static str> {
        let m = Mmio {
            base: f.base,
            size: f.size,
        };
        let oom = "out of memory for queues and buffers";
        let q = |a: &mut Arena| QueueMem::alloc(a).ok_or(oom);
        let (rxq, txq, ctrlq) = (q(arena)?, q(arena)?, q(arena)?);
        let tx = arena.alloc(QMAX as u64 * TX_SLOT, 4096).ok_or(oom)?;
        let ctrl = arena.alloc(4096, 4096).ok_or(oom)?;
        let asm = arena.alloc(ASM_MAX, 4096).ok_or(oom)?;
        // Room for the buffers the configured MTU calls for (read before negotiation: a
        // bring-up that would need more fails rather than overrun).
        let mtu = read_config(&m).mtu;
        let rx_len = QMAX as u64 * rx_buf_len(F_MTU, mtu).max(MRG_BUF);
        let rx = arena.alloc(rx_len, 4096).ok_or(oom)?;
        let mem = NetMem {
            rxq,
            txq,
            ctrlq,
            rx,
            rx_len,
            tx,
            ctrl,
            asm,
        };
        let up = bring_up(&m, &mem, false)?;
        let mac = if up.features & F_MAC != 0 {
            up.cfg.mac
        } else {
            o.mac.unwrap_or(DEFAULT_MAC)
        };
        let mut n = Net {
            index,
            m,
            offered: up.offered,
            features: up.features,
            cfg: up.cfg,
            mac,
            mem,
            rx: up.rx,
            tx: up.tx,
            ctrl: up.ctrl,
            rxbuf: up.rxbuf,
            tx_free: [0; QMAX as usize],
            tx_nfree: 0,
            tx_busy: [0; QMAX as usize / 64],
            ip: o.ip,
            host_ip: o.host,
            host_mac: None,
            echo_seq: u32::MAX,
            echo_got: false,
            ident: 0,
            st: RxStats::default(),
        };
        n.tx_reset();
        Ok(n)
    }

    /// Reset and the whole bring-up again (`tiny`: 8-byte receive buffers). The probe keeps
    /// the MAC it was using.
    pub fn reopen(&mut self, tiny: bool) -> Result<(), &'static str> {
        let up = bring_up(&self.m, &self.mem, tiny)?;
        self.offered = up.offered;
        self.features = up.features;
        self.cfg = up.cfg;
        self.rx = up.rx;
        self.tx = up.tx;
        self.ctrl = up.ctrl;
        self.rxbuf = up.rxbuf;
        self.tx_reset();
        Ok(())
    }

    fn tx_reset(&mut self) {
        let n = self.tx.size as usize;
        for (i, s) in self.tx_free[..n].iter_mut().enumerate() {
            *s = (n - 1 - i) as u16;
        }
        self.tx_nfree = n;
        self.tx_busy = [0; QMAX as usize / 64];
    }

    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    pub fn mrg(&self) -> bool {
        self.has(F_MRG_RXBUF)
    }

    pub fn line(&self) {
        "probe: net dev=".emit();
        Dec(self.index as u64).emit();
        " mac=".emit();
        Mac(self.mac).emit();
        " mtu=".emit();
        if self.has(F_MTU) {
            Dec(self.cfg.mtu as u64).emit();
        } else {
            "none".emit();
        }
        " link=".emit();
        if self.has(F_STATUS) {
            (if self.cfg.status & 1 != 0 {
                "up"
            } else {
                "down"
            })
            .emit();
        } else {
            "unknown".emit();
        }
        say!(
            " features=",
            Hex(self.features),
            " mrg_rxbuf=",
            Dec(self.mrg() as u64),
            " rxbuf=",
            Dec(self.rxbuf)
        );
    }

    /// The largest UDP payload the probe sends: the MTU (1500 without one) less IP and UDP
    /// headers, and what a transmit slot holds.
    pub fn max_payload(&self) -> u64 {
        let mtu = if self.has(F_MTU) {
            self.cfg.mtu as u64
        } else {
            1500
        };
        mtu.min(TX_SLOT - HDR - ETH).saturating_sub(IP + UDP)
    }

    // ---- transmit ----

    /// The frame of transmit slot `s` (after its header).
    pub fn frame_addr(&self, s: u16) -> u64 {
        self.mem.tx + s as u64 * TX_SLOT + HDR
    }

    /// Takes back the transmit slots the device has finished with.
    pub fn tx_reap(&mut self) -> Result<(), &'static str> {
        loop {
            let Some((id, _)) = self.tx.pop().map_err(wait_error)? else {
                return Ok(());
            };
            let (w, b) = (id as usize / 64, 1u64 << (id % 64));
            if id >= self.tx.size as u32 || self.tx_busy[w] & b == 0 {
                return Err("tx used ring names a descriptor not in flight");
            }
            self.tx_busy[w] &= !b;
            self.tx_free[self.tx_nfree] = id as u16;
            self.tx_nfree += 1;
        }
    }

    /// A free transmit slot, waiting (bounded) for one.
    pub fn tx_slot(&mut self) -> Result<u16, &'static str> {
        self.tx_reap()?;
        if self.tx_nfree == 0 {
            self.tx.wait_ready(virtio::WAIT).map_err(wait_error)?;
            self.tx_reap()?;
        }
        if self.tx_nfree == 0 {
            return Err("no transmit slot came back");
        }
        self.tx_nfree -= 1;
        Ok(self.tx_free[self.tx_nfree])
    }

    /// Sends slot `s` holding a frame of `len` bytes; `csum`: (csum_start, csum_offset) for
    /// VIRTIO_NET_HDR_F_NEEDS_CSUM.
    pub fn tx_send(&mut self, s: u16, len: u64, csum: Option<(u16, u16)>) {
        let h = self.frame_addr(s) - HDR;
        write_hdr(h, csum);
        self.tx.set(s, h, (HDR + len) as u32, 0, 0);
        self.tx_busy[s as usize / 64] |= 1 << (s % 64);
        self.tx.push(s);
        self.tx.kick();
    }

    /// Waits (bounded) until every transmit slot is back.
    pub fn tx_drain(&mut self) -> Result<(), &'static str> {
        let start = rdtsc();
        while self.tx_nfree < self.tx.size as usize {
            self.tx_reap()?;
            if rdtsc().wrapping_sub(start) > virtio::WAIT {
                return Err("transmit completions missing");
            }
        }
        Ok(())
    }

    // ---- receive ----

    /// The buffer of a used receive element, checked.
    fn rx_buf(&self, id: u32, len: u32) -> Result<u64, &'static str> {
        if id >= self.rx.size as u32 {
            return Err("rx used ring names a descriptor out of the queue");
        }
        if len as u64 > self.rxbuf {
            return Err("rx used length larger than the buffer");
        }
        Ok(self.mem.rx + id as u64 * self.rxbuf)
    }

    /// Handles every frame the device has returned (ARP and ICMP here; the payload of each
    /// UDP datagram to GUEST_PORT goes to `udp`), reposts the buffers and notifies once.
    /// Returns the frames seen.
    pub fn poll(&mut self, udp: &mut dyn FnMut(&[u8])) -> Result<u32, &'static str> {
        let mut left = self.rx.ready().map_err(wait_error)?;
        if left == 0 {
            return Ok(0);
        }
        let mut frames = 0;
        while left > 0 {
            let (id, len) = self.rx.take();
            left -= 1;
            self.rx_one(id, len, &mut left, udp)?;
            frames += 1;
        }
        self.rx.kick();
        Ok(frames)
    }

    /// One used receive element (and, for a merged frame, the `num_buffers - 1` after it,
    /// taken from `left` or waited for): handled and reposted.
    fn rx_one(
        &mut self,
        id: u32,
        len: u32,
        left: &mut u16,
        udp: &mut dyn FnMut(&[u8]),
    ) -> Result<(), &'static str> {
        let b = self.rx_buf(id, len)?;
        let len = len as u64;
        let nb = if self.mrg() { phys::rd16(b + 10) } else { 1 };
        let hdr = phys::rd64(b);
        let csum_off = phys::rd16(b + 8);
        if nb <= 1 {
            if len >= HDR {
                self.frame(b + HDR, len - HDR, hdr, csum_off, udp);
            }
            self.rx.push(id as u16);
            return Ok(());
        }
        if nb > self.rx.size {
            return Err("rx num_buffers larger than the queue");
        }
        self.st.multi += 1;
        let a = self.mem.asm;
        let mut total = len.saturating_sub(HDR);
        copy(a, b + HDR, total);
        self.rx.push(id as u16);
        let mut fits = true;
        for _ in 1..nb {
            if *left == 0 {
                *left = self
                    .rx
                    .wait_ready(ms(100))
                    .map_err(|_| "rx buffers of a merged frame missing")?;
            }
            let (id, l) = self.rx.take();
            *left -= 1;
            let b = self.rx_buf(id, l)?;
            if total + l as u64 <= ASM_MAX {
                copy(a + total, b, l as u64);
                total += l as u64;
            } else {
                fits = false;
            }
            self.rx.push(id as u16);
        }
        if fits {
            self.frame(a, total, hdr, csum_off, udp);
        } else {
            self.st.dropped += 1;
        }
        Ok(())
    }

    fn frame(&mut self, f: u64, len: u64, hdr: u64, csum_off: u16, udp: &mut dyn FnMut(&[u8])) {
        self.st.frames += 1;
        if len < ETH {
            return;
        }
        let dst = get_mac(f);
        if dst != self.mac && dst != BROADCAST {
            return;
        }
        match get16(f + 12) {
            ETHERTYPE_ARP => self.arp_in(f, len),
            ETHERTYPE_IPV4 => self.ipv4_in(f, len, hdr, csum_off, udp),
            _ => {}
        }
    }

    fn arp_in(&mut self, f: u64, len: u64) {
        if len < ETH + 28 {
            return;
        }
        let a = f + ETH;
        // Ethernet (1), IPv4 (0x0800), 6-byte and 4-byte addresses.
        if phys::rd32(a) != 0x0008_0100 || phys::rd16(a + 4) != 0x0406 {
            return;
        }
        let op = get16(a + 6);
        let (sha, spa, tpa) = (get_mac(a + 8), phys::rd32(a + 14), phys::rd32(a + 24));
        if spa == self.host_ip && (op == 2 || tpa == self.ip) {
            self.host_mac = Some(sha);
        }
        if op == 1 && tpa == self.ip {
            // Dropped if no transmit slot comes back.
            let _ = self.send_arp(2, sha, sha, spa);
        }
    }

    pub fn send_arp(&mut self, op: u16, dst: u64, tha: u64, tpa: u32) -> Result<(), &'static str> {
        let s = self.tx_slot()?;
        let f = self.frame_addr(s);
        inet::eth(f, dst, self.mac, ETHERTYPE_ARP);
        let a = f + ETH;
        put32le(a, 0x0008_0100);
        put16le(a + 4, 0x0406);
        put16(a + 6, op);
        put_mac(a + 8, self.mac);
        put32le(a + 14, self.ip);
        put_mac(a + 18, tha);
        put32le(a + 24, tpa);
        // Padding to the 60-byte minimum.
        put64le(a + 28, 0);
        put64le(a + 36, 0);
        put16le(a + 44, 0);
        self.tx_send(s, 60, None);
        Ok(())
    }

    fn ipv4_in(&mut self, f: u64, len: u64, hdr: u64, csum_off: u16, udp: &mut dyn FnMut(&[u8])) {
        if len < ETH + IP {
            return;
        }
        let p = f + ETH;
        let vi = phys::rd8(p);
        let ihl = (vi & 15) as u64 * 4;
        let total = get16(p + 2) as u64;
        if vi >> 4 != 4 || ihl < IP || total < ihl || ETH + total > len {
            return;
        }
        // Fragments, other destinations, bad header checksums.
        if get16(p + 6) & 0x3fff != 0 || phys::rd32(p + 16) != self.ip {
            return;
        }
        if inet::fold(inet::sum(p, ihl, 0)) != 0xffff {
            return;
        }
        let src = phys::rd32(p + 12);
        let (l4, l4len) = (p + ihl, total - ihl);
        match phys::rd8(p + 9) {
            PROTO_ICMP => self.icmp_in(f, l4, l4len, hdr as u8),
            PROTO_UDP => self.udp_in(f, l4, l4len, src, hdr, csum_off, udp),
            _ => {}
        }
    }

    fn icmp_in(&mut self, f: u64, l4: u64, l4len: u64, flags: u8) {
        if l4len < ICMP {
            return;
        }
        if flags & (HDR_F_DATA_VALID | HDR_F_NEEDS_CSUM) == 0
            && inet::fold(inet::sum(l4, l4len, 0)) != 0xffff
        {
            return;
        }
        match phys::rd8(l4) {
            8 => {
                let _ = self.echo_reply(f, l4 - f + l4len, l4 - f);
            }
            0 => {
                if get16(l4 + 4) == ICMP_ID && get16(l4 + 6) as u32 == self.echo_seq {
                    self.echo_got = true;
                }
            }
            _ => {}
        }
    }

    /// Answers the echo request in frame `f` (`len` bytes, ICMP at `icmp`).
    fn echo_reply(&mut self, f: u64, len: u64, icmp: u64) -> Result<(), &'static str> {
        if len > TX_SLOT - HDR {
            return Ok(());
        }
        let s = self.tx_slot()?;
        let o = self.frame_addr(s);
        copy(o, f, len);
        put_mac(o, get_mac(f + 6));
        put_mac(o + 6, self.mac);
        // Swapping the addresses leaves the IP header checksum as it is.
        put32le(o + ETH + 12, self.ip);
        put32le(o + ETH + 16, phys::rd32(f + ETH + 12));
        let c = o + icmp;
        put16le(c, 0); // type 0 (echo reply), code 0
        put16le(c + 2, 0);
        put16le(c + 2, inet::csum(c, len - icmp, 0));
        self.tx_send(s, len, None);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn udp_in(
        &mut self,
        f: u64,
        l4: u64,
        l4len: u64,
        src: u32,
        hdr: u64,
        csum_off: u16,
        udp: &mut dyn FnMut(&[u8]),
    ) {
        if l4len < UDP || get16(l4 + 2) != GUEST_PORT {
            return;
        }
        let ulen = get16(l4 + 4) as u64;
        if ulen < UDP || ulen > l4len {
            return;
        }
        let flags = hdr as u8;
        if flags & HDR_F_NEEDS_CSUM != 0 {
            // Finish the partial checksum: from csum_start to the end of the packet, stored
            // at csum_start + csum_offset.
            let (start, off) = ((hdr >> 48) as u64, csum_off as u64);
            let end = l4 + l4len - f;
            if start < ETH + IP || start + off + 2 > end {
                self.st.bad_csum += 1;
                return;
            }
            put16le(f + start + off, inet::udp_csum(f + start, end - start, 0));
            self.st.needs_csum += 1;
        } else if flags & HDR_F_DATA_VALID != 0 {
            self.st.data_valid += 1;
        } else if phys::rd16(l4 + 6) != 0 {
            let ps = inet::pseudo(src, self.ip, PROTO_UDP, ulen);
            if inet::fold(inet::sum(l4, ulen, ps)) != 0xffff {
                self.st.bad_csum += 1;
                return;
            }
        }
        udp(mem(l4 + UDP, ulen - UDP));
    }

    /// Polls until `done` or `ticks` have passed; whether `done` held.
    pub fn run_until(
        &mut self,
        ticks: u64,
        udp: &mut dyn FnMut(&[u8]),
        done: &mut dyn FnMut(&Net) -> bool,
    ) -> Result<bool, &'static str> {
        let start = rdtsc();
        loop {
            if done(self) {
                return Ok(true);
            }
            if self.poll(udp)? == 0 {
                for _ in 0..32 {
                    if self.rx.ready().map_err(wait_error)? != 0 {
                        break;
                    }
                }
                if rdtsc().wrapping_sub(start) >= ticks {
                    return Ok(done(self));
                }
            }
        }
    }

    // ---- ARP, ICMP, UDP ----

    /// Resolves the host's MAC (three requests, a second each); prints the arp line.
    pub fn arp(&mut self) -> Result<bool, &'static str> {
        self.host_mac = None;
        for _ in 0..3 {
            self.send_arp(1, BROADCAST, 0, self.host_ip)?;
            if self.run_until(ms(1000), &mut |_| {}, &mut |n| n.host_mac.is_some())? {
                break;
            }
        }
        "probe: net arp host=".emit();
        Ip(self.host_ip).emit();
        match self.host_mac {
            Some(m) => say!(" mac=", Mac(m)),
            None => say!(" timeout"),
        }
        Ok(self.host_mac.is_some())
    }

    fn send_echo(&mut self, seq: u16) -> Result<(), &'static str> {
        let s = self.tx_slot()?;
        let f = self.frame_addr(s);
        let len = ICMP + ECHO_DATA;
        inet::eth(
            f,
            self.host_mac.unwrap_or(BROADCAST),
            self.mac,
            ETHERTYPE_IPV4,
        );
        self.ident = self.ident.wrapping_add(1);
        inet::ipv4(f + ETH, PROTO_ICMP, len, self.ip, self.host_ip, self.ident);
        let c = f + ETH + IP;
        put64le(
            c,
            8 | (ICMP_ID.swap_bytes() as u64) << 32 | (seq.swap_bytes() as u64) << 48,
        );
        for k in 0..ECHO_DATA / 8 {
            put64le(
                c + ICMP + 8 * k,
                0x0706_0504_0302_0100 + k * 0x0808_0808_0808_0808,
            );
        }
        put16le(c + 2, inet::csum(c, len, 0));
        self.tx_send(s, ETH + IP + len, None);
        Ok(())
    }

    /// `count` echo requests to the host, `interval` ticks apart (answering whatever comes
    /// meanwhile); prints a line per request and the summary. Returns the replies.
    pub fn ping(&mut self, count: u64, interval: u64) -> Result<u64, &'static str> {
        let mut received = 0;
        for seq in 1..=count {
            let t0 = rdtsc();
            self.echo_seq = seq as u16 as u32;
            self.echo_got = false;
            self.send_echo(seq as u16)?;
            let got = self.run_until(ms(1000), &mut |_| {}, &mut |n| n.echo_got)?;
            let t = if got { rdtsc().wrapping_sub(t0) } else { 0 };
            say!(
                "probe: net ping seq=",
                Dec(seq),
                " reply=",
                if got { "yes" } else { "no" },
                " tsc=",
                Dec(t)
            );
            received += got as u64;
            if seq < count {
                let left = interval.saturating_sub(rdtsc().wrapping_sub(t0));
                self.run_until(left, &mut |_| {}, &mut |_| false)?;
            }
        }
        self.echo_seq = u32::MAX;
        say!(
            "probe: net ping sent=",
            Dec(count),
            " received=",
            Dec(received)
        );
        Ok(received)
    }

    /// Eth, IPv4 and UDP headers (GUEST_PORT to the host's `port`) for `plen` payload bytes
    /// at frame `f`, and the checksum: the pseudo-header sum and (csum_start, csum_offset)
    /// with CSUM, else the whole checksum.
    pub fn udp_frame(&mut self, f: u64, plen: u64, port: u16) -> Option<(u16, u16)> {
        inet::eth(
            f,
            self.host_mac.unwrap_or(BROADCAST),
            self.mac,
            ETHERTYPE_IPV4,
        );
        self.ident = self.ident.wrapping_add(1);
        let ulen = UDP + plen;
        inet::ipv4(f + ETH, PROTO_UDP, ulen, self.ip, self.host_ip, self.ident);
        let u = f + ETH + IP;
        put64le(
            u,
            GUEST_PORT.swap_bytes() as u64
                | (port.swap_bytes() as u64) << 16
                | ((ulen as u16).swap_bytes() as u64) << 32,
        );
        let ps = inet::pseudo(self.ip, self.host_ip, PROTO_UDP, ulen);
        if self.has(F_CSUM) {
            put16le(u + 6, inet::fold(ps));
            Some(((ETH + IP) as u16, 6))
        } else {
            put16le(u + 6, inet::udp_csum(u, ulen, ps));
            None
        }
    }

    // ---- control queue ----

    /// Posts `chain` (descriptors 0.., head 0) on the control queue and waits (bounded,
    /// watching DEVICE_NEEDS_RESET): the used length, or None without a completion.
    pub fn ctrl_chain(
        &mut self,
        chain: &[(u64, u32, u16, u16)],
    ) -> Result<Option<u32>, &'static str> {
        let m = self.m;
        let Some(q) = self.ctrl.as_mut() else {
            return Err("no control queue");
        };
        for (k, &(a, l, fl, nx)) in chain.iter().enumerate() {
            q.set(k as u16, a, l, fl, nx);
        }
        q.push(0);
        q.kick();
        match q.wait(Some(&m), virtio::WAIT) {
            Ok((0, len)) => Ok(Some(len)),
            Ok(_) => Err("ctrl used ring names a descriptor not in flight"),
            Err(Wait::Bad) => Err("ctrl used index moved past the command posted"),
            Err(_) => Ok(None),
        }
    }

    /// One control command: header, `data`, ack.
    pub fn ctrl_cmd(&mut self, class: u8, cmd: u8, data: &[u8]) -> Result<Ack, &'static str> {
        if self.ctrl.is_none() {
            return Ok(Ack::Unsupported);
        }
        let c = self.mem.ctrl;
        let n = data.len().min(56) as u64;
        put16le(c, class as u16 | (cmd as u16) << 8);
        // SAFETY: the control page is ours.
        unsafe {
            phys::memcpy((c + CTRL_DATA) as *mut u8, data.as_ptr(), n as usize);
            ((c + CTRL_ACK) as *mut u8).write_volatile(0xff);
        }
        let r = self.ctrl_chain(&[
            (c, 2, D_NEXT, 1),
            (c + CTRL_DATA, n as u32, D_NEXT, 2),
            (c + CTRL_ACK, 1, D_WRITE, 0),
        ])?;
        Ok(match r {
            Some(_) => Ack::Byte(phys::rd8(c + CTRL_ACK)),
            None => Ack::None,
        })
    }

    // ---- net-bench ----

    /// Sends `count` copies of one UDP datagram of `size` bytes as fast as the device takes
    /// them: every transmit descriptor points at the same frame, each completion is made
    /// available again at once, one notification (when the device asks) per batch. Returns
    /// the datagrams sent.
    pub fn tx_flood(&mut self, count: u64, size: u64, port: u16) -> Result<u64, &'static str> {
        self.tx_drain()?;
        let f = self.frame_addr(0);
        // SAFETY: slot 0's frame.
        unsafe { phys::memset((f + ETH + IP + UDP) as *mut u8, 0x5a, size as usize) };
        let cs = self.udp_frame(f, size, port);
        write_hdr(f - HDR, cs);
        let len = ETH + IP + UDP + size;
        let q = &mut self.tx;
        let qn = q.size;
        for i in 0..qn {
            q.set(i, f - HDR, (HDR + len) as u32, 0, 0);
        }
        let mut queued = count.min(qn as u64);
        for i in 0..queued {
            q.push(i as u16);
        }
        q.kick();
        let mut done = 0;
        while done < count {
            let k = q.wait_ready(ms(2000)).map_err(wait_error)?;
            let again = (count - queued).min(k as u64) as u16;
            if q.recycle(again, |_, _| true) != again {
                return Err("tx used ring names a descriptor out of the queue");
            }
            q.discard(k - again);
            queued += again as u64;
            done += k as u64;
            q.kick();
        }
        // Every descriptor is back; the slots are free again.
        self.tx_reset();
        Ok(done)
    }

    /// `rx_flood`'s usual case, up to `n` (> 0) used elements: a datagram to GUEST_PORT
    /// (IPv4 without options) counted from the headers in its first buffer, each of its
    /// buffers made available again at once. With MRG_RXBUF a datagram's `num_buffers`
    /// elements must all be among the `n`. Stops at the first element that is anything else
    /// (left for the stack). Returns (elements taken, datagrams, sum of their UDP lengths).
    /// About 27 instructions per datagram in one buffer, 8 per further buffer (every one is
    /// emulated).
    fn rx_fast(&mut self, n: u16) -> (u16, u64, u64) {
        let (used, avail, last, ai) = self.rx.rings();
        let mask = (self.rx.size - 1) as u64;
        let (start, end) = (last as u64, last as u64 + n as u64);
        let delta = ai.wrapping_sub(last) as u64;
        let (rx, rxbuf) = (self.mem.rx, self.rxbuf);
        let (mut at, mut frames, mut sum) = (start, 0u64, 0u64);
        // Registers: used entries, avail entries, mask, index, avail - used index, buffers,
        // buffer size, end index, datagrams, sum of UDP lengths. Buffer offsets: header 0
        // (num_buffers at 10), frame 12. An id past the queue ends the loop, except inside a
        // merged frame, where it is masked (the bench counts, it does not judge).
        macro_rules! fast {
            ($($tail:literal),*) => {
                // SAFETY: reads the used ring and the receive buffers, writes avail entries;
                // all of them ours, indices masked, ids checked against the mask.
                unsafe {
                    core::arch::asm!(
                        "2:",
                        "mov eax, {i:e}",
                        "and eax, {mask:e}",
                        "mov rdx, [{used} + rax * 8]",
                        "cmp edx, {mask:e}",
                        "ja 3f",
                        "cmp rdx, {minlen}",
                        "jb 3f",
                        "mov eax, edx",
                        "imul rax, {bsz}",
                        "mov ecx, [rax + {rx} + 24]",
                        "shl ecx, 8",
                        "cmp ecx, 0x45000800",
                        "jne 3f",
                        "cmp byte ptr [rax + {rx} + 35], 17",
                        "jne 3f",
                        "cmp word ptr [rax + {rx} + 48], {port}",
                        "jne 3f",
                        $($tail,)*
                        "3:",
                        i = inout(reg) at,
                        frames = inout(reg) frames,
                        sum = inout(reg) sum,
                        mask = in(reg) mask,
                        used = in(reg) used,
                        avail = in(reg) avail,
                        delta = in(reg) delta,
                        rx = in(reg) rx,
                        bsz = in(reg) rxbuf,
                        end = in(reg) end,
                        minlen = in(reg) (HDR + ETH + IP + UDP) << 32,
                        port = const GUEST_PORT.swap_bytes(),
                        out("rax") _,
                        out("rcx") _,
                        out("rdx") _,
                        out("r8") _,
                        options(nostack),
                    );
                }
            };
        }
        if self.mrg() {
            // num_buffers (r8) in 1..: the datagram is left alone unless all its buffers are
            // in this batch; the first buffer's head goes back, then the others'.
            fast!(
                "movzx r8d, word ptr [rax + {rx} + 10]",
                "test r8d, r8d",
                "jz 3f",
                "lea rcx, [{i} + r8]",
                "cmp rcx, {end}",
                "ja 3f",
                "movzx ecx, word ptr [rax + {rx} + 50]",
                "rol cx, 8",
                "add {sum}, rcx",
                "inc {frames}",
                "4:",
                "lea rax, [{i} + {delta}]",
                "and eax, {mask:e}",
                "mov [{avail} + rax * 2], dx",
                "inc {i}",
                "dec r8d",
                "jz 5f",
                "mov eax, {i:e}",
                "and eax, {mask:e}",
                "mov rdx, [{used} + rax * 8]",
                "and edx, {mask:e}",
                "jmp 4b",
                "5:",
                "cmp {i}, {end}",
                "jne 2b"
            );
        } else {
            fast!(
                "movzx ecx, word ptr [rax + {rx} + 50]",
                "rol cx, 8",
                "add {sum}, rcx",
                "inc {frames}",
                "lea rax, [{i} + {delta}]",
                "and eax, {mask:e}",
                "mov [{avail} + rax * 2], dx",
                "inc {i}",
                "cmp {i}, {end}",
                "jne 2b"
            );
        }
        let k = at.wrapping_sub(start) as u16;
        self.rx.advance(k);
        (k, frames, sum)
    }

    /// Counts UDP datagrams to GUEST_PORT until `count` or 3 s of silence after the first
    /// (10 s before it). A datagram in one buffer is counted from its headers alone (no
    /// checksum check); anything else goes through the stack. Returns (datagrams, payload
    /// bytes, ticks from the first batch to the last).
    pub fn rx_flood(&mut self, count: u64) -> Result<(u64, u64, u64), &'static str> {
        let (mut frames, mut bytes) = (0u64, 0u64);
        let (start, mut first, mut last) = (rdtsc(), 0u64, 0u64);
        loop {
            let mut left = self.rx.ready().map_err(wait_error)?;
            if left == 0 {
                for _ in 0..64 {
                    if self.rx.ready().map_err(wait_error)? != 0 {
                        break;
                    }
                }
            }
            let before = frames;
            while left > 0 {
                let (k, dgrams, ulens) = self.rx_fast(left);
                frames += dgrams;
                bytes += ulens.saturating_sub(UDP * dgrams);
                left -= k;
                if left > 0 {
                    let (id, len) = self.rx.take();
                    left -= 1;
                    // Anything else goes through the stack.
                    let (mut n, mut nb) = (0u64, 0u64);
                    self.rx_one(id, len, &mut left, &mut |p| {
                        n += 1;
                        nb += p.len() as u64;
                    })?;
                    frames += n;
                    bytes += nb;
                }
                if left == 0 {
                    self.rx.kick();
                }
            }
            let now = rdtsc();
            if frames > before {
                last = now;
                if before == 0 {
                    first = now;
                }
            }
            // Silence: no datagram (other frames do not count).
            let quiet = if frames == 0 {
                now.wrapping_sub(start) > ms(10_000)
            } else {
                now.wrapping_sub(last) > ms(3000)
            };
            if frames >= count || quiet {
                break;
            }
        }
        Ok((frames, bytes, last.wrapping_sub(first)))
    }
}

/// The modern net devices found, the first opened (its line printed).
pub fn setup(cmdline: &[u8], o: &Opts, arena: &mut Arena) -> Option<Net> {
    let devs = virtio::discover(cmdline);
    if devs.bad {
        return None;
    }
    let f = devs
        .all()
        .iter()
        .filter(|f| f.usable && f.id == DEVICE_ID_NET && f.version == 2)
        .nth(o.dev as usize);
    let Some(f) = f else {
        say!(
            "probe: error net no modern virtio-net device number ",
            Dec(o.dev)
        );
        return None;
    };
    match Net::open(o.dev as usize, f, arena, o) {
        Ok(n) => {
            n.line();
            Some(n)
        }
        Err(e) => {
            say!("probe: error net dev=", Dec(o.dev), " ", e);
            None
        }
    }
}

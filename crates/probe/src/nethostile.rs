//! `probe.mode=net-hostile`: chains a correct virtio-net driver never posts, each on a freshly
//! reset and renegotiated device, each reported with what the device did (used-ring
//! completion and length, control ack, device status); then a reset, a normal negotiation and
//! a ping, to show the device recovered.
//!
//! Cases: `tx-short-header` (a transmit chain of one 4-byte descriptor), `tx-header-writable`
//! (header and frame in device-writable descriptors), `tx-addr-outside-ram` (the frame's
//! descriptor points past RAM), `tx-too-long` (a 70000-byte frame), `rx-tiny-buffers` (every
//! receive buffer 8 bytes, then up to `probe.net.wait` ms for a frame from the host),
//! `ctrl-bad-length` (VIRTIO_NET_CTRL_RX_PROMISC without its data byte), `ctrl-unknown-class`
//! (class 0x77). Frames the probe makes up are addressed to its own MAC with the local
//! experimental ethertype, so nothing on the host takes them.

use crate::inet::{self, ETHERTYPE_LOCAL};
use crate::net::{self, Ack, Net, CTRL_ACK, CTRL_DATA, CTRL_RX, CTRL_RX_PROMISC, HDR};
use crate::phys::{self, Arena};
use crate::say;
use crate::serial::{Dec, Hex};
use crate::virtio::{self, Wait, D_NEXT, D_WRITE, S_NEEDS_RESET};

const SHORT: u64 = 60;
const LONG: u64 = 70_000;
/// Scratch: header at +0, a short frame at +64, the long frame at +4096.
const SCRATCH: u64 = 4096 + LONG + 4096;

fn report(n: &Net, name: &str, completed: Option<u32>, ack: Ack) {
    let s = n.m.status();
    say!(
        "probe: net-hostile case=",
        name,
        " completed=",
        if completed.is_some() { "yes" } else { "no" },
        " len=",
        Dec(completed.unwrap_or(0) as u64),
        " ack=",
        ack,
        " device_status=",
        Hex(s as u64),
        " needs_reset=",
        Dec((s & S_NEEDS_RESET != 0) as u64)
    );
}

/// Prints the skipped line for a case `probe.net.skip` names.
fn skipped(o: &net::Opts, name: &str) -> bool {
    let s = o.skipped(name);
    if s {
        say!("probe: net-hostile case=", name, " skipped");
    }
    s
}

/// The outcome of a wait on one chain: the used length, None without a completion.
fn outcome(name: &str, r: Result<(u32, u32), Wait>) -> Option<u32> {
    match r {
        Ok((_, len)) => Some(len),
        Err(Wait::Bad) => {
            say!(
                "probe: error net-hostile case=",
                name,
                " used index moved past the chain posted"
            );
            None
        }
        Err(_) => None,
    }
}

/// One transmit chain (descriptors 0.., head 0) on a fresh device.
fn tx_case(
    n: &mut Net,
    o: &net::Opts,
    name: &str,
    chain: &[(u64, u32, u16, u16)],
) -> Result<(), &'static str> {
    if skipped(o, name) {
        return Ok(());
    }
    n.reopen(false)?;
    for (k, &(a, l, f, nx)) in chain.iter().enumerate() {
        n.tx.set(k as u16, a, l, f, nx);
    }
    n.tx.push(0);
    n.tx.kick();
    let r = n.tx.wait(Some(&n.m), virtio::WAIT);
    report(n, name, outcome(name, r), Ack::None);
    n.m.reset();
    Ok(())
}

/// One control chain on a fresh device; the ack byte starts as 0xff.
fn ctrl_case(
    n: &mut Net,
    o: &net::Opts,
    name: &str,
    chain: &[(u64, u32, u16, u16)],
) -> Result<(), &'static str> {
    if skipped(o, name) {
        return Ok(());
    }
    if n.ctrl.is_none() {
        say!("probe: net-hostile case=", name, " skipped=no-ctrl-vq");
        return Ok(());
    }
    n.reopen(false)?;
    let c = n.mem.ctrl;
    // SAFETY: the control page is ours.
    unsafe { ((c + CTRL_ACK) as *mut u8).write_volatile(0xff) };
    let r = n.ctrl_chain(chain)?;
    let ack = match r {
        Some(_) => Ack::Byte(phys::rd8(c + CTRL_ACK)),
        None => Ack::None,
    };
    report(n, name, r, ack);
    n.m.reset();
    Ok(())
}

fn cases(n: &mut Net, o: &net::Opts, scratch: u64) -> Result<(), &'static str> {
    phys::zero(scratch, SCRATCH);
    let (h, short, long) = (scratch, scratch + 64, scratch + 4096);
    inet::eth(short, n.mac, n.mac, ETHERTYPE_LOCAL);
    inet::eth(long, n.mac, n.mac, ETHERTYPE_LOCAL);
    let far = crate::hostile::outside_ram();

    tx_case(n, o, "tx-short-header", &[(h, 4, 0, 0)])?;
    tx_case(
        n,
        o,
        "tx-header-writable",
        &[
            (h, HDR as u32, D_NEXT | D_WRITE, 1),
            (short, SHORT as u32, D_WRITE, 0),
        ],
    )?;
    tx_case(
        n,
        o,
        "tx-addr-outside-ram",
        &[(h, HDR as u32, D_NEXT, 1), (far, SHORT as u32, 0, 0)],
    )?;
    tx_case(
        n,
        o,
        "tx-too-long",
        &[(h, HDR as u32, D_NEXT, 1), (long, LONG as u32, 0, 0)],
    )?;

    // Every receive buffer too small for the header; then whatever the host sends.
    let name = "rx-tiny-buffers";
    if !skipped(o, name) {
        n.reopen(true)?;
        let r = n.rx.wait(Some(&n.m), net::ms(o.wait_ms));
        report(n, name, outcome(name, r), Ack::None);
        n.m.reset();
    }

    let c = n.mem.ctrl;
    inet::put16le(c, CTRL_RX as u16 | (CTRL_RX_PROMISC as u16) << 8);
    ctrl_case(
        n,
        o,
        "ctrl-bad-length",
        &[(c, 2, D_NEXT, 1), (c + CTRL_ACK, 1, D_WRITE, 0)],
    )?;
    inet::put16le(c, 0x77);
    // SAFETY: the control page is ours.
    unsafe { ((c + CTRL_DATA) as *mut u8).write_volatile(1) };
    ctrl_case(
        n,
        o,
        "ctrl-unknown-class",
        &[
            (c, 2, D_NEXT, 1),
            (c + CTRL_DATA, 1, D_NEXT, 2),
            (c + CTRL_ACK, 1, D_WRITE, 0),
        ],
    )?;
    Ok(())
}

pub fn run(cmdline: &'static [u8]) -> bool {
    let o = net::opts(cmdline);
    let mut arena = Arena::new(crate::bootinfo::get());
    let Some(mut n) = net::setup(cmdline, &o, &mut arena) else {
        return false;
    };
    let mut ok = !o.bad;
    match arena.alloc(SCRATCH, 4096) {
        Some(scratch) => {
            if let Err(e) = cases(&mut n, &o, scratch) {
                say!("probe: error net-hostile ", e);
                ok = false;
            }
        }
        None => {
            say!("probe: error net-hostile no memory");
            ok = false;
        }
    }
    let rec = n
        .reopen(false)
        .and_then(|()| crate::netmodes::arp_and_ping(&mut n, &o, o.count.unwrap_or(3)));
    let rec = match rec {
        Ok(r) => r,
        Err(e) => {
            say!("probe: error net-hostile recovery: ", e);
            false
        }
    };
    say!(
        "probe: net-hostile recovery=",
        if rec { "ok" } else { "failed" }
    );
    n.m.reset();
    ok && rec
}

//! The virtio-net modes of the probe guest: ping, UDP out and back, control queue, the
//! benchmark and the idle check, on the driver and stack in `net.rs`.

use core::cell::Cell;

use crate::inet::{put64le, ETH, IP, UDP};
use crate::net::*;
use crate::phys::{self, rdtsc, Arena};
use crate::say;
use crate::serial::{Dec, Hex16};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ping,
    Udp,
    Ctrl,
    Bench,
    Idle,
}

/// `probe.mode=net-ping|net-udp|net-ctrl|net-bench`. Returns false when anything failed.
pub fn run(mode: Mode, cmdline: &'static [u8]) -> bool {
    let o = opts(cmdline);
    let mut arena = Arena::new(crate::bootinfo::get());
    let Some(mut n) = setup(cmdline, &o, &mut arena) else {
        return false;
    };
    let r = match mode {
        Mode::Ping => ping_mode(&mut n, &o),
        Mode::Udp => udp_mode(&mut n, &o, &mut arena),
        Mode::Ctrl => ctrl_mode(&mut n, &o),
        Mode::Bench => bench_mode(&mut n, &o),
        Mode::Idle => idle_mode(&mut n, &o),
    };
    n.m.reset();
    match r {
        Ok(ok) => ok && !o.bad,
        Err(e) => {
            say!("probe: error net ", e);
            false
        }
    }
}

/// ARP, then the pings; false (with an error line) unless every request got its reply.
pub fn arp_and_ping(n: &mut Net, o: &Opts, count: u64) -> Result<bool, &'static str> {
    if !n.arp()? {
        say!("probe: error net arp: no reply from the host");
        return Ok(false);
    }
    let got = n.ping(count, ms(o.interval_ms))?;
    if got != count {
        say!(
            "probe: error net ping: ",
            Dec(count - got),
            " requests unanswered"
        );
    }
    Ok(got == count)
}

/// `net-idle`: after ARP, stops reading the receive ring for `probe.net.wait` ms while the
/// host sends (the posted buffers fill up and the device must hold the rest), then counts
/// the UDP datagrams that still arrive, until `count` or 2 s of silence.
fn idle_mode(n: &mut Net, o: &Opts) -> Result<bool, &'static str> {
    if !n.arp()? {
        say!("probe: error net arp: no reply from the host");
        return Ok(false);
    }
    say!("probe: net-idle start");
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < ms(o.wait_ms) {
        core::hint::spin_loop();
    }
    say!("probe: net-idle resume");
    let want = o.count.unwrap_or(u64::MAX);
    let got = Cell::new(0u64);
    let bytes = Cell::new(0u64);
    loop {
        let before = got.get();
        let done = n.run_until(
            ms(2000),
            &mut |p: &[u8]| {
                got.set(got.get() + 1);
                bytes.set(bytes.get() + p.len() as u64);
            },
            &mut |_| got.get() >= want,
        )?;
        if done || got.get() == before {
            break;
        }
    }
    say!(
        "probe: net-idle received=",
        Dec(got.get()),
        " bytes=",
        Dec(bytes.get())
    );
    Ok(true)
}

fn ping_mode(n: &mut Net, o: &Opts) -> Result<bool, &'static str> {
    arp_and_ping(n, o, o.count.unwrap_or(3))
}

fn ctrl_mode(n: &mut Net, o: &Opts) -> Result<bool, &'static str> {
    let new = o.mac.unwrap_or(n.mac ^ 0x0100_0000_0000);
    let set = if n.has(F_CTRL_MAC_ADDR) {
        let b = new.to_le_bytes();
        let a = n.ctrl_cmd(CTRL_MAC, CTRL_MAC_ADDR_SET, &b[..6])?;
        if a == Ack::Byte(ACK_OK) {
            n.mac = new;
        }
        a
    } else {
        Ack::Unsupported
    };
    let rx = |n: &mut Net, cmd: u8, on: u8| {
        if n.has(F_CTRL_RX) {
            n.ctrl_cmd(CTRL_RX, cmd, &[on])
        } else {
            Ok(Ack::Unsupported)
        }
    };
    let acks = [
        set,
        rx(n, CTRL_RX_PROMISC, 0)?,
        rx(n, CTRL_RX_PROMISC, 1)?,
        rx(n, CTRL_RX_ALLMULTI, 1)?,
        rx(n, CTRL_RX_ALLMULTI, 0)?,
    ];
    say!(
        "probe: net ctrl mac-addr-set=",
        acks[0],
        " promisc-off=",
        acks[1],
        " promisc-on=",
        acks[2],
        " allmulti-on=",
        acks[3],
        " allmulti-off=",
        acks[4]
    );
    let mut ok = true;
    if acks
        .iter()
        .any(|&a| a != Ack::Unsupported && a != Ack::Byte(ACK_OK))
    {
        say!("probe: error net ctrl: a command was not acknowledged ok");
        ok = false;
    }
    Ok(arp_and_ping(n, o, o.count.unwrap_or(3))? && ok)
}

fn udp_mode(n: &mut Net, o: &Opts, arena: &mut Arena) -> Result<bool, &'static str> {
    let (count, size) = (o.count.unwrap_or(16), o.size);
    if size > n.max_payload() {
        say!(
            "probe: error net udp size ",
            Dec(size),
            " above the largest payload ",
            Dec(n.max_payload())
        );
        return Ok(false);
    }
    let store_len = count.saturating_mul(size);
    if store_len > 64 << 20 || count > 1 << 20 {
        say!("probe: error net udp count * size too large");
        return Ok(false);
    }
    let oom = "out of memory for the datagrams";
    // ramp[k] = k mod 256: datagram s is ramp[s mod 256..][..size].
    let ramp = arena.alloc(256 + size + 8, 4096).ok_or(oom)?;
    for j in 0..(256 + size).div_ceil(8) {
        put64le(
            ramp + 8 * j,
            (8 * j & 0xff) * 0x0101_0101_0101_0101 + 0x0706_0504_0302_0100,
        );
    }
    let store = arena.alloc(store_len + 8, 4096).ok_or(oom)?;
    let got = arena.alloc(count.div_ceil(64) * 8 + 8, 8).ok_or(oom)?;
    phys::zero(got, count.div_ceil(64) * 8 + 8);
    if !n.arp()? {
        say!("probe: error net arp: no reply from the host");
        return Ok(false);
    }
    n.st = RxStats::default();
    let received = Cell::new(0u64);
    let mut bytes_received = 0u64;
    // Datagram seq s starts with byte s mod 256: the seq is the one nearest the arrival
    // index with that low byte.
    let mut sink = |p: &[u8]| {
        let r = received.get();
        received.set(r + 1);
        bytes_received += p.len() as u64;
        let seq = match p.first() {
            Some(&b) => r.wrapping_add(b.wrapping_sub(r as u8) as i8 as i64 as u64),
            None => r,
        };
        if seq < count && p.len() as u64 == size {
            let (w, bit) = (got + seq / 64 * 8, 1u64 << (seq % 64));
            if phys::rd64(w) & bit == 0 {
                put64le(w, phys::rd64(w) | bit);
                copy(store + seq * size, p.as_ptr() as u64, size);
            }
        }
    };
    let mut sent = Fnv::new();
    for s in 0..count {
        let slot = n.tx_slot()?;
        let f = n.frame_addr(slot);
        let pay = ramp + (s & 0xff);
        copy(f + ETH + IP + UDP, pay, size);
        let cs = n.udp_frame(f, size, o.port);
        n.tx_send(slot, ETH + IP + UDP + size, cs);
        sent.feed(mem(pay, size));
        n.poll(&mut sink)?;
    }
    // Whatever comes back: until `count` datagrams, or 2 s without one.
    loop {
        let before = received.get();
        n.run_until(ms(2000), &mut sink, &mut |_| received.get() >= count)?;
        if received.get() >= count || received.get() == before {
            break;
        }
    }
    let received = received.get();
    let mut rsum = Fnv::new();
    for s in 0..count {
        if phys::rd64(got + s / 64 * 8) & (1 << (s % 64)) != 0 {
            rsum.feed(mem(store + s * size, size));
        }
    }
    let (ss, rs) = (sent.finish(), rsum.finish());
    let st = n.st;
    say!(
        "probe: net udp sent=",
        Dec(count),
        " received=",
        Dec(received),
        " bytes_sent=",
        Dec(count * size),
        " bytes_received=",
        Dec(bytes_received),
        " sum_sent=",
        Hex16(ss),
        " sum_received=",
        Hex16(rs),
        " csum_offload=",
        Dec(n.has(F_CSUM) as u64),
        " rx_multi_buffer=",
        Dec(st.multi),
        " rx_data_valid=",
        Dec(st.data_valid),
        " rx_needs_csum=",
        Dec(st.needs_csum),
        " rx_bad_csum=",
        Dec(st.bad_csum)
    );
    let mut ok = true;
    if received != count || ss != rs {
        say!("probe: error net udp: datagrams lost or changed");
        ok = false;
    }
    if st.bad_csum != 0 {
        say!("probe: error net udp: bad checksums received");
        ok = false;
    }
    Ok(ok)
}

fn bench_mode(n: &mut Net, o: &Opts) -> Result<bool, &'static str> {
    let (count, size) = (o.count.unwrap_or(20_000), o.size);
    if size > n.max_payload() {
        say!("probe: error net-bench size above the largest payload");
        return Ok(false);
    }
    if !n.arp()? {
        say!("probe: error net arp: no reply from the host");
        return Ok(false);
    }
    say!("probe: net-bench phase=tx start");
    let t0 = rdtsc();
    let frames = n.tx_flood(count, size, o.port)?;
    let t = rdtsc().wrapping_sub(t0);
    say!(
        "probe: net-bench phase=tx done frames=",
        Dec(frames),
        " bytes=",
        Dec(frames * size),
        " tsc=",
        Dec(t)
    );
    say!("probe: net-bench phase=rx start");
    let (frames, bytes, t) = n.rx_flood(count)?;
    say!(
        "probe: net-bench phase=rx done frames=",
        Dec(frames),
        " bytes=",
        Dec(bytes),
        " tsc=",
        Dec(t)
    );
    Ok(true)
}

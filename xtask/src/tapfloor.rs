//! The host's own cost of moving one frame through a tap, measured without any VMM: a thread
//! that writes ready-made frames into a tap (what every VMM's transmit path ends in) and a
//! thread that reads a host flood out of one (the receive path), each timing its own CPU.
//! This is the floor under every user-space virtio-net, as host fio is for virtio-blk.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use virtio::net::tap::Tap;

/// virtio_net_hdr_v1: what vireo and QEMU put in front of every frame.
const VNET_HDR_LEN: usize = 12;
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xfe, 0x01];

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Waits until the tap has a frame (as vireo's worker waits in epoll).
fn wait_readable(tap: &Tap) {
    let mut pfd = libc::pollfd {
        fd: tap.fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own; a 100 ms bound so a silent tap cannot hang the bench.
    unsafe { libc::poll(&mut pfd, 1, 100) };
}

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// vnet header + Ethernet + IPv4 + UDP (checksum 0: none) + `size` payload bytes.
fn udp_frame(dst_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr, port: u16, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + size) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let csum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&((8 + size) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(f.len() + size, 0x5a);
    f
}

/// Per-frame CPU (µs) of writing `frames` frames into a tap, and of reading a paced host
/// flood out of it, for `size`-byte datagrams.
pub struct Floor {
    pub tx_us: f64,
    pub rx_us: f64,
}

pub fn measure(size: usize, frames: u64) -> Result<Floor> {
    let tap_name = "vbenchf0";
    let (host, guest) = (Ipv4Addr::new(10, 220, 2, 1), Ipv4Addr::new(10, 220, 2, 2));
    // vireo's own tap: created with its host address, removed when dropped.
    let tap = Tap::open(tap_name, Some((host, Ipv4Addr::new(255, 255, 255, 0))))
        .map_err(|e| anyhow!("{e}"))?;
    let mac = std::fs::read_to_string(format!("/sys/class/net/{tap_name}/address"))?;
    let mut host_mac = [0u8; 6];
    for (b, s) in host_mac.iter_mut().zip(mac.trim().split(':')) {
        *b = u8::from_str_radix(s, 16)?;
    }
    let guest_mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    crate::bench::sh(&[
        "ip",
        "neigh",
        "replace",
        &guest.to_string(),
        "lladdr",
        &guest_mac,
        "dev",
        tap_name,
        "nud",
        "permanent",
    ])?;

    // Transmit: host socket drains on another thread, as the bench's peer does.
    let stop = Arc::new(AtomicBool::new(false));
    let sink = UdpSocket::bind((host, 5001))?;
    sink.set_read_timeout(Some(Duration::from_millis(50)))?;
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let _ = sink.recv_from(&mut buf);
            }
        })
    };
    let frame = udp_frame(host_mac, guest, host, 5001, size);
    let t0 = thread_cpu();
    let iov = [libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    }];
    for _ in 0..frames {
        tap.writev(&iov)?;
    }
    let tx_us = (thread_cpu() - t0).as_secs_f64() * 1e6 / frames as f64;
    stop.store(true, Ordering::Relaxed);
    let _ = drain.join();

    // Receive: a paced flood (as the bench's) towards the "guest", read out of the tap.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        let sock = UdpSocket::bind((host, 0))?;
        std::thread::spawn(move || {
            let payload = vec![0x5au8; size];
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..64 {
                    let _ = sock.send_to(&payload, (guest, 4000));
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let mut buf = vec![0u8; 65536];
    let (mut n, deadline) = (0u64, Instant::now() + Duration::from_secs(10));
    let t0 = thread_cpu();
    while n < frames && Instant::now() < deadline {
        match tap.read(&mut buf) {
            // Only the flood's frames: the host also sends router solicitations and the like.
            Ok(len) if len == VNET_HDR_LEN + 14 + 20 + 8 + size => n += 1,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&tap),
            Err(e) => return Err(e.into()),
        }
    }
    let rx_us = (thread_cpu() - t0).as_secs_f64() * 1e6 / n.max(1) as f64;
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    drop(tap);
    Ok(Floor { tx_us, rx_us })
}

//! The host's own cost of moving one frame through a tap, measured without any VMM: a thread
//! that writes ready-made frames into a tap (what every VMM's transmit path ends in) and a
//! thread that reads a host flood out of one (the receive path), each timing its own CPU.
//! This is the floor under every user-space virtio-net, as host fio is for virtio-blk.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
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

fn open_tap(name: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun")?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one ifreq we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    let mut hdr = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int we own.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr) } < 0 {
        bail!("TUNSETVNETHDRSZ: {}", std::io::Error::last_os_error());
    }
    Ok(file)
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
    let tap = "vbenchf0";
    let (host, guest) = (Ipv4Addr::new(10, 220, 2, 1), Ipv4Addr::new(10, 220, 2, 2));
    let mut file = open_tap(tap)?;
    let sh = |args: &[&str]| -> Result<()> {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()?
            .success();
        if !ok {
            bail!("ip {args:?} failed");
        }
        Ok(())
    };
    sh(&["addr", "add", &format!("{host}/24"), "dev", tap])?;
    sh(&["link", "set", tap, "up"])?;
    let mac = std::fs::read_to_string(format!("/sys/class/net/{tap}/address"))?;
    let mut host_mac = [0u8; 6];
    for (b, s) in host_mac.iter_mut().zip(mac.trim().split(':')) {
        *b = u8::from_str_radix(s, 16)?;
    }
    let guest_mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    sh(&[
        "neigh",
        "replace",
        &guest.to_string(),
        "lladdr",
        &guest_mac,
        "dev",
        tap,
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
    for _ in 0..frames {
        file.write_all(&frame)?;
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
        // Only the flood's frames: the host also sends router solicitations and the like.
        if file.read(&mut buf)? == VNET_HDR_LEN + 14 + 20 + 8 + size {
            n += 1;
        }
    }
    let rx_us = (thread_cpu() - t0).as_secs_f64() * 1e6 / n.max(1) as f64;
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    drop(file);
    Ok(Floor { tx_us, rx_us })
}

//! A host tap device with virtio-net headers (IFF_VNET_HDR): frames cross it with the
//! 12-byte `virtio_net_hdr_v1` in front, so checksum and segmentation offloads pass straight
//! between the guest and the host's network stack.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name '{0}' is empty or longer than 15 bytes")]
    BadName(String),
    #[error("tap {0} does not exist (give ip=...,mask=... to have vireo create it)")]
    Missing(String),
    #[error("tap {0} is busy: another process has it open")]
    Busy(String),
    #[error("tap {name}: no permission ({source})")]
    Permission { name: String, source: io::Error },
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCSIFADDR: libc::c_ulong = 0x8916;
const SIOCSIFNETMASK: libc::c_ulong = 0x891c;

/// Offloads the tap may hand the guest (TUNSETOFFLOAD flags).
pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

/// The virtio_net_hdr_v1 size (§5.1.6): with VERSION_1 the header always has num_buffers.
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq`: the name and a 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r
    }

    fn set_flags(&mut self, flags: i16) {
        self.data[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn flags(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_ipv4(&mut self, addr: Ipv4Addr) {
        // struct sockaddr_in: family, port, address.
        self.data[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        self.data[2..4].copy_from_slice(&[0, 0]);
        self.data[4..8].copy_from_slice(&addr.octets());
    }
}

fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, correctly sized structure for each request used here.
    if unsafe { libc::ioctl(fd, req, arg as *mut T) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An opened tap. Closing it removes the interface if vireo created it (not persistent).
pub struct Tap {
    file: File,
    name: String,
    /// Offloads the kernel accepted (UFO is refused by newer kernels).
    supported_offloads: u32,
}

fn interface_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

impl Tap {
    /// Opens tap `name`. Without `address` the tap must exist; with it, a missing tap is
    /// created (and vanishes when vireo exits) and its host side gets that address.
    pub fn open(name: &str, address: Option<(Ipv4Addr, Ipv4Addr)>) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(TapError::BadName(name.to_string()));
        }
        let existed = interface_exists(name);
        if !existed && address.is_none() {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name);
        req.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        if let Err(e) = ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) {
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_string()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                    name: name.to_string(),
                    source: e,
                },
                _ => TapError::Ioctl {
                    name: name.to_string(),
                    what: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr_len).map_err(|source| {
            TapError::Ioctl {
                name: name.to_string(),
                what: "TUNSETVNETHDRSZ",
                source,
            }
        })?;
        let mut tap = Tap {
            file,
            name: name.to_string(),
            supported_offloads: 0,
        };
        let all = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        tap.supported_offloads = if tap.set_offloads(all | TUN_F_UFO).is_ok() {
            all | TUN_F_UFO
        } else if tap.set_offloads(all).is_ok() {
            all
        } else {
            0
        };
        // Until the guest says what it can take, hand it plain frames.
        let _ = tap.set_offloads(0);
        if let Some((ip, mask)) = address {
            if !existed {
                tap.configure_host_side(ip, mask)?;
            }
        }
        Ok(tap)
    }

    /// Gives the host side an IPv4 address and brings the link up.
    fn configure_host_side(&self, ip: Ipv4Addr, mask: Ipv4Addr) -> Result<(), TapError> {
        let err = |what| {
            let name = self.name.clone();
            move |source| TapError::Ioctl { name, what, source }
        };
        // SAFETY: a plain datagram socket for interface ioctls.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err("socket")(io::Error::last_os_error()));
        }
        // SAFETY: `sock` was just created and is owned here.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReq::new(&self.name);
        req.set_ipv4(ip);
        ioctl(sock.as_raw_fd(), SIOCSIFADDR, &mut req).map_err(err("SIOCSIFADDR"))?;
        let mut req = IfReq::new(&self.name);
        req.set_ipv4(mask);
        ioctl(sock.as_raw_fd(), SIOCSIFNETMASK, &mut req).map_err(err("SIOCSIFNETMASK"))?;
        let mut req = IfReq::new(&self.name);
        ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, &mut req).map_err(err("SIOCGIFFLAGS"))?;
        let flags = req.flags() | (libc::IFF_UP | libc::IFF_RUNNING) as i16;
        req.set_flags(flags);
        ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, &mut req).map_err(err("SIOCSIFFLAGS"))?;
        Ok(())
    }

    /// TUNSETOFFLOAD: what the tap may send us (must match what the guest accepted).
    pub fn set_offloads(&self, flags: u32) -> io::Result<()> {
        // TUNSETOFFLOAD takes the flags by value.
        // SAFETY: an integer-argument ioctl on our own tap fd.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A stand-in for a tap on any descriptor (a socketpair end in tests and fuzz bodies).
    pub(crate) fn from_file(file: File, name: &str) -> Self {
        Tap {
            file,
            name: name.to_string(),
            supported_offloads: 0,
        }
    }

    pub fn supported_offloads(&self) -> u32 {
        self.supported_offloads
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Sends one frame (header included) gathered from `iovecs`.
    pub fn writev(&self, iovecs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the iovecs point at guest memory the caller checked.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Receives one frame (header included) into `buf`; WouldBlock when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a live buffer.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// A locally administered unicast MAC (first byte 0x02) derived from `seed`, so the same
/// tap name gives the same MAC every time.
pub fn generated_mac(seed: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

/// Parses `aa:bb:cc:dd:ee:ff`; refuses multicast addresses (bit 0 of the first byte).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    // A multicast (or broadcast) address, or all zeroes, cannot be an interface's own.
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

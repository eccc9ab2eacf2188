//! The ARM PrimeCell RTC (PL031) on `vm-superio`'s model, as a bus device (ARM DDI 0224C,
//! PrimeCell Real Time Clock (PL031) TRM; section numbers below are that document's).
//!
//! The counter is the host's wall clock plus what the guest loaded into RTCLR. vm-superio
//! does not implement the match interrupt, so this device has no interrupt line to raise.

use vm_superio::rtc_pl031::NoEvents;
use vm_superio::Rtc;

use crate::bus::BusDevice;
use crate::limiter::WarnLimiter;

/// The register page (section 3.1).
pub const PL031_SIZE: u64 = 0x1000;

/// Accesses the PL031 does not decode (logged, the guest keeps running).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Pl031Error {
    /// The registers are 32 bits wide and word aligned (section 3.2, table 3-1); Linux's
    /// rtc-pl031 driver only uses 32-bit accesses.
    #[error("PL031 {width}-byte access at offset {offset:#x} ignored")]
    Access { offset: u64, width: usize },
}

/// A PL031 whose time base is the host's clock.
pub struct Pl031 {
    rtc: Rtc<NoEvents>,
    log: WarnLimiter,
}

impl Default for Pl031 {
    fn default() -> Self {
        Self::new()
    }
}

impl Pl031 {
    pub fn new() -> Self {
        Self {
            rtc: Rtc::new(),
            log: WarnLimiter::default(),
        }
    }

    /// The register offset of a 32-bit access, or why it is refused.
    fn decode(offset: u64, width: usize) -> Result<u16, Pl031Error> {
        if width == 4 && offset.is_multiple_of(4) && offset < PL031_SIZE {
            // offset < 0x1000 fits in u16.
            Ok(offset as u16)
        } else {
            Err(Pl031Error::Access { offset, width })
        }
    }

    fn refused(&mut self, e: Pl031Error) {
        if self.log.allow() {
            tracing::debug!("{e}");
        }
    }
}

impl BusDevice for Pl031 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match Self::decode(offset, data.len()) {
            Ok(reg) => {
                // vm-superio leaves the buffer untouched for write-only or reserved words:
                // they read as zero.
                let mut word = [0u8; 4];
                self.rtc.read(reg, &mut word);
                data.copy_from_slice(&word);
            }
            Err(e) => {
                data.fill(0xff);
                self.refused(e);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (Self::decode(offset, data.len()), <[u8; 4]>::try_from(data)) {
            (Ok(reg), Ok(word)) => self.rtc.write(reg, &word),
            (Err(e), _) => self.refused(e),
            (Ok(_), Err(_)) => self.refused(Pl031Error::Access {
                offset,
                width: data.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    const RTCDR: u64 = 0x000;
    const RTCLR: u64 = 0x008;
    const RTCCR: u64 = 0x00c;
    const RTCIMSC: u64 = 0x010;
    const RTCICR: u64 = 0x01c;

    fn r32(rtc: &mut Pl031, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        rtc.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn now() -> u32 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as u32
    }

    #[test]
    fn data_register_is_the_host_clock_shifted_by_the_load_register() {
        let mut rtc = Pl031::new();
        let before = now();
        let t = r32(&mut rtc, RTCDR);
        assert!(t >= before && t <= now(), "{t} vs {before}");
        // The guest sets the clock one day back: the counter follows from there.
        let day = 86_400;
        rtc.write(RTCLR, &(before - day).to_le_bytes());
        assert_eq!(r32(&mut rtc, RTCLR), before - day);
        let t = r32(&mut rtc, RTCDR);
        assert!(t >= before - day && t <= now() - day + 1, "{t}");
        // The RTC is always enabled.
        assert_eq!(r32(&mut rtc, RTCCR), 1);
    }

    #[test]
    fn interrupt_mask_and_ids() {
        let mut rtc = Pl031::new();
        rtc.write(RTCIMSC, &1u32.to_le_bytes());
        assert_eq!(r32(&mut rtc, RTCIMSC), 1);
        // RTCICR is write-only: reads as zero here.
        assert_eq!(r32(&mut rtc, RTCICR), 0);
        // Periph ID 0x00041031 and the PrimeCell ID 0xb105f00d (section 3.3.8-3.3.9).
        let id = |rtc: &mut Pl031, base: u64| {
            (0..4).fold(0u32, |acc, i| {
                acc | (r32(rtc, base + 4 * i) & 0xff) << (8 * i)
            })
        };
        assert_eq!(id(&mut rtc, 0xfe0), 0x0004_1031);
        assert_eq!(id(&mut rtc, 0xff0), 0xb105_f00d);
    }

    #[test]
    fn narrow_unaligned_or_outside_accesses_are_refused() {
        let mut rtc = Pl031::new();
        let mut b = [0u8; 1];
        rtc.read(RTCDR, &mut b);
        assert_eq!(b, [0xff]);
        let mut d = [0u8; 4];
        rtc.read(RTCLR + 1, &mut d);
        assert_eq!(d, [0xff; 4]);
        rtc.read(PL031_SIZE, &mut d);
        assert_eq!(d, [0xff; 4]);
        // A 2-byte write to RTCLR does not load it.
        rtc.write(RTCLR, &[1, 0]);
        assert_eq!(r32(&mut rtc, RTCLR), 0);
        assert_eq!(
            Pl031::decode(0x2, 4),
            Err(Pl031Error::Access {
                offset: 2,
                width: 4
            })
        );
    }
}

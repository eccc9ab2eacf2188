//! Per-device counters, plain atomics.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct NetMetrics {
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains refused (malformed) or that the tap did not take.
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames the receive filter (MAC, promiscuous, multicast) kept from the guest.
    pub rx_filtered: AtomicU64,
    /// Frames larger than the buffers the guest posted (without MRG_RXBUF).
    pub rx_too_big: AtomicU64,
    /// Times a frame waited because the guest had posted no receive buffers.
    pub rx_deferred: AtomicU64,
    pub ctrl_ok: AtomicU64,
    pub ctrl_err: AtomicU64,
    pub notifications: AtomicU64,
    pub interrupts: AtomicU64,
}

impl NetMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

impl std::fmt::Display for NetMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = Self::get;
        write!(
            f,
            "tx {} frames {} bytes ({} dropped), rx {} frames {} bytes ({} filtered, {} too big, {} waits for buffers), ctrl {} ok {} err, {} notifications, {} interrupts",
            g(&self.tx_frames),
            g(&self.tx_bytes),
            g(&self.tx_dropped),
            g(&self.rx_frames),
            g(&self.rx_bytes),
            g(&self.rx_filtered),
            g(&self.rx_too_big),
            g(&self.rx_deferred),
            g(&self.ctrl_ok),
            g(&self.ctrl_err),
            g(&self.notifications),
            g(&self.interrupts),
        )
    }
}

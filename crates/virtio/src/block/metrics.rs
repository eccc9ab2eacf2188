//! Per-device counters, plain atomics so a metrics endpoint can read them later.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Descriptor chains taken from the available ring.
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub write_zeroes: AtomicU64,
    /// Requests answered with IOERR (malformed, out of range, backend failure).
    pub io_errors: AtomicU64,
    /// Requests answered with UNSUPP.
    pub unsupported: AtomicU64,
    /// Chains so broken no status could be written.
    pub dropped: AtomicU64,
    /// Adjacent requests folded into another one's I/O.
    pub merged: AtomicU64,
    /// Available-buffer notifications (queue eventfd wake-ups).
    pub notifications: AtomicU64,
    /// Used-buffer notifications sent to the driver.
    pub interrupts: AtomicU64,
    /// The most backend operations in flight at once.
    pub max_in_flight: AtomicU64,
}

impl BlockMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn raise_max(counter: &AtomicU64, n: u64) {
        counter.fetch_max(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

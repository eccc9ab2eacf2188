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
    /// Reads and writes whose buffers O_DIRECT cannot take, done through the page cache.
    pub unaligned: AtomicU64,
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

impl std::fmt::Display for BlockMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = Self::get;
        write!(
            f,
            "{} requests ({} merged), {} MiB read, {} MiB written, {} flushes, {} discards, {} write-zeroes, {} I/O errors, {} unsupported, {} dropped, {} through the page cache, {} notifications, {} interrupts, at most {} in flight",
            g(&self.requests),
            g(&self.merged),
            g(&self.read_bytes) >> 20,
            g(&self.write_bytes) >> 20,
            g(&self.flushes),
            g(&self.discards),
            g(&self.write_zeroes),
            g(&self.io_errors),
            g(&self.unsupported),
            g(&self.dropped),
            g(&self.unaligned),
            g(&self.notifications),
            g(&self.interrupts),
            g(&self.max_in_flight),
        )
    }
}

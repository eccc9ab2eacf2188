//! Transports: how a driver reaches a virtio device (virtio spec v1.2 §4).

pub mod mmio;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Per-transport counters, plain atomics so a metrics reader needs no lock.
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Available buffer notifications that reached the transport's register (the fallback
    /// when no ioeventfd caught them first).
    pub notifications: AtomicU64,
    /// Notifications sent to the driver (used buffer and configuration change).
    pub interrupts: AtomicU64,
    /// Driver accesses the transport ignored or answered with DEVICE_NEEDS_RESET.
    pub driver_errors: AtomicU64,
}

/// Bounds the warnings a guest can cause: at most `BURST` per `WINDOW`, then one line saying
/// how many were dropped.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    window_start: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl WarnLimiter {
    const WINDOW: Duration = Duration::from_secs(5);
    const BURST: u32 = 10;

    /// Whether the next warning may be logged.
    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if expired {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "virtio driver warnings dropped"
                );
            }
            self.window_start = Some(now);
            self.emitted = 0;
            self.suppressed = 0;
        }
        if self.emitted < Self::BURST {
            self.emitted += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warn_limiter_allows_a_burst_then_drops() {
        let mut limiter = WarnLimiter::default();
        let allowed = (0..100).filter(|_| limiter.allow()).count();
        assert_eq!(allowed, WarnLimiter::BURST as usize);
        assert_eq!(limiter.suppressed, 100 - u64::from(WarnLimiter::BURST));
        // A new window starts over.
        limiter.window_start = Instant::now().checked_sub(WarnLimiter::WINDOW);
        assert!(limiter.allow());
        assert_eq!(limiter.suppressed, 0);
    }
}

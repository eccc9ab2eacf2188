//! Rate limits for log lines a guest can cause: a hostile guest must not be able to fill
//! the host's log (or spend the VMM's time writing it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bounds the warnings a guest can cause: at most `BURST` per `WINDOW`, then one line saying
/// how many were dropped.
#[derive(Debug, Default)]
pub struct WarnLimiter {
    window_start: Option<Instant>,
    emitted: u32,
    suppressed: u64,
}

impl WarnLimiter {
    const WINDOW: Duration = Duration::from_secs(5);
    const BURST: u32 = 10;

    /// Whether the next warning may be logged.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let expired = self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Self::WINDOW);
        if expired {
            if self.suppressed > 0 {
                tracing::warn!(
                    suppressed = self.suppressed,
                    "guest-caused log lines dropped"
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

/// A [`WarnLimiter`] for devices reached through `&self` (the buses).
#[derive(Debug, Default)]
pub struct SharedWarnLimiter(Mutex<WarnLimiter>);

impl SharedWarnLimiter {
    /// Whether the next line may be logged.
    pub fn allow(&self) -> bool {
        self.0.lock().map(|mut l| l.allow()).unwrap_or(false)
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
        let shared = SharedWarnLimiter::default();
        assert_eq!((0..100).filter(|_| shared.allow()).count(), 10);
    }
}

//! Transports: how a driver reaches a virtio device (virtio spec v1.2 §4).

pub mod mmio;

use std::sync::atomic::AtomicU64;

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

/// Bounds the log lines a guest can cause.
pub(crate) use devices::{SharedWarnLimiter, WarnLimiter};

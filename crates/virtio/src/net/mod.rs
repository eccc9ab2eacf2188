//! virtio-net (virtio v1.2 §5.1) on a host tap: `device.rs` (features, configuration,
//! activation), `event_handler.rs` (the worker: transmit, receive, control queue), `tap.rs`
//! (the tap with virtio-net headers), `metrics.rs`.

mod device;
mod event_handler;
#[doc(hidden)]
pub mod fuzz_targets;
mod metrics;
pub mod tap;

pub use device::{Net, NetConfig, NetError};
pub use metrics::NetMetrics;

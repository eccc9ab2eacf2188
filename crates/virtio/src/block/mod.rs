//! virtio-blk (virtio v1.2 §5.2) on raw images: `device.rs` (features, configuration,
//! activation), `request.rs` (one descriptor chain → a checked request), `event_handler.rs`
//! (the worker thread), `io.rs` (image file and io_uring), `metrics.rs`.

mod device;
mod event_handler;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod io;
mod metrics;
pub mod request;

pub use device::{Block, BlockConfig, BlockError, QUEUE_SIZE, SEG_MAX, SIZE_MAX};
pub use io::IoEngineKind;
pub use metrics::BlockMetrics;

//! The virtio-net device (virtio v1.2 §5.1) on a host tap: features, configuration space,
//! activation and reset. Frames move on a worker thread (`event_handler.rs`).

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use vmm_sys_util::eventfd::EventFd;

use super::event_handler::Worker;
use super::metrics::NetMetrics;
use super::tap::{
    generated_mac, Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO,
};
use crate::device::{
    features, kill_eventfds, read_config_bytes, start_worker, ActivateContext, ActivateError,
    DeviceState, WorkerKind,
};
use crate::transport::SharedWarnLimiter;
use crate::VirtioDevice;

pub const RX_QUEUE_SIZE: u16 = 256;
pub const TX_QUEUE_SIZE: u16 = 256;
pub const CTRL_QUEUE_SIZE: u16 = 64;
pub const MTU: u16 = 1500;

/// A network interface as the user configured it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    /// Host-side address and mask: create the tap if it is missing and configure it.
    pub ip: Option<(Ipv4Addr, Ipv4Addr)>,
}

/// Errors creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot duplicate the descriptor of tap {0}: {1}")]
    Dup(String, std::io::Error),
}

struct Active {
    kill: EventFd,
    worker: JoinHandle<()>,
    /// Where the worker leaves the tap when it ends.
    tap: Arc<Mutex<Option<Tap>>>,
}

pub struct Net {
    /// The tap while inactive; the worker owns it while activated and returns it on reset.
    tap: Option<Tap>,
    tap_name: String,
    mac: [u8; 6],
    avail_features: u64,
    config: [u8; CONFIG_LEN],
    metrics: Arc<NetMetrics>,
    state: DeviceState<Active>,
    /// Bounds the log lines the driver can cause, across resets (each activation's worker
    /// shares it, so a driver that resets in a loop gets no fresh budget).
    log: Arc<SharedWarnLimiter>,
}

/// `struct virtio_net_config` up to `mtu` (§5.1.4).
const CONFIG_LEN: usize = 12;

fn bit(b: u32) -> u64 {
    1u64 << b
}

impl Net {
    pub fn new(cfg: &NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&cfg.tap, cfg.ip)?;
        let mac = cfg.mac.unwrap_or_else(|| generated_mac(&cfg.tap));
        Ok(Self::with_tap(tap, &cfg.tap, mac))
    }

    /// A device on a tap that is already open (a socketpair stand-in in the fuzz bodies).
    pub(crate) fn with_tap(tap: Tap, tap_name: &str, mac: [u8; 6]) -> Self {
        let offloads = tap.supported_offloads();
        let mut avail_features = features::VIRTIO_F_VERSION_1
            | features::VIRTIO_F_EVENT_IDX
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MTU)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_CTRL_RX)
            | bit(VIRTIO_NET_F_CTRL_MAC_ADDR);
        if offloads & TUN_F_CSUM != 0 {
            // The tap takes partially checksummed frames from us and can give them to us.
            avail_features |= bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM);
            if offloads & (TUN_F_TSO4 | TUN_F_TSO6) == TUN_F_TSO4 | TUN_F_TSO6 {
                avail_features |= bit(VIRTIO_NET_F_HOST_TSO4)
                    | bit(VIRTIO_NET_F_HOST_TSO6)
                    | bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6);
            }
            if offloads & TUN_F_TSO_ECN != 0 {
                avail_features |= bit(VIRTIO_NET_F_HOST_ECN) | bit(VIRTIO_NET_F_GUEST_ECN);
            }
            if offloads & TUN_F_UFO != 0 {
                avail_features |= bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_GUEST_UFO);
            }
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        Self {
            tap_name: tap_name.to_string(),
            tap: Some(tap),
            mac,
            avail_features,
            config,
            metrics: Arc::new(NetMetrics::default()),
            state: DeviceState::Inactive,
            log: Arc::default(),
        }
    }

    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }
}

/// The tap offloads matching what the guest accepted to receive (§5.1.6.4, tun(4)).
fn tap_offloads(acked: u64) -> u32 {
    let mut f = 0;
    if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 {
        f |= TUN_F_CSUM;
        if acked & bit(VIRTIO_NET_F_GUEST_TSO4) != 0 {
            f |= TUN_F_TSO4;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_TSO6) != 0 {
            f |= TUN_F_TSO6;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_ECN) != 0 {
            f |= TUN_F_TSO_ECN;
        }
        if acked & bit(VIRTIO_NET_F_GUEST_UFO) != 0 {
            f |= TUN_F_UFO;
        }
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[RX_QUEUE_SIZE, TX_QUEUE_SIZE, CTRL_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for VERSION_1 drivers (§5.1.4.2); they use CTRL_MAC_ADDR.
        if self.log.allow() {
            tracing::debug!(offset, len = data.len(), "virtio-net: ignored config write");
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.state.is_activated() {
            return Err(ActivateError::AlreadyActivated);
        }
        let Some(tap) = self.tap.take() else {
            return Err(ActivateError::Backend {
                reason: format!("tap {} is gone", self.tap_name),
            });
        };
        if let Err(e) = tap.set_offloads(tap_offloads(ctx.acked_features)) {
            if self.log.allow() {
                tracing::warn!("tap {}: TUNSETOFFLOAD failed: {e}", self.tap_name);
            }
        }
        let (kill, worker_kill) = match kill_eventfds("virtio-net kill") {
            Ok(k) => k,
            Err(e) => {
                self.tap = Some(tap);
                return Err(e);
            }
        };
        // The worker hands the tap back when it ends (at reset), or when its set-up fails.
        let returned: Arc<Mutex<Option<Tap>>> = Arc::default();
        let back = returned.clone();
        let (mac, metrics, log) = (self.mac, self.metrics.clone(), self.log.clone());
        let spawner = ctx.spawner.clone();
        let started = start_worker(
            &*spawner,
            WorkerKind::Net,
            format!("virtio-net {}", self.tap_name),
            move || match Worker::new(ctx, tap, mac, metrics, log, worker_kill) {
                Ok(w) => Ok((w, back)),
                Err((tap, e)) => {
                    *back.lock().unwrap_or_else(|p| p.into_inner()) = Some(tap);
                    Err(e)
                }
            },
            |(w, back)| {
                let tap = w.run();
                *back.lock().unwrap_or_else(|p| p.into_inner()) = Some(tap);
            },
        );
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                self.tap = returned.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(e);
            }
        };
        self.state = DeviceState::Activated(Active {
            kill,
            worker: handle,
            tap: returned,
        });
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(active) = self.state.take() {
            let _ = active.kill.write(1);
            let _ = active.worker.join();
            if let Some(tap) = active.tap.lock().unwrap_or_else(|p| p.into_inner()).take() {
                // Plain frames again until the next driver negotiates offloads.
                let _ = tap.set_offloads(0);
                self.tap = Some(tap);
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tap_offloads(0), 0);
        // TSO without GUEST_CSUM is meaningless.
        assert_eq!(tap_offloads(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        let all = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            tap_offloads(all),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO
        );
    }
}

//! How devices and vCPUs ask the VMM to end the VM.

use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest reset the machine (i8042 pulse, ACPI reset register).
    Reset,
    /// The guest powered off (ACPI S5).
    Poweroff,
    /// The guest wrote to the debug-exit port; the VMM exits with this status.
    DebugExit(u8),
    /// A vCPU hit something the VMM cannot continue from.
    Fatal(String),
}

struct Inner {
    evt: EventFd,
    reason: Mutex<Option<VmExitReason>>,
}

/// Shared by everything that can end the VM; the first reason recorded wins.
#[derive(Clone)]
pub struct ExitHandle {
    inner: Arc<Inner>,
}

impl ExitHandle {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Inner {
                evt: EventFd::new(EFD_NONBLOCK)?,
                reason: Mutex::new(None),
            }),
        })
    }

    /// Records `reason` (unless one is already recorded) and wakes the VMM's main thread.
    pub fn request(&self, reason: VmExitReason) {
        let mut slot = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        // Writing can fail only if the counter would overflow, which leaves it readable.
        let _ = self.inner.evt.write(1);
    }

    /// The reason recorded so far.
    pub fn reason(&self) -> Option<VmExitReason> {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once a reason is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let h = ExitHandle::new().unwrap();
        assert_eq!(h.reason(), None);
        h.clone().request(VmExitReason::Poweroff);
        h.request(VmExitReason::Reset);
        assert_eq!(h.reason(), Some(VmExitReason::Poweroff));
        assert!(h.eventfd().read().unwrap() >= 1);
    }
}

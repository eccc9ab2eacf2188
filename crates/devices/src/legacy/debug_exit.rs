//! A debug-exit port (QEMU's `isa-debug-exit` at 0xf4): the guest writes a status and the
//! VMM exits with it. Test guests use it to end a run with a verdict.

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, VmExitReason};

pub struct DebugExitDevice {
    exit: ExitHandle,
}

impl DebugExitDevice {
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(&status) = data.first() {
                self.exit.request(VmExitReason::DebugExit(status));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_requests_exit_with_status() {
        let exit = ExitHandle::new().unwrap();
        DebugExitDevice::new(exit.clone()).write(0, &[3]);
        assert_eq!(exit.reason(), Some(VmExitReason::DebugExit(3)));
    }
}

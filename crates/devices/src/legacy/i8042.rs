//! The i8042 keyboard controller, as far as guests use it on a VM: its CPU reset line
//! (command 0xFE on port 0x64, Linux `reboot=k`).

use vm_superio::Trigger;

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, VmExitReason};

struct ResetTrigger(ExitHandle);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExitReason::Reset);
        Ok(())
    }
}

/// Registered at port 0x60 with length 5 (data at 0x60, status/command at 0x64).
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: ExitHandle) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset > 4 {
            data.fill(0xff);
            return;
        }
        data[0] = self.dev.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= 4 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let exit = ExitHandle::new().unwrap();
        let mut kbd = I8042::new(exit.clone());
        kbd.write(4, &[0xd1]);
        assert_eq!(exit.reason(), None);
        kbd.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }
}

//! The hardware-reduced ACPI registers the FADT points at (ACPI 6.5 §4.8.3.7): sleep
//! control, sleep status and the reset register, all in one 3-port block.

use crate::bus::BusDevice;
use crate::exit::{ExitHandle, VmExitReason};
use crate::limiter::WarnLimiter;

/// SLP_EN in the sleep control register (ACPI 6.5 §4.8.3.7, Table 4.19).
pub const ACPI_SLP_EN: u8 = 1 << 5;
/// The SLP_TYP our DSDT's `\_S5_` object announces.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// The value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;

/// Offsets inside the block.
const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = 1;
const RESET: u64 = 2;

pub struct AcpiPmDevice {
    exit: ExitHandle,
    log: WarnLimiter,
}

impl AcpiPmDevice {
    /// Length of the port block.
    pub const LEN: u64 = 3;
    pub const SLEEP_CONTROL_OFFSET: u64 = SLEEP_CONTROL;
    pub const SLEEP_STATUS_OFFSET: u64 = SLEEP_STATUS;
    pub const RESET_OFFSET: u64 = RESET;

    pub fn new(exit: ExitHandle) -> Self {
        Self {
            exit,
            log: WarnLimiter::default(),
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS is never pending; the others read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            SLEEP_CONTROL if value & ACPI_SLP_EN != 0 => {
                let slp_typ = (value >> 2) & 0x7;
                if slp_typ == ACPI_S5_SLP_TYP {
                    self.exit.request(VmExitReason::Poweroff);
                } else if self.log.allow() {
                    tracing::info!(slp_typ, "guest asked for an unsupported sleep state");
                }
            }
            RESET if *value == ACPI_RESET_VALUE => self.exit.request(VmExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_value_resets() {
        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPmDevice::new(exit.clone());
        pm.write(SLEEP_CONTROL, &[ACPI_S5_SLP_TYP << 2]); // no SLP_EN: ignored
        pm.write(SLEEP_CONTROL, &[(3 << 2) | ACPI_SLP_EN]); // S3: unsupported
        assert_eq!(exit.reason(), None);
        pm.write(SLEEP_CONTROL, &[(ACPI_S5_SLP_TYP << 2) | ACPI_SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExitReason::Poweroff));

        let exit = ExitHandle::new().unwrap();
        let mut pm = AcpiPmDevice::new(exit.clone());
        pm.write(RESET, &[0x42]);
        pm.write(RESET, &[ACPI_RESET_VALUE, 0]); // wrong width
        assert_eq!(exit.reason(), None);
        pm.write(RESET, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }
}

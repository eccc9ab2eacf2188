//! Legacy devices: on x86_64 the 16550A UART, the i8042 controller's reset line, the ACPI
//! hardware-reduced power registers and a debug-exit port; on aarch64 the PL011 UART and the
//! PL031 RTC (plain register models, built on every host).

mod acpi_pm;
mod debug_exit;
mod i8042;
mod pl011;
mod pl031;
mod serial;

pub use acpi_pm::{AcpiPmDevice, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLP_EN};
pub use debug_exit::DebugExitDevice;
pub use i8042::I8042;
pub use pl011::{Pl011, Pl011Error, PL011_SIZE};
pub use pl031::{Pl031, Pl031Error, PL031_SIZE};
pub use serial::{EventFdTrigger, Serial};

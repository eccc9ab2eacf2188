//! Legacy PC devices: the 16550A UART, the i8042 controller's reset line, the ACPI
//! hardware-reduced power registers and a debug-exit port.

mod acpi_pm;
mod debug_exit;
mod i8042;
mod serial;

pub use acpi_pm::{AcpiPmDevice, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLP_EN};
pub use debug_exit::DebugExitDevice;
pub use i8042::I8042;
pub use serial::{EventFdTrigger, Serial};

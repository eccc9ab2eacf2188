//! Local APIC set-up: LINT0 as ExtINT (the 8259 PIC's output), LINT1 as NMI, as firmware
//! leaves them on a PC (Intel SDM vol. 3 §11.5.1).

use kvm_ioctls::VcpuFd;

/// Errors while programming the local APIC.
#[derive(Debug, thiserror::Error)]
pub enum LapicError {
    #[error("KVM_GET_LAPIC failed: {0}")]
    Get(kvm_ioctls::Error),
    #[error("KVM_SET_LAPIC failed: {0}")]
    Set(kvm_ioctls::Error),
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

fn get_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let b = |i: usize| regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

pub fn set_lint(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut lapic = vcpu.get_lapic().map_err(LapicError::Get)?;
    let lvt0 = get_reg(&lapic.regs, APIC_LVT0);
    set_reg(
        &mut lapic.regs,
        APIC_LVT0,
        set_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_reg(&lapic.regs, APIC_LVT1);
    set_reg(
        &mut lapic.regs,
        APIC_LVT1,
        set_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic).map_err(LapicError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_bits_8_to_10() {
        assert_eq!(set_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
        let mut regs = [0 as std::os::raw::c_char; 0x400];
        set_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(get_reg(&regs, APIC_LVT0), 0xdead_beef);
    }
}

//! The CPUID a vCPU sees: KVM's supported set, completed with the topology and hypervisor
//! leaves a guest expects, and filtered for hosts whose KVM cannot run some instructions.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Errors while building a vCPU's CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot add CPUID leaf {leaf:#x}: {source}")]
    Push {
        leaf: u32,
        source: vmm_sys_util::fam::Error,
    },
}

// Leaf 1 ECX / EDX.
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_PCID: u32 = 1 << 17;
const LEAF1_ECX_POPCNT: u32 = 1 << 23;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_F16C: u32 = 1 << 29;
const LEAF1_ECX_RDRAND: u32 = 1 << 30;
const LEAF1_ECX_FMA: u32 = 1 << 12;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;
// Leaf 7.0 EBX / ECX / EDX.
const LEAF7_EBX_FSGSBASE: u32 = 1 << 0;
const LEAF7_EBX_BMI1: u32 = 1 << 3;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_SMEP: u32 = 1 << 7;
const LEAF7_EBX_BMI2: u32 = 1 << 8;
const LEAF7_EBX_ERMS: u32 = 1 << 9;
const LEAF7_EBX_INVPCID: u32 = 1 << 10;
const LEAF7_EBX_RDSEED: u32 = 1 << 18;
const LEAF7_EBX_SMAP: u32 = 1 << 20;
const LEAF7_EBX_AVX512: u32 = 0xd023_0000; // F, DQ, IFMA, CD, BW, VL
const LEAF7_ECX_PKU: u32 = 1 << 3;
const LEAF7_ECX_RDPID: u32 = 1 << 22;
const LEAF7_EDX_FSRM: u32 = 1 << 4;
// Leaf 0x8000_0001 ECX / EDX.
const EXT1_ECX_ABM: u32 = 1 << 5;
const EXT1_EDX_RDTSCP: u32 = 1 << 27;
// Leaf 0x4000_0001 EAX (KVM's paravirtual features, Documentation/virt/kvm/x86/cpuid.rst).
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;

/// KVM paravirtual features that a guest uses through hypercalls (`KVM_HC_KICK_CPU`,
/// `KVM_HC_SEND_IPI`, `KVM_HC_SCHED_YIELD`). A hypercall from a non-PVM guest never returns
/// on a PVM host: Linux hangs at its first IPI (`x86: Booting SMP configuration`). The
/// MSR-based features (kvmclock, steal time, PV EOI, PV TLB flush) work and stay.
const PVM_HIDDEN_KVM_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;

/// What a PVM host's instruction emulator rejects (`cmpxchg16b`, `xsave`/`xrstor`,
/// `popcnt`, `rdtscp`, BMI, fast-string variants) or what guests then fail on, by leaf:
/// (leaf, subleaf, ebx mask, ecx mask, edx mask) to clear.
const PVM_HIDDEN: &[(u32, u32, u32, u32, u32)] = &[
    (
        1,
        0,
        0,
        LEAF1_ECX_CX16
            | LEAF1_ECX_PCID
            | LEAF1_ECX_POPCNT
            | LEAF1_ECX_XSAVE
            | LEAF1_ECX_OSXSAVE
            | LEAF1_ECX_AVX
            | LEAF1_ECX_F16C
            | LEAF1_ECX_FMA
            | LEAF1_ECX_RDRAND,
        0,
    ),
    (
        7,
        0,
        LEAF7_EBX_FSGSBASE
            | LEAF7_EBX_BMI1
            | LEAF7_EBX_AVX2
            | LEAF7_EBX_SMEP
            | LEAF7_EBX_BMI2
            | LEAF7_EBX_ERMS
            | LEAF7_EBX_INVPCID
            | LEAF7_EBX_RDSEED
            | LEAF7_EBX_SMAP
            | LEAF7_EBX_AVX512,
        LEAF7_ECX_PKU | LEAF7_ECX_RDPID,
        LEAF7_EDX_FSRM,
    ),
    (0x8000_0001, 0, 0, EXT1_ECX_ABM, EXT1_EDX_RDTSCP),
];

/// The Linux command-line words that hide the same features from a Linux guest, for kernels
/// that re-detect them or hosts where the CPUID mask does not reach the guest.
pub const PVM_LINUX_CMDLINE: &str =
    "noxsave clearcpuid=popcnt,rdrand,rdseed,fsgsbase,rdpid,invpcid,pcid,smap,smep,pku";

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX of leaf 0x4000_0000.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// Per-VM inputs of the CPUID template.
#[derive(Clone, Copy, Debug)]
pub struct CpuidConfig {
    pub vcpu_count: u8,
    pub hide_pvm_unsupported: bool,
    /// KVM emulates the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER): offer it, so a
    /// guest needs no PIT to calibrate the local APIC timer.
    pub tsc_deadline: bool,
}

/// Bits needed to number `count` things.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn find(cpuid: &mut CpuId, function: u32, index: u32) -> Option<&mut kvm_cpuid_entry2> {
    cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

fn upsert(cpuid: &mut CpuId, entry: kvm_cpuid_entry2) -> Result<(), CpuidError> {
    if let Some(e) = find(cpuid, entry.function, entry.index) {
        *e = entry;
        return Ok(());
    }
    cpuid.push(entry).map_err(|source| CpuidError::Push {
        leaf: entry.function,
        source,
    })
}

/// Builds vCPU `vcpu_id`'s CPUID from KVM's supported set. The topology is one socket of
/// `vcpu_count` cores, one thread each, APIC ID = vCPU index.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, cfg: CpuidConfig) -> Result<CpuId, CpuidError> {
    let mut cpuid = supported.clone();
    let n = u32::from(cfg.vcpu_count.max(1));
    let apic_id = u32::from(vcpu_id);
    let core_bits = id_bits(n);

    // Leaf 0: make sure the topology leaf 0xB is within range.
    if let Some(e) = find(&mut cpuid, 0, 0) {
        e.eax = e.eax.max(0xb);
    }
    if let Some(e) = find(&mut cpuid, 1, 0) {
        e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((n.min(255)) << 16);
        e.ecx |= LEAF1_ECX_HYPERVISOR;
        if cfg.tsc_deadline {
            e.ecx |= LEAF1_ECX_TSC_DEADLINE;
        }
        if n > 1 {
            e.edx |= LEAF1_EDX_HTT;
        } else {
            e.edx &= !LEAF1_EDX_HTT;
        }
    }
    // Leaf 0xB: extended topology. Subleaf 0 = SMT (1 thread), 1 = core, 2 = invalid.
    let levels = [(0u32, 0u32, 1u32, 1u32), (1, core_bits, n, 2), (2, 0, 0, 0)];
    for (index, shift, count, kind) in levels {
        upsert(
            &mut cpuid,
            kvm_cpuid_entry2 {
                function: 0xb,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: count,
                ecx: (kind << 8) | index,
                edx: apic_id,
                ..Default::default()
            },
        )?;
    }
    // Intel leaf 4: cores per package in EAX[31:26] (minus one); caches otherwise as KVM says.
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 4) {
        e.eax = (e.eax & 0x03ff_ffff) | ((n - 1).min(63) << 26);
    }
    // AMD: 0x8000_0008 ECX = cores per package and APIC ID size; 0x8000_001E = this core.
    if let Some(e) = find(&mut cpuid, 0x8000_0008, 0) {
        e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | ((n - 1) & 0xff);
    }
    if let Some(e) = find(&mut cpuid, 0x8000_001e, 0) {
        e.eax = apic_id;
        e.ebx = apic_id & 0xff; // compute unit id, one thread per unit
        e.ecx = 0; // node 0
    }
    // Hypervisor leaves: KVM's signature, whatever KVM reported for its features.
    let max_hv = find(&mut cpuid, 0x4000_0001, 0).map_or(0x4000_0000, |_| 0x4000_0001);
    upsert(
        &mut cpuid,
        kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: max_hv,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        },
    )?;

    if cfg.hide_pvm_unsupported {
        for &(leaf, sub, ebx, ecx, edx) in PVM_HIDDEN {
            if let Some(e) = find(&mut cpuid, leaf, sub) {
                e.ebx &= !ebx;
                e.ecx &= !ecx;
                e.edx &= !edx;
            }
        }
        if let Some(e) = find(&mut cpuid, 0x4000_0001, 0) {
            e.eax &= !PVM_HIDDEN_KVM_FEATURES;
        }
        // Without XSAVE, the XSAVE state leaf must not advertise anything.
        for e in cpuid
            .as_mut_slice()
            .iter_mut()
            .filter(|e| e.function == 0xd)
        {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
    }
    Ok(cpuid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supported() -> CpuId {
        let mut c = CpuId::new(0).unwrap();
        for (function, index, eax, ebx, ecx, edx) in [
            (0u32, 0u32, 0xdu32, 0u32, 0u32, 0u32),
            (1, 0, 0x00a0_0f11, 0x0010_0800, 0xfef8_3203, 0x178b_fbff),
            (7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            (0xd, 0, 7, 0x340, 0x340, 0),
            (0x8000_0001, 0, 0, 0, 0xffff_ffff, 0xffff_ffff),
            (0x8000_0008, 0, 0x3030, 0, 0, 0),
            // kvmclock (bit 0/3), PV_UNHALT, PV_SEND_IPI, PV_SCHED_YIELD.
            (0x4000_0001, 0, 0x2889, 0, 0, 0),
        ] {
            c.push(kvm_cpuid_entry2 {
                function,
                index,
                eax,
                ebx,
                ecx,
                edx,
                ..Default::default()
            })
            .unwrap();
        }
        c
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    #[test]
    fn topology_is_consistent_with_vcpu_count() {
        let cfg = CpuidConfig {
            vcpu_count: 4,
            hide_pvm_unsupported: false,
            tsc_deadline: false,
        };
        for id in 0..4u8 {
            let c = vcpu_cpuid(&supported(), id, cfg).unwrap();
            let l1 = get(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(id));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            let smt = get(&c, 0xb, 0);
            let core = get(&c, 0xb, 1);
            assert_eq!((smt.eax, smt.ebx, smt.edx), (0, 1, u32::from(id)));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
            assert_eq!(get(&c, 0xb, 2).ecx >> 8, 0);
            assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xff, 3);
            assert!(get(&c, 0, 0).eax >= 0xb);
        }
    }

    #[test]
    fn hypervisor_leaf_is_kvm() {
        let cfg = CpuidConfig {
            vcpu_count: 1,
            hide_pvm_unsupported: false,
            tsc_deadline: false,
        };
        let c = vcpu_cpuid(&supported(), 0, cfg).unwrap();
        let hv = get(&c, 0x4000_0000, 0);
        let mut sig = Vec::new();
        for r in [hv.ebx, hv.ecx, hv.edx] {
            sig.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&sig[..9], b"KVMKVMKVM");
        assert_eq!(hv.eax, 0x4000_0001);
    }

    #[test]
    fn pvm_template_hides_emulator_hostile_features() {
        let cfg = CpuidConfig {
            vcpu_count: 2,
            hide_pvm_unsupported: true,
            tsc_deadline: true,
        };
        let c = vcpu_cpuid(&supported(), 1, cfg).unwrap();
        let l1 = get(&c, 1, 0);
        for bit in [
            LEAF1_ECX_XSAVE,
            LEAF1_ECX_POPCNT,
            LEAF1_ECX_CX16,
            LEAF1_ECX_AVX,
        ] {
            assert_eq!(l1.ecx & bit, 0);
        }
        let l7 = get(&c, 7, 0);
        assert_eq!(
            l7.ebx & (LEAF7_EBX_BMI1 | LEAF7_EBX_BMI2 | LEAF7_EBX_ERMS),
            0
        );
        assert_eq!(l7.edx & LEAF7_EDX_FSRM, 0);
        assert_eq!(get(&c, 0x8000_0001, 0).edx & EXT1_EDX_RDTSCP, 0);
        assert_eq!(get(&c, 0xd, 0).eax, 0);
        // Hypercall-based paravirtual features go, kvmclock stays.
        assert_eq!(get(&c, 0x4000_0001, 0).eax, 0x9);
        // Unrelated bits survive; the TSC-deadline timer is offered when asked for.
        assert_ne!(l1.edx, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        // Without PVM, KVM's features pass through.
        let plain = CpuidConfig {
            hide_pvm_unsupported: false,
            ..cfg
        };
        let c = vcpu_cpuid(&supported(), 1, plain).unwrap();
        assert_eq!(get(&c, 0x4000_0001, 0).eax, 0x2889);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 254].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }
}

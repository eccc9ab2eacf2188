//! One thread per vCPU looping on KVM_RUN. Port I/O and MMIO exits go to the buses; every
//! exit the VM cannot continue from ends the VM with one line saying what happened.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use arch::cpuid::{vcpu_cpuid, CpuidConfig};
use arch::regs::BootEntry;
use devices::{Bus, ExitHandle, VmExitReason};

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("vCPU {id}: cannot build CPUID: {source}")]
    Cpuid {
        id: u8,
        source: arch::cpuid::CpuidError,
    },
    #[error("vCPU {id}: KVM_SET_CPUID2 failed: {source}")]
    SetCpuid { id: u8, source: kvm_ioctls::Error },
    #[error("vCPU {id}: {source}")]
    Msrs { id: u8, source: arch::msr::MsrError },
    #[error("vCPU {id}: {source}")]
    Regs {
        id: u8,
        source: arch::regs::RegsError,
    },
    #[error("vCPU {id}: {source}")]
    Lapic {
        id: u8,
        source: arch::interrupts::LapicError,
    },
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickHandler(std::io::Error),
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID, MSRs, FPU and local APIC set up. Only the boot
    /// vCPU gets registers; the others wait for INIT/SIPI in the in-kernel LAPIC.
    pub fn new(
        vm: &VmFd,
        id: u8,
        supported_cpuid: &CpuId,
        cpuid_cfg: CpuidConfig,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let cpuid = vcpu_cpuid(supported_cpuid, id, cpuid_cfg)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        fd.set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::SetCpuid { id, source })?;
        if id == 0 {
            for e in cpuid
                .as_slice()
                .iter()
                .filter(|e| [1, 7, 0x8000_0001].contains(&e.function))
            {
                tracing::debug!(
                    "CPUID {:#x}.{}: eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
                    e.function,
                    e.index,
                    e.eax,
                    e.ebx,
                    e.ecx,
                    e.edx
                );
            }
        }
        let refused = arch::msr::set_msrs_tolerant(&fd, &arch::msr::boot_msrs())
            .map_err(|source| VcpuError::Msrs { id, source })?;
        if !refused.is_empty() && id == 0 {
            tracing::debug!("KVM refused boot MSRs {refused:#x?}; continuing without them");
        }
        arch::regs::setup_fpu(&fd).map_err(|source| VcpuError::Regs { id, source })?;
        arch::interrupts::set_lint(&fd).map_err(|source| VcpuError::Lapic { id, source })?;
        Ok(Self { id, fd })
    }

    pub fn setup_boot_registers(
        &self,
        mem: &GuestMemoryMmap,
        entry: BootEntry,
    ) -> Result<(), VcpuError> {
        arch::regs::setup_boot_vcpu(&self.fd, mem, entry).map_err(|source| VcpuError::Regs {
            id: self.id,
            source,
        })
    }
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: ExitHandle,
    pub stop: Arc<AtomicBool>,
    pub filters: Arc<crate::seccomp::Filters>,
    /// The split irqchip's I/O APIC, which takes the local APICs' EOIs of level vectors.
    pub ioapic: Option<Arc<std::sync::Mutex<devices::Ioapic>>>,
}

thread_local! {
    /// This thread's kvm_run, so the kick signal handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, valid while its VcpuFd
        // lives; the vCPU loop clears it before dropping the fd.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the kick handler (once per process, before vCPU threads start).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    // SAFETY: a zeroed sigaction with a plain handler is valid; the handler only touches a
    // thread-local pointer and a field of the kvm_run page.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = kick_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, null_mut()) != 0 {
            return Err(VcpuError::KickHandler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Interrupts a vCPU thread's KVM_RUN.
pub fn kick(thread: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the pthread_t is alive while we hold its JoinHandle.
    unsafe {
        libc::pthread_kill(thread.as_pthread_t(), kick_signal());
    }
}

pub fn spawn(vcpu: Vcpu, shared: VcpuShared) -> Result<JoinHandle<()>, VcpuError> {
    let id = vcpu.id;
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .stack_size(256 << 10)
        .spawn(move || run(vcpu, shared))
        .map_err(|source| VcpuError::Spawn { id, source })
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// The width of each access in a port-I/O exit. KVM hands over `count` accesses of `size`
/// bytes in one buffer for string instructions (`rep outsb`, `insw`, ...); each is its own
/// access to the device, never one wide one.
fn pio_access_size(run: *const kvm_run) -> usize {
    // SAFETY: `run` is this vCPU's mapped kvm_run, valid for the thread's life; after an
    // exit with reason KVM_EXIT_IO the `io` member of the union is the one KVM filled in.
    // The data buffer the caller holds lies at `io.data_offset`, outside the struct.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read_volatile() };
    // KVM only reports 1, 2 or 4; anything else is treated as byte accesses.
    match size {
        1 | 2 | 4 => usize::from(size),
        _ => 1,
    }
}

fn run(mut vcpu: Vcpu, shared: VcpuShared) {
    shared
        .filters
        .apply_or_exit(crate::seccomp::ThreadKind::Vcpu);
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN.with(|r| r.set(run_ptr));
    let id = vcpu.id;
    let fatal = |msg: String| shared.exit.request(VmExitReason::Fatal(msg));
    while !shared.stop.load(Ordering::Acquire) {
        match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                for access in data.chunks_mut(pio_access_size(run_ptr)) {
                    shared.pio.read(u64::from(port), access);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                for access in data.chunks(pio_access_size(run_ptr)) {
                    shared.pio.write(u64::from(port), access);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(addr, data);
            }
            // The in-kernel LAPIC handles HLT; an exit here is spurious.
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::IoapicEoi(vector)) => {
                if let Some(io) = &shared.ioapic {
                    io.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .end_of_interrupt(vector);
                }
            }
            Ok(VcpuExit::Shutdown) => {
                let rip = rip(&vcpu.fd);
                fatal(format!(
                    "vCPU {id}: the guest shut down the CPU (triple fault, KVM_EXIT_SHUTDOWN) at guest RIP {rip}"
                ));
                break;
            }
            Ok(VcpuExit::SystemEvent(kind, data)) => {
                let what = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => "shutdown",
                    KVM_SYSTEM_EVENT_RESET => "reset",
                    KVM_SYSTEM_EVENT_CRASH => "crash",
                    _ => "unknown",
                };
                fatal(format!(
                    "vCPU {id}: KVM system event {kind} ({what}), data {data:x?}"
                ));
                break;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                fatal(format!(
                    "vCPU {id}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY), hardware reason {reason:#x} on host CPU {cpu}"
                ));
                break;
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // active member of the union.
                let (suberror, ndata, data) = unsafe {
                    let internal = (*run_ptr).__bindgen_anon_1.internal;
                    (internal.suberror, internal.ndata, internal.data)
                };
                let rip = rip(&vcpu.fd);
                let n = (ndata as usize).min(data.len());
                let detail = if suberror == KVM_INTERNAL_ERROR_EMULATION {
                    format!(
                        " (instruction emulation failed{})",
                        emulation_failure_bytes(&data[..n])
                    )
                } else {
                    format!(", data {:x?}", &data[..n])
                };
                fatal(format!(
                    "vCPU {id}: KVM internal error, suberror {suberror}{detail}, at guest RIP {rip}"
                ));
                break;
            }
            Ok(other) => {
                fatal(format!("vCPU {id}: unexpected KVM exit {other:?}"));
                break;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked: clear the request and look at the stop flag.
                vcpu.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                fatal(format!("vCPU {id}: KVM_RUN failed: {e}"));
                break;
            }
        }
    }
    KVM_RUN.with(|r| r.set(null_mut()));
}

/// KVM's emulation-failure payload (struct kvm_run.emulation_failure): data[0] holds
/// flags; with KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES the next 16 bytes are
/// the instruction length and up to 15 instruction bytes.
fn emulation_failure_bytes(data: &[u64]) -> String {
    const FLAG_INSTRUCTION_BYTES: u64 = 1;
    match data {
        [flags, a, b, ..] if flags & FLAG_INSTRUCTION_BYTES != 0 => {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&a.to_le_bytes());
            raw[8..].copy_from_slice(&b.to_le_bytes());
            let len = usize::from(raw[0]).min(15);
            let hex: Vec<String> = raw[1..=len].iter().map(|b| format!("{b:02x}")).collect();
            format!(": instruction bytes {}", hex.join(" "))
        }
        _ => String::new(),
    }
}

fn rip(fd: &VcpuFd) -> String {
    fd.get_regs()
        .map(|r| format!("{:#x}", r.rip))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_failure_names_the_instruction() {
        // What KVM reported for Linux's int3 self-test on a PVM host.
        let data = [1, 0x7c83_9090_9090_cc0f, 0x480b_0f02_7401_0424, 0x1000];
        assert_eq!(
            emulation_failure_bytes(&data),
            ": instruction bytes cc 90 90 90 90 83 7c 24 04 01 74 02 0f 0b 48"
        );
        assert_eq!(emulation_failure_bytes(&[0, 1, 2]), "");
        assert_eq!(emulation_failure_bytes(&[1]), "");
    }
}

//! Building a VM from a [`VmConfig`] and running it until the guest or the host ends it.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use arch::acpi::{create_acpi_tables, AcpiConfig};
use arch::boot::{configure_boot, load_initrd, load_kernel, write_cmdline, BootError};
use arch::cpuid::CpuidConfig;
use arch::layout;
use devices::{ExitHandle, VmExitReason, IOAPIC_NUM_PINS};

use crate::config::{SerialConfig, VmConfig};
use crate::console::{self, ConsoleDrain};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::files::{open_console_file, open_regular, FileError, FileId};
use crate::interrupts::{InterruptManager, IrqchipMode};
use crate::memory::{MemoryError, MemoryManager, SystemAllocator};
use crate::seccomp::{Filters, SeccompError, SeccompMode, ThreadKind};
use crate::terminal::{spawn_stdin_reader, RawModeGuard};
use crate::vcpu::{self, Vcpu, VcpuError, VcpuShared};
use crate::workers::Spawner;
use virtio::block::{Block, BlockError};
use virtio::net::{Net, NetError};

/// Everything that can stop a VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(std::io::Error),
    #[error("/dev/kvm lacks {0:?}, which vireo needs")]
    MissingCap(Cap),
    #[error("cannot create a VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("cannot set up the VM's {what}: {source}")]
    VmSetup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("cannot start the console thread: {0}")]
    ConsoleThread(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error(transparent)]
    Landlock(#[from] crate::landlock::LandlockError),
    #[error("cannot start the device worker spawner: {0}")]
    Spawner(std::io::Error),
    #[error("kernel {path}: {source}")]
    Kernel { path: String, source: BootError },
    #[error("initramfs {path}: {source}")]
    Initramfs { path: String, source: BootError },
    #[error(transparent)]
    Boot(BootError),
    #[error(transparent)]
    Acpi(#[from] arch::acpi::AcpiError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("--disk: {source}")]
    Disk { source: BlockError },
    #[error("--net: {source}")]
    Net { source: NetError },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot get KVM's supported CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot set up signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot start the console input thread: {0}")]
    StdinThread(std::io::Error),
    #[error("{0}")]
    Fatal(String),
}

/// How a VM run ended, as the process exit status the binary should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitStatus(pub i32);

/// SIGINT and SIGTERM are blocked in every thread and read from a signalfd by the main
/// thread, so they end the VM through the same orderly path as a guest reset.
struct Signals {
    fd: OwnedFd,
}

impl Signals {
    fn block() -> Result<Self, VmError> {
        // SAFETY: plain libc signal-mask calls on a local sigset.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(VmError::Signals(std::io::Error::last_os_error()));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(VmError::Signals(std::io::Error::last_os_error()));
            }
            Ok(Self {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: reading one signalfd_siginfo into a correctly sized buffer.
        unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let n = libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                std::mem::size_of::<libc::signalfd_siginfo>(),
            );
            (n == std::mem::size_of::<libc::signalfd_siginfo>() as isize)
                .then_some(info.ssi_signo as i32)
        }
    }
}

fn open_kvm(mode: IrqchipMode) -> Result<Kvm, VmError> {
    let kvm =
        Kvm::new().map_err(|e| VmError::OpenKvm(std::io::Error::from_raw_os_error(e.errno())))?;
    let chip: &[Cap] = match mode {
        IrqchipMode::Kernel => &[Cap::Irqchip, Cap::Pit2],
        IrqchipMode::Split => &[Cap::SplitIrqchip, Cap::IrqRouting, Cap::SignalMsi],
    };
    for &cap in [Cap::Irqfd, Cap::Ioeventfd, Cap::ImmediateExit]
        .iter()
        .chain(chip)
    {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

/// KVM_REINJECT_CONTROL's argument (include/uapi/linux/kvm.h).
#[repr(C)]
struct KvmReinjectControl {
    pit_reinject: u8,
    reserved: [u8; 31],
}

vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// Turns off the in-kernel PIT's lost-tick reinjection (guests keep time with the TSC and
/// kvm-clock). Besides being what modern guests want, it takes the PIT's IRQ-ack notifier
/// off the teardown path: unregistering it waits for an SRCU grace period (~15 ms measured
/// on PVM hosts), which then overlaps the guest's boot instead of delaying the VMM's exit.
fn disable_pit_reinjection(vm: Arc<VmFd>, filters: Arc<Filters>) {
    let spawned = std::thread::Builder::new()
        .name("pit-reinject".into())
        .stack_size(64 << 10)
        .spawn(move || {
            filters.apply_or_exit(ThreadKind::Setup);
            let arg = KvmReinjectControl {
                pit_reinject: 0,
                reserved: [0; 31],
            };
            // SAFETY: KVM_REINJECT_CONTROL reads a kvm_reinject_control we own for the call.
            let r =
                unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&*vm, KVM_REINJECT_CONTROL(), &arg) };
            if r != 0 {
                tracing::debug!(
                    "KVM_REINJECT_CONTROL failed: {}",
                    std::io::Error::last_os_error()
                );
            }
        });
    if let Err(e) = spawned {
        tracing::debug!("cannot start the PIT reinjection thread: {e}");
    }
}

/// The interrupt controllers and the rest of KVM's per-VM set-up. Called after the memory
/// slots are registered: a slot registered after the irqchip waits out an SRCU grace period
/// (5–10 ms measured here), one registered before it does not (0.3 ms).
fn setup_vm(vm: &Arc<VmFd>, mode: IrqchipMode, filters: &Arc<Filters>) -> Result<(), VmError> {
    let setup = |what: &'static str| move |source| VmError::VmSetup { what, source };
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(setup("TSS address"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(setup("identity map address"))?;
    match mode {
        IrqchipMode::Kernel => {
            vm.create_irq_chip().map_err(setup("in-kernel irqchip"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(setup("PIT"))?;
            disable_pit_reinjection(vm.clone(), filters.clone());
        }
        IrqchipMode::Split => {
            // The local APICs in KVM, our I/O APIC model with its 24 pins; no PIC, no PIT.
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_SPLIT_IRQCHIP,
                ..Default::default()
            };
            cap.args[0] = IOAPIC_NUM_PINS as u64;
            vm.enable_cap(&cap).map_err(setup("split irqchip"))?;
        }
    }
    Ok(())
}

/// The command line the guest gets: the user's, plus on PVM hosts for Linux guests the
/// options that hide what PVM shows the guest whatever its CPUID says (XSAVE, POPCNT, BMI,
/// ERMS, FSRM: measured with the probe guest), unless the user already gave them.
fn guest_cmdline(user: &str, hide_pvm_features: bool) -> String {
    let user = user.trim();
    if !hide_pvm_features {
        return user.to_string();
    }
    let missing: Vec<&str> = arch::cpuid::PVM_LINUX_CMDLINE
        .split_whitespace()
        .filter(|w| {
            let key = w.split('=').next().unwrap_or(w);
            !user
                .split_whitespace()
                .any(|u| u.split('=').next() == Some(key))
        })
        .collect();
    if missing.is_empty() {
        user.to_string()
    } else if user.is_empty() {
        missing.join(" ")
    } else {
        format!("{user} {}", missing.join(" "))
    }
}

/// Builds the VM described by `config`, runs it, and returns the exit status.
pub fn run(config: &VmConfig) -> Result<ExitStatus, VmError> {
    let t0 = Instant::now();
    let phase = |name: &str| tracing::debug!("startup: {name} at {} us", t0.elapsed().as_micros());
    config.validate()?;
    // Compiled once, before any thread that needs one starts.
    let filters = Arc::new(Filters::new(config.seccomp)?);
    phase("seccomp filters compiled");
    let signals = Signals::block()?;
    vcpu::install_kick_handler()?;

    let mut kernel_file = open_regular("kernel", &config.kernel)?;
    let mut initrd_file = match &config.initramfs {
        Some(p) => Some(open_regular("initramfs", p)?),
        None => None,
    };

    // Every host file is checked (and disk images locked) before KVM is touched.
    let blocks = config
        .disks
        .iter()
        .map(|d| Block::new(d).map_err(|source| VmError::Disk { source }))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = config
        .nets
        .iter()
        .map(|n| Net::new(n).map_err(|source| VmError::Net { source }))
        .collect::<Result<Vec<_>, _>>()?;
    // Last of the host files, once everything it could clash with is open.
    let console_sink = open_console_sink(config, &kernel_file, initrd_file.as_ref())?;
    let mode = config.platform.irqchip;
    let kvm = open_kvm(mode)?;
    let pvm = arch::host_is_pvm();
    // Every file is open and no other thread exists yet: all of them inherit the domain.
    phase("files open");
    if config.landlock.enabled {
        let paths = crate::landlock::vm_paths(config);
        match crate::landlock::restrict(&paths)? {
            crate::landlock::Enforcement::None => {
                tracing::info!("landlock: not supported by this kernel; not restricting files")
            }
            e => tracing::debug!("landlock: {e:?} over {} paths", paths.len()),
        }
    }
    phase("landlock on");
    let (console_out, console_drain) = start_console(console_sink, &filters)?;

    let memory = MemoryManager::new(config.memory_size, config.memory_thp)?;
    let vm = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
    phase("VM created");
    memory.register(&vm)?;
    phase("memory registered");
    setup_vm(&vm, mode, &filters)?;
    phase("irqchip set up");
    let irqs = InterruptManager::new(vm.clone(), mode);
    let mem = memory.guest_memory();

    let exit = ExitHandle::new().map_err(|source| DeviceError::EventFd {
        what: "VM exit",
        source,
    })?;
    let mut devices = DeviceManager::new(&irqs, &exit, console_out)?;
    let ioapic = match mode {
        IrqchipMode::Split => Some(devices.add_ioapic(&irqs)?),
        IrqchipMode::Kernel => None,
    };
    let spawner: Arc<dyn virtio::WorkerSpawner> = if config.seccomp == SeccompMode::Off {
        Arc::new(virtio::DirectSpawner)
    } else {
        Spawner::start(filters.clone()).map_err(VmError::Spawner)?
    };
    let mut allocator = SystemAllocator::new()?;
    for (disk, block) in config.disks.iter().zip(blocks) {
        let path = disk.path.display().to_string();
        devices.track_disk_image(block.image());
        devices.track_block_metrics(&format!("virtio-blk {path}"), block.metrics());
        devices.add_virtio_mmio(
            &vm,
            &irqs,
            &mut allocator,
            memory.guest_memory_atomic(),
            Box::new(block),
            spawner.clone(),
            &format!("virtio-blk {path}"),
        )?;
    }

    let kernel_path = config.kernel.display().to_string();
    let kernel = load_kernel(mem, &mut kernel_file).map_err(|source| VmError::Kernel {
        path: kernel_path.clone(),
        source,
    })?;
    let initrd = match (&mut initrd_file, &config.initramfs) {
        (Some(f), Some(p)) => Some(load_initrd(mem, config.memory_size, &kernel, f).map_err(
            |source| VmError::Initramfs {
                path: p.display().to_string(),
                source,
            },
        )?),
        _ => None,
    };
    for net in nets {
        let what = format!("virtio-net {}", net.tap_name());
        let mac = net.mac().map(|b| format!("{b:02x}")).join(":");
        tracing::info!("{what}: guest MAC {mac}");
        devices.track_net_metrics(&what, net.metrics());
        devices.add_virtio_mmio(
            &vm,
            &irqs,
            &mut allocator,
            memory.guest_memory_atomic(),
            Box::new(net),
            spawner.clone(),
            &what,
        )?;
    }
    if pvm {
        tracing::info!(
            "host KVM is PVM (software backend): hiding CPUID features its emulator rejects"
        );
    }
    let mut cmdline = guest_cmdline(&config.cmdline, pvm && kernel.is_linux);
    if cmdline != config.cmdline.trim() {
        tracing::info!(
            "PVM does not apply the CPUID mask for XSAVE and POPCNT: adding '{}' to the Linux command line",
            arch::cpuid::PVM_LINUX_CMDLINE
        );
    }
    if config.platform.virtio_mmio_cmdline {
        for word in devices.virtio_mmio_cmdline() {
            cmdline.push(' ');
            cmdline.push_str(word);
        }
    }
    let cmdline_len = write_cmdline(mem, cmdline.trim()).map_err(VmError::Boot)?;
    let dsdt_devices = devices.dsdt_devices();
    let rsdp = create_acpi_tables(
        mem,
        &AcpiConfig {
            vcpu_count: config.vcpus,
            pm: DeviceManager::acpi_pm_ports(),
            dsdt_devices: &dsdt_devices,
            isa_irq_overrides: &[0, layout::IRQ_COM1 as u8],
        },
    )?;
    let entry = configure_boot(mem, config.memory_size, &kernel, cmdline_len, initrd, rsdp)
        .map_err(VmError::Boot)?;
    tracing::info!(
        "booting {kernel_path} via {}: {} vCPUs, {} MiB",
        kernel.protocol(),
        config.vcpus,
        config.memory_size >> 20
    );

    phase("boot structures written");
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::SupportedCpuid)?;
    let cpuid_cfg = CpuidConfig {
        vcpu_count: config.vcpus,
        hide_pvm_unsupported: pvm,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::new(&vm, id, &supported, cpuid_cfg)?);
    }
    if let Some(bsp) = vcpus.first() {
        bsp.setup_boot_registers(mem, entry)?;
    }

    phase("vCPUs configured");
    let serial = devices.serial();
    let (pio, mmio) = devices.take_buses();
    let _raw = if config.serial == SerialConfig::Tty {
        let guard = RawModeGuard::enable();
        if crate::terminal::stdin_has_input() {
            let f = filters.clone();
            spawn_stdin_reader(serial, move || f.apply_or_exit(ThreadKind::SerialIn))
                .map_err(VmError::StdinThread)?;
        }
        Some(guard)
    } else {
        None
    };

    let stop = Arc::new(AtomicBool::new(false));
    let shared = VcpuShared {
        pio,
        mmio,
        exit: exit.clone(),
        stop: stop.clone(),
        filters: filters.clone(),
        ioapic,
    };
    let mut threads = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match vcpu::spawn(v, shared.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                if !stop_vcpus(&stop, threads) {
                    std::mem::forget(memory);
                    std::mem::forget(vm);
                }
                return Err(e.into());
            }
        }
    }

    // Every thread is started: from here the VMM thread only waits and tears down.
    drop(spawner);
    filters.apply_or_exit(ThreadKind::Vmm);
    phase("vCPUs started, seccomp filters on");
    let (outcome, why) = wait_for_exit(&exit, &signals);
    phase("guest stopped");
    if !stop_vcpus(&stop, threads) {
        // A vCPU thread is still inside KVM_RUN: its guest memory and VM must outlive it,
        // and the devices it can reach cannot be stopped in order, so flush the disks here.
        tracing::warn!("a vCPU thread did not stop; leaving it to process exit");
        devices.sync_disks();
        std::mem::forget(memory);
        std::mem::forget(vm);
    }
    phase("VM torn down");
    // The guest's last lines first, then vireo's own.
    finish_console(console_drain);
    if let Some(why) = why {
        tracing::info!("{why}");
    }
    for line in devices.metrics_report() {
        tracing::info!("{line}");
    }
    outcome
}

/// How long the exit path waits for the console thread to write out the guest's last lines.
const CONSOLE_FLUSH_LIMIT: Duration = Duration::from_millis(500);

/// Where COM1's output goes: the terminal, the console file (checked against the VM's
/// inputs), or nowhere (None).
fn open_console_sink(
    config: &VmConfig,
    kernel: &File,
    initrd: Option<&File>,
) -> Result<Option<Box<dyn Write + Send>>, VmError> {
    let sink: Box<dyn Write + Send> = match &config.serial {
        SerialConfig::Off => return Ok(None),
        SerialConfig::Tty => Box::new(crate::device_manager::RawStdout),
        SerialConfig::File(path) => {
            let id = |f: &File| f.metadata().ok().map(|m| FileId::of(&m));
            let mut inputs = Vec::new();
            if let Some(k) = id(kernel) {
                inputs.push(("kernel", config.kernel.display().to_string(), k));
            }
            if let (Some(f), Some(p)) = (initrd, &config.initramfs) {
                if let Some(i) = id(f) {
                    inputs.push(("initramfs", p.display().to_string(), i));
                }
            }
            for d in &config.disks {
                if let Ok(m) = std::fs::metadata(&d.path) {
                    inputs.push(("disk", d.path.display().to_string(), FileId::of(&m)));
                }
            }
            Box::new(open_console_file(path, &inputs)?)
        }
    };
    Ok(Some(sink))
}

/// COM1's writer: a bounded buffer in front of the sink, drained by the console thread (so a
/// sink that stops reading never blocks a vCPU).
fn start_console(
    sink: Option<Box<dyn Write + Send>>,
    filters: &Arc<Filters>,
) -> Result<(Box<dyn Write + Send>, Option<ConsoleDrain>), VmError> {
    let Some(sink) = sink else {
        return Ok((Box::new(std::io::sink()), None));
    };
    let f = filters.clone();
    let (out, drain) = console::spawn(sink, console::CONSOLE_BUFFER, move || {
        f.apply_or_exit(ThreadKind::Console)
    })
    .map_err(VmError::ConsoleThread)?;
    Ok((Box::new(out), Some(drain)))
}

fn finish_console(drain: Option<ConsoleDrain>) {
    let Some(drain) = drain else { return };
    let dropped = drain.dropped();
    if !drain.finish(CONSOLE_FLUSH_LIMIT) {
        tracing::warn!("console: the output sink stopped taking the guest's output");
    }
    if dropped > 0 {
        tracing::warn!(
            "console: {dropped} bytes of guest output dropped (the sink did not keep up)"
        );
    }
}

/// Waits for the end of the VM: the exit status, and what to log about it once the guest's
/// console is flushed.
fn wait_for_exit(
    exit: &ExitHandle,
    signals: &Signals,
) -> (Result<ExitStatus, VmError>, Option<String>) {
    let mut fds = [
        libc::pollfd {
            fd: exit.eventfd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: polling two valid fds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            continue; // EINTR
        }
        if fds[1].revents & libc::POLLIN != 0 {
            if let Some(sig) = signals.read() {
                return (
                    Ok(ExitStatus(128 + sig)),
                    Some(format!("signal {sig}: stopping the VM")),
                );
            }
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let done = |code: i32, why: String| (Ok(ExitStatus(code)), Some(why));
            match exit.reason() {
                Some(VmExitReason::Reset) => {
                    return done(0, "guest reset: stopping the VM".into());
                }
                Some(VmExitReason::Poweroff) => return done(0, "guest powered off".into()),
                // Only "success" (0) or "failure" (1): a guest must not be able to pose as a
                // signal (128 + n) to whatever supervises vireo.
                Some(VmExitReason::DebugExit(code)) => {
                    return done(
                        i32::from(code != 0),
                        format!("guest wrote {code:#x} to the debug-exit port"),
                    );
                }
                Some(VmExitReason::Fatal(msg)) => return (Err(VmError::Fatal(msg)), None),
                None => {
                    let _ = exit.eventfd().read();
                }
            }
        }
    }
}

/// Asks every vCPU thread to leave KVM_RUN and waits briefly for them; a thread stuck in
/// the kernel is left behind rather than hanging the VMM.
/// Returns whether all of them stopped.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) -> bool {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut all = true;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            vcpu::kick(&t);
            std::thread::sleep(Duration::from_micros(200));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            all = false;
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_the_users_unless_pvm_features_must_be_hidden() {
        assert_eq!(guest_cmdline("  console=ttyS0 ", false), "console=ttyS0");
        assert_eq!(
            guest_cmdline("console=ttyS0", true),
            format!("console=ttyS0 {}", arch::cpuid::PVM_LINUX_CMDLINE)
        );
        assert_eq!(guest_cmdline("", true), arch::cpuid::PVM_LINUX_CMDLINE);
        // The user's own choice of an option wins.
        assert_eq!(
            guest_cmdline("noxsave clearcpuid=pcid", true),
            "noxsave clearcpuid=pcid"
        );
        assert_eq!(
            guest_cmdline("clearcpuid=pcid", true),
            "clearcpuid=pcid noxsave"
        );
    }
}

//! Loading a kernel and initramfs and writing the boot protocol's structures: PVH
//! `hvm_start_info` (Xen's arch-x86/hvm/start_info.h) or Linux `boot_params`
//! (Documentation/arch/x86/boot.rst), both through `linux-loader`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout::{
    e820_entries, low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, PVH_INFO_START,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::regs::BootEntry;

/// Errors while loading the kernel image, the initramfs or the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(std::io::Error),
    #[error("the kernel image is neither an ELF (vmlinux) nor a bzImage")]
    UnknownKernelFormat,
    #[error("cannot load the ELF kernel: {0}")]
    LoadElf(linux_loader::loader::Error),
    #[error("cannot load the bzImage kernel: {0}")]
    LoadBzImage(linux_loader::loader::Error),
    #[error("the bzImage uses boot protocol {0:#x}; 2.06 or newer is needed")]
    OldBzImage(u16),
    #[error("the bzImage has no 64-bit entry point (XLF_KERNEL_64)")]
    BzImageNot64Bit,
    #[error("cannot read the initramfs: {0}")]
    ReadInitrd(std::io::Error),
    #[error("the initramfs ({size} bytes) does not fit in guest RAM between the kernel (ends at {kernel_end:#x}) and {limit:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("the initramfs is empty")]
    InitrdEmpty,
    #[error("cannot copy the initramfs into guest memory: {0}")]
    WriteInitrd(vm_memory::GuestMemoryError),
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line: {0}")]
    WriteCmdline(linux_loader::loader::Error),
    #[error("cannot write the boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
}

type Result<T> = std::result::Result<T, BootError>;

/// How the kernel image was recognised and where it enters.
#[derive(Clone, Copy, Debug)]
pub enum KernelEntry {
    /// ELF with a PVH note: 32-bit entry at this address.
    Pvh(GuestAddress),
    /// ELF without a PVH note: Linux 64-bit entry at `e_entry`.
    Elf64(GuestAddress),
    /// bzImage: 64-bit entry at the load address + 0x200.
    BzImage {
        load: GuestAddress,
        header: setup_header,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: KernelEntry,
    /// First byte after the loaded image (an initramfs must start above it).
    pub end: u64,
    /// The image is a Linux kernel (a "Linux" ELF note, or a bzImage with a version string),
    /// so Linux command-line options apply to it.
    pub is_linux: bool,
}

impl LoadedKernel {
    /// The boot protocol's name, for logs.
    pub fn protocol(&self) -> &'static str {
        match self.entry {
            KernelEntry::Pvh(_) => "PVH",
            KernelEntry::Elf64(_) => "Linux 64-bit (ELF)",
            KernelEntry::BzImage { .. } => "Linux 64-bit (bzImage)",
        }
    }
}

/// bzImage's protocol 2.06 gave cmdline_size; XLF_KERNEL_64 marks the 64-bit entry.
const MIN_BZIMAGE_PROTOCOL: u16 = 0x0206;
const XLF_KERNEL_64: u16 = 1 << 0;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// Detects the format from the file's bytes and loads it.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel> {
    let mut magic = [0u8; 4];
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;
    let is_elf = kernel.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mut hdrs = [0u8; 4];
    let is_bzimage = kernel.seek(SeekFrom::Start(0x202)).is_ok()
        && kernel.read_exact(&mut hdrs).is_ok()
        && u32::from_le_bytes(hdrs) == KERNEL_HDR_MAGIC;

    if is_elf {
        let r =
            Elf::load(mem, None, kernel, Some(HIGH_MEMORY_START)).map_err(BootError::LoadElf)?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => KernelEntry::Pvh(addr),
            _ => KernelEntry::Elf64(r.kernel_load),
        };
        Ok(LoadedKernel {
            entry,
            end: r.kernel_end,
            is_linux: elf_has_linux_note(kernel),
        })
    } else if is_bzimage {
        let r = BzImage::load(mem, None, kernel, Some(HIGH_MEMORY_START))
            .map_err(BootError::LoadBzImage)?;
        let Some(header) = r.setup_header else {
            return Err(BootError::UnknownKernelFormat);
        };
        if header.version < MIN_BZIMAGE_PROTOCOL {
            return Err(BootError::OldBzImage(header.version));
        }
        if header.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::BzImageNot64Bit);
        }
        // init_size covers the decompressor's and the kernel's run-time footprint.
        let end = r
            .kernel_load
            .0
            .saturating_add(u64::from(header.init_size))
            .max(r.kernel_end);
        Ok(LoadedKernel {
            entry: KernelEntry::BzImage {
                load: r.kernel_load,
                header,
            },
            end,
            is_linux: bzimage_has_version_string(kernel, header.kernel_version),
        })
    } else {
        Err(BootError::UnknownKernelFormat)
    }
}

fn read_at(f: &mut File, offset: u64, buf: &mut [u8]) -> bool {
    f.seek(SeekFrom::Start(offset)).is_ok() && f.read_exact(buf).is_ok()
}

/// Linux's vmlinux carries notes named "Linux" (LINUX_ELFNOTE_BUILD_SALT and others) in a
/// PT_NOTE segment; other ELF kernels do not.
fn elf_has_linux_note(f: &mut File) -> bool {
    let mut ehdr = [0u8; 64];
    if !read_at(f, 0, &mut ehdr) || ehdr[4] != 2 {
        return false;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(w)
    };
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize < 56 {
        return false;
    }
    for i in 0..u64::from(phnum.min(64)) {
        let mut ph = [0u8; 56];
        if !read_at(f, phoff + i * u64::from(phentsize), &mut ph) || ph[..4] != [4, 0, 0, 0] {
            continue;
        }
        let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32).min(1 << 16));
        let mut notes = vec![0u8; size as usize];
        if !read_at(f, off, &mut notes) {
            continue;
        }
        // Walk the notes: namesz, descsz, type, then name and desc padded to 4 bytes.
        let mut o = 0usize;
        while o + 12 <= notes.len() {
            let word = |k: usize| {
                u32::from_le_bytes([notes[k], notes[k + 1], notes[k + 2], notes[k + 3]]) as usize
            };
            let (namesz, descsz) = (word(o), word(o + 4));
            let name = notes.get(o + 12..o + 12 + namesz).unwrap_or(&[]);
            if name == b"Linux\0" {
                return true;
            }
            o += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    false
}

/// A Linux bzImage points `kernel_version` at a version string in its setup code
/// (boot.rst: the string sits at `kernel_version + 0x200`).
fn bzimage_has_version_string(f: &mut File, kernel_version: u16) -> bool {
    let mut b = [0u8; 1];
    kernel_version != 0
        && read_at(f, u64::from(kernel_version) + 0x200, &mut b)
        && b[0].is_ascii_digit()
}

/// Copies the initramfs to the top of low RAM (below `initrd_addr_max` for a bzImage),
/// page aligned, above the kernel. Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: &mut File,
) -> Result<(GuestAddress, u64)> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadInitrd)?;
    initrd
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitrd)?;
    if size == 0 {
        return Err(BootError::InitrdEmpty);
    }
    let mut limit = low_ram_end(mem_size);
    if let KernelEntry::BzImage { header, .. } = kernel.entry {
        if header.initrd_addr_max != 0 {
            limit = limit.min(u64::from(header.initrd_addr_max) + 1);
        }
    }
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end: kernel.end,
        limit,
    };
    let addr = match limit.checked_sub(size) {
        Some(a) => a & !0xfff,
        None => return Err(too_large),
    };
    if addr < kernel.end.max(HIGH_MEMORY_START.0) {
        return Err(too_large);
    }
    let len = usize::try_from(size).map_err(|_| BootError::InitrdEmpty)?;
    let mut reader = initrd;
    read_into_guest(mem, GuestAddress(addr), &mut reader, len)?;
    Ok((GuestAddress(addr), size))
}

fn read_into_guest<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    src: &mut F,
    len: usize,
) -> Result<()> {
    use vm_memory::Bytes;
    mem.read_exact_volatile_from(addr, src, len)
        .map_err(BootError::WriteInitrd)
}

/// Validates the command line and writes it at [`CMDLINE_START`]; returns its length.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !cmdline.trim().is_empty() {
        c.insert_str(cmdline).map_err(BootError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, CMDLINE_START, &c).map_err(BootError::WriteCmdline)?;
    Ok(c.as_cstring().map(|s| s.as_bytes().len()).unwrap_or(0))
}

/// Writes the boot protocol's structures and returns how the boot vCPU must enter.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<BootEntry> {
    match kernel.entry {
        KernelEntry::Pvh(entry) => {
            configure_pvh(mem, mem_size, initrd, rsdp)?;
            Ok(BootEntry::Pvh {
                entry: entry.0,
                start_info: PVH_INFO_START.0,
            })
        }
        KernelEntry::Elf64(entry) => {
            configure_linux(mem, mem_size, None, cmdline_len, initrd, rsdp)?;
            Ok(BootEntry::Linux64 {
                entry: entry.0,
                boot_params: ZERO_PAGE_START.0,
            })
        }
        KernelEntry::BzImage { load, header } => {
            configure_linux(mem, mem_size, Some(header), cmdline_len, initrd, rsdp)?;
            Ok(BootEntry::Linux64 {
                entry: load.0 + 0x200,
                boot_params: ZERO_PAGE_START.0,
            })
        }
    }
}

fn configure_pvh(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = e820_entries(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            PVH_MODLIST_START.0
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, PVH_INFO_START);
    params.set_sections(&memmap, PVH_MEMMAP_START);
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], PVH_MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::BootParams)
}

fn configure_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<()> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    }
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    p.ext_cmd_line_ptr = (CMDLINE_START.0 >> 32) as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr.0 as u32;
        p.ext_ramdisk_image = (addr.0 >> 32) as u32;
        p.hdr.ramdisk_size = size as u32;
        p.ext_ramdisk_size = (size >> 32) as u32;
    }
    p.acpi_rsdp_addr = rsdp.0;
    let entries = e820_entries(mem_size);
    for (slot, e) in p
        .e820_table
        .iter_mut()
        .zip(entries.iter().take(E820_MAX_ENTRIES_ZEROPAGE))
    {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    p.e820_entries = entries.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&p, ZERO_PAGE_START),
        mem,
    )
    .map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem(0x40_0000);
        let mut f = temp_file(&[0x55; 4096]);
        assert!(matches!(
            load_kernel(&m, &mut f),
            Err(BootError::UnknownKernelFormat)
        ));
        let mut empty = temp_file(&[]);
        assert!(matches!(
            load_kernel(&m, &mut empty),
            Err(BootError::UnknownKernelFormat)
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem(0x40_0000);
        let n = write_cmdline(&m, "console=ttyS0 probe.mode=boot").unwrap();
        let mut buf = vec![0u8; n + 1];
        m.read_slice(&mut buf, CMDLINE_START).unwrap();
        assert_eq!(&buf[..n], b"console=ttyS0 probe.mode=boot");
        assert_eq!(buf[n], 0);
        assert!(write_cmdline(&m, &"x".repeat(CMDLINE_MAX_SIZE + 1)).is_err());
    }

    fn fake_kernel(end: u64) -> LoadedKernel {
        LoadedKernel {
            entry: KernelEntry::Pvh(GuestAddress(0x10_0000)),
            end,
            is_linux: false,
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let size = 0x80_0000;
        let m = mem(size);
        let mut f = temp_file(&[7u8; 5000]);
        let (addr, len) = load_initrd(&m, size, &fake_kernel(0x20_0000), &mut f).unwrap();
        assert_eq!(len, 5000);
        assert_eq!(addr.0 & 0xfff, 0);
        assert!(addr.0 + len <= size && addr.0 + len > size - 0x2000);
        let b: u8 = m.read_obj(GuestAddress(addr.0 + 4999)).unwrap();
        assert_eq!(b, 7);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let size = 0x40_0000;
        let m = mem(size);
        let mut f = temp_file(&vec![0u8; 0x30_0000]);
        assert!(matches!(
            load_initrd(&m, size, &fake_kernel(0x20_0000), &mut f),
            Err(BootError::InitrdTooLarge { .. })
        ));
        let mut empty = temp_file(&[]);
        assert!(matches!(
            load_initrd(&m, size, &fake_kernel(0x20_0000), &mut empty),
            Err(BootError::InitrdEmpty)
        ));
    }

    #[test]
    fn pvh_start_info_has_memmap_module_and_rsdp() {
        let size = 0x400_0000;
        let m = mem(size);
        let k = fake_kernel(0x20_0000);
        let entry = configure_boot(
            &m,
            size,
            &k,
            10,
            Some((GuestAddress(0x300_0000), 1234)),
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry::Pvh {
                entry: 0x10_0000,
                start_info: PVH_INFO_START.0
            }
        );
        let si: hvm_start_info = m.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.rsdp_paddr, 0xe0000);
        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.memmap_entries as usize, e820_entries(size).len());
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 1234));
        let last: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(
                si.memmap_paddr + 24 * (u64::from(si.memmap_entries) - 1),
            ))
            .unwrap();
        assert_eq!(last.addr + last.size, size);
    }

    #[test]
    fn linux_boot_params_carry_e820_cmdline_initrd_rsdp() {
        let size = 0x400_0000;
        let m = mem(size);
        let k = LoadedKernel {
            entry: KernelEntry::BzImage {
                load: GuestAddress(0x10_0000),
                header: setup_header {
                    version: 0x020f,
                    xloadflags: 1,
                    ..Default::default()
                },
            },
            end: 0x20_0000,
            is_linux: true,
        };
        let entry = configure_boot(
            &m,
            size,
            &k,
            42,
            Some((GuestAddress(0x300_0000), 99)),
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry::Linux64 {
                entry: 0x10_0200,
                boot_params: ZERO_PAGE_START.0
            }
        );
        let p: boot_params = m.read_obj(ZERO_PAGE_START).unwrap();
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x300_0000, 99)
        );
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820_entries(size).len());
    }
}

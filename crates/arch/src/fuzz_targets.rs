//! The `kernel_loader` fuzz body: a kernel image is what the user hands in, and a hostile or
//! broken one must be refused with an error, never crash the VMM. The `fuzz/` crate calls
//! it; `cargo test` replays the committed corpus through it.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::x86_64::boot::{load_initrd, load_kernel, KernelEntry};
use crate::x86_64::layout::{low_ram_end, HIGH_MEMORY_START};

/// Guest RAM for the loader: small, so images that ask for more are refused quickly.
const MEM_SIZE: u64 = 8 << 20;

/// `data` as a file (a memfd), positioned at its start.
fn memfd(data: &[u8]) -> File {
    // SAFETY: memfd_create with a NUL-terminated name; the descriptor is ours.
    let mut file = unsafe {
        let fd = libc::memfd_create(c"vireo-fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        File::from_raw_fd(fd)
    };
    file.write_all(data).expect("memfd write");
    file
}

/// `kernel_loader`: `load_kernel` (ELF with or without a PVH note, bzImage) on arbitrary file
/// contents into 8 MiB of guest RAM, then `load_initrd` of the same bytes above it. Asserts:
/// a loaded kernel ends at or above its load address and, for a bzImage, has a 2.06+ header
/// with the 64-bit entry; an initramfs that loads is page aligned, above the kernel and 1
/// MiB, and inside low RAM.
pub fn kernel_loader(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)])
        .expect("guest memory");
    let mut file = memfd(data);
    let Ok(kernel) = load_kernel(&mem, &mut file) else {
        return;
    };
    match kernel.entry {
        KernelEntry::BzImage { load, header } => {
            let (version, xloadflags) = (header.version, header.xloadflags);
            assert!(version >= 0x0206, "bzImage protocol {version:#x}");
            assert_ne!(xloadflags & 1, 0, "bzImage without the 64-bit entry");
            assert!(kernel.end >= load.0, "kernel ends below its load address");
        }
        KernelEntry::Pvh(_) | KernelEntry::Elf64(_) => {}
    }
    let _ = kernel.protocol();
    if data.is_empty() {
        return;
    }
    let mut initrd = memfd(data);
    if let Ok((addr, size)) = load_initrd(&mem, MEM_SIZE, &kernel, &mut initrd) {
        assert_eq!(size, data.len() as u64);
        assert_eq!(addr.0 % 4096, 0, "initramfs page aligned");
        assert!(addr.0 >= kernel.end && addr.0 >= HIGH_MEMORY_START.0);
        assert!(
            addr.0 + size <= low_ram_end(MEM_SIZE),
            "initramfs inside low RAM"
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_loader_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/kernel_loader");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for path in files {
            super::kernel_loader(&std::fs::read(&path).unwrap());
        }
    }
}

//! Builds the probe guest (`crates/probe`) into a PVH ELF and a bzImage, and proves from the
//! disassembly that its code avoids the instructions this host's KVM emulator rejects.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

pub struct ProbeImages {
    pub elf: PathBuf,
    pub bzimage: PathBuf,
}

const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where the image is linked and loaded (crates/probe/link.ld).
const LOAD_ADDR: u64 = 0x10_0000;
/// The 64-bit entry, load address + 0x200 (boot.rst, "64-bit boot protocol").
const ENTRY64: u64 = LOAD_ADDR + 0x200;
/// Offset of the real-mode code in the setup part (crates/probe/src/asm/setup.s); the bytes
/// before it are the boot sector and the setup header.
const SETUP_CODE: u64 = 0x280;

/// Codegen for the probe only: baseline x86-64, no SSE (so no x87/SSE/AVX registers at all),
/// absolute addressing at the link address. Linking is set up by crates/probe/build.rs.
const RUSTFLAGS: &[&str] = &[
    "-C",
    "target-cpu=x86-64",
    "-C",
    "target-feature=-sse,-sse2,+soft-float",
    "-C",
    "relocation-model=static",
    "-C",
    "force-unwind-tables=no",
];

/// Builds `target/kit/probe/probe.elf` and `probe.bzimage` (in `out_dir`).
pub fn build(root: &Path, out_dir: &Path) -> Result<ProbeImages> {
    let target_dir = root.join("target/probe");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--quiet",
            "-p",
            "probe",
            "--profile",
            "probe",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"))
        .env_remove("RUSTFLAGS")
        .output()
        .context("cannot run cargo to build the probe")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("building the probe failed:\n{stderr}");
    }
    let unexpected = unexpected_diagnostics(&stderr);
    if !unexpected.is_empty() {
        eprint!("{unexpected}");
    }

    let built = target_dir.join(TARGET).join("probe/probe");
    let elf = std::fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    let image = Elf::parse(&elf).context("the probe ELF is not what link.ld should produce")?;
    let flat = image.flat()?;
    let setup = image.setup_header(flat.len() as u64)?;
    let checked = check_instructions(&built)?;

    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let images = ProbeImages {
        elf: out_dir.join("probe.elf"),
        bzimage: out_dir.join("probe.bzimage"),
    };
    std::fs::write(&images.elf, &elf)
        .with_context(|| format!("cannot write {}", images.elf.display()))?;
    let bz = [setup, flat].concat();
    std::fs::write(&images.bzimage, &bz)
        .with_context(|| format!("cannot write {}", images.bzimage.display()))?;
    eprintln!(
        "probe: {} bytes (ELF {}, bzImage {}), instruction check ok ({checked} instructions)",
        image.flat_len(),
        elf.len(),
        bz.len()
    );
    Ok(images)
}

/// Rustc's warnings about the ABI-changing target features are expected (the probe uses no
/// floating point); anything else is shown.
fn unexpected_diagnostics(stderr: &str) -> String {
    let expected = |block: &str| {
        let first = block.lines().next().unwrap_or("");
        first.starts_with("warning: target feature `")
            || first.starts_with("warning: unknown and unstable feature")
            || (first.starts_with("warning: `probe`") && first.contains("generated"))
            || first.trim().is_empty()
    };
    stderr
        .split("\n\n")
        .filter(|b| !expected(b))
        .map(|b| format!("{}\n\n", b.trim_end()))
        .collect()
}

/// FNV-1a over 64-bit little-endian words, the last one zero-padded: the probe's initrd hash
/// (`probe: initrd size=<n> fnv1a64w=0x<16 hex digits>`).
#[cfg_attr(not(test), allow(dead_code))] // for tests that check the probe's initrd line
pub fn fnv1a64w(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h ^= u64::from_le_bytes(w);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn le(b: &[u8], off: u64, n: usize) -> Result<u64> {
    let off = usize::try_from(off)?;
    let s = b
        .get(off..off + n)
        .with_context(|| format!("ELF field at {off:#x} out of range"))?;
    Ok(s.iter().rev().fold(0, |v, &x| v << 8 | x as u64))
}

struct Segment {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

struct Elf<'a> {
    data: &'a [u8],
    segments: Vec<Segment>,
    /// The non-allocated `.setup` section: (file offset, size).
    setup: (u64, u64),
}

impl<'a> Elf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self> {
        ensure!(
            data.get(..4) == Some(b"\x7fELF".as_slice()),
            "not an ELF file"
        );
        ensure!(le(data, 4, 2)? == 0x0102, "not a little-endian ELF64 file");
        ensure!(le(data, 0x12, 2)? == 62, "not an x86-64 ELF file");
        ensure!(
            le(data, 0x18, 8)? == ENTRY64,
            "ELF entry is not {ENTRY64:#x}"
        );
        let (phoff, phnum) = (le(data, 0x20, 8)?, le(data, 0x38, 2)?);
        let (shoff, shnum, shstrndx) = (le(data, 0x28, 8)?, le(data, 0x3c, 2)?, le(data, 0x3e, 2)?);
        let mut segments = Vec::new();
        for i in 0..phnum {
            let p = phoff + i * 56;
            segments.push(Segment {
                kind: le(data, p, 4)? as u32,
                offset: le(data, p + 8, 8)?,
                paddr: le(data, p + 24, 8)?,
                filesz: le(data, p + 32, 8)?,
                memsz: le(data, p + 40, 8)?,
            });
        }
        let strtab = le(data, shoff + shstrndx * 64 + 24, 8)?;
        let mut setup = None;
        for i in 0..shnum {
            let s = shoff + i * 64;
            let name = (strtab + le(data, s, 4)?) as usize;
            if data.get(name..name + 7) == Some(b".setup\0".as_slice()) {
                setup = Some((le(data, s + 24, 8)?, le(data, s + 32, 8)?));
            }
        }
        let elf = Elf {
            data,
            segments,
            setup: setup.context("no .setup section")?,
        };
        elf.check_pvh_note()?;
        Ok(elf)
    }

    fn bytes(&self, off: u64, len: u64) -> Result<&'a [u8]> {
        let (off, len) = (usize::try_from(off)?, usize::try_from(len)?);
        self.data
            .get(off..off + len)
            .context("ELF contents out of range")
    }

    /// PT_NOTE "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), pointing into the image.
    fn check_pvh_note(&self) -> Result<()> {
        for s in self.segments.iter().filter(|s| s.kind == 4) {
            let notes = self.bytes(s.offset, s.filesz)?;
            let mut at = 0u64;
            while at + 12 <= notes.len() as u64 {
                let (namesz, descsz, kind) = (
                    le(notes, at, 4)?,
                    le(notes, at + 4, 4)?,
                    le(notes, at + 8, 4)?,
                );
                let desc = at + 12 + namesz.div_ceil(4) * 4;
                let name = self.bytes(s.offset + at + 12, namesz)?;
                if name == b"Xen\0" && kind == 18 && (descsz == 4 || descsz == 8) {
                    let entry = le(notes, desc, descsz as usize)?;
                    ensure!(
                        (LOAD_ADDR..LOAD_ADDR + self.flat_len() as u64).contains(&entry),
                        "PVH entry {entry:#x} outside the image"
                    );
                    return Ok(());
                }
                at = desc + descsz.div_ceil(4) * 4;
            }
        }
        bail!("no PVH entry note (Xen, type 18)")
    }

    fn loads(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(|s| s.kind == 1)
    }

    fn flat_len(&self) -> usize {
        self.loads()
            .map(|s| s.paddr + s.filesz)
            .max()
            .unwrap_or(LOAD_ADDR)
            .saturating_sub(LOAD_ADDR) as usize
    }

    /// The loaded image as one flat binary starting at `LOAD_ADDR` (objcopy -O binary).
    fn flat(&self) -> Result<Vec<u8>> {
        let low = self
            .loads()
            .map(|s| s.paddr)
            .min()
            .context("no PT_LOAD segment")?;
        ensure!(
            low == LOAD_ADDR,
            "image starts at {low:#x}, not {LOAD_ADDR:#x}"
        );
        let mut flat = vec![0u8; self.flat_len()];
        for s in self.loads() {
            let at = (s.paddr - LOAD_ADDR) as usize;
            flat[at..at + s.filesz as usize].copy_from_slice(self.bytes(s.offset, s.filesz)?);
        }
        Ok(flat)
    }

    /// The real-mode setup part with its size fields filled in (boot.rst, "The real-mode
    /// kernel header").
    fn setup_header(&self, flat_len: u64) -> Result<Vec<u8>> {
        let mut setup = self.bytes(self.setup.0, self.setup.1)?.to_vec();
        let sectors = setup.len() / 512;
        ensure!(
            setup.len() % 512 == 0 && (2..=64).contains(&sectors),
            "setup is {} bytes",
            setup.len()
        );
        ensure!(
            le(&setup, 0x1fe, 2)? == 0xaa55 && &setup[0x202..0x206] == b"HdrS",
            "no setup header"
        );
        ensure!(
            le(&setup, 0x206, 2)? == 0x020f,
            "setup header version is not 2.15"
        );
        ensure!(
            le(&setup, 0x214, 4)? == LOAD_ADDR && le(&setup, 0x258, 8)? == LOAD_ADDR,
            "load address mismatch"
        );
        let end = self
            .loads()
            .map(|s| s.paddr + s.memsz)
            .max()
            .unwrap_or(LOAD_ADDR);
        let init_size = u32::try_from((end - LOAD_ADDR).div_ceil(4096) * 4096)?;
        setup[0x1f1] = (sectors - 1) as u8; // setup_sects
        setup[0x1f4..0x1f8].copy_from_slice(&u32::try_from(flat_len.div_ceil(16))?.to_le_bytes()); // syssize
        setup[0x260..0x264].copy_from_slice(&init_size.to_le_bytes()); // init_size
        Ok(setup)
    }
}

/// Disassembles every code section in the mode it runs in and rejects what this host's KVM
/// instruction emulator cannot run (or that is off limits for a guest on a PVM host): x87,
/// MMX, SSE, AVX, and the instructions of CPUID features a PVM VMM hides. `int3` is accepted
/// only as padding after the end of a function, and where `DELIBERATE` names it.
fn check_instructions(elf: &Path) -> Result<usize> {
    let runs: [(&str, &str, Option<u64>); 4] = [
        (".text32", "i386", None),
        (".text16", "i8086", None),
        (".text", "x86-64", None),
        (".setup", "i8086", Some(SETUP_CODE)),
    ];
    let mut total = 0;
    let mut problems = Vec::new();
    for (section, mode, start) in runs {
        let mut cmd = Command::new("objdump");
        cmd.args(["-D", "--no-show-raw-insn", "-M", mode, "-j", section]);
        if let Some(s) = start {
            cmd.arg(format!("--start-address={s:#x}"));
        }
        let out = cmd
            .arg(elf)
            .output()
            .context("cannot run objdump (binutils)")?;
        ensure!(
            out.status.success(),
            "objdump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let (n, found) = scan_disassembly(&text);
        ensure!(n > 0, "objdump shows no instructions in {section}");
        total += n;
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{section} ({mode}): {p}")),
        );
    }
    if !problems.is_empty() {
        bail!(
            "the probe contains instructions this host's KVM emulator may reject:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(total)
}

/// Mnemonics rejected outright (x87 is every mnemonic starting with `f`, VEX ones start with `v`).
const DENIED: &[&str] = &[
    "popcnt",
    "lzcnt",
    "tzcnt",
    "cmpxchg16b",
    "int3",
    "rdtscp",
    "rdrand",
    "rdseed",
    "rdpid",
    "movbe",
    "crc32",
    "andn",
    "bextr",
    "blsi",
    "blsmsk",
    "blsr",
    "bzhi",
    "mulx",
    "pdep",
    "pext",
    "rorx",
    "sarx",
    "shlx",
    "shrx",
    "adcx",
    "adox",
    "ldmxcsr",
    "stmxcsr",
    "emms",
    "movnti",
    "clflushopt",
    "clwb",
    "(bad)",
];
/// Rejected instructions the probe executes on purpose, each allowed only under one symbol:
/// (symbol, instruction as objdump prints it). `fault_emulation_insn` (crates/probe/src/asm/
/// fault.s) is `probe.mode=fault-emulation`: its `int3` must make KVM's emulator fail, so that a
/// VMM's handling of KVM_EXIT_INTERNAL_ERROR can be tested. Everywhere else these stay denied.
const DELIBERATE: &[(&str, &str)] = &[("fault_emulation_insn", "int3")];

const DENIED_REGS: &[&str] = &[
    "%xmm", "%ymm", "%zmm", "%st", "%mm", "%k0", "%k1", "%k2", "%k3", "%k4", "%k5", "%k6", "%k7",
];

fn denied(insn: &str) -> bool {
    let mnemonic_denied = insn
        .split_whitespace()
        .take_while(|t| !t.contains(['%', '$', '(']))
        .any(|t| {
            DENIED.contains(&t)
                || t.starts_with("xsave")
                || t.starts_with("xrstor")
                || (t.starts_with('f') && t != "fs")
                || (t.starts_with('v') && t != "verr" && t != "verw")
        });
    mnemonic_denied || DENIED_REGS.iter().any(|r| insn.contains(r))
}

/// Returns (instructions seen, problems). Regions under symbols ending in `_data` are data.
fn scan_disassembly(text: &str) -> (usize, Vec<String>) {
    let mut seen = 0;
    let mut problems = Vec::new();
    let mut in_data = false;
    let mut pending_int3: Vec<String> = Vec::new();
    let mut symbol = String::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, n)| n)
        {
            pending_int3.clear(); // int3 up to a symbol boundary is padding
            in_data = name.ends_with("_data");
            symbol = name.to_string();
            continue;
        }
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        if in_data || !addr.trim_start().chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let insn = insn.trim();
        seen += 1;
        if DELIBERATE.contains(&(symbol.as_str(), insn)) {
            continue;
        }
        if insn == "int3" {
            pending_int3.push(format!("{} in {symbol}: int3", addr.trim()));
            continue;
        }
        problems.append(&mut pending_int3);
        if denied(insn) {
            problems.push(format!("{} in {symbol}: {insn}", addr.trim()));
        }
    }
    (seen, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64w_vectors() {
        assert_eq!(fnv1a64w(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64w(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64w(b"abcdefgh"), 0x3919_eeb0_0ee1_e68c);
        assert_eq!(fnv1a64w(b"abcdefghi"), 0xe8f7_7a29_49db_571f);
        assert_eq!(fnv1a64w(b"probe guest\n"), 0x3b99_a5af_911b_d0fe);
    }

    #[test]
    fn disassembly_scan() {
        let ok = "0000000000100000 <f>:\n  100000:\tmov    $0x2,%edi\n  100005:\trep stos %al,%es:(%rdi)\n  \
                  100007:\tcall   100010 <g>\n  100008:\tint3\n\n0000000000100010 <g_data>:\n  100010:\tfwait\n";
        assert_eq!(scan_disassembly(ok), (4, Vec::<String>::new()));
        let bad = "0000000000100000 <f>:\n  100000:\tint3\n  100001:\tret\n  100002:\tpopcnt %eax,%eax\n  \
                   100005:\tmovaps %xmm0,(%rsp)\n  100009:\tfldz\n  10000b:\tlock cmpxchg16b (%rdi)\n";
        assert_eq!(scan_disassembly(bad).1.len(), 5);
        // The deliberate int3 is allowed under its own symbol only, and nothing else is.
        let fault = "0000000000100000 <fault_emulation_insn>:\n  100000:\tint3\n  \
                     100001:\tjmp    100010 <halt_forever>\n  100003:\tlock cmpxchg16b (%rdi)\n\n\
                     0000000000100010 <fault_emulation>:\n  100010:\tint3\n  100011:\tret\n";
        let found = scan_disassembly(fault).1;
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].ends_with("in fault_emulation_insn: lock cmpxchg16b (%rdi)"));
        assert!(found[1].ends_with("in fault_emulation: int3"));
    }
}

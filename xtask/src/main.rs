//! Project tasks: the guest kit and the benchmarks.

mod probe;

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("xtask has no parent directory"))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("probe") => {
            let images = probe::build(&root, &root.join("target/kit/probe"))?;
            println!("{}\n{}", images.elf.display(), images.bzimage.display());
        }
        _ => anyhow::bail!("usage: cargo xtask probe"),
    }
    Ok(())
}

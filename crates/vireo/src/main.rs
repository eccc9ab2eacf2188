//! `vireo`: boot a VM from the command line or a JSON config.

use vireo::cli;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vireo: error: {msg}");
    ExitCode::from(1)
}

/// The most a config file may hold: it is a few lines of JSON.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads the `--config` file; a FIFO or device is refused rather than waited on.
fn read_config(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let f = vmm::files::open_regular("--config", path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("--config {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!(
            "--config {}: larger than {} KiB",
            path.display(),
            MAX_CONFIG_BYTES >> 10
        ));
    }
    Ok(text)
}

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line names the problem; the rest is usage we don't repeat.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };

    let level = match cli::parse_log_level(&args.log_level) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    // A plain level filter: the environment-driven filter would pull a regex engine into
    // every process (and its pages into every VM's memory) for a choice of six words.
    let filter: tracing_subscriber::filter::LevelFilter = match level.parse() {
        Ok(f) => f,
        Err(e) => return fail(format!("--log-level: {e}")),
    };
    tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();

    let file = match &args.config {
        Some(path) => match read_config(path) {
            Ok(text) => match cli::parse_config_file(path, &text) {
                Ok(f) => Some(f),
                Err(e) => return fail(e),
            },
            Err(e) => return fail(e),
        },
        None => None,
    };
    let config = match args.into_vm_config(file) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    match vmm::run(&config) {
        Ok(status) => ExitCode::from(status.0.clamp(0, 255) as u8),
        Err(e) => fail(e),
    }
}

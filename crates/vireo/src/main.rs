//! `vireo`: boot a VM from the command line or a JSON config.

mod cli;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vireo: error: {msg}");
    ExitCode::from(1)
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
    let filter = match tracing_subscriber::EnvFilter::try_new(level) {
        Ok(f) => f,
        Err(e) => return fail(format!("--log-level: {e}")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();

    let file = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match cli::parse_config_file(path, &text) {
                Ok(f) => Some(f),
                Err(e) => return fail(e),
            },
            Err(e) => return fail(format!("--config {}: {e}", path.display())),
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

//! The `cli_config` fuzz body: option strings and config files are user input, and a bad one
//! must be refused with an error naming it, never a panic. The `fuzz/` crate calls it;
//! `cargo test` replays the committed corpus through it.

use std::path::Path;

use clap::Parser;

use crate::cli::{self, Cli};

/// `cli_config`: the input is an argument vector (NUL-separated, after `vireo`), then after
/// a 0xff byte a JSON config file. Each argument also goes through every option parser on
/// its own. Asserts: no panic; a size of plain digits parses to its value; an accepted log
/// level is one of the six names; an accepted disk has a path; an accepted interface has a
/// tap name and a unicast, non-zero MAC; a config merged from both is the same when built
/// twice.
pub fn cli_config(data: &[u8]) {
    let (argv, json) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let args: Vec<String> = argv
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .take(64)
        .collect();
    for a in &args {
        each_parser(a);
    }
    let file_text = json.and_then(|j| std::str::from_utf8(j).ok());
    let file = match file_text {
        Some(text) => match cli::parse_config_file(Path::new("fuzz.json"), text) {
            Ok(f) => Some(f),
            Err(e) => {
                let _ = e.to_string();
                return;
            }
        },
        None => None,
    };
    let parse = || Cli::try_parse_from(std::iter::once("vireo".to_string()).chain(args.clone()));
    let Ok(first) = parse() else {
        return;
    };
    let again = file_text.map(|t| cli::parse_config_file(Path::new("fuzz.json"), t));
    match first.into_vm_config(file) {
        Ok(config) => {
            for disk in &config.disks {
                assert!(
                    !disk.path.as_os_str().is_empty() || file_text.is_some(),
                    "a --disk without a path"
                );
            }
            for net in &config.nets {
                assert!(!net.tap.is_empty(), "an interface without a tap");
                if let Some(mac) = net.mac {
                    check_mac(mac);
                }
            }
            let second = parse()
                .expect("parses twice")
                .into_vm_config(again.map(|r| r.expect("parses twice")))
                .expect("builds twice");
            assert_eq!(format!("{config:?}"), format!("{second:?}"));
            let _ = config.validate();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn check_mac(mac: [u8; 6]) {
    assert_eq!(mac[0] & 1, 0, "a multicast MAC accepted");
    assert_ne!(mac, [0; 6], "an all-zero MAC accepted");
}

fn each_parser(s: &str) {
    if let Some(n) = cli::parse_size(s) {
        let t = s.trim();
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            assert_eq!(Some(n), t.parse().ok(), "size {s:?}");
        }
    }
    if let Ok(level) = cli::parse_log_level(s) {
        assert!(level.eq_ignore_ascii_case(s), "log level {s:?} -> {level}");
    }
    let _ = cli::parse_cpus(s);
    let _ = cli::parse_memory(s);
    let _ = cli::parse_platform(s);
    let _ = cli::parse_serial(s);
    if let Ok(disk) = cli::parse_disk(s) {
        assert!(
            !disk.path.as_os_str().is_empty(),
            "disk {s:?} without a path"
        );
    }
    if let Ok(net) = cli::parse_net(s) {
        assert!(!net.tap.is_empty(), "net {s:?} without a tap");
        if let Some(mac) = net.mac {
            check_mac(mac);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_config_corpus() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/cli_config");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for path in files {
            super::cli_config(&std::fs::read(&path).unwrap());
        }
    }
}

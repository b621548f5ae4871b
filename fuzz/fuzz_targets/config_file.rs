//! The TOML config file: any text either converts to a validated config or yields one located
//! error (a line inside the file, a non-empty key, a one-line message); never a panic. Parsing is
//! deterministic, and a config that loads passes the gateway's validation again.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_cli::file_config::parse;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    // Certificate paths are read from disk: keep the fuzzer away from device and process files
    // (a FIFO or /dev/zero would block or never end).
    if ["/dev", "/proc", "/sys", "/run"]
        .iter()
        .any(|d| src.contains(d))
    {
        return;
    }
    let base = Path::new("/nonexistent-tether-fuzz");
    let lines = src.split('\n').count();
    match parse(src, base) {
        Ok(loaded) => {
            assert!(loaded.config.validate().is_ok());
            assert!(parse(src, base).is_ok(), "not deterministic");
            for l in &loaded.config.listeners {
                for n in &l.trusted_peers {
                    assert_eq!(n.to_string().parse().ok(), Some(*n));
                }
            }
        }
        Err(e) => {
            assert!(
                (1..=lines).contains(&e.line),
                "line {} of {lines}: {e:?}",
                e.line
            );
            assert!(!e.key.is_empty(), "{e:?}");
            assert!(!e.message.trim().is_empty(), "{e:?}");
            assert!(!e.message.contains('\n'), "multi-line message: {e:?}");
            assert_eq!(parse(src, base).err(), Some(e), "not deterministic");
        }
    }
});

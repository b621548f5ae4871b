//! Deadline budget headers (`x-request-timeout-ms`, `grpc-timeout`): parsing never panics, a
//! parsed budget re-encodes to a value that parses back to the same (ms) or to at most the same,
//! a hundred-thousandth below (gRPC, rounded down to 8 digits), and encoding is idempotent.
#![no_main]

use std::time::Duration;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tether::budget::{
    format_budget_ms, format_grpc_timeout, parse_budget_header, parse_budget_ms,
    parse_grpc_timeout, parse_grpc_timeout_header,
};

/// gRPC's largest timeout: 8 digits of hours.
const GRPC_MAX: Duration = Duration::from_secs(99_999_999 * 3600);

fuzz_target!(|data: &[u8]| {
    // Header values need not be UTF-8: both parsers must refuse obs-text cleanly.
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let ms = parse_budget_header(&v);
        let grpc = parse_grpc_timeout_header(&v);
        if let Ok(s) = v.to_str() {
            assert_eq!(ms, parse_budget_ms(s));
            assert_eq!(grpc, parse_grpc_timeout(s));
        } else {
            assert!(ms.is_err() && grpc.is_err());
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(d) = parse_budget_ms(s) {
            let digits = s.trim_matches([' ', '\t']);
            assert!(digits.len() <= 20, "{s:?}");
            assert_eq!(Some(d.as_millis()), digits.parse::<u128>().ok(), "{s:?}");
            let v = format_budget_ms(d);
            assert_eq!(parse_budget_header(&v), Ok(d), "{s:?}");
            assert_eq!(format_budget_ms(d), v);
        }
        if let Ok(d) = parse_grpc_timeout(s) {
            check_grpc(d, s);
        }
    }
    // Any duration (from the first 12 bytes) encodes to values the parsers accept.
    if data.len() >= 12 {
        let secs = u64::from_le_bytes(data[..8].try_into().unwrap_or_default());
        let nanos = u32::from_le_bytes(data[8..12].try_into().unwrap_or_default()) % 1_000_000_000;
        let d = Duration::new(secs, nanos);
        let ms = parse_budget_header(&format_budget_ms(d)).expect("formatted budget parses");
        assert_eq!(
            ms.as_millis(),
            d.as_millis().min(u128::from(u64::MAX)),
            "{d:?}"
        );
        let back = parse_grpc_timeout_header(&format_grpc_timeout(d)).expect("grpc-timeout parses");
        assert!(back <= d.min(GRPC_MAX), "{d:?} -> {back:?}");
        check_grpc(back, "re-encoded");
    }
});

fn check_grpc(d: Duration, input: &str) {
    assert!(d <= GRPC_MAX, "{input:?}");
    let v = format_grpc_timeout(d);
    assert!(v.len() <= 9, "{input:?} -> {v:?}");
    let back = parse_grpc_timeout_header(&v).expect("formatted grpc-timeout parses");
    // Rounded down, by less than one unit of the finest unit holding 8 digits.
    assert!(back <= d, "{input:?}");
    assert!((d - back).as_nanos() * 100_000 <= d.as_nanos(), "{input:?}");
    assert_eq!(format_grpc_timeout(back), v, "{input:?}: not idempotent");
}

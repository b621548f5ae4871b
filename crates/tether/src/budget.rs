//! Deadline budgets carried in request headers.
//!
//! Two encodings, both *relative* (a time left, never a wall-clock instant, so clock skew between
//! machines does not matter):
//! - tether's budget header ([`DEFAULT_BUDGET_HEADER`], name configurable): whole milliseconds,
//!   e.g. `x-request-timeout-ms: 1500`;
//! - gRPC's [`GRPC_TIMEOUT_HEADER`]: at most 8 digits and a unit, `H` (hours), `M` (minutes),
//!   `S` (seconds), `m` (milliseconds), `u` (microseconds) or `n` (nanoseconds), e.g. `1500m`.
//!
//! The functions are pure (`&str`/`&HeaderValue` in, `Duration` out) so both the library layer and
//! the gateway use them. Formatting rounds **down**: a budget sent onward never exceeds the time
//! actually left.

use std::time::Duration;

use http::HeaderValue;

/// The default name of the budget header: the time left for the request, in milliseconds.
pub const DEFAULT_BUDGET_HEADER: &str = "x-request-timeout-ms";

/// gRPC's timeout header.
pub const GRPC_TIMEOUT_HEADER: &str = "grpc-timeout";

/// Longest budget-header value accepted, in digits (`u64::MAX` has 20).
const MAX_MS_DIGITS: usize = 20;

/// gRPC allows at most this many digits before the unit.
const MAX_GRPC_DIGITS: usize = 8;

/// Why a budget header could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The value is empty (or only whitespace).
    #[error("budget is empty")]
    Empty,
    /// The value contains something other than ASCII digits (and, for gRPC, a final unit).
    #[error("budget is not a decimal number")]
    NotANumber,
    /// More digits than the encoding allows (20 for milliseconds, 8 for gRPC).
    #[error("budget has too many digits")]
    TooManyDigits,
    /// The number does not fit in a duration.
    #[error("budget overflows")]
    Overflow,
    /// A gRPC timeout without one of the units `H`, `M`, `S`, `m`, `u`, `n`.
    #[error("grpc-timeout has no valid unit")]
    BadUnit,
}

/// Parses a millisecond budget such as `"1500"`. Surrounding spaces and tabs are ignored; a sign,
/// a fraction or a unit is an error.
pub fn parse_budget_ms(value: &str) -> Result<Duration, BudgetError> {
    let digits = value.trim_matches([' ', '\t']);
    let ms = parse_digits(digits, MAX_MS_DIGITS)?;
    Ok(Duration::from_millis(ms))
}

/// [`parse_budget_ms`] for a header value; a value that is not visible ASCII is
/// [`BudgetError::NotANumber`].
pub fn parse_budget_header(value: &HeaderValue) -> Result<Duration, BudgetError> {
    parse_budget_ms(value.to_str().map_err(|_| BudgetError::NotANumber)?)
}

/// Formats a budget as whole milliseconds, rounded down (so `999µs` becomes `0`: already due).
pub fn format_budget_ms(budget: Duration) -> HeaderValue {
    // u128 milliseconds of any Duration fit easily in a u128; clamp to u64 for the header.
    let ms = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX);
    HeaderValue::from(ms)
}

/// Parses a gRPC timeout such as `"1500m"`, `"2S"` or `"100u"` (gRPC over HTTP/2 spec:
/// `1*8DIGIT` followed by `H`, `M`, `S`, `m`, `u` or `n`).
pub fn parse_grpc_timeout(value: &str) -> Result<Duration, BudgetError> {
    let value = value.trim_matches([' ', '\t']);
    let Some(unit) = value.chars().last() else {
        return Err(BudgetError::Empty);
    };
    if unit.is_ascii_digit() {
        return Err(BudgetError::BadUnit);
    }
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() {
        return Err(if unit.is_ascii_alphabetic() {
            BudgetError::NotANumber
        } else {
            BudgetError::BadUnit
        });
    }
    let n = parse_digits(digits, MAX_GRPC_DIGITS)?;
    // With at most 8 digits none of these can overflow: 99_999_999 hours fit in u64 seconds.
    let d = match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return Err(BudgetError::BadUnit),
    };
    Ok(d)
}

/// [`parse_grpc_timeout`] for a header value.
pub fn parse_grpc_timeout_header(value: &HeaderValue) -> Result<Duration, BudgetError> {
    parse_grpc_timeout(value.to_str().map_err(|_| BudgetError::NotANumber)?)
}

/// Formats a gRPC timeout in the finest unit whose value fits in 8 digits, rounded down.
/// Durations beyond 99 999 999 hours are clamped to that.
pub fn format_grpc_timeout(budget: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = budget.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let (n, unit) = units
        .iter()
        .map(|&(per, unit)| (nanos / per, unit))
        .find(|&(n, _)| n <= MAX)
        .unwrap_or((MAX, 'H'));
    let text = format!("{n}{unit}");
    // Digits and an ASCII letter are always a valid header value.
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("99999999H"))
}

fn parse_digits(digits: &str, max_digits: usize) -> Result<u64, BudgetError> {
    if digits.is_empty() {
        return Err(BudgetError::Empty);
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BudgetError::NotANumber);
    }
    if digits.len() > max_digits {
        return Err(BudgetError::TooManyDigits);
    }
    digits.parse::<u64>().map_err(|_| BudgetError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ms_budget_parses_and_rejects() {
        assert_eq!(parse_budget_ms("1500"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_budget_ms(" 0\t"), Ok(Duration::ZERO));
        assert_eq!(parse_budget_ms("007"), Ok(Duration::from_millis(7)));
        assert_eq!(parse_budget_ms(""), Err(BudgetError::Empty));
        assert_eq!(parse_budget_ms("  "), Err(BudgetError::Empty));
        assert_eq!(parse_budget_ms("-1"), Err(BudgetError::NotANumber));
        assert_eq!(parse_budget_ms("+1"), Err(BudgetError::NotANumber));
        assert_eq!(parse_budget_ms("1.5"), Err(BudgetError::NotANumber));
        assert_eq!(parse_budget_ms("15ms"), Err(BudgetError::NotANumber));
        assert_eq!(parse_budget_ms("1 5"), Err(BudgetError::NotANumber));
        assert_eq!(
            parse_budget_ms("18446744073709551615"),
            Ok(Duration::from_millis(u64::MAX))
        );
        assert_eq!(
            parse_budget_ms("18446744073709551616"),
            Err(BudgetError::Overflow)
        );
        assert_eq!(
            parse_budget_ms("000000000000000000001"),
            Err(BudgetError::TooManyDigits)
        );
    }

    #[test]
    fn ms_budget_header_value() {
        let v = HeaderValue::from_static("250");
        assert_eq!(parse_budget_header(&v), Ok(Duration::from_millis(250)));
        let bad = HeaderValue::from_bytes(b"2\xff").unwrap();
        assert_eq!(parse_budget_header(&bad), Err(BudgetError::NotANumber));
    }

    #[test]
    fn ms_budget_formats_rounding_down() {
        assert_eq!(format_budget_ms(Duration::from_millis(1500)), "1500");
        assert_eq!(format_budget_ms(Duration::from_micros(1999)), "1");
        assert_eq!(format_budget_ms(Duration::from_micros(999)), "0");
        assert_eq!(
            format_budget_ms(Duration::MAX),
            u64::MAX.to_string().as_str()
        );
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("1500m"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_grpc_timeout("2S"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("100u"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("5H"), Ok(Duration::from_secs(5 * 3600)));
        assert_eq!(parse_grpc_timeout("3M"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("7n"), Ok(Duration::from_nanos(7)));
        assert_eq!(
            parse_grpc_timeout("99999999H"),
            Ok(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn grpc_timeout_rejects() {
        assert_eq!(parse_grpc_timeout(""), Err(BudgetError::Empty));
        assert_eq!(parse_grpc_timeout("S"), Err(BudgetError::NotANumber));
        assert_eq!(parse_grpc_timeout("100"), Err(BudgetError::BadUnit));
        assert_eq!(parse_grpc_timeout("100s"), Err(BudgetError::BadUnit));
        assert_eq!(parse_grpc_timeout("100x"), Err(BudgetError::BadUnit));
        assert_eq!(parse_grpc_timeout("100é"), Err(BudgetError::BadUnit));
        assert_eq!(
            parse_grpc_timeout("123456789m"),
            Err(BudgetError::TooManyDigits)
        );
        assert_eq!(parse_grpc_timeout("-1S"), Err(BudgetError::NotANumber));
        assert_eq!(parse_grpc_timeout("1.5S"), Err(BudgetError::NotANumber));
        let bad = HeaderValue::from_bytes(b"1\xffS").unwrap();
        assert_eq!(
            parse_grpc_timeout_header(&bad),
            Err(BudgetError::NotANumber)
        );
    }

    #[test]
    fn grpc_timeout_formats_in_finest_fitting_unit() {
        assert_eq!(format_grpc_timeout(Duration::ZERO), "0n");
        assert_eq!(
            format_grpc_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(format_grpc_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200)), "200000m");
        assert_eq!(format_grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(format_grpc_timeout(Duration::MAX), "99999999H");
        for d in [
            Duration::from_millis(1),
            Duration::from_secs(3),
            Duration::from_secs(1_000_000),
        ] {
            let v = format_grpc_timeout(d);
            let back = parse_grpc_timeout_header(&v).unwrap();
            assert!(back <= d && d - back < Duration::from_secs(1), "{d:?}");
        }
    }

    /// Fixed-seed pseudo-random inputs (xorshift64*), biased towards what the parsers look at:
    /// valid values mutated by inserting, replacing and truncating pieces.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }

        fn boundary(&mut self, s: &str) -> usize {
            let mut i = (self.next() % (s.len() as u64 + 1)) as usize;
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            i
        }

        fn string(&mut self, seeds: &[&str], pieces: &[&str]) -> String {
            let mut s = if self.next().is_multiple_of(4) {
                String::new()
            } else {
                self.pick(seeds).to_owned()
            };
            for _ in 0..self.next() % 5 {
                let at = self.boundary(&s);
                match self.next() % 4 {
                    0 => s.truncate(at),
                    1 => {
                        let raw: Vec<u8> =
                            (0..self.next() % 4).map(|_| self.next() as u8).collect();
                        s.insert_str(at, &String::from_utf8_lossy(&raw));
                    }
                    _ => s.insert_str(at, self.pick(pieces)),
                }
            }
            s
        }
    }

    const PIECES: &[&str] = &[
        "0",
        "1",
        "9",
        "99999999",
        "18446744073709551615",
        "1844674407370955161",
        " ",
        "\t",
        "+",
        "-",
        ".",
        "e",
        "H",
        "M",
        "S",
        "m",
        "u",
        "n",
        "\u{b5}",
        "\u{e9}",
        "\0",
        "\r\n",
        "x",
    ];

    #[test]
    fn fuzz_smoke_budget_ms() {
        let seeds = [
            "1500",
            "0",
            " 42\t",
            "18446744073709551615",
            "18446744073709551616",
        ];
        let mut g = Gen(0x5EED_0001);
        for _ in 0..20_000 {
            let s = g.string(&seeds, PIECES);
            let Ok(d) = parse_budget_ms(&s) else { continue };
            let digits = s.trim_matches([' ', '\t']);
            assert!(digits.len() <= MAX_MS_DIGITS, "{s:?}");
            assert_eq!(Some(d.as_millis()), digits.parse::<u128>().ok(), "{s:?}");
            assert_eq!(parse_budget_header(&format_budget_ms(d)), Ok(d), "{s:?}");
            if let Ok(v) = HeaderValue::from_str(&s) {
                assert_eq!(parse_budget_header(&v), Ok(d), "{s:?}");
            }
        }
        // Header values need not be UTF-8.
        for _ in 0..5_000 {
            let raw: Vec<u8> = (0..g.next() % 12).map(|_| g.next() as u8).collect();
            if let Ok(v) = HeaderValue::from_bytes(&raw) {
                let _ = parse_budget_header(&v);
                let _ = parse_grpc_timeout_header(&v);
            }
        }
    }

    #[test]
    fn fuzz_smoke_grpc_timeout() {
        let seeds = [
            "1500m",
            "2S",
            "100u",
            "99999999H",
            "1n",
            " 7M ",
            "123456789m",
        ];
        let mut g = Gen(0x5EED_0002);
        let max = Duration::from_secs(99_999_999 * 3600);
        for _ in 0..20_000 {
            let s = g.string(&seeds, PIECES);
            let Ok(d) = parse_grpc_timeout(&s) else {
                continue;
            };
            assert!(d <= max, "{s:?}");
            // Formatting rounds down by less than one unit of the finest unit that fits, which
            // is under a hundred-thousandth of the value.
            let back = parse_grpc_timeout_header(&format_grpc_timeout(d)).unwrap();
            assert!(back <= d, "{s:?}");
            assert!((d - back).as_nanos() * 100_000 <= d.as_nanos(), "{s:?}");
            if let Ok(v) = HeaderValue::from_str(&s) {
                assert_eq!(parse_grpc_timeout_header(&v), Ok(d), "{s:?}");
            }
        }
    }
}

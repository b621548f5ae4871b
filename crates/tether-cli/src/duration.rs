//! Durations as written in the config file: an integer and a unit, `"300ms"`, `"2s"`, `"1m"`, `"1h"`.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing to parse.
    #[error("empty duration; write e.g. \"300ms\", \"2s\", \"1m\" or \"1h\"")]
    Empty,
    /// No leading digits.
    #[error("{0:?} is not a duration; write e.g. \"300ms\", \"2s\", \"1m\" or \"1h\"")]
    NoNumber(String),
    /// Digits without a unit.
    #[error("{0:?} has no unit; add one of ms, s, m, h (e.g. \"{0}s\")")]
    NoUnit(String),
    /// A unit we do not know.
    #[error("{value:?} has unknown unit {unit:?}; use one of ms, s, m, h")]
    UnknownUnit {
        /// The whole input.
        value: String,
        /// The unit part.
        unit: String,
    },
    /// More than fits in a `Duration` (or the number has too many digits).
    #[error("{0:?} is too large")]
    Overflow(String),
}

/// Parses `"<digits><unit>"` with unit `ms`, `s`, `m` or `h`. Surrounding whitespace is ignored;
/// a sign, a fraction or a space between number and unit is refused, so typos do not pass silently.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(DurationError::NoNumber(input.to_owned()));
    }
    if unit.is_empty() {
        return Err(DurationError::NoUnit(input.to_owned()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| DurationError::Overflow(input.to_owned()))?;
    let secs_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(DurationError::UnknownUnit {
                value: input.to_owned(),
                unit: unit.to_owned(),
            });
        }
    };
    n.checked_mul(secs_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| DurationError::Overflow(input.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_unit() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert_eq!(parse_duration("   "), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("s"),
            Err(DurationError::NoNumber(_))
        ));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::NoNumber(_))
        ));
        assert!(matches!(
            parse_duration("30"),
            Err(DurationError::NoUnit(_))
        ));
        assert!(matches!(
            parse_duration("1.5s"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("5 s"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("2sec"),
            Err(DurationError::UnknownUnit { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("18446744073709551615h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn messages_suggest_a_fix() {
        let msg = parse_duration("30").unwrap_err().to_string();
        assert!(msg.contains("\"30s\""), "{msg}");
        let msg = parse_duration("2sec").unwrap_err().to_string();
        assert!(msg.contains("ms, s, m, h"), "{msg}");
    }
}

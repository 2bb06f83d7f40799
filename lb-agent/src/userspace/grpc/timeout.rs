//! The `grpc-timeout` header: `TimeoutValue TimeoutUnit`, 1 to 8 ASCII digits
//! and one of `H` (hours), `M` (minutes), `S`, `m`, `u`, `n` (seconds, milli-,
//! micro-, nanoseconds), as in the gRPC over HTTP/2 spec.

use std::time::Duration;

use http::HeaderMap;

pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Most digits a timeout value may have.
const MAX_DIGITS: usize = 8;
const MAX_VALUE: u64 = 99_999_999;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed grpc-timeout {0:?}: want 1 to 8 digits and a unit (H, M, S, m, u or n)")]
pub(crate) struct MalformedTimeout(pub(crate) String);

/// Parses one `grpc-timeout` value.
pub(crate) fn parse(v: &[u8]) -> Result<Duration, MalformedTimeout> {
    let bad = || MalformedTimeout(String::from_utf8_lossy(v).into_owned());
    let Some((&unit, digits)) = v.split_last() else {
        return Err(bad());
    };
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    // At most 8 digits: no overflow below.
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Ok(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return Err(bad()),
    })
}

/// The request's deadline, if it has a `grpc-timeout` (the first one counts).
pub(crate) fn from_headers(h: &HeaderMap) -> Result<Option<Duration>, MalformedTimeout> {
    h.get(GRPC_TIMEOUT).map(|v| parse(v.as_bytes())).transpose()
}

/// `d` in the finest unit whose value fits in 8 digits, rounded down so that
/// the backend's deadline never falls after the proxy's. Clamped to the
/// largest value the format holds (about 11,400 years).
pub(crate) fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in UNITS {
        let v = nanos / per;
        if v <= u128::from(MAX_VALUE) {
            return format!("{v}{unit}");
        }
    }
    format!("{MAX_VALUE}H")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        let ok = |s: &str| parse(s.as_bytes()).unwrap();
        assert_eq!(ok("100m"), Duration::from_millis(100));
        assert_eq!(ok("5S"), Duration::from_secs(5));
        assert_eq!(ok("1H"), Duration::from_secs(3600));
        assert_eq!(ok("2M"), Duration::from_secs(120));
        assert_eq!(ok("250u"), Duration::from_micros(250));
        assert_eq!(ok("7n"), Duration::from_nanos(7));
        assert_eq!(ok("0m"), Duration::ZERO);
        assert_eq!(ok("00000001S"), Duration::from_secs(1));
        assert_eq!(ok("99999999H"), Duration::from_secs(99_999_999 * 3600));
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "m",
            "100",
            "100x",
            "100 m",
            " 100m",
            "-1m",
            "1.5S",
            "123456789m",
            "1h",
            "1s",
            "١m",
            "100mm",
        ] {
            let e = parse(bad.as_bytes()).unwrap_err();
            assert_eq!(e.0, bad, "{bad:?}");
            assert!(e.to_string().contains("malformed grpc-timeout"));
        }
        assert!(parse(b"\xff1m").is_err());
    }

    #[test]
    fn reads_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(from_headers(&h), Ok(None));
        h.insert(GRPC_TIMEOUT, "20m".parse().unwrap());
        assert_eq!(from_headers(&h), Ok(Some(Duration::from_millis(20))));
        h.insert(GRPC_TIMEOUT, "soon".parse().unwrap());
        assert!(from_headers(&h).is_err());
    }

    #[test]
    fn formats_in_the_finest_unit_that_fits() {
        assert_eq!(format(Duration::ZERO), "0n");
        assert_eq!(format(Duration::from_nanos(99_999_999)), "99999999n");
        assert_eq!(format(Duration::from_millis(100)), "100000u");
        assert_eq!(format(Duration::from_secs(5)), "5000000u");
        assert_eq!(format(Duration::from_secs(100)), "100000m");
        assert_eq!(format(Duration::from_secs(3600)), "3600000m");
        assert_eq!(format(Duration::from_secs(200_000)), "200000S");
        assert_eq!(format(Duration::from_secs(200_000_000)), "3333333M");
        assert_eq!(format(Duration::from_secs(u64::MAX)), "99999999H");
        // Rounded down: never a later deadline than the proxy's.
        assert_eq!(format(Duration::from_nanos(123_456_789)), "123456u");
    }

    #[test]
    fn format_then_parse_never_grows() {
        for ns in [
            1u64,
            999,
            1_000_001,
            99_999_999,
            100_000_001,
            7_777_777_777,
            86_400_000_000_123,
            u64::MAX,
        ] {
            let d = Duration::from_nanos(ns);
            let back = parse(format(d).as_bytes()).unwrap();
            assert!(back <= d, "{d:?} -> {back:?}");
            // And loses less than one part in a million (the value has at
            // least 1.6 million units once the unit is minutes or hours).
            assert!(d - back <= d / 1_000_000, "{d:?} -> {back:?}");
        }
    }
}

//! Durations on the command line (`lb-agent --gc-interval`, `lbctl stats
//! --interval`): `5s`, `500ms`, `2m`, `1h`, `1.5s`, or a bare number of
//! seconds. Hand-written rather than `humantime`: that crate takes neither
//! fractions nor bare numbers, which these flags have always accepted.

use std::time::Duration;

/// A positive duration under ~31 years.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 5s, 500ms, 1m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("unknown unit {u:?} in {s:?} (use ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0 && secs < 1e9) {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// [`parse`], within `min..=max`.
pub fn parse_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = parse(s)?;
    if d < min || d > max {
        return Err(format!("{s:?} is out of range ({min:?} to {max:?})"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse("0s").is_err());
        assert!(parse("5x").is_err());
        assert!(parse("soon").is_err());
        let (lo, hi) = (Duration::from_millis(10), Duration::from_secs(86_400));
        assert_eq!(
            parse_within("250ms", lo, hi),
            Ok(Duration::from_millis(250))
        );
        assert!(parse_within("5ms", lo, hi).is_err());
        assert!(parse_within("25h", lo, hi).is_err());
    }
}

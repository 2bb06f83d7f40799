//! A service's retry policy (gRFC A6): which answers are retried, the
//! backoff between attempts, and the retry throttle (A6 `retryThrottling`).
//!
//! Only trailers-only answers are retried: the backend's response headers
//! carry a `grpc-status` (it answered before sending any message). Once
//! response headers without a status came, the call is committed (A6) and
//! goes to the client as it is.
//!
//! Server pushback (A6): a retryable answer with `grpc-retry-pushback-ms`
//! set to a non-negative number is retried after exactly that many
//! milliseconds (and the backoff starts over from `initial_backoff`); a
//! negative or unreadable value means no retry for that call.

use std::time::Duration;

use http::HeaderMap;
use lb_api::{RetryPolicy, RetryThrottle};

use super::status::GRPC_STATUS;

/// The header that tells the backend how many attempts came before (A6).
pub(crate) const PREVIOUS_ATTEMPTS: &str = "grpc-previous-rpc-attempts";

/// The header of a server's pushback (A6).
pub(crate) const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// What a server's pushback asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushback {
    /// Retry after exactly this long.
    After(Duration),
    /// Do not retry.
    Stop,
}

/// The pushback of an answer, if it has one: a signed 32-bit number of
/// milliseconds; negative or unreadable means stop.
pub(crate) fn pushback(headers: &HeaderMap) -> Option<Pushback> {
    let v = headers.get(PUSHBACK)?;
    let ms = v.to_str().ok().and_then(|s| s.trim().parse::<i32>().ok());
    Some(match ms.and_then(|ms| u64::try_from(ms).ok()) {
        Some(ms) => Pushback::After(Duration::from_millis(ms)),
        None => Pushback::Stop,
    })
}

/// The status of a trailers-only answer: its headers' `grpc-status`.
pub(crate) fn trailers_only_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// The wait before retry `n` (1 = the first retry), from a random draw:
/// uniform in [0, min(initial x multiplier^(n-1), max)) (A6's full jitter).
pub(crate) fn backoff(p: &RetryPolicy, n: u32, draw: u64) -> Duration {
    let mult = f64::from(p.backoff_multiplier_milli) / 1000.0;
    let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
    let bound = (p.initial_backoff.as_secs_f64() * mult.powi(exp)).min(p.max_backoff.as_secs_f64());
    let bound_us = (bound * 1e6) as u64;
    if bound_us == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(draw % bound_us)
}

/// A6's token bucket, in thousandths of a token: it starts full; a
/// retryable answer takes 1 token, any other answer gives `token_ratio`
/// (never above `max_tokens`); retries are made only while more than half
/// of `max_tokens` is left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tokens {
    cfg: RetryThrottle,
    milli: u64,
}

impl Tokens {
    pub(crate) fn new(cfg: RetryThrottle) -> Self {
        Tokens {
            cfg,
            milli: u64::from(cfg.max_tokens) * 1000,
        }
    }

    fn max(&self) -> u64 {
        u64::from(self.cfg.max_tokens) * 1000
    }

    /// A retryable answer: one token less; whether a retry may be made.
    pub(crate) fn failure(&mut self) -> bool {
        self.milli = self.milli.saturating_sub(1000);
        self.milli > self.max() / 2
    }

    /// Any other answer: `token_ratio` more.
    pub(crate) fn success(&mut self) {
        self.milli = (self.milli + u64::from(self.cfg.token_ratio_milli)).min(self.max());
    }

    #[cfg(test)]
    fn milli(&self) -> u64 {
        self.milli
    }
}

/// The throttle state of one service; a changed configuration starts a
/// full bucket.
#[derive(Debug, Default)]
pub(crate) struct Throttle(std::sync::Mutex<Option<Tokens>>);

impl Throttle {
    /// Records one answer; `true` when a retry may follow it (always for a
    /// service without a throttle).
    pub(crate) fn record(&self, cfg: Option<RetryThrottle>, retryable: bool) -> bool {
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(cfg) = cfg else {
            *t = None;
            return true;
        };
        let tokens = match &mut *t {
            Some(tk) if tk.cfg == cfg => tk,
            other => other.insert(Tokens::new(cfg)),
        };
        if retryable {
            tokens.failure()
        } else {
            tokens.success();
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            backoff_multiplier_milli: 2000,
            ..RetryPolicy::new(5)
        }
    }

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let p = policy();
        // The bound of each retry is exact: a draw of bound - 1 us waits
        // that long, a draw of the bound wraps to zero.
        let bounds = [100_000u64, 200_000, 350_000, 350_000, 350_000];
        for (n, b) in (1..).zip(bounds) {
            assert_eq!(
                backoff(&p, n, b - 1),
                Duration::from_micros(b - 1),
                "retry {n}"
            );
            assert_eq!(backoff(&p, n, b), Duration::ZERO, "retry {n}");
            assert_eq!(backoff(&p, n, b + 7), Duration::from_micros(7));
        }
        // Spread over [0, bound): draws of a whole range cover it.
        let ds: Vec<_> = (0..1000u64).map(|i| backoff(&p, 1, i * 100)).collect();
        assert_eq!(ds.iter().min(), Some(&Duration::ZERO));
        assert_eq!(ds.iter().max(), Some(&Duration::from_micros(99_900)));
        // A multiplier of 1.5; a huge retry number stays at the cap.
        let p = RetryPolicy {
            backoff_multiplier_milli: 1500,
            ..policy()
        };
        assert_eq!(backoff(&p, 2, 149_999), Duration::from_micros(149_999));
        assert_eq!(backoff(&p, 2, 150_000), Duration::ZERO);
        assert_eq!(backoff(&p, 1000, 349_999), Duration::from_micros(349_999));
        assert_eq!(backoff(&p, 1000, 350_000), Duration::ZERO);
    }

    #[test]
    fn token_bucket_as_a6_defines_it() {
        let cfg = RetryThrottle {
            max_tokens: 10,
            token_ratio_milli: 100,
        };
        let mut t = Tokens::new(cfg);
        assert_eq!(t.milli(), 10_000);
        // Successes never go above the maximum.
        t.success();
        assert_eq!(t.milli(), 10_000);
        // 10 -> 9, 8, 7, 6: retries allowed; 5 (= max/2): no more.
        for left in [9_000, 8_000, 7_000, 6_000] {
            assert!(t.failure());
            assert_eq!(t.milli(), left);
        }
        assert!(!t.failure());
        assert_eq!(t.milli(), 5_000);
        // Each success gives 0.1: 11 of them bring 5 to 6.1, and a failure
        // then leaves 5.1 (> 5): allowed.
        for _ in 0..11 {
            t.success();
        }
        assert_eq!(t.milli(), 6_100);
        assert!(t.failure());
        assert!(!t.failure());
        // Never below zero.
        for _ in 0..20 {
            assert!(!t.failure());
        }
        assert_eq!(t.milli(), 0);
    }

    #[test]
    fn a_changed_throttle_starts_full_and_none_always_allows() {
        let th = Throttle::default();
        let a = RetryThrottle {
            max_tokens: 2,
            token_ratio_milli: 1000,
        };
        // 2 -> 1 (= max/2): not allowed.
        assert!(!th.record(Some(a), true));
        assert!(!th.record(Some(a), true));
        let b = RetryThrottle { max_tokens: 4, ..a };
        assert!(th.record(Some(b), true));
        for _ in 0..10 {
            assert!(th.record(None, true));
        }
    }

    #[test]
    fn pushback_values() {
        let p = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(PUSHBACK, v.parse().unwrap());
            pushback(&h)
        };
        assert_eq!(pushback(&HeaderMap::new()), None);
        assert_eq!(p("300"), Some(Pushback::After(Duration::from_millis(300))));
        assert_eq!(p("0"), Some(Pushback::After(Duration::ZERO)));
        assert_eq!(
            p("2147483647"),
            Some(Pushback::After(Duration::from_millis(2_147_483_647)))
        );
        for stop in ["-1", "-300", "abc", "", "1.5", "2147483648", "300ms"] {
            assert_eq!(p(stop), Some(Pushback::Stop), "{stop:?}");
        }
    }

    #[test]
    fn trailers_only_statuses() {
        let mut h = HeaderMap::new();
        assert_eq!(trailers_only_status(&h), None);
        h.insert(GRPC_STATUS, "14".parse().unwrap());
        assert_eq!(trailers_only_status(&h), Some(14));
        h.insert(GRPC_STATUS, "x".parse().unwrap());
        assert_eq!(trailers_only_status(&h), None);
    }
}

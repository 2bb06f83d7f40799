//! Header rules of the gRPC mode.
//!
//! Requests to a backend carry the client's headers (metadata such as
//! `x-test-header`, `authorization`, `grpc-encoding`) except:
//!
//! - connection-specific (hop-by-hop) headers, and any the `connection`
//!   header names, are dropped; `te: trailers` (which gRPC requires) is set;
//! - `grpc-timeout` is replaced by the time left of the call's deadline, set
//!   at each send;
//! - `x-request-id`: the client's is kept when it is one visible-ASCII value
//!   of at most [`MAX_REQUEST_ID`] bytes, else replaced by a random UUID v4;
//! - `traceparent`: the client's is kept when it is one valid W3C value, else
//!   replaced by a new trace (random trace-id and span-id, flags `01`:
//!   sampled, so that backends with the common parent-based sampler record it
//!   as they would record a call without a parent); `tracestate` goes with an
//!   invalid or missing parent, since it belongs to that trace;
//! - the policy's `add_headers` are set last and replace a client value of
//!   the same name, so a backend can trust them.
//!
//! Responses pass through without their hop-by-hop headers.

use http::HeaderMap;
use http::header::{CONNECTION, HeaderName, HeaderValue, TE};
use lb_api::GrpcPolicy;
use tracing::warn;

use super::timeout::GRPC_TIMEOUT;

pub(crate) const REQUEST_ID: &str = "x-request-id";
pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";

/// Longest client `x-request-id` kept.
pub(crate) const MAX_REQUEST_ID: usize = 200;

/// Connection-specific headers (RFC 9110, 7.6.1), never forwarded; HTTP/2
/// forbids them (but `te: trailers`) anyway.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// Drops the hop-by-hop headers and those the `connection` header names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// The identifiers a request went out with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ids {
    pub(crate) request_id: HeaderValue,
    pub(crate) traceparent: HeaderValue,
}

/// Rewrites a client's request headers for a backend (see the module docs),
/// except `grpc-timeout`, which is removed here and set at each send.
/// `random` gives fresh 64-bit random numbers.
pub(crate) fn prepare_request(
    h: &mut HeaderMap,
    policy: &GrpcPolicy,
    random: &mut impl FnMut() -> u64,
) -> Ids {
    strip_hop_by_hop(h);
    h.insert(TE, HeaderValue::from_static("trailers"));
    h.remove(GRPC_TIMEOUT);

    let request_id = match single(h, REQUEST_ID) {
        Some(v) if valid_request_id(v.as_bytes()) => v.clone(),
        _ => new_request_id(random),
    };
    h.insert(REQUEST_ID, request_id.clone());

    let traceparent = match single(h, TRACEPARENT) {
        Some(v) if valid_traceparent(v.as_bytes()) => v.clone(),
        _ => {
            h.remove(TRACESTATE);
            new_traceparent(random)
        }
    };
    h.insert(TRACEPARENT, traceparent.clone());

    for (name, value) in &policy.add_headers {
        let parsed = lb_api::check_added_header(name, value)
            .ok()
            .and_then(|()| HeaderName::from_bytes(name.as_bytes()).ok())
            .zip(HeaderValue::from_str(value).ok());
        match parsed {
            Some((n, v)) => {
                h.insert(n, v);
            }
            // Config and controller check these first; never expected.
            None => warn!(header = %name, "gRPC mode: invalid added header skipped"),
        }
    }
    Ids {
        request_id,
        traceparent,
    }
}

/// The header's value if it occurs exactly once.
fn single<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a HeaderValue> {
    let mut all = h.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

pub(crate) fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_REQUEST_ID && v.iter().all(u8::is_ascii_graphic)
}

/// A random UUID v4, e.g. `0f8fad5b-d9cb-469f-a165-70867728950e`.
pub(crate) fn new_request_id(random: &mut impl FnMut() -> u64) -> HeaderValue {
    let hi = (random() & !0xf000) | 0x4000; // version 4
    let lo = (random() & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000; // RFC 4122 variant
    let s = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xffff,
        hi & 0xffff,
        lo >> 48,
        lo & 0xffff_ffff_ffff
    );
    HeaderValue::try_from(s).expect("hex and dashes are a valid header value")
}

fn lower_hex(s: &[u8]) -> bool {
    s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
}

/// W3C Trace Context `traceparent`: `version-traceid-parentid-flags`, lower
/// hex, version not `ff`, ids not all zeros; version 00 is exactly 55 bytes,
/// later versions may append `-...`.
pub(crate) fn valid_traceparent(v: &[u8]) -> bool {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let (version, trace, parent, flags) = (&v[..2], &v[3..35], &v[36..52], &v[53..55]);
    let nonzero = |s: &[u8]| s.iter().any(|&c| c != b'0');
    let fields = lower_hex(version)
        && version != b"ff"
        && lower_hex(trace)
        && nonzero(trace)
        && lower_hex(parent)
        && nonzero(parent)
        && lower_hex(flags);
    let tail = match version {
        b"00" => v.len() == 55,
        _ => v.len() == 55 || v[55] == b'-',
    };
    fields && tail
}

/// A new trace: version 00, random trace-id and span-id, sampled.
pub(crate) fn new_traceparent(random: &mut impl FnMut() -> u64) -> HeaderValue {
    let (a, mut b, mut span) = (random(), random(), random());
    if a == 0 && b == 0 {
        b = 1;
    }
    if span == 0 {
        span = 1;
    }
    let s = format!("00-{a:016x}{b:016x}-{span:016x}-01");
    HeaderValue::try_from(s).expect("hex and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0x1234_5678_9abc_def0u64;
        move || {
            n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            n
        }
    }

    fn policy(add: &[(&str, &str)]) -> GrpcPolicy {
        GrpcPolicy {
            add_headers: add
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            ..GrpcPolicy::default()
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn traceparent_validation() {
        assert!(valid_traceparent(GOOD.as_bytes()));
        // A later version may carry more fields.
        assert!(valid_traceparent(
            format!("01{}-extra", &GOOD[2..]).as_bytes()
        ));
        assert!(valid_traceparent(format!("cc{}", &GOOD[2..]).as_bytes()));
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ];
        for b in bad {
            assert!(!valid_traceparent(b.as_bytes()), "{b:?}");
        }
    }

    #[test]
    fn new_ids_are_valid_and_distinct() {
        let mut r = counter();
        let t1 = new_traceparent(&mut r);
        let t2 = new_traceparent(&mut r);
        assert!(valid_traceparent(t1.as_bytes()), "{t1:?}");
        assert_ne!(t1, t2);
        assert!(t1.to_str().unwrap().ends_with("-01"));
        // Zero draws still give a valid trace.
        let t0 = new_traceparent(&mut || 0);
        assert!(valid_traceparent(t0.as_bytes()), "{t0:?}");

        let id = new_request_id(&mut r);
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36, "{s}");
        let groups: Vec<usize> = s.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{s}");
        assert_eq!(&s[14..15], "4", "version 4: {s}");
        assert!("89ab".contains(&s[19..20]), "variant: {s}");
        assert_ne!(id, new_request_id(&mut r));
    }

    #[test]
    fn request_ids_and_traces_are_added() {
        let mut h = headers(&[
            ("x-test-header", "hello"),
            ("content-type", "application/grpc"),
        ]);
        let ids = prepare_request(&mut h, &policy(&[]), &mut counter());
        assert_eq!(h["x-request-id"], ids.request_id);
        assert_eq!(h["traceparent"], ids.traceparent);
        assert!(valid_traceparent(ids.traceparent.as_bytes()));
        assert_eq!(h["x-test-header"], "hello");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn client_ids_are_kept_when_valid() {
        let mut h = headers(&[
            ("x-request-id", "abc-123"),
            ("traceparent", GOOD),
            ("tracestate", "vendor=1"),
        ]);
        let ids = prepare_request(&mut h, &policy(&[]), &mut counter());
        assert_eq!(ids.request_id, "abc-123");
        assert_eq!(ids.traceparent, GOOD);
        assert_eq!(h["tracestate"], "vendor=1");
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
    }

    #[test]
    fn invalid_client_ids_are_replaced() {
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        for id in ["", "has space", long.as_str()] {
            let mut h = headers(&[
                ("x-request-id", id),
                ("traceparent", "00-nope"),
                ("tracestate", "vendor=1"),
            ]);
            let ids = prepare_request(&mut h, &policy(&[]), &mut counter());
            assert_ne!(ids.request_id, id);
            assert_eq!(ids.request_id.len(), 36);
            assert_ne!(ids.traceparent, "00-nope");
            assert!(valid_traceparent(h["traceparent"].as_bytes()));
            // The state of a trace that is not continued goes too.
            assert!(h.get("tracestate").is_none());
        }
        // Two values are not one valid value.
        let mut h = headers(&[("traceparent", GOOD), ("traceparent", GOOD)]);
        let ids = prepare_request(&mut h, &policy(&[]), &mut counter());
        assert_ne!(ids.traceparent, GOOD);
        assert_eq!(h.get_all("traceparent").iter().count(), 1);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "secret"),
            ("proxy-connection", "close"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "gzip"),
            ("grpc-timeout", "5S"),
            ("grpc-encoding", "gzip"),
            ("x-keep", "1"),
        ]);
        prepare_request(&mut h, &policy(&[]), &mut counter());
        for gone in [
            "connection",
            "keep-alive",
            "x-private",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
            "grpc-timeout",
        ] {
            assert!(h.get(gone).is_none(), "{gone} kept");
        }
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["grpc-encoding"], "gzip");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn policy_headers_replace_client_values() {
        let mut h = headers(&[("x-env", "client"), ("x-env", "again")]);
        let p = policy(&[("x-env", "prod"), ("x-team", "a b")]);
        prepare_request(&mut h, &p, &mut counter());
        let env: Vec<_> = h.get_all("x-env").iter().collect();
        assert_eq!(env, ["prod"]);
        assert_eq!(h["x-team"], "a b");
        // Names the proxy owns are never taken from a policy.
        let mut h = headers(&[("x-request-id", "mine")]);
        let p = policy(&[("x-request-id", "theirs"), ("grpc-timeout", "1S")]);
        prepare_request(&mut h, &p, &mut counter());
        assert_eq!(h["x-request-id"], "mine");
        assert!(h.get("grpc-timeout").is_none());
    }
}

//! Answers the proxy gives itself: gRPC statuses as trailers-only responses
//! (HTTP 200, `content-type: application/grpc`, `grpc-status`,
//! `grpc-message`, no body), and plain HTTP errors for what is not gRPC.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use super::body::DownBody;

pub(crate) const GRPC_STATUS: &str = "grpc-status";
pub(crate) const GRPC_MESSAGE: &str = "grpc-message";

/// The gRPC status codes the proxy answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Code {
    DeadlineExceeded = 4,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    fn value(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

/// `grpc-status` and `grpc-message`, for trailers or a trailers-only answer.
pub(crate) fn status_headers(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(GRPC_STATUS, code.value());
    h.insert(GRPC_MESSAGE, encode_message(message));
    h
}

/// A trailers-only gRPC response with `code`.
pub(crate) fn trailers_only(code: Code, message: &str) -> Response<DownBody> {
    let mut r = Response::new(DownBody::Empty);
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.extend(status_headers(code, message));
    r
}

/// A plain-text HTTP error; `close` asks an HTTP/1 client's connection to end.
pub(crate) fn http_error(status: StatusCode, message: &str, close: bool) -> Response<DownBody> {
    let mut r = Response::new(DownBody::Text(Some(Bytes::from(format!("{message}\n")))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if close {
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Percent-encodes a `grpc-message` as the spec says: bytes outside
/// printable ASCII, and `%`, become `%XX` (of the UTF-8 bytes).
pub(crate) fn encode_message(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(out).expect("printable ASCII is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_only_answers() {
        let r = trailers_only(Code::Unavailable, "no backend");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "no backend");
        assert!(matches!(r.body(), DownBody::Empty));
        let r = trailers_only(Code::DeadlineExceeded, "late");
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(status_headers(Code::Internal, "x")["grpc-status"], "13");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("plain text: ok"), "plain text: ok");
        assert_eq!(encode_message("100%"), "100%25");
        assert_eq!(encode_message("a\nb"), "a%0Ab");
        assert_eq!(encode_message("café"), "caf%C3%A9");
    }

    #[test]
    fn http_errors_say_why() {
        let r = http_error(StatusCode::HTTP_VERSION_NOT_SUPPORTED, "h2 only", true);
        assert_eq!(r.status(), 505);
        assert_eq!(r.headers()["connection"], "close");
        match r.body() {
            DownBody::Text(Some(b)) => assert_eq!(&b[..], b"h2 only\n"),
            _ => panic!("text body"),
        }
    }
}

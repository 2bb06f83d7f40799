//! What the pool needs to know of a backend connection that h2 does not
//! tell: the peer's SETTINGS_MAX_CONCURRENT_STREAMS and whether it sent
//! GOAWAY. A [`Sniffer`] reads the HTTP/2 frame headers of the bytes the
//! backend sends (h2c: the socket's bytes are the frames) as h2 reads
//! them, and keeps only SETTINGS and GOAWAY payloads (bounded).

use std::sync::OnceLock;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use tokio::sync::watch;

const HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;
/// A SETTINGS payload larger than this is skipped (16 KiB is the default
/// largest frame; real ones are a few dozen bytes).
const MAX_KEPT: usize = 16 * 1024;

/// What the backend told, shared between its socket and the pool.
#[derive(Debug)]
pub(crate) struct PeerState {
    /// Its SETTINGS_MAX_CONCURRENT_STREAMS; unlimited until it says.
    pub(crate) max_streams: AtomicU32,
    /// Its first SETTINGS frame arrived.
    pub(crate) settings: watch::Sender<bool>,
    /// It sent GOAWAY: no new calls on this connection.
    pub(crate) goaway: AtomicBool,
    /// The connection's task ended (closed, failed, or its PINGs went
    /// unanswered).
    pub(crate) closed: AtomicBool,
    /// Calls holding a stream on the connection (keep-alive PINGs only
    /// while there are some).
    pub(crate) calls: AtomicU32,
    /// When the backend last sent bytes ([`since_start`]).
    last_read: AtomicU64,
}

/// Nanoseconds since the first call (a process-wide monotonic clock).
fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Default for PeerState {
    fn default() -> Self {
        PeerState {
            max_streams: AtomicU32::new(u32::MAX),
            settings: watch::channel(false).0,
            goaway: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            calls: AtomicU32::new(0),
            last_read: AtomicU64::new(since_start()),
        }
    }
}

/// A frame seen by the [`Sniffer`] that matters to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Settings { max_streams: Option<u32> },
    GoAway { last_stream_id: u32, code: u32 },
}

/// Parses the frames of one direction of an HTTP/2 connection, fed in
/// arbitrary pieces.
#[derive(Debug, Default)]
pub(crate) struct Sniffer {
    header: [u8; HEADER],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    left: usize,
    kind: u8,
    flags: u8,
    /// The payload of a SETTINGS or GOAWAY frame being read.
    kept: Option<Vec<u8>>,
}

impl Sniffer {
    /// Feeds bytes; calls `on` for each complete SETTINGS (not ACK) and GOAWAY.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut on: impl FnMut(Event)) {
        while !bytes.is_empty() {
            if self.header_len < HEADER {
                let n = (HEADER - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len < HEADER {
                    return;
                }
                let h = &self.header;
                self.left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                self.kind = h[3];
                self.flags = h[4];
                let wanted = match self.kind {
                    SETTINGS => self.flags & ACK == 0 && self.left <= MAX_KEPT,
                    GOAWAY => true,
                    _ => false,
                };
                self.kept = wanted.then(|| Vec::with_capacity(self.left.min(64)));
            }
            let n = self.left.min(bytes.len());
            if let Some(k) = &mut self.kept {
                // GOAWAY: only its first 8 bytes matter (debug data follows).
                let room = if self.kind == GOAWAY {
                    8usize.saturating_sub(k.len())
                } else {
                    n
                };
                k.extend_from_slice(&bytes[..n.min(room)]);
            }
            self.left -= n;
            bytes = &bytes[n..];
            if self.left == 0 {
                self.header_len = 0;
                if let Some(p) = self.kept.take()
                    && let Some(e) = parse(self.kind, &p)
                {
                    on(e);
                }
            }
        }
    }
}

fn parse(kind: u8, p: &[u8]) -> Option<Event> {
    let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    match kind {
        SETTINGS => {
            let max_streams = p
                .chunks_exact(6)
                .filter(|s| u16::from_be_bytes([s[0], s[1]]) == MAX_CONCURRENT_STREAMS)
                .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
                .next_back();
            Some(Event::Settings { max_streams })
        }
        GOAWAY if p.len() >= 8 => Some(Event::GoAway {
            last_stream_id: u32_at(0) & 0x7fff_ffff,
            code: u32_at(4),
        }),
        _ => None,
    }
}

impl PeerState {
    /// The backend sent bytes just now.
    pub(crate) fn read_now(&self) {
        self.last_read.store(since_start(), Relaxed);
    }

    /// How long since the backend last sent bytes.
    pub(crate) fn since_read(&self) -> Duration {
        Duration::from_nanos(since_start().saturating_sub(self.last_read.load(Relaxed)))
    }

    /// Applies an event; whether it was this connection's first GOAWAY.
    pub(crate) fn apply(&self, e: Event) -> bool {
        match e {
            Event::Settings { max_streams } => {
                if let Some(m) = max_streams {
                    self.max_streams.store(m, Relaxed);
                }
                self.settings.send_replace(true);
                false
            }
            Event::GoAway { .. } => !self.goaway.swap(true, Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn settings_and_goaway_in_any_pieces() {
        let mut wire = Vec::new();
        // SETTINGS: INITIAL_WINDOW_SIZE then MAX_CONCURRENT_STREAMS = 10.
        wire.extend(frame(
            SETTINGS,
            0,
            0,
            &[0, 4, 0, 1, 0, 0, 0, 3, 0, 0, 0, 10],
        ));
        wire.extend(frame(SETTINGS, ACK, 0, &[]));
        // HEADERS and DATA are skipped whatever they hold.
        wire.extend(frame(0x1, 0x4, 1, &[0, 0, 0, 7, 0, 0, 0, 0, 0]));
        wire.extend(frame(0x0, 0x1, 1, &[7; 300]));
        // GOAWAY: last stream 5, NO_ERROR, with debug data.
        wire.extend(frame(
            GOAWAY,
            0,
            0,
            &[0, 0, 0, 5, 0, 0, 0, 0, b'b', b'y', b'e'],
        ));
        wire.extend(frame(0x6, 0, 0, &[1; 8]));
        let want = vec![
            Event::Settings {
                max_streams: Some(10),
            },
            Event::GoAway {
                last_stream_id: 5,
                code: 0,
            },
        ];
        for piece in [1, 2, 5, 9, 10, 64, wire.len()] {
            let mut s = Sniffer::default();
            let mut got = Vec::new();
            for c in wire.chunks(piece) {
                s.feed(c, |e| got.push(e));
            }
            assert_eq!(got, want, "pieces of {piece}");
        }
    }

    #[test]
    fn peer_state_follows_events() {
        let p = PeerState::default();
        assert_eq!(p.max_streams.load(Relaxed), u32::MAX);
        assert!(!*p.settings.borrow());
        assert!(!p.apply(Event::Settings { max_streams: None }));
        assert!(*p.settings.borrow());
        assert_eq!(p.max_streams.load(Relaxed), u32::MAX);
        p.apply(Event::Settings {
            max_streams: Some(10),
        });
        assert_eq!(p.max_streams.load(Relaxed), 10);
        let g = Event::GoAway {
            last_stream_id: 1,
            code: 0,
        };
        assert!(p.apply(g), "first GOAWAY");
        assert!(!p.apply(g), "second GOAWAY of the same connection");
        assert!(p.goaway.load(Relaxed));
    }
}

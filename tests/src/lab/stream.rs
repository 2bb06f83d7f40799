//! Long-lived TCP streams whose every byte is checked end to end, for the fault tests.
//!
//! The client sends a counter sequence: byte `k` of a connection is byte `k % 8` of the
//! big-endian u64 `k / 8`. The backend ([`SeqServer`]) first writes its identity line
//! (`backend-<i>\n`), then checks every byte it receives against the sequence and echoes it;
//! the client ([`SeqStream`]) checks the echo the same way. When the client half-closes, the
//! server answers with an 8-byte trailer (the big-endian count it received) and closes. A lost,
//! duplicated or reordered byte fails the check on one side or the other; a lost tail fails the
//! trailer. Every read has a timeout, so a stalled flow ends as [`End::Hang`], never blocks.

use super::{Netns, Result, io_err};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(50);
/// A server connection with no data for this long is closed (a bound, not a test condition).
const SERVER_IDLE: Duration = Duration::from_secs(120);

/// Byte `k` of the sequence.
pub fn seq_byte(k: u64) -> u8 {
    (k / 8).to_be_bytes()[(k % 8) as usize]
}

/// Fills `buf` with the sequence from offset `off`.
pub fn seq_fill(off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = seq_byte(off + i as u64);
    }
}

/// The index of the first byte of `buf` that is not the sequence from `off`.
pub fn seq_mismatch(off: u64, buf: &[u8]) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, &b)| b != seq_byte(off + i as u64))
}

/// How a [`SeqServer`] ends its connections when it is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// close(2) after shutdown: the client sees a FIN.
    Close,
    /// SO_LINGER 0: the client sees a RST.
    Reset,
}

/// What a server connection saw.
#[derive(Debug, Clone)]
pub struct ServerConn {
    pub peer: SocketAddr,
    /// Bytes received, all in sequence.
    pub received: u64,
    /// `None`: ended by the client's FIN (trailer sent) or by a kill; else what went wrong.
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct ServerState {
    done: Mutex<Vec<ServerConn>>,
    open: AtomicU64,
}

/// The checking echo server in a backend namespace; see the module docs. Stops on drop (its
/// connections are closed as by [`Kill::Close`]).
#[derive(Debug)]
pub struct SeqServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// 0: running; 1: kill with FIN; 2: kill with RST.
    kill: Arc<AtomicU8>,
    state: Arc<ServerState>,
    thread: Option<JoinHandle<()>>,
}

impl SeqServer {
    pub fn start(ns: &Netns, addr: SocketAddrV4, identity: &str) -> Result<SeqServer> {
        let id = identity.to_string();
        let l = ns
            .run(|| {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddr::V4(addr).into())?;
                s.listen(1024)?;
                Ok::<TcpListener, io::Error>(s.into())
            })?
            .map_err(io_err(format!("bind {addr} in {}", ns.name())))?;
        let bound = l.local_addr().map_err(io_err("local address"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let kill = Arc::new(AtomicU8::new(0));
        let state = Arc::new(ServerState::default());
        let (s2, k2, st2) = (stop.clone(), kill.clone(), state.clone());
        let thread = std::thread::Builder::new()
            .name(format!("seq-{identity}"))
            .spawn(move || seq_accept(l, &id, &s2, &k2, &st2))
            .map_err(io_err("spawn the server thread"))?;
        Ok(SeqServer {
            addr: bound,
            stop,
            kill,
            state,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections that ended, in order.
    pub fn done(&self) -> Vec<ServerConn> {
        self.state
            .done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Connections open now.
    pub fn open(&self) -> u64 {
        self.state.open.load(Ordering::Relaxed)
    }

    /// The pod dies: the listener and every connection close (FIN or RST), and the server
    /// thread is joined. Its records stay readable.
    pub fn kill(&mut self, how: Kill) {
        self.kill.store(
            match how {
                Kill::Close => 1,
                Kill::Reset => 2,
            },
            Ordering::Relaxed,
        );
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SeqServer {
    fn drop(&mut self) {
        self.kill(Kill::Close);
    }
}

fn readable(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) > 0 }
}

fn seq_accept(l: TcpListener, id: &str, stop: &AtomicBool, kill: &AtomicU8, st: &ServerState) {
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            if !readable(&l) {
                continue;
            }
            match l.accept() {
                Ok((c, peer)) => {
                    st.open.fetch_add(1, Ordering::Relaxed);
                    s.spawn(move || {
                        let r = seq_serve(&c, id, stop, kill);
                        let (received, error) = match r {
                            Ok(n) => (n, None),
                            Err((n, e)) => (n, Some(e)),
                        };
                        st.open.fetch_sub(1, Ordering::Relaxed);
                        st.done
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(ServerConn {
                                peer,
                                received,
                                error,
                            });
                    });
                }
                Err(e) => tracing::warn!("{id}: accept: {e}"),
            }
        }
        drop(l);
    });
}

/// Serves one connection; the byte count received, or it and what went wrong.
fn seq_serve(
    c: &TcpStream,
    id: &str,
    stop: &AtomicBool,
    kill: &AtomicU8,
) -> std::result::Result<u64, (u64, String)> {
    let mut got = 0u64;
    let fail = |got: u64, e: String| Err((got, e));
    let setup = (|| {
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(TICK))?;
        c.set_write_timeout(Some(Duration::from_secs(5)))?;
        (&*c).write_all(format!("{id}\n").as_bytes())
    })();
    if let Err(e) = setup {
        return fail(0, format!("identity: {e}"));
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle = Duration::ZERO;
    loop {
        if stop.load(Ordering::Relaxed) {
            if kill.load(Ordering::Relaxed) == 2 {
                let _ = socket2::SockRef::from(c).set_linger(Some(Duration::ZERO));
            } else {
                let _ = c.shutdown(Shutdown::Both);
            }
            return Ok(got);
        }
        if idle >= SERVER_IDLE {
            return fail(got, "idle".into());
        }
        match (&*c).read(&mut buf) {
            Ok(0) => {
                // The client is done: the trailer says how much arrived, then close.
                if let Err(e) = (&*c).write_all(&got.to_be_bytes()) {
                    return fail(got, format!("trailer: {e}"));
                }
                let _ = c.shutdown(Shutdown::Write);
                return Ok(got);
            }
            Ok(n) => {
                idle = Duration::ZERO;
                if let Some(i) = seq_mismatch(got, &buf[..n]) {
                    let at = got + i as u64;
                    let _ = socket2::SockRef::from(c).set_linger(Some(Duration::ZERO));
                    return fail(
                        at,
                        format!("byte {at}: got {:#04x}, want {:#04x}", buf[i], seq_byte(at)),
                    );
                }
                got += n as u64;
                if let Err(e) = (&*c).write_all(&buf[..n]) {
                    return fail(got, format!("echo: {e}"));
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += TICK
            }
            Err(e) => return fail(got, format!("read: {e}")),
        }
    }
}

/// How a client stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Ran to its deadline; the echo and the server's trailer matched every byte sent.
    Completed,
    /// The connection was reset (a RST).
    Reset(String),
    /// The server closed it (EOF) before the client was done.
    Closed,
    /// No echo within the hang timeout.
    Hang,
    /// A wrong byte, a short trailer: data was lost, duplicated or corrupted.
    Corrupt(String),
    /// The connect or the identity line failed.
    Connect(String),
}

impl End {
    /// A RST or a close: how a flow to a removed backend may end.
    pub fn is_rst_or_close(&self) -> bool {
        matches!(self, End::Reset(_) | End::Closed)
    }
}

/// What a client stream did.
#[derive(Debug, Clone)]
pub struct StreamReport {
    /// The identity line (`backend-<i>`), empty if none came.
    pub backend: String,
    pub local: Option<SocketAddr>,
    /// Bytes sent, and bytes echoed back in sequence.
    pub sent: u64,
    pub echoed: u64,
    pub end: End,
    /// When it ended (for a break: when the client noticed).
    pub ended: Instant,
}

/// Pacing and bounds of a client stream.
#[derive(Debug, Clone, Copy)]
pub struct StreamOpts {
    /// Bytes per write (each is echoed before the next write).
    pub chunk: usize,
    /// Pause between writes.
    pub every: Duration,
    /// How long to stream before half-closing.
    pub duration: Duration,
    /// A read that waits this long is a hang.
    pub hang: Duration,
}

impl Default for StreamOpts {
    fn default() -> Self {
        StreamOpts {
            chunk: 512,
            every: Duration::from_millis(10),
            duration: Duration::from_secs(10),
            hang: Duration::from_secs(5),
        }
    }
}

/// A client stream running on a thread of its own (its socket made in the client namespace).
pub struct SeqStream {
    thread: JoinHandle<StreamReport>,
    /// Ends the stream early, as at its deadline.
    stop: Arc<AtomicBool>,
    /// The backend that answered, once known.
    backend: Arc<Mutex<String>>,
    sent: Arc<AtomicU64>,
}

impl SeqStream {
    /// Connects from `ns` to `target` and streams for `opts.duration`.
    pub fn start(ns: &Netns, target: SocketAddrV4, opts: StreamOpts) -> Result<SeqStream> {
        let conn = ns.run(|| {
            TcpStream::connect_timeout(&SocketAddr::from(target), Duration::from_secs(3))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let backend = Arc::new(Mutex::new(String::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (s2, b2, n2) = (stop.clone(), backend.clone(), sent.clone());
        let thread = std::thread::Builder::new()
            .name("seq-client".into())
            .spawn(move || {
                let start = Instant::now();
                let mut r = StreamReport {
                    backend: String::new(),
                    local: None,
                    sent: 0,
                    echoed: 0,
                    end: End::Hang,
                    ended: start,
                };
                r.end = match conn {
                    Ok(c) => run_client(c, opts, &s2, &b2, &n2, &mut r),
                    Err(e) => End::Connect(format!("connect: {e}")),
                };
                r.ended = Instant::now();
                r
            })
            .map_err(io_err("spawn a client thread"))?;
        Ok(SeqStream {
            thread,
            stop,
            backend,
            sent,
        })
    }

    /// The backend's identity, once the stream has read it.
    pub fn backend(&self) -> String {
        self.backend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Asks the stream to finish now (half-close, trailer) instead of at its deadline.
    pub fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits for the stream's end (bounded by its duration and hang timeout).
    pub fn join(self) -> StreamReport {
        self.thread.join().expect("client stream thread")
    }
}

fn kind_end(e: io::Error, what: &str) -> End {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => End::Hang,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
            End::Reset(format!("{what}: {e}"))
        }
        io::ErrorKind::UnexpectedEof => End::Closed,
        io::ErrorKind::BrokenPipe => End::Reset(format!("{what}: {e}")),
        _ => End::Reset(format!("{what}: {e} ({:?})", e.kind())),
    }
}

fn run_client(
    c: TcpStream,
    opts: StreamOpts,
    stop: &AtomicBool,
    backend: &Mutex<String>,
    sent_now: &AtomicU64,
    r: &mut StreamReport,
) -> End {
    r.local = c.local_addr().ok();
    let setup = (|| {
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(opts.hang))?;
        c.set_write_timeout(Some(opts.hang))?;
        c.try_clone()
    })();
    let mut rd = match setup {
        Ok(c2) => BufReader::new(c2),
        Err(e) => return End::Connect(format!("socket options: {e}")),
    };
    let mut who = String::new();
    match rd.read_line(&mut who) {
        Ok(_) if who.ends_with('\n') => {}
        Ok(_) => return End::Connect(format!("identity line cut: {who:?}")),
        Err(e) => return End::Connect(format!("identity: {e}")),
    }
    r.backend = who.trim_end().to_string();
    *backend.lock().unwrap_or_else(|e| e.into_inner()) = r.backend.clone();
    let deadline = Instant::now() + opts.duration;
    let mut out = vec![0u8; opts.chunk];
    let mut back = vec![0u8; opts.chunk];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        seq_fill(r.sent, &mut out);
        if let Err(e) = (&c).write_all(&out) {
            return kind_end(e, "write");
        }
        r.sent += out.len() as u64;
        sent_now.store(r.sent, Ordering::Relaxed);
        if let Err(e) = rd.read_exact(&mut back) {
            return kind_end(e, "read");
        }
        if let Some(i) = seq_mismatch(r.echoed, &back) {
            return End::Corrupt(format!(
                "echo byte {}: got {:#04x}, want {:#04x}",
                r.echoed + i as u64,
                back[i],
                seq_byte(r.echoed + i as u64)
            ));
        }
        r.echoed += back.len() as u64;
        std::thread::sleep(opts.every);
    }
    // Done: half-close, and the server says how much it got, then closes.
    if let Err(e) = c.shutdown(Shutdown::Write) {
        return kind_end(e, "shutdown");
    }
    let mut trailer = [0u8; 8];
    if let Err(e) = rd.read_exact(&mut trailer) {
        return kind_end(e, "trailer");
    }
    let got = u64::from_be_bytes(trailer);
    if got != r.sent {
        return End::Corrupt(format!("the server received {got} bytes of {}", r.sent));
    }
    let mut rest = [0u8; 1];
    match rd.read(&mut rest) {
        Ok(0) => End::Completed,
        Ok(_) => End::Corrupt("bytes after the trailer".into()),
        Err(e) => kind_end(e, "final read"),
    }
}

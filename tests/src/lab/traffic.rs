//! Bounded traffic: identity servers for backends and probing clients. Every socket operation
//! has a timeout and every loop a bound.
//!
//! Protocol: the TCP server writes `<identity>\n` on accept, then echoes bytes; the client
//! reads the identity, sends `ping <k>\n` and expects it back. The UDP server answers each
//! datagram with `<identity>\n`.

use super::{Netns, Result, io_err};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often server loops look at their stop flag.
const TICK: Duration = Duration::from_millis(50);
/// A server closes a connection idle for this long.
const CONN_IDLE: Duration = Duration::from_secs(30);

/// Timeouts for a probe run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connect, read and write timeout of each operation.
    pub per_op: Duration,
    /// Deadline for the whole run; attempts past it fail with `TimedOut` without being tried.
    pub total: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_op: Duration::from_secs(2),
            total: Duration::from_secs(30),
        }
    }
}

/// One successful exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The identity the server sent, e.g. `backend-2`.
    pub backend: String,
    /// Address the reply came from as the client socket sees it (the VIP, through the LB).
    pub peer: SocketAddr,
    /// The client's own address of this flow.
    pub local: SocketAddr,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// Run `n` attempts of `one`, each bounded by `per_op` and all by `total`.
fn attempts(
    n: usize,
    lim: Limits,
    mut one: impl FnMut(usize, Duration) -> io::Result<Reply>,
) -> Vec<io::Result<Reply>> {
    let deadline = Instant::now() + lim.total;
    (0..n)
        .map(|k| {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out("total deadline exceeded"));
            }
            one(k, lim.per_op.min(left))
        })
        .collect()
}

/// `n` TCP connections to `target` (IPv4 or IPv6) from the calling thread's namespace (use
/// inside `Netns::run`). One result per attempt.
pub fn tcp_attempts(
    target: impl Into<SocketAddr>,
    n: usize,
    lim: Limits,
) -> Vec<io::Result<Reply>> {
    let target: SocketAddr = target.into();
    attempts(n, lim, |k, t| {
        let s = TcpStream::connect_timeout(&target, t)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        s.set_nodelay(true)?;
        let mut r = BufReader::new(s.try_clone()?);
        let backend = read_line(&mut r)?;
        let ping = format!("ping {k}");
        (&s).write_all(format!("{ping}\n").as_bytes())?;
        let echo = read_line(&mut r)?;
        if echo != ping {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("echo {echo:?} != {ping:?}"),
            ));
        }
        Ok(Reply {
            backend,
            peer: s.peer_addr()?,
            local: s.local_addr()?,
        })
    })
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 || !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("closed after {line:?}"),
        ));
    }
    Ok(line.trim_end().to_string())
}

/// `n` UDP exchanges with `target`, each from a fresh socket (a new source port, so a new
/// flow). The socket is unconnected, so `peer` shows the real source of the reply. Every
/// socket stays open until the run ends: a closed socket's port could be handed out again
/// and its exchange would then ride the earlier flow's conntrack entry. IPv4 or IPv6.
pub fn udp_attempts(
    target: impl Into<SocketAddr>,
    n: usize,
    lim: Limits,
) -> Vec<io::Result<Reply>> {
    let target: SocketAddr = target.into();
    let mut open = Vec::with_capacity(n);
    attempts(n, lim, |k, t| {
        let any: SocketAddr = match target {
            SocketAddr::V4(_) => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let s = UdpSocket::bind(any)?;
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))?;
        s.send_to(format!("ping {k}\n").as_bytes(), target)?;
        let mut buf = [0u8; 512];
        let (len, peer) = s.recv_from(&mut buf)?;
        let backend = String::from_utf8_lossy(&buf[..len]).trim_end().to_string();
        // The local address of an unconnected socket is 0.0.0.0: ask the route for the real one.
        s.connect(peer)?;
        let local = s.local_addr()?;
        open.push(s);
        Ok(Reply {
            backend,
            peer,
            local,
        })
    })
}

/// What a server saw, shared with its handle.
#[derive(Debug, Default)]
struct Seen {
    peers: Mutex<Vec<SocketAddr>>,
}

impl Seen {
    fn add(&self, p: SocketAddr) {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).push(p);
    }
}

/// A server thread inside a namespace; stops and is joined on drop.
#[derive(Debug)]
struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind with `bind` inside `ns`, then run `serve` there until stopped.
    fn start<S: Send + 'static>(
        ns: &Netns,
        name: &str,
        bind: impl FnOnce() -> io::Result<(S, SocketAddr)> + Send + 'static,
        serve: impl FnOnce(S, &AtomicBool, &Seen) + Send + 'static,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Seen::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = ns.spawn(name, move || match bind() {
            Ok((sock, addr)) => {
                let _ = tx.send(Ok(addr));
                serve(sock, &stop2, &seen2);
            }
            Err(e) => drop(tx.send(Err(e))),
        })?;
        match rx.recv().expect("server thread reports its bind") {
            Ok(addr) => Ok(Server {
                addr,
                stop,
                seen,
                thread: Some(thread),
            }),
            Err(e) => {
                let _ = thread.join();
                Err(io_err(format!("{name}: bind in {}", ns.name()))(e))
            }
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.seen
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP identity + echo server.
#[derive(Debug)]
pub struct TcpServer(Server, Arc<Listen>);

/// Whether a [`TcpServer`] should listen, and whether it does.
#[derive(Debug)]
struct Listen {
    want: AtomicBool,
    now: AtomicBool,
}

impl TcpServer {
    /// `addr` may be IPv6 (`[::]` also takes IPv4 clients, as v4-mapped peers).
    pub fn start(ns: &Netns, addr: impl Into<SocketAddr>, identity: &str) -> Result<Self> {
        let addr: SocketAddr = addr.into();
        let id = identity.to_string();
        let bind = move || {
            let l = TcpListener::bind(addr)?;
            let a = l.local_addr()?;
            Ok((l, a))
        };
        let listen = Arc::new(Listen {
            want: AtomicBool::new(true),
            now: AtomicBool::new(true),
        });
        let l2 = listen.clone();
        Server::start(
            ns,
            &format!("tcp-{identity}"),
            bind,
            move |l, stop, seen| accept_loop(l, &id, stop, seen, &l2),
        )
        .map(|s| TcpServer(s, listen))
    }

    /// Closes the listening socket (new connections are refused) or opens
    /// it again on the same address; accepted connections go on either
    /// way. Returns once done (at most 2 s).
    pub fn set_listening(&self, on: bool) {
        self.1.want.store(on, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.1.now.load(Ordering::Relaxed) != on && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            self.1.now.load(Ordering::Relaxed),
            on,
            "set_listening({on}) on {}",
            self.0.addr
        );
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Client addresses of every accepted connection, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.0.peers()
    }
}

/// Wait until `fd` is readable or `TICK` passes.
fn readable(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) > 0 }
}

fn accept_loop(l: TcpListener, identity: &str, stop: &AtomicBool, seen: &Seen, listen: &Listen) {
    let addr = l.local_addr().ok();
    let mut l = Some(l);
    std::thread::scope(|s| {
        while !stop.load(Ordering::Relaxed) {
            match (listen.want.load(Ordering::Relaxed), &l) {
                (false, Some(_)) => l = None,
                // std sets SO_REUSEADDR: the address is free again at once.
                (true, None) => l = addr.and_then(|a| TcpListener::bind(a).ok()),
                _ => {}
            }
            listen.now.store(l.is_some(), Ordering::Relaxed);
            let Some(l) = &l else {
                std::thread::sleep(TICK);
                continue;
            };
            if !readable(l) {
                continue;
            }
            match l.accept() {
                Ok((conn, peer)) => {
                    seen.add(peer);
                    s.spawn(move || {
                        if let Err(e) = serve_conn(conn, identity, stop) {
                            tracing::debug!("{identity}: connection from {peer}: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("{identity}: accept: {e}"),
            }
        }
    }); // joins every connection thread
}

fn serve_conn(mut c: TcpStream, identity: &str, stop: &AtomicBool) -> io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(TICK))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    c.write_all(format!("{identity}\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    let mut idle = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) && idle < CONN_IDLE {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                c.write_all(&buf[..n])?;
                idle = Duration::ZERO;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += TICK
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// UDP server answering every datagram with its identity.
#[derive(Debug)]
pub struct UdpServer(Server);

impl UdpServer {
    pub fn start(ns: &Netns, addr: impl Into<SocketAddr>, identity: &str) -> Result<Self> {
        let addr: SocketAddr = addr.into();
        let reply = format!("{identity}\n");
        let bind = move || {
            let s = UdpSocket::bind(addr)?;
            s.set_read_timeout(Some(TICK))?;
            let a = s.local_addr()?;
            Ok((s, a))
        };
        let serve = move |s: UdpSocket, stop: &AtomicBool, seen: &Seen| {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = s.recv_from(&mut buf) {
                    seen.add(peer);
                    let _ = s.send_to(reply.as_bytes(), peer);
                }
            }
        };
        Server::start(ns, &format!("udp-{identity}"), bind, serve).map(UdpServer)
    }

    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    /// Source addresses of every datagram received, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.0.peers()
    }
}

/// A TCP connection kept open to a VIP, and the backend it landed on (the
/// identity line of the lab's [`TcpServer`]). Echo on it within the
/// server's idle limit (10 s) to keep it.
pub struct HeldConn {
    s: BufReader<TcpStream>,
    /// The identity the backend sent, e.g. `backend-2`.
    pub backend: String,
}

impl HeldConn {
    /// Connects from `ns` to `target` and reads the identity line.
    pub fn open(ns: &Netns, target: SocketAddrV4) -> Result<HeldConn> {
        let stream = ns.run(|| {
            let s = TcpStream::connect_timeout(&SocketAddr::from(target), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.set_write_timeout(Some(Duration::from_secs(3)))?;
            s.set_nodelay(true)?;
            Ok::<_, io::Error>(s)
        })?;
        let stream = stream.map_err(io_err(format!("connect to {target}")))?;
        let mut s = BufReader::new(stream);
        let mut who = String::new();
        s.read_line(&mut who)
            .map_err(io_err(format!("identity from {target}")))?;
        Ok(HeldConn {
            s,
            backend: who.trim_end().to_string(),
        })
    }

    /// Sends a line and reads its echo.
    pub fn try_echo(&mut self, line: &str) -> io::Result<()> {
        self.s.get_mut().write_all(format!("{line}\n").as_bytes())?;
        let mut got = String::new();
        self.s.read_line(&mut got)?;
        if got.trim_end() == line {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "echo of {line:?} came back as {got:?}"
            )))
        }
    }

    /// [`Self::try_echo`], failing the test on error.
    pub fn echo(&mut self, line: &str) {
        self.try_echo(line).unwrap_or_else(|e| {
            panic!(
                "echo {line:?} on the held connection to {}: {e}",
                self.backend
            )
        });
    }

    pub fn local(&self) -> SocketAddr {
        self.s.get_ref().local_addr().expect("local address")
    }

    pub fn peer(&self) -> SocketAddr {
        self.s.get_ref().peer_addr().expect("peer address")
    }
}

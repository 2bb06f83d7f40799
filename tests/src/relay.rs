//! A TCP relay from a lab namespace's loopback to the host's loopback: what
//! lets an agent in the node namespace reach a controller that runs on the
//! host beside its API server (both on 127.0.0.1 only), as a Service would
//! in a cluster. Each connection goes to the first upstream that accepts,
//! so a relay with two controllers fails over like a Service with two
//! ready endpoints. Nothing leaves the machine: both ends are loopback.

use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::lab::Netns;

/// Listens on 127.0.0.1:`port` inside a namespace; forwards to host
/// loopback ports. Stops, and closes every relayed connection, on drop.
pub struct Relay {
    stop: Arc<AtomicBool>,
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts relaying 127.0.0.1:`port` in `ns` to `upstreams` (tried in order).
    pub fn start(ns: &Netns, port: u16, upstreams: &[SocketAddr]) -> io::Result<Relay> {
        // A socket belongs to the namespace it was made in: bind there, then
        // accept and connect from a host thread.
        let listener = ns
            .run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
            .map_err(io::Error::other)??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let upstreams = Arc::new(Mutex::new(upstreams.to_vec()));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let thread = {
            let (stop, upstreams, open) = (stop.clone(), upstreams.clone(), open.clone());
            std::thread::Builder::new()
                .name(format!("relay-{port}"))
                .spawn(move || accept_loop(listener, &stop, &upstreams, &open))?
        };
        Ok(Relay {
            stop,
            upstreams,
            open,
            thread: Some(thread),
        })
    }

    /// Changes where new connections go.
    pub fn set_upstreams(&self, upstreams: &[SocketAddr]) {
        *self.upstreams.lock().unwrap() = upstreams.to_vec();
    }
}

fn accept_loop(
    l: TcpListener,
    stop: &AtomicBool,
    upstreams: &Mutex<Vec<SocketAddr>>,
    open: &Mutex<Vec<TcpStream>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((down, _)) => {
                let targets = upstreams.lock().unwrap().clone();
                let Some(up) = targets
                    .iter()
                    .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).ok())
                else {
                    // Nobody home: the client sees its connection closed.
                    continue;
                };
                let _ = down.set_nonblocking(false);
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                if let (Ok(d), Ok(u)) = (down.try_clone(), up.try_clone()) {
                    open.lock().unwrap().extend([d, u]);
                }
                pipe(&down, &up);
                pipe(&up, &down);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Copies `from` to `to` on a thread until either end closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut r), Ok(mut w)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = io::copy(&mut r, &mut w);
        let _ = w.shutdown(Shutdown::Write);
        let _ = r.shutdown(Shutdown::Read);
    });
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

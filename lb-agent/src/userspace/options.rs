//! The proxy's settings, shared by the L4 proxy and the gRPC mode.

use std::time::Duration;

use crate::config::Timeouts;

/// Settings of the proxy. A zero timeout means no timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Per connect attempt to a backend.
    pub connect_timeout: Duration,
    /// Backends tried per new TCP connection (or UDP session) before it is
    /// dropped; at least 1.
    pub connect_attempts: u32,
    /// A TCP connection with no data either way for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// A UDP session with no datagram either way for this long expires.
    pub udp_idle_timeout: Duration,
    /// UDP sessions per service.
    pub max_udp_sessions: usize,
    /// Client-IP affinity entries per service.
    pub max_affinity_entries: usize,
    /// Threads that run the connections; 0 = one per CPU.
    pub worker_threads: usize,
    /// Run the TCP connections on one single-threaded runtime per worker
    /// thread (each with its own epoll), instead of on one multi-thread
    /// runtime whose workers steal work from each other.
    pub per_thread_runtimes: bool,
    /// gRPC mode: run each client connection, its calls and their backend
    /// connections (pooled per worker) on one of the per-thread runtimes,
    /// so that a call never wakes another thread (on by default: about 13%
    /// less CPU per call than on the shared multi-thread runtime; see
    /// docs/benchmarks.md, section 9). Independent of
    /// `per_thread_runtimes`, which is for the L4 path.
    pub grpc_per_thread_runtimes: bool,
    /// `listen(2)` backlog of each TCP service.
    pub listen_backlog: u32,
    /// Add and remove the VIPs' local routes. Turn off only when something
    /// else makes the VIPs local.
    pub manage_routes: bool,
    /// gRPC mode: HTTP/2 connections per backend at most. More than one is
    /// opened only when the open ones have no free stream (the backend's
    /// SETTINGS_MAX_CONCURRENT_STREAMS); at the bound, calls queue for a
    /// stream on the least busy connection.
    pub grpc_max_connections: usize,
    /// gRPC mode: a backend connection with no call for this long closes
    /// (zero: never).
    pub grpc_idle_timeout: Duration,
    /// gRPC mode: a backend connection that received nothing for this long
    /// is PINGed (gRFC A8; zero: no PINGs)...
    pub grpc_keepalive_interval: Duration,
    /// ... and closed, failing its calls, when the PING is not answered in
    /// this time.
    pub grpc_keepalive_timeout: Duration,
    /// gRPC mode: transparent retries of one call (gRFC A6) that a backend
    /// did not process (REFUSED_STREAM, or above a GOAWAY's last stream).
    pub grpc_transparent_retries: u32,
    /// gRPC mode: when the proxy shuts down, calls in flight get this long
    /// to finish after the client connections' GOAWAY; when a service is
    /// removed, at most 5 s of it (an apply waits no longer).
    pub grpc_drain_timeout: Duration,
    /// gRPC mode: how often a service's TLS files (`grpc.tls`) are checked
    /// for changes.
    pub grpc_tls_poll: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self::with_timeouts(&Timeouts::default())
    }
}

/// The gRPC mode's settings that the agent takes as flags (the
/// `grpc_*` fields of [`ProxyOptions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcOptions {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub transparent_retries: u32,
    pub drain_timeout: Duration,
    pub tls_poll: Duration,
}

impl Default for GrpcOptions {
    fn default() -> Self {
        let o = ProxyOptions::default();
        GrpcOptions {
            max_connections: o.grpc_max_connections,
            idle_timeout: o.grpc_idle_timeout,
            keepalive_interval: o.grpc_keepalive_interval,
            keepalive_timeout: o.grpc_keepalive_timeout,
            transparent_retries: o.grpc_transparent_retries,
            drain_timeout: o.grpc_drain_timeout,
            tls_poll: o.grpc_tls_poll,
        }
    }
}

impl ProxyOptions {
    /// These options with the gRPC mode's settings of `g`.
    pub fn with_grpc(self, g: &GrpcOptions) -> Self {
        ProxyOptions {
            grpc_max_connections: g.max_connections.max(1),
            grpc_idle_timeout: g.idle_timeout,
            grpc_keepalive_interval: g.keepalive_interval,
            grpc_keepalive_timeout: g.keepalive_timeout,
            grpc_transparent_retries: g.transparent_retries,
            grpc_drain_timeout: g.drain_timeout,
            grpc_tls_poll: g.tls_poll,
            ..self
        }
    }

    /// Defaults, with the idle timeouts of `t` (established TCP and UDP).
    pub fn with_timeouts(t: &Timeouts) -> Self {
        ProxyOptions {
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            tcp_idle_timeout: t.tcp_established,
            udp_idle_timeout: t.udp,
            max_udp_sessions: 16_384,
            max_affinity_entries: lb_common::limits::MAX_AFFINITY as usize,
            worker_threads: 0,
            per_thread_runtimes: false,
            grpc_per_thread_runtimes: true,
            listen_backlog: 1024,
            manage_routes: true,
            grpc_max_connections: 16,
            grpc_idle_timeout: Duration::from_secs(300),
            grpc_keepalive_interval: Duration::from_secs(20),
            grpc_keepalive_timeout: Duration::from_secs(10),
            grpc_transparent_retries: 3,
            grpc_drain_timeout: Duration::from_secs(20),
            grpc_tls_poll: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_follow_the_timeouts() {
        let o = ProxyOptions::default();
        assert_eq!(o.connect_timeout, Duration::from_secs(2));
        assert_eq!(o.tcp_idle_timeout, Duration::from_secs(6 * 3600));
        assert_eq!(o.udp_idle_timeout, Duration::from_secs(60));
        let t = Timeouts {
            tcp_established: Duration::from_secs(5),
            udp: Duration::from_secs(7),
            ..Timeouts::default()
        };
        let o = ProxyOptions::with_timeouts(&t);
        assert_eq!(
            (o.tcp_idle_timeout, o.udp_idle_timeout),
            (t.tcp_established, t.udp)
        );
    }
}

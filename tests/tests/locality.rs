//! The locality policy (docs/policies.md) in the two-node lab
//! (tests/src/lab/two_node.rs): node A in zone `za`, node B in zone `zb`, two
//! backend pods on each, one eBPF agent per node with the same standalone
//! config (its `nodes:` say where the nodes are; each agent resolves the
//! policy for its own `--node-name`). Real TCP from a pod on each node.
//!
//! And the gRPC mode's spill-over on outstanding calls in the one-node lab:
//! real gRPC calls through the userspace proxy, held open on the backends.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb_agent::userspace::StatsHandle;
use lb_api::locality::{NodeLocation, NodeLocations};
use lb_api::{
    Algorithm, Backend, DesiredState, GrpcPolicy, Locality, LocalityTier, Protocol, Service,
};
use rpclb_tests::grpc::proto::test_service_client::TestServiceClient;
use rpclb_tests::grpc::{HOLD, Journal, served_by};
use rpclb_tests::lab::two_node::{counts, ident, tcp_from};
use rpclb_tests::lab::{self, Lab, Node, TcpServer, TwoNodeLab};
use rpclb_tests::procs::NodeAgents;
use rpclb_tests::skip_unless_lab;
use tokio::task::JoinSet;
use tonic::Status;
use tonic::transport::Channel;

const NEAR: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);

/// The config: the nodes' zones, and one service over pods 2 and 3 of both
/// nodes with `locality: { tiers: [zone], min_backends: 2 }`; `terminating`
/// names the pods (`a3`, ...) that are terminating.
fn config(lab: &TwoNodeLab, terminating: &[&str]) -> String {
    let mut s = String::from(
        "# written by tests/tests/locality.rs\n\
         nodes:\n  - { name: node-a, zone: za, region: r1 }\n  - { name: node-b, zone: zb, region: r1 }\n\
         services:\n",
    );
    s.push_str(&format!(
        "  - name: lab/near:http\n    vip: {NEAR}\n    port: 80\n    protocol: tcp\n    \
         algorithm: round-robin\n    locality: {{ tiers: [zone], min_backends: 2 }}\n    backends:\n"
    ));
    for node in lab.nodes() {
        for i in [2, 3] {
            let state = if terminating.contains(&ident(node, i).as_str()) {
                "terminating"
            } else {
                "active"
            };
            s.push_str(&format!(
                "      - {{ ip: {}, port: 8080, node: {}, state: {state} }}\n",
                node.pod(i).ip(),
                node.name
            ));
        }
    }
    s
}

/// Which backends answered `n` connections from pod 1 of `node`.
fn answered(node: &Node, n: usize) -> BTreeSet<String> {
    counts(&tcp_from(&node.pod(1).ns, SocketAddrV4::new(NEAR, 80), n))
        .into_keys()
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// A client on node A reaches only zone A's backends (and B's only B's);
/// when zone A has fewer than 2 ready backends (a3 terminating), node A
/// spills over to every backend that takes new flows, zone B's included,
/// while node B keeps to its zone.
#[test]
fn locality_prefers_the_zone_and_spills_over_below_min_backends() {
    if !lab::require() {
        return;
    }
    let lab = TwoNodeLab::new(3).expect("two-node lab");
    let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080);
    let _servers: Vec<TcpServer> = lab
        .nodes()
        .into_iter()
        .flat_map(|node| {
            [2, 3].map(|i| {
                TcpServer::start(&node.pod(i).ns, any, &ident(node, i)).expect("tcp server")
            })
        })
        .collect();
    let (a, b) = (lab.a(), lab.b());
    let cfg = config(&lab, &[]);
    let agents = NodeAgents::start(&lab, [&cfg, &cfg], &[]);

    assert_eq!(answered(a, 20), set(&["a2", "a3"]), "{}", agents.log(0));
    assert_eq!(answered(b, 20), set(&["b2", "b3"]), "{}", agents.log(1));

    // a3 terminates: zone A has 1 ready backend, below min_backends 2.
    let cfg = config(&lab, &["a3"]);
    for d in &agents.dirs {
        d.write_config(&cfg);
    }
    // The agents poll their file; wait (bounded) until A's state changed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if answered(a, 6).iter().any(|x| x.starts_with('b')) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node A never spilled over: {}",
            agents.log(0)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        answered(a, 30),
        set(&["a2", "b2", "b3"]),
        "{}",
        agents.log(0)
    );
    assert_eq!(answered(b, 20), set(&["b2", "b3"]), "{}", agents.log(1));

    // a3 is back: node A keeps to its zone again.
    let cfg = config(&lab, &[]);
    for d in &agents.dirs {
        d.write_config(&cfg);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while answered(a, 12) != set(&["a2", "a3"]) {
        assert!(
            Instant::now() < deadline,
            "node A never went back to its zone: {}",
            agents.log(0)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

// ---- the gRPC mode: spill-over on outstanding calls --------------------------

const GRPC_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const GRPC_PORT: u16 = 50051;
/// `spill_outstanding`.
const T: u64 = 4;
/// Bound of a quick call, and of each wait for a count.
const CALL: Duration = Duration::from_secs(5);
/// Bound of a held call (the backend holds it at most 10 s).
const HELD: Duration = Duration::from_secs(20);

/// The proxy's outstanding calls on each backend (`ips` order): what the
/// balancer reads.
fn outstanding(stats: &StatsHandle, ips: &[Ipv4Addr]) -> Vec<u64> {
    let all = stats.stats();
    let s = all
        .iter()
        .find(|s| s.addr.vip == GRPC_VIP)
        .expect("stats of the gRPC service");
    ips.iter()
        .map(|&ip| s.backend(ip, GRPC_PORT).map_or(0, |b| b.active_requests))
        .collect()
}

/// Waits (bounded by [`CALL`]) until the proxy counts `total` outstanding
/// calls and the backends hold `held` calls in their handlers.
async fn settle(stats: &StatsHandle, ips: &[Ipv4Addr], journal: &Journal, total: u64, held: u64) {
    let deadline = Instant::now() + CALL;
    loop {
        let now = outstanding(stats, ips);
        let in_handlers: u64 = (1..=ips.len()).map(|i| journal.in_flight(i)).sum();
        if now.iter().sum::<u64>() == total && in_handlers == held {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "want {total} outstanding ({held} held), have {now:?} ({in_handlers} held)"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts one more held call (`x-hold`) and waits until the proxy and the
/// backend count it: `held` calls in all, then.
async fn hold_one(
    c: &TestServiceClient<Channel>,
    calls: &mut JoinSet<Result<String, Status>>,
    stats: &StatsHandle,
    ips: &[Ipv4Addr],
    journal: &Journal,
    held: u64,
) {
    let mut c = c.clone();
    calls.spawn(async move { served_by(&mut c, &[(HOLD, "1")], HELD).await });
    settle(stats, ips, journal, held, held).await;
}

/// `n` quick calls, one at a time, each once the proxy counts only the
/// `held` calls: how many each backend served.
async fn one_by_one(
    c: &TestServiceClient<Channel>,
    n: usize,
    stats: &StatsHandle,
    ips: &[Ipv4Addr],
    journal: &Journal,
    held: u64,
) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for k in 0..n {
        settle(stats, ips, journal, held, held).await;
        let who = served_by(&mut c.clone(), &[], CALL)
            .await
            .unwrap_or_else(|e| panic!("quick call {k}: {e}"));
        *by.entry(who).or_default() += 1;
    }
    by
}

/// Locality `[zone]` with `spill_outstanding: 4`, resolved for node-a (as
/// the controller does, and sent through the wire): backend-1 and
/// backend-2 run in the node's zone, backend-3 in another. Below 4
/// outstanding calls on either local backend, no call reaches backend-3;
/// with 4 held on both, calls spill over to it (quick ones and held ones);
/// once the held calls finish, new calls go to the local ones only.
#[test]
fn lab_grpc_spills_over_on_outstanding_calls() {
    skip_unless_lab!();
    let lab = Lab::new(3).expect("lab");
    let journal = Arc::new(Journal::default());
    let _servers = rpclb_tests::grpc::start_backends(&lab, 3, GRPC_PORT, &journal);
    let p = rpclb_tests::grpc::start_proxy(&lab, |_| {});
    let ips: Vec<Ipv4Addr> = (1..=3).map(|i| lab.backend(i).ip()).collect();

    let place = |zone: &str| NodeLocation {
        zone: Some(zone.into()),
        region: Some("r1".into()),
    };
    let nodes: NodeLocations = [
        ("node-a".to_string(), place("za")),
        ("node-b".to_string(), place("zb")),
    ]
    .into_iter()
    .collect();
    let backends = ips
        .iter()
        .zip(["node-a", "node-a", "node-b"])
        .map(|(&ip, node)| Backend {
            node: Some(node.into()),
            ..Backend::new(ip, GRPC_PORT)
        })
        .collect();
    let mut svc = Service::new(
        "lab/near:grpc",
        GRPC_VIP,
        GRPC_PORT,
        Protocol::Tcp,
        Algorithm::Random,
        backends,
    );
    svc.grpc = Some(GrpcPolicy::default());
    svc.locality = Some(Locality {
        tiers: vec![LocalityTier::Zone],
        min_backends: 1,
        spill_outstanding: Some(T as u32),
    });
    let unresolved = DesiredState {
        services: vec![svc],
    };
    let resolved = lb_api::locality::resolve(&unresolved, Some("node-a"), &nodes);
    let pb = lb_api::wire::pb::Service::from(&resolved.services[0]);
    let sent = lb_api::wire::service_from_pb(&pb).expect("the agent takes it");
    let w: Vec<(u32, Option<u32>)> = sent
        .backends
        .iter()
        .map(|b| (b.weight, b.spill_weight))
        .collect();
    assert_eq!(w, [(1, None), (1, None), (0, Some(1))]);
    p.apply(&DesiredState {
        services: vec![sent],
    })
    .unwrap();

    let stats = p.stats_handle();
    let (below, at_seven, at_t, spilled, held_spill, held, after) =
        rpclb_tests::grpc::block_on_in(&lab.client().ns, || {
            let journal = journal.clone();
            let ips = ips.clone();
            async move {
                let j = &*journal;
                let c = rpclb_tests::grpc::connect(GRPC_VIP, GRPC_PORT).await;
                let mut calls = JoinSet::new();
                // 2T - 1 held calls, one at a time: P2C over the two local
                // backends keeps them even, 4 + 3.
                for k in 1..2 * T {
                    hold_one(&c, &mut calls, &stats, &ips, j, k).await;
                }
                let at_seven = outstanding(&stats, &ips);
                let below = one_by_one(&c, 30, &stats, &ips, j, 2 * T - 1).await;
                // The 2T-th: both local backends at T.
                hold_one(&c, &mut calls, &stats, &ips, j, 2 * T).await;
                let at_t = outstanding(&stats, &ips);
                let spilled = one_by_one(&c, 30, &stats, &ips, j, 2 * T).await;
                // Held calls spill over too: hold more (at most 16) until
                // backend-3 holds one.
                let mut n = 2 * T;
                while outstanding(&stats, &ips)[2] == 0 && n < 2 * T + 16 {
                    n += 1;
                    hold_one(&c, &mut calls, &stats, &ips, j, n).await;
                }
                let held_spill = (outstanding(&stats, &ips), j.in_flight(3));
                j.release();
                let mut held = Vec::new();
                while let Some(r) = calls.join_next().await {
                    held.push(r.expect("caller task"));
                }
                // Every call finished, on the proxy too: back to the zone.
                settle(&stats, &ips, j, 0, 0).await;
                let after = one_by_one(&c, 30, &stats, &ips, j, 0).await;
                (below, at_seven, at_t, spilled, held_spill, held, after)
            }
        });
    let remote = "backend-3".to_string();

    // Below T on one local backend: nothing reaches the remote one.
    let mut locals = at_seven[..2].to_vec();
    locals.sort();
    assert_eq!((locals, at_seven[2]), (vec![T - 1, T], 0), "{at_seven:?}");
    assert_eq!(below.values().sum::<usize>(), 30, "{below:?}");
    assert_eq!(below.get(&remote), None, "{below:?}");
    // At T on both: the remote backend takes the P2C draws it is in (2 of 3
    // on average; at least 5 of 30 but with a chance below 1e-8).
    assert_eq!(at_t, [T, T, 0]);
    assert_eq!(spilled.values().sum::<usize>(), 30, "{spilled:?}");
    let to_remote = spilled.get(&remote).copied().unwrap_or(0);
    assert!(to_remote >= 5, "{spilled:?}");
    // A held call spilled over: the proxy and backend-3 both count it.
    let (counts_then, remote_handler) = held_spill;
    assert!(counts_then[2] >= 1, "{counts_then:?}");
    assert_eq!(
        remote_handler, counts_then[2],
        "backend-3 holds what the proxy counts"
    );
    assert!(
        counts_then[0] >= T && counts_then[1] >= T,
        "{counts_then:?}"
    );
    assert!(held.iter().all(|r| r.is_ok()), "{held:?}");
    // Released: new calls stay in the zone.
    assert_eq!(after.values().sum::<usize>(), 30, "{after:?}");
    assert_eq!(after.get(&remote), None, "{after:?}");
    // The backends' own count: backend-3 served exactly the calls that
    // spilled over (quick and held).
    let held_remote = held
        .iter()
        .filter(|r| r.as_deref().is_ok_and(|b| b == "backend-3"))
        .count();
    assert_eq!(held_remote as u64, counts_then[2]);
    assert_eq!(journal.served(3), (to_remote + held_remote) as u64);
}

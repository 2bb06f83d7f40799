//! The map writer's order, seen by the kernel program itself: a twin of the
//! data path on the same pinned maps runs a SYN between the two halves of a
//! write (after the service entry switches to its new table, before the
//! backends that leave the table are marked). Needs root.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use lb_agent::datapath::scratch::{Hook, ScratchDatapath, require_root, test_run};
use lb_api::{Algorithm, Backend, BackendState, DesiredState, Protocol, Service};
use rpclb_tests::packet::{CLIENT, SYN, VIP, XDP_DROP, frame};

fn state(s: &Service) -> DesiredState {
    DesiredState {
        services: vec![s.clone()],
    }
}

/// What the twin saw at each switch: the verdict and `drop_bad_table` so far.
type Seen = Arc<Mutex<Vec<(u32, u64)>>>;

fn bad_table(dp: &mut lb_agent::datapath::Datapath) -> u64 {
    dp.writer()
        .reasons()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == "drop_bad_table")
        .unwrap()
        .1
}

/// Un-draining (terminating -> active, weight 0 -> 1) must not drop a SYN
/// that hashes to the backend in between: its value is written before the
/// table that names it. Draining writes the table first.
#[test]
fn undrain_and_drain_never_expose_an_unusable_backend() {
    if !require_root("the write-order test") {
        return;
    }
    for algorithm in [Algorithm::RoundRobin, Algorithm::Maglev] {
        let mut dp = ScratchDatapath::new(|c| c.fib_redirect = false).expect("load");
        let mut twin = dp.twin(|c| c.fib_redirect = false).expect("twin");
        let backend = Backend {
            state: BackendState::Terminating,
            ..Backend::new(Ipv4Addr::new(10, 244, 2, 2), 8080)
        };
        let mut svc = Service::new(
            "t/undrain:80",
            VIP,
            80,
            Protocol::Tcp,
            algorithm,
            vec![backend],
        );
        assert_eq!(dp.writer().apply(&state(&svc)).unwrap(), vec![]);

        let seen: Seen = Arc::default();
        let log = seen.clone();
        let mut sport = 40_000u16;
        dp.writer().set_after_switch_hook(Some(Box::new(move |_| {
            sport += 1;
            let syn = frame(6, CLIENT, sport, VIP, 80, SYN);
            let (verdict, _) = test_run(&mut twin, Hook::Xdp, &syn).expect("test run");
            let bad = bad_table(&mut twin);
            log.lock().unwrap().push((verdict, bad));
        })));

        // Un-drain: the only backend becomes active; the new table names it.
        svc.backends[0].state = BackendState::Active;
        assert_eq!(dp.writer().apply(&state(&svc)).unwrap(), vec![]);
        // Weight 0 -> 1 likewise.
        svc.backends[0].weight = 0;
        dp.writer().apply(&state(&svc)).unwrap();
        svc.backends[0].weight = 1;
        dp.writer().apply(&state(&svc)).unwrap();

        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{algorithm}: one look per write");
        let (undrain, _) = seen[0];
        let (reweight, bad) = seen[2];
        assert_ne!(
            undrain, XDP_DROP,
            "{algorithm}: SYN dropped while un-draining"
        );
        assert_ne!(
            reweight, XDP_DROP,
            "{algorithm}: SYN dropped at weight 0 -> 1"
        );
        assert_eq!(bad, 0, "{algorithm}: drop_bad_table counted {bad}");
        // Between drain's switch and its backend write, the table is empty:
        // the SYN is refused (RST via XDP_TX), not dropped as a bad table.
        assert_ne!(
            seen[1].0, XDP_DROP,
            "{algorithm}: SYN dropped while draining"
        );
        assert_eq!(bad_table(dp.dp()), 0);
    }
}

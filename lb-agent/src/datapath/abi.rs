//! Where the model (lb-api) meets the kernel ABI (lb-common): the one place
//! that turns algorithms and protocols into the codes the programs read,
//! and the compile-time ties between constants both sides define.

use lb_api::{Algorithm, Protocol};
use lb_common::{algo, limits, proto};

/// The kernel's code for `a` (`ServiceValue::algo`).
pub const fn algo_code(a: Algorithm) -> u8 {
    match a {
        Algorithm::Random => algo::RANDOM,
        Algorithm::RoundRobin => algo::ROUND_ROBIN,
        Algorithm::Maglev => algo::MAGLEV,
        Algorithm::SourceHash => algo::SOURCE_HASH,
        Algorithm::LeastConn => algo::LEAST_CONN,
    }
}

/// The algorithm of a kernel code; `None` for an unknown code.
pub fn algorithm(code: u8) -> Option<Algorithm> {
    Algorithm::ALL.into_iter().find(|&a| algo_code(a) == code)
}

/// The IP protocol number of `p` (`ServiceKey::proto`, `FlowKey::proto`).
pub const fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
    }
}

// The model's defaults and bounds are the kernel's.
const _: () = assert!(lb_api::DEFAULT_MAGLEV_M == limits::DEFAULT_MAGLEV_M);
const _: () = assert!(lb_api::validate::MAX_MAGLEV_M == limits::MAX_SLOTS);
const _: () = assert!(Algorithm::ALL.len() == algo::COUNT as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_has_its_own_code_and_name() {
        let mut seen = std::collections::HashSet::new();
        for a in Algorithm::ALL {
            let c = algo_code(a);
            assert!(c < algo::COUNT, "{a}");
            assert!(seen.insert(c), "{a}: code {c} twice");
            assert_eq!(algorithm(c), Some(a));
            assert_eq!(
                algo::NAMES[c as usize],
                a.as_str(),
                "lbctl shows the model's name"
            );
        }
        assert_eq!(algorithm(algo::COUNT), None);
        assert_eq!(proto_number(Protocol::Tcp), 6);
        assert_eq!(proto_number(Protocol::Udp), 17);
    }
}

//! Maglev lookup-table builder (Eisenbud et al., "Maglev: A Fast and Reliable
//! Software Network Load Balancer", NSDI 2016), with weights.
//!
//! Every backend has a permutation of the table's slots,
//! `(offset + j * skip) mod M`, from two independent hashes of its stable
//! identity (`key`, e.g. [`backend_key`] of its ip:port). Backends take turns
//! claiming their next preferred free slot until all `M` slots are full. With
//! equal weights every backend gets `M / N` slots, give or take one, and
//! removing one of `N` backends moves few slots beyond the removed backend's own
//! (the paper's "minimal disruption").
//!
//! Weights follow Katran's weighted Maglev: every round, each backend adds its
//! weight to a credit, and takes a turn when the credit reaches the largest
//! weight (which then is subtracted). The backend with the largest weight takes
//! a turn every round, a backend with half of it every other round, and so on,
//! so each backend claims `w / sum(w)` of the slots, within one slot.
//!
//! Determinism: backends are sorted by `(key, id)` before the fill, so the
//! table depends only on the set of backends, not on the order they are given
//! in. Every agent builds the same table from the same set.
//!
//! Cost: about `M * ln(M)` probes (M = 65537 with 1,000 backends builds in
//! about 1.3 ms in release mode). Finding whose turn it is costs `O(N)` per
//! round, or `O(log N)` per turn with a heap when the weights are so skewed
//! that most backends sit most rounds out (both give the same table).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// One backend as the Maglev builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// What the table holds for this backend (the `BACKENDS` map index).
    pub id: u32,
    /// Stable identity that fixes the backend's permutation, e.g.
    /// [`backend_key`] of its ip:port. Keep it the same across restarts and
    /// nodes, and different between the backends of one service.
    pub key: u64,
    /// Relative weight; 0 leaves the backend out of the table.
    pub weight: u32,
}

/// The stable Maglev key of a backend: its IPv4 address and port; for an
/// IPv6 address, a 47-bit FNV-1a hash of it with the top bit set (IPv4
/// keys are below 2^48, so the two never meet). The kernel's IPv6 path
/// must use the same key to build the same tables.
pub fn backend_key(ip: impl Into<std::net::IpAddr>, port: u16) -> u64 {
    match ip.into() {
        std::net::IpAddr::V4(v4) => (u64::from(u32::from(v4)) << 16) | u64::from(port),
        std::net::IpAddr::V6(v6) => {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in v6.octets() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            (1 << 63) | ((h & ((1 << 47) - 1)) << 16) | u64::from(port)
        }
    }
}

pub use lb_api::is_prime;

/// Why a table cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("maglev table size {0} is not prime")]
    NotPrime(u32),
    #[error("maglev table size {m} cannot hold {n} backends")]
    TooManyBackends { m: u32, n: usize },
}

/// splitmix64's finalizer: a fast 64-bit mixer with full avalanche.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const OFFSET_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const SKIP_SEED: u64 = 0xc2b2_ae3d_27d4_eb4f;

/// `(offset, skip)` of a key's permutation: offset in `[0, m)`, skip in `[1, m)`.
#[inline]
fn permutation(key: u64, m: u64) -> (u64, u64) {
    // Two independent hashes: the same mixer on differently seeded inputs, the
    // second also rotated so that the seeds' difference is not simply xored in.
    let h1 = mix64(key ^ OFFSET_SEED);
    let h2 = mix64(key.rotate_left(32).wrapping_add(SKIP_SEED));
    let offset = h1 % m;
    let skip = if m > 1 { h2 % (m - 1) + 1 } else { 1 };
    (offset, skip)
}

/// Builds a Maglev table of exactly `m` backend ids.
///
/// Backends with weight 0 are left out; if none remain, the result is empty.
/// `m` must be prime and at least the number of remaining backends. It should
/// also be > 100 x backends for good balance (`lb_api::validate`, which
/// every service passes before it reaches a builder); that is not enforced here.
pub fn build(backends: &[MaglevBackend], m: u32) -> Result<Vec<u32>, MaglevError> {
    build_with(backends, m, Fill::Auto)
}

/// How the weighted fill finds whose turn it is. Both give the same table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    Auto,
    /// Katran's loop: every round visits every backend.
    Rounds,
    /// A heap of (round, index): visits only backends that take a turn.
    Heap,
}

fn build_with(backends: &[MaglevBackend], m: u32, fill: Fill) -> Result<Vec<u32>, MaglevError> {
    let mut live: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    if live.is_empty() {
        return Ok(Vec::new());
    }
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    let n = live.len();
    if n > m as usize {
        return Err(MaglevError::TooManyBackends { m, n });
    }
    live.sort_unstable_by_key(|b| (b.key, b.id));

    let m64 = u64::from(m);
    let mut filler = Filler {
        m: m64,
        // Slots hold indexes into `live` during the fill, ids afterwards.
        table: vec![EMPTY; m as usize],
        next: Vec::with_capacity(n),
        skip: Vec::with_capacity(n),
        filled: 0,
    };
    for b in &live {
        let (o, s) = permutation(b.key, m64);
        filler.next.push(o);
        filler.skip.push(s);
    }

    // Katran's weighted fill: each round, every backend adds its weight to a
    // credit, and takes a turn when the credit reaches the largest weight
    // (which it then loses). With equal weights, everyone takes a turn every
    // round: the paper's plain round-robin fill.
    let weights: Vec<u64> = live.iter().map(|b| u64::from(b.weight)).collect();
    let max_w = weights.iter().copied().max().unwrap_or(1);
    let sum_w: u64 = weights.iter().sum();
    // The round loop costs about M * N * max_w / sum_w visits, the heap
    // M * log2(N) operations at several times the cost of a visit.
    let fill = match fill {
        Fill::Auto if (n as u64) * max_w <= 8 * sum_w => Fill::Rounds,
        Fill::Auto => Fill::Heap,
        f => f,
    };
    if fill == Fill::Rounds {
        let mut credit = vec![0u64; n];
        'rounds: loop {
            for i in 0..n {
                credit[i] += weights[i];
                if credit[i] < max_w {
                    continue;
                }
                credit[i] -= max_w;
                if filler.claim(i) {
                    break 'rounds;
                }
            }
        }
    } else {
        // Backend i's (k+1)-th turn falls in round ceil((k+1) * max_w / w),
        // and within a round the turns go in index order: a min-heap of
        // (round, index) replays exactly the round loop's order.
        let turn_round = |k: u64, w: u64| ((k + 1) * max_w).div_ceil(w);
        let mut turns = vec![0u64; n];
        let mut heap: BinaryHeap<Reverse<(u64, u32)>> = (0..n)
            .map(|i| Reverse((turn_round(0, weights[i]), i as u32)))
            .collect();
        while let Some(Reverse((_, i))) = heap.pop() {
            let i = i as usize;
            if filler.claim(i) {
                break;
            }
            turns[i] += 1;
            heap.push(Reverse((turn_round(turns[i], weights[i]), i as u32)));
        }
    }

    let mut table = filler.table;
    for e in &mut table {
        *e = live[*e as usize].id;
    }
    Ok(table)
}

const EMPTY: u32 = u32::MAX;

struct Filler {
    m: u64,
    table: Vec<u32>,
    /// Per backend: the next slot of its permutation, and its skip.
    next: Vec<u64>,
    skip: Vec<u64>,
    filled: u64,
}

impl Filler {
    /// Gives backend `i` its next preferred free slot; true once the table is full.
    #[inline]
    fn claim(&mut self, i: usize) -> bool {
        let (m, s) = (self.m, self.skip[i]);
        let mut c = self.next[i];
        while self.table[c as usize] != EMPTY {
            c += s;
            if c >= m {
                c -= m;
            }
        }
        self.table[c as usize] = i as u32;
        c += s;
        if c >= m {
            c -= m;
        }
        self.next[i] = c;
        self.filled += 1;
        self.filled == m
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use std::collections::HashMap;

    fn equal(n: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                id: i + 1,
                key: backend_key(Ipv4Addr::new(10, 244, (i >> 8) as u8, i as u8), 8080),
                weight: 1,
            })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    /// IPv4 keys are as before (the kernel's tables do not change); IPv6
    /// keys are stable, have the top bit (never an IPv4 key) and differ by
    /// address and port.
    #[test]
    fn backend_keys_of_both_families() {
        assert_eq!(
            backend_key(Ipv4Addr::new(10, 244, 1, 2), 8080),
            (0x0af4_0102u64 << 16) | 8080
        );
        let a: std::net::Ipv6Addr = "fd00:10:244::2".parse().unwrap();
        let b: std::net::Ipv6Addr = "fd00:10:244::3".parse().unwrap();
        let k = backend_key(a, 8080);
        assert_eq!(k >> 63, 1);
        assert_eq!(k & 0xffff, 8080);
        assert_eq!(k, backend_key(a, 8080));
        assert_ne!(k, backend_key(b, 8080));
        assert_ne!(k, backend_key(a, 8081));
        // A table of IPv6 backends is built like any other.
        let bs: Vec<MaglevBackend> = (1..=3u16)
            .map(|i| MaglevBackend {
                id: u32::from(i),
                key: backend_key(
                    std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, i, 0, 0, 0, 2),
                    8080,
                ),
                weight: 1,
            })
            .collect();
        let t = build(&bs, 1009).unwrap();
        let c = counts(&t);
        assert_eq!(c.len(), 3);
        assert!(c.values().all(|&n| (300..=380).contains(&n)), "{c:?}");
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..40).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37]);
        assert!(is_prime(16_381));
        assert!(is_prime(65_537));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(65_535));
        assert!(!is_prime(u32::MAX));
        assert!(!is_prime(25));
        assert!(!is_prime(49));
    }

    #[test]
    fn empty_and_drained() {
        assert_eq!(build(&[], 16_381), Ok(vec![]));
        let drained = [MaglevBackend {
            id: 1,
            key: 1,
            weight: 0,
        }];
        assert_eq!(build(&drained, 16_381), Ok(vec![]));
        // Not even the table size is checked when there is nothing to place.
        assert_eq!(build(&drained, 1000), Ok(vec![]));
    }

    #[test]
    fn bad_sizes() {
        assert_eq!(build(&equal(3), 1000), Err(MaglevError::NotPrime(1000)));
        assert_eq!(
            build(&equal(3), 2),
            Err(MaglevError::TooManyBackends { m: 2, n: 3 })
        );
        // Tiny but legal tables still fill completely.
        let t = build(&equal(3), 3).unwrap();
        let mut s = t.clone();
        s.sort();
        assert_eq!(s, [1, 2, 3]);
        assert_eq!(build(&equal(1), 2).unwrap(), [1, 1]);
    }

    #[test]
    fn single_backend_fills_everything() {
        let t = build(&equal(1), 101).unwrap();
        assert_eq!(t.len(), 101);
        assert!(t.iter().all(|&id| id == 1));
    }

    #[test]
    fn balance() {
        let m = 16_381;
        let t = build(&equal(100), m).unwrap();
        assert_eq!(t.len(), m as usize);
        let c = counts(&t);
        assert_eq!(c.len(), 100);
        let max = *c.values().max().unwrap() as f64;
        let min = *c.values().min().unwrap() as f64;
        assert!(max / min < 1.02, "max {max} min {min}");
    }

    #[test]
    fn disruption() {
        let m = 16_381;
        let all = equal(100);
        let before = build(&all, m).unwrap();
        for removed in (1..=100).step_by(9) {
            let rest: Vec<_> = all.iter().copied().filter(|b| b.id != removed).collect();
            let after = build(&rest, m).unwrap();
            let survived = before.iter().filter(|&&id| id != removed).count();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| **b != removed && b != a)
                .count();
            let frac = moved as f64 / survived as f64;
            assert!(
                frac < 0.02,
                "removing {removed}: {moved} of {survived} surviving entries moved ({frac:.4})"
            );
            // Every slot of the removed backend went to someone else.
            assert!(!after.contains(&removed));
        }
    }

    #[test]
    fn disruption_on_add() {
        let m = 16_381;
        let all = equal(100);
        let before = build(&all[..99], m).unwrap();
        let after = build(&all, m).unwrap();
        let added = all[99].id;
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a && **a != added)
            .count();
        assert!(
            (moved as f64) < 0.02 * m as f64,
            "{moved} entries moved between old backends"
        );
    }

    #[test]
    fn weights_respected() {
        let m = 16_381;
        let weights = [1u32, 2, 3, 4];
        let bs: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| MaglevBackend {
                id: 10 + i as u32,
                key: backend_key(Ipv4Addr::new(10, 244, 1, i as u8), 50052),
                weight: w,
            })
            .collect();
        let t = build(&bs, m).unwrap();
        let c = counts(&t);
        let sum: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let expected = m as f64 * w as f64 / sum as f64;
            let got = c[&(10 + i as u32)] as f64;
            assert!(
                (got - expected).abs() / expected < 0.02,
                "weight {w}: got {got}, expected {expected}"
            );
        }
    }

    #[test]
    fn weights_with_many_backends_and_drain() {
        // 50 backends of weight 1, 50 of weight 3, and one drained.
        let m = 65_537;
        let mut bs = equal(101);
        for b in &mut bs[50..100] {
            b.weight = 3;
        }
        bs[100].weight = 0;
        let t = build(&bs, m).unwrap();
        let c = counts(&t);
        assert!(!c.contains_key(&bs[100].id));
        let unit = m as f64 / 200.0;
        for b in &bs[..100] {
            let expected = unit * b.weight as f64;
            let got = c[&b.id] as f64;
            assert!(
                (got - expected).abs() <= 1.0 + expected * 0.01,
                "{b:?}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn round_loop_and_heap_agree() {
        let cases: [(u32, &dyn Fn(u32) -> u32); 5] = [
            (4, &|i| i + 1),
            (30, &|i| 1 + i % 3),
            (100, &|i| if i == 0 { 65_535 } else { 1 }),
            (57, &|i| (i * 7919) % 1000), // includes a 0
            (10, &|_| 3),
        ];
        for (n, w) in cases {
            let mut bs = equal(n);
            for (i, b) in bs.iter_mut().enumerate() {
                b.weight = w(i as u32);
            }
            for m in [101, 16_381] {
                let a = build_with(&bs, m, Fill::Rounds).unwrap();
                let b = build_with(&bs, m, Fill::Heap).unwrap();
                assert_eq!(a, b, "n={n} m={m}");
                assert_eq!(build(&bs, m).unwrap(), a);
            }
        }
    }

    #[test]
    fn deterministic_and_order_independent() {
        let bs = equal(50);
        let a = build(&bs, 16_381).unwrap();
        let b = build(&bs, 16_381).unwrap();
        assert_eq!(a, b);
        let mut rev = bs.clone();
        rev.reverse();
        assert_eq!(build(&rev, 16_381).unwrap(), a);
        // A golden prefix pins the hash and the fill across refactors and
        // releases: every agent must build the same table from the same set.
        let two = [
            MaglevBackend {
                id: 1,
                key: backend_key(Ipv4Addr::new(10, 244, 2, 2), 50052),
                weight: 1,
            },
            MaglevBackend {
                id: 2,
                key: backend_key(Ipv4Addr::new(10, 244, 2, 3), 50052),
                weight: 1,
            },
        ];
        let t = build(&two, 13).unwrap();
        assert_eq!(t, GOLDEN_13);
    }

    const GOLDEN_13: [u32; 13] = [1, 1, 1, 2, 1, 2, 2, 2, 1, 2, 1, 1, 2];

    #[test]
    fn permutation_ranges() {
        for key in [0u64, 1, u64::MAX, 0xdead_beef] {
            for m in [2u64, 3, 101, 16_381, 65_537] {
                let (o, s) = permutation(key, m);
                assert!(o < m);
                assert!((1..m).contains(&s));
            }
        }
    }

    /// Prints the build time of the benchmark case (M = 65537, N = 1000);
    /// `cargo xtask bench` asserts the < 5 ms target in release mode.
    #[test]
    fn build_time_65537_x_1000() {
        let bs = equal(1000);
        let _ = build(&bs, 65_537).unwrap(); // warm up
        let runs = 5;
        let mut best = std::time::Duration::MAX;
        for _ in 0..runs {
            let t0 = std::time::Instant::now();
            let t = build(&bs, 65_537).unwrap();
            best = best.min(t0.elapsed());
            assert_eq!(t.len(), 65_537);
        }
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        println!("maglev build M=65537 N=1000: best of {runs} = {best:?} ({profile})");
    }
}

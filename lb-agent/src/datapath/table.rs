//! The weighted slot list used by `random`, `round-robin` and `least-conn`.
//!
//! The kernel picks a slot (at random, by a shared counter, or two at random
//! for least-conn) and reads a backend id from it, so a backend's share of the
//! slots is its share of the new flows. [`weighted_slots`] lays the slots out
//! as the smooth weighted round-robin sequence (nginx's algorithm): walking the
//! list in order gives each backend exactly its share, and spreads its turns
//! evenly (weights 5, 1, 1 give `a a b a c a a`, not `a a a a a b c`).

/// The slot list for `backends` (`(id, weight)` pairs), at most `cap` long.
///
/// - Weight 0 drains a backend: it gets no slot. No weight left: empty list.
/// - Weights are divided by their greatest common divisor, so `2, 4` and `1, 2`
///   give the same three slots.
/// - If the weights still add up to more than `cap`, they are scaled down in
///   proportion (largest-remainder rounding), keeping every backend at least
///   one slot. If
///   there are more backends than `cap`, each gets exactly one slot and the
///   list is longer than `cap`: callers should reject that case first.
/// - Equal weights give every id once, in the order given.
///
/// Callers pass `lb_common::limits::MAX_WEIGHTED_TABLE` as `cap`.
///
/// Cost: `O(n + len x d)`, where `d` is the number of distinct weights: within
/// a group of equal weights the nginx pick is a plain rotation, so only one
/// candidate per group is compared at each step.
pub fn weighted_slots(backends: &[(u32, u32)], cap: u32) -> Vec<u32> {
    let live: Vec<(u32, u64)> = backends
        .iter()
        .filter(|&&(_, w)| w > 0)
        .map(|&(id, w)| (id, u64::from(w)))
        .collect();
    if live.is_empty() {
        return Vec::new();
    }
    let mut weights: Vec<u64> = live.iter().map(|&(_, w)| w).collect();
    reduce_by_gcd(&mut weights);
    let sum: u64 = weights.iter().sum();
    let cap = u64::from(cap);
    if sum > cap {
        scale_down(&mut weights, sum, cap);
        reduce_by_gcd(&mut weights);
    }
    let ids: Vec<u32> = live.iter().map(|&(id, _)| id).collect();
    if weights.iter().all(|&w| w == 1) {
        return ids;
    }
    smooth_wrr(&ids, &weights)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn reduce_by_gcd(weights: &mut [u64]) {
    let g = weights.iter().fold(0, |g, &w| gcd(g, w));
    if g > 1 {
        for w in weights {
            *w /= g;
        }
    }
}

/// Scales `weights` (adding up to `sum` > `cap`) so they add up to at most
/// `cap`: each becomes `max(1, floor(w * b / sum))` for the largest budget
/// `b <= cap` that fits, and what is left of `cap` goes one slot each to the
/// largest remainders. If even all-ones do not fit, all become 1.
fn scale_down(weights: &mut [u64], sum: u64, cap: u64) {
    let scaled = |b: u64| weights.iter().map(move |&w| (w * b / sum).max(1));
    let total = |b: u64| scaled(b).sum::<u64>();
    // total() is non-decreasing in b; find the largest b with total(b) <= cap.
    let (mut lo, mut hi) = (0u64, cap);
    if total(0) > cap {
        weights.iter_mut().for_each(|w| *w = 1);
        return;
    }
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if total(mid) <= cap {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let mut new: Vec<u64> = scaled(lo).collect();
    // Hand what is left of the budget to the largest remainders (Hamilton's
    // method), skipping backends already rounded up to their minimum of 1.
    let mut left = cap - new.iter().sum::<u64>();
    if left > 0 {
        let mut order: Vec<usize> = (0..weights.len())
            .filter(|&i| weights[i] * lo / sum >= 1)
            .collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(weights[i] * lo % sum), i));
        for i in order {
            if left == 0 {
                break;
            }
            new[i] += 1;
            left -= 1;
        }
    }
    weights.copy_from_slice(&new);
}

/// nginx's smooth weighted round-robin, run for one full cycle (`sum` picks).
///
/// At every step each backend's `current` grows by its weight, the largest
/// `current` wins (the first one in input order on a tie), and the winner's
/// `current` drops by the total. After `t` steps, `current_i = t * w_i -
/// total * picks_i`, so among backends of equal weight the winner is the one
/// picked least, the first in order on a tie: a rotation. That lets each
/// group of equal weights offer a single candidate per step.
fn smooth_wrr(ids: &[u32], weights: &[u64]) -> Vec<u32> {
    struct Group {
        weight: i64,
        /// Input indexes, ascending.
        members: Vec<usize>,
        /// Next member in the rotation.
        pos: usize,
        /// Picks of every member at or after `pos` (those before have one more).
        round: i64,
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, &w) in weights.iter().enumerate() {
        let w = w as i64;
        match groups.iter_mut().find(|g| g.weight == w) {
            Some(g) => g.members.push(i),
            None => groups.push(Group {
                weight: w,
                members: vec![i],
                pos: 0,
                round: 0,
            }),
        }
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut out = Vec::with_capacity(total as usize);
    for t in 1..=total {
        // (current, input index, group) of the best candidate so far.
        let mut best: Option<(i64, usize, usize)> = None;
        for (gi, g) in groups.iter().enumerate() {
            let current = t * g.weight - total * g.round;
            let idx = g.members[g.pos];
            let better = match best {
                None => true,
                Some((bc, bi, _)) => current > bc || (current == bc && idx < bi),
            };
            if better {
                best = Some((current, idx, gi));
            }
        }
        let (_, idx, gi) = best.expect("at least one group");
        out.push(ids[idx]);
        let g = &mut groups[gi];
        g.pos += 1;
        if g.pos == g.members.len() {
            g.pos = 0;
            g.round += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CAP: u32 = 65_536;

    /// nginx's algorithm verbatim, for comparison.
    fn naive(backends: &[(u32, u64)]) -> Vec<u32> {
        let total: i64 = backends.iter().map(|&(_, w)| w as i64).sum();
        let mut current = vec![0i64; backends.len()];
        let mut out = Vec::new();
        for _ in 0..total {
            let mut best: Option<usize> = None;
            for (i, &(_, w)) in backends.iter().enumerate() {
                current[i] += w as i64;
                if best.is_none_or(|b| current[i] > current[b]) {
                    best = Some(i);
                }
            }
            let b = best.unwrap();
            current[b] -= total;
            out.push(backends[b].0);
        }
        out
    }

    fn counts(slots: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in slots {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn empty() {
        assert!(weighted_slots(&[], CAP).is_empty());
        assert!(weighted_slots(&[(1, 0), (2, 0)], CAP).is_empty());
    }

    #[test]
    fn equal_weights_each_once_in_order() {
        assert_eq!(weighted_slots(&[(7, 1), (3, 1), (9, 1)], CAP), [7, 3, 9]);
        assert_eq!(weighted_slots(&[(7, 5), (3, 5), (9, 5)], CAP), [7, 3, 9]);
        assert_eq!(weighted_slots(&[(4, 100)], CAP), [4]);
    }

    #[test]
    fn interleaving_5_1_1() {
        let (a, b, c) = (1, 2, 3);
        assert_eq!(
            weighted_slots(&[(a, 5), (b, 1), (c, 1)], CAP),
            [a, a, b, a, c, a, a]
        );
    }

    #[test]
    fn exact_counts() {
        let s = weighted_slots(&[(1, 3), (2, 2), (3, 1), (4, 0)], CAP);
        assert_eq!(s.len(), 6);
        let c = counts(&s);
        assert_eq!(c[&1], 3);
        assert_eq!(c[&2], 2);
        assert_eq!(c[&3], 1);
        assert!(!c.contains_key(&4));
        // 3,2,1 -> a b a c b a (nginx).
        assert_eq!(s, [1, 2, 1, 3, 2, 1]);
    }

    #[test]
    fn gcd_reduction() {
        assert_eq!(
            weighted_slots(&[(1, 10), (2, 20), (3, 30)], CAP),
            weighted_slots(&[(1, 1), (2, 2), (3, 3)], CAP)
        );
        assert_eq!(weighted_slots(&[(1, 10), (2, 20), (3, 30)], CAP).len(), 6);
        assert_eq!(weighted_slots(&[(1, 6), (2, 4)], CAP), [1, 2, 1, 2, 1]);
    }

    #[test]
    fn no_overflow_on_large_weights() {
        let s = weighted_slots(&[(1, u32::MAX), (2, u32::MAX - 1)], 100);
        assert!(s.len() <= 100);
        let c = counts(&s);
        assert_eq!(c[&1], c[&2]); // 50/50 after largest-remainder rounding
    }

    #[test]
    fn cap_scales_down_keeping_every_backend() {
        // 1000 + 1 + 1 over a cap of 100: the heavy one shrinks, the light
        // ones keep one slot each.
        let s = weighted_slots(&[(1, 1000), (2, 1), (3, 1)], 100);
        assert!(s.len() <= 100, "{}", s.len());
        let c = counts(&s);
        assert_eq!(c[&2], 1);
        assert_eq!(c[&3], 1);
        assert!(c[&1] >= 95, "{}", c[&1]);
        // Proportions survive scaling: 3:1 stays 3:1.
        let s = weighted_slots(&[(1, 30_000), (2, 10_001)], 400);
        let c = counts(&s);
        assert!(s.len() <= 400);
        let ratio = c[&1] as f64 / c[&2] as f64;
        assert!((ratio - 3.0).abs() < 0.05, "{ratio}");
        // Largest remainder: 3.33, 3.33, 3.34 of 10 -> 3, 3, 4.
        let s = weighted_slots(&[(1, 333), (2, 333), (3, 334)], 10);
        let c = counts(&s);
        assert_eq!((c[&1], c[&2], c[&3]), (3, 3, 4));
        // Exactly at the cap: untouched.
        let s = weighted_slots(&[(1, 60), (2, 40)], 5);
        assert_eq!(s, [1, 2, 1, 2, 1]);
    }

    #[test]
    fn more_backends_than_cap() {
        let bs: Vec<(u32, u32)> = (1..=10).map(|i| (i, i)).collect();
        let s = weighted_slots(&bs, 4);
        assert_eq!(s, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn matches_naive_nginx() {
        // Small deterministic pseudo-random cases (xorshift), including ties.
        let mut x: u64 = 0x1234_5678_9abc_def0;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..300 {
            let n = 1 + rnd(12) as usize;
            let maxw = 1 + rnd(9);
            let bs: Vec<(u32, u32)> = (0..n).map(|i| (100 + i as u32, rnd(maxw) as u32)).collect();
            let got = weighted_slots(&bs, CAP);
            // Reference: same filtering and gcd reduction, then nginx verbatim.
            let live: Vec<(u32, u64)> = bs
                .iter()
                .filter(|b| b.1 > 0)
                .map(|&(id, w)| (id, w as u64))
                .collect();
            let g = live.iter().fold(0, |g, &(_, w)| gcd(g, w));
            let reduced: Vec<(u32, u64)> = live.iter().map(|&(id, w)| (id, w / g.max(1))).collect();
            assert_eq!(got, naive(&reduced), "{bs:?}");
        }
    }

    #[test]
    fn well_interleaved() {
        // With weights 2:1 no backend ever appears twice in a row more than its
        // share allows: the longest run of `a` is 2 in 1000:500 after gcd.
        let s = weighted_slots(&[(1, 1000), (2, 500)], CAP);
        assert_eq!(s, [1, 2, 1]);
        let s = weighted_slots(&[(1, 7), (2, 3), (3, 2)], CAP);
        let longest = s.chunk_by(|a, b| a == b).map(|r| r.len()).max().unwrap();
        assert!(longest <= 2, "{s:?}");
    }
}

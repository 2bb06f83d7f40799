//! Maglev table size rules, shared by the config parser, the controller's
//! annotations and the agent's table builder.

pub use crate::model::is_prime;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("maglev table size {0} is not prime")]
    NotPrime(u32),
    #[error("maglev table size {m} must be > 100 x {n} backends = {min}")]
    TooSmall { m: u32, n: usize, min: u64 },
    #[error("maglev table size {m} cannot hold {n} backends")]
    TooManyBackends { m: u32, n: usize },
}

/// Checks a table size for `n_backends` backends with weight > 0: `m` must be
/// prime (so every skip walks the whole table) and greater than
/// `100 x n_backends` (so weights and balance stay within about 1%).
pub fn validate_m(m: u32, n_backends: usize) -> Result<(), MaglevError> {
    if !is_prime(m) {
        return Err(MaglevError::NotPrime(m));
    }
    let min = 100u64.saturating_mul(n_backends as u64);
    if u64::from(m) <= min {
        return Err(MaglevError::TooSmall {
            m,
            n: n_backends,
            min,
        });
    }
    Ok(())
}

/// The smallest prime strictly greater than `n`.
///
/// # Panics
/// If there is none that fits a `u32` (`n >= 4_294_967_291`).
pub fn next_prime_above(n: u32) -> u32 {
    let mut c = n.checked_add(1).expect("no u32 prime above u32::MAX");
    while !is_prime(c) {
        c = c.checked_add(1).expect("no u32 prime above 4294967291");
    }
    c
}

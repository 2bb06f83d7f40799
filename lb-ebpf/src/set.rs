//! The two program sets in the object: `Full` (Linux 5.12+) and `Compat`
//! (older kernels: Debian 11 and Amazon Linux 2 run 5.10). The packet walk
//! is one generic code base (`process::<C, S: ProgramSet>`); the sets differ
//! only in the three operations of [`ProgramSet`], so they cannot drift.
//!
//! What `Full` uses that 5.10 refuses:
//! - BPF_ATOMIC with BPF_FETCH (fetch-and-add with its result used) and
//!   BPF_CMPXCHG, 5.12+ ("BPF_STX uses reserved fields" before). A plain
//!   atomic add whose result is unused (BPF_XADD) is as old as eBPF and is
//!   used by both sets for every shared counter;
//! - `bpf_ktime_get_coarse_ns` (helper 160), 5.11+.
//!
//! `lb-agent` loads `Full` and falls back to `Compat` when the kernel refuses
//! it (`--bpf-programs`, docs/operations.md "Kernels"). A test scans the
//! compat programs' instructions for any of the above
//! (`lb-agent/src/datapath/programs.rs`).

use aya_ebpf::helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns};
use core::intrinsics::AtomicOrdering;

pub trait ProgramSet {
    /// Whether the XDP program uses the per-CPU flow cache (`flowcache`).
    /// Not in `Compat`: 5.10's verifier did not accept the compat programs
    /// with it (the packet tests under `cargo xtask test-kernels --kernel
    /// 5.10` failed to load them).
    const FLOW_CACHE: bool;

    /// This set's index in the program arrays that hold both sets
    /// (`V6_*_PROGS`, `SELECTOR_RETURN_*`): full 0, compat 1.
    const INDEX: u32;

    /// Whether a new flow asks its service's user-defined selector
    /// (`selector`). Not in `Compat`: the call took the compat XDP
    /// program's stack 16 bytes past the verifier's 512 (its walk's frame
    /// 424 bytes with it, 416 without, plus 96 for its deepest call chain),
    /// so on those kernels a service with a selector uses its built-in
    /// algorithm (docs/policies.md). The full XDP walk's frame stays 416.
    const SELECTOR: bool;

    /// Nanoseconds since boot (CLOCK_MONOTONIC, or its coarse variant) for
    /// last-seen, the route cache and affinity.
    fn now() -> u64;

    /// Advances the shared counter `*p` by one and returns a position for
    /// round-robin.
    ///
    /// # Safety
    /// `p` points into a map value.
    unsafe fn next(p: *mut u64) -> u64;

    /// Moves `*p` from `old` to `new`; true if this call made the move (and
    /// so may count it).
    ///
    /// # Safety
    /// `p` points into a map value.
    unsafe fn transition(p: *mut u32, old: u32, new: u32) -> bool;
}

/// Linux 5.12+: exact atomics and the coarse clock.
pub struct Full;

impl ProgramSet for Full {
    const FLOW_CACHE: bool = true;
    const INDEX: u32 = 0;
    const SELECTOR: bool = true;

    /// The coarse clock (CLOCK_MONOTONIC_COARSE) is enough for second-granular
    /// timeouts and costs a fraction of `bpf_ktime_get_ns`.
    #[inline(always)]
    fn now() -> u64 {
        unsafe { bpf_ktime_get_coarse_ns() }
    }

    /// Fetch-and-add: every new flow gets its own position.
    #[inline(always)]
    unsafe fn next(p: *mut u64) -> u64 {
        unsafe { core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, 1) }
    }

    /// Compare-and-swap: of two CPUs that see a FIN and a RST of one flow at
    /// once, exactly one counts the close.
    #[inline(always)]
    unsafe fn transition(p: *mut u32, old: u32, new: u32) -> bool {
        unsafe {
            core::intrinsics::atomic_cxchg::<
                u32,
                { AtomicOrdering::SeqCst },
                { AtomicOrdering::SeqCst },
            >(p, old, new)
            .1
        }
    }
}

/// Linux 4.18+ (5.10 in the matrix): no fetch or cmpxchg atomics, the
/// precise clock. What it gives up, only when CPUs race on one map value:
/// - round-robin: two CPUs that read the counter at once pick the same
///   backend (the counter itself stays exact: a plain atomic add), so the
///   rotation is approximate under concurrent new flows;
/// - closes: a FIN and a RST of one flow handled on two CPUs at the same
///   instant can both count the close, so that backend's active count (for
///   least-conn, `opens - closes - expired`, floored at 0) stays one low;
///   the agent's GC does not correct an over-counted close. Least-conn is a
///   power-of-two choice on these counts, so the effect is a slightly
///   different pick, never a wrong or drained backend. The same race can
///   let a SYN-to-ESTABLISHED move overwrite a CLOSING that a FIN wrote at
///   the same instant; the entry then closes on the next FIN/RST or by
///   idle timeout (the GC then counts that expiry as a close as well);
/// - the clock costs a little more per packet (`bpf_ktime_get_ns`).
pub struct Compat;

impl ProgramSet for Compat {
    const FLOW_CACHE: bool = false;
    const INDEX: u32 = 1;
    const SELECTOR: bool = false;

    #[inline(always)]
    fn now() -> u64 {
        unsafe { bpf_ktime_get_ns() }
    }

    /// Read, then a plain atomic add (BPF_XADD, no fetch).
    #[inline(always)]
    unsafe fn next(p: *mut u64) -> u64 {
        unsafe {
            let n = core::ptr::read_volatile(p);
            crate::atomic_add(p, 1);
            n
        }
    }

    /// Read, compare, write: not atomic (see the type's docs).
    #[inline(always)]
    unsafe fn transition(p: *mut u32, old: u32, new: u32) -> bool {
        unsafe {
            if core::ptr::read_volatile(p) != old {
                return false;
            }
            core::ptr::write_volatile(p, new);
            true
        }
    }
}

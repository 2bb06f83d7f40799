//! A data path for tests and benchmarks: loaded with small maps, pinned in a
//! private directory under `/sys/fs/bpf` (`rpclb-tmp-<pid>-<n>`), and
//! unpinned on drop, also while unwinding. Directories left by processes that
//! no longer exist (killed before their drop ran) are removed on first use.
//!
//! Programs load on first use ([`ProgramLoading::OnDemand`]): the maps are
//! created at once, but a program passes the verifier (about a second each
//! for `rpclb_xdp`, `rpclb_tc` and `rpclb_xdp6`) only when a test first runs
//! a frame through it. [`test_run`] loads the hook's entry program, and, for
//! a frame the entry program hands to IPv6 (EtherType 0x86DD, the test
//! `v6::is_ipv6_*` makes in lb-ebpf), also the IPv6 program it tail-calls
//! through `V6_XDP_PROGS` / `V6_TC_PROGS`; the frame then goes through the
//! real entry program and its tail call, as in production. No test declares
//! what it needs, and none can run a program that is not loaded:
//! - a hook's entry program is loaded before its first run;
//! - while a hook's IPv6 program is not loaded, each run checks the
//!   `pass_ipv6_no_program` counter, which the entry program counts when its
//!   tail call finds no program, and panics if it moved (a frame the check
//!   above missed would otherwise pass to the stack unnoticed);
//! - [`Datapath::xdp_program`] and [`Datapath::tc_program`] (attaching, the
//!   benchmark's own test runs) load the hook's both programs first;
//! - a program the kernel refuses on first use panics (with `auto`, the
//!   compat set is loaded instead, as the agent does).
//!
//! A test that wants all four at load sets
//! `program_loading = ProgramLoading::All` in its `tune`.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::programs::{ProgramError, TestRun, TestRunOptions};
use lb_common::{map_names, reason};

pub use super::Hook;
use super::{Datapath, DatapathConfig, DatapathError, MapWriter, ProgramLoading, cleanup};

const PREFIX: &str = "rpclb-tmp-";

/// A loaded data path in a private pin directory; see the module docs.
pub struct ScratchDatapath {
    dp: Option<Datapath>,
    dir: PathBuf,
}

fn sweep_dead(root: &Path) {
    let Ok(rd) = std::fs::read_dir(root) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = cleanup(&e.path());
        }
    }
}

impl ScratchDatapath {
    /// Loads with `DatapathConfig::small` and programs on demand (see the
    /// module docs), adjusted by `tune`.
    pub fn new(tune: impl FnOnce(&mut DatapathConfig)) -> Result<Self, DatapathError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        static SWEEP: Once = Once::new();
        let root = Path::new("/sys/fs/bpf");
        SWEEP.call_once(|| sweep_dead(root));
        let dir = root.join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cfg = DatapathConfig::small(&dir);
        cfg.program_loading = ProgramLoading::OnDemand;
        tune(&mut cfg);
        // A failed load unpins what it created itself.
        let mut dp = Datapath::load(&cfg)?;
        // BPF_PROG_TEST_RUN's XDP frames arrive on lo, whose redirects (the
        // RST reply) then count as deliverable; tests that route elsewhere
        // mark their own interfaces.
        dp.writer()
            .set_xdp_iface(1, lb_common::xdp_iface::REDIRECT_TARGET)?;
        Ok(ScratchDatapath { dp: Some(dp), dir })
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("loaded until drop")
    }

    pub fn writer(&mut self) -> &mut MapWriter {
        self.dp().writer()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One BPF_PROG_TEST_RUN of `frame`: the verdict and the output frame.
    pub fn run(&mut self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        test_run(self.dp(), hook, frame)
    }

    /// A second instance of the programs on this one's pinned maps: it
    /// sees every map write at once (for tests that look between writes).
    /// Its programs load on demand too, into the same pinned prog arrays.
    pub fn twin(&self, tune: impl FnOnce(&mut DatapathConfig)) -> Result<Datapath, DatapathError> {
        let mut cfg = DatapathConfig::small(&self.dir);
        cfg.program_loading = ProgramLoading::OnDemand;
        tune(&mut cfg);
        Datapath::load(&cfg)
    }
}

/// One BPF_PROG_TEST_RUN of `frame` through `dp`'s program for `hook`,
/// loaded first where not yet (with its IPv6 program for an IPv6 frame; see
/// the module docs). Panics if the kernel refuses a program, or if the frame
/// reached the tail call to an IPv6 program that is not loaded.
pub fn test_run(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), ProgramError> {
    run_checked(dp, hook, frame, goes_to_ipv6(frame))
}

/// [`test_run`] as if `frame` were not an IPv6 frame: for the test that
/// shows the check after the run catches a frame that reached the IPv6
/// program's tail call while that program is not loaded.
#[doc(hidden)]
pub fn test_run_without_ipv6(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), ProgramError> {
    run_checked(dp, hook, frame, false)
}

fn run_checked(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
    ipv6: bool,
) -> Result<(u32, Vec<u8>), ProgramError> {
    // "load data path" first, as the `expect` of a load at start said
    // (xtask's kernel table reads it).
    if let Err(e) = dp.load_hook(hook, ipv6) {
        panic!("load data path ({hook:?} programs, loaded on first use): {e:?}");
    }
    let guard = (!dp.ipv6_ready(hook)).then(|| ipv6_no_program(dp));
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let r = match hook {
        Hook::Xdp => dp.entry_xdp().test_run(opts),
        Hook::Tc => dp.entry_tc().test_run(opts),
    }?;
    if let Some(before) = guard {
        let after = ipv6_no_program(dp);
        assert_eq!(
            after, before,
            "a {hook:?} test run reached the tail call to the IPv6 program, which is not \
             loaded (scratch::goes_to_ipv6 disagrees with lb-ebpf's v6::is_ipv6_*): frame {frame:02x?}"
        );
    }
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// Whether the entry programs tail-call the IPv6 program for `frame`: its
/// EtherType is IPv6 (lb-ebpf/src/v6.rs, `is_ipv6_xdp` / `is_ipv6_tc`).
pub fn goes_to_ipv6(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&[0x86, 0xdd][..])
}

/// `pass_ipv6_no_program` summed over CPUs.
fn ipv6_no_program(dp: &Datapath) -> u64 {
    dp.writer
        .reasons
        .get(&reason::PASS_IPV6_NO_PROGRAM, 0)
        .unwrap_or_else(|e| panic!("{}: {e}", map_names::REASONS))
        .iter()
        .sum()
}

/// Whether tests that need privileges must fail instead of skipping: under
/// CI (`CI=true`, as `.ci/run` sets) or with `RPCLB_REQUIRE_PRIVILEGES=1`.
pub fn privileges_required() -> bool {
    let on = |k: &str| {
        std::env::var(k).is_ok_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            !v.is_empty() && v != "0" && v != "false"
        })
    };
    on("CI") || on("RPCLB_REQUIRE_PRIVILEGES")
}

/// The gate of every test that needs privileges: `true` when `ok`; else
/// it prints `SKIP: <what>` and returns `false`, or, when
/// [`privileges_required`], panics, so that a run without root or BPF
/// cannot pass silently.
pub fn skip_unless(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if privileges_required() {
        panic!(
            "this test cannot run here: {what} (CI or RPCLB_REQUIRE_PRIVILEGES is set, so it fails instead of skipping)"
        );
    }
    eprintln!("SKIP: {what}");
    false
}

/// [`skip_unless`] for tests that load BPF programs: root (euid 0).
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    skip_unless(
        root,
        &format!("{what} needs root (BPF_PROG_LOAD, BPF_PROG_TEST_RUN)"),
    )
}

impl Drop for ScratchDatapath {
    fn drop(&mut self) {
        self.dp.take();
        if let Err(e) = cleanup(&self.dir) {
            eprintln!("cleanup {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::goes_to_ipv6;

    /// The EtherType at bytes 12-13, as lb-ebpf's `v6::is_ipv6_*` reads it:
    /// a frame too short for an Ethernet header never reaches the tail call.
    #[test]
    fn ipv6_frames_are_those_of_ethertype_86dd() {
        let mut f = [0u8; 54];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert!(goes_to_ipv6(&f));
        assert!(goes_to_ipv6(&f[..14]));
        assert!(!goes_to_ipv6(&f[..13]));
        assert!(!goes_to_ipv6(&[]));
        for other in [[0x08, 0x00], [0x08, 0x06], [0x81, 0x00], [0xdd, 0x86]] {
            f[12..14].copy_from_slice(&other);
            assert!(!goes_to_ipv6(&f), "{other:02x?}");
        }
    }
}

//! A data path for tests and benchmarks: loaded with small maps, pinned in a
//! private directory under `/sys/fs/bpf` (`rpclb-tmp-<pid>-<n>`), and
//! unpinned on drop, also while unwinding. Directories left by processes that
//! no longer exist (killed before their drop ran) are removed on first use.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::programs::{ProgramError, TestRun, TestRunOptions};

use super::{Datapath, DatapathConfig, DatapathError, MapWriter, cleanup};

const PREFIX: &str = "rpclb-tmp-";

/// A loaded data path in a private pin directory; see the module docs.
pub struct ScratchDatapath {
    dp: Option<Datapath>,
    dir: PathBuf,
}

/// Which program a test run goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
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
    /// Loads with `DatapathConfig::small`, adjusted by `tune`.
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
    pub fn twin(&self, tune: impl FnOnce(&mut DatapathConfig)) -> Result<Datapath, DatapathError> {
        let mut cfg = DatapathConfig::small(&self.dir);
        tune(&mut cfg);
        Datapath::load(&cfg)
    }
}

/// One BPF_PROG_TEST_RUN of `frame` through `dp`'s program for `hook`.
pub fn test_run(
    dp: &mut Datapath,
    hook: Hook,
    frame: &[u8],
) -> Result<(u32, Vec<u8>), ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let r = match hook {
        Hook::Xdp => dp.xdp_program().test_run(opts),
        Hook::Tc => dp.tc_program().test_run(opts),
    }?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
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

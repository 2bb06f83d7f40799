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
        let dp = Datapath::load(&cfg);
        if dp.is_err() {
            let _ = cleanup(&dir);
        }
        Ok(ScratchDatapath { dp: Some(dp?), dir })
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
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let r = match hook {
            Hook::Xdp => self.dp().xdp_program().test_run(opts),
            Hook::Tc => self.dp().tc_program().test_run(opts),
        }?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out))
    }
}

impl Drop for ScratchDatapath {
    fn drop(&mut self) {
        self.dp.take();
        if let Err(e) = cleanup(&self.dir) {
            eprintln!("cleanup {}: {e}", self.dir.display());
        }
    }
}

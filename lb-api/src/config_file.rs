//! A config file followed by polling: what the agent (`lb-agent --config`)
//! and the standalone controller (`lb-controller --config`) both do.
//!
//! Each [`ConfigFile::read`] reads the whole file once and compares a hash
//! of exactly those bytes (or of the read error) with the last read's, so a
//! change is noticed whatever its timestamps say, and what is parsed is what
//! was compared: no edit slips in between.
//!
//! A change takes effect only once it has settled: two reads at least half
//! a poll interval apart saw the same bytes. A file caught half-written (an editor
//! or `cp` still writing it, a truncation before the rewrite) is never
//! applied unless it stays that way. A forced read (SIGHUP, start) takes the
//! file as it is.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::{self, Config, ConfigError};

/// One followed config file.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    origin: String,
    /// Half the poll interval: how long a change must stay the same.
    settle: Duration,
    /// Hash of what the last taken read saw (text or error).
    seen: Option<u64>,
    /// A change not taken yet: its hash and when it was first seen.
    pending: Option<(u64, Instant)>,
    /// The last read's services by their entry's text: a change parses
    /// only the entries it changed.
    cache: config::EntryCache,
}

/// The outcome of a [`ConfigFile::read`].
#[derive(Debug)]
pub enum Reload {
    /// The same bytes (or the same error) as the last read that was taken.
    Unchanged,
    /// Changed, but not yet stable for half a poll interval: read again later.
    Settling,
    /// Changed and settled (or forced): the file parsed, or why it did not.
    Changed(Result<Config, ConfigError>),
}

impl ConfigFile {
    /// Follows `path`, read every `poll`; a change is taken once it has
    /// been stable for half of that, so two consecutive polls that see the
    /// same bytes take it.
    pub fn new(path: impl Into<PathBuf>, poll: Duration) -> Self {
        let path = path.into();
        ConfigFile {
            origin: path.display().to_string(),
            path,
            settle: poll / 2,
            seen: None,
            pending: None,
            cache: config::EntryCache::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; parses it when it changed since the last taken read
    /// and has settled, or when `force` (SIGHUP), or on the first read.
    pub fn read(&mut self, force: bool) -> Reload {
        let read = std::fs::read(&self.path);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match &read {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => format!("\0error {e}").hash(&mut h),
        }
        let h = h.finish();
        if !force && self.seen.is_some() {
            if self.seen == Some(h) {
                self.pending = None;
                return Reload::Unchanged;
            }
            match self.pending {
                Some((p, since)) if p == h && since.elapsed() >= self.settle => {}
                Some((p, _)) if p == h => return Reload::Settling,
                _ => {
                    self.pending = Some((h, Instant::now()));
                    return Reload::Settling;
                }
            }
        }
        self.seen = Some(h);
        self.pending = None;
        let text = read.and_then(|b| {
            String::from_utf8(b).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is not UTF-8")
            })
        });
        Reload::Changed(match text {
            Ok(t) => config::parse_cached(&t, &self.origin, &mut self.cache),
            Err(source) => Err(ConfigError::Read {
                origin: self.origin.clone(),
                source,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads until the change is taken (poll 0: the second read of the
    /// same bytes takes it).
    fn settled(f: &mut ConfigFile) -> Reload {
        match f.read(false) {
            Reload::Settling => f.read(false),
            r => r,
        }
    }

    #[test]
    fn notices_changes_by_content_and_reports_errors_once() {
        let dir = std::env::temp_dir().join(format!("rpclb-configfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        let good = "services:\n  - name: a/b:http\n    vip: 10.96.0.1\n    port: 80\n";
        std::fs::write(&path, good).unwrap();
        let mut f = ConfigFile::new(&path, Duration::ZERO);
        let Reload::Changed(Ok(c)) = f.read(false) else {
            panic!("first read parses");
        };
        assert_eq!(c.state.services.len(), 1);
        assert!(matches!(f.read(false), Reload::Unchanged));
        assert!(matches!(f.read(true), Reload::Changed(Ok(_))), "forced");
        // Same bytes, new mtime: unchanged.
        std::fs::write(&path, good).unwrap();
        assert!(matches!(f.read(false), Reload::Unchanged));
        std::fs::write(&path, "services:\n  - name: a\n    vip: 10.96.0.300\n").unwrap();
        let Reload::Changed(Err(e)) = settled(&mut f) else {
            panic!("an invalid file is a change with an error");
        };
        assert!(e.to_string().contains("services.yaml:3:"), "{e}");
        assert!(
            matches!(f.read(false), Reload::Unchanged),
            "the same error once"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let Reload::Changed(Err(e)) = settled(&mut f) else {
            panic!("not UTF-8");
        };
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let Reload::Changed(Err(e)) = settled(&mut f) else {
            panic!("a missing file is a change with an error");
        };
        assert!(e.to_string().contains("cannot read config"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A file caught half-written is never taken while it keeps changing,
    /// and a change is taken only after `settle`.
    #[test]
    fn a_change_is_taken_once_it_has_settled() {
        let dir = std::env::temp_dir().join(format!("rpclb-configfile-s-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        let one = "services:\n  - name: a/b:http\n    vip: 10.96.0.1\n    port: 80\n";
        let two = format!("{one}  - name: a/c:http\n    vip: 10.96.0.2\n    port: 80\n");
        std::fs::write(&path, one).unwrap();
        let settle = Duration::from_millis(200);
        let mut f = ConfigFile::new(&path, 2 * settle);
        assert!(
            matches!(f.read(false), Reload::Changed(Ok(_))),
            "the first read"
        );
        // Being written: each read sees other bytes, none is taken (one
        // of them is the old file again: unchanged).
        let mut text = String::new();
        for line in two.split_inclusive('\n') {
            text.push_str(line);
            std::fs::write(&path, &text).unwrap();
            match f.read(false) {
                Reload::Settling => {}
                Reload::Unchanged if text == one => {}
                r => panic!("{text:?}: {r:?}"),
            }
        }
        // Whole now, but not yet stable for `settle`.
        assert!(matches!(f.read(false), Reload::Settling));
        std::thread::sleep(settle);
        let Reload::Changed(Ok(c)) = f.read(false) else {
            panic!("a settled change is taken");
        };
        assert_eq!(c.state.services.len(), 2);
        // Truncated, then rewritten as it was before the next read: nothing
        // happened.
        std::fs::write(&path, "").unwrap();
        assert!(matches!(f.read(false), Reload::Settling));
        std::fs::write(&path, &two).unwrap();
        assert!(matches!(f.read(false), Reload::Unchanged));
        std::thread::sleep(settle);
        assert!(matches!(f.read(false), Reload::Unchanged));
        // A forced read does not wait.
        std::fs::write(&path, one).unwrap();
        assert!(matches!(f.read(true), Reload::Changed(Ok(c)) if c.state.services.len() == 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

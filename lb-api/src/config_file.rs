//! A config file followed by polling: what the agent (`lb-agent --config`)
//! and the standalone controller (`lb-controller --config`) both do.
//!
//! Each [`ConfigFile::read`] reads the whole file once and compares a hash
//! of exactly those bytes (or of the read error) with the last read's, so a
//! change is noticed whatever its timestamps say, and what is parsed is what
//! was compared: no edit slips in between.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError};

/// One followed config file.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    origin: String,
    /// Hash of what the last read saw (text or error).
    seen: Option<u64>,
}

/// The outcome of a [`ConfigFile::read`].
#[derive(Debug)]
pub enum Reload {
    /// The same bytes (or the same error) as the last read.
    Unchanged,
    /// Changed (or forced): the file parsed, or why it did not.
    Changed(Result<Config, ConfigError>),
}

impl ConfigFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        ConfigFile {
            origin: path.display().to_string(),
            path,
            seen: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file; parses it when it changed since the last read, or
    /// when `force` (SIGHUP).
    pub fn read(&mut self, force: bool) -> Reload {
        let read = std::fs::read(&self.path);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match &read {
            Ok(bytes) => bytes.hash(&mut h),
            Err(e) => format!("\0error {e}").hash(&mut h),
        }
        let h = h.finish();
        if self.seen == Some(h) && !force {
            return Reload::Unchanged;
        }
        self.seen = Some(h);
        let text = read.and_then(|b| {
            String::from_utf8(b).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is not UTF-8")
            })
        });
        Reload::Changed(match text {
            Ok(t) => config::parse(&t, &self.origin),
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

    #[test]
    fn notices_changes_by_content_and_reports_errors_once() {
        let dir = std::env::temp_dir().join(format!("rpclb-configfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        let good = "services:\n  - name: a/b:http\n    vip: 10.96.0.1\n    port: 80\n";
        std::fs::write(&path, good).unwrap();
        let mut f = ConfigFile::new(&path);
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
        let Reload::Changed(Err(e)) = f.read(false) else {
            panic!("an invalid file is a change with an error");
        };
        assert!(e.to_string().contains("services.yaml:3:"), "{e}");
        assert!(
            matches!(f.read(false), Reload::Unchanged),
            "the same error once"
        );
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let Reload::Changed(Err(e)) = f.read(false) else {
            panic!("not UTF-8");
        };
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let Reload::Changed(Err(e)) = f.read(false) else {
            panic!("a missing file is a change with an error");
        };
        assert!(e.to_string().contains("cannot read config"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

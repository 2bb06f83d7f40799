//! Following the PEM files: [`Reloader`] re-reads them every poll; when
//! their bytes change and the new set is good (parses, key matches, builds a
//! configuration), it publishes the new configuration on a watch channel,
//! which new connections use. A bad set (half-written, a certificate without
//! its new key yet, garbage) is logged once and counted, and the last good
//! configuration stays.
//!
//! The controller stream's three files ([`Reloader::new`]) and the gRPC
//! mode's per-service TLS files ([`Reloader::files`], any set) share it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Contents, LeafInfo, Material, TlsError, TlsPaths};

/// A configuration and the leaf certificate it presents (for a set that
/// presents none, e.g. a CA bundle alone: its first CA certificate).
#[derive(Debug)]
pub struct Loaded<C> {
    pub config: Arc<C>,
    pub leaf: LeafInfo,
    /// 1 for the files read at start, +1 per reload.
    pub generation: u64,
}

/// Counts, for metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub reloads: AtomicU64,
    pub errors: AtomicU64,
}

/// What a poll found.
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    Unchanged,
    Reloaded,
    /// Changed but not usable; the last good configuration stays.
    Invalid(String),
}

type Build<C> = Box<dyn Fn(&[Vec<u8>]) -> Result<(C, LeafInfo), TlsError> + Send + Sync>;

/// Follows a set of files and builds a `C` (a rustls config) from them.
pub struct Reloader<C> {
    files: Vec<PathBuf>,
    /// The file logs name (the certificate).
    shown: PathBuf,
    build: Build<C>,
    /// The bytes last tried, good or not (a bad set is reported once);
    /// `None` when the last read failed.
    seen: Option<Vec<Vec<u8>>>,
    tx: watch::Sender<Arc<Loaded<C>>>,
    pub stats: Arc<ReloadStats>,
}

impl<C> std::fmt::Debug for Reloader<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

fn read_all(files: &[PathBuf]) -> Result<Vec<Vec<u8>>, TlsError> {
    files
        .iter()
        .map(|p| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.clone(),
                source,
            })
        })
        .collect()
}

impl<C: Send + Sync + 'static> Reloader<C> {
    /// Follows the stream's three files ([`TlsPaths`], checked as a
    /// [`Material`]); an error here is fatal to the caller (nothing good yet).
    pub fn new(
        paths: TlsPaths,
        build: impl Fn(&Material) -> Result<C, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let files = vec![paths.ca.clone(), paths.cert.clone(), paths.key.clone()];
        let shown = paths.cert.clone();
        Self::files(files, shown, move |b| {
            let c = Contents {
                ca: b[0].clone(),
                cert: b[1].clone(),
                key: b[2].clone(),
            };
            let m = Material::from_contents(&paths, &c)?;
            Ok((build(&m)?, m.leaf))
        })
    }

    /// Follows any set of files: `build` gets their bytes, in order, and
    /// makes the configuration and the leaf certificate it presents (logs
    /// name `shown`). An error here is fatal to the caller.
    pub fn files(
        files: Vec<PathBuf>,
        shown: PathBuf,
        build: impl Fn(&[Vec<u8>]) -> Result<(C, LeafInfo), TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let seen = read_all(&files)?;
        let (config, leaf) = build(&seen)?;
        let (tx, _) = watch::channel(Arc::new(Loaded {
            config: Arc::new(config),
            leaf,
            generation: 1,
        }));
        Ok(Reloader {
            files,
            shown,
            build: Box::new(build),
            seen: Some(seen),
            tx,
            stats: Arc::default(),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Loaded<C>>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Loaded<C>> {
        self.tx.borrow().clone()
    }

    /// The followed files.
    pub fn paths(&self) -> &[PathBuf] {
        &self.files
    }

    /// Re-reads the files and publishes a changed, good set.
    pub fn poll(&mut self) -> Polled {
        let c = match read_all(&self.files) {
            Ok(c) => c,
            Err(e) => {
                // A file mid-replace (or gone): reported once.
                if self.seen.take().is_none() {
                    return Polled::Unchanged;
                }
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                return Polled::Invalid(e.to_string());
            }
        };
        if self.seen.as_ref() == Some(&c) {
            return Polled::Unchanged;
        }
        let seen = self.seen.insert(c);
        match (self.build)(seen) {
            Ok((config, leaf)) => {
                let generation = self.tx.borrow().generation + 1;
                self.tx.send_replace(Arc::new(Loaded {
                    config: Arc::new(config),
                    leaf,
                    generation,
                }));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Polled::Reloaded
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Polled::Invalid(e.to_string())
            }
        }
    }

    /// Polls every `every` (logging what changed) until every receiver is gone.
    pub fn spawn(
        mut self,
        every: Duration,
        what: impl std::fmt::Display + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = self.tx.closed() => return,
                }
                match self.poll() {
                    Polled::Unchanged => {}
                    Polled::Reloaded => {
                        let cur = self.current();
                        info!(
                            cert = %self.shown.display(),
                            subject = cur.leaf.subject,
                            serial = cur.leaf.serial,
                            not_after = cur.leaf.not_after_unix(),
                            "{what}: new TLS certificate files loaded; new connections use them"
                        );
                    }
                    Polled::Invalid(e) => warn!(
                        "{what}: TLS files changed but are not usable ({e}); keeping the last good ones"
                    ),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::certs::{Bundle, Validity, tests::scratch, write_atomic};
    use super::*;

    #[test]
    fn a_good_change_replaces_a_bad_one_is_kept_out() {
        let dir = scratch("reload");
        let b = Bundle::write(&dir, &["node-a"], &[], Validity::days(1)).unwrap();
        let mut r = Reloader::new(b.node_paths("node-a"), |m| {
            super::super::client_config(m, Some("node-a"))
        })
        .unwrap();
        let rx = r.subscribe();
        let first = r.current().leaf.serial.clone();
        assert_eq!(r.poll(), Polled::Unchanged);

        // The certificate alone is rewritten (its key not yet): kept out.
        let ca = b.load_ca().unwrap();
        let next = ca.node("node-a", Validity::days(1)).unwrap();
        let p = b.node_paths("node-a");
        write_atomic(&p.cert, &next.cert_pem, false).unwrap();
        assert!(matches!(r.poll(), Polled::Invalid(e) if e.contains("does not match")));
        assert_eq!(r.poll(), Polled::Unchanged, "reported once");
        assert_eq!(rx.borrow().leaf.serial, first);
        // Half a key: still kept out.
        std::fs::write(&p.key, &next.key_pem[..20]).unwrap();
        assert!(matches!(r.poll(), Polled::Invalid(_)));
        // The key arrives: the new pair is used.
        write_atomic(&p.key, &next.key_pem, true).unwrap();
        assert_eq!(r.poll(), Polled::Reloaded);
        assert_ne!(rx.borrow().leaf.serial, first);
        assert_eq!(rx.borrow().generation, 2);
        // A certificate for another node is refused.
        let other = ca.node("node-b", Validity::days(1)).unwrap();
        std::fs::write(&p.key, &other.key_pem).unwrap();
        std::fs::write(&p.cert, &other.cert_pem).unwrap();
        assert!(matches!(r.poll(), Polled::Invalid(e) if e.contains("node-b")));
        // A vanished file.
        std::fs::remove_file(&p.cert).unwrap();
        assert!(matches!(r.poll(), Polled::Invalid(e) if e.contains("cannot read")));
        assert_eq!(r.poll(), Polled::Unchanged);
        assert_eq!(r.stats.reloads.load(Ordering::Relaxed), 1);
        assert_eq!(r.stats.errors.load(Ordering::Relaxed), 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

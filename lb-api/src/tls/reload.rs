//! Following the PEM files: [`Reloader`] re-reads them every poll; when
//! their bytes change and the new set is good (parses, key matches, builds a
//! configuration), it publishes the new configuration on a watch channel,
//! which new connections use. A bad set (half-written, a certificate without
//! its new key yet, garbage) is logged once and counted, and the last good
//! configuration stays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::{Contents, LeafInfo, Material, TlsError, TlsPaths};

/// A configuration and the leaf certificate it presents.
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

type Build<C> = Box<dyn Fn(&Material) -> Result<C, TlsError> + Send + Sync>;

/// Follows one set of files and builds a `C` (a rustls config) from them.
pub struct Reloader<C> {
    paths: TlsPaths,
    build: Build<C>,
    /// The bytes last tried, good or not (a bad set is reported once);
    /// `None` when the last read failed.
    seen: Option<Contents>,
    tx: watch::Sender<Arc<Loaded<C>>>,
    pub stats: Arc<ReloadStats>,
}

impl<C> std::fmt::Debug for Reloader<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<C: Send + Sync + 'static> Reloader<C> {
    /// Reads the files; an error here is fatal to the caller (nothing good yet).
    pub fn new(
        paths: TlsPaths,
        build: impl Fn(&Material) -> Result<C, TlsError> + Send + Sync + 'static,
    ) -> Result<Self, TlsError> {
        let seen = Contents::read(&paths)?;
        let m = Material::from_contents(&paths, &seen)?;
        let config = Arc::new(build(&m)?);
        let (tx, _) = watch::channel(Arc::new(Loaded {
            config,
            leaf: m.leaf,
            generation: 1,
        }));
        Ok(Reloader {
            paths,
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

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// Re-reads the files and publishes a changed, good set.
    pub fn poll(&mut self) -> Polled {
        let c = match Contents::read(&self.paths) {
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
        let built = Material::from_contents(&self.paths, seen)
            .and_then(|m| Ok(((self.build)(&m)?, m.leaf)));
        match built {
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
    pub fn spawn(mut self, every: Duration, what: &'static str) -> tokio::task::JoinHandle<()> {
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
                            cert = %self.paths.cert.display(),
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

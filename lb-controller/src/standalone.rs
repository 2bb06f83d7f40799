//! Standalone mode (`lb-controller --config services.yaml`): the desired
//! state comes from the same YAML file the agent accepts (lb_api::config),
//! and every node gets the same state. The file is re-read when it changes
//! (polled) and on SIGHUP; a bad file is logged and counted, and the last
//! good state stays published.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_api::config::Config;
use lb_api::config_file::{ConfigFile, Reload};
use lb_api::locality;
use lb_api::wire::NodeState;
use tracing::{error, info};

use crate::grpc::Publisher;

/// Publishes a file's state. Its locality policies are resolved per node:
/// each node of the file's `nodes:` gets its own state, every other node
/// the state of a node whose location is unknown (docs/policies.md).
fn publish(publisher: &Publisher, cfg: Config) -> u64 {
    if !locality::any(&cfg.state) {
        let default = NodeState {
            state: cfg.state,
            timeouts: cfg.timeouts,
        };
        return publisher.publish(default, BTreeMap::new());
    }
    let at = |node: Option<&str>| NodeState {
        state: locality::resolve(&cfg.state, node, &cfg.nodes),
        timeouts: cfg.timeouts,
    };
    let nodes = cfg.nodes.keys().map(|n| (n.clone(), at(Some(n)))).collect();
    publisher.publish(at(None), nodes)
}

/// A selector in the controller's file names what every agent loads: an
/// example or a NAME (each agent's `<--selector-dir>/NAME.o`), never a path
/// (docs/security.md: only an agent's own `--config` may name a path).
fn paths_refused(cfg: &Config) -> Result<(), String> {
    for s in &cfg.state.services {
        if let Some(sel) = &s.selector
            && let Ok(lb_api::validate::SelectorRef::Path(p)) = lb_api::validate::selector(sel)
        {
            return Err(format!(
                "service {}: selector {p:?} is a path, which only an agent's own --config may \
                 name; the controller sends example:geo or a NAME (each agent loads \
                 <--selector-dir>/NAME.o)",
                s.name
            ));
        }
    }
    Ok(())
}

/// Follows one config file.
#[derive(Debug)]
pub struct FileSource {
    file: ConfigFile,
}

/// The outcome of a [`FileSource::poll`].
#[derive(Debug, PartialEq, Eq)]
pub enum Polled {
    Unchanged,
    /// Published as this version (the same version when the parsed state
    /// did not change).
    Published(u64),
    /// Unreadable or invalid; the message names file, line, column and field.
    Invalid(String),
}

impl FileSource {
    /// The file is polled every `poll`; a change is published once two
    /// polls saw the same bytes (see [`ConfigFile`]).
    pub fn new(path: impl Into<PathBuf>, poll: Duration) -> Self {
        FileSource {
            file: ConfigFile::new(path, poll),
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Reads the file; if it changed since the last read (or `force`),
    /// parses it and publishes it.
    pub fn poll(&mut self, publisher: &Publisher, force: bool) -> Polled {
        match self.file.read(force) {
            Reload::Unchanged | Reload::Settling => Polled::Unchanged,
            Reload::Changed(Err(e)) => Polled::Invalid(e.to_string()),
            Reload::Changed(Ok(cfg)) => match paths_refused(&cfg) {
                Err(e) => Polled::Invalid(format!("{}: {e}", self.path().display())),
                Ok(()) => Polled::Published(publish(publisher, cfg)),
            },
        }
    }

    /// Polls and logs the outcome. Returns false for an invalid file.
    pub fn poll_logged(&mut self, publisher: &Publisher, force: bool, why: &str) -> bool {
        match self.poll(publisher, force) {
            Polled::Unchanged => true,
            Polled::Published(v) => {
                let n = publisher.current().default.state.services.len();
                info!(version = v, services = n, "{why}: config published");
                true
            }
            Polled::Invalid(e) => {
                error!("{why}: {e}; still serving the last good state");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_changes_and_keeps_the_last_good_state() {
        let dir = std::env::temp_dir().join(format!("rpclb-ctl-standalone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        let good = "services:\n  - name: a/b:http\n    vip: 10.96.0.1\n    port: 80\n    backends:\n      - { ip: 10.244.1.1, port: 8080 }\n";
        std::fs::write(&path, good).unwrap();
        let p = Publisher::with_epoch(0);
        let mut f = FileSource::new(&path, Duration::ZERO);
        // The first read is taken; later changes once two reads agree.
        let settled = |f: &mut FileSource, p: &Publisher| match f.poll(p, false) {
            Polled::Unchanged => f.poll(p, false),
            r => r,
        };
        assert_eq!(f.poll(&p, false), Polled::Published(1));
        assert_eq!(f.poll(&p, false), Polled::Unchanged);
        assert_eq!(
            f.poll(&p, true),
            Polled::Published(1),
            "same state, same version"
        );
        std::fs::write(
            &path,
            "services:\n  - name: a/b:http\n    vip: 10.96.0.300\n",
        )
        .unwrap();
        let Polled::Invalid(e) = settled(&mut f, &p) else {
            panic!("expected an error");
        };
        assert!(e.contains("services.yaml:3:") && e.contains("vip"), "{e}");
        assert_eq!(p.current().version, 1, "the good state stays");
        assert_eq!(p.current().default.state.services.len(), 1);
        std::fs::write(&path, good.replace("8080", "8081")).unwrap();
        assert_eq!(settled(&mut f, &p), Polled::Published(2));
        assert_eq!(p.current().default.state.services[0].backends[0].port, 8081);
        // A selector: a NAME is published; a path is an error, the last good state stays.
        let named = good.replace("    backends:", "    selector: geo\n    backends:");
        std::fs::write(&path, &named).unwrap();
        assert_eq!(settled(&mut f, &p), Polled::Published(3));
        assert_eq!(
            p.current().default.state.services[0].selector.as_deref(),
            Some("geo")
        );
        std::fs::write(&path, named.replace("geo", "/opt/geo.o")).unwrap();
        let Polled::Invalid(e) = settled(&mut f, &p) else {
            panic!("a path is refused");
        };
        assert!(
            e.contains("services.yaml") && e.contains("a/b:http") && e.contains("is a path"),
            "{e}"
        );
        assert_eq!(p.current().version, 3);
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(settled(&mut f, &p), Polled::Invalid(e) if e.contains("cannot read")));
        assert_eq!(p.current().version, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Leader election among controller replicas, with a coordination.k8s.io/v1
//! Lease.
//!
//! The Lease names its holder (`holderIdentity`), how long a hold lasts
//! without renewal (`leaseDurationSeconds`) and when it was last renewed
//! (`renewTime`). Every `retry_period` each replica reads the Lease and
//! [`decide`]s:
//!
//! - no Lease, or no holder → **Acquire**: write itself as holder;
//! - it is the holder → **Renew**: write a new `renewTime`;
//! - another holder → **Follow**, until the Lease has not changed for
//!   `leaseDurationSeconds` → **Acquire**.
//!
//! Expiry is measured on this replica's own monotonic clock, from when it
//! first saw the Lease in its current form (as client-go does), never by
//! comparing `renewTime` with the local wall clock: clock skew between
//! nodes cannot cut a holder's lease short.
//!
//! Writes are optimistic: a replace carries the `resourceVersion` that was
//! read, so of two replicas racing for an expired Lease, the API server
//! accepts one and answers the other 409 Conflict (a create races the same
//! way with 409 AlreadyExists). The loser follows.
//!
//! A leader that cannot renew steps down after `renew_deadline` without a
//! successful renewal, which is shorter than `lease_duration`, so it stops
//! acting before anyone else may take over. On shutdown the leader steps
//! down first and then releases the Lease (empty holder) so that another
//! replica takes over at its next try rather than after expiry.

use std::future::Future;
use std::pin::pin;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Lease timing and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The Lease's namespace (the controller's own).
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This replica, unique among replicas: its pod name.
    pub identity: String,
    /// How long a hold lasts without renewal (client-go default 15 s).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down (10 s).
    pub renew_deadline: Duration,
    /// How often every replica tries (2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// The client-go default timing.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Checks `retry_period < renew_deadline < lease_duration` (whole
    /// seconds, as the Lease holds them) and a non-empty identity.
    pub fn validate(&self) -> Result<(), LeaderError> {
        let bad = |why: &'static str| Err(LeaderError::Config(why));
        if self.identity.is_empty() {
            return bad("the identity is empty");
        }
        if self.lease_duration.as_secs() < 1 || self.lease_duration.subsec_nanos() != 0 {
            return bad("the lease duration must be a whole number of seconds, at least 1");
        }
        if self.renew_deadline >= self.lease_duration {
            return bad("the renew deadline must be shorter than the lease duration");
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return bad("the retry period must be positive and shorter than the renew deadline");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("invalid leader election config: {0}")]
    Config(&'static str),
}

/// What the election reads from a Lease.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` (or empty in the Lease): free.
    pub holder: Option<String>,
    pub lease_duration: Option<Duration>,
    /// Only compared, to see that the holder renewed.
    pub renew_time: Option<MicroTime>,
    pub transitions: i32,
}

impl LeaseRecord {
    pub fn of(spec: Option<&LeaseSpec>) -> Self {
        let Some(spec) = spec else {
            return LeaseRecord::default();
        };
        LeaseRecord {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            lease_duration: spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|&s| s > 0)
                .map(Duration::from_secs),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// A Lease record, and when this replica first saw it in this form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub record: LeaseRecord,
    pub since: Instant,
}

impl Observed {
    /// `record` read at `now`: it keeps `prev.since` if nothing changed.
    pub fn update(prev: Option<Observed>, record: LeaseRecord, now: Instant) -> Observed {
        match prev {
            Some(p) if p.record == record => p,
            _ => Observed { record, since: now },
        }
    }
}

/// What to do after reading the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Become the holder (the Lease is missing, free or expired).
    Acquire,
    /// Stay the holder.
    Renew,
    /// Someone else holds it; it expires in `expires_in` unless renewed.
    Follow {
        holder: String,
        expires_in: Duration,
    },
}

/// The election rule. `lease`: the Lease as observed (`None`: there is
/// none); `default_duration` applies when it has no `leaseDurationSeconds`.
pub fn decide(
    lease: Option<&Observed>,
    identity: &str,
    default_duration: Duration,
    now: Instant,
) -> Decision {
    let Some(Observed { record, since }) = lease else {
        return Decision::Acquire;
    };
    let Some(holder) = &record.holder else {
        return Decision::Acquire;
    };
    if holder == identity {
        return Decision::Renew;
    }
    let expiry = *since + record.lease_duration.unwrap_or(default_duration);
    match expiry.checked_duration_since(now) {
        Some(left) if !left.is_zero() => Decision::Follow {
            holder: holder.clone(),
            expires_in: left,
        },
        _ => Decision::Acquire,
    }
}

/// Whether a leader whose last successful renewal started at
/// `last_renewed` may still act at `now`.
pub fn still_leading(last_renewed: Instant, renew_deadline: Duration, now: Instant) -> bool {
    now.saturating_duration_since(last_renewed) < renew_deadline
}

/// The Lease spec to write for `decision` (`None` for Follow): `prev` with
/// this replica as holder, renewed `now`. Acquiring sets `acquireTime` and,
/// when the holder changes, counts a transition.
pub fn next_spec(
    prev: Option<&LeaseSpec>,
    decision: &Decision,
    identity: &str,
    lease_duration: Duration,
    now: Timestamp,
) -> Option<LeaseSpec> {
    let mut spec = prev.cloned().unwrap_or_default();
    match decision {
        Decision::Follow { .. } => return None,
        Decision::Renew => {}
        Decision::Acquire => {
            let transitions = spec.lease_transitions.unwrap_or(0);
            let changes_hands = prev.is_some() && spec.holder_identity.as_deref() != Some(identity);
            spec.lease_transitions = Some(transitions.saturating_add(i32::from(changes_hands)));
            spec.holder_identity = Some(identity.to_string());
            spec.acquire_time = Some(MicroTime(now));
        }
    }
    spec.lease_duration_seconds = Some(i32::try_from(lease_duration.as_secs()).unwrap_or(i32::MAX));
    spec.renew_time = Some(MicroTime(now));
    Some(spec)
}

/// Runs the election against the API server.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
    /// When the last successful acquire or renewal started.
    last_renewed: Option<Instant>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Result<Self, LeaderError> {
        config.validate()?;
        Ok(LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            last_renewed: None,
        })
    }

    /// One round: read the Lease, decide, write. `Ok(true)`: this replica
    /// holds the Lease now. A lost race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let started = Instant::now();
        let cfg = &self.config;
        let lease = self.api.get_opt(&cfg.name).await?;
        self.observed = lease.as_ref().map(|l| {
            Observed::update(
                self.observed.take(),
                LeaseRecord::of(l.spec.as_ref()),
                started,
            )
        });
        let decision = decide(
            self.observed.as_ref(),
            &cfg.identity,
            cfg.lease_duration,
            started,
        );
        let Some(spec) = next_spec(
            lease.as_ref().and_then(|l| l.spec.as_ref()),
            &decision,
            &cfg.identity,
            cfg.lease_duration,
            Timestamp::now(),
        ) else {
            if let Decision::Follow { holder, expires_in } = &decision {
                debug!(%holder, ?expires_in, "following");
            }
            self.last_renewed = None;
            return Ok(false);
        };
        let pp = PostParams::default();
        let written = match lease {
            // The read resourceVersion stays in the metadata: a replace fails
            // with 409 if anyone wrote the Lease since.
            Some(mut lease) => {
                lease.spec = Some(spec);
                self.api.replace(&cfg.name, &pp, &lease).await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(cfg.name.clone()),
                        namespace: Some(cfg.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&pp, &lease).await
            }
        };
        match written {
            Ok(_) => {
                self.last_renewed = Some(started);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => {
                debug!(?decision, "lost the race for the lease");
                self.last_renewed = None;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the Lease up if this replica holds it: an empty holder, so
    /// that another replica acquires it at once.
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        self.last_renewed = None;
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            // Someone else wrote it meanwhile: it is not ours to release.
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Tries every `retry_period` and keeps `is_leader` current, until
    /// `shutdown` completes; then steps down (`false`) and releases the
    /// Lease. API errors are logged and retried.
    pub async fn run(mut self, is_leader: watch::Sender<bool>, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        loop {
            let leading = match self.try_acquire_or_renew().await {
                Ok(leading) => leading,
                Err(e) => {
                    let now = Instant::now();
                    let leading = self
                        .last_renewed
                        .is_some_and(|t| still_leading(t, self.config.renew_deadline, now));
                    warn!(error = %e, leading, "leader election round failed");
                    leading
                }
            };
            // Receivers hear of a change of role only, not of every
            // renewal (watch.rs starts over on each notification).
            let mut was = false;
            is_leader.send_if_modified(|v| {
                was = std::mem::replace(v, leading);
                was != leading
            });
            if was != leading {
                if leading {
                    info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                } else {
                    info!(identity = %self.config.identity, lease = %self.config.name, "stopped leading");
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                () = tokio::time::sleep(self.config.retry_period) => {}
            }
        }
        let mut was = false;
        is_leader.send_if_modified(|v| {
            was = std::mem::replace(v, false);
            was
        });
        if was {
            match self.release().await {
                Ok(()) => info!(lease = %self.config.name, "released the lease"),
                Err(e) => warn!(error = %e, "could not release the lease; it expires on its own"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    const DEFAULT: Duration = Duration::from_secs(15);

    fn record(holder: Option<&str>, duration: Option<u64>, renewed: i64) -> LeaseRecord {
        LeaseRecord {
            holder: holder.map(str::to_string),
            lease_duration: duration.map(Duration::from_secs),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            transitions: 0,
        }
    }

    fn seen(r: LeaseRecord, since: Instant) -> Observed {
        Observed { record: r, since }
    }

    #[test]
    fn missing_or_free_lease_is_acquired() {
        let now = Instant::now();
        assert_eq!(decide(None, "a", DEFAULT, now), Decision::Acquire);
        let free = seen(record(None, Some(15), 1), now);
        assert_eq!(decide(Some(&free), "a", DEFAULT, now), Decision::Acquire);
        // An empty holderIdentity reads as free.
        let spec = LeaseSpec {
            holder_identity: Some(String::new()),
            ..Default::default()
        };
        assert_eq!(LeaseRecord::of(Some(&spec)).holder, None);
    }

    #[test]
    fn the_holder_renews_even_late() {
        let t0 = Instant::now();
        let mine = seen(record(Some("a"), Some(15), 1), t0);
        assert_eq!(decide(Some(&mine), "a", DEFAULT, t0), Decision::Renew);
        assert_eq!(
            decide(Some(&mine), "a", DEFAULT, t0 + secs(60)),
            Decision::Renew
        );
    }

    #[test]
    fn others_are_followed_until_their_lease_goes_unrenewed() {
        let t0 = Instant::now();
        let theirs = seen(record(Some("b"), Some(15), 1), t0);
        assert_eq!(
            decide(Some(&theirs), "a", DEFAULT, t0 + secs(5)),
            Decision::Follow {
                holder: "b".into(),
                expires_in: secs(10)
            }
        );
        assert_eq!(
            decide(Some(&theirs), "a", DEFAULT, t0 + secs(15)),
            Decision::Acquire
        );
        // No leaseDurationSeconds: the configured default.
        let no_duration = seen(record(Some("b"), None, 1), t0);
        assert!(matches!(
            decide(Some(&no_duration), "a", secs(30), t0 + secs(20)),
            Decision::Follow { .. }
        ));
        assert_eq!(
            decide(Some(&no_duration), "a", secs(30), t0 + secs(30)),
            Decision::Acquire
        );
    }

    #[test]
    fn expiry_counts_from_the_last_change_seen_not_the_wall_clock() {
        let t0 = Instant::now();
        // renewTime far in the past by our wall clock: it does not matter.
        let first = Observed::update(None, record(Some("b"), Some(15), 0), t0);
        assert_eq!(first.since, t0);
        let same = Observed::update(Some(first), record(Some("b"), Some(15), 0), t0 + secs(10));
        assert_eq!(same.since, t0, "unchanged: the clock keeps running");
        assert!(matches!(
            decide(Some(&same), "a", DEFAULT, t0 + secs(10)),
            Decision::Follow { .. }
        ));
        // b renews at t0+12: the 15 s start again from there.
        let renewed = Observed::update(Some(same), record(Some("b"), Some(15), 12), t0 + secs(12));
        assert_eq!(renewed.since, t0 + secs(12));
        assert!(matches!(
            decide(Some(&renewed), "a", DEFAULT, t0 + secs(20)),
            Decision::Follow { .. }
        ));
        assert_eq!(
            decide(Some(&renewed), "a", DEFAULT, t0 + secs(27)),
            Decision::Acquire
        );
    }

    #[test]
    fn a_leader_that_cannot_renew_steps_down_before_expiry() {
        let t0 = Instant::now();
        let deadline = secs(10);
        assert!(still_leading(t0, deadline, t0));
        assert!(still_leading(t0, deadline, t0 + secs(9)));
        assert!(!still_leading(t0, deadline, t0 + secs(10)));
        let cfg = LeaseConfig::new("ns", "lease", "a");
        assert!(cfg.renew_deadline < cfg.lease_duration);
    }

    #[test]
    fn specs_written_for_each_decision() {
        let now = Timestamp::from_second(1_000).unwrap();
        let d = secs(15);
        assert_eq!(
            next_spec(
                None,
                &Decision::Follow {
                    holder: "b".into(),
                    expires_in: d
                },
                "a",
                d,
                now
            ),
            None
        );

        // Creating: holder, both times, duration, no transition yet.
        let created = next_spec(None, &Decision::Acquire, "a", d, now).unwrap();
        assert_eq!(created.holder_identity.as_deref(), Some("a"));
        assert_eq!(created.acquire_time, Some(MicroTime(now)));
        assert_eq!(created.renew_time, Some(MicroTime(now)));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.lease_transitions, Some(0));

        // Renewing moves renewTime only.
        let later = Timestamp::from_second(1_005).unwrap();
        let renewed = next_spec(Some(&created), &Decision::Renew, "a", d, later).unwrap();
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        assert_eq!(renewed.acquire_time, created.acquire_time);
        assert_eq!(renewed.lease_transitions, Some(0));

        // Taking over from b counts a transition.
        let taken = next_spec(Some(&renewed), &Decision::Acquire, "b", d, later).unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.acquire_time, Some(MicroTime(later)));
        assert_eq!(taken.lease_transitions, Some(1));
        // Other fields (e.g. a preferred holder) are kept.
        let mut with_pref = taken.clone();
        with_pref.preferred_holder = Some("c".into());
        let kept = next_spec(Some(&with_pref), &Decision::Renew, "b", d, later).unwrap();
        assert_eq!(kept.preferred_holder.as_deref(), Some("c"));

        // Acquiring a released Lease (no holder) is a transition too.
        let mut released = taken;
        released.holder_identity = None;
        let again = next_spec(Some(&released), &Decision::Acquire, "a", d, later).unwrap();
        assert_eq!(again.lease_transitions, Some(2));
    }

    #[test]
    fn config_timing_is_validated() {
        let ok = LeaseConfig::new("rpclb-system", "rpclb-controller", "pod-1");
        assert!(ok.validate().is_ok());
        let broken = [
            LeaseConfig {
                identity: String::new(),
                ..ok.clone()
            },
            LeaseConfig {
                renew_deadline: secs(15),
                ..ok.clone()
            },
            LeaseConfig {
                retry_period: secs(10),
                ..ok.clone()
            },
            LeaseConfig {
                retry_period: Duration::ZERO,
                ..ok.clone()
            },
            LeaseConfig {
                lease_duration: Duration::from_millis(15_500),
                ..ok.clone()
            },
        ];
        for cfg in broken {
            assert!(
                matches!(cfg.validate(), Err(LeaderError::Config(_))),
                "{cfg:?}"
            );
        }
    }
}

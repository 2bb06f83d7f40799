//! Warning Events (events.k8s.io/v1) on Services (and backend Pods), one
//! per problem.
//!
//! A problem is reported when it appears: [`ProblemTracker`] keeps repeats
//! of one translation to the next out, and each Event's name is made from
//! the problem itself ([`event_name`]: the Service, its uid, the reason and
//! the note), so that writing it twice is a `409 AlreadyExists`, not a
//! second Event. That holds across replicas: a replica that becomes leader
//! reports every current problem again, and the ones its predecessor wrote
//! already exist. A problem that goes away and comes back while one replica
//! leads bumps the Event's `series` (count and last time), as the events
//! API does for repeats.
//!
//! Events expire (the API server's `--event-ttl`, 1 h by default); a
//! problem that outlasts its Event is written again by the next leader.

use std::collections::HashSet;

use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use crate::translate::{Problem, Subject};

/// The Events' `action`.
pub const EVENT_ACTION: &str = "Translate";

/// The Event API limits a note to 1 kB.
pub const MAX_NOTE_BYTES: usize = 1024;

/// `note`, cut at a character boundary to fit an Event.
pub fn event_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_string();
    }
    let mut end = MAX_NOTE_BYTES - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &note[..end])
}

/// A problem's identity: the Service, the reason and the note.
type Key = (Subject, &'static str, String);

fn key(p: &Problem) -> Key {
    (p.subject.clone(), p.reason(), p.to_string())
}

/// What to do about a problem that a translation has and the previous one
/// did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// Not reported while this replica leads: write its Event (it may exist
    /// already, written by another leader).
    New,
    /// Reported while this replica leads, then gone, now back: bump the
    /// Event's series.
    Again,
}

/// Remembers which problems were reported, so that each is reported once
/// while it lasts.
#[derive(Clone, Debug, Default)]
pub struct ProblemTracker {
    /// The problems of the last translation.
    current: HashSet<Key>,
    /// Every problem reported since the last [`Self::clear`] (bounded).
    seen: HashSet<Key>,
}

/// [`ProblemTracker::seen`] is forgotten past this size.
const MAX_SEEN: usize = 10_000;

impl ProblemTracker {
    /// The problems in `current` that the previous call's did not have (each
    /// once, in their order), with what to do about each. Then `current`
    /// becomes the reported set: a problem missing from it is reported again
    /// if it comes back.
    pub fn new_problems<'a>(&mut self, current: &'a [Problem]) -> Vec<(&'a Problem, Report)> {
        let mut now = HashSet::with_capacity(current.len());
        let mut fresh = Vec::new();
        if self.seen.len() > MAX_SEEN {
            self.seen.clear();
        }
        for p in current {
            let k = key(p);
            if !self.current.contains(&k) && !now.contains(&k) {
                let r = if self.seen.contains(&k) {
                    Report::Again
                } else {
                    Report::New
                };
                self.seen.insert(k.clone());
                fresh.push((p, r));
            }
            now.insert(k);
        }
        self.current = now;
        fresh
    }

    /// Forgets everything (a change of leader): the next call reports all
    /// its problems as [`Report::New`].
    pub fn clear(&mut self) {
        self.current.clear();
        self.seen.clear();
    }
}

/// The Event's name: the object's name and a hash of what identifies the
/// problem (the object's uid, so that a re-created object gets its own).
pub fn event_name(p: &Problem, service_uid: &str) -> String {
    // FNV-1a (64 bit) over the fields, each ended by a 0 byte: the same in
    // every replica, process and version (std's Hash promises none of that).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for field in [service_uid, p.reason(), &p.to_string()] {
        for b in field.bytes().chain([0]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    // Service names are at most 63 characters; a Pod's may have 253: cut it
    // so that the whole fits a name (253), ending in a letter or digit.
    const MAX_PREFIX: usize = 253 - ".rpclb-".len() - 16;
    let mut prefix = p.subject.name();
    if prefix.len() > MAX_PREFIX {
        let mut end = MAX_PREFIX;
        while !prefix.is_char_boundary(end) {
            end -= 1;
        }
        prefix = prefix[..end].trim_end_matches(['-', '.']);
    }
    format!("{prefix}.rpclb-{h:016x}")
}

/// Writes the Events of one controller replica.
#[derive(Clone)]
pub struct EventWriter {
    client: Client,
    controller: String,
    instance: String,
}

impl EventWriter {
    pub fn new(client: Client, controller: String, instance: String) -> Self {
        EventWriter {
            client,
            controller,
            instance,
        }
    }

    /// Reports `p` on `object`, its Service or Pod (see the module docs).
    pub async fn report<K>(&self, p: &Problem, object: &K, how: Report)
    where
        K: Resource<DynamicType = ()>,
    {
        let ns = object.namespace().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let name = event_name(p, object.uid().as_deref().unwrap_or(""));
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns),
                ..ObjectMeta::default()
            },
            event_time: Some(now.clone()),
            action: Some(EVENT_ACTION.into()),
            reason: Some(p.reason().into()),
            note: Some(event_note(&p.to_string())),
            type_: Some("Warning".into()),
            regarding: Some(object.object_ref(&())),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => info!(object = %p.subject, reason = p.reason(), "{p}"),
            Err(kube::Error::Api(s)) if s.code == 409 => match how {
                Report::New => {
                    debug!(object = %p.subject, event = name, "already reported")
                }
                Report::Again => self.bump(&api, &name, p, now).await,
            },
            Err(e) => warn!(object = %p.subject, error = %e, "could not write event"),
        }
    }

    /// One more occurrence of an Event's problem: its series count + 1.
    async fn bump(&self, api: &Api<Event>, name: &str, p: &Problem, now: MicroTime) {
        let count = match api.get(name).await {
            Ok(e) => e.series.map_or(1, |s| s.count),
            Err(e) => {
                warn!(object = %p.subject, error = %e, "could not read event");
                return;
            }
        };
        let series = EventSeries {
            count: count + 1,
            last_observed_time: now,
        };
        let patch = serde_json::json!({ "series": series });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                info!(object = %p.subject, reason = p.reason(), count = count + 1, "again: {p}")
            }
            Err(e) => warn!(object = %p.subject, error = %e, "could not update event"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations;
    use crate::translate::ProblemKind;

    fn problem(service: &str, value: &str) -> Problem {
        let (_, errors) = annotations::parse_annotations(
            &[(annotations::ALGORITHM.to_string(), value.to_string())]
                .into_iter()
                .collect(),
        );
        let e = errors.into_iter().next().expect("an invalid value");
        Problem {
            subject: Subject::Service(crate::translate::ServiceRef {
                namespace: "shop".into(),
                name: service.into(),
            }),
            fallback: e.fallback().into(),
            kind: ProblemKind::Annotation(e),
        }
    }

    #[test]
    fn each_problem_is_reported_once_while_it_lasts() {
        use Report::{Again, New};
        let mut t = ProblemTracker::default();
        let a = problem("a", "x");
        let b = problem("b", "x");
        let a2 = problem("a", "y");

        assert_eq!(
            t.new_problems(&[a.clone(), b.clone()]),
            [(&a, New), (&b, New)]
        );
        // Recomputes with the same problems report nothing.
        assert!(t.new_problems(&[a.clone(), b.clone()]).is_empty());
        assert!(t.new_problems(&[b.clone(), a.clone()]).is_empty());
        // A changed value is a new problem.
        assert_eq!(t.new_problems(&[a2.clone(), b.clone()]), [(&a2, New)]);
        // A problem that went away and came back is reported again.
        assert!(t.new_problems(std::slice::from_ref(&b)).is_empty());
        assert_eq!(t.new_problems(&[a.clone(), b.clone()]), [(&a, Again)]);
        // Duplicates within one translation: once.
        assert_eq!(
            t.new_problems(&[problem("c", "x"), problem("c", "x")])
                .len(),
            1
        );
        // A new leader: everything current is new to it.
        t.clear();
        assert_eq!(t.new_problems(std::slice::from_ref(&a)), [(&a, New)]);
    }

    #[test]
    fn event_names_are_stable_and_per_problem() {
        let a = problem("web", "x");
        let n = event_name(&a, "uid-1");
        assert_eq!(n, event_name(&a.clone(), "uid-1"), "stable");
        assert!(
            n.starts_with("web.rpclb-") && n.len() == "web.rpclb-".len() + 16,
            "{n}"
        );
        assert_ne!(n, event_name(&problem("web", "y"), "uid-1"), "per note");
        assert_ne!(n, event_name(&a, "uid-2"), "per Service incarnation");
        // The same in every process and version (replicas must agree).
        assert_eq!(event_name(&a, "fixed-uid"), "web.rpclb-057bb7732bc156c3");
    }

    #[test]
    fn event_names_of_long_pod_names_fit() {
        use crate::translate::PodRef;
        let pod = |name: &str| Problem {
            subject: Subject::Pod(PodRef {
                namespace: "shop".into(),
                name: name.into(),
            }),
            ..problem("web", "x")
        };
        // A Pod name may be 253 characters (a DNS subdomain).
        let long = format!("{}-{}", "a".repeat(229), "b".repeat(23));
        let n = event_name(&pod(&long), "uid-1");
        assert!(n.len() <= 253, "{}", n.len());
        let (prefix, hash) = n.split_once(".rpclb-").unwrap();
        assert_eq!(hash.len(), 16);
        // Cut at 230, where the name has a '-': trimmed to a letter.
        assert_eq!(prefix, "a".repeat(229));
        // Short names are kept whole; Pod and Service of one name differ by uid.
        assert!(event_name(&pod("pod-1"), "uid-2").starts_with("pod-1.rpclb-"));
        assert_ne!(
            event_name(&pod("web"), "uid-pod"),
            event_name(&problem("web", "x"), "uid-svc")
        );
    }

    #[test]
    fn event_notes_fit_the_event_api() {
        assert_eq!(event_note("short"), "short");
        let exact = "x".repeat(MAX_NOTE_BYTES);
        assert_eq!(event_note(&exact), exact);
        let long = "é".repeat(MAX_NOTE_BYTES);
        let note = event_note(&long);
        assert!(note.len() <= MAX_NOTE_BYTES, "{}", note.len());
        assert!(note.ends_with('…'));
        assert!(note.starts_with("éé"));
    }
}

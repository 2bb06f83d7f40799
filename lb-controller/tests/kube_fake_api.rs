//! The controller's kube-rs code ([`watch::run`], [`LeaderElector`]) run for
//! real against an in-process fake API server.
//!
//! The fake ([`FakeApi`]) is an axum `Router` handed to
//! `kube::Client::new` as its tower service: requests never leave the
//! process (no socket, no loopback traffic). It implements just enough of the
//! API semantics, honestly:
//!
//! - a global `resourceVersion` counter, bumped on every write (as etcd's
//!   revision);
//! - LIST of a collection, with the list's `resourceVersion`; list items
//!   carry no `apiVersion`/`kind`, as a real server's typed lists;
//!   `Accept: ...;as=PartialObjectMetadataList` gives a
//!   `meta.k8s.io/v1` `PartialObjectMetadataList`;
//! - WATCH (`?watch=true&resourceVersion=N`): a streaming response of
//!   newline-delimited watch events, first every change after `N` (from the
//!   change history), then each new write as it happens; the stream stays
//!   open until the test ends; BOOKMARKs on demand to watchers that asked
//!   for them;
//! - GET, POST (create, 409 AlreadyExists), PUT (update, 409 Conflict when
//!   the `resourceVersion` sent is not the stored one) and PATCH (JSON merge
//!   patch) of single objects.
//!
//! Each resource allows only the verbs the controller should use on it (as
//! its RBAC rules). Any other request is logged, recorded as unexpected and
//! answered 404, and every test ends with [`FakeApi::assert_no_unexpected`],
//! so a wiring mistake fails with a clear message.
//!
//! The watch tests run on tokio's paused clock: time advances only when every
//! task is idle, so "nothing happened for 1 s" means the controller had
//! settled, and the coalescing window costs no real time. The leader
//! election tests run on the real clock, since the elector measures lease
//! expiry with `std::time::Instant`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use lb_api::config::Timeouts;
use lb_api::{Algorithm, Backend, BackendState, Protocol, Service};
use lb_controller::endpoints::EndpointsSource;
use lb_controller::kube_mode;
use lb_controller::leader::{LeaderElector, LeaseConfig};
use lb_controller::watch::{self, ClusterSnapshot, SnapshotReceiver, WatchConfig};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch as tokio_watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// How long any awaited condition may take (paused clock: virtual time).
const WAIT: Duration = Duration::from_secs(30);
/// How long to let the controller settle before asserting that something
/// did not happen (paused clock: costs no real time).
const SETTLE: Duration = Duration::from_secs(1);
const COALESCE: Duration = Duration::from_millis(50);

const CONTROLLER: &str = "rpclb.io/controller";
const INSTANCE: &str = "rpclb-controller-0";

// ---------------------------------------------------------------------------
// The fake API server
// ---------------------------------------------------------------------------

/// A resource the fake serves.
#[derive(Debug)]
struct ResourceDef {
    /// `/api/v1` or `/apis/{group}/{version}`.
    prefix: &'static str,
    plural: &'static str,
    kind: &'static str,
    api_version: &'static str,
    namespaced: bool,
    /// What the controller may do with it (as its RBAC rules).
    verbs: &'static [&'static str],
}

const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        prefix: "/api/v1",
        plural: "services",
        kind: "Service",
        api_version: "v1",
        namespaced: true,
        verbs: &["list", "watch"],
    },
    ResourceDef {
        prefix: "/apis/discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        api_version: "discovery.k8s.io/v1",
        namespaced: true,
        verbs: &["list", "watch"],
    },
    ResourceDef {
        prefix: "/api/v1",
        plural: "endpoints",
        kind: "Endpoints",
        api_version: "v1",
        namespaced: true,
        verbs: &["list", "watch"],
    },
    ResourceDef {
        prefix: "/api/v1",
        plural: "nodes",
        kind: "Node",
        api_version: "v1",
        namespaced: false,
        verbs: &["list", "watch"],
    },
    ResourceDef {
        prefix: "/api/v1",
        plural: "pods",
        kind: "Pod",
        api_version: "v1",
        namespaced: true,
        verbs: &["list", "watch"],
    },
    ResourceDef {
        prefix: "/apis/events.k8s.io/v1",
        plural: "events",
        kind: "Event",
        api_version: "events.k8s.io/v1",
        namespaced: true,
        verbs: &["create", "get", "patch"],
    },
    ResourceDef {
        prefix: "/apis/coordination.k8s.io/v1",
        plural: "leases",
        kind: "Lease",
        api_version: "coordination.k8s.io/v1",
        namespaced: true,
        verbs: &["get", "create", "update"],
    },
];

fn resource(plural: &str) -> &'static ResourceDef {
    RESOURCES
        .iter()
        .find(|r| r.plural == plural)
        .unwrap_or_else(|| panic!("the fake does not serve {plural}"))
}

/// `path` as (resource, namespace, name).
fn parse_path(path: &str) -> Option<(&'static ResourceDef, Option<String>, Option<String>)> {
    for r in RESOURCES {
        let Some(rest) = path.strip_prefix(r.prefix) else {
            continue;
        };
        let segs: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        let s = |x: &str| Some(x.to_string());
        let found = match segs.as_slice() {
            [p] if *p == r.plural => Some((None, None)),
            [p, name] if *p == r.plural && !r.namespaced => Some((None, s(name))),
            ["namespaces", ns, p] if *p == r.plural && r.namespaced => Some((s(ns), None)),
            ["namespaces", ns, p, name] if *p == r.plural && r.namespaced => Some((s(ns), s(name))),
            _ => None,
        };
        if let Some((ns, name)) = found {
            return Some((r, ns, name));
        }
    }
    None
}

/// One request, as the fake saw it.
#[derive(Clone, Debug)]
struct Logged {
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    /// The `as=` parameter of the Accept header (metadata-only requests).
    accept_as: Option<String>,
    verb: Option<&'static str>,
    plural: Option<&'static str>,
    /// 0 until answered (a held LIST, a WATCH's stream is open: 200).
    status: u16,
    /// The `resourceVersion` a LIST answered with.
    list_rv: Option<String>,
}

/// One change, as watchers see it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    namespace: String,
    type_: &'static str,
    object: Value,
}

struct Watcher {
    plural: &'static str,
    namespace: Option<String>,
    metadata_only: bool,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

impl Watcher {
    fn wants(&self, plural: &str, namespace: &str) -> bool {
        self.plural == plural && self.namespace.as_deref().is_none_or(|n| n == namespace)
    }

    /// Sends one watch event; `false` when the client is gone.
    fn send(&self, type_: &str, object: &Value) -> bool {
        let object = if self.metadata_only {
            metadata_only(object)
        } else {
            object.clone()
        };
        let mut line = serde_json::to_vec(&json!({"type": type_, "object": object})).unwrap();
        line.push(b'\n');
        self.tx.send(Bytes::from(line)).is_ok()
    }
}

type Key = (&'static str, String, String);

#[derive(Default)]
struct Inner {
    /// The last resourceVersion handed out.
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    watchers: Vec<Watcher>,
    requests: Vec<Logged>,
    unexpected: Vec<String>,
    /// LISTs of these resources wait until released.
    held: BTreeSet<&'static str>,
    /// After answering the next GET of this object, write it once more (as
    /// another client would), so that a write based on that GET conflicts.
    touch_after_get: Option<Key>,
    /// The changes up to this resourceVersion are forgotten (etcd
    /// compaction): a watch from before it is answered 410 Gone.
    compacted: u64,
    /// How many watches were answered 410 Gone.
    gone: usize,
}

impl Inner {
    /// Stores (or, for DELETED, removes) `object` with a new
    /// resourceVersion, and tells the watchers.
    fn write(&mut self, plural: &'static str, type_: &'static str, mut object: Value) -> Value {
        let r = resource(plural);
        self.rv += 1;
        let meta = object["metadata"].as_object_mut().expect("an object");
        let name = meta["name"].as_str().expect("a name").to_string();
        let namespace = if r.namespaced {
            meta.entry("namespace")
                .or_insert_with(|| json!("default"))
                .as_str()
                .unwrap()
                .to_string()
        } else {
            String::new()
        };
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        let key = (plural, namespace.clone(), name);
        match (type_, self.objects.get(&key)) {
            ("ADDED", None) => {
                meta.insert("uid".into(), json!(format!("uid-{}-{}", plural, self.rv)));
                meta.insert("creationTimestamp".into(), json!("2025-01-01T00:00:00Z"));
            }
            ("MODIFIED" | "DELETED", Some(old)) => {
                for k in ["uid", "creationTimestamp"] {
                    meta.insert(k.into(), old["metadata"][k].clone());
                }
            }
            (t, old) => panic!("{t} of {key:?}, which exists: {}", old.is_some()),
        }
        if type_ == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key, object.clone());
        }
        let change = Change {
            rv: self.rv,
            plural,
            namespace: namespace.clone(),
            type_,
            object: object.clone(),
        };
        self.watchers
            .retain(|w| !w.wants(plural, &namespace) || w.send(type_, &change.object));
        self.history.push(change);
        object
    }

    fn get(&self, plural: &'static str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(plural, namespace.to_string(), name.to_string()))
    }

    /// The requests for `plural` with `verb`.
    fn requests(&self, plural: &str, verb: &str) -> Vec<&Logged> {
        self.requests
            .iter()
            .filter(|l| l.plural == Some(plural) && l.verb == Some(verb))
            .collect()
    }

    /// The objects of `plural`, in (namespace, name) order.
    fn objects(&self, plural: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|((p, _, _), _)| *p == plural)
            .map(|(_, v)| v)
            .collect()
    }
}

/// `object` as a meta.k8s.io/v1 PartialObjectMetadata.
fn metadata_only(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": object["metadata"].clone(),
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    json_response(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

/// An in-process Kubernetes API server with just enough semantics for the
/// controller. Cheap to clone: all clones share one state.
#[derive(Clone)]
struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    /// Bumped on every change of `inner`, for waiters.
    changed: Arc<tokio_watch::Sender<u64>>,
}

impl FakeApi {
    fn new() -> Self {
        init_tracing();
        FakeApi {
            inner: Arc::default(),
            changed: Arc::new(tokio_watch::channel(0).0),
        }
    }

    /// A kube client whose every request this fake answers, in process.
    fn client(&self) -> kube::Client {
        let router = Router::new().fallback(handle).with_state(self.clone());
        kube::Client::new(router, "default")
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Runs `f` on the state, then wakes the waiters.
    fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// Creates or replaces `object` (its kind names the resource), as
    /// another client of the API would; watchers get ADDED or MODIFIED.
    fn apply(&self, object: Value) -> Value {
        let kind = object["kind"].as_str().expect("a kind");
        let r = RESOURCES
            .iter()
            .find(|r| r.kind == kind)
            .unwrap_or_else(|| panic!("the fake does not serve {kind}"));
        self.update(|i| {
            let ns = if r.namespaced {
                object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
            } else {
                ""
            };
            let name = object["metadata"]["name"].as_str().unwrap();
            let type_ = if i.get(r.plural, ns, name).is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            i.write(r.plural, type_, object)
        })
    }

    /// Deletes an object; watchers get DELETED with its last state.
    fn delete(&self, plural: &'static str, namespace: &str, name: &str) {
        self.update(|i| {
            let old = i
                .get(plural, namespace, name)
                .unwrap_or_else(|| panic!("no {plural} {namespace}/{name}"))
                .clone();
            i.write(plural, "DELETED", old);
        });
    }

    /// Sends a BOOKMARK at the current resourceVersion to the watchers of
    /// `plural` that asked for bookmarks; returns how many got it.
    fn bookmark(&self, plural: &'static str) -> usize {
        let r = resource(plural);
        self.update(|i| {
            let object = json!({
                "apiVersion": r.api_version,
                "kind": r.kind,
                "metadata": {"resourceVersion": i.rv.to_string()},
            });
            let mut sent = 0;
            i.watchers.retain(|w| {
                if w.plural != plural || !w.bookmarks {
                    return true;
                }
                let mut line =
                    serde_json::to_vec(&json!({"type": "BOOKMARK", "object": object})).unwrap();
                line.push(b'\n');
                sent += 1;
                w.tx.send(Bytes::from(line)).is_ok()
            });
            sent
        })
    }

    /// Ends the open watch streams of `plural` (as a real server does at
    /// their `timeoutSeconds`).
    fn close_watches(&self, plural: &'static str) {
        self.update(|i| i.watchers.retain(|w| w.plural != plural));
    }

    /// Forgets the change history so far: a watch must start from now on.
    fn compact(&self) {
        self.update(|i| i.compacted = i.rv);
    }

    /// LISTs of `plural` wait until [`release`](Self::release).
    fn hold_lists(&self, plural: &'static str) {
        self.update(|i| i.held.insert(plural));
    }

    fn release(&self, plural: &'static str) {
        self.update(|i| i.held.remove(plural));
    }

    /// Waits (at most [`WAIT`]) until `f` returns something.
    async fn wait_for<T>(&self, what: &str, mut f: impl FnMut(&Inner) -> Option<T>) -> T {
        let mut rx = self.changed.subscribe();
        let found = timeout(WAIT, async {
            loop {
                if let Some(v) = f(&self.lock()) {
                    return v;
                }
                rx.changed().await.expect("the fake lives");
            }
        })
        .await;
        match found {
            Ok(v) => v,
            Err(_) => {
                let i = self.lock();
                panic!(
                    "timed out waiting for {what}; requests: {:#?}; unexpected: {:#?}",
                    i.requests, i.unexpected
                )
            }
        }
    }

    fn assert_no_unexpected(&self) {
        let i = self.lock();
        assert!(
            i.unexpected.is_empty(),
            "unexpected requests to the fake API: {:#?}",
            i.unexpected
        );
    }

    /// The Event writes (POST and PATCH) so far.
    fn event_writes(&self) -> Vec<Logged> {
        let i = self.lock();
        i.requests
            .iter()
            .filter(|l| l.plural == Some("events"))
            .cloned()
            .collect()
    }
}

/// The fake's one handler: every request lands here.
async fn handle(State(api): State<FakeApi>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query: BTreeMap<String, String> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let accept_as = accept_as(&parts.headers);
    let parsed = parse_path(&path);
    let verb = parsed.as_ref().map(|(_, _, name)| {
        match (
            &parts.method,
            name.is_some(),
            query.get("watch").map(String::as_str),
        ) {
            (&Method::GET, false, Some("true" | "1")) => "watch",
            (&Method::GET, false, _) => "list",
            (&Method::GET, true, _) => "get",
            (&Method::POST, false, _) => "create",
            (&Method::PUT, true, _) => "update",
            (&Method::PATCH, true, _) => "patch",
            (&Method::DELETE, true, _) => "delete",
            _ => "unknown",
        }
    });
    let index = api.update(|i| {
        i.requests.push(Logged {
            method: parts.method.clone(),
            path: path.clone(),
            query: query.clone(),
            accept_as: accept_as.clone(),
            verb,
            plural: parsed.as_ref().map(|(r, _, _)| r.plural),
            status: 0,
            list_rv: None,
        });
        i.requests.len() - 1
    });
    let what = format!("{} {}", parts.method, parts.uri);
    let unexpected = |why: &str| {
        eprintln!("fake API: unexpected request {what}: {why}");
        api.update(|i| i.unexpected.push(format!("{what}: {why}")));
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the fake API does not serve {what}: {why}"),
        )
    };
    let response = match (parsed, verb) {
        (Some((r, ns, name)), Some(verb)) if r.verbs.contains(&verb) => {
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .expect("a request body");
            serve(
                &api,
                r,
                verb,
                ns,
                name,
                &query,
                accept_as.as_deref(),
                &parts.headers,
                &body,
                index,
            )
            .await
            .unwrap_or_else(|why| unexpected(&why))
        }
        (Some((r, _, _)), Some(verb)) => unexpected(&format!(
            "verb {verb} on {} is not one the controller should use",
            r.plural
        )),
        _ => unexpected("no such resource"),
    };
    let code = response.status().as_u16();
    api.update(|i| i.requests[index].status = code);
    response
}

/// The `as=` parameter of the Accept header.
fn accept_as(headers: &HeaderMap) -> Option<String> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    accept
        .split(';')
        .find_map(|p| p.trim().strip_prefix("as="))
        .map(str::to_string)
}

/// Answers one allowed request. `Err`: a request the fake does not
/// understand (it becomes an "unexpected" 404).
#[allow(clippy::too_many_arguments)]
async fn serve(
    api: &FakeApi,
    r: &'static ResourceDef,
    verb: &'static str,
    ns: Option<String>,
    name: Option<String>,
    query: &BTreeMap<String, String>,
    accept_as: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
    index: usize,
) -> Result<Response, String> {
    let meta_only = match (verb, accept_as) {
        (_, None) => false,
        ("list", Some("PartialObjectMetadataList")) => true,
        ("watch" | "get", Some("PartialObjectMetadata")) => true,
        (_, Some(other)) => {
            return Err(format!("Accept as={other} is not valid for {verb}"));
        }
    };
    let ns_str = ns.clone().unwrap_or_default();
    match verb {
        "list" => {
            // Held LISTs wait here (the request is already logged).
            let mut rx = api.changed.subscribe();
            while api.lock().held.contains(r.plural) {
                rx.changed().await.map_err(|e| e.to_string())?;
            }
            let (items, rv) = {
                let i = api.lock();
                let items: Vec<Value> = i
                    .objects
                    .iter()
                    .filter(|((p, n, _), _)| *p == r.plural && ns.as_ref().is_none_or(|ns| ns == n))
                    .map(|(_, o)| {
                        if meta_only {
                            metadata_only(o)
                        } else {
                            let mut o = o.clone();
                            let m = o.as_object_mut().unwrap();
                            m.remove("apiVersion");
                            m.remove("kind");
                            o
                        }
                    })
                    .collect();
                (items, i.rv.to_string())
            };
            api.update(|i| i.requests[index].list_rv = Some(rv.clone()));
            let (api_version, kind) = if meta_only {
                (
                    "meta.k8s.io/v1".to_string(),
                    "PartialObjectMetadataList".to_string(),
                )
            } else {
                (r.api_version.to_string(), format!("{}List", r.kind))
            };
            Ok(json_response(
                StatusCode::OK,
                &json!({
                    "apiVersion": api_version,
                    "kind": kind,
                    "metadata": {"resourceVersion": rv},
                    "items": items,
                }),
            ))
        }
        "watch" => {
            let from = match query.get("resourceVersion").map(String::as_str) {
                None | Some("" | "0") => None,
                Some(v) => Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("resourceVersion {v}"))?,
                ),
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let watcher = Watcher {
                plural: r.plural,
                namespace: ns.clone(),
                metadata_only: meta_only,
                bookmarks: query.get("allowWatchBookmarks").map(String::as_str) == Some("true"),
                tx,
            };
            api.update(|i| {
                match from {
                    // Too old: 410 Gone, as an ERROR event, and the stream
                    // ends; the client must list again.
                    Some(from) if from < i.compacted => {
                        i.gone += 1;
                        let status = json!({
                            "kind": "Status",
                            "apiVersion": "v1",
                            "metadata": {},
                            "status": "Failure",
                            "message": format!(
                                "too old resource version: {from} ({})",
                                i.compacted
                            ),
                            "reason": "Expired",
                            "code": 410,
                        });
                        let mut line =
                            serde_json::to_vec(&json!({"type": "ERROR", "object": status}))
                                .unwrap();
                        line.push(b'\n');
                        let _ = watcher.tx.send(Bytes::from(line));
                        return;
                    }
                    // Every change since `from`, then the live ones.
                    Some(from) => {
                        for c in i.history.iter().filter(|c| c.rv > from) {
                            if watcher.wants(c.plural, &c.namespace) {
                                watcher.send(c.type_, &c.object);
                            }
                        }
                    }
                    // "Any": the current state as ADDED, then the live ones.
                    None => {
                        for ((p, n, _), o) in &i.objects {
                            if watcher.wants(p, n) {
                                watcher.send("ADDED", o);
                            }
                        }
                    }
                }
                i.watchers.push(watcher);
            });
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                let line = rx.recv().await?;
                Some((Ok::<_, Infallible>(line), rx))
            });
            Ok(Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .unwrap())
        }
        "get" => {
            let name = name.unwrap();
            let key = (r.plural, ns_str.clone(), name.clone());
            let found = api.lock().objects.get(&key).cloned();
            let Some(object) = found else {
                return Ok(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", r.plural),
                ));
            };
            api.update(|i| {
                if i.touch_after_get.as_ref() == Some(&key) {
                    i.touch_after_get = None;
                    i.write(r.plural, "MODIFIED", object.clone());
                }
            });
            let object = if meta_only {
                metadata_only(&object)
            } else {
                object
            };
            Ok(json_response(StatusCode::OK, &object))
        }
        "create" | "update" | "patch" => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let expected = if verb == "patch" {
                "application/merge-patch+json"
            } else {
                "application/json"
            };
            if content_type != expected {
                return Err(format!(
                    "Content-Type {content_type:?}, expected {expected}"
                ));
            }
            let mut object: Value =
                serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
            if verb != "patch" {
                for (field, want) in [("apiVersion", r.api_version), ("kind", r.kind)] {
                    if object[field] != want {
                        return Ok(status(
                            StatusCode::BAD_REQUEST,
                            "BadRequest",
                            &format!("{field} {} is not {want}", object[field]),
                        ));
                    }
                }
                let body_ns = object["metadata"]["namespace"].as_str().unwrap_or(&ns_str);
                if r.namespaced && body_ns != ns_str {
                    return Ok(status(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the namespace of the object does not match the namespace of the request",
                    ));
                }
                object["metadata"]["namespace"] = json!(ns_str);
            }
            Ok(api.update(|i| write_request(i, r, verb, &ns_str, name, object)))
        }
        _ => Err(format!("verb {verb}")),
    }
}

/// A create, update or merge patch, with the API's conflict rules.
fn write_request(
    i: &mut Inner,
    r: &'static ResourceDef,
    verb: &str,
    ns: &str,
    path_name: Option<String>,
    mut object: Value,
) -> Response {
    let name = match &path_name {
        Some(n) => n.clone(),
        None => match object["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => {
                return status(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                );
            }
        },
    };
    let existing = i.get(r.plural, ns, &name).cloned();
    let conflict = |what: String| status(StatusCode::CONFLICT, "Conflict", &what);
    match verb {
        "create" => {
            if existing.is_some() {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("{} \"{name}\" already exists", r.plural),
                );
            }
            if object["metadata"]["resourceVersion"]
                .as_str()
                .is_some_and(|v| !v.is_empty())
            {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "resourceVersion should not be set on objects to be created",
                );
            }
            let written = i.write(r.plural, "ADDED", object);
            json_response(StatusCode::CREATED, &written)
        }
        "update" | "patch" => {
            let Some(existing) = existing else {
                return status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{name}\" not found", r.plural),
                );
            };
            if verb == "patch" {
                let mut patched = existing.clone();
                merge_patch(&mut patched, &object);
                object = patched;
            } else if object["metadata"]["name"].as_str() != Some(name.as_str()) {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                );
            }
            // Optimistic concurrency: a resourceVersion that was sent must
            // be the stored one (an update without one is unconditional).
            let sent = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let stored = existing["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("");
            if !sent.is_empty() && sent != stored {
                return conflict(format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again",
                    r.plural
                ));
            }
            let written = i.write(r.plural, "MODIFIED", object);
            json_response(StatusCode::OK, &written)
        }
        _ => unreachable!(),
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

// ---------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------

/// A ClusterIP Service in `shop`, port `http` 80 → target port `web`
/// (named), patched with `extra`.
fn service(name: &str, ip: &str, extra: Value) -> Value {
    let mut s = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web"}],
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    });
    merge_patch(&mut s, &extra);
    s
}

/// An endpoint: (ip, node, ready, serving, terminating).
type Ep<'a> = (&'a str, &'a str, bool, bool, bool);

const READY: (bool, bool, bool) = (true, true, false);
const TERMINATING: (bool, bool, bool) = (false, true, true);

fn ep<'a>(ip: &'a str, node: &'a str, (ready, serving, terminating): (bool, bool, bool)) -> Ep<'a> {
    (ip, node, ready, serving, terminating)
}

/// An IPv4 EndpointSlice of Service `shop/{service}` whose port `port_name`
/// resolved to `port`.
fn slice(name: &str, service: &str, port_name: &str, port: u16, endpoints: &[Ep]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|&(ip, node, ready, serving, terminating)| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "nodeName": node,
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": format!("pod-{ip}")},
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "shop",
            "name": name,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {"capacity": {"cpu": "2", "memory": "4Gi"}, "conditions": []},
    })
}

/// A backend as translated: its node from the fixtures' plan (10.244.1.x on
/// node-a, 10.244.2.x on node-b).
fn backend(ip: &str, port: u16, state: BackendState) -> Backend {
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let node = match ip.octets()[2] {
        1 => Some("node-a".to_string()),
        2 => Some("node-b".to_string()),
        _ => None,
    };
    Backend {
        max: None,
        spill_weight: None,
        node,
        ip: ip.into(),
        port,
        weight: 1,
        state,
    }
}

fn lb_service(name: &str, vip: &str, port: u16, backends: Vec<Backend>) -> Service {
    Service::new(
        name,
        vip.parse::<Ipv4Addr>().unwrap(),
        port,
        Protocol::Tcp,
        Algorithm::Random,
        backends,
    )
}

/// The cluster of the watch tests: `shop/web` (10.96.0.10) with two ready
/// endpoints and a terminating one, on two nodes.
fn seed_web(fake: &FakeApi) {
    fake.apply(service("web", "10.96.0.10", json!({})));
    fake.apply(slice(
        "web-abcde",
        "web",
        "http",
        8080,
        &[
            ep("10.244.1.2", "node-a", READY),
            ep("10.244.2.3", "node-b", READY),
            ep("10.244.1.4", "node-a", TERMINATING),
        ],
    ));
    fake.apply(node("node-a"));
    fake.apply(node("node-b"));
}

fn web_backends() -> Vec<Backend> {
    vec![
        backend("10.244.1.2", 8080, BackendState::Active),
        backend("10.244.1.4", 8080, BackendState::Terminating),
        backend("10.244.2.3", 8080, BackendState::Active),
    ]
}

// ---------------------------------------------------------------------------
// Running the watcher
// ---------------------------------------------------------------------------

/// `watch::run` against the fake.
struct Running {
    snapshots: SnapshotReceiver,
    leader: tokio_watch::Sender<bool>,
    task: JoinHandle<Result<(), watch::WatchError>>,
}

impl Running {
    fn start(fake: &FakeApi, leader: bool) -> Self {
        Self::start_with(fake, leader, EndpointsSource::EndpointSlices)
    }

    fn start_with(fake: &FakeApi, leader: bool, source: EndpointsSource) -> Self {
        let (tx, snapshots) = watch::snapshot_channel();
        let (leader, leader_rx) = tokio_watch::channel(leader);
        let config = WatchConfig {
            coalesce: COALESCE,
            controller: CONTROLLER.into(),
            instance: Some(INSTANCE.into()),
            source,
        };
        let task = tokio::spawn(watch::run(fake.client(), config, tx, leader_rx));
        Running {
            snapshots,
            leader,
            task,
        }
    }

    /// The first snapshot with a generation above `after`.
    async fn snapshot_after(&mut self, after: u64) -> Arc<ClusterSnapshot> {
        self.snapshot_where(&format!("a snapshot after generation {after}"), |s| {
            s.generation > after
        })
        .await
    }

    /// The first snapshot for which `f` holds.
    async fn snapshot_where(
        &mut self,
        what: &str,
        f: impl Fn(&ClusterSnapshot) -> bool,
    ) -> Arc<ClusterSnapshot> {
        let found = timeout(
            WAIT,
            self.snapshots.wait_for(|s| s.as_deref().is_some_and(&f)),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("watch::run is running");
        found.clone().unwrap()
    }

    fn current(&self) -> Option<Arc<ClusterSnapshot>> {
        self.snapshots.borrow().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lets the controller settle: on the paused clock, this returns once every
/// task has been idle for [`SETTLE`].
async fn settle() {
    tokio::time::sleep(SETTLE).await;
}

// ---------------------------------------------------------------------------
// Tests: watch::run
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn the_first_snapshot_waits_for_all_three_lists() {
    let fake = FakeApi::new();
    seed_web(&fake);
    fake.hold_lists("nodes");
    let mut run = Running::start(&fake, true);

    // Services and EndpointSlices listed and watched; Nodes still listing.
    fake.wait_for("the services and endpointslices watches", |i| {
        (!i.requests("services", "watch").is_empty()
            && !i.requests("endpointslices", "watch").is_empty()
            && !i.requests("nodes", "list").is_empty())
        .then_some(())
    })
    .await;
    settle().await;
    assert!(
        run.current().is_none(),
        "a snapshot was published before the nodes were listed"
    );

    fake.release("nodes");
    let snap = run.snapshot_after(0).await;
    assert_eq!(snap.generation, 1);
    assert_eq!(snap.nodes, ["node-a", "node-b"]);
    assert!(
        snap.cluster.problems().is_empty(),
        "{:?}",
        snap.cluster.problems()
    );
    let expected = vec![lb_service(
        "shop/web:http",
        "10.96.0.10",
        80,
        web_backends(),
    )];
    for n in ["node-a", "node-b", "node-without-agent"] {
        assert_eq!(snap.node_state(n).services, expected, "{n}");
    }

    // How kube asked: each watch resumes from its list's resourceVersion;
    // Nodes and Pods are read as metadata only.
    {
        let i = fake.lock();
        for plural in ["services", "endpointslices", "nodes", "pods"] {
            let lists = i.requests(plural, "list");
            let watches = i.requests(plural, "watch");
            assert_eq!(lists.len(), 1, "{plural}: {lists:#?}");
            assert_eq!(watches.len(), 1, "{plural}: {watches:#?}");
            assert_eq!(
                watches[0].query.get("resourceVersion"),
                lists[0].list_rv.as_ref(),
                "{plural}"
            );
            let metadata = plural == "nodes" || plural == "pods";
            assert_eq!(
                lists[0].accept_as.as_deref(),
                metadata.then_some("PartialObjectMetadataList"),
                "{plural}"
            );
            assert_eq!(
                watches[0].accept_as.as_deref(),
                metadata.then_some("PartialObjectMetadata"),
                "{plural}"
            );
            assert!(
                lists[0].path.ends_with(&format!("/{plural}")),
                "all namespaces"
            );
        }
    }
    settle().await;
    assert_eq!(
        run.current().unwrap().generation,
        1,
        "one snapshot for one sync"
    );
    assert!(fake.event_writes().is_empty(), "no problem, no event");
    fake.assert_no_unexpected();
}

/// The core v1 Endpoints source: the same backends from an Endpoints
/// object (not-ready addresses left out, no terminating state), and its
/// changes followed; EndpointSlices are not read at all.
#[tokio::test(start_paused = true)]
async fn the_endpoints_source_reads_core_v1_endpoints() {
    let fake = FakeApi::new();
    seed_web(&fake); // a slice that must be ignored
    let endpoints = |ready: &[(&str, &str)], not_ready: &[(&str, &str)]| {
        let addr = |(ip, node): &(&str, &str)| json!({"ip": ip, "nodeName": node});
        json!({
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "web", "namespace": "shop"},
            "subsets": [{
                "addresses": ready.iter().map(addr).collect::<Vec<_>>(),
                "notReadyAddresses": not_ready.iter().map(addr).collect::<Vec<_>>(),
                "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
            }],
        })
    };
    fake.apply(endpoints(
        &[("10.244.1.7", "node-a"), ("10.244.2.7", "node-b")],
        &[("10.244.1.8", "node-a")],
    ));
    let mut run = Running::start_with(&fake, false, EndpointsSource::Endpoints);
    let first = run.snapshot_after(0).await;
    assert_eq!(
        first.node_state("node-a").services,
        [lb_service(
            "shop/web:http",
            "10.96.0.10",
            80,
            vec![
                backend("10.244.1.7", 9090, BackendState::Active),
                backend("10.244.2.7", 9090, BackendState::Active),
            ]
        )]
    );
    // A pod leaves (scaled down, or terminating: Endpoints cannot tell).
    fake.apply(endpoints(&[("10.244.2.7", "node-b")], &[]));
    let second = run.snapshot_after(first.generation).await;
    assert_eq!(
        second.node_state("node-a").services[0].backends,
        [backend("10.244.2.7", 9090, BackendState::Active)]
    );
    {
        let i = fake.lock();
        assert!(i.requests("endpointslices", "list").is_empty());
        assert!(!i.requests("endpoints", "list").is_empty());
    }
    run.task.abort();
    fake.assert_no_unexpected();
}

#[tokio::test(start_paused = true)]
async fn watch_events_produce_new_snapshots() {
    let fake = FakeApi::new();
    seed_web(&fake);
    let mut run = Running::start(&fake, true);
    let first = run.snapshot_after(0).await;
    assert_eq!(first.generation, 1);

    // A bookmark (kube asks for them) moves the watch on but changes
    // nothing.
    assert_eq!(fake.bookmark("endpointslices"), 1);
    // The EndpointSlice loses 10.244.2.3 (MODIFIED).
    fake.apply(slice(
        "web-abcde",
        "web",
        "http",
        8080,
        &[
            ep("10.244.1.2", "node-a", READY),
            ep("10.244.1.4", "node-a", TERMINATING),
        ],
    ));
    let second = run.snapshot_after(1).await;
    assert_eq!(second.generation, 2);
    assert_eq!(
        second.node_state("node-a").services,
        [lb_service(
            "shop/web:http",
            "10.96.0.10",
            80,
            vec![
                backend("10.244.1.2", 8080, BackendState::Active),
                backend("10.244.1.4", 8080, BackendState::Terminating),
            ]
        )]
    );

    // A change that the translation does not see (a Node label other than
    // its zone and region): no new snapshot.
    let mut relabelled = node("node-b");
    relabelled["metadata"]["labels"]["example.com/rack"] = json!("r7");
    fake.apply(relabelled);
    settle().await;
    assert_eq!(run.current().unwrap().generation, 2);

    // A new Node is a change.
    fake.apply(node("node-c"));
    let third = run.snapshot_after(2).await;
    assert_eq!(third.generation, 3);
    assert_eq!(third.nodes, ["node-a", "node-b", "node-c"]);

    // The Service is deleted (DELETED): nothing left to balance.
    fake.delete("services", "shop", "web");
    let fourth = run.snapshot_after(3).await;
    assert_eq!(fourth.generation, 4);
    assert_eq!(fourth.cluster.service_count(), 0);
    assert!(fourth.node_state("node-a").services.is_empty());

    // All of it came over the first watch of each resource: no relist.
    {
        let i = fake.lock();
        for plural in ["services", "endpointslices", "nodes"] {
            assert_eq!(i.requests(plural, "list").len(), 1, "{plural}");
            assert_eq!(i.requests(plural, "watch").len(), 1, "{plural}");
        }
    }
    fake.assert_no_unexpected();
}

#[tokio::test(start_paused = true)]
async fn ended_and_expired_watches_resume_without_losing_changes() {
    let fake = FakeApi::new();
    seed_web(&fake);
    let mut run = Running::start(&fake, true);
    run.snapshot_after(0).await;
    let first_watch_rv = fake.lock().requests("services", "watch")[0]
        .query
        .get("resourceVersion")
        .cloned();

    // The Services watch ends (as at its timeoutSeconds) and the Service is
    // deleted meanwhile: the watch resumes from the last resourceVersion
    // seen, and the deletion arrives through it, without a new list.
    fake.close_watches("services");
    fake.delete("services", "shop", "web");
    let s = run.snapshot_after(1).await;
    assert_eq!(s.cluster.service_count(), 0);
    {
        let i = fake.lock();
        let watches = i.requests("services", "watch");
        assert_eq!(watches.len(), 2, "{watches:#?}");
        assert_eq!(
            watches[1].query.get("resourceVersion"),
            first_watch_rv.as_ref()
        );
        assert_eq!(i.requests("services", "list").len(), 1);
    }

    // The watch ends again, and the history it would resume from is
    // compacted away before a new Service appears: the watch gets 410 Gone,
    // kube lists again, and the new Service is in the next snapshot.
    fake.close_watches("services");
    fake.apply(node("node-c"));
    fake.compact();
    fake.apply(service("api", "10.96.0.30", json!({})));
    let s = run
        .snapshot_where("a snapshot with shop/api", |s| {
            s.cluster.service_count() > 0
        })
        .await;
    let names: Vec<String> = s
        .node_state("node-a")
        .services
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["shop/api:http"]);
    assert_eq!(s.nodes, ["node-a", "node-b", "node-c"]);
    // The watch after the new list starts from the list's resourceVersion.
    fake.wait_for("the watch after the relist", |i| {
        let lists = i.requests("services", "list");
        let watches = i.requests("services", "watch");
        (lists.len() == 2 && watches.len() == 4).then(|| {
            assert_eq!(
                watches[3].query.get("resourceVersion"),
                lists[1].list_rv.as_ref()
            )
        })
    })
    .await;
    assert_eq!(fake.lock().gone, 1);
    fake.assert_no_unexpected();
}

/// The Events written on Service `shop/{name}`.
fn events_on(fake: &FakeApi, name: &str) -> Vec<Value> {
    let i = fake.lock();
    i.objects("events")
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name)
        .cloned()
        .collect()
}

#[tokio::test(start_paused = true)]
async fn an_invalid_annotation_is_one_warning_event_while_leader() {
    let fake = FakeApi::new();
    seed_web(&fake);
    let svc = fake.apply(service(
        "web",
        "10.96.0.10",
        json!({"metadata": {"annotations": {
            "rpclb.io/algorithm": "fastest",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        }}}),
    ));
    let mut run = Running::start(&fake, false);

    // Not the leader: the problem is in the snapshot, but no Event.
    let first = run.snapshot_after(0).await;
    let problems = first.cluster.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].reason(), "InvalidAnnotation");
    // The default algorithm is used.
    assert_eq!(
        first.node_state("node-a").services[0].algorithm,
        Algorithm::Random
    );
    settle().await;
    assert!(fake.event_writes().is_empty(), "{:#?}", fake.event_writes());

    // Leader: exactly one Warning Event on the Service.
    run.leader.send_replace(true);
    fake.wait_for("an event", |i| {
        (!i.requests("events", "create").is_empty()).then_some(())
    })
    .await;
    settle().await;
    let writes = fake.event_writes();
    assert_eq!(writes.len(), 1, "{writes:#?}");
    assert_eq!(
        (writes[0].method.clone(), writes[0].status),
        (Method::POST, 201)
    );
    assert_eq!(
        writes[0].path,
        "/apis/events.k8s.io/v1/namespaces/shop/events"
    );
    let events = events_on(&fake, "web");
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "InvalidAnnotation");
    assert_eq!(e["action"], watch::EVENT_ACTION);
    assert_eq!(e["reportingController"], CONTROLLER);
    assert_eq!(e["reportingInstance"], INSTANCE);
    assert_eq!(e["metadata"]["namespace"], "shop");
    let note = e["note"].as_str().unwrap();
    assert!(
        note.contains("rpclb.io/algorithm") && note.contains("fastest"),
        "{note}"
    );
    assert_eq!(e["regarding"]["kind"], "Service");
    assert_eq!(e["regarding"]["apiVersion"], "v1");
    assert_eq!(e["regarding"]["namespace"], "shop");
    assert_eq!(e["regarding"]["uid"], svc["metadata"]["uid"]);

    // A recompute with the same problem (an EndpointSlice change): no new
    // Event.
    let gen_before = run.current().unwrap().generation;
    fake.apply(slice(
        "web-abcde",
        "web",
        "http",
        8080,
        &[ep("10.244.1.2", "node-a", READY)],
    ));
    let next = run.snapshot_after(gen_before).await;
    assert_eq!(next.cluster.problems().len(), 1);
    settle().await;
    assert_eq!(fake.event_writes().len(), 1, "{:#?}", fake.event_writes());

    // Losing the lead writes nothing. Regaining it (as a new leader does)
    // reports the problem again under the same Event name: 409, still one
    // Event (it once wrote the same Event every ~2 s while a problem
    // lasted, and again at each change of leader).
    run.leader.send_replace(false);
    settle().await;
    assert_eq!(fake.event_writes().len(), 1);
    run.leader.send_replace(true);
    fake.wait_for("a second event write", |i| {
        (i.requests
            .iter()
            .filter(|l| l.plural == Some("events"))
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    settle().await;
    let writes = fake.event_writes();
    assert_eq!(writes.len(), 2, "{writes:#?}");
    assert_eq!(
        (writes[1].method.clone(), writes[1].status),
        (Method::POST, 409)
    );
    assert_eq!(events_on(&fake, "web").len(), 1);
    // A renewal that keeps the lead notifies nobody: nothing is written.
    run.leader.send_if_modified(|_| false);
    settle().await;
    assert_eq!(fake.event_writes().len(), 2);

    // The problem goes away and comes back: the one Event's series counts it.
    let gen_before = run.current().unwrap().generation;
    fake.apply(service("web", "10.96.0.10", json!({})));
    let fixed = run.snapshot_after(gen_before).await;
    assert!(fixed.cluster.problems().is_empty());
    let gen_before = fixed.generation;
    fake.apply(service(
        "web",
        "10.96.0.10",
        json!({"metadata": {"annotations": {"rpclb.io/algorithm": "fastest"}}}),
    ));
    let again = run.snapshot_after(gen_before).await;
    assert_eq!(again.cluster.problems().len(), 1);
    fake.wait_for("the series update", |i| {
        (!i.requests("events", "patch").is_empty()).then_some(())
    })
    .await;
    settle().await;
    let events = events_on(&fake, "web");
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["series"]["count"], 2, "{:#?}", events[0]);
    fake.assert_no_unexpected();
}

#[tokio::test(start_paused = true)]
async fn each_problem_of_a_service_gets_its_own_event() {
    let fake = FakeApi::new();
    seed_web(&fake);
    fake.apply(service(
        "web",
        "10.96.0.10",
        json!({"metadata": {"annotations": {
            "rpclb.io/algorithm": "fastest",
            "rpclb.io/weights": "10.244.1.2=heavy",
        }}}),
    ));
    let mut run = Running::start(&fake, true);
    let first = run.snapshot_after(0).await;
    assert_eq!(
        first.cluster.problems().len(),
        2,
        "{:?}",
        first.cluster.problems()
    );
    fake.wait_for("two events", |i| {
        (i.objects("events").len() >= 2).then_some(())
    })
    .await;
    settle().await;
    let events = events_on(&fake, "web");
    assert_eq!(events.len(), 2, "{events:#?}");
    let notes: BTreeSet<&str> = events.iter().map(|e| e["note"].as_str().unwrap()).collect();
    assert!(
        notes.iter().any(|n| n.contains("rpclb.io/algorithm")),
        "{notes:#?}"
    );
    assert!(
        notes.iter().any(|n| n.contains("rpclb.io/weights")),
        "{notes:#?}"
    );

    // The annotation is changed to another invalid value: a new problem,
    // a new Event with the new value.
    fake.apply(service(
        "web",
        "10.96.0.10",
        json!({"metadata": {"annotations": {
            "rpclb.io/algorithm": "slowest",
            "rpclb.io/weights": "10.244.1.2=heavy",
        }}}),
    ));
    fake.wait_for("a third event", |i| {
        i.objects("events")
            .iter()
            .any(|e| e["note"].as_str().is_some_and(|n| n.contains("slowest")))
            .then_some(())
    })
    .await;
    settle().await;
    assert_eq!(events_on(&fake, "web").len(), 3);
    fake.assert_no_unexpected();
}

#[tokio::test(start_paused = true)]
async fn local_traffic_policy_node_states() {
    let fake = FakeApi::new();
    seed_web(&fake);
    fake.apply(service(
        "dns",
        "10.96.0.20",
        json!({"spec": {
            "internalTrafficPolicy": "Local",
            "ports": [{"name": "", "port": 53, "protocol": "TCP", "targetPort": 5353}],
        }}),
    ));
    fake.apply(slice(
        "dns-xyz",
        "dns",
        "",
        5353,
        &[
            ep("10.244.1.7", "node-a", READY),
            ep("10.244.2.8", "node-b", READY),
            ep("10.244.2.9", "node-b", TERMINATING),
        ],
    ));
    let mut run = Running::start(&fake, true);
    let snap = run.snapshot_after(0).await;

    let timeouts = Timeouts {
        udp: Duration::from_secs(30),
        ..Timeouts::default()
    };
    let (default, nodes) = kube_mode::node_states(&snap, timeouts);
    let web = lb_service("shop/web:http", "10.96.0.10", 80, web_backends());
    let dns = |backends| lb_service("shop/dns:53", "10.96.0.20", 53, backends);

    assert_eq!(default.timeouts, timeouts);
    assert_eq!(default.state.services, [web.clone(), dns(vec![])]);
    assert_eq!(
        nodes.keys().map(String::as_str).collect::<Vec<_>>(),
        ["node-a", "node-b"]
    );
    assert_eq!(nodes["node-a"].timeouts, timeouts);
    assert_eq!(
        nodes["node-a"].state.services,
        [
            web.clone(),
            dns(vec![backend("10.244.1.7", 5353, BackendState::Active)])
        ]
    );
    assert_eq!(
        nodes["node-b"].state.services,
        [
            web.clone(),
            dns(vec![
                backend("10.244.2.8", 5353, BackendState::Active),
                backend("10.244.2.9", 5353, BackendState::Terminating),
            ])
        ]
    );
    // The cut agrees with the snapshot's own per-node view.
    for (n, s) in &nodes {
        assert_eq!(s.state, snap.node_state(n), "{n}");
    }
    assert_eq!(default.state, snap.node_state("node-c"));
    fake.assert_no_unexpected();
}

// ---------------------------------------------------------------------------
// Tests: leader election (real clock)
// ---------------------------------------------------------------------------

const LEASE_NS: &str = "rpclb-system";
const LEASE_NAME: &str = "rpclb-controller";

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(600),
        retry_period: Duration::from_millis(100),
        ..LeaseConfig::new(LEASE_NS, LEASE_NAME, identity)
    }
}

fn elector(fake: &FakeApi, identity: &str) -> LeaderElector {
    LeaderElector::new(fake.client(), lease_config(identity)).unwrap()
}

/// The stored Lease.
fn lease(fake: &FakeApi) -> Value {
    fake.lock()
        .get("leases", LEASE_NS, LEASE_NAME)
        .expect("a lease")
        .clone()
}

fn holder(lease: &Value) -> Option<&str> {
    lease["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
}

fn rv(object: &Value) -> String {
    object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn lease_rounds_acquire_renew_follow_and_take_over() {
    let fake = FakeApi::new();
    let mut a = elector(&fake, "pod-a");
    let mut b = elector(&fake, "pod-b");

    // No Lease: a creates it.
    assert!(a.try_acquire_or_renew().await.unwrap());
    let created = lease(&fake);
    assert_eq!(holder(&created), Some("pod-a"));
    assert_eq!(created["spec"]["leaseDurationSeconds"], 1);
    assert_eq!(created["spec"]["leaseTransitions"], 0);
    assert_eq!(fake.lock().requests("leases", "create").len(), 1);

    // a renews: a new resourceVersion and renewTime, same holder.
    assert!(a.try_acquire_or_renew().await.unwrap());
    let renewed = lease(&fake);
    assert_ne!(rv(&renewed), rv(&created));
    assert_eq!(holder(&renewed), Some("pod-a"));
    assert_eq!(
        renewed["spec"]["acquireTime"],
        created["spec"]["acquireTime"]
    );
    assert_eq!(fake.lock().requests("leases", "update").len(), 1);

    // b follows, and writes nothing, for longer than the lease duration
    // while a keeps renewing.
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        let before = rv(&lease(&fake));
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "b acquired a renewed lease"
        );
        assert_eq!(rv(&lease(&fake)), before, "a follower wrote the lease");
        assert!(a.try_acquire_or_renew().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(holder(&lease(&fake)), Some("pod-a"));

    // Someone writes the Lease between a's read and a's write: a's write
    // carries a stale resourceVersion, is refused 409, and a does not count
    // itself leader for that round.
    fake.update(|i| {
        i.touch_after_get = Some(("leases", LEASE_NS.into(), LEASE_NAME.into()));
    });
    assert!(!a.try_acquire_or_renew().await.unwrap());
    let last_update = fake
        .lock()
        .requests("leases", "update")
        .last()
        .unwrap()
        .status;
    assert_eq!(last_update, 409);
    assert!(
        a.try_acquire_or_renew().await.unwrap(),
        "the next round renews"
    );

    // a stops renewing: b takes over once the lease has gone unrenewed for
    // its duration, by b's own clock.
    let stopped = Instant::now();
    let took_over = timeout(Duration::from_secs(5), async {
        loop {
            if b.try_acquire_or_renew().await.unwrap() {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("b takes over an expired lease");
    assert!(
        took_over - stopped >= Duration::from_secs(1),
        "b took over after {:?}",
        took_over - stopped
    );
    let taken = lease(&fake);
    assert_eq!(holder(&taken), Some("pod-b"));
    assert_eq!(taken["spec"]["leaseTransitions"], 1);

    // a now follows; its release is a no-op (not the holder).
    assert!(!a.try_acquire_or_renew().await.unwrap());
    let before = rv(&lease(&fake));
    a.release().await.unwrap();
    assert_eq!(rv(&lease(&fake)), before);

    // b releases: a acquires at its next round, without waiting for expiry.
    b.release().await.unwrap();
    assert_eq!(holder(&lease(&fake)), None);
    assert!(a.try_acquire_or_renew().await.unwrap());
    let back = lease(&fake);
    assert_eq!(holder(&back), Some("pod-a"));
    assert_eq!(back["spec"]["leaseTransitions"], 2);
    fake.assert_no_unexpected();
}

#[tokio::test]
async fn electors_hand_over_on_shutdown() {
    let fake = FakeApi::new();
    let (a_tx, mut a_rx) = tokio_watch::channel(false);
    let (a_stop, a_stopped) = oneshot::channel::<()>();
    let a_task = tokio::spawn(elector(&fake, "pod-a").run(a_tx, async move {
        let _ = a_stopped.await;
    }));
    timeout(Duration::from_secs(5), a_rx.wait_for(|l| *l))
        .await
        .expect("a leads")
        .unwrap();
    a_rx.mark_unchanged();

    let (b_tx, mut b_rx) = tokio_watch::channel(false);
    let (b_stop, b_stopped) = oneshot::channel::<()>();
    let b_task = tokio::spawn(elector(&fake, "pod-b").run(b_tx, async move {
        let _ = b_stopped.await;
    }));

    // For longer than the lease duration, b follows while a renews.
    let updates_before = fake.lock().requests("leases", "update").len();
    let b_led = timeout(Duration::from_millis(1500), b_rx.wait_for(|l| *l))
        .await
        .is_ok();
    assert!(!b_led, "b became leader while a renewed");
    assert!(*a_rx.borrow(), "a still leads");
    let renewals = fake.lock().requests("leases", "update").len() - updates_before;
    assert!(renewals >= 3, "a renewed {renewals} times in 1.5 s");
    // Renewals are no news: the watch loop starts over on each notification
    // (it once re-wrote every Event at every renewal).
    assert!(
        !a_rx.has_changed().unwrap(),
        "a renewal notified a's receiver"
    );
    assert!(
        !b_rx.has_changed().unwrap(),
        "following notified b's receiver"
    );
    assert_eq!(holder(&lease(&fake)), Some("pod-a"));

    // a shuts down: it steps down, releases the Lease, and b acquires it.
    a_stop.send(()).unwrap();
    timeout(Duration::from_secs(5), a_task)
        .await
        .expect("a stops")
        .unwrap();
    assert!(!*a_rx.borrow(), "a stepped down");
    timeout(Duration::from_secs(5), b_rx.wait_for(|l| *l))
        .await
        .expect("b leads after a released")
        .unwrap();
    let taken = lease(&fake);
    assert_eq!(holder(&taken), Some("pod-b"));
    assert_eq!(taken["spec"]["leaseTransitions"], 1);
    // b acquired the released Lease (empty holder), not an expired one.
    {
        let i = fake.lock();
        let holders: Vec<Option<&str>> = i
            .history
            .iter()
            .filter(|c| c.plural == "leases")
            .map(|c| holder(&c.object))
            .collect();
        let first_b = holders.iter().position(|h| *h == Some("pod-b")).unwrap();
        assert_eq!(holders[first_b - 1], None, "{holders:?}");
        assert!(holders[..first_b - 1].iter().all(|h| *h == Some("pod-a")));
    }

    b_stop.send(()).unwrap();
    timeout(Duration::from_secs(5), b_task)
        .await
        .expect("b stops")
        .unwrap();
    assert_eq!(holder(&lease(&fake)), None, "b released on shutdown");
    fake.assert_no_unexpected();
}

/// A Node with a `topology.kubernetes.io/zone` label (region `r1`).
fn zoned_node(name: &str, zone: &str) -> Value {
    let mut n = node(name);
    merge_patch(
        &mut n,
        &json!({"metadata": {"labels": {
            "topology.kubernetes.io/zone": zone,
            "topology.kubernetes.io/region": "r1",
        }}}),
    );
    n
}

/// The Nodes' zone labels reach the per-node states through the watch: a
/// `trafficDistribution: PreferSameZone` Service sends each zone its own
/// endpoints, one shared state per zone; relabelling a Node moves it.
#[tokio::test(start_paused = true)]
async fn node_zone_labels_give_one_state_per_zone() {
    let fake = FakeApi::new();
    fake.apply(service(
        "near",
        "10.96.0.30",
        json!({"spec": {"trafficDistribution": "PreferSameZone"}}),
    ));
    fake.apply(slice(
        "near-abcde",
        "near",
        "http",
        8080,
        &[
            ep("10.244.1.2", "node-a", READY),
            ep("10.244.2.3", "node-b", READY),
        ],
    ));
    fake.apply(zoned_node("node-a", "za"));
    fake.apply(zoned_node("node-b", "zb"));
    fake.apply(zoned_node("node-c", "za"));
    let mut run = Running::start(&fake, true);
    let snap = run.snapshot_after(0).await;
    let (default, nodes) = kube_mode::node_states(&snap, Timeouts::default());
    let weights = |s: &lb_api::wire::NodeState| -> Vec<u32> {
        s.state.services[0]
            .backends
            .iter()
            .map(|b| b.weight)
            .collect()
    };
    assert_eq!(weights(&default), [1, 1]);
    assert_eq!(weights(&nodes["node-a"]), [1, 0]);
    assert_eq!(weights(&nodes["node-b"]), [0, 1]);
    assert!(
        Arc::ptr_eq(&nodes["node-a"], &nodes["node-c"]),
        "one per zone"
    );

    fake.apply(zoned_node("node-c", "zb"));
    let snap = run.snapshot_after(snap.generation).await;
    let (_, nodes) = kube_mode::node_states(&snap, Timeouts::default());
    assert_eq!(weights(&nodes["node-c"]), [0, 1]);
    assert!(Arc::ptr_eq(&nodes["node-b"], &nodes["node-c"]));
}

// ---------------------------------------------------------------------------
// Tests: a backend Pod's own weight and limit (rpclb.io/weight, rpclb.io/max)
// ---------------------------------------------------------------------------

/// Pod `shop/pod-{ip}` (the fixtures' targetRef names) with `annotations`
/// and a status, as the kubelet would write it.
fn pod(ip: &str, annotations: Value, phase: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": "shop",
            "name": format!("pod-{ip}"),
            "labels": {"app": "web"},
            "annotations": annotations,
        },
        "spec": {"containers": [{"name": "web", "image": "web:1"}]},
        "status": {"phase": phase, "podIP": ip},
    })
}

/// (weight, max) of each backend of shop/web:http on node-a, in backend order.
fn web_weights(s: &ClusterSnapshot) -> Vec<(u32, Option<u32>)> {
    s.node_state("node-a").services[0]
        .backends
        .iter()
        .map(|b| (b.weight, b.max))
        .collect()
}

/// The Pods' annotations reach the backends through the Pod watch (metadata
/// only) and the endpoints' `targetRef`: a change of one re-translates and
/// publishes; a Pod update that leaves them alone does not; an invalid
/// value is one Warning Event on the Pod, and the backend keeps its default.
#[tokio::test(start_paused = true)]
async fn pod_annotations_set_a_backends_weight_and_limit() {
    let fake = FakeApi::new();
    seed_web(&fake);
    fake.apply(service(
        "web",
        "10.96.0.10",
        json!({"metadata": {"annotations": {"rpclb.io/max-per-backend": "100"}}}),
    ));
    // web's backends, in order: 10.244.1.2, 10.244.1.4 (terminating), 10.244.2.3.
    fake.apply(pod(
        "10.244.1.2",
        json!({"rpclb.io/weight": "5", "rpclb.io/max": "20"}),
        "Running",
    ));
    fake.apply(pod("10.244.2.3", json!({}), "Running"));
    let mut run = Running::start(&fake, true);
    let first = run.snapshot_after(0).await;
    assert!(
        first.cluster.problems().is_empty(),
        "{:?}",
        first.cluster.problems()
    );
    assert_eq!(
        web_weights(&first),
        [(5, Some(20)), (1, None), (1, None)],
        "pod-10.244.1.2's own weight and limit"
    );
    assert_eq!(
        first.node_state("node-a").services[0].max_per_backend,
        Some(100)
    );

    // A status update of a Pod (and a label): no new snapshot (nor a
    // recompute: watch.rs' PodFilter, unit-tested there).
    let mut p = pod(
        "10.244.1.2",
        json!({"rpclb.io/weight": "5", "rpclb.io/max": "20"}),
        "Running",
    );
    p["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    p["metadata"]["labels"]["pod-template-hash"] = json!("abc");
    fake.apply(p);
    settle().await;
    assert_eq!(run.current().unwrap().generation, first.generation);

    // The other Pod is drained by its annotation.
    fake.apply(pod(
        "10.244.2.3",
        json!({"rpclb.io/weight": "0"}),
        "Running",
    ));
    let drained = run.snapshot_after(first.generation).await;
    assert_eq!(web_weights(&drained), [(5, Some(20)), (1, None), (0, None)]);

    // The Service's rpclb.io/weights entry wins over the Pod's.
    fake.apply(service(
        "web",
        "10.96.0.10",
        json!({"metadata": {"annotations": {
            "rpclb.io/max-per-backend": "100",
            "rpclb.io/weights": "10.244.1.2=2",
        }}}),
    ));
    let listed = run.snapshot_after(drained.generation).await;
    assert_eq!(web_weights(&listed), [(2, Some(20)), (1, None), (0, None)]);

    // An invalid value: one Event on the Pod; the backend keeps its
    // default (the Service's entry 2; the Service's limit, not its own).
    fake.apply(pod(
        "10.244.1.2",
        json!({"rpclb.io/weight": "5", "rpclb.io/max": "lots"}),
        "Running",
    ));
    let bad = run.snapshot_after(listed.generation).await;
    assert_eq!(web_weights(&bad), [(2, None), (1, None), (0, None)]);
    let problems = bad.cluster.problems();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].subject.to_string(), "pod shop/pod-10.244.1.2");
    fake.wait_for("an event on the pod", |i| {
        (!i.requests("events", "create").is_empty()).then_some(())
    })
    .await;
    // Recomputes for other reasons write nothing more.
    fake.apply(node("node-c"));
    run.snapshot_after(bad.generation).await;
    settle().await;
    let events = fake
        .lock()
        .objects("events")
        .into_iter()
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "InvalidAnnotation");
    assert_eq!(e["regarding"]["kind"], "Pod");
    assert_eq!(e["regarding"]["apiVersion"], "v1");
    assert_eq!(e["regarding"]["namespace"], "shop");
    assert_eq!(e["regarding"]["name"], "pod-10.244.1.2");
    let pod_uid =
        fake.lock().get("pods", "shop", "pod-10.244.1.2").unwrap()["metadata"]["uid"].clone();
    assert_eq!(e["regarding"]["uid"], pod_uid);
    assert_eq!(e["metadata"]["namespace"], "shop");
    let note = e["note"].as_str().unwrap();
    assert!(note.contains("rpclb.io/max=\"lots\""), "{note}");
    assert!(
        e["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("pod-10.244.1.2.rpclb-")
    );

    // The Pod goes (its endpoint stays until the endpoints controller
    // acts): the backend falls back to the defaults.
    fake.delete("pods", "shop", "pod-10.244.1.2");
    let gone = run
        .snapshot_where("the pod's settings gone", |s| {
            s.cluster.problems().is_empty()
        })
        .await;
    assert_eq!(web_weights(&gone), [(2, None), (1, None), (0, None)]);
    // One watch of Pods the whole time, metadata only.
    {
        let i = fake.lock();
        assert_eq!(i.requests("pods", "list").len(), 1);
        assert_eq!(i.requests("pods", "watch").len(), 1);
    }
    fake.assert_no_unexpected();
}

/// The same through core v1 Endpoints: their addresses' `targetRef` joins
/// them to the Pods.
#[tokio::test(start_paused = true)]
async fn pod_annotations_with_the_endpoints_source() {
    let fake = FakeApi::new();
    fake.apply(service("web", "10.96.0.10", json!({})));
    fake.apply(node("node-a"));
    fake.apply(json!({
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": "web", "namespace": "shop"},
        "subsets": [{
            "addresses": [
                {"ip": "10.244.1.7", "nodeName": "node-a",
                 "targetRef": {"kind": "Pod", "namespace": "shop", "name": "pod-10.244.1.7"}},
                {"ip": "10.244.1.8", "nodeName": "node-a"},
            ],
            "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
        }],
    }));
    fake.apply(pod(
        "10.244.1.7",
        json!({"rpclb.io/weight": "3"}),
        "Running",
    ));
    let mut run = Running::start_with(&fake, false, EndpointsSource::Endpoints);
    let first = run.snapshot_after(0).await;
    assert_eq!(web_weights(&first), [(3, None), (1, None)]);
    fake.apply(pod("10.244.1.7", json!({"rpclb.io/max": "1"}), "Running"));
    let second = run.snapshot_after(first.generation).await;
    assert_eq!(web_weights(&second), [(1, Some(1)), (1, None)]);
    fake.assert_no_unexpected();
}

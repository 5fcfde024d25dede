//! An in-process fake Kubernetes API server speaking the real HTTP list/watch protocol (JSON
//! lists with resourceVersion, newline-delimited watch events, bookmarks, a 410 ERROR event for
//! an expired resourceVersion) and GET of single objects, for kube-rs's real client.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{json, Value};

pub const CIPS: &str = "/apis/policy.sigstore.dev/v1beta1/clusterimagepolicies";
pub const TRUST_ROOTS: &str = "/apis/policy.sigstore.dev/v1alpha1/trustroots";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const SECRETS: &str = "/api/v1/namespaces/cosign-system/secrets";
pub const CONFIG_MAPS: &str = "/api/v1/namespaces/cosign-system/configmaps";

pub struct Collection {
    api_version: &'static str,
    kind: &'static str,
    items: BTreeMap<String, Value>,
}

pub struct State {
    pub rv: u64,
    /// Watches asking to resume from before this get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch stream.
    epoch: u64,
    collections: HashMap<&'static str, Collection>,
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// 410 Gone answers sent, and LIST requests served.
    pub gone: u64,
    pub lists: u64,
    /// PUT requests (replaces) received.
    pub puts: u64,
    /// Every path a request was made for.
    pub paths: std::collections::BTreeSet<String>,
    /// While set, every request is answered 503 (an API server restarting).
    pub down: bool,
}

type Body = BoxBody<Bytes, Infallible>;

pub struct FakeApi {
    pub state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Sender<u64>,
    port: u16,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl FakeApi {
    pub async fn start(serve_beta: bool) -> FakeApi {
        let mut collections = HashMap::new();
        let cip_path: &'static str = if serve_beta {
            CIPS
        } else {
            "/apis/policy.sigstore.dev/v1alpha1/clusterimagepolicies"
        };
        let cip_version = if serve_beta {
            "policy.sigstore.dev/v1beta1"
        } else {
            "policy.sigstore.dev/v1alpha1"
        };
        for (path, api_version, kind) in [
            (cip_path, cip_version, "ClusterImagePolicy"),
            (TRUST_ROOTS, "policy.sigstore.dev/v1alpha1", "TrustRoot"),
            (NAMESPACES, "v1", "Namespace"),
            (SECRETS, "v1", "Secret"),
            (CONFIG_MAPS, "v1", "ConfigMap"),
        ] {
            collections.insert(
                path,
                Collection {
                    api_version,
                    kind,
                    items: BTreeMap::new(),
                },
            );
        }
        let state = Arc::new(Mutex::new(State {
            rv: 100,
            compacted: 0,
            epoch: 0,
            collections,
            events: Vec::new(),
            gone: 0,
            lists: 0,
            puts: 0,
            paths: Default::default(),
            down: false,
        }));
        let (changed, _) = tokio::sync::watch::channel(0);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let fake = FakeApi {
            state,
            changed,
            port,
            tasks: Arc::default(),
        };
        let (state, changed, tasks) =
            (fake.state.clone(), fake.changed.clone(), fake.tasks.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, changed, tasks2) = (state.clone(), changed.clone(), tasks.clone());
                let conn = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (state, changed, tasks) =
                            (state.clone(), changed.clone(), tasks2.clone());
                        async move {
                            if req.method() == hyper::Method::PUT {
                                return Ok::<_, Infallible>(replace(req, state, changed).await);
                            }
                            Ok::<_, Infallible>(handle(req, state, changed, tasks))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        fake.tasks.lock().unwrap().push(accept.abort_handle());
        fake
    }

    pub fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: fake, user: u}}\ncurrent-context: c\n",
                self.port
            ),
        )
        .unwrap();
        path
    }

    /// Adds or replaces an object; `expire` also compacts history and drops open watches, so
    /// clients must relist (the watch event for this change is never delivered).
    pub fn apply_with(&self, path: &'static str, object: Value, expire: bool) {
        store(&self.state, &self.changed, path, object, expire);
    }

    /// The object at `path/name`, if any.
    pub fn get(&self, path: &'static str, name: &str) -> Option<Value> {
        let s = self.state.lock().unwrap();
        s.collections.get(path)?.items.get(name).cloned()
    }

    /// Answers 503 to everything and ends open watches (`true`), or serves again (`false`).
    pub fn set_down(&self, down: bool) {
        let mut s = self.state.lock().unwrap();
        s.down = down;
        s.epoch += 1;
        drop(s);
        self.changed.send_replace(u64::MAX - 1);
    }

    /// Serves another collection (e.g. Secrets of a workload namespace).
    pub fn add_collection(
        &self,
        path: &'static str,
        api_version: &'static str,
        kind: &'static str,
    ) {
        self.state.lock().unwrap().collections.insert(
            path,
            Collection {
                api_version,
                kind,
                items: BTreeMap::new(),
            },
        );
    }

    pub fn apply(&self, path: &'static str, object: Value) {
        self.apply_with(path, object, false)
    }

    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.state.lock().unwrap().epoch += 1;
        self.changed.send_replace(u64::MAX);
    }
}

fn store(
    state: &Mutex<State>,
    changed: &tokio::sync::watch::Sender<u64>,
    path: &'static str,
    mut object: Value,
    expire: bool,
) {
    let mut s = state.lock().unwrap();
    s.rv += 1;
    let rv = s.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    let name = object["metadata"]["name"].as_str().unwrap().to_string();
    let collection = s.collections.get_mut(path).unwrap();
    object["apiVersion"] = json!(collection.api_version);
    object["kind"] = json!(collection.kind);
    let kind = if collection.items.insert(name, object.clone()).is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    if expire {
        s.compacted = rv;
        s.epoch += 1;
        s.events.clear();
    } else {
        s.events.push((rv, path, kind, object));
    }
    drop(s);
    changed.send_replace(rv);
}

/// A PUT of one object (a replace, as `Api::replace` sends it): stored, with a watch event.
async fn replace(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Sender<u64>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Ok(bytes) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return json_response(400, &status(400, "BadRequest", "unreadable body"));
    };
    let Ok(object) = serde_json::from_slice::<Value>(&bytes) else {
        return json_response(400, &status(400, "BadRequest", "not JSON"));
    };
    let collection_path = {
        let mut s = state.lock().unwrap();
        s.puts += 1;
        let Some((parent, name)) = path.rsplit_once('/') else {
            return json_response(404, &status(404, "NotFound", "no such path"));
        };
        let Some((&p, c)) = s.collections.get_key_value(parent) else {
            return json_response(404, &status(404, "NotFound", "no such collection"));
        };
        let Some(current) = c.items.get(name) else {
            return json_response(404, &status(404, "NotFound", "not found"));
        };
        if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
            return json_response(
                409,
                &status(409, "Conflict", "the object has been modified"),
            );
        }
        p
    };
    store(&state, &changed, collection_path, object, false);
    let name = path.rsplit_once('/').map(|(_, n)| n).unwrap_or_default();
    let s = state.lock().unwrap();
    json_response(200, &s.collections[collection_path].items[name])
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

pub fn handle(
    req: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Sender<u64>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
) -> Response<Body> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // `fieldSelector=metadata.name=X` (the only field selector a client here may send).
    let only_name: Option<String> = query
        .get("fieldSelector")
        .map(|f| f.replace("%3D", "=").replace("%3d", "="))
        .and_then(|f| f.strip_prefix("metadata.name=").map(str::to_string));
    let selected = move |o: &Value| {
        only_name
            .as_deref()
            .is_none_or(|n| o["metadata"]["name"].as_str() == Some(n))
    };
    let mut s = state.lock().unwrap();
    s.paths.insert(req.uri().path().to_string());
    if s.down {
        return json_response(
            503,
            &status(503, "ServiceUnavailable", "the API server is restarting"),
        );
    }
    if let Some((parent, name)) = req.uri().path().rsplit_once('/') {
        if let Some(collection) = s.collections.get(parent) {
            // GET of one object.
            return match collection.items.get(name) {
                Some(object) => json_response(200, object),
                None => json_response(
                    404,
                    &status(
                        404,
                        "NotFound",
                        &format!("{} \"{name}\" not found", collection.kind),
                    ),
                ),
            };
        }
    }
    let Some((&path, collection)) = s.collections.get_key_value(req.uri().path()) else {
        return json_response(
            404,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    };
    if query.get("watch").map(String::as_str) != Some("true") {
        s.lists += 1;
        let Some(collection) = s.collections.get(path) else {
            unreachable!()
        };
        let items: Vec<Value> = collection
            .items
            .values()
            .filter(|o| selected(o))
            .cloned()
            .collect();
        let list = json!({
            "kind": format!("{}List", collection.kind),
            "apiVersion": collection.api_version,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        return json_response(200, &list);
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (api_version, kind) = (collection.api_version, collection.kind);
    if from < s.compacted {
        s.gone += 1;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let line = |v: Value| Ok(Frame::data(Bytes::from(format!("{v}\n"))));
    if from < s.compacted {
        let gone =
            json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")});
        let _ = tx.try_send(line(gone));
    } else {
        let epoch = s.epoch;
        let state = state.clone();
        let mut wake = changed.subscribe();
        let task = tokio::spawn(async move {
            let mut last = from;
            loop {
                let lines = {
                    let s = state.lock().unwrap();
                    if s.epoch != epoch {
                        return;
                    }
                    let mut lines: Vec<Value> = s
                        .events
                        .iter()
                        .filter(|(rv, p, _, o)| *rv > last && *p == path && selected(o))
                        .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                        .collect();
                    last = s.rv;
                    lines.push(json!({"type": "BOOKMARK", "object": {"kind": kind,
                        "apiVersion": api_version, "metadata": {"resourceVersion": s.rv.to_string()}}}));
                    lines
                };
                for l in lines {
                    if tx.send(line(l)).await.is_err() {
                        return;
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), wake.changed()).await;
            }
        });
        tasks.lock().unwrap().push(task.abort_handle());
    }
    drop(s);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

pub fn namespace(name: &str, include: bool) -> Value {
    let labels = if include {
        json!({"policy.sigstore.dev/include": "true"})
    } else {
        json!({})
    };
    json!({"metadata": {"name": name, "labels": labels}})
}

pub fn static_cip(name: &str, glob: &str, action: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"images": [{"glob": glob}], "authorities": [{"static": {"action": action}}]}})
}

//! Cluster mode against an in-process fake API server that speaks the real HTTP list/watch
//! protocol (JSON lists with resourceVersion, newline-delimited watch events, bookmarks, a 410
//! ERROR event for an expired resourceVersion), driven through kube-rs's real client.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use pullgate::decide::decide;
use pullgate::kube::{client_from_kubeconfig, ClusterSource, Error};
use pullgate::policy::eval::{decide_offline, Offline, Verdict};
use pullgate::policy::snapshot::Settings;
use pullgate::policy::source::PolicySource;
use pullgate::registry::{RegistryClient, RegistryConfig};
use serde_json::{json, Value};

const CIPS: &str = "/apis/policy.sigstore.dev/v1beta1/clusterimagepolicies";
const TRUST_ROOTS: &str = "/apis/policy.sigstore.dev/v1alpha1/trustroots";
const NAMESPACES: &str = "/api/v1/namespaces";
const SECRETS: &str = "/api/v1/namespaces/cosign-system/secrets";
const CONFIG_MAPS: &str = "/api/v1/namespaces/cosign-system/configmaps";

struct Collection {
    api_version: &'static str,
    kind: &'static str,
    items: BTreeMap<String, Value>,
}

struct State {
    rv: u64,
    /// Watches asking to resume from before this get 410 Gone.
    compacted: u64,
    /// Bumped to end every open watch stream.
    epoch: u64,
    collections: HashMap<&'static str, Collection>,
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// 410 Gone answers sent, and LIST requests served.
    gone: u64,
    lists: u64,
}

type Body = BoxBody<Bytes, Infallible>;

struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Sender<u64>,
    port: u16,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl FakeApi {
    async fn start(serve_beta: bool) -> FakeApi {
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
                        async move { Ok::<_, Infallible>(handle(req, state, changed, tasks)) }
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

    fn kubeconfig(&self, dir: &Path) -> std::path::PathBuf {
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
    fn apply_with(&self, path: &'static str, mut object: Value, expire: bool) {
        let mut s = self.state.lock().unwrap();
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
        self.changed.send_replace(rv);
    }

    fn apply(&self, path: &'static str, object: Value) {
        self.apply_with(path, object, false)
    }

    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.state.lock().unwrap().epoch += 1;
        self.changed.send_replace(u64::MAX);
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn handle(
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
    let mut s = state.lock().unwrap();
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
        let items: Vec<Value> = collection.items.values().cloned().collect();
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
                        .filter(|(rv, p, _, _)| *rv > last && *p == path)
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

fn namespace(name: &str, include: bool) -> Value {
    let labels = if include {
        json!({"policy.sigstore.dev/include": "true"})
    } else {
        json!({})
    };
    json!({"metadata": {"name": name, "labels": labels}})
}

fn static_cip(name: &str, glob: &str, action: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"images": [{"glob": glob}], "authorities": [{"static": {"action": action}}]}})
}

fn verdict(source: &ClusterSource, image: &str, namespace: &str) -> &'static str {
    match decide_offline(&source.current(), &image.parse().unwrap(), Some(namespace)) {
        Offline::Decided(d) => d.verdict.as_str(),
        Offline::NeedsSignatures { .. } => "needs-signatures",
    }
}

async fn eventually(source: &ClusterSource, image: &str, namespace: &str, want: &str) {
    for _ in 0..200 {
        if verdict(source, image, namespace) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{image} in {namespace}: still {} after 10 s, wanted {want}",
        verdict(source, image, namespace)
    );
}

const NGINX: &str = "docker.io/library/nginx:1.27";
const BUSYBOX: &str = "docker.io/library/busybox:1.36";
const QUAY: &str = "quay.io/x/y:1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_memory_disk_and_relist() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state/snapshot.json");
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(NAMESPACES, namespace("open", false));
    fake.apply(
        CIPS,
        static_cip("allow-nginx", "index.docker.io/library/nginx*", "pass"),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();

    // First boot: no snapshot on disk, fail closed until the first sync.
    let (source, problem) = ClusterSource::open(Settings::default(), Some(file.clone()));
    assert!(matches!(problem, Some(Error::NoSnapshot(_))), "{problem:?}");
    assert_eq!(verdict(&source, NGINX, "demo"), "deny");
    let before = source.freshness();
    assert!(!before.fresh && before.last_sync.is_none(), "{before:?}");
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client));
    eventually(&source, NGINX, "demo", "allow").await;
    let synced = source.freshness();
    assert!(synced.fresh, "{synced:?}");
    assert!(synced.since >= before.since && synced.last_sync.is_some());
    assert_eq!(verdict(&source, BUSYBOX, "demo"), "deny");
    assert_eq!(verdict(&source, QUAY, "open"), "allow");

    // A CIP added → the next decision changes.
    fake.apply(
        CIPS,
        static_cip("allow-busybox", "index.docker.io/library/busybox*", "pass"),
    );
    eventually(&source, BUSYBOX, "demo", "allow").await;
    fake.apply(
        CIPS,
        static_cip("allow-busybox", "index.docker.io/library/busybox*", "fail"),
    );
    eventually(&source, BUSYBOX, "demo", "deny").await;

    // A namespace label flips enforcement.
    fake.apply(NAMESPACES, namespace("open", true));
    eventually(&source, QUAY, "open", "deny").await;

    // History compacted while watching: the watch resumes with an old resourceVersion, gets
    // 410 Gone, relists, and sees the change it never got as an event.
    let lists_before = fake.state.lock().unwrap().lists;
    fake.apply_with(NAMESPACES, namespace("open", false), true);
    eventually(&source, QUAY, "open", "allow").await;
    {
        let s = fake.state.lock().unwrap();
        assert!(s.gone > 0, "a 410 Gone was sent");
        assert!(s.lists > lists_before, "clients relisted");
    }
    // And watching keeps working after the relist.
    fake.apply(NAMESPACES, namespace("open", true));
    eventually(&source, QUAY, "open", "deny").await;
    assert!(file.exists(), "snapshot persisted");

    // API server stopped → decisions continue from memory, and the snapshot is reported stale.
    fake.stop();
    let mut stale = source.freshness();
    for _ in 0..200 {
        if !stale.fresh {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stale = source.freshness();
    }
    assert!(
        !stale.fresh,
        "still fresh with the API server gone: {stale:?}"
    );
    let reason = stale.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("watch of "), "{reason}");
    assert!(stale.since >= synced.since);
    assert_eq!(verdict(&source, NGINX, "demo"), "allow");
    assert_eq!(verdict(&source, BUSYBOX, "demo"), "deny");
    assert_eq!(verdict(&source, QUAY, "open"), "deny");
    task.abort();

    // Restart with the API server down → decisions from the disk snapshot.
    let (source, problem) = ClusterSource::open(Settings::default(), Some(file.clone()));
    assert!(problem.is_none(), "{problem:?}");
    let from_disk = source.freshness();
    assert!(
        !from_disk.fresh,
        "a disk snapshot is not fresh: {from_disk:?}"
    );
    assert!(
        from_disk
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("persisted on disk"),
        "{from_disk:?}"
    );
    let source = Arc::new(source);
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let task = tokio::spawn(source.clone().run(client));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(verdict(&source, NGINX, "demo"), "allow");
    assert_eq!(verdict(&source, BUSYBOX, "demo"), "deny");
    assert_eq!(verdict(&source, QUAY, "open"), "deny");
    assert_eq!(
        verdict(&source, QUAY, "other"),
        "allow",
        "unlabelled namespace"
    );
    task.abort();

    // A corrupt snapshot file → a clear error, and fail closed.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, &text[..text.len() / 2]).unwrap();
    let (source, problem) = ClusterSource::open(Settings::default(), Some(file.clone()));
    let message = problem.expect("corrupt file reported").to_string();
    assert!(message.contains("is corrupt"), "{message}");
    assert!(message.contains("snapshot.json"), "{message}");
    assert_eq!(verdict(&source, NGINX, "demo"), "deny");
    assert_eq!(verdict(&source, QUAY, "other"), "deny");
    assert_eq!(verdict(&source, QUAY, "kube-system"), "allow", "exempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_v1alpha1() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeApi::start(false).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(
        "/apis/policy.sigstore.dev/v1alpha1/clusterimagepolicies",
        static_cip("allow-nginx", "index.docker.io/library/nginx*", "pass"),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let (source, _) = ClusterSource::open(Settings::default(), Some(dir.path().join("s.json")));
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client));
    eventually(&source, NGINX, "demo", "allow").await;
    assert_eq!(verdict(&source, BUSYBOX, "demo"), "deny");
    task.abort();
}

/// The daemon end to end: `pullgate serve --kubeconfig` in front of a real containerd, with
/// policies only from the fake API server. Only denials and unenforced pulls are checked, so no
/// registry is needed: an unenforced pull of an unreachable registry is forwarded and fails in
/// containerd, a denial never reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_in_cluster_mode() {
    const IMAGE: &str = "127.0.0.1:1/x:1";
    const DENIED: &str = "SignatureValidationFailed";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapshot.json");
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(NAMESPACES, namespace("open", false));
    fake.apply(CIPS, static_cip("deny-local", "127.0.0.1:1/**", "fail"));
    let containerd = common::Containerd::start().await;
    let empty = dir.path().join("policies");
    std::fs::create_dir_all(&empty).unwrap();
    let kubeconfig = fake.kubeconfig(dir.path()).display().to_string();
    let snapshot_file = file.display().to_string();
    let mut pg = common::Pullgate::start(
        &containerd.socket(),
        &empty,
        &[
            "--kubeconfig",
            &kubeconfig,
            "--snapshot-file",
            &snapshot_file,
        ],
    )
    .await;
    for _ in 0..200 {
        if file.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(file.exists(), "no snapshot persisted\n{}", pg.log());
    let sock = pg.socket();
    let pull = |ns: &'static str| {
        let sock = sock.clone();
        async move {
            common::pull(&sock, IMAGE, Some(ns), "p")
                .await
                .expect_err("nothing can be pulled from 127.0.0.1:1")
                .message()
                .to_string()
        }
    };
    assert!(pull("demo").await.starts_with(DENIED));
    let forwarded = pull("open").await;
    assert!(!forwarded.starts_with(DENIED), "{forwarded}");

    // /readyz: fresh once synced; /metrics counts the decisions made so far.
    let health = pg.health_url().expect("admin listener announced");
    let (code, body) = get(&format!("{health}/readyz")).await;
    assert_eq!(code, 200, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["fresh"], true, "{body}");
    assert_eq!(ready["policies"], 1, "{body}");
    assert!(ready["since"].as_str().unwrap().ends_with('Z'), "{body}");
    let (code, metrics) = get(&format!("{health}/metrics")).await;
    assert_eq!(code, 200);
    assert!(metrics.contains("pullgate_snapshot_fresh 1"), "{metrics}");
    assert!(
        metrics.contains("pullgate_snapshot_policies 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "pullgate_decisions_total{source=\"cri_pull\",verdict=\"deny\",cache=\"miss\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "pullgate_decisions_total{source=\"cri_pull\",verdict=\"allow\",cache=\"miss\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(get(&format!("{health}/livez")).await.0, 200);

    fake.apply(NAMESPACES, namespace("open", true));
    let mut last = String::new();
    for _ in 0..100 {
        last = pull("open").await;
        if last.starts_with(DENIED) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.starts_with(DENIED), "label flip not seen: {last}");

    // Restart with the API server down: the disk snapshot, not fail-closed-everything.
    fake.stop();
    pg.restart().await;
    assert!(pull("open").await.starts_with(DENIED));
    let other = pull("other").await;
    assert!(!other.starts_with(DENIED), "{other}\n{}", pg.log());

    // … and /readyz says the snapshot is stale, since when and why.
    let health = pg.health_url().expect("admin listener announced");
    let (code, body) = get(&format!("{health}/readyz")).await;
    assert_eq!(code, 503, "{body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["fresh"], false, "{body}");
    assert_eq!(ready["last_sync"], Value::Null, "{body}");
    assert!(
        ready["reason"]
            .as_str()
            .unwrap()
            .contains("persisted on disk"),
        "{body}"
    );
    let (_, metrics) = get(&format!("{health}/metrics")).await;
    assert!(metrics.contains("pullgate_snapshot_fresh 0"), "{metrics}");
    assert!(
        metrics.contains("pullgate_snapshot_last_sync_timestamp_seconds 0"),
        "{metrics}"
    );
}

/// GET over loopback: status and body.
async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let code = response.status().as_u16();
    (code, response.text().await.unwrap())
}

/// A key Secret rotated in the cluster: the old key stops verifying at the next decision, end
/// to end against a real registry with an image signed by the old key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_secret_stops_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let reg = common::Registry::start().await;
    let digest = reg.push_image("app", "v1", "rotation").await;
    let old = common::TestKey::generate(common::KeyKind::EcdsaP256);
    let new = common::TestKey::generate(common::KeyKind::EcdsaP256);
    reg.sign("app", &digest, &old).await;
    let image: pullgate::image_ref::ImageRef = reg.tag_ref("app", "v1").parse().unwrap();
    let registry = RegistryClient::new(RegistryConfig::default()).unwrap();

    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    let secret = |pem: String| {
        json!({"metadata": {"name": "k", "namespace": "cosign-system"},
               "data": {"cosign.pub": base64(pem)}})
    };
    fake.apply(SECRETS, secret(old.public_pem()));
    fake.apply(
        CIPS,
        json!({"metadata": {"name": "signed"}, "spec": {"images": [{"glob": "**"}],
               "authorities": [{"key": {"secretRef": {"name": "k"}}}]}}),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let (source, _) = ClusterSource::open(Settings::default(), Some(dir.path().join("s.json")));
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client));
    eventually(&source, NGINX, "demo", "needs-signatures").await;
    let first = source.current().fingerprint().to_string();
    let decision = decide(&source.current(), &registry, &image, Some("demo")).await;
    assert_eq!(decision.verdict, Verdict::Allow, "{decision:?}");
    assert_eq!(decision.digest.as_deref(), Some(digest.as_str()));

    fake.apply(SECRETS, secret(new.public_pem()));
    for _ in 0..200 {
        if source.current().fingerprint() != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(
        source.current().fingerprint(),
        first,
        "rotated key not seen"
    );
    assert!(source.current().problems.is_empty());
    let decision = decide(&source.current(), &registry, &image, Some("demo")).await;
    assert_eq!(decision.verdict, Verdict::Deny, "{decision:?}");
    let reason = decision.reasons.join("; ");
    assert!(
        reason.contains("signature does not verify with the authority's key"),
        "{reason}"
    );

    // Signed again with the new key: allowed again.
    reg.sign_append("app", &digest, &new).await;
    let decision = decide(&source.current(), &registry, &image, Some("demo")).await;
    assert_eq!(decision.verdict, Verdict::Allow, "{decision:?}");
    task.abort();
}

fn base64(text: String) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

//! Cluster mode against an in-process fake API server that speaks the real HTTP list/watch
//! protocol (JSON lists with resourceVersion, newline-delimited watch events, bookmarks, a 410
//! ERROR event for an expired resourceVersion), driven through kube-rs's real client.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_api::*;
use pullgate::engine::decide;
use pullgate::kube::keys::{KeyProjector, PROJECTION_NAME};
use pullgate::kube::{client_from_kubeconfig, ClusterSource, Error};
use pullgate::policy::eval::{decide_offline, Offline, Verdict};
use pullgate::policy::snapshot::Settings;
use pullgate::policy::source::PolicySource;
use pullgate::registry::{RegistryClient, RegistryConfig};
use serde_json::{json, Value};

fn verdict(source: &ClusterSource, image: &str, namespace: &str) -> &'static str {
    match decide_offline(
        &source.current(),
        &image.parse().unwrap(),
        Some(namespace),
        None,
    ) {
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
    let source = Arc::new(source.with_probe_interval(Duration::from_millis(300)));
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

    // The API server answering 503 for a while: stale, then fresh again once it answers,
    // even though nothing changed (no watch event arrives to say so).
    fake.set_down(true);
    let down = wait_freshness(&source, false).await;
    let reason = down.reason.clone().unwrap();
    assert!(
        reason.starts_with("the API server is not answering: ") || reason.starts_with("watch of "),
        "{reason}"
    );
    fake.set_down(false);
    let back = wait_freshness(&source, true).await;
    assert!(back.since >= down.since, "{back:?}");

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
    // A failing watch or the heartbeat, whichever notices first, names the cause.
    let reason = stale.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with("watch of ") || reason.starts_with("the API server is not answering: "),
        "{reason}"
    );
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

    // A namespace the snapshot does not know yet is enforced (cluster mode: the node's view
    // lags, a pod's namespace exists); once it is known unlabelled, it is not.
    let unknown = pull("other").await;
    assert!(unknown.starts_with(DENIED), "{unknown}\n{}", pg.log());
    fake.apply(NAMESPACES, namespace("other", false));
    for _ in 0..100 {
        last = pull("other").await;
        if !last.starts_with(DENIED) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!last.starts_with(DENIED), "namespace not seen: {last}");

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

/// Waits (≤ 20 s) until the source's freshness is `fresh`, and returns it.
async fn wait_freshness(source: &ClusterSource, fresh: bool) -> pullgate::health::Freshness {
    for _ in 0..400 {
        let f = source.freshness();
        if f.fresh == fresh {
            return f;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("freshness still {:?} after 20 s", source.freshness());
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
    fake.apply(CONFIG_MAPS, config_map(PROJECTION_NAME, json!({})));
    fake.apply(
        CIPS,
        json!({"metadata": {"name": "signed"}, "spec": {"images": [{"glob": "**"}],
               "authorities": [{"key": {"secretRef": {"name": "k"}}}]}}),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    // The node reads the public keys the admission shim's projector writes.
    let projector =
        tokio::spawn(KeyProjector::new(client.clone(), "cosign-system".to_string(), None).run());
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
    projector.abort();
}

/// The node never reads a Secret: a `secretRef` CIP resolves through the public keys the
/// admission shim projects into ConfigMap cosign-system/pullgate-public-keys. Until the
/// projection is there the images are denied, with the Secret named; a private key beside the
/// public one (as `cosign generate-key-pair k8s://` stores it) is counted and never copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_secret_reaches_the_node_only_as_projected_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::TestKey::generate(common::KeyKind::EcdsaP256);
    const PRIVATE_BODY: &str = "eyJrZGYiOnsibmFtZSI6InNjcnlwdCJ9fQ==";
    let private = format!(
        "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n{PRIVATE_BODY}\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n"
    );
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(
        SECRETS,
        json!({"metadata": {"name": "k", "namespace": "cosign-system"},
               "data": {"cosign.pub": base64(key.public_pem()),
                        "cosign.key": base64(private.clone()),
                        "cosign.password": base64("hunter2-password".to_string())}}),
    );
    fake.apply(CONFIG_MAPS, config_map(PROJECTION_NAME, json!({})));
    fake.apply(
        CIPS,
        json!({"metadata": {"name": "signed"}, "spec": {"images": [{"glob": "**"}],
               "authorities": [{"key": {"secretRef": {"name": "k"}}}]}}),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let file = dir.path().join("s.json");
    let (source, _) = ClusterSource::open(Settings::default(), Some(file.clone()));
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client.clone()));

    // No projection yet: fail closed, naming the Secret.
    for _ in 0..200 {
        if source.freshness().fresh {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(source.freshness().fresh);
    assert_eq!(verdict(&source, NGINX, "demo"), "deny");
    let why = reasons(&source, NGINX, "demo");
    assert!(why.contains("Secret cosign-system/k"), "{why}");

    // The shim's projector runs: the node now has the public key, and only that.
    let metrics = Arc::new(pullgate::metrics::Metrics::new());
    let projector = tokio::spawn(
        KeyProjector::new(client, "cosign-system".to_string(), Some(metrics.clone()))
            .with_resync(Duration::from_millis(300))
            .run(),
    );
    eventually(&source, NGINX, "demo", "needs-signatures").await;
    assert!(
        source.current().problems.is_empty(),
        "{:?}",
        source.current().problems
    );
    let cm = fake.get(CONFIG_MAPS, PROJECTION_NAME).unwrap();
    let text = cm.to_string();
    for leaked in [
        PRIVATE_BODY,
        "PRIVATE KEY",
        "hunter2",
        &base64(private.clone()),
    ] {
        assert!(!text.contains(leaked), "{leaked} in the projection: {text}");
    }
    let value: Value = serde_json::from_str(cm["data"]["k"].as_str().unwrap()).unwrap();
    assert_eq!(value["secret"], "cosign-system/k");
    assert_eq!(value["entries"].as_object().unwrap().len(), 1, "{value}");
    assert_eq!(value["withheldPrivate"], json!(["cosign.key"]));
    let rendered = metrics.render(source.as_ref());
    assert!(
        rendered.contains("pullgate_key_secrets_with_private_keys 1"),
        "{rendered}"
    );

    // Nor does any private material reach the node's disk (persisted after the swap).
    let mut persisted = String::new();
    for _ in 0..100 {
        persisted = std::fs::read_to_string(&file).unwrap_or_default();
        if persisted.contains("cosign.pub") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(persisted.contains("cosign.pub"), "{persisted}");
    for leaked in [PRIVATE_BODY, "PRIVATE KEY", "hunter2", "cosign.key"] {
        assert!(!persisted.contains(leaked), "{leaked} persisted");
    }

    // Someone else rewrites the projection (another key under k's name, an extra entry): the
    // projector puts back what the Secrets say at its next pass.
    let projected = cm["data"]["k"].as_str().unwrap().to_string();
    let other = common::TestKey::generate(common::KeyKind::EcdsaP256);
    let forged =
        json!({"secret": "cosign-system/k", "entries": {"cosign.pub": other.public_pem()}});
    fake.apply(
        CONFIG_MAPS,
        config_map(
            PROJECTION_NAME,
            json!({"k": forged.to_string(), "extra": forged.to_string()}),
        ),
    );
    let mut restored = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let data = fake.get(CONFIG_MAPS, PROJECTION_NAME).unwrap()["data"].clone();
        if data == json!({"k": projected}) {
            restored = true;
            break;
        }
    }
    assert!(
        restored,
        "{}",
        fake.get(CONFIG_MAPS, PROJECTION_NAME).unwrap()
    );

    task.abort();
    projector.abort();
}

/// A node alone (no projector) requests no Secret at all: the RBAC that grants it none is
/// enough for it to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_requests_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(
        CIPS,
        static_cip("allow-nginx", "index.docker.io/library/nginx*", "pass"),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let (source, _) = ClusterSource::open(Settings::default(), None);
    let source = Arc::new(source.with_probe_interval(Duration::from_millis(200)));
    let task = tokio::spawn(source.clone().run(client));
    eventually(&source, NGINX, "demo", "allow").await;
    // A few heartbeats too.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let paths = fake.state.lock().unwrap().paths.clone();
    assert!(paths.contains(CONFIG_MAPS), "{paths:?}");
    let secrets: Vec<_> = paths.iter().filter(|p| p.contains("/secrets")).collect();
    assert!(
        secrets.is_empty(),
        "the node asked for Secrets: {secrets:?}"
    );
    task.abort();
}

fn base64(text: String) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A CIP-level policy for a CIP whose one authority, `open`, is `static: pass`.
const TEAM_ALLOWS: &str =
    "package sigstore\nisCompliant {\n  input.authorityMatches.open.static == true\n}\n";
const TEAM_DENIES: &str =
    "package sigstore\nisCompliant = {\"result\": false, \"error\": \"team policy says no\"}\n";

fn cip_with_policy(name: &str, glob: &str, policy: Value) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"images": [{"glob": glob}],
                    "authorities": [{"name": "open", "static": {"action": "pass"}}],
                    "policy": policy}})
}

fn config_map(name: &str, data: Value) -> Value {
    json!({"metadata": {"name": name, "namespace": "cosign-system"}, "data": data})
}

fn reasons(source: &ClusterSource, image: &str, namespace: &str) -> String {
    match decide_offline(
        &source.current(),
        &image.parse().unwrap(),
        Some(namespace),
        None,
    ) {
        Offline::Decided(d) => d.reasons.join("; "),
        Offline::NeedsSignatures { .. } => "needs-signatures".to_string(),
    }
}

/// `configMapRef` policies in cluster mode: every ConfigMap of the controller namespace is
/// watched, the decision follows the referenced one's content, and only referenced ConfigMaps
/// (plus config-policy-controller) reach the persisted snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_map_ref_policy_follows_the_config_map() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapshot.json");
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(
        CONFIG_MAPS,
        config_map("team-policy", json!({"policy.rego": TEAM_ALLOWS})),
    );
    fake.apply(
        CONFIG_MAPS,
        config_map("unrelated", json!({"secret-ish": "not for the snapshot"})),
    );
    fake.apply(
        CONFIG_MAPS,
        config_map(
            "config-policy-controller",
            json!({"no-match-policy": "allow"}),
        ),
    );
    fake.apply(
        CIPS,
        cip_with_policy(
            "team",
            "index.docker.io/library/nginx*",
            json!({"type": "rego", "configMapRef": {"name": "team-policy", "key": "policy.rego"}}),
        ),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let (source, _) = ClusterSource::open(Settings::default(), Some(file.clone()));
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client));
    eventually(&source, NGINX, "demo", "allow").await;
    // The config ConfigMap still counts: an unmatched image is allowed (no-match-policy).
    assert_eq!(verdict(&source, QUAY, "demo"), "allow");

    // The snapshot is swapped in before it is written to disk: wait for the file.
    let mut persisted = String::new();
    for _ in 0..100 {
        persisted = std::fs::read_to_string(&file).unwrap_or_default();
        if persisted.contains("team-policy") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(persisted.contains("team-policy"), "{persisted}");
    assert!(
        persisted.contains("config-policy-controller"),
        "{persisted}"
    );
    assert!(!persisted.contains("unrelated"), "{persisted}");

    // The ConfigMap changes → the decision changes, with the policy's own message.
    fake.apply(
        CONFIG_MAPS,
        config_map("team-policy", json!({"policy.rego": TEAM_DENIES})),
    );
    eventually(&source, NGINX, "demo", "deny").await;
    let why = reasons(&source, NGINX, "demo");
    assert!(
        why.contains("failed evaluating cip level policy") && why.contains("team policy says no"),
        "{why}"
    );
    fake.apply(
        CONFIG_MAPS,
        config_map("team-policy", json!({"policy.rego": TEAM_ALLOWS})),
    );
    eventually(&source, NGINX, "demo", "allow").await;

    // The key disappears → fail closed, naming what is missing.
    fake.apply(
        CONFIG_MAPS,
        config_map("team-policy", json!({"other.rego": TEAM_ALLOWS})),
    );
    eventually(&source, NGINX, "demo", "deny").await;
    let why = reasons(&source, NGINX, "demo");
    assert!(
        why.contains("ConfigMap cosign-system/team-policy has no key \"policy.rego\""),
        "{why}"
    );
    task.abort();
}

/// A `remote` policy in cluster mode: fetched once over HTTPS (a real server trusting a test
/// CA), not again on later rebuilds, persisted with the snapshot, and used from disk after a
/// restart while its server is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_policy_fetched_once_and_persisted() {
    use common::https::{sha256_hex, HttpsServer};
    use pullgate::policy::remote::{FetchConfig, RemoteFetcher};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapshot.json");
    let server = HttpsServer::start().await;
    server.serve("/team.rego", TEAM_ALLOWS);
    let fetcher = || {
        Arc::new(RemoteFetcher::new(FetchConfig {
            extra_roots_pem: server.ca_pem().as_bytes().to_vec(),
            ..FetchConfig::default()
        }))
    };
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(
        CIPS,
        cip_with_policy(
            "team",
            "index.docker.io/library/nginx*",
            json!({"type": "rego", "remote": {"url": server.url("/team.rego"),
                                              "sha256sum": sha256_hex(TEAM_ALLOWS.as_bytes())}}),
        ),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let (source, _) = ClusterSource::open_with(Settings::default(), Some(file.clone()), fetcher());
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client.clone()));
    eventually(&source, NGINX, "demo", "allow").await;
    assert_eq!(server.requests(), 1);

    // Other changes rebuild the snapshot; the text is not fetched again.
    fake.apply(NAMESPACES, namespace("open", true));
    eventually(&source, QUAY, "open", "deny").await;
    fake.apply(NAMESPACES, namespace("open", false));
    eventually(&source, QUAY, "open", "allow").await;
    assert_eq!(verdict(&source, NGINX, "demo"), "allow");
    assert_eq!(
        server.requests(),
        1,
        "fetched once, reused by every rebuild"
    );
    let persisted = std::fs::read_to_string(&file).unwrap();
    assert!(persisted.contains("remotePolicies"), "{persisted}");

    // A CIP naming a digest the server's text does not have: that CIP fails closed, naming
    // both digests; the other keeps working.
    let wrong = sha256_hex(b"something else");
    fake.apply(
        CIPS,
        cip_with_policy(
            "wrong-digest",
            "index.docker.io/library/busybox*",
            json!({"type": "rego", "remote": {"url": server.url("/team.rego"), "sha256sum": wrong}}),
        ),
    );
    // (busybox was denied before too, by no-match-policy: wait for the reason to change.)
    let mut why = String::new();
    for _ in 0..200 {
        why = reasons(&source, BUSYBOX, "demo");
        if why.contains("wrong-digest") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(verdict(&source, BUSYBOX, "demo"), "deny");
    assert!(
        why.contains(&wrong) && why.contains(&sha256_hex(TEAM_ALLOWS.as_bytes())),
        "{why}"
    );
    assert_eq!(verdict(&source, NGINX, "demo"), "allow");
    task.abort();

    // Restart with the policy's server gone: the persisted text (checked against its digest)
    // is used, no request is made.
    server.stop();
    let before = server.requests();
    let (source, problem) =
        ClusterSource::open_with(Settings::default(), Some(file.clone()), fetcher());
    assert!(problem.is_none(), "{problem:?}");
    assert_eq!(verdict(&source, NGINX, "demo"), "allow");
    assert_eq!(verdict(&source, BUSYBOX, "demo"), "deny");
    assert_eq!(server.requests(), before);

    // A tampered persisted text is not trusted: that CIP fails closed until a fetch succeeds.
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("open.static == true", "true")).unwrap();
    let (source, problem) =
        ClusterSource::open_with(Settings::default(), Some(file.clone()), fetcher());
    assert!(problem.is_none(), "{problem:?}");
    assert_eq!(verdict(&source, NGINX, "demo"), "deny");
    let why = reasons(&source, NGINX, "demo");
    assert!(why.contains("has not been fetched"), "{why}");
}

/// A `remote` (TUF) TrustRoot in cluster mode: fetched and verified once the API server has
/// synced, used by the keyless authority naming it, and not fetched again by later rebuilds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_trust_root_is_fetched_in_cluster_mode() {
    use common::fulcio::TestFulcio;
    use common::tuf::{trusted_root_json, TufFaults, TufRepo, TufServer};
    use common::TestRekor;

    let fulcio = TestFulcio::new("cluster-tuf-fulcio");
    let rekor = TestRekor::new();
    let repo = TufRepo::new(
        &trusted_root_json(&fulcio, &rekor.public_der()),
        &TufFaults::default(),
    );
    let server = TufServer::start(&repo.repository()).await;
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    let trust_root: Value =
        serde_yaml::from_str(&repo.remote_trust_root("tuf", &server.url())).unwrap();
    fake.apply(TRUST_ROOTS, trust_root);
    fake.apply(
        CIPS,
        json!({
            "apiVersion": "policy.sigstore.dev/v1beta1",
            "kind": "ClusterImagePolicy",
            "metadata": {"name": "keyless"},
            "spec": {
                "images": [{"glob": "index.docker.io/library/nginx*"}],
                "authorities": [{"keyless": {"trustRootRef": "tuf", "identities": [{"issuer": "i", "subject": "s"}]}}],
            },
        }),
    );
    let client = client_from_kubeconfig(&fake.kubeconfig(dir.path()))
        .await
        .unwrap();
    let (source, _) = ClusterSource::open(Settings::default(), None);
    let source = Arc::new(source);
    let task = tokio::spawn(source.clone().run(client));
    // Verified trust makes the authority usable: the decision now needs the signatures
    // (without it, the authority fails closed and the image is denied offline).
    eventually(&source, NGINX, "demo", "needs-signatures").await;
    assert_eq!(server.count("/timestamp.json"), 1);
    // A later rebuild (another object changes) uses the verified trust without fetching.
    fake.apply(NAMESPACES, namespace("other", true));
    eventually(&source, NGINX, "other", "needs-signatures").await;
    assert_eq!(server.count("/timestamp.json"), 1);
    task.abort();
    fake.stop();
    server.stop();
}

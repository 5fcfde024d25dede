//! The create-time gate, end to end with real pods: containerd 1.6 + runc, a real registry,
//! `pullgate serve` in front of both CRI services. Every case tries to get a container from an
//! unverified image started in an enforced namespace by a path that never calls `PullImage`.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use k8s_cri::v1::{ContainerFilter, ContainerState};
use serde_json::Value;
use tonic::Status;

const DENIED: &str = "SignatureValidationFailed: ";
const PROD: &str = "prod";
const DEV: &str = "dev";

fn namespaces() -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {PROD}, labels: {{policy.sigstore.dev/include: \"true\"}}}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: {DEV}}}\n"
    )
}

fn key_cip(glob: &str, pem: &str) -> String {
    format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: signed-app}}\n\
         spec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities: [{{key: {{data: {}}}}}]\n",
        serde_json::to_string(pem).unwrap()
    )
}

/// Writes `name` in `dir` through a rename, so the reloader never reads half a file.
fn write_atomically(dir: &Path, name: &str, contents: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, contents).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

fn expect_refused(result: Result<String, Status>, what: &str, pg: &Pullgate) -> String {
    match result {
        Ok(id) => panic!("{what}: container {id} was created\n{}", pg.log()),
        Err(status) => {
            assert!(
                status.message().starts_with(DENIED),
                "{what}: {status:?}\n{}",
                pg.log()
            );
            status.message().to_string()
        }
    }
}

/// The containers containerd itself holds in `sandbox`.
async fn containers_in(ctd: &Containerd, sandbox: &str) -> Vec<String> {
    list_containers(
        &ctd.socket(),
        Some(ContainerFilter {
            pod_sandbox_id: sandbox.to_string(),
            ..Default::default()
        }),
    )
    .await
    .expect("ListContainers on containerd")
    .into_iter()
    .map(|c| c.metadata.map(|m| m.name).unwrap_or_default())
    .collect()
}

fn create_lines(pg: &Pullgate) -> Vec<Value> {
    fs::read_to_string(pg.audit_log_path())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["source"] == "cri-create")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_verified_content_is_created_in_enforced_namespaces() {
    let reg = Registry::start().await;
    reg.push_busybox("pause", "v1").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let signed = TestImage::busybox_with_config(|c| {
        c["config"]["Env"] = serde_json::json!(["PATH=/bin", "BUILD=signed"])
    });
    let unsigned = TestImage::busybox_with_config(|c| {
        c["config"]["Env"] = serde_json::json!(["PATH=/bin", "BUILD=unsigned"])
    });
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces()),
        (
            "cip.yaml",
            &key_cip(&format!("{}/app*", reg.addr()), &key.public_pem()),
        ),
    ]);
    let pg = Pullgate::start(
        &ctd.socket(),
        policy.path(),
        &["--node-name", "node-c", "--reload-interval-ms", "100"],
    )
    .await;
    let sock = pg.socket();
    let app = reg.tag_ref("app", "v1");

    // The attack: someone with push rights but no key pushes unsigned content as app:v1 and
    // pulls it once in an unenforced namespace (forwarded unpinned), then moves the tag back
    // to signed content.
    reg.push_test_image("app", "v1", &unsigned).await;
    let unsigned_id = pull(&sock, &app, Some(DEV), "builder")
        .await
        .unwrap_or_else(|e| panic!("pull in dev: {e}\n{}", pg.log()));
    assert_eq!(unsigned_id, unsigned.image_id());
    let signed_digest = reg.push_test_image("app", "v1", &signed).await;
    reg.sign("app", &signed_digest, &key).await;

    let pod = PodSandbox::run(&sock, "web-0", PROD, "uid-web-0")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox through pullgate: {e}\n{}", pg.log()));

    // IfNotPresent / Never: kubelet finds app:v1 on the node and creates from its ID.
    let why = expect_refused(
        pod.create_container("tag", &unsigned_id, &app).await,
        "unsigned content behind a tag now signed in the registry",
        &pg,
    );
    assert!(why.contains("no signatures found"), "{why}");
    assert!(why.contains(&format!("{}/app", reg.addr())), "{why}");
    // An image-ID reference in the pod spec.
    let why = expect_refused(
        pod.create_container("by-id", &unsigned_id, &unsigned_id)
            .await,
        "image-ID reference",
        &pg,
    );
    assert!(why.contains("no signatures found"), "{why}");
    // An older kubelet that sends no user-specified name.
    expect_refused(
        pod.create_container("no-name", &unsigned_id, "").await,
        "no user_specified_image",
        &pg,
    );
    // The pod names the signed digest, but kubelet resolved unsigned content: the node does
    // not hold this content under that digest.
    expect_refused(
        pod.create_container(
            "digest",
            &unsigned_id,
            &reg.digest_ref("app", &signed_digest),
        )
        .await,
        "signed digest named, unsigned content on the node",
        &pg,
    );
    assert!(
        containers_in(&ctd, &pod.id).await.is_empty(),
        "a refused container exists in containerd"
    );

    // The verified path: a pull in prod is pinned to the signed digest; creating from it is
    // admitted from the cached verdict, and the container runs.
    let signed_id = pull(&sock, &app, Some(PROD), "web-0")
        .await
        .unwrap_or_else(|e| panic!("verified pull: {e}\n{}", pg.log()));
    assert_eq!(signed_id, signed.image_id());
    let id = pod
        .create_container("web", &signed_id, &app)
        .await
        .unwrap_or_else(|e| panic!("verified create: {e}\n{}", pg.log()));
    start_container(&sock, &id).await.expect("StartContainer");
    wait_container_state(
        &sock,
        &id,
        ContainerState::ContainerRunning,
        Duration::from_secs(10),
    )
    .await
    .expect("running");
    assert_eq!(containers_in(&ctd, &pod.id).await, ["web"]);
    let lines = create_lines(&pg);
    let last = lines.last().expect("cri-create audit lines");
    assert_eq!(last["verdict"], "allow", "{last}");
    assert_eq!(
        last["cache_hit"], true,
        "the pull's verdict is reused: {last}"
    );
    assert_eq!(last["namespace"], PROD);
    assert_eq!(last["pod"], "web-0");
    assert_eq!(last["digest"], signed_digest.as_str());
    assert_eq!(
        lines.iter().filter(|l| l["verdict"] != "allow").count(),
        4,
        "one line per refused create: {lines:?}"
    );

    // The key is rotated out: the next create of the same content is refused.
    let new_key = TestKey::generate(KeyKind::EcdsaP256);
    write_atomically(
        policy.path(),
        "cip.yaml",
        &key_cip(&format!("{}/app*", reg.addr()), &new_key.public_pem()),
    );
    let mut refused = None;
    for attempt in 0..50 {
        match pod
            .create_container(&format!("after-rotation-{attempt}"), &signed_id, &app)
            .await
        {
            Err(status) => {
                refused = Some(status);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("rotation not applied\n{}", pg.log()));
    assert!(refused.message().starts_with(DENIED), "{refused:?}");
    assert!(
        refused.message().contains("no matching signatures")
            || refused
                .message()
                .contains("signature key validation failed"),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unenforced_and_exempt_namespaces_are_not_gated() {
    let reg = Registry::start().await;
    reg.push_busybox("pause", "v1").await;
    let unsigned = TestImage::busybox_with_config(|c| {
        c["config"]["Env"] = serde_json::json!(["PATH=/bin", "BUILD=free"])
    });
    reg.push_test_image("app", "v1", &unsigned).await;
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let policy = write_policy_dir(&[
        ("namespaces.yaml", &namespaces()),
        (
            "cip.yaml",
            &key_cip(&format!("{}/app*", reg.addr()), &key.public_pem()),
        ),
    ]);
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &[]).await;
    let sock = pg.socket();
    let app = reg.tag_ref("app", "v1");
    let id = pull(&sock, &app, Some(DEV), "p")
        .await
        .expect("pull in dev");
    for ns in [DEV, "kube-system"] {
        let pod = PodSandbox::run(&sock, "p", ns, &format!("uid-{ns}"))
            .await
            .expect("RunPodSandbox");
        pod.create_container("c", &id, &app)
            .await
            .unwrap_or_else(|e| panic!("{ns}: {e}\n{}", pg.log()));
        assert_eq!(containers_in(&ctd, &pod.id).await, ["c"]);
    }
    // Exempt namespaces get no decision at all; unenforced ones are audited as allowed.
    let lines = create_lines(&pg);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["namespace"], DEV);
    assert_eq!(lines[0]["enforced"], false);
}

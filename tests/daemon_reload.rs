//! A policy-directory reload treats an invalid ClusterImagePolicy as start-up does: it is kept
//! and denies what it covers, and the rest of the change applies. Before, any invalid CIP made
//! every later reload be refused, so removing a compromised key never took effect.

use http::{Method, StatusCode};
use pullgate::engine::decide;
use pullgate::image_ref::ImageRef;
use pullgate::metrics::{admin_reply, Metrics};
use pullgate::policy::eval::Verdict;
use pullgate::policy::snapshot::Settings;
use pullgate::policy::source::{PolicyDir, PolicySource};
use pullgate::registry::{RegistryClient, RegistryConfig};

fn cip(name: &str, glob: &str, action: &str) -> String {
    format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: {name}}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities: [{{static: {{action: {action}}}}}]\n"
    )
}

const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {policy.sigstore.dev/include: \"true\"}}\n";

async fn verdict(source: &PolicyDir, image: &str) -> (Verdict, Vec<String>) {
    // Static authorities only: no registry is reached (an attempt would give `error`).
    let registry = RegistryClient::new(RegistryConfig::default()).unwrap();
    let image = ImageRef::parse(image).unwrap();
    let d = decide(&source.current(), &registry, &image, Some("prod")).await;
    (d.verdict, d.reasons)
}

async fn body(source: &PolicyDir, metrics: &Metrics, path: &str) -> (StatusCode, String) {
    use http_body_util::BodyExt as _;
    let reply = admin_reply(&Method::GET, path, source, metrics).unwrap();
    let status = reply.status();
    let bytes = reply.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn reload_applies_the_change_and_keeps_an_invalid_policy_denying() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("ns.yaml", NAMESPACE);
    // `trusted` stands for a key authority: pass now, and "the key is removed" becomes fail.
    write(
        "trusted.yaml",
        &cip("trusted", "127.0.0.1:9/app/**", "pass"),
    );
    write("other.yaml", &cip("other", "127.0.0.1:9/other/**", "pass"));
    write("free.yaml", &cip("free", "127.0.0.1:9/free/**", "pass"));
    let (source, problems) =
        PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(
        verdict(&source, "127.0.0.1:9/app/x:1").await.0,
        Verdict::Allow
    );

    // One policy becomes invalid and, in the same change, another loses its trust.
    write(
        "other.yaml",
        &cip("other", "127.0.0.1:9/other/**", "maybe-not-valid"),
    );
    write(
        "trusted.yaml",
        &cip("trusted", "127.0.0.1:9/app/**", "fail"),
    );
    let reloaded = source.reload_if_changed().await;
    assert_eq!(reloaded, Ok(true), "the change must apply");

    let (app, reasons) = verdict(&source, "127.0.0.1:9/app/x:1").await;
    assert_eq!(
        app,
        Verdict::Deny,
        "the removed trust is in force: {reasons:?}"
    );
    let (other, reasons) = verdict(&source, "127.0.0.1:9/other/x:1").await;
    assert_eq!(
        other,
        Verdict::Deny,
        "the invalid policy denies: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("other")),
        "the reason names the invalid policy: {reasons:?}"
    );
    assert_eq!(
        verdict(&source, "127.0.0.1:9/free/x:1").await.0,
        Verdict::Allow,
        "policies the invalid one does not cover are unaffected"
    );

    // /readyz names the invalid policy; the metrics count it by name.
    let metrics = Metrics::new();
    let (status, ready) = body(&source, &metrics, "/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let invalid = ready["invalid_policies"].as_array().unwrap();
    assert_eq!(invalid.len(), 1, "{ready}");
    assert_eq!(invalid[0]["name"], "other");
    assert!(invalid[0]["problems"][0]
        .as_str()
        .unwrap()
        .contains("maybe-not-valid"));
    let (_, text) = body(&source, &metrics, "/metrics").await;
    assert!(
        text.contains("pullgate_snapshot_invalid_policies 1"),
        "{text}"
    );
    assert!(
        text.contains("pullgate_snapshot_policy_invalid{policy=\"other\"} 1"),
        "{text}"
    );

    // Fixed: the policy is valid again and no longer reported.
    write("other.yaml", &cip("other", "127.0.0.1:9/other/**", "pass"));
    assert_eq!(source.reload_if_changed().await, Ok(true));
    assert_eq!(
        verdict(&source, "127.0.0.1:9/other/x:1").await.0,
        Verdict::Allow
    );
    let (_, text) = body(&source, &metrics, "/metrics").await;
    assert!(
        text.contains("pullgate_snapshot_invalid_policies 0"),
        "{text}"
    );
    assert!(!text.contains("policy=\"other\""), "{text}");
}

#[tokio::test]
async fn an_unreadable_change_keeps_the_last_set_and_reports_stale() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, cip("p", "**", "pass")).unwrap();
    let (source, _) = PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
    let before = source.current().fingerprint().to_string();
    std::fs::write(&file, "spec: [broken\n").unwrap();
    assert!(source.reload_if_changed().await.is_err());
    assert_eq!(source.current().fingerprint(), before);
    let freshness = source.freshness();
    assert!(!freshness.fresh);
    assert!(freshness.reason.unwrap().contains("cannot be read"));
}

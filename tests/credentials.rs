//! Credentials reach only the host they were given for: explicit flags, docker config `auths`
//! and a pod's pull credential for registry A are never sent to a registry B (another
//! `host:port`), even when B asks for them or A redirects there. B is a recording server that
//! challenges every request without `Authorization`; A is the real `docker-registry` with
//! htpasswd. And a refusal cached for a caller without credentials does not hold back one
//! that has them.

mod common;
mod hostile;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use hostile::Hostile;
use pullgate::audit::{AuditLog, Source};
use pullgate::engine::{Engine, Request};
use pullgate::policy::eval::Verdict;
use pullgate::policy::load::Objects;
use pullgate::policy::snapshot::{Scope, Settings, Snapshot};
use pullgate::policy::source::Fixed;
use pullgate::registry::{Credential, RegistryClient, RegistryConfig};
use pullgate::verify::cache::VerdictCache;

/// A CIP covering `glob` whose one key authority reads signatures from `source` when given,
/// and a second authority with the same key reading them beside the image.
fn cip(glob: &str, key: &TestKey, source: Option<&str>) -> String {
    let pem = serde_json::to_string(&key.public_pem()).unwrap();
    let mut authorities = String::new();
    if let Some(source) = source {
        authorities.push_str(&format!(
            "  - key: {{data: {pem}}}\n    source: [{{oci: \"{source}\"}}]\n"
        ));
    }
    authorities.push_str(&format!("  - key: {{data: {pem}}}\n"));
    format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: signed}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n{authorities}"
    )
}

fn basic() -> Credential {
    Credential::Basic {
        username: TEST_USER.into(),
        password: TEST_PASSWORD.into(),
    }
}

fn engine(policy: &str) -> Engine {
    let mut objects = Objects::default();
    objects.load_str(policy, "test").expect("policy loads");
    let settings = Settings {
        scope: Scope::OptOut,
        exempt_namespaces: Default::default(),
        controller_namespace: "cosign-system".into(),
        enforce_unknown_namespaces: true,
    };
    Engine {
        policies: Arc::new(Fixed::new(Snapshot::build(&objects, settings))),
        registry: RegistryClient::new(RegistryConfig::default()).unwrap(),
        cache: VerdictCache::new(
            Duration::from_secs(300),
            Duration::from_secs(30),
            Duration::from_secs(5),
            100,
        ),
        audit: AuditLog::silent(),
        node: "test".into(),
    }
}

/// Fails when any request `other` recorded carried `Authorization`; also when it saw none (so
/// the check cannot pass by never asking).
fn assert_no_credentials_reached(other: &Hostile) {
    let requests = other.requests();
    assert!(!requests.is_empty(), "the other registry was never asked");
    let leaked: Vec<_> = requests
        .iter()
        .filter(|r| r.authorization.is_some())
        .collect();
    assert!(
        leaked.is_empty(),
        "credentials reached {}: {leaked:?}",
        other.addr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn explicit_credentials_never_reach_another_host() {
    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = reg.push_image("private", "v1", "seed-scoped").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &digest, &key).await;
    let other = Hostile::start().await;
    other.challenge("Basic realm=\"give me your password\"");
    let policy = cip("**", &key, Some(&format!("{}/signatures", other.addr())));
    let image = reg.tag_ref("private", "v1");

    // Flags without --auth-host: for the verified image's registry only.
    let v = verify_json(
        &[("p.yaml", &policy)],
        &image,
        &["--username", TEST_USER, "--password", TEST_PASSWORD],
    )
    .await;
    assert_no_credentials_reached(&other);
    assert_eq!(v.code, 2, "B refused us, so nothing is decided: {}", v.json);
    assert!(
        v.reasons().contains("requires a username and password"),
        "{}",
        v.reasons()
    );

    // Docker config `auths` for A only.
    use base64::Engine as _;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{TEST_USER}:{TEST_PASSWORD}"));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        format!(
            "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
            reg.addr()
        ),
    )
    .unwrap();
    verify_json(
        &[("p.yaml", &policy)],
        &image,
        &["--docker-config", config.to_str().unwrap()],
    )
    .await;
    assert_no_credentials_reached(&other);

    // --auth-host names the one host; here A, so B still gets nothing, and A's own image is
    // allowed through its second authority once B's authority reads nothing from B.
    let own = cip("**", &key, None);
    let v = verify_json(
        &[("p.yaml", &own)],
        &image,
        &[
            "--username",
            TEST_USER,
            "--password",
            TEST_PASSWORD,
            "--auth-host",
            &reg.addr(),
        ],
    )
    .await;
    assert_allowed(&v);
    // Named for another host, A does not get it either.
    let v = verify_json(
        &[("p.yaml", &own)],
        &image,
        &[
            "--username",
            TEST_USER,
            "--password",
            TEST_PASSWORD,
            "--auth-host",
            other.addr(),
        ],
    )
    .await;
    assert_eq!(v.code, 2, "{}", v.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_a_credential_without_its_host() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_pullgate_async(
        &[
            "serve",
            "--username",
            "u",
            "--password",
            "p",
            "--policy",
            dir.path().to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--auth-host"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_credential_never_reaches_a_signature_repository_on_another_host() {
    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = reg.push_image("private", "v1", "seed-pod").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &digest, &key).await;
    let other = Hostile::start().await;
    other.challenge("Basic realm=\"give me your password\"");
    let engine = engine(&cip(
        "**",
        &key,
        Some(&format!("{}/signatures", other.addr())),
    ));
    let credential = basic();
    let request = Request {
        auth: Some(&credential),
        ..Request::new(Source::CriPull, Some("default"))
    };
    let outcome = engine
        .decide(&reg.digest_ref("private", &digest), &request)
        .await;
    assert_no_credentials_reached(&other);
    assert_eq!(
        outcome.decision.verdict,
        Verdict::Error,
        "{:?}",
        outcome.decision
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_another_host_carries_no_credentials() {
    let reg = Hostile::start().await;
    let other = Hostile::start().await;
    reg.challenge("Basic realm=\"r\"");
    let digest = hostile::sha256(b"image");
    let blob = other.serve_generated("/v2/app/blobs/", 7, 100);
    reg.redirect(
        &format!("/v2/app/blobs/{blob}"),
        307,
        &format!("http://{}/v2/app/blobs/{blob}", other.addr()),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "layers": [{"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": blob, "size": 100,
                    "annotations": {SIGNATURE_ANNOTATION: "MEUCIQ"}}],
    });
    reg.serve(
        &format!("/v2/app/manifests/{}", signature_tag(&digest)),
        serde_json::to_vec(&manifest).unwrap(),
    );
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let engine = engine(&cip("**", &key, None));
    let credential = basic();
    let request = Request {
        auth: Some(&credential),
        ..Request::new(Source::CriPull, Some("default"))
    };
    let outcome = engine
        .decide(&format!("{}/app@{digest}", reg.addr()), &request)
        .await;
    // A got the credential (it is A's), followed its redirect, and B got the request bare.
    assert!(
        reg.requests().iter().any(|r| r.authorization.is_some()),
        "{:?}",
        reg.requests()
    );
    assert_no_credentials_reached(&other);
    assert_eq!(
        outcome.decision.verdict,
        Verdict::Deny,
        "{:?}",
        outcome.decision
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_for_a_caller_without_credentials_does_not_hold_back_one_with_them() {
    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = reg.push_image("private", "v1", "seed-tenants").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &digest, &key).await;
    let engine = engine(&cip("**", &key, None));
    let image = reg.digest_ref("private", &digest);

    // Tenant A has no pull secret: the private repository refuses it.
    let tenant_a = Request::new(Source::CriPull, Some("tenant-a"));
    let outcome = engine.decide(&image, &tenant_a).await;
    assert_eq!(
        outcome.decision.verdict,
        Verdict::Error,
        "{:?}",
        outcome.decision
    );
    // Tenant B has one, right after: its own decision, allowed.
    let credential = basic();
    let tenant_b = Request {
        auth: Some(&credential),
        ..Request::new(Source::CriPull, Some("tenant-b"))
    };
    let outcome = engine.decide(&image, &tenant_b).await;
    assert_eq!(
        outcome.decision.verdict,
        Verdict::Allow,
        "{:?}",
        outcome.decision
    );
    assert!(!outcome.cache_hit);
    // Tenant A asking again still gets its own refusal from the cache? No: B's allow is
    // shared (it is about the digest's signatures), so A is served it without a fetch.
    let outcome = engine.decide(&image, &tenant_a).await;
    assert_eq!(outcome.decision.verdict, Verdict::Allow);
    assert!(outcome.cache_hit);
}

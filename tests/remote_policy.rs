//! `remote` policy sources (`policy: {type: rego, remote: {url, sha256sum}}`), fetched from a
//! real HTTPS server on 127.0.0.1 whose certificate chains to a test CA, against the real local
//! registry. `pullgate verify` trusts the test CA through `SSL_CERT_FILE` (read by the system
//! root loader), as documented; the in-process cases pass the CA to the fetcher directly.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::attest::*;
use common::https::{sha256_hex, HttpsServer};
use common::*;
use serde_json::{json, Value};

/// Requires a signature from authority `team-a`.
const SIGNED_BY_A: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  count(input.authorityMatches["team-a"].signatures) > 0
}
"#;

/// Passes clean scans; says why otherwise.
const NO_CRITICALS: &str = r#"package sigstore
isCompliant[response] {
  critical := input.predicate.scanner.result.critical
  response := {
    "result": critical == 0,
    "error": sprintf("%d critical vulnerabilities", [critical]),
  }
}
"#;

fn remote(url: &str, sha: &str) -> String {
    format!("{{type: rego, remote: {{url: \"{url}\", sha256sum: \"{sha}\"}}}}")
}

/// A CIP with a key authority `team-a` and a CIP-level `policy`.
fn cip_level(glob: &str, key: &TestKey, policy: &str) -> String {
    format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: remote-cip}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: team-a\n    key: {{data: {}}}\n  policy: {policy}\n",
        serde_json::to_string(&key.public_pem()).unwrap()
    )
}

/// A CIP whose key authority needs a `vuln` attestation accepted by `policy`.
fn attested(glob: &str, key: &TestKey, policy: &str) -> String {
    format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: remote-att}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: scanner\n    key: {{data: {}}}\n    attestations:\n    - name: no-criticals\n      predicateType: vuln\n      policy: {policy}\n",
        serde_json::to_string(&key.public_pem()).unwrap()
    )
}

struct Env {
    _dir: tempfile::TempDir,
    ca_file: PathBuf,
}

impl Env {
    fn new(server: &HttpsServer) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = server.write_ca(dir.path());
        Env { _dir: dir, ca_file }
    }

    async fn verify(&self, policy: &str, image: &str) -> Verified {
        let ca = self.ca_file.to_str().unwrap();
        verify_with_env(policy, image, &[("SSL_CERT_FILE", ca)]).await
    }
}

/// `pullgate verify --output json` with `envs` set for the process.
async fn verify_with_env(policy: &str, image: &str, envs: &[(&str, &str)]) -> Verified {
    let dir = write_policy_dir(&[("cip.yaml", policy)]);
    let path = dir.path().to_str().unwrap().to_string();
    let out = run_pullgate_async(
        &["verify", "--policy", &path, "--output", "json", image],
        envs,
    )
    .await;
    Verified {
        code: out.code,
        json: serde_json::from_str(&out.stdout).unwrap_or(Value::Null),
        stderr: out.stderr,
    }
}

fn assert_verdict(v: &Verified, verdict: &str, cause: &str) {
    assert_eq!(v.verdict(), verdict, "{} {}", v.json, v.stderr);
    assert_eq!(v.code, if verdict == "allow" { 0 } else { 1 });
    assert!(
        v.reasons().contains(cause),
        "wanted {cause:?} in {}",
        v.reasons()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_policies_pass_fail_and_fail_closed() {
    let reg = Registry::start().await;
    let server = HttpsServer::start().await;
    let env = Env::new(&server);
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());

    // A signed image, with a clean scan; another with a dirty one.
    let clean = reg.push_image("clean", "v1", "remote-clean").await;
    reg.sign("clean", &clean, &key).await;
    let scan = statement(
        &clean,
        VULN,
        json!({"scanner": {"result": {"critical": 0}}}),
    );
    push_attestations(
        &reg,
        "clean",
        &att_tag(&clean),
        &[(envelope(&scan, &key), json!({"predicateType": VULN}))],
    )
    .await;
    let dirty = reg.push_image("dirty", "v1", "remote-dirty").await;
    let scan = statement(
        &dirty,
        VULN,
        json!({"scanner": {"result": {"critical": 3}}}),
    );
    push_attestations(
        &reg,
        "dirty",
        &att_tag(&dirty),
        &[(envelope(&scan, &key), json!({"predicateType": VULN}))],
    )
    .await;
    let unsigned = reg.push_image("unsigned", "v1", "remote-unsigned").await;
    let (clean, dirty) = (reg.tag_ref("clean", "v1"), reg.tag_ref("dirty", "v1"));
    let _ = unsigned;

    server.serve("/signed.rego", SIGNED_BY_A);
    server.serve("/scan.rego", NO_CRITICALS);
    let signed_sha = sha256_hex(SIGNED_BY_A.as_bytes());
    let scan_sha = sha256_hex(NO_CRITICALS.as_bytes());

    // CIP-level policy from a remote source: passes.
    let policy = cip_level(
        &glob,
        &key,
        &remote(&server.url("/signed.rego"), &signed_sha),
    );
    let v = env.verify(&policy, &clean).await;
    assert_verdict(&v, "allow", "");
    assert_eq!(server.requests(), 1);

    // Attestation policy from a remote source: passes a clean scan, denies a dirty one with
    // the policy's own message.
    let policy = attested(&glob, &key, &remote(&server.url("/scan.rego"), &scan_sha));
    assert_verdict(&env.verify(&policy, &clean).await, "allow", "");
    assert_verdict(
        &env.verify(&policy, &dirty).await,
        "deny",
        "failed evaluating rego policy for type no-criticals: policy is not compliant for query 'isCompliant = data.sigstore.isCompliant' with errors: 3 critical vulnerabilities",
    );

    // The server's text does not have the digest the CIP names: denied, naming both.
    let wrong = sha256_hex(b"another policy");
    let policy = attested(&glob, &key, &remote(&server.url("/scan.rego"), &wrong));
    let v = env.verify(&policy, &clean).await;
    assert_verdict(
        &v,
        "deny",
        &format!("the fetched body has sha256 {scan_sha}, but sha256sum is {wrong}"),
    );
    let policy = cip_level(&glob, &key, &remote(&server.url("/signed.rego"), &wrong));
    assert_verdict(
        &env.verify(&policy, &clean).await,
        "deny",
        &format!("spec.policy: remote policy {}", server.url("/signed.rego")),
    );

    // A body over the 1 MiB limit: refused, even with the right digest.
    let big = format!(
        "package sigstore\nisCompliant = true\n# {}\n",
        "x".repeat(1 << 20)
    );
    server.serve("/big.rego", big.clone());
    let policy = attested(
        &glob,
        &key,
        &remote(&server.url("/big.rego"), &sha256_hex(big.as_bytes())),
    );
    assert_verdict(
        &env.verify(&policy, &clean).await,
        "deny",
        "refused, the body is larger than the 1048576-byte limit",
    );

    // An error answer: denied with the status.
    let policy = attested(&glob, &key, &remote(&server.url("/absent.rego"), &scan_sha));
    assert_verdict(
        &env.verify(&policy, &clean).await,
        "deny",
        "the server answered HTTP 404",
    );

    // Without the test CA trusted, TLS verification fails: denied.
    let policy = attested(&glob, &key, &remote(&server.url("/scan.rego"), &scan_sha));
    let empty = env._dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let v = verify_with_env(
        &policy,
        &clean,
        &[("SSL_CERT_FILE", empty.to_str().unwrap())],
    )
    .await;
    assert_verdict(&v, "deny", "remote policy https://127.0.0.1");
    assert!(v.reasons().contains("fetch failed"), "{}", v.reasons());

    // http:// and a missing sha256sum are refused when the policy is read (no fetch).
    let before = server.requests();
    let http_url = format!("http://127.0.0.1:{}/scan.rego", server.port());
    for (policy_source, cause) in [
        (
            remote(&http_url, &scan_sha),
            "policy.remote.url: must be an https:// URL",
        ),
        (
            format!(
                "{{type: rego, remote: {{url: \"{}\"}}}}",
                server.url("/scan.rego")
            ),
            "policy.remote.sha256sum: missing sha256sum",
        ),
    ] {
        let v = env
            .verify(&attested(&glob, &key, &policy_source), &clean)
            .await;
        assert_eq!(v.code, 2, "{} {}", v.json, v.stderr);
        assert!(v.stderr.contains(cause), "wanted {cause:?} in {}", v.stderr);
    }
    assert_eq!(server.requests(), before, "refused sources are not fetched");

    // The server down: denied with the reason (fail closed).
    server.stop();
    let policy = attested(&glob, &key, &remote(&server.url("/scan.rego"), &scan_sha));
    let v = env.verify(&policy, &clean).await;
    assert_verdict(&v, "deny", "fetch failed");
    assert!(
        v.reasons()
            .contains(&format!("remote policy {}", server.url("/scan.rego"))),
        "{}",
        v.reasons()
    );
}

/// In one process (as the daemon and admission shim hold their policy directory), a remote
/// policy is fetched once and serves every decision; a failed fetch is retried by a later
/// reload and, once it succeeds, the decision follows.
#[tokio::test(flavor = "multi_thread")]
async fn fetched_once_across_decisions_and_retried_after_failure() {
    use pullgate::engine::decide;
    use pullgate::image_ref::ImageRef;
    use pullgate::policy::eval::Verdict;
    use pullgate::policy::remote::{FetchConfig, RemoteFetcher};
    use pullgate::policy::snapshot::{Scope, Settings};
    use pullgate::policy::source::PolicyDir;
    use pullgate::registry::{RegistryClient, RegistryConfig};
    use std::time::Duration;

    let reg = Registry::start().await;
    let server = HttpsServer::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let digest = reg.push_image("app", "v1", "remote-once").await;
    reg.sign("app", &digest, &key).await;
    let image = ImageRef::parse(&reg.tag_ref("app", "v1")).unwrap();
    let registry = RegistryClient::new(RegistryConfig::default()).unwrap();
    server.serve("/signed.rego", SIGNED_BY_A);
    let sha = sha256_hex(SIGNED_BY_A.as_bytes());

    let dir = write_policy_dir(&[(
        "cip.yaml",
        &cip_level(&glob, &key, &remote(&server.url("/signed.rego"), &sha)),
    )]);
    let fetcher = Arc::new(RemoteFetcher::new(FetchConfig {
        extra_roots_pem: server.ca_pem().as_bytes().to_vec(),
        retry_after: Duration::ZERO,
        ..FetchConfig::default()
    }));
    let settings = Settings {
        scope: Scope::OptOut,
        ..Settings::default()
    };
    let (source, problems) =
        PolicyDir::open_with(vec![dir.path().to_path_buf()], settings, fetcher.clone()).await;
    assert!(problems.is_empty(), "{problems:?}");
    for _ in 0..20 {
        let d = decide(&source.current(), &registry, &image, Some("default")).await;
        assert_eq!(d.verdict, Verdict::Allow, "{:?}", d.reasons);
    }
    assert_eq!(server.requests(), 1, "one fetch for twenty decisions");

    // A reload for an unrelated change reuses the fetched text.
    write_file(
        dir.path(),
        "ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    );
    assert_eq!(source.reload_if_changed().await, Ok(true));
    let d = decide(&source.current(), &registry, &image, Some("default")).await;
    assert_eq!(d.verdict, Verdict::Allow, "{:?}", d.reasons);
    assert_eq!(server.requests(), 1);
    assert_eq!(fetcher.request_count(), 1);

    // A second policy whose server answers 503: only that CIP fails closed.
    let deny_all = "package sigstore\nisCompliant = {\"result\": false, \"error\": \"frozen\"}\n";
    server.serve_status("/freeze.rego", 503, "later");
    let freeze = cip_level(
        &glob,
        &key,
        &remote(
            &server.url("/freeze.rego"),
            &sha256_hex(deny_all.as_bytes()),
        ),
    )
    .replace("remote-cip", "freeze");
    write_file(dir.path(), "freeze.yaml", &freeze);
    assert_eq!(source.reload_if_changed().await, Ok(true));
    let d = decide(&source.current(), &registry, &image, Some("default")).await;
    assert_eq!(d.verdict, Verdict::Deny);
    let why = d.reasons.join("; ");
    assert!(
        why.contains("failed policy: freeze") && why.contains("the server answered HTTP 503"),
        "{why}"
    );
    assert!(!why.contains("remote-cip"), "{why}");

    // The server recovers: the next reload (nothing changed on disk) fetches again, and the
    // policy's own answer now decides.
    server.serve("/freeze.rego", deny_all);
    assert_eq!(source.reload_if_changed().await, Ok(true));
    let d = decide(&source.current(), &registry, &image, Some("default")).await;
    assert_eq!(d.verdict, Verdict::Deny);
    let why = d.reasons.join("; ");
    assert!(
        why.contains("failed evaluating cip level policy") && why.contains("frozen"),
        "{why}"
    );
    // Once every source is fetched, nothing is re-read or fetched again.
    let fetched = server.requests();
    assert_eq!(source.reload_if_changed().await, Ok(false));
    assert_eq!(server.requests(), fetched);
}

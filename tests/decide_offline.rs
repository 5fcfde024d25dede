//! Decisions that need no registry: static authorities, modes, no-match-policy, namespace
//! scope, invalid policies. The registry client here points nowhere reachable, so any
//! attempted registry access would turn the verdict into `error` and fail these tests.

use pullgate::engine::decide;
use pullgate::image_ref::ImageRef;
use pullgate::policy::eval::Verdict;
use pullgate::policy::load::Objects;
use pullgate::policy::snapshot::{Scope, Settings, Snapshot};
use pullgate::registry::{RegistryClient, RegistryConfig};

fn snapshot(yaml: &str, settings: Settings) -> Snapshot {
    let mut objects = Objects::default();
    objects.load_str(yaml, "test").expect("fixture loads");
    Snapshot::build(&objects, settings)
}

fn cip(name: &str, glob: &str, authorities: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: {name}}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities: {authorities}\n{extra}\n"
    )
}

/// A client that is never expected to be used: every case here is decided from policy alone,
/// and an attempted lookup would surface as `Verdict::Error` (no registry runs in this test).
fn no_registry() -> RegistryClient {
    RegistryClient::new(RegistryConfig::default()).unwrap()
}

async fn verdict(snapshot: &Snapshot, image: &str, ns: Option<&str>) -> (Verdict, Vec<String>) {
    let image = ImageRef::parse(image).unwrap();
    let d = decide(snapshot, &no_registry(), &image, ns).await;
    (d.verdict, d.reasons)
}

const PASS: &str = "[{static: {action: pass}}]";
const FAIL: &str = "[{static: {action: fail, message: \"not on the list\"}}]";
const NAMESPACES: &str = "
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {policy.sigstore.dev/include: \"true\"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy, labels: {policy.sigstore.dev/exclude: \"true\"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system, labels: {policy.sigstore.dev/include: \"true\"}}
";

#[tokio::test]
async fn static_pass_allows_without_registry() {
    let s = snapshot(
        &cip("allow", "127.0.0.1:9/**", PASS, ""),
        Settings::default(),
    );
    let (v, reasons) = verdict(&s, "127.0.0.1:9/app:v1", None).await;
    assert_eq!(v, Verdict::Allow, "{reasons:?}");
}

#[tokio::test]
async fn static_fail_denies_with_its_message() {
    let s = snapshot(
        &cip("block", "127.0.0.1:9/**", FAIL, ""),
        Settings::default(),
    );
    let (v, reasons) = verdict(&s, "127.0.0.1:9/app:v1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].starts_with("failed policy: block: image 127.0.0.1:9/app:v1"),
        "{reasons:?}"
    );
    assert!(
        reasons[0].contains("disallowed by static policy: not on the list"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn every_covering_policy_must_pass() {
    let yaml =
        cip("broad", "127.0.0.1:9/**", PASS, "") + &cip("narrow", "127.0.0.1:9/app*", FAIL, "");
    let s = snapshot(&yaml, Settings::default());
    let (v, reasons) = verdict(&s, "127.0.0.1:9/app:v1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert_eq!(
        reasons.len(),
        1,
        "only the failing policy is named: {reasons:?}"
    );
    assert!(reasons[0].contains("failed policy: narrow"), "{reasons:?}");
    let (v, _) = verdict(&s, "127.0.0.1:9/other:v1", None).await;
    assert_eq!(v, Verdict::Allow);
}

#[tokio::test]
async fn any_authority_suffices() {
    let both = "[{static: {action: fail}}, {static: {action: pass}}]";
    let s = snapshot(&cip("either", "**", both, ""), Settings::default());
    assert_eq!(verdict(&s, "ghcr.io/a/b:1", None).await.0, Verdict::Allow);
}

#[tokio::test]
async fn warn_mode_allows_with_warning() {
    let s = snapshot(
        &cip("soft", "**", FAIL, "  mode: warn"),
        Settings::default(),
    );
    let (v, reasons) = verdict(&s, "ghcr.io/a/b:1", None).await;
    assert_eq!(v, Verdict::Warn);
    assert!(reasons[0].contains("failed policy: soft"), "{reasons:?}");
}

#[tokio::test]
async fn enforce_failure_beats_warn_failure() {
    let yaml = cip("soft", "**", FAIL, "  mode: warn") + &cip("hard", "**", FAIL, "");
    let s = snapshot(&yaml, Settings::default());
    let (v, reasons) = verdict(&s, "ghcr.io/a/b:1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert_eq!(reasons.len(), 2, "{reasons:?}");
}

fn no_match_config(value: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: config-policy-controller, namespace: cosign-system}}\ndata: {{no-match-policy: {value}}}\n"
    )
}

#[tokio::test]
async fn no_match_policy_deny_warn_allow() {
    let base = cip("only-ghcr", "ghcr.io/**", PASS, "");
    let image = "quay.io/x/y:1";
    let s = snapshot(&base, Settings::default());
    let (v, reasons) = verdict(&s, image, None).await;
    assert_eq!(v, Verdict::Deny, "deny is the default");
    assert_eq!(reasons, ["no matching policies: image quay.io/x/y:1"]);

    let s = snapshot(
        &(base.clone() + &no_match_config("warn")),
        Settings::default(),
    );
    let (v, reasons) = verdict(&s, image, None).await;
    assert_eq!(v, Verdict::Warn);
    assert!(reasons[0].starts_with("no matching policies"));

    let s = snapshot(
        &(base.clone() + &no_match_config("allow")),
        Settings::default(),
    );
    assert_eq!(verdict(&s, image, None).await.0, Verdict::Allow);

    // An unknown value means deny, and is reported.
    let s = snapshot(&(base + &no_match_config("maybe")), Settings::default());
    assert_eq!(verdict(&s, image, None).await.0, Verdict::Deny);
    assert_eq!(s.problems.len(), 1);
}

#[tokio::test]
async fn namespace_labels_decide_enforcement() {
    let yaml = cip("block", "**", FAIL, "") + NAMESPACES;
    let s = snapshot(&yaml, Settings::default());
    let image = "ghcr.io/a/b:1";
    assert_eq!(verdict(&s, image, Some("prod")).await.0, Verdict::Deny);
    let (v, reasons) = verdict(&s, image, Some("dev")).await;
    assert_eq!(v, Verdict::Allow);
    assert_eq!(reasons, ["namespace dev is not enforced"]);
    assert_eq!(
        verdict(&s, image, Some("unknown-ns")).await.0,
        Verdict::Allow,
        "a policy directory declares its namespaces: an undeclared one has no include label"
    );
    assert_eq!(
        verdict(&s, image, Some("kube-system")).await.0,
        Verdict::Allow,
        "kube-system is exempt by default, whatever its labels"
    );

    // Cluster mode: the snapshot holds the API server's namespaces, so one it does not know
    // only means it lags: enforced until known, never a hole.
    let cluster = Settings {
        enforce_unknown_namespaces: true,
        ..Settings::default()
    };
    let s = snapshot(&yaml, cluster);
    let (v, reasons) = verdict(&s, image, Some("created-a-moment-ago")).await;
    assert_eq!(v, Verdict::Deny, "{reasons:?}");
    assert_eq!(verdict(&s, image, Some("dev")).await.0, Verdict::Allow);
    assert_eq!(
        verdict(&s, image, Some("kube-system")).await.0,
        Verdict::Allow
    );

    let opt_out = Settings {
        scope: Scope::OptOut,
        ..Settings::default()
    };
    let s = snapshot(&yaml, opt_out.clone());
    assert_eq!(verdict(&s, image, Some("dev")).await.0, Verdict::Deny);
    assert_eq!(
        verdict(&s, image, Some("unknown-ns")).await.0,
        Verdict::Deny
    );
    assert_eq!(verdict(&s, image, Some("legacy")).await.0, Verdict::Allow);

    let no_exemptions = Settings {
        exempt_namespaces: Default::default(),
        ..Settings::default()
    };
    let s = snapshot(&yaml, no_exemptions);
    assert_eq!(
        verdict(&s, image, Some("kube-system")).await.0,
        Verdict::Deny
    );
}

#[tokio::test]
async fn invalid_policy_denies_what_it_covers() {
    let bad = cip("broken", "ghcr.io/**", "[{static: {action: maybe}}]", "")
        + &cip("fine", "**", PASS, "");
    let s = snapshot(&bad, Settings::default());
    assert_eq!(s.problems.len(), 1);
    let (v, reasons) = verdict(&s, "ghcr.io/a/b:1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert!(
        reasons[0].contains("policy is invalid: spec.authorities[0].static.action"),
        "{reasons:?}"
    );
    assert_eq!(verdict(&s, "quay.io/a/b:1", None).await.0, Verdict::Allow);
}

#[tokio::test]
async fn missing_key_secret_fails_closed() {
    let key = "[{key: {secretRef: {name: absent}}}]";
    let s = snapshot(&cip("signed", "**", key, ""), Settings::default());
    let (v, reasons) = verdict(&s, "ghcr.io/a/b:1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert!(
        reasons[0].contains("key Secret cosign-system/absent not found"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn features_not_built_fail_closed_with_a_reason() {
    let kms = "[{key: {kms: \"awskms:///arn:aws:kms:us-east-1:111122223333:alias/signer\"}}]";
    let s = snapshot(&cip("kms", "**", kms, ""), Settings::default());
    let (v, reasons) = verdict(&s, "ghcr.io/a/b:1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert!(
        reasons[0].contains(
            "a KMS key (awskms:///arn:aws:kms:us-east-1:111122223333:alias/signer) is not supported by this version of pullgate"
        ),
        "{reasons:?}"
    );
    // A keyless authority trusting a remote TUF TrustRoot that was never fetched (an offline
    // build): it fails closed, saying so.
    let tuf = "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {name: tuf}\nspec: {remote: {mirror: \"https://tuf.example.com\", root: eyJ9}}\n";
    let keyless = "[{keyless: {trustRootRef: tuf, identities: [{issuer: i, subject: s}]}}]";
    let s = snapshot(
        &(tuf.to_string() + &cip("kl", "**", keyless, "")),
        Settings::default(),
    );
    let (v, reasons) = verdict(&s, "ghcr.io/a/b:1", None).await;
    assert_eq!(v, Verdict::Deny);
    assert!(
        reasons[0]
            .contains("spec.remote (TUF https://tuf.example.com): not fetched and verified yet"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn policies_fingerprint_changes_with_policy() {
    let a = snapshot(&cip("p", "**", PASS, ""), Settings::default());
    let b = snapshot(&cip("p", "**", PASS, ""), Settings::default());
    let c = snapshot(&cip("p", "**", FAIL, ""), Settings::default());
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), c.fingerprint());
}

#[test]
fn key_secret_written_by_cosign_keeps_only_its_public_key() {
    use pullgate::policy::snapshot::Check;
    const PUB: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G2Y+2tabdTV5BcGiBIx0a9fAFwr\nkBbmLSGtks4L3qX6yYY0zufBnhC8Ur/iy55GhWP/9A/bY2LhC30M9+RYtw==\n-----END PUBLIC KEY-----\n";
    let secret = format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: k, namespace: cosign-system}}\nstringData:\n  cosign.key: \"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\\nAAAA\\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\\n\"\n  cosign.password: hunter2\n  cosign.pub: {}\n",
        serde_json::to_string(PUB).unwrap()
    );
    let yaml = secret + &cip("p", "**", "[{key: {secretRef: {name: k}}}]", "");
    let s = snapshot(&yaml, Settings::default());
    assert!(s.problems.is_empty(), "{:?}", s.problems);
    let authorities = s.policies[0].authorities.as_ref().unwrap();
    match &authorities[0].check {
        Check::Key { keys, .. } => assert_eq!(keys.len(), 1),
        other => panic!("expected a key check, got {other:?}"),
    }
}

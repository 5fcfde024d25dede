//! Signatures made by the real `cosign` CLI (built by `tests/testbed/install.sh`), verified by
//! `pullgate verify`: key-signed legacy `.sig` signatures, legacy `.att` attestations, and cosign
//! v3's Sigstore bundles (OCI 1.1 referrers; the Debian registry has no referrers API, so cosign
//! keeps them in the `sha256-<hex>` referrers tag index).
//!
//! cosign runs fully offline against the plain-HTTP loopback registry: no Rekor upload
//! (`--tlog-upload=false`), no TUF signing config (`--use-signing-config=false`), HTTP allowed
//! (`--allow-http-registry --allow-insecure-registry`). Skipped loudly when the cosign binary is
//! missing and `CI` is unset; failing in CI.

mod common;

use std::path::Path;

use common::testbed::{Cosign, COSIGN_OFFLINE_SIGN_FLAGS as OFFLINE};
use common::*;

const REGO: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  input.predicate.scanner.result.critical == 0
}
"#;

fn cip(glob: &str, authority: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: real-cosign}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: cosign\n{authority}"
    )
}

/// A key authority over the PEM public key in `pub_path`, with extra YAML lines (already indented
/// by four spaces) such as `signatureFormat` or `attestations`.
fn key_authority(pub_path: &Path, extra: &str) -> String {
    let pem = std::fs::read_to_string(pub_path).expect("cosign.pub");
    format!(
        "    key: {{data: {}}}\n{extra}",
        serde_json::to_string(&pem).unwrap()
    )
}

fn sign(cosign: &Cosign, key: &Path, image: &str, bundle: bool) {
    let key = key.to_str().unwrap();
    let format = format!("--new-bundle-format={bundle}");
    let mut args = vec!["sign", "--key", key, &format];
    args.extend_from_slice(OFFLINE);
    args.push(image);
    cosign.ok(&args);
}

/// A predicate type given as a URI: cosign puts the predicate file's JSON in the statement as is.
/// (With `--type custom` cosign wraps the file as a string: `{"Data": "<file>", "Timestamp": …}`.)
const SCAN: &str = "https://pullgate.test/attestation/scan/v1";

fn attest(cosign: &Cosign, key: &Path, image: &str, kind: &str, predicate: &Path, bundle: bool) {
    let key = key.to_str().unwrap();
    let format = format!("--new-bundle-format={bundle}");
    let predicate = predicate.to_str().unwrap();
    let mut args = vec![
        "attest",
        "--key",
        key,
        &format,
        "--type",
        kind,
        "--predicate",
        predicate,
    ];
    args.extend_from_slice(OFFLINE);
    args.push(image);
    cosign.ok(&args);
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_signature_from_real_cosign_is_verified() {
    let Some(cosign) = Cosign::find() else { return };
    eprintln!("cosign: {}", cosign.version());
    let reg = Registry::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = cosign.generate_key_pair(keys.path());
    let other_keys = tempfile::tempdir().unwrap();
    let (_, other_public) = cosign.generate_key_pair(other_keys.path());

    let digest = reg.push_image("app", "v1", "real-cosign-legacy").await;
    reg.push_image("unsigned", "v1", "real-cosign-unsigned")
        .await;
    sign(&cosign, &key, &reg.digest_ref("app", &digest), false);

    // cosign wrote the legacy tag scheme: sha256-<hex>.sig with a simple-signing layer.
    let layers = reg
        .signatures("app", &digest)
        .await
        .expect("cosign wrote no .sig manifest");
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].signed_digest().as_deref(), Some(digest.as_str()));

    let glob = format!("{}/**", reg.addr());
    let policy = cip(&glob, &key_authority(&public, ""));
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("app", "v1"), &[]).await;
    assert_allowed(&v);
    let v = verify_json(
        &[("cip.yaml", &policy)],
        &reg.digest_ref("app", &digest),
        &[],
    )
    .await;
    assert_allowed(&v);

    // The unsigned image and another key are denied.
    let v = verify_json(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("unsigned", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, "");
    let wrong = cip(&glob, &key_authority(&other_public, ""));
    let v = verify_json(&[("cip.yaml", &wrong)], &reg.tag_ref("app", "v1"), &[]).await;
    assert_denied(&v, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_attestation_from_real_cosign_is_verified() {
    let Some(cosign) = Cosign::find() else { return };
    let reg = Registry::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = cosign.generate_key_pair(keys.path());
    let clean = keys.path().join("clean.json");
    std::fs::write(&clean, r#"{"scanner":{"result":{"critical":0}}}"#).unwrap();
    let dirty = keys.path().join("dirty.json");
    std::fs::write(&dirty, r#"{"scanner":{"result":{"critical":3}}}"#).unwrap();

    let good = reg.push_image("good", "v1", "real-cosign-att-good").await;
    let bad = reg.push_image("bad", "v1", "real-cosign-att-bad").await;
    attest(
        &cosign,
        &key,
        &reg.digest_ref("good", &good),
        SCAN,
        &clean,
        false,
    );
    attest(
        &cosign,
        &key,
        &reg.digest_ref("bad", &bad),
        SCAN,
        &dirty,
        false,
    );

    let glob = format!("{}/**", reg.addr());
    let attestations = format!(
        "    attestations:\n    - name: scan\n      predicateType: {SCAN}\n      policy:\n        type: rego\n        data: {}\n",
        serde_json::to_string(REGO).unwrap()
    );
    let policy = cip(&glob, &key_authority(&public, &attestations));
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("good", "v1"), &[]).await;
    assert_allowed(&v);
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("bad", "v1"), &[]).await;
    assert_denied(&v, "");

    // cosign's short name `custom` (appended as a second .att layer) is matched by the CIP's
    // `custom`; a predicate type nobody attested is not satisfied.
    let custom = keys.path().join("custom.txt");
    std::fs::write(&custom, "built by the release pipeline").unwrap();
    attest(
        &cosign,
        &key,
        &reg.digest_ref("good", &good),
        "custom",
        &custom,
        false,
    );
    let short =
        |name: &str| format!("    attestations:\n    - name: a\n      predicateType: {name}\n");
    let policy = cip(&glob, &key_authority(&public, &short("custom")));
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("good", "v1"), &[]).await;
    assert_allowed(&v);
    let policy = cip(&glob, &key_authority(&public, &short("vuln")));
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("good", "v1"), &[]).await;
    assert_denied(&v, "");
    let policy = cip(&glob, &key_authority(&public, &short("custom")));
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("bad", "v1"), &[]).await;
    assert_denied(&v, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_signature_and_attestation_from_real_cosign_are_verified() {
    let Some(cosign) = Cosign::find() else { return };
    let reg = Registry::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = cosign.generate_key_pair(keys.path());
    let predicate = keys.path().join("clean.json");
    std::fs::write(&predicate, r#"{"scanner":{"result":{"critical":0}}}"#).unwrap();

    let signed = reg.push_image("signed", "v1", "real-cosign-bundle").await;
    let attested = reg
        .push_image("attested", "v1", "real-cosign-bundle-att")
        .await;
    sign(&cosign, &key, &reg.digest_ref("signed", &signed), true);
    attest(
        &cosign,
        &key,
        &reg.digest_ref("attested", &attested),
        SCAN,
        &predicate,
        true,
    );

    // No legacy .sig tag: the bundle lives in the referrers tag index.
    assert!(reg.signatures("signed", &signed).await.is_none());

    let glob = format!("{}/**", reg.addr());
    let bundle = cip(
        &glob,
        &key_authority(&public, "    signatureFormat: bundle\n"),
    );
    let v = verify_json(&[("cip.yaml", &bundle)], &reg.tag_ref("signed", "v1"), &[]).await;
    assert_allowed(&v);
    // Read as legacy, there is nothing to verify.
    let legacy = cip(&glob, &key_authority(&public, ""));
    let v = verify_json(&[("cip.yaml", &legacy)], &reg.tag_ref("signed", "v1"), &[]).await;
    assert_denied(&v, "");

    let attestations = format!(
        "    signatureFormat: bundle\n    attestations:\n    - name: scan\n      predicateType: {SCAN}\n      policy:\n        type: rego\n        data: {}\n",
        serde_json::to_string(REGO).unwrap()
    );
    let policy = cip(&glob, &key_authority(&public, &attestations));
    let v = verify_json(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("attested", "v1"),
        &[],
    )
    .await;
    assert_allowed(&v);
    // A bundle attestation is not an image signature.
    let v = verify_json(
        &[("cip.yaml", &bundle)],
        &reg.tag_ref("attested", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, "");
}

/// The other direction: cosign itself accepts what the tests' own signer (the sigstore crate)
/// writes, so the fixtures every other test verifies are real cosign signatures.
#[tokio::test(flavor = "multi_thread")]
async fn real_cosign_verifies_the_test_signer() {
    let Some(cosign) = Cosign::find() else { return };
    let reg = Registry::start().await;
    let digest = reg
        .push_image("crate", "v1", "real-cosign-crate-signed")
        .await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("crate", &digest, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("key.pub");
    std::fs::write(&public, key.public_pem()).unwrap();
    let out = cosign.ok(&[
        "verify",
        "--key",
        public.to_str().unwrap(),
        "--insecure-ignore-tlog=true",
        "--new-bundle-format=false",
        "--allow-http-registry",
        "--allow-insecure-registry",
        &reg.digest_ref("crate", &digest),
    ]);
    assert!(out.stdout.contains(&digest), "{}", out.stdout);
}

//! `pullgate verify` against a real registry (Debian `docker-registry` on 127.0.0.1) with
//! images and cosign signatures made by the sigstore crate.

mod common;

use std::collections::BTreeMap;

use common::*;

/// A ClusterImagePolicy covering `glob` with one key authority per PEM in `pems`.
fn key_cip(name: &str, glob: &str, pems: &[&str], authority_extra: &str) -> String {
    let mut authorities = String::new();
    for pem in pems {
        authorities.push_str(&format!(
            "  - key:\n      data: {}\n{authority_extra}",
            serde_json::to_string(pem).unwrap()
        ));
    }
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images:\n  - glob: \"{glob}\"\n  authorities:\n{authorities}"
    )
}

async fn verify(policy_yaml: &str, image: &str, extra: &[&str]) -> Verified {
    verify_json(&[("policy.yaml", policy_yaml)], image, extra).await
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_image_is_allowed_and_unsigned_denied() {
    let reg = Registry::start().await;
    let signed = reg.push_image("app", "signed", "seed-signed").await;
    let unsigned = reg.push_image("app", "unsigned", "seed-unsigned").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &signed, &key).await;
    let cip = key_cip(
        "signed-by-team",
        &format!("{}/app*", reg.addr()),
        &[&key.public_pem()],
        "",
    );

    let v = verify(&cip, &reg.tag_ref("app", "signed"), &[]).await;
    assert_allowed(&v);
    assert_eq!(v.json["digest"], signed.as_str());
    let authority = &v.json["policies"][0]["authorities"][0];
    assert_eq!(authority["passed"], true);
    assert_eq!(authority["evidence"]["key"].as_str().unwrap().len(), 64);

    let v = verify(&cip, &reg.tag_ref("app", "unsigned"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    let reason = v.reasons();
    assert!(reason.contains("failed policy: signed-by-team"), "{reason}");
    assert!(
        reason.contains(&format!(
            "signature key validation failed for authority authority-0 for {}/app@{unsigned}: no signatures found",
            reg.addr()
        )),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn text_output_names_verdict_policy_and_authority() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-text").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let cip = key_cip(
        "signed",
        &format!("{}/**", reg.addr()),
        &[&key.public_pem()],
        "",
    );
    let dir = write_policy_dir(&[("p.yaml", &cip)]);
    let image = reg.tag_ref("app", "v1");
    let out = run_pullgate_async(
        &["verify", "--policy", dir.path().to_str().unwrap(), &image],
        &[],
    )
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stdout.starts_with(&format!("DENY: {image} ({digest})")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("policy signed [enforce]: fail"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("authority authority-0: fail: signature key validation failed"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_key_is_denied() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-wrong-key").await;
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let other = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &signer).await;
    let cip = key_cip("p", "**", &[&other.public_pem()], "");
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"));
    assert!(
        v.reasons()
            .contains("no matching signatures: signature does not verify with the authority's key"),
        "{}",
        v.reasons()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signature_copied_from_another_image_is_denied() {
    let reg = Registry::start().await;
    let a = reg.push_image("app", "a", "seed-a").await;
    let b = reg.push_image("app", "b", "seed-b").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let sig_a = reg.sign("app", &a, &key).await;
    // Image A's genuine signature layer, placed under image B's signature tag.
    reg.push_signature_layers("app", &signature_tag(&b), &[sig_a], false)
        .await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    let v = verify(&cip, &reg.tag_ref("app", "b"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    assert!(
        v.reasons()
            .contains(&format!("signature is for digest {a}, not {b}")),
        "{}",
        v.reasons()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn moved_tag_names_the_digest_actually_checked() {
    let reg = Registry::start().await;
    let good = reg.push_image("app", "v1", "seed-good").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &good, &key).await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    assert_eq!(verify(&cip, &reg.tag_ref("app", "v1"), &[]).await.code, 0);

    let evil = reg.push_image("app", "evil", "seed-evil").await;
    reg.tag("app", &evil, "v1").await;
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"));
    assert_eq!(
        v.json["digest"],
        evil.as_str(),
        "the verdict names the digest it checked"
    );
    assert!(v.reasons().contains(&evil), "{}", v.reasons());

    // Pinning the good digest still verifies.
    let v = verify(&cip, &reg.digest_ref("app", &good), &[]).await;
    assert_eq!(v.code, 0, "{}", v.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_policies_one_failing_denies_naming_it() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-two").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let other = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;
    let policies = key_cip("team-key", "**", &[&key.public_pem()], "")
        + &key_cip(
            "release-key",
            &format!("{}/app:*", reg.addr()),
            &[&other.public_pem()],
            "",
        );
    let v = verify(&policies, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"));
    let reasons = v.json["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0]
        .as_str()
        .unwrap()
        .starts_with("failed policy: release-key: "));
    let passed: Vec<(&str, bool)> = v.json["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["passed"].as_bool().unwrap()))
        .collect();
    assert_eq!(passed, [("release-key", false), ("team-key", true)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn warn_mode_allows_unsigned_with_a_warning() {
    let reg = Registry::start().await;
    reg.push_image("app", "v1", "seed-warn").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let cip = key_cip("p", "**", &[&key.public_pem()], "") + "  mode: warn\n";
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (0, "warn"), "{}", v.json);
    assert!(v.reasons().contains("no signatures found"));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_type_and_hash_algorithm() {
    let reg = Registry::start().await;
    let cases = [
        (KeyKind::EcdsaP256, None),
        (KeyKind::EcdsaP384, Some("sha384")),
        (KeyKind::Ed25519, None),
        (KeyKind::Rsa, None),
    ];
    for (i, (kind, hash)) in cases.into_iter().enumerate() {
        let repo = format!("kind{i}");
        let digest = reg.push_image(&repo, "v1", &format!("seed-kind-{i}")).await;
        let key = TestKey::generate(kind);
        reg.sign(&repo, &digest, &key).await;
        let extra = hash
            .map(|h| format!("      hashAlgorithm: {h}\n"))
            .unwrap_or_default();
        let cip = key_cip("p", "**", &[&key.public_pem()], "")
            .replace("  - key:\n", &format!("  - key:\n{extra}"));
        let v = verify(&cip, &reg.tag_ref(&repo, "v1"), &[]).await;
        assert_eq!(v.code, 0, "{kind:?}: {} {}", v.json, v.stderr);
    }
    // A P-384 signature made over SHA-384 does not verify when the CIP says sha256.
    let digest = reg.push_image("p384", "v1", "seed-p384").await;
    let key = TestKey::generate(KeyKind::EcdsaP384);
    reg.sign("p384", &digest, &key).await;
    let v = verify(
        &key_cip("p", "**", &[&key.public_pem()], ""),
        &reg.tag_ref("p384", "v1"),
        &[],
    )
    .await;
    assert_eq!(v.code, 1, "{}", v.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn any_key_in_a_secret_may_verify() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-secret").await;
    let old = TestKey::generate(KeyKind::EcdsaP256);
    let new = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &new).await;
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: team-keys, namespace: cosign-system}}\nstringData:\n  old.pub: {}\n  new.pub: {}\n",
        serde_json::to_string(&old.public_pem()).unwrap(),
        serde_json::to_string(&new.public_pem()).unwrap()
    );
    let cip = "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: ClusterImagePolicy\nmetadata: {name: p}\nspec:\n  images: [{glob: \"**\"}]\n  authorities: [{key: {secretRef: {name: team-keys}}}]\n";
    let v = verify(&format!("{secret}{cip}"), &reg.tag_ref("app", "v1"), &[]).await;
    assert_allowed(&v);
    // The Secret without the new key: denied.
    let only_old = secret.replace(
        &format!(
            "  new.pub: {}\n",
            serde_json::to_string(&new.public_pem()).unwrap()
        ),
        "",
    );
    let v = verify(&format!("{only_old}{cip}"), &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_in_another_repository_with_source_oci() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-source").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign_into("signatures", "app", &digest, &key).await;
    let image = reg.tag_ref("app", "v1");
    let plain = key_cip("p", "**", &[&key.public_pem()], "");
    let v = verify(&plain, &image, &[]).await;
    assert_eq!(
        v.code, 1,
        "signatures are not in the image's repository: {}",
        v.json
    );
    let with_source = key_cip(
        "p",
        "**",
        &[&key.public_pem()],
        &format!("    source:\n    - oci: {}/signatures\n", reg.addr()),
    );
    let v = verify(&with_source, &image, &[]).await;
    assert_allowed(&v);
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrored_image_and_signature_verify_in_the_mirror() {
    let reg = Registry::start().await;
    let digest = reg.push_image("upstream/app", "v1", "seed-mirror").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("upstream/app", &digest, &key).await;
    let src = reg.tag_ref("upstream/app", "v1");
    let dst = reg.tag_ref("mirror/app", "v1");
    tokio::task::spawn_blocking(move || mirror_with_signatures(&src, &dst))
        .await
        .unwrap();
    let cip = key_cip(
        "p",
        &format!("{}/mirror/**", reg.addr()),
        &[&key.public_pem()],
        "",
    );
    let v = verify(&cip, &reg.tag_ref("mirror/app", "v1"), &[]).await;
    assert_allowed(&v);
    assert_eq!(v.json["digest"], digest.as_str());
}

fn trust_root(name: &str, url: &str, rekor: &TestRekor) -> String {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(rekor.public_pem());
    format!(
        "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: {name}}}\nspec:\n  sigstoreKeys:\n    tLogs:\n    - baseURL: {url}\n      hashAlgorithm: sha-256\n      publicKey: {key}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn ctlog_requires_a_valid_rekor_bundle() {
    let reg = Registry::start().await;
    let rekor = TestRekor::new();
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let url = "https://rekor.example.test";
    let policies = trust_root("private-rekor", url, &rekor)
        + &key_cip(
            "signed-by-cicd",
            "**",
            &[&key.public_pem()],
            &format!("    ctlog:\n      url: {url}\n"),
        );

    let valid = reg.push_image("valid", "v1", "seed-rekor-valid").await;
    reg.sign_with_bundle("valid", &valid, &key, &rekor, 1_700_000_000)
        .await;
    let v = verify(&policies, &reg.tag_ref("valid", "v1"), &[]).await;
    assert_allowed(&v);
    assert_eq!(
        v.json["policies"][0]["authorities"][0]["evidence"]["tlog"]["integrated_time"],
        1_700_000_000
    );

    let missing = reg.push_image("missing", "v1", "seed-rekor-missing").await;
    reg.sign("missing", &missing, &key).await;
    let v = verify(&policies, &reg.tag_ref("missing", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
    assert!(
        v.reasons()
            .contains("ctlog is required but the signature has no Rekor bundle"),
        "{}",
        v.reasons()
    );

    let tampered = reg
        .push_image("tampered", "v1", "seed-rekor-tampered")
        .await;
    let layer = cosign_sign_layer(&reg.tag_ref("tampered", "v1"), &tampered, &key);
    let bundle = rekor.tampered_bundle_for(
        &layer.payload,
        layer.signature_b64().unwrap(),
        &key.public_pem(),
        1_700_000_000,
    );
    let layer = layer.with_annotation(BUNDLE_ANNOTATION, &bundle);
    reg.push_signature_layers("tampered", &signature_tag(&tampered), &[layer], false)
        .await;
    let v = verify(&policies, &reg.tag_ref("tampered", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
    assert!(
        v.reasons()
            .contains("signed entry timestamp does not verify"),
        "{}",
        v.reasons()
    );

    // A bundle from a log the policy does not trust.
    let stranger = TestRekor::new();
    let foreign = reg.push_image("foreign", "v1", "seed-rekor-foreign").await;
    reg.sign_with_bundle("foreign", &foreign, &key, &stranger, 1_700_000_000)
        .await;
    let v = verify(&policies, &reg.tag_ref("foreign", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
    assert!(
        v.reasons().contains("not a trusted transparency log"),
        "{}",
        v.reasons()
    );

    // Without a TrustRoot, the public-good Rekor key is used: the test log is not trusted.
    let public_good = key_cip(
        "p",
        "**",
        &[&key.public_pem()],
        "    ctlog:\n      url: https://rekor.sigstore.dev\n",
    );
    let v = verify(&public_good, &reg.tag_ref("valid", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_signature_payloads_get_clear_reasons() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-malformed").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let payload = b"this is not json";
    reg.push_signature_raw(
        "app",
        &signature_tag(&digest),
        payload,
        &key.sign_b64(payload),
        BTreeMap::new(),
    )
    .await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
    assert!(
        v.reasons()
            .contains("signed payload is not a cosign simple-signing document"),
        "{}",
        v.reasons()
    );

    let garbage_sig = "%%%not-base64";
    let payload = simple_signing_payload(&reg.tag_ref("app", "v1"), &digest);
    reg.push_signature_raw(
        "app",
        &signature_tag(&digest),
        &payload,
        garbage_sig,
        BTreeMap::new(),
    )
    .await;
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!(v.code, 1, "{}", v.json);
    assert!(
        v.reasons().contains("signature does not verify"),
        "{}",
        v.reasons()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_down_is_could_not_decide_never_allow() {
    let mut reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-down").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    reg.stop();
    for image in [reg.tag_ref("app", "v1"), reg.digest_ref("app", &digest)] {
        let v = verify(&cip, &image, &["--registry-timeout", "2"]).await;
        assert_eq!((v.code, v.verdict()), (2, "error"), "{image}: {}", v.json);
        assert!(v.reasons().contains("could not verify"), "{}", v.reasons());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_flags_and_docker_config() {
    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = reg.push_image("private", "v1", "seed-auth").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &digest, &key).await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    let image = reg.tag_ref("private", "v1");

    let v = verify(&cip, &image, &[]).await;
    assert_eq!(v.code, 2, "no credentials: could not decide: {}", v.json);
    assert!(
        v.reasons().contains("requires a username and password"),
        "{}",
        v.reasons()
    );

    let v = verify(
        &cip,
        &image,
        &["--username", TEST_USER, "--password", TEST_PASSWORD],
    )
    .await;
    assert_allowed(&v);

    use base64::Engine as _;
    let auth =
        base64::engine::general_purpose::STANDARD.encode(format!("{TEST_USER}:{TEST_PASSWORD}"));
    let config = format!(
        "{{\"auths\":{{\"{}\":{{\"auth\":\"{auth}\"}}}}}}",
        reg.addr()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, config).unwrap();
    let v = verify(&cip, &image, &["--docker-config", path.to_str().unwrap()]).await;
    assert_allowed(&v);

    let v = verify(
        &cip,
        &image,
        &["--username", TEST_USER, "--password", "wrong"],
    )
    .await;
    assert_eq!(v.code, 2, "{}", v.json);
    assert!(
        v.reasons().contains("credentials were rejected"),
        "{}",
        v.reasons()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_exits_2_with_a_clear_error() {
    let cip = key_cip("p", "**", &[], "");
    let v = verify(&cip, "UPPER/case:tag", &[]).await;
    assert_eq!(v.code, 2);
    assert!(v.stderr.contains("invalid image reference"), "{}", v.stderr);

    let v = verify("kind: [unclosed\n", "ghcr.io/a/b:1", &[]).await;
    assert_eq!(v.code, 2);
    assert!(v.stderr.contains("invalid YAML"), "{}", v.stderr);

    let bad_cip = "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: x}\nspec:\n  images: [{glob: \"**\"}]\n  authorities: [{key: {data: \"not a key\"}}]\n";
    let v = verify(bad_cip, "ghcr.io/a/b:1", &[]).await;
    assert_eq!(v.code, 2);
    assert!(
        v.stderr
            .contains("spec.authorities[0].key.data: not a PEM public key"),
        "{}",
        v.stderr
    );

    let out = run_pullgate_async(
        &["verify", "--policy", "/nonexistent/dir", "ghcr.io/a/b:1"],
        &[],
    )
    .await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("/nonexistent/dir"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn cosign_encrypted_key_files_sign_verifiable_signatures() {
    use sigstore::crypto::signing_key::SigStoreKeyPair;
    use sigstore::crypto::SigningScheme;
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-encrypted").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let encrypted = key.encrypted_private_pem("correct horse");
    assert!(
        encrypted.contains("ENCRYPTED SIGSTORE PRIVATE KEY"),
        "{encrypted}"
    );
    // Reload the key as `cosign sign --key cosign.key` would, and sign with it.
    let reloaded = SigStoreKeyPair::from_encrypted_pem(encrypted.as_bytes(), b"correct horse")
        .unwrap()
        .to_sigstore_signer(&SigningScheme::ECDSA_P256_SHA256_ASN1)
        .unwrap();
    let payload = simple_signing_payload(&reg.repo_ref("app"), &digest);
    let signature = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(reloaded.sign(&payload).unwrap())
    };
    reg.push_signature_raw(
        "app",
        &signature_tag(&digest),
        &payload,
        &signature,
        BTreeMap::new(),
    )
    .await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_allowed(&v);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_signature_blob_is_refused_not_read() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-huge").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let huge = vec![b'x'; 2 << 20];
    reg.push_signature_raw(
        "app",
        &signature_tag(&digest),
        &huge,
        &key.sign_b64(&huge),
        BTreeMap::new(),
    )
    .await;
    let cip = key_cip("p", "**", &[&key.public_pem()], "");
    let v = verify(&cip, &reg.tag_ref("app", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (2, "error"), "{}", v.json);
    assert!(
        v.reasons().contains("larger than the 1048576-byte limit"),
        "{}",
        v.reasons()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_policy_file_is_refused() {
    let big = format!("# {}\n", "x".repeat(5 << 20));
    let v = verify(&big, "ghcr.io/a/b:1", &[]).await;
    assert_eq!(v.code, 2);
    assert!(v.stderr.contains("the limit is 4194304"), "{}", v.stderr);
}

/// `credHelpers` and `credsStore` in a docker `config.json`: `docker-credential-NAME` programs on
/// `PATH` speaking the helper protocol (`get` with the server on stdin, `list`), as the docker
/// CLI runs them.
#[tokio::test(flavor = "multi_thread")]
async fn credential_helpers_from_docker_config() {
    use std::os::unix::fs::PermissionsExt as _;

    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = reg.push_image("private", "v1", "seed-helper").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &digest, &key).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy");
    std::fs::create_dir(&policy).unwrap();
    std::fs::write(
        policy.join("cip.yaml"),
        key_cip("p", "**", &[&key.public_pem()], ""),
    )
    .unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let addr = reg.addr();
    // A helper that knows this registry's password, one that knows a wrong one, and a store
    // that lists the registry. Each records the server it was asked about.
    let log = dir.path().join("asked");
    for (name, password) in [("good", TEST_PASSWORD), ("bad", "wrong")] {
        let script = format!(
            "#!/bin/sh\ncase \"$1\" in\n  get) read server; echo \"{name} $server\" >> {log}; if [ \"$server\" = \"{addr}\" ]; then printf '{{\"ServerURL\":\"%s\",\"Username\":\"{TEST_USER}\",\"Secret\":\"{password}\"}}' \"$server\"; else echo 'credentials not found in native keychain'; exit 1; fi ;;\n  list) printf '{{\"{addr}\":\"{TEST_USER}\"}}' ;;\n  *) exit 1 ;;\nesac\n",
            log = log.display()
        );
        let path = bin.join(format!("docker-credential-{name}"));
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path_env = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let run = |config: String| {
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, config).unwrap();
        let args = [
            "verify".to_string(),
            "--policy".into(),
            policy.display().to_string(),
            "--docker-config".into(),
            config_path.display().to_string(),
            "--output".into(),
            "json".into(),
            reg.tag_ref("private", "v1"),
        ];
        let path_env = path_env.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_pullgate_async(&args, &[("PATH", &path_env)]).await;
            let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
            (out.code, json)
        }
    };

    let (code, json) = run(format!("{{\"credHelpers\":{{\"{addr}\":\"good\"}}}}")).await;
    assert_eq!(
        (code, json["verdict"].as_str()),
        (0, Some("allow")),
        "{json}"
    );
    let asked = std::fs::read_to_string(&log).unwrap();
    assert_eq!(asked.trim(), format!("good {addr}"));

    // credsStore: listed, then asked.
    let (code, json) = run("{\"credsStore\":\"good\"}".to_string()).await;
    assert_eq!(
        (code, json["verdict"].as_str()),
        (0, Some("allow")),
        "{json}"
    );

    // credHelpers win over the store: the wrong password is what the registry sees.
    let (code, json) = run(format!(
        "{{\"credsStore\":\"good\",\"credHelpers\":{{\"{addr}\":\"bad\"}}}}"
    ))
    .await;
    assert_eq!(code, 2, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("credentials were rejected"),
        "{json}"
    );

    // A helper that is not installed: a warning, then anonymous access and the registry's
    // reason, not a crash.
    let (code, json) = run(format!("{{\"credHelpers\":{{\"{addr}\":\"absent\"}}}}")).await;
    assert_eq!(code, 2, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("requires a username and password"),
        "{json}"
    );
}

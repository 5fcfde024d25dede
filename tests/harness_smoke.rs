//! Checks the integration-test harness itself (`tests/common`): the registry, images,
//! cosign signatures, the test Rekor, skopeo mirroring and request counting.

mod common;

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::*;
use sha2::Digest as _;
use sigstore::cosign::bundle::SignedArtifactBundle;
use sigstore::cosign::verification_constraint::{PublicKeyVerifier, VerificationConstraint};
use sigstore::cosign::CosignCapabilities;
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::{CosignVerificationKey, Signature};
use sigstore::registry::OciReference;

#[tokio::test(flavor = "multi_thread")]
async fn images_are_reproducible_and_tags_move() {
    let reg = Registry::start().await;
    let a = reg.push_image("app", "a", "seed-a").await;
    let b = reg.push_image("app", "b", "seed-b").await;
    let a_again = reg.push_image("other", "x", "seed-a").await;
    assert!(a.starts_with("sha256:") && a.len() == 71, "{a}");
    assert_ne!(a, b, "different seeds, different digests");
    assert_eq!(a, a_again, "same seed, same digest");
    assert_eq!(a, TestImage::build("seed-a").digest);

    assert_eq!(
        reg.manifest_digest("app", "a").await.as_deref(),
        Some(a.as_str())
    );
    assert_eq!(reg.manifest_digest("app", "missing").await, None);

    // The image is a real one-layer OCI image whose config names the layer's diff ID.
    let image = TestImage::build("seed-a");
    let manifest: serde_json::Value =
        serde_json::from_slice(&reg.manifest_bytes("app", &a).await.unwrap()).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(manifest["layers"][0]["digest"], image.layer_digest.as_str());
    let config: serde_json::Value = serde_json::from_slice(&image.config).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], image.diff_id.as_str());
    assert_eq!(config["config"]["Cmd"][0], "/hello");
    let blob = reg.http("GET", &format!("/v2/app/blobs/{}", image.layer_digest), &[]);
    assert_eq!(blob.status, 200);
    assert_eq!(sha256_digest(&blob.body), image.layer_digest);

    // "The tag moved": app:a now points at b's manifest.
    reg.tag("app", &b, "a").await;
    assert_eq!(
        reg.manifest_digest("app", "a").await.as_deref(),
        Some(b.as_str())
    );

    let index = reg.push_index("app", "multi", &[(&a, "amd64")]).await;
    assert_eq!(reg.manifest_digest("app", "multi").await, Some(index));

    reg.delete_manifest("app", &b).await;
    assert_eq!(reg.manifest_digest("app", "b").await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn signature_is_cosign_shaped_and_verifies() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-sign").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;

    let tag = signature_tag(&digest);
    assert_eq!(tag, format!("sha256-{}.sig", &digest[7..]));
    assert!(
        reg.manifest_digest("app", &tag).await.is_some(),
        ".sig tag exists"
    );
    let layers = reg.signatures("app", &digest).await.expect(".sig manifest");
    assert_eq!(layers.len(), 1);
    let layer = &layers[0];
    let sig_b64 = layer.signature_b64().expect("signature annotation");

    // Signature over the layer payload, checked with sigstore from the public PEM.
    let vk = CosignVerificationKey::try_from_pem(key.public_pem().as_bytes()).unwrap();
    vk.verify_signature(Signature::Base64Encoded(sig_b64.as_bytes()), &layer.payload)
        .expect("signature verifies");
    assert!(vk
        .verify_signature(Signature::Base64Encoded(sig_b64.as_bytes()), b"other")
        .is_err());
    assert_eq!(layer.signed_digest().as_deref(), Some(digest.as_str()));
    assert_eq!(
        layer.payload_json()["critical"]["type"],
        "cosign container image signature"
    );
    // Same bytes as the cosign CLI's payload (bare `HOST/REPO` reference).
    assert_eq!(
        layer.payload,
        simple_signing_payload(&reg.repo_ref("app"), &digest)
    );

    let raw: serde_json::Value =
        serde_json::from_slice(&reg.manifest_bytes("app", &tag).await.unwrap()).unwrap();
    assert_eq!(raw["layers"][0]["mediaType"], SIMPLESIGNING_MEDIA_TYPE);

    // sigstore's own cosign client finds and accepts it.
    let mut client = reg.cosign_client(None);
    let image: OciReference = reg.tag_ref("app", "v1").parse().unwrap();
    let found = client
        .trusted_signature_layers(&reg.sigstore_auth(), &image)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let verifier = PublicKeyVerifier::try_from(key.public_pem().as_bytes()).unwrap();
    assert!(verifier.verify(&found[0]).unwrap());
    let stranger = TestKey::generate(KeyKind::EcdsaP256);
    let verifier = PublicKeyVerifier::try_from(stranger.public_pem().as_bytes()).unwrap();
    assert!(!verifier.verify(&found[0]).unwrap());
}

#[test]
fn every_key_kind_signs_and_exports_cosign_keys() {
    for kind in [
        KeyKind::EcdsaP256,
        KeyKind::EcdsaP384,
        KeyKind::EcdsaP521,
        KeyKind::Ed25519,
        KeyKind::Rsa,
    ] {
        let key = TestKey::generate(kind);
        let pem = key.public_pem();
        assert!(
            pem.starts_with("-----BEGIN PUBLIC KEY-----"),
            "{kind:?}: {pem}"
        );
        let sig = key.sign_b64(b"message");
        assert!(verify_b64(&pem, &sig, b"message"), "{kind:?} verifies");
        assert!(!verify_b64(&pem, &sig, b"massage"), "{kind:?} rejects");
        let encrypted = key.encrypted_private_pem("hunter2");
        assert!(
            encrypted.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"),
            "{kind:?}: {encrypted}"
        );
        let back = SigStoreKeyPair::from_encrypted_pem(encrypted.as_bytes(), b"hunter2")
            .unwrap_or_else(|e| panic!("{kind:?} decrypt: {e}"));
        assert_eq!(
            back.public_key_to_pem().unwrap(),
            pem,
            "{kind:?} round trip"
        );
        assert!(SigStoreKeyPair::from_encrypted_pem(encrypted.as_bytes(), b"wrong").is_err());
        assert!(key.private_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_append_and_go_to_other_repositories() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-append").await;
    let k1 = TestKey::generate(KeyKind::EcdsaP256);
    let k2 = TestKey::generate(KeyKind::Ed25519);
    reg.sign("app", &digest, &k1).await;
    reg.sign_append("app", &digest, &k2).await;
    let layers = reg.signatures("app", &digest).await.unwrap();
    assert_eq!(layers.len(), 2, "old + new layer");
    assert!(verify_b64(
        &k1.public_pem(),
        layers[0].signature_b64().unwrap(),
        &layers[0].payload
    ));
    assert!(verify_b64(
        &k2.public_pem(),
        layers[1].signature_b64().unwrap(),
        &layers[1].payload
    ));
    let found = reg
        .cosign_client(None)
        .trusted_signature_layers(
            &reg.sigstore_auth(),
            &reg.tag_ref("app", "v1").parse().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 2);

    // COSIGN_REPOSITORY: signature of app@digest stored in sigs/, payload still names app.
    let other = reg.push_image("app2", "v1", "seed-into").await;
    let signed = reg.sign_into("sigs", "app2", &other, &k1).await;
    assert!(reg.signatures("app2", &other).await.is_none());
    let stored = reg.signatures("sigs", &other).await.expect("in sigs repo");
    assert_eq!(stored, vec![signed.clone()]);
    assert_eq!(
        signed.payload_json()["critical"]["identity"]["docker-reference"]
            .as_str()
            .unwrap(),
        reg.repo_ref("app2")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_signatures_for_attack_cases() {
    let reg = Registry::start().await;
    let a = reg.push_image("app", "a", "seed-raw-a").await;
    let b = reg.push_image("app", "b", "seed-raw-b").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let sig_a = reg.sign("app", &a, &key).await;

    // (a) A's valid signature copied into B's .sig tag.
    reg.push_signature_raw(
        "app",
        &signature_tag(&b),
        &sig_a.payload,
        sig_a.signature_b64().unwrap(),
        BTreeMap::new(),
    )
    .await;
    let copied = reg.signatures("app", &b).await.unwrap();
    assert_eq!(copied, vec![sig_a.clone()]);
    // sigstore drops it: the payload names A's digest.
    let found = reg
        .cosign_client(None)
        .trusted_signature_layers(
            &reg.sigstore_auth(),
            &reg.tag_ref("app", "b").parse().unwrap(),
        )
        .await
        .unwrap_or_default();
    assert!(found.is_empty(), "copied signature must not bind to B");

    // (b)/(c) Malformed payload and wrong digest, each validly signed; (d) extra annotations.
    let wrong = simple_signing_payload(&reg.repo_ref("app"), &a);
    let bad = b"{not json".to_vec();
    let extra = BTreeMap::from([("custom".to_string(), "x".to_string())]);
    reg.push_signature_layers(
        "app",
        &signature_tag(&b),
        &[
            SigLayer::new(wrong.clone(), &key.sign_b64(&wrong)),
            SigLayer::new(bad.clone(), &key.sign_b64(&bad)).with_annotation("custom", "x"),
        ],
        false,
    )
    .await;
    let layers = reg.signatures("app", &b).await.unwrap();
    assert_eq!(layers.len(), 2);
    assert_eq!(layers[0].signed_digest().as_deref(), Some(a.as_str()));
    assert_eq!(layers[1].payload, bad);
    assert_eq!(layers[1].annotations.get("custom"), extra.get("custom"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rekor_bundles_verify_and_tampering_shows() {
    let rekor = TestRekor::new();
    let der = rekor.public_der();
    assert_eq!(rekor.log_id(), hex::encode(sha2::Sha256::digest(&der)));
    assert_eq!(rekor.log_id().len(), 64);
    assert!(rekor.public_pem().starts_with("-----BEGIN PUBLIC KEY-----"));

    let key = TestKey::generate(KeyKind::EcdsaP256);
    let payload = simple_signing_payload("127.0.0.1:1/app", &format!("sha256:{}", "ab".repeat(32)));
    let sig = key.sign_b64(&payload);
    let bundle = rekor.bundle_for(&payload, &sig, &key.public_pem(), 1_700_000_000);

    // The SET verifies over the hand-built canonical Payload.
    let v: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    let p = &v["Payload"];
    let canonical = canonical_set_payload(
        p["body"].as_str().unwrap(),
        p["integratedTime"].as_i64().unwrap(),
        p["logID"].as_str().unwrap(),
        p["logIndex"].as_i64().unwrap(),
    );
    assert!(canonical.starts_with(r#"{"body":""#) && !canonical.contains(' '));
    rekor
        .verification_key()
        .verify_signature(
            Signature::Base64Encoded(v["SignedEntryTimestamp"].as_str().unwrap().as_bytes()),
            canonical.as_bytes(),
        )
        .expect("SET verifies");
    assert_eq!(p["logID"], rekor.log_id().as_str());
    assert_eq!(p["integratedTime"], 1_700_000_000);

    // The body is the hashedrekord of this payload, signature and key.
    let body: serde_json::Value =
        serde_json::from_slice(&B64.decode(p["body"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(body["kind"], "hashedrekord");
    assert_eq!(
        body["spec"]["data"]["hash"]["value"],
        hex::encode(sha2::Sha256::digest(&payload)).as_str()
    );
    assert_eq!(body["spec"]["signature"]["content"], sig.as_str());
    assert_eq!(
        B64.decode(
            body["spec"]["signature"]["publicKey"]["content"]
                .as_str()
                .unwrap()
        )
        .unwrap(),
        key.public_pem().as_bytes()
    );

    // sigstore's own bundle check (JCS canonicalisation) agrees, and catches tampering.
    let keys = BTreeMap::from([(rekor.log_id(), rekor.verification_key())]);
    let wrap = |b: &str| {
        serde_json::json!({
            "base64Signature": sig,
            "cert": "",
            "rekorBundle": serde_json::from_str::<serde_json::Value>(b).unwrap(),
        })
        .to_string()
    };
    SignedArtifactBundle::new_verified(&wrap(&bundle), &keys).expect("sigstore accepts bundle");
    let tampered = rekor.tampered_bundle_for(&payload, &sig, &key.public_pem(), 1_700_000_000);
    assert!(SignedArtifactBundle::new_verified(&wrap(&tampered), &keys).is_err());
    let other_log = TestRekor::new();
    let foreign = other_log.bundle_for(&payload, &sig, &key.public_pem(), 1_700_000_000);
    assert!(SignedArtifactBundle::new_verified(&wrap(&foreign), &keys).is_err());

    // End to end: a bundle attached to an image signature is accepted by sigstore's client.
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-rekor").await;
    let layer = reg
        .sign_with_bundle("app", &digest, &key, &rekor, 1_700_000_123)
        .await;
    assert!(layer.bundle().is_some());
    let trust = rekor.trust_root();
    let found = reg
        .cosign_client(Some(&trust))
        .trusted_signature_layers(
            &reg.sigstore_auth(),
            &reg.tag_ref("app", "v1").parse().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let bundle = found[0]
        .bundle
        .as_ref()
        .expect("bundle verified by sigstore");
    assert_eq!(bundle.integrated_time(), 1_700_000_123);
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_mirrors_image_with_signature() {
    let src = Registry::start().await;
    let dst = Registry::start().await;
    let digest = src.push_image("app", "v1", "seed-mirror").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let signed = src.sign("app", &digest, &key).await;

    let (from, to) = (src.tag_ref("app", "v1"), dst.tag_ref("mirror/app", "v1"));
    tokio::task::spawn_blocking(move || mirror_with_signatures(&from, &to))
        .await
        .unwrap();

    assert_eq!(
        dst.manifest_digest("mirror/app", "v1").await.as_deref(),
        Some(digest.as_str()),
        "digest preserved"
    );
    assert!(
        dst.manifest_digest("mirror/app", &signature_tag(&digest))
            .await
            .is_some(),
        "sha256-<hex>.sig copied"
    );
    assert_eq!(
        dst.signatures("mirror/app", &digest).await.unwrap(),
        vec![signed]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_are_counted() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-count").await;
    let mark = reg.request_count().await;
    assert!(mark > 0, "setup requests were logged");
    assert_eq!(reg.manifest_digest("app", "v1").await, Some(digest.clone()));
    let since = reg.requests_since(mark).await;
    assert_eq!(
        since,
        vec![("HEAD".to_string(), "/v2/app/manifests/v1".to_string())]
    );

    // A full sigstore verification, counted.
    let mark = reg.request_count().await;
    let mut client = reg.cosign_client(None);
    let _ = client
        .trusted_signature_layers(
            &reg.sigstore_auth(),
            &reg.tag_ref("app", "v1").parse().unwrap(),
        )
        .await;
    let since = reg.requests_with_status_since(mark).await;
    assert!(since.len() >= 2, "{since:?}");
    assert!(
        since.iter().any(|r| r
            .uri
            .ends_with(&format!("/manifests/{}", signature_tag(&digest)))
            && r.status == 404),
        "{since:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_storage() {
    let mut reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-restart").await;
    let addr = reg.addr();
    reg.stop();
    assert!(!reg.is_running());
    reg.restart().await;
    assert!(reg.is_running());
    assert_eq!(reg.addr(), addr);
    assert_eq!(reg.manifest_digest("app", "v1").await, Some(digest));
}

#[tokio::test(flavor = "multi_thread")]
async fn htpasswd_registry_requires_credentials() {
    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    assert_eq!(reg.http_anonymous("GET", "/v2/", &[]).status, 401);
    assert_eq!(reg.http("GET", "/v2/", &[]).status, 200);
    let wrong = format!("Basic {}", B64.encode(format!("{TEST_USER}:nope")));
    assert_eq!(
        reg.http_anonymous("GET", "/v2/", &[("Authorization", &wrong)])
            .status,
        401
    );

    // Every helper authenticates.
    let digest = reg.push_image("app", "v1", "seed-auth").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;
    reg.sign_append("app", &digest, &key).await;
    assert_eq!(reg.signatures("app", &digest).await.unwrap().len(), 2);
    let found = reg
        .cosign_client(None)
        .trusted_signature_layers(
            &reg.sigstore_auth(),
            &reg.tag_ref("app", "v1").parse().unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(found.len(), 2);
}

#[test]
fn policy_dir_and_pullgate_binary() {
    let dir = write_policy_dir(&[("a.yaml", "kind: A\n"), ("nested/b.yaml", "kind: B\n")]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("nested/b.yaml")).unwrap(),
        "kind: B\n"
    );
    assert!(pullgate_bin().exists());
    let out = run_pullgate(&["--help"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(!out.stdout.is_empty());
    let out = run_pullgate(&["--no-such-flag-exists"]);
    assert_ne!(out.code, 0);
}

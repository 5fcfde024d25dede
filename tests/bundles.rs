//! `signatureFormat: bundle`: signatures and attestations in the Sigstore bundle format that
//! cosign v3 writes, attached to the image as OCI 1.1 referrers. The Debian registry has no
//! referrers API, so (as cosign does against such a registry) the referrer manifests are listed
//! in the `sha256-<hex>` referrers tag index. Envelopes are signed with the sigstore crate's
//! signer; certificates, log entries and timestamps come from the test Fulcio, Rekor and TSA.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::fulcio::{now, Leaf, TestFulcio};
use common::tsa::TestTsa;
use common::*;
use serde_json::{json, Value};
use sha2::Digest as _;

const BUNDLE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";
const SIGN: &str = "https://sigstore.dev/cosign/sign/v1";
const VULN: &str = "https://cosign.sigstore.dev/attestation/vuln/v1";
const ISSUER: &str = "https://token.actions.githubusercontent.com";
const WORKFLOW: &str = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// An in-toto v1 statement about `digest`, as cosign v3 writes them.
fn statement(digest: &str, predicate_type: &str, predicate: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"digest": {"sha256": digest.trim_start_matches("sha256:")}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }))
    .unwrap()
}

/// DER certificates of a PEM text, in order.
fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|block| {
            let body: String = block
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            B64.decode(body).unwrap()
        })
        .collect()
}

/// A DSSE envelope over `payload` signed by `key`, as a bundle's `dsseEnvelope`, and the raw
/// signature.
fn envelope(payload: &[u8], key: &TestKey) -> (Value, Vec<u8>) {
    let sig = key.sign(&dsse_pae(IN_TOTO, payload));
    let env = json!({
        "payload": B64.encode(payload),
        "payloadType": IN_TOTO,
        "signatures": [{"sig": B64.encode(&sig), "keyid": ""}],
    });
    (env, sig)
}

/// A Rekor `dsse` v0.0.1 entry for `payload` signed `sig` by `verifier_pem` (a key or a
/// certificate), with its inclusion promise, in the bundle's `tlogEntries` shape.
fn dsse_entry(
    rekor: &TestRekor,
    payload: &[u8],
    sig: &[u8],
    verifier_pem: &str,
    time: i64,
) -> Value {
    let body = json!({
        "apiVersion": "0.0.1",
        "kind": "dsse",
        "spec": {
            "envelopeHash": {"algorithm": "sha256", "value": sha256_hex(b"envelope as submitted")},
            "payloadHash": {"algorithm": "sha256", "value": sha256_hex(payload)},
            "signatures": [{"signature": B64.encode(sig), "verifier": B64.encode(verifier_pem)}],
        },
    })
    .to_string();
    let body_b64 = B64.encode(&body);
    let index = 42;
    let set = rekor.sign(canonical_set_payload(&body_b64, time, &rekor.log_id(), index).as_bytes());
    json!({
        "logIndex": index.to_string(),
        "logId": {"keyId": B64.encode(hex::decode(rekor.log_id()).unwrap())},
        "kindVersion": {"kind": "dsse", "version": "0.0.1"},
        "integratedTime": time.to_string(),
        "inclusionPromise": {"signedEntryTimestamp": B64.encode(set)},
        "canonicalizedBody": body_b64,
    })
}

/// A keyless bundle for `digest`: a fresh key certified by `fulcio` as `leaf`, the leaf alone
/// as `certificate` (as cosign v3 writes it), logged in `rekor` at `logged_at` if given.
fn keyless_bundle(
    fulcio: &TestFulcio,
    rekor: &TestRekor,
    digest: &str,
    leaf: &Leaf,
    logged_at: Option<i64>,
) -> Vec<u8> {
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, leaf);
    let stmt = statement(digest, SIGN, json!({}));
    let (env, sig) = envelope(&stmt, &signer);
    let mut material = json!({"certificate": {"rawBytes": B64.encode(&pem_ders(&cert)[0])}});
    if let Some(t) = logged_at {
        material["tlogEntries"] = json!([dsse_entry(rekor, &stmt, &sig, &cert, t)]);
    }
    bundle(env, material)
}

fn bundle(envelope: Value, material: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "mediaType": BUNDLE,
        "verificationMaterial": material,
        "dsseEnvelope": envelope,
    }))
    .unwrap()
}

/// A key-signed bundle of `statement`, no log entry (cosign v3 `--tlog-upload=false`).
fn key_bundle(statement: &[u8], key: &TestKey) -> Vec<u8> {
    let (env, _) = envelope(statement, key);
    bundle(env, json!({"publicKey": {"hint": "test"}}))
}

/// Attaches `bundles` (blob, predicate type) to `REPO@DIGEST` as cosign v3 does against a
/// registry without a referrers API: each in a referrer manifest whose subject is the image,
/// all listed in the `sha256-<hex>` referrers tag index.
async fn attach(reg: &Registry, repo: &str, digest: &str, bundles: &[(Vec<u8>, &str)]) {
    let image = reg
        .manifest_bytes(repo, digest)
        .await
        .expect("image manifest");
    let config = reg.push_blob(repo, b"{}").await;
    let mut entries = Vec::new();
    for (blob, predicate_type) in bundles {
        let layer = reg.push_blob(repo, blob).await;
        let annotations = json!({
            "dev.sigstore.bundle.content": "dsse-envelope",
            "dev.sigstore.bundle.predicateType": predicate_type,
            "org.opencontainers.image.created": "2026-11-27T00:00:00Z",
        });
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": BUNDLE,
            "config": {"mediaType": EMPTY, "digest": config, "size": 2},
            "layers": [{"mediaType": BUNDLE, "digest": layer, "size": blob.len()}],
            "subject": {"mediaType": media_type_of(&image), "digest": digest, "size": image.len()},
            "annotations": annotations,
        }))
        .unwrap();
        let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
        reg.push_manifest_bytes(repo, &manifest_digest, OCI_MANIFEST, &manifest)
            .await;
        entries.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": manifest_digest,
            "size": manifest.len(),
            "artifactType": BUNDLE,
            "annotations": annotations,
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    reg.push_manifest_bytes(repo, &digest.replace(':', "-"), OCI_INDEX, &index)
        .await;
}

fn cip(glob: &str, authority: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: v3}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: v3\n{authority}"
    )
}

fn key_authority(key: &TestKey, format: &str) -> String {
    format!(
        "    signatureFormat: {format}\n    key: {{data: {}}}\n",
        serde_json::to_string(&key.public_pem()).unwrap()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn key_signed_bundles_through_the_referrers_tag() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let other = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let policy = cip(&glob, &key_authority(&key, "bundle"));

    // Signed in the bundle format: allowed, and the evidence names the bundle's layer.
    let signed = reg.push_image("signed", "v1", "bundle-signed").await;
    let blob = key_bundle(&statement(&signed, SIGN, json!({})), &key);
    attach(&reg, "signed", &signed, &[(blob.clone(), SIGN)]).await;
    let mark = reg.request_count().await;
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("signed", "v1"), &[]).await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(
        evidence["layer_digest"],
        format!("sha256:{}", sha256_hex(&blob)),
        "{evidence}"
    );
    // The referrers API is asked first; this registry has none (404), so the tag is read.
    let paths: Vec<String> = reg
        .requests_since(mark)
        .await
        .into_iter()
        .map(|(method, path)| format!("{method} {path}"))
        .collect();
    let api = paths
        .iter()
        .position(|p| p.contains(&format!("/referrers/{signed}")));
    let tag = paths
        .iter()
        .position(|p| p.ends_with(&format!("/manifests/{}", signed.replace(':', "-"))));
    assert!(api.is_some() && tag.is_some() && api < tag, "{paths:?}");
    // HEAD the tag, the referrers API, the referrers tag, the bundle's manifest and blob.
    assert_eq!(paths.len(), 5, "{paths:?}");

    // The same image under the legacy format has no `.sig` tag: nothing found.
    let legacy = cip(&glob, &key_authority(&key, "legacy"));
    let v = verify_json(&[("cip.yaml", &legacy)], &reg.tag_ref("signed", "v1"), &[]).await;
    assert_denied(&v, "no signatures found");

    // Unsigned: no referrers at all.
    reg.push_image("unsigned", "v1", "bundle-unsigned").await;
    let v = verify_json(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("unsigned", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, "signature key validation failed for authority v3");
    assert!(
        v.reasons().contains("no signatures found"),
        "{}",
        v.reasons()
    );

    // Signed by a key the authority does not trust.
    let foreign = reg.push_image("foreign", "v1", "bundle-foreign").await;
    let blob = key_bundle(&statement(&foreign, SIGN, json!({})), &other);
    attach(&reg, "foreign", &foreign, &[(blob, SIGN)]).await;
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("foreign", "v1"), &[]).await;
    assert_denied(
        &v,
        "bundle signature does not verify with the authority's key",
    );

    // A good signature of another image, attached to this one: its statement names the other.
    let copied = reg.push_image("copied", "v1", "bundle-copied").await;
    let blob = key_bundle(&statement(&signed, SIGN, json!({})), &key);
    attach(&reg, "copied", &copied, &[(blob, SIGN)]).await;
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("copied", "v1"), &[]).await;
    assert_denied(&v, &format!("its subject does not name {copied}"));

    // An attestation is not a signature: its predicate type is reported.
    let attested = reg.push_image("attested", "v1", "bundle-attested").await;
    let blob = key_bundle(&statement(&attested, VULN, json!({})), &key);
    attach(&reg, "attested", &attested, &[(blob, VULN)]).await;
    let v = verify_json(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("attested", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, &format!("no matching signatures with type {SIGN}"));
    assert!(v.reasons().contains(VULN), "{}", v.reasons());

    // Hostile blobs: not JSON, a message signature, a tampered payload. Reasons, no crash.
    let hostile = reg.push_image("hostile", "v1", "bundle-hostile").await;
    let (mut env, _) = envelope(&statement(&hostile, SIGN, json!({})), &key);
    env["payload"] = B64
        .encode(statement(&hostile, SIGN, json!({"tampered": true})))
        .into();
    let tampered = bundle(env, json!({"publicKey": {"hint": "x"}}));
    let message = serde_json::to_vec(&json!({
        "mediaType": BUNDLE,
        "verificationMaterial": {"publicKey": {"hint": "x"}},
        "messageSignature": {"messageDigest": {"algorithm": "SHA2_256", "digest": "AA=="}, "signature": "AA=="},
    }))
    .unwrap();
    attach(
        &reg,
        "hostile",
        &hostile,
        &[
            (b"\x00not json".to_vec(), SIGN),
            (message, SIGN),
            (tampered, SIGN),
        ],
    )
    .await;
    let v = verify_json(&[("cip.yaml", &policy)], &reg.tag_ref("hostile", "v1"), &[]).await;
    assert_denied(&v, "not a Sigstore bundle");
    for cause in [
        "holds a message signature",
        "bundle signature does not verify with the authority's key",
    ] {
        assert!(
            v.reasons().contains(cause),
            "wanted {cause:?} in {}",
            v.reasons()
        );
    }

    // An unknown format is refused with the values that exist, never read as legacy.
    let typo = cip(&glob, &key_authority(&key, "bundles"));
    let v = verify_json(&[("cip.yaml", &typo)], &reg.tag_ref("signed", "v1"), &[]).await;
    assert_denied(
        &v,
        "signatureFormat \\\"bundles\\\" is not known: use legacy or bundle",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bundle_attestations_with_rego_and_ctlog() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let rekor = TestRekor::new();
    let glob = format!("{}/**", reg.addr());

    // A signature and a clean scan, both logged.
    let digest = reg.push_image("app", "v1", "bundle-attest").await;
    let logged = |stmt: Vec<u8>| {
        let (env, sig) = envelope(&stmt, &key);
        let entry = dsse_entry(&rekor, &stmt, &sig, &key.public_pem(), now());
        bundle(
            env,
            json!({"publicKey": {"hint": "k"}, "tlogEntries": [entry]}),
        )
    };
    let scan = statement(
        &digest,
        VULN,
        json!({"scanner": {"result": {"critical": 0}}}),
    );
    attach(
        &reg,
        "app",
        &digest,
        &[
            (logged(statement(&digest, SIGN, json!({}))), SIGN),
            (logged(scan.clone()), VULN),
        ],
    )
    .await;
    let image = reg.tag_ref("app", "v1");
    let trust_root = format!(
        "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: private}}\nspec:\n  sigstoreKeys:\n    tLogs:\n    - baseURL: https://rekor.test\n      hashAlgorithm: sha256\n      publicKey: {}\n",
        B64.encode(rekor.public_pem())
    );
    let with_ctlog = |extra: &str| {
        cip(
            &glob,
            &format!(
                "{}    ctlog: {{trustRootRef: private}}\n{extra}",
                key_authority(&key, "bundle")
            ),
        )
    };

    // The signature, with its log entry checked.
    let v = verify_json(
        &[("tr.yaml", &trust_root), ("cip.yaml", &with_ctlog(""))],
        &image,
        &[],
    )
    .await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(evidence["tlog"]["log_index"], 42, "{evidence}");

    // Attestations: short predicate name and a rego policy over the statement.
    let rego = serde_json::to_string(
        "package sigstore\ndefault isCompliant = false\nisCompliant {\n  input.predicate.scanner.result.critical == 0\n}\n",
    )
    .unwrap();
    let attestations = format!(
        "    attestations:\n    - name: scan\n      predicateType: vuln\n      policy: {{type: rego, data: {rego}}}\n"
    );
    let v = verify_json(
        &[
            ("tr.yaml", &trust_root),
            ("cip.yaml", &with_ctlog(&attestations)),
        ],
        &image,
        &[],
    )
    .await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(evidence[0]["predicate_type"], VULN, "{evidence}");

    // A policy the scan fails.
    let strict = attestations.replace("== 0", "< 0");
    let v = verify_json(
        &[("tr.yaml", &trust_root), ("cip.yaml", &with_ctlog(&strict))],
        &image,
        &[],
    )
    .await;
    assert_denied(&v, "failed evaluating rego policy for type scan");

    // A predicate type that is not attached.
    let provenance = "    attestations:\n    - {name: prov, predicateType: slsaprovenance1}\n";
    let v = verify_json(
        &[
            ("tr.yaml", &trust_root),
            ("cip.yaml", &with_ctlog(provenance)),
        ],
        &image,
        &[],
    )
    .await;
    assert_denied(
        &v,
        "no matching attestations with type https://slsa.dev/provenance/v1",
    );

    // ctlog required but the bundle has no entry; an entry whose promise was signed by another
    // log; an entry for another payload.
    let other_log = TestRekor::new();
    for (repo, cause) in [
        ("unlogged", "no transparency log entry"),
        ("otherlog", "not a trusted transparency log"),
        ("otherpayload", "payload hash differs"),
    ] {
        let d = reg.push_image(repo, "v1", &format!("bundle-{repo}")).await;
        let stmt = statement(&d, SIGN, json!({}));
        let (env, sig) = envelope(&stmt, &key);
        let material = match repo {
            "unlogged" => json!({"publicKey": {"hint": "k"}}),
            "otherlog" => {
                json!({"tlogEntries": [dsse_entry(&other_log, &stmt, &sig, &key.public_pem(), now())]})
            }
            _ => {
                json!({"tlogEntries": [dsse_entry(&rekor, b"another payload", &sig, &key.public_pem(), now())]})
            }
        };
        attach(&reg, repo, &d, &[(bundle(env, material), SIGN)]).await;
        let v = verify_json(
            &[("tr.yaml", &trust_root), ("cip.yaml", &with_ctlog(""))],
            &reg.tag_ref(repo, "v1"),
            &[],
        )
        .await;
        assert_denied(&v, cause);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_bundles_judged_at_log_and_timestamp_time() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("bundle-fulcio");
    let rekor = TestRekor::new();
    let tsa = TestTsa::new("bundle-tsa");
    let glob = format!("{}/**", reg.addr());
    let identity = format!("identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]");
    let trust_root = fulcio.trust_root_yaml("private", &rekor.public_pem());
    let policy = |extra: &str| {
        cip(
            &glob,
            &format!("    signatureFormat: bundle\n    keyless: {{trustRootRef: private, {identity}}}\n{extra}"),
        )
    };

    // cosign v3's keyless bundle: the leaf alone as `certificate`, a dsse entry naming it.
    // The certificate expired long ago; the log time is inside its validity.
    let expired = || Leaf {
        not_before: now() - 7200,
        lifetime: 600,
        ..Leaf::default()
    };
    let d = reg
        .push_image("logged", "v1", "bundle-keyless-logged")
        .await;
    let blob = keyless_bundle(&fulcio, &rekor, &d, &expired(), Some(now() - 7000));
    attach(&reg, "logged", &d, &[(blob, SIGN)]).await;
    let v = verify_json(
        &[("tr.yaml", &trust_root), ("cip.yaml", &policy(""))],
        &reg.tag_ref("logged", "v1"),
        &[],
    )
    .await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(evidence["subject"], WORKFLOW, "{evidence}");
    assert_eq!(evidence["issuer"], ISSUER, "{evidence}");

    // The same expired certificate with no log entry: judged now, denied.
    let d = reg.push_image("late", "v1", "bundle-keyless-late").await;
    let blob = keyless_bundle(&fulcio, &rekor, &d, &expired(), None);
    attach(&reg, "late", &d, &[(blob, SIGN)]).await;
    let v = verify_json(
        &[("tr.yaml", &trust_root), ("cip.yaml", &policy(""))],
        &reg.tag_ref("late", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, "signature keyless validation failed for authority v3");
    assert!(v.reasons().contains("now"), "{}", v.reasons());

    // A key-signed bundle under a keyless authority.
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let d = reg.push_image("keyed", "v1", "bundle-keyless-keyed").await;
    attach(
        &reg,
        "keyed",
        &d,
        &[(key_bundle(&statement(&d, SIGN, json!({})), &key), SIGN)],
    )
    .await;
    let v = verify_json(
        &[("tr.yaml", &trust_root), ("cip.yaml", &policy(""))],
        &reg.tag_ref("keyed", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, "bundle has no certificate");

    // Wrong identity.
    let d = reg.push_image("other", "v1", "bundle-keyless-other").await;
    let leaf = Leaf {
        san: "uri:https://github.com/evil/app/.github/workflows/x.yml@refs/heads/main",
        ..Leaf::default()
    };
    let blob = keyless_bundle(&fulcio, &rekor, &d, &leaf, Some(now()));
    attach(&reg, "other", &d, &[(blob, SIGN)]).await;
    let v = verify_json(
        &[("tr.yaml", &trust_root), ("cip.yaml", &policy(""))],
        &reg.tag_ref("other", "v1"),
        &[],
    )
    .await;
    assert_denied(&v, "certificate identity did not match");

    // rfc3161timestamp: the bundle's timestamp over the signature bytes, from a trusted TSA.
    let tsa_root = tsa.trust_root_yaml("tsa");
    let stamped = policy("    rfc3161timestamp: {trustRootRef: tsa}\n");
    let d = reg
        .push_image("stamped", "v1", "bundle-keyless-stamped")
        .await;
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, &Leaf::default());
    let stmt = statement(&d, SIGN, json!({}));
    let (env, sig) = envelope(&stmt, &signer);
    let leaf_der = B64.encode(&pem_ders(&cert)[0]);
    let with_stamp = |over: &[u8]| {
        bundle(
            env.clone(),
            json!({
                "certificate": {"rawBytes": leaf_der},
                "timestampVerificationData": {"rfc3161Timestamps": [{"signedTimestamp": B64.encode(tsa.stamp_der(over))}]},
            }),
        )
    };
    attach(&reg, "stamped", &d, &[(with_stamp(&sig), SIGN)]).await;
    let files = [
        ("tr.yaml", trust_root.as_str()),
        ("tsa.yaml", tsa_root.as_str()),
        ("cip.yaml", stamped.as_str()),
    ];
    let v = verify_json(&files, &reg.tag_ref("stamped", "v1"), &[]).await;
    assert_allowed(&v);
    assert!(
        v.json["policies"][0]["authorities"][0]["evidence"]["timestamp"]["time"].is_i64(),
        "{}",
        v.json
    );

    // A timestamp over other bytes, and none at all.
    let d2 = reg
        .push_image("misstamped", "v1", "bundle-keyless-misstamped")
        .await;
    let stmt2 = statement(&d2, SIGN, json!({}));
    let (env2, _) = envelope(&stmt2, &signer);
    let misstamped = bundle(
        env2.clone(),
        json!({
            "certificate": {"rawBytes": leaf_der},
            "timestampVerificationData": {"rfc3161Timestamps": [{"signedTimestamp": B64.encode(tsa.stamp_der(b"other bytes"))}]},
        }),
    );
    attach(&reg, "misstamped", &d2, &[(misstamped, SIGN)]).await;
    let v = verify_json(&files, &reg.tag_ref("misstamped", "v1"), &[]).await;
    assert_denied(&v, "message imprint differs");
    let d3 = reg
        .push_image("unstamped", "v1", "bundle-keyless-unstamped")
        .await;
    let (env3, _) = envelope(&statement(&d3, SIGN, json!({})), &signer);
    attach(
        &reg,
        "unstamped",
        &d3,
        &[(
            bundle(env3, json!({"certificate": {"rawBytes": leaf_der}})),
            SIGN,
        )],
    )
    .await;
    let v = verify_json(&files, &reg.tag_ref("unstamped", "v1"), &[]).await;
    assert_denied(&v, "rfc3161timestamp is required");
}

/// `rfc3161timestamp` on a key authority: a timestamp from a trusted TSA over the signature
/// is required, in both formats (the legacy annotation and the bundle's own field).
#[tokio::test(flavor = "multi_thread")]
async fn key_authorities_require_their_timestamps() {
    use common::tsa::RFC3161_TIMESTAMP_ANNOTATION;

    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let tsa = TestTsa::new("key tsa");
    let rogue = TestTsa::new("key tsa");
    let glob = format!("{}/**", reg.addr());
    let tsa_root = tsa.trust_root_yaml("tsa");
    let policy = |format: &str| {
        cip(
            &glob,
            &format!(
                "{}    rfc3161timestamp: {{trustRootRef: tsa}}\n",
                key_authority(&key, format)
            ),
        )
    };
    let legacy = policy("legacy");
    let v3 = policy("bundle");

    // Legacy: the annotation stamps the raw signature bytes.
    for (repo, stamp_by, cause) in [
        ("stamped", Some(&tsa), None),
        (
            "rogue",
            Some(&rogue),
            Some("timestamp authority not trusted"),
        ),
        ("unstamped", None, Some("rfc3161timestamp is required")),
    ] {
        let digest = reg.push_image(repo, "v1", &format!("key-tsa-{repo}")).await;
        let layer = cosign_sign_layer(&reg.repo_ref(repo), &digest, &key);
        let raw = B64.decode(layer.signature_b64().unwrap()).unwrap();
        let layer = match stamp_by {
            Some(t) => layer.with_annotation(RFC3161_TIMESTAMP_ANNOTATION, &t.annotation(&raw)),
            None => layer,
        };
        reg.push_signature_layers(repo, &signature_tag(&digest), &[layer], false)
            .await;
        let v = verify_json(
            &[("tsa.yaml", &tsa_root), ("cip.yaml", &legacy)],
            &reg.tag_ref(repo, "v1"),
            &[],
        )
        .await;
        match cause {
            None => {
                assert_allowed(&v);
                let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
                assert!(evidence["timestamp"]["time"].is_i64(), "{evidence}");
            }
            Some(cause) => assert_denied(&v, cause),
        }
    }

    // Bundle: the timestamp is over the envelope's signature.
    let digest = reg.push_image("v3", "v1", "key-tsa-v3").await;
    let (env, sig) = envelope(&statement(&digest, SIGN, json!({})), &key);
    let stamped = bundle(
        env.clone(),
        json!({
            "publicKey": {"hint": "k"},
            "timestampVerificationData": {"rfc3161Timestamps": [{"signedTimestamp": B64.encode(tsa.stamp_der(&sig))}]},
        }),
    );
    attach(&reg, "v3", &digest, &[(stamped, SIGN)]).await;
    let files = [("tsa.yaml", tsa_root.as_str()), ("cip.yaml", v3.as_str())];
    assert_allowed(&verify_json(&files, &reg.tag_ref("v3", "v1"), &[]).await);
    let digest = reg.push_image("v3bare", "v1", "key-tsa-v3bare").await;
    let (env, _) = envelope(&statement(&digest, SIGN, json!({})), &key);
    attach(
        &reg,
        "v3bare",
        &digest,
        &[(bundle(env, json!({"publicKey": {"hint": "k"}})), SIGN)],
    )
    .await;
    let v = verify_json(&files, &reg.tag_ref("v3bare", "v1"), &[]).await;
    assert_denied(&v, "rfc3161timestamp is required");
}

/// A keyless bundle's timestamp is evidence even without `rfc3161timestamp`: it is judged by
/// the timestamp authorities of the TrustRoot the certificate chains to (a Rekor v2 entry gives
/// no time of its own), and one from an authority that TrustRoot does not list denies.
#[tokio::test(flavor = "multi_thread")]
async fn keyless_bundle_timestamps_use_the_trust_roots_authorities() {
    let reg = Registry::start().await;
    let fulcio = TestFulcio::new("ts-fulcio");
    let rekor = TestRekor::new();
    let tsa = TestTsa::new("root tsa");
    let rogue = TestTsa::new("root tsa");
    let glob = format!("{}/**", reg.addr());
    let trust_root = format!(
        "{}    timestampAuthorities:\n    - subject: {{organization: pullgate-test, commonName: tsa}}\n      uri: https://tsa.test\n      certChain: {}\n",
        fulcio.trust_root_yaml("private", &rekor.public_pem()),
        B64.encode(tsa.chain_pem())
    );
    let policy = cip(
        &glob,
        &format!("    signatureFormat: bundle\n    keyless: {{trustRootRef: private, identities: [{{issuer: \"{ISSUER}\", subject: \"{WORKFLOW}\"}}]}}\n"),
    );
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, &Leaf::default());
    let leaf = B64.encode(&pem_ders(&cert)[0]);
    for (repo, by) in [("trusted", &tsa), ("rogue", &rogue)] {
        let digest = reg
            .push_image(repo, "v1", &format!("root-tsa-{repo}"))
            .await;
        let (env, sig) = envelope(&statement(&digest, SIGN, json!({})), &signer);
        let blob = bundle(
            env,
            json!({
                "certificate": {"rawBytes": leaf},
                "timestampVerificationData": {"rfc3161Timestamps": [{"signedTimestamp": B64.encode(by.stamp_der(&sig))}]},
            }),
        );
        attach(&reg, repo, &digest, &[(blob, SIGN)]).await;
    }
    let files = [
        ("tr.yaml", trust_root.as_str()),
        ("cip.yaml", policy.as_str()),
    ];
    let v = verify_json(&files, &reg.tag_ref("trusted", "v1"), &[]).await;
    assert_allowed(&v);
    let evidence = &v.json["policies"][0]["authorities"][0]["evidence"];
    assert!(evidence["timestamp"]["time"].is_i64(), "{evidence}");
    let v = verify_json(&files, &reg.tag_ref("rogue", "v1"), &[]).await;
    assert_denied(&v, "timestamp authority not trusted");
}

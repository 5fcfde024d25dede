//! Attestations (`sha256-<hex>.att`, DSSE envelopes of in-toto statements) and `tagPrefix`,
//! against the real local registry. Envelopes are signed with the sigstore crate's signer over
//! the DSSE pre-authentication encoding; the keyless ones carry a certificate from a test Fulcio.

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use common::fulcio::{Leaf, TestFulcio};
use common::*;
use serde_json::{json, Value};

const DSSE: &str = "application/vnd.dsse.envelope.v1+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";
const VULN: &str = "https://cosign.sigstore.dev/attestation/vuln/v1";

fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A statement about `digest` (the subject) with `predicate`.
fn statement(digest: &str, predicate_type: &str, predicate: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": predicate_type,
        "subject": [{"name": "image", "digest": {"sha256": digest.trim_start_matches("sha256:")}}],
        "predicate": predicate,
    }))
    .unwrap()
}

/// A DSSE envelope over `payload`, signed by `key`.
fn envelope(payload: &[u8], key: &TestKey) -> Vec<u8> {
    let sig = key.sign_b64(&pae(IN_TOTO, payload));
    serde_json::to_vec(&json!({
        "payloadType": IN_TOTO,
        "payload": B64.encode(payload),
        "signatures": [{"keyid": "", "sig": sig}],
    }))
    .unwrap()
}

/// Pushes an attestation manifest at `REPO:TAG` with one DSSE layer per (blob, annotations).
async fn push_attestations(reg: &Registry, repo: &str, tag: &str, layers: &[(Vec<u8>, Value)]) {
    let mut descriptors = Vec::new();
    for (blob, annotations) in layers {
        let digest = reg.push_blob(repo, blob).await;
        descriptors.push(json!({"mediaType": DSSE, "digest": digest, "size": blob.len(), "annotations": annotations}));
    }
    let config = b"{}";
    let config_digest = reg.push_blob(repo, config).await;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
        "layers": descriptors,
    }))
    .unwrap();
    reg.push_manifest_bytes(
        repo,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    )
    .await;
}

fn att_tag(digest: &str) -> String {
    format!("{}.att", digest.replace(':', "-"))
}

fn cip(glob: &str, authority: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: attested}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - name: scanner\n{authority}"
    )
}

fn key_authority(key: &TestKey, attestations: &str) -> String {
    format!(
        "    key: {{data: {}}}\n    attestations:\n{attestations}",
        serde_json::to_string(&key.public_pem()).unwrap()
    )
}

const REGO: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  input.predicate.scanner.result.critical == 0
}
"#;

async fn verify(files: &[(&str, &str)], image: &str) -> (i32, Value, String) {
    let dir = write_policy_dir(files);
    let policy = dir.path().to_str().unwrap().to_string();
    let out = run_pullgate_async(
        &["verify", "--policy", &policy, "--output", "json", image],
        &[],
    )
    .await;
    (
        out.code,
        serde_json::from_str(&out.stdout).unwrap_or(Value::Null),
        out.stderr,
    )
}

async fn expect(files: &[(&str, &str)], image: &str, verdict: &str, cause: &str) -> Value {
    let (code, json, stderr) = verify(files, image).await;
    assert_eq!(json["verdict"], verdict, "{json} {stderr}");
    assert_eq!(code, if verdict == "allow" { 0 } else { 1 });
    assert!(
        json["reasons"].to_string().contains(cause),
        "wanted {cause:?} in {}",
        json["reasons"]
    );
    json
}

#[tokio::test(flavor = "multi_thread")]
async fn key_signed_attestations_predicate_types_and_rego() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());

    // A clean scan, a dirty scan, and an SBOM, attached to one image.
    let digest = reg.push_image("app", "v1", "attest-app").await;
    let clean = statement(
        &digest,
        VULN,
        json!({"scanner": {"result": {"critical": 0}}}),
    );
    let sbom = statement(
        &digest,
        "https://spdx.dev/Document",
        json!({"spdxVersion": "SPDX-2.3"}),
    );
    push_attestations(
        &reg,
        "app",
        &att_tag(&digest),
        &[
            (envelope(&clean, &key), json!({"predicateType": VULN})),
            (
                envelope(&sbom, &key),
                json!({"predicateType": "https://spdx.dev/Document"}),
            ),
        ],
    )
    .await;
    let image = reg.tag_ref("app", "v1");

    // Short predicate type name, rego policy that passes.
    let rego = serde_json::to_string(REGO).unwrap();
    let policy = cip(&glob, &key_authority(&key, &format!("    - name: no-criticals\n      predicateType: vuln\n      policy: {{type: rego, data: {rego}}}\n")));
    let json = expect(&[("cip.yaml", &policy)], &image, "allow", "").await;
    let evidence = &json["policies"][0]["authorities"][0]["evidence"];
    assert_eq!(evidence[0]["name"], "no-criticals", "{evidence}");
    assert_eq!(evidence[0]["predicate_type"], VULN);

    // Two attestations required, full URI for one: both present.
    let both = cip(&glob, &key_authority(&key, "    - {name: scan, predicateType: vuln}\n    - {name: sbom, predicateType: \"https://spdx.dev/Document\"}\n"));
    expect(&[("cip.yaml", &both)], &image, "allow", "").await;

    // A predicate type that is not there.
    let missing = cip(
        &glob,
        &key_authority(
            &key,
            "    - {name: provenance, predicateType: slsaprovenance1}\n",
        ),
    );
    expect(
        &[("cip.yaml", &missing)],
        &image,
        "deny",
        "no matching attestations for \\\"provenance\\\" (https://slsa.dev/provenance/v1)",
    )
    .await;

    // A rego policy that fails, with policy-controller's message.
    let strict = r#"package sigstore
default isCompliant = false
isCompliant {
  input.predicate.scanner.result.critical < 0
}
"#;
    let strict = serde_json::to_string(strict).unwrap();
    let policy = cip(&glob, &key_authority(&key, &format!("    - name: no-criticals\n      predicateType: vuln\n      policy: {{type: rego, data: {strict}}}\n")));
    expect(
        &[("cip.yaml", &policy)],
        &image,
        "deny",
        "policy is not compliant for query 'data.sigstore.isCompliant'",
    )
    .await;

    // A rego policy from a ConfigMap.
    let cm = format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: policies, namespace: cosign-system}}\ndata:\n  vuln.rego: {rego}\n"
    );
    let policy = cip(&glob, &key_authority(&key, "    - name: no-criticals\n      predicateType: vuln\n      policy: {type: rego, configMapRef: {name: policies, key: vuln.rego}}\n"));
    expect(
        &[("cm.yaml", &cm), ("cip.yaml", &policy)],
        &image,
        "allow",
        "",
    )
    .await;

    // cue: a clear deny naming the CIP, the authority and the attestation.
    let policy = cip(&glob, &key_authority(&key, "    - name: no-criticals\n      predicateType: vuln\n      policy: {type: cue, data: \"predicateType: \\\"x\\\"\"}\n"));
    expect(&[("cip.yaml", &policy)], &image, "deny",
        "cue policies are not supported by this version of pullgate (ClusterImagePolicy attested, authority scanner, attestation no-criticals)").await;

    // Rego that does not parse: the authority is unusable, with the parse error.
    let policy = cip(&glob, &key_authority(&key, "    - name: no-criticals\n      predicateType: vuln\n      policy: {type: rego, data: \"package sigstore\\nisCompliant {\"}\n"));
    expect(&[("cip.yaml", &policy)], &image, "deny", "rego policy").await;

    // Signed by a key the authority does not trust.
    let stranger = TestKey::generate(KeyKind::EcdsaP256);
    let policy = cip(
        &glob,
        &key_authority(&stranger, "    - {name: scan, predicateType: vuln}\n"),
    );
    expect(
        &[("cip.yaml", &policy)],
        &image,
        "deny",
        "attestation signature does not verify with the authority's key",
    )
    .await;

    // An image with signatures but no attestations.
    let bare = reg.push_image("bare", "v1", "attest-bare").await;
    reg.sign("bare", &bare, &key).await;
    let policy = cip(
        &glob,
        &key_authority(&key, "    - {name: scan, predicateType: vuln}\n"),
    );
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("bare", "v1"),
        "deny",
        "no attestations found",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_copied_and_malformed_attestations() {
    let reg = Registry::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let glob = format!("{}/**", reg.addr());
    let policy = cip(
        &glob,
        &key_authority(&key, "    - {name: scan, predicateType: vuln}\n"),
    );

    // Payload swapped after signing: the signature no longer covers it.
    let a = reg.push_image("tampered", "v1", "attest-tampered").await;
    let signed = statement(&a, VULN, json!({"scanner": {"result": {"critical": 0}}}));
    let mut env: Value = serde_json::from_slice(&envelope(&signed, &key)).unwrap();
    env["payload"] = json!(B64.encode(statement(
        &a,
        VULN,
        json!({"scanner": {"result": {"critical": 9}}})
    )));
    push_attestations(
        &reg,
        "tampered",
        &att_tag(&a),
        &[(
            serde_json::to_vec(&env).unwrap(),
            json!({"predicateType": VULN}),
        )],
    )
    .await;
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("tampered", "v1"),
        "deny",
        "does not verify",
    )
    .await;

    // A genuine attestation of another image, copied next to this one.
    let b = reg.push_image("copied", "v1", "attest-copied").await;
    let other = reg.push_image("other", "v1", "attest-other").await;
    let about_other = statement(&other, VULN, json!({}));
    push_attestations(
        &reg,
        "copied",
        &att_tag(&b),
        &[(envelope(&about_other, &key), json!({"predicateType": VULN}))],
    )
    .await;
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("copied", "v1"),
        "deny",
        "attestation is for another image",
    )
    .await;

    // Not JSON at all, and a huge layer: clear reasons, bounded reads.
    let c = reg.push_image("garbage", "v1", "attest-garbage").await;
    push_attestations(
        &reg,
        "garbage",
        &att_tag(&c),
        &[(b"{not json".to_vec(), json!({}))],
    )
    .await;
    expect(
        &[("cip.yaml", &policy)],
        &reg.tag_ref("garbage", "v1"),
        "deny",
        "not a DSSE envelope",
    )
    .await;
    let d = reg.push_image("huge", "v1", "attest-huge").await;
    push_attestations(
        &reg,
        "huge",
        &att_tag(&d),
        &[(vec![b' '; 2 << 20], json!({}))],
    )
    .await;
    let (code, json, stderr) = verify(&[("cip.yaml", &policy)], &reg.tag_ref("huge", "v1")).await;
    assert_eq!(code, 2, "could not decide: {json} {stderr}");
    assert!(
        json["reasons"].to_string().contains("signature blob"),
        "{json}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_attestations_and_tag_prefix() {
    let reg = Registry::start().await;
    let glob = format!("{}/**", reg.addr());

    // Keyless: the envelope is signed by a Fulcio-certified key (no Rekor entry: the
    // certificate is valid now).
    let fulcio = TestFulcio::new("attest-fulcio");
    let signer = TestKey::generate(KeyKind::EcdsaP256);
    let cert = fulcio.issue(&signer, &Leaf::default());
    let digest = reg.push_image("kl", "v1", "attest-keyless").await;
    let st = statement(
        &digest,
        VULN,
        json!({"scanner": {"result": {"critical": 0}}}),
    );
    push_attestations(
        &reg,
        "kl",
        &att_tag(&digest),
        &[(
            envelope(&st, &signer),
            json!({
                "predicateType": VULN,
                "dev.sigstore.cosign/certificate": cert,
                "dev.sigstore.cosign/chain": fulcio.chain_pem(),
            }),
        )],
    )
    .await;
    let ca = serde_json::to_string(&fulcio.root.pem()).unwrap();
    let authority = |subject: &str| {
        format!(
        "    keyless:\n      ca-cert: {{data: {ca}}}\n      insecureIgnoreSCT: true\n      identities: [{{issuer: \"https://token.actions.githubusercontent.com\", subjectRegExp: \"{subject}\"}}]\n    attestations:\n    - {{name: scan, predicateType: vuln}}\n"
    )
    };
    expect(
        &[("cip.yaml", &cip(&glob, &authority("acme/app")))],
        &reg.tag_ref("kl", "v1"),
        "allow",
        "",
    )
    .await;
    expect(
        &[("cip.yaml", &cip(&glob, &authority("evil/app")))],
        &reg.tag_ref("kl", "v1"),
        "deny",
        "certificate identity did not match",
    )
    .await;

    // tagPrefix: signatures under `PREFIXsha256-<hex>.sig`.
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let tagged = reg.push_image("prefixed", "v1", "attest-prefix").await;
    let layer = cosign_sign_layer(&reg.repo_ref("prefixed"), &tagged, &key);
    let tag = format!("team-a-{}", signature_tag(&tagged));
    reg.push_signature_layers("prefixed", &tag, &[layer], false)
        .await;
    let with_prefix = |prefix: &str| {
        cip(
            &glob,
            &format!(
                "    key: {{data: {}}}\n    source: [{{tagPrefix: \"{prefix}\"}}]\n",
                serde_json::to_string(&key.public_pem()).unwrap()
            ),
        )
    };
    let image = reg.tag_ref("prefixed", "v1");
    expect(
        &[("cip.yaml", &with_prefix("team-a-"))],
        &image,
        "allow",
        "",
    )
    .await;
    expect(
        &[("cip.yaml", &with_prefix("team-b-"))],
        &image,
        "deny",
        "no signatures found",
    )
    .await;
    let (code, json, _) = verify(&[("cip.yaml", &with_prefix("bad/prefix:"))], &image).await;
    assert_eq!(code, 2, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("check source.tagPrefix"),
        "{json}"
    );
}

//! cosign attestations for tests: in-toto statements in DSSE envelopes signed with a test
//! key over the DSSE pre-authentication encoding, pushed as `sha256-<hex>.att` manifests.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::keys::TestKey;
use super::registry::Registry;

pub const DSSE: &str = "application/vnd.dsse.envelope.v1+json";
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
pub const VULN: &str = "https://cosign.sigstore.dev/attestation/vuln/v1";

/// A statement about `digest` (the subject) with `predicate`.
pub fn statement(digest: &str, predicate_type: &str, predicate: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": predicate_type,
        "subject": [{"name": "image", "digest": {"sha256": digest.trim_start_matches("sha256:")}}],
        "predicate": predicate,
    }))
    .unwrap()
}

/// A DSSE envelope over `payload`, signed by `key`.
pub fn envelope(payload: &[u8], key: &TestKey) -> Vec<u8> {
    let sig = key.sign_b64(&super::dsse_pae(IN_TOTO, payload));
    serde_json::to_vec(&json!({
        "payloadType": IN_TOTO,
        "payload": B64.encode(payload),
        "signatures": [{"keyid": "", "sig": sig}],
    }))
    .unwrap()
}

/// Pushes an attestation manifest at `REPO:TAG` with one DSSE layer per (blob, annotations).
pub async fn push_attestations(reg: &Registry, repo: &str, tag: &str, layers: &[(Vec<u8>, Value)]) {
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

pub fn att_tag(digest: &str) -> String {
    format!("{}.att", digest.replace(':', "-"))
}

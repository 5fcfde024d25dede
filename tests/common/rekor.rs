//! A stand-in Rekor: an ECDSA P-256 log key that issues cosign bundles (signed entry
//! timestamps) for hashedrekord entries, offline.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha2::Digest as _;
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, SigningScheme};
use sigstore::trust::ManualTrustRoot;

/// A test transparency log key. Log indexes count up from 1 per instance.
pub struct TestRekor {
    signer: SigStoreSigner,
    public_pem: String,
    public_der: Vec<u8>,
    next_index: AtomicI64,
}

impl Default for TestRekor {
    fn default() -> Self {
        Self::new()
    }
}

impl TestRekor {
    pub fn new() -> TestRekor {
        let signer = SigningScheme::ECDSA_P256_SHA256_ASN1
            .create_signer()
            .expect("rekor signer");
        let keypair = signer.to_sigstore_keypair().expect("rekor keypair");
        TestRekor {
            public_pem: keypair.public_key_to_pem().expect("rekor public PEM"),
            public_der: keypair.public_key_to_der().expect("rekor public DER"),
            signer,
            next_index: AtomicI64::new(1),
        }
    }

    pub fn public_pem(&self) -> String {
        self.public_pem.clone()
    }

    /// DER SubjectPublicKeyInfo.
    pub fn public_der(&self) -> Vec<u8> {
        self.public_der.clone()
    }

    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo: Rekor's log ID.
    pub fn log_id(&self) -> String {
        hex::encode(sha2::Sha256::digest(&self.public_der))
    }

    pub fn verification_key(&self) -> CosignVerificationKey {
        CosignVerificationKey::try_from_der(&self.public_der).expect("rekor verification key")
    }

    /// A sigstore trust root holding only this Rekor key (no Fulcio), for
    /// [`super::Registry::cosign_client`].
    pub fn trust_root(&self) -> ManualTrustRoot<'static> {
        ManualTrustRoot {
            rekor_keys: BTreeMap::from([(self.log_id(), self.public_der.clone())]),
            ..Default::default()
        }
    }

    /// The log key's signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.signer.sign(msg).expect("rekor sign")
    }

    /// The hashedrekord v0.0.1 entry body (JSON text) for a signature over `payload`.
    pub fn hashedrekord_body(
        &self,
        payload: &[u8],
        signature_b64: &str,
        signer_public_pem: &str,
    ) -> String {
        hashedrekord_body(payload, signature_b64, signer_public_pem)
    }

    /// The `dev.sigstore.cosign/bundle` annotation value for a signature over `payload`,
    /// with a valid signed entry timestamp.
    pub fn bundle_for(
        &self,
        payload: &[u8],
        signature_b64: &str,
        signer_public_pem: &str,
        integrated_time: i64,
    ) -> String {
        let body = hashedrekord_body(payload, signature_b64, signer_public_pem);
        self.bundle_for_body(&body, integrated_time)
    }

    /// A bundle for an arbitrary entry body (JSON text), correctly signed, with the next index.
    pub fn bundle_for_body(&self, body_json: &str, integrated_time: i64) -> String {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        self.bundle_from_parts(
            &B64.encode(body_json),
            integrated_time,
            index,
            &self.log_id(),
        )
    }

    /// A bundle from explicit parts, the SET signed by this key over exactly these parts
    /// (so a wrong `log_id` yields a well-signed bundle naming an unknown log).
    pub fn bundle_from_parts(
        &self,
        body_b64: &str,
        integrated_time: i64,
        log_index: i64,
        log_id: &str,
    ) -> String {
        let canonical = canonical_set_payload(body_b64, integrated_time, log_id, log_index);
        let set = B64.encode(self.sign(canonical.as_bytes()));
        bundle_json(&set, body_b64, integrated_time, log_index, log_id)
    }

    /// Like [`TestRekor::bundle_for`], but the body is swapped after signing for the entry of a
    /// different payload: the SET no longer matches.
    pub fn tampered_bundle_for(
        &self,
        payload: &[u8],
        signature_b64: &str,
        signer_public_pem: &str,
        integrated_time: i64,
    ) -> String {
        let good = self.bundle_for(payload, signature_b64, signer_public_pem, integrated_time);
        let mut value: serde_json::Value = serde_json::from_str(&good).expect("bundle json");
        let other = hashedrekord_body(b"tampered", signature_b64, signer_public_pem);
        value["Payload"]["body"] = B64.encode(other).into();
        value.to_string()
    }
}

/// hashedrekord v0.0.1 body, keys in Rekor's order.
pub fn hashedrekord_body(payload: &[u8], signature_b64: &str, signer_public_pem: &str) -> String {
    let hash = hex::encode(sha2::Sha256::digest(payload));
    let key = B64.encode(signer_public_pem);
    format!(
        r#"{{"apiVersion":"0.0.1","kind":"hashedrekord","spec":{{"data":{{"hash":{{"algorithm":"sha256","value":"{hash}"}}}},"signature":{{"content":"{signature_b64}","publicKey":{{"content":"{key}"}}}}}}}}"#
    )
}

/// The bytes a signed entry timestamp signs: the bundle `Payload` as canonical JSON (keys
/// sorted, no spaces), written out by hand so the harness does not share code with the
/// verifier under test.
pub fn canonical_set_payload(
    body_b64: &str,
    integrated_time: i64,
    log_id: &str,
    log_index: i64,
) -> String {
    format!(
        r#"{{"body":"{body_b64}","integratedTime":{integrated_time},"logID":"{log_id}","logIndex":{log_index}}}"#
    )
}

/// The bundle annotation JSON from its parts.
pub fn bundle_json(
    set_b64: &str,
    body_b64: &str,
    integrated_time: i64,
    log_index: i64,
    log_id: &str,
) -> String {
    serde_json::json!({
        "SignedEntryTimestamp": set_b64,
        "Payload": {
            "body": body_b64,
            "integratedTime": integrated_time,
            "logIndex": log_index,
            "logID": log_id,
        },
    })
    .to_string()
}

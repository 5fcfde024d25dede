//! Offline verification of a cosign Rekor bundle (`dev.sigstore.cosign/bundle` annotation): the
//! signed entry timestamp (SET) against a trusted log key, and the logged entry against the
//! signature it is attached to.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::keys::{HashAlgorithm, KeyError, PublicKey};

/// The public-good Rekor instance.
pub const PUBLIC_GOOD_REKOR_URL: &str = "https://rekor.sigstore.dev";

/// Public key of the public-good Rekor instance (log ID
/// `c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d`).
pub const PUBLIC_GOOD_REKOR_KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G2Y+2tabdTV5BcGiBIx0a9fAFwr
kBbmLSGtks4L3qX6yYY0zufBnhC8Ur/iy55GhWP/9A/bY2LhC30M9+RYtw==
-----END PUBLIC KEY-----
";

/// Why a bundle does not prove the signature was logged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    #[error("malformed bundle: {0}")]
    Malformed(String),
    #[error("bundle is from log {0}, which is not a trusted transparency log")]
    UnknownLog(String),
    #[error("bundle signed entry timestamp does not verify against the log key")]
    BadSet,
    #[error("bundle entry does not match this signature: {0}")]
    Mismatch(&'static str),
}

/// Trusted transparency log keys, by log ID (hex SHA-256 of the key's DER SPKI).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogKeys(BTreeMap<String, PublicKey>);

impl LogKeys {
    pub fn public_good() -> LogKeys {
        // The embedded constant is a valid key; a failure here is a build defect caught by tests.
        let mut keys = LogKeys::default();
        if let Ok(key) = PublicKey::from_pem(PUBLIC_GOOD_REKOR_KEY) {
            keys.insert(key);
        }
        keys
    }

    pub fn insert(&mut self, key: PublicKey) {
        self.0.insert(key.fingerprint(), key);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

/// Decodes a TrustRoot `tLogs[].publicKey`: base64 of a PEM key (raw PEM is accepted too).
pub fn decode_log_key(value: &str) -> Result<PublicKey, KeyError> {
    let trimmed = value.trim();
    if trimmed.starts_with("-----BEGIN") {
        return PublicKey::from_pem(trimmed);
    }
    let compact: String = trimmed.split_whitespace().collect();
    let pem = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| KeyError::Pem(format!("publicKey is not base64: {e}")))?;
    let pem = String::from_utf8(pem).map_err(|_| KeyError::Pem("publicKey is not UTF-8".into()))?;
    PublicKey::from_pem(&pem)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Bundle {
    signed_entry_timestamp: String,
    payload: BundlePayload,
}

/// Field order does not matter: the SET covers the RFC 8785 canonical form.
#[derive(Deserialize, Serialize)]
struct BundlePayload {
    body: String,
    #[serde(rename = "integratedTime")]
    integrated_time: i64,
    #[serde(rename = "logIndex")]
    log_index: i64,
    #[serde(rename = "logID")]
    log_id: String,
}

#[derive(Deserialize)]
struct Entry {
    kind: String,
    spec: HashedRekordSpec,
}

#[derive(Deserialize)]
struct HashedRekordSpec {
    data: HashedData,
    signature: EntrySignature,
}

#[derive(Deserialize)]
struct HashedData {
    hash: EntryHash,
}

#[derive(Deserialize)]
struct EntryHash {
    algorithm: String,
    value: String,
}

#[derive(Deserialize)]
struct EntrySignature {
    content: String,
    #[serde(rename = "publicKey")]
    public_key: Option<EntryKey>,
}

#[derive(Deserialize)]
struct EntryKey {
    content: String,
}

/// What a verified bundle proves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggedEntry {
    pub log_id: String,
    pub log_index: i64,
    pub integrated_time: i64,
}

/// Verifies `raw` (the bundle annotation) for the signature `signature_b64` over `payload`,
/// made by `signer`; `certificate` (DER) when the signer holds one (keyless): the entry must
/// then log that certificate.
pub fn verify_bundle(
    raw: &str,
    logs: &LogKeys,
    payload: &[u8],
    signature_b64: &str,
    signer: &PublicKey,
    certificate: Option<&[u8]>,
) -> Result<LoggedEntry, BundleError> {
    let b64 = &base64::engine::general_purpose::STANDARD;
    let (logged, body) = verify_set(raw, logs)?;
    let entry: Entry = serde_json::from_slice(&body)
        .map_err(|e| BundleError::Malformed(format!("body is not a hashedrekord entry: {e}")))?;
    if entry.kind != "hashedrekord" {
        return Err(BundleError::Malformed(format!(
            "unsupported entry kind {:?}",
            entry.kind
        )));
    }
    let logged_sig = b64.decode(entry.spec.signature.content.as_bytes());
    let our_sig = b64.decode(signature_b64.trim().as_bytes());
    match (logged_sig, our_sig) {
        (Ok(a), Ok(b)) if a == b => {}
        _ => return Err(BundleError::Mismatch("signature differs")),
    }
    let hash = &entry.spec.data.hash;
    if hash.algorithm != "sha256" || hash.value != hex::encode(sha2::Sha256::digest(payload)) {
        return Err(BundleError::Mismatch("payload hash differs"));
    }
    let logged_pem = entry
        .spec
        .signature
        .public_key
        .as_ref()
        .and_then(|key| b64.decode(key.content.as_bytes()).ok())
        .and_then(|p| String::from_utf8(p).ok());
    match (logged_pem, certificate) {
        (Some(pem), Some(cert)) => {
            let logged = super::x509::pem_certificates(&pem).unwrap_or_default();
            if logged.first().map(Vec::as_slice) != Some(cert) {
                return Err(BundleError::Mismatch("certificate differs"));
            }
        }
        (Some(pem), None) => {
            if PublicKey::from_pem(&pem).ok().as_ref() != Some(signer) {
                return Err(BundleError::Mismatch("public key differs"));
            }
        }
        // A keyless entry must name the certificate: its key alone says nothing of identity.
        (None, Some(_)) => return Err(BundleError::Mismatch("entry has no certificate")),
        (None, None) => {}
    }
    Ok(logged)
}

/// Verifies the signed entry timestamp of bundle `raw` against `logs` and returns what it
/// proves with the decoded entry body. The caller must still bind the body to its signature:
/// hashedrekord here, DSSE/in-toto entries in `verify::attest`.
pub fn verify_set(raw: &str, logs: &LogKeys) -> Result<(LoggedEntry, Vec<u8>), BundleError> {
    let bundle: Bundle =
        serde_json::from_str(raw).map_err(|e| BundleError::Malformed(e.to_string()))?;
    let body = base64::engine::general_purpose::STANDARD
        .decode(bundle.payload.body.as_bytes())
        .map_err(|e| BundleError::Malformed(format!("body is not base64: {e}")))?;
    let set = base64::engine::general_purpose::STANDARD
        .decode(bundle.signed_entry_timestamp.trim().as_bytes())
        .map_err(|e| {
            BundleError::Malformed(format!("signed entry timestamp is not base64: {e}"))
        })?;
    let logged = LoggedEntry {
        log_id: bundle.payload.log_id,
        log_index: bundle.payload.log_index,
        integrated_time: bundle.payload.integrated_time,
    };
    verify_promise(&logged, &body, &set, logs)?;
    Ok((logged, body))
}

/// Verifies a signed entry timestamp `set`: the log named by `entry` signed the RFC 8785
/// canonical form of the entry's body, integrated time, index and log ID. This is what cosign's
/// bundle annotation and a Sigstore bundle's inclusion promise both carry.
pub fn verify_promise(
    entry: &LoggedEntry,
    body: &[u8],
    set: &[u8],
    logs: &LogKeys,
) -> Result<(), BundleError> {
    let log_key = logs
        .0
        .get(&entry.log_id)
        .ok_or_else(|| BundleError::UnknownLog(entry.log_id.clone()))?;
    let payload = BundlePayload {
        body: base64::engine::general_purpose::STANDARD.encode(body),
        integrated_time: entry.integrated_time,
        log_index: entry.log_index,
        log_id: entry.log_id.clone(),
    };
    let canonical = serde_json_canonicalizer::to_vec(&payload)
        .map_err(|e| BundleError::Malformed(e.to_string()))?;
    if !log_key.verify(HashAlgorithm::Sha256, &canonical, set) {
        return Err(BundleError::BadSet);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_good_key_is_embedded() {
        let keys = LogKeys::public_good();
        assert_eq!(
            keys.ids().collect::<Vec<_>>(),
            ["c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d"]
        );
    }

    #[test]
    fn trust_root_key_is_base64_pem() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(PUBLIC_GOOD_REKOR_KEY);
        assert!(decode_log_key(&b64).is_ok());
        assert!(decode_log_key(PUBLIC_GOOD_REKOR_KEY).is_ok());
        assert!(decode_log_key("!!!").is_err());
    }

    #[test]
    fn garbage_bundle_is_malformed() {
        let key = PublicKey::from_pem(PUBLIC_GOOD_REKOR_KEY).unwrap();
        let err =
            verify_bundle("{", &LogKeys::public_good(), b"x", "AA==", &key, None).unwrap_err();
        assert!(matches!(err, BundleError::Malformed(_)));
        let unknown = r#"{"SignedEntryTimestamp":"AA==","Payload":{"body":"","integratedTime":1,"logIndex":1,"logID":"ff"}}"#;
        let err =
            verify_bundle(unknown, &LogKeys::public_good(), b"x", "AA==", &key, None).unwrap_err();
        assert_eq!(err, BundleError::UnknownLog("ff".into()));
    }
}

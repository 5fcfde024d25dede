//! Offline verification of transparency log evidence. Rekor v1: a cosign Rekor bundle
//! (`dev.sigstore.cosign/bundle` annotation) or a Sigstore bundle's inclusion promise, whose
//! signed entry timestamp (SET) a trusted log key signed. Rekor v2: an inclusion proof up to a
//! checkpoint (a signed note) that a trusted log signed. The caller binds the logged entry to
//! the signature it is attached to.
//!
//! The v2 check is built on the Sigstore project's Rust crates: `sigstore-types` parses the
//! checkpoint, `sigstore-crypto` verifies its signature, `sigstore-merkle` hashes the leaf and
//! verifies the RFC 6962 inclusion proof. What is pullgate's here is the choice of the log (the
//! entry's log ID must name a trusted log, whose origin the checkpoint must carry and whose key
//! must have signed it) and the key ID that choice rests on (see [`checkpoint_key_id`]).

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

/// The public-good Rekor v2 log (sharded by year; this is its first shard).
pub const PUBLIC_GOOD_REKOR_V2_URL: &str = "https://log2025-1.rekor.sigstore.dev";

/// Public key of the public-good Rekor v2 log (Ed25519), as sigstore's `trusted_root.json`
/// publishes it.
pub const PUBLIC_GOOD_REKOR_V2_KEY: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAt8rlp1knGwjfbcXAYPYAkn0XiLz1x8O4t0YkEhie244=
-----END PUBLIC KEY-----
";

/// An inclusion proof has one hash per tree level: more than 64 cannot be a real proof.
pub const MAX_PROOF_HASHES: usize = 64;

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
    #[error("Rekor v2 checkpoint: {0}")]
    Checkpoint(String),
    #[error("Rekor v2 inclusion proof: {0}")]
    Proof(String),
}

/// A log as a Rekor v2 checkpoint names it: the origin line it must carry and the key that
/// must sign it.
#[derive(Debug, Clone, PartialEq)]
struct CheckpointLog {
    origin: String,
    key: PublicKey,
    /// The first four bytes of the key ID, which prefix the log's checkpoint signatures.
    hint: [u8; 4],
}

/// Trusted transparency logs. Rekor v1 evidence names its log by the hex SHA-256 of the
/// key's DER SPKI; Rekor v2 evidence by the log's checkpoint key ID ([`checkpoint_key_id`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogKeys {
    promise: BTreeMap<String, PublicKey>,
    checkpoint: BTreeMap<String, CheckpointLog>,
}

impl LogKeys {
    /// The public-good Rekor (v1) and its Rekor v2 log.
    pub fn public_good() -> LogKeys {
        // The embedded constants are valid keys; a failure here is a build defect caught by
        // tests.
        let mut keys = LogKeys::default();
        for (pem, url) in [
            (PUBLIC_GOOD_REKOR_KEY, PUBLIC_GOOD_REKOR_URL),
            (PUBLIC_GOOD_REKOR_V2_KEY, PUBLIC_GOOD_REKOR_V2_URL),
        ] {
            if let Ok(key) = PublicKey::from_pem(pem) {
                keys.insert(key, url);
            }
        }
        keys
    }

    /// Trusts the log at `base_url` (its `baseURL` in a TrustRoot) with `key`: for inclusion
    /// promises, and, when the URL names a host, for checkpoints whose origin is that host
    /// (and path), as Rekor v2 writes them.
    pub fn insert(&mut self, key: PublicKey, base_url: &str) {
        if let Some(origin) = checkpoint_origin(base_url) {
            let id = checkpoint_key_id(&origin, &key);
            self.checkpoint.insert(
                hex::encode(id),
                CheckpointLog {
                    origin,
                    key: key.clone(),
                    hint: [id[0], id[1], id[2], id[3]],
                },
            );
        }
        self.promise.insert(key.fingerprint(), key);
    }

    pub fn is_empty(&self) -> bool {
        self.promise.is_empty()
    }

    /// What identifies the trusted logs: v1 log IDs, then v2 key IDs with their origins.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        let v1 = self.promise.keys().map(String::as_str);
        let v2 = self
            .checkpoint
            .iter()
            .flat_map(|(id, log)| [id.as_str(), log.origin.as_str()]);
        v1.chain(v2)
    }
}

/// The origin a Rekor v2 log writes on its checkpoints: its base URL without the scheme and
/// trailing slashes (`https://log2025-1.rekor.sigstore.dev` → `log2025-1.rekor.sigstore.dev`).
fn checkpoint_origin(base_url: &str) -> Option<String> {
    let url = base_url.trim();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url)
        .trim_end_matches('/');
    (!rest.is_empty()).then(|| rest.to_string())
}

/// A log's key ID in the signed-note format (C2SP signed-note), which Rekor v2 uses as its log
/// ID and whose first four bytes prefix each checkpoint signature: SHA-256 of the origin, a
/// newline, a signature-type byte and the key. Ed25519 keys are type 0x01 with the raw 32-byte
/// key (checked against sigstore's published public-good v2 log ID in the tests below); other
/// keys (ECDSA) are type 0xff with the DER SPKI, not yet checked against a real ECDSA log.
///
/// This is pullgate's code: sigstore-crypto's `compute_key_hint` hashes the DER SPKI alone,
/// which is not the hint a Rekor v2 log writes (sigstore-verify instead takes the log ID from
/// `trusted_root.json`, where the TrustRoot CRD has no such field to rely on).
pub fn checkpoint_key_id(origin: &str, key: &PublicKey) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(origin.as_bytes());
    h.update(b"\n");
    let spki = key.spki_der();
    match key.algorithm() {
        "ed25519" => {
            h.update([0x01]);
            // An Ed25519 SPKI ends with the 32-byte key.
            h.update(&spki[spki.len().saturating_sub(32)..]);
        }
        _ => {
            h.update([0xff]);
            h.update(spki);
        }
    }
    h.finalize().into()
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

/// What verified log evidence proves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggedEntry {
    pub log_id: String,
    pub log_index: i64,
    /// When the log integrated the entry, as its signed promise says. A Rekor v2 entry has
    /// none: its inclusion proof says the entry is logged, not when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub integrated_time: Option<i64>,
    /// Rekor v2: the size of the tree (the checkpoint) the entry was proven to be in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree_size: Option<u64>,
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
        integrated_time: Some(bundle.payload.integrated_time),
        tree_size: None,
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
        .promise
        .get(&entry.log_id)
        .ok_or_else(|| BundleError::UnknownLog(entry.log_id.clone()))?;
    let payload = BundlePayload {
        body: base64::engine::general_purpose::STANDARD.encode(body),
        // A promise always covers an integrated time; protobuf JSON omits a zero.
        integrated_time: entry.integrated_time.unwrap_or(0),
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

/// A Rekor v2 entry's inclusion proof, as a Sigstore bundle carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InclusionProof {
    /// The proof's own copies of the leaf index, tree size and root: they must agree with the
    /// entry and the checkpoint (the checkpoint's are what the log signed).
    pub log_index: i64,
    pub tree_size: Option<i64>,
    pub root_hash: Option<Vec<u8>>,
    /// Sibling hashes from the leaf up.
    pub hashes: Vec<Vec<u8>>,
    /// The signed note.
    pub checkpoint: String,
}

/// Verifies a Rekor v2 entry: `log_id` (hex) names a trusted v2 log, the checkpoint carries
/// that log's origin and its signature, and the proof leads from the leaf hash of `body` at
/// `log_index` to the checkpoint's root at its tree size. The caller must still bind `body` to
/// its signature.
pub fn verify_inclusion(
    log_id: &str,
    log_index: i64,
    body: &[u8],
    proof: &InclusionProof,
    logs: &LogKeys,
) -> Result<LoggedEntry, BundleError> {
    use sigstore_crypto::{Checkpoint, VerificationKey};
    use sigstore_types::{DerPublicKey, Sha256Hash};

    let log = logs
        .checkpoint
        .get(log_id)
        .ok_or_else(|| BundleError::UnknownLog(log_id.to_string()))?;
    let checkpoint = Checkpoint::from_text(&proof.checkpoint)
        .map_err(|e| BundleError::Checkpoint(format!("malformed: {e}")))?;
    if checkpoint.origin() != log.origin {
        return Err(BundleError::Checkpoint(format!(
            "its origin {:?} is not the log's ({:?})",
            checkpoint.origin(),
            log.origin
        )));
    }
    let key = VerificationKey::from_spki(&DerPublicKey::new(log.key.spki_der().to_vec()))
        .map_err(|e| BundleError::Checkpoint(format!("log key: {e}")))?;
    // Four-byte hints may collide: every signature with the log's hint is tried.
    let signed = checkpoint.signatures().iter().any(|s| {
        *s.key_id.as_bytes() == log.hint
            && key.verify(checkpoint.signed_data(), &s.signature).is_ok()
    });
    if !signed {
        return Err(BundleError::Checkpoint(format!(
            "not signed by the key of log {}",
            log.origin
        )));
    }
    let tree_size = checkpoint.tree_size();
    let root = checkpoint.root_hash();
    if proof
        .root_hash
        .as_deref()
        .is_some_and(|r| r != root.as_bytes())
    {
        return Err(BundleError::Proof(
            "its rootHash differs from the checkpoint's root".into(),
        ));
    }
    if proof
        .tree_size
        .is_some_and(|n| u64::try_from(n).ok() != Some(tree_size))
    {
        return Err(BundleError::Proof(
            "its treeSize differs from the checkpoint's tree size".into(),
        ));
    }
    if proof.log_index != log_index {
        return Err(BundleError::Proof(
            "its logIndex differs from the entry's".into(),
        ));
    }
    let index = u64::try_from(log_index)
        .map_err(|_| BundleError::Proof(format!("log index {log_index} is negative")))?;
    if proof.hashes.len() > MAX_PROOF_HASHES {
        return Err(BundleError::Proof(format!(
            "{} hashes, more than {MAX_PROOF_HASHES}",
            proof.hashes.len()
        )));
    }
    let hashes = proof
        .hashes
        .iter()
        .map(|h| Sha256Hash::try_from(h.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BundleError::Proof(format!("a hash is not SHA-256: {e}")))?;
    let leaf = sigstore_merkle::hash_leaf(body);
    sigstore_merkle::verify_inclusion_proof(&leaf, index, tree_size, &hashes, root).map_err(
        |e| {
            BundleError::Proof(format!(
                "entry {index} does not lead to the root of the checkpoint's tree of {tree_size}: {e}"
            ))
        },
    )?;
    Ok(LoggedEntry {
        log_id: log_id.to_string(),
        log_index,
        integrated_time: None,
        tree_size: Some(tree_size),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_good_key_is_embedded() {
        let keys = LogKeys::public_good();
        assert_eq!(
            keys.promise.keys().collect::<Vec<_>>(),
            [
                "b54813cb63d8859870a5e78500cc6adcfdf59723edae93ee8d25faf2475a0690",
                "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d"
            ]
        );
    }

    /// The v2 log ID sigstore publishes for its public-good Rekor v2 log (base64
    /// `zxGZFVvd0FEmjR8WrFwMdcAJ9vtaY/QXf44Y1wUeP6A=` in `trusted_root.json`) is the
    /// checkpoint key ID computed here from its key and URL.
    #[test]
    fn public_good_v2_log_id_matches_sigstore() {
        let key = PublicKey::from_pem(PUBLIC_GOOD_REKOR_V2_KEY).unwrap();
        let origin = checkpoint_origin(PUBLIC_GOOD_REKOR_V2_URL).unwrap();
        assert_eq!(origin, "log2025-1.rekor.sigstore.dev");
        let id = checkpoint_key_id(&origin, &key);
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(id),
            "zxGZFVvd0FEmjR8WrFwMdcAJ9vtaY/QXf44Y1wUeP6A="
        );
        assert!(LogKeys::public_good()
            .checkpoint
            .contains_key(&hex::encode(id)));
    }

    #[test]
    fn checkpoint_origins() {
        assert_eq!(
            checkpoint_origin("https://rekor.example.com/").as_deref(),
            Some("rekor.example.com")
        );
        assert_eq!(
            checkpoint_origin("http://127.0.0.1:3000/log").as_deref(),
            Some("127.0.0.1:3000/log")
        );
        assert_eq!(checkpoint_origin("https://"), None);
        assert_eq!(checkpoint_origin(""), None);
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

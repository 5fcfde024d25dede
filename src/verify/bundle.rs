//! Sigstore bundles, the format cosign v3 writes by default: one JSON document per signature
//! holding a DSSE envelope (an in-toto statement about the image), the signer's key hint or
//! certificate chain, transparency log entries and RFC 3161 timestamps. cosign attaches them to
//! the image as OCI 1.1 referrers; an image signature is a statement of type
//! `https://sigstore.dev/cosign/sign/v1`, an attestation one of its own predicate type.
//!
//! Verified here against the same authorities as the legacy format: the envelope's signature
//! under the authority's key or certificate first, then the evidence (a Rekor v1 entry's
//! inclusion promise or a Rekor v2 entry's inclusion proof and checkpoint, the entry bound to
//! this payload, signature and signer; a timestamp over the signature), and only then is the
//! statement read. Parsing is bounded and every malformed field is a reason.

use base64::Engine as _;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use sha2::Digest as _;

use super::attest::{pae, read_statement, LoggedSigner, Signer, Verified, MAX_ENVELOPE_SIGNATURES};
use super::keyless::{Evidence, SignerCertificate};
use super::keys::HashAlgorithm;
use super::rekor::{
    verify_inclusion, verify_promise, InclusionProof, LogKeys, LoggedEntry, MAX_PROOF_HASHES,
};
use super::tsa::{authority_timestamp, Stamp};

/// The bundle media type cosign v3 writes (also the referrer's `artifactType`).
pub const BUNDLE_MEDIA_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// More entries than this in one bundle is not something a client writes.
const MAX_ENTRIES: usize = 16;
/// Certificates beyond the leaf a bundle may carry.
const MAX_CHAIN: usize = 8;

/// Whether a media type or `artifactType` names a Sigstore bundle (v0.1 to v0.3 spellings).
pub fn is_bundle_media_type(media_type: &str) -> bool {
    media_type.starts_with("application/vnd.dev.sigstore.bundle.v0.")
        || media_type.starts_with("application/vnd.dev.sigstore.bundle+json;version=0.")
}

/// What pullgate reads of a bundle.
#[derive(Debug)]
struct Bundle {
    envelope: Envelope,
    /// DER, the leaf first; empty for a key signature (a `publicKey` hint).
    certificates: Vec<Vec<u8>>,
    tlog: Vec<TlogEntry>,
    /// DER timestamps over the signature.
    timestamps: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct Envelope {
    payload_type: String,
    payload: Vec<u8>,
    signatures: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct TlogEntry {
    logged: LoggedEntry,
    kind: String,
    version: String,
    body: Vec<u8>,
    /// The inclusion promise (signed entry timestamp). Rekor v2 entries have none.
    promise: Option<Vec<u8>>,
    /// The inclusion proof with its checkpoint: what a Rekor v2 entry is evidence by.
    proof: Option<InclusionProof>,
}

impl TlogEntry {
    /// A Rekor v2 entry (`hashedrekord` or `dsse` 0.0.2; `intoto` 0.0.2 is a v1 kind).
    fn is_v2(&self) -> bool {
        self.version == "0.0.2" && matches!(self.kind.as_str(), "dsse" | "hashedrekord")
    }
}

// The protobuf JSON form: camelCase names, 64-bit integers as strings, bytes as base64.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBundle {
    media_type: String,
    #[serde(default)]
    verification_material: Option<RawMaterial>,
    #[serde(default)]
    dsse_envelope: Option<RawEnvelope>,
    #[serde(default)]
    message_signature: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawMaterial {
    #[serde(default)]
    x509_certificate_chain: Option<RawChain>,
    #[serde(default)]
    certificate: Option<RawCertificate>,
    #[serde(default)]
    tlog_entries: Vec<RawTlogEntry>,
    #[serde(default)]
    timestamp_verification_data: Option<RawTimestamps>,
}

#[derive(Deserialize)]
struct RawChain {
    #[serde(default)]
    certificates: Vec<RawCertificate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawCertificate {
    raw_bytes: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTlogEntry {
    #[serde(deserialize_with = "int64")]
    log_index: i64,
    log_id: RawLogId,
    kind_version: RawKindVersion,
    #[serde(default, deserialize_with = "opt_int64")]
    integrated_time: Option<i64>,
    #[serde(default)]
    inclusion_promise: Option<RawPromise>,
    #[serde(default)]
    inclusion_proof: Option<RawProof>,
    canonicalized_body: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProof {
    #[serde(deserialize_with = "int64")]
    log_index: i64,
    #[serde(default)]
    root_hash: Option<String>,
    #[serde(default, deserialize_with = "opt_int64")]
    tree_size: Option<i64>,
    #[serde(default)]
    hashes: Vec<String>,
    checkpoint: RawCheckpoint,
}

#[derive(Deserialize)]
struct RawCheckpoint {
    envelope: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLogId {
    key_id: String,
}

#[derive(Deserialize)]
struct RawKindVersion {
    kind: String,
    #[serde(default)]
    version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPromise {
    signed_entry_timestamp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTimestamps {
    #[serde(default)]
    rfc3161_timestamps: Vec<RawTimestamp>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawTimestamp {
    signed_timestamp: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEnvelope {
    payload: String,
    payload_type: String,
    signatures: Vec<RawSignature>,
}

#[derive(Deserialize)]
struct RawSignature {
    sig: String,
}

/// A protobuf JSON int64: a string of digits, or a plain number.
fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom("not a 64-bit integer")),
        Value::String(s) => s
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a 64-bit integer"))),
        other => Err(serde::de::Error::custom(format!(
            "{other} is not a 64-bit integer"
        ))),
    }
}

fn opt_int64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    int64(d).map(Some)
}

fn base64(field: &str, value: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| format!("bundle {field} is not base64: {e}"))
}

fn at_most<T>(items: Vec<T>, max: usize, what: &str) -> Result<Vec<T>, String> {
    if items.len() > max {
        return Err(format!(
            "bundle has {} {what}, more than {max}",
            items.len()
        ));
    }
    Ok(items)
}

fn parse_proof(p: RawProof) -> Result<InclusionProof, String> {
    let hashes = at_most(p.hashes, MAX_PROOF_HASHES, "inclusion proof hashes")?
        .iter()
        .map(|h| base64("inclusionProof hash", h))
        .collect::<Result<_, _>>()?;
    Ok(InclusionProof {
        log_index: p.log_index,
        tree_size: p.tree_size,
        root_hash: p
            .root_hash
            .map(|r| base64("inclusionProof rootHash", &r))
            .transpose()?,
        hashes,
        checkpoint: p.checkpoint.envelope,
    })
}

impl Bundle {
    fn parse(raw: &[u8]) -> Result<Bundle, String> {
        let bundle: RawBundle =
            serde_json::from_slice(raw).map_err(|e| format!("not a Sigstore bundle: {e}"))?;
        if !is_bundle_media_type(&bundle.media_type) {
            return Err(format!(
                "not a Sigstore bundle: media type {:?}",
                bundle.media_type
            ));
        }
        let Some(envelope) = bundle.dsse_envelope else {
            return Err(match bundle.message_signature {
                Some(_) => "the bundle holds a message signature, which does not name an image; cosign signs images with a DSSE envelope".into(),
                None => "the bundle holds no DSSE envelope".into(),
            });
        };
        let signatures = at_most(envelope.signatures, MAX_ENVELOPE_SIGNATURES, "signatures")?
            .iter()
            .map(|s| base64("signature", &s.sig))
            .collect::<Result<Vec<_>, _>>()?;
        if signatures.is_empty() {
            return Err("the bundle's envelope has no signatures".into());
        }
        let envelope = Envelope {
            payload: base64("payload", &envelope.payload)?,
            payload_type: envelope.payload_type,
            signatures,
        };
        let material = bundle
            .verification_material
            .ok_or("the bundle has no verificationMaterial")?;
        let certificates = match (material.x509_certificate_chain, material.certificate) {
            (Some(chain), _) => chain.certificates,
            (None, Some(leaf)) => vec![leaf],
            (None, None) => Vec::new(),
        };
        let certificates = at_most(certificates, MAX_CHAIN + 1, "certificates")?
            .iter()
            .map(|c| base64("certificate", &c.raw_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let tlog = at_most(material.tlog_entries, MAX_ENTRIES, "tlog entries")?
            .into_iter()
            .map(|e| {
                Ok(TlogEntry {
                    logged: LoggedEntry {
                        log_id: hex::encode(base64("logId", &e.log_id.key_id)?),
                        log_index: e.log_index,
                        integrated_time: e.integrated_time,
                        tree_size: None,
                    },
                    kind: e.kind_version.kind,
                    version: e.kind_version.version,
                    body: base64("canonicalizedBody", &e.canonicalized_body)?,
                    promise: e
                        .inclusion_promise
                        .map(|p| base64("signedEntryTimestamp", &p.signed_entry_timestamp))
                        .transpose()?,
                    proof: e.inclusion_proof.map(parse_proof).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let timestamps = material
            .timestamp_verification_data
            .map(|t| t.rfc3161_timestamps)
            .unwrap_or_default();
        let timestamps = at_most(timestamps, MAX_ENTRIES, "timestamps")?
            .iter()
            .map(|t| base64("signedTimestamp", &t.signed_timestamp))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Bundle {
            envelope,
            certificates,
            tlog,
            timestamps,
        })
    }

    /// The bundle's log entry, verified against `logs`: a Rekor v1 entry's inclusion
    /// promise, or a Rekor v2 entry's checkpoint and inclusion proof; then its body bound to
    /// this envelope's payload, `signature` and `signer`. `None` when no entry carries either;
    /// the first entry that carries one is judged, and one that does not verify is an error,
    /// not an absence.
    fn logged(
        &self,
        logs: &LogKeys,
        signature: &[u8],
        signer: LoggedSigner,
    ) -> Result<Option<LoggedEntry>, String> {
        for entry in &self.tlog {
            let logged = match (&entry.promise, &entry.proof) {
                (Some(promise), _) => {
                    verify_promise(&entry.logged, &entry.body, promise, logs)
                        .map_err(|e| format!("ctlog: {e}"))?;
                    entry.logged.clone()
                }
                (None, Some(proof)) if entry.is_v2() => verify_inclusion(
                    &entry.logged.log_id,
                    entry.logged.log_index,
                    &entry.body,
                    proof,
                    logs,
                )
                .map_err(|e| format!("ctlog: {e}"))?,
                _ => continue,
            };
            bind_entry(entry, &self.envelope.payload, signature, signer)?;
            return Ok(Some(logged));
        }
        Ok(None)
    }
}

/// A `dsse` entry logs the payload hash and each signature with its verifier; an `intoto`
/// (v0.0.2) entry the payload hash and each signature's key or certificate.
fn bind_entry(
    entry: &TlogEntry,
    payload: &[u8],
    signature: &[u8],
    signer: LoggedSigner,
) -> Result<(), String> {
    let mismatch = |what: &str| format!("ctlog: the log entry does not match this bundle: {what}");
    if entry.is_v2() {
        return bind_v2_entry(entry, payload, signature, signer);
    }
    let body: Value = serde_json::from_slice(&entry.body)
        .map_err(|e| format!("ctlog: log entry body is not JSON: {e}"))?;
    if body["kind"] != entry.kind.as_str() {
        return Err(mismatch("its kind differs from the bundle's"));
    }
    let spec = &body["spec"];
    let (payload_hash, signatures) = match entry.kind.as_str() {
        "dsse" => (&spec["payloadHash"], &spec["signatures"]),
        "intoto" => (
            &spec["content"]["payloadHash"],
            &spec["content"]["envelope"]["signatures"],
        ),
        other => {
            return Err(format!(
                "ctlog: a {other} entry cannot log a DSSE envelope (want dsse or intoto)"
            ))
        }
    };
    let wanted = hex::encode(sha2::Sha256::digest(payload));
    if payload_hash["algorithm"] != "sha256" || payload_hash["value"] != wanted.as_str() {
        return Err(mismatch("payload hash differs"));
    }
    let logged = signatures.as_array().map(Vec::as_slice).unwrap_or_default();
    let names_signer = logged.iter().any(|s| match entry.kind.as_str() {
        "dsse" => {
            signer.is_named_by(&s["verifier"])
                && s["signature"]
                    .as_str()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .is_some_and(|b| b == signature)
        }
        _ => signer.is_named_by(&s["publicKey"]),
    });
    if !names_signer {
        return Err(mismatch("signature or signer differs"));
    }
    Ok(())
}

/// A Rekor v2 `dsse` entry (parsed by sigstore-rekor) logs the payload's SHA-256 and each
/// signature with the key or certificate that verifies it. A `hashedrekord` entry logs a
/// message signature, which cannot be this envelope's.
fn bind_v2_entry(
    entry: &TlogEntry,
    payload: &[u8],
    signature: &[u8],
    signer: LoggedSigner,
) -> Result<(), String> {
    use sigstore_rekor::body::RekorEntryBody;
    use sigstore_types::HashAlgorithm as LoggedHash;
    let mismatch = |what: &str| format!("ctlog: the log entry does not match this bundle: {what}");
    // The body is what the proof authenticates: its own kind must be the one declared.
    let declared: Value = serde_json::from_slice(&entry.body)
        .map_err(|e| format!("ctlog: log entry body is not JSON: {e}"))?;
    if declared["kind"] != entry.kind.as_str() || declared["apiVersion"] != "0.0.2" {
        return Err(mismatch("its kind differs from the bundle's"));
    }
    let body = RekorEntryBody::from_json(&entry.body, &entry.kind, &entry.version)
        .map_err(|e| format!("ctlog: log entry body: {e}"))?;
    let RekorEntryBody::DsseV002(body) = body else {
        return Err(format!(
            "ctlog: a {} entry cannot log a DSSE envelope (want dsse)",
            entry.kind
        ));
    };
    let logged = &body.spec.dsse_v002;
    let wanted = sha2::Sha256::digest(payload);
    if logged.payload_hash.algorithm != LoggedHash::Sha2256
        || logged.payload_hash.digest.as_bytes() != wanted.as_slice()
    {
        return Err(mismatch("payload hash differs"));
    }
    let names_signer = logged.signatures.iter().any(|s| {
        let verifier = &s.verifier;
        let named = match signer {
            LoggedSigner::Key(key) => verifier
                .public_key
                .as_ref()
                .is_some_and(|k| k.raw_bytes.as_bytes() == key.spki_der()),
            LoggedSigner::Certificate(der) => verifier
                .x509_certificate
                .as_ref()
                .is_some_and(|c| c.raw_bytes.as_bytes() == der),
        };
        named && s.content.as_bytes() == signature
    });
    if !names_signer {
        return Err(mismatch("signature or signer differs"));
    }
    Ok(())
}

/// Verifies the bundle `raw` for `digest` with the authority's `signer` and reads its
/// statement.
pub(super) fn verified_statement(
    raw: &[u8],
    digest: &str,
    signer: &Signer,
) -> Result<Verified, String> {
    let bundle = Bundle::parse(raw)?;
    let envelope = &bundle.envelope;
    let signed = pae(&envelope.payload_type, &envelope.payload);
    let mut verified = Verified::default();
    match signer {
        Signer::Keys {
            keys,
            hash,
            tlog,
            timestamp_authorities,
        } => {
            let (key, signature) = keys
                .iter()
                .find_map(|k| {
                    let sig = envelope
                        .signatures
                        .iter()
                        .find(|s| k.verify(*hash, &signed, s))?;
                    Some((k, sig))
                })
                .ok_or("bundle signature does not verify with the authority's key")?;
            if let Some(logs) = tlog {
                verified.tlog = Some(bundle.logged(logs, signature, LoggedSigner::Key(key))?.ok_or(
                    "ctlog is required but the bundle has no transparency log entry with an inclusion promise or a Rekor v2 inclusion proof",
                )?);
            }
            verified.timestamp = authority_timestamp(
                *timestamp_authorities,
                bundle
                    .timestamps
                    .first()
                    .map(|der| (Stamp::Der(der), signature.as_slice())),
            )?;
        }
        Signer::Keyless { check, now } => {
            if bundle.certificates.is_empty() {
                return Err("bundle has no certificate (not a keyless signature)".into());
            }
            let certificate = SignerCertificate::from_der(&bundle.certificates)?;
            let signature = envelope
                .signatures
                .iter()
                .find(|s| certificate.key().verify(HashAlgorithm::Sha256, &signed, s))
                .ok_or("bundle signature does not verify with the certificate's key")?;
            let tlog = bundle.logged(
                &check.tlog,
                signature,
                LoggedSigner::Certificate(certificate.leaf_der()),
            )?;
            let evidence = Evidence {
                tlog,
                rfc3161_timestamp: bundle
                    .timestamps
                    .first()
                    .map(|der| (Stamp::Der(der), signature.as_slice())),
                from_bundle: true,
            };
            let found = certificate.verify(check, evidence, *now)?;
            verified.subject = Some(found.subject);
            verified.issuer = Some(found.issuer);
            verified.tlog = found.tlog;
            verified.timestamp = found.timestamp;
        }
    }
    read_statement(verified, &envelope.payload_type, &envelope.payload, digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert!(is_bundle_media_type(BUNDLE_MEDIA_TYPE));
        assert!(is_bundle_media_type(
            "application/vnd.dev.sigstore.bundle+json;version=0.1"
        ));
        assert!(!is_bundle_media_type(
            "application/vnd.dsse.envelope.v1+json"
        ));
        assert!(!is_bundle_media_type(""));
    }

    #[test]
    fn malformed_bundles_are_reasons() {
        let env =
            r#""dsseEnvelope":{"payload":"e30=","payloadType":"x","signatures":[{"sig":"AA=="}]}"#;
        let cases: [(String, &str); 7] = [
            ("{".into(), "not a Sigstore bundle"),
            (r#"{"mediaType":"text/plain"}"#.into(), "media type"),
            (
                format!(r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}","messageSignature":{{}}}}"#),
                "message signature",
            ),
            (
                format!(r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}",{env}}}"#),
                "no verificationMaterial",
            ),
            (
                format!(
                    r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}",{env},"verificationMaterial":{{"tlogEntries":[{{"logIndex":"x","logId":{{"keyId":""}},"kindVersion":{{"kind":"dsse"}},"canonicalizedBody":""}}]}}}}"#
                ),
                "not a 64-bit integer",
            ),
            (
                format!(
                    r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}","dsseEnvelope":{{"payload":"%%","payloadType":"x","signatures":[{{"sig":"AA=="}}]}},"verificationMaterial":{{}}}}"#
                ),
                "payload is not base64",
            ),
            (
                format!(
                    r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}","dsseEnvelope":{{"payload":"e30=","payloadType":"x","signatures":[]}},"verificationMaterial":{{}}}}"#
                ),
                "no signatures",
            ),
        ];
        for (raw, want) in cases {
            let err = Bundle::parse(raw.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{raw}: {err}");
        }
    }

    #[test]
    fn malformed_inclusion_proofs_are_reasons() {
        let bundle = |proof: &str| {
            format!(
                r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}","dsseEnvelope":{{"payload":"e30=","payloadType":"x","signatures":[{{"sig":"AA=="}}]}},"verificationMaterial":{{"tlogEntries":[{{"logIndex":"1","logId":{{"keyId":"qg=="}},"kindVersion":{{"kind":"dsse","version":"0.0.2"}},"inclusionProof":{proof},"canonicalizedBody":"e30="}}]}}}}"#
            )
        };
        let many = vec![r#""AA==""#; MAX_PROOF_HASHES + 1].join(",");
        let cases = [
            (
                format!(r#"{{"logIndex":"1","hashes":[{many}],"checkpoint":{{"envelope":"x"}}}}"#),
                "more than 64",
            ),
            (
                r#"{"logIndex":"1","hashes":["%%"],"checkpoint":{"envelope":"x"}}"#.into(),
                "inclusionProof hash is not base64",
            ),
            (
                r#"{"logIndex":"1","hashes":[]}"#.into(),
                "missing field `checkpoint`",
            ),
        ];
        for (proof, want) in cases {
            let err = Bundle::parse(bundle(&proof).as_bytes()).unwrap_err();
            assert!(err.contains(want), "{proof}: {err}");
        }
        let ok = Bundle::parse(
            bundle(r#"{"logIndex":"1","treeSize":"2","rootHash":"AA==","hashes":["AA=="],"checkpoint":{"envelope":"x"}}"#)
                .as_bytes(),
        )
        .unwrap();
        let entry = &ok.tlog[0];
        assert!(entry.is_v2() && entry.logged.integrated_time.is_none());
        assert_eq!(entry.proof.as_ref().unwrap().tree_size, Some(2));
    }

    #[test]
    fn int64_fields_take_strings_and_numbers() {
        let raw = format!(
            r#"{{"mediaType":"{BUNDLE_MEDIA_TYPE}","dsseEnvelope":{{"payload":"e30=","payloadType":"x","signatures":[{{"sig":"AA=="}}]}},"verificationMaterial":{{"tlogEntries":[{{"logIndex":"7","logId":{{"keyId":"qg=="}},"kindVersion":{{"kind":"dsse"}},"integratedTime":9,"canonicalizedBody":"e30="}}]}}}}"#
        );
        let bundle = Bundle::parse(raw.as_bytes()).unwrap();
        let entry = &bundle.tlog[0];
        assert_eq!(
            (entry.logged.log_index, entry.logged.integrated_time),
            (7, Some(9))
        );
        assert_eq!(entry.logged.log_id, "aa");
        assert!(entry.promise.is_none());
    }
}

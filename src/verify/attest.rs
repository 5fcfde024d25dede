//! Attestations: cosign's `sha256-<hex>.att` layers, each a DSSE envelope holding an in-toto
//! statement. An envelope counts only when its signature verifies under the authority (key or
//! keyless certificate), its statement names this image's digest, its predicate type is the one
//! asked for, and its policy (rego) accepts it. Pure functions over fetched layers.

use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Digest as _;

use super::cosign::{LayerFormat, SignatureLayer};
use super::keyless::{Evidence, KeylessCheck, SignerCertificate, Stamp};
use super::keys::{HashAlgorithm, PublicKey};
use super::rekor::{verify_set, LogKeys, LoggedEntry};
use super::trust_root::CertificateAuthority;
use super::tsa::{authority_timestamp, VerifiedTimestamp};
use super::x509::pem_certificates;
use crate::policy::rego::RegoPolicy;

/// Media type of an attestation layer.
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The only payload type cosign attestations carry.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// More signatures than this on one envelope is not something cosign writes: refuse it
/// rather than try each.
pub(super) const MAX_ENVELOPE_SIGNATURES: usize = 16;
/// The predicate type of the statement cosign v3 signs to sign an image (`cosign sign` in the
/// Sigstore bundle format).
pub const COSIGN_SIGN_PREDICATE_TYPE: &str = "https://sigstore.dev/cosign/sign/v1";

/// cosign's predicate type short names (`cosign attest --type`), as policy-controller matches
/// them; anything else is a full URI compared as is.
pub fn predicate_type_uri(name: &str) -> &str {
    match name {
        "custom" => "https://cosign.sigstore.dev/attestation/v1",
        "slsaprovenance" | "slsaprovenance02" => "https://slsa.dev/provenance/v0.2",
        "slsaprovenance1" => "https://slsa.dev/provenance/v1",
        "spdx" | "spdxjson" => "https://spdx.dev/Document",
        "cyclonedx" => "https://cyclonedx.org/bom",
        "link" => "https://in-toto.io/Link/v1",
        "vuln" => "https://cosign.sigstore.dev/attestation/vuln/v1",
        "openvex" => "https://openvex.dev/ns",
        uri => uri,
    }
}

/// What an attestation's `policy` is, compiled at snapshot build.
#[derive(Debug, Clone)]
pub enum AttestationPolicy {
    Rego(Arc<RegoPolicy>),
    /// A policy pullgate cannot evaluate (cue): every envelope fails with this reason.
    Unsupported(String),
}

/// One `attestations[]` entry of an authority.
#[derive(Debug, Clone)]
pub struct AttestationCheck {
    pub name: String,
    /// The full predicate type URI.
    pub predicate_type: String,
    pub policy: Option<AttestationPolicy>,
}

/// Who must have signed the envelope: the authority's signer.
pub enum Signer<'a> {
    Keys {
        keys: &'a [PublicKey],
        hash: HashAlgorithm,
        /// `Some` when the authority has a `ctlog`: a verified Rekor bundle is required.
        tlog: Option<&'a LogKeys>,
        /// `Some` when the authority has `rfc3161timestamp`: a timestamp is required.
        timestamp_authorities: Option<&'a [CertificateAuthority]>,
    },
    Keyless {
        check: &'a KeylessCheck,
        now: i64,
    },
}

#[derive(Deserialize)]
struct Envelope {
    #[serde(rename = "payloadType")]
    payload_type: String,
    payload: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Deserialize)]
struct EnvelopeSignature {
    sig: String,
}

/// An attestation that satisfied one `attestations[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationMatch {
    pub name: String,
    pub predicate_type: String,
    pub layer_digest: String,
    /// Keyless: the certificate identity that matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tlog: Option<LoggedEntry>,
    /// Keyless: the verified RFC 3161 timestamp the certificate was judged at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<VerifiedTimestamp>,
}

/// What a verified envelope proves.
#[derive(Default)]
pub(super) struct Verified {
    pub statement: Value,
    pub predicate_type: String,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub tlog: Option<LoggedEntry>,
    pub timestamp: Option<VerifiedTimestamp>,
}

/// DSSE pre-authentication encoding: what the envelope's signatures cover.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Who a Rekor entry must name as the signer.
#[derive(Clone, Copy)]
pub(super) enum LoggedSigner<'a> {
    Key(&'a PublicKey),
    /// DER of the leaf certificate.
    Certificate(&'a [u8]),
}

impl LoggedSigner<'_> {
    /// Whether `logged` (an entry's base64 PEM key or certificate) names this signer.
    pub(super) fn is_named_by(self, logged: &Value) -> bool {
        let Some(pem) = logged
            .as_str()
            .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
            .and_then(|p| String::from_utf8(p).ok())
        else {
            return false;
        };
        match self {
            LoggedSigner::Key(key) => PublicKey::from_pem(&pem).ok().as_ref() == Some(key),
            LoggedSigner::Certificate(der) => pem_certificates(&pem)
                .ok()
                .and_then(|c| c.into_iter().next())
                .is_some_and(|c| c == der),
        }
    }
}

/// Verifies the Rekor bundle of an attestation. cosign logs attestations as `intoto`
/// (v0.0.1 or v0.0.2) or `dsse` entries; as in cosign's own offline check, the entry binds
/// the SHA-256 of the whole envelope (the layer blob) and the signer's key or certificate.
fn verify_attestation_bundle(
    raw: &str,
    logs: &LogKeys,
    envelope: &[u8],
    signer: LoggedSigner,
) -> Result<LoggedEntry, String> {
    let (logged, body) = verify_set(raw, logs).map_err(|e| format!("ctlog: {e}"))?;
    let entry: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("ctlog: malformed bundle: body is not JSON: {e}"))?;
    let spec = &entry["spec"];
    let (hash, key) = match entry["kind"].as_str() {
        Some("intoto") => (
            &spec["content"]["hash"],
            spec.get("publicKey")
                .unwrap_or(&spec["content"]["envelope"]["signatures"][0]["publicKey"]),
        ),
        Some("dsse") => (&spec["envelopeHash"], &spec["signatures"][0]["verifier"]),
        other => {
            return Err(format!(
                "ctlog: a {} entry cannot log an attestation (want intoto or dsse)",
                other.unwrap_or("kindless")
            ))
        }
    };
    let envelope_hash = hex::encode(sha2::Sha256::digest(envelope));
    if hash["algorithm"] != "sha256" || hash["value"] != envelope_hash.as_str() {
        return Err(
            "ctlog: bundle entry does not match this attestation: envelope hash differs".into(),
        );
    }
    if key.is_null() {
        return Err("ctlog: bundle entry does not name the signer's key".into());
    }
    if !signer.is_named_by(key) {
        return Err("ctlog: bundle entry does not match this attestation: signer differs".into());
    }
    Ok(logged)
}

/// Checks the envelope's signatures over `signed` (its PAE) with the authority's signer.
fn verify_signature(
    layer: &SignatureLayer,
    signatures: &[EnvelopeSignature],
    signed: &[u8],
    signer: &Signer,
) -> Result<Verified, String> {
    let mut verified = Verified::default();
    match signer {
        Signer::Keys {
            keys,
            hash,
            tlog,
            timestamp_authorities,
        } => {
            // cosign stamps a legacy attestation's envelope, as for keyless ones.
            verified.timestamp = authority_timestamp(
                *timestamp_authorities,
                layer
                    .rfc3161_timestamp
                    .as_deref()
                    .map(|raw| (Stamp::Annotation(raw), layer.payload.as_slice())),
            )?;
            let key = keys
                .iter()
                .find(|k| {
                    signatures
                        .iter()
                        .any(|s| k.verify_b64(*hash, signed, &s.sig))
                })
                .ok_or("attestation signature does not verify with the authority's key")?;
            if let Some(logs) = tlog {
                let bundle = layer
                    .bundle
                    .as_deref()
                    .ok_or("ctlog is required but the attestation has no Rekor bundle")?;
                verified.tlog = Some(verify_attestation_bundle(
                    bundle,
                    logs,
                    &layer.payload,
                    LoggedSigner::Key(key),
                )?);
            }
        }
        Signer::Keyless { check, now } => {
            let pem = layer
                .certificate
                .as_deref()
                .ok_or("attestation has no certificate (not a keyless attestation)")?;
            let certificate = SignerCertificate::parse(pem, layer.chain.as_deref())?;
            if !signatures.iter().any(|s| {
                certificate
                    .key()
                    .verify_b64(HashAlgorithm::Sha256, signed, &s.sig)
            }) {
                return Err(
                    "attestation signature does not verify with the certificate's key".into(),
                );
            }
            // Attestations are logged as intoto/dsse entries, checked here; the certificate
            // is then judged at the log time (and at a timestamp over the envelope, which is
            // what cosign stamps for attestations).
            let tlog = match layer.bundle.as_deref() {
                Some(bundle) => {
                    let leaf = pem_certificates(pem)
                        .map_err(|e| format!("signing certificate: {e}"))?
                        .into_iter()
                        .next()
                        .ok_or("signing certificate: empty")?;
                    Some(verify_attestation_bundle(
                        bundle,
                        &check.tlog,
                        &layer.payload,
                        LoggedSigner::Certificate(&leaf),
                    )?)
                }
                None if check.require_tlog => {
                    return Err("ctlog is required but the attestation has no Rekor bundle".into())
                }
                None => None,
            };
            let evidence = Evidence {
                tlog,
                rfc3161_timestamp: layer
                    .rfc3161_timestamp
                    .as_deref()
                    .map(|raw| (Stamp::Annotation(raw), layer.payload.as_slice())),
                from_bundle: false,
            };
            let found = certificate.verify(check, evidence, *now)?;
            verified.subject = Some(found.subject);
            verified.issuer = Some(found.issuer);
            verified.tlog = found.tlog;
            verified.timestamp = found.timestamp;
        }
    }
    Ok(verified)
}

/// A verified statement: the envelope's signature checked, then the statement parsed and
/// bound to `digest`. Nothing is read from the payload before its signature verified.
fn verified_statement(
    layer: &SignatureLayer,
    digest: &str,
    signer: &Signer,
) -> Result<Verified, String> {
    if layer.format == LayerFormat::SigstoreBundle {
        return super::bundle::verified_statement(&layer.payload, digest, signer);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let envelope: Envelope = serde_json::from_slice(&layer.payload)
        .map_err(|e| format!("attestation is not a DSSE envelope: {e}"))?;
    if envelope.signatures.is_empty() {
        return Err("attestation envelope has no signatures".into());
    }
    if envelope.signatures.len() > MAX_ENVELOPE_SIGNATURES {
        return Err(format!(
            "attestation envelope has {} signatures, more than {MAX_ENVELOPE_SIGNATURES}",
            envelope.signatures.len()
        ));
    }
    let payload = b64
        .decode(envelope.payload.trim())
        .map_err(|e| format!("attestation DSSE payload is not base64: {e}"))?;
    let signed = pae(&envelope.payload_type, &payload);
    let verified = verify_signature(layer, &envelope.signatures, &signed, signer)?;
    read_statement(verified, &envelope.payload_type, &payload, digest)
}

/// Reads the in-toto statement of an envelope whose signature `verified` holds: it must be
/// one, name `digest` as a subject, and say its predicate type.
pub(super) fn read_statement(
    mut verified: Verified,
    payload_type: &str,
    payload: &[u8],
    digest: &str,
) -> Result<Verified, String> {
    if payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!(
            "attestation payload type {payload_type:?} is not {IN_TOTO_PAYLOAD_TYPE}"
        ));
    }
    let statement: Value = serde_json::from_slice(payload)
        .map_err(|e| format!("attestation payload is not an in-toto statement: {e}"))?;
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let names_image = statement["subject"]
        .as_array()
        .is_some_and(|s| s.iter().any(|sub| sub["digest"]["sha256"] == hex));
    if !names_image {
        return Err(format!(
            "attestation is for another image: its subject does not name {digest}"
        ));
    }
    verified.predicate_type = statement["predicateType"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    verified.statement = statement;
    Ok(verified)
}

/// Runs `check`'s policy on a verified statement of the right type.
fn apply_policy(check: &AttestationCheck, statement: &Value) -> Result<(), String> {
    match &check.policy {
        None => Ok(()),
        Some(AttestationPolicy::Unsupported(reason)) => Err(reason.clone()),
        Some(AttestationPolicy::Rego(policy)) => policy
            .evaluate(statement)
            .map_err(|e| format!("failed evaluating rego policy for type {}: {e}", check.name)),
    }
}

/// Checks that every attestation in `checks` is satisfied by at least one of `layers`. The
/// error is the cause users see.
pub fn check_attestations(
    layers: &[SignatureLayer],
    digest: &str,
    signer: &Signer,
    checks: &[AttestationCheck],
) -> Result<Vec<AttestationMatch>, String> {
    check_statements(layers, digest, signer, checks, "attestations")
}

/// Finds an image signature among Sigstore bundles (cosign v3): a signed statement of type
/// [`COSIGN_SIGN_PREDICATE_TYPE`] naming `digest`. The errors read as for signatures:
/// `no signatures found`, `no matching signatures: …`.
pub fn check_bundle_signatures(
    layers: &[SignatureLayer],
    digest: &str,
    signer: &Signer,
) -> Result<AttestationMatch, String> {
    let sign = [AttestationCheck {
        name: "signature".into(),
        predicate_type: COSIGN_SIGN_PREDICATE_TYPE.into(),
        policy: None,
    }];
    let mut found = check_statements(layers, digest, signer, &sign, "signatures")?;
    found.pop().ok_or_else(|| "no signatures found".into())
}

/// Checks that every check is satisfied by one of `layers`; `noun` names what they are in
/// the causes users see.
fn check_statements(
    layers: &[SignatureLayer],
    digest: &str,
    signer: &Signer,
    checks: &[AttestationCheck],
    noun: &str,
) -> Result<Vec<AttestationMatch>, String> {
    if layers.is_empty() {
        return Err(format!("no {noun} found"));
    }
    // Verify each envelope once, whatever number of attestations are asked for.
    let verified: Vec<Result<Verified, String>> = layers
        .iter()
        .map(|l| verified_statement(l, digest, signer))
        .collect();
    let mut invalid: Vec<&str> = Vec::new();
    for e in verified.iter().filter_map(|v| v.as_ref().err()) {
        if !invalid.contains(&e.as_str()) {
            invalid.push(e);
        }
    }
    if verified.iter().all(Result::is_err) {
        return Err(format!("no matching {noun}: {}", invalid.join("; ")));
    }
    let mut matches = Vec::new();
    for check in checks {
        let mut policy_failure = None;
        let mut seen_types: Vec<&str> = Vec::new();
        let found = layers.iter().zip(&verified).find_map(|(layer, v)| {
            let v = v.as_ref().ok()?;
            if !seen_types.contains(&v.predicate_type.as_str()) {
                seen_types.push(&v.predicate_type);
            }
            if v.predicate_type != check.predicate_type {
                return None;
            }
            match apply_policy(check, &v.statement) {
                Ok(()) => Some((layer, v)),
                Err(e) => {
                    policy_failure.get_or_insert(e);
                    None
                }
            }
        });
        let Some((layer, v)) = found else {
            // A policy that rejected a matching attestation is the specific reason.
            if let Some(e) = policy_failure {
                return Err(e);
            }
            let mut reason = format!(
                "no matching {noun} with type {}, checked the following predicateTypes: {:?}",
                check.predicate_type,
                seen_types.join(",")
            );
            if !invalid.is_empty() {
                reason.push_str(&format!("; also rejected: {}", invalid.join("; ")));
            }
            return Err(reason);
        };
        matches.push(AttestationMatch {
            name: check.name.clone(),
            predicate_type: check.predicate_type.clone(),
            layer_digest: layer.layer_digest.clone(),
            subject: v.subject.clone(),
            issuer: v.issuer.clone(),
            tlog: v.tlog.clone(),
            timestamp: v.timestamp.clone(),
        });
    }
    Ok(matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(payload: &[u8]) -> SignatureLayer {
        SignatureLayer {
            layer_digest: "sha256:00".into(),
            format: LayerFormat::Legacy,
            payload: payload.to_vec(),
            signature: None,
            bundle: None,
            certificate: None,
            chain: None,
            rfc3161_timestamp: None,
        }
    }

    const NO_KEYS: Signer = Signer::Keys {
        keys: &[],
        hash: HashAlgorithm::Sha256,
        tlog: None,
        timestamp_authorities: None,
    };

    fn checks() -> [AttestationCheck; 1] {
        [AttestationCheck {
            name: "a".into(),
            predicate_type: "p".into(),
            policy: None,
        }]
    }

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // The DSSE specification's worked example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
    }

    #[test]
    fn short_names() {
        assert_eq!(
            predicate_type_uri("vuln"),
            "https://cosign.sigstore.dev/attestation/vuln/v1"
        );
        assert_eq!(
            predicate_type_uri("slsaprovenance1"),
            "https://slsa.dev/provenance/v1"
        );
        assert_eq!(
            predicate_type_uri("https://x.example/p"),
            "https://x.example/p"
        );
    }

    #[test]
    fn malformed_envelopes_are_reasons() {
        let cases: [(&[u8], &str); 4] = [
            (b"{not json", "not a DSSE envelope"),
            (
                br#"{"payloadType":"x","payload":"e30=","signatures":[]}"#,
                "has no signatures",
            ),
            (
                br#"{"payloadType":"x","payload":"%%%","signatures":[{"sig":"AA=="}]}"#,
                "payload is not base64",
            ),
            (
                br#"{"payloadType":"x","payload":"e30=","signatures":[{"sig":"AA=="}]}"#,
                "does not verify with the authority's key",
            ),
        ];
        for (payload, want) in cases {
            let err = check_attestations(&[layer(payload)], "sha256:ab", &NO_KEYS, &checks())
                .unwrap_err();
            assert!(err.starts_with("no matching attestations: "), "{err}");
            assert!(err.contains(want), "{err}");
        }
        assert_eq!(
            check_attestations(&[], "sha256:ab", &NO_KEYS, &checks()).unwrap_err(),
            "no attestations found"
        );
    }
}

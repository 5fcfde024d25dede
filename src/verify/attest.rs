//! Attestations: cosign's `sha256-<hex>.att` layers, each a DSSE envelope holding an in-toto
//! statement. An envelope counts only when its signature verifies under the authority (key or
//! keyless certificate), its statement names this image's digest, its predicate type is the one
//! asked for, and its policy (rego) accepts it. Pure functions over fetched layers.

use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::cosign::SignatureLayer;
use super::keyless::{verify_signer, KeylessCheck};
use super::keys::{HashAlgorithm, PublicKey};
use crate::policy::rego::RegoPolicy;

/// Media type of an attestation layer.
pub const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";
/// The only payload type cosign attestations carry.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

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

/// Who must have signed the envelope.
pub enum Signer<'a> {
    Keys {
        keys: &'a [PublicKey],
        hash: HashAlgorithm,
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

/// The attestations that satisfied an authority, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationMatch {
    pub name: String,
    pub predicate_type: String,
    pub layer_digest: String,
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

/// A verified statement: the envelope's signature checked, the statement parsed and bound to
/// `digest`. Returns the statement and its predicate type.
fn verified_statement(
    layer: &SignatureLayer,
    digest: &str,
    signer: &Signer,
) -> Result<(Value, String), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let envelope: Envelope = serde_json::from_slice(&layer.payload)
        .map_err(|e| format!("attestation is not a DSSE envelope: {e}"))?;
    let payload = b64
        .decode(envelope.payload.trim())
        .map_err(|e| format!("DSSE payload is not base64: {e}"))?;
    let signed = pae(&envelope.payload_type, &payload);
    let verified = envelope.signatures.iter().any(|s| match signer {
        Signer::Keys { keys, hash } => keys.iter().any(|k| k.verify_b64(*hash, &signed, &s.sig)),
        Signer::Keyless { check, now } => {
            verify_signer(layer, &signed, &s.sig, check, *now).is_ok()
        }
    });
    if !verified {
        // For keyless, say why the certificate failed: that is what users need to fix.
        if let (Signer::Keyless { check, now }, Some(s)) = (signer, envelope.signatures.first()) {
            verify_signer(layer, &signed, &s.sig, check, *now)?;
        }
        return Err("attestation signature does not verify with the authority's key".into());
    }
    if envelope.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err(format!(
            "attestation payload type {:?} is not {IN_TOTO_PAYLOAD_TYPE}",
            envelope.payload_type
        ));
    }
    let statement: Value = serde_json::from_slice(&payload)
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
    let predicate_type = statement["predicateType"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok((statement, predicate_type))
}

/// Checks that every attestation in `checks` is satisfied by one of `layers`.
pub fn check_attestations(
    layers: &[SignatureLayer],
    digest: &str,
    signer: &Signer,
    checks: &[AttestationCheck],
) -> Result<Vec<AttestationMatch>, String> {
    if layers.is_empty() {
        return Err("no attestations found".into());
    }
    // Verify each envelope once, whatever number of attestations are asked for.
    let verified: Vec<Result<(Value, String), String>> = layers
        .iter()
        .map(|l| verified_statement(l, digest, signer))
        .collect();
    let mut matches = Vec::new();
    for check in checks {
        let mut causes: Vec<String> = Vec::new();
        let mut found = None;
        for (layer, result) in layers.iter().zip(&verified) {
            let cause = match result {
                Err(e) => e.clone(),
                Ok((_, pt)) if pt != &check.predicate_type => {
                    format!("predicate type {pt:?} is not {:?}", check.predicate_type)
                }
                Ok((statement, _)) => match &check.policy {
                    None => {
                        found = Some(layer);
                        break;
                    }
                    Some(AttestationPolicy::Unsupported(reason)) => reason.clone(),
                    Some(AttestationPolicy::Rego(policy)) => match policy.evaluate(statement) {
                        Ok(()) => {
                            found = Some(layer);
                            break;
                        }
                        Err(e) => format!("policy: {e}"),
                    },
                },
            };
            if !causes.contains(&cause) {
                causes.push(cause);
            }
        }
        match found {
            Some(layer) => matches.push(AttestationMatch {
                name: check.name.clone(),
                predicate_type: check.predicate_type.clone(),
                layer_digest: layer.layer_digest.clone(),
            }),
            None => {
                return Err(format!(
                    "no matching attestations for {:?} ({}): {}",
                    check.name,
                    check.predicate_type,
                    causes.join("; ")
                ))
            }
        }
    }
    Ok(matches)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let layer = SignatureLayer {
            layer_digest: "sha256:00".into(),
            payload: b"{not json".to_vec(),
            signature: None,
            bundle: None,
            certificate: None,
            chain: None,
        };
        let checks = [AttestationCheck {
            name: "a".into(),
            predicate_type: "p".into(),
            policy: None,
        }];
        let signer = Signer::Keys {
            keys: &[],
            hash: HashAlgorithm::Sha256,
        };
        let err = check_attestations(&[layer], "sha256:ab", &signer, &checks).unwrap_err();
        assert!(err.contains("not a DSSE envelope"), "{err}");
        assert_eq!(
            check_attestations(&[], "sha256:ab", &signer, &checks).unwrap_err(),
            "no attestations found"
        );
    }
}

//! cosign "simple signing" signatures (the `sha256-<hex>.sig` tag scheme) checked against a
//! key authority. Pure: the layers were fetched once per digest by the registry client and
//! every authority of every policy is checked against that one fetch.

use serde::{Deserialize, Serialize};

use super::keyless::{verify_signer, KeylessCheck, KeylessMatch};
use super::keys::{HashAlgorithm, PublicKey};
use super::rekor::{verify_bundle, LogKeys, LoggedEntry};
use super::trust_root::CertificateAuthority;
use super::tsa::{authority_timestamp, Stamp, VerifiedTimestamp};
use base64::Engine as _;

/// Media type of a cosign signature layer.
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature over the layer's payload.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Layer annotation holding the Rekor bundle.
pub const BUNDLE_ANNOTATION: &str = "dev.sigstore.cosign/bundle";
/// Layer annotation holding a signing certificate (keyless).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// Layer annotation holding the certificate's issuing chain (keyless).
pub const CHAIN_ANNOTATION: &str = "dev.sigstore.cosign/chain";
pub use super::tsa::RFC3161_TIMESTAMP_ANNOTATION;

/// How a layer stores its signature, which decides how it is read and what its log entry and
/// timestamp are bound to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerFormat {
    /// cosign's tag scheme: the payload is the signed blob, the rest are layer annotations.
    #[default]
    Legacy,
    /// A Sigstore bundle (cosign v3, attached as an OCI referrer): the payload is the bundle
    /// JSON, which carries the envelope, the signer and the evidence itself.
    SigstoreBundle,
}

/// One signature found in a signature manifest: the payload blob and the layer annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignatureLayer {
    pub layer_digest: String,
    pub format: LayerFormat,
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub signature: Option<String>,
    pub bundle: Option<String>,
    pub certificate: Option<String>,
    pub chain: Option<String>,
    /// cosign's RFC 3161 timestamp JSON (`dev.sigstore.cosign/rfc3161timestamp`).
    pub rfc3161_timestamp: Option<String>,
}

#[derive(Deserialize)]
struct SimpleSigning {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: CriticalImage,
    #[serde(rename = "type")]
    type_: String,
}

#[derive(Deserialize)]
struct CriticalImage {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// The signature that satisfied a key authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyMatch {
    pub layer_digest: String,
    pub key: String,
    pub tlog: Option<LoggedEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<VerifiedTimestamp>,
}

/// What a key authority demands of a signature.
pub struct KeyCheck<'a> {
    pub keys: &'a [PublicKey],
    pub hash: HashAlgorithm,
    /// `Some` when the authority has a `ctlog`: a verified Rekor bundle is required.
    pub tlog: Option<&'a LogKeys>,
    /// `Some` when the authority has `rfc3161timestamp`: a timestamp from one of these
    /// authorities over the signature is required.
    pub timestamp_authorities: Option<&'a [CertificateAuthority]>,
}

/// Finds a signature among `layers` that binds `digest` and verifies under the authority.
/// The error is the cause users see: `no signatures found` or `no matching signatures: …`.
pub fn check_key(
    layers: &[SignatureLayer],
    digest: &str,
    check: &KeyCheck,
) -> Result<KeyMatch, String> {
    first_match(layers, |layer| check_layer(layer, digest, check))
}

/// The signed simple-signing payload must name `digest`: that binds the signature to the image.
fn check_payload(payload: &[u8], digest: &str) -> Result<(), String> {
    let simple: SimpleSigning = serde_json::from_slice(payload)
        .map_err(|e| format!("signed payload is not a cosign simple-signing document: {e}"))?;
    if simple.critical.type_ != "cosign container image signature" {
        return Err(format!(
            "signed payload has type {:?}, not a cosign container image signature",
            simple.critical.type_
        ));
    }
    let signed = &simple.critical.image.docker_manifest_digest;
    if signed != digest {
        return Err(format!(
            "signature is for digest {signed}, not {digest} (copied from another image?)"
        ));
    }
    Ok(())
}

/// Finds a keyless signature among `layers` that binds `digest` and satisfies `check`.
pub fn check_keyless(
    layers: &[SignatureLayer],
    digest: &str,
    check: &KeylessCheck,
    now: i64,
) -> Result<KeylessMatch, String> {
    first_match(layers, |layer| {
        let Some(sig) = layer.signature.as_deref() else {
            return Err("signature layer has no signature annotation".into());
        };
        let (_, found) = verify_signer(layer, &layer.payload, sig, check, now)?;
        check_payload(&layer.payload, digest)?;
        Ok(found)
    })
}

/// The first layer `check` accepts, else every distinct cause: `no signatures found` or
/// `no matching signatures: …`.
fn first_match<T>(
    layers: &[SignatureLayer],
    check: impl Fn(&SignatureLayer) -> Result<T, String>,
) -> Result<T, String> {
    if layers.is_empty() {
        return Err("no signatures found".into());
    }
    let mut causes = Vec::new();
    for layer in layers {
        match check(layer) {
            Ok(m) => return Ok(m),
            Err(cause) => {
                if !causes.contains(&cause) {
                    causes.push(cause);
                }
            }
        }
    }
    Err(format!("no matching signatures: {}", causes.join("; ")))
}

fn check_layer(layer: &SignatureLayer, digest: &str, check: &KeyCheck) -> Result<KeyMatch, String> {
    let Some(sig) = layer.signature.as_deref() else {
        return Err("signature layer has no signature annotation".into());
    };
    let Some(key) = check
        .keys
        .iter()
        .find(|k| k.verify_b64(check.hash, &layer.payload, sig))
    else {
        return Err("signature does not verify with the authority's key".into());
    };
    check_payload(&layer.payload, digest)?;
    let tlog = match check.tlog {
        None => None,
        Some(logs) => {
            let Some(bundle) = layer.bundle.as_deref() else {
                return Err("ctlog is required but the signature has no Rekor bundle".into());
            };
            Some(
                verify_bundle(bundle, logs, &layer.payload, sig, key, None)
                    .map_err(|e| format!("ctlog: {e}"))?,
            )
        }
    };
    let raw_signature = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let timestamp = authority_timestamp(
        check.timestamp_authorities,
        layer
            .rfc3161_timestamp
            .as_deref()
            .map(|raw| (Stamp::Annotation(raw), raw_signature.as_slice())),
    )?;
    Ok(KeyMatch {
        layer_digest: layer.layer_digest.clone(),
        key: key.fingerprint(),
        tlog,
        timestamp,
    })
}

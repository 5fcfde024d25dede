//! Keyless (Fulcio-style) authorities: the signature layer carries a short-lived certificate;
//! it must chain to a trusted CA, carry an SCT from a trusted CT log (unless
//! `insecureIgnoreSCT`), have been valid when the signature was made (the Rekor integrated
//! time of a verified bundle, else now), and name an allowed identity. Then its key must verify
//! the signature.

use regex::Regex;
use serde::Serialize;

use super::cosign::SignatureLayer;
use super::keys::{HashAlgorithm, PublicKey};
use super::rekor::{verify_bundle, LogKeys, LoggedEntry};
use super::x509::{verify_chain, verify_embedded_sct, Cert, CtLogs};

/// The public-good Sigstore instance's Fulcio CA certificates and CT log keys.
const PUBLIC_GOOD: &str = include_str!("data/public_good.json");

#[derive(serde::Deserialize)]
struct PublicGood {
    fulcio: Vec<PublicGoodCert>,
    ct_logs: Vec<PublicGoodLog>,
}

#[derive(serde::Deserialize)]
struct PublicGoodCert {
    der: String,
}

#[derive(serde::Deserialize)]
struct PublicGoodLog {
    spki: String,
}

/// Fulcio's certificates and the CT log keys of the public-good instance, shipped as data.
pub fn public_good_roots() -> Result<(Vec<Cert>, CtLogs), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: PublicGood =
        serde_json::from_str(PUBLIC_GOOD).map_err(|e| format!("embedded trust root: {e}"))?;
    let certs = data
        .fulcio
        .iter()
        .map(|c| {
            let der = b64.decode(&c.der).map_err(|e| e.to_string())?;
            Cert::from_der(&der)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let logs = data
        .ct_logs
        .iter()
        .map(|l| {
            let der = b64.decode(&l.spki).map_err(|e| e.to_string())?;
            PublicKey::from_spki_der(&der).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((certs, CtLogs(logs)))
}

/// One `keyless.identities[]` entry, regular expressions compiled (unanchored, as Go's
/// `regexp.MatchString` in policy-controller).
#[derive(Debug, Clone)]
pub struct IdentityMatcher {
    pub issuer: Option<String>,
    pub issuer_re: Option<Regex>,
    pub subject: Option<String>,
    pub subject_re: Option<Regex>,
}

impl IdentityMatcher {
    fn issuer_matches(&self, issuer: &str) -> bool {
        self.issuer.as_deref().is_none_or(|i| i == issuer)
            && self.issuer_re.as_ref().is_none_or(|r| r.is_match(issuer))
    }

    fn subject_matches(&self, subject: &str) -> bool {
        self.subject.as_deref().is_none_or(|s| s == subject)
            && self.subject_re.as_ref().is_none_or(|r| r.is_match(subject))
    }

    fn describe(&self) -> String {
        let part = |exact: &Option<String>, re: &Option<Regex>| match (exact, re) {
            (Some(e), _) => format!("{e:?}"),
            (None, Some(r)) => format!("/{}/", r.as_str()),
            (None, None) => "any".into(),
        };
        format!(
            "issuer {} subject {}",
            part(&self.issuer, &self.issuer_re),
            part(&self.subject, &self.subject_re)
        )
    }
}

/// What a keyless authority demands.
#[derive(Debug, Clone)]
pub struct KeylessCheck {
    /// Trusted CA certificates: a path ending at any of them is trusted.
    pub anchors: Vec<Cert>,
    pub identities: Vec<IdentityMatcher>,
    /// CT log keys for the embedded SCT; `None` with `insecureIgnoreSCT: true`.
    pub ct_logs: Option<CtLogs>,
    /// Rekor keys bundles are verified against.
    pub tlog: LogKeys,
    /// The authority has `ctlog`: a verified Rekor bundle is required.
    pub require_tlog: bool,
}

/// The evidence of a keyless match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeylessMatch {
    pub layer_digest: String,
    pub issuer: String,
    pub subject: String,
    pub certificate_chain: Vec<String>,
    pub tlog: Option<LoggedEntry>,
}

/// The certificate of `layer`, checked against `check` for a signature `signature_b64` over
/// `signed` (the bytes the signer signed). Returns the verified leaf key and the evidence.
pub fn verify_signer(
    layer: &SignatureLayer,
    signed: &[u8],
    signature_b64: &str,
    check: &KeylessCheck,
    now: i64,
) -> Result<(PublicKey, KeylessMatch), String> {
    let Some(pem) = layer.certificate.as_deref() else {
        return Err("signature has no certificate (not a keyless signature)".into());
    };
    let leaf = Cert::from_pem_chain(pem)
        .map_err(|e| format!("signing certificate: {e}"))?
        .into_iter()
        .next()
        .ok_or("signing certificate: empty")?;
    if !leaf
        .key
        .verify_b64(HashAlgorithm::Sha256, signed, signature_b64)
    {
        return Err("signature does not verify with the certificate's key".into());
    }
    let chain = match layer.chain.as_deref() {
        Some(text) => Cert::from_pem_chain(text).map_err(|e| format!("certificate chain: {e}"))?,
        None => Vec::new(),
    };
    let tlog = match layer.bundle.as_deref() {
        Some(bundle) => Some(
            verify_bundle(
                bundle,
                &check.tlog,
                signed,
                signature_b64,
                &leaf.key,
                Some(&leaf.der),
            )
            .map_err(|e| format!("ctlog: {e}"))?,
        ),
        None if check.require_tlog => {
            return Err("ctlog is required but the signature has no Rekor bundle".into())
        }
        None => None,
    };
    // A Fulcio certificate lives minutes: what matters is that it was valid when the log saw
    // the signature. Without a log entry, only a certificate still valid now is accepted.
    let time = tlog.as_ref().map_or(now, |t| t.integrated_time);
    let path = verify_chain(&leaf, &chain, &check.anchors, time)?;
    if let Some(logs) = &check.ct_logs {
        let issuer = path.get(1).ok_or("certificate chain has no issuer")?;
        verify_embedded_sct(&leaf, issuer, logs)?;
    }
    let issuer = leaf.fulcio_issuer().unwrap_or_default();
    let sans = leaf.sans();
    let matched = check.identities.iter().find_map(|id| {
        if !id.issuer_matches(&issuer) {
            return None;
        }
        sans.iter().find(|s| id.subject_matches(s))
    });
    let Some(subject) = matched else {
        return Err(format!(
            "certificate identity did not match: issuer {issuer:?}, subjects {sans:?}; wanted {}",
            check
                .identities
                .iter()
                .map(IdentityMatcher::describe)
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    };
    Ok((
        leaf.key.clone(),
        KeylessMatch {
            layer_digest: layer.layer_digest.clone(),
            issuer,
            subject: subject.clone(),
            certificate_chain: path.iter().map(Cert::subject).collect(),
            tlog,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_good_roots_parse() {
        let (certs, logs) = public_good_roots().unwrap();
        assert_eq!(certs.len(), 3);
        assert!(certs.iter().all(|c| c.subject().contains("sigstore")));
        assert_eq!(logs.0.len(), 2);
        // The current CT log's ID, as sigstore publishes it (base64 of the SHA-256 of its key).
        use base64::Engine as _;
        let ids: Vec<String> = logs
            .0
            .iter()
            .map(|k| {
                base64::engine::general_purpose::STANDARD
                    .encode(hex::decode(k.fingerprint()).unwrap())
            })
            .collect();
        assert!(ids.contains(&"3T0wasbHETJjGR4cmWc3AqJKXrjePK3/h4pygC8p7o4=".to_string()));
    }

    #[test]
    fn garbage_certificates_are_errors() {
        assert!(Cert::from_pem_chain("no pem here").is_err());
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(Cert::from_pem_chain(bad)
            .unwrap_err()
            .contains("not a DER certificate"));
        let unterminated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(Cert::from_pem_chain(unterminated).is_err());
    }
}

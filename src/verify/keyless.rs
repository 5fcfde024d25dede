//! Keyless (Fulcio-style) authorities: the signature layer carries a short-lived certificate;
//! it must chain to a trusted CA, carry an SCT from a trusted CT log (unless
//! `insecureIgnoreSCT`), have been valid when the signature was made, and name an allowed
//! identity. Then its key must verify the signature.
//!
//! When the signature was made is taken only from verified evidence: the integrated time of a
//! Rekor bundle whose signed entry timestamp verifies and whose entry logs this certificate,
//! and/or an RFC 3161 timestamp from a trusted timestamp authority over the signature. A Rekor
//! v2 entry proves inclusion but carries no time: with one, the timestamp is required. The
//! certificate must have been valid at every such moment. With no evidence the certificate is
//! judged now: a Fulcio certificate lives ten minutes, so an expired one without a log entry
//! or timestamp is denied, never trusted on its word. An authority with `ctlog` requires the
//! bundle, one with `rfc3161timestamp` requires the timestamp; evidence that is present but
//! does not verify denies even when not required (it was offered as proof and is false).

use base64::Engine as _;
use regex::Regex;
use serde::Serialize;

use super::cosign::SignatureLayer;
use super::keys::{HashAlgorithm, PublicKey};
use super::rekor::{verify_bundle, LogKeys, LoggedEntry};
use super::trust_root::CertificateAuthority;
pub use super::tsa::Stamp;
use super::tsa::{authority_timestamp, VerifiedTimestamp};
use super::x509::{verify_chain, verify_embedded_sct, At, Cert, CtLogs, Purpose};

/// More certificates than this in a layer's chain annotation is not a Fulcio chain: refused
/// before any signature is checked, so a hostile layer cannot make path building expensive.
const MAX_LAYER_CHAIN: usize = 8;

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

/// What a keyless authority demands, compiled once per policy snapshot.
#[derive(Debug, Clone)]
pub struct KeylessCheck {
    /// Trusted Fulcio CAs: a path ending at any of their certificates, inside the CA's
    /// validity window, is trusted.
    pub fulcio: Vec<CertificateAuthority>,
    pub identities: Vec<IdentityMatcher>,
    /// CT log keys for the embedded SCT; `None` with `insecureIgnoreSCT: true`.
    pub ct_logs: Option<CtLogs>,
    /// Rekor keys bundles are verified against.
    pub tlog: LogKeys,
    /// The authority has `ctlog`: a verified Rekor bundle is required.
    pub require_tlog: bool,
    /// The authority has `rfc3161timestamp`: a timestamp signed by one of these is required.
    pub timestamp_authorities: Option<Vec<CertificateAuthority>>,
    /// The timestamp authorities of the trust material the certificate chains to. A Sigstore
    /// bundle's timestamp is checked against them when `rfc3161timestamp` names none: a bundle
    /// carries its evidence with it, and a Rekor v2 entry gives no time of its own.
    pub bundle_timestamp_authorities: Vec<CertificateAuthority>,
}

impl KeylessCheck {
    /// Bytes that change whenever what this check trusts changes (for the policy-set
    /// fingerprint that keys verdict caches).
    pub fn fingerprint_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let cas = super::trust_root::fingerprint_authorities;
        cas(&mut out, &self.fulcio);
        out.extend_from_slice(b"ct");
        for log in self.ct_logs.iter().flat_map(|l| &l.0) {
            out.extend_from_slice(log.spki_der());
        }
        out.extend_from_slice(b"tlog");
        for id in self.tlog.ids() {
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(format!("require_tlog {}\ntsa", self.require_tlog).as_bytes());
        if let Some(tsas) = &self.timestamp_authorities {
            cas(&mut out, tsas);
        }
        out.extend_from_slice(b"bundle tsa");
        cas(&mut out, &self.bundle_timestamp_authorities);
        out
    }
}

/// The evidence of a keyless match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeylessMatch {
    pub layer_digest: String,
    pub issuer: String,
    pub subject: String,
    pub certificate_chain: Vec<String>,
    pub tlog: Option<LoggedEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<VerifiedTimestamp>,
}

/// A signer's certificate as a layer carries it: parsed, not yet trusted.
pub struct SignerCertificate {
    leaf: Cert,
    chain: Vec<Cert>,
}

/// When the signer signed, as far as the caller has verified it.
#[derive(Default)]
pub struct Evidence<'a> {
    /// A Rekor entry whose signed entry timestamp the caller verified against
    /// `KeylessCheck::tlog` and which it bound to this certificate and signature.
    pub tlog: Option<LoggedEntry>,
    /// An RFC 3161 timestamp and the bytes it must stamp: the raw signature bytes, or for a
    /// legacy attestation its payload (the envelope).
    pub rfc3161_timestamp: Option<(Stamp<'a>, &'a [u8])>,
    /// The evidence came in a Sigstore bundle: its timestamp may be judged by the trust
    /// material's own timestamp authorities (`KeylessCheck::bundle_timestamp_authorities`).
    pub from_bundle: bool,
}

/// A certificate that passed every check of a keyless authority.
#[derive(Debug, Clone)]
pub struct VerifiedSigner {
    /// The leaf's key: what the caller's signed bytes must verify with.
    pub key: PublicKey,
    pub issuer: String,
    /// The SAN that matched an identity.
    pub subject: String,
    /// Subjects from the leaf to the trusted CA certificate.
    pub certificate_chain: Vec<String>,
    pub tlog: Option<LoggedEntry>,
    pub timestamp: Option<VerifiedTimestamp>,
}

impl SignerCertificate {
    /// Parses the `dev.sigstore.cosign/certificate` and `…/chain` annotations.
    pub fn parse(certificate_pem: &str, chain_pem: Option<&str>) -> Result<Self, String> {
        let leaf = Cert::from_pem_chain(certificate_pem)
            .map_err(|e| format!("signing certificate: {e}"))?
            .into_iter()
            .next()
            .ok_or("signing certificate: empty")?;
        let chain = match chain_pem {
            Some(text) => {
                Cert::from_pem_chain(text).map_err(|e| format!("certificate chain: {e}"))?
            }
            None => Vec::new(),
        };
        if chain.len() > MAX_LAYER_CHAIN {
            return Err(format!(
                "certificate chain: more than {MAX_LAYER_CHAIN} certificates"
            ));
        }
        Ok(SignerCertificate { leaf, chain })
    }

    /// A chain as a Sigstore bundle carries it: DER certificates, the leaf first.
    pub fn from_der(certificates: &[Vec<u8>]) -> Result<Self, String> {
        let (leaf, rest) = certificates
            .split_first()
            .ok_or("the bundle has no signing certificate")?;
        if rest.len() > MAX_LAYER_CHAIN {
            return Err(format!(
                "certificate chain: more than {MAX_LAYER_CHAIN} certificates"
            ));
        }
        let leaf = Cert::from_der(leaf).map_err(|e| format!("signing certificate: {e}"))?;
        let chain = rest
            .iter()
            .map(|der| Cert::from_der(der).map_err(|e| format!("certificate chain: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(SignerCertificate { leaf, chain })
    }

    /// The leaf's public key (not yet trusted: check the signature with it, then `verify`).
    pub fn key(&self) -> &PublicKey {
        &self.leaf.key
    }

    /// The leaf certificate's DER, which a Rekor entry must log.
    pub fn leaf_der(&self) -> &[u8] {
        &self.leaf.der
    }

    /// Checks the certificate against `check`: time evidence (required kinds present, the
    /// timestamp verified), the chain to a trusted CA at every verified moment, the SCT, and
    /// the identity. `now` is used only when there is no verified moment.
    pub fn verify(
        &self,
        check: &KeylessCheck,
        evidence: Evidence<'_>,
        now: i64,
    ) -> Result<VerifiedSigner, String> {
        if check.require_tlog && evidence.tlog.is_none() {
            return Err("ctlog is required but the signature has no Rekor bundle".into());
        }
        let authorities = match &check.timestamp_authorities {
            None if evidence.from_bundle && !check.bundle_timestamp_authorities.is_empty() => {
                // Not required, but verified when present: present and false denies.
                evidence
                    .rfc3161_timestamp
                    .map(|_| check.bundle_timestamp_authorities.as_slice())
            }
            required => required.as_deref(),
        };
        let timestamp = authority_timestamp(authorities, evidence.rfc3161_timestamp)?;
        if timestamp.is_none()
            && evidence
                .tlog
                .as_ref()
                .is_some_and(|t| t.integrated_time.is_none())
        {
            return Err("the Rekor v2 entry proves the signature was logged but not when: a keyless signature logged in Rekor v2 needs an RFC 3161 timestamp from a trusted timestamp authority".into());
        }
        let times = signing_times(evidence.tlog.as_ref(), timestamp.as_ref(), now);
        let path = verify_chain(
            &self.leaf,
            &self.chain,
            &check.fulcio,
            &times,
            Purpose::CodeSigning,
        )?;
        if let Some(logs) = &check.ct_logs {
            let issuer = path.get(1).ok_or("certificate chain has no issuer")?;
            verify_embedded_sct(&self.leaf, issuer, logs)?;
        }
        let (issuer, subject) = match_identity(&self.leaf, &check.identities)?;
        Ok(VerifiedSigner {
            key: self.leaf.key.clone(),
            issuer,
            subject,
            certificate_chain: path.iter().map(Cert::subject).collect(),
            tlog: evidence.tlog,
            timestamp,
        })
    }
}

/// Every verified moment the signature is known to have existed at; `now` only without one.
fn signing_times(
    tlog: Option<&LoggedEntry>,
    timestamp: Option<&VerifiedTimestamp>,
    now: i64,
) -> Vec<At> {
    let mut times = Vec::new();
    if let Some(time) = tlog.and_then(|t| t.integrated_time) {
        times.push(At {
            time,
            source: "the Rekor integrated time",
        });
    }
    if let Some(t) = timestamp {
        times.push(At {
            time: t.time,
            source: "the RFC 3161 timestamp",
        });
    }
    if times.is_empty() {
        times.push(At {
            time: now,
            source: "now: no Rekor bundle or timestamp says when it signed",
        });
    }
    times
}

/// The certificate's OIDC issuer and the first SAN an identity accepts (any identity suffices;
/// a subject is compared with every SAN: email, URI, DNS, otherName).
fn match_identity(leaf: &Cert, identities: &[IdentityMatcher]) -> Result<(String, String), String> {
    let issuer = leaf.fulcio_issuer().unwrap_or_default();
    let sans = leaf.sans();
    let matched = identities.iter().find_map(|id| {
        if !id.issuer_matches(&issuer) {
            return None;
        }
        sans.iter().find(|s| id.subject_matches(s))
    });
    match matched {
        Some(subject) => Ok((issuer, subject.clone())),
        None => Err(format!(
            "certificate identity did not match: issuer {issuer:?}, subjects {sans:?}; wanted {}",
            identities
                .iter()
                .map(IdentityMatcher::describe)
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// The certificate of `layer`, checked against `check` for a signature `signature_b64` over
/// `signed` (the bytes the signer signed), with the layer's Rekor bundle (a hashedrekord
/// entry, which must log this certificate) and RFC 3161 timestamp (over the raw signature) as
/// time evidence. Returns the verified leaf key and the evidence.
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
    let signer = SignerCertificate::parse(pem, layer.chain.as_deref())?;
    if !signer
        .key()
        .verify_b64(HashAlgorithm::Sha256, signed, signature_b64)
    {
        return Err("signature does not verify with the certificate's key".into());
    }
    let tlog = match layer.bundle.as_deref() {
        Some(bundle) => Some(
            verify_bundle(
                bundle,
                &check.tlog,
                signed,
                signature_b64,
                signer.key(),
                Some(signer.leaf_der()),
            )
            .map_err(|e| format!("ctlog: {e}"))?,
        ),
        None => None,
    };
    let raw_signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64.trim())
        .map_err(|e| format!("signature is not base64: {e}"))?;
    let evidence = Evidence {
        tlog,
        rfc3161_timestamp: layer
            .rfc3161_timestamp
            .as_deref()
            .map(|raw| (Stamp::Annotation(raw), raw_signature.as_slice())),
        from_bundle: false,
    };
    let verified = signer.verify(check, evidence, now)?;
    Ok((
        verified.key,
        KeylessMatch {
            layer_digest: layer.layer_digest.clone(),
            issuer: verified.issuer,
            subject: verified.subject,
            certificate_chain: verified.certificate_chain,
            tlog: verified.tlog,
            timestamp: verified.timestamp,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_certificates_are_errors() {
        assert!(Cert::from_pem_chain("no pem here").is_err());
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(Cert::from_pem_chain(bad)
            .unwrap_err()
            .contains("not a DER certificate"));
        let unterminated = "-----BEGIN CERTIFICATE-----\nAAAA\n";
        assert!(Cert::from_pem_chain(unterminated).is_err());
        let err = SignerCertificate::parse(bad, None).err().unwrap();
        assert!(err.starts_with("signing certificate: "), "{err}");
    }

    #[test]
    fn no_evidence_means_now() {
        let times = signing_times(None, None, 42);
        assert_eq!(times.len(), 1);
        assert_eq!(times[0].time, 42);
        let logged = LoggedEntry {
            log_id: "x".into(),
            log_index: 1,
            integrated_time: Some(7),
            tree_size: None,
        };
        let ts = VerifiedTimestamp {
            time: 9,
            authority: "tsa".into(),
        };
        let times = signing_times(Some(&logged), Some(&ts), 42);
        assert_eq!(times.iter().map(|t| t.time).collect::<Vec<_>>(), [7, 9]);
    }

    #[test]
    fn unanchored_identity_regexps() {
        let id = IdentityMatcher {
            issuer: None,
            issuer_re: Some(Regex::new("githubusercontent").unwrap()),
            subject: None,
            subject_re: Some(Regex::new("acme/").unwrap()),
        };
        assert!(id.issuer_matches("https://token.actions.githubusercontent.com"));
        assert!(id.subject_matches(
            "https://github.com/acme/app/.github/workflows/x.yml@refs/heads/main"
        ));
        assert!(!id.subject_matches("https://github.com/evil/app"));
        assert_eq!(id.describe(), "issuer /githubusercontent/ subject /acme//");
    }
}

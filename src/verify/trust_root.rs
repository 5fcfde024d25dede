//! Trust material for keyless verification: certificate authorities (Fulcio, timestamp
//! authorities) with the window each is trusted for, and CT log keys. It comes from a
//! TrustRoot's `sigstoreKeys`, or from the public-good Sigstore instance's `trusted_root.json`
//! shipped inside the binary, so a node never fetches trust at start-up (air-gapped clusters
//! work, and a network failure cannot change what is trusted).

use std::fmt;
use std::sync::OnceLock;

use base64::Engine as _;
use serde::Deserialize;

use super::keys::PublicKey;
use super::x509::{show_time, Cert, CtLogs};
use crate::policy::types::{CertificateAuthority as CaSpec, SigstoreKeys, ValidityPeriod};

/// The public-good instance's trust material in the shape of sigstore's `trusted_root.json`
/// (only the fields read here); a newer published `trusted_root.json` can replace the file.
const PUBLIC_GOOD_TRUSTED_ROOT: &str = include_str!("data/trusted_root.json");

/// More certificates than this in one CA chain is not a real trust root: refuse it.
const MAX_CA_CERTS: usize = 16;

/// When a CA or log is trusted: `[start, end]`, either side open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Validity {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

impl Validity {
    pub fn contains(&self, time: i64) -> bool {
        self.start.is_none_or(|s| s <= time) && self.end.is_none_or(|e| time <= e)
    }
}

impl fmt::Display for Validity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.start, self.end) {
            (None, None) => write!(f, "always"),
            (Some(s), None) => write!(f, "from {}", show_time(s)),
            (None, Some(e)) => write!(f, "until {}", show_time(e)),
            (Some(s), Some(e)) => write!(f, "from {} to {}", show_time(s), show_time(e)),
        }
    }
}

/// One certificate authority: its certificates (leaf-most first, as trust roots list them;
/// every one of them is trusted) and the window it is trusted for.
#[derive(Debug, Clone, PartialEq)]
pub struct CertificateAuthority {
    pub uri: String,
    pub certs: Vec<Cert>,
    pub valid: Validity,
}

/// Appends what identifies `list` (URIs, validity, certificates) to a fingerprint.
pub fn fingerprint_authorities(out: &mut Vec<u8>, list: &[CertificateAuthority]) {
    for ca in list {
        out.extend_from_slice(format!("ca {} {}\n", ca.uri, ca.valid).as_bytes());
        for c in &ca.certs {
            out.extend_from_slice(&c.der);
        }
    }
}

/// Everything a keyless check may trust, from one source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustMaterial {
    pub fulcio: Vec<CertificateAuthority>,
    pub ct_logs: CtLogs,
    pub timestamp_authorities: Vec<CertificateAuthority>,
}

/// The public-good instance's Fulcio CAs, CT log keys and timestamp authority, parsed once.
/// (Its Rekor key lives in `verify::rekor`, shared with key authorities.)
pub fn public_good() -> Result<TrustMaterial, String> {
    static PARSED: OnceLock<Result<TrustMaterial, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| {
            parse_trusted_root(PUBLIC_GOOD_TRUSTED_ROOT)
                .map_err(|e| format!("embedded public-good trusted_root.json: {e}"))
        })
        .clone()
}

// The protobuf-JSON shape of sigstore's `trusted_root.json` (only what is used).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TrustedRootJson {
    #[serde(default)]
    certificate_authorities: Vec<CaJson>,
    #[serde(default)]
    ctlogs: Vec<LogJson>,
    #[serde(default)]
    timestamp_authorities: Vec<CaJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaJson {
    #[serde(default)]
    uri: String,
    cert_chain: ChainJson,
    #[serde(default)]
    valid_for: Option<ValidForJson>,
}

#[derive(Deserialize)]
struct ChainJson {
    certificates: Vec<RawBytes>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBytes {
    raw_bytes: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogJson {
    public_key: RawBytes,
}

#[derive(Deserialize)]
struct ValidForJson {
    start: Option<String>,
    end: Option<String>,
}

/// Parses a `trusted_root.json` (protobuf JSON: base64 DER certificates and keys).
pub fn parse_trusted_root(text: &str) -> Result<TrustMaterial, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let root: TrustedRootJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let ca = |c: &CaJson| -> Result<CertificateAuthority, String> {
        let certs = c
            .cert_chain
            .certificates
            .iter()
            .take(MAX_CA_CERTS + 1)
            .map(|raw| {
                let der = b64.decode(&raw.raw_bytes).map_err(|e| e.to_string())?;
                Cert::from_der(&der)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let valid = c.valid_for.as_ref().map_or(Ok(Validity::default()), |v| {
            validity(v.start.as_deref(), v.end.as_deref())
        })?;
        checked_ca(&c.uri, certs, valid)
    };
    let logs = root
        .ctlogs
        .iter()
        .map(|l| {
            let der = b64
                .decode(&l.public_key.raw_bytes)
                .map_err(|e| e.to_string())?;
            PublicKey::from_spki_der(&der).map_err(|e| format!("CT log key: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustMaterial {
        fulcio: root
            .certificate_authorities
            .iter()
            .map(ca)
            .collect::<Result<_, _>>()?,
        ct_logs: CtLogs(logs),
        timestamp_authorities: root
            .timestamp_authorities
            .iter()
            .map(ca)
            .collect::<Result<_, _>>()?,
    })
}

/// The trust material of a TrustRoot's `sigstoreKeys` (`certChain` and `publicKey` are base64
/// of PEM, as policy-controller writes them; raw PEM is accepted too). Its `tLogs` are read
/// where the Rekor keys are decided (`policy::snapshot`).
pub fn from_sigstore_keys(keys: &SigstoreKeys) -> Result<TrustMaterial, String> {
    let cas = |list: &[CaSpec], field: &str| -> Result<Vec<CertificateAuthority>, String> {
        list.iter()
            .enumerate()
            .map(|(i, ca)| {
                let at = format!("{field}[{i}]");
                let pem =
                    base64_or_pem(&ca.cert_chain).map_err(|e| format!("{at}.certChain: {e}"))?;
                let certs =
                    Cert::from_pem_chain(&pem).map_err(|e| format!("{at}.certChain: {e}"))?;
                let valid = match &ca.valid_for {
                    None => Validity::default(),
                    Some(ValidityPeriod { start, end }) => {
                        validity(start.as_deref(), end.as_deref())
                            .map_err(|e| format!("{at}.validFor: {e}"))?
                    }
                };
                checked_ca(&ca.uri, certs, valid).map_err(|e| format!("{at}: {e}"))
            })
            .collect()
    };
    let ct_logs = keys
        .ct_logs
        .iter()
        .enumerate()
        .map(|(i, log)| {
            let pem = base64_or_pem(&log.public_key)
                .map_err(|e| format!("ctLogs[{i}].publicKey: {e}"))?;
            PublicKey::from_pem(&pem).map_err(|e| format!("ctLogs[{i}].publicKey: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustMaterial {
        fulcio: cas(&keys.certificate_authorities, "certificateAuthorities")?,
        ct_logs: CtLogs(ct_logs),
        timestamp_authorities: cas(&keys.timestamp_authorities, "timestampAuthorities")?,
    })
}

/// A `keyless.ca-cert` (PEM, one or more certificates): one CA trusted at any time.
pub fn from_ca_cert(pem: &str) -> Result<CertificateAuthority, String> {
    let certs = Cert::from_pem_chain(pem)?;
    checked_ca("keyless.ca-cert", certs, Validity::default())
}

fn checked_ca(
    uri: &str,
    certs: Vec<Cert>,
    valid: Validity,
) -> Result<CertificateAuthority, String> {
    if certs.is_empty() {
        return Err("certificate chain is empty".into());
    }
    if certs.len() > MAX_CA_CERTS {
        return Err(format!(
            "certificate chain has more than {MAX_CA_CERTS} certificates"
        ));
    }
    Ok(CertificateAuthority {
        uri: uri.to_string(),
        certs,
        valid,
    })
}

fn validity(start: Option<&str>, end: Option<&str>) -> Result<Validity, String> {
    let parse = |s: Option<&str>| -> Result<Option<i64>, String> {
        s.filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<jiff::Timestamp>()
                    .map(|t| t.as_second())
                    .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
            })
            .transpose()
    };
    Ok(Validity {
        start: parse(start)?,
        end: parse(end)?,
    })
}

/// TrustRoot values are base64 of PEM; raw PEM is accepted too.
fn base64_or_pem(value: &str) -> Result<String, String> {
    if value.contains("-----BEGIN") {
        return Ok(value.to_string());
    }
    let compact: String = value.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("neither PEM nor base64 of PEM: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "base64 value is not PEM text".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_public_good_root_parses() {
        let tm = public_good().unwrap();
        // Two Fulcio CAs: the 2021 root (retired at the end of 2022) and the current
        // intermediate + root.
        assert_eq!(tm.fulcio.len(), 2);
        assert!(tm
            .fulcio
            .iter()
            .all(|ca| ca.uri == "https://fulcio.sigstore.dev"));
        assert!(tm
            .fulcio
            .iter()
            .flat_map(|ca| &ca.certs)
            .all(|c| c.subject().contains("sigstore")));
        let retired = &tm.fulcio[0];
        let end = jiff::Timestamp::from_second(retired.valid.end.unwrap()).unwrap();
        assert_eq!(end.to_string(), "2022-12-31T23:59:59Z");
        assert!(tm.fulcio[1].valid.end.is_none());
        // The current CT log's ID, as sigstore publishes it (base64 of SHA-256 of its key).
        let ids: Vec<String> = tm
            .ct_logs
            .0
            .iter()
            .map(|k| {
                base64::engine::general_purpose::STANDARD
                    .encode(hex::decode(k.fingerprint()).unwrap())
            })
            .collect();
        assert!(ids.contains(&"3T0wasbHETJjGR4cmWc3AqJKXrjePK3/h4pygC8p7o4=".to_string()));
        assert_eq!(tm.timestamp_authorities.len(), 1);
        assert_eq!(tm.timestamp_authorities[0].certs.len(), 2);
    }

    #[test]
    fn validity_windows() {
        let v = validity(
            Some("2022-01-01T00:00:00Z"),
            Some("2022-12-31T23:59:59.999Z"),
        )
        .unwrap();
        assert!(v.contains(1_656_633_600)); // 2022-07-01
        assert!(!v.contains(1_672_531_200)); // 2023-01-01
        assert!(!v.contains(1_609_459_200)); // 2021-01-01
        assert!(Validity::default().contains(0));
        assert!(validity(Some("yesterday"), None)
            .unwrap_err()
            .contains("not an RFC 3339 time"));
    }

    #[test]
    fn bad_trust_roots_are_errors() {
        assert!(parse_trusted_root("{").is_err());
        let bad_cert =
            r#"{"certificateAuthorities":[{"certChain":{"certificates":[{"rawBytes":"AAAA"}]}}]}"#;
        assert!(parse_trusted_root(bad_cert)
            .unwrap_err()
            .contains("not a DER certificate"));
        let empty = r#"{"certificateAuthorities":[{"certChain":{"certificates":[]}}]}"#;
        assert!(parse_trusted_root(empty).unwrap_err().contains("empty"));
        assert!(base64_or_pem("%%%").unwrap_err().contains("neither PEM"));
    }
}

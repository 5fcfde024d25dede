//! X.509 for keyless signatures: parsing, chain verification to configured roots, the Fulcio
//! identity (issuer extension and every SAN), and embedded SCTs (RFC 6962 precertificate
//! timestamps). Pure functions over DER; times are Unix seconds.

use der::{Decode as _, Encode as _};
use sha2::Digest as _;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::Certificate;

use super::keys::{HashAlgorithm, PublicKey};
use super::trust_root::CertificateAuthority;

/// Longest chain accepted (leaf, intermediates, root).
const MAX_CHAIN: usize = 6;
/// Fulcio issuer extension, DER UTF8String (current).
const OID_FULCIO_ISSUER_V2: &str = "1.3.6.1.4.1.57264.1.8";
/// Fulcio issuer extension, raw string bytes (legacy).
const OID_FULCIO_ISSUER_V1: &str = "1.3.6.1.4.1.57264.1.1";
/// Embedded SCT list (RFC 6962 section 3.3).
const OID_SCT_LIST: &str = "1.3.6.1.4.1.11129.2.4.2";
/// id-kp-codeSigning.
const OID_CODE_SIGNING: &str = "1.3.6.1.5.5.7.3.3";
/// id-kp-timeStamping.
const OID_TIME_STAMPING: &str = "1.3.6.1.5.5.7.3.8";

/// A parsed certificate and what verification needs of it.
#[derive(Clone)]
pub struct Cert {
    pub der: Vec<u8>,
    parsed: Certificate,
    tbs_der: Vec<u8>,
    subject_der: Vec<u8>,
    issuer_der: Vec<u8>,
    pub key: PublicKey,
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for Cert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cert({})", self.subject())
    }
}

impl PartialEq for Cert {
    fn eq(&self, other: &Self) -> bool {
        self.der == other.der
    }
}

impl Cert {
    pub fn from_der(der: &[u8]) -> Result<Cert, String> {
        let parsed =
            Certificate::from_der(der).map_err(|e| format!("not a DER certificate: {e}"))?;
        let tbs = parsed.tbs_certificate();
        let enc = |r: der::Result<Vec<u8>>| r.map_err(|e| format!("certificate re-encoding: {e}"));
        let tbs_der = enc(tbs.to_der())?;
        let subject_der = enc(tbs.subject().to_der())?;
        let issuer_der = enc(tbs.issuer().to_der())?;
        let spki = enc(tbs.subject_public_key_info().to_der())?;
        let key = PublicKey::from_spki_der(&spki).map_err(|e| format!("certificate key: {e}"))?;
        let validity = tbs.validity();
        let secs = |t: x509_cert::time::Time| t.to_unix_duration().as_secs() as i64;
        Ok(Cert {
            der: der.to_vec(),
            not_before: secs(validity.not_before),
            not_after: secs(validity.not_after),
            parsed,
            tbs_der,
            subject_der,
            issuer_der,
            key,
        })
    }

    /// Every certificate of a PEM text (a chain, or a single certificate).
    pub fn from_pem_chain(text: &str) -> Result<Vec<Cert>, String> {
        let blocks = pem_certificates(text)?;
        if blocks.is_empty() {
            return Err("no PEM CERTIFICATE block".into());
        }
        blocks.iter().map(|der| Cert::from_der(der)).collect()
    }

    pub fn subject(&self) -> String {
        self.parsed.tbs_certificate().subject().to_string()
    }

    fn self_issued(&self) -> bool {
        self.subject_der == self.issuer_der
    }

    fn extension(&self, oid: &str) -> Option<&[u8]> {
        self.parsed
            .tbs_certificate()
            .extensions()?
            .iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes())
    }

    fn is_ca(&self) -> bool {
        matches!(
            self.parsed.tbs_certificate().get_extension::<BasicConstraints>(),
            Ok(Some((_, bc))) if bc.ca
        )
    }

    /// Whether `self` was signed by `issuer`'s key.
    pub(super) fn signed_by(&self, issuer: &Cert) -> bool {
        let hash = match self.parsed.signature_algorithm().oid.to_string().as_str() {
            "1.2.840.10045.4.3.2" | "1.2.840.113549.1.1.11" => HashAlgorithm::Sha256,
            "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" => HashAlgorithm::Sha384,
            "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" => HashAlgorithm::Sha512,
            "1.3.101.112" => HashAlgorithm::Sha512,
            _ => return false,
        };
        let Some(sig) = self.parsed.signature().as_bytes() else {
            return false;
        };
        issuer.key.verify(hash, &self.tbs_der, sig)
    }

    fn valid_at(&self, time: i64) -> bool {
        self.not_before <= time && time <= self.not_after
    }

    /// The OIDC issuer Fulcio recorded, if any.
    pub fn fulcio_issuer(&self) -> Option<String> {
        if let Some(v) = self.extension(OID_FULCIO_ISSUER_V2) {
            return der::asn1::Utf8StringRef::from_der(v)
                .ok()
                .map(|s| s.as_str().to_string());
        }
        self.extension(OID_FULCIO_ISSUER_V1)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string)
    }

    /// Every subject alternative name as text: emails, URIs, DNS names, and the UTF-8 value of
    /// otherNames (Fulcio's username SAN).
    pub fn sans(&self) -> Vec<String> {
        let Ok(Some((_, san))) = self
            .parsed
            .tbs_certificate()
            .get_extension::<SubjectAltName>()
        else {
            return Vec::new();
        };
        san.0
            .iter()
            .filter_map(|name| match name {
                GeneralName::Rfc822Name(s) | GeneralName::DnsName(s) => Some(s.to_string()),
                GeneralName::UniformResourceIdentifier(s) => Some(s.to_string()),
                GeneralName::OtherName(o) => o
                    .value
                    .decode_as::<der::asn1::Utf8StringRef<'_>>()
                    .ok()
                    .map(|s| s.as_str().to_string()),
                _ => None,
            })
            .collect()
    }

    /// The leaf must be an end-entity certificate for `purpose`: code signing (Fulcio), or
    /// time stamping with the extended key usage marked critical, as RFC 3161 demands.
    fn check_leaf_usage(&self, purpose: Purpose) -> Result<(), String> {
        let (what, oid, usage) = match purpose {
            Purpose::CodeSigning => ("signing certificate", OID_CODE_SIGNING, "code signing"),
            Purpose::TimeStamping => (
                "timestamp authority certificate",
                OID_TIME_STAMPING,
                "time stamping",
            ),
        };
        if self.is_ca() {
            return Err(format!("{what} is a CA certificate"));
        }
        let tbs = self.parsed.tbs_certificate();
        match tbs.get_extension::<KeyUsage>() {
            Ok(Some((_, KeyUsage(flags)))) if !flags.contains(KeyUsages::DigitalSignature) => {
                return Err(format!("{what}'s key usage lacks digitalSignature"))
            }
            Ok(_) => {}
            Err(e) => return Err(format!("{what}'s key usage: {e}")),
        }
        match tbs.get_extension::<ExtendedKeyUsage>() {
            Ok(Some((critical, eku))) if eku.0.iter().any(|o| o.to_string() == oid) => {
                if purpose == Purpose::TimeStamping && !critical {
                    return Err(format!("{what}'s extended key usage is not critical"));
                }
                Ok(())
            }
            Ok(_) => Err(format!("{what} is not for {usage} (extended key usage)")),
            Err(e) => Err(format!("{what}'s extended key usage: {e}")),
        }
    }

    /// Whether this is the certificate a CMS `IssuerAndSerialNumber` names (both DER).
    pub(super) fn has_issuer_serial(&self, issuer_der: &[u8], serial_der: &[u8]) -> bool {
        let serial = self.parsed.tbs_certificate().serial_number().to_der();
        self.issuer_der == issuer_der && serial.is_ok_and(|s| s == serial_der)
    }

    /// The subject key identifier extension's value, if any.
    pub(super) fn subject_key_id(&self) -> Option<Vec<u8>> {
        match self
            .parsed
            .tbs_certificate()
            .get_extension::<SubjectKeyIdentifier>()
        {
            Ok(Some((_, ski))) => Some(ski.0.as_bytes().to_vec()),
            _ => None,
        }
    }
}

/// DER bodies of the `CERTIFICATE` blocks of `text` (other blocks are ignored).
pub fn pem_certificates(text: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != "-----BEGIN CERTIFICATE-----" {
            continue;
        }
        let mut body = String::new();
        loop {
            match lines.next() {
                Some("-----END CERTIFICATE-----") => break,
                Some(l) => body.push_str(l),
                None => return Err("unterminated PEM CERTIFICATE block".into()),
            }
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|e| format!("PEM CERTIFICATE block is not base64: {e}"))?;
        out.push(der);
    }
    Ok(out)
}

/// What a leaf certificate must be for: Fulcio signing certificates sign code, a timestamp
/// authority's certificate stamps time (RFC 3161 section 2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    CodeSigning,
    TimeStamping,
}

/// A moment a certificate must have been valid at, and what vouches for it (for messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub time: i64,
    pub source: &'static str,
}

/// Builds a path from `leaf` through `intermediates` to a certificate of one of `cas`,
/// checking every signature, that issuers are CAs, that every certificate was valid at every
/// moment of `times`, and that those moments fall inside the CA's own validity window (a
/// retired Fulcio root must not vouch for certificates issued after it was retired).
pub fn verify_chain(
    leaf: &Cert,
    intermediates: &[Cert],
    cas: &[CertificateAuthority],
    times: &[At],
    purpose: Purpose,
) -> Result<Vec<Cert>, String> {
    leaf.check_leaf_usage(purpose)?;
    let what = match purpose {
        Purpose::CodeSigning => "signing certificate",
        Purpose::TimeStamping => "timestamp authority certificate",
    };
    valid_at_all(leaf, times, what.to_string())?;
    let mut path = vec![leaf.clone()];
    let mut current = leaf.clone();
    let mut window_error = None;
    for _ in 0..MAX_CHAIN {
        // A trusted CA certificate that signed the current one ends the path.
        let mut signers = cas
            .iter()
            .flat_map(|ca| ca.certs.iter().map(move |c| (ca, c)));
        let found = signers.find(|(ca, anchor)| {
            if anchor.subject_der != current.issuer_der || !current.signed_by(anchor) {
                return false;
            }
            match times.iter().find(|at| !ca.valid.contains(at.time)) {
                Some(at) => {
                    window_error = Some(format!(
                        "trusted CA {} ({}) is only trusted {}, not at {} ({})",
                        anchor.subject(),
                        ca.uri,
                        ca.valid,
                        show_time(at.time),
                        at.source
                    ));
                    false
                }
                None => true,
            }
        });
        if let Some((_, anchor)) = found {
            valid_at_all(anchor, times, format!("trusted CA {}", anchor.subject()))?;
            if anchor != &current {
                path.push(anchor.clone());
            }
            return Ok(path);
        }
        let Some(next) = intermediates.iter().find(|c| {
            c.subject_der == current.issuer_der && !path.contains(c) && current.signed_by(c)
        }) else {
            break;
        };
        if !next.is_ca() {
            return Err(format!("{} is not a CA certificate", next.subject()));
        }
        valid_at_all(next, times, format!("intermediate CA {}", next.subject()))?;
        if next.self_issued() {
            // A self-signed certificate that is not a trust anchor ends nowhere.
            break;
        }
        path.push(next.clone());
        current = next.clone();
    }
    Err(window_error.unwrap_or_else(|| {
        format!(
            "certificate chain does not lead to a trusted root (issuer {})",
            current.parsed.tbs_certificate().issuer()
        )
    }))
}

/// `cert` (`what`, for the message) must have been valid at every moment of `times`.
fn valid_at_all(cert: &Cert, times: &[At], what: String) -> Result<(), String> {
    match times.iter().find(|at| !cert.valid_at(at.time)) {
        None => Ok(()),
        Some(at) => Err(format!(
            "{what} was not valid at {} ({}): valid {} to {}",
            show_time(at.time),
            at.source,
            show_time(cert.not_before),
            show_time(cert.not_after)
        )),
    }
}

pub(super) fn show_time(t: i64) -> String {
    jiff::Timestamp::from_second(t).map_or_else(|_| t.to_string(), |ts| ts.to_string())
}

/// One CT log key, by its RFC 6962 log ID (SHA-256 of the DER SPKI).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CtLogs(pub Vec<PublicKey>);

/// Verifies that `leaf` carries at least one embedded SCT signed by a key in `logs`, over the
/// precertificate `leaf` was issued from (RFC 6962 section 3.2), with `issuer` its issuer.
pub fn verify_embedded_sct(leaf: &Cert, issuer: &Cert, logs: &CtLogs) -> Result<(), String> {
    let Some(ext) = leaf.extension(OID_SCT_LIST) else {
        return Err(
            "certificate has no embedded SCT (set insecureIgnoreSCT to accept that)".into(),
        );
    };
    let list = match tlv(ext) {
        Ok((0x04, list)) => list,
        _ => return Err("SCT list is not an OCTET STRING".into()),
    };
    let scts = parse_sct_list(list)?;
    let tbs = precert_tbs(leaf)?;
    let issuer_key_hash = sha2::Sha256::digest(issuer.key.spki_der());
    let mut seen = Vec::new();
    for sct in &scts {
        let Some(key) = logs
            .0
            .iter()
            .find(|k| sha2::Sha256::digest(k.spki_der()).as_slice() == sct.log_id)
        else {
            seen.push(format!("SCT from unknown log {}", hex::encode(sct.log_id)));
            continue;
        };
        let hash = match sct.hash_alg {
            4 => HashAlgorithm::Sha256,
            5 => HashAlgorithm::Sha384,
            6 => HashAlgorithm::Sha512,
            other => {
                seen.push(format!("SCT hash algorithm {other} not supported"));
                continue;
            }
        };
        let mut signed = Vec::with_capacity(tbs.len() + 64);
        signed.push(0); // version v1
        signed.push(0); // certificate_timestamp
        signed.extend_from_slice(&sct.timestamp.to_be_bytes());
        signed.extend_from_slice(&1u16.to_be_bytes()); // precert_entry
        signed.extend_from_slice(&issuer_key_hash);
        let len = tbs.len();
        if len >= 1 << 24 {
            return Err("precertificate too large".into());
        }
        signed.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        signed.extend_from_slice(&tbs);
        signed.extend_from_slice(&(sct.extensions.len() as u16).to_be_bytes());
        signed.extend_from_slice(sct.extensions);
        if key.verify(hash, &signed, sct.signature) {
            return Ok(());
        }
        seen.push(format!(
            "SCT from log {} does not verify",
            hex::encode(sct.log_id)
        ));
    }
    Err(format!("no valid SCT: {}", seen.join("; ")))
}

struct Sct<'a> {
    log_id: &'a [u8],
    timestamp: u64,
    extensions: &'a [u8],
    hash_alg: u8,
    signature: &'a [u8],
}

/// A bounds-checked reader over TLS-encoded bytes.
struct Tls<'a>(&'a [u8]);

impl<'a> Tls<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated SCT list".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, String> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| "truncated")?))
    }

    fn vec16(&mut self) -> Result<&'a [u8], String> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn parse_sct_list(bytes: &[u8]) -> Result<Vec<Sct<'_>>, String> {
    let mut outer = Tls(bytes);
    let mut list = Tls(outer.vec16()?);
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let mut sct = Tls(list.vec16()?);
        if sct.u8()? != 0 {
            return Err("SCT version is not v1".into());
        }
        let log_id = sct.take(32)?;
        let timestamp = sct.u64()?;
        let extensions = sct.vec16()?;
        let hash_alg = sct.u8()?;
        let _sig_alg = sct.u8()?;
        let signature = sct.vec16()?;
        out.push(Sct {
            log_id,
            timestamp,
            extensions,
            hash_alg,
            signature,
        });
        if out.len() > 64 {
            return Err("too many SCTs".into());
        }
    }
    Ok(out)
}

/// The leaf's TBSCertificate without the SCT list extension: what the log signed. Done on the
/// DER itself (the parsed type has no setters): the `[3]` extensions element is rebuilt
/// without the SCT extension, and the lengths around it re-encoded.
fn precert_tbs(leaf: &Cert) -> Result<Vec<u8>, String> {
    // 1.3.6.1.4.1.11129.2.4.2 as a DER OBJECT IDENTIFIER.
    const SCT_OID_DER: &[u8] = &[
        0x06, 0x0a, 0x2b, 0x06, 0x01, 0x04, 0x01, 0xd6, 0x79, 0x02, 0x04, 0x02,
    ];
    let (tag, tbs) = tlv(&leaf.tbs_der)?;
    if tag != 0x30 {
        return Err("TBSCertificate is not a SEQUENCE".into());
    }
    let mut body = Vec::with_capacity(tbs.len());
    for element in elements(tbs)? {
        if element.tag != 0xa3 {
            body.extend_from_slice(element.raw);
            continue;
        }
        let (seq_tag, exts) = tlv(element.content)?;
        if seq_tag != 0x30 {
            return Err("extensions are not a SEQUENCE".into());
        }
        let mut kept = Vec::with_capacity(exts.len());
        for ext in elements(exts)? {
            if !ext.content.starts_with(SCT_OID_DER) {
                kept.extend_from_slice(ext.raw);
            }
        }
        body.extend_from_slice(&wrap(0xa3, &wrap(0x30, &kept)));
    }
    Ok(wrap(0x30, &body))
}

/// (tag, content) of the one DER element `bytes` holds.
pub(super) fn tlv(bytes: &[u8]) -> Result<(u8, &[u8]), String> {
    let (tag, content, rest) = next_tlv(bytes)?;
    if !rest.is_empty() {
        return Err("trailing bytes after a DER element".into());
    }
    Ok((tag, content))
}

/// One DER element: its tag, its content and the whole element.
pub(super) struct Element<'a> {
    pub tag: u8,
    pub content: &'a [u8],
    pub raw: &'a [u8],
}

/// Each DER element in `bytes`.
pub(super) fn elements(mut bytes: &[u8]) -> Result<Vec<Element<'_>>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (tag, content, rest) = next_tlv(bytes)?;
        let raw = &bytes[..bytes.len() - rest.len()];
        out.push(Element { tag, content, raw });
        bytes = rest;
    }
    Ok(out)
}

pub(super) fn next_tlv(bytes: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let bad = || "malformed DER".to_string();
    let (&tag, rest) = bytes.split_first().ok_or_else(bad)?;
    if tag & 0x1f == 0x1f {
        return Err("multi-byte DER tags are not expected here".into());
    }
    let (&first, mut rest) = rest.split_first().ok_or_else(bad)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(bad());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

pub(super) fn wrap(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

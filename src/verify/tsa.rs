//! RFC 3161 signed timestamps (cosign's `dev.sigstore.cosign/rfc3161timestamp` annotation):
//! a timestamp authority's CMS signature over a TSTInfo that names the hash of the signature
//! bytes. Verified offline against the timestamp authorities of a TrustRoot, it says when the
//! signature existed, so a short-lived certificate can be judged at that moment.
//!
//! Pure functions over DER, bounded by the annotation's size; every malformed input is an
//! error naming what is wrong.

use base64::Engine as _;
use der::asn1::ObjectIdentifier;
use serde::{Deserialize, Serialize};

use super::keys::HashAlgorithm;
use super::trust_root::CertificateAuthority;
use super::x509::{elements, tlv, verify_chain, wrap, At, Cert, Element, Purpose};

/// Layer annotation holding cosign's RFC 3161 timestamp (JSON).
pub const RFC3161_TIMESTAMP_ANNOTATION: &str = "dev.sigstore.cosign/rfc3161timestamp";

const OID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const OID_TST_INFO: &str = "1.2.840.113549.1.9.16.1.4";
const OID_CONTENT_TYPE: &str = "1.2.840.113549.1.9.3";
const OID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
const OID_SIGNING_CERTIFICATE: &str = "1.2.840.113549.1.9.16.2.12";
const OID_SIGNING_CERTIFICATE_V2: &str = "1.2.840.113549.1.9.16.2.47";
/// Certificates a token may carry; real ones carry one to three.
const MAX_TOKEN_CERTS: usize = 16;

/// A verified timestamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedTimestamp {
    /// Unix seconds (fraction dropped).
    pub time: i64,
    /// Subject of the timestamp authority certificate that signed it.
    pub authority: String,
}

#[derive(Deserialize)]
struct Annotation {
    #[serde(rename = "SignedRFC3161Timestamp")]
    signed_rfc3161_timestamp: String,
}

/// Verifies the annotation `raw` as a timestamp over `stamped` (the raw signature bytes for a
/// signature layer, the payload for an attestation, as cosign stamps them), signed by a
/// certificate chaining to one of `authorities` at the time it states.
pub fn verify_timestamp(
    raw: &str,
    stamped: &[u8],
    authorities: &[CertificateAuthority],
) -> Result<VerifiedTimestamp, String> {
    let annotation: Annotation = serde_json::from_str(raw)
        .map_err(|e| format!("RFC 3161 timestamp annotation is not cosign's JSON: {e}"))?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(annotation.signed_rfc3161_timestamp.trim().as_bytes())
        .map_err(|e| format!("RFC 3161 timestamp is not base64: {e}"))?;
    verify_timestamp_der(&der, stamped, authorities)
}

/// Verifies `der` (a TimeStampResp or a bare TimeStampToken, as a Sigstore bundle's
/// `rfc3161Timestamps[].signedTimestamp` holds it) as a timestamp over `stamped`.
pub fn verify_timestamp_der(
    der: &[u8],
    stamped: &[u8],
    authorities: &[CertificateAuthority],
) -> Result<VerifiedTimestamp, String> {
    verify_der(der, stamped, authorities).map_err(|e| format!("RFC 3161 timestamp: {e}"))
}

/// An RFC 3161 timestamp as it is carried.
#[derive(Clone, Copy)]
pub enum Stamp<'a> {
    /// cosign's `dev.sigstore.cosign/rfc3161timestamp` layer annotation (JSON).
    Annotation(&'a str),
    /// DER, from a Sigstore bundle's `timestampVerificationData`.
    Der(&'a [u8]),
}

/// The timestamp an authority's `rfc3161timestamp` demands, verified over the bytes it must
/// stamp: required when `authorities` is set; `None` when it is not (a timestamp offered to an
/// authority that trusts no timestamp authority proves nothing).
pub fn authority_timestamp(
    authorities: Option<&[CertificateAuthority]>,
    stamp: Option<(Stamp<'_>, &[u8])>,
) -> Result<Option<VerifiedTimestamp>, String> {
    match (authorities, stamp) {
        (Some(tsas), Some((Stamp::Annotation(raw), stamped))) => {
            verify_timestamp(raw, stamped, tsas).map(Some)
        }
        (Some(tsas), Some((Stamp::Der(der), stamped))) => {
            verify_timestamp_der(der, stamped, tsas).map(Some)
        }
        (Some(_), None) => {
            Err("rfc3161timestamp is required but the signature has no RFC 3161 timestamp".into())
        }
        (None, _) => Ok(None),
    }
}

/// `der` is a TimeStampResp (what a TSA answers and cosign stores) or a bare TimeStampToken.
fn verify_der(
    der: &[u8],
    stamped: &[u8],
    authorities: &[CertificateAuthority],
) -> Result<VerifiedTimestamp, String> {
    let token = time_stamp_token(der)?;
    let signed = SignedData::parse(token)?;
    let tst = TstInfo::parse(signed.e_content)?;
    let hash = tst.hash;
    if digest(hash, stamped) != tst.hashed_message {
        return Err("it is for other data than this signature (message imprint differs)".into());
    }
    let at = [At {
        time: tst.gen_time,
        source: "the timestamp's own time",
    }];
    let candidates: Vec<&Cert> = signed
        .certs
        .iter()
        .chain(authorities.iter().flat_map(|a| &a.certs))
        .collect();
    let signer = candidates
        .iter()
        .copied()
        .find(|c| signed.signer.names(c))
        .ok_or("the certificate of the timestamp authority that signed it is not known")?;
    signed.signer.verify(signer, signed.e_content)?;
    let intermediates: Vec<Cert> = candidates.iter().map(|c| (*c).clone()).collect();
    verify_chain(
        signer,
        &intermediates,
        authorities,
        &at,
        Purpose::TimeStamping,
    )
    .map_err(|e| format!("timestamp authority not trusted: {e}"))?;
    Ok(VerifiedTimestamp {
        time: tst.gen_time,
        authority: signer.subject(),
    })
}

fn oid(e: &Element) -> Result<String, String> {
    if e.tag != 0x06 {
        return Err("expected an OBJECT IDENTIFIER".into());
    }
    ObjectIdentifier::from_bytes(e.content)
        .map(|o| o.to_string())
        .map_err(|e| format!("bad OBJECT IDENTIFIER: {e}"))
}

fn expect<'a, 'b>(
    list: &'b [Element<'a>],
    i: usize,
    what: &str,
) -> Result<&'b Element<'a>, String> {
    list.get(i).ok_or_else(|| format!("{what} is missing"))
}

/// The token inside a TimeStampResp (its status must be granted), or `der` itself when it is
/// already a token (a ContentInfo).
fn time_stamp_token(der: &[u8]) -> Result<&[u8], String> {
    let (tag, content) = tlv(der).map_err(|e| format!("not DER: {e}"))?;
    if tag != 0x30 {
        return Err("not a TimeStampResp or TimeStampToken (not a SEQUENCE)".into());
    }
    let parts = elements(content)?;
    let first = expect(&parts, 0, "TimeStampResp status")?;
    if first.tag == 0x06 {
        return Ok(der);
    }
    if first.tag != 0x30 {
        return Err("not a TimeStampResp".into());
    }
    let status_fields = elements(first.content)?;
    let status = expect(&status_fields, 0, "PKIStatus")?;
    // granted (0) or grantedWithMods (1).
    if status.tag != 0x02 || !matches!(status.content, [0] | [1]) {
        return Err("the timestamp authority did not grant it (PKIStatus is not granted)".into());
    }
    Ok(expect(&parts, 1, "TimeStampToken")?.raw)
}

/// The parts of a CMS SignedData that verification reads.
struct SignedData<'a> {
    e_content: &'a [u8],
    certs: Vec<Cert>,
    signer: SignerInfo<'a>,
}

impl<'a> SignedData<'a> {
    fn parse(token: &'a [u8]) -> Result<SignedData<'a>, String> {
        let (_, content_info) = tlv(token)?;
        let ci = elements(content_info)?;
        if oid(expect(&ci, 0, "ContentInfo contentType")?)? != OID_SIGNED_DATA {
            return Err("the token is not CMS SignedData".into());
        }
        let explicit = expect(&ci, 1, "SignedData")?;
        if explicit.tag != 0xa0 {
            return Err("SignedData is not [0] EXPLICIT".into());
        }
        let (tag, sd) = tlv(explicit.content)?;
        if tag != 0x30 {
            return Err("SignedData is not a SEQUENCE".into());
        }
        let fields = elements(sd)?;
        // version, digestAlgorithms, encapContentInfo, [0] certificates?, [1] crls?, signerInfos
        let encap = elements(expect(&fields, 2, "encapContentInfo")?.content)?;
        if oid(expect(&encap, 0, "eContentType")?)? != OID_TST_INFO {
            return Err("the signed content is not a TSTInfo".into());
        }
        let wrapped = expect(&encap, 1, "eContent")?;
        let (octet_tag, e_content) = tlv(wrapped.content)?;
        if wrapped.tag != 0xa0 || octet_tag != 0x04 {
            return Err("eContent is not an [0] OCTET STRING".into());
        }
        let mut certs = Vec::new();
        for f in &fields[3..] {
            if f.tag == 0xa0 {
                for c in elements(f.content)? {
                    if certs.len() == MAX_TOKEN_CERTS {
                        return Err(format!(
                            "it carries more than {MAX_TOKEN_CERTS} certificates"
                        ));
                    }
                    // CertificateChoices: only plain certificates (SEQUENCE) are used.
                    if c.tag == 0x30 {
                        certs.push(Cert::from_der(c.raw)?);
                    }
                }
            }
        }
        let signer_infos = fields
            .last()
            .filter(|f| f.tag == 0x31 && fields.len() >= 4)
            .ok_or("signerInfos is missing")?;
        let infos = elements(signer_infos.content)?;
        let [info] = infos.as_slice() else {
            return Err(format!(
                "it has {} signer infos; a timestamp has exactly one",
                infos.len()
            ));
        };
        Ok(SignedData {
            e_content,
            certs,
            signer: SignerInfo::parse(info.content)?,
        })
    }
}

/// How a SignerInfo names its certificate.
enum SignerId<'a> {
    IssuerSerial { issuer: &'a [u8], serial: &'a [u8] },
    KeyId(&'a [u8]),
}

struct SignerInfo<'a> {
    sid: SignerId<'a>,
    digest: HashAlgorithm,
    /// The `[0] IMPLICIT` signed attributes' content: signed as a SET OF.
    signed_attrs: &'a [u8],
    signature: &'a [u8],
}

impl<'a> SignerInfo<'a> {
    fn parse(info: &'a [u8]) -> Result<SignerInfo<'a>, String> {
        let f = elements(info)?;
        let sid = match expect(&f, 1, "SignerInfo sid")? {
            e if e.tag == 0x30 => {
                let parts = elements(e.content)?;
                SignerId::IssuerSerial {
                    issuer: expect(&parts, 0, "sid issuer")?.raw,
                    serial: expect(&parts, 1, "sid serialNumber")?.raw,
                }
            }
            e if e.tag == 0x80 => SignerId::KeyId(e.content),
            _ => return Err("SignerInfo sid is neither issuerAndSerialNumber nor a key id".into()),
        };
        let digest = digest_algorithm(expect(&f, 2, "SignerInfo digestAlgorithm")?)?;
        let attrs = expect(&f, 3, "signed attributes")?;
        if attrs.tag != 0xa0 {
            return Err("the SignerInfo has no signed attributes".into());
        }
        let signature = f
            .iter()
            .skip(4)
            .find(|e| e.tag == 0x04)
            .ok_or("the SignerInfo has no signature")?
            .content;
        Ok(SignerInfo {
            sid,
            digest,
            signed_attrs: attrs.content,
            signature,
        })
    }

    fn names(&self, cert: &Cert) -> bool {
        match self.sid {
            SignerId::IssuerSerial { issuer, serial } => cert.has_issuer_serial(issuer, serial),
            SignerId::KeyId(id) => cert.subject_key_id().is_some_and(|k| k == id),
        }
    }

    /// The signature over the signed attributes, which must bind the TSTInfo (content type
    /// and message digest) and, when they name one, the signer's certificate.
    fn verify(&self, signer: &Cert, e_content: &[u8]) -> Result<(), String> {
        let mut content_type = None;
        let mut message_digest = None;
        let mut ess_ok = true;
        for attr in elements(self.signed_attrs)? {
            let parts = elements(attr.content)?;
            let kind = oid(expect(&parts, 0, "attribute type")?)?;
            let values = elements(expect(&parts, 1, "attribute values")?.content)?;
            let [value] = values.as_slice() else {
                return Err(format!("attribute {kind} does not have exactly one value"));
            };
            match kind.as_str() {
                OID_CONTENT_TYPE => content_type = Some(oid(value)?),
                OID_MESSAGE_DIGEST if value.tag == 0x04 => message_digest = Some(value.content),
                OID_SIGNING_CERTIFICATE => ess_ok &= ess_cert_matches(value, signer, false)?,
                OID_SIGNING_CERTIFICATE_V2 => ess_ok &= ess_cert_matches(value, signer, true)?,
                _ => {}
            }
        }
        if content_type.as_deref() != Some(OID_TST_INFO) {
            return Err("the signed content-type attribute is not TSTInfo".into());
        }
        if message_digest != Some(digest(self.digest, e_content).as_slice()) {
            return Err("the signed message-digest attribute does not match the TSTInfo".into());
        }
        if !ess_ok {
            return Err("the signing-certificate attribute names another certificate".into());
        }
        // Signed as a DER SET OF, not with the [0] IMPLICIT tag it is stored under.
        let set = wrap(0x31, self.signed_attrs);
        if !signer.key.verify(self.digest, &set, self.signature) {
            return Err(format!(
                "its signature does not verify with the key of {}",
                signer.subject()
            ));
        }
        Ok(())
    }
}

/// Whether an ESS signing-certificate attribute (RFC 2634 / RFC 5035) names `signer` first.
fn ess_cert_matches(value: &Element, signer: &Cert, v2: bool) -> Result<bool, String> {
    let ids = elements(value.content)?;
    let first = elements(expect(&ids, 0, "signing certificate list")?.content)?;
    let first = elements(expect(&first, 0, "signing certificate id")?.content)?;
    let (algorithm, hash) = match first.first() {
        // ESSCertIDv2: hashAlgorithm is optional (default SHA-256).
        Some(e) if v2 && e.tag == 0x30 => (Some(e), expect(&first, 1, "certHash")?),
        Some(e) => (None, e),
        None => return Err("signing certificate id is empty".into()),
    };
    if hash.tag != 0x04 {
        return Err("certHash is not an OCTET STRING".into());
    }
    let expected = if v2 {
        let alg = algorithm.map_or(Ok(HashAlgorithm::Sha256), digest_algorithm)?;
        digest(alg, &signer.der)
    } else {
        let d =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &signer.der);
        d.as_ref().to_vec()
    };
    Ok(hash.content == expected.as_slice())
}

fn digest(alg: HashAlgorithm, bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    match alg {
        HashAlgorithm::Sha224 => sha2::Sha224::digest(bytes).to_vec(),
        HashAlgorithm::Sha256 => sha2::Sha256::digest(bytes).to_vec(),
        HashAlgorithm::Sha384 => sha2::Sha384::digest(bytes).to_vec(),
        HashAlgorithm::Sha512 => sha2::Sha512::digest(bytes).to_vec(),
    }
}

fn digest_algorithm(alg: &Element) -> Result<HashAlgorithm, String> {
    let parts = elements(alg.content)?;
    match oid(expect(&parts, 0, "hash algorithm")?)?.as_str() {
        "2.16.840.1.101.3.4.2.1" => Ok(HashAlgorithm::Sha256),
        "2.16.840.1.101.3.4.2.2" => Ok(HashAlgorithm::Sha384),
        "2.16.840.1.101.3.4.2.3" => Ok(HashAlgorithm::Sha512),
        other => Err(format!(
            "hash algorithm {other} is not supported by this version of pullgate (SHA-256, SHA-384, SHA-512 are)"
        )),
    }
}

struct TstInfo<'a> {
    hash: HashAlgorithm,
    hashed_message: &'a [u8],
    gen_time: i64,
}

impl<'a> TstInfo<'a> {
    fn parse(der: &'a [u8]) -> Result<TstInfo<'a>, String> {
        let (tag, content) = tlv(der)?;
        if tag != 0x30 {
            return Err("TSTInfo is not a SEQUENCE".into());
        }
        // version, policy, messageImprint, serialNumber, genTime, ...
        let f = elements(content)?;
        let imprint = elements(expect(&f, 2, "messageImprint")?.content)?;
        let hash = digest_algorithm(expect(&imprint, 0, "messageImprint hashAlgorithm")?)?;
        let hashed = expect(&imprint, 1, "messageImprint hashedMessage")?;
        let time = expect(&f, 4, "genTime")?;
        if hashed.tag != 0x04 || time.tag != 0x18 {
            return Err("TSTInfo is malformed".into());
        }
        Ok(TstInfo {
            hash,
            hashed_message: hashed.content,
            gen_time: generalized_time(time.content)?,
        })
    }
}

/// `YYYYMMDDHHMMSS[.f+]Z` (RFC 3161 allows fractions; DER forbids nothing else) to Unix
/// seconds, the fraction dropped.
fn generalized_time(bytes: &[u8]) -> Result<i64, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "genTime is not text")?;
    let bad = || format!("genTime {text:?} is not a UTC GeneralizedTime");
    let body = text.strip_suffix('Z').ok_or_else(bad)?;
    let (whole, fraction) = body.split_once('.').unwrap_or((body, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if whole.len() != 14 || !digits(whole) || !digits(fraction) {
        return Err(bad());
    }
    // Two-digit fields are at most 99: they fit an i8.
    let n = |r: std::ops::Range<usize>| whole[r].parse::<i16>().map_err(|_| bad());
    let small = |r: std::ops::Range<usize>| n(r).map(|v| v as i8);
    let civil = jiff::civil::DateTime::new(
        n(0..4)?,
        small(4..6)?,
        small(6..8)?,
        small(8..10)?,
        small(10..12)?,
        small(12..14)?,
        0,
    )
    .map_err(|_| bad())?;
    civil
        .to_zoned(jiff::tz::TimeZone::UTC)
        .map(|z| z.timestamp().as_second())
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::trust_root::from_ca_cert;

    // A real token made with `openssl ts -reply` (ECDSA P-256 TSA under a test root, ESS
    // signing-certificate-v2, nonce, accuracy) over `stamped.bin`.
    const RESPONSE: &[u8] = include_bytes!("data/testdata/tsa_response.der");
    const STAMPED: &[u8] = include_bytes!("data/testdata/tsa_stamped.bin");
    const ROOT: &str = include_str!("data/testdata/tsa_root.pem");
    const OTHER_ROOT: &str = include_str!("data/testdata/tsa_other_root.pem");
    const GEN_TIME: &str = include_str!("data/testdata/tsa_gen_time.txt");

    fn annotation(der: &[u8]) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!(r#"{{"SignedRFC3161Timestamp":"{b64}"}}"#)
    }

    fn roots(pem: &str) -> Vec<CertificateAuthority> {
        vec![from_ca_cert(pem).unwrap()]
    }

    #[test]
    fn openssl_timestamp_verifies() {
        let t = verify_timestamp(&annotation(RESPONSE), STAMPED, &roots(ROOT)).unwrap();
        let expected: jiff::Timestamp = GEN_TIME.trim().parse().unwrap();
        assert_eq!(t.time, expected.as_second());
        assert!(t.authority.contains("test tsa"), "{}", t.authority);
    }

    #[test]
    fn other_data_and_other_roots_are_refused() {
        let err = verify_timestamp(&annotation(RESPONSE), b"other", &roots(ROOT)).unwrap_err();
        assert!(err.contains("message imprint differs"), "{err}");
        let err = verify_timestamp(&annotation(RESPONSE), STAMPED, &roots(OTHER_ROOT)).unwrap_err();
        assert!(err.contains("not trusted"), "{err}");
        let err = verify_timestamp(&annotation(RESPONSE), STAMPED, &[]).unwrap_err();
        assert!(err.contains("not trusted"), "{err}");
    }

    #[test]
    fn trust_window_of_the_authority_applies() {
        let mut tsa = roots(ROOT);
        tsa[0].valid.end = Some(0);
        let err = verify_timestamp(&annotation(RESPONSE), STAMPED, &tsa).unwrap_err();
        assert!(err.contains("only trusted"), "{err}");
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error_not_a_panic() {
        let tsa = roots(ROOT);
        for cut in 0..RESPONSE.len() {
            let r = verify_der(&RESPONSE[..cut], STAMPED, &tsa);
            assert!(r.is_err(), "truncated at {cut} still verified");
        }
        for i in 0..RESPONSE.len() {
            let mut flipped = RESPONSE.to_vec();
            flipped[i] ^= 0x01;
            // Flips in unsigned parts (status text, unsigned certificates) may still verify;
            // what matters is no panic, and no other time or data accepted.
            if let Ok(t) = verify_der(&flipped, STAMPED, &tsa) {
                let expected: jiff::Timestamp = GEN_TIME.trim().parse().unwrap();
                assert_eq!(t.time, expected.as_second(), "flip at {i} changed the time");
            }
        }
        for junk in [
            "",
            "{}",
            r#"{"SignedRFC3161Timestamp":"%%"}"#,
            r#"{"SignedRFC3161Timestamp":"MAA="}"#,
        ] {
            assert!(verify_timestamp(junk, STAMPED, &tsa).is_err(), "{junk}");
        }
    }

    #[test]
    fn generalized_times() {
        assert_eq!(generalized_time(b"19700101000000Z"), Ok(0));
        assert_eq!(generalized_time(b"20260101000000.123Z"), Ok(1_767_225_600));
        for bad in [
            "2026010100000Z",
            "20260101000000",
            "20261301000000Z",
            "2026010100000aZ",
            "20260101000000.Z",
        ] {
            assert!(generalized_time(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}

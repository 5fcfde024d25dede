//! Public keys of `key` authorities and cosign's signature check over a payload.
//!
//! cosign signs the SHA-x digest of the payload: ECDSA signatures are ASN.1 DER over the
//! prehashed payload with the CIP's `hashAlgorithm` (sha256 by default), RSA keys use
//! PKCS#1 v1.5 with that hash, and Ed25519 signs the message itself (no prehash).

use base64::Engine as _;
use p256::pkcs8::DecodePublicKey as _;
use sha2::Digest as _;

/// Errors reading a public key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("no PEM public key found")]
    NoPem,
    #[error("PEM block {label:?} is not a public key")]
    NotPublicKey { label: String },
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("unsupported or malformed public key: {0}")]
    Unsupported(String),
}

/// Digest applied to the payload before signing (`key.hashAlgorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HashAlgorithm {
    Sha224,
    #[default]
    Sha256,
    Sha384,
    Sha512,
}

impl HashAlgorithm {
    /// Parses a CIP `hashAlgorithm` value, trimmed and in any case (as policy-controller
    /// reads it); empty means the default sha256.
    pub fn parse(s: &str) -> Option<HashAlgorithm> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "sha256" => Some(HashAlgorithm::Sha256),
            "sha224" => Some(HashAlgorithm::Sha224),
            "sha384" => Some(HashAlgorithm::Sha384),
            "sha512" => Some(HashAlgorithm::Sha512),
            _ => None,
        }
    }

    fn digest(self, msg: &[u8]) -> Vec<u8> {
        match self {
            HashAlgorithm::Sha224 => sha2::Sha224::digest(msg).to_vec(),
            HashAlgorithm::Sha256 => sha2::Sha256::digest(msg).to_vec(),
            HashAlgorithm::Sha384 => sha2::Sha384::digest(msg).to_vec(),
            HashAlgorithm::Sha512 => sha2::Sha512::digest(msg).to_vec(),
        }
    }
}

#[derive(Clone)]
enum Inner {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
    Ed25519(ed25519_dalek::VerifyingKey),
}

/// A verification key parsed from a PEM `PUBLIC KEY` (SubjectPublicKeyInfo) block.
#[derive(Clone)]
pub struct PublicKey {
    inner: Inner,
    /// DER SubjectPublicKeyInfo, kept for fingerprints and Rekor log IDs.
    spki_der: Vec<u8>,
    /// The key in aws-lc-rs's input form (SEC1 point, PKCS#1 RSA key, raw Ed25519 key), which
    /// verifies several times faster than the pure-Rust crates; `None` where aws-lc-rs has no
    /// matching algorithm (RSA keys under 2048 bits).
    fast: Option<Vec<u8>>,
}

/// The key in the form aws-lc-rs verifies with.
fn fast_form(inner: &Inner) -> Option<Vec<u8>> {
    match inner {
        Inner::P256(k) => Some(k.to_encoded_point(false).as_bytes().to_vec()),
        Inner::P384(k) => Some(k.to_encoded_point(false).as_bytes().to_vec()),
        Inner::Rsa(k) => {
            use rsa::pkcs1::EncodeRsaPublicKey as _;
            use rsa::traits::PublicKeyParts as _;
            (k.size() * 8 >= 2048)
                .then(|| k.to_pkcs1_der().ok().map(|d| d.as_bytes().to_vec()))
                .flatten()
        }
        Inner::Ed25519(k) => Some(k.as_bytes().to_vec()),
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({}, {})", self.algorithm(), self.fingerprint())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}

impl PublicKey {
    /// Parses exactly one PEM public key.
    pub fn from_pem(text: &str) -> Result<PublicKey, KeyError> {
        let mut keys = parse_pem_keys(text)?;
        match keys.len() {
            1 => Ok(keys.remove(0)),
            _ => Err(KeyError::Unsupported(format!(
                "expected one public key, found {}",
                keys.len()
            ))),
        }
    }

    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<PublicKey, KeyError> {
        let inner = if let Ok(k) = p256::ecdsa::VerifyingKey::from_public_key_der(der) {
            Inner::P256(k)
        } else if let Ok(k) = p384::ecdsa::VerifyingKey::from_public_key_der(der) {
            Inner::P384(k)
        } else if let Ok(k) = rsa::RsaPublicKey::from_public_key_der(der) {
            Inner::Rsa(k)
        } else if let Ok(k) = ed25519_dalek::VerifyingKey::from_public_key_der(der) {
            Inner::Ed25519(k)
        } else {
            return Err(KeyError::Unsupported(
                "not an ECDSA P-256/P-384, RSA or Ed25519 SubjectPublicKeyInfo".into(),
            ));
        };
        Ok(PublicKey {
            fast: fast_form(&inner),
            inner,
            spki_der: der.to_vec(),
        })
    }

    /// `ecdsa-p256`, `ecdsa-p384`, `rsa` or `ed25519`.
    pub fn algorithm(&self) -> &'static str {
        match self.inner {
            Inner::P256(_) => "ecdsa-p256",
            Inner::P384(_) => "ecdsa-p384",
            Inner::Rsa(_) => "rsa",
            Inner::Ed25519(_) => "ed25519",
        }
    }

    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo (Rekor's log ID form).
    pub fn fingerprint(&self) -> String {
        hex::encode(sha2::Sha256::digest(&self.spki_der))
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// Checks a raw signature over `msg` (the message, not its digest).
    pub fn verify(&self, hash: HashAlgorithm, msg: &[u8], signature: &[u8]) -> bool {
        use aws_lc_rs::signature as aws;
        use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
        use HashAlgorithm::{Sha256, Sha384, Sha512};
        let fast: Option<&'static dyn aws::VerificationAlgorithm> = match (&self.inner, hash) {
            (Inner::P256(_), Sha256) => Some(&aws::ECDSA_P256_SHA256_ASN1),
            (Inner::P256(_), Sha384) => Some(&aws::ECDSA_P256_SHA384_ASN1),
            (Inner::P256(_), Sha512) => Some(&aws::ECDSA_P256_SHA512_ASN1),
            (Inner::P384(_), Sha256) => Some(&aws::ECDSA_P384_SHA256_ASN1),
            (Inner::P384(_), Sha384) => Some(&aws::ECDSA_P384_SHA384_ASN1),
            (Inner::P384(_), Sha512) => Some(&aws::ECDSA_P384_SHA512_ASN1),
            (Inner::Rsa(_), Sha256) => Some(&aws::RSA_PKCS1_2048_8192_SHA256),
            (Inner::Rsa(_), Sha384) => Some(&aws::RSA_PKCS1_2048_8192_SHA384),
            (Inner::Rsa(_), Sha512) => Some(&aws::RSA_PKCS1_2048_8192_SHA512),
            (Inner::Ed25519(_), _) => Some(&aws::ED25519),
            _ => None,
        };
        if let (Some(alg), Some(key)) = (fast, &self.fast) {
            return aws::UnparsedPublicKey::new(alg, key)
                .verify(msg, signature)
                .is_ok();
        }
        match &self.inner {
            Inner::P256(k) => p256::ecdsa::Signature::from_der(signature)
                .is_ok_and(|sig| k.verify_prehash(&hash.digest(msg), &sig).is_ok()),
            Inner::P384(k) => p384::ecdsa::Signature::from_der(signature)
                .is_ok_and(|sig| k.verify_prehash(&hash.digest(msg), &sig).is_ok()),
            Inner::Rsa(k) => {
                let scheme = match hash {
                    HashAlgorithm::Sha224 => rsa::Pkcs1v15Sign::new::<sha2::Sha224>(),
                    HashAlgorithm::Sha256 => rsa::Pkcs1v15Sign::new::<sha2::Sha256>(),
                    HashAlgorithm::Sha384 => rsa::Pkcs1v15Sign::new::<sha2::Sha384>(),
                    HashAlgorithm::Sha512 => rsa::Pkcs1v15Sign::new::<sha2::Sha512>(),
                };
                k.verify(scheme, &hash.digest(msg), signature).is_ok()
            }
            Inner::Ed25519(k) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|sig| k.verify_strict(msg, &sig).is_ok()),
        }
    }

    /// Checks a base64 signature as cosign stores it in the signature annotation.
    pub fn verify_b64(&self, hash: HashAlgorithm, msg: &[u8], signature_b64: &str) -> bool {
        base64::engine::general_purpose::STANDARD
            .decode(signature_b64.trim())
            .is_ok_and(|sig| self.verify(hash, msg, &sig))
    }
}

/// Parses every PEM block of `text`; each must be a public key. Used for `key.data` and for
/// key Secrets, where any of several keys may verify.
pub fn parse_pem_keys(text: &str) -> Result<Vec<PublicKey>, KeyError> {
    let blocks = pem_blocks(text)?;
    if blocks.is_empty() {
        return Err(KeyError::NoPem);
    }
    blocks
        .into_iter()
        .map(|(label, der)| match label.as_str() {
            "PUBLIC KEY" => PublicKey::from_spki_der(&der),
            "RSA PUBLIC KEY" => {
                use rsa::pkcs1::DecodeRsaPublicKey as _;
                use rsa::pkcs8::EncodePublicKey as _;
                let key = rsa::RsaPublicKey::from_pkcs1_der(&der)
                    .map_err(|e| KeyError::Unsupported(e.to_string()))?;
                let spki = key
                    .to_public_key_der()
                    .map_err(|e| KeyError::Unsupported(e.to_string()))?;
                let inner = Inner::Rsa(key);
                Ok(PublicKey {
                    fast: fast_form(&inner),
                    inner,
                    spki_der: spki.as_bytes().to_vec(),
                })
            }
            _ => Err(KeyError::NotPublicKey { label }),
        })
        .collect()
}

/// Splits PEM text into (label, DER) blocks.
fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, KeyError> {
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut closed = false;
        for inner in lines.by_ref() {
            if inner == end {
                closed = true;
                break;
            }
            if inner.contains(':') {
                // RFC 1421 headers (Proc-Type, DEK-Info) only appear in encrypted keys.
                return Err(KeyError::NotPublicKey {
                    label: label.to_string(),
                });
            }
            body.push_str(inner);
        }
        if !closed {
            return Err(KeyError::Pem(format!("missing {end:?}")));
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(body.as_bytes())
            .map_err(|e| KeyError::Pem(format!("block {label:?}: {e}")))?;
        out.push((label.to_string(), der));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P256_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G2Y+2tabdTV5BcGiBIx0a9fAFwr
kBbmLSGtks4L3qX6yYY0zufBnhC8Ur/iy55GhWP/9A/bY2LhC30M9+RYtw==
-----END PUBLIC KEY-----
";

    #[test]
    fn parses_p256_and_reports_fingerprint() {
        let key = PublicKey::from_pem(P256_PEM).unwrap();
        assert_eq!(key.algorithm(), "ecdsa-p256");
        // The public-good Rekor log ID is the SHA-256 of this key's SPKI.
        assert_eq!(
            key.fingerprint(),
            "c0d23d6ad406973f9559f3ba2d1ca01f84147d8ffc5b8445c224f98b9591801d"
        );
    }

    #[test]
    fn rejects_private_keys_and_garbage() {
        assert_eq!(parse_pem_keys("hello"), Err(KeyError::NoPem));
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(
            parse_pem_keys(private),
            Err(KeyError::NotPublicKey { .. })
        ));
        let truncated = "-----BEGIN PUBLIC KEY-----\nMFkw\n";
        assert!(matches!(parse_pem_keys(truncated), Err(KeyError::Pem(_))));
        let bad = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert!(matches!(parse_pem_keys(bad), Err(KeyError::Unsupported(_))));
    }

    #[test]
    fn several_keys_in_one_text() {
        let two = format!("{P256_PEM}\n{P256_PEM}");
        assert_eq!(parse_pem_keys(&two).unwrap().len(), 2);
        assert!(PublicKey::from_pem(&two).is_err());
    }

    #[test]
    fn every_hash_algorithm_verifies_on_both_paths() {
        use p256::ecdsa::signature::hazmat::PrehashSigner as _;
        use p256::pkcs8::EncodePublicKey as _;
        let signing = p256::ecdsa::SigningKey::from_slice(&[9u8; 32]).unwrap();
        let pem = signing
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let key = PublicKey::from_pem(&pem).unwrap();
        assert!(key.fast.is_some());
        let msg = b"payload";
        for hash in [
            HashAlgorithm::Sha224,
            HashAlgorithm::Sha256,
            HashAlgorithm::Sha384,
            HashAlgorithm::Sha512,
        ] {
            let sig: p256::ecdsa::Signature = signing.sign_prehash(&hash.digest(msg)).unwrap();
            let der = sig.to_der();
            assert!(key.verify(hash, msg, der.as_bytes()), "{hash:?}");
            assert!(!key.verify(hash, b"other", der.as_bytes()), "{hash:?}");
            let other = if hash == HashAlgorithm::Sha256 {
                HashAlgorithm::Sha384
            } else {
                HashAlgorithm::Sha256
            };
            assert!(
                !key.verify(other, msg, der.as_bytes()),
                "{hash:?} vs {other:?}"
            );
        }
        assert!(!key.verify(HashAlgorithm::Sha256, msg, b"not der"));
    }

    #[test]
    fn hash_algorithm_names() {
        assert_eq!(HashAlgorithm::parse(""), Some(HashAlgorithm::Sha256));
        assert_eq!(HashAlgorithm::parse("sha512"), Some(HashAlgorithm::Sha512));
        assert_eq!(HashAlgorithm::parse("md5"), None);
        assert_eq!(
            HashAlgorithm::parse(" SHA384 "),
            Some(HashAlgorithm::Sha384)
        );
    }
}

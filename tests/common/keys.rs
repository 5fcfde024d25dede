//! Signing keys made with the sigstore crate (cosign's key formats).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sigstore::crypto::signing_key::SigStoreKeyPair;
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, Signature, SigningScheme};

/// Key types cosign can sign with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    EcdsaP521,
    Ed25519,
    /// RSA 2048, PKCS#1 v1.5 with SHA-256 (cosign's RSA scheme).
    Rsa,
}

impl KeyKind {
    pub fn scheme(self) -> SigningScheme {
        match self {
            KeyKind::EcdsaP256 => SigningScheme::ECDSA_P256_SHA256_ASN1,
            KeyKind::EcdsaP384 => SigningScheme::ECDSA_P384_SHA384_ASN1,
            KeyKind::EcdsaP521 => SigningScheme::ECDSA_P521_SHA512_ASN1,
            KeyKind::Ed25519 => SigningScheme::ED25519,
            KeyKind::Rsa => SigningScheme::RSA_PKCS1_SHA256(2048),
        }
    }
}

/// A freshly generated key pair.
pub struct TestKey {
    kind: KeyKind,
    keypair: SigStoreKeyPair,
}

impl TestKey {
    pub fn generate(kind: KeyKind) -> TestKey {
        let keypair = kind
            .scheme()
            .create_signer()
            .and_then(|s| s.to_sigstore_keypair())
            .unwrap_or_else(|e| panic!("generate {kind:?} key: {e}"));
        TestKey { kind, keypair }
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    pub fn scheme(&self) -> SigningScheme {
        self.kind.scheme()
    }

    /// `-----BEGIN PUBLIC KEY-----` (SubjectPublicKeyInfo), as in cosign's `cosign.pub`.
    pub fn public_pem(&self) -> String {
        self.keypair.public_key_to_pem().expect("public key PEM")
    }

    /// DER SubjectPublicKeyInfo.
    pub fn public_der(&self) -> Vec<u8> {
        self.keypair.public_key_to_der().expect("public key DER")
    }

    /// Unencrypted PKCS#8 `-----BEGIN PRIVATE KEY-----`.
    pub fn private_pem(&self) -> String {
        self.keypair
            .private_key_to_pem()
            .expect("private key PEM")
            .to_string()
    }

    /// cosign's `ENCRYPTED SIGSTORE PRIVATE KEY` (scrypt + secretbox), as in `cosign.key`.
    pub fn encrypted_private_pem(&self, password: &str) -> String {
        self.keypair
            .private_key_to_encrypted_pem(password.as_bytes())
            .expect("encrypted private key PEM")
            .to_string()
    }

    /// A sigstore signer for this key (a new one each call; signers are not `Clone`).
    pub fn signer(&self) -> SigStoreSigner {
        self.keypair
            .to_sigstore_signer(&self.scheme())
            .expect("signer for key")
    }

    /// Raw signature over `msg` (DER for ECDSA).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.signer().sign(msg).expect("sign")
    }

    /// Base64 (standard) signature over `msg`, as cosign stores it.
    pub fn sign_b64(&self, msg: &[u8]) -> String {
        B64.encode(self.sign(msg))
    }

    pub fn verification_key(&self) -> CosignVerificationKey {
        CosignVerificationKey::from_pem(self.public_pem().as_bytes(), &self.scheme())
            .expect("verification key")
    }
}

/// Checks a base64 signature over `msg` with a PEM public key, the way a verifier would
/// (key type detected from the PEM).
pub fn verify_b64(public_pem: &str, signature_b64: &str, msg: &[u8]) -> bool {
    CosignVerificationKey::try_from_pem(public_pem.as_bytes())
        .and_then(|k| k.verify_signature(Signature::Base64Encoded(signature_b64.as_bytes()), msg))
        .is_ok()
}

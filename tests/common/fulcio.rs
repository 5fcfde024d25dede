//! A test certificate authority in Fulcio's shape (root → intermediate → short-lived leaf with
//! the OIDC issuer extension and an identity SAN), with its own CT log that embeds a real
//! RFC 6962 SCT in each leaf. Certificates are made with rcgen; the CT log signs with a key
//! made by the sigstore crate.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use sha2::Digest as _;
use time::OffsetDateTime;

use super::keys::{KeyKind, TestKey};

const FULCIO_ISSUER_V2: &[u64] = &[1, 3, 6, 1, 4, 1, 57264, 1, 8];
const SCT_LIST: &[u64] = &[1, 3, 6, 1, 4, 1, 11129, 2, 4, 2];

/// A CA: its certificate and key.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn pem(&self) -> String {
        self.cert.pem()
    }
}

/// What a leaf certificate says.
pub struct Leaf<'a> {
    pub issuer: &'a str,
    /// `email:…` or `uri:…`.
    pub san: &'a str,
    /// Unix seconds; the certificate is valid from here for `lifetime` seconds.
    pub not_before: i64,
    pub lifetime: i64,
    /// Embed an SCT from the test CT log (`false`: none at all).
    pub sct: bool,
    /// Corrupt the SCT signature.
    pub bad_sct: bool,
}

impl Default for Leaf<'_> {
    fn default() -> Self {
        Leaf {
            issuer: "https://token.actions.githubusercontent.com",
            san: "uri:https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main",
            not_before: now() - 60,
            lifetime: 600,
            sct: true,
            bad_sct: false,
        }
    }
}

pub fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// A root, an intermediate and a CT log.
pub struct TestFulcio {
    pub root: Ca,
    pub intermediate: Ca,
    pub ct_log: TestKey,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "pullgate-test");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::from_unix_timestamp(now() - 365 * 86400).unwrap();
    params.not_after = OffsetDateTime::from_unix_timestamp(now() + 365 * 86400).unwrap();
    params
}

impl TestFulcio {
    pub fn new(name: &str) -> TestFulcio {
        let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let root = ca_params(&format!("{name} root"))
            .self_signed(&root_key)
            .unwrap();
        let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut int_params = ca_params(&format!("{name} intermediate"));
        int_params.use_authority_key_identifier_extension = true;
        let intermediate = int_params.signed_by(&int_key, &root, &root_key).unwrap();
        TestFulcio {
            root: Ca {
                cert: root,
                key: root_key,
            },
            intermediate: Ca {
                cert: intermediate,
                key: int_key,
            },
            ct_log: TestKey::generate(KeyKind::EcdsaP256),
        }
    }

    /// The chain annotation cosign attaches: intermediate then root.
    pub fn chain_pem(&self) -> String {
        format!("{}{}", self.intermediate.pem(), self.root.pem())
    }

    /// Issues a leaf for `signer`'s public key (a sigstore-made key), as Fulcio would.
    pub fn issue(&self, signer: &TestKey, leaf: &Leaf) -> String {
        let key = KeyPair::from_pem(&signer.private_pem()).expect("leaf key for rcgen");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.serial_number = Some(SerialNumber::from(vec![0x42, 0x17, 0x05]));
        params.not_before = OffsetDateTime::from_unix_timestamp(leaf.not_before).unwrap();
        params.not_after =
            OffsetDateTime::from_unix_timestamp(leaf.not_before + leaf.lifetime).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        params.use_authority_key_identifier_extension = true;
        params.subject_alt_names = vec![match leaf.san.split_once(':') {
            Some(("email", v)) => SanType::Rfc822Name(v.try_into().unwrap()),
            Some(("uri", v)) => SanType::URI(v.try_into().unwrap()),
            _ => panic!("SAN {:?}: email:… or uri:…", leaf.san),
        }];
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            FULCIO_ISSUER_V2,
            der_utf8(leaf.issuer),
        )];
        if !leaf.sct {
            return params
                .signed_by(&key, &self.intermediate.cert, &self.intermediate.key)
                .unwrap()
                .pem();
        }
        // The precertificate's TBS is the final TBS without the SCT extension: issue once
        // without it, have the log sign that, then issue again with the SCT list appended.
        let pre = params
            .clone()
            .signed_by(&key, &self.intermediate.cert, &self.intermediate.key)
            .unwrap();
        let tbs = first_element(pre.der());
        let sct = self.sct_for(&tbs, leaf.not_before * 1000, leaf.bad_sct);
        params
            .custom_extensions
            .push(CustomExtension::from_oid_content(
                SCT_LIST,
                der_octets(&sct),
            ));
        params
            .signed_by(&key, &self.intermediate.cert, &self.intermediate.key)
            .unwrap()
            .pem()
    }

    /// A TLS-encoded SignedCertificateTimestampList with one SCT over `tbs`.
    fn sct_for(&self, tbs: &[u8], timestamp_ms: i64, corrupt: bool) -> Vec<u8> {
        let issuer_spki = self.intermediate.key.public_key_der();
        let issuer_key_hash = sha2::Sha256::digest(&issuer_spki);
        let mut signed = vec![0u8, 0u8];
        signed.extend_from_slice(&(timestamp_ms as u64).to_be_bytes());
        signed.extend_from_slice(&1u16.to_be_bytes());
        signed.extend_from_slice(&issuer_key_hash);
        signed.extend_from_slice(&(tbs.len() as u32).to_be_bytes()[1..]);
        signed.extend_from_slice(tbs);
        signed.extend_from_slice(&0u16.to_be_bytes());
        let mut signature = self.ct_log.sign(&signed);
        if corrupt {
            let last = signature.len() - 1;
            signature[last] ^= 0x01;
        }
        let log_id = sha2::Sha256::digest(self.ct_log.public_der());
        let mut sct = vec![0u8];
        sct.extend_from_slice(&log_id);
        sct.extend_from_slice(&(timestamp_ms as u64).to_be_bytes());
        sct.extend_from_slice(&0u16.to_be_bytes());
        sct.push(4); // sha256
        sct.push(3); // ecdsa
        sct.extend_from_slice(&(signature.len() as u16).to_be_bytes());
        sct.extend_from_slice(&signature);
        let mut list = (sct.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&sct);
        let mut out = (list.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&list);
        out
    }

    /// A TrustRoot naming this CA, its CT log and `rekor_pem` as the transparency log.
    pub fn trust_root_yaml(&self, name: &str, rekor_pem: &str) -> String {
        format!(
            "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: {name}}}\nspec:\n  sigstoreKeys:\n    certificateAuthorities:\n    - subject: {{organization: pullgate-test, commonName: test}}\n      uri: https://fulcio.test\n      certChain: {}\n    ctLogs:\n    - baseURL: https://ctfe.test\n      hashAlgorithm: sha-256\n      publicKey: {}\n    tLogs:\n    - baseURL: https://rekor.test\n      hashAlgorithm: sha-256\n      publicKey: {}\n",
            B64.encode(self.chain_pem()),
            B64.encode(self.ct_log.public_pem()),
            B64.encode(rekor_pem),
        )
    }
}

fn der_len(len: usize) -> Vec<u8> {
    if len < 0x80 {
        vec![len as u8]
    } else if len < 0x100 {
        vec![0x81, len as u8]
    } else {
        vec![0x82, (len >> 8) as u8, len as u8]
    }
}

fn der_utf8(s: &str) -> Vec<u8> {
    let mut out = vec![0x0c];
    out.extend(der_len(s.len()));
    out.extend_from_slice(s.as_bytes());
    out
}

fn der_octets(b: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04];
    out.extend(der_len(b.len()));
    out.extend_from_slice(b);
    out
}

/// The first element inside a DER SEQUENCE (a certificate's TBSCertificate), whole.
fn first_element(der: &[u8]) -> Vec<u8> {
    fn header(b: &[u8]) -> (usize, usize) {
        if b[1] < 0x80 {
            (2, b[1] as usize)
        } else {
            let n = (b[1] & 0x7f) as usize;
            let len = b[2..2 + n]
                .iter()
                .fold(0usize, |a, x| (a << 8) | *x as usize);
            (2 + n, len)
        }
    }
    let (h, _) = header(der);
    let inner = &der[h..];
    let (h2, len) = header(inner);
    inner[..h2 + len].to_vec()
}

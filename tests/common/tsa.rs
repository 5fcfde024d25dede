//! A test RFC 3161 timestamp authority run with the `openssl` CLI (`openssl ts -query` /
//! `ts -reply`): a P-256 root and a timestamping leaf (EKU timeStamping, critical), in a temp
//! dir. Its answers are the same TimeStampResp a real TSA sends, which cosign stores base64 in
//! the `dev.sigstore.cosign/rfc3161timestamp` annotation.

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// Layer annotation holding cosign's RFC 3161 timestamp JSON.
pub const RFC3161_TIMESTAMP_ANNOTATION: &str = "dev.sigstore.cosign/rfc3161timestamp";

pub struct TestTsa {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

impl TestTsa {
    /// A new root and TSA certificate named `name`.
    pub fn new(name: &str) -> TestTsa {
        let dir = tempfile::Builder::new()
            .prefix("pullgate-tsa-")
            .tempdir()
            .expect("tsa temp dir");
        let d = dir.path();
        let root_subject = format!("/O=pullgate-test/CN={name} root");
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "root.key",
                "-out",
                "root.crt",
                "-subj",
                &root_subject,
                "-days",
                "30",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        );
        let tsa_subject = format!("/O=pullgate-test/CN={name}");
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "tsa.key",
                "-out",
                "tsa.csr",
                "-subj",
                &tsa_subject,
            ],
        );
        std::fs::write(
            d.join("ext.cnf"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=critical,timeStamping\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "tsa.csr",
                "-CA",
                "root.crt",
                "-CAkey",
                "root.key",
                "-CAcreateserial",
                "-out",
                "tsa.crt",
                "-days",
                "20",
                "-extfile",
                "ext.cnf",
            ],
        );
        std::fs::write(
            d.join("ts.cnf"),
            "[tsa]\nserial = ./serial\nsigner_digest = sha256\ndefault_policy = 1.2.3.4.1\ndigests = sha256, sha384, sha512\ness_cert_id_alg = sha256\naccuracy = secs:1\ncerts = ./root.crt\n",
        )
        .unwrap();
        std::fs::write(d.join("serial"), "01\n").unwrap();
        TestTsa { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// PEM of the TSA certificate then its root, as a TrustRoot lists a timestamp authority.
    pub fn chain_pem(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.path(n)).unwrap();
        format!("{}{}", read("tsa.crt"), read("root.crt"))
    }

    /// A timestamp over `data`, now, as the DER TimeStampResp the TSA answers.
    pub fn stamp_der(&self, data: &[u8]) -> Vec<u8> {
        let d = self.dir.path();
        std::fs::write(d.join("data.bin"), data).unwrap();
        openssl(
            d,
            &[
                "ts", "-query", "-data", "data.bin", "-sha256", "-cert", "-out", "req.tsq",
            ],
        );
        openssl(
            d,
            &[
                "ts",
                "-reply",
                "-queryfile",
                "req.tsq",
                "-signer",
                "tsa.crt",
                "-inkey",
                "tsa.key",
                "-config",
                "ts.cnf",
                "-section",
                "tsa",
                "-out",
                "resp.tsr",
            ],
        );
        std::fs::read(d.join("resp.tsr")).unwrap()
    }

    /// The `dev.sigstore.cosign/rfc3161timestamp` annotation for a timestamp over `data`.
    pub fn annotation(&self, data: &[u8]) -> String {
        serde_json::json!({"SignedRFC3161Timestamp": B64.encode(self.stamp_der(data))}).to_string()
    }

    /// A TrustRoot holding only this timestamp authority.
    pub fn trust_root_yaml(&self, name: &str) -> String {
        format!(
            "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: {name}}}\nspec:\n  sigstoreKeys:\n    timestampAuthorities:\n    - subject: {{organization: pullgate-test, commonName: tsa}}\n      uri: https://tsa.test\n      certChain: {}\n",
            B64.encode(self.chain_pem())
        )
    }
}

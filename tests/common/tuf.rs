//! A real TUF repository made in the test: keys from the sigstore crate, metadata signed over
//! OLPC canonical JSON (written here, independently of pullgate), packed with the system `tar`
//! and `gzip` the way policy-controller's `mirrorFS` is.

use std::path::Path;
use std::process::Command;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;

use super::fulcio::TestFulcio;
use super::keys::{KeyKind, TestKey};

/// OLPC canonical JSON (sorted keys, no whitespace, only `"` and `\` escaped).
pub fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let body: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", canonical(&json!(k)), canonical(&m[*k])))
                .collect();
            format!("{{{}}}", body.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        Value::String(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        other => other.to_string(),
    }
}

fn key_json(k: &TestKey) -> Value {
    json!({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": k.public_pem()}})
}

fn key_id(k: &TestKey) -> String {
    hex::encode(sha2::Sha256::digest(canonical(&key_json(k))))
}

fn signed_doc(signed: Value, signers: &[&TestKey]) -> Vec<u8> {
    let msg = canonical(&signed);
    let sigs: Vec<Value> = signers
        .iter()
        .map(|k| json!({"keyid": key_id(k), "sig": hex::encode(k.sign(msg.as_bytes()))}))
        .collect();
    serde_json::to_vec_pretty(&json!({"signed": signed, "signatures": sigs})).unwrap()
}

/// What to break in a generated repository.
#[derive(Default, Clone)]
pub struct TufFaults {
    /// The timestamp expired an hour ago.
    pub expired_timestamp: bool,
    /// The target file differs from what targets.json records.
    pub tampered_target: bool,
}

/// A TUF repository under `dir/repository`, holding `trusted_root.json`.
pub struct TufRepo {
    pub dir: tempfile::TempDir,
    /// `1.root.json`, the root a TrustRoot trusts initially.
    pub root1: Vec<u8>,
}

impl TufRepo {
    pub fn new(trusted_root: &[u8], faults: &TufFaults) -> TufRepo {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repository");
        std::fs::create_dir_all(repo.join("targets")).unwrap();
        let [root, ts, snap, tgt] = [0; 4].map(|_| TestKey::generate(KeyKind::EcdsaP256));
        let future = "2099-01-01T00:00:00Z";
        let mut keys = serde_json::Map::new();
        for k in [&root, &ts, &snap, &tgt] {
            keys.insert(key_id(k), key_json(k));
        }
        let role = |k: &TestKey| json!({"keyids": [key_id(k)], "threshold": 1});
        let root1 = signed_doc(
            json!({"_type": "root", "spec_version": "1.0", "version": 1, "expires": future,
                "consistent_snapshot": true, "keys": keys, "roles": {"root": role(&root),
                "timestamp": role(&ts), "snapshot": role(&snap), "targets": role(&tgt)}}),
            &[&root],
        );
        let sha = hex::encode(sha2::Sha256::digest(trusted_root));
        let targets = signed_doc(
            json!({"_type": "targets", "spec_version": "1.0", "version": 1, "expires": future,
                "targets": {"trusted_root.json": {"length": trusted_root.len(), "hashes": {"sha256": sha}}}}),
            &[&tgt],
        );
        let snapshot = signed_doc(
            json!({"_type": "snapshot", "spec_version": "1.0", "version": 1, "expires": future,
                "meta": {"targets.json": {"version": 1}}}),
            &[&snap],
        );
        let expires = if faults.expired_timestamp {
            jiff::Timestamp::from_second(super::fulcio::now() - 3600)
                .unwrap()
                .to_string()
        } else {
            future.to_string()
        };
        let timestamp = signed_doc(
            json!({"_type": "timestamp", "spec_version": "1.0", "version": 1, "expires": expires,
                "meta": {"snapshot.json": {"version": 1}}}),
            &[&ts],
        );
        let mut target = trusted_root.to_vec();
        if faults.tampered_target {
            target[10] ^= 1;
        }
        for (name, bytes) in [
            ("1.root.json".to_string(), &root1),
            ("1.targets.json".into(), &targets),
            ("1.snapshot.json".into(), &snapshot),
            ("timestamp.json".into(), &timestamp),
            (format!("targets/{sha}.trusted_root.json"), &target),
        ] {
            std::fs::write(repo.join(name), bytes).unwrap();
        }
        TufRepo { dir, root1 }
    }

    /// The directory to serve over HTTP (metadata at the top, `targets/` below).
    pub fn repository(&self) -> std::path::PathBuf {
        self.dir.path().join("repository")
    }

    /// policy-controller's `mirrorFS`: base64 of `repository/` tarred and gzipped.
    pub fn mirror_fs(&self) -> String {
        let out = Command::new("tar")
            .args(["-czf", "-", "-C"])
            .arg(self.dir.path())
            .arg("repository")
            .output()
            .expect("run tar");
        assert!(
            out.status.success(),
            "tar: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        B64.encode(out.stdout)
    }

    /// A TrustRoot with `spec.repository` for this repository.
    pub fn repository_trust_root(&self, name: &str) -> String {
        format!(
            "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: {name}}}\nspec:\n  repository:\n    root: {}\n    mirrorFS: {}\n    targets: targets\n",
            B64.encode(&self.root1),
            self.mirror_fs()
        )
    }

    /// A TrustRoot with `spec.remote` pointing at `mirror`.
    pub fn remote_trust_root(&self, name: &str, mirror: &str) -> String {
        format!(
            "---\napiVersion: policy.sigstore.dev/v1alpha1\nkind: TrustRoot\nmetadata: {{name: {name}}}\nspec:\n  remote:\n    root: {}\n    mirror: \"{mirror}\"\n",
            B64.encode(&self.root1)
        )
    }
}

fn pem_ders(pem: &str) -> Vec<String> {
    pem.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|b| {
            let body: String = b
                .split("-----END")
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            body
        })
        .collect()
}

/// Sigstore's `trusted_root.json` for a test Fulcio (with its CT log) and a Rekor key.
pub fn trusted_root_json(fulcio: &TestFulcio, rekor_der: &[u8]) -> Vec<u8> {
    let certs: Vec<Value> = pem_ders(&fulcio.chain_pem())
        .into_iter()
        .map(|b| json!({"rawBytes": b}))
        .collect();
    serde_json::to_vec_pretty(&json!({
        "mediaType": "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
        "tlogs": [{"baseUrl": "https://rekor.test", "hashAlgorithm": "SHA2_256",
            "publicKey": {"rawBytes": B64.encode(rekor_der), "keyDetails": "PKIX_ECDSA_P256_SHA_256",
            "validFor": {"start": "2020-01-01T00:00:00Z"}}}],
        "certificateAuthorities": [{"subject": {"organization": "pullgate-test", "commonName": "test"},
            "uri": "https://fulcio.test", "certChain": {"certificates": certs},
            "validFor": {"start": "2020-01-01T00:00:00Z"}}],
        "ctlogs": [{"baseUrl": "https://ctfe.test", "hashAlgorithm": "SHA2_256",
            "publicKey": {"rawBytes": B64.encode(fulcio.ct_log.public_der())}}]
    }))
    .unwrap()
}

/// Serves `dir` over loopback HTTP/1.1 (one request per connection) and counts requests per
/// path. Dropping it stops the server.
pub struct TufServer {
    pub addr: std::net::SocketAddr,
    pub hits: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TufServer {
    pub async fn start(dir: &Path) -> TufServer {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (dir, log) = (dir.to_path_buf(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (dir, log) = (dir.clone(), log.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut n = 0;
                    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => return,
                            Ok(m) => n += m,
                        }
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    log.lock().unwrap().push(path.clone());
                    let file = dir.join(path.trim_start_matches('/'));
                    let resp = match std::fs::read(&file) {
                        Ok(body) if !path.contains("..") => {
                            let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes();
                            r.extend(body);
                            r
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
                    };
                    let _ = sock.write_all(&resp).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        TufServer { addr, hits, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests for `path` so far.
    pub fn count(&self, path: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.as_str() == path)
            .count()
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TufServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

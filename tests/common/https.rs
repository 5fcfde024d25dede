//! A real HTTPS server on 127.0.0.1 (tokio + rustls + hyper) serving files from memory, with a
//! test CA made by rcgen, counting the requests it answers. For `remote` policy sources.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use sha2::Digest as _;

/// Served files by path: status and body.
type Files = Arc<Mutex<HashMap<String, (u16, Vec<u8>)>>>;

/// An HTTPS server whose certificate chains to [`HttpsServer::ca_pem`].
pub struct HttpsServer {
    port: u16,
    ca_pem: String,
    files: Files,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsServer {
    pub async fn start() -> HttpsServer {
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "pullgate test policy CA");
        ca.distinguished_name = dn;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf_cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();

        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let files: Files = Arc::default();
        let requests = Arc::new(AtomicU64::new(0));
        let (f, r) = (files.clone(), requests.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, files, requests) = (acceptor.clone(), f.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        requests.fetch_add(1, Ordering::SeqCst);
                        let found = files.lock().unwrap().get(req.uri().path()).cloned();
                        let (status, body) = found.unwrap_or((404, b"not found".to_vec()));
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsServer {
            port,
            ca_pem: ca_cert.pem(),
            files,
            requests,
            task,
        }
    }

    /// Serves `body` at `path` with status 200.
    pub fn serve(&self, path: &str, body: impl Into<Vec<u8>>) {
        self.serve_status(path, 200, body);
    }

    pub fn serve_status(&self, path: &str, status: u16, body: impl Into<Vec<u8>>) {
        self.files
            .lock()
            .unwrap()
            .insert(path.to_string(), (status, body.into()));
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests answered so far (any path).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Writes the CA certificate to `dir/policy-ca.pem` (for `SSL_CERT_FILE`).
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("policy-ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path
    }

    /// Stops accepting connections (existing ones end with their requests).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lower-case hex SHA-256 of `bytes` (what `remote.sha256sum` holds).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

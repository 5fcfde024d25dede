//! Registry access for verification: resolve a tag to a digest and fetch cosign signature
//! manifests and blobs, with hard size limits, timeouts and the fewest requests possible.
//!
//! One long-lived [`RegistryClient`] serves every verification. Authentication is lazy: a
//! request goes out anonymously (or with a cached token) and only a `401` triggers the
//! challenge/token dance, so an open registry costs one request per step: resolve the tag,
//! fetch the signature manifest, fetch each signature blob.

pub mod auth;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use sha2::Digest as _;

use crate::image_ref::ImageRef;
use crate::verify::bundle::is_bundle_media_type;
use crate::verify::cosign::{
    LayerFormat, SignatureLayer, BUNDLE_ANNOTATION, CERTIFICATE_ANNOTATION, CHAIN_ANNOTATION,
    RFC3161_TIMESTAMP_ANNOTATION, SIGNATURE_ANNOTATION, SIMPLE_SIGNING_MEDIA_TYPE,
};
use auth::{parse_challenge, Challenge};
pub use auth::{Credential, Credentials};

/// Manifest media types pullgate resolves and reads.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Size and count limits on what a registry may send.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub manifest_bytes: u64,
    pub signature_blob_bytes: u64,
    pub signature_layers: usize,
    pub token_bytes: u64,
    /// An image config blob (`fetchConfigFile`).
    pub config_blob_bytes: u64,
    /// Manifests of one image index whose configs are fetched.
    pub index_manifests: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_bytes: 4 << 20,
            signature_blob_bytes: 1 << 20,
            signature_layers: 256,
            token_bytes: 1 << 20,
            config_blob_bytes: 4 << 20,
            index_manifests: 64,
        }
    }
}

/// Settings of a [`RegistryClient`].
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP. Loopback registries always are.
    pub insecure: Vec<String>,
    pub credentials: Credentials,
    /// Bound on one HTTP request, connect to last byte.
    pub timeout: Duration,
    pub limits: Limits,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: Vec::new(),
            credentials: Credentials::default(),
            timeout: Duration::from_secs(15),
            limits: Limits::default(),
        }
    }
}

/// Why the registry could not answer. Any of these means "could not decide", never "allow".
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {host}: {message}")]
    Unreachable { host: String, message: String },
    #[error("registry {host} timed out")]
    Timeout { host: String },
    #[error("{reference}: not found in the registry")]
    NotFound { reference: String },
    #[error("registry {host} denied access to {repository}: {message}")]
    Denied {
        host: String,
        repository: String,
        message: String,
    },
    #[error("{url}: unexpected HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{what} from {host} is larger than the {limit}-byte limit")]
    TooLarge {
        what: &'static str,
        host: String,
        limit: u64,
    },
    #[error("registry {host} sent an invalid {what}: {message}")]
    Invalid {
        host: String,
        what: &'static str,
        message: String,
    },
    #[error("cannot build HTTP client: {0}")]
    Client(String),
}

type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
    /// OCI 1.1: the manifest this one refers to (a referrer's image).
    #[serde(default)]
    subject: Option<Descriptor>,
}

/// An image index as the referrers API or the referrers tag serves it.
#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<IndexEntry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    artifact_type: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

/// An image manifest or an index, as far as config fetching reads it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageOrIndex {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// A long-lived registry client shared by all verifications (cheap to share by reference).
pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// Bearer tokens by `host/repository`.
    tokens: Mutex<HashMap<String, String>>,
    /// Hosts that answered with a Basic challenge.
    basic_hosts: Mutex<HashSet<String>>,
    requests: AtomicU64,
}

/// One endpoint of a repository on a registry.
struct Target<'a> {
    host: &'a str,
    api_host: &'a str,
    repository: &'a str,
    plain_http: bool,
    /// The request's own credential (e.g. the one kubelet resolved for a pull), else the
    /// configured one for the host.
    credential: Option<&'a Credential>,
}

impl Target<'_> {
    fn url(&self, path: &str) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}/{path}", self.api_host, self.repository)
    }

    /// Tokens are cached per repository and per credential: a token obtained with one pod's
    /// pull secret is never presented for another's.
    fn cache_key(&self) -> String {
        let who = match self.credential {
            None => String::new(),
            Some(Credential::Basic { username, password }) => {
                hex::encode(sha2::Sha256::digest(format!("{username}\0{password}")))
            }
            Some(Credential::Bearer(token)) => hex::encode(sha2::Sha256::digest(token)),
        };
        format!("{}/{}#{who}", self.host, self.repository)
    }
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<RegistryClient> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        Ok(RegistryClient {
            http,
            config,
            tokens: Mutex::new(HashMap::new()),
            basic_hosts: Mutex::new(HashSet::new()),
            requests: AtomicU64::new(0),
        })
    }

    /// HTTP requests sent so far (token requests included).
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn target<'a>(&'a self, image: &'a ImageRef, auth: Option<&'a Credential>) -> Target<'a> {
        let host = image.registry();
        Target {
            host,
            api_host: image.api_host(),
            repository: image.repository(),
            plain_http: image.is_loopback() || self.config.insecure.iter().any(|h| h == host),
            credential: auth.or_else(|| self.config.credentials.for_host(host)),
        }
    }

    /// The manifest digest `image` names: its digest when it carries one (no request), else
    /// the digest the registry reports for its tag. `auth` overrides the configured
    /// credentials for this call.
    pub async fn resolve(&self, image: &ImageRef, auth: Option<&Credential>) -> Result<String> {
        if let Some(digest) = image.digest() {
            return Ok(digest.to_string());
        }
        let target = self.target(image, auth);
        let tag = image.tag().unwrap_or("latest");
        let url = target.url(&format!("manifests/{tag}"));
        let resp = self
            .send(&target, Method::HEAD, &url, MANIFEST_ACCEPT)
            .await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(RegistryError::NotFound {
                    reference: image.to_string(),
                })
            }
            s => return Err(status_error(&url, s)),
        }
        if let Some(digest) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| is_digest(d))
        {
            return Ok(digest.to_string());
        }
        // Registries that omit the header: hash the manifest bytes ourselves.
        let resp = self
            .send(&target, Method::GET, &url, MANIFEST_ACCEPT)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&url, resp.status()));
        }
        let body = self
            .read_limited(
                resp,
                self.config.limits.manifest_bytes,
                "manifest",
                target.host,
            )
            .await?;
        Ok(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&body))
        ))
    }

    /// Every cosign signature stored for `digest` in `repo` (`sha256-<hex>.sig`). An absent
    /// signature tag is an empty list: "no signatures found" is a verdict, not an error.
    pub async fn fetch_signatures(
        &self,
        repo: &ImageRef,
        digest: &str,
        auth: Option<&Credential>,
    ) -> Result<Vec<SignatureLayer>> {
        let tag = signature_tag(digest).ok_or_else(|| RegistryError::Invalid {
            host: repo.registry().to_string(),
            what: "digest",
            message: format!("{digest:?} is not algorithm:hex"),
        })?;
        self.fetch_attached(repo, &tag, SIMPLE_SIGNING_MEDIA_TYPE, auth)
            .await
    }

    /// The layers of media type `media_type` in the manifest at `repo:tag` (cosign's
    /// signature or attestation tags), each blob read within limits and checked against its
    /// digest. An absent tag is an empty list.
    pub async fn fetch_attached(
        &self,
        repo: &ImageRef,
        tag: &str,
        media_type: &str,
        auth: Option<&Credential>,
    ) -> Result<Vec<SignatureLayer>> {
        let target = self.target(repo, auth);
        let valid_tag = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && !tag.starts_with(['.', '-']);
        if !valid_tag {
            return Err(RegistryError::Invalid {
                host: target.host.to_string(),
                what: "tag",
                message: format!("{tag:?} is not a valid tag (check source.tagPrefix)"),
            });
        }
        let url = target.url(&format!("manifests/{tag}"));
        let Some(body) = self
            .get_manifest(&target, &url, "signature manifest")
            .await?
        else {
            return Ok(Vec::new());
        };
        let manifest: Manifest =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Invalid {
                host: target.host.to_string(),
                what: "signature manifest",
                message: e.to_string(),
            })?;
        let layers: Vec<Descriptor> = manifest
            .layers
            .into_iter()
            .filter(|l| l.media_type == media_type)
            .collect();
        if layers.len() > self.config.limits.signature_layers {
            return Err(RegistryError::TooLarge {
                what: "signature layer count",
                host: target.host.to_string(),
                limit: self.config.limits.signature_layers as u64,
            });
        }
        let fetches = layers
            .into_iter()
            .map(|d| self.fetch_signature_layer(&target, d));
        futures_util::future::try_join_all(fetches).await
    }

    /// The Sigstore bundles attached to `digest` in `repo` as OCI 1.1 referrers, as cosign v3
    /// writes signatures and attestations: listed by the registry's referrers API, or where the
    /// registry has none (it answers 404) by the `sha256-<hex>` referrers tag. Each referrer
    /// manifest must name `digest` as its subject; one that is listed but gone is skipped, as
    /// a stale referrers tag may list it. Nothing attached is an empty list.
    pub async fn fetch_referrers(
        &self,
        repo: &ImageRef,
        digest: &str,
        auth: Option<&Credential>,
    ) -> Result<Vec<SignatureLayer>> {
        let target = self.target(repo, auth);
        if !is_digest(digest) {
            return Err(RegistryError::Invalid {
                host: target.host.to_string(),
                what: "digest",
                message: format!("{digest:?} is not sha256:<hex>"),
            });
        }
        let api = target.url(&format!("referrers/{digest}"));
        let index = match self.get_manifest(&target, &api, "referrers index").await? {
            Some(body) => body,
            None => {
                let tag = digest.replacen(':', "-", 1);
                let url = target.url(&format!("manifests/{tag}"));
                match self
                    .get_manifest(&target, &url, "referrers tag index")
                    .await?
                {
                    Some(body) => body,
                    None => return Ok(Vec::new()),
                }
            }
        };
        let index: Index = serde_json::from_slice(&index).map_err(|e| RegistryError::Invalid {
            host: target.host.to_string(),
            what: "referrers index",
            message: e.to_string(),
        })?;
        let bundles: Vec<IndexEntry> = index
            .manifests
            .into_iter()
            .filter(|m| is_bundle_media_type(&m.artifact_type))
            .collect();
        if bundles.len() > self.config.limits.signature_layers {
            return Err(RegistryError::TooLarge {
                what: "referrer count",
                host: target.host.to_string(),
                limit: self.config.limits.signature_layers as u64,
            });
        }
        let fetches = bundles
            .into_iter()
            .map(|m| self.fetch_referrer(&target, m.digest, digest));
        let found = futures_util::future::try_join_all(fetches).await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// One referrer manifest and its bundle layer; `None` when it is gone or refers to
    /// another image.
    async fn fetch_referrer(
        &self,
        target: &Target<'_>,
        manifest_digest: String,
        subject: &str,
    ) -> Result<Option<SignatureLayer>> {
        let invalid = |message: String| RegistryError::Invalid {
            host: target.host.to_string(),
            what: "referrer manifest",
            message,
        };
        if !is_digest(&manifest_digest) {
            return Err(invalid(format!("unsupported digest {manifest_digest:?}")));
        }
        let url = target.url(&format!("manifests/{manifest_digest}"));
        let Some(body) = self.get_manifest(target, &url, "referrer manifest").await? else {
            return Ok(None);
        };
        if format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))) != manifest_digest {
            return Err(invalid(format!(
                "content of {manifest_digest} does not match its digest"
            )));
        }
        let manifest: Manifest =
            serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
        if manifest.subject.as_ref().map(|s| s.digest.as_str()) != Some(subject) {
            return Ok(None);
        }
        let Some(layer) = manifest
            .layers
            .into_iter()
            .find(|l| is_bundle_media_type(&l.media_type))
        else {
            return Ok(None);
        };
        let mut layer = self.fetch_signature_layer(target, layer).await?;
        layer.format = LayerFormat::SigstoreBundle;
        Ok(Some(layer))
    }

    /// GETs a manifest or index within the manifest limit; `None` on 404.
    async fn get_manifest(
        &self,
        target: &Target<'_>,
        url: &str,
        what: &'static str,
    ) -> Result<Option<Vec<u8>>> {
        let resp = self.send(target, Method::GET, url, MANIFEST_ACCEPT).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(status_error(url, s)),
        }
        let limit = self.config.limits.manifest_bytes;
        self.read_limited(resp, limit, what, target.host)
            .await
            .map(Some)
    }

    /// The OCI config file of `image` (which must name its digest) per platform, keyed as
    /// policy-controller keys them: `os/arch[/variant][:osversion]` read from each config. An
    /// image gives one entry; an index one per manifest it lists (an index inside an index is
    /// refused). Every manifest is checked against the digest it was fetched by and every
    /// config blob against its descriptor, within the size limits.
    pub async fn fetch_configs(
        &self,
        image: &ImageRef,
        auth: Option<&Credential>,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let target = self.target(image, auth);
        let invalid = |what: &'static str, message: String| RegistryError::Invalid {
            host: target.host.to_string(),
            what,
            message,
        };
        let Some(digest) = image.digest() else {
            return Err(invalid(
                "reference",
                format!("{image} is not pinned to a digest"),
            ));
        };
        let top = self.fetch_manifest(&target, digest).await?;
        let images = match top.manifests {
            None => vec![(digest.to_string(), top)],
            Some(list) => {
                if list.len() > self.config.limits.index_manifests {
                    return Err(RegistryError::TooLarge {
                        what: "image index manifest count",
                        host: target.host.to_string(),
                        limit: self.config.limits.index_manifests as u64,
                    });
                }
                let fetches = list.iter().map(|d| async {
                    let m = self.fetch_manifest(&target, &d.digest).await?;
                    if m.manifests.is_some() {
                        return Err(invalid(
                            "image index",
                            format!("{} lists another index, {}", digest, d.digest),
                        ));
                    }
                    Ok((d.digest.clone(), m))
                });
                futures_util::future::try_join_all(fetches).await?
            }
        };
        let target = &target;
        let fetches = images.into_iter().map(|(manifest_digest, m)| async move {
            let config = m.config.ok_or_else(|| {
                invalid(
                    "image manifest",
                    format!(
                        "{manifest_digest} has no config (media type {:?})",
                        m.media_type
                    ),
                )
            })?;
            self.fetch_config_blob(target, &config).await
        });
        let mut configs = serde_json::Map::new();
        for config in futures_util::future::try_join_all(fetches).await? {
            configs.insert(platform_key(&config), config);
        }
        Ok(configs)
    }

    /// The manifest `digest` of the target's repository, checked against its digest.
    async fn fetch_manifest(&self, target: &Target<'_>, digest: &str) -> Result<ImageOrIndex> {
        let invalid = |message: String| RegistryError::Invalid {
            host: target.host.to_string(),
            what: "manifest",
            message,
        };
        if !is_digest(digest) {
            return Err(invalid(format!("unsupported manifest digest {digest:?}")));
        }
        let url = target.url(&format!("manifests/{digest}"));
        let Some(body) = self.get_manifest(target, &url, "manifest").await? else {
            return Err(RegistryError::NotFound {
                reference: format!("{}/{}@{digest}", target.host, target.repository),
            });
        };
        if format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))) != digest {
            return Err(invalid(format!(
                "content of {digest} does not match its digest"
            )));
        }
        let manifest: ImageOrIndex =
            serde_json::from_slice(&body).map_err(|e| invalid(format!("{digest}: {e}")))?;
        if manifest.schema_version != 2 {
            return Err(invalid(format!(
                "{digest}: schemaVersion {} is not supported",
                manifest.schema_version
            )));
        }
        Ok(manifest)
    }

    /// An image config blob, checked against its descriptor, as JSON.
    async fn fetch_config_blob(
        &self,
        target: &Target<'_>,
        desc: &Descriptor,
    ) -> Result<serde_json::Value> {
        let limit = self.config.limits.config_blob_bytes;
        let invalid = |message: String| RegistryError::Invalid {
            host: target.host.to_string(),
            what: "image config",
            message,
        };
        if desc.size > limit {
            return Err(RegistryError::TooLarge {
                what: "image config",
                host: target.host.to_string(),
                limit,
            });
        }
        if !is_digest(&desc.digest) {
            return Err(invalid(format!(
                "unsupported config digest {:?}",
                desc.digest
            )));
        }
        let url = target.url(&format!("blobs/{}", desc.digest));
        let resp = self.send(target, Method::GET, &url, "*/*").await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return Err(RegistryError::NotFound {
                    reference: format!(
                        "image config {}/{}@{}",
                        target.host, target.repository, desc.digest
                    ),
                })
            }
            s => return Err(status_error(&url, s)),
        }
        let body = self
            .read_limited(resp, limit, "image config", target.host)
            .await?;
        if format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))) != desc.digest {
            return Err(invalid(format!(
                "content of {} does not match its digest",
                desc.digest
            )));
        }
        match serde_json::from_slice(&body) {
            Ok(v @ serde_json::Value::Object(_)) => Ok(v),
            Ok(_) => Err(invalid(format!("{} is not a JSON object", desc.digest))),
            Err(e) => Err(invalid(format!("{}: {e}", desc.digest))),
        }
    }

    async fn fetch_signature_layer(
        &self,
        target: &Target<'_>,
        mut desc: Descriptor,
    ) -> Result<SignatureLayer> {
        let limit = self.config.limits.signature_blob_bytes;
        let invalid = |message: String| RegistryError::Invalid {
            host: target.host.to_string(),
            what: "signature blob",
            message,
        };
        if desc.size > limit {
            return Err(RegistryError::TooLarge {
                what: "signature blob",
                host: target.host.to_string(),
                limit,
            });
        }
        let Some(expected) = desc
            .digest
            .strip_prefix("sha256:")
            .filter(|_| is_digest(&desc.digest))
        else {
            return Err(invalid(format!(
                "unsupported layer digest {:?}",
                desc.digest
            )));
        };
        let url = target.url(&format!("blobs/{}", desc.digest));
        let resp = self.send(target, Method::GET, &url, "*/*").await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&url, resp.status()));
        }
        let payload = self
            .read_limited(resp, limit, "signature blob", target.host)
            .await?;
        if hex::encode(sha2::Sha256::digest(&payload)) != expected {
            return Err(invalid(format!(
                "content of {} does not match its digest",
                desc.digest
            )));
        }
        Ok(SignatureLayer {
            layer_digest: desc.digest,
            format: LayerFormat::Legacy,
            payload,
            signature: desc.annotations.remove(SIGNATURE_ANNOTATION),
            bundle: desc.annotations.remove(BUNDLE_ANNOTATION),
            certificate: desc.annotations.remove(CERTIFICATE_ANNOTATION),
            chain: desc.annotations.remove(CHAIN_ANNOTATION),
            rfc3161_timestamp: desc.annotations.remove(RFC3161_TIMESTAMP_ANNOTATION),
        })
    }

    /// Sends a request, answering one authentication challenge if the registry asks.
    async fn send(
        &self,
        target: &Target<'_>,
        method: Method,
        url: &str,
        accept: &'static str,
    ) -> Result<reqwest::Response> {
        let resp = self
            .send_once(
                target,
                method.clone(),
                url,
                accept,
                self.authorization(target),
            )
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|h| h.to_str().ok())
            .and_then(parse_challenge);
        let authorization = match challenge {
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope =
                    scope.unwrap_or_else(|| format!("repository:{}:pull", target.repository));
                let token = self
                    .fetch_token(target, &realm, service.as_deref(), &scope)
                    .await?;
                lock(&self.tokens).insert(target.cache_key(), token.clone());
                format!("Bearer {token}")
            }
            Some(Challenge::Basic) => {
                let Some(Credential::Basic { username, password }) = target.credential else {
                    return Err(
                        self.denied(target, "the registry requires a username and password")
                    );
                };
                lock(&self.basic_hosts).insert(target.host.to_string());
                basic_header(username, password)
            }
            None => {
                return Err(self.denied(target, "401 without a usable WWW-Authenticate challenge"))
            }
        };
        let resp = self
            .send_once(target, method, url, accept, Some(authorization))
            .await?;
        if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
            return Err(self.denied(target, "credentials were rejected"));
        }
        Ok(resp)
    }

    fn authorization(&self, target: &Target<'_>) -> Option<String> {
        if let Some(token) = lock(&self.tokens).get(&target.cache_key()) {
            return Some(format!("Bearer {token}"));
        }
        if lock(&self.basic_hosts).contains(target.host) {
            if let Some(Credential::Basic { username, password }) = target.credential {
                return Some(basic_header(username, password));
            }
        }
        None
    }

    async fn send_once(
        &self,
        target: &Target<'_>,
        method: Method,
        url: &str,
        accept: &'static str,
        authorization: Option<String>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, url)
            .header(ACCEPT, HeaderValue::from_static(accept));
        if let Some(value) = authorization {
            req = req.header(AUTHORIZATION, value);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        req.send()
            .await
            .map_err(|e| transport_error(target.host, &e))
    }

    async fn fetch_token(
        &self,
        target: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String> {
        let mut params = vec![("scope", scope)];
        if let Some(service) = service {
            params.push(("service", service));
        }
        let url = reqwest::Url::parse_with_params(realm, &params).map_err(|e| {
            RegistryError::Invalid {
                host: target.host.to_string(),
                what: "token realm",
                message: format!("{realm:?}: {e}"),
            }
        })?;
        let mut req = self.http.get(url);
        match target.credential {
            Some(Credential::Basic { username, password }) => {
                req = req.basic_auth(username, Some(password));
            }
            Some(Credential::Bearer(token)) => return Ok(token.clone()),
            None => {}
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let resp = req
            .send()
            .await
            .map_err(|e| transport_error(target.host, &e))?;
        if !resp.status().is_success() {
            return Err(self.denied(
                target,
                &format!("token endpoint answered HTTP {}", resp.status().as_u16()),
            ));
        }
        let body = self
            .read_limited(
                resp,
                self.config.limits.token_bytes,
                "token response",
                target.host,
            )
            .await?;
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Invalid {
                host: target.host.to_string(),
                what: "token response",
                message: e.to_string(),
            })?;
        token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Invalid {
                host: target.host.to_string(),
                what: "token response",
                message: "no token in the answer".into(),
            })
    }

    fn denied(&self, target: &Target<'_>, message: &str) -> RegistryError {
        RegistryError::Denied {
            host: target.host.to_string(),
            repository: target.repository.to_string(),
            message: message.to_string(),
        }
    }

    /// Reads a whole body, refusing to hold more than `limit` bytes.
    async fn read_limited(
        &self,
        mut resp: reqwest::Response,
        limit: u64,
        what: &'static str,
        host: &str,
    ) -> Result<Vec<u8>> {
        let too_large = || RegistryError::TooLarge {
            what,
            host: host.to_string(),
            limit,
        };
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit) as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(host, &e))? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// cosign's signature tag for a digest: `sha256:abc…` → `sha256-abc….sig`.
pub fn signature_tag(digest: &str) -> Option<String> {
    attached_tag("", digest, "sig")
}

/// cosign's tag for what is attached to `digest`: `PREFIX` + `sha256-<hex>.` + `suffix`
/// (`sig` or `att`).
pub fn attached_tag(prefix: &str, digest: &str, suffix: &str) -> Option<String> {
    let (alg, hex) = digest.split_once(':')?;
    (!alg.is_empty() && !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("{prefix}{alg}-{hex}.{suffix}"))
}

/// policy-controller's key for a config file: `os/arch[/variant][:osversion]` (go-containerregistry's
/// platform string; empty when the config names no OS).
fn platform_key(config: &serde_json::Value) -> String {
    let field = |k: &str| config.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let os = field("os");
    if os.is_empty() {
        return String::new();
    }
    let mut key = os.to_string();
    for part in [field("architecture"), field("variant")] {
        if !part.is_empty() {
            key.push('/');
            key.push_str(part);
        }
    }
    let os_version = field("os.version");
    if !os_version.is_empty() {
        key.push(':');
        key.push_str(os_version);
    }
    key
}

fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn basic_header(username: &str, password: &str) -> String {
    use base64::Engine as _;
    let raw = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

fn status_error(url: &str, status: StatusCode) -> RegistryError {
    RegistryError::Status {
        url: url.to_string(),
        status: status.as_u16(),
    }
}

fn transport_error(host: &str, e: &reqwest::Error) -> RegistryError {
    if e.is_timeout() {
        return RegistryError::Timeout {
            host: host.to_string(),
        };
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    RegistryError::Unreachable {
        host: host.to_string(),
        message,
    }
}

/// The maps guarded here hold plain data; a panic elsewhere cannot leave them half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_tags() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            signature_tag(&d),
            Some(format!("sha256-{}.sig", "a".repeat(64)))
        );
        assert_eq!(signature_tag("nope"), None);
        assert_eq!(signature_tag("sha256:zz"), None);
    }

    #[test]
    fn platform_keys_as_policy_controller_writes_them() {
        let key = |v: serde_json::Value| platform_key(&v);
        assert_eq!(
            key(serde_json::json!({"os": "linux", "architecture": "amd64"})),
            "linux/amd64"
        );
        assert_eq!(
            key(serde_json::json!({"os": "linux", "architecture": "arm", "variant": "v7"})),
            "linux/arm/v7"
        );
        assert_eq!(
            key(
                serde_json::json!({"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"})
            ),
            "windows/amd64:10.0.17763.1"
        );
        assert_eq!(key(serde_json::json!({"architecture": "amd64"})), "");
    }
}

//! Registry access for verification: resolve a tag to a digest and fetch cosign signature
//! manifests and blobs, with hard size limits, timeouts, a per-decision [`Budget`] of bytes and
//! requests in flight, and the fewest requests possible. Signatures are listed first and
//! fetched one by one ([`RegistryClient::fetch_pending`]) so the caller can check each as it
//! arrives and stop early. Credentials go only to the host they were given for.
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
    RFC3161_TIMESTAMP_ANNOTATION, SIGNATURE_ANNOTATION,
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
    /// A token endpoint's whole answer.
    pub token_response_bytes: u64,
    /// One bearer token; a longer one is refused, never cached.
    pub token_bytes: usize,
    /// Bearer tokens kept (by host, repository and credential); the oldest go first.
    pub token_cache_entries: usize,
    /// An image config blob (`fetchConfigFile`).
    pub config_blob_bytes: u64,
    /// Manifests of one image index whose configs are fetched.
    pub index_manifests: usize,
    /// Bytes one decision may read from registries in all (manifests, signature blobs, token
    /// answers, configs): a [`Budget`].
    pub decision_bytes: u64,
    /// Registry requests one decision keeps in flight at once.
    pub decision_fetches: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_bytes: 4 << 20,
            signature_blob_bytes: 1 << 20,
            signature_layers: 256,
            token_response_bytes: 64 << 10,
            token_bytes: 16 << 10,
            token_cache_entries: 1024,
            config_blob_bytes: 4 << 20,
            index_manifests: 64,
            decision_bytes: 16 << 20,
            decision_fetches: 4,
        }
    }
}

/// What one decision may take from registries: bytes read in all and requests in flight at
/// once. Every body byte read on its behalf is counted, kept or not, so a registry that serves
/// too much costs at most the budget before the decision fails closed.
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    fetches: tokio::sync::Semaphore,
}

impl Budget {
    pub fn new(bytes: u64, concurrent_fetches: usize) -> Budget {
        Budget {
            limit: bytes,
            used: AtomicU64::new(0),
            fetches: tokio::sync::Semaphore::new(concurrent_fetches.max(1)),
        }
    }

    /// Bytes counted so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Counts `n` more bytes; an error once the total would pass the limit (the bytes stay
    /// counted, so every later read fails too).
    fn charge(&self, n: u64, host: &str) -> Result<()> {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before.saturating_add(n) > self.limit {
            return Err(self.exceeded(host));
        }
        Ok(())
    }

    fn exceeded(&self, host: &str) -> RegistryError {
        RegistryError::OverBudget {
            host: host.to_string(),
            limit: self.limit,
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
    #[error(
        "registry {host} served more than this decision may read from registries ({limit} bytes \
         in all), so it was not decided"
    )]
    OverBudget { host: String, limit: u64 },
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
    /// Bearer tokens by `host/repository#credential identity`, at most
    /// `limits.token_cache_entries`, each at most `limits.token_bytes`.
    tokens: Mutex<TokenCache>,
    /// Hosts that answered with a Basic challenge (bounded like the tokens).
    basic_hosts: Mutex<HashSet<String>>,
    requests: AtomicU64,
}

/// Bearer tokens in insertion order; the oldest is dropped when full.
#[derive(Default)]
struct TokenCache {
    by_key: HashMap<String, String>,
    order: std::collections::VecDeque<String>,
}

impl TokenCache {
    fn get(&self, key: &str) -> Option<&String> {
        self.by_key.get(key)
    }

    fn insert(&mut self, key: String, token: String, capacity: usize) {
        if self.by_key.insert(key.clone(), token).is_none() {
            self.order.push_back(key);
        }
        while self.by_key.len() > capacity.max(1) {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.by_key.remove(&oldest);
        }
    }

    fn len(&self) -> usize {
        self.by_key.len()
    }
}

/// A signature listed in a signature manifest or referrers index, not fetched yet (see
/// [`RegistryClient::fetch_pending`]).
pub struct PendingLayer(Pending);

enum Pending {
    /// A layer of a cosign signature or attestation manifest.
    Blob(Descriptor),
    /// A referrer manifest whose bundle layer is the signature.
    Referrer { manifest: String, subject: String },
}

/// One endpoint of a repository on a registry.
struct Target<'a> {
    host: &'a str,
    api_host: &'a str,
    repository: &'a str,
    plain_http: bool,
    /// The request's own credential for this host (e.g. the one kubelet resolved for a pull),
    /// else the one configured for the host.
    credential: Option<&'a Credential>,
    /// The decision's budget, when the caller has one.
    budget: Option<&'a Budget>,
}

impl<'a> Target<'a> {
    fn url(&self, path: &str) -> String {
        let scheme = if self.plain_http { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}/{path}", self.api_host, self.repository)
    }

    /// Tokens are cached per repository and per credential: a token obtained with one pod's
    /// pull secret is never presented for another's.
    fn cache_key(&self) -> String {
        let who = self
            .credential
            .map(Credential::identity)
            .unwrap_or_default();
        format!("{}/{}#{who}", self.host, self.repository)
    }

    /// A place among the decision's requests in flight, held while a body is read.
    async fn permit(&self) -> Option<tokio::sync::SemaphorePermit<'a>> {
        match self.budget {
            Some(budget) => budget.fetches.acquire().await.ok(),
            None => None,
        }
    }
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<RegistryClient> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::custom(
                |attempt| match redirect_refusal(attempt.previous(), attempt.url()) {
                    Some(reason) => attempt.error(reason),
                    None => attempt.follow(),
                },
            ))
            .build()
            .map_err(|e| RegistryError::Client(e.to_string()))?;
        Ok(RegistryClient {
            http,
            config,
            tokens: Mutex::new(TokenCache::default()),
            basic_hosts: Mutex::new(HashSet::new()),
            requests: AtomicU64::new(0),
        })
    }

    /// HTTP requests sent so far (token requests included).
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bearer tokens cached now.
    pub fn cached_tokens(&self) -> usize {
        lock(&self.tokens).len()
    }

    /// A fresh budget for one decision, from the configured limits.
    pub fn budget(&self) -> Budget {
        Budget::new(
            self.config.limits.decision_bytes,
            self.config.limits.decision_fetches,
        )
    }

    /// `auth` must be a credential given for `image`'s own host: it is never checked here.
    fn target<'a>(
        &'a self,
        image: &'a ImageRef,
        auth: Option<&'a Credential>,
        budget: Option<&'a Budget>,
    ) -> Target<'a> {
        let host = image.registry();
        Target {
            host,
            api_host: image.api_host(),
            repository: image.repository(),
            plain_http: image.is_loopback() || self.is_insecure(host),
            credential: auth.or_else(|| self.config.credentials.for_host(host)),
            budget,
        }
    }

    fn is_insecure(&self, host: &str) -> bool {
        self.config
            .insecure
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    }

    /// The manifest digest `image` names: its digest when it carries one (no request), else
    /// the digest the registry reports for its tag. `auth`, a credential for `image`'s host,
    /// overrides the configured one for this call.
    pub async fn resolve(&self, image: &ImageRef, auth: Option<&Credential>) -> Result<String> {
        if let Some(digest) = image.digest() {
            return Ok(digest.to_string());
        }
        let target = self.target(image, auth, None);
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
            .read_limited(resp, self.config.limits.manifest_bytes, "manifest", &target)
            .await?;
        Ok(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&body))
        ))
    }

    /// The layers of media type `media_type` listed in the manifest at `repo:tag` (cosign's
    /// signature or attestation tags), in manifest order, not fetched yet. An absent tag lists
    /// nothing. `auth` is a credential for `repo`'s own host.
    pub async fn list_attached(
        &self,
        repo: &ImageRef,
        tag: &str,
        media_type: &str,
        auth: Option<&Credential>,
        budget: &Budget,
    ) -> Result<Vec<PendingLayer>> {
        let target = self.target(repo, auth, Some(budget));
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
        let layers: Vec<PendingLayer> = manifest
            .layers
            .into_iter()
            .filter(|l| l.media_type == media_type)
            .map(|l| PendingLayer(Pending::Blob(l)))
            .collect();
        if layers.len() > self.config.limits.signature_layers {
            return Err(RegistryError::TooLarge {
                what: "signature layer count",
                host: target.host.to_string(),
                limit: self.config.limits.signature_layers as u64,
            });
        }
        Ok(layers)
    }

    /// The Sigstore bundles attached to `digest` in `repo` as OCI 1.1 referrers, as cosign v3
    /// writes signatures and attestations, not fetched yet: listed by the registry's referrers
    /// API, or where the registry has none (it answers 404) by the `sha256-<hex>` referrers
    /// tag. Nothing attached is an empty list.
    pub async fn list_referrers(
        &self,
        repo: &ImageRef,
        digest: &str,
        auth: Option<&Credential>,
        budget: &Budget,
    ) -> Result<Vec<PendingLayer>> {
        let target = self.target(repo, auth, Some(budget));
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
        let bundles: Vec<PendingLayer> = index
            .manifests
            .into_iter()
            .filter(|m| is_bundle_media_type(&m.artifact_type))
            .map(|m| {
                PendingLayer(Pending::Referrer {
                    manifest: m.digest,
                    subject: digest.to_string(),
                })
            })
            .collect();
        if bundles.len() > self.config.limits.signature_layers {
            return Err(RegistryError::TooLarge {
                what: "referrer count",
                host: target.host.to_string(),
                limit: self.config.limits.signature_layers as u64,
            });
        }
        Ok(bundles)
    }

    /// Fetches one listed signature from `repo` (the repository it was listed in), its blob
    /// read within limits and checked against its digest. `None` for a referrer that is gone
    /// or refers to another image (a stale referrers tag may list it).
    pub async fn fetch_pending(
        &self,
        repo: &ImageRef,
        layer: PendingLayer,
        auth: Option<&Credential>,
        budget: &Budget,
    ) -> Result<Option<SignatureLayer>> {
        let target = self.target(repo, auth, Some(budget));
        match layer.0 {
            Pending::Blob(desc) => self.fetch_signature_layer(&target, desc).await.map(Some),
            Pending::Referrer { manifest, subject } => {
                self.fetch_referrer(&target, manifest, &subject).await
            }
        }
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
        let _permit = target.permit().await;
        let resp = self.send(target, Method::GET, url, MANIFEST_ACCEPT).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => return Err(status_error(url, s)),
        }
        let limit = self.config.limits.manifest_bytes;
        self.read_limited(resp, limit, what, target).await.map(Some)
    }

    /// The OCI config file of `image` (which must name its digest) per platform, keyed as
    /// policy-controller keys them: `os/arch[/variant][:osversion]` read from each config. An
    /// image gives one entry; an index one per manifest it lists (an index inside an index is
    /// refused). Every manifest is checked against the digest it was fetched by and every
    /// config blob against its descriptor, within the size limits and `budget`.
    pub async fn fetch_configs(
        &self,
        image: &ImageRef,
        auth: Option<&Credential>,
        budget: &Budget,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let target = self.target(image, auth, Some(budget));
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
        let _permit = target.permit().await;
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
            .read_limited(resp, limit, "image config", target)
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
        let _permit = target.permit().await;
        let resp = self.send(target, Method::GET, &url, "*/*").await?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(&url, resp.status()));
        }
        let payload = self
            .read_limited(resp, limit, "signature blob", target)
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
                lock(&self.tokens).insert(
                    target.cache_key(),
                    token.clone(),
                    self.config.limits.token_cache_entries,
                );
                format!("Bearer {token}")
            }
            Some(Challenge::Basic) => {
                let Some(Credential::Basic { username, password }) = target.credential else {
                    return Err(
                        self.denied(target, "the registry requires a username and password")
                    );
                };
                let mut hosts = lock(&self.basic_hosts);
                if hosts.len() >= self.config.limits.token_cache_entries {
                    hosts.clear();
                }
                hosts.insert(target.host.to_string());
                drop(hosts);
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
        if let Some(Credential::Bearer(token)) = target.credential {
            // A registry token is presented as is; the realm is not asked.
            return Ok(token.clone());
        }
        let mut params = vec![("scope", scope)];
        if let Some(service) = service {
            params.push(("service", service));
        }
        let invalid_realm = |message: String| RegistryError::Invalid {
            host: target.host.to_string(),
            what: "token realm",
            message: format!("{realm:?}: {message}"),
        };
        let url = reqwest::Url::parse_with_params(realm, &params)
            .map_err(|e| invalid_realm(e.to_string()))?;
        if let Some(reason) = self.realm_refusal(target, &url) {
            return Err(invalid_realm(reason));
        }
        let mut req = self.http.get(url);
        // As the docker CLI does, the registry's credential goes to the realm it names, which
        // may be another host (Docker Hub's is auth.docker.io): the realm passed the checks
        // above, and it was named by the registry the credential is for.
        if let Some(Credential::Basic { username, password }) = target.credential {
            req = req.basic_auth(username, Some(password));
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
                self.config.limits.token_response_bytes,
                "token response",
                target,
            )
            .await?;
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Invalid {
                host: target.host.to_string(),
                what: "token response",
                message: e.to_string(),
            })?;
        let token = token
            .token
            .or(token.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Invalid {
                host: target.host.to_string(),
                what: "token response",
                message: "no token in the answer".into(),
            })?;
        if token.len() > self.config.limits.token_bytes {
            return Err(RegistryError::TooLarge {
                what: "bearer token",
                host: target.host.to_string(),
                limit: self.config.limits.token_bytes as u64,
            });
        }
        Ok(token)
    }

    /// Why the token `realm` a registry named must not be asked, if it must not: plain HTTP
    /// only to a registry itself reached over plain HTTP (loopback, `--insecure-registry`)
    /// and only at a loopback or insecure-listed host; and a registry that is not on loopback
    /// may not send the node to a loopback or link-local address (its metadata service, a
    /// local daemon), credentials or not.
    fn realm_refusal(&self, target: &Target<'_>, realm: &reqwest::Url) -> Option<String> {
        let host = realm.host_str().unwrap_or_default();
        let authority = match realm.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let realm_local = is_local_host(host);
        match realm.scheme() {
            "https" => {}
            "http" => {
                let allowed_host = realm_local || self.is_insecure(&authority);
                if !(target.plain_http && allowed_host) {
                    return Some(
                        "a token realm must be https (plain http only for a loopback or \
                         --insecure-registry registry whose realm is on such a host too)"
                            .into(),
                    );
                }
            }
            other => return Some(format!("scheme {other:?} is not https")),
        }
        if realm_local
            && !is_local_host(host_without_port(target.host))
            && !self.is_insecure(&authority)
        {
            return Some(format!(
                "registry {} is not on this host but names a local address",
                target.host
            ));
        }
        None
    }

    fn denied(&self, target: &Target<'_>, message: &str) -> RegistryError {
        RegistryError::Denied {
            host: target.host.to_string(),
            repository: target.repository.to_string(),
            message: message.to_string(),
        }
    }

    /// Reads a whole body, refusing to hold more than `limit` bytes or to pass the target's
    /// budget (every byte read is counted against it).
    async fn read_limited(
        &self,
        mut resp: reqwest::Response,
        limit: u64,
        what: &'static str,
        target: &Target<'_>,
    ) -> Result<Vec<u8>> {
        let host = target.host;
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
        if let (Some(budget), Some(n)) = (target.budget, declared) {
            if n > budget.remaining() {
                return Err(budget.exceeded(host));
            }
        }
        let capacity = declared
            .unwrap_or(0)
            .min(limit)
            .min(target.budget.map_or(u64::MAX, Budget::remaining));
        let mut body = Vec::with_capacity(capacity as usize);
        while let Some(chunk) = resp.chunk().await.map_err(|e| transport_error(host, &e))? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            if let Some(budget) = target.budget {
                budget.charge(chunk.len() as u64, host)?;
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Why following a redirect from `previous` to `next` is refused, if it is: never from https
/// down to plain http (reqwest itself drops `Authorization` when the host changes).
fn redirect_refusal(previous: &[reqwest::Url], next: &reqwest::Url) -> Option<String> {
    if previous.len() >= 5 {
        return Some("more than 5 redirects".into());
    }
    let from_https = previous.iter().any(|u| u.scheme() == "https");
    match next.scheme() {
        "https" => None,
        "http" if !from_https => None,
        scheme => Some(format!(
            "refusing to follow a redirect from https to {scheme}: {}",
            next.host_str().unwrap_or_default()
        )),
    }
}

/// `host` of `host[:port]` (`[::1]` of `[::1]:5000`).
fn host_without_port(authority: &str) -> &str {
    if authority.ends_with(']') {
        return authority;
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// `localhost`, a loopback, link-local or unspecified address (`[::1]` with its brackets).
fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => {
            ip.is_loopback() || ip.is_link_local() || ip.is_unspecified()
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            ip.is_loopback() || ip.is_unspecified() || (ip.segments()[0] & 0xffc0) == 0xfe80
        }
        Err(_) => false,
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

    fn client(insecure: &[&str]) -> RegistryClient {
        RegistryClient::new(RegistryConfig {
            insecure: insecure.iter().map(|h| h.to_string()).collect(),
            ..RegistryConfig::default()
        })
        .unwrap()
    }

    fn target<'a>(host: &'a str, plain_http: bool) -> Target<'a> {
        Target {
            host,
            api_host: host,
            repository: "app",
            plain_http,
            credential: None,
            budget: None,
        }
    }

    #[test]
    fn token_realms_must_be_https_and_not_local_for_a_remote_registry() {
        let c = client(&["reg.internal:5000"]);
        let refused =
            |t: &Target<'_>, realm: &str| c.realm_refusal(t, &reqwest::Url::parse(realm).unwrap());
        let remote = target("ghcr.io", false);
        assert_eq!(refused(&remote, "https://ghcr.io/token"), None);
        assert_eq!(refused(&remote, "https://auth.docker.io/token"), None);
        for bad in [
            "http://ghcr.io/token",
            "ftp://ghcr.io/token",
            "https://127.0.0.1:8080/token",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/token",
            "https://localhost/token",
        ] {
            assert!(refused(&remote, bad).is_some(), "{bad} was allowed");
        }
        // A loopback registry spoken to over plain HTTP may name a plain-HTTP loopback realm.
        let local = target("127.0.0.1:5000", true);
        assert_eq!(refused(&local, "http://127.0.0.1:5001/token"), None);
        assert!(refused(&local, "http://auth.example.com/token").is_some());
        // An --insecure-registry may name a realm on an insecure-listed host.
        let insecure = target("reg.internal:5000", true);
        assert_eq!(refused(&insecure, "http://reg.internal:5000/token"), None);
        assert!(refused(&insecure, "http://reg.internal:5001/token").is_some());
    }

    #[test]
    fn redirects_never_go_from_https_to_http() {
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(redirect_refusal(&[url("https://a/v2/")], &url("http://b/blob")).is_some());
        assert!(redirect_refusal(
            &[url("https://a/v2/"), url("https://cdn/x")],
            &url("http://cdn/y")
        )
        .is_some());
        assert_eq!(
            redirect_refusal(&[url("https://a/v2/")], &url("https://b/blob")),
            None
        );
        assert_eq!(
            redirect_refusal(
                &[url("http://127.0.0.1:5000/v2/")],
                &url("http://127.0.0.1:9/b")
            ),
            None
        );
        let many: Vec<_> = (0..5).map(|i| url(&format!("https://a/{i}"))).collect();
        assert!(redirect_refusal(&many, &url("https://a/x")).is_some());
    }

    #[test]
    fn token_cache_is_bounded_and_drops_the_oldest() {
        let mut cache = TokenCache::default();
        for i in 0..10 {
            cache.insert(format!("k{i}"), "t".into(), 4);
        }
        assert_eq!(cache.len(), 4);
        assert!(cache.get("k5").is_none());
        assert!(cache.get("k9").is_some());
        // Replacing a key keeps one entry for it.
        cache.insert("k9".into(), "u".into(), 4);
        assert_eq!(cache.len(), 4);
        assert_eq!(cache.get("k9").map(String::as_str), Some("u"));
    }

    #[test]
    fn the_budget_counts_every_byte_and_fails_past_its_limit() {
        let budget = Budget::new(10, 1);
        assert!(budget.charge(6, "h").is_ok());
        assert!(budget.charge(4, "h").is_ok());
        let err = budget.charge(1, "h").unwrap_err();
        assert!(
            err.to_string().contains("more than this decision may read"),
            "{err}"
        );
        // Once over, every later read fails too.
        assert!(budget.charge(0, "h").is_err());
        assert_eq!(budget.remaining(), 0);
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

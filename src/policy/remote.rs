//! `remote` policy sources (`policy: {type: rego, remote: {url, sha256sum}}`): fetched over
//! HTTPS when a snapshot is built, never during a decision.
//!
//! Snapshot compilation is pure, so the async layers that build snapshots (the policy
//! directory, the cluster watcher, `pullgate verify`) first ask a [`RemoteFetcher`] for the
//! texts every CIP names ([`RemoteFetcher::resolve`]) and hand the result, a [`RemoteTexts`],
//! to [`Snapshot::build_with_remote`](super::Snapshot::build_with_remote).
//!
//! A text is accepted only when the SHA-256 of the body equals `sha256sum`; accepted texts are
//! cached for the life of the fetcher, keyed by (url, sha256sum), so a text is fetched once and
//! every later rebuild reuses it. A failed fetch is not cached as text: the CIP (or authority)
//! naming it fails closed with the reason, and the fetch is tried again by a rebuild once
//! [`FetchConfig::retry_after`] has passed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use super::load::Objects;
use super::types::Policy;

/// Largest policy body accepted (the size limit rego policies have anyway).
pub const MAX_BODY_BYTES: u64 = 1 << 20;
/// Budget of one fetch, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed fetch stands before a rebuild tries it again.
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// What names a remote policy: its URL and the digest its text must have (lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RemoteKey {
    pub url: String,
    pub sha256sum: String,
}

impl RemoteKey {
    pub fn new(url: &str, sha256sum: &str) -> RemoteKey {
        RemoteKey {
            url: url.to_string(),
            sha256sum: sha256sum.trim().to_ascii_lowercase(),
        }
    }

    fn of(policy: &Policy) -> Option<RemoteKey> {
        policy
            .remote
            .as_ref()
            .map(|r| RemoteKey::new(&r.url, &r.sha256sum))
    }
}

/// The outcome of resolving remote policies: each key's text, or why there is none.
#[derive(Debug, Clone, Default)]
pub struct RemoteTexts(BTreeMap<RemoteKey, Result<Arc<str>, String>>);

impl RemoteTexts {
    /// The text for `key`, or the reason it is not available.
    pub fn get(&self, key: &RemoteKey) -> Result<Arc<str>, String> {
        match self.0.get(key) {
            Some(found) => found.clone(),
            None => Err(format!(
                "remote policy {} has not been fetched (remote policies are fetched by the daemon, `pullgate verify` and cluster sync, not by `pullgate validate` or apply-time validation)",
                key.url
            )),
        }
    }

    pub fn insert(&mut self, key: RemoteKey, text: Result<Arc<str>, String>) {
        self.0.insert(key, text);
    }

    /// The texts that were had, for persisting beside a snapshot.
    pub fn texts(&self) -> impl Iterator<Item = (&RemoteKey, &Arc<str>)> {
        self.0
            .iter()
            .filter_map(|(k, v)| Some((k, v.as_ref().ok()?)))
    }
}

/// Every remote policy source named by the CIPs of `objects` (CIP-level and attestation
/// policies).
pub fn remote_refs(objects: &Objects) -> BTreeSet<RemoteKey> {
    let mut keys = BTreeSet::new();
    for cip in &objects.cips {
        let spec = &cip.object.spec;
        keys.extend(spec.policy.as_ref().and_then(RemoteKey::of));
        for a in &spec.authorities {
            for at in &a.attestations {
                keys.extend(at.policy.as_ref().and_then(RemoteKey::of));
            }
        }
    }
    keys
}

/// Checks a fetched body against its key: the SHA-256 must equal `sha256sum`, and the body
/// must be UTF-8 text.
pub fn check_body(key: &RemoteKey, body: &[u8]) -> Result<String, String> {
    let got = hex::encode(sha2::Sha256::digest(body));
    if got != key.sha256sum {
        return Err(format!(
            "remote policy {}: the fetched body has sha256 {got}, but sha256sum is {}",
            key.url, key.sha256sum
        ));
    }
    String::from_utf8(body.to_vec())
        .map_err(|_| format!("remote policy {}: the body is not UTF-8 text", key.url))
}

/// Refusals that need no request: a URL that is not https, a missing or malformed sha256sum.
fn precheck(key: &RemoteKey) -> Result<(), String> {
    if !key.url.starts_with("https://") {
        return Err(format!(
            "remote policy {}: refused, only https:// URLs are fetched",
            key.url
        ));
    }
    if key.sha256sum.is_empty() {
        return Err(format!(
            "remote policy {}: refused, it has no sha256sum to check the fetched text against",
            key.url
        ));
    }
    if key.sha256sum.len() != 64 || !key.sha256sum.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "remote policy {}: refused, sha256sum {:?} is not 64 hex digits",
            key.url, key.sha256sum
        ));
    }
    Ok(())
}

/// How a [`RemoteFetcher`] fetches.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub timeout: Duration,
    pub max_bytes: u64,
    pub retry_after: Duration,
    /// PEM certificates trusted besides the system roots (which include `SSL_CERT_FILE` /
    /// `SSL_CERT_DIR` when set).
    pub extra_roots_pem: Vec<u8>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout: FETCH_TIMEOUT,
            max_bytes: MAX_BODY_BYTES,
            retry_after: RETRY_AFTER,
            extra_roots_pem: Vec::new(),
        }
    }
}

/// Fetches remote policies and keeps the good ones; shared by every rebuild of one source.
pub struct RemoteFetcher {
    /// `Err`: the HTTP client could not be built (e.g. no usable roots); every fetch fails
    /// with this reason, which keeps the policies naming remote sources closed.
    /// Built on the first fetch: a policy set without `remote` sources never needs it.
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
    config: FetchConfig,
    good: Mutex<HashMap<RemoteKey, Arc<str>>>,
    /// Failed fetches: the reason and when it happened.
    failed: Mutex<HashMap<RemoteKey, (String, Instant)>>,
    requests: AtomicU64,
}

impl Default for RemoteFetcher {
    fn default() -> Self {
        RemoteFetcher::new(FetchConfig::default())
    }
}

impl std::fmt::Debug for RemoteFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteFetcher")
            .field("config", &self.config)
            .field("requests", &self.request_count())
            .finish()
    }
}

impl RemoteFetcher {
    pub fn new(config: FetchConfig) -> RemoteFetcher {
        RemoteFetcher {
            http: std::sync::OnceLock::new(),
            config,
            good: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
        }
    }

    /// HTTP requests sent so far.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Adds a text known from elsewhere (a persisted snapshot) if it matches its digest.
    pub fn seed(&self, key: RemoteKey, text: &str) -> Result<(), String> {
        precheck(&key)?;
        let text = check_body(&key, text.as_bytes())?;
        lock(&self.good).insert(key, Arc::from(text));
        Ok(())
    }

    /// The texts for every remote source `objects` names: cached ones reused, the others
    /// fetched (concurrently). A failure stands for [`FetchConfig::retry_after`], then the
    /// next call fetches again.
    pub async fn resolve(&self, objects: &Objects) -> RemoteTexts {
        let mut texts = RemoteTexts::default();
        let mut wanted = Vec::new();
        let refs = remote_refs(objects);
        // Failures of sources no CIP names any more are forgotten, so they are not retried.
        lock(&self.failed).retain(|key, _| refs.contains(key));
        for key in refs {
            if let Some(text) = lock(&self.good).get(&key) {
                texts.insert(key, Ok(text.clone()));
                continue;
            }
            let recent_failure = lock(&self.failed).get(&key).and_then(|(reason, at)| {
                (at.elapsed() < self.config.retry_after).then(|| reason.clone())
            });
            match recent_failure {
                Some(reason) => texts.insert(key, Err(reason)),
                None => wanted.push(key),
            }
        }
        let fetched = futures_util::future::join_all(wanted.into_iter().map(|key| async move {
            let got = self.fetch(&key).await;
            (key, got)
        }))
        .await;
        for (key, got) in fetched {
            match got {
                Ok(text) => {
                    let text: Arc<str> = Arc::from(text);
                    lock(&self.failed).remove(&key);
                    lock(&self.good).insert(key.clone(), text.clone());
                    tracing::info!(url = %key.url, sha256 = %key.sha256sum, "remote policy fetched");
                    texts.insert(key, Ok(text));
                }
                Err(reason) => {
                    tracing::warn!(url = %key.url, %reason, "remote policy not available; the policies naming it fail closed until a later fetch succeeds");
                    lock(&self.failed).insert(key.clone(), (reason.clone(), Instant::now()));
                    texts.insert(key, Err(reason));
                }
            }
        }
        texts
    }

    /// The texts for `objects` from the cache alone (no request); what is not cached is
    /// reported as not fetched.
    pub fn cached(&self, objects: &Objects) -> RemoteTexts {
        let mut texts = RemoteTexts::default();
        let good = lock(&self.good);
        for key in remote_refs(objects) {
            if let Some(text) = good.get(&key) {
                texts.insert(key, Ok(text.clone()));
            }
        }
        texts
    }

    /// Whether a failed fetch is due for another try.
    pub fn retry_due(&self) -> bool {
        self.retry_in() == Some(Duration::ZERO)
    }

    /// How long until the earliest failed fetch is due for another try (`None`: none failed).
    pub fn retry_in(&self) -> Option<Duration> {
        lock(&self.failed)
            .values()
            .map(|(_, at)| self.config.retry_after.saturating_sub(at.elapsed()))
            .min()
    }

    async fn fetch(&self, key: &RemoteKey) -> Result<String, String> {
        precheck(key)?;
        let http = self.http.get_or_init(|| build_client(&self.config));
        let http = http.as_ref().map_err(|e| {
            format!(
                "remote policy {}: no HTTPS client could be built: {e}",
                key.url
            )
        })?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        let failed = |e: reqwest::Error| {
            if e.is_timeout() {
                format!(
                    "remote policy {}: no answer within {:?}",
                    key.url, self.config.timeout
                )
            } else {
                format!("remote policy {}: fetch failed: {}", key.url, chain(&e))
            }
        };
        let mut resp = http.get(&key.url).send().await.map_err(failed)?;
        if !resp.status().is_success() {
            return Err(format!(
                "remote policy {}: the server answered HTTP {}",
                key.url,
                resp.status().as_u16()
            ));
        }
        let limit = self.config.max_bytes;
        let too_large = || {
            format!(
                "remote policy {}: refused, the body is larger than the {limit}-byte limit",
                key.url
            )
        };
        if resp.content_length().is_some_and(|n| n > limit) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if body.len() as u64 + chunk.len() as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        check_body(key, &body)
    }
}

fn build_client(config: &FetchConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .timeout(config.timeout)
        .connect_timeout(config.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::limited(3));
    if !config.extra_roots_pem.is_empty() {
        let roots = reqwest::Certificate::from_pem_bundle(&config.extra_roots_pem)
            .map_err(|e| format!("extra roots: {e}"))?;
        builder = builder.tls_certs_merge(roots);
    }
    builder.build().map_err(|e| chain(&e))
}

/// An error with its causes, which is where reqwest keeps the interesting part.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_OF_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn body_must_match_its_digest() {
        let key = RemoteKey::new("https://x/p.rego", &SHA_OF_ABC.to_uppercase());
        assert_eq!(check_body(&key, b"abc").unwrap(), "abc");
        let e = check_body(&key, b"abd").unwrap_err();
        assert!(
            e.contains(SHA_OF_ABC) && e.contains("the fetched body has sha256 "),
            "{e}"
        );
    }

    #[tokio::test]
    async fn refusals_need_no_request() {
        let fetcher = RemoteFetcher::default();
        for (url, sha, want) in [
            ("http://x/p.rego", SHA_OF_ABC, "only https:// URLs"),
            ("https://x/p.rego", "", "has no sha256sum"),
            ("https://x/p.rego", "abc", "is not 64 hex digits"),
        ] {
            let e = fetcher.fetch(&RemoteKey::new(url, sha)).await.unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!(fetcher.request_count(), 0);
    }

    #[test]
    fn seeded_texts_are_checked() {
        let fetcher = RemoteFetcher::default();
        let key = RemoteKey::new("https://x/p.rego", SHA_OF_ABC);
        assert!(fetcher.seed(key.clone(), "abd").is_err());
        fetcher.seed(key.clone(), "abc").unwrap();
        let mut objects = Objects::default();
        objects
            .load_str(
                &format!("apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: p}}\nspec:\n  images: [{{glob: \"**\"}}]\n  authorities: [{{static: {{action: pass}}}}]\n  policy: {{type: rego, remote: {{url: \"https://x/p.rego\", sha256sum: {SHA_OF_ABC}}}}}\n"),
                "t",
            )
            .unwrap();
        assert_eq!(&*fetcher.cached(&objects).get(&key).unwrap(), "abc");
    }
}

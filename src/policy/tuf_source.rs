//! TrustRoots backed by TUF: `repository` is verified from its `mirrorFS` while a snapshot is
//! built (offline, pure); `remote` is fetched here, in the async layer, before a build, and
//! handed to the build as already-verified trust ([`RemoteTrust`]).
//!
//! Remote trust is cached per TrustRoot (keyed by mirror, root and target names) and refreshed
//! at most every `refresh` interval or when the TrustRoot object changes. A failed refresh
//! keeps the last verified trust, but only until its metadata expires (the earliest expiry of
//! root, timestamp, snapshot and targets): from then on the authorities that depend on it fail
//! closed with a reason naming the expiry, so a node cut off from its mirror cannot keep
//! trusting what Sigstore has rotated out. With no verified trust, the build fails closed with
//! the reason. Nothing is fetched unless a TrustRoot has `remote` (air-gapped clusters fetch
//! nothing).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest as _;

use super::load::Objects;
use super::types::{TrustRoot, TrustRootRemote};
use crate::verify::tuf::{self, Fetch, TufTrust, Versions};

/// Verified trust of `remote` TrustRoots by [`remote_key`], or why there is none.
pub type RemoteTrust = HashMap<String, Result<Arc<TufTrust>, String>>;

/// Default interval between refreshes of a remote TUF repository.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(4 * 3600);
/// Timeout of one HTTP request to a TUF mirror.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What identifies a remote repository and what is read from it.
pub fn remote_key(r: &TrustRootRemote) -> String {
    let root = hex::encode(sha2::Sha256::digest(r.root.trim().as_bytes()));
    format!(
        "{} root-sha256:{root} targets:{} trustedRootTarget:{}",
        r.mirror.trim_end_matches('/'),
        tuf::targets_dir(r.targets.as_deref()),
        trusted_root_target(r.trusted_root_target.as_deref()),
    )
}

fn trusted_root_target(t: Option<&str>) -> &str {
    t.filter(|t| !t.is_empty())
        .unwrap_or(tuf::DEFAULT_TRUSTED_ROOT_TARGET)
}

/// The TUF trust of every TUF TrustRoot, by name: `repository` verified now, `remote` looked
/// up in `remote`.
pub fn resolve<'a>(
    trust_roots: &HashMap<&'a str, &'a TrustRoot>,
    remote: &RemoteTrust,
) -> HashMap<&'a str, Result<TufTrust, String>> {
    let now = jiff::Timestamp::now().as_second();
    let mut out = HashMap::new();
    for (name, tr) in trust_roots {
        if let Some(repo) = &tr.spec.repository {
            let trust = repository_trust(repo, now);
            out.insert(*name, trust);
        } else if let Some(r) = &tr.spec.remote {
            let trust = match remote.get(&remote_key(r)) {
                Some(Ok(t)) => Ok(TufTrust::clone(t)),
                Some(Err(e)) => Err(format!("spec.remote (TUF {}): {e}", r.mirror)),
                None => Err(format!(
                    "spec.remote (TUF {}): not fetched and verified yet",
                    r.mirror
                )),
            };
            out.insert(*name, trust);
        }
    }
    out
}

/// Most `repository` TrustRoots whose verified trust is remembered.
const REPOSITORY_CACHE_ENTRIES: usize = 32;

/// Verified trust of `repository` TrustRoots by the SHA-256 of what they hold, so that a
/// rebuild does not gunzip and verify an unchanged `mirrorFS` (up to 64 MiB) again.
static REPOSITORY_CACHE: Mutex<Option<HashMap<String, Result<TufTrust, String>>>> =
    Mutex::new(None);

/// The trust of a `repository` TrustRoot: verified once per content, then reused until its
/// metadata expires (a failure stays a failure: expiry only comes closer).
fn repository_trust(
    repo: &super::types::TrustRootRepository,
    now: i64,
) -> Result<TufTrust, String> {
    let mut hasher = sha2::Sha256::new();
    for part in [
        repo.root.as_str(),
        repo.mirror_fs.as_str(),
        repo.targets.as_deref().unwrap_or_default(),
        repo.trusted_root_target.as_deref().unwrap_or_default(),
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let key = hex::encode(hasher.finalize());
    {
        let cache = REPOSITORY_CACHE.lock().unwrap_or_else(|p| p.into_inner());
        match cache.as_ref().and_then(|c| c.get(&key)) {
            Some(Ok(trust)) if expired(trust, now).is_none() => return Ok(trust.clone()),
            Some(Err(e)) => return Err(e.clone()),
            _ => {}
        }
    }
    #[cfg(test)]
    tests::VERIFIED.with(|v| v.set(v.get() + 1));
    let trust = tuf::from_repository(
        &repo.root,
        &repo.mirror_fs,
        repo.targets.as_deref(),
        repo.trusted_root_target.as_deref(),
        now,
    )
    .map_err(|e| format!("spec.repository (TUF): {e}"));
    let mut cache = REPOSITORY_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= REPOSITORY_CACHE_ENTRIES {
        cache.clear();
    }
    cache.insert(key, trust.clone());
    trust
}

struct Entry {
    trust: Option<Arc<TufTrust>>,
    /// The last failure (kept beside `trust`, to explain an expiry).
    error: Option<String>,
    /// `trust` was reported expired (the snapshot was rebuilt without it).
    expired: bool,
    /// When the last attempt ended, and whether it succeeded.
    attempted: Instant,
    succeeded: bool,
    /// Hash of the TrustRoot object last fetched for: any change refreshes.
    object: String,
}

/// The wall clock, Unix seconds (injectable for tests of expiry).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The cache of remote TUF trust, shared by the snapshot rebuilds of one policy source.
pub struct RemoteTuf {
    entries: Mutex<HashMap<String, Entry>>,
    refresh: Duration,
    clock: Clock,
    /// Built on the first fetch: a policy set without `remote` TrustRoots never needs it.
    http: std::sync::OnceLock<Option<reqwest::Client>>,
}

impl RemoteTuf {
    /// `refresh`: how long verified trust is used before it is fetched again.
    pub fn new(refresh: Duration) -> RemoteTuf {
        RemoteTuf {
            entries: Mutex::new(HashMap::new()),
            refresh,
            clock: Arc::new(|| jiff::Timestamp::now().as_second()),
            http: std::sync::OnceLock::new(),
        }
    }

    /// Reads the time from `clock` (Unix seconds) instead of the system clock.
    pub fn with_clock(mut self, clock: Clock) -> RemoteTuf {
        self.clock = clock;
        self
    }

    /// Copies what is cached for the `remote` TrustRoots of `objects` into it (memory only).
    pub fn fill(&self, objects: &mut Objects) {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for tr in &objects.trust_roots {
            let Some(r) = &tr.object.spec.remote else {
                continue;
            };
            let key = remote_key(r);
            if let Some(e) = entries.get(&key) {
                let value = match (&e.trust, &e.error) {
                    (Some(t), _) => match expired(t, (self.clock)()) {
                        None => Ok(t.clone()),
                        Some(at) => Err(expired_reason(&at, e.error.as_deref())),
                    },
                    (None, Some(err)) => Err(err.clone()),
                    (None, None) => continue,
                };
                objects.tuf_remote.insert(key, value);
            }
        }
    }

    /// Fetches every `remote` TrustRoot of `objects` that is due. Returns whether any cached
    /// trust (or error) changed, i.e. whether the snapshot should be rebuilt.
    pub async fn refresh(&self, objects: &Objects) -> bool {
        let mut changed = false;
        for tr in &objects.trust_roots {
            let Some(r) = &tr.object.spec.remote else {
                continue;
            };
            let key = remote_key(r);
            let object = serde_json::to_vec(&tr.object)
                .map(|b| hex::encode(sha2::Sha256::digest(b)))
                .unwrap_or_default();
            let previous = {
                let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
                match entries.get_mut(&key) {
                    Some(e) => {
                        // Trust whose metadata expired since the last round is withdrawn now,
                        // whether or not a fetch is due.
                        let now_expired = e
                            .trust
                            .as_ref()
                            .is_some_and(|t| expired(t, (self.clock)()).is_some());
                        if now_expired && !e.expired {
                            tracing::error!(mirror = %r.mirror, "remote TUF metadata expired without a successful refresh; its TrustRoot denies");
                            e.expired = true;
                            changed = true;
                        }
                        if !self.due(e, &object) {
                            continue;
                        }
                        e.trust.as_ref().map(|t| t.versions)
                    }
                    None => None,
                }
            };
            let result = self.fetch(r, previous).await;
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let entry = entries.entry(key).or_insert_with(|| Entry {
                trust: None,
                error: None,
                expired: false,
                attempted: Instant::now(),
                succeeded: false,
                object: String::new(),
            });
            entry.attempted = Instant::now();
            entry.object = object;
            match result {
                Ok(trust) => {
                    tracing::info!(mirror = %r.mirror, root_version = trust.versions.root, targets_version = trust.versions.targets, "remote TUF repository verified");
                    if entry.trust.as_deref() != Some(&trust) || entry.error.is_some() {
                        changed = true;
                    }
                    if entry.expired {
                        changed = true;
                    }
                    entry.trust = Some(Arc::new(trust));
                    entry.error = None;
                    entry.expired = false;
                    entry.succeeded = true;
                }
                Err(e) => {
                    entry.succeeded = false;
                    if entry.trust.is_some() {
                        // Keep the last verified trust until it expires: a mirror outage must
                        // not change it before then.
                        tracing::warn!(mirror = %r.mirror, error = %e, "remote TUF refresh failed; the last verified trust stays in force until its metadata expires");
                        entry.error = Some(e);
                    } else {
                        tracing::error!(mirror = %r.mirror, error = %e, "remote TUF repository could not be verified; its TrustRoot denies");
                        if entry.error.as_deref() != Some(&e) {
                            changed = true;
                        }
                        entry.error = Some(e);
                    }
                }
            }
        }
        changed
    }

    fn due(&self, e: &Entry, object: &str) -> bool {
        if e.object != object {
            return true;
        }
        let age = e.attempted.elapsed();
        if e.succeeded {
            age >= self.refresh
        } else {
            // Retry failures sooner than the refresh, but never in a tight loop.
            age >= self.refresh.min(Duration::from_secs(30))
        }
    }

    async fn fetch(
        &self,
        r: &TrustRootRemote,
        previous: Option<Versions>,
    ) -> Result<TufTrust, String> {
        let base = mirror_url(&r.mirror)?;
        let http = self
            .http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .timeout(REQUEST_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .build()
                    .map_err(|e| tracing::error!(error = %e, "cannot build the TUF HTTP client"))
                    .ok()
            })
            .clone()
            .ok_or_else(|| "no HTTP client (see the log)".to_string())?;
        let root = tuf::decode_root(&r.root).map_err(|e| e.to_string())?;
        let targets = tuf::targets_dir(r.targets.as_deref()).to_string();
        let target = trusted_root_target(r.trusted_root_target.as_deref()).to_string();
        let handle = tokio::runtime::Handle::current();
        let now = (self.clock)();
        // The client workflow is sequential and synchronous; each request blocks on the
        // runtime from a blocking thread.
        tokio::task::spawn_blocking(move || {
            let mut repo = HttpRepo { base, http, handle };
            tuf::update(&mut repo, &root, &targets, &target, now, previous)
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| format!("TUF update task failed: {e}"))?
    }
}

/// When `trust`'s metadata expired, if it has by `now`.
fn expired(trust: &TufTrust, now: i64) -> Option<String> {
    trust
        .expires
        .filter(|e| e.expired(now))
        .map(|e| e.describe())
}

fn expired_reason(at: &str, last_error: Option<&str>) -> String {
    let mut reason =
        format!("the verified TUF metadata expired at {at} and no refresh has succeeded since");
    if let Some(e) = last_error {
        reason.push_str(&format!(" (last attempt: {e})"));
    }
    reason
}

/// The mirror URL: `https://`, or `http://` on a loopback address only (TUF metadata is signed,
/// but plain HTTP off the host would still let anyone on the path withhold updates unseen).
fn mirror_url(mirror: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(mirror.trim())
        .map_err(|e| format!("mirror {mirror:?} is not a URL: {e}"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" => Ok(url),
        "http" if loopback => Ok(url),
        _ => Err(format!(
            "mirror {mirror:?} must be an https:// URL (http:// only on a loopback address)"
        )),
    }
}

struct HttpRepo {
    base: reqwest::Url,
    http: reqwest::Client,
    handle: tokio::runtime::Handle,
}

impl Fetch for HttpRepo {
    fn fetch(&mut self, path: &str, max: u64) -> tuf::Result<Option<Vec<u8>>> {
        let err = |reason: String| tuf::Error::Fetch {
            file: path.to_string(),
            reason,
        };
        let url = format!("{}/{path}", self.base.as_str().trim_end_matches('/'));
        self.handle.block_on(async {
            let mut resp = self
                .http
                .get(&url)
                .send()
                .await
                .map_err(|e| err(e.to_string()))?;
            let status = resp.status();
            // S3 and GCS answer 403 for a missing object; both end the root rotation.
            if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::FORBIDDEN
            {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(err(format!("HTTP {status}")));
            }
            if resp.content_length().is_some_and(|l| l > max) {
                return Err(tuf::Error::TooLarge {
                    file: path.to_string(),
                    max,
                });
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| err(e.to_string()))? {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > max {
                    return Err(tuf::Error::TooLarge {
                        file: path.to_string(),
                        max,
                    });
                }
            }
            Ok(Some(body))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// `repository` verifications run on this thread.
        pub(super) static VERIFIED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[test]
    fn a_repository_is_verified_once_per_content() {
        let repo = |mirror_fs: &str| -> super::super::types::TrustRootRepository {
            serde_json::from_value(serde_json::json!({
                "root": "e30=", "mirrorFS": mirror_fs, "targets": "targets"
            }))
            .unwrap()
        };
        let now = jiff::Timestamp::now().as_second();
        let before = VERIFIED.with(|v| v.get());
        let first = repository_trust(&repo("bm90IGEgdGFyLmd6"), now).unwrap_err();
        for _ in 0..5 {
            assert_eq!(
                repository_trust(&repo("bm90IGEgdGFyLmd6"), now).unwrap_err(),
                first
            );
        }
        assert_eq!(VERIFIED.with(|v| v.get()) - before, 1, "verified once");
        let _ = repository_trust(&repo("b3RoZXIgY29udGVudA=="), now);
        assert_eq!(
            VERIFIED.with(|v| v.get()) - before,
            2,
            "new content is verified"
        );
    }

    #[test]
    fn mirror_must_be_https_or_loopback() {
        assert!(mirror_url("https://tuf-repo-cdn.sigstore.dev").is_ok());
        assert!(mirror_url("http://127.0.0.1:8080/repo").is_ok());
        assert!(mirror_url("http://localhost:1").is_ok());
        let e = mirror_url("http://tuf.example").unwrap_err();
        assert!(e.contains("must be an https:// URL"), "{e}");
        assert!(mirror_url("file:///etc").is_err());
        assert!(mirror_url("not a url").is_err());
    }
}

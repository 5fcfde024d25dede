//! Verdict cache keyed by (pinned image, enforcement, policy fingerprint), with single-flight:
//! concurrent pulls of one image wait for one verification instead of each running their own.
//!
//! A changed policy or rotated key changes the snapshot fingerprint, so no stale verdict
//! survives a policy change. Could-not-decide verdicts are cached briefly, so a registry outage
//! is not hammered but recovers quickly.
//!
//! Refusals (deny, could not decide) are kept per credential identity: one caller's lack of
//! access to a private repository says nothing about another's. Allows are shared: an allow
//! says the digest's signatures satisfy the policies, which is true whoever fetched them (every
//! signature is checked cryptographically; a credential can hide signatures, never forge one),
//! and it grants no access to the content, which the pull itself still needs credentials for.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::policy::eval::{Decision, Verdict};

/// What a verdict depends on besides the namespace name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// `registry/repository[:tag]@digest`: the tag matters because globs may match it.
    pub image: String,
    pub enforced: bool,
    pub fingerprint: String,
    /// The parts of the admission object that CIP-level policies read
    /// ([`crate::policy::eval::object_cache_key`]); empty when none does.
    pub object: String,
    /// Who asked: a keyed hash of the credentials the decision could use (never the secret
    /// itself), empty for an anonymous caller. Only refusals are kept under it; allows are
    /// kept under the key with this empty, for everyone.
    pub credentials: String,
}

impl CacheKey {
    /// The key allows are shared under.
    fn shared(&self) -> CacheKey {
        CacheKey {
            credentials: String::new(),
            ..self.clone()
        }
    }
}

struct Entry {
    decision: Decision,
    expires: Instant,
}

/// Bounded TTL cache with single-flight computation.
pub struct VerdictCache {
    ttl: Duration,
    deny_ttl: Duration,
    error_ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<CacheKey, Entry>>,
    inflight: Mutex<HashMap<CacheKey, Arc<OnceCell<Decision>>>>,
}

impl VerdictCache {
    /// `ttl` for allow/warn, `deny_ttl` for deny (short: a user who signs an image after a
    /// denial should not wait long), `error_ttl` for could-not-decide.
    pub fn new(
        ttl: Duration,
        deny_ttl: Duration,
        error_ttl: Duration,
        max_entries: usize,
    ) -> VerdictCache {
        VerdictCache {
            ttl,
            deny_ttl,
            error_ttl,
            max_entries: max_entries.max(1),
            entries: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The cached decision for `key`, or the result of `compute` (run once however many callers
    /// ask at the same time). The flag is true when no computation was run for this caller.
    pub async fn get_or_compute<F, Fut>(&self, key: CacheKey, compute: F) -> (Decision, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Decision>,
    {
        let shared = key.shared();
        if let Some(hit) = self.lookup(&shared).filter(|d| d.verdict.admits()) {
            return (hit, true);
        }
        if let Some(hit) = self.lookup(&key) {
            return (hit, true);
        }
        let cell = lock(&self.inflight)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        // A caller cancelled mid-flight (kubelet gave up on the pull) must not leave its entry
        // behind: the last holder removes it, whatever happens to this future.
        let guard = InflightGuard {
            inflight: &self.inflight,
            key: &key,
            cell,
        };
        let mut ran = false;
        let decision = guard
            .cell
            .get_or_init(|| {
                ran = true;
                compute()
            })
            .await
            .clone();
        if ran {
            let stored_under = match decision.verdict.admits() {
                true => shared,
                false => key.clone(),
            };
            self.store(stored_under, decision.clone());
            drop(guard);
            lock(&self.inflight).remove(&key);
        }
        (decision, !ran)
    }

    fn lookup(&self, key: &CacheKey) -> Option<Decision> {
        let entries = lock(&self.entries);
        let entry = entries.get(key)?;
        (entry.expires > Instant::now()).then(|| entry.decision.clone())
    }

    fn store(&self, key: CacheKey, decision: Decision) {
        let ttl = match decision.verdict {
            Verdict::Allow | Verdict::Warn => self.ttl,
            Verdict::Deny => self.deny_ttl,
            Verdict::Error => self.error_ttl,
        };
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        if entries.len() >= self.max_entries {
            entries.retain(|_, e| e.expires > now);
        }
        if entries.len() >= self.max_entries {
            // Still full of live entries: start over rather than grow without bound.
            entries.clear();
        }
        entries.insert(
            key,
            Entry {
                decision,
                expires: now + ttl,
            },
        );
    }

    pub fn len(&self) -> usize {
        lock(&self.entries).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Removes an in-flight entry when its last caller is done with it (or was dropped).
struct InflightGuard<'a> {
    inflight: &'a Mutex<HashMap<CacheKey, Arc<OnceCell<Decision>>>>,
    key: &'a CacheKey,
    cell: Arc<OnceCell<Decision>>,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(self.inflight);
        // Under the lock, no new caller can take a clone: the map's and this guard's are the
        // only ones left when no other caller waits.
        let last = inflight
            .get(self.key)
            .is_some_and(|c| Arc::ptr_eq(c, &self.cell) && Arc::strong_count(&self.cell) == 2);
        if last {
            inflight.remove(self.key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(image: &str) -> CacheKey {
        CacheKey {
            image: image.into(),
            enforced: true,
            fingerprint: "f".into(),
            object: String::new(),
            credentials: String::new(),
        }
    }

    fn key_for(image: &str, credentials: &str) -> CacheKey {
        CacheKey {
            credentials: credentials.into(),
            ..key(image)
        }
    }

    fn decision(verdict: Verdict) -> Decision {
        let mut d = Decision::new(&"ghcr.io/a/b:1".parse().unwrap(), None, true);
        d.verdict = verdict;
        d
    }

    #[tokio::test(start_paused = true)]
    async fn single_flight_and_ttl() {
        let cache = Arc::new(VerdictCache::new(
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(5),
            100,
        ));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_compute(key("a"), || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        decision(Verdict::Allow)
                    })
                    .await
            }));
        }
        let mut hits = 0;
        for t in tasks {
            let (d, hit) = t.await.unwrap();
            assert_eq!(d.verdict, Verdict::Allow);
            hits += usize::from(hit);
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "one verification for 50 pulls"
        );
        assert_eq!(hits, 49);

        tokio::time::advance(Duration::from_secs(59)).await;
        let (_, hit) = cache
            .get_or_compute(key("a"), || async { decision(Verdict::Deny) })
            .await;
        assert!(hit);
        tokio::time::advance(Duration::from_secs(2)).await;
        let (d, hit) = cache
            .get_or_compute(key("a"), || async { decision(Verdict::Deny) })
            .await;
        assert!(!hit, "expired after the TTL");
        assert_eq!(d.verdict, Verdict::Deny);
        tokio::time::advance(Duration::from_secs(11)).await;
        let (d, hit) = cache
            .get_or_compute(key("a"), || async { decision(Verdict::Allow) })
            .await;
        assert!(!hit, "a deny expires after the shorter deny TTL");
        assert_eq!(d.verdict, Verdict::Allow);
    }

    #[tokio::test]
    async fn a_cancelled_caller_leaves_no_in_flight_entry() {
        let cache = Arc::new(VerdictCache::new(
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(5),
            100,
        ));
        for i in 0..20 {
            let c = cache.clone();
            let task = tokio::spawn(async move {
                c.get_or_compute(key(&format!("gone-{i}")), std::future::pending)
                    .await
            });
            tokio::task::yield_now().await;
            while lock(&cache.inflight).is_empty() {
                tokio::task::yield_now().await;
            }
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled());
        }
        assert_eq!(
            lock(&cache.inflight).len(),
            0,
            "cancelled pulls leak entries"
        );

        // Two callers, the computing one cancelled: the other finishes the work and nothing
        // is left behind.
        let first = {
            let c = cache.clone();
            tokio::spawn(async move { c.get_or_compute(key("shared"), std::future::pending).await })
        };
        while lock(&cache.inflight).is_empty() {
            tokio::task::yield_now().await;
        }
        let second = {
            let c = cache.clone();
            tokio::spawn(async move {
                c.get_or_compute(key("shared"), || async { decision(Verdict::Allow) })
                    .await
            })
        };
        tokio::task::yield_now().await;
        first.abort();
        let (d, _) = second.await.unwrap();
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(lock(&cache.inflight).len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_expire_quickly_and_size_is_bounded() {
        let cache = VerdictCache::new(
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(5),
            3,
        );
        cache
            .get_or_compute(key("e"), || async { decision(Verdict::Error) })
            .await;
        tokio::time::advance(Duration::from_secs(6)).await;
        let (d, hit) = cache
            .get_or_compute(key("e"), || async { decision(Verdict::Allow) })
            .await;
        assert!(!hit);
        assert_eq!(d.verdict, Verdict::Allow);
        for i in 0..10 {
            cache
                .get_or_compute(key(&format!("k{i}")), || async { decision(Verdict::Allow) })
                .await;
            assert!(cache.len() <= 3);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_kept_per_caller_and_allows_are_shared() {
        let cache = VerdictCache::new(
            Duration::from_secs(60),
            Duration::from_secs(30),
            Duration::from_secs(5),
            100,
        );
        // Anonymous caller: the private repository refuses it.
        let (d, _) = cache
            .get_or_compute(key_for("p", ""), || async { decision(Verdict::Error) })
            .await;
        assert_eq!(d.verdict, Verdict::Error);
        let (d, _) = cache
            .get_or_compute(key_for("q", ""), || async { decision(Verdict::Deny) })
            .await;
        assert_eq!(d.verdict, Verdict::Deny);
        // A caller with credentials is not served the anonymous refusals.
        let (d, hit) = cache
            .get_or_compute(key_for("p", "tenant-b"), || async {
                decision(Verdict::Allow)
            })
            .await;
        assert!(!hit, "another caller's could-not-decide must not be reused");
        assert_eq!(d.verdict, Verdict::Allow);
        let (d, hit) = cache
            .get_or_compute(key_for("q", "tenant-b"), || async {
                decision(Verdict::Allow)
            })
            .await;
        assert!(!hit, "another caller's deny must not be reused");
        assert_eq!(d.verdict, Verdict::Allow);
        // Its allow is shared.
        let (d, hit) = cache
            .get_or_compute(key_for("p", "tenant-c"), || async {
                decision(Verdict::Deny)
            })
            .await;
        assert!(hit);
        assert_eq!(d.verdict, Verdict::Allow);
        // A caller's own refusal is reused for that caller only.
        cache
            .get_or_compute(key_for("r", "tenant-a"), || async {
                decision(Verdict::Deny)
            })
            .await;
        let (_, hit) = cache
            .get_or_compute(key_for("r", "tenant-a"), || async {
                decision(Verdict::Allow)
            })
            .await;
        assert!(hit);
    }
}

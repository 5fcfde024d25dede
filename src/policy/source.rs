//! The policy directory as a live source: loaded once, then re-read when its files change.
//! Readers get the current snapshot lock-free; a reload builds a new snapshot and swaps it in
//! whole. A reload treats the files as start-up does: an invalid ClusterImagePolicy is kept
//! and denies every image it covers while the rest of the change applies, so one broken policy
//! never holds back another's change (such as a removed, compromised key). Only a set that
//! cannot be read at all (a YAML syntax error, an unknown kind) is refused, and the last good
//! snapshot stays in force, reported stale.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

use super::load::{policy_files, Objects};
use super::remote::RemoteFetcher;
use super::snapshot::{Settings, Snapshot};
use super::tuf_source::RemoteTuf;
use crate::health::{Freshness, FreshnessCell};

/// Loads `paths` into a snapshot; every load and validation problem is returned on failure.
/// `remote` policy sources are not fetched: policies naming them fail closed as not fetched
/// (enough for validation; see [`load_snapshot_fetching`]).
pub fn load_snapshot(paths: &[PathBuf], settings: Settings) -> Result<Snapshot, Vec<String>> {
    let objects = load_objects(paths)?;
    checked(Snapshot::build(&objects, settings))
}

/// [`load_snapshot`] for one-shot commands, with what the objects name fetched first: `remote`
/// policy sources through `fetcher`, `remote` (TUF) TrustRoots through `tuf`. A failed fetch
/// fails closed only the CIP or authority that needs it, with the reason.
pub async fn load_snapshot_fetching(
    paths: &[PathBuf],
    settings: Settings,
    fetcher: &RemoteFetcher,
    tuf: &RemoteTuf,
) -> Result<Snapshot, Vec<String>> {
    let mut objects = load_objects(paths)?;
    tuf.refresh(&objects).await;
    tuf.fill(&mut objects);
    let remote = fetcher.resolve(&objects).await;
    checked(Snapshot::build_with_remote(&objects, settings, &remote))
}

fn load_objects(paths: &[PathBuf]) -> Result<Objects, Vec<String>> {
    Objects::load_paths(paths)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())
}

fn checked(snapshot: Snapshot) -> Result<Snapshot, Vec<String>> {
    if snapshot.problems.is_empty() {
        Ok(snapshot)
    } else {
        Err(snapshot.problems.iter().map(ToString::to_string).collect())
    }
}

/// What identifies the content of the policy paths cheaply: file names, sizes and mtimes.
type Stamp = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    let mut out = Vec::new();
    for path in paths {
        for file in policy_files(path).unwrap_or_default() {
            let meta = std::fs::metadata(&file).ok();
            out.push((
                file,
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            ));
        }
    }
    out
}

/// A snapshot that never changes, for one-shot commands.
pub struct Fixed {
    snapshot: Arc<Snapshot>,
    freshness: FreshnessCell,
}

impl Fixed {
    pub fn new(snapshot: Snapshot) -> Fixed {
        Fixed {
            snapshot: Arc::new(snapshot),
            freshness: FreshnessCell::fresh(),
        }
    }
}

impl PolicySource for Fixed {
    fn current(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    fn freshness(&self) -> Freshness {
        self.freshness.get()
    }
}

/// Where the front doors read the policy snapshot from: a policy directory or the API server.
pub trait PolicySource: Send + Sync {
    /// The snapshot in force; a lock-free read.
    fn current(&self) -> Arc<Snapshot>;

    /// Whether that snapshot reflects the source now, and since when.
    fn freshness(&self) -> Freshness;
}

impl PolicySource for PolicyDir {
    fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn freshness(&self) -> Freshness {
        self.freshness.get()
    }
}

/// A policy directory kept current.
pub struct PolicyDir {
    paths: Vec<PathBuf>,
    settings: Settings,
    /// Remote policy texts, fetched once and reused by every reload.
    fetcher: Arc<RemoteFetcher>,
    /// Remote TUF trust, and the TrustRoots of the set in force (what to refresh).
    tuf: RemoteTuf,
    trust_roots: std::sync::Mutex<Objects>,
    current: ArcSwap<Snapshot>,
    last_stamp: std::sync::Mutex<Stamp>,
    freshness: FreshnessCell,
}

impl PolicyDir {
    /// Loads the paths. Problems are returned for the caller to report, and never leave the
    /// node open: invalid ClusterImagePolicies are kept and deny every image they cover, and a
    /// set that cannot be read at all yields [`Snapshot::unusable`] (deny all but the exempt
    /// namespaces) until a valid set appears. `remote` policy sources are fetched before the
    /// first snapshot is built.
    pub async fn open(paths: Vec<PathBuf>, settings: Settings) -> (PolicyDir, Vec<String>) {
        PolicyDir::open_with(paths, settings, Arc::new(RemoteFetcher::default())).await
    }

    /// [`PolicyDir::open`] fetching `remote` policy sources through `fetcher`.
    pub async fn open_with(
        paths: Vec<PathBuf>,
        settings: Settings,
        fetcher: Arc<RemoteFetcher>,
    ) -> (PolicyDir, Vec<String>) {
        PolicyDir::open_inner(paths, settings, fetcher, true).await
    }

    /// [`PolicyDir::open`] without waiting on the network, for daemons: the first snapshot is
    /// built from the files alone, and the policies naming a `remote` source fail closed as
    /// not fetched yet (saying so) until [`PolicyDir::watch`]'s first round has fetched it.
    /// Everything else is decided at once, however slow or silent the remote host is.
    pub async fn open_deferred(
        paths: Vec<PathBuf>,
        settings: Settings,
    ) -> (PolicyDir, Vec<String>) {
        PolicyDir::open_inner(paths, settings, Arc::new(RemoteFetcher::default()), false).await
    }

    async fn open_inner(
        paths: Vec<PathBuf>,
        settings: Settings,
        fetcher: Arc<RemoteFetcher>,
        fetch_first: bool,
    ) -> (PolicyDir, Vec<String>) {
        // Deferred: an empty stamp makes the first watch round reload, fetching the remotes.
        let last_stamp = if fetch_first {
            stamp(&paths)
        } else {
            Stamp::new()
        };
        let tuf = RemoteTuf::new(super::tuf_source::DEFAULT_REFRESH);
        let mut trust_roots = Objects::default();
        let (snapshot, problems, freshness) = match Objects::load_paths(&paths) {
            Ok(mut objects) => {
                trust_roots.trust_roots = objects.trust_roots.clone();
                tuf.fill(&mut objects);
                let remote = if fetch_first {
                    fetcher.resolve(&objects).await
                } else {
                    fetcher.cached(&objects)
                };
                let snapshot = Snapshot::build_with_remote(&objects, settings.clone(), &remote);
                let problems = snapshot.problems.iter().map(ToString::to_string).collect();
                (snapshot, problems, FreshnessCell::fresh())
            }
            Err(errors) => {
                let problems: Vec<String> = errors.iter().map(ToString::to_string).collect();
                let reason = format!(
                    "the policy set could not be loaded ({} problem(s); first: {})",
                    problems.len(),
                    problems.first().map(String::as_str).unwrap_or_default()
                );
                let freshness = FreshnessCell::stale(reason.clone());
                (
                    Snapshot::unusable(settings.clone(), &reason),
                    problems,
                    freshness,
                )
            }
        };
        let dir = PolicyDir {
            paths,
            settings,
            fetcher,
            tuf,
            trust_roots: std::sync::Mutex::new(trust_roots),
            current: ArcSwap::from_pointee(snapshot),
            last_stamp: std::sync::Mutex::new(last_stamp),
            freshness,
        };
        (dir, problems)
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Sets how long verified remote TUF trust is used before it is fetched again.
    pub fn with_tuf_refresh(mut self, refresh: Duration) -> PolicyDir {
        self.tuf = RemoteTuf::new(refresh);
        self
    }

    /// Uses `tuf` for remote TUF trust (its refresh interval and clock).
    pub fn with_remote_tuf(mut self, tuf: RemoteTuf) -> PolicyDir {
        self.tuf = tuf;
        self
    }

    /// Fetches the `remote` TrustRoots of the set in force that are due; when what they
    /// yield changed, rebuilds the snapshot. Returns whether it did.
    pub async fn refresh_tuf(&self) -> bool {
        let roots = {
            let held = self.trust_roots.lock().unwrap_or_else(|p| p.into_inner());
            if !held
                .trust_roots
                .iter()
                .any(|t| t.object.spec.remote.is_some())
            {
                return false;
            }
            Objects {
                trust_roots: held.trust_roots.clone(),
                ..Objects::default()
            }
        };
        if !self.tuf.refresh(&roots).await {
            return false;
        }
        self.last_stamp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        matches!(self.reload_if_changed().await, Ok(true))
    }

    /// Re-reads the paths if any file changed, or if a `remote` policy fetch failed and is due
    /// for another try. `Ok(true)`: a new snapshot is in force, its invalid policies (in
    /// [`Snapshot::problems`]) denying what they cover; `Err`: the files cannot be read and the
    /// previous snapshot stays.
    pub async fn reload_if_changed(&self) -> Result<bool, Vec<String>> {
        let now = stamp(&self.paths);
        {
            let mut last = self.last_stamp.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now && !self.fetcher.retry_due() {
                self.freshness.confirmed();
                return Ok(false);
            }
            *last = now;
        }
        let snapshot = self.load().await.inspect_err(|problems| {
            self.freshness.stale_because(format!(
                "the latest policy change cannot be read and was not applied: {}",
                problems.first().map(String::as_str).unwrap_or_default()
            ))
        })?;
        self.current.store(Arc::new(snapshot));
        self.freshness.synced();
        Ok(true)
    }

    /// The paths' objects, with the verified remote TUF trust and the remote policy texts,
    /// compiled as at start-up (invalid policies kept, denying what they cover).
    async fn load(&self) -> Result<Snapshot, Vec<String>> {
        let mut objects = load_objects(&self.paths)?;
        self.trust_roots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trust_roots = objects.trust_roots.clone();
        self.tuf.fill(&mut objects);
        let remote = self.fetcher.resolve(&objects).await;
        // Compiling parses keys and certificates and verifies `repository` TUF trust: CPU
        // work kept off the runtime workers.
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            Snapshot::build_with_remote(&objects, settings, &remote)
        })
        .await
        .map_err(|e| vec![format!("the policy set could not be compiled: {e}")])
    }

    /// Polls for changes every `interval` until the task is dropped. Polling (rather than
    /// inotify) also sees ConfigMap volume updates, which swap a symlink.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.reload_if_changed().await {
                Ok(true) => {
                    let current = self.current();
                    tracing::info!(
                        fingerprint = current.fingerprint(),
                        policies = current.policies.len(),
                        "policy set reloaded"
                    );
                    for p in &current.problems {
                        tracing::error!(problem = %p, "policy problem: images it concerns are denied until it is fixed");
                    }
                }
                Ok(false) => {}
                Err(problems) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "unreadable policy change ignored; the last good policy set stays in force");
                    }
                }
            }
            if self.refresh_tuf().await {
                tracing::info!(
                    fingerprint = self.current().fingerprint(),
                    "policy set rebuilt with refreshed remote TUF trust"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALLOW: &str = "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: p}\nspec:\n  images: [{glob: \"**\"}]\n  authorities: [{static: {action: pass}}]\n";

    #[tokio::test]
    async fn reload_swaps_valid_changes_and_keeps_last_good() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, ALLOW).unwrap();
        let (source, problems) =
            PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
        assert!(problems.is_empty());
        let first = source.current().fingerprint().to_string();
        assert_eq!(source.reload_if_changed().await, Ok(false));

        std::fs::write(&file, ALLOW.replace("pass", "fail")).unwrap();
        assert_eq!(source.reload_if_changed().await, Ok(true));
        let second = source.current().fingerprint().to_string();
        assert_ne!(first, second);

        std::fs::write(&file, "spec: [broken\n").unwrap();
        assert!(source.reload_if_changed().await.is_err());
        assert_eq!(source.current().fingerprint(), second, "last good stays");
    }

    #[tokio::test]
    async fn invalid_policy_at_start_denies_only_what_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let bad = ALLOW
            .replace("glob: \"**\"", "glob: \"ghcr.io/**\"")
            .replace("pass", "maybe");
        std::fs::write(dir.path().join("p.yaml"), bad).unwrap();
        let (source, problems) =
            PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        let snap = source.current();
        assert_eq!(snap.applicable(&"ghcr.io/a/b:1".parse().unwrap()), [0]);
        assert!(snap
            .applicable(&"quay.io/a/b:1".parse().unwrap())
            .is_empty());
    }

    #[tokio::test]
    async fn unloadable_start_denies_all_but_exempt_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), "{{{").unwrap();
        let (source, problems) =
            PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
        assert_eq!(problems.len(), 1);
        let snap = source.current();
        assert!(snap.is_enforced(Some("default")));
        assert!(!snap.is_enforced(Some("kube-system")));
        let image = "ghcr.io/a/b:1".parse().unwrap();
        assert_eq!(snap.applicable(&image), [0]);
    }
}

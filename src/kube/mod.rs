//! Cluster mode: the policy snapshot kept current from the Kubernetes API server.
//!
//! kube-rs watchers (bookmarks on, relist on 410 Gone, backoff on errors) feed reflector
//! stores for ClusterImagePolicies, TrustRoots, Namespaces, and the ConfigMaps of the
//! controller namespace. No Secret is read: key Secrets reach the snapshot through the public
//! keys the admission shim projects into a ConfigMap (see [`keys`]). On every change the stores
//! are written out as one `v1 List` document (of the ConfigMaps, only `config-policy-controller`
//! and those a CIP's `configMapRef` names; the projection as public-only Secrets), loaded
//! through the same code as a policy directory, `remote` policy
//! sources are fetched (once; see [`crate::policy::remote`]), and the result is compiled into a
//! [`Snapshot`] and swapped in whole. Pulls read only that snapshot: no API call happens during
//! a pull.
//!
//! Each accepted document is also persisted (temp file, fsync, rename) with the remote policy
//! texts it used, and loaded at start, so a node enforces its last known policies while the API
//! server (or a policy's web server) is unreachable. A missing or corrupt snapshot file yields
//! [`Snapshot::unusable`]: fail closed until the first sync.

pub mod keys;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, TypeMeta};
use ::kube::config::{KubeConfigOptions, Kubeconfig};
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::{Client, Config};
use arc_swap::ArcSwap;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

use crate::health::{Freshness, FreshnessCell};
use crate::policy::load::Objects;
use crate::policy::remote::{RemoteFetcher, RemoteKey, RemoteTexts};
use crate::policy::snapshot::{Settings, Snapshot, CONFIG_MAP_NAME};
use crate::policy::source::PolicySource;
use crate::policy::tuf_source::RemoteTuf;
use crate::policy::types::GROUP;

/// Cluster-mode failures that stop a start or a persist; watch errors are retried, not returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("no policy snapshot at {0} yet: every image outside the exempt namespaces is denied until the first sync with the API server")]
    NoSnapshot(PathBuf),
    #[error("not synced with the API server yet: every image outside the exempt namespaces is denied until the first sync")]
    NotSynced,
    #[error("policy snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("policy snapshot {path} is corrupt ({message}); failing closed until the API server answers")]
    Corrupt { path: PathBuf, message: String },
    #[error("policy snapshot could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A client for the cluster `path` (a kubeconfig file) points at.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let err = |message: String| Error::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// How often the API server is asked whether it answers (see [`ClusterSource::heartbeat`]).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// A client from the pod's service account (`/var/run/secrets/kubernetes.io/serviceaccount`
/// and `KUBERNETES_SERVICE_HOST`/`_PORT`), for the admission Deployment.
pub async fn client_in_cluster() -> Result<Client> {
    let err = |message: String| Error::Kubeconfig {
        path: PathBuf::from("(in-cluster service account)"),
        message,
    };
    let config = Config::incluster().map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// The ClusterImagePolicy resource at `version` (`v1beta1` or `v1alpha1`); static, so no
/// discovery request is needed.
pub fn cip_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, version, "ClusterImagePolicy"),
        "clusterimagepolicies",
    )
}

/// The TrustRoot resource (`v1alpha1`).
pub fn trust_root_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1alpha1", "TrustRoot"),
        "trustroots",
    )
}

/// The policy snapshot maintained from the API server.
pub struct ClusterSource {
    settings: Settings,
    /// `None`: nothing is persisted (the admission shim).
    snapshot_file: Option<PathBuf>,
    current: ArcSwap<Snapshot>,
    freshness: FreshnessCell,
    /// Watches that failed and have not been seen working since, with the error.
    broken: Mutex<BTreeMap<&'static str, String>>,
    /// Set once every watch has listed: before that, a rebuild would see half the cluster.
    synced_once: AtomicBool,
    probe_interval: Duration,
    /// Remote policy texts: fetched once, reused by every rebuild.
    fetcher: Arc<RemoteFetcher>,
    /// Remote (TUF) TrustRoots: verified trust, refreshed when due.
    tuf: RemoteTuf,
    /// Whether the objects in force name a `remote` TrustRoot (then refreshes are polled).
    remote_trust: AtomicBool,
}

/// How often `remote` TrustRoots are checked for a due refresh or retry.
const TUF_POLL: Duration = Duration::from_secs(30);

impl PolicySource for ClusterSource {
    fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    fn freshness(&self) -> Freshness {
        self.freshness.get()
    }
}

/// The persisted form: a `v1 List` of the input objects, loadable like a policy file, plus the
/// texts of the remote policy sources in use (checked against their digests when read back).
#[derive(Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListDocument {
    api_version: String,
    kind: String,
    items: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    remote_policies: Vec<PersistedRemote>,
}

#[derive(Serialize, serde::Deserialize)]
struct PersistedRemote {
    url: String,
    sha256sum: String,
    text: String,
}

impl ClusterSource {
    /// Starts from the snapshot persisted at `snapshot_file`. The returned error (missing or
    /// corrupt file) is for the caller to report; the source then denies every image outside the
    /// exempt namespaces until the first sync.
    pub fn open(
        settings: Settings,
        snapshot_file: Option<PathBuf>,
    ) -> (ClusterSource, Option<Error>) {
        ClusterSource::open_with(settings, snapshot_file, Arc::new(RemoteFetcher::default()))
    }

    /// [`ClusterSource::open`] fetching `remote` policy sources through `fetcher` (seeded with
    /// the texts persisted beside the snapshot).
    pub fn open_with(
        settings: Settings,
        snapshot_file: Option<PathBuf>,
        fetcher: Arc<RemoteFetcher>,
    ) -> (ClusterSource, Option<Error>) {
        let loaded = match &snapshot_file {
            Some(path) => load_persisted_with(path, &settings, &fetcher),
            None => Err(Error::NotSynced),
        };
        let (snapshot, problem) = match loaded {
            Ok(snapshot) => (snapshot, None),
            Err(e) => (
                Snapshot::unusable(settings.clone(), &e.to_string()),
                Some(e),
            ),
        };
        let freshness = FreshnessCell::stale(match &problem {
            None => "enforcing the snapshot persisted on disk; not synced with the API server yet"
                .to_string(),
            Some(e) => e.to_string(),
        });
        let source = ClusterSource {
            settings,
            snapshot_file,
            current: ArcSwap::from_pointee(snapshot),
            freshness,
            broken: Mutex::new(BTreeMap::new()),
            synced_once: AtomicBool::new(false),
            probe_interval: PROBE_INTERVAL,
            fetcher,
            tuf: RemoteTuf::new(crate::policy::tuf_source::DEFAULT_REFRESH),
            remote_trust: AtomicBool::new(false),
        };
        (source, problem)
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// How long verified remote TUF trust is used before it is fetched again.
    pub fn with_tuf_refresh(mut self, refresh: Duration) -> ClusterSource {
        self.tuf = RemoteTuf::new(refresh);
        self
    }

    /// How often the API server is probed (default [`PROBE_INTERVAL`]).
    pub fn with_probe_interval(mut self, interval: Duration) -> ClusterSource {
        self.probe_interval = interval.max(Duration::from_millis(100));
        self
    }

    /// Watches the API server and swaps in a new snapshot on every change, until dropped.
    /// The first snapshot from the API server is built only once every watch has listed, so a
    /// half-synced view (e.g. policies without namespace labels) never replaces the disk one.
    pub async fn run(self: Arc<Self>, client: Client) {
        let cip_ar = cip_resource_in_use(&client).await;
        let tr_ar = trust_root_resource();
        let ns = self.settings.controller_namespace.clone();
        let changed = Arc::new(tokio::sync::Notify::new());
        let mut tasks = tokio::task::JoinSet::new();

        let cips_w = reflector::store::Writer::<DynamicObject>::new(cip_ar.clone());
        let cips = cips_w.as_reader();
        let stream = reflector::reflector(
            cips_w,
            watcher(
                Api::<DynamicObject>::all_with(client.clone(), &cip_ar),
                watcher::Config::default(),
            ),
        );
        tasks.spawn(
            self.clone()
                .drive(stream, "ClusterImagePolicy", changed.clone()),
        );

        let trs_w = reflector::store::Writer::<DynamicObject>::new(tr_ar.clone());
        let trust_roots = trs_w.as_reader();
        let stream = reflector::reflector(
            trs_w,
            watcher(
                Api::<DynamicObject>::all_with(client.clone(), &tr_ar),
                watcher::Config::default(),
            ),
        );
        tasks.spawn(self.clone().drive(stream, "TrustRoot", changed.clone()));

        let (namespaces, w) = reflector::store::<Namespace>();
        let stream = reflector::reflector(
            w,
            watcher(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
            ),
        );
        tasks.spawn(self.clone().drive(stream, "Namespace", changed.clone()));

        let (config_maps, w) = reflector::store::<ConfigMap>();
        let stream = reflector::reflector(
            w,
            watcher(
                Api::<ConfigMap>::namespaced(client.clone(), &ns),
                // All of them: `configMapRef` policies may name any ConfigMap of the namespace,
                // and the projected public keys are one. The document keeps only those in use.
                watcher::Config::default(),
            ),
        );
        tasks.spawn(self.clone().drive(stream, "ConfigMap", changed.clone()));

        let stores = Stores {
            cips,
            cip_ar,
            trust_roots,
            tr_ar,
            namespaces,
            config_maps,
            controller_namespace: ns.clone(),
        };
        tasks.spawn(self.clone().heartbeat(client.clone(), stores.probes()));
        if stores.wait_until_ready().await.is_err() {
            return;
        }
        self.synced_once.store(true, Ordering::Release);
        loop {
            self.rebuild(&stores).await;
            loop {
                // A remote policy that could not be fetched is tried again by a later rebuild;
                // remote TrustRoots are polled for a due refresh.
                let retry = self.fetcher.retry_in();
                let poll = self
                    .remote_trust
                    .load(Ordering::Acquire)
                    .then_some(TUF_POLL);
                let Some(wait) = retry.into_iter().chain(poll).min() else {
                    changed.notified().await;
                    break;
                };
                tokio::select! {
                    _ = changed.notified() => break,
                    _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
                }
                if retry.is_some() || self.refresh_tuf(&stores).await {
                    break;
                }
            }
            // Coalesce a burst (a relist, a kubectl apply of many objects) into one rebuild.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fetches the `remote` TrustRoots that are due; whether what they yield changed.
    async fn refresh_tuf(&self, stores: &Stores) -> bool {
        let Ok(text) = serde_json::to_string(&stores.document()) else {
            return false;
        };
        match objects_from_text(&text, "API server") {
            Ok((objects, _)) => self.tuf.refresh(&objects).await,
            Err(_) => false,
        }
    }

    async fn rebuild(&self, stores: &Stores) {
        let mut document = stores.document();
        let text = match serde_json::to_string(&document) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "policy objects could not be encoded; the last snapshot stays in force");
                return;
            }
        };
        let built = match objects_from_text(&text, "API server") {
            Ok((mut objects, _)) => {
                let remote_trust = objects
                    .trust_roots
                    .iter()
                    .any(|t| t.object.spec.remote.is_some());
                self.remote_trust.store(remote_trust, Ordering::Release);
                self.tuf.refresh(&objects).await;
                self.tuf.fill(&mut objects);
                let remote = self.fetcher.resolve(&objects).await;
                Ok((
                    Snapshot::build_with_remote(&objects, self.settings.clone(), &remote),
                    remote,
                ))
            }
            Err(problems) => Err(problems),
        };
        let (snapshot, remote) = match built {
            Ok(s) => s,
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "invalid policy change ignored; the last good policy set stays in force");
                }
                self.freshness.stale_because(format!(
                    "the latest policy objects could not be loaded: {}",
                    problems.first().map(String::as_str).unwrap_or_default()
                ));
                return;
            }
        };
        for p in &snapshot.problems {
            tracing::error!(problem = %p, "policy problem: images it concerns are denied until it is fixed");
        }
        tracing::info!(
            fingerprint = snapshot.fingerprint(),
            policies = snapshot.policies.len(),
            "policy set synced from the API server"
        );
        self.current.store(Arc::new(snapshot));
        self.mark_synced_if_healthy();
        let Some(path) = &self.snapshot_file else {
            return;
        };
        document.remote_policies = remote
            .texts()
            .map(|(key, text)| PersistedRemote {
                url: key.url.clone(),
                sha256sum: key.sha256sum.clone(),
                text: text.to_string(),
            })
            .collect();
        let text = match serde_json::to_string(&document) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "policy snapshot not persisted: it could not be encoded");
                return;
            }
        };
        if let Err(e) = persist(path, text.as_bytes()) {
            tracing::error!(error = %e, "policy snapshot not persisted; a restart without the API server would fall back to the previous file");
        }
    }
}

struct Stores {
    cips: Store<DynamicObject>,
    cip_ar: ApiResource,
    trust_roots: Store<DynamicObject>,
    tr_ar: ApiResource,
    namespaces: Store<Namespace>,
    config_maps: Store<ConfigMap>,
    controller_namespace: String,
}

impl Stores {
    /// What [`ClusterSource::heartbeat`] lists for each watch.
    fn probes(&self) -> Vec<(&'static str, ApiResource, Option<String>)> {
        vec![
            ("ClusterImagePolicy", self.cip_ar.clone(), None),
            ("TrustRoot", self.tr_ar.clone(), None),
            ("Namespace", ApiResource::erase::<Namespace>(&()), None),
            (
                "ConfigMap",
                ApiResource::erase::<ConfigMap>(&()),
                Some(self.controller_namespace.clone()),
            ),
        ]
    }

    async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.cips.wait_until_ready().await?;
        self.trust_roots.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await
    }

    /// The stores as one `v1 List` document, sorted so equal content encodes equally.
    fn document(&self) -> ListDocument {
        let mut items = Vec::new();
        let dynamic = |store: &Store<DynamicObject>, ar: &ApiResource| {
            let mut objects: Vec<DynamicObject> = store
                .state()
                .iter()
                .map(|o| {
                    let mut o = DynamicObject::clone(o);
                    o.types = Some(TypeMeta {
                        api_version: ar.api_version.clone(),
                        kind: ar.kind.clone(),
                    });
                    o.metadata = slim(&o.metadata);
                    o
                })
                .collect();
            objects.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            objects
        };
        let mut push = |value: Result<serde_json::Value, serde_json::Error>| match value {
            Ok(v) => items.push(v),
            Err(e) => tracing::error!(error = %e, "object could not be encoded"),
        };
        for o in dynamic(&self.cips, &self.cip_ar) {
            push(serde_json::to_value(o));
        }
        for o in dynamic(&self.trust_roots, &self.tr_ar) {
            push(serde_json::to_value(o));
        }
        let mut namespaces: Vec<Namespace> = self
            .namespaces
            .state()
            .iter()
            .map(|ns| Namespace {
                metadata: slim(&ns.metadata),
                ..Namespace::default()
            })
            .collect();
        namespaces.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for o in namespaces {
            push(serde_json::to_value(o));
        }
        // Key Secrets: only the public keys the admission shim projected (see [`keys`]).
        let mut secrets: Vec<_> = self
            .config_maps
            .state()
            .iter()
            .filter(|c| c.metadata.name.as_deref() == Some(keys::PROJECTION_NAME))
            .flat_map(|c| keys::secrets_from_projection(c, &self.controller_namespace))
            .collect();
        secrets.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        let projected: std::collections::BTreeSet<&str> = secrets
            .iter()
            .filter_map(|s| s.metadata.name.as_deref())
            .collect();
        for name in keys::referenced_secrets(&self.cips.state()) {
            if !projected.contains(name.as_str()) {
                tracing::warn!(
                    secret = %format!("{}/{name}", self.controller_namespace),
                    configmap = %format!("{}/{}", self.controller_namespace, keys::PROJECTION_NAME),
                    "a ClusterImagePolicy names a key Secret whose public keys are not projected (yet): its images are denied. Is the admission shim running?"
                );
            }
        }
        for o in secrets {
            push(serde_json::to_value(o));
        }
        // Only what a snapshot reads: the controller config and the ConfigMaps policies name.
        let referenced = referenced_config_maps(&self.cips.state(), &self.controller_namespace);
        let mut config_maps: Vec<ConfigMap> = self
            .config_maps
            .state()
            .iter()
            .filter(|c| {
                c.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n == CONFIG_MAP_NAME || referenced.contains(n))
            })
            .map(|c| ConfigMap {
                metadata: slim(&c.metadata),
                ..ConfigMap::clone(c)
            })
            .collect();
        config_maps.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        for o in config_maps {
            push(serde_json::to_value(o));
        }
        ListDocument {
            api_version: "v1".to_string(),
            kind: "List".to_string(),
            items,
            remote_policies: Vec::new(),
        }
    }
}

/// Names of the controller-namespace ConfigMaps that CIP policies name with `configMapRef`
/// (CIP-level `spec.policy` and attestation policies).
fn referenced_config_maps(
    cips: &[Arc<DynamicObject>],
    controller_namespace: &str,
) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut add = |policy: &serde_json::Value| {
        let Some(r) = policy.get("configMapRef") else {
            return;
        };
        let ns = r
            .get("namespace")
            .and_then(|n| n.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or(controller_namespace);
        if let Some(name) = r.get("name").and_then(|n| n.as_str()) {
            if ns == controller_namespace {
                names.insert(name.to_string());
            }
        }
    };
    for cip in cips {
        let spec = &cip.data["spec"];
        add(&spec["policy"]);
        for authority in spec["authorities"].as_array().into_iter().flatten() {
            for at in authority["attestations"].as_array().into_iter().flatten() {
                add(&at["policy"]);
            }
        }
    }
    names
}

/// Only what a decision reads: name, namespace, labels. Resource versions and managed fields
/// would change the persisted file on every no-op update.
fn slim(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        labels: meta.labels.clone(),
        ..ObjectMeta::default()
    }
}

impl ClusterSource {
    /// Forwards a reflector's events as "something changed", and keeps track of which watches
    /// are failing: any of them failing makes the snapshot stale. Errors are retried with backoff.
    async fn drive<K, S>(
        self: Arc<Self>,
        stream: S,
        resource: &'static str,
        changed: Arc<tokio::sync::Notify>,
    ) where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    {
        let stream = stream.default_backoff();
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    self.watch_working(resource);
                    if matches!(
                        event,
                        watcher::Event::Apply(_)
                            | watcher::Event::Delete(_)
                            | watcher::Event::InitDone
                    ) {
                        changed.notify_one()
                    }
                }
                // 410 Gone: history compacted; the watcher relists, which is routine.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::debug!(resource, "watch expired; relisting")
                }
                Err(e) => {
                    tracing::warn!(
                        resource,
                        error = %e,
                        "watch failed; retrying with backoff, the last snapshot stays in force"
                    );
                    self.watch_broken(resource, e.to_string());
                }
            }
        }
    }

    fn watch_broken(&self, resource: &'static str, error: String) {
        let reason = format!("watch of {resource} failing: {error}");
        self.lock_broken().entry(resource).or_insert(error);
        self.freshness.stale_because(reason);
    }

    fn watch_working(&self, resource: &'static str) {
        if self.lock_broken().remove(resource).is_some() {
            tracing::info!(resource, "watch working again");
            self.mark_synced_if_healthy();
        }
    }

    /// Fresh again once the first full sync happened and no watch is failing.
    fn mark_synced_if_healthy(&self) {
        if self.synced_once.load(Ordering::Acquire) && self.lock_broken().is_empty() {
            self.freshness.synced();
        }
    }

    fn lock_broken(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.broken.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps freshness honest where watch events cannot: a watch that recovers without
    /// anything changing yields no event, and kube-rs reads an error answer to a watch request
    /// (a 503 from an API server restarting) as an empty watch, so no error event either.
    /// Every `probe_interval`, a one-item LIST served from the API server's cache
    /// (`resourceVersion=0`, cheap even with thousands of nodes) says whether it answers, and
    /// each watch marked failing is checked the same way. Its watch resumes on its own.
    async fn heartbeat(
        self: Arc<Self>,
        client: Client,
        probes: Vec<(&'static str, ApiResource, Option<String>)>,
    ) {
        let mut ticker = tokio::time::interval(self.probe_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(e) = answers(&client, &probes, "Namespace", self.probe_interval).await {
                tracing::warn!(error = %e, "API server not answering; the last snapshot stays in force");
                self.freshness
                    .stale_because(format!("the API server is not answering: {e}"));
                continue;
            }
            let broken: Vec<&'static str> = self.lock_broken().keys().copied().collect();
            for resource in broken {
                if answers(&client, &probes, resource, self.probe_interval)
                    .await
                    .is_ok()
                {
                    self.watch_working(resource);
                }
            }
            self.mark_synced_if_healthy();
        }
    }
}

/// Whether the API server answers a one-item LIST of `resource` from its cache.
async fn answers(
    client: &Client,
    probes: &[(&'static str, ApiResource, Option<String>)],
    resource: &'static str,
    timeout: Duration,
) -> Result<(), String> {
    let Some((_, ar, namespace)) = probes.iter().find(|(r, _, _)| *r == resource) else {
        return Ok(());
    };
    let api = match namespace {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar),
        None => Api::<DynamicObject>::all_with(client.clone(), ar),
    };
    let params = ListParams::default().limit(1).match_any();
    match tokio::time::timeout(timeout, api.list_metadata(&params)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".to_string()),
    }
}

/// `v1beta1` when the API server serves it, else `v1alpha1`. Retries while the API server
/// cannot be asked; the disk snapshot stays in force meanwhile.
async fn cip_resource_in_use(client: &Client) -> ApiResource {
    let mut delay = Duration::from_millis(500);
    loop {
        let beta = cip_resource("v1beta1");
        let api = Api::<DynamicObject>::all_with(client.clone(), &beta);
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => return beta,
            Err(::kube::Error::Api(status)) if status.code == 404 => {
                tracing::info!("the API server has no policy.sigstore.dev/v1beta1; watching v1alpha1 ClusterImagePolicies");
                return cip_resource("v1alpha1");
            }
            Err(e) => {
                tracing::warn!(error = %e, "API server not answering; the last snapshot stays in force");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The objects of a persisted (or about to be persisted) document, and its remote texts.
fn objects_from_text(
    text: &str,
    origin: &str,
) -> Result<(Objects, Vec<PersistedRemote>), Vec<String>> {
    let document: ListDocument = serde_json::from_str(text).map_err(|e| vec![e.to_string()])?;
    if document.api_version != "v1" || document.kind != "List" {
        return Err(vec![format!(
            "expected apiVersion v1, kind List; found {:?} {:?}",
            document.api_version, document.kind
        )]);
    }
    let mut objects = Objects::default();
    objects
        .load_str(text, origin)
        .map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    Ok((objects, document.remote_policies))
}

/// Loads the snapshot persisted at `path`.
pub fn load_persisted(path: &Path, settings: &Settings) -> Result<Snapshot> {
    load_persisted_with(path, settings, &RemoteFetcher::default())
}

/// Loads the snapshot persisted at `path`; the remote policy texts persisted with it that
/// still match their digests seed `fetcher` (so they are not fetched again) and are used.
pub fn load_persisted_with(
    path: &Path,
    settings: &Settings,
    fetcher: &RemoteFetcher,
) -> Result<Snapshot> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoSnapshot(path.to_path_buf()))
        }
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let (objects, persisted) =
        objects_from_text(&text, &path.display().to_string()).map_err(|problems| {
            Error::Corrupt {
                path: path.to_path_buf(),
                message: problems.join("; "),
            }
        })?;
    for p in persisted {
        let key = RemoteKey::new(&p.url, &p.sha256sum);
        if let Err(e) = fetcher.seed(key, &p.text) {
            // Not trusted, so not used: the policy naming it waits for a fresh fetch.
            tracing::warn!(problem = %e, "persisted remote policy text ignored");
        }
    }
    let remote: RemoteTexts = fetcher.cached(&objects);
    Ok(Snapshot::build_with_remote(
        &objects,
        settings.clone(),
        &remote,
    ))
}

/// Writes `bytes` to `path` atomically: a reader (or a crash) sees the old file or the new
/// one, never a mix.
pub fn persist(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // The file holds the controller namespace's Secrets: readable by root only. Created new
    // (a stale temp file from a crash is removed first), so a symlink planted at the temp path
    // is never followed: `O_EXCL` refuses it.
    let _ = std::fs::remove_file(&tmp);
    let mut file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?
    };
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename is durable once the directory is; not every filesystem lets a directory be
    // synced, so this one is best effort.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persisted_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/snapshot.json");
        let settings = Settings::default();
        assert!(matches!(
            load_persisted(&file, &settings),
            Err(Error::NoSnapshot(_))
        ));
        let doc = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"policy.sigstore.dev/v1beta1","kind":"ClusterImagePolicy","metadata":{"name":"p"},"spec":{"images":[{"glob":"**"}],"authorities":[{"static":{"action":"pass"}}]}}]}"#;
        persist(&file, doc.as_bytes()).unwrap();
        let snap = load_persisted(&file, &settings).unwrap();
        assert_eq!(snap.policies.len(), 1);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&file, &doc[..40]).unwrap();
        assert!(matches!(
            load_persisted(&file, &settings),
            Err(Error::Corrupt { .. })
        ));
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            load_persisted(&file, &settings),
            Err(Error::Corrupt { .. })
        ));
    }
}

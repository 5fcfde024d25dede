//! Public-key projection: nodes resolve `key.secretRef` without reading any Secret.
//!
//! `cosign generate-key-pair k8s://cosign-system/NAME` writes `cosign.key` (the encrypted
//! private key) and `cosign.password` into the same Secret as `cosign.pub`. Kubernetes RBAC
//! grants Secrets whole: whoever may read `cosign.pub` may read `cosign.key`. So nodes, whose
//! service-account token sits on every host's disk, are granted no Secret at all.
//!
//! Instead the admission shim (a cluster-side Deployment) runs a [`KeyProjector`]: it watches
//! the controller namespace's Secrets, and for each Secret a ClusterImagePolicy names with
//! `secretRef` (in `key` or `keyless.ca-cert`) it keeps only the PEM blocks that parse as
//! public keys or certificates, re-encoded from their DER (no headers, no neighbouring text),
//! and writes them into the one ConfigMap [`PROJECTION_NAME`] of the controller namespace.
//! The node reads that ConfigMap (it already watches the namespace's ConfigMaps for
//! `configMapRef` policies) and turns it back into public-only Secrets
//! ([`secrets_from_projection`]), so policy evaluation is unchanged and CIPs keep their
//! `secretRef` YAML.
//!
//! The ConfigMap lives in the controller namespace because that namespace is already the
//! trust boundary: whoever may write its ConfigMaps may already rewrite
//! `config-policy-controller` and every `configMapRef` policy. Its layout cannot be confused:
//! the data key is the Secret's name (unique in the namespace), the value a JSON document that
//! names its Secret again (checked by the node) and maps each Secret entry to its public PEM.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, ApiResource, DynamicObject, PostParams};
use ::kube::runtime::reflector::{self, Store};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::Client;
use base64::Engine as _;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// The ConfigMap (in the controller namespace) that holds the projected public keys.
pub const PROJECTION_NAME: &str = "pullgate-public-keys";

/// A Secret entry larger than this is not read (key Secrets hold a few KiB).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// A Secret whose projection is larger than this is left out (its policies fail closed).
pub const MAX_SECRET_PROJECTION_BYTES: usize = 64 * 1024;
/// The whole projection stays well below the API server's 1 MiB object limit.
pub const MAX_PROJECTION_BYTES: usize = 512 * 1024;
/// PEM blocks read from one entry at most.
const MAX_BLOCKS_PER_ENTRY: usize = 32;

/// What one Secret contributes: its public PEM per entry, and what was withheld.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Projected {
    /// Entry name → public keys and certificates, PEM, re-encoded from DER.
    pub entries: BTreeMap<String, String>,
    /// Entries holding private key material (never copied).
    pub private_entries: Vec<String>,
    /// Why entries that looked public were dropped (unparseable, too large).
    pub problems: Vec<String>,
}

/// The JSON value stored under a Secret's name in the projection ConfigMap.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectedSecret {
    /// `namespace/name` of the Secret it came from.
    pub secret: String,
    /// Secret entry name → PEM public keys / certificates.
    pub entries: BTreeMap<String, String>,
    /// Entries left out because they hold private keys (names only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withheld_private: Vec<String>,
}

/// Only the public material of `secret`.
pub fn project_secret(secret: &Secret) -> Projected {
    let mut out = Projected::default();
    let mut values: BTreeMap<&str, &[u8]> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        values.insert(k, &v.0);
    }
    for (k, v) in secret.string_data.iter().flatten() {
        values.insert(k, v.as_bytes());
    }
    for (entry, bytes) in values {
        if entry == "cosign.key" || looks_private(bytes) {
            out.private_entries.push(entry.to_string());
        }
        if bytes.len() > MAX_ENTRY_BYTES {
            out.problems.push(format!(
                "entry {entry:?} is {} bytes, over the {MAX_ENTRY_BYTES}-byte limit; not read",
                bytes.len()
            ));
            continue;
        }
        let Ok(text) = std::str::from_utf8(bytes) else {
            continue;
        };
        match public_pem(text) {
            Ok(Some(pem)) => {
                out.entries.insert(entry.to_string(), pem);
            }
            Ok(None) => {}
            Err(e) => out.problems.push(format!("entry {entry:?}: {e}")),
        }
    }
    out
}

/// Whether `bytes` carries a PEM private key of any kind (`PRIVATE KEY`, `EC PRIVATE KEY`,
/// `ENCRYPTED SIGSTORE PRIVATE KEY`, `ENCRYPTED COSIGN PRIVATE KEY`, …).
fn looks_private(bytes: &[u8]) -> bool {
    let marker = b"PRIVATE KEY-----";
    bytes.windows(marker.len()).any(|w| w == marker)
}

/// The public keys and certificates among the PEM blocks of `text`, each checked by parsing
/// and written back from its DER; `None` when there are none. Every other block (private
/// keys, unknown labels) and everything between blocks is dropped.
fn public_pem(text: &str) -> Result<Option<String>, String> {
    use x509_cert::der::{Decode as _, Encode as _};

    let mut out = String::new();
    let mut seen = 0;
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        else {
            continue;
        };
        seen += 1;
        if seen > MAX_BLOCKS_PER_ENTRY {
            return Err(format!("more than {MAX_BLOCKS_PER_ENTRY} PEM blocks"));
        }
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut closed = false;
        for l in lines.by_ref() {
            if l == end {
                closed = true;
                break;
            }
            // Encapsulated headers (`Proc-Type: …`) belong to encrypted legacy keys only.
            if !l.contains(':') {
                body.push_str(l);
            }
        }
        if !closed {
            return Err(format!("PEM block {label:?} is not closed"));
        }
        let (out_label, der) = match label {
            "PUBLIC KEY" | "RSA PUBLIC KEY" => {
                let block = format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n");
                let keys = crate::verify::keys::parse_pem_keys(&block)
                    .map_err(|e| format!("{label}: {e}"))?;
                let der = keys
                    .first()
                    .map(|k| k.spki_der().to_vec())
                    .ok_or_else(|| format!("{label}: no key"))?;
                ("PUBLIC KEY", der)
            }
            "CERTIFICATE" => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(&body)
                    .map_err(|e| format!("CERTIFICATE: {e}"))?;
                let cert = x509_cert::Certificate::from_der(&der)
                    .map_err(|e| format!("CERTIFICATE: {e}"))?;
                let der = cert.to_der().map_err(|e| format!("CERTIFICATE: {e}"))?;
                ("CERTIFICATE", der)
            }
            _ => continue,
        };
        out.push_str(&pem_encode(out_label, &der));
    }
    Ok((!out.is_empty()).then_some(out))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Names of the controller-namespace Secrets that CIPs name with `secretRef` (`key` and
/// `keyless.ca-cert`; the reference's namespace is ignored, as policy-controller does).
pub fn referenced_secrets(cips: &[Arc<DynamicObject>]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for cip in cips {
        for authority in cip.data["spec"]["authorities"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for r in [
                &authority["key"]["secretRef"],
                &authority["keyless"]["ca-cert"]["secretRef"],
            ] {
                if let Some(name) = r["name"].as_str().filter(|n| !n.is_empty()) {
                    names.insert(name.to_string());
                }
            }
        }
    }
    names
}

/// The projection ConfigMap's `data`: one JSON value per referenced Secret that holds public
/// material, within the size limits (what does not fit is left out and reported).
pub fn projection_data(
    namespace: &str,
    referenced: &BTreeSet<String>,
    projected: &BTreeMap<String, Projected>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut data = BTreeMap::new();
    let mut problems = Vec::new();
    let mut total = 0usize;
    for name in referenced {
        let Some(p) = projected.get(name) else {
            problems.push(format!(
                "Secret {namespace}/{name} named by a ClusterImagePolicy does not exist"
            ));
            continue;
        };
        if p.entries.is_empty() {
            problems.push(format!(
                "Secret {namespace}/{name} holds no public key or certificate"
            ));
            continue;
        }
        let value = ProjectedSecret {
            secret: format!("{namespace}/{name}"),
            entries: p.entries.clone(),
            withheld_private: p.private_entries.clone(),
        };
        let Ok(text) = serde_json::to_string(&value) else {
            continue;
        };
        if text.len() > MAX_SECRET_PROJECTION_BYTES {
            problems.push(format!(
                "Secret {namespace}/{name}: its public keys take {} bytes, over the {MAX_SECRET_PROJECTION_BYTES}-byte limit; not projected",
                text.len()
            ));
            continue;
        }
        if total + text.len() + name.len() > MAX_PROJECTION_BYTES {
            problems.push(format!(
                "Secret {namespace}/{name}: the projection would exceed {MAX_PROJECTION_BYTES} bytes; not projected"
            ));
            continue;
        }
        total += text.len() + name.len();
        data.insert(name.clone(), text);
    }
    (data, problems)
}

/// The public-only Secrets a node builds its snapshot from: one per valid value of the
/// projection ConfigMap. A value that does not name its own key's Secret, or that is not the
/// expected JSON, is skipped with a warning (its policies then fail closed: Secret not found);
/// every entry is filtered through [`public_pem`] again, so nothing but public material gets
/// in even if someone else wrote the ConfigMap.
pub fn secrets_from_projection(config_map: &ConfigMap, namespace: &str) -> Vec<Secret> {
    let mut out = Vec::new();
    for (name, value) in config_map.data.iter().flatten() {
        let parsed: ProjectedSecret = match serde_json::from_str(value) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(configmap = PROJECTION_NAME, key = %name.escape_debug(), error = %e, "projected key entry ignored: not a projection");
                continue;
            }
        };
        if parsed.secret != format!("{namespace}/{name}") {
            tracing::warn!(configmap = PROJECTION_NAME, key = %name.escape_debug(), names = %parsed.secret.escape_debug(), "projected key entry ignored: it names another Secret");
            continue;
        }
        let data: BTreeMap<String, ByteString> = parsed
            .entries
            .into_iter()
            .filter_map(|(entry, pem)| match public_pem(&pem) {
                Ok(Some(p)) => Some((entry, ByteString(p.into_bytes()))),
                _ => None,
            })
            .collect();
        out.push(Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..Secret::default()
        });
    }
    out
}

/// Keeps [`PROJECTION_NAME`] in step with the key Secrets CIPs name. Runs in the admission
/// Deployment; needs list/watch of Secrets in the controller namespace and get/update of that
/// one ConfigMap (which the manifests create: the projector never creates objects).
pub struct KeyProjector {
    client: Client,
    namespace: String,
    metrics: Option<Arc<Metrics>>,
    resync: Duration,
}

impl KeyProjector {
    pub fn new(client: Client, namespace: String, metrics: Option<Arc<Metrics>>) -> KeyProjector {
        KeyProjector {
            client,
            namespace,
            metrics,
            resync: RESYNC,
        }
    }

    /// How often the ConfigMap is compared with what it should hold (default 60 s).
    pub fn with_resync(mut self, every: Duration) -> KeyProjector {
        self.resync = every.max(Duration::from_millis(100));
        self
    }

    /// Watches until dropped; errors are logged and retried.
    pub async fn run(self) {
        let cip_ar: ApiResource = super::cip_resource_in_use(&self.client).await;
        let changed = Arc::new(tokio::sync::Notify::new());

        let cips_w = reflector::store::Writer::<DynamicObject>::new(cip_ar.clone());
        let cips: Store<DynamicObject> = cips_w.as_reader();
        let stream = reflector::reflector(
            cips_w,
            watcher(
                Api::<DynamicObject>::all_with(self.client.clone(), &cip_ar),
                watcher::Config::default(),
            ),
        );
        let notify = changed.clone();
        let cip_task = tokio::spawn(async move {
            let stream = stream.default_backoff();
            futures_util::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(_) => notify.notify_one(),
                    Err(e) => {
                        tracing::warn!(error = %e, "key projector: ClusterImagePolicy watch failed; retrying")
                    }
                }
            }
        });

        // No reflector for Secrets: only the projection of each is kept, so private keys are
        // in memory only while one event is handled.
        let projected: Arc<std::sync::Mutex<BTreeMap<String, Projected>>> = Arc::default();
        let secrets = watcher(
            Api::<Secret>::namespaced(self.client.clone(), &self.namespace),
            watcher::Config::default(),
        )
        .default_backoff();
        let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (state, notify, done) = (projected.clone(), changed.clone(), listed.clone());
        let secret_task = tokio::spawn(async move {
            futures_util::pin_mut!(secrets);
            let mut relist: Option<BTreeMap<String, Projected>> = None;
            while let Some(event) = secrets.next().await {
                let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
                match event {
                    Ok(watcher::Event::Init) => relist = Some(BTreeMap::new()),
                    Ok(watcher::Event::InitApply(s)) => {
                        if let (Some(buffer), Some(name)) = (&mut relist, s.metadata.name.clone()) {
                            buffer.insert(name, project_secret(&s));
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        *lock() = relist.take().unwrap_or_default();
                        done.store(true, std::sync::atomic::Ordering::Release);
                        notify.notify_one();
                    }
                    Ok(watcher::Event::Apply(s)) => {
                        if let Some(name) = s.metadata.name.clone() {
                            lock().insert(name, project_secret(&s));
                            notify.notify_one();
                        }
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        if let Some(name) = &s.metadata.name {
                            lock().remove(name);
                            notify.notify_one();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "key projector: Secret watch failed; retrying")
                    }
                }
            }
        });

        // The ConfigMap is not watched: a periodic pass puts back what someone else changed.
        let (notify, every) = (changed.clone(), self.resync);
        let resync_task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            loop {
                ticker.tick().await;
                notify.notify_one();
            }
        });
        let api = Api::<ConfigMap>::namespaced(self.client.clone(), &self.namespace);
        let mut reported: Option<Report> = None;
        loop {
            changed.notified().await;
            // Coalesce bursts (a relist, many applies).
            tokio::time::sleep(Duration::from_millis(100)).await;
            if cips.wait_until_ready().await.is_err() {
                break;
            }
            // Before the Secrets are listed every key would look missing.
            if !listed.load(std::sync::atomic::Ordering::Acquire) {
                continue;
            }
            let referenced = referenced_secrets(&cips.state());
            let (data, report) = {
                let projected = projected.lock().unwrap_or_else(|p| p.into_inner());
                let (data, mut problems) =
                    projection_data(&self.namespace, &referenced, &projected);
                let mut private = Vec::new();
                for name in &referenced {
                    let Some(p) = projected.get(name) else {
                        continue;
                    };
                    if !p.private_entries.is_empty() {
                        private.push((name.clone(), p.private_entries.join(",")));
                    }
                    problems.extend(
                        p.problems
                            .iter()
                            .map(|problem| format!("Secret {}/{name}: {problem}", self.namespace)),
                    );
                }
                (data, Report { private, problems })
            };
            if let Some(m) = &self.metrics {
                m.set_key_secrets_with_private_keys(report.private.len());
            }
            // Logged when what there is to say changes, not on every pass.
            if reported.as_ref() != Some(&report) {
                for (name, entries) in &report.private {
                    tracing::warn!(
                        secret = %format!("{}/{name}", self.namespace),
                        entries = %entries,
                        "SIGNING KEY EXPOSED: a Secret named by a ClusterImagePolicy holds a private key; \
                         only its public key is projected to nodes, but anyone who can read this Secret can sign \
                         images. Keep private keys out of the cluster (e.g. `cosign public-key` into a separate Secret)"
                    );
                }
                for p in &report.problems {
                    tracing::warn!(problem = %p, "key Secret not (fully) projected; policies naming it deny until it is");
                }
                reported = Some(report);
            }
            match write(&api, &data).await {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    secrets = data.len(),
                    configmap = %format!("{}/{PROJECTION_NAME}", self.namespace),
                    "public keys projected"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, configmap = %format!("{}/{PROJECTION_NAME}", self.namespace), "public keys not projected; retrying");
                    let notify = changed.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        notify.notify_one();
                    });
                }
            }
        }
        resync_task.abort();
        cip_task.abort();
        secret_task.abort();
    }
}

/// What the projector warns about; logged again only when it changes.
#[derive(PartialEq)]
struct Report {
    /// (Secret name, entries holding private keys).
    private: Vec<(String, String)>,
    problems: Vec<String>,
}

/// How often the projection is compared with what it should hold even without a change.
const RESYNC: Duration = Duration::from_secs(60);

/// Replaces the projection's data when it differs (read-modify-write with the resourceVersion
/// read: a concurrent writer, such as the other replica, makes it fail with a conflict and the
/// caller retries); whether it wrote.
async fn write(api: &Api<ConfigMap>, data: &BTreeMap<String, String>) -> Result<bool, String> {
    let mut cm = api.get(PROJECTION_NAME).await.map_err(|e| match e {
        ::kube::Error::Api(s) if s.code == 404 => format!(
            "ConfigMap {PROJECTION_NAME} does not exist: apply deploy/ (the projector only updates it)"
        ),
        e => e.to_string(),
    })?;
    let current = cm.data.clone().unwrap_or_default();
    if &current == data && cm.binary_data.as_ref().is_none_or(|b| b.is_empty()) {
        return Ok(false);
    }
    cm.data = Some(data.clone());
    cm.binary_data = None;
    api.replace(PROJECTION_NAME, &PostParams::default(), &cm)
        .await
        .map(|_| true)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\neyJrZGYiOnt9fQ==\n-----END ENCRYPTED SIGSTORE PRIVATE KEY-----\n";

    fn public() -> String {
        use p256::pkcs8::EncodePublicKey as _;
        let key = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        key.public_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
    }

    fn secret(entries: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("k".into()),
                ..ObjectMeta::default()
            },
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn only_public_blocks_survive() {
        let pubkey = public();
        // A private key hidden in the same entry as the public key, text around it.
        let mixed = format!("comment\n{PRIVATE}{pubkey}trailer password=hunter2\n");
        let p = project_secret(&secret(&[
            ("cosign.pub", &mixed),
            ("cosign.key", PRIVATE),
            ("cosign.password", "hunter2"),
        ]));
        assert_eq!(p.private_entries, vec!["cosign.key", "cosign.pub"]);
        assert_eq!(p.entries.len(), 1, "{p:?}");
        let kept = &p.entries["cosign.pub"];
        assert!(
            !kept.contains("PRIVATE") && !kept.contains("hunter2") && !kept.contains("comment")
        );
        assert_eq!(
            crate::verify::keys::parse_pem_keys(kept).unwrap(),
            crate::verify::keys::parse_pem_keys(&pubkey).unwrap()
        );
    }

    #[test]
    fn garbage_labelled_public_is_refused_and_size_is_bounded() {
        let fake = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        let p = project_secret(&secret(&[("cosign.pub", fake)]));
        assert!(p.entries.is_empty() && p.problems.len() == 1, "{p:?}");
        let huge = public().repeat(MAX_ENTRY_BYTES / 100);
        let p = project_secret(&secret(&[("cosign.pub", &huge)]));
        assert!(p.entries.is_empty(), "{p:?}");
        assert!(p.problems[0].contains("limit"), "{p:?}");
    }

    #[test]
    fn node_checks_the_projection_it_reads() {
        let ns = "cosign-system";
        let good = ProjectedSecret {
            secret: format!("{ns}/a"),
            entries: BTreeMap::from([("cosign.pub".to_string(), public())]),
            withheld_private: vec![],
        };
        // Entry "b" claims to be Secret "a": a rename trick; ignored.
        let wrong = ProjectedSecret {
            secret: format!("{ns}/a"),
            entries: good.entries.clone(),
            withheld_private: vec![],
        };
        // Entry "c" carries a private key someone wrote by hand: filtered out.
        let tampered = ProjectedSecret {
            secret: format!("{ns}/c"),
            entries: BTreeMap::from([("cosign.key".to_string(), PRIVATE.to_string())]),
            withheld_private: vec![],
        };
        let cm = ConfigMap {
            data: Some(BTreeMap::from([
                ("a".to_string(), serde_json::to_string(&good).unwrap()),
                ("b".to_string(), serde_json::to_string(&wrong).unwrap()),
                ("c".to_string(), serde_json::to_string(&tampered).unwrap()),
                ("d".to_string(), "not json".to_string()),
            ])),
            ..ConfigMap::default()
        };
        let secrets = secrets_from_projection(&cm, ns);
        let names: Vec<_> = secrets
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, vec!["a", "c"]);
        assert!(secrets[1].data.as_ref().unwrap().is_empty());
    }

    #[test]
    fn projection_is_bounded() {
        let referenced: BTreeSet<String> = (0..40).map(|i| format!("s{i:02}")).collect();
        let big = Projected {
            entries: (0..250).map(|i| (format!("e{i}"), public())).collect(),
            ..Projected::default()
        };
        let projected: BTreeMap<String, Projected> = referenced
            .iter()
            .map(|n| (n.clone(), big.clone()))
            .collect();
        let (data, problems) = projection_data("ns", &referenced, &projected);
        let total: usize = data.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= MAX_PROJECTION_BYTES, "{total}");
        assert!(!data.is_empty() && !problems.is_empty());
        assert!(problems[0].contains("exceed"), "{problems:?}");
    }
}

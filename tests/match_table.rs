//! `spec.match` as the admission shim and the node apply it: `tests/fixtures/match.yaml`.
//! Decisions go through the engine (the same path as every front door); static authorities
//! only, so no registry is involved.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use pullgate::audit::{AuditLog, Source};
use pullgate::engine::{Engine, Request};
use pullgate::image_ref::ImageRef;
use pullgate::policy::eval::{object_cache_key, Verdict};
use pullgate::policy::load::Objects;
use pullgate::policy::object::{AdmissionObject, ObjectSource};
use pullgate::policy::snapshot::{Settings, Snapshot};
use pullgate::policy::source::Fixed;
use pullgate::registry::{RegistryClient, RegistryConfig};
use pullgate::verify::cache::VerdictCache;

const POLICIES: &str = r#"
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: deny-deployments}
spec:
  images: [{glob: "ghcr.io/**"}]
  authorities: [{static: {action: fail}}]
  match: [{group: apps, version: v1, resource: deployments, selector: {matchLabels: {tier: web}}}]
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: deny-pods}
spec:
  images: [{glob: "ghcr.io/**"}]
  authorities: [{static: {action: fail}}]
  match: [{version: v1, resource: pods, selector: {matchExpressions: [{key: env, operator: In, values: [prod]}]}}]
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: allow-all}
spec:
  images: [{glob: "**"}]
  authorities: [{static: {action: pass}}]
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {policy.sigstore.dev/include: "true"}}
"#;

const IMAGE: &str = "ghcr.io/acme/app:1.0";

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    #[serde(default)]
    admission: Option<serde_json::Value>,
    #[serde(default)]
    sandbox: Option<BTreeMap<String, String>>,
    #[serde(default)]
    both: Option<BTreeMap<String, String>>,
    expect: String,
    #[serde(default)]
    reason: Option<String>,
}

fn snapshot() -> Snapshot {
    let mut objects = Objects::default();
    objects.load_str(POLICIES, "match").unwrap();
    let snapshot = Snapshot::build(&objects, Settings::default());
    assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
    snapshot
}

fn engine() -> Engine {
    Engine {
        policies: Arc::new(Fixed::new(snapshot())),
        // Never reached: static authorities decide without a registry.
        registry: RegistryClient::new(RegistryConfig::default()).unwrap(),
        cache: VerdictCache::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
            Duration::from_secs(60),
            64,
        ),
        audit: AuditLog::silent(),
        node: "test".into(),
    }
}

fn sandbox(labels: &BTreeMap<String, String>) -> AdmissionObject {
    let labels: HashMap<String, String> = labels.clone().into_iter().collect();
    AdmissionObject::from_pod_sandbox("p", "prod", "uid", &labels, &HashMap::new())
}

fn pod(labels: &BTreeMap<String, String>) -> AdmissionObject {
    AdmissionObject::from_object(
        ObjectSource::Admission,
        &serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": labels}}),
    )
}

#[tokio::test]
async fn match_table() {
    let text = std::fs::read_to_string("tests/fixtures/match.yaml").unwrap();
    let cases: Vec<Case> = serde_yaml::from_str(&text).unwrap();
    assert!(cases.len() >= 10, "table shrank to {}", cases.len());
    let engine = engine();
    let mut failures = Vec::new();
    for case in &cases {
        let mut objects: Vec<(&str, Option<AdmissionObject>)> = Vec::new();
        if let Some(o) = &case.admission {
            objects.push((
                "admission",
                Some(AdmissionObject::from_object(ObjectSource::Admission, o)),
            ));
        }
        if let Some(labels) = &case.sandbox {
            objects.push(("node", Some(sandbox(labels))));
        }
        if let Some(labels) = &case.both {
            objects.push(("admission", Some(pod(labels))));
            objects.push(("node", Some(sandbox(labels))));
        }
        if objects.is_empty() {
            objects.push(("no object", None));
        }
        for (door, object) in &objects {
            let request = Request {
                object: object.as_ref(),
                ..Request::new(Source::Cli, Some("prod"))
            };
            let decision = engine.decide(IMAGE, &request).await.decision;
            let got = match decision.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
                other => {
                    failures.push(format!("{} ({door}): verdict {other:?}", case.name));
                    continue;
                }
            };
            if got != case.expect {
                failures.push(format!(
                    "{} ({door}): {got}, want {} ({:?})",
                    case.name, case.expect, decision.reasons
                ));
            }
            if let Some(reason) = &case.reason {
                if !decision.reasons.iter().any(|r| r.contains(reason.as_str())) {
                    failures.push(format!(
                        "{} ({door}): reasons {:?} lack {reason:?}",
                        case.name, decision.reasons
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A verdict cached for one object must not be served for an object that other CIPs apply to:
/// the cache key carries which policies applied.
#[test]
fn verdict_cache_key_separates_objects_matched_differently() {
    let snapshot = snapshot();
    let image = ImageRef::parse(
        "ghcr.io/acme/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    )
    .unwrap();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let prod = pod(&labels(&[("env", "prod")]));
    let dev = pod(&labels(&[("env", "dev")]));
    let staging = pod(&labels(&[("env", "staging")]));
    let key = |o: &AdmissionObject| object_cache_key(&snapshot, &image, Some(o));
    assert_ne!(key(&prod), key(&dev));
    // Objects to which the same policies apply share verdicts.
    assert_eq!(key(&dev), key(&staging));
}

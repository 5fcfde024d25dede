//! `spec.match`: which objects a ClusterImagePolicy applies to.
//!
//! A CIP without `match` applies to every object. With `match`, policy-controller applies it
//! to an object under review when one entry names that object's resource (`group`, `resource`
//! exactly, `version` exactly or `*`) and, when the entry has a `selector`, the object's own
//! labels satisfy it. The admission shim and `pullgate verify --object` decide exactly so.
//!
//! The node decides pods, and knows of a pod only what kubelet copies into its sandbox: its
//! labels, not its owner. Its rule is built never to apply fewer CIPs to a pod than admission
//! applied to the pod or to the workload that made it:
//!
//! - an entry for `pods` is decided as at admission, the selector on the pod's labels;
//! - an entry for a workload resource applies to a pod that carries the label that resource's
//!   controller always sets on the pods it creates (`pod-template-hash` for Deployments and
//!   their ReplicaSets, `statefulset.kubernetes.io/pod-name`, `pod-template-generation` for
//!   DaemonSets, `batch.kubernetes.io/job-name` or `job-name` for Jobs and CronJobs). The
//!   selector, which reads the workload's labels, cannot be judged at the node and is ignored:
//!   the CIP applies. A ReplicaSet made without a Deployment leaves no label, so a `replicasets`
//!   entry also applies to a pod that carries none of these labels.
//!
//! A label only ever adds CIPs to the pod that carries it; leaving one out takes away only CIPs
//! that admission did not apply to that pod either.
//!
//! No object known (`pullgate verify` without `--object`): every CIP applies.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::object::{AdmissionObject, ObjectSource};
use super::types::MatchResource;

/// Labels a controller always sets on the pods it creates: (resource, group, labels).
const CONTROLLER_LABELS: [(&str, &str, &[&str]); 5] = [
    ("deployments", "apps", &["pod-template-hash"]),
    ("replicasets", "apps", &["pod-template-hash"]),
    (
        "statefulsets",
        "apps",
        &["statefulset.kubernetes.io/pod-name"],
    ),
    ("daemonsets", "apps", &["pod-template-generation"]),
    (
        "jobs",
        "batch",
        &["batch.kubernetes.io/job-name", "job-name"],
    ),
];

/// Whether a CIP with `rules` as its `spec.match` applies to `object`.
pub fn applies(rules: &[MatchResource], object: Option<&AdmissionObject>) -> bool {
    let Some(object) = object else {
        return true;
    };
    if rules.is_empty() {
        return true;
    }
    let labels = labels(object);
    match object.source {
        ObjectSource::PodSandbox => rules.iter().any(|r| applies_at_node(r, &labels)),
        ObjectSource::Admission | ObjectSource::Manifest => {
            let Some((group, version, resource)) = resource_of(object) else {
                // An object without apiVersion/kind: which entries it matches cannot be known.
                return true;
            };
            rules.iter().any(|r| {
                r.resource == resource
                    && r.group == group
                    && (r.version == version || r.version == "*")
                    && r.selector.as_ref().is_none_or(|s| selects(s, &labels))
            })
        }
    }
}

fn applies_at_node(rule: &MatchResource, labels: &BTreeMap<String, String>) -> bool {
    let version_ok = |v: &str| rule.version == v || rule.version == "*";
    if rule.resource == "pods" {
        return rule.group.is_empty()
            && version_ok("v1")
            && rule.selector.as_ref().is_none_or(|s| selects(s, labels));
    }
    let carries = |names: &[&str]| names.iter().any(|n| labels.contains_key(*n));
    let resource = match rule.resource.as_str() {
        "cronjobs" => "jobs",
        other => other,
    };
    let Some((_, group, names)) = CONTROLLER_LABELS.iter().find(|(r, _, _)| *r == resource) else {
        return false;
    };
    if rule.group != *group || !version_ok("v1") {
        return false;
    }
    let no_controller = || CONTROLLER_LABELS.iter().all(|(_, _, n)| !carries(n));
    carries(names) || (resource == "replicasets" && no_controller())
}

/// The object's labels (`metadata.labels`); non-string values are ignored.
fn labels(object: &AdmissionObject) -> BTreeMap<String, String> {
    object
        .metadata
        .as_ref()
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.as_object())
        .map(|l| {
            l.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// `(group, version, resource)` of the object from its `apiVersion` and `kind`, the resource
/// guessed from the kind as Kubernetes' `UnsafeGuessKindToResource` does.
fn resource_of(object: &AdmissionObject) -> Option<(String, String, String)> {
    let typemeta = object.typemeta.as_ref()?;
    let api_version = typemeta.get("apiVersion")?.as_str()?;
    let kind = typemeta.get("kind")?.as_str()?;
    if kind.is_empty() {
        return None;
    }
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let lower = kind.to_ascii_lowercase();
    let resource = if lower.ends_with('s') {
        format!("{lower}es")
    } else if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else {
        format!("{lower}s")
    };
    Some((group.to_string(), version.to_string(), resource))
}

/// Whether `labels` satisfy `selector` (`matchLabels` and every `matchExpressions` entry). An
/// operator this code does not know selects (the CIP applies: fail closed); validation
/// reports it.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => true,
        }
    });
    by_label && by_expression
}

/// Problems of a selector as `metav1.LabelSelectorAsSelector` would refuse it.
pub fn selector_problems(selector: &LabelSelector) -> Vec<String> {
    let mut problems = Vec::new();
    for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
        let count = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if count == 0 => problems.push(format!(
                "matchExpressions[{i}]: operator {} needs at least one value",
                e.operator
            )),
            "Exists" | "DoesNotExist" if count > 0 => problems.push(format!(
                "matchExpressions[{i}]: operator {} takes no values",
                e.operator
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => problems.push(format!(
                "matchExpressions[{i}]: unknown operator {other:?}: expected In, NotIn, Exists \
                 or DoesNotExist"
            )),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn rule(yaml: &str) -> MatchResource {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn admitted(kind: &str, api_version: &str, labels: serde_json::Value) -> AdmissionObject {
        AdmissionObject::from_object(
            ObjectSource::Admission,
            &json!({"apiVersion": api_version, "kind": kind, "metadata": {"labels": labels}}),
        )
    }

    fn sandbox(labels: &[(&str, &str)]) -> AdmissionObject {
        let labels: HashMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AdmissionObject::from_pod_sandbox("p", "ns", "uid", &labels, &HashMap::new())
    }

    #[test]
    fn no_rules_or_no_object_applies() {
        assert!(applies(&[], Some(&admitted("Pod", "v1", json!({})))));
        assert!(applies(&[rule("{resource: pods, version: v1}")], None));
    }

    #[test]
    fn admission_matches_resource_group_version_and_selector() {
        let deployments = [rule(
            "{group: apps, version: v1, resource: deployments, selector: {matchLabels: {tier: web}}}",
        )];
        let web = admitted("Deployment", "apps/v1", json!({"tier": "web"}));
        let db = admitted("Deployment", "apps/v1", json!({"tier": "db"}));
        let pod = admitted("Pod", "v1", json!({"tier": "web"}));
        let old = admitted("Deployment", "apps/v1beta2", json!({"tier": "web"}));
        assert!(applies(&deployments, Some(&web)));
        assert!(!applies(&deployments, Some(&db)));
        assert!(!applies(&deployments, Some(&pod)));
        assert!(!applies(&deployments, Some(&old)));
        let any_version = [rule("{group: apps, version: '*', resource: deployments}")];
        assert!(applies(&any_version, Some(&old)));
        let policies = [rule("{group: '', version: v1, resource: pods}")];
        assert!(applies(&policies, Some(&pod)));
        assert!(!applies(&policies, Some(&web)));
    }

    #[test]
    fn expressions() {
        let r = [rule(
            "{version: v1, resource: pods, selector: {matchExpressions: [{key: env, operator: In, values: [prod]}, {key: debug, operator: DoesNotExist}]}}",
        )];
        assert!(applies(
            &r,
            Some(&admitted("Pod", "v1", json!({"env": "prod"})))
        ));
        assert!(!applies(
            &r,
            Some(&admitted("Pod", "v1", json!({"env": "dev"})))
        ));
        assert!(!applies(
            &r,
            Some(&admitted("Pod", "v1", json!({"env": "prod", "debug": "1"})))
        ));
    }

    #[test]
    fn node_applies_workload_entries_by_controller_labels() {
        let deployments = [rule(
            "{group: apps, version: v1, resource: deployments, selector: {matchLabels: {tier: web}}}",
        )];
        // A Deployment's pod always carries pod-template-hash; the selector (the Deployment's
        // labels) cannot be judged at the node, so the CIP applies.
        assert!(applies(
            &deployments,
            Some(&sandbox(&[("pod-template-hash", "abc")]))
        ));
        assert!(!applies(&deployments, Some(&sandbox(&[("tier", "web")]))));
        assert!(!applies(
            &deployments,
            Some(&sandbox(&[("batch.kubernetes.io/job-name", "j")]))
        ));
        let replicasets = [rule("{group: apps, version: v1, resource: replicasets}")];
        assert!(applies(&replicasets, Some(&sandbox(&[]))));
        assert!(!applies(&replicasets, Some(&sandbox(&[("job-name", "j")]))));
        let cronjobs = [rule("{group: batch, version: v1, resource: cronjobs}")];
        assert!(applies(&cronjobs, Some(&sandbox(&[("job-name", "j")]))));
        let pods = [rule(
            "{version: v1, resource: pods, selector: {matchLabels: {tier: web}}}",
        )];
        assert!(applies(&pods, Some(&sandbox(&[("tier", "web")]))));
        assert!(!applies(&pods, Some(&sandbox(&[("tier", "db")]))));
    }

    #[test]
    fn selector_validation() {
        let s: LabelSelector = serde_yaml::from_str(
            "{matchExpressions: [{key: a, operator: In}, {key: b, operator: Exists, values: [x]}, {key: c, operator: Like}]}",
        )
        .unwrap();
        let problems = selector_problems(&s);
        assert_eq!(problems.len(), 3, "{problems:?}");
    }
}

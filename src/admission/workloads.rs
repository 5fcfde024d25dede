//! `POST /validate/workloads`: every container image of a Pod or workload template, decided by
//! the node's engine, answered in policy-controller's message format.
//!
//! Image lists are read in policy-controller's order (`initContainers`, `containers`, then
//! `ephemeralContainers`); each distinct image is decided once per request, however many
//! containers use it, and audited once.

use std::collections::HashMap;

use serde_json::Value;
use tracing::Instrument as _;

use super::field_error::FieldErrors;
use super::review::{GroupVersionKind, Request, Response};
use super::{pull_secrets, Shim};
use crate::audit::Source;
use crate::engine::Request as EngineRequest;
use crate::image_ref::ImageRef;
use crate::policy::eval::{failure_reason, Decision, Verdict};
use crate::policy::object::{AdmissionObject, ObjectSource};
use crate::policy::snapshot::Mode;
use crate::policy::Snapshot;

/// Container lists of a pod spec, in the order policy-controller checks them.
const CONTAINER_LISTS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];

/// Where a kind keeps its pod spec (JSON object keys from the object root), or `None` for kinds
/// that run no containers.
pub fn pod_spec_path(kind: &GroupVersionKind) -> Option<&'static [&'static str]> {
    match (kind.group.as_str(), kind.kind.as_str()) {
        ("", "Pod") => Some(&["spec"]),
        ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet") | ("batch", "Job") => {
            Some(&["spec", "template", "spec"])
        }
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

/// A container image as written in the object, and the field path it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAt {
    pub path: String,
    pub image: String,
}

/// Every container image under `spec_path` of `object`. Containers without an image are
/// skipped: workload templates may leave it to other tooling, and the Pods they create are
/// checked when created. `Err` names a pod spec of an unexpected shape.
pub fn images(object: &Value, spec_path: &[&str]) -> Result<Vec<ImageAt>, String> {
    let prefix = spec_path.join(".");
    let mut spec = object;
    for key in spec_path {
        match spec.get(key) {
            Some(v) => spec = v,
            None => return Ok(Vec::new()),
        }
    }
    if spec.is_null() {
        return Ok(Vec::new());
    }
    if !spec.is_object() {
        return Err(format!("{prefix}: expected an object"));
    }
    let mut found = Vec::new();
    for list in CONTAINER_LISTS {
        let containers = match spec.get(list) {
            None | Some(Value::Null) => continue,
            Some(Value::Array(items)) => items,
            Some(_) => return Err(format!("{prefix}.{list}: expected a list")),
        };
        for (i, container) in containers.iter().enumerate() {
            match container.get("image") {
                None | Some(Value::Null) => {}
                Some(Value::String(image)) => found.push(ImageAt {
                    path: format!("{prefix}.{list}[{i}].image"),
                    image: image.clone(),
                }),
                Some(_) => return Err(format!("{prefix}.{list}[{i}].image: expected a string")),
            }
        }
    }
    Ok(found)
}

/// Adds the problems of `decision` for the image written `image` at `path`: denials to
/// `errors`, warn-mode failures and no-match=warn to `warnings`.
pub fn problems(
    decision: &Decision,
    image: &str,
    path: &str,
    errors: &mut FieldErrors,
    warnings: &mut FieldErrors,
) {
    match decision.verdict {
        Verdict::Allow => {}
        Verdict::Error => errors.push(
            "could not decide",
            path,
            format!("{image} {}", decision.reasons.join("; ")),
        ),
        Verdict::Deny | Verdict::Warn if decision.policies.is_empty() => {
            let target = if decision.verdict == Verdict::Deny {
                errors
            } else {
                warnings
            };
            target.push("no matching policies", path, image);
        }
        Verdict::Deny | Verdict::Warn => {
            let mut denied = false;
            for outcome in decision.policies.iter().filter(|p| !p.passed) {
                let headline = format!("failed policy: {}", outcome.name);
                // The engine's own wording of the causes, so node and shim say the same thing:
                // `failed policy: <cip>: <path> <image> <causes>` minus the headline and path.
                let full = failure_reason(outcome, path, image);
                let details = full
                    .strip_prefix(&format!("{headline}: {path} "))
                    .unwrap_or(&full)
                    .to_string();
                let target = match outcome.mode {
                    Mode::Enforce => {
                        denied = true;
                        &mut *errors
                    }
                    Mode::Warn => &mut *warnings,
                };
                target.push(headline, path, details);
            }
            // A denial must never turn into an allow for want of a failed policy to show.
            if decision.verdict == Verdict::Deny && !denied {
                errors.push(
                    "denied",
                    path,
                    format!("{image} {}", decision.reasons.join("; ")),
                );
            }
        }
    }
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> Option<&'a str> {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Answers a workload review.
pub async fn review(shim: &Shim, snapshot: &Snapshot, req: &Request) -> Response {
    if !matches!(req.operation.as_str(), "CREATE" | "UPDATE") {
        return Response::allow(&req.uid);
    }
    let Some(spec_path) = pod_spec_path(&req.kind) else {
        return Response::allow(&req.uid);
    };
    let object = match req.object_or_deny() {
        Ok(object) => object,
        Err(denied) => return denied,
    };
    // An object being deleted only has its finalizers removed; blocking that helps no one.
    if object
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|t| !t.is_null())
    {
        return Response::allow(&req.uid);
    }
    let namespace = req
        .namespace
        .as_deref()
        .filter(|s| !s.is_empty())
        .or_else(|| str_at(object, "/metadata/namespace"));
    let name = str_at(object, "/metadata/name")
        .or(req.name.as_deref().filter(|s| !s.is_empty()))
        .or_else(|| str_at(object, "/metadata/generateName"))
        .unwrap_or_default();
    // The audit line's `pod` field: the pod's name, or `Kind/name` for a workload.
    let pod = if req.kind.kind == "Pod" {
        name.to_string()
    } else {
        format!("{}/{name}", req.kind.kind)
    };
    let found = match images(object, spec_path) {
        Ok(found) => found,
        Err(problem) => {
            return Response::deny(
                &req.uid,
                format!("validation failed: cannot read the pod spec: {problem}"),
            )
        }
    };
    let span =
        tracing::info_span!("admission", uid = %req.uid, kind = %req.kind.kind, namespace, name);
    async move {
        let mut distinct: Vec<&str> = Vec::new();
        for f in &found {
            if !distinct.contains(&f.image.as_str()) {
                distinct.push(&f.image);
            }
        }
        let enforced = snapshot.is_enforced(namespace)
            || (shim.trust_namespace_selector
                && namespace.is_some_and(|ns| !snapshot.is_exempt(ns)));
        let pod = pod.as_str();
        let credentials = match (&shim.pull_secrets, namespace) {
            (Some(reader), Some(ns)) if enforced => {
                let names = pull_secrets::names(object, spec_path);
                if names.is_empty() {
                    None
                } else {
                    Some(reader.credentials(ns, &names).await)
                }
            }
            _ => None,
        };
        let credentials = credentials.as_ref();
        // What CIP-level policies may read of the object (`includeSpec`, …): policy-controller
        // reads the object under review, so a workload's own spec, not its pod template's.
        let mut admission_object = AdmissionObject::from_object(ObjectSource::Admission, object);
        if admission_object.typemeta.is_none() {
            let api_version = match req.kind.group.as_str() {
                "" => req.kind.version.clone(),
                group => format!("{group}/{}", req.kind.version),
            };
            admission_object.typemeta =
                Some(serde_json::json!({"kind": req.kind.kind, "apiVersion": api_version}));
        }
        let admission_object = &admission_object;
        let pull_secrets = shim
            .pull_secrets
            .as_ref()
            .map(|r| r as &dyn crate::engine::PullSecretReader);
        let decisions = futures_util::future::join_all(distinct.iter().map(|&image| async move {
            let auth = ImageRef::parse(image)
                .ok()
                .and_then(|parsed| credentials.and_then(|c| c.for_host(parsed.registry())));
            let request = EngineRequest {
                pod: Some(pod),
                auth,
                pull_secrets,
                object: Some(admission_object),
                namespace_selected: shim.trust_namespace_selector,
                ..EngineRequest::new(Source::Admission, namespace)
            };
            (image, shim.engine.decide(image, &request).await.decision)
        }))
        .await;
        let decisions: HashMap<&str, Decision> = decisions.into_iter().collect();

        let mut errors = FieldErrors::default();
        let mut warnings = FieldErrors::default();
        for f in &found {
            match (ImageRef::parse(&f.image), decisions.get(f.image.as_str())) {
                // policy-controller's shape for a reference that does not parse.
                (Err(e), _) if enforced => errors.push(e.to_string(), &f.path, &f.image),
                (Err(_), _) => {}
                (Ok(_), Some(decision)) => {
                    problems(decision, &f.image, &f.path, &mut errors, &mut warnings)
                }
                // Every distinct image was decided above; should one be missing, deny.
                (Ok(_), None) => errors.push("could not decide", &f.path, &f.image),
            }
        }
        let mut response = if errors.is_empty() {
            Response::allow(&req.uid)
        } else {
            tracing::warn!(reasons = %errors, "admission denied");
            Response::deny(&req.uid, format!("validation failed: {errors}"))
        };
        response.warnings = warnings.to_list();
        response
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::eval::{AuthorityOutcome, PolicyOutcome};

    fn gvk(group: &str, kind: &str) -> GroupVersionKind {
        GroupVersionKind {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
        }
    }

    #[test]
    fn images_of_every_list_with_paths() {
        let pod = serde_json::json!({"spec": {
            "containers": [{"name": "a", "image": "nginx"}, {"name": "b"}],
            "initContainers": [{"image": "busybox:1"}],
            "ephemeralContainers": [{"image": "debug@sha256:00"}]}});
        let found = images(&pod, pod_spec_path(&gvk("", "Pod")).unwrap()).unwrap();
        let got: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.path.as_str(), f.image.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("spec.initContainers[0].image", "busybox:1"),
                ("spec.containers[0].image", "nginx"),
                ("spec.ephemeralContainers[0].image", "debug@sha256:00"),
            ]
        );
        let cron = serde_json::json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {
            "containers": [{"image": "x"}]}}}}}});
        let found = images(&cron, pod_spec_path(&gvk("batch", "CronJob")).unwrap()).unwrap();
        assert_eq!(
            found[0].path,
            "spec.jobTemplate.spec.template.spec.containers[0].image"
        );
        assert!(pod_spec_path(&gvk("", "ConfigMap")).is_none());
        assert!(pod_spec_path(&gvk("example.com", "Deployment")).is_none());
        let bad = serde_json::json!({"spec": {"containers": {"image": "x"}}});
        assert_eq!(
            images(&bad, &["spec"]).unwrap_err(),
            "spec.containers: expected a list"
        );
    }

    #[test]
    fn failed_policies_in_policy_controller_shape() {
        let decision = Decision {
            image: "ghcr.io/a/b:1".into(),
            digest: None,
            namespace: None,
            enforced: true,
            verdict: Verdict::Deny,
            reasons: Vec::new(),
            policies: vec![
                PolicyOutcome {
                    name: "strict".into(),
                    mode: Mode::Enforce,
                    passed: false,
                    authorities: vec![AuthorityOutcome {
                        name: "authority-0".into(),
                        passed: false,
                        reason: Some("disallowed by static policy: no".into()),
                        evidence: None,
                    }],
                    problems: Vec::new(),
                    by_repository: false,
                },
                PolicyOutcome {
                    name: "soft".into(),
                    mode: Mode::Warn,
                    passed: false,
                    authorities: vec![AuthorityOutcome {
                        name: "authority-0".into(),
                        passed: false,
                        reason: Some("disallowed by static policy".into()),
                        evidence: None,
                    }],
                    problems: Vec::new(),
                    by_repository: false,
                },
            ],
        };
        let (mut errors, mut warnings) = (FieldErrors::default(), FieldErrors::default());
        problems(
            &decision,
            "ghcr.io/a/b:1",
            "spec.containers[0].image",
            &mut errors,
            &mut warnings,
        );
        assert_eq!(
            errors.to_string(),
            "failed policy: strict: spec.containers[0].image\n\
             ghcr.io/a/b:1 disallowed by static policy: no"
        );
        assert_eq!(
            warnings.to_list(),
            ["failed policy: soft: spec.containers[0].image\nghcr.io/a/b:1 disallowed by static policy"]
        );
    }
}

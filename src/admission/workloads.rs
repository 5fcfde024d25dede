//! `POST /validate/workloads`: every container image of a Pod or workload template, decided by
//! the node's engine, answered in policy-controller's message format.
//!
//! Image lists are read in policy-controller's order (`initContainers`, `containers`, then
//! `ephemeralContainers`), then image volumes (`volumes[].image.reference`, which
//! policy-controller does not check); each distinct image is decided once per request, however
//! many containers use it, and audited once.
//!
//! The object is read from the review's raw JSON into a few typed fields; everything else is
//! skipped unread. Deny reasons never carry a digest the caller did not write (see
//! [`redact_digests`]).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::LazyLock;

use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tracing::Instrument as _;

use super::field_error::FieldErrors;
use super::review::{typed, without_position, GroupVersionKind, Request, Response};
use super::Shim;
use crate::audit::Source;
use crate::engine::Request as EngineRequest;
use crate::image_ref::ImageRef;
use crate::policy::eval::{failure_reason, Decision, Verdict};
use crate::policy::object::{AdmissionObject, Includes, ObjectSource};
use crate::policy::snapshot::Mode;
use crate::policy::Snapshot;

/// Most entries read from one list of a pod spec (containers, volumes, imagePullSecrets).
/// A longer list is refused rather than read: memory and work per review stay bounded.
pub const MAX_LIST_ENTRIES: usize = 256;

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

/// A list of at most [`MAX_LIST_ENTRIES`] entries; a longer one is a deserialization error.
struct Capped<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Capped<T> {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Entries<T> {
            type Value = Capped<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {MAX_LIST_ENTRIES} entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Capped<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX_LIST_ENTRIES {
                        return Err(de::Error::custom(format!(
                            "more than {MAX_LIST_ENTRIES} entries"
                        )));
                    }
                    items.push(item);
                }
                Ok(Capped(items))
            }
        }
        d.deserialize_seq(Entries(std::marker::PhantomData))
    }
}

impl<T> Capped<T> {
    fn iter(list: &Option<Capped<T>>) -> impl Iterator<Item = &T> {
        list.iter().flat_map(|c| c.0.iter())
    }
}

#[derive(Deserialize)]
struct Container {
    #[serde(default)]
    image: Option<String>,
}

/// `volumes[].image`: a Kubernetes image volume (an OCI image mounted read-only).
#[derive(Deserialize)]
struct Volume {
    #[serde(default)]
    image: Option<ImageVolume>,
}

#[derive(Deserialize)]
struct ImageVolume {
    #[serde(default)]
    reference: Option<String>,
}

#[derive(Deserialize)]
struct LocalObjectReference {
    #[serde(default)]
    name: Option<String>,
}

/// The fields of a pod spec the shim reads; every other field is skipped unread.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct PodSpec {
    init_containers: Option<Capped<Container>>,
    containers: Option<Capped<Container>>,
    ephemeral_containers: Option<Capped<Container>>,
    volumes: Option<Capped<Volume>>,
    image_pull_secrets: Option<Capped<LocalObjectReference>>,
}

/// The object metadata the shim reads.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct ObjectMeta {
    name: Option<String>,
    generate_name: Option<String>,
    deletion_timestamp: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Object<'a> {
    metadata: Option<ObjectMeta>,
    #[serde(borrow)]
    spec: Option<&'a RawValue>,
}

/// Finds one key of a JSON object without reading the others (`null`: not there).
struct Child<'k>(&'k str);

impl<'de> Visitor<'de> for Child<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<String>()? {
            if key != self.0 {
                map.next_value::<IgnoredAny>()?;
            } else if found.is_some() {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            } else {
                found = Some(map.next_value::<&'de RawValue>()?);
            }
        }
        Ok(found)
    }
}

fn child<'a>(raw: &'a RawValue, key: &str) -> Result<Option<&'a RawValue>, String> {
    serde_json::Deserializer::from_str(raw.get())
        .deserialize_any(Child(key))
        .map_err(|e| without_position(&e))
}

/// A container or volume image as written in the object, and the field path it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAt {
    pub path: String,
    pub image: String,
}

/// What a workload review reads of its object.
#[derive(Debug, Default)]
pub struct Workload {
    pub name: Option<String>,
    pub generate_name: Option<String>,
    pub deleting: bool,
    /// Container images in policy-controller's order (`initContainers`, `containers`,
    /// `ephemeralContainers`), then image volumes (`volumes[].image.reference`).
    pub images: Vec<ImageAt>,
    /// `imagePullSecrets` names (entries without a name are ignored).
    pub pull_secrets: Vec<String>,
}

/// Reads `object` (the raw JSON of the review) for the pod spec under `spec_path`, without
/// building a tree of it. Containers without an image are skipped: workload templates may
/// leave it to other tooling, and the Pods they create are checked when created. `Err` names a
/// field of an unexpected shape.
pub fn read(object: &RawValue, spec_path: &[&str]) -> Result<Workload, String> {
    let top: Object = typed(object).map_err(|(path, e)| format!("{path}: {e}"))?;
    let mut workload = Workload::default();
    if let Some(meta) = top.metadata {
        workload.name = meta.name;
        workload.generate_name = meta.generate_name;
        workload.deleting = meta.deletion_timestamp.is_some();
    }
    let mut spec = top.spec;
    let mut prefix = String::from("spec");
    for key in spec_path.iter().skip(1) {
        let Some(raw) = spec else { break };
        spec = child(raw, key).map_err(|e| format!("{prefix}: {e}"))?;
        prefix = format!("{prefix}.{key}");
    }
    let Some(spec) = spec else {
        return Ok(workload);
    };
    let spec: Option<PodSpec> = typed(spec).map_err(|(path, e)| format!("{prefix}.{path}: {e}"))?;
    let Some(spec) = spec else {
        return Ok(workload);
    };
    let lists = [
        ("initContainers", &spec.init_containers),
        ("containers", &spec.containers),
        ("ephemeralContainers", &spec.ephemeral_containers),
    ];
    for (list, containers) in lists {
        for (i, c) in Capped::iter(containers).enumerate() {
            if let Some(image) = &c.image {
                workload.images.push(ImageAt {
                    path: format!("{prefix}.{list}[{i}].image"),
                    image: image.clone(),
                });
            }
        }
    }
    for (i, v) in Capped::iter(&spec.volumes).enumerate() {
        if let Some(image) = v.image.as_ref().and_then(|i| i.reference.as_ref()) {
            workload.images.push(ImageAt {
                path: format!("{prefix}.volumes[{i}].image.reference"),
                image: image.clone(),
            });
        }
    }
    workload.pull_secrets = Capped::iter(&spec.image_pull_secrets)
        .filter_map(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .collect();
    Ok(workload)
}

/// The admission object's parts that CIP-level policies read (`includeSpec`, …), parsed only
/// when some policy of `snapshot` asks for one: only then is part of the object held as a
/// tree. `typemeta` falls back to the request's kind when the object carries none.
pub fn admission_object(
    snapshot: &Snapshot,
    object: &RawValue,
    kind: &GroupVersionKind,
) -> Result<Option<AdmissionObject>, String> {
    let wanted = snapshot
        .policies
        .iter()
        .filter(|p| p.policy.is_some())
        .fold(Includes::default(), |acc, p| acc.union(p.includes));
    if !wanted.object() {
        return Ok(None);
    }
    #[derive(Deserialize, Default)]
    #[serde(default, rename_all = "camelCase")]
    struct Parts<'a> {
        #[serde(borrow)]
        spec: Option<&'a RawValue>,
        #[serde(borrow)]
        metadata: Option<&'a RawValue>,
        kind: Option<Value>,
        api_version: Option<Value>,
    }
    let parts: Parts = typed(object).map_err(|(path, e)| format!("{path}: {e}"))?;
    let tree = |raw: Option<&RawValue>, on: bool| -> Result<Option<Value>, String> {
        match raw {
            Some(raw) if on => serde_json::from_str::<Value>(raw.get())
                .map(|v| Some(v).filter(|v| !v.is_null()))
                .map_err(|e| without_position(&e)),
            _ => Ok(None),
        }
    };
    let mut typemeta = serde_json::Map::new();
    for (key, value) in [("kind", parts.kind), ("apiVersion", parts.api_version)] {
        if let Some(v) = value.filter(|v| !v.is_null()) {
            typemeta.insert(key.to_string(), v);
        }
    }
    if typemeta.is_empty() {
        let api_version = match kind.group.as_str() {
            "" => kind.version.clone(),
            group => format!("{group}/{}", kind.version),
        };
        typemeta.insert("kind".into(), Value::from(kind.kind.clone()));
        typemeta.insert("apiVersion".into(), Value::from(api_version));
    }
    Ok(Some(AdmissionObject {
        source: ObjectSource::Admission,
        spec: tree(parts.spec, wanted.spec)?,
        metadata: tree(parts.metadata, wanted.metadata)?,
        typemeta: Some(Value::Object(typemeta)),
    }))
}

/// Digests in reasons (`sha256:…`, `sha512:…`).
static DIGEST: LazyLock<regex::Regex> = LazyLock::new(|| {
    regex::Regex::new(r"sha(256|384|512):[0-9a-fA-F]{32,128}").expect("constant pattern")
});

/// `reason` with every digest that `image` (as the caller wrote it) does not name replaced by
/// `<digest withheld>`: the shim resolves tags with its own and the namespace's pull
/// credentials, and a caller must not learn the digest of an image it may not be able to pull.
pub fn redact_digests(reason: &str, image: &str) -> String {
    DIGEST
        .replace_all(reason, |m: &regex::Captures| {
            if image.contains(&m[0]) {
                m[0].to_string()
            } else {
                "<digest withheld>".to_string()
            }
        })
        .into_owned()
}

/// Adds the problems of `decision` for the image written `image` at `path`: denials to
/// `errors`, warn-mode failures and no-match=warn to `warnings`. Digests `image` does not name
/// are withheld from every reason.
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
            redact_digests(&format!("{image} {}", decision.reasons.join("; ")), image),
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
                let details = redact_digests(
                    full.strip_prefix(&format!("{headline}: {path} "))
                        .unwrap_or(&full),
                    image,
                );
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
                    redact_digests(&format!("{image} {}", decision.reasons.join("; ")), image),
                );
            }
        }
    }
}

/// Answers a workload review.
pub async fn review(shim: &Shim, snapshot: &Snapshot, req: &Request<'_>) -> Response {
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
    let cannot_read = |problem: String| {
        Response::deny(
            &req.uid,
            format!("validation failed: cannot read the pod spec: {problem}"),
        )
    };
    let workload = match read(object, spec_path) {
        Ok(w) => w,
        Err(problem) => return cannot_read(problem),
    };
    // An object being deleted only has its finalizers removed; blocking that helps no one.
    if workload.deleting {
        return Response::allow(&req.uid);
    }
    // Only the namespace the API server names: an object's own `metadata.namespace` is the
    // caller's word, and the namespace decides enforcement and whose pull Secrets are read.
    // None (not sent for these namespaced kinds): enforced, and no Secrets read.
    let namespace = req.namespace.as_deref().filter(|s| !s.is_empty());
    let name = workload
        .name
        .as_deref()
        .filter(|s| !s.is_empty())
        .or(req.name.as_deref().filter(|s| !s.is_empty()))
        .or(workload.generate_name.as_deref().filter(|s| !s.is_empty()))
        .unwrap_or_default();
    // The audit line's `pod` field: the pod's name, or `Kind/name` for a workload.
    let pod = if req.kind.kind == "Pod" {
        name.to_string()
    } else {
        format!("{}/{name}", req.kind.kind)
    };
    let admission_object = match admission_object(snapshot, object, &req.kind) {
        Ok(o) => o,
        Err(problem) => return cannot_read(problem),
    };
    // Debug formatting: a field from the caller cannot start a forged log line.
    let span = tracing::info_span!("admission", uid = ?req.uid, kind = ?req.kind.kind, namespace = ?namespace, name = ?name);
    async move {
        let found = &workload.images;
        let mut seen = HashSet::new();
        let distinct: Vec<&str> = found
            .iter()
            .map(|f| f.image.as_str())
            .filter(|i| seen.insert(*i))
            .collect();
        let enforced = snapshot.is_enforced(namespace)
            || (shim.trust_namespace_selector
                && namespace.is_some_and(|ns| !snapshot.is_exempt(ns)));
        let pod = pod.as_str();
        let credentials = match (&shim.pull_secrets, namespace) {
            (Some(reader), Some(ns)) if enforced && !workload.pull_secrets.is_empty() => {
                Some(reader.credentials(ns, &workload.pull_secrets).await)
            }
            _ => None,
        };
        let credentials = credentials.as_ref();
        let admission_object = admission_object.as_ref();
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
                object: admission_object,
                namespace_selected: shim.trust_namespace_selector,
                ..EngineRequest::new(Source::Admission, namespace)
            };
            (image, shim.engine.decide(image, &request).await.decision)
        }))
        .await;
        let decisions: HashMap<&str, Decision> = decisions.into_iter().collect();

        let mut errors = FieldErrors::default();
        let mut warnings = FieldErrors::default();
        for f in found {
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
            tracing::warn!(reasons = ?errors.to_string(), "admission denied");
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

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    fn paths(w: &Workload) -> Vec<(&str, &str)> {
        w.images
            .iter()
            .map(|f| (f.path.as_str(), f.image.as_str()))
            .collect()
    }

    #[test]
    fn images_of_every_list_with_paths() {
        let pod = raw(
            serde_json::json!({"metadata": {"name": "p", "labels": {"a": "b"}},
          "spec": {
            "containers": [{"name": "a", "image": "nginx"}, {"name": "b"}],
            "initContainers": [{"image": "busybox:1"}],
            "ephemeralContainers": [{"image": "debug@sha256:00"}],
            "volumes": [{"name": "cfg", "configMap": {"name": "x"}},
                        {"name": "models", "image": {"reference": "ghcr.io/m/w:1", "pullPolicy": "Always"}}],
            "imagePullSecrets": [{"name": "a"}, {}, {"name": ""}, {"name": "b"}]}}),
        );
        let w = read(&pod, pod_spec_path(&gvk("", "Pod")).unwrap()).unwrap();
        assert_eq!(
            paths(&w),
            [
                ("spec.initContainers[0].image", "busybox:1"),
                ("spec.containers[0].image", "nginx"),
                ("spec.ephemeralContainers[0].image", "debug@sha256:00"),
                ("spec.volumes[1].image.reference", "ghcr.io/m/w:1"),
            ]
        );
        assert_eq!(w.pull_secrets, ["a", "b"]);
        assert_eq!(w.name.as_deref(), Some("p"));
        assert!(!w.deleting);
        let cron = raw(
            serde_json::json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {
            "containers": [{"image": "x"}], "imagePullSecrets": [{"name": "c"}]}}}}}}),
        );
        let w = read(&cron, pod_spec_path(&gvk("batch", "CronJob")).unwrap()).unwrap();
        assert_eq!(
            paths(&w),
            [(
                "spec.jobTemplate.spec.template.spec.containers[0].image",
                "x"
            )]
        );
        assert_eq!(w.pull_secrets, ["c"]);
        assert!(pod_spec_path(&gvk("", "ConfigMap")).is_none());
        assert!(pod_spec_path(&gvk("example.com", "Deployment")).is_none());
        for empty in [
            serde_json::json!({}),
            serde_json::json!({"spec": null}),
            serde_json::json!({"spec": {"template": null}}),
        ] {
            let w = read(&raw(empty.clone()), &["spec", "template", "spec"]).unwrap();
            assert!(w.images.is_empty(), "{empty}");
        }
        let deleting =
            raw(serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}));
        assert!(read(&deleting, &["spec"]).unwrap().deleting);
    }

    #[test]
    fn odd_shapes_and_long_lists_are_refused_with_their_path() {
        let pod: &[&str] = &["spec"];
        let template: &[&str] = &["spec", "template", "spec"];
        let cases = [
            (
                serde_json::json!({"spec": {"containers": {"image": "x"}}}),
                pod,
                "spec.containers: invalid type: map, expected a list of at most 256 entries",
            ),
            (
                serde_json::json!({"spec": {"containers": [{"image": 5}]}}),
                pod,
                "spec.containers[0].image: invalid type: integer `5`, expected a string",
            ),
            (
                serde_json::json!({"spec": {"template": "x"}}),
                template,
                "spec.template: invalid type: string \"x\", expected an object",
            ),
            (
                serde_json::json!({"spec": {"template": {"spec": {"volumes": [{"image": {"reference": []}}]}}}}),
                template,
                "spec.template.spec.volumes[0].image.reference: invalid type: sequence, expected a string",
            ),
        ];
        for (object, spec_path, want) in cases {
            let got = read(&raw(object.clone()), spec_path).err();
            assert_eq!(got.as_deref(), Some(want), "{object}");
        }
        let many: Vec<Value> = (0..=MAX_LIST_ENTRIES)
            .map(|_| serde_json::json!({}))
            .collect();
        let err = read(
            &raw(serde_json::json!({"spec": {"containers": many}})),
            &["spec"],
        )
        .err()
        .unwrap_or_default();
        assert_eq!(err, "spec.containers: more than 256 entries");
    }

    #[test]
    fn digests_the_caller_did_not_write_are_withheld() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let reason = format!("ghcr.io/a/b:1@{d} no signatures found");
        assert_eq!(
            redact_digests(&reason, "ghcr.io/a/b:1"),
            "ghcr.io/a/b:1@<digest withheld> no signatures found"
        );
        let pinned = format!("ghcr.io/a/b@{d}");
        assert_eq!(redact_digests(&reason, &pinned), reason);
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

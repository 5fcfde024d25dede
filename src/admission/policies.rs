//! `POST /validate/policies`: a ClusterImagePolicy (or TrustRoot) is checked at apply time with
//! exactly the checks `pullgate validate` runs, and refused with every problem and its field
//! path — rather than being accepted and then denying every image it covers.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::{self, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::review::{typed, GroupVersionKind, Request, Response};
use crate::policy::load::{check_version, Objects, Sourced};
use crate::policy::snapshot::Settings;
use crate::policy::types::{ClusterImagePolicy, TrustRoot, GROUP};
use crate::policy::Snapshot;

/// The top level of a `policy.sigstore.dev` object. `spec` is deserialized in a second step
/// straight from the review's text into the policy types; `metadata` is read for its name
/// only and `status` (controllers' business) is skipped unread.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    metadata: Option<Meta>,
    #[serde(borrow)]
    spec: &'a RawValue,
    #[serde(default, rename = "status")]
    _status: Option<IgnoredAny>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Meta {
    name: Option<String>,
}

/// Most `spec.images` entries of one policy checked at admission. Each glob is compiled and
/// each authority built when the policy is checked; a policy beyond these is refused before
/// any is, so one review cannot make the shim compile tens of thousands of them.
pub const MAX_IMAGES: usize = 1024;
/// Most `spec.authorities` entries of one policy checked at admission.
pub const MAX_AUTHORITIES: usize = 128;

/// The length of a list, counted without keeping its entries.
#[derive(Default)]
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Count, D::Error> {
        struct Counter;
        impl<'de> Visitor<'de> for Counter {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
        }
        d.deserialize_seq(Counter)
    }
}

/// How long the lists of a spec are (wrong shapes are left to the typed read).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Lengths {
    images: Option<Count>,
    authorities: Option<Count>,
}

/// Problems with the size of `spec`, found without building anything from it.
fn too_long(spec: &RawValue) -> Vec<String> {
    let Ok(Some(lengths)) = typed::<Option<Lengths>>(spec) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for (field, count, max) in [
        ("images", lengths.images, MAX_IMAGES),
        ("authorities", lengths.authorities, MAX_AUTHORITIES),
    ] {
        if let Some(Count(n)) = count.filter(|c| c.0 > max) {
            found.push(format!(
                "spec.{field}: {n} entries; the admission check takes at most {max} \
                 (split the policy)"
            ));
        }
    }
    found
}

/// Every problem of one `policy.sigstore.dev` object (the raw JSON of a review's object),
/// each `<field path>: <message>`. `kind` is the request's: the API server always sends
/// `apiVersion` and `kind` in the object, but if not, the object is judged as what it was
/// submitted as.
pub fn problems(object: &RawValue, kind: &GroupVersionKind, settings: Settings) -> Vec<String> {
    let at = |path: String, e: String| {
        if path == "." {
            e
        } else {
            format!("{path}: {e}")
        }
    };
    let envelope: Envelope = match typed(object) {
        Ok(e) => e,
        Err((path, e)) => return vec![at(path, e)],
    };
    let api_version = envelope
        .api_version
        .unwrap_or_else(|| format!("{}/{}", kind.group, kind.version));
    let kind = envelope.kind.unwrap_or_else(|| kind.kind.clone());
    let metadata = ObjectMeta {
        name: envelope.metadata.and_then(|m| m.name),
        ..ObjectMeta::default()
    };
    let spec_problem = |(path, e): (String, String)| vec![at(format!("spec.{path}"), e)];
    let too_long = too_long(envelope.spec);
    if !too_long.is_empty() {
        return too_long;
    }
    let mut objects = Objects::default();
    let origin = "object".to_string();
    let group = api_version.split('/').next().unwrap_or_default();
    match (group, kind.as_str()) {
        (GROUP, "ClusterImagePolicy") => {
            if let Err(e) = check_version(&api_version, &["v1alpha1", "v1beta1"]) {
                return vec![e];
            }
            let spec = match typed(envelope.spec) {
                Ok(spec) => spec,
                Err(e) => return spec_problem(e),
            };
            let object = ClusterImagePolicy {
                api_version,
                kind,
                metadata,
                spec,
                status: None,
            };
            objects.cips.push(Sourced { origin, object });
        }
        (GROUP, "TrustRoot") => {
            if let Err(e) = check_version(&api_version, &["v1alpha1"]) {
                return vec![e];
            }
            let spec = match typed(envelope.spec) {
                Ok(spec) => spec,
                Err(e) => return spec_problem(e),
            };
            let object = TrustRoot {
                api_version,
                kind,
                metadata,
                spec,
                status: None,
            };
            objects.trust_roots.push(Sourced { origin, object });
        }
        _ => {
            return vec![format!(
                "unsupported object apiVersion={api_version:?} kind={kind:?}: expected \
                 ClusterImagePolicy or TrustRoot ({GROUP})"
            )]
        }
    }
    Snapshot::build(&objects, settings)
        .problems
        .iter()
        .map(|p| p.problem.to_string())
        .collect()
}

/// Answers a policy review.
pub fn review(snapshot: &Snapshot, req: &Request<'_>) -> Response {
    let ours = req.kind.group == GROUP
        && matches!(req.kind.kind.as_str(), "ClusterImagePolicy" | "TrustRoot");
    if !ours || !matches!(req.operation.as_str(), "CREATE" | "UPDATE") {
        return Response::allow(&req.uid);
    }
    let object = match req.object_or_deny() {
        Ok(object) => object,
        Err(denied) => return denied,
    };
    let found = problems(object, &req.kind, snapshot.settings.clone());
    if found.is_empty() {
        Response::allow(&req.uid)
    } else {
        tracing::warn!(uid = ?req.uid, kind = ?req.kind.kind, problems = ?found, "policy refused");
        Response::deny(&req.uid, format!("validation failed: {}", found.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(v: serde_json::Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    fn cip_kind() -> GroupVersionKind {
        GroupVersionKind {
            group: GROUP.into(),
            version: "v1beta1".into(),
            kind: "ClusterImagePolicy".into(),
        }
    }

    #[test]
    fn every_problem_with_its_path() {
        let cip = serde_json::json!({
            "apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
            "metadata": {"name": "p", "uid": "x", "managedFields": []},
            "spec": {"images": [{"glob": "ghcr.io/**"}, {"glob": "bad glob"}],
                     "authorities": [{"key": {"data": "nope"}}, {"static": {"action": "maybe"}}]}});
        let found = problems(&raw(cip), &cip_kind(), Settings::default());
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found[0].starts_with("spec.images[1].glob: "), "{found:?}");
        assert!(
            found[1].starts_with("spec.authorities[0].key.data: "),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("spec.authorities[1].static.action: "),
            "{found:?}"
        );

        let typo = serde_json::json!({
            "apiVersion": "policy.sigstore.dev/v1alpha1", "kind": "ClusterImagePolicy",
            "metadata": {"name": "p"},
            "spec": {"images": [{"glob": "**"}], "authorities": [{"statik": {}}]}});
        let found = problems(&raw(typo), &cip_kind(), Settings::default());
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("spec.authorities[0].statik: unknown field `statik`"),
            "{found:?}"
        );

        let globs: Vec<serde_json::Value> = (0..=MAX_IMAGES)
            .map(|i| serde_json::json!({"glob": format!("ghcr.io/a/{i}")}))
            .collect();
        let authorities =
            vec![serde_json::json!({"static": {"action": "pass"}}); MAX_AUTHORITIES + 1];
        let huge = serde_json::json!({
            "apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
            "metadata": {"name": "p"},
            "spec": {"images": globs, "authorities": authorities}});
        let found = problems(&raw(huge), &cip_kind(), Settings::default());
        assert_eq!(
            found,
            [
                "spec.images: 1025 entries; the admission check takes at most 1024 (split the policy)",
                "spec.authorities: 129 entries; the admission check takes at most 128 (split the policy)"
            ]
        );
    }
}

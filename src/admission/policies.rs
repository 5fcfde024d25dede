//! `POST /validate/policies`: a ClusterImagePolicy (or TrustRoot) is checked at apply time with
//! exactly the checks `pullgate validate` runs, and refused with every problem and its field
//! path — rather than being accepted and then denying every image it covers.

use serde_json::Value;

use super::review::{Request, Response};
use crate::policy::load::Objects;
use crate::policy::snapshot::Settings;
use crate::policy::types::GROUP;
use crate::policy::Snapshot;

/// Every problem of one `policy.sigstore.dev` object, each `<field path>: <message>`.
pub fn problems(object: &Value, settings: Settings) -> Vec<String> {
    let text = match serde_json::to_string(object) {
        Ok(t) => t,
        Err(e) => return vec![e.to_string()],
    };
    let mut objects = Objects::default();
    if let Err(errors) = objects.load_str(&text, "object") {
        return errors.into_iter().map(|e| e.message).collect();
    }
    Snapshot::build(&objects, settings)
        .problems
        .iter()
        .map(|p| p.problem.to_string())
        .collect()
}

/// Answers a policy review.
pub fn review(snapshot: &Snapshot, req: &Request) -> Response {
    let ours = req.kind.group == GROUP
        && matches!(req.kind.kind.as_str(), "ClusterImagePolicy" | "TrustRoot");
    if !ours || !matches!(req.operation.as_str(), "CREATE" | "UPDATE") {
        return Response::allow(&req.uid);
    }
    let object = match req.object_or_deny() {
        Ok(object) => object,
        Err(denied) => return denied,
    };
    // The API server always sends apiVersion and kind; fill them from the request if not, so
    // the object is judged as what it was submitted as.
    let mut object = object.clone();
    if let Some(map) = object.as_object_mut() {
        map.entry("apiVersion")
            .or_insert_with(|| Value::from(format!("{}/{}", req.kind.group, req.kind.version)));
        map.entry("kind")
            .or_insert_with(|| Value::from(req.kind.kind.clone()));
    }
    let found = problems(&object, snapshot.settings.clone());
    if found.is_empty() {
        Response::allow(&req.uid)
    } else {
        tracing::warn!(uid = %req.uid, kind = %req.kind.kind, problems = ?found, "policy refused");
        Response::deny(&req.uid, format!("validation failed: {}", found.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_with_its_path() {
        let cip = serde_json::json!({
            "apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
            "metadata": {"name": "p", "uid": "x", "managedFields": []},
            "spec": {"images": [{"glob": "ghcr.io/**"}, {"glob": "bad glob"}],
                     "authorities": [{"key": {"data": "nope"}}, {"static": {"action": "maybe"}}]}});
        let found = problems(&cip, Settings::default());
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
        let found = problems(&typo, Settings::default());
        assert_eq!(found.len(), 1);
        assert!(
            found[0].starts_with("spec.authorities[0].statik: unknown field `statik`"),
            "{found:?}"
        );
    }
}

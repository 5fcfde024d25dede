//! `POST /mutate/namespaces`: with `--enforce-by-default`, a new namespace is labelled
//! `policy.sigstore.dev/include=true` unless it is excluded, so the shim and every node (which
//! read the label) agree on what is enforced.

use serde_json::{json, Value};

use super::review::{Request, Response};
use crate::policy::snapshot::{Settings, EXCLUDE_LABEL, INCLUDE_LABEL};

/// A JSON pointer token: `~` → `~0`, `/` → `~1` (RFC 6901).
pub fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSONPatch that labels `namespace` for enforcement, or `None` when it must stay as it
/// is: exempt by flag, labelled `policy.sigstore.dev/exclude=true`, or already carrying an
/// include label (whatever its value: an explicit choice is kept).
pub fn include_patch(namespace: &Value, settings: &Settings) -> Option<Value> {
    let name = namespace
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if settings.exempt_namespaces.contains(name) {
        return None;
    }
    let labels = namespace
        .pointer("/metadata/labels")
        .filter(|l| !l.is_null());
    let label = |key: &str| labels.and_then(|l| l.get(key));
    if label(EXCLUDE_LABEL).and_then(Value::as_str) == Some("true")
        || label(INCLUDE_LABEL).is_some()
    {
        return None;
    }
    let patch = if namespace.get("metadata").is_none_or(Value::is_null) {
        json!([{"op": "add", "path": "/metadata", "value": {"labels": {INCLUDE_LABEL: "true"}}}])
    } else if labels.is_none() {
        json!([{"op": "add", "path": "/metadata/labels", "value": {INCLUDE_LABEL: "true"}}])
    } else {
        json!([{"op": "add", "path": format!("/metadata/labels/{}", pointer_token(INCLUDE_LABEL)), "value": "true"}])
    };
    Some(patch)
}

/// Answers a namespace review.
pub fn review(settings: &Settings, enforce_by_default: bool, req: &Request) -> Response {
    let mut response = Response::allow(&req.uid);
    let creating_namespace =
        req.operation == "CREATE" && req.kind.group.is_empty() && req.kind.kind == "Namespace";
    if !enforce_by_default || !creating_namespace {
        return response;
    }
    if let Some(patch) = req.object.as_ref().and_then(|o| include_patch(o, settings)) {
        tracing::info!(uid = %req.uid, namespace = ?req.name, "namespace marked for enforcement");
        response.patch = serde_json::to_vec(&patch).ok();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patches() {
        let s = Settings::default();
        assert_eq!(
            include_patch(&json!({"metadata": {"name": "a"}}), &s),
            Some(
                json!([{"op": "add", "path": "/metadata/labels", "value": {"policy.sigstore.dev/include": "true"}}])
            )
        );
        assert_eq!(
            include_patch(
                &json!({"metadata": {"name": "a", "labels": {"x": "y"}}}),
                &s
            ),
            Some(
                json!([{"op": "add", "path": "/metadata/labels/policy.sigstore.dev~1include", "value": "true"}])
            )
        );
        let kept = [
            json!({"metadata": {"name": "kube-system"}}),
            json!({"metadata": {"name": "a", "labels": {"policy.sigstore.dev/exclude": "true"}}}),
            json!({"metadata": {"name": "a", "labels": {"policy.sigstore.dev/include": "false"}}}),
        ];
        for ns in kept {
            assert_eq!(include_patch(&ns, &s), None, "{ns}");
        }
        assert_eq!(pointer_token("a~b/c"), "a~0b~1c");
    }
}

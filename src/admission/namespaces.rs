//! `POST /mutate/namespaces`: with `--enforce-by-default`, a new namespace is labelled
//! `policy.sigstore.dev/include=true` unless it is excluded, so the shim and every node (which
//! read the label) agree on what is enforced.

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};

use super::review::{typed, Request, Response};
use crate::policy::snapshot::{Settings, INCLUDE_LABEL};

/// What the webhook reads of a Namespace: its name and labels; the rest is skipped unread.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Namespace {
    pub metadata: Option<NamespaceMeta>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NamespaceMeta {
    pub name: Option<String>,
    pub labels: Option<Labels>,
}

/// The two labels the webhook looks at (`policy.sigstore.dev/include` and
/// `policy.sigstore.dev/exclude`); other labels are skipped unread.
#[derive(Debug, Default, Deserialize)]
pub struct Labels {
    #[serde(default, rename = "policy.sigstore.dev/include")]
    pub include: Option<IgnoredAny>,
    #[serde(default, rename = "policy.sigstore.dev/exclude")]
    pub exclude: Option<Value>,
}

/// A JSON pointer token: `~` → `~0`, `/` → `~1` (RFC 6901).
pub fn pointer_token(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The JSONPatch that labels `namespace` for enforcement, or `None` when it must stay as it
/// is: exempt by flag, labelled `policy.sigstore.dev/exclude=true`, or already carrying an
/// include label (whatever its value: an explicit choice is kept).
pub fn include_patch(namespace: &Namespace, settings: &Settings) -> Option<Value> {
    let meta = namespace.metadata.as_ref();
    let name = meta.and_then(|m| m.name.as_deref()).unwrap_or_default();
    if settings.exempt_namespaces.contains(name) {
        return None;
    }
    let labels = meta.and_then(|m| m.labels.as_ref());
    let excluded = labels
        .and_then(|l| l.exclude.as_ref())
        .and_then(Value::as_str)
        == Some("true");
    if excluded || labels.is_some_and(|l| l.include.is_some()) {
        return None;
    }
    let patch = if meta.is_none() {
        json!([{"op": "add", "path": "/metadata", "value": {"labels": {INCLUDE_LABEL: "true"}}}])
    } else if labels.is_none() {
        json!([{"op": "add", "path": "/metadata/labels", "value": {INCLUDE_LABEL: "true"}}])
    } else {
        json!([{"op": "add", "path": format!("/metadata/labels/{}", pointer_token(INCLUDE_LABEL)), "value": "true"}])
    };
    Some(patch)
}

/// Answers a namespace review. An object that is not a readable Namespace is left as it is
/// (the API server validates Namespaces; this webhook only adds a label).
pub fn review(settings: &Settings, enforce_by_default: bool, req: &Request<'_>) -> Response {
    let mut response = Response::allow(&req.uid);
    let creating_namespace =
        req.operation == "CREATE" && req.kind.group.is_empty() && req.kind.kind == "Namespace";
    if !enforce_by_default || !creating_namespace {
        return response;
    }
    let namespace = req.object.and_then(|o| typed::<Namespace>(o).ok());
    if let Some(patch) = namespace.and_then(|ns| include_patch(&ns, settings)) {
        tracing::info!(uid = ?req.uid, namespace = ?req.name, "namespace marked for enforcement");
        response.patch = serde_json::to_vec(&patch).ok();
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(v: Value) -> Namespace {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn patches() {
        let s = Settings::default();
        assert_eq!(
            include_patch(&ns(json!({"metadata": {"name": "a"}})), &s),
            Some(
                json!([{"op": "add", "path": "/metadata/labels", "value": {"policy.sigstore.dev/include": "true"}}])
            )
        );
        assert_eq!(
            include_patch(
                &ns(json!({"metadata": {"name": "a", "labels": {"x": "y"}}})),
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
        for n in kept {
            assert_eq!(include_patch(&ns(n.clone()), &s), None, "{n}");
        }
        assert_eq!(pointer_token("a~b/c"), "a~0b~1c");
    }
}

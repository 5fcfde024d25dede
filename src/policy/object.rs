//! What a CIP-level `spec.policy` may read besides the authorities' matches, and where each
//! part comes from. policy-controller adds them to its result document under these keys:
//!
//! | flag | key | value |
//! |---|---|---|
//! | `fetchConfigFile` | `config` | the image's OCI config file per platform, keyed `os/arch[/variant][:osversion]` |
//! | `includeSpec` | `spec` | the admission object's `spec` |
//! | `includeObjectMeta` | `metadata` | the admission object's `metadata` |
//! | `includeTypeMeta` | `typemeta` | the admission object's `{"apiVersion", "kind"}` |
//!
//! The admission shim knows the whole object. The node decides a CRI pull, which carries the
//! pod's sandbox config (name, namespace, uid, labels, annotations) but not its spec: the node
//! fills `metadata` and `typemeta` from that and has no `spec`. A policy asking for a part
//! that is not known fails (see [`AdmissionObject::part`]), never evaluates without it.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value};
use sha2::Digest as _;

use super::types::Policy;

/// Labels kubelet adds to a pod's sandbox; not the pod's own.
const KUBELET_SANDBOX_LABELS: [&str; 3] = [
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.uid",
];

/// Which extra inputs a CIP-level policy asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Includes {
    pub config: bool,
    pub spec: bool,
    pub metadata: bool,
    pub typemeta: bool,
}

impl Includes {
    pub fn of(policy: &Policy) -> Includes {
        let on = |flag: Option<bool>| flag == Some(true);
        Includes {
            config: on(policy.fetch_config_file),
            spec: on(policy.include_spec),
            metadata: on(policy.include_object_meta),
            typemeta: on(policy.include_type_meta),
        }
    }

    pub fn union(self, other: Includes) -> Includes {
        Includes {
            config: self.config || other.config,
            spec: self.spec || other.spec,
            metadata: self.metadata || other.metadata,
            typemeta: self.typemeta || other.typemeta,
        }
    }

    /// Whether any part of the admission object is asked for.
    pub fn object(self) -> bool {
        self.spec || self.metadata || self.typemeta
    }

    /// The object parts asked for: (document key, flag name).
    fn object_parts(self) -> impl Iterator<Item = (Part, &'static str)> {
        [
            (self.spec, Part::Spec, "includeSpec"),
            (self.metadata, Part::Metadata, "includeObjectMeta"),
            (self.typemeta, Part::TypeMeta, "includeTypeMeta"),
        ]
        .into_iter()
        .filter(|(on, _, _)| *on)
        .map(|(_, part, flag)| (part, flag))
    }
}

/// A part of the admission object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Spec,
    Metadata,
    TypeMeta,
}

impl Part {
    /// Its key in the policy document (policy-controller's).
    pub fn key(self) -> &'static str {
        match self {
            Part::Spec => "spec",
            Part::Metadata => "metadata",
            Part::TypeMeta => "typemeta",
        }
    }
}

/// Where an object's parts were read, named in the reason when a part is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectSource {
    /// The object of an AdmissionReview.
    Admission,
    /// A CRI pull's pod sandbox config, at the node.
    PodSandbox,
    /// A manifest given to `pullgate verify --object`.
    Manifest,
}

/// The Kubernetes object an image is decided for, as far as the front door knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionObject {
    pub source: ObjectSource,
    pub spec: Option<Value>,
    pub metadata: Option<Value>,
    pub typemeta: Option<Value>,
}

impl AdmissionObject {
    /// The parts of a whole object (an admission request's, or a manifest): its `spec`,
    /// `metadata`, and `apiVersion`/`kind` as `typemeta`.
    pub fn from_object(source: ObjectSource, object: &Value) -> AdmissionObject {
        let field = |k: &str| object.get(k).filter(|v| !v.is_null()).cloned();
        let mut typemeta = Map::new();
        for key in ["kind", "apiVersion"] {
            if let Some(v) = field(key) {
                typemeta.insert(key.to_string(), v);
            }
        }
        AdmissionObject {
            source,
            spec: field("spec"),
            metadata: field("metadata"),
            typemeta: (!typemeta.is_empty()).then_some(Value::Object(typemeta)),
        }
    }

    /// What the node knows of a pod from a CRI pull's sandbox config (copied by kubelet from
    /// the Pod): `metadata` with name, namespace, uid, labels (without the `io.kubernetes.pod.*`
    /// ones kubelet adds) and annotations; `typemeta` `v1`/`Pod`; no `spec`.
    pub fn from_pod_sandbox(
        name: &str,
        namespace: &str,
        uid: &str,
        labels: &HashMap<String, String>,
        annotations: &HashMap<String, String>,
    ) -> AdmissionObject {
        let labels: BTreeMap<&str, &str> = labels
            .iter()
            .filter(|(k, _)| !KUBELET_SANDBOX_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let annotations: BTreeMap<&str, &str> = annotations
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut metadata = Map::new();
        for (key, value) in [("name", name), ("namespace", namespace), ("uid", uid)] {
            if !value.is_empty() {
                metadata.insert(key.to_string(), json!(value));
            }
        }
        if !labels.is_empty() {
            metadata.insert("labels".into(), json!(labels));
        }
        if !annotations.is_empty() {
            metadata.insert("annotations".into(), json!(annotations));
        }
        AdmissionObject {
            source: ObjectSource::PodSandbox,
            spec: None,
            metadata: Some(Value::Object(metadata)),
            typemeta: Some(json!({"kind": "Pod", "apiVersion": "v1"})),
        }
    }

    pub fn part(&self, part: Part) -> Option<&Value> {
        match part {
            Part::Spec => self.spec.as_ref(),
            Part::Metadata => self.metadata.as_ref(),
            Part::TypeMeta => self.typemeta.as_ref(),
        }
    }

    /// A digest of the parts `wanted` asks for: a verdict that read them is cached per object.
    /// Empty when no part is asked for.
    pub fn cache_key(&self, wanted: Includes) -> String {
        if !wanted.object() {
            return String::new();
        }
        let mut hasher = sha2::Sha256::new();
        for (part, _) in wanted.object_parts() {
            hasher.update(part.key());
            hasher.update(b"\0");
            if let Some(v) = self.part(part) {
                hasher.update(v.to_string());
            }
            hasher.update(b"\0");
        }
        hex::encode(hasher.finalize())
    }
}

/// Adds the object parts `wanted` asks for to `document`, or says which one is not known here.
pub fn add_object_parts(
    document: &mut Map<String, Value>,
    wanted: Includes,
    object: Option<&AdmissionObject>,
) -> Result<(), String> {
    for (part, flag) in wanted.object_parts() {
        match object.and_then(|o| o.part(part)) {
            Some(v) => {
                document.insert(part.key().to_string(), v.clone());
            }
            None => return Err(missing(part, flag, object.map(|o| o.source))),
        }
    }
    Ok(())
}

/// The reason a policy that reads `part` cannot be evaluated here.
fn missing(part: Part, flag: &str, source: Option<ObjectSource>) -> String {
    let key = part.key();
    match source {
        Some(ObjectSource::PodSandbox) => format!(
            "{flag}: the node does not know the pod's {key} (a CRI pull carries the pod's \
             metadata, not its spec), so it cannot evaluate this policy and refuses the image; \
             the admission shim evaluates it with the whole object"
        ),
        Some(ObjectSource::Admission) => {
            format!("{flag}: the admission object has no {key}")
        }
        Some(ObjectSource::Manifest) => {
            format!("{flag}: the object given with --object has no {key}")
        }
        None => format!(
            "{flag}: no Kubernetes object is known for this decision, so the policy cannot read \
             its {key} (pullgate verify: pass the workload with --object)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn review_object_parts_and_sandbox_parts() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "labels": {"team": "a"}},
            "spec": {"serviceAccountName": "builder"}});
        let o = AdmissionObject::from_object(ObjectSource::Admission, &pod);
        assert_eq!(o.typemeta, Some(json!({"apiVersion": "v1", "kind": "Pod"})));
        assert_eq!(o.spec, Some(json!({"serviceAccountName": "builder"})));

        let labels = HashMap::from([
            ("team".to_string(), "a".to_string()),
            ("io.kubernetes.pod.name".to_string(), "web".to_string()),
        ]);
        let node =
            AdmissionObject::from_pod_sandbox("web", "demo", "u-1", &labels, &HashMap::new());
        assert_eq!(
            node.metadata,
            Some(
                json!({"name": "web", "namespace": "demo", "uid": "u-1", "labels": {"team": "a"}})
            )
        );
        assert_eq!(node.spec, None);

        let wanted = Includes {
            spec: true,
            metadata: true,
            ..Includes::default()
        };
        let mut doc = Map::new();
        let err = add_object_parts(&mut doc, wanted, Some(&node)).unwrap_err();
        assert!(
            err.starts_with("includeSpec: the node does not know the pod's spec"),
            "{err}"
        );
        let mut doc = Map::new();
        add_object_parts(&mut doc, wanted, Some(&o)).unwrap();
        assert_eq!(doc["metadata"]["labels"]["team"], "a");
        assert!(add_object_parts(&mut Map::new(), wanted, None)
            .unwrap_err()
            .contains("--object"));
        // Only the parts asked for key the cache.
        assert_eq!(o.cache_key(Includes::default()), "");
        let meta_only = Includes {
            metadata: true,
            ..Includes::default()
        };
        let mut other = o.clone();
        other.spec = None;
        assert_eq!(o.cache_key(meta_only), other.cache_key(meta_only));
        assert_ne!(o.cache_key(wanted), other.cache_key(wanted));
    }
}

//! Every manifest under `deploy/` parses into its typed Kubernetes object (k8s-openapi), with
//! no field the type does not know, and says what a safe install needs: webhooks that fail
//! closed on the paths the shim serves, least-privilege RBAC, CRDs that accept every policy
//! pullgate accepts (and nothing it does not), and a node installer that ships the repository's
//! own unit files and flags the binary understands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser as _;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use pullgate::admission::Webhook;
use pullgate::cli::{Cli, Command};
use pullgate::policy::types::{ClusterImagePolicy, TrustRoot};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// Every object of every manifest, typed.
#[derive(Default)]
struct Manifests {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    role_bindings: Vec<RoleBinding>,
    crds: Vec<CustomResourceDefinition>,
    deployments: Vec<Deployment>,
    daemon_sets: Vec<DaemonSet>,
    services: Vec<Service>,
    config_maps: Vec<ConfigMap>,
    pdbs: Vec<PodDisruptionBudget>,
    validating: Vec<ValidatingWebhookConfiguration>,
    mutating: Vec<MutatingWebhookConfiguration>,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The YAML documents of `path` as JSON values (aliases expanded).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `value` as `T` (naming the failing field) and checks nothing was dropped: the typed
/// object serializes back to exactly the document, so a misspelt field cannot hide.
fn typed<T: DeserializeOwned + Serialize>(value: &Value, origin: &str) -> T {
    let object: T = serde_path_to_error::deserialize(value)
        .unwrap_or_else(|e| panic!("{origin}: {}: {}", e.path(), e.inner()));
    let back = serde_json::to_value(&object).unwrap();
    if let Some(path) = first_difference(value, &back, String::new()) {
        panic!("{origin}: field {path} is not part of the typed object (misspelt?)");
    }
    object
}

fn first_difference(a: &Value, b: &Value, at: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) => {
                        if let Some(p) = first_difference(v, w, format!("{at}.{k}")) {
                            return Some(p);
                        }
                    }
                    None => return Some(format!("{at}.{k}")),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(at),
    }
}

fn load() -> Manifests {
    let mut m = Manifests::default();
    let files = yaml_files(&root().join("deploy"));
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        for (i, doc) in documents(&file).into_iter().enumerate() {
            let origin = format!("{} document {}", file.display(), i + 1);
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match (
                doc["apiVersion"].as_str().unwrap_or_default(),
                kind.as_str(),
            ) {
                ("v1", "Namespace") => m.namespaces.push(typed(&doc, &origin)),
                ("v1", "ServiceAccount") => m.service_accounts.push(typed(&doc, &origin)),
                ("v1", "Service") => m.services.push(typed(&doc, &origin)),
                ("v1", "ConfigMap") => m.config_maps.push(typed(&doc, &origin)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    m.cluster_roles.push(typed(&doc, &origin))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => m.roles.push(typed(&doc, &origin)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    m.cluster_role_bindings.push(typed(&doc, &origin))
                }
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    m.role_bindings.push(typed(&doc, &origin))
                }
                ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                    m.crds.push(typed(&doc, &origin))
                }
                ("apps/v1", "Deployment") => m.deployments.push(typed(&doc, &origin)),
                ("apps/v1", "DaemonSet") => m.daemon_sets.push(typed(&doc, &origin)),
                ("policy/v1", "PodDisruptionBudget") => m.pdbs.push(typed(&doc, &origin)),
                ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
                    m.validating.push(typed(&doc, &origin))
                }
                ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
                    m.mutating.push(typed(&doc, &origin))
                }
                (api_version, kind) => panic!("{origin}: unexpected {api_version} {kind}"),
            }
        }
    }
    m
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.name.as_deref().unwrap_or_default()
}

#[test]
fn every_manifest_is_a_typed_object() {
    let m = load();
    assert_eq!(m.crds.len(), 2);
    assert_eq!(m.deployments.len(), 1);
    assert_eq!(m.daemon_sets.len(), 1);
    assert_eq!(m.validating.len(), 1);
    assert_eq!(m.mutating.len(), 1);
    assert_eq!(m.services.len(), 1);
    assert_eq!(m.service_accounts.len(), 2);
    // Everything namespaced lands in a namespace the manifests create.
    let namespaces: Vec<&str> = m.namespaces.iter().map(|n| name_of(&n.metadata)).collect();
    for ns in m
        .deployments
        .iter()
        .map(|o| &o.metadata)
        .chain(m.daemon_sets.iter().map(|o| &o.metadata))
        .chain(m.services.iter().map(|o| &o.metadata))
        .chain(m.config_maps.iter().map(|o| &o.metadata))
        .chain(m.roles.iter().map(|o| &o.metadata))
        .chain(m.role_bindings.iter().map(|o| &o.metadata))
        .chain(m.service_accounts.iter().map(|o| &o.metadata))
        .map(|meta| {
            meta.namespace
                .as_deref()
                .expect("namespaced object without namespace")
        })
    {
        assert!(namespaces.contains(&ns), "{ns} not created by deploy/");
    }
}

#[test]
fn webhooks_fail_closed_on_paths_the_shim_serves() {
    let m = load();
    let service = &m.services[0];
    let paths: Vec<&str> = Webhook::ALL.iter().map(|w| w.path()).collect();
    let validating = &m.validating[0];
    let mutating = &m.mutating[0];
    let mut seen = Vec::new();
    let check =
        |name: &str,
         failure: Option<&String>,
         side: &str,
         versions: &[String],
         config: &k8s_openapi::api::admissionregistration::v1::WebhookClientConfig| {
            assert_eq!(failure.map(String::as_str), Some("Fail"), "{name}");
            assert_eq!(side, "None", "{name}");
            assert!(versions.iter().any(|v| v == "v1"), "{name}");
            let svc = config.service.as_ref().expect("in-cluster service");
            assert_eq!(svc.name, name_of(&service.metadata), "{name}");
            assert_eq!(
                Some(svc.namespace.as_str()),
                service.metadata.namespace.as_deref()
            );
            assert_eq!(svc.port, Some(443));
            let path = svc.path.clone().unwrap_or_default();
            assert!(paths.contains(&path.as_str()), "{name}: {path} not served");
            path
        };
    for w in validating.webhooks.iter().flatten() {
        seen.push(check(
            &w.name,
            w.failure_policy.as_ref(),
            &w.side_effects,
            &w.admission_review_versions,
            &w.client_config,
        ));
    }
    for w in mutating.webhooks.iter().flatten() {
        seen.push(check(
            &w.name,
            w.failure_policy.as_ref(),
            &w.side_effects,
            &w.admission_review_versions,
            &w.client_config,
        ));
    }
    seen.sort();
    let mut all: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    all.sort();
    assert_eq!(seen, all, "one webhook per path");

    let workloads = validating
        .webhooks
        .iter()
        .flatten()
        .find(|w| {
            w.client_config.service.as_ref().unwrap().path.as_deref() == Some("/validate/workloads")
        })
        .unwrap();
    let selector = workloads
        .namespace_selector
        .as_ref()
        .expect("namespaceSelector");
    assert_eq!(
        selector
            .match_labels
            .as_ref()
            .and_then(|l| l.get("policy.sigstore.dev/include"))
            .map(String::as_str),
        Some("true"),
        "the shim checks the namespaces the nodes enforce"
    );
    let resources = resources_of(workloads.rules.as_deref().unwrap_or_default());
    for want in [
        "/pods",
        "/pods/ephemeralcontainers",
        "apps/deployments",
        "apps/replicasets",
        "apps/statefulsets",
        "apps/daemonsets",
        "batch/jobs",
        "batch/cronjobs",
    ] {
        assert!(
            resources.contains(&want.to_string()),
            "{want} not reviewed: {resources:?}"
        );
    }
    let policies = validating
        .webhooks
        .iter()
        .flatten()
        .find(|w| {
            w.client_config.service.as_ref().unwrap().path.as_deref() == Some("/validate/policies")
        })
        .unwrap();
    let resources = resources_of(policies.rules.as_deref().unwrap_or_default());
    for want in [
        "policy.sigstore.dev/clusterimagepolicies",
        "policy.sigstore.dev/trustroots",
    ] {
        assert!(resources.contains(&want.to_string()), "{resources:?}");
    }

    // The namespace webhook never sees the system namespaces: a broken shim cannot lock the
    // cluster out of them.
    let ns_hook = &mutating.webhooks.as_ref().unwrap()[0];
    let expr = &ns_hook
        .object_selector
        .as_ref()
        .unwrap()
        .match_expressions
        .as_ref()
        .unwrap()[0];
    assert_eq!(expr.key, "kubernetes.io/metadata.name");
    assert_eq!(expr.operator, "NotIn");
    for ns in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "pullgate-system",
    ] {
        assert!(expr.values.iter().flatten().any(|v| v == ns), "{ns}");
    }
    let ops = &ns_hook.rules.as_ref().unwrap()[0].operations;
    assert_eq!(ops.as_deref(), Some(&["CREATE".to_string()][..]));
}

fn resources_of(rules: &[RuleWithOperations]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                out.push(format!("{g}/{res}"));
            }
        }
        let ops = r.operations.clone().unwrap_or_default();
        assert!(ops.contains(&"CREATE".to_string()), "{r:?}");
    }
    out
}

/// (namespace or "*" for cluster-wide, rule) for every rule bound to the service account.
fn grants(m: &Manifests, account: &str) -> Vec<(String, PolicyRule)> {
    let bound = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some("pullgate-system")
        })
    };
    let mut out = Vec::new();
    for b in m
        .cluster_role_bindings
        .iter()
        .filter(|b| bound(&b.subjects))
    {
        assert_eq!(b.role_ref.kind, "ClusterRole");
        let role = m
            .cluster_roles
            .iter()
            .find(|r| name_of(&r.metadata) == b.role_ref.name)
            .unwrap_or_else(|| panic!("ClusterRole {} missing", b.role_ref.name));
        out.extend(
            role.rules
                .iter()
                .flatten()
                .map(|r| ("*".to_string(), r.clone())),
        );
    }
    for b in m.role_bindings.iter().filter(|b| bound(&b.subjects)) {
        assert_eq!(
            b.role_ref.kind, "Role",
            "bind ClusterRoles cluster-wide only on purpose"
        );
        let ns = b.metadata.namespace.clone().unwrap();
        let role = m
            .roles
            .iter()
            .find(|r| {
                name_of(&r.metadata) == b.role_ref.name
                    && r.metadata.namespace.as_ref() == Some(&ns)
            })
            .unwrap_or_else(|| panic!("Role {ns}/{} missing", b.role_ref.name));
        out.extend(role.rules.iter().flatten().map(|r| (ns.clone(), r.clone())));
    }
    out
}

/// "namespace resource verb" strings of `grants`.
fn permissions(grants: &[(String, PolicyRule)]) -> Vec<String> {
    let mut out = Vec::new();
    for (ns, rule) in grants {
        for res in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                out.push(format!("{ns} {res} {verb}"));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn nodes_get_list_and_watch_on_only_what_they_need() {
    let m = load();
    let node = permissions(&grants(&m, "pullgate-node"));
    assert_eq!(
        node,
        [
            "* clusterimagepolicies list",
            "* clusterimagepolicies watch",
            "* namespaces list",
            "* namespaces watch",
            "* trustroots list",
            "* trustroots watch",
            "cosign-system configmaps list",
            "cosign-system configmaps watch",
            "cosign-system secrets list",
            "cosign-system secrets watch",
        ]
    );
    let admission = permissions(&grants(&m, "pullgate-admission"));
    assert!(
        admission.contains(&"* secrets get".to_string()),
        "imagePullSecrets: {admission:?}"
    );
    assert!(
        !admission
            .iter()
            .any(|p| p.starts_with("* secrets list") || p.starts_with("* secrets watch")),
        "{admission:?}"
    );
    for p in admission.iter().chain(&node) {
        let verb = p.rsplit(' ').next().unwrap();
        assert!(["get", "list", "watch"].contains(&verb), "read-only: {p}");
    }
    // The workloads run as the accounts granted.
    assert_eq!(
        m.daemon_sets[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("pullgate-node")
    );
    assert_eq!(
        m.deployments[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some("pullgate-admission")
    );
}

fn crd<'a>(m: &'a Manifests, name: &str) -> &'a CustomResourceDefinition {
    m.crds
        .iter()
        .find(|c| name_of(&c.metadata) == name)
        .unwrap_or_else(|| panic!("CRD {name} missing"))
}

#[test]
fn crds_match_policy_controller_names_and_versions() {
    let m = load();
    let cip = crd(&m, "clusterimagepolicies.policy.sigstore.dev");
    assert_eq!(cip.spec.group, "policy.sigstore.dev");
    assert_eq!(cip.spec.scope, "Cluster");
    assert_eq!(cip.spec.names.kind, "ClusterImagePolicy");
    assert_eq!(cip.spec.names.plural, "clusterimagepolicies");
    assert_eq!(
        cip.spec.names.short_names.as_deref(),
        Some(&["cip".to_string()][..])
    );
    let versions: Vec<(&str, bool, bool)> = cip
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(
        versions,
        [("v1alpha1", true, false), ("v1beta1", true, true)]
    );
    assert_eq!(
        cip.spec.versions[0].schema, cip.spec.versions[1].schema,
        "both versions share one schema"
    );
    let tr = crd(&m, "trustroots.policy.sigstore.dev");
    assert_eq!(tr.spec.scope, "Cluster");
    assert_eq!(tr.spec.names.kind, "TrustRoot");
    let versions: Vec<(&str, bool, bool)> = tr
        .spec
        .versions
        .iter()
        .map(|v| (v.name.as_str(), v.served, v.storage))
        .collect();
    assert_eq!(versions, [("v1alpha1", true, true)]);
    for c in [cip, tr] {
        for v in &c.spec.versions {
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "status subresource"
            );
        }
    }
}

fn schema_of(c: &CustomResourceDefinition) -> &JSONSchemaProps {
    c.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap()
}

/// Structural check of `value` against `schema`: every field declared, every type right.
fn conforms(value: &Value, schema: &JSONSchemaProps, at: &str) -> Result<(), String> {
    if schema.x_kubernetes_preserve_unknown_fields == Some(true) {
        return Ok(());
    }
    let ty = schema.type_.as_deref().unwrap_or_default();
    match (ty, value) {
        ("object", Value::Object(map)) => {
            for (k, v) in map {
                if at.is_empty() && ["apiVersion", "kind", "metadata"].contains(&k.as_str()) {
                    continue;
                }
                let field = format!("{at}.{k}");
                if let Some(p) = schema.properties.as_ref().and_then(|p| p.get(k)) {
                    conforms(v, p, &field)?;
                } else if let Some(JSONSchemaPropsOrBool::Schema(p)) = &schema.additional_properties
                {
                    conforms(v, p, &field)?;
                } else {
                    return Err(format!("{field}: not declared in the CRD schema"));
                }
            }
            Ok(())
        }
        ("array", Value::Array(items)) => {
            let Some(JSONSchemaPropsOrArray::Schema(item)) = &schema.items else {
                return Err(format!("{at}: array without an item schema"));
            };
            for (i, v) in items.iter().enumerate() {
                conforms(v, item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        ("string", Value::String(_)) | ("boolean", Value::Bool(_)) => Ok(()),
        ("integer", Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(()),
        _ => Err(format!("{at}: {value} is not of type {ty:?}")),
    }
}

/// One value for every field the schema declares (one item per array).
fn maximal(schema: &JSONSchemaProps) -> Value {
    match schema.type_.as_deref() {
        Some("object") => match &schema.properties {
            Some(props) => {
                Value::Object(props.iter().map(|(k, p)| (k.clone(), maximal(p))).collect())
            }
            None => json!({"k": "v"}),
        },
        Some("array") => match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(item)) => json!([maximal(item)]),
            _ => json!([]),
        },
        Some("boolean") => json!(true),
        Some("integer") => json!(1),
        _ => json!("x"),
    }
}

/// Every CIP and TrustRoot the repository ships or tests with.
fn policy_documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    let mut files = yaml_files(&root().join("examples/policies"));
    files.extend(yaml_files(&root().join("kind-config/policies")));
    files.push(root().join("tests/fixtures/trustroots.yaml"));
    for file in files {
        for (i, d) in documents(&file).into_iter().enumerate() {
            docs.push((format!("{} #{}", file.display(), i + 1), d));
        }
    }
    // The validation table's specs, wrapped as CIPs (those pullgate refuses as unknown fields
    // are skipped by the caller).
    let table = documents(&root().join("tests/fixtures/cip_validation.yaml"));
    for case in table[0].as_array().unwrap() {
        let spec = case["spec"].clone();
        docs.push((
            format!("cip_validation.yaml {}", case["name"]),
            json!({"apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
                   "metadata": {"name": "c"}, "spec": spec}),
        ));
    }
    for file in std::fs::read_dir(root().join("tests/fixtures/admission")).unwrap() {
        let path = file.unwrap().path();
        let review: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let object = review["request"]["object"].clone();
        docs.push((path.display().to_string(), object));
    }
    docs.into_iter()
        .filter(|(_, d)| matches!(d["kind"].as_str(), Some("ClusterImagePolicy" | "TrustRoot")))
        .collect()
}

#[test]
fn crd_schemas_accept_every_policy_pullgate_accepts_and_no_field_it_does_not_know() {
    let m = load();
    let cip = schema_of(crd(&m, "clusterimagepolicies.policy.sigstore.dev"));
    let tr = schema_of(crd(&m, "trustroots.policy.sigstore.dev"));
    let docs = policy_documents();
    let (mut cips, mut trust_roots) = (0, 0);
    for (origin, doc) in &docs {
        let strict = match doc["kind"].as_str() {
            Some("ClusterImagePolicy") => {
                cips += 1;
                serde_json::from_value::<ClusterImagePolicy>(doc.clone()).map(|_| ())
            }
            _ => {
                trust_roots += 1;
                serde_json::from_value::<TrustRoot>(doc.clone()).map(|_| ())
            }
        };
        // Documents pullgate refuses (unknown fields, on purpose) need not fit the schema.
        if strict.is_err() {
            continue;
        }
        let schema = if doc["kind"] == "TrustRoot" { tr } else { cip };
        conforms(doc, schema, "").unwrap_or_else(|e| panic!("{origin}: {e}"));
    }
    assert!(
        cips >= 30 && trust_roots >= 1,
        "{cips} CIPs, {trust_roots} TrustRoots checked"
    );

    // The other way round: an object with every field the schema declares parses with
    // pullgate's strict model, so the CRD admits nothing pullgate would reject as unknown.
    let mut full = maximal(cip);
    full["apiVersion"] = json!("policy.sigstore.dev/v1beta1");
    full["kind"] = json!("ClusterImagePolicy");
    full["metadata"] = json!({"name": "full"});
    serde_path_to_error::deserialize::<_, ClusterImagePolicy>(&full)
        .unwrap_or_else(|e| panic!("CRD field {} unknown to pullgate: {}", e.path(), e.inner()));
    let mut full = maximal(tr);
    full["metadata"] = json!({"name": "full"});
    serde_path_to_error::deserialize::<_, TrustRoot>(&full)
        .unwrap_or_else(|e| panic!("CRD field {} unknown to pullgate: {}", e.path(), e.inner()));

    // And the checker itself rejects what it must.
    let typo = json!({"spec": {"authorities": [{"key": {"hashAlgoritm": "sha256"}}]}});
    assert_eq!(
        conforms(&typo, cip, "").unwrap_err(),
        ".spec.authorities[0].key.hashAlgoritm: not declared in the CRD schema"
    );
    let wrong_type = json!({"spec": {"images": {"glob": "x"}}});
    assert!(conforms(&wrong_type, cip, "")
        .unwrap_err()
        .contains("not of type \"array\""));
}

fn args_of(container: &k8s_openapi::api::core::v1::Container) -> Vec<String> {
    let mut argv = vec!["pullgate".to_string()];
    argv.extend(container.args.iter().flatten().cloned());
    argv
}

#[test]
fn admission_deployment_runs_flags_the_binary_understands() {
    let m = load();
    let deploy = &m.deployments[0];
    let spec = deploy.spec.as_ref().unwrap();
    assert!(
        spec.replicas.unwrap_or(1) >= 2,
        "webhooks fail closed: more than one replica"
    );
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let argv = args_of(c);
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Admission(args) = cli.command else {
        panic!("not the admission subcommand: {argv:?}");
    };
    assert!(args.cluster.in_cluster, "policies from the API server");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .unwrap();
    assert!(args.tls_cert.starts_with(&mount.mount_path));
    assert!(args.tls_key.starts_with(&mount.mount_path));
    let port = args.listen.port();
    let declared = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https"))
        .unwrap();
    assert_eq!(declared.container_port, i32::from(port));
    let ready = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(
        (ready.path.as_deref(), ready.scheme.as_deref()),
        (Some("/readyz"), Some("HTTPS"))
    );
    let live = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/livez"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    let secret = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tls")
        .unwrap();
    assert_eq!(
        secret.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("pullgate-admission-tls")
    );
    // The Service selects the Deployment's pods.
    let selector = m.services[0]
        .spec
        .as_ref()
        .unwrap()
        .selector
        .clone()
        .unwrap();
    let labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "Service selector {k}");
    }
}

fn config_map_files(m: &Manifests) -> BTreeMap<String, String> {
    let cm = m
        .config_maps
        .iter()
        .find(|c| name_of(&c.metadata) == "pullgate-node-files")
        .expect("pullgate-node-files ConfigMap");
    cm.data.clone().unwrap()
}

#[test]
fn node_installer_ships_the_repository_unit_as_a_host_service() {
    let m = load();
    let files = config_map_files(&m);
    for (key, source) in [
        ("pullgate.service", "systemd/pullgate.service"),
        (
            "10-pullgate.conf",
            "systemd/kubelet.service.d/10-pullgate.conf",
        ),
        ("install.sh", "deploy/node-install.sh"),
    ] {
        let want = std::fs::read_to_string(root().join(source)).unwrap();
        assert!(
            files.get(key) == Some(&want),
            "deploy/node.yaml's {key} differs from {source}: copy the file into the ConfigMap"
        );
    }
    let script = &files["install.sh"];
    for step in [
        "/usr/local/bin/pullgate",
        "/etc/systemd/system/pullgate.service",
        "systemctl enable pullgate.service",
        "tokenFile: /var/lib/pullgate/token",
        "PULLGATE_KUBECONFIG=/etc/pullgate/kubeconfig",
    ] {
        assert!(script.contains(step), "install.sh lacks {step}");
    }
    // The unit reads the env file the installer writes: cluster mode without editing ExecStart.
    assert!(files["pullgate.service"].contains("EnvironmentFile=-/etc/pullgate/pullgate.env"));
    let out = std::process::Command::new("sh")
        .args(["-n", "deploy/node-install.sh"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ds = &m.daemon_sets[0];
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.host_pid,
        Some(true),
        "systemctl on the host through nsenter"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.command.as_deref(),
        Some(&["/bin/sh".to_string(), "/files/install.sh".to_string()][..]),
        "the pod installs; pullgate itself runs under the host's systemd"
    );
    assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(true));
    let host = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "host")
        .unwrap();
    assert_eq!(host.host_path.as_ref().unwrap().path, "/");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|v| v.name == "host")
        .unwrap();
    assert_eq!(mount.mount_path, "/host");
    let files_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "files")
        .unwrap();
    assert_eq!(
        files_volume.config_map.as_ref().unwrap().name,
        "pullgate-node-files"
    );
    // Same image as the shim: one release.
    let shim_image = &m.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image;
    assert_eq!(&c.image, shim_image);
    // Every node, control plane included, whatever its taints.
    assert!(pod
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()));
}

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
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
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
    network_policies: Vec<k8s_openapi::api::networking::v1::NetworkPolicy>,
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

/// The objects of deploy/ (kustomizations and the cert-manager option aside).
fn load() -> Manifests {
    let mut m = Manifests::default();
    let files: Vec<PathBuf> = yaml_files(&root().join("deploy"))
        .into_iter()
        .filter(|f| {
            f.file_name().is_some_and(|n| n != "kustomization.yaml")
                && !f.starts_with(root().join("deploy/cert-manager"))
        })
        .collect();
    assert!(files.len() >= 5, "{files:?}");
    for file in files {
        for (i, doc) in documents(&file).into_iter().enumerate() {
            let origin = format!("{} document {}", file.display(), i + 1);
            add(&mut m, &doc, &origin);
        }
    }
    m
}

/// Files `doc` (from `origin`) under its kind, typed; panics on a kind deploy/ should not hold.
fn add(m: &mut Manifests, doc: &Value, origin: &str) {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    match (
        doc["apiVersion"].as_str().unwrap_or_default(),
        kind.as_str(),
    ) {
        ("v1", "Namespace") => m.namespaces.push(typed(doc, origin)),
        ("v1", "ServiceAccount") => m.service_accounts.push(typed(doc, origin)),
        ("v1", "Service") => m.services.push(typed(doc, origin)),
        ("v1", "ConfigMap") => m.config_maps.push(typed(doc, origin)),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => m.cluster_roles.push(typed(doc, origin)),
        ("rbac.authorization.k8s.io/v1", "Role") => m.roles.push(typed(doc, origin)),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            m.cluster_role_bindings.push(typed(doc, origin))
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => m.role_bindings.push(typed(doc, origin)),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => m.crds.push(typed(doc, origin)),
        ("apps/v1", "Deployment") => m.deployments.push(typed(doc, origin)),
        ("apps/v1", "DaemonSet") => m.daemon_sets.push(typed(doc, origin)),
        ("policy/v1", "PodDisruptionBudget") => m.pdbs.push(typed(doc, origin)),
        ("networking.k8s.io/v1", "NetworkPolicy") => m.network_policies.push(typed(doc, origin)),
        ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => {
            m.validating.push(typed(doc, origin))
        }
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            m.mutating.push(typed(doc, origin))
        }
        (api_version, kind) => panic!("{origin}: unexpected {api_version} {kind}"),
    }
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
    assert!(
        std::ptr::eq(workloads, &validating.webhooks.as_ref().unwrap()[0]),
        "the README's bypass step patches /webhooks/0: keep the workload webhook first"
    );
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

/// "namespace group/resource verb" strings of `grants` (group empty for the core API).
fn permissions(grants: &[(String, PolicyRule)]) -> Vec<String> {
    let mut out = Vec::new();
    for (ns, rule) in grants {
        for group in rule.api_groups.iter().flatten() {
            for res in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    match &rule.resource_names {
                        Some(names) => {
                            out.push(format!("{ns} {group}/{res} {verb} [{}]", names.join(",")))
                        }
                        None => out.push(format!("{ns} {group}/{res} {verb}")),
                    }
                }
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
            "* /namespaces list",
            "* /namespaces watch",
            "* policy.sigstore.dev/clusterimagepolicies list",
            "* policy.sigstore.dev/clusterimagepolicies watch",
            "* policy.sigstore.dev/trustroots list",
            "* policy.sigstore.dev/trustroots watch",
            "cosign-system /configmaps list",
            "cosign-system /configmaps watch",
        ]
    );
    let admission = permissions(&grants(&m, "pullgate-admission"));
    assert!(
        admission.contains(&"* /secrets get".to_string()),
        "imagePullSecrets: {admission:?}"
    );
    assert!(
        !admission
            .iter()
            .any(|p| p.starts_with("* /secrets list") || p.starts_with("* /secrets watch")),
        "{admission:?}"
    );
    // The key projector: the controller namespace's Secrets, and writes to one ConfigMap.
    for wanted in [
        "cosign-system /secrets list",
        "cosign-system /secrets watch",
        "cosign-system /configmaps get [pullgate-public-keys]",
        "cosign-system /configmaps update [pullgate-public-keys]",
    ] {
        assert!(admission.contains(&wanted.to_string()), "{admission:?}");
    }
    for p in admission.iter().chain(&node) {
        if p == "cosign-system /configmaps update [pullgate-public-keys]" {
            continue;
        }
        let verb = p.split(' ').nth(2).unwrap();
        assert!(["get", "list", "watch"].contains(&verb), "read-only: {p}");
    }
    // The ConfigMap it updates is created by the manifests.
    assert!(m.config_maps.iter().any(|c| name_of(&c.metadata)
        == pullgate::kube::keys::PROJECTION_NAME
        && c.metadata.namespace.as_deref() == Some("cosign-system")));
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

/// Whether `rule` lets its holder read Secrets (any read verb, wildcards included).
fn reads_secrets(rule: &PolicyRule) -> bool {
    let core = rule
        .api_groups
        .iter()
        .flatten()
        .any(|g| g.is_empty() || g == "*");
    let secrets = rule
        .resources
        .iter()
        .flatten()
        .any(|r| r == "secrets" || r == "*");
    let reads = rule
        .verbs
        .iter()
        .any(|v| ["get", "list", "watch", "*"].contains(&v.as_str()));
    core && secrets && reads
}

/// Nodes never hold private keys: no role bound to the node account reads any Secret
/// (`cosign generate-key-pair k8s://` stores cosign.key beside cosign.pub, and RBAC grants a
/// Secret whole). A ClusterRole reading Secrets cluster-wide must say why in the
/// `pullgate.dev/secrets-justification` annotation, and must not be bound to nodes.
#[test]
fn no_node_role_reads_a_secret_and_cluster_wide_secret_reads_are_justified() {
    let m = load();
    let node = grants(&m, "pullgate-node");
    assert!(!node.is_empty());
    for (ns, rule) in &node {
        assert!(
            !reads_secrets(rule),
            "the node reads Secrets in {ns}: {rule:?}"
        );
    }
    let mut secret_readers = Vec::new();
    for role in &m.cluster_roles {
        if !role.rules.iter().flatten().any(reads_secrets) {
            continue;
        }
        let name = name_of(&role.metadata).to_string();
        let why = role
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("pullgate.dev/secrets-justification"))
            .map(|w| w.trim().to_string())
            .unwrap_or_default();
        assert!(
            why.len() >= 40,
            "ClusterRole {name} reads Secrets cluster-wide without a justification"
        );
        for b in &m.cluster_role_bindings {
            if b.role_ref.name == name {
                for s in b.subjects.iter().flatten() {
                    assert_eq!(
                        (s.kind.as_str(), s.name.as_str()),
                        ("ServiceAccount", "pullgate-admission"),
                        "ClusterRole {name} bound to {s:?}"
                    );
                }
            }
        }
        secret_readers.push(name);
    }
    // Honest about what is there today: the shim's imagePullSecrets reader.
    assert!(
        secret_readers.len() <= 1,
        "more ClusterRoles read Secrets: {secret_readers:?}"
    );
    // Roles reading Secrets: only the key projector's, in the controller namespace.
    for role in &m.roles {
        if role.rules.iter().flatten().any(reads_secrets) {
            assert_eq!(
                (name_of(&role.metadata), role.metadata.namespace.as_deref()),
                ("pullgate-key-projector", Some("cosign-system"))
            );
        }
    }
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
            if let Some(missing) = schema
                .required
                .iter()
                .flatten()
                .find(|r| !map.contains_key(*r))
            {
                return Err(format!("{at}.{missing}: required by the CRD schema"));
            }
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

/// Sets the field at JSON `pointer` in `doc`, creating the objects on the way.
fn set_at(doc: &mut Value, pointer: &str, value: Value) {
    let mut at = doc;
    for key in pointer.trim_start_matches('/').split('/') {
        at = at
            .as_object_mut()
            .expect("an object on the way")
            .entry(key)
            .or_insert(Value::Null);
        if at.is_null() {
            *at = json!({});
        }
    }
    *at = value;
}

/// TrustRoot fields policy-controller's CRD declares and pullgate's model
/// (`src/policy/types.rs`) does not parse yet, as JSON pointers. The CRD keeps them so that
/// policy-controller's objects survive when pullgate owns the CRD; pullgate refuses a TrustRoot
/// that sets one (it fails closed, as for every unknown field). The test below fails once the
/// model learns one, so this list cannot go stale.
const TRUST_ROOT_FIELDS_PULLGATE_LACKS: &[&str] = &[];

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
    for gap in TRUST_ROOT_FIELDS_PULLGATE_LACKS {
        let (parent, field) = gap.rsplit_once('/').unwrap();
        let value = full
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .and_then(|o| o.remove(field))
            .unwrap_or_else(|| panic!("{gap} is not in the CRD schema"));
        let mut alone = json!({"metadata": {"name": "gap"}});
        set_at(&mut alone, gap, value);
        assert!(
            serde_json::from_value::<TrustRoot>(alone).is_err(),
            "pullgate's TrustRoot model now knows {gap}: remove it from TRUST_ROOT_FIELDS_PULLGATE_LACKS"
        );
    }
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
    // Readiness is the installer's own check of pullgate and of kubelet's effective endpoints
    // (tested below), not the existence of a socket file; its CRI call needs curl in the image.
    let probe = c.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
    assert_eq!(
        probe.command.as_deref(),
        Some(
            &[
                "/bin/sh".to_string(),
                "/files/install.sh".to_string(),
                "check".to_string()
            ][..]
        )
    );
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.contains("apt-get install") && l.split_whitespace().any(|w| w == "curl")),
        "the installer image needs curl: {dockerfile}"
    );
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

/// The fields of policy-controller's CRDs (sigstore/policy-controller at f925c0c1,
/// config/300-clusterimagepolicy.yaml and config/300-trustroot.yaml: every leaf, identical in
/// v1alpha1 and v1beta1), with their types. Ours must declare each of them, so that objects
/// written for policy-controller keep every field when pullgate's CRD is the one installed.
const POLICY_CONTROLLER_CIP_FIELDS: &[&str] = &[
    ".spec.authorities[].attestations[].name string",
    ".spec.authorities[].attestations[].policy.configMapRef.key string",
    ".spec.authorities[].attestations[].policy.configMapRef.name string",
    ".spec.authorities[].attestations[].policy.configMapRef.namespace string",
    ".spec.authorities[].attestations[].policy.data string",
    ".spec.authorities[].attestations[].policy.fetchConfigFile boolean",
    ".spec.authorities[].attestations[].policy.includeObjectMeta boolean",
    ".spec.authorities[].attestations[].policy.includeSpec boolean",
    ".spec.authorities[].attestations[].policy.includeTypeMeta boolean",
    ".spec.authorities[].attestations[].policy.remote.sha256sum string",
    ".spec.authorities[].attestations[].policy.remote.url string",
    ".spec.authorities[].attestations[].policy.type string",
    ".spec.authorities[].attestations[].predicateType string",
    ".spec.authorities[].ctlog.trustRootRef string",
    ".spec.authorities[].ctlog.url string",
    ".spec.authorities[].key.data string",
    ".spec.authorities[].key.hashAlgorithm string",
    ".spec.authorities[].key.kms string",
    ".spec.authorities[].key.secretRef.name string",
    ".spec.authorities[].key.secretRef.namespace string",
    ".spec.authorities[].keyless.ca-cert.data string",
    ".spec.authorities[].keyless.ca-cert.hashAlgorithm string",
    ".spec.authorities[].keyless.ca-cert.kms string",
    ".spec.authorities[].keyless.ca-cert.secretRef.name string",
    ".spec.authorities[].keyless.ca-cert.secretRef.namespace string",
    ".spec.authorities[].keyless.identities[].issuer string",
    ".spec.authorities[].keyless.identities[].issuerRegExp string",
    ".spec.authorities[].keyless.identities[].subject string",
    ".spec.authorities[].keyless.identities[].subjectRegExp string",
    ".spec.authorities[].keyless.insecureIgnoreSCT boolean",
    ".spec.authorities[].keyless.trustRootRef string",
    ".spec.authorities[].keyless.url string",
    ".spec.authorities[].name string",
    ".spec.authorities[].rfc3161timestamp.trustRootRef string",
    ".spec.authorities[].signatureFormat string",
    ".spec.authorities[].source[].oci string",
    ".spec.authorities[].source[].signaturePullSecrets[].name string",
    ".spec.authorities[].source[].tagPrefix string",
    ".spec.authorities[].static.action string",
    ".spec.authorities[].static.message string",
    ".spec.images[].glob string",
    ".spec.match[].group string",
    ".spec.match[].resource string",
    ".spec.match[].selector.matchExpressions[].key string",
    ".spec.match[].selector.matchExpressions[].operator string",
    ".spec.match[].selector.matchExpressions[].values[] string",
    ".spec.match[].selector.matchLabels object (any keys)",
    ".spec.match[].version string",
    ".spec.mode string",
    ".spec.policy.configMapRef.key string",
    ".spec.policy.configMapRef.name string",
    ".spec.policy.configMapRef.namespace string",
    ".spec.policy.data string",
    ".spec.policy.fetchConfigFile boolean",
    ".spec.policy.includeObjectMeta boolean",
    ".spec.policy.includeSpec boolean",
    ".spec.policy.includeTypeMeta boolean",
    ".spec.policy.remote.sha256sum string",
    ".spec.policy.remote.url string",
    ".spec.policy.type string",
    ".status.annotations object (any keys)",
    ".status.conditions[].lastTransitionTime string",
    ".status.conditions[].message string",
    ".status.conditions[].reason string",
    ".status.conditions[].severity string",
    ".status.conditions[].status string",
    ".status.conditions[].type string",
    ".status.observedGeneration integer",
];

const POLICY_CONTROLLER_TRUST_ROOT_FIELDS: &[&str] = &[
    ".spec.remote.mirror string",
    ".spec.remote.root string",
    ".spec.remote.targets string",
    ".spec.remote.trustedRootTarget string",
    ".spec.repository.mirrorFS string",
    ".spec.repository.root string",
    ".spec.repository.targets string",
    ".spec.repository.trustedRootTarget string",
    ".spec.sigstoreKeys.certificateAuthorities[].certChain string",
    ".spec.sigstoreKeys.certificateAuthorities[].subject.commonName string",
    ".spec.sigstoreKeys.certificateAuthorities[].subject.organization string",
    ".spec.sigstoreKeys.certificateAuthorities[].uri string",
    ".spec.sigstoreKeys.ctLogs[].baseURL string",
    ".spec.sigstoreKeys.ctLogs[].hashAlgorithm string",
    ".spec.sigstoreKeys.ctLogs[].publicKey string",
    ".spec.sigstoreKeys.tLogs[].baseURL string",
    ".spec.sigstoreKeys.tLogs[].hashAlgorithm string",
    ".spec.sigstoreKeys.tLogs[].publicKey string",
    ".spec.sigstoreKeys.timestampAuthorities[].certChain string",
    ".spec.sigstoreKeys.timestampAuthorities[].subject.commonName string",
    ".spec.sigstoreKeys.timestampAuthorities[].subject.organization string",
    ".spec.sigstoreKeys.timestampAuthorities[].uri string",
    ".status.annotations object (any keys)",
    ".status.conditions[].lastTransitionTime string",
    ".status.conditions[].message string",
    ".status.conditions[].reason string",
    ".status.conditions[].severity string",
    ".status.conditions[].status string",
    ".status.conditions[].type string",
    ".status.observedGeneration integer",
];

/// Fields pullgate's CRDs add to policy-controller's (optional, from Sigstore's trusted_root.json;
/// deploy/crds/trustroots.yaml says what becomes of them under policy-controller's CRD).
const PULLGATE_ONLY_TRUST_ROOT_FIELDS: &[&str] = &[
    ".spec.sigstoreKeys.certificateAuthorities[].validFor.end string",
    ".spec.sigstoreKeys.certificateAuthorities[].validFor.start string",
    ".spec.sigstoreKeys.ctLogs[].logID string",
    ".spec.sigstoreKeys.tLogs[].logID string",
    ".spec.sigstoreKeys.timestampAuthorities[].validFor.end string",
    ".spec.sigstoreKeys.timestampAuthorities[].validFor.start string",
];

/// "path type" of every leaf of `schema`, in the form of the lists above; an object without
/// declared properties that takes any keys is a leaf "object (any keys)".
fn leaf_fields(schema: &JSONSchemaProps, at: &str, out: &mut Vec<String>) {
    let ty = schema.type_.as_deref().unwrap_or("(no type)");
    let props = schema.properties.as_ref().filter(|p| !p.is_empty());
    let any_keys = schema.x_kubernetes_preserve_unknown_fields == Some(true)
        || schema.additional_properties.is_some();
    match (ty, props) {
        ("object", Some(props)) => {
            for (k, p) in props {
                leaf_fields(p, &format!("{at}.{k}"), out);
            }
        }
        ("object", None) if any_keys => out.push(format!("{at} object (any keys)")),
        ("array", _) => match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(item)) => {
                leaf_fields(item, &format!("{at}[]"), out)
            }
            _ => out.push(format!("{at} array (no item schema)")),
        },
        _ => out.push(format!("{at} {ty}")),
    }
}

#[test]
fn crds_declare_every_policy_controller_field_with_its_type() {
    let m = load();
    for (name, upstream, ours_only) in [
        (
            "clusterimagepolicies.policy.sigstore.dev",
            POLICY_CONTROLLER_CIP_FIELDS,
            &[][..],
        ),
        (
            "trustroots.policy.sigstore.dev",
            POLICY_CONTROLLER_TRUST_ROOT_FIELDS,
            PULLGATE_ONLY_TRUST_ROOT_FIELDS,
        ),
    ] {
        for version in &crd(&m, name).spec.versions {
            let schema = version
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap();
            assert_eq!(
                schema.type_.as_deref(),
                Some("object"),
                "{name} {}",
                version.name
            );
            let mut ours = Vec::new();
            leaf_fields(schema, "", &mut ours);
            ours.sort();
            let missing: Vec<&&str> = upstream
                .iter()
                .filter(|f| !ours.iter().any(|o| o == *f))
                .collect();
            assert!(
                missing.is_empty(),
                "{name} {}: policy-controller's fields missing or typed differently: {missing:?}",
                version.name
            );
            let extra: Vec<&String> = ours
                .iter()
                .filter(|o| !upstream.contains(&o.as_str()) && !ours_only.contains(&o.as_str()))
                .collect();
            assert!(
                extra.is_empty(),
                "{name} {}: fields policy-controller's CRD does not have (list them in \
                 PULLGATE_ONLY_*_FIELDS and say in the CRD what becomes of them): {extra:?}",
                version.name
            );
        }
    }
}

/// kind-config/policies/ is what the README applies to a cluster: every object in it is a
/// typed Kubernetes object or a policy that fits the CRD schema and pullgate's model.
#[test]
fn kind_config_policies_are_objects_a_cluster_accepts() {
    let m = load();
    let cip_schema = schema_of(crd(&m, "clusterimagepolicies.policy.sigstore.dev"));
    let mut kinds = Vec::new();
    for file in yaml_files(&root().join("kind-config/policies")) {
        for (i, doc) in documents(&file).into_iter().enumerate() {
            let origin = format!("{} document {}", file.display(), i + 1);
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match (
                doc["apiVersion"].as_str().unwrap_or_default(),
                kind.as_str(),
            ) {
                ("v1", "Namespace") => drop(typed::<Namespace>(&doc, &origin)),
                ("v1", "Secret") => drop(typed::<Secret>(&doc, &origin)),
                ("v1", "ConfigMap") => drop(typed::<ConfigMap>(&doc, &origin)),
                (
                    "policy.sigstore.dev/v1alpha1" | "policy.sigstore.dev/v1beta1",
                    "ClusterImagePolicy",
                ) => {
                    conforms(&doc, cip_schema, "").unwrap_or_else(|e| panic!("{origin}: {e}"));
                    serde_path_to_error::deserialize::<_, ClusterImagePolicy>(&doc)
                        .unwrap_or_else(|e| panic!("{origin}: {}: {}", e.path(), e.inner()));
                }
                (api_version, kind) => panic!("{origin}: unexpected {api_version} {kind}"),
            }
            kinds.push(kind);
        }
    }
    kinds.sort();
    kinds.dedup();
    assert_eq!(
        kinds,
        ["ClusterImagePolicy", "ConfigMap", "Namespace", "Secret"]
    );
}

// ---------------------------------------------------------------------------------------------
// The node installer, run for real: the ConfigMap's install.sh against a scratch "host" root,
// with `nsenter` replaced by a stub that records the systemctl calls, a service-account dir
// with a token and a cluster CA, and a TLS API server that records the bearer tokens it gets.
// ---------------------------------------------------------------------------------------------

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A scratch node: `host` stands for the node's `/`, the rest for the installer pod.
struct ScratchNode {
    dir: tempfile::TempDir,
}

const FAKE_BINARY: &str = "#!/bin/sh\necho pullgate release under test\n";

impl ScratchNode {
    /// The ConfigMap's files, a service account with `token` and `ca_pem`, a binary to install,
    /// the nsenter stub, and a kubelet config (when `kubelet_config` is given).
    fn new(m: &Manifests, token: &str, ca_pem: &str, kubelet_config: Option<&str>) -> ScratchNode {
        let node = ScratchNode {
            dir: tempfile::tempdir().unwrap(),
        };
        for (name, text) in config_map_files(m) {
            write(&node.path("files").join(name), &text);
        }
        write(&node.path("sa/token"), token);
        write(&node.path("sa/ca.crt"), ca_pem);
        write(&node.path("image/pullgate"), FAKE_BINARY);
        // Like nsenter -t 1 -m ... -- CMD: refuses any other target, records CMD.
        let stub = "#!/bin/sh\n\
            [ \"$1 $2 $3\" = '-t 1 -m' ] || { echo \"nsenter stub: not PID 1's namespaces: $*\" >&2; exit 2; }\n\
            while [ \"$1\" != -- ]; do shift; done; shift\n\
            echo \"$*\" >> \"$NSENTER_CALLS\"\n\
            exec sh \"$NSENTER_HOOK\" \"$@\"\n";
        write(&node.path("bin/nsenter"), stub);
        std::fs::set_permissions(
            node.path("bin/nsenter"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        write(&node.path("bin/systemd-hook"), SYSTEMD_HOOK);
        if let Some(config) = kubelet_config {
            write(&node.host("var/lib/kubelet/config.yaml"), config);
        }
        std::fs::create_dir_all(node.host("run/pullgate")).unwrap();
        // The host's /proc as the hostPID pod sees it: boot time, and kubelet once started.
        let booted = unix_now() - 1000;
        write(
            &node.path("proc/stat"),
            &format!("cpu 0 0 0 0\nbtime {booted}\n"),
        );
        write(&node.path("proc/next-pid"), "4000");
        node
    }

    /// Starts kubelet as systemd would with kubeadm's drop-in (see SYSTEMD_HOOK).
    fn boot_kubelet(&self) {
        let status = std::process::Command::new("sh")
            .arg(self.path("bin/systemd-hook"))
            .arg("boot")
            .env("INSTALL_HOST_ROOT", self.path("host"))
            .env("INSTALL_PROC", self.path("proc"))
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// A kubelet process started now with exactly `args` (replacing any other).
    fn fake_kubelet(&self, args: &[&str]) {
        let pid: u32 = read_or_empty(&self.path("proc/next-pid"))
            .trim()
            .parse()
            .unwrap();
        write(&self.path("proc/next-pid"), &(pid + 1).to_string());
        for entry in std::fs::read_dir(self.path("proc")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            }
        }
        let dir = self.path(&format!("proc/{pid}"));
        let mut cmdline = String::from("/usr/bin/kubelet\0");
        for a in args {
            cmdline.push_str(a);
            cmdline.push('\0');
        }
        write(&dir.join("cmdline"), &cmdline);
        write(&dir.join("comm"), "kubelet\n");
        let stat = read_or_empty(&self.path("proc/stat"));
        let booted: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .unwrap()
            .parse()
            .unwrap();
        // Field 22 is the start time in clock ticks after boot (USER_HZ, 100 on Linux).
        let ticks = (unix_now() - booted) * 100;
        write(
            &dir.join("stat"),
            &format!("{pid} (kubelet) S 1 {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 18 0 {ticks} 0 0\n"),
        );
    }

    /// The arguments of the kubelet process running now.
    fn kubelet_args(&self) -> Vec<String> {
        for entry in std::fs::read_dir(self.path("proc")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                return read_or_empty(&path.join("cmdline"))
                    .split('\0')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect();
            }
        }
        panic!("no kubelet process")
    }

    /// The DaemonSet's readiness probe (`install.sh check`): exit code and output.
    /// Killed after 10 s, as the kubelet kills a probe that overruns.
    fn check(&self) -> (i32, String) {
        let out = self.path("check.out");
        let file = std::fs::File::create(&out).unwrap();
        let mut child = self
            .command()
            .arg("check")
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status.code().unwrap_or(-1);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break -1;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, read_or_empty(&out))
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn host(&self, rel: &str) -> PathBuf {
        self.dir.path().join("host").join(rel)
    }

    /// install.sh with the DaemonSet's environment and the scratch paths.
    fn command(&self) -> std::process::Command {
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = std::process::Command::new("sh");
        cmd.arg(self.path("files/install.sh"))
            .env("PATH", path)
            .env("INSTALL_HOST_ROOT", self.path("host"))
            .env("INSTALL_FILES", self.path("files"))
            .env("INSTALL_SA_DIR", self.path("sa"))
            .env("INSTALL_BINARY", self.path("image/pullgate"))
            .env("INSTALL_PROC", self.path("proc"))
            .env("TOKEN_SYNC_SECONDS", "1")
            .env("START_TIMEOUT_SECONDS", "2")
            .env("KUBELET_TIMEOUT_SECONDS", "5")
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .env("NODE_NAME", "node-a")
            .env("NSENTER_CALLS", self.path("calls"))
            .env("NSENTER_HOOK", self.path("bin/systemd-hook"))
            .env("PULLGATE_SERVICE_STATE", self.path("service-state"))
            .stdin(Stdio::null());
        cmd
    }

    /// Starts install.sh as the DaemonSet would.
    fn install(&self, api_host: &str, api_port: u16, configure_kubelet: bool) -> Installer {
        let log = std::fs::File::create(self.path("installer.log")).unwrap();
        let child = self
            .command()
            .env("KUBERNETES_SERVICE_HOST", api_host)
            .env("KUBERNETES_SERVICE_PORT", api_port.to_string())
            .env("CONFIGURE_KUBELET", configure_kubelet.to_string())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Installer { child }
    }

    /// The host commands the installer ran, one per line.
    fn calls(&self) -> Vec<String> {
        read_or_empty(&self.path("calls"))
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn log(&self) -> String {
        read_or_empty(&self.path("installer.log"))
    }

    /// Stands in for pullgate coming up under systemd: a CRI endpoint on its socket.
    fn serve_cri(&self) -> FakeCri {
        let socket = self.host("run/pullgate/pullgate.sock");
        let _ = std::fs::remove_file(&socket);
        FakeCri::serve(&socket)
    }

    /// A socket that exists and accepts connections but never answers (a hung release).
    fn silent_socket(&self) -> std::os::unix::net::UnixListener {
        let socket = self.host("run/pullgate/pullgate.sock");
        let _ = std::fs::remove_file(&socket);
        std::os::unix::net::UnixListener::bind(socket).unwrap()
    }

    /// The installer-written kubeconfig with its host paths moved under the scratch root, for
    /// a client running here instead of on the node.
    fn rebased_kubeconfig(&self) -> PathBuf {
        let text = std::fs::read_to_string(self.host("etc/pullgate/kubeconfig")).unwrap();
        let host = self.path("host");
        let text = text
            .replace(
                "/etc/pullgate/",
                &format!("{}/etc/pullgate/", host.display()),
            )
            .replace(
                "/var/lib/pullgate/",
                &format!("{}/var/lib/pullgate/", host.display()),
            );
        let path = self.path("kubeconfig.rebased");
        write(&path, &text);
        path
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What the nsenter stub runs after recording a host command: `systemctl restart
/// kubelet.service` (and `boot`) start a new kubelet process in the scratch /proc with the
/// command line systemd builds from kubeadm's kubelet drop-in (10-kubeadm.conf:
/// `kubelet $KUBELET_KUBECONFIG_ARGS $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS
/// $KUBELET_EXTRA_ARGS`, KUBELET_CONFIG_ARGS set there and overridable by a later drop-in,
/// KUBELET_KUBEADM_ARGS from /var/lib/kubelet/kubeadm-flags.env).
///
/// `systemctl restart|start pullgate.service` runs the installed binary once and writes
/// "running OUTPUT" or "failed OUTPUT" to $PULLGATE_SERVICE_STATE (a test then serves CRI or not).
const SYSTEMD_HOOK: &str = r#"
case "$*" in "systemctl restart pullgate.service"|"systemctl start pullgate.service")
  if out=$("$INSTALL_HOST_ROOT/usr/local/bin/pullgate" 2>&1); then state=running; else state=failed; fi
  echo "$state $out" > "$PULLGATE_SERVICE_STATE.new"
  mv -f "$PULLGATE_SERVICE_STATE.new" "$PULLGATE_SERVICE_STATE"
  exit 0;;
esac
[ "$*" = "systemctl restart kubelet.service" ] || [ "$*" = boot ] || exit 0
H=$INSTALL_HOST_ROOT
P=$INSTALL_PROC
KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml
KUBELET_KUBEADM_ARGS=
for d in "$H"/etc/systemd/system/kubelet.service.d/*.conf; do
  [ -f "$d" ] || continue
  v=$(sed -n 's/^Environment="KUBELET_CONFIG_ARGS=\(.*\)"$/\1/p' "$d")
  if [ -n "$v" ]; then KUBELET_CONFIG_ARGS=$v; fi
done
if [ -f "$H/var/lib/kubelet/kubeadm-flags.env" ]; then . "$H/var/lib/kubelet/kubeadm-flags.env"; fi
pid=$(cat "$P/next-pid")
echo $((pid + 1)) > "$P/next-pid"
rm -rf "$P"/[0-9]*
mkdir "$P/$pid"
printf '%s\0' /usr/bin/kubelet --kubeconfig=/etc/kubernetes/kubelet.conf $KUBELET_CONFIG_ARGS $KUBELET_KUBEADM_ARGS > "$P/$pid/cmdline"
echo kubelet > "$P/$pid/comm"
btime=$(awk '$1 == "btime" { print $2 }' "$P/stat")
echo "$pid (kubelet) S 1 $pid $pid 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 18 0 $((($(date +%s) - btime) * 100)) 0 0" > "$P/$pid/stat"
"#;

/// A CRI endpoint on a unix socket, standing in for pullgate (which forwards to containerd):
/// gRPC over HTTP/2, every call answered with an empty message and `grpc-status: 0`. Records
/// "METHOD path content-type" of each request.
struct FakeCri {
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCri {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCri {
    fn serve(socket: &Path) -> FakeCri {
        use http_body_util::StreamBody;
        use hyper::body::Frame;

        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let seen = seen.clone();
                        async move {
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("(none)")
                                .to_string();
                            let line =
                                format!("{} {} {content_type}", req.method(), req.uri().path());
                            // A gRPC server reads the request message before it answers.
                            let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                            seen.lock().unwrap().push(line);
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(Frame::data(
                                    bytes::Bytes::from_static(&[0; 5]),
                                )),
                                Ok(Frame::trailers(trailers)),
                            ];
                            let response = hyper::Response::builder()
                                .header("content-type", "application/grpc")
                                .body(StreamBody::new(futures_util::stream::iter(frames)))
                                .unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        FakeCri { requests, task }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// The installer process; killed when dropped (it loops, keeping the token fresh).
struct Installer {
    child: Child,
}

impl Installer {
    /// Exit code once it has exited, `None` while it runs.
    fn exited(&mut self) -> Option<i32> {
        self.child
            .try_wait()
            .unwrap()
            .map(|s| s.code().unwrap_or(-1))
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn read_or_empty(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Polls `done` every 50 ms for up to 15 s; panics with `what` and the installer's log.
async fn wait_for(node: &ScratchNode, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "timed out waiting for {what}; installer log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTPS API server on 127.0.0.1 with its own CA, answering every request with an empty
/// NamespaceList and recording each request's Authorization header.
struct TlsApi {
    port: u16,
    ca_pem: String,
    authorizations: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsApi {
    async fn start() -> TlsApi {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "scratch cluster CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(leaf.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let authorizations = Arc::new(Mutex::new(Vec::new()));
        let seen = authorizations.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("(none)")
                            .to_string();
                        seen.lock().unwrap().push(auth);
                        let body = json!({"apiVersion": "v1", "kind": "NamespaceList",
                                          "metadata": {"resourceVersion": "1"}, "items": []});
                        let response = hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(bytes::Bytes::from(
                                body.to_string(),
                            )))
                            .unwrap();
                        async move { Ok::<_, std::convert::Infallible>(response) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsApi {
            port,
            ca_pem: ca.pem(),
            authorizations,
            task,
        }
    }

    /// Lists namespaces with pullgate's own kubeconfig client; returns the Authorization
    /// header the server got.
    async fn list_with(&self, kubeconfig: &Path) -> String {
        let client = pullgate::kube::client_from_kubeconfig(kubeconfig)
            .await
            .unwrap_or_else(|e| panic!("the installer's kubeconfig: {e}"));
        let before = self.authorizations.lock().unwrap().len();
        kube::Api::<Namespace>::all(client)
            .list(&Default::default())
            .await
            .unwrap_or_else(|e| panic!("listing through the installer's kubeconfig: {e}"));
        let seen = self.authorizations.lock().unwrap();
        assert_eq!(seen.len(), before + 1, "{seen:?}");
        seen[before].clone()
    }
}

const PULLGATE_ENDPOINT: &str = "unix:///run/pullgate/pullgate.sock";
/// What kubeadm (1.28 to at least 1.31) writes for a containerd node: the runtime endpoint as a
/// flag, which beats every kubelet config file.
const KUBEADM_FLAGS: &str = "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock --pod-infra-container-image=registry.k8s.io/pause:3.9\"\n";

/// The KubeletConfiguration drop-in the installer writes, parsed.
fn pullgate_dropin(node: &ScratchNode) -> Value {
    serde_yaml::from_str(
        &std::fs::read_to_string(node.host("etc/kubernetes/kubelet.conf.d/90-pullgate.conf"))
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn node_installer_sets_up_the_host_service_and_keeps_its_token_fresh() {
    let m = load();
    let api = TlsApi::start().await;
    // kubeadm writes a final newline; this one has none.
    let kubelet = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ncgroupDriver: systemd";
    let node = ScratchNode::new(&m, "token-one", &api.ca_pem, Some(kubelet));
    write(
        &node.host("var/lib/kubelet/kubeadm-flags.env"),
        KUBEADM_FLAGS,
    );
    node.boot_kubelet();
    // Before: kubelet talks to containerd directly, and readiness says so.
    let _early = node.serve_cri();
    let (code, text) = node.check();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("bypasses pullgate: containerRuntimeEndpoint is unix:///var/run/containerd/containerd.sock, imageServiceEndpoint is unix:///var/run/containerd/containerd.sock"),
        "{text}"
    );
    drop(_early);
    std::fs::remove_file(node.host("run/pullgate/pullgate.sock")).unwrap();

    let mut installer = node.install("127.0.0.1", api.port, true);
    // It starts pullgate, then waits for pullgate to answer before touching kubelet.
    wait_for(&node, "pullgate to be (re)started", || {
        node.calls().len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        node.calls(),
        [
            "systemctl daemon-reload",
            "systemctl enable pullgate.service",
            "systemctl restart pullgate.service"
        ],
        "kubelet is left alone until pullgate serves"
    );
    assert_eq!(installer.exited(), None, "{}", node.log());
    let cri = node.serve_cri();
    wait_for(&node, "kubelet to be pointed at pullgate", || {
        node.log()
            .contains("kubelet now sends runtime and image calls to pullgate")
    })
    .await;
    // The probe was a real CRI call.
    assert!(
        cri.requests()
            .contains(&"POST /runtime.v1.RuntimeService/Version application/grpc".to_string()),
        "{:?}",
        cri.requests()
    );
    assert_eq!(
        node.calls()[3..],
        [
            "systemctl daemon-reload",
            "systemctl restart kubelet.service"
        ]
    );

    // Both endpoints in a KubeletConfiguration drop-in that kubeadm never writes; kubelet
    // reads the directory through a systemd drop-in; kubeadm's runtime flag (which would beat
    // any config file) now names pullgate, the other flags kept. kubeadm's config.yaml is
    // untouched.
    assert_eq!(
        pullgate_dropin(&node),
        json!({"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
               "containerRuntimeEndpoint": PULLGATE_ENDPOINT,
               "imageServiceEndpoint": PULLGATE_ENDPOINT})
    );
    let unit = std::fs::read_to_string(
        node.host("etc/systemd/system/kubelet.service.d/20-pullgate-config-dir.conf"),
    )
    .unwrap();
    assert!(
        unit.contains("Environment=\"KUBELET_CONFIG_ARGS=--config=/var/lib/kubelet/config.yaml --config-dir=/etc/kubernetes/kubelet.conf.d\""),
        "{unit}"
    );
    assert_eq!(
        std::fs::read_to_string(node.host("var/lib/kubelet/kubeadm-flags.env")).unwrap(),
        KUBEADM_FLAGS.replace(
            "unix:///var/run/containerd/containerd.sock",
            PULLGATE_ENDPOINT
        )
    );
    assert_eq!(
        std::fs::read_to_string(node.host("var/lib/kubelet/config.yaml")).unwrap(),
        kubelet
    );
    let args = node.kubelet_args();
    assert!(
        args.contains(&"--config-dir=/etc/kubernetes/kubelet.conf.d".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&format!("--container-runtime-endpoint={PULLGATE_ENDPOINT}")),
        "{args:?}"
    );
    let (code, text) = node.check();
    assert_eq!(
        (code, text.trim()),
        (0, "kubelet sends runtime and image calls to pullgate")
    );

    // The host files: the release's binary, the repository's units, modes that keep the
    // credentials to root.
    let files = config_map_files(&m);
    let bin = node.host("usr/local/bin/pullgate");
    assert_eq!(std::fs::read_to_string(&bin).unwrap(), FAKE_BINARY);
    assert_eq!(mode(&bin), 0o755);
    for (rel, key) in [
        ("etc/systemd/system/pullgate.service", "pullgate.service"),
        (
            "etc/systemd/system/kubelet.service.d/10-pullgate.conf",
            "10-pullgate.conf",
        ),
    ] {
        assert_eq!(std::fs::read_to_string(node.host(rel)).unwrap(), files[key]);
    }
    assert_eq!(mode(&node.host("etc/pullgate")), 0o700);
    assert_eq!(mode(&node.host("etc/pullgate/kubeconfig")), 0o600);
    assert_eq!(mode(&node.host("var/lib/pullgate/token")), 0o600);
    assert_eq!(
        std::fs::read_to_string(node.host("etc/pullgate/pullgate.env")).unwrap(),
        "PULLGATE_KUBECONFIG=/etc/pullgate/kubeconfig\nNODE_NAME=node-a\n"
    );
    // The unit reads that file: cluster mode without editing ExecStart.
    assert!(files["pullgate.service"].contains("EnvironmentFile=-/etc/pullgate/pullgate.env"));

    // The kubeconfig names the API server by address (the host has no cluster DNS), the
    // copied CA and the token file.
    let kubeconfig: Value = serde_yaml::from_str(
        &std::fs::read_to_string(node.host("etc/pullgate/kubeconfig")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        kubeconfig["clusters"][0]["cluster"],
        json!({"server": format!("https://127.0.0.1:{}", api.port),
               "certificate-authority": "/etc/pullgate/ca.crt"})
    );
    assert_eq!(
        kubeconfig["users"][0]["user"],
        json!({"tokenFile": "/var/lib/pullgate/token"})
    );
    // pullgate's own client accepts it: TLS against the cluster CA, the pod's token.
    let rebased = node.rebased_kubeconfig();
    assert_eq!(api.list_with(&rebased).await, "Bearer token-one");

    // The kubelet rotates the projected token (a new file swapped in): the host copy follows,
    // and a client reading the token file sends the new one.
    write(&node.path("sa/token.tmp"), "token-two");
    std::fs::rename(node.path("sa/token.tmp"), node.path("sa/token")).unwrap();
    wait_for(&node, "the rotated token on the host", || {
        read_or_empty(&node.host("var/lib/pullgate/token")) == "token-two"
    })
    .await;
    assert_eq!(api.list_with(&rebased).await, "Bearer token-two");
    assert_eq!(installer.exited(), None, "still looping: {}", node.log());
    drop(installer);

    // Re-running with the same release (a pod restart, an env change) neither restarts
    // pullgate nor kubelet.
    let calls_before = node.calls().len();
    let _again = node.install("127.0.0.1", api.port, true);
    wait_for(&node, "the second run to settle", || {
        node.log().contains("left as it is")
    })
    .await;
    assert_eq!(
        node.calls()[calls_before..],
        [
            "systemctl daemon-reload",
            "systemctl enable pullgate.service",
            "systemctl start pullgate.service"
        ]
    );
    drop(_again);

    // `kubeadm upgrade` rewrites config.yaml from the cluster's kubelet-config ConfigMap (which
    // may carry containerd's endpoint, as kubeadm's instance configuration does) and restarts
    // kubelet: the drop-in still wins, and readiness confirms it.
    write(
        &node.host("var/lib/kubelet/config.yaml"),
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
         containerRuntimeEndpoint: unix:///run/containerd/containerd.sock\n",
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    node.boot_kubelet();
    let (code, text) = node.check();
    assert_eq!(code, 0, "{text}");
    // A kubeadm that puts its runtime flag back is not silent: not ready, and why.
    write(
        &node.host("var/lib/kubelet/kubeadm-flags.env"),
        KUBEADM_FLAGS,
    );
    node.boot_kubelet();
    let (code, text) = node.check();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(
            "bypasses pullgate: containerRuntimeEndpoint is unix:///var/run/containerd/containerd.sock"
        ) && !text.contains("imageServiceEndpoint is"),
        "{text}"
    );
}

/// The readiness probe reads what the running kubelet uses: its flags over its config-dir
/// drop-ins over its --config file, the image endpoint defaulting to the runtime one.
#[tokio::test(flavor = "multi_thread")]
async fn node_readiness_checks_the_running_kubelets_effective_endpoints() {
    let m = load();
    let node = ScratchNode::new(&m, "t", "ca", None);
    let _cri = node.serve_cri();
    let containerd = "unix:///run/containerd/containerd.sock";
    let config = |runtime: Option<&str>, image: Option<&str>| {
        let mut text = "kind: KubeletConfiguration\n".to_string();
        if let Some(r) = runtime {
            text.push_str(&format!("containerRuntimeEndpoint: {r}\n"));
        }
        if let Some(i) = image {
            text.push_str(&format!("imageServiceEndpoint: \"{i}\"\n"));
        }
        text
    };
    let dir = "etc/kubernetes/kubelet.conf.d";
    // (name, config.yaml, drop-in, extra flags, ready, message)
    type Case<'a> = (&'a str, String, Option<String>, Vec<String>, bool, &'a str);
    let cases: Vec<Case> = vec![
        (
            "nothing set: kubelet's default is containerd for both",
            config(None, None),
            None,
            vec![],
            false,
            "containerRuntimeEndpoint is unix:///run/containerd/containerd.sock, imageServiceEndpoint is unix:///run/containerd/containerd.sock",
        ),
        (
            "only the image endpoint (the old set-up)",
            config(None, Some(PULLGATE_ENDPOINT)),
            None,
            vec![],
            false,
            "bypasses pullgate: containerRuntimeEndpoint is unix:///run/containerd/containerd.sock (want",
        ),
        (
            "runtime flag on pullgate, image endpoint on containerd in the config",
            config(None, Some(containerd)),
            None,
            vec![format!("--container-runtime-endpoint={PULLGATE_ENDPOINT}")],
            false,
            "bypasses pullgate: imageServiceEndpoint is unix:///run/containerd/containerd.sock (want",
        ),
        (
            "config on pullgate, a runtime flag on containerd beats it",
            config(Some(PULLGATE_ENDPOINT), Some(PULLGATE_ENDPOINT)),
            None,
            vec![format!("--container-runtime-endpoint={containerd}")],
            false,
            "bypasses pullgate: containerRuntimeEndpoint is unix:///run/containerd/containerd.sock (want",
        ),
        (
            "a drop-in on pullgate beats config.yaml on containerd",
            config(Some(containerd), Some(containerd)),
            Some(config(Some(PULLGATE_ENDPOINT), Some(PULLGATE_ENDPOINT))),
            vec![],
            true,
            "kubelet sends runtime and image calls to pullgate",
        ),
        (
            "the runtime endpoint alone on pullgate: the image endpoint follows it",
            config(None, None),
            Some(config(Some(PULLGATE_ENDPOINT), None)),
            vec![],
            true,
            "kubelet sends runtime and image calls to pullgate",
        ),
        (
            "flags on pullgate (space-separated, /var/run, no scheme)",
            config(Some(containerd), Some(containerd)),
            None,
            vec![
                "--container-runtime-endpoint".to_string(),
                "unix:///var/run/pullgate/pullgate.sock".to_string(),
                "--image-service-endpoint=/run/pullgate/pullgate.sock".to_string(),
            ],
            true,
            "kubelet sends runtime and image calls to pullgate",
        ),
    ];
    for (name, config_yaml, dropin, flags, ready, message) in cases {
        let _ = std::fs::remove_dir_all(node.host("etc/kubernetes"));
        write(&node.host("var/lib/kubelet/config.yaml"), &config_yaml);
        let mut args = vec!["--config=/var/lib/kubelet/config.yaml".to_string()];
        if let Some(d) = &dropin {
            write(&node.host(&format!("{dir}/50-runtime.conf")), d);
            args.push(format!("--config-dir=/{dir}"));
        }
        args.extend(flags);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        node.fake_kubelet(&args);
        let (code, text) = node.check();
        assert_eq!(code, if ready { 0 } else { 1 }, "{name}: {text}");
        assert!(text.contains(message), "{name}: {text}");
    }

    // A drop-in written after kubelet started is not in effect yet: not ready until kubelet
    // restarts.
    write(
        &node.host(&format!("{dir}/50-runtime.conf")),
        &config(Some(PULLGATE_ENDPOINT), Some(PULLGATE_ENDPOINT)),
    );
    node.fake_kubelet(&[&format!("--config-dir=/{dir}")]);
    assert_eq!(node.check().0, 0);
    let later = format!("@{}", unix_now() + 5);
    let status = std::process::Command::new("touch")
        .args(["-d", &later])
        .arg(node.host(&format!("{dir}/50-runtime.conf")))
        .status()
        .unwrap();
    assert!(status.success());
    let (code, text) = node.check();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("started before /etc/kubernetes/kubelet.conf.d/50-runtime.conf changed"),
        "{text}"
    );

    // No kubelet at all.
    for entry in std::fs::read_dir(node.path("proc")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(path).unwrap();
        }
    }
    let (code, text) = node.check();
    assert_eq!(
        (code, text.trim()),
        (1, "no kubelet process runs on this node")
    );

    // A socket file is not enough: pullgate must answer a CRI call.
    node.fake_kubelet(&[&format!("--container-runtime-endpoint={PULLGATE_ENDPOINT}")]);
    assert_eq!(node.check().0, 0);
    drop(_cri);
    let _silent = node.silent_socket();
    let (code, text) = node.check();
    assert_eq!(
        (code, text.trim()),
        (
            1,
            "pullgate does not answer CRI calls on /run/pullgate/pullgate.sock"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn node_installer_leaves_kubelet_alone_when_pullgate_does_not_come_up() {
    let m = load();
    let kubelet = "kind: KubeletConfiguration\n";
    let node = ScratchNode::new(&m, "t", "not a real CA", Some(kubelet));
    write(
        &node.host("var/lib/kubelet/kubeadm-flags.env"),
        KUBEADM_FLAGS,
    );
    node.boot_kubelet();
    let before = node.kubelet_args();
    // The socket exists but nothing answers on it.
    let _silent = node.silent_socket();
    // An IPv6 Service address, as on single-stack IPv6 clusters.
    let mut installer = node.install("fd00::1", 443, true);
    wait_for(&node, "the installer to give up", || {
        installer.exited().is_some()
    })
    .await;
    assert_eq!(installer.exited(), Some(1), "{}", node.log());
    assert!(
        node.log().contains(
            "pullgate does not answer CRI calls on /run/pullgate/pullgate.sock within 2s\n"
        ) && node.log().contains("kubelet is left unchanged"),
        "{}",
        node.log()
    );
    assert!(
        !node.calls().iter().any(|c| c.contains("kubelet")),
        "{:?}",
        node.calls()
    );
    assert_eq!(
        std::fs::read_to_string(node.host("var/lib/kubelet/config.yaml")).unwrap(),
        kubelet
    );
    assert_eq!(
        std::fs::read_to_string(node.host("var/lib/kubelet/kubeadm-flags.env")).unwrap(),
        KUBEADM_FLAGS
    );
    assert!(!node.host("etc/kubernetes/kubelet.conf.d").exists());
    assert_eq!(node.kubelet_args(), before);
    let kubeconfig = std::fs::read_to_string(node.host("etc/pullgate/kubeconfig")).unwrap();
    assert!(
        kubeconfig.contains("server: https://[fd00::1]:443\n"),
        "{kubeconfig}"
    );
}

/// A release that exits at start: the installer puts the binary it replaced back, which
/// serves again; the install reports failure (its log, and a readiness probe that fails so a
/// rolling update stops at this node), and a later run (a pod restart) does not retry it.
#[tokio::test(flavor = "multi_thread")]
async fn node_installer_rolls_back_to_the_previous_release_when_the_new_one_does_not_answer() {
    const OLD: &str = "#!/bin/sh\necho release-old\n";
    const NEW: &str = "#!/bin/sh\necho 'release-new: cannot start' >&2\nexit 1\n";
    let m = load();
    let node = ScratchNode::new(&m, "t", "ca", None);
    let installed = node.host("usr/local/bin/pullgate");
    write(&installed, OLD);
    std::fs::set_permissions(&installed, std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = node.path("image/pullgate");
    write(&image, NEW);
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o755)).unwrap();
    // systemd's pullgate.service: CRI answered while the last start of the installed binary
    // succeeded, nothing answering while it failed.
    let state = node.path("service-state");
    let socket = node.host("run/pullgate/pullgate.sock");
    let served = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = served.clone();
    let supervisor = tokio::spawn(async move {
        let mut server: Option<FakeCri> = None;
        loop {
            let now = read_or_empty(&state);
            match (now.starts_with("running "), &server) {
                (true, None) => {
                    let _ = std::fs::remove_file(&socket);
                    server = Some(FakeCri::serve(&socket));
                    log.lock().unwrap().push(now);
                }
                (false, Some(_)) => server = None,
                _ => {}
            }
            if let Some(s) = &server {
                let n = s.requests().len();
                log.lock().unwrap().push(format!("requests {n}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let mut installer = node.install("10.96.0.1", 443, false);
    wait_for(&node, "the rollback", || {
        node.log().contains("the previous release serves again") || installer.exited().is_some()
    })
    .await;
    assert_eq!(installer.exited(), None, "{}", node.log());
    let log = node.log();
    assert!(
        log.contains("does not answer CRI calls on /run/pullgate/pullgate.sock within 2s")
            && log.contains("INSTALL FAILED"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), OLD);
    assert_eq!(mode(&installed), 0o755);
    assert!(read_or_empty(&node.path("service-state")).starts_with("running release-old"));
    // The old release served the installer's CRI Version call after the rollback (the
    // supervisor samples its request count every 20 ms: give it a moment to see the call).
    let answered = || {
        served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|l| l.starts_with("requests ") && l != "requests 0")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !answered() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        answered(),
        "{:?}",
        served.lock().unwrap_or_else(|p| p.into_inner())
    );
    let (code, out) = node.check();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("did not answer CRI calls on this node"),
        "{out}"
    );
    let restarts = |node: &ScratchNode| {
        node.calls()
            .iter()
            .filter(|c| c.as_str() == "systemctl restart pullgate.service")
            .count()
    };
    assert_eq!(restarts(&node), 2, "{:?}", node.calls());
    drop(installer);

    // The pod restarts with the same release: it is not tried again.
    let mut again = node.install("10.96.0.1", 443, false);
    wait_for(&node, "the second run to settle", || {
        node.log().contains("INSTALL FAILED: this release") || again.exited().is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(again.exited(), None, "{}", node.log());
    assert_eq!(std::fs::read_to_string(&installed).unwrap(), OLD);
    assert_eq!(restarts(&node), 2, "{:?}", node.calls());
    assert_eq!(node.check().0, 1);
    drop(again);

    // A fixed release (another binary) is installed normally, and the probe passes again as
    // far as the release goes.
    write(&image, "#!/bin/sh\necho release-fixed\n");
    std::fs::remove_file(node.path("service-state")).unwrap();
    let mut fixed = node.install("10.96.0.1", 443, false);
    wait_for(&node, "the fixed release", || {
        node.log().contains("pullgate is serving on") || fixed.exited().is_some()
    })
    .await;
    assert_eq!(fixed.exited(), None, "{}", node.log());
    assert!(!node
        .host("var/lib/pullgate/pullgate.failed-sha256")
        .exists());
    assert_eq!(
        std::fs::read_to_string(node.host("var/lib/pullgate/pullgate.previous")).unwrap(),
        OLD
    );
    let (_, out) = node.check();
    assert!(!out.contains("did not answer"), "{out}");
    supervisor.abort();
}

/// kubelet needs pullgate for every container operation: a release that does not answer
/// must not leave a wired kubelet on a dead socket.
#[tokio::test(flavor = "multi_thread")]
async fn node_installer_rolls_kubelet_back_to_containerd_when_pullgate_stops_answering() {
    let m = load();
    let kubelet = "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n";
    let node = ScratchNode::new(&m, "t", "ca", Some(kubelet));
    write(
        &node.host("var/lib/kubelet/kubeadm-flags.env"),
        KUBEADM_FLAGS,
    );
    node.boot_kubelet();
    let original = node.kubelet_args();
    let cri = node.serve_cri();
    let first = node.install("10.96.0.1", 443, true);
    wait_for(&node, "kubelet to be wired", || {
        node.log()
            .contains("kubelet now sends runtime and image calls to pullgate")
    })
    .await;
    drop(first);
    let (code, text) = node.check();
    assert_eq!(code, 0, "{text}");

    // A new release that hangs: the socket is there, nothing answers.
    drop(cri);
    write(
        &node.path("image/pullgate"),
        "#!/bin/sh\necho a release that hangs\n",
    );
    let _silent = node.silent_socket();
    let calls_before = node.calls().len();
    let mut installer = node.install("10.96.0.1", 443, true);
    wait_for(&node, "the installer to give up", || {
        installer.exited().is_some()
    })
    .await;
    assert_eq!(installer.exited(), Some(1), "{}", node.log());
    assert!(
        node.log()
            .contains("rolled kubelet back to containerd (unix:///run/containerd/containerd.sock); this node is not enforced"),
        "{}",
        node.log()
    );
    assert_eq!(
        node.calls()[calls_before..],
        [
            "systemctl daemon-reload",
            "systemctl enable pullgate.service",
            "systemctl restart pullgate.service",
            "systemctl status --no-pager pullgate.service",
            // The release it replaced is tried first; nothing answers either.
            "systemctl restart pullgate.service",
            "systemctl daemon-reload",
            "systemctl restart kubelet.service"
        ]
    );
    assert!(
        node.log()
            .contains("the previous release does not answer either"),
        "{}",
        node.log()
    );
    // Not the release's fault as far as anyone can tell: not remembered as failed.
    assert!(!node
        .host("var/lib/pullgate/pullgate.failed-sha256")
        .exists());
    // Everything the installer wrote for kubelet is undone; kubelet runs as before.
    assert!(!node
        .host("etc/kubernetes/kubelet.conf.d/90-pullgate.conf")
        .exists());
    assert!(!node
        .host("etc/systemd/system/kubelet.service.d/20-pullgate-config-dir.conf")
        .exists());
    assert_eq!(
        std::fs::read_to_string(node.host("var/lib/kubelet/kubeadm-flags.env")).unwrap(),
        KUBEADM_FLAGS
    );
    assert_eq!(node.kubelet_args(), original);
    let (code, text) = node.check();
    assert_eq!(code, 1, "{text}");

    // The next run with a release that answers wires kubelet again.
    std::fs::remove_file(node.host("run/pullgate/pullgate.sock")).unwrap();
    let _cri = node.serve_cri();
    let _again = node.install("10.96.0.1", 443, true);
    wait_for(&node, "kubelet to be wired again", || {
        node.log()
            .contains("kubelet now sends runtime and image calls to pullgate")
    })
    .await;
    assert_eq!(node.check().0, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_installer_fails_loudly_when_asked_to_configure_a_kubelet_it_cannot_find() {
    let m = load();
    let node = ScratchNode::new(&m, "t", "ca", None);
    let _cri = node.serve_cri();
    let mut installer = node.install("10.96.0.1", 443, true);
    wait_for(&node, "the installer to stop", || {
        installer.exited().is_some()
    })
    .await;
    assert_eq!(installer.exited(), Some(1), "{}", node.log());
    assert!(
        node.log()
            .contains("CONFIGURE_KUBELET=true, but no kubelet process runs on this node"),
        "{}",
        node.log()
    );
    assert!(!node.host("etc/kubernetes").exists());
    // Without CONFIGURE_KUBELET the same node is installed, serving and looping, but not
    // ready: nothing sends kubelet's calls through pullgate.
    let mut installer = node.install("10.96.0.1", 443, false);
    wait_for(&node, "pullgate to serve", || {
        node.log().contains("pullgate is serving")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(installer.exited(), None, "{}", node.log());
    assert!(
        node.log()
            .contains("not ready: no kubelet process runs on this node"),
        "{}",
        node.log()
    );
}

/// The kind cluster the README's cluster-mode walkthrough creates: the node names it uses
/// (pullgate-control-plane, pullgate-worker), and nothing of pullgate's on the nodes, so the
/// installer can write the binary and kubelet starts out on containerd.
#[test]
fn kind_cluster_for_cluster_mode_starts_plain_with_the_walkthrough_nodes() {
    let cluster: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("kind-config/cluster-mode.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(cluster["kind"], "Cluster");
    assert_eq!(cluster["apiVersion"], "kind.x-k8s.io/v1alpha4");
    assert_eq!(cluster["name"], "pullgate");
    let roles: Vec<&str> = cluster["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["control-plane", "worker"]);
    for node in cluster["nodes"].as_array().unwrap() {
        assert!(node.get("extraMounts").is_none(), "{node}");
    }
    assert!(cluster.get("kubeadmConfigPatches").is_none());
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(readme.contains("kind create cluster --config kind-config/cluster-mode.yaml"));
}

/// kubectl for rendering kustomizations (offline): the test bed's, else the system one.
fn kubectl() -> Option<PathBuf> {
    let testbed = PathBuf::from("/var/cache/pullgate-testbed/bin/kubectl");
    if testbed.exists() {
        return Some(testbed);
    }
    let status = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output();
    status
        .is_ok_and(|o| o.status.success())
        .then(|| PathBuf::from("kubectl"))
}

/// The documents `kubectl kustomize DIR` renders.
fn kustomize(kubectl: &Path, dir: &str) -> Vec<Value> {
    let out = std::process::Command::new(kubectl)
        .args(["kustomize", dir])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            serde_json::to_value(v).unwrap()
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn pod_images(m: &Manifests) -> Vec<String> {
    let specs = m
        .deployments
        .iter()
        .filter_map(|d| d.spec.as_ref()?.template.spec.clone())
        .chain(
            m.daemon_sets
                .iter()
                .filter_map(|d| d.spec.as_ref()?.template.spec.clone()),
        );
    let mut images = Vec::new();
    for spec in specs {
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            images.push(c.image.clone().unwrap_or_default());
        }
    }
    images
}

fn by_digest(image: &str) -> bool {
    image.rsplit_once("@sha256:").is_some_and(|(_, d)| {
        d.len() == 64
            && d.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `kubectl apply -k deploy/` installs everything: the kustomization names every manifest in
/// deploy/, renders offline, every rendered object parses as its typed kind, and every
/// container image is referenced by digest (in the files and as rendered). The cert-manager
/// option renders too and issues the Secret the shim mounts.
#[test]
fn kustomization_renders_everything_with_images_by_digest() {
    let Some(kubectl) = kubectl() else {
        assert!(std::env::var_os("CI").is_none(), "no kubectl in CI");
        eprintln!("SKIPPED: no kubectl to render deploy/kustomization.yaml");
        return;
    };
    // Every top-level manifest is a resource of the kustomization (CRDs by path).
    let kustomization: Value = serde_json::to_value(
        serde_yaml::from_str::<serde_yaml::Value>(
            &std::fs::read_to_string(root().join("deploy/kustomization.yaml")).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for file in yaml_files(&root().join("deploy")) {
        let rel = file.strip_prefix(root().join("deploy")).unwrap();
        let rel = rel.to_str().unwrap();
        if rel.ends_with("kustomization.yaml") || rel.starts_with("cert-manager/") {
            continue;
        }
        assert!(
            resources.contains(&rel),
            "deploy/{rel} is not in deploy/kustomization.yaml's resources"
        );
    }

    let raw = load();
    let rendered_docs = kustomize(&kubectl, "deploy");
    let mut rendered = Manifests::default();
    for (i, doc) in rendered_docs.iter().enumerate() {
        add(
            &mut rendered,
            doc,
            &format!("kubectl kustomize deploy/ document {}", i + 1),
        );
    }
    let count = |m: &Manifests| {
        m.namespaces.len()
            + m.service_accounts.len()
            + m.cluster_roles.len()
            + m.roles.len()
            + m.cluster_role_bindings.len()
            + m.role_bindings.len()
            + m.crds.len()
            + m.deployments.len()
            + m.daemon_sets.len()
            + m.services.len()
            + m.config_maps.len()
            + m.pdbs.len()
            + m.validating.len()
            + m.mutating.len()
            + m.network_policies.len()
    };
    assert_eq!(count(&rendered), rendered_docs.len());
    assert_eq!(
        count(&rendered),
        count(&raw),
        "every object of deploy/ rendered"
    );
    for (what, m) in [
        ("deploy/*.yaml", &raw),
        ("kubectl kustomize deploy/", &rendered),
    ] {
        let images = pod_images(m);
        assert!(images.len() >= 2, "{images:?}");
        for image in images {
            assert!(
                by_digest(&image),
                "{what}: {image} is not referenced by digest"
            );
        }
    }
    assert!(!by_digest("ghcr.io/pullgate/pullgate:0.1.0"));
    assert!(!by_digest("ghcr.io/pullgate/pullgate@sha256:abc"));

    // The cert-manager option: the Certificate the webhook configurations name issues the
    // Secret the shim mounts, renewed 30 days ahead.
    let cm = kustomize(&kubectl, "deploy/cert-manager");
    let cert = cm
        .iter()
        .find(|d| d["kind"] == "Certificate" && d["metadata"]["name"] == "pullgate-admission")
        .expect("Certificate pullgate-admission");
    assert_eq!(cert["metadata"]["namespace"], "pullgate-system");
    assert_eq!(cert["spec"]["renewBefore"], "720h");
    let secret = cert["spec"]["secretName"].as_str().unwrap();
    let mounted: Vec<String> = raw.deployments[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.secret.as_ref()?.secret_name.clone())
        .collect();
    assert!(mounted.iter().any(|s| s == secret), "{mounted:?}");
    let dns: Vec<&str> = cert["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(
        dns.contains(&"pullgate-admission.pullgate-system.svc"),
        "{dns:?}"
    );
    for annotations in raw
        .validating
        .iter()
        .map(|v| &v.metadata.annotations)
        .chain(raw.mutating.iter().map(|v| &v.metadata.annotations))
    {
        assert_eq!(
            annotations
                .as_ref()
                .and_then(|a| a.get("cert-manager.io/inject-ca-from"))
                .map(String::as_str),
            Some("pullgate-system/pullgate-admission")
        );
    }
}

/// Stands in for kubectl in deploy/gen-certs.sh: the Secret's tls.crt and the webhooks'
/// caBundle kept in files under $KUBECTL_STATE, every call recorded.
const KUBECTL_STUB: &str = r#"#!/bin/sh
S=$KUBECTL_STATE
echo "$*" >> "$S/calls"
case "$*" in
  *"get validatingwebhookconfiguration pullgate -o jsonpath={.webhooks[0].clientConfig.caBundle}")
    cat "$S/ca.b64" 2>/dev/null || true ;;
  *"get secret pullgate-admission-tls -o jsonpath="*)
    [ -f "$S/tls.crt" ] || { echo 'Error from server (NotFound)' >&2; exit 1; }
    base64 -w0 < "$S/tls.crt" ;;
  "get validatingwebhookconfiguration pullgate -o jsonpath={range .webhooks[*]}x{end}") printf xx ;;
  "get mutatingwebhookconfiguration pullgate -o jsonpath={range .webhooks[*]}x{end}") printf x ;;
  patch*) printf '%s' "$*" | sed 's/.*"value":"\([^"]*\)".*/\1/' > "$S/ca.b64" ;;
  *"create secret tls pullgate-admission-tls --cert "*)
    cp "$(printf '%s' "$*" | sed 's/.*--cert \([^ ]*\) .*/\1/')" "$S/tls.crt"; echo "kind: Secret" ;;
  "apply -f -") cat > /dev/null ;;
  *) echo "kubectl stub: unexpected: $*" >&2; exit 2 ;;
esac
"#;

/// deploy/gen-certs.sh with the kubectl stub and `env`: (exit code, output).
fn gen_certs(state: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg(root().join("deploy/gen-certs.sh"))
        .env("KUBECTL", state.join("kubectl"))
        .env("KUBECTL_STATE", state);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
    )
}

/// gen-certs.sh is safe to re-run: a certificate with more than 30 days left is left alone (no
/// new CA, no patch); one expiring within 30 days is renewed, and the caBundle then accepts
/// both the new and the previous CA so the shim's old certificate keeps working until reload.
#[test]
fn gen_certs_renews_only_when_due_and_keeps_the_previous_ca_during_rotation() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        assert!(std::env::var_os("CI").is_none(), "no openssl in CI");
        eprintln!("SKIPPED: no openssl");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    write(&state.join("kubectl"), KUBECTL_STUB);
    std::fs::set_permissions(
        state.join("kubectl"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let patches = || {
        read_or_empty(&state.join("calls"))
            .lines()
            .filter(|l| l.starts_with("patch "))
            .count()
    };
    let bundle = || {
        use base64::Engine as _;
        let b64 = read_or_empty(&state.join("ca.b64"));
        let pem = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap();
        let path = state.join("bundle.pem");
        std::fs::write(&path, &pem).unwrap();
        (String::from_utf8(pem).unwrap(), path)
    };
    let cert = state.join("tls.crt");
    let cert_s = cert.to_str().unwrap().to_string();

    // A certificate that expires in 10 days (as an old install would have one).
    let (code, out) = gen_certs(state, &[("DAYS", "10")]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(patches(), 3, "every webhook's caBundle: {out}");
    let first = std::fs::read(&cert).unwrap();
    let (pem, path) = bundle();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 1);
    assert!(openssl(&["verify", "-CAfile", path.to_str().unwrap(), &cert_s]).0);
    let (_, san) = openssl(&["x509", "-in", &cert_s, "-noout", "-ext", "subjectAltName"]);
    assert!(
        san.contains("DNS:pullgate-admission.pullgate-system.svc"),
        "{san}"
    );

    // Within 30 days of expiry: renewed, the bundle holds the new and the previous CA.
    let (code, out) = gen_certs(state, &[]);
    assert_eq!(code, 0, "{out}");
    let second = std::fs::read(&cert).unwrap();
    assert_ne!(first, second, "not renewed: {out}");
    assert_eq!(patches(), 6);
    let (pem, path) = bundle();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "{pem}");
    let path_s = path.to_str().unwrap().to_string();
    assert!(openssl(&["verify", "-CAfile", &path_s, &cert_s]).0);
    let old = state.join("old.crt");
    std::fs::write(&old, &first).unwrap();
    assert!(
        openssl(&["verify", "-CAfile", &path_s, old.to_str().unwrap()]).0,
        "the previous certificate must still verify during the rotation"
    );
    assert!(
        openssl(&[
            "x509",
            "-in",
            &cert_s,
            "-noout",
            "-checkend",
            &(300 * 86400).to_string()
        ])
        .0
    );

    // Re-run with a year left: nothing changes.
    let before_calls = read_or_empty(&state.join("calls"));
    let (code, out) = gen_certs(state, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("left as it is"), "{out}");
    assert_eq!(std::fs::read(&cert).unwrap(), second);
    assert_eq!(patches(), 6);
    let new_calls = read_or_empty(&state.join("calls"))[before_calls.len()..].to_string();
    assert!(
        !new_calls.contains("create") && !new_calls.contains("apply"),
        "{new_calls}"
    );

    // A caBundle that no longer verifies the certificate (someone replaced it): renewed.
    std::fs::write(state.join("ca.b64"), "").unwrap();
    let (code, out) = gen_certs(state, &[]);
    assert_eq!(code, 0, "{out}");
    assert_ne!(std::fs::read(&cert).unwrap(), second);
    let (_, path) = bundle();
    assert!(openssl(&["verify", "-CAfile", path.to_str().unwrap(), &cert_s]).0);
}

/// The shim's NetworkPolicy selects the shim's pods and opens only the webhook port, not to
/// the pod network; the workload webhook waits longer than one registry request may take.
#[test]
fn admission_network_policy_and_webhook_timeout() {
    let m = load();
    let deploy = &m.deployments[0];
    let template = &deploy.spec.as_ref().unwrap().template;
    let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let policy = m
        .network_policies
        .iter()
        .find(|p| name_of(&p.metadata) == "pullgate-admission")
        .expect("a NetworkPolicy for the shim");
    let spec = policy.spec.as_ref().unwrap();
    let selected = spec
        .pod_selector
        .as_ref()
        .unwrap()
        .match_labels
        .clone()
        .unwrap();
    assert!(
        selected.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "{selected:?}"
    );
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    let c = &template.spec.as_ref().unwrap().containers[0];
    let https = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("https"))
        .unwrap();
    let rules = spec.ingress.as_ref().unwrap();
    assert_eq!(rules.len(), 1);
    let ports = rules[0].ports.as_ref().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(https.container_port))
    );
    for peer in rules[0].from.as_ref().unwrap() {
        assert!(
            peer.pod_selector.is_none() && peer.namespace_selector.is_none(),
            "pods admitted"
        );
        let block = peer.ip_block.as_ref().unwrap();
        // Everything may be allowed only with the pod network carved out.
        let carved_out = !block.except.as_deref().unwrap_or_default().is_empty();
        assert!(block.cidr != "0.0.0.0/0" || carved_out, "{block:?}");
    }

    let registry_timeout = 15;
    let workloads = m.validating[0]
        .webhooks
        .iter()
        .flatten()
        .find(|w| w.name == "workloads.pullgate.dev")
        .unwrap();
    let timeout = workloads.timeout_seconds.unwrap_or(10);
    assert!(timeout > registry_timeout && timeout <= 30, "{timeout}");
}

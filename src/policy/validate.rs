//! ClusterImagePolicy validation: every rule policy-controller's webhook applies, each problem
//! reported with the field path it concerns, all problems at once.

use super::glob::validate_glob;
use super::types::{
    Authority, ClusterImagePolicy, ClusterImagePolicySpec, Identity, KeyRef, Policy, TrustRoot,
};
use crate::image_ref::ImageRef;
use crate::verify::keys::{parse_pem_keys, HashAlgorithm};

/// One validation problem: the field it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// KMS URI schemes cosign knows.
const KMS_SCHEMES: [&str; 4] = ["awskms://", "azurekms://", "hashivault://", "gcpkms://"];
/// Workload resources a CIP `match` may name.
const WORKLOAD_RESOURCES: [&str; 7] = [
    "pods",
    "deployments",
    "replicasets",
    "statefulsets",
    "daemonsets",
    "jobs",
    "cronjobs",
];

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// What validation depends on beyond the object: the controller's settings.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// `fail-on-empty-authorities` of the controller's ConfigMap.
    pub fail_on_empty_authorities: bool,
    /// The namespace key Secrets are read from; a `secretRef.namespace` must name it.
    pub controller_namespace: &'a str,
}

/// Validates a whole ClusterImagePolicy object.
pub fn validate_cip(cip: &ClusterImagePolicy, rules: Rules<'_>) -> Vec<Problem> {
    let mut p = Problems::default();
    if cip.metadata.name.as_deref().unwrap_or("").is_empty() {
        p.push("metadata.name", "missing name");
    }
    validate_spec(&cip.spec, rules, &mut p);
    p.0
}

fn validate_spec(spec: &ClusterImagePolicySpec, rules: Rules<'_>, p: &mut Problems) {
    if spec.images.is_empty() {
        p.push("spec.images", "at least one image glob is required");
    }
    for (i, image) in spec.images.iter().enumerate() {
        if let Err(e) = validate_glob(&image.glob) {
            p.push(format!("spec.images[{i}].glob"), e.to_string());
        }
    }
    if spec.authorities.is_empty() && rules.fail_on_empty_authorities {
        p.push("spec.authorities", "at least one authority is required");
    }
    for (i, authority) in spec.authorities.iter().enumerate() {
        validate_authority(authority, &format!("spec.authorities[{i}]"), rules, p);
    }
    if let Some(mode) = &spec.mode {
        if mode != "enforce" && mode != "warn" {
            p.push(
                "spec.mode",
                format!("invalid value {mode:?}: expected \"enforce\" or \"warn\""),
            );
        }
    }
    for (i, m) in spec.match_.iter().enumerate() {
        let path = format!("spec.match[{i}]");
        if !m.resource.is_empty() && !WORKLOAD_RESOURCES.contains(&m.resource.as_str()) {
            p.push(
                format!("{path}.resource"),
                format!(
                    "unsupported resource {:?}: expected one of {}",
                    m.resource,
                    WORKLOAD_RESOURCES.join(", ")
                ),
            );
        }
        if let Some(selector) = &m.selector {
            for problem in super::matching::selector_problems(selector) {
                p.push(format!("{path}.selector"), problem);
            }
        }
        if m.selector.is_some() && (m.resource.is_empty() || m.version.is_empty()) {
            p.push(
                format!("{path}.selector"),
                "a selector requires resource and version (group may be empty for core resources)",
            );
        }
    }
    if let Some(policy) = &spec.policy {
        validate_policy(policy, "spec.policy", false, p);
    }
}

fn validate_authority(a: &Authority, path: &str, rules: Rules<'_>, p: &mut Problems) {
    let kinds = [
        ("key", a.key.is_some()),
        ("keyless", a.keyless.is_some()),
        ("static", a.static_.is_some()),
    ];
    let set: Vec<&str> = kinds.iter().filter(|(_, s)| *s).map(|(n, _)| *n).collect();
    match set.len() {
        0 => p.push(
            path,
            "expected exactly one of key, keyless, static; got none",
        ),
        1 => {}
        _ => p.push(
            path,
            format!(
                "expected exactly one of key, keyless, static; got {}",
                set.join(" and ")
            ),
        ),
    }
    if let Some(key) = &a.key {
        validate_key(key, &format!("{path}.key"), rules, p);
    }
    if let Some(keyless) = &a.keyless {
        let kpath = format!("{path}.keyless");
        if keyless.url.is_some() && keyless.ca_cert.is_some() {
            p.push(&kpath, "expected exactly one of url, ca-cert; got both");
        }
        if let Some(ca) = &keyless.ca_cert {
            let cpath = format!("{kpath}.ca-cert");
            match (&ca.data, &ca.secret_ref) {
                (Some(_), Some(_)) => p.push(&cpath, "expected one of data, secretRef; got both"),
                (None, None) => p.push(&cpath, "expected one of data, secretRef; got none"),
                _ => {}
            }
        }
        if keyless.identities.is_empty() {
            p.push(
                format!("{kpath}.identities"),
                "at least one identity is required",
            );
        }
        for (i, id) in keyless.identities.iter().enumerate() {
            validate_identity(id, &format!("{kpath}.identities[{i}]"), p);
        }
    }
    if let Some(st) = &a.static_ {
        if st.action != "pass" && st.action != "fail" {
            p.push(
                format!("{path}.static.action"),
                format!(
                    "invalid value {:?}: expected \"pass\" or \"fail\"",
                    st.action
                ),
            );
        }
        let extras = [
            ("attestations", !a.attestations.is_empty()),
            ("source", !a.source.is_empty()),
            ("ctlog", a.ctlog.is_some()),
            ("rfc3161timestamp", a.rfc3161timestamp.is_some()),
        ];
        for (field, present) in extras {
            if present {
                p.push(
                    format!("{path}.{field}"),
                    "not allowed with a static authority",
                );
            }
        }
    }
    if a.source.len() > 1 {
        p.push(
            format!("{path}.source"),
            format!("at most one source is allowed, got {}", a.source.len()),
        );
    }
    for (i, source) in a.source.iter().enumerate() {
        if let Some(oci) = &source.oci {
            if let Err(e) = ImageRef::parse(oci) {
                p.push(format!("{path}.source[{i}].oci"), e.to_string());
            }
        }
        for (j, secret) in source.signature_pull_secrets.iter().enumerate() {
            if secret.name.is_empty() {
                p.push(
                    format!("{path}.source[{i}].signaturePullSecrets[{j}].name"),
                    "missing name",
                );
            }
        }
    }
    for (i, att) in a.attestations.iter().enumerate() {
        let apath = format!("{path}.attestations[{i}]");
        if att.name.is_empty() {
            p.push(format!("{apath}.name"), "missing name");
        }
        if att.predicate_type.is_empty() {
            p.push(format!("{apath}.predicateType"), "missing predicateType");
        }
        if let Some(policy) = &att.policy {
            validate_policy(policy, &format!("{apath}.policy"), true, p);
        }
    }
}

fn validate_key(key: &KeyRef, path: &str, rules: Rules<'_>, p: &mut Problems) {
    let set = [
        key.data.is_some(),
        key.kms.is_some(),
        key.secret_ref.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        p.push(
            path,
            format!("expected exactly one of data, kms, secretRef; got {set}"),
        );
    }
    if let Some(data) = &key.data {
        if let Err(e) = parse_pem_keys(data) {
            p.push(format!("{path}.data"), format!("not a PEM public key: {e}"));
        }
    }
    if let Some(kms) = &key.kms {
        if !KMS_SCHEMES.iter().any(|s| kms.starts_with(s)) {
            p.push(
                format!("{path}.kms"),
                format!(
                    "unknown KMS scheme in {kms:?}: expected one of {}",
                    KMS_SCHEMES.join(", ")
                ),
            );
        } else if kms.starts_with("awskms://") {
            if let Err(e) = validate_aws_kms(kms) {
                p.push(format!("{path}.kms"), format!("{kms:?}: {e}"));
            }
        }
    }
    if let Some(secret) = &key.secret_ref {
        if secret.name.is_empty() {
            p.push(format!("{path}.secretRef.name"), "missing name");
        }
        match secret.namespace.as_deref() {
            Some(ns) if !ns.is_empty() && ns != rules.controller_namespace => p.push(
                format!("{path}.secretRef.namespace"),
                format!(
                    "{ns:?}: key Secrets are read from the controller's namespace only; leave \
                     it out or set {:?}",
                    rules.controller_namespace
                ),
            ),
            _ => {}
        }
    }
    if let Some(h) = &key.hash_algorithm {
        if HashAlgorithm::parse(h).is_none() {
            p.push(
                format!("{path}.hashAlgorithm"),
                format!("unknown hash algorithm {h:?}: expected sha224, sha256, sha384 or sha512"),
            );
        }
    }
}

/// An AWS KMS key reference as cosign's AWS provider and policy-controller accept it:
/// `awskms://[ENDPOINT]/ARN`, the ARN naming a key (`…:key/<id>`) or an alias
/// (`…:alias/<name>`). A bare key ID or alias name is refused, as policy-controller refuses it.
fn validate_aws_kms(kms: &str) -> Result<(), String> {
    const FORMAT: &str = "expected awskms://[ENDPOINT]/arn:aws:kms:REGION:ACCOUNT:key/ID or \
                          …:alias/NAME (endpoint optional)";
    static SHAPE: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        let uuid = "m?r?k?-?[A-Fa-f0-9]{8}-?[A-Fa-f0-9]{4}-?[A-Fa-f0-9]{4}-?[A-Fa-f0-9]{4}-?[A-Fa-f0-9]{12}";
        let arn = r"arn:(?:aws|aws-us-gov|aws-cn):kms:[a-z0-9-]+:\d{12}:";
        regex::Regex::new(&format!(
            "^awskms://[^/]*/(?:{uuid}|{arn}key/{uuid}|alias/.*|{arn}alias/.*)$"
        ))
        .expect("static regex")
    });
    let parts: Vec<&str> = kms.split('/').collect();
    if parts.len() < 4 || !SHAPE.is_match(kms) {
        return Err(FORMAT.to_string());
    }
    let endpoint = parts[2];
    if endpoint.starts_with("arn") || endpoint.starts_with("alias") {
        return Err(FORMAT.to_string());
    }
    if !endpoint.is_empty() && !is_host_port(endpoint) {
        return Err(format!("endpoint {endpoint:?} is not HOST:PORT"));
    }
    let resource = parts[3]
        .strip_prefix("arn:")
        .and_then(|rest| rest.splitn(5, ':').nth(4));
    match resource {
        Some("key" | "alias") => Ok(()),
        Some(other) => Err(format!("the ARN names a {other:?}, not a key or an alias")),
        None => Err(format!(
            "{:?} is not a key or alias ARN; {FORMAT}",
            parts[3]
        )),
    }
}

/// `host:port` or `[v6]:port`, the port non-empty.
fn is_host_port(s: &str) -> bool {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once("]:") {
            Some((h, p)) => (h, p),
            None => return false,
        },
        None => match s.split_once(':') {
            Some((h, p)) if !p.contains(':') => (h, p),
            _ => return false,
        },
    };
    !port.is_empty() && !host.contains('/') && port.chars().all(|c| c.is_ascii_alphanumeric())
}

fn validate_identity(id: &Identity, path: &str, p: &mut Problems) {
    let pairs = [
        ("issuer", &id.issuer, "issuerRegExp", &id.issuer_reg_exp),
        ("subject", &id.subject, "subjectRegExp", &id.subject_reg_exp),
    ];
    for (plain, plain_v, re, re_v) in pairs {
        match (plain_v, re_v) {
            (None, None) => p.push(path, format!("expected one of {plain}, {re}; got none")),
            (Some(_), Some(_)) => p.push(path, format!("expected one of {plain}, {re}; got both")),
            (Some(v), None) if v.is_empty() => p.push(format!("{path}.{plain}"), "empty value"),
            _ => {}
        }
        if let Some(expr) = re_v {
            if let Err(e) = regex::Regex::new(expr) {
                p.push(
                    format!("{path}.{re}"),
                    format!("invalid regular expression: {e}"),
                );
            }
        }
    }
}

fn validate_policy(policy: &Policy, path: &str, on_attestation: bool, p: &mut Problems) {
    if policy.type_ != "cue" && policy.type_ != "rego" {
        p.push(
            format!("{path}.type"),
            format!(
                "invalid value {:?}: expected \"cue\" or \"rego\"",
                policy.type_
            ),
        );
    }
    let sources = [
        policy.data.is_some(),
        policy.remote.is_some(),
        policy.config_map_ref.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if sources != 1 {
        p.push(
            path,
            format!("expected exactly one of data, remote, configMapRef; got {sources}"),
        );
    }
    if let Some(remote) = &policy.remote {
        if !remote.url.starts_with("https://") {
            p.push(format!("{path}.remote.url"), "must be an https:// URL");
        }
        if remote.sha256sum.is_empty() {
            p.push(format!("{path}.remote.sha256sum"), "missing sha256sum");
        }
    }
    if let Some(cm) = &policy.config_map_ref {
        if cm.name.is_empty() {
            p.push(format!("{path}.configMapRef.name"), "missing name");
        }
        if cm.key.is_empty() {
            p.push(format!("{path}.configMapRef.key"), "missing key");
        }
    }
    if on_attestation {
        let flags = [
            ("fetchConfigFile", policy.fetch_config_file.is_some()),
            ("includeSpec", policy.include_spec.is_some()),
            ("includeObjectMeta", policy.include_object_meta.is_some()),
            ("includeTypeMeta", policy.include_type_meta.is_some()),
        ];
        for (field, set) in flags {
            if set {
                p.push(
                    format!("{path}.{field}"),
                    "only allowed on a ClusterImagePolicy-level policy",
                );
            }
        }
    }
}

/// Validates a TrustRoot: exactly one of remote, repository, sigstoreKeys.
pub fn validate_trust_root(tr: &TrustRoot) -> Vec<Problem> {
    let mut p = Problems::default();
    if tr.metadata.name.as_deref().unwrap_or("").is_empty() {
        p.push("metadata.name", "missing name");
    }
    let set = [
        tr.spec.remote.is_some(),
        tr.spec.repository.is_some(),
        tr.spec.sigstore_keys.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        p.push(
            "spec",
            format!("expected exactly one of remote, repository, sigstoreKeys; got {set}"),
        );
    }
    if let Some(keys) = &tr.spec.sigstore_keys {
        for (i, tlog) in keys.t_logs.iter().enumerate() {
            if let Err(e) = crate::verify::rekor::decode_log_key(&tlog.public_key) {
                p.push(
                    format!("spec.sigstoreKeys.tLogs[{i}].publicKey"),
                    e.to_string(),
                );
            }
        }
    }
    p.0
}

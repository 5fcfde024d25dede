//! Serde model of the `policy.sigstore.dev` objects and the core Kubernetes objects a policy
//! directory (or the API server) supplies.
//!
//! Field names and JSON shapes are policy-controller's, so existing YAML parses unchanged.
//! Every policy type rejects unknown fields: a misspelt field must not silently weaken a policy.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// API group of ClusterImagePolicy and TrustRoot.
pub const GROUP: &str = "policy.sigstore.dev";

/// A `ClusterImagePolicy` as stored by the API server (v1alpha1 and v1beta1 share the schema).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterImagePolicy {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: ClusterImagePolicySpec,
    /// Written by controllers; never read.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterImagePolicySpec {
    #[serde(default)]
    pub images: Vec<ImagePattern>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorities: Vec<Authority>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub match_: Vec<MatchResource>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePattern {
    #[serde(default)]
    pub glob: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authority {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless: Option<KeylessRef>,
    #[serde(default, rename = "static", skip_serializing_if = "Option::is_none")]
    pub static_: Option<StaticRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctlog: Option<TLog>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attestations: Vec<Attestation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rfc3161timestamp: Option<Rfc3161Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_format: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_algorithm: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretReference {
    #[serde(default)]
    pub name: String,
    /// Accepted for schema compatibility; key Secrets are always read from the controller
    /// namespace, as policy-controller does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeylessRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Identity>,
    #[serde(default, rename = "ca-cert", skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<KeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_root_ref: Option<String>,
    #[serde(
        default,
        rename = "insecureIgnoreSCT",
        skip_serializing_if = "Option::is_none"
    )]
    pub insecure_ignore_sct: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Identity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(
        default,
        rename = "issuerRegExp",
        skip_serializing_if = "Option::is_none"
    )]
    pub issuer_reg_exp: Option<String>,
    #[serde(
        default,
        rename = "subjectRegExp",
        skip_serializing_if = "Option::is_none"
    )]
    pub subject_reg_exp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRef {
    #[serde(default)]
    pub action: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oci: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signature_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_prefix: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalObjectReference {
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TLog {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_root_ref: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rfc3161Timestamp {
    #[serde(default)]
    pub trust_root_ref: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attestation {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub predicate_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemotePolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<ConfigMapReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_config_file: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_spec: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_object_meta: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_type_meta: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemotePolicy {
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub sha256sum: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigMapReference {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default)]
    pub key: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchResource {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A `TrustRoot` (`policy.sigstore.dev/v1alpha1`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustRoot {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: TrustRootSpec,
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustRootSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<TrustRootRemote>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<TrustRootRepository>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigstore_keys: Option<SigstoreKeys>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustRootRemote {
    #[serde(default)]
    pub root: String,
    #[serde(default)]
    pub mirror: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
    /// The trusted root's TUF target name (policy-controller's `trustedRootTarget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_root_target: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustRootRepository {
    #[serde(default)]
    pub root: String,
    #[serde(default, rename = "mirrorFS")]
    pub mirror_fs: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
    /// The trusted root's TUF target name (policy-controller's `trustedRootTarget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_root_target: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigstoreKeys {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificate_authorities: Vec<CertificateAuthority>,
    #[serde(default, rename = "tLogs", skip_serializing_if = "Vec::is_empty")]
    pub t_logs: Vec<TransparencyLogInstance>,
    #[serde(default, rename = "ctLogs", skip_serializing_if = "Vec::is_empty")]
    pub ct_logs: Vec<TransparencyLogInstance>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timestamp_authorities: Vec<CertificateAuthority>,
}

/// A transparency log (Rekor) or CT log instance; `publicKey` is a base64-encoded PEM key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransparencyLogInstance {
    #[serde(default, rename = "baseURL")]
    pub base_url: String,
    #[serde(default)]
    pub hash_algorithm: String,
    #[serde(default)]
    pub public_key: String,
    #[serde(default, rename = "logID", skip_serializing_if = "Option::is_none")]
    pub log_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateAuthority {
    #[serde(default)]
    pub subject: DistinguishedName,
    #[serde(default)]
    pub uri: String,
    /// Base64-encoded PEM chain.
    #[serde(default)]
    pub cert_chain: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_for: Option<ValidityPeriod>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DistinguishedName {
    #[serde(default)]
    pub organization: String,
    #[serde(default)]
    pub common_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidityPeriod {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// Labels of a Namespace, which decide whether it is enforced.
pub type Labels = BTreeMap<String, String>;

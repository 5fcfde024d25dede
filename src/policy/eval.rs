//! Evaluation: pure functions from a snapshot, an image and the signatures fetched for it to a
//! decision. Every covering CIP must pass (AND); within a CIP any authority suffices (OR).

use std::collections::HashMap;

use serde::Serialize;
use serde_json::Map;

use super::object::{add_object_parts, AdmissionObject, Includes};
use super::snapshot::{
    Check, CompiledAuthority, CompiledPolicy, Mode, NoMatchPolicy, SignatureFormat, Snapshot,
};
use crate::image_ref::ImageRef;
use crate::verify::attest::{
    check_attestations, check_bundle_signatures, AttestationPolicy, Signer, DSSE_MEDIA_TYPE,
};
use crate::verify::cosign::{
    check_key, check_keyless, KeyCheck, SignatureLayer, SIMPLE_SIGNING_MEDIA_TYPE,
};

/// The outcome users act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    /// Allowed, with warnings (warn-mode policies failed, or no-match-policy=warn).
    Warn,
    Deny,
    /// Could not decide (registry unreachable, bad input). Enforcing front doors deny.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Warn => "warn",
            Verdict::Deny => "deny",
            Verdict::Error => "error",
        }
    }

    /// Whether the image may be pulled.
    pub fn admits(self) -> bool {
        matches!(self, Verdict::Allow | Verdict::Warn)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorityOutcome {
    pub name: String,
    pub passed: bool,
    /// Why it failed, in policy-controller's message shapes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What satisfied it (signature layer, key fingerprint, log entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyOutcome {
    pub name: String,
    pub mode: Mode,
    pub passed: bool,
    pub authorities: Vec<AuthorityOutcome>,
    /// Problems that make the policy invalid (it then fails).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The policy applies through the image's repository only (a tag-scoped glob, a digest
    /// reference whose tag is unknown): its failure denies, its pass admits nothing by itself
    /// (see [`crate::policy::snapshot::Coverage::by_repository`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub by_repository: bool,
}

/// A complete decision for one image in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The image as requested, normalized.
    pub image: String,
    /// The manifest digest that was verified (when a registry lookup was needed).
    pub digest: Option<String>,
    pub namespace: Option<String>,
    pub enforced: bool,
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub policies: Vec<PolicyOutcome>,
}

impl Decision {
    pub fn new(image: &ImageRef, namespace: Option<&str>, enforced: bool) -> Decision {
        Decision {
            image: image.to_string(),
            digest: image.digest().map(str::to_string),
            namespace: namespace.map(str::to_string),
            enforced,
            verdict: Verdict::Allow,
            reasons: Vec::new(),
            policies: Vec::new(),
        }
    }
}

/// Signatures fetched for one digest, by signature repository name (`registry/repository`).
pub type Signatures = HashMap<String, Vec<SignatureLayer>>;

/// What a CIP-level policy reads besides the authorities' matches (see [`Includes`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyInputs<'a> {
    /// The Kubernetes object the image is decided for, when the front door knows it.
    pub object: Option<&'a AdmissionObject>,
    /// The image's config files by platform, or why they could not be fetched; `None` when
    /// they were not fetched.
    pub config: Option<&'a Result<serde_json::Map<String, serde_json::Value>, String>>,
}

/// The outcome of a policy when it can be decided without any registry access: it is
/// invalid, has a passing static authority, or has only failing static authorities.
pub fn static_outcome(
    p: &CompiledPolicy,
    object: Option<&AdmissionObject>,
) -> Option<PolicyOutcome> {
    let authorities = match &p.authorities {
        Err(problems) => {
            return Some(PolicyOutcome {
                name: p.name.clone(),
                mode: p.mode,
                passed: false,
                authorities: Vec::new(),
                problems: problems.iter().map(ToString::to_string).collect(),
                by_repository: false,
            })
        }
        Ok(a) => a,
    };
    let is_static =
        |a: &CompiledAuthority| matches!(a.check, Check::Static { .. } | Check::Unusable(_));
    let static_pass = authorities
        .iter()
        .any(|a| matches!(a.check, Check::Static { pass: true, .. }));
    // A CIP-level policy sees every authority's matches, so the signed ones must be checked
    // too before it is asked (as policy-controller does).
    let decided = static_pass && p.policy.is_none();
    // The image config comes from the registry: a policy that reads it waits for it.
    let needs_config = static_pass && p.policy.is_some() && p.includes.config;
    if needs_config || (!decided && !authorities.iter().all(is_static)) {
        return None;
    }
    let outcomes: Vec<AuthorityOutcome> = authorities
        .iter()
        .filter(|a| is_static(a))
        .map(static_authority)
        .collect();
    let inputs = PolicyInputs {
        object,
        config: None,
    };
    Some(judge_policy(p, outcomes, &inputs))
}

/// The outcome of `p` once its authorities were checked: passed when one authority passed
/// and the CIP-level policy (if any) accepts the result document.
pub fn judge_policy(
    p: &CompiledPolicy,
    authorities: Vec<AuthorityOutcome>,
    inputs: &PolicyInputs,
) -> PolicyOutcome {
    let passed = authorities.iter().any(|a| a.passed);
    let mut problems = Vec::new();
    if passed {
        if let Some(policy) = &p.policy {
            if let Err(e) = evaluate_cip_policy(policy, p.includes, &authorities, inputs) {
                problems.push(format!("{CIP_POLICY_FAILED}{e}"));
            }
        }
    }
    PolicyOutcome {
        name: p.name.clone(),
        mode: p.mode,
        passed: passed && problems.is_empty(),
        authorities,
        problems,
        by_repository: false,
    }
}

fn static_authority(a: &CompiledAuthority) -> AuthorityOutcome {
    let (passed, reason) = match &a.check {
        Check::Static { pass: true, .. } => (true, None),
        Check::Static {
            pass: false,
            message,
        } => (
            false,
            Some(match message.as_deref().filter(|m| !m.is_empty()) {
                Some(m) => format!("disallowed by static policy: {m}"),
                None => "disallowed by static policy".to_string(),
            }),
        ),
        Check::Unusable(reason) => (
            false,
            Some(format!("authority {} cannot be verified: {reason}", a.name)),
        ),
        Check::Key { .. } | Check::Keyless(_) => (false, None),
    };
    AuthorityOutcome {
        name: a.name.clone(),
        passed,
        reason,
        evidence: None,
    }
}

/// Something attached to an image that authorities check: the repository holding it and
/// where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub repo: ImageRef,
    pub kind: AttachedKind,
    /// An authority reading it names `signaturePullSecrets`: their credentials come first.
    pub pull_secrets: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachedKind {
    /// cosign's tag scheme: the layers of media type `media_type` at `tag`.
    Tag {
        tag: String,
        media_type: &'static str,
    },
    /// Sigstore bundles referring to `digest` (OCI 1.1 referrers).
    Referrers { digest: String },
}

impl Attached {
    /// The key of its layers in [`Signatures`].
    pub fn key(&self) -> String {
        match &self.kind {
            AttachedKind::Tag { tag, .. } => format!("{}:{tag}", self.repo.name()),
            AttachedKind::Referrers { digest } => {
                format!("{}@{digest} referrers", self.repo.name())
            }
        }
    }
}

/// What `a` needs fetched for `digest`: its `.sig` signatures, its `.att` attestations when
/// it names any, or its Sigstore bundles in the bundle format; `None` for authorities that
/// need nothing.
pub fn attached_for(a: &CompiledAuthority, image: &ImageRef, digest: &str) -> Option<Attached> {
    if !matches!(a.check, Check::Key { .. } | Check::Keyless(_)) {
        return None;
    }
    let kind = match a.signature_format {
        SignatureFormat::Bundle => AttachedKind::Referrers {
            digest: digest.to_string(),
        },
        SignatureFormat::Legacy => {
            let (suffix, media_type) = if a.attestations.is_empty() {
                ("sig", SIMPLE_SIGNING_MEDIA_TYPE)
            } else {
                ("att", DSSE_MEDIA_TYPE)
            };
            AttachedKind::Tag {
                tag: crate::registry::attached_tag(&a.tag_prefix, digest, suffix)?,
                media_type,
            }
        }
    };
    Some(Attached {
        repo: a.signature_repo.clone().unwrap_or_else(|| image.clone()),
        kind,
        pull_secrets: !a.signature_pull_secrets.is_empty(),
    })
}

/// The `signaturePullSecrets` named by the authorities of the policies applying to `image`
/// for `object`.
pub fn signature_pull_secret_names(
    snapshot: &Snapshot,
    image: &ImageRef,
    object: Option<&AdmissionObject>,
) -> Vec<String> {
    let mut names: Vec<String> = snapshot
        .coverage(image, object)
        .all()
        .flat_map(|i| snapshot.policies[i].authorities.iter().flatten())
        .flat_map(|a| a.signature_pull_secrets.iter().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Everything the undecided policies need fetched, each once.
pub fn attached_needed(
    policies: &[&CompiledPolicy],
    image: &ImageRef,
    digest: &str,
) -> Vec<Attached> {
    let mut needed: Vec<Attached> = Vec::new();
    for p in policies {
        for a in p.authorities.iter().flatten() {
            if let Some(att) = attached_for(a, image, digest) {
                match needed.iter_mut().find(|n| n.key() == att.key()) {
                    Some(n) => n.pull_secrets |= att.pull_secrets,
                    None => needed.push(att),
                }
            }
        }
    }
    needed
}

/// Evaluates a policy against signatures fetched for `digest` (and, for its CIP-level policy,
/// `inputs`).
pub fn evaluate_policy(
    p: &CompiledPolicy,
    image: &ImageRef,
    digest: &str,
    signatures: &Signatures,
    inputs: &PolicyInputs,
) -> PolicyOutcome {
    if let Some(outcome) = static_outcome(p, inputs.object) {
        return outcome;
    }
    judge_policy(p, check_authorities(p, image, digest, signatures), inputs)
}

/// Checks each authority of `p` against the signatures fetched for `digest`.
pub fn check_authorities(
    p: &CompiledPolicy,
    image: &ImageRef,
    digest: &str,
    signatures: &Signatures,
) -> Vec<AuthorityOutcome> {
    p.authorities
        .iter()
        .flatten()
        .map(|a| {
            let Some(attached) = attached_for(a, image, digest) else {
                return static_authority(a);
            };
            let layers = signatures
                .get(&attached.key())
                .map(Vec::as_slice)
                .unwrap_or_default();
            let now = jiff::Timestamp::now().as_second();
            let checked = match &a.check {
                Check::Key {
                    keys,
                    hash,
                    tlog,
                    timestamp_authorities,
                } if !a.attestations.is_empty() => {
                    let signer = Signer::Keys {
                        keys,
                        hash: *hash,
                        tlog: tlog.as_ref(),
                        timestamp_authorities: timestamp_authorities.as_deref(),
                    };
                    check_attestations(layers, digest, &signer, &a.attestations)
                        .map(|m| serde_json::to_value(m).ok())
                        .map_err(|cause| ("attestation key validation failed", cause))
                }
                Check::Keyless(check) if !a.attestations.is_empty() => {
                    let signer = Signer::Keyless { check, now };
                    check_attestations(layers, digest, &signer, &a.attestations)
                        .map(|m| serde_json::to_value(m).ok())
                        .map_err(|cause| ("attestation keyless validation failed", cause))
                }
                Check::Key {
                    keys,
                    hash,
                    tlog,
                    timestamp_authorities,
                } if a.signature_format == SignatureFormat::Bundle => {
                    let signer = Signer::Keys {
                        keys,
                        hash: *hash,
                        tlog: tlog.as_ref(),
                        timestamp_authorities: timestamp_authorities.as_deref(),
                    };
                    check_bundle_signatures(layers, digest, &signer)
                        .map(|m| serde_json::to_value(m).ok())
                        .map_err(|cause| ("signature key validation failed", cause))
                }
                Check::Keyless(check) if a.signature_format == SignatureFormat::Bundle => {
                    let signer = Signer::Keyless { check, now };
                    check_bundle_signatures(layers, digest, &signer)
                        .map(|m| serde_json::to_value(m).ok())
                        .map_err(|cause| ("signature keyless validation failed", cause))
                }
                Check::Key {
                    keys,
                    hash,
                    tlog,
                    timestamp_authorities,
                } => {
                    let check = KeyCheck {
                        keys,
                        hash: *hash,
                        tlog: tlog.as_ref(),
                        timestamp_authorities: timestamp_authorities.as_deref(),
                    };
                    check_key(layers, digest, &check)
                        .map(|m| serde_json::to_value(m).ok())
                        .map_err(|cause| ("signature key validation failed", cause))
                }
                Check::Keyless(check) => check_keyless(layers, digest, check, now)
                    .map(|m| serde_json::to_value(m).ok())
                    .map_err(|cause| ("signature keyless validation failed", cause)),
                _ => return static_authority(a),
            };
            match checked {
                Ok(evidence) => AuthorityOutcome {
                    name: a.name.clone(),
                    passed: true,
                    reason: None,
                    evidence,
                },
                Err((what, cause)) => AuthorityOutcome {
                    name: a.name.clone(),
                    passed: false,
                    reason: Some(format!(
                        "{what} for authority {} for {}@{digest}: {cause}",
                        a.name,
                        image.name()
                    )),
                    evidence: None,
                },
            }
        })
        .collect()
}

/// The document policy-controller evaluates a CIP-level policy on: per passing authority, the
/// signatures and attestations that satisfied it (`authorityMatches`), plus what the policy
/// asks for with `includes`: the image's `config` files and the admission object's `spec`,
/// `metadata` and `typemeta`. `Err`: something asked for is not known here (the policy then
/// fails with that reason; it is never evaluated without it).
pub fn policy_document(
    authorities: &[AuthorityOutcome],
    includes: Includes,
    inputs: &PolicyInputs,
) -> Result<serde_json::Value, String> {
    use serde_json::{json, Value};
    let mut matches = Map::new();
    for a in authorities.iter().filter(|a| a.passed) {
        let evidence = a.evidence.clone().unwrap_or(Value::Null);
        // As policy-controller writes it: empty lists are left out, a static pass is marked.
        let mut entry = Map::new();
        match &evidence {
            // Attestation matches: a list of {name, predicate_type, layer_digest, …}.
            Value::Array(list) => {
                let mut by_name = Map::new();
                for m in list {
                    let name = m["name"].as_str().unwrap_or_default().to_string();
                    let mut item =
                        json!({"id": m["layer_digest"], "predicateType": m["predicate_type"]});
                    for field in ["subject", "issuer"] {
                        if let Some(v) = m.get(field).filter(|v| !v.is_null()) {
                            item[field] = v.clone();
                        }
                    }
                    if let Value::Array(items) = by_name.entry(name).or_insert_with(|| json!([])) {
                        items.push(item);
                    }
                }
                if !by_name.is_empty() {
                    entry.insert("attestations".into(), Value::Object(by_name));
                }
            }
            Value::Object(m) => {
                let mut sig = json!({"id": m.get("layer_digest").cloned().unwrap_or(Value::Null)});
                for field in ["subject", "issuer"] {
                    if let Some(v) = m.get(field) {
                        sig[field] = v.clone();
                    }
                }
                entry.insert("signatures".into(), json!([sig]));
            }
            _ => {
                entry.insert("static".into(), Value::Bool(true));
            }
        }
        let entry = Value::Object(entry);
        matches.insert(a.name.clone(), entry);
    }
    let mut document = Map::new();
    document.insert("authorityMatches".into(), Value::Object(matches));
    if includes.config {
        match inputs.config {
            Some(Ok(configs)) => {
                document.insert("config".into(), Value::Object(configs.clone()));
            }
            Some(Err(e)) => return Err(format!("fetchConfigFile: {e}")),
            None => return Err("fetchConfigFile: the image config was not fetched".into()),
        }
    }
    add_object_parts(&mut document, includes, inputs.object)?;
    Ok(Value::Object(document))
}

fn evaluate_cip_policy(
    policy: &AttestationPolicy,
    includes: Includes,
    authorities: &[AuthorityOutcome],
    inputs: &PolicyInputs,
) -> Result<(), String> {
    match policy {
        AttestationPolicy::Unsupported(reason) => Err(reason.clone()),
        AttestationPolicy::Rego(rego) => {
            rego.evaluate(&policy_document(authorities, includes, inputs)?)
        }
    }
}

/// What a verdict for `image` depends on in the object it was decided for, keyed for the
/// verdict cache: the parts CIP-level policies read, and, when some CIP has `spec.match`,
/// which policies applied. A verdict holds only for objects alike in both. Empty when the
/// verdict depends on no part of the object.
pub fn object_cache_key(
    snapshot: &Snapshot,
    image: &ImageRef,
    object: Option<&AdmissionObject>,
) -> String {
    let coverage = snapshot.coverage(image, object);
    let wanted = coverage
        .all()
        .map(|i| &snapshot.policies[i])
        .filter(|p| p.policy.is_some())
        .fold(Includes::default(), |acc, p| acc.union(p.includes));
    let parts = match object {
        _ if !wanted.object() => String::new(),
        Some(o) => o.cache_key(wanted),
        None => "no object".to_string(),
    };
    if !snapshot.has_match_rules() {
        return parts;
    }
    let applied = |set: &[usize]| {
        set.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "{parts};applied={};by-repository={}",
        applied(&coverage.covering),
        applied(&coverage.by_repository)
    )
}

/// How a failing CIP-level `spec.policy` is reported (in [`PolicyOutcome::problems`]).
pub const CIP_POLICY_FAILED: &str = "failed evaluating cip level policy: ";

/// The reason line for a failed policy, in policy-controller's shape:
/// `failed policy: <cip>: <path> <image> <authority errors>`.
pub fn failure_reason(outcome: &PolicyOutcome, path: &str, image: &str) -> String {
    let mut causes: Vec<String> = outcome
        .problems
        .iter()
        .map(|p| match p.starts_with(CIP_POLICY_FAILED) {
            true => p.clone(),
            false => format!("policy is invalid: {p}"),
        })
        .collect();
    causes.extend(outcome.authorities.iter().filter_map(|a| a.reason.clone()));
    format!(
        "failed policy: {}: {path} {image} {}",
        outcome.name,
        causes.join("; ")
    )
}

/// Sets the verdict and reasons of `decision` from its policy outcomes: every failed
/// enforce-mode policy denies; with no covering policy (outcomes marked
/// [`PolicyOutcome::by_repository`] do not cover), `no_match` decides what is left.
pub fn conclude(decision: &mut Decision, no_match: NoMatchPolicy) {
    let image = match &decision.digest {
        Some(d) if !decision.image.contains('@') => format!("{}@{d}", decision.image),
        _ => decision.image.clone(),
    };
    let covering = decision.policies.iter().any(|p| !p.by_repository);
    let failed = |mode: Mode| -> Vec<String> {
        decision
            .policies
            .iter()
            .filter(|p| !p.passed && p.mode == mode)
            .map(|p| failure_reason(p, "image", &image))
            .collect()
    };
    let denials = failed(Mode::Enforce);
    let warnings = failed(Mode::Warn);
    if !covering && denials.is_empty() {
        decision.verdict = match no_match {
            NoMatchPolicy::Deny => Verdict::Deny,
            NoMatchPolicy::Warn => Verdict::Warn,
            NoMatchPolicy::Allow if warnings.is_empty() => Verdict::Allow,
            NoMatchPolicy::Allow => Verdict::Warn,
        };
        if no_match != NoMatchPolicy::Allow {
            decision
                .reasons
                .push(format!("no matching policies: image {image}"));
        }
        decision.reasons.extend(warnings);
        return;
    }
    decision.verdict = if !denials.is_empty() {
        Verdict::Deny
    } else if !warnings.is_empty() {
        Verdict::Warn
    } else {
        Verdict::Allow
    };
    decision.reasons = denials;
    decision.reasons.extend(warnings);
}

/// Result of the registry-free part of a decision.
pub enum Offline {
    /// Decided from policy alone.
    Decided(Decision),
    /// `undecided` policies (indices into the snapshot, and whether each applies by
    /// repository only) need the image's signatures; `partial` holds the outcomes of the
    /// others.
    NeedsSignatures {
        partial: Decision,
        undecided: Vec<(usize, bool)>,
    },
}

/// Decides without the registry when possible. `object`: the Kubernetes object the image is
/// decided for, when known (CIP-level policies may read parts of it). Coverage is computed on
/// `image` as given: callers pass the reference as it will be fetched (see
/// [`Snapshot::coverage`]).
pub fn decide_offline(
    snapshot: &Snapshot,
    image: &ImageRef,
    namespace: Option<&str>,
    object: Option<&AdmissionObject>,
) -> Offline {
    decide_offline_enforced(
        snapshot,
        image,
        namespace,
        snapshot.is_enforced(namespace),
        object,
    )
}

/// [`decide_offline`] with enforcement decided by the caller.
pub fn decide_offline_enforced(
    snapshot: &Snapshot,
    image: &ImageRef,
    namespace: Option<&str>,
    enforced: bool,
    object: Option<&AdmissionObject>,
) -> Offline {
    let mut decision = Decision::new(image, namespace, enforced);
    if !enforced {
        decision.reasons.push(format!(
            "namespace {} is not enforced",
            namespace.unwrap_or_default()
        ));
        return Offline::Decided(decision);
    }
    let coverage = snapshot.coverage(image, object);
    let mut undecided = Vec::new();
    for i in coverage.all() {
        match static_outcome(&snapshot.policies[i], object) {
            Some(mut outcome) => {
                outcome.by_repository = coverage.by_repository.contains(&i);
                decision.policies.push(outcome);
            }
            None => undecided.push(i),
        }
    }
    // A statically failing enforce-mode policy denies whatever the signatures say.
    let static_denial = decision
        .policies
        .iter()
        .any(|p| !p.passed && p.mode == Mode::Enforce);
    if undecided.is_empty() || static_denial {
        conclude(&mut decision, snapshot.config.no_match_policy);
        return Offline::Decided(decision);
    }
    Offline::NeedsSignatures {
        partial: decision,
        undecided: undecided
            .into_iter()
            .map(|i| (i, coverage.by_repository.contains(&i)))
            .collect(),
    }
}

//! The in-memory policy snapshot every decision reads: CIPs compiled (globs into one index,
//! keys parsed, Secrets and TrustRoots resolved), namespace labels and controller config.
//! Built whole from [`Objects`] and swapped whole; nothing in it does I/O.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::Secret;
use serde::Serialize;
use sha2::Digest as _;

use super::glob::GlobIndex;
use super::load::Objects;
use super::matching;
use super::object::{AdmissionObject, Includes};
use super::rego::RegoPolicy;
use super::remote::{RemoteKey, RemoteTexts};
use super::types::{Authority, ClusterImagePolicy, Labels, TrustRoot};
use super::validate::{validate_cip, validate_trust_root, Problem, Rules};
use crate::image_ref::ImageRef;
use crate::verify::attest::{predicate_type_uri, AttestationCheck, AttestationPolicy};
use crate::verify::keyless::KeylessCheck;
use crate::verify::keys::{parse_pem_keys, HashAlgorithm, PublicKey};
use crate::verify::rekor::{decode_log_key, LogKeys, PUBLIC_GOOD_REKOR_URL};
use crate::verify::trust_root::CertificateAuthority;
use crate::verify::tuf::TufTrust;

/// Namespace label that opts a namespace into enforcement.
pub const INCLUDE_LABEL: &str = "policy.sigstore.dev/include";
/// Namespace label that opts a namespace out in opt-out mode.
pub const EXCLUDE_LABEL: &str = "policy.sigstore.dev/exclude";
/// The policy-controller ConfigMap name.
pub const CONFIG_MAP_NAME: &str = "config-policy-controller";

/// Which namespaces are enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// Only namespaces labelled `policy.sigstore.dev/include=true` (policy-controller's default).
    #[default]
    IncludeLabel,
    /// Every namespace not labelled `policy.sigstore.dev/exclude=true`.
    OptOut,
}

/// pullgate's own enforcement settings (flags, not cluster objects).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    pub scope: Scope,
    /// Never enforced, whatever their labels (default: `kube-system`).
    pub exempt_namespaces: BTreeSet<String>,
    /// Where key Secrets and the config ConfigMap live (default: `cosign-system`).
    pub controller_namespace: String,
    /// Enforce namespaces the snapshot does not know (include-label scope). Set where the
    /// snapshot's namespaces are the API server's list: a pod's namespace exists, so one the
    /// snapshot does not know only means the snapshot lags, and a lagging view must not
    /// open a hole. A policy directory lists only the namespaces its files declare.
    pub enforce_unknown_namespaces: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            scope: Scope::IncludeLabel,
            exempt_namespaces: BTreeSet::from(["kube-system".to_string()]),
            controller_namespace: "cosign-system".to_string(),
            enforce_unknown_namespaces: false,
        }
    }
}

/// `no-match-policy` of the `config-policy-controller` ConfigMap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoMatchPolicy {
    #[default]
    Deny,
    Warn,
    Allow,
}

/// Settings read from the `config-policy-controller` ConfigMap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ControllerConfig {
    pub no_match_policy: NoMatchPolicy,
    pub fail_on_empty_authorities: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            no_match_policy: NoMatchPolicy::Deny,
            fail_on_empty_authorities: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Warn,
}

/// What an authority checks, resolved against Secrets and TrustRoots.
#[derive(Debug, Clone)]
pub enum Check {
    Static {
        pass: bool,
        message: Option<String>,
    },
    Key {
        keys: Vec<PublicKey>,
        hash: HashAlgorithm,
        /// Set when the authority has `ctlog`: a Rekor bundle signed by one of these logs.
        tlog: Option<LogKeys>,
        /// Set when the authority has `rfc3161timestamp`: a timestamp from one of these.
        timestamp_authorities: Option<Vec<CertificateAuthority>>,
    },
    /// A keyless authority: certificate chain, SCT, identity, then the signature.
    Keyless(Box<KeylessCheck>),
    /// The authority cannot be checked (missing Secret, feature not built, …): it fails with
    /// this reason. Failing closed is the point: it never passes.
    Unusable(String),
}

#[derive(Debug, Clone)]
pub struct CompiledAuthority {
    pub name: String,
    pub check: Check,
    /// Repository holding the signatures (`source.oci`), when not the image's own.
    pub signature_repo: Option<ImageRef>,
    /// `source.tagPrefix`: prepended to cosign's `sha256-<hex>.sig|.att` tags.
    pub tag_prefix: String,
    /// Non-empty: the authority is satisfied by these attestations, not by signatures.
    pub attestations: Vec<AttestationCheck>,
    /// `signatureFormat`: where and how this authority's signatures are stored.
    pub signature_format: SignatureFormat,
    /// `source.signaturePullSecrets`: Secrets of the workload's namespace whose registry
    /// credentials fetch this authority's signatures (read where a workload namespace's
    /// Secrets can be read: the admission shim in cluster mode).
    pub signature_pull_secrets: Vec<String>,
}

/// How an authority's signatures and attestations are stored (`signatureFormat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SignatureFormat {
    /// cosign's tags, `sha256-<hex>.sig` and `.att` (`legacy`, the default).
    #[default]
    Legacy,
    /// Sigstore bundles attached as OCI 1.1 referrers, as cosign v3 writes them (`bundle`).
    Bundle,
}

impl SignatureFormat {
    fn parse(value: Option<&str>) -> Result<SignatureFormat, String> {
        match value.unwrap_or_default() {
            "" | "legacy" => Ok(SignatureFormat::Legacy),
            "bundle" => Ok(SignatureFormat::Bundle),
            other => Err(format!(
                "signatureFormat {other:?} is not known: use legacy or bundle"
            )),
        }
    }
}

/// A CIP ready for evaluation. `authorities` is `Err` when the CIP is invalid: every image it
/// covers is denied with those problems (policy-controller drops such CIPs; that can allow).
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: String,
    pub origin: String,
    pub mode: Mode,
    pub globs: Vec<String>,
    pub authorities: Result<Vec<CompiledAuthority>, Vec<Problem>>,
    /// `spec.policy`: evaluated over the authorities' matches once one authority passed.
    pub policy: Option<AttestationPolicy>,
    /// What `spec.policy` reads besides the matches (image config, admission object parts).
    pub includes: Includes,
    /// `spec.match`: the objects the CIP applies to (empty: every object).
    pub match_: Vec<super::types::MatchResource>,
}

/// A problem found while building a snapshot, for `pullgate validate` and reload reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotProblem {
    pub origin: String,
    pub object: String,
    pub problem: Problem,
}

impl std::fmt::Display for SnapshotProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.object, self.problem)
    }
}

/// Everything a decision needs, immutable once built.
pub struct Snapshot {
    pub policies: Vec<CompiledPolicy>,
    index: GlobIndex,
    /// Policies whose globs do not compile: they cover every image (fail closed).
    cover_all: Vec<usize>,
    /// The repository part of every tag-scoped glob (`ghcr.io/o/app` of `ghcr.io/o/app:v*`),
    /// for references whose tag is unknown (see [`Coverage::by_repository`]).
    tag_scoped: GlobIndex,
    /// Whether any glob names a digest (`…@sha256:*`): then a tag must be resolved before
    /// coverage is known, even when the policies covering its tag need no registry.
    digest_globs: bool,
    /// Whether some CIP has `spec.match` (see [`Snapshot::has_match_rules`]).
    match_rules: bool,
    namespaces: HashMap<String, Labels>,
    pub config: ControllerConfig,
    pub settings: Settings,
    pub problems: Vec<SnapshotProblem>,
    fingerprint: String,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("policies", &self.policies.len())
            .field("namespaces", &self.namespaces.len())
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

impl Snapshot {
    /// Compiles `objects`. Invalid CIPs are kept (as deny-everything-they-cover) and reported
    /// in [`Snapshot::problems`]. `remote` policy sources are not fetched here: a policy naming
    /// one fails closed as not fetched (see [`Snapshot::build_with_remote`]).
    pub fn build(objects: &Objects, settings: Settings) -> Snapshot {
        Snapshot::build_with_remote(objects, settings, &RemoteTexts::default())
    }

    /// [`Snapshot::build`] with the texts of `remote` policy sources fetched beforehand (see
    /// [`super::remote::RemoteFetcher::resolve`]). A source missing from `remote`, or whose
    /// fetch failed, makes only the CIP or authority naming it fail closed with the reason.
    pub fn build_with_remote(
        objects: &Objects,
        settings: Settings,
        remote: &RemoteTexts,
    ) -> Snapshot {
        let mut problems = Vec::new();
        let config = controller_config(objects, &settings, &mut problems);
        let secrets: HashMap<&str, &Secret> = objects
            .secrets
            .iter()
            .filter(|s| {
                s.metadata
                    .namespace
                    .as_deref()
                    .unwrap_or(&settings.controller_namespace)
                    == settings.controller_namespace
            })
            .filter_map(|s| Some((s.metadata.name.as_deref()?, s)))
            .collect();
        let mut trust_roots: HashMap<&str, &TrustRoot> = HashMap::new();
        for tr in &objects.trust_roots {
            let name = tr.object.metadata.name.as_deref().unwrap_or_default();
            for problem in validate_trust_root(&tr.object) {
                problems.push(SnapshotProblem {
                    origin: tr.origin.clone(),
                    object: format!("TrustRoot {name}"),
                    problem,
                });
            }
            trust_roots.insert(name, &tr.object);
        }
        let tuf = super::tuf_source::resolve(&trust_roots, &objects.tuf_remote);
        let resolver = Resolver {
            secrets,
            trust_roots,
            tuf,
            config_maps: objects
                .config_maps
                .iter()
                .filter_map(|c| {
                    let ns = c
                        .metadata
                        .namespace
                        .as_deref()
                        .unwrap_or(&settings.controller_namespace);
                    Some(((ns, c.metadata.name.as_deref()?), c))
                })
                .collect(),
            controller_namespace: &settings.controller_namespace,
            remote,
        };

        let mut cips: Vec<_> = objects.cips.iter().collect();
        cips.sort_by(|a, b| a.object.metadata.name.cmp(&b.object.metadata.name));
        let mut policies = Vec::with_capacity(cips.len());
        let mut hasher = sha2::Sha256::new();
        for cip in cips {
            let compiled = compile(&cip.object, &cip.origin, &config, &resolver);
            if let Err(found) = &compiled.authorities {
                for problem in found {
                    problems.push(SnapshotProblem {
                        origin: cip.origin.clone(),
                        object: format!("ClusterImagePolicy {}", compiled.name),
                        problem: problem.clone(),
                    });
                }
            }
            hash_policy(&mut hasher, &cip.object, &compiled);
            policies.push(compiled);
        }
        hasher.update(format!("{config:?}{settings:?}").as_bytes());

        let mut cover_all = Vec::new();
        let mut entries = Vec::new();
        let mut repository_entries = Vec::new();
        for (i, p) in policies.iter().enumerate() {
            if p.globs
                .iter()
                .any(|g| super::glob::validate_glob(g).is_err())
            {
                cover_all.push(i);
            } else {
                entries.extend(p.globs.iter().map(|g| (g.as_str(), i)));
                repository_entries.extend(
                    p.globs
                        .iter()
                        .filter_map(|g| tag_scoped_repository(g))
                        .map(|r| (r, i)),
                );
            }
        }
        let digest_globs = policies
            .iter()
            .any(|p| p.globs.iter().any(|g| g.contains('@')));
        let match_rules = policies.iter().any(|p| !p.match_.is_empty());
        // Prefixes of valid globs are valid globs.
        let tag_scoped = GlobIndex::new(repository_entries).unwrap_or_default();
        // Every glob was validated above, so building the index cannot fail; should it ever,
        // covering everything keeps the snapshot closed rather than open.
        let index = match GlobIndex::new(entries) {
            Ok(index) => index,
            Err(_) => {
                cover_all = (0..policies.len()).collect();
                GlobIndex::new(std::iter::empty()).unwrap_or_else(|_| unreachable!())
            }
        };

        let namespaces = objects
            .namespaces
            .iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                Some((name, ns.metadata.labels.clone().unwrap_or_default()))
            })
            .collect();

        Snapshot {
            policies,
            index,
            cover_all,
            tag_scoped,
            digest_globs,
            match_rules,
            namespaces,
            config,
            settings,
            problems,
            fingerprint: hex::encode(hasher.finalize()),
        }
    }

    /// A snapshot for when no policy set could be loaded at all (e.g. a broken policy
    /// directory at start-up): every namespace but the exempt ones is enforced and every image
    /// is denied with `reason`. Exempt namespaces keep pulling, so the node stays manageable.
    pub fn unusable(settings: Settings, reason: &str) -> Snapshot {
        let policy = CompiledPolicy {
            name: "pullgate-policies-unavailable".to_string(),
            origin: String::new(),
            mode: Mode::Enforce,
            globs: vec!["**".to_string()],
            authorities: Err(vec![Problem {
                path: "policies".to_string(),
                message: reason.to_string(),
            }]),
            policy: None,
            includes: Includes::default(),
            match_: Vec::new(),
        };
        let settings = Settings {
            scope: Scope::OptOut,
            ..settings
        };
        let fingerprint = hex::encode(sha2::Sha256::digest(format!("unusable:{reason}")));
        Snapshot {
            policies: vec![policy],
            index: GlobIndex::default(),
            cover_all: vec![0],
            tag_scoped: GlobIndex::default(),
            digest_globs: false,
            match_rules: false,
            namespaces: HashMap::new(),
            config: ControllerConfig::default(),
            settings,
            problems: Vec::new(),
            fingerprint,
        }
    }

    /// SHA-256 over everything that can change a verdict: CIPs, resolved keys, config and
    /// settings. Verdict caches key on it, so a changed policy or rotated key invalidates.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether decisions in `namespace` are enforced. `None` (no namespace known, as for the
    /// CLI without `--namespace`) is enforced.
    pub fn is_enforced(&self, namespace: Option<&str>) -> bool {
        let Some(ns) = namespace else { return true };
        if self.is_exempt(ns) {
            return false;
        }
        let Some(labels) = self.namespaces.get(ns) else {
            return match self.settings.scope {
                Scope::IncludeLabel => self.settings.enforce_unknown_namespaces,
                Scope::OptOut => true,
            };
        };
        let label = |key: &str| labels.get(key).is_some_and(|v| v == "true");
        match self.settings.scope {
            Scope::IncludeLabel => label(INCLUDE_LABEL),
            Scope::OptOut => !label(EXCLUDE_LABEL),
        }
    }

    /// Whether `namespace` is never enforced, whatever its labels.
    pub fn is_exempt(&self, namespace: &str) -> bool {
        self.settings.exempt_namespaces.contains(namespace)
    }

    /// Whether some CIP has `spec.match`: then which policies apply depends on the object.
    pub fn has_match_rules(&self) -> bool {
        self.match_rules
    }

    /// Whether some glob names a digest, so that a tag must be resolved before the policies
    /// covering it are known.
    pub fn has_digest_globs(&self) -> bool {
        self.digest_globs
    }

    /// Indices of the policies covering `image`: a glob matches its tag form or digest form.
    /// Callers pass the reference as it will be fetched: pinned to its digest, and with a tag
    /// only when that tag is known to name that digest (see [`Snapshot::coverage`]).
    pub fn applicable(&self, image: &ImageRef) -> Vec<usize> {
        let tag_form = image.tag_form();
        let digest_form = image.digest_form();
        let forms: Vec<&str> = [tag_form.as_deref(), digest_form.as_deref()]
            .into_iter()
            .flatten()
            .collect();
        let mut found = self.index.matching(&forms);
        if !self.cover_all.is_empty() {
            found.extend(&self.cover_all);
            found.sort_unstable();
            found.dedup();
        }
        found
    }

    /// The policies that apply to `image` for `object`: those covering it
    /// ([`Snapshot::applicable`]) and, for a digest reference without a tag, those that cover
    /// some tag of its repository; of these, the ones whose `spec.match` takes in `object`
    /// (see [`super::matching`]).
    pub fn coverage(&self, image: &ImageRef, object: Option<&AdmissionObject>) -> Coverage {
        let matched = |i: &usize| matching::applies(&self.policies[*i].match_, object);
        let mut covering = self.applicable(image);
        covering.retain(matched);
        let by_repository = match (image.tag(), image.digest()) {
            (None, Some(_)) => self
                .tag_scoped
                .matching(&[image.name().as_str()])
                .into_iter()
                .filter(|i| !covering.contains(i) && matched(i))
                .collect(),
            _ => Vec::new(),
        };
        Coverage {
            covering,
            by_repository,
        }
    }
}

/// Which policies apply to an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Policies with a glob matching the image's tag form or digest form.
    pub covering: Vec<usize>,
    /// Policies with a tag-scoped glob (`ghcr.io/o/app:release-*`) on the image's repository,
    /// for a digest reference whose tag is unknown. Which tag names the digest cannot be known,
    /// so such a policy is applied as a requirement (its failure denies) but never admits on
    /// its own: it does not count as covering for `no-match-policy`.
    pub by_repository: Vec<usize>,
}

impl Coverage {
    /// Every applying policy, covering ones first.
    pub fn all(&self) -> impl Iterator<Item = usize> + '_ {
        self.covering.iter().chain(&self.by_repository).copied()
    }
}

/// The repository part of a tag-scoped glob: the text before the `:` that follows its last
/// `/` (`ghcr.io/o/app` of `ghcr.io/o/app:release-*`). `None` for globs that name a digest,
/// have no tag part, or whose repository part would mean something else on its own (`*`, `*/*`
/// are Docker Hub shorthands).
fn tag_scoped_repository(glob: &str) -> Option<&str> {
    if glob.contains('@') {
        return None;
    }
    let last = glob.rfind('/')?;
    let colon = last + glob.get(last..)?.find(':')?;
    let repository = glob.get(..colon)?;
    (!matches!(repository, "*" | "*/*") && !repository.is_empty()).then_some(repository)
}

struct Resolver<'a> {
    secrets: HashMap<&'a str, &'a Secret>,
    /// By (namespace, name): policy sources (`configMapRef`).
    config_maps: HashMap<(&'a str, &'a str), &'a k8s_openapi::api::core::v1::ConfigMap>,
    trust_roots: HashMap<&'a str, &'a TrustRoot>,
    /// What TUF TrustRoots (`repository`, `remote`) yielded, by TrustRoot name.
    tuf: HashMap<&'a str, Result<TufTrust, String>>,
    controller_namespace: &'a str,
    /// Texts of `remote` policy sources, fetched before the build.
    remote: &'a RemoteTexts,
}

fn controller_config(
    objects: &Objects,
    settings: &Settings,
    problems: &mut Vec<SnapshotProblem>,
) -> ControllerConfig {
    let mut config = ControllerConfig::default();
    let Some(cm) = objects.config_maps.iter().find(|cm| {
        cm.metadata.name.as_deref() == Some(CONFIG_MAP_NAME)
            && cm
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(&settings.controller_namespace)
                == settings.controller_namespace
    }) else {
        return config;
    };
    let data = cm.data.clone().unwrap_or_default();
    if let Some(v) = data.get("no-match-policy") {
        // Unknown values mean deny, as in policy-controller; say so rather than guess silently.
        config.no_match_policy = match v.as_str() {
            "allow" => NoMatchPolicy::Allow,
            "warn" => NoMatchPolicy::Warn,
            "deny" => NoMatchPolicy::Deny,
            other => {
                problems.push(SnapshotProblem {
                    origin: "ConfigMap".into(),
                    object: format!("ConfigMap {CONFIG_MAP_NAME}"),
                    problem: Problem {
                        path: "data.no-match-policy".into(),
                        message: format!("unknown value {other:?}; using deny"),
                    },
                });
                NoMatchPolicy::Deny
            }
        };
    }
    if let Some(v) = data.get("fail-on-empty-authorities") {
        config.fail_on_empty_authorities = v != "false";
    }
    config
}

fn compile(
    cip: &ClusterImagePolicy,
    origin: &str,
    config: &ControllerConfig,
    resolver: &Resolver,
) -> CompiledPolicy {
    let name = cip.metadata.name.clone().unwrap_or_default();
    let mode = match cip.spec.mode.as_deref() {
        Some("warn") => Mode::Warn,
        _ => Mode::Enforce,
    };
    let globs = cip.spec.images.iter().map(|i| i.glob.clone()).collect();
    let mut problems = validate_cip(
        cip,
        Rules {
            fail_on_empty_authorities: config.fail_on_empty_authorities,
            controller_namespace: resolver.controller_namespace,
        },
    );
    if cip.spec.authorities.is_empty() && problems.is_empty() {
        // Allowed only with fail-on-empty-authorities=false; still never a silent pass.
        problems.push(Problem {
            path: "spec.authorities".into(),
            message: "no authorities: nothing can verify images covered by this policy".into(),
        });
    }
    let authorities = if problems.is_empty() {
        Ok(cip
            .spec
            .authorities
            .iter()
            .enumerate()
            .map(|(i, a)| compile_authority(a, i, cip, resolver))
            .collect())
    } else {
        Err(problems)
    };
    let policy = cip
        .spec
        .policy
        .as_ref()
        .map(|p| cip_policy(p, &name, resolver));
    let includes = cip
        .spec
        .policy
        .as_ref()
        .map(Includes::of)
        .unwrap_or_default();
    CompiledPolicy {
        name,
        origin: origin.to_string(),
        mode,
        globs,
        authorities,
        policy,
        includes,
        match_: cip.spec.match_.clone(),
    }
}

/// A CIP-level `spec.policy`. What cannot be evaluated (cue, a policy that does not parse or
/// cannot be found) becomes a reason that fails the CIP.
fn cip_policy(p: &super::types::Policy, cip: &str, resolver: &Resolver) -> AttestationPolicy {
    let unsupported = |why: String| AttestationPolicy::Unsupported(why);
    match p.type_.as_str() {
        "cue" => unsupported(format!(
            "cue policies are not supported by this version of pullgate (ClusterImagePolicy {cip}, spec.policy); use type: rego"
        )),
        "rego" => match policy_source(p, resolver).and_then(|s| RegoPolicy::compile(&s)) {
            Ok(policy) => AttestationPolicy::Rego(std::sync::Arc::new(policy)),
            Err(e) => unsupported(format!("spec.policy: {e}")),
        },
        other => unsupported(format!("spec.policy: unknown policy type {other:?}")),
    }
}

fn compile_authority(
    a: &Authority,
    index: usize,
    cip: &ClusterImagePolicy,
    resolver: &Resolver,
) -> CompiledAuthority {
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("authority-{index}"));
    let signature_repo = a
        .source
        .first()
        .and_then(|s| s.oci.as_deref())
        .and_then(|oci| ImageRef::parse(oci).ok());
    let attestations = a
        .attestations
        .iter()
        .map(|at| compile_attestation(at, cip, &name, resolver))
        .collect::<Result<Vec<_>, String>>();
    let signature_format = SignatureFormat::parse(a.signature_format.as_deref());
    let unusable = unsupported(a, cip).or_else(|| signature_format.clone().err());
    let (check, attestations) = match (unusable, attestations) {
        (Some(reason), _) | (None, Err(reason)) => (Check::Unusable(reason), Vec::new()),
        (None, Ok(attestations)) => (
            resolve_check(a, resolver).unwrap_or_else(Check::Unusable),
            attestations,
        ),
    };
    CompiledAuthority {
        name,
        check,
        signature_repo,
        tag_prefix: a
            .source
            .first()
            .and_then(|s| s.tag_prefix.clone())
            .unwrap_or_default(),
        signature_format: signature_format.unwrap_or_default(),
        signature_pull_secrets: a
            .source
            .iter()
            .flat_map(|s| &s.signature_pull_secrets)
            .map(|r| r.name.clone())
            .filter(|n| !n.is_empty())
            .collect(),
        attestations,
    }
}

/// An `attestations[]` entry: the predicate type resolved, the policy compiled (a rego policy
/// that does not parse makes the authority unusable; cue is refused with a reason at
/// evaluation, naming where it is).
fn compile_attestation(
    at: &super::types::Attestation,
    cip: &ClusterImagePolicy,
    authority: &str,
    resolver: &Resolver,
) -> Result<AttestationCheck, String> {
    let cip_name = cip.metadata.name.as_deref().unwrap_or_default();
    let policy = match &at.policy {
        None => None,
        Some(p) => match p.type_.as_str() {
            "rego" => {
                let source = policy_source(p, resolver)
                    .map_err(|e| format!("attestation {:?} policy: {e}", at.name))?;
                Some(AttestationPolicy::Rego(std::sync::Arc::new(
                    RegoPolicy::compile(&source)
                        .map_err(|e| format!("attestation {:?} rego policy: {e}", at.name))?,
                )))
            }
            "cue" => Some(AttestationPolicy::Unsupported(format!(
                "cue policies are not supported by this version of pullgate (ClusterImagePolicy {cip_name}, authority {authority}, attestation {}); use type: rego",
                at.name
            ))),
            other => return Err(format!("attestation {:?}: unknown policy type {other:?}", at.name)),
        },
    };
    Ok(AttestationCheck {
        name: at.name.clone(),
        predicate_type: predicate_type_uri(&at.predicate_type).to_string(),
        policy,
    })
}

/// The text of a policy: `data`, a key of a ConfigMap (`configMapRef`), or the fetched text
/// of a `remote` source (fetched before the build; see [`super::remote`]).
fn policy_source(p: &super::types::Policy, resolver: &Resolver) -> Result<String, String> {
    if let Some(data) = &p.data {
        return Ok(data.clone());
    }
    if let Some(r) = &p.config_map_ref {
        let ns = r
            .namespace
            .as_deref()
            .unwrap_or(resolver.controller_namespace);
        let cm = resolver
            .config_maps
            .get(&(ns, r.name.as_str()))
            .ok_or_else(|| format!("ConfigMap {ns}/{} not found", r.name))?;
        return cm
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .cloned()
            .ok_or_else(|| format!("ConfigMap {ns}/{} has no key {:?}", r.name, r.key));
    }
    if let Some(r) = &p.remote {
        return resolver
            .remote
            .get(&RemoteKey::new(&r.url, &r.sha256sum))
            .map(|text| text.to_string());
    }
    Err("policy has no data, configMapRef or remote".into())
}

/// Features a CIP may use that this build does not verify. They fail closed with a reason.
fn unsupported(a: &Authority, _cip: &ClusterImagePolicy) -> Option<String> {
    let not_built = |what: &str| {
        Some(format!(
            "{what} is not supported by this version of pullgate"
        ))
    };
    if let Some(key) = &a.key {
        if let Some(kms) = &key.kms {
            return not_built(&format!("a KMS key ({kms})"));
        }
    }
    None
}

fn resolve_check(a: &Authority, resolver: &Resolver) -> Result<Check, String> {
    if let Some(st) = &a.static_ {
        return Ok(Check::Static {
            pass: st.action == "pass",
            message: st.message.clone(),
        });
    }
    if let Some(keyless) = &a.keyless {
        return keyless_check(a, keyless, resolver).map(|k| Check::Keyless(Box::new(k)));
    }
    let Some(key) = &a.key else {
        return Err("authority has no key, keyless or static".into());
    };
    let hash = HashAlgorithm::parse(key.hash_algorithm.as_deref().unwrap_or(""))
        .ok_or_else(|| "unknown hashAlgorithm".to_string())?;
    let keys = if let Some(data) = &key.data {
        parse_pem_keys(data).map_err(|e| format!("key.data: {e}"))?
    } else if let Some(secret_ref) = &key.secret_ref {
        secret_keys(resolver, &secret_ref.name)?
    } else {
        return Err("key has neither data nor secretRef".into());
    };
    let tlog = match &a.ctlog {
        None => None,
        Some(ctlog) => Some(log_keys(ctlog, resolver)?),
    };
    Ok(Check::Key {
        keys,
        hash,
        tlog,
        timestamp_authorities: timestamp_authorities(a, resolver)?,
    })
}

/// Whether a Secret entry holds a PEM public key block (and so must parse as keys).
pub fn holds_public_key(bytes: &[u8]) -> bool {
    let has = |marker: &[u8]| bytes.windows(marker.len()).any(|w| w == marker);
    has(b"-----BEGIN PUBLIC KEY-----") || has(b"-----BEGIN RSA PUBLIC KEY-----")
}

/// Whether a Secret entry holds a PEM certificate (a keyless `ca-cert`).
pub fn holds_certificate(bytes: &[u8]) -> bool {
    let marker = b"-----BEGIN CERTIFICATE-----";
    bytes.windows(marker.len()).any(|w| w == marker)
}

/// The checks of a keyless authority: Fulcio CAs and CT logs from `trustRootRef`, `ca-cert`,
/// or the public-good instance shipped inside pullgate; timestamp authorities from
/// `rfc3161timestamp`; Rekor keys from `ctlog`; identities compiled.
fn keyless_check(
    a: &Authority,
    keyless: &super::types::KeylessRef,
    resolver: &Resolver,
) -> Result<KeylessCheck, String> {
    use crate::verify::keyless::IdentityMatcher;
    use crate::verify::trust_root::{self, from_ca_cert};

    let trust_root = keyless
        .trust_root_ref
        .as_deref()
        .map(|name| {
            trust_material(name, resolver).map_err(|e| format!("keyless.trustRootRef: {e}"))
        })
        .transpose()?;
    let ca_cert = match &keyless.ca_cert {
        None => None,
        Some(ca) => {
            let text = if let Some(data) = &ca.data {
                data.clone()
            } else if let Some(secret_ref) = &ca.secret_ref {
                secret_text(resolver, &secret_ref.name, holds_certificate)?
            } else {
                return Err("keyless.ca-cert has neither data nor secretRef".into());
            };
            Some(from_ca_cert(&text).map_err(|e| format!("keyless.ca-cert: {e}"))?)
        }
    };
    let url = keyless
        .url
        .as_deref()
        .unwrap_or_default()
        .trim_end_matches('/');
    if !url.is_empty() && url != PUBLIC_GOOD_FULCIO_URL && trust_root.is_none() && ca_cert.is_none()
    {
        return Err(format!(
            "keyless.url {url}: fetching the roots of a Fulcio other than {PUBLIC_GOOD_FULCIO_URL} is not supported by this version of pullgate; name its roots with trustRootRef or ca-cert"
        ));
    }
    let (mut fulcio, ct_logs, bundle_tsas) = match trust_root {
        Some(tm) if tm.fulcio.is_empty() => {
            return Err("keyless.trustRootRef: the TrustRoot has no certificateAuthorities".into())
        }
        Some(tm) => (tm.fulcio, tm.ct_logs, tm.timestamp_authorities),
        // A CA given as ca-cert: its SCTs, if any, come from the public-good CT logs unless a
        // TrustRoot says otherwise (or insecureIgnoreSCT).
        None if ca_cert.is_some() => (Vec::new(), trust_root::public_good()?.ct_logs, Vec::new()),
        None => {
            let tm = trust_root::public_good()?;
            (tm.fulcio, tm.ct_logs, tm.timestamp_authorities)
        }
    };
    fulcio.extend(ca_cert);
    let timestamp_authorities = timestamp_authorities(a, resolver)?;
    let compile = |re: &Option<String>, what: &str| -> Result<Option<regex::Regex>, String> {
        re.as_deref()
            .filter(|r| !r.is_empty())
            .map(|r| regex::Regex::new(r).map_err(|e| format!("keyless {what}: {e}")))
            .transpose()
    };
    let identities = keyless
        .identities
        .iter()
        .map(|id| {
            Ok(IdentityMatcher {
                issuer: id.issuer.clone().filter(|s| !s.is_empty()),
                issuer_re: compile(&id.issuer_reg_exp, "issuerRegExp")?,
                subject: id.subject.clone().filter(|s| !s.is_empty()),
                subject_re: compile(&id.subject_reg_exp, "subjectRegExp")?,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let tlog = match (&a.ctlog, keyless.trust_root_ref.as_deref()) {
        (Some(ctlog), _) => log_keys(ctlog, resolver)?,
        (None, Some(name)) => {
            let mut keys = LogKeys::default();
            for (base_url, key) in tuf_tlogs(name, resolver)? {
                keys.insert(key.clone(), base_url);
            }
            let root = resolver.trust_roots.get(name);
            for log in root
                .iter()
                .flat_map(|r| &r.spec.sigstore_keys)
                .flat_map(|k| &k.t_logs)
            {
                keys.insert(
                    decode_log_key(&log.public_key)
                        .map_err(|e| format!("TrustRoot tLog key: {e}"))?,
                    &log.base_url,
                );
            }
            keys
        }
        (None, None) => LogKeys::public_good(),
    };
    Ok(KeylessCheck {
        fulcio,
        identities,
        ct_logs: (!keyless.insecure_ignore_sct.unwrap_or(false)).then_some(ct_logs),
        tlog,
        require_tlog: a.ctlog.is_some(),
        timestamp_authorities,
        bundle_timestamp_authorities: bundle_tsas,
    })
}

/// The timestamp authorities of `rfc3161timestamp`: its TrustRoot's, or the public-good ones
/// built in when it names none.
fn timestamp_authorities(
    a: &Authority,
    resolver: &Resolver,
) -> Result<Option<Vec<CertificateAuthority>>, String> {
    let Some(ts) = &a.rfc3161timestamp else {
        return Ok(None);
    };
    let name = ts.trust_root_ref.as_str();
    let tsas = if name.is_empty() {
        crate::verify::trust_root::public_good()?.timestamp_authorities
    } else {
        trust_material(name, resolver)
            .map_err(|e| format!("rfc3161timestamp.trustRootRef: {e}"))?
            .timestamp_authorities
    };
    if tsas.is_empty() {
        return Err(format!(
            "rfc3161timestamp.trustRootRef: TrustRoot {name:?} has no timestampAuthorities"
        ));
    }
    Ok(Some(tsas))
}

/// The public-good Fulcio, whose roots are built in.
const PUBLIC_GOOD_FULCIO_URL: &str = "https://fulcio.sigstore.dev";

/// The trust material of TrustRoot `name`: its `sigstoreKeys`, or what its TUF repository
/// yielded (an error there fails closed with its reason).
fn trust_material(
    name: &str,
    resolver: &Resolver,
) -> Result<crate::verify::trust_root::TrustMaterial, String> {
    let root = resolver
        .trust_roots
        .get(name)
        .ok_or_else(|| format!("TrustRoot {name:?} not found"))?;
    if let Some(trust) = resolver.tuf.get(name) {
        return trust
            .as_ref()
            .map(|t| t.material.clone())
            .map_err(|e| format!("TrustRoot {name:?}: {e}"));
    }
    let keys = root
        .spec
        .sigstore_keys
        .as_ref()
        .ok_or_else(|| format!("TrustRoot {name:?} has no sigstoreKeys"))?;
    crate::verify::trust_root::from_sigstore_keys(keys)
        .map_err(|e| format!("TrustRoot {name:?}: spec.sigstoreKeys.{e}"))
}

/// The transparency logs a TUF TrustRoot `name` yielded (none for other TrustRoots).
fn tuf_tlogs<'r>(name: &str, resolver: &'r Resolver) -> Result<&'r [(String, PublicKey)], String> {
    match resolver.tuf.get(name) {
        None => Ok(&[]),
        Some(Ok(t)) => Ok(&t.tlogs),
        Some(Err(e)) => Err(format!("TrustRoot {name:?}: {e}")),
    }
}

/// The text of the Secret entries `wanted` accepts, joined.
fn secret_text(
    resolver: &Resolver,
    name: &str,
    wanted: fn(&[u8]) -> bool,
) -> Result<String, String> {
    let ns = resolver.controller_namespace;
    let secret = resolver
        .secrets
        .get(name)
        .ok_or_else(|| format!("Secret {ns}/{name} not found"))?;
    let mut text = String::new();
    let entries = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k, v.0.clone()))
        .chain(
            secret
                .string_data
                .iter()
                .flatten()
                .map(|(k, v)| (k, v.clone().into_bytes())),
        );
    for (entry, bytes) in entries {
        if wanted(&bytes) {
            let t = String::from_utf8(bytes)
                .map_err(|_| format!("Secret {ns}/{name} entry {entry:?} is not text"))?;
            text.push_str(&t);
            text.push('\n');
        }
    }
    if text.is_empty() {
        return Err(format!("Secret {ns}/{name} holds no certificate"));
    }
    Ok(text)
}

/// Every PEM public key in the data entries of the Secret; any of them may verify.
fn secret_keys(resolver: &Resolver, name: &str) -> Result<Vec<PublicKey>, String> {
    let ns = resolver.controller_namespace;
    let secret = resolver
        .secrets
        .get(name)
        .ok_or_else(|| format!("key Secret {ns}/{name} not found"))?;
    let mut values: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        values.insert(k.clone(), v.0.clone());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        values.insert(k.clone(), v.clone().into_bytes());
    }
    let mut keys = Vec::new();
    for (entry, bytes) in &values {
        // `cosign generate-key-pair k8s://…` stores cosign.key and cosign.password beside
        // cosign.pub: entries without a public key block are not keys and are skipped.
        if !holds_public_key(bytes) {
            continue;
        }
        let text = std::str::from_utf8(bytes)
            .map_err(|_| format!("key Secret {ns}/{name} entry {entry:?} is not text"))?;
        keys.extend(
            parse_pem_keys(text)
                .map_err(|e| format!("key Secret {ns}/{name} entry {entry:?}: {e}"))?,
        );
    }
    if keys.is_empty() {
        return Err(format!("key Secret {ns}/{name} holds no public key"));
    }
    Ok(keys)
}

/// Transparency log keys for a `ctlog`: a TrustRoot's `tLogs`, or the embedded public-good
/// Rekor key for `https://rekor.sigstore.dev` (the default when no url is given).
fn log_keys(ctlog: &super::types::TLog, resolver: &Resolver) -> Result<LogKeys, String> {
    let url = ctlog
        .url
        .as_deref()
        .filter(|u| !u.is_empty())
        .unwrap_or(PUBLIC_GOOD_REKOR_URL)
        .trim_end_matches('/');
    let mut keys = LogKeys::default();
    let roots: Vec<&TrustRoot> = match &ctlog.trust_root_ref {
        Some(name) => vec![*resolver
            .trust_roots
            .get(name.as_str())
            .ok_or_else(|| format!("ctlog.trustRootRef: TrustRoot {name:?} not found"))?],
        None => resolver.trust_roots.values().copied().collect(),
    };
    for root in roots {
        let tlogs = root.spec.sigstore_keys.iter().flat_map(|k| &k.t_logs);
        for tlog in tlogs {
            let matches_url =
                ctlog.trust_root_ref.is_some() || tlog.base_url.trim_end_matches('/') == url;
            if matches_url {
                keys.insert(
                    decode_log_key(&tlog.public_key)
                        .map_err(|e| format!("TrustRoot tLog key: {e}"))?,
                    &tlog.base_url,
                );
            }
        }
    }
    let tuf_names: Vec<&str> = match &ctlog.trust_root_ref {
        Some(name) => vec![name.as_str()],
        None => resolver.tuf.keys().copied().collect(),
    };
    for name in tuf_names {
        // A TUF root that failed is an error only where the ctlog names it.
        let logs = match tuf_tlogs(name, resolver) {
            Ok(logs) => logs,
            Err(e) if ctlog.trust_root_ref.is_some() => {
                return Err(format!("ctlog.trustRootRef: {e}"))
            }
            Err(_) => continue,
        };
        for (base_url, key) in logs {
            if ctlog.trust_root_ref.is_some() || base_url.trim_end_matches('/') == url {
                keys.insert(key.clone(), base_url);
            }
        }
    }
    if keys.is_empty() && ctlog.trust_root_ref.is_none() && url == PUBLIC_GOOD_REKOR_URL {
        keys = LogKeys::public_good();
    }
    if keys.is_empty() {
        return Err(format!(
            "no public key known for transparency log {url}: add a TrustRoot with its tLogs"
        ));
    }
    Ok(keys)
}

fn hash_policy(hasher: &mut sha2::Sha256, cip: &ClusterImagePolicy, compiled: &CompiledPolicy) {
    hasher.update(compiled.name.as_bytes());
    hasher.update(serde_json::to_vec(&cip.spec).unwrap_or_default());
    match &compiled.policy {
        Some(AttestationPolicy::Rego(p)) => hasher.update(p.source().as_bytes()),
        // A remote source that could not be fetched, then is: the verdict changes.
        Some(AttestationPolicy::Unsupported(reason)) => hasher.update(reason.as_bytes()),
        None => {}
    }
    if let Ok(authorities) = &compiled.authorities {
        for a in authorities {
            // Policy text from a ConfigMap is not in the CIP spec: hash what is in force.
            for at in &a.attestations {
                if let Some(AttestationPolicy::Rego(p)) = &at.policy {
                    hasher.update(p.source().as_bytes());
                }
            }
            match &a.check {
                Check::Key {
                    keys,
                    tlog,
                    timestamp_authorities,
                    ..
                } => {
                    for k in keys {
                        hasher.update(k.spki_der());
                    }
                    for id in tlog.iter().flat_map(|t| t.ids()) {
                        hasher.update(id.as_bytes());
                    }
                    if let Some(list) = timestamp_authorities {
                        let mut tsas = b"tsa".to_vec();
                        crate::verify::trust_root::fingerprint_authorities(&mut tsas, list);
                        hasher.update(&tsas);
                    }
                }
                Check::Keyless(k) => hasher.update(k.fingerprint_bytes()),
                Check::Unusable(reason) => hasher.update(reason.as_bytes()),
                Check::Static { .. } => {}
            }
        }
    }
}

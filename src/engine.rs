//! The one decision engine. Every front door (CRI pull, CRI create, admission, `pullgate
//! verify`) calls [`Engine::decide`] or [`Engine::decide_on_node`] and only translates its
//! protocol around it:
//!
//! 1. enforcement of the namespace;
//! 2. the reference as it will be fetched: a reference carrying a digest is judged by that
//!    digest alone (containerd ignores the tag beside it), an image ID is refused;
//! 3. registry-free when the policies allow it (`static`, no covering policy), else the tag is
//!    resolved so that coverage is computed on the resolved reference;
//! 4. the verdict for that digest, cached by digest, policy fingerprint and every input it
//!    read, computed once however many callers ask at the same time;
//! 5. one audit line (which also feeds the metrics).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use crate::audit::{AuditFailure, AuditLine, AuditLog, Source};
use crate::image_ref::{is_digest, ImageRef};
use crate::policy::eval::{
    attached_for, attached_needed, check_authorities, conclude, decide_offline_enforced,
    judge_policy, object_cache_key, signature_pull_secret_names, Attached, AttachedKind,
    AuthorityOutcome, Decision, Offline, PolicyInputs, Signatures, Verdict,
};
use crate::policy::object::AdmissionObject;
use crate::policy::snapshot::CompiledPolicy;
use crate::policy::source::PolicySource;
use crate::policy::Snapshot;
use crate::registry::{Budget, Credential, Credentials, RegistryClient};
use crate::verify::cache::{CacheKey, VerdictCache};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Reads registry credentials from the Secrets a CIP's `signaturePullSecrets` name, in the
/// workload's namespace (the admission shim, in cluster mode).
pub trait PullSecretReader: Send + Sync {
    fn credentials<'a>(
        &'a self,
        namespace: &'a str,
        names: &'a [String],
    ) -> BoxFuture<'a, Credentials>;
}

/// What a front door knows about a decision besides the image.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The front door, written in the audit line.
    pub source: Source,
    /// The namespace the image would run in; its labels decide enforcement.
    pub namespace: Option<&'a str>,
    /// The pod (or `Kind/name` of a workload), for the audit line.
    pub pod: Option<&'a str>,
    /// The caller's registry credential for the image's own host (e.g. the one kubelet
    /// resolved for the pull), used for the tag lookup, config fetches and signature fetches
    /// from that host only: never sent to a signature repository on another host.
    pub auth: Option<&'a Credential>,
    /// Reads the authorities' `signaturePullSecrets`, used first for what those authorities
    /// fetch. Asked only when a policy applying to the image names some.
    pub pull_secrets: Option<&'a dyn PullSecretReader>,
    /// The Kubernetes object the image is decided for, as far as the front door knows it
    /// (CIP-level policies with `includeSpec`/`includeObjectMeta`/`includeTypeMeta` read it).
    pub object: Option<&'a AdmissionObject>,
    /// The API server chose this namespace for review by the webhook's `namespaceSelector`
    /// (which it evaluates on the namespace's labels as they are now): it is enforced unless
    /// exempt, whatever a lagging snapshot says.
    pub namespace_selected: bool,
}

impl<'a> Request<'a> {
    pub fn new(source: Source, namespace: Option<&'a str>) -> Request<'a> {
        Request {
            source,
            namespace,
            pod: None,
            auth: None,
            pull_secrets: None,
            object: None,
            namespace_selected: false,
        }
    }

    fn enforced(&self, snapshot: &Snapshot) -> bool {
        snapshot.is_enforced(self.namespace)
            || (self.namespace_selected && self.namespace.is_some_and(|n| !snapshot.is_exempt(n)))
    }
}

/// A decision and how it was reached.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub decision: Decision,
    /// No verification ran for this caller: the verdict was cached or computed for another.
    pub cache_hit: bool,
    /// The reference as requested, when it parsed.
    pub image: Option<ImageRef>,
    /// The reference pinned to the digest the verdict is for, when the decision needed a
    /// digest. A front door that admits must fetch exactly this digest.
    pub pinned: Option<ImageRef>,
}

/// The decision engine: the live policies, the registry client, the verdict cache and the
/// audit log, shared by every front door of one process.
pub struct Engine {
    pub policies: Arc<dyn PolicySource>,
    pub registry: RegistryClient,
    pub cache: VerdictCache,
    pub audit: AuditLog,
    /// Written in audit lines (`node`).
    pub node: String,
}

impl Engine {
    /// Decides whether the image written `image` may run as `request` says, and writes the
    /// audit line. Registry failures give [`Verdict::Error`] ("could not decide"), never an
    /// allow.
    pub async fn decide(&self, image: &str, request: &Request<'_>) -> Outcome {
        let started = Instant::now();
        let snapshot = self.policies.current();
        let mut outcome = judge(&snapshot, &self.registry, Some(&self.cache), image, request).await;
        self.record_decided(request, &mut outcome, started).await;
        outcome
    }

    /// Decides a container about to be created from content already on the node: `name` is
    /// the image as the pod named it (with a tag only where the node's record of that tag
    /// points at one of `digests`), `digests` the manifest digests the node holds that content
    /// under. The content is admitted when one of them is admitted for `name` in this policy
    /// context; an allow verdict cached for that digest is reused.
    pub async fn decide_on_node(
        &self,
        name: &ImageRef,
        digests: &[String],
        request: &Request<'_>,
    ) -> Outcome {
        let started = Instant::now();
        let snapshot = self.policies.current();
        let mut outcome = judge_on_node(
            &snapshot,
            &self.registry,
            &self.cache,
            name,
            digests,
            request,
        )
        .await;
        self.record_decided(request, &mut outcome, started).await;
        outcome
    }

    /// Writes the audit line of `outcome` (which also counts it in the metrics). Front doors
    /// call it only for the refusals they reach before the engine is asked.
    pub fn record(&self, request: &Request<'_>, outcome: &Outcome, started: Instant) {
        // A write failure is counted and logged by the audit log; these are refusals already.
        let _ = self.audit.record(&AuditLine::new(
            request.source,
            &self.node,
            request.pod,
            &outcome.decision,
            outcome.cache_hit,
            started.elapsed(),
        ));
    }

    /// Writes the audit line of an engine decision. When it cannot be written and the audit
    /// failure policy is deny, an admitting verdict in an enforced namespace becomes a deny
    /// naming the failure (recorded wherever it still can be).
    async fn record_decided(&self, request: &Request<'_>, outcome: &mut Outcome, started: Instant) {
        let line = AuditLine::new(
            request.source,
            &self.node,
            request.pod,
            &outcome.decision,
            outcome.cache_hit,
            started.elapsed(),
        );
        let Err(failure) = self.audit.record_async(&line).await else {
            return;
        };
        let decision = &mut outcome.decision;
        if self.audit.failure_policy() != AuditFailure::Deny
            || !decision.enforced
            || !decision.verdict.admits()
        {
            return;
        }
        decision.verdict = Verdict::Deny;
        decision.reasons.push(format!(
            "the audit line of this decision cannot be written ({failure}); \
             --audit-failure=deny refuses what would not be recorded"
        ));
        let _ = self
            .audit
            .record_async(&AuditLine::new(
                request.source,
                &self.node,
                request.pod,
                decision,
                outcome.cache_hit,
                started.elapsed(),
            ))
            .await;
    }
}

/// The engine's decision without cache or audit line, for one-shot callers and tests.
pub async fn decide(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    image: &ImageRef,
    namespace: Option<&str>,
) -> Decision {
    let request = Request::new(Source::Cli, namespace);
    judge(snapshot, registry, None, &image.to_string(), &request)
        .await
        .decision
}

async fn judge(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    cache: Option<&VerdictCache>,
    image: &str,
    request: &Request<'_>,
) -> Outcome {
    let namespace = request.namespace;
    let parsed = ImageRef::parse(image);
    if !request.enforced(snapshot) {
        let shown = parsed
            .as_ref()
            .map_or_else(|_| image.to_string(), ToString::to_string);
        return Outcome {
            decision: not_enforced(&shown, namespace),
            cache_hit: false,
            image: parsed.ok(),
            pinned: None,
        };
    }
    match parsed {
        Ok(parsed) => decide_reference(snapshot, registry, cache, &parsed, request).await,
        Err(e) => Outcome {
            decision: could_not_decide(image.to_string(), namespace, e.to_string()),
            cache_hit: false,
            image: None,
            pinned: None,
        },
    }
}

/// Steps 2–4 for a parsed reference in an enforced namespace.
async fn decide_reference(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    cache: Option<&VerdictCache>,
    image: &ImageRef,
    request: &Request<'_>,
) -> Outcome {
    let outcome = |decision, cache_hit, pinned| Outcome {
        decision,
        cache_hit,
        image: Some(image.clone()),
        pinned,
    };
    if image.digest().is_some() {
        // containerd fetches the digest and ignores a tag beside it, so the tag must neither
        // select nor satisfy a policy.
        let pinned = image.without_tag();
        let (decision, hit) = decide_pinned(snapshot, registry, cache, &pinned, request).await;
        return outcome(decision, hit, Some(pinned));
    }
    // Registry-free when the policies covering the tag need no signatures and no glob could
    // cover the digest the tag resolves to.
    if !snapshot.has_digest_globs() {
        if let Offline::Decided(decision) =
            decide_offline_enforced(snapshot, image, request.namespace, true, request.object)
        {
            return outcome(decision, false, None);
        }
    }
    // Tags move: resolve on every decision, then reuse verdicts by digest.
    match registry.resolve(image, request.auth).await {
        Ok(digest) => {
            let pinned = image.with_digest(&digest);
            let (mut decision, hit) =
                decide_pinned(snapshot, registry, cache, &pinned, request).await;
            // Shown as requested; `digest` says what it resolved to.
            decision.image = image.to_string();
            outcome(decision, hit, Some(pinned))
        }
        Err(e) => {
            let mut decision = Decision::new(image, request.namespace, true);
            decision.verdict = Verdict::Error;
            decision.reasons = vec![format!("could not verify {image}: {e}")];
            outcome(decision, false, None)
        }
    }
}

async fn judge_on_node(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    cache: &VerdictCache,
    name: &ImageRef,
    digests: &[String],
    request: &Request<'_>,
) -> Outcome {
    let namespace = request.namespace;
    let outcome = |decision, cache_hit, pinned| Outcome {
        decision,
        cache_hit,
        image: Some(name.clone()),
        pinned,
    };
    if !request.enforced(snapshot) {
        return outcome(not_enforced(&name.to_string(), namespace), false, None);
    }
    let mut candidates: Vec<&str> = digests.iter().map(String::as_str).collect();
    candidates.sort_unstable();
    candidates.dedup();
    candidates.retain(|d| is_digest(d));
    let mut first_refusal = None;
    for digest in candidates {
        let pinned = name.with_digest(digest);
        let (decision, hit) =
            decide_pinned(snapshot, registry, Some(cache), &pinned, request).await;
        if decision.verdict.admits() {
            return outcome(decision, hit, Some(pinned));
        }
        first_refusal.get_or_insert((decision, hit, pinned));
    }
    match first_refusal {
        Some((decision, hit, pinned)) => outcome(decision, hit, Some(pinned)),
        None => outcome(
            could_not_decide(
                name.to_string(),
                namespace,
                format!(
                    "no manifest digest of {name} is known on this node, so there is nothing to verify: \
                     pull it by a reference pullgate can verify"
                ),
            ),
            false,
            None,
        ),
    }
}

/// The verdict for `pinned` (a reference with its digest, and with a tag only where that tag
/// is known to name it), cached when `cache` is given.
async fn decide_pinned(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    cache: Option<&VerdictCache>,
    pinned: &ImageRef,
    request: &Request<'_>,
) -> (Decision, bool) {
    let compute = || evaluate(snapshot, registry, pinned, request);
    let (mut decision, hit) = match cache {
        None => (compute().await, false),
        Some(cache) => {
            let key = CacheKey {
                image: pinned.to_string(),
                enforced: true,
                fingerprint: snapshot.fingerprint().to_string(),
                object: object_cache_key(snapshot, pinned, request.object),
                credentials: credential_identity(request),
            };
            cache.get_or_compute(key, compute).await
        }
    };
    // A cached decision may have been made for a pod of another enforced namespace.
    decision.namespace = request.namespace.map(str::to_string);
    (decision, hit)
}

/// Offline pass on the pinned reference, then signatures fetched once per attached
/// repository, checked by every authority, and CIP-level policies judged.
async fn evaluate(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    pinned: &ImageRef,
    request: &Request<'_>,
) -> Decision {
    let Request {
        namespace,
        auth,
        object,
        ..
    } = *request;
    let (mut decision, undecided) =
        match decide_offline_enforced(snapshot, pinned, namespace, true, object) {
            Offline::Decided(decision) => return decision,
            Offline::NeedsSignatures { partial, undecided } => (partial, undecided),
        };
    let could_not_decide = |mut decision: Decision, reason: String| {
        decision.verdict = Verdict::Error;
        decision.reasons = vec![format!("could not verify {pinned}: {reason}")];
        decision
    };
    let digest = pinned.digest().unwrap_or_default();
    let policies: Vec<_> = undecided
        .iter()
        .map(|&(i, _)| &snapshot.policies[i])
        .collect();
    let needed = attached_needed(&policies, pinned, digest);
    // signaturePullSecrets live in the workload's namespace: read them only when needed.
    let signature_auth = match (request.pull_secrets, namespace) {
        (Some(reader), Some(ns)) if needed.iter().any(|a| a.pull_secrets) => {
            let names = signature_pull_secret_names(snapshot, pinned, object);
            Some(reader.credentials(ns, &names).await)
        }
        _ => None,
    };
    let signature_auth = signature_auth.as_ref();
    let credentials: Vec<Option<&Credential>> = needed
        .iter()
        .map(|att| {
            signature_auth
                .filter(|_| att.pull_secrets)
                .and_then(|c| c.for_host(att.repo.registry()))
                // The caller's credential was given for the image's host only.
                .or(auth.filter(|_| att.repo.registry() == pinned.registry()))
        })
        .collect();
    let budget = registry.budget();
    let fetched = FetchPlan {
        registry,
        budget: &budget,
        needed: &needed,
        credentials: &credentials,
        pinned,
        digest,
    };
    let policies: Vec<(&CompiledPolicy, bool)> = undecided
        .iter()
        .map(|&(i, by_repository)| (&snapshot.policies[i], by_repository))
        .collect();
    let checked = match fetched.check_as_fetched(&policies).await {
        Ok(checked) => checked,
        Err(reason) => return could_not_decide(decision, reason),
    };
    // As policy-controller: the config is fetched only for a CIP whose authorities passed.
    let wants_config = checked.iter().any(|(p, _, authorities)| {
        p.policy.is_some() && p.includes.config && authorities.iter().any(|a| a.passed)
    });
    let config = match wants_config {
        true => Some(
            registry
                .fetch_configs(pinned, auth, &budget)
                .await
                .map_err(|e| format!("cannot fetch the image config: {e}")),
        ),
        false => None,
    };
    let inputs = PolicyInputs {
        object,
        config: config.as_ref(),
    };
    for (p, by_repository, authorities) in checked {
        let mut outcome = judge_policy(p, authorities, &inputs);
        outcome.by_repository = by_repository;
        decision.policies.push(outcome);
    }
    conclude(&mut decision, snapshot.config.no_match_policy);
    decision
}

/// Who is asking, for the verdict cache: the caller's credential and, when `signaturePullSecrets`
/// can be read, the namespace they are read in. Empty when neither. Only refusals are kept by
/// it ([`CacheKey::credentials`]).
fn credential_identity(request: &Request<'_>) -> String {
    let mut who = request.auth.map(Credential::identity).unwrap_or_default();
    if request.pull_secrets.is_some() {
        who.push_str("|ns=");
        who.push_str(request.namespace.unwrap_or_default());
    }
    who
}

/// One decision's signature fetches: what to fetch, with which credential, within which budget.
struct FetchPlan<'a> {
    registry: &'a RegistryClient,
    budget: &'a Budget,
    needed: &'a [Attached],
    /// By index of `needed`.
    credentials: &'a [Option<&'a Credential>],
    pinned: &'a ImageRef,
    digest: &'a str,
}

/// A policy with its authorities checked, and whether it applies by repository.
type Checked<'s> = (&'s CompiledPolicy, bool, Vec<AuthorityOutcome>);

/// Signature fetches one repository keeps in flight (the budget bounds them per decision too).
const FETCHES_PER_REPOSITORY: usize = 4;

impl FetchPlan<'_> {
    /// Lists what `needed` names, then fetches the signatures in each list's order and checks
    /// `policies` as they arrive (after 1, 2, 4, 8, … of them, so checking costs at most about
    /// twice checking them all once), stopping as soon as no further signature can change the
    /// outcome: every policy has an authority that passed, or, for a policy with a CIP-level
    /// `policy` (which reads every authority's matches), all its authorities passed. Each
    /// check takes the first signature in order that satisfies it, so an authority that passed
    /// on the signatures read so far has the outcome it would have on all of them. Otherwise
    /// everything is read and checked once more. `Err`: the could-not-decide reason (a fetch
    /// failed, or the decision's budget ran out, before the outcome was settled).
    async fn check_as_fetched<'s>(
        &self,
        policies: &[(&'s CompiledPolicy, bool)],
    ) -> Result<Vec<Checked<'s>>, String> {
        use futures_util::StreamExt as _;
        let Self {
            registry,
            budget,
            needed,
            credentials,
            pinned,
            digest,
        } = *self;
        let listings = futures_util::future::join_all(needed.iter().zip(credentials).map(
            |(att, &credential)| async move {
                match &att.kind {
                    AttachedKind::Tag { tag, media_type } => {
                        registry
                            .list_attached(&att.repo, tag, media_type, credential, budget)
                            .await
                    }
                    AttachedKind::Referrers { digest } => {
                        registry
                            .list_referrers(&att.repo, digest, credential, budget)
                            .await
                    }
                }
            },
        ))
        .await;
        let mut signatures = Signatures::new();
        let mut left = Vec::with_capacity(needed.len());
        let mut streams = Vec::with_capacity(needed.len());
        for (i, (att, listed)) in needed.iter().zip(listings).enumerate() {
            let listed =
                listed.map_err(|e| format!("fetching signatures from {}: {e}", att.key()))?;
            signatures.insert(att.key(), Vec::new());
            left.push(listed.len());
            let credential = credentials[i];
            let stream = futures_util::stream::iter(listed)
                .map(move |l| registry.fetch_pending(&att.repo, l, credential, budget))
                .buffered(FETCHES_PER_REPOSITORY)
                .map(move |fetched| (i, fetched));
            streams.push(stream.boxed());
        }
        let check = |signatures: &Signatures| -> Vec<Checked<'s>> {
            policies
                .iter()
                .map(|&(p, by_repository)| {
                    (
                        p,
                        by_repository,
                        check_authorities(p, pinned, digest, signatures),
                    )
                })
                .collect()
        };
        let mut merged = futures_util::stream::select_all(streams);
        let (mut arrived, mut next_check) = (0usize, 1usize);
        while let Some((i, fetched)) = merged.next().await {
            let key = needed[i].key();
            left[i] -= 1;
            let layer = match fetched {
                Ok(layer) => layer,
                Err(e) => {
                    // What was read before the failure may already settle the outcome.
                    let checked = check(&signatures);
                    if settled(&checked) {
                        return Ok(self.unfinished(checked, &left));
                    }
                    return Err(format!("fetching signatures from {key}: {e}"));
                }
            };
            if let (Some(layer), Some(list)) = (layer, signatures.get_mut(&key)) {
                list.push(layer);
            }
            arrived += 1;
            if arrived == next_check && left.iter().any(|&n| n > 0) {
                next_check *= 2;
                let checked = check(&signatures);
                if settled(&checked) {
                    return Ok(self.unfinished(checked, &left));
                }
            }
        }
        Ok(check(&signatures))
    }

    /// Says so in the outcome of each authority that failed on signatures not all read (its
    /// policy passed by another authority first).
    fn unfinished<'s>(&self, mut checked: Vec<Checked<'s>>, left: &[usize]) -> Vec<Checked<'s>> {
        for (p, _, outcomes) in &mut checked {
            for (a, outcome) in p.authorities.iter().flatten().zip(outcomes.iter_mut()) {
                let unread = attached_for(a, self.pinned, self.digest).is_some_and(|att| {
                    self.needed
                        .iter()
                        .zip(left)
                        .any(|(n, &l)| l > 0 && n.key() == att.key())
                });
                if !outcome.passed && unread {
                    outcome.reason = Some(format!(
                        "not checked against every signature: another authority of policy {} \
                         passed first",
                        p.name
                    ));
                }
            }
        }
        checked
    }
}

/// No signature still unread can change these outcomes (see [`FetchPlan::check_as_fetched`]).
fn settled(checked: &[Checked<'_>]) -> bool {
    checked.iter().all(|(p, _, authorities)| match p.policy {
        None => authorities.iter().any(|a| a.passed),
        Some(_) => authorities.iter().all(|a| a.passed),
    })
}

fn not_enforced(image: &str, namespace: Option<&str>) -> Decision {
    Decision {
        image: image.to_string(),
        digest: None,
        namespace: namespace.map(str::to_string),
        enforced: false,
        verdict: Verdict::Allow,
        reasons: vec![format!(
            "namespace {} is not enforced",
            namespace.unwrap_or_default()
        )],
        policies: Vec::new(),
    }
}

fn could_not_decide(image: String, namespace: Option<&str>, reason: String) -> Decision {
    Decision {
        image,
        digest: None,
        namespace: namespace.map(str::to_string),
        enforced: true,
        verdict: Verdict::Error,
        reasons: vec![reason],
        policies: Vec::new(),
    }
}

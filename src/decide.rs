//! The one decision path shared by every front door: snapshot → covering policies → (only if
//! needed) resolve the digest and fetch signatures once → pure evaluation → (only if a
//! CIP-level policy that passed its authorities reads it) fetch the image config once →
//! decision.

use crate::image_ref::ImageRef;
use crate::policy::eval::{
    attached_needed, check_authorities, conclude, decide_offline, judge_policy, AttachedKind,
    Decision, Offline, PolicyInputs, Signatures, Verdict,
};
use crate::policy::object::AdmissionObject;
use crate::policy::Snapshot;
use crate::registry::{Credential, Credentials, RegistryClient};

/// What a front door knows about a decision besides the image.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context<'a> {
    /// The namespace the image would run in; its labels decide enforcement.
    pub namespace: Option<&'a str>,
    /// The caller's registry credential (e.g. the one kubelet resolved for the pull), used for
    /// the tag lookup, signature and config fetches.
    pub auth: Option<&'a Credential>,
    /// The credentials of the authorities' `signaturePullSecrets` (read from the workload's
    /// namespace), used first for what those authorities fetch.
    pub signature_auth: Option<&'a Credentials>,
    /// The Kubernetes object the image is decided for, as far as the front door knows it
    /// (CIP-level policies with `includeSpec`/`includeObjectMeta`/`includeTypeMeta` read it).
    pub object: Option<&'a AdmissionObject>,
}

/// Decides whether `image` may run in `namespace` under `snapshot`.
///
/// Registry failures give [`Verdict::Error`] ("could not decide"), never an allow.
pub async fn decide(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    image: &ImageRef,
    namespace: Option<&str>,
) -> Decision {
    let context = Context {
        namespace,
        ..Context::default()
    };
    decide_in(snapshot, registry, image, &context).await
}

/// [`decide`] with everything the front door knows ([`Context`]). Credentials only open
/// registry access; they never make an image pass.
pub async fn decide_in(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    image: &ImageRef,
    context: &Context<'_>,
) -> Decision {
    let Context {
        namespace,
        auth,
        signature_auth,
        object,
    } = *context;
    let (mut decision, undecided) = match decide_offline(snapshot, image, namespace, object) {
        Offline::Decided(decision) => return decision,
        Offline::NeedsSignatures { partial, undecided } => (partial, undecided),
    };
    let could_not_decide = |mut decision: Decision, reason: String| {
        decision.verdict = Verdict::Error;
        decision.reasons = vec![format!("could not verify {image}: {reason}")];
        decision
    };
    let digest = match registry.resolve(image, auth).await {
        Ok(d) => d,
        Err(e) => return could_not_decide(decision, e.to_string()),
    };
    decision.digest = Some(digest.clone());
    let pinned = image.with_digest(&digest);

    let policies: Vec<_> = undecided.iter().map(|&i| &snapshot.policies[i]).collect();
    let needed = attached_needed(&policies, &pinned, &digest);
    let fetches = needed.iter().map(|att| async move {
        let credential = signature_auth
            .filter(|_| att.pull_secrets)
            .and_then(|c| c.for_host(att.repo.registry()))
            .or(auth);
        (
            att.key(),
            match &att.kind {
                AttachedKind::Tag { tag, media_type } => {
                    registry
                        .fetch_attached(&att.repo, tag, media_type, credential)
                        .await
                }
                AttachedKind::Referrers { digest } => {
                    registry
                        .fetch_referrers(&att.repo, digest, credential)
                        .await
                }
            },
        )
    });
    let mut signatures = Signatures::new();
    for (name, fetched) in futures_util::future::join_all(fetches).await {
        match fetched {
            Ok(layers) => {
                signatures.insert(name, layers);
            }
            Err(e) => {
                return could_not_decide(decision, format!("fetching signatures from {name}: {e}"))
            }
        }
    }
    let checked: Vec<_> = policies
        .into_iter()
        .map(|p| (p, check_authorities(p, &pinned, &digest, &signatures)))
        .collect();
    // As policy-controller: the config is fetched only for a CIP whose authorities passed.
    let wants_config = checked.iter().any(|(p, authorities)| {
        p.policy.is_some() && p.includes.config && authorities.iter().any(|a| a.passed)
    });
    let config = match wants_config {
        true => Some(
            registry
                .fetch_configs(&pinned, auth)
                .await
                .map_err(|e| format!("cannot fetch the image config: {e}")),
        ),
        false => None,
    };
    let inputs = PolicyInputs {
        object,
        config: config.as_ref(),
    };
    for (p, authorities) in checked {
        decision
            .policies
            .push(judge_policy(p, authorities, &inputs));
    }
    let covering = decision.policies.len();
    conclude(&mut decision, covering, snapshot.config.no_match_policy);
    decision
}

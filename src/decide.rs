//! The one decision path shared by every front door: snapshot → covering policies → (only if
//! needed) resolve the digest and fetch signatures once → pure evaluation → decision.

use crate::image_ref::ImageRef;
use crate::policy::eval::{
    attached_needed, conclude, decide_offline, evaluate_policy, AttachedKind, Decision, Offline,
    Signatures, Verdict,
};
use crate::policy::Snapshot;
use crate::registry::{Credential, Credentials, RegistryClient};

/// Decides whether `image` may run in `namespace` under `snapshot`.
///
/// Registry failures give [`Verdict::Error`] ("could not decide"), never an allow.
pub async fn decide(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    image: &ImageRef,
    namespace: Option<&str>,
) -> Decision {
    decide_with_auth(snapshot, registry, image, namespace, None, None).await
}

/// [`decide`] with the caller's registry credential (e.g. the one kubelet resolved for the
/// pull), used for the tag lookup and signature fetches. `signature_auth`: the credentials of
/// the authorities' `signaturePullSecrets` (read from the workload's namespace), used first for
/// what those authorities fetch. Credentials only open registry access; they never make an
/// image pass.
pub async fn decide_with_auth(
    snapshot: &Snapshot,
    registry: &RegistryClient,
    image: &ImageRef,
    namespace: Option<&str>,
    auth: Option<&Credential>,
    signature_auth: Option<&Credentials>,
) -> Decision {
    let (mut decision, undecided) = match decide_offline(snapshot, image, namespace) {
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
    for p in policies {
        decision
            .policies
            .push(evaluate_policy(p, &pinned, &digest, &signatures));
    }
    let covering = decision.policies.len();
    conclude(&mut decision, covering, snapshot.config.no_match_policy);
    decision
}

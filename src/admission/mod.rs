//! The admission shim: Kubernetes admission webhooks (AdmissionReview `admission.k8s.io/v1`
//! over HTTPS) in front of the same decision engine the node runs.
//!
//! | path | webhook |
//! |---|---|
//! | `POST /validate/workloads` | Pods (containers, initContainers, ephemeralContainers) and the pod templates of Deployments, ReplicaSets, StatefulSets, DaemonSets, Jobs, CronJobs: denied in policy-controller's message format, warnings for warn mode |
//! | `POST /validate/policies` | ClusterImagePolicy and TrustRoot: refused at apply time with every problem and its field path |
//! | `POST /mutate/namespaces` | with `--enforce-by-default`, new namespaces labelled `policy.sigstore.dev/include=true` unless excluded |
//! | `GET /livez`, `GET /readyz`, `GET /metrics` | liveness; 200 while the policy snapshot is fresh, 503 while stale; Prometheus metrics |
//!
//! The shim gives early feedback; enforcement stays at the node, which verifies the digest it
//! pulls. So the shim never rewrites tags to digests. Could-not-decide denies (fail closed).
//! A body that is not an AdmissionReview is answered HTTP 400 with a one-line reason.

pub mod field_error;
pub mod namespaces;
pub mod policies;
pub mod pull_secrets;
pub mod review;
pub mod server;
pub mod tls;
pub mod workloads;

use std::sync::Arc;

pub use review::{BadReview, Response};
pub use server::{bind, handle, serve, BindError, Busy, LimitSettings, Limits, MAX_BODY_BYTES};
pub use tls::{CertFiles, TlsError};

use crate::engine::Engine;
use crate::metrics::Metrics;

/// The webhooks served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Webhook {
    Workloads,
    Policies,
    Namespaces,
}

impl Webhook {
    pub const ALL: [Webhook; 3] = [Webhook::Workloads, Webhook::Policies, Webhook::Namespaces];

    pub fn path(self) -> &'static str {
        match self {
            Webhook::Workloads => "/validate/workloads",
            Webhook::Policies => "/validate/policies",
            Webhook::Namespaces => "/mutate/namespaces",
        }
    }

    pub fn from_path(path: &str) -> Option<Webhook> {
        Webhook::ALL.into_iter().find(|w| w.path() == path)
    }
}

/// Everything the webhooks share: the live policy set, the registry client, the verdict cache
/// (keyed as the node keys it: by digest and policy fingerprint) and the audit log.
pub struct Shim {
    /// The decision engine (policies, registry, verdict cache, audit log).
    pub engine: Engine,
    /// Served at `/metrics`; `/readyz` reports the policy snapshot's freshness.
    pub metrics: Arc<Metrics>,
    /// Label new namespaces for enforcement unless excluded.
    pub enforce_by_default: bool,
    /// Cluster mode: reads workloads' `imagePullSecrets` for registry access.
    pub pull_secrets: Option<pull_secrets::PullSecrets>,
    /// Cluster mode: a workload review arrives only for namespaces the webhook's
    /// `namespaceSelector` matched on their current labels, so the namespace is enforced
    /// (unless exempt) even where the shim's own view of the labels lags.
    pub trust_namespace_selector: bool,
    /// Caps on connections, concurrent reviews and review bytes in flight.
    pub limits: Limits,
}

impl Shim {
    /// Answers one AdmissionReview body. `Err`: the body is not a review the shim can answer
    /// (HTTP 400); every decision, allow or deny, is `Ok`.
    pub async fn review(&self, webhook: Webhook, body: &[u8]) -> Result<Response, BadReview> {
        // `request` borrows the object from `body`: no copy of the review is made.
        let request = review::parse(body)?;
        let snapshot = self.engine.policies.current();
        Ok(match webhook {
            Webhook::Workloads => workloads::review(self, &snapshot, &request).await,
            Webhook::Policies => policies::review(&snapshot, &request),
            Webhook::Namespaces => {
                namespaces::review(&snapshot.settings, self.enforce_by_default, &request)
            }
        })
    }
}

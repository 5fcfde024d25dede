//! Prometheus metrics and the admin listener (`/livez`, `/readyz`, `/metrics`).
//!
//! Decisions are counted where every decision already passes once: the audit log. Snapshot
//! freshness is read from the policy source when scraped, so it can never lag the source.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `pullgate_decisions_total` | counter | `source`, `verdict`, `cache` (`hit`/`miss`) |
//! | `pullgate_decision_duration_seconds` | histogram | `source` |
//! | `pullgate_snapshot_fresh` | gauge | 1 fresh, 0 stale |
//! | `pullgate_snapshot_state_since_timestamp_seconds` | gauge | when fresh/stale began |
//! | `pullgate_snapshot_last_sync_timestamp_seconds` | gauge | last confirmation (0: never) |
//! | `pullgate_snapshot_policies` | gauge | ClusterImagePolicies in force |
//! | `pullgate_snapshot_invalid_policies` | gauge | invalid ClusterImagePolicies in force (each denies what it covers) |
//! | `pullgate_snapshot_policy_invalid` | gauge | `policy`: 1 for each invalid ClusterImagePolicy |
//! | `pullgate_audit_write_errors_total` | counter | audit lines that could not be written |
//! | `pullgate_audit_failing` | gauge | 1 while the latest audit write failed |
//! | `pullgate_key_secrets_with_private_keys` | gauge | key Secrets named by CIPs that hold a private key (admission shim) |

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::audit::{AuditLine, Source};
use crate::health::Freshness;
use crate::policy::eval::Verdict;
use crate::policy::source::PolicySource;

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum SourceLabel {
    cri_pull,
    cri_create,
    admission,
    cli,
}

impl From<Source> for SourceLabel {
    fn from(s: Source) -> Self {
        match s {
            Source::CriPull => SourceLabel::cri_pull,
            Source::CriCreate => SourceLabel::cri_create,
            Source::Admission => SourceLabel::admission,
            Source::Cli => SourceLabel::cli,
        }
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum VerdictLabel {
    allow,
    warn,
    deny,
    error,
}

impl From<Verdict> for VerdictLabel {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Allow => VerdictLabel::allow,
            Verdict::Warn => VerdictLabel::warn,
            Verdict::Deny => VerdictLabel::deny,
            Verdict::Error => VerdictLabel::error,
        }
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum CacheLabel {
    hit,
    miss,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    source: SourceLabel,
    verdict: VerdictLabel,
    cache: CacheLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: SourceLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

/// An invalid ClusterImagePolicy of the snapshot in force, as `/readyz` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InvalidPolicy {
    pub name: String,
    pub origin: String,
    pub problems: Vec<String>,
}

/// The policies of `snapshot` that are invalid (each denies every image it covers).
pub fn invalid_policies(snapshot: &crate::policy::Snapshot) -> Vec<InvalidPolicy> {
    snapshot
        .policies
        .iter()
        .filter_map(|p| {
            let problems = p.authorities.as_ref().err()?;
            Some(InvalidPolicy {
                name: p.name.clone(),
                origin: p.origin.clone(),
                problems: problems.iter().map(ToString::to_string).collect(),
            })
        })
        .collect()
}

/// Whether audit lines are being written, as `/readyz` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditHealth {
    /// The latest write failed; cleared by the next successful one.
    pub failing: bool,
    /// Lines that could not be written since start.
    pub write_errors: u64,
    /// The latest failure, and when it happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_time: Option<jiff::Timestamp>,
}

/// The process's metrics. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    latency: Family<SourceLabels, Histogram>,
    fresh: Gauge,
    state_since: Gauge<f64, AtomicU64>,
    last_sync: Gauge<f64, AtomicU64>,
    policies: Gauge,
    invalid_count: Gauge,
    invalid: Family<PolicyLabels, Gauge>,
    audit_errors: Counter,
    audit_failing: Gauge,
    audit: std::sync::Mutex<AuditHealth>,
    key_secrets_with_private_keys: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pullgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Image decisions, by front door, verdict and verdict-cache use",
            decisions.clone(),
        );
        let latency = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            // 0.5 ms .. ~8 s: cached verdicts sit at the bottom, cold registry work above.
            Histogram::new(exponential_buckets(0.0005, 2.0, 15))
        });
        registry.register(
            "decision_duration_seconds",
            "Time to decide one image, registry work included",
            latency.clone(),
        );
        let fresh = Gauge::default();
        registry.register(
            "snapshot_fresh",
            "1 when the policy snapshot in force reflects its source now, 0 when it is an older one (stale)",
            fresh.clone(),
        );
        let state_since = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "snapshot_state_since_timestamp_seconds",
            "Unix time the snapshot became fresh or stale",
            state_since.clone(),
        );
        let last_sync = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "snapshot_last_sync_timestamp_seconds",
            "Unix time the snapshot was last confirmed against its source (0: never)",
            last_sync.clone(),
        );
        let policies = Gauge::default();
        registry.register(
            "snapshot_policies",
            "ClusterImagePolicies in the snapshot in force",
            policies.clone(),
        );
        let invalid_count = Gauge::default();
        registry.register(
            "snapshot_invalid_policies",
            "Invalid ClusterImagePolicies in the snapshot in force; each denies every image it covers",
            invalid_count.clone(),
        );
        let invalid = Family::<PolicyLabels, Gauge>::default();
        registry.register(
            "snapshot_policy_invalid",
            "1 for each invalid ClusterImagePolicy in force, by name",
            invalid.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Audit lines that could not be written",
            audit_errors.clone(),
        );
        let audit_failing = Gauge::default();
        registry.register(
            "audit_failing",
            "1 while the latest audit write failed, 0 once one succeeds",
            audit_failing.clone(),
        );
        let key_secrets_with_private_keys = Gauge::default();
        registry.register(
            "key_secrets_with_private_keys",
            "Key Secrets named by ClusterImagePolicies that also hold a private key (admission shim's key projector)",
            key_secrets_with_private_keys.clone(),
        );
        Metrics {
            registry,
            decisions,
            latency,
            fresh,
            state_since,
            last_sync,
            policies,
            invalid_count,
            invalid,
            audit_errors,
            audit_failing,
            audit: std::sync::Mutex::new(AuditHealth::default()),
            key_secrets_with_private_keys,
        }
    }

    /// Records the result of one audit write.
    pub fn audit_written(&self, result: Result<(), &str>) {
        let mut audit = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                audit.failing = false;
                self.audit_failing.set(0);
            }
            Err(e) => {
                audit.failing = true;
                audit.write_errors += 1;
                audit.last_error = Some(e.to_string());
                audit.last_error_time = Some(jiff::Timestamp::now());
                self.audit_errors.inc();
                self.audit_failing.set(1);
            }
        }
    }

    /// Whether audit lines are being written.
    pub fn audit_health(&self) -> AuditHealth {
        self.audit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Set by the key projector ([`crate::kube::keys`]).
    pub fn set_key_secrets_with_private_keys(&self, count: usize) {
        self.key_secrets_with_private_keys
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Counts one decision (called with each audit line).
    pub fn observe(&self, line: &AuditLine<'_>) {
        let source = SourceLabel::from(line.source);
        self.decisions
            .get_or_create(&DecisionLabels {
                source,
                verdict: line.verdict.into(),
                cache: if line.cache_hit {
                    CacheLabel::hit
                } else {
                    CacheLabel::miss
                },
            })
            .inc();
        self.latency
            .get_or_create(&SourceLabels { source })
            .observe(line.latency_ms / 1000.0);
    }

    /// The text exposition, with the snapshot gauges read from `source` now.
    pub fn render(&self, source: &dyn PolicySource) -> String {
        let freshness = source.freshness();
        self.fresh.set(i64::from(freshness.fresh));
        self.state_since.set(unix_seconds(freshness.since));
        self.last_sync
            .set(freshness.last_sync.map_or(0.0, unix_seconds));
        let snapshot = source.current();
        self.policies
            .set(i64::try_from(snapshot.policies.len()).unwrap_or(i64::MAX));
        let invalid = invalid_policies(&snapshot);
        self.invalid_count
            .set(i64::try_from(invalid.len()).unwrap_or(i64::MAX));
        self.invalid.clear();
        for p in invalid {
            self.invalid
                .get_or_create(&PolicyLabels { policy: p.name })
                .set(1);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

fn unix_seconds(t: jiff::Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

/// `/readyz`'s JSON body.
#[derive(serde::Serialize)]
struct Readiness<'a> {
    #[serde(flatten)]
    freshness: &'a Freshness,
    policies: usize,
    fingerprint: &'a str,
    /// Invalid ClusterImagePolicies in force: each denies every image it covers.
    invalid_policies: Vec<InvalidPolicy>,
    audit: AuditHealth,
}

pub type Reply = http::Response<Full<Bytes>>;

/// An HTTP answer with a body of `content_type`.
pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut response = http::Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
}

/// Answers the admin paths; `None` for any other path. `/readyz` is 200 while the snapshot is
/// fresh and audit lines are written, 503 while the snapshot is stale (the older set is still
/// enforced; the body says since when and why) or the latest audit write failed. Invalid
/// ClusterImagePolicies are listed in the body (`invalid_policies`) without making it 503: the
/// set is in force as written, and each of them denies what it covers.
pub fn admin_reply(
    method: &Method,
    path: &str,
    source: &dyn PolicySource,
    metrics: &Metrics,
) -> Option<Reply> {
    if !matches!(path, "/livez" | "/readyz" | "/metrics") {
        return None;
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed; use GET\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return Some(r);
    }
    Some(match path {
        "/livez" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => {
            let freshness = source.freshness();
            let snapshot = source.current();
            let audit = metrics.audit_health();
            let ready = freshness.fresh && !audit.failing;
            let body = Readiness {
                freshness: &freshness,
                policies: snapshot.policies.len(),
                fingerprint: snapshot.fingerprint(),
                invalid_policies: invalid_policies(&snapshot),
                audit,
            };
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let mut text = serde_json::to_vec(&body).unwrap_or_default();
            text.push(b'\n');
            reply(status, "application/json", text)
        }
        _ => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(source),
        ),
    })
}

/// Serves the admin paths over plain HTTP/1.1 until `shutdown` completes. Meant for loopback
/// (`--health-listen 127.0.0.1:9440`): it carries no secrets but is not authenticated.
pub async fn serve_admin(
    listener: TcpListener,
    source: Arc<dyn PolicySource>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let source = source.clone();
                    let metrics = metrics.clone();
                    let service = service_fn(move |req: http::Request<Incoming>| {
                        let source = source.clone();
                        let metrics = metrics.clone();
                        async move {
                            let answer = admin_reply(req.method(), req.uri().path(), &*source, &metrics)
                                .unwrap_or_else(|| reply(
                                    StatusCode::NOT_FOUND,
                                    "text/plain; charset=utf-8",
                                    "no such endpoint; try /livez, /readyz or /metrics\n",
                                ));
                            Ok::<_, Infallible>(answer)
                        }
                    });
                    connections.spawn(async move {
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(TokioIo::new(tcp), service);
                        let _ = conn.await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Binds the admin listener; a taken port is a start-up error.
pub async fn bind_admin(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} (--health-listen): {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::eval::Decision;
    use crate::policy::snapshot::{Settings, Snapshot};

    struct Fixed(Arc<Snapshot>, Freshness);

    impl PolicySource for Fixed {
        fn current(&self) -> Arc<Snapshot> {
            self.0.clone()
        }
        fn freshness(&self) -> Freshness {
            self.1.clone()
        }
    }

    #[test]
    fn decisions_and_freshness_are_exported() {
        let metrics = Metrics::new();
        let mut decision = Decision::new(&"ghcr.io/a/b:1".parse().unwrap(), Some("ns"), true);
        decision.verdict = Verdict::Deny;
        for (source, cache_hit) in [
            (Source::CriPull, false),
            (Source::CriPull, true),
            (Source::Admission, false),
        ] {
            metrics.observe(&AuditLine::new(
                source,
                "n",
                None,
                &decision,
                cache_hit,
                Duration::from_millis(3),
            ));
        }
        let since: jiff::Timestamp = "2026-11-27T00:00:00Z".parse().unwrap();
        let source = Fixed(
            Arc::new(Snapshot::unusable(Settings::default(), "x")),
            Freshness {
                fresh: false,
                since,
                last_sync: None,
                reason: Some("x".into()),
            },
        );
        let text = metrics.render(&source);
        for want in [
            "pullgate_decisions_total{source=\"cri_pull\",verdict=\"deny\",cache=\"miss\"} 1",
            "pullgate_decisions_total{source=\"cri_pull\",verdict=\"deny\",cache=\"hit\"} 1",
            "pullgate_decisions_total{source=\"admission\",verdict=\"deny\",cache=\"miss\"} 1",
            "pullgate_decision_duration_seconds_count{source=\"cri_pull\"} 2",
            "pullgate_snapshot_fresh 0",
            "pullgate_snapshot_state_since_timestamp_seconds 1795737600.0",
            "pullgate_snapshot_last_sync_timestamp_seconds 0.0",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}

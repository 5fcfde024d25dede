//! An image reference pullgate cannot parse is forwarded without a decision in exempt (and
//! other unenforced) namespaces, and still refused where policies are enforced.

use std::sync::Arc;
use std::time::Duration;

use pullgate::audit::{AuditLog, Source};
use pullgate::engine::{Engine, Request};
use pullgate::policy::load::Objects;
use pullgate::policy::snapshot::{Settings, Snapshot};
use pullgate::policy::source::Fixed;
use pullgate::registry::{RegistryClient, RegistryConfig};
use pullgate::verify::cache::VerdictCache;

const POLICIES: &str = "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: all}\nspec:\n  images: [{glob: \"**\"}]\n  authorities: [{static: {action: pass}}]\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {policy.sigstore.dev/include: \"true\"}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: kube-system, labels: {policy.sigstore.dev/include: \"true\"}}\n";

#[tokio::test]
async fn unparseable_references_are_not_decided_where_nothing_is_enforced() {
    let mut objects = Objects::default();
    objects.load_str(POLICIES, "test").unwrap();
    let engine = Engine {
        policies: Arc::new(Fixed::new(Snapshot::build(&objects, Settings::default()))),
        registry: RegistryClient::new(RegistryConfig::default()).unwrap(),
        cache: VerdictCache::new(
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(5),
            10,
        ),
        audit: AuditLog::silent(),
        node: "n".into(),
    };
    let image = format!("127.0.0.1:9/app@sha384:{}", "a".repeat(96));
    for ns in ["kube-system", "dev"] {
        let outcome = engine
            .decide(&image, &Request::new(Source::CriPull, Some(ns)))
            .await;
        assert!(
            outcome.decision.verdict.admits(),
            "{ns}: {:?}",
            outcome.decision
        );
        assert!(!outcome.decision.enforced);
        assert!(
            outcome.pinned.is_none(),
            "nothing is pinned: forwarded as is"
        );
    }
    let outcome = engine
        .decide(&image, &Request::new(Source::CriPull, Some("prod")))
        .await;
    assert!(
        !outcome.decision.verdict.admits(),
        "an enforced namespace never admits what cannot be checked"
    );
}

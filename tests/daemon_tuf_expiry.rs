//! Remote TUF trust expires: once the verified metadata's earliest expiry has passed with no
//! successful refresh (the mirror is blocked), the authorities depending on it fail closed
//! with a reason naming the expiry. The clock is injected; nothing sleeps.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::fulcio::TestFulcio;
use common::tuf::{trusted_root_json, TufFaults, TufRepo, TufServer};
use common::*;
use pullgate::policy::snapshot::{Check, Settings};
use pullgate::policy::source::PolicyDir;
use pullgate::policy::tuf_source::RemoteTuf;

fn check_of(dir: &PolicyDir) -> Check {
    let snap = dir.current();
    snap.policies[0].authorities.as_ref().expect("compiled")[0]
        .check
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_remote_trust_fails_closed_naming_the_expiry() {
    let fulcio = TestFulcio::new("remote-fulcio");
    let rekor = TestRekor::new();
    // The fixture's metadata expires at 2099-01-01T00:00:00Z (root, snapshot, targets and
    // timestamp alike).
    let repo = TufRepo::new(
        &trusted_root_json(&fulcio, &rekor.public_der()),
        &TufFaults::default(),
    );
    let server = TufServer::start(&repo.repository()).await;
    let cip = "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: k}\nspec:\n  images: [{glob: \"**\"}]\n  authorities:\n  - keyless: {trustRootRef: tuf, identities: [{issuer: i, subject: s}]}\n";
    let tr = repo.remote_trust_root("tuf", &server.url());
    let dir = write_policy_dir(&[("cip.yaml", cip), ("tr.yaml", &tr)]);

    let now = Arc::new(AtomicI64::new(jiff::Timestamp::now().as_second()));
    let clock = now.clone();
    let tuf = RemoteTuf::new(Duration::from_secs(3600))
        .with_clock(Arc::new(move || clock.load(Ordering::SeqCst)));
    let (source, problems) =
        PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
    assert!(problems.is_empty(), "{problems:?}");
    let source = source.with_remote_tuf(tuf);
    assert!(source.refresh_tuf().await);
    assert!(matches!(check_of(&source), Check::Keyless(_)));

    // The mirror is blocked; time passes, but not past the expiry: the trust stays.
    server.stop();
    let expiry: jiff::Timestamp = "2099-01-01T00:00:00Z".parse().unwrap();
    now.store(expiry.as_second() - 60, Ordering::SeqCst);
    assert!(!source.refresh_tuf().await);
    assert!(matches!(check_of(&source), Check::Keyless(_)));

    // Past the expiry with no successful refresh: the authority fails closed, saying why.
    now.store(expiry.as_second() + 1, Ordering::SeqCst);
    assert!(
        source.refresh_tuf().await,
        "an expiry rebuilds the snapshot"
    );
    match check_of(&source) {
        Check::Unusable(reason) => {
            assert!(
                reason.contains("expired at 2099-01-01T00:00:00Z"),
                "{reason}"
            );
            assert!(reason.contains("no refresh has succeeded"), "{reason}");
        }
        other => panic!("expired trust must not verify anything, got {other:?}"),
    }
    // A rebuild for any other reason does not bring the expired trust back.
    write_file(
        dir.path(),
        "cip.yaml",
        &cip.replace("metadata: {name: k}", "metadata: {name: k, labels: {a: b}}"),
    );
    assert_eq!(source.reload_if_changed().await, Ok(true));
    assert!(matches!(check_of(&source), Check::Unusable(_)));
}

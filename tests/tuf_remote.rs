//! Remote (TUF) TrustRoots in a running policy source: fetched and verified once, kept across
//! decisions and rebuilds, refreshed when the TrustRoot changes, and the last verified trust
//! kept when the mirror goes away.

mod common;

use common::fulcio::TestFulcio;
use common::tuf::{trusted_root_json, TufFaults, TufRepo, TufServer};
use common::*;
use pullgate::policy::snapshot::{Check, Settings};
use pullgate::policy::source::PolicyDir;

fn check_of(dir: &PolicyDir) -> Check {
    let snap = dir.current();
    snap.policies[0].authorities.as_ref().expect("compiled")[0]
        .check
        .clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn remote_trust_is_fetched_once_and_survives_a_mirror_outage() {
    let fulcio = TestFulcio::new("remote-fulcio");
    let rekor = TestRekor::new();
    let repo = TufRepo::new(
        &trusted_root_json(&fulcio, &rekor.public_der()),
        &TufFaults::default(),
    );
    let server = TufServer::start(&repo.repository()).await;
    let cip = "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: k}\nspec:\n  images: [{glob: \"**\"}]\n  authorities:\n  - keyless: {trustRootRef: tuf, identities: [{issuer: i, subject: s}]}\n";
    let tr = repo.remote_trust_root("tuf", &server.url());
    let dir = write_policy_dir(&[("cip.yaml", cip), ("tr.yaml", &tr)]);
    let (source, problems) =
        PolicyDir::open(vec![dir.path().to_path_buf()], Settings::default()).await;
    assert!(problems.is_empty(), "{problems:?}");
    // Before the first fetch the authority fails closed, saying why; nothing was fetched yet.
    match check_of(&source) {
        Check::Unusable(reason) => {
            assert!(reason.contains("not fetched and verified yet"), "{reason}")
        }
        other => panic!("expected unusable, got {other:?}"),
    }
    assert_eq!(server.count("/timestamp.json"), 0);

    assert!(
        source.refresh_tuf().await,
        "the first fetch rebuilds the snapshot"
    );
    assert!(
        matches!(check_of(&source), Check::Keyless(_)),
        "{:?}",
        check_of(&source)
    );
    let fingerprint = source.current().fingerprint().to_string();
    assert_eq!(server.count("/timestamp.json"), 1);
    // Further rounds (and the decisions in between, which read the snapshot only) fetch nothing.
    for _ in 0..5 {
        assert!(!source.refresh_tuf().await);
    }
    assert_eq!(server.count("/timestamp.json"), 1);

    // The mirror goes away; the TrustRoot changes (a label), which asks for a refetch. It
    // fails, and the last verified trust stays in force.
    server.stop();
    write_file(
        dir.path(),
        "tr.yaml",
        &tr.replace(
            "metadata: {name: tuf}",
            "metadata: {name: tuf, labels: {x: y}}",
        ),
    );
    assert_eq!(source.reload_if_changed().await, Ok(true));
    assert!(!source.refresh_tuf().await);
    assert!(
        matches!(check_of(&source), Check::Keyless(_)),
        "{:?}",
        check_of(&source)
    );
    assert_eq!(source.current().fingerprint(), fingerprint);
}

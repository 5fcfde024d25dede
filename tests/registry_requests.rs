//! Registry requests per cold verification, counted from the real registry's access log.
//! Goal: at most 4 (resolve the tag, the signature manifest, one blob per signature), however
//! many authorities and policies check the signatures. For comparison, the same verification
//! done naively with the sigstore crate's client is counted in the same run.

mod common;

use common::*;
use sigstore::cosign::CosignCapabilities as _;
use sigstore::registry::OciReference;

fn key_cip(name: &str, pems: &[String]) -> String {
    let authorities: String = pems
        .iter()
        .map(|pem| {
            format!(
                "  - key:\n      data: {}\n",
                serde_json::to_string(pem).unwrap()
            )
        })
        .collect();
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: {name}}}\nspec:\n  images: [{{glob: \"**\"}}]\n  authorities:\n{authorities}"
    )
}

async fn count_verification(reg: &Registry, policy: &str, image: &str) -> Vec<(String, String)> {
    let dir = write_policy_dir(&[("p.yaml", policy)]);
    let mark = reg.request_count().await;
    let out = run_pullgate_async(
        &["verify", "--policy", dir.path().to_str().unwrap(), image],
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
    reg.requests_since(mark).await
}

#[tokio::test(flavor = "multi_thread")]
async fn one_fetch_per_digest_serves_every_authority() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-requests").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;
    let wrong: Vec<String> = (0..3)
        .map(|_| TestKey::generate(KeyKind::EcdsaP256).public_pem())
        .collect();

    let one = key_cip("one", &[key.public_pem()]);
    let requests = count_verification(&reg, &one, &reg.tag_ref("app", "v1")).await;
    println!(
        "pullgate, tag reference, 1 authority: {} requests: {requests:?}",
        requests.len()
    );
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert_eq!(
        requests[0].0, "HEAD",
        "the tag is resolved without downloading the manifest"
    );

    // Four authorities in one policy plus a second policy: still one signature fetch.
    let mut pems = wrong.clone();
    pems.push(key.public_pem());
    let many = key_cip("many", &pems) + &key_cip("another", &[key.public_pem()]);
    let requests = count_verification(&reg, &many, &reg.tag_ref("app", "v1")).await;
    println!(
        "pullgate, 2 policies / 5 authorities: {} requests",
        requests.len()
    );
    assert_eq!(requests.len(), 3, "{requests:?}");

    // A digest reference needs no resolution.
    let requests = count_verification(&reg, &one, &reg.digest_ref("app", &digest)).await;
    assert_eq!(requests.len(), 2, "{requests:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn naive_sigstore_client_makes_more_requests() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-naive").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;

    let policy = key_cip("one", &[key.public_pem()]);
    let ours = count_verification(&reg, &policy, &reg.tag_ref("app", "v1"))
        .await
        .len();

    // The sigstore crate's documented flow, with a client built beforehand (as a daemon would).
    let mut client = reg.cosign_client(None);
    let auth = reg.sigstore_auth();
    let image = OciReference::with_tag(reg.addr(), "app".to_string(), "v1".to_string());
    let mark = reg.request_count().await;
    let layers = client
        .trusted_signature_layers(&auth, &image)
        .await
        .expect("signature layers");
    assert_eq!(layers.len(), 1);
    let theirs = reg.requests_since(mark).await.len();
    println!("registry requests per cold verification: pullgate {ours}, sigstore crate {theirs}");
    assert!(ours <= 4, "pullgate made {ours}");
    assert!(ours < theirs, "pullgate {ours} vs sigstore {theirs}");
}

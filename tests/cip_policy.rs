//! CIP-level `spec.policy`: rego over policy-controller's result document
//! (`authorityMatches`), evaluated once an authority passed, against the real local registry.

mod common;

use common::*;
use serde_json::Value;

fn cip(glob: &str, authorities: &str, policy: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: both-teams}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n{authorities}  policy:\n{policy}"
    )
}

fn key(name: &str, k: &TestKey) -> String {
    format!(
        "  - name: {name}\n    key: {{data: {}}}\n",
        serde_json::to_string(&k.public_pem()).unwrap()
    )
}

/// Requires a signature match from both authorities, as a CIP-level policy can.
const BOTH: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  count(input.authorityMatches["team-a"].signatures) > 0
  count(input.authorityMatches["team-b"].signatures) > 0
}
"#;

async fn verify(policy: &str, image: &str) -> (i32, Value) {
    let v = verify_json(&[("cip.yaml", policy)], image, &[]).await;
    (v.code, v.json)
}

#[tokio::test(flavor = "multi_thread")]
async fn cip_level_policy_sees_every_authority_match() {
    let reg = Registry::start().await;
    let (a, b) = (
        TestKey::generate(KeyKind::EcdsaP256),
        TestKey::generate(KeyKind::EcdsaP256),
    );
    let glob = format!("{}/**", reg.addr());
    let authorities = key("team-a", &a) + &key("team-b", &b);
    let policy = format!(
        "    type: rego\n    data: {}\n",
        serde_json::to_string(BOTH).unwrap()
    );
    let both = cip(&glob, &authorities, &policy);

    // One team signed: an authority passes, but the CIP-level policy wants both.
    let one = reg.push_image("one", "v1", "cip-policy-one").await;
    reg.sign("one", &one, &a).await;
    let (code, json) = verify(&both, &reg.tag_ref("one", "v1")).await;
    assert_eq!(
        (code, json["verdict"].as_str()),
        (1, Some("deny")),
        "{json}"
    );
    let reasons = json["reasons"].to_string();
    assert!(
        reasons.contains("both-teams: image")
            && reasons
                .contains("failed evaluating cip level policy: policy is not compliant for query"),
        "{reasons}"
    );
    assert!(!reasons.contains("policy is invalid"), "{reasons}");

    // Both signed: allowed.
    let two = reg.push_image("two", "v1", "cip-policy-two").await;
    reg.sign("two", &two, &a).await;
    reg.sign_append("two", &two, &b).await;
    let (code, json) = verify(&both, &reg.tag_ref("two", "v1")).await;
    assert_eq!(
        (code, json["verdict"].as_str()),
        (0, Some("allow")),
        "{json}"
    );

    // Neither: the authorities fail; the policy is not even asked.
    reg.push_image("none", "v1", "cip-policy-none").await;
    let (code, json) = verify(&both, &reg.tag_ref("none", "v1")).await;
    assert_eq!(code, 1, "{json}");
    assert!(
        json["reasons"].to_string().contains("no signatures found"),
        "{json}"
    );
    assert!(
        !json["reasons"].to_string().contains("cip level policy"),
        "{json}"
    );

    // A static pass still answers to the CIP-level policy (decided with no registry access).
    let static_pass = cip(
        &glob,
        "  - name: open\n    static: {action: pass}\n",
        &policy,
    );
    let (code, json) = verify(&static_pass, &reg.tag_ref("one", "v1")).await;
    assert_eq!(code, 1, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("failed evaluating cip level policy"),
        "{json}"
    );

    // With a static pass beside a key authority, the key authority is still checked, so the
    // policy sees both (the static one marked `static: true`).
    let mixed_policy = r#"package sigstore
default isCompliant = false
isCompliant {
  input.authorityMatches.open.static == true
  count(input.authorityMatches["team-a"].signatures) > 0
}
"#;
    let mixed = cip(
        &glob,
        &(String::from("  - name: open\n    static: {action: pass}\n") + &key("team-a", &a)),
        &format!(
            "    type: rego\n    data: {}\n",
            serde_json::to_string(mixed_policy).unwrap()
        ),
    );
    let (code, json) = verify(&mixed, &reg.tag_ref("one", "v1")).await;
    assert_eq!(
        (code, json["verdict"].as_str()),
        (0, Some("allow")),
        "{json}"
    );
    let (code, json) = verify(&mixed, &reg.tag_ref("none", "v1")).await;
    assert_eq!(code, 1, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("failed evaluating cip level policy"),
        "{json}"
    );

    // cue, and a configMapRef that does not exist: the CIP fails with the reason.
    let cue = cip(&glob, &authorities, "    type: cue\n    data: \"x: 1\"\n");
    let (code, json) = verify(&cue, &reg.tag_ref("two", "v1")).await;
    assert_eq!(code, 1, "{json}");
    assert!(
        json["reasons"].to_string().contains("cue policies are not supported by this version of pullgate (ClusterImagePolicy both-teams, spec.policy)"),
        "{json}"
    );
    let missing = cip(
        &glob,
        &authorities,
        "    type: rego\n    configMapRef: {name: absent, key: p.rego}\n",
    );
    let (code, json) = verify(&missing, &reg.tag_ref("two", "v1")).await;
    assert_eq!(code, 1, "{json}");
    assert!(
        json["reasons"]
            .to_string()
            .contains("ConfigMap cosign-system/absent not found"),
        "{json}"
    );
}

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

/// Every platform's config must carry the hardened label, and the amd64 one sets APP_MODE.
const HARDENED: &str = r#"package sigstore
default isCompliant = false
not_hardened[platform] {
  cfg := input.config[platform]
  not cfg.config.Labels["org.example.hardened"] == "true"
}
isCompliant {
  count(input.config) > 0
  count(not_hardened) == 0
  input.config["linux/amd64"].config.Env[_] == "APP_MODE=hardened"
}
"#;

/// An index: one config per platform, keyed as policy-controller keys them.
const TWO_PLATFORMS: &str = r#"package sigstore
default isCompliant = false
isCompliant {
  count(input.config) == 2
  input.config["linux/amd64"].architecture == "amd64"
  input.config["linux/arm64/v8"].config.Labels["org.example.hardened"] == "true"
}
"#;

fn rego(policy: &str, flags: &str) -> String {
    format!(
        "    type: rego\n    data: {}\n{flags}",
        serde_json::to_string(policy).unwrap()
    )
}

fn hardened(seed: &str, arch: &str, variant: Option<&str>) -> TestImage {
    TestImage::build_with_config(seed, |config| {
        config["architecture"] = arch.into();
        if let Some(v) = variant {
            config["variant"] = v.into();
        }
        config["config"]["Env"] = serde_json::json!(["PATH=/bin", "APP_MODE=hardened"]);
        config["config"]["Labels"] = serde_json::json!({"org.example.hardened": "true"});
    })
}

/// GETs of `repo`'s blob `digest` among the registry requests since `mark`.
async fn blob_gets(reg: &Registry, mark: usize, repo: &str, digest: &str) -> usize {
    let path = format!("/v2/{repo}/blobs/{digest}");
    reg.requests_since(mark)
        .await
        .iter()
        .filter(|(method, uri)| method == "GET" && *uri == path)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_config_file_gives_the_policy_each_platform_config() {
    let reg = Registry::start().await;
    let k = TestKey::generate(KeyKind::EcdsaP256);
    let authority = key("team-a", &k);
    let single = cip(
        &format!("{}/single/**", reg.addr()),
        &authority,
        &rego(HARDENED, "    fetchConfigFile: true\n"),
    );
    // A second CIP over the same images that also reads the config: still one fetch.
    let also = cip(
        &format!("{}/single/**", reg.addr()),
        &authority,
        &rego(
            "package sigstore\nisCompliant { input.config[\"linux/amd64\"].os == \"linux\" }\n",
            "    fetchConfigFile: true\n",
        ),
    )
    .replace("name: both-teams", "name: reads-config-too");
    let multi = cip(
        &format!("{}/multi/**", reg.addr()),
        &authority,
        &rego(TWO_PLATFORMS, "    fetchConfigFile: true\n"),
    )
    .replace("name: both-teams", "name: two-platforms");
    let files = [
        ("single.yaml", single.as_str()),
        ("also.yaml", also.as_str()),
        ("multi.yaml", multi.as_str()),
    ];

    // Hardened config: allowed; the config blob is fetched once for both CIPs.
    let good = hardened("cfg-good", "amd64", None);
    let digest = reg.push_test_image("single/good", "v1", &good).await;
    reg.sign("single/good", &digest, &k).await;
    let mark = reg.request_count().await;
    let v = verify_json(&files, &reg.tag_ref("single/good", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (0, "allow"), "{}", v.json);
    assert_eq!(
        blob_gets(&reg, mark, "single/good", &good.config_digest).await,
        1,
        "one config fetch per decision"
    );

    // The stock config (no label, no APP_MODE), signed by the same key: the policy denies.
    let plain = TestImage::build("cfg-plain");
    let digest = reg.push_test_image("single/plain", "v1", &plain).await;
    reg.sign("single/plain", &digest, &k).await;
    let v = verify_json(&files, &reg.tag_ref("single/plain", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    assert!(
        v.reasons().contains(
            "failed policy: both-teams: image {reg}/single/plain:v1@{digest} failed evaluating cip level policy: policy is not compliant"
                .replace("{reg}", &reg.addr())
                .replace("{digest}", &digest)
                .as_str()
        ),
        "{}",
        v.reasons()
    );
    // reads-config-too passed: only the CIP whose policy failed is named.
    assert!(!v.reasons().contains("reads-config-too"), "{}", v.reasons());

    // Unsigned: the authorities fail and the config is never fetched (as policy-controller).
    let unsigned = hardened("cfg-unsigned", "amd64", None);
    reg.push_test_image("single/unsigned", "v1", &unsigned)
        .await;
    let mark = reg.request_count().await;
    let v = verify_json(&files, &reg.tag_ref("single/unsigned", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    assert!(
        v.reasons().contains("no signatures found"),
        "{}",
        v.reasons()
    );
    assert_eq!(
        blob_gets(&reg, mark, "single/unsigned", &unsigned.config_digest).await,
        0
    );

    // An index: a config per platform, keyed os/arch[/variant].
    let amd = hardened("cfg-amd", "amd64", None);
    let arm = hardened("cfg-arm", "arm64", Some("v8"));
    let amd_digest = reg.push_test_image("multi/app", "amd", &amd).await;
    let arm_digest = reg.push_test_image("multi/app", "arm", &arm).await;
    let index = reg
        .push_index(
            "multi/app",
            "v1",
            &[(&amd_digest, "amd64"), (&arm_digest, "arm64")],
        )
        .await;
    reg.sign("multi/app", &index, &k).await;
    let v = verify_json(&files, &reg.tag_ref("multi/app", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (0, "allow"), "{}", v.json);
    // The same arm64 image without its label: the index is denied.
    let arm_plain = TestImage::build_with_config("cfg-arm-plain", |c| {
        c["architecture"] = "arm64".into();
        c["variant"] = "v8".into();
    });
    let arm_plain_digest = reg
        .push_test_image("multi/app", "arm-plain", &arm_plain)
        .await;
    let index = reg
        .push_index(
            "multi/app",
            "v2",
            &[(&amd_digest, "amd64"), (&arm_plain_digest, "arm64")],
        )
        .await;
    reg.sign("multi/app", &index, &k).await;
    let v = verify_json(&files, &reg.tag_ref("multi/app", "v2"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    assert!(
        v.reasons().contains("two-platforms: image")
            && v.reasons().contains("failed evaluating cip level policy"),
        "{}",
        v.reasons()
    );

    // A config the registry no longer has: the CIP fails with the reason (fail closed).
    let broken = hardened("cfg-broken", "amd64", None);
    let digest = reg.push_test_image("single/broken", "v1", &broken).await;
    reg.sign("single/broken", &digest, &k).await;
    reg.delete_blob("single/broken", &broken.config_digest)
        .await;
    let v = verify_json(&files, &reg.tag_ref("single/broken", "v1"), &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    let wanted = format!(
        "failed evaluating cip level policy: fetchConfigFile: cannot fetch the image config: \
         image config {}/single/broken@{}: not found in the registry",
        reg.addr(),
        broken.config_digest
    );
    assert!(v.reasons().contains(&wanted), "{}", v.reasons());

    // A static pass answers to a config policy too: the config is fetched for it.
    let open = cip(
        &format!("{}/single/**", reg.addr()),
        "  - name: open\n    static: {action: pass}\n",
        &rego(HARDENED, "    fetchConfigFile: true\n"),
    );
    let v = verify_json(
        &[("open.yaml", &open)],
        &reg.tag_ref("single/good", "v1"),
        &[],
    )
    .await;
    assert_eq!((v.code, v.verdict()), (0, "allow"), "{}", v.json);
    let v = verify_json(
        &[("open.yaml", &open)],
        &reg.tag_ref("single/plain", "v1"),
        &[],
    )
    .await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
}

/// `pullgate verify --object`: the workload a CIP-level policy reads with
/// includeSpec/includeObjectMeta/includeTypeMeta; without it such a policy fails, saying why.
#[tokio::test(flavor = "multi_thread")]
async fn verify_reads_the_object_given_with_object() {
    let reg = Registry::start().await;
    let k = TestKey::generate(KeyKind::EcdsaP256);
    let digest = reg.push_image("obj/app", "v1", "cip-object").await;
    reg.sign("obj/app", &digest, &k).await;
    let policy = cip(
        &format!("{}/obj/**", reg.addr()),
        &key("team-a", &k),
        &rego(
            "package sigstore\ndefault isCompliant = false\nisCompliant {\n  input.typemeta.kind == \"Pod\"\n  input.metadata.labels.team == \"payments\"\n  input.spec.serviceAccountName == \"builder\"\n}\n",
            "    includeSpec: true\n    includeObjectMeta: true\n    includeTypeMeta: true\n",
        ),
    );
    let pod = |sa: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: web, labels: {{team: payments}}}}\nspec:\n  serviceAccountName: {sa}\n  containers: [{{name: a, image: x}}]\n"
        )
    };
    let dir = write_policy_dir(&[
        ("builder.yaml", &pod("builder")),
        ("other.yaml", &pod("default")),
    ]);
    let object = |name: &str| dir.path().join(name).display().to_string();
    let image = reg.tag_ref("obj/app", "v1");
    let files = [("cip.yaml", policy.as_str())];

    let v = verify_json(&files, &image, &["--object", &object("builder.yaml")]).await;
    assert_eq!((v.code, v.verdict()), (0, "allow"), "{}", v.json);
    let v = verify_json(&files, &image, &["--object", &object("other.yaml")]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    assert!(
        v.reasons().contains("policy is not compliant"),
        "{}",
        v.reasons()
    );
    let v = verify_json(&files, &image, &[]).await;
    assert_eq!((v.code, v.verdict()), (1, "deny"), "{}", v.json);
    assert!(
        v.reasons().contains(
            "failed evaluating cip level policy: includeSpec: no Kubernetes object is known for this decision"
        ) && v.reasons().contains("--object"),
        "{}",
        v.reasons()
    );
}

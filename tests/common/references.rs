//! The reference table of `tests/fixtures/references.yaml`, filled in against a real registry
//! (see that file for its placeholders).

use super::Registry;

const NAMESPACE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {policy.sigstore.dev/include: \"true\"}}
";

/// One row of the table, placeholders replaced.
#[derive(Debug, Clone)]
pub struct ReferenceCase {
    pub name: String,
    /// The policy files' contents (the enforced namespace `demo` included).
    pub policies: String,
    pub image: String,
    /// `allow`, `deny` or `error`.
    pub verdict: String,
    pub reason: Option<String>,
}

/// Pushes the table's images to `reg` and returns its rows.
pub async fn reference_cases(reg: &Registry) -> Vec<ReferenceCase> {
    let app_digest = reg.push_image("org/app", "release-1", "refs-app").await;
    reg.push_image("org/other", "v1", "refs-other").await;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/references.yaml"
    );
    let text = std::fs::read_to_string(path).expect("references.yaml");
    let fill = |s: &str| {
        s.replace("REGISTRY", &reg.addr())
            .replace("APP_DIGEST", &app_digest)
    };
    let table: serde_yaml::Value = serde_yaml::from_str(&text).expect("references.yaml parses");
    let cases = table["cases"].as_sequence().expect("cases");
    assert!(cases.len() >= 8, "the table lost rows");
    cases
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().map(str::to_string);
            let set = field("policies").expect("policies");
            let policies = table["policy_sets"][set.as_str()]
                .as_str()
                .unwrap_or_else(|| panic!("unknown policy set {set}"));
            ReferenceCase {
                name: field("name").expect("name"),
                policies: format!("{NAMESPACE}---\n{}", fill(policies)),
                image: fill(&field("image").expect("image")),
                verdict: field("verdict").expect("verdict"),
                reason: field("reason").map(|r| fill(&r)),
            }
        })
        .collect()
}

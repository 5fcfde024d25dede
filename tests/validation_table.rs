//! Table-driven ClusterImagePolicy validation: `tests/fixtures/cip_validation.yaml`.

use pullgate::policy::load::Objects;
use pullgate::policy::snapshot::{Settings, Snapshot};

const P256: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE2G2Y+2tabdTV5BcGiBIx0a9fAFwr\nkBbmLSGtks4L3qX6yYY0zufBnhC8Ur/iy55GhWP/9A/bY2LhC30M9+RYtw==\n-----END PUBLIC KEY-----\n";

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    spec: serde_yaml::Value,
    #[serde(default)]
    config: Option<serde_yaml::Value>,
    problems: Vec<(String, String)>,
}

/// Replaces the `@P256@` placeholder with a real PEM public key, anywhere in the tree.
fn substitute(value: &mut serde_yaml::Value) {
    match value {
        serde_yaml::Value::String(s) if s == "@P256@" => *s = P256.to_string(),
        serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(substitute),
        serde_yaml::Value::Mapping(map) => map.iter_mut().for_each(|(_, v)| substitute(v)),
        _ => {}
    }
}

fn build(case: &Case) -> Snapshot {
    let mut spec = case.spec.clone();
    substitute(&mut spec);
    let mut doc = serde_yaml::Mapping::new();
    doc.insert("apiVersion".into(), "policy.sigstore.dev/v1beta1".into());
    doc.insert("kind".into(), "ClusterImagePolicy".into());
    doc.insert(
        "metadata".into(),
        serde_yaml::from_str("{name: case}").unwrap(),
    );
    doc.insert("spec".into(), spec);
    let cip = serde_yaml::to_string(&doc).unwrap();
    let mut objects = Objects::default();
    objects
        .load_str(&cip, &case.name)
        .unwrap_or_else(|e| panic!("{}: fixture does not load: {e:?}\n{cip}", case.name));
    if let Some(config) = &case.config {
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: config-policy-controller, namespace: cosign-system}}\ndata: {}\n",
            serde_json::to_string(config).unwrap()
        );
        objects.load_str(&cm, "config").unwrap();
    }
    Snapshot::build(&objects, Settings::default())
}

#[test]
fn validation_table() {
    let text = std::fs::read_to_string("tests/fixtures/cip_validation.yaml").unwrap();
    let cases: Vec<Case> = serde_yaml::from_str(&text).unwrap();
    assert!(cases.len() >= 30, "table shrank to {}", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let snapshot = build(case);
        let got: Vec<(String, String)> = snapshot
            .problems
            .iter()
            .map(|p| (p.problem.path.clone(), p.problem.message.clone()))
            .collect();
        let paths_got: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
        let paths_want: Vec<&str> = case.problems.iter().map(|(p, _)| p.as_str()).collect();
        if paths_got != paths_want {
            failures.push(format!(
                "{}: paths {paths_got:?}, want {paths_want:?} ({got:?})",
                case.name
            ));
            continue;
        }
        for ((_, msg), (_, want)) in got.iter().zip(&case.problems) {
            if !msg.contains(want.as_str()) {
                failures.push(format!("{}: message {msg:?} lacks {want:?}", case.name));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing case(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

//! Side by side with policy-controller's `policy-tester` (built by `tests/testbed/install.sh`):
//! every case of `tests/fixtures/parity.yaml` is decided by both engines on the same
//! ClusterImagePolicies and the same image in one loopback registry, with signatures made by the
//! real `cosign` (legacy `.sig` tags and v3 bundles, offline flags of `tests/cosign_real.rs`).
//!
//! Both must agree (allowed / denied / CIP refused), except pullgate's deliberate differences,
//! which the fixture names (`differs:`) together with each side's expected outcome. Per-decision
//! wall times of both engines (medians over the table, same run) are printed; `PARITY_DEBUG=1`
//! also prints each engine's reasons.
//!
//! policy-tester has no offline/TUF flag. Only key and static authorities are used (no Fulcio,
//! Rekor or TUF material is needed for them), and it runs with `HTTP(S)_PROXY` pointing at a closed
//! loopback port (loopback exempt), a throwaway `HOME`/`TUF_ROOT` and no Docker credentials, so
//! any attempt to reach the internet fails fast instead of leaving the machine.
//! Skipped loudly when `policy-tester` or `cosign` is missing and `CI` is unset; failing in CI.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::testbed::{testbed_binary, Cosign, COSIGN_OFFLINE_SIGN_FLAGS as OFFLINE};
use common::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    cips: Vec<String>,
    image: String,
    #[serde(default)]
    no_match_policy: Option<String>,
    #[serde(default)]
    expect: Option<Outcome>,
    #[serde(default)]
    differs: Option<String>,
    #[serde(default)]
    pullgate: Option<Outcome>,
    #[serde(default)]
    tester: Option<Outcome>,
    #[serde(default)]
    pullgate_verdict: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    pullgate_reason: Option<String>,
    #[serde(default)]
    tester_reason: Option<String>,
}

#[derive(serde::Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Outcome {
    /// Admitted (pullgate: exit 0, verdict allow or warn; tester: exit 0).
    Allow,
    /// Refused by policy (pullgate: exit 1, verdict deny; tester: exit 1 with JSON errors).
    Deny,
    /// The CIP set is refused by validation (pullgate: exit 2, nothing verified; tester: exit 1,
    /// `CIP is invalid`).
    Reject,
}

/// What one engine answered, and how long it took.
struct Answer {
    outcome: Result<Outcome, String>,
    verdict: String,
    detail: String,
    took: Duration,
}

/// Environment that keeps policy-tester on loopback: proxies on a closed port for everything but
/// loopback, no TUF cache, no credentials.
fn offline_env(home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("HOME", home.display().to_string()),
        ("TUF_ROOT", home.join(".sigstore").display().to_string()),
        ("DOCKER_CONFIG", home.join(".docker").display().to_string()),
        ("HTTPS_PROXY", "http://127.0.0.1:9".into()),
        ("HTTP_PROXY", "http://127.0.0.1:9".into()),
        ("https_proxy", "http://127.0.0.1:9".into()),
        ("http_proxy", "http://127.0.0.1:9".into()),
        ("NO_PROXY", "127.0.0.1,localhost".into()),
        ("no_proxy", "127.0.0.1,localhost".into()),
    ]
}

fn run_tester(bin: &Path, home: &Path, cip_file: &Path, image: &str) -> Answer {
    let mut cmd = Command::new(bin);
    cmd.args(["-log-level", "error", "-policy"])
        .arg(cip_file)
        .args(["-image", image])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        // The controller's namespace, which policy-controller reads from its pod's downward
        // API: `secretRef.namespace` validation compares against it (pullgate's default).
        .env("SYSTEM_NAMESPACE", "cosign-system");
    for (k, v) in offline_env(home) {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let took = start.elapsed();
    let detail = format!("{} {}", out.stdout.trim(), out.stderr.trim());
    let outcome = match out.code {
        0 => Ok(Outcome::Allow),
        1 if out.stderr.contains("CIP is invalid") => Ok(Outcome::Reject),
        1 if out.stdout.contains("\"errors\"") => Ok(Outcome::Deny),
        c => Err(format!("exit {c}")),
    };
    Answer {
        outcome,
        verdict: String::new(),
        detail,
        took,
    }
}

async fn run_pullgate_verify(dir: &Path, home: &Path, image: &str) -> Answer {
    let policy = dir.to_str().unwrap();
    let env = offline_env(home);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let start = Instant::now();
    let out = run_pullgate_async(
        &["verify", "--policy", policy, "--output", "json", image],
        &env,
    )
    .await;
    let took = start.elapsed();
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let verdict = json["verdict"].as_str().unwrap_or("<none>").to_string();
    let outcome = match (out.code, verdict.as_str()) {
        (0, "allow" | "warn") => Ok(Outcome::Allow),
        (1, "deny") => Ok(Outcome::Deny),
        (2, "<none>") if out.stderr.contains("nothing was verified") => Ok(Outcome::Reject),
        (c, v) => Err(format!("exit {c}, verdict {v}")),
    };
    Answer {
        outcome,
        verdict,
        detail: format!("{} {}", json["reasons"], out.stderr.trim()),
        took,
    }
}

fn wrap_cip(name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_tester_and_pullgate_agree_on_the_table() {
    let Some(tester) = testbed_binary("policy-tester") else {
        return;
    };
    let Some(cosign) = Cosign::find() else { return };
    let version = Command::new(&tester).arg("-version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    eprintln!(
        "policy-tester: {}; cosign: {}",
        version
            .lines()
            .find(|l| l.starts_with("GitVersion"))
            .unwrap_or("?"),
        cosign.version()
    );

    let text = std::fs::read_to_string("tests/fixtures/parity.yaml").expect("fixture");
    let cases: Vec<Case> =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parsing the fixture: {e}"));

    // One registry; app:v1 signed by the real cosign (legacy .sig), bundled:v1 with a v3 bundle,
    // the rest unsigned.
    let reg = Registry::start().await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = cosign.generate_key_pair(keys.path());
    let other_keys = tempfile::tempdir().unwrap();
    let (_, other_public) = cosign.generate_key_pair(other_keys.path());
    let app = reg.push_image("app", "v1", "parity-app").await;
    reg.push_image("unsigned", "v1", "parity-unsigned").await;
    reg.push_image("team/app", "v1", "parity-team-app").await;
    let mut sign = vec![
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--new-bundle-format=false",
    ];
    sign.extend_from_slice(OFFLINE);
    let app_ref = reg.digest_ref("app", &app);
    sign.push(&app_ref);
    cosign.ok(&sign);
    // bundled:v1: cosign v3's default format, a Sigstore bundle as an OCI 1.1 referrer.
    let bundled = reg.push_image("bundled", "v1", "parity-bundled").await;
    let bundled_ref = reg.digest_ref("bundled", &bundled);
    let mut sign = vec![
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--new-bundle-format=true",
    ];
    sign.extend_from_slice(OFFLINE);
    sign.push(&bundled_ref);
    cosign.ok(&sign);

    let pem = |p: &Path| serde_json::to_string(&std::fs::read_to_string(p).unwrap()).unwrap();
    let (key_pem, other_pem) = (pem(&public), pem(&other_public));
    let fill = |s: &str| {
        s.replace("{REG}", &reg.addr())
            .replace("{APP}", &app)
            .replace("{OTHER_KEY}", &other_pem)
            .replace("{KEY}", &key_pem)
    };
    let home = tempfile::tempdir().unwrap();

    let mut failures = Vec::new();
    let (mut agreed, mut differed) = (0, 0);
    let (mut t_pullgate, mut t_tester) = (Vec::new(), Vec::new());
    // Decisions that read signatures from the registry (key authorities, CIPs valid).
    let (mut k_pullgate, mut k_tester) = (Vec::new(), Vec::new());
    eprintln!(
        "\n{:<34} {:>8} {:>8} {:>9} {:>9}  note",
        "case", "pullgate", "tester", "pg ms", "tester ms"
    );
    for case in &cases {
        let cips: String = case
            .cips
            .iter()
            .enumerate()
            .map(|(i, spec)| wrap_cip(&format!("{}-{i}", case.name), &fill(spec)))
            .collect();
        let mut files = vec![("cip.yaml", cips.clone())];
        if let Some(nmp) = &case.no_match_policy {
            files.push((
                "config.yaml",
                format!(
                    "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: config-policy-controller, namespace: cosign-system}}\ndata: {{no-match-policy: {nmp}}}\n"
                ),
            ));
        }
        let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
        let dir = write_policy_dir(&files);
        let image = fill(&case.image);

        let pg = run_pullgate_verify(dir.path(), home.path(), &image).await;
        let tt = run_tester(&tester, home.path(), &dir.path().join("cip.yaml"), &image);

        let (want_pg, want_tt) = match (&case.expect, &case.differs) {
            (Some(e), None) => (*e, *e),
            (None, Some(_)) => (
                case.pullgate.expect("differs needs pullgate:"),
                case.tester.expect("differs needs tester:"),
            ),
            _ => panic!("{}: exactly one of expect/differs", case.name),
        };
        let keyed = case.cips.iter().any(|c| c.contains("key:"));
        t_pullgate.push(pg.took);
        t_tester.push(tt.took);
        if keyed && matches!(want_pg, Outcome::Allow | Outcome::Deny) {
            k_pullgate.push(pg.took);
            k_tester.push(tt.took);
        }
        let show = |o: &Result<Outcome, String>| match o {
            Ok(o) => format!("{o:?}").to_lowercase(),
            Err(e) => e.clone(),
        };
        eprintln!(
            "{:<34} {:>8} {:>8} {:>9.1} {:>9.1}  {}",
            case.name,
            show(&pg.outcome),
            show(&tt.outcome),
            pg.took.as_secs_f64() * 1e3,
            tt.took.as_secs_f64() * 1e3,
            if case.differs.is_some() {
                "differs (deliberate)"
            } else {
                ""
            }
        );
        if std::env::var_os("PARITY_DEBUG").is_some() {
            eprintln!("    pullgate: {}\n    tester:   {}", pg.detail, tt.detail);
        }
        let mut ok = true;
        if pg.outcome != Ok(want_pg) {
            ok = false;
            failures.push(format!(
                "{}: pullgate gave {:?}, want {want_pg:?}: {}",
                case.name, pg.outcome, pg.detail
            ));
        }
        if tt.outcome != Ok(want_tt) {
            ok = false;
            failures.push(format!(
                "{}: policy-tester gave {:?}, want {want_tt:?}: {}",
                case.name, tt.outcome, tt.detail
            ));
        }
        if let Some(v) = &case.pullgate_verdict {
            if &pg.verdict != v {
                ok = false;
                failures.push(format!(
                    "{}: pullgate verdict {}, want {v}: {}",
                    case.name, pg.verdict, pg.detail
                ));
            }
        }
        let reasons = [
            (
                "pullgate",
                &pg.detail,
                case.reason.iter().chain(&case.pullgate_reason),
            ),
            (
                "policy-tester",
                &tt.detail,
                case.reason.iter().chain(&case.tester_reason),
            ),
        ];
        for (engine, detail, wanted) in reasons {
            for want in wanted {
                let want = fill(want);
                if !detail.contains(&want) {
                    ok = false;
                    failures.push(format!(
                        "{}: {engine} did not say {want:?}: {detail}",
                        case.name
                    ));
                }
            }
        }
        if ok {
            if case.differs.is_some() {
                differed += 1;
            } else {
                agreed += 1;
            }
        }
    }
    let n = cases.len();
    eprintln!(
        "\n{n} cases: {agreed} agreements, {differed} deliberate differences; per-decision wall \
         time (median over the table, same run): pullgate verify {:.1} ms, policy-tester {:.1} ms \
         (each a fresh process; max {:.1} / {:.1} ms)",
        median(t_pullgate.clone()).as_secs_f64() * 1e3,
        median(t_tester.clone()).as_secs_f64() * 1e3,
        t_pullgate.iter().max().unwrap().as_secs_f64() * 1e3,
        t_tester.iter().max().unwrap().as_secs_f64() * 1e3,
    );
    eprintln!(
        "key-authority decisions only ({} cases, registry reads): pullgate {:.1} ms, policy-tester {:.1} ms",
        k_pullgate.len(),
        median(k_pullgate).as_secs_f64() * 1e3,
        median(k_tester).as_secs_f64() * 1e3,
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

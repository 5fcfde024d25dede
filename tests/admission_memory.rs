//! Peak memory of `pullgate admission` (the release binary, as deployed) under 3 MB reviews:
//! the shim is an endpoint any pod that reaches its Service can call, and its pods have a
//! 256 Mi limit with every webhook `failurePolicy: Fail`.
//!
//! Goals: peak RSS (`VmHWM` of `/proc/PID/status`) under 64 MiB for one 3 MB review on each
//! webhook path, and under 128 MiB with 8 (and with 32) concurrent 3 MB reviews, every one
//! answered 200 or 429 (counted) and the shim still serving afterwards.
//!
//! Needs the release binary: `cargo build --release --bin pullgate` (found in
//! `$CARGO_TARGET_DIR/release` or `target/release`; `PULLGATE_RELEASE_BIN` names another).
//! Without it the test says so and passes; a binary older than `src/` fails the test.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};

/// One review's size: 3 MB, just under the shim's 3 MiB limit.
const REVIEW_BYTES: usize = 3_000_000;
const ONE_REVIEW_LIMIT_KIB: u64 = 64 << 10;
const CONCURRENT_LIMIT_KIB: u64 = 128 << 10;

const POLICIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {policy.sigstore.dev/include: "true"}}
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: allow-acme}
spec:
  images: [{glob: "ghcr.io/acme/**"}]
  authorities: [{static: {action: pass}}]
"#;

/// The release binary, or `None` (with the reason printed) when there is none.
fn release_binary() -> Option<PathBuf> {
    let path = match std::env::var_os("PULLGATE_RELEASE_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
            target.join("release/pullgate")
        }
    };
    if !path.is_file() {
        // CI builds it first (.ci/run): there a missing binary is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "no release binary at {} under CI",
            path.display()
        );
        eprintln!(
            "SKIPPED: no release binary at {}; run `cargo build --release --bin pullgate` \
             (with the same CARGO_TARGET_DIR) first",
            path.display()
        );
        return None;
    }
    if std::env::var_os("PULLGATE_RELEASE_BIN").is_none() {
        let built = fs::metadata(&path).and_then(|m| m.modified()).unwrap();
        let newest = newest_source(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
        assert!(
            built >= newest,
            "{} is older than the sources in src/; rebuild it with \
             `cargo build --release --bin pullgate`",
            path.display()
        );
    }
    Some(path)
}

fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        let t = if meta.is_dir() {
            newest_source(&entry.path())
        } else {
            meta.modified().unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let config = dir.join("tls.cnf");
    fs::write(
        &config,
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n\
         [dn]\nCN = pullgate-admission\n\
         [ext]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n",
    )
    .unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-config"])
        .arg(&config)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.success(), "openssl req failed: {}", out.stderr);
    (cert, key)
}

/// A release `pullgate admission` on 127.0.0.1, killed on drop.
struct Shim {
    dir: tempfile::TempDir,
    child: Child,
    base: String,
    client: reqwest::Client,
}

impl Shim {
    async fn start(binary: &Path, policies: &Path, extra: &[&str]) -> Shim {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = make_cert(dir.path());
        let mut cmd = Command::new(binary);
        cmd.arg("admission")
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--listen", "127.0.0.1:0", "--no-audit-stdout"])
            .arg("--policy-dir")
            .arg(policies)
            .args(extra)
            .env("HOME", dir.path())
            .env("DOCKER_CONFIG", dir.path().join(".docker"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap());
        let child = cmd.spawn().expect("start pullgate admission");
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&fs::read(&cert).unwrap()).unwrap()])
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut shim = Shim {
            dir,
            child,
            base: String::new(),
            client,
        };
        const BANNER: &str = "pullgate: serving admission webhooks on ";
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                shim.child.try_wait().unwrap().is_none(),
                "exited: {}",
                shim.log()
            );
            if let Some(line) = shim.log().lines().find(|l| l.starts_with(BANNER)) {
                shim.base = line[BANNER.len()..].trim().to_string();
                let ready = shim
                    .client
                    .get(format!("{}/readyz", shim.base))
                    .send()
                    .await;
                if ready.is_ok_and(|r| r.status() == 200) {
                    return shim;
                }
            }
            assert!(Instant::now() < deadline, "not ready: {}", shim.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Peak resident set size so far, in KiB.
    fn peak_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in {status}"))
    }

    /// POSTs `body`; (status, response body).
    async fn post(&self, path: &str, body: Vec<u8>) -> (u16, String) {
        let r = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", self.log()));
        (r.status().as_u16(), r.text().await.unwrap())
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` map entries `"<prefix>0000001": ""`: the many-small-entries shape that costs a JSON
/// tree the most per byte.
fn small_entries(prefix: &str, n: usize) -> Value {
    let mut map = Map::new();
    for i in 0..n {
        map.insert(format!("{prefix}{i:07}"), json!(""));
    }
    Value::Object(map)
}

fn review(uid: &str, kind: Value, namespace: Option<&str>, object: Value) -> Value {
    let mut request = json!({"uid": uid, "kind": kind, "operation": "CREATE", "object": object});
    if let Some(ns) = namespace {
        request["namespace"] = json!(ns);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// `make(n)` grown (by its `n` small entries) to just under [`REVIEW_BYTES`].
fn sized(make: impl Fn(usize) -> Value) -> Vec<u8> {
    let per_entry = 14; // `"a0000001":"",`
    let base = serde_json::to_vec(&make(0)).unwrap().len();
    let body = serde_json::to_vec(&make((REVIEW_BYTES - base) / per_entry - 10)).unwrap();
    assert!(
        body.len() <= REVIEW_BYTES && body.len() > REVIEW_BYTES - 1000,
        "{}",
        body.len()
    );
    body
}

fn pod_review(uid: &str) -> Vec<u8> {
    sized(|n| {
        review(
            uid,
            json!({"group": "", "version": "v1", "kind": "Pod"}),
            Some("demo"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "big", "namespace": "demo", "annotations": small_entries("a", n)},
                   "spec": {"containers": [{"name": "app", "image": "ghcr.io/acme/app:v1"}]}}),
        )
    })
}

fn policy_review(uid: &str) -> Vec<u8> {
    sized(|n| {
        review(
            uid,
            json!({"group": "policy.sigstore.dev", "version": "v1beta1", "kind": "ClusterImagePolicy"}),
            None,
            json!({"apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
                   "metadata": {"name": "big", "annotations": small_entries("a", n)},
                   "spec": {"images": [{"glob": "ghcr.io/acme/**"}],
                            "authorities": [{"static": {"action": "pass"}}]}}),
        )
    })
}

/// A policy whose 3 MB are its spec: tens of thousands of globs, each compiled.
fn policy_globs_review(uid: &str) -> Vec<u8> {
    let glob_bytes = r#"{"glob":"ghcr.io/acme/app-0000001*"},"#.len();
    let make = |n: usize| {
        let images: Vec<Value> = (0..n)
            .map(|i| json!({"glob": format!("ghcr.io/acme/app-{i:07}*")}))
            .collect();
        review(
            uid,
            json!({"group": "policy.sigstore.dev", "version": "v1beta1", "kind": "ClusterImagePolicy"}),
            None,
            json!({"apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
                   "metadata": {"name": "globs"},
                   "spec": {"images": images, "authorities": [{"static": {"action": "pass"}}]}}),
        )
    };
    let base = serde_json::to_vec(&make(0)).unwrap().len();
    serde_json::to_vec(&make((REVIEW_BYTES - base) / glob_bytes - 10)).unwrap()
}

/// A policy whose 3 MB are its CIP-level rego (`spec.policy.data`): as many rules as fit.
fn policy_rego_review(uid: &str) -> Vec<u8> {
    let make = |n: usize| {
        let mut rego = String::from("package sigstore\ndefault isCompliant = true\n");
        for i in 0..n {
            rego.push_str(&format!("r{i:07} = true\n"));
        }
        review(
            uid,
            json!({"group": "policy.sigstore.dev", "version": "v1beta1", "kind": "ClusterImagePolicy"}),
            None,
            json!({"apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
                   "metadata": {"name": "rego"},
                   "spec": {"images": [{"glob": "ghcr.io/acme/**"}],
                            "authorities": [{"static": {"action": "pass"}}],
                            "policy": {"type": "rego", "data": rego}}}),
        )
    };
    let base = serde_json::to_vec(&make(0)).unwrap().len();
    serde_json::to_vec(&make(
        (REVIEW_BYTES - base) / r"r0000001 = true\n".len() - 10,
    ))
    .unwrap()
}

/// A policy whose 3 MB are authorities.
fn policy_authorities_review(uid: &str) -> Vec<u8> {
    let make = |n: usize| {
        let authorities: Vec<Value> = (0..n)
            .map(|_| json!({"static": {"action": "pass"}}))
            .collect();
        review(
            uid,
            json!({"group": "policy.sigstore.dev", "version": "v1beta1", "kind": "ClusterImagePolicy"}),
            None,
            json!({"apiVersion": "policy.sigstore.dev/v1beta1", "kind": "ClusterImagePolicy",
                   "metadata": {"name": "authorities"},
                   "spec": {"images": [{"glob": "ghcr.io/acme/**"}], "authorities": authorities}}),
        )
    };
    let base = serde_json::to_vec(&make(0)).unwrap().len();
    serde_json::to_vec(&make(
        (REVIEW_BYTES - base) / r#"{"static":{"action":"pass"}},"#.len() - 10,
    ))
    .unwrap()
}

fn namespace_review(uid: &str) -> Vec<u8> {
    sized(|n| {
        review(
            uid,
            json!({"group": "", "version": "v1", "kind": "Namespace"}),
            None,
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": "big", "labels": small_entries("l", n)}}),
        )
    })
}

/// Starts a fresh shim, sends one review, and returns (baseline KiB, peak KiB).
async fn one_review(
    binary: &Path,
    policies: &Path,
    extra: &[&str],
    path: &str,
    body: Vec<u8>,
) -> (u64, u64, String) {
    let shim = Shim::start(binary, policies, extra).await;
    let before = shim.peak_kib();
    let (status, text) = shim.post(path, body).await;
    assert_eq!(status, 200, "{path}: {text}\n{}", shim.log());
    let answer: Value = serde_json::from_str(&text).unwrap();
    let peak = shim.peak_kib();
    (before, peak, answer["response"]["allowed"].to_string())
}

/// Makes a 3 MB review with the given uid.
type MakeReview = fn(&str) -> Vec<u8>;

/// `n` concurrent reviews made by `make` on one shim; (baseline KiB, peak KiB, 200s, 429s).
async fn concurrent(
    binary: &Path,
    policies: &Path,
    n: usize,
    path: &str,
    make: MakeReview,
) -> (u64, u64, usize, usize) {
    let shim = Shim::start(binary, policies, &["--enforce-by-default"]).await;
    let before = shim.peak_kib();
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| make(&format!("c-{i}"))).collect();
    // One connection each, as many API server replicas (or attackers) would open.
    let answers = futures_util::future::join_all(bodies.into_iter().map(|body| {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(
                &fs::read(shim.dir.path().join("tls.crt")).unwrap(),
            )
            .unwrap()])
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let url = format!("{}{path}", shim.base);
        async move {
            let r = client.post(url).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }
    }))
    .await;
    let peak = shim.peak_kib();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let busy: Vec<&String> = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, t)| t)
        .collect();
    for (status, text) in &answers {
        assert!(
            *status == 200 || *status == 429,
            "unexpected {status}: {text}"
        );
    }
    for text in &busy {
        assert!(
            text.contains("retry later"),
            "429 without a reason: {text:?}"
        );
    }
    // Still serving once the burst is over.
    let (status, text) = shim.post(path, make("after")).await;
    assert_eq!(status, 200, "{text}\n{}", shim.log());
    (before, peak, ok, busy.len())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn peak_rss_under_3mb_reviews() {
    let Some(binary) = release_binary() else {
        return;
    };
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let mut figures = Vec::new();
    let mut over = Vec::new();
    let cases: [(&str, &str, &[&str], Vec<u8>); 6] = [
        ("pod", "/validate/workloads", &[], pod_review("one-pod")),
        (
            "policy",
            "/validate/policies",
            &[],
            policy_review("one-cip"),
        ),
        (
            "policy (globs)",
            "/validate/policies",
            &[],
            policy_globs_review("glob-cip"),
        ),
        (
            "policy (rego)",
            "/validate/policies",
            &[],
            policy_rego_review("rego-cip"),
        ),
        (
            "policy (authorities)",
            "/validate/policies",
            &[],
            policy_authorities_review("authorities-cip"),
        ),
        (
            "namespace",
            "/mutate/namespaces",
            &["--enforce-by-default"],
            namespace_review("one-ns"),
        ),
    ];
    for (name, path, extra, body) in cases {
        let (before, peak, allowed) = one_review(&binary, policies.path(), extra, path, body).await;
        let line = format!(
            "one 3 MB {name} review on {path}: peak RSS {} (idle {}), allowed={allowed}",
            mib(peak),
            mib(before)
        );
        if peak >= ONE_REVIEW_LIMIT_KIB {
            over.push(line.clone());
        }
        figures.push(line);
    }
    let bursts: [(usize, &str, &str, MakeReview); 5] = [
        (8, "pod", "/validate/workloads", pod_review),
        (32, "pod", "/validate/workloads", pod_review),
        (
            8,
            "policy (authorities)",
            "/validate/policies",
            policy_authorities_review,
        ),
        (
            8,
            "policy (globs)",
            "/validate/policies",
            policy_globs_review,
        ),
        (8, "namespace", "/mutate/namespaces", namespace_review),
    ];
    for (n, name, path, make) in bursts {
        let (before, peak, ok, busy) = concurrent(&binary, policies.path(), n, path, make).await;
        let line = format!(
            "{n} concurrent 3 MB {name} reviews on {path}: peak RSS {} (idle {}), {ok} answered 200, {busy} answered 429",
            mib(peak),
            mib(before)
        );
        if peak >= CONCURRENT_LIMIT_KIB {
            over.push(line.clone());
        }
        if n == 8 {
            // Within the default caps: every one is served, none refused.
            assert_eq!((ok, busy), (8, 0), "{line}");
        }
        figures.push(line);
    }
    eprintln!("{}", figures.join("\n"));
    assert!(
        over.is_empty(),
        "over the memory goal:\n{}",
        over.join("\n")
    );
}

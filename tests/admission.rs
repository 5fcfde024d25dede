//! `pullgate admission`: the real binary serving HTTPS, fed AdmissionReview fixtures from
//! `tests/fixtures/admission/` with a client that trusts only the test's self-signed
//! certificate. Exact `allowed`, `status.message`, `warnings`, `patch` and echoed `uid`.

mod common;
use common::*;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Static policies: no registry needed. `demo` is enforced, `open` is not.
const POLICIES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {policy.sigstore.dev/include: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: open}
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: allow-acme}
spec:
  images: [{glob: "ghcr.io/acme/allowed*"}]
  authorities: [{static: {action: pass}}]
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: deny-acme}
spec:
  images: [{glob: "ghcr.io/acme/denied*"}]
  authorities: [{static: {action: fail, message: "not this one"}}]
---
apiVersion: policy.sigstore.dev/v1beta1
kind: ClusterImagePolicy
metadata: {name: warn-acme}
spec:
  mode: warn
  images: [{glob: "ghcr.io/acme/warned*"}]
  authorities: [{static: {action: fail}}]
"#;

const NO_MATCH_WARN: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: config-policy-controller, namespace: cosign-system}
data: {no-match-policy: warn}
"#;

/// A self-signed serving certificate for 127.0.0.1 (not a CA, so webpki accepts it as the
/// server's own certificate), made with the openssl CLI.
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let config = dir.join(format!("{name}.cnf"));
    fs::write(
        &config,
        "[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n\
         [dn]\nCN = pullgate-admission\n\
         [ext]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n",
    )
    .unwrap();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
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

/// A client that trusts only the certificate at `server_cert` and presents `identity`, if any.
fn https_client(server_cert: &Path, identity: Option<&[u8]>) -> reqwest::Client {
    let pem = fs::read(server_cert).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .timeout(Duration::from_secs(30));
    if let Some(identity) = identity {
        builder = builder.identity(reqwest::Identity::from_pem(identity).unwrap());
    }
    builder.build().unwrap()
}

/// A CA certificate and key (openssl CLI).
fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name}"))
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.success(), "openssl req (CA) failed: {}", out.stderr);
    (cert, key)
}

/// A client certificate for `name` issued by the CA `(ca, ca_key)`: certificate and key PEM.
fn make_client_cert(dir: &Path, name: &str, ca: &Path, ca_key: &Path) -> Vec<u8> {
    let (key, csr, cert, ext) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.ext")),
    );
    fs::write(
        &ext,
        "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    let mut cmd = Command::new("openssl");
    cmd.args(["req", "-new", "-newkey", "ec", "-pkeyopt"])
        .arg("ec_paramgen_curve:prime256v1")
        .args(["-nodes", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(out.success(), "openssl req (client) failed: {}", out.stderr);
    let mut cmd = Command::new("openssl");
    cmd.args(["x509", "-req", "-days", "2", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca)
        .arg("-CAkey")
        .arg(ca_key)
        .args(["-set_serial", "7", "-extfile"])
        .arg(&ext)
        .arg("-out")
        .arg(&cert);
    let out = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        out.success(),
        "openssl x509 (client) failed: {}",
        out.stderr
    );
    let mut pem = fs::read(&cert).unwrap();
    pem.extend(fs::read(&key).unwrap());
    pem
}

/// A `pullgate admission` child process on 127.0.0.1 (a port the kernel picks), killed on drop.
struct Admission {
    dir: tempfile::TempDir,
    child: Option<Child>,
    base: String,
    client: reqwest::Client,
}

impl Admission {
    async fn start(policy_dir: &Path, extra: &[&str]) -> Admission {
        Admission::start_with(policy_dir, extra, None).await
    }

    /// Like [`Admission::start`], with a client that presents `identity` (PEM certificate and
    /// key) to the shim.
    async fn start_with(policy_dir: &Path, extra: &[&str], identity: Option<&[u8]>) -> Admission {
        let dir = tempfile::Builder::new()
            .prefix("pullgate-admission-")
            .tempdir()
            .unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        let (cert, key) = make_cert(dir.path(), "tls");
        let mut args: Vec<String> = vec![
            "admission".into(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--policy-dir".into(),
            policy_dir.display().to_string(),
            "--audit-log".into(),
            dir.path().join("audit.log").display().to_string(),
            "--no-audit-stdout".into(),
            "--node-name".into(),
            "shim-0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = pullgate_command(&dir.path().join("home"), &argv, &[]);
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(dir.path().join("stdout.log")).unwrap())
            .stderr(fs::File::create(dir.path().join("stderr.log")).unwrap());
        let child = cmd.spawn().expect("start pullgate admission");
        let client = https_client(&cert, identity);
        let mut shim = Admission {
            dir,
            child: Some(child),
            base: String::new(),
            client,
        };
        shim.wait_ready().await;
        shim
    }

    fn log(&self) -> String {
        let out = fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default();
        let err = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        format!("{out}{err}")
    }

    async fn wait_ready(&mut self) {
        const BANNER: &str = "pullgate: serving admission webhooks on ";
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                panic!("pullgate admission exited with {status}\n{}", self.log());
            }
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.starts_with(BANNER)) {
                self.base = line[BANNER.len()..].trim().to_string();
                if let Ok(r) = self.get("/readyz").await {
                    if r.0 == 200 {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "pullgate admission not ready within {READY_TIMEOUT:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get(&self, path: &str) -> reqwest::Result<(u16, String)> {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// POSTs raw bytes; (status, body).
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

    /// POSTs a review and returns its `response`, checking the envelope and the echoed uid.
    async fn review(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self.post(path, serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, 200, "{body}\n{}", self.log());
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
        assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
        assert_eq!(
            answer["response"]["uid"], review["request"]["uid"],
            "{answer}"
        );
        answer["response"].clone()
    }

    fn audit_records(&self) -> Vec<Value> {
        fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    serde_json::from_str(&fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts a denial with exactly `message` and no warnings.
fn assert_denied(response: &Value, message: &str) {
    assert_eq!(response["allowed"], false, "{response}");
    assert_eq!(response["status"]["message"], message, "{response}");
    assert_eq!(response["status"]["code"], 403, "{response}");
    assert!(response.get("warnings").is_none(), "{response}");
    assert!(response.get("patch").is_none(), "{response}");
}

/// Asserts an allow with exactly `warnings` and no patch.
fn assert_allowed(response: &Value, warnings: &[&str]) {
    assert_eq!(response["allowed"], true, "{response}");
    assert!(response.get("status").is_none(), "{response}");
    assert!(response.get("patch").is_none(), "{response}");
    let got: Vec<&str> = response
        .get("warnings")
        .and_then(Value::as_array)
        .map(|w| w.iter().map(|s| s.as_str().unwrap()).collect())
        .unwrap_or_default();
    assert_eq!(got, warnings, "{response}");
}

/// The decoded JSONPatch of a response.
fn patch_of(response: &Value) -> Option<Value> {
    let patch = response.get("patch")?.as_str().unwrap();
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn workload_fixtures_get_policy_controller_messages() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let shim = Admission::start(policies.path(), &[]).await;

    // Pod: a static failure, a passing init container, an image no policy covers.
    let r = shim
        .review("/validate/workloads", &fixture("pod.json"))
        .await;
    assert_denied(
        &r,
        "validation failed: failed policy: deny-acme: spec.containers[0].image\n\
         ghcr.io/acme/denied:v1 disallowed by static policy: not this one\n\
         no matching policies: spec.containers[1].image\n\
         quay.io/other/app:v1",
    );

    // Deployment: a warn-mode failure is allowed with a warning.
    let r = shim
        .review("/validate/workloads", &fixture("deployment.json"))
        .await;
    assert_allowed(
        &r,
        &[
            "failed policy: warn-acme: spec.template.spec.containers[0].image\n\
           ghcr.io/acme/warned:v1 disallowed by static policy",
        ],
    );

    // CronJob (an UPDATE): one image in two containers is one problem at two paths.
    let r = shim
        .review("/validate/workloads", &fixture("cronjob.json"))
        .await;
    assert_denied(
        &r,
        "validation failed: failed policy: deny-acme: \
         spec.jobTemplate.spec.template.spec.containers[0].image, \
         spec.jobTemplate.spec.template.spec.containers[1].image\n\
         ghcr.io/acme/denied:v2 disallowed by static policy: not this one",
    );

    // `kubectl debug`: the ephemeral container is checked too.
    let r = shim
        .review("/validate/workloads", &fixture("pod-ephemeral.json"))
        .await;
    assert_denied(
        &r,
        "validation failed: no matching policies: spec.ephemeralContainers[0].image\nbusybox:1.36",
    );

    // StatefulSet in a namespace that is not enforced: allowed, whatever the image.
    let statefulset = fixture("statefulset.json");
    let r = shim.review("/validate/workloads", &statefulset).await;
    assert_allowed(&r, &[]);
    // The same StatefulSet in the enforced namespace is denied.
    let mut enforced = statefulset.clone();
    enforced["request"]["namespace"] = json!("demo");
    enforced["request"]["uid"] = json!("statefulset-in-demo");
    let r = shim.review("/validate/workloads", &enforced).await;
    assert_denied(
        &r,
        "validation failed: failed policy: deny-acme: spec.template.spec.containers[0].image\n\
         ghcr.io/acme/denied:v1 disallowed by static policy: not this one",
    );

    // DELETE, and kinds that run no containers, are allowed without a look.
    let mut delete = fixture("pod.json");
    delete["request"]["operation"] = json!("DELETE");
    assert_allowed(&shim.review("/validate/workloads", &delete).await, &[]);
    let mut config_map = fixture("pod.json");
    config_map["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "ConfigMap"});
    assert_allowed(&shim.review("/validate/workloads", &config_map).await, &[]);

    // One audit line per image decided, source admission.
    let records = shim.audit_records();
    let pod_lines: Vec<&Value> = records.iter().filter(|r| r["pod"] == "web").collect();
    assert_eq!(pod_lines.len(), 5, "{records:#?}"); // pod.json: 3 images; ephemeral: 2
    let denied = records
        .iter()
        .find(|r| r["image"] == "ghcr.io/acme/denied:v1" && r["namespace"] == "demo")
        .unwrap();
    assert_eq!(denied["source"], "admission");
    assert_eq!(denied["node"], "shim-0");
    assert_eq!(denied["verdict"], "deny");
    assert_eq!(denied["policies"], json!(["deny-acme"]));
    let cron: Vec<&Value> = records
        .iter()
        .filter(|r| r["pod"] == "CronJob/nightly")
        .collect();
    assert_eq!(
        cron.len(),
        1,
        "one line for the image shared by two containers"
    );
    let open = records.iter().find(|r| r["namespace"] == "open").unwrap();
    assert_eq!(open["verdict"], "allow");
    assert_eq!(open["enforced"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_match_warn_and_could_not_decide() {
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let unreachable = format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\n\
         metadata: {{name: gone-registry}}\nspec:\n  images: [{{glob: \"127.0.0.1:1/**\"}}]\n\
         \x20 authorities: [{{key: {{data: {:?}}}}}]\n",
        key.public_pem()
    );
    let policies = write_policy_dir(&[
        ("policies.yaml", POLICIES),
        ("config.yaml", NO_MATCH_WARN),
        ("unreachable.yaml", &unreachable),
    ]);
    let shim = Admission::start(policies.path(), &["--registry-timeout", "2"]).await;

    let r = shim
        .review("/validate/workloads", &fixture("pod-ephemeral.json"))
        .await;
    assert_allowed(
        &r,
        &["no matching policies: spec.ephemeralContainers[0].image\nbusybox:1.36"],
    );

    // A registry that cannot be reached: denied with the reason (fail closed).
    let mut pod = fixture("pod.json");
    pod["request"]["object"]["spec"] =
        json!({"containers": [{"name": "a", "image": "127.0.0.1:1/app:v1"}]});
    let r = shim.review("/validate/workloads", &pod).await;
    assert_eq!(r["allowed"], false, "{r}");
    let message = r["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "validation failed: could not decide: spec.containers[0].image\n\
             127.0.0.1:1/app:v1 could not verify 127.0.0.1:1/app:v1: "
        ),
        "{message}"
    );
    assert_eq!(message.lines().count(), 2, "{message}");

    // An image reference that does not parse.
    pod["request"]["object"]["spec"] =
        json!({"containers": [{"name": "a", "image": "ghcr.io/Acme/App:v1"}]});
    let r = shim.review("/validate/workloads", &pod).await;
    assert_denied(
        &r,
        "validation failed: invalid image reference \"ghcr.io/Acme/App:v1\": repository name \
         must be lowercase: spec.containers[0].image\nghcr.io/Acme/App:v1",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_image_allowed_unsigned_denied_via_real_registry() {
    let reg = Registry::start().await;
    let signed = reg.push_image("app", "v1", "seed-signed").await;
    let unsigned = reg.push_image("unsigned", "v1", "seed-unsigned").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &signed, &key).await;
    let cip = format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\n\
         metadata: {{name: signed-only}}\nspec:\n  images: [{{glob: \"{}/**\"}}]\n\
         \x20 authorities: [{{key: {{data: {:?}}}}}]\n",
        reg.addr(),
        key.public_pem()
    );
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {policy.sigstore.dev/include: \"true\"}}\n";
    let policies = write_policy_dir(&[("cip.yaml", &cip), ("ns.yaml", ns)]);
    let shim = Admission::start(policies.path(), &[]).await;

    let signed_ref = reg.tag_ref("app", "v1");
    let unsigned_ref = reg.tag_ref("unsigned", "v1");
    let mut pod = fixture("pod.json");
    pod["request"]["object"]["spec"] =
        json!({"containers": [{"name": "app", "image": signed_ref}]});
    assert_allowed(&shim.review("/validate/workloads", &pod).await, &[]);

    pod["request"]["uid"] = json!("unsigned-pod");
    pod["request"]["object"]["spec"] = json!({"containers": [
        {"name": "app", "image": signed_ref},
        {"name": "other", "image": unsigned_ref}]});
    let r = shim.review("/validate/workloads", &pod).await;
    assert_denied(
        &r,
        &format!(
            "validation failed: failed policy: signed-only: spec.containers[1].image\n\
             {unsigned_ref} signature key validation failed for authority authority-0 for \
             {}/unsigned@<digest withheld>: no signatures found",
            reg.addr()
        ),
    );

    let records = shim.audit_records();
    let allowed = records
        .iter()
        .find(|r| r["verdict"] == "allow")
        .expect("an allow line");
    assert_eq!(allowed["source"], "admission");
    assert_eq!(allowed["digest"], signed.as_str());
    assert_eq!(allowed["authorities"][0]["passed"], true);
    // The second review of the signed image reuses the verdict (same digest, same policies).
    let signed_lines: Vec<&Value> = records
        .iter()
        .filter(|r| r["digest"] == signed.as_str())
        .collect();
    assert_eq!(signed_lines.len(), 2, "{records:#?}");
    assert_eq!(signed_lines[1]["cache_hit"], true);
    let denied = records.iter().find(|r| r["verdict"] == "deny").unwrap();
    assert_eq!(denied["digest"], unsigned.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_fixtures_are_validated_at_apply_time() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let shim = Admission::start(policies.path(), &[]).await;

    let r = shim
        .review("/validate/policies", &fixture("cip-valid.json"))
        .await;
    assert_allowed(&r, &[]);

    let r = shim
        .review("/validate/policies", &fixture("cip-invalid.json"))
        .await;
    assert_denied(
        &r,
        "validation failed: spec.images[1].glob: glob \"ghcr.io/acme/{a,b}\" has invalid \
         character '{'; allowed: letters, digits and - _ : / * . @\n\
         spec.authorities[0].key.data: not a PEM public key: unsupported or malformed public \
         key: not an ECDSA P-256/P-384, RSA or Ed25519 SubjectPublicKeyInfo\n\
         spec.authorities[0].key.hashAlgorithm: unknown hash algorithm \"md5\": \
         expected sha224, sha256, sha384 or sha512\n\
         spec.authorities[1].static.action: invalid value \"maybe\": expected \"pass\" or \"fail\"\n\
         spec.mode: invalid value \"audit\": expected \"enforce\" or \"warn\"",
    );

    // A misspelt field is refused with its path (strict, as `pullgate validate`).
    let mut typo = fixture("cip-valid.json");
    typo["request"]["object"]["spec"]["authorities"][0] = json!({"statik": {"action": "pass"}});
    let r = shim.review("/validate/policies", &typo).await;
    let message = r["status"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "validation failed: spec.authorities[0].statik: unknown field `statik`, expected one of"
        ),
        "{message}"
    );
    assert_eq!(r["allowed"], false);

    // Deleting a policy, even a broken one, is never blocked.
    let mut delete = fixture("cip-invalid.json");
    delete["request"]["operation"] = json!("DELETE");
    assert_allowed(&shim.review("/validate/policies", &delete).await, &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_fixture_is_marked_when_enforcing_by_default() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let shim = Admission::start(
        policies.path(),
        &[
            "--enforce-by-default",
            "--exempt-namespace",
            "kube-system",
            "--exempt-namespace",
            "monitoring",
        ],
    )
    .await;
    let namespace = fixture("namespace.json");

    let r = shim.review("/mutate/namespaces", &namespace).await;
    assert_eq!(r["allowed"], true, "{r}");
    assert_eq!(
        patch_of(&r),
        Some(json!([{"op": "add", "path": "/metadata/labels",
                     "value": {"policy.sigstore.dev/include": "true"}}]))
    );

    let mut labelled = namespace.clone();
    labelled["request"]["object"]["metadata"]["labels"] = json!({"team": "a"});
    let r = shim.review("/mutate/namespaces", &labelled).await;
    assert_eq!(
        patch_of(&r),
        Some(
            json!([{"op": "add", "path": "/metadata/labels/policy.sigstore.dev~1include",
                     "value": "true"}])
        )
    );

    // Excluded by label, exempt by flag, or already decided: left alone.
    let mut excluded = namespace.clone();
    excluded["request"]["object"]["metadata"]["labels"] =
        json!({"policy.sigstore.dev/exclude": "true"});
    let mut exempt = namespace.clone();
    exempt["request"]["object"]["metadata"]["name"] = json!("monitoring");
    let mut chosen = namespace.clone();
    chosen["request"]["object"]["metadata"]["labels"] =
        json!({"policy.sigstore.dev/include": "false"});
    let mut update = namespace.clone();
    update["request"]["operation"] = json!("UPDATE");
    for review in [excluded, exempt, chosen, update] {
        let r = shim.review("/mutate/namespaces", &review).await;
        assert_allowed(&r, &[]);
        assert!(r.get("patchType").is_none(), "{r}");
    }

    // Without --enforce-by-default nothing is marked.
    let plain = Admission::start(policies.path(), &[]).await;
    let r = plain.review("/mutate/namespaces", &namespace).await;
    assert_allowed(&r, &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_400_and_the_server_keeps_serving() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let shim = Admission::start(policies.path(), &[]).await;
    let limit = 3 << 20;

    let mut oversized =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","pad":""#.to_vec();
    oversized.resize(limit + 1, b'a');
    let mut wrong_version = fixture("pod.json");
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_uid = fixture("pod.json");
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    let mut no_request = fixture("pod.json");
    no_request.as_object_mut().unwrap().remove("request");

    let cases: Vec<(Vec<u8>, String)> = vec![
        (
            oversized,
            format!("request body is larger than {limit} bytes"),
        ),
        (
            b"this is not json".to_vec(),
            "request body is not JSON: expected ident at line 1 column 2".into(),
        ),
        (
            Vec::new(),
            "request body is not JSON: EOF while parsing a value at line 1 column 0".into(),
        ),
        (
            serde_json::to_vec(&wrong_version).unwrap(),
            "not an AdmissionReview admission.k8s.io/v1: got apiVersion \
             \"admission.k8s.io/v1beta1\", kind \"AdmissionReview\""
                .into(),
        ),
        (
            serde_json::to_vec(&no_uid).unwrap(),
            "AdmissionReview request has no uid".into(),
        ),
        (
            serde_json::to_vec(&no_request).unwrap(),
            "AdmissionReview has no request".into(),
        ),
    ];
    for path in [
        "/validate/workloads",
        "/validate/policies",
        "/mutate/namespaces",
    ] {
        for (body, reason) in &cases {
            let (status, text) = shim.post(path, body.clone()).await;
            assert_eq!(
                (status, text.as_str()),
                (400, format!("{reason}\n").as_str()),
                "{path}"
            );
        }
    }

    // A body streamed without Content-Length is cut off at the same limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![b' '; 1 << 20])).collect();
    let r = shim
        .client
        .post(format!("{}/validate/workloads", shim.base))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(
        r.text().await.unwrap(),
        format!("request body is larger than {limit} bytes\n")
    );

    let (status, text) = shim.post("/validate/nothing", b"{}".to_vec()).await;
    assert_eq!(status, 404, "{text}");
    let r = shim
        .client
        .get(format!("{}/validate/workloads", shim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "POST");

    // Still serving, and still deciding.
    assert_eq!(shim.get("/livez").await.unwrap(), (200, "ok\n".into()));
    let (status, ready) = shim.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "{ready}");
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        (&ready["fresh"], &ready["policies"]),
        (&Value::Bool(true), &json!(3))
    );
    let r = shim
        .review("/validate/workloads", &fixture("pod-ephemeral.json"))
        .await;
    assert_eq!(r["allowed"], false);
    assert!(
        shim.audit_records().len() == 2,
        "bad input writes no audit line"
    );
    let (status, metrics) = shim.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "pullgate_decisions_total{source=\"admission\",verdict=\"deny\",cache=\"miss\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http1_clients_and_certificate_rotation() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let mut shim = Admission::start(policies.path(), &["--reload-interval-ms", "100"]).await;

    // The API server may speak HTTP/1.1: same answers.
    let pem = fs::read(shim.dir.path().join("tls.crt")).unwrap();
    let http1 = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .http1_only()
        .build()
        .unwrap();
    let r = http1
        .post(format!("{}/validate/workloads", shim.base))
        .body(serde_json::to_vec(&fixture("pod-ephemeral.json")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    let r = http1
        .post(format!("{}/validate/workloads", shim.base))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    // A rotated certificate (as a renewed Secret volume) is served without a restart.
    let (next_cert, next_key) = make_cert(shim.dir.path(), "next");
    fs::copy(&next_key, shim.dir.path().join("tls.key")).unwrap();
    fs::copy(&next_cert, shim.dir.path().join("tls.crt")).unwrap();
    let next_pem = fs::read(&next_cert).unwrap();
    shim.client = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&next_pem).unwrap()])
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while shim.get("/readyz").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "new certificate not served\n{}",
            shim.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = shim
        .review("/validate/workloads", &fixture("pod.json"))
        .await;
    assert_eq!(r["allowed"], false);

    // SIGTERM: a clean stop.
    let mut child = shim.child.take().unwrap();
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("pullgate admission ignored SIGTERM\n{}", shim.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}\n{}", shim.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_errors_are_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = make_cert(dir.path(), "a");
    let (_, other_key) = make_cert(dir.path(), "b");
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let p = policies.path().to_str().unwrap();
    let out = run_pullgate_async(
        &[
            "admission",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            other_key.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--policy-dir",
            p,
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.starts_with("pullgate: TLS key ")
            && out.stderr.contains("does not belong to certificate"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);

    let out = run_pullgate_async(
        &[
            "admission",
            "--tls-cert",
            "/nonexistent.crt",
            "--tls-key",
            "/nonexistent.key",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .starts_with("pullgate: TLS certificate /nonexistent.crt: "),
        "{}",
        out.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(dir.path(), "localhost");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let out = run_pullgate_async(
        &[
            "admission",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr
            .starts_with("pullgate: kubeconfig /nonexistent/kubeconfig: "),
        "{}",
        out.stderr
    );

    // Outside a pod there is no service account: a clear error, not a shim that allows.
    let out = run_pullgate_async(
        &[
            "admission",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--in-cluster",
        ],
        &[
            ("KUBERNETES_SERVICE_HOST", ""),
            ("KUBERNETES_SERVICE_PORT", ""),
        ],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains("in-cluster service account"),
        "{}",
        out.stderr
    );
}

/// Cluster mode: policies and namespaces from the (fake) API server, and a private registry
/// reached with the pod's `imagePullSecrets`, read from its namespace at review time.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_mode_reads_policies_and_pull_secrets_from_the_api_server() {
    use common::fake_api::{namespace, FakeApi, CIPS, NAMESPACES};
    const DEMO_SECRETS: &str = "/api/v1/namespaces/demo/secrets";

    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let signed = reg.push_image("private", "v1", "pull-secret-signed").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &signed, &key).await;

    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(
        CIPS,
        json!({"metadata": {"name": "private-signed"},
               "spec": {"images": [{"glob": format!("{}/private*", reg.addr())}],
                        "authorities": [{"key": {"data": key.public_pem()}}]}}),
    );
    fake.add_collection(DEMO_SECRETS, "v1", "Secret");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({"auths": {reg.addr(): {
        "auth": b64(&format!("{TEST_USER}:{TEST_PASSWORD}"))}}});
    fake.apply(
        DEMO_SECRETS,
        json!({"metadata": {"name": "regcred", "namespace": "demo"},
               "type": "kubernetes.io/dockerconfigjson",
               "data": {".dockerconfigjson": b64(&config.to_string())}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.kubeconfig(dir.path()).display().to_string();
    let unused = dir.path().join("no-policies");
    // Ready (200 on /readyz) only once synced with the API server.
    let shim = Admission::start(&unused, &["--kubeconfig", &kubeconfig]).await;
    let (_, ready) = shim.get("/readyz").await.unwrap();
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        (&ready["fresh"], &ready["policies"]),
        (&json!(true), &json!(1))
    );

    let image = reg.tag_ref("private", "v1");
    let mut pod = fixture("pod.json");
    pod["request"]["namespace"] = json!("demo");
    pod["request"]["object"]["metadata"]["namespace"] = json!("demo");
    pod["request"]["object"]["spec"] = json!({
        "imagePullSecrets": [{"name": "missing"}, {"name": "regcred"}],
        "containers": [{"name": "app", "image": image}]});
    assert_allowed(&shim.review("/validate/workloads", &pod).await, &[]);

    // Without the pull secret the registry refuses: could not decide, so denied.
    pod["request"]["uid"] = json!("no-secret");
    pod["request"]["object"]["spec"] = json!({"containers": [{"name": "app", "image": image}]});
    let r = shim.review("/validate/workloads", &pod).await;
    assert_eq!(r["allowed"], false, "{r}");
    let message = r["status"]["message"].as_str().unwrap();
    assert!(message.contains("could not verify"), "{message}");
    assert!(
        message.contains("requires a username and password"),
        "{message}"
    );

    // The API server sends a workload review only for namespaces the webhook's
    // namespaceSelector matched on their labels as they are now: the shim enforces them
    // whatever its own (lagging) view says — one it has never seen, one it knows unlabelled.
    fake.apply(NAMESPACES, namespace("lagging", false));
    for ns in ["never-seen", "lagging"] {
        pod["request"]["uid"] = json!(format!("selected-{ns}"));
        pod["request"]["namespace"] = json!(ns);
        pod["request"]["object"]["metadata"]["namespace"] = json!(ns);
        pod["request"]["object"]["spec"] =
            json!({"containers": [{"name": "app", "image": "quay.io/other/app:v1"}]});
        let r = shim.review("/validate/workloads", &pod).await;
        assert_eq!(r["allowed"], false, "{ns}: {r}");
        let message = r["status"]["message"].as_str().unwrap();
        assert!(message.contains("no matching policies"), "{ns}: {message}");
    }
}

/// `source.signaturePullSecrets`: signatures kept in a private registry, read with a Secret of
/// the workload's namespace (cluster mode).
#[tokio::test(flavor = "multi_thread")]
async fn signature_pull_secrets_open_a_private_signature_repository() {
    use common::fake_api::{namespace, FakeApi, CIPS, NAMESPACES};
    const DEMO_SECRETS: &str = "/api/v1/namespaces/demo/secrets";

    let public = Registry::start().await;
    let private = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let digest = public
        .push_image("app", "v1", "signature-pull-secrets")
        .await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let layer = cosign_sign_layer(&public.repo_ref("app"), &digest, &key);
    private
        .push_signature_layers("sigs", &signature_tag(&digest), &[layer], false)
        .await;

    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    let authority = |secrets: serde_json::Value| {
        json!({"metadata": {"name": "private-signatures"},
               "spec": {"images": [{"glob": format!("{}/**", public.addr())}],
                        "authorities": [{"key": {"data": key.public_pem()},
                                         "source": [{"oci": format!("{}/sigs", private.addr()),
                                                     "signaturePullSecrets": secrets}]}]}})
    };
    fake.apply(CIPS, authority(json!([{"name": "sigcred"}])));
    fake.add_collection(DEMO_SECRETS, "v1", "Secret");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({"auths": {private.addr(): {
        "auth": b64(&format!("{TEST_USER}:{TEST_PASSWORD}"))}}});
    fake.apply(
        DEMO_SECRETS,
        json!({"metadata": {"name": "sigcred", "namespace": "demo"},
               "type": "kubernetes.io/dockerconfigjson",
               "data": {".dockerconfigjson": b64(&config.to_string())}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.kubeconfig(dir.path()).display().to_string();
    let shim = Admission::start(&dir.path().join("unused"), &["--kubeconfig", &kubeconfig]).await;

    let mut pod = fixture("pod.json");
    pod["request"]["namespace"] = json!("demo");
    pod["request"]["object"]["metadata"]["namespace"] = json!("demo");
    pod["request"]["object"]["spec"] =
        json!({"containers": [{"name": "app", "image": public.tag_ref("app", "v1")}]});
    assert_allowed(&shim.review("/validate/workloads", &pod).await, &[]);

    // The same policy without the Secret: the signature repository refuses, so it is denied.
    fake.apply(CIPS, authority(json!([])));
    let mut last = Value::Null;
    for i in 0..100 {
        pod["request"]["uid"] = json!(format!("retry-{i}"));
        last = shim.review("/validate/workloads", &pod).await;
        if last["allowed"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["allowed"], false, "{last}");
    let message = last["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("requires a username and password"),
        "{message}"
    );
}

/// CIP-level `includeSpec`/`includeObjectMeta`/`includeTypeMeta`: the policy reads the object
/// under review (`spec`, `metadata`, `typemeta`), for a signed image from a real registry.
#[tokio::test(flavor = "multi_thread")]
async fn cip_level_policy_reads_the_admission_object() {
    let reg = Registry::start().await;
    let digest = reg.push_image("app", "v1", "seed-object-policy").await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;
    // A Pod must run as `builder` and be labelled team=payments; a Deployment's template must
    // name `builder` (the Deployment's own spec, as policy-controller passes it).
    let policy = r#"package sigstore
default isCompliant = false
isCompliant {
  input.typemeta == {"apiVersion": "v1", "kind": "Pod"}
  input.metadata.labels.team == "payments"
  input.spec.serviceAccountName == "builder"
  count(input.authorityMatches.signer.signatures) > 0
}
isCompliant {
  input.typemeta.kind == "Deployment"
  input.typemeta.apiVersion == "apps/v1"
  input.metadata.labels.team == "payments"
  input.spec.template.spec.serviceAccountName == "builder"
}
"#;
    let cip = format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\n\
         metadata: {{name: payments-builder}}\nspec:\n  images: [{{glob: \"{}/**\"}}]\n\
         \x20 authorities: [{{name: signer, key: {{data: {:?}}}}}]\n\
         \x20 policy:\n    type: rego\n    includeSpec: true\n    includeObjectMeta: true\n\
         \x20   includeTypeMeta: true\n    data: {}\n",
        reg.addr(),
        key.public_pem(),
        serde_json::to_string(policy).unwrap()
    );
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {policy.sigstore.dev/include: \"true\"}}\n";
    let policies = write_policy_dir(&[("cip.yaml", &cip), ("ns.yaml", ns)]);
    let shim = Admission::start(policies.path(), &[]).await;
    let image = reg.tag_ref("app", "v1");

    let pod = |uid: &str, team: &str, account: &str| {
        let mut pod = fixture("pod.json");
        pod["request"]["uid"] = json!(uid);
        pod["request"]["object"]["metadata"]["labels"] = json!({"team": team});
        pod["request"]["object"]["spec"] = json!({
            "serviceAccountName": account,
            "containers": [{"name": "app", "image": image}]});
        pod
    };
    assert_allowed(
        &shim
            .review("/validate/workloads", &pod("ok", "payments", "builder"))
            .await,
        &[],
    );
    // Same image and digest, another object: the verdict is not reused across objects.
    let denial = |what: &str| {
        format!(
            "validation failed: failed policy: payments-builder: {what}\n{image} failed \
             evaluating cip level policy: policy is not compliant for query \
             'isCompliant = data.sigstore.isCompliant'"
        )
    };
    assert_denied(
        &shim
            .review("/validate/workloads", &pod("sa", "payments", "default"))
            .await,
        &denial("spec.containers[0].image"),
    );
    assert_denied(
        &shim
            .review("/validate/workloads", &pod("label", "web", "builder"))
            .await,
        &denial("spec.containers[0].image"),
    );
    // The allowed pod again: the same object reuses its verdict.
    assert_allowed(
        &shim
            .review(
                "/validate/workloads",
                &pod("ok-again", "payments", "builder"),
            )
            .await,
        &[],
    );
    let hits: Vec<bool> = shim
        .audit_records()
        .iter()
        .map(|r| r["cache_hit"].as_bool().unwrap())
        .collect();
    assert_eq!(hits, [false, false, false, true]);

    // A Deployment: typemeta and metadata are the Deployment's, spec its own spec.
    let mut deployment = fixture("deployment.json");
    deployment["request"]["namespace"] = json!("demo");
    deployment["request"]["object"]["metadata"]["labels"] = json!({"team": "payments"});
    deployment["request"]["object"]["spec"]["template"]["spec"] = json!({
        "serviceAccountName": "builder",
        "containers": [{"name": "app", "image": image}]});
    assert_allowed(&shim.review("/validate/workloads", &deployment).await, &[]);
    deployment["request"]["uid"] = json!("deployment-default-sa");
    deployment["request"]["object"]["spec"]["template"]["spec"]["serviceAccountName"] =
        json!("default");
    assert_denied(
        &shim.review("/validate/workloads", &deployment).await,
        &denial("spec.template.spec.containers[0].image"),
    );
}

/// The reference table of tests/fixtures/references.yaml through the shim: coverage on the
/// reference as it will be fetched, image IDs refused (tests/references.rs runs it through
/// `pullgate verify`).
#[tokio::test(flavor = "multi_thread")]
async fn reference_table_through_the_shim() {
    let reg = Registry::start().await;
    let cases = common::references::reference_cases(&reg).await;
    let mut sets: Vec<&str> = cases.iter().map(|c| c.policies.as_str()).collect();
    sets.dedup();
    for set in sets {
        let policies = write_policy_dir(&[("policies.yaml", set)]);
        let shim = Admission::start(policies.path(), &[]).await;
        for case in cases.iter().filter(|c| c.policies == set) {
            let mut pod = fixture("pod.json");
            pod["request"]["namespace"] = json!("demo");
            pod["request"]["object"]["metadata"]["namespace"] = json!("demo");
            pod["request"]["object"]["spec"] =
                json!({"containers": [{"name": "a", "image": case.image}]});
            let r = shim.review("/validate/workloads", &pod).await;
            let what = format!("{}: {} -> {r}", case.name, case.image);
            let allowed = case.verdict == "allow";
            assert_eq!(r["allowed"], allowed, "{what}");
            if let Some(reason) = &case.reason {
                let message = r["status"]["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains(reason.as_str()),
                    "{what}: wanted {reason:?}"
                );
            }
        }
    }
}

/// `--client-ca`: only a client presenting a certificate issued under that CA (the API server,
/// configured with an AdmissionConfiguration kubeconfig) gets a TLS session at all; probes go
/// to `--health-listen`.
#[tokio::test(flavor = "multi_thread")]
async fn client_ca_admits_only_certificates_it_issued() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let pki = tempfile::tempdir().unwrap();
    let (ca, ca_key) = make_ca(pki.path(), "apiserver-ca");
    let (other_ca, other_key) = make_ca(pki.path(), "other-ca");
    let apiserver = make_client_cert(pki.path(), "kube-apiserver", &ca, &ca_key);
    let intruder = make_client_cert(pki.path(), "intruder", &other_ca, &other_key);
    let ca_arg = ca.display().to_string();
    let shim =
        Admission::start_with(policies.path(), &["--client-ca", &ca_arg], Some(&apiserver)).await;

    // The API server's certificate: served (pod.json is denied on its merits).
    let r = shim
        .review("/validate/workloads", &fixture("pod.json"))
        .await;
    assert_eq!(r["allowed"], false, "{r}");
    let served = shim.audit_records().len();
    assert!(served > 0);

    let server_cert = shim.dir.path().join("tls.crt");
    let body = serde_json::to_vec(&fixture("pod.json")).unwrap();
    for (who, client) in [
        ("no client certificate", https_client(&server_cert, None)),
        (
            "a certificate of another CA",
            https_client(&server_cert, Some(&intruder)),
        ),
    ] {
        for path in ["/validate/workloads", "/readyz"] {
            let r = client
                .post(format!("{}{path}", shim.base))
                .body(body.clone())
                .send()
                .await;
            match r {
                Err(_) => {}
                Ok(r) => panic!("{who}: {path} answered {}", r.status()),
            }
        }
    }
    assert_eq!(
        shim.audit_records().len(),
        served,
        "a refused client got a review"
    );

    // A file that holds no certificate is a start-up error.
    let out = run_pullgate_async(
        &[
            "admission",
            "--tls-cert",
            server_cert.to_str().unwrap(),
            "--tls-key",
            shim.dir.path().join("tls.key").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--policy-dir",
            policies.path().to_str().unwrap(),
            "--client-ca",
            shim.dir.path().join("tls.key").to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.starts_with("pullgate: client CA ")
            && out.stderr.contains("no PEM CERTIFICATE block found"),
        "{}",
        out.stderr
    );
}

/// Over the concurrent-review cap, a review is answered 429 with the reason, and the shim keeps
/// serving.
#[tokio::test(flavor = "multi_thread")]
async fn over_the_caps_reviews_get_429_with_a_reason() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let shim = Admission::start(policies.path(), &["--max-concurrent-reviews", "1"]).await;
    // A review whose body is still arriving holds the only slot. Its request may land on a
    // pooled connection the server has just closed (a streamed body cannot be resent): then it
    // is started again.
    let pod = serde_json::to_vec(&fixture("pod.json")).unwrap();
    let start_slow = || {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        let client = shim.client.clone();
        let url = format!("{}/validate/workloads", shim.base);
        let slow = tokio::spawn(async move {
            let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            let r = client.post(url).body(body).send().await?;
            Ok::<_, reqwest::Error>((r.status().as_u16(), r.text().await?))
        });
        (tx, slow)
    };
    let (mut tx, mut slow) = start_slow();
    tx.send(Ok(pod[..10].to_vec())).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, text) = loop {
        if slow.is_finished() {
            (tx, slow) = start_slow();
            tx.send(Ok(pod[..10].to_vec())).await.unwrap();
        }
        let (status, text) = shim.post("/validate/workloads", pod.clone()).await;
        if status == 429 || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (status, text.as_str()),
        (429, "too many reviews in progress (limit 1); retry later\n")
    );
    tx.send(Ok(pod[10..].to_vec())).await.unwrap();
    drop(tx);
    let (status, text) = slow.await.unwrap().unwrap();
    assert_eq!(status, 200, "{text}");
    // The slot is free again: served.
    let r = shim
        .review("/validate/workloads", &fixture("pod.json"))
        .await;
    assert_eq!(r["allowed"], false, "{r}");
}

/// The byte budget: with room for one 3 MiB body, a second full-size body sent while the first
/// is held is refused 429.
#[tokio::test(flavor = "multi_thread")]
async fn over_the_byte_budget_reviews_get_429() {
    let policies = write_policy_dir(&[("policies.yaml", POLICIES)]);
    let limit = 3 << 20;
    let budget = limit.to_string();
    let shim = Admission::start(policies.path(), &["--max-inflight-bytes", &budget]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let held = {
        let client = shim.client.clone();
        let url = format!("{}/validate/workloads", shim.base);
        tokio::spawn(async move {
            let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            let r = client
                .post(url)
                .header("content-length", (limit - 100).to_string())
                .body(body)
                .send()
                .await;
            r.map(|r| r.status().as_u16())
        })
    };
    tx.send(Ok(vec![b' '; 10])).await.unwrap();
    let mut big = serde_json::to_vec(&fixture("pod.json")).unwrap();
    big.resize(limit - 100, b' ');
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, text) = loop {
        let (status, text) = shim.post("/validate/workloads", big.clone()).await;
        if status == 429 || Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (status, text.as_str()),
        (
            429,
            format!("too many review bytes in flight (limit {limit} bytes); retry later\n")
                .as_str()
        )
    );
    drop(tx);
    let _ = held.await.unwrap();
    let (status, text) = shim.post("/validate/workloads", big).await;
    assert_eq!(status, 200, "{text}");
}

/// The shim reads pull Secrets only of the namespace the API server names in
/// `request.namespace`: an object that claims another namespace (or a review that names none)
/// gets no one's credentials. A denial never shows a digest the caller did not write, though
/// the shim resolved the tag with the namespace's credentials.
#[tokio::test(flavor = "multi_thread")]
async fn pull_secrets_only_of_the_reviewed_namespace_and_no_digest_leaks() {
    use common::fake_api::{namespace, FakeApi, CIPS, NAMESPACES};
    const DEMO_SECRETS: &str = "/api/v1/namespaces/demo/secrets";

    let reg = Registry::start_with_htpasswd(TEST_USER, TEST_PASSWORD).await;
    let signed = reg
        .push_image("private", "v1", "namespace-bound-signed")
        .await;
    let unsigned = reg
        .push_image("private", "v2", "namespace-bound-unsigned")
        .await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("private", &signed, &key).await;

    let fake = FakeApi::start(true).await;
    fake.apply(NAMESPACES, namespace("demo", true));
    fake.apply(NAMESPACES, namespace("attacker", true));
    fake.apply(
        CIPS,
        json!({"metadata": {"name": "private-signed"},
               "spec": {"images": [{"glob": format!("{}/private*", reg.addr())}],
                        "authorities": [{"key": {"data": key.public_pem()}}]}}),
    );
    fake.add_collection(DEMO_SECRETS, "v1", "Secret");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let config = json!({"auths": {reg.addr(): {
        "auth": b64(&format!("{TEST_USER}:{TEST_PASSWORD}"))}}});
    fake.apply(
        DEMO_SECRETS,
        json!({"metadata": {"name": "regcred", "namespace": "demo"},
               "type": "kubernetes.io/dockerconfigjson",
               "data": {".dockerconfigjson": b64(&config.to_string())}}),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.kubeconfig(dir.path()).display().to_string();
    let shim = Admission::start(&dir.path().join("unused"), &["--kubeconfig", &kubeconfig]).await;

    let pod_in = |uid: &str, request_ns: Option<&str>, image: &str| {
        let mut pod = fixture("pod.json");
        pod["request"]["uid"] = json!(uid);
        match request_ns {
            Some(ns) => pod["request"]["namespace"] = json!(ns),
            None => {
                pod["request"].as_object_mut().unwrap().remove("namespace");
            }
        }
        pod["request"]["object"]["metadata"]["namespace"] = json!("demo");
        pod["request"]["object"]["spec"] = json!({
            "imagePullSecrets": [{"name": "regcred"}],
            "containers": [{"name": "app", "image": image}]});
        pod
    };
    let image = reg.tag_ref("private", "v1");
    // The API server says demo: demo's Secret opens the registry.
    let r = shim
        .review("/validate/workloads", &pod_in("demo", Some("demo"), &image))
        .await;
    assert_allowed(&r, &[]);
    // Another namespace, or none, with an object claiming demo: no credentials at all.
    for (uid, ns) in [("attacker", Some("attacker")), ("no-namespace", None)] {
        let r = shim
            .review("/validate/workloads", &pod_in(uid, ns, &image))
            .await;
        assert_eq!(r["allowed"], false, "{uid}: {r}");
        let message = r["status"]["message"].as_str().unwrap();
        assert!(
            message.contains("requires a username and password"),
            "{uid}: {message}"
        );
    }

    // Denied with demo's credentials: the reason does not carry the resolved digest.
    let r = shim
        .review(
            "/validate/workloads",
            &pod_in("unsigned", Some("demo"), &reg.tag_ref("private", "v2")),
        )
        .await;
    assert_eq!(r["allowed"], false, "{r}");
    let message = r["status"]["message"].as_str().unwrap();
    let hex = unsigned.trim_start_matches("sha256:");
    assert!(!message.contains(hex), "digest leaked: {message}");
    assert!(
        message.contains("failed policy: private-signed"),
        "{message}"
    );
    // The audit log (the operator's) keeps it.
    assert!(
        shim.audit_records()
            .iter()
            .any(|r| r["digest"] == unsigned.as_str()),
        "{:?}",
        shim.audit_records()
    );
}

//! Audit durability: a full disk never loses a decision's line silently. The failure is
//! counted, `/readyz` reports it, `--audit-failure=deny` refuses what would run unrecorded, and
//! no line is ever left half-written. Runs against a real 64 KiB tmpfs (needs root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use pullgate::audit::{AuditFailure, AuditLog, Source};
use pullgate::engine::{Engine, Request};
use pullgate::metrics::{admin_reply, Metrics};
use pullgate::policy::eval::Verdict;
use pullgate::policy::load::Objects;
use pullgate::policy::snapshot::{Settings, Snapshot};
use pullgate::policy::source::Fixed;
use pullgate::registry::{RegistryClient, RegistryConfig};
use pullgate::verify::cache::VerdictCache;

const POLICY: &str = "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: allow-app}\nspec:\n  images: [{glob: \"127.0.0.1:9/app/**\"}]\n  authorities: [{static: {action: pass}}]\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {policy.sigstore.dev/include: \"true\"}}\n";

/// A 64 KiB tmpfs, unmounted (and its directory removed) when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount() -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "pullgate-audit-test"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mounting a tmpfs needs root");
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the file system refuses more.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let filler = self.path().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = [b'x'; 512];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(b"x");
        while f.write_all(b"x").is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

fn engine(audit: AuditLog) -> Engine {
    let mut objects = Objects::default();
    objects.load_str(POLICY, "test").unwrap();
    let snapshot = Snapshot::build(&objects, Settings::default());
    assert!(snapshot.problems.is_empty());
    Engine {
        policies: Arc::new(Fixed::new(snapshot)),
        registry: RegistryClient::new(RegistryConfig::default()).unwrap(),
        cache: VerdictCache::new(
            Duration::from_secs(300),
            Duration::from_secs(30),
            Duration::from_secs(5),
            100,
        ),
        audit,
        node: "node-1".to_string(),
    }
}

async fn readyz(engine: &Engine, metrics: &Metrics) -> (StatusCode, serde_json::Value) {
    use http_body_util::BodyExt as _;
    let reply = admin_reply(&Method::GET, "/readyz", &*engine.policies, metrics).unwrap();
    let status = reply.status();
    let bytes = reply.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

async fn metric(engine: &Engine, metrics: &Metrics, name: &str) -> String {
    use http_body_util::BodyExt as _;
    let reply = admin_reply(&Method::GET, "/metrics", &*engine.policies, metrics).unwrap();
    let bytes = reply.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    text.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        .to_string()
}

/// Every line of the file is a whole JSON audit line, and the file ends with a newline.
fn assert_whole_lines(path: &Path) -> usize {
    let text = std::fs::read(path).unwrap();
    assert!(
        text.is_empty() || text.ends_with(b"\n"),
        "the audit file ends mid-line"
    );
    let text = String::from_utf8(text).expect("no line cut inside a character");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("half-written audit line {line:?}: {e}"));
        assert_eq!(v["node"], "node-1");
    }
    text.lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_denies_counts_and_reports_without_half_lines() {
    let disk = SmallDisk::mount();
    let path = disk.path().join("audit.log");
    let metrics = Arc::new(Metrics::new());
    let audit = AuditLog::open(Some(&path), 50 << 20, 5, false)
        .unwrap()
        .with_metrics(metrics.clone());
    assert_eq!(
        audit.failure_policy(),
        AuditFailure::Deny,
        "deny is the default"
    );
    let engine = engine(audit);
    let prod = Request::new(Source::CriPull, Some("prod"));

    let outcome = engine.decide("127.0.0.1:9/app/a:1", &prod).await;
    assert_eq!(outcome.decision.verdict, Verdict::Allow);
    assert_eq!(readyz(&engine, &metrics).await.0, StatusCode::OK);

    let filler = disk.fill();
    // The audit file's last page may still have room: decide until a line no longer fits.
    let mut denied = None;
    for i in 0..200 {
        let outcome = engine
            .decide(&format!("127.0.0.1:9/app/a:{i}"), &prod)
            .await;
        if outcome.decision.verdict != Verdict::Allow {
            denied = Some(outcome);
            break;
        }
    }
    let denied = denied.expect("a full disk must stop admitting unrecorded pulls");
    assert_eq!(denied.decision.verdict, Verdict::Deny);
    assert!(
        denied
            .decision
            .reasons
            .iter()
            .any(|r| r.contains("audit line") && r.contains("audit.log")),
        "{:?}",
        denied.decision.reasons
    );
    let lines = assert_whole_lines(&path);
    assert!(lines >= 1);

    let errors = metric(&engine, &metrics, "pullgate_audit_write_errors_total").await;
    assert!(!errors.ends_with(" 0"), "{errors}");
    assert_eq!(
        metric(&engine, &metrics, "pullgate_audit_failing").await,
        "pullgate_audit_failing 1"
    );
    let (status, body) = readyz(&engine, &metrics).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["audit"]["failing"], true, "{body}");
    assert!(body["audit"]["last_error"]
        .as_str()
        .unwrap()
        .contains("audit.log"));

    // Exempt namespaces keep pulling, so the node can still be repaired.
    let exempt = Request::new(Source::CriPull, Some("kube-system"));
    let outcome = engine.decide("127.0.0.1:9/app/a:1", &exempt).await;
    assert!(outcome.decision.verdict.admits());

    // Still full: more attempts never leave a partial line behind.
    for i in 0..20 {
        let outcome = engine
            .decide(&format!("127.0.0.1:9/app/b:{i}"), &prod)
            .await;
        assert_eq!(outcome.decision.verdict, Verdict::Deny);
    }
    // A shorter line (the exempt decision's, a refusal's) may still fit in the slack of the
    // file's last page: whatever was written is whole lines.
    let lines = assert_whole_lines(&path);

    // Room again: the next decision is recorded and /readyz recovers.
    std::fs::remove_file(filler).unwrap();
    let outcome = engine.decide("127.0.0.1:9/app/c:1", &prod).await;
    assert_eq!(outcome.decision.verdict, Verdict::Allow);
    assert_eq!(assert_whole_lines(&path), lines + 1);
    let (status, body) = readyz(&engine, &metrics).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["audit"]["failing"], false);
    drop(engine);
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_failure_allow_lets_the_decision_stand_but_counts_it() {
    let disk = SmallDisk::mount();
    let path = disk.path().join("audit.log");
    let metrics = Arc::new(Metrics::new());
    let audit = AuditLog::open(Some(&path), 50 << 20, 5, false)
        .unwrap()
        .with_metrics(metrics.clone())
        .with_failure_policy(AuditFailure::Allow);
    let engine = engine(audit);
    let prod = Request::new(Source::CriPull, Some("prod"));
    disk.fill();
    for i in 0..200 {
        let outcome = engine
            .decide(&format!("127.0.0.1:9/app/a:{i}"), &prod)
            .await;
        assert_eq!(outcome.decision.verdict, Verdict::Allow);
    }
    assert_whole_lines(&path);
    assert_eq!(
        metric(&engine, &metrics, "pullgate_audit_failing").await,
        "pullgate_audit_failing 1"
    );
    assert_eq!(
        readyz(&engine, &metrics).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[test]
fn the_audit_path_is_never_followed_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("precious");
    std::fs::write(&target, "do not touch\n").unwrap();
    let link = dir.path().join("audit.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let opened = AuditLog::open(Some(&link), 50 << 20, 5, false);
    assert!(opened.is_err(), "a symlinked audit path must be refused");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "do not touch\n");
}

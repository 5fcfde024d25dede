//! A real single-node Kubernetes cluster on loopback whose kubelet runs every container through
//! `pullgate serve` (both CRI endpoints on pullgate's socket): `tests/cluster/run.sh` starts
//! etcd, kube-apiserver, kube-controller-manager, kube-scheduler (built by
//! `tests/testbed/install.sh`), a registry, Debian's containerd 1.6, pullgate in cluster mode
//! (its own ServiceAccount's token) and kubelet; then checks that the Node becomes Ready, that a
//! hostNetwork pod of an allow-listed image runs in a namespace labelled
//! `policy.sigstore.dev/include=true`, and that a pod of an unlisted image is refused by the node
//! with `SignatureValidationFailed` in `kubectl describe pod`; then stops everything.
//!
//! Skipped loudly when a test-bed binary is missing and `CI` is unset; failing in CI. Takes
//! about 30 s (≈ 10 s up, ≈ 3 s of checks, ≈ 18 s of teardown).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::run_with_timeout;
use common::testbed::{testbed_bin_dir, testbed_binary};

const PEERS: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
];

#[test]
fn kubelet_runs_allowed_pod_and_node_refuses_unlisted_image() {
    for peer in PEERS {
        if testbed_binary(peer).is_none() {
            return;
        }
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster/run.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(script)
        .env("PULLGATE_BIN", env!("CARGO_BIN_EXE_pullgate"))
        .env("PULLGATE_TESTBED_BIN", testbed_bin_dir())
        .env("KUBECTL", testbed_bin_dir().join("kubectl"));
    let start = Instant::now();
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    eprintln!("{}", out.stderr);
    eprintln!("tests/cluster/run.sh took {:.1?}", start.elapsed());
    assert!(
        out.success(),
        "tests/cluster/run.sh failed (exit {})",
        out.code
    );
    for expected in [
        "node pgnode Ready",
        "pod allowed: Running",
        "pod unlisted: refused by the node",
        "Error: SignatureValidationFailed",
    ] {
        assert!(
            out.stderr.contains(expected),
            "run.sh output lacks {expected:?}"
        );
    }
}

//! A real single-node Kubernetes cluster on loopback whose kubelet runs every container through
//! `pullgate serve` (both CRI endpoints on pullgate's socket), and the seed walkthrough on it.
//! `tests/cluster/run.sh` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! kubelet and kubectl (built by `tests/testbed/install.sh`), a registry, Debian's containerd 1.6,
//! `pullgate serve` and `pullgate admission` in cluster mode (each with its own ServiceAccount's
//! token), with the CRDs applied and the webhooks registered by `url:`; then `prove.sh` checks:
//! the webhook refuses an unlisted image; with it narrowed the node refuses the pull
//! (`SignatureValidationFailed` in the pod's events) while an allow-listed hostNetwork pod runs;
//! `IfNotPresent`, `Never` and a bare image ID of an image already on the node (pulled through an
//! unenforced namespace) are not created; a key CIP (`secretRef`) refuses an unsigned image and
//! admits it once the real `cosign sign --key` signed it; every audit line is one decision.
//! Then everything is stopped.
//!
//! Skipped loudly when a test-bed binary is missing and `CI` is unset; failing in CI. Takes
//! about 40 s (≈ 10 s up, ≈ 10 s of checks, ≈ 18 s of teardown).

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
    "crictl",
    "cosign",
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
        "admission webhook \"workloads.pullgate.dev\" denied the request",
        "pod allowed: Running",
        "pod unlisted: pull refused by the node: Error: SignatureValidationFailed",
        "pod ifnotpresent: container not created: Error: SignatureValidationFailed",
        "pod never: container not created: Error: SignatureValidationFailed",
        "pod imageid: container not created: Error: SignatureValidationFailed",
        "pod unsigned: unsigned image refused by the node",
        "pod signed: Running",
        "audit logs checked",
    ] {
        assert!(
            out.stderr.contains(expected),
            "run.sh output lacks {expected:?}"
        );
    }
}

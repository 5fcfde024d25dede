//! Blocking work stays off the runtime workers: while decisions run a Rego policy for its
//! whole 2 s budget, pass-through `ListImages` through the CRI proxy (real containerd) keeps
//! answering at its usual latency. Before, two such evaluations held both runtime workers and
//! every RPC waited for them.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Runs far past the 2 s evaluation budget, so each evaluation takes the whole budget.
const SLOW_REGO: &str = "package sigstore\nisCompliant {\n  count([x | numbers.range(1, 100000)[a]; numbers.range(1, 100000)[b]; x := a * b]) > 0\n}\n";

fn slow_cip() -> String {
    let policy: String = SLOW_REGO.lines().map(|l| format!("      {l}\n")).collect();
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: slow}}\nspec:\n  images: [{{glob: \"127.0.0.1:9/slow/**\"}}]\n  authorities: [{{static: {{action: pass}}}}]\n  policy:\n    type: rego\n    data: |\n{policy}"
    )
}

const NAMESPACE: &str = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {policy.sigstore.dev/include: \"true\"}}\n";

async fn list_latency(sock: &std::path::Path) -> Duration {
    let started = Instant::now();
    list_images(sock).await.expect("ListImages is forwarded");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_rego_policy_does_not_delay_pass_through_rpcs() {
    let containerd = Containerd::start().await;
    let dir = write_policy_dir(&[("ns.yaml", NAMESPACE), ("slow.yaml", &slow_cip())]);
    let pg = Pullgate::start(&containerd.socket(), dir.path(), &[]).await;
    let sock = pg.socket();

    // Usual latency of a forwarded ListImages (new connection each time, as measured below).
    let mut baseline = Vec::new();
    for _ in 0..10 {
        baseline.push(list_latency(&sock).await);
    }
    baseline.sort();
    let usual = baseline[baseline.len() / 2];

    // Two slow decisions at once: as many as pullgate has runtime workers.
    let pulls: Vec<_> = (0..2)
        .map(|i| {
            let sock = sock.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let result = pull(
                    &sock,
                    &format!("127.0.0.1:9/slow/app:{i}"),
                    Some("prod"),
                    "p",
                )
                .await;
                (result, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut worst = Duration::ZERO;
    let mut samples = 0;
    let mut seen = Vec::new();
    while pulls.iter().any(|p| !p.is_finished()) {
        let took = list_latency(&sock).await;
        seen.push(took.as_millis());
        worst = worst.max(took);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in pulls {
        let (result, took) = p.await.unwrap();
        let status = result.expect_err("the runaway policy denies");
        assert!(
            status.message().contains("cip level policy"),
            "{}",
            status.message()
        );
        assert!(
            took >= Duration::from_millis(1500),
            "the policy ran for its budget ({took:?}): otherwise this test shows nothing"
        );
    }
    assert!(samples >= 10, "ListImages sampled during the evaluations ({samples}, worst {worst:?}, usual {usual:?}, {seen:?})\n{}", pg.log());
    eprintln!("ListImages: usual {usual:?}, worst during 2 s rego evaluations {worst:?} ({samples} samples)");
    assert!(
        worst <= usual + Duration::from_millis(100),
        "ListImages took {worst:?} during the evaluations (usual {usual:?})"
    );
}

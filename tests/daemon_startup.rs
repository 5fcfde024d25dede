//! Bind first, then fetch: with a remote policy source on a host that accepts connections and
//! never answers, `pullgate serve` answers CRI calls within a second of start, decides what
//! does not need the remote text at once, and refuses what does, saying it is not fetched yet.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_cri::v1::VersionRequest;

const NAMESPACE: &str = "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {policy.sigstore.dev/include: \"true\"}}\n";

/// A TCP listener on 127.0.0.1 that accepts and never answers (nor closes).
fn blackhole() -> (u16, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(64) {
            match conn {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    (port, thread)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_remote_policy_host_does_not_hold_up_serving() {
    let (port, _blackhole) = blackhole();
    let url = format!("https://127.0.0.1:{port}/policy.rego");
    let remote_cip = format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: remote}}\nspec:\n  images: [{{glob: \"127.0.0.1:9/remote/**\"}}]\n  authorities: [{{static: {{action: pass}}}}]\n  policy: {{type: rego, remote: {{url: \"{url}\", sha256sum: \"{}\"}}}}\n",
        "0".repeat(64)
    );
    let local_cip = "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {name: local}\nspec:\n  images: [{glob: \"127.0.0.1:9/local/**\"}]\n  authorities: [{static: {action: fail, message: decided locally}}]\n";
    let containerd = Containerd::start().await;
    let dir = write_policy_dir(&[
        ("ns.yaml", NAMESPACE),
        ("remote.yaml", &remote_cip),
        ("local.yaml", local_cip),
    ]);

    let started = Instant::now();
    // Returns once the socket answers a forwarded CRI ImageFsInfo.
    let pg = Pullgate::start(&containerd.socket(), dir.path(), &[]).await;
    let sock = pg.socket();
    let mut runtime = runtime_client(&sock).await.unwrap();
    let version = runtime
        .version(VersionRequest::default())
        .await
        .expect("Version is forwarded")
        .into_inner();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(
        image_status(&sock, "busybox:never-pulled").await.unwrap(),
        None
    );
    let answered = started.elapsed();
    assert!(
        answered < Duration::from_secs(1),
        "the socket answered {answered:?} after start"
    );

    // Decisions that do not need the remote text are made now …
    let local = pull(&sock, "127.0.0.1:9/local/app:1", Some("prod"), "p")
        .await
        .expect_err("static fail denies");
    assert!(
        local.message().contains("decided locally"),
        "{}",
        local.message()
    );
    // … and those that do fail closed, saying what they wait for.
    let remote = pull(&sock, "127.0.0.1:9/remote/app:1", Some("prod"), "p")
        .await
        .expect_err("an unfetched remote policy never admits");
    assert!(
        remote.message().contains(&url) && remote.message().contains("not been fetched"),
        "{}",
        remote.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "all of this well before the remote fetch times out ({:?})",
        started.elapsed()
    );
}

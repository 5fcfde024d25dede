//! The create-time gate and the cached pull path, through `pullgate serve` vs straight to
//! containerd, side by side in one run. Everything real and on loopback (the harness of
//! `tests/common`): a distribution 2.8 registry, containerd 1.6 + runc, the release `pullgate`
//! binary, a signed busybox image, real pod sandboxes.
//!
//! 1. `CreateContainer` with a cached allow verdict: N creates (`CREATE_BENCH_N`, default 30)
//!    in one pod through pullgate and N straight into containerd, interleaved; the added time
//!    is the median of the paired differences.
//! 2. The cached pull (image present, verdict cached), broken down: the whole added time
//!    (paired), the registry `HEAD` pullgate makes for the tag (timed on its own), the gRPC hop
//!    (`Version` through pullgate vs direct), the containerd tag-record check (the two image
//!    `Get`s pullgate makes), and pullgate's own work (its audit `latency_ms` minus the `HEAD`).
//!
//! `cargo bench --bench create`. Run as a test (`cargo test --benches`) it does nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::GetImageRequest;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::VersionRequest;
use serde_json::Value;

const NAMESPACE: &str = "bench";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("create: end-to-end benchmark, run it with `cargo bench --bench create`; skipped");
        return;
    }
    let n = std::env::var("CREATE_BENCH_N")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n >= 3)
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(n));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "no samples");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let len = v.len();
    if len % 2 == 1 {
        v[len / 2]
    } else {
        (v[len / 2 - 1] + v[len / 2]) / 2.0
    }
}

/// A containerd image `Get` in the CRI plugin's namespace, as pullgate makes it.
fn in_k8s_namespace(name: String) -> tonic::Request<GetImageRequest> {
    let mut req = tonic::Request::new(GetImageRequest { name });
    req.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static("k8s.io"),
    );
    req
}

fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn audit_latencies(pg: &Pullgate, source: &str) -> Vec<(bool, f64)> {
    std::fs::read_to_string(pg.audit_log_path())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["source"] == source)
        .map(|l| {
            (
                l["cache_hit"].as_bool().unwrap_or(false),
                l["latency_ms"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}

async fn run(n: usize) {
    let reg = Registry::start().await;
    reg.push_busybox("pause", "v1").await;
    let image = TestImage::busybox_with_config(|c| {
        c["config"]["Env"] = serde_json::json!(["PATH=/bin", "BUILD=bench"])
    });
    let digest = reg.push_test_image("app", "v1", &image).await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    reg.sign("app", &digest, &key).await;
    let ctd = Containerd::start_with(
        ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")),
    )
    .await;
    let policies = write_policy_dir(&[(
        "policies.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}, labels: {{policy.sigstore.dev/include: \"true\"}}}}\n---\n\
             apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: signed}}\n\
             spec:\n  images: [{{glob: \"{}/app*\"}}]\n  authorities: [{{key: {{data: {}}}}}]\n",
            reg.addr(),
            serde_json::to_string(&key.public_pem()).unwrap()
        ),
    )]);
    let pg = Pullgate::start(
        &ctd.socket(),
        policies.path(),
        &["--no-audit-stdout", "--cache-ttl", "3600"],
    )
    .await;
    let app = reg.tag_ref("app", "v1");
    let (direct_sock, proxy_sock) = (ctd.socket(), pg.socket());
    let mut direct_cri = cri_client(&direct_sock).await.expect("client");
    let mut proxy_cri = cri_client(&proxy_sock).await.expect("client");
    let image_id = proxy_cri
        .pull_image(pull_request(&app, Some(NAMESPACE), "bench-0"))
        .await
        .expect("verified pull")
        .into_inner()
        .image_ref;

    // 1. CreateContainer, cached verdict.
    let pod = PodSandbox::run(&proxy_sock, "bench-0", NAMESPACE, "uid-bench-0")
        .await
        .expect("RunPodSandbox");
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for i in 0..n + 2 {
        let t = Instant::now();
        pod.create_container_via(&direct_sock, &format!("d{i}"), &image_id, &app)
            .await
            .expect("create direct");
        let d = ms(t.elapsed());
        let t = Instant::now();
        pod.create_container_via(&proxy_sock, &format!("p{i}"), &image_id, &app)
            .await
            .expect("create through pullgate");
        let p = ms(t.elapsed());
        if i >= 2 {
            // the first two warm connections and first-use paths
            direct.push(d);
            proxied.push(p);
        }
    }
    let creates = audit_latencies(&pg, "cri-create");
    let create_hits = creates.iter().filter(|(hit, _)| *hit).count();
    let create_decision = median(&creates.iter().map(|(_, l)| *l).collect::<Vec<_>>());

    // 2. Cached pulls, and their parts.
    let mut runtime_direct = RuntimeServiceClient::new(connect_uds(&direct_sock).await.unwrap());
    let mut runtime_proxy = RuntimeServiceClient::new(connect_uds(&proxy_sock).await.unwrap());
    let http = reqwest::Client::new();
    let head_url = format!("{}/v2/app/manifests/v1", reg.url());
    let channel = connect_uds(&direct_sock).await.unwrap();
    let images = ImagesClient::new(channel);
    let (mut pull_d, mut pull_p, mut heads, mut hop_d, mut hop_p, mut records) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let pulls_before = audit_latencies(&pg, "cri-pull").len();
    for i in 0..n + 2 {
        let t = Instant::now();
        direct_cri
            .pull_image(pull_request(&app, Some(NAMESPACE), "b"))
            .await
            .expect("pull direct");
        let d = ms(t.elapsed());
        let t = Instant::now();
        proxy_cri
            .pull_image(pull_request(&app, Some(NAMESPACE), "b"))
            .await
            .expect("pull through pullgate");
        let p = ms(t.elapsed());
        let t = Instant::now();
        let head = http
            .head(&head_url)
            .header(
                "Accept",
                "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
                 application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .expect("HEAD");
        assert!(head.status().is_success(), "{head:?}");
        let h = ms(t.elapsed());
        let t = Instant::now();
        runtime_direct
            .version(VersionRequest::default())
            .await
            .expect("Version");
        let vd = ms(t.elapsed());
        let t = Instant::now();
        runtime_proxy
            .version(VersionRequest::default())
            .await
            .expect("Version");
        let vp = ms(t.elapsed());
        let (mut a, mut b) = (images.clone(), images.clone());
        let by_digest = format!("{}/app@{digest}", reg.addr());
        let t = Instant::now();
        let (x, y) = tokio::join!(
            a.get(in_k8s_namespace(by_digest)),
            b.get(in_k8s_namespace(app.clone())),
        );
        x.expect("pinned record");
        y.expect("tag record");
        let r = ms(t.elapsed());
        if i >= 2 {
            pull_d.push(d);
            pull_p.push(p);
            heads.push(h);
            hop_d.push(vd);
            hop_p.push(vp);
            records.push(r);
        }
    }
    let pulls = audit_latencies(&pg, "cri-pull");
    let cached_pulls: Vec<f64> = pulls[pulls_before + 2..]
        .iter()
        .map(|(hit, l)| {
            assert!(*hit, "a cached pull verified again");
            *l
        })
        .collect();

    let added_create = median(&paired(&proxied, &direct));
    let added_pull = median(&paired(&pull_p, &pull_d));
    let head = median(&heads);
    let hop = median(&paired(&hop_p, &hop_d));
    let record = median(&records);
    let decision = median(&cached_pulls);
    println!("## pullgate create gate and cached pull (benches/create.rs, n = {n})");
    println!();
    println!(
        "| measurement | direct (median ms) | via pullgate (median ms) | added (median of pairs) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| CreateContainer, cached verdict | {:.2} | {:.2} | **{added_create:+.3} ms** |",
        median(&direct),
        median(&proxied)
    );
    println!(
        "| PullImage, image present, cached verdict | {:.2} | {:.2} | **{added_pull:+.3} ms** |",
        median(&pull_d),
        median(&pull_p)
    );
    println!();
    println!("create decisions: {create_hits}/{} cache hits, decision median {create_decision:.3} ms (audit latency_ms)", creates.len());
    println!();
    println!("Cached pull, parts (medians, ms):");
    println!("- registry HEAD of the tag (timed alone): {head:.3}");
    println!("- gRPC hop (Version via pullgate minus direct, paired): {hop:+.3}");
    println!("- containerd tag-record check (two image Gets, concurrent): {record:.3}");
    println!("- pullgate's decision incl. the HEAD (audit latency_ms): {decision:.3}");
    println!(
        "- **pullgate's own work** (decision minus HEAD): {:.3}",
        decision - head
    );
    println!();
    println!("raw create direct: {direct:.2?}");
    println!("raw create via pullgate: {proxied:.2?}");
    pod.remove().await.ok();
}

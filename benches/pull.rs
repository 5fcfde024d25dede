//! End-to-end pulls: CRI `PullImage` straight into containerd vs through `pullgate serve`.
//!
//! One run, everything real and on loopback (the harness of `tests/common`): a distribution 2.8
//! registry, containerd 1.6 with its CRI plugin, the release `pullgate` binary, images signed
//! with the sigstore crate. It prints markdown tables and the raw numbers:
//!
//! 1. N (`PULL_BENCH_N`, default 20) sequential pulls of distinct signed images straight into
//!    containerd vs N through pullgate with a cold verdict (interleaved, separate image sets of
//!    the same size); then every image is removed from containerd (CRI `RemoveImage` on
//!    containerd's socket) and pulled again the same way: the pull is cold, pullgate's verdict is
//!    cached. Per-pull median and p90, added latency (proxied minus direct medians).
//! 2. 64 concurrent pulls through pullgate: 64 distinct images, then 64 pulls of one image.
//! 3. pullgate's peak RSS (`VmHWM`) in that run, and in a second pullgate with 1 000
//!    ClusterImagePolicies after 20 pulls.
//!
//! Registry requests per pull are counted from the registry's access log, split by user agent.
//!
//! `cargo bench --bench pull`. Run as a test (`cargo test --benches`) it does nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use common::*;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use serde_json::Value;
use tonic::transport::Channel;

type Cri = ImageServiceClient<Channel>;

/// The enforced namespace the pulls are made for.
const NAMESPACE: &str = "bench";
const CONCURRENT: usize = 64;
const MANY_CIPS: usize = 1000;
const MANY_PULLS: usize = 20;
const PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// Images pushed (and signed) at the same time while setting up.
const PUSH_PARALLEL: usize = 8;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("pull: end-to-end benchmark, run it with `cargo bench --bench pull`; skipped");
        return;
    }
    let n = match std::env::var("PULL_BENCH_N") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| panic!("PULL_BENCH_N must be a positive integer, not {v:?}")),
        _ => 20,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(n));
}

// ---------------------------------------------------------------------------------------------
// Images and policies.

/// One pushed and signed image.
#[derive(Debug, Clone)]
struct Img {
    repo: String,
    /// `127.0.0.1:PORT/REPO:v1`.
    image: String,
    config: String,
    layer: String,
}

async fn push_signed(reg: &Registry, key: &TestKey, repo: String, seed: String) -> Img {
    let built = TestImage::build(&seed);
    let digest = reg.push_test_image(&repo, "v1", &built).await;
    assert_eq!(digest, built.digest, "pushed digest of {repo}");
    reg.sign(&repo, &digest, key).await;
    Img {
        image: reg.tag_ref(&repo, "v1"),
        repo,
        config: built.config_digest,
        layer: built.layer_digest,
    }
}

/// Pushes and signs `(repository, seed)` images, [`PUSH_PARALLEL`] at a time.
async fn push_all(reg: &Registry, key: &TestKey, specs: Vec<(String, String)>) -> Vec<Img> {
    let mut out = Vec::with_capacity(specs.len());
    for chunk in specs.chunks(PUSH_PARALLEL) {
        let pushes = chunk
            .iter()
            .map(|(repo, seed)| push_signed(reg, key, repo.clone(), seed.clone()));
        out.extend(futures_util::future::join_all(pushes).await);
    }
    out
}

/// `count` images `PREFIX/appNNN:v1`, seeds `bench-PREFIX-NNN`: same-length prefixes give
/// images of the same size.
async fn push_set(reg: &Registry, key: &TestKey, prefix: &str, count: usize) -> Vec<Img> {
    let specs = (0..count)
        .map(|i| {
            (
                format!("{prefix}/app{i:03}"),
                format!("bench-{prefix}-{i:03}"),
            )
        })
        .collect();
    push_all(reg, key, specs).await
}

fn namespace_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    policy.sigstore.dev/include: \"true\"\n"
    )
}

/// A ClusterImagePolicy covering `glob` with one key authority (key inline).
fn key_cip(name: &str, glob: &str, pem_json: &str) -> String {
    format!(
        "---\napiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata:\n  name: {name}\nspec:\n  images:\n  - glob: \"{glob}\"\n  authorities:\n  - key:\n      data: {pem_json}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Pulls.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The last `max` bytes of `s` (on a char boundary).
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Panics with `what`, the error and the tails of pullgate's and containerd's logs.
fn fail(what: &str, err: &str, pg: Option<&Pullgate>, ctd: &Containerd) -> ! {
    let pg_log = pg.map(|p| p.log()).unwrap_or_default();
    panic!(
        "{what}: {err}\n--- pullgate (tail)\n{}\n--- containerd (tail)\n{}",
        tail(&pg_log, 4000),
        tail(&ctd.log(), 4000)
    );
}

/// One CRI `PullImage` on `client`: its latency in ms and the `image_ref` answered.
async fn timed_pull(client: &mut Cri, image: &str, pod: &str) -> Result<(f64, String), String> {
    let req = pull_request(image, Some(NAMESPACE), pod);
    let started = Instant::now();
    match tokio::time::timeout(PULL_TIMEOUT, client.pull_image(req)).await {
        Err(_) => Err(format!("no answer within {PULL_TIMEOUT:?}")),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Ok(Ok(resp)) => Ok((ms(started.elapsed()), resp.into_inner().image_ref)),
    }
}

/// [`timed_pull`] that must succeed with `img`'s config digest as `image_ref`.
async fn must_pull(
    client: &mut Cri,
    img: &Img,
    pod: &str,
    pg: Option<&Pullgate>,
    ctd: &Containerd,
) -> f64 {
    let via = if pg.is_some() {
        "through pullgate"
    } else {
        "direct"
    };
    match timed_pull(client, &img.image, pod).await {
        Ok((t, image_ref)) if image_ref == img.config => t,
        Ok((_, image_ref)) => fail(
            &format!("pull {} {via}", img.image),
            &format!("image_ref {image_ref}, expected {}", img.config),
            pg,
            ctd,
        ),
        Err(e) => fail(&format!("pull {} {via}", img.image), &e, pg, ctd),
    }
}

/// `images.len()` pulls through `client` at once. Returns the wall time and every pull's
/// latency (ms).
async fn concurrent_pulls(
    client: &Cri,
    images: &[&Img],
    pod_prefix: &str,
    pg: Option<&Pullgate>,
    ctd: &Containerd,
) -> (f64, Vec<f64>) {
    let started = Instant::now();
    let tasks: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let mut client = client.clone();
            let image = img.image.clone();
            let pod = format!("{pod_prefix}-{i}");
            tokio::spawn(async move { timed_pull(&mut client, &image, &pod).await })
        })
        .collect();
    let mut latencies = Vec::with_capacity(images.len());
    for (task, img) in tasks.into_iter().zip(images) {
        let result = task.await.unwrap_or_else(|e| panic!("pull task: {e}"));
        match result {
            Ok((t, image_ref)) if image_ref == img.config => latencies.push(t),
            Ok((_, image_ref)) => fail(
                &format!("concurrent pull {}", img.image),
                &format!("image_ref {image_ref}, expected {}", img.config),
                pg,
                ctd,
            ),
            Err(e) => fail(&format!("concurrent pull {}", img.image), &e, pg, ctd),
        }
    }
    (ms(started.elapsed()), latencies)
}

/// Removes `images` from containerd with CRI `RemoveImage` on containerd's own socket, and
/// waits (≤ 10 s) until no image record names them and their layers have left the content
/// store, so the next pull of each is cold.
async fn remove_all(ctd: &Containerd, reg: &Registry, images: &[&Img]) {
    let sock = ctd.socket();
    for img in images {
        for name in [img.image.as_str(), img.config.as_str()] {
            if let Err(e) = remove_image(&sock, name).await {
                fail(
                    &format!("RemoveImage {name} on containerd"),
                    &format!("{e:?}"),
                    None,
                    ctd,
                );
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let targets = ctd.image_targets().await;
        let leftover: Vec<String> = targets
            .keys()
            .filter(|name| {
                images.iter().any(|img| {
                    *name == &img.image
                        || *name == &img.config
                        || name.starts_with(&format!("{}@", reg.repo_ref(&img.repo)))
                })
            })
            .cloned()
            .collect();
        let content = ctd.content_digests().await;
        let blobs: Vec<&str> = images
            .iter()
            .filter(|img| content.contains(&img.layer))
            .map(|img| img.layer.as_str())
            .collect();
        if leftover.is_empty() && blobs.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            fail(
                "images still in containerd 10 s after RemoveImage",
                &format!("records {leftover:?}, layers {blobs:?}"),
                None,
                ctd,
            );
        }
        for name in &leftover {
            let _ = remove_image(&sock, name).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements.

#[derive(Debug, Clone, Copy)]
struct Stats {
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
}

/// Median (mean of the middle two for an even count) and nearest-rank p90.
fn stats(values: &[f64]) -> Stats {
    assert!(!values.is_empty(), "no samples");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let len = v.len();
    let median = if len % 2 == 1 {
        v[len / 2]
    } else {
        (v[len / 2 - 1] + v[len / 2]) / 2.0
    };
    let rank = ((len as f64) * 0.9).ceil() as usize;
    Stats {
        median,
        p90: v[rank.clamp(1, len) - 1],
        min: v[0],
        max: v[len - 1],
    }
}

/// `a[i] - b[i]` for every pair.
fn paired(a: &[f64], b: &[f64]) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "paired samples");
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

fn raw(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `field` (`VmHWM`, `VmRSS`) of `/proc/PID/status`, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}:\n{status}"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn pid_of(pg: &Pullgate) -> u32 {
    pg.pid().expect("pullgate is running")
}

/// Waits until the audit log holds `n` records and returns those whose pod starts with
/// `pod_prefix-`, checking each is an `allow`; panics when there are not `expect` of them.
async fn audit_of(pg: &Pullgate, n: usize, pod_prefix: &str, expect: usize) -> Vec<Value> {
    let all = pg.wait_audit_records(n, Duration::from_secs(15)).await;
    let prefix = format!("{pod_prefix}-");
    let mine: Vec<Value> = all
        .into_iter()
        .filter(|r| r["pod"].as_str().is_some_and(|p| p.starts_with(&prefix)))
        .collect();
    assert_eq!(
        mine.len(),
        expect,
        "audit records of pods {prefix}*: {mine:#?}\n--- pullgate\n{}",
        tail(&pg.log(), 4000)
    );
    for r in &mine {
        assert_eq!(r["verdict"], "allow", "audit record {r}");
    }
    mine
}

fn cache_hits(records: &[Value]) -> usize {
    records.iter().filter(|r| r["cache_hit"] == true).count()
}

/// pullgate's own decision time per record (`latency_ms`: parse → verdict, before the pull is
/// forwarded).
fn decision_ms(records: &[Value]) -> Vec<f64> {
    records
        .iter()
        .map(|r| {
            r["latency_ms"]
                .as_f64()
                .unwrap_or_else(|| panic!("latency_ms in {r}"))
        })
        .collect()
}

/// One registry request, with the user agent from the raw access log.
#[derive(Debug, Clone)]
struct Hit {
    agent: String,
    method: String,
    uri: String,
}

/// Registry requests after `mark` (a [`Registry::request_count`]), with user agents. The count
/// is checked against [`Registry::requests_since`].
async fn hits_since(reg: &Registry, mark: usize) -> Vec<Hit> {
    let plain = reg.requests_since(mark).await;
    let text = fs::read_to_string(reg.dir().join("access.log")).unwrap_or_default();
    // Same lines `Registry::requests` parses: `… "METHOD URI HTTP/x" STATUS … "REFERER" "AGENT"`.
    let all: Vec<Hit> = text
        .lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split('"').collect();
            if parts.len() < 3 {
                return None;
            }
            let mut request = parts[1].split(' ');
            let method = request.next()?.to_string();
            let uri = request.next()?.to_string();
            parts[2].split_whitespace().next()?.parse::<u16>().ok()?;
            let agent = if parts.len() >= 7 {
                parts[parts.len() - 2].to_string()
            } else {
                String::new()
            };
            Some(Hit { agent, method, uri })
        })
        .collect();
    let hits: Vec<Hit> = all.into_iter().skip(mark).collect();
    assert_eq!(
        hits.len(),
        plain.len(),
        "access log parse disagrees with Registry::requests_since"
    );
    for (h, (m, u)) in hits.iter().zip(&plain) {
        assert!(h.method == *m && h.uri == *u, "{h:?} vs {m} {u}");
    }
    hits
}

/// What a registry request was for: `HEAD manifest by tag`, `GET .sig manifest`, `GET blob`….
fn request_kind(hit: &Hit) -> String {
    let path = hit.uri.split('?').next().unwrap_or_default();
    let what = if path == "/v2/" || path == "/v2" {
        "ping /v2/".to_string()
    } else if let Some((_, reference)) = path.split_once("/manifests/") {
        if reference.ends_with(".sig") {
            ".sig manifest".to_string()
        } else if reference.starts_with("sha256:") {
            "manifest by digest".to_string()
        } else {
            "manifest by tag".to_string()
        }
    } else if path.contains("/blobs/") {
        "blob".to_string()
    } else {
        path.to_string()
    };
    format!("{} {what}", hit.method)
}

/// Requests of user agent `agent_prefix` on repositories under `repo_prefix/`.
fn select<'a>(hits: &'a [Hit], agent_prefix: &str, repo_prefix: &str) -> Vec<&'a Hit> {
    let repo = format!("/v2/{repo_prefix}/");
    hits.iter()
        .filter(|h| h.agent.starts_with(agent_prefix) && h.uri.starts_with(&repo))
        .collect()
}

/// `n` requests per pull for each kind, e.g. `HEAD manifest by tag ×1, GET blob ×1`.
fn per_pull_breakdown(hits: &[&Hit], pulls: usize) -> String {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for h in hits {
        *kinds.entry(request_kind(h)).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(k, c)| format!("{k} ×{}", fmt_ratio(*c, pulls)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_ratio(count: usize, pulls: usize) -> String {
    let r = count as f64 / pulls as f64;
    if (r - r.round()).abs() < 1e-9 {
        format!("{}", r.round() as u64)
    } else {
        format!("{r:.2}")
    }
}

fn added(a: f64, b: f64) -> String {
    format!("{:+.1}", a - b)
}

// ---------------------------------------------------------------------------------------------

async fn run(n: usize) {
    let total = Instant::now();
    let reg = Registry::start().await;
    let ctd = Containerd::start().await;
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let pem_json = serde_json::to_string(&key.public_pem()).expect("pem json");

    // Same-length prefixes `d`/`p`: images of equal size in the direct and the proxied set.
    let setup = Instant::now();
    let warm = push_set(&reg, &key, "w", 2).await;
    let direct = push_set(&reg, &key, "d", n).await;
    let proxied = push_set(&reg, &key, "p", n).await;
    let conc = push_set(&reg, &key, "c", CONCURRENT).await;
    let conc_direct = push_set(&reg, &key, "x", CONCURRENT).await;
    let same = push_set(&reg, &key, "s", 1).await.remove(0);
    // For the 1 000-CIP pullgate: repositories `mI/app`, each covered by exactly one CIP.
    let many_specs = (0..MANY_PULLS)
        .map(|i| (format!("m{i}/app"), format!("bench-m-{i:03}")))
        .collect();
    let many = push_all(&reg, &key, many_specs).await;
    let setup_s = setup.elapsed().as_secs_f64();
    let layer_bytes = TestImage::build("bench-d-000").layer.len();

    let policy = write_policy_dir(&[
        ("namespace.yaml", &namespace_yaml()),
        (
            "cip.yaml",
            &key_cip("bench-signed", &format!("{}/**", reg.addr()), &pem_json),
        ),
    ]);
    let pg_args = [
        "--no-audit-stdout",
        "--cache-ttl",
        "3600",
        "--node-name",
        "bench",
    ];
    let pg = Pullgate::start(&ctd.socket(), policy.path(), &pg_args).await;
    let pg_pid = pid_of(&pg);
    let rss_start = (proc_kib(pg_pid, "VmHWM"), proc_kib(pg_pid, "VmRSS"));

    let mut to_ctd = cri_client(&ctd.socket())
        .await
        .unwrap_or_else(|e| fail("CRI client on containerd", &format!("{e:?}"), None, &ctd));
    let mut to_pg = cri_client(&pg.socket())
        .await
        .unwrap_or_else(|e| fail("CRI client on pullgate", &format!("{e:?}"), Some(&pg), &ctd));
    let mut audit_n = 0;

    // Warm-up: connections, first-use paths in containerd and pullgate.
    must_pull(&mut to_ctd, &warm[0], "warm-0", None, &ctd).await;
    must_pull(&mut to_pg, &warm[1], "warm-1", Some(&pg), &ctd).await;
    audit_n += 1;

    // 1a. Cold: direct and proxied pulls interleaved, so drift hits both alike.
    let mark = reg.request_count().await;
    let mut t_direct = Vec::with_capacity(n);
    let mut t_cold = Vec::with_capacity(n);
    for i in 0..n {
        t_direct.push(must_pull(&mut to_ctd, &direct[i], &format!("direct-{i}"), None, &ctd).await);
        t_cold.push(
            must_pull(
                &mut to_pg,
                &proxied[i],
                &format!("cold-{i}"),
                Some(&pg),
                &ctd,
            )
            .await,
        );
    }
    let cold_hits = hits_since(&reg, mark).await;
    audit_n += n;
    let cold_audit = audit_of(&pg, audit_n, "cold", n).await;
    assert_eq!(
        cache_hits(&cold_audit),
        0,
        "cold pulls answered from the verdict cache"
    );
    let rss_after_1a = proc_kib(pg_pid, "VmHWM");

    // 1b. Remove everything from containerd, pull again: cold pulls, cached verdicts.
    let both: Vec<&Img> = direct.iter().chain(&proxied).collect();
    remove_all(&ctd, &reg, &both).await;
    let mark = reg.request_count().await;
    let mut t_redirect = Vec::with_capacity(n);
    let mut t_cached = Vec::with_capacity(n);
    for i in 0..n {
        t_redirect.push(
            must_pull(
                &mut to_ctd,
                &direct[i],
                &format!("redirect-{i}"),
                None,
                &ctd,
            )
            .await,
        );
        t_cached.push(
            must_pull(
                &mut to_pg,
                &proxied[i],
                &format!("cached-{i}"),
                Some(&pg),
                &ctd,
            )
            .await,
        );
    }
    let cached_hits = hits_since(&reg, mark).await;
    audit_n += n;
    let cached_audit = audit_of(&pg, audit_n, "cached", n).await;
    assert_eq!(
        cache_hits(&cached_audit),
        n,
        "re-pulls must be answered from the verdict cache"
    );

    // 2. 64 concurrent pulls through pullgate; first, as a control, 64 straight into containerd.
    let x_refs: Vec<&Img> = conc_direct.iter().collect();
    let (wall_x, t_x) = concurrent_pulls(&to_ctd, &x_refs, "x", None, &ctd).await;
    let conc_refs: Vec<&Img> = conc.iter().collect();
    let mark = reg.request_count().await;
    let (wall_conc, t_conc) = concurrent_pulls(&to_pg, &conc_refs, "conc", Some(&pg), &ctd).await;
    let conc_hits = hits_since(&reg, mark).await;
    audit_n += CONCURRENT;
    let conc_audit = audit_of(&pg, audit_n, "conc", CONCURRENT).await;

    let same_refs: Vec<&Img> = vec![&same; CONCURRENT];
    let mark = reg.request_count().await;
    let (wall_same, t_same) = concurrent_pulls(&to_pg, &same_refs, "same", Some(&pg), &ctd).await;
    let same_hits = hits_since(&reg, mark).await;
    audit_n += CONCURRENT;
    let same_audit = audit_of(&pg, audit_n, "same", CONCURRENT).await;

    // 3. Peak RSS of this pullgate, then a second one with 1 000 policies.
    let rss_end = (proc_kib(pg_pid, "VmHWM"), proc_kib(pg_pid, "VmRSS"));
    let pulls_total = 1 + 2 * n + 2 * CONCURRENT;
    drop(to_pg);
    let mut pg = pg;
    pg.stop();
    drop(pg);

    let mut cips = String::new();
    for i in 0..MANY_CIPS {
        cips.push_str(&key_cip(
            &format!("bench-{i:04}"),
            &format!("{}/m{i}/**", reg.addr()),
            &pem_json,
        ));
    }
    let many_policy =
        write_policy_dir(&[("namespace.yaml", &namespace_yaml()), ("cips.yaml", &cips)]);
    let started = Instant::now();
    let pg2 = Pullgate::start(&ctd.socket(), many_policy.path(), &pg_args).await;
    let pg2_start_ms = ms(started.elapsed());
    let pg2_pid = pid_of(&pg2);
    let rss2_start = (proc_kib(pg2_pid, "VmHWM"), proc_kib(pg2_pid, "VmRSS"));
    let mut to_pg2 = cri_client(&pg2.socket()).await.unwrap_or_else(|e| {
        fail(
            "CRI client on pullgate (1 000 CIPs)",
            &format!("{e:?}"),
            Some(&pg2),
            &ctd,
        )
    });
    let mut t_many = Vec::with_capacity(MANY_PULLS);
    for (i, img) in many.iter().enumerate() {
        t_many.push(must_pull(&mut to_pg2, img, &format!("many-{i}"), Some(&pg2), &ctd).await);
    }
    let many_audit = audit_of(&pg2, MANY_PULLS, "many", MANY_PULLS).await;
    for r in &many_audit {
        let pod = r["pod"].as_str().unwrap_or_default();
        let i: usize = pod
            .strip_prefix("many-")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("pod {pod:?}"));
        assert_eq!(
            r["policies"],
            serde_json::json!([format!("bench-{i:04}")]),
            "exactly its own CIP covers m{i}/app: {r}"
        );
    }
    let rss2_end = (proc_kib(pg2_pid, "VmHWM"), proc_kib(pg2_pid, "VmRSS"));
    drop(to_pg2);
    drop(pg2);

    // ---------------------------------------------------------------------------------------
    // Report.
    let s_direct = stats(&t_direct);
    let s_cold = stats(&t_cold);
    let s_redirect = stats(&t_redirect);
    let s_cached = stats(&t_cached);
    let s_conc = stats(&t_conc);
    let s_x = stats(&t_x);
    let paired_cold = stats(&paired(&t_cold, &t_direct));
    let paired_cached = stats(&paired(&t_cached, &t_redirect));
    let s_same = stats(&t_same);
    let s_many = stats(&t_many);
    let d_cold = stats(&decision_ms(&cold_audit));
    let d_cached = stats(&decision_ms(&cached_audit));
    let d_conc = stats(&decision_ms(&conc_audit));
    let d_same = stats(&decision_ms(&same_audit));
    let d_many = stats(&decision_ms(&many_audit));

    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!();
    println!("## pullgate end-to-end pulls (benches/pull.rs)");
    println!();
    println!(
        "N = {n}; {cores} cores; containerd snapshotter {}; one-layer images, layer {layer_bytes} B gzip; \
         registry, containerd and pullgate (release) on loopback; setup (push + sign {} images) {setup_s:.1} s",
        ctd.snapshotter(),
        2 + 2 * n + 2 * CONCURRENT + 1 + MANY_PULLS,
    );
    println!();
    println!("### 1. Sequential pulls (CRI PullImage, one persistent client per socket)");
    println!();
    println!("| pull | n | median ms | p90 ms | min ms | max ms | added (median) ms | pullgate decision median ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let row = |name: &str, s: &Stats, count: usize, add: &str, dec: &str| {
        println!(
            "| {name} | {count} | {:.1} | {:.1} | {:.1} | {:.1} | {add} | {dec} |",
            s.median, s.p90, s.min, s.max
        );
    };
    row("direct to containerd, cold", &s_direct, n, "—", "—");
    row(
        "via pullgate, cold verdict",
        &s_cold,
        n,
        &added(s_cold.median, s_direct.median),
        &format!("{:.1}", d_cold.median),
    );
    row(
        "direct re-pull after RemoveImage (control)",
        &s_redirect,
        n,
        &format!("{} vs direct", added(s_redirect.median, s_direct.median)),
        "—",
    );
    row(
        "via pullgate re-pull after RemoveImage, cached verdict",
        &s_cached,
        n,
        &format!(
            "{} vs direct; {} vs direct re-pull",
            added(s_cached.median, s_direct.median),
            added(s_cached.median, s_redirect.median)
        ),
        &format!("{:.1}", d_cached.median),
    );
    println!();
    println!(
        "Paired (pull i via pullgate minus the direct pull made just before it): cold verdict median {:+.1} ms (p90 {:+.1}); \
         cached verdict minus direct re-pull median {:+.1} ms (p90 {:+.1}).",
        paired_cold.median, paired_cold.p90, paired_cached.median, paired_cached.p90
    );
    println!();
    println!("### 2. 64 concurrent pulls (one client, HTTP/2 streams)");
    println!();
    println!("| pulls | wall ms | per-pull median ms | p90 ms | max ms | verifications run | pullgate decision median ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    println!(
        "| 64 distinct images, cold, direct to containerd (control) | {wall_x:.1} | {:.1} | {:.1} | {:.1} | — | — |",
        s_x.median, s_x.p90, s_x.max
    );
    println!(
        "| 64 distinct images, cold, via pullgate | {wall_conc:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
        s_conc.median,
        s_conc.p90,
        s_conc.max,
        CONCURRENT - cache_hits(&conc_audit),
        d_conc.median
    );
    println!(
        "| 64 × one image, cold, via pullgate | {wall_same:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} |",
        s_same.median,
        s_same.p90,
        s_same.max,
        CONCURRENT - cache_hits(&same_audit),
        d_same.median
    );
    println!();
    println!("### 3. pullgate memory (/proc/PID/status)");
    println!();
    println!("| pullgate | VmHWM at start MiB | VmRSS at start MiB | VmHWM at end MiB | VmRSS at end MiB |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| 1 CIP, after {pulls_total} pulls (sections 1–2) | {:.1} | {:.1} | {:.1} | {:.1} |",
        mib(rss_start.0),
        mib(rss_start.1),
        mib(rss_end.0),
        mib(rss_end.1)
    );
    println!(
        "| {MANY_CIPS} CIPs, after {MANY_PULLS} pulls | {:.1} | {:.1} | {:.1} | {:.1} |",
        mib(rss2_start.0),
        mib(rss2_start.1),
        mib(rss2_end.0),
        mib(rss2_end.1)
    );
    println!();
    println!(
        "{MANY_CIPS}-CIP pullgate: ready {pg2_start_ms:.0} ms after spawn; its {MANY_PULLS} cold pulls: median {:.1} ms, p90 {:.1} ms (decision median {:.1} ms)",
        s_many.median, s_many.p90, d_many.median
    );
    println!(
        "1-CIP pullgate VmHWM after section 1a ({} pulls): {:.1} MiB",
        1 + n,
        mib(rss_after_1a)
    );
    println!();
    println!("### Registry requests per pull (access log, by user agent)");
    println!();
    let pg_cold = select(&cold_hits, "pullgate/", "p");
    let ctd_cold_p = select(&cold_hits, "containerd/", "p");
    let ctd_cold_d = select(&cold_hits, "containerd/", "d");
    let pg_cached = select(&cached_hits, "pullgate/", "p");
    let ctd_cached_p = select(&cached_hits, "containerd/", "p");
    let ctd_redirect = select(&cached_hits, "containerd/", "d");
    let pg_conc = select(&conc_hits, "pullgate/", "c");
    let pg_same = select(&same_hits, "pullgate/", "s");
    let ctd_same = select(&same_hits, "containerd/", "s");
    let others: Vec<&Hit> = cold_hits
        .iter()
        .chain(&cached_hits)
        .filter(|h| !h.agent.starts_with("pullgate/") && !h.agent.starts_with("containerd/"))
        .collect();
    println!("| pull | by | requests per pull | which |");
    println!("|---|---|---:|---|");
    let req_row = |what: &str, by: &str, hits: &[&Hit], pulls: usize| {
        println!(
            "| {what} | {by} | {} | {} |",
            fmt_ratio(hits.len(), pulls),
            per_pull_breakdown(hits, pulls)
        );
    };
    req_row("via pullgate, cold verdict", "pullgate", &pg_cold, n);
    req_row(
        "via pullgate, cold verdict",
        "containerd (pinned)",
        &ctd_cold_p,
        n,
    );
    req_row("direct, cold", "containerd", &ctd_cold_d, n);
    req_row("via pullgate, cached verdict", "pullgate", &pg_cached, n);
    req_row(
        "via pullgate, cached verdict",
        "containerd (pinned)",
        &ctd_cached_p,
        n,
    );
    req_row("direct re-pull", "containerd", &ctd_redirect, n);
    req_row("64 concurrent distinct", "pullgate", &pg_conc, CONCURRENT);
    req_row(
        "64 concurrent × one image",
        "pullgate",
        &pg_same,
        CONCURRENT,
    );
    req_row(
        "64 concurrent × one image",
        "containerd",
        &ctd_same,
        CONCURRENT,
    );
    if !others.is_empty() {
        println!();
        println!("(other user agents in sections 1a/1b: {others:?})");
    }
    println!();
    println!("### Raw numbers (ms, in pull order)");
    println!();
    println!("direct cold:            {}", raw(&t_direct));
    println!("via pullgate cold:      {}", raw(&t_cold));
    println!("direct re-pull:         {}", raw(&t_redirect));
    println!("via pullgate cached:    {}", raw(&t_cached));
    println!("concurrent direct:      {}", raw(&t_x));
    println!("concurrent distinct:    {}", raw(&t_conc));
    println!("concurrent one image:   {}", raw(&t_same));
    println!("1000-CIP pullgate cold: {}", raw(&t_many));
    println!(
        "pullgate decision (audit latency_ms) cold: {}",
        raw(&decision_ms(&cold_audit))
    );
    println!(
        "pullgate decision (audit latency_ms) cached: {}",
        raw(&decision_ms(&cached_audit))
    );
    println!(
        "pullgate decision (audit latency_ms) 1000 CIPs: {}",
        raw(&decision_ms(&many_audit))
    );
    println!(
        "VmHWM/VmRSS KiB: 1 CIP start {}/{}, after 1a {}, end {}/{}; {MANY_CIPS} CIPs start {}/{}, end {}/{}",
        rss_start.0,
        rss_start.1,
        rss_after_1a,
        rss_end.0,
        rss_end.1,
        rss2_start.0,
        rss2_start.1,
        rss2_end.0,
        rss2_end.1
    );
    println!(
        "registry requests: section 1a {} ({} pullgate), 1b {} ({} pullgate), concurrent distinct {} ({} pullgate), concurrent one image {} ({} pullgate)",
        cold_hits.len(),
        pg_cold.len(),
        cached_hits.len(),
        pg_cached.len(),
        conc_hits.len(),
        pg_conc.len(),
        same_hits.len(),
        pg_same.len()
    );
    println!();
    println!("total run time {:.1} s", total.elapsed().as_secs_f64());
    drop(to_ctd);
    drop(ctd);
    drop(reg);
}

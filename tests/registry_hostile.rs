//! A hostile registry against `pullgate verify`: a signature manifest listing 256 signature
//! layers of 1 MiB each (and the OCI referrers variant: 256 referrer manifests with a 1 MiB
//! bundle each). One decision must stay within its fetch budget and fail closed with that
//! reason, with its peak memory (read by GNU time from the kernel's accounting of the
//! `pullgate` process) bounded; and a signature that passes stops the fetching.
//!
//! `PULLGATE_TEST_BIN=/path/to/pullgate` runs another build (to measure an older one); the
//! figures are printed with `--nocapture`.

mod common;
mod hostile;

use std::process::Command;

use common::*;
use hostile::{Hostile, Recorded};

const LAYERS: usize = 256;
const MIB: usize = 1 << 20;
const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const BUNDLE_TYPE: &str = "application/vnd.dev.sigstore.bundle.v0.3+json";
/// Peak RSS a decision may reach here: the 16 MiB budget, the binary and its runtime, with
/// room for allocator slack. Before the budget one decision peaked at about 330 MB.
const PEAK_LIMIT_KIB: u64 = 96 * 1024;

fn key_cip(glob: &str, key: &TestKey, authority_extra: &str) -> String {
    format!(
        "apiVersion: policy.sigstore.dev/v1beta1\nkind: ClusterImagePolicy\nmetadata: {{name: signed}}\nspec:\n  images: [{{glob: \"{glob}\"}}]\n  authorities:\n  - key: {{data: {}}}\n{authority_extra}",
        serde_json::to_string(&key.public_pem()).unwrap()
    )
}

/// An image digest the fixture pretends to hold.
fn image_digest(seed: u64) -> String {
    hostile::sha256(&hostile::generated(seed, 64))
}

/// One `pullgate verify --output json` run under GNU time: its answer and peak RSS in KiB.
struct Run {
    code: i32,
    json: serde_json::Value,
    stderr: String,
    peak_kib: u64,
}

async fn verify_measured(policy: &str, image: &str) -> Run {
    let dir = write_policy_dir(&[("cip.yaml", policy)]);
    let home = tempfile::tempdir().unwrap();
    let time_out = home.path().join("peak");
    let bin = pullgate_bin();
    let mut cmd = Command::new("/usr/bin/time");
    cmd.arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&time_out)
        .arg(bin)
        .args(["verify", "--output", "json", "--policy"])
        .arg(dir.path())
        .arg(image)
        .env("HOME", home.path())
        .env("DOCKER_CONFIG", home.path().join(".docker"))
        .env_remove("RUST_LOG");
    let out = tokio::task::spawn_blocking(move || run_with_timeout(cmd, DEFAULT_TIMEOUT))
        .await
        .unwrap();
    let peak = std::fs::read_to_string(&time_out).unwrap_or_default();
    let peak_kib = peak
        .lines()
        .rev()
        .find_map(|l| l.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no peak RSS from GNU time: {peak:?}\n{}", out.stderr));
    Run {
        code: out.code,
        json: serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null),
        stderr: out.stderr,
        peak_kib,
    }
}

fn blob_gets(requests: &[Recorded]) -> usize {
    requests
        .iter()
        .filter(|r| r.method == "GET" && r.uri.contains("/blobs/"))
        .count()
}

/// Serves `LAYERS` signature layers of 1 MiB at `repo`'s signature tag for `digest`, with
/// `first` (payload and signature) ahead of them when given.
fn serve_signature_flood(
    reg: &Hostile,
    repo: &str,
    digest: &str,
    first: Option<(Vec<u8>, String)>,
) {
    let mut layers = Vec::new();
    if let Some((payload, signature)) = first {
        let layer_digest = hostile::sha256(&payload);
        reg.serve(&format!("/v2/{repo}/blobs/{layer_digest}"), payload.clone());
        layers.push(serde_json::json!({
            "mediaType": SIMPLE_SIGNING, "digest": layer_digest, "size": payload.len(),
            "annotations": {"dev.cosignproject.cosign/signature": signature},
        }));
    }
    for i in 0..LAYERS - layers.len() {
        let layer_digest = reg.serve_generated(&format!("/v2/{repo}/blobs/"), i as u64, MIB);
        layers.push(serde_json::json!({
            "mediaType": SIMPLE_SIGNING, "digest": layer_digest, "size": MIB,
            "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQDjunk"},
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": hostile::sha256(b"{}"), "size": 2},
        "layers": layers,
    });
    reg.serve(
        &format!("/v2/{repo}/manifests/{}", signature_tag(digest)),
        serde_json::to_vec(&manifest).unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signature_flood_fails_closed_within_the_budget() {
    let reg = Hostile::start().await;
    let digest = image_digest(1);
    serve_signature_flood(&reg, "app", &digest, None);
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let cip = key_cip(&format!("{}/**", reg.addr()), &key, "");

    let run = verify_measured(&cip, &format!("{}/app@{digest}", reg.addr())).await;
    let gets = blob_gets(&reg.requests());
    println!(
        "signature flood ({LAYERS} x 1 MiB layers): exit {}, peak RSS {} KiB, {gets} blob GETs",
        run.code, run.peak_kib
    );
    assert_eq!(
        (run.code, run.json["verdict"].as_str()),
        (2, Some("error")),
        "{} {}",
        run.json,
        run.stderr
    );
    let reasons = run.json["reasons"].to_string();
    assert!(
        reasons.contains("more than this decision may read from registries"),
        "{reasons}"
    );
    assert!(
        run.peak_kib < PEAK_LIMIT_KIB,
        "peak RSS {} KiB",
        run.peak_kib
    );
    // 16 MiB of budget, and at most a few fetches in flight when it ran out.
    assert!(gets <= 16 + 4, "{gets} blobs fetched");
}

#[tokio::test(flavor = "multi_thread")]
async fn referrer_flood_fails_closed_within_the_budget() {
    let reg = Hostile::start().await;
    let digest = image_digest(2);
    // Each referrer manifest carries 256 KiB of padding and names a 1 MiB bundle blob.
    let padding = "p".repeat(256 << 10);
    let mut entries = Vec::new();
    for i in 0..LAYERS {
        let blob = reg.serve_generated("/v2/app/blobs/", 1000 + i as u64, MIB);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": BUNDLE_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                       "digest": hostile::sha256(b"{}"), "size": 2},
            "layers": [{"mediaType": BUNDLE_TYPE, "digest": blob, "size": MIB}],
            "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digest, "size": 100},
            "annotations": {"padding": padding},
        }))
        .unwrap();
        let manifest_digest = hostile::sha256(&manifest);
        reg.serve(&format!("/v2/app/manifests/{manifest_digest}"), manifest);
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "artifactType": BUNDLE_TYPE,
        }));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    });
    reg.serve(
        &format!("/v2/app/referrers/{digest}"),
        serde_json::to_vec(&index).unwrap(),
    );
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let cip = key_cip(
        &format!("{}/**", reg.addr()),
        &key,
        "    signatureFormat: bundle\n",
    );

    let run = verify_measured(&cip, &format!("{}/app@{digest}", reg.addr())).await;
    let requests = reg.requests();
    let manifests = requests
        .iter()
        .filter(|r| r.uri.contains("/manifests/sha256:"))
        .count();
    println!(
        "referrer flood ({LAYERS} referrers, 256 KiB manifest + 1 MiB bundle each): exit {}, \
         peak RSS {} KiB, {manifests} referrer manifests and {} blobs fetched",
        run.code,
        run.peak_kib,
        blob_gets(&requests)
    );
    assert_eq!(
        (run.code, run.json["verdict"].as_str()),
        (2, Some("error")),
        "{} {}",
        run.json,
        run.stderr
    );
    let reasons = run.json["reasons"].to_string();
    assert!(
        reasons.contains("more than this decision may read from registries"),
        "{reasons}"
    );
    assert!(
        run.peak_kib < PEAK_LIMIT_KIB,
        "peak RSS {} KiB",
        run.peak_kib
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passing_signature_stops_the_fetching() {
    let reg = Hostile::start().await;
    let digest = image_digest(3);
    let key = TestKey::generate(KeyKind::EcdsaP256);
    let signed = cosign_sign_layer(&format!("{}/app", reg.addr()), &digest, &key);
    let signature = signed.signature_b64().unwrap().to_string();
    serve_signature_flood(&reg, "app", &digest, Some((signed.payload, signature)));
    let cip = key_cip(&format!("{}/**", reg.addr()), &key, "");

    let run = verify_measured(&cip, &format!("{}/app@{digest}", reg.addr())).await;
    let gets = blob_gets(&reg.requests());
    println!(
        "valid signature first, then {} x 1 MiB: exit {}, peak RSS {} KiB, {gets} blob GETs",
        LAYERS - 1,
        run.code,
        run.peak_kib
    );
    assert_eq!(
        (run.code, run.json["verdict"].as_str()),
        (0, Some("allow")),
        "{} {}",
        run.json,
        run.stderr
    );
    // The first layer passed: only what was already in flight beside it was fetched.
    assert!(gets <= 1 + 4, "{gets} blobs fetched after the first passed");
    assert!(
        run.peak_kib < PEAK_LIMIT_KIB,
        "peak RSS {} KiB",
        run.peak_kib
    );
}

//! Test harness for pullgate's integration tests.
//!
//! Independent of the `pullgate` library on purpose: it uses only the sigstore and oci-client
//! crates, the Debian `docker-registry` and `skopeo` binaries, and the built `pullgate` binary,
//! so it can check pullgate from the outside.
//!
//! Everything is loopback and lives in temp dirs; child processes are killed on drop.
//!
//! Most helpers are `async`: write tests as
//! `#[tokio::test(flavor = "multi_thread")] async fn …`. Blocking helpers (child processes,
//! [`run_pullgate`], [`mirror_with_signatures`]) are plain functions; they only wait on other
//! processes, never on the test's runtime.
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[tokio::test(flavor = "multi_thread")]
//! async fn signed_image_is_allowed() {
//!     let reg = Registry::start().await;
//!     let digest = reg.push_image("app", "v1", "seed-a").await;
//!     let key = TestKey::generate(KeyKind::EcdsaP256);
//!     reg.sign("app", &digest, &key).await;
//!     let policy = write_policy_dir(&[("cip.yaml", "…")]);
//!     let dir = policy.path().to_str().unwrap();
//!     let out = run_pullgate_async(&["verify", "--policy", dir, &reg.tag_ref("app", "v1")], &[]).await;
//!     assert_eq!(out.code, 0, "{}", out.stderr);
//! }
//! ```
#![allow(dead_code, unused_imports)]

pub mod attest;
mod containerd;
mod cosign;
pub mod fake_api;
pub mod fulcio;
pub mod https;
mod image;
mod keys;
mod pods;
mod process;
pub mod references;
mod registry;
mod rekor;
mod skopeo;
pub mod testbed;
pub mod tsa;
pub mod tuf;

use std::fs;
use std::path::Path;

pub use containerd::{
    connect_uds, cri_client, image_fs_info, image_status, image_status_response, list_images, pull,
    pull_request, pull_with, remove_image, status_parts, Containerd, ContainerdBinary,
    ContainerdOptions, Pullgate, DEFAULT_SANDBOX_IMAGE, K8S_NAMESPACE,
};
pub use cosign::{
    cosign_sign_layer, signature_tag, simple_signing_payload, SigLayer, BUNDLE_ANNOTATION,
    CERTIFICATE_ANNOTATION, CHAIN_ANNOTATION, SIGNATURE_ANNOTATION, SIMPLESIGNING_MEDIA_TYPE,
};
pub use image::{go_arch, media_type_of, sha256_digest, TestImage, BUSYBOX_PATH, MANIFEST_ACCEPT};
pub use keys::{verify_b64, KeyKind, TestKey};
pub use pods::{
    container_config, container_status, create_container, create_container_with, list_containers,
    list_pod_sandboxes, pod_sandbox_config, pod_sandbox_status, remove_container,
    remove_pod_sandbox, run_pod_sandbox_with, runtime_client, start_container, stop_container,
    stop_pod_sandbox, wait_container_state, PodSandbox,
};
pub use process::{
    pullgate_bin, pullgate_command, run_pullgate, run_pullgate_async, run_pullgate_with,
    run_with_timeout, Output, DEFAULT_TIMEOUT,
};
pub use registry::{HttpResponse, Registry, Request, TEST_PASSWORD, TEST_USER};
pub use rekor::{bundle_json, canonical_set_payload, hashedrekord_body, TestRekor};
pub use skopeo::{mirror_with_signatures, try_mirror_with_signatures};

/// A temp dir holding `files` (`(relative path, contents)`; parent dirs created). The dir is
/// removed when the returned value drops.
pub fn write_policy_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pullgate-policy-")
        .tempdir()
        .expect("policy temp dir");
    for (name, contents) in files {
        write_file(dir.path(), name, contents);
    }
    dir
}

/// `pullgate verify --output json` on the policy files given: its exit code, JSON answer and
/// stderr.
pub struct Verified {
    pub code: i32,
    pub json: serde_json::Value,
    pub stderr: String,
}

impl Verified {
    pub fn verdict(&self) -> &str {
        self.json["verdict"].as_str().unwrap_or("<none>")
    }

    pub fn reasons(&self) -> String {
        self.json["reasons"].to_string()
    }
}

/// Asserts that `pullgate verify` allowed the image (exit 0, verdict allow).
pub fn assert_allowed(v: &Verified) {
    assert_eq!(
        (v.code, v.verdict()),
        (0, "allow"),
        "{} {}",
        v.json,
        v.stderr
    );
}

/// Asserts that `pullgate verify` denied the image (exit 1) with `cause` among the reasons.
pub fn assert_denied(v: &Verified, cause: &str) {
    assert_eq!(
        (v.code, v.verdict()),
        (1, "deny"),
        "{} {}",
        v.json,
        v.stderr
    );
    assert!(
        v.reasons().contains(cause),
        "wanted {cause:?} in {}",
        v.reasons()
    );
}

/// DSSE pre-authentication encoding (what an envelope's signatures cover), written from the
/// DSSE specification apart from pullgate's own.
pub fn dsse_pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Runs `pullgate verify --policy DIR --output json EXTRA… IMAGE` with `files` in DIR.
pub async fn verify_json(files: &[(&str, &str)], image: &str, extra: &[&str]) -> Verified {
    let dir = write_policy_dir(files);
    let policy = dir.path().to_str().expect("UTF-8 temp path").to_string();
    let mut args = vec!["verify", "--policy", &policy, "--output", "json"];
    args.extend_from_slice(extra);
    args.push(image);
    let out = run_pullgate_async(&args, &[]).await;
    Verified {
        code: out.code,
        json: serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null),
        stderr: out.stderr,
    }
}

/// Writes `contents` to `dir/name`, creating parent dirs.
pub fn write_file(dir: &Path, name: &str, contents: &str) {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create parent dir");
    }
    fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

//! Mirroring an image together with its cosign signature using skopeo.

use std::fs;
use std::process::Command;

use super::process::{run_with_timeout, Output, DEFAULT_TIMEOUT};

/// `skopeo copy docker://SRC docker://DST` (both `HOST:PORT/REPO:TAG`, plain HTTP, anonymous),
/// digests preserved, with `use-sigstore-attachments: true` so the `sha256-<hex>.sig`
/// signature travels too. Panics with skopeo's output on failure.
pub fn mirror_with_signatures(src: &str, dst: &str) {
    let out = try_mirror_with_signatures(src, dst, &["--src-no-creds", "--dest-no-creds"]);
    assert!(
        out.success(),
        "skopeo copy {src} -> {dst} failed ({})\n--- stdout\n{}\n--- stderr\n{}",
        out.code,
        out.stdout,
        out.stderr
    );
}

/// Like [`mirror_with_signatures`], returning skopeo's output; `extra_args` go to `skopeo copy`
/// (for example `--src-creds USER:PASS`).
///
/// skopeo runs with its own `HOME`, `registries.conf`, `registries.d` and an
/// accept-anything `policy.json`, all in a temp dir. (As root it still writes its blob-info
/// cache under /var/lib/containers/cache; skopeo has no flag to move that.)
pub fn try_mirror_with_signatures(src: &str, dst: &str, extra_args: &[&str]) -> Output {
    let dir = tempfile::Builder::new()
        .prefix("pullgate-skopeo-")
        .tempdir()
        .expect("skopeo temp dir");
    let registries_d = dir.path().join("registries.d");
    fs::create_dir_all(&registries_d).expect("registries.d");
    fs::write(
        registries_d.join("default.yaml"),
        "default-docker:\n  use-sigstore-attachments: true\n",
    )
    .expect("registries.d/default.yaml");
    let policy = dir.path().join("policy.json");
    fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .expect("policy.json");
    let registries_conf = dir.path().join("registries.conf");
    fs::write(&registries_conf, "").expect("registries.conf");

    let mut cmd = Command::new("skopeo");
    cmd.arg("--policy")
        .arg(&policy)
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg("--dest-tls-verify=false")
        .arg("--preserve-digests")
        .arg("--registries.d")
        .arg(&registries_d)
        .args(extra_args)
        .arg(format!("docker://{src}"))
        .arg(format!("docker://{dst}"))
        .env("HOME", dir.path())
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("REGISTRY_AUTH_FILE", dir.path().join("auth.json"))
        .env("CONTAINERS_REGISTRIES_CONF", &registries_conf);
    run_with_timeout(cmd, DEFAULT_TIMEOUT)
}

//! The test bed's real peers (cosign, crictl, containerd 2.x, …) built by
//! `tests/testbed/install.sh` from their published Go modules.
//!
//! They are found in `$PULLGATE_TESTBED_BIN`, else in `$PULLGATE_TESTBED_CACHE/bin`, else in
//! `/var/cache/pullgate-testbed/bin`. A missing peer skips a test loudly on a developer machine,
//! but fails it when `CI` is set: CI runs install.sh, so a missing binary there is a bug.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::process::{run_with_timeout, Output};

/// The directory holding the test bed's binaries (symlinks into the version-keyed cache).
pub fn testbed_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PULLGATE_TESTBED_BIN") {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("PULLGATE_TESTBED_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pullgate-testbed"));
    cache.join("bin")
}

/// The status line install.sh recorded for `peer` (`name version state seconds reason`), if any.
pub fn testbed_status(peer: &str) -> Option<String> {
    let status = testbed_bin_dir().parent()?.join("status");
    let text = std::fs::read_to_string(status).ok()?;
    text.lines()
        .find(|l| l.split('\t').next() == Some(peer))
        .map(|l| l.replace('\t', " "))
}

/// Path of the test-bed binary `name`, or `None` (after a loud message) when it is missing and
/// `CI` is unset. Panics when it is missing and `CI` is set.
pub fn testbed_binary(name: &str) -> Option<PathBuf> {
    let path = testbed_bin_dir().join(name);
    if is_executable(&path) {
        return Some(path);
    }
    let status = testbed_status(name)
        .map(|s| format!(" (install.sh status: {s})"))
        .unwrap_or_default();
    let msg = format!(
        "test-bed binary `{name}` not found at {}{status}: run `tests/testbed/install.sh` \
         (or set PULLGATE_TESTBED_BIN)",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n");
    None
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The real `cosign` CLI, run with a throwaway `HOME` (no `~/.sigstore` TUF cache, no docker
/// credentials), a fixed key password and a deadline.
pub struct Cosign {
    bin: PathBuf,
    home: tempfile::TempDir,
}

/// Password of the keys [`Cosign::generate_key_pair`] writes.
pub const COSIGN_TEST_PASSWORD: &str = "pullgate-cosign-test";

/// The flags `cosign sign --key` and `cosign attest --key` need against a plain-HTTP loopback
/// registry with no Rekor, Fulcio or TUF reachable: no transparency-log upload, no TUF-provided
/// signing config (cosign v3 refuses `--tlog-upload=false` together with it), HTTP allowed, and
/// no confirmation prompt. Add `--new-bundle-format=false` for the legacy `.sig`/`.att` tags
/// (cosign v3 writes Sigstore bundles as OCI referrers by default).
pub const COSIGN_OFFLINE_SIGN_FLAGS: &[&str] = &[
    "--tlog-upload=false",
    "--use-signing-config=false",
    "--allow-http-registry",
    "--allow-insecure-registry",
    "-y",
];

impl Cosign {
    /// The test bed's cosign, or `None` (skip) as [`testbed_binary`] decides.
    pub fn find() -> Option<Cosign> {
        let bin = testbed_binary("cosign")?;
        let home = tempfile::Builder::new()
            .prefix("pullgate-cosign-home-")
            .tempdir()
            .expect("cosign HOME");
        Some(Cosign { bin, home })
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// `cosign ARGS` with the test environment; returns its output whatever the exit code.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HOME", self.home.path())
            .env("DOCKER_CONFIG", self.home.path().join(".docker"))
            .env("TUF_ROOT", self.home.path().join(".sigstore"))
            .env("COSIGN_PASSWORD", COSIGN_TEST_PASSWORD)
            .env("COSIGN_YES", "true")
            .env_remove("SIGSTORE_ID_TOKEN")
            .env_remove("ACTIONS_ID_TOKEN_REQUEST_URL")
            .stdin(Stdio::null());
        run_with_timeout(cmd, Duration::from_secs(60))
    }

    /// Like [`Cosign::run`], panicking with cosign's output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert_eq!(
            out.code,
            0,
            "cosign {} failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out
    }

    /// `cosign generate-key-pair` in `dir`: returns (`cosign.key`, `cosign.pub`).
    pub fn generate_key_pair(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let prefix = dir.join("cosign");
        self.ok(&[
            "generate-key-pair",
            "--output-key-prefix",
            prefix.to_str().expect("UTF-8 path"),
        ]);
        (dir.join("cosign.key"), dir.join("cosign.pub"))
    }

    /// `cosign version`'s GitVersion line.
    pub fn version(&self) -> String {
        let out = self.ok(&["version"]);
        format!("{}{}", out.stdout, out.stderr)
            .lines()
            .find(|l| l.starts_with("GitVersion"))
            .unwrap_or("GitVersion: unknown")
            .to_string()
    }
}

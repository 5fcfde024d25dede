//! A real containerd (Debian's 1.6, or the binary `PULLGATE_TEST_CONTAINERD` names, e.g. the
//! test bed's 2.x) per test, CRI clients that talk to any CRI socket
//! (containerd's own or `pullgate serve`'s), and a `pullgate serve` child process.
//!
//! ```ignore
//! let ctd = Containerd::start().await;
//! let image_ref = pull(&ctd.socket(), "127.0.0.1:5000/app:v1", Some("prod"), "web-0").await?;
//! assert!(ctd.content_digests().await.contains(&layer_digest));
//! let pg = Pullgate::start(&ctd.socket(), policy_dir.path(), &["--node-name", "n1"]).await;
//! pull(&pg.socket(), "127.0.0.1:5000/app:v1", Some("prod"), "web-0").await?;
//! ```
//!
//! containerd runs as a child process with root, state, sockets, `certs.d` and its log in one
//! short temp dir under `/tmp` (unix socket paths must stay below 108 bytes). The CRI plugin uses
//! the `overlayfs` snapshotter when an overlay mount works in that dir, else `native` (override
//! with `PULLGATE_TEST_SNAPSHOTTER=native|overlayfs`). Loopback registries are plain HTTP for
//! containerd without any hosts config. On drop, containerd is stopped, anything still
//! mounted under its dir is unmounted and the dir is removed.
//!
//! `PULLGATE_TEST_CONTAINERD=/path/to/containerd` runs that binary instead of `containerd` from
//! `PATH`; its major version (`containerd --version`) picks the config: `version = 2` with the
//! `io.containerd.grpc.v1.cri` plugin for 1.x, `version = 3` with `io.containerd.cri.v1.runtime`
//! and `io.containerd.cri.v1.images` for 2.x. Its directory goes first on the process's `PATH`,
//! so the `containerd-shim-runc-v2` (and `ctr`) beside it are the ones used.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{ListContentRequest, ListImagesRequest};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{
    Image, ImageFsInfoRequest, ImageFsInfoResponse, ImageSpec, ImageStatusRequest,
    ImageStatusResponse, ListImagesRequest as CriListImagesRequest, PodSandboxConfig,
    PodSandboxMetadata, PullImageRequest, RemoveImageRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::process::pullgate_command;

/// The containerd namespace the CRI plugin keeps its images in.
pub const K8S_NAMESPACE: &str = "k8s.io";

const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(20);
const PULLGATE_READY_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The CRI plugin's `sandbox_image` when a test sets none: never pulled unless a test runs a
/// pod sandbox without [`ContainerdOptions::sandbox_image`].
pub const DEFAULT_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.6";

/// How [`Containerd::start_with`] configures containerd.
#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// The CRI plugin's `sandbox_image` (pause image), pulled by containerd itself on the first
    /// `RunPodSandbox`; e.g. a [`TestImage::busybox`](super::TestImage::busybox) pushed to a
    /// test registry. `None`: [`DEFAULT_SANDBOX_IMAGE`].
    pub sandbox_image: Option<String>,
}

impl ContainerdOptions {
    /// Sets [`ContainerdOptions::sandbox_image`].
    pub fn sandbox_image(mut self, image: impl Into<String>) -> Self {
        self.sandbox_image = Some(image.into());
        self
    }
}

/// A running containerd with everything in one temp dir. Stopped (and cleaned up) on drop.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    snapshotter: String,
    options: ContainerdOptions,
    binary: &'static ContainerdBinary,
}

/// The containerd binary the tests run, and what `--version` said about it.
#[derive(Debug)]
pub struct ContainerdBinary {
    /// `$PULLGATE_TEST_CONTAINERD`, else `containerd` (looked up on `PATH`).
    pub path: PathBuf,
    /// The version `containerd --version` printed (`1.6.20~ds1`, `v2.2.10`, ...).
    pub version: String,
    /// Its major version: 1 → `version = 2` config, 2 or later → `version = 3`.
    pub major: u32,
}

impl ContainerdBinary {
    /// The binary of this test process (`PULLGATE_TEST_CONTAINERD` is read once), version
    /// detected. Panics when it cannot run or its version is unreadable.
    pub fn get() -> &'static ContainerdBinary {
        static BINARY: OnceLock<ContainerdBinary> = OnceLock::new();
        BINARY.get_or_init(|| {
            let path = match std::env::var_os("PULLGATE_TEST_CONTAINERD") {
                Some(p) if !p.is_empty() => PathBuf::from(p),
                _ => PathBuf::from("containerd"),
            };
            let out = Command::new(&path)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", path.display()));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (version, major) = parse_containerd_version(&text).unwrap_or_else(|| {
                panic!(
                    "{} --version: no version in {text:?} (stderr {:?})",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            ContainerdBinary {
                path,
                version,
                major,
            }
        })
    }

    /// The directory holding the binary when it was given as a path (its shim and `ctr` are
    /// taken from there), `None` for a bare `containerd` found on `PATH`.
    pub fn dir(&self) -> Option<&Path> {
        self.path.parent().filter(|d| !d.as_os_str().is_empty())
    }

    /// `ctr` beside the binary when there is one, else `ctr` on `PATH`.
    pub fn ctr(&self) -> PathBuf {
        self.dir()
            .map(|d| d.join("ctr"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("ctr"))
    }

    /// `PATH` for containerd: the binary's directory first (containerd finds
    /// `containerd-shim-runc-v2` on `PATH`), then this process's `PATH`.
    fn path_env(&self) -> Option<std::ffi::OsString> {
        let dir = self.dir()?;
        let mut dirs = vec![dir.to_path_buf()];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).ok()
    }
}

/// `(version, major)` from `containerd --version` output:
/// `containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3` or
/// `containerd github.com/containerd/containerd/v2 v2.2.10 module-proxy`.
fn parse_containerd_version(text: &str) -> Option<(String, u32)> {
    let version = text.split_whitespace().nth(2)?;
    let major = version
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()?;
    Some((version.to_string(), major))
}

impl Containerd {
    /// Writes the config, starts `containerd --config DIR/config.toml` and waits (≤ 20 s) until
    /// `ctr version` answers and the CRI plugin serves `ImageFsInfo`. Panics with the log
    /// otherwise. Same as [`Containerd::start_with`] with default options.
    pub async fn start() -> Containerd {
        Containerd::start_with(ContainerdOptions::default()).await
    }

    /// [`Containerd::start`] with options, e.g. the sandbox image pods run with:
    /// `Containerd::start_with(ContainerdOptions::default().sandbox_image(reg.tag_ref("pause", "v1")))`.
    pub async fn start_with(options: ContainerdOptions) -> Containerd {
        let dir = short_tempdir("pgc-");
        let snapshotter = match std::env::var("PULLGATE_TEST_SNAPSHOTTER") {
            Ok(s) if !s.is_empty() => s,
            _ => {
                if overlay_works(dir.path()) {
                    "overlayfs".to_string()
                } else {
                    "native".to_string()
                }
            }
        };
        let mut ctd = Containerd {
            dir: Some(dir),
            child: None,
            snapshotter,
            options,
            binary: ContainerdBinary::get(),
        };
        fs::create_dir_all(ctd.certs_dir()).expect("certs.d dir");
        ctd.write_config();
        ctd.spawn_and_wait().await;
        ctd
    }

    /// The temp dir holding config, root, state, sockets and `containerd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("containerd dir").path()
    }

    /// containerd's gRPC socket (containerd API and CRI).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// The CRI plugin's `sandbox_image`.
    pub fn sandbox_image(&self) -> &str {
        self.options
            .sandbox_image
            .as_deref()
            .unwrap_or(DEFAULT_SANDBOX_IMAGE)
    }

    /// The containerd binary this instance runs, with its version.
    pub fn binary(&self) -> &'static ContainerdBinary {
        self.binary
    }

    /// `overlayfs` or `native`: the CRI plugin's snapshotter.
    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir().join("config.toml")
    }

    /// `registry.config_path` of the CRI plugin: `certs.d/HOST:PORT/hosts.toml` files go here.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir().join("certs.d")
    }

    /// containerd's `root` (content store, metadata, snapshots).
    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("containerd.log")
    }

    /// Everything containerd printed so far (across restarts).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Points pulls of `host` (`HOST:PORT` as written in image names) at `server` (for example
    /// `http://127.0.0.1:5001`): `certs.d/HOST/hosts.toml`. containerd reads it on every pull.
    pub fn write_hosts_toml(&self, host: &str, server: &str) {
        let dir = self.certs_dir().join(host);
        fs::create_dir_all(&dir).expect("certs.d host dir");
        let toml = format!(
            "server = \"{server}\"\n\n[host.\"{server}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        fs::write(dir.join("hosts.toml"), toml).expect("write hosts.toml");
    }

    fn write_config(&self) {
        let config = if self.binary.major >= 2 {
            self.config_v3()
        } else {
            self.config_v2()
        };
        fs::write(self.config_path(), config).expect("write containerd config");
    }

    /// containerd 1.x: config `version = 2`, one CRI plugin `io.containerd.grpc.v1.cri`.
    fn config_v2(&self) -> String {
        let d = self.dir().display().to_string();
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[debug]
  level = "info"

[plugins."io.containerd.grpc.v1.cri"]
  # Pulled by containerd itself on the first RunPodSandbox.
  sandbox_image = "{sandbox_image}"
  # This VM refuses to lower oom_score_adj even to root: without this runc fails every
  # RunPodSandbox ("failed to update /proc/self/oom_score_adj: Permission denied").
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
            snapshotter = self.snapshotter,
            sandbox_image = self.sandbox_image(),
        )
    }

    /// containerd 2.x: config `version = 3`; the CRI plugin is split into
    /// `io.containerd.cri.v1.runtime` and `io.containerd.cri.v1.images`, and the sandbox image
    /// is `pinned_images.sandbox`. No `imports` (the default reads `/etc/containerd/conf.d`).
    fn config_v3(&self) -> String {
        let d = self.dir().display().to_string();
        format!(
            r#"version = 3
root = "{d}/root"
state = "{d}/state"
imports = []
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[debug]
  level = "info"

[plugins."io.containerd.cri.v1.runtime"]
  # This VM refuses to lower oom_score_adj even to root: without this runc fails every
  # RunPodSandbox ("failed to update /proc/self/oom_score_adj: Permission denied").
  restrict_oom_score_adj = true

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{snapshotter}"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    # Pulled by containerd itself on the first RunPodSandbox.
    sandbox = "{sandbox_image}"
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{d}/certs.d"
"#,
            snapshotter = self.snapshotter,
            sandbox_image = self.sandbox_image(),
        )
    }

    async fn spawn_and_wait(&mut self) {
        let log = append(&self.log_path());
        let log2 = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(&self.binary.path);
        cmd.arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(path) = self.binary.path_env() {
            cmd.env("PATH", path);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.path.display()));
        self.child = Some(child);
        let sock = self.socket();
        let deadline = Instant::now() + CONTAINERD_READY_TIMEOUT;
        let mut ctr_ok = false;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("containerd exited with {status}\n--- log\n{}", self.log());
            }
            if !ctr_ok {
                let sock = sock.clone();
                let ctr = self.binary.ctr();
                ctr_ok = tokio::task::spawn_blocking(move || ctr_version(&ctr, &sock))
                    .await
                    .unwrap_or(false);
            }
            // The gRPC server answers before the CRI plugin has loaded its image store; CRI calls
            // fail with "server is not initialized yet" until then.
            if ctr_ok && image_fs_info(&sock).await.is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                self.stop();
                panic!(
                    "containerd not ready on {} within {CONTAINERD_READY_TIMEOUT:?} (ctr version ok: {ctr_ok})\n--- log\n{}",
                    sock.display(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the containerd process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM, then wait ≤ 10 s (SIGKILL after that). Root, state and log stay; idempotent.
    /// Returns the exit status when containerd ended on SIGTERM.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let child = self.child.take()?;
        terminate(child)
    }

    /// Stops containerd and starts it again with the same config, dirs and socket.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait().await;
    }

    async fn channel(&self) -> Channel {
        connect_uds(&self.socket())
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", self.socket().display()))
    }

    /// Every image record in containerd namespace `k8s.io` (containerd images API), as
    /// `name → target digest`. The CRI plugin records an image under its tag, `repo@digest`
    /// and the config id (`sha256:…`).
    pub async fn image_targets(&self) -> BTreeMap<String, String> {
        let mut client = ImagesClient::new(self.channel().await);
        let resp = client
            .list(in_namespace(ListImagesRequest { filters: vec![] }))
            .await
            .unwrap_or_else(|e| panic!("containerd images list: {e}"))
            .into_inner();
        resp.images
            .into_iter()
            .map(|i| {
                let target = i.target.map(|t| t.digest).unwrap_or_default();
                (i.name, target)
            })
            .collect()
    }

    /// Names of every image record in containerd namespace `k8s.io`, sorted.
    pub async fn image_names(&self) -> Vec<String> {
        self.image_targets().await.into_keys().collect()
    }

    /// Digest of every blob in containerd's content store visible in namespace `k8s.io`
    /// (content API `List`), sorted.
    pub async fn content_digests(&self) -> Vec<String> {
        let mut client = ContentClient::new(self.channel().await);
        let mut stream = client
            .list(in_namespace(ListContentRequest { filters: vec![] }))
            .await
            .unwrap_or_else(|e| panic!("containerd content list: {e}"))
            .into_inner();
        let mut digests = Vec::new();
        while let Some(resp) = stream
            .message()
            .await
            .unwrap_or_else(|e| panic!("containerd content list stream: {e}"))
        {
            digests.extend(resp.info.into_iter().map(|i| i.digest));
        }
        digests.sort();
        digests
    }

    /// IDs of the runc tasks (pod sandboxes and containers) whose shim state is on disk.
    pub fn task_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(self.task_state_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// PID (in this machine's PID namespace) of the first process of task `id` (a sandbox or
    /// container ID), from the shim's `init.pid`.
    pub fn task_pid(&self, id: &str) -> Option<u32> {
        fs::read_to_string(self.task_state_dir().join(id).join("init.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn task_state_dir(&self) -> PathBuf {
        self.dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(K8S_NAMESPACE)
    }

    /// Ends every task still there (a test that panicked before removing its pods): through
    /// `ctr tasks delete --force` while containerd runs, then SIGKILL to each task's init
    /// process and shim (found by the pid files in its state dir) for whatever is left, so no
    /// `sleep` or shim outlives the test. Runs on drop.
    pub fn kill_tasks(&mut self) {
        let ids = self.task_ids();
        if ids.is_empty() {
            return;
        }
        if self.is_running() {
            for id in &ids {
                let _ = Command::new(self.binary.ctr())
                    .arg("--address")
                    .arg(self.socket())
                    .args(["--namespace", K8S_NAMESPACE, "--timeout", "10s"])
                    .args(["tasks", "delete", "--force", id])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for id in self.task_ids() {
            let dir = self.task_state_dir().join(&id);
            // init.pid: the container's first process (killing a PID namespace's init ends the
            // namespace); shim.pid: containerd-shim-runc-v2, which would otherwise stay.
            for pid_file in ["init.pid", "shim.pid"] {
                let pid = fs::read_to_string(dir.join(pid_file)).unwrap_or_default();
                let pid = pid.trim();
                if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                    let _ = Command::new("kill")
                        .args(["-KILL", pid])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }

    /// Every blob file in the content store on disk, all namespaces, plus any ingest in
    /// progress or left behind (`ingest/<ref>`), as `sha256:<hex>` / `ingest:<name>`, sorted.
    /// Catches what the namespaced API would not show.
    pub fn blobs_on_disk(&self) -> Vec<String> {
        let content = self.root().join("io.containerd.content.v1.content");
        let mut out = Vec::new();
        if let Ok(entries) = fs::read_dir(content.join("blobs")) {
            for alg in entries.flatten() {
                let alg_name = alg.file_name().to_string_lossy().into_owned();
                if let Ok(blobs) = fs::read_dir(alg.path()) {
                    for blob in blobs.flatten() {
                        out.push(format!("{alg_name}:{}", blob.file_name().to_string_lossy()));
                    }
                }
            }
        }
        if let Ok(ingests) = fs::read_dir(content.join("ingest")) {
            for ingest in ingests.flatten() {
                out.push(format!("ingest:{}", ingest.file_name().to_string_lossy()));
            }
        }
        out.sort();
        out
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.dir.is_some() {
            self.kill_tasks();
        }
        if let Some(child) = self.child.take() {
            let _ = terminate(child);
        }
        if self.dir.is_some() {
            // A shim whose tasks are gone but that was not told to shut down (seen with 2.x
            // after a pod's removal) would outlive the test: SIGKILL what still serves us.
            for pid in shims_serving(&self.socket()) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(dir) = self.dir.as_ref() {
            unmount_under(dir.path());
        }
        // TempDir's own drop removes the dir.
        self.dir.take();
    }
}

/// A `pullgate serve` child process with its socket, audit log and output in a temp dir.
/// Killed (SIGKILL) on drop.
pub struct Pullgate {
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl Pullgate {
    /// Starts `pullgate serve --listen DIR/pullgate.sock --containerd CONTAINERD_SOCK
    /// --policy-dir POLICY_DIR --audit-log DIR/audit.log EXTRA...` and waits (≤ 20 s) until its
    /// socket answers a CRI `ImageFsInfo`. Panics with pullgate's output otherwise.
    pub async fn start(containerd_sock: &Path, policy_dir: &Path, extra: &[&str]) -> Pullgate {
        let dir = short_tempdir("pgp-");
        fs::create_dir_all(dir.path().join("home")).expect("pullgate home");
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            dir.path().join("pullgate.sock").display().to_string(),
            "--containerd".into(),
            containerd_sock.display().to_string(),
            "--policy-dir".into(),
            policy_dir.display().to_string(),
            "--audit-log".into(),
            dir.path().join("audit.log").display().to_string(),
        ];
        if !extra.contains(&"--health-listen") {
            // Tests run side by side: each pullgate takes a free port for /readyz and /metrics.
            args.extend(["--health-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut pg = Pullgate {
            dir,
            args,
            child: None,
        };
        pg.spawn_and_wait().await;
        pg
    }

    async fn spawn_and_wait(&mut self) {
        let stdout = append(&self.dir.path().join("stdout.log"));
        let stderr = append(&self.dir.path().join("stderr.log"));
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let mut cmd = pullgate_command(&self.dir.path().join("home"), &args, &[]);
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run pullgate serve: {e}"));
        self.child = Some(child);
        let sock = self.socket();
        let deadline = Instant::now() + PULLGATE_READY_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "pullgate serve exited with {status}\n  args: {:?}\n--- output\n{}",
                    self.args,
                    self.log()
                );
            }
            if sock.exists() {
                match image_fs_info(&sock).await {
                    Ok(_) => return,
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                if let Some(child) = self.child.take() {
                    kill(child);
                }
                panic!(
                    "pullgate serve not ready on {} within {PULLGATE_READY_TIMEOUT:?} (last: {last})\n  args: {:?}\n--- output\n{}",
                    sock.display(),
                    self.args,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The CRI socket pullgate serves (`--listen`).
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("pullgate.sock")
    }

    /// `http://ADDR` of the admin listener (`/livez`, `/readyz`, `/metrics`) of the latest start,
    /// read from pullgate's start-up line.
    pub fn health_url(&self) -> Option<String> {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("pullgate: health and metrics on "))?;
        Some(line.trim().to_string())
    }

    /// The `--audit-log` file.
    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The command line pullgate was started with (without the binary).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// stdout followed by stderr (debug logs), across restarts.
    pub fn log(&self) -> String {
        let out = fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default();
        let err = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        format!("{out}{err}")
    }

    /// Raw lines of the audit log (empty when it does not exist yet).
    pub fn audit_lines(&self) -> Vec<String> {
        fs::read_to_string(self.audit_log_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The audit log, one JSON value per line. Panics on a line that is not a JSON object,
    /// naming it.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        self.audit_lines()
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("audit log line {} is not JSON ({e}): {line:?}", i + 1)
                });
                assert!(
                    v.is_object(),
                    "audit log line {} is not an object: {line}",
                    i + 1
                );
                v
            })
            .collect()
    }

    /// Waits (≤ `timeout`) until the audit log holds at least `n` lines, then 200 ms more so a
    /// surplus line would show, and returns the records.
    pub async fn wait_audit_records(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        while self.audit_lines().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.audit_records()
    }

    /// SIGTERM, wait ≤ 10 s. `Some(status)` when pullgate exited on its own within that time;
    /// `None` when it was not running or had to be killed.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let child = self.child.take()?;
        terminate(child)
    }

    /// Stops pullgate (SIGTERM) and starts it again with the same arguments and socket path.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait().await;
    }
}

impl Drop for Pullgate {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRI ImageService clients, against any CRI socket.

/// A tonic channel over the unix socket `sock` (any gRPC server).
pub async fn connect_uds(sock: &Path) -> Result<Channel, tonic::transport::Error> {
    containerd_client::connect(sock).await
}

/// A CRI `runtime.v1.ImageService` client on `sock`.
pub async fn cri_client(sock: &Path) -> Result<ImageServiceClient<Channel>, Status> {
    connect_uds(sock)
        .await
        .map(ImageServiceClient::new)
        .map_err(|e| Status::unavailable(format!("connect {}: {e}", sock.display())))
}

/// The `PullImageRequest` kubelet sends for a pod `pod` in `namespace` (empty when `None`):
/// no credentials, sandbox metadata with a fixed uid and attempt 0.
pub fn pull_request(image: &str, namespace: Option<&str>, pod: &str) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth: None,
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: pod.to_string(),
                uid: format!("uid-{pod}"),
                namespace: namespace.unwrap_or_default().to_string(),
                attempt: 0,
            }),
            ..Default::default()
        }),
    }
}

/// CRI `PullImage` on `sock`; the `image_ref` containerd answered (`sha256:<config digest>`).
pub async fn pull(
    sock: &Path,
    image: &str,
    namespace: Option<&str>,
    pod: &str,
) -> Result<String, Status> {
    pull_with(sock, pull_request(image, namespace, pod)).await
}

/// CRI `PullImage` with a request built by the caller.
pub async fn pull_with(sock: &Path, req: PullImageRequest) -> Result<String, Status> {
    let mut client = cri_client(sock).await?;
    Ok(client.pull_image(req).await?.into_inner().image_ref)
}

/// CRI `ListImages` (no filter).
pub async fn list_images(sock: &Path) -> Result<Vec<Image>, Status> {
    let mut client = cri_client(sock).await?;
    let resp = client
        .list_images(CriListImagesRequest { filter: None })
        .await?;
    Ok(resp.into_inner().images)
}

/// CRI `ImageStatus` (not verbose): `None` when the runtime does not have the image.
pub async fn image_status(sock: &Path, image: &str) -> Result<Option<Image>, Status> {
    Ok(image_status_response(sock, image, false).await?.image)
}

/// CRI `ImageStatus`, whole response (`verbose` adds containerd's `info` map).
pub async fn image_status_response(
    sock: &Path,
    image: &str,
    verbose: bool,
) -> Result<ImageStatusResponse, Status> {
    let mut client = cri_client(sock).await?;
    let resp = client
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose,
        })
        .await?;
    Ok(resp.into_inner())
}

/// CRI `RemoveImage`.
pub async fn remove_image(sock: &Path, image: &str) -> Result<(), Status> {
    let mut client = cri_client(sock).await?;
    client
        .remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

/// CRI `ImageFsInfo`.
pub async fn image_fs_info(sock: &Path) -> Result<ImageFsInfoResponse, Status> {
    let mut client = cri_client(sock).await?;
    Ok(client
        .image_fs_info(ImageFsInfoRequest {})
        .await?
        .into_inner())
}

/// `(code, message)` of a result's error, for comparing answers of two servers.
pub fn status_parts<T>(r: &Result<T, Status>) -> Option<(Code, String)> {
    r.as_ref()
        .err()
        .map(|s| (s.code(), s.message().to_string()))
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn in_namespace<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "containerd-namespace",
        K8S_NAMESPACE.parse().expect("namespace metadata value"),
    );
    req
}

/// A temp dir directly under `/tmp` with a short name (unix socket paths < 108 bytes).
fn short_tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .rand_bytes(6)
        .tempdir_in("/tmp")
        .expect("temp dir under /tmp")
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn ctr_version(ctr: &Path, sock: &Path) -> bool {
    Command::new(ctr)
        .arg("--address")
        .arg(sock)
        .arg("--timeout")
        .arg("2s")
        .arg("version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Mounts an overlay in `dir/probe` and unmounts it: does the overlayfs snapshotter stand a
/// chance here?
fn overlay_works(dir: &Path) -> bool {
    let probe = dir.join("probe");
    for sub in ["lower", "upper", "work", "merged"] {
        if fs::create_dir_all(probe.join(sub)).is_err() {
            return false;
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        probe.join("lower").display(),
        probe.join("upper").display(),
        probe.join("work").display()
    );
    let mounted = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(probe.join("merged"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if mounted {
        let unmounted = Command::new("umount")
            .arg(probe.join("merged"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !unmounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(probe.join("merged"))
                .status();
        }
    }
    let _ = fs::remove_dir_all(&probe);
    mounted
}

/// PIDs of the `containerd-shim-*` processes started for the containerd on `sock` (their
/// command line holds `-address SOCK`).
fn shims_serving(sock: &Path) -> Vec<u32> {
    let sock = sock.display().to_string();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args.first().is_some_and(|a| {
                String::from_utf8_lossy(a)
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.starts_with("containerd-shim"))
            });
            is_shim
                && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == sock.as_bytes())
        })
        .collect()
}

/// Unmounts (deepest first, lazily if busy) every mount point at or below `dir`.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        let ok = Command::new("umount")
            .arg(&p)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount")
                .args(["-l", &p])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// SIGTERM (`kill -TERM PID`), wait ≤ 10 s, else SIGKILL. `Some(status)` when the process
/// ended within the grace period.
fn terminate(mut child: Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                kill(child);
                return None;
            }
        }
    }
}

/// SIGKILL this child (by its own handle) and reap it.
fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

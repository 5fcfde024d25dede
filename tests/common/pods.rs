//! CRI `runtime.v1.RuntimeService` clients, against any CRI socket (containerd's own or
//! `pullgate serve`'s): pod sandboxes on the host network and containers in them, as kubelet
//! asks for them.
//!
//! ```ignore
//! let reg = Registry::start().await;
//! let image = reg.push_busybox("busybox", "v1").await;
//! let ctd = Containerd::start_with(
//!     ContainerdOptions::default().sandbox_image(reg.tag_ref("busybox", "v1")),
//! ).await;
//! pull(&ctd.socket(), &reg.tag_ref("busybox", "v1"), Some("prod"), "web-0").await?;
//! let pod = PodSandbox::run(&ctd.socket(), "web-0", "prod", "uid-web-0").await?;
//! let id = pod.create_container("app", image.image_id(), &reg.tag_ref("busybox", "v1")).await?;
//! start_container(&ctd.socket(), &id).await?;
//! pod.remove().await?;
//! ```
//!
//! A [`PodSandbox`] still there when it drops is stopped and removed (best effort);
//! [`Containerd`](super::Containerd) kills whatever tasks remain when it drops.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Container, ContainerConfig, ContainerFilter, ContainerMetadata, ContainerState,
    ContainerStatus, ContainerStatusRequest, CreateContainerRequest, ImageSpec,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, ListContainersRequest,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandbox as CriPodSandbox,
    PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata, PodSandboxStatus,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::Channel;
use tonic::Status;

use super::containerd::connect_uds;

/// How long a [`PodSandbox`] dropped without [`PodSandbox::remove`] waits for its clean-up.
const DROP_CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A CRI `runtime.v1.RuntimeService` client on `sock`.
pub async fn runtime_client(sock: &Path) -> Result<RuntimeServiceClient<Channel>, Status> {
    connect_uds(sock)
        .await
        .map(RuntimeServiceClient::new)
        .map_err(|e| Status::unavailable(format!("connect {}: {e}", sock.display())))
}

/// The `PodSandboxConfig` kubelet sends for a pod with `hostNetwork: true`: metadata
/// (attempt 0), no hostname (the node's UTS namespace is shared: runc refuses a hostname
/// there, "unable to set hostname without a private UTS namespace"), `log_directory`, the `io.kubernetes.pod.*` labels, and
/// `linux.security_context.namespace_options.network = NODE` (no CNI needed). No cgroup parent:
/// containerd then puts the pod under `/k8s.io/<id>` in each cgroup hierarchy.
pub fn pod_sandbox_config(
    name: &str,
    namespace: &str,
    uid: &str,
    log_directory: &Path,
) -> PodSandboxConfig {
    let labels = HashMap::from([
        ("io.kubernetes.pod.name".to_string(), name.to_string()),
        (
            "io.kubernetes.pod.namespace".to_string(),
            namespace.to_string(),
        ),
        ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
    ]);
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: uid.to_string(),
            namespace: namespace.to_string(),
            attempt: 0,
        }),
        log_directory: log_directory.display().to_string(),
        labels,
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Pod as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// CRI `RunPodSandbox` with `config`; the sandbox ID.
pub async fn run_pod_sandbox_with(sock: &Path, config: PodSandboxConfig) -> Result<String, Status> {
    let mut client = runtime_client(sock).await?;
    let resp = client
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        })
        .await?;
    Ok(resp.into_inner().pod_sandbox_id)
}

/// The `ContainerConfig` kubelet sends for a container `name` (attempt 0, log path
/// `NAME/0.log` under the sandbox's log directory): `image.image` is what kubelet resolved
/// (normally the image ID `sha256:<config digest>`), `image.user_specified_image` the image
/// the pod spec names. No command: the image's entrypoint runs.
pub fn container_config(name: &str, image: &str, user_specified_image: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            user_specified_image: user_specified_image.to_string(),
            ..Default::default()
        }),
        log_path: format!("{name}/0.log"),
        labels: HashMap::from([("io.kubernetes.container.name".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// CRI `CreateContainer` of [`container_config`]`(name, image, user_specified_image)` in the
/// sandbox `sandbox_id` created from `sandbox_config`; the container ID.
pub async fn create_container(
    sock: &Path,
    sandbox_id: &str,
    sandbox_config: &PodSandboxConfig,
    name: &str,
    image: &str,
    user_specified_image: &str,
) -> Result<String, Status> {
    create_container_with(
        sock,
        CreateContainerRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            config: Some(container_config(name, image, user_specified_image)),
            sandbox_config: Some(sandbox_config.clone()),
        },
    )
    .await
}

/// CRI `CreateContainer` with a request built by the caller; the container ID.
pub async fn create_container_with(
    sock: &Path,
    req: CreateContainerRequest,
) -> Result<String, Status> {
    let mut client = runtime_client(sock).await?;
    Ok(client
        .create_container(req)
        .await?
        .into_inner()
        .container_id)
}

/// CRI `StartContainer`.
pub async fn start_container(sock: &Path, container_id: &str) -> Result<(), Status> {
    let mut client = runtime_client(sock).await?;
    client
        .start_container(StartContainerRequest {
            container_id: container_id.to_string(),
        })
        .await?;
    Ok(())
}

/// CRI `StopContainer`: the image's stop signal, then SIGKILL after `timeout_secs`
/// (0: SIGKILL at once; `sleep` as PID 1 ignores SIGTERM, so tests use 0).
pub async fn stop_container(
    sock: &Path,
    container_id: &str,
    timeout_secs: i64,
) -> Result<(), Status> {
    let mut client = runtime_client(sock).await?;
    client
        .stop_container(StopContainerRequest {
            container_id: container_id.to_string(),
            timeout: timeout_secs,
        })
        .await?;
    Ok(())
}

/// CRI `RemoveContainer` (a running container is stopped first by containerd).
pub async fn remove_container(sock: &Path, container_id: &str) -> Result<(), Status> {
    let mut client = runtime_client(sock).await?;
    client
        .remove_container(RemoveContainerRequest {
            container_id: container_id.to_string(),
        })
        .await?;
    Ok(())
}

/// CRI `ListContainers` with `filter` (`None`: every container).
pub async fn list_containers(
    sock: &Path,
    filter: Option<ContainerFilter>,
) -> Result<Vec<Container>, Status> {
    let mut client = runtime_client(sock).await?;
    let resp = client
        .list_containers(ListContainersRequest { filter })
        .await?;
    Ok(resp.into_inner().containers)
}

/// CRI `ContainerStatus` (not verbose); `NotFound` for an unknown ID.
pub async fn container_status(sock: &Path, container_id: &str) -> Result<ContainerStatus, Status> {
    let mut client = runtime_client(sock).await?;
    let resp = client
        .container_status(ContainerStatusRequest {
            container_id: container_id.to_string(),
            verbose: false,
        })
        .await?;
    resp.into_inner()
        .status
        .ok_or_else(|| Status::internal("ContainerStatus answered without a status"))
}

/// Polls `ContainerStatus` (every 50 ms, ≤ `timeout`) until the container is in `state`;
/// returns that status, or the last one seen as the error text.
pub async fn wait_container_state(
    sock: &Path,
    container_id: &str,
    state: ContainerState,
    timeout: Duration,
) -> Result<ContainerStatus, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match container_status(sock, container_id).await {
            Ok(status) if status.state == state as i32 => return Ok(status),
            Ok(status) => format!("{status:?}"),
            Err(e) => format!("ContainerStatus: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "container {container_id} not {state:?} within {timeout:?}; last: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CRI `StopPodSandbox` (kills every container of the pod and the sandbox).
pub async fn stop_pod_sandbox(sock: &Path, sandbox_id: &str) -> Result<(), Status> {
    let mut client = runtime_client(sock).await?;
    client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox_id.to_string(),
        })
        .await?;
    Ok(())
}

/// CRI `RemovePodSandbox` (its containers are removed with it; the sandbox must be stopped).
pub async fn remove_pod_sandbox(sock: &Path, sandbox_id: &str) -> Result<(), Status> {
    let mut client = runtime_client(sock).await?;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox_id.to_string(),
        })
        .await?;
    Ok(())
}

/// CRI `PodSandboxStatus` (not verbose).
pub async fn pod_sandbox_status(sock: &Path, sandbox_id: &str) -> Result<PodSandboxStatus, Status> {
    let mut client = runtime_client(sock).await?;
    let resp = client
        .pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: sandbox_id.to_string(),
            verbose: false,
        })
        .await?;
    resp.into_inner()
        .status
        .ok_or_else(|| Status::internal("PodSandboxStatus answered without a status"))
}

/// CRI `ListPodSandbox` with `filter` (`None`: every sandbox).
pub async fn list_pod_sandboxes(
    sock: &Path,
    filter: Option<PodSandboxFilter>,
) -> Result<Vec<CriPodSandbox>, Status> {
    let mut client = runtime_client(sock).await?;
    let resp = client
        .list_pod_sandbox(ListPodSandboxRequest { filter })
        .await?;
    Ok(resp.into_inner().items)
}

/// A pod sandbox made through a CRI socket, with its log directory in a temp dir. Dropped
/// without [`PodSandbox::remove`], it is stopped and removed through the same socket (best
/// effort, ≤ 20 s, on a thread of its own so it works inside a tokio test).
pub struct PodSandbox {
    /// The sandbox ID `RunPodSandbox` answered.
    pub id: String,
    /// The config it was created with; `CreateContainer` needs it again.
    pub config: PodSandboxConfig,
    sock: PathBuf,
    log_dir: Option<tempfile::TempDir>,
    removed: bool,
}

impl PodSandbox {
    /// `RunPodSandbox` through `sock` for pod `name` in `namespace` with `uid`, on the host
    /// network ([`pod_sandbox_config`]). containerd pulls its `sandbox_image` first if needed.
    pub async fn run(
        sock: &Path,
        name: &str,
        namespace: &str,
        uid: &str,
    ) -> Result<PodSandbox, Status> {
        PodSandbox::run_with(sock, name, namespace, uid, |_| {}).await
    }

    /// [`PodSandbox::run`] with the config changed by `edit` first (labels, annotations, ...).
    pub async fn run_with(
        sock: &Path,
        name: &str,
        namespace: &str,
        uid: &str,
        edit: impl FnOnce(&mut PodSandboxConfig),
    ) -> Result<PodSandbox, Status> {
        let log_dir = tempfile::Builder::new()
            .prefix("pullgate-pod-logs-")
            .tempdir()
            .expect("pod log temp dir");
        let mut config = pod_sandbox_config(name, namespace, uid, log_dir.path());
        edit(&mut config);
        let id = run_pod_sandbox_with(sock, config.clone()).await?;
        Ok(PodSandbox {
            id,
            config,
            sock: sock.to_path_buf(),
            log_dir: Some(log_dir),
            removed: false,
        })
    }

    /// The socket the sandbox was made through (and is cleaned up through).
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// The sandbox's `log_directory`: container logs go to `NAME/0.log` in it.
    pub fn log_dir(&self) -> &Path {
        self.log_dir.as_ref().expect("pod log dir").path()
    }

    /// [`create_container`] in this sandbox through its socket.
    pub async fn create_container(
        &self,
        name: &str,
        image: &str,
        user_specified_image: &str,
    ) -> Result<String, Status> {
        create_container(
            &self.sock,
            &self.id,
            &self.config,
            name,
            image,
            user_specified_image,
        )
        .await
    }

    /// [`create_container`] through another socket (e.g. containerd's, for a pod made through
    /// pullgate, or the other way round).
    pub async fn create_container_via(
        &self,
        sock: &Path,
        name: &str,
        image: &str,
        user_specified_image: &str,
    ) -> Result<String, Status> {
        create_container(
            sock,
            &self.id,
            &self.config,
            name,
            image,
            user_specified_image,
        )
        .await
    }

    /// Gives up the guard: the sandbox stays (until containerd's drop kills its tasks); its
    /// ID.
    pub fn into_id(mut self) -> String {
        self.removed = true;
        std::mem::take(&mut self.id)
    }

    /// `StopPodSandbox` then `RemovePodSandbox` through its socket.
    pub async fn remove(mut self) -> Result<(), Status> {
        self.removed = true;
        stop_pod_sandbox(&self.sock, &self.id).await?;
        remove_pod_sandbox(&self.sock, &self.id).await
    }
}

impl Drop for PodSandbox {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let sock = self.sock.clone();
        let id = self.id.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let _ = tokio::time::timeout(DROP_CLEANUP_TIMEOUT, async {
                    let _ = stop_pod_sandbox(&sock, &id).await;
                    let _ = remove_pod_sandbox(&sock, &id).await;
                })
                .await;
            });
        });
        let _ = cleanup.join();
    }
}

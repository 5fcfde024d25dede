//! The CRI ImageService proxy: kubelet talks to pullgate's socket, pullgate talks to
//! containerd's. `PullImage` is decided by the policy engine and forwarded pinned to the
//! verified digest; every other RPC (and any method pullgate does not know) is forwarded byte
//! for byte.

pub mod create;
pub mod pull;
pub mod raw;

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::engine::Engine;
use crate::policy::eval::Decision;
use crate::policy::object::AdmissionObject;
use raw::RawCodec;

/// gRPC service name pullgate serves.
pub const IMAGE_SERVICE: &str = "runtime.v1.ImageService";
/// The one method pullgate inspects.
pub const PULL_IMAGE_PATH: &str = "/runtime.v1.ImageService/PullImage";
/// containerd namespace of the CRI plugin.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// Why the proxy could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("containerd socket {0} does not exist: is containerd running? (--containerd)")]
    NoContainerd(PathBuf),
    #[error("{path}: another process is already serving on this socket")]
    InUse { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the containerd client: {0}")]
    Channel(String),
    #[error("gRPC server failed: {0}")]
    Server(String),
}

/// kubelet shows this as the pod's waiting reason when a pull error starts with it (and a
/// create error with it as `CreateContainerError`).
pub const DENY_PREFIX: &str = "SignatureValidationFailed: ";

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    pub containerd: Channel,
    /// Set once the policies and the registry client are ready. The socket is served before
    /// (kubelet needs it for every container operation, and building those may wait on the
    /// network): meanwhile everything is forwarded except pulls and creates outside the exempt
    /// namespaces, which are refused with the reason.
    pub engine: tokio::sync::OnceCell<Engine>,
    /// Never enforced, whatever the policies say; known before the policies are.
    pub exempt_namespaces: std::collections::BTreeSet<String>,
    /// The credential kubelet last pulled each repository with, for create-time fetches.
    pub pull_credentials: create::PullCredentials,
}

/// The one mapping of a refusal to gRPC: code `Unknown`, message `SignatureValidationFailed: `
/// and the reasons.
pub fn refusal(decision: &Decision, what: &str) -> Status {
    tracing::warn!(verdict = decision.verdict.as_str(), reasons = ?decision.reasons, "{what}");
    Status::unknown(format!("{DENY_PREFIX}{}", decision.reasons.join("; ")))
}

/// What kubelet tells of a pod in `sandbox_config`: CIP-level policies may read its metadata.
pub fn sandbox_object(config: &k8s_cri::v1::PodSandboxConfig) -> AdmissionObject {
    let m = config.metadata.clone().unwrap_or_default();
    AdmissionObject::from_pod_sandbox(
        &m.name,
        &m.namespace,
        &m.uid,
        &config.labels,
        &config.annotations,
    )
}

/// A lazily connecting channel to containerd's socket: a containerd restart is survived by
/// reconnecting on the next call.
pub fn containerd_channel(socket: &Path) -> Result<Channel, ServeError> {
    let path = socket.to_path_buf();
    let endpoint = Endpoint::try_from("http://containerd.invalid")
        .map_err(|e| ServeError::Channel(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}

/// Binds the listening socket: parent created, a stale socket from a crash removed, a live
/// one refused, mode 0660.
pub async fn bind(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt as _;
    let listen_err = |source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(listen_err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::InUse {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(listen_err)?;
    Ok(listener)
}

/// What a gated RPC does while the engine is not ready yet.
pub enum Gate<'a> {
    Decide(&'a Engine),
    /// Exempt namespace: forwarded without a decision.
    Forward,
}

impl Proxy {
    /// The engine, or what to do without it for a request in `namespace`.
    pub fn gate(&self, namespace: Option<&str>) -> Result<Gate<'_>, Status> {
        if let Some(engine) = self.engine.get() {
            return Ok(Gate::Decide(engine));
        }
        if namespace.is_some_and(|ns| self.exempt_namespaces.contains(ns)) {
            return Ok(Gate::Forward);
        }
        Err(Status::unavailable(format!(
            "{DENY_PREFIX}pullgate is starting: its policies are not loaded yet"
        )))
    }

    /// Forwards one unary RPC to containerd unchanged.
    pub async fn forward(
        &self,
        path: &str,
        req: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let path = http::uri::PathAndQuery::try_from(path)
            .map_err(|e| Status::invalid_argument(format!("bad method path {path:?}: {e}")))?;
        let mut grpc = tonic::client::Grpc::new(self.containerd.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd is not reachable: {e}")))?;
        grpc.unary(req, path, RawCodec).await
    }

    /// Serves on `listener` until `shutdown` completes; in-flight RPCs finish first.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(ImageService { proxy: self })
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ServeError::Server(e.to_string()))
    }
}

/// The `runtime.v1.ImageService` endpoint: routes by method path, all through the raw codec.
#[derive(Clone)]
struct ImageService {
    proxy: Arc<Proxy>,
}

impl NamedService for ImageService {
    const NAME: &'static str = IMAGE_SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl tower::Service<http::Request<Body>> for ImageService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = Method {
            proxy: self.proxy.clone(),
            path: req.uri().path().to_string(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(method, req).await)
        })
    }
}

struct Method {
    proxy: Arc<Proxy>,
    path: String,
}

impl tonic::server::UnaryService<Bytes> for Method {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let proxy = self.proxy.clone();
        let path = std::mem::take(&mut self.path);
        Box::pin(async move {
            if path == PULL_IMAGE_PATH {
                pull::pull_image(&proxy, req).await
            } else if path == create::CREATE_CONTAINER_PATH {
                create::create_container(&proxy, req).await
            } else {
                proxy.forward(&path, req).await
            }
        })
    }
}

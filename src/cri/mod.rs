//! The CRI proxy: kubelet talks to pullgate's socket for both `runtime.v1.ImageService` and
//! `runtime.v1.RuntimeService`, pullgate talks to containerd's. `PullImage` is decided by the
//! policy engine and forwarded pinned to the verified digest ([`pull`]); `CreateContainer` goes
//! through the create-time gate ([`create`]). Every other call, under any service and of any
//! shape (unary or streaming, including methods pullgate has never heard of), is forwarded byte
//! for byte as a bidirectional stream through the raw codec ([`raw`]): request metadata goes up,
//! containerd's headers, messages and final status come back.
//!
//! Each accepted connection is wrapped in [`authority::AuthorityFix`], so clients whose
//! `:authority` the `h2` crate would refuse (gRPC C-core's percent-encoded socket path) are
//! served as containerd serves them.

pub mod api;
pub mod authority;
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
use futures_util::{StreamExt as _, TryStreamExt as _};
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::Engine;
use crate::policy::eval::Decision;
use crate::policy::object::AdmissionObject;
use raw::RawCodec;

/// CRI image service (kubelet's `imageServiceEndpoint`).
pub const IMAGE_SERVICE: &str = "runtime.v1.ImageService";
/// CRI runtime service (kubelet's `containerRuntimeEndpoint`).
pub const RUNTIME_SERVICE: &str = "runtime.v1.RuntimeService";
/// Decided by the policy engine before it is forwarded.
pub const PULL_IMAGE_PATH: &str = "/runtime.v1.ImageService/PullImage";
/// Gated at create time: the container's image must be verified for its namespace.
pub const CREATE_CONTAINER_PATH: &str = "/runtime.v1.RuntimeService/CreateContainer";
/// Largest message pullgate passes either way: kubelet's CRI client and containerd's CRI
/// server both allow 16 MiB (tonic's default, 4 MiB, would cut off long `ListContainers`).
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
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
pub fn sandbox_object(config: &api::PodSandboxConfig) -> AdmissionObject {
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
                let stream = connect_containerd(&path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        })),
    )
}

/// Connects to containerd's socket; the error names the socket (the bare OS error, "No such
/// file or directory", does not say what was missing).
async fn connect_containerd(path: &Path) -> std::io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(path).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("containerd socket {}: {e}", path.display()),
        )
    })
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

    /// A client for containerd's socket, ready to send.
    async fn upstream(&self) -> Result<tonic::client::Grpc<Channel>, Status> {
        let mut grpc = tonic::client::Grpc::new(self.containerd.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd is not reachable: {e}")))?;
        Ok(grpc)
    }

    /// Forwards one unary RPC to containerd unchanged.
    pub async fn forward(
        &self,
        path: &str,
        req: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let path = method_path(path)?;
        self.upstream().await?.unary(req, path, RawCodec).await
    }

    /// Forwards a call of any shape: kubelet's request messages stream up as they come, and
    /// containerd's response metadata, messages and final status stream back. Unary calls are
    /// the one-message case. The request's extensions stay here; its metadata goes up.
    pub async fn forward_streaming(
        &self,
        path: &str,
        req: Request<Streaming<Bytes>>,
    ) -> Result<Response<Streaming<Bytes>>, Status> {
        let path = method_path(path)?;
        let (metadata, _, messages) = req.into_parts();
        // A broken request stream (kubelet reset it, or sent a malformed frame) ends the upstream
        // request; containerd then answers that call with an error of its own, and a reset
        // caller has stopped listening anyway.
        let messages = messages.take_while(|m| std::future::ready(m.is_ok()));
        let messages = messages.filter_map(|m| std::future::ready(m.ok()));
        let mut upstream = Request::new(messages);
        *upstream.metadata_mut() = metadata;
        self.upstream()
            .await?
            .streaming(upstream, path, RawCodec)
            .await
    }

    /// Serves on `listener` until `shutdown` completes; in-flight RPCs finish first.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
            .map_ok(authority::AuthorityFix::new);
        // Every path goes to one service (the router's fallback): pullgate forwards services
        // and methods it has never heard of instead of answering Unimplemented itself.
        let router = tonic::service::Routes::default()
            .into_axum_router()
            .fallback_service(CriService { proxy: self });
        tonic::transport::Server::builder()
            .add_routes(tonic::service::Routes::from(router))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
            .map_err(|e| ServeError::Server(e.to_string()))
    }
}

fn method_path(path: &str) -> Result<http::uri::PathAndQuery, Status> {
    http::uri::PathAndQuery::try_from(path)
        .map_err(|e| Status::invalid_argument(format!("bad method path {path:?}: {e}")))
}

/// Both CRI services (and anything else a newer kubelet sends): routes by method path, all
/// through the raw codec.
#[derive(Clone)]
struct CriService {
    proxy: Arc<Proxy>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<B> tower::Service<http::Request<B>> for CriService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let req = req.map(Body::new);
        let proxy = self.proxy.clone();
        let path = req.uri().path().to_string();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec)
                .max_decoding_message_size(MAX_MESSAGE_SIZE)
                .max_encoding_message_size(MAX_MESSAGE_SIZE);
            let response = if path == PULL_IMAGE_PATH || path == CREATE_CONTAINER_PATH {
                grpc.unary(Inspected { proxy, path }, req).await
            } else {
                grpc.streaming(Forwarded { proxy, path }, req).await
            };
            Ok(response)
        })
    }
}

/// A unary method pullgate decides on.
struct Inspected {
    proxy: Arc<Proxy>,
    path: String,
}

impl tonic::server::UnaryService<Bytes> for Inspected {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let proxy = self.proxy.clone();
        let path = std::mem::take(&mut self.path);
        Box::pin(async move {
            if path == CREATE_CONTAINER_PATH {
                create::create_container(&proxy, req).await
            } else {
                pull::pull_image(&proxy, req).await
            }
        })
    }
}

/// Any other call, forwarded as a stream.
struct Forwarded {
    proxy: Arc<Proxy>,
    path: String,
}

impl tonic::server::StreamingService<Bytes> for Forwarded {
    type Response = Bytes;
    type ResponseStream = Streaming<Bytes>;
    type Future = BoxFuture<Result<Response<Streaming<Bytes>>, Status>>;

    fn call(&mut self, req: Request<Streaming<Bytes>>) -> Self::Future {
        let proxy = self.proxy.clone();
        let path = std::mem::take(&mut self.path);
        Box::pin(async move { proxy.forward_streaming(&path, req).await })
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_missing_containerd_socket_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("containerd.sock");
        let err = super::connect_containerd(&path).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }
}

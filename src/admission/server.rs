//! HTTPS for the webhooks: rustls, HTTP/2 or HTTP/1.1 by ALPN, one task per connection, limits
//! on every read (handshake, headers, body size and time), `/livez` and `/readyz` on the same
//! listener, and a graceful stop.
//!
//! Load is bounded by [`Limits`]: connections beyond the cap are closed at once, and a review
//! beyond the concurrent-review cap or the in-flight body budget is answered HTTP 429 with the
//! reason, before its body is read. The API server retries nothing itself, so callers see the
//! 429 as a webhook failure (`failurePolicy`) — a refusal, never a crash of every replica.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, Method, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::review::BadReview;
use super::{Shim, Webhook};
use crate::metrics::{admin_reply, reply, Reply};

/// Largest AdmissionReview accepted, in bytes (3 MiB, the API server's own request limit).
pub const MAX_BODY_BYTES: usize = 3 << 20;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// HTTP/2 streams one connection may have open (the API server multiplexes reviews).
const MAX_STREAMS_PER_CONNECTION: u32 = 32;
/// HTTP/2 PING interval and the time an unanswered PING keeps a connection.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Caps on what the webhooks take on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// Reviews being read or decided at once.
    pub max_reviews: usize,
    /// Bytes of review bodies held at once (each held until its review is answered).
    pub max_body_bytes_in_flight: usize,
    /// Open connections (TLS handshakes included).
    pub max_connections: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            max_reviews: 32,
            max_body_bytes_in_flight: 48 << 20,
            max_connections: 256,
        }
    }
}

/// The counters behind [`LimitSettings`].
#[derive(Debug)]
pub struct Limits {
    pub settings: LimitSettings,
    reviews: Arc<Semaphore>,
    body_bytes: Arc<Semaphore>,
    connections: Arc<Semaphore>,
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Limits {
        let permits = |n: usize| Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS)));
        Limits {
            settings,
            reviews: permits(settings.max_reviews),
            body_bytes: permits(settings.max_body_bytes_in_flight),
            connections: permits(settings.max_connections),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(LimitSettings::default())
    }
}

/// Why a review was not taken on (HTTP 429).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    #[error("too many reviews in progress (limit {0}); retry later")]
    Reviews(usize),
    #[error("too many review bytes in flight (limit {0} bytes); retry later")]
    Bytes(usize),
}

/// What a review holds while it is in progress: its slot and the bytes of its body.
struct Held {
    _review: OwnedSemaphorePermit,
    bytes: Vec<OwnedSemaphorePermit>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Binds the listener (before anything is served, so a taken port is a start-up error).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// A plain-text answer: one line.
fn text(status: StatusCode, line: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", format!("{line}\n"))
}

fn method_not_allowed(allowed: &'static str) -> Reply {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed; use {allowed}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    r
}

/// A body that could not be taken: malformed (400) or over a shared cap (429).
enum BodyError {
    Bad(BadReview),
    Busy(Busy),
}

/// Reads at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`], taking each chunk's bytes from the
/// in-flight budget before keeping it (declared lengths up front), so the bytes held by all
/// reviews together never exceed the budget.
async fn read_body(
    req: http::Request<Incoming>,
    limits: &Limits,
    held: &mut Held,
) -> Result<Bytes, BodyError> {
    let too_large = || {
        BodyError::Bad(BadReview::TooLarge {
            limit: MAX_BODY_BYTES,
        })
    };
    let budget = limits.settings.max_body_bytes_in_flight;
    let take = |n: usize, held: &mut Held| -> Result<(), BodyError> {
        if n == 0 {
            return Ok(());
        }
        let n = u32::try_from(n).map_err(|_| BodyError::Busy(Busy::Bytes(budget)))?;
        let permit = limits
            .body_bytes
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| BodyError::Busy(Busy::Bytes(budget)))?;
        held.bytes.push(permit);
        Ok(())
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    // A declared length is taken whole before anything is read.
    let mut taken = declared.unwrap_or(0) as usize;
    take(taken, held)?;
    let mut body = req.into_body();
    let mut collected = BytesMut::with_capacity(taken);
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Bad(BadReview::Unreadable(e.to_string())))?;
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            let len = collected.len() + data.len();
            if len > MAX_BODY_BYTES {
                return Err(too_large());
            }
            if len > taken {
                take(len - taken, held)?;
                taken = len;
            }
            collected.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => Err(BodyError::Bad(BadReview::Unreadable(format!(
            "not received within {}s",
            BODY_TIMEOUT.as_secs()
        )))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok(collected.freeze()),
    }
}

/// Routes one HTTP request. Every outcome is an HTTP answer; nothing here can stop the server.
pub async fn handle(shim: &Shim, req: http::Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    if let Some(answer) = admin_reply(req.method(), &path, &*shim.engine.policies, &shim.metrics) {
        return answer;
    }
    let Some(webhook) = Webhook::from_path(&path) else {
        return text(
            StatusCode::NOT_FOUND,
            &format!(
                "no endpoint {path:?}; webhooks: {}",
                Webhook::ALL.map(Webhook::path).join(", ")
            ),
        );
    };
    if req.method() != Method::POST {
        return method_not_allowed("POST");
    }
    let limits = &shim.limits;
    let busy = |busy: Busy| {
        tracing::warn!(path, reason = %busy, "review refused: over a limit");
        text(StatusCode::TOO_MANY_REQUESTS, &busy.to_string())
    };
    let Ok(review) = limits.reviews.clone().try_acquire_owned() else {
        return busy(Busy::Reviews(limits.settings.max_reviews));
    };
    // Held until the answer is built: the review borrows from the body until then.
    let mut held = Held {
        _review: review,
        bytes: Vec::new(),
    };
    let answer = match read_body(req, limits, &mut held).await {
        Ok(body) => shim.review(webhook, &body).await,
        Err(BodyError::Busy(b)) => return busy(b),
        Err(BodyError::Bad(bad)) => Err(bad),
    };
    let answer = match answer {
        Ok(response) => reply(StatusCode::OK, "application/json", response.to_json()),
        Err(bad) => {
            tracing::warn!(path, reason = %bad, "bad AdmissionReview");
            text(StatusCode::BAD_REQUEST, &bad.to_string())
        }
    };
    drop(held.bytes);
    answer
}

/// Serves until `shutdown` completes, then stops accepting, asks every connection to finish
/// its in-flight requests, and returns when they have (callers bound that with a grace period).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    shim: Arc<Shim>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Over the cap the connection is closed unanswered: the cheapest refusal.
                    let Ok(slot) = shim.limits.connections.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, limit = shim.limits.settings.max_connections, "connection refused: too many open");
                        continue;
                    };
                    let task = connection(tcp, peer, acceptor.clone(), shim.clone(), stop_rx.clone());
                    connections.spawn(async move {
                        task.await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Completes when the server stops (or is gone).
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shim: Arc<Shim>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
    let io = TokioIo::new(tls);
    let service = service_fn(move |req| {
        let shim = shim.clone();
        async move { Ok::<_, Infallible>(handle(&shim, req).await) }
    });
    let result = if h2 {
        let conn = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .keep_alive_interval(H2_KEEP_ALIVE)
            .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
            .serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = stopping(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = stopping(&mut stop) => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

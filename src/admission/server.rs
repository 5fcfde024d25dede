//! HTTPS for the webhooks: rustls, HTTP/2 or HTTP/1.1 by ALPN, one task per connection, limits
//! on every read (handshake, headers, body size and time), `/livez` and `/readyz` on the same
//! listener, and a graceful stop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
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

/// Reads at most [`MAX_BODY_BYTES`] within [`BODY_TIMEOUT`].
async fn read_body(req: http::Request<Incoming>) -> Result<Bytes, BadReview> {
    let too_large = BadReview::TooLarge {
        limit: MAX_BODY_BYTES,
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large);
    }
    let limited = Limited::new(req.into_body(), MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(BadReview::Unreadable(format!(
            "not received within {}s",
            BODY_TIMEOUT.as_secs()
        ))),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large),
        Ok(Err(e)) => Err(BadReview::Unreadable(e.to_string())),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
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
    let answer = match read_body(req).await {
        Ok(body) => shim.review(webhook, &body).await,
        Err(bad) => Err(bad),
    };
    match answer {
        Ok(response) => reply(StatusCode::OK, "application/json", response.to_json()),
        Err(bad) => {
            tracing::warn!(path, reason = %bad, "bad AdmissionReview");
            text(StatusCode::BAD_REQUEST, &bad.to_string())
        }
    }
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
                    connections.spawn(connection(tcp, peer, acceptor.clone(), shim.clone(), stop_rx.clone()));
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

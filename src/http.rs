//! The HTTP server: `/metrics`, `/healthz`, `/readyz`, `/` and
//! `/api/status`. I/O edge over hyper 1.
//!
//! Readiness deliberately does not follow the XMPP link: run as a sidecar,
//! the exporter's readiness gates its whole pod, and an OnSIP outage must not
//! take the main application out of its Service. `onsip_up` says whether
//! the link works.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, VARY};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::{Format, Metrics};
use crate::page::{render_html, StatusView};
use crate::state::Shared;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;

/// What the handlers need.
pub struct HttpContext {
    pub metrics: Metrics,
    pub shared: Shared,
    pub telemetry_path: String,
    pub version: &'static str,
    /// Cleared when shutdown starts, so `/readyz` turns 503 first.
    pub ready: AtomicBool,
}

type Body = Full<Bytes>;

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn wants_gzip(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',').any(|part| {
                let mut fields = part.split(';');
                let coding = fields.next().unwrap_or("").trim();
                let refused = fields.any(|f| f.trim().replace(' ', "") == "q=0");
                coding.eq_ignore_ascii_case("gzip") && !refused
            })
        })
}

fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    // Level 1: most of the size win for a fraction of the CPU; scrapes of
    // large fleets are CPU-bound on compression otherwise.
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(body)?;
    encoder.finish()
}

/// Routes one request.
pub fn handle(ctx: &HttpContext, request: &Request<Incoming>) -> Response<Body> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        );
    }
    let path = request.uri().path();
    match path {
        p if p == ctx.telemetry_path => metrics(ctx, request),
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => {
            if ctx.ready.load(Ordering::Relaxed) {
                respond(StatusCode::OK, "text/plain; charset=utf-8", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "shutting down\n",
                )
            }
        }
        "/" => {
            let view = status_view(ctx);
            respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                render_html(&view, &ctx.telemetry_path),
            )
        }
        "/api/status" => match serde_json::to_vec_pretty(&status_view(ctx)) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(err) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                format!("{err}\n"),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n",
        ),
    }
}

fn status_view(ctx: &HttpContext) -> StatusView {
    let state = ctx.shared.lock().unwrap_or_else(|p| p.into_inner());
    StatusView::from_state(&state, ctx.version)
}

fn metrics(ctx: &HttpContext, request: &Request<Incoming>) -> Response<Body> {
    let format = Format::negotiate(request.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
    let text = match ctx.metrics.encode(format) {
        Ok(text) => text,
        Err(err) => {
            warn!(cause = %err, "encoding metrics failed");
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "encoding failed\n",
            );
        }
    };
    let mut response = if wants_gzip(request) {
        match gzip(text.as_bytes()) {
            Ok(zipped) => {
                let mut r = respond(StatusCode::OK, format.content_type(), zipped);
                r.headers_mut()
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            Err(_) => respond(StatusCode::OK, format.content_type(), text),
        }
    } else {
        respond(StatusCode::OK, format.content_type(), text)
    };
    response
        .headers_mut()
        .insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    response
}

/// Binds the listen address, with a message that names the flag on failure.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(address)
        .await
        .map_err(|e| format!("--web.listen-address: cannot listen on {address}: {e}"))
}

/// Serves until `cancel` fires, then lets requests in flight finish (up to
/// `drain` long).
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    cancel: CancellationToken,
    drain: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => break },
            () = cancel.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Running out of fds must not end the server: wait a bit.
                    debug!(cause = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => break,
        };
        let ctx = ctx.clone();
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let response = handle(&ctx, &request);
            async move { Ok::<_, Infallible>(response) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%peer, cause = %err, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

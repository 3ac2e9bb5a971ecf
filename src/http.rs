//! The HTTP server: `/metrics`, `/healthz`, `/readyz`, `/` and
//! `/api/status`. I/O edge over hyper 1.
//!
//! Readiness deliberately does not follow the XMPP link: run as a sidecar,
//! the exporter's readiness gates its whole pod, and an OnSIP outage must not
//! take the main application out of its Service. `onsip_up` says whether
//! the link works.
//!
//! With `--web.config.file` (see [`crate::web_config`]) it serves over TLS
//! (optionally requiring client certificates), asks for basic auth on every
//! path except `/healthz` and `/readyz` (kubelet probes cannot send
//! credentials, and those two reveal nothing), and adds the configured
//! headers. The file and the files it names are re-read when they change
//! (checked at most once a second), so a rotated certificate or a new
//! password applies without a restart; a broken new version is logged and
//! the previous one kept.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT, ACCEPT_ENCODING, AUTHORIZATION, CACHE_CONTROL,
    CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, VARY, WWW_AUTHENTICATE,
    X_CONTENT_TYPE_OPTIONS,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{Format, Metrics};
use crate::page::{render_html, StatusView};
use crate::state::Shared;
use crate::web_config::{Authenticator, Credentials, Precheck, WebConfig};

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Longest wait for a request's headers, and for a TLS handshake.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the web config files are looked at for a change, at most.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The status page's own policy (unless the web config sets one): no
/// script, no fetch, only its inline style; not framed.
const PAGE_CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the handlers need.
pub struct HttpContext {
    pub metrics: Metrics,
    pub shared: Shared,
    pub telemetry_path: String,
    pub version: &'static str,
    /// Cleared when shutdown starts, so `/readyz` turns 503 first.
    pub ready: AtomicBool,
    /// TLS, basic auth and headers from `--web.config.file`.
    pub web: WebSecurity,
}

/// The live web configuration (reloaded when its files change) and the
/// basic-auth verifier with its cache.
pub struct WebSecurity {
    current: Mutex<Option<Current>>,
    auth: Arc<Authenticator>,
    /// bcrypt runs one at a time (it is CPU-heavy by design): a flood of
    /// wrong passwords costs one core, and cached scrapes do not wait here.
    bcrypt_gate: Semaphore,
}

struct Current {
    config: Arc<WebConfig>,
    checked: Instant,
}

impl WebSecurity {
    /// `None`: plain HTTP, no authentication, no extra headers.
    pub fn new(config: Option<WebConfig>) -> Self {
        Self {
            current: Mutex::new(config.map(|c| Current {
                config: Arc::new(c),
                checked: Instant::now(),
            })),
            auth: Arc::new(Authenticator::new()),
            bcrypt_gate: Semaphore::new(1),
        }
    }

    /// The configuration in force, re-read first if its files changed.
    pub fn config(&self) -> Option<Arc<WebConfig>> {
        let mut guard = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let current = guard.as_mut()?;
        if current.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            current.checked = Instant::now();
            let now = current.config.look();
            if current.config.differs(&now) {
                let path = current.config.path.clone();
                let kept = match WebConfig::load(&path) {
                    Ok(new) if new.tls.is_some() != current.config.tls.is_some() => {
                        warn!(
                            path = %path.display(),
                            "--web.config.file changed: TLS cannot be switched on or off without a restart; keeping the previous web configuration"
                        );
                        true
                    }
                    Ok(new) => {
                        info!(path = %path.display(), summary = %new.summary(), "--web.config.file reloaded");
                        current.config = Arc::new(new);
                        false
                    }
                    Err(err) => {
                        warn!(cause = %err, "--web.config.file changed but is invalid; keeping the previous web configuration");
                        true
                    }
                };
                if kept {
                    // Warn once per change, not every second.
                    let mut config = (*current.config).clone();
                    config.mark_seen(now);
                    current.config = Arc::new(config);
                }
            }
        }
        Some(current.config.clone())
    }

    /// Checks basic auth against `config`'s users. `Err` says why (for a
    /// debug log: never the user name or password).
    async fn authorize(
        &self,
        config: &WebConfig,
        header: Option<&HeaderValue>,
    ) -> Result<(), &'static str> {
        match self
            .auth
            .precheck(&config.users, Credentials::parse(header))
        {
            Precheck::Allowed => Ok(()),
            Precheck::Denied(why) => Err(why),
            Precheck::NeedsBcrypt {
                known_user,
                hash,
                cost,
                password,
                key,
            } => {
                let _permit = self.bcrypt_gate.acquire().await.map_err(|_| "closing")?;
                let auth = self.auth.clone();
                let ok = tokio::task::spawn_blocking(move || {
                    auth.verify(known_user, &hash, cost, &password, key)
                })
                .await
                .unwrap_or(false);
                if ok {
                    Ok(())
                } else {
                    Err("wrong user name or password")
                }
            }
        }
    }
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

/// Whether `path` needs credentials (when users are configured): all but
/// the probes, which kubelets cannot send credentials to and which reveal
/// nothing but "the process runs" (unless metrics were put there).
fn needs_auth(path: &str, telemetry_path: &str) -> bool {
    !(path == "/healthz" || path == "/readyz") || path == telemetry_path
}

fn unauthorized() -> Response<Body> {
    let mut response = respond(
        StatusCode::UNAUTHORIZED,
        "text/plain; charset=utf-8",
        "unauthorized\n",
    );
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"onsip-ua-exporter\""),
    );
    response
}

/// Authenticates (when configured), routes, and adds the headers.
pub async fn serve_request(
    ctx: &HttpContext,
    request: &Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let web = ctx.web.config();
    let path = request.uri().path();
    let denied = match &web {
        Some(web) if !web.users.is_empty() && needs_auth(path, &ctx.telemetry_path) => ctx
            .web
            .authorize(web, request.headers().get(AUTHORIZATION))
            .await
            .err(),
        _ => None,
    };
    let mut response = match denied {
        Some(why) => {
            debug!(%peer, reason = why, "HTTP request refused: basic auth");
            unauthorized()
        }
        None => handle(ctx, request),
    };
    let headers = response.headers_mut();
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if denied.is_none() && (path == "/" || path == "/api/status") {
        // What phones are offline is nobody's cache's business.
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if path == "/" {
            headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(PAGE_CSP));
        }
    }
    if let Some(web) = &web {
        for (name, value) in &web.headers {
            headers.insert(HeaderName::clone(name), value.clone());
        }
    }
    response
}

fn status_view(ctx: &HttpContext) -> StatusView {
    let state = ctx.shared.lock().unwrap_or_else(|p| p.into_inner());
    StatusView::from_state(&state, ctx.version, crate::session::unix_now())
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
/// `drain` long). Over TLS when the web config says so.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<HttpContext>,
    cancel: CancellationToken,
    drain: Duration,
) {
    let tls_on = ctx.web.config().is_some_and(|c| c.tls.is_some());
    if let Some(web) = ctx.web.config() {
        info!(path = %web.path.display(), summary = %web.summary(), "--web.config.file in force");
    }
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
        let watcher = graceful.watcher();
        if !tls_on {
            tokio::spawn(async move {
                serve_connection(ctx, stream, peer, watcher).await;
                drop(permit);
            });
            continue;
        }
        // The TLS configuration in force now (a rotated certificate applies
        // to the next connection).
        let Some(tls) = ctx.web.config().and_then(|c| c.tls.clone()) else {
            continue;
        };
        tokio::spawn(async move {
            if plain_http_to_tls(&stream).await {
                refuse_plain_http(stream, peer).await;
                drop(permit);
                return;
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config);
            match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_connection(ctx, tls_stream, peer, watcher).await,
                Ok(Err(err)) => debug!(%peer, cause = %err, "TLS handshake failed"),
                Err(_) => debug!(%peer, "TLS handshake timed out"),
            }
            drop(permit);
        });
    }
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
}

async fn serve_connection<S>(
    ctx: Arc<HttpContext>,
    stream: S,
    peer: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(serve_request(&ctx, &request, peer).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(err) = watcher.watch(connection).await {
        debug!(%peer, cause = %err, "HTTP connection ended with an error");
    }
}

/// Whether a client speaks plain HTTP to the TLS port: a TLS connection
/// starts with a handshake record (0x16), an HTTP request with a method
/// name in capitals.
async fn plain_http_to_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(READ_TIMEOUT, stream.peek(&mut first)).await,
        Ok(Ok(1)) if first[0].is_ascii_uppercase()
    )
}

/// Answers a plain-HTTP request on the TLS port with a 400 that says so
/// (as Go's servers do), and closes: nothing is served over plain HTTP.
async fn refuse_plain_http(mut stream: TcpStream, peer: SocketAddr) {
    debug!(%peer, "plain HTTP request on the TLS port refused");
    // Read what was sent so closing does not reset the connection before
    // the client reads the answer.
    let mut head = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut head)).await;
    let body = "Client sent an HTTP request to an HTTPS server.\n";
    let response = format!(
        "HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::needs_auth;

    #[test]
    fn only_the_probes_are_open() {
        for path in [
            "/",
            "/metrics",
            "/api/status",
            "/nope",
            "/healthz/",
            "/HEALTHZ",
        ] {
            assert!(needs_auth(path, "/metrics"), "{path}");
        }
        assert!(!needs_auth("/healthz", "/metrics"));
        assert!(!needs_auth("/readyz", "/metrics"));
        // Metrics moved onto a probe path stay locked.
        assert!(needs_auth("/healthz", "/healthz"));
    }
}

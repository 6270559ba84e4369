//! The HTTP listener in front of the router: how many connections are served, and for how
//! long a connection may say nothing.
//!
//! - **Header timeout.** A connection that has not sent a complete request head within
//!   `http.header_timeout_secs` is closed, whether it is slow (a byte at a time) or idle
//!   between keep-alive requests: idle sockets cannot pile up until the process runs out
//!   of file descriptors.
//! - **A cap with headroom.** Up to `http.max_connections` connections are served in full.
//!   The next `http.reserved_connections` may still reach the health, metrics and ingest
//!   routes (so a flood of idle or greedy clients cannot take health checks and collectors
//!   off the air); anything else on them is answered 503 with `Retry-After`. Past both, a
//!   new connection is answered 503 and closed at once, without reading its request.
//! - **Graceful shutdown.** On stop, connections finish their request in flight; after
//!   `DRAIN` the rest are dropped.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use digame_infra::config::HttpConfig;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

/// Routes a connection in the reserve may still reach.
fn reserved_route(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/v1/events")
}

/// Connections served in full when `http.max_connections` is 0: the open-file limit less
/// room for the store, the bus and the metadata database.
pub fn default_max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    soft.saturating_sub(256).clamp(64, 16_384)
}

/// Serves `app` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &HttpConfig,
    stop: impl std::future::Future<Output = ()>,
) {
    let full = match config.max_connections {
        0 => default_max_connections(),
        n => n,
    };
    let general = Arc::new(Semaphore::new(full));
    let reserve = Arc::new(Semaphore::new(config.reserved_connections));
    let header_timeout = Duration::from_secs(config.header_timeout_secs.max(1));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors or a reset before accept: back off, never spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let (permit, reserved) = match general.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => {
                    tokio::spawn(refuse(stream));
                    continue;
                }
            },
        };
        let app = app.clone();
        let service = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            let app = app.clone();
            async move {
                if reserved && !reserved_route(req.uri().path()) {
                    return Ok(busy());
                }
                app.oneshot(req.map(axum::body::Body::new)).await
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // Choosing between HTTP/1 and HTTP/2 reads the first bytes with no deadline of
            // its own (the header timeout starts after): a socket that sends nothing is
            // closed here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                // Silent past the deadline, closed, or failed.
                _ => {
                    drop(permit);
                    return;
                }
            }
            let conn = builder
                .serve_connection_with_upgrades(
                    TokioIo::new(stream),
                    TowerToHyperService::new(service),
                )
                .into_owned();
            // A client that goes away mid-request is not the server's error.
            let _ = watcher.watch(conn).await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN:?}; closing them");
    }
}

/// The answer on a connection in the reserve to a route outside it.
fn busy() -> Response<axum::body::Body> {
    let mut resp = Response::new(axum::body::Body::from(
        r#"{"error":{"code":"too_many_connections","message":"the server is at its connection limit; retry shortly"}}"#,
    ));
    *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = resp.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Past the reserve: a 503 without reading the request, then close.
async fn refuse(mut stream: tokio::net::TcpStream) {
    const ANSWER: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(ANSWER)).await;
}

//! The accept loop. `axum::serve` runs hyper without a timer, so a client
//! that sends half a request line (or nothing) holds its connection and a
//! file descriptor for good. Here every connection gets:
//! - a header-read timeout (hyper's, driven by a tokio timer),
//! - a deadline from accept to the WebSocket upgrade (for plain HTTP: to
//!   the end of its last request; keep-alive connections are then closed
//!   after their answer),
//! - a place among at most `max_handshakes` connections not yet upgraded;
//!   beyond it a new connection is closed at once.
//!
//! Each refusal is counted in `orders_gateway_http_connections_refused_total`
//! by `reason`. An upgraded WebSocket leaves this accounting: its session
//! owns it from then on (and has its own limits).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The bounds on connections before they are sockets.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
}

/// How long a connection told to stop may take to finish its answer.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// After a failed accept (EMFILE, ENFILE, ...) wait before the next try
/// instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serve `app` on `listener` until `stop`, then give the connections still
/// in their handshake a moment to finish and return.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let connections = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    metrics::counter!("orders_gateway_accept_errors_total").increment(1);
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            refused("handshake_limit");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let stop = stop.clone();
        let handshake_timeout = limits.handshake_timeout;
        connections.spawn(async move {
            // Held until the connection is upgraded (hyper hands the socket
            // to the upgrade and this future ends) or closed.
            let _permit = permit;
            tokio::pin!(conn);
            let reason = tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done
                        && e.is_timeout()
                    {
                        refused("header_timeout");
                    }
                    return;
                }
                _ = tokio::time::sleep(handshake_timeout) => "handshake_timeout",
                _ = stop.cancelled() => "shutdown",
            };
            if reason != "shutdown" {
                refused(reason);
            }
            // Answers a request in flight, then closes; one that is still
            // sending its head is cut off when the grace ends.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, conn).await;
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(STOP_GRACE * 2, connections.wait()).await;
}

fn refused(reason: &'static str) {
    metrics::counter!("orders_gateway_http_connections_refused_total", "reason" => reason)
        .increment(1);
}

//! The listener: HTTP/1 connections over the axum router, with the limits a server that faces
//! clients it does not trust needs. `axum::serve` has none of them: a client that never
//! finishes its request head held its connection forever, any number of such clients could
//! connect, and a graceful shutdown waited for all of them.
//!
//! - the head of every request must arrive within `header_timeout` (idle keep-alive
//!   connections included), else hyper closes the connection;
//! - at most `max_connections` connections are served at once; one more is answered 503 and
//!   closed, so a client sees why instead of a hang;
//! - a shutdown stops accepting, gives the requests in flight `shutdown_grace` (or until `force`
//!   completes, a second Ctrl-C), then closes every connection still open.
//!
//! The body of a request has its own limit (`body_timeout`, in [`crate::state`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// The connection limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectionLimits {
    /// Time a client has to send a request head.
    pub header_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time requests in flight get once a shutdown is asked for.
    pub shutdown_grace: Duration,
}

/// How long a refused connection may take to send its request head and read our 503 before it
/// is dropped: enough for a client on a normal link, too short for a flood of refused
/// connections to pile up.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// The answer to a connection beyond the limit.
const REFUSAL: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: ";

fn refusal_body(limit: usize) -> String {
    let error = crate::error::ApiError {
        retry_after: Some(1),
        ..crate::error::ApiError::unavailable()
    };
    let message = format!(
        "the server has {limit} connections open, its limit (--max-connections); retry later"
    );
    let mut body = error.body();
    body["error"]["message"] = serde_json::Value::String(message);
    body.to_string()
}

/// Answer 503 on a connection beyond the limit and close it.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = refusal_body(limit);
    let answer = format!("{REFUSAL}{}\r\n\r\n{body}", body.len());
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        // Read the request head first: no HTTP client accepts an answer to a request it has
        // not sent yet.
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes: closing a socket with unread input
        // resets it, and the client may lose the answer.
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut stream, &mut sink).await
    })
    .await;
}

/// Serve `router` on `listener` until `shutdown` completes, under `limits`; then wait for the
/// requests in flight at most `limits.shutdown_grace` or until `force` completes.
pub(crate) async fn serve(
    router: Router,
    listener: TcpListener,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    force: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max));
    // Refusals are short, but a flood of them must not grow without bound either.
    let refusals = Arc::new(Semaphore::new(max));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // Reap finished connections so the set does not grow with every one ever served.
        while connections.try_join_next().is_some() {}
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    log::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                connections.spawn(async move {
                    refuse(stream, max).await;
                    drop(slot);
                });
            }
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    let mut force = std::pin::pin!(force);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_grace) => {
            log::warn!(
                "requests still running after the shutdown grace of {:.1} s; closing their connections",
                limits.shutdown_grace.as_secs_f64()
            );
        }
        () = &mut force => {}
    }
    // Whatever is left (a client holding its request open) is closed now.
    connections.abort_all();
    while connections.join_next().await.is_some() {}
    Ok(())
}

//! The accept loop. axum's `serve` sets no header timeout, so a client that
//! trickles its headers (slowloris) would hold a connection forever; here
//! every connection gets one, and the node caps how many it holds.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// A connection's place under the node's cap. WebSocket sessions keep it
/// (it rides in the request's extensions) for as long as the socket lives.
#[derive(Clone)]
pub struct ConnectionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
    /// When the TCP connection was accepted: handshakes are timed from here.
    pub accepted: tokio::time::Instant,
}

/// Serves `router` on `listener` until `shutdown`, then lets open HTTP
/// requests finish for up to `grace`. Each connection takes a permit of
/// `slots` (the node's cap), held for as long as it lives: the caller
/// creates it, so that a restarted accept loop counts the connections the
/// previous one accepted.
pub async fn serve(
    listener: Arc<TcpListener>,
    router: Router,
    slots: Arc<Semaphore>,
    header_timeout: Duration,
    shutdown: CancellationToken,
    grace: Duration,
) {
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, or a reset during the handshake:
                    // wait a moment rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "connection refused: the node holds the most connections allowed");
            drop(stream);
            continue;
        };
        // Messages are small writes that must leave at once: no Nagle delay
        // waiting for the client's acknowledgement of the previous one.
        let _ = stream.set_nodelay(true);
        let slot = ConnectionSlot {
            _permit: Arc::new(slot),
            accepted: tokio::time::Instant::now(),
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        // One connection's task: a panic in it (a bug in a handler) ends that
        // connection alone, and is logged.
        let served = async move {
            let service =
                hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(remote));
                    request.extensions_mut().insert(slot.clone());
                    let router = router.clone();
                    async move {
                        Ok::<_, Infallible>(
                            router
                                .oneshot(request.map(axum::body::Body::new))
                                .await
                                .unwrap_or_else(|e| match e {}),
                        )
                    }
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %remote, "connection ended with an error");
                    }
                }
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(grace, connection).await;
                }
            }
        };
        tokio::spawn(async move {
            if std::panic::AssertUnwindSafe(served)
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(%remote, "a connection's task panicked; that connection is closed");
            }
        });
    }
}

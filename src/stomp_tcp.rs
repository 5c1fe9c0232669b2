//! STOMP over plain TCP (`PGRELAY_STOMP_LISTEN`): what Spring's
//! `StompBrokerRelayMessageHandler` (and any STOMP broker's client) speaks.
//!
//! Each TCP connection is a STOMP session like one over WebSocket, with the
//! same limits, heart-beats and fault behaviour: [`framing`] cuts the byte
//! stream into frames and turns the session's close into an ERROR frame
//! followed by the end of the connection (TCP has no close frame), and the
//! session itself is [`crate::session`]'s. An API key as CONNECT `passcode`
//! makes the session a trusted backend's (see `session::stomp::handshake`).
//!
//! It may use the node's state and the session; nothing uses it but the
//! node's start.

mod framing;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::protocol::Protocol;
use crate::protocol::stomp::FrameLimits;
use crate::session::{self, SessionParams, Transport};
use crate::state::NodeState;

pub use framing::{TcpFrames, TcpSink, complete_frame, split};

/// Probes an idle connection every `interval` and ends it after three
/// unanswered probes, or when sent data goes unacknowledged that long.
fn keep_alive(stream: &tokio::net::TcpStream, interval: Duration) {
    let interval = interval.max(Duration::from_secs(1));
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(interval)
        .with_interval(interval)
        .with_retries(3);
    let socket = socket2::SockRef::from(stream);
    if let Err(error) = socket
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| socket.set_tcp_user_timeout(Some(interval * 4)))
    {
        tracing::debug!(%error, "could not set TCP keepalive");
    }
}

/// Accepts STOMP connections until the node shuts down. Each takes a permit
/// of `slots` (the node's cap on client connections, shared with HTTP) for
/// as long as it lives.
pub async fn serve(ctx: Arc<NodeState>, listener: Arc<TcpListener>, slots: Arc<Semaphore>) {
    let shutdown = ctx.lifecycle.shutdown.clone();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "STOMP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "STOMP connection refused: the node holds the most connections allowed");
            drop(stream);
            continue;
        };
        // Frames are small writes that must leave at once.
        let _ = stream.set_nodelay(true);
        // A peer that vanished (its host died, a network cut) without
        // heart-beats would hold what it was written forever: the kernel's
        // keepalive finds it within about three heartbeat intervals.
        keep_alive(&stream, ctx.settings.heartbeat_interval);
        let accepted = tokio::time::Instant::now();
        let limits = FrameLimits::new(ctx.settings.max_message_bytes);
        let (sink, incoming) = split(stream, limits);
        let params = SessionParams {
            identity: None,
            since: None,
            accepted,
            protocol: Protocol::Stomp,
            transport: Transport::Tcp,
            remote_addr: remote.to_string(),
            user_agent: None,
        };
        let task_ctx = ctx.clone();
        ctx.lifecycle.tasks.spawn(async move {
            let _slot = slot;
            session::run(task_ctx, sink, incoming, params).await;
        });
    }
}

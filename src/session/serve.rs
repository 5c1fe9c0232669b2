//! A session's loop: it reads the client (as fast as the frame rate and
//! its submissions in flight allow), writes what its mailbox receives,
//! pings, watches for silence, and obeys a close from outside or the
//! node's shutdown; then its finish (departure first, then the close).

use std::time::Duration;

// Tokio's clock: the same as the system's, except in tests that pause it.
use tokio::time::Instant;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{SinkExt, StreamExt};

use super::submit::{IN_FLIGHT, next_answer};
use super::{Exit, Half, Input, Session, Transport, WsSink, WsStream};
use crate::metrics as m;
use crate::read::hub::{Control, Inbox};

/// Live messages written per flush.
const WRITE_BATCH: usize = 64;
/// How long a closing session waits for its departure to commit (its
/// unwritten messages parked), before it closes anyway: the delivery log
/// writes it when the database answers.
const DEPARTURE_WAIT: Duration = Duration::from_secs(2);

impl<P: Half, S: WsSink> Session<P, S> {
    /// Serves the connection until it ends; the error says how.
    pub(super) async fn serve<I: WsStream>(
        &mut self,
        inbox: &mut Inbox,
        incoming: &mut I,
    ) -> Result<std::convert::Infallible, Exit> {
        P::confirm(self).await?;
        let heartbeat = self.ctx.settings.heartbeat_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let heartbeat_out = self.proto.heartbeat_out();
        let mut beat = tokio::time::interval(heartbeat_out.unwrap_or(Duration::from_secs(3600)));
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.reset();
        let controls = inbox.controls();
        loop {
            if inbox.is_lagging() {
                Box::pin(self.catch_up(inbox)).await?;
            }
            // Input is read while the frame rate allows and the connection
            // has room for more submissions in flight: otherwise the socket
            // is left unread, and TCP slows the client down.
            let throttle = self.inbound_rate.wait();
            let reading = throttle.is_zero() && self.in_flight.len() < IN_FLIGHT;
            if !reading {
                // Its pongs and heart-beats wait unread too: silence we
                // impose is not the client's.
                self.last_inbound = Instant::now();
            }
            tokio::select! {
                biased;
                () = self.ctx.lifecycle.shutdown.cancelled() => return Err(Exit::shutting_down()),
                control = controls.next() => match control {
                    Control::Close { code, reason } => return Err(Exit::Close { code, reason }),
                },
                (reply, answer) = next_answer(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    Box::pin(self.on_answered(reply, answer)).await?;
                }
                () = tokio::time::sleep(throttle), if !throttle.is_zero() => {
                    metrics::counter!(m::THROTTLED, "protocol" => self.protocol_name()).increment(1);
                }
                inbound = incoming.next(), if reading => match inbound {
                    Some(Ok(message)) => Box::pin(self.on_inbound(message)).await?,
                    Some(Err(error)) => return Err(self.on_socket_error(error)),
                    None => return Err(Exit::Gone),
                },
                Some(first) = inbox.messages.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < WRITE_BATCH {
                        match inbox.messages.try_recv() {
                            Ok(envelope) => batch.push(envelope),
                            Err(_) => break,
                        }
                    }
                    Box::pin(self.deliver_live(batch)).await?;
                }
                _ = ping.tick() => {
                    // Over TCP only STOMP heart-beats tell: a client that
                    // promised none is left to TCP's own keepalive.
                    let pings = self.transport == Transport::WebSocket;
                    let watched = pings || self.proto.heartbeat_in().is_some();
                    if watched && self.last_inbound.elapsed() > self.silence_limit() {
                        return Err(Exit::close(1001, "heartbeat timeout"));
                    }
                    if pings {
                        self.send(Message::Ping(Default::default())).await?;
                    }
                }
                _ = beat.tick(), if heartbeat_out.is_some() => {
                    self.send(Message::Text(Utf8Bytes::from_static("\n"))).await?;
                }
            }
        }
    }

    /// How long the client may stay silent: two heartbeat intervals (ours,
    /// or the one it promised in STOMP's heart-beat header).
    fn silence_limit(&self) -> Duration {
        let interval = self
            .proto
            .heartbeat_in()
            .unwrap_or(self.ctx.settings.heartbeat_interval);
        interval * 2 + Duration::from_millis(100)
    }

    /// Writes one frame, bounded by the slow-consumer timeout.
    pub(super) async fn send(&mut self, message: Message) -> Result<(), Exit> {
        let limit = self.ctx.settings.limits.slow_consumer_timeout;
        match tokio::time::timeout(limit, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Exit::Gone),
            Err(_) => Err(Exit::close(
                1008,
                "slow consumer: not reading; reconnect with since",
            )),
        }
    }

    /// An oversized frame is the client's fault and gets 1009 with the
    /// limit; anything else means the socket is gone.
    fn on_socket_error(&self, error: axum::Error) -> Exit {
        let error = error.into_inner();
        if let Some(tokio_tungstenite::tungstenite::Error::Capacity(_)) = error.downcast_ref() {
            let limit = self.ctx.settings.max_message_bytes;
            return Exit::close(1009, format!("message too big: the limit is {limit} bytes"));
        }
        tracing::debug!(%error, "socket error");
        Exit::Gone
    }

    async fn on_inbound(&mut self, message: Message) -> Result<(), Exit> {
        let is_data = matches!(message, Message::Text(_) | Message::Binary(_));
        if !(is_data && self.proto.counts_its_own_frames()) {
            self.inbound_rate.charge(1);
        }
        // A STOMP client that promised heart-beats must send them: WebSocket
        // pongs (which its library sends on its own) do not count.
        if is_data || self.proto.heartbeat_in().is_none() {
            self.last_inbound = Instant::now();
            if self.last_marked.elapsed() >= self.ctx.settings.heartbeat_interval / 2 {
                self.ctx.delivery.hub.mark_seen(self.id);
                self.last_marked = self.last_inbound;
            }
        }
        match message {
            Message::Text(text) => P::input(self, Input::Text(text)).await,
            Message::Binary(bytes) => P::input(self, Input::Binary(bytes)).await,
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Exit::ClientClosed),
        }
    }

    /// Deregisters, then closes the socket (if we are the ones closing) or
    /// completes the client's close. Deregistering first means that once a
    /// client's close completes, every message routed to this connection has
    /// been written (and recorded) or parked for the user: a reconnect, even
    /// without `since`, cannot race it. What its queue held, what it dropped
    /// while lagging and what STOMP held for a subscription never came are
    /// all still routed to it in the outbox: the departure parks them.
    pub(super) async fn finish<I: WsStream>(
        mut self,
        mut inbox: Inbox,
        incoming: &mut I,
        exit: Exit,
    ) {
        self.finished = true;
        let topics: Vec<_> = self.topics.keys().cloned().collect();
        self.ctx.delivery.hub.remove(self.id, &topics);
        inbox.messages.close();
        if !self.ctx.delivery.log.depart(self.id, DEPARTURE_WAIT).await {
            // Queued: written once the database answers; until then, work
            // routed to the connection is parked by the claimer.
            tracing::warn!("the connection's departure is not recorded yet");
        }
        let protocol = self.protocol_name();
        let why = match &exit {
            Exit::Close { code, reason } => m::close_reason(*code, reason),
            Exit::ClientClosed => "client",
            Exit::Gone => "gone",
        };
        metrics::gauge!(m::CONNECTIONS, "protocol" => protocol).decrement(1.0);
        metrics::counter!(m::CONNECTIONS_CLOSED, "protocol" => protocol, "reason" => why)
            .increment(1);
        match &exit {
            Exit::Close { code, reason } => {
                tracing::debug!(code, %reason, "closing");
                close_and_drain(&mut self.sink, incoming, *code, reason).await;
            }
            Exit::ClientClosed => {
                tracing::debug!("client closed");
                // Sends the close reply that the WebSocket layer has queued.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
            }
            Exit::Gone => tracing::debug!("client gone"),
        }
    }
}

/// Sends a close frame, then reads until the client answers (briefly): a
/// socket dropped with unread input is reset, and a reset makes the client
/// discard what it had not read yet, the close frame and its reason included.
pub async fn close_and_drain<S: WsSink, I: WsStream>(
    sink: &mut S,
    incoming: &mut I,
    code: u16,
    reason: &str,
) {
    if close(sink, code, reason).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(message)) = incoming.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn close<S: WsSink>(sink: &mut S, code: u16, reason: &str) -> Result<(), axum::Error> {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    match tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(Message::Close(Some(frame))),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

//! One client socket, from upgrade to close.
//!
//! A session registers its connection, sends `welcome`, then its backfill (the
//! stream after `since`, or what was parked for the user), then whatever the
//! outbox claimer routes to it. It keeps a cursor: the id of the last message
//! of its stream it wrote. Messages at or below the cursor are duplicates (a
//! claim that was retried) and are dropped, so the client sees each id once
//! and in order.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{Identity, bearer};
use crate::config::Auth;
use crate::deliveries::Record;
use crate::http::Problem;
use crate::hub::{Control, Envelope, Inbox};
use crate::message::StoredMessage;
use crate::node::NodeContext;
use crate::protocol::Protocol;
use crate::protocol::json::{self, ClientFrame, To};
use crate::registry::connections::{self, NewConnection};
use crate::stream;

/// Bad frames tolerated per minute before the client is closed.
const BAD_FRAMES_PER_MINUTE: usize = 10;
/// Delivered-but-unacked ids remembered per connection, to validate acks.
const UNACKED_REMEMBERED: usize = 10_000;
/// Live messages written per flush.
const WRITE_BATCH: usize = 64;
/// A write that takes longer than this means the client is not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room for the JSON around a message's data in an inbound frame.
const FRAME_OVERHEAD: usize = 4096;

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    since: Option<String>,
}

/// `GET /v1/ws`: authenticates, then upgrades. Everything wrong with the
/// request is answered with problem+json before the upgrade.
pub async fn upgrade(
    State(ctx): State<Arc<NodeContext>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return Problem::bad_request(
                "not_websocket",
                format!("{rejection}: connect with a WebSocket client"),
            )
            .into_response();
        }
    };
    let query = match Query::<WsQuery>::try_from_uri(&uri) {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return Problem::bad_request("bad_query", rejection.body_text()).into_response();
        }
    };
    let since = match query.since.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(since)) if since >= 0 => Some(since),
        Some(_) => {
            return Problem::bad_request(
                "bad_since",
                "`since` must be a message id (a decimal number)",
            )
            .into_response();
        }
    };

    let requested: Vec<String> = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .flat_map(|p| p.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let wants_json = requested.iter().any(|p| p == "pgrelay.v1");
    if !wants_json && requested.iter().any(|p| p.ends_with(".stomp")) {
        return Problem::bad_request(
            "unsupported_protocol",
            "STOMP is not supported by this version of pgrelay",
        )
        .into_response();
    }
    let protocol = Protocol::Json;

    let identity = match &ctx.settings.auth {
        Auth::None => match query.user.as_deref() {
            Some(user) => match Identity::unauthenticated(user) {
                Ok(identity) => identity,
                Err(e) => return Problem::bad_request("bad_user", e).into_response(),
            },
            None => {
                return Problem::bad_request(
                    "missing_user",
                    "auth is `none`: name the user with ?user=<id>",
                )
                .into_response();
            }
        },
        Auth::Jwt { verifier, .. } => {
            let from_header = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            let Some(token) = from_header.or(query.token.as_deref()) else {
                return Problem::unauthorized(
                    "a token is required: `Authorization: Bearer <jwt>` or ?token=<jwt>",
                )
                .into_response();
            };
            match verifier.verify(token) {
                Ok(identity) => identity,
                Err(e) => return Problem::unauthorized(e).into_response(),
            }
        }
    };

    let params = SessionParams {
        identity,
        since,
        protocol,
        remote_addr: remote.to_string(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect()),
    };
    let limit = ctx.settings.max_message_bytes + FRAME_OVERHEAD;
    let ws = if wants_json {
        ws.protocols(["pgrelay.v1"])
    } else {
        ws
    };
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .on_failed_upgrade(|error| tracing::debug!(%error, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            let tasks = ctx.tasks.clone();
            tasks.track_future(run(ctx, socket, params))
        })
}

/// Who connected, and how.
pub struct SessionParams {
    pub identity: Identity,
    pub since: Option<i64>,
    pub protocol: Protocol,
    pub remote_addr: String,
    pub user_agent: Option<String>,
}

/// Runs a session to its end.
pub async fn run(ctx: Arc<NodeContext>, socket: WebSocket, params: SessionParams) {
    let id = Uuid::now_v7();
    let span = tracing::info_span!(
        "session",
        connection_id = %id,
        user_id = %params.identity.user_id,
        protocol = params.protocol.as_str(),
    );
    start(ctx, socket, params, id).instrument(span).await;
}

async fn start(ctx: Arc<NodeContext>, socket: WebSocket, params: SessionParams, id: Uuid) {
    let (mut sink, mut incoming) = socket.split();
    let user = params.identity.user_id.clone();
    // In the hub before the row commits: see Hub::register.
    let mut inbox = ctx.hub.register(id, ctx.settings.send_queue);
    let registration = NewConnection {
        id,
        node_id: &ctx.node_id,
        user_id: &user,
        protocol: params.protocol.as_str(),
        remote_addr: &params.remote_addr,
        user_agent: params.user_agent.as_deref(),
        since: params.since,
    };
    let head = match crate::db::bounded(connections::attach(&ctx.pool, &registration)).await {
        Ok(head) => head,
        Err(error) => {
            ctx.hub.remove(id);
            tracing::warn!(%error, "could not register the connection");
            let _ = close(
                &mut sink,
                1013,
                "cannot register the connection now; try again",
            )
            .await;
            return;
        }
    };
    tracing::debug!(head, since = ?params.since, "connected");

    let now = Instant::now();
    let mut session = Session {
        stream: stream::user_stream(&user),
        ctx,
        id,
        user,
        sink,
        cursor: params.since.unwrap_or(0),
        unacked: Unacked::default(),
        bad_frames: VecDeque::new(),
        last_inbound: now,
        last_marked: now,
        unsent: Vec::new(),
    };
    let Err(exit) = session
        .serve(&mut inbox, &mut incoming, params.since.is_some(), head)
        .await;
    session.finish(inbox, exit).await;
}

/// Why a session ended.
#[derive(Debug)]
enum Exit {
    /// The client sent a close frame.
    ClientClosed,
    /// The socket failed.
    Gone,
    /// We close, with this code and reason.
    Close { code: u16, reason: String },
}

impl Exit {
    fn close(code: u16, reason: impl Into<String>) -> Self {
        Exit::Close {
            code,
            reason: reason.into(),
        }
    }
}

/// Where a written message came from; decides what a failed write means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Routed here by the outbox: parked for the user if it cannot be written.
    Live,
    /// Parked for the user: stays parked until a write succeeds.
    Parked,
    /// Read from the stream: the client gets it again by resuming with `since`.
    Stream,
}

struct Outgoing {
    message: Arc<StoredMessage>,
    frame: Utf8Bytes,
    origin: Origin,
}

struct Session {
    ctx: Arc<NodeContext>,
    id: Uuid,
    user: Arc<str>,
    stream: String,
    sink: SplitSink<WebSocket, Message>,
    /// The last id of the user's stream written to this socket.
    cursor: i64,
    unacked: Unacked,
    bad_frames: VecDeque<Instant>,
    last_inbound: Instant,
    last_marked: Instant,
    /// Live messages that could not be written: parked when the session ends.
    unsent: Vec<i64>,
}

impl Session {
    async fn serve(
        &mut self,
        inbox: &mut Inbox,
        incoming: &mut SplitStream<WebSocket>,
        resuming: bool,
        head: i64,
    ) -> Result<Infallible, Exit> {
        let heartbeat = self.ctx.settings.heartbeat_interval;
        let welcome = json::welcome(
            &self.id.to_string(),
            self.ctx.node_id.as_str(),
            heartbeat.as_millis() as u64,
        );
        self.send(Message::Text(welcome.into())).await?;
        let origin = if resuming {
            Origin::Stream
        } else {
            Origin::Parked
        };
        self.backfill(origin, head).await?;

        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if inbox.is_lagging() {
                self.catch_up(inbox).await?;
            }
            tokio::select! {
                biased;
                () = self.ctx.shutdown.cancelled() => {
                    return Err(Exit::close(1012, "node shutting down; reconnect with since"));
                }
                Some(control) = inbox.control.recv() => match control {
                    Control::Close { code, reason } => return Err(Exit::Close { code, reason }),
                },
                inbound = incoming.next() => match inbound {
                    Some(Ok(message)) => self.on_inbound(message).await?,
                    Some(Err(error)) => {
                        tracing::debug!(%error, "socket error");
                        return Err(Exit::Gone);
                    }
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
                    self.write_live(batch).await?;
                }
                _ = ping.tick() => {
                    if self.last_inbound.elapsed() > heartbeat * 2 {
                        return Err(Exit::close(1001, "heartbeat timeout"));
                    }
                    self.send(Message::Ping(Bytes::new())).await?;
                }
            }
        }
    }

    /// Writes the stream (or the parked messages) up to `head`, page by page.
    async fn backfill(&mut self, origin: Origin, head: i64) -> Result<(), Exit> {
        loop {
            let page = match origin {
                Origin::Parked => {
                    stream::parked_page(&self.ctx.pool, &self.user, self.cursor, head).await
                }
                _ => stream::page(&self.ctx.pool, &self.stream, self.cursor, head, self.id).await,
            };
            let page = page.map_err(|error| {
                tracing::warn!(%error, "reading the backfill failed");
                Exit::close(1013, "database unavailable; reconnect with since")
            })?;
            let Some(last) = page.last() else { break };
            self.cursor = last.id;
            let full = page.len() as i64 == stream::PAGE;
            let batch = page
                .into_iter()
                .map(|message| Outgoing {
                    frame: json::message(&message, To::User(&self.user)).into(),
                    message,
                    origin,
                })
                .collect();
            self.write(batch).await?;
            if !full {
                break;
            }
        }
        self.cursor = head;
        Ok(())
    }

    /// Recovers from a full mailbox: what is queued precedes the gap, and the
    /// stream read after it covers every message that was dropped.
    async fn catch_up(&mut self, inbox: &mut Inbox) -> Result<(), Exit> {
        let mut queued = Vec::new();
        while let Ok(envelope) = inbox.messages.try_recv() {
            queued.push(envelope);
        }
        self.write_live(queued).await?;
        inbox.clear_lagging();
        let head = stream::head(&self.ctx.pool, &self.stream)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "reading the stream head failed");
                Exit::close(1013, "database unavailable; reconnect with since")
            })?;
        tracing::debug!(from = self.cursor, head, "catching up after a full mailbox");
        self.backfill(Origin::Stream, head).await
    }

    async fn write_live(&mut self, batch: Vec<Arc<Envelope>>) -> Result<(), Exit> {
        let mut fresh = Vec::with_capacity(batch.len());
        for envelope in batch {
            if envelope.message.id > self.cursor {
                self.cursor = envelope.message.id;
                fresh.push(Outgoing {
                    message: envelope.message.clone(),
                    frame: envelope.frame.clone(),
                    origin: Origin::Live,
                });
            }
        }
        self.write(fresh).await
    }

    /// Writes and flushes a batch, then records the deliveries.
    async fn write(&mut self, batch: Vec<Outgoing>) -> Result<(), Exit> {
        if batch.is_empty() {
            return Ok(());
        }
        let sink = &mut self.sink;
        let written = tokio::time::timeout(WRITE_TIMEOUT, async {
            for item in &batch {
                sink.feed(Message::Text(item.frame.clone())).await?;
            }
            sink.flush().await
        })
        .await;
        let failure = match written {
            Ok(Ok(())) => None,
            Ok(Err(error)) => {
                tracing::debug!(%error, "write failed");
                Some(Exit::Gone)
            }
            Err(_) => Some(Exit::close(
                1008,
                "slow consumer: not reading; reconnect with since",
            )),
        };
        if let Some(exit) = failure {
            self.unsent.extend(
                batch
                    .iter()
                    .filter(|item| {
                        item.origin == Origin::Live && item.message.target_connection.is_none()
                    })
                    .map(|item| item.message.id),
            );
            return Err(exit);
        }
        let at = chrono::Utc::now();
        for item in batch {
            self.unacked.insert(item.message.id);
            self.ctx
                .deliveries
                .record(Record::Delivered {
                    message_id: item.message.id,
                    connection_id: self.id,
                    user_id: self.user.clone(),
                    at,
                    unpark: item.origin == Origin::Parked,
                })
                .await;
        }
        Ok(())
    }

    async fn send(&mut self, message: Message) -> Result<(), Exit> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.sink.send(message)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Exit::Gone),
            Err(_) => Err(Exit::close(
                1008,
                "slow consumer: not reading; reconnect with since",
            )),
        }
    }

    async fn on_inbound(&mut self, message: Message) -> Result<(), Exit> {
        self.last_inbound = Instant::now();
        if self.last_marked.elapsed() >= self.ctx.settings.heartbeat_interval / 2 {
            self.ctx.hub.mark_seen(self.id);
            self.last_marked = self.last_inbound;
        }
        match message {
            Message::Text(text) => self.on_text(&text).await,
            Message::Binary(_) => {
                self.bad_frame("binary frames are not part of the pgrelay.v1 protocol")
                    .await
            }
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Exit::ClientClosed),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), Exit> {
        match ClientFrame::decode(text) {
            Err(reason) => self.bad_frame(&reason).await,
            Ok(ClientFrame::Ack { id }) => {
                if self.unacked.take(id.0) {
                    self.ctx
                        .deliveries
                        .record(Record::Acked {
                            message_id: id.0,
                            connection_id: self.id,
                            at: chrono::Utc::now(),
                        })
                        .await;
                    Ok(())
                } else {
                    self.send_error(
                        "unknown_message",
                        &format!(
                            "message {} was not delivered on this connection, or is already acked",
                            id.0
                        ),
                    )
                    .await
                }
            }
            Ok(
                ClientFrame::Subscribe { .. }
                | ClientFrame::Unsubscribe { .. }
                | ClientFrame::Publish { .. },
            ) => {
                self.send_error(
                    "unsupported",
                    "topics are not supported by this version of pgrelay",
                )
                .await
            }
        }
    }

    /// Answers a bad frame with an `error` frame; too many in a minute close
    /// the connection.
    async fn bad_frame(&mut self, reason: &str) -> Result<(), Exit> {
        let now = Instant::now();
        while self
            .bad_frames
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.bad_frames.pop_front();
        }
        self.bad_frames.push_back(now);
        self.send_error("bad_frame", reason).await?;
        if self.bad_frames.len() > BAD_FRAMES_PER_MINUTE {
            return Err(Exit::close(1008, "too many bad frames"));
        }
        Ok(())
    }

    async fn send_error(&mut self, code: &str, message: &str) -> Result<(), Exit> {
        self.send(Message::Text(json::error(code, message).into()))
            .await
    }

    /// Closes the socket if we are the ones closing, and deregisters.
    async fn finish(mut self, mut inbox: Inbox, exit: Exit) {
        match &exit {
            Exit::Close { code, reason } => {
                tracing::debug!(code, %reason, "closing");
                let _ = close(&mut self.sink, *code, reason).await;
            }
            Exit::ClientClosed => {
                tracing::debug!("client closed");
                // Sends the close reply that the WebSocket layer has queued.
                let _ = tokio::time::timeout(Duration::from_secs(1), self.sink.close()).await;
            }
            Exit::Gone => tracing::debug!("client gone"),
        }
        self.ctx.hub.remove(self.id);
        inbox.messages.close();
        while let Ok(envelope) = inbox.messages.try_recv() {
            if envelope.message.id > self.cursor && envelope.message.target_connection.is_none() {
                self.unsent.push(envelope.message.id);
            }
        }
        if self.ctx.shutdown.is_cancelled() {
            // The node deregisters all of its connections at once.
            self.ctx.defer_cleanup(&self.user, &self.unsent);
            return;
        }
        if let Err(error) =
            connections::detach(&self.ctx.pool, self.id, &self.user, &self.unsent).await
        {
            tracing::warn!(%error, "could not remove the connection row");
        }
    }
}

async fn close(
    sink: &mut SplitSink<WebSocket, Message>,
    code: u16,
    reason: &str,
) -> Result<(), axum::Error> {
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

/// Ids delivered on this connection and not yet acked, bounded: the oldest
/// are forgotten first.
#[derive(Default)]
struct Unacked {
    ids: HashSet<i64>,
    order: VecDeque<i64>,
}

impl Unacked {
    fn insert(&mut self, id: i64) {
        if self.ids.insert(id) {
            self.order.push_back(id);
            if self.order.len() > UNACKED_REMEMBERED
                && let Some(oldest) = self.order.pop_front()
            {
                self.ids.remove(&oldest);
            }
        }
    }

    fn take(&mut self, id: i64) -> bool {
        self.ids.remove(&id)
    }
}

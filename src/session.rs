//! One client socket, from upgrade to close.
//!
//! A session registers its connection, confirms it (`welcome`, or STOMP's
//! CONNECTED), sends its backfill (the user's stream after `since`, or what was
//! parked for the user), then whatever the outbox claimer routes to it. It
//! keeps a cursor per stream (the user's, each subscribed topic's, the
//! broadcast): the id of the last message of that stream it took. Messages
//! at or below a cursor are duplicates (a claim that was retried, a message
//! routed here for another subscriber before this one subscribed) and are
//! dropped, so the client sees each id once and in order.
//!
//! The protocol-specific halves live in [`json`] and [`stomp`].

mod json;
mod stomp;

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{Identity, bearer};
use crate::config::Auth;
use crate::deliveries::Record;
use crate::http::Problem;
use crate::hub::{Envelope, Inbox};
use crate::limits::TokenBucket;
use crate::message::{NewMessage, StoredMessage, StreamKey};
use crate::node::NodeContext;
use crate::protocol::Protocol;
use crate::registry::connections::{self, NewConnection};
use crate::registry::subscriptions;
use crate::registry::subscriptions::SubscribeFailure;
use crate::router::{self, EnqueueError, Source};
use crate::{db, stream};

/// Bad frames tolerated per minute before the client is closed.
const BAD_FRAMES_PER_MINUTE: usize = 10;
/// Live messages written per flush.
const WRITE_BATCH: usize = 64;
/// Room for the protocol around a message's data in an inbound frame.
const FRAME_OVERHEAD: usize = 16 * 1024;
/// How long a closing session waits for its departure to commit (its
/// unwritten messages parked), before it closes anyway: the delivery log
/// writes it when the database answers.
const DEPARTURE_WAIT: Duration = Duration::from_secs(2);

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    since: Option<String>,
}

/// The query parameters of `GET /v1/ws`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as `WsQuery`: this is its documentation.
struct WsParams {
    /// A client JWT (browsers cannot set headers on a WebSocket); or send
    /// `Authorization: Bearer`, or (STOMP) authenticate in CONNECT.
    token: Option<String>,
    /// With auth `none` only: the user.
    user: Option<String>,
    /// Resume the user's stream after this message id.
    since: Option<String>,
}

/// Connect a client
///
/// Upgrades to a WebSocket. Subprotocol `pgrelay.v1` (or none) selects the
/// JSON protocol; `v12.stomp`, `v11.stomp` or `v10.stomp` selects STOMP.
/// Everything wrong with the request is answered with problem+json before
/// the upgrade; a STOMP client may instead authenticate in its CONNECT frame.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "websocket",
    params(WsParams),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket request, or a bad parameter", body = crate::http::problem::ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = crate::http::problem::ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub async fn upgrade(
    State(ctx): State<Arc<NodeContext>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    slot: Option<axum::Extension<crate::http::server::ConnectionSlot>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let mut ws = match ws {
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

    let offered: Vec<String> = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .flat_map(|p| p.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let (protocol, confirmed) = Protocol::select(offered.iter().map(String::as_str));
    if let Some(name) = confirmed {
        ws.set_selected_protocol(HeaderValue::from_static(name));
    }

    // The identity, when the request carries one. A STOMP client may present
    // it later, in CONNECT; a JSON client must present it now.
    let identity = match &ctx.settings.auth {
        Auth::None => match query.user.as_deref() {
            Some(user) => match Identity::unauthenticated(user) {
                Ok(identity) => Some(identity),
                Err(e) => return Problem::bad_request("bad_user", e).into_response(),
            },
            None => None,
        },
        Auth::Jwt { verifier, .. } => {
            let from_header = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            match from_header.or(query.token.as_deref()) {
                Some(token) => match verifier.verify(token) {
                    Ok(identity) => Some(identity),
                    Err(e) => return Problem::unauthorized(e).into_response(),
                },
                None => None,
            }
        }
    };
    if identity.is_none() && protocol == Protocol::Json {
        return match ctx.settings.auth {
            Auth::None => Problem::bad_request(
                "missing_user",
                "auth is `none`: name the user with ?user=<id>",
            )
            .into_response(),
            Auth::Jwt { .. } => Problem::unauthorized(
                "a token is required: `Authorization: Bearer <jwt>` or ?token=<jwt>",
            )
            .into_response(),
        };
    }

    let accepted = slot
        .as_ref()
        .map_or_else(tokio::time::Instant::now, |slot| slot.accepted);
    let params = SessionParams {
        identity,
        since,
        accepted,
        protocol,
        remote_addr: remote.to_string(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect()),
    };
    let limit = ctx.settings.max_message_bytes + FRAME_OVERHEAD;
    // Small buffers: most sockets are idle most of the time, and these are
    // allocated per socket (the defaults are 128 KiB each); they grow when a
    // large message needs it.
    ws.read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_failed_upgrade(|error| tracing::debug!(%error, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            let tasks = ctx.tasks.clone();
            tasks.track_future(async move {
                // The connection's place under the node's cap, for as long as the socket lives.
                let _slot = slot;
                run(ctx, socket, params).await;
            })
        })
}

/// Who connected, and how.
pub struct SessionParams {
    /// None for a STOMP client that authenticates in CONNECT.
    pub identity: Option<Identity>,
    pub since: Option<i64>,
    /// When its TCP connection was accepted.
    pub accepted: tokio::time::Instant,
    pub protocol: Protocol,
    pub remote_addr: String,
    pub user_agent: Option<String>,
}

type Sink = SplitSink<WebSocket, Message>;
type Incoming = SplitStream<WebSocket>;

/// Runs a session to its end.
///
/// Sessions are many and mostly idle, so the size of their future matters:
/// everything they await only now and then (database work, a backfill, a
/// burst of input) is boxed, and the idle state stays small.
pub async fn run(ctx: Arc<NodeContext>, socket: WebSocket, params: SessionParams) {
    let id = Uuid::now_v7();
    let span = tracing::info_span!(
        "session",
        node_id = %ctx.node_id,
        connection_id = %id,
        user_id = tracing::field::Empty,
        protocol = params.protocol.as_str(),
    );
    start(ctx, socket, params, id).instrument(span).await;
}

async fn start(ctx: Arc<NodeContext>, socket: WebSocket, params: SessionParams, id: Uuid) {
    let (mut sink, mut incoming) = socket.split();
    let (identity, proto) = match params.protocol {
        Protocol::Json => (
            params.identity.clone().expect("checked at upgrade"),
            Proto::Json,
        ),
        Protocol::Stomp => {
            match Box::pin(stomp::handshake(
                &ctx,
                &mut sink,
                &mut incoming,
                params.identity.clone(),
                params.accepted + ctx.settings.limits.handshake_timeout,
            ))
            .await
            {
                Some((identity, state)) => (identity, Proto::Stomp(Box::new(state))),
                None => return,
            }
        }
    };
    tracing::Span::current().record("user_id", tracing::field::display(&identity.user_id));
    let user = identity.user_id.clone();
    // In the hub before the row commits: see Hub::register.
    let mut inbox = ctx.hub.register(id, ctx.settings.send_queue);
    let registration = NewConnection {
        id,
        node_id: &ctx.node_id,
        incarnation: ctx.incarnation(),
        user_id: &user,
        protocol: params.protocol.as_str(),
        remote_addr: &params.remote_addr,
        user_agent: params.user_agent.as_deref(),
        max_per_user: ctx.settings.limits.max_connections_per_user,
    };
    let attached = Box::pin(connections::attach(
        &ctx.pool,
        &registration,
        ctx.settings.idle_transaction_timeout(),
    ))
    .await;
    let heads = match attached {
        Ok(heads) => heads,
        Err(refused) => {
            ctx.hub.remove(id, &[]);
            let (code, reason) = match &refused {
                connections::AttachError::TooMany => (1008, "too many connections for this user"),
                connections::AttachError::Fenced => {
                    ctx.registration.report_fenced(registration.incarnation);
                    (1013, "node re-registering; reconnect")
                }
                connections::AttachError::NotRegistered(error) => {
                    tracing::warn!(%error, "could not register the connection");
                    (1013, "cannot register the connection now; try again")
                }
                connections::AttachError::Unknown(error) => {
                    // The row may exist: it departs (with anything routed to
                    // it meanwhile parked), now and again once the node
                    // reconciles its registry.
                    tracing::warn!(%error, "the connection's registration is in doubt");
                    ctx.registry_may_be_dirty();
                    ctx.deliveries
                        .record(crate::deliveries::Record::Departed {
                            connection_id: id,
                            done: None,
                        })
                        .await;
                    (1013, "cannot register the connection now; try again")
                }
            };
            if let Proto::Stomp(state) = &proto {
                let _ = stomp::send_error(&mut sink, state.version, reason, None).await;
            }
            metrics::counter!(
                crate::metrics::CONNECTIONS_CLOSED,
                "protocol" => params.protocol.as_str(),
                "reason" => crate::metrics::close_reason(code, reason)
            )
            .increment(1);
            close_and_drain(&mut sink, &mut incoming, code, reason).await;
            return;
        }
    };
    tracing::debug!(head = heads.user, since = ?params.since, "connected");
    let protocol = params.protocol.as_str();
    metrics::gauge!(crate::metrics::CONNECTIONS, "protocol" => protocol).increment(1.0);
    metrics::counter!(crate::metrics::CONNECTIONS_OPENED, "protocol" => protocol).increment(1);

    let now = Instant::now();
    let ctx_limits = ctx.settings.limits.clone();
    let backfills = backfill_plan(params.since, heads);
    let mut session = Session {
        ctx,
        id,
        identity,
        user_stream: StreamKey::User(user.clone()),
        user,
        sink,
        proto,
        user_cursor: heads.user,
        broadcast_cursor: heads.broadcast,
        topics: HashMap::new(),
        pending_backfill: backfills,
        held: VecDeque::new(),
        unacked: Unacked::default(),
        inbound_rate: TokenBucket::new(ctx_limits.max_frames_per_second),
        in_flight: VecDeque::new(),
        controls: inbox.controls(),
        bad_frames: VecDeque::new(),
        last_inbound: now,
        last_marked: now,
        finished: false,
    };
    let Err(exit) = session.serve(&mut inbox, &mut incoming).await;
    Box::pin(session.finish(inbox, &mut incoming, exit)).await;
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

    fn unavailable() -> Self {
        Exit::close(1013, "database unavailable; reconnect with since")
    }
}

/// Where a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Routed here by the outbox.
    Live,
    /// Parked for the user (written to none of their sockets yet).
    Parked,
    /// Read from a stream (a resume, or catching up after a full queue).
    Stream,
}

/// A message taken from a stream, on its way to the socket.
struct Item {
    message: Arc<StoredMessage>,
    stream: StreamKey,
    /// The JSON protocol's frame, when already encoded (shared by every
    /// recipient of a topic message).
    frame: Option<Utf8Bytes>,
    origin: Origin,
}

/// Frames ready to write for one message.
struct Ready {
    message: Arc<StoredMessage>,
    stream: StreamKey,
    frames: Vec<Message>,
    origin: Origin,
}

/// A backfill to run: the user's stream (or parked messages) after `from`
/// up to `head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Backfill {
    origin: Origin,
    from: i64,
    head: i64,
}

/// What a new connection is sent before live messages. Parked messages are
/// the user's messages that no socket of theirs has been written (a node
/// that died with them in a session's queue, a session closed before writing
/// them): they go to the next connection whatever its cursor. Without
/// `since`, that is all; with it, first those at or below the cursor (the
/// client may have seen them already, on a socket whose write was never
/// recorded: it dedupes by id), then the stream after the cursor. Each
/// connection's ids stay in increasing order.
fn backfill_plan(since: Option<i64>, heads: connections::Heads) -> Vec<Backfill> {
    let mut plan = Vec::new();
    match since {
        None => {
            if heads.parked {
                plan.push(Backfill {
                    origin: Origin::Parked,
                    from: 0,
                    head: heads.user,
                });
            }
        }
        Some(since) => {
            if heads.parked {
                plan.push(Backfill {
                    origin: Origin::Parked,
                    from: 0,
                    head: since.min(heads.user),
                });
            }
            if since < heads.user {
                plan.push(Backfill {
                    origin: Origin::Stream,
                    from: since,
                    head: heads.user,
                });
            }
        }
    }
    plan
}

enum Proto {
    Json,
    Stomp(Box<stomp::State>),
}

struct Session {
    ctx: Arc<NodeContext>,
    id: Uuid,
    identity: Identity,
    user: Arc<str>,
    user_stream: StreamKey,
    sink: Sink,
    proto: Proto,
    /// The last id of the user's stream taken (written, or held for STOMP).
    user_cursor: i64,
    broadcast_cursor: i64,
    /// Subscribed topics and their cursors.
    topics: HashMap<Arc<str>, i64>,
    /// The backfills not yet run, in order: at once for JSON; for STOMP at
    /// the first `/user/` subscription, which is where user messages can go.
    pending_backfill: Vec<Backfill>,
    /// STOMP: user messages no subscription matches yet, in order.
    held: VecDeque<Item>,
    unacked: Unacked,
    /// Inbound frames allowed per second: past it, reading pauses (TCP
    /// pushes back on the client).
    inbound_rate: TokenBucket,
    /// This connection's submissions (SEND, publish) not answered yet, in
    /// the order they were sent: answered in that order.
    in_flight: VecDeque<InFlight>,
    /// Instructions from outside (a close), also watched while waiting for
    /// a submission slot.
    controls: crate::hub::Controls,
    bad_frames: VecDeque<Instant>,
    last_inbound: Instant,
    last_marked: Instant,
    /// Set once [`Session::finish`] has run.
    finished: bool,
}

/// A session that ends without its finish (a panic) still leaves the hub,
/// and its connection departs (what was routed to it is parked).
impl Drop for Session {
    fn drop(&mut self) {
        if !self.finished {
            tracing::error!("session ended abnormally; removing its connection");
            self.ctx.hub.remove_everywhere(self.id);
            self.ctx.deliveries.record_later(Record::Departed {
                connection_id: self.id,
                done: None,
            });
        }
    }
}

impl Session {
    async fn serve(
        &mut self,
        inbox: &mut Inbox,
        incoming: &mut Incoming,
    ) -> Result<std::convert::Infallible, Exit> {
        match &self.proto {
            Proto::Json => {
                self.json_welcome().await?;
                Box::pin(self.run_pending_backfills()).await?;
            }
            Proto::Stomp(_) => self.stomp_connected().await?,
        }
        let heartbeat = self.ctx.settings.heartbeat_interval;
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stomp_beat = self.stomp_heartbeat_out();
        let mut beat = tokio::time::interval(stomp_beat.unwrap_or(Duration::from_secs(3600)));
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
                () = self.ctx.shutdown.cancelled() => {
                    return Err(Exit::close(1012, "node shutting down; reconnect with since"));
                }
                control = controls.next() => match control {
                    crate::hub::Control::Close { code, reason } => return Err(Exit::Close { code, reason }),
                },
                (reply, answer) = next_answer(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    Box::pin(self.on_answered(reply, answer)).await?;
                }
                () = tokio::time::sleep(throttle), if !throttle.is_zero() => {
                    metrics::counter!(crate::metrics::THROTTLED, "protocol" => self.protocol_name()).increment(1);
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
                    if self.last_inbound.elapsed() > self.silence_limit() {
                        return Err(Exit::close(1001, "heartbeat timeout"));
                    }
                    self.send(Message::Ping(Default::default())).await?;
                }
                _ = beat.tick(), if stomp_beat.is_some() => {
                    self.send(Message::Text(Utf8Bytes::from_static("\n"))).await?;
                }
            }
        }
    }

    /// How long the client may stay silent: two heartbeat intervals (ours,
    /// or the one it promised in STOMP's heart-beat header).
    fn silence_limit(&self) -> Duration {
        let promised = match &self.proto {
            Proto::Stomp(state) => state.heartbeat_in,
            Proto::Json => None,
        };
        promised.unwrap_or(self.ctx.settings.heartbeat_interval) * 2 + Duration::from_millis(100)
    }

    fn stomp_heartbeat_out(&self) -> Option<Duration> {
        match &self.proto {
            Proto::Stomp(state) => state.heartbeat_out,
            Proto::Json => None,
        }
    }

    /// Runs the backfills of the user's stream planned at connect.
    async fn run_pending_backfills(&mut self) -> Result<(), Exit> {
        for backfill in std::mem::take(&mut self.pending_backfill) {
            self.backfill(self.user_stream.clone(), backfill).await?;
        }
        Ok(())
    }

    /// Writes a stream, or the user's parked messages, from `from` up to
    /// `head`, page by page; then the stream's cursor stands at `head`.
    async fn backfill(&mut self, stream: StreamKey, backfill: Backfill) -> Result<(), Exit> {
        let mut after = backfill.from;
        loop {
            let pool = &self.ctx.pool;
            let page = if backfill.origin == Origin::Parked {
                db::bounded(stream::parked_page(pool, &self.user, after, backfill.head)).await
            } else {
                db::bounded(stream::page(
                    pool,
                    &stream.key(),
                    after,
                    backfill.head,
                    self.id,
                ))
                .await
            };
            let page = page.map_err(|error| {
                tracing::warn!(%error, "reading the backfill failed");
                Exit::unavailable()
            })?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let full = page.len() as i64 == stream::PAGE;
            let items = page
                .into_iter()
                .map(|message| Item {
                    message,
                    stream: stream.clone(),
                    frame: None,
                    origin: backfill.origin,
                })
                .collect();
            self.deliver(items).await?;
            if !full {
                break;
            }
        }
        let cursor = self.cursor(&stream);
        if let Some(cursor) = cursor {
            *cursor = (*cursor).max(backfill.head);
        }
        Ok(())
    }

    /// Recovers from a full mailbox: what is queued precedes the gap, and the
    /// streams read after it cover every message that was dropped.
    async fn catch_up(&mut self, inbox: &mut Inbox) -> Result<(), Exit> {
        let mut queued = Vec::new();
        while let Ok(envelope) = inbox.messages.try_recv() {
            queued.push(envelope);
        }
        self.deliver_live(queued).await?;
        inbox.clear_lagging();
        let mut streams = vec![
            (self.user_stream.clone(), self.user_cursor),
            (StreamKey::Broadcast, self.broadcast_cursor),
        ];
        streams.extend(
            self.topics
                .iter()
                .map(|(t, c)| (StreamKey::Topic(t.clone()), *c)),
        );
        for (stream, cursor) in streams {
            let head = db::bounded(stream::head(&self.ctx.pool, &stream.key()))
                .await
                .map_err(|error| {
                    tracing::warn!(%error, "reading a stream head failed");
                    Exit::unavailable()
                })?;
            if head > cursor {
                tracing::debug!(stream = %stream.key(), from = cursor, head, "catching up after a full mailbox");
                let backfill = Backfill {
                    origin: Origin::Stream,
                    from: cursor,
                    head,
                };
                self.backfill(stream, backfill).await?;
            }
        }
        Ok(())
    }

    fn cursor(&mut self, stream: &StreamKey) -> Option<&mut i64> {
        match stream {
            StreamKey::User(_) => Some(&mut self.user_cursor),
            StreamKey::Broadcast => Some(&mut self.broadcast_cursor),
            StreamKey::Topic(topic) => self.topics.get_mut(topic),
        }
    }

    /// Live messages: each is taken only if it is past its stream's cursor.
    async fn deliver_live(&mut self, batch: Vec<Arc<Envelope>>) -> Result<(), Exit> {
        let mut items = Vec::with_capacity(batch.len());
        let now = Instant::now();
        for envelope in batch {
            crate::metrics::stage(
                crate::metrics::Stage::Mailbox,
                now.saturating_duration_since(envelope.offered_at),
                1,
            );
            let Some(cursor) = self.cursor(&envelope.stream) else {
                continue; // a topic unsubscribed since
            };
            if envelope.message.id <= *cursor {
                continue;
            }
            *cursor = envelope.message.id;
            items.push(Item {
                message: envelope.message.clone(),
                stream: envelope.stream.clone(),
                frame: Some(envelope.frame.clone()),
                origin: Origin::Live,
            });
        }
        self.deliver(items).await
    }

    /// Turns items into frames (or holds them, for STOMP) and writes them.
    async fn deliver(&mut self, items: Vec<Item>) -> Result<(), Exit> {
        let mut ready = Vec::with_capacity(items.len());
        for item in items {
            match &mut self.proto {
                Proto::Json => {
                    let frame = item.frame.unwrap_or_else(|| {
                        crate::protocol::json::message(
                            &item.message,
                            crate::protocol::json::To::of(&item.stream),
                        )
                        .into()
                    });
                    ready.push(Ready {
                        message: item.message,
                        stream: item.stream,
                        frames: vec![Message::Text(frame)],
                        origin: item.origin,
                    });
                }
                Proto::Stomp(state) => {
                    let frames = state.frames_for(&item.message, &item.stream);
                    if !frames.is_empty() {
                        ready.push(Ready {
                            message: item.message,
                            stream: item.stream,
                            frames,
                            origin: item.origin,
                        });
                    } else if matches!(item.stream, StreamKey::User(_)) {
                        self.hold(item);
                    }
                }
            }
        }
        self.write(ready).await
    }

    /// Keeps a user message until a subscription wants it; the oldest are let
    /// go past the send queue's size. What is let go stays routed to this
    /// connection in the outbox: parked for the user when it closes.
    fn hold(&mut self, item: Item) {
        self.held.push_back(item);
        if self.held.len() > self.ctx.settings.send_queue {
            self.held.pop_front();
        }
    }

    /// Writes and flushes a batch, then records the deliveries.
    async fn write(&mut self, batch: Vec<Ready>) -> Result<(), Exit> {
        if batch.is_empty() {
            return Ok(());
        }
        let sink = &mut self.sink;
        let started = Instant::now();
        let written = tokio::time::timeout(self.ctx.settings.limits.slow_consumer_timeout, async {
            for item in &batch {
                for frame in &item.frames {
                    sink.feed(frame.clone()).await?;
                }
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
            // Not recorded as written: these stay routed to this connection
            // in the outbox, and are parked for the user when it departs.
            return Err(exit);
        }
        crate::metrics::stage(crate::metrics::Stage::Write, started.elapsed(), batch.len());
        let at = chrono::Utc::now();
        let protocol = self.protocol_name();
        metrics::counter!(crate::metrics::MESSAGES_DELIVERED, "protocol" => protocol)
            .increment(batch.len() as u64);
        for item in &batch {
            if item.origin == Origin::Live {
                let latency = (at - item.message.created_at).to_std().unwrap_or_default();
                metrics::histogram!(crate::metrics::DELIVERY_LATENCY).record(latency.as_secs_f64());
            }
        }
        for item in batch {
            if matches!(self.proto, Proto::Json) {
                self.unacked.insert(item.message.id);
            }
            self.ctx
                .deliveries
                .record(Record::Delivered {
                    message_id: item.message.id,
                    connection_id: self.id,
                    user_id: self.user.clone(),
                    at,
                    user_stream: matches!(item.stream, StreamKey::User(_)),
                })
                .await;
        }
        Ok(())
    }

    async fn send(&mut self, message: Message) -> Result<(), Exit> {
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

    fn protocol_name(&self) -> &'static str {
        match self.proto {
            Proto::Json => Protocol::Json.as_str(),
            Proto::Stomp(_) => Protocol::Stomp.as_str(),
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
        // STOMP counts the frames a message carries (in `stomp_input`).
        let stomp_data = matches!(self.proto, Proto::Stomp(_))
            && matches!(message, Message::Text(_) | Message::Binary(_));
        if !stomp_data {
            self.inbound_rate.charge(1);
        }
        let heartbeat = self.ctx.settings.heartbeat_interval;
        let is_data = matches!(message, Message::Text(_) | Message::Binary(_));
        // A STOMP client that promised heart-beats must send them: WebSocket
        // pongs (which its library sends on its own) do not count.
        let promised = matches!(&self.proto, Proto::Stomp(state) if state.heartbeat_in.is_some());
        if is_data || !promised {
            self.last_inbound = Instant::now();
            if self.last_marked.elapsed() >= heartbeat / 2 {
                self.ctx.hub.mark_seen(self.id);
                self.last_marked = self.last_inbound;
            }
        }
        match message {
            Message::Text(text) => match self.proto {
                Proto::Json => self.json_text(&text).await,
                Proto::Stomp(_) => self.stomp_input(text.as_bytes()).await,
            },
            Message::Binary(bytes) => match self.proto {
                Proto::Json => {
                    self.json_bad_frame("binary frames are not part of the pgrelay.v1 protocol")
                        .await
                }
                Proto::Stomp(_) => self.stomp_input(&bytes).await,
            },
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(_) => Err(Exit::ClientClosed),
        }
    }

    /// Subscribes this connection to `topic`: in the hub first, then in the
    /// registry (under the topic's stream lock). Returns the topic's head:
    /// messages after it arrive live.
    async fn subscribe_topic(&mut self, topic: &Arc<str>) -> Result<i64, SubscribeError> {
        if let Some(cursor) = self.topics.get(topic) {
            return Ok(*cursor);
        }
        if self.topics.len() >= self.ctx.settings.limits.max_subscriptions {
            return Err(SubscribeError::TooMany(
                self.ctx.settings.limits.max_subscriptions,
            ));
        }
        self.ctx.hub.subscribe(self.id, topic);
        let incarnation = self.ctx.incarnation();
        let attached = subscriptions::attach(
            &self.ctx.pool,
            self.id,
            &self.ctx.node_id,
            incarnation,
            topic,
            self.ctx.settings.idle_transaction_timeout(),
        )
        .await;
        match attached {
            Ok(head) => {
                self.topics.insert(topic.clone(), head);
                Ok(head)
            }
            Err(failure) => {
                self.ctx.hub.unsubscribe(self.id, topic);
                tracing::warn!(error = %failure, %topic, "could not register a subscription");
                match failure {
                    SubscribeFailure::Fenced => self.ctx.registration.report_fenced(incarnation),
                    // The row may exist: it is removed (or goes with the
                    // connection's); topic messages routed to it meanwhile
                    // find no subscriber here.
                    SubscribeFailure::Unknown(_) => {
                        let _ = db::bounded(subscriptions::detach(&self.ctx.pool, self.id, topic))
                            .await;
                    }
                    SubscribeFailure::NotRegistered(_) => {}
                }
                Err(SubscribeError::Unavailable)
            }
        }
    }

    async fn unsubscribe_topic(&mut self, topic: &str) {
        if self.topics.remove(topic).is_none() {
            return;
        }
        self.ctx.hub.unsubscribe(self.id, topic);
        if let Err(error) = db::bounded(subscriptions::detach(&self.ctx.pool, self.id, topic)).await
        {
            // Harmless: the row goes with the connection's, and what is routed
            // here meanwhile is dropped (no cursor for the topic).
            tracing::warn!(%error, %topic, "could not remove a subscription row");
        }
    }

    /// Queues a message this client sends (JSON publish, STOMP SEND) in the
    /// node's group commit; `reply` is sent once it has committed (or says
    /// why not, honestly: see `router`). Up to [`IN_FLIGHT`] are pending at
    /// once; past that, this waits for the oldest.
    async fn submit(&mut self, message: NewMessage, reply: Reply) -> Result<(), Exit> {
        while self.in_flight.len() >= IN_FLIGHT {
            // Bounded by the oldest's deadline; a close or a shutdown is not
            // kept waiting behind it.
            let (reply, answer) = tokio::select! {
                answered = next_answer(&mut self.in_flight) => answered,
                crate::hub::Control::Close { code, reason } = self.controls.next() => {
                    return Err(Exit::Close { code, reason });
                }
                () = self.ctx.shutdown.cancelled() => {
                    return Err(Exit::close(1012, "node shutting down; reconnect with since"));
                }
            };
            Box::pin(self.on_answered(reply, answer)).await?;
        }
        let deadline = tokio::time::Instant::now() + router::SUBMIT_TIMEOUT;
        let queued = self
            .ctx
            .submitter
            .enqueue(vec![message], Source::WebSocket, deadline)
            .await;
        match queued {
            Ok(pending) => {
                self.in_flight.push_back(InFlight { pending, reply });
                Ok(())
            }
            Err(error) => {
                // Answered after the submissions before it.
                Box::pin(self.answer_in_flight()).await?;
                Box::pin(self.on_answered(reply, Err(error))).await
            }
        }
    }

    /// Answers every submission in flight, in order: before a frame whose
    /// answer must come after theirs (anything but another submission).
    async fn answer_in_flight(&mut self) -> Result<(), Exit> {
        while !self.in_flight.is_empty() {
            let (reply, answer) = next_answer(&mut self.in_flight).await;
            Box::pin(self.on_answered(reply, answer)).await?;
        }
        Ok(())
    }

    async fn on_answered(
        &mut self,
        reply: Reply,
        answer: Result<Vec<i64>, EnqueueError>,
    ) -> Result<(), Exit> {
        let protocol = self.protocol_name();
        let answer = answer.map(|ids| ids[0]);
        match &answer {
            Ok(_) => {
                metrics::counter!(crate::metrics::MESSAGES_ACCEPTED, "source" => protocol)
                    .increment(1);
            }
            Err(error) => {
                metrics::counter!(crate::metrics::SUBMIT_OUTCOMES, "source" => protocol, "outcome" => error.outcome())
                    .increment(1);
            }
        }
        match reply {
            Reply::Published { topic } => self.json_published(&topic, answer).await,
            Reply::Stomp { receipt } => self.stomp_sent(receipt, answer).await,
        }
    }

    /// Deregisters, then closes the socket (if we are the ones closing) or
    /// completes the client's close. Deregistering first means that once a
    /// client's close completes, every message routed to this connection has
    /// been written (and recorded) or parked for the user: a reconnect, even
    /// without `since`, cannot race it. What its queue held, what it dropped
    /// while lagging and what STOMP held for a subscription never came are
    /// all still routed to it in the outbox: the departure parks them.
    async fn finish(mut self, mut inbox: Inbox, incoming: &mut Incoming, exit: Exit) {
        self.finished = true;
        let topics: Vec<Arc<str>> = self.topics.keys().cloned().collect();
        self.ctx.hub.remove(self.id, &topics);
        inbox.messages.close();
        if !self.ctx.deliveries.depart(self.id, DEPARTURE_WAIT).await {
            // Queued: written once the database answers; until then, work
            // routed to the connection is parked by the claimer.
            tracing::warn!("the connection's departure is not recorded yet");
        }
        let protocol = self.protocol_name();
        let why = match &exit {
            Exit::Close { code, reason } => crate::metrics::close_reason(*code, reason),
            Exit::ClientClosed => "client",
            Exit::Gone => "gone",
        };
        metrics::gauge!(crate::metrics::CONNECTIONS, "protocol" => protocol).decrement(1.0);
        metrics::counter!(crate::metrics::CONNECTIONS_CLOSED, "protocol" => protocol, "reason" => why).increment(1);
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

/// Submissions a connection may have in flight: enough to fill the group
/// commit's batches from one busy producer, few enough to bound its memory.
const IN_FLIGHT: usize = 64;

/// A submission of this connection waiting for its commit.
struct InFlight {
    pending: crate::group_commit::Pending,
    reply: Reply,
}

/// What to tell the client once a submission is answered.
enum Reply {
    /// JSON: a `published` frame (or an `error` frame).
    Published { topic: Arc<str> },
    /// STOMP: a RECEIPT when one was asked for (or an ERROR, which ends the
    /// session).
    Stomp { receipt: Option<String> },
}

/// The oldest submission's answer (cancel-safe: the submission stays at the
/// front until answered).
async fn next_answer(
    in_flight: &mut VecDeque<InFlight>,
) -> (Reply, Result<Vec<i64>, EnqueueError>) {
    let front = in_flight.front_mut().expect("a submission in flight");
    let answer = front.pending.answer().await;
    let done = in_flight.pop_front().expect("a submission in flight");
    (done.reply, answer)
}

/// Why a subscription was refused.
enum SubscribeError {
    TooMany(usize),
    Unavailable,
}

impl SubscribeError {
    fn describe(&self) -> String {
        match self {
            SubscribeError::TooMany(limit) => {
                format!("a connection may hold at most {limit} subscriptions")
            }
            SubscribeError::Unavailable => {
                "the subscription could not be registered now; try again".into()
            }
        }
    }
}

/// Sends a close frame, then reads until the client answers (briefly): a
/// socket dropped with unread input is reset, and a reset makes the client
/// discard what it had not read yet, the close frame and its reason included.
async fn close_and_drain(sink: &mut Sink, incoming: &mut Incoming, code: u16, reason: &str) {
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

async fn close(sink: &mut Sink, code: u16, reason: &str) -> Result<(), axum::Error> {
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

/// Delivered-but-unacked ids remembered per connection, to validate acks.
const UNACKED_REMEMBERED: usize = 10_000;

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

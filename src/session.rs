//! One client socket, from the upgrade (in `http::ws`) to its close.
//!
//! A session registers its connection, confirms it (`welcome`, or STOMP's
//! CONNECTED), sends its backfill (the user's stream after `since`, or what was
//! parked for the user), then whatever the claimer routes to it. It keeps a
//! cursor per stream (the user's, each subscribed topic's, the broadcast):
//! the id of the last message of that stream it took. Messages at or below
//! a cursor are duplicates (a claim that was retried, a message routed here
//! for another subscriber before this one subscribed) and are dropped, so
//! the client sees each id once and in order.
//!
//! The steps, one module each: [`connect`] (handshake, registration, the
//! backfill plan), [`serve`] (the loop over the socket, the mailbox and the
//! timers, and the close), [`delivery`] (backfills, catching up, writing
//! and recording), [`submit`] (what the client sends, in flight until
//! committed) and [`topics`] (subscriptions). What differs by protocol is a
//! [`Half`]: [`json`] and [`stomp`], each owning its own state.
//!
//! A session may use the node's state, the write side, the read side's hub
//! and delivery log, and the registry; nothing but `http::ws` uses it.

mod connect;
mod delivery;
mod json;
mod serve;
mod stomp;
mod submit;
mod topics;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

// Tokio's clock: the same as the system's, except in tests that pause it.
use tokio::time::Instant;

use axum::extract::ws::Message;
use futures_util::{Sink, Stream};
use uuid::Uuid;

pub use connect::{SessionParams, run};
pub use serve::close_and_drain;

use crate::auth::Identity;
use crate::message::StreamKey;
use crate::protocol::Protocol;
use crate::rate::TokenBucket;
use crate::read::hub::{Controls, Envelope};
use crate::state::NodeState;
use crate::write::enqueue::{EnqueueError, Source};

/// How a client reached this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `GET /v1/ws`: JSON or STOMP over WebSocket.
    WebSocket,
    /// STOMP over plain TCP (`PGRELAY_STOMP_LISTEN`): backends such as
    /// Spring's broker relay. No pings: only STOMP heart-beats tell that a
    /// client is alive.
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Tcp => "tcp",
        }
    }

    /// Where its messages are recorded to have come from.
    fn source(self) -> Source {
        match self {
            Transport::WebSocket => Source::WebSocket,
            Transport::Tcp => Source::Tcp,
        }
    }
}

/// What a session writes to: a WebSocket's sending half (or, in tests, a
/// channel).
pub trait WsSink: Sink<Message, Error = axum::Error> + Unpin + Send {}
impl<T: Sink<Message, Error = axum::Error> + Unpin + Send> WsSink for T {}

/// What a session reads from: a WebSocket's receiving half.
pub trait WsStream: Stream<Item = Result<Message, axum::Error>> + Unpin + Send {}
impl<T: Stream<Item = Result<Message, axum::Error>> + Unpin + Send> WsStream for T {}

/// A protocol's half of a session: how it confirms a connection, reads the
/// client's frames, frames messages and answers submissions. Its state (a
/// JSON session's unacked ids, a STOMP session's subscriptions) is the
/// implementing type.
pub(crate) trait Half: Sized + Send + 'static {
    const PROTOCOL: Protocol;
    /// What to tell the client once one of its submissions is answered.
    type Reply: Send;

    /// Confirms the connection (and, for JSON, sends the backfill).
    fn confirm<S: WsSink>(
        session: &mut Session<Self, S>,
    ) -> impl Future<Output = Result<(), Exit>> + Send;

    /// One text or binary message from the client.
    fn input<S: WsSink>(
        session: &mut Session<Self, S>,
        message: Input,
    ) -> impl Future<Output = Result<(), Exit>> + Send;

    /// Tells the client what became of a submission.
    fn answered<S: WsSink>(
        session: &mut Session<Self, S>,
        reply: Self::Reply,
        answer: Result<i64, EnqueueError>,
    ) -> impl Future<Output = Result<(), Exit>> + Send;

    /// Tells a client whose connection could not be registered why, before
    /// the close (STOMP: an ERROR frame).
    fn refuse<S: WsSink>(&self, sink: &mut S, reason: &str) -> impl Future<Output = ()> + Send;

    /// The frames for one message, or None when it is not written now (STOMP
    /// holds a user message until a subscription wants it).
    fn frames(&mut self, item: Item, hold_at_most: usize) -> Option<Ready>;

    /// A message was written to the socket.
    fn written(&mut self, message_id: i64);

    /// Whether input counts against the frame rate per frame it carries
    /// (STOMP counts them itself) rather than per WebSocket message.
    fn counts_its_own_frames(&self) -> bool;

    /// How often the client promised to send heart-beats, if it did (then
    /// WebSocket pongs do not count as signs of life).
    fn heartbeat_in(&self) -> Option<Duration>;

    /// How often the client wants heart-beats from us, if it does.
    fn heartbeat_out(&self) -> Option<Duration>;
}

/// A client's data message.
pub(crate) enum Input {
    Text(axum::extract::ws::Utf8Bytes),
    Binary(bytes::Bytes),
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum Exit {
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

    fn shutting_down() -> Self {
        Exit::close(1012, "node shutting down; reconnect with since")
    }
}

/// Where a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Routed here by the claimer.
    Live,
    /// Parked for the user (written to none of their sockets yet).
    Parked,
    /// Read from a stream (a resume, or catching up after a full queue).
    Stream,
}

/// A message taken from a stream, on its way to the socket.
pub(crate) struct Item {
    pub envelope: Arc<Envelope>,
    pub origin: Origin,
}

/// Frames ready to write for one message.
pub(crate) struct Ready {
    pub item: Item,
    pub frames: Vec<Message>,
    /// Written to a subscription that acks (STOMP `client` modes): a user
    /// message comes again on the user's next connection unless acked.
    pub ack_required: bool,
}

/// A backfill to run: the user's stream (or parked messages) after `from`
/// up to `head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Backfill {
    origin: Origin,
    from: i64,
    head: i64,
}

/// One client socket's session. `P` is its protocol's half, `S` the socket
/// it writes to.
pub(crate) struct Session<P: Half, S: WsSink> {
    ctx: Arc<NodeState>,
    id: Uuid,
    identity: Identity,
    user: Arc<str>,
    user_stream: StreamKey,
    sink: S,
    proto: P,
    /// The last id of the user's stream taken (written, or held for STOMP).
    user_cursor: i64,
    broadcast_cursor: i64,
    /// Subscribed topics and their cursors.
    topics: HashMap<Arc<str>, i64>,
    /// The backfills not yet run, in order: at once for JSON; for STOMP at
    /// the first `/user/` subscription, which is where user messages can go.
    pending_backfill: Vec<Backfill>,
    /// Inbound frames allowed per second: past it, reading pauses (TCP
    /// pushes back on the client).
    inbound_rate: TokenBucket,
    /// This connection's submissions (SEND, publish) not answered yet, in
    /// the order they were sent: answered in that order.
    in_flight: VecDeque<submit::InFlight<P::Reply>>,
    /// Instructions from outside (a close), also watched while waiting for
    /// a submission slot.
    controls: Controls,
    last_inbound: Instant,
    last_marked: Instant,
    /// Set once the session's finish has run.
    finished: bool,
    transport: Transport,
}

impl<P: Half, S: WsSink> Session<P, S> {
    /// A session of connection `id`, registered.
    fn new(
        ctx: Arc<NodeState>,
        id: Uuid,
        identity: Identity,
        sink: S,
        proto: P,
        controls: Controls,
        start: Start,
    ) -> Self {
        let now = Instant::now();
        let user = identity.user_id.clone();
        let inbound_rate = TokenBucket::new(ctx.settings.limits.max_frames_per_second);
        Self {
            ctx,
            id,
            identity,
            user_stream: StreamKey::User(user.clone()),
            user,
            sink,
            proto,
            user_cursor: start.user_cursor,
            broadcast_cursor: start.broadcast_cursor,
            topics: HashMap::new(),
            pending_backfill: start.backfills,
            inbound_rate,
            in_flight: VecDeque::new(),
            controls,
            last_inbound: now,
            last_marked: now,
            finished: false,
            transport: Transport::WebSocket,
        }
    }

    fn protocol_name(&self) -> &'static str {
        P::PROTOCOL.as_str()
    }
}

/// Where a new session starts: its cursors at the heads of the user's
/// stream and of the broadcast when its connection was registered, and the
/// backfills it owes the client (see `connect::backfill_plan`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Start {
    pub user_cursor: i64,
    pub broadcast_cursor: i64,
    pub backfills: Vec<Backfill>,
}

/// A session that ends without its finish (a panic) still leaves the hub,
/// and its connection departs (what was routed to it is parked).
impl<P: Half, S: WsSink> Drop for Session<P, S> {
    fn drop(&mut self) {
        if !self.finished {
            tracing::error!("session ended abnormally; removing its connection");
            self.ctx.delivery.hub.remove_everywhere(self.id);
            self.ctx
                .delivery
                .log
                .record_later(crate::read::delivery_log::Record::Departed {
                    connection_id: self.id,
                    done: None,
                });
        }
    }
}

#[cfg(test)]
mod tests;

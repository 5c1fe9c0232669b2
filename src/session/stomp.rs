//! STOMP's half of a session: CONNECT and CONNECTED, subscriptions to
//! `/topic/…` and `/user/…` destinations, SEND, ACK/NACK, receipts and
//! heart-beats, as Spring clients (@stomp/stompjs) use them.
//!
//! Destinations:
//! - `/topic/<name>`: topic `<name>`;
//! - `/user/queue/<name>` (or `/user/topic/<name>`): this user's messages whose
//!   destination is `/queue/<name>` (`/topic/<name>`); a user message without a
//!   destination is delivered as `/queue/messages`;
//! - broadcasts go to subscriptions of their destination, or of
//!   `/topic/broadcast` when they have none.
//!
//! SEND goes to `/topic/<name>` (where the token's `publish` claim allows), or
//! to `/user/<name>/queue/<rest>` (to oneself, or where `publish` allows
//! `users.<name>`). Transactions are refused. Any error is an ERROR frame,
//! after which the connection closes, as STOMP requires.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};

use super::{Exit, Incoming, Reply, Session, Sink, SubscribeError};
use crate::auth::{Identity, bearer};
use crate::config::Auth;
use crate::deliveries::Record;
use crate::message::{NewMessage, Payload, StoredMessage, StreamKey, Target};
use crate::node::NodeContext;
use crate::protocol::stomp::{self, Frame, FrameError, Limits, Version};
use crate::router::EnqueueError;
use crate::topic;

/// Frames one WebSocket message may carry: each is read, and a SEND
/// queued, before the next message is read.
const MAX_FRAMES_PER_MESSAGE: usize = 1000;
/// Outstanding acks remembered per connection; the oldest are forgotten.
const MAX_PENDING_ACKS: usize = 10_000;
/// The destination of user messages sent without one.
const DEFAULT_USER_DESTINATION: &str = "/queue/messages";
const DEFAULT_BROADCAST_DESTINATION: &str = "/topic/broadcast";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AckMode {
    Auto,
    Client,
    ClientIndividual,
}

/// What a subscription listens to.
#[derive(Clone, Debug)]
enum Listens {
    Topic(Arc<str>),
    /// This user's messages with this destination (`/queue/x`).
    User(String),
}

struct Subscription {
    destination: String,
    listens: Listens,
    ack: AckMode,
}

struct PendingAck {
    subscription: String,
    message_id: i64,
}

/// A STOMP session's state.
pub(super) struct State {
    pub(super) version: Version,
    limits: Limits,
    subscriptions: HashMap<String, Subscription>,
    /// Ack id → what it acknowledges, in ack id order.
    pending: HashMap<u64, PendingAck>,
    pending_order: VecDeque<u64>,
    next_ack: u64,
    /// Send a heart-beat this often (agreed in CONNECT).
    pub(super) heartbeat_out: Option<Duration>,
    /// The client promised one at least this often.
    pub(super) heartbeat_in: Option<Duration>,
}

impl State {
    /// The MESSAGE frames for a message, one per matching subscription.
    pub(super) fn frames_for(
        &mut self,
        message: &StoredMessage,
        stream: &StreamKey,
    ) -> Vec<Message> {
        let wanted: Vec<(String, String, AckMode)> = self
            .subscriptions
            .iter()
            .filter(|(_, sub)| match (&sub.listens, stream) {
                (Listens::Topic(t), StreamKey::Topic(topic)) => t == topic,
                (Listens::User(destination), StreamKey::User(_)) => {
                    destination
                        == message
                            .destination
                            .as_deref()
                            .unwrap_or(DEFAULT_USER_DESTINATION)
                }
                (_, StreamKey::Broadcast) => {
                    sub.destination
                        == message
                            .destination
                            .as_deref()
                            .unwrap_or(DEFAULT_BROADCAST_DESTINATION)
                }
                _ => false,
            })
            .map(|(id, sub)| (id.clone(), sub.destination.clone(), sub.ack))
            .collect();
        let (body, content_type) = message.payload.body();
        let message_id = message.id.to_string();
        let mut frames = Vec::with_capacity(wanted.len());
        for (subscription, destination, ack) in wanted {
            let ack_id =
                (ack != AckMode::Auto).then(|| self.remember_ack(&subscription, message.id));
            let ack_text = ack_id.map(|id| id.to_string());
            let mut headers = vec![
                ("subscription", subscription.as_str()),
                ("message-id", message_id.as_str()),
                ("destination", destination.as_str()),
            ];
            if let Some(content_type) = content_type {
                headers.push(("content-type", content_type));
            }
            if let Some(ack) = &ack_text
                && self.version == Version::V1_2
            {
                headers.push(("ack", ack));
            }
            frames.push(to_message(stomp::encode(
                "MESSAGE",
                &headers,
                &body,
                self.version,
            )));
        }
        frames
    }

    fn remember_ack(&mut self, subscription: &str, message_id: i64) -> u64 {
        self.next_ack += 1;
        let id = self.next_ack;
        self.pending.insert(
            id,
            PendingAck {
                subscription: subscription.to_owned(),
                message_id,
            },
        );
        self.pending_order.push_back(id);
        while self.pending_order.len() > MAX_PENDING_ACKS {
            if let Some(old) = self.pending_order.pop_front() {
                self.pending.remove(&old);
            }
        }
        id
    }

    /// The pending acks an ACK or NACK frame settles: one (client-individual)
    /// or every earlier one of the subscription too (client). Empty when the
    /// frame names nothing pending.
    fn settle(&mut self, frame: &Frame) -> Vec<i64> {
        let found = match self.version {
            Version::V1_2 => frame.header("id").and_then(|id| id.parse::<u64>().ok()),
            _ => {
                let subscription = frame.header("subscription");
                let message_id = frame
                    .header("message-id")
                    .and_then(|id| id.parse::<i64>().ok());
                self.pending_order.iter().copied().find(|ack| {
                    self.pending.get(ack).is_some_and(|p| {
                        Some(p.message_id) == message_id
                            && subscription.is_none_or(|s| s == p.subscription)
                    })
                })
            }
        };
        let Some(ack_id) = found else {
            return Vec::new();
        };
        let Some(pending) = self.pending.get(&ack_id) else {
            return Vec::new();
        };
        let subscription = pending.subscription.clone();
        let cumulative = self
            .subscriptions
            .get(&subscription)
            .is_some_and(|s| s.ack == AckMode::Client);
        let settled: Vec<u64> = if cumulative {
            self.pending_order
                .iter()
                .copied()
                .filter(|id| {
                    *id <= ack_id
                        && self
                            .pending
                            .get(id)
                            .is_some_and(|p| p.subscription == subscription)
                })
                .collect()
        } else {
            vec![ack_id]
        };
        let mut messages = Vec::with_capacity(settled.len());
        for id in settled {
            if let Some(pending) = self.pending.remove(&id) {
                messages.push(pending.message_id);
            }
        }
        self.pending_order
            .retain(|id| self.pending.contains_key(id));
        messages
    }
}

/// A frame as a WebSocket message: text when it is UTF-8 without NUL in the
/// body, binary otherwise.
fn to_message(bytes: Vec<u8>) -> Message {
    let body_has_nul = bytes[..bytes.len() - 1].contains(&0);
    match String::from_utf8(bytes) {
        Ok(text) if !body_has_nul => Message::Text(text.into()),
        Ok(text) => Message::Binary(Bytes::from(text.into_bytes())),
        Err(e) => Message::Binary(Bytes::from(e.into_bytes())),
    }
}

/// Sends an ERROR frame (the caller closes the connection after it).
pub(super) async fn send_error(
    sink: &mut Sink,
    version: Version,
    message: &str,
    receipt: Option<&str>,
) -> Result<(), axum::Error> {
    let mut headers = vec![("message", message), ("content-type", "text/plain")];
    if let Some(receipt) = receipt {
        headers.push(("receipt-id", receipt));
    }
    let frame = stomp::encode("ERROR", &headers, message.as_bytes(), version);
    sink.send(to_message(frame)).await
}

/// Reads CONNECT (or STOMP) and authenticates. None when the client is
/// refused (it has been sent an ERROR and closed).
pub(super) async fn handshake(
    ctx: &NodeContext,
    sink: &mut Sink,
    incoming: &mut Incoming,
    identity: Option<Identity>,
    deadline: tokio::time::Instant,
) -> Option<(Identity, State)> {
    let limits = Limits::new(ctx.settings.max_message_bytes);
    let outcome = async {
        let frame = loop {
            // One deadline from accept, whatever the client sends meanwhile
            // (heart-beats, pings): a socket that never connects is closed.
            let message = match tokio::time::timeout_at(deadline, incoming.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(_) => return Err(None),
                Err(_) => return Err(Some("no CONNECT frame in time".to_owned())),
            };
            let bytes = match &message {
                Message::Text(text) => text.as_bytes(),
                Message::Binary(bytes) => &bytes[..],
                Message::Close(_) => return Err(None),
                _ => continue,
            };
            match stomp::decode(bytes, Version::V1_2, &limits) {
                Ok(mut frames) if !frames.is_empty() => break frames.remove(0),
                Ok(_) => continue, // heart-beats
                Err(error) => return Err(Some(format!("malformed frame: {error}"))),
            }
        };
        if frame.command != "CONNECT" && frame.command != "STOMP" {
            return Err(Some(format!("expected CONNECT, got {}", frame.command)));
        }
        let version = Version::negotiate(frame.header("accept-version"))
            .ok_or_else(|| Some("supported versions are 1.0, 1.1 and 1.2".to_owned()))?;
        let (client_sends, client_wants) = stomp::heart_beat(frame.header("heart-beat"))
            .ok_or_else(|| Some("the heart-beat header must be two numbers: cx,cy".to_owned()))?;
        let identity = match identity {
            Some(identity) => identity,
            None => connect_identity(ctx, &frame).map_err(Some)?,
        };
        let ours = ctx.settings.heartbeat_interval.as_millis() as u64;
        let state = State {
            version,
            limits,
            subscriptions: HashMap::new(),
            pending: HashMap::new(),
            pending_order: VecDeque::new(),
            next_ack: 0,
            heartbeat_out: (client_wants > 0)
                .then(|| Duration::from_millis(client_wants.max(ours))),
            heartbeat_in: (client_sends > 0).then(|| Duration::from_millis(client_sends.max(ours))),
        };
        Ok((identity, state))
    }
    .await;
    match outcome {
        Ok(accepted) => Some(accepted),
        Err(reason) => {
            if let Some(reason) = reason {
                tracing::debug!(%reason, "STOMP connect refused");
                let _ = send_error(sink, Version::V1_2, &reason, None).await;
                super::close_and_drain(sink, incoming, 1008, "STOMP connect refused").await;
            }
            None
        }
    }
}

/// The identity in a CONNECT frame: a JWT as `passcode` or in an
/// `Authorization` header, or with auth `none` the `login` header.
fn connect_identity(ctx: &NodeContext, frame: &Frame) -> Result<Identity, String> {
    match &ctx.settings.auth {
        Auth::None => {
            let user = frame
                .header("login")
                .ok_or("auth is `none`: name the user with ?user=<id> or the login header")?;
            Identity::unauthenticated(user)
        }
        Auth::Jwt { verifier, .. } => {
            let token = frame
                .header("passcode")
                .or_else(|| frame.header("Authorization").and_then(bearer))
                .or_else(|| frame.header("authorization").and_then(bearer))
                .ok_or(
                    "a token is required: as the passcode header, or `Authorization: Bearer <jwt>`",
                )?;
            verifier.verify(token)
        }
    }
}

/// A STOMP error: an ERROR frame with this message, then a close.
#[derive(Debug)]
struct StompError {
    message: String,
    code: u16,
}

impl StompError {
    fn protocol(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1002,
        }
    }

    fn forbidden(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1008,
        }
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: 1013,
        }
    }
}

impl From<FrameError> for StompError {
    fn from(error: FrameError) -> Self {
        StompError::protocol(format!("malformed frame: {error}"))
    }
}

impl Session {
    fn stomp(&mut self) -> &mut State {
        match &mut self.proto {
            super::Proto::Stomp(state) => state,
            super::Proto::Json => unreachable!("a STOMP operation on a JSON session"),
        }
    }

    pub(super) async fn stomp_connected(&mut self) -> Result<(), Exit> {
        let id = self.id.to_string();
        let user = self.user.clone();
        let state = self.stomp();
        let beat = format!(
            "{},{}",
            state.heartbeat_out.map_or(0, |d| d.as_millis()),
            state.heartbeat_in.map_or(0, |d| d.as_millis())
        );
        let version = state.version;
        let server = concat!("pgrelay/", env!("CARGO_PKG_VERSION"));
        let headers = [
            ("version", version.as_str()),
            ("heart-beat", beat.as_str()),
            ("server", server),
            ("session", id.as_str()),
            ("user-name", &user),
        ];
        let frame = stomp::encode("CONNECTED", &headers, b"", version);
        self.send(to_message(frame)).await
    }

    /// One inbound WebSocket message: zero or more frames.
    pub(super) async fn stomp_input(&mut self, bytes: &[u8]) -> Result<(), Exit> {
        let (version, limits) = {
            let state = self.stomp();
            (state.version, state.limits)
        };
        let frames = match stomp::decode(bytes, version, &limits) {
            Ok(frames) if frames.len() > MAX_FRAMES_PER_MESSAGE => {
                self.answer_in_flight().await?;
                let error = StompError::protocol(format!(
                    "at most {MAX_FRAMES_PER_MESSAGE} frames per WebSocket message"
                ));
                return Err(self.stomp_fail(error, None).await);
            }
            Ok(frames) => frames,
            Err(error) => {
                // The SENDs before it are answered first, in order.
                self.answer_in_flight().await?;
                return Err(self.stomp_fail(StompError::from(error), None).await);
            }
        };
        // Each frame counts against the frame rate, however many one
        // WebSocket message carries.
        self.inbound_rate.charge(frames.len().max(1) as u32);
        for frame in frames {
            let receipt = frame.header("receipt").map(str::to_owned);
            if frame.command == "SEND" {
                // Answered (its RECEIPT) once committed; meanwhile the next
                // frames are read.
                match self.stomp_send(&frame, receipt).await {
                    Ok(()) => continue,
                    Err(Failure::Stomp(error)) => {
                        self.answer_in_flight().await?;
                        let receipt = frame.header("receipt");
                        return Err(self.stomp_fail(error, receipt).await);
                    }
                    Err(Failure::Exit(exit)) => return Err(exit),
                }
            }
            // Anything else is answered after the SENDs before it.
            self.answer_in_flight().await?;
            match self.stomp_frame(&frame).await {
                Ok(Continue::Yes) => {}
                Ok(Continue::Disconnect) => {
                    if let Some(receipt) = &receipt {
                        self.stomp_receipt(receipt).await?;
                    }
                    return Err(Exit::close(1000, "DISCONNECT"));
                }
                Err(Failure::Stomp(error)) => {
                    return Err(self.stomp_fail(error, receipt.as_deref()).await);
                }
                Err(Failure::Exit(exit)) => return Err(exit),
            }
            if let Some(receipt) = &receipt {
                self.stomp_receipt(receipt).await?;
            }
        }
        Ok(())
    }

    async fn stomp_receipt(&mut self, receipt: &str) -> Result<(), Exit> {
        let version = self.stomp().version;
        let frame = stomp::encode("RECEIPT", &[("receipt-id", receipt)], b"", version);
        self.send(to_message(frame)).await
    }

    async fn stomp_fail(&mut self, error: StompError, receipt: Option<&str>) -> Exit {
        tracing::debug!(message = %error.message, "STOMP error");
        let version = self.stomp().version;
        let _ = send_error(&mut self.sink, version, &error.message, receipt).await;
        Exit::close(error.code, "STOMP error (see the ERROR frame)")
    }

    async fn stomp_frame(&mut self, frame: &Frame) -> Result<Continue, Failure> {
        match frame.command.as_str() {
            "SUBSCRIBE" => self.stomp_subscribe(frame).await.map(|()| Continue::Yes),
            "UNSUBSCRIBE" => {
                let id = frame
                    .header("id")
                    .or_else(|| frame.header("destination"))
                    .ok_or_else(|| StompError::protocol("UNSUBSCRIBE needs an id header"))?
                    .to_owned();
                let removed = self.stomp().subscriptions.remove(&id);
                if let Some(Subscription {
                    listens: Listens::Topic(topic),
                    ..
                }) = removed
                {
                    let still_used = self
                        .stomp()
                        .subscriptions
                        .values()
                        .any(|s| matches!(&s.listens, Listens::Topic(t) if *t == topic));
                    if !still_used {
                        self.unsubscribe_topic(&topic).await;
                    }
                }
                Ok(Continue::Yes)
            }
            "ACK" | "NACK" => {
                let settled = self.stomp().settle(frame);
                if frame.command == "ACK" {
                    let at = chrono::Utc::now();
                    for message_id in settled {
                        let record = Record::Acked {
                            message_id,
                            connection_id: self.id,
                            at,
                        };
                        self.ctx.deliveries.record(record).await;
                    }
                }
                Ok(Continue::Yes)
            }
            "BEGIN" | "COMMIT" | "ABORT" => {
                Err(StompError::protocol("transactions are not supported by pgrelay").into())
            }
            "DISCONNECT" => Ok(Continue::Disconnect),
            "CONNECT" | "STOMP" => Err(StompError::protocol("already connected").into()),
            other => Err(StompError::protocol(format!("unexpected {other} frame")).into()),
        }
    }

    async fn stomp_subscribe(&mut self, frame: &Frame) -> Result<(), Failure> {
        let version = self.stomp().version;
        let destination = frame
            .header("destination")
            .ok_or_else(|| StompError::protocol("SUBSCRIBE needs a destination header"))?
            .to_owned();
        let id = match frame.header("id") {
            Some(id) => id.to_owned(),
            None if version == Version::V1_0 => destination.clone(),
            None => return Err(StompError::protocol("SUBSCRIBE needs an id header").into()),
        };
        if self.stomp().subscriptions.contains_key(&id) {
            return Err(
                StompError::protocol(format!("subscription id {id:?} is already in use")).into(),
            );
        }
        let ack = match frame.header("ack").unwrap_or("auto") {
            "auto" => AckMode::Auto,
            "client" => AckMode::Client,
            "client-individual" => AckMode::ClientIndividual,
            other => return Err(StompError::protocol(format!("unknown ack mode {other:?}")).into()),
        };
        let listens = parse_subscription(&destination)?;
        if let Listens::Topic(topic) = &listens {
            if !topic::allowed(&self.identity.topics, topic) {
                return Err(StompError::forbidden(format!(
                    "your token does not allow subscribing to {topic:?}"
                ))
                .into());
            }
            if let Err(error) = self.subscribe_topic(topic).await {
                return Err(match error {
                    SubscribeError::TooMany(_) => StompError::forbidden(error.describe()),
                    SubscribeError::Unavailable => StompError::unavailable(error.describe()),
                }
                .into());
            }
        }
        let user_messages = matches!(listens, Listens::User(_));
        self.stomp().subscriptions.insert(
            id,
            Subscription {
                destination,
                listens,
                ack,
            },
        );
        if user_messages {
            // The first place user messages can go: the backfill runs now,
            // then what was held for a subscription like this one.
            self.run_pending_backfills().await?;
            let held: Vec<_> = self.held.drain(..).collect();
            self.deliver(held).await?;
        }
        Ok(())
    }

    async fn stomp_send(&mut self, frame: &Frame, receipt: Option<String>) -> Result<(), Failure> {
        if frame.header("transaction").is_some() {
            return Err(StompError::protocol("transactions are not supported by pgrelay").into());
        }
        let destination = frame
            .header("destination")
            .ok_or_else(|| StompError::protocol("SEND needs a destination header"))?;
        let (target, message_destination) = parse_send(destination, &self.user)?;
        let allowed = match &target {
            Target::Topic(topic) => topic::allowed(&self.identity.publish, topic),
            Target::User(user) => {
                *user == *self.user
                    || topic::allowed(&self.identity.publish, &format!("users.{user}"))
            }
            _ => false,
        };
        if !allowed {
            return Err(StompError::forbidden(format!(
                "your token does not allow sending to {destination:?}"
            ))
            .into());
        }
        if frame.body.len() > self.ctx.settings.max_message_bytes {
            return Err(StompError::protocol("the body is over the message size limit").into());
        }
        let message = NewMessage {
            target,
            destination: message_destination,
            payload: Payload::Raw {
                bytes: frame.body.clone(),
                content_type: frame.header("content-type").map(str::to_owned),
            },
            ttl_secs: None,
        };
        self.submit(message, Reply::Stomp { receipt }).await?;
        Ok(())
    }

    /// Answers a SEND once its commit is known: a RECEIPT when asked for;
    /// an ERROR (which ends the session) when it was not stored, or may not
    /// have been.
    pub(super) async fn stomp_sent(
        &mut self,
        receipt: Option<String>,
        answer: Result<i64, EnqueueError>,
    ) -> Result<(), Exit> {
        let error = match answer {
            Ok(_) => {
                if let Some(receipt) = &receipt {
                    self.stomp_receipt(receipt).await?;
                }
                return Ok(());
            }
            Err(EnqueueError::OutcomeUnknown(_)) => StompError::unavailable(
                "outcome unknown: the message may or may not have been stored (the database's \
                 answer was lost); check before sending it again",
            ),
            Err(
                error @ (EnqueueError::Unavailable(_)
                | EnqueueError::Busy
                | EnqueueError::Conflict(_)),
            ) => StompError::unavailable(format!("nothing was stored: {error}")),
            Err(error) => StompError::protocol(format!("the message was refused: {error}")),
        };
        // The session ends with this ERROR: SENDs queued behind this one and
        // not taken into a batch yet are withdrawn (never stored), so that a
        // client resending from the failed one does not store it after them.
        for later in &self.in_flight {
            later.pending.withdraw();
        }
        Err(self.stomp_fail(error, receipt.as_deref()).await)
    }
}

/// A SUBSCRIBE destination.
fn parse_subscription(destination: &str) -> Result<Listens, StompError> {
    if let Some(topic) = destination.strip_prefix("/topic/") {
        topic::validate(topic).map_err(StompError::protocol)?;
        return Ok(Listens::Topic(topic.into()));
    }
    for kind in ["/user/queue/", "/user/topic/"] {
        if let Some(name) = destination.strip_prefix(kind)
            && !name.is_empty()
        {
            return Ok(Listens::User(destination["/user".len()..].to_owned()));
        }
    }
    if destination.starts_with("/user/") {
        return Err(StompError::forbidden(
            "subscribe to your own messages as /user/queue/<name>; other users' destinations are not yours",
        ));
    }
    Err(StompError::protocol(format!(
        "unsupported destination {destination:?}: use /topic/<name> or /user/queue/<name>"
    )))
}

/// A SEND destination: the target, and the destination the message carries.
fn parse_send(destination: &str, me: &str) -> Result<(Target, Option<String>), StompError> {
    if let Some(topic) = destination.strip_prefix("/topic/") {
        topic::validate(topic).map_err(StompError::protocol)?;
        return Ok((
            Target::Topic(topic.to_owned()),
            Some(destination.to_owned()),
        ));
    }
    if let Some(rest) = destination.strip_prefix("/user/") {
        // /user/<name>/queue/<x>, /user/<name>/topic/<x>; /user/queue/<x> is oneself.
        let (user, path) = match rest.split_once('/') {
            Some(("queue" | "topic", _)) => (me, &destination["/user".len()..]),
            Some((user, _)) => (user, &rest[user.len()..]),
            None => ("", ""),
        };
        let valid_path = (path.starts_with("/queue/") || path.starts_with("/topic/"))
            && path.len() > "/queue/".len();
        if user.is_empty() || !valid_path {
            return Err(StompError::protocol(format!(
                "unsupported destination {destination:?}: use /user/<name>/queue/<name>"
            )));
        }
        crate::auth::validate_user_id(user).map_err(StompError::protocol)?;
        return Ok((Target::User(user.to_owned()), Some(path.to_owned())));
    }
    Err(StompError::protocol(format!(
        "unsupported destination {destination:?}: use /topic/<name> or /user/<name>/queue/<name>"
    )))
}

enum Continue {
    Yes,
    Disconnect,
}

enum Failure {
    Stomp(StompError),
    Exit(Exit),
}

impl From<StompError> for Failure {
    fn from(error: StompError) -> Self {
        Failure::Stomp(error)
    }
}

impl From<Exit> for Failure {
    fn from(exit: Exit) -> Self {
        Failure::Exit(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_destinations() {
        assert!(
            matches!(parse_subscription("/topic/chat.a"), Ok(Listens::Topic(t)) if &*t == "chat.a")
        );
        assert!(
            matches!(parse_subscription("/user/queue/x"), Ok(Listens::User(d)) if d == "/queue/x")
        );
        assert!(
            matches!(parse_subscription("/user/topic/x"), Ok(Listens::User(d)) if d == "/topic/x")
        );
        // Never another user's messages, whatever the string.
        for other in [
            "/user/bob/queue/x",
            "/user/queue/",
            "/user/../bob/queue/x",
            "/user//queue/x",
        ] {
            assert!(parse_subscription(other).is_err(), "{other}");
        }
        assert!(parse_subscription("/queue/x").is_err());
        assert!(parse_subscription("/topic/a..b").is_err());
    }

    #[test]
    fn send_destinations() {
        let (target, destination) = parse_send("/topic/chat.a", "alice").unwrap();
        assert_eq!(target, Target::Topic("chat.a".into()));
        assert_eq!(destination.as_deref(), Some("/topic/chat.a"));
        let (target, destination) = parse_send("/user/bob/queue/inbox", "alice").unwrap();
        assert_eq!(target, Target::User("bob".into()));
        assert_eq!(destination.as_deref(), Some("/queue/inbox"));
        let (target, destination) = parse_send("/user/queue/notes", "alice").unwrap();
        assert_eq!(target, Target::User("alice".into()));
        assert_eq!(destination.as_deref(), Some("/queue/notes"));
        for bad in [
            "/user/bob",
            "/user/bob/queue/",
            "/user//queue/x",
            "/queue/x",
            "/topic/",
        ] {
            assert!(parse_send(bad, "alice").is_err(), "{bad}");
        }
    }
}

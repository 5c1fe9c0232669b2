//! STOMP's half of a session: CONNECT and CONNECTED ([`handshake`]),
//! subscriptions to `/topic/…` and `/user/…` destinations
//! ([`subscriptions`], [`destinations`]), SEND, ACK/NACK, receipts and
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

mod destinations;
mod handshake;
mod queues;
mod subscriptions;

use std::collections::VecDeque;
use std::time::Duration;

use axum::extract::ws::Message;
use bytes::Bytes;
use futures_util::SinkExt;

use super::topics::SubscribeError;
use super::{Exit, Half, Input, Item, Ready, Session, WsSink};
use crate::message::{Payload, StreamKey, Target};
use crate::protocol::Protocol;
use crate::protocol::stomp::{self, Frame, FrameError, FrameLimits, Version};
use crate::read::delivery_log::Record;
use crate::topic;
use crate::write::enqueue::EnqueueError;
use crate::write::parse::{self, Draft, Refusal, Rules};
use destinations::{Listens, parse_send, parse_subscription};
pub(super) use handshake::handshake;
use subscriptions::{AckMode, Subscription, Subscriptions};

/// Frames one WebSocket message may carry: each is read, and a SEND
/// queued, before the next message is read.
const MAX_FRAMES_PER_MESSAGE: usize = 1000;

/// A STOMP session's own state.
pub(super) struct Stomp {
    version: Version,
    limits: FrameLimits,
    subscriptions: Subscriptions,
    /// User messages no subscription matches yet, in order.
    held: VecDeque<Item>,
    /// Send a heart-beat this often (agreed in CONNECT).
    heartbeat_out: Option<Duration>,
    /// The client promised one at least this often.
    heartbeat_in: Option<Duration>,
}

impl Stomp {
    pub(in crate::session) fn new(
        version: Version,
        limits: FrameLimits,
        heartbeat_out: Option<Duration>,
        heartbeat_in: Option<Duration>,
    ) -> Self {
        Self {
            version,
            limits,
            subscriptions: Subscriptions::default(),
            held: VecDeque::new(),
            heartbeat_out,
            heartbeat_in,
        }
    }
}

/// A SEND waiting for its commit: answered with a RECEIPT when it asked.
pub(super) struct Sent {
    receipt: Option<String>,
}

impl Half for Stomp {
    const PROTOCOL: Protocol = Protocol::Stomp;
    type Reply = Sent;

    async fn confirm<S: WsSink>(session: &mut Session<Self, S>) -> Result<(), Exit> {
        session.stomp_connected().await
    }

    async fn input<S: WsSink>(session: &mut Session<Self, S>, input: Input) -> Result<(), Exit> {
        match input {
            Input::Text(text) => session.stomp_input(text.as_bytes()).await,
            Input::Binary(bytes) => session.stomp_input(&bytes).await,
        }
    }

    async fn answered<S: WsSink>(
        session: &mut Session<Self, S>,
        reply: Sent,
        answer: Result<i64, EnqueueError>,
    ) -> Result<(), Exit> {
        session.stomp_sent(reply.receipt, answer).await
    }

    async fn refuse<S: WsSink>(&self, sink: &mut S, reason: &str) {
        let _ = send_error(sink, self.version, reason, None).await;
    }

    /// Keeps a user message no subscription wants yet until one does; the
    /// oldest are let go past `hold_at_most`. What is let go stays routed to
    /// this connection in the outbox: parked for the user when it closes.
    fn frames(&mut self, item: Item, hold_at_most: usize) -> Option<Ready> {
        let envelope = &item.envelope;
        let (frames, acked) = self.subscriptions.frames_for(envelope, self.version);
        if !frames.is_empty() {
            let ack_required = acked && matches!(envelope.stream, StreamKey::User(_));
            return Some(Ready {
                item,
                frames,
                ack_required,
            });
        }
        if matches!(envelope.stream, StreamKey::User(_)) {
            self.held.push_back(item);
            if self.held.len() > hold_at_most {
                self.held.pop_front();
            }
        }
        None
    }

    fn written(&mut self, _message_id: i64) {}

    fn counts_its_own_frames(&self) -> bool {
        true
    }

    fn heartbeat_in(&self) -> Option<Duration> {
        self.heartbeat_in
    }

    fn heartbeat_out(&self) -> Option<Duration> {
        self.heartbeat_out
    }
}

/// Headers STOMP defines for SEND and MESSAGE: everything else a SEND
/// carries is the application's, and travels with the message.
const STOMP_HEADERS: [&str; 9] = [
    "destination",
    "content-length",
    "content-type",
    "receipt",
    "transaction",
    "message-id",
    "subscription",
    "ack",
    "redelivered",
];

/// A SEND's application headers, in order.
fn application_headers(frame: &Frame) -> Vec<(String, String)> {
    frame
        .headers
        .iter()
        .filter(|(name, _)| !STOMP_HEADERS.contains(&name.as_str()))
        .cloned()
        .collect()
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

/// How long an ACK, NACK or a queue's UNSUBSCRIBE with a receipt waits for
/// its record to commit before the session says it cannot tell.
const ACK_RECORD_WAIT: Duration = Duration::from_secs(5);

/// How long an ERROR frame may take to write: a client that sent a bad
/// frame and reads nothing must not keep its session (and what it holds)
/// alive.
const ERROR_WRITE_LIMIT: Duration = Duration::from_secs(5);

/// Sends an ERROR frame (the caller closes the connection after it), giving
/// up after [`ERROR_WRITE_LIMIT`].
async fn send_error<S: WsSink>(
    sink: &mut S,
    version: Version,
    message: &str,
    receipt: Option<&str>,
) -> Result<(), axum::Error> {
    let mut headers = vec![("message", message), ("content-type", "text/plain")];
    if let Some(receipt) = receipt {
        headers.push(("receipt-id", receipt));
    }
    let frame = stomp::encode("ERROR", &headers, message.as_bytes(), version);
    match tokio::time::timeout(ERROR_WRITE_LIMIT, sink.send(to_message(frame))).await {
        Ok(sent) => sent,
        Err(_) => Err(axum::Error::new(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client does not read: its ERROR frame was not written",
        ))),
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

impl<S: WsSink> Session<Stomp, S> {
    async fn stomp_connected(&mut self) -> Result<(), Exit> {
        let id = self.id.to_string();
        let state = &self.proto;
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
            ("user-name", &self.user),
        ];
        let frame = stomp::encode("CONNECTED", &headers, b"", version);
        self.send(to_message(frame)).await
    }

    /// One inbound WebSocket message: zero or more frames.
    async fn stomp_input(&mut self, bytes: &[u8]) -> Result<(), Exit> {
        let frames = match stomp::decode(bytes, self.proto.version, &self.proto.limits) {
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
        let frame = stomp::encode(
            "RECEIPT",
            &[("receipt-id", receipt)],
            b"",
            self.proto.version,
        );
        self.send(to_message(frame)).await
    }

    async fn stomp_fail(&mut self, error: StompError, receipt: Option<&str>) -> Exit {
        tracing::debug!(message = %error.message, "STOMP error");
        let version = self.proto.version;
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
                let subscriptions = &mut self.proto.subscriptions.by_id;
                match subscriptions.remove(&id) {
                    Some(Subscription {
                        listens: Listens::Topic(topic),
                        ..
                    }) => {
                        let still_used = subscriptions
                            .values()
                            .any(|s| matches!(&s.listens, Listens::Topic(t) if *t == topic));
                        if !still_used {
                            self.unsubscribe_topic(&topic).await;
                        }
                    }
                    Some(Subscription {
                        listens: Listens::Queue(_),
                        consumer: Some(consumer),
                        ..
                    }) => {
                        self.leave_queue(&id, consumer).await;
                        // Its RECEIPT says the consumer is gone (what it held
                        // waits in the queue again): after the commit.
                        if frame.header("receipt").is_some()
                            && !self.ctx.delivery.log.flushed(ACK_RECORD_WAIT).await
                        {
                            return Err(StompError::unavailable(
                                "the unsubscription is not recorded yet (the database is slow or unavailable); it may still be",
                            )
                            .into());
                        }
                    }
                    _ => {}
                }
                Ok(Continue::Yes)
            }
            "ACK" | "NACK" => {
                let settled = self.proto.subscriptions.settle(frame, self.proto.version);
                let at = chrono::Utc::now();
                for settled in settled {
                    let record = match (frame.command.as_str(), settled.queue) {
                        ("ACK", queue) => Record::Acked {
                            message_id: settled.message_id,
                            connection_id: self.id,
                            at,
                            queue,
                        },
                        // A queue's message waits for another consumer.
                        (_, Some(queue)) => Record::Nacked {
                            message_id: settled.message_id,
                            connection_id: self.id,
                            queue,
                        },
                        // Another message's NACK settles it: it was
                        // delivered, and is not sent again.
                        (_, None) => continue,
                    };
                    self.ctx.delivery.log.record(record).await;
                }
                // A RECEIPT says the ack is recorded (durable before
                // acknowledged): it waits for the delivery log's commit.
                if frame.header("receipt").is_some()
                    && !self.ctx.delivery.log.flushed(ACK_RECORD_WAIT).await
                {
                    return Err(StompError::unavailable(
                        "the ack is not recorded yet (the database is slow or unavailable); it may still be",
                    )
                    .into());
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
        let destination = frame
            .header("destination")
            .ok_or_else(|| StompError::protocol("SUBSCRIBE needs a destination header"))?
            .to_owned();
        let id = match frame.header("id") {
            Some(id) => id.to_owned(),
            None if self.proto.version == Version::V1_0 => destination.clone(),
            None => return Err(StompError::protocol("SUBSCRIBE needs an id header").into()),
        };
        if self.proto.subscriptions.by_id.contains_key(&id) {
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
        let since = match frame.header("since").map(str::parse::<i64>) {
            None => None,
            Some(Ok(since)) if since >= 0 => Some(since),
            Some(_) => {
                return Err(StompError::protocol(
                    "the since header must be a message id (a decimal number)",
                )
                .into());
            }
        };
        let listens = parse_subscription(&destination, self.identity.backend)?;
        if since.is_some() && !matches!(listens, Listens::Topic(_)) {
            return Err(StompError::protocol(
                "since on SUBSCRIBE resumes a /topic/ destination; resume your own messages with since on CONNECT",
            )
            .into());
        }
        let mut consumer = None;
        if let Listens::Queue(queue) = &listens {
            consumer = Some(self.consume_queue(queue, &id, ack, frame).await?);
        }
        if let Listens::Topic(topic) = &listens {
            if !self.identity.backend && !topic::allowed(&self.identity.topics, topic) {
                return Err(StompError::forbidden(format!(
                    "your token does not allow subscribing to {topic:?}"
                ))
                .into());
            }
            let head = match self.subscribe_topic(topic).await {
                Ok(head) => head,
                Err(error) => {
                    return Err(match error {
                        SubscribeError::TooMany(_) => StompError::forbidden(error.describe()),
                        SubscribeError::Unavailable => StompError::unavailable(error.describe()),
                    }
                    .into());
                }
            };
            if let Some(since) = since.filter(|since| *since < head) {
                // A resume: the subscription is in place first (so that
                // the backfill reaches its frames), then the topic's
                // stream after `since` goes before anything live.
                self.proto.subscriptions.by_id.insert(
                    id.clone(),
                    Subscription {
                        destination: destination.clone(),
                        listens: listens.clone(),
                        ack,
                        consumer: None,
                    },
                );
                let backfill = super::Backfill {
                    origin: super::Origin::Stream,
                    from: since,
                    head,
                };
                self.backfill(StreamKey::Topic(topic.clone()), backfill)
                    .await?;
                return Ok(());
            }
        }
        let user_messages = matches!(listens, Listens::User(_));
        let consumes = consumer.is_some();
        self.proto.subscriptions.by_id.insert(
            id,
            Subscription {
                destination,
                listens,
                ack,
                consumer,
            },
        );
        if consumes {
            // Room for a queue consumer: the claimer claims for it now.
            self.ctx.delivery.hub.queue_credit_freed();
        }
        if user_messages {
            // The first place user messages can go: the backfill runs now,
            // then what was held for a subscription like this one.
            self.run_pending_backfills().await?;
            let held: Vec<_> = self.proto.held.drain(..).collect();
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
        let (target, message_destination) =
            parse_send(destination, &self.user, self.identity.backend)?;
        let allowed = self.identity.backend
            || match &target {
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
        let draft = Draft {
            target,
            destination: message_destination,
            payload: Payload::Raw {
                bytes: frame.body.clone(),
                content_type: frame.header("content-type").map(str::to_owned),
            },
            ttl_secs: None,
            headers: application_headers(frame),
        };
        let message =
            parse::check(draft, &Rules::of(&self.ctx.settings)).map_err(
                |refusal| match refusal {
                    Refusal::HeadersTooLarge { .. } => StompError::protocol(refusal.to_string()),
                    Refusal::TooLarge { size, limit } => StompError::protocol(format!(
                        "the body is {size} bytes; the limit is {limit} (PGRELAY_MAX_MESSAGE_BYTES)"
                    )),
                    other => StompError::protocol(format!("the message was refused: {other}")),
                },
            )?;
        self.submit(message, Sent { receipt }).await?;
        Ok(())
    }

    /// Answers a SEND once its commit is known: a RECEIPT when asked for;
    /// an ERROR (which ends the session) when it was not stored, or may not
    /// have been.
    async fn stomp_sent(
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
        self.withdraw_in_flight();
        Err(self.stomp_fail(error, receipt.as_deref()).await)
    }
}

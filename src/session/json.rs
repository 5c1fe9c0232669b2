//! The JSON protocol's half of a session: `welcome`, the client's
//! `subscribe`, `unsubscribe`, `publish` and `ack` frames, and its own
//! state (the ids delivered and not yet acked, the bad frames it sent).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

// Tokio's clock: the same as the system's, except in tests that pause it.
use tokio::time::Instant;

use axum::extract::ws::Message;

use super::{Backfill, Exit, Half, Input, Item, Origin, Ready, Session, WsSink};
use crate::message::{Payload, StreamKey, Target};
use crate::protocol::Protocol;
use crate::protocol::json::{self, ClientFrame};
use crate::read::delivery_log::Record;
use crate::read::hub::Envelope;
use crate::topic;
use crate::write::enqueue::EnqueueError;
use crate::write::parse::{self, Draft, Refusal, Rules};

/// Bad frames tolerated per minute before the client is closed.
pub(super) const BAD_FRAMES_PER_MINUTE: usize = 10;
/// Delivered-but-unacked ids remembered per connection, to validate acks.
const UNACKED_REMEMBERED: usize = 10_000;

/// A JSON session's own state.
#[derive(Default)]
pub(super) struct Json {
    unacked: Unacked,
    bad_frames: VecDeque<Instant>,
}

/// A publish waiting for its commit: answered with `published`.
pub(super) struct Published {
    topic: Arc<str>,
}

impl Half for Json {
    const PROTOCOL: Protocol = Protocol::Json;
    type Reply = Published;

    async fn confirm<S: WsSink>(session: &mut Session<Self, S>) -> Result<(), Exit> {
        let welcome = json::welcome(
            &session.id.to_string(),
            session.ctx.node_id.as_str(),
            session.ctx.settings.heartbeat_interval.as_millis() as u64,
            session.user_cursor,
        );
        session.send(Message::Text(welcome.into())).await?;
        Box::pin(session.run_pending_backfills()).await
    }

    async fn input<S: WsSink>(session: &mut Session<Self, S>, input: Input) -> Result<(), Exit> {
        match input {
            Input::Text(text) => session.json_text(&text).await,
            Input::Binary(_) => {
                // Answered after the publishes before it, like any refusal.
                session.answer_in_flight().await?;
                session
                    .json_bad_frame("binary frames are not part of the pgrelay.v1 protocol")
                    .await
            }
        }
    }

    async fn answered<S: WsSink>(
        session: &mut Session<Self, S>,
        reply: Published,
        answer: Result<i64, EnqueueError>,
    ) -> Result<(), Exit> {
        session.json_published(&reply.topic, answer).await
    }

    async fn refuse<S: WsSink>(&self, _sink: &mut S, _reason: &str) {
        // The close frame carries the reason.
    }

    fn frames(&mut self, item: Item, _hold_at_most: usize) -> Option<Ready> {
        let frame = frame_of(&item.envelope);
        Some(Ready {
            ack_required: false,
            item,
            frames: vec![Message::Text(frame)],
        })
    }

    fn written(&mut self, message_id: i64) {
        self.unacked.insert(message_id);
    }

    fn counts_its_own_frames(&self) -> bool {
        false
    }

    fn heartbeat_in(&self) -> Option<Duration> {
        None
    }

    fn heartbeat_out(&self) -> Option<Duration> {
        None
    }
}

/// A message's frame: the same for every JSON session, so encoded once (by
/// the first session that writes it) and shared.
fn frame_of(envelope: &Envelope) -> axum::extract::ws::Utf8Bytes {
    envelope
        .json_frame
        .get_or_init(|| json::message(&envelope.message, json::To::of(&envelope.stream)).into())
        .clone()
}

impl<S: WsSink> Session<Json, S> {
    async fn json_text(&mut self, text: &str) -> Result<(), Exit> {
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(reason) => {
                self.answer_in_flight().await?;
                return self.json_bad_frame(&reason.0).await;
            }
        };
        // Publishes are answered in order, after their commit; acks answer
        // nothing when they succeed. Every other answer (and a refusal of
        // either) comes after the answers of the publishes before it: a
        // client matches them by order.
        if !matches!(frame, ClientFrame::Publish { .. } | ClientFrame::Ack { .. }) {
            self.answer_in_flight().await?;
        }
        match frame {
            ClientFrame::Ack { id } => {
                if self.proto.unacked.take(id.0) {
                    let record = Record::Acked {
                        message_id: id.0,
                        connection_id: self.id,
                        at: chrono::Utc::now(),
                        queue: None,
                    };
                    self.ctx.delivery.log.record(record).await;
                    Ok(())
                } else {
                    self.answer_in_flight().await?;
                    let detail = format!(
                        "message {} was not delivered on this connection, or is already acked",
                        id.0
                    );
                    self.json_error("unknown_message", &detail).await
                }
            }
            ClientFrame::Subscribe { topic, since } => {
                if let Err(reason) = topic::validate(&topic) {
                    return self.json_bad_frame(&reason.0).await;
                }
                if !topic::allowed(&self.identity.topics, &topic) {
                    let detail = format!("your token does not allow subscribing to {topic:?}");
                    return self.json_error("forbidden", &detail).await;
                }
                let name: Arc<str> = topic.as_str().into();
                let head = match self.subscribe_topic(&name).await {
                    Ok(head) => head,
                    Err(error) => {
                        return self.json_error("subscribe_failed", &error.describe()).await;
                    }
                };
                self.send(Message::Text(json::subscribed(&topic, head).into()))
                    .await?;
                if let Some(since) = since {
                    let backfill = Backfill {
                        origin: Origin::Stream,
                        from: since.0,
                        head,
                    };
                    self.backfill(StreamKey::Topic(name), backfill).await?;
                }
                Ok(())
            }
            ClientFrame::Ping => self.send(Message::Text(json::pong().into())).await,
            ClientFrame::Unsubscribe { topic } => {
                self.unsubscribe_topic(&topic).await;
                self.send(Message::Text(
                    json::topic_frame("unsubscribed", &topic, None).into(),
                ))
                .await
            }
            ClientFrame::Publish { topic, data } => {
                if let Err(reason) = topic::validate(&topic) {
                    self.answer_in_flight().await?;
                    return self.json_bad_frame(&reason.0).await;
                }
                if !topic::allowed(&self.identity.publish, &topic) {
                    self.answer_in_flight().await?;
                    let detail = format!("your token does not allow publishing to {topic:?}");
                    return self.json_error("forbidden", &detail).await;
                }
                let draft = Draft {
                    target: Target::Topic(topic.clone()),
                    destination: None,
                    payload: Payload::Json(Arc::from(data)),
                    ttl_secs: None,
                    headers: Vec::new(),
                };
                let message = match parse::check(draft, &Rules::of(&self.ctx.settings)) {
                    Ok(message) => message,
                    Err(refusal) => {
                        self.answer_in_flight().await?;
                        return match refusal {
                            Refusal::TooLarge { .. } => {
                                self.json_error("too_large", &refusal.to_string()).await
                            }
                            _ => self.json_bad_frame(&refusal.to_string()).await,
                        };
                    }
                };
                let topic: Arc<str> = topic.as_str().into();
                self.submit(message, Published { topic }).await
            }
        }
    }

    /// Answers a publish once its commit is known.
    async fn json_published(
        &mut self,
        topic: &str,
        answer: Result<i64, EnqueueError>,
    ) -> Result<(), Exit> {
        match answer {
            Ok(id) => {
                self.send(Message::Text(
                    json::topic_frame("published", topic, Some(id)).into(),
                ))
                .await
            }
            Err(EnqueueError::OutcomeUnknown(_)) => {
                self.json_error(
                    "outcome_unknown",
                    "the message may or may not have been published: the database's answer was lost",
                )
                .await
            }
            Err(
                error @ (EnqueueError::Unavailable(_)
                | EnqueueError::Busy
                | EnqueueError::Conflict(_)),
            ) => {
                self.json_error("unavailable", &format!("nothing was published: {error}"))
                    .await
            }
            Err(error) => self.json_error("publish_failed", &error.to_string()).await,
        }
    }

    /// Answers a bad frame with an `error` frame; too many in a minute close
    /// the connection.
    async fn json_bad_frame(&mut self, reason: &str) -> Result<(), Exit> {
        let now = Instant::now();
        let bad_frames = &mut self.proto.bad_frames;
        while bad_frames
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            bad_frames.pop_front();
        }
        bad_frames.push_back(now);
        let too_many = bad_frames.len() > BAD_FRAMES_PER_MINUTE;
        self.json_error("bad_frame", reason).await?;
        if too_many {
            return Err(Exit::close(1008, "too many bad frames"));
        }
        Ok(())
    }

    async fn json_error(&mut self, code: &str, message: &str) -> Result<(), Exit> {
        self.send(Message::Text(json::error(code, message).into()))
            .await
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

//! The JSON protocol's half of a session: `welcome`, and the client's
//! `subscribe`, `unsubscribe`, `publish` and `ack` frames.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Message;

use super::{Backfill, Exit, Origin, Reply, Session};
use crate::deliveries::Record;
use crate::message::{NewMessage, Payload, StreamKey, Target};
use crate::protocol::json::{self, ClientFrame};
use crate::router::EnqueueError;
use crate::topic;

impl Session {
    pub(super) async fn json_welcome(&mut self) -> Result<(), Exit> {
        let welcome = json::welcome(
            &self.id.to_string(),
            self.ctx.node_id.as_str(),
            self.ctx.settings.heartbeat_interval.as_millis() as u64,
        );
        self.send(Message::Text(welcome.into())).await
    }

    pub(super) async fn json_text(&mut self, text: &str) -> Result<(), Exit> {
        let frame = match ClientFrame::decode(text) {
            Ok(frame) => frame,
            Err(reason) => {
                self.answer_in_flight().await?;
                return self.json_bad_frame(&reason).await;
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
                if self.unacked.take(id.0) {
                    let record = Record::Acked {
                        message_id: id.0,
                        connection_id: self.id,
                        at: chrono::Utc::now(),
                    };
                    self.ctx.deliveries.record(record).await;
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
                    return self.json_bad_frame(&reason).await;
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
                self.send(Message::Text(
                    json::topic_frame("subscribed", &topic, None).into(),
                ))
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
                    return self.json_bad_frame(&reason).await;
                }
                if !topic::allowed(&self.identity.publish, &topic) {
                    self.answer_in_flight().await?;
                    let detail = format!("your token does not allow publishing to {topic:?}");
                    return self.json_error("forbidden", &detail).await;
                }
                if data.get().len() > self.ctx.settings.max_message_bytes {
                    self.answer_in_flight().await?;
                    return self
                        .json_error("too_large", "`data` is over the message size limit")
                        .await;
                }
                if let Err(reason) = crate::message::check_json_depth(&data) {
                    self.answer_in_flight().await?;
                    return self.json_bad_frame(&reason).await;
                }
                let message = NewMessage {
                    target: Target::Topic(topic.clone()),
                    destination: None,
                    payload: Payload::Json(Arc::from(data)),
                    ttl_secs: None,
                };
                let topic: Arc<str> = topic.as_str().into();
                self.submit(message, Reply::Published { topic }).await
            }
        }
    }

    /// Answers a publish once its commit is known.
    pub(super) async fn json_published(
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
    pub(super) async fn json_bad_frame(&mut self, reason: &str) -> Result<(), Exit> {
        let now = Instant::now();
        while self
            .bad_frames
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.bad_frames.pop_front();
        }
        self.bad_frames.push_back(now);
        self.json_error("bad_frame", reason).await?;
        if self.bad_frames.len() > super::BAD_FRAMES_PER_MINUTE {
            return Err(Exit::close(1008, "too many bad frames"));
        }
        Ok(())
    }

    async fn json_error(&mut self, code: &str, message: &str) -> Result<(), Exit> {
        self.send(Message::Text(json::error(code, message).into()))
            .await
    }
}

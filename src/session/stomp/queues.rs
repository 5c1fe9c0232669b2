//! A backend session's queue subscriptions: the consumer is registered
//! (fenced, under a key of its own), then joins the hub with its prefetch,
//! so that the claimer may claim the queue's messages for it. Unlike a
//! topic subscription it need not be in the hub before its row commits:
//! queue messages wait in their queue, they are not routed. It leaves the
//! hub first, and what it held unacked waits in the queue again (the
//! delivery log's `LeftQueue`).

use std::sync::Arc;

use uuid::Uuid;

use super::subscriptions::{AckMode, Consumer};
use super::{Stomp, StompError};
use crate::protocol::stomp::Frame;
use crate::read::delivery_log::Record;
use crate::registry::subscriptions::{self, QueueConsumer, SubscribeFailure};
use crate::session::{Session, WsSink};

/// Messages a queue consumer may hold at once (written and not yet acked,
/// or for ack `auto` not yet written) unless its SUBSCRIBE says otherwise
/// with `prefetch-count`, as RabbitMQ's STOMP plugin reads it.
pub(super) const DEFAULT_PREFETCH: usize = 100;
/// The most a `prefetch-count` may ask for.
pub(super) const MAX_PREFETCH: usize = 1000;

impl<S: WsSink> Session<Stomp, S> {
    /// Makes subscription `id` a consumer of `queue`.
    pub(super) async fn consume_queue(
        &mut self,
        queue: &Arc<str>,
        id: &str,
        ack: AckMode,
        frame: &Frame,
    ) -> Result<Consumer, StompError> {
        let prefetch = match frame.header("prefetch-count").map(str::parse::<usize>) {
            None => DEFAULT_PREFETCH,
            Some(Ok(n)) if (1..=MAX_PREFETCH).contains(&n) => n,
            Some(_) => {
                return Err(StompError::protocol(format!(
                    "prefetch-count must be a number from 1 to {MAX_PREFETCH}"
                )));
            }
        };
        let limit = self.ctx.settings.limits.max_subscriptions;
        if self.proto.subscriptions.by_id.len() >= limit {
            return Err(StompError::forbidden(format!(
                "a connection may hold at most {limit} subscriptions"
            )));
        }
        // The STOMP id, made unique: a client may reuse an id, and what the
        // old consumer held must not be taken for the new one's.
        let key: Arc<str> = format!("{id}/{}", Uuid::now_v7()).into();
        let incarnation = self.ctx.incarnation();
        let consumer = QueueConsumer {
            connection: self.id,
            subscription: &key,
            queue,
            ack_mode: ack.as_str(),
        };
        let attached = subscriptions::attach_consumer(
            &self.ctx.db.pool,
            &consumer,
            &self.ctx.node_id,
            incarnation,
            self.ctx.settings.idle_transaction_timeout(),
        )
        .await;
        if let Err(failure) = attached {
            tracing::warn!(error = %failure, %queue, "could not register a queue consumer");
            match failure {
                SubscribeFailure::Fenced => {
                    self.ctx.lifecycle.registration.report_fenced(incarnation);
                }
                // The row may exist: it goes (with the connection's
                // departure at the latest).
                SubscribeFailure::Unknown(_) => self.forget_consumer(key).await,
                SubscribeFailure::NotRegistered(_) => {}
            }
            return Err(StompError::unavailable(
                "the subscription could not be registered now; try again",
            ));
        }
        let subscription: Arc<str> = id.into();
        let auto = ack == AckMode::Auto;
        let hub = &self.ctx.delivery.hub;
        let Some(credit) = hub.add_consumer(self.id, queue, (&subscription, &key), auto, prefetch)
        else {
            self.forget_consumer(key).await;
            return Err(StompError::unavailable("the connection is closing"));
        };
        Ok(Consumer { key, credit })
    }

    /// Ends subscription `id`'s consumption of its queue.
    pub(super) async fn leave_queue(&mut self, id: &str, consumer: Consumer) {
        self.ctx.delivery.hub.remove_consumers(self.id, Some(id));
        self.proto.subscriptions.forget(id);
        self.forget_consumer(consumer.key).await;
    }

    /// Removes consumer `key`'s row; what it held waits in its queue again.
    async fn forget_consumer(&mut self, key: Arc<str>) {
        let record = Record::LeftQueue {
            connection_id: self.id,
            subscription: key,
        };
        self.ctx.delivery.log.record(record).await;
    }
}

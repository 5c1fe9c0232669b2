//! A backend session's queue subscriptions: the consumer joins the hub
//! (with its prefetch) and then the registry, so that the claimer may claim
//! the queue's messages for it; it leaves the hub first, and what it held
//! unacked waits in the queue again (the delivery log's `LeftQueue`).

use std::sync::Arc;

use super::subscriptions::AckMode;
use super::{Stomp, StompError};
use crate::protocol::stomp::Frame;
use crate::read::delivery_log::Record;
use crate::read::hub::Credit;
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
    ) -> Result<Arc<Credit>, StompError> {
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
        let hub = &self.ctx.delivery.hub;
        let subscription: Arc<str> = id.into();
        let credit = hub
            .add_consumer(
                self.id,
                queue,
                &subscription,
                ack == AckMode::Auto,
                prefetch,
            )
            .ok_or_else(|| StompError::unavailable("the connection is closing"))?;
        let incarnation = self.ctx.incarnation();
        let consumer = QueueConsumer {
            connection: self.id,
            subscription: id,
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
        match attached {
            Ok(()) => Ok(credit),
            Err(failure) => {
                hub.remove_consumers(self.id, Some(id));
                tracing::warn!(error = %failure, %queue, "could not register a queue consumer");
                match failure {
                    SubscribeFailure::Fenced => {
                        self.ctx.lifecycle.registration.report_fenced(incarnation);
                    }
                    // The row may exist: it goes (and with the connection's
                    // departure at the latest).
                    SubscribeFailure::Unknown(_) => {
                        let record = Record::LeftQueue {
                            connection_id: self.id,
                            subscription,
                        };
                        self.ctx.delivery.log.record(record).await;
                    }
                    SubscribeFailure::NotRegistered(_) => {}
                }
                Err(StompError::unavailable(
                    "the subscription could not be registered now; try again",
                ))
            }
        }
    }

    /// Ends subscription `id`'s consumption of its queue.
    pub(super) async fn leave_queue(&mut self, id: &str) {
        self.ctx.delivery.hub.remove_consumers(self.id, Some(id));
        self.proto.subscriptions.forget(id);
        let record = Record::LeftQueue {
            connection_id: self.id,
            subscription: id.into(),
        };
        self.ctx.delivery.log.record(record).await;
    }
}

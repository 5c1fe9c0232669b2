//! A session's topic subscriptions: in the hub first, then in the registry
//! (under the topic's stream lock), so that no message of the topic falls
//! between them.

use std::sync::Arc;

use super::{Half, Session, WsSink};
use crate::db;
use crate::registry::subscriptions::{self, SubscribeFailure};

/// Why a subscription was refused.
pub(super) enum SubscribeError {
    TooMany(usize),
    Unavailable,
}

impl SubscribeError {
    pub(super) fn describe(&self) -> String {
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

impl<P: Half, S: WsSink> Session<P, S> {
    /// Subscribes this connection to `topic`. Returns the topic's head:
    /// messages after it arrive live.
    pub(super) async fn subscribe_topic(
        &mut self,
        topic: &Arc<str>,
    ) -> Result<i64, SubscribeError> {
        if let Some(cursor) = self.topics.get(topic) {
            return Ok(*cursor);
        }
        let limit = self.ctx.settings.limits.max_subscriptions;
        if self.topics.len() >= limit {
            return Err(SubscribeError::TooMany(limit));
        }
        self.ctx.delivery.hub.subscribe(self.id, topic);
        let incarnation = self.ctx.incarnation();
        let attached = subscriptions::attach(
            &self.ctx.db.pool,
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
                self.ctx.delivery.hub.unsubscribe(self.id, topic);
                tracing::warn!(error = %failure, %topic, "could not register a subscription");
                match failure {
                    SubscribeFailure::Fenced => {
                        self.ctx.lifecycle.registration.report_fenced(incarnation);
                    }
                    // The row may exist: it is removed (or goes with the
                    // connection's); topic messages routed to it meanwhile
                    // find no subscriber here.
                    SubscribeFailure::Unknown(_) => {
                        let detached = subscriptions::detach(&self.ctx.db.pool, self.id, topic);
                        let _ = db::bounded(detached).await;
                    }
                    SubscribeFailure::NotRegistered(_) => {}
                }
                Err(SubscribeError::Unavailable)
            }
        }
    }

    pub(super) async fn unsubscribe_topic(&mut self, topic: &str) {
        if self.topics.remove(topic).is_none() {
            return;
        }
        self.ctx.delivery.hub.unsubscribe(self.id, topic);
        let detached = subscriptions::detach(&self.ctx.db.pool, self.id, topic);
        if let Err(error) = db::bounded(detached).await {
            // Harmless: the row goes with the connection's, and what is routed
            // here meanwhile is dropped (no cursor for the topic).
            tracing::warn!(%error, %topic, "could not remove a subscription row");
        }
    }
}

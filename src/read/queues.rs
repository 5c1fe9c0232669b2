//! Queue messages on their way to this node's consumers: each waits in
//! `relay.queue_entries` until one consumer, on whichever node claims it
//! first, takes it (competing consumers).
//!
//! A claim first reserves room in its local consumers' mailboxes (up to
//! their prefetch), then takes as many of the oldest waiting entries of the
//! queue with `FOR UPDATE SKIP LOCKED` (another node's claim of the same
//! queue takes the next ones), marks each with the consumer it goes to, in
//! turn, in one transaction fenced by the node's incarnation, and only once
//! that has committed hands them over through the reserved room. So what a
//! session holds of a queue is always marked as held in the database, and
//! a claim that fails hands over nothing. What then becomes of an entry is the delivery log's: gone
//! once written (ack `auto`) or acked, waiting again after a NACK, an
//! UNSUBSCRIBE, a departure, or the reap of its node. An entry a consumer
//! NACKed goes to another consumer when there is one.

use std::sync::Arc;

use uuid::Uuid;

use super::hub::{Demand, Envelope, QueueClaim, QueueSlot};
use crate::db::{self, Bounds, WorkError};
use crate::message::{MessageRow, StoredMessage, StreamKey};
use crate::state::NodeState;

/// Most entries one claim takes.
pub const QUEUE_CLAIM_BATCH: usize = 256;

/// What one pass over the node's queues did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    /// Queue messages handed to a consumer.
    pub handed_over: usize,
    /// A claim took as many as it asked for: more may wait.
    pub more: bool,
}

/// Most queues one pass claims from: the rest (chosen at random each
/// pass, so that none starves) wait for the next, which follows at once.
pub const QUEUES_PER_PASS: usize = 32;

/// Claims, for every queue with a local consumer that has room, what waits
/// in it. One query first finds which of them have anything waiting: a
/// node with many idle consumers (Spring's per-session queues) pays one
/// round trip per pass, not one per queue.
pub async fn dispatch_once(ctx: &NodeState) -> Result<Dispatched, WorkError> {
    let mut demand = ctx.delivery.hub.queue_demand();
    if demand.is_empty() {
        return Ok(Dispatched::default());
    }
    let names: Vec<String> = demand.iter().map(|(queue, _)| queue.to_string()).collect();
    let waiting: std::collections::HashSet<String> = db::bounded(async {
        let mut scope = db::scope(&ctx.db.bookkeeping).await?;
        let waiting = sqlx::query_scalar!(
            r#"
            SELECT q.queue AS "queue!"
              FROM unnest($1::text[]) AS q(queue)
             WHERE EXISTS (SELECT 1 FROM relay.queue_entries e
                            WHERE e.queue = q.queue AND e.connection_id IS NULL AND e.expires_at > now())
            "#,
            &names,
        )
        .fetch_all(&mut *scope)
        .await?;
        scope.end().await?;
        Ok::<_, sqlx::Error>(waiting)
    })
    .await?
    .into_iter()
    .collect();
    demand.retain(|(queue, _)| waiting.contains(&**queue));
    let mut total = Dispatched::default();
    if demand.len() > QUEUES_PER_PASS {
        use rand::seq::SliceRandom;
        demand.shuffle(&mut rand::rng());
        demand.truncate(QUEUES_PER_PASS);
        total.more = true;
    }
    for (queue, consumers) in demand {
        let claimed = claim_queue(ctx, &queue, consumers).await?;
        total.handed_over += claimed.handed_over;
        total.more |= claimed.more;
    }
    Ok(total)
}

/// A waiting entry as the claim reads it.
struct Waiting {
    message: Arc<StoredMessage>,
    refused_by: Option<Uuid>,
    redelivered: bool,
}

async fn claim_queue(
    ctx: &NodeState,
    queue: &Arc<str>,
    mut consumers: Vec<Demand>,
) -> Result<Dispatched, WorkError> {
    // Room first: at most what the consumers may hold, and what their
    // mailboxes can take now.
    let mut room = QUEUE_CLAIM_BATCH;
    let mut slots: Vec<Vec<QueueSlot>> = Vec::with_capacity(consumers.len());
    for consumer in &mut consumers {
        let reserved = ctx.delivery.hub.reserve_queue(
            consumer.connection,
            queue,
            &consumer.subscription,
            consumer.free.min(room),
        );
        room -= reserved.len();
        consumer.free = reserved.len();
        slots.push(reserved);
    }
    let wanted = QUEUE_CLAIM_BATCH - room;
    if wanted == 0 {
        return Ok(Dispatched::default());
    }
    let incarnation = ctx.lifecycle.registration.current();
    let bounds = Bounds::claim(ctx.settings.idle_transaction_timeout());
    let local: Vec<Uuid> = consumers.iter().map(|c| c.connection).collect();
    let mut tx = db::begin_bounded(&ctx.db.bookkeeping, bounds).await?;
    // The node's row is locked first (as the reaper locks it), then the
    // entries. An entry NACKed by one of these consumers is skipped when
    // another consumer, here or elsewhere, can take it instead.
    let rows = sqlx::query!(
        r#"
        WITH alive AS (
            SELECT true FROM relay.nodes WHERE id = $1 AND incarnation = $2 FOR KEY SHARE
        )
        SELECT a.alive AS "alive!", e.message_id AS "message_id?", e.deliveries AS "deliveries?",
               e.refused_by AS "refused_by?", m.id AS "id?", m.destination AS "destination?",
               m.data::text AS "data?", m.body AS "body?", m.content_type AS "content_type?",
               m.headers::text AS "headers?", m.created_at AS "created_at?"
          FROM (SELECT EXISTS (SELECT 1 FROM alive) AS alive) a
          LEFT JOIN LATERAL (
                SELECT x.message_id, x.deliveries, x.refused_by
                  FROM relay.queue_entries x
                 WHERE a.alive AND x.queue = $3 AND x.connection_id IS NULL AND x.expires_at > now()
                   AND (x.refused_by IS NULL OR x.refused_by <> ALL ($5::uuid[])
                        OR (SELECT count(DISTINCT l) FROM unnest($5::uuid[]) AS l) > 1
                        OR NOT EXISTS (SELECT 1 FROM relay.queue_consumers c
                                        WHERE c.queue = x.queue AND c.connection_id <> x.refused_by))
                 ORDER BY x.message_id
                 LIMIT $4
                   FOR UPDATE SKIP LOCKED) e ON true
          LEFT JOIN relay.messages m ON m.id = e.message_id
         ORDER BY e.message_id
        "#,
        ctx.node_id.as_str(),
        incarnation,
        &**queue,
        wanted as i64,
        &local,
    )
    .fetch_all(&mut *tx)
    .await?;
    if !rows.first().is_some_and(|r| r.alive) {
        ctx.lifecycle.registration.report_fenced(incarnation);
        return Err(WorkError::Fenced);
    }
    let waiting: Vec<Waiting> = rows
        .into_iter()
        .filter_map(|r| {
            let (Some(id), Some(created_at)) = (r.id, r.created_at) else {
                return None; // an empty claim, or a message retention removed
            };
            Some(Waiting {
                message: StoredMessage::from_row(MessageRow {
                    id,
                    destination: r.destination,
                    data: r.data,
                    body: r.body,
                    content_type: r.content_type,
                    created_at,
                    target_connection: None,
                    headers: r.headers,
                }),
                refused_by: r.refused_by,
                redelivered: r.deliveries.unwrap_or(0) > 0,
            })
        })
        .collect();

    let (mut messages, mut connections, mut subscriptions) = (Vec::new(), Vec::new(), Vec::new());
    let mut handovers = Vec::new();
    let mut next = 0;
    for entry in waiting {
        let Some(index) = pick(&consumers, next, entry.refused_by) else {
            continue; // left waiting, for a consumer with room
        };
        next = index + 1;
        let Some(slot) = slots[index].pop() else {
            continue;
        };
        let consumer = &mut consumers[index];
        consumer.free -= 1;
        let envelope = Arc::new(Envelope {
            queue: Some(QueueClaim {
                subscription: consumer.subscription.clone(),
                auto: consumer.auto,
                redelivered: entry.redelivered,
            }),
            ..Envelope::new(entry.message, StreamKey::Queue(queue.clone()))
        });
        messages.push(envelope.message.id);
        connections.push(consumer.connection);
        subscriptions.push(consumer.key.to_string());
        handovers.push((slot, envelope));
    }
    if !messages.is_empty() {
        sqlx::query!(
            r#"
            UPDATE relay.queue_entries e
               SET connection_id = a.connection_id, subscription = a.subscription, node_id = $2,
                   claimed_at = now(), deliveries = e.deliveries + 1, refused_by = NULL
              FROM unnest($3::bigint[], $4::uuid[], $5::text[]) AS a(message_id, connection_id, subscription)
             WHERE e.queue = $1 AND e.message_id = a.message_id
            "#,
            &**queue,
            ctx.node_id.as_str(),
            &messages,
            &connections,
            &subscriptions,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    // Committed: each goes to the room reserved for it (a session that has
    // gone meanwhile has departed, and what it was marked with waits again:
    // its departure, or the sweeper's pass over orphans, puts it back).
    for (slot, envelope) in handovers {
        slot.send(envelope);
    }
    // More may wait only when every reserved place was filled (entries
    // taken and left for a consumer with room do not count).
    Ok(Dispatched {
        handed_over: messages.len(),
        more: messages.len() == wanted,
    })
}

/// The consumer an entry goes to: the next one in turn from `from` with
/// room, on another connection than the one that NACKed it; on that one
/// only when no other connection consumes here (the claim took the entry,
/// so then none consumes the queue anywhere).
fn pick(consumers: &[Demand], from: usize, refused_by: Option<Uuid>) -> Option<usize> {
    let n = consumers.len();
    let in_turn = (0..n).map(|k| (from + k) % n);
    let mut fallback = None;
    for index in in_turn {
        let consumer = &consumers[index];
        if consumer.free == 0 {
            continue;
        }
        if Some(consumer.connection) == refused_by {
            fallback.get_or_insert(index);
            continue;
        }
        return Some(index);
    }
    let alone = consumers.iter().all(|c| Some(c.connection) == refused_by);
    fallback.filter(|_| alone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(free: usize) -> Demand {
        Demand {
            connection: Uuid::now_v7(),
            subscription: "s".into(),
            key: "s/1".into(),
            auto: true,
            free,
        }
    }

    #[test]
    fn entries_go_round_in_turn_and_avoid_who_refused_them() {
        let consumers = vec![demand(2), demand(0), demand(1)];
        assert_eq!(pick(&consumers, 0, None), Some(0));
        assert_eq!(pick(&consumers, 1, None), Some(2));
        assert_eq!(pick(&consumers, 3, None), Some(0));
        let refuser = consumers[0].connection;
        assert_eq!(pick(&consumers, 0, Some(refuser)), Some(2));
        // Only the refuser has room, but another consumer exists: it waits.
        let busy = vec![demand(1), demand(0)];
        assert_eq!(pick(&busy, 0, Some(busy[0].connection)), None);
        // The refuser is the only consumer: it gets it again.
        let alone = vec![demand(1)];
        assert_eq!(pick(&alone, 0, Some(alone[0].connection)), Some(0));
        // Two subscriptions of the refusing connection, and nobody else.
        let mut twice = vec![demand(1), demand(1)];
        twice[1].connection = twice[0].connection;
        assert_eq!(pick(&twice, 0, Some(twice[0].connection)), Some(0));
    }
}

//! What one delivery-log batch does to queues: see [`QueueChanges`].

use uuid::Uuid;

/// What a batch does to queue entries and consumers: entries settled
/// (written with ack `auto`, or acked) go; entries NACKed, and those held by
/// consumers that unsubscribed or departed, wait again.
#[derive(Default)]
pub(super) struct QueueChanges {
    pub(super) settled_queues: Vec<String>,
    pub(super) settled_messages: Vec<i64>,
    pub(super) settled_connections: Vec<Uuid>,
    pub(super) nacked_queues: Vec<String>,
    pub(super) nacked_messages: Vec<i64>,
    pub(super) nacked_connections: Vec<Uuid>,
    pub(super) left_connections: Vec<Uuid>,
    pub(super) left_subscriptions: Vec<String>,
}

impl QueueChanges {
    pub(super) fn settle(&mut self, queue: &str, message: i64, connection: Uuid) {
        self.settled_queues.push(queue.to_owned());
        self.settled_messages.push(message);
        self.settled_connections.push(connection);
    }

    pub(super) fn nack(&mut self, queue: &str, message: i64, connection: Uuid) {
        self.nacked_queues.push(queue.to_owned());
        self.nacked_messages.push(message);
        self.nacked_connections.push(connection);
    }

    /// Whether it puts entries back (which only a node still registered
    /// may do: a reaped node's were put back by whoever reaped it).
    pub(super) fn releases(&self) -> bool {
        !self.nacked_messages.is_empty() || !self.left_connections.is_empty()
    }

    /// In order: what was settled goes first, so that a message written
    /// just before its consumer left is not put back.
    pub(super) async fn apply(
        self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        alive: bool,
        departed: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        if !self.settled_messages.is_empty() {
            sqlx::query!(
                r#"
                DELETE FROM relay.queue_entries e
                 USING unnest($1::text[], $2::bigint[], $3::uuid[]) AS a(queue, message_id, connection_id)
                 WHERE e.queue = a.queue AND e.message_id = a.message_id AND e.connection_id = a.connection_id
                "#,
                &self.settled_queues,
                &self.settled_messages,
                &self.settled_connections,
            )
            .execute(&mut **tx)
            .await?;
        }
        if !alive {
            return Ok(());
        }
        if !self.nacked_messages.is_empty() {
            sqlx::query!(
                r#"
                WITH nacked AS (
                    UPDATE relay.queue_entries e
                       SET connection_id = NULL, subscription = NULL, node_id = NULL, claimed_at = NULL,
                           refused_by = a.connection_id
                      FROM unnest($1::text[], $2::bigint[], $3::uuid[]) AS a(queue, message_id, connection_id)
                     WHERE e.queue = a.queue AND e.message_id = a.message_id
                       AND e.connection_id = a.connection_id
                    RETURNING e.queue
                )
                SELECT relay.wake_queue_consumers(ARRAY(SELECT DISTINCT queue FROM nacked)) AS "woken"
                "#,
                &self.nacked_queues,
                &self.nacked_messages,
                &self.nacked_connections,
            )
            .fetch_one(&mut **tx)
            .await?;
        }
        if !self.left_connections.is_empty() || !departed.is_empty() {
            sqlx::query!(
                r#"
                WITH leaving AS (
                    SELECT c.connection_id, c.subscription, c.queue
                      FROM relay.queue_consumers c
                      JOIN unnest($1::uuid[], $2::text[]) AS a(connection_id, subscription)
                        ON c.connection_id = a.connection_id AND c.subscription = a.subscription
                    UNION ALL
                    SELECT c.connection_id, c.subscription, c.queue
                      FROM relay.queue_consumers c
                     WHERE c.connection_id = ANY ($3::uuid[])
                ), released AS (
                    UPDATE relay.queue_entries e
                       SET connection_id = NULL, subscription = NULL, node_id = NULL, claimed_at = NULL
                      FROM leaving l
                     WHERE e.connection_id = l.connection_id AND e.subscription = l.subscription
                    RETURNING e.queue
                ), gone AS (
                    DELETE FROM relay.queue_consumers c
                     USING leaving l
                     WHERE c.connection_id = l.connection_id AND c.subscription = l.subscription
                    RETURNING 1
                )
                SELECT relay.wake_queue_consumers(ARRAY(SELECT DISTINCT queue FROM released)) AS "woken",
                       (SELECT count(*) FROM gone) AS "gone!"
                "#,
                &self.left_connections,
                &self.left_subscriptions,
                departed,
            )
            .fetch_one(&mut **tx)
            .await?;
        }
        Ok(())
    }
}

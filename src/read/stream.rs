//! Reading streams back: what a connecting, resuming or lagging client gets
//! from the database rather than from the outbox. Every read is bounded by a
//! stream head read under (or after) the stream lock, so it never passes a
//! message that is still in flight.

use std::sync::Arc;

use sqlx::PgPool;
use uuid::Uuid;

use crate::message::{MessageRow, StoredMessage};

/// Messages read per page.
pub const PAGE: i64 = 256;

/// The id of the newest message committed to `stream` (0 if none).
pub async fn head(pool: &PgPool, stream: &str) -> Result<i64, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let head = sqlx::query_scalar!("SELECT head FROM relay.streams WHERE stream = $1", stream)
        .fetch_optional(&mut *scope)
        .await?;
    scope.end().await?;
    Ok(head.unwrap_or(0))
}

/// One page of the stream keyed `stream` (see `StreamKey::key`) after
/// `after`, up to `head`, in id order: unexpired messages, without those
/// addressed to other connections.
pub async fn page(
    pool: &PgPool,
    stream: &str,
    after: i64,
    head: i64,
    connection: Uuid,
) -> Result<Vec<Arc<StoredMessage>>, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let rows = sqlx::query!(
        r#"
        SELECT x.id AS "id!", x.destination, x.data, x.body, x.content_type, x.created_at AS "created_at!",
               x.target_connection, x.headers
          FROM (SELECT m.id, m.destination, m.data::text AS data, m.body, m.content_type, m.created_at,
                       m.target_connection, m.headers::text AS headers
                  FROM relay.messages m
                 WHERE m.stream = $1 AND m.id > $2 AND m.id <= $3 AND m.expires_at > now()
                   AND (m.target_connection IS NULL OR m.target_connection = $4)
                UNION ALL
                SELECT m.id, m.destination, m.data::text, m.body, m.content_type, m.created_at,
                       m.target_connection, m.headers::text
                  FROM relay.message_streams s
                  JOIN relay.messages m ON m.id = s.message_id
                 WHERE s.stream = $1 AND s.message_id > $2 AND s.message_id <= $3
                   AND m.expires_at > now()) x
         ORDER BY x.id
         LIMIT $5
        "#,
        stream,
        after,
        head,
        connection,
        PAGE,
    )
    .fetch_all(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            StoredMessage::from_row(MessageRow {
                id: r.id,
                destination: r.destination,
                data: r.data,
                body: r.body,
                content_type: r.content_type,
                created_at: r.created_at,
                target_connection: r.target_connection,
                headers: r.headers,
            })
        })
        .collect())
}

/// One page of the messages parked for `user_id` after `after`, up to
/// `head`, in id order.
pub async fn parked_page(
    pool: &PgPool,
    user_id: &str,
    after: i64,
    head: i64,
) -> Result<Vec<Arc<StoredMessage>>, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let rows = sqlx::query!(
        r#"
        SELECT m.id, m.destination, m.data::text AS data, m.body, m.content_type, m.created_at,
               m.target_connection, m.headers::text AS headers
          FROM relay.outbox o
          JOIN relay.messages m ON m.id = o.message_id
         WHERE o.node_id IS NULL AND o.user_id = $1 AND o.message_id > $2 AND o.message_id <= $3
           AND m.expires_at > now()
           -- A copy parked while another socket of the user was being written
           -- the message (the departure could not see that delivery yet) is
           -- stale: not sent again. A delivery that awaited an ack it never
           -- got (STOMP `client` modes) does not count.
           AND NOT EXISTS (SELECT 1 FROM relay.deliveries d
                            WHERE d.message_id = o.message_id AND d.user_id = o.user_id
                              AND (NOT d.ack_required OR d.acked_at IS NOT NULL))
         ORDER BY o.message_id
         LIMIT $4
        "#,
        user_id,
        after,
        head,
        PAGE,
    )
    .fetch_all(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            StoredMessage::from_row(MessageRow {
                id: r.id,
                destination: r.destination,
                data: r.data,
                body: r.body,
                content_type: r.content_type,
                created_at: r.created_at,
                target_connection: r.target_connection,
                headers: r.headers,
            })
        })
        .collect())
}

//! The delivery log: every message written to a socket becomes a row in
//! `relay.deliveries`, and every client ack sets its `acked_at`. Sessions hand
//! their records to one writer per node, which stores them in batches: one
//! transaction for many deliveries instead of one each.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::NodeId;

/// Records taken per transaction.
const BATCH: usize = 4096;
/// Records that may wait for the writer before sessions wait for it in turn.
const QUEUE: usize = 65536;

#[derive(Debug)]
pub enum Record {
    Delivered {
        message_id: i64,
        connection_id: Uuid,
        user_id: Arc<str>,
        at: DateTime<Utc>,
        /// The message came from the user's parked work: remove it from there.
        unpark: bool,
    },
    Acked {
        message_id: i64,
        connection_id: Uuid,
        at: DateTime<Utc>,
    },
}

/// The sessions' side of the delivery log.
#[derive(Clone)]
pub struct DeliveryLog {
    records: mpsc::Sender<Record>,
}

impl DeliveryLog {
    pub fn new() -> (Self, mpsc::Receiver<Record>) {
        let (records, rx) = mpsc::channel(QUEUE);
        (Self { records }, rx)
    }

    /// Queues a record. Waits when the writer is far behind (the database is
    /// slow or down): sessions then slow down rather than forget deliveries.
    pub async fn record(&self, record: Record) {
        // Fails only once the writer has stopped, at the very end of shutdown.
        let _ = self.records.send(record).await;
    }
}

/// Writes one batch in one transaction: deliveries before acks, so an ack
/// that follows its delivery in the queue always finds the row.
pub async fn write_batch(
    pool: &PgPool,
    node_id: &NodeId,
    batch: &[Record],
) -> Result<(), sqlx::Error> {
    let mut delivered_messages = Vec::new();
    let mut delivered_connections = Vec::new();
    let mut delivered_users = Vec::new();
    let mut delivered_at = Vec::new();
    let mut unparked_messages = Vec::new();
    let mut unparked_users = Vec::new();
    let mut acked_messages = Vec::new();
    let mut acked_connections = Vec::new();
    let mut acked_at = Vec::new();
    for record in batch {
        match record {
            Record::Delivered {
                message_id,
                connection_id,
                user_id,
                at,
                unpark,
            } => {
                delivered_messages.push(*message_id);
                delivered_connections.push(*connection_id);
                delivered_users.push(user_id.to_string());
                delivered_at.push(*at);
                if *unpark {
                    unparked_messages.push(*message_id);
                    unparked_users.push(user_id.to_string());
                }
            }
            Record::Acked {
                message_id,
                connection_id,
                at,
            } => {
                acked_messages.push(*message_id);
                acked_connections.push(*connection_id);
                acked_at.push(*at);
            }
        }
    }
    // On the bookkeeping pool (synchronous_commit off): a crash of PostgreSQL
    // can lose the last moments of this record (a delivered message may read
    // as pending again), never a message.
    let mut tx = pool.begin().await?;
    if !delivered_messages.is_empty() {
        sqlx::query!(
            r#"
            INSERT INTO relay.deliveries (message_id, connection_id, user_id, node_id, delivered_at)
            SELECT d.message_id, d.connection_id, d.user_id, $5, d.delivered_at
              FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::timestamptz[])
                   AS d(message_id, connection_id, user_id, delivered_at)
            ON CONFLICT (message_id, connection_id) DO NOTHING
            "#,
            &delivered_messages,
            &delivered_connections,
            &delivered_users,
            &delivered_at,
            node_id.as_str(),
        )
        .execute(&mut *tx)
        .await?;
    }
    if !unparked_messages.is_empty() {
        sqlx::query!(
            r#"
            DELETE FROM relay.outbox o
             USING unnest($1::bigint[], $2::text[]) AS p(message_id, user_id)
             WHERE o.node_id IS NULL AND o.user_id = p.user_id AND o.message_id = p.message_id
            "#,
            &unparked_messages,
            &unparked_users,
        )
        .execute(&mut *tx)
        .await?;
    }
    if !acked_messages.is_empty() {
        sqlx::query!(
            r#"
            UPDATE relay.deliveries d SET acked_at = a.acked_at
              FROM unnest($1::bigint[], $2::uuid[], $3::timestamptz[]) AS a(message_id, connection_id, acked_at)
             WHERE d.message_id = a.message_id AND d.connection_id = a.connection_id AND d.acked_at IS NULL
            "#,
            &acked_messages,
            &acked_connections,
            &acked_at,
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The writer task: batches records until `stop` is cancelled and the queue
/// is empty. A failed batch is retried with backoff, never dropped, until the
/// node stops; what is still unwritten then is logged.
pub async fn run(
    pool: PgPool,
    node_id: NodeId,
    mut records: mpsc::Receiver<Record>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if batch.is_empty() {
            tokio::select! {
                received = records.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                () = stop.cancelled() => {
                    // Sessions have ended: take what is left, then finish.
                    records.close();
                    if records.recv_many(&mut batch, BATCH).await == 0 {
                        return;
                    }
                }
            }
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match crate::db::bounded(write_batch(&pool, &node_id, &batch)).await {
                Ok(()) => {
                    let acked = batch
                        .iter()
                        .filter(|r| matches!(r, Record::Acked { .. }))
                        .count();
                    metrics::counter!(crate::metrics::MESSAGES_ACKED).increment(acked as u64);
                    batch.clear();
                    break;
                }
                Err(error) if stop.is_cancelled() && backoff >= Duration::from_secs(2) => {
                    tracing::error!(%error, lost = batch.len(), "giving up on delivery records at shutdown");
                    batch.clear();
                    break;
                }
                Err(error) => {
                    metrics::counter!(crate::metrics::DB_ERRORS, "operation" => "deliveries")
                        .increment(1);
                    tracing::warn!(%error, records = batch.len(), "writing delivery records failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

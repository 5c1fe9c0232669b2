//! The delivery log: every message written to a socket becomes a row in
//! `relay.deliveries`, every client ack sets its `acked_at`, and every
//! closed session leaves the registry here. Sessions hand their records to
//! one writer per node, which stores them in batches: one transaction for
//! many records instead of one each.
//!
//! The log also finishes the node's outbox rows (see the migrations: a
//! claimed row stays until its messages are written or parked). In the
//! transaction that records a delivery, the connection is struck off the
//! row that routed the message to it (the row goes with its last one), and
//! copies parked for the user go too: a parked row means "no socket of
//! this user has been written this message". In the transaction that
//! records a departure, every message still routed to the departed
//! connection, and written to no socket of its user, is parked for the
//! user's next connection. Nothing a session held exists only in memory.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

mod queue_changes;

use crate::config::NodeId;
use crate::db::{self, Bounds};
use crate::registration::Registration;
use queue_changes::QueueChanges;

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
        /// Through the user's stream (not a topic or the broadcast): the
        /// outbox row that routed it, and any parked copy, are finished.
        user_stream: bool,
        /// A queue's message written with ack `auto`: its entry is done.
        settles: Option<Arc<str>>,
        /// Written to a subscription that acks: unless acked, the user's
        /// message is parked again when the connection goes.
        ack_required: bool,
    },
    Acked {
        message_id: i64,
        connection_id: Uuid,
        at: DateTime<Utc>,
        /// A queue's message: its entry is done.
        queue: Option<Arc<str>>,
    },
    /// A queue message NACKed: it waits in its queue again, for another
    /// consumer if there is one.
    Nacked {
        message_id: i64,
        connection_id: Uuid,
        queue: Arc<str>,
    },
    /// A queue consumer unsubscribed: what it held and never acked waits in
    /// the queue again.
    LeftQueue {
        connection_id: Uuid,
        subscription: Arc<str>,
    },
    /// Nothing to write: `done` is told once every record queued before it
    /// has committed (a STOMP ACK's RECEIPT waits for it).
    Flushed { done: oneshot::Sender<()> },
    /// A connection that has closed (or whose row has no session): its row
    /// and subscriptions go, and what was routed to it and never written is
    /// parked. `done` is told once that has committed.
    Departed {
        connection_id: Uuid,
        done: Option<oneshot::Sender<()>>,
    },
}

/// The sessions' side of the delivery log.
#[derive(Clone)]
pub struct DeliveryLog {
    records: mpsc::Sender<Record>,
    /// Records waiting for room in a full queue, each in a task of its own:
    /// the node's stop waits for them before the writer's last batch.
    overflow: TaskTracker,
}

impl DeliveryLog {
    pub fn new() -> (Self, mpsc::Receiver<Record>) {
        let (records, rx) = mpsc::channel(QUEUE);
        let overflow = TaskTracker::new();
        (Self { records, overflow }, rx)
    }

    /// Queues `record` in a task of its own, for when the queue is full and
    /// the caller cannot wait. A record that cannot be queued (the writer
    /// has stopped) is logged, never dropped silently.
    fn send_later(&self, record: Record) {
        let records = self.records.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                ?record,
                "a delivery record was lost: no runtime to queue it"
            );
            return;
        };
        self.overflow.spawn_on(
            async move {
                if let Err(mpsc::error::SendError(record)) = records.send(record).await {
                    tracing::error!(?record, "a delivery record was lost: the log has stopped");
                }
            },
            &runtime,
        );
    }

    /// Waits, up to `limit`, for the records waiting for room in the queue
    /// to be queued (the writer still runs meanwhile).
    pub async fn overflow_drained(&self, limit: Duration) {
        self.overflow.close();
        if tokio::time::timeout(limit, self.overflow.wait())
            .await
            .is_err()
        {
            tracing::warn!("delivery records still waiting for the log at shutdown");
        }
    }

    /// Queues a record. Waits when the writer is far behind (the database is
    /// slow or down): sessions then slow down rather than forget deliveries.
    pub async fn record(&self, record: Record) {
        // Fails only once the writer has stopped, at the very end of shutdown.
        let _ = self.records.send(record).await;
    }

    /// Records that `connection_id` has closed, and waits up to `wait` for
    /// that to commit; answers whether it did. Past `wait` the record stays
    /// queued and is written when the database answers.
    pub async fn depart(&self, connection_id: Uuid, wait: Duration) -> bool {
        let (done, committed) = oneshot::channel();
        let record = Record::Departed {
            connection_id,
            done: Some(done),
        };
        match self.records.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            // The log is far behind: the record waits for room in a task of
            // its own (never dropped), and the session goes on closing.
            Err(mpsc::error::TrySendError::Full(record)) => self.send_later(record),
        }
        matches!(tokio::time::timeout(wait, committed).await, Ok(Ok(())))
    }

    /// Waits, up to `wait`, until every record queued before this call has
    /// committed; answers whether it did.
    pub async fn flushed(&self, wait: Duration) -> bool {
        let (done, committed) = oneshot::channel();
        let queued = async {
            self.records.send(Record::Flushed { done }).await.is_ok() && committed.await.is_ok()
        };
        matches!(tokio::time::timeout(wait, queued).await, Ok(true))
    }

    /// Queues a record without waiting (for code that cannot wait, such as a
    /// drop): a task sends it if the queue is full.
    pub fn record_later(&self, record: Record) {
        if let Err(mpsc::error::TrySendError::Full(record)) = self.records.try_send(record) {
            self.send_later(record);
        }
    }
}

/// What a batch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The node's registration was no longer current: the delivery rows
    /// were written, but nothing of the registry or the outbox was touched
    /// (whoever reaped the node handed its work back).
    pub fenced: bool,
}

/// Writes one batch in one transaction: deliveries before acks and
/// departures, so that an ack finds its delivery row and a departure does
/// not park what its session wrote.
pub async fn write_batch(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
    batch: &[Record],
    idle: Duration,
) -> Result<Written, sqlx::Error> {
    let mut delivered = Delivered::default();
    let mut user_delivered = Delivered::default();
    let mut acked_messages = Vec::new();
    let mut acked_connections = Vec::new();
    let mut acked_at = Vec::new();
    let mut departed = Vec::new();
    let mut queues = QueueChanges::default();
    let mut ack_required = Vec::new();
    for record in batch {
        match record {
            Record::Delivered {
                message_id,
                connection_id,
                user_id,
                at,
                user_stream,
                settles,
                ack_required: needs_ack,
            } => {
                delivered.push(*message_id, *connection_id, user_id, *at);
                ack_required.push(*needs_ack);
                if *user_stream {
                    user_delivered.push(*message_id, *connection_id, user_id, *at);
                }
                if let Some(queue) = settles {
                    queues.settle(queue, *message_id, *connection_id);
                }
            }
            Record::Acked {
                message_id,
                connection_id,
                at,
                queue,
            } => {
                acked_messages.push(*message_id);
                acked_connections.push(*connection_id);
                acked_at.push(*at);
                if let Some(queue) = queue {
                    queues.settle(queue, *message_id, *connection_id);
                }
            }
            Record::Nacked {
                message_id,
                connection_id,
                queue,
            } => queues.nack(queue, *message_id, *connection_id),
            Record::LeftQueue {
                connection_id,
                subscription,
            } => {
                queues.left_connections.push(*connection_id);
                queues.left_subscriptions.push(subscription.to_string());
            }
            Record::Departed { connection_id, .. } => departed.push(*connection_id),
            Record::Flushed { .. } => {}
        }
    }
    // On the bookkeeping pool (synchronous_commit off): a crash of PostgreSQL
    // can lose the last moments of this record (a delivered message may read
    // as pending again and be delivered again), never a message. Departures
    // wait for the flush: a closed connection's messages are parked for sure.
    let bounds = Bounds {
        statement: Duration::from_secs(8),
        idle,
        lock: None,
        asynchronous_commit: true,
    };
    let mut tx = db::begin_bounded(pool, bounds).await?;
    if !departed.is_empty() {
        sqlx::query!("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
    }
    let touches_the_outbox = !user_delivered.messages.is_empty() || !departed.is_empty();
    // Departures are fenced (a reaped node's were done by whoever reaped it).
    // Finishing rows for what was written is not: it is true whoever records
    // it, and a batch of deliveries alone then takes no lock on the node row.
    let alive = (departed.is_empty() && !queues.releases())
        || sqlx::query_scalar!(
            r#"SELECT relay.node_alive($1, $2) AS "alive!""#,
            node_id.as_str(),
            incarnation
        )
        .fetch_one(&mut *tx)
        .await?;
    // Every outbox row this batch will change, locked first and in message
    // order, as claims lock theirs and as other nodes' logs lock parked rows
    // (no lock cycle with them), and read: what becomes of each is worked
    // out here, and applied by primary key.
    let rows = if touches_the_outbox {
        sqlx::query_as!(
            LockedRow,
            r#"
            SELECT o.id, o.node_id, o.message_id AS "message_id!", o.user_id AS "user_id!",
                   o.connection_ids AS "connection_ids?: Vec<Uuid>"
              FROM relay.outbox o
             WHERE o.id = ANY (ARRAY(
                    SELECT x.id
                      FROM relay.outbox x
                      JOIN unnest($3::bigint[], $4::text[]) AS d(m, u)
                        ON x.node_id = $1 AND x.message_id = d.m AND x.user_id = d.u
                     WHERE $2
                    UNION ALL
                    SELECT x.id
                      FROM relay.outbox x
                      JOIN unnest($3::bigint[], $4::text[]) AS d(m, u)
                        ON x.node_id IS NULL AND x.user_id = d.u AND x.message_id = d.m
                    UNION ALL
                    SELECT x.id
                      FROM relay.outbox x
                     WHERE $2 AND cardinality($5::uuid[]) > 0 AND x.node_id = $1
                       AND x.connection_ids && $5::uuid[]))
               AND o.message_id IS NOT NULL AND o.user_id IS NOT NULL
             ORDER BY o.message_id, o.id
               FOR UPDATE
            "#,
            node_id.as_str(),
            alive,
            &user_delivered.messages,
            &user_delivered.users,
            &departed,
        )
        .fetch_all(&mut *tx)
        .await?
    } else {
        Vec::new()
    };
    if !delivered.messages.is_empty() {
        sqlx::query!(
            r#"
            INSERT INTO relay.deliveries (message_id, connection_id, user_id, node_id, delivered_at, ack_required)
            SELECT d.message_id, d.connection_id, d.user_id, $5, d.delivered_at, d.ack_required
              FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::timestamptz[], $6::boolean[])
                   AS d(message_id, connection_id, user_id, delivered_at, ack_required)
            ON CONFLICT (message_id, connection_id) DO NOTHING
            "#,
            &delivered.messages,
            &delivered.connections,
            &delivered.users,
            &delivered.at,
            node_id.as_str(),
            &ack_required,
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
    let outcome = Outcome::of(&rows, &user_delivered, &departed);
    outcome.apply(&mut tx, node_id, alive, &departed).await?;
    queues.apply(&mut tx, alive, &departed).await?;
    if alive && !departed.is_empty() {
        // What departed connections were written and never acked (STOMP
        // `client` modes) waits for the user's next connection; acks of this
        // batch are in already.
        sqlx::query_scalar!(r#"SELECT relay.park_unacked($1) AS "parked!""#, &departed)
            .fetch_one(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Written { fenced: !alive })
}

/// Columns of delivery rows, for `unnest`.
#[derive(Default)]
struct Delivered {
    messages: Vec<i64>,
    connections: Vec<Uuid>,
    users: Vec<String>,
    at: Vec<DateTime<Utc>>,
}

impl Delivered {
    fn push(&mut self, message: i64, connection: Uuid, user: &str, at: DateTime<Utc>) {
        self.messages.push(message);
        self.connections.push(connection);
        self.users.push(user.to_owned());
        self.at.push(at);
    }
}

/// What a batch does to the outbox rows it locked (the claim uses it too,
/// for rows whose connections it found gone).
#[derive(Default)]
pub(crate) struct Outcome {
    /// Rows done with: every connection they list was written the message
    /// or has departed; and parked copies of delivered messages.
    pub(crate) finished: Vec<i64>,
    /// (row, connection): what rows still list, once struck off.
    pub(crate) remaining_rows: Vec<i64>,
    pub(crate) remaining_connections: Vec<Uuid>,
    /// Messages to park for their users: their last connection departed
    /// without them (parked unless a socket of the user was written them).
    pub(crate) park_messages: Vec<i64>,
    pub(crate) park_users: Vec<String>,
}

/// A locked outbox row, as [`write_batch`] reads it.
#[derive(Debug, Clone)]
struct LockedRow {
    id: i64,
    /// None: a parked copy.
    node_id: Option<String>,
    message_id: i64,
    user_id: String,
    connection_ids: Option<Vec<Uuid>>,
}

impl Outcome {
    fn of(rows: &[LockedRow], delivered: &Delivered, departed: &[Uuid]) -> Self {
        use std::collections::{HashMap, HashSet};
        let mut written: HashMap<(i64, &str), HashSet<Uuid>> = HashMap::new();
        for ((message, connection), user) in delivered
            .messages
            .iter()
            .zip(&delivered.connections)
            .zip(&delivered.users)
        {
            written
                .entry((*message, user.as_str()))
                .or_default()
                .insert(*connection);
        }
        let departed: HashSet<Uuid> = departed.iter().copied().collect();
        let mut outcome = Outcome::default();
        for row in rows {
            let key = (row.message_id, row.user_id.as_str());
            if row.node_id.is_none() {
                // A parked copy of a message a socket of the user was written.
                if written.contains_key(&key) {
                    outcome.finished.push(row.id);
                }
                continue;
            }
            let wrote = written.get(&key);
            let listed = row.connection_ids.as_deref().unwrap_or_default();
            let remaining: Vec<Uuid> = listed
                .iter()
                .copied()
                .filter(|c| !departed.contains(c) && !wrote.is_some_and(|w| w.contains(c)))
                .collect();
            if remaining.len() == listed.len() {
                continue;
            }
            if remaining.is_empty() {
                outcome.finished.push(row.id);
                // Its last connection left without it: parked, unless some
                // connection it listed was written it here (the database also
                // checks the other sockets of the user).
                if wrote.is_none() {
                    outcome.park_messages.push(row.message_id);
                    outcome.park_users.push(row.user_id.clone());
                }
            } else {
                for connection in remaining {
                    outcome.remaining_rows.push(row.id);
                    outcome.remaining_connections.push(connection);
                }
            }
        }
        outcome
    }

    /// Applies it by primary key, in `tx`; `departed` connections (of a
    /// node still `alive`) leave the registry too.
    pub(crate) async fn apply(
        self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        node_id: &NodeId,
        alive: bool,
        departed: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        // A fenced node's departures touch nothing: whoever reaped it handed
        // its work back and removed its rows.
        let departed: &[Uuid] = if alive { departed } else { &[] };
        if self.finished.is_empty()
            && self.remaining_rows.is_empty()
            && self.park_messages.is_empty()
            && departed.is_empty()
        {
            return Ok(());
        }
        sqlx::query!(
            r#"
            WITH finished AS (
                DELETE FROM relay.outbox WHERE id = ANY ($1) RETURNING 1
            ), struck_off AS (
                UPDATE relay.outbox o SET connection_ids = r.connections
                  FROM (SELECT x.id, array_agg(x.c) AS connections
                          FROM unnest($2::bigint[], $3::uuid[]) AS x(id, c)
                         GROUP BY x.id) r
                 WHERE o.id = r.id
                RETURNING 1
            ), parked AS (
                INSERT INTO relay.outbox (node_id, message_id, user_id, expires_at)
                SELECT NULL, p.message_id, p.user_id, m.expires_at
                  FROM unnest($4::bigint[], $5::text[]) AS p(message_id, user_id)
                  JOIN relay.messages m ON m.id = p.message_id
                 WHERE m.target_connection IS NULL AND m.expires_at > now()
                   AND NOT EXISTS (SELECT 1 FROM relay.deliveries d
                                    WHERE d.message_id = p.message_id AND d.user_id = p.user_id)
                ON CONFLICT (user_id, message_id) WHERE node_id IS NULL DO NOTHING
                RETURNING 1
            ), subscriptions AS (
                DELETE FROM relay.subscriptions WHERE connection_id = ANY ($6) RETURNING 1
            ), connections AS (
                DELETE FROM relay.connections WHERE id = ANY ($6) AND node_id = $7 RETURNING 1
            )
            SELECT (SELECT count(*) FROM finished) AS "finished!", (SELECT count(*) FROM struck_off) AS "struck_off!",
                   (SELECT count(*) FROM parked) AS "parked!", (SELECT count(*) FROM subscriptions) AS "subscriptions!",
                   (SELECT count(*) FROM connections) AS "connections!"
            "#,
            &self.finished,
            &self.remaining_rows,
            &self.remaining_connections,
            &self.park_messages,
            &self.park_users,
            departed,
            node_id.as_str(),
        )
        .fetch_one(&mut **tx)
        .await?;
        Ok(())
    }
}

/// How long a small batch waits for more records. A batch costs the
/// database five statements whatever its size: at a few hundred messages a
/// second, batches of one or two records made the log cost PostgreSQL more
/// CPU than the messages themselves, and that CPU is what every message's
/// latency queued behind. Nothing waits on these rows but the audit (a
/// departure, which a closing session waits for, is written at once).
const LINGER: Duration = Duration::from_millis(10);

/// Gathers what arrives within [`LINGER`] into a small batch.
async fn linger(
    records: &mut mpsc::Receiver<Record>,
    batch: &mut Vec<Record>,
    stop: &CancellationToken,
) {
    let until = tokio::time::Instant::now() + LINGER;
    while batch.len() < BATCH / 4
        && !stop.is_cancelled()
        && !batch
            .iter()
            .any(|r| matches!(r, Record::Departed { .. } | Record::Flushed { .. }))
    {
        match tokio::time::timeout_at(until, records.recv_many(batch, BATCH - batch.len())).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The writer's queue and the batch it is writing: kept by its supervisor
/// across a restart, so that a writer started again after a panic goes on
/// with the same batch.
pub struct Writer {
    records: mpsc::Receiver<Record>,
    batch: Vec<Record>,
}

impl Writer {
    pub fn new(records: mpsc::Receiver<Record>) -> Self {
        Self {
            records,
            batch: Vec::with_capacity(BATCH),
        }
    }
}

/// The writer task: batches records until `stop` is cancelled and the queue
/// is empty. A failed batch is retried with backoff, never dropped, until the
/// node stops; what is still unwritten then is logged.
pub async fn run(
    pool: &PgPool,
    node_id: &NodeId,
    registration: &Registration,
    idle: Duration,
    writer: &mut Writer,
    stop: &CancellationToken,
) {
    let Writer { records, batch } = writer;
    loop {
        if batch.is_empty() {
            tokio::select! {
                received = records.recv_many(batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                () = stop.cancelled() => {
                    // Sessions have ended: take what is left, then finish.
                    records.close();
                    if records.recv_many(batch, BATCH).await == 0 {
                        return;
                    }
                }
            }
            linger(records, batch, stop).await;
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let incarnation = registration.current();
            // A panic here (a bug) must not end the log: every later record
            // would be lost. It counts as a failed batch, and is retried.
            let written = std::panic::AssertUnwindSafe(db::bounded(write_batch(
                pool,
                node_id,
                incarnation,
                batch,
                idle,
            )))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!("writing delivery records panicked");
                Err(sqlx::Error::Protocol(
                    "writing delivery records panicked".into(),
                ))
            });
            match written {
                Ok(written) => {
                    if written.fenced {
                        registration.report_fenced(incarnation);
                    }
                    let acked = batch
                        .iter()
                        .filter(|r| matches!(r, Record::Acked { .. }))
                        .count();
                    metrics::counter!(crate::metrics::MESSAGES_ACKED).increment(acked as u64);
                    for record in batch.drain(..) {
                        match record {
                            Record::Departed {
                                done: Some(done), ..
                            }
                            | Record::Flushed { done } => {
                                let _ = done.send(());
                            }
                            _ => {}
                        }
                    }
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

#[cfg(test)]
mod tests;

//! The claimer: takes the work routed to this node from `relay.outbox` and
//! hands the messages to its sessions (through the hub); and the outbox's
//! backlog gauge, which measures what waits here.
//!
//! NOTIFY only wakes the claimer (see [`super::listener`]); the table is the
//! truth, and the claimer polls on an interval whatever happens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use super::delivery_log::Outcome;
use super::hub::{Control, Envelope, Offer};
use super::listener::Wake;
use super::queues;
use crate::db::{self, Bounds, WorkError};
use crate::message::{MessageRow, StoredMessage, StreamKey};
use crate::metrics as m;
use crate::state::NodeState;

/// Outbox rows claimed per transaction.
pub const CLAIM_BATCH: i64 = 512;

/// What one claim found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// Outbox rows taken.
    pub rows: usize,
    /// Messages handed to at least one local session.
    pub handed_over: usize,
    /// Messages whose sessions had all gone: parked for their users.
    pub parked: usize,
    /// Expired messages, not delivered.
    pub expired: usize,
}

/// Claims one batch of this node's outbox rows and hands them to sessions, in
/// message id order (which is each stream's order, see the migrations).
///
/// A claim marks its rows (topic and broadcast rows, which are done once
/// handed to the local subscribers, it deletes); a user's row stays until
/// every connection it lists has been written the message or has gone (see
/// `super::delivery_log`), so what a session holds is also in the database. The claim
/// is a transaction, and messages are offered to sessions before it
/// commits: if the commit fails, or this future is dropped (a timeout) at
/// any point before it, the rows come back and are offered again; sessions
/// drop by id what they already have.
///
/// The claim is fenced: its first lock is a KEY SHARE on this node's row
/// under its current incarnation. Once the node has been reaped, a claim
/// takes nothing and answers [`WorkError::Fenced`].
pub async fn claim_once(ctx: &NodeState) -> Result<Claimed, WorkError> {
    let started = Instant::now();
    let incarnation = ctx.lifecycle.registration.current();
    let bounds = Bounds::claim(ctx.settings.idle_transaction_timeout());
    // On the bookkeeping pool: nothing waits on this commit's flush. If a
    // crash of PostgreSQL loses it, the rows come back (at least once).
    let mut tx = db::begin_bounded(&ctx.db.bookkeeping, bounds).await?;
    // The batch is chosen once (ARRAY() runs as an init plan): as `IN
    // (subquery)` the planner, on a table that statistics call empty, ran the
    // subquery again for every row changed, and each run skipped the rows
    // already taken and took later ones: batches with holes, whose messages
    // then came after newer ones of their stream.
    // FOR UPDATE waits, where SKIP LOCKED would skip: a row held by another
    // transaction would be overtaken by newer messages of its stream, and
    // sessions drop a message older than one they have delivered.
    // `alive` is evaluated first (it is the batch's one-time filter): the
    // node's row is locked before any outbox row, as the reaper locks it.
    let rows = sqlx::query!(
        r#"
        WITH alive AS (
            SELECT true FROM relay.nodes WHERE id = $1 AND incarnation = $3 FOR KEY SHARE
        ), batch AS (
            SELECT ARRAY(SELECT id FROM relay.outbox
                          WHERE node_id = $1 AND claimed_at IS NULL AND EXISTS (SELECT 1 FROM alive)
                          ORDER BY message_id
                          LIMIT $2
                            FOR UPDATE) AS ids
        ), claimed AS (
            UPDATE relay.outbox o SET claimed_at = now(), claimed_by = $3
             WHERE o.id = ANY ((SELECT ids FROM batch)::bigint[]) AND o.user_id IS NOT NULL
            RETURNING o.id, o.kind, o.message_id, o.user_id, o.connection_ids
        ), taken AS (
            DELETE FROM relay.outbox o
             WHERE o.id = ANY ((SELECT ids FROM batch)::bigint[]) AND o.user_id IS NULL
            RETURNING o.id, o.kind, o.message_id, o.user_id, o.connection_ids
        )
        SELECT a.alive AS "alive!", r.id AS "outbox_id?", r.kind AS "kind?", r.message_id AS "message_id?",
               r.user_id AS "user_id?", r.connection_ids AS "connection_ids?: Vec<uuid::Uuid>",
               m.id AS "id?", m.stream AS "stream?", m.destination AS "destination?",
               m.data::text AS "data?", m.body AS "body?", m.content_type AS "content_type?",
               m.headers::text AS "headers?",
               m.created_at AS "created_at?", m.target_connection AS "target_connection?",
               (m.expires_at <= now()) AS "expired?",
               extract(epoch FROM clock_timestamp() - m.created_at)::float8 AS "age?"
          FROM (SELECT EXISTS (SELECT 1 FROM alive) AS alive) a
          LEFT JOIN ((SELECT * FROM claimed UNION ALL SELECT * FROM taken) r
                     LEFT JOIN relay.messages m ON m.id = r.message_id) ON true
         ORDER BY r.message_id, r.id
        "#,
        ctx.node_id.as_str(),
        CLAIM_BATCH,
        incarnation,
    )
    .fetch_all(&mut *tx)
    .await?;
    let offered_at = Instant::now();
    if !rows.first().is_some_and(|r| r.alive) {
        ctx.lifecycle.registration.report_fenced(incarnation);
        return Err(WorkError::Fenced);
    }

    let mut claimed = Claimed::default();
    // What the claim does to its rows besides marking them, in its
    // transaction: the delivery log's way of finishing, striking off and
    // parking rows.
    let mut settle = Outcome::default();
    for row in rows {
        let (Some(outbox_id), Some(kind)) = (row.outbox_id, row.kind) else {
            continue; // the one row of an empty claim
        };
        claimed.rows += 1;
        if let Some(age) = row.age {
            m::stage(
                m::Stage::StoredToClaimed,
                Duration::from_secs_f64(age.max(0.0)),
                1,
            );
        }
        let connections = row.connection_ids.unwrap_or_default();
        if kind == "disconnect" {
            for id in connections {
                ctx.delivery.hub.control(
                    id,
                    Control::Close {
                        code: 1008,
                        reason: "disconnected through the API".into(),
                    },
                );
            }
            continue;
        }
        // The message itself is gone (retention) or expired: never delivered.
        let (Some(id), Some(created_at)) = (row.id, row.created_at) else {
            claimed.expired += 1;
            settle.finished.push(outbox_id);
            continue;
        };
        if row.expired == Some(true) {
            claimed.expired += 1;
            metrics::counter!(m::MESSAGES_EXPIRED).increment(1);
            settle.finished.push(outbox_id);
            continue;
        }
        // A row with a user is for that user's connections; one without is a
        // topic message or a broadcast, for every local subscriber.
        let stream = match (
            &row.user_id,
            row.stream.as_deref().and_then(StreamKey::parse),
        ) {
            (Some(user), _) => StreamKey::User(user.as_str().into()),
            (None, Some(stream @ (StreamKey::Topic(_) | StreamKey::Broadcast))) => stream,
            _ => {
                settle.finished.push(outbox_id);
                continue;
            }
        };
        let message = StoredMessage::from_row(MessageRow {
            id,
            destination: row.destination,
            data: row.data,
            body: row.body,
            content_type: row.content_type,
            created_at,
            target_connection: row.target_connection,
            headers: row.headers,
        });
        let envelope = Arc::new(Envelope {
            offered_at,
            ..Envelope::new(message, stream)
        });
        match &envelope.stream {
            StreamKey::User(_) => {
                let (reached, gone): (Vec<Uuid>, Vec<Uuid>) = connections
                    .iter()
                    .partition(|c| ctx.delivery.hub.offer(**c, &envelope) != Offer::Gone);
                if !reached.is_empty() {
                    claimed.handed_over += 1;
                }
                if gone.is_empty() {
                    continue;
                }
                if !reached.is_empty() {
                    // The others have it, and finish the row.
                    for connection in reached {
                        settle.remaining_rows.push(outbox_id);
                        settle.remaining_connections.push(connection);
                    }
                    continue;
                }
                // Every connection it was routed to has closed since: the
                // user gets it on their next connect.
                settle.finished.push(outbox_id);
                if let Some(user_id) = row.user_id
                    && envelope.message.target_connection.is_none()
                {
                    settle.park_messages.push(id);
                    settle.park_users.push(user_id);
                    claimed.parked += 1;
                }
            }
            StreamKey::Topic(topic) => {
                if ctx.delivery.hub.offer_topic(topic, &envelope) > 0 {
                    claimed.handed_over += 1;
                }
            }
            StreamKey::Broadcast => {
                if ctx.delivery.hub.offer_all(&envelope) > 0 {
                    claimed.handed_over += 1;
                }
            }
            // Never in the outbox: queue messages wait in their queue.
            StreamKey::Queue(_) => settle.finished.push(outbox_id),
        }
    }
    if claimed.rows > 0 {
        metrics::histogram!(m::CLAIM_BATCH).record(claimed.rows as f64);
        m::stage(m::Stage::Claim, offered_at - started, claimed.rows);
    }
    // In the claim's transaction: a message is parked if and only if its
    // claim commits.
    settle.apply(&mut tx, &ctx.node_id, true, &[]).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// The claimer task: claims whenever woken, and at least every
/// `poll_interval`, until `token` is cancelled.
pub async fn run(ctx: Arc<NodeState>, wake: Arc<Wake>, token: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // Registered before claiming, so a wake-up during the claim is kept.
        let notified = wake.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(since) = wake.take_since() {
            m::stage(m::Stage::ClaimWait, since.elapsed(), 1);
        }

        let outcome = match tokio::time::timeout(db::OP_TIMEOUT, claim_once(&ctx)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(abandoned("the claim")),
        };
        // Then the queues this node's consumers read.
        let outcome = match outcome {
            Ok(claimed) => {
                match tokio::time::timeout(db::OP_TIMEOUT, queues::dispatch_once(&ctx)).await {
                    Ok(Ok(dispatched)) => Ok((claimed, dispatched)),
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(abandoned("the queue claim")),
                }
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok((claimed, dispatched)) => {
                backoff = Duration::from_millis(100);
                if claimed.rows as i64 == CLAIM_BATCH || dispatched.more {
                    // More is waiting.
                    if token.is_cancelled() {
                        return;
                    }
                    continue;
                }
            }
            Err(error) => {
                if matches!(error, WorkError::Fenced) {
                    // The node registers again (the heartbeat task heals it);
                    // until then there is nothing to claim.
                    tracing::info!(
                        "claim refused: this node was declared dead; waiting to register again"
                    );
                } else {
                    metrics::counter!(m::DB_ERRORS, "operation" => "claim").increment(1);
                    tracing::warn!(%error, "claiming outbox work failed; retrying");
                }
                // A wake-up (the listener is back after an outage: it rescans)
                // ends the wait early.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut notified => {}
                    () = token.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        tokio::select! {
            () = &mut notified => {}
            () = ctx.delivery.hub.queue_credit() => {}
            () = tokio::time::sleep(ctx.poll_interval()) => {
                metrics::counter!(m::WAKEUPS, "source" => "poll").increment(1);
            }
            () = token.cancelled() => return,
        }
    }
}

/// A claim abandoned after [`db::OP_TIMEOUT`] (it rolls back).
fn abandoned(what: &str) -> WorkError {
    WorkError::Database(sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} took too long and was abandoned"),
    )))
}

/// The backlog gauge's task: every heartbeat interval.
pub async fn run_backlog(ctx: Arc<NodeState>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        if let Err(error) = backlog_once(&ctx).await {
            tracing::debug!(%error, "could not measure the outbox backlog");
        }
    }
}

/// This node's outbox backlog and the age of its oldest row: work that
/// waits here is what an operator looks for first.
pub async fn backlog_once(ctx: &NodeState) -> Result<(), sqlx::Error> {
    let backlog = db::bounded(async {
        let mut scope = db::scope(&ctx.db.pool).await?;
        let backlog = sqlx::query!(
            r#"
            SELECT count(*) AS "rows!",
                   COALESCE(EXTRACT(epoch FROM now() - min(created_at)), 0)::float8 AS "oldest_secs!"
              FROM (SELECT created_at FROM relay.outbox WHERE node_id = $1 LIMIT 1000000) o
            "#,
            ctx.node_id.as_str()
        )
        .fetch_one(&mut *scope)
        .await?;
        scope.end().await?;
        Ok::<_, sqlx::Error>(backlog)
    })
    .await?;
    let node = ctx.node_id.to_string();
    metrics::gauge!(m::OUTBOX_BACKLOG, "node" => node.clone()).set(backlog.rows as f64);
    metrics::gauge!(m::OUTBOX_OLDEST, "node" => node).set(backlog.oldest_secs);
    Ok(())
}

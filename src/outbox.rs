//! The read side: each node claims the work routed to it from `relay.outbox`
//! and hands the messages to its sessions.
//!
//! NOTIFY only wakes the claimer; the table is the truth. Every way a wake-up
//! can be lost is covered: the listener reconnects and rescans, and the
//! claimer polls on an interval whatever happens.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::db::{self, Bounds, WorkError};
use crate::deliveries::Outcome;
use crate::hub::{Control, Envelope, Offer};
use crate::message::{StoredMessage, StreamKey};
use crate::metrics as m;
use crate::node::NodeContext;
use crate::protocol::json;

/// Outbox rows claimed per transaction.
pub const CLAIM_BATCH: i64 = 512;

/// How the listener wakes the claimer, and since when it has been awake
/// without claiming (for the `claim_wait` stage).
#[derive(Default)]
pub struct Wake {
    notify: Notify,
    since: Mutex<Option<Instant>>,
}

impl Wake {
    pub fn wake(&self) {
        self.since
            .lock()
            .expect("wake lock")
            .get_or_insert_with(Instant::now);
        self.notify.notify_one();
    }

    /// When the first wake-up not yet followed by a claim came.
    fn take_since(&self) -> Option<Instant> {
        self.since.lock().expect("wake lock").take()
    }
}

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
/// `deliveries`), so what a session holds is also in the database. The claim
/// is a transaction, and messages are offered to sessions before it
/// commits: if the commit fails, or this future is dropped (a timeout) at
/// any point before it, the rows come back and are offered again; sessions
/// drop by id what they already have.
///
/// The claim is fenced: its first lock is a KEY SHARE on this node's row
/// under its current incarnation. Once the node has been reaped, a claim
/// takes nothing and answers [`WorkError::Fenced`].
pub async fn claim_once(ctx: &NodeContext) -> Result<Claimed, WorkError> {
    let started = Instant::now();
    let incarnation = ctx.registration.current();
    let bounds = Bounds {
        // Longer than the caller waits (OP_TIMEOUT): an abandoned claim is
        // rolled back, not cut short under its successor.
        statement: db::OP_TIMEOUT * 3,
        idle: ctx.settings.idle_transaction_timeout(),
        lock: None,
    };
    // On the bookkeeping pool: nothing waits on this commit's flush. If a
    // crash of PostgreSQL loses it, the rows come back (at least once).
    let mut tx = db::begin_bounded(&ctx.bookkeeping, bounds).await?;
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
        ctx.registration.report_fenced(incarnation);
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
                ctx.hub.control(
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
        let message = StoredMessage::from_row(
            id,
            row.destination,
            row.data,
            row.body,
            row.content_type,
            created_at,
            row.target_connection,
        );
        let envelope = Arc::new(Envelope {
            frame: json::message(&message, json::To::of(&stream)).into(),
            message,
            stream,
            offered_at,
        });
        match &envelope.stream {
            StreamKey::User(_) => {
                let (reached, gone): (Vec<Uuid>, Vec<Uuid>) = connections
                    .iter()
                    .partition(|c| ctx.hub.offer(**c, &envelope) != Offer::Gone);
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
                if ctx.hub.offer_topic(topic, &envelope) > 0 {
                    claimed.handed_over += 1;
                }
            }
            StreamKey::Broadcast => {
                if ctx.hub.offer_all(&envelope) > 0 {
                    claimed.handed_over += 1;
                }
            }
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
pub async fn run_claimer(ctx: Arc<NodeContext>, wake: Arc<Wake>, token: CancellationToken) {
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
            Err(_) => Err(WorkError::Database(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the claim took too long and was abandoned",
            )))),
        };
        match outcome {
            Ok(claimed) => {
                backoff = Duration::from_millis(100);
                if claimed.rows as i64 == CLAIM_BATCH {
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
            () = tokio::time::sleep(ctx.settings.poll_interval) => {
                metrics::counter!(m::WAKEUPS, "source" => "poll").increment(1);
            }
            () = token.cancelled() => return,
        }
    }
}

/// The listener task: LISTENs on this node's channel on a dedicated
/// connection and wakes the claimer. After every (re)connect it wakes the
/// claimer too, since notifications sent while it was away are lost.
pub async fn run_listener(ctx: Arc<NodeContext>, wake: Arc<Wake>, token: CancellationToken) {
    let channel = ctx.node_id.channel();
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = async {
            let options = crate::db::connect_options(
                &ctx.settings.database_url,
                &format!("pgrelay {} listener", ctx.node_id),
            )?;
            // A pool of one, of its own: the listener must never wait for (or
            // starve) the request pool.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .acquire_timeout(crate::db::ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await?;
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.ignore_pool_close_event(true);
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            result = connected => match result {
                Ok(listener) => listener,
                Err(error) => {
                    ctx.listener_up.store(false, Ordering::Release);
                    metrics::counter!(m::DB_ERRORS, "operation" => "listen").increment(1);
                    tracing::warn!(%error, "LISTEN connection failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = token.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
            () = token.cancelled() => return,
        };
        ctx.listener_up.store(true, Ordering::Release);
        backoff = Duration::from_millis(100);
        tracing::debug!(%channel, "listening");
        metrics::counter!(m::WAKEUPS, "source" => "rescan").increment(1);
        wake.wake();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {
                        metrics::counter!(m::WAKEUPS, "source" => "notify").increment(1);
                        wake.wake();
                    }
                    Ok(None) => {
                        // Reconnected underneath: anything sent meanwhile is lost.
                        tracing::info!("LISTEN connection re-established; rescanning the outbox");
                        metrics::counter!(m::WAKEUPS, "source" => "rescan").increment(1);
                        wake.wake();
                    }
                    Err(error) => {
                        ctx.listener_up.store(false, Ordering::Release);
                        metrics::counter!(m::DB_ERRORS, "operation" => "listen").increment(1);
                        tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                () = token.cancelled() => return,
            }
        }
    }
}

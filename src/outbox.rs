//! The read side: each node claims the work routed to it from `relay.outbox`
//! and hands the messages to its sessions.
//!
//! NOTIFY only wakes the claimer; the table is the truth. Every way a wake-up
//! can be lost is covered: the listener reconnects and rescans, and the
//! claimer polls on an interval whatever happens.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hub::{Control, Envelope, Offer};
use crate::message::{StoredMessage, StreamKey};
use crate::metrics as m;
use crate::node::NodeContext;
use crate::protocol::json;

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
/// The claim is a transaction, and messages are offered to sessions before it
/// commits: if the commit fails, or this future is dropped (a timeout) at any
/// point before it, the rows come back and are delivered again; sessions drop
/// by id what they already have. A claim as a single autocommit statement
/// would not be safe: a caller that gives up waiting leaves the statement to
/// finish and commit on the server, its rows deleted and never delivered.
pub async fn claim_once(ctx: &NodeContext) -> Result<Claimed, sqlx::Error> {
    // On the bookkeeping pool: nothing waits on this commit's flush. If a
    // crash of PostgreSQL loses it, the rows come back (at least once).
    // The batch is chosen once (ARRAY() runs as an init plan): as `IN
    // (subquery)` the planner, on a table that statistics call empty, ran the
    // subquery again for every row deleted, and each run skipped the rows
    // already deleted and took later ones. The claim then deleted a batch
    // with holes and took the holes later, behind newer messages.
    // FOR UPDATE waits, where SKIP LOCKED would skip: a row held by another
    // transaction (an abandoned claim not yet rolled back, the sweeper) would
    // be overtaken by newer messages of its stream, and sessions drop a
    // message older than one they have delivered.
    let mut tx = ctx.bookkeeping.begin().await?;
    let rows = sqlx::query!(
        r#"
        WITH claimed AS (
            DELETE FROM relay.outbox o
             WHERE o.id = ANY (ARRAY(SELECT id FROM relay.outbox
                                      WHERE node_id = $1
                                      ORDER BY message_id
                                      LIMIT $2
                                        FOR UPDATE))
            RETURNING o.id, o.kind, o.message_id, o.user_id, o.connection_ids
        )
        SELECT c.id AS "outbox_id!", c.kind AS "kind!", c.message_id, c.user_id,
               c.connection_ids AS "connection_ids?: Vec<uuid::Uuid>",
               m.id AS "id?", m.stream, m.destination, m.data::text AS data, m.body, m.content_type,
               m.created_at AS "created_at?", m.target_connection, (m.expires_at <= now()) AS "expired?"
          FROM claimed c
          LEFT JOIN relay.messages m ON m.id = c.message_id
         ORDER BY c.message_id, c.id
        "#,
        ctx.node_id.as_str(),
        CLAIM_BATCH,
    )
    .fetch_all(&mut *tx)
    .await?;

    let mut claimed = Claimed {
        rows: rows.len(),
        ..Claimed::default()
    };
    if !rows.is_empty() {
        metrics::histogram!(m::CLAIM_BATCH).record(rows.len() as f64);
    }
    let mut park_messages = Vec::new();
    let mut park_users = Vec::new();
    for row in rows {
        let connections = row.connection_ids.unwrap_or_default();
        if row.kind == "disconnect" {
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
            continue;
        };
        if row.expired == Some(true) {
            claimed.expired += 1;
            metrics::counter!(m::MESSAGES_EXPIRED).increment(1);
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
            _ => continue,
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
        });
        let reached = match &envelope.stream {
            StreamKey::User(_) => connections
                .iter()
                .filter(|c| ctx.hub.offer(**c, &envelope) != Offer::Gone)
                .count(),
            StreamKey::Topic(topic) => ctx.hub.offer_topic(topic, &envelope),
            StreamKey::Broadcast => ctx.hub.offer_all(&envelope),
        };
        if reached > 0 {
            claimed.handed_over += 1;
        } else if let (StreamKey::User(_), Some(user_id)) = (&envelope.stream, row.user_id)
            && envelope.message.target_connection.is_none()
        {
            // Every connection it was routed to has closed since: the user
            // gets it on their next connect.
            park_messages.push(id);
            park_users.push(user_id);
            claimed.parked += 1;
        }
    }
    // Parked in the claim's transaction: a message is parked if and only if
    // its claim commits.
    crate::registry::connections::park(&mut tx, &park_messages, &park_users).await?;
    tx.commit().await?;
    Ok(claimed)
}

/// The claimer task: claims whenever woken, and at least every
/// `poll_interval`, until `token` is cancelled.
pub async fn run_claimer(ctx: Arc<NodeContext>, wake: Arc<Notify>, token: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        // Registered before claiming, so a wake-up during the claim is kept.
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        match crate::db::bounded(claim_once(&ctx)).await {
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
                metrics::counter!(m::DB_ERRORS, "operation" => "claim").increment(1);
                tracing::warn!(%error, "claiming outbox work failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = token.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
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
pub async fn run_listener(ctx: Arc<NodeContext>, wake: Arc<Notify>, token: CancellationToken) {
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
        wake.notify_one();
        loop {
            tokio::select! {
                received = listener.try_recv() => match received {
                    Ok(Some(_)) => {
                        metrics::counter!(m::WAKEUPS, "source" => "notify").increment(1);
                        wake.notify_one();
                    }
                    Ok(None) => {
                        // Reconnected underneath: anything sent meanwhile is lost.
                        tracing::info!("LISTEN connection re-established; rescanning the outbox");
                        metrics::counter!(m::WAKEUPS, "source" => "rescan").increment(1);
                        wake.notify_one();
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

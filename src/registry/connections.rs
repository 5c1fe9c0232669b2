//! Connection rows: a socket is registered before its `welcome` is sent and
//! removed when it closes.

use std::sync::Arc;

use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::config::NodeId;

/// What a connection row records about its socket.
pub struct NewConnection<'a> {
    pub id: Uuid,
    pub node_id: &'a NodeId,
    pub user_id: &'a str,
    pub protocol: &'a str,
    pub remote_addr: &'a str,
    pub user_agent: Option<&'a str>,
    /// The client's cursor (`since`), when it resumes.
    pub since: Option<i64>,
    /// Connections the user may hold across the cluster.
    pub max_per_user: u32,
}

/// Why a connection was not registered.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("this user already has the most connections allowed")]
    TooMany,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Where a new connection starts in its streams.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Messages of the user's stream up to here are the client's backfill;
    /// later ones are routed to it live (see the migrations for why this is exact).
    pub user: i64,
    /// Broadcasts up to here were sent before the connection existed.
    pub broadcast: i64,
    /// Whether messages are parked for the user (without `since`).
    pub parked: bool,
}

/// Registers a connection under its user's stream lock.
pub async fn attach(pool: &PgPool, conn: &NewConnection<'_>) -> Result<Heads, AttachError> {
    let mut tx = pool.begin().await?;
    // A sender holding the lock inside a long application transaction must not
    // hang the handshake: give up, and let the client retry.
    sqlx::query!("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    let heads = sqlx::query!(
        r#"SELECT user_head AS "user_head!", broadcast_head AS "broadcast_head!", parked AS "parked!"
             FROM relay.attach_connection($1, $2, $3, $4, $5, $6, $7, $8)"#,
        conn.id,
        conn.node_id.as_str(),
        conn.user_id,
        conn.protocol,
        conn.remote_addr,
        conn.user_agent,
        conn.since,
        conn.max_per_user as i32,
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(|error| match error.as_database_error().and_then(|e| e.code()).as_deref() {
        Some("PR429") => AttachError::TooMany,
        _ => AttachError::Database(error),
    })?;
    tx.commit().await?;
    Ok(Heads {
        user: heads.user_head,
        broadcast: heads.broadcast_head,
        parked: heads.parked,
    })
}

/// A closed connection, for [`Departures`].
pub struct Departure {
    pub id: Uuid,
    pub user_id: Arc<str>,
    /// Messages its session had taken but not written.
    pub unsent: Vec<i64>,
    /// The last id of the user's stream the session took.
    pub cursor: i64,
}

/// Removes closed connections from the registry, many per transaction: a
/// node whose sockets all drop at once (a network blip, a deploy) would
/// otherwise queue one transaction per socket and starve its pool.
#[derive(Clone)]
pub struct Departures {
    queue: mpsc::Sender<(Departure, oneshot::Sender<Result<(), String>>)>,
}

/// Departures removed per transaction.
const DEPARTURE_BATCH: usize = 1000;

impl Departures {
    pub fn start(pool: PgPool, node_id: NodeId) -> Self {
        let (queue, mut rx) =
            mpsc::channel::<(Departure, oneshot::Sender<Result<(), String>>)>(DEPARTURE_BATCH * 4);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(DEPARTURE_BATCH);
            while rx.recv_many(&mut batch, DEPARTURE_BATCH).await > 0 {
                let (departures, replies): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut batch).into_iter().unzip();
                let result = crate::db::bounded(detach(&pool, &node_id, &departures))
                    .await
                    .map_err(|e| e.to_string());
                for reply in replies {
                    let _ = reply.send(result.clone());
                }
            }
        });
        Self { queue }
    }

    /// Removes a closed connection's rows and parks, for its user's next
    /// connection, the messages that were routed to it but never written;
    /// returns once that has committed.
    pub async fn depart(&self, departure: Departure) -> Result<(), String> {
        let (reply, done) = oneshot::channel();
        self.queue
            .send((departure, reply))
            .await
            .map_err(|_| "the node is stopping".to_owned())?;
        done.await.map_err(|_| "the node is stopping".to_owned())?
    }
}

/// Removes closed connections' rows and parks, for their users' next
/// connections, the messages routed to them but never written: those their
/// sessions had taken (`unsent`) and those still waiting in the outbox past
/// each one's cursor (a claim still committing may show rows the session has
/// already written).
pub async fn detach(
    pool: &PgPool,
    node_id: &NodeId,
    departures: &[Departure],
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = departures.iter().map(|d| d.id).collect();
    let cursors: Vec<i64> = departures.iter().map(|d| d.cursor).collect();
    let mut tx = pool.begin().await?;
    sqlx::query!(
        r#"
        INSERT INTO relay.outbox (node_id, message_id, user_id, expires_at)
        SELECT NULL, o.message_id, o.user_id, o.expires_at
          FROM relay.outbox o
          JOIN unnest($2::uuid[], $3::bigint[]) AS d(id, cursor)
            ON d.id = ANY (o.connection_ids) AND o.message_id > d.cursor
          JOIN relay.messages m ON m.id = o.message_id
         WHERE o.node_id = $1 AND o.kind = 'deliver' AND o.user_id IS NOT NULL
           AND m.target_connection IS NULL AND m.expires_at > now()
        ON CONFLICT (user_id, message_id) WHERE node_id IS NULL DO NOTHING
        "#,
        node_id.as_str(),
        &ids,
        &cursors
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM relay.subscriptions WHERE connection_id = ANY ($1)",
        &ids
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("DELETE FROM relay.connections WHERE id = ANY ($1)", &ids)
        .execute(&mut *tx)
        .await?;
    let (unsent, users): (Vec<i64>, Vec<String>) = departures
        .iter()
        .flat_map(|d| d.unsent.iter().map(|id| (*id, d.user_id.to_string())))
        .unzip();
    park(&mut tx, &unsent, &users).await?;
    tx.commit().await
}

/// Parks messages for users: each goes to the user's next connection.
pub async fn park(
    tx: &mut Transaction<'_, Postgres>,
    message_ids: &[i64],
    user_ids: &[String],
) -> Result<(), sqlx::Error> {
    if message_ids.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        r#"
        INSERT INTO relay.outbox (node_id, message_id, user_id, expires_at)
        SELECT NULL, p.message_id, p.user_id, m.expires_at
          FROM unnest($1::bigint[], $2::text[]) AS p(message_id, user_id)
          JOIN relay.messages m ON m.id = p.message_id
         WHERE m.expires_at > now()
        ON CONFLICT (user_id, message_id) WHERE node_id IS NULL DO NOTHING
        "#,
        message_ids,
        user_ids
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

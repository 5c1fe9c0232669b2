//! Connection rows: a socket is registered before its `welcome` is sent and
//! removed when it closes (by the delivery log, see `read::delivery_log`, which also
//! parks what was routed to it and never written).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::config::NodeId;
use crate::db::{self, Bounds, CommitError};

/// What a connection row records about its socket.
pub struct NewConnection<'a> {
    pub id: Uuid,
    pub node_id: &'a NodeId,
    /// The node's registration the row is fenced by.
    pub incarnation: Uuid,
    pub user_id: &'a str,
    pub protocol: &'a str,
    pub remote_addr: &'a str,
    pub user_agent: Option<&'a str>,
    /// Connections the user may hold across the cluster.
    pub max_per_user: u32,
}

/// Why a connection was not registered.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("this user already has the most connections allowed")]
    TooMany,
    /// The node's registration is no longer current: it was declared dead
    /// and registers again.
    #[error("the node is registering again")]
    Fenced,
    /// Not registered, for certain: try again later.
    #[error("the connection could not be registered: {0}")]
    NotRegistered(String),
    /// The commit's answer was lost: the row may exist. The node removes it
    /// if it does (see [`reconcile`]).
    #[error("the registration's outcome is unknown: {0}")]
    Unknown(String),
}

/// Where a new connection starts in its streams.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    /// Messages of the user's stream up to here are the client's backfill;
    /// later ones are routed to it live (see the migrations for why this is exact).
    pub user: i64,
    /// Broadcasts up to here were sent before the connection existed.
    pub broadcast: i64,
    /// Whether messages are parked for the user.
    pub parked: bool,
}

/// The longest a connect may wait for its user's stream, which a sender's
/// long transaction may hold: the client is then told to try again.
const ATTACH_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Registers a connection under its user's stream lock, fenced by the
/// node's incarnation. Every way it can fail says whether the row may exist.
pub async fn attach(
    pool: &PgPool,
    conn: &NewConnection<'_>,
    idle: Duration,
) -> Result<Heads, AttachError> {
    let bounds = Bounds {
        statement: ATTACH_LOCK_TIMEOUT + Duration::from_secs(1),
        idle,
        lock: Some(ATTACH_LOCK_TIMEOUT),
        asynchronous_commit: false,
    };
    let work = async {
        let mut tx = db::begin_bounded(pool, bounds).await?;
        let heads = sqlx::query!(
            r#"SELECT user_head AS "user_head!", broadcast_head AS "broadcast_head!", parked AS "parked!"
                 FROM relay.attach_connection($1, $2, $3, $4, $5, $6, $7, $8)"#,
            conn.id,
            conn.node_id.as_str(),
            conn.incarnation,
            conn.user_id,
            conn.protocol,
            conn.remote_addr,
            conn.user_agent,
            conn.max_per_user as i32,
        )
        .fetch_one(&mut *tx)
        .await?;
        Ok::<_, sqlx::Error>((tx, heads))
    };
    // Until COMMIT is sent, giving up rolls the transaction back.
    let (tx, heads) = match tokio::time::timeout(bounds.statement * 2, work).await {
        Err(_) => return Err(AttachError::NotRegistered("timed out".into())),
        Ok(Err(error)) if db::is_fenced(&error) => return Err(AttachError::Fenced),
        Ok(Err(error)) => {
            return Err(
                match error.as_database_error().and_then(|e| e.code()).as_deref() {
                    Some("PR429") => AttachError::TooMany,
                    _ => AttachError::NotRegistered(error.to_string()),
                },
            );
        }
        Ok(Ok(begun)) => begun,
    };
    match db::commit_within(tx, db::OP_TIMEOUT).await {
        Ok(()) => Ok(Heads {
            user: heads.user_head,
            broadcast: heads.broadcast_head,
            parked: heads.parked,
        }),
        Err(CommitError::RolledBack(error)) => Err(AttachError::NotRegistered(error.to_string())),
        Err(CommitError::Unknown(why)) => Err(AttachError::Unknown(why)),
    }
}

/// Every connection this node's rows name: its connection rows, and the
/// connections its claimed outbox rows still list.
pub async fn named(pool: &PgPool, node_id: &NodeId) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let rows = sqlx::query_scalar!(
        r#"
        SELECT id AS "id!" FROM relay.connections WHERE node_id = $1
        UNION
        SELECT unnest(connection_ids) FROM relay.outbox WHERE node_id = $1 AND claimed_at IS NOT NULL
        "#,
        node_id.as_str()
    )
    .fetch_all(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(rows)
}

/// How many connection rows this node has.
pub async fn count(pool: &PgPool, node_id: &NodeId) -> Result<i64, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let rows = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM relay.connections WHERE node_id = $1"#,
        node_id.as_str()
    )
    .fetch_one(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(rows)
}

/// Refreshes `last_seen_at` of the connections that showed signs of life.
/// Fenced (a re-registration waits for it, and then it changes nothing).
pub async fn refresh(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
    seen: &[Uuid],
) -> Result<(), sqlx::Error> {
    if seen.is_empty() {
        return Ok(());
    }
    let mut scope = crate::db::scope(pool).await?;
    sqlx::query!(
        r#"
        WITH alive AS (
            SELECT 1 FROM relay.nodes WHERE id = $2 AND incarnation = $3 FOR KEY SHARE
        )
        UPDATE relay.connections SET last_seen_at = now()
         WHERE id = ANY ($1) AND node_id = $2 AND EXISTS (SELECT 1 FROM alive)
        "#,
        seen,
        node_id.as_str(),
        incarnation
    )
    .execute(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(())
}

//! Node rows: registration, heartbeats and deregistration.

use sqlx::PgPool;
use uuid::Uuid;

use crate::config::NodeId;

/// Registers this process as `node_id`. A row left by an earlier process with
/// the same id (a crash, a restart) is taken over: its connections are gone
/// with that process, and its unfinished work is handed back first.
pub async fn register(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
    listen_addr: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query!("SELECT relay.release_node($1)", node_id.as_str())
        .execute(&mut *tx)
        .await?;
    sqlx::query!(
        r#"
        INSERT INTO relay.nodes (id, incarnation, listen_addr, version)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (id) DO UPDATE
           SET incarnation = excluded.incarnation, started_at = now(), last_seen_at = now(),
               listen_addr = excluded.listen_addr, version = excluded.version
        "#,
        node_id.as_str(),
        incarnation,
        listen_addr,
        env!("CARGO_PKG_VERSION"),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Refreshes this node's `last_seen_at` and that of the connections that
/// showed signs of life, in one transaction. Returns false when the node row is
/// no longer this process's (it was reaped, or another process took the id).
pub async fn heartbeat(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
    seen_connections: &[Uuid],
) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let alive = sqlx::query!(
        "UPDATE relay.nodes SET last_seen_at = now() WHERE id = $1 AND incarnation = $2",
        node_id.as_str(),
        incarnation
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if alive && !seen_connections.is_empty() {
        sqlx::query!(
            "UPDATE relay.connections SET last_seen_at = now() WHERE id = ANY($1) AND node_id = $2",
            seen_connections,
            node_id.as_str()
        )
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(alive)
}

/// Removes this node from the registry on a clean stop: its connections, its
/// unclaimed work (handed back), and messages its sessions had taken but not
/// written (parked for their users).
pub async fn deregister(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
    unsent: &[(i64, String)],
) -> Result<(), sqlx::Error> {
    let (message_ids, user_ids): (Vec<i64>, Vec<String>) = unsent.iter().cloned().unzip();
    let mut tx = pool.begin().await?;
    sqlx::query!("SELECT relay.release_node($1)", node_id.as_str())
        .execute(&mut *tx)
        .await?;
    super::connections::park(&mut tx, &message_ids, &user_ids).await?;
    sqlx::query!(
        "DELETE FROM relay.nodes WHERE id = $1 AND incarnation = $2",
        node_id.as_str(),
        incarnation
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// The incarnation registered under `node_id`, if any.
pub async fn owner(pool: &PgPool, node_id: &NodeId) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT incarnation FROM relay.nodes WHERE id = $1",
        node_id.as_str()
    )
    .fetch_optional(pool)
    .await
}

/// Makes the registry match the node's live sessions again after closed
/// sessions could not be removed (the database was away): removes the rows
/// of sockets that are gone, and parks what they had not written.
pub async fn reconcile(
    pool: &PgPool,
    node_id: &NodeId,
    live_sessions: &[Uuid],
    unparked: &[(i64, String)],
) -> Result<(), sqlx::Error> {
    let (message_ids, user_ids): (Vec<i64>, Vec<String>) = unparked.iter().cloned().unzip();
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "DELETE FROM relay.subscriptions WHERE node_id = $1 AND NOT (connection_id = ANY($2))",
        node_id.as_str(),
        live_sessions
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM relay.connections WHERE node_id = $1 AND NOT (id = ANY($2))",
        node_id.as_str(),
        live_sessions
    )
    .execute(&mut *tx)
    .await?;
    super::connections::park(&mut tx, &message_ids, &user_ids).await?;
    tx.commit().await
}

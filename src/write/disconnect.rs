//! Disconnect requests: the API's `DELETE /v1/connections/{id}` queues one
//! for the node that holds the socket, through its outbox, like any other
//! work routed there; its claimer closes the socket.

use sqlx::PgPool;
use uuid::Uuid;

use crate::config::NodeId;

/// Queues a disconnect of `connection` for the node that holds it, and
/// wakes that node, in one transaction. Returns that node's id; None when no
/// such connection is registered.
pub async fn request(pool: &PgPool, connection: Uuid) -> Result<Option<String>, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    let node = sqlx::query_scalar!(
        r#"
        INSERT INTO relay.outbox (node_id, kind, connection_ids)
        SELECT node_id, 'disconnect', ARRAY[id] FROM relay.connections WHERE id = $1
        RETURNING node_id AS "node_id!"
        "#,
        connection
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(node) = node else {
        return Ok(None);
    };
    sqlx::query!("SELECT pg_notify($1, '')", NodeId::channel_of(&node))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(node))
}

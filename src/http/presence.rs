//! Presence and membership: who is connected where, which nodes are alive,
//! and disconnecting a client.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiCaller, Problem};
use crate::node::NodeContext;

#[derive(Serialize)]
struct Connection {
    id: Uuid,
    node_id: String,
    user_id: String,
    protocol: String,
    connected_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
}

/// `GET /v1/users/{user}/connections`
pub async fn user_connections(
    State(ctx): State<Arc<NodeContext>>,
    _caller: ApiCaller,
    Path(user): Path<String>,
) -> Result<Json<Value>, Problem> {
    let connections = sqlx::query_as!(
        Connection,
        r#"
        SELECT id, node_id, user_id, protocol, connected_at, last_seen_at
          FROM relay.connections
         WHERE user_id = $1
         ORDER BY connected_at, id
        "#,
        user
    )
    .fetch_all(&ctx.pool)
    .await
    .map_err(Problem::from_db)?;
    Ok(Json(json!({ "connections": connections })))
}

#[derive(Serialize)]
struct Node {
    id: String,
    started_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    listen_addr: Option<String>,
    version: String,
}

/// `GET /v1/nodes`: live nodes only (heard from within the node timeout).
pub async fn nodes(
    State(ctx): State<Arc<NodeContext>>,
    _caller: ApiCaller,
) -> Result<Json<Value>, Problem> {
    let nodes = sqlx::query_as!(
        Node,
        r#"
        SELECT id, started_at, last_seen_at, listen_addr, version
          FROM relay.nodes
         WHERE last_seen_at > now() - make_interval(secs => $1)
         ORDER BY id
        "#,
        ctx.settings.node_timeout.as_secs_f64()
    )
    .fetch_all(&ctx.pool)
    .await
    .map_err(Problem::from_db)?;
    Ok(Json(json!({ "nodes": nodes })))
}

/// `DELETE /v1/connections/{id}`: queues a disconnect for the node that holds
/// the socket (through its outbox, like any other work) and answers 202.
pub async fn disconnect(
    State(ctx): State<Arc<NodeContext>>,
    _caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let Ok(id) = Uuid::parse_str(&id) else {
        return Err(Problem::not_found(format!("{id:?} is not a connection id")));
    };
    let mut tx = ctx.pool.begin().await.map_err(Problem::from_db)?;
    let node = sqlx::query_scalar!(
        r#"
        INSERT INTO relay.outbox (node_id, kind, connection_ids)
        SELECT node_id, 'disconnect', ARRAY[id] FROM relay.connections WHERE id = $1
        RETURNING node_id AS "node_id!"
        "#,
        id
    )
    .fetch_optional(&mut *tx)
    .await
    .map_err(Problem::from_db)?
    .ok_or_else(|| Problem::not_found(format!("no connection {id}")))?;
    sqlx::query!("SELECT pg_notify('pgrelay.node.' || $1, '')", node)
        .execute(&mut *tx)
        .await
        .map_err(Problem::from_db)?;
    tx.commit().await.map_err(Problem::from_db)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": id, "node_id": node, "state": "disconnecting" })),
    ))
}

//! Presence and membership: who is connected where, which nodes are alive,
//! and disconnecting a client (a request the write side queues).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::problem::ProblemDetails;
use super::{ApiCaller, Problem};
use crate::db;
use crate::state::NodeState;
use crate::write::disconnect;

/// A live WebSocket connection.
#[derive(Serialize, ToSchema)]
pub struct Connection {
    id: Uuid,
    node_id: String,
    user_id: String,
    /// `pgrelay.v1` (the JSON protocol) or `stomp`.
    protocol: String,
    connected_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
}

#[derive(Serialize, ToSchema)]
pub struct ConnectionList {
    connections: Vec<Connection>,
}

/// A user's connections
///
/// Presence: the user's live connections and the nodes that hold them.
#[utoipa::path(
    get,
    path = "/v1/users/{user}/connections",
    tag = "presence",
    params(("user" = String, Path, description = "The user id")),
    responses(
        (status = 200, description = "The user's connections (none when offline)", body = ConnectionList),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn user_connections(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
    Path(user): Path<String>,
) -> Result<Json<ConnectionList>, Problem> {
    let mut scope = db::scope(&ctx.db.pool).await.map_err(Problem::from_db)?;
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
    .fetch_all(&mut *scope)
    .await
    .map_err(Problem::from_db)?;
    scope.end().await.map_err(Problem::from_db)?;
    Ok(Json(ConnectionList { connections }))
}

/// Which connections to list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConnectionFilter {
    /// Only this node's connections.
    node: Option<String>,
    /// The `next` of an earlier answer: the page after it, with that
    /// answer's filter (pass no `node` with it).
    cursor: Option<String>,
    /// At most this many per page, newest first (1 to 1000; default 100).
    limit: Option<i64>,
}

/// One page of live connections.
#[derive(Serialize, ToSchema)]
pub struct ConnectionPage {
    connections: Vec<Connection>,
    /// Pass as `cursor` for the next page; null on the last one.
    next: Option<String>,
}

/// Where a listing of connections is (opaque to clients).
#[derive(Serialize, Deserialize)]
struct ConnectionCursor {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node: Option<String>,
    /// The last connection returned, by (connected_at, id), both descending.
    after: (DateTime<Utc>, Uuid),
}

/// Live connections
///
/// The newest live connections, cluster-wide or on one node.
#[utoipa::path(
    get,
    path = "/v1/connections",
    tag = "presence",
    params(ConnectionFilter),
    responses(
        (status = 200, description = "Connections, newest first, a page at a time", body = ConnectionPage),
        (status = 400, description = "Bad filter", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn connections(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
    filter: Result<Query<ConnectionFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ConnectionPage>, Problem> {
    let (filter, limit) = listing(filter, |f| f.limit)?;
    let (node, after) = match &filter.cursor {
        Some(cursor) => {
            if filter.node.is_some() {
                return Err(Problem::bad_request(
                    "bad_query",
                    "`cursor` carries the filter of the answer it came from: pass it alone (with `limit`)",
                ));
            }
            let cursor: ConnectionCursor = crate::cursor::decode(cursor)
                .map_err(|e| Problem::bad_request("bad_cursor", e.to_string()))?;
            (cursor.node, Some(cursor.after))
        }
        None => (filter.node, None),
    };
    // Keyset order: a connection live throughout the listing is on exactly
    // one page, whatever connects or leaves meanwhile.
    let mut scope = db::scope(&ctx.db.pool).await.map_err(Problem::from_db)?;
    let connections = sqlx::query_as!(
        Connection,
        r#"
        SELECT id, node_id, user_id, protocol, connected_at, last_seen_at
          FROM relay.connections
         WHERE ($1::text IS NULL OR node_id = $1)
           AND ($2::timestamptz IS NULL OR (connected_at, id) < ($2, $3))
         ORDER BY connected_at DESC, id DESC
         LIMIT $4
        "#,
        node.as_deref(),
        after.map(|(at, _)| at),
        after.map(|(_, id)| id),
        limit + 1
    )
    .fetch_all(&mut *scope)
    .await
    .map_err(Problem::from_db)?;
    scope.end().await.map_err(Problem::from_db)?;
    let mut connections = connections;
    // One more than the page says whether there is a next one.
    let next = if connections.len() as i64 > limit {
        connections.truncate(limit as usize);
        connections.last().map(|last| {
            crate::cursor::encode(&ConnectionCursor {
                node: node.clone(),
                after: (last.connected_at, last.id),
            })
        })
    } else {
        None
    };
    Ok(Json(ConnectionPage { connections, next }))
}

/// A live node.
#[derive(Serialize, ToSchema)]
pub struct Node {
    id: String,
    started_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    /// The address the node listens on, as configured.
    listen_addr: Option<String>,
    version: String,
    /// Its live connections.
    connections: i64,
}

#[derive(Serialize, ToSchema)]
pub struct NodeList {
    nodes: Vec<Node>,
}

/// Live nodes
///
/// Nodes heard from within `PGRELAY_NODE_TIMEOUT`, with their connection counts.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "presence",
    responses(
        (status = 200, description = "The live nodes", body = NodeList),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn nodes(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
) -> Result<Json<NodeList>, Problem> {
    let mut scope = db::scope(&ctx.db.pool).await.map_err(Problem::from_db)?;
    let nodes = sqlx::query_as!(
        Node,
        r#"
        SELECT n.id, n.started_at, n.last_seen_at, n.listen_addr, n.version,
               (SELECT count(*) FROM relay.connections c WHERE c.node_id = n.id) AS "connections!"
          FROM relay.nodes n
         WHERE n.last_seen_at > now() - make_interval(secs => $1)
         ORDER BY n.id
        "#,
        ctx.settings.node_timeout.as_secs_f64()
    )
    .fetch_all(&mut *scope)
    .await
    .map_err(Problem::from_db)?;
    scope.end().await.map_err(Problem::from_db)?;
    Ok(Json(NodeList { nodes }))
}

/// A disconnect on its way.
#[derive(Serialize, ToSchema)]
pub struct Disconnecting {
    id: Uuid,
    /// The node that holds the socket.
    node_id: String,
    /// Always `disconnecting`.
    state: &'static str,
}

/// Disconnect a client
///
/// Queues a disconnect for the node that holds the socket (through its
/// outbox, like any other work); the socket closes with 1008.
#[utoipa::path(
    delete,
    path = "/v1/connections/{id}",
    tag = "presence",
    params(("id" = String, Path, description = "The connection id")),
    responses(
        (status = 202, description = "The holding node has been told", body = Disconnecting),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn disconnect(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Disconnecting>), Problem> {
    let Ok(id) = Uuid::parse_str(&id) else {
        return Err(Problem::not_found(format!("{id:?} is not a connection id")));
    };
    let node = disconnect::request(&ctx.db.pool, id)
        .await
        .map_err(Problem::from_db)?
        .ok_or_else(|| Problem::not_found(format!("no connection {id}")))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Disconnecting {
            id,
            node_id: node,
            state: "disconnecting",
        }),
    ))
}

/// A listing's filter and its `limit` (1 to 1000; default 100).
pub(super) fn listing<T>(
    filter: Result<Query<T>, axum::extract::rejection::QueryRejection>,
    limit: impl Fn(&T) -> Option<i64>,
) -> Result<(T, i64), Problem> {
    let Query(filter) = filter.map_err(|e| Problem::bad_request("bad_query", e.body_text()))?;
    let limit = limit(&filter).unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request(
            "bad_limit",
            "`limit` must be 1 to 1000",
        ));
    }
    Ok((filter, limit))
}

//! Liveness and readiness, for load balancers and orchestrators.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::Problem;
use crate::node::NodeContext;

/// The process is up.
pub async fn healthz(State(ctx): State<Arc<NodeContext>>) -> Json<Value> {
    Json(json!({ "status": "ok", "node_id": ctx.node_id.as_str() }))
}

/// The node can do its work: the database answers and the LISTEN connection
/// is up.
pub async fn readyz(State(ctx): State<Arc<NodeContext>>) -> Result<Json<Value>, Problem> {
    let ping = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query!("SELECT 1 AS one").fetch_one(&ctx.pool),
    )
    .await;
    match ping {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            return Err(Problem::unavailable(format!(
                "the database is unavailable: {error}"
            )));
        }
        Err(_) => {
            return Err(Problem::unavailable(
                "the database did not answer within 2 s",
            ));
        }
    }
    if !ctx.listener_up.load(Ordering::Acquire) {
        return Err(Problem::unavailable("the LISTEN connection is down"));
    }
    Ok(Json(
        json!({ "status": "ready", "node_id": ctx.node_id.as_str() }),
    ))
}

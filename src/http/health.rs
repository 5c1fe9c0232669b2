//! Liveness and readiness, for load balancers and orchestrators.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::Problem;
use super::problem::ProblemDetails;
use crate::node::NodeContext;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok` (healthz) or `ready` (readyz).
    status: &'static str,
    node_id: String,
}

/// Liveness
///
/// The process is up. No credentials needed.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses((status = 200, description = "Up", body = Health))
)]
pub async fn healthz(State(ctx): State<Arc<NodeContext>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        node_id: ctx.node_id.to_string(),
    })
}

/// Readiness
///
/// The node can do its work: the database answers and the LISTEN connection
/// is up. No credentials needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready; the detail says why", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(ctx): State<Arc<NodeContext>>) -> Result<Json<Health>, Problem> {
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
    Ok(Json(Health {
        status: "ready",
        node_id: ctx.node_id.to_string(),
    }))
}

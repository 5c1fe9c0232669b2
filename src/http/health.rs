//! Liveness and readiness, for load balancers and orchestrators.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::Problem;
use super::problem::ProblemDetails;
use crate::state::NodeState;

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
pub async fn healthz(State(ctx): State<Arc<NodeState>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        node_id: ctx.node_id.to_string(),
    })
}

/// Readiness
///
/// The node can do its work: its last heartbeat succeeded (lately), it is
/// registered (not re-registering after being declared dead), and its LISTEN
/// connection is up. Answered at once from what the node knows: it never
/// waits for the database. No credentials needed.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Not ready; the detail says why", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub async fn readyz(State(ctx): State<Arc<NodeState>>) -> Result<Json<Health>, Problem> {
    if let Some(reason) = ctx.not_ready() {
        return Err(Problem::unavailable(reason));
    }
    Ok(Json(Health {
        status: "ready",
        node_id: ctx.node_id.to_string(),
    }))
}

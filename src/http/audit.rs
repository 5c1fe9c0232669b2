//! What an operator asks the cluster: its status (what is stuck, where) and
//! the deliveries as they are recorded (what `pgrelay tail` follows).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::presence::listing;
use super::problem::ProblemDetails;
use super::{ApiCaller, Problem};
use crate::state::NodeState;

/// Cluster status
///
/// What is stuck, where: every registered node with its connections and
/// outbox backlog, the parked total, the oldest pending work and the sweeper.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "presence",
    responses(
        (status = 200, description = "The cluster's state", body = crate::status::ClusterStatus),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn status(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
) -> Result<Json<crate::status::ClusterStatus>, Problem> {
    crate::status::read(&ctx.db.pool, ctx.settings.node_timeout)
        .await
        .map(Json)
        .map_err(Problem::from_db)
}

/// Which deliveries to list.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryFilter {
    /// Deliveries at or after this time (RFC 3339); default: the last minute.
    since: Option<DateTime<Utc>>,
    /// Only this user's.
    user: Option<String>,
    /// Only this node's.
    node: Option<String>,
    /// At most this many, oldest first (1 to 1000; default 100).
    limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    deliveries: Vec<crate::status::DeliveryEvent>,
}

/// Recent deliveries
///
/// Deliveries as they are recorded, oldest first: what `pgrelay tail` follows.
#[utoipa::path(
    get,
    path = "/v1/deliveries",
    tag = "messages",
    params(DeliveryFilter),
    responses(
        (status = 200, description = "Deliveries, oldest first", body = DeliveryList),
        (status = 400, description = "Bad filter", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn deliveries(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
    filter: Result<Query<DeliveryFilter>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryList>, Problem> {
    let (filter, limit) = listing(filter, |f| f.limit)?;
    let since = filter
        .since
        .unwrap_or_else(|| Utc::now() - chrono::Duration::minutes(1));
    let deliveries = crate::status::deliveries_since(
        &ctx.db.pool,
        since,
        filter.user.as_deref(),
        filter.node.as_deref(),
        limit,
    )
    .await
    .map_err(Problem::from_db)?;
    Ok(Json(DeliveryList { deliveries }))
}

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
use crate::status::DeliveryCursor;

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
    let mut status = crate::status::read(&ctx.db.pool, ctx.settings.node_timeout)
        .await
        .map_err(Problem::from_db)?;
    let plan = &ctx.lifecycle.plan;
    status.answered_by = Some(crate::status::AnsweringNode {
        id: ctx.node_id.to_string(),
        database_pooler: plan.pooler_name().to_owned(),
        wakeups: plan.wakeups.name().to_owned(),
        poll_interval_ms: ctx.poll_interval().as_millis() as u64,
        poll_only_reason: match &plan.wakeups {
            crate::db::pooling::Wakeups::PollOnly { reason } => Some(reason.clone()),
            crate::db::pooling::Wakeups::Notify { .. } => None,
        },
    });
    Ok(Json(status))
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
    /// The `next` of an earlier answer: the page after it, with that
    /// answer's filters (pass no other filter with it).
    cursor: Option<String>,
    /// At most this many (1 to 1000; default 100).
    limit: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct DeliveryList {
    deliveries: Vec<crate::status::DeliveryEvent>,
    /// Pass as `cursor` for what comes after (always present: deliveries
    /// recorded later come after it too).
    next: String,
}

/// Recorded deliveries
///
/// Deliveries in the order they were recorded, paged by an opaque cursor:
/// following `next` lists each delivery exactly once, whenever its record
/// committed. What `pgrelay tail` follows.
#[utoipa::path(
    get,
    path = "/v1/deliveries",
    tag = "messages",
    params(DeliveryFilter),
    responses(
        (status = 200, description = "Deliveries, in the order they were recorded", body = DeliveryList),
        (status = 400, description = "Bad filter or cursor", body = ProblemDetails, content_type = "application/problem+json"),
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
    let cursor = match filter.cursor {
        Some(cursor) => {
            if filter.since.is_some() || filter.user.is_some() || filter.node.is_some() {
                return Err(Problem::bad_request(
                    "bad_query",
                    "`cursor` carries the filters of the answer it came from: pass it alone (with `limit`)",
                ));
            }
            DeliveryCursor::decode(&cursor)
                .map_err(|e| Problem::bad_request("bad_cursor", e.to_string()))?
        }
        None => DeliveryCursor {
            since: filter
                .since
                .unwrap_or_else(|| Utc::now() - chrono::Duration::minutes(1)),
            user: filter.user,
            node: filter.node,
            after: None,
        },
    };
    let (deliveries, next) = crate::status::deliveries_page(&ctx.db.pool, &cursor, limit)
        .await
        .map_err(Problem::from_db)?;
    Ok(Json(DeliveryList {
        deliveries,
        next: next.encode(),
    }))
}

//! `/metrics`: the Prometheus exposition of what `crate::metrics` records.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::problem::ProblemDetails;
use super::{ApiCaller, Problem};
use crate::state::NodeState;

/// Metrics
///
/// Prometheus text exposition. A scraper sends the API key as a bearer
/// token, unless PGRELAY_METRICS_PUBLIC.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain; version=0.0.4", body = String),
        (status = 401, description = "No or bad API key (unless PGRELAY_METRICS_PUBLIC)", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security((), ("api_key" = []))
)]
pub async fn metrics(
    State(ctx): State<Arc<NodeState>>,
    caller: Result<ApiCaller, Problem>,
) -> Result<Response, Problem> {
    if !ctx.settings.exposure.metrics_public {
        caller?;
    }
    ctx.export_pool_gauges();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(),
    )
        .into_response())
}

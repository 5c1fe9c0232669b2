//! The HTTP API: JSON in and out, every error an RFC 9457
//! `application/problem+json` body.

mod auth;
mod health;
mod messages;
mod presence;
mod problem;
pub mod server;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::Html;
use axum::routing::{any, delete, get, post};
use tower_http::trace::TraceLayer;

pub use auth::ApiCaller;
pub use problem::Problem;

use crate::node::NodeContext;

/// The node's routes: HTTP API, WebSocket endpoint, health, and the page at `/`.
pub fn router(ctx: Arc<NodeContext>) -> Router {
    // Bodies are bounded by the message limit (a batch by many of them);
    // anything bigger is refused before it is read.
    let body_limit = (ctx.settings.max_message_bytes + 4096) * 2;
    let batch_limit = (ctx.settings.max_message_bytes + 4096)
        .saturating_mul(256)
        .min(256 << 20);
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/ws", any(crate::session::upgrade))
        .route("/v1/messages", post(messages::submit))
        .route(
            "/v1/messages/batch",
            post(messages::submit_batch).layer(DefaultBodyLimit::max(batch_limit)),
        )
        .route("/v1/messages/{id}", get(messages::get_one))
        .route(
            "/v1/users/{user}/connections",
            get(presence::user_connections),
        )
        .route("/v1/nodes", get(presence::nodes))
        .route("/v1/connections/{id}", delete(presence::disconnect))
        .fallback(|| async { Problem::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { Problem::method_not_allowed() })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            request_timeout,
        ))
        .layer(
            TraceLayer::new_for_http().on_failure(
                tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
            ),
        )
        .with_state(ctx)
}

/// A request (its body included) must complete within the request timeout:
/// a client trickling its body does not hold a connection for ever.
async fn request_timeout(
    axum::extract::State(ctx): axum::extract::State<Arc<NodeContext>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limit = ctx.settings.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request took longer than {} s", limit.as_secs_f64()),
        )
        .into_response(),
    }
}

async fn index(axum::extract::State(ctx): axum::extract::State<Arc<NodeContext>>) -> Html<String> {
    Html(include_str!("http/index.html").replace("{{node_id}}", ctx.node_id.as_str()))
}

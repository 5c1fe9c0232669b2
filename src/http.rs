//! The HTTP API: JSON in and out, every error an RFC 9457
//! `application/problem+json` body.

mod auth;
mod health;
mod messages;
mod presence;
mod problem;

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
        .layer(TraceLayer::new_for_http())
        .with_state(ctx)
}

async fn index(axum::extract::State(ctx): axum::extract::State<Arc<NodeContext>>) -> Html<String> {
    Html(include_str!("http/index.html").replace("{{node_id}}", ctx.node_id.as_str()))
}

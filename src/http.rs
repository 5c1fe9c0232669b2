//! The HTTP edge: the API (JSON in and out, every error an RFC 9457
//! `application/problem+json` body), the WebSocket upgrade ([`ws`]), health,
//! metrics and the API document, and the accept loop ([`server`]).
//!
//! Handlers turn requests into calls on the write side, the registry and
//! the status queries, and their answers into HTTP; sessions start here.
//! Nothing below imports this module, except the node that serves it.

mod audit;
pub mod auth;
mod health;
mod messages;
mod metrics;
pub mod openapi;
mod presence;
pub mod problem;
pub mod server;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

pub use auth::ApiCaller;
pub use problem::Problem;

use crate::state::NodeState;

/// The node's routes: HTTP API, WebSocket endpoint, health, metrics, and
/// the page at `/`. Each documented handler is registered together with its
/// OpenAPI description, so that the document cannot drift from the routes.
pub fn router(ctx: Arc<NodeState>) -> Router {
    let (api, document) = api_routes(&ctx.settings).split_for_parts();
    let document = openapi::Document(Arc::new(
        document
            .to_pretty_json()
            .expect("the OpenAPI document serializes"),
    ));
    let node_id = ctx.node_id.to_string();
    api.route("/", get(index))
        .route("/client.js", get(client_js))
        .fallback(|| async { Problem::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async { Problem::method_not_allowed() })
        .layer(axum::Extension(document))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            request_timeout,
        ))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(move |request: &axum::extract::Request| {
                    tracing::info_span!(
                        "request",
                        node_id = %node_id,
                        method = %request.method(),
                        path = %request.uri().path(),
                        message_id = tracing::field::Empty,
                    )
                })
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        )
        .with_state(ctx)
}

/// The documented routes, with their documentation.
pub fn api_routes(settings: &crate::config::Settings) -> OpenApiRouter<Arc<NodeState>> {
    // Bodies are bounded by the message limit (a batch by many of them);
    // anything bigger is refused before it is read.
    let body_limit = (settings.max_message_bytes + 4096) * 2;
    let batch_limit = (settings.max_message_bytes + 4096)
        .saturating_mul(256)
        .min(256 << 20);
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(metrics::metrics))
        .routes(routes!(openapi::document))
        .routes(routes!(ws::upgrade))
        .routes(routes!(messages::submit).layer(DefaultBodyLimit::max(body_limit)))
        .routes(routes!(messages::submit_batch).layer(DefaultBodyLimit::max(batch_limit)))
        .routes(routes!(messages::get_one))
        .routes(routes!(presence::user_connections))
        .routes(routes!(presence::nodes))
        .routes(routes!(presence::connections))
        .routes(routes!(presence::disconnect))
        .routes(routes!(audit::status))
        .routes(routes!(audit::deliveries))
}

/// The OpenAPI document of this version, as `/v1/openapi.json` serves it.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_routes(&crate::config::Settings::new("")).into_openapi()
}

/// A request (its body included) must complete within the request timeout:
/// a client trickling its body does not hold a connection for ever.
async fn request_timeout(
    axum::extract::State(ctx): axum::extract::State<Arc<NodeState>>,
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

/// The official JavaScript client (`clients/js`, `@pgrelay/client`), as one
/// ES module: what the demo page imports, and any page can too (a module
/// from another origin needs CORS; the file is public, like the code).
async fn client_js() -> Response {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "text/javascript; charset=utf-8",
            ),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
            (axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        include_str!("../clients/js/src/index.js"),
    )
        .into_response()
}

/// The demo page when it is on (`pgrelay dev`, `serve --demo`); otherwise a
/// pointer to the API.
async fn index(axum::extract::State(ctx): axum::extract::State<Arc<NodeState>>) -> Response {
    if !ctx.settings.exposure.demo {
        return (
            [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!(
                "pgrelay node {}: the API is described at /v1/openapi.json; the demo page is off (--demo)\n",
                ctx.node_id
            ),
        )
            .into_response();
    }
    let auth = match ctx.settings.auth {
        crate::config::Auth::None => "none",
        crate::config::Auth::Jwt { .. } => "jwt",
    };
    Html(
        include_str!("http/demo.html")
            .replace("{{node_id}}", ctx.node_id.as_str())
            .replace("{{auth}}", auth),
    )
    .into_response()
}

//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! types, (see `http::router`, which registers each handler with its
//! documentation in one step).

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::problem::ProblemDetails;
use super::{ApiCaller, Problem};
use crate::state::NodeState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "pgrelay",
        description = "Cluster-wide WebSocket delivery on PostgreSQL. Every error answer is \
                       `application/problem+json` (RFC 9457). The WebSocket protocols (the \
                       `pgrelay.v1` JSON protocol and STOMP 1.2) are described in the README.",
        license(name = "MIT OR Apache-2.0")
    ),
    modifiers(&ApiKeyScheme),
    tags(
        (name = "messages", description = "Sending, and what became of a message"),
        (name = "presence", description = "Who is connected where"),
        (name = "websocket", description = "Clients connect here"),
        (name = "operations", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key (PGRELAY_API_KEYS or `pgrelay keys create`); not needed with \
                         auth `none`.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document, rendered once when the router is built.
#[derive(Clone)]
pub struct Document(pub Arc<String>);

/// This document
///
/// The OpenAPI 3.1 description of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The document", content_type = "application/json", body = Object),
        (status = 401, description = "No or bad API key (unless PGRELAY_OPENAPI_PUBLIC)", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security((), ("api_key" = []))
)]
pub async fn document(
    State(ctx): State<Arc<NodeState>>,
    axum::Extension(document): axum::Extension<Document>,
    caller: Result<ApiCaller, Problem>,
) -> Result<Response, Problem> {
    if !ctx.settings.exposure.openapi_public {
        caller?;
    }
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        document.0.as_str().to_owned(),
    )
        .into_response())
}

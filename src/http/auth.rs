//! API-key authentication for the HTTP API.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;

use super::Problem;
use crate::auth::{ApiKeys, bearer};
use crate::config::Auth;
use crate::node::NodeContext;

/// Proof that the request carries a valid API key (or that auth is `none`).
pub struct ApiCaller {
    /// What the caller's idempotency keys are scoped to.
    pub scope: String,
}

impl FromRequestParts<Arc<NodeContext>> for ApiCaller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &Arc<NodeContext>,
    ) -> Result<Self, Self::Rejection> {
        let Auth::Jwt { api_keys, .. } = &ctx.settings.auth else {
            return Ok(ApiCaller {
                scope: "anonymous".into(),
            });
        };
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        match presented {
            Some(key) if api_keys.accepts(key) => Ok(ApiCaller {
                scope: ApiKeys::scope_of(key),
            }),
            Some(_) => Err(Problem::unauthorized("the API key is not valid")),
            None => Err(Problem::unauthorized(
                "an API key is required: send `Authorization: Bearer <api key>`",
            )),
        }
    }
}

//! API-key authentication for the HTTP API, and the task that reloads the
//! keys stored in `relay.api_keys`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use tokio_util::sync::CancellationToken;

use super::Problem;
use crate::auth::{ApiKeys, bearer};
use crate::config::Auth;
use crate::db;
use crate::metrics as m;
use crate::state::NodeState;

/// Proof that the request carries a valid API key (or that auth is `none`).
pub struct ApiCaller {
    /// What the caller's idempotency keys are scoped to.
    pub scope: String,
}

impl FromRequestParts<Arc<NodeState>> for ApiCaller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        ctx: &Arc<NodeState>,
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

/// Reloads the API keys stored in `relay.api_keys` every few seconds: a key
/// added or revoked there takes effect on every node without a restart.
pub async fn run_api_keys(ctx: Arc<NodeState>, keys: ApiKeys, token: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        if let Err(error) = api_keys_once(&ctx, &keys).await {
            metrics::counter!(m::DB_ERRORS, "operation" => "api_keys").increment(1);
            tracing::warn!(%error, "could not reload the API keys");
        }
    }
}

/// Loads the live keys of `relay.api_keys` into `keys`.
pub async fn api_keys_once(ctx: &NodeState, keys: &ApiKeys) -> Result<(), sqlx::Error> {
    let digests = db::bounded(async {
        let mut scope = db::scope(&ctx.db.pool).await?;
        let digests =
            sqlx::query_scalar!("SELECT key_digest FROM relay.api_keys WHERE revoked_at IS NULL")
                .fetch_all(&mut *scope)
                .await?;
        scope.end().await?;
        Ok(digests)
    })
    .await?;
    keys.set_stored(
        digests
            .into_iter()
            .filter_map(|d| d.try_into().ok())
            .collect(),
    );
    Ok(())
}

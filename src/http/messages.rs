//! `POST /v1/messages` and `GET /v1/messages/{id}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::{ApiCaller, Problem};
use crate::message::{MAX_DESTINATION_BYTES, NewMessage, Target};
use crate::node::NodeContext;
use crate::router::{self, Source};

/// A submission never waits longer than this for the database: past it, the
/// caller gets 503 (the contract promises an answer within 5 s).
const SUBMIT_TIMEOUT: Duration = Duration::from_millis(4500);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    to: Value,
    #[serde(default)]
    destination: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// Validates one submission against the contract and the node's limits.
fn parse_message(body: SubmitBody, ctx: &NodeContext) -> Result<NewMessage, Problem> {
    let target = Target::from_json(&body.to).map_err(|e| Problem::bad_request("bad_target", e))?;
    let Some(data) = body.data else {
        return Err(Problem::bad_request(
            "missing_data",
            "`data` is required (any JSON value)",
        ));
    };
    let limit = ctx.settings.max_message_bytes;
    if data.get().len() > limit {
        return Err(Problem::too_large(format!(
            "`data` is {} bytes; the limit is {limit} (PGRELAY_MAX_MESSAGE_BYTES)",
            data.get().len()
        )));
    }
    if let Some(destination) = &body.destination
        && (destination.is_empty() || destination.len() > MAX_DESTINATION_BYTES)
    {
        return Err(Problem::bad_request(
            "bad_destination",
            format!("`destination` must be 1 to {MAX_DESTINATION_BYTES} bytes"),
        ));
    }
    if let Some(ttl) = body.ttl_s {
        let retention = ctx.settings.retention.as_secs();
        if ttl == 0 || ttl > retention {
            return Err(Problem::bad_request(
                "bad_ttl",
                format!("`ttl_s` must be between 1 and the retention ({retention} s)"),
            ));
        }
    }
    Ok(NewMessage {
        target,
        destination: body.destination,
        data,
        ttl_secs: body.ttl_s,
    })
}

fn decode<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Problem> {
    serde_json::from_slice(body)
        .map_err(|e| Problem::bad_request("bad_json", format!("the body is not valid: {e}")))
}

/// Stores and routes one message; answers 202 with its id once committed.
pub async fn submit(
    State(ctx): State<Arc<NodeContext>>,
    _caller: ApiCaller,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let message = parse_message(decode(&body)?, &ctx)?;
    let ids = store(&ctx, &[message]).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": ids[0].to_string() })),
    ))
}

async fn store(ctx: &NodeContext, messages: &[NewMessage]) -> Result<Vec<i64>, Problem> {
    match tokio::time::timeout(
        SUBMIT_TIMEOUT,
        router::enqueue(&ctx.pool, messages, Source::Http),
    )
    .await
    {
        Ok(result) => Ok(result?),
        Err(_) => Err(Problem::unavailable(
            "the database did not answer in time; the message may not have been stored",
        )),
    }
}

#[derive(Serialize)]
struct Delivery {
    connection_id: String,
    user_id: String,
    node_id: String,
    delivered_at: DateTime<Utc>,
    acked_at: Option<DateTime<Utc>>,
}

/// A message, its state and its deliveries.
pub async fn get_one(
    State(ctx): State<Arc<NodeContext>>,
    _caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, Problem> {
    let Ok(id) = id.parse::<i64>() else {
        return Err(Problem::not_found(format!("{id:?} is not a message id")));
    };
    let message = sqlx::query!(
        r#"
        SELECT m.id, m.target, m.destination, m.data, m.created_at, m.expires_at, s.state AS "state!"
          FROM relay.messages m
          JOIN relay.message_states s ON s.id = m.id
         WHERE m.id = $1
        "#,
        id
    )
    .fetch_optional(&ctx.pool)
    .await
    .map_err(Problem::from_db)?
    .ok_or_else(|| Problem::not_found(format!("no message {id} (it may be past retention)")))?;
    let deliveries = sqlx::query_as!(
        Delivery,
        r#"
        SELECT connection_id::text AS "connection_id!", user_id, node_id, delivered_at, acked_at
          FROM relay.deliveries
         WHERE message_id = $1
         ORDER BY delivered_at, connection_id
        "#,
        id
    )
    .fetch_all(&ctx.pool)
    .await
    .map_err(Problem::from_db)?;
    Ok(Json(json!({
        "id": message.id.to_string(),
        "to": message.target,
        "destination": message.destination,
        "data": message.data,
        "created_at": message.created_at,
        "expires_at": message.expires_at,
        "state": message.state,
        "deliveries": deliveries,
    })))
}

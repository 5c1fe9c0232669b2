//! `POST /v1/messages` and `GET /v1/messages/{id}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::problem::ProblemDetails;
use super::{ApiCaller, Problem};
use crate::db;
use crate::message::{MessageRow, NewMessage, Payload, Presentation, StoredMessage, Target};
use crate::state::NodeState;
use crate::write::enqueue::{self, Source};
use crate::write::idempotency::{self, Keyed, KeyedOutcome};
use crate::write::parse::{self, Draft, Refusal, Rules};

/// A message to send.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// Who receives it: exactly one of the forms.
    #[schema(value_type = Recipient)]
    to: Value,
    /// Where the client files it (STOMP clients subscribe to it, e.g.
    /// `/queue/notifications`); up to 255 bytes.
    #[serde(default)]
    destination: Option<String>,
    /// Any JSON value, up to `PGRELAY_MAX_MESSAGE_BYTES`.
    #[serde(default)]
    #[schema(value_type = Value)]
    data: Option<Box<RawValue>>,
    /// Seconds until the message expires undelivered (1 to the retention).
    #[serde(default)]
    #[schema(minimum = 1)]
    ttl_s: Option<u64>,
}

/// The recipients of a message (the `to` object).
#[derive(ToSchema)]
#[allow(dead_code)] // Read from JSON by `Target::from_json`: this is its schema.
pub enum Recipient {
    /// Every connection of one user; kept for the user while none is connected.
    User { user: String },
    /// Each of up to 1000 users.
    Users { users: Vec<String> },
    /// One connection, by id.
    Connection { connection: uuid::Uuid },
    /// The subscribers of a topic.
    Topic { topic: String },
    /// One consumer of a queue (STOMP backends consume queues).
    Queue { queue: String },
    /// Every connection.
    Broadcast { broadcast: bool },
}

/// A stored message's id.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// The message id (a decimal string).
    #[schema(example = "42")]
    id: String,
}

/// A stored batch's ids, in the order of the request.
#[derive(Serialize, ToSchema)]
pub struct BatchAccepted {
    ids: Vec<String>,
}

/// Reads one submission and checks it against the rules every message
/// follows ([`parse`]).
fn parse_message(body: SubmitBody, ctx: &NodeState) -> Result<NewMessage, Problem> {
    let target = Target::from_json(&body.to).map_err(|e| Problem::bad_request("bad_target", e))?;
    let Some(data) = body.data else {
        return Err(Problem::bad_request(
            "missing_data",
            "`data` is required (any JSON value)",
        ));
    };
    let draft = Draft {
        target,
        destination: body.destination,
        payload: Payload::Json(Arc::from(data)),
        ttl_secs: body.ttl_s,
        headers: Vec::new(),
    };
    parse::check(draft, &Rules::of(&ctx.settings)).map_err(|refusal| {
        let code = match refusal {
            Refusal::TooLarge { .. } => return Problem::too_large(refusal.to_string()),
            Refusal::TooDeep => "bad_data",
            Refusal::BadDestination => "bad_destination",
            Refusal::BadTtl { .. } => "bad_ttl",
            Refusal::HeadersTooLarge { .. } => "bad_headers",
        };
        Problem::bad_request(code, refusal.to_string())
    })
}

fn decode<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, Problem> {
    serde_json::from_slice(body)
        .map_err(|e| Problem::bad_request("bad_json", format!("the body is not valid: {e}")))
}

/// Most messages in one `POST /v1/messages/batch`.
pub const MAX_BATCH: usize = 1000;

/// Send a message
///
/// Stores and routes one message; answers 202 with its id once it is
/// committed (200 with the same body for a replayed `Idempotency-Key`).
#[utoipa::path(
    post,
    path = "/v1/messages",
    tag = "messages",
    request_body(content = SubmitBody, content_type = "application/json"),
    params(IdempotencyKey),
    responses(
        (status = 202, description = "Stored; it is being delivered", body = Accepted,
            headers(("Location" = String, description = "`/v1/messages/{id}`: its state and deliveries"))),
        (status = 200, description = "A replay of an earlier request with this Idempotency-Key: nothing new was stored", body = Accepted),
        (status = 400, description = "Bad input", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "The Idempotency-Key was used with another request", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "`data` over the size limit", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "Over the API key's rate limit (see Retry-After)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable: nothing was stored, and it never will be", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 504, description = "Outcome unknown (`urn:pgrelay:problem:outcome-unknown`): the answer to COMMIT was lost, the message may be stored; retry with the same Idempotency-Key", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn submit(
    State(ctx): State<Arc<NodeState>>,
    caller: ApiCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, [(HeaderName, String); 1], Json<Accepted>), Problem> {
    rate_limit(&ctx, &caller, 1)?;
    let message = parse_message(decode(&body)?, &ctx)?;
    let key = idempotency_key(&headers)?;
    let (status, ids) = store(&ctx, &caller, key, "single", &body, &[message]).await?;
    tracing::Span::current().record("message_id", ids[0]);
    tracing::debug!(
        message_id = ids[0],
        replay = status == StatusCode::OK,
        "stored"
    );
    // Where the message's state is read (a replay names the same).
    let location = format!("/v1/messages/{}", ids[0]);
    Ok((
        status,
        [(header::LOCATION, location)],
        Json(Accepted {
            id: ids[0].to_string(),
        }),
    ))
}

/// The `Idempotency-Key` request header.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Read by `idempotency_key`: this is its documentation.
pub struct IdempotencyKey {
    /// 1 to 255 visible ASCII characters; the same key (per API key, within
    /// the retention) with the same body sends once.
    #[param(rename = "Idempotency-Key")]
    idempotency_key: Option<String>,
}

/// Send a batch
///
/// Up to 1000 messages, stored in one transaction: all of them or none.
#[utoipa::path(
    post,
    path = "/v1/messages/batch",
    tag = "messages",
    request_body(content = Vec<SubmitBody>, content_type = "application/json"),
    params(IdempotencyKey),
    responses(
        (status = 202, description = "All stored", body = BatchAccepted),
        (status = 200, description = "A replay of an earlier request with this Idempotency-Key", body = BatchAccepted),
        (status = 400, description = "Bad input; the detail names the message (`messages[3]: …`)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such connection", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, description = "The Idempotency-Key was used with another request", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 413, description = "Over a size limit", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, description = "Over the API key's rate limit (each message counts)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable: nothing was stored, and it never will be", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 504, description = "Outcome unknown (`urn:pgrelay:problem:outcome-unknown`): the answer to COMMIT was lost, the message may be stored; retry with the same Idempotency-Key", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn submit_batch(
    State(ctx): State<Arc<NodeState>>,
    caller: ApiCaller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<BatchAccepted>), Problem> {
    let items: Vec<SubmitBody> = decode(&body)?;
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(Problem::bad_request(
            "bad_batch",
            format!("a batch holds 1 to {MAX_BATCH} messages"),
        ));
    }
    rate_limit(&ctx, &caller, items.len() as u32)?;
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let message = parse_message(item, &ctx).map_err(|mut problem| {
            problem.detail = format!("messages[{index}]: {}", problem.detail);
            problem
        })?;
        messages.push(message);
    }
    let key = idempotency_key(&headers)?;
    let (status, ids) = store(&ctx, &caller, key, "batch", &body, &messages).await?;
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    Ok((status, Json(BatchAccepted { ids })))
}

/// Messages per second per API key (not with auth `none`): a batch counts
/// each of its messages.
fn rate_limit(ctx: &NodeState, caller: &ApiCaller, messages: u32) -> Result<(), Problem> {
    if matches!(ctx.settings.auth, crate::config::Auth::None) {
        return Ok(());
    }
    ctx.write
        .api_limiter
        .check(&caller.scope, messages)
        .map_err(|wait| Problem {
            retry_after_secs: Some((wait.as_secs_f64().ceil() as u64).max(1)),
            ..Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} messages per second with this API key; retry later",
                    ctx.settings.limits.api_rate_limit
                ),
            )
        })
}

/// The `Idempotency-Key` header, if any.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    match key {
        Some(key) => Ok(Some(key.to_owned())),
        None => Err(Problem::bad_request(
            "bad_idempotency_key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )),
    }
}

/// Stores messages, honouring an idempotency key: the first request with a
/// key stores and answers 202; a later one with the same key and the same
/// body answers 200 with the same ids and stores nothing; the same key with
/// another body is a 409. Every answer is honest about what was stored (see
/// `write::enqueue`): by the deadline, or "outcome unknown".
async fn store(
    ctx: &NodeState,
    caller: &ApiCaller,
    key: Option<String>,
    kind: &str,
    body: &Bytes,
    messages: &[NewMessage],
) -> Result<(StatusCode, Vec<i64>), Problem> {
    let started = std::time::Instant::now();
    let deadline = enqueue::deadline(Source::Http);
    let stored = match key {
        // Shares a transaction with concurrent submissions (a batch stays
        // atomic within it).
        None => ctx
            .write
            .group_commit
            .submit_all(messages.to_vec(), Source::Http, deadline)
            .await
            .map(|ids| (StatusCode::ACCEPTED, ids)),
        Some(key) => {
            let hash = idempotency::request_hash(kind, body);
            let keyed = Keyed {
                scope: &caller.scope,
                key: &key,
                hash: &hash,
            };
            let stored = keyed
                .store(
                    &ctx.db.pool,
                    &ctx.write.slow_submissions,
                    messages,
                    deadline,
                )
                .await;
            match stored {
                Ok(KeyedOutcome::Stored(ids)) => Ok((StatusCode::ACCEPTED, ids)),
                Ok(KeyedOutcome::Replay(ids)) => Ok((StatusCode::OK, ids)),
                Ok(KeyedOutcome::Conflict) => {
                    return Err(Problem::new(
                        StatusCode::CONFLICT,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used with a different request",
                    ));
                }
                Err(error) => Err(error),
            }
        }
    };
    match stored {
        Ok(stored) => {
            if stored.0 == StatusCode::ACCEPTED {
                metrics::counter!(crate::metrics::MESSAGES_ACCEPTED, "source" => "http")
                    .increment(messages.len() as u64);
                metrics::histogram!(crate::metrics::SUBMIT_LATENCY)
                    .record(started.elapsed().as_secs_f64());
            }
            Ok(stored)
        }
        Err(error) => {
            metrics::counter!(crate::metrics::SUBMIT_OUTCOMES, "source" => "http", "outcome" => error.outcome())
                .increment(1);
            Err(error.into())
        }
    }
}

/// One delivery of a message: a write to a socket.
#[derive(Serialize, ToSchema)]
pub struct Delivery {
    connection_id: String,
    user_id: String,
    node_id: String,
    delivered_at: DateTime<Utc>,
    acked_at: Option<DateTime<Utc>>,
}

/// Where a message stands.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// Not yet written to any socket.
    Pending,
    /// Written to at least one socket.
    Delivered,
    /// Acknowledged by at least one client.
    Acked,
    /// Expired before anyone got it.
    Expired,
}

/// A message, its state and its deliveries.
#[derive(Serialize, ToSchema)]
pub struct MessageView {
    id: String,
    #[schema(value_type = Recipient)]
    to: Value,
    destination: Option<String>,
    /// The JSON data; for a STOMP body, its JSON (JSON content types), its
    /// text (UTF-8), or null with `body_base64`.
    #[schema(value_type = Value)]
    data: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
    state: MessageState,
    deliveries: Vec<Delivery>,
}

/// Read a message
///
/// The message, its state and every delivery of it (within the retention).
#[utoipa::path(
    get,
    path = "/v1/messages/{id}",
    tag = "messages",
    params(("id" = String, Path, description = "The message id")),
    responses(
        (status = 200, description = "The message", body = MessageView),
        (status = 401, description = "No or bad API key", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, description = "No such message (or past retention)", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The database is unavailable", body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub async fn get_one(
    State(ctx): State<Arc<NodeState>>,
    _caller: ApiCaller,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, Problem> {
    let Ok(id) = id.parse::<i64>() else {
        return Err(Problem::not_found(format!("{id:?} is not a message id")));
    };
    let mut scope = db::scope(&ctx.db.pool).await.map_err(Problem::from_db)?;
    let message = sqlx::query!(
        r#"
        SELECT m.id, m.target, m.destination, m.data::text AS data, m.body, m.content_type,
               m.created_at, m.expires_at, s.state AS "state!"
          FROM relay.messages m
          JOIN relay.message_states s ON s.id = m.id
         WHERE m.id = $1
        "#,
        id
    )
    .fetch_optional(&mut *scope)
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
    .fetch_all(&mut *scope)
    .await
    .map_err(Problem::from_db)?;
    scope.end().await.map_err(Problem::from_db)?;
    let stored = StoredMessage::from_row(MessageRow {
        id: message.id,
        destination: None,
        data: message.data,
        body: message.body,
        content_type: message.content_type,
        created_at: message.created_at,
        target_connection: None,
        headers: None,
    });
    let (data, body_base64) = match stored.payload.presentation() {
        Presentation::Data(raw) => (serde_json::from_str(raw.get()).unwrap_or(Value::Null), None),
        Presentation::Text(text) => (Value::String(text.to_owned()), None),
        Presentation::Base64(encoded) => (Value::Null, Some(encoded)),
    };
    let state = match message.state.as_str() {
        "acked" => MessageState::Acked,
        "delivered" => MessageState::Delivered,
        "expired" => MessageState::Expired,
        _ => MessageState::Pending,
    };
    Ok(Json(MessageView {
        id: message.id.to_string(),
        to: message.target,
        destination: message.destination,
        data,
        body_base64,
        content_type: stored.payload.content_type().map(str::to_owned),
        created_at: message.created_at,
        expires_at: message.expires_at,
        state,
        deliveries,
    }))
}

//! `GET /v1/ws`: the WebSocket endpoint. Everything wrong with the request
//! is answered here, before the upgrade, with problem+json; the socket is
//! then handed to a [`crate::session`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::Deserialize;

use super::Problem;
use super::problem::ProblemDetails;
use super::server::ConnectionSlot;
use crate::auth::{Identity, bearer};
use crate::config::Auth;
use crate::protocol::Protocol;
use crate::session;
use crate::state::NodeState;

/// Room for the protocol around a message's data in an inbound frame.
const FRAME_OVERHEAD: usize = 16 * 1024;

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    since: Option<String>,
    refusal: Option<String>,
}

/// The query parameters of `GET /v1/ws`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Read as `WsQuery`: this is its documentation.
struct WsParams {
    /// A client JWT (browsers cannot set headers on a WebSocket); or send
    /// `Authorization: Bearer`, or (STOMP) authenticate in CONNECT.
    token: Option<String>,
    /// With auth `none` only: the user.
    user: Option<String>,
    /// Resume the user's stream after this message id.
    since: Option<String>,
    /// `close`: a refused token or user is answered after the upgrade, with
    /// close code 1008 and the problem as its reason (`unauthorized: …`),
    /// for clients that cannot read an HTTP answer to an upgrade (browsers
    /// see only 1006, as for a dead node). Without it, the 401 or 400.
    refusal: Option<String>,
}

/// Connect a client
///
/// Upgrades to a WebSocket. Subprotocol `pgrelay.v1` (or none) selects the
/// JSON protocol; `v12.stomp`, `v11.stomp` or `v10.stomp` selects STOMP.
/// Everything wrong with the request is answered with problem+json before
/// the upgrade; a STOMP client may instead authenticate in its CONNECT frame.
#[utoipa::path(
    get,
    path = "/v1/ws",
    tag = "websocket",
    params(WsParams),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket request, or a bad parameter", body = ProblemDetails, content_type = "application/problem+json"),
        (status = 401, description = "No or bad token", body = ProblemDetails, content_type = "application/problem+json"),
    )
)]
pub async fn upgrade(
    State(ctx): State<Arc<NodeState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    slot: Option<axum::Extension<ConnectionSlot>>,
    headers: HeaderMap,
    uri: Uri,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let mut ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return Problem::bad_request(
                "not_websocket",
                format!("{rejection}: connect with a WebSocket client"),
            )
            .into_response();
        }
    };
    let query = match Query::<WsQuery>::try_from_uri(&uri) {
        Ok(Query(query)) => query,
        Err(rejection) => {
            return Problem::bad_request("bad_query", rejection.body_text()).into_response();
        }
    };
    let since = match query.since.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(since)) if since >= 0 => Some(since),
        Some(_) => {
            return Problem::bad_request(
                "bad_since",
                "`since` must be a message id (a decimal number)",
            )
            .into_response();
        }
    };

    let offered: Vec<String> = ws
        .requested_protocols()
        .filter_map(|p| p.to_str().ok())
        .flat_map(|p| p.split(',').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let (protocol, confirmed) = Protocol::select(offered.iter().map(String::as_str));
    if let Some(name) = confirmed {
        ws.set_selected_protocol(HeaderValue::from_static(name));
    }

    let in_band = match query.refusal.as_deref() {
        None => false,
        Some("close") => true,
        Some(_) => {
            return Problem::bad_request("bad_refusal", "`refusal` may only be `close`")
                .into_response();
        }
    };
    let identity = match identify(&ctx, &headers, &query, protocol) {
        Ok(identity) => identity,
        Err(problem) if in_band => return refuse_in_band(ws, problem),
        Err(problem) => return problem.into_response(),
    };

    let accepted = slot
        .as_ref()
        .map_or_else(tokio::time::Instant::now, |slot| slot.accepted);
    let params = session::SessionParams {
        identity,
        since,
        accepted,
        protocol,
        transport: session::Transport::WebSocket,
        remote_addr: remote.to_string(),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect()),
    };
    let limit = ctx.settings.max_message_bytes + FRAME_OVERHEAD;
    // Small buffers: most sockets are idle most of the time, and these are
    // allocated per socket (the defaults are 128 KiB each); they grow when a
    // large message needs it.
    ws.read_buffer_size(1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_failed_upgrade(|error| tracing::debug!(%error, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            let tasks = ctx.lifecycle.tasks.clone();
            tasks.track_future(async move {
                // The connection's place under the node's cap, for as long as the socket lives.
                let _slot = slot;
                let (sink, incoming) = socket.split();
                session::run(ctx, sink, incoming, params).await;
            })
        })
}

/// The identity, when the request carries one. A STOMP client may present
/// it later, in CONNECT; a JSON client must present it now.
fn identify(
    ctx: &NodeState,
    headers: &HeaderMap,
    query: &WsQuery,
    protocol: Protocol,
) -> Result<Option<Identity>, Problem> {
    let identity = match &ctx.settings.auth {
        Auth::None => match query.user.as_deref() {
            Some(user) => Some(
                Identity::unauthenticated(user).map_err(|e| Problem::bad_request("bad_user", e))?,
            ),
            None => None,
        },
        Auth::Jwt { verifier, .. } => {
            let from_header = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer);
            match from_header.or(query.token.as_deref()) {
                Some(token) => Some(verifier.verify(token).map_err(Problem::unauthorized)?),
                None => None,
            }
        }
    };
    if identity.is_none() && protocol == Protocol::Json {
        return Err(match ctx.settings.auth {
            Auth::None => Problem::bad_request(
                "missing_user",
                "auth is `none`: name the user with ?user=<id>",
            ),
            Auth::Jwt { .. } => Problem::unauthorized(
                "a token is required: `Authorization: Bearer <jwt>` or ?token=<jwt>",
            ),
        });
    }
    Ok(identity)
}

/// Accepts the upgrade only to close at once with 1008 and the problem as
/// the reason (`<code>: <detail>`, cut to the 123 bytes a close frame holds).
fn refuse_in_band(ws: WebSocketUpgrade, problem: Problem) -> Response {
    let mut reason = format!("{}: {}", problem.code, problem.detail);
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.truncate(end);
    tracing::debug!(%reason, "WebSocket refused after the upgrade");
    ws.on_upgrade(move |socket| async move {
        let (mut sink, mut incoming) = socket.split();
        session::close_and_drain(&mut sink, &mut incoming, 1008, &reason).await;
    })
}

//! STOMP's CONNECT: read within the handshake deadline, version and
//! heart-beats agreed, the client authenticated (if the upgrade did not):
//! an API key as `passcode` names a trusted backend session (its `login`
//! names it), a JWT an end user.

use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::StreamExt;

use super::{Stomp, send_error};
use crate::auth::{Identity, bearer};
use crate::config::Auth;
use crate::protocol::stomp::{self, Frame, FrameLimits, Version};
use crate::session::serve::close_and_drain;
use crate::session::{Transport, WsSink, WsStream};
use crate::state::NodeState;

/// What a backend session is called when its CONNECT has no `login`.
const DEFAULT_BACKEND_NAME: &str = "backend";

reason_error!(
    /// Why a CONNECT was refused, for the client's ERROR frame.
    ConnectRefused
);

/// Reads CONNECT (or STOMP) and authenticates; answers the identity, the
/// session's state and the `since` the CONNECT names (a resume of the
/// user's stream, as `?since=` is). None when the client is refused (it
/// has been sent an ERROR and closed).
pub(in crate::session) async fn handshake<S: WsSink, I: WsStream>(
    ctx: &NodeState,
    sink: &mut S,
    incoming: &mut I,
    identity: Option<Identity>,
    transport: Transport,
    deadline: tokio::time::Instant,
) -> Option<(Identity, Stomp, Option<i64>)> {
    let limits = FrameLimits::new(ctx.settings.max_message_bytes);
    let outcome = async {
        let frame = loop {
            // One deadline from accept, whatever the client sends meanwhile
            // (heart-beats, pings): a socket that never connects is closed.
            let message = match tokio::time::timeout_at(deadline, incoming.next()).await {
                Ok(Some(Ok(message))) => message,
                // Too large, say: told, if the client still listens.
                Ok(Some(Err(error))) => {
                    return Err(Some(
                        format!("cannot read the CONNECT frame: {error}").into(),
                    ));
                }
                Ok(None) => return Err(None),
                Err(_) => return Err(Some("no CONNECT frame in time".into())),
            };
            let bytes = match &message {
                Message::Text(text) => text.as_bytes(),
                Message::Binary(bytes) => &bytes[..],
                Message::Close(_) => return Err(None),
                _ => continue,
            };
            match stomp::decode(bytes, Version::V1_2, &limits) {
                Ok(mut frames) if !frames.is_empty() => break frames.remove(0),
                Ok(_) => continue, // heart-beats
                Err(error) => return Err(Some(format!("malformed frame: {error}").into())),
            }
        };
        if frame.command != "CONNECT" && frame.command != "STOMP" {
            return Err(Some(
                format!("expected CONNECT, got {}", frame.command).into(),
            ));
        }
        let version = Version::negotiate(frame.header("accept-version"))
            .ok_or_else(|| Some("supported versions are 1.0, 1.1 and 1.2".into()))?;
        let (client_sends, client_wants) = stomp::heart_beat(frame.header("heart-beat"))
            .ok_or_else(|| Some("the heart-beat header must be two numbers: cx,cy".into()))?;
        let since = match frame.header("since").map(str::parse::<i64>) {
            None => None,
            Some(Ok(since)) if since >= 0 => Some(since),
            Some(_) => {
                return Err(Some(
                    "the since header must be a message id (a decimal number)".into(),
                ));
            }
        };
        let identity = match identity {
            Some(identity) => identity,
            None => connect_identity(ctx, &frame, transport).map_err(Some)?,
        };
        let ours = ctx.settings.heartbeat_interval.as_millis() as u64;
        let state = Stomp::new(
            version,
            limits,
            (client_wants > 0).then(|| Duration::from_millis(client_wants.max(ours))),
            (client_sends > 0).then(|| Duration::from_millis(client_sends.max(ours))),
        );
        Ok((identity, state, since))
    }
    .await;
    match outcome {
        Ok(accepted) => Some(accepted),
        Err(reason) => {
            if let Some(ConnectRefused(reason)) = reason {
                tracing::debug!(%reason, "STOMP connect refused");
                let _ = send_error(sink, Version::V1_2, &reason, None).await;
                close_and_drain(sink, incoming, 1008, "STOMP connect refused").await;
            }
            None
        }
    }
}

/// The identity in a CONNECT frame: an API key as `passcode` (a trusted
/// backend, named by `login`), a JWT as `passcode` or in an
/// `Authorization` header, or with auth `none` the `login` header (over
/// TCP, a backend: with no credentials anywhere, nothing sets it apart).
fn connect_identity(
    ctx: &NodeState,
    frame: &Frame,
    transport: Transport,
) -> Result<Identity, ConnectRefused> {
    let backend = |frame: &Frame| {
        let name = frame.header("login").filter(|l| !l.is_empty());
        Identity::backend(name.unwrap_or(DEFAULT_BACKEND_NAME)).map_err(|e| ConnectRefused(e.0))
    };
    match &ctx.settings.auth {
        Auth::None if transport == Transport::Tcp => backend(frame),
        Auth::Jwt { api_keys, .. }
            if frame
                .header("passcode")
                .is_some_and(|passcode| api_keys.accepts(passcode)) =>
        {
            backend(frame)
        }
        Auth::None => {
            let user = frame
                .header("login")
                .ok_or("auth is `none`: name the user with ?user=<id> or the login header")?;
            Identity::unauthenticated(user).map_err(|e| ConnectRefused(e.0))
        }
        Auth::Jwt { verifier, .. } => {
            let token = frame
                .header("passcode")
                .or_else(|| frame.header("Authorization").and_then(bearer))
                .or_else(|| frame.header("authorization").and_then(bearer))
                .ok_or(
                    "a token is required: as the passcode header (a JWT, or a backend's API key), or `Authorization: Bearer <jwt>`",
                )?;
            verifier.verify(token).map_err(|e| ConnectRefused(e.0))
        }
    }
}

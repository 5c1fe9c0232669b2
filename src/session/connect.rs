//! A session's start: the protocol's handshake (STOMP's CONNECT), the
//! connection's registration (in the hub first, then its row), and the
//! plan of what the client is sent before live messages.

use std::sync::Arc;

use tracing::Instrument;
use uuid::Uuid;

use super::json::Json;
use super::serve::close_and_drain;
use super::{Backfill, Half, Origin, Session, Start, Transport, WsSink, WsStream, stomp};
use crate::auth::Identity;
use crate::metrics as m;
use crate::protocol::Protocol;
use crate::read::delivery_log::Record;
use crate::registry::connections::{self, AttachError, NewConnection};
use crate::state::NodeState;

/// Who connected, and how.
pub struct SessionParams {
    /// None for a STOMP client that authenticates in CONNECT.
    pub identity: Option<Identity>,
    pub since: Option<i64>,
    /// When its TCP connection was accepted.
    pub accepted: tokio::time::Instant,
    pub protocol: Protocol,
    pub transport: Transport,
    pub remote_addr: String,
    pub user_agent: Option<String>,
}

/// Runs a session to its end.
///
/// Sessions are many and mostly idle, so the size of their future matters:
/// everything they await only now and then (database work, a backfill, a
/// burst of input) is boxed, and the idle state stays small; each protocol's
/// session is boxed too, so that a JSON session does not carry the room a
/// STOMP one needs.
pub async fn run<S: WsSink, I: WsStream>(
    ctx: Arc<NodeState>,
    mut sink: S,
    mut incoming: I,
    params: SessionParams,
) {
    let id = Uuid::now_v7();
    let span = tracing::info_span!(
        "session",
        node_id = %ctx.node_id,
        connection_id = %id,
        user_id = tracing::field::Empty,
        protocol = params.protocol.as_str(),
        transport = params.transport.as_str(),
    );
    async move {
        match params.protocol {
            Protocol::Json => {
                let identity = params.identity.clone().expect("checked at upgrade");
                Box::pin(start(
                    ctx,
                    sink,
                    incoming,
                    params,
                    id,
                    identity,
                    Json::default(),
                ))
                .await;
            }
            Protocol::Stomp => {
                let deadline = params.accepted + ctx.settings.limits.handshake_timeout;
                let accepted = Box::pin(stomp::handshake(
                    &ctx,
                    &mut sink,
                    &mut incoming,
                    params.identity.clone(),
                    params.transport,
                    deadline,
                ))
                .await;
                if let Some((identity, state, since)) = accepted {
                    let params = SessionParams {
                        since: params.since.or(since),
                        ..params
                    };
                    Box::pin(start(ctx, sink, incoming, params, id, identity, state)).await;
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// Registers the connection, then serves it until it ends.
async fn start<P: Half, S: WsSink, I: WsStream>(
    ctx: Arc<NodeState>,
    mut sink: S,
    mut incoming: I,
    params: SessionParams,
    id: Uuid,
    identity: Identity,
    proto: P,
) {
    tracing::Span::current().record("user_id", tracing::field::display(&identity.user_id));
    let user = identity.user_id.clone();
    // In the hub before the row commits: see Hub::register.
    let mut inbox = ctx.delivery.hub.register(id, ctx.settings.send_queue);
    let registration = NewConnection {
        id,
        node_id: &ctx.node_id,
        incarnation: ctx.incarnation(),
        user_id: &user,
        protocol: P::PROTOCOL.as_str(),
        remote_addr: &params.remote_addr,
        user_agent: params.user_agent.as_deref(),
        // A backend's sessions (one per browser, for Spring) all carry
        // its login: the per-user limit is for end users.
        max_per_user: if identity.backend {
            i32::MAX as u32
        } else {
            ctx.settings.limits.max_connections_per_user
        },
    };
    let attached = Box::pin(connections::attach(
        &ctx.db.pool,
        &registration,
        ctx.settings.idle_transaction_timeout(),
    ))
    .await;
    let heads = match attached {
        Ok(heads) => heads,
        Err(refused) => {
            ctx.delivery.hub.remove(id, &[]);
            let (code, reason) = match &refused {
                AttachError::TooMany => (1008, "too many connections for this user"),
                AttachError::Fenced => {
                    ctx.lifecycle
                        .registration
                        .report_fenced(registration.incarnation);
                    (1013, "node re-registering; reconnect")
                }
                AttachError::NotRegistered(error) => {
                    tracing::warn!(%error, "could not register the connection");
                    (1013, "cannot register the connection now; try again")
                }
                AttachError::Unknown(error) => {
                    // The row may exist: it departs (with anything routed to
                    // it meanwhile parked), now and again once the node
                    // reconciles its registry.
                    tracing::warn!(%error, "the connection's registration is in doubt");
                    ctx.registry_may_be_dirty();
                    ctx.delivery
                        .log
                        .record(Record::Departed {
                            connection_id: id,
                            done: None,
                        })
                        .await;
                    (1013, "cannot register the connection now; try again")
                }
            };
            proto.refuse(&mut sink, reason).await;
            metrics::counter!(
                m::CONNECTIONS_CLOSED,
                "protocol" => P::PROTOCOL.as_str(),
                "reason" => m::close_reason(code, reason)
            )
            .increment(1);
            close_and_drain(&mut sink, &mut incoming, code, reason).await;
            return;
        }
    };
    tracing::debug!(head = heads.user, since = ?params.since, "connected");
    let protocol = P::PROTOCOL.as_str();
    metrics::gauge!(m::CONNECTIONS, "protocol" => protocol).increment(1.0);
    metrics::counter!(m::CONNECTIONS_OPENED, "protocol" => protocol).increment(1);

    let start = Start {
        user_cursor: heads.user,
        broadcast_cursor: heads.broadcast,
        backfills: backfill_plan(params.since, heads),
    };
    let controls = inbox.controls();
    let mut session = Session::new(ctx, id, identity, sink, proto, controls, start);
    session.transport = params.transport;
    let Err(exit) = session.serve(&mut inbox, &mut incoming).await;
    Box::pin(session.finish(inbox, &mut incoming, exit)).await;
}

/// What a new connection is sent before live messages. Parked messages are
/// the user's messages that no socket of theirs has been written (a node
/// that died with them in a session's queue, a session closed before writing
/// them): they go to the next connection whatever its cursor. Without
/// `since`, that is all; with it, first those at or below the cursor (the
/// client may have seen them already, on a socket whose write was never
/// recorded: it dedupes by id), then the stream after the cursor. Each
/// connection's ids stay in increasing order.
pub(super) fn backfill_plan(since: Option<i64>, heads: connections::Heads) -> Vec<Backfill> {
    let mut plan = Vec::new();
    match since {
        None => {
            if heads.parked {
                plan.push(Backfill {
                    origin: Origin::Parked,
                    from: 0,
                    head: heads.user,
                });
            }
        }
        Some(since) => {
            if heads.parked {
                plan.push(Backfill {
                    origin: Origin::Parked,
                    from: 0,
                    head: since.min(heads.user),
                });
            }
            if since < heads.user {
                plan.push(Backfill {
                    origin: Origin::Stream,
                    from: since,
                    head: heads.user,
                });
            }
        }
    }
    plan
}

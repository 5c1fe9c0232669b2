//! The node's own rows, kept true: its heartbeat (on the liveness
//! connection; a node that finds itself declared dead heals and registers
//! again), and the presence of its connections (`last_seen_at`, adopting
//! what an earlier registration claimed, reconciling the registry with the
//! hub).

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db;
use crate::metrics as m;
use crate::read::delivery_log::Record;
use crate::read::hub::Control;
use crate::registry;
use crate::state::NodeState;

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Registered and refreshed.
    Alive,
    /// The node had been declared dead (its row was reaped): its sockets were
    /// closed so that clients reconnect, and it registered again under a new
    /// incarnation.
    Reregistered,
    /// Another process runs under this node id: this one stops.
    TakenOver,
}

/// Refreshes the node's `last_seen_at` (and the sweeper's lease, if it holds
/// it) on the liveness connection. A node that finds it was declared dead
/// heals: see [`heal`].
pub async fn heartbeat_once(ctx: &NodeState) -> Result<Heartbeat, sqlx::Error> {
    // Liveness on the direct URL says nothing of the pooler the node's work
    // goes through: a node that has not reached it for a node timeout
    // stops heartbeating, so that it is reaped and its users served
    // elsewhere, until the pooler answers again (then it heals).
    let unreachable = ctx.lifecycle.liveness.pool_failing_for();
    if unreachable >= ctx.settings.node_timeout {
        ctx.lifecycle.liveness.beat_failed();
        return Err(sqlx::Error::Io(std::io::Error::other(format!(
            "DATABASE_URL has not answered for {} ms: the node cannot work, so it stops heartbeating",
            unreachable.as_millis()
        ))));
    }
    let incarnation = ctx.lifecycle.registration.current();
    let lease = ctx
        .lifecycle
        .liveness
        .may_lead(ctx.settings.node_timeout)
        .then_some(ctx.settings.node_timeout);
    let beat = async {
        let mut held = ctx.lifecycle.liveness.hold().await?;
        let limit = held.timeout();
        let beat = tokio::time::timeout(
            limit,
            registry::nodes::beat(held.connection(), &ctx.node_id, incarnation, lease),
        )
        .await;
        held.settle(beat)
    }
    .await;
    let beat = match beat {
        Ok(beat) => beat,
        Err(error) => {
            ctx.lifecycle.liveness.beat_failed();
            return Err(error);
        }
    };
    if beat.alive {
        ctx.lifecycle.liveness.beat_succeeded(beat.leading);
        // Registered under the current incarnation: whatever said otherwise
        // was about an earlier one.
        ctx.lifecycle.liveness.set_healing(false);
        return Ok(Heartbeat::Alive);
    }
    let owner = {
        let mut held = ctx.lifecycle.liveness.hold().await?;
        let limit = held.timeout();
        let owner = tokio::time::timeout(
            limit,
            registry::nodes::owner(held.connection(), &ctx.node_id),
        )
        .await;
        held.settle(owner)?
    };
    if owner.is_some_and(|incarnation| !ctx.lifecycle.registration.is_ours(incarnation)) {
        ctx.fail(format!(
            "another process registered as node {}",
            ctx.node_id
        ));
        return Ok(Heartbeat::TakenOver);
    }
    heal(ctx).await?;
    Ok(Heartbeat::Reregistered)
}

/// Declared dead while alive (a long pause, a network cut): the sweeper has
/// removed this node's connections and parked its work, and whatever the
/// node still had in flight cannot commit (it is fenced by its
/// incarnation). The node closes every socket (clients resume with `since`,
/// or get what was parked for them), then registers again under a new
/// incarnation. A session that attaches meanwhile names the old incarnation
/// and is refused (its client retries), or the new one and is routable:
/// none is left open without a row.
pub async fn heal(ctx: &NodeState) -> Result<(), sqlx::Error> {
    abandon_sessions(ctx);
    let incarnation = Uuid::new_v4();
    // Ours from now on, even if the answer to the registration is lost.
    ctx.lifecycle.registration.expect(incarnation);
    {
        let mut held = ctx.lifecycle.liveness.hold().await?;
        let registered = tokio::time::timeout(
            db::OP_TIMEOUT,
            registry::nodes::register(
                held.connection(),
                &ctx.node_id,
                incarnation,
                &ctx.lifecycle.advertised_addr,
            ),
        )
        .await;
        held.settle(registered)?;
    }
    ctx.lifecycle.registration.replace(incarnation);
    ctx.lifecycle.liveness.beat_succeeded(false);
    ctx.lifecycle.liveness.set_healing(false);
    tracing::info!(node_id = %ctx.node_id, %incarnation, "registered again");
    Ok(())
}

/// This node was declared dead (its row is gone or another incarnation's):
/// its sockets are no routing target any more. They are closed at once, so
/// that their clients resume elsewhere, whether or not the node can register
/// again yet; `/readyz` says not ready until it has.
fn abandon_sessions(ctx: &NodeState) {
    if !ctx.lifecycle.liveness.is_healing() {
        tracing::error!(node_id = %ctx.node_id, "this node was declared dead; closing its sockets and registering again");
        metrics::counter!(m::NODE_HEALED).increment(1);
    }
    ctx.lifecycle.liveness.set_healing(true);
    ctx.lifecycle.liveness.set_leading(false);
    ctx.delivery.hub.control_all(Control::Close {
        code: 1012,
        reason: "node re-registering; reconnect with since".into(),
    });
}

pub async fn run(ctx: Arc<NodeState>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            // A transaction was refused by the fence: the node is dead to
            // the cluster. Its sockets close now, even if the heartbeat (which
            // registers it again) cannot get through yet.
            () = ctx.lifecycle.registration.fenced() => abandon_sessions(&ctx),
            () = token.cancelled() => return,
        }
        match heartbeat_once(&ctx).await {
            Ok(Heartbeat::TakenOver) => return,
            Ok(_) => {}
            Err(error) => {
                metrics::counter!(m::DB_ERRORS, "operation" => "heartbeat").increment(1);
                tracing::warn!(%error, "heartbeat failed");
            }
        }
    }
}

/// Whether the liveness connection is on another URL than the node's work
/// (a pooler, and liveness on the direct URL): then [`run_pooler_check`]
/// watches the pooler.
pub fn liveness_bypasses_the_pool(ctx: &NodeState) -> bool {
    ctx.lifecycle.plan.pooled && ctx.settings.direct_database_url.is_some()
}

/// Asks `DATABASE_URL` a trivial question on a connection of its own (not
/// behind this node's traffic), within the liveness timeout, and records
/// whether it answered.
pub async fn pooler_check_once(
    ctx: &NodeState,
    connection: &mut Option<sqlx::PgConnection>,
) -> Result<(), sqlx::Error> {
    use sqlx::ConnectOptions;
    let limit = ctx.settings.liveness_timeout();
    let asked = tokio::time::timeout(limit, async {
        if connection.is_none() {
            let options = db::connect_options(
                &ctx.settings.database_url,
                &format!("pgrelay {} pooler check", ctx.node_id),
            )?;
            *connection = Some(options.connect().await?);
        }
        let held = connection.as_mut().expect("connected above");
        let mut scope = db::scope_on(held).await?;
        sqlx::raw_sql("SELECT 1").execute(&mut *scope).await?;
        scope.end().await
    })
    .await
    .unwrap_or_else(|_| {
        Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "DATABASE_URL did not answer in time",
        )))
    });
    match asked {
        Ok(()) => ctx.lifecycle.liveness.pool_answered(),
        Err(_) => {
            // A connection that failed may be stuck: open another next time.
            *connection = None;
            ctx.lifecycle.liveness.pool_failed();
        }
    }
    asked
}

/// Every heartbeat interval, [`pooler_check_once`].
pub async fn run_pooler_check(ctx: Arc<NodeState>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        if let Err(error) = pooler_check_once(&ctx, &mut connection).await {
            metrics::counter!(m::DB_ERRORS, "operation" => "pooler_check").increment(1);
            tracing::warn!(%error, "DATABASE_URL (the pooler) did not answer");
        }
    }
}

/// Heartbeats of this node's presence rows, on the main pool: every
/// interval, `last_seen_at` of the connections that showed signs of life,
/// the adoption of an earlier registration's claims, and, when rows may
/// exist without a session,
/// the reconciliation of the registry with the hub.
pub async fn run_presence(ctx: Arc<NodeState>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        ticks += 1;
        if let Err(error) = presence_once(&ctx, ticks.is_multiple_of(RECONCILE_EVERY)).await {
            metrics::counter!(m::DB_ERRORS, "operation" => "presence").increment(1);
            tracing::warn!(%error, "refreshing the node's connections failed");
        }
    }
}

/// Presence steps between two full reconciliations of the registry.
const RECONCILE_EVERY: u64 = 30;

/// One presence step. With `full`, or when the registry may hold rows
/// without a session (an attach whose answer was lost, more rows than
/// sessions), the rows of this node's connections are compared with the
/// hub, and those without a session depart (their undelivered messages are
/// parked, see `read::delivery_log`).
pub async fn presence_once(ctx: &NodeState, full: bool) -> Result<u64, sqlx::Error> {
    let seen = ctx.delivery.hub.take_seen();
    db::bounded(registry::connections::refresh(
        &ctx.db.pool,
        &ctx.node_id,
        ctx.incarnation(),
        &seen,
    ))
    .await?;
    if ctx.lifecycle.registration.adopting() {
        adopt(ctx).await?;
    }
    let dirty = ctx.take_registry_dirty();
    let rows = db::bounded(registry::connections::count(&ctx.db.pool, &ctx.node_id)).await;
    let suspicious = rows
        .as_ref()
        .map_or(true, |rows| *rows > ctx.delivery.hub.len() as i64);
    if !(full || dirty || suspicious) {
        return Ok(0);
    }
    let reconciled = reconcile(ctx).await;
    if reconciled.is_err() && dirty {
        ctx.registry_may_be_dirty();
    }
    reconciled
}

/// Makes the registry match the hub: every connection this node's rows name
/// (connection rows, and claimed outbox rows) that has no session here
/// departs. Rows are read before the hub, and a session joins the hub
/// before its row commits: a row read whose session is not in the hub has
/// no session, or one that has closed.
async fn reconcile(ctx: &NodeState) -> Result<u64, sqlx::Error> {
    let named = db::bounded(registry::connections::named(&ctx.db.pool, &ctx.node_id)).await?;
    let live: std::collections::HashSet<Uuid> = ctx.delivery.hub.ids().into_iter().collect();
    let ghosts: Vec<Uuid> = named.into_iter().filter(|id| !live.contains(id)).collect();
    if ghosts.is_empty() {
        return Ok(0);
    }
    tracing::warn!(
        ghosts = ghosts.len(),
        "registry rows without a session on this node; removing them"
    );
    let started = Instant::now();
    for id in &ghosts {
        ctx.delivery
            .log
            .record(Record::Departed {
                connection_id: *id,
                done: None,
            })
            .await;
    }
    tracing::debug!(took = ?started.elapsed(), "ghost departures queued");
    Ok(ghosts.len() as u64)
}

/// Makes the rows an earlier registration of this node had claimed
/// claimable again (a few batches per step): its sessions are gone, and the
/// claims park their messages.
async fn adopt(ctx: &NodeState) -> Result<(), sqlx::Error> {
    let incarnation = ctx.incarnation();
    for _ in 0..10 {
        let (adopted, more) = db::bounded(registry::nodes::adopt(
            &ctx.db.pool,
            &ctx.node_id,
            incarnation,
        ))
        .await?;
        if adopted > 0 {
            tracing::info!(
                adopted,
                "rows claimed by this node's earlier registration are claimable again"
            );
        }
        if !more {
            if incarnation == ctx.incarnation() {
                ctx.lifecycle.registration.adopted();
            }
            return Ok(());
        }
    }
    Ok(())
}

//! The sweeper: the cluster's housekeeping, run by exactly one node at a time.
//!
//! It reaps dead nodes: a node silent for longer than the node timeout stops
//! being a routing target, its connections are removed and its unfinished
//! work is parked for its users' next connections (G6). It removes what
//! retention no longer keeps, in bounded batches (never one
//! unbounded DELETE, never a long lock), drops parked work whose message
//! expired, and forgets old idempotency keys. And it vacuums the outbox when
//! claims have left it full of dead rows, rather than wait for autovacuum.
//!
//! Which node sweeps is decided by a lease, `relay.sweeper.lease_until`:
//! taken when it has expired, renewed by its holder's heartbeats. When the
//! holder stops running — killed, paused, cut off, whatever its TCP
//! connections do — its heartbeats stop, the lease expires after the node
//! timeout, and another node takes it at its next sweep interval. Reaping is
//! fenced by the lease (a former holder, resumed, reaps nothing) and by the
//! reaped node's incarnation (see `registry::nodes::reap`). `relay.sweeper`
//! shows who holds it.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::registry::nodes::{self, HandedBack};
use crate::state::NodeState;

/// Rows removed per statement: small enough that no statement holds locks for
/// long, large enough to keep up with heavy traffic.
pub const BATCH: i64 = 5000;
/// One sweep stops after this long, leaving the rest for the next.
const TIME_BUDGET: Duration = Duration::from_secs(2);
/// How long a reap waits for the dead node's transactions in flight (a
/// node paused inside one holds its row): past it, the node is reaped at the
/// next sweep, once the server has ended that transaction.
const REAP_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
/// Stream rows looked at per sweep for pruning.
const PRUNE_BATCH: i64 = 5000;
/// Dead outbox rows past which the sweeper vacuums the outbox itself. Every
/// claim deletes rows, and until a vacuum passes each claim still walks their
/// index entries: after a burst of 150,000 messages a claim took 0.5 ms
/// instead of 0.03, for as long as autovacuum (which looks at a table about
/// once a minute) had not come by. A vacuum of the mostly empty outbox takes
/// milliseconds.
pub const OUTBOX_VACUUM_DEAD_ROWS: i64 = 10_000;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SweepReport {
    /// Dead nodes removed from the registry.
    pub nodes_reaped: u64,
    /// Their connections (and those of nodes that no longer exist).
    pub connections_reaped: u64,
    /// Outbox rows of dead nodes handed back (parked for their users).
    pub work_handed_back: u64,
    /// Messages past retention removed, with their deliveries.
    pub messages_removed: u64,
    /// Delivery rows removed.
    pub deliveries_removed: u64,
    /// Parked work dropped because its message expired.
    pub parked_expired: u64,
    /// Idempotency keys past retention forgotten.
    pub idempotency_keys_removed: u64,
    /// `relay.streams` rows that kept nothing, removed.
    pub streams_pruned: u64,
    /// Queue entries whose message expired before any consumer took it.
    pub queue_entries_expired: u64,
    /// Queue entries held for consumers that no longer exist, put back.
    pub queue_entries_released: u64,
    /// Dead nodes whose reap waited for a transaction of theirs: put off.
    pub reaps_deferred: u64,
    /// Whether the outbox was vacuumed (it had many dead rows).
    pub outbox_vacuumed: bool,
}

impl SweepReport {
    /// Adds this sweep to the node's metrics.
    pub fn export(&self) {
        metrics::counter!(m::SWEEPER_RUNS).increment(1);
        for (kind, rows) in [
            ("nodes", self.nodes_reaped),
            ("connections", self.connections_reaped),
            ("work_handed_back", self.work_handed_back),
            ("messages", self.messages_removed),
            ("deliveries", self.deliveries_removed),
            ("parked_expired", self.parked_expired),
            ("idempotency_keys", self.idempotency_keys_removed),
            ("streams", self.streams_pruned),
            ("queue_entries_expired", self.queue_entries_expired),
            ("queue_entries_released", self.queue_entries_released),
        ] {
            metrics::counter!(m::SWEEPER_REAPED, "kind" => kind).increment(rows);
        }
        metrics::counter!(m::MESSAGES_EXPIRED)
            .increment(self.parked_expired + self.queue_entries_expired);
        metrics::counter!(m::REAPS_DEFERRED).increment(self.reaps_deferred);
    }
}

/// Messages parked for offline users, cluster-wide (counted up to a
/// million: past that the number matters less than that it is large).
async fn export_parked_backlog(pool: &PgPool) {
    let parked = crate::db::bounded(async {
        let mut scope = crate::db::scope(pool).await?;
        let parked = sqlx::query_scalar!(
            r#"SELECT count(*) AS "parked!" FROM (SELECT 1 FROM relay.outbox WHERE node_id IS NULL LIMIT 1000000) p"#
        )
        .fetch_one(&mut *scope)
        .await?;
        scope.end().await?;
        Ok(parked)
    })
    .await;
    match parked {
        Ok(parked) => metrics::gauge!(m::PARKED_BACKLOG).set(parked as f64),
        Err(error) => tracing::debug!(%error, "could not count parked messages"),
    }
}

/// Takes the sweeper's lease, or renews it; answers whether this node holds
/// it. On the liveness connection: a node busy with traffic keeps its lease.
pub async fn lead_once(ctx: &NodeState) -> Result<bool, sqlx::Error> {
    if !ctx.lifecycle.liveness.may_lead(ctx.settings.node_timeout) {
        // Its sweeps keep failing: the lease runs out, another node sweeps.
        ctx.lifecycle.liveness.set_leading(false);
        return Ok(false);
    }
    let incarnation = ctx.lifecycle.registration.current();
    let lease = ctx.settings.node_timeout;
    let held = {
        let mut liveness = ctx.lifecycle.liveness.hold().await?;
        let limit = liveness.timeout();
        let led = tokio::time::timeout(
            limit,
            nodes::lead(liveness.connection(), &ctx.node_id, incarnation, lease),
        )
        .await;
        liveness.settle(led)?
    };
    if held == Some(true) {
        tracing::info!(node_id = %ctx.node_id, "this node is now the sweeper");
    }
    ctx.lifecycle.liveness.set_leading(held.is_some());
    Ok(held.is_some())
}

/// One sweep, if this node holds the sweeper's lease (taking it if it is
/// free); None if another node does. Every step is an idempotent, bounded
/// delete, and reaps check the lease again, so a former holder that resumes
/// mid-sweep does no harm.
///
/// `reap_after`: reap nodes silent for this long; None skips reaping (the
/// sweeper does that right after a database outage, when every node's last
/// heartbeat looks old until the nodes have had time to send the next one).
pub async fn sweep_once(
    ctx: &NodeState,
    reap_after: Option<Duration>,
) -> Result<Option<SweepReport>, sqlx::Error> {
    if !lead_once(ctx).await? {
        return Ok(None);
    }
    let pool = &ctx.db.pool;
    let started = Instant::now();
    let retention_secs = ctx.settings.retention.as_secs_f64();
    let mut report = SweepReport::default();
    if let Some(node_timeout) = reap_after {
        reap(ctx, node_timeout, &mut report).await?;
    }

    // Oldest first, by id (ids follow time): each batch looks at the BATCH
    // oldest messages only, so a sweep with nothing to do costs one short
    // index scan.
    loop {
        let mut scope = crate::db::scope(pool).await?;
        let removed = sqlx::query!(
            r#"
            WITH oldest AS (
                SELECT id FROM relay.messages
                 WHERE id IN (SELECT id FROM relay.messages ORDER BY id LIMIT $2)
                   AND created_at < now() - make_interval(secs => $1)
            ), gone_deliveries AS (
                DELETE FROM relay.deliveries WHERE message_id IN (SELECT id FROM oldest) RETURNING 1
            ), gone_streams AS (
                DELETE FROM relay.message_streams WHERE message_id IN (SELECT id FROM oldest) RETURNING 1
            ), gone_work AS (
                DELETE FROM relay.outbox WHERE message_id IN (SELECT id FROM oldest) RETURNING 1
            ), gone_entries AS (
                DELETE FROM relay.queue_entries WHERE message_id IN (SELECT id FROM oldest) RETURNING 1
            ), gone AS (
                DELETE FROM relay.messages WHERE id IN (SELECT id FROM oldest) RETURNING 1
            )
            SELECT (SELECT count(*) FROM gone) AS "messages!",
                   (SELECT count(*) FROM gone_deliveries) AS "deliveries!",
                   (SELECT count(*) FROM gone_streams) + (SELECT count(*) FROM gone_work)
                   + (SELECT count(*) FROM gone_entries) AS "other!"
            "#,
            retention_secs,
            BATCH,
        )
        .fetch_one(&mut *scope)
        .await?;
        scope.end().await?;
        report.messages_removed += removed.messages as u64;
        report.deliveries_removed += removed.deliveries as u64;
        if removed.messages < BATCH || started.elapsed() > TIME_BUDGET {
            break;
        }
    }

    loop {
        let mut scope = crate::db::scope(pool).await?;
        let expired = sqlx::query!(
            r#"
            DELETE FROM relay.outbox
             WHERE id = ANY (ARRAY(SELECT id FROM relay.outbox
                                    WHERE node_id IS NULL AND expires_at <= now()
                                    ORDER BY expires_at
                                    LIMIT $1))
            "#,
            BATCH
        )
        .execute(&mut *scope)
        .await?
        .rows_affected();
        scope.end().await?;
        report.parked_expired += expired;
        if expired < BATCH as u64 || started.elapsed() > TIME_BUDGET {
            break;
        }
    }

    // Queues: what expired before a consumer took it goes (with it, a
    // queue nobody reads is gone); what a consumer that no longer exists
    // held waits again.
    loop {
        let mut scope = crate::db::scope(pool).await?;
        let expired = sqlx::query!(
            r#"
            DELETE FROM relay.queue_entries
             WHERE ctid = ANY (ARRAY(SELECT ctid FROM relay.queue_entries
                                      WHERE expires_at <= now()
                                      ORDER BY expires_at
                                      LIMIT $1
                                        FOR UPDATE SKIP LOCKED))
            "#,
            BATCH
        )
        .execute(&mut *scope)
        .await?
        .rows_affected();
        scope.end().await?;
        report.queue_entries_expired += expired;
        if expired < BATCH as u64 || started.elapsed() > TIME_BUDGET {
            break;
        }
    }
    let mut scope = crate::db::scope(pool).await?;
    report.queue_entries_released = sqlx::query_scalar!(
        r#"SELECT relay.release_orphaned_queue_entries($1::integer) AS "released!""#,
        BATCH as i32
    )
    .fetch_one(&mut *scope)
    .await? as u64;
    scope.end().await?;

    let mut scope = crate::db::scope(pool).await?;
    report.idempotency_keys_removed = sqlx::query!(
        r#"
        DELETE FROM relay.idempotency_keys
         WHERE (scope, key) IN (SELECT scope, key FROM relay.idempotency_keys
                                 WHERE created_at < now() - make_interval(secs => $1)
                                 ORDER BY created_at
                                 LIMIT $2)
        "#,
        retention_secs,
        BATCH
    )
    .execute(&mut *scope)
    .await?
    .rows_affected();
    scope.end().await?;
    report.streams_pruned = prune_streams(ctx).await?;
    report.outbox_vacuumed = vacuum_outbox_once(pool, OUTBOX_VACUUM_DEAD_ROWS).await?;
    Ok(Some(report))
}

/// Removes `relay.streams` rows that keep nothing — no message within
/// retention, no connection of the user, no subscription to the topic —
/// looking at [`PRUNE_BATCH`] rows per sweep, where the last sweep stopped.
/// Rows a writer or a connect holds are skipped. Writers insert a missing
/// row again (ids come from one sequence, so a stream that comes back keeps
/// its order), so pruning one that comes back to life races with nothing.
async fn prune_streams(ctx: &NodeState) -> Result<u64, sqlx::Error> {
    let from = ctx.prune_from.lock().expect("prune lock").clone();
    let mut scope = crate::db::scope(&ctx.db.pool).await?;
    let pruned = sqlx::query!(
        r#"
        WITH candidates AS (
            SELECT stream FROM relay.streams WHERE stream > $1 ORDER BY stream LIMIT $2
        ), gone AS (
            DELETE FROM relay.streams
             WHERE stream = ANY (ARRAY(
                SELECT s.stream FROM relay.streams s
                 WHERE s.stream IN (SELECT stream FROM candidates)
                   AND s.stream <> 'broadcast'
                   AND NOT EXISTS (SELECT 1 FROM relay.messages m WHERE m.stream = s.stream)
                   AND NOT EXISTS (SELECT 1 FROM relay.message_streams x WHERE x.stream = s.stream)
                   AND NOT (s.stream LIKE 'user:%' AND EXISTS (
                           SELECT 1 FROM relay.connections c WHERE c.user_id = substr(s.stream, 6)))
                   AND NOT (s.stream LIKE 'topic:%' AND EXISTS (
                           SELECT 1 FROM relay.subscriptions t WHERE t.topic = substr(s.stream, 7)))
                   FOR UPDATE SKIP LOCKED))
            RETURNING 1
        )
        SELECT (SELECT max(stream) FROM candidates) AS last, (SELECT count(*) FROM candidates) AS "seen!",
               (SELECT count(*) FROM gone) AS "pruned!"
        "#,
        from,
        PRUNE_BATCH,
    )
    .fetch_one(&mut *scope)
    .await?;
    scope.end().await?;
    // A short page is the end of the table: start over next time.
    *ctx.prune_from.lock().expect("prune lock") = match pruned.last {
        Some(last) if pruned.seen >= PRUNE_BATCH => last,
        _ => String::new(),
    };
    Ok(pruned.pruned as u64)
}

/// Vacuums the outbox if PostgreSQL counts at least `dead_rows` dead rows in
/// it; answers whether it did. A vacuum already running (autovacuum's) is
/// not waited for. Without ownership of the table PostgreSQL skips it with a
/// warning, which costs nothing but leaves the job to autovacuum.
pub async fn vacuum_outbox_once(pool: &PgPool, dead_rows: i64) -> Result<bool, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let dead = sqlx::query_scalar!(
        r#"SELECT n_dead_tup AS "dead!" FROM pg_stat_user_tables WHERE relid = 'relay.outbox'::regclass"#
    )
    .fetch_optional(&mut *scope)
    .await?
    .unwrap_or(0);
    scope.end().await?;
    if dead < dead_rows {
        return Ok(false);
    }
    // VACUUM cannot be checked at compile time, nor run in a transaction:
    // one simple-protocol statement (one message, so a pooler cannot split
    // it across server connections).
    sqlx::raw_sql("VACUUM (SKIP_LOCKED) relay.outbox")
        .execute(pool)
        .await?;
    Ok(true)
}

/// Reaps nodes silent for longer than `node_timeout`, and hands back the
/// leftovers of nodes that no longer exist (rows of a reaped node that
/// another transaction held at the time). Each node on its own: one whose
/// reap has to wait (a transaction of it is still in flight), or fails, is
/// left for the next sweep and keeps no other from being reaped.
async fn reap(
    ctx: &NodeState,
    node_timeout: Duration,
    report: &mut SweepReport,
) -> Result<(), sqlx::Error> {
    let mut scope = crate::db::scope(&ctx.db.pool).await?;
    let suspects = sqlx::query_scalar!(
        r#"
        WITH RECURSIVE connection_nodes AS (
            (SELECT node_id FROM relay.connections ORDER BY node_id LIMIT 1)
            UNION ALL
            SELECT (SELECT c.node_id FROM relay.connections c WHERE c.node_id > n.node_id
                     ORDER BY c.node_id LIMIT 1)
              FROM connection_nodes n WHERE n.node_id IS NOT NULL
        ), work_nodes AS (
            (SELECT node_id FROM relay.outbox WHERE node_id IS NOT NULL ORDER BY node_id LIMIT 1)
            UNION ALL
            SELECT (SELECT o.node_id FROM relay.outbox o WHERE o.node_id > w.node_id
                     ORDER BY o.node_id LIMIT 1)
              FROM work_nodes w WHERE w.node_id IS NOT NULL
        ), subscription_nodes AS (
            (SELECT node_id FROM relay.subscriptions ORDER BY node_id LIMIT 1)
            UNION ALL
            SELECT (SELECT s.node_id FROM relay.subscriptions s WHERE s.node_id > n.node_id
                     ORDER BY s.node_id LIMIT 1)
              FROM subscription_nodes n WHERE n.node_id IS NOT NULL
        ), named AS (
            SELECT node_id FROM connection_nodes
            UNION SELECT node_id FROM work_nodes
            UNION SELECT node_id FROM subscription_nodes
        )
        SELECT id AS "id!" FROM relay.nodes WHERE last_seen_at < now() - make_interval(secs => $1)
        UNION
        SELECT n.node_id FROM named n
         WHERE n.node_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM relay.nodes x WHERE x.id = n.node_id)
        LIMIT 100
        "#,
        node_timeout.as_secs_f64()
    )
    .fetch_all(&mut *scope)
    .await?;
    scope.end().await?;
    let incarnation = ctx.lifecycle.registration.current();
    for node_id in suspects {
        if node_id == ctx.node_id.as_str() {
            continue;
        }
        let mut total = HandedBack::default();
        let started = Instant::now();
        loop {
            let reaped = crate::db::bounded(nodes::reap(
                &ctx.db.pool,
                &node_id,
                node_timeout,
                &ctx.node_id,
                incarnation,
                BATCH as i32,
                REAP_LOCK_TIMEOUT,
            ))
            .await;
            match reaped {
                Ok(None) => break,
                Ok(Some(handed)) => {
                    total.reaped |= handed.reaped;
                    total.work += handed.work;
                    total.parked += handed.parked;
                    total.connections += handed.connections;
                    if !handed.more || started.elapsed() > TIME_BUDGET {
                        break;
                    }
                }
                Err(error) if is_lock_timeout(&error) => {
                    report.reaps_deferred += 1;
                    tracing::info!(%node_id, "reap put off: a transaction of the dead node has not ended yet");
                    break;
                }
                Err(error) if crate::db::is_unavailable(&error) => return Err(error),
                Err(error) => {
                    tracing::warn!(%node_id, %error, "reaping a node failed; trying again next sweep");
                    break;
                }
            }
        }
        if total.reaped {
            report.nodes_reaped += 1;
        }
        report.connections_reaped += total.connections;
        report.work_handed_back += total.work;
        if total.reaped || total.work > 0 || total.connections > 0 {
            tracing::warn!(
                %node_id,
                reaped = total.reaped,
                connections = total.connections,
                work = total.work,
                parked = total.parked,
                "reaped a dead node: its connections are removed and its work parked"
            );
        }
    }
    Ok(())
}

/// A lock wait given up (lock_timeout): SQLSTATE 55P03.
fn is_lock_timeout(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03")
}

/// The sweeper task: every `sweep_interval`, sweeps if this node holds the
/// lease (or can take it).
pub async fn run(ctx: std::sync::Arc<NodeState>, token: CancellationToken) {
    // Since when this node has swept without a database error: reaping waits
    // for a node timeout of health, so that nodes get to heartbeat after an
    // outage before anyone is judged by their last heartbeat.
    let mut healthy_since: Option<Instant> = None;
    let mut interval = tokio::time::interval(ctx.settings.sweep_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        if ctx.lifecycle.liveness.is_healing() {
            continue;
        }
        let healthy_for = healthy_since.get_or_insert_with(Instant::now).elapsed();
        let reap_after =
            (healthy_for >= ctx.settings.node_timeout).then_some(ctx.settings.node_timeout);
        match crate::db::bounded(sweep_once(&ctx, reap_after)).await {
            Ok(None) => {}
            Ok(Some(report)) => {
                ctx.lifecycle.liveness.sweep_succeeded();
                if report != SweepReport::default() {
                    tracing::info!(?report, "swept");
                }
                report.export();
                export_parked_backlog(&ctx.db.pool).await;
                let recorded = async {
                    let mut scope = crate::db::scope(&ctx.db.pool).await?;
                    sqlx::query!(
                        "UPDATE relay.sweeper SET last_run_at = now(), last_report = $2 WHERE incarnation = $1",
                        ctx.lifecycle.registration.current(),
                        serde_json::to_value(report).expect("serializable"),
                    )
                    .execute(&mut *scope)
                    .await?;
                    scope.end().await
                }
                .await;
                if let Err(error) = recorded {
                    tracing::warn!(%error, "could not record the sweep");
                }
            }
            Err(error) => {
                healthy_since = None;
                if ctx.lifecycle.liveness.is_leading() {
                    ctx.lifecycle.liveness.sweep_failed();
                }
                metrics::counter!(m::DB_ERRORS, "operation" => "sweep").increment(1);
                tracing::warn!(%error, "sweep failed; retrying next interval");
            }
        }
    }
}

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
//! Which node sweeps is decided by a session advisory lock held on a
//! dedicated connection: when the holder dies, its connection dies, the lock
//! is released and another node takes over. `relay.sweeper` shows who holds
//! it.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::NodeId;
use crate::metrics as m;
use crate::node::NodeContext;

/// Rows removed per statement: small enough that no statement holds locks for
/// long, large enough to keep up with heavy traffic.
pub const BATCH: i64 = 5000;
/// One sweep stops after this long, leaving the rest for the next.
const TIME_BUDGET: Duration = Duration::from_secs(2);
/// The advisory lock (two-key form, in a key space of its own).
const LOCK_CLASS: i32 = 0x7067_726c; // "pgrl"
const LOCK_SWEEPER: i32 = 1;
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
        ] {
            metrics::counter!(m::SWEEPER_REAPED, "kind" => kind).increment(rows);
        }
        metrics::counter!(m::MESSAGES_EXPIRED).increment(self.parked_expired);
    }
}

/// Messages parked for offline users, cluster-wide (counted up to a
/// million: past that the number matters less than that it is large).
async fn export_parked_backlog(pool: &PgPool) {
    let parked = crate::db::bounded(
        sqlx::query_scalar!(
            r#"SELECT count(*) AS "parked!" FROM (SELECT 1 FROM relay.outbox WHERE node_id IS NULL LIMIT 1000000) p"#
        )
        .fetch_one(pool),
    )
    .await;
    match parked {
        Ok(parked) => metrics::gauge!(m::PARKED_BACKLOG).set(parked as f64),
        Err(error) => tracing::debug!(%error, "could not count parked messages"),
    }
}

/// One sweep. Safe to run anywhere at any time (also concurrently: every
/// step is an idempotent, bounded delete); the leader election only keeps
/// the cluster from doing the work twice.
///
/// `reap_after`: reap nodes silent for this long; None skips reaping (the
/// sweeper does that right after a database outage, when every node's last
/// heartbeat looks old until the nodes have had time to send the next one).
pub async fn sweep_once(
    pool: &PgPool,
    retention: Duration,
    reap_after: Option<Duration>,
) -> Result<SweepReport, sqlx::Error> {
    let started = Instant::now();
    let retention_secs = retention.as_secs_f64();
    let mut report = SweepReport::default();
    if let Some(node_timeout) = reap_after {
        reap(pool, node_timeout, &mut report).await?;
    }

    // Oldest first, by id (ids follow time): each batch looks at the BATCH
    // oldest messages only, so a sweep with nothing to do costs one short
    // index scan.
    loop {
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
            ), gone AS (
                DELETE FROM relay.messages WHERE id IN (SELECT id FROM oldest) RETURNING 1
            )
            SELECT (SELECT count(*) FROM gone) AS "messages!",
                   (SELECT count(*) FROM gone_deliveries) AS "deliveries!",
                   (SELECT count(*) FROM gone_streams) + (SELECT count(*) FROM gone_work) AS "other!"
            "#,
            retention_secs,
            BATCH,
        )
        .fetch_one(pool)
        .await?;
        report.messages_removed += removed.messages as u64;
        report.deliveries_removed += removed.deliveries as u64;
        if removed.messages < BATCH || started.elapsed() > TIME_BUDGET {
            break;
        }
    }

    loop {
        let expired = sqlx::query!(
            r#"
            DELETE FROM relay.outbox
             WHERE id IN (SELECT id FROM relay.outbox
                           WHERE node_id IS NULL AND expires_at <= now()
                           ORDER BY expires_at
                           LIMIT $1)
            "#,
            BATCH
        )
        .execute(pool)
        .await?
        .rows_affected();
        report.parked_expired += expired;
        if expired < BATCH as u64 || started.elapsed() > TIME_BUDGET {
            break;
        }
    }

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
    .execute(pool)
    .await?
    .rows_affected();
    report.outbox_vacuumed = vacuum_outbox_once(pool, OUTBOX_VACUUM_DEAD_ROWS).await?;
    Ok(report)
}

/// Vacuums the outbox if PostgreSQL counts at least `dead_rows` dead rows in
/// it; answers whether it did. A vacuum already running (autovacuum's) is
/// not waited for. Without ownership of the table PostgreSQL skips it with a
/// warning, which costs nothing but leaves the job to autovacuum.
pub async fn vacuum_outbox_once(pool: &PgPool, dead_rows: i64) -> Result<bool, sqlx::Error> {
    let dead = sqlx::query_scalar!(
        r#"SELECT n_dead_tup AS "dead!" FROM pg_stat_user_tables WHERE relid = 'relay.outbox'::regclass"#
    )
    .fetch_optional(pool)
    .await?
    .unwrap_or(0);
    if dead < dead_rows {
        return Ok(false);
    }
    // VACUUM cannot be checked at compile time (nor run in a transaction).
    sqlx::query("VACUUM (SKIP_LOCKED) relay.outbox")
        .execute(pool)
        .await?;
    Ok(true)
}

/// Reaps nodes silent for longer than `node_timeout`, and the leftovers of
/// nodes that no longer exist (rows written by a node after it was reaped).
async fn reap(
    pool: &PgPool,
    node_timeout: Duration,
    report: &mut SweepReport,
) -> Result<(), sqlx::Error> {
    let timeout = node_timeout.as_secs_f64();
    let suspects = sqlx::query_scalar!(
        r#"
        SELECT id AS "id!" FROM relay.nodes WHERE last_seen_at < now() - make_interval(secs => $1)
        UNION
        SELECT DISTINCT c.node_id FROM relay.connections c
         WHERE NOT EXISTS (SELECT 1 FROM relay.nodes n WHERE n.id = c.node_id)
        UNION
        SELECT DISTINCT o.node_id FROM relay.outbox o
         WHERE o.node_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM relay.nodes n WHERE n.id = o.node_id)
        LIMIT 100
        "#,
        timeout
    )
    .fetch_all(pool)
    .await?;
    for node_id in suspects {
        let mut tx = pool.begin().await?;
        // Checked again under the row lock: a node may have come back.
        let node = sqlx::query!(
            r#"
            SELECT id, last_seen_at < now() - make_interval(secs => $2) AS "dead!"
              FROM relay.nodes WHERE id = $1 FOR UPDATE
            "#,
            node_id,
            timeout
        )
        .fetch_optional(&mut *tx)
        .await?;
        if node.as_ref().is_some_and(|n| !n.dead) {
            tx.rollback().await?;
            continue;
        }
        let counts = sqlx::query!(
            r#"
            SELECT (SELECT count(*) FROM relay.connections WHERE node_id = $1) AS "connections!",
                   (SELECT count(*) FROM relay.outbox WHERE node_id = $1) AS "work!"
            "#,
            node_id
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query!("SELECT relay.release_node($1)", node_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query!("DELETE FROM relay.nodes WHERE id = $1", node_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if node.is_some() {
            report.nodes_reaped += 1;
        }
        report.connections_reaped += counts.connections as u64;
        report.work_handed_back += counts.work as u64;
        tracing::warn!(
            %node_id,
            connections = counts.connections,
            work = counts.work,
            "reaped a dead node: its connections are removed and its work parked"
        );
    }
    Ok(())
}

/// Leadership: a dedicated connection holding the sweeper's advisory lock.
struct Leadership {
    connection: Option<PgConnection>,
}

impl Leadership {
    /// Whether this node holds the lock now, taking it if it is free.
    async fn check(&mut self, ctx: &NodeContext) -> Result<bool, sqlx::Error> {
        if let Some(connection) = self.connection.as_mut() {
            // Still ours if the connection that holds it still answers.
            match sqlx::query!("SELECT 1 AS alive")
                .fetch_one(&mut *connection)
                .await
            {
                Ok(_) => return Ok(true),
                Err(error) => {
                    self.connection = None;
                    tracing::warn!(%error, "lost the sweeper lock connection; no longer the sweeper");
                    return Err(error);
                }
            }
        }
        let options = crate::db::connect_options(
            &ctx.settings.database_url,
            &format!("pgrelay {} sweeper", ctx.node_id),
        )?;
        let mut connection = PgConnection::connect_with(&options).await?;
        let acquired = sqlx::query_scalar!(
            r#"SELECT pg_try_advisory_lock($1, $2) AS "acquired!""#,
            LOCK_CLASS,
            LOCK_SWEEPER
        )
        .fetch_one(&mut connection)
        .await?;
        if !acquired {
            let _ = connection.close().await;
            return Ok(false);
        }
        announce(&ctx.pool, &ctx.node_id).await?;
        tracing::info!(node_id = %ctx.node_id, "this node is now the sweeper");
        self.connection = Some(connection);
        Ok(true)
    }
}

async fn announce(pool: &PgPool, node_id: &NodeId) -> Result<(), sqlx::Error> {
    sqlx::query!(
        r#"
        INSERT INTO relay.sweeper (node_id) VALUES ($1)
        ON CONFLICT (singleton) DO UPDATE SET node_id = excluded.node_id, since = now(),
                                              last_run_at = NULL, last_report = NULL
        "#,
        node_id.as_str()
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The sweeper task: every `sweep_interval`, sweeps if this node holds the
/// lock (or can take it).
pub async fn run(ctx: std::sync::Arc<NodeContext>, token: CancellationToken) {
    let mut leadership = Leadership { connection: None };
    // Since when this node has swept without a database error: reaping waits
    // for a node timeout of health, so that nodes get to heartbeat after an
    // outage before anyone is judged by their last heartbeat.
    let mut healthy_since: Option<Instant> = None;
    let mut interval = tokio::time::interval(ctx.settings.sweep_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => break,
        }
        match crate::db::bounded(leadership.check(&ctx)).await {
            Ok(true) => {}
            Ok(false) => {
                // Not the sweeper, but the database answers: health counts
                // from here, so a takeover can reap at once.
                healthy_since.get_or_insert_with(Instant::now);
                continue;
            }
            Err(error) => {
                healthy_since = None;
                metrics::counter!(m::DB_ERRORS, "operation" => "sweep").increment(1);
                tracing::warn!(%error, "sweeper election failed; retrying");
                continue;
            }
        }
        let healthy_for = healthy_since.get_or_insert_with(Instant::now).elapsed();
        let reap_after =
            (healthy_for >= ctx.settings.node_timeout).then_some(ctx.settings.node_timeout);
        match crate::db::bounded(sweep_once(&ctx.pool, ctx.settings.retention, reap_after)).await {
            Ok(report) => {
                if report != SweepReport::default() {
                    tracing::info!(?report, "swept");
                }
                report.export();
                export_parked_backlog(&ctx.pool).await;
                let recorded = sqlx::query!(
                    "UPDATE relay.sweeper SET last_run_at = now(), last_report = $2 WHERE node_id = $1",
                    ctx.node_id.as_str(),
                    serde_json::to_value(report).expect("serializable"),
                )
                .execute(&ctx.pool)
                .await;
                if let Err(error) = recorded {
                    tracing::warn!(%error, "could not record the sweep");
                }
            }
            Err(error) => {
                healthy_since = None;
                metrics::counter!(m::DB_ERRORS, "operation" => "sweep").increment(1);
                tracing::warn!(%error, "sweep failed; retrying next interval");
            }
        }
    }
    if let Some(connection) = leadership.connection.take() {
        // Closing the connection releases the lock for the next node.
        let _ = connection.close().await;
    }
}

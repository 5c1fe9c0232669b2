//! "What is stuck, where?": the cluster's state in one read, for
//! `GET /v1/status` and `pgrelay status`.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

/// The cluster as the registry and the outbox show it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ClusterStatus {
    /// Every registered node, live or not yet reaped.
    pub nodes: Vec<NodeStatus>,
    /// Live connections, cluster-wide.
    pub connections: i64,
    /// Messages parked for users who are offline (waiting for a connect).
    pub parked: i64,
    /// The oldest work routed to a node and not yet written: when it is
    /// old, that node is stuck (or dead and not yet reaped).
    pub oldest_pending: Option<PendingWork>,
    /// The node that sweeps, and its last run.
    pub sweeper: Option<SweeperStatus>,
    /// How the node that answered reaches the database (absent when the
    /// status is read from the database itself, as `pgrelay status
    /// --database-url` does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<AnsweringNode>,
}

/// The node that answered `/v1/status`, and how it reaches PostgreSQL.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AnsweringNode {
    pub id: String,
    /// `direct`, or `transaction` when DATABASE_URL is a transaction-mode pooler.
    pub database_pooler: String,
    /// `notify` (LISTEN/NOTIFY wakes it), or `poll` (LISTEN is unavailable:
    /// it polls the outbox every `poll_interval_ms`).
    pub wakeups: String,
    pub poll_interval_ms: u64,
    /// Why it polls, when it does.
    pub poll_only_reason: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct NodeStatus {
    pub id: String,
    pub listen_addr: Option<String>,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// Heard from within the node timeout.
    pub alive: bool,
    pub connections: i64,
    /// Outbox rows waiting for this node.
    pub backlog: i64,
    /// Age of the oldest of them, in seconds.
    pub oldest_backlog_s: Option<f64>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PendingWork {
    pub message_id: String,
    pub node_id: String,
    pub queued_at: DateTime<Utc>,
    pub age_s: f64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct SweeperStatus {
    pub node_id: String,
    pub since: DateTime<Utc>,
    /// Until when its lease runs: it renews it with every heartbeat; past
    /// it, another node takes the role.
    pub lease_until: DateTime<Utc>,
    pub last_run_at: Option<DateTime<Utc>>,
    /// What the last sweep did.
    #[schema(value_type = Object)]
    pub last_report: Option<serde_json::Value>,
}

/// Reads the status. Counts stop at a million rows: past that, the number
/// matters less than that it is large.
pub async fn read(pool: &PgPool, node_timeout: Duration) -> Result<ClusterStatus, sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let nodes = sqlx::query_as!(
        NodeStatus,
        r#"
        SELECT n.id, n.listen_addr, n.version, n.started_at, n.last_seen_at,
               n.last_seen_at > now() - make_interval(secs => $1) AS "alive!",
               (SELECT count(*) FROM relay.connections c WHERE c.node_id = n.id) AS "connections!",
               (SELECT count(*) FROM (SELECT 1 FROM relay.outbox o WHERE o.node_id = n.id LIMIT 1000000) b)
                   AS "backlog!",
               (SELECT EXTRACT(epoch FROM now() - min(o.created_at))::float8
                  FROM relay.outbox o WHERE o.node_id = n.id) AS oldest_backlog_s
          FROM relay.nodes n
         ORDER BY n.id
        "#,
        node_timeout.as_secs_f64()
    )
    .fetch_all(&mut *scope)
    .await?;
    let totals = sqlx::query!(
        r#"
        SELECT (SELECT count(*) FROM relay.connections) AS "connections!",
               (SELECT count(*) FROM (SELECT 1 FROM relay.outbox WHERE node_id IS NULL LIMIT 1000000) p)
                   AS "parked!"
        "#
    )
    .fetch_one(&mut *scope)
    .await?;
    // The most behind node's first row, by the outbox's (node, message) index.
    let most_behind = nodes.iter().filter(|n| n.backlog > 0).max_by(|a, b| {
        a.oldest_backlog_s
            .unwrap_or(0.0)
            .total_cmp(&b.oldest_backlog_s.unwrap_or(0.0))
    });
    let oldest_pending = match most_behind {
        None => None,
        Some(node) => sqlx::query!(
            r#"
            SELECT message_id AS "message_id!", created_at,
                   EXTRACT(epoch FROM now() - created_at)::float8 AS "age_s!"
              FROM relay.outbox
             WHERE node_id = $1 AND message_id IS NOT NULL
             ORDER BY message_id
             LIMIT 1
            "#,
            node.id
        )
        .fetch_optional(&mut *scope)
        .await?
        .map(|row| PendingWork {
            message_id: row.message_id.to_string(),
            node_id: node.id.clone(),
            queued_at: row.created_at,
            age_s: row.age_s,
        }),
    };
    let sweeper = sqlx::query_as!(
        SweeperStatus,
        r#"SELECT node_id AS "node_id!", since, lease_until, last_run_at, last_report
             FROM relay.sweeper WHERE node_id IS NOT NULL"#
    )
    .fetch_optional(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(ClusterStatus {
        answered_by: None,
        nodes,
        connections: totals.connections,
        parked: totals.parked,
        oldest_pending,
        sweeper,
    })
}

/// The status as `pgrelay status` prints it.
impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<24} {:<22} {:<6} {:>11} {:>8} {:>12}  last seen",
            "node", "address", "state", "connections", "backlog", "oldest (s)"
        )?;
        for node in &self.nodes {
            writeln!(
                f,
                "{:<24} {:<22} {:<6} {:>11} {:>8} {:>12}  {}",
                node.id,
                node.listen_addr.as_deref().unwrap_or("-"),
                if node.alive { "live" } else { "silent" },
                node.connections,
                node.backlog,
                node.oldest_backlog_s
                    .map_or("-".to_owned(), |s| format!("{s:.1}")),
                node.last_seen_at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
            )?;
        }
        writeln!(f)?;
        writeln!(f, "connections     {}", self.connections)?;
        writeln!(
            f,
            "parked          {} (messages waiting for offline users)",
            self.parked
        )?;
        match &self.oldest_pending {
            Some(pending) => writeln!(
                f,
                "oldest pending  message {} for node {}, queued {:.1} s ago",
                pending.message_id, pending.node_id, pending.age_s
            )?,
            None => writeln!(f, "oldest pending  none (no work waiting for any node)")?,
        }
        match &self.sweeper {
            Some(sweeper) => writeln!(
                f,
                "sweeper         {} (last run {}, lease until {})",
                sweeper.node_id,
                sweeper.last_run_at.map_or("never".to_owned(), |at| at
                    .format("%H:%M:%S%.3f UTC")
                    .to_string()),
                sweeper.lease_until.format("%H:%M:%S%.3f UTC")
            ),
            None => writeln!(f, "sweeper         none yet"),
        }
    }
}

/// One delivery, as `pgrelay tail` shows it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DeliveryEvent {
    pub message_id: String,
    pub user_id: String,
    pub node_id: String,
    pub connection_id: String,
    pub destination: Option<String>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: DateTime<Utc>,
    pub acked_at: Option<DateTime<Utc>>,
}

/// Where a listing of deliveries is: its filters and the last row it
/// returned. Opaque to clients (`next` of `/v1/deliveries`): base64url of
/// this, as JSON.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeliveryCursor {
    /// Deliveries at or after this time only.
    pub since: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The last row returned, by (recording transaction, message id,
    /// connection id); None before the first page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<(i64, i64, Uuid)>,
}

impl DeliveryCursor {
    pub fn encode(&self) -> String {
        crate::cursor::encode(self)
    }

    pub fn decode(text: &str) -> Result<Self, crate::cursor::BadCursor> {
        crate::cursor::decode(text)
    }
}

/// The next page of deliveries after `cursor`, at most `limit`, and the
/// cursor after it (the same one when nothing new was recorded yet).
///
/// No gaps and no duplicates: rows are listed in the order of the
/// transactions that recorded them, and only once every older transaction
/// has ended (a transaction still open holds the listing back, however long
/// it stays open).
pub async fn deliveries_page(
    pool: &PgPool,
    cursor: &DeliveryCursor,
    limit: i64,
) -> Result<(Vec<DeliveryEvent>, DeliveryCursor), sqlx::Error> {
    // Rows recorded before the cursor column existed (NULL) come first, as 0.
    let (after_xid, after_message, after_connection) = cursor.after.unwrap_or((-1, 0, Uuid::nil()));
    let mut scope = crate::db::scope(pool).await?;
    let rows = sqlx::query!(
        r#"
        SELECT d.message_id, d.user_id, d.node_id, d.connection_id, m.destination, m.created_at,
               d.delivered_at, d.acked_at, COALESCE(d.recorded_xid, 0) AS "recorded_xid!"
          FROM relay.deliveries d
          JOIN relay.messages m ON m.id = d.message_id
         WHERE (COALESCE(d.recorded_xid, 0), d.message_id, d.connection_id) > ($1, $2, $3)
           -- The same bound in a form the BRIN index can use: a long tail
           -- reads only what is past its cursor.
           AND (d.recorded_xid >= $1 OR (d.recorded_xid IS NULL AND $1 <= 0))
           AND (d.recorded_xid IS NULL
                OR d.recorded_xid < (pg_snapshot_xmin(pg_current_snapshot())::text)::bigint)
           AND d.delivered_at >= $4
           AND ($5::text IS NULL OR d.user_id = $5)
           AND ($6::text IS NULL OR d.node_id = $6)
         ORDER BY COALESCE(d.recorded_xid, 0), d.message_id, d.connection_id
         LIMIT $7
        "#,
        after_xid,
        after_message,
        after_connection,
        cursor.since,
        cursor.user.as_deref(),
        cursor.node.as_deref(),
        limit
    )
    .fetch_all(&mut *scope)
    .await?;
    scope.end().await?;
    let mut next = cursor.clone();
    if let Some(last) = rows.last() {
        next.after = Some((last.recorded_xid, last.message_id, last.connection_id));
    }
    let events = rows
        .into_iter()
        .map(|r| DeliveryEvent {
            message_id: r.message_id.to_string(),
            user_id: r.user_id,
            node_id: r.node_id,
            connection_id: r.connection_id.to_string(),
            destination: r.destination,
            created_at: r.created_at,
            delivered_at: r.delivered_at,
            acked_at: r.acked_at,
        })
        .collect();
    Ok((events, next))
}

impl fmt::Display for DeliveryEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let latency = (self.delivered_at - self.created_at)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1000.0;
        write!(
            f,
            "{}  message {} → {} on {} (connection {}) {:+.1} ms{}{}",
            self.delivered_at.format("%H:%M:%S%.3f"),
            self.message_id,
            self.user_id,
            self.node_id,
            self.connection_id,
            latency,
            self.destination
                .as_deref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default(),
            if self.acked_at.is_some() {
                "  acked"
            } else {
                ""
            },
        )
    }
}

//! Node rows: registration, heartbeats, the sweeper's lease and
//! deregistration.
//!
//! A node's row carries its *incarnation*: a fresh value per registration.
//! Every transaction the node runs for itself names it and is fenced by it
//! (`relay.fence`, see the migrations), so that once the row is gone (the
//! node was reaped) or names another incarnation (the node registered again,
//! or another process took its id), nothing the node still had in flight
//! can commit.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::config::NodeId;

/// The transaction advisory lock that serializes registering a node id with
/// handing back what it left (two-key form, in pgrelay's key space).
const LOCK_CLASS: i32 = 0x7067_726c; // "pgrl"

/// How long a registration waits for the transactions of an earlier
/// incarnation of its id to end, before it tries again.
const REGISTER_LOCK_TIMEOUT: &str = "5s";

/// Registers this process as `node_id` under `incarnation`. What an earlier
/// registration of the id left (a crash, a restart, a registration that was
/// declared dead) goes first: its connections and subscriptions (their
/// sockets are gone). Its outbox rows stay: [`adopt`] makes the ones it had
/// claimed claimable again, and this registration's claims, finding their
/// connections gone, park their messages. Waits until that registration's
/// fenced transactions have ended (changing the incarnation, a key column,
/// takes FOR UPDATE), so none of them can commit afterwards.
pub async fn register(
    conn: &mut PgConnection,
    node_id: &NodeId,
    incarnation: Uuid,
    listen_addr: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin_on(conn).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '{REGISTER_LOCK_TIMEOUT}'"
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        LOCK_CLASS,
        node_id.as_str()
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "SELECT 1 AS locked FROM relay.nodes WHERE id = $1 FOR UPDATE",
        node_id.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM relay.subscriptions WHERE node_id = $1",
        node_id.as_str()
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        "DELETE FROM relay.connections WHERE node_id = $1",
        node_id.as_str()
    )
    .execute(&mut *tx)
    .await?;
    // What its queue consumers held waits in the queues again, and what its
    // STOMP users were written but never acked waits for their next
    // connection.
    sqlx::query!(
        "SELECT relay.release_queues($1), relay.park_unacked('{}', $1)",
        node_id.as_str()
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!(
        r#"
        INSERT INTO relay.nodes (id, incarnation, listen_addr, version)
        VALUES ($1, $2, $3, $4)
        ON CONFLICT (id) DO UPDATE
           SET incarnation = excluded.incarnation, started_at = now(), last_seen_at = now(),
               listen_addr = excluded.listen_addr, version = excluded.version
        "#,
        node_id.as_str(),
        incarnation,
        listen_addr,
        env!("CARGO_PKG_VERSION"),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Rows adopted per statement by [`adopt`].
const ADOPT_BATCH: i64 = 5000;

/// Makes outbox rows that an earlier registration of this node claimed
/// claimable again, [`ADOPT_BATCH`] at a time; answers how many, and whether
/// more remain. Their connections are gone: this registration's claims park
/// their messages (unless a socket of the user was written them).
pub async fn adopt(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
) -> Result<(u64, bool), sqlx::Error> {
    let mut scope = crate::db::scope(pool).await?;
    let adopted = sqlx::query!(
        r#"
        UPDATE relay.outbox SET claimed_at = NULL, claimed_by = NULL
         WHERE id = ANY (ARRAY(SELECT id FROM relay.outbox
                                WHERE node_id = $1 AND claimed_by IS DISTINCT FROM $2
                                  AND claimed_at IS NOT NULL
                                LIMIT $3
                                  FOR UPDATE SKIP LOCKED))
        "#,
        node_id.as_str(),
        incarnation,
        ADOPT_BATCH,
    )
    .execute(&mut *scope)
    .await?
    .rows_affected();
    scope.end().await?;
    Ok((adopted, adopted >= ADOPT_BATCH as u64))
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The row is this incarnation's, and was refreshed.
    pub alive: bool,
    /// This incarnation holds the sweeper's lease (renewed by this beat).
    pub leading: bool,
}

/// Refreshes the node's `last_seen_at`, and the sweeper's lease by `lease`
/// if this incarnation holds it (None: let it run out), in one statement on
/// the node's liveness connection. Touches no row a claim or a connect locks.
pub async fn beat(
    conn: &mut PgConnection,
    node_id: &NodeId,
    incarnation: Uuid,
    lease: Option<Duration>,
) -> Result<Beat, sqlx::Error> {
    let mut scope = crate::db::scope_on(conn).await?;
    let beat = sqlx::query!(
        r#"
        WITH beat AS (
            UPDATE relay.nodes SET last_seen_at = now()
             WHERE id = $1 AND incarnation = $2
            RETURNING 1
        ), lease AS (
            UPDATE relay.sweeper SET lease_until = now() + make_interval(secs => $3)
             WHERE node_id = $1 AND incarnation = $2 AND $3::float8 IS NOT NULL AND EXISTS (SELECT 1 FROM beat)
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM beat) AS "alive!", EXISTS (SELECT 1 FROM lease) AS "leading!"
        "#,
        node_id.as_str(),
        incarnation,
        lease.map(|lease| lease.as_secs_f64()),
    )
    .fetch_one(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(Beat {
        alive: beat.alive,
        leading: beat.leading,
    })
}

/// Takes the sweeper's lease if it is free (expired), or renews it if this
/// incarnation holds it. Answers whether this incarnation holds it now, and
/// whether it has just taken it.
pub async fn lead(
    conn: &mut PgConnection,
    node_id: &NodeId,
    incarnation: Uuid,
    lease: Duration,
) -> Result<Option<bool>, sqlx::Error> {
    let mut scope = crate::db::scope_on(conn).await?;
    let row = sqlx::query!(
        r#"
        UPDATE relay.sweeper s
           SET lease_until = now() + make_interval(secs => $3),
               node_id = $1, incarnation = $2,
               since = CASE WHEN s.incarnation = $2 THEN s.since ELSE now() END,
               last_run_at = CASE WHEN s.incarnation = $2 THEN s.last_run_at END,
               last_report = CASE WHEN s.incarnation = $2 THEN s.last_report END
         WHERE (s.incarnation = $2 OR s.lease_until < now())
           AND EXISTS (SELECT 1 FROM relay.nodes n WHERE n.id = $1 AND n.incarnation = $2)
        RETURNING s.since = now() AS "taken!"
        "#,
        node_id.as_str(),
        incarnation,
        lease.as_secs_f64(),
    )
    .fetch_optional(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(row.map(|r| r.taken))
}

/// The incarnation registered under `node_id`, if any.
pub async fn owner(conn: &mut PgConnection, node_id: &NodeId) -> Result<Option<Uuid>, sqlx::Error> {
    let mut scope = crate::db::scope_on(conn).await?;
    let owner = sqlx::query_scalar!(
        "SELECT incarnation FROM relay.nodes WHERE id = $1",
        node_id.as_str()
    )
    .fetch_optional(&mut *scope)
    .await?;
    scope.end().await?;
    Ok(owner)
}

/// Removes this node from the registry on a clean stop: its unclaimed and
/// unfinished work is handed back (parked for its users), its connections
/// removed, its row deleted, and the sweeper's lease let go.
pub async fn deregister(
    pool: &PgPool,
    node_id: &NodeId,
    incarnation: Uuid,
) -> Result<(), sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        LOCK_CLASS,
        node_id.as_str()
    )
    .execute(&mut *tx)
    .await?;
    let ours = sqlx::query!(
        "DELETE FROM relay.nodes WHERE id = $1 AND incarnation = $2 RETURNING 1 AS gone",
        node_id.as_str(),
        incarnation
    )
    .fetch_optional(&mut *tx)
    .await?;
    // A node whose id another process took must not remove that one's rows.
    if ours.is_some() {
        sqlx::query!("SELECT relay.release_node($1)", node_id.as_str())
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query!(
        "UPDATE relay.sweeper SET lease_until = '-infinity' WHERE incarnation = $1",
        incarnation
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// What one reap (or hand-back of leftovers) did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HandedBack {
    /// The node's row was removed by this call.
    pub reaped: bool,
    pub work: u64,
    pub parked: u64,
    pub connections: u64,
    /// More rows of the node wait for a later call.
    pub more: bool,
}

/// Reaps `node_id` if it has been silent for `silent_for` (or only hands
/// back its leftovers if its row is already gone), provided the caller
/// (`sweeper`, `sweeper_incarnation`) holds the sweeper's lease. Deleting
/// the row waits for the node's fenced transactions in flight, at most
/// `lock_timeout`; a node paused inside one is then left for the next sweep
/// (its transaction is ended by the server once idle for the idle timeout).
/// At most `batch` outbox rows are handed back per call.
pub async fn reap(
    pool: &PgPool,
    node_id: &str,
    silent_for: Duration,
    sweeper: &NodeId,
    sweeper_incarnation: Uuid,
    batch: i32,
    lock_timeout: Duration,
) -> Result<Option<HandedBack>, sqlx::Error> {
    let bounds = crate::db::Bounds {
        statement: Duration::from_secs(10),
        idle: Duration::from_secs(5),
        lock: Some(lock_timeout),
        asynchronous_commit: false,
    };
    let mut tx = crate::db::begin_bounded(pool, bounds).await?;
    sqlx::query!(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        LOCK_CLASS,
        node_id
    )
    .execute(&mut *tx)
    .await?;
    let decision = sqlx::query!(
        r#"
        WITH lease AS (
            SELECT 1 FROM relay.sweeper
             WHERE node_id = $3 AND incarnation = $4 AND lease_until > now()
        ), gone AS (
            DELETE FROM relay.nodes
             WHERE id = $1 AND last_seen_at < now() - make_interval(secs => $2)
               AND EXISTS (SELECT 1 FROM lease)
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM lease) AS "leading!",
               EXISTS (SELECT 1 FROM gone) AS "reaped!",
               EXISTS (SELECT 1 FROM relay.nodes WHERE id = $1) AS "registered!"
        "#,
        node_id,
        silent_for.as_secs_f64(),
        sweeper.as_str(),
        sweeper_incarnation,
    )
    .fetch_one(&mut *tx)
    .await?;
    // Not the sweeper any more, or the node is alive (or back): nothing to do.
    if !decision.leading || (decision.registered && !decision.reaped) {
        return Ok(None);
    }
    let handed = sqlx::query!(
        r#"SELECT work AS "work!", parked AS "parked!", connections AS "connections!"
             FROM relay.hand_back($1, $2)"#,
        node_id,
        batch
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!(
        "SELECT relay.release_queues($1), relay.park_unacked('{}', $1)",
        node_id
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(HandedBack {
        reaped: decision.reaped,
        work: handed.work as u64,
        parked: handed.parked as u64,
        connections: handed.connections as u64,
        more: handed.work >= i64::from(batch) || handed.connections >= i64::from(batch),
    }))
}

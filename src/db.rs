//! The database: connection pool, migrations and error classification.
//!
//! `DATABASE_URL` may be a transaction-mode pooler ([`pooled`]): then
//! nothing here relies on session state. Connections carry no startup
//! parameters and no statement cache, every statement runs inside a
//! transaction ([`scope`], [`begin_bounded`]) whose `BEGIN` first drops the
//! prepared statements that other clients left on the server connection,
//! and limits are `SET LOCAL`.

pub mod pooling;
mod scope;

pub use scope::{Scope, ScopeOn, scope, scope_on};

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use crate::config::{PoolerMode, Settings};

/// How long a request waits for a database connection before it is answered
/// 503: well inside the contract's 5 s.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest any background database operation may take. A connection
/// whose server vanished without a reset (a network cut) would otherwise hang
/// a task until TCP gives up, many minutes later.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// The SQLSTATE of `relay.fence`: the node is no longer registered under
/// the incarnation its transaction named (it was reaped, or another process
/// took its id).
pub const FENCED: &str = "PR410";

/// Whether `error` is the fence refusing this node's transaction.
pub fn is_fenced(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == FENCED)
}

/// Whether this process reaches PostgreSQL through a transaction-mode pooler
/// (set once at start from [`pooling::plan`]; one process, one way).
static POOLED: AtomicBool = AtomicBool::new(false);

/// How long a transaction through the pooler may sit idle before the server
/// ends it, in ms: a node paused or cut off between a statement and its
/// COMMIT holds no lock for long (a pooler keeps the server connection).
static POOLED_IDLE_MS: AtomicU64 = AtomicU64::new(5_000);

/// Declares how this process reaches the database, and the idle bound of its
/// pooled transactions: before any pool connects.
pub fn set_pooled(pooled: bool, idle: Duration) {
    POOLED_IDLE_MS.store(idle.as_millis().max(1) as u64, Ordering::Release);
    POOLED.store(pooled, Ordering::Release);
}

/// Whether `DATABASE_URL` is a transaction-mode pooler.
pub fn pooled() -> bool {
    POOLED.load(Ordering::Acquire)
}

/// What a statement outside a bounded transaction may take on the server.
const STATEMENT_TIMEOUT_MS: u64 = 30_000;

/// The start of every transaction through a pooler: the server connection
/// may hold prepared statements left by whichever client used it last
/// (sqlx names them per client connection and, with its cache off, never
/// closes them, so another client's `sqlx_s_1` would collide with ours).
const POOLED_BEGIN: &str = "BEGIN; DEALLOCATE ALL";

/// Limits the server itself enforces on a transaction, set with `SET LOCAL`
/// in the `BEGIN` round trip (no session state, nothing a transaction-mode
/// pooler would keep).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Each statement is cancelled by the server after this long.
    pub statement: Duration,
    /// The server ends the session if the transaction sits idle this long
    /// (its node paused or cut off): nothing of a node that stopped running
    /// holds locks for long.
    pub idle: Duration,
    /// Lock waits give up after this long (None: only `statement` bounds them).
    pub lock: Option<Duration>,
    /// `synchronous_commit = off`: for bookkeeping whose commit nothing
    /// waits on (claims, delivery records), never for a write behind a 2xx.
    pub asynchronous_commit: bool,
}

impl Bounds {
    /// A claim's transaction (the outbox's, a queue's), idle for at most
    /// `idle`.
    pub fn claim(idle: Duration) -> Self {
        Self {
            // Longer than the claimer waits (OP_TIMEOUT): an abandoned claim
            // is rolled back, not cut short under its successor.
            statement: OP_TIMEOUT * 3,
            idle,
            lock: None,
            // Nothing waits on its flush: if a crash of PostgreSQL loses
            // it, what it took comes back (at least once).
            asynchronous_commit: true,
        }
    }
}

/// How the node's own database work fails.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    /// The node's registration is no longer current (it was declared dead,
    /// or another process took its id): nothing was committed.
    #[error("this node is no longer registered under this incarnation (it was declared dead)")]
    Fenced,
    #[error(transparent)]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for WorkError {
    fn from(error: sqlx::Error) -> Self {
        if is_fenced(&error) {
            WorkError::Fenced
        } else {
            WorkError::Database(error)
        }
    }
}

/// Opens a transaction under `bounds`.
pub async fn begin_bounded(
    pool: &PgPool,
    bounds: Bounds,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    use std::fmt::Write;
    // Only statements that cannot fail here: a failing BEGIN statement would
    // leave its connection in an aborted transaction that sqlx does not know
    // it opened.
    let mut begin = format!(
        "{}; SET LOCAL statement_timeout = {}; SET LOCAL idle_in_transaction_session_timeout = {}",
        if pooled() { POOLED_BEGIN } else { "BEGIN" },
        bounds.statement.as_millis().max(1),
        bounds.idle.as_millis().max(1)
    );
    if bounds.asynchronous_commit {
        begin.push_str("; SET LOCAL synchronous_commit = off");
    }
    if let Some(lock) = bounds.lock {
        let _ = write!(
            begin,
            "; SET LOCAL lock_timeout = {}",
            lock.as_millis().max(1)
        );
    }
    pool.begin_with(sqlx::AssertSqlSafe(begin)).await
}

/// Opens a transaction with the usual statement limit (what the connection
/// itself carries on a direct server).
pub async fn begin(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    if pooled() {
        pool.begin_with(sqlx::AssertSqlSafe(pooled_begin())).await
    } else {
        pool.begin().await
    }
}

/// [`begin`] on one connection.
pub async fn begin_on(
    connection: &mut PgConnection,
) -> Result<sqlx::Transaction<'_, sqlx::Postgres>, sqlx::Error> {
    if pooled() {
        connection
            .begin_with(sqlx::AssertSqlSafe(pooled_begin()))
            .await
    } else {
        connection.begin().await
    }
}

fn pooled_begin() -> String {
    format!(
        "{POOLED_BEGIN}; SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}; \
         SET LOCAL idle_in_transaction_session_timeout = {}",
        POOLED_IDLE_MS.load(Ordering::Acquire)
    )
}

/// Why a `COMMIT` did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The server answered that it rolled the transaction back (a
    /// serialization failure, a deferred constraint): nothing was committed.
    #[error("the transaction was rolled back: {0}")]
    RolledBack(sqlx::Error),
    /// No answer came (the connection broke, or the wait timed out): the
    /// transaction may or may not have committed.
    #[error("the outcome of the commit is unknown: {0}")]
    Unknown(String),
}

/// Commits, waiting at most `limit` for the answer, and says honestly what
/// a failure means. The commit runs to its end in a task of its own: giving
/// up on the answer never cancels it half-way, which would leave the
/// connection with a half-read reply.
pub async fn commit_within(
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    limit: Duration,
) -> Result<(), CommitError> {
    let committing = tokio::spawn(tx.commit());
    match tokio::time::timeout(limit, committing).await {
        Ok(Err(panicked)) => Err(CommitError::Unknown(panicked.to_string())),
        Ok(Ok(Ok(()))) => Ok(()),
        // The connection ending (08…) or the server shutting it down (57P…)
        // in place of the answer says nothing about the commit itself.
        Ok(Ok(Err(error @ sqlx::Error::Database(_)))) if !is_connection_loss(&error) => {
            Err(CommitError::RolledBack(error))
        }
        Ok(Ok(Err(error))) => Err(CommitError::Unknown(error.to_string())),
        Err(_) => Err(CommitError::Unknown(format!(
            "no answer to COMMIT within {} ms",
            limit.as_millis()
        ))),
    }
}

/// Runs a database operation under [`OP_TIMEOUT`]; a timeout is an I/O error,
/// which callers treat as "the database is unavailable".
pub async fn bounded<T>(
    operation: impl std::future::Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    match tokio::time::timeout(OP_TIMEOUT, operation).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "database operation timed out",
        ))),
    }
}

/// The migrations, tracked in `relay._sqlx_migrations` (set in `sqlx.toml`,
/// which sqlx-cli reads too) so that they never mix with the application's own
/// sqlx migrations in `public`.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Runs the migrations. Safe with several nodes starting at once: the
/// migrator holds an advisory lock while it works (a session lock on a
/// direct server; through a pooler, the same lock taken for one transaction
/// that applies them all).
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    if !pooled() {
        return MIGRATOR.run(pool).await;
    }
    let mut tx = begin(pool).await?;
    let database: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(migration_lock_id(&database))
        .execute(&mut *tx)
        .await?;
    let unlocked = Migrator {
        migrations: MIGRATOR.migrations.clone(),
        ignore_missing: MIGRATOR.ignore_missing,
        locking: false,
        no_tx: MIGRATOR.no_tx,
        table_name: MIGRATOR.table_name.clone(),
        create_schemas: MIGRATOR.create_schemas.clone(),
    };
    unlocked.run(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs the migrations over the direct URL when there is one (a real
/// session, as sqlx's migrator expects), else over `pool`.
pub async fn migrate_for(
    settings: &Settings,
    pool: &PgPool,
) -> Result<(), sqlx::migrate::MigrateError> {
    let Some(direct) = &settings.direct_database_url else {
        return migrate(pool).await;
    };
    let mut connection = session_options(direct, &format!("pgrelay {} migrate", settings.node_id))?
        .connect()
        .await?;
    let outcome = MIGRATOR.run(&mut connection).await;
    let _ = connection.close().await;
    outcome
}

/// sqlx's own key for its migration lock: a node migrating through a pooler
/// and one migrating directly exclude each other.
fn migration_lock_id(database: &str) -> i64 {
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32_ad9e * i64::from(CRC_IEEE.checksum(database.as_bytes()))
}

/// Options for every connection of a node to `DATABASE_URL`.
///
/// # Errors
/// When the URL does not parse.
pub fn connect_options(
    database_url: &str,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    if pooled() {
        pooler_options(database_url, application_name)
    } else {
        direct_options(database_url, application_name)
    }
}

/// Options for a connection that is a real session.
///
/// # Errors
/// When the URL does not parse.
pub fn direct_options(
    database_url: &str,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(base_options(database_url, application_name)?
        // A statement that runs this long is stuck; fail it rather than hold a
        // connection and a request forever.
        .options([("statement_timeout", format!("{STATEMENT_TIMEOUT_MS}ms"))]))
}

/// Options for a real session that runs no lone statement of ours (the
/// LISTEN connection, sqlx's migrator on the direct URL): a statement cache,
/// but no startup parameter, which a session-mode pooler might refuse.
///
/// # Errors
/// When the URL does not parse.
pub fn session_options(
    database_url: &str,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(base_options(database_url, application_name)?.extra_float_digits(None))
}

/// Options for a connection through a transaction-mode pooler: no startup
/// parameter a pooler would refuse (`options`, `extra_float_digits`), and
/// no statement cache (a cached statement lives on one server connection,
/// which the next transaction may not get).
///
/// # Errors
/// When the URL does not parse.
pub fn pooler_options(
    database_url: &str,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(base_options(database_url, application_name)?
        .extra_float_digits(None)
        .statement_cache_capacity(0))
}

/// What every connection of a node has: its name, and slow statements logged.
fn base_options(
    database_url: &str,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(database_url)?
        .application_name(application_name)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// Connects the pool, failing fast when the database cannot be reached.
pub async fn connect(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(
        &settings.database_url,
        &format!("pgrelay {}", settings.node_id),
    )?;
    PgPoolOptions::new()
        .max_connections(settings.db_pool_size)
        .min_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
}

/// Connects a command-line tool's pool to `database_url`, direct or a
/// transaction-mode pooler (found out as a node does at start).
pub async fn connect_any(database_url: &str) -> Result<PgPool, sqlx::Error> {
    let mut settings = Settings::new(database_url);
    settings.database_pooler = match std::env::var("PGRELAY_DATABASE_POOLER").as_deref() {
        Ok("transaction") => PoolerMode::Transaction,
        Ok("direct") => PoolerMode::Direct,
        _ => PoolerMode::Auto,
    };
    set_pooled(
        pooling::is_pooler(&settings).await?,
        settings.idle_transaction_timeout(),
    );
    connect(&settings).await
}

/// A small pool for bookkeeping — claims, delivery records — whose commits
/// nothing waits on: their transactions set `synchronous_commit = off`
/// ([`Bounds::asynchronous_commit`]), which saves the flush and its round
/// trips. Never for the writes behind a 2xx.
pub async fn connect_bookkeeping(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(
        &settings.database_url,
        &format!("pgrelay {} bookkeeping", settings.node_id),
    )?;
    PgPoolOptions::new()
        .max_connections(settings.db_bookkeeping_pool_size)
        .min_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
}

/// Publishes the settings that SQL senders need (`relay.send_to_user` applies
/// the same TTL default and size limit as the HTTP API).
pub async fn publish_config(pool: &PgPool, settings: &Settings) -> Result<(), sqlx::Error> {
    let mut scope = scope(pool).await?;
    sqlx::query!(
        r#"
        UPDATE relay.config
           SET default_ttl = make_interval(secs => $1), retention = make_interval(secs => $2),
               max_message_bytes = $3
        "#,
        settings.default_ttl.as_secs_f64(),
        settings.retention.as_secs_f64(),
        settings.max_message_bytes as i32,
    )
    .execute(&mut *scope)
    .await?;
    scope.end().await
}

/// Whether a server error reports the end of the connection rather than
/// the failure of a statement.
pub fn is_connection_loss(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
}

/// Whether an error means "the database is not reachable right now" (answer
/// 503 and retry later) rather than "this request is wrong".
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            // 08: connection exceptions; 57P01-03: shutting down or starting up;
            // 53: out of resources; 40001/40P01: retry the transaction.
            code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "40001"
                || code == "40P01"
        }
        _ => false,
    }
}

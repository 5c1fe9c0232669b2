//! The database: connection pool, migrations and error classification.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::Settings;

/// How long a request waits for a database connection before it is answered
/// 503: well inside the contract's 5 s.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest any background database operation may take. A connection
/// whose server vanished without a reset (a network cut) would otherwise hang
/// a task until TCP gives up, many minutes later.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

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
/// migrator holds an advisory lock while it works.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Options for every connection of a node.
///
/// # Errors
/// When the URL does not parse.
pub fn connect_options(
    database_url: &str,
    application_name: &str,
) -> Result<PgConnectOptions, sqlx::Error> {
    Ok(PgConnectOptions::from_str(database_url)?
        .application_name(application_name)
        // A statement that runs this long is stuck; fail it rather than hold a
        // connection and a request forever.
        .options([("statement_timeout", "30s")])
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

/// A small pool for bookkeeping — claims, delivery records — whose commits
/// nothing waits on: `synchronous_commit = off` there saves the flush and
/// its round trips. Never for the writes behind a 2xx.
pub async fn connect_bookkeeping(settings: &Settings) -> Result<PgPool, sqlx::Error> {
    let options = connect_options(
        &settings.database_url,
        &format!("pgrelay {} bookkeeping", settings.node_id),
    )?
    .options([("synchronous_commit", "off")]);
    PgPoolOptions::new()
        .max_connections(4)
        .min_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
}

/// Publishes the settings that SQL senders need (`relay.send_to_user` applies
/// the same TTL default and size limit as the HTTP API).
pub async fn publish_config(pool: &PgPool, settings: &Settings) -> Result<(), sqlx::Error> {
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
    .execute(pool)
    .await?;
    Ok(())
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

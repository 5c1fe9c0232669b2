//! Starts PostgreSQL: a throwaway server (or `DATABASE_URL`) and a fresh database per test.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use pgrelay::tools::pgbouncer::TempPgBouncer;
use pgrelay::tools::pgtemp::{self, TempPostgres};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use super::waiting::eventually;

enum Server {
    External(String),
    Temporary(TempPostgres),
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        if std::env::var("TEST_LOG").is_ok() {
            pgrelay::telemetry::init(pgrelay::config::LogFormat::Text);
        }
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Server::External(url),
            _ => Server::Temporary(
                TempPostgres::start(pgtemp::Options::default())
                    .expect("start a throwaway PostgreSQL"),
            ),
        }
    })
}

/// The test server's superuser URL (its `postgres` database).
pub fn admin_url() -> String {
    match server() {
        Server::External(url) => url.clone(),
        Server::Temporary(pg) => pg.url("postgres"),
    }
}

/// How this run's nodes reach the test server (`PGRELAY_TEST_POOLER`):
/// directly (unset), through PgBouncer in transaction mode (`pgbouncer`), or
/// through it with a direct URL for LISTEN and migrations
/// (`pgbouncer+direct`). CI runs the core, guarantees and faults tests in
/// each way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRoute {
    Direct,
    Pooler,
    PoolerWithDirectUrl,
}

pub fn node_route() -> NodeRoute {
    match std::env::var("PGRELAY_TEST_POOLER").as_deref() {
        Ok("pgbouncer") => NodeRoute::Pooler,
        Ok("pgbouncer+direct") => NodeRoute::PoolerWithDirectUrl,
        Ok("") | Err(_) => NodeRoute::Direct,
        Ok(other) => panic!("PGRELAY_TEST_POOLER={other}: expected pgbouncer or pgbouncer+direct"),
    }
}

/// A PgBouncer (transaction mode) in front of the test server, started on
/// first use.
pub fn pgbouncer() -> &'static TempPgBouncer {
    static BOUNCER: OnceLock<TempPgBouncer> = OnceLock::new();
    BOUNCER.get_or_init(|| TempPgBouncer::start(&admin_url()).expect("start PgBouncer"))
}

/// `url` (a database on the test server) through the test PgBouncer.
pub fn through_pgbouncer(url: &str) -> String {
    let parsed = url::Url::parse(url).expect("a URL");
    pgbouncer().url(parsed.path().trim_start_matches('/'))
}

/// The `DATABASE_URL` and `PGRELAY_DIRECT_DATABASE_URL` a node is given for
/// `url`, by [`node_route`]. URLs to anything but the test server itself (a
/// fault proxy, a pooler a test started) are left alone.
pub fn node_urls(url: &str) -> (String, Option<String>) {
    let route = node_route();
    let server_port = url::Url::parse(&admin_url()).ok().and_then(|u| u.port());
    let to_server = url::Url::parse(url).ok().and_then(|u| u.port()) == server_port;
    match route {
        _ if !to_server => (url.to_owned(), None),
        NodeRoute::Direct => (url.to_owned(), None),
        NodeRoute::Pooler => (through_pgbouncer(url), None),
        NodeRoute::PoolerWithDirectUrl => (through_pgbouncer(url), Some(url.to_owned())),
    }
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("DATABASE_URL is a URL");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::empty().await;
        pgrelay::db::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// A fresh database without pgrelay's schema.
    pub async fn empty() -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("connect to the test server");
        drop_stale_databases(&admin).await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!("pgrelay_t_{now}_{:08x}", rand::random::<u32>());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let url = with_database(&admin_url(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect(&url)
            .await
            .expect("connect to the test database");
        Self { name, url, pool }
    }

    pub async fn drop_database(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// Databases of tests that failed (and so were kept) in earlier runs.
async fn drop_stale_databases(admin: &PgPool) {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.set(()).is_err() {
        return;
    }
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'pgrelay_t_%'",
    )
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    for name in names {
        let created = name
            .split('_')
            .nth(2)
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        if created < cutoff {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(admin)
            .await;
        }
    }
}

/// Waits until at least `n` of the nodes' database sessions wait on a lock
/// (a test holds it), and answers how many do.
pub async fn node_sessions_waiting_on_locks(pool: &PgPool, n: i64) -> i64 {
    eventually(&format!("{n} node sessions waiting on a lock"), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'pgrelay node-%'
                AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (waiting >= n).then_some(waiting)
    })
    .await
}

//! The database's own floor, measured against the same PostgreSQL in the
//! same run: what one commit with a NOTIFY costs on one connection, and how
//! long a NOTIFY takes to reach a LISTENing connection. Latencies are
//! printed as multiples of it, so that runs compare across machines.

use std::time::{Duration, Instant};

use serde::Serialize;
use sqlx::postgres::PgListener;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Floor {
    /// One autocommit statement inserting a row and calling pg_notify, on
    /// one connection: the median round trip, commit included.
    pub insert_notify_commit_ms: f64,
    /// From sending an autocommit `pg_notify` to its arrival on a
    /// LISTENing connection: the median.
    pub notify_wakeup_ms: f64,
}

impl Floor {
    /// The unit latencies are divided by (the commit-and-notify time).
    pub fn unit_ms(&self) -> f64 {
        self.insert_notify_commit_ms
    }
}

const ROUNDS: usize = 400;

pub async fn measure(database_url: &str) -> anyhow::Result<Floor> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(database_url)
        .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS pgrelay_bench_floor (id bigserial PRIMARY KEY, payload jsonb)",
    )
    .execute(&pool)
    .await?;
    let payload = serde_json::json!({ "p": super::clients::padding(200) });
    let mut commits = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        sqlx::query(
            "WITH i AS (INSERT INTO pgrelay_bench_floor (payload) VALUES ($1) RETURNING 1) \
             SELECT pg_notify('pgrelay_bench_floor', '') FROM i",
        )
        .bind(&payload)
        .execute(&pool)
        .await?;
        commits.push(started.elapsed());
    }
    sqlx::query("DROP TABLE IF EXISTS pgrelay_bench_floor")
        .execute(&pool)
        .await?;

    let mut listener = PgListener::connect(database_url).await?;
    listener.listen("pgrelay_bench_wakeup").await?;
    let mut wakeups = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        sqlx::query("SELECT pg_notify('pgrelay_bench_wakeup', '')")
            .execute(&pool)
            .await?;
        tokio::time::timeout(Duration::from_secs(5), listener.recv()).await??;
        wakeups.push(started.elapsed());
    }
    drop(listener);
    pool.close().await;
    Ok(Floor {
        insert_notify_commit_ms: median_ms(&mut commits),
        notify_wakeup_ms: median_ms(&mut wakeups),
    })
}

fn median_ms(samples: &mut [Duration]) -> f64 {
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1000.0
}

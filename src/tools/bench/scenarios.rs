//! The benchmark's scenarios. Each returns figures; none asserts anything.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::clients::{self, Http, Received, Socket};
use super::cluster::{BenchCluster, CpuMeter, rss_bytes};

const PAYLOAD_BYTES: usize = 200;

#[derive(Debug, Serialize)]
pub struct Throughput {
    pub submitters: usize,
    pub receivers: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub accepted: usize,
    pub delivered: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub errors: u64,
    /// Receivers closed by the server that reconnected with `since`.
    pub reconnects: u64,
    pub delivered_per_sec: f64,
    /// Delivery rows written for the delivered messages.
    pub recorded: i64,
    /// CPU cores used by each process while it ran.
    pub cpu: Vec<(String, f64)>,
}

#[derive(Debug, Serialize)]
pub struct Latency {
    pub offered_per_sec: u64,
    pub sent: usize,
    pub received: usize,
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct Idle {
    pub connections: usize,
    pub connects_per_sec: f64,
    pub node_rss_before_mib: f64,
    pub node_rss_after_mib: f64,
    pub rss_per_connection_kib: f64,
}

#[derive(Debug, Serialize)]
pub struct Fanout {
    pub subscribers: usize,
    /// Time from the POST to the last subscriber's receipt, per run.
    pub one_message_ms: Vec<f64>,
    pub one_message_median_ms: f64,
    pub sustained_messages: usize,
    pub sustained_deliveries_per_sec: f64,
    /// Connects and subscribes per second, before the runs.
    pub subscribes_per_sec: f64,
    /// Deliveries that never came (each subscriber should get every message).
    pub missing: u64,
}

#[derive(Debug, Serialize)]
pub struct SqlSend {
    pub clients: usize,
    pub seconds: f64,
    pub send_to_user_per_sec: f64,
    /// The same machine's raw INSERT + NOTIFY transactions per second (pgbench).
    pub pgbench_insert_notify_per_sec: Option<f64>,
}

/// Connects `count` receivers named `{prefix}{i}` to node `node`.
/// Connected receivers, each with the path it resumes on.
pub(super) async fn receivers(
    cluster: &BenchCluster,
    node: usize,
    prefix: &str,
    count: usize,
) -> anyhow::Result<Vec<(Socket, Option<clients::Resume>)>> {
    let server = cluster.nodes[node].addr;
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let path = format!("/v1/ws?user={prefix}{i}");
        let ws = clients::connect_ws(server, IpAddr::V4(Ipv4Addr::LOCALHOST), &path).await?;
        let resume = clients::Resume {
            server,
            path,
            count: reconnects.clone(),
        };
        sockets.push((ws, Some(resume)));
    }
    Ok(sockets)
}

pub(super) struct Listening {
    counter: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<Received>>,
}

impl Listening {
    pub(super) fn start(sockets: Vec<(Socket, Option<clients::Resume>)>, epoch: Instant) -> Self {
        let reconnects = sockets
            .iter()
            .find_map(|(_, resume)| resume.as_ref().map(|r| r.count.clone()))
            .unwrap_or_default();
        let mut listening = Self::new(reconnects);
        for (ws, resume) in sockets {
            listening.spawn(ws, resume, epoch);
        }
        listening
    }

    fn new(reconnects: Arc<AtomicU64>) -> Self {
        Self {
            counter: Arc::new(AtomicU64::new(0)),
            reconnects,
            stop: CancellationToken::new(),
            tasks: Vec::new(),
        }
    }

    fn spawn(&mut self, ws: Socket, resume: Option<clients::Resume>, epoch: Instant) {
        self.tasks.push(tokio::spawn(clients::receive(
            ws,
            epoch,
            self.counter.clone(),
            self.stop.clone(),
            resume,
        )));
    }

    fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Waits until `n` messages have arrived (or `limit` passes).
    pub(super) async fn until(&self, n: u64, limit: Duration) -> bool {
        let started = Instant::now();
        while self.counter.load(Ordering::Acquire) < n {
            if started.elapsed() > limit {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    pub(super) async fn finish(self) -> Vec<Received> {
        self.stop.cancel();
        let mut all = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            all.push(task.await.unwrap_or_default());
        }
        all
    }
}

/// Cross-node throughput: receivers on node b, submissions on node a.
pub async fn throughput(
    cluster: &BenchCluster,
    pool: &PgPool,
    submitters: usize,
    receiver_count: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    let epoch = Instant::now();
    let listening = Listening::start(receivers(cluster, 1, "tp", receiver_count).await?, epoch);
    let http = Http::new(submitters);
    let url = format!("http://{}/v1/messages", cluster.nodes[0].addr);
    let padding = clients::padding(PAYLOAD_BYTES);
    let errors = Arc::new(AtomicU64::new(0));
    let meter = CpuMeter::start(cluster);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for submitter in 0..submitters {
        let (http, url, padding, errors) =
            (http.clone(), url.clone(), padding.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut n = submitter;
            while Instant::now() < deadline {
                let to = format!(r#"{{"user":"tp{}"}}"#, n % receiver_count);
                n += submitters;
                let body = clients::message_body(&to, clients::now_micros(epoch), &padding);
                match http.post(&url, body).await {
                    Ok((202, body)) => accepted.extend(
                        clients::parse_id(&body).map(|id| (id, (n - submitters) % receiver_count)),
                    ),
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            accepted
        }));
    }
    let mut addressed = Vec::new();
    for task in tasks {
        addressed.extend(task.await?);
    }
    let accepted: Vec<i64> = addressed.iter().map(|(id, _)| *id).collect();
    listening
        .until(accepted.len() as u64, Duration::from_secs(60))
        .await;
    let elapsed = started.elapsed();
    let cpu = meter.stop();
    let reconnects = listening.reconnects();
    let received = listening.finish().await;

    let mut seen: Vec<i64> = received
        .iter()
        .flat_map(|r| r.ids.iter().copied())
        .collect();
    let total = seen.len();
    seen.sort_unstable();
    seen.dedup();
    let duplicates = total - seen.len();
    let delivered = accepted
        .iter()
        .filter(|id| seen.binary_search(id).is_ok())
        .count();
    if delivered < accepted.len() {
        explain_losses(pool, &addressed, &received, &seen).await;
    }
    let recorded = recorded_deliveries(pool, &accepted, delivered as i64).await?;
    Ok(Throughput {
        submitters,
        receivers: receiver_count,
        payload_bytes: PAYLOAD_BYTES,
        seconds: elapsed.as_secs_f64(),
        accepted: accepted.len(),
        delivered,
        lost: accepted.len() - delivered,
        duplicates,
        errors: errors.load(Ordering::Relaxed),
        reconnects,
        delivered_per_sec: delivered as f64 / elapsed.as_secs_f64(),
        recorded,
        cpu,
    })
}

/// Says on stderr where undelivered messages are: still in the outbox, or
/// taken from it but not delivered, before or after newer messages of
/// their user.
async fn explain_losses(
    pool: &PgPool,
    addressed: &[(i64, usize)],
    received: &[Received],
    seen: &[i64],
) {
    let newest: Vec<i64> = received
        .iter()
        .map(|r| r.ids.iter().max().copied().unwrap_or(0))
        .collect();
    let lost: Vec<(i64, usize)> = addressed
        .iter()
        .filter(|(id, _)| seen.binary_search(id).is_err())
        .copied()
        .collect();
    let overtaken = lost.iter().filter(|(id, user)| *id < newest[*user]).count();
    let ids: Vec<i64> = lost.iter().map(|(id, _)| *id).collect();
    let in_outbox: Result<(i64, i64), _> = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE node_id IS NULL) FROM relay.outbox WHERE message_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await;
    for (id, user) in lost.iter().take(3) {
        let ids = &received[*user].ids;
        let after = ids.iter().position(|i| i > id);
        let around = after.map(|p| &ids[p.saturating_sub(3)..(p + 3).min(ids.len())]);
        eprintln!("(message {id} for receiver {user}: received around it, in order: {around:?})");
    }
    eprintln!(
        "({} undelivered: {overtaken} older than a message their receiver got; in the outbox (routed, parked): {in_outbox:?}; users: {:?})",
        lost.len(),
        {
            let mut users: Vec<usize> = lost.iter().map(|(_, u)| *u).collect();
            users.sort_unstable();
            users.dedup();
            users
        }
    );
}

/// Delivery rows of `ids`, once the writers have caught up (or 30 s).
async fn recorded_deliveries(pool: &PgPool, ids: &[i64], expected: i64) -> anyhow::Result<i64> {
    let started = Instant::now();
    loop {
        let recorded: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.deliveries WHERE message_id = ANY($1)")
                .bind(ids)
                .fetch_one(pool)
                .await?;
        if recorded >= expected || started.elapsed() > Duration::from_secs(30) {
            return Ok(recorded);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submit → receipt latency at a fixed offered load, open loop: requests go
/// out on schedule whatever the answers do.
pub async fn latency(
    cluster: &BenchCluster,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Latency> {
    let epoch = Instant::now();
    let receiver_count = 100;
    let prefix = format!("lat{rate}-");
    let listening = Listening::start(receivers(cluster, 1, &prefix, receiver_count).await?, epoch);
    let http = Http::new(256);
    let url = format!("http://{}/v1/messages", cluster.nodes[0].addr);
    let padding = clients::padding(PAYLOAD_BYTES);
    let errors = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let (http, url, errors, accepted) =
            (http.clone(), url.clone(), errors.clone(), accepted.clone());
        let to = format!(r#"{{"user":"{prefix}{}"}}"#, i % receiver_count as u64);
        let body = clients::message_body(&to, clients::now_micros(epoch), &padding);
        tasks.push(tokio::spawn(async move {
            match http.post(&url, body).await {
                Ok((202, _)) => accepted.fetch_add(1, Ordering::Relaxed),
                _ => errors.fetch_add(1, Ordering::Relaxed),
            };
        }));
    }
    for task in tasks {
        task.await?;
    }
    listening
        .until(accepted.load(Ordering::Relaxed), Duration::from_secs(30))
        .await;
    let received = listening.finish().await;
    let mut latencies: Vec<u64> = received
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    latencies.sort_unstable();
    let ms = |micros: u64| micros as f64 / 1000.0;
    Ok(Latency {
        offered_per_sec: rate,
        sent: total as usize,
        received: latencies.len(),
        errors: errors.load(Ordering::Relaxed),
        p50_ms: ms(clients::percentile(&latencies, 50.0)),
        p90_ms: ms(clients::percentile(&latencies, 90.0)),
        p99_ms: ms(clients::percentile(&latencies, 99.0)),
        max_ms: ms(latencies.last().copied().unwrap_or(0)),
    })
}

/// Idle connections on one node: connect rate (registry writes included) and
/// memory per connection.
pub async fn idle(cluster: &BenchCluster, count: usize) -> anyhow::Result<Idle> {
    let node = &cluster.nodes[1];
    let (addr, pid) = (node.addr, node.pid());
    let rss_before = rss_bytes(pid);
    let permits = Arc::new(Semaphore::new(256));
    let stop = CancellationToken::new();
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        // Ephemeral ports run out at ~28,000 per source address.
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / 20_000) as u8));
        let permit = permits.clone().acquire_owned().await?;
        let (stop, counter) = (stop.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let ws = clients::connect_ws(addr, source, &format!("/v1/ws?user=idle{i}")).await;
            drop(permit);
            // Keep reading, so that pings are answered.
            if let Ok(ws) = ws {
                let _ = clients::receive(ws, Instant::now(), counter, stop, None).await;
                true
            } else {
                false
            }
        }));
    }
    // Every socket has been connected and welcomed once all permits are back.
    let _all = permits.acquire_many(256).await?;
    let connect_time = started.elapsed();
    // Let allocations settle past one heartbeat before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = rss_bytes(pid);
    stop.cancel();
    let mut connected = 0;
    for task in tasks {
        connected += usize::from(task.await.unwrap_or(false));
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(Idle {
        connections: connected,
        connects_per_sec: connected as f64 / connect_time.as_secs_f64(),
        node_rss_before_mib: mib(rss_before),
        node_rss_after_mib: mib(rss_after),
        rss_per_connection_kib: (rss_after.saturating_sub(rss_before)) as f64
            / 1024.0
            / connected.max(1) as f64,
    })
}

/// One topic, many subscribers over both nodes.
pub async fn fanout(
    cluster: &BenchCluster,
    subscribers: usize,
    sustained: usize,
) -> anyhow::Result<Fanout> {
    let epoch = Instant::now();
    let permits = Arc::new(Semaphore::new(128));
    let mut listening = Listening::new(Arc::default());
    let subscribed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let connect_started = Instant::now();
    for i in 0..subscribers {
        let addr = cluster.nodes[i % 2].addr;
        let permit = permits.clone().acquire_owned().await?;
        let (counter, stop) = (listening.counter.clone(), listening.stop.clone());
        let (subscribed, failed) = (subscribed.clone(), failed.clone());
        // Each subscriber reads as soon as it has subscribed: a socket left
        // unread while thousands of others connect answers no pings, and the
        // server closes it as silent.
        listening.tasks.push(tokio::spawn(async move {
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i / 20_000) as u8));
            let connected = async {
                let path = format!("/v1/ws?user=fan{i}");
                let mut ws = clients::connect_ws(addr, source, &path).await?;
                let subscribe = r#"{"op":"subscribe","topic":"bench.fanout"}"#;
                clients::send_text(&mut ws, subscribe.into()).await?;
                clients::wait_for(&mut ws, "\"subscribed\"").await?;
                anyhow::Ok(ws)
            }
            .await;
            drop(permit);
            match connected {
                Ok(ws) => {
                    subscribed.fetch_add(1, Ordering::Release);
                    clients::receive(ws, epoch, counter, stop, None).await
                }
                Err(error) => {
                    eprintln!("(a subscriber could not subscribe: {error})");
                    failed.fetch_add(1, Ordering::Release);
                    Received::default()
                }
            }
        }));
    }
    while subscribed.load(Ordering::Acquire) + failed.load(Ordering::Acquire) < subscribers as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::ensure!(
        failed.load(Ordering::Acquire) == 0,
        "some subscribers could not subscribe"
    );
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let http = Http::new(4);
    let url = format!("http://{}/v1/messages", cluster.nodes[0].addr);
    let body = r#"{"to":{"topic":"bench.fanout"},"data":{"p":"fan-out"}}"#;
    let mut runs = Vec::new();
    let mut expected = 0u64;
    for _ in 0..5 {
        expected += subscribers as u64;
        let started = Instant::now();
        http.post(&url, body.to_owned()).await?;
        listening.until(expected, Duration::from_secs(60)).await;
        runs.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let started = Instant::now();
    for _ in 0..sustained {
        http.post(&url, body.to_owned()).await?;
    }
    expected += (subscribers * sustained) as u64;
    listening.until(expected, Duration::from_secs(120)).await;
    let sustained_time = started.elapsed().as_secs_f64();
    let received = listening.finish().await;
    let got: u64 = received.iter().map(|r| r.ids.len() as u64).sum();
    let missing = ((subscribers * (5 + sustained)) as u64).saturating_sub(got);
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(Fanout {
        subscribers,
        one_message_median_ms: sorted[sorted.len() / 2],
        one_message_ms: runs,
        sustained_messages: sustained,
        sustained_deliveries_per_sec: (subscribers * sustained) as f64 / sustained_time,
        subscribes_per_sec: subscribers as f64 / connect_seconds,
        missing,
    })
}

/// `relay.send_to_user()` from concurrent application transactions, next to
/// what PostgreSQL does with raw INSERT + NOTIFY transactions.
pub async fn sql_send(
    cluster: &BenchCluster,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<SqlSend> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(clients as u32)
        .connect(&cluster.database_url)
        .await?;
    let data = serde_json::json!({ "p": clients::padding(PAYLOAD_BYTES) });
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (pool, data) = (pool.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let user = format!("sql{client}-{}", n % 100);
                if sqlx::query("SELECT relay.send_to_user($1, $2)")
                    .bind(user)
                    .bind(&data)
                    .execute(&pool)
                    .await
                    .is_ok()
                {
                    sent += 1;
                }
            }
            sent
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let pgbench = pgbench_insert_notify(&cluster.database_url, &pool, clients, duration).await;
    pool.close().await;
    Ok(SqlSend {
        clients,
        seconds: elapsed,
        send_to_user_per_sec: sent as f64 / elapsed,
        pgbench_insert_notify_per_sec: pgbench.ok(),
    })
}

/// pgbench, one-row INSERT + pg_notify per transaction: the ceiling a
/// one-message-per-transaction sender cannot pass.
async fn pgbench_insert_notify(
    database_url: &str,
    pool: &PgPool,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let bindir = crate::tools::pgtemp::find_bindir().map_err(anyhow::Error::msg)?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS pgrelay_bench_raw (id bigserial PRIMARY KEY, payload jsonb)",
    )
    .execute(pool)
    .await?;
    let script = std::env::temp_dir().join(format!("pgrelay-bench-{}.sql", std::process::id()));
    let payload = serde_json::json!({ "p": clients::padding(PAYLOAD_BYTES) }).to_string();
    std::fs::write(
        &script,
        format!(
            "BEGIN;\nINSERT INTO pgrelay_bench_raw (payload) VALUES ('{payload}');\nSELECT pg_notify('pgrelay_bench', '');\nCOMMIT;\n"
        ),
    )?;
    let options: sqlx::postgres::PgConnectOptions = database_url.parse()?;
    let mut pgbench = tokio::process::Command::new(bindir.join("pgbench"));
    // The password, when the URL has one (the throwaway server's does).
    if let Some((_, password)) = database_url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(credentials, _)| credentials.split_once(':'))
    {
        pgbench.env("PGPASSWORD", password);
    }
    let output = pgbench
        .args(["-n", "-M", "prepared", "-j", "2"])
        .args([
            "-c",
            &clients.to_string(),
            "-T",
            &duration.as_secs().max(1).to_string(),
        ])
        .args([
            "-h",
            options.get_host(),
            "-p",
            &options.get_port().to_string(),
        ])
        .args(["-U", options.get_username()])
        .arg("-f")
        .arg(&script)
        .arg(options.get_database().unwrap_or("postgres"))
        .output()
        .await?;
    let _ = std::fs::remove_file(&script);
    sqlx::query("DROP TABLE IF EXISTS pgrelay_bench_raw")
        .execute(pool)
        .await?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .context("no tps in pgbench's output")
}

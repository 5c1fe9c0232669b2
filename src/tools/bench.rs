//! `pgrelay bench`: a load generator that starts a cluster (a throwaway
//! PostgreSQL with fsync on, and two nodes of this binary), runs the
//! scenarios, and prints a table (or JSON, to compare across commits).

mod clients;
mod closed;
pub mod cluster;
mod floor;
mod queues;
mod scenarios;
mod stages;

use std::time::Duration;

use serde::Serialize;

use crate::config::parse_duration;
use cluster::BenchCluster;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Benchmark this database (a fresh database is created in it and
    /// dropped after) instead of a throwaway PostgreSQL.
    #[arg(long)]
    pub database_url: Option<String>,

    /// Scenarios to run, comma-separated: throughput, latency, closed, stomp,
    /// queue, idle, fanout, sql. The database's floor is measured first
    /// whenever latency or closed runs. `queue` needs nodes that serve STOMP
    /// over TCP (not with `--node-binary` of a build without it).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,latency,closed,stomp,queue,idle,fanout,sql"
    )]
    pub scenarios: Vec<String>,

    /// How long each timed scenario runs.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// HTTP submissions in flight in the throughput scenario.
    #[arg(long, default_value_t = 512)]
    pub submitters: usize,

    /// Receiving users (one socket each) in the throughput scenario.
    #[arg(long, default_value_t = 100)]
    pub receivers: usize,

    /// Offered loads of the latency scenario, messages per second.
    #[arg(long, value_delimiter = ',', default_value = "500,2000,5000")]
    pub rates: Vec<u64>,

    /// Idle connections to open on one node.
    #[arg(long, default_value_t = 50_000)]
    pub idle: usize,

    /// Subscribers of the fan-out topic, over both nodes: one run per count.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    pub subscribers: Vec<usize>,

    /// Senders of the closed-loop scenario, each waiting for the delivery of
    /// its previous message.
    #[arg(long, default_value_t = 64)]
    pub senders: usize,

    /// STOMP producer connections of the stomp and queue scenarios.
    #[arg(long, default_value_t = 4)]
    pub stomp_producers: usize,

    /// Consumers (STOMP over TCP, over both nodes) of the queue scenario.
    #[arg(long, default_value_t = 8)]
    pub queue_consumers: usize,

    /// Seconds-long run with small numbers, to check that it works (CI).
    #[arg(long)]
    pub smoke: bool,

    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,

    /// Settings for the throwaway PostgreSQL (repeatable), e.g.
    /// `--postgres-setting shared_preload_libraries=pg_stat_statements`.
    #[arg(long)]
    pub postgres_setting: Vec<String>,

    /// Keep the cluster running after the scenarios (for inspection) until Ctrl-C.
    #[arg(long)]
    pub keep: bool,

    /// Run the nodes from this `pgrelay` binary instead of this one (to
    /// compare two builds under the same load generator, A/B).
    #[arg(long)]
    pub node_binary: Option<std::path::PathBuf>,

    /// Run the nodes through a PgBouncer in transaction mode (`pgbouncer`:
    /// poll-only; `pgbouncer-direct`: with a direct URL for LISTEN).
    #[arg(long, value_enum, default_value = "none")]
    pub pooler: cluster::BenchPooler,

    /// Extra flags for the nodes' `pgrelay serve`.
    #[arg(long, allow_hyphen_values = true, num_args = 1..)]
    pub node_args: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    machine: String,
    /// How the nodes reached PostgreSQL (`--pooler`).
    pooler: String,
    floor: Option<floor::Floor>,
    throughput: Option<scenarios::Throughput>,
    latency: Vec<scenarios::Latency>,
    closed: Vec<closed::ClosedLoop>,
    stomp: Option<closed::StompThroughput>,
    /// STOMP over TCP: a queue, and user messages the same way.
    tcp: Vec<queues::TcpThroughput>,
    idle: Option<scenarios::Idle>,
    fanout: Vec<scenarios::Fanout>,
    sql: Option<scenarios::SqlSend>,
    /// Where the time went in each scenario, per node and stage.
    stages: Vec<(String, Vec<stages::StageFigures>)>,
}

impl Report {
    /// Runs `scenario`, and records what the nodes' stages did meanwhile.
    async fn timed<T>(
        &mut self,
        cluster: &BenchCluster,
        name: String,
        scenario: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let before = stages::Snapshot::take(cluster).await;
        let result = scenario.await?;
        let after = stages::Snapshot::take(cluster).await;
        self.stages.push((name, after.since(&before, cluster)));
        Ok(result)
    }
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if args.smoke {
        args.duration = Duration::from_secs(2);
        args.submitters = args.submitters.min(8);
        args.receivers = args.receivers.min(10);
        args.rates = vec![200];
        args.idle = args.idle.min(200);
        args.subscribers = vec![200];
        args.senders = args.senders.min(4);
        args.stomp_producers = args.stomp_producers.min(2);
        args.queue_consumers = args.queue_consumers.min(2);
    }
    let fd_limit = crate::process::raise_fd_limit();
    let wanted = |name: &str| args.scenarios.iter().any(|s| s == name);
    let (database_url, scratch) = match &args.database_url {
        Some(url) => {
            let (url, name) = scratch_database(url).await?;
            (
                Some(url),
                Some((args.database_url.clone().unwrap_or_default(), name)),
            )
        }
        None => (None, None),
    };
    eprintln!("starting a cluster (PostgreSQL with fsync on, two nodes)…");
    let cluster = BenchCluster::start(
        database_url,
        args.node_binary.clone(),
        &args.node_args,
        &args.postgres_setting,
        args.pooler,
        wanted("queue"),
    )
    .await?;
    let pool = sqlx::PgPool::connect(&cluster.database_url).await?;
    let mut report = Report {
        machine: machine(),
        pooler: format!("{:?}", args.pooler).to_lowercase(),
        ..Report::default()
    };
    if wanted("latency") || wanted("closed") {
        eprintln!("the database's floor: INSERT + NOTIFY commits, NOTIFY → LISTEN…");
        report.floor = Some(floor::measure(&cluster.database_url).await?);
    }
    if wanted("throughput") {
        settle(&pool).await;
        eprintln!(
            "throughput: {} submitters, {} receivers, {:?}…",
            args.submitters, args.receivers, args.duration
        );
        let run = scenarios::throughput(
            &cluster,
            &pool,
            args.submitters,
            args.receivers,
            args.duration,
        );
        report.throughput = Some(report.timed(&cluster, "throughput".into(), run).await?);
    }
    if wanted("latency") {
        for rate in &args.rates {
            eprintln!("latency at {rate} msg/s…");
            let run = scenarios::latency(&cluster, *rate, args.duration);
            let latency = report
                .timed(&cluster, format!("latency at {rate} msg/s"), run)
                .await?;
            report.latency.push(latency);
        }
    }
    if wanted("closed") {
        for way in closed::Way::ALL {
            settle(&pool).await;
            eprintln!("closed loop, {} senders, {}…", args.senders, way.as_str());
            let run = closed::closed_loop(&cluster, way, args.senders, args.duration);
            let name = format!("closed loop, {}", way.as_str());
            let result = report.timed(&cluster, name, run).await?;
            report.closed.push(result);
        }
    }
    if wanted("stomp") {
        settle(&pool).await;
        eprintln!("STOMP SEND from {} producers…", args.stomp_producers);
        let run = closed::stomp_throughput(
            &cluster,
            args.stomp_producers,
            args.receivers,
            args.duration,
        );
        report.stomp = Some(report.timed(&cluster, "stomp send".into(), run).await?);
    }
    if wanted("queue") {
        for kind in [queues::Kind::User, queues::Kind::Queue] {
            settle(&pool).await;
            eprintln!("STOMP over TCP, {kind:?} messages…");
            let run = queues::tcp_throughput(
                &cluster,
                kind,
                args.stomp_producers,
                args.queue_consumers,
                args.duration,
            );
            let name = format!("tcp {kind:?}").to_lowercase();
            let result = report.timed(&cluster, name, run).await?;
            report.tcp.push(result);
        }
    }
    if wanted("idle") {
        // Each socket costs the benchmark and the node a descriptor each.
        let count = args.idle.min(fd_limit.saturating_sub(1_000) as usize);
        eprintln!("idle: {count} connections…");
        report.idle = Some(scenarios::idle(&cluster, count).await?);
    }
    if wanted("fanout") {
        for subscribers in args.subscribers.clone() {
            settle(&pool).await;
            eprintln!("fan-out to {subscribers} subscribers…");
            let sustained = if args.smoke { 3 } else { 20 };
            let run = scenarios::fanout(&cluster, subscribers, sustained);
            let name = format!("fan-out to {subscribers}");
            let fanout = report.timed(&cluster, name, run).await?;
            report.fanout.push(fanout);
        }
    }
    if wanted("sql") {
        eprintln!("SQL send from 16 transactions…");
        report.sql = Some(scenarios::sql_send(&cluster, 16, args.duration).await?);
    }
    pool.close().await;
    if args.keep {
        eprintln!(
            "keeping the cluster: DATABASE_URL={} (Ctrl-C stops)",
            cluster.database_url
        );
        crate::process::wait_for_signal().await;
    }
    cluster.stop().await;
    if let Some((admin_url, name)) = scratch {
        drop_scratch(&admin_url, &name).await;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Lets the previous scenario's aftermath (dead rows, dirty pages) settle
/// before the next one is timed, so that scenarios do not measure each other.
async fn settle(pool: &sqlx::PgPool) {
    for statement in [
        "VACUUM (ANALYZE) relay.outbox, relay.messages, relay.deliveries, relay.streams",
        "CHECKPOINT",
    ] {
        if let Err(error) = sqlx::query(statement).execute(pool).await {
            eprintln!("({statement} failed: {error}; figures may include its aftermath)");
        }
    }
}

async fn scratch_database(url: &str) -> anyhow::Result<(String, String)> {
    let name = format!("pgrelay_bench_{}", std::process::id());
    let admin = sqlx::PgPool::connect(url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    let mut options: sqlx::postgres::PgConnectOptions = url.parse()?;
    options = options.database(&name);
    let url = format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        name
    );
    Ok((url, name))
}

async fn drop_scratch(admin_url: &str, name: &str) {
    if let Ok(admin) = sqlx::PgPool::connect(admin_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    format!("{cpus} CPUs ({model}), PostgreSQL on the same machine")
}

fn print_table(report: &Report) {
    println!("pgrelay bench — {}", report.machine);
    if let Some(t) = &report.throughput {
        println!(
            "\ncross-node throughput ({} submitters on node a, {} receivers on node b, {} B payloads, {:.1} s)",
            t.submitters, t.receivers, t.payload_bytes, t.seconds
        );
        println!("  delivered        {:>10.0} msg/s", t.delivered_per_sec);
        println!("  accepted         {:>10}", t.accepted);
        println!("  delivered        {:>10}", t.delivered);
        println!("  lost             {:>10}", t.lost);
        println!("  duplicates       {:>10}", t.duplicates);
        println!("  reconnects       {:>10}", t.reconnects);
        println!("  errors           {:>10}", t.errors);
        println!("  delivery rows    {:>10}", t.recorded);
        for (name, cores) in &t.cpu {
            println!("  cpu {:<12} {:>10.2} cores", name, cores);
        }
    }
    let unit = report.floor.map(|f| f.unit_ms());
    let times = |ms: f64| unit.map_or(String::new(), |u| format!("{:.1}×", ms / u));
    if let Some(f) = &report.floor {
        println!("\nthe database's floor (same PostgreSQL, one connection, medians)");
        println!(
            "  INSERT + NOTIFY commit {:>8.3} ms   (1 floor: latencies below are also given in floors)",
            f.insert_notify_commit_ms
        );
        println!("  NOTIFY → LISTEN        {:>8.3} ms", f.notify_wakeup_ms);
    }
    if !report.latency.is_empty() {
        println!("\nlatency, submit → receipt, open loop");
        println!(
            "  {:>8} {:>8} {:>8} {:>14} {:>14} {:>14} {:>8}",
            "msg/s", "sent", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for l in &report.latency {
            println!(
                "  {:>8} {:>8} {:>8} {:>7.2} {:>6} {:>7.2} {:>6} {:>7.2} {:>6} {:>8.2}",
                l.offered_per_sec,
                l.sent,
                l.errors,
                l.p50_ms,
                times(l.p50_ms),
                l.p90_ms,
                times(l.p90_ms),
                l.p99_ms,
                times(l.p99_ms),
                l.max_ms
            );
        }
    }
    if !report.closed.is_empty() {
        println!("\nclosed loop: each sender waits for its previous message's delivery");
        println!(
            "  {:<20} {:>7} {:>10} {:>7} {:>14} {:>14}",
            "way in", "senders", "msg/s", "errors", "p50 ms", "p99 ms"
        );
        for c in &report.closed {
            println!(
                "  {:<20} {:>7} {:>10.0} {:>7} {:>7.2} {:>6} {:>7.2} {:>6}",
                c.way.as_str(),
                c.senders,
                c.delivered_per_sec,
                c.errors,
                c.p50_ms,
                times(c.p50_ms),
                c.p99_ms,
                times(c.p99_ms)
            );
        }
    }
    if let Some(s) = &report.stomp {
        println!(
            "\nSTOMP SEND, {} producer connections on node a, {} receivers on node b ({:.1} s)",
            s.producers, s.receivers, s.seconds
        );
        println!("  delivered        {:>10.0} msg/s", s.delivered_per_sec);
        println!("  sent             {:>10}", s.sent);
        println!("  lost             {:>10}", s.lost);
    }
    for t in &report.tcp {
        let what = match t.kind {
            queues::Kind::Queue => "one queue, competing consumers",
            queues::Kind::User => "user messages, a user per consumer",
        };
        println!(
            "\nSTOMP over TCP: {what} ({} producers on node a, {} consumers over both nodes, {:.1} s)",
            t.producers, t.consumers, t.seconds
        );
        println!("  delivered        {:>10.0} msg/s", t.delivered_per_sec);
        println!("  sent             {:>10}", t.sent);
        println!("  lost             {:>10}", t.lost);
        println!("  duplicates       {:>10}", t.duplicates);
    }
    if let Some(i) = &report.idle {
        println!("\nidle connections on one node");
        println!("  connections      {:>10}", i.connections);
        println!(
            "  connects         {:>10.0} /s (registry writes included)",
            i.connects_per_sec
        );
        println!(
            "  node RSS         {:>10.1} MiB → {:.1} MiB",
            i.node_rss_before_mib, i.node_rss_after_mib
        );
        println!("  per connection   {:>10.1} KiB", i.rss_per_connection_kib);
    }
    for f in &report.fanout {
        println!(
            "\ntopic fan-out to {} subscribers over two nodes",
            f.subscribers
        );
        println!(
            "  one message      {:>10.1} ms to the last subscriber (median of {})",
            f.one_message_median_ms,
            f.one_message_ms.len()
        );
        println!(
            "  sustained        {:>10.0} deliveries/s ({} messages)",
            f.sustained_deliveries_per_sec, f.sustained_messages
        );
        println!(
            "  subscribes       {:>10.0} /s (connect + subscribe, before the runs)",
            f.subscribes_per_sec
        );
        println!("  missing          {:>10}", f.missing);
    }
    if let Some(s) = &report.sql {
        println!("\nSQL send, {} concurrent transactions", s.clients);
        println!("  relay.send_to_user {:>8.0} msg/s", s.send_to_user_per_sec);
        if let Some(raw) = s.pgbench_insert_notify_per_sec {
            println!(
                "  pgbench INSERT+NOTIFY {:>5.0} tx/s (the same machine's raw ceiling)",
                raw
            );
        }
    }
    if !report.stages.is_empty() {
        println!("\nwhere the time went, per scenario (pgrelay_stage_seconds on each node)");
        println!(
            "  {:<28} {:<8} {:<18} {:>9} {:>9} {:>9} {:>9}",
            "scenario", "node", "stage", "messages", "mean ms", "p50 ms", "p99 ms"
        );
        for (scenario, figures) in &report.stages {
            for f in figures {
                println!(
                    "  {:<28} {:<8} {:<18} {:>9} {:>9.3} {:>9.3} {:>9.3}",
                    scenario, f.node, f.stage, f.messages, f.mean_ms, f.p50_ms, f.p99_ms
                );
            }
        }
    }
}

//! The cluster a benchmark runs against: a throwaway PostgreSQL (fsync on)
//! or `--database-url`, and two `pgrelay serve` processes of this binary.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::tools::pgbouncer::TempPgBouncer;
use crate::tools::pgtemp::{self, TempPostgres};

/// How the benchmark's nodes reach PostgreSQL.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BenchPooler {
    /// Directly.
    #[default]
    None,
    /// Through a PgBouncer in transaction mode (poll-only nodes).
    Pgbouncer,
    /// Through PgBouncer, with PGRELAY_DIRECT_DATABASE_URL for LISTEN.
    PgbouncerDirect,
}

/// A running benchmark cluster; dropping it stops everything.
pub struct BenchCluster {
    pub nodes: Vec<NodeProc>,
    pub database_url: String,
    /// The postmaster's pid, when this benchmark started the server.
    pub postgres_pid: Option<i32>,
    _postgres: Option<TempPostgres>,
    _pgbouncer: Option<TempPgBouncer>,
}

pub struct NodeProc {
    pub name: String,
    pub addr: SocketAddr,
    /// STOMP over TCP, when the cluster serves it.
    pub stomp_addr: Option<SocketAddr>,
    child: Child,
}

impl NodeProc {
    pub fn pid(&self) -> i32 {
        self.child.id().map_or(0, |p| p as i32)
    }
}

impl BenchCluster {
    pub async fn start(
        database_url: Option<String>,
        node_binary: Option<std::path::PathBuf>,
        node_args: &[String],
        postgres_settings: &[String],
        pooler: BenchPooler,
        stomp: bool,
    ) -> anyhow::Result<Self> {
        let (database_url, postgres) = match database_url {
            Some(url) => (url, None),
            None => {
                let options = pgtemp::Options {
                    fsync: true,
                    max_connections: 200,
                    settings: postgres_settings.to_vec(),
                };
                let postgres = tokio::task::spawn_blocking(move || TempPostgres::start(options))
                    .await?
                    .map_err(anyhow::Error::msg)?;
                (postgres.url("postgres"), Some(postgres))
            }
        };
        let postgres_pid = postgres.as_ref().and_then(postmaster_pid);
        let pgbouncer = match pooler {
            BenchPooler::None => None,
            BenchPooler::Pgbouncer | BenchPooler::PgbouncerDirect => {
                let upstream = database_url.clone();
                Some(
                    tokio::task::spawn_blocking(move || TempPgBouncer::start(&upstream))
                        .await?
                        .map_err(anyhow::Error::msg)?,
                )
            }
        };
        let node_database_url = match &pgbouncer {
            Some(bouncer) => {
                let parsed = url::Url::parse(&database_url)?;
                bouncer.url(parsed.path().trim_start_matches('/'))
            }
            None => database_url.clone(),
        };
        let exe = match node_binary {
            Some(path) => path,
            None => std::env::current_exe().context("cannot find this binary")?,
        };
        let mut nodes = Vec::new();
        for name in ["bench-a", "bench-b"] {
            let port = free_port()?;
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let stomp_addr: Option<SocketAddr> = if stomp {
                Some(format!("127.0.0.1:{}", free_port()?).parse()?)
            } else {
                None
            };
            let mut command = Command::new(&exe);
            // What the benchmark says, not what its environment happens to.
            command.env_remove("PGRELAY_DATABASE_POOLER");
            if pooler == BenchPooler::PgbouncerDirect {
                command.env("PGRELAY_DIRECT_DATABASE_URL", &database_url);
            } else {
                command.env_remove("PGRELAY_DIRECT_DATABASE_URL");
            }
            let child = command
                .args([
                    "serve",
                    "--auth",
                    "none",
                    "--node-id",
                    name,
                    "--listen",
                    &addr.to_string(),
                ])
                .args(
                    stomp_addr
                        .map(|a| ["--stomp-listen".to_owned(), a.to_string()])
                        .into_iter()
                        .flatten(),
                )
                .args(node_args)
                .env("DATABASE_URL", &node_database_url)
                .env("RUST_LOG", "warn")
                .env_remove("PGRELAY_AUTH")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a node")?;
            nodes.push(NodeProc {
                name: name.to_owned(),
                addr,
                stomp_addr,
                child,
            });
        }
        let http = reqwest_free_ready_check();
        for node in &nodes {
            let started = Instant::now();
            while !http(node.addr).await {
                if started.elapsed() > Duration::from_secs(30) {
                    bail!("{} did not become ready", node.name);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Self {
            nodes,
            database_url,
            postgres_pid,
            _postgres: postgres,
            _pgbouncer: pgbouncer,
        })
    }

    /// Stops the nodes (SIGTERM, then wait).
    pub async fn stop(mut self) {
        for node in &mut self.nodes {
            if let Some(pid) = node.child.id() {
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let _ = tokio::time::timeout(Duration::from_secs(20), node.child.wait()).await;
        }
    }
}

/// A `GET /readyz` over a raw connection: true on 200.
fn reqwest_free_ready_check()
-> impl Fn(SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
    |addr| {
        Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                return false;
            };
            let request =
                format!("GET /readyz HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
            if stream.write_all(request.as_bytes()).await.is_err() {
                return false;
            }
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response).await;
            response.starts_with(b"HTTP/1.1 200")
        })
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn postmaster_pid(postgres: &TempPostgres) -> Option<i32> {
    // The postmaster is the process listening on the server's port; its pid
    // is the first line of postmaster.pid, found through /proc.
    let port = postgres.port().to_string();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid: i32 = entry.file_name().to_str()?.parse().ok().unwrap_or(0);
        if pid == 0 {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_postmaster = args.first().is_some_and(|a| a.ends_with(b"postgres"))
            && args
                .windows(2)
                .any(|w| w[0] == b"-p" && w[1] == port.as_bytes());
        if is_postmaster {
            return Some(pid);
        }
    }
    None
}

/// CPU time (user + system) of a process, in seconds.
pub fn cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command (which may contain spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// CPU time of a process and all of its children (PostgreSQL's backends).
pub fn cpu_seconds_with_children(pid: i32) -> f64 {
    let mut total = cpu_seconds(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if parent_of(child) == Some(pid) {
                total += cpu_seconds(child);
            }
        }
    }
    total
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: i32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU use of the cluster's processes over a measured interval.
pub struct CpuMeter {
    started: Instant,
    samples: Vec<(String, i32, bool, f64)>,
}

impl CpuMeter {
    pub fn start(cluster: &BenchCluster) -> Self {
        let mut samples: Vec<(String, i32, bool, f64)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.pid(), false, cpu_seconds(n.pid())))
            .collect();
        if let Some(pid) = cluster.postgres_pid {
            samples.push(("postgres".into(), pid, true, cpu_seconds_with_children(pid)));
        }
        let me = std::process::id() as i32;
        samples.push(("bench".into(), me, false, cpu_seconds(me)));
        Self {
            started: Instant::now(),
            samples,
        }
    }

    /// Cores used by each process since `start`.
    pub fn stop(&self) -> Vec<(String, f64)> {
        let elapsed = self.started.elapsed().as_secs_f64();
        self.samples
            .iter()
            .map(|(name, pid, children, before)| {
                let now = if *children {
                    cpu_seconds_with_children(*pid)
                } else {
                    cpu_seconds(*pid)
                };
                (name.clone(), (now - before) / elapsed)
            })
            .collect()
    }
}

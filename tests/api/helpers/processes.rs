//! Starts processes: the `pgrelay` binary as a node, npm, and Node.js scenarios.

use std::time::Duration;

use serde_json::Value;

use super::waiting::{eventually, within};

/// A `pgrelay serve` process.
/// Fast liveness for node processes: dead after 2 s, swept every 500 ms.
pub const FAST: [&str; 6] = [
    "--heartbeat-interval",
    "500ms",
    "--node-timeout",
    "2s",
    "--sweep-interval",
    "500ms",
];

pub struct NodeProcess {
    child: tokio::process::Child,
    pub node_id: String,
    pub addr: String,
    pub log: std::path::PathBuf,
}

impl NodeProcess {
    /// Starts `pgrelay serve` (auth none, JSON logs) on a free port and waits
    /// until it serves.
    pub async fn start(database_url: &str, node_id: &str, extra: &[&str]) -> Self {
        Self::start_on(database_url, node_id, "127.0.0.1:0", extra).await
    }

    /// [`NodeProcess::start`] on `listen` (to start a node again where its
    /// clients expect it).
    pub async fn start_on(database_url: &str, node_id: &str, listen: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join("pgrelay-test-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{node_id}-{:08x}.log", rand::random::<u32>()));
        let log_file = std::fs::File::create(&log).unwrap();
        let (database_url, direct_database_url) = super::database::node_urls(database_url);
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        match &direct_database_url {
            Some(url) => command.env("PGRELAY_DIRECT_DATABASE_URL", url),
            None => command.env_remove("PGRELAY_DIRECT_DATABASE_URL"),
        };
        command
            .args([
                "serve",
                "--auth",
                "none",
                "--node-id",
                node_id,
                "--listen",
                listen,
            ])
            .args(extra)
            .env("DATABASE_URL", &database_url)
            .env("PGRELAY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,pgrelay=debug")
            .env_remove("PGRELAY_AUTH")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn pgrelay");
        let addr = eventually(&format!("{node_id} to start"), || {
            let log = log.clone();
            let exited = child.try_wait().ok().flatten();
            async move {
                assert!(
                    exited.is_none(),
                    "{node_id} exited: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                let text = std::fs::read_to_string(&log).ok()?;
                text.lines()
                    .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                    .find(|line| line["message"] == "node started")
                    .and_then(|line| line["addr"].as_str().map(str::to_owned))
            }
        })
        .await;
        Self {
            child,
            node_id: node_id.to_owned(),
            addr,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Where it serves STOMP over TCP (started with `--stomp-listen`).
    pub async fn stomp_addr(&self) -> std::net::SocketAddr {
        eventually("the STOMP listener", || async {
            self.log_lines()
                .iter()
                .find(|line| line["message"] == "serving STOMP over TCP")
                .and_then(|line| line["addr"].as_str()?.parse().ok())
        })
        .await
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/ws?{query}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    /// The log lines, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// SIGKILL: a crash, nothing cleaned up.
    pub async fn kill(mut self) {
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        within(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap()
            .code()
    }
}

/// Installs the packages pinned in `dir`'s package-lock.json (`npm ci`),
/// once per test run, unless `marker` is already installed.
pub fn npm_installed(dir: &str, marker: &str) {
    static INSTALLED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed.iter().any(|d| d == dir) {
        return;
    }
    let dir_path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
    if !dir_path.join("node_modules").join(marker).exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir_path)
            .status()
            .expect("these tests need Node.js 20 and npm on the PATH");
        assert!(status.success(), "npm ci in {dir} failed");
    }
    installed.push(dir.to_owned());
}

/// Runs `node <script> <name> <config>` in `dir` (under the crate), with
/// `env`, and asserts that it succeeded and printed `ok <name>`.
pub async fn node_scenario(
    dir: &str,
    script: &str,
    name: &str,
    config: &Value,
    env: &[(&str, &str)],
    limit: Duration,
) {
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(name)
        .arg(config.to_string())
        .envs(env.iter().copied())
        .current_dir(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir))
        .kill_on_drop(true)
        .output();
    let output = within(limit, output).await.expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scenario {name} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(&format!("ok {name}")), "{stdout}");
}

/// [`node_scenario`] for a scenario that stops halfway: each time it prints
/// `ready <what>`, `act(what)` runs (a restart, say) and the scenario is told
/// to go on (a line on its stdin).
pub async fn node_scenario_acting<F, Fut>(
    dir: &str,
    script: &str,
    name: &str,
    config: &Value,
    limit: Duration,
    mut act: F,
) where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new("node")
        .arg(script)
        .arg(name)
        .arg(config.to_string())
        .current_dir(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut printed = String::new();
    within(limit, async {
        while let Some(line) = stdout.next_line().await.expect("read the scenario") {
            printed.push_str(&line);
            printed.push('\n');
            if let Some(what) = line.strip_prefix("ready ") {
                act(what.to_owned()).await;
                stdin.write_all(b"go\n").await.expect("tell the scenario");
            }
        }
    })
    .await;
    let output = within(limit, child.wait_with_output()).await.expect("node");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scenario {name} failed:\n{printed}\n{stderr}"
    );
    assert!(printed.contains(&format!("ok {name}")), "{printed}");
}

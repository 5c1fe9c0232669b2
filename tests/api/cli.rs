//! The `pgrelay` binary: configuration errors, and a clean stop on SIGTERM.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

fn pgrelay() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    for var in [
        "DATABASE_URL",
        "PGRELAY_AUTH",
        "PGRELAY_JWT_SECRET",
        "PGRELAY_JWT_PUBLIC_KEY",
        "PGRELAY_API_KEYS",
    ] {
        command.env_remove(var);
    }
    command.env("RUST_LOG", "off");
    command
}

/// Runs to completion and returns (exit code, stderr).
fn run(command: &mut Command) -> (i32, String) {
    let output = command.stdin(Stdio::null()).output().expect("run pgrelay");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_one_line_error(code: i32, stderr: &str, mentions: &str) {
    assert_ne!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].contains(mentions), "{stderr}");
}

#[test]
fn bad_configuration_ends_with_one_line_and_a_non_zero_exit() {
    let (code, stderr) = run(pgrelay().args(["serve"]));
    assert_one_line_error(code, &stderr, "DATABASE_URL");

    let (code, stderr) = run(pgrelay()
        .args(["serve"])
        .env("DATABASE_URL", "postgres://127.0.0.1:1/none"));
    assert_one_line_error(code, &stderr, "no authentication configured");

    let (code, stderr) = run(pgrelay()
        .args(["serve", "--auth", "none"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"));
    assert_one_line_error(code, &stderr, "cannot connect to the database");

    let (code, stderr) = run(pgrelay()
        .args(["serve", "--auth", "jwt"])
        .env("DATABASE_URL", "postgres://127.0.0.1:1/none"));
    assert_one_line_error(code, &stderr, "PGRELAY_JWT_SECRET");

    let (code, stderr) = run(pgrelay().args(["serve", "--auth", "none", "--node-id", "bad.id"]));
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid node id"), "{stderr}");
}

#[tokio::test]
async fn a_taken_port_is_a_one_line_error() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let url = db.url.clone();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        run(pgrelay()
            .args(["serve", "--auth", "none", "--listen", &addr])
            .env("DATABASE_URL", url))
    })
    .await
    .unwrap();
    assert_one_line_error(code, &stderr, "cannot listen on");
    db.drop_database().await;
}

#[tokio::test]
async fn sigterm_closes_sockets_deregisters_and_exits_zero() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::from(pgrelay())
        .args([
            "serve",
            "--auth",
            "none",
            "--node-id",
            "sigterm-node",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("DATABASE_URL", &db.url)
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/v1/ws?user=rita");
    let mut rita = eventually("the node to accept", || async {
        Client::connect(&url, &[]).await.ok()
    })
    .await;
    let registered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay.connections WHERE node_id = 'sigterm-node'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(registered, 1);

    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let close = rita.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    let status = within(Duration::from_secs(20), child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
    let (nodes, connections): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM relay.nodes), (SELECT count(*) FROM relay.connections)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((nodes, connections), (0, 0));
    db.drop_database().await;
}

#[tokio::test]
async fn migrate_applies_the_schema_and_nodes_starting_together_share_it() {
    let db = TestDb::empty().await;
    let url = db.url.clone();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        run(pgrelay().args(["migrate"]).env("DATABASE_URL", url))
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay._sqlx_migrations WHERE success")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(applied >= 1);
    db.drop_database().await;

    // Three nodes starting at once on an empty database: one migrates, all start.
    let db = TestDb::empty().await;
    let starts = (0..3).map(|i| pgrelay::node::start(settings(&db, AuthKind::None, i)));
    let nodes = futures_util::future::join_all(starts).await;
    for node in nodes {
        node.expect("node started").stop().await.unwrap();
    }
    db.drop_database().await;

    let (code, stderr) = run(pgrelay()
        .args(["migrate"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/x"));
    assert_one_line_error(code, &stderr, "cannot connect to the database");
}

#[tokio::test]
async fn keys_created_with_the_cli_work_at_once_and_revoked_ones_stop() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let url = cluster.db.url.clone();
    let keys = move |args: &'static [&'static str]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let output = pgrelay()
                .arg("keys")
                .args(args)
                .env("DATABASE_URL", url)
                .stdin(Stdio::null())
                .output()
                .expect("run pgrelay");
            (
                output.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        })
    };
    let (code, stdout, stderr) = keys(&["create", "ci"]).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    let key = stdout.trim().to_owned();
    assert!(key.starts_with("pgr_") && key.len() > 40, "{key}");
    let status = |key: String| {
        let request = cluster
            .http
            .post(cluster.url(0, "/v1/messages"))
            .bearer_auth(key)
            .json(&serde_json::json!({"to": {"user": "kai"}, "data": 1}));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    eventually("the new key to be accepted", || {
        let key = key.clone();
        async { (status(key).await == 202).then_some(()) }
    })
    .await;
    let (_, listed, _) = keys(&["list"]).await.unwrap();
    assert!(
        listed.starts_with("ci\tcreated") && listed.contains("live"),
        "{listed}"
    );
    assert!(!listed.contains(&key), "the key is never shown again");

    let (code, _, stderr) = keys(&["revoke", "ci"]).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    eventually("the revoked key to be refused", || {
        let key = key.clone();
        async { (status(key).await == 401).then_some(()) }
    })
    .await;
    let (code, _, stderr) = keys(&["revoke", "ci"]).await.unwrap();
    assert_one_line_error(code, &stderr, "no live key named");
    cluster.finish().await;
}

/// `pgrelay health` is what a container's health check runs: 0 and "ready"
/// for a ready node, 1 and one line for a node that cannot be reached.
#[tokio::test]
async fn health_says_whether_a_node_is_ready() {
    let db = TestDb::new().await;
    let node = NodeProcess::start(&db.url, "health-node", &[]).await;
    // Started is not ready yet (its LISTEN connection comes up after): not
    // ready, in one line, until it is.
    let url = node.url("");
    let output = eventually("the node to be ready", || {
        let output = pgrelay()
            .args(["health", "--url", &url])
            .output()
            .expect("run pgrelay");
        async move {
            if output.status.code() == Some(0) {
                return Some(output);
            }
            let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
            assert_one_line_error(
                output.status.code().unwrap_or(-1),
                &stderr,
                "not ready (503)",
            );
            None
        }
    })
    .await;
    assert_eq!(String::from_utf8_lossy(&output.stdout), "ready\n");
    // The default URL: this machine, at PGRELAY_LISTEN's port.
    let port = node.addr.rsplit(':').next().unwrap().to_owned();
    let output = pgrelay()
        .args(["health"])
        .env("PGRELAY_LISTEN", format!("0.0.0.0:{port}"))
        .output()
        .expect("run pgrelay");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    node.terminate().await;
    let (code, stderr) = run(pgrelay().args(["health", "--url", "http://127.0.0.1:1"]));
    assert_one_line_error(code, &stderr, "cannot reach");
    db.drop_database().await;
}

/// Boolean variables take what people write: 1/0, yes/no, on/off, true/false.
#[test]
fn boolean_variables_accept_the_usual_spellings() {
    for value in ["1", "0", "yes", "no", "on", "off", "true", "false"] {
        let (code, stderr) = run(pgrelay()
            .args(["serve", "--auth", "none"])
            .env("PGRELAY_DEMO", value)
            .env("PGRELAY_METRICS_PUBLIC", value)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"));
        // Past the flags: it fails at the database, not at the variable.
        assert_one_line_error(code, &stderr, "cannot connect to the database");
    }
    let (code, stderr) = run(pgrelay()
        .args(["serve", "--auth", "none"])
        .env("PGRELAY_DEMO", "maybe")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none"));
    assert_ne!(code, 0);
    assert!(stderr.contains("maybe"), "{stderr}");
}

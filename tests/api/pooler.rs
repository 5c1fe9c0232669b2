//! Behind a transaction-mode pooler (Debian's PgBouncer 1.18, started by the
//! tests in front of the test server): nodes start, migrate, deliver across
//! nodes under concurrent load and keep no session state there; without a
//! direct URL they say they poll, with one they LISTEN on it.
//!
//! The rest of the suite runs through the pooler too when
//! `PGRELAY_TEST_POOLER` is `pgbouncer` or `pgbouncer+direct` (CI runs the
//! core, guarantees and faults tests both ways).

use serde_json::{Value, json};

use crate::helpers::*;

async fn post(http: &reqwest::Client, node: &NodeProcess, user: &str, n: usize) -> i64 {
    let (status, body) = response(
        http.post(node.url("/v1/messages"))
            .json(&json!({"to": {"user": user}, "data": {"n": n}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

fn logged(node: &NodeProcess, message: &str) -> Option<Value> {
    node.log_lines()
        .into_iter()
        .find(|line| line["message"].as_str().unwrap_or("").starts_with(message))
}

/// The node's `pgrelay_poll_only` gauge, as exported.
async fn poll_only_gauge(node: &NodeProcess) -> String {
    let metrics = reqwest::get(node.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pgrelay_poll_only "))
        .unwrap_or_else(|| panic!("no pgrelay_poll_only in {metrics}"))
        .to_owned()
}

/// No line of the node's log names a prepared-statement or startup
/// parameter failure (what sqlx's defaults meet behind PgBouncer).
fn assert_no_pooler_errors(node: &NodeProcess) {
    let text = std::fs::read_to_string(&node.log).unwrap();
    for needle in [
        "prepared statement",
        "unsupported startup parameter",
        "42P05",
        // (SQLSTATE 26000 is said as "prepared statement … does not exist":
        // the number alone matches timestamps.)
        "NotificationResponse",
    ] {
        assert!(!text.contains(needle), "{}: {needle}\n{text}", node.node_id);
    }
}

/// Two nodes, users on each, 40 concurrent senders on both: every message
/// reaches its user once and in order.
async fn deliver_under_load(db: &TestDb, a: &NodeProcess, b: &NodeProcess) {
    let http = reqwest::Client::new();
    let users = ["pia", "quin", "rae", "sol"];
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let node = if i % 2 == 0 { a } else { b };
        clients.push(
            Client::connect(&node.ws_url(&format!("user={user}")), &[])
                .await
                .unwrap(),
        );
    }
    let mut sent: Vec<Vec<i64>> = vec![Vec::new(); users.len()];
    for round in 0..10 {
        let mut batch = Vec::new();
        for (i, user) in users.iter().enumerate() {
            // Sent from the node the user is not on: routed across.
            let node = if i % 2 == 0 { b } else { a };
            for k in 0..5 {
                batch.push((i, post(&http, node, user, round * 5 + k)));
            }
        }
        // Each user's five of a round go at once; rounds go in order, so each
        // stream's order is the order of the rounds.
        let ids = futures_util::future::join_all(
            batch.into_iter().map(|(i, f)| async move { (i, f.await) }),
        )
        .await;
        for (i, id) in ids {
            sent[i].push(id);
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let mut expected = sent[i].clone();
        expected.sort_unstable();
        let got = client.message_ids(expected.len()).await;
        let mut sorted = got.clone();
        sorted.sort_unstable();
        assert_eq!(got, sorted, "{}: in stream order", users[i]);
        assert_eq!(sorted, expected, "{}: each message once", users[i]);
    }
    eventually("every delivery recorded", || async {
        let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.deliveries")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (recorded == 200).then_some(())
    })
    .await;
}

/// [`deliver_under_load`], then no pooler error in either log, and a clean stop.
async fn deliver_under_load_and_stop(db: TestDb, a: NodeProcess, b: NodeProcess) {
    deliver_under_load(&db, &a, &b).await;
    for node in [&a, &b] {
        assert_no_pooler_errors(node);
    }
    assert_eq!(a.terminate().await, Some(0));
    assert_eq!(b.terminate().await, Some(0));
    db.drop_database().await;
}

#[tokio::test]
async fn through_pgbouncer_without_a_direct_url_nodes_poll_and_deliver_everything() {
    let db = TestDb::empty().await;
    let pooled = through_pgbouncer(&db.url);
    // Both migrate at once through the pooler (the lock is a transaction's).
    let (a, b) = tokio::join!(
        NodeProcess::start(&pooled, "pool-a", &[]),
        NodeProcess::start(&pooled, "pool-b", &[])
    );
    for node in [&a, &b] {
        let line = logged(node, "poll-only").expect("the node says it polls");
        assert_eq!(line["wakeups"], "poll", "{line}");
        assert_eq!(line["pooler"], "transaction", "{line}");
        let (status, body) = response(reqwest::get(node.url("/v1/status")).await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        let answered = &body["answered_by"];
        assert_eq!(answered["wakeups"], "poll", "{body}");
        assert_eq!(answered["database_pooler"], "transaction", "{body}");
        assert_eq!(answered["poll_interval_ms"], 250, "{body}");
        assert!(
            answered["poll_only_reason"]
                .as_str()
                .unwrap()
                .contains("pooler"),
            "{body}"
        );
        assert_eq!(poll_only_gauge(node).await, "1");
        let (status, _) = response(reqwest::get(node.url("/readyz")).await.unwrap()).await;
        assert_eq!(status, 200, "ready without a LISTEN connection");
    }
    // No node session reaches the server except through PgBouncer: no
    // LISTEN connection at all.
    let listeners: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE '%listener'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(listeners, 0);
    deliver_under_load_and_stop(db, a, b).await;
}

#[tokio::test]
async fn through_pgbouncer_with_a_direct_url_nodes_listen_on_it() {
    let db = TestDb::empty().await;
    let pooled = through_pgbouncer(&db.url);
    let direct = ["--direct-database-url", db.url.as_str()];
    let (a, b) = tokio::join!(
        NodeProcess::start(&pooled, "direct-a", &direct),
        NodeProcess::start(&pooled, "direct-b", &direct)
    );
    for node in [&a, &b] {
        let line =
            logged(node, "database reached").expect("the node says how it reached the database");
        assert_eq!(line["wakeups"], "notify", "{line}");
        assert_eq!(line["pooler"], "transaction", "{line}");
        let (_, body) = response(reqwest::get(node.url("/v1/status")).await.unwrap()).await;
        assert_eq!(body["answered_by"]["wakeups"], "notify", "{body}");
        assert_eq!(body["answered_by"]["poll_interval_ms"], 1000, "{body}");
        assert_eq!(poll_only_gauge(node).await, "0");
    }
    // The LISTEN connections are sessions of their own, whose last statement
    // is their LISTEN (a server connection of PgBouncer's would have run
    // other clients' statements since).
    eventually("both LISTEN connections", || async {
        let listeners: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                AND application_name LIKE 'pgrelay direct-_ listener' AND query LIKE 'LISTEN%'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (listeners == 2).then_some(())
    })
    .await;
    deliver_under_load_and_stop(db, a, b).await;
}

#[tokio::test]
async fn the_operator_commands_work_through_pgbouncer() {
    let db = TestDb::empty().await;
    let pooled = through_pgbouncer(&db.url);
    let pgrelay = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
            .args(args)
            .env("DATABASE_URL", &pooled)
            .env_remove("PGRELAY_DIRECT_DATABASE_URL")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pgrelay {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    assert!(pgrelay(&["migrate"]).contains("migrations applied"));
    let key = pgrelay(&["keys", "create", "through-the-pooler"]);
    assert!(key.starts_with("pgr_"), "{key}");
    assert!(pgrelay(&["keys", "list"]).contains("through-the-pooler"));
    let id = pgrelay(&["send", "--to", "user:nobody", "{\"n\":1}"]);
    assert!(id.trim().parse::<i64>().is_ok(), "{id}");
    assert!(pgrelay(&["status"]).contains("parked"));
    db.drop_database().await;
}

#[tokio::test]
async fn a_direct_url_to_another_database_is_refused_at_start() {
    let db = TestDb::new().await;
    let elsewhere = TestDb::empty().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--auth", "none", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", through_pgbouncer(&db.url))
        .env("PGRELAY_DIRECT_DATABASE_URL", &elsewhere.url)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("do both name the same database"),
        "{stderr}"
    );
    // A pooler declared direct is told apart too (its LISTEN went through
    // the pooler), not left to fail later.
    let forced = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"))
        .args(["serve", "--auth", "none", "--listen", "127.0.0.1:0"])
        .args(["--database-pooler", "direct"])
        .env("DATABASE_URL", through_pgbouncer(&db.url))
        .env_remove("PGRELAY_DIRECT_DATABASE_URL")
        .output()
        .await
        .unwrap();
    let forced_stderr = String::from_utf8_lossy(&forced.stderr);
    assert_eq!(forced.status.code(), Some(1), "{forced_stderr}");
    assert!(
        forced_stderr.contains("behaves like a transaction-mode pooler"),
        "{forced_stderr}"
    );
    // Nothing was migrated there.
    let schemas: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'relay'")
            .fetch_one(&elsewhere.pool)
            .await
            .unwrap();
    assert_eq!(schemas, 0);
    elsewhere.drop_database().await;
    db.drop_database().await;
}

/// With liveness on the direct URL, heartbeats alone would keep a node
/// whose pooler is gone alive forever, its work stuck. It stops
/// heartbeating after a node timeout without an answer from the pooler, is
/// reaped, and heals once the pooler answers again.
#[tokio::test]
async fn a_node_whose_pooler_stops_answering_is_reaped_and_heals_after() {
    use pgrelay::tools::pgbouncer::TempPgBouncer;
    let db = TestDb::new().await;
    let upstream = db.url.clone();
    let bouncer = tokio::task::spawn_blocking(move || TempPgBouncer::start(&upstream))
        .await
        .unwrap()
        .expect("a PgBouncer of this test's own");
    let mut args: Vec<&str> = FAST.to_vec();
    args.extend(["--direct-database-url", db.url.as_str()]);
    let cut = NodeProcess::start(&bouncer.url(&db.name), "cut-a", &args).await;
    let sweeper = NodeProcess::start(&db.url, "cut-b", &FAST).await;
    let registered = |node: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<uuid::Uuid>>(
                "SELECT incarnation FROM relay.nodes WHERE id = $1",
            )
            .bind(node)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .flatten()
        }
    };
    let before = registered("cut-a").await.expect("cut-a registered");
    let ready = |node: &NodeProcess| {
        let url = node.url("/readyz");
        async move {
            reqwest::get(url)
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    // Started is not yet ready (its LISTEN connection comes up after): wait
    // for ready before the cut.
    eventually("cut-a ready", || async {
        (ready(&cut).await == 200).then_some(())
    })
    .await;

    unsafe { libc::kill(bouncer.pid(), libc::SIGSTOP) };
    let paused = std::time::Instant::now();
    eventually("cut-a unready and reaped", || async {
        (ready(&cut).await == 503 && registered("cut-a").await.is_none()).then_some(())
    })
    .await;
    eprintln!("pooler paused → node reaped: {:?}", paused.elapsed());
    assert_eq!(ready(&sweeper).await, 200, "the other node is not affected");

    unsafe { libc::kill(bouncer.pid(), libc::SIGCONT) };
    let resumed = std::time::Instant::now();
    let after = eventually("cut-a registered again and ready", || async {
        let now = registered("cut-a").await?;
        (ready(&cut).await == 200).then_some(now)
    })
    .await;
    eprintln!("pooler resumed → node healed: {:?}", resumed.elapsed());
    assert_ne!(after, before, "a new incarnation");
    let log = std::fs::read_to_string(&cut.log).unwrap();
    assert!(log.contains("DATABASE_URL has not answered"), "{log}");
    assert_eq!(cut.terminate().await, Some(0));
    assert_eq!(sweeper.terminate().await, Some(0));
    drop(bouncer);
    db.drop_database().await;
}

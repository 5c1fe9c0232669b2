//! The official JavaScript client (clients/js, `@pgrelay/client`) under
//! Node.js against real nodes: in-process clusters, and `pgrelay serve`
//! processes for kills, rolling restarts and a PostgreSQL restart. The
//! scenarios are in tests/jsclient/scenarios.mjs (the `ws` library is
//! pinned in its package-lock.json and installed on first use). The same
//! client in a browser: the demo page's test (browser.rs).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use pgrelay::tools::pgtemp::{self, TempPostgres};
use serde_json::{Value, json};

use crate::helpers::*;

const DIR: &str = "tests/jsclient";
const LIMIT: Duration = Duration::from_secs(120);

fn cluster_config(cluster: &Cluster) -> Value {
    json!({
        "ws": [cluster.ws_url(0, "").trim_end_matches('?'), cluster.ws_url(1, "").trim_end_matches('?')],
        "http": [cluster.url(0, ""), cluster.url(1, "")],
    })
}

fn process_config(nodes: &[&NodeProcess]) -> Value {
    json!({
        "ws": nodes.iter().map(|n| n.ws_url("").trim_end_matches('?').to_owned()).collect::<Vec<_>>(),
        "http": nodes.iter().map(|n| n.url("")).collect::<Vec<_>>(),
        "pids": nodes.iter().map(|n| n.pid()).collect::<Vec<_>>(),
        "nodes": nodes.iter().map(|n| n.node_id.clone()).collect::<Vec<_>>(),
    })
}

async fn in_cluster(name: &str) {
    npm_installed(DIR, "ws");
    let cluster = Cluster::start(2).await;
    node_scenario(
        DIR,
        "scenarios.mjs",
        name,
        &cluster_config(&cluster),
        &[],
        LIMIT,
    )
    .await;
    cluster.finish().await;
}

/// The client's rules against a scripted server (a fake WebSocket in the
/// scenario): exact cursors, duplicates dropped, parked messages kept.
#[tokio::test]
async fn the_js_client_resumes_exactly_and_drops_only_copies() {
    npm_installed(DIR, "ws");
    let config = json!({});
    node_scenario(
        DIR,
        "scenarios.mjs",
        "scripted-resume-and-dedupe",
        &config,
        &[],
        LIMIT,
    )
    .await;
}

#[tokio::test]
async fn the_js_client_keeps_subscriptions_through_lost_answers_and_temporary_refusals() {
    npm_installed(DIR, "ws");
    let config = json!({});
    node_scenario(
        DIR,
        "scenarios.mjs",
        "scripted-subscriptions",
        &config,
        &[],
        LIMIT,
    )
    .await;
}

#[tokio::test]
async fn the_js_client_stops_on_final_closes_and_retries_the_others() {
    npm_installed(DIR, "ws");
    let config = json!({});
    node_scenario(DIR, "scenarios.mjs", "scripted-closes", &config, &[], LIMIT).await;
}

#[tokio::test]
async fn the_js_client_receives_across_nodes_publishes_subscribes_and_acks() {
    in_cluster("across-nodes").await;
}

#[tokio::test]
async fn the_js_client_resumes_a_topic_after_a_reconnect() {
    in_cluster("topic-resume").await;
}

#[tokio::test]
async fn the_js_client_sends_a_publish_made_while_reconnecting() {
    in_cluster("publish-during-reconnect").await;
}

#[tokio::test]
async fn the_js_client_uses_a_fresh_token_from_get_token_and_stops_on_a_bad_one() {
    npm_installed(DIR, "ws");
    let cluster = Cluster::start_with(2, AuthKind::Jwt, |_, _| {}).await;
    let mut config = cluster_config(&cluster);
    let past = chrono::Utc::now().timestamp() - 600;
    config["tokens"] = json!({
        "expired": token("tom", json!({"exp": past})),
        "fresh": token("tom", json!({})),
    });
    config["api_key"] = json!(API_KEY);
    node_scenario(DIR, "scenarios.mjs", "token-refresh", &config, &[], LIMIT).await;
    cluster.finish().await;
}

#[tokio::test]
async fn the_js_client_resumes_on_the_other_node_when_its_node_is_killed() {
    npm_installed(DIR, "ws");
    let db = TestDb::new().await;
    let a = NodeProcess::start(&db.url, "js-kill-a", &FAST).await;
    let b = NodeProcess::start(&db.url, "js-kill-b", &FAST).await;
    let config = process_config(&[&a, &b]);
    node_scenario(DIR, "scenarios.mjs", "node-killed", &config, &[], LIMIT).await;
    a.kill().await;
    b.terminate().await;
    db.drop_database().await;
}

#[tokio::test]
async fn the_js_client_loses_nothing_through_a_rolling_restart_of_both_nodes() {
    npm_installed(DIR, "ws");
    let db = TestDb::new().await;
    let a = NodeProcess::start(&db.url, "js-roll-a", &FAST).await;
    let b = NodeProcess::start(&db.url, "js-roll-b", &FAST).await;
    let config = process_config(&[&a, &b]);
    let nodes = Arc::new(Mutex::new(vec![a, b]));
    let url = db.url.clone();
    node_scenario_acting(
        DIR,
        "scenarios.mjs",
        "rolling-restart",
        &config,
        LIMIT,
        |_| {
            let (url, nodes) = (url.clone(), nodes.clone());
            async move {
                let mut nodes = nodes.lock().await;
                // One at a time: the other serves meanwhile.
                for _ in 0..nodes.len() {
                    let node = nodes.remove(0);
                    let (id, addr) = (node.node_id.clone(), node.addr.clone());
                    assert_eq!(node.terminate().await, Some(0), "{id} stops cleanly");
                    nodes.push(NodeProcess::start_on(&url, &id, &addr, &FAST).await);
                }
            }
        },
    )
    .await;
    for node in std::mem::take(&mut *nodes.lock().await) {
        node.terminate().await;
    }
    db.drop_database().await;
}

#[tokio::test]
async fn the_js_client_loses_nothing_through_a_postgres_restart() {
    npm_installed(DIR, "ws");
    let postgres =
        tokio::task::spawn_blocking(|| TempPostgres::start(pgtemp::Options::default()).unwrap())
            .await
            .unwrap();
    let url = postgres.url("postgres");
    let a = NodeProcess::start(&url, "js-pg-a", &[]).await;
    let b = NodeProcess::start(&url, "js-pg-b", &[]).await;
    let config = process_config(&[&a, &b]);
    let postgres = Arc::new(std::sync::Mutex::new(Some(postgres)));
    node_scenario_acting(
        DIR,
        "scenarios.mjs",
        "postgres-restart",
        &config,
        LIMIT,
        |_| {
            let postgres = postgres.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut postgres = postgres.lock().unwrap();
                    postgres.as_mut().expect("running").restart().unwrap();
                })
                .await
                .unwrap();
            }
        },
    )
    .await;
    a.terminate().await;
    b.terminate().await;
    drop(postgres);
}

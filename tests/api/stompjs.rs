//! Real STOMP clients: @stomp/stompjs under Node.js against two nodes. The
//! scenarios are in tests/stomp/scenarios.mjs; the packages are pinned in its
//! package-lock.json and installed (`npm ci`) on first use.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

async fn scenario(name: &str) {
    npm_installed("tests/stomp", "@stomp/stompjs");
    let cluster = Cluster::start_with(2, AuthKind::None, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let config = json!({
        "ws": [cluster.ws_url(0, "").trim_end_matches('?'), cluster.ws_url(1, "").trim_end_matches('?')],
        "http": [cluster.url(0, ""), cluster.url(1, "")],
    });
    node_scenario(
        "tests/stomp",
        "scenarios.mjs",
        name,
        &config,
        &[],
        Duration::from_secs(60),
    )
    .await;
    cluster.finish().await;
}

#[tokio::test]
async fn stompjs_user_queue_across_nodes() {
    scenario("user-queue").await;
}

#[tokio::test]
async fn stompjs_topic_across_nodes() {
    scenario("topic").await;
}

#[tokio::test]
async fn stompjs_receipts() {
    scenario("receipts").await;
}

#[tokio::test]
async fn stompjs_each_ack_mode() {
    scenario("ack-modes").await;
}

#[tokio::test]
async fn stompjs_heart_beats_keep_an_idle_session_alive() {
    scenario("heartbeats").await;
}

#[tokio::test]
async fn stompjs_a_silent_client_is_dropped() {
    scenario("silent-client").await;
}

#[tokio::test]
async fn stompjs_an_error_on_a_malformed_frame() {
    scenario("malformed").await;
}

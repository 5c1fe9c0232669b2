//! The demo page in a real browser: Debian's Chromium, headless, driven by
//! playwright-core (tests/browser/demo.mjs) against two real nodes.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// Where Chromium is: `CHROMIUM`, or Debian's package.
fn chromium() -> String {
    let path = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&path).exists(),
        "this test needs Chromium at {path} (Debian: apt-get install chromium; or set CHROMIUM)"
    );
    path
}

#[tokio::test]
async fn in_the_demo_page_a_message_typed_in_pane_a_is_delivered_in_pane_b_by_the_other_node() {
    let chromium = chromium();
    npm_installed("tests/browser", "playwright-core");
    let cluster = Cluster::start_with(2, AuthKind::None, |_, settings| {
        settings.exposure.demo = true;
    })
    .await;
    // The screenshot is kept as an artefact of the run.
    let artefacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let screenshot = artefacts.join("demo.png");
    let _ = std::fs::remove_file(&screenshot);
    let config = json!({
        "url": cluster.url(0, "/"),
        "nodes": [cluster.node_id(0), cluster.node_id(1)],
        "screenshot": screenshot,
    });
    node_scenario(
        "tests/browser",
        "demo.mjs",
        "demo",
        &config,
        &[("CHROMIUM", chromium.as_str())],
        Duration::from_secs(90),
    )
    .await;
    assert!(
        std::fs::metadata(&screenshot).unwrap().len() > 10_000,
        "a screenshot was saved"
    );

    // What the page showed is what the audit surface recorded: the message
    // typed in pane A was delivered to bob by node B.
    let delivered_by: String = sqlx::query_scalar(
        "SELECT d.node_id FROM relay.deliveries d JOIN relay.messages m ON m.id = d.message_id
          WHERE d.user_id = 'bob' AND m.data->>'text' LIKE 'hello from A%'",
    )
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(delivered_by, cluster.node_id(1));
    cluster.finish().await;
}

#[tokio::test]
async fn the_demo_page_is_off_unless_asked_for() {
    let cluster = Cluster::start(1).await;
    let response = cluster.http.get(cluster.url(0, "/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("demo page is off"), "{text}");
    cluster.finish().await;
}

//! What operators see: metrics, the OpenAPI document, logs, and the
//! operator commands (`pgrelay send`, `status`, `tail`).

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

/// The sum of the samples of `name` whose labels include `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

async fn scrape(cluster: &Cluster, node: usize) -> String {
    let response = cluster
        .http
        .get(cluster.url(node, "/metrics"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    response.text().await.unwrap()
}

#[tokio::test]
async fn metrics_need_the_api_key_and_count_what_happens() {
    let cluster = Cluster::start_with(2, AuthKind::Jwt, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(200);
        settings.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let refused = cluster
        .http
        .get(cluster.url(0, "/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );

    // The recorder is per process and tests run side by side: compare
    // before and after, never absolute values.
    let before = scrape(&cluster, 0).await;
    let count =
        |text: &str, name: &str, labels: &[(&str, &str)]| sample(text, name, labels).unwrap_or(0.0);

    let mut nina = Client::connect(
        &cluster.ws_url(1, &format!("token={}", token("nina", json!({})))),
        &[],
    )
    .await
    .unwrap();
    let id = cluster.send_to_user(0, "nina", json!({"n": 1})).await;
    assert_eq!(id_of(&nina.next_message().await), id);
    nina.send_json(json!({"op": "ack", "id": id.to_string()}))
        .await;
    // A client sending garbage is closed: a close by reason.
    let mut flooder = Client::connect(
        &cluster.ws_url(0, &format!("token={}", token("fred", json!({})))),
        &[],
    )
    .await
    .unwrap();
    for _ in 0..11 {
        if flooder
            .try_send(tokio_tungstenite::tungstenite::Message::text("garbage"))
            .await
            .is_err()
        {
            break;
        }
    }
    flooder.closed().await;

    let text = eventually("the counters to move", || async {
        let now = scrape(&cluster, 0).await;
        let moved = |name: &str, labels: &[(&str, &str)]| {
            count(&now, name, labels) > count(&before, name, labels)
        };
        let all = [
            moved("pgrelay_messages_accepted_total", &[("source", "http")]),
            moved(
                "pgrelay_messages_delivered_total",
                &[("protocol", "pgrelay.v1")],
            ),
            moved("pgrelay_messages_acked_total", &[]),
            moved(
                "pgrelay_connections_opened_total",
                &[("protocol", "pgrelay.v1")],
            ),
            moved("pgrelay_connections_closed_total", &[("reason", "policy")]),
            moved("pgrelay_outbox_wakeups_total", &[("source", "notify")]),
            moved("pgrelay_claim_batch_size_count", &[]),
            moved("pgrelay_stage_seconds_count", &[("stage", "commit")]),
            moved("pgrelay_stage_seconds_count", &[("stage", "claim")]),
            moved("pgrelay_stage_seconds_count", &[("stage", "write")]),
            moved("pgrelay_stage_seconds_count", &[("stage", "mailbox")]),
            moved("pgrelay_delivery_latency_seconds_count", &[]),
            moved("pgrelay_submit_duration_seconds_count", &[]),
            moved("pgrelay_sweeper_runs_total", &[]),
        ];
        all.iter().all(|m| *m).then_some(now)
    })
    .await;
    // Gauges of this cluster's nodes.
    assert!(count(&text, "pgrelay_connections", &[("protocol", "pgrelay.v1")]) >= 1.0);
    for node in ["node-a", "node-b"] {
        assert!(
            sample(&text, "pgrelay_outbox_backlog", &[("node", node)]).is_some(),
            "{node}"
        );
    }
    assert!(
        sample(
            &text,
            "pgrelay_db_pool_connections",
            &[("node", "node-a"), ("pool", "main")]
        )
        .is_some()
    );
    assert!(
        text.contains("# HELP pgrelay_delivery_latency_seconds"),
        "metrics are described"
    );
    assert!(text.contains("# TYPE pgrelay_messages_delivered_total counter"));
    nina.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn metrics_and_the_document_can_be_opened_by_configuration() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, settings| {
        settings.exposure.metrics_public = true;
        settings.exposure.openapi_public = true;
    })
    .await;
    for path in ["/metrics", "/v1/openapi.json"] {
        let response = cluster.http.get(cluster.url(0, path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    // Everything else still wants the key.
    let response = cluster
        .http
        .get(cluster.url(0, "/v1/nodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    cluster.finish().await;
}

/// Resolves `{"$ref": "#/components/schemas/X"}`.
fn resolve<'a>(document: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.rsplit('/').next().unwrap();
            &document["components"]["schemas"][name]
        }
        None => schema,
    }
}

#[tokio::test]
async fn the_openapi_document_describes_the_real_routes_and_every_error_is_problem_json() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let refused = cluster
        .http
        .get(cluster.url(0, "/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let (status, document) = cluster.get(0, "/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        document["openapi"]
    );
    let message_id = cluster
        .send_to_user(0, "olga", json!({"hello": "world"}))
        .await;

    let paths = document["paths"].as_object().unwrap();
    let mut operations = 0;
    for (template, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            operations += 1;
            let documented = operation["responses"].as_object().unwrap();
            assert!(
                operation["summary"].is_string(),
                "{method} {template} has a summary"
            );
            // Every documented error is problem+json.
            for (code, response) in documented {
                if code.starts_with('4') || code.starts_with('5') {
                    assert!(
                        response["content"]["application/problem+json"].is_object(),
                        "{method} {template} {code} is problem+json"
                    );
                }
            }
            // The route exists and answers with one of the documented statuses.
            let path = template
                .replace("{id}", &message_id.to_string())
                .replace("{user}", "olga");
            let path = if method == "delete" {
                template.replace("{id}", "00000000-0000-0000-0000-000000000000")
            } else {
                path
            };
            let url = cluster.url(0, &path);
            let request = match method.as_str() {
                "get" => cluster.http.get(&url),
                "delete" => cluster.http.delete(&url),
                "post" if path.ends_with("/batch") => cluster
                    .http
                    .post(&url)
                    .json(&json!([{"to": {"user": "olga"}, "data": 1}])),
                "post" => cluster
                    .http
                    .post(&url)
                    .json(&json!({"to": {"user": "olga"}, "data": 1})),
                other => panic!("undocumented method {other}"),
            };
            let response = request.bearer_auth(API_KEY).send().await.unwrap();
            let code = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            assert!(
                documented.contains_key(&code.to_string()),
                "{method} {path} answered {code}, which is not documented"
            );
            let body = response.text().await.unwrap();
            if code >= 400 {
                assert_eq!(content_type, "application/problem+json", "{method} {path}");
                let problem: Value = serde_json::from_str(&body).unwrap();
                for field in ["type", "title", "status", "detail"] {
                    assert!(
                        !problem[field].is_null(),
                        "{method} {path}: {field} in {problem}"
                    );
                }
            } else if content_type == "application/json" {
                // What the handler returned has what its schema requires.
                let schema =
                    &documented[&code.to_string()]["content"]["application/json"]["schema"];
                let schema = resolve(&document, schema);
                let answer: Value = serde_json::from_str(&body).unwrap();
                for required in schema["required"].as_array().into_iter().flatten() {
                    let field = required.as_str().unwrap();
                    assert!(
                        answer.get(field).is_some(),
                        "{method} {path}: `{field}` missing from {answer}"
                    );
                }
            }
        }
    }
    assert!(operations >= 14, "{operations} operations documented");

    // And what is not documented is not routed.
    for (method, path) in [
        ("get", "/v1/nope"),
        ("get", "/v1/messages/1/extra"),
        ("post", "/v1/nodes"),
    ] {
        let url = cluster.url(0, path);
        let request = if method == "get" {
            cluster.http.get(&url)
        } else {
            cluster.http.post(&url)
        };
        let response = request.bearer_auth(API_KEY).send().await.unwrap();
        assert!(
            matches!(response.status().as_u16(), 404 | 405),
            "{method} {path}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(
        serde_json::to_value(pgrelay::http::openapi_document()).unwrap()["paths"],
        document["paths"],
        "the document is the same as the library builds"
    );
    cluster.finish().await;
}

#[tokio::test]
async fn logs_carry_the_ids_an_operator_greps_for() {
    let db = TestDb::new().await;
    let node = NodeProcess::start(&db.url, "log-node", &[]).await;
    let mut client = Client::connect(&node.ws_url("user=lena"), &[])
        .await
        .unwrap();
    // Each id the logs must carry comes from somewhere other than the logs:
    // the connection's from the welcome frame, confirmed by the registry; the
    // node's from the command line, confirmed by the welcome; the user's from
    // the query; the message's from the HTTP answer and the delivery.
    let connection_id = client.connection_id.clone();
    assert_eq!(client.node_id, node.node_id, "the welcome names the node");
    let http = reqwest::Client::new();
    let (status, registry) = response(
        http.get(node.url("/v1/users/lena/connections"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{registry}");
    let listed = registry["connections"].as_array().expect("a list");
    assert_eq!(listed.len(), 1, "{registry}");
    assert_eq!(listed[0]["id"], connection_id.as_str(), "{registry}");
    assert_eq!(listed[0]["node_id"], node.node_id.as_str(), "{registry}");
    assert_eq!(listed[0]["user_id"], "lena", "{registry}");
    let answer: Value = http
        .post(node.url("/v1/messages"))
        .json(&json!({"to": {"user": "lena"}, "data": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let message_id: i64 = answer["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id_of(&client.next_message().await), message_id);
    client.close().await;

    // Fields of the line and of every span it is in.
    let fields = |line: &Value| -> Value {
        let mut all = serde_json::Map::new();
        for span in line["spans"]
            .as_array()
            .into_iter()
            .flatten()
            .chain([&line["span"]])
        {
            if let Some(span) = span.as_object() {
                all.extend(span.clone());
            }
        }
        if let Some(own) = line.as_object() {
            all.extend(own.clone());
        }
        Value::Object(all)
    };
    eventually("the connection and the message in the logs", || async {
        let lines: Vec<Value> = node.log_lines().iter().map(fields).collect();
        let connected = lines.iter().any(|l| {
            l["message"] == "connected"
                && l["user_id"] == "lena"
                && l["node_id"] == node.node_id.as_str()
                && l["connection_id"] == connection_id.as_str()
        });
        let stored = lines.iter().any(|l| {
            l["message"] == "stored"
                && l["node_id"] == node.node_id.as_str()
                && l["message_id"] == message_id
        });
        (connected && stored).then_some(())
    })
    .await;
    node.terminate().await;
    db.drop_database().await;
}

fn pgrelay(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
    command
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("PGRELAY_URL")
        .env_remove("PGRELAY_API_KEY")
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run(command: &mut tokio::process::Command) -> String {
    let output = within(Duration::from_secs(30), command.output())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn operators_send_see_the_status_and_tail_deliveries_from_the_command_line() {
    let cluster = Cluster::start_with(2, AuthKind::Jwt, |_, _| {}).await;
    let url = cluster.db.url.clone();
    let mut pia = Client::connect(
        &cluster.ws_url(1, &format!("token={}", token("pia", json!({})))),
        &[],
    )
    .await
    .unwrap();

    // tail, started first, prints the deliveries that follow (looking back a
    // minute: its own start races the first send's delivery).
    let mut tail = pgrelay(&["tail", "--user", "pia", "--count", "2", "--since", "1m"])
        .env("DATABASE_URL", &url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut tail_lines = BufReader::new(tail.stdout.take().unwrap()).lines();

    // send, through the database and through a node's API.
    let first =
        run(pgrelay(&["send", "--to", "user:pia", r#"{"via":"sql"}"#]).env("DATABASE_URL", &url))
            .await;
    let first: i64 = first.trim().parse().expect("an id");
    assert_eq!(id_of(&pia.next_message().await), first);
    let second = run(&mut pgrelay(&[
        "send",
        "--to",
        "user:pia",
        "--url",
        &cluster.url(0, ""),
        "--api-key",
        API_KEY,
        r#"{"via":"http"}"#,
    ]))
    .await;
    let second: i64 = second.trim().parse().expect("an id");
    assert_eq!(id_of(&pia.next_message().await), second);
    for expected in [first, second] {
        let line = within(WAIT, tail_lines.next_line())
            .await
            .unwrap()
            .expect("a line");
        assert!(
            line.contains(&format!("message {expected} → pia on node-b")),
            "{line}"
        );
    }
    assert_eq!(within(WAIT, tail.wait()).await.unwrap().code(), Some(0));

    // A bad recipient is one line on stderr.
    let output = pgrelay(&["send", "--to", "alice", "{}"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected user:NAME"));

    // A node that died with work waiting: status says what is stuck, where.
    sqlx::query(
        "INSERT INTO relay.nodes (id, incarnation, version, last_seen_at)
         VALUES ('node-z', gen_random_uuid(), 'x', now() - interval '1 hour')",
    )
    .execute(&cluster.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO relay.outbox (node_id, message_id, user_id, created_at)
         VALUES ('node-z', $1, 'pia', now() - interval '50 minutes')",
    )
    .bind(first)
    .execute(&cluster.db.pool)
    .await
    .unwrap();
    let table = run(pgrelay(&["status"]).env("DATABASE_URL", &url)).await;
    let stuck = table
        .lines()
        .find(|l| l.starts_with("node-z"))
        .expect("node-z listed");
    assert!(
        stuck.contains("silent") && stuck.split_whitespace().any(|w| w == "1"),
        "{stuck}"
    );
    assert!(
        table.contains(&format!("oldest pending  message {first} for node node-z")),
        "{table}"
    );
    let live = table.lines().find(|l| l.starts_with("node-b")).unwrap();
    assert!(live.contains("live"), "{live}");
    // The same through a node's API, as JSON.
    let json_status = run(&mut pgrelay(&[
        "status",
        "--json",
        "--url",
        &cluster.url(0, ""),
        "--api-key",
        API_KEY,
    ]))
    .await;
    let status: Value = serde_json::from_str(&json_status).unwrap();
    assert_eq!(status["oldest_pending"]["node_id"], "node-z");
    assert_eq!(status["connections"], 1);
    pia.close().await;
    cluster.finish().await;
}

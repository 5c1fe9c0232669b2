//! The delivery guarantees (G1–G4, G7): each race made deterministic by
//! holding a transaction or a lock open, rather than hoped for.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::helpers::*;

type Time = chrono::DateTime<chrono::Utc>;

/// Waits until `n` sessions of the nodes are blocked on a lock.
async fn lock_waiters(cluster: &Cluster, n: i64) {
    node_sessions_waiting_on_locks(&cluster.db.pool, n).await;
}

async fn connection(cluster: &Cluster) -> PgConnection {
    PgConnection::connect(&cluster.db.url).await.unwrap()
}

async fn send_in_sql(conn: &mut PgConnection, user: &str, data: Value) -> i64 {
    sqlx::query_scalar("SELECT relay.send_to_user($1, $2)")
        .bind(user)
        .bind(data)
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn five_hundred_messages_from_concurrent_submitters_on_two_nodes_arrive_complete_and_in_order()
 {
    let cluster = Cluster::start(2).await;
    let mut client = cluster.connect(1, "ursula").await;
    let mut submitters = Vec::new();
    for submitter in 0..10 {
        let http = cluster.http.clone();
        let url = cluster.url(submitter % 2, "/v1/messages");
        submitters.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..50 {
                let body =
                    json!({"to": {"user": "ursula"}, "data": {"submitter": submitter, "n": n}});
                let (status, body) =
                    response(http.post(&url).json(&body).send().await.unwrap()).await;
                assert_eq!(status, 202, "{body}");
                ids.push(body["id"].as_str().unwrap().parse::<i64>().unwrap());
            }
            ids
        }));
    }
    let mut sent = Vec::new();
    for submitter in submitters {
        sent.extend(submitter.await.unwrap());
    }
    sent.sort_unstable();

    let received = client.message_ids(500).await;
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "out of order: {received:?}"
    );
    assert_eq!(received, sent, "complete, and nothing else");
    client.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_client_that_resumes_with_since_gets_exactly_what_it_missed() {
    let cluster = Cluster::start(2).await;
    let mut client = cluster.connect(0, "victor").await;
    let first: Vec<i64> = {
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(cluster.send_to_user(1, "victor", json!(n)).await);
        }
        ids
    };
    assert_eq!(client.message_ids(5).await, first);
    client.close().await;

    let mut missed = Vec::new();
    for n in 5..12 {
        missed.push(cluster.send_to_user(n % 2, "victor", json!(n)).await);
    }
    let last_seen = first[4];
    let mut resumed = cluster
        .connect_query(1, "victor", &format!("since={last_seen}"))
        .await;
    assert_eq!(resumed.message_ids(7).await, missed);
    let live = cluster.send_to_user(0, "victor", json!("live")).await;
    assert_eq!(
        id_of(&resumed.next_message().await),
        live,
        "no duplicate, no gap before live"
    );
    resumed.close().await;

    // `since` is the client's cursor: an earlier one replays what was delivered.
    let mut replay = cluster
        .connect_query(0, "victor", &format!("since={}", first[1]))
        .await;
    let mut expected: Vec<i64> = first[2..].to_vec();
    expected.extend(&missed);
    expected.push(live);
    assert_eq!(replay.message_ids(expected.len()).await, expected);
    replay.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn messages_that_commit_out_of_id_order_still_arrive_in_id_order() {
    let cluster = Cluster::start(2).await;
    let mut wendy = cluster.connect(1, "wendy").await;
    let mut xavier = cluster.connect(1, "xavier").await;

    // An application transaction draws an id for Wendy and stays open.
    let mut app = connection(&cluster).await;
    sqlx::query("BEGIN").execute(&mut app).await.unwrap();
    let held = send_in_sql(&mut app, "wendy", json!("held")).await;

    // A later message to Wendy waits for it: it cannot overtake it.
    let http = cluster.http.clone();
    let url = cluster.url(0, "/v1/messages");
    let later = tokio::spawn(async move {
        let body = json!({"to": {"user": "wendy"}, "data": "later"});
        let (status, body) = response(http.post(&url).json(&body).send().await.unwrap()).await;
        assert_eq!(status, 202);
        body["id"].as_str().unwrap().parse::<i64>().unwrap()
    });
    lock_waiters(&cluster, 1).await;

    // Another stream is not held up: Xavier's message commits with a larger id
    // before Wendy's first, and arrives at once.
    let other = cluster.send_to_user(0, "xavier", json!("meanwhile")).await;
    assert!(other > held);
    assert_eq!(id_of(&xavier.next_message().await), other);

    sqlx::query("COMMIT").execute(&mut app).await.unwrap();
    let later = later.await.unwrap();
    assert!(later > held);
    assert_eq!(wendy.message_ids(2).await, vec![held, later]);

    // And a resume from before both finds them, in order, with no gap.
    let mut again = cluster.connect_query(0, "wendy", "since=0").await;
    assert_eq!(again.message_ids(2).await, vec![held, later]);
    for client in [wendy, xavier, again] {
        client.close().await;
    }
    cluster.finish().await;
}

#[tokio::test]
async fn a_connect_racing_a_send_never_loses_the_message() {
    let cluster = Cluster::start(2).await;

    // Send first: the sender holds the stream; the connect waits for it and
    // then finds the message in its backfill.
    let mut app = connection(&cluster).await;
    sqlx::query("BEGIN").execute(&mut app).await.unwrap();
    let sent = send_in_sql(&mut app, "yara", json!("racing")).await;
    let url = cluster.ws_url(1, "user=yara");
    let connecting = tokio::spawn(async move { Client::connect(&url, &[]).await.unwrap() });
    lock_waiters(&cluster, 1).await;
    sqlx::query("COMMIT").execute(&mut app).await.unwrap();
    let mut yara = connecting.await.unwrap();
    assert_eq!(id_of(&yara.next_message().await), sent);
    yara.close().await;

    // Connect first: with the stream held, a connect and then a send queue up
    // behind it; the connect registers first, and the send routes to it.
    sqlx::query("INSERT INTO relay.streams (stream) VALUES ('user:zoe') ON CONFLICT DO NOTHING")
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    let mut holder = connection(&cluster).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.streams WHERE stream = 'user:zoe' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let url = cluster.ws_url(1, "user=zoe");
    let connecting = tokio::spawn(async move { Client::connect(&url, &[]).await.unwrap() });
    lock_waiters(&cluster, 1).await;
    let http = cluster.http.clone();
    let submit = cluster.url(0, "/v1/messages");
    let sending = tokio::spawn(async move {
        let body = json!({"to": {"user": "zoe"}, "data": "racing"});
        let (_, body) = response(http.post(&submit).json(&body).send().await.unwrap()).await;
        body["id"].as_str().unwrap().parse::<i64>().unwrap()
    });
    lock_waiters(&cluster, 2).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let mut zoe = connecting.await.unwrap();
    let sent = sending.await.unwrap();
    assert_eq!(id_of(&zoe.next_message().await), sent);
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay.outbox WHERE node_id IS NULL AND user_id = 'zoe'",
    )
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(parked, 0, "it was routed to the new connection, not parked");
    zoe.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn messages_sent_while_a_client_moves_between_nodes_reach_it_on_the_other_node() {
    let cluster = Cluster::start(3).await;
    let mut on_a = cluster.connect(0, "abe").await;
    let first = cluster.send_to_user(2, "abe", json!(1)).await;
    assert_eq!(id_of(&on_a.next_message().await), first);
    on_a.close().await;
    let between = [
        cluster.send_to_user(0, "abe", json!(2)).await,
        cluster.send_to_user(2, "abe", json!(3)).await,
    ];
    // With its cursor on another node...
    let mut on_b = cluster
        .connect_query(1, "abe", &format!("since={first}"))
        .await;
    assert_eq!(on_b.message_ids(2).await, between);
    on_b.close().await;
    // ...and without one, on a third: what was never delivered is still waiting.
    let unseen = cluster.send_to_user(0, "abe", json!(4)).await;
    let mut on_c = cluster.connect(2, "abe").await;
    assert_eq!(id_of(&on_c.next_message().await), unseen);
    on_c.close().await;
    cluster.finish().await;
}

/// Routes an existing message to a connection without a NOTIFY: what a lost
/// wake-up leaves behind.
async fn route_silently(cluster: &Cluster, node: usize, client: &Client, user: &str) -> i64 {
    // A message to a user with no connection is parked, and parking wakes no one.
    let id = cluster
        .send_to_user(0, "nobody-home", json!("silent"))
        .await;
    sqlx::query(
        "UPDATE relay.outbox SET node_id = $1, user_id = $2, connection_ids = ARRAY[$3::uuid]
          WHERE message_id = $4",
    )
    .bind(cluster.node_id(node))
    .bind(user)
    .bind(&client.connection_id)
    .bind(id)
    .execute(&cluster.db.pool)
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn a_lost_wake_up_is_covered_by_the_poll() {
    let cluster = Cluster::start_with(2, AuthKind::None, |index, settings| {
        if index == 1 {
            settings.poll_interval = Duration::from_millis(200);
        }
    })
    .await;
    let mut client = cluster.connect(1, "bea").await;
    let id = route_silently(&cluster, 1, &client, "bea").await;
    assert_eq!(id_of(&client.next_message().await), id);
    client.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_listener_that_reconnects_rescans_the_outbox() {
    // No useful poll: only the rescan after the reconnect can deliver.
    let cluster = Cluster::start_with(2, AuthKind::None, |_, settings| {
        settings.poll_interval = Duration::from_secs(3600);
    })
    .await;
    let mut client = cluster.connect(1, "cal").await;
    let id = route_silently(&cluster, 1, &client, "cal").await;
    if node_route() == NodeRoute::Pooler {
        // Through a pooler without a direct URL there is no LISTEN to lose:
        // the node polls (PGRELAY_POLL_ONLY_INTERVAL), whatever
        // PGRELAY_POLL_INTERVAL says.
        assert!(cluster.node(1).state.lifecycle.plan.wakeups.is_poll_only());
        assert_eq!(id_of(&client.next_message().await), id);
        client.close().await;
        cluster.finish().await;
        return;
    }
    // Kill node b's LISTEN connection: it reconnects and rescans.
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = $1",
    )
    .bind(format!("pgrelay {} listener", cluster.node_id(1)))
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    assert_eq!(id_of(&client.next_message().await), id);
    // And wake-ups work again on the new connection.
    let next = cluster.send_to_user(0, "cal", json!("after")).await;
    assert_eq!(id_of(&client.next_message().await), next);
    client.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn send_to_user_commits_and_rolls_back_with_the_callers_transaction() {
    let cluster = Cluster::start(2).await;
    let mut dan = cluster.connect(1, "dan").await;
    let mut app = connection(&cluster).await;

    let mut tx = app.begin().await.unwrap();
    let rolled_back = send_in_sql(&mut tx, "dan", json!("never")).await;
    tx.rollback().await.unwrap();

    let mut tx = app.begin().await.unwrap();
    let committed: i64 = sqlx::query_scalar(
        "SELECT relay.send_to_user('dan', '{\"n\":1}', '/queue/orders', '1 hour')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let frame = dan.next_message().await;
    assert_eq!(
        id_of(&frame),
        committed,
        "the rolled-back message never existed"
    );
    assert_eq!(frame["destination"], "/queue/orders");
    assert_eq!(frame["data"], json!({"n": 1}));
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM relay.messages WHERE id = $1)")
            .bind(rolled_back)
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    assert!(!exists);

    // Failures raise, so the caller's transaction cannot commit without the message.
    for bad in [
        "SELECT relay.send_to_user('dan', NULL)",
        "SELECT relay.send_to_user('', '1')",
        "SELECT relay.send_to_user('dan', '1', NULL, '-1 hour')",
        "SELECT relay.send_to_user('dan', to_jsonb(repeat('x', 70000)))",
        "SELECT relay.publish('a..b', '1')",
        "SELECT relay.publish('chat', NULL)",
    ] {
        let mut tx = app.begin().await.unwrap();
        let result = sqlx::query(bad).execute(&mut *tx).await;
        assert!(result.is_err(), "{bad} should raise");
        tx.rollback().await.unwrap();
    }
    dan.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn an_idempotency_key_sends_once_and_refuses_a_different_body() {
    let cluster = Cluster::start_with(2, AuthKind::Jwt, |_, _| {}).await;
    let mut eve = cluster.connect(1, "eve").await;
    let post = |node: usize, key: &str, body: Value| {
        cluster
            .http
            .post(cluster.url(node, "/v1/messages"))
            .bearer_auth(API_KEY)
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let body = json!({"to": {"user": "eve"}, "data": {"a": 1, "b": 2}});
    let (status, first) = response(post(0, "order-7", body.clone()).await.unwrap()).await;
    assert_eq!(status, 202);
    // The same request again, on another node, keys in another order: the same answer.
    let reordered = json!({"data": {"b": 2, "a": 1}, "to": {"user": "eve"}});
    let (status, again) = response(post(1, "order-7", reordered).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(again, first);
    // The same key for something else is a conflict.
    let (status, problem) = response(
        post(0, "order-7", json!({"to": {"user": "eve"}, "data": 3}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        problem["type"],
        "urn:pgrelay:problem:idempotency_key_reused"
    );

    let sentinel = cluster.send_to_user(0, "eve", json!("sentinel")).await;
    let id: i64 = first["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        eve.message_ids(2).await,
        vec![id, sentinel],
        "sent exactly once"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 2);
    eve.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn concurrent_requests_with_one_idempotency_key_store_one_message() {
    let cluster = Cluster::start(2).await;
    let mut requests = Vec::new();
    for n in 0..8 {
        let request = cluster
            .http
            .post(cluster.url(n % 2, "/v1/messages"))
            .header("idempotency-key", "same")
            .json(&json!({"to": {"user": "fay"}, "data": "once"}))
            .send();
        requests.push(request);
    }
    let answers = futures_util::future::join_all(requests).await;
    let mut ids = Vec::new();
    for answer in answers {
        let (status, body) = response(answer.unwrap()).await;
        assert!(status == 202 || status == 200, "{status} {body}");
        ids.push(body["id"].clone());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    cluster.finish().await;
}

#[tokio::test]
async fn a_batch_is_stored_in_one_transaction_all_or_nothing() {
    let cluster = Cluster::start(2).await;
    let mut gus = cluster.connect(1, "gus").await;
    let (status, body) = cluster
        .post(
            0,
            "/v1/messages/batch",
            &json!([
                {"to": {"user": "gus"}, "data": 1},
                {"to": {"users": ["gus", "hal"]}, "data": 2},
                {"to": {"user": "gus"}, "data": 3, "destination": "/queue/x"}
            ]),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let ids: Vec<i64> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(gus.message_ids(3).await, ids);

    // One bad message: nothing is stored, and the problem says which.
    let (status, problem) = cluster
        .post(
            0,
            "/v1/messages/batch",
            &json!([{"to": {"user": "gus"}, "data": 4}, {"to": {"user": ""}, "data": 5}]),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]"),
        "{problem}"
    );
    // One unknown connection: the database refuses it, and the batch rolls back.
    let (status, _) = cluster
        .post(
            0,
            "/v1/messages/batch",
            &json!([{"to": {"user": "gus"}, "data": 6},
                    {"to": {"connection": uuid::Uuid::now_v7().to_string()}, "data": 7}]),
        )
        .await;
    assert_eq!(status, 404);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 3);
    for empty in [json!([]), json!({"to": {"user": "gus"}, "data": 1})] {
        let (status, _) = cluster.post(0, "/v1/messages/batch", &empty).await;
        assert_eq!(status, 400);
    }
    gus.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn an_expired_message_is_never_delivered_and_shows_as_expired() {
    let cluster = Cluster::start(1).await;
    let (status, body) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "ida"}, "data": "old", "ttl_s": 60}),
        )
        .await;
    assert_eq!(status, 202);
    let expired: i64 = body["id"].as_str().unwrap().parse().unwrap();
    let kept = cluster.send_to_user(0, "ida", json!("new")).await;
    // Let the first message's minute pass.
    sqlx::query("UPDATE relay.messages SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(expired)
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE relay.outbox SET expires_at = now() - interval '1 second' WHERE message_id = $1",
    )
    .bind(expired)
    .execute(&cluster.db.pool)
    .await
    .unwrap();

    let mut ida = cluster.connect(0, "ida").await;
    assert_eq!(id_of(&ida.next_message().await), kept);
    let (_, body) = cluster.get(0, &format!("/v1/messages/{expired}")).await;
    assert_eq!(body["state"], "expired");
    assert_eq!(body["deliveries"], json!([]));
    // The sweeper drops its parked work (this sweep, or the node's own first
    // one if that came after the minute was made to pass).
    let report = sweep_now(&cluster).await;
    let parked: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.outbox WHERE message_id = $1")
        .bind(expired)
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
    assert_eq!(parked, 0, "{report:?}");
    assert!(report.parked_expired <= 1, "{report:?}");
    // Not delivered by resuming either.
    let mut resumed = cluster.connect_query(0, "ida", "since=0").await;
    assert_eq!(id_of(&resumed.next_message().await), kept);
    // Its delivery row is written by the delivery log, after the write.
    let body = eventually("the delivery row", || async {
        let (_, body) = cluster.get(0, &format!("/v1/messages/{kept}")).await;
        (body["state"] != "pending").then_some(body)
    })
    .await;
    assert_eq!(body["state"], "delivered");
    ida.close().await;
    resumed.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn ttl_is_bounded_by_the_retention() {
    let cluster = Cluster::start(1).await;
    let (status, problem) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "jo"}, "data": 1, "ttl_s": 73 * 3600}),
        )
        .await;
    assert_eq!(status, 400, "{problem}");
    let (status, _) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "jo"}, "data": 1, "ttl_s": 72 * 3600}),
        )
        .await;
    assert_eq!(status, 202);
    let expires_in: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM expires_at - created_at)::float8 FROM relay.messages",
    )
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(expires_in, (72 * 3600) as f64);
    cluster.finish().await;
}

#[tokio::test]
async fn retention_removes_old_messages_and_their_deliveries_in_bounded_batches() {
    let cluster = Cluster::start(1).await;
    let mut kay = cluster.connect(0, "kay").await;
    // More than one batch of old messages, delivered, and a recent one.
    let (status, _) = cluster
        .post(
            0,
            "/v1/messages/batch",
            &json!(
                (0..1000)
                    .map(|n| json!({"to": {"user": "kay"}, "data": n}))
                    .collect::<Vec<_>>()
            ),
        )
        .await;
    assert_eq!(status, 202);
    kay.message_ids(1000).await;
    eventually("1000 delivery rows", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.deliveries")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
        (n == 1000).then_some(())
    })
    .await;
    sqlx::query("UPDATE relay.messages SET created_at = now() - interval '4 days'")
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    let recent = cluster.send_to_user(0, "kay", json!("recent")).await;
    assert_eq!(id_of(&kay.next_message().await), recent);

    let report = sweep_now(&cluster).await;
    assert_eq!(report.messages_removed, 1000);
    assert_eq!(report.deliveries_removed, 1000);
    let (messages, deliveries): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM relay.messages), (SELECT count(*) FROM relay.deliveries WHERE message_id <> $1)",
    )
    .bind(recent)
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!((messages, deliveries), (1, 0));
    let (status, _) = cluster.get(0, &format!("/v1/messages/{recent}")).await;
    assert_eq!(status, 200);
    kay.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_client_that_falls_behind_catches_up_from_its_stream_in_order() {
    // A one-message queue: a burst overflows it at once.
    let cluster =
        Cluster::start_with(2, AuthKind::None, |_, settings| settings.send_queue = 1).await;
    let mut lou = cluster.connect(1, "lou").await;
    let burst: Vec<Value> = (0..300)
        .map(|n| json!({"to": {"user": "lou"}, "data": n}))
        .collect();
    let (status, body) = cluster.post(0, "/v1/messages/batch", &json!(burst)).await;
    assert_eq!(status, 202);
    let ids: Vec<i64> = body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(lou.message_ids(300).await, ids);
    let after = cluster.send_to_user(0, "lou", json!("after")).await;
    assert_eq!(id_of(&lou.next_message().await), after);
    lou.close().await;
    cluster.finish().await;
}

/// The SQL blocks of the README's audit section, run exactly as written
/// (with the example's id and user replaced by this test's).
#[tokio::test]
async fn the_readme_audit_queries_answer_their_questions() {
    let readme = include_str!("../../README.md");
    let block = |marker: &str| -> String {
        let start = readme
            .find(marker)
            .unwrap_or_else(|| panic!("README has {marker}"));
        let sql_start = readme[start..].find("```sql").unwrap() + start + "```sql".len();
        let sql_end = readme[sql_start..].find("```").unwrap() + sql_start;
        readme[sql_start..sql_end]
            .trim()
            .trim_end_matches(';')
            .to_owned()
    };
    let delivered_query = block("Was message 42 delivered to alice");
    let pending_query = block("Which messages for alice are still pending");

    let cluster = Cluster::start(2).await;
    let mut alice = cluster.connect(1, "alice").await;
    let delivered = cluster.send_to_user(0, "alice", json!("seen")).await;
    assert_eq!(id_of(&alice.next_message().await), delivered);
    alice
        .send_json(json!({"op": "ack", "id": delivered.to_string()}))
        .await;
    alice.close().await;
    let pending = cluster.send_to_user(0, "alice", json!("waiting")).await;
    eventually("the ack", || async {
        let acked: bool = sqlx::query_scalar(
            "SELECT acked_at IS NOT NULL FROM relay.deliveries WHERE message_id = $1",
        )
        .bind(delivered)
        .fetch_optional(&cluster.db.pool)
        .await
        .unwrap()
        .unwrap_or(false);
        acked.then_some(())
    })
    .await;

    type Delivery = (uuid::Uuid, String, Time, Option<Time>);
    let rows: Vec<Delivery> = sqlx::query_as(sqlx::AssertSqlSafe(
        delivered_query.replace("42", &delivered.to_string()),
    ))
    .fetch_all(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, cluster.node_id(1));
    assert!(rows[0].3.is_some(), "acked");

    let rows: Vec<(
        i64,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(sqlx::AssertSqlSafe(pending_query))
        .fetch_all(&cluster.db.pool)
        .await
        .unwrap();
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(ids, vec![pending]);
    cluster.finish().await;
}

#[tokio::test]
async fn the_sweeper_vacuums_an_outbox_left_full_of_dead_rows() {
    use pgrelay::sweeper::vacuum_outbox_once;
    let cluster = Cluster::start(1).await;
    // The node's own pool: what its sweeper vacuums with.
    let pool = &cluster.node(0).state.db.pool;
    // Parked for an offline user, then taken by their connect: every outbox
    // row written is dead afterwards.
    let batch: Vec<Value> = (0..300)
        .map(|i| json!({"to": {"user": "vic"}, "data": i}))
        .collect();
    let (status, body) = cluster.post(0, "/v1/messages/batch", &json!(batch)).await;
    assert_eq!(status, 202, "{body}");
    let mut vic = cluster.connect(0, "vic").await;
    assert_eq!(vic.message_ids(300).await.len(), 300);

    let stats = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables
              WHERE relid = 'relay.outbox'::regclass",
        )
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap()
    };
    // PostgreSQL publishes a session's row counts within about a second.
    eventually("the dead outbox rows counted", || async {
        (stats().await.0 >= 300).then_some(())
    })
    .await;
    assert!(
        !vacuum_outbox_once(pool, 1_000).await.unwrap(),
        "below the threshold"
    );
    assert_eq!(stats().await.1, 0);
    assert!(vacuum_outbox_once(pool, 300).await.unwrap());
    // Before PostgreSQL 15 the statistics reach the view through the
    // collector, a moment later.
    let (dead, vacuums) = eventually("the vacuum counted", || async {
        let (dead, vacuums) = stats().await;
        (vacuums == 1).then_some((dead, vacuums))
    })
    .await;
    assert_eq!(vacuums, 1);
    assert!(dead < 300, "{dead} dead rows left");
    assert!(
        !vacuum_outbox_once(pool, 300).await.unwrap(),
        "nothing left to vacuum"
    );
    vic.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn pipelined_sends_to_a_held_stream_keep_their_order() {
    let cluster = Cluster::start(1).await;
    let mut receiver = StompClient::subscribed(&cluster.ws_url(0, "user=ola"), "/topic/held").await;
    // An application transaction holds the topic's stream.
    let mut holder = connection(&cluster).await;
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.streams WHERE stream = 'topic:held' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let (mut producer, _) = StompClient::connect(&cluster.ws_url(0, "user=pia"), &[]).await;
    let sends = |from: usize| {
        let mut frames = Vec::new();
        for n in from..from + 3 {
            frames.extend_from_slice(
                format!("SEND\ndestination:/topic/held\nreceipt:r{n}\n\n{n}\0").as_bytes(),
            );
        }
        frames
    };
    // Three SENDs wait for the stream; three more come while they wait.
    producer.send_raw(&sends(0)).await;
    lock_waiters(&cluster, 1).await;
    producer.send_raw(&sends(3)).await;
    // Nothing outside the node shows when it has read those (they queue
    // behind the waiting ones, not on a lock): a moment for them to arrive
    // makes the interleaving likely; the order must hold either way.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    for n in 0..6 {
        let receipt = producer.next().await;
        assert_eq!(receipt.header("receipt-id"), Some(format!("r{n}").as_str()));
    }
    for n in 0..6 {
        let message = receiver.next().await;
        assert_eq!(
            message.body,
            n.to_string().as_bytes(),
            "stored in the order sent"
        );
    }
    cluster.finish().await;
}

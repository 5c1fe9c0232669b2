//! Topics and broadcast over the JSON protocol (G5), across nodes.

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::helpers::*;

async fn subscribe(client: &mut Client, topic: &str, since: Option<i64>) {
    let mut frame = json!({"op": "subscribe", "topic": topic});
    if let Some(since) = since {
        frame["since"] = json!(since.to_string());
    }
    client.send_json(frame).await;
    let answer = client.next_frame().await;
    assert_eq!(answer["op"], "subscribed", "{answer}");
    assert_eq!(answer["topic"], topic, "{answer}");
    // The topic's head: the cursor a client resubscribes with.
    let head = answer["head"].as_str().expect("a head");
    assert!(head.parse::<i64>().is_ok(), "{answer}");
}

async fn publish(cluster: &Cluster, node: usize, topic: &str, data: Value) -> i64 {
    let (status, body) = cluster
        .post(
            node,
            "/v1/messages",
            &json!({"to": {"topic": topic}, "data": data}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_topic_message_reaches_every_subscriber_on_every_node() {
    let cluster = Cluster::start(2).await;
    let mut on_a = cluster.connect(0, "ann").await;
    let mut on_b = cluster.connect(1, "ben").await;
    let mut also_b = cluster.connect(1, "cid").await;
    let mut not_subscribed = cluster.connect(1, "dee").await;
    for client in [&mut on_a, &mut on_b, &mut also_b] {
        subscribe(client, "chat.room1", None).await;
    }
    let id = publish(&cluster, 0, "chat.room1", json!({"text": "hello room"})).await;
    for client in [&mut on_a, &mut on_b, &mut also_b] {
        let frame = client.next_message().await;
        assert_eq!(id_of(&frame), id);
        assert_eq!(frame["to"], json!({"topic": "chat.room1"}));
        assert_eq!(frame["data"], json!({"text": "hello room"}));
    }
    // Dee's next message is her own: she never got the topic's.
    let mine = cluster.send_to_user(0, "dee", json!("yours")).await;
    assert_eq!(id_of(&not_subscribed.next_message().await), mine);

    // Every subscriber's delivery is a row: "did connection C get message M?"
    let rows: i64 = eventually("three delivery rows", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.deliveries WHERE message_id = $1")
                .bind(id)
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (n == 3).then_some(n)
    })
    .await;
    assert_eq!(rows, 3);
    let got: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM relay.deliveries WHERE message_id = $1 AND connection_id = $2::uuid)",
    )
    .bind(id)
    .bind(&also_b.connection_id)
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert!(got);
    for client in [on_a, on_b, also_b, not_subscribed] {
        client.close().await;
    }
    cluster.finish().await;
}

#[tokio::test]
async fn a_topic_message_is_one_unit_of_work_per_node_not_per_subscriber() {
    let cluster = Cluster::start(2).await;
    let mut clients = Vec::new();
    for n in 0..5 {
        let mut client = cluster.connect(1, &format!("fan{n}")).await;
        subscribe(&mut client, "news", None).await;
        clients.push(client);
    }
    let mut on_a = cluster.connect(0, "fan-a").await;
    subscribe(&mut on_a, "news", None).await;
    // Count the outbox rows before the transaction commits (and is claimed).
    let mut app = PgConnection::connect(&cluster.db.url).await.unwrap();
    let mut tx = app.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT relay.publish('news', '\"extra\"')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    let per_node: Vec<(String, i64)> = sqlx::query_as(
        "SELECT node_id, count(*) FROM relay.outbox WHERE message_id = $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        per_node,
        vec![(cluster.node_id(0), 1), (cluster.node_id(1), 1)]
    );
    tx.commit().await.unwrap();
    for client in clients.iter_mut().chain([&mut on_a]) {
        assert_eq!(id_of(&client.next_message().await), id);
    }
    cluster.finish().await;
}

#[tokio::test]
async fn topics_resume_with_since_in_order() {
    let cluster = Cluster::start(2).await;
    let mut first = cluster.connect(0, "eli").await;
    subscribe(&mut first, "ticker", None).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(publish(&cluster, n % 2, "ticker", json!(n)).await);
    }
    assert_eq!(first.message_ids(2).await, ids[..2]);
    first.close().await;
    // Resubscribe elsewhere from the last one seen: the rest, in order, once.
    let mut again = cluster.connect(1, "eli").await;
    subscribe(&mut again, "ticker", Some(ids[1])).await;
    assert_eq!(again.message_ids(4).await, ids[2..]);
    let live = publish(&cluster, 0, "ticker", json!("live")).await;
    assert_eq!(id_of(&again.next_message().await), live);
    again.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_subscribe_racing_a_publish_never_loses_a_message_committed_after_it() {
    let cluster = Cluster::start(2).await;
    sqlx::query("INSERT INTO relay.streams (stream) VALUES ('topic:race') ON CONFLICT DO NOTHING")
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    let mut client = cluster.connect(1, "fin").await;
    // Hold the topic; subscribe, then publish, queue up behind it in that order.
    let mut holder = PgConnection::connect(&cluster.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.streams WHERE stream = 'topic:race' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    client
        .send_json(json!({"op": "subscribe", "topic": "race"}))
        .await;
    let waiting = |n: i64| node_sessions_waiting_on_locks(&cluster.db.pool, n);
    waiting(1).await;
    let http = cluster.http.clone();
    let url = cluster.url(0, "/v1/messages");
    let publishing = tokio::spawn(async move {
        let body = json!({"to": {"topic": "race"}, "data": "racing"});
        let (_, body) = response(http.post(&url).json(&body).send().await.unwrap()).await;
        body["id"].as_str().unwrap().parse::<i64>().unwrap()
    });
    waiting(2).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert_eq!(client.next_frame().await["op"], "subscribed");
    let id = publishing.await.unwrap();
    assert_eq!(id_of(&client.next_message().await), id);
    client.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn unsubscribing_stops_delivery_and_the_registry_follows() {
    let cluster = Cluster::start(2).await;
    let mut gil = cluster.connect(1, "gil").await;
    subscribe(&mut gil, "alerts", None).await;
    let rows = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM relay.subscriptions WHERE topic = 'alerts'",
        )
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap()
    };
    assert_eq!(rows().await, 1);
    gil.send_json(json!({"op": "unsubscribe", "topic": "alerts"}))
        .await;
    assert_eq!(
        gil.next_frame().await,
        json!({"op": "unsubscribed", "topic": "alerts"})
    );
    assert_eq!(rows().await, 0);
    publish(&cluster, 0, "alerts", json!("missed")).await;
    let mine = cluster.send_to_user(0, "gil", json!("direct")).await;
    assert_eq!(id_of(&gil.next_message().await), mine);
    // A closed connection's subscriptions go with it.
    subscribe(&mut gil, "alerts", None).await;
    assert_eq!(rows().await, 1);
    assert!(gil.close().await);
    assert_eq!(rows().await, 0);
    cluster.finish().await;
}

#[tokio::test]
async fn subscribing_and_publishing_follow_the_tokens_claims() {
    let cluster = Cluster::start_with(2, AuthKind::Jwt, |_, _| {}).await;
    let claims = json!({"topics": ["chat.*", "news.>"], "publish": ["chat.*"]});
    let url = cluster.ws_url(1, &format!("token={}", token("hal", claims)));
    let mut hal = Client::connect(&url, &[]).await.unwrap();
    subscribe(&mut hal, "chat.lobby", None).await;
    subscribe(&mut hal, "news.eu.fr", None).await;
    hal.send_json(json!({"op": "subscribe", "topic": "admin.secrets"}))
        .await;
    let refused = hal.next_frame().await;
    assert_eq!(refused["op"], "error");
    assert_eq!(refused["code"], "forbidden");
    hal.send_json(json!({"op": "subscribe", "topic": "chat"}))
        .await;
    assert_eq!(
        hal.next_frame().await["code"],
        "forbidden",
        "chat.* needs a second segment"
    );

    // Publishing from the socket, where `publish` allows.
    hal.send_json(json!({"op": "publish", "topic": "chat.lobby", "data": {"from": "hal"}}))
        .await;
    // The answer and the delivery to this same socket race: either first.
    let (mut published, mut frame) = (hal.next_frame().await, hal.next_frame().await);
    if published["op"] == "message" {
        std::mem::swap(&mut published, &mut frame);
    }
    assert_eq!(published["op"], "published", "{published}");
    let id: i64 = published["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(frame["op"], "message", "{frame}");
    assert_eq!(id_of(&frame), id);
    assert_eq!(frame["data"], json!({"from": "hal"}));
    hal.send_json(json!({"op": "publish", "topic": "news.eu.fr", "data": 1}))
        .await;
    assert_eq!(hal.next_frame().await["code"], "forbidden");

    // A user with no `topics` claim may subscribe to nothing.
    let url = cluster.ws_url(0, &format!("token={}", token("ida", json!({}))));
    let mut ida = Client::connect(&url, &[]).await.unwrap();
    ida.send_json(json!({"op": "subscribe", "topic": "chat.lobby"}))
        .await;
    assert_eq!(ida.next_frame().await["code"], "forbidden");
    ida.send_json(json!({"op": "subscribe", "topic": "bad..name"}))
        .await;
    assert_eq!(ida.next_frame().await["code"], "bad_frame");
    hal.close().await;
    ida.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_broadcast_reaches_every_connection_connected_when_it_commits() {
    let cluster = Cluster::start(2).await;
    let mut on_a = cluster.connect(0, "jan").await;
    let mut on_b = cluster.connect(1, "kai").await;
    let (status, body) = cluster
        .post(
            1,
            "/v1/messages",
            &json!({"to": {"broadcast": true}, "data": "everyone"}),
        )
        .await;
    assert_eq!(status, 202);
    let id: i64 = body["id"].as_str().unwrap().parse().unwrap();
    for client in [&mut on_a, &mut on_b] {
        let frame = client.next_message().await;
        assert_eq!(id_of(&frame), id);
        assert_eq!(frame["to"], json!({"broadcast": true}));
    }
    // A later connection does not get an earlier broadcast.
    let mut later = cluster.connect(0, "lee").await;
    let mine = cluster.send_to_user(1, "lee", json!("direct")).await;
    assert_eq!(id_of(&later.next_message().await), mine);
    for client in [on_a, on_b, later] {
        client.close().await;
    }
    cluster.finish().await;
}

#[tokio::test]
async fn publish_in_sql_commits_and_rolls_back_with_the_caller() {
    let cluster = Cluster::start(2).await;
    let mut max = cluster.connect(1, "max").await;
    subscribe(&mut max, "orders", None).await;
    let mut app = PgConnection::connect(&cluster.db.url).await.unwrap();
    let mut tx = app.begin().await.unwrap();
    sqlx::query("SELECT relay.publish('orders', '\"rolled back\"')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = app.begin().await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT relay.publish('orders', '{\"order\": 7}', '1 hour')")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let frame = max.next_message().await;
    assert_eq!(id_of(&frame), id);
    assert_eq!(frame["data"], json!({"order": 7}));
    max.close().await;
    cluster.finish().await;
}

/// `subscribed` names the topic's head, and `welcome` the user's: the
/// cursors a client resumes from, exact even before its first message.
#[tokio::test]
async fn subscribed_and_welcome_name_the_heads_to_resume_from() {
    let cluster = Cluster::start(2).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(publish(&cluster, n % 2, "heads", json!(n)).await);
    }
    let mut client = cluster.connect(0, "hal").await;
    client
        .send_json(json!({"op": "subscribe", "topic": "heads"}))
        .await;
    let subscribed = client.next_frame().await;
    assert_eq!(subscribed["head"], ids[2].to_string(), "{subscribed}");
    let next = publish(&cluster, 1, "heads", json!(3)).await;
    assert_eq!(client.message_ids(1).await, [next]);
    client.close().await;

    let sent = cluster.send_to_user(1, "hal", json!("before")).await;
    let (mut raw, _) = tokio_tungstenite::connect_async(cluster.ws_url(0, "user=hal"))
        .await
        .unwrap();
    use futures_util::StreamExt;
    let welcome = loop {
        if let Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text))) = raw.next().await {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
    };
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    assert_eq!(welcome["user_head"], sent.to_string(), "{welcome}");
    drop(raw);
    cluster.finish().await;
}

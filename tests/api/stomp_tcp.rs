//! STOMP over plain TCP (PGRELAY_STOMP_LISTEN): identities, queues with
//! competing consumers, acks and redelivery, headers that travel, and
//! heart-beats, against real nodes.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

async fn queue_entries(cluster: &Cluster) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM relay.queue_entries")
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_api_key_names_a_backend_and_a_jwt_a_user_and_anything_else_is_an_error() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, _| {}).await;
    let addr = cluster.stomp_addr(0);

    // Spring's system session: login and passcode, heart-beats, no host.
    let (_spring, connected) = TcpStomp::connect(
        addr,
        &[
            ("login", "spring-a"),
            ("passcode", API_KEY),
            ("heart-beat", "10000,10000"),
        ],
    )
    .await;
    assert_eq!(connected.command, "CONNECTED", "{connected:?}");
    assert_eq!(connected.header("version"), Some("1.2"));
    assert_eq!(connected.header("user-name"), Some("spring-a"));
    // Spring reads it with Long.parseLong on each side of the comma.
    let beat = connected.header("heart-beat").unwrap();
    let (sx, sy) = beat.split_once(',').unwrap();
    assert!(sx.parse::<u64>().unwrap() >= 10_000 && sy.parse::<u64>().unwrap() >= 10_000);

    // An end user with a JWT: their own messages, no queues.
    let jwt = token("alice", json!({}));
    let (mut alice, connected) =
        TcpStomp::connect(addr, &[("passcode", &jwt), ("host", "example")]).await;
    assert_eq!(connected.header("user-name"), Some("alice"));
    alice
        .send(
            "SUBSCRIBE",
            &[("id", "q"), ("destination", "/queue/jobs")],
            b"",
        )
        .await;
    let refused = alice.until_closed().await;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].command, "ERROR");
    assert!(
        refused[0].header("message").unwrap().contains("backend"),
        "{refused:?}"
    );

    // Wrong credentials: an ERROR, then the connection ends.
    for passcode in ["not-a-key-and-not-a-jwt", "test-api-key-0123456780"] {
        let (mut stranger, reply) = TcpStomp::connect(addr, &[("passcode", passcode)]).await;
        assert_eq!(reply.command, "ERROR", "{reply:?}");
        assert!(stranger.until_closed().await.is_empty());
    }
    let (mut nobody, reply) = TcpStomp::connect(addr, &[]).await;
    assert_eq!(reply.command, "ERROR");
    assert!(nobody.until_closed().await.is_empty());

    let sessions: Vec<(String, String)> =
        sqlx::query_as("SELECT user_id, protocol FROM relay.connections ORDER BY user_id")
            .fetch_all(&cluster.db.pool)
            .await
            .unwrap();
    assert_eq!(sessions, vec![("spring-a".into(), "stomp".into())]);
    cluster.finish().await;
}

#[tokio::test]
async fn a_queue_gives_each_message_to_one_consumer_in_order() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let mut consumers = Vec::new();
    for (index, node) in [0, 1, 1].into_iter().enumerate() {
        let mut consumer = TcpStomp::backend(cluster.stomp_addr(node), "worker").await;
        let prefetch = "5".to_string();
        consumer
            .subscribe(
                &format!("w{index}"),
                "/queue/jobs",
                &[("ack", "client-individual"), ("prefetch-count", &prefetch)],
            )
            .await;
        consumers.push(consumer);
    }
    let mut producer = TcpStomp::backend(cluster.stomp_addr(0), "producer").await;
    const N: usize = 150;
    for n in 0..N {
        producer
            .send(
                "SEND",
                &[("destination", "/queue/jobs"), ("n", &n.to_string())],
                format!("job {n}").as_bytes(),
            )
            .await;
    }
    producer
        .send(
            "SEND",
            &[("destination", "/queue/other"), ("receipt", "all")],
            b"x",
        )
        .await;
    assert_eq!(producer.next().await.header("receipt-id"), Some("all"));

    // Every consumer acks what it gets; together they get each job once.
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_consumer: Vec<Vec<i64>> = vec![Vec::new(); consumers.len()];
    while seen.len() < N {
        let mut progressed = false;
        for (index, consumer) in consumers.iter_mut().enumerate() {
            while let Some(message) = consumer.next_within(Duration::from_millis(50)).await {
                assert_eq!(message.command, "MESSAGE");
                assert_eq!(message.header("destination"), Some("/queue/jobs"));
                let n = message.header("n").unwrap().to_owned();
                assert_eq!(message.body, format!("job {n}").into_bytes());
                *seen.entry(n).or_default() += 1;
                per_consumer[index].push(message.header("message-id").unwrap().parse().unwrap());
                let ack = message.header("ack").unwrap().to_owned();
                consumer.send("ACK", &[("id", &ack)], b"").await;
                progressed = true;
            }
        }
        if !progressed {
            let waiting = queue_entries(&cluster).await;
            assert!(
                waiting > 0 || seen.len() == N,
                "stuck: {} of {N}",
                seen.len()
            );
        }
    }
    assert!(seen.values().all(|count| *count == 1), "{seen:?}");
    for ids in &per_consumer {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    }
    assert!(
        per_consumer.iter().filter(|ids| !ids.is_empty()).count() >= 2,
        "the consumers compete: {:?}",
        per_consumer.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // Every delivery is a row, acked; the queue is empty.
    eventually("the acks recorded", || async {
        let acked: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM relay.deliveries d JOIN relay.messages m ON m.id = d.message_id
              WHERE m.stream = 'queue:jobs' AND d.acked_at IS NOT NULL",
        )
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.queue_entries WHERE queue = 'jobs'")
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (acked == N as i64 && left == 0).then_some(())
    })
    .await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_queue_message_waits_for_a_consumer_and_an_abandoned_empty_queue_goes() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let mut producer = TcpStomp::backend(cluster.stomp_addr(0), "producer").await;
    producer
        .send_stored("/queue/x-user1a2b", &[], b"while nobody listens")
        .await;
    let waiting: (String, i64, i64) =
        sqlx::query_as("SELECT queue, waiting, consumers FROM relay.queues")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    assert_eq!(waiting, ("x-user1a2b".into(), 1, 0));

    let mut consumer = TcpStomp::backend(cluster.stomp_addr(1), "worker").await;
    consumer.subscribe("s", "/queue/x-user1a2b", &[]).await;
    let message = consumer.next().await;
    assert_eq!(message.body, b"while nobody listens");
    assert_eq!(message.header("subscription"), Some("s"));

    // Written with ack auto: done. Its only consumer leaves: the queue is gone.
    consumer
        .send("UNSUBSCRIBE", &[("id", "s"), ("receipt", "u")], b"")
        .await;
    assert_eq!(consumer.next().await.header("receipt-id"), Some("u"));
    eventually("the queue gone", || async {
        let queues: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.queues")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
        (queues == 0).then_some(())
    })
    .await;
    let delivered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay.deliveries WHERE user_id = 'worker'")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    assert_eq!(delivered, 1);
    cluster.finish().await;
}

#[tokio::test]
async fn a_nacked_message_goes_to_another_consumer_marked_redelivered() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let mut picky = TcpStomp::backend(cluster.stomp_addr(0), "picky").await;
    picky
        .subscribe(
            "p",
            "/queue/work",
            &[("ack", "client"), ("prefetch-count", "1")],
        )
        .await;
    let mut producer = TcpStomp::backend(cluster.stomp_addr(0), "producer").await;
    producer.send_stored("/queue/work", &[], b"one").await;
    let first = picky.next().await;
    assert_eq!(first.body, b"one");
    assert_eq!(first.header("redelivered"), None);

    let mut other = TcpStomp::backend(cluster.stomp_addr(1), "other").await;
    other
        .subscribe("o", "/queue/work", &[("ack", "client-individual")])
        .await;
    let ack = first.header("ack").unwrap().to_owned();
    picky
        .send("NACK", &[("id", &ack), ("receipt", "n")], b"")
        .await;
    assert_eq!(picky.next().await.header("receipt-id"), Some("n"));
    let again = other.next().await;
    assert_eq!(again.body, b"one");
    assert_eq!(again.header("message-id"), first.header("message-id"));
    assert_eq!(again.header("redelivered"), Some("true"));
    assert!(
        picky
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    cluster.finish().await;
}

#[tokio::test]
async fn what_a_consumer_held_unacked_goes_to_another_when_it_disconnects() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let mut holder = TcpStomp::backend(cluster.stomp_addr(0), "holder").await;
    holder
        .subscribe("h", "/queue/orders", &[("ack", "client")])
        .await;
    let mut producer = TcpStomp::backend(cluster.stomp_addr(1), "producer").await;
    for n in 0..5 {
        producer
            .send_stored("/queue/orders", &[], format!("order {n}").as_bytes())
            .await;
    }
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(holder.next().await.body);
    }
    // It acks none of them, and its socket dies.
    drop(holder);
    let mut heir = TcpStomp::backend(cluster.stomp_addr(1), "heir").await;
    heir.subscribe("x", "/queue/orders", &[]).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let message = heir.next().await;
        assert_eq!(message.header("redelivered"), Some("true"));
        got.push(message.body);
    }
    assert_eq!(got, held, "the same messages, in order");
    cluster.finish().await;
}

#[tokio::test]
async fn a_cumulative_ack_settles_every_earlier_message_and_only_those() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, _| {}).await;
    let addr = cluster.stomp_addr(0);
    let mut holder = TcpStomp::backend(addr, "holder").await;
    holder
        .subscribe("h", "/queue/orders", &[("ack", "client")])
        .await;
    let mut producer = TcpStomp::backend(addr, "producer").await;
    for n in 0..4 {
        producer
            .send_stored("/queue/orders", &[], format!("order {n}").as_bytes())
            .await;
    }
    let messages: Vec<StompReply> = {
        let mut m = Vec::new();
        for _ in 0..4 {
            m.push(holder.next().await);
        }
        m
    };
    let ack = messages[1].header("ack").unwrap().to_owned();
    holder
        .send("ACK", &[("id", &ack), ("receipt", "a")], b"")
        .await;
    assert_eq!(holder.next().await.header("receipt-id"), Some("a"));
    holder.send("DISCONNECT", &[("receipt", "bye")], b"").await;
    let last = holder.until_closed().await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].header("receipt-id"), Some("bye"));

    let mut heir = TcpStomp::backend(addr, "heir").await;
    heir.subscribe("x", "/queue/orders", &[]).await;
    let again: Vec<Vec<u8>> = vec![heir.next().await.body, heir.next().await.body];
    assert_eq!(again, vec![b"order 2".to_vec(), b"order 3".to_vec()]);
    assert!(heir.next_within(Duration::from_millis(300)).await.is_none());
    cluster.finish().await;
}

#[tokio::test]
async fn application_headers_travel_escaped_on_every_message_frame() {
    let cluster = Cluster::start_stomp(2, AuthKind::None, |_, _| {}).await;
    // A subscriber over WebSocket on one node, one over TCP on the other.
    let mut over_ws = StompClient::subscribed(&cluster.ws_url(0, "user=ann"), "/topic/news").await;
    let mut over_tcp = TcpStomp::backend(cluster.stomp_addr(1), "spring").await;
    over_tcp.subscribe("t", "/topic/news", &[]).await;

    let mut sender = TcpStomp::backend(cluster.stomp_addr(1), "spring").await;
    let odd = "a:b\nc\\d";
    sender
        .send_stored(
            "/topic/news",
            &[
                ("simpOrigDestination", "/user/queue/x"),
                ("odd", odd),
                ("content-type", "text/plain"),
            ],
            b"hello",
        )
        .await;
    for message in [over_tcp.next().await, over_ws.next().await] {
        assert_eq!(message.command, "MESSAGE");
        assert_eq!(message.header("simpOrigDestination"), Some("/user/queue/x"));
        assert_eq!(message.header("odd"), Some(odd));
        assert_eq!(message.header("content-type"), Some("text/plain"));
        assert_eq!(message.header("receipt"), None, "STOMP's own headers stay");
        assert_eq!(message.body, b"hello");
    }
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT headers FROM relay.messages WHERE stream = 'topic:news'")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        json!([["simpOrigDestination", "/user/queue/x"], ["odd", odd]])
    );
    cluster.finish().await;
}

#[tokio::test]
async fn heart_beats_flow_over_tcp_and_a_silent_client_is_told_and_dropped() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(300);
    })
    .await;
    let addr = cluster.stomp_addr(0);
    let (mut lively, connected) = TcpStomp::connect(
        addr,
        &[
            ("login", "spring"),
            ("passcode", API_KEY),
            ("heart-beat", "0,400"),
        ],
    )
    .await;
    assert_eq!(connected.header("heart-beat"), Some("400,0"));
    assert!(
        lively
            .next_within(Duration::from_millis(1500))
            .await
            .is_none()
    );
    assert!(lively.beats >= 2, "heart-beats received: {}", lively.beats);

    // Promises one every 400 ms, then says nothing.
    let (mut silent, _) = TcpStomp::connect(
        addr,
        &[
            ("login", "spring"),
            ("passcode", API_KEY),
            ("heart-beat", "400,0"),
        ],
    )
    .await;
    let frames = silent.until_closed().await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].command, "ERROR");
    assert!(frames[0].header("message").unwrap().contains("heartbeat"));
    // Without a promise, silence is fine over TCP (no pings to answer).
    let mut quiet = TcpStomp::backend(addr, "spring").await;
    assert!(
        quiet
            .next_within(Duration::from_millis(1200))
            .await
            .is_none()
    );
    quiet.send_stored("/topic/still-here", &[], b"yes").await;
    cluster.finish().await;
}

/// Subscribes and answers what came before the subscription's RECEIPT
/// (a resume's backfill).
async fn subscribe_collecting(
    client: &mut TcpStomp,
    id: &str,
    destination: &str,
    extra: &[(&str, &str)],
) -> Vec<i64> {
    let mut headers = vec![("id", id), ("destination", destination), ("receipt", "sub")];
    headers.extend_from_slice(extra);
    client.send("SUBSCRIBE", &headers, b"").await;
    let mut ids = Vec::new();
    loop {
        let frame = client.next().await;
        if frame.command == "RECEIPT" {
            return ids;
        }
        ids.push(frame.header("message-id").unwrap().parse().unwrap());
    }
}

#[tokio::test]
async fn a_stomp_user_resumes_with_since_on_connect_and_on_subscribe() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, _| {}).await;
    let addr = cluster.stomp_addr(0);
    let jwt = token("dan", json!({"topics": ["chat.>"]}));
    let (mut dan, _) = TcpStomp::connect(addr, &[("passcode", &jwt)]).await;
    dan.subscribe("u", "/user/queue/messages", &[]).await;
    let first = cluster.send_to_user(0, "dan", json!(1)).await;
    let second = cluster.send_to_user(0, "dan", json!(2)).await;
    for id in [first, second] {
        assert_eq!(
            dan.next().await.header("message-id"),
            Some(id.to_string().as_str())
        );
    }
    dan.send("DISCONNECT", &[("receipt", "bye")], b"").await;
    assert_eq!(dan.until_closed().await.len(), 1);
    let third = cluster.send_to_user(0, "dan", json!(3)).await;

    // As `?since=` does: the stream after the cursor, in order.
    let (mut dan, connected) =
        TcpStomp::connect(addr, &[("passcode", &jwt), ("since", &first.to_string())]).await;
    assert_eq!(connected.command, "CONNECTED", "{connected:?}");
    let resumed = subscribe_collecting(&mut dan, "u", "/user/queue/messages", &[]).await;
    assert_eq!(resumed, vec![second, third]);

    let mut topic = Vec::new();
    for n in 0..3 {
        let id: i64 = sqlx::query_scalar("SELECT relay.publish('chat.room', $1)")
            .bind(json!(n))
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
        topic.push(id);
    }
    let since = topic[0].to_string();
    let resumed =
        subscribe_collecting(&mut dan, "t", "/topic/chat.room", &[("since", &since)]).await;
    assert_eq!(resumed, topic[1..].to_vec());
    let (mut bad, _) = TcpStomp::connect(addr, &[("passcode", &jwt), ("since", "yesterday")]).await;
    assert_eq!(bad.until_closed().await.len(), 0);
    cluster.finish().await;
}

/// Some(()) once `user` has exactly `n` messages parked.
async fn parked(cluster: &Cluster, user: &str, n: i64) -> Option<()> {
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay.outbox WHERE node_id IS NULL AND user_id = $1",
    )
    .bind(user)
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    (waiting == n).then_some(())
}

#[tokio::test]
async fn a_stomp_users_unacked_messages_come_again_on_their_next_connection() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let jwt = token("eve", json!({}));
    let connect = |node: usize| {
        let addr = cluster.stomp_addr(node);
        let jwt = jwt.clone();
        async move {
            let (mut eve, connected) = TcpStomp::connect(addr, &[("passcode", &jwt)]).await;
            assert_eq!(connected.command, "CONNECTED");
            let ids = subscribe_collecting(
                &mut eve,
                "u",
                "/user/queue/messages",
                &[("ack", "client-individual")],
            )
            .await;
            (eve, ids)
        }
    };
    let (mut eve, backlog) = connect(0).await;
    assert!(backlog.is_empty());
    let mut sent = Vec::new();
    for n in 0..3 {
        sent.push(cluster.send_to_user(1, "eve", json!(n)).await);
    }
    let mut acks = Vec::new();
    for id in &sent {
        let message = eve.next().await;
        assert_eq!(message.header("message-id"), Some(id.to_string().as_str()));
        acks.push(message.header("ack").unwrap().to_owned());
    }
    // The first is acked; then the socket dies without a word.
    eve.send("ACK", &[("id", &acks[0]), ("receipt", "a")], b"")
        .await;
    assert_eq!(eve.next().await.header("receipt-id"), Some("a"));
    drop(eve);
    eventually("the unacked two parked", || parked(&cluster, "eve", 2)).await;

    // Her next connection, without `since`, on the other node: those two.
    let (eve, again) = connect(1).await;
    assert_eq!(again, sent[1..].to_vec());
    eventually("the parked copies written", || parked(&cluster, "eve", 0)).await;
    drop(eve);
    // Unacked again (the second socket acked nothing): they come a third time.
    eventually("parked once more", || parked(&cluster, "eve", 2)).await;
    let (_eve, third) = connect(0).await;
    assert_eq!(third, sent[1..].to_vec());
    cluster.finish().await;
}

#[tokio::test]
async fn a_killed_node_loses_no_queue_message_and_no_unacked_user_message() {
    let db = TestDb::new().await;
    let stomp = ["--stomp-listen", "127.0.0.1:0"];
    let args: Vec<&str> = FAST.iter().copied().chain(stomp).collect();
    let doomed = NodeProcess::start(&db.url, "doomed", &args).await;
    let survivor = NodeProcess::start(&db.url, "survivor", &args).await;
    let (doomed_stomp, survivor_stomp) = (doomed.stomp_addr().await, survivor.stomp_addr().await);

    let mut holder = TcpStomp::backend(doomed_stomp, "holder").await;
    holder
        .subscribe("h", "/queue/orders", &[("ack", "client")])
        .await;
    // With auth `none`, a TCP session's login names it (a backend).
    let mut amy = TcpStomp::backend(doomed_stomp, "amy").await;
    amy.subscribe("u", "/user/queue/messages", &[("ack", "client-individual")])
        .await;

    let mut producer = TcpStomp::backend(survivor_stomp, "producer").await;
    for n in 0..3 {
        producer
            .send_stored("/queue/orders", &[], format!("order {n}").as_bytes())
            .await;
        producer
            .send_stored(
                "/user/amy/queue/messages",
                &[],
                format!("note {n}").as_bytes(),
            )
            .await;
    }
    for _ in 0..3 {
        assert_eq!(holder.next().await.command, "MESSAGE");
        assert_eq!(amy.next().await.command, "MESSAGE");
    }
    doomed.kill().await;
    eventually("the dead node reaped", || async {
        let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.nodes WHERE id = 'doomed'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (nodes == 0).then_some(())
    })
    .await;

    let mut heir = TcpStomp::backend(survivor_stomp, "heir").await;
    heir.subscribe("x", "/queue/orders", &[]).await;
    for n in 0..3 {
        let message = heir.next().await;
        assert_eq!(message.body, format!("order {n}").into_bytes());
        assert_eq!(message.header("redelivered"), Some("true"));
    }
    let mut amy = TcpStomp::backend(survivor_stomp, "amy").await;
    let notes = subscribe_collecting(&mut amy, "u", "/user/queue/messages", &[]).await;
    assert_eq!(notes.len(), 3, "{notes:?}");
    drop((heir, amy, producer));
    survivor.terminate().await;
    db.drop_database().await;
}

#[tokio::test]
async fn a_subscription_id_can_name_a_new_consumer_at_once() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, _| {}).await;
    let addr = cluster.stomp_addr(0);
    let mut worker = TcpStomp::backend(addr, "worker").await;
    let mut producer = TcpStomp::backend(addr, "producer").await;
    // The same id, three times over, as fast as the frames go: each is a
    // consumer of its own, and the last one gets the messages.
    for queue in ["/queue/a", "/queue/b", "/queue/a"] {
        worker.subscribe("s", queue, &[("ack", "client")]).await;
        worker
            .send("UNSUBSCRIBE", &[("id", "s"), ("receipt", "u")], b"")
            .await;
        assert_eq!(worker.next().await.header("receipt-id"), Some("u"));
    }
    worker
        .subscribe("s", "/queue/a", &[("ack", "client")])
        .await;
    producer
        .send_stored("/queue/a", &[], b"for the newest")
        .await;
    let message = worker.next().await;
    assert_eq!(message.body, b"for the newest");
    assert_eq!(message.header("subscription"), Some("s"));
    let consumers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay.queue_consumers WHERE subscription LIKE 's/%'",
    )
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(consumers, 1);
    cluster.finish().await;
}

#[tokio::test]
async fn topics_take_springs_separators_and_queues_take_http_messages() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let mut listener = TcpStomp::backend(cluster.stomp_addr(1), "spring").await;
    let topics = [
        "/topic/greetings",
        "/topic/chat.room.1",
        "/topic/chat/room/1",
    ];
    for (n, topic) in topics.iter().enumerate() {
        listener.subscribe(&n.to_string(), topic, &[]).await;
    }
    let mut sender = TcpStomp::backend(cluster.stomp_addr(0), "spring").await;
    for topic in topics {
        sender.send_stored(topic, &[], topic.as_bytes()).await;
    }
    for (n, topic) in topics.iter().enumerate() {
        let message = listener.next().await;
        assert_eq!(message.header("destination"), Some(*topic));
        assert_eq!(message.header("subscription"), Some(n.to_string().as_str()));
        assert_eq!(message.body, topic.as_bytes());
    }
    // A backend's HTTP call can feed a queue too.
    listener.subscribe("q", "/queue/jobs", &[]).await;
    let (status, body) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"queue": "jobs"}, "data": {"job": 1}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let job = listener.next().await;
    assert_eq!(job.header("destination"), Some("/queue/jobs"));
    assert_eq!(job.body, br#"{"job": 1}"#);
    cluster.finish().await;
}

#[tokio::test]
async fn frames_may_arrive_in_pieces_and_an_oversized_one_gets_an_error() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, settings| {
        settings.max_message_bytes = 50_000;
    })
    .await;
    let addr = cluster.stomp_addr(0);
    let mut listener = TcpStomp::backend(addr, "spring").await;
    listener.subscribe("t", "/topic/big", &[]).await;
    let mut sender = TcpStomp::backend(addr, "spring").await;
    // With content-length (and a NUL inside), then without, each written a
    // few bytes at a time, CRLF line ends in the second.
    let body: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let mut framed = format!(
        "SEND\ndestination:/topic/big\ncontent-length:{}\n\n",
        body.len()
    )
    .into_bytes();
    framed.extend_from_slice(&body);
    framed.push(0);
    framed.extend_from_slice(
        b"\r\n\r\nSEND\r\ndestination:/topic/big\r\nreceipt:r\r\n\r\nplain text\0",
    );
    for piece in framed.chunks(997) {
        sender.send_raw(piece).await;
        tokio::task::yield_now().await;
    }
    assert_eq!(sender.next().await.header("receipt-id"), Some("r"));
    assert_eq!(listener.next().await.body, body);
    assert_eq!(listener.next().await.body, b"plain text");

    // Past the limit, declared or not: an ERROR saying so, then the end.
    let mut declared = TcpStomp::backend(addr, "spring").await;
    declared
        .send_raw(b"SEND\ndestination:/topic/big\ncontent-length:60000\n\n")
        .await;
    let frames = declared.until_closed().await;
    assert_eq!(frames[0].command, "ERROR", "{frames:?}");
    assert!(
        frames[0].header("message").unwrap().contains("50000"),
        "{frames:?}"
    );
    let mut endless = TcpStomp::backend(addr, "spring").await;
    endless.send_raw(b"SEND\ndestination:/topic/big\n\n").await;
    endless.send_raw(&vec![b'x'; 70_000]).await;
    let frames = endless.until_closed().await;
    assert_eq!(frames[0].command, "ERROR", "{frames:?}");
    assert!(
        frames[0].header("message").unwrap().contains("too big"),
        "{frames:?}"
    );
    cluster.finish().await;
}

#[tokio::test]
async fn a_node_paused_past_the_timeout_gives_its_queue_work_away_and_commits_none_of_it() {
    let db = TestDb::new().await;
    let stomp = ["--stomp-listen", "127.0.0.1:0"];
    let args: Vec<&str> = FAST.iter().copied().chain(stomp).collect();
    let paused = NodeProcess::start(&db.url, "paused", &args).await;
    let survivor = NodeProcess::start(&db.url, "awake", &args).await;
    let (paused_stomp, survivor_stomp) = (paused.stomp_addr().await, survivor.stomp_addr().await);
    let mut holder = TcpStomp::backend(paused_stomp, "holder").await;
    holder
        .subscribe("h", "/queue/orders", &[("ack", "client-individual")])
        .await;
    let mut producer = TcpStomp::backend(survivor_stomp, "producer").await;
    for n in 0..3 {
        producer
            .send_stored("/queue/orders", &[], format!("order {n}").as_bytes())
            .await;
    }
    let mut acks = Vec::new();
    for _ in 0..3 {
        acks.push(holder.next().await.header("ack").unwrap().to_owned());
    }

    crate::faultkit::pause(paused.pid());
    eventually("the paused node reaped", || async {
        let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.nodes WHERE id = 'paused'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (nodes == 0).then_some(())
    })
    .await;
    let mut heir = TcpStomp::backend(survivor_stomp, "heir").await;
    heir.subscribe("x", "/queue/orders", &[("ack", "client-individual")])
        .await;
    let mut heir_acks = Vec::new();
    for n in 0..3 {
        let message = heir.next().await;
        assert_eq!(message.body, format!("order {n}").into_bytes());
        assert_eq!(message.header("redelivered"), Some("true"));
        heir_acks.push(message.header("ack").unwrap().to_owned());
    }
    for ack in &heir_acks {
        heir.send("ACK", &[("id", ack), ("receipt", "a")], b"")
            .await;
        assert_eq!(heir.next().await.header("receipt-id"), Some("a"));
    }

    // Resumed, the old holder acks what it had: too late, and harmless.
    crate::faultkit::resume(paused.pid());
    for ack in &acks {
        holder.send("ACK", &[("id", ack)], b"").await;
    }
    let _ = holder.until_closed().await;
    eventually("the paused node back, its old consumer gone", || async {
        let (back, consumers, held): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM relay.nodes WHERE id = 'paused'),
                    (SELECT count(*) FROM relay.queue_consumers WHERE node_id = 'paused'),
                    (SELECT count(*) FROM relay.queue_entries)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (back == 1 && consumers == 0 && held == 0).then_some(())
    })
    .await;
    // The heir acked each; the holder's late acks settled nothing of the
    // queue (its entries were gone), and are kept only as what they are: its
    // client's word about its own deliveries, in the audit.
    let acked: Vec<(String, i64)> = sqlx::query_as(
        "SELECT user_id, count(*) FROM relay.deliveries WHERE acked_at IS NOT NULL
          GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(acked.contains(&("heir".into(), 3)), "{acked:?}");
    let claimed_by_paused: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay.queue_entries WHERE node_id = 'paused'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(claimed_by_paused, 0);
    drop((heir, producer));
    survivor.terminate().await;
    paused.terminate().await;
    db.drop_database().await;
}

#[tokio::test]
async fn a_queue_consumer_that_stops_reading_is_closed_and_its_messages_go_to_another() {
    let cluster = Cluster::start_stomp(1, AuthKind::Jwt, |_, settings| {
        settings.limits.slow_consumer_timeout = Duration::from_millis(500);
    })
    .await;
    let addr = cluster.stomp_addr(0);
    // Subscribes, then never reads: its socket buffers fill.
    let mut stuck = TcpStomp::backend(addr, "stuck").await;
    stuck
        .subscribe("s", "/queue/bulk", &[("prefetch-count", "1000")])
        .await;
    let mut producer = TcpStomp::backend(addr, "producer").await;
    const N: usize = 300;
    let body = vec![b'x'; 40_000];
    for _ in 0..N {
        producer
            .send("SEND", &[("destination", "/queue/bulk")], &body)
            .await;
    }
    producer.send_stored("/topic/done", &[], b"all sent").await;
    eventually("the stuck consumer closed", || async {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM relay.queue_consumers WHERE connection_id IN
               (SELECT id FROM relay.connections WHERE user_id = 'stuck')",
        )
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
        let gone: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.connections WHERE user_id = 'stuck'")
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (left == 0 && gone == 0).then_some(())
    })
    .await;
    // What it was written (ack auto) is its; everything else, another's.
    let mut heir = TcpStomp::backend(addr, "heir").await;
    heir.subscribe("h", "/queue/bulk", &[]).await;
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay.deliveries WHERE user_id = 'stuck'")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    assert!(
        (written as usize) < N,
        "the stuck consumer cannot have taken all"
    );
    for _ in written as usize..N {
        assert_eq!(heir.next().await.body.len(), body.len());
    }
    assert!(heir.next_within(Duration::from_millis(300)).await.is_none());
    eventually("the queue empty", || async {
        (queue_entries(&cluster).await == 0).then_some(())
    })
    .await;
    drop(stuck);
    cluster.finish().await;
}

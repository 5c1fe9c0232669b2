//! STOMP over WebSocket, frame by frame, against real nodes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn stomp_url(cluster: &Cluster, node: usize, user: &str) -> String {
    cluster.ws_url(node, &format!("user={user}"))
}

async fn connected(cluster: &Cluster, node: usize, user: &str) -> StompClient {
    let (client, reply) = StompClient::connect(&stomp_url(cluster, node, user), &[]).await;
    assert_eq!(reply.command, "CONNECTED", "{reply:?}");
    client
}

#[tokio::test]
async fn connect_negotiates_the_version_and_names_the_session() {
    let cluster = Cluster::start(1).await;
    let (_client, reply) =
        StompClient::connect(&stomp_url(&cluster, 0, "amy"), &[("heart-beat", "0,0")]).await;
    assert_eq!(reply.command, "CONNECTED");
    assert_eq!(reply.header("version"), Some("1.2"));
    assert_eq!(reply.header("user-name"), Some("amy"));
    assert_eq!(reply.header("heart-beat"), Some("0,0"));
    let session = reply.header("session").unwrap();
    let (_, body) = cluster.get(0, "/v1/users/amy/connections").await;
    assert_eq!(body["connections"][0]["id"], session);
    assert_eq!(body["connections"][0]["protocol"], "stomp");
    cluster.finish().await;
}

#[tokio::test]
async fn user_messages_reach_user_destinations_across_nodes() {
    let cluster = Cluster::start(2).await;
    let mut bea = connected(&cluster, 1, "bea").await;
    bea.send(
        "SUBSCRIBE",
        &[
            ("id", "sub-0"),
            ("destination", "/user/queue/updates"),
            ("receipt", "r1"),
        ],
        b"",
    )
    .await;
    assert_eq!(bea.next().await.header("receipt-id"), Some("r1"));

    let (status, body) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "bea"}, "destination": "/queue/updates", "data": {"n": 1}}),
        )
        .await;
    assert_eq!(status, 202);
    let message = bea.next().await;
    assert_eq!(message.command, "MESSAGE");
    assert_eq!(message.header("subscription"), Some("sub-0"));
    assert_eq!(message.header("message-id"), body["id"].as_str());
    assert_eq!(message.header("destination"), Some("/user/queue/updates"));
    assert_eq!(message.header("content-type"), Some("application/json"));
    assert_eq!(
        serde_json::from_slice::<Value>(&message.body).unwrap(),
        json!({"n": 1})
    );
    assert_eq!(message.header("ack"), None, "auto ack: no ack header");

    // A message for another destination waits for a subscription to it.
    let (_, other) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "bea"}, "destination": "/queue/other", "data": 2}),
        )
        .await;
    bea.send(
        "SUBSCRIBE",
        &[("id", "sub-1"), ("destination", "/user/queue/other")],
        b"",
    )
    .await;
    let held = bea.next().await;
    assert_eq!(held.header("message-id"), other["id"].as_str());
    assert_eq!(held.header("subscription"), Some("sub-1"));
    cluster.finish().await;
}

#[tokio::test]
async fn messages_sent_before_the_first_subscription_are_not_lost() {
    let cluster = Cluster::start(2).await;
    let before = cluster.send_to_user(0, "cal", json!("while offline")).await;
    let mut cal = connected(&cluster, 1, "cal").await;
    let during = cluster
        .send_to_user(0, "cal", json!("before subscribing"))
        .await;
    // Without a destination: delivered as /queue/messages.
    cal.send(
        "SUBSCRIBE",
        &[("id", "s"), ("destination", "/user/queue/messages")],
        b"",
    )
    .await;
    assert_eq!(
        cal.next().await.header("message-id"),
        Some(before.to_string().as_str())
    );
    assert_eq!(
        cal.next().await.header("message-id"),
        Some(during.to_string().as_str())
    );
    cluster.finish().await;
}

#[tokio::test]
async fn a_user_never_receives_another_users_messages_whatever_the_destination() {
    let cluster = Cluster::start(1).await;
    let mut dan = connected(&cluster, 0, "dan").await;
    dan.send(
        "SUBSCRIBE",
        &[("id", "mine"), ("destination", "/user/queue/x")],
        b"",
    )
    .await;
    cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "eve"}, "destination": "/queue/x", "data": "eve's"}),
        )
        .await;
    let own = cluster.send_to_user(0, "dan", json!("dan's")).await;
    dan.send(
        "SUBSCRIBE",
        &[("id", "def"), ("destination", "/user/queue/messages")],
        b"",
    )
    .await;
    assert_eq!(
        dan.next().await.header("message-id"),
        Some(own.to_string().as_str())
    );

    // Another user's destination is refused outright.
    dan.send(
        "SUBSCRIBE",
        &[("id", "theirs"), ("destination", "/user/eve/queue/x")],
        b"",
    )
    .await;
    let error = dan.next().await;
    assert_eq!(error.command, "ERROR");
    assert_eq!(dan.closed().await, Some(1008));
    cluster.finish().await;
}

#[tokio::test]
async fn topics_across_nodes_with_byte_exact_binary_bodies() {
    let cluster = Cluster::start(2).await;
    let mut sender = connected(&cluster, 0, "fay").await;
    let mut receiver = connected(&cluster, 1, "gus").await;
    receiver
        .send(
            "SUBSCRIBE",
            &[
                ("id", "t"),
                ("destination", "/topic/blobs"),
                ("receipt", "s"),
            ],
            b"",
        )
        .await;
    assert_eq!(receiver.next().await.command, "RECEIPT");
    let mut json_client = cluster.connect(1, "hal").await;
    json_client
        .send_json(json!({"op": "subscribe", "topic": "blobs"}))
        .await;
    assert_eq!(json_client.next_frame().await["op"], "subscribed");

    let body: Vec<u8> = (0..=255u8).chain([0, 0, 10, 0]).collect();
    sender
        .send(
            "SEND",
            &[
                ("destination", "/topic/blobs"),
                ("content-type", "application/octet-stream"),
                ("receipt", "sent"),
            ],
            &body,
        )
        .await;
    assert_eq!(sender.next().await.header("receipt-id"), Some("sent"));
    // The receipt means it is stored.
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM relay.messages WHERE body IS NOT NULL")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1);

    let message = receiver.next().await;
    assert_eq!(message.command, "MESSAGE");
    assert_eq!(message.body, body, "byte for byte");
    assert!(message.binary);
    assert_eq!(
        message.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(message.header("destination"), Some("/topic/blobs"));
    let frame = json_client.next_message().await;
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(frame["body_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(decoded, body);

    // A text body keeps its exact bytes too, JSON or not.
    let text = br#"{"b": 1,   "a": [1,2]}"#;
    sender
        .send(
            "SEND",
            &[
                ("destination", "/topic/blobs"),
                ("content-type", "application/json"),
            ],
            text,
        )
        .await;
    let message = receiver.next().await;
    assert_eq!(message.body, text.to_vec());
    assert!(!message.binary);
    cluster.finish().await;
}

#[tokio::test]
async fn each_ack_mode() {
    let cluster = Cluster::start(1).await;
    let mut ivy = connected(&cluster, 0, "ivy").await;
    ivy.send(
        "SUBSCRIBE",
        &[
            ("id", "ind"),
            ("destination", "/topic/ind"),
            ("ack", "client-individual"),
        ],
        b"",
    )
    .await;
    ivy.send(
        "SUBSCRIBE",
        &[
            ("id", "cum"),
            ("destination", "/topic/cum"),
            ("ack", "client"),
        ],
        b"",
    )
    .await;
    ivy.send(
        "SUBSCRIBE",
        &[
            ("id", "auto"),
            ("destination", "/topic/auto"),
            ("receipt", "ok"),
        ],
        b"",
    )
    .await;
    assert_eq!(ivy.next().await.command, "RECEIPT");
    let publish = |topic: &'static str| {
        let cluster = &cluster;
        async move {
            let (_, body) = cluster
                .post(
                    0,
                    "/v1/messages",
                    &json!({"to": {"topic": topic}, "data": 1}),
                )
                .await;
            body["id"].as_str().unwrap().parse::<i64>().unwrap()
        }
    };
    let acked = |id: i64| {
        let pool = cluster.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT acked_at IS NOT NULL FROM relay.deliveries WHERE message_id = $1",
            )
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap()
        }
    };

    // client-individual: each ACK acknowledges one message.
    let (i1, i2) = (publish("ind").await, publish("ind").await);
    let m1 = ivy.next().await;
    let m2 = ivy.next().await;
    let ack2 = m2.header("ack").unwrap().to_owned();
    ivy.send("ACK", &[("id", &ack2), ("receipt", "a2")], b"")
        .await;
    assert_eq!(ivy.next().await.header("receipt-id"), Some("a2"));
    eventually("i2 acked", || async {
        (acked(i2).await == Some(true)).then_some(())
    })
    .await;
    assert_eq!(acked(i1).await, Some(false));
    assert!(m1.header("ack").is_some());

    // client: an ACK acknowledges every earlier message of the subscription.
    let (c1, c2, c3) = (
        publish("cum").await,
        publish("cum").await,
        publish("cum").await,
    );
    let _ = ivy.next().await;
    let second = ivy.next().await;
    let _ = ivy.next().await;
    let ack = second.header("ack").unwrap().to_owned();
    ivy.send("ACK", &[("id", &ack)], b"").await;
    eventually("c1, c2 acked", || async {
        (acked(c1).await == Some(true) && acked(c2).await == Some(true)).then_some(())
    })
    .await;
    assert_eq!(acked(c3).await, Some(false));

    // NACK leaves a message unacked.
    let n1 = publish("ind").await;
    let m = ivy.next().await;
    ivy.send(
        "NACK",
        &[("id", m.header("ack").unwrap()), ("receipt", "n")],
        b"",
    )
    .await;
    assert_eq!(ivy.next().await.header("receipt-id"), Some("n"));
    assert!(!acked(n1).await.unwrap_or(false));

    // auto: no ack header, nothing to do.
    publish("auto").await;
    assert_eq!(ivy.next().await.header("ack"), None);
    cluster.finish().await;
}

#[tokio::test]
async fn errors_are_error_frames_then_a_close() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, settings| {
        settings.max_message_bytes = 1024
    })
    .await;
    let url = cluster.ws_url(0, "");
    // No credentials, or bad ones, in CONNECT.
    let (mut anonymous, reply) = StompClient::connect(&url, &[]).await;
    assert_eq!(reply.command, "ERROR");
    assert!(reply.header("message").unwrap().contains("token"));
    assert_eq!(anonymous.closed().await, Some(1008));
    let (mut forged, reply) = StompClient::connect(&url, &[("passcode", "not-a-jwt")]).await;
    assert_eq!(reply.command, "ERROR");
    assert_eq!(forged.closed().await, Some(1008));
    // Something else than CONNECT first.
    let mut early = StompClient::open(&url).await;
    early
        .send("SEND", &[("destination", "/topic/x")], b"hi")
        .await;
    assert_eq!(early.next().await.command, "ERROR");

    let good = token("jo", json!({"publish": ["x"], "topics": ["x"]}));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a malformed frame", b"GARBAGE\n\n\0".to_vec()),
        (
            "a missing terminator",
            b"SEND\ndestination:/topic/x\n\nno nul".to_vec(),
        ),
        ("a transaction", b"BEGIN\ntransaction:t1\n\n\0".to_vec()),
        (
            "an oversized body",
            [
                b"SEND\ndestination:/topic/x\n\n".to_vec(),
                vec![b'x'; 2048],
                vec![0],
            ]
            .concat(),
        ),
        (
            "an unknown destination",
            b"SUBSCRIBE\nid:1\ndestination:/queue/x\n\n\0".to_vec(),
        ),
        (
            "a forbidden publish",
            b"SEND\ndestination:/topic/y\n\nhi\0".to_vec(),
        ),
        (
            "an unknown ack mode",
            b"SUBSCRIBE\nid:1\ndestination:/topic/x\nack:sometimes\n\n\0".to_vec(),
        ),
    ];
    for (what, frame) in cases {
        let (mut client, reply) = StompClient::connect(&url, &[("passcode", &good)]).await;
        assert_eq!(reply.command, "CONNECTED");
        client.send_raw(&frame).await;
        let error = client.next().await;
        assert_eq!(error.command, "ERROR", "{what}");
        assert!(!error.header("message").unwrap().is_empty(), "{what}");
        assert!(
            client.closed().await.is_some(),
            "{what}: closed after the ERROR"
        );
    }
    // The node keeps serving.
    let (mut fine, reply) =
        StompClient::connect(&url, &[("Authorization", &format!("Bearer {good}"))]).await;
    assert_eq!(reply.command, "CONNECTED");
    fine.send("DISCONNECT", &[("receipt", "bye")], b"").await;
    assert_eq!(fine.next().await.header("receipt-id"), Some("bye"));
    assert_eq!(fine.closed().await, Some(1000));
    cluster.finish().await;
}

#[tokio::test]
async fn heart_beats_are_negotiated_and_a_silent_client_is_dropped() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let (mut client, reply) =
        StompClient::connect(&stomp_url(&cluster, 0, "kim"), &[("heart-beat", "100,100")]).await;
    // Each side at the slower of what one offers and the other wants.
    assert_eq!(reply.header("heart-beat"), Some("200,200"));
    let session = reply.header("session").unwrap().to_owned();
    // It promised heart-beats and sends none (its WebSocket pongs do not count).
    assert!(client.closed().await.is_some());
    eventually("the silent client's row to go", || async {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.connections WHERE id = $1::uuid")
                .bind(&session)
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (rows == 0).then_some(())
    })
    .await;
    cluster.finish().await;
}

#[tokio::test]
async fn stomp_1_1_acks_by_message_id() {
    let cluster = Cluster::start(1).await;
    let mut client = StompClient::open(&stomp_url(&cluster, 0, "lou")).await;
    client
        .send_raw(b"CONNECT\naccept-version:1.1\nhost:x\n\n\0")
        .await;
    let reply = client.next().await;
    assert_eq!(reply.header("version"), Some("1.1"));
    client
        .send(
            "SUBSCRIBE",
            &[
                ("id", "s"),
                ("destination", "/topic/v11"),
                ("ack", "client-individual"),
                ("receipt", "r"),
            ],
            b"",
        )
        .await;
    assert_eq!(
        client.next().await.command,
        "RECEIPT",
        "subscribed before the publish"
    );
    let (_, body) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"topic": "v11"}, "data": "x"}),
        )
        .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let message = client.next().await;
    assert_eq!(message.header("message-id"), Some(id.as_str()));
    assert_eq!(message.header("ack"), None, "1.1 acks by message-id");
    client
        .send("ACK", &[("subscription", "s"), ("message-id", &id)], b"")
        .await;
    eventually("the ack", || async {
        let acked: Option<bool> = sqlx::query_scalar(
            "SELECT acked_at IS NOT NULL FROM relay.deliveries WHERE message_id = $1::bigint",
        )
        .bind(&id)
        .fetch_optional(&cluster.db.pool)
        .await
        .unwrap();
        (acked == Some(true)).then_some(())
    })
    .await;
    cluster.finish().await;
}

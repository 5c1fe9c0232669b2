//! Security and bad input: who gets in, the limits, and hostile clients. Each
//! case checks the clear error, and that the node goes on serving others.

use std::time::Duration;

use pgrelay::auth::{ApiKeys, JwtVerifier};
use pgrelay::config::Auth;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

fn sign(
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    claims: Value,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), &claims, key).unwrap()
}

fn hour() -> i64 {
    chrono::Utc::now().timestamp() + 3600
}

fn refused_status(result: Result<Client, tokio_tungstenite::tungstenite::Error>) -> u16 {
    match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("accepted"),
    }
}

/// A client still served: connects and receives a message.
async fn still_serving(cluster: &Cluster, node: usize) {
    let user = format!("ok-{}", rand::random::<u32>());
    let mut client = cluster.connect(node, &user).await;
    let id = cluster.send_to_user(0, &user, json!("still here")).await;
    assert_eq!(id_of(&client.next_message().await), id);
    client.close().await;
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_and_forgeries_do_not() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
    let read = |name: &str| std::fs::read(format!("{keys}{name}")).unwrap();
    for (public, private, algorithm) in [
        (
            "rsa-public.pem",
            "rsa-private.pem",
            jsonwebtoken::Algorithm::RS256,
        ),
        (
            "ec-public.pem",
            "ec-private.pem",
            jsonwebtoken::Algorithm::ES256,
        ),
    ] {
        let public = read(public);
        let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, settings| {
            settings.auth = Auth::Jwt {
                verifier: JwtVerifier::from_public_pem(&public)
                    .unwrap()
                    .expecting(Some("relay"), Some("https://auth.example")),
                api_keys: ApiKeys::new([API_KEY]).unwrap(),
            };
        })
        .await;
        let private = read(private);
        let key = match algorithm {
            jsonwebtoken::Algorithm::RS256 => {
                jsonwebtoken::EncodingKey::from_rsa_pem(&private).unwrap()
            }
            _ => jsonwebtoken::EncodingKey::from_ec_pem(&private).unwrap(),
        };
        let claims = |extra: Value| {
            let mut claims = json!({"sub": "rita", "exp": hour(), "aud": "relay", "iss": "https://auth.example"});
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            claims
        };
        let good = sign(algorithm, &key, claims(json!({})));
        let mut rita = Client::connect(&cluster.ws_url(0, &format!("token={good}")), &[])
            .await
            .unwrap();
        let id = cluster.send_to_user(0, "rita", json!(1)).await;
        assert_eq!(id_of(&rita.next_message().await), id);

        let bad = [
            // Algorithm confusion: HS256, signed with the public key's bytes.
            sign(
                jsonwebtoken::Algorithm::HS256,
                &jsonwebtoken::EncodingKey::from_secret(&public),
                claims(json!({})),
            ),
            // alg none.
            format!(
                "{}.{}.",
                base64_url(br#"{"alg":"none","typ":"JWT"}"#),
                base64_url(claims(json!({})).to_string().as_bytes())
            ),
            sign(algorithm, &key, claims(json!({"exp": 1_000_000}))),
            sign(algorithm, &key, claims(json!({"nbf": hour() - 60}))),
            sign(algorithm, &key, claims(json!({"aud": "someone-else"}))),
            sign(
                algorithm,
                &key,
                claims(json!({"iss": "https://evil.example"})),
            ),
        ];
        for token in bad {
            let refused = Client::connect(&cluster.ws_url(0, &format!("token={token}")), &[]).await;
            assert_eq!(refused_status(refused), 401, "{algorithm:?}: {token}");
        }
        rita.close().await;
        cluster.finish().await;
    }
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test]
async fn with_jwt_nothing_but_the_token_names_the_user() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let good = token("sam", json!({}));
    // A `user` parameter is ignored: the socket is sam's, not mallory's.
    let mut sam = Client::connect(
        &cluster.ws_url(0, &format!("user=mallory&token={good}")),
        &[],
    )
    .await
    .unwrap();
    let (_, connections) = cluster.get(0, "/v1/users/mallory/connections").await;
    assert_eq!(
        connections["connections"].as_array().map(Vec::len),
        Some(0),
        "{connections}"
    );
    let id = cluster.send_to_user(0, "sam", json!("yours")).await;
    assert_eq!(id_of(&sam.next_message().await), id);
    // Nor is a STOMP login header.
    let (_client, reply) = StompClient::connect(
        &cluster.ws_url(0, ""),
        &[("login", "mallory"), ("passcode", &good)],
    )
    .await;
    assert_eq!(reply.command, "CONNECTED");
    assert_eq!(reply.header("user-name"), Some("sam"));
    cluster.finish().await;
}

#[tokio::test]
async fn api_keys_in_the_database_are_accepted_and_revoked_without_a_restart() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let key = "stored-key-abcdefghijklmnop";
    let post = |key: &'static str| {
        cluster
            .http
            .post(cluster.url(0, "/v1/messages"))
            .bearer_auth(key)
            .json(&json!({"to": {"user": "tom"}, "data": 1}))
            .send()
    };
    assert_eq!(post(key).await.unwrap().status(), 401);
    sqlx::query("INSERT INTO relay.api_keys (name, key_digest) VALUES ('ci', $1)")
        .bind(&pgrelay::auth::digest(key)[..])
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    eventually("the new key to be accepted", || async {
        (post(key).await.unwrap().status() == 202).then_some(())
    })
    .await;
    sqlx::query("UPDATE relay.api_keys SET revoked_at = now() WHERE name = 'ci'")
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    eventually("the revoked key to be refused", || async {
        (post(key).await.unwrap().status() == 401).then_some(())
    })
    .await;
    // The configured key still works.
    let (status, _) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"user": "tom"}, "data": 2}),
        )
        .await;
    assert_eq!(status, 202);
    cluster.finish().await;
}

#[tokio::test]
async fn messages_beyond_the_rate_limit_get_429_with_retry_after() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, settings| {
        settings.limits.api_rate_limit = 5
    })
    .await;
    let post = |path: &str, body: Value| {
        cluster
            .http
            .post(cluster.url(0, path))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };
    let started = std::time::Instant::now();
    let mut last_accepted = started;
    let (mut accepted, mut refused) = (0, 0);
    for n in 0..10 {
        let response = post("/v1/messages", json!({"to": {"user": "uma"}, "data": n}))
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => {
                accepted += 1;
                last_accepted = std::time::Instant::now();
            }
            429 => {
                refused += 1;
                assert!(
                    response.headers().contains_key("retry-after"),
                    "429 says when to retry"
                );
                assert_eq!(
                    response.headers()["content-type"],
                    "application/problem+json"
                );
            }
            other => panic!("status {other}"),
        }
    }
    // A burst of 5, plus what refilled (5 a second) while the loop ran.
    let refilled = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (5..=5 + refilled).contains(&accepted),
        "{accepted} accepted"
    );
    assert!(refused > 0);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
    assert_eq!(stored as usize, accepted, "what was refused was not stored");
    // A batch counts each of its messages: five need a full bucket, which
    // takes a second to refill after the last accepted message.
    let gap = last_accepted.elapsed();
    let batch: Vec<Value> = (0..5)
        .map(|n| json!({"to": {"user": "uma"}, "data": n}))
        .collect();
    let response = post("/v1/messages/batch", json!(batch)).await.unwrap();
    if gap < Duration::from_millis(700) {
        assert_eq!(response.status(), 429);
    }
    // A batch larger than a second's worth passes on a full bucket, and is
    // paid for in full: 15 at 5 a second owe two more seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let batch: Vec<Value> = (0..15)
        .map(|n| json!({"to": {"user": "uma"}, "data": n}))
        .collect();
    let response = post("/v1/messages/batch", json!(batch)).await.unwrap();
    assert_eq!(response.status(), 202);
    let response = post("/v1/messages", json!({"to": {"user": "uma"}, "data": 0}))
        .await
        .unwrap();
    assert_eq!(response.status(), 429, "the batch's debt is not paid yet");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 2, "Retry-After {retry_after}");
    cluster.finish().await;
}

#[tokio::test]
async fn connection_and_subscription_limits_close_with_a_reason() {
    let cluster = Cluster::start_with(2, AuthKind::None, |_, settings| {
        settings.limits.max_connections_per_user = 2;
        settings.limits.max_subscriptions = 2;
    })
    .await;
    // Two connections for val, on two nodes: a third anywhere is refused.
    let first = cluster.connect(0, "val").await;
    let mut second = cluster.connect(1, "val").await;
    let mut third = Client::connect_raw(&cluster.ws_url(0, "user=val")).await;
    let close = third.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert!(
        close.reason.contains("too many connections"),
        "{}",
        close.reason
    );
    first.close().await;
    eventually("a free place again", || async {
        let mut client = Client::connect_raw(&cluster.ws_url(0, "user=val")).await;
        let frame = client.next_raw().await;
        matches!(frame, Some(Message::Text(t)) if t.contains("welcome")).then_some(())
    })
    .await;

    for topic in ["a", "b"] {
        second
            .send_json(json!({"op": "subscribe", "topic": topic}))
            .await;
        assert_eq!(second.next_frame().await["op"], "subscribed");
    }
    second
        .send_json(json!({"op": "subscribe", "topic": "c"}))
        .await;
    let refused = second.next_frame().await;
    assert_eq!(refused["code"], "subscribe_failed");
    assert!(refused["message"].as_str().unwrap().contains("at most 2"));
    still_serving(&cluster, 1).await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_flood_of_frames_or_pings_is_slowed_down_not_closed() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.limits.max_frames_per_second = 20;
    })
    .await;
    // 20 pings, then 40 frames that each get an answer: at 20 frames a
    // second (a burst of 20 allowed) the last answer cannot come before
    // ~2 s, and it comes; the connection stays open and keeps delivering.
    let mut client = cluster.connect(0, "wes").await;
    let started = std::time::Instant::now();
    for _ in 0..20 {
        client.send_raw(Message::Ping(vec![1].into())).await;
    }
    for n in 0..40 {
        client
            .send_json(json!({"op": "ack", "id": (1_000_000 + n).to_string()}))
            .await;
    }
    for _ in 0..40 {
        let answer = client.next_frame().await;
        assert_eq!(answer["code"], "unknown_message", "{answer}");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "60 frames at 20/s were read in {took:?}: not slowed down"
    );
    let id = cluster.send_to_user(0, "wes", json!("still open")).await;
    assert_eq!(id_of(&client.next_message().await), id);
    client.close().await;
    still_serving(&cluster, 0).await;
    cluster.finish().await;
}

#[tokio::test]
async fn stomp_frames_count_one_by_one_against_the_rate_and_lose_nothing() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.limits.max_frames_per_second = 20;
    })
    .await;
    let mut receiver =
        StompClient::subscribed(&cluster.ws_url(0, "user=sam"), "/topic/flood").await;
    // One WebSocket message carrying 60 SEND frames: 60 frames, not one.
    let (mut producer, connected) = StompClient::connect(&cluster.ws_url(0, "user=pat"), &[]).await;
    assert_eq!(connected.command, "CONNECTED");
    let mut frames = Vec::new();
    for n in 0..60 {
        frames.extend_from_slice(
            format!("SEND\ndestination:/topic/flood\nreceipt:r{n}\n\n{n}\0").as_bytes(),
        );
    }
    let started = std::time::Instant::now();
    producer.send_raw(&frames).await;
    for n in 0..60 {
        let receipt = producer.next().await;
        assert_eq!(receipt.command, "RECEIPT", "{:?}", receipt.headers);
        assert_eq!(receipt.header("receipt-id"), Some(format!("r{n}").as_str()));
    }
    // The next frame is read only once the 60 are paid for (3 s at 20/s,
    // 1 s of burst): a DISCONNECT's receipt cannot come before ~2 s.
    producer
        .send("DISCONNECT", &[("receipt", "bye")], b"")
        .await;
    assert_eq!(producer.next().await.header("receipt-id"), Some("bye"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1800),
        "61 frames at 20/s were read in {took:?}: not slowed down"
    );
    // Every SEND was stored, in order.
    for n in 0..60 {
        let message = receiver.next().await;
        assert_eq!(message.command, "MESSAGE");
        assert_eq!(message.body, n.to_string().as_bytes());
    }
    cluster.finish().await;
}

#[tokio::test]
async fn oversized_frames_close_with_1009() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.max_message_bytes = 1024
    })
    .await;
    let mut client = cluster.connect(0, "xan").await;
    let huge = json!({"op": "publish", "topic": "t", "data": "x".repeat(100_000)}).to_string();
    let _ = client.try_send(Message::text(huge)).await;
    let close = client.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009);
    still_serving(&cluster, 0).await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_slow_consumer_is_closed_others_are_not_slowed_and_nothing_is_lost() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.limits.slow_consumer_timeout = Duration::from_millis(500);
        settings.send_queue = 64;
    })
    .await;
    let mut sleepy = cluster.connect(0, "yves").await;
    let mut awake = cluster.connect(0, "zara").await;
    let blob = "x".repeat(60_000);
    let mut sent = Vec::new();
    for n in 0..400 {
        let body: Vec<Value> = (0..1)
            .map(|_| json!({"to": {"user": "yves"}, "data": {"n": n, "blob": blob}}))
            .collect();
        let (status, answer) = cluster.post(0, "/v1/messages/batch", &json!(body)).await;
        assert_eq!(status, 202);
        sent.push(answer["ids"][0].as_str().unwrap().parse::<i64>().unwrap());
        // Meanwhile the other client is served at once.
        if n % 100 == 0 {
            let id = cluster.send_to_user(0, "zara", json!(n)).await;
            assert_eq!(id_of(&awake.next_message().await), id);
        }
    }
    // Yves never read: the node gives up on his socket...
    eventually("the slow consumer to be dropped", || async {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.connections WHERE user_id = 'yves'")
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (rows == 0).then_some(())
    })
    .await;
    // ...what reached him is an in-order prefix, and the close reason comes
    // last when it fitted (his buffers were full, so it may not have)...
    let mut received = Vec::new();
    let end = within(WAIT, async {
        loop {
            match sleepy.next_raw().await {
                Some(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    received.push(id_of(&frame));
                }
                Some(Message::Close(frame)) => return frame,
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await;
    assert_eq!(received, sent[..received.len()]);
    assert!(received.len() < sent.len(), "he was cut off before the end");
    if let Some(close) = end {
        assert_eq!(u16::from(close.code), 1008);
        assert!(close.reason.contains("slow consumer"), "{}", close.reason);
    }
    // ...and resuming from the start gets everything, in order.
    let mut resumed = cluster.connect_query(0, "yves", "since=0").await;
    assert_eq!(resumed.message_ids(sent.len()).await, sent);
    resumed.close().await;
    awake.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn slow_and_half_open_http_clients_are_cut_off() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.limits.request_timeout = Duration::from_millis(500);
        settings.limits.max_connections = 8;
    })
    .await;
    let addr = cluster.node(0).addr;
    // Slowloris: headers that never end.
    let mut loris = tokio::net::TcpStream::connect(addr).await.unwrap();
    loris
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buffer = [0u8; 256];
    let read = within(WAIT, loris.read(&mut buffer)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the server hung up on headers that never end"
    );

    // A body that never comes: 408 problem+json.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"to\":").await.unwrap();
    let mut answer = Vec::new();
    let _ = within(WAIT, slow.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");

    // More connections than the node takes: the extra ones are closed at once.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok();
    let read = within(WAIT, extra.read(&mut buffer)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the ninth connection was refused"
    );
    drop(held);
    eventually("room again", || async {
        cluster
            .http
            .get(cluster.url(0, "/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    still_serving(&cluster, 0).await;
    cluster.finish().await;
}

#[tokio::test]
async fn hostile_user_ids_and_topic_names_are_data_not_code() {
    let cluster = Cluster::start(1).await;
    for (user, other) in [
        ("o'brien", "o"),
        ("100%", "100"),
        ("a_b", "aXb"),
        ("x\"y;--", "x"),
    ] {
        let mut victim = cluster.connect(0, other).await;
        let mut hostile = cluster.connect(0, user).await;
        let (status, _) = cluster
            .post(
                0,
                "/v1/messages",
                &json!({"to": {"user": user}, "data": user}),
            )
            .await;
        assert_eq!(status, 202);
        assert_eq!(hostile.next_message().await["data"], user);
        // Only the named user got it: the other's next message is its own.
        let mine = cluster.send_to_user(0, other, json!("mine")).await;
        assert_eq!(id_of(&victim.next_message().await), mine);
        victim.close().await;
        hostile.close().await;
    }
    let long = "u".repeat(10_000);
    let refused = Client::connect(&cluster.ws_url(0, &format!("user={long}")), &[]).await;
    assert_eq!(refused_status(refused), 400);
    // Not UTF-8 once decoded.
    let refused = Client::connect(&cluster.ws_url(0, "user=%FF%FE"), &[]).await;
    assert_eq!(refused_status(refused), 400);
    let (status, _) = cluster
        .post(0, "/v1/messages", &json!({"to": {"user": long}, "data": 1}))
        .await;
    assert_eq!(status, 400);

    let mut client = cluster.connect(0, "tia").await;
    for topic in ["it's", "50%_off", "\"quoted\""] {
        client
            .send_json(json!({"op": "subscribe", "topic": topic}))
            .await;
        assert_eq!(client.next_frame().await["op"], "subscribed", "{topic}");
    }
    for topic in ["a b".to_owned(), "x".repeat(300), "".to_owned()] {
        client
            .send_json(json!({"op": "subscribe", "topic": topic}))
            .await;
        assert_eq!(client.next_frame().await["code"], "bad_frame");
    }
    client.close().await;
    still_serving(&cluster, 0).await;
    cluster.finish().await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_cleanly() {
    let cluster = Cluster::start(1).await;
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let body = format!(r#"{{"to":{{"user":"ned"}},"data":{nested}}}"#);
    let response = cluster
        .http
        .post(cluster.url(0, "/v1/messages"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let mut client = cluster.connect(0, "ned").await;
    client
        .send_raw(Message::text(format!(
            r#"{{"op":"publish","topic":"t","data":{nested}}}"#
        )))
        .await;
    assert_eq!(client.next_frame().await["code"], "bad_frame");
    client.close().await;
    still_serving(&cluster, 0).await;
    cluster.finish().await;
}

#[tokio::test]
async fn hostile_stomp_headers_get_an_error_not_a_crash() {
    let cluster = Cluster::start(1).await;
    let url = cluster.ws_url(0, "user=una");
    // Thousands of headers.
    let (mut client, _) = StompClient::connect(&url, &[]).await;
    let mut frame = String::from("SEND\ndestination:/topic/x\n");
    for n in 0..5000 {
        frame.push_str(&format!("h{n}:v\n"));
    }
    frame.push_str("\nbody\0");
    client.send_raw(frame.as_bytes()).await;
    let error = client.next().await;
    assert_eq!(error.command, "ERROR");
    assert!(error.header("message").unwrap().contains("headers"));
    // Escaped line breaks and colons in values are values, not new headers.
    let (mut client, _) = StompClient::connect(&url, &[]).await;
    client
        .send_raw(b"SUBSCRIBE\nid:s\ndestination:/topic/esc\nreceipt:r\n\n\0")
        .await;
    assert_eq!(client.next().await.command, "RECEIPT");
    client
        .send_raw(
            b"SEND\ndestination:/topic/esc\nx-note:a\\cb\\ndestination\\c/topic/other\n\nhello\0",
        )
        .await;
    let message = client.next().await;
    assert_eq!(message.command, "MESSAGE");
    assert_eq!(message.header("destination"), Some("/topic/esc"));
    assert_eq!(message.body, b"hello");
    still_serving(&cluster, 0).await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_raw_websocket_client_flooding_garbage_does_not_disturb_others() {
    // The server tolerates this many bad frames a minute
    // (BAD_FRAMES_PER_MINUTE): the next one closes the socket.
    const TOLERATED: usize = 10;
    let cluster = Cluster::start(1).await;
    let mut good = cluster.connect(0, "gina").await;
    let mut bad = cluster.connect(0, "bart").await;
    // More than the server tolerates, with one to spare: that one may meet
    // a socket already closing.
    for _ in 0..TOLERATED + 2 {
        let _ = bad.try_send(Message::binary(vec![0xff; 1000])).await;
    }
    // Every bad frame up to and including the one over the limit is answered.
    for n in 1..=TOLERATED + 1 {
        let error = bad.next_frame().await;
        assert_eq!(error["op"], "error", "bad frame {n}: {error}");
        assert_eq!(error["code"], "bad_frame", "bad frame {n}: {error}");
    }
    let close = bad.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(&*close.reason, "too many bad frames");
    // The good client on the same node is still served.
    let id = cluster.send_to_user(0, "gina", json!("fine")).await;
    assert_eq!(id_of(&good.next_message().await), id);
    good.close().await;
    cluster.finish().await;
}

/// A browser sees an HTTP 401 on an upgrade only as close 1006, the same as
/// a dead node: with `refusal=close` the refusal comes in-band instead, as a
/// close 1008 with the reason, and nothing is registered. Without it, the
/// 401 stays.
#[tokio::test]
async fn a_refused_token_can_be_told_in_band_as_a_close_with_the_reason() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let expired = token("eve", json!({"exp": chrono::Utc::now().timestamp() - 600}));
    for query in [
        format!("token={expired}&refusal=close"),
        "refusal=close".to_owned(),
    ] {
        let (mut socket, _) = tokio_tungstenite::connect_async(cluster.ws_url(0, &query))
            .await
            .expect("the upgrade is accepted");
        let close = within(WAIT, async {
            loop {
                match socket.next().await {
                    Some(Ok(Message::Close(frame))) => break frame.expect("a close frame"),
                    Some(Ok(_)) => continue,
                    other => panic!("no close frame: {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(u16::from(close.code), 1008, "{query}");
        assert!(
            close.reason.starts_with("unauthorized: "),
            "{}",
            close.reason
        );
    }
    let rejected =
        tokio_tungstenite::connect_async(cluster.ws_url(0, &format!("token={expired}"))).await;
    match rejected {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    let bad = tokio_tungstenite::connect_async(cluster.ws_url(0, "refusal=maybe")).await;
    assert!(
        matches!(&bad, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 400),
        "{bad:?}"
    );
    let (status, body) = cluster.get(0, "/v1/users/eve/connections").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connections"], json!([]), "nothing registered");
    cluster.finish().await;
}

/// The throwaway PostgreSQL (`pgrelay dev`, the tests) is nobody else's:
/// a local user without its generated password cannot connect, so cannot
/// be its superuser (and run programs through `COPY … TO PROGRAM`).
#[tokio::test]
async fn the_throwaway_postgres_needs_its_generated_password() {
    use pgrelay::tools::pgtemp::{self, TempPostgres};
    let postgres =
        tokio::task::spawn_blocking(|| TempPostgres::start(pgtemp::Options::default()).unwrap())
            .await
            .unwrap();
    let url = postgres.url("postgres");
    let pool = sqlx::PgPool::connect(&url).await.expect("its URL connects");
    pool.close().await;
    for intruder in [
        format!("postgres://postgres@127.0.0.1:{}/postgres", postgres.port()),
        format!(
            "postgres://postgres:guess@127.0.0.1:{}/postgres",
            postgres.port()
        ),
    ] {
        let refused = sqlx::PgPool::connect(&intruder).await;
        let error = refused.expect_err("no password, no session").to_string();
        assert!(error.contains("password"), "{error}");
    }
    drop(postgres);
}

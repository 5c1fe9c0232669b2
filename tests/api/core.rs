//! The core: a message for a user reaches them on whichever node they are
//! connected to, and every step leaves rows an operator can audit.

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

#[tokio::test]
async fn a_message_submitted_on_one_node_reaches_a_client_on_another() {
    let cluster = Cluster::start(2).await;
    let mut alice = cluster.connect(1, "alice").await;
    assert_eq!(alice.node_id, cluster.node_id(1));

    let id = cluster
        .send_to_user(0, "alice", json!({"text": "hi"}))
        .await;

    let frame = alice.next_message().await;
    assert_eq!(id_of(&frame), id);
    assert_eq!(frame["to"], json!({"user": "alice"}));
    assert_eq!(frame["data"], json!({"text": "hi"}));
    assert!(chrono::DateTime::parse_from_rfc3339(frame["created_at"].as_str().unwrap()).is_ok());
    alice.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_user_with_sockets_on_both_nodes_gets_it_on_both() {
    let cluster = Cluster::start(2).await;
    let mut on_a = cluster.connect(0, "bob").await;
    let mut on_b = cluster.connect(1, "bob").await;
    let mut other = cluster.connect(1, "carol").await;

    let id = cluster.send_to_user(0, "bob", json!(1)).await;
    assert_eq!(id_of(&on_a.next_message().await), id);
    assert_eq!(id_of(&on_b.next_message().await), id);

    // Carol got nothing of Bob's: her next message is her own.
    let mine = cluster.send_to_user(1, "carol", json!(2)).await;
    assert_eq!(id_of(&other.next_message().await), mine);

    let (status, body) = cluster.get(0, &format!("/v1/messages/{id}")).await;
    assert_eq!(status, 200);
    let deliveries = eventually("two delivery rows", || async {
        let (_, body) = cluster.get(0, &format!("/v1/messages/{id}")).await;
        let list = body["deliveries"].as_array().unwrap().clone();
        (list.len() == 2).then_some(list)
    })
    .await;
    let mut nodes: Vec<&str> = deliveries
        .iter()
        .map(|d| d["node_id"].as_str().unwrap())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, vec![cluster.node_id(0), cluster.node_id(1)]);
    assert_eq!(body["to"], json!({"user": "bob"}));
    for client in [on_a, on_b, other] {
        client.close().await;
    }
    cluster.finish().await;
}

#[tokio::test]
async fn an_offline_user_gets_the_message_on_their_next_connect_on_any_node() {
    let cluster = Cluster::start(2).await;
    let first = cluster.send_to_user(0, "dave", json!("one")).await;
    let second = cluster.send_to_user(1, "dave", json!("two")).await;
    let (_, body) = cluster.get(0, &format!("/v1/messages/{first}")).await;
    assert_eq!(body["state"], "pending");

    let mut dave = cluster.connect(1, "dave").await;
    assert_eq!(dave.message_ids(2).await, vec![first, second]);
    let live = cluster.send_to_user(0, "dave", json!("three")).await;
    assert_eq!(id_of(&dave.next_message().await), live);

    // Delivered once: the next connect does not get them again.
    eventually("the parked messages to be cleared", || async {
        let parked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.outbox WHERE node_id IS NULL")
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (parked == 0).then_some(())
    })
    .await;
    dave.close().await;
    let mut again = cluster.connect(0, "dave").await;
    let fresh = cluster.send_to_user(1, "dave", json!("four")).await;
    assert_eq!(id_of(&again.next_message().await), fresh);
    again.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_message_to_a_connection_reaches_that_socket_only() {
    let cluster = Cluster::start(2).await;
    let mut first = cluster.connect(0, "erin").await;
    let mut second = cluster.connect(1, "erin").await;

    let (status, body) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"connection": second.connection_id}, "data": {"only": "second"}}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let targeted: i64 = body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id_of(&second.next_message().await), targeted);

    let both = cluster.send_to_user(0, "erin", json!("both")).await;
    // The first socket's next message is the one for both: it never saw the other.
    assert_eq!(id_of(&first.next_message().await), both);
    assert_eq!(id_of(&second.next_message().await), both);

    let (status, body) = cluster
        .post(
            0,
            "/v1/messages",
            &json!({"to": {"connection": uuid::Uuid::now_v7().to_string()}, "data": 1}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["type"], "urn:pgrelay:problem:connection_not_found");
    first.close().await;
    second.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_message_to_several_users_reaches_each_of_them() {
    let cluster = Cluster::start(2).await;
    let mut frank = cluster.connect(0, "frank").await;
    let mut gina = cluster.connect(1, "gina").await;
    let (status, body) = cluster
        .post(
            1,
            "/v1/messages",
            &json!({"to": {"users": ["frank", "gina", "hank"]}, "data": "all"}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let id: i64 = body["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id_of(&frank.next_message().await), id);
    let frame = gina.next_message().await;
    assert_eq!(id_of(&frame), id);
    assert_eq!(frame["to"], json!({"user": "gina"}));
    // Hank was offline: it waits for him.
    let mut hank = cluster.connect(0, "hank").await;
    assert_eq!(id_of(&hank.next_message().await), id);
    for client in [frank, gina, hank] {
        client.close().await;
    }
    cluster.finish().await;
}

#[tokio::test]
async fn deliveries_and_acks_are_rows_that_answer_audit_questions() {
    let cluster = Cluster::start(2).await;
    let mut ivy = cluster.connect(1, "ivy").await;
    let id = cluster.send_to_user(0, "ivy", json!({"n": 1})).await;
    assert_eq!(id_of(&ivy.next_message().await), id);

    // Delivered, on node b, to this connection.
    let row: (String, String, String) = eventually("the delivery row", || async {
        sqlx::query_as(
            "SELECT connection_id::text, user_id, node_id FROM relay.deliveries WHERE message_id = $1",
        )
        .bind(id)
        .fetch_optional(&cluster.db.pool)
        .await
        .unwrap()
    })
    .await;
    assert_eq!(
        row,
        (
            ivy.connection_id.clone(),
            "ivy".to_owned(),
            cluster.node_id(1)
        )
    );
    let (_, body) = cluster.get(0, &format!("/v1/messages/{id}")).await;
    assert_eq!(body["state"], "delivered");
    assert_eq!(body["deliveries"][0]["acked_at"], Value::Null);

    ivy.send_json(json!({"op": "ack", "id": id.to_string()}))
        .await;
    let body = eventually("the ack", || async {
        let (_, body) = cluster.get(0, &format!("/v1/messages/{id}")).await;
        (body["state"] == "acked").then_some(body)
    })
    .await;
    assert!(body["deliveries"][0]["acked_at"].is_string());

    // An ack for something this connection never got is an error, not a silent drop.
    ivy.send_json(json!({"op": "ack", "id": "999999"})).await;
    let error = ivy.next_frame().await;
    assert_eq!(error["op"], "error");
    assert_eq!(error["code"], "unknown_message");
    ivy.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn registry_rows_appear_with_the_socket_and_go_with_it() {
    let cluster = Cluster::start(2).await;
    let ua = "pgrelay-test/1.0";
    let client = Client::connect(&cluster.ws_url(1, "user=jack"), &[("user-agent", ua)])
        .await
        .unwrap();
    // In the registry before the welcome was sent (Client::connect read it).
    let row: (String, String, String, String, Option<String>) = sqlx::query_as(
        "SELECT node_id, user_id, protocol, remote_addr, user_agent FROM relay.connections WHERE id = $1::uuid",
    )
    .bind(&client.connection_id)
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(row.0, cluster.node_id(1));
    assert_eq!(row.1, "jack");
    assert_eq!(row.2, "pgrelay.v1");
    assert!(row.3.starts_with("127.0.0.1:"), "{}", row.3);
    assert_eq!(row.4.as_deref(), Some(ua));

    let (status, body) = cluster.get(0, "/v1/users/jack/connections").await;
    assert_eq!(status, 200);
    assert_eq!(body["connections"][0]["id"], client.connection_id.as_str());
    assert_eq!(
        body["connections"][0]["node_id"],
        cluster.node_id(1).as_str()
    );

    let id = client.connection_id.clone();
    assert!(
        client.close().await,
        "the server answers a close with a close"
    );
    eventually("the connection row to go", || async {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.connections WHERE id = $1::uuid")
                .bind(&id)
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (count == 0).then_some(())
    })
    .await;
    let (_, body) = cluster.get(0, "/v1/users/jack/connections").await;
    assert_eq!(body["connections"], json!([]));
    cluster.finish().await;
}

#[tokio::test]
async fn a_20_kb_payload_crosses_nodes_intact() {
    let cluster = Cluster::start(2).await;
    let mut kim = cluster.connect(1, "kim").await;
    let big: String = (0..20_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let id = cluster.send_to_user(0, "kim", json!({ "blob": big })).await;
    let frame = kim.next_message().await;
    assert_eq!(id_of(&frame), id);
    assert_eq!(frame["data"]["blob"].as_str().unwrap(), big);
    kim.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn clients_need_a_valid_token_when_auth_is_jwt() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let refused = |result: Result<Client, tokio_tungstenite::tungstenite::Error>| match result {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a bad token was accepted"),
    };
    // No token, a forged one, an expired one, and a user named in the query: all 401.
    assert_eq!(
        refused(Client::connect(&cluster.ws_url(0, "user=lee"), &[]).await),
        401
    );
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "lee", "exp": chrono::Utc::now().timestamp() + 3600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-secret-at-all"),
    )
    .unwrap();
    assert_eq!(
        refused(Client::connect(&cluster.ws_url(0, &format!("token={forged}")), &[]).await),
        401
    );
    let expired = token("lee", json!({"exp": chrono::Utc::now().timestamp() - 3600}));
    assert_eq!(
        refused(Client::connect(&cluster.ws_url(0, &format!("token={expired}")), &[]).await),
        401
    );

    // A good token, in the header or the query, names the user.
    let good = token("lee", json!({}));
    let bearer = format!("Bearer {good}");
    let mut by_header = Client::connect(
        &cluster.ws_url(0, "user=mallory"),
        &[("authorization", &bearer)],
    )
    .await
    .unwrap();
    let mut by_query = Client::connect(&cluster.ws_url(0, &format!("token={good}")), &[])
        .await
        .unwrap();
    let id = cluster.send_to_user(0, "lee", json!("for lee")).await;
    assert_eq!(id_of(&by_header.next_message().await), id);
    assert_eq!(id_of(&by_query.next_message().await), id);
    let (_, body) = cluster.get(0, "/v1/users/mallory/connections").await;
    assert_eq!(
        body["connections"],
        json!([]),
        "identity came from the token, not the query"
    );
    by_header.close().await;
    by_query.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn the_http_api_needs_an_api_key_when_auth_is_jwt() {
    let cluster = Cluster::start_with(1, AuthKind::Jwt, |_, _| {}).await;
    let body = json!({"to": {"user": "nina"}, "data": 1});
    for request in [
        cluster
            .http
            .post(cluster.url(0, "/v1/messages"))
            .json(&body),
        cluster
            .http
            .post(cluster.url(0, "/v1/messages"))
            .json(&body)
            .bearer_auth("wrong-key-0123456789"),
        cluster.http.get(cluster.url(0, "/v1/nodes")),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["status"], 401);
        assert!(!problem["detail"].as_str().unwrap().is_empty());
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    // Health needs no credentials.
    let health = cluster
        .http
        .get(cluster.url(0, "/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let (status, _) = cluster.post(0, "/v1/messages", &body).await;
    assert_eq!(status, 202);
    cluster.finish().await;
}

#[tokio::test]
async fn bad_submissions_get_problem_details() {
    let cluster = Cluster::start(1).await;
    let big = "x".repeat(70_000);
    let cases = [
        (json!({"to": {"user": ""}, "data": 1}), 400, "bad_target"),
        (json!({"to": {"group": "x"}, "data": 1}), 400, "bad_target"),
        (json!({"to": {"user": "a"}}), 400, "missing_data"),
        (
            json!({"to": {"user": "a"}, "data": 1, "ttl_s": 0}),
            400,
            "bad_ttl",
        ),
        (
            json!({"to": {"user": "a"}, "data": 1, "extra": 1}),
            400,
            "bad_json",
        ),
        (json!({"to": {"user": "a"}, "data": big}), 413, "too_large"),
    ];
    for (body, status, code) in cases {
        let (got, problem) = cluster.post(0, "/v1/messages", &body).await;
        assert_eq!(got, status, "{problem}");
        assert_eq!(problem["type"], format!("urn:pgrelay:problem:{code}"));
        assert_eq!(problem["status"], status);
    }
    let response = cluster
        .http
        .post(cluster.url(0, "/v1/messages"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let (status, _) = cluster.get(0, "/v1/messages/123456").await;
    assert_eq!(status, 404);
    let (status, _) = cluster.get(0, "/v1/messages/abc").await;
    assert_eq!(status, 404);
    let (status, _) = cluster.get(0, "/no/such/path").await;
    assert_eq!(status, 404);
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing bad was stored");
    cluster.finish().await;
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_a_flood_of_them_closes_with_1008() {
    let cluster = Cluster::start(1).await;
    let mut olga = cluster.connect(0, "olga").await;
    olga.send_raw(Message::text("not json")).await;
    let error = olga.next_frame().await;
    assert_eq!(error["op"], "error");
    assert_eq!(error["code"], "bad_frame");
    olga.send_json(json!({"op": "dance"})).await;
    assert_eq!(olga.next_frame().await["code"], "bad_frame");
    olga.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(olga.next_frame().await["code"], "bad_frame");
    // Still served.
    let id = cluster.send_to_user(0, "olga", json!(1)).await;
    assert_eq!(id_of(&olga.next_message().await), id);
    for _ in 0..9 {
        olga.send_raw(Message::text("{")).await;
    }
    let close = olga.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert!(close.reason.contains("bad frames"), "{}", close.reason);
    cluster.finish().await;
}

#[tokio::test]
async fn nodes_are_listed_and_a_connection_can_be_disconnected_through_the_api() {
    let cluster = Cluster::start(2).await;
    let (status, body) = cluster.get(0, "/v1/nodes").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![cluster.node_id(0), cluster.node_id(1)]);

    let mut pat = cluster.connect(1, "pat").await;
    let (status, body) = cluster
        .delete(0, &format!("/v1/connections/{}", pat.connection_id))
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["node_id"], cluster.node_id(1).as_str());
    let close = pat.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    let (status, _) = cluster
        .delete(0, &format!("/v1/connections/{}", uuid::Uuid::now_v7()))
        .await;
    assert_eq!(status, 404);
    cluster.finish().await;
}

#[tokio::test]
async fn a_stopping_node_closes_its_sockets_with_1012_and_leaves_the_registry() {
    let mut cluster = Cluster::start(2).await;
    let mut quinn = cluster.connect(1, "quinn").await;
    let node_b = cluster.node_id(1);
    cluster.stop_node(1).await;
    let close = quinn.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    let (nodes, connections): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM relay.nodes WHERE id = $1), (SELECT count(*) FROM relay.connections WHERE node_id = $1)",
    )
    .bind(&node_b)
    .fetch_one(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!((nodes, connections), (0, 0));
    // A message sent now waits for Quinn's next connect, on the node that is left.
    let id = cluster.send_to_user(0, "quinn", json!("later")).await;
    let mut again = cluster.connect(0, "quinn").await;
    assert_eq!(id_of(&again.next_message().await), id);
    again.close().await;
    cluster.finish().await;
}

/// A 202 says where the message's state is read: `Location`, which a
/// replay of the same request names too.
#[tokio::test]
async fn an_accepted_message_has_a_location_to_read_its_state() {
    let cluster = Cluster::start(1).await;
    let http = reqwest::Client::new();
    for expected in [202, 200] {
        let answer = http
            .post(cluster.url(0, "/v1/messages"))
            .header("Idempotency-Key", "where-is-it")
            .json(&json!({"to": {"user": "loc"}, "data": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status().as_u16(), expected);
        let location = answer.headers()["location"].to_str().unwrap().to_owned();
        let (_, body) = response(answer).await;
        assert_eq!(
            location,
            format!("/v1/messages/{}", body["id"].as_str().unwrap())
        );
        let (status, view) = cluster.get(0, &location).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["id"], body["id"]);
    }
    cluster.finish().await;
}

//! Partial failures (G8, G9): nodes that are paused, cut off from the
//! database or starved, rather than killed; slow consumers; answers that
//! must be honest about what was stored. Real processes, real signals, a
//! real PostgreSQL (and a TCP proxy to cut a node off from it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};
use tokio_tungstenite::tungstenite::Message;

use crate::faultkit::*;
use crate::helpers::*;

fn fast_with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    FAST.iter().copied().chain(extra.iter().copied()).collect()
}

async fn scalar_i64(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A WebSocket client whose socket has a tiny receive buffer and that never
/// reads: the server's writes to it stall almost at once.
async fn stalled_client(url: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let parsed = url::Url::parse(url).unwrap();
    let addr = format!("{}:{}", parsed.host_str().unwrap(), parsed.port().unwrap())
        .parse()
        .unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    // The welcome only: after it, this client reads nothing.
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text.contains("welcome") => return ws,
            Some(Ok(_)) => continue,
            other => panic!("no welcome: {other:?}"),
        }
    }
}

/// Every message of `user` and, per message, whether it has a delivery row.
async fn audit(db: &TestDb, user: &str) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT m.id, s.state FROM relay.messages m JOIN relay.message_states s ON s.id = m.id
          WHERE m.stream = 'user:' || $1 ORDER BY m.id",
    )
    .bind(user)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn delivered_to(db: &TestDb, connection: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT message_id FROM relay.deliveries WHERE connection_id = $1::uuid ORDER BY 1",
    )
    .bind(connection)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Reads message ids until a message whose data is "done".
async fn ids_until_done(client: &mut Client) -> Vec<i64> {
    let mut ids = Vec::new();
    loop {
        let frame = client.next_message().await;
        if frame["data"] == "done" {
            return ids;
        }
        ids.push(id_of(&frame));
    }
}

/// A client that stops reading fills its queue (4 messages of 32 KB), falls
/// behind ("lagging": what comes next is dropped from memory, to be read
/// back from its stream), and is then closed as a slow consumer. Everything
/// it was never written must reach the user's next connection, without
/// `since`: nothing routed to it existed only in the closed session's memory.
#[tokio::test]
async fn a_slow_consumer_closed_while_lagging_leaves_nothing_only_in_memory() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.send_queue = 4;
        settings.limits.slow_consumer_timeout = Duration::from_secs(2);
    })
    .await;
    let url = cluster.ws_url(0, "user=sia");
    let stalled = stalled_client(&url).await;
    let connection: String =
        sqlx::query_scalar("SELECT id::text FROM relay.connections WHERE user_id = 'sia'")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
    let filler = "x".repeat(32 * 1024);
    let mut sent = Vec::new();
    for chunk in 0..6 {
        let batch: Vec<Value> = (0..50)
            .map(|n| json!({"to": {"user": "sia"}, "data": {"n": chunk * 50 + n, "fill": filler}}))
            .collect();
        let (status, body) = cluster.post(0, "/v1/messages/batch", &json!(batch)).await;
        assert_eq!(status, 202, "{body}");
        sent.extend(
            body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_str().unwrap().parse::<i64>().unwrap()),
        );
    }
    eventually(
        "the slow consumer to be closed and deregistered",
        || async {
            let rows = scalar_i64(
                &cluster.db,
                "SELECT count(*) FROM relay.connections WHERE user_id = 'sia'",
            )
            .await;
            (rows == 0).then_some(())
        },
    )
    .await;
    drop(stalled);

    let mut again = cluster.connect(0, "sia").await;
    cluster.send_to_user(0, "sia", json!("done")).await;
    let received = ids_until_done(&mut again).await;
    let written = delivered_to(&cluster.db, &connection).await;
    let missing: Vec<i64> = sent
        .iter()
        .copied()
        .filter(|id| !received.contains(id) && !written.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} messages were never written to any socket and not delivered on reconnect: {missing:?}",
        missing.len(),
        sent.len()
    );
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "in order: {received:?}"
    );
    // The audit agrees: nothing stays pending.
    eventually("every message to read delivered", || async {
        let pending: Vec<i64> = audit(&cluster.db, "sia")
            .await
            .into_iter()
            .filter(|(_, state)| state == "pending")
            .map(|(id, _)| id)
            .collect();
        pending.is_empty().then_some(())
    })
    .await;
    again.close().await;
    cluster.finish().await;
}

/// kill -9 of a node whose session holds messages it has not written (its
/// queue, and what it dropped while lagging): after the node is reaped the
/// user's next connection, on another node and without `since`, gets every
/// one of them, and no message stays `pending` for ever.
#[tokio::test]
async fn kill_9_with_messages_in_a_session_loses_none_of_them() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let a = NodeProcess::start(&db.url, "mail-a", &FAST).await;
    let b = NodeProcess::start(
        &db.url,
        "mail-b",
        &fast_with(&["--send-queue", "16", "--slow-consumer-timeout", "1m"]),
    )
    .await;
    let stalled = stalled_client(&b.ws_url("user=tam")).await;
    let connection: String =
        sqlx::query_scalar("SELECT id::text FROM relay.connections WHERE user_id = 'tam'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let filler = "y".repeat(32 * 1024);
    let mut sent = Vec::new();
    for chunk in 0..6 {
        let batch: Vec<Value> = (0..50)
            .map(|n| json!({"to": {"user": "tam"}, "data": {"n": chunk * 50 + n, "fill": filler}}))
            .collect();
        let (status, body) = response(
            http.post(a.url("/v1/messages/batch"))
                .json(&batch)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        sent.extend(
            body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_str().unwrap().parse::<i64>().unwrap()),
        );
    }
    // The node has taken all of it from the outbox (it sits in the session,
    // or was dropped from its queue), and its writes are stuck.
    eventually("mail-b to have claimed its work", || async {
        let unclaimed = scalar_i64(
            &db,
            "SELECT count(*) FROM relay.outbox WHERE node_id = 'mail-b' AND claimed_at IS NULL",
        )
        .await;
        (unclaimed == 0).then_some(())
    })
    .await;
    b.kill().await;
    drop(stalled);
    eventually("mail-b to be reaped", || async {
        let rows = scalar_i64(&db, "SELECT count(*) FROM relay.nodes WHERE id = 'mail-b'").await;
        (rows == 0).then_some(())
    })
    .await;

    let mut again = Client::connect(&a.ws_url("user=tam"), &[]).await.unwrap();
    let (status, _) = response(
        http.post(a.url("/v1/messages"))
            .json(&json!({"to": {"user": "tam"}, "data": "done"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 202);
    let received = ids_until_done(&mut again).await;
    let written: Vec<i64> = sqlx::query_scalar(
        "SELECT message_id FROM relay.deliveries WHERE connection_id = $1::uuid",
    )
    .bind(&connection)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let missing: Vec<i64> = sent
        .iter()
        .copied()
        .filter(|id| !received.contains(id) && !written.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} lost with the killed node's memory: {missing:?}",
        missing.len(),
        sent.len()
    );
    eventually("no message left pending", || async {
        let pending = audit(&db, "tam")
            .await
            .into_iter()
            .filter(|(_, state)| state == "pending")
            .count();
        (pending == 0).then_some(())
    })
    .await;
    again.close().await;
    assert_eq!(a.terminate().await, Some(0));
    db.drop_database().await;
}

/// A submission that gives up (its stream is held by an application
/// transaction longer than a submission may wait) answers 503 "not stored";
/// once the transaction ends, the message must still not exist. The same
/// for a WebSocket publish and a STOMP SEND.
#[tokio::test]
async fn an_answer_that_says_not_stored_is_never_followed_by_the_message() {
    let cluster = Cluster::start(1).await;
    let mut holder = PgConnection::connect(&cluster.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT relay.send_to_user('hot', '\"held\"')")
        .execute(&mut holder)
        .await
        .unwrap();
    sqlx::query("SELECT relay.publish('hot.topic', '\"held\"')")
        .execute(&mut holder)
        .await
        .unwrap();

    // The three at once: HTTP, a WebSocket publish, a STOMP SEND with a
    // receipt. Each gives up after the submission timeout.
    let http = async {
        let started = Instant::now();
        let (status, body) = cluster
            .post(
                0,
                "/v1/messages",
                &json!({"to": {"user": "hot"}, "data": "http-refused"}),
            )
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status, 503, "{body}");
    };
    let ws = async {
        let mut publisher = cluster.connect(0, "pub").await;
        publisher
            .send_json(json!({"op": "publish", "topic": "hot.topic", "data": "ws-refused"}))
            .await;
        let answer = publisher.next_frame().await;
        assert_eq!(answer["op"], "error", "{answer}");
        assert_eq!(answer["code"], "unavailable", "{answer}");
    };
    let stomp = async {
        let (mut stomp, connected) =
            StompClient::connect(&cluster.ws_url(0, "user=sender"), &[("login", "sender")]).await;
        assert_eq!(connected.command, "CONNECTED");
        stomp
            .send(
                "SEND",
                &[("destination", "/topic/hot.topic"), ("receipt", "r1")],
                b"\"stomp-refused\"",
            )
            .await;
        let answer = stomp.next().await;
        assert_eq!(answer.command, "ERROR", "{answer:?}");
    };
    tokio::join!(http, ws, stomp);

    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    // Whatever was still queued or in flight has had ample time to commit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored: Vec<Value> = sqlx::query_scalar(
        "SELECT coalesce(data, to_jsonb(convert_from(body, 'UTF8'))) FROM relay.messages
          WHERE data::text LIKE '%refused%' OR convert_from(body, 'UTF8') LIKE '%refused%'",
    )
    .fetch_all(&cluster.db.pool)
    .await
    .unwrap();
    assert!(
        stored.is_empty(),
        "answered \"not stored\", yet stored: {stored:?}"
    );
    cluster.finish().await;
}

/// The STOMP handshake has a deadline from accept: a socket that keeps
/// sending heart-beat newlines but never CONNECT is closed anyway.
#[tokio::test]
async fn a_stomp_client_that_never_connects_is_closed_whatever_it_sends() {
    let cluster = Cluster::start(1).await;
    let mut stomp = StompClient::open(&cluster.ws_url(0, "")).await;
    let opened = Instant::now();
    let closed = within(Duration::from_secs(20), async {
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => stomp.send_raw(b"\n").await,
                code = stomp.closed() => return code,
            }
        }
    })
    .await;
    let after = opened.elapsed();
    eprintln!("a STOMP socket without CONNECT closed after {after:?} ({closed:?})");
    assert!(after < Duration::from_secs(12), "{after:?}");
    cluster.finish().await;
}

/// An application transaction holds a user's stream while 40 submissions to
/// that user wait: the node keeps heartbeating, `/readyz` answers at once,
/// and submissions to other users still succeed.
#[tokio::test]
async fn a_held_stream_under_forty_submissions_does_not_starve_the_node() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.db_pool_size = 16;
        settings.heartbeat_interval = Duration::from_millis(200);
        settings.node_timeout = Duration::from_secs(1);
    })
    .await;
    let mut holder = PgConnection::connect(&cluster.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT relay.send_to_user('hot', '\"held\"')")
        .execute(&mut holder)
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for n in 0..40 {
        let http = cluster.http.clone();
        let url = cluster.url(0, "/v1/messages");
        waiting.push(tokio::spawn(async move {
            let body = json!({"to": {"user": "hot"}, "data": n});
            response(http.post(url).json(&body).send().await.unwrap()).await
        }));
    }
    // While they wait.
    let until = Instant::now() + Duration::from_secs(4);
    let mut others = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let (status, body) = response(
            cluster
                .http
                .get(cluster.url(0, "/readyz"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(took < Duration::from_millis(100), "/readyz took {took:?}");
        let (status, body) = cluster
            .post(
                0,
                "/v1/messages",
                &json!({"to": {"user": format!("cool{others}")}, "data": 1}),
            )
            .await;
        assert_eq!(status, 202, "another user's message: {body}");
        others += 1;
        let fresh = scalar_i64(
            &cluster.db,
            "SELECT count(*) FROM relay.nodes WHERE last_seen_at > now() - interval '600 ms'",
        )
        .await;
        assert_eq!(fresh, 1, "the node's heartbeat fell behind");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    for answer in waiting {
        let (status, body) = answer.await.unwrap();
        assert!(status == 202 || status == 503, "{status} {body}");
    }
    cluster.finish().await;
}

/// The sweeper is paused (SIGSTOP) past the node timeout: another node takes
/// the role within the node timeout plus a sweep interval, and reaps a node
/// killed meanwhile. When the old sweeper resumes, it sweeps no more.
#[tokio::test]
async fn a_paused_sweeper_hands_over_and_reaping_goes_on() {
    let db = TestDb::new().await;
    let mut nodes = Vec::new();
    for name in ["lease-a", "lease-b", "lease-c"] {
        nodes.push(NodeProcess::start(&db.url, name, &FAST).await);
    }
    let sweeper: String = eventually("a sweeper", || async {
        sqlx::query_scalar("SELECT node_id FROM relay.sweeper WHERE last_run_at IS NOT NULL")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    let paused = nodes.remove(nodes.iter().position(|n| n.node_id == sweeper).unwrap());
    pause(paused.pid());
    let paused_at = Instant::now();
    let victim = nodes.pop().unwrap();
    let victim_id = victim.node_id.clone();
    victim.kill().await;

    let successor: String = eventually("another sweeper", || async {
        let node: Option<String> =
            sqlx::query_scalar("SELECT node_id FROM relay.sweeper WHERE last_run_at IS NOT NULL")
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        node.filter(|n| *n != sweeper)
    })
    .await;
    let handed_over = paused_at.elapsed();
    eprintln!("sweeper paused → {successor} sweeps: {handed_over:?}");
    // node timeout 2 s + one sweep interval 500 ms, and some slack.
    assert!(handed_over < Duration::from_secs(4), "{handed_over:?}");
    eventually("the killed node to be reaped", || async {
        let rows = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM relay.nodes WHERE id = $1")
            .bind(&victim_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        (rows == 0).then_some(())
    })
    .await;

    resume(paused.pid());
    // Resumed, it finds it was declared dead, registers again, and does not
    // sweep: the successor keeps the role.
    eventually("the old sweeper to register again", || async {
        let rows = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM relay.nodes WHERE id = $1 AND last_seen_at > now() - interval '1 s'",
        )
        .bind(&sweeper)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (rows == 1).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holder: String = sqlx::query_scalar("SELECT node_id FROM relay.sweeper")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(holder, successor);
    let sweeps_after = paused
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "this node is now the sweeper")
        .count();
    assert_eq!(
        sweeps_after, 1,
        "the old sweeper did not take the role back"
    );
    assert_eq!(paused.terminate().await, Some(0));
    for node in nodes {
        assert_eq!(node.terminate().await, Some(0));
    }
    db.drop_database().await;
}

/// Two nodes are dead; one of them has a row held by a transaction that
/// does not end (a stuck claim). One sweep reaps the other one anyway, and
/// does not hang on the stuck one.
#[tokio::test]
async fn one_stuck_transaction_does_not_stop_the_reaping_of_other_nodes() {
    let db = TestDb::new().await;
    for node in ["dead-x", "dead-y"] {
        sqlx::query(
            "INSERT INTO relay.nodes (id, incarnation, version, last_seen_at)
             VALUES ($1, gen_random_uuid(), 'test', now() - interval '1 hour')",
        )
        .bind(node)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO relay.connections (id, node_id, user_id, protocol) VALUES (gen_random_uuid(), $1, $1, 'json')",
        )
        .bind(node)
        .execute(&db.pool)
        .await
        .unwrap();
        sqlx::query("SELECT relay.send_to_user($1, '\"routed\"')")
            .bind(node)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let mut stuck = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut stuck).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.outbox WHERE node_id = 'dead-x' FOR UPDATE")
        .execute(&mut stuck)
        .await
        .unwrap();

    let node = pgrelay::node::prepare(settings(&db, AuthKind::None, 0))
        .await
        .unwrap();
    let started = Instant::now();
    let report = within(
        Duration::from_secs(8),
        pgrelay::sweeper::sweep_once(&node.state, Some(Duration::from_secs(2))),
    )
    .await;
    eprintln!(
        "sweep with a stuck node: {:?} in {:?}",
        report,
        started.elapsed()
    );
    let remaining: Vec<String> =
        sqlx::query_scalar("SELECT id FROM relay.nodes WHERE id LIKE 'dead-%'")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(
        !remaining.contains(&"dead-y".to_owned()),
        "dead-y was not reaped: {remaining:?}"
    );
    // dead-y's user gets its message on connect.
    let parked = scalar_i64(
        &db,
        "SELECT count(*) FROM relay.outbox WHERE node_id IS NULL AND user_id = 'dead-y'",
    )
    .await;
    assert_eq!(parked, 1);
    sqlx::query("ROLLBACK").execute(&mut stuck).await.unwrap();
    node.state.db.pool.close().await;
    db.drop_database().await;
}

/// Runs traffic to users whose clients resume with `since`, applies `fault`
/// to the third node, and checks that nothing was lost, that every
/// connection saw its ids in order, and that the node healed: it is
/// registered again and a client connected to it gets its messages.
async fn under_traffic(
    name: &str,
    fault: impl AsyncFnOnce(&NodeProcess, &TestDb),
    cut_off: Option<&Proxy>,
    on_the_sweeper: bool,
    db: &TestDb,
) {
    let mut nodes = Vec::new();
    for suffix in ["a", "b"] {
        nodes.push(NodeProcess::start(&db.url, &format!("{name}-{suffix}"), &FAST).await);
    }
    let url_c = cut_off.map_or(db.url.clone(), |proxy| proxy.url_for(&db.url));
    nodes.push(NodeProcess::start(&url_c, &format!("{name}-c"), &FAST).await);
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>(),
    ));
    let users: Vec<String> = (0..6).map(|n| format!("{name}-u{n}")).collect();
    let clients: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(index, user)| {
            resuming_client(
                user.clone(),
                addrs.clone(),
                Duration::from_millis(1500),
                index,
            )
        })
        .collect();
    let traffic = Traffic::start(addrs.clone(), users.clone(), Duration::from_millis(3));
    traffic.flows(300).await;
    // The node the fault hits: the third (the one behind the proxy), or the
    // sweeper.
    let target = if on_the_sweeper {
        let sweeper: String = eventually("a sweeper", || async {
            sqlx::query_scalar("SELECT node_id FROM relay.sweeper WHERE last_run_at IS NOT NULL")
                .fetch_optional(&db.pool)
                .await
                .unwrap()
        })
        .await;
        nodes.iter().position(|n| n.node_id == sweeper).unwrap()
    } else {
        2
    };
    let other = (target + 1) % nodes.len();

    let started = Instant::now();
    fault(&nodes[target], db).await;
    eprintln!(
        "{name}: fault applied and lifted in {:?}",
        started.elapsed()
    );

    // Healed: registered again, and routable: a client on it gets messages.
    let healed = Instant::now();
    let node_c = nodes[target].node_id.clone();
    eventually("the node to be registered again", || async {
        let rows = sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM relay.nodes WHERE id = $1 AND last_seen_at > now() - interval '1 s'",
        )
        .bind(&node_c)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (rows == 1).then_some(())
    })
    .await;
    let probe_user = format!("{name}-probe");
    let probe_id = eventually("a socket on the healed node to be routable", || {
        let (url, probe_user) = (
            nodes[target].ws_url(&format!("user={probe_user}")),
            probe_user.clone(),
        );
        let http = reqwest::Client::new();
        let send_url = nodes[other].url("/v1/messages");
        async move {
            let mut probe = Client::connect(&url, &[]).await.ok()?;
            let (status, body) = response(
                http.post(send_url)
                    .json(&json!({"to": {"user": probe_user}, "data": "probe"}))
                    .send()
                    .await
                    .ok()?,
            )
            .await;
            if status != 202 {
                return None;
            }
            let id: i64 = body["id"].as_str()?.parse().ok()?;
            let frame = tokio::time::timeout(Duration::from_secs(2), probe.next_frame())
                .await
                .ok()?;
            (frame["op"] == "message" && id_of(&frame) == id).then_some(id)
        }
    })
    .await;
    eprintln!(
        "{name}: routable again {:?} after the fault ended (probe message {probe_id})",
        healed.elapsed()
    );

    // Every socket the healed node keeps open is in the registry: its open
    // connections (its own gauge) match its rows.
    let metrics_url = nodes[target].url("/metrics");
    eventually(
        "the healed node's sockets to match its registry rows",
        || {
            let (metrics_url, node_c) = (metrics_url.clone(), node_c.clone());
            async move {
                let text = reqwest::get(metrics_url).await.ok()?.text().await.ok()?;
                let open: f64 = text
                    .lines()
                    .filter(|l| l.starts_with("pgrelay_connections{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                let rows = sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM relay.connections WHERE node_id = $1",
                )
                .bind(&node_c)
                .fetch_one(&db.pool)
                .await
                .ok()?;
                (open as i64 == rows).then_some(())
            }
        },
    )
    .await;

    traffic.flows(300).await;
    let (accepted, unknown) = traffic.stop().await;
    let http = reqwest::Client::new();
    for user in &users {
        let (status, _) = response(
            http.post(nodes[0].url("/v1/messages"))
                .json(&json!({"to": {"user": user}, "data": "done"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 202);
    }
    let mut received = HashMap::new();
    for (user, client) in users.iter().zip(clients) {
        let connections = within(Duration::from_secs(60), client).await.unwrap();
        received.insert(user.clone(), connections);
    }
    let duplicates = assert_nothing_lost(&accepted, &received);
    let reconnects: usize = received.values().map(|c| c.len() - 1).sum();
    eprintln!(
        "{name}: {} accepted, {unknown} outcome unknown, {duplicates} duplicates, {reconnects} reconnects",
        accepted.len()
    );
    for node in nodes {
        assert_eq!(
            node.terminate().await,
            Some(0),
            "a clean stop after healing"
        );
    }
}

/// SIGSTOP of a node (not the sweeper) for three node timeouts under 300
/// msg/s, then SIGCONT: its claims in flight are fenced, its work reaches
/// its users elsewhere, nothing is lost or reordered, and it heals.
#[tokio::test]
async fn a_node_paused_past_the_timeout_loses_nothing_and_heals() {
    let db = TestDb::new().await;
    under_traffic(
        "pause",
        async |node, _db| {
            pause(node.pid());
            tokio::time::sleep(Duration::from_secs(6)).await;
            resume(node.pid());
        },
        None,
        false,
        &db,
    )
    .await;
    db.drop_database().await;
}

/// The same with the sweeper paused: the lease passes to another node, which
/// reaps the paused one; resumed, the former sweeper heals and sweeps no more.
#[tokio::test]
async fn the_sweeper_paused_past_the_timeout_under_traffic_loses_nothing_and_heals() {
    let db = TestDb::new().await;
    under_traffic(
        "sweep",
        async |node, db| {
            pause(node.pid());
            let paused = node.node_id.clone();
            eventually("another node to take the sweeper's lease", || async {
                let holder: Option<String> = sqlx::query_scalar(
                    "SELECT node_id FROM relay.sweeper WHERE lease_until > now()",
                )
                .fetch_optional(&db.pool)
                .await
                .unwrap();
                holder.filter(|h| *h != paused)
            })
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            resume(node.pid());
        },
        None,
        true,
        &db,
    )
    .await;
    db.drop_database().await;
}

/// The same, but the node keeps running while its database connections
/// hang (a network cut between it and PostgreSQL, neither side closing).
#[tokio::test]
async fn a_node_cut_off_from_the_database_is_fenced_and_heals() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(server_addr(&db.url)).await;
    under_traffic(
        "cut",
        async |_node, _db| {
            proxy.cut();
            tokio::time::sleep(Duration::from_secs(6)).await;
            proxy.heal();
        },
        Some(&proxy),
        false,
        &db,
    )
    .await;
    db.drop_database().await;
}

/// `/readyz` answers from what the node knows, within 100 ms, also while
/// its database connections hang.
#[tokio::test]
async fn readyz_answers_at_once_while_the_database_hangs() {
    let db = TestDb::new().await;
    let proxy = Proxy::start(server_addr(&db.url)).await;
    let node = NodeProcess::start(&proxy.url_for(&db.url), "ready-a", &FAST).await;
    let http = reqwest::Client::new();
    let probe = || async {
        let started = Instant::now();
        let answer = http
            .get(node.url("/readyz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .unwrap();
        (answer.status().as_u16(), started.elapsed())
    };
    // Ready once its LISTEN connection is up; the first requests also open
    // the HTTP connection that the rest reuse.
    eventually("ready", || async {
        let (status, _) = probe().await;
        (status == 200).then_some(())
    })
    .await;
    let (status, took) = probe().await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(100), "{took:?}");
    proxy.cut();
    let mut saw_not_ready = false;
    for _ in 0..30 {
        let (status, took) = probe().await;
        assert!(took < Duration::from_millis(100), "/readyz took {took:?}");
        if status == 503 {
            saw_not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_not_ready, "never said not ready while cut off");
    proxy.heal();
    eventually("ready again", || async {
        let (status, _) = probe().await;
        (status == 200).then_some(())
    })
    .await;
    assert_eq!(node.terminate().await, Some(0));
    db.drop_database().await;
}

/// A registry row whose session does not exist (an attach whose caller gave
/// up after the server committed it) is removed within a heartbeat or two.
#[tokio::test]
async fn a_connection_row_without_a_session_is_removed() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let live = cluster.connect(0, "kept").await;
    sqlx::query(
        "INSERT INTO relay.connections (id, node_id, user_id, protocol) VALUES (gen_random_uuid(), $1, 'ghost', 'json')",
    )
    .bind(cluster.node_id(0))
    .execute(&cluster.db.pool)
    .await
    .unwrap();
    let started = Instant::now();
    eventually("the ghost row to go", || async {
        let rows = scalar_i64(
            &cluster.db,
            "SELECT count(*) FROM relay.connections WHERE user_id = 'ghost'",
        )
        .await;
        (rows == 0).then_some(())
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let kept = scalar_i64(
        &cluster.db,
        "SELECT count(*) FROM relay.connections WHERE user_id = 'kept'",
    )
    .await;
    assert_eq!(kept, 1, "a live session's row stays");
    live.close().await;
    cluster.finish().await;
}

/// The sweeper prunes `relay.streams` rows that keep nothing: no message
/// within retention, no connection, no subscription. Active streams stay.
#[tokio::test]
async fn stream_rows_with_nothing_to_keep_are_pruned() {
    let cluster = Cluster::start(1).await;
    let db = &cluster.db;
    sqlx::query(
        "INSERT INTO relay.streams (stream, head) SELECT 'user:gone' || g, 1 FROM generate_series(1, 3000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let _online = cluster.connect(0, "online").await;
    let kept = cluster.send_to_user(0, "kept", json!("stays")).await;
    for _ in 0..10 {
        sweep_now(&cluster).await;
    }
    let left: Vec<String> = sqlx::query_scalar("SELECT stream FROM relay.streams ORDER BY 1")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert!(
        left.iter().all(|s| !s.starts_with("user:gone")),
        "{} stale rows left",
        left.iter().filter(|s| s.starts_with("user:gone")).count()
    );
    assert!(left.contains(&"user:online".to_owned()), "{left:?}");
    assert!(left.contains(&"user:kept".to_owned()), "{left:?}");
    // The pruned stream works as before when it comes back.
    let mut back = cluster.connect(0, "gone7").await;
    let id = cluster.send_to_user(0, "gone7", json!("again")).await;
    assert!(id > kept);
    assert_eq!(id_of(&back.next_message().await), id);
    back.close().await;
    cluster.finish().await;
}

/// Once a node is reaped, nothing it still does under the old incarnation
/// commits: its next claim fails in the same transaction (and the node
/// registers again), and so does an attach.
#[tokio::test]
async fn a_reaped_node_can_commit_nothing_under_its_old_incarnation() {
    let db = TestDb::new().await;
    let node = pgrelay::node::prepare(settings(&db, AuthKind::None, 0))
        .await
        .unwrap();
    let ctx = node.state.clone();
    sqlx::query(
        "INSERT INTO relay.connections (id, node_id, user_id, protocol) VALUES (gen_random_uuid(), 'node-a', 'uma', 'json')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("SELECT relay.send_to_user('uma', '\"before\"')")
        .execute(&db.pool)
        .await
        .unwrap();
    // Declared dead: what the sweeper does.
    sqlx::query(
        "UPDATE relay.nodes SET last_seen_at = now() - interval '1 hour' WHERE id = 'node-a'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let sweeper = pgrelay::node::prepare(settings(&db, AuthKind::None, 1))
        .await
        .unwrap();
    pgrelay::sweeper::sweep_once(&sweeper.state, Some(Duration::from_secs(60)))
        .await
        .unwrap();
    let claimed = pgrelay::read::claimer::claim_once(&ctx).await;
    assert!(
        matches!(claimed, Err(pgrelay::db::WorkError::Fenced)),
        "a claim under the old incarnation: {claimed:?}"
    );
    // Its work went back to its user, parked.
    let parked = scalar_i64(
        &db,
        "SELECT count(*) FROM relay.outbox WHERE node_id IS NULL AND user_id = 'uma'",
    )
    .await;
    assert_eq!(parked, 1);
    let attached = pgrelay::registry::connections::attach(
        &ctx.db.pool,
        &pgrelay::registry::connections::NewConnection {
            id: uuid::Uuid::now_v7(),
            node_id: &ctx.node_id,
            incarnation: ctx.incarnation(),
            user_id: "uma",
            protocol: "pgrelay.v1",
            remote_addr: "127.0.0.1:1",
            user_agent: None,
            max_per_user: 10,
        },
        Duration::from_secs(1),
    )
    .await;
    assert!(
        matches!(
            attached,
            Err(pgrelay::registry::connections::AttachError::Fenced)
        ),
        "an attach under the old incarnation: {attached:?}"
    );
    ctx.db.pool.close().await;
    db.drop_database().await;
}

/// A node paused (SIGSTOP) in the middle of a claim: its claim statement
/// has taken rows and answered, but the node never commits. The reaper does
/// not wait for it for ever, nor take the rows from under it: the server
/// ends the idle transaction, and the next sweep reaps the node and parks
/// its work. The user, resuming elsewhere with `since`, gets every message
/// in order; the node, resumed, cannot commit what it had claimed, and heals.
#[tokio::test]
async fn a_node_paused_inside_a_claim_is_fenced_and_loses_nothing() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let a = NodeProcess::start(&db.url, "inside-a", &FAST).await;
    let c = NodeProcess::start(&db.url, "inside-c", &FAST).await;
    let mut zed = Client::connect(&c.ws_url("user=zed"), &[]).await.unwrap();
    let send = |data: Value| {
        let http = http.clone();
        let url = a.url("/v1/messages");
        async move {
            let (status, body) = response(
                http.post(url)
                    .json(&json!({"to": {"user": "zed"}, "data": data}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_eq!(status, 202, "{body}");
            body["id"].as_str().unwrap().parse::<i64>().unwrap()
        }
    };
    let first = send(json!(0)).await;
    assert_eq!(id_of(&zed.next_message().await), first);

    // Keep inside-c from claiming for a moment (its claims wait for its own
    // row), while five messages are routed to it and the third one's outbox
    // row is locked: its claim then takes the first two rows and waits for
    // the third, inside its transaction.
    let mut node_row = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut node_row).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.nodes WHERE id = 'inside-c' FOR UPDATE")
        .execute(&mut node_row)
        .await
        .unwrap();
    let mut routed = Vec::new();
    for n in 1..=5 {
        routed.push(send(json!(n)).await);
    }
    let mut third = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut third).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.outbox WHERE message_id = $1 FOR UPDATE")
        .bind(routed[2])
        .execute(&mut third)
        .await
        .unwrap();
    sqlx::query("ROLLBACK")
        .execute(&mut node_row)
        .await
        .unwrap();
    eventually("inside-c's claim to wait for the third row", || async {
        let waiting = scalar_i64(
            &db,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                AND application_name LIKE 'pgrelay inside-c%' AND wait_event_type = 'Lock'",
        )
        .await;
        (waiting == 1).then_some(())
    })
    .await;
    // Frozen there; its claim goes on in the server, takes every row, and
    // waits for a COMMIT that does not come.
    pause(c.pid());
    let paused = Instant::now();
    sqlx::query("ROLLBACK").execute(&mut third).await.unwrap();
    let after = send(json!("after")).await;
    drop(zed);

    eventually("inside-c to be reaped", || async {
        let rows = scalar_i64(
            &db,
            "SELECT count(*) FROM relay.nodes WHERE id = 'inside-c'",
        )
        .await;
        (rows == 0).then_some(())
    })
    .await;
    eprintln!("paused inside a claim → reaped: {:?}", paused.elapsed());
    let mut resumed = Client::connect(&a.ws_url(&format!("user=zed&since={first}")), &[])
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.last() != Some(&after) {
        got.push(id_of(&resumed.next_message().await));
    }
    let mut expected = routed.clone();
    expected.push(after);
    assert_eq!(got, expected, "every message, in order");

    resume(c.pid());
    eventually("inside-c to register again", || async {
        let rows = scalar_i64(
            &db,
            "SELECT count(*) FROM relay.nodes WHERE id = 'inside-c' AND last_seen_at > now() - interval '1 s'",
        )
        .await;
        (rows == 1).then_some(())
    })
    .await;
    // Nothing it had claimed stays claimed, nothing stays pending.
    eventually("nothing left of the old claim", || async {
        let claimed = scalar_i64(
            &db,
            "SELECT count(*) FROM relay.outbox WHERE claimed_at IS NOT NULL",
        )
        .await;
        let pending = audit(&db, "zed")
            .await
            .into_iter()
            .filter(|(_, state)| state == "pending")
            .count();
        (claimed == 0 && pending == 0).then_some(())
    })
    .await;
    resumed.close().await;
    assert_eq!(c.terminate().await, Some(0));
    assert_eq!(a.terminate().await, Some(0));
    db.drop_database().await;
}

/// The connection breaks while COMMIT is being processed (here: the server
/// ends the backend during a slow deferred trigger). The answer must not say
/// "not stored": it says the outcome is unknown (504, outcome-unknown), and a
/// retry with the same Idempotency-Key stores the message exactly once.
#[tokio::test]
async fn a_commit_whose_answer_is_lost_says_outcome_unknown() {
    let cluster = Cluster::start(1).await;
    let db = &cluster.db;
    sqlx::raw_sql(
        "CREATE TABLE public.slow_commits (armed boolean);
         INSERT INTO public.slow_commits VALUES (true);
         CREATE FUNCTION public.slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.data::text LIKE '%slow-commit%' AND EXISTS (SELECT 1 FROM public.slow_commits) THEN
                 PERFORM pg_sleep(3);
             END IF;
             RETURN NULL;
         END $$;
         CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON relay.messages
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.slow_commit();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let body = json!({"to": {"user": "una"}, "data": "slow-commit"});
    let post = || {
        cluster
            .http
            .post(cluster.url(0, "/v1/messages"))
            .header("Idempotency-Key", "k-1")
            .json(&body)
            .send()
    };
    let first = tokio::spawn(post());
    // The commit is under way, in the trigger: its backend goes.
    let pid: i32 = eventually("a commit in the slow trigger", || async {
        sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                AND wait_event = 'PgSleep' AND query = 'COMMIT'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    })
    .await;
    sqlx::query("DELETE FROM public.slow_commits")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&db.pool)
        .await
        .unwrap();
    let (status, problem) = response(first.await.unwrap().unwrap()).await;
    assert_eq!(status, 504, "{problem}");
    assert_eq!(problem["type"], "urn:pgrelay:problem:outcome-unknown");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("same Idempotency-Key"),
        "{problem}"
    );
    let (status, stored) = response(post().await.unwrap()).await;
    assert!(status == 202 || status == 200, "{status} {stored}");
    let copies = scalar_i64(
        db,
        "SELECT count(*) FROM relay.messages WHERE data::text LIKE '%slow-commit%'",
    )
    .await;
    assert_eq!(copies, 1, "stored exactly once");
    cluster.finish().await;
}

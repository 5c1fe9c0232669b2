//! Liveness and faults (G6): heartbeats, the sweeper, dead nodes, database
//! outages and restarts, with real `pgrelay serve` processes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::tools::pgtemp::{self, TempPostgres};
use serde_json::{Value, json};
use sqlx::Connection;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

async fn post(http: &reqwest::Client, node: &NodeProcess, body: Value) -> (u16, Value) {
    response(
        http.post(node.url("/v1/messages"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn send(http: &reqwest::Client, node: &NodeProcess, user: &str, data: Value) -> i64 {
    let (status, body) = post(http, node, json!({"to": {"user": user}, "data": data})).await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().parse().unwrap()
}

async fn count(db: &TestDb, sql: &str, node: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(node)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_killed_node_is_reaped_within_the_timeout_and_its_users_get_their_messages_elsewhere() {
    let db = TestDb::new().await;
    let http = reqwest::Client::new();
    let a = NodeProcess::start(&db.url, "kill-a", &FAST).await;
    let b = NodeProcess::start(&db.url, "kill-b", &FAST).await;
    let mut mia = Client::connect(&b.ws_url("user=mia"), &[]).await.unwrap();
    let seen = send(&http, &a, "mia", json!("before")).await;
    assert_eq!(id_of(&mia.next_message().await), seen);
    // Recorded as delivered (killed before that, kill-b would leave it to
    // be delivered again: at least once).
    eventually("the delivery row", || async {
        (count(
            &db,
            "SELECT count(*) FROM relay.deliveries WHERE node_id = $1",
            "kill-b",
        )
        .await
            == 1)
            .then_some(())
    })
    .await;

    b.kill().await;
    let killed = Instant::now();
    // Routed to the dead node's connection: not lost.
    let during = send(&http, &a, "mia", json!("while dead")).await;
    eventually("kill-b to be reaped", || async {
        let rows = count(
            &db,
            "SELECT (SELECT count(*) FROM relay.nodes WHERE id = $1) + (SELECT count(*) FROM relay.connections WHERE node_id = $1)",
            "kill-b",
        )
        .await;
        (rows == 0).then_some(())
    })
    .await;
    let reaped_after = killed.elapsed();
    eprintln!("kill -9 → rows reaped: {reaped_after:?}");
    // node_timeout 2 s + one sweep interval 500 ms, and a little for the machine.
    assert!(
        reaped_after < Duration::from_millis(4000),
        "{reaped_after:?}"
    );
    let (_, nodes) = response(http.get(a.url("/v1/nodes")).send().await.unwrap()).await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);

    let after = send(&http, &a, "mia", json!("after")).await;
    // Reconnecting without a cursor: what was never delivered was parked.
    let mut again = Client::connect(&a.ws_url("user=mia"), &[]).await.unwrap();
    assert_eq!(again.message_ids(2).await, vec![during, after]);
    // And with its cursor, the same, from the stream.
    let mut resumed = Client::connect(&a.ws_url(&format!("user=mia&since={seen}")), &[])
        .await
        .unwrap();
    assert_eq!(resumed.message_ids(2).await, vec![during, after]);
    drop(mia);
    assert_eq!(a.terminate().await, Some(0));
    db.drop_database().await;
}

#[tokio::test]
async fn exactly_one_sweeper_runs_and_another_takes_over_when_it_dies() {
    let db = TestDb::new().await;
    let mut nodes = Vec::new();
    for name in ["sweep-a", "sweep-b", "sweep-c"] {
        nodes.push(NodeProcess::start(&db.url, name, &FAST).await);
    }
    let first: String = eventually("a sweeper", || async {
        sqlx::query_scalar("SELECT node_id FROM relay.sweeper WHERE last_run_at IS NOT NULL")
            .fetch_optional(&db.pool)
            .await
            .unwrap()
    })
    .await;
    // A few sweep intervals later, still one sweeper: the same one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let announced = |nodes: &[NodeProcess]| -> Vec<String> {
        nodes
            .iter()
            .filter(|n| {
                n.log_lines()
                    .iter()
                    .any(|l| l["message"] == "this node is now the sweeper")
            })
            .map(|n| n.node_id.clone())
            .collect()
    };
    assert_eq!(
        announced(&nodes),
        vec![first.clone()],
        "one node says it sweeps, and it is the one in relay.sweeper"
    );
    let (holder, leased): (String, bool) =
        sqlx::query_as("SELECT node_id, lease_until > now() FROM relay.sweeper")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(holder, first);
    assert!(leased, "its lease is renewed");

    let index = nodes.iter().position(|n| n.node_id == first).unwrap();
    let killed = Instant::now();
    nodes.remove(index).kill().await;
    let second: String = eventually("another sweeper", || async {
        let node: Option<String> =
            sqlx::query_scalar("SELECT node_id FROM relay.sweeper WHERE last_run_at IS NOT NULL")
                .fetch_optional(&db.pool)
                .await
                .unwrap();
        node.filter(|n| *n != first)
    })
    .await;
    let took = killed.elapsed();
    eprintln!("sweeper killed → another sweeps: {took:?}");
    // The lease (node timeout, 2 s) runs out, then the next sweep interval.
    assert!(took < Duration::from_millis(4000), "{took:?}");
    assert_eq!(announced(&nodes), vec![second.clone()]);
    // The new sweeper reaps the old one.
    eventually("the dead sweeper to be reaped", || async {
        (count(
            &db,
            "SELECT count(*) FROM relay.nodes WHERE id = $1",
            &first,
        )
        .await
            == 0)
            .then_some(())
    })
    .await;
    for node in nodes {
        assert_eq!(node.terminate().await, Some(0));
    }
    db.drop_database().await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed_and_deregistered() {
    let cluster = Cluster::start_with(1, AuthKind::None, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    // A client that reads answers pings (tungstenite pongs as it reads): it
    // stays, and its last_seen_at moves.
    let mut awake = cluster.connect(0, "nia").await;
    let awake_id = awake.connection_id.clone();
    let reader = tokio::spawn(async move {
        let frame = awake.next_frame().await;
        (awake, frame)
    });
    // A client that never reads never answers.
    let asleep = cluster.connect(0, "oli").await;
    let asleep_id = asleep.connection_id.clone();
    eventually("the silent client's row to go", || async {
        let rows: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.connections WHERE id = $1::uuid")
                .bind(&asleep_id)
                .fetch_one(&cluster.db.pool)
                .await
                .unwrap();
        (rows == 0).then_some(())
    })
    .await;
    eventually("the live client's last_seen_at to move", || async {
        let refreshed: bool = sqlx::query_scalar(
            "SELECT last_seen_at > connected_at + interval '300 ms' FROM relay.connections WHERE id = $1::uuid",
        )
        .bind(&awake_id)
        .fetch_one(&cluster.db.pool)
        .await
        .unwrap();
        refreshed.then_some(())
    })
    .await;
    let id = cluster.send_to_user(0, "nia", json!("still here")).await;
    let (awake, frame) = reader.await.unwrap();
    assert_eq!(id_of(&frame), id);
    drop(asleep);
    awake.close().await;
    cluster.finish().await;
}

#[tokio::test]
async fn a_node_declared_dead_while_alive_closes_its_sockets_and_registers_again() {
    let cluster = Cluster::start_with(2, AuthKind::None, |_, settings| {
        settings.heartbeat_interval = Duration::from_millis(200);
    })
    .await;
    let mut pia = cluster.connect(1, "pia").await;
    // What the sweeper does to a node it believes dead.
    sqlx::query("SELECT relay.release_node($1)")
        .bind(cluster.node_id(1))
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM relay.nodes WHERE id = $1")
        .bind(cluster.node_id(1))
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    let close = pia.closed().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    eventually("the node to register again", || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.nodes WHERE id = $1")
            .bind(cluster.node_id(1))
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
        (rows == 1).then_some(())
    })
    .await;
    let mut back = cluster.connect(1, "pia").await;
    let id = cluster.send_to_user(0, "pia", json!("welcome back")).await;
    assert_eq!(id_of(&back.next_message().await), id);
    back.close().await;

    // A row taken by another process under the same id: this one stops.
    sqlx::query("UPDATE relay.nodes SET incarnation = gen_random_uuid() WHERE id = $1")
        .bind(cluster.node_id(0))
        .execute(&cluster.db.pool)
        .await
        .unwrap();
    within(WAIT, cluster.node(0).stopping()).await;
    cluster.finish_allowing_failures().await;
}

/// A reader that records every message id it gets, over one connection.
/// (However long the silence: the socket stays open through an outage.)
fn spawn_reader(mut client: Client, ids: Arc<Mutex<Vec<i64>>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(message) = client.next_raw().await {
            if let Message::Text(text) = message {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["op"] == "message" {
                    ids.lock().unwrap().push(id_of(&frame));
                }
            }
        }
    })
}

#[tokio::test]
async fn a_database_restart_mid_traffic_loses_nothing_that_got_a_2xx() {
    let mut postgres =
        tokio::task::spawn_blocking(|| TempPostgres::start(pgtemp::Options::default()).unwrap())
            .await
            .unwrap();
    let url = postgres.url("postgres");
    let a = NodeProcess::start(&url, "outage-a", &[]).await;
    let b = NodeProcess::start(&url, "outage-b", &[]).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let client = Client::connect(&b.ws_url("user=quin"), &[]).await.unwrap();
    let received = Arc::new(Mutex::new(Vec::new()));
    let reader = spawn_reader(client, received.clone());

    let mut accepted = Vec::new();
    for n in 0..20 {
        accepted.push(send(&http, &a, "quin", json!(n)).await);
    }

    let pg_down = Instant::now();
    postgres = tokio::task::spawn_blocking(move || {
        postgres.stop().unwrap();
        postgres
    })
    .await
    .unwrap();
    // While it is down: 503 within 5 s, never a 2xx; readiness says so.
    let mut refused = 0;
    while refused < 3 {
        let started = Instant::now();
        let (status, body) =
            post(&http, &a, json!({"to": {"user": "quin"}, "data": "outage"})).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered in {:?}",
            started.elapsed()
        );
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["type"], "urn:pgrelay:problem:unavailable");
        refused += 1;
    }
    let (status, _) = response(http.get(b.url("/readyz")).send().await.unwrap()).await;
    assert_eq!(status, 503);
    let (status, _) = response(http.get(b.url("/healthz")).send().await.unwrap()).await;
    assert_eq!(status, 200);

    postgres = tokio::task::spawn_blocking(move || {
        postgres.restart().unwrap();
        postgres
    })
    .await
    .unwrap();
    let pg_back = Instant::now();
    // The nodes recover by themselves: the first accepted message after the
    // restart is delivered to the socket that stayed open through it.
    let first_after = eventually("a submission to succeed again", || async {
        let (status, body) = post(&http, &a, json!({"to": {"user": "quin"}, "data": "back"})).await;
        (status == 202).then(|| body["id"].as_str().unwrap().parse::<i64>().unwrap())
    })
    .await;
    accepted.push(first_after);
    eventually("the first delivery after the restart", || async {
        received
            .lock()
            .unwrap()
            .contains(&first_after)
            .then_some(())
    })
    .await;
    eprintln!(
        "database down for {:?}; database back → first delivery: {:?}",
        pg_back - pg_down,
        pg_back.elapsed()
    );
    for n in 0..20 {
        accepted.push(send(&http, &a, "quin", json!(n)).await);
    }
    eventually("every accepted message", || async {
        let got = received.lock().unwrap().clone();
        accepted.iter().all(|id| got.contains(id)).then_some(())
    })
    .await;
    let got = received.lock().unwrap().clone();
    assert!(
        got.windows(2).all(|w| w[0] < w[1]),
        "in order, once: {got:?}"
    );
    eventually("readiness", || async {
        let (status, _) = response(http.get(b.url("/readyz")).send().await.unwrap()).await;
        (status == 200).then_some(())
    })
    .await;
    reader.abort();
    assert_eq!(a.terminate().await, Some(0));
    assert_eq!(b.terminate().await, Some(0));
    drop(postgres);
}

#[tokio::test]
async fn a_rolling_restart_of_every_node_under_traffic_loses_nothing() {
    let db = TestDb::new().await;
    let names = ["roll-a", "roll-b", "roll-c"];
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(NodeProcess::start(&db.url, name, &FAST).await);
    }
    let addrs: Arc<Mutex<Vec<String>>> =
        Arc::new(Mutex::new(nodes.iter().map(|n| n.addr.clone()).collect()));
    let users = ["ray", "sam", "tia"];

    // Clients that reconnect, with their cursor, to another node when closed.
    let mut readers = Vec::new();
    for (index, user) in users.iter().enumerate() {
        let addrs = addrs.clone();
        let user = user.to_string();
        readers.push(tokio::spawn(async move {
            let mut ids: Vec<i64> = Vec::new();
            let mut attempt = index;
            loop {
                let addr = {
                    let a = addrs.lock().unwrap();
                    a[attempt % a.len()].clone()
                };
                attempt += 1;
                let since = ids
                    .last()
                    .map(|id| format!("&since={id}"))
                    .unwrap_or_else(|| "&since=0".into());
                let url = format!("ws://{addr}/v1/ws?user={user}{since}");
                let Ok(mut client) = Client::connect(&url, &[]).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                loop {
                    let next =
                        tokio::time::timeout(Duration::from_secs(20), client.next_raw()).await;
                    match next {
                        Ok(Some(Message::Text(text))) => {
                            let frame: Value = serde_json::from_str(&text).unwrap();
                            if frame["op"] == "message" {
                                ids.push(id_of(&frame));
                            }
                            if frame["data"] == "done" {
                                return ids;
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }));
    }

    // Steady traffic through whichever node answers.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flowed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sender = {
        let (addrs, stop, flowed) = (addrs.clone(), stop.clone(), flowed.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut accepted: Vec<(String, i64)> = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let user = users[n % users.len()];
                let addr = {
                    let a = addrs.lock().unwrap();
                    a[n % a.len()].clone()
                };
                n += 1;
                let body = json!({"to": {"user": user}, "data": n});
                if let Ok(answer) = http
                    .post(format!("http://{addr}/v1/messages"))
                    .json(&body)
                    .send()
                    .await
                {
                    let (status, body) = response(answer).await;
                    if status == 202 {
                        accepted.push((
                            user.to_owned(),
                            body["id"].as_str().unwrap().parse().unwrap(),
                        ));
                        flowed.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            accepted
        })
    };

    let traffic = |at_least: usize| {
        let flowed = flowed.clone();
        eventually("traffic to flow", move || {
            let n = flowed.load(std::sync::atomic::Ordering::Acquire);
            async move { (n >= at_least).then_some(()) }
        })
    };
    for (index, name) in names.iter().enumerate() {
        // Messages in flight to every node before each restart.
        traffic(40 * (index + 1)).await;
        let phase = Instant::now();
        let old = nodes.remove(index);
        assert_eq!(old.terminate().await, Some(0), "a clean stop");
        let fresh = NodeProcess::start(&db.url, name, &FAST).await;
        addrs.lock().unwrap()[index] = fresh.addr.clone();
        nodes.insert(index, fresh);
        eprintln!("restarted {name} in {:?}", phase.elapsed());
    }
    traffic(160).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let accepted = sender.await.unwrap();
    let http = reqwest::Client::new();
    for user in users {
        send(&http, &nodes[0], user, json!("done")).await;
    }
    for (reader, user) in readers.into_iter().zip(users) {
        let got = within(Duration::from_secs(60), reader).await.unwrap();
        let mut expected: Vec<i64> = accepted
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, id)| *id)
            .collect();
        expected.sort_unstable();
        // As a client dedupes: an id at or below the last one seen is a
        // duplicate (delivery is at least once). A message delivered after a
        // newer one would be dropped here, and then missing.
        let mut last = 0;
        let got: Vec<i64> = got[..got.len() - 1]
            .iter()
            .copied()
            .filter(|id| {
                let new = *id > last;
                last = last.max(*id);
                new
            })
            .collect();
        let missing: Vec<&i64> = expected.iter().filter(|id| !got.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{user}: accepted but never received: {missing:?}"
        );
    }
    for node in nodes {
        assert_eq!(node.terminate().await, Some(0));
    }
    db.drop_database().await;
}

/// A registered node with no task running (nothing else claims), and one
/// connection of `user` on it in the registry (no socket: the node serves
/// none).
async fn taskless_node_with_a_connection(
    db: &TestDb,
    user: &str,
) -> std::sync::Arc<pgrelay::state::NodeState> {
    let node = pgrelay::node::prepare(settings(db, AuthKind::None, 0))
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO relay.connections (id, node_id, user_id, protocol) VALUES ($1, 'node-a', $2, 'json')",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(user)
    .execute(&db.pool)
    .await
    .unwrap();
    node.state
}

/// A claim whose caller stops waiting (a timeout, a cancelled task) while its
/// statement waits in PostgreSQL: the server still runs the statement after
/// the caller has gone, so unless the claim is a transaction that then never
/// commits, its rows are deleted and their messages never delivered.
#[tokio::test]
async fn an_abandoned_claim_loses_no_outbox_work() {
    let db = TestDb::new().await;
    let ctx = taskless_node_with_a_connection(&db, "wes").await;

    // Every connection of the pool has the claim prepared, as a node that has
    // run a while has: the claim is then sent whole, in one go.
    let warm_up: Vec<_> = (0..4)
        .map(|_| pgrelay::read::claimer::claim_once(&ctx))
        .collect();
    for claimed in futures_util::future::join_all(warm_up).await {
        assert_eq!(claimed.unwrap().rows, 0);
    }

    // The message commits while the claim is held up by a lock on messages.
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    let id: i64 = sqlx::query_scalar("SELECT relay.send_to_user('wes', '{\"n\": 1}')")
        .fetch_one(&mut holder)
        .await
        .unwrap();
    sqlx::query("LOCK TABLE relay.messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let claim = tokio::spawn({
        let ctx = ctx.clone();
        async move { pgrelay::read::claimer::claim_once(&ctx).await }
    });
    assert_eq!(node_sessions_waiting_on_locks(&db.pool, 1).await, 1);
    claim.abort();
    assert!(claim.await.unwrap_err().is_cancelled());
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

    // The work comes back for the next claim. No session of wes is on this
    // node, so that claim parks the message for wes's next connect.
    let claimed = eventually("the outbox row claimable again", || async {
        let claimed = pgrelay::read::claimer::claim_once(&ctx).await.unwrap();
        (claimed.rows == 1).then_some(claimed)
    })
    .await;
    assert_eq!(claimed.parked, 1);
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM relay.outbox WHERE node_id IS NULL AND user_id = 'wes' AND message_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(parked, 1);
    ctx.db.pool.close().await;
    ctx.db.bookkeeping.close().await;
    db.drop_database().await;
}

/// A message whose outbox row another transaction holds (an abandoned claim
/// not yet rolled back, the sweeper) is waited for, not overtaken: a session
/// that had delivered a newer message of the stream would drop it.
#[tokio::test]
async fn a_claim_waits_for_a_held_row_rather_than_overtake_it() {
    let db = TestDb::new().await;
    let ctx = taskless_node_with_a_connection(&db, "xia").await;
    let send = |n: i64| {
        sqlx::query_scalar::<_, i64>("SELECT relay.send_to_user('xia', to_jsonb($1::bigint))")
            .bind(n)
            .fetch_one(&db.pool)
    };
    let older = send(1).await.unwrap();
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM relay.outbox WHERE message_id = $1 FOR UPDATE")
        .bind(older)
        .execute(&mut holder)
        .await
        .unwrap();
    send(2).await.unwrap();

    let claim = tokio::spawn({
        let ctx = ctx.clone();
        async move { pgrelay::read::claimer::claim_once(&ctx).await }
    });
    assert_eq!(node_sessions_waiting_on_locks(&db.pool, 1).await, 1);
    assert!(!claim.is_finished());
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let claimed = claim.await.unwrap().unwrap();
    assert_eq!(claimed.rows, 2, "both messages, in one claim, in order");
    ctx.db.pool.close().await;
    ctx.db.bookkeeping.close().await;
    db.drop_database().await;
}

/// PostgreSQL stalls longer than a claim may wait: the node's claims time
/// out and are abandoned one after another while work piles up. Once the stall
/// ends, the client gets all of it, in order, and what follows.
#[tokio::test]
async fn claims_that_time_out_in_a_stall_lose_nothing_and_keep_order() {
    let cluster = Cluster::start(1).await;
    let mut yul = cluster.connect(0, "yul").await;
    let first = cluster.send_to_user(0, "yul", json!(0)).await;
    assert_eq!(id_of(&yul.next_message().await), first);

    let mut holder = sqlx::PgConnection::connect(&cluster.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    let mut held = Vec::new();
    for n in 1..=5 {
        held.push(
            sqlx::query_scalar::<_, i64>("SELECT relay.send_to_user('yul', to_jsonb($1::int))")
                .bind(n)
                .fetch_one(&mut holder)
                .await
                .unwrap(),
        );
    }
    sqlx::query("LOCK TABLE relay.messages IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    // Two claims waiting: the first timed out (after pgrelay::db::OP_TIMEOUT)
    // and was abandoned, the second is its retry.
    node_sessions_waiting_on_locks(&cluster.db.pool, 2).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

    assert_eq!(yul.message_ids(5).await, held);
    let after = cluster.send_to_user(0, "yul", json!(6)).await;
    assert_eq!(id_of(&yul.next_message().await), after);
    yul.close().await;
    cluster.finish().await;
}

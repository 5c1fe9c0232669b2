//! A randomized schedule of partial failures, under traffic: three `pgrelay
//! serve` processes and a PostgreSQL of the test's own, and a seeded
//! schedule of kill -9s (the node comes back with its id), pauses (SIGSTOP,
//! some past the node timeout), PostgreSQL restarts and client churn, while
//! clients that resume with `since` receive. Then every client's received
//! ids are compared with the accepted set and with `relay.deliveries`:
//! nothing accepted is lost, every connection saw its ids in order, no
//! connection has a delivery row for a message it did not receive, and no
//! message is left `pending`.
//!
//! The seeds run are `PGRELAY_CHAOS_SEEDS` (comma-separated) or three fixed
//! ones; a failure names its seed. The schedule is reproducible from the
//! seed; the timing of the processes, of course, is not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgrelay::tools::pgtemp::{self, TempPostgres};
use rand::{RngExt, SeedableRng};
use serde_json::json;

use crate::faultkit::*;
use crate::helpers::*;

const DEFAULT_SEEDS: [u64; 3] = [1, 2, 3];
const NODES: usize = 3;
const USERS: usize = 5;
/// How long the schedule of faults runs, per seed.
const SCHEDULE: Duration = Duration::from_secs(18);

const NODE_FLAGS: [&str; 10] = [
    "--heartbeat-interval",
    "500ms",
    "--node-timeout",
    "2s",
    "--sweep-interval",
    "500ms",
    // A small queue: bursts overflow it, and sessions catch up from their
    // streams.
    "--send-queue",
    "8",
    "--shutdown-grace",
    "3s",
];

fn seeds() -> Vec<u64> {
    match std::env::var("PGRELAY_CHAOS_SEEDS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| s.trim().parse().expect("PGRELAY_CHAOS_SEEDS: numbers"))
            .collect(),
        _ => DEFAULT_SEEDS.to_vec(),
    }
}

/// Prints the seed when the test fails, however it fails.
struct Seed(u64);

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "chaos: FAILED with seed {seed}; run it again with PGRELAY_CHAOS_SEEDS={seed}",
                seed = self.0
            );
        }
    }
}

#[tokio::test]
async fn a_random_schedule_of_kills_pauses_restarts_and_churn_loses_nothing() {
    for seed in seeds() {
        let _seed = Seed(seed);
        eprintln!("chaos: seed {seed}");
        run(seed).await;
    }
}

/// What the schedule does next.
#[derive(Debug)]
enum Fault {
    Pause { node: usize, for_: Duration },
    Kill { node: usize, down: Duration },
    RestartPostgres { down: Duration },
}

async fn run(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut postgres =
        tokio::task::spawn_blocking(|| TempPostgres::start(pgtemp::Options::default()).unwrap())
            .await
            .unwrap();
    let url = postgres.url("postgres");
    let names: Vec<String> = (0..NODES).map(|n| format!("chaos{seed}-{n}")).collect();
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for name in &names {
        nodes.push(NodeProcess::start(&url, name, &NODE_FLAGS).await);
    }
    let addrs = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>(),
    ));
    let users: Vec<String> = (0..USERS).map(|n| format!("u{n}")).collect();
    // Users 0, 1 and 4 resume with `since`; 2 and 3 do not (they rely on
    // what is parked for them). Users 1 and 3 stall now and then (their
    // sessions' writes block, queues fill, sessions lag or are closed).
    let naive = |index: usize| index == 2 || index == 3;
    let stalling = |index: usize| index == 1 || index == 3;
    let clients: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(index, user)| {
            let options = ClientOptions {
                silence: Duration::from_millis(1500),
                churn: Some((
                    seed * 100 + index as u64,
                    Duration::from_millis(1500),
                    Duration::from_secs(6),
                )),
                since: !naive(index),
                stall: stalling(index).then_some((
                    seed * 1000 + index as u64,
                    Duration::from_secs(3),
                    Duration::from_millis(800),
                )),
            };
            resuming_client_with(user.clone(), addrs.clone(), options, index)
        })
        .collect();
    let filler: HashMap<String, usize> = users
        .iter()
        .enumerate()
        .filter(|(index, _)| stalling(*index))
        .map(|(_, user)| (user.clone(), 2048))
        .collect();
    let traffic = Traffic::start_with(
        addrs.clone(),
        users.clone(),
        Duration::from_millis(5),
        filler,
        25,
    );
    traffic.flows(100).await;

    let started = Instant::now();
    let mut restarted_postgres = false;
    let mut applied = Vec::new();
    while started.elapsed() < SCHEDULE {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        let node = rng.random_range(0..NODES);
        let fault = match rng.random_range(0..10) {
            0..=3 => Fault::Pause {
                node,
                for_: Duration::from_millis(rng.random_range(300..4500)),
            },
            4..=7 => Fault::Kill {
                node,
                down: Duration::from_millis(rng.random_range(200..2000)),
            },
            _ if !restarted_postgres => {
                restarted_postgres = true;
                Fault::RestartPostgres {
                    down: Duration::from_millis(rng.random_range(300..2000)),
                }
            }
            _ => Fault::Pause {
                node,
                for_: Duration::from_millis(rng.random_range(300..4500)),
            },
        };
        eprintln!("chaos {seed}: {:?} at {:?}", fault, started.elapsed());
        match &fault {
            Fault::Pause { node, for_ } => {
                pause(nodes[*node].pid());
                tokio::time::sleep(*for_).await;
                resume(nodes[*node].pid());
            }
            Fault::Kill { node, down } => {
                let killed = nodes.remove(*node);
                killed.kill().await;
                tokio::time::sleep(*down).await;
                let fresh = NodeProcess::start(&url, &names[*node], &NODE_FLAGS).await;
                addrs.lock().unwrap()[*node] = fresh.addr.clone();
                nodes.insert(*node, fresh);
            }
            Fault::RestartPostgres { down } => {
                postgres = tokio::task::spawn_blocking(move || {
                    postgres.stop().unwrap();
                    postgres
                })
                .await
                .unwrap();
                tokio::time::sleep(*down).await;
                postgres = tokio::task::spawn_blocking(move || {
                    postgres.restart().unwrap();
                    postgres
                })
                .await
                .unwrap();
            }
        }
        applied.push(fault);
    }

    // Quiet again: every node ready (registered, heartbeating, listening).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for node in &nodes {
        eventually_within(
            Duration::from_secs(60),
            "every node to be ready again",
            || async {
                let answer = http.get(node.url("/readyz")).send().await.ok()?;
                (answer.status().as_u16() == 200).then_some(())
            },
        )
        .await;
    }
    traffic.flows(50).await;
    let (accepted, unknown) = traffic.stop().await;
    for user in &users {
        eventually_within(
            Duration::from_secs(60),
            "the done marker to be accepted",
            || async {
                let answer = http
                    .post(nodes[0].url("/v1/messages"))
                    .json(&json!({"to": {"user": user}, "data": "done"}))
                    .send()
                    .await
                    .ok()?;
                (answer.status().as_u16() == 202).then_some(())
            },
        )
        .await;
    }
    let mut received: HashMap<String, Vec<Connection>> = HashMap::new();
    for (user, client) in users.iter().zip(clients) {
        let connections = within(Duration::from_secs(90), client).await.unwrap();
        received.insert(user.clone(), connections);
    }

    // Messages written to a socket whose delivery row was lost with a killed
    // node are parked again, for the next connect: one more, with `since`,
    // per user (they arrive as duplicates), and then nothing may be pending.
    let db_url = with_database(&url, "postgres");
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    eventually_within(
        Duration::from_secs(60),
        "no work left with nodes that are gone",
        || async {
            let stale: i64 = sqlx::query_scalar(
                "SELECT (SELECT count(*) FROM relay.outbox o WHERE o.node_id IS NOT NULL
                       AND NOT EXISTS (SELECT 1 FROM relay.nodes n WHERE n.id = o.node_id))
                  + (SELECT count(*) FROM relay.nodes WHERE last_seen_at < now() - interval '2 s')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            (stale == 0).then_some(())
        },
    )
    .await;
    for (index, user) in users.iter().enumerate() {
        let last = received[user]
            .iter()
            .flat_map(|c| c.ids.iter().copied())
            .max()
            .unwrap_or(0);
        let query = if naive(index) {
            format!("user={user}")
        } else {
            format!("user={user}&since={last}")
        };
        let mut client = Client::connect(&nodes[1].ws_url(&query), &[])
            .await
            .unwrap();
        let (status, body) = response(
            http.post(nodes[0].url("/v1/messages"))
                .json(&json!({"to": {"user": user}, "data": "final"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        let mut ids = Vec::new();
        loop {
            let frame = client.next_message().await;
            ids.push(id_of(&frame));
            if frame["data"] == "final" {
                break;
            }
        }
        let connection_id = client.connection_id.clone();
        assert!(client.close().await, "a clean close");
        received.get_mut(user).unwrap().push(Connection {
            connection_id,
            node_id: nodes[1].node_id.clone(),
            ids,
            drained: true,
        });
    }

    // Nothing lost, each connection in order. A client that does not resume
    // with `since` may miss what was written to a socket of its that died
    // before it read it (the README says so): those, per the delivery rows.
    let mut excused: HashMap<String, Vec<i64>> = HashMap::new();
    for (index, user) in users.iter().enumerate().filter(|(i, _)| naive(*i)) {
        for connection in received[user].iter().filter(|c| !c.drained) {
            let rows: Vec<i64> = sqlx::query_scalar(
                "SELECT message_id FROM relay.deliveries WHERE connection_id = $1::uuid",
            )
            .bind(&connection.connection_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            excused.entry(user.clone()).or_default().extend(rows);
        }
        let _ = index;
    }
    let duplicates = assert_nothing_lost_but(&accepted, &received, &excused);
    // Every delivery row is a message its connection received (for the
    // connections that ended with a close handshake: they read all that was
    // written to them).
    for (user, connections) in &received {
        for connection in connections.iter().filter(|c| c.drained) {
            let rows: Vec<i64> = sqlx::query_scalar(
                "SELECT message_id FROM relay.deliveries WHERE connection_id = $1::uuid",
            )
            .bind(&connection.connection_id)
            .fetch_all(&pool)
            .await
            .unwrap();
            let phantom: Vec<i64> = rows
                .into_iter()
                .filter(|id| !connection.ids.contains(id))
                .collect();
            assert!(
                phantom.is_empty(),
                "seed {seed}: {user}: delivery rows for messages connection {} never received: {phantom:?}",
                connection.connection_id
            );
        }
    }
    // Nothing left pending: every accepted message was written to a socket
    // of its user, and recorded.
    let settle = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pending: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM relay.message_states WHERE state = 'pending' ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        if pending.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < settle,
            "seed {seed}: messages left pending (written to no socket of their user, or \
             written and never recorded): {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reconnects: usize = received.values().map(|c| c.len() - 1).sum();
    eprintln!(
        "chaos {seed}: {} faults, {} accepted, {unknown} outcome unknown, {duplicates} duplicates, {reconnects} reconnects",
        applied.len(),
        accepted.len()
    );
    pool.close().await;
    for node in nodes {
        let _ = node.terminate().await;
    }
    drop(postgres);
}

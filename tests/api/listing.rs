//! The list endpoints page by an opaque cursor (`next`): no duplicates and
//! no gaps, whatever connects, leaves or commits late meanwhile.

use std::collections::HashSet;

use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::helpers::*;

/// Follows `next` from `first` until an empty page (deliveries) or a null
/// `next` (connections); answers every row and the last cursor.
async fn follow(cluster: &Cluster, first: &str, rows: &str) -> (Vec<Value>, Option<String>) {
    let (status, mut body) = cluster.get(0, first).await;
    assert_eq!(status, 200, "{body}");
    let mut all = Vec::new();
    loop {
        let page = body[rows].as_array().unwrap().clone();
        let empty = page.is_empty();
        all.extend(page);
        let Some(next) = body["next"].as_str().map(str::to_owned) else {
            return (all, None);
        };
        if empty {
            return (all, Some(next));
        }
        let path = first.split('?').next().unwrap();
        let (status, again) = cluster
            .get(0, &format!("{path}?cursor={next}&limit=3"))
            .await;
        assert_eq!(status, 200, "{again}");
        body = again;
    }
}

#[tokio::test]
async fn connections_are_listed_a_page_at_a_time_each_once() {
    let cluster = Cluster::start(2).await;
    let mut kept = Vec::new();
    for i in 0..13 {
        kept.push(cluster.connect(i % 2, &format!("lister{i}")).await);
    }
    let (status, first) = cluster.get(0, "/v1/connections?limit=5").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["connections"].as_array().unwrap().len(), 5);
    let mut seen: Vec<String> = first["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    // Meanwhile: new connections, and two listed ones leave.
    let mut late = Vec::new();
    for i in 0..4 {
        late.push(cluster.connect(1, &format!("late{i}")).await);
    }
    let left: Vec<String> = kept
        .iter()
        .filter(|c| seen.contains(&c.connection_id))
        .take(2)
        .map(|c| c.connection_id.clone())
        .collect();
    kept.retain(|c| !left.contains(&c.connection_id));
    let mut next = first["next"].as_str().map(str::to_owned);
    while let Some(cursor) = next {
        let (status, page) = cluster
            .get(0, &format!("/v1/connections?cursor={cursor}&limit=5"))
            .await;
        assert_eq!(status, 200, "{page}");
        seen.extend(
            page["connections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
        next = page["next"].as_str().map(str::to_owned);
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no connection twice: {seen:?}");
    for client in &kept {
        assert!(
            seen.contains(&client.connection_id),
            "{} listed",
            client.connection_id
        );
    }
    // A node's connections, paged the same way.
    let (_, on_b) = cluster
        .get(
            0,
            &format!("/v1/connections?node={}&limit=100", cluster.node_id(1)),
        )
        .await;
    assert!(on_b["next"].is_null(), "one page: {on_b}");
    assert!(
        on_b["connections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["node_id"] == cluster.node_id(1).as_str())
    );
    // Bad cursors are told apart.
    let (status, body) = cluster
        .get(0, "/v1/connections?cursor=bm90IGEgY3Vyc29y")
        .await;
    assert_eq!(
        (status, body["type"].as_str()),
        (400, Some("urn:pgrelay:problem:bad_cursor")),
        "{body}"
    );
    let cursor = first["next"].as_str().unwrap();
    let (status, body) = cluster
        .get(0, &format!("/v1/connections?cursor={cursor}&node=x"))
        .await;
    assert_eq!(status, 400, "{body}");
    drop((kept, late));
    cluster.finish().await;
}

#[tokio::test]
async fn a_delivery_record_that_commits_late_is_listed_once_after_the_cursor_passed_its_time() {
    let cluster = Cluster::start(1).await;
    let mut ann = cluster.connect(0, "ann").await;
    let mut first = Vec::new();
    for n in 0..3 {
        first.push(cluster.send_to_user(0, "ann", json!(n)).await);
        assert_eq!(id_of(&ann.next_message().await), *first.last().unwrap());
    }
    let recorded = |n: i64| {
        let pool = cluster.db.pool.clone();
        async move {
            eventually("the delivery records", || async {
                let count: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.deliveries")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                (count >= n).then_some(())
            })
            .await
        }
    };
    recorded(3).await;
    // A record whose transaction is still open: delivered 30 s ago by its
    // clock, committed only later (as a node's batch can be).
    let parked = cluster.send_to_user(0, "bob", json!("for bob")).await;
    let mut slow = PgConnection::connect(&cluster.db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut slow).await.unwrap();
    sqlx::query(
        "INSERT INTO relay.deliveries (message_id, connection_id, user_id, node_id, delivered_at)
         VALUES ($1, gen_random_uuid(), 'bob', 'node-a', now() - interval '30 seconds')",
    )
    .bind(parked)
    .execute(&mut slow)
    .await
    .unwrap();
    let mut later = Vec::new();
    for n in 3..6 {
        later.push(cluster.send_to_user(0, "ann", json!(n)).await);
        assert_eq!(id_of(&ann.next_message().await), *later.last().unwrap());
    }
    recorded(6).await;

    // Listed from the start: the first three; the later ones wait behind
    // the open transaction (so that nothing can come before them).
    let (rows, cursor) = follow(
        &cluster,
        "/v1/deliveries?since=2000-01-01T00:00:00Z&limit=3",
        "deliveries",
    )
    .await;
    let ids = |rows: &[Value]| -> Vec<i64> {
        rows.iter()
            .map(|r| r["message_id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(ids(&rows), first);
    sqlx::query("COMMIT").execute(&mut slow).await.unwrap();
    // From the cursor on: the late record and the later ones, each once.
    let cursor = cursor.expect("deliveries always name a next cursor");
    let (rows, _) = follow(
        &cluster,
        &format!("/v1/deliveries?cursor={cursor}&limit=3"),
        "deliveries",
    )
    .await;
    let mut expected: Vec<i64> = vec![parked];
    expected.extend(&later);
    let mut got = ids(&rows);
    got.sort_unstable();
    expected.sort_unstable();
    assert_eq!(got, expected);
    // A cursor carries its filters: none may come with it.
    let (status, body) = cluster
        .get(0, &format!("/v1/deliveries?cursor={cursor}&user=ann"))
        .await;
    assert_eq!(status, 400, "{body}");
    ann.close().await;
    cluster.finish().await;
}

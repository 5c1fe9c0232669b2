//! Two Spring instances' broker relays (`enableStompBrokerRelay("/topic",
//! "/queue")`) against two pgrelay nodes, frame for frame as
//! `StompBrokerRelayMessageHandler` sends them: one system session per
//! instance, one session per browser, the user registry broadcast, per-session
//! queues for `/user/queue/...`, `convertAndSendToUser` across instances,
//! unresolved-user broadcasts, and DISCONNECT with a receipt.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

/// A Spring instance's relay: its system session, as the relay opens it.
struct SpringRelay {
    system: TcpStomp,
}

/// The system subscriptions Spring makes (`setUserRegistryBroadcast`,
/// `setUserDestinationBroadcast`).
const REGISTRY: &str = "/topic/registry";
const UNRESOLVED: &str = "/topic/unresolved-user";

impl SpringRelay {
    async fn connect(cluster: &Cluster, node: usize) -> Self {
        // systemLogin/systemPasscode, heart-beat 10000,10000, and no host
        // header (Spring sends one only with a virtual host configured).
        let (mut system, connected) = TcpStomp::connect(
            cluster.stomp_addr(node),
            &[
                ("login", "spring"),
                ("passcode", API_KEY),
                ("heart-beat", "10000,10000"),
            ],
        )
        .await;
        assert_eq!(connected.command, "CONNECTED", "{connected:?}");
        // Exactly `<n>,<n>`: Spring splits on the comma and parses each side.
        assert_eq!(connected.header("heart-beat"), Some("10000,10000"));
        // The system subscriptions, auto ack and no receipt, as Spring sends
        // them; then a frame of the test's own with a receipt, to know the
        // node has read them (frames of one session are taken in order).
        system
            .send("SUBSCRIBE", &[("id", "0"), ("destination", REGISTRY)], b"")
            .await;
        system
            .send(
                "SUBSCRIBE",
                &[("id", "1"), ("destination", UNRESOLVED)],
                b"",
            )
            .await;
        system
            .send("UNSUBSCRIBE", &[("id", "none"), ("receipt", "ready")], b"")
            .await;
        assert_eq!(system.next().await.header("receipt-id"), Some("ready"));
        Self { system }
    }

    /// A browser's session through this relay: the browser's CONNECT with
    /// clientLogin/clientPasscode put in and `host` taken out.
    async fn browser(cluster: &Cluster, node: usize) -> (TcpStomp, String) {
        let (session, connected) = TcpStomp::connect(
            cluster.stomp_addr(node),
            &[
                ("login", "spring-client"),
                ("passcode", API_KEY),
                ("heart-beat", "10000,10000"),
            ],
        )
        .await;
        assert_eq!(connected.command, "CONNECTED", "{connected:?}");
        // Spring names browser sessions itself; a short id stands in.
        let id = format!("s{}", &connected.header("session").unwrap()[30..]);
        (session, id)
    }

    /// `convertAndSend(destination, payload, headers)` through the system
    /// session.
    async fn send(&mut self, destination: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut all = vec![
            ("destination", destination),
            ("content-type", "text/plain;charset=UTF-8"),
        ];
        all.extend_from_slice(headers);
        self.system.send("SEND", &all, body).await;
    }

    /// The next MESSAGE on the system session, dispatched as Spring does: by
    /// its `destination`, which must be exactly the subscription's.
    async fn next_system_message(&mut self) -> StompReply {
        let message = self.system.next().await;
        assert_eq!(message.command, "MESSAGE", "{message:?}");
        let destination = message.header("destination").unwrap();
        assert!(
            destination == REGISTRY || destination == UNRESOLVED,
            "{message:?}"
        );
        message
    }
}

#[tokio::test]
async fn two_spring_instances_relay_through_two_nodes() {
    let cluster = Cluster::start_stomp(2, AuthKind::Jwt, |_, _| {}).await;
    let mut instance_a = SpringRelay::connect(&cluster, 0).await;
    let mut instance_b = SpringRelay::connect(&cluster, 1).await;

    // Bob's browser sits on instance B: `/user/queue/notifications` becomes
    // his session's own queue, with the original destination kept.
    let (mut bob, bob_session) = SpringRelay::browser(&cluster, 1).await;
    let bob_queue = format!("/queue/notifications-user{bob_session}");
    bob.subscribe(
        "sub-0",
        &bob_queue,
        &[("simpOrigDestination", "/user/queue/notifications")],
    )
    .await;

    // B broadcasts its user registry (every 10 s in Spring); A hears it.
    let registry = json!({"bob": {"sessions": [{"id": bob_session}]}});
    instance_b
        .send(
            REGISTRY,
            &[("content-type", "application/json")],
            registry.to_string().as_bytes(),
        )
        .await;
    let heard = instance_a.next_system_message().await;
    assert_eq!(heard.header("destination"), Some(REGISTRY));
    let known: Value = serde_json::from_slice(&heard.body).unwrap();
    let session = known["bob"]["sessions"][0]["id"].as_str().unwrap();
    assert_eq!(session, bob_session);
    // B hears its own broadcast too (Spring ignores its own by origin).
    assert_eq!(
        instance_b.next_system_message().await.header("destination"),
        Some(REGISTRY)
    );

    // `convertAndSendToUser("bob", "/queue/notifications", ...)` on A: A
    // resolves Bob's session from B's registry and sends to its queue.
    for n in 0..3 {
        instance_a
            .send(
                &format!("/queue/notifications-user{session}"),
                &[("simpOrigDestination", "/user/queue/notifications")],
                format!("hello {n}").as_bytes(),
            )
            .await;
    }
    for n in 0..3 {
        let message = bob.next().await;
        assert_eq!(message.command, "MESSAGE");
        assert_eq!(message.header("subscription"), Some("sub-0"));
        assert_eq!(message.header("destination"), Some(bob_queue.as_str()));
        // What Spring maps back to the browser's `/user/queue/notifications`.
        assert_eq!(
            message.header("simpOrigDestination"),
            Some("/user/queue/notifications")
        );
        assert_eq!(message.body, format!("hello {n}").into_bytes());
    }

    // Carol is on no instance A knows: A broadcasts the message, headers
    // and all, and every instance's system session gets it, in order.
    for n in 0..2 {
        instance_a
            .send(
                UNRESOLVED,
                &[
                    ("simpOrigDestination", "/user/carol/queue/notifications"),
                    ("simpUser", "carol"),
                ],
                format!("for carol {n}").as_bytes(),
            )
            .await;
    }
    for instance in [&mut instance_a, &mut instance_b] {
        for n in 0..2 {
            let message = instance.next_system_message().await;
            assert_eq!(message.header("destination"), Some(UNRESOLVED));
            assert_eq!(
                message.header("simpOrigDestination"),
                Some("/user/carol/queue/notifications")
            );
            assert_eq!(message.header("simpUser"), Some("carol"));
            assert_eq!(message.body, format!("for carol {n}").into_bytes());
        }
    }

    // Bob closes his tab: Spring sends DISCONNECT with a receipt and waits
    // for it, then for the end of the connection.
    bob.send("DISCONNECT", &[("receipt", "close-1")], b"").await;
    let last = bob.until_closed().await;
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].header("receipt-id"), Some("close-1"));
    // His per-session queue goes with him: empty, and no consumer left.
    eventually("the session's queue gone", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.queues")
            .fetch_one(&cluster.db.pool)
            .await
            .unwrap();
        (left == 0).then_some(())
    })
    .await;

    // The audit: every delivery, queue and topic alike, is a row.
    let delivered: Vec<(String, i64)> = sqlx::query_as(
        "SELECT coalesce(m.stream, 'several'), count(*) FROM relay.deliveries d
           JOIN relay.messages m ON m.id = d.message_id
          GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&cluster.db.pool)
    .await
    .unwrap();
    assert_eq!(
        delivered,
        vec![
            (format!("queue:notifications-user{bob_session}"), 3),
            ("topic:registry".into(), 2),
            ("topic:unresolved-user".into(), 4),
        ]
    );
    // The system sessions stay; nothing more arrives for them.
    assert!(
        instance_a
            .system
            .next_within(Duration::from_millis(200))
            .await
            .is_none()
    );
    cluster.finish().await;
}

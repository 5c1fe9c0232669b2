//! The session loop on a socket made of channels, with tokio's clock
//! paused: heartbeats, silence, throttling, bad frames, slow consumers and
//! the delivery path, without a network or a database (the node's pools
//! are lazy and never connect).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::json::Json;
use super::stomp::Stomp;
use super::{Exit, Half, Session, Start, WsSink, WsStream};
use crate::auth::Identity;
use crate::config::Settings;
use crate::liveness::Liveness;
use crate::message::{MessageRow, StoredMessage, StreamKey};
use crate::protocol::stomp::{FrameLimits, Version};
use crate::rate::KeyedLimiter;
use crate::read::delivery_log::{DeliveryLog, Record};
use crate::read::hub::{Control, Envelope, Hub, Inbox};
use crate::registration::Registration;
use crate::state::{Database, Lifecycle, LocalDelivery, NodeState, WriteSide};
use crate::write::group_commit::GroupCommit;

/// Nothing listens here: the pools are lazy, and these tests never use them.
const NOWHERE: &str = "postgres://pgrelay@127.0.0.1:1/nowhere";

/// A node's state with no database behind it, and its delivery log's queue.
fn node(settings: Settings) -> (Arc<NodeState>, mpsc::Receiver<Record>) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy(NOWHERE)
        .expect("a valid URL");
    let (log, records) = DeliveryLog::new();
    let slow = Arc::new(tokio::sync::Semaphore::new(1));
    let registration = Arc::new(Registration::new(Uuid::new_v4()));
    let liveness = Liveness::new(
        NOWHERE.parse().expect("a valid URL"),
        Duration::from_secs(1),
    );
    let state = NodeState {
        node_id: settings.node_id.clone(),
        db: Database {
            pool: pool.clone(),
            bookkeeping: pool.clone(),
        },
        delivery: LocalDelivery {
            hub: Hub::default(),
            log,
        },
        write: WriteSide {
            group_commit: GroupCommit::start(pool, 8, 1, slow.clone()),
            slow_submissions: slow,
            api_limiter: KeyedLimiter::new(10),
        },
        lifecycle: Lifecycle::new(
            registration,
            liveness,
            "127.0.0.1:0".parse().expect("an address"),
            "test".into(),
            crate::db::pooling::Plan {
                pooled: false,
                wakeups: crate::db::pooling::Wakeups::Notify { url: String::new() },
            },
        ),
        prune_from: Default::default(),
        settings,
    };
    (Arc::new(state), records)
}

fn settings(heartbeat: Duration) -> Settings {
    Settings {
        heartbeat_interval: heartbeat,
        ..Settings::new(NOWHERE)
    }
}

/// The client's ends of a socket made of channels.
struct Client {
    to_server: mpsc::Sender<Result<Message, axum::Error>>,
    from_server: mpsc::Receiver<Message>,
}

impl Client {
    async fn send_text(&self, text: &str) {
        self.to_server
            .send(Ok(Message::Text(text.into())))
            .await
            .expect("the session reads");
    }

    /// The next data frame, skipping pings.
    async fn next_text(&mut self) -> String {
        loop {
            match self.from_server.recv().await.expect("a frame") {
                Message::Text(text) => return text.to_string(),
                Message::Ping(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    async fn next_json(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).expect("JSON")
    }
}

/// A socket whose server side buffers `capacity` frames for the client.
fn socket(capacity: usize) -> (impl WsSink + 'static, impl WsStream + 'static, Client) {
    let (to_client, from_server) = mpsc::channel::<Message>(capacity);
    let sink = Box::pin(futures_util::sink::unfold(
        to_client,
        |to_client, message: Message| async move {
            to_client.send(message).await.map_err(axum::Error::new)?;
            Ok::<_, axum::Error>(to_client)
        },
    ));
    let (to_server, from_client) = mpsc::channel(1);
    let incoming = Box::pin(futures_util::stream::unfold(
        from_client,
        |mut from_client| async move { from_client.recv().await.map(|m| (m, from_client)) },
    ));
    let client = Client {
        to_server,
        from_server,
    };
    (sink, incoming, client)
}

/// A session of user `ann`, registered in the hub, serving in a task of
/// its own: the task ends with the session's exit.
fn serve<P: Half, S: WsSink + 'static, I: WsStream + 'static>(
    ctx: &Arc<NodeState>,
    sink: S,
    mut incoming: I,
    proto: P,
) -> (Uuid, JoinHandle<Exit>) {
    let id = Uuid::now_v7();
    let mut inbox: Inbox = ctx.delivery.hub.register(id, 64);
    let identity = Identity::unauthenticated("ann").expect("a valid user");
    let controls = inbox.controls();
    let mut session = Session::new(
        ctx.clone(),
        id,
        identity,
        sink,
        proto,
        controls,
        Start::default(),
    );
    let task = tokio::spawn(async move {
        let Err(exit) = session.serve(&mut inbox, &mut incoming).await;
        // What `finish` would do next needs the database; the exit is what
        // these tests look at.
        session.finished = true;
        drop(session);
        exit
    });
    (id, task)
}

fn user_message(id: i64) -> Arc<Envelope> {
    let message = StoredMessage::from_row(MessageRow {
        id,
        destination: None,
        data: Some(id.to_string()),
        body: None,
        content_type: None,
        created_at: chrono::Utc::now(),
        target_connection: None,
        headers: None,
    });
    Arc::new(Envelope::new(message, StreamKey::User("ann".into())))
}

fn closed_with(exit: &Exit, expected: u16) -> bool {
    matches!(exit, Exit::Close { code, .. } if *code == expected)
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_at_the_first_ping_after_two_heartbeats() {
    let (ctx, _records) = node(settings(Duration::from_secs(5)));
    let (sink, incoming, mut client) = socket(16);
    let started = Instant::now();
    let (_, task) = serve(&ctx, sink, incoming, Json::default());
    assert_eq!(client.next_json().await["op"], "welcome");
    let exit = task.await.expect("the session ends");
    assert!(
        matches!(&exit, Exit::Close { code: 1001, reason } if reason == "heartbeat timeout"),
        "{exit:?}"
    );
    // Pinged at 5 s and 10 s (silent for 10 s: not yet two intervals and
    // the grace), closed at 15 s.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(15) && elapsed < Duration::from_secs(16),
        "{elapsed:?}"
    );
    let mut pings = 0;
    while let Ok(message) = client.from_server.try_recv() {
        pings += usize::from(matches!(message, Message::Ping(_)));
    }
    assert_eq!(pings, 2);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_answers_pings_stays_until_told_to_close() {
    let (ctx, _records) = node(settings(Duration::from_secs(5)));
    let (sink, incoming, mut client) = socket(16);
    let (id, task) = serve(&ctx, sink, incoming, Json::default());
    let to_server = client.to_server.clone();
    let answering = tokio::spawn(async move {
        while let Some(message) = client.from_server.recv().await {
            if matches!(message, Message::Ping(_)) {
                let _ = to_server.send(Ok(Message::Pong(Default::default()))).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert!(!task.is_finished(), "a client that answers pings stays");
    ctx.delivery.hub.control(
        id,
        Control::Close {
            code: 4000,
            reason: "told to".into(),
        },
    );
    let exit = task.await.expect("the session ends");
    assert!(closed_with(&exit, 4000), "{exit:?}");
    answering.abort();
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_frames_is_read_at_the_frame_rate_and_not_closed() {
    let mut settings = settings(Duration::from_secs(600));
    settings.limits.max_frames_per_second = 10;
    let (ctx, _records) = node(settings);
    let (sink, incoming, client) = socket(16);
    let (_, task) = serve(&ctx, sink, incoming, Json::default());
    let started = Instant::now();
    // Pongs cost a frame each and answer nothing.
    for _ in 0..40 {
        client
            .to_server
            .send(Ok(Message::Pong(Default::default())))
            .await
            .expect("the session reads");
    }
    // A burst of 10, then 10 a second: the last read after about 3 s.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2800) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert!(!task.is_finished(), "slowed down, not closed");
    ctx.lifecycle.shutdown.cancel();
    let exit = task.await.expect("the session ends");
    assert!(closed_with(&exit, 1012), "{exit:?}");
}

#[tokio::test(start_paused = true)]
async fn bad_frames_are_answered_until_too_many_close_the_socket() {
    let (ctx, _records) = node(settings(Duration::from_secs(600)));
    let (sink, incoming, mut client) = socket(64);
    let (_, task) = serve(&ctx, sink, incoming, Json::default());
    assert_eq!(client.next_json().await["op"], "welcome");
    for n in 1..=super::json::BAD_FRAMES_PER_MINUTE {
        client.send_text("not json").await;
        let error = client.next_json().await;
        assert_eq!(error["op"], "error", "{n}: {error}");
        assert_eq!(error["code"], "bad_frame", "{n}: {error}");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!task.is_finished(), "the limit itself is tolerated");
    client.send_text("{\"op\":\"nonsense\"}").await;
    assert_eq!(client.next_json().await["code"], "bad_frame");
    let exit = task.await.expect("the session ends");
    assert!(
        matches!(&exit, Exit::Close { code: 1008, reason } if reason == "too many bad frames"),
        "{exit:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn live_messages_are_written_once_in_order_and_recorded() {
    let (ctx, mut records) = node(settings(Duration::from_secs(600)));
    let (sink, incoming, mut client) = socket(64);
    let (id, task) = serve(&ctx, sink, incoming, Json::default());
    assert_eq!(client.next_json().await["op"], "welcome");
    // A duplicate (a retried claim) and an older id are dropped; a topic
    // message for a topic this session never subscribed to is too.
    let topic = Arc::new(Envelope::new(
        StoredMessage::from_row(MessageRow {
            id: 9,
            destination: None,
            data: Some("9".into()),
            body: None,
            content_type: None,
            created_at: chrono::Utc::now(),
            target_connection: None,
            headers: None,
        }),
        StreamKey::Topic("elsewhere".into()),
    ));
    for envelope in [
        user_message(1),
        user_message(2),
        user_message(2),
        topic,
        user_message(3),
        user_message(1),
    ] {
        ctx.delivery.hub.offer(id, &envelope);
    }
    let mut written = Vec::new();
    for _ in 0..3 {
        let frame = client.next_json().await;
        assert_eq!(frame["op"], "message", "{frame}");
        written.push(frame["id"].as_str().expect("an id").to_owned());
    }
    assert_eq!(written, ["1", "2", "3"]);
    let mut recorded = Vec::new();
    while recorded.len() < 3 {
        match records.recv().await.expect("a record") {
            Record::Delivered {
                message_id,
                connection_id,
                user_stream,
                ..
            } => {
                assert_eq!(connection_id, id);
                assert!(user_stream);
                recorded.push(message_id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(recorded, [1, 2, 3]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(records.try_recv().is_err(), "nothing else recorded");
    ctx.lifecycle.shutdown.cancel();
    assert!(closed_with(&task.await.expect("the session ends"), 1012));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_closed_and_nothing_is_recorded_as_written() {
    let (ctx, mut records) = node(settings(Duration::from_secs(600)));
    // Room for the welcome, and no more: the client never reads.
    let (sink, incoming, _client) = socket(1);
    let (id, task) = serve(&ctx, sink, incoming, Json::default());
    tokio::task::yield_now().await;
    ctx.delivery.hub.offer(id, &user_message(1));
    let started = Instant::now();
    let exit = task.await.expect("the session ends");
    assert!(
        matches!(&exit, Exit::Close { code: 1008, reason } if reason.starts_with("slow consumer")),
        "{exit:?}"
    );
    assert!(started.elapsed() >= ctx.settings.limits.slow_consumer_timeout);
    // Still routed to the connection in the outbox: its departure parks it.
    assert!(
        records.try_recv().is_err(),
        "a write that timed out is not recorded"
    );
}

#[tokio::test(start_paused = true)]
async fn stomp_heart_beats_go_out_as_agreed_and_pongs_do_not_stand_in_for_the_clients() {
    let (ctx, _records) = node(settings(Duration::from_secs(5)));
    let (sink, incoming, mut client) = socket(64);
    let beat = Some(Duration::from_secs(1));
    let stomp = Stomp::new(Version::V1_2, FrameLimits::new(1024), beat, beat);
    let started = Instant::now();
    let (_, task) = serve(&ctx, sink, incoming, stomp);
    assert!(client.next_text().await.starts_with("CONNECTED\n"));
    let to_server = client.to_server.clone();
    let ponging = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = to_server.send(Ok(Message::Pong(Default::default()))).await;
        }
    });
    let exit = task.await.expect("the session ends");
    // It promised a heart-beat a second; pongs are not heart-beats. Closed
    // at the first check after two of its intervals (the ping at 5 s).
    assert!(closed_with(&exit, 1001), "{exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let mut beats = 0;
    while let Ok(message) = client.from_server.try_recv() {
        beats += usize::from(matches!(&message, Message::Text(t) if t.as_str() == "\n"));
    }
    assert!(beats >= 4, "one a second: {beats}");
    ponging.abort();
}

#[tokio::test(start_paused = true)]
async fn a_stomp_client_sending_heart_beats_stays() {
    let (ctx, _records) = node(settings(Duration::from_secs(5)));
    let (sink, incoming, mut client) = socket(256);
    let beat = Some(Duration::from_secs(1));
    let stomp = Stomp::new(Version::V1_2, FrameLimits::new(1024), beat, beat);
    let (_, task) = serve(&ctx, sink, incoming, stomp);
    assert!(client.next_text().await.starts_with("CONNECTED\n"));
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.send_text("\n").await;
        while client.from_server.try_recv().is_ok() {}
    }
    assert!(!task.is_finished(), "heart-beats are signs of life");
    ctx.lifecycle.shutdown.cancel();
    assert!(closed_with(&task.await.expect("the session ends"), 1012));
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_answered_after_the_publishes_before_it() {
    let (ctx, _records) = node(settings(Duration::from_secs(600)));
    let (sink, incoming, mut client) = socket(64);
    let (_, task) = serve(&ctx, sink, incoming, Json::default());
    assert_eq!(client.next_json().await["op"], "welcome");
    client
        .send_text(r#"{"op":"publish","topic":"news","data":1}"#)
        .await;
    client
        .to_server
        .send(Ok(Message::Binary(vec![1, 2, 3].into())))
        .await
        .expect("the session reads");
    // No database here: the publish fails, and its answer comes first.
    let publish = client.next_json().await;
    assert_eq!(publish["op"], "error", "{publish}");
    assert_ne!(publish["code"], "bad_frame", "{publish}");
    let refusal = client.next_json().await;
    assert_eq!(refusal["code"], "bad_frame", "{refusal}");
    ctx.lifecycle.shutdown.cancel();
    assert!(closed_with(&task.await.expect("the session ends"), 1012));
}

#[tokio::test(start_paused = true)]
async fn a_ping_is_answered_with_a_pong_and_the_welcome_names_the_users_head() {
    let (ctx, _records) = node(settings(Duration::from_secs(600)));
    let (sink, incoming, mut client) = socket(16);
    let (_, task) = serve(&ctx, sink, incoming, Json::default());
    let welcome = client.next_json().await;
    assert_eq!(welcome["op"], "welcome");
    // The session's user cursor at registration (0 here: no messages yet).
    assert_eq!(welcome["user_head"], "0", "{welcome}");
    client.send_text(r#"{"op":"ping"}"#).await;
    assert_eq!(client.next_json().await, serde_json::json!({"op": "pong"}));
    ctx.lifecycle.shutdown.cancel();
    assert!(closed_with(&task.await.expect("the session ends"), 1012));
}

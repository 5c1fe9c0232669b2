//! Tools for partial-failure tests: a TCP proxy that can cut a node off from
//! PostgreSQL without closing its connections, clients that resume with
//! `since` wherever they can, and steady traffic that remembers what was
//! accepted.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::*;

/// A TCP proxy in front of PostgreSQL. `cut` stops it moving bytes either
/// way while every connection stays open — a network partition, as a node
/// sees it: its statements hang instead of failing. `heal` lets the bytes
/// flow again.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, cut_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let cut = cut_rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        pump(client_read, server_write, cut.clone()),
                        pump(server_read, client_write, cut),
                    );
                });
            }
        });
        Self { addr, cut, task }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).unwrap();
        parsed.set_host(Some("127.0.0.1")).unwrap();
        parsed.set_port(Some(self.addr.port())).unwrap();
        parsed.to_string()
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes one way, holding them while the proxy is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if cut.wait_for(|cut| !*cut).await.is_err() {
            return;
        }
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cut.wait_for(|cut| !*cut).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The address PostgreSQL listens on, from a connection URL.
pub fn server_addr(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).unwrap();
    let host = match parsed.host_str() {
        Some("localhost") | None => "127.0.0.1",
        Some(host) => host,
    };
    format!("{host}:{}", parsed.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// SIGSTOP: the process is frozen, its sockets stay open.
pub fn pause(pid: i32) {
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
}

/// SIGCONT.
pub fn resume(pid: i32) {
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
}

/// What one WebSocket connection of a resuming client received.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub connection_id: String,
    pub node_id: String,
    pub ids: Vec<i64>,
    /// Whether it ended in a close handshake (the client read everything the
    /// server wrote before it), rather than by a drop.
    pub drained: bool,
}

/// How a [`resuming_client`] behaves.
#[derive(Clone, Copy)]
pub struct ClientOptions {
    /// A node silent this long (not even a ping) is given up on.
    pub silence: Duration,
    /// Now and then (a random time in this range, from this seed), the
    /// client closes its connection cleanly and connects again.
    pub churn: Option<(u64, Duration, Duration)>,
    /// Reconnect with `since` (the protocol's advice), or without (a naive
    /// client, which then relies on what is parked for it).
    pub since: bool,
    /// Now and then (every so often, from this seed) stop reading for a
    /// while, on a socket with a tiny receive buffer: the server's writes
    /// stall, its queue fills, the session lags or is closed.
    pub stall: Option<(u64, Duration, Duration)>,
}

impl ClientOptions {
    pub fn silence(silence: Duration) -> Self {
        Self {
            silence,
            churn: None,
            since: true,
            stall: None,
        }
    }
}

/// A client of one user that stays connected to some node of `addrs`: when
/// its socket closes, or the node falls silent for `silence` (not even a
/// ping), it connects to the next node with `since` = the last id it saw.
/// It stops once it has received a message whose data is `"done"`.
pub fn resuming_client(
    user: String,
    addrs: Arc<Mutex<Vec<String>>>,
    silence: Duration,
    start: usize,
) -> tokio::task::JoinHandle<Vec<Connection>> {
    resuming_client_with(user, addrs, ClientOptions::silence(silence), start)
}

/// [`resuming_client`], with options.
pub fn resuming_client_with(
    user: String,
    addrs: Arc<Mutex<Vec<String>>>,
    options: ClientOptions,
    start: usize,
) -> tokio::task::JoinHandle<Vec<Connection>> {
    use rand::{RngExt, SeedableRng};
    tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(options.churn.map_or(0, |c| c.0));
        let mut stall_rng = rand::rngs::StdRng::seed_from_u64(options.stall.map_or(0, |c| c.0));
        let mut connections: Vec<Connection> = Vec::new();
        let mut last: Option<i64> = None;
        let mut attempt = start;
        loop {
            let addr = {
                let addrs = addrs.lock().unwrap();
                addrs[attempt % addrs.len()].clone()
            };
            attempt += 1;
            let since = match last {
                Some(id) if options.since => format!("&since={id}"),
                _ => String::new(),
            };
            let url = format!("ws://{addr}/v1/ws?user={user}{since}");
            let connected =
                tokio::time::timeout(Duration::from_secs(5), open(&url, options.stall.is_some()))
                    .await;
            let Ok(Some(mut ws)) = connected else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut stall_at = options.stall.map(|(_, every, _)| {
                tokio::time::Instant::now() + stall_rng.random_range(every / 2..every * 3 / 2)
            });
            let churn_at = options
                .churn
                .map(|(_, min, max)| tokio::time::Instant::now() + rng.random_range(min..max));
            let mut connection = Connection::default();
            let mut done = false;
            let mut churning = false;
            loop {
                let next =
                    tokio::time::timeout(options.silence, futures_util::StreamExt::next(&mut ws));
                let next = tokio::select! {
                    next = next => next,
                    () = async {
                        match stall_at {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    } => {
                        let (_, every, length) = options.stall.expect("stalling");
                        tokio::time::sleep(stall_rng.random_range(length / 2..length * 3 / 2)).await;
                        stall_at = Some(
                            tokio::time::Instant::now()
                                + stall_rng.random_range(every / 2..every * 3 / 2),
                        );
                        continue;
                    }
                    () = async {
                        match churn_at {
                            Some(at) if !churning => tokio::time::sleep_until(at).await,
                            _ => std::future::pending().await,
                        }
                    } => {
                        // Leave cleanly: close, then read what the server
                        // still sends until its close answer.
                        churning = true;
                        let _ = futures_util::SinkExt::send(&mut ws, Message::Close(None)).await;
                        continue;
                    }
                };
                match next {
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let frame: Value = serde_json::from_str(&text).unwrap();
                        match frame["op"].as_str() {
                            Some("welcome") => {
                                connection.connection_id =
                                    frame["connection_id"].as_str().unwrap().to_owned();
                                connection.node_id = frame["node_id"].as_str().unwrap().to_owned();
                            }
                            Some("message") => {
                                let id = id_of(&frame);
                                connection.ids.push(id);
                                last = Some(last.map_or(id, |l| l.max(id)));
                                if frame["data"] == "done" {
                                    done = true;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok(Some(Ok(Message::Close(_)))) => {
                        connection.drained = true;
                        break;
                    }
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(_)) | None) | Err(_) => break,
                }
            }
            if done {
                let _ = futures_util::SinkExt::close(&mut ws).await;
                // Read to the server's close answer: everything it wrote
                // before has been read.
                let drained = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(message)) = futures_util::StreamExt::next(&mut ws).await {
                        match message {
                            Message::Text(text) => {
                                let frame: Value = serde_json::from_str(&text).unwrap();
                                if frame["op"] == "message" {
                                    connection.ids.push(id_of(&frame));
                                }
                            }
                            Message::Close(_) => return true,
                            _ => {}
                        }
                    }
                    false
                })
                .await;
                connection.drained = matches!(drained, Ok(true));
                connections.push(connection);
                return connections;
            }
            if !connection.connection_id.is_empty() {
                connections.push(connection);
            }
        }
    })
}

/// Opens a WebSocket, with a tiny receive buffer if asked.
async fn open(
    url: &str,
    tiny_buffer: bool,
) -> Option<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>> {
    if !tiny_buffer {
        return tokio_tungstenite::connect_async(url)
            .await
            .ok()
            .map(|(ws, _)| ws);
    }
    let parsed = url::Url::parse(url).ok()?;
    let addr: SocketAddr = format!("{}:{}", parsed.host_str()?, parsed.port()?)
        .parse()
        .ok()?;
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.set_recv_buffer_size(4096).ok()?;
    let stream = socket.connect(addr).await.ok()?;
    tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
        .await
        .ok()
        .map(|(ws, _)| ws)
}

/// Submissions at a steady pace to users in turn, through whichever node of
/// `addrs` answers. Remembers what was accepted (202), and what may have
/// been (outcome unknown).
pub struct Traffic {
    stop: Arc<AtomicBool>,
    pub accepted_count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Vec<(String, i64)>, usize)>,
}

impl Traffic {
    pub fn start(addrs: Arc<Mutex<Vec<String>>>, users: Vec<String>, pause: Duration) -> Self {
        Self::start_with(addrs, users, pause, HashMap::new(), 0)
    }

    /// [`Traffic::start`], where messages to the users in `filler` carry
    /// that many bytes of padding, and every `burst`-th submission (0:
    /// none) is a batch of 30 messages to one user.
    pub fn start_with(
        addrs: Arc<Mutex<Vec<String>>>,
        users: Vec<String>,
        pause: Duration,
        filler: HashMap<String, usize>,
        burst: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let accepted_count = Arc::new(AtomicUsize::new(0));
        let task = {
            let (stop, accepted_count) = (stop.clone(), accepted_count.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(8))
                    .build()
                    .unwrap();
                let mut accepted = Vec::new();
                let mut unknown = 0;
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let user = users[n % users.len()].clone();
                    let addr = {
                        let addrs = addrs.lock().unwrap();
                        addrs[n % addrs.len()].clone()
                    };
                    n += 1;
                    let pad = "p".repeat(filler.get(&user).copied().unwrap_or(0));
                    let data = if pad.is_empty() {
                        json!(n)
                    } else {
                        json!({"n": n, "pad": pad})
                    };
                    let one = json!({"to": {"user": user}, "data": data});
                    let batch = burst > 0 && n.is_multiple_of(burst);
                    let (path, body) = if batch {
                        ("batch", json!(vec![one; 30]))
                    } else {
                        ("", one)
                    };
                    let sent = http
                        .post(
                            format!("http://{addr}/v1/messages/{path}")
                                .trim_end_matches('/')
                                .to_owned(),
                        )
                        .json(&body)
                        .send()
                        .await;
                    if let Ok(answer) = sent {
                        let (status, body) = response(answer).await;
                        match status {
                            202 if batch => {
                                for id in body["ids"].as_array().unwrap() {
                                    accepted.push((
                                        user.clone(),
                                        id.as_str().unwrap().parse().unwrap(),
                                    ));
                                }
                                accepted_count.fetch_add(30, Ordering::AcqRel);
                            }
                            202 => {
                                accepted
                                    .push((user, body["id"].as_str().unwrap().parse().unwrap()));
                                accepted_count.fetch_add(1, Ordering::AcqRel);
                            }
                            504 => unknown += 1,
                            _ => {}
                        }
                    }
                    tokio::time::sleep(pause).await;
                }
                (accepted, unknown)
            })
        };
        Self {
            stop,
            accepted_count,
            task,
        }
    }

    /// Waits until `n` more messages than now have been accepted.
    pub async fn flows(&self, n: usize) {
        let target = self.accepted_count.load(Ordering::Acquire) + n;
        let count = self.accepted_count.clone();
        eventually("traffic to flow", move || {
            let now = count.load(Ordering::Acquire);
            async move { (now >= target).then_some(()) }
        })
        .await;
    }

    /// Stops; answers the accepted (user, id) pairs and how many outcomes
    /// were unknown.
    pub async fn stop(self) -> (Vec<(String, i64)>, usize) {
        self.stop.store(true, Ordering::Release);
        self.task.await.unwrap()
    }
}

/// Checks what resuming clients got against what was accepted: every
/// accepted message reached its user, and each connection saw its ids in
/// increasing order. Answers the number of messages received more than once.
pub fn assert_nothing_lost(
    accepted: &[(String, i64)],
    received: &HashMap<String, Vec<Connection>>,
) -> usize {
    assert_nothing_lost_but(accepted, received, &HashMap::new())
}

/// [`assert_nothing_lost`], where `excused` messages of a user may be
/// missing: those written to a socket of theirs that died before the client
/// read them (a client that does not resume with `since` cannot get those
/// back, as the README says).
pub fn assert_nothing_lost_but(
    accepted: &[(String, i64)],
    received: &HashMap<String, Vec<Connection>>,
    excused: &HashMap<String, Vec<i64>>,
) -> usize {
    let mut duplicates = 0;
    for (user, connections) in received {
        for connection in connections {
            assert!(
                connection.ids.windows(2).all(|w| w[0] < w[1]),
                "{user}: connection {} on {} got its ids out of order: {:?}",
                connection.connection_id,
                connection.node_id,
                connection.ids
            );
        }
        let mut all: Vec<i64> = connections.iter().flat_map(|c| c.ids.clone()).collect();
        let total = all.len();
        all.sort_unstable();
        all.dedup();
        duplicates += total - all.len();
        let missing: Vec<i64> = accepted
            .iter()
            .filter(|(u, _)| u == user)
            .map(|(_, id)| *id)
            .filter(|id| all.binary_search(id).is_err())
            .filter(|id| !excused.get(user).is_some_and(|e| e.contains(id)))
            .collect();
        assert!(
            missing.is_empty(),
            "{user}: accepted but never received: {missing:?} (connections: {:?})",
            connections
                .iter()
                .map(|c| (&c.node_id, c.ids.first(), c.ids.last(), c.ids.len()))
                .collect::<Vec<_>>()
        );
    }
    duplicates
}

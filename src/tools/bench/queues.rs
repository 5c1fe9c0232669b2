//! Queue throughput over STOMP/TCP, next to user messages over the same
//! path: producers on node a SEND (no receipts) as fast as the node reads
//! them, and consumers on both nodes take them; each producer ends with a
//! DISCONNECT whose receipt says everything before it is stored. Both kinds
//! go through the group commit; a queue message is then claimed for one
//! consumer, a user message routed to its user's connection.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::clients;
use super::cluster::BenchCluster;
use crate::protocol::stomp::FrameLimits;
use crate::stomp_tcp::complete_frame;

/// What the producers send to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `/queue/bench`, one queue with every consumer competing.
    Queue,
    /// `/user/<consumer>/queue/bench`, a user per consumer.
    User,
}

#[derive(Debug, Serialize)]
pub struct TcpThroughput {
    pub kind: Kind,
    pub producers: usize,
    pub consumers: usize,
    pub seconds: f64,
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub delivered_per_sec: f64,
}

/// A raw STOMP connection over TCP: CONNECTed as backend `login`.
struct Conn {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr, login: &str) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let connect = format!("CONNECT\naccept-version:1.2\nlogin:{login}\nheart-beat:0,0\n\n\0");
        stream.write_all(connect.as_bytes()).await?;
        let mut conn = Self {
            stream,
            buffer: Vec::new(),
        };
        let connected = conn.frame().await?.context("closed before CONNECTED")?;
        if !connected.starts_with(b"CONNECTED") {
            bail!("not connected: {}", String::from_utf8_lossy(&connected));
        }
        Ok(conn)
    }

    /// The next frame, without its NUL; None at the end of the connection.
    async fn frame(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            let start = self
                .buffer
                .iter()
                .position(|b| *b != b'\n' && *b != b'\r')
                .unwrap_or(self.buffer.len());
            self.buffer.drain(..start);
            // Frames as large as a node sends them.
            let limits = FrameLimits::new(16 * 1024 * 1024);
            if let Some(end) = complete_frame(&self.buffer, &limits) {
                let mut frame: Vec<u8> = self.buffer.drain(..end).collect();
                frame.pop();
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// A MESSAGE frame's `message-id`.
fn message_id(frame: &[u8]) -> Option<i64> {
    let split = frame.windows(2).position(|w| w == b"\n\n")?;
    std::str::from_utf8(&frame[..split])
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("message-id:"))?
        .parse()
        .ok()
}

pub async fn tcp_throughput(
    cluster: &BenchCluster,
    kind: Kind,
    producers: usize,
    consumers: usize,
    duration: Duration,
) -> anyhow::Result<TcpThroughput> {
    let stomp = |index: usize| {
        cluster.nodes[index]
            .stomp_addr
            .context("the cluster does not serve STOMP over TCP")
    };
    let received = Arc::new(Mutex::new(Vec::<i64>::new()));
    let mut readers = Vec::new();
    for i in 0..consumers {
        let login = format!("bq{i}");
        let mut conn = Conn::open(stomp(i % 2)?, &login).await?;
        let destination = match kind {
            Kind::Queue => "/queue/bench",
            Kind::User => "/user/queue/bench",
        };
        let subscribe = format!(
            "SUBSCRIBE\nid:0\ndestination:{destination}\nprefetch-count:1000\nreceipt:s\n\n\0"
        );
        conn.stream.write_all(subscribe.as_bytes()).await?;
        conn.frame().await?.context("closed before the receipt")?;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(frame)) = conn.frame().await {
                if let Some(id) = message_id(&frame) {
                    received.lock().await.push(id);
                }
            }
        }));
    }
    let padding = clients::padding(200);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let mut conn = Conn::open(stomp(0)?, &format!("bp{p}")).await?;
        let padding = padding.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut batch = Vec::with_capacity(16 * 512);
            'sending: while Instant::now() < deadline {
                batch.clear();
                for _ in 0..16 {
                    let destination = match kind {
                        Kind::Queue => "/queue/bench".to_owned(),
                        Kind::User => {
                            format!("/user/bq{}/queue/bench", (sent as usize + p) % consumers)
                        }
                    };
                    let body = format!(r#"{{"n":{sent},"p":"{padding}"}}"#);
                    batch.extend_from_slice(
                        format!(
                            "SEND\ndestination:{destination}\ncontent-type:application/json\ncontent-length:{}\n\n{body}\0",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    sent += 1;
                }
                if conn.stream.write_all(&batch).await.is_err() {
                    sent -= 16;
                    break 'sending;
                }
            }
            let confirmed = conn
                .stream
                .write_all(b"DISCONNECT\nreceipt:bye\n\n\0")
                .await
                .is_ok()
                && tokio::time::timeout(Duration::from_secs(30), conn.frame())
                    .await
                    .is_ok_and(|f| f.is_ok_and(|f| f.is_some_and(|f| f.starts_with(b"RECEIPT"))));
            if !confirmed {
                eprintln!("(a producer's DISCONNECT was not confirmed)");
            }
            sent
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await?;
    }
    let waited = Instant::now();
    while (received.lock().await.len() as u64) < sent && waited.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    for reader in readers {
        reader.abort();
    }
    let ids = received.lock().await.clone();
    let distinct: HashSet<i64> = ids.iter().copied().collect();
    let delivered = distinct.len() as u64;
    Ok(TcpThroughput {
        kind,
        producers,
        consumers,
        seconds,
        sent,
        delivered,
        lost: sent.saturating_sub(delivered),
        duplicates: ids.len() as u64 - delivered,
        delivered_per_sec: delivered as f64 / seconds,
    })
}

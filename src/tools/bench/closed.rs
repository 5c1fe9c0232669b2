//! Closed-loop scenarios (each sender waits for its previous message to be
//! delivered, as an application that waits for its sends does), over every
//! way in; and STOMP producers at full speed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use super::clients::{self, Http, Socket};
use super::cluster::BenchCluster;

/// How a closed-loop sender sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// `POST /v1/messages`, answered 202 after commit.
    Http,
    /// A JSON `publish` frame, to a topic.
    Publish,
    /// A STOMP SEND without a receipt.
    Stomp,
    /// A STOMP SEND with a receipt.
    StompReceipt,
}

impl Way {
    pub const ALL: [Way; 4] = [Way::Http, Way::Publish, Way::Stomp, Way::StompReceipt];

    pub fn as_str(self) -> &'static str {
        match self {
            Way::Http => "http",
            Way::Publish => "json publish",
            Way::Stomp => "stomp send",
            Way::StompReceipt => "stomp send+receipt",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Way::Http => "h",
            Way::Publish => "p",
            Way::Stomp => "s",
            Way::StompReceipt => "r",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ClosedLoop {
    pub way: Way,
    pub senders: usize,
    pub seconds: f64,
    pub delivered: usize,
    pub errors: u64,
    pub delivered_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// `senders` senders on node a, each with its receiver on node b.
pub async fn closed_loop(
    cluster: &BenchCluster,
    way: Way,
    senders: usize,
    duration: Duration,
) -> anyhow::Result<ClosedLoop> {
    let (a, b) = (cluster.nodes[0].addr, cluster.nodes[1].addr);
    let http = Http::new(senders);
    let errors = Arc::new(AtomicU64::new(0));
    let padding = clients::padding(200);
    let mut pairs = Vec::with_capacity(senders);
    for i in 0..senders {
        let user = format!("cl{}-{i}", way.tag());
        let topic = format!("cl.{}.{i}", way.tag());
        let localhost = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        let mut receiver =
            clients::connect_ws(b, localhost, &format!("/v1/ws?user={user}")).await?;
        let producer = match way {
            Way::Http => None,
            Way::Publish => {
                clients::send_text(
                    &mut receiver,
                    format!(r#"{{"op":"subscribe","topic":"{topic}"}}"#),
                )
                .await?;
                clients::wait_for(&mut receiver, "\"subscribed\"").await?;
                let path = format!("/v1/ws?user=clp{i}");
                Some(clients::connect_ws(a, localhost, &path).await?)
            }
            Way::Stomp | Way::StompReceipt => {
                Some(clients::connect_stomp(a, &format!("/v1/ws?user=cls{i}")).await?)
            }
        };
        pairs.push((user, topic, receiver, producer));
    }
    let started = Instant::now();
    let deadline = started + duration;
    let url = format!("http://{a}/v1/messages");
    let mut tasks = Vec::with_capacity(senders);
    for (user, topic, mut receiver, mut producer) in pairs {
        let (http, url, errors, padding) =
            (http.clone(), url.clone(), errors.clone(), padding.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let data = format!(r#"{{"n":{n},"p":"{padding}"}}"#);
                let sent = Instant::now();
                let ok = match (way, producer.as_mut()) {
                    (Way::Http, _) => {
                        let body = format!(r#"{{"to":{{"user":"{user}"}},"data":{data}}}"#);
                        matches!(http.post(&url, body).await, Ok((202, _)))
                    }
                    (Way::Publish, Some(ws)) => {
                        let frame =
                            format!(r#"{{"op":"publish","topic":"{topic}","data":{data}}}"#);
                        clients::send_text(ws, frame).await.is_ok()
                    }
                    (Way::Stomp, Some(ws)) => {
                        let destination = format!("/user/{user}/queue/bench");
                        ws.send(clients::stomp_send(&destination, &data, None))
                            .await
                            .is_ok()
                    }
                    (Way::StompReceipt, Some(ws)) => {
                        let destination = format!("/user/{user}/queue/bench");
                        let receipt = n.to_string();
                        ws.send(clients::stomp_send(&destination, &data, Some(&receipt)))
                            .await
                            .is_ok()
                    }
                    _ => false,
                };
                let delivered = ok
                    && tokio::time::timeout(
                        Duration::from_secs(10),
                        clients::wait_for(&mut receiver, "\"op\":\"message\""),
                    )
                    .await
                    .is_ok_and(|r| r.is_ok());
                // The producer's answer (`published`, RECEIPT) is read too.
                let answered = match (way, producer.as_mut()) {
                    (Way::Publish, Some(ws)) => {
                        clients::wait_for(ws, "\"published\"").await.is_ok()
                    }
                    (Way::StompReceipt, Some(ws)) => clients::wait_for(ws, "RECEIPT").await.is_ok(),
                    _ => true,
                };
                if delivered && answered {
                    latencies.push(sent.elapsed().as_micros() as u64);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            let _ = receiver.close(None).await;
            if let Some(mut ws) = producer {
                let _ = ws.close(None).await;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let ms = |micros: u64| micros as f64 / 1000.0;
    Ok(ClosedLoop {
        way,
        senders,
        seconds,
        delivered: latencies.len(),
        errors: errors.load(Ordering::Relaxed),
        delivered_per_sec: latencies.len() as f64 / seconds,
        p50_ms: ms(clients::percentile(&latencies, 50.0)),
        p99_ms: ms(clients::percentile(&latencies, 99.0)),
    })
}

#[derive(Debug, Serialize)]
pub struct StompThroughput {
    pub producers: usize,
    pub receivers: usize,
    pub seconds: f64,
    /// SEND frames written (each confirmed stored by the DISCONNECT receipt
    /// that follows them).
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub delivered_per_sec: f64,
}

/// STOMP producers on node a sending SEND frames (no receipts) as fast as
/// the server reads them, to receivers on node b; each ends with a
/// DISCONNECT whose receipt says everything before it is stored.
pub async fn stomp_throughput(
    cluster: &BenchCluster,
    producers: usize,
    receiver_count: usize,
    duration: Duration,
) -> anyhow::Result<StompThroughput> {
    let epoch = Instant::now();
    let listening = super::scenarios::Listening::start(
        super::scenarios::receivers(cluster, 1, "st", receiver_count).await?,
        epoch,
    );
    let a = cluster.nodes[0].addr;
    let mut sockets: Vec<Socket> = Vec::with_capacity(producers);
    for i in 0..producers {
        sockets.push(clients::connect_stomp(a, &format!("/v1/ws?user=stp{i}")).await?);
    }
    let padding = clients::padding(200);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let padding = padding.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut n = i;
            'sending: while Instant::now() < deadline {
                for _ in 0..16 {
                    let destination = format!("/user/st{}/queue/bench", n % receiver_count);
                    n += producers;
                    let data = format!(r#"{{"t":{},"p":"{padding}"}}"#, clients::now_micros(epoch));
                    if ws
                        .feed(clients::stomp_send(&destination, &data, None))
                        .await
                        .is_err()
                    {
                        break 'sending;
                    }
                    sent += 1;
                }
                if ws.flush().await.is_err() {
                    break;
                }
            }
            let bye = Message::text("DISCONNECT\nreceipt:bye\n\n\0");
            let confirmed = ws.send(bye).await.is_ok()
                && tokio::time::timeout(
                    Duration::from_secs(30),
                    clients::wait_for(&mut ws, "RECEIPT"),
                )
                .await
                .is_ok_and(|r| r.is_ok());
            if !confirmed {
                eprintln!("(a STOMP producer's DISCONNECT was not confirmed)");
            }
            while let Some(Ok(_)) = ws.next().await {}
            sent
        }));
    }
    let mut sent = 0;
    for task in tasks {
        sent += task.await?;
    }
    listening.until(sent, Duration::from_secs(60)).await;
    let seconds = started.elapsed().as_secs_f64();
    let received = listening.finish().await;
    let mut ids: Vec<i64> = received
        .iter()
        .flat_map(|r| r.ids.iter().copied())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let delivered = ids.len() as u64;
    Ok(StompThroughput {
        producers,
        receivers: receiver_count,
        seconds,
        sent,
        delivered,
        lost: sent.saturating_sub(delivered),
        delivered_per_sec: delivered as f64 / seconds,
    })
}

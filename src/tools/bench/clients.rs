//! The benchmark's clients: an HTTP submitter on keep-alive connections and
//! WebSocket receivers that parse only what they measure.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;

pub use crate::tools::http_client::HttpClient as Http;

/// The `"id":"123"` of a 202 answer or of a `message` frame.
pub fn parse_id(text: &[u8]) -> Option<i64> {
    let at = find(text, b"\"id\":\"")? + 6;
    let end = text[at..].iter().position(|b| *b == b'"')? + at;
    std::str::from_utf8(&text[at..end]).ok()?.parse().ok()
}

/// The send time the benchmark put in a message's data (`"t":<µs>`).
pub fn parse_sent_at(text: &[u8]) -> Option<u64> {
    let mut at = find(text, b"\"t\":")? + 4;
    // jsonb writes `"t": 123`.
    while text.get(at) == Some(&b' ') {
        at += 1;
    }
    let end = text[at..].iter().position(|b| !b.is_ascii_digit())? + at;
    std::str::from_utf8(&text[at..end]).ok()?.parse().ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A 200-byte-or-so message body for `user`, with a send time.
pub fn message_body(to: &str, sent_at_micros: u64, padding: &str) -> String {
    format!(
        r#"{{"to":{},"data":{{"t":{sent_at_micros},"p":"{padding}"}}}}"#,
        to
    )
}

/// Padding that makes `data` about `bytes` long.
pub fn padding(bytes: usize) -> String {
    "x".repeat(bytes.saturating_sub(24))
}

/// Microseconds since the benchmark's epoch.
pub fn now_micros(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// What a receiver saw.
#[derive(Default)]
pub struct Received {
    pub ids: Vec<i64>,
    /// Submit → receipt latencies, in microseconds.
    pub latencies: Vec<u64>,
}

/// A connected WebSocket client that has read its welcome.
pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connects to `url` from `source` (a loopback address: 127.0.0.x), so that
/// many sockets do not run out of ephemeral ports on one address.
pub async fn connect_ws(server: SocketAddr, source: IpAddr, path: &str) -> anyhow::Result<Socket> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}{path}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    // The welcome: the connection is registered.
    match ws.next().await {
        Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => Ok(ws),
        other => anyhow::bail!("no welcome: {other:?}"),
    }
}

/// Connects a STOMP client over WebSocket to `path` and reads its
/// CONNECTED (heart-beats off).
pub async fn connect_stomp(server: SocketAddr, path: &str) -> anyhow::Result<Socket> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = tokio::net::TcpStream::connect(server).await?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{server}{path}").into_client_request()?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("v12.stomp"),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    ws.send(Message::text(
        "CONNECT\naccept-version:1.2\nhost:bench\nheart-beat:0,0\n\n\0",
    ))
    .await?;
    wait_for(&mut ws, "CONNECTED").await?;
    Ok(ws)
}

/// A STOMP SEND frame.
pub fn stomp_send(destination: &str, body: &str, receipt: Option<&str>) -> Message {
    let receipt = receipt.map_or(String::new(), |r| format!("receipt:{r}\n"));
    Message::text(format!(
        "SEND\ndestination:{destination}\ncontent-type:application/json\n{receipt}\n{body}\0"
    ))
}

/// Where a receiver reconnects, as a real client does, when the server
/// closes its socket: the same path with `since` its newest id.
#[derive(Clone)]
pub struct Resume {
    pub server: SocketAddr,
    pub path: String,
    /// Reconnections made, by every receiver.
    pub count: Arc<AtomicU64>,
}

/// Reads messages until `stop`, recording ids and latencies; with `resume`,
/// reconnects (once a second at most) whenever the server closes the socket.
pub async fn receive(
    mut ws: Socket,
    epoch: Instant,
    counter: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
    resume: Option<Resume>,
) -> Received {
    let mut received = Received::default();
    loop {
        let next = tokio::select! {
            next = ws.next() => next,
            () = stop.cancelled() => break,
        };
        let ended = match &next {
            Some(Ok(Message::Close(frame))) => Some(format!("{frame:?}")),
            Some(Err(error)) => Some(error.to_string()),
            None => Some("the connection ended".to_owned()),
            Some(Ok(_)) => None,
        };
        if let (Some(why), Some(resume)) = (ended, &resume) {
            let since = received.ids.iter().max().copied().unwrap_or(0);
            eprintln!("(a receiver was closed: {why}; resuming since {since})");
            tokio::time::sleep(Duration::from_secs(1)).await;
            let path = format!("{}&since={since}", resume.path);
            match connect_ws(
                resume.server,
                IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                &path,
            )
            .await
            {
                Ok(again) => {
                    ws = again;
                    resume.count.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(error) => {
                    eprintln!("(the receiver could not reconnect: {error})");
                    break;
                }
            }
        }
        match next {
            Some(Ok(Message::Text(text))) => {
                let bytes = text.as_bytes();
                if let Some(id) = parse_id(bytes) {
                    received.ids.push(id);
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(sent) = parse_sent_at(bytes) {
                        received
                            .latencies
                            .push(now_micros(epoch).saturating_sub(sent));
                    }
                }
            }
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    let _ = ws.close(None).await;
    received
}

/// Sends a JSON frame on a socket.
pub async fn send_text(ws: &mut Socket, text: String) -> anyhow::Result<()> {
    ws.send(Message::text(text)).await?;
    Ok(())
}

/// Reads until a frame whose text contains `marker`.
pub async fn wait_for(ws: &mut Socket, marker: &str) -> anyhow::Result<()> {
    while let Some(message) = ws.next().await {
        if let Message::Text(text) = message?
            && text.contains(marker)
        {
            return Ok(());
        }
    }
    anyhow::bail!("closed before {marker}")
}

/// p-th percentile (0–100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_the_frames_the_benchmark_reads() {
        let frame = br#"{"op":"message","id":"456","to":{"user":"u1"},"data":{"t":123,"p":"xx"},"created_at":"x"}"#;
        assert_eq!(parse_id(frame), Some(456));
        assert_eq!(parse_sent_at(frame), Some(123));
        assert_eq!(parse_sent_at(br#"{"data":{"p": "x", "t": 77}}"#), Some(77));
        assert_eq!(parse_id(br#"{"id":"789"}"#), Some(789));
        assert_eq!(parse_id(b"{}"), None);
        let body = message_body(r#"{"user":"u1"}"#, 5, &padding(200));
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        let data_len = value["data"].to_string().len();
        assert!((190..=210).contains(&data_len), "{data_len}");
        assert_eq!(percentile(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 50.0), 6);
        assert_eq!(percentile(&[1, 2, 3], 100.0), 3);
    }
}

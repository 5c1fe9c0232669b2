//! A STOMP client over plain TCP, speaking raw frames: what Spring's broker
//! relay (and any STOMP broker client) does on the wire.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::clients::StompReply;
use super::waiting::{WAIT, within};

pub struct TcpStomp {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// Heart-beat end-of-lines received.
    pub beats: usize,
}

/// STOMP 1.2's escaping of a header value.
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\r', "\\r")
        .replace('\n', "\\n")
        .replace(':', "\\c")
}

impl TcpStomp {
    pub async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect over TCP");
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buffer: Vec::new(),
            beats: 0,
        }
    }

    /// Opens and sends CONNECT with `accept-version:1.1,1.2` (as Spring
    /// does) and these headers, unescaped as CONNECT wants; returns the
    /// answer (CONNECTED or ERROR).
    pub async fn connect(addr: SocketAddr, headers: &[(&str, &str)]) -> (Self, StompReply) {
        let mut client = Self::open(addr).await;
        let mut frame = String::from("CONNECT\naccept-version:1.1,1.2\n");
        for (k, v) in headers {
            frame.push_str(&format!("{k}:{v}\n"));
        }
        frame.push_str("\n\0");
        client.send_raw(frame.as_bytes()).await;
        let reply = client.next().await;
        (client, reply)
    }

    /// Connects as a trusted backend (an API key as passcode).
    pub async fn backend(addr: SocketAddr, login: &str) -> Self {
        let (client, connected) = Self::connect(
            addr,
            &[
                ("login", login),
                ("passcode", super::cluster::API_KEY),
                ("heart-beat", "0,0"),
            ],
        )
        .await;
        assert_eq!(connected.command, "CONNECTED", "{connected:?}");
        client
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends a frame; header values are escaped (STOMP 1.2).
    pub async fn send(&mut self, command: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut frame = format!("{command}\n").into_bytes();
        for (k, v) in headers {
            frame.extend_from_slice(format!("{}:{}\n", escape(k), escape(v)).as_bytes());
        }
        frame.extend_from_slice(format!("content-length:{}\n\n", body.len()).as_bytes());
        frame.extend_from_slice(body);
        frame.push(0);
        self.send_raw(&frame).await;
    }

    /// Subscribes and waits for the subscription's RECEIPT.
    pub async fn subscribe(&mut self, id: &str, destination: &str, extra: &[(&str, &str)]) {
        let receipt = format!("sub-{id}");
        let mut headers = vec![
            ("id", id),
            ("destination", destination),
            ("receipt", &receipt),
        ];
        headers.extend_from_slice(extra);
        self.send("SUBSCRIBE", &headers, b"").await;
        let reply = self.next().await;
        assert_eq!(reply.command, "RECEIPT", "{reply:?}");
        assert_eq!(reply.header("receipt-id"), Some(receipt.as_str()));
    }

    /// Sends and waits for the RECEIPT (the message is stored).
    pub async fn send_stored(&mut self, destination: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut all = vec![("destination", destination), ("receipt", "stored")];
        all.extend_from_slice(headers);
        self.send("SEND", &all, body).await;
        let reply = self.next().await;
        assert_eq!(reply.command, "RECEIPT", "{reply:?}");
    }

    /// The next frame (heart-beats counted and skipped).
    pub async fn next(&mut self) -> StompReply {
        within(WAIT, self.read_frame())
            .await
            .expect("a frame, not the end of the connection")
    }

    /// The next frame within `limit`, if one comes.
    pub async fn next_within(&mut self, limit: Duration) -> Option<StompReply> {
        tokio::time::timeout(limit, self.read_frame())
            .await
            .ok()
            .flatten()
    }

    /// Waits until the server ends the connection; answers the frames it
    /// sent before.
    pub async fn until_closed(&mut self) -> Vec<StompReply> {
        within(WAIT, async {
            let mut frames = Vec::new();
            while let Some(frame) = self.read_frame().await {
                frames.push(frame);
            }
            frames
        })
        .await
    }

    async fn read_frame(&mut self) -> Option<StompReply> {
        loop {
            while matches!(self.buffer.first(), Some(b'\n' | b'\r')) {
                if self.buffer[0] == b'\n' {
                    self.beats += 1;
                }
                self.buffer.remove(0);
            }
            if let Some(end) = frame_end(&self.buffer) {
                let frame: Vec<u8> = self.buffer.drain(..end).collect();
                return Some(StompReply::parse(&frame, true));
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Where the first complete frame in `buffer` ends (after its NUL).
fn frame_end(buffer: &[u8]) -> Option<usize> {
    let split = buffer.windows(2).position(|w| w == b"\n\n")?;
    let head = std::str::from_utf8(&buffer[..split]).ok()?;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let body = split + 2;
    match length {
        Some(len) if buffer.len() > body + len => Some(body + len + 1),
        Some(_) => None,
        None => buffer[body..]
            .iter()
            .position(|b| *b == 0)
            .map(|p| body + p + 1),
    }
}

//! Starts clients: JSON and STOMP WebSocket clients, tokens, and HTTP answers.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::cluster::JWT_SECRET;
use super::waiting::{WAIT, within};

pub async fn response(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

pub fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// An HS256 token for `user`, valid for an hour, with `extra` claims.
pub fn token(user: &str, extra: Value) -> String {
    let mut claims = json!({ "sub": user, "exp": chrono::Utc::now().timestamp() + 3600 });
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

/// A WebSocket client speaking the JSON protocol.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub connection_id: String,
    pub node_id: String,
}

impl Client {
    /// Connects and reads the welcome frame.
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Self, tungstenite::Error> {
        let mut request = url.into_client_request()?;
        for (name, value) in headers {
            request.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        let mut client = Self {
            ws,
            connection_id: String::new(),
            node_id: String::new(),
        };
        let welcome = client.next_frame().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        client.connection_id = welcome["connection_id"].as_str().unwrap().to_owned();
        client.node_id = welcome["node_id"].as_str().unwrap().to_owned();
        Ok(client)
    }

    /// Opens the socket without reading anything: for connections the
    /// server may refuse after the upgrade.
    pub async fn connect_raw(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("upgrade");
        Self {
            ws,
            connection_id: String::new(),
            node_id: String::new(),
        }
    }

    /// Sends, reporting rather than panicking when the server has gone.
    pub async fn try_send(&mut self, message: Message) -> Result<(), tungstenite::Error> {
        self.ws.send(message).await
    }

    pub fn ws_mut(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }

    /// The next JSON frame (control frames are skipped).
    pub async fn next_frame(&mut self) -> Value {
        within(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return serde_json::from_str(&text).expect("JSON frame");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a frame, got {other:?}"),
                }
            }
        })
        .await
    }

    /// The next frame of any kind; None once the socket is closed or broken.
    pub async fn next_raw(&mut self) -> Option<Message> {
        match self.ws.next().await {
            Some(Ok(message)) => Some(message),
            _ => None,
        }
    }

    /// The next `message` frame.
    pub async fn next_message(&mut self) -> Value {
        let frame = self.next_frame().await;
        assert_eq!(frame["op"], "message", "{frame}");
        frame
    }

    /// The ids of the next `n` messages.
    pub async fn message_ids(&mut self, n: usize) -> Vec<i64> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(id_of(&self.next_message().await));
        }
        ids
    }

    pub async fn send_json(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// Waits for the server to close the socket; returns the close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        within(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
    }

    /// Closes from the client side; true if the server answered with a close
    /// frame (a clean close handshake).
    pub async fn close(mut self) -> bool {
        let _ = self.ws.close(None).await;
        within(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(_))) => return true,
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return false,
                }
            }
        })
        .await
    }
}

pub fn id_of(frame: &Value) -> i64 {
    frame["id"]
        .as_str()
        .expect("string id")
        .parse()
        .expect("decimal id")
}

/// A frame the server sent, parsed the simple way (for tests).
#[derive(Debug, Clone)]
pub struct StompReply {
    pub command: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether it came as a binary WebSocket message.
    pub binary: bool,
}

impl StompReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn parse(bytes: &[u8], binary: bool) -> Self {
        let split = bytes
            .windows(2)
            .position(|w| w == b"\n\n")
            .expect("a blank line after the headers");
        let head = std::str::from_utf8(&bytes[..split]).expect("UTF-8 headers");
        let mut lines = head.lines();
        let command = lines.next().unwrap().to_owned();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (
                    k.to_owned(),
                    v.replace("\\c", ":")
                        .replace("\\n", "\n")
                        .replace("\\\\", "\\"),
                )
            })
            .collect();
        let rest = &bytes[split + 2..];
        let length = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse::<usize>().unwrap())
            .unwrap_or_else(|| rest.iter().position(|b| *b == 0).unwrap());
        assert_eq!(rest[length], 0, "NUL after the body");
        Self {
            command,
            headers,
            body: rest[..length].to_vec(),
            binary,
        }
    }
}

/// A STOMP client over WebSocket, speaking raw frames.
pub struct StompClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl StompClient {
    /// Opens the socket with a STOMP subprotocol (no CONNECT yet).
    pub async fn open(url: &str) -> Self {
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static("v12.stomp, v11.stomp, v10.stomp"),
        );
        let (ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        assert_eq!(response.headers()["sec-websocket-protocol"], "v12.stomp");
        Self { ws }
    }

    /// Opens and sends CONNECT with these headers; returns the client and
    /// the server's answer (CONNECTED, or ERROR).
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> (Self, StompReply) {
        let mut client = Self::open(url).await;
        let mut frame = String::from("CONNECT\naccept-version:1.0,1.1,1.2\nhost:test\n");
        for (k, v) in headers {
            frame.push_str(&format!("{k}:{v}\n"));
        }
        frame.push_str("\n\0");
        client.send_raw(frame.as_bytes()).await;
        let reply = client.next().await;
        (client, reply)
    }

    /// Connects and subscribes to `destination`, once the server confirms it.
    pub async fn subscribed(url: &str, destination: &str) -> Self {
        let (mut client, connected) = Self::connect(url, &[]).await;
        assert_eq!(connected.command, "CONNECTED");
        let headers = [
            ("id", "s"),
            ("destination", destination),
            ("receipt", "sub"),
        ];
        client.send("SUBSCRIBE", &headers, b"").await;
        assert_eq!(client.next().await.command, "RECEIPT");
        client
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let message = match std::str::from_utf8(bytes) {
            Ok(text) if !bytes[..bytes.len().saturating_sub(1)].contains(&0) => Message::text(text),
            _ => Message::binary(bytes.to_vec()),
        };
        self.ws.send(message).await.expect("send");
    }

    /// Sends a frame built from parts (headers unescaped: keep them simple).
    pub async fn send(&mut self, command: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut frame = format!("{command}\n").into_bytes();
        for (k, v) in headers {
            frame.extend_from_slice(format!("{k}:{v}\n").as_bytes());
        }
        if !body.is_empty() {
            frame.extend_from_slice(format!("content-length:{}\n", body.len()).as_bytes());
        }
        frame.push(b'\n');
        frame.extend_from_slice(body);
        frame.push(0);
        self.send_raw(&frame).await;
    }

    /// The next frame (heart-beats skipped).
    pub async fn next(&mut self) -> StompReply {
        within(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) if text.trim().is_empty() => continue,
                    Some(Ok(Message::Text(text))) => {
                        return StompReply::parse(text.as_bytes(), false);
                    }
                    Some(Ok(Message::Binary(bytes))) => return StompReply::parse(&bytes, true),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a STOMP frame, got {other:?}"),
                }
            }
        })
        .await
    }

    /// Waits for the close; returns its code.
    pub async fn closed(&mut self) -> Option<u16> {
        within(WAIT, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
    }
}

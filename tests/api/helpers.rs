//! The test harness: databases, clusters of nodes, and clients.

#![allow(dead_code)]

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use pgrelay::config::{Auth, NodeId, Settings};
use pgrelay::node::{self, RunningNode};
use pgrelay::pgtemp::{self, TempPostgres};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

pub const JWT_SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key-0123456789";

enum Server {
    External(String),
    Temporary(TempPostgres),
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        if std::env::var("TEST_LOG").is_ok() {
            pgrelay::telemetry::init(pgrelay::config::LogFormat::Text);
        }
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Server::External(url),
            _ => Server::Temporary(
                TempPostgres::start(pgtemp::Options::default())
                    .expect("start a throwaway PostgreSQL"),
            ),
        }
    })
}

fn admin_url() -> String {
    match server() {
        Server::External(url) => url.clone(),
        Server::Temporary(pg) => pg.url("postgres"),
    }
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let mut parsed = url::Url::parse(url).expect("DATABASE_URL is a URL");
    parsed.set_path(&format!("/{database}"));
    parsed.to_string()
}

/// A fresh, migrated database for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        let db = Self::empty().await;
        pgrelay::db::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// A fresh database without pgrelay's schema.
    pub async fn empty() -> Self {
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
            .expect("connect to the test server");
        drop_stale_databases(&admin).await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let name = format!("pgrelay_t_{now}_{:08x}", rand::random::<u32>());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create the test database");
        admin.close().await;
        let url = with_database(&admin_url(), &name);
        let pool = PgPoolOptions::new()
            .max_connections(5)
            .connect(&url)
            .await
            .expect("connect to the test database");
        Self { name, url, pool }
    }

    pub async fn drop_database(self) {
        self.pool.close().await;
        if let Ok(admin) = PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url())
            .await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

/// Databases of tests that failed (and so were kept) in earlier runs.
async fn drop_stale_databases(admin: &PgPool) {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.set(()).is_err() {
        return;
    }
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT datname::text FROM pg_database WHERE datname LIKE 'pgrelay_t_%'",
    )
    .fetch_all(admin)
    .await
    .unwrap_or_default();
    for name in names {
        let created = name
            .split('_')
            .nth(2)
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        if created < cutoff {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(admin)
            .await;
        }
    }
}

/// Which authentication a test cluster runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKind {
    None,
    Jwt,
}

pub fn settings(db: &TestDb, auth: AuthKind, index: usize) -> Settings {
    let mut settings = Settings::new(&db.url);
    settings.node_id = NodeId::parse(&format!("node-{}", (b'a' + index as u8) as char)).unwrap();
    settings.db_pool_size = 6;
    settings.shutdown_grace = Duration::from_secs(5);
    // Tests sweep explicitly (sweeper::sweep_once) unless they test the task.
    settings.sweep_interval = Duration::from_secs(3600);
    if auth == AuthKind::Jwt {
        settings.auth = Auth::Jwt {
            verifier: pgrelay::auth::JwtVerifier::hs256(JWT_SECRET.as_bytes()).unwrap(),
            api_keys: pgrelay::auth::ApiKeys::new([API_KEY]).unwrap(),
        };
    }
    settings
}

/// Several nodes on one fresh database.
pub struct Cluster {
    pub db: TestDb,
    pub nodes: Vec<Option<RunningNode>>,
    pub auth: AuthKind,
    pub http: reqwest::Client,
}

impl Cluster {
    pub async fn start(nodes: usize) -> Self {
        Self::start_with(nodes, AuthKind::None, |_, _| {}).await
    }

    pub async fn start_with(
        nodes: usize,
        auth: AuthKind,
        mut adjust: impl FnMut(usize, &mut Settings),
    ) -> Self {
        let db = TestDb::new().await;
        let mut running = Vec::new();
        for index in 0..nodes {
            let mut s = settings(&db, auth, index);
            adjust(index, &mut s);
            running.push(Some(node::start(s).await.expect("start a node")));
        }
        Self {
            db,
            nodes: running,
            auth,
            http: reqwest::Client::new(),
        }
    }

    pub fn node(&self, index: usize) -> &RunningNode {
        self.nodes[index].as_ref().expect("node is running")
    }

    pub fn node_id(&self, index: usize) -> String {
        self.node(index).node_id().to_string()
    }

    pub fn url(&self, index: usize, path: &str) -> String {
        format!("http://{}{path}", self.node(index).addr)
    }

    pub fn ws_url(&self, index: usize, query: &str) -> String {
        format!("ws://{}/v1/ws?{query}", self.node(index).addr)
    }

    /// Connects `user` to node `index` and waits for its welcome.
    pub async fn connect(&self, index: usize, user: &str) -> Client {
        self.connect_query(index, user, "").await
    }

    /// Like [`Cluster::connect`], with extra query parameters (e.g. `since=5`).
    pub async fn connect_query(&self, index: usize, user: &str, extra: &str) -> Client {
        let query = match self.auth {
            AuthKind::None => format!("user={}&{extra}", urlencode(user)),
            AuthKind::Jwt => format!("token={}&{extra}", token(user, json!({}))),
        };
        Client::connect(&self.ws_url(index, &query), &[])
            .await
            .expect("connect")
    }

    /// `POST` to node `index` with the API key (when auth is on).
    pub async fn post(&self, index: usize, path: &str, body: &Value) -> (u16, Value) {
        let mut request = self.http.post(self.url(index, path)).json(body);
        if self.auth == AuthKind::Jwt {
            request = request.bearer_auth(API_KEY);
        }
        response(request.send().await.expect("POST")).await
    }

    pub async fn get(&self, index: usize, path: &str) -> (u16, Value) {
        let mut request = self.http.get(self.url(index, path));
        if self.auth == AuthKind::Jwt {
            request = request.bearer_auth(API_KEY);
        }
        response(request.send().await.expect("GET")).await
    }

    pub async fn delete(&self, index: usize, path: &str) -> (u16, Value) {
        let mut request = self.http.delete(self.url(index, path));
        if self.auth == AuthKind::Jwt {
            request = request.bearer_auth(API_KEY);
        }
        response(request.send().await.expect("DELETE")).await
    }

    /// Sends `data` to `user` through node `index`; returns the message id.
    pub async fn send_to_user(&self, index: usize, user: &str, data: Value) -> i64 {
        let (status, body) = self
            .post(
                index,
                "/v1/messages",
                &json!({ "to": { "user": user }, "data": data }),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// Stops a node cleanly.
    pub async fn stop_node(&mut self, index: usize) {
        let node = self.nodes[index].take().expect("node is running");
        node.stop().await.expect("clean stop");
    }

    /// Stops every node (some may end with an error) and drops the database.
    pub async fn finish_allowing_failures(mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            let _ = node.stop().await;
        }
        self.db.drop_database().await;
    }

    /// Stops every node and drops the database.
    pub async fn finish(mut self) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].is_some() {
                self.stop_node(index).await;
            }
        }
        self.db.drop_database().await;
    }
}

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

/// Awaits `future`, failing the test after `limit`.
pub async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("timed out waiting")
}

/// Polls `check` until it returns Some, failing after [`WAIT`]. For state
/// that another process writes (rows in the database) and that no event
/// announces to the test.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(WAIT, what, check).await
}

/// [`eventually`], failing after `limit`.
pub async fn eventually_within<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `pgrelay serve` process.
pub struct NodeProcess {
    child: tokio::process::Child,
    pub node_id: String,
    pub addr: String,
    pub log: std::path::PathBuf,
}

impl NodeProcess {
    /// Starts `pgrelay serve` (auth none, JSON logs) on a free port and waits
    /// until it serves.
    pub async fn start(database_url: &str, node_id: &str, extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join("pgrelay-test-logs");
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(format!("{node_id}-{:08x}.log", rand::random::<u32>()));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgrelay"));
        command
            .args([
                "serve",
                "--auth",
                "none",
                "--node-id",
                node_id,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("DATABASE_URL", database_url)
            .env("PGRELAY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,pgrelay=debug")
            .env_remove("PGRELAY_AUTH")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn pgrelay");
        let addr = eventually(&format!("{node_id} to start"), || {
            let log = log.clone();
            let exited = child.try_wait().ok().flatten();
            async move {
                assert!(
                    exited.is_none(),
                    "{node_id} exited: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                let text = std::fs::read_to_string(&log).ok()?;
                text.lines()
                    .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                    .find(|line| line["message"] == "node started")
                    .and_then(|line| line["addr"].as_str().map(str::to_owned))
            }
        })
        .await;
        Self {
            child,
            node_id: node_id.to_owned(),
            addr,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/v1/ws?{query}", self.addr)
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    /// The log lines, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// SIGKILL: a crash, nothing cleaned up.
    pub async fn kill(mut self) {
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait().await;
    }

    /// SIGTERM, and the exit code.
    pub async fn terminate(mut self) -> Option<i32> {
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        within(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap()
            .code()
    }
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

    fn parse(bytes: &[u8], binary: bool) -> Self {
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

/// Installs the packages pinned in `dir`'s package-lock.json (`npm ci`),
/// once per test run, unless `marker` is already installed.
pub fn npm_installed(dir: &str, marker: &str) {
    static INSTALLED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if installed.iter().any(|d| d == dir) {
        return;
    }
    let dir_path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
    if !dir_path.join("node_modules").join(marker).exists() {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir_path)
            .status()
            .expect("these tests need Node.js 20 and npm on the PATH");
        assert!(status.success(), "npm ci in {dir} failed");
    }
    installed.push(dir.to_owned());
}

/// Runs `node <script> <name> <config>` in `dir` (under the crate), with
/// `env`, and asserts that it succeeded and printed `ok <name>`.
pub async fn node_scenario(
    dir: &str,
    script: &str,
    name: &str,
    config: &Value,
    env: &[(&str, &str)],
    limit: Duration,
) {
    let output = tokio::process::Command::new("node")
        .arg(script)
        .arg(name)
        .arg(config.to_string())
        .envs(env.iter().copied())
        .current_dir(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir))
        .kill_on_drop(true)
        .output();
    let output = within(limit, output).await.expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "scenario {name} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(&format!("ok {name}")), "{stdout}");
}

/// Waits until at least `n` of the nodes' database sessions wait on a lock
/// (a test holds it), and answers how many do.
pub async fn node_sessions_waiting_on_locks(pool: &PgPool, n: i64) -> i64 {
    eventually(&format!("{n} node sessions waiting on a lock"), || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name LIKE 'pgrelay node-%'
                AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        (waiting >= n).then_some(waiting)
    })
    .await
}

/// One sweep, by whichever node of the cluster holds (or takes) the
/// sweeper's lease, without reaping.
pub async fn sweep_now(cluster: &Cluster) -> pgrelay::sweeper::SweepReport {
    eventually("a node to hold the sweeper's lease", || async {
        for node in cluster.nodes.iter().flatten() {
            if let Some(report) = pgrelay::sweeper::sweep_once(&node.ctx, None).await.unwrap() {
                return Some(report);
            }
        }
        None
    })
    .await
}

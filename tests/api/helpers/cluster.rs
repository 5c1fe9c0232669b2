//! Starts clusters of in-process nodes on one fresh database.

use std::time::Duration;

use pgrelay::config::{Auth, NodeId, Settings};
use pgrelay::node::{self, RunningNode};
use serde_json::{Value, json};

use super::clients::{Client, response, token, urlencode};
use super::database::TestDb;
use super::waiting::eventually;

pub const JWT_SECRET: &str = "test-secret-0123456789abcdef";
pub const API_KEY: &str = "test-api-key-0123456789";

/// Which authentication a test cluster runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKind {
    None,
    Jwt,
}

pub fn settings(db: &TestDb, auth: AuthKind, index: usize) -> Settings {
    let (database_url, direct_database_url) = super::database::node_urls(&db.url);
    let mut settings = Settings::new(database_url);
    settings.direct_database_url = direct_database_url;
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
        // Started is not yet ready: the LISTEN connection comes up after.
        // Tests begin from a ready cluster.
        for node in running.iter().flatten() {
            eventually("the node ready", || async {
                node.state.not_ready().is_none().then_some(())
            })
            .await;
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

    /// Where node `index` serves STOMP over TCP (started with it on).
    pub fn stomp_addr(&self, index: usize) -> std::net::SocketAddr {
        self.node(index)
            .stomp_addr
            .expect("the node serves STOMP over TCP")
    }

    /// Nodes that also serve STOMP over TCP.
    pub async fn start_stomp(
        nodes: usize,
        auth: AuthKind,
        mut adjust: impl FnMut(usize, &mut Settings),
    ) -> Self {
        Self::start_with(nodes, auth, |index, settings| {
            settings.stomp_listen = Some("127.0.0.1:0".parse().unwrap());
            adjust(index, settings);
        })
        .await
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

/// One sweep, by whichever node of the cluster holds (or takes) the
/// sweeper's lease, without reaping.
pub async fn sweep_now(cluster: &Cluster) -> pgrelay::sweeper::SweepReport {
    eventually("a node to hold the sweeper's lease", || async {
        for node in cluster.nodes.iter().flatten() {
            if let Some(report) = pgrelay::sweeper::sweep_once(&node.state, None)
                .await
                .unwrap()
            {
                return Some(report);
            }
        }
        None
    })
    .await
}

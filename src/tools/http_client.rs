//! A small HTTP/1.1 client on keep-alive connections: for the benchmark's
//! submitters and the operator commands that talk to a node's API.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClient {
    /// Keeps up to `connections` idle connections per host.
    pub fn new(connections: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self { client }
    }

    /// POSTs JSON; returns the status and the body.
    pub async fn post(&self, url: &str, body: String) -> anyhow::Result<(u16, Bytes)> {
        self.send(Method::POST, url, None, Some(body)).await
    }

    /// Sends a request, with a bearer token and a JSON body where given.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        bearer: Option<&str>,
        json: Option<String>,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut request = hyper::Request::builder().method(method).uri(url);
        if let Some(token) = bearer {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if json.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(json.map(Bytes::from).unwrap_or_default()))?;
        let response = self.client.request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

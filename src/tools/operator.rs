//! Operator commands: `pgrelay send`, `pgrelay status` and `pgrelay tail`,
//! against the database (`DATABASE_URL`) or a node's HTTP API (`--url`).

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::Utc;
use hyper::Method;
use serde_json::{Value, json};
use sqlx::PgPool;

use super::http_client::HttpClient;
use crate::config::parse_duration;
use crate::message::{Payload, Target};
use crate::status::{self, ClusterStatus, DeliveryEvent};
use crate::write::enqueue::{self, Source};
use crate::write::group_commit::GroupCommit;
use crate::write::parse::{self, Draft, Rules};

/// Where an operator command reads and writes.
#[derive(clap::Args, Debug)]
pub struct Endpoint {
    /// PostgreSQL connection string (used unless --url is given).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// A node's base URL (e.g. http://127.0.0.1:8080): use its HTTP API
    /// instead of the database.
    #[arg(long, env = "PGRELAY_URL")]
    url: Option<String>,

    /// The API key for --url (not needed with auth `none`).
    #[arg(long, env = "PGRELAY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

enum Backend {
    Database(PgPool),
    Api {
        client: HttpClient,
        base: String,
        key: Option<String>,
    },
}

impl Endpoint {
    async fn open(self) -> anyhow::Result<Backend> {
        if let Some(url) = self.url.filter(|u| !u.trim().is_empty()) {
            return Ok(Backend::Api {
                client: HttpClient::new(1),
                base: url.trim_end_matches('/').to_owned(),
                key: self.api_key,
            });
        }
        let url = self
            .database_url
            .filter(|u| !u.trim().is_empty())
            .context("set DATABASE_URL (or --database-url), or --url for a node's HTTP API")?;
        let pool = crate::db::connect_any(&url)
            .await
            .context("cannot connect to the database (DATABASE_URL)")?;
        Ok(Backend::Database(pool))
    }
}

impl Backend {
    /// Calls the API; a problem+json answer becomes an error with its detail.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let Backend::Api { client, base, key } = self else {
            unreachable!("only with --url");
        };
        let url = format!("{base}{path}");
        let (status, bytes) = client
            .send(method, &url, key.as_deref(), body.map(|b| b.to_string()))
            .await
            .with_context(|| format!("cannot reach {base}"))?;
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status >= 400 {
            let detail = answer["detail"].as_str().unwrap_or("(no detail)");
            bail!("{url} answered {status}: {detail}");
        }
        Ok((status, answer))
    }
}

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// Recipients: user:NAME, users:A,B,…, topic:NAME, connection:ID or broadcast.
    #[arg(long)]
    to: String,

    /// The message data, as JSON; `-` reads it from stdin.
    data: String,

    /// Where the client files it, e.g. /queue/notifications.
    #[arg(long)]
    destination: Option<String>,

    /// Expire undelivered after this long (e.g. 10m) [default: the node's default TTL].
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,

    #[command(flatten)]
    endpoint: Endpoint,
}

/// `pgrelay send`: stores and routes one message, prints its id.
pub async fn send(args: SendArgs) -> anyhow::Result<()> {
    let to = parse_recipient(&args.to)?;
    let text = if args.data == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the data from stdin")?;
        text
    } else {
        args.data
    };
    let data: Box<serde_json::value::RawValue> =
        serde_json::from_str(text.trim()).context("the data is not valid JSON")?;
    let ttl_secs = args.ttl.map(|ttl| ttl.as_secs().max(1));
    let id = match args.endpoint.open().await? {
        Backend::Database(pool) => {
            let draft = Draft {
                target: Target::from_json(&to)?,
                destination: args.destination,
                payload: Payload::Json(data.into()),
                ttl_secs,
                headers: Vec::new(),
            };
            // The same rules and the same way in as a node's (here a batch
            // of one); the database applies its size and TTL limits.
            let message = parse::check(draft, &Rules::of_database())?;
            let slow = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
            let submitter = GroupCommit::start(pool, 1, 1, slow);
            submitter
                .submit(message, Source::Cli, enqueue::deadline(Source::Cli))
                .await?
                .to_string()
        }
        api => {
            let body =
                json!({"to": to, "data": data, "destination": args.destination, "ttl_s": ttl_secs});
            let (_, answer) = api.call(Method::POST, "/v1/messages", Some(body)).await?;
            answer["id"]
                .as_str()
                .context("the answer has no id")?
                .to_owned()
        }
    };
    write_out(&format!("{id}\n"))
}

/// Writes to stdout; a reader that went away (`| head`) ends the command
/// quietly.
fn write_out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// `user:alice` and friends, as the API's `to` object.
fn parse_recipient(to: &str) -> anyhow::Result<Value> {
    let (kind, name) = to.split_once(':').unwrap_or((to, ""));
    let value = match (kind, name) {
        ("broadcast", "") => json!({"broadcast": true}),
        ("user", name) if !name.is_empty() => json!({"user": name}),
        ("users", names) if !names.is_empty() => {
            json!({"users": names.split(',').collect::<Vec<_>>()})
        }
        ("topic", name) if !name.is_empty() => json!({"topic": name}),
        ("connection", id) if !id.is_empty() => json!({"connection": id}),
        _ => bail!(
            "--to {to:?}: expected user:NAME, users:A,B, topic:NAME, connection:ID or broadcast"
        ),
    };
    Ok(value)
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print JSON (as `GET /v1/status` answers) instead of a table.
    #[arg(long)]
    json: bool,

    /// A node silent this long is shown as silent (with --url, the node's own setting).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    node_timeout: Duration,

    #[command(flatten)]
    endpoint: Endpoint,
}

/// `pgrelay status`: nodes, connections, backlogs, the oldest pending work.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let status: ClusterStatus = match args.endpoint.open().await? {
        Backend::Database(pool) => status::read(&pool, args.node_timeout).await?,
        api => serde_json::from_value(api.call(Method::GET, "/v1/status", None).await?.1)
            .context("unexpected /v1/status answer")?,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&status)? + "\n"
    } else {
        status.to_string()
    };
    write_out(&text)
}

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// Only this user's deliveries.
    #[arg(long)]
    user: Option<String>,

    /// Only this node's deliveries.
    #[arg(long)]
    node: Option<String>,

    /// Start this far back (e.g. 5m) [default: now].
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,

    /// Stop after this many deliveries.
    #[arg(long)]
    count: Option<usize>,

    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    endpoint: Endpoint,
}

/// How often a caught-up tail asks for more (the cursor makes each record
/// come once, however late its batch commits).
const TAIL_POLL: Duration = Duration::from_millis(250);
const TAIL_PAGE: i64 = 1000;

/// `pgrelay tail`: prints deliveries as they are recorded, until Ctrl-C.
pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
    let backend = args.endpoint.open().await?;
    let mut cursor = status::DeliveryCursor {
        since: Utc::now() - chrono::Duration::from_std(args.since.unwrap_or_default())?,
        user: args.user.clone(),
        node: args.node.clone(),
        after: None,
    };
    let mut printed = 0usize;
    loop {
        let (page, next) = match &backend {
            Backend::Database(pool) => status::deliveries_page(pool, &cursor, TAIL_PAGE).await?,
            api => {
                let (_, answer) = api
                    .call(
                        Method::GET,
                        &format!(
                            "/v1/deliveries?cursor={}&limit={TAIL_PAGE}",
                            cursor.encode()
                        ),
                        None,
                    )
                    .await?;
                let page =
                    serde_json::from_value::<Vec<DeliveryEvent>>(answer["deliveries"].clone())
                        .context("unexpected /v1/deliveries answer")?;
                let next = answer["next"]
                    .as_str()
                    .and_then(|next| status::DeliveryCursor::decode(next).ok())
                    .context("unexpected /v1/deliveries answer: no `next` cursor")?;
                (page, next)
            }
        };
        let full = page.len() as i64 == TAIL_PAGE;
        for event in page {
            let line = if args.json {
                serde_json::to_string(&event)?
            } else {
                event.to_string()
            };
            write_out(&(line + "\n"))?;
            printed += 1;
            if args.count.is_some_and(|count| printed >= count) {
                return Ok(());
            }
        }
        cursor = next;
        // A full page: go on at once. Otherwise wait for more.
        if !full {
            tokio::select! {
                () = tokio::time::sleep(TAIL_POLL) => {}
                () = crate::process::wait_for_signal() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_read_like_the_api() {
        assert_eq!(
            parse_recipient("user:alice").unwrap(),
            json!({"user": "alice"})
        );
        assert_eq!(
            parse_recipient("users:a,b").unwrap(),
            json!({"users": ["a", "b"]})
        );
        assert_eq!(
            parse_recipient("topic:chat.room1").unwrap(),
            json!({"topic": "chat.room1"})
        );
        assert_eq!(
            parse_recipient("broadcast").unwrap(),
            json!({"broadcast": true})
        );
        assert!(parse_recipient("user:").is_err());
        assert!(parse_recipient("alice").is_err());
    }
}

#[derive(clap::Args, Debug)]
pub struct HealthArgs {
    /// The node to ask [default: this machine, at PGRELAY_LISTEN's port].
    #[arg(long)]
    url: Option<String>,

    /// The node's listen address, for the default URL.
    #[arg(
        long,
        env = "PGRELAY_LISTEN",
        default_value = "127.0.0.1:8080",
        hide = true
    )]
    listen: String,
}

/// `pgrelay health`: asks a node's `/readyz`. Exits 0 when it is ready, 1
/// with the reason otherwise: a container's HEALTHCHECK (the slim image has
/// no curl).
pub async fn health(args: HealthArgs) -> anyhow::Result<()> {
    let url = args.url.unwrap_or_else(|| {
        let port = args.listen.rsplit(':').next().unwrap_or("8080");
        format!("http://127.0.0.1:{port}")
    });
    let readyz = format!("{}/readyz", url.trim_end_matches('/'));
    let client = HttpClient::new(1);
    let asked = client.send(Method::GET, &readyz, None, None);
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), asked)
        .await
        .with_context(|| format!("{readyz} did not answer within 5 s"))?
        .with_context(|| format!("cannot reach {readyz}"))?;
    if status != 200 {
        let detail = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|body| body["detail"].as_str().map(str::to_owned))
            .unwrap_or_default();
        bail!("not ready ({status}): {detail}");
    }
    write_out("ready\n")
}

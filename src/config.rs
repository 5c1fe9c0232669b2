//! Configuration of a node: every option is a command-line flag and an
//! environment variable (`pgrelay serve --help` lists them), read once at start
//! and validated into [`Settings`] so that a bad value ends the process with one
//! clear line instead of surfacing later.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::builder::BoolishValueParser;

use crate::auth::{ApiKeys, JwtVerifier};

reason_error!(
    /// What is wrong with the configuration, naming the variable or flag.
    ConfigError
);

/// A node's name in the registry: 1–48 characters of `[A-Za-z0-9_-]`, so that
/// it fits in a NOTIFY channel name (63 bytes) after the `pgrelay.node.` prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn parse(value: &str) -> Result<Self, ConfigError> {
        let valid = !value.is_empty()
            && value.len() <= 48
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(format!(
                "invalid node id {value:?}: use 1-48 characters of A-Z, a-z, 0-9, '_' and '-'"
            )
            .into())
        }
    }

    /// A fresh id for a node that was not given one.
    pub fn generate() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self(format!("node-{}", &id[..12]))
    }

    /// The channel this node LISTENs on; writers NOTIFY it (see the migrations).
    pub fn channel(&self) -> String {
        Self::channel_of(&self.0)
    }

    /// The channel of the node named `node_id`: the one place Rust spells
    /// it (`relay.enqueue` spells it in SQL, in the migrations).
    pub fn channel_of(node_id: &str) -> String {
        format!("pgrelay.node.{node_id}")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the contract's duration syntax: `500ms`, `5s`, `2m`, `72h`.
pub fn parse_duration(value: &str) -> Result<Duration, ConfigError> {
    let duration = humantime::parse_duration(value.trim())
        .map_err(|e| format!("invalid duration {value:?} ({e}); write e.g. 500ms, 5s, 2m, 72h"))?;
    if duration.is_zero() {
        return Err(format!("invalid duration {value:?}: must be greater than zero").into());
    }
    Ok(duration)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Clients present a JWT; the HTTP API wants an API key.
    Jwt,
    /// No authentication: the `user` query parameter names the user. For demos and tests.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What `DATABASE_URL` points at.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PoolerMode {
    /// A direct server, unless `PGRELAY_DIRECT_DATABASE_URL` is set or the
    /// start-up NOTIFY round trip fails (then a transaction-mode pooler).
    #[default]
    Auto,
    /// PostgreSQL itself, or a session-mode pooler.
    Direct,
    /// A transaction-mode pooler.
    Transaction,
}

/// The flags of `pgrelay serve`, each also read from the environment.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// PostgreSQL connection string (required).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// A direct (not pooled) connection string for what needs a real
    /// session: the LISTEN connection and the migrations' lock. Set it when
    /// DATABASE_URL is a transaction-mode pooler (PgBouncer, Supavisor,
    /// Neon's pooled endpoint); it also makes DATABASE_URL count as one.
    #[arg(long, env = "PGRELAY_DIRECT_DATABASE_URL", hide_env_values = true)]
    pub direct_database_url: Option<String>,

    /// What DATABASE_URL is: `auto` (a direct server, unless a direct URL is
    /// set or a NOTIFY sent through it never comes back at start), `direct`,
    /// or `transaction` (a transaction-mode pooler: no session state, no
    /// statement cache, every statement in a transaction).
    #[arg(
        long,
        env = "PGRELAY_DATABASE_POOLER",
        value_enum,
        default_value = "auto"
    )]
    pub database_pooler: PoolerMode,

    /// Address for HTTP and WebSocket (they share the port).
    #[arg(long, env = "PGRELAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for STOMP over plain TCP (off unless set; STOMP's usual port
    /// is 61613): the broker Spring's `enableStompBrokerRelay` connects to.
    /// An API key as CONNECT `passcode` makes a trusted backend session.
    #[arg(long, env = "PGRELAY_STOMP_LISTEN")]
    pub stomp_listen: Option<SocketAddr>,

    /// The address clients reach this node at, as registered in
    /// relay.nodes (and used by the demo page) [default: the listen address].
    #[arg(long, env = "PGRELAY_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// This node's id in the registry [default: a fresh one].
    #[arg(long, env = "PGRELAY_NODE_ID")]
    pub node_id: Option<NodeId>,

    /// `jwt` or `none`. Defaults to `jwt` when a JWT key is configured; a node
    /// with neither refuses to start.
    #[arg(long, env = "PGRELAY_AUTH", value_enum)]
    pub auth: Option<AuthMode>,

    /// HS256 secret for client JWTs.
    #[arg(long, env = "PGRELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The HS256 secret being rotated out: tokens signed with it are still
    /// accepted until they expire.
    #[arg(long, env = "PGRELAY_JWT_PREVIOUS_SECRET", hide_env_values = true)]
    pub jwt_previous_secret: Option<String>,

    /// Path to the public keys for RS256/ES256 client JWTs: a PEM file (one
    /// or more RSA or P-256 keys) or a JWKS document.
    #[arg(long, env = "PGRELAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Required `aud` of client JWTs (unset: not checked).
    #[arg(long, env = "PGRELAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` of client JWTs (unset: not checked).
    #[arg(long, env = "PGRELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Comma-separated bearer keys for the HTTP API (more can be added, and
    /// revoked, at run time in relay.api_keys: `pgrelay keys`).
    #[arg(
        long,
        env = "PGRELAY_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// Node heartbeat and client ping interval.
    #[arg(long, env = "PGRELAY_HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// A node silent this long is dead: it stops being a routing target and is reaped.
    #[arg(long, env = "PGRELAY_NODE_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub node_timeout: Duration,

    /// Largest message `data` (serialized JSON) and largest inbound frame, in bytes.
    #[arg(long, env = "PGRELAY_MAX_MESSAGE_BYTES", default_value_t = 65536)]
    pub max_message_bytes: usize,

    /// How long messages and their delivery records are kept.
    #[arg(long, env = "PGRELAY_RETENTION", default_value = "72h", value_parser = parse_duration)]
    pub retention: Duration,

    /// Time to live of a message sent without `ttl_s`.
    #[arg(long, env = "PGRELAY_DEFAULT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub default_ttl: Duration,

    /// Database connections per node for requests and connects (the
    /// bookkeeping pool, LISTEN and liveness connections are extra).
    #[arg(long, env = "PGRELAY_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: u32,

    /// Database connections per node for claims and delivery records.
    #[arg(long, env = "PGRELAY_DB_BOOKKEEPING_POOL_SIZE", default_value_t = 4)]
    pub db_bookkeeping_pool_size: u32,

    /// How often the sweeper (one node at a time) reaps and applies retention.
    #[arg(long, env = "PGRELAY_SWEEP_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// Outbox rescan interval: the safety net for lost NOTIFY wake-ups.
    #[arg(long, env = "PGRELAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,

    /// Outbox poll interval when LISTEN is unavailable (a pooler and no
    /// PGRELAY_DIRECT_DATABASE_URL): the node then polls instead of waiting
    /// for NOTIFY, and this bounds a message's added latency.
    #[arg(long, env = "PGRELAY_POLL_ONLY_INTERVAL", default_value = "250ms", value_parser = parse_duration)]
    pub poll_only_interval: Duration,

    /// Most messages stored in one transaction by group commit.
    #[arg(long, env = "PGRELAY_SUBMIT_BATCH", default_value_t = 256)]
    pub submit_batch: usize,

    /// Group-commit transactions in flight at once (each for its own share of
    /// the streams).
    #[arg(long, env = "PGRELAY_SUBMIT_CONCURRENCY", default_value_t = 2)]
    pub submit_concurrency: usize,

    /// Messages queued per connection before it is switched to catching up from the database.
    #[arg(long, env = "PGRELAY_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,

    /// How long a stopping node waits for its sockets and bookkeeping to finish.
    #[arg(long, env = "PGRELAY_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Topic subscriptions one connection may hold.
    #[arg(long, env = "PGRELAY_MAX_SUBSCRIPTIONS", default_value_t = 100)]
    pub max_subscriptions: usize,

    /// Connections one user may hold across the cluster.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS_PER_USER", default_value_t = 100)]
    pub max_connections_per_user: u32,

    /// Inbound frames (WebSocket messages, pings included; STOMP frames
    /// counted one by one) per second per connection; past it, the server
    /// reads the connection more slowly.
    #[arg(long, env = "PGRELAY_MAX_FRAMES_PER_SECOND", default_value_t = 2000)]
    pub max_frames_per_second: u32,

    /// Submissions per second per API key and node; more are answered 429.
    /// 0: no limit. (Not applied with auth `none`.)
    #[arg(long, env = "PGRELAY_API_RATE_LIMIT", default_value_t = 10_000)]
    pub api_rate_limit: u32,

    /// A socket whose writes make no progress this long is a slow consumer:
    /// it is closed (its messages stay resumable with `since`).
    #[arg(long, env = "PGRELAY_SLOW_CONSUMER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub slow_consumer_timeout: Duration,

    /// How long a client has, from accept, to complete its handshake (the
    /// STOMP CONNECT frame); whatever it sends meanwhile, it is then closed.
    #[arg(long, env = "PGRELAY_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Open TCP connections (HTTP and WebSocket) one node accepts.
    #[arg(long, env = "PGRELAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// How long a client may take to send a request's headers, and an HTTP
    /// request to complete (slowloris and friends).
    #[arg(long, env = "PGRELAY_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Serve `/metrics` without an API key (for scrapers on a private network).
    #[arg(long, env = "PGRELAY_METRICS_PUBLIC", value_parser = BoolishValueParser::new())]
    pub metrics_public: bool,

    /// Serve `/v1/openapi.json` without an API key.
    #[arg(long, env = "PGRELAY_OPENAPI_PUBLIC", value_parser = BoolishValueParser::new())]
    pub openapi_public: bool,

    /// Serve the demo page at `/` (it sends through the HTTP API: with auth
    /// `jwt` it asks for an API key and tokens).
    #[arg(long, env = "PGRELAY_DEMO", value_parser = BoolishValueParser::new())]
    pub demo: bool,

    /// Log format: `text` for people, `json` for collectors.
    #[arg(long, env = "PGRELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// How clients and API callers prove who they are.
#[derive(Clone)]
pub enum Auth {
    None,
    Jwt {
        verifier: JwtVerifier,
        api_keys: ApiKeys,
    },
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("none"),
            Auth::Jwt { api_keys, .. } => write!(f, "jwt ({} API keys)", api_keys.len()),
        }
    }
}

/// A node's validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub database_url: String,
    /// For the LISTEN connection and the migrations' lock, when DATABASE_URL
    /// is a pooler.
    pub direct_database_url: Option<String>,
    pub database_pooler: PoolerMode,
    pub listen: SocketAddr,
    /// STOMP over TCP, when set.
    pub stomp_listen: Option<SocketAddr>,
    /// Registered instead of the listen address when set.
    pub advertise_addr: Option<String>,
    pub node_id: NodeId,
    pub auth: Auth,
    pub heartbeat_interval: Duration,
    pub node_timeout: Duration,
    pub max_message_bytes: usize,
    pub retention: Duration,
    pub default_ttl: Duration,
    pub db_pool_size: u32,
    pub db_bookkeeping_pool_size: u32,
    pub sweep_interval: Duration,
    pub poll_interval: Duration,
    pub poll_only_interval: Duration,
    pub submit_batch: usize,
    pub submit_concurrency: usize,
    pub send_queue: usize,
    pub shutdown_grace: Duration,
    pub limits: UsageLimits,
    /// Which endpoints need no API key, and whether `/` is the demo page.
    pub exposure: Exposure,
}

/// What a node shows without an API key.
#[derive(Clone, Debug, Default)]
pub struct Exposure {
    pub metrics_public: bool,
    pub openapi_public: bool,
    pub demo: bool,
}

/// What one client may do, and how much of the node it may take.
#[derive(Clone, Debug)]
pub struct UsageLimits {
    pub max_subscriptions: usize,
    pub max_connections_per_user: u32,
    pub max_frames_per_second: u32,
    pub api_rate_limit: u32,
    pub slow_consumer_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    pub request_timeout: Duration,
}

impl Default for UsageLimits {
    fn default() -> Self {
        Self {
            max_subscriptions: 100,
            max_connections_per_user: 100,
            max_frames_per_second: 2000,
            api_rate_limit: 10_000,
            slow_consumer_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            request_timeout: Duration::from_secs(10),
        }
    }
}

impl Settings {
    /// Defaults for a node on `database_url` with authentication off: the
    /// starting point for `pgrelay dev` and for tests.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            direct_database_url: None,
            database_pooler: PoolerMode::Auto,
            listen: "127.0.0.1:0".parse().expect("valid address"),
            stomp_listen: None,
            advertise_addr: None,
            node_id: NodeId::generate(),
            auth: Auth::None,
            heartbeat_interval: Duration::from_secs(5),
            node_timeout: Duration::from_secs(15),
            max_message_bytes: 65536,
            retention: Duration::from_secs(72 * 3600),
            default_ttl: Duration::from_secs(24 * 3600),
            db_pool_size: 16,
            db_bookkeeping_pool_size: 4,
            sweep_interval: Duration::from_secs(5),
            submit_batch: 256,
            submit_concurrency: 2,
            poll_interval: Duration::from_secs(1),
            poll_only_interval: Duration::from_millis(250),
            send_queue: 1024,
            shutdown_grace: Duration::from_secs(10),
            limits: UsageLimits::default(),
            exposure: Exposure::default(),
        }
    }

    /// How long a transaction of this node may sit idle before the server
    /// ends it: a node paused or cut off in the middle of one holds its locks
    /// no longer than this, well before it could be reaped.
    pub fn idle_transaction_timeout(&self) -> Duration {
        (self.node_timeout / 2).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// How long the node's liveness work (its heartbeat, the sweeper's lease)
    /// may take before it counts as failed.
    pub fn liveness_timeout(&self) -> Duration {
        self.heartbeat_interval
            .clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    /// Validates the flags of `pgrelay serve`.
    ///
    /// # Errors
    /// A one-line description of the first problem found, naming the variable.
    pub fn from_args(args: ServeArgs) -> Result<Self, ConfigError> {
        let database_url = args
            .database_url
            .filter(|url| !url.trim().is_empty())
            .ok_or("DATABASE_URL is not set: pass --database-url or set DATABASE_URL")?;
        let has_key = args.jwt_secret.is_some() || args.jwt_public_key.is_some();
        let mode = match args.auth {
            Some(mode) => mode,
            None if has_key => AuthMode::Jwt,
            None => {
                return Err("no authentication configured: set PGRELAY_AUTH=jwt with \
                            PGRELAY_JWT_SECRET or PGRELAY_JWT_PUBLIC_KEY, or PGRELAY_AUTH=none \
                            to run without"
                    .into());
            }
        };
        let auth = match mode {
            AuthMode::None => Auth::None,
            AuthMode::Jwt => {
                let from_secret = match &args.jwt_secret {
                    Some(secret) => {
                        let current = JwtVerifier::hs256(secret.as_bytes()).map_err(|e| e.0)?;
                        Some(match &args.jwt_previous_secret {
                            Some(previous) => current
                                .or(JwtVerifier::hs256(previous.as_bytes()).map_err(|e| {
                                    e.0.replace("PGRELAY_JWT_SECRET", "PGRELAY_JWT_PREVIOUS_SECRET")
                                })?),
                            None => current,
                        })
                    }
                    None if args.jwt_previous_secret.is_some() => {
                        return Err("PGRELAY_JWT_PREVIOUS_SECRET needs PGRELAY_JWT_SECRET".into());
                    }
                    None => None,
                };
                let from_public = match &args.jwt_public_key {
                    Some(path) => Some(read_public_keys(path)?),
                    None => None,
                };
                // Both may be set while moving from a shared secret to keys;
                // each key still verifies only its own algorithm.
                let verifier = match (from_secret, from_public) {
                    (Some(secret), Some(public)) => secret.or(public),
                    (Some(verifier), None) | (None, Some(verifier)) => verifier,
                    (None, None) => {
                        return Err(
                            "PGRELAY_AUTH=jwt needs PGRELAY_JWT_SECRET or PGRELAY_JWT_PUBLIC_KEY"
                                .into(),
                        );
                    }
                };
                Auth::Jwt {
                    verifier: verifier
                        .expecting(args.jwt_audience.as_deref(), args.jwt_issuer.as_deref()),
                    api_keys: ApiKeys::new(args.api_keys.iter().map(String::as_str))
                        .map_err(|e| e.0)?,
                }
            }
        };
        if args.node_timeout <= args.heartbeat_interval {
            return Err(format!(
                "PGRELAY_NODE_TIMEOUT ({}) must be longer than PGRELAY_HEARTBEAT_INTERVAL ({})",
                humantime::format_duration(args.node_timeout),
                humantime::format_duration(args.heartbeat_interval)
            )
            .into());
        }
        if args.default_ttl > args.retention {
            return Err("PGRELAY_DEFAULT_TTL must not be longer than PGRELAY_RETENTION".into());
        }
        if !(64..=16 * 1024 * 1024).contains(&args.max_message_bytes) {
            return Err("PGRELAY_MAX_MESSAGE_BYTES must be between 64 and 16777216".into());
        }
        if args.db_pool_size < 2 {
            return Err("PGRELAY_DB_POOL_SIZE must be at least 2".into());
        }
        if args.db_bookkeeping_pool_size < 2 {
            // The claimer and the delivery log each hold one at a time.
            return Err("PGRELAY_DB_BOOKKEEPING_POOL_SIZE must be at least 2".into());
        }
        if args.submit_batch == 0 || args.submit_concurrency == 0 {
            return Err(
                "PGRELAY_SUBMIT_BATCH and PGRELAY_SUBMIT_CONCURRENCY must be at least 1".into(),
            );
        }
        if args.max_frames_per_second == 0
            || args.max_connections_per_user == 0
            || args.max_connections == 0
        {
            return Err(
                "PGRELAY_MAX_FRAMES_PER_SECOND, PGRELAY_MAX_CONNECTIONS_PER_USER and \
                        PGRELAY_MAX_CONNECTIONS must be at least 1"
                    .into(),
            );
        }
        if args.send_queue == 0 {
            return Err("PGRELAY_SEND_QUEUE must be at least 1".into());
        }
        if args.poll_only_interval.is_zero() || args.poll_only_interval > Duration::from_secs(10) {
            return Err("PGRELAY_POLL_ONLY_INTERVAL must be more than 0 and at most 10s".into());
        }
        Ok(Self {
            database_url,
            direct_database_url: args
                .direct_database_url
                .filter(|url| !url.trim().is_empty()),
            database_pooler: args.database_pooler,
            listen: args.listen,
            stomp_listen: args.stomp_listen,
            advertise_addr: args.advertise_addr.filter(|a| !a.trim().is_empty()),
            node_id: args.node_id.unwrap_or_else(NodeId::generate),
            auth,
            heartbeat_interval: args.heartbeat_interval,
            node_timeout: args.node_timeout,
            max_message_bytes: args.max_message_bytes,
            retention: args.retention,
            default_ttl: args.default_ttl,
            db_pool_size: args.db_pool_size,
            db_bookkeeping_pool_size: args.db_bookkeeping_pool_size,
            sweep_interval: args.sweep_interval,
            submit_batch: args.submit_batch,
            submit_concurrency: args.submit_concurrency,
            poll_interval: args.poll_interval,
            poll_only_interval: args.poll_only_interval,
            send_queue: args.send_queue,
            shutdown_grace: args.shutdown_grace,
            limits: UsageLimits {
                max_subscriptions: args.max_subscriptions,
                max_connections_per_user: args.max_connections_per_user,
                max_frames_per_second: args.max_frames_per_second,
                api_rate_limit: args.api_rate_limit,
                slow_consumer_timeout: args.slow_consumer_timeout,
                handshake_timeout: args.handshake_timeout,
                max_connections: args.max_connections,
                request_timeout: args.request_timeout,
            },
            exposure: Exposure {
                metrics_public: args.metrics_public,
                openapi_public: args.openapi_public,
                demo: args.demo,
            },
        })
    }
}

/// Reads `PGRELAY_JWT_PUBLIC_KEY`: a JWKS document or PEM keys.
fn read_public_keys(path: &std::path::Path) -> Result<JwtVerifier, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "PGRELAY_JWT_PUBLIC_KEY: cannot read {}: {e}",
            path.display()
        )
    })?;
    let is_jwks = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let verifier = if is_jwks {
        JwtVerifier::from_jwks(&bytes)
    } else {
        JwtVerifier::from_public_pem(&bytes)
    };
    verifier.map_err(|e| format!("PGRELAY_JWT_PUBLIC_KEY {}: {e}", path.display()).into())
}

#[cfg(test)]
mod tests;

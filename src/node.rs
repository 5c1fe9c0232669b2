//! A running node: its shared state, its background tasks and its lifecycle
//! (start, serve, stop).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::FutureExt;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{Auth, NodeId, Settings};
use crate::deliveries::DeliveryLog;
use crate::hub::{Control, Hub};
use crate::limits::KeyedLimiter;
use crate::metrics as m;
use crate::registry::connections::Departures;
use crate::router::GroupCommit;
use crate::{db, deliveries, http, outbox, registry, sweeper};

/// Everything the node's tasks and handlers share.
pub struct NodeContext {
    pub settings: Settings,
    pub node_id: NodeId,
    /// This process's claim on `node_id` (see `relay.nodes.incarnation`).
    pub incarnation: Uuid,
    pub pool: PgPool,
    /// Claims and delivery records: see [`db::connect_bookkeeping`].
    pub bookkeeping: PgPool,
    pub hub: Hub,
    pub deliveries: DeliveryLog,
    /// Stores single HTTP submissions in shared transactions.
    pub submitter: GroupCommit,
    /// Submissions per second per API key.
    pub api_limiter: KeyedLimiter,
    /// Removes closed sessions from the registry, in batches.
    pub departures: Departures,
    /// Cancelled when the node stops: sessions close, tasks end.
    pub shutdown: CancellationToken,
    /// Sessions and background tasks, awaited on shutdown.
    pub tasks: TaskTracker,
    /// Whether the LISTEN connection is up (for `/readyz`).
    pub listener_up: AtomicBool,
    /// The address this node serves on.
    pub listen_addr: SocketAddr,
    /// The address registered for it (`PGRELAY_ADVERTISE_ADDR`, or the above).
    pub advertised_addr: String,
    /// Set when closed sessions could not be removed from the registry (the
    /// database was away): the next heartbeat reconciles.
    registry_dirty: AtomicBool,
    /// Messages closed sessions had taken but not written, to park for their
    /// users: at shutdown in bulk, or once the database answers again.
    unparked: Mutex<Vec<(i64, String)>>,
    /// Why the node stopped itself, if it did.
    fatal: Mutex<Option<String>>,
}

impl NodeContext {
    /// Sets the database pool gauges (read at each scrape).
    pub fn export_pool_gauges(&self) {
        for (name, pool) in [("main", &self.pool), ("bookkeeping", &self.bookkeeping)] {
            let idle = pool.num_idle() as f64;
            let busy = f64::from(pool.size()) - idle;
            let node = self.node_id.to_string();
            metrics::gauge!(m::DB_POOL_CONNECTIONS, "node" => node.clone(), "pool" => name, "state" => "idle").set(idle);
            metrics::gauge!(m::DB_POOL_CONNECTIONS, "node" => node, "pool" => name, "state" => "busy").set(busy.max(0.0));
        }
    }

    /// Leaves a closed session's cleanup to the node: its unwritten messages
    /// are parked, and its row removed, by the final deregistration or the
    /// next heartbeat.
    pub fn defer_cleanup(&self, user_id: &str, message_ids: &[i64]) {
        let mut unparked = self.unparked.lock().expect("unparked lock");
        unparked.extend(message_ids.iter().map(|id| (*id, user_id.to_owned())));
        self.registry_dirty.store(true, Ordering::Release);
    }

    fn defer_cleanup_again(&self, unparked: Vec<(i64, String)>) {
        self.unparked
            .lock()
            .expect("unparked lock")
            .extend(unparked);
        self.registry_dirty.store(true, Ordering::Release);
    }

    fn take_unparked(&self) -> Vec<(i64, String)> {
        std::mem::take(&mut *self.unparked.lock().expect("unparked lock"))
    }

    /// Stops the node from within, e.g. when another process took its id.
    fn fail(&self, reason: String) {
        tracing::error!(node_id = %self.node_id, %reason, "stopping the node");
        *self.fatal.lock().expect("fatal lock") = Some(reason);
        self.shutdown.cancel();
    }
}

/// A started node. Dropping it does not stop it: call [`RunningNode::stop`].
pub struct RunningNode {
    pub ctx: Arc<NodeContext>,
    /// The address HTTP and WebSocket are served on (the real port when the
    /// configured one was 0).
    pub addr: SocketAddr,
    server: JoinHandle<()>,
    recorder: JoinHandle<()>,
    recorder_stop: CancellationToken,
}

/// Starts a node: connects, migrates, binds, registers and spawns its tasks.
///
/// # Errors
/// Database unreachable, migrations failing, or the address in use, each
/// with context fit for a one-line message.
pub async fn start(settings: Settings) -> anyhow::Result<RunningNode> {
    let pool = db::connect(&settings)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    db::migrate(&pool)
        .await
        .context("database migrations failed")?;
    db::publish_config(&pool, &settings)
        .await
        .context("cannot write relay.config")?;
    start_with_pool(settings, pool).await
}

/// A node registered, with its state and its port, but neither serving nor
/// running any task: [`Prepared::start`] adds those. Tests drive its
/// `*_once` steps alone, with no background loop racing them.
pub struct Prepared {
    pub ctx: Arc<NodeContext>,
    listener: TcpListener,
    records: tokio::sync::mpsc::Receiver<deliveries::Record>,
}

/// [`start`] on an existing pool whose database is already migrated.
pub async fn start_with_pool(settings: Settings, pool: PgPool) -> anyhow::Result<RunningNode> {
    Ok(prepare(settings, pool).await?.start())
}

/// Binds the port, connects the bookkeeping pool and registers the node.
pub async fn prepare(settings: Settings, pool: PgPool) -> anyhow::Result<Prepared> {
    crate::metrics::install();
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (PGRELAY_LISTEN)", settings.listen))?;
    let addr = listener.local_addr()?;
    let incarnation = Uuid::new_v4();
    let bookkeeping = db::connect_bookkeeping(&settings)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    let advertised_addr = settings
        .advertise_addr
        .clone()
        .unwrap_or_else(|| addr.to_string());
    registry::nodes::register(&pool, &settings.node_id, incarnation, &advertised_addr)
        .await
        .context("cannot register the node")?;

    let (deliveries, records) = DeliveryLog::new();
    let submitter = GroupCommit::start(
        pool.clone(),
        settings.submit_batch,
        settings.submit_concurrency,
    );
    let departures = Departures::start(pool.clone(), settings.node_id.clone());
    let api_limiter = KeyedLimiter::new(settings.limits.api_rate_limit);
    let ctx = Arc::new(NodeContext {
        node_id: settings.node_id.clone(),
        settings,
        incarnation,
        pool: pool.clone(),
        bookkeeping: bookkeeping.clone(),
        hub: Hub::default(),
        deliveries,
        submitter,
        api_limiter,
        departures,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        listener_up: AtomicBool::new(false),
        listen_addr: addr,
        advertised_addr,
        registry_dirty: AtomicBool::new(false),
        unparked: Mutex::new(Vec::new()),
        fatal: Mutex::new(None),
    });
    Ok(Prepared {
        ctx,
        listener,
        records,
    })
}

impl Prepared {
    /// Starts the node's tasks and serves.
    pub fn start(self) -> RunningNode {
        let Prepared {
            ctx,
            listener,
            records,
        } = self;
        let addr = ctx.listen_addr;
        tracing::info!(node_id = %ctx.node_id, %addr, "node started");
        let recorder_stop = CancellationToken::new();
        let recorder = tokio::spawn(deliveries::run(
            ctx.bookkeeping.clone(),
            ctx.node_id.clone(),
            records,
            recorder_stop.clone(),
        ));

        let wake = Arc::new(Notify::new());
        spawn_supervised(&ctx, "listener", {
            let (ctx, wake) = (ctx.clone(), wake.clone());
            move |token| outbox::run_listener(ctx.clone(), wake.clone(), token)
        });
        spawn_supervised(&ctx, "claimer", {
            let (ctx, wake) = (ctx.clone(), wake.clone());
            move |token| outbox::run_claimer(ctx.clone(), wake.clone(), token)
        });
        spawn_supervised(&ctx, "sweeper", {
            let ctx = ctx.clone();
            move |token| sweeper::run(ctx.clone(), token)
        });
        spawn_supervised(&ctx, "heartbeat", {
            let ctx = ctx.clone();
            move |token| run_heartbeat(ctx.clone(), token)
        });

        if let Auth::Jwt { api_keys, .. } = &ctx.settings.auth {
            let api_keys = api_keys.clone();
            spawn_supervised(&ctx, "api-keys", {
                let ctx = ctx.clone();
                move |token| run_api_keys(ctx.clone(), api_keys.clone(), token)
            });
        }

        let server = tokio::spawn(http::server::serve(
            listener,
            http::router(ctx.clone()),
            ctx.settings.limits.max_connections,
            ctx.settings.limits.request_timeout,
            ctx.shutdown.clone(),
            ctx.settings.shutdown_grace,
        ));

        RunningNode {
            ctx,
            addr,
            server,
            recorder,
            recorder_stop,
        }
    }
}

impl RunningNode {
    pub fn node_id(&self) -> &NodeId {
        &self.ctx.node_id
    }

    /// Stops the node cleanly: stops accepting, closes every socket with 1012,
    /// writes the last delivery records, hands unfinished work back and removes
    /// the node and its connections from the registry.
    pub async fn stop(self) -> anyhow::Result<()> {
        let ctx = self.ctx;
        let grace = ctx.settings.shutdown_grace;
        tracing::info!(node_id = %ctx.node_id, sessions = ctx.hub.len(), "stopping");
        ctx.shutdown.cancel();
        ctx.tasks.close();
        if tokio::time::timeout(grace, ctx.tasks.wait()).await.is_err() {
            tracing::warn!("sessions and tasks did not finish within the shutdown grace");
        }
        let _ = tokio::time::timeout(grace, self.server).await;
        self.recorder_stop.cancel();
        let _ = tokio::time::timeout(grace, self.recorder).await;
        let unparked = ctx.take_unparked();
        let fatal = ctx.fatal.lock().expect("fatal lock").take();
        // A node whose id was taken over must not remove the other's rows.
        if fatal.is_none() {
            db::bounded(registry::nodes::deregister(
                &ctx.pool,
                &ctx.node_id,
                ctx.incarnation,
                &unparked,
            ))
            .await
            .context("cannot deregister the node")?;
        }
        ctx.pool.close().await;
        ctx.bookkeeping.close().await;
        tracing::info!(node_id = %ctx.node_id, "stopped");
        match fatal {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    }

    /// Resolves when the node begins to stop by itself (see [`RunningNode::stop`]
    /// for the rest of the way).
    pub async fn stopping(&self) {
        self.ctx.shutdown.cancelled().await;
    }
}

/// Runs a background task under the node's tracker; a task that ends before
/// shutdown, or panics, is logged and started again after a pause. No task
/// dies silently.
fn spawn_supervised<F, Fut>(ctx: &Arc<NodeContext>, name: &'static str, task: F)
where
    F: Fn(CancellationToken) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let token = ctx.shutdown.clone();
    ctx.tasks.spawn(async move {
        loop {
            let outcome = std::panic::AssertUnwindSafe(task(token.clone()))
                .catch_unwind()
                .await;
            if token.is_cancelled() {
                return;
            }
            match outcome {
                Ok(()) => tracing::error!(
                    task = name,
                    "background task ended unexpectedly; restarting"
                ),
                Err(_) => tracing::error!(task = name, "background task panicked; restarting"),
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = token.cancelled() => return,
            }
        }
    });
}

/// Reloads the API keys stored in `relay.api_keys` every few seconds: a key
/// added or revoked there takes effect on every node without a restart.
async fn run_api_keys(ctx: Arc<NodeContext>, keys: crate::auth::ApiKeys, token: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        let stored = db::bounded(
            sqlx::query_scalar!("SELECT key_digest FROM relay.api_keys WHERE revoked_at IS NULL")
                .fetch_all(&ctx.pool),
        )
        .await;
        match stored {
            Ok(digests) => keys.set_stored(
                digests
                    .into_iter()
                    .filter_map(|d| d.try_into().ok())
                    .collect(),
            ),
            Err(error) => {
                metrics::counter!(m::DB_ERRORS, "operation" => "api_keys").increment(1);
                tracing::warn!(%error, "could not reload the API keys");
            }
        }
    }
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Registered and refreshed.
    Alive,
    /// The node had been declared dead (its row was reaped): its sockets were
    /// closed so that clients reconnect, and it registered again.
    Reregistered,
    /// Another process runs under this node id: this one stops.
    TakenOver,
}

/// Refreshes the node's `last_seen_at` and that of its live connections, and
/// repairs the registry if closed sessions could not be removed earlier.
pub async fn heartbeat_once(ctx: &NodeContext) -> Result<Heartbeat, sqlx::Error> {
    let seen = ctx.hub.take_seen();
    let alive = db::bounded(registry::nodes::heartbeat(
        &ctx.pool,
        &ctx.node_id,
        ctx.incarnation,
        &seen,
    ))
    .await?;
    if alive {
        if ctx.registry_dirty.swap(false, Ordering::AcqRel) {
            let unparked = ctx.take_unparked();
            let live = ctx.hub.ids();
            let repaired = db::bounded(registry::nodes::reconcile(
                &ctx.pool,
                &ctx.node_id,
                &live,
                &unparked,
            ))
            .await;
            if let Err(error) = repaired {
                ctx.defer_cleanup_again(unparked);
                return Err(error);
            }
        }
        return Ok(Heartbeat::Alive);
    }
    let owner = db::bounded(registry::nodes::owner(&ctx.pool, &ctx.node_id)).await?;
    if owner.is_some_and(|incarnation| incarnation != ctx.incarnation) {
        ctx.fail(format!(
            "another process registered as node {}",
            ctx.node_id
        ));
        return Ok(Heartbeat::TakenOver);
    }
    // Declared dead while alive (a long pause, a network cut): the sweeper
    // removed its connections and parked its work. Its clients must reconnect
    // (with `since`, they miss nothing) to be registered again.
    tracing::error!(node_id = %ctx.node_id, "this node was declared dead; closing its sockets and registering again");
    ctx.hub.control_all(Control::Close {
        code: 1012,
        reason: "node re-registering; reconnect with since".into(),
    });
    db::bounded(registry::nodes::register(
        &ctx.pool,
        &ctx.node_id,
        ctx.incarnation,
        &ctx.advertised_addr,
    ))
    .await?;
    Ok(Heartbeat::Reregistered)
}

/// This node's outbox backlog and the age of its oldest row: work that
/// waits here is what an operator looks for first.
async fn export_backlog(ctx: &NodeContext) {
    let backlog = db::bounded(
        sqlx::query!(
            r#"
            SELECT count(*) AS "rows!",
                   COALESCE(EXTRACT(epoch FROM now() - min(created_at)), 0)::float8 AS "oldest_secs!"
              FROM (SELECT created_at FROM relay.outbox WHERE node_id = $1 LIMIT 1000000) o
            "#,
            ctx.node_id.as_str()
        )
        .fetch_one(&ctx.pool),
    )
    .await;
    match backlog {
        Ok(backlog) => {
            let node = ctx.node_id.to_string();
            metrics::gauge!(m::OUTBOX_BACKLOG, "node" => node.clone()).set(backlog.rows as f64);
            metrics::gauge!(m::OUTBOX_OLDEST, "node" => node).set(backlog.oldest_secs);
        }
        Err(error) => tracing::debug!(%error, "could not measure the outbox backlog"),
    }
}

async fn run_heartbeat(ctx: Arc<NodeContext>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        match heartbeat_once(&ctx).await {
            Ok(Heartbeat::TakenOver) => return,
            Ok(_) => export_backlog(&ctx).await,
            Err(error) => {
                metrics::counter!(m::DB_ERRORS, "operation" => "heartbeat").increment(1);
                tracing::warn!(%error, "heartbeat failed");
            }
        }
    }
}

//! A running node: its shared state, its background tasks and its lifecycle
//! (start, serve, heal, stop).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::FutureExt;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{Auth, NodeId, Settings};
use crate::deliveries::{DeliveryLog, Record};
use crate::group_commit::GroupCommit;
use crate::hub::{Control, Hub};
use crate::limits::KeyedLimiter;
use crate::liveness::Liveness;
use crate::metrics as m;
use crate::registry::nodes::Registration;
use crate::{db, deliveries, http, outbox, registry, sweeper};

/// Everything the node's tasks and handlers share.
pub struct NodeContext {
    pub settings: Settings,
    pub node_id: NodeId,
    /// This process's claim on `node_id`: the incarnation its transactions
    /// are fenced by (see `relay.nodes.incarnation`).
    pub registration: Arc<Registration>,
    pub pool: PgPool,
    /// Claims and delivery records: see [`db::connect_bookkeeping`].
    pub bookkeeping: PgPool,
    /// Heartbeats, the sweeper's lease, registration: never behind traffic.
    pub liveness: Liveness,
    pub hub: Hub,
    pub deliveries: DeliveryLog,
    /// Stores single HTTP submissions in shared transactions.
    pub submitter: GroupCommit,
    /// Submissions that must wait for a stream another transaction holds
    /// take a permit: they are bounded, so that a held stream cannot take
    /// every pooled connection.
    pub slow_submissions: Arc<Semaphore>,
    /// Submissions per second per API key.
    pub api_limiter: KeyedLimiter,
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
    /// Where the sweeper's pruning of `relay.streams` goes on from.
    pub prune_from: Mutex<String>,
    /// Set when a registry row may exist without its session (an attach whose
    /// answer was lost): the presence task then reconciles.
    registry_dirty: AtomicBool,
    /// Why the node stopped itself, if it did.
    fatal: Mutex<Option<String>>,
}

impl NodeContext {
    /// The incarnation this node's transactions name now.
    pub fn incarnation(&self) -> Uuid {
        self.registration.current()
    }

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

    /// A registry row may exist without its session: the next presence step
    /// removes it.
    pub fn registry_may_be_dirty(&self) {
        self.registry_dirty.store(true, Ordering::Release);
    }

    /// Why the node is not ready to serve, if it is not (for `/readyz`):
    /// answered from what it knows, without asking the database.
    pub fn not_ready(&self) -> Option<&'static str> {
        let within = self.settings.heartbeat_interval * 2 + self.settings.liveness_timeout();
        if let Some(reason) = self.liveness.not_ready(within) {
            return Some(reason);
        }
        if !self.listener_up.load(Ordering::Acquire) {
            return Some("the LISTEN connection is down");
        }
        None
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
    records: tokio::sync::mpsc::Receiver<Record>,
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
    let liveness = Liveness::new(
        db::connect_options(
            &settings.database_url,
            &format!("pgrelay {} liveness", settings.node_id),
        )?,
        settings.liveness_timeout(),
    );
    let registration = Arc::new(Registration::new(incarnation));
    {
        let mut held = liveness
            .hold()
            .await
            .context("cannot connect to the database (DATABASE_URL)")?;
        let registered = tokio::time::timeout(
            db::OP_TIMEOUT,
            registry::nodes::register(
                held.connection(),
                &settings.node_id,
                incarnation,
                &advertised_addr,
            ),
        )
        .await;
        held.settle(registered)
            .context("cannot register the node")?;
    }
    liveness.beat_succeeded(false);

    let (deliveries, records) = DeliveryLog::new();
    let slow_submissions = Arc::new(Semaphore::new((settings.db_pool_size as usize / 4).max(1)));
    let submitter = GroupCommit::start(
        pool.clone(),
        settings.submit_batch,
        settings.submit_concurrency,
        slow_submissions.clone(),
    );
    let api_limiter = KeyedLimiter::new(settings.limits.api_rate_limit);
    let ctx = Arc::new(NodeContext {
        node_id: settings.node_id.clone(),
        settings,
        registration,
        pool: pool.clone(),
        bookkeeping: bookkeeping.clone(),
        liveness,
        hub: Hub::default(),
        deliveries,
        submitter,
        slow_submissions,
        api_limiter,
        shutdown: CancellationToken::new(),
        tasks: TaskTracker::new(),
        listener_up: AtomicBool::new(false),
        listen_addr: addr,
        advertised_addr,
        prune_from: Mutex::new(String::new()),
        registry_dirty: AtomicBool::new(false),
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
        // The delivery log outlives the sessions: it writes their last
        // records when the node stops.
        let recorder_stop = CancellationToken::new();
        let recorder = tokio::spawn(
            deliveries::run(
                ctx.bookkeeping.clone(),
                ctx.node_id.clone(),
                ctx.registration.clone(),
                ctx.settings.idle_transaction_timeout(),
                records,
                recorder_stop.clone(),
            )
            .inspect(|()| tracing::info!("the delivery log has written its last records")),
        );

        let wake = Arc::new(outbox::Wake::default());
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
        spawn_supervised(&ctx, "presence", {
            let ctx = ctx.clone();
            move |token| run_presence(ctx.clone(), token)
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
    /// writes the last delivery records (its sessions' departures park what
    /// they had not written), hands unfinished work back and removes the node
    /// and its connections from the registry.
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
        let fatal = ctx.fatal.lock().expect("fatal lock").take();
        // A node whose id was taken over must not remove the other's rows
        // (deregister removes only this incarnation's).
        if fatal.is_none() {
            db::bounded(registry::nodes::deregister(
                &ctx.pool,
                &ctx.node_id,
                ctx.incarnation(),
            ))
            .await
            .context("cannot deregister the node")?;
        }
        // Bounded: a connection whose answer never comes (a network cut)
        // must not keep the process from exiting.
        let _ = tokio::time::timeout(grace, ctx.pool.close()).await;
        let _ = tokio::time::timeout(grace, ctx.bookkeeping.close()).await;
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
        if let Err(error) = api_keys_once(&ctx, &keys).await {
            metrics::counter!(m::DB_ERRORS, "operation" => "api_keys").increment(1);
            tracing::warn!(%error, "could not reload the API keys");
        }
    }
}

/// Loads the live keys of `relay.api_keys` into `keys`.
pub async fn api_keys_once(
    ctx: &NodeContext,
    keys: &crate::auth::ApiKeys,
) -> Result<(), sqlx::Error> {
    let digests = db::bounded(
        sqlx::query_scalar!("SELECT key_digest FROM relay.api_keys WHERE revoked_at IS NULL")
            .fetch_all(&ctx.pool),
    )
    .await?;
    keys.set_stored(
        digests
            .into_iter()
            .filter_map(|d| d.try_into().ok())
            .collect(),
    );
    Ok(())
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Registered and refreshed.
    Alive,
    /// The node had been declared dead (its row was reaped): its sockets were
    /// closed so that clients reconnect, and it registered again under a new
    /// incarnation.
    Reregistered,
    /// Another process runs under this node id: this one stops.
    TakenOver,
}

/// Refreshes the node's `last_seen_at` (and the sweeper's lease, if it holds
/// it) on the liveness connection. A node that finds it was declared dead
/// heals: see [`heal`].
pub async fn heartbeat_once(ctx: &NodeContext) -> Result<Heartbeat, sqlx::Error> {
    let incarnation = ctx.registration.current();
    let lease = ctx
        .liveness
        .may_lead(ctx.settings.node_timeout)
        .then_some(ctx.settings.node_timeout);
    let beat = async {
        let mut held = ctx.liveness.hold().await?;
        let limit = held.timeout();
        let beat = tokio::time::timeout(
            limit,
            registry::nodes::beat(held.connection(), &ctx.node_id, incarnation, lease),
        )
        .await;
        held.settle(beat)
    }
    .await;
    let beat = match beat {
        Ok(beat) => beat,
        Err(error) => {
            ctx.liveness.beat_failed();
            return Err(error);
        }
    };
    if beat.alive {
        ctx.liveness.beat_succeeded(beat.leading);
        // Registered under the current incarnation: whatever said otherwise
        // was about an earlier one.
        ctx.liveness.set_healing(false);
        return Ok(Heartbeat::Alive);
    }
    let owner = {
        let mut held = ctx.liveness.hold().await?;
        let limit = held.timeout();
        let owner = tokio::time::timeout(
            limit,
            registry::nodes::owner(held.connection(), &ctx.node_id),
        )
        .await;
        held.settle(owner)?
    };
    if owner.is_some_and(|incarnation| !ctx.registration.is_ours(incarnation)) {
        ctx.fail(format!(
            "another process registered as node {}",
            ctx.node_id
        ));
        return Ok(Heartbeat::TakenOver);
    }
    heal(ctx).await?;
    Ok(Heartbeat::Reregistered)
}

/// Declared dead while alive (a long pause, a network cut): the sweeper has
/// removed this node's connections and parked its work, and whatever the
/// node still had in flight cannot commit (it is fenced by its
/// incarnation). The node closes every socket (clients resume with `since`,
/// or get what was parked for them), then registers again under a new
/// incarnation. A session that attaches meanwhile names the old incarnation
/// and is refused (its client retries), or the new one and is routable:
/// none is left open without a row.
pub async fn heal(ctx: &NodeContext) -> Result<(), sqlx::Error> {
    abandon_sessions(ctx);
    let incarnation = Uuid::new_v4();
    // Ours from now on, even if the answer to the registration is lost.
    ctx.registration.expect(incarnation);
    {
        let mut held = ctx.liveness.hold().await?;
        let registered = tokio::time::timeout(
            db::OP_TIMEOUT,
            registry::nodes::register(
                held.connection(),
                &ctx.node_id,
                incarnation,
                &ctx.advertised_addr,
            ),
        )
        .await;
        held.settle(registered)?;
    }
    ctx.registration.replace(incarnation);
    ctx.liveness.beat_succeeded(false);
    ctx.liveness.set_healing(false);
    tracing::info!(node_id = %ctx.node_id, %incarnation, "registered again");
    Ok(())
}

/// This node was declared dead (its row is gone or another incarnation's):
/// its sockets are no routing target any more. They are closed at once, so
/// that their clients resume elsewhere, whether or not the node can register
/// again yet; `/readyz` says not ready until it has.
fn abandon_sessions(ctx: &NodeContext) {
    if !ctx.liveness.is_healing() {
        tracing::error!(node_id = %ctx.node_id, "this node was declared dead; closing its sockets and registering again");
        metrics::counter!(m::NODE_HEALED).increment(1);
    }
    ctx.liveness.set_healing(true);
    ctx.liveness.set_leading(false);
    ctx.hub.control_all(Control::Close {
        code: 1012,
        reason: "node re-registering; reconnect with since".into(),
    });
}

async fn run_heartbeat(ctx: Arc<NodeContext>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            // A transaction was refused by the fence: the node is dead to
            // the cluster. Its sockets close now, even if the heartbeat (which
            // registers it again) cannot get through yet.
            () = ctx.registration.fenced() => abandon_sessions(&ctx),
            () = token.cancelled() => return,
        }
        match heartbeat_once(&ctx).await {
            Ok(Heartbeat::TakenOver) => return,
            Ok(_) => {}
            Err(error) => {
                metrics::counter!(m::DB_ERRORS, "operation" => "heartbeat").increment(1);
                tracing::warn!(%error, "heartbeat failed");
            }
        }
    }
}

/// Heartbeats of this node's presence rows, on the main pool: every
/// interval, `last_seen_at` of the connections that showed signs of life,
/// the outbox backlog gauge, and, when rows may exist without a session,
/// the reconciliation of the registry with the hub.
async fn run_presence(ctx: Arc<NodeContext>, token: CancellationToken) {
    let mut interval = tokio::time::interval(ctx.settings.heartbeat_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = token.cancelled() => return,
        }
        ticks += 1;
        if let Err(error) = presence_once(&ctx, ticks.is_multiple_of(RECONCILE_EVERY)).await {
            metrics::counter!(m::DB_ERRORS, "operation" => "presence").increment(1);
            tracing::warn!(%error, "refreshing the node's connections failed");
        }
    }
}

/// Presence steps between two full reconciliations of the registry.
const RECONCILE_EVERY: u64 = 30;

/// One presence step. With `full`, or when the registry may hold rows
/// without a session (an attach whose answer was lost, more rows than
/// sessions), the rows of this node's connections are compared with the
/// hub, and those without a session depart (their undelivered messages are
/// parked, see `deliveries`).
pub async fn presence_once(ctx: &NodeContext, full: bool) -> Result<u64, sqlx::Error> {
    let seen = ctx.hub.take_seen();
    db::bounded(registry::connections::refresh(
        &ctx.pool,
        &ctx.node_id,
        ctx.incarnation(),
        &seen,
    ))
    .await?;
    export_backlog(ctx).await;
    if ctx.registration.adopting() {
        adopt(ctx).await?;
    }
    let dirty = ctx.registry_dirty.swap(false, Ordering::AcqRel);
    let rows = db::bounded(registry::connections::count(&ctx.pool, &ctx.node_id)).await;
    let suspicious = rows
        .as_ref()
        .map_or(true, |rows| *rows > ctx.hub.len() as i64);
    if !(full || dirty || suspicious) {
        return Ok(0);
    }
    let reconciled = reconcile(ctx).await;
    if reconciled.is_err() && dirty {
        ctx.registry_may_be_dirty();
    }
    reconciled
}

/// Makes the registry match the hub: every connection this node's rows name
/// (connection rows, and claimed outbox rows) that has no session here
/// departs. Rows are read before the hub, and a session joins the hub
/// before its row commits: a row read whose session is not in the hub has
/// no session, or one that has closed.
async fn reconcile(ctx: &NodeContext) -> Result<u64, sqlx::Error> {
    let named = db::bounded(registry::connections::named(&ctx.pool, &ctx.node_id)).await?;
    let live: std::collections::HashSet<Uuid> = ctx.hub.ids().into_iter().collect();
    let ghosts: Vec<Uuid> = named.into_iter().filter(|id| !live.contains(id)).collect();
    if ghosts.is_empty() {
        return Ok(0);
    }
    tracing::warn!(
        ghosts = ghosts.len(),
        "registry rows without a session on this node; removing them"
    );
    let started = Instant::now();
    for id in &ghosts {
        ctx.deliveries
            .record(Record::Departed {
                connection_id: *id,
                done: None,
            })
            .await;
    }
    tracing::debug!(took = ?started.elapsed(), "ghost departures queued");
    Ok(ghosts.len() as u64)
}

/// Makes the rows an earlier registration of this node had claimed
/// claimable again (a few batches per step): its sessions are gone, and the
/// claims park their messages.
async fn adopt(ctx: &NodeContext) -> Result<(), sqlx::Error> {
    let incarnation = ctx.incarnation();
    for _ in 0..10 {
        let (adopted, more) =
            db::bounded(registry::nodes::adopt(&ctx.pool, &ctx.node_id, incarnation)).await?;
        if adopted > 0 {
            tracing::info!(
                adopted,
                "rows claimed by this node's earlier registration are claimable again"
            );
        }
        if !more {
            if incarnation == ctx.incarnation() {
                ctx.registration.adopted();
            }
            return Ok(());
        }
    }
    Ok(())
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

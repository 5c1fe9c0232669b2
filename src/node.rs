//! A running node's lifecycle: start (connect, migrate, bind, register),
//! the tasks it runs and what they are given, and stop. The one module
//! that sees every other: nothing imports it but the command line.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{Auth, NodeId, Settings};
use crate::db::pooling::{self, Plan, Wakeups};
use crate::liveness::Liveness;
use crate::rate::KeyedLimiter;
use crate::read::delivery_log::{self, DeliveryLog, Record, Writer};
use crate::read::hub::Hub;
use crate::read::{claimer, listener};
use crate::registration::Registration;
use crate::registry::heartbeat;
use crate::state::{Database, Lifecycle, LocalDelivery, NodeState, WriteSide};
use crate::supervisor::{self, spawn_loop, spawn_worker};
use crate::write::group_commit::GroupCommit;
use crate::{db, http, registry, stomp_tcp, sweeper};

/// A started node. Dropping it does not stop it: call [`RunningNode::stop`].
pub struct RunningNode {
    pub state: Arc<NodeState>,
    /// The address HTTP and WebSocket are served on (the real port when the
    /// configured one was 0).
    pub addr: SocketAddr,
    /// The address STOMP over TCP is served on, when it is.
    pub stomp_addr: Option<SocketAddr>,
    server: JoinHandle<()>,
    stomp_server: Option<JoinHandle<()>>,
    delivery_log: JoinHandle<()>,
    delivery_log_stop: CancellationToken,
}

/// Starts a node: connects, migrates, binds, registers and spawns its tasks.
///
/// # Errors
/// Database unreachable, migrations failing, or the address in use, each
/// with context fit for a one-line message.
pub async fn start(settings: Settings) -> anyhow::Result<RunningNode> {
    Ok(prepare(settings).await?.start())
}

/// A node registered, with its state and its port, but neither serving nor
/// running any task: [`Prepared::start`] adds those. Tests drive its
/// `*_once` steps alone, with no background loop racing them.
pub struct Prepared {
    pub state: Arc<NodeState>,
    listener: TcpListener,
    stomp_listener: Option<TcpListener>,
    records: tokio::sync::mpsc::Receiver<Record>,
}

/// Probes how the database is reached, connects, migrates, binds the port,
/// connects the bookkeeping pool and registers the node.
///
/// # Errors
/// Database unreachable, migrations failing, or the address in use, each
/// with context fit for a one-line message.
pub async fn prepare(settings: Settings) -> anyhow::Result<Prepared> {
    let plan = match pooling::plan(&settings).await {
        Ok(plan) => plan,
        Err(pooling::PlanError::Database(error)) => {
            return Err(anyhow::Error::from(error).context(
                "cannot connect to the database (DATABASE_URL or PGRELAY_DIRECT_DATABASE_URL)",
            ));
        }
        Err(refused) => return Err(refused.into()),
    };
    // Before any pool connects: how every connection of this process talks.
    db::set_pooled(plan.pooled, settings.idle_transaction_timeout());
    let pool = db::connect(&settings)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    db::migrate_for(&settings, &pool)
        .await
        .context("database migrations failed")?;
    may_run(&pool).await?;
    db::publish_config(&pool, &settings)
        .await
        .context("cannot write relay.config")?;
    prepare_with(settings, pool, plan).await
}

/// Whether the node's role may do a node's work. Since EXECUTE on relay's
/// functions is revoked from PUBLIC, a role that is not the schema's owner
/// (nor granted) fails at its first claim or fence: say so at start.
async fn may_run(pool: &PgPool) -> anyhow::Result<()> {
    let mut scope = db::scope(pool).await?;
    let (role, allowed): (String, bool) = sqlx::query_as(
        "SELECT current_user::text,
                has_function_privilege('relay.fence(text, uuid)', 'EXECUTE')
                AND has_function_privilege('relay.enqueue(jsonb[], text[], jsonb[], interval[], text, bytea[], text[], boolean, jsonb[])', 'EXECUTE')
                AND has_table_privilege('relay.outbox', 'INSERT')
                AND has_table_privilege('relay.outbox', 'UPDATE')
                AND has_table_privilege('relay.outbox', 'DELETE')",
    )
    .fetch_one(&mut *scope)
    .await
    .context("cannot check the node's database privileges")?;
    scope.end().await?;
    anyhow::ensure!(
        allowed,
        "the database role {role:?} may not run pgrelay: run the nodes as the role that owns \
         relay's tables and functions (the one that ran the migrations; EXECUTE on them is \
         revoked from PUBLIC), or grant {role:?} EXECUTE ON ALL FUNCTIONS, ALL PRIVILEGES ON ALL \
         TABLES and USAGE ON ALL SEQUENCES IN SCHEMA relay"
    );
    Ok(())
}

/// [`prepare`] with the plan already probed.
async fn prepare_with(settings: Settings, pool: PgPool, plan: Plan) -> anyhow::Result<Prepared> {
    crate::metrics::install();
    match &plan.wakeups {
        Wakeups::Notify { .. } => tracing::info!(
            pooler = plan.pooler_name(),
            wakeups = plan.wakeups.name(),
            "database reached"
        ),
        Wakeups::PollOnly { reason } => tracing::warn!(
            pooler = plan.pooler_name(),
            wakeups = plan.wakeups.name(),
            poll_interval_ms = settings.poll_only_interval.as_millis() as u64,
            %reason,
            "poll-only: LISTEN is unavailable, so the node polls the outbox instead of waiting for NOTIFY"
        ),
    }
    metrics::gauge!(crate::metrics::POLL_ONLY).set(if plan.wakeups.is_poll_only() {
        1.0
    } else {
        0.0
    });
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {} (PGRELAY_LISTEN)", settings.listen))?;
    let addr = listener.local_addr()?;
    let stomp_listener = match settings.stomp_listen {
        Some(stomp) => Some(
            TcpListener::bind(stomp)
                .await
                .with_context(|| format!("cannot listen on {stomp} (PGRELAY_STOMP_LISTEN)"))?,
        ),
        None => None,
    };
    let incarnation = Uuid::new_v4();
    let bookkeeping = db::connect_bookkeeping(&settings)
        .await
        .context("cannot connect to the database (DATABASE_URL)")?;
    let advertised_addr = settings
        .advertise_addr
        .clone()
        .unwrap_or_else(|| addr.to_string());
    // Heartbeats, the lease and registration never wait behind traffic: on
    // a pooler, that needs the direct URL (through the pooler they would queue
    // for its server connections with everything else). Pooler-safe options
    // there too (no statement cache: its statements run in transactions that
    // drop prepared statements, as every pooled one does).
    let liveness_name = format!("pgrelay {} liveness", settings.node_id);
    let liveness_options = match &settings.direct_database_url {
        Some(direct) if plan.pooled => db::pooler_options(direct, &liveness_name)?,
        _ => db::connect_options(&settings.database_url, &liveness_name)?,
    };
    let liveness = Liveness::new(liveness_options, settings.liveness_timeout());
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

    let (log, records) = DeliveryLog::new();
    let slow_submissions = Arc::new(Semaphore::new((settings.db_pool_size as usize / 4).max(1)));
    let group_commit = GroupCommit::start(
        pool.clone(),
        settings.submit_batch,
        settings.submit_concurrency,
        slow_submissions.clone(),
    );
    let api_limiter = KeyedLimiter::new(settings.limits.api_rate_limit);
    let state = Arc::new(NodeState {
        node_id: settings.node_id.clone(),
        settings,
        db: Database { pool, bookkeeping },
        delivery: LocalDelivery {
            hub: Hub::default(),
            log,
        },
        write: WriteSide {
            group_commit,
            slow_submissions,
            api_limiter,
        },
        lifecycle: Lifecycle::new(registration, liveness, addr, advertised_addr, plan),
        prune_from: Mutex::new(String::new()),
    });
    Ok(Prepared {
        state,
        listener,
        stomp_listener,
        records,
    })
}

impl Prepared {
    /// Starts the node's tasks and serves.
    pub fn start(self) -> RunningNode {
        let Prepared {
            state: ctx,
            listener,
            stomp_listener,
            records,
        } = self;
        let addr = ctx.lifecycle.listen_addr;
        tracing::info!(node_id = %ctx.node_id, %addr, "node started");
        // The delivery log outlives the sessions: it writes their last
        // records when the node stops.
        let delivery_log_stop = CancellationToken::new();
        let writer = supervisor::queue(Writer::new(records));
        let delivery_log = spawn_worker("delivery log", {
            let (ctx, stop) = (ctx.clone(), delivery_log_stop.clone());
            move || {
                let (ctx, stop, writer) = (ctx.clone(), stop.clone(), writer.clone());
                async move {
                    let mut writer = writer.lock().await;
                    delivery_log::run(
                        &ctx.db.bookkeeping,
                        &ctx.node_id,
                        &ctx.lifecycle.registration,
                        ctx.settings.idle_transaction_timeout(),
                        &mut writer,
                        &stop,
                    )
                    .await;
                    tracing::info!("the delivery log has written its last records");
                }
            }
        });

        let wake = Arc::new(listener::Wake::default());
        if let Wakeups::Notify { url } = &ctx.lifecycle.plan.wakeups {
            let url = url.clone();
            spawn_loop(&ctx.lifecycle.tasks, &ctx.lifecycle.shutdown, "listener", {
                let (ctx, wake) = (ctx.clone(), wake.clone());
                move |token| listener::run(ctx.clone(), url.clone(), wake.clone(), token)
            });
        }
        spawn_loop(&ctx.lifecycle.tasks, &ctx.lifecycle.shutdown, "claimer", {
            let (ctx, wake) = (ctx.clone(), wake.clone());
            move |token| claimer::run(ctx.clone(), wake.clone(), token)
        });
        spawn_loop(
            &ctx.lifecycle.tasks,
            &ctx.lifecycle.shutdown,
            "outbox-backlog",
            {
                let ctx = ctx.clone();
                move |token| claimer::run_backlog(ctx.clone(), token)
            },
        );
        spawn_loop(&ctx.lifecycle.tasks, &ctx.lifecycle.shutdown, "sweeper", {
            let ctx = ctx.clone();
            move |token| sweeper::run(ctx.clone(), token)
        });
        spawn_loop(
            &ctx.lifecycle.tasks,
            &ctx.lifecycle.shutdown,
            "heartbeat",
            {
                let ctx = ctx.clone();
                move |token| heartbeat::run(ctx.clone(), token)
            },
        );
        if heartbeat::liveness_bypasses_the_pool(&ctx) {
            spawn_loop(
                &ctx.lifecycle.tasks,
                &ctx.lifecycle.shutdown,
                "pooler-check",
                {
                    let ctx = ctx.clone();
                    move |token| heartbeat::run_pooler_check(ctx.clone(), token)
                },
            );
        }
        spawn_loop(&ctx.lifecycle.tasks, &ctx.lifecycle.shutdown, "presence", {
            let ctx = ctx.clone();
            move |token| heartbeat::run_presence(ctx.clone(), token)
        });
        if let Auth::Jwt { api_keys, .. } = &ctx.settings.auth {
            let api_keys = api_keys.clone();
            spawn_loop(&ctx.lifecycle.tasks, &ctx.lifecycle.shutdown, "api-keys", {
                let ctx = ctx.clone();
                move |token| http::auth::run_api_keys(ctx.clone(), api_keys.clone(), token)
            });
        }

        let listener = Arc::new(listener);
        let router = http::router(ctx.clone());
        // One cap for every client connection, whichever port it came in by.
        let slots = Arc::new(Semaphore::new(ctx.settings.limits.max_connections));
        let stomp_addr = stomp_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let stomp_server = stomp_listener.map(|stomp_listener| {
            if let Some(addr) = stomp_addr {
                tracing::info!(%addr, "serving STOMP over TCP");
            }
            let stomp_listener = Arc::new(stomp_listener);
            spawn_worker("stomp server", {
                let (ctx, slots) = (ctx.clone(), slots.clone());
                move || stomp_tcp::serve(ctx.clone(), stomp_listener.clone(), slots.clone())
            })
        });
        let server = spawn_worker("http server", {
            let ctx = ctx.clone();
            move || {
                http::server::serve(
                    listener.clone(),
                    router.clone(),
                    slots.clone(),
                    ctx.settings.limits.request_timeout,
                    ctx.lifecycle.shutdown.clone(),
                    ctx.settings.shutdown_grace,
                )
            }
        });

        RunningNode {
            state: ctx,
            addr,
            stomp_addr,
            server,
            stomp_server,
            delivery_log,
            delivery_log_stop,
        }
    }
}

impl RunningNode {
    pub fn node_id(&self) -> &NodeId {
        &self.state.node_id
    }

    /// Stops the node cleanly: stops accepting, closes every socket with 1012,
    /// writes the last delivery records (its sessions' departures park what
    /// they had not written), hands unfinished work back and removes the node
    /// and its connections from the registry.
    pub async fn stop(self) -> anyhow::Result<()> {
        let ctx = self.state;
        let grace = ctx.settings.shutdown_grace;
        tracing::info!(node_id = %ctx.node_id, sessions = ctx.delivery.hub.len(), "stopping");
        ctx.lifecycle.shutdown.cancel();
        ctx.lifecycle.tasks.close();
        if tokio::time::timeout(grace, ctx.lifecycle.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("sessions and tasks did not finish within the shutdown grace");
        }
        let _ = tokio::time::timeout(grace, self.server).await;
        if let Some(stomp_server) = self.stomp_server {
            let _ = tokio::time::timeout(grace, stomp_server).await;
        }
        // Departures still waiting for room in the log's queue go in first.
        ctx.delivery.log.overflow_drained(grace).await;
        self.delivery_log_stop.cancel();
        let _ = tokio::time::timeout(grace, self.delivery_log).await;
        let fatal = ctx.take_fatal();
        // A node whose id was taken over must not remove the other's rows
        // (deregister removes only this incarnation's).
        if fatal.is_none() {
            db::bounded(registry::nodes::deregister(
                &ctx.db.pool,
                &ctx.node_id,
                ctx.incarnation(),
            ))
            .await
            .context("cannot deregister the node")?;
        }
        // Bounded: a connection whose answer never comes (a network cut)
        // must not keep the process from exiting.
        let _ = tokio::time::timeout(grace, ctx.db.pool.close()).await;
        let _ = tokio::time::timeout(grace, ctx.db.bookkeeping.close()).await;
        tracing::info!(node_id = %ctx.node_id, "stopped");
        match fatal {
            Some(reason) => Err(anyhow::anyhow!(reason)),
            None => Ok(()),
        }
    }

    /// Resolves when the node begins to stop by itself (see [`RunningNode::stop`]
    /// for the rest of the way).
    pub async fn stopping(&self) {
        self.state.lifecycle.shutdown.cancelled().await;
    }
}

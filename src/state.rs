//! What a node's parts share, grouped by role: its database pools, its
//! local delivery (the hub and the delivery log), its write side (the group
//! commit and what bounds it) and its lifecycle (registration, liveness,
//! shutdown, tasks).
//!
//! This is the floor the rest stands on: it imports the types it holds and
//! nothing that uses it. Tasks and handlers get an `Arc<NodeState>`; the
//! code that runs them lives beside the data it owns (the claimer in
//! `read`, the heartbeat in `registry`, the API-key reload in `http`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sqlx::PgPool;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{NodeId, Settings};
use crate::db::pooling::Plan;
use crate::liveness::Liveness;
use crate::metrics as m;
use crate::rate::KeyedLimiter;
use crate::read::delivery_log::DeliveryLog;
use crate::read::hub::Hub;
use crate::registration::Registration;
use crate::write::group_commit::GroupCommit;

/// Everything the node's tasks and handlers share.
pub struct NodeState {
    pub settings: Settings,
    pub node_id: NodeId,
    pub db: Database,
    pub delivery: LocalDelivery,
    pub write: WriteSide,
    pub lifecycle: Lifecycle,
    /// Where the sweeper's pruning of `relay.streams` goes on from.
    pub prune_from: Mutex<String>,
}

/// The node's pools.
pub struct Database {
    /// Submissions, connects, reads for the API.
    pub pool: PgPool,
    /// Claims and delivery records: see [`crate::db::connect_bookkeeping`].
    pub bookkeeping: PgPool,
}

/// Where claimed messages go on this node, and where their writes are
/// recorded.
pub struct LocalDelivery {
    /// The live sessions.
    pub hub: Hub,
    /// Deliveries, acks and departures on their way to `relay.deliveries`.
    pub log: DeliveryLog,
}

/// What stores what clients and backends send.
pub struct WriteSide {
    /// Every submission goes through it: concurrent ones share transactions.
    pub group_commit: GroupCommit,
    /// Submissions that must wait for a stream another transaction holds
    /// take a permit: they are bounded, so that a held stream cannot take
    /// every pooled connection.
    pub slow_submissions: Arc<Semaphore>,
    /// Submissions per second per API key.
    pub api_limiter: KeyedLimiter,
}

/// The node's life: who it is registered as, whether it is alive, and how
/// it stops.
pub struct Lifecycle {
    /// This process's claim on `node_id`: the incarnation its transactions
    /// are fenced by (see `relay.nodes.incarnation`).
    pub registration: Arc<Registration>,
    /// Heartbeats, the sweeper's lease, registration: never behind traffic.
    pub liveness: Liveness,
    /// Cancelled when the node stops: sessions close, tasks end.
    pub shutdown: CancellationToken,
    /// Sessions and background tasks, awaited on shutdown.
    pub tasks: TaskTracker,
    /// Whether the LISTEN connection is up (for `/readyz`).
    pub listener_up: AtomicBool,
    /// Whether DATABASE_URL is a pooler, and whether NOTIFY wakes the node.
    pub plan: Plan,
    /// The address this node serves on.
    pub listen_addr: SocketAddr,
    /// The address registered for it (`PGRELAY_ADVERTISE_ADDR`, or the above).
    pub advertised_addr: String,
    /// Set when a registry row may exist without its session (an attach whose
    /// answer was lost): the presence task then reconciles.
    registry_dirty: AtomicBool,
    /// Why the node stopped itself, if it did.
    fatal: Mutex<Option<String>>,
}

impl Lifecycle {
    pub fn new(
        registration: Arc<Registration>,
        liveness: Liveness,
        listen_addr: SocketAddr,
        advertised_addr: String,
        plan: Plan,
    ) -> Self {
        Self {
            registration,
            liveness,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            listener_up: AtomicBool::new(false),
            plan,
            listen_addr,
            advertised_addr,
            registry_dirty: AtomicBool::new(false),
            fatal: Mutex::new(None),
        }
    }
}

impl NodeState {
    /// The incarnation this node's transactions name now.
    pub fn incarnation(&self) -> Uuid {
        self.lifecycle.registration.current()
    }

    /// Sets the database pool gauges (read at each scrape).
    pub fn export_pool_gauges(&self) {
        for (name, pool) in [
            ("main", &self.db.pool),
            ("bookkeeping", &self.db.bookkeeping),
        ] {
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
        self.lifecycle.registry_dirty.store(true, Ordering::Release);
    }

    /// Whether a registry row may exist without its session; clears it.
    pub fn take_registry_dirty(&self) -> bool {
        self.lifecycle.registry_dirty.swap(false, Ordering::AcqRel)
    }

    /// Why the node is not ready to serve, if it is not (for `/readyz`):
    /// answered from what it knows, without asking the database.
    pub fn not_ready(&self) -> Option<&'static str> {
        let within = self.settings.heartbeat_interval * 2 + self.settings.liveness_timeout();
        if let Some(reason) = self.lifecycle.liveness.not_ready(within) {
            return Some(reason);
        }
        if !self.lifecycle.plan.wakeups.is_poll_only()
            && !self.lifecycle.listener_up.load(Ordering::Acquire)
        {
            return Some("the LISTEN connection is down");
        }
        None
    }

    /// How long the claimer sleeps between rescans: short when it polls
    /// instead of waiting for NOTIFY.
    pub fn poll_interval(&self) -> std::time::Duration {
        if self.lifecycle.plan.wakeups.is_poll_only() {
            self.settings.poll_only_interval
        } else {
            self.settings.poll_interval
        }
    }

    /// Stops the node from within, e.g. when another process took its id.
    pub fn fail(&self, reason: String) {
        tracing::error!(node_id = %self.node_id, %reason, "stopping the node");
        *self.lifecycle.fatal.lock().expect("fatal lock") = Some(reason);
        self.lifecycle.shutdown.cancel();
    }

    /// Why the node stopped itself, if it did (taken once, at stop).
    pub fn take_fatal(&self) -> Option<String> {
        self.lifecycle.fatal.lock().expect("fatal lock").take()
    }
}

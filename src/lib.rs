//! pgrelay makes a cluster of WebSocket servers behave like one, using
//! nothing but PostgreSQL.
//!
//! The places, in the order a message passes them:
//! - [`http`]: the HTTP API that accepts messages (and serves the registry);
//! - [`router`]: stores a message and routes it to the nodes that hold its
//!   recipients, in one transaction (`relay.enqueue` in the migrations);
//! - [`outbox`]: each node's LISTEN wake-up and claim loop over its work;
//! - [`hub`]: the node's live sessions, where claimed messages are handed over;
//! - [`session`] and [`protocol`]: one client socket and the frames it speaks
//!   (the JSON protocol, STOMP);
//! - [`deliveries`]: the batched delivery log (`relay.deliveries`);
//! - [`registry`]: nodes, connections and topic subscriptions in `relay.nodes`,
//!   `relay.connections` and `relay.subscriptions`;
//! - [`stream`]: reading a stream back for backfill and resume;
//! - [`sweeper`]: retention and cleanup, on one node at a time.
//!
//! Around them: [`config`], [`auth`], [`topic`] (names and patterns), [`db`], [`node`] (lifecycle),
//! [`liveness`] (heartbeats and the sweeper's lease, on a connection of their own), [`cli`],
//! [`dev`] and [`pgtemp`] (a throwaway PostgreSQL for demos and tests), and
//! [`bench`] (the load generator behind `pgrelay bench`).

pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod db;
pub mod deliveries;
pub mod dev;
pub mod group_commit;
pub mod http;
pub mod hub;
pub mod limits;
pub mod liveness;
pub mod message;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod outbox;
pub mod pgtemp;
pub mod protocol;
pub mod registry;
pub mod router;
pub mod session;
pub mod status;
pub mod stream;
pub mod sweeper;
pub mod telemetry;
pub mod topic;

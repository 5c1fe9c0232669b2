//! The cluster's registry in PostgreSQL: which nodes are alive
//! (`relay.nodes`), which sockets each holds (`relay.connections`) and which
//! topics those listen to (`relay.subscriptions`), and the node's task that
//! keeps its own rows true ([`heartbeat`]).
//!
//! `nodes`, `connections` and `subscriptions` are SQL on a connection or a
//! pool: they know no node state, and the write and read sides may use
//! them. `heartbeat` runs on the node's state.

pub mod connections;
pub mod heartbeat;
pub mod nodes;
pub mod subscriptions;

//! The cluster's registry in PostgreSQL: which nodes are alive
//! (`relay.nodes`), which sockets each holds (`relay.connections`) and which
//! topics those listen to (`relay.subscriptions`).

pub mod connections;
pub mod nodes;
pub mod subscriptions;

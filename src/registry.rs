//! The cluster's registry in PostgreSQL: which nodes are alive
//! (`relay.nodes`) and which sockets each holds (`relay.connections`).

pub mod connections;
pub mod nodes;

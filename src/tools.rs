//! What runs around nodes rather than in them: the zero-setup demo
//! ([`dev`]), a throwaway PostgreSQL ([`pgtemp`]), the operator commands
//! ([`operator`]: send, status, tail, keys) and their HTTP client
//! ([`http_client`]), and the load generator ([`bench`]).
//!
//! They use the node (start one, or talk to one) and the write side; no
//! part of a node imports them.

pub mod bench;
pub mod dev;
pub mod http_client;
pub mod operator;
pub mod pgtemp;

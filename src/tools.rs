//! What runs around nodes rather than in them: the zero-setup demo
//! ([`dev`]), a throwaway PostgreSQL ([`pgtemp`]) and a PgBouncer in front
//! of it ([`pgbouncer`], for the pooler tests), the operator commands
//! ([`operator`]: send, status, tail, keys) and their HTTP client
//! ([`http_client`]), the least-privilege roles ([`grants`]), and the load
//! generator ([`bench`]).
//!
//! They use the node (start one, or talk to one) and the write side; no
//! part of a node imports them.

pub mod bench;
pub mod dev;
pub mod grants;
pub mod http_client;
pub mod operator;
pub mod pgbouncer;
pub mod pgtemp;

//! The test harness: databases, clusters of nodes, and clients.

#![allow(dead_code)]

mod clients;
mod cluster;
mod database;
mod processes;
mod tcp_stomp;
mod waiting;

pub use clients::{Client, StompClient, StompReply, id_of, response, token};
pub use cluster::{API_KEY, AuthKind, Cluster, settings, sweep_now};
pub use database::{
    NodeRoute, TestDb, admin_url, node_route, node_sessions_waiting_on_locks, through_pgbouncer,
    with_database,
};
pub use processes::{FAST, NodeProcess, node_scenario, node_scenario_acting, npm_installed};
pub use tcp_stomp::TcpStomp;
pub use waiting::{WAIT, eventually, eventually_within, within};

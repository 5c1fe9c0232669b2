//! pgrelay makes a cluster of WebSocket servers behave like one, using
//! nothing but PostgreSQL.
//!
//! The path of a message, through the folders that hold each step:
//!
//! ```text
//!  HTTP POST ─┐                                        ┌─ session (JSON or STOMP)
//!  JSON publish ─┤ write::parse → write::group_commit  │      ▲
//!  STOMP SEND ─┤   → write::enqueue (relay.enqueue:    │ read::hub
//!  pgrelay send ─┘    rows + one NOTIFY per batch)     │      ▲
//!                          │                           │ read::claimer ← read::listener
//!                          ▼                           │      ▲ (LISTEN wakes; the table is the truth)
//!                 relay.messages, relay.outbox ────────┴──────┘
//!                          │
//!  session writes a frame → read::delivery_log → relay.deliveries (the audit)
//! ```
//!
//! - [`write`]: every way in (HTTP, JSON `publish`, STOMP `SEND`, the
//!   command line) checks a message once, shares a transaction with
//!   concurrent ones, and is answered only once it has committed;
//! - [`read`]: each node's LISTEN wake-up, its claim of the outbox rows
//!   routed to it, the hub that hands them to local sessions, streams read
//!   back for resume, and the delivery log;
//! - [`session`] and [`protocol`]: one client socket and the frames it
//!   speaks; [`http`]: the HTTP API and the WebSocket upgrade;
//!   [`stomp_tcp`]: STOMP over plain TCP (Spring's broker relay);
//! - [`registry`]: nodes, connections and subscriptions, and the node's
//!   heartbeat; [`sweeper`]: retention and reaping, on one node at a time.
//!
//! Underneath them all: [`registration`] (this process's incarnation),
//! [`supervisor`] (no task dies silently), [`config`], [`auth`], [`topic`],
//! [`message`], [`db`], [`liveness`], [`rate`], [`metrics`] and [`status`]
//! (what the status and tail commands read). [`state`] groups what a node's
//! parts share; it imports only the types it holds (the hub, the delivery
//! log, the group commit), none of which imports it. On top: [`node`] (a
//! node's lifecycle), [`cli`], and [`tools`] (the demo, a throwaway
//! PostgreSQL, the operator commands and the benchmark).

/// Declares an error that is one sentence for people (what was wrong, fit
/// to show whoever sent it), as a type of its own, so that a signature says
/// which kind of refusal it returns.
macro_rules! reason_error {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error("{0}")]
        pub struct $name(pub String);

        impl From<String> for $name {
            fn from(reason: String) -> Self {
                Self(reason)
            }
        }

        impl From<&str> for $name {
            fn from(reason: &str) -> Self {
                Self(reason.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(error: $name) -> Self {
                error.0
            }
        }
    };
}

pub mod auth;
pub mod cli;
pub mod config;
pub mod cursor;
pub mod db;
pub mod http;
pub mod liveness;
pub mod message;
pub mod metrics;
pub mod node;
pub mod process;
pub mod protocol;
pub mod rate;
pub mod read;
pub mod registration;
pub mod registry;
pub mod session;
pub mod state;
pub mod status;
pub mod stomp_tcp;
pub mod supervisor;
pub mod sweeper;
pub mod telemetry;
pub mod tools;
pub mod topic;
pub mod write;

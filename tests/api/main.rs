//! Integration tests: real nodes (in-process servers on ephemeral ports, or
//! the `pgrelay` binary) against a fresh PostgreSQL database per test, with
//! real WebSocket and HTTP clients.
//!
//! The database server is `DATABASE_URL` when it is set, and otherwise a
//! throwaway PostgreSQL started from this machine's binaries.

mod faultkit;
mod helpers;

mod browser;
mod chaos;
mod cli;
mod core;
mod faults;
mod guarantees;
mod jsclient;
mod listing;
mod operability;
mod partial;
mod pooler;
mod privileges;
mod random;
mod security;
mod spring;
mod stomp;
mod stomp_py;
mod stomp_tcp;
mod stompjs;
mod topics;

//! The write side: how a message gets stored and routed.
//!
//! Each edge (HTTP, JSON `publish`, STOMP `SEND`, `pgrelay send`) turns what
//! it received into a [`parse::Draft`] and checks it with [`parse`] (one set
//! of rules for all); [`idempotency`] stores a submission under an
//! `Idempotency-Key` exactly once; everything else goes through
//! [`group_commit`], which shares transactions among concurrent
//! submissions and calls [`enqueue`] (the SQL function `relay.enqueue`).
//! [`disconnect`] queues a disconnect request the same way work is routed.
//! Every submission has one deadline ([`enqueue::SUBMIT_TIMEOUT`]) and an
//! honest answer: stored, not stored, or unknown.
//!
//! It knows nothing of HTTP, sessions or the read side.

pub mod disconnect;
pub mod enqueue;
pub mod group_commit;
pub mod idempotency;
pub mod parse;

//! The read side: how a stored message reaches the sockets of this node.
//!
//! [`listener`] LISTENs on the node's channel and wakes [`claimer`], which
//! takes the outbox rows routed here and offers their messages to the
//! sessions in [`hub`]; a session that fell behind, or resumes, reads the
//! message streams back through [`stream`]; every write to a socket is
//! recorded by [`delivery_log`], which also finishes the outbox rows. Queue
//! messages wait in their queue until [`queues`] claims them for one
//! consumer here (the claimer runs it too).
//!
//! It may use the registry's SQL and the node's state; it knows nothing of
//! HTTP, sessions or the write side.

pub mod claimer;
pub mod delivery_log;
pub mod hub;
pub mod listener;
pub mod queues;
pub mod stream;

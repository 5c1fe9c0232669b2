//! The node's liveness connection: its heartbeat, the sweeper's lease and
//! its registration run here, on a connection of their own, so that no
//! amount of traffic (submissions, claims, connects waiting for a held
//! stream) can make the node miss a heartbeat. What the last heartbeat
//! found is kept here too, so that `/readyz` answers from memory at once.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

/// The liveness connection and what it last saw.
pub struct Liveness {
    options: PgConnectOptions,
    /// Every operation is bounded by this; a connection whose operation
    /// timed out is dropped (it may be stuck behind a network cut).
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<PgConnection>>,
    /// When a heartbeat last succeeded.
    last_beat: Mutex<Option<Instant>>,
    /// Whether the last heartbeat failed.
    failing: AtomicBool,
    /// Whether this node holds the sweeper's lease (as of its last heartbeat
    /// or attempt to take it).
    leading: AtomicBool,
    /// Set while the node, declared dead, registers again.
    healing: AtomicBool,
    /// Since when this node's sweeps have failed (it holds the lease, but
    /// its pool or its database work is broken).
    sweeps_failing_since: Mutex<Option<Instant>>,
    /// Since when `DATABASE_URL` has not answered, when the liveness
    /// connection is not on it (a pooler, with liveness on the direct URL):
    /// heartbeats alone would not show that the node cannot work.
    pool_failing_since: Mutex<Option<Instant>>,
}

impl Liveness {
    pub fn new(options: PgConnectOptions, timeout: Duration) -> Self {
        Self {
            options,
            timeout,
            connection: tokio::sync::Mutex::new(None),
            last_beat: Mutex::new(None),
            failing: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            healing: AtomicBool::new(false),
            sweeps_failing_since: Mutex::new(None),
            pool_failing_since: Mutex::new(None),
        }
    }

    /// The liveness connection, opened first if need be (within the liveness
    /// timeout). Run each statement through [`Held::bounded`].
    pub async fn hold(&self) -> Result<Held<'_>, sqlx::Error> {
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            let connected = tokio::time::timeout(self.timeout, self.options.connect()).await;
            *slot = Some(connected.unwrap_or_else(|_| Err(timed_out()))?);
        }
        Ok(Held {
            slot,
            timeout: self.timeout,
        })
    }

    /// A heartbeat succeeded.
    pub fn beat_succeeded(&self, leading: bool) {
        *self.last_beat.lock().expect("liveness lock") = Some(Instant::now());
        self.failing.store(false, Ordering::Release);
        self.leading.store(leading, Ordering::Release);
    }

    pub fn beat_failed(&self) {
        self.failing.store(true, Ordering::Release);
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    pub fn set_healing(&self, healing: bool) {
        self.healing.store(healing, Ordering::Release);
    }

    pub fn is_healing(&self) -> bool {
        self.healing.load(Ordering::Acquire)
    }

    pub fn sweep_succeeded(&self) {
        *self.sweeps_failing_since.lock().expect("liveness lock") = None;
    }

    pub fn sweep_failed(&self) {
        self.sweeps_failing_since
            .lock()
            .expect("liveness lock")
            .get_or_insert_with(Instant::now);
    }

    pub fn pool_answered(&self) {
        *self.pool_failing_since.lock().expect("liveness lock") = None;
    }

    pub fn pool_failed(&self) {
        self.pool_failing_since
            .lock()
            .expect("liveness lock")
            .get_or_insert_with(Instant::now);
    }

    /// How long `DATABASE_URL` has not answered (zero while it does).
    pub fn pool_failing_for(&self) -> std::time::Duration {
        self.pool_failing_since
            .lock()
            .expect("liveness lock")
            .map_or(std::time::Duration::ZERO, |since| since.elapsed())
    }

    /// Whether this node may keep (renew, or take) the sweeper's lease: not
    /// once its sweeps have failed for longer than `limit` (its heartbeats may
    /// get through while its other database work does not: another node
    /// should sweep), until three times that has passed, when it may try
    /// again.
    pub fn may_lead(&self, limit: Duration) -> bool {
        let mut failing = self.sweeps_failing_since.lock().expect("liveness lock");
        match *failing {
            None => true,
            Some(since) if since.elapsed() >= limit * 3 => {
                *failing = None;
                true
            }
            Some(since) => since.elapsed() < limit,
        }
    }

    /// Why the node is not ready, if it is not: its last heartbeat failed,
    /// or none succeeded within `within`, or it is registering again.
    pub fn not_ready(&self, within: Duration) -> Option<&'static str> {
        if self.is_healing() {
            return Some("the node was declared dead and is registering again");
        }
        if self.failing.load(Ordering::Acquire) {
            return Some("the node's last heartbeat failed: the database is unavailable");
        }
        match *self.last_beat.lock().expect("liveness lock") {
            Some(at) if at.elapsed() <= within => None,
            _ => Some("no heartbeat succeeded lately: the database is unavailable"),
        }
    }
}

/// The liveness connection, held.
pub struct Held<'a> {
    slot: tokio::sync::MutexGuard<'a, Option<PgConnection>>,
    timeout: Duration,
}

impl Held<'_> {
    pub fn connection(&mut self) -> &mut PgConnection {
        self.slot.as_mut().expect("held connections are open")
    }

    /// The usual bound of a liveness operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// What an operation on [`Held::connection`] run under a timeout came
    /// to. A connection whose operation timed out or broke is dropped, to be
    /// opened again next time: it may be stuck behind a network cut.
    pub fn settle<T>(
        &mut self,
        outcome: Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>,
    ) -> Result<T, sqlx::Error> {
        let outcome = outcome.unwrap_or_else(|_| Err(timed_out()));
        if let Err(error) = &outcome
            && error.as_database_error().is_none()
            && let Some(connection) = self.slot.take()
        {
            // Closing waits for nothing the dead connection might owe.
            drop(tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), connection.close()).await;
            }));
        }
        outcome
    }
}

fn timed_out() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the liveness connection did not answer in time",
    ))
}

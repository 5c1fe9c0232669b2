//! How a node reaches PostgreSQL, decided once at start: whether
//! `DATABASE_URL` is a transaction-mode pooler, and whether NOTIFY can wake
//! the node (LISTEN needs a real session) or it must poll.
//!
//! A pooler is recognized by what it does: two client connections whose
//! statements run on one server process (`pg_backend_pid()`), or one client
//! connection whose statements move between server processes. Neither can
//! happen on a real session. This asks nothing of the pooler and leaves
//! nothing behind; a LISTEN sent through a transaction-mode pooler would
//! stay on whichever server connection ran it, and a NOTIFY would then land
//! in another client's query (seen with PgBouncer 1.18: "unexpected message:
//! NotificationResponse").
//!
//! The URL LISTEN will use (the direct URL, or a `DATABASE_URL` that is a
//! real session) is then checked with a NOTIFY round trip the way the node
//! will use it: LISTEN on a fresh channel there, NOTIFY it in a transaction
//! through `DATABASE_URL`, wait for it. A direct URL it fails on is refused
//! (it does not reach the same database); on a direct `DATABASE_URL` a slow
//! answer is only reported.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use uuid::Uuid;

use crate::config::{PoolerMode, Settings};

/// How long the probe waits for its own NOTIFY. A direct server answers in
/// about a millisecond.
pub const PROBE_WAIT: Duration = Duration::from_secs(2);

/// How new messages reach the claimer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wakeups {
    /// NOTIFY, LISTENed for on this URL (with a rescan as the safety net).
    Notify { url: String },
    /// No LISTEN: the claimer polls every `PGRELAY_POLL_ONLY_INTERVAL`.
    PollOnly { reason: String },
}

impl Wakeups {
    pub fn is_poll_only(&self) -> bool {
        matches!(self, Wakeups::PollOnly { .. })
    }

    /// `notify` or `poll`, as `/v1/status` and the log say it.
    pub fn name(&self) -> &'static str {
        match self {
            Wakeups::Notify { .. } => "notify",
            Wakeups::PollOnly { .. } => "poll",
        }
    }
}

/// What the probe decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `DATABASE_URL` is a transaction-mode pooler.
    pub pooled: bool,
    pub wakeups: Wakeups,
}

impl Plan {
    /// `transaction` or `direct`.
    pub fn pooler_name(&self) -> &'static str {
        if self.pooled { "transaction" } else { "direct" }
    }
}

/// Probes the database and decides the plan.
///
/// # Errors
/// The database cannot be reached at all (that is no pooler's doing), or
/// `PGRELAY_DIRECT_DATABASE_URL` does not reach the database `DATABASE_URL`
/// does (its NOTIFY never arrives there): migrating or listening there would
/// be wrong.
pub async fn plan(settings: &Settings) -> Result<Plan, PlanError> {
    let pooled = is_pooler(settings).await?;
    let name = format!("pgrelay {} probe", settings.node_id);
    match &settings.direct_database_url {
        // Through the pooler, and no session to LISTEN on.
        None if pooled => Ok(Plan {
            pooled,
            wakeups: Wakeups::PollOnly {
                reason: "DATABASE_URL is a transaction-mode pooler (PGRELAY_DATABASE_POOLER, or \
                         its statements move between server processes) and \
                         PGRELAY_DIRECT_DATABASE_URL is not set: LISTEN cannot work through it"
                    .into(),
            },
        }),
        None => {
            // A real session: LISTEN there. A probe that fails on it (a slow
            // server) is no reason to poll for the life of the process: the
            // listener reconnects, `/readyz` reports it, and the rescan
            // covers what it misses.
            let came_back =
                notify_comes_back(&settings.database_url, &settings.database_url, &name)
                    .await
                    .map_err(|error| match error {
                        // A notification in the middle of another statement's
                        // answer: the LISTEN went through a transaction-mode pooler.
                        sqlx::Error::Protocol(_) => PlanError::LooksPooled(error.to_string()),
                        other => PlanError::Database(other),
                    })?;
            if !came_back {
                tracing::warn!(
                    wait_ms = PROBE_WAIT.as_millis() as u64,
                    "a NOTIFY sent through DATABASE_URL did not come back in time; LISTENing anyway"
                );
            }
            Ok(Plan {
                pooled,
                wakeups: Wakeups::Notify {
                    url: settings.database_url.clone(),
                },
            })
        }
        // What the node will do: notify through DATABASE_URL (in a
        // transaction, as `relay.enqueue` does), LISTEN on the direct URL.
        Some(direct) => {
            if shares_server_processes(direct, &name).await? {
                return Err(PlanError::DirectIsPooled);
            }
            if notify_comes_back(&settings.database_url, direct, &name).await? {
                Ok(Plan {
                    pooled,
                    wakeups: Wakeups::Notify {
                        url: direct.clone(),
                    },
                })
            } else {
                Err(PlanError::DirectElsewhere(PROBE_WAIT.as_millis() as u64))
            }
        }
    }
}

/// Why the start-up probe refused.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(
        "a NOTIFY sent through DATABASE_URL did not reach a LISTEN on PGRELAY_DIRECT_DATABASE_URL \
         within {0} ms: do both name the same database (of the same server)?"
    )]
    DirectElsewhere(u64),
    #[error(
        "DATABASE_URL behaves like a transaction-mode pooler ({0}): unset \
         PGRELAY_DATABASE_POOLER=direct, or set it to transaction"
    )]
    LooksPooled(String),
    #[error(
        "PGRELAY_DIRECT_DATABASE_URL is a transaction-mode pooler too (its statements move \
         between server processes): it must reach PostgreSQL itself, or a session-mode pooler"
    )]
    DirectIsPooled,
}

/// Whether `settings.database_url` is a transaction-mode pooler, by
/// `PGRELAY_DATABASE_POOLER` or, on `auto`, by asking it.
///
/// # Errors
/// The database cannot be reached.
pub async fn is_pooler(settings: &Settings) -> Result<bool, sqlx::Error> {
    match settings.database_pooler {
        PoolerMode::Direct => Ok(false),
        PoolerMode::Transaction => Ok(true),
        PoolerMode::Auto if settings.direct_database_url.is_some() => Ok(true),
        PoolerMode::Auto => {
            let name = format!("pgrelay {} probe", settings.node_id);
            shares_server_processes(&settings.database_url, &name).await
        }
    }
}

/// Whether a NOTIFY sent through `send_url`, in a transaction, reaches a
/// LISTEN on `listen_url`. Only simple-protocol statements, with
/// pooler-safe options (`send_url` may be a pooler); bounded throughout.
async fn notify_comes_back(
    send_url: &str,
    listen_url: &str,
    application_name: &str,
) -> Result<bool, sqlx::Error> {
    let listen_options = super::pooler_options(listen_url, application_name)?;
    let send_options = super::pooler_options(send_url, application_name)?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(super::ACQUIRE_TIMEOUT)
        .connect_with(listen_options)
        .await?;
    let channel = format!("pgrelay_probe_{}", Uuid::new_v4().simple());
    let probe = async {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(&channel).await?;
        let mut sender = send_options.connect().await?;
        // One message: a pooler runs it on one server connection.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; NOTIFY {channel}; COMMIT"
        )))
        .execute(&mut sender)
        .await?;
        let _ = sender.close().await;
        Ok::<_, sqlx::Error>(
            match tokio::time::timeout(PROBE_WAIT, listener.try_recv()).await {
                Ok(Ok(Some(notification))) => notification.channel() == channel,
                // The connection closed under it, or nothing came.
                Ok(Ok(None)) | Err(_) => false,
                Ok(Err(error)) => return Err(error),
            },
        )
    };
    let outcome = tokio::time::timeout(super::OP_TIMEOUT + PROBE_WAIT, probe)
        .await
        .unwrap_or_else(|_| Err(timed_out()));
    // Closing waits for the listener's UNLISTEN: not for long.
    let _ = tokio::time::timeout(Duration::from_secs(1), pool.close()).await;
    outcome
}

/// Whether `url`'s client connections share server processes: a
/// transaction-mode pooler. Each round asks two client connections for
/// their server process, one after the other (a pooler hands the second the
/// process the first just gave back), and watches whether either's moves.
async fn shares_server_processes(url: &str, application_name: &str) -> Result<bool, sqlx::Error> {
    let options = super::pooler_options(url, application_name)?;
    let connect = || async {
        tokio::time::timeout(super::OP_TIMEOUT, options.connect())
            .await
            .map_err(|_| timed_out())?
    };
    let (mut first, mut second) = (connect().await?, connect().await?);
    let outcome = async {
        let mut seen: [Option<i32>; 2] = [None, None];
        for round in 0..4 {
            // Both orders: a pooler that hands out its server connections in
            // turn (server_round_robin) would otherwise give each client the
            // same one every round.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for slot in order {
                let connection = if slot == 0 { &mut first } else { &mut second };
                let pid = server_process(connection).await?;
                if seen[slot].is_some_and(|before| before != pid) || seen[1 - slot] == Some(pid) {
                    return Ok(true);
                }
                seen[slot] = Some(pid);
            }
        }
        Ok(false)
    }
    .await;
    let _ = first.close().await;
    let _ = second.close().await;
    outcome
}

/// The server process running this connection's statement (one
/// simple-protocol message: nothing a pooler could split).
async fn server_process(connection: &mut sqlx::PgConnection) -> Result<i32, sqlx::Error> {
    use sqlx::Row;
    let row = tokio::time::timeout(
        super::OP_TIMEOUT,
        sqlx::raw_sql("SELECT pg_backend_pid()").fetch_one(&mut *connection),
    )
    .await
    .map_err(|_| timed_out())??;
    row.try_get::<i32, _>(0)
}

fn timed_out() -> sqlx::Error {
    sqlx::Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the database did not answer the start-up probe in time",
    ))
}

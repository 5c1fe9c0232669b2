//! Storing and routing messages: in one transaction, to the nodes that hold
//! their recipients. The routing itself lives in the SQL
//! function `relay.enqueue` (see the migrations), so that the HTTP API and
//! `relay.send_to_user()` share one implementation of the ordering protocol.
//!
//! Every submission has a deadline, and its answer is honest about it (G8):
//! "not stored" ([`EnqueueError::is_not_stored`]) is said only when the
//! message can never commit, and a lost answer is
//! [`EnqueueError::OutcomeUnknown`] (the message may be stored; retrying with
//! the same `Idempotency-Key` is safe).
//!
//! A submission first goes in one autocommit statement that waits for no
//! stream lock ([`store_at_once`]): one round trip. An error from the server
//! means it rolled back; no answer in time means unknown. Only when a stream
//! is held by another transaction (an application's, in SQL) does it try
//! again in a transaction that waits for it ([`Submission`]): until COMMIT
//! is sent, giving up rolls it back (the server also stops its statements at
//! the deadline), and a lost answer to COMMIT is unknown. Such waits are
//! bounded in number (a semaphore), so that a held stream cannot take every
//! pooled connection.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::db::{self, Bounds, CommitError};
use crate::message::{NewMessage, Payload};

/// Where a message was submitted, recorded in `relay.messages.source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Http,
    WebSocket,
    /// STOMP over TCP (a backend such as Spring's broker relay).
    Tcp,
    /// `pgrelay send`, straight into the database.
    Cli,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::WebSocket => "ws",
            Source::Tcp => "tcp",
            Source::Cli => "cli",
        }
    }
}

/// How long a submission may take, from its start, before it gives up: the
/// contract answers within 5 s.
pub const SUBMIT_TIMEOUT: Duration = Duration::from_millis(4500);

/// How long `pgrelay send` may take: a command line waits longer than a
/// request would (a stream held by an application's transaction), and
/// still says honestly whether the message was stored.
pub const CLI_SUBMIT_TIMEOUT: Duration = Duration::from_secs(30);

/// When a submission from `source` that starts now must be answered: the
/// one timeout policy for every way in.
pub fn deadline(source: Source) -> Instant {
    let limit = match source {
        Source::Http | Source::WebSocket | Source::Tcp => SUBMIT_TIMEOUT,
        Source::Cli => CLI_SUBMIT_TIMEOUT,
    };
    Instant::now() + limit
}

/// Time kept for COMMIT itself: work before it must be done this long
/// before the deadline.
pub(crate) const COMMIT_MARGIN: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, thiserror::Error)]
pub enum EnqueueError {
    #[error("{0}")]
    ConnectionNotFound(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Invalid(String),
    /// Not stored: a stream was held by another transaction for longer than
    /// the submission could wait (or too many submissions wait already).
    #[error("a stream is held by another transaction; nothing was stored")]
    Busy,
    /// Not stored: the database is unavailable, or did not answer before the
    /// deadline (the transaction was rolled back before COMMIT).
    #[error("the database is unavailable; nothing was stored ({0})")]
    Unavailable(String),
    /// Not stored: the transaction lost a race with another (a
    /// serialization failure, a deadlock); trying again may succeed.
    #[error("the transaction conflicted with another; nothing was stored ({0})")]
    Conflict(String),
    /// Stored or not: COMMIT was sent and its answer was lost.
    #[error("the outcome is unknown: the answer to COMMIT was lost ({0})")]
    OutcomeUnknown(String),
    /// Not stored: an unexpected database error.
    #[error("database error: {0}")]
    Database(String),
}

impl EnqueueError {
    /// Whether the message can never be stored (everything but an unknown
    /// outcome).
    pub fn is_not_stored(&self) -> bool {
        !matches!(self, EnqueueError::OutcomeUnknown(_))
    }

    /// The metric label for a failure: `not_stored` or `unknown`.
    pub fn outcome(&self) -> &'static str {
        if self.is_not_stored() {
            "not_stored"
        } else {
            "unknown"
        }
    }

    pub(crate) fn timed_out() -> Self {
        EnqueueError::Unavailable("the database did not answer in time".into())
    }
}

/// Statement errors, before COMMIT: the transaction is rolled back, so
/// nothing is stored whatever the error.
impl From<sqlx::Error> for EnqueueError {
    fn from(error: sqlx::Error) -> Self {
        if let Some(db) = error.as_database_error() {
            let message = db.message().to_owned();
            match db.code().as_deref() {
                Some("P0002") => return EnqueueError::ConnectionNotFound(message),
                Some("0A000") => return EnqueueError::Unsupported(message),
                Some("22023") | Some("54000") => return EnqueueError::Invalid(message),
                Some("55P03") => return EnqueueError::Busy,
                // The server stopped the statement at the submission's
                // deadline (statement_timeout) or ended an idle transaction:
                // rolled back, nothing stored.
                Some("57014") | Some("25P03") => return EnqueueError::timed_out(),
                Some("40001") | Some("40P01") => return EnqueueError::Conflict(message),
                _ => {}
            }
        }
        if db::is_unavailable(&error) {
            EnqueueError::Unavailable(error.to_string())
        } else {
            EnqueueError::Database(error.to_string())
        }
    }
}

/// A submission's transaction: it commits by its deadline, or says why
/// not, honestly (see the module's documentation). Run each statement in it
/// through [`in_time`] with [`Submission::until`].
pub struct Submission {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    until: Instant,
    deadline: Instant,
}

impl Submission {
    /// Begins, under limits the server enforces too: its statements stop at
    /// the deadline, lock waits after `lock` (None: only the deadline bounds
    /// them).
    pub async fn begin(
        pool: &PgPool,
        deadline: Instant,
        lock: Option<Duration>,
    ) -> Result<Self, EnqueueError> {
        let Some(until) = deadline.checked_sub(COMMIT_MARGIN) else {
            return Err(EnqueueError::timed_out());
        };
        let budget = until.saturating_duration_since(Instant::now());
        if budget.is_zero() {
            return Err(EnqueueError::timed_out());
        }
        let bounds = Bounds {
            statement: budget,
            idle: budget,
            lock: lock.map(|lock| lock.min(budget)),
            asynchronous_commit: false,
        };
        let tx = in_time(until, db::begin_bounded(pool, bounds)).await?;
        Ok(Self {
            tx,
            until,
            deadline,
        })
    }

    /// When the work before COMMIT must be done.
    pub fn until(&self) -> Instant {
        self.until
    }

    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits, and says what a failure means: rolled back (not stored), or
    /// unknown.
    pub async fn commit(self) -> Result<(), EnqueueError> {
        let left = self
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match db::commit_within(self.tx, left).await {
            Ok(()) => Ok(()),
            Err(CommitError::RolledBack(error)) => Err(error.into()),
            Err(CommitError::Unknown(why)) => Err(EnqueueError::OutcomeUnknown(why)),
        }
    }
}

/// How much longer than the server the client waits for a statement of a
/// submission. The server stops it at the deadline (statement_timeout) and
/// says so; the client gives up only when no answer comes at all (a network
/// cut): cancelling a statement in flight would leave its connection with a
/// half-read answer.
const CLIENT_GRACE: Duration = Duration::from_millis(300);

/// Runs a statement of a [`Submission`], giving up shortly after `until`
/// (when the server stops it): the transaction is then dropped before
/// COMMIT, and rolls back.
pub async fn in_time<T, E: Into<EnqueueError>>(
    until: Instant,
    statement: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, EnqueueError> {
    match tokio::time::timeout_at(until + CLIENT_GRACE, statement).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(EnqueueError::timed_out()),
    }
}

/// A permit to wait for a held stream, by `deadline`.
pub async fn slow_permit(
    slow: &Semaphore,
    deadline: Instant,
) -> Result<tokio::sync::SemaphorePermit<'_>, EnqueueError> {
    match tokio::time::timeout_at(deadline, slow.acquire()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(EnqueueError::Busy),
    }
}

/// Stores and routes `messages` atomically by `deadline` and returns their
/// ids, in order, once committed: first at once (see [`store_at_once`]); if
/// a stream is held by another transaction, once more in a transaction that
/// waits for it, under a permit of `slow`.
pub async fn store(
    pool: &PgPool,
    slow: &Semaphore,
    messages: &[NewMessage],
    source: Source,
    deadline: Instant,
) -> Result<Vec<i64>, EnqueueError> {
    match store_at_once(pool, messages, source, deadline).await {
        Err(EnqueueError::Busy) => {}
        done => return done,
    }
    let _permit = slow_permit(slow, deadline).await?;
    store_once(pool, messages, source, deadline, false).await
}

/// The fast way in: one autocommit statement, one round trip, that waits
/// for no lock (NOWAIT; a held stream fails it at once with
/// [`EnqueueError::Busy`], nothing stored). Its answer is honest too: an
/// error from the server means it rolled back; no answer (a broken
/// connection, the deadline passing while the database stalls) means the
/// statement may still commit, and says so.
pub async fn store_at_once(
    pool: &PgPool,
    messages: &[NewMessage],
    source: Source,
    deadline: Instant,
) -> Result<Vec<i64>, EnqueueError> {
    if db::pooled() {
        // Through a pooler a statement runs in a transaction of its own
        // (see `db::scope`): the transaction's honest commit is the way.
        return store_once(pool, messages, source, deadline, true).await;
    }
    // Not sent yet: a failure here stores nothing.
    let mut connection = match tokio::time::timeout_at(deadline, pool.acquire()).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => return Err(error.into()),
        Err(_) => return Err(EnqueueError::timed_out()),
    };
    let sent = tokio::time::timeout_at(
        deadline,
        enqueue_raw(&mut *connection, messages, source, true),
    )
    .await;
    match sent {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(error))
            if error.as_database_error().is_some() && !db::is_connection_loss(&error) =>
        {
            Err(error.into())
        }
        Ok(Err(error)) => Err(EnqueueError::OutcomeUnknown(error.to_string())),
        Err(_) => {
            // Still running in the server, perhaps: this connection is not
            // reused with an answer half read.
            connection.close_on_drop();
            Err(EnqueueError::OutcomeUnknown(
                "the database did not answer in time".into(),
            ))
        }
    }
}

async fn store_once(
    pool: &PgPool,
    messages: &[NewMessage],
    source: Source,
    deadline: Instant,
    nowait: bool,
) -> Result<Vec<i64>, EnqueueError> {
    let lock = (!nowait).then_some(SUBMIT_TIMEOUT);
    let mut submission = Submission::begin(pool, deadline, lock).await?;
    let until = submission.until();
    let ids = in_time(
        until,
        enqueue_with(submission.connection(), messages, source, nowait),
    )
    .await?;
    submission.commit().await?;
    Ok(ids)
}

/// Stores and routes `messages` on `executor` (e.g. inside a caller's
/// transaction) and returns their ids. With `nowait`, a stream held by
/// another transaction fails the call at once ([`EnqueueError::Busy`])
/// instead of waiting for it.
pub async fn enqueue_with<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    messages: &[NewMessage],
    source: Source,
    nowait: bool,
) -> Result<Vec<i64>, EnqueueError> {
    Ok(enqueue_raw(executor, messages, source, nowait).await?)
}

async fn enqueue_raw<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    messages: &[NewMessage],
    source: Source,
    nowait: bool,
) -> Result<Vec<i64>, sqlx::Error> {
    let mut targets = Vec::with_capacity(messages.len());
    let mut destinations = Vec::with_capacity(messages.len());
    let mut data = Vec::with_capacity(messages.len());
    let mut bodies = Vec::with_capacity(messages.len());
    let mut content_types = Vec::with_capacity(messages.len());
    let mut ttls = Vec::with_capacity(messages.len());
    let mut headers = Vec::with_capacity(messages.len());
    for message in messages {
        headers.push(crate::message::headers_to_json(&message.headers));
        targets.push(message.target.to_json().to_string());
        destinations.push(message.destination.clone());
        match &message.payload {
            Payload::Json(raw) => {
                data.push(Some(raw.get().to_owned()));
                bodies.push(None);
                content_types.push(None);
            }
            Payload::Raw {
                bytes,
                content_type,
            } => {
                data.push(None);
                bodies.push(Some(bytes.to_vec()));
                content_types.push(content_type.clone());
            }
        }
        // 0 stands for "the configured default" (arrays of NULLs are awkward to bind).
        ttls.push(message.ttl_secs.map_or(0, |s| s as i64));
    }
    let ids = sqlx::query_scalar!(
        r#"
        SELECT relay.enqueue(
            $1::text[]::jsonb[],
            $2::text[],
            $3::text[]::jsonb[],
            ARRAY(SELECT make_interval(secs => NULLIF(t.s, 0))
                    FROM unnest($4::bigint[]) WITH ORDINALITY AS t(s, i)
                   ORDER BY t.i),
            $5,
            $6::bytea[],
            $7::text[],
            $8,
            $9::text[]::jsonb[]) AS "ids!"
        "#,
        &targets,
        &destinations as &[Option<String>],
        &data as &[Option<String>],
        &ttls,
        source.as_str(),
        &bodies as &[Option<Vec<u8>>],
        &content_types as &[Option<String>],
        nowait,
        &headers as &[Option<String>],
    )
    .fetch_one(executor)
    .await?;
    Ok(ids)
}
